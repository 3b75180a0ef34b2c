"""The ``promptserve`` command. Commands translate flags into calls; they decide nothing.

One module per command group; importing one registers its commands on ``app``, in the order
``--help`` lists them.
"""

from importlib import import_module

from promptserve.cli.common import app

for _group in ("simulate", "serve", "bench", "profile", "workload", "lora", "model"):
    import_module(f"promptserve.cli.{_group}")


def main() -> None:  # pragma: no cover - console entry point
    app()


__all__ = ["app", "main"]
