"""Where ``serve`` listens, said before anything loads: the port's check, the address image
links start with, and the one line an operator reads at start."""

from __future__ import annotations

import socket

from promptserve.errors import InputError


def default_public_url(host: str, port: int) -> str:
    """Where image links point without ``--public-url``: the configured address (this
    machine's name where it binds every address)."""
    if host in ("0.0.0.0", "::", ""):
        host = socket.getfqdn()
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def started_line(runtime, s) -> str:  # noqa: ANN001 - LiveRuntime, ServeFile
    """What an operator needs at start: where, with what policy and deadline, and the links."""
    base = f"http://{'[' + s.host + ']' if ':' in s.host else s.host}:{s.port}"
    return (
        f"promptserve: {runtime.workers.name} on {base}/v1 · policy {runtime.policy.name} · "
        f"deadline {runtime.setting.slo_s:.0f} s · dashboard {base}/dashboard · "
        f"image links {s.public_url}/v1/images/…"
    )


def check_port_free(host: str, port: int) -> None:
    """A port in use is bad input: say so in one line (exit 2) before anything loads. The check
    binds as uvicorn will (``SO_REUSEADDR``), so the lingering sockets of a crashed server's
    connections (FIN-WAIT-2, TIME-WAIT) do not refuse the supervisor's restart."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise InputError(f"port {port} on {host} is not free ({exc.strerror})") from None


def loading_lines(s) -> str:  # noqa: ANN001 - ServeFile
    """What ``serve`` says while the model loads (the tiny model: that its images are noise)."""
    line = f"promptserve: loading {s.model} ({s.backend or 'auto'}) with {s.workers} worker(s)…"
    if s.model == "tiny" and s.backend in (None, "tiny"):
        line += (
            "\n[yellow]the tiny model has random weights: its images are noise "
            "(serve a real model with --model FOLDER, see the README)[/yellow]"
        )
    return line
