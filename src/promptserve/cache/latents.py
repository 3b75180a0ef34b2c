"""The latent store: one ``safetensors`` file per cache entry and level, in a cache folder.

Crash safety: a file is written to a temporary name in its final folder, fsynced, then renamed
over its final name (rename is atomic on POSIX), so a reader sees the whole file or none; in a
group of writes a new key's file is written under its final name before anything names it
(``put``). Each
file carries the SHA-256 of its tensor bytes in its metadata and a read verifies it: a corrupt
file is deleted, counted, and reported as absent, never served. Temporary files left by a crash
are removed when the store opens.

Keys come from ``promptserve.cache.index.latent_key`` (a tenant digest and a number): a key of
any other shape is refused, so no user string reaches the file system.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import load, save

KEY = re.compile(r"^[0-9a-f]{16}/[0-9]{12}-k[0-9]{2}$")
SUFFIX = ".safetensors"
TMP_SUFFIX = ".tmp"
BLOCK = 4096  # a file system block: what the smallest file, and a folder, takes on the disk
FOLDER_BYTES = BLOCK  # one namespace's folder (its directory block)


def allocated(st: os.stat_result) -> int:
    """What a file takes on the disk: its blocks, at least its size rounded up to a block (a
    file written but not yet flushed may have no blocks counted yet)."""
    return max(st.st_blocks * 512, -(-st.st_size // BLOCK) * BLOCK)


@dataclass
class StoreStats:
    writes: int = 0
    reads: int = 0
    corrupt_dropped: int = 0
    write_errors: int = 0
    read_errors: int = 0  # I/O errors on read: a miss, the file kept
    orphans_removed: int = 0


class LatentStore:
    def __init__(self, root: str | Path, clean_temporaries: bool = True) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.stats = StoreStats()
        self._deferring = False  # folders' fsyncs wait for ``sync_dirs`` (``defer_dir_syncs``)
        self._dirs: set[Path] = set()  # folders written since their last fsync, while deferring
        self._made: set[Path] = set()  # tenant folders known to exist
        if clean_temporaries:  # the owner only: a worker sharing the folder must not
            self._remove_temporaries()

    def path(self, key: str) -> Path:
        if not KEY.match(key):
            raise ValueError(f"latent key {key!r} is not of the form <16 hex>/<12 digits>-kNN")
        return self.root / f"{key}{SUFFIX}"

    def put(self, key: str, latent: np.ndarray) -> int:
        """Write atomically; returns the bytes written.

        In a group (``defer_dir_syncs``) a new key's file is written under its final name, with
        no temporary, fsync or rename: nobody reads it before its entry is indexed, which is
        after the write, and a process killed part-way leaves a file no manifest row names,
        which the next open removes as an orphan (its checksum would refuse it anyway)."""
        final = self.path(key)
        try:
            return self._put(final, key, latent)
        except FileNotFoundError:  # its folder was removed (its namespace emptied) meanwhile
            self._made.discard(final.parent)
            return self._put(final, key, latent)

    def _put(self, final: Path, key: str, latent: np.ndarray) -> int:
        self._folder(final.parent)
        data = np.ascontiguousarray(latent)
        tmp = final.with_name(f"{final.name}.{os.getpid()}{TMP_SUFFIX}")
        try:
            raw = save({"latent": data}, metadata={"sha256": _digest(data)})
            if self._deferring and _write_new(final, raw):
                tmp = final  # what to remove should anything below fail
            else:
                with open(tmp, "wb") as fh:
                    fh.write(raw)
                    if not self._deferring:
                        fh.flush()
                        os.fsync(fh.fileno())
                os.replace(tmp, final)
        except Exception as exc:  # safetensors reports its own errors as its own types
            tmp.unlink(missing_ok=True)
            self.stats.write_errors += 1
            if isinstance(exc, OSError):
                raise
            raise OSError(f"writing latent {key}: {exc}") from exc
        self._sync_dir(final.parent)
        self.stats.writes += 1
        return allocated(final.stat())

    def _folder(self, folder: Path) -> None:
        """Make a namespace's folder once (``remove_folder`` forgets it)."""
        if folder not in self._made:
            folder.mkdir(parents=True, exist_ok=True)
            self._made.add(folder)

    def remove_folder(self, namespace: str) -> bool:
        """Remove a namespace's folder once nothing is in it (its last entry left); False
        where it is not empty (a file another process is writing) or already gone."""
        folder = self.root / namespace
        self._made.discard(folder)
        self._dirs.discard(folder)
        try:
            folder.rmdir()
        except OSError:
            return False
        return True

    def remove_empty_folders(self) -> int:
        """Folders with no file left (a namespace emptied before a crash): removed at open."""
        gone = 0
        for folder in self.root.iterdir():
            if folder.is_dir() and not any(folder.iterdir()):
                gone += self.remove_folder(folder.name)
        return gone

    def link(self, source: str, key: str) -> int:
        """``key`` names the same file as ``source`` (a hard link; a copy where the file system
        has none): returns the bytes it adds to the disk (0 for a link). FileNotFoundError when
        ``source`` is gone."""
        src, final = self.path(source), self.path(key)
        self._folder(final.parent)
        try:  # a hard link is made whole under its name: no temporary for a new key
            os.link(src, final)
            self._sync_dir(final.parent)
            return 0
        except FileNotFoundError:
            if not src.exists():
                raise
        except OSError:
            pass  # the name is taken, or no hard links here: the temporary below
        tmp = final.with_name(f"{final.name}.{os.getpid()}{TMP_SUFFIX}")
        tmp.unlink(missing_ok=True)
        try:
            added = 0
            try:
                os.link(src, tmp)
            except FileNotFoundError:
                raise
            except OSError:  # no hard links here (another device, a FAT mount): copy
                shutil.copyfile(src, tmp)
                with open(tmp, "rb") as fh:
                    os.fsync(fh.fileno())
                added = allocated(tmp.stat())
            os.replace(tmp, final)
        except OSError:
            tmp.unlink(missing_ok=True)
            raise
        self._sync_dir(final.parent)
        return added

    def defer_dir_syncs(self, on: bool) -> None:
        """While on, a folder's fsync (which makes a rename durable) waits for ``sync_dirs``:
        one per folder for a group of writes, not one per file, and a file's content is not
        fsynced before its rename. A killed process loses nothing (the page cache holds the
        writes); after a power loss a file may be short or garbled under its final name, and
        its checksum fails when read: it is dropped with its entry, never served. That is the
        durability window of a group: its entries may be lost, none is served torn. Folders
        written meanwhile wait for ``sync_dirs`` even after it is turned off."""
        self._deferring = on

    def sync_dirs(self) -> None:
        """fsync every folder written since its last one."""
        for folder in sorted(self._dirs):
            _fsync_dir(folder)
        self._dirs.clear()

    def _sync_dir(self, folder: Path) -> None:
        if self._deferring:
            self._dirs.add(folder)
        else:
            _fsync_dir(folder)

    def delete_freeing(self, key: str) -> int:
        """Delete ``key``'s file: the bytes that frees on the disk (0 while another key links
        to the same data, or when it is gone)."""
        path = self.path(key)
        try:
            st = path.stat()
        except FileNotFoundError:
            return 0
        path.unlink(missing_ok=True)
        return allocated(st) if st.st_nlink == 1 else 0

    def get(self, key: str) -> np.ndarray | None:
        """The latent, or None when absent, unreadable or corrupt.

        Only a file that reads but fails its format or checksum is corrupt: it is dropped and
        counted. An I/O error (too many open files, a permission, a flaky mount) says nothing
        about the file, so it is a miss, counted, and the file stays."""
        path = self.path(key)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError:
            self.stats.read_errors += 1
            return None
        latent, expected = _parse(raw)
        if latent is None or expected != _digest(latent):
            self.stats.corrupt_dropped += 1
            path.unlink(missing_ok=True)
            return None
        self.stats.reads += 1
        return latent

    def delete(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)

    def keys(self) -> set[str]:
        out = set()
        for path in self.root.glob(f"*/*{SUFFIX}"):
            key = f"{path.parent.name}/{path.name[: -len(SUFFIX)]}"
            if KEY.match(key):
                out.add(key)
        return out

    def bytes_used(self) -> int:
        """The bytes the files and their folders take on the disk (linked data counted once)."""
        folders = sum(1 for f in self.root.iterdir() if f.is_dir())
        return disk_bytes(self.root.glob(f"*/*{SUFFIX}")) + FOLDER_BYTES * folders

    def remove_orphans(self, known: set[str]) -> int:
        """Delete files no index entry names (left by a crash between file and manifest)."""
        orphans = self.keys() - known
        for key in orphans:
            self.delete(key)
        self.stats.orphans_removed += len(orphans)
        return len(orphans)

    def _remove_temporaries(self) -> None:
        for tmp in self.root.glob(f"*/*{TMP_SUFFIX}"):
            tmp.unlink(missing_ok=True)


def _parse(raw: bytes) -> tuple[np.ndarray | None, str | None]:
    """(latent, its recorded SHA-256) from a file's bytes; (None, None) when they are not a
    well-formed latent file (truncated or garbled: safetensors raises several kinds)."""
    try:
        size = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8 : 8 + size])
        return load(raw)["latent"], (header.get("__metadata__") or {}).get("sha256")
    except Exception:
        return None, None


def _digest(array: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(str(array.dtype).encode())
    h.update(str(array.shape).encode())
    h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()


def _write_new(path: Path, raw: bytes) -> bool:
    """Write ``raw`` to a file that must not exist yet; False (nothing written) if it does."""
    try:
        fh = open(path, "xb")  # noqa: SIM115 - closed below, removed by the caller on failure
    except FileExistsError:
        return False
    with fh:
        fh.write(raw)
    return True


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def disk_bytes(paths: Iterable[Path]) -> int:
    """The bytes ``paths`` take on the disk (their blocks): hard links to one file count once; a path gone
    since it was listed counts nothing."""
    seen: dict[tuple[int, int], int] = {}
    for path in paths:
        try:
            st = path.stat()
        except FileNotFoundError:
            continue
        seen[(st.st_dev, st.st_ino)] = allocated(st)
    return sum(seen.values())
