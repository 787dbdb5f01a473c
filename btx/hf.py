"""Hugging Face checkpoint I/O, the same for every family: config.json <-> ModelConfig, lazy
reads, streaming writes.

A btx checkpoint is a plain HF directory in its family's dense form (`LlamaForCausalLM`,
`Qwen3ForCausalLM`, ...) or MoE form (`MixtralForCausalLM`, `Qwen3MoeForCausalLM`, ...; see
btx/families/), in the per-expert layout save_pretrained writes, so transformers (4.x and 5.x),
vLLM and lm-evaluation-harness open it with no btx code.

- Names: each family's key table (btx/families/, through `key_table(cfg)`) is the single source of
  truth. Every conversion (btx -> HF when writing, HF -> btx when reading) goes through it.
- Reads are lazy: `CheckpointReader` parses each safetensors header itself (shapes, dtypes,
  offsets, truncation) without touching tensor data, and hands out one tensor at a time through
  `safe_open`, which memory-maps the file. Nothing is ever unpickled.
- Writes stream: a shard's header follows from shapes and dtypes alone, so it is written first
  and each tensor is produced, written and dropped one at a time. Memory is bounded by the
  largest tensor, not by the shard or the model.
- Directories appear atomically (`atomic_dir`, from btx.manifest): a killed writer never leaves
  something that looks like a finished checkpoint.

Shape legend: V vocab, D model dim, F ffn dim, E experts, H heads, G kv heads, Hd head dim.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import shutil
import struct
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from btx.errors import BtxError, missing_checkpoint
from btx.manifest import atomic_dir, sha256_file, update_from_file
from btx import families
from btx.model import ModelConfig

__all__ = [
    "CheckpointReader",
    "FileRange",
    "TensorSpec",
    "TensorInfo",
    "atomic_dir",
    "btx_shapes",
    "btx_state_dict_from_hf",
    "config_from_hf",
    "config_to_hf",
    "copy_tokenizer_files",
    "hf_shapes",
    "hf_specs_from_btx",
    "hf_tensors_from_btx",
    "key_table",
    "load_model",
    "load_state_dict",
    "read_safetensors_header",
    "save_model",
    "write_checkpoint",
]

CONFIG_NAME = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Files a checkpoint carries along from its source so that it is usable on its own: the
# tokenizer in every format transformers saves (fast tokenizer.json; sentencepiece tokenizer.model;
# BPE vocab.json + merges.txt), its chat template (transformers 5.x writes chat_template.jinja, 4.x
# puts it inside tokenizer_config.json, processors chat_template.json) and generation defaults.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
    "btx_tokenizer.json",
)
DEFAULT_SHARD_SIZE = 5 * 10**9  # transformers' and mergekit's default: 5 GB


# --------------------------------------------------------------------------------------------
# config.json <-> ModelConfig, and the key tables: one per family and form (btx/families/)
# --------------------------------------------------------------------------------------------

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def config_from_hf(hf: Mapping, source: str | os.PathLike = CONFIG_NAME) -> ModelConfig:
    """Read any config.json btx reads (as a dict); errors name `source` and the field."""
    return families.read_config(hf, source)


def config_to_hf(cfg: ModelConfig, dtype: torch.dtype | None = None) -> dict:
    """The config.json for `cfg` in its family's dense or MoE form (see btx.families.write_config)."""
    return families.write_config(cfg, None if dtype is None else _DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch.")))


inference_note = families.inference_note


def key_table(cfg: ModelConfig) -> families.KeyTable:
    """The one key table of `cfg`'s family and form, used both ways."""
    return families.key_table(cfg)


# HF buffers some older checkpoints carry that are recomputed, not learned: skipped on read.
IGNORED_HF_SUFFIXES = (".rotary_emb.inv_freq",)


def btx_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every btx parameter `cfg` implies, with its shape, in checkpoint order (see CONTRACTS.md)."""
    D, F, E, V, S = cfg.dim, cfg.ffn_dim, cfg.n_experts, cfg.vocab_size, cfg.shared_expert_dim
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    out: dict[str, tuple[int, ...]] = {"embed.weight": (V, D)}
    for i in range(cfg.n_layers):
        p = f"layers.{i}"
        out[f"{p}.attn_norm.weight"] = (D,)
        for w, rows, cols in (("wq", q, D), ("wk", kv, D), ("wv", kv, D), ("wo", D, q)):
            out[f"{p}.attn.{w}.weight"] = (rows, cols)
            if cfg.o_bias if w == "wo" else cfg.qkv_bias:
                out[f"{p}.attn.{w}.bias"] = (rows,)
        if cfg.qk_norm != "none":
            out[f"{p}.attn.q_norm.weight"] = (cfg.head_dim,) if cfg.qk_norm == "head" else (q,)
            out[f"{p}.attn.k_norm.weight"] = (cfg.head_dim,) if cfg.qk_norm == "head" else (kv,)
        out[f"{p}.ffn_norm.weight"] = (D,)
        if cfg.is_moe:
            out |= {
                f"{p}.ffn.router.weight": (E, D),
                f"{p}.ffn.w1": (E, F, D),
                f"{p}.ffn.w3": (E, F, D),
                f"{p}.ffn.w2": (E, D, F),
            }
            if S:
                out |= {
                    f"{p}.ffn.shared.w1.weight": (S, D),
                    f"{p}.ffn.shared.w3.weight": (S, D),
                    f"{p}.ffn.shared.w2.weight": (D, S),
                    f"{p}.ffn.shared_gate.weight": (1, D),
                }
        else:
            for w, shape in (("w1", (F, D)), ("w3", (F, D)), ("w2", (D, F))):
                out[f"{p}.ffn.{w}.weight"] = shape
                if cfg.mlp_bias:
                    out[f"{p}.ffn.{w}.bias"] = shape[:1]
    out["norm.weight"] = (D,)
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = (V, D)
    return out


def hf_layout(cfg: ModelConfig) -> list[families.HfTensor]:
    """Every HF tensor a btx checkpoint of `cfg` holds, in checkpoint order, with the btx
    parameters each is made of (the family's zero fillers last)."""
    fill = [families.HfTensor(n, shape, ()) for n, shape in families.fillers(cfg)]
    return key_table(cfg).layout(btx_shapes(cfg)) + fill


def hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every HF tensor a btx checkpoint of `cfg` holds, with its shape, in checkpoint order."""
    return {t.name: t.shape for t in hf_layout(cfg)}


def is_expert_param(btx_name: str) -> bool:
    """The stacked [E, ...] expert weights of an MoE layer (docs/CONTRACTS.md)."""
    return btx_name.endswith(families.EXPERT_PARAMS)


def build_hf_tensor(t: families.HfTensor, piece: Callable, dtype: torch.dtype):
    """HF tensor `t` from its btx pieces: `piece(btx_name, expert)` returns expert `expert` of a
    stacked parameter, or a whole parameter when `expert` is None (a tensor, or a FileRange where
    its stored bytes are the output unchanged). A zero filler (no pieces) is zeros."""
    if not t.pieces:
        return torch.zeros(t.shape, dtype=dtype)
    if len(t.pieces) == 1 and (t.pieces[0].layout == "expert" or not is_expert_param(t.pieces[0].btx)):
        (p,) = t.pieces
        return piece(p.btx, p.expert)
    out = torch.empty(t.shape, dtype=dtype)  # experts gathered into one stored tensor
    for p in t.pieces:
        F = t.shape[1] // 2
        rows = {"gate_half": slice(0, F), "up_half": slice(F, 2 * F), "same": slice(None)}[p.layout]
        for e in range(t.shape[0]):
            got = piece(p.btx, e)
            out[e, rows].copy_(got if isinstance(got, torch.Tensor) else _read_range(got, out[e, rows]))
    return out


def _read_range(src: "FileRange", like: torch.Tensor) -> torch.Tensor:
    buf = torch.empty(like.shape, dtype=like.dtype)
    with open(src.path, "rb") as f:
        f.seek(src.offset)
        view = memoryview(buf.reshape(-1).view(torch.uint8).numpy())
        if f.readinto(view) != src.nbytes:
            raise BtxError(f"{src.path}: ended early while being read (truncated?)")
    return buf


def hf_tensors_from_btx(
    state_dict: Mapping[str, torch.Tensor], cfg: ModelConfig
) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) for every tensor of a btx state dict's checkpoint: experts unstacked as
    views (nothing copied), or gathered into the fused tensors a form stores."""
    for t in key_table(cfg).layout({k: tuple(v.shape) for k, v in state_dict.items()}):
        yield t.name, build_hf_tensor(t, lambda n, e: state_dict[n] if e is None else state_dict[n][e],
                                      state_dict[t.pieces[0].btx].dtype)


class FileRange(NamedTuple):
    """Bytes [offset, offset + nbytes) of a file that already are a tensor's stored bytes.

    A TensorSpec's `produce()` may return one instead of a tensor: the writer then copies the
    bytes file to file inside the kernel (sendfile) and hashes them from the mapped page cache,
    so they never pass through a user-space buffer. For a merge, whose bulk is FFN weights copied
    unchanged, that halves the memory copies (see bench/merge.py).
    """

    path: Path
    offset: int
    nbytes: int


class TensorSpec(NamedTuple):
    """One tensor to write: its shape and dtype are known before its data is produced."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    produce: Callable[[], torch.Tensor | FileRange]


def hf_specs_from_btx(
    state_dict: Mapping[str, torch.Tensor], cfg: ModelConfig, dtype: torch.dtype
) -> list[TensorSpec]:
    """Write specs for a btx state dict, in checkpoint order, checked against `cfg`, plus the
    zero tensors the family's form needs (btx.families.fillers)."""
    want = btx_shapes(cfg)
    missing = [k for k in want if k not in state_dict]
    extra = [k for k in state_dict if k not in want]
    if missing or extra:
        raise ValueError(
            f"state dict does not match the config: missing {_few(missing)}, unexpected {_few(extra)}"
        )
    for name, shape in want.items():
        if tuple(state_dict[name].shape) != shape:
            raise ValueError(f"state dict: {name} has shape {tuple(state_dict[name].shape)}, the config implies {shape}")

    def piece(name: str, e: int | None) -> torch.Tensor:
        return state_dict[name] if e is None else state_dict[name][e]

    return [TensorSpec(t.name, t.shape, dtype, lambda t=t: build_hf_tensor(t, piece, dtype)) for t in hf_layout(cfg)]


class BtxSource(NamedTuple):
    """Where one btx parameter comes from in an HF checkpoint."""

    rule: families.KeyRule
    hf_names: list[str]


def _few(names: list[str], n: int = 5) -> str:
    if not names:
        return "none"
    more = f" (and {len(names) - n} more)" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def plan_btx_from_hf(
    cfg: ModelConfig,
    available: Mapping[str, tuple[int, ...]],
    source: str,
    located: Mapping[str, str] | None = None,
    head_equals_embed: Callable[[], bool] | None = None,
) -> dict[str, BtxSource]:
    """Match the HF tensors `available` (name -> shape) to the btx parameters `cfg` implies.

    Missing tensors, unexpected tensors and wrong shapes each raise one BtxError naming `source`
    and the first few tensors (with the file each sits in, via `located`). With tied embeddings
    an `lm_head.weight` is accepted (and skipped) only when `head_equals_embed()` confirms it is
    a copy of the embedding, as in a live transformers model's state_dict().
    """
    located = located or {}
    table = key_table(cfg)
    plan: dict[str, BtxSource] = {}
    missing: list[str] = []
    for name in btx_shapes(cfg):
        i = table.canonical(name)[1]
        for rule in table.candidates(name):  # canonical spelling first
            experts = range(cfg.n_experts) if rule.layout == "expert" else [None]
            names = [rule.hf.format(i=i, e=e) for e in experts]
            if all(n in available for n in names):
                plan[name] = BtxSource(rule, names)
                break
        else:  # report what the canonical spelling lacks
            missing += [n for n in table.hf_names(name, cfg.n_experts) if n not in available]
    if missing:
        raise BtxError(
            f"{source}: missing {len(missing)} tensor(s) that config.json implies: {_few(missing)}"
        )

    fill = dict(families.fillers(cfg))  # zero tensors the form needs and btx does not load
    for n, shape in fill.items():
        if n in available and tuple(available[n]) != shape:
            loc = f" (in {located[n]})" if n in located else ""
            raise BtxError(f"{source}: tensor {n}{loc} has shape {list(available[n])}, but config.json implies {list(shape)}")
    used = {n for src in plan.values() for n in src.hf_names} | set(fill)
    extra = [n for n in available if n not in used and not n.endswith(IGNORED_HF_SUFFIXES)]
    if cfg.tie_embeddings and "lm_head.weight" in extra and head_equals_embed and head_equals_embed():
        extra.remove("lm_head.weight")
    if extra:
        where = [f"{n} (in {located[n]})" if n in located else n for n in extra]
        hint = ""
        if cfg.tie_embeddings and "lm_head.weight" in extra:
            hint = (
                "; config.json says tie_word_embeddings=true, so lm_head.weight should be absent "
                "(or equal model.embed_tokens.weight)"
            )
        raise BtxError(f"{source}: {len(extra)} tensor(s) config.json does not explain: {_few(where)}{hint}")

    want = btx_shapes(cfg)
    for name, src in plan.items():
        s, layout = want[name], src.rule.layout
        if layout == "expert":
            expect = s[1:]
        elif layout in ("gate_half", "up_half"):
            expect = (s[0], 2 * s[1], s[2])  # [E, 2F, D]
        else:
            expect = s
        for n in src.hf_names:
            got = tuple(available[n])
            if got != expect:
                loc = f" (in {located[n]})" if n in located else ""
                raise BtxError(
                    f"{source}: tensor {n}{loc} has shape {list(got)}, but config.json implies {list(expect)}"
                )
    return plan


def _assemble(src: BtxSource, tensors: list[torch.Tensor]) -> torch.Tensor:
    """Build one btx parameter from the HF tensors its plan names."""
    layout = src.rule.layout
    if layout == "expert":
        return torch.stack(tensors)
    (t,) = tensors
    if layout == "gate_half":
        return t[:, : t.shape[1] // 2].contiguous()
    if layout == "up_half":
        return t[:, t.shape[1] // 2 :].contiguous()
    return t


def btx_state_dict_from_hf(
    hf_state_dict: Mapping[str, torch.Tensor], cfg: ModelConfig, source: str = "state dict"
) -> dict[str, torch.Tensor]:
    """A btx state dict from HF tensors in memory (classic names, or a live transformers 5.x
    model's fused ones), e.g. `btx_state_dict_from_hf(hf_model.state_dict(), cfg)`."""
    available = {k: tuple(v.shape) for k, v in hf_state_dict.items()}

    def head_equals_embed() -> bool:
        head, embed = hf_state_dict["lm_head.weight"], hf_state_dict.get("model.embed_tokens.weight")
        return embed is not None and head.shape == embed.shape and torch.equal(head, embed)

    plan = plan_btx_from_hf(cfg, available, source, head_equals_embed=head_equals_embed)
    return {name: _assemble(src, [hf_state_dict[n] for n in src.hf_names]) for name, src in plan.items()}


# --------------------------------------------------------------------------------------------
# safetensors headers and lazy reads
# --------------------------------------------------------------------------------------------

# safetensors dtype names <-> torch dtypes
ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip
TORCH_TO_ST = {v: k for k, v in ST_DTYPES.items()}
_MAX_HEADER = 100 << 20  # the safetensors library refuses headers over 100 MB too


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
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        raise BtxError(f"{path}: safetensors header is not valid JSON (corrupt file?)") from None
    if not isinstance(header, dict):
        raise BtxError(f"{path}: safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    infos: dict[str, TensorInfo] = {}
    spans = []
    for name, entry in header.items():
        try:
            dtype = ST_DTYPES[entry["dtype"]]
            shape = tuple(int(s) for s in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise BtxError(f"{path}: malformed header entry for tensor {name}: {entry!r}") from None
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
            raise BtxError(
                f"{path}: tensor {name} starts at byte {begin} of the data, expected {pos} (corrupt header)"
            )
        pos = end
    have = size - 8 - n
    if pos != have:
        raise BtxError(
            f"{path}: header says {pos} bytes of data but the file has {have} (truncated or corrupt)"
        )
    return infos, metadata


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
        self.cfg = config_from_hf(self.hf_config, source=config_path)

        self._handles: dict[str, object] = {}  # file -> open safe_open handle
        self._fds: dict[str, int] = {}  # file -> descriptor for read_into
        self.tensors: dict[str, TensorInfo] = {}
        self.metadata: dict[str, dict] = {}  # file -> its __metadata__
        for file in self._weight_files():
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
            head_equals_embed=lambda: torch.equal(
                self.get("lm_head.weight"), self.get("model.embed_tokens.weight")
            ),
        )

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
            raise BtxError(f"{index}: lists shard(s) that do not exist: {_few(absent)}")
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

    def get(
        self, name: str, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
    ) -> torch.Tensor:
        """One HF tensor, read from the memory-mapped file."""
        from safetensors import safe_open

        info = self.info(name)
        handle = self._handles.get(info.file)
        if handle is None:
            handle = self._handles[info.file] = safe_open(str(self.path / info.file), framework="pt")
        return _cast(handle.get_tensor(name), dtype, device)

    # -- btx-level access -----------------------------------------------------------------

    def btx_names(self) -> list[str]:
        return list(self.plan)

    def btx_shape(self, name: str) -> tuple[int, ...]:
        return self._btx_shapes[name]

    def get_btx(
        self, name: str, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
    ) -> torch.Tensor:
        """One btx parameter (expert weights stacked), optionally cast."""
        try:
            src = self.plan[name]
        except KeyError:
            raise KeyError(f"{name!r} is not a parameter of this checkpoint's model") from None
        return _cast(_assemble(src, [self.get(n) for n in src.hf_names]), dtype, device)

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
        return FileRange(self.path / info.file, start, nbytes)

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
        fd = self._fds.get(info.file)
        if fd is None:
            fd = self._fds[info.file] = os.open(self.path / info.file, os.O_RDONLY)
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        view = memoryview(out.reshape(-1).view(torch.uint8).numpy()) if nbytes else memoryview(b"")
        done = 0
        while done < nbytes:
            got = os.preadv(fd, [view[done:]], start + done)
            if got <= 0:
                raise BtxError(f"{self.path / info.file}: ends inside tensor {name} (truncated while reading?)")
            done += got
        if hasattr(os, "posix_fadvise"):
            # A merge reads several files in turn, tensor by tensor; asking the kernel for the next
            # stretch of this file now lets the disk work while the other files are read and the
            # output is written, instead of each read waiting on a cold page cache.
            os.posix_fadvise(fd, start + nbytes, READ_AHEAD_BYTES, os.POSIX_FADV_WILLNEED)
        return out.view(info.dtype).view(shape)

    def close(self) -> None:
        self._handles.clear()  # safe_open handles unmap when dropped
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------------------------
# Streaming writes
# --------------------------------------------------------------------------------------------


def parse_size(size: int | str) -> int:
    """Bytes from 123, "500MB", "5GB" or "2GiB" (decimal units as transformers uses them)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", str(size), re.IGNORECASE)
    if not m:
        raise BtxError(f"shard size {size!r}: expected bytes or a size like '500MB' or '5GB'")
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base ** " KMGT".index(m.group(2).upper() or " "))


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
                file_hashes.append(hasher.submit(update_from_file, digest, out.path, out.offset, out.nbytes))
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
        raise ValueError(f"tensor name(s) given twice: {_few(dupes)}")
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


# --------------------------------------------------------------------------------------------
# Whole-model conveniences
# --------------------------------------------------------------------------------------------


def save_model(
    model_or_state_dict,
    cfg: ModelConfig | None,
    out_dir: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    shard_size: int | str = DEFAULT_SHARD_SIZE,
    tokenizer_from: str | os.PathLike | None = None,
    force: bool = False,
    atomic: bool = True,
    on_tensor: Callable[[str, int], None] | None = None,
) -> dict[str, str]:
    """Save a btx Transformer (or its state dict) as an HF checkpoint; returns {file: sha256}.

    Every tensor is stored in one `dtype` (default: the embedding's), the router too, as
    transformers and vLLM expect a uniform checkpoint; btx upcasts the router to fp32 on load.
    `cfg` may be None for a model that carries `.cfg`.
    """
    if isinstance(model_or_state_dict, torch.nn.Module):
        cfg = cfg if cfg is not None else model_or_state_dict.cfg
        state_dict = model_or_state_dict.state_dict()
    else:
        state_dict = model_or_state_dict
    if cfg is None:
        raise ValueError("save_model needs a ModelConfig for a plain state dict")
    dtype = dtype or state_dict["embed.weight"].dtype
    return write_checkpoint(
        out_dir,
        cfg,
        hf_specs_from_btx(state_dict, cfg, dtype),
        shard_size=shard_size,
        tokenizer_from=tokenizer_from,
        force=force,
        atomic=atomic,
        on_tensor=on_tensor,
    )


def load_state_dict(
    path: str | os.PathLike, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(cfg, btx state dict) of an HF checkpoint. Floating tensors are cast to `dtype` when
    given (else kept as stored); routers are always fp32, as btx's model keeps them."""
    with CheckpointReader(path) as ckpt:
        sd = {}
        for name in ckpt.btx_names():
            want = torch.float32 if name.endswith("ffn.router.weight") else dtype
            sd[name] = ckpt.get_btx(name, want, device)
        return ckpt.cfg, sd


def load_model(
    path: str | os.PathLike, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
):
    """A btx `Transformer` with the weights of an HF checkpoint (see `load_state_dict`)."""
    from btx.model import Transformer  # lazily: hf.py's I/O does not need the model class

    cfg, sd = load_state_dict(path, dtype, device)
    try:  # build parameters on the meta device and adopt the loaded tensors: no wasted init
        from accelerate import init_empty_weights

        with init_empty_weights(include_buffers=False):
            model = Transformer(cfg)
        model.load_state_dict(sd, strict=True, assign=True)
    except ImportError:  # pragma: no cover - accelerate is a btx dependency
        model = Transformer(cfg)
        model.load_state_dict(sd, strict=True)
    return model.to(device)
