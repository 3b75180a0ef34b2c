"""A tiny Stable-Diffusion-shaped model with random weights, built from configs in well under a
second: the CPU default for demos and tests. Its images are noise (every surface that shows
one says so); its latents, timesteps and cache behaviour are those of the real thing.

Tokenizer: byte-level (UTF-8 bytes, 77 positions). The real CLIP BPE vocabulary is not on
these machines; the tiny model's random text encoder gives the tokens no meaning either way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import torch

from promptserve.engine.base import EngineCaps, GenerationItem, GenerationResult, Guidance
from promptserve.engine.denoise import Components, denoise
from promptserve.engine.edits import item_start, start_step
from promptserve.engine.sizes import checked, default_sizes

MAX_TOKENS = 77
BOS, EOS, PAD = 256, 257, 258


class ByteTokenizer:
    def __call__(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        ids = np.full((len(texts), MAX_TOKENS), PAD, dtype=np.int64)
        for row, text in enumerate(texts):
            tokens = [BOS, *list(text.encode("utf-8"))[: MAX_TOKENS - 2], EOS]
            ids[row, : len(tokens)] = tokens
        return {"input_ids": ids}


def tiny_unet_config(size: int = 64, **overrides: object) -> dict:
    """The tiny UNet's config; SDXL-shaped variants override the conditioning keys."""
    config = dict(
        sample_size=size // 8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    return {**config, **overrides}


def tiny_text_config(**overrides: object) -> dict:
    """The tiny CLIP text encoder's config over the byte-level vocabulary."""
    config = dict(
        vocab_size=260,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=PAD,
    )
    return {**config, **overrides}


def vae_config(size: int, block_out_channels: tuple[int, ...], **overrides: object) -> dict:
    """An SD-style VAE (4 latent channels, 8x down) of the given widths."""
    n = len(block_out_channels)
    config = dict(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=block_out_channels,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        sample_size=size,
    )
    return {**config, **overrides}


def ddim_scheduler():
    """Stable Diffusion's DDIM schedule."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,  # SD's own scheduler config (a pipeline rewrites 0 to 1 with a warning)
    )


def build_tiny(seed: int = 0, size: int = 64) -> Components:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if size % 8:
        raise ValueError(f"tiny model size must be a multiple of 8, got {size}")
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**tiny_unet_config(size))
    vae = AutoencoderKL(**vae_config(size, (16, 16, 32, 32), layers_per_block=1, norm_num_groups=8))
    text = CLIPTextModel(CLIPTextConfig(**tiny_text_config()))
    scheduler = ddim_scheduler()
    for module in (unet, vae, text):
        module.eval()
    return Components(
        unet, vae, text, ByteTokenizer(), scheduler, 0.18215, (4, size // 8, size // 8)
    )


def rows_of(on_step, idx: Sequence[int]):  # noqa: ANN001, ANN201
    """``on_step`` for a level's sub-batch: its previews' rows mapped back to the batch's."""
    if on_step is None:
        return None

    def mapped(step: int, previews: dict[int, bytes] | None = None) -> None:
        if previews:
            on_step(step, {idx[r]: png for r, png in previews.items()})
        else:
            on_step(step)

    return mapped


class DenoisingEngine:
    """Runs batches on a family's components (``denoise.Components``: the tiny model, SD 1.x/2.x
    and SDXL; ``flow.FlowComponents``: SD3 and Flux), from noise or a cached latent at K."""

    @property
    def caps(self) -> EngineCaps:
        """Intervals above 1: DeepCache (UNets), block reuse (SD3, Flux); none for Z-Image."""
        return EngineCaps(feature_cache=getattr(self.c, "feature_cache", True))

    def __init__(
        self,
        components: Components,
        name: str,
        total_steps: int,
        levels: Sequence[int],
        guidance: float = 7.5,
    ) -> None:
        self.c = components
        self.name = name
        self.total_steps = total_steps
        self.levels = tuple(levels)
        self.guidance = guidance
        self.placeholder = name == "tiny"
        self.speedup = 1.0
        family = "tiny" if name == "tiny" else components.sizes_family
        self.sizes = default_sizes(family, components.native, components.multiple)

    @property
    def native(self) -> tuple[int, int]:
        return self.c.native

    @property
    def guidance_spec(self) -> Guidance:
        return replace(self.c.guidance_spec, default=self.guidance)

    @property
    def edit_family(self) -> str:
        """How an edit's strength becomes its start (``strength.start_step``): the family's
        count, or an instruction-edit model's (``kontext``, ``qwen-edit``: every step)."""
        if getattr(self.c, "reads_images", False):
            return "qwen-edit"
        return "kontext" if getattr(self.c, "kontext", False) else self.c.family

    def step_runner(self, profile=None):  # noqa: ANN001, ANN201 - the profile is the modelled one's
        from promptserve.engine.steprunner import StepRunner

        return StepRunner(self.c, self.total_steps, self.levels, self.guidance, self.placeholder)

    def set_sizes(self, sizes: Sequence[tuple[int, int]]) -> None:
        """The sizes it serves (``serve --sizes``), each a multiple of what the model needs."""
        self.sizes = checked(tuple(sizes), self.c.multiple)

    @property
    def adapters(self) -> tuple[str, ...]:
        return self.c.adapter_names

    def load_adapters(
        self,
        folder,  # noqa: ANN001
        resident: int = 8,
        resident_bytes: int | None = None,
        private: bool = False,
    ) -> None:
        """Every adapter of ``folder`` (``serve --lora-dir``), checked against the denoiser
        and installed in it, ``resident`` of them (at most ``resident_bytes`` of rows) on the
        device at once (the rest in host memory, loaded when a call needs one; ``private``:
        none kept past the call that names it); a bad file is an error naming it, before
        anything is served."""
        from promptserve.engine.adapterbank import AdapterBank
        from promptserve.engine.lora import load_dir

        c = self.c
        if c.family == "unet":
            models = {"unet": c.unet, "text_encoder": c.text_encoder}
            if c.text_encoder_2 is not None:
                models["text_encoder_2"] = c.text_encoder_2
        else:
            models = {"transformer": c.transformer}
        sdxl = getattr(c, "text_encoder_2", None) is not None
        adapters = load_dir(folder, c.family, sdxl, models)
        for part, model in models.items():
            if part in ("unet", "transformer"):
                c.lora_bank = c.lora_bank or AdapterBank(resident, resident_bytes, private=private)
                c.lora_bank.install(model, part, adapters)
                resident = c.lora_bank.capacity  # the text encoders hold as many as it does
            elif any(part in a.parts for a in adapters):
                bank = c.text_lora.setdefault(part, AdapterBank(resident, private=private))
                bank.install(model, part, adapters)
        c.adapter_names = tuple(sorted({*c.adapter_names, *(a.name for a in adapters)}))

    def size_of(self, item: GenerationItem) -> tuple[int, int]:
        return item.look.size or self.c.native

    def generate(self, items: Sequence[GenerationItem], on_step=None) -> list[GenerationResult]:
        """Each level's items of each size run together: one latent shape per denoiser call."""
        results: list[GenerationResult | None] = [None] * len(items)
        keys = [self._key(it) for it in items]
        for key in sorted(set(keys)):
            idx = [i for i, k in enumerate(keys) if k == key]
            run = self._run_resumed if key[4] else self._run_edits if key[3] else self._run_level
            for i, res in zip(
                idx, run(key[0], [items[i] for i in idx], rows_of(on_step, idx)), strict=True
            ):
                results[i] = res
        return results  # type: ignore[return-value]

    def _key(self, it: GenerationItem) -> tuple:
        """What a batch shares: its start step, size and interval, whether it edits, and
        whether it goes on from where it was written down (``GenerationItem.resume``)."""
        resumed = it.resume is not None
        if it.edit is None:
            k = it.resume.step if it.resume is not None else it.k
            return k, self.size_of(it), it.interval, False, resumed
        k = start_step(self.total_steps, it.edit.strength, self.edit_family)
        k = it.resume.step if it.resume is not None else k
        if getattr(self.c, "reads_images", False):  # one call's members share image shapes
            images = tuple(image.shape[:2] for image in (it.edit.image, *it.edit.more))
            return k, self.size_of(it), it.interval, images, resumed
        return k, self.size_of(it), it.interval, True, resumed

    def _run_resumed(
        self, step: int, items: Sequence[GenerationItem], on_step
    ) -> list[GenerationResult]:
        """Members written down at ``step`` (``StepRunner.pause``), run on from there as their
        runs would have gone on: an edit blended as it was, a generation capturing the levels
        past ``step`` beside those it had."""
        to = {"dtype": self.c.dtype, "device": self.c.device}
        starts, inpaint = [], []
        for it in items:
            assert it.resume is not None
            if it.resume.dtype != str(self.c.dtype):
                raise ValueError(
                    f"a member paused in {it.resume.dtype} cannot resume in {self.c.dtype}"
                )
            starts.append(torch.as_tensor(it.resume.latent, **to)[None])
            inpaint.append(item_start(self.c, it, self.total_steps)[2] if it.edit else None)
        edits = items[0].edit is not None
        capture = [] if edits else [lv for lv in self.levels if lv > step]
        final, captured = denoise(
            self.c, torch.cat(starts), [it.prompt for it in items], step, self.total_steps,
            capture, self.guidance, on_step, [it.previews for it in items],
            [it.look for it in items], items[0].interval, inpaint if edits else (),
        )  # fmt: skip
        pngs = self.c.decode(final)
        return [
            GenerationResult(
                png=pngs[j],
                k=it.k,
                latents={}
                if edits
                else {
                    **it.resume.captured,  # type: ignore[union-attr]
                    **{lv: captured[lv][j].float().cpu().numpy() for lv in captured},
                },
                final_latent=final[j].float().cpu().numpy(),
                placeholder=self.placeholder,
            )  # fmt: skip
            for j, it in enumerate(items)
        ]

    def _run_edits(
        self, k: int, items: Sequence[GenerationItem], on_step
    ) -> list[GenerationResult]:
        """Edits that start at step ``k``: each from its own image (``engine.edits``), blended
        per step where it inpaints; none is captured for the cache."""
        starts, inpaint = [], []
        for it in items:
            assert it.edit is not None
            _, start, member = item_start(self.c, it, self.total_steps)
            starts.append(start)
            inpaint.append(member)
        final, _ = denoise(
            self.c, torch.cat(starts), [it.prompt for it in items], k, self.total_steps, [],
            self.guidance, on_step, [it.previews for it in items], [it.look for it in items],
            items[0].interval, inpaint,
        )  # fmt: skip
        pngs = self.c.decode(final)
        return [
            GenerationResult(
                png=pngs[j],
                k=k,
                final_latent=final[j].float().cpu().numpy(),
                placeholder=self.placeholder,
            )  # fmt: skip
            for j in range(len(items))
        ]

    def _run_level(
        self, k: int, items: Sequence[GenerationItem], on_step
    ) -> list[GenerationResult]:
        if k not in self.levels:
            raise ValueError(f"level K={k} is not one of {self.levels}")
        interval = items[0].interval
        starts = []
        for it in items:
            if k == 0:
                starts.append(self.c.noise(it.seed, it.look.size))
            elif it.start_latent is None:
                raise ValueError(f"level K={k} needs a start latent")
            else:
                starts.append(
                    torch.as_tensor(it.start_latent, dtype=self.c.dtype, device=self.c.device)[None]
                )
        capture = [lv for lv in self.levels if lv > k]
        final, captured = denoise(
            self.c,
            torch.cat(starts),
            [it.prompt for it in items],
            k,
            self.total_steps,
            capture,
            self.guidance,
            on_step,
            [it.previews for it in items],
            [it.look for it in items],
            interval,
        )
        pngs = self.c.decode(final)
        return [
            GenerationResult(
                png=pngs[j],
                k=k,
                latents={lv: captured[lv][j].float().cpu().numpy() for lv in captured},
                final_latent=final[j].float().cpu().numpy(),
                placeholder=self.placeholder,
            )
            for j in range(len(items))
        ]


def tiny_engine(
    total_steps: int = 20,
    levels: Sequence[int] = (0, 2, 4, 6, 8, 10),
    seed: int = 0,
    size: int = 64,
) -> DenoisingEngine:
    """The tiny model with 20 steps and six levels: the reference's 50 steps and K in
    {0, 5, ..., 25} scaled down, so a resumed run skips the same fractions."""
    return DenoisingEngine(build_tiny(seed, size), "tiny", total_steps, levels)
