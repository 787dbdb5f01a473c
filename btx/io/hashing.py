"""sha256 of files, and a cache that makes hashing an unchanged file free.

`update_from_file` hashes any byte range through memory-map windows. `cached_sha256` keys a file's
digest by its stat (device, inode, size, mtime, ctime) in a small cache directory
(`BTX_HASH_CACHE`, or "off"), so provenance checks read a file again only after something wrote
to it.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import secrets
import time
from pathlib import Path

from btx.io.atomic import write_json_atomic

_CHUNK = 64 << 20  # hashing window: big enough to be fast, small next to any shard
HASH_CACHE_ENV = "BTX_HASH_CACHE"  # a directory for the hash cache, or "off"


def update_from_file(digest, path: str | os.PathLike, offset: int, nbytes: int, check=None) -> None:
    """Feed bytes [offset, offset + nbytes) of a file to `digest`, and to `check` (a callable
    taking each window's buffer) when given: windows after the first start on a page boundary, so
    elements aligned in the file stay whole in every window.

    The bytes are hashed where they lie in the page cache, through a memory map a window at a
    time, rather than copied out by read(): on a small machine those copies cost as much CPU as
    the hashing. Each window is unmapped before the next, so resident memory stays one window.
    """
    end = offset + nbytes
    with open(path, "rb", buffering=0) as f:
        if not hasattr(mmap, "MAP_SHARED"):  # pragma: no cover - not a POSIX mmap
            f.seek(offset)
            while offset < end and (chunk := f.read(min(_CHUNK, end - offset))):
                digest.update(chunk)
                if check is not None:
                    check(chunk)
                offset += len(chunk)
            return
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)  # populate: one fault per window
        while offset < end:
            start = offset - offset % mmap.ALLOCATIONGRANULARITY  # maps must start on a granule
            stop = min(end, start + _CHUNK)
            with mmap.mmap(f.fileno(), stop - start, flags=flags, prot=mmap.PROT_READ, offset=start) as m:
                with memoryview(m) as view, view[offset - start :] as part:
                    digest.update(part)
                    if check is not None:
                        check(part)
            offset = stop


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of one file."""
    h = hashlib.sha256()
    update_from_file(h, path, 0, os.stat(path).st_size)
    return h.hexdigest()


def _hash_cache_dir() -> Path | None:
    value = os.environ.get(HASH_CACHE_ENV)
    if value == "off":
        return None
    if value:
        return Path(value)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "btx" / "sha256"


def _stat_key(st: os.stat_result) -> list[int]:
    # Any write through the file system moves ctime (which no user can set back), so a file whose
    # key is unchanged has the contents it had when it was hashed.
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def cached_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, read only when it changed since btx last hashed it.

    The cache (BTX_HASH_CACHE, default ~/.cache/btx/sha256/) holds one small JSON entry per file:
    its device, inode, size, mtime and ctime, and the digest. A file is hashed again whenever any
    of them differs. BTX_HASH_CACHE=off hashes every file every time."""
    path = Path(path)
    real = os.path.realpath(path)
    before = _stat_key(os.stat(real))
    cache = _hash_cache_dir()
    entry = cache / f"{hashlib.sha256(real.encode()).hexdigest()[:40]}.json" if cache is not None else None
    if entry is not None:
        try:
            record = json.loads(entry.read_text())
            # Any entry that is not what btx writes (a list, a number, a wrong digest) is a miss.
            if isinstance(record, dict) and record.get("path") == real and record.get("stat") == before:
                digest = record.get("sha256")
                if isinstance(digest, str) and len(digest) == 64:
                    return digest
        except (OSError, ValueError, KeyError, TypeError):
            pass
    digest = sha256_file(real)
    if entry is not None and _stat_key(os.stat(real)) == before:  # not written to while hashed
        try:
            entry.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(entry, {"path": real, "stat": before, "sha256": digest}, durable=False, tidy=False)
            if secrets.randbelow(64) == 0:
                _prune_hash_cache(entry.parent)
        except OSError:
            pass  # a read-only or full cache only costs speed
    return digest


_HASH_CACHE_DAYS = 30


def _prune_hash_cache(cache: Path) -> None:
    """Now and then, so that the cache stays small: drop the entries of files that are gone, and
    those not refreshed for _HASH_CACHE_DAYS."""
    oldest = time.time() - _HASH_CACHE_DAYS * 86400
    for entry in cache.iterdir():
        try:
            if entry.stat().st_mtime < oldest or not os.path.exists(json.loads(entry.read_text())["path"]):
                entry.unlink()
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            entry.unlink(missing_ok=True)
