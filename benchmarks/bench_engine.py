"""The engine on this CPU. Prints one JSON line:

- ``resume``: a resumed run's time at each K over the full run's, beside (N - K) / N;
- ``images_per_s``: batch throughput at 1, 2, 4 and 8;
- ``vs_diffusers``: per family shape (tiny SD-1.x, SDXL, SD3, Flux, Z-Image, Qwen-Image: random weights, 64 px, 20
  steps, batch 1), diffusers' pipeline ``__call__`` time over ours on the same modules in the
  same run (> 1: ours is faster); the target is >= 0.95 on the CPU;
- ``options``: each speed option (``engine.options``) on the tiny model, its time over the
  plain engine's (< 1: faster), with torch.compile's one-off compile time;
- ``lora_step``: a step-level step with every member on its own LoRA adapter (random, over the
  attention projections; rank 4 and 16; 1, 2, 4 and 8 members) over the same step without
  adapters (target <= 1.15 at rank 16);
- ``feature_cache``: a cached step's time over a full step's at 1, 4 and 8 in flight
  (target <= 0.6 on the CPU): DeepCache's shallow branch on the UNet shapes (tiny SD-1.x and
  SDXL), the first block plus the kept residual on the transformer shapes (SD3, Flux); and
  ``*_deep``: the SD-1.x, SD3 and Flux shapes at their published depth with the tiny widths
  (the two-block toys cannot go below about half a step).

    python benchmarks/bench_engine.py [--skip-compile]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from promptserve.engine import GenerationItem, make_engine
from promptserve.engine.flow import DEFAULT_GUIDANCE
from promptserve.engine.options import EngineOptions, apply_options
from promptserve.engine.profiling import cached_ratio
from promptserve.engine.shapes import FAMILIES, build
from promptserve.engine.speed import best_of, edit_vs_diffusers, vs_diffusers
from promptserve.engine.tiny import DenoisingEngine, tiny_engine


def timed(fn, repeats: int = 3) -> float:
    return best_of(fn, repeats, time.perf_counter)


def family_engine(family: str, steps: int = 20) -> DenoisingEngine:
    from promptserve.engine.diffusers_backend import levels_for

    c = build(family)
    guidance = c.guidance_spec.default  # the family's pipeline's (Z-Image Turbo's: 0, no CFG)
    return DenoisingEngine(c, f"{family}-shaped", steps, levels_for(steps), guidance)


def option_times(skip_compile: bool) -> dict:
    item = [GenerationItem("a harbour at night", 0, seed=1)]
    plain = tiny_engine()
    base = timed(lambda: plain.generate(item), 5)
    out: dict = {"plain_s": round(base, 4)}
    choices = [EngineOptions(attention="math"), EngineOptions(channels_last=True)]
    if not skip_compile:
        choices.append(EngineOptions(compile=True))
    for opts in choices:
        engine = tiny_engine()
        apply_options(engine.c, opts)
        t0 = time.perf_counter()
        engine.generate(item)  # compiles, when compiling
        first = time.perf_counter() - t0
        t = timed(lambda engine=engine: engine.generate(item), 5)
        row = {"time_over_plain": round(t / base, 3)}
        if opts.compile:
            row["compile_s"] = round(first, 1)
        out[opts.label()] = row
    return out


def lora_step_times(pairs: int = 18) -> dict:
    """Per-sample adapters' cost in one step: every member its own adapter, all distinct. A
    plain and an adapted run advance in turns, one step each, and the median of the pairs'
    ratios is reported (the tiny model's step is milliseconds: the machine's noise is not)."""
    import statistics
    import tempfile
    from pathlib import Path

    import safetensors.torch

    from promptserve.engine.base import Look
    from promptserve.engine.lora import PREFIX, random_adapter

    out: dict = {}
    for rank in (4, 16):
        engine = tiny_engine()
        folder = Path(tempfile.mkdtemp(prefix="loras-"))
        for i in range(8):
            state = random_adapter(
                engine.c.unet, PREFIX["unet"], rank, i, ("to_q", "to_k", "to_v", "to_out.0")
            )
            safetensors.torch.save_file(state, folder / f"a{i}.safetensors")
        engine.load_adapters(folder)
        for n in (1, 2, 4, 8):
            runners = []
            for with_lora in (False, True):
                runner = engine.step_runner()
                looks = [Look(lora=((f"a{i}", 1.0),)) if with_lora else Look() for i in range(n)]
                runner.join(
                    [
                        (i, GenerationItem(f"p {i}", 0, seed=i, look=lk))
                        for i, lk in enumerate(looks)
                    ]
                )
                runner.step()  # warm
                runners.append(runner)
            ratios = []
            for _ in range(min(pairs, engine.total_steps - 2)):
                times = []
                for runner in runners:
                    t0 = time.perf_counter()
                    runner.step()
                    times.append(time.perf_counter() - t0)
                ratios.append(times[1] / times[0])
            out[f"rank{rank}_n{n}"] = round(statistics.median(ratios), 3)
    return out


def at_published_depth(family: str):  # noqa: ANN201 - a family's components
    """The tiny shape with the published architecture's depth at the tiny widths: SD 1.5's four
    UNet levels of two layers (three with cross-attention), SD3 medium's 24 MMDiT blocks, Flux's
    19 double- and 38 single-stream blocks. What a cached step skips is a share of the depth, so
    the two-block toys put a floor of about half a step under it that the real models lack."""
    import dataclasses

    c = build(family)
    if family == "tiny":
        from diffusers import UNet2DConditionModel

        from promptserve.engine.tiny import tiny_unet_config

        torch.manual_seed(0)
        unet = UNet2DConditionModel(
            **tiny_unet_config(
                layers_per_block=2, block_out_channels=(32, 64, 64, 64),
                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            )
        ).eval()  # fmt: skip
        return dataclasses.replace(c, unet=unet)
    depth = {"sd3": {"num_layers": 24}, "flux": {"num_layers": 19, "num_single_layers": 38}}
    model = type(c.transformer).from_config({**c.transformer.config, **depth[family]}).eval()
    return dataclasses.replace(c, transformer=model)


def feature_cache_times(pairs: int = 15) -> dict:
    """A cached step over a full one, timed in alternating pairs (median), per shape and count;
    ``_deep``: at the published depth (``at_published_depth``)."""
    import statistics

    from promptserve.engine.denoise import encode, time_ids
    from promptserve.engine.diffusers_backend import levels_for
    from promptserve.engine.featurecache import unet_forward

    out: dict = {}
    for family, c in (
        ("tiny", build("tiny")), ("sdxl", build("sdxl")), ("tiny_deep", at_published_depth("tiny"))
    ):  # fmt: skip
        for n in (1, 4, 8):
            x = torch.randn(2 * n, *c.latent_shape)
            t = torch.full((2 * n,), 500)
            context, extra = encode(c, [f"p {i}" for i in range(2 * n)])
            kwargs = None
            if extra:
                ids = time_ids([c.native] * 2 * n, "cpu", context.dtype)
                kwargs = {"text_embeds": extra["text_embeds"], "time_ids": ids}
            with torch.no_grad():
                _, deep = unet_forward(c.unet, x, t, context, kwargs)
                ratios = []
                for _ in range(pairs):
                    t0 = time.perf_counter()
                    unet_forward(c.unet, x, t, context, kwargs)
                    t1 = time.perf_counter()
                    unet_forward(c.unet, x, t, context, kwargs, deep=deep)
                    ratios.append((time.perf_counter() - t1) / (t1 - t0))
            out[f"{family}_n{n}"] = round(statistics.median(ratios), 3)
    for family, deep in (("sd3", False), ("flux", False), ("sd3", True), ("flux", True)):
        # block reuse: a step of the step runner's kernel
        if deep:
            comps, guidance = at_published_depth(family), DEFAULT_GUIDANCE.get(family, 7.5)
            engine = DenoisingEngine(comps, f"{family}-deep", 20, levels_for(20), guidance)
        else:
            engine = family_engine(family)
        kernel = engine.step_runner().kernel
        c = kernel.c
        for n in (1, 4, 8):
            rows = kernel.encode([f"p {i}" for i in range(n)])
            x = torch.cat([c.noise(i) for i in range(n)])
            steps = torch.full((n,), 3)
            name = f"{family}_deep" if deep else family
            out[f"{name}_n{n}"] = round(cached_ratio(kernel, x, steps, rows, pairs), 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-compile", action="store_true", help="leave torch.compile out")
    args = ap.parse_args()
    engine = make_engine("tiny")
    base = engine.generate([GenerationItem("a lighthouse at dusk", 0, seed=0)])[0]
    n = engine.total_steps
    full = timed(lambda: engine.generate([GenerationItem("a harbour at night", 0, seed=1)]))
    resume = {}
    for k in engine.levels[1:]:
        t = timed(
            lambda k=k: engine.generate([GenerationItem("a harbour at night", k, base.latents[k])])
        )
        resume[f"K{k}"] = {"time_over_full": round(t / full, 3), "ideal": round((n - k) / n, 3)}
    throughput = {}
    for b in (1, 2, 4, 8):
        items = [GenerationItem(f"prompt {i}", 0, seed=i) for i in range(b)]
        throughput[f"batch_{b}"] = round(
            b / timed(lambda items=items: engine.generate(items), 2), 2
        )
    versus = {
        family: vs_diffusers(family_engine(family), repeats=9)
        for family in (*FAMILIES, "zimage", "qwenimage")
    }
    # an instruction edit of two images (each read at about 1024x1024 by the VAE: slower)
    versus["qwenimage-edit"] = edit_vs_diffusers(family_engine("qwenimage-edit"), repeats=3)
    print(
        json.dumps(
            {
                "bench": "engine",
                "model": "tiny",
                "device": "cpu",
                "total_steps": n,
                "full_run_s": round(full, 3),
                "resume": resume,
                "images_per_s": throughput,
                "batch_8_over_1": round(throughput["batch_8"] / throughput["batch_1"], 2),
                "vs_diffusers": {f: round(v["ratio"], 3) for f, v in versus.items()},
                "vs_diffusers_s": {
                    f: {"ours": round(v["ours_s"], 4), "diffusers": round(v["diffusers_s"], 4)}
                    for f, v in versus.items()
                },
                "options": option_times(args.skip_compile),
                "lora_step": lora_step_times(),
                "feature_cache": feature_cache_times(),
            }
        )
    )


if __name__ == "__main__":
    main()
