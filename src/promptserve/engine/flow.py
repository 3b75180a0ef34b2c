"""Flow-matching diffusion transformers: the Stable Diffusion 3 and Flux families.

Approximate caching carries over unchanged: the latent after K steps of a neighbour's run is a
point on the same path from noise to image, so a request resumes from it at step K. The update
is Euler on the predicted velocity, ``x <- x + (sigma_next - sigma) * v``, written per sample so
one transformer call advances members that sit at different steps (the step runner) and a
batch that shares its start step alike; it is what ``FlowMatchEulerDiscreteScheduler.step``
computes for one shared sigma.

- SD3 / SD3.5: two CLIP encoders (penultimate hidden states side by side, zero-padded to the T5
  width, then the T5 tokens after them) and their pooled outputs; classifier-free guidance
  against the empty prompt.
- Flux: CLIP's pooled output and T5's tokens; no second pass (guidance-distilled: the guidance
  scale is an input of the transformer when its config has ``guidance_embeds``); latents are
  packed into 2x2 patches for the transformer and kept unpacked (C, H, W) everywhere else, so
  the cache stores the same shape for every family.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from promptserve.engine.adapterbank import AdapterBank, adapters_on, refresh_on_join
from promptserve.engine.base import Guidance, Look
from promptserve.engine.denoise import in_chunks, latent_shape, png_bytes
from promptserve.engine.featurecache import BlockCache, batch_rows, member_rows
from promptserve.engine.maskchannels import with_extras
from promptserve.engine.rows import Row, rows_of, scales_of

FAMILIES = ("sd3", "flux")
DEFAULT_GUIDANCE = {"sd3": 7.0, "flux": 3.5}  # the diffusers pipelines' defaults
MAX_SEQUENCE = {"sd3": 256, "flux": 512}


def _ids(tokenizer, prompts: Sequence[str], length: int, device: str) -> torch.Tensor:
    out = tokenizer(
        list(prompts), padding="max_length", max_length=length, truncation=True,
        return_tensors="pt",
    )  # fmt: skip
    return out.input_ids.to(device)


@dataclass
class FlowComponents:
    """A flow-matching transformer and what conditions it, as loaded or built from configs.

    ``text_encoders``/``tokenizers``: SD3 (CLIP-L, CLIP-G, T5 or None); Flux (CLIP-L, T5).
    """

    family: str
    transformer: torch.nn.Module
    vae: torch.nn.Module
    text_encoders: tuple
    tokenizers: tuple
    scheduler: object  # FlowMatchEulerDiscreteScheduler
    latent_shape: tuple[int, int, int]  # channels, height, width (unpacked)
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    max_sequence_length: int = 0  # T5 tokens; 0: the family's pipeline default
    lora_bank: AdapterBank | None = None  # the adapters installed in the transformer
    adapter_names: tuple[str, ...] = ()  # every adapter loaded (``engine.lora``)
    text_lora: dict = field(default_factory=dict)  # none: text-encoder LoRA is UNet-only
    block_cache: BlockCache | None = None  # feature caching's block wrappers, once used
    plain_extras: dict = field(default_factory=dict)  # per size (``maskchannels.plain_extra``)
    kontext: bool = False  # Flux Kontext: an edit's image conditions it as tokens (``edits``)

    @property
    def extra_channels(self) -> int:
        """Input channels beside the latent's (unpacked): Flux Fill's 80 (the masked image's
        latent and the mask as 8x8 patches); 0 otherwise."""
        if self.family != "flux":
            return 0
        return self.transformer.config.in_channels // 4 - self.latent_shape[0]

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"flow family {self.family!r} is not one of {FAMILIES}")
        self.max_sequence_length = self.max_sequence_length or MAX_SEQUENCE[self.family]

    # -- the family interface the engine and the step runner call ---------------------------
    def noise(self, seed: int, size: tuple[int, int] | None = None) -> torch.Tensor:
        gen = torch.Generator("cpu").manual_seed(seed)
        shape = latent_shape(self, size)
        return torch.randn((1, *shape), generator=gen, dtype=torch.float32).to(
            self.device, self.dtype
        )

    @property
    def native(self) -> tuple[int, int]:
        return self.latent_shape[2] * 8, self.latent_shape[1] * 8

    @property
    def multiple(self) -> int:
        """The VAE's 8 times the transformer's 2x2 patches."""
        return 16

    @property
    def sizes_family(self) -> str:
        return self.family

    def encode(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """The transformer's text inputs, batch first: token states and pooled projections."""
        with torch.no_grad():
            if self.family == "sd3":
                return self._encode_sd3(prompts)
            return self._encode_flux(prompts)

    def decode(self, latents: torch.Tensor) -> list[bytes]:
        config = self.vae.config

        def call(part: torch.Tensor) -> list[bytes]:
            with torch.no_grad():
                scaled = part / config.scaling_factor + (config.shift_factor or 0.0)
                return png_bytes(self.vae.decode(scaled.to(self.vae.dtype)).sample)

        return in_chunks(call, latents)

    @property
    def guidance_spec(self) -> Guidance:
        if self.family == "sd3":
            return Guidance("cfg", DEFAULT_GUIDANCE["sd3"])
        if self.transformer.config.guidance_embeds:  # Flux dev: the scale is a model input
            return Guidance("distilled", DEFAULT_GUIDANCE["flux"], 1.0, 10.0)
        return Guidance("none", DEFAULT_GUIDANCE["flux"])  # Flux schnell: no guidance input

    def stepper(self, total_steps: int, guidance: float) -> FlowStepper:
        return FlowStepper(self, total_steps, guidance)

    # -- text --------------------------------------------------------------------------------
    def _encode_sd3(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        clip_l, clip_g, t5 = self.text_encoders
        tok_l, tok_g, tok_t5 = self.tokenizers
        states, pooled = [], []
        for encoder, tokenizer in ((clip_l, tok_l), (clip_g, tok_g)):
            ids = _ids(tokenizer, prompts, tokenizer.model_max_length, self.device)
            out = encoder(ids, output_hidden_states=True)
            states.append(out.hidden_states[-2])
            pooled.append(out[0])
        width = self.transformer.config.joint_attention_dim
        if t5 is None:  # SD3 runs without T5 on zeros, as its pipeline does
            t5_states = torch.zeros(
                (len(prompts), self.max_sequence_length, width), device=self.device
            )
        else:
            t5_states = t5(_ids(tok_t5, prompts, self.max_sequence_length, self.device))[0]
        clip = torch.cat(states, dim=-1)
        clip = torch.nn.functional.pad(clip, (0, width - clip.shape[-1]))
        return {
            "encoder_hidden_states": torch.cat([clip, t5_states.to(clip.dtype)], dim=-2).to(
                self.dtype
            ),
            "pooled_projections": torch.cat(pooled, dim=-1).to(self.dtype),
        }

    def _encode_flux(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        clip, t5 = self.text_encoders
        tok_clip, tok_t5 = self.tokenizers
        ids = _ids(tok_clip, prompts, tok_clip.model_max_length, self.device)
        pooled = clip(ids, output_hidden_states=False).pooler_output
        states = t5(_ids(tok_t5, prompts, self.max_sequence_length, self.device))[0]
        return {
            "encoder_hidden_states": states.to(self.dtype),
            "pooled_projections": pooled.to(self.dtype),
        }


def sigma_schedule(
    c: FlowComponents, total_steps: int, shape: tuple[int, int] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The run's sigmas (``total_steps`` + 1, ending at 0) and timesteps, as the family's
    pipeline sets them: SD3 a fixed shift from the scheduler config; Flux sigmas from 1 to
    1/N, shifted by the image's token count when the scheduler shifts dynamically (so it is
    per latent ``shape``, (height, width); default the model's own)."""
    scheduler = c.scheduler
    kwargs: dict = {}
    h, w = shape or c.latent_shape[1:]
    tokens = (h // 2) * (w // 2)
    config = scheduler.config
    if c.family in ("flux", "zimage", "qwenimage"):  # their pipelines set the same sigmas
        kwargs["sigmas"] = np.linspace(1.0, 1 / total_steps, total_steps)
    if config.get("use_dynamic_shifting", False):
        base, top = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
        lo, hi = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
        kwargs["mu"] = lo + (hi - lo) * (tokens - base) / (top - base)
    scheduler.set_timesteps(None if "sigmas" in kwargs else total_steps, device=c.device, **kwargs)
    sigmas = scheduler.sigmas.to(c.device, torch.float32).clone()
    return sigmas, scheduler.timesteps.to(c.device).clone()


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, 4C): Flux's 2x2 patch tokens."""
    b, ch, h, w = latents.shape
    x = latents.view(b, ch, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), ch * 4)


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    b, _, dim = tokens.shape
    x = tokens.view(b, height // 2, width // 2, dim // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, dim // 4, height, width)


class FlowStepper:
    """One Euler step per sample, each at its own sigma, with the family's conditioning."""

    def __init__(self, c: FlowComponents, total_steps: int, guidance: float) -> None:
        self.c, self.guidance, self.total_steps = c, guidance, total_steps
        self._schedules: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self._img_ids: dict[tuple[int, int], torch.Tensor] = {}
        self.uncond = self._conditioning([""])[0] if c.family == "sd3" else None
        if c.family == "flux":
            self.txt_ids = torch.zeros(c.max_sequence_length, 3, device=c.device, dtype=c.dtype)

    def schedule(self, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The sigmas and timesteps of a latent shape (Flux shifts them by its token count)."""
        if shape not in self._schedules:
            self._schedules[shape] = sigma_schedule(self.c, self.total_steps, shape)
        return self._schedules[shape]

    def img_ids(self, h: int, w: int) -> torch.Tensor:
        """Flux's position ids of an h x w grid of 2x2 patches."""
        if (h, w) not in self._img_ids:
            grid = torch.zeros(h, w, 3)
            grid[..., 1] += torch.arange(h)[:, None]
            grid[..., 2] += torch.arange(w)[None, :]
            self._img_ids[h, w] = grid.reshape(h * w, 3).to(self.c.device, self.c.dtype)
        return self._img_ids[h, w]

    def encode(self, prompts: Sequence[str], looks: Sequence[Look] | None = None) -> list[Row]:
        """Each prompt's conditioning, and (SD3) its negative prompt's; Flux has no negative
        pass (the engine refuses one before it gets here). They join: a private bank loads
        their adapters."""
        refresh_on_join([self.c.lora_bank], looks)
        rows = rows_of(
            self._conditioning, prompts, looks, self.guidance, self.uncond, self.c.native
        )
        return with_extras(self.c, rows)  # Flux Fill: the plain mask channels

    def _conditioning(
        self, prompts: Sequence[str], loras: Sequence[tuple] | None = None
    ) -> list[dict[str, torch.Tensor]]:
        """(No text-encoder adapters for the transformer families: refused at load.)"""
        batch = self.c.encode(prompts)
        return [{name: v[j : j + 1] for name, v in batch.items()} for j in range(len(prompts))]

    def advance(
        self, latents: torch.Tensor, steps: torch.Tensor, rows: Sequence[Row]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The next latents of every row (row j at step ``steps[j]``) and the predicted clean
        latents (x0 = x - sigma * v: what a preview shows). The rows share one latent shape."""
        sigmas, timesteps = self.schedule(tuple(latents.shape[2:]))
        t = timesteps[steps]
        loras = [r.lora for r in rows] * (2 if self.c.family == "sd3" else 1)
        with torch.no_grad(), adapters_on(self.c.lora_bank, loras, latents.device):
            v = self._velocity(latents, t, rows)
        shape = (-1,) + (1,) * (latents.dim() - 1)
        sigma = sigmas[steps].view(shape)
        sigma_next = sigmas[steps + 1].view(shape)
        x = latents.float()
        out = (x + (sigma_next - sigma) * v.float()).to(v.dtype)
        return out, (x - sigma * v.float()).to(v.dtype)

    def advance_features(self, latents, steps, rows, feature):  # noqa: ANN001, ANN201
        """``advance`` with block caching (``engine.featurecache.BlockCache``): ``feature``
        None, a full step that also returns the later blocks' residual; given, a cached step
        that skips them and adds it."""
        if self.c.block_cache is None:  # installed at first use: after the adapters' paths
            self.c.block_cache = BlockCache(self.c.transformer)
        cache = self.c.block_cache
        cache.mode, cache.residual = ("record", None) if feature is None else ("replay", feature)
        try:
            out, x0 = self.advance(latents, steps, rows)
            return out, x0, cache.residual
        finally:
            cache.mode, cache.residual = None, None

    def member_features(self, feature, n: int) -> list:  # noqa: ANN001
        """Each member's rows of the residuals (both of its passes for SD3's guidance)."""
        doubled = self.c.family == "sd3"
        enc, hid = feature
        return list(zip(member_rows(enc, n, doubled), member_rows(hid, n, doubled), strict=True))

    def batch_features(self, members: list):  # noqa: ANN201
        doubled = self.c.family == "sd3"
        return (
            batch_rows([m[0] for m in members], doubled),
            batch_rows([m[1] for m in members], doubled),
        )

    def _velocity(self, x: torch.Tensor, t: torch.Tensor, rows: Sequence[Row]) -> torch.Tensor:
        model = self.c.transformer
        if self.c.family == "sd3":
            both = {
                name: torch.cat([r.uncond[name] for r in rows] + [r.text[name] for r in rows])
                for name in rows[0].text
            }
            v = model(
                hidden_states=torch.cat([x, x]), timestep=torch.cat([t, t]),
                return_dict=False, **both,
            )[0]  # fmt: skip
            uncond, text = v.chunk(2)
            return uncond + scales_of(rows, uncond) * (text - uncond)
        cond = {name: torch.cat([r.text[name] for r in rows]) for name in rows[0].text}
        guidance = None
        if model.config.guidance_embeds:
            guidance = torch.tensor([r.scale for r in rows], device=x.device, dtype=torch.float32)
        hidden = x  # Flux Fill: each member's mask channels beside its latent
        if rows[0].extra is not None:
            hidden = torch.cat([x, torch.cat([r.extra for r in rows])], dim=1)
        tokens, ids = pack(hidden), self.img_ids(x.shape[2] // 2, x.shape[3] // 2)
        n = tokens.shape[1]
        if rows[0].context is not None:  # Kontext: each member's image tokens after its own
            tokens = torch.cat([tokens, torch.cat([r.context[0] for r in rows])], dim=1)
            ids = torch.cat([ids, rows[0].context[1]])
        v = model(
            hidden_states=tokens, timestep=t.to(x.dtype) / 1000, guidance=guidance,
            txt_ids=self.txt_ids, img_ids=ids, return_dict=False, **cond,
        )[0]  # fmt: skip
        return unpack(v[:, :n], x.shape[2], x.shape[3])
