"""Small factories shared by the server tests: real servers, real clients."""

import openai

from promptserve.server import ServerConfig, build_app


def modeled_app(cache_dir, **overrides):
    """The server on the modelled engine (reference SDXL latencies), hashing embedder."""
    settings = dict(
        backend="modeled", model="sdxl-reference", embedder="hashing", cache_dir=cache_dir, slo_s=60
    )
    return build_app(ServerConfig(**(settings | overrides)))


def tiny_app(cache_dir, **overrides):
    """The server on the tiny model (real latents on the CPU), hashing embedder, 120 s SLO."""
    settings = dict(model="tiny", embedder="hashing", cache_dir=cache_dir, slo_s=120)
    return build_app(ServerConfig(**(settings | overrides)))


def client(url, **options):
    """The official client on a local server (the key is ignored unless keys are set)."""
    return openai.OpenAI(
        base_url=f"{url}/v1", api_key=options.pop("api_key", "unused"), max_retries=0, **options
    )
