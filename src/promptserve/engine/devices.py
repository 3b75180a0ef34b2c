"""Whether the installed torch can use a ``--device``, asked before any weights load: a CUDA
device on a CPU build of torch would otherwise run on the CPU without a word, or die deep in a
model load with a long traceback."""

from __future__ import annotations

import re

from promptserve.errors import InputError

GPU_INSTALL = "make install TORCH_INDEX=https://download.pytorch.org/whl/cu128"


def check_device(device: str) -> None:
    """One clear error (exit 2 from the CLI) for a device this torch cannot use."""
    if device == "cpu":
        return
    m = re.fullmatch(r"cuda(?::(\d+))?", device)
    if m is None and device != "mps":
        raise InputError(f"--device {device!r} is not one of: cpu, cuda, cuda:N, mps")
    import torch

    if m is not None:
        if not torch.cuda.is_available():
            build = "a CPU build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}"
            raise InputError(
                f"--device {device}: torch {torch.__version__} ({build}) sees no CUDA device; "
                f"for a GPU install a CUDA build ({GPU_INSTALL})"
            )
        index = int(m.group(1) or 0)
        if index >= torch.cuda.device_count():
            raise InputError(
                f"--device {device}: {torch.cuda.device_count()} CUDA devices are visible"
            )
    elif not torch.backends.mps.is_available():
        raise InputError("--device mps: this torch has no MPS (Apple silicon) backend here")
