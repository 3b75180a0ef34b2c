"""Engine speed options, each off by default and each measured on and off by
``benchmarks/bench_engine.py`` (CPU) and ``benchmarks/bench_gpu_engine.py`` (GPU).

They change how the denoiser runs, never what it computes beyond float rounding: the same
request gives the same image within the dtype's tolerance with any of them on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from promptserve.errors import InputError

ATTENTION = ("sdpa", "math")


@dataclass(frozen=True)
class EngineOptions:
    compile: bool = False  # torch.compile the denoiser (UNet or transformer)
    # a CUDA graph per in-flight size: torch.compile's "reduce-overhead" mode (implies compile)
    cuda_graphs: bool = False
    channels_last: bool = False  # the UNet's convolutions in NHWC (UNet families only)
    # "sdpa": PyTorch's fused attention kernels (flash / memory-efficient, what diffusers uses);
    # "math": its reference kernel, the unfused baseline the fused ones are measured against
    attention: Literal["sdpa", "math"] = "sdpa"

    def label(self) -> str:
        on = [name for name in ("compile", "cuda_graphs", "channels_last") if getattr(self, name)]
        if self.attention != "sdpa":
            on.append(f"attention={self.attention}")
        return "+".join(on) or "plain"


def _math_attention(inner):  # noqa: ANN001, ANN202 - a denoiser module; its wrapper
    """The denoiser with every attention call on PyTorch's reference (math) kernel."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    class MathAttention(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = inner
            self.config = inner.config
            self.dtype = inner.dtype

        def forward(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            with sdpa_kernel([SDPBackend.MATH]):
                return self.inner(*args, **kwargs)

    return MathAttention()


def apply_options(c, options: EngineOptions) -> None:  # noqa: ANN001 - a family's components
    """Turn the options on for a family's components, in place."""
    import torch

    if options.attention not in ATTENTION:
        raise InputError(f"attention {options.attention!r} is not one of {ATTENTION}")
    name = "unet" if c.family == "unet" else "transformer"
    model = getattr(c, name)
    if options.channels_last:
        if c.family != "unet":
            raise InputError("channels_last applies to UNet models (SD 1.x/2.x, SDXL) only")
        model.to(memory_format=torch.channels_last)
    if options.attention == "math":
        model = _math_attention(model)
    if options.cuda_graphs and not str(c.device).startswith("cuda"):
        raise InputError("cuda_graphs needs a CUDA device")
    if options.compile or options.cuda_graphs:
        from torch import _dynamo

        # one graph per in-flight count the step runner meets (1 .. 64)
        _dynamo.config.cache_size_limit = max(_dynamo.config.cache_size_limit, 64)
        mode = "reduce-overhead" if options.cuda_graphs else None
        compiled = torch.compile(model, mode=mode, dynamic=False if options.cuda_graphs else None)
        model = compiled
    setattr(c, name, model)
