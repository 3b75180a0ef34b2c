"""The pages people look at: the live dashboard and the simulation report. Self-contained HTML
(the chart code is inlined; nothing is fetched from a CDN)."""

from __future__ import annotations

from functools import cache
from importlib.resources import files


@cache
def page(name: str) -> str:
    """An HTML page of this package with the chart code inlined at ``/*CHARTS*/``."""
    here = files(__package__)
    return (
        (here / name)
        .read_text("utf-8")
        .replace("/*CHARTS*/", (here / "charts.js").read_text("utf-8"))
    )
