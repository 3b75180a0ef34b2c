"""The compiled hot path (``promptserve.native``): loaded only where it was built from these
very sources, and it decides exactly as the Python does."""

import dataclasses
import importlib
import json
import os
import subprocess
import sys

import pytest

from promptserve import native
from promptserve.policy import selector

# a short simulation's records, hashed: run in a fresh interpreter on either path
DIGEST = """
import hashlib, json, sys
import numpy as np
from promptserve import native
from promptserve.cache.thresholds import shipped_thresholds
from promptserve.policy import Setting, get_policy
from promptserve.profile import reference_profile, with_feature_cache
from promptserve.quality import interval_quality, quality_model
from promptserve.sim.simulator import SimInputs, simulate
from promptserve.workload import generate_arrivals, make_requests, parse_arrival_spec
profile = with_feature_cache(reference_profile())
qm = quality_model(profile.levels, profile.quality)
times = generate_arrivals(parse_arrival_spec("poisson"), rate_qpm=100, minutes=4, seed=3)
prompts = [f"prompt {i % 97}" for i in range(len(times))]
reqs = make_requests(prompts, times, 21.0)
emb = np.random.default_rng(0).standard_normal((97, 16)).astype(np.float32)
emb /= np.linalg.norm(emb, axis=1, keepdims=True)
emb = emb[[i % 97 for i in range(len(times))]]
out = {"native": native.ACTIVE}
for name in sys.argv[1:]:
    q_r = tuple(interval_quality("mild").q_r(r) for r in (1, 2, 3, 4))
    setting = Setting((profile,) * 2, qm.matrix(), 21.0, q_r)
    inputs = SimInputs(reqs, emb, setting, qm, shipped_thresholds("minilm"))
    rec = simulate(get_policy(name), inputs).records
    h = hashlib.sha256()
    for a in (rec.status, rec.finish_s, rec.level, rec.quality, rec.k_opt):
        h.update(np.ascontiguousarray(a).tobytes())
    out[name] = h.hexdigest()[:16]
print(json.dumps(out))
"""


def digests(native_on: bool, policies: list[str]) -> dict:
    env = dict(os.environ, PROMPTSERVE_NATIVE="1" if native_on else "0", HF_HUB_OFFLINE="1")
    done = subprocess.run(
        [sys.executable, "-c", DIGEST, *policies], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def built():
    """The build, current for these sources. ``make test`` builds it first; a bare ``pytest``
    after an edit to a compiled module builds it here (about a minute), so the comparison
    always runs."""
    if native.current() != "on":
        native.build()
    assert native.current() == "on"
    return native.BUILD


def test_the_compiled_and_the_python_scheduler_decide_alike(built):
    """The default, the selector (its snapshots copy compiled state) and the background-free
    step rival, with feature caching on: the same records to the bit on both paths."""
    policies = ["promptserve-step", "promptserve-step+select", "continuous-ht+shed+admit"]
    compiled, python = digests(True, policies), digests(False, policies)
    assert compiled.pop("native") == "on" and python.pop("native") == "off"
    assert compiled == python


LOADED = """
import importlib, json
from promptserve import native
files = {m: importlib.import_module(m).__file__ for m in native.MODULES}
print(json.dumps({"active": native.ACTIVE, "files": files}))
"""


@pytest.mark.parametrize("native_on", [True, False])
def test_compiled_modules_are_the_ones_loaded_unless_the_python_is_asked_for(built, native_on):
    # a fresh process: this one chose its path at its start, maybe before ``built`` existed
    env = dict(os.environ, PROMPTSERVE_NATIVE="1" if native_on else "0")
    done = subprocess.run(
        [sys.executable, "-c", LOADED], env=env, capture_output=True, text=True, check=True
    )
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert loaded["active"] == ("on" if native_on else "off")
    for name, path in loaded["files"].items():
        assert path.startswith(str(built)) == native_on, name
        assert path.endswith(".py") != native_on, name


def test_a_build_is_used_only_with_the_sources_it_was_built_from(tmp_path, monkeypatch):
    src = tmp_path / "src"
    for m in native.MODULES:
        path = native.source(m, src)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"# {m}\n")
    build = tmp_path / "build"
    assert native.current(build, src) == "absent"
    build.mkdir()
    manifest = {"stamp": native.stamp(), "sources": native.digests(src)}
    (build / native.MANIFEST).write_text(json.dumps(manifest))
    assert native.current(build, src) == "on"
    native.source(native.MODULES[3], src).write_text("# edited\n")
    assert native.current(build, src) == "stale"  # an edited module runs as Python
    manifest["sources"] = native.digests(src)
    manifest["stamp"] = {**native.stamp(), "python": "3.0.0"}
    (build / native.MANIFEST).write_text(json.dumps(manifest))
    assert native.current(build, src) == "stale"  # another interpreter's build
    manifest["stamp"] = native.stamp()
    (build / native.MANIFEST).write_text(json.dumps(manifest))
    monkeypatch.setenv("PROMPTSERVE_NATIVE", "0")
    assert native.current(build, src) == "on" and native.status(build, src) == "off"


def test_every_frozen_dataclass_of_a_compiled_module_is_shared_by_snapshots():
    frozen = {
        cls
        for name in native.MODULES
        for cls in vars(importlib.import_module(name)).values()
        if isinstance(cls, type)
        and cls.__module__ == name
        and dataclasses.is_dataclass(cls)
        and cls.__dataclass_params__.frozen
    }
    missing = {c.__qualname__ for c in frozen - set(selector.SHARED)}
    # the simulator's and the cache's frozen records are never in a scheduler's state
    assert missing <= {"SimInputs", "Match"}, missing
