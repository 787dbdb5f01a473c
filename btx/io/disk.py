"""Disk errors as one line: a full disk, a quota, a read-only or forbidden directory names the
directory, what needed the space, and how much is free.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from btx.errors import BtxError

DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS}


def free_bytes(path: str | os.PathLike) -> int:
    """Bytes available to this user on the file system that holds `path` (or its nearest parent)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    st = os.statvfs(p)
    return st.f_bavail * st.f_frsize


def written_path(e: OSError, where: str | os.PathLike | None = None) -> str:
    """The one rule for the path a disk error names: the output being written. A copy's
    destination (filename2) before its source; a file the error names only when it lies inside
    `where` (the output the caller writes), else `where` itself; a path inside one of btx's hidden
    temporaries as the output it becomes. The free space quoted is that path's disk."""
    named = e.filename2 or e.filename
    if not isinstance(named, (str, os.PathLike)):  # a descriptor number, or nothing
        named = None
    if named is not None and where is not None and e.filename2 is None:
        inside = Path(os.path.abspath(named)).is_relative_to(Path(os.path.abspath(where)))
        named = named if inside else None
    path = named if named is not None else where
    if path is None:
        return "?"
    return str(Path(*(_public(part) for part in Path(os.fspath(path)).parts)))


def _public(part: str) -> str:
    """`.merged.tmp-123-ab12` -> `merged`: the name a hidden temporary will have."""
    if part.startswith(".") and ".tmp-" in part:
        return part[1:].split(".tmp-")[0]
    return part


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n:,} bytes"


def disk_error_message(
    e: OSError,
    where: str | os.PathLike | None = None,
    needed: int | None = None,
    what: str = "the output",
    approx: str = "about",
) -> str | None:
    """One line for an OSError of a full, read-only or forbidden destination; None for others."""
    if e.errno not in DISK_ERRNOS:
        return None
    path = written_path(e, where)
    need = f"; {what} needs {approx} {_gb(needed)}" if needed else ""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        reason = "no space left on the device" if e.errno == errno.ENOSPC else "disk quota exceeded"
        try:
            free = f", {_gb(free_bytes(path))} free there"
        except OSError:
            free = ""
        return (
            f"{path}: {reason} while writing {what}{need}{free}; free some space or write elsewhere "
            "(nothing half-written was left; re-run to continue)"
        )
    reason = "read-only file system" if e.errno == errno.EROFS else "permission denied"
    return f"{path}: {reason} (writing {what}); choose a writable place for it (nothing half-written was left)"


@contextmanager
def disk_errors(
    where: str | os.PathLike, needed: int | None = None, what: str = "the output", approx: str = "about"
) -> Iterator[None]:
    """Turn ENOSPC / EDQUOT / EACCES / EPERM / EROFS raised by the body into one BtxError line."""
    try:
        yield
    except OSError as e:
        message = disk_error_message(e, where, needed, what, approx)
        if message is None:
            raise
        raise BtxError(message) from None
    except RuntimeError as e:
        # torch.save reports a failed write as a RuntimeError ("unexpected pos ..."), losing the errno;
        # a destination without room for what was written is the cause to name then.
        if needed is None or free_bytes(where) >= needed:
            raise
        full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(where))
        raise BtxError(
            f"{disk_error_message(full, where, needed, what, approx)} ({' '.join(str(e).split())[:120]})"
        ) from None


def ensure_free_space(directory: str | os.PathLike, needed: int, what: str) -> None:
    """BtxError before anything is written when `directory`'s file system cannot take `needed` bytes."""
    free = free_bytes(directory)
    if free < needed:
        raise BtxError(
            f"{directory}: {what} needs about {_gb(needed)}, but only {_gb(free)} are free there; "
            "free some space or write elsewhere"
        )
