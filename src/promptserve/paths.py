"""Where the project's shipped data lives (the repository's ``data/`` folder)."""

from __future__ import annotations

import os
from pathlib import Path


def data_dir() -> Path:
    """``$PROMPTSERVE_DATA`` if set, else the ``data/`` folder of this source checkout."""
    env = os.environ.get("PROMPTSERVE_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "data"


def data_file(name: str) -> Path:
    return data_dir() / name
