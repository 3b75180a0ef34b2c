"""Which LoRA adapters a GPU holds on its device: the policy's model of each worker's bounded
resident set (``engine.adapterbank.AdapterBank``: ``slots`` adapters, least recently used out). A job
that names an adapter its GPU does not hold waits for the copy (``load_s`` each) before its
first step, and a GPU's running members may name at most ``slots`` distinct adapters (they
share the device's rows). Kept beside the GPU state of both families, the same on both clocks.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field

from mypy_extensions import mypyc_attr


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)  # copyable (``native``)
@dataclass
class ResidentSet:
    slots: int = 0  # adapters a device holds at once; 0: no bound (every adapter resident)
    # private (``serve --lora-private``): every join loads its adapters, resident or not, so
    # whether another tenant used one lately changes neither a join's time nor admission
    private: bool = False
    lru: OrderedDict = field(default_factory=OrderedDict)  # adapter ids, oldest first
    refs: dict[int, int] = field(default_factory=dict)  # running members naming each

    def missing(self, adapters: Iterable[int]) -> int:
        """How many of ``adapters`` would have to be loaded (distinct, not held)."""
        if not self.slots:
            return 0
        if self.private:
            return len(set(adapters))
        return sum(1 for a in set(adapters) if a not in self.lru)

    def room_for(self, adapters: Iterable[int]) -> bool:
        """Whether the running members' adapters and ``adapters`` fit in the slots."""
        if not self.slots:
            return True
        named = {a for a, n in self.refs.items() if n} | set(adapters)
        return len(named) <= self.slots

    def use(self, adapters: Iterable[int]) -> int:
        """A member joins naming ``adapters``: they are held from now (loaded over the least
        recently used adapter no running member names); how many were loaded."""
        if not self.slots:
            return 0
        loaded = 0
        for a in sorted(set(adapters)):
            self.refs[a] = self.refs.get(a, 0) + 1
            if a in self.lru:
                self.lru.move_to_end(a)
                loaded += self.private  # copied in afresh all the same
                continue
            if len(self.lru) >= self.slots:
                victim = next((v for v in self.lru if not self.refs.get(v)), None)
                if victim is not None:
                    del self.lru[victim]
            self.lru[a] = None
            loaded += 1
        return loaded

    def release(self, adapters: Iterable[int]) -> None:
        """A member that named ``adapters`` left (they stay held until pushed out)."""
        if not self.slots:
            return
        for a in set(adapters):
            self.refs[a] = self.refs.get(a, 0) - 1
