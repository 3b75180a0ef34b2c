import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from promptserve.cache.index import latent_key
from promptserve.cache.latents import FOLDER_BYTES, LatentStore


def test_put_get_round_trip_and_bytes(tmp_path):
    store = LatentStore(tmp_path)
    x = np.random.default_rng(0).standard_normal((4, 8, 8)).astype(np.float16)
    key = latent_key("alice", 3, 10)
    assert store.put(key, x) > x.nbytes
    assert np.array_equal(store.get(key), x)
    assert store.keys() == {key}
    assert store.get(latent_key("alice", 4, 10)) is None


def test_corrupt_file_is_never_served(tmp_path):
    store = LatentStore(tmp_path)
    key = latent_key("bob", 1, 5)
    store.put(key, np.ones((4, 8, 8), np.float32))
    path = store.path(key)
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0xFF  # flip bits in the tensor bytes
    path.write_bytes(bytes(raw))
    assert store.get(key) is None
    assert store.stats.corrupt_dropped == 1 and not path.exists()
    store.put(key, np.ones((4, 8, 8), np.float32))
    path.write_bytes(path.read_bytes()[:40])  # truncated
    assert store.get(key) is None and store.stats.corrupt_dropped == 2


@pytest.mark.parametrize(
    "key", ["../etc/passwd", "alice/1-k05", "0123456789abcdef/../../x-k05", ""]
)
def test_keys_of_other_shapes_are_refused(tmp_path, key):
    with pytest.raises(ValueError, match="latent key"):
        LatentStore(tmp_path).put(key, np.zeros(3))


def test_orphans_and_temporaries_are_cleaned(tmp_path):
    store = LatentStore(tmp_path)
    keep, orphan = latent_key("t", 1, 5), latent_key("t", 2, 5)
    store.put(keep, np.zeros(4))
    store.put(orphan, np.zeros(4))
    (store.path(keep).parent / "x.safetensors.123.tmp").write_bytes(b"half")
    reopened = LatentStore(tmp_path)
    assert not list(tmp_path.glob("*/*.tmp"))
    assert reopened.remove_orphans({keep}) == 1
    assert reopened.keys() == {keep}


WRITER = """
import sys, numpy as np
from promptserve.cache.index import latent_key
from promptserve.cache.latents import LatentStore
store = LatentStore(sys.argv[1])
rng = np.random.default_rng(0)
i = 0
while True:
    store.put(latent_key("t", i, 5), rng.standard_normal((4, 64, 64)).astype(np.float32))
    print(i, flush=True)
    i += 1
"""


def test_a_writer_killed_mid_stream_leaves_no_torn_entry(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    written = 0
    deadline = time.monotonic() + 60
    while written < 30 and time.monotonic() < deadline:
        line = proc.stdout.readline()
        written = int(line) + 1 if line else written
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert written >= 30
    store = LatentStore(tmp_path)
    keys = store.keys()
    assert len(keys) >= written  # every acknowledged write is there
    for key in keys:
        latent = store.get(key)
        assert latent is not None and latent.shape == (4, 64, 64)
    assert store.stats.corrupt_dropped == 0
    assert not list(tmp_path.glob("*/*.tmp"))


def test_a_write_error_of_any_kind_is_an_oserror_and_leaves_no_temporary(tmp_path, monkeypatch):
    import promptserve.cache.latents as latents

    def full_disk(*_args, **_kwargs):
        raise RuntimeError("I/O error: No space left on device (os error 28)")  # as safetensors

    store = latents.LatentStore(tmp_path)
    monkeypatch.setattr(latents, "save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        store.put("0123456789abcdef/000000000001-k02", np.zeros((2, 2), np.float32))
    assert list(tmp_path.rglob("*")) == [tmp_path / "0123456789abcdef"]
    assert store.stats.write_errors == 1


def test_an_io_error_on_read_is_a_miss_and_keeps_the_file(tmp_path):
    # a real EMFILE: the child uses up its open files, then reads
    code = f"""
import os, resource, sys
import numpy as np
from promptserve.cache.index import latent_key
from promptserve.cache.latents import LatentStore
store = LatentStore({str(tmp_path)!r})
key = latent_key("carol", 3, 5)
store.put(key, np.ones((4, 8, 8), np.float32))
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
held = []
while True:
    try:
        held.append(os.open("/dev/null", os.O_RDONLY))
    except OSError:
        break
got = store.get(key)
for fd in held:
    os.close(fd)
resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
print(got is None, store.stats.read_errors, store.stats.corrupt_dropped, store.path(key).exists())
print(np.array_equal(store.get(key), np.ones((4, 8, 8), np.float32)))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    first, second = out.stdout.split("\n")[:2]
    assert first == "True 1 0 True"  # a miss, counted, nothing dropped, the file kept
    assert second == "True"  # and it serves once the descriptors are back


@pytest.mark.parametrize("hard_links", [True, False])
def test_a_link_outlives_its_source_and_copies_where_links_fail(tmp_path, monkeypatch, hard_links):
    store = LatentStore(tmp_path)
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    source, twin = latent_key("t", 1, 5), latent_key("t", 2, 5)
    size = store.put(source, x)
    if not hard_links:  # a file system without them (another device, FAT): a copy

        def no_links(src, dst):
            raise OSError(18, "Invalid cross-device link")

        monkeypatch.setattr(os, "link", no_links)
    assert store.link(source, twin) == (0 if hard_links else size)  # the bytes it adds
    assert (os.stat(store.path(twin)).st_nlink == 2) is hard_links
    folder = FOLDER_BYTES  # the tenant's folder
    assert store.bytes_used() == folder + (size if hard_links else 2 * size)  # linked data once
    assert store.delete_freeing(source) == (0 if hard_links else size)
    assert np.array_equal(store.get(twin), x) and store.keys() == {twin}
    assert store.delete_freeing(twin) == size and store.delete_freeing(twin) == 0
    store.put(twin, x)
    with pytest.raises(FileNotFoundError):  # a source gone is said, never papered over
        store.link(source, latent_key("t", 3, 5))
    assert list(tmp_path.rglob("*.tmp")) == []
