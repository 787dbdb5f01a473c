"""Atomic directory writes, stage manifests (DONE.json), content identities, locks, disk errors.

A stage is finished exactly when its directory holds a DONE.json. It is written last, atomically
(temporary file, fsync, rename, fsync of the directory), so a killed process leaves either no
manifest or a complete one, never a half-written one.

Provenance (docs/PROVENANCE.md): a DONE.json lists the sha256 of every file the stage wrote
("outputs") and the content identity of every input it consumed ("input_identities": {label:
{"path", "sha256": {file: digest}}}). `damaged_outputs` compares a finished stage with its files,
`changed_inputs` compares recorded input identities with what is on disk now. Hashes of files that
did not change since they were last hashed come from a stat-keyed cache (`cached_sha256`), so these
checks read a file again only after something wrote to it.

Locks (`output_lock`): one per job or stage output, `.<name>.lock` next to it, held (flock) from
before the "exists / --force" decision until the output is in place. A second process gets one
line naming the holder's pid and host; the kernel drops the lock of a process that dies, so a dead
holder's lock is simply taken over.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import math
import mmap
import os
import secrets
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from btx.errors import BtxError

DONE_NAME = "DONE.json"
_CHUNK = 64 << 20  # hashing window: big enough to be fast, small next to any shard
HASH_CACHE_ENV = "BTX_HASH_CACHE"  # a directory for the hash cache, or "off"


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


# --------------------------------------------------------------------------------------------
# Strict JSON
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Content identities
# --------------------------------------------------------------------------------------------


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
            if record.get("path") == real and record.get("stat") == before:
                return record["sha256"]
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
        except (OSError, ValueError, KeyError, TypeError):
            entry.unlink(missing_ok=True)


# Files of a checkpoint directory that make up the model (what an HF loader reads).
_CHECKPOINT_NAMES = ("config.json", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json",
                     "special_tokens_map.json", "tokenizer.model", "generation_config.json", "btx_tokenizer.json")


def checkpoint_files(directory: str | os.PathLike) -> list[str]:
    """Names of the files of a checkpoint directory that define the model: config, weights,
    index, tokenizer and generation files (top level only; other files there do not count)."""
    root = Path(directory)
    return sorted(p.name for p in root.iterdir()
                  if p.is_file() and (p.name in _CHECKPOINT_NAMES or p.name.endswith(".safetensors")))


def identity(path: str | os.PathLike) -> dict:
    """The content identity of an input: {"path", "sha256": {file: digest}}. A directory is a
    checkpoint (its `checkpoint_files`); a file is itself (a token shard's .bin, say)."""
    path = Path(path).absolute()
    if path.is_dir():
        names = checkpoint_files(path)
        if not names:
            raise BtxError(f"{path}: no checkpoint files (config.json, *.safetensors) to identify")
        return {"path": str(path), "sha256": {name: cached_sha256(path / name) for name in names}}
    if not path.is_file():
        raise BtxError(f"{path}: not found")
    return {"path": str(path), "sha256": {path.name: cached_sha256(path)}}


def relative_identities(identities: dict | None, manifest_dir: str | os.PathLike) -> dict | None:
    """`identities` with each input's path also relative to the directory of the DONE.json that
    records them ("rel"), so that a run directory copied or moved elsewhere checks its own files."""
    if identities is None:
        return None
    base = os.path.realpath(manifest_dir)  # `..` in a path is resolved physically, after symlinks
    return {label: {**record, "rel": os.path.relpath(os.path.realpath(record["path"]), base)}
            for label, record in identities.items()}


def _recorded_path(record: dict, base: Path | None) -> Path:
    if base is not None and isinstance(record.get("rel"), str):
        candidate = (base / record["rel"]).resolve()
        if candidate.exists():
            return candidate
    return Path(record["path"])


def _identity_file(path: Path, name: str) -> Path:
    return path.parent / name if path.name == name and not path.is_dir() else path / name


def changed_inputs(recorded: dict | None, base: str | os.PathLike | None = None) -> list[str]:
    """One line per recorded input identity that no longer matches the disk ("<file>: changed").
    `base`: the directory of the DONE.json that recorded them (its "rel" paths are tried first)."""
    problems = []
    for label, record in (recorded or {}).items():
        if not isinstance(record, dict) or not isinstance(record.get("sha256"), dict) or "path" not in record:
            continue
        where = _recorded_path(record, Path(base) if base is not None else None)
        for name, digest in sorted(record["sha256"].items()):
            file = _identity_file(where, name)
            if not file.is_file():
                problems.append(f"{file}: missing (input '{label}')")
                break
            if cached_sha256(file) != digest:
                problems.append(f"{file}: changed since it was used (input '{label}')")
                break
    return problems


def identity_changes(recorded: dict | None, current: dict) -> list[str]:
    """One line per input whose content now (`current`: label -> identity of what the job would use
    now, e.g. the recipe's seed.path) is not what `recorded` says the result was made from."""
    problems = []
    for label, now in current.items():
        then = ((recorded or {}).get(label) or {}).get("sha256") or {}
        names = [n for n in sorted(set(now["sha256"]) | set(then)) if now["sha256"].get(n) != then.get(n)]
        if names:
            where = _identity_file(Path(now["path"]), names[0]) if names[0] in now["sha256"] else Path(now["path"])
            problems.append(f"{where}: not what it was made from (input '{label}')")
    return problems


def producer_manifest(path: str | os.PathLike) -> tuple[dict | None, str]:
    """The DONE.json describing checkpoint `path`, and the prefix its "outputs" keys carry.

    A btx job keeps its DONE.json next to its export: `experts/<d>/DONE.json` describes
    `experts/<d>/final/` (keys "final/<file>"); a seed's or a merge's sits inside the directory.
    """
    path = Path(path)
    own = read_done(path)
    if own is not None:
        return own, ""
    parent = read_done(path.parent)
    if parent is not None:
        export = parent.get("export")
        outputs = parent.get("outputs") or {}
        if (export and Path(export).resolve() == path.resolve()) or any(
            str(k).startswith(f"{path.name}/") for k in outputs
        ):
            return parent, f"{path.name}/"
    return None, ""


def damaged_outputs(directory: str | os.PathLike, prefix: str = "") -> list[str]:
    """Files of the finished stage in `directory` that differ from its DONE.json ("outputs"):
    one line each, "<file>: missing" or "<file>: differs from ..."; [] when all match. Only the
    keys under `prefix` are checked (an expert's export: "final/")."""
    root = Path(directory)
    done = read_done(root)
    outputs = (done or {}).get("outputs")
    if not isinstance(outputs, dict):
        return []
    problems = []
    for rel, digest in sorted(outputs.items()):
        if not str(rel).startswith(prefix):
            continue
        file = root / rel
        if not file.is_file():
            problems.append(f"{file}: missing, though {root / DONE_NAME} lists it")
        elif cached_sha256(file) != digest:
            problems.append(f"{file}: differs from the sha256 that {root / DONE_NAME} records "
                            "(damaged or edited after the stage finished)")
    return problems


def input_identity(path: str | os.PathLike) -> dict:
    """The identity of a checkpoint a stage is about to consume. A btx-made checkpoint must
    still be what its producer's DONE.json says it wrote (BtxError naming the file otherwise)."""
    path = Path(path)
    if path.is_dir():
        manifest, prefix = producer_manifest(path)
        if manifest is not None:
            root = path if not prefix else path.parent
            problems = damaged_outputs(root, prefix)
            if problems:
                raise BtxError(f"{problems[0]}; redo the stage that made {path} or restore the file")
    return identity(path)


# --------------------------------------------------------------------------------------------
# Locks
# --------------------------------------------------------------------------------------------

_held_locks: dict[str, list] = {}  # lock file -> [fd, depth]: a process may nest its own locks
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


def lock_path(path: str | os.PathLike) -> Path:
    path = Path(path).absolute()
    return path.parent / f".{path.name}.lock"


def _holder_record() -> bytes:
    return (json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                        "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                        "command": " ".join([_program(), *sys.argv[1:]])[:300]})
            + "\n").encode()


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
    return BtxError(f"{target}: {what} is in use by {holder}; wait for it to finish or stop it "
                    f"(lock {lock_file})")


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
            if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int) \
                    and not _pid_alive(holder["pid"]):
                lock_file.unlink(missing_ok=True)
                continue
            raise _locked_by(target, what, _describe_holder(raw) + "; if that process is gone, delete the lock file",
                             lock_file) from None


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


# --------------------------------------------------------------------------------------------
# Disk errors
# --------------------------------------------------------------------------------------------

DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS}


def free_bytes(path: str | os.PathLike) -> int:
    """Bytes available to this user on the file system that holds `path` (or its nearest parent)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    st = os.statvfs(p)
    return st.f_bavail * st.f_frsize


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n:,} bytes"


def disk_error_message(e: OSError, where: str | os.PathLike | None = None, needed: int | None = None,
                       what: str = "the output", approx: str = "about") -> str | None:
    """One line for an OSError of a full, read-only or forbidden destination; None for others."""
    if e.errno not in DISK_ERRNOS:
        return None
    path = e.filename or where or "?"
    need = f"; {what} needs {approx} {_gb(needed)}" if needed else ""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        reason = "no space left on the device" if e.errno == errno.ENOSPC else "disk quota exceeded"
        try:
            free = f", {_gb(free_bytes(path))} free there"
        except OSError:
            free = ""
        return (f"{path}: {reason} while writing {what}{need}{free}; free some space or write elsewhere "
                "(nothing half-written was left; re-run to continue)")
    reason = "read-only file system" if e.errno == errno.EROFS else "permission denied"
    return f"{path}: {reason} (writing {what}); choose a writable place for it (nothing half-written was left)"


@contextmanager
def disk_errors(where: str | os.PathLike, needed: int | None = None, what: str = "the output",
                approx: str = "about") -> Iterator[None]:
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
        raise BtxError(f"{disk_error_message(full, where, needed, what, approx)} ({' '.join(str(e).split())[:120]})") from None


def ensure_free_space(directory: str | os.PathLike, needed: int, what: str) -> None:
    """BtxError before anything is written when `directory`'s file system cannot take `needed` bytes."""
    free = free_bytes(directory)
    if free < needed:
        raise BtxError(f"{directory}: {what} needs about {_gb(needed)}, but only {_gb(free)} are free there; "
                       "free some space or write elsewhere")


# --------------------------------------------------------------------------------------------
# Atomic writes
# --------------------------------------------------------------------------------------------


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
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


def fsync_dir(directory: str | os.PathLike) -> None:
    """Make a directory's entries (creations, renames) durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: str | os.PathLike, data: dict, *, durable: bool = True, tidy: bool = True) -> None:
    """Write strict JSON to a temporary sibling, fsync it, rename it over `path`, fsync the directory."""
    write_bytes_atomic(path, (dumps_json(data, indent=2, sort_keys=True) + "\n").encode(), durable=durable, tidy=tidy)


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
        kind, _, rest = sibling.name[len(prefix):].partition("-")
        pid = rest.split("-", 1)[0]
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
                raise BtxError(f"{path}: appeared while this output was being written (another process?); "
                               "pass --force to replace it")
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
