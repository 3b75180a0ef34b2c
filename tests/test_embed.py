import numpy as np
import pytest

from promptserve.cache.embed import DiskCachedEmbedder, HashingEmbedder, make_embedder, row_key
from promptserve.errors import InputError


class CountingEmbedder:
    name = "counting"
    dim = 8

    def __init__(self):
        self.seen: list[str] = []

    def embed(self, prompts):
        self.seen.extend(prompts)
        return HashingEmbedder(8).embed(prompts)


def test_hashing_embedder_is_normalised_deterministic_and_near_duplicate_aware():
    e = HashingEmbedder()
    v = e.embed(["a red fox in snow", "a red fox in the snow", "spreadsheet of taxes", ""])
    assert v.dtype == np.float32 and v.shape == (4, 256)
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-6)
    assert np.array_equal(
        v, e.embed(["a red fox in snow", "a red fox in the snow", "spreadsheet of taxes", ""])
    )
    assert v[0] @ v[1] > 0.8 > v[0] @ v[2]


def test_disk_cache_embeds_each_prompt_once_and_survives_reopen(tmp_path):
    inner = CountingEmbedder()
    cached = DiskCachedEmbedder(inner, tmp_path / "e.sqlite")
    first = cached.embed(["a", "b", "a"])
    again = cached.embed(["b", "c"])
    assert inner.seen == ["a", "b", "c"]
    assert np.array_equal(first[1], again[0]) and np.array_equal(first[0], first[2])
    cached.close()
    inner2 = CountingEmbedder()
    reopened = DiskCachedEmbedder(inner2, tmp_path / "e.sqlite")
    assert np.array_equal(reopened.embed(["a"])[0], first[0])
    assert inner2.seen == []


def test_disk_cache_keeps_each_namespace_apart(tmp_path):
    """One tenant's prompt is embedded afresh for another: a shared row would answer the second
    tenant sooner, which times whether anyone sent the prompt (issue 35)."""
    inner = CountingEmbedder()
    cached = DiskCachedEmbedder(inner, tmp_path / "e.sqlite")
    a = cached.embed(["a lighthouse"], ["tenant-a"])
    assert inner.seen == ["a lighthouse"]
    b = cached.embed(["a lighthouse", "a lighthouse"], ["tenant-b", "tenant-a"])
    assert inner.seen == ["a lighthouse", "a lighthouse"]  # B's computed, A's kept
    assert np.array_equal(a[0], b[0]) and np.array_equal(b[0], b[1])
    cached.embed(["a lighthouse"])  # no namespace (the simulator's re-runs): a key of its own
    assert len(inner.seen) == 3
    # the length prefix keeps ("ab", "c...") and ("a", "bc...") apart
    assert row_key("cd", "ab") != row_key("bcd", "a")
    with pytest.raises(ValueError, match="one namespace per prompt"):
        cached.embed(["x", "y"], ["tenant-a"])


def test_unknown_embedder():
    with pytest.raises(InputError, match="not one of"):
        make_embedder("bert")


@pytest.mark.slow
def test_minilm_is_real_and_offline():
    e = make_embedder("minilm")
    v = e.embed(
        [
            "a photo of a cat on a sofa",
            "a picture of a cat sitting on a couch",
            "quarterly tax report",
        ]
    )
    assert v.shape == (3, 384)
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert v[0] @ v[1] > 0.7 and v[0] @ v[2] < 0.3
