import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"


# the files that take longest, first: run in parallel (``make test``), a long file started
# last would run alone at the end; a file's tests stay together and in their order
LONGEST_FIRST = ("test_ray.py", "test_kopt_mix.py", "test_qwenimage.py", "test_edits.py")


def pytest_collection_modifyitems(items: list) -> None:
    def rank(item) -> int:  # noqa: ANN001
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: the order within each file and among the rest is kept


@pytest.fixture
def data_dir() -> Path:
    return DATA


@pytest.fixture(autouse=True)
def nothing_left_pending(monkeypatch):
    """Every live runtime a test starts has answered every request it took by the time the
    test ends: one left pending was lost (the conservation promise of the live clock)."""
    from promptserve.server.runtime import LiveRuntime

    made: list = []
    real = LiveRuntime.__init__

    def init(self, *args, **kwargs):
        made.append(self)
        real(self, *args, **kwargs)

    monkeypatch.setattr(LiveRuntime, "__init__", init)
    yield
    for runtime in made:
        assert not runtime.pending, f"{runtime.policy.name} left {sorted(runtime.pending)} pending"
        assert runtime.sched.pending() == 0, f"{runtime.policy.name}'s scheduler still holds work"
