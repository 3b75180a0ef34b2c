"""The engine on a GPU: an SD-1.5-shaped model (the real architecture, random weights: no
weights are on these machines) through promptserve's own denoising loop.

Checks resume-from-cache exactness and mixed-batch agreement on the device, step-level serving
(the error of a member inside a batch of others at different steps against its solo run, and
the per-step latency against the in-flight count, 1 to 32), and measures a
``promptserve-profile/1`` profile (levels 0..25 of 50 steps, batches 1..8) that ``simulate
--profile`` takes. Prints one JSON line; ``--out`` also writes the profile.

    python benchmarks/bench_gpu_engine.py --device cuda --dtype float16 --out sd15-h100.json
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from promptserve.engine.base import GenerationItem
from promptserve.engine.denoise import Components
from promptserve.engine.profiling import measure
from promptserve.engine.steprunner import StepRunner
from promptserve.engine.tiny import (
    ByteTokenizer,
    DenoisingEngine,
    ddim_scheduler,
    tiny_text_config,
    vae_config,
)

LEVELS = (0, 5, 10, 15, 20, 25)
STEPS = 50


def sd15_shaped(device: str, dtype: torch.dtype, size: int = 512) -> Components:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(sample_size=size // 8, cross_attention_dim=768)
        vae = AutoencoderKL(**vae_config(size, (128, 256, 512, 512), layers_per_block=2))
        clip_l = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12)
        text = CLIPTextModel(CLIPTextConfig(**tiny_text_config(**clip_l, num_attention_heads=12)))
    for m in (unet, vae, text):
        m.to(device=device, dtype=dtype).eval()
    return Components(
        unet, vae, text, ByteTokenizer(), ddim_scheduler(), 0.18215, (4, size // 8, size // 8),
        device=device, dtype=dtype, image_size=size,
    )  # fmt: skip


def step_figures(engine: DenoisingEngine, counts=(1, 2, 4, 8, 16, 32)) -> dict:
    """Mixed-step error and per-step latency of the step runner on this device."""
    solo = engine.generate([GenerationItem("a lighthouse at dusk", 0, seed=7)])[0]
    runner = StepRunner(engine.c, engine.total_steps, engine.levels, engine.guidance)
    runner.join([("a", GenerationItem("a lighthouse at dusk", 0, seed=7))])
    done: dict = {}
    for i in range(1, 5):  # others join at different steps, some from cached latents
        done.update(runner.step())
        level = engine.levels[i % len(engine.levels)]
        runner.join([(i, GenerationItem(f"prompt {i}", level, solo.latents.get(level), seed=i))])
    while "a" not in done:
        done.update(runner.step())
    got = done["a"]
    mixed = float(np.abs(got.final_latent - solo.final_latent).max())
    per_step = {}
    for n in counts:
        runner = StepRunner(engine.c, engine.total_steps, engine.levels, engine.guidance)
        runner.join([(j, GenerationItem(f"p{j}", 0, seed=j)) for j in range(n)])
        runner.step()  # warm-up
        if engine.c.device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(5):
            runner.step()
        if engine.c.device.startswith("cuda"):
            torch.cuda.synchronize()
        per_step[n] = (time.perf_counter() - t0) / 5
    return {
        "mixed_step_max_abs_diff": mixed,
        "step_s_by_inflight": {str(n): round(t, 5) for n, t in per_step.items()},
        "steps_per_s_32_over_1": round(32 * per_step[1] / per_step[32], 2)
        if 32 in per_step
        else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=None)
    ap.add_argument("--inflight", default="1,2,4,8,16,32", help="step-runner in-flight counts")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    t0 = time.perf_counter()
    engine = DenoisingEngine(
        sd15_shaped(args.device, dtype, args.size), "sd15-shaped", STEPS, LEVELS
    )
    built_s = time.perf_counter() - t0

    full = engine.generate([GenerationItem("a lighthouse at dusk", 0, seed=7)])[0]
    resumed = engine.generate(
        [GenerationItem("a lighthouse at dusk", 10, full.latents[10], seed=7)]
    )[0]
    resume_diff = float(np.abs(resumed.final_latent - full.final_latent).max())
    mixed_items = [
        GenerationItem("a red fox", 0, seed=1),
        GenerationItem("a lighthouse at dusk", 10, full.latents[10], seed=7),
        GenerationItem("a blue car", 0, seed=2),
    ]
    mixed = engine.generate(mixed_items)
    alone = [engine.generate([it])[0] for it in mixed_items]
    batch_diff = max(
        float(np.abs(a.final_latent - b.final_latent).max()) for a, b in zip(mixed, alone)
    )
    scale = float(np.abs(full.final_latent).max())

    profile = measure(engine, "sd15-shaped-random", LEVELS, (1, 2, 4, 8), repeats=args.repeats)
    lat = {
        k: dict(zip(profile.batch_sizes, row))
        for k, row in zip(profile.levels, profile.batch_latency_s)
    }
    out = {
        "bench": "gpu_engine",
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device,
        "dtype": args.dtype,
        "model": f"SD-1.5-shaped UNet/VAE/CLIP-L, random weights, {args.size}px, {STEPS} DDIM steps",
        "build_s": round(built_s, 2),
        "resume_max_abs_diff": resume_diff,
        "mixed_batch_max_abs_diff": batch_diff,
        "latent_max_abs": scale,
        "latency_s": {
            f"K{k}": {f"b{b}": round(t, 4) for b, t in row.items()} for k, row in lat.items()
        },
        "throughput_batch8_over_batch1_K0": round(8 * lat[0][1] / lat[0][8], 3),
        "latency_K25_over_K0_batch1": round(lat[25][1] / lat[0][1], 3),
        "step_level": step_figures(engine, tuple(int(n) for n in args.inflight.split(","))),
        "reference_assumption": {"throughput_batch8_over_batch1": 1.65, "latency_K25_over_K0": 0.5},
    }
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(profile.model_dump_json(indent=2))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
