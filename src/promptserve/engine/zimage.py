"""Z-Image (``ZImagePipeline``): a single-stream diffusion transformer over the latent's 2x2
patches and the prompt's tokens, a Qwen3 text encoder reading the prompt through its chat
template, flow matching on sigmas 1 .. 1/N (shifted), and few steps for the Turbo model.

It runs in the same loop as every family (``denoise.denoise``, the step runner): a per-sample
Euler step on the velocity, so members at different steps, sizes and start levels share one
transformer call; a request resumes at K from a cached latent as for Flux. What differs is its
conditioning, one variable-length token list per prompt (the transformer takes lists, so a
batch pads nothing), and its guidance: ``pos + s * (pos - neg)`` against the negative prompt
(the empty one by default), run only for the members whose scale is above 0 (the Turbo
model's is 0). Feature caching reuses its main layers (``featurecache.LayerCache``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from promptserve.engine.adapterbank import adapters_on
from promptserve.engine.base import Guidance
from promptserve.engine.featurecache import LayerCache
from promptserve.engine.flow import FlowComponents
from promptserve.engine.rows import Row
from promptserve.engine.tokensteps import TokenListComponents, TokenListStepper

DEFAULT_GUIDANCE = 0.0  # Z-Image-Turbo's: distilled, no guidance pass (the base model: ~5)
DEFAULT_STEPS = 8  # Z-Image-Turbo's eight function evaluations
# the pipeline's chat turn around a prompt (Qwen3's template, thinking enabled)
MESSAGE = "user"


@dataclass
class ZImageComponents(TokenListComponents):
    """A Z-Image model's parts (its tokenizer carries Qwen3's chat template)."""

    family = "zimage"
    feature_cache = True  # layer reuse on its main layers (``featurecache.LayerCache``)
    layer_cache: object = None  # the layer wrappers, once used

    decode = FlowComponents.decode

    @property
    def guidance_spec(self) -> Guidance:
        return Guidance("cfg", DEFAULT_GUIDANCE, 0.0, 20.0)

    def stepper(self, total_steps: int, guidance: float) -> ZImageStepper:
        return ZImageStepper(self, total_steps, guidance)

    def encode(self, prompts: Sequence[str]) -> list[torch.Tensor]:
        """Each prompt's token states, (L, D) with L its own length: the chat-templated text
        through the encoder's penultimate layer, the padding dropped (``_encode_prompt``)."""
        tok = self.tokenizer
        texts = [
            tok.apply_chat_template(  # type: ignore[attr-defined]
                [{"role": MESSAGE, "content": p}], tokenize=False, add_generation_prompt=True,
                enable_thinking=True,
            )
            for p in prompts
        ]  # fmt: skip
        ids = tok(  # type: ignore[operator]
            texts, padding="max_length", max_length=self.max_sequence_length, truncation=True,
            return_tensors="pt",
        )  # fmt: skip
        mask = ids.attention_mask.to(self.device).bool()
        with torch.no_grad():
            states = self.text_encoder(
                input_ids=ids.input_ids.to(self.device), attention_mask=mask,
                output_hidden_states=True,
            ).hidden_states[-2]  # fmt: skip
        return [states[i][mask[i]].to(self.dtype) for i in range(len(prompts))]


class ZImageStepper(TokenListStepper):
    """One Euler step per sample on the velocity (the transformer predicts its negative)."""

    def advance(
        self, latents: torch.Tensor, steps: torch.Tensor, rows: Sequence[Row]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The next latents of every row and the predicted clean ones (x - sigma * v)."""
        out, x0, _ = self._advance(latents, steps, rows, None)
        return out, x0

    def advance_features(self, latents, steps, rows, feature):  # noqa: ANN001, ANN201
        """``advance`` with layer reuse (``featurecache.LayerCache``): ``feature`` None, a full
        step that also returns the later layers' residual on each pass's image tokens (the
        members' own passes, then the negative passes of those it guides); given, a cached
        step on them."""
        if self.c.layer_cache is None:  # installed at first use: after the adapters' paths
            self.c.layer_cache = LayerCache(self.c.transformer.layers)
        return self._advance(latents, steps, rows, feature or (None, None))

    def member_features(self, feature, n: int) -> list:  # noqa: ANN001
        """Each member's (own pass, negative pass or None) residual of a full step."""
        residual, guided = feature
        neg_of = {j: n + i for i, j in enumerate(guided)}
        return [
            (residual[j : j + 1], residual[neg_of[j] : neg_of[j] + 1] if j in neg_of else None)
            for j in range(n)
        ]

    def batch_features(self, members: list):  # noqa: ANN201
        negs = [m[1] for m in members if m[1] is not None]
        guided = [j for j, m in enumerate(members) if m[1] is not None]
        return torch.cat([m[0] for m in members] + negs), guided

    def _advance(self, latents, steps, rows, feature):  # noqa: ANN001, ANN202
        sigmas, timesteps = self.schedule(tuple(latents.shape[2:]))
        t = (1000 - timesteps[steps]) / 1000  # the transformer's time runs from 0 (noise)
        n, scales = len(rows), [r.scale for r in rows]
        guided = [j for j, s in enumerate(scales) if s > 0]  # a negative pass each, after all
        x = list(latents.to(self.c.transformer.dtype).unsqueeze(2).unbind(0))
        x, t = x + [x[j] for j in guided], torch.cat([t, t[guided]])
        tokens = [r.text["tokens"] for r in rows]
        tokens = tokens + [rows[j].uncond["tokens"] for j in guided]  # type: ignore[index]
        loras = [r.lora for r in rows] + [rows[j].lora for j in guided]  # each pass's adapters
        cache, record = self.c.layer_cache, feature is not None and feature[0] is None
        if feature is not None:
            cache.image_tokens = (latents.shape[2] // 2) * (latents.shape[3] // 2)
            cache.mode, cache.residual = ("record", None) if record else ("replay", feature[0])
        try:
            with torch.no_grad(), adapters_on(self.c.lora_bank, loras, latents.device):
                out = self.c.transformer(x, t, tokens, return_dict=False)[0]
            residual = cache.residual if record else None
        finally:
            if feature is not None:
                cache.mode, cache.residual = None, None
        neg_of = {j: n + i for i, j in enumerate(guided)}
        preds = []
        for j in range(n):
            pos = out[j].float()
            neg = out[neg_of[j]].float() if j in neg_of else pos
            preds.append(pos + scales[j] * (pos - neg))
        v = -torch.stack(preds).squeeze(2)
        shape = (-1,) + (1,) * (latents.dim() - 1)
        sigma, sigma_next = sigmas[steps].view(shape), sigmas[steps + 1].view(shape)
        x0 = latents.float()
        kept = (residual, guided) if record else feature  # replayed: kept as given
        return (
            (x0 + (sigma_next - sigma) * v).to(latents.dtype),
            (x0 - sigma * v).to(latents.dtype),
            kept,
        )
