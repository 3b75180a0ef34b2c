"""No compute: waits the profile's batch latency and returns a placeholder image. For load tests
of the server and the cluster without a GPU. Runs still leave small stand-in latents at every
cache level they pass, so the cache fills, hits and resumes as with a real engine (lookups,
resume levels, eviction, the shared store on Ray); only the denoising is a sleep."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np

from promptserve.engine.base import (
    UNET_GUIDANCE,
    EngineCaps,
    GenerationItem,
    GenerationResult,
    Paused,
)
from promptserve.engine.sizes import checked, default_sizes, shape_index, shape_table
from promptserve.profile import Profile

SDXL_MULTIPLE = 32  # the VAE's 8, halved by SDXL's two UNet down samplings

STAND_IN_SHAPE = (4, 8, 8)  # 1 KiB per level in float32: the keys and levels are real


def stand_ins(item: GenerationItem, levels: Sequence[int]) -> dict[int, np.ndarray]:
    """The latents a run from ``item.k`` passes: one small array per level above it, drawn
    from the prompt's seed so that a resumed run's files differ from its neighbour's."""
    rng = np.random.default_rng(item.seed)
    return {
        lv: rng.standard_normal(STAND_IN_SHAPE).astype(np.float32) for lv in levels if lv > item.k
    }


# A 1x1 grey PNG: the placeholder every modelled result carries.
PLACEHOLDER_PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d49484452000000010000000108000000003a7e9b55"
    "0000000a4944415478da63680000008200815ba6b3a30000000049454e44ae426082"
)


class ModeledEngine:
    # it only sleeps (one instance may serve every worker at once); intervals above 1 sleep
    # their steps' share (``mix_s``)
    caps = EngineCaps(feature_cache=True, stateless=True, modelled=True)
    guidance_spec = UNET_GUIDANCE  # what it stands for: the SDXL reference's guidance
    edit_family = "unet"  # and its img2img pipeline's count of an edit's steps
    adapters: tuple[str, ...] = ()  # names only (``load_adapters``)

    def __init__(
        self, profile: Profile, sleep: Callable[[float], None] = time.sleep, speedup: float = 1.0
    ) -> None:
        from promptserve.cachedstep import REFERENCE_CACHED_STEP_SHARE

        # what it stands for: SDXL, whose DeepCache cached step is the reference's
        self.profile = profile if profile.cached_step_share else replace(
            profile, cached_step_share=REFERENCE_CACHED_STEP_SHARE
        )  # fmt: skip
        self.name = f"modeled:{profile.name}"
        self.total_steps = profile.total_steps
        self.levels = profile.levels
        self._sleep = sleep
        self.speedup = speedup  # > 1 runs faster than the profile (load tests on a short clock)
        self.native = (1024, 1024)  # what it stands for: the SDXL reference, and its sizes
        self.sizes = default_sizes("sdxl", self.native, SDXL_MULTIPLE)

    def set_sizes(self, sizes: Sequence[tuple[int, int]]) -> None:
        self.sizes = checked(tuple(sizes), SDXL_MULTIPLE)

    def load_adapters(self, folder, resident: int = 8, resident_bytes=None, private=False) -> None:  # noqa: ANN001
        """Names only: it computes nothing, so an adapter changes nothing but the cache's
        namespace (load tests of adapter traffic)."""
        from promptserve.engine.lora import adapter_names

        self.adapters = adapter_names(folder)

    def shape_of(self, item: GenerationItem) -> int:
        """The item's size as the policy times it (``engine.sizes.shape_table``)."""
        return shape_index(shape_table(self.native, self.sizes), item.look.size)

    def step_runner(self, profile: Profile) -> ModeledStepRunner:
        from promptserve.profile import for_sizes
        from promptserve.steptime import step_profile

        sized = for_sizes(profile, shape_table(self.native, self.sizes))
        return ModeledStepRunner(step_profile(sized), self.speedup, shape_of=self.shape_of)

    def generate(self, items: Sequence[GenerationItem], on_step=None) -> list[GenerationResult]:
        from promptserve.profile import for_sizes

        sized = for_sizes(self.profile, shape_table(self.native, self.sizes))
        for k in sorted({it.k for it in items}):
            n = sum(1 for it in items if it.k == k)
            shape = self.shape_of(next(it for it in items if it.k == k))  # one size a batch
            batch = min(n, self.profile.max_batch)
            latency = sized.sized_latency(k, batch, shape) / self.speedup
            if on_step is None:
                self._sleep(latency)
                continue
            steps = self.total_steps - k
            rows = [i for i, it in enumerate(items) if it.k == k]
            for step in range(k + 1, self.total_steps + 1):  # step by step, so progress shows
                self._sleep(latency / steps)
                previews = {i: PLACEHOLDER_PNG for i in rows if step in items[i].previews}
                if previews:
                    on_step(step, previews)
                else:
                    on_step(step)
        return [
            GenerationResult(PLACEHOLDER_PNG, it.k, stand_ins(it, self.levels), placeholder=True)
            for it in items
        ]


class ModeledStepRunner:
    """The step runner's interface without compute: each step waits the step profile's time
    for the members in flight. For load tests of step-level serving without a GPU."""

    def __init__(self, step_profile, speedup: float = 1.0, sleep=time.sleep, shape_of=None) -> None:  # noqa: ANN001
        self.profile, self.speedup, self._sleep = step_profile, speedup, sleep
        self._shape_of = shape_of or (lambda item: 0)  # an item's size index (``mix_s``)
        self.total_steps = step_profile.total_steps
        self._steps: dict[object, list] = {}  # key -> [steps done, item]
        self.previews: dict = {}  # key -> preview of the last step (placeholders here)

    def __len__(self) -> int:
        return len(self._steps)

    def steps_left(self) -> dict:
        return {key: self.total_steps - done for key, (done, _) in self._steps.items()}

    def join(self, members) -> None:  # noqa: ANN001
        for key, item in members:
            at = item.k if item.resume is None else item.resume.step
            self._steps[key] = [at, item]
        if members:
            self._sleep(len(members) * self.profile.join_s / self.speedup)

    def cancel(self, key) -> bool:  # noqa: ANN001
        return self._steps.pop(key, None) is not None

    def snapshot(self, key) -> Paused | None:  # noqa: ANN001
        """Its step written down (no latent: nothing is computed here)."""
        entry = self._steps.get(key)
        return None if entry is None else Paused(entry[0], np.zeros(0, np.float32), "modelled")

    def pause(self, key) -> Paused | None:  # noqa: ANN001
        state = self.snapshot(key)
        self._steps.pop(key, None)
        return state

    def reinterval(self, key, interval: int) -> bool:  # noqa: ANN001
        entry = self._steps.get(key)
        if entry is None:
            return False
        entry[1] = replace(entry[1], interval=interval)
        return True

    def step(self) -> list:
        if not self._steps:
            return []
        from promptserve.steptime import kind

        counts: dict[int, int] = {}
        for _, item in self._steps.values():
            key = kind(self._shape_of(item), item.interval)
            counts[key] = counts.get(key, 0) + 1
        self._sleep(self.profile.mix_s(counts) / self.speedup)
        done = []
        self.previews = {}
        for key, entry in list(self._steps.items()):
            entry[0] += 1
            if entry[0] in entry[1].previews:
                self.previews[key] = PLACEHOLDER_PNG
            if entry[0] >= self.total_steps:
                del self._steps[key]
                item = entry[1]
                latents = stand_ins(item, self.profile.levels)
                done.append(
                    (key, GenerationResult(PLACEHOLDER_PNG, item.k, latents, placeholder=True))
                )
        if done:
            self._sleep(len(done) * self.profile.leave_s / self.speedup)
        return done
