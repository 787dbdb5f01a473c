"""Streaming checkpoint writes.

A shard's header follows from shapes and dtypes alone, so it is written first and each tensor is
produced, written and dropped one at a time: memory is bounded by the largest tensor, not by the
shard or the model. A producer may instead name a byte range of an input file (`FileRange`), which
is copied inside the kernel (sendfile) and hashed on the way. `write_checkpoint` writes a whole HF
directory (config, shards, index, tokenizer files) inside `atomic_dir`, so a killed writer never
leaves something that looks like a finished checkpoint.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
import struct
import sys
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import torch

from btx.errors import BtxError
from btx.io.atomic import atomic_dir
from btx.io.finite import check_finite_bytes
from btx.io.hashing import sha256_file, update_from_file
from btx.io.layout import (
    CONFIG_NAME,
    DEFAULT_SHARD_SIZE,
    INDEX_FILE,
    SINGLE_FILE,
    TOKENIZER_FILES,
    FileRange,
    TensorSpec,
    config_to_hf,
    first_few,
)
from btx.io.reader import TORCH_TO_ST
from btx.model.config import ModelConfig
from btx.units import parse_size


def _spec_nbytes(spec: TensorSpec) -> int:
    return math.prod(spec.shape) * spec.dtype.itemsize


def plan_shards(specs: list[TensorSpec], shard_size: int) -> list[list[TensorSpec]]:
    """Greedy, in order: a new shard starts when the next tensor would overflow this one.
    A tensor larger than `shard_size` gets a shard of its own, as in transformers."""
    shards: list[list[TensorSpec]] = [[]]
    used = 0
    for spec in specs:
        n = _spec_nbytes(spec)
        if shards[-1] and used + n > shard_size:
            shards.append([])
            used = 0
        shards[-1].append(spec)
        used += n
    return shards if shards[0] else []


def safetensors_header(specs: list[TensorSpec]) -> bytes:
    """The 8-byte length plus the JSON header for `specs` written back to back in this order."""
    header: dict = {"__metadata__": {"format": "pt"}}
    pos = 0
    for spec in specs:
        if spec.dtype not in TORCH_TO_ST:
            raise ValueError(f"{spec.name}: dtype {spec.dtype} cannot be stored in safetensors")
        n = _spec_nbytes(spec)
        header[spec.name] = {
            "dtype": TORCH_TO_ST[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [pos, pos + n],
        }
        pos += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # pad with spaces so the data starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw


def _start_writeback(fd: int, end: int, nbytes: int) -> None:
    """Have the kernel start writing bytes [end - nbytes, end) of `fd` to disk now, rather than
    once gigabytes of dirty pages have piled up: the disk then works while the writer produces
    the next tensors, and the final fsync has little left to do. On Linux, POSIX_FADV_DONTNEED
    starts writeback of dirty pages in the range (and keeps them cached until they are clean);
    elsewhere it is at most a hint."""
    if hasattr(os, "posix_fadvise") and nbytes:
        os.posix_fadvise(fd, end - nbytes, nbytes, os.POSIX_FADV_DONTNEED)


def _write_all(fd: int, data) -> None:
    view = memoryview(data).cast("B")
    while view:
        view = view[os.write(fd, view) :]  # one write() moves at most ~2 GB on Linux


def _copy_range(fd: int, src: FileRange) -> None:
    """Append `src`'s bytes to `fd`: sendfile where the kernel can do it (one in-kernel copy),
    else reads and writes through a buffer."""
    with open(src.path, "rb", buffering=0) as f:
        done = 0
        if hasattr(os, "sendfile"):
            try:
                while done < src.nbytes:
                    sent = os.sendfile(fd, f.fileno(), src.offset + done, src.nbytes - done)
                    if sent == 0:
                        break
                    done += sent
            except OSError as e:
                if e.errno not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSOCK, errno.EOPNOTSUPP) or done:
                    raise
        view = memoryview(bytearray(min(16 << 20, src.nbytes - done)))
        while done < src.nbytes:
            got = os.preadv(f.fileno(), [view[: min(len(view), src.nbytes - done)]], src.offset + done)
            if got <= 0:
                break
            _write_all(fd, view[:got])
            done += got
    if done != src.nbytes:
        raise BtxError(f"{src.path}: ended {src.nbytes - done} bytes early while being copied (truncated?)")


def write_safetensors(
    path: str | os.PathLike, specs: list[TensorSpec], on_tensor: Callable[[str, int], None] | None = None
) -> str:
    """Write one safetensors file, producing one tensor at a time. Returns its sha256.

    Tensors are laid out by descending element size so every tensor stays aligned to its dtype
    when the file is memory-mapped (the order `produce` is called in follows the layout).
    """
    if sys.byteorder != "little":  # pragma: no cover - safetensors is little-endian
        raise RuntimeError("writing safetensors needs a little-endian host")
    specs = sorted(specs, key=lambda s: -s.dtype.itemsize)  # stable: same-size dtypes keep their order
    digest = hashlib.sha256()
    # Hashing (about 1.8 GB/s) runs on a second thread while the same bytes are written (hashlib,
    # file writes and sendfile release the GIL), so it costs no wall time when the disk is the
    # bottleneck. The one hashing thread takes the pieces in file order. A produced tensor's
    # hash is joined before the next produce(), which may reuse its buffer; copied file ranges
    # are hashed from their source file and need no join until the end, where every hash is
    # checked so that a failed one cannot pass unnoticed.
    with open(path, "wb", buffering=0) as f, ThreadPoolExecutor(1, thread_name_prefix="btx-sha256") as hasher:
        fd = f.fileno()
        head = safetensors_header(specs)
        _write_all(fd, head)
        digest.update(head)
        file_hashes, pos = [], len(head)
        for spec in specs:
            out = spec.produce()
            nbytes = _spec_nbytes(spec)
            if isinstance(out, FileRange):
                if out.nbytes != nbytes:
                    raise ValueError(f"{spec.name}: produced {out.nbytes} bytes of {out.path}, announced {nbytes}")
                check = None
                if out.dtype is not None:  # NaN and Inf, on the hashing thread from the same pages
                    check = partial(check_finite_bytes, dtype=out.dtype, where=str(out.path), name=out.name)
                file_hashes.append(hasher.submit(update_from_file, digest, out.path, out.offset, out.nbytes, check))
                _copy_range(fd, out)
            else:
                if tuple(out.shape) != tuple(spec.shape):
                    raise ValueError(f"{spec.name}: produced shape {tuple(out.shape)}, announced {tuple(spec.shape)}")
                t = out.detach().to(device="cpu", dtype=spec.dtype).contiguous()
                buf = t.reshape(-1).view(torch.uint8).numpy()  # the raw little-endian bytes, no copy
                hashed = hasher.submit(digest.update, buf)
                try:
                    _write_all(fd, buf)
                finally:
                    hashed.result()
                del t, buf, out  # hold at most one tensor beyond the one being produced
            pos += nbytes
            _start_writeback(fd, pos, nbytes)
            if on_tensor is not None:
                on_tensor(spec.name, nbytes)
        for hashed in file_hashes:
            hashed.result()
    return digest.hexdigest()


def write_checkpoint(
    out_dir: str | os.PathLike,
    cfg: ModelConfig,
    tensors: Iterable[TensorSpec | tuple],
    *,
    shard_size: int | str = DEFAULT_SHARD_SIZE,
    tokenizer_from: str | os.PathLike | None = None,
    force: bool = False,
    atomic: bool = True,
    on_tensor: Callable[[str, int], None] | None = None,
) -> dict[str, str]:
    """Write an HF checkpoint: config.json, safetensors shard(s), index, tokenizer files.

    `tensors` are (hf_name, shape, dtype, produce) specs; only their shapes and dtypes are
    needed up front, `produce()` is called once, when its bytes are written. With `atomic`
    (default) the directory appears only when complete (see `atomic_dir`); pass atomic=False to
    write into an existing directory, e.g. inside a caller's own `atomic_dir`.
    Returns {file name: sha256} of everything written, ready for a DONE.json manifest.
    """
    specs = [TensorSpec(*t) for t in tensors]
    dupes = sorted(n for n, c in Counter(s.name for s in specs).items() if c > 1)
    if dupes:
        raise ValueError(f"tensor name(s) given twice: {first_few(dupes)}")
    floating = Counter()
    for s in specs:
        if s.dtype.is_floating_point:
            floating[s.dtype] += _spec_nbytes(s)
    dtype = floating.most_common(1)[0][0] if floating else None

    def write(directory: Path) -> dict[str, str]:
        hashes: dict[str, str] = {}
        shards = plan_shards(specs, parse_size(shard_size))
        if len(shards) <= 1:
            only = shards[0] if shards else []
            hashes[SINGLE_FILE] = write_safetensors(directory / SINGLE_FILE, only, on_tensor)
        else:
            weight_map = {}
            for k, shard in enumerate(shards, 1):
                file = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
                hashes[file] = write_safetensors(directory / file, shard, on_tensor)
                weight_map |= {s.name: file for s in shard}
            index = {
                "metadata": {"total_size": sum(_spec_nbytes(s) for s in specs)},
                "weight_map": dict(sorted(weight_map.items())),
            }
            (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
            hashes[INDEX_FILE] = sha256_file(directory / INDEX_FILE)
        (directory / CONFIG_NAME).write_text(json.dumps(config_to_hf(cfg, dtype), indent=2) + "\n")
        hashes[CONFIG_NAME] = sha256_file(directory / CONFIG_NAME)
        if tokenizer_from is not None:
            for file in copy_tokenizer_files(tokenizer_from, directory):
                hashes[file] = sha256_file(directory / file)
        return dict(sorted(hashes.items()))

    if not atomic:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        return write(out)
    with atomic_dir(out_dir, force=force) as tmp:
        return write(tmp)


def has_tokenizer(directory: str | os.PathLike) -> bool:
    """Whether a checkpoint directory holds a tokenizer btx can load (tokenizer.json or btx's own)."""
    return any((Path(directory) / f).is_file() for f in ("tokenizer.json", "btx_tokenizer.json"))


def copy_tokenizer_files(src_dir: str | os.PathLike, dst_dir: str | os.PathLike) -> list[str]:
    """Copy the tokenizer and generation files present in `src_dir`; returns their names."""
    copied = []
    for name in TOKENIZER_FILES:
        src = Path(src_dir) / name
        if src.is_file():
            shutil.copyfile(src, Path(dst_dir) / name)
            copied.append(name)
    return copied
