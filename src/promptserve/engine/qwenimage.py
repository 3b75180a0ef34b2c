"""Qwen-Image (``QwenImagePipeline``): an MMDiT over 2x2 patches of a 16-channel latent and the
prompt's tokens from a Qwen2.5-VL text encoder (its last layer, read through the pipeline's
system template, whose first 34 tokens are dropped), flow matching on sigmas 1 .. 1/N shifted by
the image's token count, and "true" classifier-free guidance: a second pass on the negative
prompt, combined as ``neg + s (pos - neg)`` and rescaled per token to the positive pass's norm.
As its pipeline, a member runs that pass only where it has a negative prompt and a scale
above 1.

It runs in the same loop as every family: per-sample Euler on the velocity, members at their
own steps in one call per size (their prompts padded to the longest, with the attention mask),
a request resumable at K from a cached latent. Its latents are kept unpacked, (16, H/8, W/8),
as Flux's; its VAE is a video one (a frame axis of 1, per-channel mean and scale).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from promptserve.engine.adapterbank import adapters_on
from promptserve.engine.base import Guidance
from promptserve.engine.denoise import in_chunks, png_bytes
from promptserve.engine.featurecache import BlockCache, batch_rows, member_rows
from promptserve.engine.flow import pack, unpack
from promptserve.engine.rows import Row
from promptserve.engine.tokensteps import TokenListComponents, TokenListStepper

DEFAULT_GUIDANCE = 4.0  # the pipeline's true_cfg_scale (applied with a negative prompt)
DEFAULT_STEPS = 50
# the pipeline's prompt template and the tokens of its system part, dropped from the states
TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, "
    "quantity, text, spatial relationships of the objects and background:<|im_end|>\n"
    "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
DROP = 34
MAX_TOKENS = 1024


@dataclass
class QwenImageComponents(TokenListComponents):
    """A Qwen-Image model's parts (its VAE a video one, read one frame at a time)."""

    family = "qwenimage"
    feature_cache = True  # block reuse on its double-stream blocks (``featurecache``)
    block_cache: object = None  # feature caching's block wrappers, once used

    @property
    def guidance_spec(self) -> Guidance:
        return Guidance("cfg", DEFAULT_GUIDANCE, 1.0, 20.0)

    def stepper(self, total_steps: int, guidance: float) -> QwenImageStepper:
        return QwenImageStepper(self, total_steps, guidance)

    def encode(self, prompts: Sequence[str]) -> list[torch.Tensor]:
        """Each prompt's token states, (L, D): the template's system part dropped."""
        ids = self.tokenizer(  # type: ignore[operator]
            [TEMPLATE.format(p) for p in prompts], max_length=MAX_TOKENS + DROP, padding=True,
            truncation=True, return_tensors="pt",
        )  # fmt: skip
        mask = ids.attention_mask.to(self.device)
        with torch.no_grad():
            states = self.text_encoder(
                input_ids=ids.input_ids.to(self.device), attention_mask=mask,
                output_hidden_states=True,
            ).hidden_states[-1]  # fmt: skip
        keep = self.max_sequence_length
        return [states[i][mask[i].bool()][DROP:][:keep].to(self.dtype) for i in range(len(prompts))]

    def _scale(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE's per-channel mean and scale, shaped for its (B, C, frames, H, W) latents."""
        config, shape = self.vae.config, (1, self.vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(config.latents_mean).view(shape).to(like.device, like.dtype)
        return mean, torch.tensor(config.latents_std).view(shape).to(like.device, like.dtype)

    def decode(self, latents: torch.Tensor) -> list[bytes]:
        def call(part: torch.Tensor) -> list[bytes]:
            mean, std = self._scale(part)
            with torch.no_grad():
                frames = self.vae.decode((part[:, :, None] * std + mean).to(self.vae.dtype))
            return png_bytes(frames.sample[:, :, 0])

        return in_chunks(call, latents)

    def image_latent(self, pixels: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
        """An image (1, 3, H, W) in [-1, 1] as a clean latent (1, 16, H/8, W/8): one frame
        through the video VAE (a posterior sample from ``gen``; None: its mean), normalised
        per channel, as its Img2Img and Inpaint pipelines encode it."""
        with torch.no_grad():
            posterior = self.vae.encode(pixels[:, :, None]).latent_dist
            z = posterior.sample(gen) if gen is not None else posterior.mode()
        mean, std = self._scale(z)
        return ((z - mean) / std)[:, :, 0]


class QwenImageStepper(TokenListStepper):
    """Per-sample Euler on its velocity; true CFG for the members it guides (a call of its own)."""

    def _velocity(self, x: torch.Tensor, t: torch.Tensor, tokens: list, rows: list, cached=None):  # noqa: ANN001, ANN202
        """The transformer's prediction on packed latents, the prompts padded to the longest
        (``rows``: each member's adapters and, an instruction edit, its images' tokens); with
        feature caching (``cached``: ``("record", None)`` or ``("replay", residual)``)
        also the later blocks' residual (``featurecache.BlockCache``)."""
        cache = self.c.block_cache
        if cached is None or cache is None:
            return self._call(x, t, tokens, rows), None
        cache.mode, cache.residual = cached
        try:
            out = self._call(x, t, tokens, rows)
            # the image stream's residual only: the text stream is read by no layer after the
            # blocks, and its length is the call's longest prompt, not the member's
            return out, (None, cache.residual[1]) if cache.residual is not None else None
        finally:
            cache.mode, cache.residual = None, None

    def _call(self, x: torch.Tensor, t: torch.Tensor, tokens: list, rows: list):  # noqa: ANN202
        longest = max(len(s) for s in tokens)
        states = torch.stack(
            [torch.nn.functional.pad(s, (0, 0, 0, longest - len(s))) for s in tokens]
        )
        mask = None  # none where no prompt is padded (the pipeline's too: a faster attention)
        if any(len(s) < longest for s in tokens):
            mask = torch.stack([torch.arange(longest, device=x.device) < len(s) for s in tokens])
            mask = mask.long()
        h, w = x.shape[2] // 2, x.shape[3] // 2
        model = self.c.transformer
        guidance = None
        if model.config.guidance_embeds:
            guidance = torch.full((len(tokens),), self.guidance, device=x.device)
        hidden, shapes = pack(x), [(1, h, w)]
        n = hidden.shape[1]
        if rows[0].context is not None:  # Qwen-Image-Edit: each member's images' tokens after
            hidden = torch.cat([hidden, torch.cat([r.context[0] for r in rows])], dim=1)
            shapes += rows[0].context[1]  # a call's members share their shapes (``calls``)
        loras = [r.lora for r in rows]
        with torch.no_grad(), adapters_on(self.c.lora_bank, loras, x.device):
            return model(
                hidden_states=hidden, timestep=t.to(x.dtype) / 1000, guidance=guidance,
                encoder_hidden_states_mask=mask, encoder_hidden_states=states,
                img_shapes=[shapes] * len(tokens), return_dict=False,
            )[0][:, :n]  # fmt: skip

    def advance(
        self, latents: torch.Tensor, steps: torch.Tensor, rows: Sequence[Row]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out, x0, _ = self._advance(latents, steps, rows, None)
        return out, x0

    def advance_features(self, latents, steps, rows, feature):  # noqa: ANN001, ANN201
        """``advance`` with block caching: ``feature`` None, a full step that also returns the
        later blocks' residual of each pass (the positive one, and the negative one of the
        members it guides); given, a cached step on them."""
        if self.c.block_cache is None:  # installed at first use: after the adapters' paths
            self.c.block_cache = BlockCache(self.c.transformer)
        return self._advance(latents, steps, rows, feature or (None, None))

    def member_features(self, feature, n: int) -> list:  # noqa: ANN001
        """Each member's (positive, negative or None) residuals of a full step."""
        pos, neg, guided = feature
        pos_rows = list(zip(*(member_rows(part, n, False) for part in pos), strict=True))
        neg_of = {j: i for i, j in enumerate(guided)}
        neg_rows = (
            list(zip(*(member_rows(part, len(guided), False) for part in neg))) if neg else []
        )
        return [(pos_rows[j], neg_rows[neg_of[j]] if j in neg_of else None) for j in range(n)]

    def batch_features(self, members: list):  # noqa: ANN201
        pos = tuple(batch_rows([m[0][k] for m in members], False) for k in range(2))
        negs = [m[1] for m in members if m[1] is not None]
        neg = tuple(batch_rows([m[k] for m in negs], False) for k in range(2)) if negs else None
        return pos, neg

    def _advance(self, latents, steps, rows, feature):  # noqa: ANN001, ANN202
        sigmas, timesteps = self.schedule(tuple(latents.shape[2:]))
        t = timesteps[steps]
        record = feature is not None and feature[0] is None  # a full step that keeps residuals
        cached_pos = (
            None if feature is None else ("record", None) if record else ("replay", feature[0])
        )
        v, pos_res = self._velocity(latents, t, [r.text["tokens"] for r in rows], rows, cached_pos)
        # true CFG for the members with a negative prompt and a scale above 1, as the pipeline
        guided = [j for j, r in enumerate(rows) if r.scale > 1 and r.uncond is not self.uncond]
        neg_res = None
        if guided:
            negs = [rows[j].uncond["tokens"] for j in guided]  # type: ignore[index]
            cached_neg = (
                None if feature is None else ("record", None) if record else ("replay", feature[1])
            )
            neg, neg_res = self._velocity(
                latents[guided], t[guided], negs, [rows[j] for j in guided], cached_neg
            )
            pos = v[guided]
            scale = torch.tensor([rows[j].scale for j in guided], device=v.device).view(-1, 1, 1)
            comb = neg + scale.to(v.dtype) * (pos - neg)
            rescale = torch.norm(pos, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True)
            v = v.clone()
            v[guided] = comb * rescale
        v = unpack(v, latents.shape[2], latents.shape[3])
        shape = (-1,) + (1,) * (latents.dim() - 1)
        sigma, sigma_next = sigmas[steps].view(shape), sigmas[steps + 1].view(shape)
        x = latents.float()
        out = (x + (sigma_next - sigma) * v.float()).to(latents.dtype)
        residuals = (pos_res, neg_res, guided) if record else feature  # replayed: kept as given
        return out, (x - sigma * v.float()).to(latents.dtype), residuals
