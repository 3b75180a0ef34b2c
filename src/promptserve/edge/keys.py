"""API keys: each key names a tenant, and the tenant selects the cache namespace.

Keys come from ``PROMPTSERVE_API_KEYS`` (``key:tenant`` pairs separated by commas) or a file
with one ``key:tenant`` a line (``--api-keys FILE``). With no keys configured every request is
the ``default`` tenant and the server refuses to bind beyond localhost.
"""

from __future__ import annotations

import hmac
import os
import re
from pathlib import Path

from promptserve.errors import InputError

TENANT = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
DEFAULT_TENANT = "default"


def parse_keys(text: str, source: str) -> dict[str, str]:
    keys: dict[str, str] = {}
    for n, raw in enumerate(re.split(r"[,\n]", text), start=1):
        item = raw.strip()
        if not item or item.startswith("#"):
            continue
        key, sep, tenant = item.partition(":")
        if not sep or len(key) < 16 or not TENANT.match(tenant):
            raise InputError(
                f"{source}: entry {n} must be KEY:TENANT with a key of 16+ characters and a tenant of letters, digits, _ . -"
            )
        keys[key] = tenant
    return keys


def load_keys(path: str | Path | None = None, env: dict[str, str] | None = None) -> dict[str, str]:
    env = os.environ if env is None else env
    keys = {}
    if env.get("PROMPTSERVE_API_KEYS"):
        keys.update(parse_keys(env["PROMPTSERVE_API_KEYS"], "PROMPTSERVE_API_KEYS"))
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise InputError(f"api keys file {str(p)!r} does not exist")
        keys.update(parse_keys(p.read_text(encoding="utf-8"), str(p)))
    return keys


def tenant_for(keys: dict[str, str], authorization: str | None) -> str | None:
    """The caller's tenant, or None when keys are configured and the header does not match one."""
    if not keys:
        return DEFAULT_TENANT
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        return None
    for key, tenant in keys.items():
        if hmac.compare_digest(key.encode(), token.strip().encode()):
            return tenant
    return None
