"""Nearest-neighbour search over L2-normalised vectors by inner product (= cosine similarity).

``ExactVectors`` scans every row (numpy); ``FaissIVFVectors`` is faiss's inverted-file index
(approximate, trained on the vectors it holds); ``USearchVectors`` is usearch's HNSW graph.
``AutoVectors`` is exact below a size and moves to IVF above it, which is what the cache uses.
Why IVF (``benchmarks/bench_cache.py``, 2-core machine, near-duplicate data built on MiniLM
embeddings of the project's prompts): at 100k entries usearch HNSW answered faster (p99 0.66 ms
against 1.19 ms) but missed more (recall@1 0.984 against 0.9996; K_opt agreement 0.990 against
0.9998, under the 99% serving needs), built 6x slower (24 s against 4 s) and inserted one at a
time 11x slower; at 1M entries IVF-4096 builds in 73 s and, at nprobe 16, answers at p99 1.8 ms
with K_opt agreement 0.9999.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np


class Vectors(Protocol):
    def add(self, ids: np.ndarray, vecs: np.ndarray) -> None: ...
    def remove(self, ids: np.ndarray) -> None: ...
    def search(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...
    def __len__(self) -> int: ...


def _empty_result(m: int) -> tuple[np.ndarray, np.ndarray]:
    return np.full(m, np.nan, dtype=np.float32), np.full(m, -1, dtype=np.int64)


class ExactVectors:
    """Every row scanned; a matrix that doubles as it grows and swap-deletes on removal."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self._mat = np.zeros((16, dim), dtype=np.float32)
        self._ids = np.zeros(16, dtype=np.int64)
        self._row: dict[int, int] = {}
        self._n = 0

    def __len__(self) -> int:
        return self._n

    def add(self, ids: np.ndarray, vecs: np.ndarray) -> None:
        need = self._n + len(ids)
        if need > len(self._ids):
            size = max(need, 2 * len(self._ids))
            self._mat = np.resize(self._mat, (size, self.dim))
            self._ids = np.resize(self._ids, size)
        self._mat[self._n : need] = vecs
        self._ids[self._n : need] = ids
        for offset, i in enumerate(ids.tolist()):
            self._row[i] = self._n + offset
        self._n = need

    def remove(self, ids: np.ndarray) -> None:
        for i in ids.tolist():
            row = self._row.pop(i, None)
            if row is None:
                continue
            last = self._n - 1
            if row != last:
                self._mat[row] = self._mat[last]
                self._ids[row] = self._ids[last]
                self._row[int(self._ids[row])] = row
            self._n = last

    def search(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Best similarity and id per query row; NaN and -1 when empty."""
        if self._n == 0:
            return _empty_result(len(queries))
        sims = queries @ self._mat[: self._n].T
        best = np.argmax(sims, axis=1)
        return sims[np.arange(len(queries)), best], self._ids[best]

    def matrix(self) -> tuple[np.ndarray, np.ndarray]:
        return self._ids[: self._n].copy(), self._mat[: self._n].copy()


class FaissIVFVectors:
    """faiss IndexIVFFlat on inner product; trained once on the vectors it is built from."""

    def __init__(self, dim: int, train: np.ndarray, nlist: int, nprobe: int = 32) -> None:
        import faiss

        self._quantizer = faiss.IndexFlatIP(dim)
        self._index = faiss.IndexIVFFlat(self._quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        self._index.train(np.ascontiguousarray(train, dtype=np.float32))
        self._index.nprobe = nprobe

    def __len__(self) -> int:
        return int(self._index.ntotal)

    def set_nprobe(self, nprobe: int) -> None:
        self._index.nprobe = nprobe

    def add(self, ids: np.ndarray, vecs: np.ndarray) -> None:
        self._index.add_with_ids(np.ascontiguousarray(vecs, dtype=np.float32), ids.astype(np.int64))

    def remove(self, ids: np.ndarray) -> None:
        self._index.remove_ids(ids.astype(np.int64))

    def search(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if len(self) == 0:
            return _empty_result(len(queries))
        sims, ids = self._index.search(np.ascontiguousarray(queries, dtype=np.float32), 1)
        sims, ids = sims[:, 0], ids[:, 0]
        sims[ids < 0] = np.nan
        return sims, ids


class USearchVectors:
    """usearch HNSW on inner product; no training, incremental inserts."""

    def __init__(self, dim: int, connectivity: int = 16, expansion_search: int = 64) -> None:
        from usearch.index import Index

        self._index = Index(
            ndim=dim,
            metric="ip",
            dtype="f32",
            connectivity=connectivity,
            expansion_search=expansion_search,
        )

    def __len__(self) -> int:
        return len(self._index)

    def add(self, ids: np.ndarray, vecs: np.ndarray) -> None:
        self._index.add(ids.astype(np.uint64), np.ascontiguousarray(vecs, dtype=np.float32))

    def remove(self, ids: np.ndarray) -> None:
        self._index.remove(ids.astype(np.uint64))

    def search(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if len(self) == 0:
            return _empty_result(len(queries))
        found = self._index.search(np.ascontiguousarray(queries, dtype=np.float32), 1)
        keys = np.asarray(found.keys).reshape(len(queries), -1)[:, 0].astype(np.int64)
        dist = np.asarray(found.distances, dtype=np.float32).reshape(len(queries), -1)[:, 0]
        return 1.0 - dist, keys


def ivf_nlist(n: int) -> int:
    """About 4 sqrt(n) lists, a power of two, at least 16 and at most 4096."""
    return int(min(4096, max(16, 2 ** round(np.log2(4 * np.sqrt(max(n, 1)))))))


class AutoVectors:
    """Exact search up to ``ann_threshold`` vectors; faiss IVF above, rebuilt at 4x its size."""

    def __init__(self, dim: int, ann_threshold: int = 50_000, nprobe: int = 16) -> None:
        self.dim = dim
        self.ann_threshold = ann_threshold
        self.nprobe = nprobe
        self._exact = ExactVectors(
            dim
        )  # the copy of record; IVF answers searches above the threshold
        self._ann: FaissIVFVectors | None = None
        self._built_at = 0

    def __len__(self) -> int:
        return len(self._exact)

    @property
    def approximate(self) -> bool:
        return self._ann is not None

    def add(self, ids: np.ndarray, vecs: np.ndarray) -> None:
        self._exact.add(ids, vecs)
        if self._ann is not None:
            self._ann.add(ids, vecs)
        n = len(self._exact)
        if n > self.ann_threshold and (self._ann is None or n >= 4 * self._built_at):
            self._rebuild()

    def remove(self, ids: np.ndarray) -> None:
        self._exact.remove(ids)
        if self._ann is not None:
            self._ann.remove(ids)

    def search(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return (self._ann or self._exact).search(queries)

    def _rebuild(self) -> None:
        ids, mat = self._exact.matrix()
        rng = np.random.default_rng(0)
        sample = mat[rng.choice(len(mat), size=min(len(mat), 200_000), replace=False)]
        self._ann = FaissIVFVectors(self.dim, sample, ivf_nlist(len(mat)), self.nprobe)
        self._ann.add(ids, mat)
        self._built_at = len(mat)
