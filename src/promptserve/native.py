"""The scheduler's hot path compiled with mypyc, loaded in place of its Python where a build of
these very sources exists.

Why mypyc: the step policy's per-request path (the finish-time walk of ``fits``, placement,
the boundary, the cache index) is many small typed calls on small lists and dataclasses, not
arrays a vectorised form could batch; mypyc compiles the typed sources as they are, so the
Python stays the one source of truth, both clocks run the same decisions, and a machine
without a C compiler runs the same modules interpreted.

``make native`` (part of ``make install``) builds ``build/native`` beside ``src``: the
extension modules and a manifest of each source's digest. At import, ``install`` loads them
only if every listed source still has the digest it was built from (an edited module would
otherwise run its old code), and all or none (compiled modules reach into each other's
classes natively). ``PROMPTSERVE_NATIVE=0`` runs the Python. A compiled class cannot be
copied as a Python one is: the mutable ones the selector's snapshots copy are marked
``mypyc_attr(serializable=True, allow_interpreted_subclasses=True)`` in their modules, and the
frozen dataclasses are shared (``policy.selector.SHARED``).
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import sys
from pathlib import Path

# the per-request path of both clocks: the step policy (and its shards), the step-time model,
# the simulator's loop and lookups, the cache index (``policy/contract.py`` stays Python: its
# scheduler protocol is checked at run time)
MODULES = (
    "promptserve.steptime",
    "promptserve.strength",
    "promptserve.policy.types",
    "promptserve.policy.estimator",
    "promptserve.policy.residency",
    "promptserve.policy.planning",
    "promptserve.policy.shards",
    *(
        f"promptserve.policy.step.{m}"
        for m in (
            "admission",
            "background",
            "boundaries",
            "bursts",
            "cluster",
            "config",
            "excess",
            "fit",
            "gpu",
            "levels",
            "lifecycle",
            "placement",
            "price",
            "queue",
            "scheduler",
            "sizemix",
        )  # fmt: skip
    ),
    "promptserve.sim.events",
    "promptserve.sim.lookups",
    "promptserve.cache.index",
)
CHECKED = ("promptserve.policy.contract",)  # type-checked with them, left to the interpreter
GROUP = "promptserve_native"  # the shared library every compiled module's shim imports
SRC = Path(__file__).resolve().parent.parent  # the folder holding ``promptserve``
BUILD = SRC.parent / "build" / "native"
MANIFEST = "manifest.json"


def source(module: str, src: Path = SRC) -> Path:
    return src / (module.replace(".", "/") + ".py")


def digests(src: Path = SRC) -> dict[str, str]:
    return {m: hashlib.sha256(source(m, src).read_bytes()).hexdigest() for m in MODULES}


def stamp() -> dict[str, str]:
    """What a build must match besides its sources: the interpreter it was compiled for."""
    return {"python": sys.version.split()[0], "suffix": importlib.machinery.EXTENSION_SUFFIXES[0]}


def status(build: Path = BUILD, src: Path = SRC) -> str:
    """``on``, or why the Python runs: ``off`` (asked), ``absent`` (not built), ``stale`` (a
    source or the interpreter changed since the build)."""
    if os.environ.get("PROMPTSERVE_NATIVE", "1") == "0":
        return "off"
    return current(build, src)


def current(build: Path = BUILD, src: Path = SRC) -> str:
    """Whether the build matches these sources and this interpreter (``on``, ``absent`` or
    ``stale``), whatever ``PROMPTSERVE_NATIVE`` asks of this process."""
    try:
        manifest = json.loads((build / MANIFEST).read_text())
    except (OSError, ValueError):
        return "absent"
    if manifest.get("stamp") != stamp() or manifest.get("sources") != digests(src):
        return "stale"
    return "on"


class _Finder(importlib.abc.MetaPathFinder):
    """Finds the compiled modules (and their shared library) in the build folder."""

    def __init__(self, build: Path) -> None:
        self.build = build
        self.names = {*MODULES, f"{GROUP}__mypyc"}

    def find_spec(self, fullname, path=None, target=None):  # noqa: ANN001, ANN201
        if fullname not in self.names:
            return None
        suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
        so = self.build / (fullname.replace(".", "/") + suffix)
        loader = importlib.machinery.ExtensionFileLoader(fullname, str(so))
        return importlib.util.spec_from_file_location(fullname, so, loader=loader)


ACTIVE: str = "not installed"  # what ``install`` found: ``on`` or ``status``'s reason


def install(build: Path = BUILD) -> str:
    """Put the compiled modules first on the import path where they match their sources."""
    global ACTIVE
    ACTIVE = status(build)
    if ACTIVE == "on" and not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder(build))
    return ACTIVE


def build(out: Path = BUILD, src: Path = SRC, jobs: int = 0) -> Path:
    """Compile ``MODULES`` with mypyc into ``out`` (a staging copy of the package is built in
    place, then only the extension modules and the manifest are kept)."""
    import shutil
    import subprocess
    import tempfile

    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        stage = Path(tmp)
        shutil.copytree(src / "promptserve", stage / "promptserve",
                        ignore=shutil.ignore_patterns("__pycache__", "*.so"))  # fmt: skip
        # type-check the compiled modules only: what they import from elsewhere is opaque
        # to them (checked as it is by ruff and the tests), and the build stays a minute
        (stage / "mypy.ini").write_text(
            "[mypy]\nfollow_imports = skip\nignore_missing_imports = True\n"
        )
        sources = digests(stage)  # what is compiled, whatever changes in ``src`` meanwhile
        paths = [str(source(m, stage).relative_to(stage)) for m in MODULES]
        checked = [str(source(m, stage).relative_to(stage)) for m in CHECKED]
        script = (
            "import sys; from setuptools import setup; from mypyc.build import mypycify;"
            f"paths = sys.argv[1:]; n = {len(paths)};"
            f"setup(name={GROUP!r}, ext_modules=mypycify(paths, only_compile_paths=paths[:n],"
            f" group_name={GROUP!r}),"
            f"script_args=['-q', 'build_ext', '--inplace', '-j', '{jobs or os.cpu_count() or 1}'])"
        )
        done = subprocess.run(
            [sys.executable, "-c", script, *paths, *checked],
            cwd=stage,
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"mypyc failed (PROMPTSERVE_NATIVE=0 skips the build and runs the Python):\n"
                f"{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
            )
        (out / MANIFEST).unlink(missing_ok=True)  # no build is used while it is replaced
        for old in out.rglob("*.so"):
            old.unlink()
        for so in [*stage.glob("*.so"), *(stage / "promptserve").rglob("*.so")]:
            target = out / so.relative_to(stage)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(so, target)
    manifest = {"stamp": stamp(), "sources": sources}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    """``make native``'s entry (``build``), and ``status``."""
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["build"]:
        if status() in ("on", "off"):
            print(f"compiled hot path: {status()}", file=sys.stderr)
            return 0
        print(f"compiling {len(MODULES)} modules with mypyc…", file=sys.stderr, flush=True)
        print(f"built {build()}")
        return 0
    if args[:1] in ([], ["status"]):
        print(status())
        return 0
    print("usage: main(['build']) or main(['status'])", file=sys.stderr)
    return 2
