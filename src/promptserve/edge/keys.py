"""API keys: each key names a tenant, and the tenant selects the cache namespace.

Keys come from ``PROMPTSERVE_API_KEYS`` (``key:tenant`` pairs separated by commas) or a file
with one ``key:tenant`` a line (``--api-keys FILE``; a line starting with ``#`` is a comment;
a third column, ``key:tenant:secret``, is the tenant's webhook signing secret).
A key is a bearer token (RFC 6750: ASCII letters, digits and ``- . _ ~ + /``, then ``=``
padding), so it can never start with ``#`` nor carry a character no client sends; a key given
twice is refused rather than handed to the last tenant. With no keys configured every request
is the ``default`` tenant and the server refuses to bind beyond localhost.

The server holds each key's SHA-256 and looks a caller up by the digest of what it sent: one
hash and one dictionary lookup per request, whatever the number of keys, and no comparison
whose time depends on how much of a real key a caller guessed.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from promptserve.errors import InputError

TENANT = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
KEY = re.compile(r"^[A-Za-z0-9._~+/-]+=*$")  # RFC 6750's b64token
MIN_KEY_CHARS = 16
DEFAULT_TENANT = "default"


def key_digest(token: str) -> str:
    """What the server holds of an API key: its SHA-256, never the key."""
    return hashlib.sha256(token.strip().encode("utf-8", "surrogateescape")).hexdigest()


def _entry_error(item: str) -> str | None:
    key, sep, rest = item.partition(":")
    tenant, _, secret = rest.partition(":")
    if not sep:
        return "must be KEY:TENANT"
    if not key.isascii() or not KEY.match(key):
        return "key: only ASCII letters, digits and - . _ ~ + / (then = padding), as a bearer token carries"
    if len(key) < MIN_KEY_CHARS:
        return f"key: {MIN_KEY_CHARS}+ characters"
    if not TENANT.match(tenant):
        return "tenant: 1-64 letters, digits, _ . -"
    if rest.count(":") > 1 or (":" in rest and len(secret) < MIN_KEY_CHARS):
        return f"webhook secret: {MIN_KEY_CHARS}+ characters, no ':'"
    return None


def parse_keys(text: str, source: str) -> dict[str, str]:
    """``KEY:TENANT`` entries, separated by newlines or commas. A line that looks like an
    entry with ``#`` in front is refused: such a key could never be sent, and silently
    skipping it hides a typo."""
    keys: dict[str, str] = {}
    for n, raw in enumerate(re.split(r"[,\n]", text), start=1):
        item = raw.strip()
        if not item:
            continue
        if item.startswith("#"):
            if _entry_error(item[1:].strip()) is None and " " not in item[1:].strip():
                raise InputError(
                    f"{source}: entry {n} is a KEY:TENANT behind '#': keys never start with '#' "
                    "(a comment line needs words after '#', not an entry)"
                )
            continue
        problem = _entry_error(item)
        if problem is not None:
            raise InputError(f"{source}: entry {n} must be KEY:TENANT ({problem})")
        key, _, tenant = item.partition(":")
        tenant = tenant.partition(":")[0]  # a third column is the tenant's webhook secret
        if key in keys:
            raise InputError(
                f"{source}: entry {n} repeats the key of tenant {keys[key]!r}: one key, one tenant"
            )
        keys[key] = tenant
    return keys


def webhook_secrets(path: str | Path | None) -> dict[str, str]:
    """Each tenant's webhook signing secret, the third column of a keys file entry
    (``KEY:TENANT:SECRET``; ``load_keys`` has checked the file)."""
    if path is None or not Path(path).is_file():
        return {}
    out: dict[str, str] = {}
    for raw in re.split(r"[,\n]", Path(path).read_text(encoding="utf-8")):
        parts = raw.strip().split(":")
        if len(parts) == 3 and not parts[0].startswith("#"):
            out[parts[1]] = parts[2]
    return out


def load_keys(path: str | Path | None = None, env: dict[str, str] | None = None) -> dict[str, str]:
    env = os.environ if env is None else env
    keys: dict[str, str] = {}
    sources: list[tuple[str, str]] = []
    if env.get("PROMPTSERVE_API_KEYS"):
        sources.append((env["PROMPTSERVE_API_KEYS"], "PROMPTSERVE_API_KEYS"))
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise InputError(f"api keys file {str(p)!r} does not exist")
        sources.append((p.read_text(encoding="utf-8"), str(p)))
    for text, source in sources:
        for key, tenant in parse_keys(text, source).items():
            if key in keys:
                raise InputError(
                    f"{source}: a key of tenant {tenant!r} is also given to {keys[key]!r}"
                )
            keys[key] = tenant
    return keys


class KeyTable:
    """The configured keys as their digests: ``tenant(authorization)`` is one hash and one
    lookup. Empty: every caller is the default tenant."""

    def __init__(self, keys: dict[str, str] | None = None) -> None:
        self._tenants = {key_digest(k): t for k, t in (keys or {}).items()}

    def __bool__(self) -> bool:
        return bool(self._tenants)

    @property
    def digests(self) -> dict[str, str]:
        """Key digest -> tenant: what a router on another process may hold."""
        return dict(self._tenants)

    def tenant(self, authorization: str | None) -> str | None:
        if not self._tenants:
            return DEFAULT_TENANT
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        return self._tenants.get(key_digest(token))


def tenant_for(keys: KeyTable | dict[str, str], authorization: str | None) -> str | None:
    """The caller's tenant, or None when keys are configured and the header does not match one."""
    table = keys if isinstance(keys, KeyTable) else KeyTable(keys)
    return table.tenant(authorization)
