"""What a level saves on a few-step schedule: a request resumed at K against the full run, end to
end (text encoding, the steps, the VAE decode and the PNG), on the tiny random-weight models,
for 8 steps (Z-Image-Turbo's), 4 (FLUX.1-schnell's) and the reference 50 (SD 1.x).

On 50 steps the steps are nearly all of a run, so resuming at K saves about K/50. On 4-8 steps
the work every request does whatever its K (encoding, decoding, the file) is a larger share, so
a level saves less than K/N: ``saved`` against ``ideal`` per level, and ``fixed_share``, the
part of a full run no level skips (the full run less N times a step, the step timed from the
difference between the full run and the deepest level). The policy prices the same split from
the profile (``steps_s`` against ``leave_s``), so it plans with what a level really saves on the
GPU it was profiled on; these CPU figures show the shape, not a GPU's values.

    python benchmarks/bench_fewstep.py [--docs]

``--docs`` writes ``docs/figures/fewstep.json`` and rewrites the table in ``docs/engine.md``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from promptserve.engine.base import GenerationItem
from promptserve.engine.diffusers_backend import levels_for
from promptserve.engine.shapes import build
from promptserve.engine.speed import best_of
from promptserve.engine.tiny import DenoisingEngine


def levels_saved(name: str, c, steps: int, guidance: float, repeats: int = 15) -> dict:  # noqa: ANN001
    """A batch of 4 at each level, each side's best of ``repeats`` (a tiny model's run is
    milliseconds: the best of many is what the work costs, not the machine's noise)."""
    engine = DenoisingEngine(c, name, steps, levels_for(steps), guidance)
    base = engine.generate([GenerationItem("a lighthouse at dusk", 0, seed=0)])[0]

    def run(k: int) -> float:
        items = [
            GenerationItem(f"a harbour at night {i}", k, base.latents.get(k), seed=i)
            for i in range(4)
        ]
        return best_of(lambda: engine.generate(items), repeats, time.perf_counter)

    full = run(0)
    times = {k: run(k) for k in engine.levels[1:]}
    deepest = engine.levels[-1]
    step_s = (full - times[deepest]) / deepest
    return {
        "steps": steps,
        "levels": list(engine.levels),
        "full_s": round(full, 4),
        "fixed_share": round(max(full - steps * step_s, 0.0) / full, 3),
        "saved": {f"K{k}": round(1 - t / full, 3) for k, t in times.items()},
        "ideal": {f"K{k}": round(k / steps, 3) for k in times},
    }


ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", action="store_true", help="write docs/figures/fewstep.json")
    args = parser.parse_args()
    torch.set_num_threads(1)  # one core each time: the ratios, not the machine's parallelism
    runs = {
        "zimage_8": levels_saved("zimage", build("zimage"), 8, 0.0),
        "flux_schnell_4": levels_saved("schnell", build("flux-schnell"), 4, 0.0),
        "sd_50": levels_saved("sd", build("tiny"), 50, 7.5, repeats=5),
    }
    out = {"bench": "fewstep", "device": "cpu", "model": "tiny", **runs}
    out["command"] = "python benchmarks/bench_fewstep.py --docs"
    if args.docs:
        from promptserve.sim.figures import rewrite

        (ROOT / "docs/figures/fewstep.json").write_text(json.dumps(out, indent=1) + "\n")
        rewrite(ROOT / "docs/engine.md", ROOT)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
