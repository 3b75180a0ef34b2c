"""Quality scorers: how good is an image made from a cached latent, relative to full generation?

* ``fidelity``: closeness of the approximate image to the full generation of the same prompt
  (100 for identical pixels, falling with the root-mean-square difference). Needs no weights,
  so it runs on the tiny model; it measures faithfulness, not beauty.
* ``clip``: CLIP score (cosine of image and prompt embeddings, x 100) of a CLIP model loaded from
  a local folder (``--scorer clip:/path/to/clip``); relative quality is the approximate image's
  score over the full image's. No CLIP weights ship here.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from promptserve.errors import InputError


class Scorer(Protocol):
    name: str

    def relative(
        self, prompts: Sequence[str], approx_png: Sequence[bytes], full_png: Sequence[bytes]
    ) -> np.ndarray:
        """Percent of full quality for each approximate image."""
        ...


def _pixels(png: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float32) / 255.0


class FidelityScorer:
    name = "fidelity"

    def relative(self, prompts, approx_png, full_png) -> np.ndarray:
        out = []
        for a, f in zip(approx_png, full_png, strict=True):
            rmse = float(np.sqrt(np.mean((_pixels(a) - _pixels(f)) ** 2)))
            out.append(100.0 * (1.0 - min(rmse / 0.5, 1.0)))  # 0.5 RMSE (of a 0..1 range) scores 0
        return np.array(out)


class ClipScorer:
    def __init__(self, folder: str) -> None:
        from transformers import CLIPModel, CLIPProcessor

        try:
            self.model = CLIPModel.from_pretrained(folder).eval()
            self.processor = CLIPProcessor.from_pretrained(folder)
        except (OSError, ValueError) as exc:
            raise InputError(f"cannot load CLIP scorer weights from {folder!r}: {exc}") from None
        self.name = f"clip:{folder}"

    def score(self, prompts: Sequence[str], pngs: Sequence[bytes]) -> np.ndarray:
        import torch
        from PIL import Image

        images = [Image.open(io.BytesIO(p)).convert("RGB") for p in pngs]
        inputs = self.processor(
            text=list(prompts), images=images, return_tensors="pt", padding=True, truncation=True
        )
        with torch.no_grad():
            out = self.model(**inputs)
        img = torch.nn.functional.normalize(out.image_embeds, dim=-1)
        txt = torch.nn.functional.normalize(out.text_embeds, dim=-1)
        return (100.0 * (img * txt).sum(-1)).clamp(min=0).numpy()

    def relative(self, prompts, approx_png, full_png) -> np.ndarray:
        approx = self.score(prompts, approx_png)
        full = self.score(prompts, full_png)
        return 100.0 * approx / np.maximum(full, 1e-6)


def make_scorer(spec: str) -> Scorer:
    if spec == "fidelity":
        return FidelityScorer()
    if spec.startswith("clip:") and len(spec) > 5:
        return ClipScorer(spec[5:])
    raise InputError(f"scorer {spec!r} is not 'fidelity' or 'clip:FOLDER'")
