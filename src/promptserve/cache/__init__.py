"""The approximate cache: embedders, similarity thresholds, vector search, the entry index."""

from promptserve.cache.embed import DiskCachedEmbedder, Embedder, HashingEmbedder, make_embedder
from promptserve.cache.index import CacheEntry, CacheIndex, InsertResult, Match, latent_key
from promptserve.cache.thresholds import Thresholds, kopt_mix, load_thresholds, shipped_thresholds

__all__ = [
    "CacheEntry",
    "CacheIndex",
    "DiskCachedEmbedder",
    "Embedder",
    "HashingEmbedder",
    "InsertResult",
    "Match",
    "Thresholds",
    "kopt_mix",
    "latent_key",
    "load_thresholds",
    "make_embedder",
    "shipped_thresholds",
]
