"""Checkpoint layout: config.json <-> ModelConfig, and btx tensor names <-> HF tensor names.

- Names: each family's key table (btx/families/, through `key_table(cfg)`) is the single source of
  truth. Every conversion (btx -> HF when writing, HF -> btx when reading) goes through it.
- `hf_specs_from_btx` describes the HF tensors of a btx state dict without materialising them;
  `plan_btx_from_hf` says which HF tensors (or parts) make each btx parameter, so a reader can
  fill a model one tensor at a time.

Shape legend: V vocab, D model dim, F ffn dim, E experts, H heads, G kv heads, Hd head dim.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import NamedTuple

import torch

from btx import families
from btx.errors import BtxError
from btx.families import key_table
from btx.io.finite import check_finite
from btx.model.config import ModelConfig

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


def config_to_hf(cfg: ModelConfig, dtype: torch.dtype | None = None) -> dict:
    """The config.json for `cfg` in its family's dense or MoE form (see btx.families.write_config)."""
    return families.write_config(
        cfg, None if dtype is None else _DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))
    )


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
    if src.dtype is not None:  # bytes the reader left for the writer to check (btx.io.finite)
        check_finite(buf, str(src.path), src.name)
    return buf


def hf_tensors_from_btx(state_dict: Mapping[str, torch.Tensor], cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) for every tensor of a btx state dict's checkpoint: experts unstacked as
    views (nothing copied), or gathered into the fused tensors a form stores."""
    for t in key_table(cfg).layout({k: tuple(v.shape) for k, v in state_dict.items()}):
        yield (
            t.name,
            build_hf_tensor(
                t, lambda n, e: state_dict[n] if e is None else state_dict[n][e], state_dict[t.pieces[0].btx].dtype
            ),
        )


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
    # A floating dtype when the writer must check the bytes for NaN and Inf as it hashes them
    # (btx.io.finite.check_finite_bytes); `name` is the tensor's, for the message.
    dtype: torch.dtype | None = None
    name: str = ""


class TensorSpec(NamedTuple):
    """One tensor to write: its shape and dtype are known before its data is produced."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    produce: Callable[[], torch.Tensor | FileRange]


def hf_specs_from_btx(state_dict: Mapping[str, torch.Tensor], cfg: ModelConfig, dtype: torch.dtype) -> list[TensorSpec]:
    """Write specs for a btx state dict, in checkpoint order, checked against `cfg`, plus the
    zero tensors the family's form needs (btx.families.fillers)."""
    want = btx_shapes(cfg)
    missing = [k for k in want if k not in state_dict]
    extra = [k for k in state_dict if k not in want]
    if missing or extra:
        raise ValueError(
            f"state dict does not match the config: missing {first_few(missing)}, unexpected {first_few(extra)}"
        )
    for name, shape in want.items():
        if tuple(state_dict[name].shape) != shape:
            raise ValueError(
                f"state dict: {name} has shape {tuple(state_dict[name].shape)}, the config implies {shape}"
            )

    return hf_specs(cfg, state_dict.__getitem__, dtype)


def hf_specs(cfg: ModelConfig, weight: Callable[[str], torch.Tensor], dtype: torch.dtype) -> list[TensorSpec]:
    """Write specs for the checkpoint of `cfg`, in checkpoint order, whose btx parameters come
    from `weight(btx_name)`, called only when the writer produces a tensor made of it (an
    engine that gathers sharded weights on demand; `hf_specs_from_btx` for a state dict)."""

    def piece(name: str, e: int | None) -> torch.Tensor:
        return weight(name) if e is None else weight(name)[e]

    return [TensorSpec(t.name, t.shape, dtype, lambda t=t: build_hf_tensor(t, piece, dtype)) for t in hf_layout(cfg)]


class BtxSource(NamedTuple):
    """Where one btx parameter comes from in an HF checkpoint."""

    rule: families.KeyRule
    hf_names: list[str]


def first_few(names: list[str], n: int = 5) -> str:
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
        raise BtxError(f"{source}: missing {len(missing)} tensor(s) that config.json implies: {first_few(missing)}")

    fill = dict(families.fillers(cfg))  # zero tensors the form needs and btx does not load
    for n, shape in fill.items():
        if n in available and tuple(available[n]) != shape:
            loc = f" (in {located[n]})" if n in located else ""
            raise BtxError(
                f"{source}: tensor {n}{loc} has shape {list(available[n])}, but config.json implies {list(shape)}"
            )
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
        raise BtxError(f"{source}: {len(extra)} tensor(s) config.json does not explain: {first_few(where)}{hint}")

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


def assemble(src: BtxSource, tensors: list[torch.Tensor]) -> torch.Tensor:
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
    return {name: assemble(src, [hf_state_dict[n] for n in src.hf_names]) for name, src in plan.items()}
