"""Locks: one process per job or stage output.

`output_lock` holds `.<name>.lock` next to the output (flock) from before the "exists / --force"
decision until the output is in place. A second process gets one line naming the holder's pid and
host; the kernel drops the lock of a process that dies, so a dead holder's lock is simply taken
over. On file systems without flock an exclusive lock file stands in.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from btx.errors import BtxError
from btx.io.atomic import pid_alive

_held_locks: dict[str, list] = {}  # lock file -> [fd, depth]: a process may nest its own locks
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


def lock_path(path: str | os.PathLike) -> Path:
    path = Path(path).absolute()
    return path.parent / f".{path.name}.lock"


def _holder_record() -> bytes:
    return (
        json.dumps(
            {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                "command": " ".join([_program(), *sys.argv[1:]])[:300],
            }
        )
        + "\n"
    ).encode()


def _program() -> str:
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python"
    return "btx" if name in ("__main__.py", "btx", "-m") else name


def _describe_holder(raw: bytes) -> str:
    try:
        h = json.loads(raw.decode())
        return f"pid {h['pid']} on {h['host']} (since {h['since']}: {h['command']})"
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return "another process"


def _locked_by(target: Path, what: str, holder: str, lock_file: Path) -> BtxError:
    return BtxError(f"{target}: {what} is in use by {holder}; wait for it to finish or stop it (lock {lock_file})")


def _take_flock(lock_file: Path, target: Path, what: str) -> int | None:
    """The descriptor holding the lock, or None where the file system has no flock."""
    while True:
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe_holder(os.pread(fd, 4096, 0))
            os.close(fd)
            raise _locked_by(target, what, holder, lock_file) from None
        except OSError as e:
            os.close(fd)
            if e.errno in _NO_FLOCK:
                return None
            raise
        # The holder before us removes the file when it lets go; a lock on that removed file
        # excludes nobody, so take it again on the file that is there now.
        try:
            same = os.stat(lock_file).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def _take_exclusive_file(lock_file: Path, target: Path, what: str) -> int:
    """Without flock (some network file systems): create the lock file exclusively; a lock of a
    process of this host that no longer runs is stale and taken over."""
    while True:
        try:
            return os.open(lock_file, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            try:
                raw = lock_file.read_bytes()
                holder = json.loads(raw.decode())
            except (OSError, ValueError, UnicodeDecodeError):
                raw, holder = b"", {}
            if (
                holder.get("host") == socket.gethostname()
                and isinstance(holder.get("pid"), int)
                and not pid_alive(holder["pid"])
            ):
                lock_file.unlink(missing_ok=True)
                continue
            raise _locked_by(
                target, what, _describe_holder(raw) + "; if that process is gone, delete the lock file", lock_file
            ) from None


@contextmanager
def output_lock(path: str | os.PathLike, what: str = "this output") -> Iterator[None]:
    """Hold the lock of `path` (a job's or a stage's output) for the body.

    A second process gets BtxError("<path>: <what> is in use by pid N on HOST (since ..: cmd)").
    The lock is an flock on `.<name>.lock` next to `path`, released by the kernel when the holder
    dies, so a stale lock never blocks anyone. The same process may nest locks of one path."""
    target = Path(path).absolute()
    lock_file = lock_path(target)
    key = str(lock_file)
    if key in _held_locks:
        _held_locks[key][1] += 1
        try:
            yield
        finally:
            _held_locks[key][1] -= 1
        return
    created = [d for d in (lock_file.parent, *lock_file.parent.parents) if not d.exists()]
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = _take_flock(lock_file, target, what)
        if fd is None:
            fd = _take_exclusive_file(lock_file, target, what)
    except BaseException:
        _remove_empty(created)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, _holder_record(), 0)
    _held_locks[key] = [fd, 1]
    try:
        yield
    finally:
        del _held_locks[key]
        lock_file.unlink(missing_ok=True)  # while still holding it: see _take_flock
        os.close(fd)
        _remove_empty(created)  # a job refused before it wrote anything leaves no directory


def _remove_empty(directories: list[Path]) -> None:
    for directory in directories:  # deepest first
        try:
            directory.rmdir()
        except OSError:
            break
