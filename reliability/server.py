"""A promptserve server in its own process, so its memory is its own."""

from __future__ import annotations

from pathlib import Path

from promptserve.server.live import start_server, stop

__all__ = ["peak_rss_mb", "start_server", "stop"]


def rss_mb(pid: int) -> float:
    """The process's resident set now (VmRSS), MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError("no VmRSS")


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident set (VmHWM), MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError("no VmHWM")
