"""Atomic writes: a file or a directory appears complete or not at all.

Files are written to a temporary sibling, fsynced and renamed into place (then the directory is
fsynced). `atomic_dir` builds a whole output directory in a hidden sibling and renames it in at
the end; leftovers of a killed writer are removed the next time, unless their writer still runs.
JSON is strict: NaN and infinities are refused rather than written as non-standard tokens.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from btx.errors import BtxError


def finite_json(obj):
    """`obj` with every non-finite float replaced by None, so that it dumps as strict JSON
    (json.dumps would write NaN / Infinity, which no JSON parser but Python's accepts)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj


def dumps_json(obj, **kwargs) -> str:
    """json.dumps of `obj` as strict JSON (non-finite numbers become null)."""
    return json.dumps(finite_json(obj), allow_nan=False, **kwargs)


def name_written_path(e: BaseException, path: str | os.PathLike) -> None:
    """Give an OSError raised while writing output `path` that path, where the error names no file
    (a failed write() names none) or only a temporary of ours: a full-disk line then names the
    output and its disk (btx.io.disk.disk_error_message), not `?` and the current directory's."""
    if isinstance(e, OSError) and (e.filename is None or is_temporary(e.filename)):
        e.filename = str(path)


def is_temporary(path: str | os.PathLike) -> bool:
    """Whether `path` lies in (or is) one of btx's hidden `.<name>.tmp-<pid>...` temporaries."""
    return any(part.startswith(".") and ".tmp-" in part for part in Path(path).parts)


def temporary_sibling(path: str | os.PathLike) -> Path:
    """`.<name>.tmp-<pid>-<random>` next to `path`: unique, and `remove_stale_temporaries` can tell
    from its name whether its writer still runs."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


def write_bytes_atomic(path: str | os.PathLike, data: bytes, *, durable: bool = True, tidy: bool = True) -> None:
    """Write into a temporary sibling (mode 0666 less the umask, like any new file), fsync it,
    rename it over `path`, fsync the directory: a killed process leaves the old file or the new one.
    `tidy` first removes temporaries of `path` that killed writers left (a directory listing)."""
    path = Path(path)
    if tidy:
        remove_stale_temporaries(path)
    tmp = temporary_sibling(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        name_written_path(e, path)
        raise
    if durable:
        fsync_dir(path.parent)


def fsync_dir(directory: str | os.PathLike) -> None:
    """Make a directory's entries (creations, renames) durable. A platform or file system that
    cannot open or fsync a directory is not an error: there is nothing more to do there."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json_atomic(path: str | os.PathLike, data: dict, *, durable: bool = True, tidy: bool = True) -> None:
    """Write strict JSON to a temporary sibling, fsync it, rename it over `path`, fsync the directory."""
    write_bytes_atomic(path, (dumps_json(data, indent=2, sort_keys=True) + "\n").encode(), durable=durable, tidy=tidy)


def fsync_tree(directory: str | os.PathLike) -> None:
    """fsync every file and directory under `directory` (deepest first), then `directory` itself."""
    for root, _dirs, files in os.walk(directory, topdown=False):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(root)


def pid_alive(pid: int) -> bool:
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
        kind, _, rest = sibling.name[len(prefix) :].partition("-")
        pid = rest.split("-", 1)[0]
        if (
            sibling.name.startswith(prefix)
            and kind in ("tmp", "old")
            and pid.isdigit()
            and int(pid) != os.getpid()
            and not pid_alive(int(pid))
        ):
            remove_path(sibling)


def remove_path(path: Path) -> None:
    """Remove a file, a directory tree, or a symbolic link itself (never what it points to: a
    link a user made from a run directory to storage elsewhere leaves that storage as it was)."""
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


@contextmanager
def atomic_dir(path: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Build a directory in a temporary sibling and move it into place only when complete.

        with atomic_dir("checkpoints/x/merged", force=args.force) as tmp:
            ...write files into tmp...

    The body writes into `.<name>.tmp-<pid>` next to `path`. On success every file and directory
    is fsynced and the temporary is renamed to `path`; on any exception (KeyboardInterrupt too)
    it is deleted. A killed process leaves at most a hidden `.tmp-` sibling, never something that
    looks finished. Without `force`, an existing non-empty `path` is an error raised before
    anything is created, and again at the rename should one have appeared meanwhile (a writer
    that must not race another holds `output_lock` around this); with `force`, the old output
    stays in place until the final rename.
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
            if not force and (not path.is_dir() or any(path.iterdir())):  # appeared meanwhile
                raise BtxError(
                    f"{path}: appeared while this output was being written (another process?); "
                    "pass --force to replace it"
                )
            # POSIX cannot rename a directory over a non-empty one, so the old output is moved
            # aside first; between the two renames `path` is absent, which never looks finished.
            old = path.parent / f".{path.name}.old-{os.getpid()}"
            os.rename(path, old)
            try:
                os.rename(tmp, path)
            except BaseException:
                os.rename(old, path)  # put the old output back rather than lose it
                raise
            remove_path(old)
        else:
            os.rename(tmp, path)
        fsync_dir(path.parent)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        name_written_path(e, path)
        raise
