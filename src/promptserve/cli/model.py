"""``promptserve model``: tiny random-weight model folders, so a family's recipe can be tried
on a laptop (real weights are the user's)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from promptserve.cli.common import app, console, user_errors

model_app = typer.Typer(
    help="Models: write a tiny random-weight folder of a family.", no_args_is_help=True
)
app.add_typer(model_app, name="model")

# the families ``engine.shapes`` builds at tiny scale, by the name a user asks for
TINY_FAMILIES = {
    "sd": "tiny",
    "sdxl": "sdxl",
    "sd3": "sd3",
    "flux": "flux",
    "zimage": "zimage",
    "qwenimage": "qwenimage",
    "qwenimage-edit": "qwenimage-edit",
    "flux-kontext": "flux-kontext",
    "sd-inpaint": "tiny-inpaint",
    "sdxl-inpaint": "sdxl-inpaint",
    "flux-fill": "flux-fill",
}


@model_app.command("tiny")
@user_errors
def model_tiny(
    family: Annotated[str, typer.Option(help="One of: " + ", ".join(TINY_FAMILIES) + ".")],
    out: Annotated[Path, typer.Option(help="The folder to write (a diffusers folder).")],
    size: Annotated[int, typer.Option(help="The model's own size in pixels.", min=32)] = 64,
) -> None:
    """Write a diffusers folder of a family's model at tiny scale, random weights (seeded):
    the pipeline class `serve --model` reads, the family's parts and schedule. Its images are
    noise; it runs on a CPU in seconds, for trying a recipe or testing a deployment."""
    from promptserve.engine.pipelines import pipeline_for, save_pipeline
    from promptserve.engine.shapes import build
    from promptserve.errors import InputError

    if family not in TINY_FAMILIES:
        raise InputError(f"--family {family!r} is not one of {', '.join(TINY_FAMILIES)}")
    if size % 16:
        raise InputError(f"--size {size}: a multiple of 16 is required")
    if out.exists() and any(out.iterdir()):
        raise InputError(f"--out {str(out)!r} exists and is not empty")
    c = build(TINY_FAMILIES[family], size=size)
    pipe = pipeline_for(c, c.guidance_spec.default)
    if family.endswith(("-inpaint", "-fill")):
        pipe = inpainting_pipeline(family, pipe)
    out.mkdir(parents=True, exist_ok=True)
    save_pipeline(pipe, out)
    console.print(f"wrote {out}: a tiny {type(pipe).__name__} ({size}x{size}, random weights)")


def inpainting_pipeline(family: str, pipe):  # noqa: ANN001, ANN201 - a diffusers pipeline
    """The dedicated inpainting pipeline over ``pipe``'s parts (its denoiser has the mask
    channels already)."""
    import inspect

    import diffusers

    cls = {
        "sd-inpaint": diffusers.StableDiffusionInpaintPipeline,
        "sdxl-inpaint": diffusers.StableDiffusionXLInpaintPipeline,
        "flux-fill": diffusers.FluxFillPipeline,
    }[family]
    wanted = inspect.signature(cls.__init__).parameters
    parts = {k: v for k, v in pipe.components.items() if k in wanted}
    if "requires_safety_checker" in wanted:
        parts["requires_safety_checker"] = False
    return cls(**parts)
