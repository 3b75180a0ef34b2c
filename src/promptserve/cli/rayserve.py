"""``serve --ray``: the driver of a Ray Serve deployment, alive until it is told to stop."""

from __future__ import annotations

from promptserve.cli.common import console


def serve_on_ray(server, s) -> None:
    """Deploy on Ray Serve and keep the driver alive until Ctrl-C or SIGTERM (then tear the
    app down, once, with no traceback)."""
    import signal
    import threading

    from ray import serve

    from promptserve.distributed import RaySettings, run_on_ray

    url = run_on_ray(server, RaySettings.from_settings(s))
    console.print(
        f"promptserve on Ray Serve at {url}/v1 · policy {s.policy} · dashboard {url}/dashboard "
        f"· image links {s.public_url}/v1/images/… (Ctrl-C or SIGTERM stops it)"
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):  # both end the same way: one clean shutdown
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(3600):
        pass
    console.print("promptserve: stopping Ray Serve…")
    serve.shutdown()
