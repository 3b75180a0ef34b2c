"""``promptserve lora``: adapters for tests and demos (the real ones are the user's)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from promptserve.cli.common import app, console, user_errors

lora_app = typer.Typer(
    help="LoRA adapters: write a random one for tests and demos.", no_args_is_help=True
)
app.add_typer(lora_app, name="lora")


@lora_app.command("random")
@user_errors
def lora_random(
    out: Annotated[Path, typer.Option(help="The adapter file to write (NAME.safetensors).")],
    model: Annotated[str, typer.Option(help="tiny or a local diffusers folder.")] = "tiny",
    rank: Annotated[int, typer.Option(help="The adapter's rank.", min=1, max=256)] = 4,
    seed: Annotated[int, typer.Option(help="Seeds its weights.", min=0)] = 0,
    targets: Annotated[
        str, typer.Option(help="Comma-separated module name endings it adapts.")
    ] = "to_q,to_k,to_v,to_out.0",
) -> None:
    """Write a random LoRA adapter over the model's attention projections, in the diffusers /
    PEFT layout that `serve --lora-dir` reads."""
    import safetensors.torch

    from promptserve.engine import make_engine
    from promptserve.engine.lora import PREFIX, random_adapter
    from promptserve.errors import InputError

    if out.suffix != ".safetensors":
        raise InputError(f"--out {str(out)!r}: an adapter file ends in .safetensors")
    engine = make_engine(model)
    c = engine.c
    denoiser = c.unet if c.family == "unet" else c.transformer
    state = random_adapter(denoiser, PREFIX[c.family], rank, seed, targets.split(","))
    if not state:
        raise InputError(f"--targets {targets!r}: no linear layer of the model ends so")
    out.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(state, out)
    console.print(f"wrote {out}: rank {rank}, {len(state) // 2} layers of {engine.name}")
