"""Lazy checkpoint reads: safetensors headers parsed by btx, one tensor at a time.

`read_safetensors_header` checks a file's header itself (shapes, dtypes, offsets, truncation)
without touching tensor data, and refuses a hostile one with one line: a tensor count beyond any
real shard (counted before parsing, so memory stays near the header's size), Infinity or NaN for a
number, a `__metadata__` that is not a map of strings. Every tensor read (`get`, `read_into`, and the
bytes `file_range` hands a writer to copy unseen) is checked for NaN and Inf (`check_finite`), and a
config.json whose sizes imply more weights than the files hold is refused before anything per
layer is built (the size guard, btx.units.oversize). `CheckpointReader` opens an HF directory (single file or sharded
index), checks every header and hands out tensors through `safe_open`, which memory-maps the file,
or with plain reads into reused buffers (`read_into`). Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import safe_open

from btx.errors import BtxError, missing_checkpoint
from btx.families import read_config
from btx.io.finite import can_check_bytes, check_finite
from btx.io.layout import (
    CONFIG_NAME,
    INDEX_FILE,
    SINGLE_FILE,
    FileRange,
    assemble,
    btx_shapes,
    first_few,
    plan_btx_from_hf,
)
from btx.units import oversize

# safetensors dtype names <-> torch dtypes
ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip
TORCH_TO_ST = {v: k for k, v in ST_DTYPES.items()}
_MAX_HEADER = 100 << 20  # the safetensors library refuses headers over 100 MB too
# More tensors than any real shard holds (a 128-expert, 94-layer MoE has ~36k in all, over many
# shards). Counted in the raw header before it is parsed: parsing a million entries takes ~1 GB.
MAX_TENSORS_PER_FILE = 200_000
_FINITE_CHUNK = 8 << 20  # elements per read-and-check step of a FileRange the writer cannot check


class TensorInfo(NamedTuple):
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: str  # file name within the checkpoint directory
    offset: int = 0  # where the tensor's bytes start in that file

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict[str, TensorInfo], dict]:
    """Parse and check a safetensors header without reading tensor data.

    Returns (name -> TensorInfo, __metadata__). A truncated, padded or corrupt file raises a
    BtxError naming it, e.g. "header says 1234 bytes of data but the file has 1000".
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise BtxError(f"{path}: {size} bytes is too short to be a safetensors file")
            (n,) = struct.unpack("<Q", prefix)
            if n > _MAX_HEADER or n > size - 8:
                raise BtxError(
                    f"{path}: not a safetensors file or truncated: header length {n} but the file "
                    f"has {size - 8} bytes after it"
                )
            raw = f.read(n)
    except OSError as e:
        raise BtxError(f"{path}: cannot read ({e.strerror})") from None
    header, metadata = _parse_header(path, raw)
    infos: dict[str, TensorInfo] = {}
    spans = []
    for name, entry in header.items():
        try:
            dtype = ST_DTYPES[entry["dtype"]]
            shape = tuple(_size(s) for s in entry["shape"])
            begin, end = (_size(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise BtxError(f"{path}: malformed header entry for tensor {name}: {entry!r:.200}") from None
        if end - begin != math.prod(shape) * dtype.itemsize:
            raise BtxError(
                f"{path}: tensor {name} spans {end - begin} bytes but shape {list(shape)} of "
                f"{entry['dtype']} needs {math.prod(shape) * dtype.itemsize}"
            )
        infos[name] = TensorInfo(name, shape, dtype, path.name, 8 + n + begin)
        spans.append((begin, end, name))
    # The data section must be exactly the tensors, back to back (the safetensors rule).
    pos = 0
    for begin, end, name in sorted(spans):
        if begin != pos:
            raise BtxError(f"{path}: tensor {name} starts at byte {begin} of the data, expected {pos} (corrupt header)")
        pos = end
    have = size - 8 - n
    if pos != have:
        raise BtxError(f"{path}: header says {pos} bytes of data but the file has {have} (truncated or corrupt)")
    return infos, metadata


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _size(value) -> int:
    """A shape entry or offset: a JSON integer >= 0 (not a float, a bool or a string)."""
    if type(value) is not int or value < 0:
        raise ValueError(value)
    return value


def _parse_header(path: Path, raw: bytes) -> tuple[dict, dict[str, str]]:
    """The header's tensor entries and its __metadata__, refused with one line when hostile.

    The tensor count is bounded on the raw bytes before parsing (memory stays near the header's
    size); Infinity and NaN, which Python's json accepts and the format does not, are refused;
    __metadata__ must be a map of strings to strings, as the safetensors library requires."""
    count = raw.count(b'"data_offsets"')
    if count > MAX_TENSORS_PER_FILE:
        raise BtxError(
            f"{path}: the safetensors header lists about {count} tensors, more than the "
            f"{MAX_TENSORS_PER_FILE} btx accepts in one file (corrupt or hostile file?)"
        )
    try:
        header = json.loads(raw, parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise BtxError(f"{path}: safetensors header is not valid JSON (corrupt file?)") from None
    if not isinstance(header, dict):
        raise BtxError(f"{path}: safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise BtxError(f"{path}: safetensors __metadata__ must be a map of strings to strings, got {metadata!r:.120}")
    return header, metadata


def _cast(t: torch.Tensor, dtype: torch.dtype | None, device: str | torch.device) -> torch.Tensor:
    return t.to(device=device, dtype=dtype or t.dtype)


READ_AHEAD_BYTES = 64 << 20  # per input file, see CheckpointReader.read_into


class CheckpointReader:
    """Lazy, validated access to an HF checkpoint directory.

    On construction it reads config.json, finds the weights (`model.safetensors`, or
    `model.safetensors.index.json` and its shards), checks that every file exists and that every
    header is sound, and matches the tensors to the btx parameters the config implies (missing,
    unexpected and misshapen tensors are errors). No tensor data is read until asked for.

        with CheckpointReader(path) as ckpt:
            ckpt.cfg, ckpt.btx_shape("embed.weight"), ckpt.get_btx("layers.0.ffn.w1")
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_dir():
            raise BtxError(missing_checkpoint(self.path))
        config_path = self.path / CONFIG_NAME
        if not config_path.is_file():
            raise BtxError(f"{self.path}: no {CONFIG_NAME}; expected a Hugging Face checkpoint directory")
        try:
            self.hf_config = json.loads(config_path.read_text())
        except ValueError as e:
            raise BtxError(f"{config_path}: not valid JSON ({e})") from None
        if not isinstance(self.hf_config, dict):
            raise BtxError(f"{config_path}: expected a JSON object")
        self.cfg = read_config(self.hf_config, source=config_path)
        files = self._weight_files()
        self._refuse_oversize(config_path, sum((self.path / f).stat().st_size for f in files))

        self._handles: dict[str, object] = {}  # file -> open safe_open handle
        self._fds: dict[str, int] = {}  # file -> descriptor for read_into
        self.tensors: dict[str, TensorInfo] = {}
        self.metadata: dict[str, dict] = {}  # file -> its __metadata__
        for file in files:
            infos, meta = read_safetensors_header(self.path / file)
            self.metadata[file] = meta
            for name, info in infos.items():
                if name in self.tensors:
                    other = self.tensors[name].file
                    raise BtxError(f"{self.path}: tensor {name} is in both {other} and {file}")
                self.tensors[name] = info
        if self._index is not None:
            for name, file in self._index.items():
                info = self.tensors.get(name)
                if info is None or info.file != file:
                    raise BtxError(
                        f"{self.path / INDEX_FILE}: weight_map puts {name} in {file}, but {file} does not hold it"
                    )

        self._btx_shapes = btx_shapes(self.cfg)
        self.plan = plan_btx_from_hf(
            self.cfg,
            {n: i.shape for n, i in self.tensors.items()},
            str(self.path),
            {n: i.file for n, i in self.tensors.items()},
            # Some tools store a tied head anyway; checking it costs two reads, only in that case.
            head_equals_embed=lambda: torch.equal(self.get("lm_head.weight"), self.get("model.embed_tokens.weight")),
        )

    def _refuse_oversize(self, config_path: Path, stored: int) -> None:
        """The size guard (btx.units.oversize) before anything per layer or per tensor is built:
        the weights config.json implies, at one byte each (the least any dtype takes), must fit in
        the bytes its safetensors files hold. A num_hidden_layers of 1e9 is refused here, on
        arithmetic alone, rather than after building a billion-layer plan."""
        cfg, hf = self.cfg, self.hf_config
        experts = next((k for k in ("num_local_experts", "num_experts") if k in hf), "num_local_experts")
        factors = {
            "num_hidden_layers": cfg.n_layers, "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim,
            "intermediate_size": cfg.ffn_dim, experts: cfg.n_experts, "num_attention_heads": cfg.n_heads,
        }  # fmt: skip
        need = cfg.param_counts()["total"]
        found = oversize(
            need, max(stored, 1), factors, "the weights (at one byte each)", "the checkpoint's safetensors files hold"
        )
        if found is not None:
            key, message = found
            raise BtxError(f"{config_path}: {key}: {message}")

    def _weight_files(self) -> list[str]:
        single, index = self.path / SINGLE_FILE, self.path / INDEX_FILE
        self._index = None
        if single.is_file():  # transformers looks for the single file first, so do we
            return [SINGLE_FILE]
        if not index.is_file():
            pickles = sorted(p.name for p in self.path.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
            hint = ""
            if pickles:
                hint = f" (found {', '.join(pickles)}: btx reads safetensors only, it never unpickles)"
            raise BtxError(f"{self.path}: no {SINGLE_FILE} or {INDEX_FILE}{hint}")
        try:
            weight_map = json.loads(index.read_text()).get("weight_map")
        except (ValueError, AttributeError):
            weight_map = None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise BtxError(f'{index}: not a valid index (expected {{"weight_map": {{tensor: file}}}})')
        files = sorted(set(weight_map.values()))
        for file in files:
            if Path(file).name != file or file.startswith("."):
                raise BtxError(f"{index}: shard name {file!r} must be a plain file name in the directory")
        absent = [f for f in files if not (self.path / f).is_file()]
        if absent:
            raise BtxError(f"{index}: lists shard(s) that do not exist: {first_few(absent)}")
        self._index = weight_map
        return files

    # -- HF-level access ------------------------------------------------------------------

    def keys(self) -> list[str]:
        return list(self.tensors)

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise BtxError(f"{self.path}: no tensor {name}") from None

    @property
    def dtype(self) -> torch.dtype:
        """The checkpoint's dtype: the most common floating dtype, by bytes."""
        by_bytes: Counter = Counter()
        for info in self.tensors.values():
            if info.dtype.is_floating_point:
                by_bytes[info.dtype] += info.nbytes
        return by_bytes.most_common(1)[0][0] if by_bytes else torch.float32

    @property
    def total_size(self) -> int:
        return sum(info.nbytes for info in self.tensors.values())

    def get(self, name: str, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> torch.Tensor:
        """One HF tensor, read from the memory-mapped file."""

        info = self.info(name)
        handle = self._handles.get(info.file)
        if handle is None:
            handle = self._handles[info.file] = safe_open(str(self.path / info.file), framework="pt")
        t = handle.get_tensor(name)
        check_finite(t, str(self.path / info.file), name)
        return _cast(t, dtype, device)

    # -- btx-level access -----------------------------------------------------------------

    def btx_names(self) -> list[str]:
        return list(self.plan)

    def btx_shape(self, name: str) -> tuple[int, ...]:
        return self._btx_shapes[name]

    def get_btx(self, name: str, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> torch.Tensor:
        """One btx parameter (expert weights stacked), optionally cast."""
        try:
            src = self.plan[name]
        except KeyError:
            raise KeyError(f"{name!r} is not a parameter of this checkpoint's model") from None
        return _cast(assemble(src, [self.get(n) for n in src.hf_names]), dtype, device)

    def read_btx(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """`get_btx` through plain reads (`read_into`) instead of the memory map, on the CPU: once
        the tensor is dropped nothing of the file stays in this process's memory. For a pass over
        a whole checkpoint with the reader kept open (sharded construction under ZeRO-3), where
        the mapped pages would otherwise add up to the checkpoint's size."""
        try:
            src = self.plan[name]
        except KeyError:
            raise KeyError(f"{name!r} is not a parameter of this checkpoint's model") from None
        parts = [self.read_into(n, torch.empty(self.info(n).nbytes, dtype=torch.uint8)) for n in src.hf_names]
        return _cast(assemble(src, parts), dtype, "cpu")

    def iter_btx(self, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.plan:
            yield name, self.get_btx(name, dtype)

    def _span(self, name: str, rows: tuple[int, int] | None) -> tuple[TensorInfo, int, int, tuple[int, ...]]:
        """(info, first byte in its file, byte count, shape) of tensor `name`, or of rows [r0, r1)."""
        info = self.info(name)
        n_rows = info.shape[0] if info.shape else 1
        r0, r1 = rows if rows is not None else (0, n_rows)
        if not 0 <= r0 <= r1 <= n_rows:
            raise ValueError(f"{name}: rows [{r0}, {r1}) outside its shape {list(info.shape)}")
        row_bytes = info.nbytes // max(n_rows, 1) if info.shape else info.nbytes
        shape = ((r1 - r0), *info.shape[1:]) if info.shape else ()
        return info, info.offset + r0 * row_bytes, (r1 - r0) * row_bytes, shape

    def file_range(self, name: str, rows: tuple[int, int] | None = None) -> FileRange:
        """Where the stored bytes of HF tensor `name` (or of rows [r0, r1)) lie, for a writer to
        copy file to file (see `FileRange`)."""
        info, start, nbytes, _ = self._span(name, rows)
        where = self.path / info.file
        if can_check_bytes(info.dtype) and start % info.dtype.itemsize == 0:
            # the writer checks the bytes as it hashes them from the page cache: no read here
            return FileRange(where, start, nbytes, info.dtype, name)
        if info.dtype.is_floating_point:  # bytes the writer cannot check as they are: check them here
            step = _FINITE_CHUNK // 4 * info.dtype.itemsize
            scratch = torch.empty(min(step, nbytes), dtype=torch.uint8)
            for at in range(0, nbytes, step):
                part = scratch[: min(step, nbytes - at)]
                self._pread(info, name, part, start + at)
                check_finite(part.view(info.dtype), str(self.path / info.file), name)
        return FileRange(where, start, nbytes)

    def _pread(self, info: TensorInfo, name: str, out: torch.Tensor, start: int) -> None:
        """Fill `out` (contiguous, CPU) with the file's bytes from `start` on."""
        fd = self._fds.get(info.file)
        if fd is None:
            fd = self._fds[info.file] = os.open(self.path / info.file, os.O_RDONLY)
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        nbytes = out.nbytes
        view = memoryview(out.reshape(-1).view(torch.uint8).numpy()) if nbytes else memoryview(b"")
        done = 0
        while done < nbytes:
            got = os.preadv(fd, [view[done:]], start + done)
            if got <= 0:
                raise BtxError(f"{self.path / info.file}: ends inside tensor {name} (truncated while reading?)")
            done += got

    def read_into(self, name: str, out: torch.Tensor, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Copy the stored bytes of HF tensor `name` (or of rows [r0, r1) along its first dim)
        into `out`, a contiguous CPU tensor of exactly that many bytes. Returns `out` viewed as the
        stored dtype and shape.

        Plain reads, no memory map and no dtype conversion: streaming code (the merge) reads
        through this into buffers it reuses. The pages of a file mapped by `get` stay in the
        process's RSS while the reader is open, so a pass over a whole checkpoint through `get`
        holds as much memory as the checkpoint is large; here memory is what `out` is.
        """
        info, start, nbytes, shape = self._span(name, rows)
        if out.device.type != "cpu" or not out.is_contiguous() or out.nbytes != nbytes:
            raise ValueError(f"{name}: read_into needs a contiguous CPU tensor of {nbytes} bytes")
        self._pread(info, name, out, start)
        fd = self._fds[info.file]
        if hasattr(os, "posix_fadvise"):
            # A merge reads several files in turn, tensor by tensor; asking the kernel for the next
            # stretch of this file now lets the disk work while the other files are read and the
            # output is written, instead of each read waiting on a cold page cache.
            os.posix_fadvise(fd, start + nbytes, READ_AHEAD_BYTES, os.POSIX_FADV_WILLNEED)
        stored = out.view(info.dtype).view(shape)
        check_finite(stored, str(self.path / info.file), name)
        return stored

    def close(self) -> None:
        self._handles.clear()  # safe_open handles unmap when dropped
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
