"""The server's config file (TOML): every ``promptserve serve`` flag, validated, with the bad field
named. Flags given on the command line win over the file.

```toml
model = "tiny"            # or a diffusers folder
backend = "tiny"          # tiny | diffusers | modeled
workers = 1
slo_s = 60.0
policy = "promptserve-step"   # or "promptserve": GPUs pinned to levels, as published
embedder = "minilm"
device = "cpu"
cache_dir = ".promptserve"
host = "127.0.0.1"
port = 8000
api_keys_file = "keys.txt"
max_body_bytes = 1048576
public_url = "https://images.example.com"  # image links start here; unset: relative links
model_names = ["sdxl", "stable-diffusion-xl"]  # the id /v1/models shows, then aliases
profile = "sdxl-h100.json"  # a measured profile (promptserve profile) to plan with
trusted_proxies = ["10.0.0.0/8"]  # believe X-Forwarded-* from these; unset: from none
max_header_bytes = 16384  # a larger request head: 431
max_headers = 100         # more header fields: 431
header_timeout_s = 10.0   # a head slower than this: 408
body_timeout_s = 30.0     # a body slower than this after its head: 408
send_timeout_s = 30.0     # an answer left unread this long: the connection is dropped
max_connections_per_client = 64
speedup = 1.0             # modelled backend: run this many times faster than the profile
expected_qpm = 1.0        # the load the first plan is made for, before any arrival
ray = false               # true: serve on Ray Serve (see docs/ray.md)
ray_address = "auto"      # join a running cluster; unset: start a local Ray
ray_worker_cpus = 1.0     # CPUs reserved per worker replica
ray_worker_gpus = 1.0     # GPUs per worker replica; unset: 1 on CUDA, else 0
ray_ingress_replicas = 1  # ingress replicas, tenants routed to one each by a hash ring
max_inflight_megapixels = 8.4  # step-level: at most this many megapixels running on one GPU
lora_private = false      # true: every join loads its adapters (residency tells no tenant)
```

Each key may also be spelt as its flag is named (``slo``, ``api-keys``, ``header-timeout``).
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ByteSize, ConfigDict, Field, ValidationError

from promptserve.errors import InputError

MODEL_NAME = r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$"  # a served model's id or alias


class ServeFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = "tiny"
    backend: Literal["tiny", "diffusers", "modeled"] | None = None
    workers: int = Field(default=1, ge=1, le=64)
    slo_s: float | None = Field(default=None, gt=0)
    policy: str = "promptserve-step"
    embedder: Literal["minilm", "hashing"] = "minilm"
    device: str = "cpu"
    cache_dir: Path = Path(".promptserve")
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    api_keys_file: Path | None = None
    max_body_bytes: int = Field(default=1 << 20, ge=1024)
    public_url: str | None = Field(default=None, pattern=r"^https?://[^\s/?#]+(/[^\s?#]*)?$")
    model_names: list[Annotated[str, Field(pattern=MODEL_NAME)]] = Field(
        default_factory=list, max_length=16
    )
    profile: Path | None = None
    sizes: str | None = None  # "1024x1024,1152x896,..."; None: the family's usual set
    lora_dir: Path | None = None  # NAME.safetensors adapters a request may name
    lora_resident: int = Field(default=8, ge=1, le=1024)  # of them, on each device at once
    lora_resident_bytes: ByteSize | None = Field(default=None, gt=0)  # and their rows' bytes
    lora_private: bool = False  # each adapter on a device only while a member names it
    feature_cache: Literal["off", "on"] = "on"  # where the engine has one (step-level only)
    r_max: int = Field(default=4, ge=1, le=63)  # the longest feature-cache interval
    max_inflight_megapixels: float | None = Field(default=None, gt=0)  # per GPU, step-level
    select_cpu: float = Field(default=0.10, gt=0, le=1)  # ``+select``: its replays' core share
    steps: int | None = Field(default=None, ge=1, le=1000)  # None: the family's default
    latent_cache: Literal["off", "on"] = "on"  # approximate caching (off: every step, always)
    jobs_dir: Path | None = None  # the durable job store's folder (None: cache_dir)
    webhook_allow: list[str] = Field(default_factory=list, max_length=256)  # hosts, CIDRs
    jobs_in_flight: int = Field(default=1000, ge=1)  # per tenant, queued or running
    jobs_kept: int = Field(default=256, ge=1)  # finished jobs per tenant ...
    jobs_kept_bytes: ByteSize = Field(default=ByteSize(256 << 20), gt=0)  # ... their bytes ...
    jobs_kept_s: float = Field(default=3600.0, ge=1.0)  # ... and for how long
    trusted_proxies: list[str] = Field(default_factory=list, max_length=256)
    max_header_bytes: int = Field(default=16 * 1024, ge=1024, le=1 << 20)
    max_headers: int = Field(default=100, ge=8, le=10_000)
    header_timeout_s: float = Field(default=10.0, gt=0)
    body_timeout_s: float = Field(default=30.0, gt=0)
    send_timeout_s: float = Field(default=30.0, gt=0)
    max_connections_per_client: int = Field(default=64, ge=1)
    access_log: bool = True  # one INFO line a request (uvicorn's); off under load tests
    speedup: float = Field(default=1.0, gt=0)
    expected_qpm: float = Field(default=1.0, ge=0)
    ray: bool = False
    ray_address: str | None = None
    ray_worker_cpus: float = Field(default=1.0, gt=0)
    ray_worker_gpus: float | None = Field(default=None, ge=0)
    ray_ingress_replicas: int = Field(default=1, ge=1, le=256)
    # the engine (engine/options.py): weights' dtype and speed options, each off by default
    # the latent cache's byte quota ("20GiB", "500MB", bytes); None: 10% of the free disk at start
    cache_max_bytes: ByteSize | None = Field(default=None, gt=0)
    embed_cache_max_rows: int = Field(default=1_000_000, ge=1)
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    compile: bool = False
    cuda_graphs: bool = False
    channels_last: bool = False
    attention: Literal["sdpa", "math"] = "sdpa"


def load_serve_file(path: str | Path) -> ServeFile:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"config file {str(path)!r} does not exist")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"config file {str(path)!r} is not valid TOML ({exc})") from None
    return validate_settings(raw, f"config file {str(path)!r}")


# a flag's name (``--slo`` is ``slo``) where the setting's key differs: either may be used
FLAG_KEYS = {
    "slo": "slo_s",
    "api_keys": "api_keys_file",
    "address": "ray_address",
    "worker_cpus": "ray_worker_cpus",
    "worker_gpus": "ray_worker_gpus",
    "ingress_replicas": "ray_ingress_replicas",
    "model_name": "model_names",
    "header_timeout": "header_timeout_s",
    "body_timeout": "body_timeout_s",
    "send_timeout": "send_timeout_s",
}
LISTS = (
    "model_names",
    "trusted_proxies",
    "webhook_allow",
)  # a list, or one string (comma-separated)


def settings_keys(raw: dict, source: str) -> dict:
    """Keys as the flags name them or as the settings do (``-`` or ``_``), each once; an
    unknown key is named with the nearest known one."""
    import difflib

    fields = set(ServeFile.model_fields)
    out: dict = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        name = FLAG_KEYS.get(name, name)
        if name not in fields:
            known = sorted(fields | set(FLAG_KEYS))
            near = difflib.get_close_matches(str(key).replace("-", "_"), known, n=1, cutoff=0.6)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise InputError(f"{source}: field {key}: not a setting{hint}")
        if name in out:
            raise InputError(f"{source}: field {key}: {name} is given twice (as flag and key)")
        out[name] = value
    if isinstance(out.get("sizes"), list):  # "sizes" as a list, like model_names
        out["sizes"] = ",".join(map(str, out["sizes"]))
    for name in LISTS:
        if isinstance(out.get(name), str):
            out[name] = [part.strip() for part in out[name].split(",") if part.strip()]
    return out


def validate_settings(raw: object, source: str) -> ServeFile:
    """Settings from a file or a Serve application's arguments; the bad field is named."""
    if isinstance(raw, dict):
        raw = settings_keys(raw, source)
    try:
        return ServeFile.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "(file)"
        raise InputError(f"{source}: field {field}: {err['msg']}") from None


def server_config(s: ServeFile):
    """The server's settings, API keys loaded, the policy checked; no keys means localhost."""
    from promptserve.edge.keys import load_keys, webhook_secrets
    from promptserve.edge.limits import HttpLimits, check_proxies
    from promptserve.engine.devices import check_device
    from promptserve.engine.options import EngineOptions
    from promptserve.engine.sizes import parse_sizes
    from promptserve.policy import get_policy
    from promptserve.profile import load_profile
    from promptserve.server import ServerConfig
    from promptserve.server.kept import Bounds
    from promptserve.server.webhooks import parse_allow

    get_policy(s.policy)  # a name it does not know is refused here, naming the choices
    if s.backend != "modeled":  # the modelled engine computes nothing on a device
        check_device(s.device)
    if s.profile is not None:
        load_profile(s.profile)  # readable and valid before any weights load
    sizes = parse_sizes(s.sizes) if s.sizes else None  # their multiples: when the model loads

    keys = load_keys(s.api_keys_file)
    allow = parse_allow(s.webhook_allow)  # a bad entry is named before the model loads
    if not keys and s.host not in ("127.0.0.1", "localhost", "::1"):
        raise InputError(
            "with no API keys configured the server binds to localhost only (see --api-keys)"
        )
    return ServerConfig(
        s.model,
        s.backend,
        s.workers,
        s.cache_dir,
        s.slo_s,
        s.policy,
        s.embedder,
        s.device,
        keys,
        s.max_body_bytes,
        s.speedup,
        s.expected_qpm,
        s.dtype,
        EngineOptions(s.compile, s.cuda_graphs, s.channels_last, s.attention),
        int(s.cache_max_bytes) if s.cache_max_bytes is not None else None,
        s.embed_cache_max_rows,
        s.public_url,
        tuple(s.model_names),
        s.profile,
        HttpLimits(
            s.max_header_bytes,
            s.max_headers,
            s.header_timeout_s,
            s.body_timeout_s,
            s.max_connections_per_client,
            check_proxies(s.trusted_proxies),
            s.send_timeout_s,
        ),
        sizes,
        s.lora_dir,
        s.lora_resident,
        int(s.lora_resident_bytes) if s.lora_resident_bytes is not None else None,
        s.lora_private,
        s.feature_cache == "on",
        s.r_max,
        s.max_inflight_megapixels,
        s.select_cpu,
        s.steps,
        s.latent_cache == "on",
        s.jobs_dir,
        allow,
        webhook_secrets(s.api_keys_file),
        s.jobs_in_flight,
        Bounds(s.jobs_kept, int(s.jobs_kept_bytes), s.jobs_kept_s),
    )
