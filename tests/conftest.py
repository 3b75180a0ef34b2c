import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"


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
