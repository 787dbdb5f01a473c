"""Hugging Face checkpoint layout: config.json <-> ModelConfig, the one key table, lazy reads,
streaming writes.

A btx checkpoint is a plain HF directory: `LlamaForCausalLM` for dense models, the classic
`MixtralForCausalLM` layout for MoE models, so transformers (4.x and 5.x), vLLM and
lm-evaluation-harness open it with no btx code.

- `KEY_TABLE` is the single source of truth for names. Every conversion (btx -> HF when writing,
  HF -> btx when reading, the `hf_name_for` / `btx_name_for` helpers) goes through it.
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

from btx.errors import BtxError
from btx.manifest import atomic_dir, sha256_file, update_from_file
from btx.model import ROUTER_MODES, ModelConfig

__all__ = [
    "KEY_TABLE",
    "KeyRule",
    "CheckpointReader",
    "FileRange",
    "TensorSpec",
    "TensorInfo",
    "atomic_dir",
    "btx_name_for",
    "btx_shapes",
    "btx_state_dict_from_hf",
    "config_from_hf",
    "config_to_hf",
    "copy_tokenizer_files",
    "hf_name_for",
    "hf_names_for",
    "hf_shapes",
    "hf_specs_from_btx",
    "hf_tensors_from_btx",
    "load_model",
    "load_state_dict",
    "read_safetensors_header",
    "save_model",
    "write_checkpoint",
]

CONFIG_NAME = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Files a checkpoint carries along from its source so that it is usable on its own.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "generation_config.json",
    "btx_tokenizer.json",
)
DEFAULT_SHARD_SIZE = 5 * 10**9  # transformers' and mergekit's default: 5 GB


# --------------------------------------------------------------------------------------------
# config.json <-> ModelConfig
# --------------------------------------------------------------------------------------------

SUPPORTED = {"llama": "LlamaForCausalLM", "mixtral": "MixtralForCausalLM"}
# transformers' defaults for fields a config.json may leave out, so btx reads what it would.
DEFAULT_ROPE_THETA = {"llama": 10000.0, "mixtral": 1e6}
DEFAULT_NORM_EPS = {"llama": 1e-6, "mixtral": 1e-5}
DEFAULT_MAX_POSITIONS = {"llama": 2048, "mixtral": 4096 * 32}
LLAMA3_FIELDS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
BTX_MOE_FIELDS = ("router_mode", "top_k", "capacity_factor", "gumbel_rate", "first_layer_soft")
# Written for people (how transformers will run this routing mode); ignored when read back.
BTX_NOTE_FIELD = "inference_note"

# Fields config_to_hf derives from ModelConfig; they are never carried through `extra`.
_OWNED = {
    "architectures", "model_type", "vocab_size", "hidden_size", "intermediate_size",
    "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
    "rope_theta", "rope_scaling", "rope_parameters", "max_position_embeddings",
    "tie_word_embeddings", "num_local_experts", "num_experts_per_tok", "hidden_act", "btx",
}  # fmt: skip
# `torch_dtype` / `dtype` are carried in `extra` and overwritten when a writer knows the dtype.
# Fields that describe the program that wrote a file, not the model.
_DROPPED = {"transformers_version", "_name_or_path"}
# Fields that only one of the two architectures has; dropped when writing the other one.
_MIXTRAL_ONLY = {"router_aux_loss_coef", "output_router_logits", "router_jitter_noise"}
_LLAMA_ONLY = {"attention_bias", "mlp_bias", "pretraining_tp"}

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def config_from_hf(hf: Mapping, source: str | os.PathLike = CONFIG_NAME) -> ModelConfig:
    """Read a Llama or Mixtral config.json (as a dict). Errors name `source` and the field."""
    src = str(source)

    def need(key: str, kind=int):
        if key not in hf or hf[key] is None:
            raise BtxError(f"{src}: missing '{key}'")
        value = hf[key]
        if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise BtxError(f"{src}: '{key}' must be an integer, got {value!r}")
        if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise BtxError(f"{src}: '{key}' must be a number, got {value!r}")
        return value

    model_type = hf.get("model_type")
    if model_type not in SUPPORTED:
        raise BtxError(
            f"{src}: model_type {model_type!r} is not supported; btx reads "
            + " and ".join(f"'{t}' ({a})" for t, a in SUPPORTED.items())
        )
    archs = hf.get("architectures") or [SUPPORTED[model_type]]
    if archs != [SUPPORTED[model_type]]:
        raise BtxError(
            f"{src}: architectures {archs!r} is not supported for model_type '{model_type}'; "
            f"expected ['{SUPPORTED[model_type]}']"
        )
    # Llama variants btx's model does not implement: refuse rather than compute something else.
    if hf.get("hidden_act", "silu") != "silu":
        raise BtxError(f"{src}: hidden_act {hf['hidden_act']!r} is not supported; btx implements 'silu'")
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            raise BtxError(f"{src}: '{flag}: true' is not supported; btx's projections have no bias")

    dim, n_heads = need("hidden_size"), need("num_attention_heads")
    n_kv_heads = hf.get("num_key_value_heads")
    n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
    if dim % n_heads:
        raise BtxError(f"{src}: hidden_size {dim} is not a multiple of num_attention_heads {n_heads}")
    if not isinstance(n_kv_heads, int) or n_kv_heads <= 0 or n_heads % n_kv_heads:
        raise BtxError(
            f"{src}: num_key_value_heads {n_kv_heads!r} must divide num_attention_heads {n_heads}"
        )
    head_dim = hf.get("head_dim")
    if head_dim is not None and head_dim != dim // n_heads:
        raise BtxError(
            f"{src}: head_dim {head_dim} differs from hidden_size/num_attention_heads = "
            f"{dim // n_heads}; btx supports only head_dim == hidden_size / num_attention_heads"
        )

    rope_theta, rope_scaling = _read_rope(hf, model_type, src)

    kw: dict = dict(
        vocab_size=need("vocab_size"),
        dim=dim,
        n_layers=need("num_hidden_layers"),
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        ffn_dim=need("intermediate_size"),
        rope_theta=float(rope_theta),
        rope_scaling=rope_scaling,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        norm_eps=DEFAULT_NORM_EPS[model_type],
        max_seq_len=DEFAULT_MAX_POSITIONS[model_type],
    )
    if hf.get("rms_norm_eps") is not None:
        kw["norm_eps"] = float(need("rms_norm_eps", float))
    if hf.get("max_position_embeddings") is not None:
        kw["max_seq_len"] = need("max_position_embeddings")
    if model_type == "mixtral":
        kw["n_experts"] = need("num_local_experts")
        kw["top_k"] = need("num_experts_per_tok")
        if kw["n_experts"] < 1 or not 1 <= kw["top_k"] <= kw["n_experts"]:
            raise BtxError(
                f"{src}: need 1 <= num_experts_per_tok ({kw['top_k']}) <= num_local_experts "
                f"({kw['n_experts']})"
            )
        kw.update(_read_btx_moe(hf.get("btx"), src))  # btx.top_k: the k of topk, whatever the mode
        if kw["top_k"] > kw["n_experts"]:
            raise BtxError(f"{src}: btx.top_k {kw['top_k']} is more than num_local_experts {kw['n_experts']}")

    kw["extra"] = {k: v for k, v in hf.items() if k not in _OWNED and k not in _DROPPED}
    return ModelConfig(**kw)


def _read_rope(hf: Mapping, model_type: str, src: str) -> tuple[float, dict | None]:
    """rope_theta and Llama-3 scaling from either spelling.

    transformers 4.x writes top-level `rope_theta` / `rope_scaling`; 5.x writes only
    `rope_parameters: {rope_theta, rope_type, ...}`. When both are present they must agree,
    otherwise the two transformers versions would load different models from the same file.
    """
    params = hf.get("rope_parameters")
    if params is not None and not isinstance(params, dict):
        raise BtxError(f"{src}: 'rope_parameters' must be an object, got {params!r}")
    top_theta, top_scaling = hf.get("rope_theta"), hf.get("rope_scaling")
    if params:
        theta = params.get("rope_theta", top_theta)
        scaling = _read_rope_scaling(params, src, "rope_parameters")
        if top_theta is not None and theta is not None and float(top_theta) != float(theta):
            raise BtxError(
                f"{src}: rope_theta {top_theta} disagrees with rope_parameters.rope_theta {theta}; "
                "transformers 4.x would use the first, 5.x the second"
            )
        if top_scaling is not None and _read_rope_scaling(top_scaling, src, "rope_scaling") != scaling:
            raise BtxError(f"{src}: rope_scaling disagrees with rope_parameters; fix one of them")
    else:
        theta = top_theta
        scaling = _read_rope_scaling(top_scaling, src, "rope_scaling") if top_scaling else None
    if theta is None:
        theta = DEFAULT_ROPE_THETA[model_type]
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or theta <= 0:
        raise BtxError(f"{src}: rope_theta must be a positive number, got {theta!r}")
    return float(theta), scaling


def _read_rope_scaling(d: Mapping, src: str, where: str) -> dict | None:
    if not isinstance(d, Mapping):
        raise BtxError(f"{src}: '{where}' must be an object, got {d!r}")
    rope_type = d.get("rope_type") or d.get("type") or "default"  # "type": the pre-4.45 spelling
    if rope_type in (None, "default"):
        return None
    if rope_type != "llama3":
        raise BtxError(
            f"{src}: {where} rope_type {rope_type!r} is not supported; btx supports 'default' and 'llama3'"
        )
    missing = [f for f in LLAMA3_FIELDS if d.get(f) is None]
    if missing:
        raise BtxError(f"{src}: {where} of rope_type 'llama3' lacks {', '.join(missing)}")
    out: dict = {"rope_type": "llama3"}
    for f in LLAMA3_FIELDS:
        out[f] = int(d[f]) if f == "original_max_position_embeddings" else float(d[f])
    return out


def _read_btx_moe(section, src: str) -> dict:
    """btx's own MoE settings, kept under "btx" in config.json (transformers ignores them)."""
    if section is None:
        return {}
    if not isinstance(section, dict):
        raise BtxError(f"{src}: 'btx' must be an object, got {section!r}")
    unknown = sorted(set(section) - set(BTX_MOE_FIELDS) - {BTX_NOTE_FIELD})
    if unknown:
        raise BtxError(f"{src}: unknown key(s) {unknown} under 'btx'; known: {list(BTX_MOE_FIELDS)}")
    out = {k: v for k, v in section.items() if k != BTX_NOTE_FIELD}
    if "top_k" in out and (isinstance(out["top_k"], bool) or not isinstance(out["top_k"], int) or out["top_k"] < 1):
        raise BtxError(f"{src}: btx.top_k must be a positive integer, got {out['top_k']!r}")
    if "router_mode" in out and out["router_mode"] not in ROUTER_MODES:
        raise BtxError(f"{src}: btx.router_mode {out['router_mode']!r} is not one of {list(ROUTER_MODES)}")
    return out


def inference_note(cfg: ModelConfig) -> str | None:
    """How transformers' Mixtral (one softmax -> top-k -> renormalise for every layer) runs this
    routing mode, for the "btx" section of config.json; None where it runs exactly what btx runs."""
    k, E = cfg.experts_per_token, cfg.n_experts
    if cfg.router_mode == "soft":
        return (f"soft routing: num_experts_per_tok = {E} = num_local_experts, so Mixtral's softmax over "
                f"the top-{E} logits is the softmax over all experts and transformers computes exactly "
                "what btx computes")
    if cfg.router_mode == "switch":
        return ("switch routing: transformers runs top-1 with no capacity limit (no token is dropped) and "
                "a gate of 1 after renormalisation, where btx scales the chosen expert by its router "
                "probability and drops tokens beyond the capacity factor "
                f"{cfg.capacity_factor}; outputs differ from btx's")
    if cfg.router_mode == "sample_top1":
        note = ("sample_top1 routing: at inference btx takes the router's argmax with gate 1, which is "
                "Mixtral's top-1 exactly")
        if cfg.first_layer_soft:
            note += (f"; but btx routes the first MoE layer softly over all {E} experts and Mixtral has one "
                     f"num_experts_per_tok ({k}) for every layer, so transformers' first layer differs")
        return note
    return None


def config_to_hf(cfg: ModelConfig, dtype: torch.dtype | None = None) -> dict:
    """The config.json for `cfg`: LlamaForCausalLM when dense, MixtralForCausalLM when MoE.

    Rope is written in both spellings (top-level for transformers 4.x, `rope_parameters` for 5.x)
    so both versions load exactly this model. `dtype` is recorded as `torch_dtype` (4.x) and
    `dtype` (5.x). Fields btx does not model ride along from `cfg.extra`.
    """
    model_type = "mixtral" if cfg.is_moe else "llama"
    out: dict = {
        "architectures": [SUPPORTED[model_type]],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps,
        "max_position_embeddings": cfg.max_seq_len,
        "tie_word_embeddings": cfg.tie_embeddings,
        "rope_theta": cfg.rope_theta,
    }
    rope_parameters: dict = {"rope_theta": cfg.rope_theta, "rope_type": "default"}
    if cfg.rope_scaling:
        scaling = _read_rope_scaling(cfg.rope_scaling, "ModelConfig", "rope_scaling")
        out["rope_scaling"] = scaling
        rope_parameters.update(scaling)
    out["rope_parameters"] = rope_parameters
    if cfg.is_moe:
        out["num_local_experts"] = cfg.n_experts
        # Mixtral's softmax -> top-k -> renormalise with the k that reproduces the routing mode
        # (soft: all E experts; switch, sample_top1: 1); btx's own settings go under "btx".
        out["num_experts_per_tok"] = cfg.experts_per_token
        # transformers only reads these when training; the paper's balancing alpha is the default.
        out["router_aux_loss_coef"] = cfg.extra.get("router_aux_loss_coef", 0.01)
        out["output_router_logits"] = cfg.extra.get("output_router_logits", False)
        out["btx"] = {f: getattr(cfg, f) for f in BTX_MOE_FIELDS}
        note = inference_note(cfg)
        if note:
            out["btx"][BTX_NOTE_FIELD] = note
    if dtype is not None:
        out["torch_dtype"] = out["dtype"] = _DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))
    other_only = _LLAMA_ONLY if cfg.is_moe else _MIXTRAL_ONLY
    for k, v in cfg.extra.items():
        if k not in out and k not in _OWNED and k not in _DROPPED and k not in other_only:
            out[k] = v
    return out


# --------------------------------------------------------------------------------------------
# The key table
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyRule:
    """One btx parameter and the HF tensor(s) it is stored as. `{i}` layer, `{e}` expert.

    layout:
      "same"        one tensor each side, identical.
      "expert"      btx stacks experts on dim 0; HF has one tensor per expert `{e}`.
      "gate_half"   (read only) HF 5.x fused `gate_up_proj` [E, 2F, D]: btx w1 is rows [:F].
      "up_half"     (read only) ... btx w3 is rows [F:].
    canonical: False marks a spelling btx accepts when reading but never writes.
    """

    btx: str
    hf: str
    layout: str = "same"
    canonical: bool = True


_L = "model.layers.{i}"
KEY_TABLE: tuple[KeyRule, ...] = (
    KeyRule("embed.weight", "model.embed_tokens.weight"),
    KeyRule("layers.{i}.attn_norm.weight", f"{_L}.input_layernorm.weight"),
    KeyRule("layers.{i}.attn.wq.weight", f"{_L}.self_attn.q_proj.weight"),
    KeyRule("layers.{i}.attn.wk.weight", f"{_L}.self_attn.k_proj.weight"),
    KeyRule("layers.{i}.attn.wv.weight", f"{_L}.self_attn.v_proj.weight"),
    KeyRule("layers.{i}.attn.wo.weight", f"{_L}.self_attn.o_proj.weight"),
    KeyRule("layers.{i}.ffn_norm.weight", f"{_L}.post_attention_layernorm.weight"),
    # dense SwiGLU
    KeyRule("layers.{i}.ffn.w1.weight", f"{_L}.mlp.gate_proj.weight"),
    KeyRule("layers.{i}.ffn.w3.weight", f"{_L}.mlp.up_proj.weight"),
    KeyRule("layers.{i}.ffn.w2.weight", f"{_L}.mlp.down_proj.weight"),
    # MoE: classic Mixtral layout, which transformers 4.x and 5.x save_pretrained and vLLM read
    KeyRule("layers.{i}.ffn.router.weight", f"{_L}.block_sparse_moe.gate.weight"),
    KeyRule("layers.{i}.ffn.w1", f"{_L}.block_sparse_moe.experts.{{e}}.w1.weight", "expert"),
    KeyRule("layers.{i}.ffn.w3", f"{_L}.block_sparse_moe.experts.{{e}}.w3.weight", "expert"),
    KeyRule("layers.{i}.ffn.w2", f"{_L}.block_sparse_moe.experts.{{e}}.w2.weight", "expert"),
    KeyRule("norm.weight", "model.norm.weight"),
    KeyRule("lm_head.weight", "lm_head.weight"),
    # Read only: the fused names of a live transformers 5.x Mixtral (its state_dict(), or a file
    # saved from it with plain safetensors), so btx can take weights from such a model too.
    KeyRule("layers.{i}.ffn.router.weight", f"{_L}.mlp.gate.weight", canonical=False),
    KeyRule("layers.{i}.ffn.w1", f"{_L}.mlp.experts.gate_up_proj", "gate_half", canonical=False),
    KeyRule("layers.{i}.ffn.w3", f"{_L}.mlp.experts.gate_up_proj", "up_half", canonical=False),
    KeyRule("layers.{i}.ffn.w2", f"{_L}.mlp.experts.down_proj", canonical=False),
)
# HF buffers some older checkpoints carry that are recomputed, not learned: skipped on read.
IGNORED_HF_SUFFIXES = (".rotary_emb.inv_freq",)


def _regex(pattern: str) -> re.Pattern:
    body = re.escape(pattern).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{e\}", r"(?P<e>\d+)")
    return re.compile(f"^{body}$")


_BTX_RE = [(_regex(r.btx), r) for r in KEY_TABLE if r.canonical]
_HF_RE = [(_regex(r.hf), r) for r in KEY_TABLE if r.canonical]
_ALL_BTX_RE = [(_regex(r.btx), r) for r in KEY_TABLE]  # canonical rows come first in KEY_TABLE


def _canonical_rule(btx_name: str) -> tuple[KeyRule, str | None]:
    for rx, rule in _BTX_RE:
        if m := rx.match(btx_name):
            return rule, m.groupdict().get("i")
    raise KeyError(f"{btx_name!r} is not a btx parameter name known to hf.KEY_TABLE")


def hf_name_for(btx_name: str, expert: int | None = None) -> str:
    """The HF name of a btx parameter; stacked expert weights need the expert index."""
    rule, i = _canonical_rule(btx_name)
    if rule.layout == "expert":
        if expert is None:
            raise ValueError(f"{btx_name!r} stacks experts; pass expert=<index>")
        return rule.hf.format(i=i, e=expert)
    if expert is not None:
        raise ValueError(f"{btx_name!r} is not an expert-stacked weight")
    return rule.hf.format(i=i)


def hf_names_for(btx_name: str, n_experts: int = 0) -> list[str]:
    """All HF names a btx parameter is stored as (one per expert for stacked weights)."""
    rule, _ = _canonical_rule(btx_name)
    if rule.layout == "expert":
        return [hf_name_for(btx_name, e) for e in range(n_experts)]
    return [hf_name_for(btx_name)]


def btx_name_for(hf_name: str) -> tuple[str, int | None]:
    """(btx name, expert index or None) for a canonical HF name."""
    for rx, rule in _HF_RE:
        if m := rx.match(hf_name):
            e = m.groupdict().get("e")
            return rule.btx.format(i=m.groupdict().get("i")), None if e is None else int(e)
    raise KeyError(f"{hf_name!r} is not a tensor name btx knows (see hf.KEY_TABLE)")


def btx_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every btx parameter `cfg` implies, with its shape, in checkpoint order (see CONTRACTS.md)."""
    D, F, E, V = cfg.dim, cfg.ffn_dim, cfg.n_experts, cfg.vocab_size
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    out: dict[str, tuple[int, ...]] = {"embed.weight": (V, D)}
    for i in range(cfg.n_layers):
        p = f"layers.{i}"
        out |= {
            f"{p}.attn_norm.weight": (D,),
            f"{p}.attn.wq.weight": (q, D),
            f"{p}.attn.wk.weight": (kv, D),
            f"{p}.attn.wv.weight": (kv, D),
            f"{p}.attn.wo.weight": (D, q),
            f"{p}.ffn_norm.weight": (D,),
        }
        if cfg.is_moe:
            out |= {
                f"{p}.ffn.router.weight": (E, D),
                f"{p}.ffn.w1": (E, F, D),
                f"{p}.ffn.w3": (E, F, D),
                f"{p}.ffn.w2": (E, D, F),
            }
        else:
            out |= {
                f"{p}.ffn.w1.weight": (F, D),
                f"{p}.ffn.w3.weight": (F, D),
                f"{p}.ffn.w2.weight": (D, F),
            }
    out["norm.weight"] = (D,)
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = (V, D)
    return out


def hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every HF tensor a btx checkpoint of `cfg` holds, with its shape, in checkpoint order."""
    out: dict[str, tuple[int, ...]] = {}
    for name, shape in btx_shapes(cfg).items():
        stacked = _canonical_rule(name)[0].layout == "expert"
        for hf in hf_names_for(name, cfg.n_experts):
            out[hf] = shape[1:] if stacked else shape
    return out


def hf_tensors_from_btx(state_dict: Mapping[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) for every btx parameter, experts unstacked (as views, nothing copied)."""
    for name, tensor in state_dict.items():
        rule, _ = _canonical_rule(name)
        if rule.layout == "expert":
            for e in range(tensor.shape[0]):
                yield hf_name_for(name, e), tensor[e]
        else:
            yield hf_name_for(name), tensor


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
    """Write specs for a btx state dict, in checkpoint order, checked against `cfg`."""
    want = btx_shapes(cfg)
    missing = [k for k in want if k not in state_dict]
    extra = [k for k in state_dict if k not in want]
    if missing or extra:
        raise ValueError(
            f"state dict does not match the config: missing {_few(missing)}, unexpected {_few(extra)}"
        )
    specs = []
    for name, shape in want.items():
        t = state_dict[name]
        if tuple(t.shape) != shape:
            raise ValueError(f"state dict: {name} has shape {tuple(t.shape)}, the config implies {shape}")
        if _canonical_rule(name)[0].layout == "expert":
            for e in range(shape[0]):
                specs.append(TensorSpec(hf_name_for(name, e), shape[1:], dtype, lambda t=t, e=e: t[e]))
        else:
            specs.append(TensorSpec(hf_name_for(name), shape, dtype, lambda t=t: t))
    return specs


class BtxSource(NamedTuple):
    """Where one btx parameter comes from in an HF checkpoint."""

    rule: KeyRule
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
    plan: dict[str, BtxSource] = {}
    missing: list[str] = []
    for name, shape in btx_shapes(cfg).items():
        i = _canonical_rule(name)[1]
        for rule in (r for rx, r in _ALL_BTX_RE if rx.match(name)):  # canonical spelling first
            experts = range(cfg.n_experts) if rule.layout == "expert" else [None]
            names = [rule.hf.format(i=i, e=e) for e in experts]
            if all(n in available for n in names):
                plan[name] = BtxSource(rule, names)
                break
        else:  # report what the canonical spelling lacks
            missing += [n for n in hf_names_for(name, cfg.n_experts) if n not in available]
    if missing:
        raise BtxError(
            f"{source}: missing {len(missing)} tensor(s) that config.json implies: {_few(missing)}"
        )

    used = {n for src in plan.values() for n in src.hf_names}
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
            raise BtxError(f"{self.path}: not a checkpoint directory (missing, or a file)")
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
