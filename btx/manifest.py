"""Atomic directory writes, stage manifests (DONE.json) and the hashing they need.

A stage is finished exactly when its directory holds a DONE.json. It is written last, atomically
(temporary file, fsync, rename, fsync of the directory), so a killed process leaves either no
manifest or a complete one, never a half-written one.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from btx.errors import BtxError

DONE_NAME = "DONE.json"
_CHUNK = 64 << 20  # hashing window: big enough to be fast, small next to any shard


def update_from_file(digest, path: str | os.PathLike, offset: int, nbytes: int) -> None:
    """Feed bytes [offset, offset + nbytes) of a file to `digest`.

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
                offset += len(chunk)
            return
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)  # populate: one fault per window
        while offset < end:
            start = offset - offset % mmap.ALLOCATIONGRANULARITY  # maps must start on a granule
            stop = min(end, start + _CHUNK)
            with mmap.mmap(f.fileno(), stop - start, flags=flags, prot=mmap.PROT_READ, offset=start) as m:
                with memoryview(m) as view, view[offset - start :] as part:
                    digest.update(part)
            offset = stop


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of one file."""
    h = hashlib.sha256()
    update_from_file(h, path, 0, os.stat(path).st_size)
    return h.hexdigest()


def hash_dir(directory: str | os.PathLike, exclude: tuple[str, ...] = (DONE_NAME,)) -> dict[str, str]:
    """sha256 of every file under `directory`, keyed by relative POSIX path, sorted.

    Hidden temporaries (names starting with '.') and the manifest itself are left out, since they
    are not part of what a stage produced.
    """
    root = Path(directory)
    out: dict[str, str] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if not path.is_file() or rel.as_posix() in exclude or any(p.startswith(".") for p in rel.parts):
            continue
        out[rel.as_posix()] = sha256_file(path)
    return out


def fsync_dir(directory: str | os.PathLike) -> None:
    """Make a directory's entries (creations, renames) durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: str | os.PathLike, data: dict) -> None:
    """Write JSON to a temporary sibling, fsync it, rename it over `path`, fsync the directory."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_done(directory: str | os.PathLike, info: dict) -> Path:
    """Mark `directory` finished: write its DONE.json (call this after every output is complete)."""
    path = Path(directory) / DONE_NAME
    write_json_atomic(path, info)
    return path


def read_done(directory: str | os.PathLike) -> dict | None:
    """The stage manifest of `directory`, or None when the stage is not finished."""
    path = Path(directory) / DONE_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise BtxError(f"{path}: unreadable stage manifest ({e}); delete it to redo the stage") from None
    if not isinstance(data, dict):
        raise BtxError(f"{path}: a stage manifest must be a JSON object")
    return data


def is_done(directory: str | os.PathLike) -> bool:
    return (Path(directory) / DONE_NAME).is_file()


def fsync_tree(directory: str | os.PathLike) -> None:
    """fsync every file and directory under `directory` (deepest first), then `directory` itself."""
    for root, dirs, files in os.walk(directory, topdown=False):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(root)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, but another user's
        return True
    return True


def remove_stale_temporaries(path: Path) -> None:
    """Delete `.<name>.tmp-<pid>` / `.old-<pid>` siblings of `path` whose writer process is gone
    (killed mid-write); a temporary of a live process, e.g. a concurrent writer, is left alone.
    Temporaries can be as large as the output (tens of GB for a merge), so they are not left to pile up."""
    prefix = f".{path.name}."
    if not path.parent.is_dir():
        return
    for sibling in path.parent.iterdir():
        kind, _, pid = sibling.name[len(prefix):].partition("-")
        if sibling.name.startswith(prefix) and kind in ("tmp", "old") and pid.isdigit() \
                and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            shutil.rmtree(sibling, ignore_errors=True) if sibling.is_dir() else sibling.unlink(missing_ok=True)


@contextmanager
def atomic_dir(path: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Build a directory in a temporary sibling and move it into place only when complete.

        with atomic_dir("checkpoints/x/merged", force=args.force) as tmp:
            ...write files into tmp...

    The body writes into `.<name>.tmp-<pid>` next to `path`. On success every file and directory
    is fsynced and the temporary is renamed to `path`; on any exception (KeyboardInterrupt too)
    it is deleted. A killed process leaves at most a hidden `.tmp-` sibling, never something that
    looks finished. Without `force`, an existing non-empty `path` is an error raised before
    anything is created; with `force`, the old output stays in place until the final rename.
    """
    path = Path(path)
    if not force and path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise BtxError(f"{path}: already exists and is not empty; pass --force to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    if tmp.exists():  # left by an earlier process that had our pid and was killed
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
        if path.exists():
            # POSIX cannot rename a directory over a non-empty one, so the old output is moved
            # aside first; between the two renames `path` is absent, which never looks finished.
            old = path.parent / f".{path.name}.old-{os.getpid()}"
            os.rename(path, old)
            try:
                os.rename(tmp, path)
            except BaseException:
                os.rename(old, path)  # put the old output back rather than lose it
                raise
            if old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink(missing_ok=True)
        else:
            os.rename(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
