"""Real weights through diffusers, run by promptserve's own resumable loop: Stable Diffusion
1.x/2.x and SDXL (UNet, DDIM) and the flow-matching transformers, SD3/SD3.5 and Flux.

The family comes from the folder's ``model_index.json`` (its pipeline class). The loader keeps
the pipeline's modules and scheduler config and drops the pipeline: a UNet pipeline runs with a
DDIM scheduler built from its config; an SDXL pipeline brings a second text encoder, whose pooled
embeddings and size time ids the UNet expects. A flow family keeps its flow-matching scheduler.

Levels on a shorter schedule: the reference levels skip K of 50 steps, K in {0, 5, ..., 25}.
A model served with N steps (Flux and SD3 default to 28) gets K' = floor(K * N / 50), the
largest level skipping no larger a fraction of the schedule, so each reference similarity
threshold lands on its own level: 28 steps give (0, 2, 5, 8, 11, 14).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from promptserve.engine.denoise import Components
from promptserve.engine.euler import EulerStepper, takes_euler
from promptserve.engine.flow import DEFAULT_GUIDANCE, FlowComponents
from promptserve.engine.qwenedit import QwenEditComponents
from promptserve.engine.qwenimage import QwenImageComponents
from promptserve.engine.tiny import DenoisingEngine
from promptserve.engine.zimage import DEFAULT_STEPS as ZIMAGE_STEPS
from promptserve.engine.zimage import ZImageComponents
from promptserve.errors import InputError

# pipeline class in model_index.json -> the family that serves it
PIPELINE_FAMILIES = {
    "StableDiffusionPipeline": "unet",
    "StableDiffusionXLPipeline": "unet",
    "StableDiffusion3Pipeline": "sd3",
    "FluxPipeline": "flux",
    # dedicated inpainting models: their mask channels beside the latent (``edits``)
    "StableDiffusionInpaintPipeline": "unet",
    "StableDiffusionXLInpaintPipeline": "unet",
    "FluxFillPipeline": "flux",
    "FluxKontextPipeline": "flux",  # instruction edits: the image as tokens (``edits``)
    "ZImagePipeline": "zimage",
    "QwenImagePipeline": "qwenimage",
    "QwenImageEditPlusPipeline": "qwenimage",  # instruction edits of 1-3 images (``qwenedit``)
}
DEFAULT_STEPS = {"unet": 50, "sd3": 28, "flux": 28, "zimage": ZIMAGE_STEPS, "qwenimage": 50}
REFERENCE_LEVELS = (0, 5, 10, 15, 20, 25)  # K of 50


def levels_for(total_steps: int) -> tuple[int, ...]:
    """The reference levels on an N-step schedule: K' = floor(K * N / 50)."""
    return tuple(sorted({k * total_steps // 50 for k in REFERENCE_LEVELS}))


def family_of(model: str) -> str:
    """The family serving a local diffusers folder, from its ``model_index.json``."""
    return PIPELINE_FAMILIES[pipeline_class(model)]


def pipeline_class(model: str) -> str:
    """A local diffusers folder's pipeline class, one promptserve serves (else refused, naming
    those it does)."""
    import json

    path = Path(model).expanduser()
    if path.is_file():  # a .safetensors / .ckpt checkpoint, as UIs share them
        raise InputError(
            f"model {model!r} is a single-file checkpoint; promptserve serves diffusers folders "
            "(a model_index.json beside the parts): convert it once with diffusers, e.g. "
            "StableDiffusionXLPipeline.from_single_file(FILE).save_pretrained(DIR), then --model DIR"
        )
    index = path / "model_index.json"
    try:
        name = json.loads(index.read_text()).get("_class_name")
    except (OSError, ValueError) as exc:
        raise InputError(f"{index}: not a diffusers model index ({exc})") from None
    if name not in PIPELINE_FAMILIES:
        raise InputError(
            f"model {model!r} is a {name}, which promptserve does not serve "
            f"(served: {', '.join(PIPELINE_FAMILIES)})"
        )
    return name


class _Tokenizer:
    def __init__(self, tokenizer) -> None:
        self._tok = tokenizer

    def __call__(self, texts: Sequence[str]):
        return self._tok(
            list(texts),
            padding="max_length",
            max_length=self._tok.model_max_length,
            truncation=True,
            return_tensors="np",
        )


def load_diffusers(
    model: str, device: str = "cpu", dtype: str = "float32"
) -> Components | FlowComponents | ZImageComponents | QwenImageComponents:
    from diffusers import DiffusionPipeline

    torch_dtype = {
        "float32": torch.float32,
        "float16": torch.float16,
        "bfloat16": torch.bfloat16,
    }.get(dtype)
    if torch_dtype is None:
        raise InputError(f"dtype {dtype!r} is not float32, float16 or bfloat16")
    if not Path(model).expanduser().is_dir():
        # nothing is downloaded (these machines reach no hub): a model is a local folder
        raise InputError(
            f"model folder {model!r} not found (give a local diffusers folder with "
            "model_index.json: nothing is downloaded)"
        )
    name = pipeline_class(model)
    family = PIPELINE_FAMILIES[name]
    # Qwen-Image-Edit's processor: its image processor is read alone (``qwen_image_processor``)
    edit = {"processor": None} if name == "QwenImageEditPlusPipeline" else {}
    try:
        pipe = DiffusionPipeline.from_pretrained(model, dtype=torch_dtype, **edit)
        if edit:
            edit = {"image_processor": qwen_image_processor(Path(model) / "processor")}
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot load diffusers model {model!r}: {exc}") from None
    pipe = pipe.to(device)
    if family == "unet":
        return _unet_components(pipe, device, torch_dtype)
    if family in ("zimage", "qwenimage"):  # their pipelines' own 1024 px by default
        channels = getattr(pipe.vae.config, "latent_channels", None) or pipe.vae.config.z_dim
        parts = ZImageComponents if family == "zimage" else QwenImageComponents
        if edit:
            parts = QwenEditComponents
        return parts(
            pipe.transformer, pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.scheduler,
            (channels, 128, 128), device=device, dtype=torch_dtype, **edit,
        )  # fmt: skip
    return _flow_components(family, pipe, device, torch_dtype)


def qwen_image_processor(folder: Path):  # noqa: ANN201 - a transformers image processor
    """Qwen2-VL's image processor from a processor folder: its PIL implementation (the default
    one needs torchvision, which does not install beside this torch)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    return Qwen2VLImageProcessorPil.from_pretrained(str(folder))


def _unet_components(pipe, device: str, dtype: torch.dtype) -> Components:  # noqa: ANN001
    from diffusers import DDIMScheduler

    size = pipe.unet.config.sample_size
    second = getattr(pipe, "text_encoder_2", None)
    # a few-step distillation's trailing Euler is kept (its path is the one it learned);
    # anything else runs on DDIM from its config, as before
    euler = takes_euler(pipe.scheduler)
    scheduler = pipe.scheduler if euler else DDIMScheduler.from_config(pipe.scheduler.config)
    return Components(
        unet=pipe.unet,
        vae=pipe.vae,
        text_encoder=pipe.text_encoder,
        tokenizer=_Tokenizer(pipe.tokenizer),
        scheduler=scheduler,
        vae_scale=pipe.vae.config.scaling_factor,
        latent_shape=(pipe.vae.config.latent_channels, size, size),  # an inpainting UNet takes more
        device=device,
        dtype=dtype,
        text_encoder_2=second,
        tokenizer_2=_Tokenizer(pipe.tokenizer_2) if second is not None else None,
        stepper_type=EulerStepper if euler else None,
    )


def _flow_components(family: str, pipe, device: str, dtype: torch.dtype) -> FlowComponents:  # noqa: ANN001
    config = pipe.transformer.config
    if family == "sd3":
        encoders = (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3)
        tokenizers = (pipe.tokenizer, pipe.tokenizer_2, pipe.tokenizer_3)
        channels = config.in_channels
    else:
        encoders = (pipe.text_encoder, pipe.text_encoder_2)
        tokenizers = (pipe.tokenizer, pipe.tokenizer_2)
        channels = pipe.vae.config.latent_channels  # Flux Fill's transformer takes more
    size = pipe.default_sample_size  # latent pixels: 128 for both (1024 px images)
    return FlowComponents(
        family, pipe.transformer, pipe.vae, encoders, tokenizers, pipe.scheduler,
        (channels, size, size), device=device, dtype=dtype,
        kontext=type(pipe).__name__ == "FluxKontextPipeline",
    )  # fmt: skip


def diffusers_engine(
    model: str,
    device: str = "cpu",
    dtype: str = "float32",
    total_steps: int | None = None,
    levels: Sequence[int] | None = None,
) -> DenoisingEngine:
    """The folder's model with its family's schedule: 50 DDIM steps for a UNet, 28 for SD3 and
    Flux, 8 for Z-Image (Turbo's), 50 for Qwen-Image, and the reference levels mapped onto it
    (``levels_for``)."""
    comps = load_diffusers(model, device, dtype)
    total_steps = total_steps or DEFAULT_STEPS[comps.family]
    own = comps.family in ("zimage", "qwenimage")  # their guidance's own default
    guidance = comps.guidance_spec.default if own else DEFAULT_GUIDANCE.get(comps.family, 7.5)
    return DenoisingEngine(
        comps, f"diffusers:{model}", total_steps, levels or levels_for(total_steps), guidance
    )
