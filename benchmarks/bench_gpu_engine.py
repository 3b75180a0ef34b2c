"""The engine on a GPU, for each family shape: SD 1.5, SDXL, SD3 medium and Flux dev (the
published architectures with random weights: no weights are on these machines).

Per family, in one run:
- ``vs_diffusers``: diffusers' pipeline ``__call__`` time over ours on the same modules, same
  steps, batch and dtype (> 1: ours is faster), and with the fastest options on ours;
- ``resume_max_abs_diff``: a run resumed from its own step-K latent against the full run;
- ``mixed_step_max_abs_diff``: a request inside a step-level batch whose other members join at
  other steps (some from cached latents), against its solo run, in the run's dtype;
- ``step_s_by_inflight``: the step runner's per-step latency at 1 .. 32 requests in flight;
- ``cached_step_s_by_inflight``, ``cached_over_full_by_inflight``: the same with every member
  on a cached step (feature caching: DeepCache's shallow branch on the UNets, the first block
  and the kept residual on SD3 and Flux), and its ratio to the full step;
- ``options`` (families in ``--options``): per-step latency at 8 in flight with each speed
  option on, over the plain engine's (< 1: faster), and torch.compile's one-off cost.

Each family's figures are also written to ``--out-dir`` as soon as they are measured, so a run
cut short keeps what it finished. Prints one JSON line at the end. Under 5 minutes on an H100
or H200 with the defaults. On a CPU, ``--scale tiny --device cpu`` runs the same code in
seconds (what the test suite does).

    python benchmarks/bench_gpu_engine.py --out-dir out/gpu [--profile-out sd15.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

from promptserve.engine.base import GenerationItem
from promptserve.engine.diffusers_backend import levels_for
from promptserve.engine.flow import DEFAULT_GUIDANCE
from promptserve.engine.options import EngineOptions, apply_options
from promptserve.engine.profiling import measure
from promptserve.engine.shapes import build
from promptserve.engine.speed import synced, vs_diffusers
from promptserve.engine.steprunner import StepRunner
from promptserve.engine.tiny import DenoisingEngine

SHAPES = {"sd15": "tiny", "sdxl": "sdxl", "sd3": "sd3", "flux": "flux"}  # name -> builder
STEPS = {"sd15": 50, "sdxl": 50, "sd3": 28, "flux": 28}
# fp16 for the UNets; bf16 for the transformers (random-weight T5-XXL overflows in fp16)
DTYPES = {"sd15": "float16", "sdxl": "float16", "sd3": "bfloat16", "flux": "bfloat16"}
DESCRIPTION = {
    "sd15": "SD-1.5 UNet, VAE, CLIP-L",
    "sdxl": "SDXL UNet, VAE, CLIP-L + CLIP-G",
    "sd3": "SD3-medium MMDiT (24 blocks), 16-ch VAE, CLIP-L + CLIP-G + T5-XXL",
    "flux": "Flux-dev (19 + 38 blocks), 16-ch VAE, CLIP-L + T5-XXL",
}


def engine_for(name: str, scale: str, device: str, dtype: str, size: int) -> DenoisingEngine:
    comps = build(SHAPES[name], scale, device, getattr(torch, dtype), size)
    steps = STEPS[name] if scale == "full" else 10
    guidance = DEFAULT_GUIDANCE.get(comps.family, 7.5)
    return DenoisingEngine(comps, f"{name}-shaped", steps, levels_for(steps), guidance)


def exactness(engine: DenoisingEngine) -> dict:
    """Resume-from-K against the full run, and a member of a mixed-step batch against its solo
    run, in the engine's dtype."""
    k = engine.levels[2]
    solo = engine.generate([GenerationItem("a lighthouse at dusk", 0, seed=7)])[0]
    resumed = engine.generate([GenerationItem("a lighthouse at dusk", k, solo.latents[k])])[0]
    runner = StepRunner(engine.c, engine.total_steps, engine.levels, engine.guidance)
    runner.join([("a", GenerationItem("a lighthouse at dusk", 0, seed=7))])
    done: dict = {}
    for i in range(1, 5):  # others join at different steps, some from cached latents
        done.update(runner.step())
        level = engine.levels[i % len(engine.levels)]
        start = solo.latents.get(level)
        runner.join([(i, GenerationItem(f"prompt {i}", level, start, seed=i))])
    while "a" not in done:
        done.update(runner.step())
    return {
        "resume_max_abs_diff": float(np.abs(resumed.final_latent - solo.final_latent).max()),
        "mixed_step_max_abs_diff": float(np.abs(done["a"].final_latent - solo.final_latent).max()),
        "latent_max_abs": float(np.abs(solo.final_latent).max()),
    }


def step_latency(engine: DenoisingEngine, n: int, timed: int = 3, cached: bool = False) -> float:
    """One step of ``n`` members after one untimed; ``cached``: every timed step a cached one
    (feature caching: the members join at an interval past the steps timed, so the untimed
    step is their full one)."""
    runner = StepRunner(engine.c, engine.total_steps, engine.levels, engine.guidance)
    interval = timed + 2 if cached else 1
    runner.join([(j, GenerationItem(f"p{j}", 0, seed=j, interval=interval)) for j in range(n)])
    clock = synced(engine.c.device)
    runner.step()  # warm-up (and, compiled, the graph for this size)
    t0 = clock()
    for _ in range(timed):
        runner.step()
    return (clock() - t0) / timed


OPTION_SETS = {
    "math": EngineOptions(attention="math"),
    "channels_last": EngineOptions(channels_last=True),
    "compile": EngineOptions(compile=True),
    "cuda_graphs": EngineOptions(cuda_graphs=True),
}


def option_figures(engine: DenoisingEngine, names: list[str], inflight: int = 1) -> dict:
    """Per-step latency with each option on, over plain, at ``inflight`` requests (1: the
    shapes of a batch-1 generation, so a compiled graph serves the full-run comparison too);
    then our loop with the fastest against diffusers' plain pipeline."""
    plain = step_latency(engine, inflight)
    out: dict = {"inflight": inflight, "plain_step_s": round(plain, 5)}
    cuda = engine.c.device.startswith("cuda")
    best, best_t = None, plain
    for name in names:
        opts = OPTION_SETS[name]
        if (opts.channels_last and engine.c.family != "unet") or (opts.cuda_graphs and not cuda):
            continue
        comps = dataclasses.replace(engine.c)
        apply_options(comps, opts)
        fast = DenoisingEngine(comps, engine.name, engine.total_steps, engine.levels,
                               engine.guidance)  # fmt: skip
        t0 = time.perf_counter()
        step_latency(fast, inflight, timed=1)  # compiles, when compiling
        first = time.perf_counter() - t0
        t = step_latency(fast, inflight)
        row = {"step_over_plain": round(t / plain, 3)}
        if opts.compile or opts.cuda_graphs:
            row["first_call_s"] = round(first, 1)
        out[opts.label()] = row
        if t < best_t:
            best, best_t = fast, t
            out["fastest"] = opts.label()
        if opts.channels_last:  # in place on the shared UNet: undo for the next option
            engine.c.unet.to(memory_format=torch.contiguous_format)
    if best is not None:
        v = vs_diffusers(engine, repeats=2, ours_engine=best)
        out["vs_diffusers_fastest"] = round(v["ratio"], 3)
        out["seconds_fastest"] = {"ours": round(v["ours_s"], 3),
                                  "diffusers": round(v["diffusers_s"], 3)}  # fmt: skip
    return out


def family_figures(name: str, args, profile_out: str | None = None) -> dict:  # noqa: ANN001
    dtype = args.dtype or DTYPES[name]
    t0 = time.perf_counter()
    engine = engine_for(name, args.scale, args.device, dtype, args.size)
    row: dict = {
        "model": f"{DESCRIPTION[name] if args.scale == 'full' else 'tiny ' + name + '-shaped'}, "
        f"random weights, {args.size} px, {engine.total_steps} steps",
        "dtype": dtype,
        "build_s": round(time.perf_counter() - t0, 1),
    }
    v = vs_diffusers(engine, repeats=args.repeats)
    row["vs_diffusers"] = round(v["ratio"], 3)
    row["seconds"] = {"ours": round(v["ours_s"], 3), "diffusers": round(v["diffusers_s"], 3)}
    row.update(exactness(engine))
    counts = [int(n) for n in args.inflight.split(",")]
    per_step = {n: step_latency(engine, n) for n in counts}
    row["step_s_by_inflight"] = {str(n): round(t, 5) for n, t in per_step.items()}
    cached = {n: step_latency(engine, n, cached=True) for n in counts}  # feature caching
    row["cached_step_s_by_inflight"] = {str(n): round(t, 5) for n, t in cached.items()}
    row["cached_over_full_by_inflight"] = {
        str(n): round(cached[n] / per_step[n], 3) for n in counts
    }
    if 1 in per_step and counts[-1] > 1:
        row[f"steps_per_s_{counts[-1]}_over_1"] = round(
            counts[-1] * per_step[1] / per_step[counts[-1]], 2
        )
    if name in args.options.split(","):
        row["options"] = option_figures(engine, args.option_set.split(","))
    if profile_out:
        profile = measure(engine, f"{name}-shaped-random", engine.levels, (1, 2, 4, 8), repeats=2)
        Path(profile_out).write_text(profile.model_dump_json(indent=2))
        row["profile"] = profile_out
    row["family_s"] = round(time.perf_counter() - t0, 1)
    del engine
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--scale", default="full", choices=["full", "tiny"])
    ap.add_argument(
        "--dtype",
        default=None,
        choices=["float16", "bfloat16", "float32"],
        help="one dtype for every family (default: fp16 UNets, bf16 transformers)",
    )
    ap.add_argument("--size", type=int, default=512, help="image pixels (square)")
    ap.add_argument("--families", default="sd15,sdxl,sd3,flux")
    ap.add_argument("--options", default="sd15", help="families whose speed options are timed")
    ap.add_argument(
        "--option-set",
        default="math,channels_last,compile,cuda_graphs",
        help=f"which options: any of {','.join(OPTION_SETS)}",
    )
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per side, best counts")
    ap.add_argument("--inflight", default="1,2,4,8,16,32", help="step-runner in-flight counts")
    ap.add_argument("--out-dir", default=None, help="also write each family's JSON here")
    ap.add_argument(
        "--profile-out",
        default=None,
        help="measure a promptserve-profile/1 of the first family (levels x "
        "batches 1..8) and write it here, for simulate --profile",
    )
    args = ap.parse_args()  # fmt: skip
    started = time.perf_counter()
    out_dir = Path(args.out_dir) if args.out_dir else None
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
    device = args.device
    figures: dict = {
        "bench": "gpu_engine",
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else device,
        "torch": torch.__version__,
        "families": {},
    }
    for name in args.families.split(","):
        if name not in SHAPES:
            raise SystemExit(f"family {name!r} is not one of {', '.join(SHAPES)}")
        row = family_figures(
            name, args, profile_out=args.profile_out if not figures["families"] else None
        )
        figures["families"][name] = row
        if out_dir:
            (out_dir / f"{name}.json").write_text(json.dumps(row, indent=1))
        print(f"# {name}: {json.dumps(row)}", flush=True)
    figures["vs_diffusers"] = {n: r["vs_diffusers"] for n, r in figures["families"].items()}
    figures["total_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
