"""The GPUs of a step-level scheduler, indexed for placement: by member count (bucketed, so a
choice does not grow with the GPU count) and by the sizes each holds."""

from __future__ import annotations

from mypy_extensions import mypyc_attr

from promptserve.policy.residency import ResidentSet
from promptserve.policy.step.config import StepSpec
from promptserve.policy.step.gpu import GpuBucket, StepGpu


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)  # copyable (``native``)
class Cluster:
    def __init__(self, spec: StepSpec, n_gpus: int) -> None:
        self.spec = spec
        profile = spec.profile
        self.gpus = [
            StepGpu(i, resident=ResidentSet(profile.adapter_slots, profile.adapter_private))
            for i in range(n_gpus)
        ]
        self.by_count = [GpuBucket() for _ in range(profile.max_inflight + 2)]
        for g in range(n_gpus):
            self.by_count[0].add(g)
        self.holders: dict[int, set[int]] = {}  # per size: the GPUs holding a member of it
        self.up_count = n_gpus

    def least_loaded(self) -> StepGpu | None:
        for bucket in self.by_count:
            if bucket:
                return self.gpus[bucket.first()]
        return None

    def bucket_of(self, gpu: StepGpu) -> GpuBucket:
        return self.by_count[min(gpu.count, len(self.by_count) - 1)]

    def recount(self, gpu: StepGpu, before: int) -> None:
        """``gpu``'s members changed from ``before``: its bucket and sizes follow."""
        if self.spec.profile.sized:
            self.rehold(gpu)
        after = min(gpu.count, len(self.by_count) - 1)
        if before != after:
            self.by_count[min(before, len(self.by_count) - 1)].discard(gpu.index)
            if gpu.up:
                self.by_count[after].add(gpu.index)

    def rehold(self, gpu: StepGpu) -> None:
        held = gpu.held_shapes() if gpu.up else set()
        for shape, gpus in self.holders.items():
            if shape not in held:
                gpus.discard(gpu.index)
        for shape in held:
            self.holders.setdefault(shape, set()).add(gpu.index)

    def fullest(self) -> int:
        """The member count of the fullest up GPU (O(the in-flight cap))."""
        return max((c for c, bucket in enumerate(self.by_count) if bucket), default=0)

    def free_slots(self, n: int) -> int:
        """Slots below ``n`` members on the up GPUs."""
        return sum(len(bucket) * max(0, n - c) for c, bucket in enumerate(self.by_count))

    def idle(self) -> list[StepGpu]:
        """The up GPUs with no member, in index order."""
        return [self.gpus[i] for i in sorted(self.by_count[0])]

    def iteration_s(self, gpu: StepGpu) -> float:
        """One step of ``gpu``'s running members (0: none)."""
        profile = self.spec.profile
        if profile.mixed:
            return profile.mix_s(gpu.shapes) if gpu.by_id else 0.0
        return profile.iteration_s(len(gpu.by_id)) if gpu.by_id else 0.0

    def take_out(self, gpu: StepGpu) -> bool:
        """Out of placement and the step capacity (False: it already was)."""
        if not gpu.up:
            return False
        self.bucket_of(gpu).discard(gpu.index)
        gpu.up = False
        self.up_count -= 1
        self.rehold(gpu)
        return True

    def put_back(self, gpu: StepGpu) -> None:
        gpu.up = True
        self.up_count += 1
        self.bucket_of(gpu).add(gpu.index)
        self.rehold(gpu)
