"""Approximate-cache index at scale: faiss IVF and usearch HNSW side by side against exact search.

Data shaped like the real thing: MiniLM embeddings of the project's prompts (DiffusionDB and
PartiPrompts) are the seeds; every entry and query is a near-duplicate of a seed (the seed plus
isotropic noise of a log-uniform size, so similarity to the seed spans about 0.55 to 1.0) or,
for 10%, a blend of two seeds (prompts that mix two subjects). Queries are fresh draws from the
same generator, so they are future prompts, not copies of entries.

Prints one JSON line: per backend the build time, insert rate, single-query lookup p50/p99
(ms), recall@1 against exact search on the queries, and K_opt agreement (the share of queries
for which the ANN answer and exact search give the same K_opt under the shipped MiniLM
thresholds, which is what serving depends on).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def seeds(cache_dir: Path) -> np.ndarray:
    from promptserve.cache.embed import make_embedder
    from promptserve.workload import load_prompts

    prompts = load_prompts(ROOT / "data/diffusiondb_prompts_4k.txt") + load_prompts(
        ROOT / "data/PartiPrompts.tsv"
    )
    return make_embedder("minilm", cache_dir).embed(list(dict.fromkeys(prompts)))


def near_duplicates(base: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    dim = base.shape[1]
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 100_000):
        m = min(100_000, n - start)
        pick = rng.integers(0, len(base), m)
        v = base[pick].copy()
        blend = rng.random(m) < 0.1
        other = base[rng.integers(0, len(base), blend.sum())]
        alpha = rng.uniform(0.5, 0.9, (blend.sum(), 1)).astype(np.float32)
        v[blend] = alpha * v[blend] + (1 - alpha) * other
        sigma = np.exp(rng.uniform(np.log(0.05), np.log(1.5), (m, 1))).astype(np.float32)
        v += sigma * rng.standard_normal((m, dim), dtype=np.float32) / np.sqrt(dim)
        out[start : start + m] = v / np.linalg.norm(v, axis=1, keepdims=True)
    return out


def exact_answers(data: np.ndarray, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    import faiss

    flat = faiss.IndexFlatIP(data.shape[1])
    flat.add(data)
    sims, ids = flat.search(queries, 1)
    return sims[:, 0], ids[:, 0]


def single_query_ms(search, queries: np.ndarray) -> tuple[float, float]:
    times = []
    for q in queries:
        t0 = time.perf_counter()
        search(q[None, :])
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.percentile(times, 50)), float(np.percentile(times, 99))


def measure(
    name: str,
    build,
    data: np.ndarray,
    queries: np.ndarray,
    exact: tuple,
    thresholds,
    sweep: tuple[int, ...] = (),
) -> dict:
    ids = np.arange(len(data), dtype=np.int64)
    t0 = time.perf_counter()
    index = build(data)
    index.add(ids, data)
    build_s = time.perf_counter() - t0
    extra = near_duplicates(data[:1000], 2000, np.random.default_rng(99))
    t0 = time.perf_counter()
    for i, v in enumerate(extra):
        index.add(np.array([len(data) + i], dtype=np.int64), v[None, :])
    insert_per_s = len(extra) / (time.perf_counter() - t0)
    index.remove(np.arange(len(data), len(data) + len(extra), dtype=np.int64))
    sims, found = index.search(queries)
    p50, p99 = single_query_ms(index.search, queries[:3000])
    import faiss

    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)  # one query at a time: OpenMP fork/join costs more than it saves
    p50_1, p99_1 = single_query_ms(index.search, queries[:3000])
    faiss.omp_set_num_threads(threads)
    exact_sims, exact_ids = exact
    agree = thresholds.k_opt_many(sims) == thresholds.k_opt_many(exact_sims)
    swept = {}
    for nprobe in sweep:  # search-time knob of IVF: fewer lists scanned, faster, lower recall
        index.set_nprobe(nprobe)
        s_sims, s_found = index.search(queries)
        faiss.omp_set_num_threads(1)
        s50, s99 = single_query_ms(index.search, queries[:3000])
        faiss.omp_set_num_threads(threads)
        swept[f"nprobe_{nprobe}"] = {
            "lookup_p50_ms_1thread": round(s50, 3),
            "lookup_p99_ms_1thread": round(s99, 3),
            "recall_at_1": round(float(np.mean(s_found == exact_ids)), 4),
            "kopt_agreement": round(
                float(np.mean(thresholds.k_opt_many(s_sims) == thresholds.k_opt_many(exact_sims))),
                4,
            ),
        }
    return {
        "entries": len(data),
        "build_s": round(build_s, 1),
        "build_per_s": round(len(data) / build_s),
        "single_insert_per_s": round(insert_per_s),
        "lookup_p50_ms": round(p50, 3),
        "lookup_p99_ms": round(p99, 3),
        "lookup_p50_ms_1thread": round(p50_1, 3),
        "lookup_p99_ms_1thread": round(p99_1, 3),
        "recall_at_1": round(float(np.mean(found == exact_ids)), 4),
        "kopt_agreement": round(float(np.mean(agree)), 4),
        **swept,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="entries in the faiss index")
    parser.add_argument(
        "--usearch-n",
        type=int,
        default=100_000,
        help="entries in the usearch index (HNSW builds slowly on 2 cores)",
    )
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument(
        "--nprobe", type=int, default=16, help="IVF lists scanned per query (the serving default)"
    )
    parser.add_argument("--cache-dir", default=str(ROOT / ".promptserve"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from promptserve.cache.thresholds import shipped_thresholds
    from promptserve.cache.vectors import FaissIVFVectors, USearchVectors, ivf_nlist

    thresholds = shipped_thresholds("minilm")
    base = seeds(Path(args.cache_dir))
    rng = np.random.default_rng(0)
    data = near_duplicates(base, args.n, rng)
    queries = near_duplicates(base, args.queries, np.random.default_rng(1))
    print(f"data ready: {len(data)} x {data.shape[1]}", file=sys.stderr)
    results: dict[str, dict] = {}
    sample = data[
        np.random.default_rng(2).choice(len(data), min(len(data), 200_000), replace=False)
    ]

    def ivf(n):
        return lambda _d: FaissIVFVectors(
            data.shape[1], sample[: min(len(sample), 50 * ivf_nlist(n))], ivf_nlist(n), args.nprobe
        )

    exact_full = exact_answers(data, queries)
    results["faiss_ivf"] = measure(
        "faiss_ivf", ivf(args.n), data, queries, exact_full, thresholds, sweep=(4, 8, 16)
    )
    print(json.dumps(results["faiss_ivf"]), file=sys.stderr)
    small = data[: args.usearch_n]
    exact_small = exact_answers(small, queries)
    results[f"faiss_ivf_at_{args.usearch_n}"] = measure(
        "faiss_ivf", ivf(args.usearch_n), small, queries, exact_small, thresholds
    )
    results[f"usearch_hnsw_at_{args.usearch_n}"] = measure(
        "usearch", lambda _d: USearchVectors(data.shape[1]), small, queries, exact_small, thresholds
    )
    print(
        json.dumps(
            {
                "bench": "cache",
                "dim": int(data.shape[1]),
                "queries": args.queries,
                "nprobe": args.nprobe,
                "nlist": ivf_nlist(args.n),
                **results,
            }
        )
    )


if __name__ == "__main__":
    main()
