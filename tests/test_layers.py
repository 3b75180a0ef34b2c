"""How the package's modules depend on one another: the layers of DESIGN.md section 2, and no
cycles, counting the imports inside functions (a cycle dodged by a late import is a cycle)."""

import ast
from pathlib import Path

import promptserve

SRC = Path(promptserve.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports(path: Path) -> set[str]:
    """The project modules ``path`` imports anywhere in it (``from a.b import c`` counts
    ``a.b.c`` when that is a module, else ``a.b``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        else:
            continue
        found |= {n for n in names if n.startswith("promptserve") and n in MODULES}
    if module_name(path) in found:
        found.remove(module_name(path))
    return found


MODULES = {module_name(p) for p in SRC.rglob("*.py")}


def graph() -> dict[str, set[str]]:
    edges = {module_name(p): project_imports(p) for p in SRC.rglob("*.py")}
    # ``from promptserve.x import y`` of a name (not a module) reaches x's __init__ only
    return {
        m: {d for d in deps if not (m.startswith(d + ".") and d != m)} for m, deps in edges.items()
    }


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected set of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_the_package_has_no_import_cycles():
    assert cycles(graph()) == []


def test_the_detector_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_server_imports_nothing_from_the_simulator():
    for module, deps in graph().items():
        if module.startswith("promptserve.server"):
            assert not [d for d in deps if d.startswith("promptserve.sim")], module


def test_the_edge_knows_nothing_of_serving():
    """What guards the connection and the caller's key sits below the app: it imports no
    runtime, policy or simulator module, so a change to serving cannot open the edge."""
    below = ("promptserve.server", "promptserve.policy", "promptserve.sim", "promptserve.engine")
    for module, deps in graph().items():
        if module.startswith("promptserve.edge"):
            assert not [d for d in deps if d.startswith(below)], module
    assert any(m.startswith("promptserve.edge.") for m in graph())


# what each package offers, pinned: a name added or dropped is a decision, made here too
EXPORTS = {
    "cache": "CacheEntry CacheIndex DiskCachedEmbedder Embedder HashingEmbedder InsertResult "
    "Match Thresholds kopt_mix latent_key load_thresholds make_embedder shipped_thresholds",
    "cli": "app main",
    "distributed": "RaySettings deploy_app run_on_ray",
    "engine": "Engine GenerationItem GenerationResult make_engine",
    "policy": "POLICIES Arrival Ask BatchWork Demand DispatchConfig Dispatcher Job LoadEstimator "
    "LoadSnapshot Outcome Plan Policy Replan Report Schedule Scheduler Setting Status StepWork "
    "Work admit align allocate get_policy intake parse_policies plan_joint route",
    "policy.step": "EXCESS_SHARE PRICE_MAX SLO_SHARE UTILISATION ExcessWork KRule Levels Member "
    "Repricing StepConfig StepGpu StepScheduler StepSpec",
    "server": "ServerConfig app_for build_app cache_quota cache_root engine_args latents_dir "
    "local_workers runtime_for served_name worker_devices",
    "sim": "Records SimInputs SimResult oracle_bounds simulate",
    "workers": "Executed LocalWorkers Prepared StepCall StepDone StoreRefs WorkerLost Workers advance "
    "compute_threads execute",
    "workload": "ARGUS_GPUS ArrivalSpec RateSegment argus_segments generate_arrivals "
    "load_prompts make_requests parse_arrival_spec poisson_arrivals trace_arrivals",
}


def test_each_package_exports_what_it_says_and_every_name_resolves():
    import importlib

    for package, names in EXPORTS.items():
        module = importlib.import_module(f"promptserve.{package}")
        assert sorted(module.__all__) == sorted(names.split()), package
        assert all(hasattr(module, name) for name in module.__all__), package


def test_the_policy_core_is_pure_code():
    """No clock, no event loop, no thread, no device, no web or cluster framework: both clocks
    drive the same decisions, and a test drives them by hand."""
    banned = {"asyncio", "time", "threading", "torch", "fastapi", "ray", "httpx"}
    for path in (SRC / "policy").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                roots = {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                roots = {node.module.split(".")[0]}
            else:
                continue
            assert not roots & banned, (path.name, roots & banned)


def test_the_drivers_keep_to_the_contract():
    """The simulator and the server reach a scheduler only through ``policy.contract``: no
    family's internals, no class per family."""
    internals = ("boundary(", "restart(", "next_steps", "dispatcher", ".plan =", "by_id")
    for package in ("server", "sim"):
        for path in (SRC / package).rglob("*.py"):
            text = path.read_text()
            found = [name for name in internals if name in text]
            assert not found, (path.name, found)
