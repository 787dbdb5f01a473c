"""The model families btx reads, and what they become when merged.

    family   dense seed (model_type)   MoE form btx writes
    llama    LlamaForCausalLM          MixtralForCausalLM (GraniteMoeForCausalLM with attention biases)
    mistral  MistralForCausalLM        MixtralForCausalLM (sliding_window carried)
    qwen2    Qwen2ForCausalLM          Qwen2MoeForCausalLM (zero-width shared expert)
    qwen3    Qwen3ForCausalLM          Qwen3MoeForCausalLM
    olmo2    Olmo2ForCausalLM          FlexOlmoForCausalLM

Each family is one file here (btx/families/<name>.py) holding one `Family` (see base.py): its
config fields and their ModelConfig meaning, its key table, its MoE form. This module holds what is
common to all of them, once:

- `read_config(config_json, source)`: any config.json btx reads, dense or MoE, to a ModelConfig.
  Unknown model types, and fields a family cannot honour, are refused with one line naming them.
- `write_config(cfg, dtype)`: the config.json of a ModelConfig, in its family's dense or MoE form.
  RoPE is written in both spellings (transformers 4.x `rope_theta`/`rope_scaling`, 5.x
  `rope_parameters`) so both versions load exactly this model.
- `key_table(cfg)`: the family's key rules for that form, used both ways by btx/io/.
- `fillers(cfg)`: zero tensors the form needs that btx's model does not hold.
- `moe_unsupported(cfg)`: why a dense model's MoE form cannot express it (merge refuses then).

To add a family: one file here defining FAMILY (dense form, MoE form, attention keys, switches;
it is found by name), and its variants in tests/test_families.py.
"""

from __future__ import annotations

import importlib
import math
import pkgutil
from collections.abc import Mapping

from btx.choices import ROUTER_MODES, WEIGHT_DTYPES
from btx.errors import BtxError
from btx.families.base import (
    EXPERT_PARAMS,
    Family,
    Filler,
    Form,
    HfTensor,
    KeyRule,
    KeyTable,
    Piece,
)
from btx.model.config import ROPE_TYPES, ModelConfig

__all__ = [
    "EXPERT_PARAMS", "FAMILIES", "Family", "Filler", "Form", "HfTensor", "KeyRule", "KeyTable", "Piece", "family_of",
    "fillers", "form_of",
    "key_table", "moe_unsupported", "read_config", "write_config",
]  # fmt: skip


def _discover() -> dict[str, Family]:
    """Every module of this package that defines FAMILY (base and form-only modules do not)."""
    found = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        family = getattr(module, "FAMILY", None)
        if family is not None:
            found[family.name] = family
    return found


# Listed first: the families researchers bring most; then any other family file, by name.
_ORDER = ("llama", "mistral", "qwen2", "qwen3", "olmo2")
_FOUND = _discover()
FAMILIES: dict[str, Family] = {n: _FOUND[n] for n in _ORDER if n in _FOUND} | _FOUND
_FAMILY_MODULES = tuple(FAMILIES)
# model_type -> (family, is MoE). Mixtral is the MoE form of both llama and mistral; a Mixtral
# read back is given the family btx recorded under "btx" (seed_family), else mistral (whose MoE
# Mixtral is). The choice only matters for writing a dense model, which no MoE turns into.
_BY_MODEL_TYPE: dict[str, tuple[str, bool]] = {}
for _name in reversed(_FAMILY_MODULES):  # the first family listed wins a shared MoE form
    for _form in FAMILIES[_name].moe_forms:
        _BY_MODEL_TYPE[_form.model_type] = (_name, True)
for _name in _FAMILY_MODULES:
    _BY_MODEL_TYPE[FAMILIES[_name].dense.model_type] = (_name, False)
_BY_MODEL_TYPE["mixtral"] = ("mistral", True)

# Families transformers has that btx does not read, and why (the line a user gets).
NOT_READ = {
    "gemma": "its RMSNorm scales by (1 + weight), its embeddings by sqrt(hidden_size) and its FFN is GeGLU, "
    "and transformers has no MoE form of it",
    "gemma2": "it soft-caps attention and final logits and norms both sides of each sublayer; transformers has "
    "no MoE form of it",
    "gemma3": "it soft-caps logits, mixes local and global attention with two RoPE bases and norms both sides "
    "of each sublayer; transformers has no MoE form of it",
    "gemma3_text": "it soft-caps logits, mixes local and global attention with two RoPE bases and norms both "
    "sides of each sublayer; transformers has no MoE form of it",
    "phi3": "it fuses q/k/v and gate/up into single projections with partial rotary embeddings, and its MoE "
    "class (phimoe) uses LayerNorm and a different router",
    "phi": "it uses LayerNorm, a parallel attention/MLP block and partial rotary embeddings",
    "granite": "it scales embeddings, residuals, attention and logits by multipliers btx's model does not have",
    "olmo": "it uses non-parametric LayerNorm (no weights) and optional q/k/v clipping",
    "gpt2": "it uses learned positions, LayerNorm and a GELU MLP",
    "gpt_neox": "it uses LayerNorm, a parallel block and partial rotary embeddings",
    "falcon": "it uses LayerNorm and a parallel attention/MLP block",
    "cohere": "it uses LayerNorm, a parallel block and logit scaling",
    "starcoder2": "it uses LayerNorm and a GELU MLP with biases",
    "llama4": "it interleaves chunked and no-RoPE attention layers and is itself an MoE",
    "deepseek_v3": "it is already an MoE with multi-head latent attention",
}
for _moe in ("qwen2_moe", "qwen3_moe", "mixtral", "flex_olmo"):
    assert _moe in _BY_MODEL_TYPE

# Fields every form has; read and written here, never carried as extras.
_COMMON = frozenset({
    "architectures", "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act", "rms_norm_eps", "rope_theta",
    "rope_scaling", "rope_parameters", "max_position_embeddings", "tie_word_embeddings", "btx",
    "num_experts_per_tok", "router_aux_loss_coef", "output_router_logits",
})  # fmt: skip
# Fields that describe the program that wrote a file, not the model.
_DROPPED = frozenset({"transformers_version", "_name_or_path"})
# Fields of other model types that change what a model computes and btx's model cannot do: a config
# carrying them (say a Granite or Gemma relabelled as llama) is refused, not computed wrongly.
_NOT_HONOURED = {
    "quantization_config": "a quantized checkpoint; btx trains and merges full-precision weights (dequantize it first)",
    "embedding_multiplier": "Granite's embedding multiplier",
    "residual_multiplier": "Granite's residual multiplier",
    "attention_multiplier": "Granite's attention multiplier",
    "logits_scaling": "Granite's logit scaling",
    "final_logit_softcapping": "logit soft-capping (Gemma 2/3)",
    "attn_logit_softcapping": "attention soft-capping (Gemma 2/3)",
    "query_pre_attn_scalar": "Gemma's query scaling",
    "hidden_activation": "Gemma's FFN activation",
    "clip_qkv": "OLMo's q/k/v clipping",
    "attention_chunk_size": "Llama 4's chunked attention",
    "no_rope_layers": "Llama 4's layers without RoPE",
    "use_qk_norm": "a q/k norm this family does not have",
    "qk_layernorm": "a q/k LayerNorm this family does not have",
    "use_parallel_residual": "a parallel attention/MLP block",
    "parallel_attn": "a parallel attention/MLP block",
    "mrope_section": "multimodal RoPE sections",
}
_INERT = (None, False, 0, 1, 1.0, [], {})  # values of those fields that change nothing
_BTX_MOE_FIELDS = ("router_mode", "top_k", "capacity_factor", "gumbel_rate", "first_layer_soft")
BTX_NOTE_FIELD = "inference_note"  # written for people under "btx"; ignored when read back
BTX_SEED_FAMILY = "seed_family"
BTX_EXPERTS = "experts"  # the experts' names, in order


def _known_elsewhere() -> frozenset[str]:
    out = set()
    for fam in FAMILIES.values():
        for form in (fam.dense, *fam.moe_forms):
            out |= form.fields | {form.experts_field, form.expert_width_field}
    return frozenset(out - {""})


_FORM_FIELDS = _known_elsewhere()  # written by each form for itself, never carried over


def family_of(cfg: ModelConfig) -> Family:
    try:
        return FAMILIES[cfg.family]
    except KeyError:
        raise ValueError(f"unknown model family {cfg.family!r}; btx knows {', '.join(FAMILIES)}") from None


def form_of(cfg: ModelConfig) -> Form:
    return family_of(cfg).form_for(cfg)


_TABLES: dict[tuple[str, bool], KeyTable] = {}


def key_table(cfg: ModelConfig) -> KeyTable:
    form = form_of(cfg)
    key = (cfg.family, form.model_type)
    if key not in _TABLES:
        _TABLES[key] = KeyTable(family_of(cfg).keys(form))
    return _TABLES[key]


def fillers(cfg: ModelConfig) -> list[tuple[str, tuple[int, ...]]]:
    """(HF name, shape) of the zero tensors `cfg`'s form needs beyond btx's parameters."""
    return [(f.hf.format(i=i), f.shape(cfg)) for f in form_of(cfg).fillers if f.when(cfg) for i in range(cfg.n_layers)]


def moe_unsupported(cfg: ModelConfig) -> str | None:
    """Why none of the MoE forms of dense `cfg`'s family can express it (the default form's reason), or None."""
    fam = family_of(cfg)
    if any(form.unsupported(cfg) is None for form in fam.moe_forms):
        return None
    return f"{fam.moe.architecture} cannot express this {fam.dense.architecture}: {fam.moe.unsupported(cfg)}"


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def supported_types() -> str:
    dense = ", ".join(f"'{f.dense.model_type}'" for f in FAMILIES.values())
    moe = ", ".join(sorted({f"'{m.model_type}'" for f in FAMILIES.values() for m in f.moe_forms}))
    return f"btx reads the dense families {dense} and their MoE forms {moe}"


def read_config(hf: Mapping, source="config.json") -> ModelConfig:
    """A ModelConfig from any config.json btx reads (as a dict). Errors name `source` and the field."""
    src = str(source)
    model_type = hf.get("model_type")
    if model_type not in _BY_MODEL_TYPE:
        why = NOT_READ.get(model_type)
        reason = f" ({why})" if why else ""
        raise BtxError(f"{src}: model_type {model_type!r} is not supported{reason}; {supported_types()}")
    name, moe = _BY_MODEL_TYPE[model_type]
    btx_section = hf.get("btx")
    if moe and isinstance(btx_section, dict) and btx_section.get(BTX_SEED_FAMILY) in FAMILIES:
        seed_family = btx_section[BTX_SEED_FAMILY]
        if model_type in (f.model_type for f in FAMILIES[seed_family].moe_forms):
            name = seed_family
    fam = FAMILIES[name]
    form = fam.dense if not moe else next(f for f in fam.moe_forms if f.model_type == model_type)

    archs = hf.get("architectures") or [form.architecture]
    if archs != [form.architecture]:
        raise BtxError(
            f"{src}: architectures {archs!r} is not supported for model_type '{model_type}'; "
            f"expected ['{form.architecture}']"
        )
    for key, what in _NOT_HONOURED.items():
        if key in hf and hf[key] not in _INERT and key not in form.fields:  # a form that has it checks it
            raise BtxError(
                f"{src}: '{key}' is {what}, which btx's {name} model does not implement; "
                f"{model_type} checkpoints with it are not supported"
            )
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise BtxError(f"{src}: hidden_act {act!r} is not supported; btx's FFN is SwiGLU ('silu')")

    def need(key: str) -> int:
        value = hf.get(key)
        if value is None:
            raise BtxError(f"{src}: missing '{key}'")
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise BtxError(f"{src}: '{key}' must be a positive integer, got {value!r}")
        return value

    dim, n_heads = need("hidden_size"), need("num_attention_heads")
    n_kv_heads = hf.get("num_key_value_heads")
    n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
    if isinstance(n_kv_heads, bool) or not isinstance(n_kv_heads, int) or n_kv_heads <= 0 or n_heads % n_kv_heads:
        raise BtxError(f"{src}: num_key_value_heads {n_kv_heads!r} must divide num_attention_heads {n_heads}")
    head_dim = hf.get("head_dim")
    if head_dim is None:
        head_dim = getattr(form, "default_head_dim", None)
    if head_dim is None:
        if dim % n_heads:
            raise BtxError(
                f"{src}: hidden_size {dim} is not a multiple of num_attention_heads {n_heads} and there is no head_dim"
            )
        head_dim = dim // n_heads
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim <= 0 or head_dim % 2:
        raise BtxError(f"{src}: head_dim must be a positive even integer, got {head_dim!r}")

    n_layers = need("num_hidden_layers")
    max_seq_len = hf.get("max_position_embeddings") or form.max_positions
    if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len <= 0:
        raise BtxError(f"{src}: 'max_position_embeddings' must be a positive integer, got {max_seq_len!r}")
    eps = hf.get("rms_norm_eps")
    if eps is None:
        eps = form.norm_eps
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
        raise BtxError(f"{src}: 'rms_norm_eps' must be a number in (0, 1), got {eps!r}")
    theta, scaling = _read_rope(hf, form, src, head_dim, max_seq_len)
    kw: dict = dict(
        family=name,
        vocab_size=need("vocab_size"),
        dim=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        head_dim=head_dim,
        ffn_dim=need(form.expert_width_field if moe else "intermediate_size"),
        norm_eps=float(eps),
        rope_theta=theta,
        rope_scaling=scaling,
        max_seq_len=max_seq_len,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        **fam.switches,
    )
    kw |= form.read(hf, src)
    if moe:
        kw |= _read_moe(hf, form, src)
        if form is not fam.moe:
            kw["moe_form"] = form.model_type
    kw["extra"] = {k: v for k, v in hf.items() if k not in _COMMON and k not in _DROPPED and k not in _FORM_FIELDS}
    cfg = ModelConfig(**kw)
    if cfg.sliding_window is not None and cfg.sliding_window <= 0:
        raise BtxError(f"{src}: sliding_window must be a positive number of tokens, got {cfg.sliding_window}")
    return cfg


def _read_moe(hf: Mapping, form: Form, src: str) -> dict:
    n = hf.get(form.experts_field)
    if n is None:
        n = hf.get("num_local_experts", hf.get("num_experts"))  # the other spelling transformers accepts
    k = hf.get("num_experts_per_tok")
    for key, value in ((form.experts_field, n), ("num_experts_per_tok", k)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise BtxError(f"{src}: '{key}' must be a positive integer, got {value!r}")
    if k > n:
        raise BtxError(f"{src}: need num_experts_per_tok ({k}) <= {form.experts_field} ({n})")
    step = hf.get("decoder_sparse_step", 1)
    only_dense = hf.get("mlp_only_layers") or []
    if step != 1 or only_dense:
        raise BtxError(
            f"{src}: decoder_sparse_step {step} / mlp_only_layers {only_dense}: btx's MoE makes every "
            "layer sparse (decoder_sparse_step 1, no mlp_only_layers)"
        )
    out = {"n_experts": n, "top_k": k}
    out |= _read_btx_section(hf.get("btx"), src)
    names = out.get("expert_names")
    if names is not None and len(names) != n:
        raise BtxError(f"{src}: btx.experts names {len(names)} experts, but {form.experts_field} is {n}")
    if out["top_k"] > n:
        raise BtxError(f"{src}: btx.top_k {out['top_k']} is more than {form.experts_field} {n}")
    return out


def _read_btx_section(section, src: str) -> dict:
    """btx's own MoE settings, kept under "btx" in config.json (transformers ignores them)."""
    if section is None:
        return {}
    if not isinstance(section, dict):
        raise BtxError(f"{src}: 'btx' must be an object, got {section!r}")
    unknown = sorted(set(section) - set(_BTX_MOE_FIELDS) - {BTX_NOTE_FIELD, BTX_SEED_FAMILY, BTX_EXPERTS})
    if unknown:
        raise BtxError(f"{src}: unknown key(s) {unknown} under 'btx'; known: {list(_BTX_MOE_FIELDS)}")
    out = {k: v for k, v in section.items() if k in _BTX_MOE_FIELDS}
    names = section.get(BTX_EXPERTS)
    if names is not None:
        if (
            not isinstance(names, list)
            or not all(isinstance(n, str) and n for n in names)
            or len(set(names)) != len(names)
        ):
            raise BtxError(f"{src}: btx.experts must list distinct expert names, got {names!r}")
        out["expert_names"] = names
    if "top_k" in out and (isinstance(out["top_k"], bool) or not isinstance(out["top_k"], int) or out["top_k"] < 1):
        raise BtxError(f"{src}: btx.top_k must be a positive integer, got {out['top_k']!r}")
    if "router_mode" in out and out["router_mode"] not in ROUTER_MODES:
        raise BtxError(f"{src}: btx.router_mode {out['router_mode']!r} is not one of {list(ROUTER_MODES)}")
    return out


# Fields each RoPE type needs (beyond rope_theta), and the optional ones it takes.
_ROPE_FIELDS = {
    "default": ((), ()),
    "linear": (("factor",), ()),
    "dynamic": (("factor",), ()),
    "yarn": ((), ("factor", "attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate")),
    "longrope": (("short_factor", "long_factor"), ("factor", "attention_factor")),
    "llama3": (("factor", "low_freq_factor", "high_freq_factor"), ()),
}
_NEEDS_ORIGINAL = ("yarn", "longrope", "llama3")
assert set(_ROPE_FIELDS) == set(ROPE_TYPES)


def _read_rope(hf: Mapping, form: Form, src: str, head_dim: int, max_seq_len: int) -> tuple[float, dict | None]:
    """rope_theta and the scaling, from either spelling.

    transformers 4.x writes top-level `rope_theta` / `rope_scaling`; 5.x writes only
    `rope_parameters: {rope_theta, rope_type, ...}`. When both are present they must agree,
    otherwise the two transformers versions would load different models from the same file.
    """
    params = hf.get("rope_parameters")
    if params is not None and not isinstance(params, dict):
        raise BtxError(f"{src}: 'rope_parameters' must be an object, got {params!r}")
    top_theta, top_scaling = hf.get("rope_theta"), hf.get("rope_scaling")
    original = hf.get("original_max_position_embeddings")  # Phi-3 style, wins in transformers
    if params:
        theta = params.get("rope_theta", top_theta)
        scaling = _read_scaling(params, src, "rope_parameters", head_dim, max_seq_len, original)
        if top_theta is not None and theta is not None and float(top_theta) != float(theta):
            raise BtxError(
                f"{src}: rope_theta {top_theta} disagrees with rope_parameters.rope_theta {theta}; "
                "transformers 4.x would use the first, 5.x the second"
            )
        if (
            top_scaling is not None
            and _read_scaling(top_scaling, src, "rope_scaling", head_dim, max_seq_len, original) != scaling
        ):
            raise BtxError(f"{src}: rope_scaling disagrees with rope_parameters; fix one of them")
    else:
        theta = top_theta
        scaling = (
            _read_scaling(top_scaling, src, "rope_scaling", head_dim, max_seq_len, original) if top_scaling else None
        )
    if theta is None:
        theta = form.rope_theta
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not math.isfinite(theta) or theta <= 0:
        raise BtxError(f"{src}: rope_theta must be a positive number, got {theta!r}")
    return float(theta), scaling


def _read_scaling(d: Mapping, src: str, where: str, head_dim: int, max_seq_len: int, original) -> dict | None:
    if not isinstance(d, Mapping):
        raise BtxError(f"{src}: '{where}' must be an object, got {d!r}")
    kind = d.get("rope_type") or d.get("type") or "default"  # "type": the pre-4.45 spelling
    if kind not in _ROPE_FIELDS:
        raise BtxError(
            f"{src}: {where} rope_type {kind!r} is not supported; btx supports "
            + ", ".join(f"'{t}'" for t in ROPE_TYPES)
        )
    partial = d.get("partial_rotary_factor", 1.0)
    if partial not in (None, 1, 1.0):
        raise BtxError(f"{src}: {where}.partial_rotary_factor {partial} is not supported; btx rotates whole heads")
    if kind == "default":
        return None
    required, optional = _ROPE_FIELDS[kind]
    missing = [f for f in required if d.get(f) is None]
    if missing:
        raise BtxError(f"{src}: {where} of rope_type '{kind}' lacks {', '.join(missing)}")
    out: dict = {"rope_type": kind}
    for f in (*required, *optional):
        if d.get(f) is not None:
            out[f] = d[f]
    for f in ("short_factor", "long_factor"):
        if f in out and (not isinstance(out[f], list) or len(out[f]) != head_dim // 2):
            raise BtxError(f"{src}: {where}.{f} must list head_dim / 2 = {head_dim // 2} numbers")
    if kind in _NEEDS_ORIGINAL:
        value = original if original is not None else d.get("original_max_position_embeddings", max_seq_len)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise BtxError(f"{src}: {where}.original_max_position_embeddings must be a positive integer, got {value!r}")
        out["original_max_position_embeddings"] = value
    for f, v in out.items():
        numbers = v if isinstance(v, list) else [v]
        if f not in ("rope_type", "truncate") and not all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0 for x in numbers
        ):
            raise BtxError(f"{src}: {where}.{f} must be positive number(s), got {v!r}")
    return out


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def write_config(cfg: ModelConfig, dtype: str | None = None) -> dict:
    """The config.json for `cfg`: its family's dense form, or its MoE form when cfg.is_moe.

    `dtype` (a name such as "bfloat16") is recorded as `torch_dtype` (4.x) and `dtype` (5.x).
    Fields btx does not model ride along from `cfg.extra`; fields of another form never do.
    """
    form = form_of(cfg)
    why = form.unsupported(cfg)
    if why:
        raise ValueError(f"{form.architecture} cannot express this model: {why}")
    out: dict = {
        "architectures": [form.architecture],
        "model_type": form.model_type,
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
        scaling = dict(cfg.rope_scaling)
        out["rope_scaling"] = scaling
        rope_parameters.update(scaling)
    out["rope_parameters"] = rope_parameters
    out |= form.write(cfg)
    if cfg.is_moe:
        out[form.experts_field] = cfg.n_experts
        out[form.expert_width_field] = cfg.ffn_dim
        # The k that reproduces the routing mode with the form's softmax -> top-k (soft: all E
        # experts; switch, sample_top1: 1); btx's own settings go under "btx".
        out["num_experts_per_tok"] = cfg.experts_per_token
        # transformers adds the balancing loss only when output_router_logits is true
        # (transformers issue #44242), so a Trainer run on this checkpoint gets it by default.
        out["router_aux_loss_coef"] = cfg.extra.get("router_aux_loss_coef", 0.01)
        out["output_router_logits"] = cfg.extra.get("output_router_logits", True)
        section = {f: getattr(cfg, f) for f in _BTX_MOE_FIELDS}
        section[BTX_SEED_FAMILY] = cfg.family
        if cfg.expert_names is not None:
            section[BTX_EXPERTS] = list(cfg.expert_names)
        note = inference_note(cfg)
        if note:
            section[BTX_NOTE_FIELD] = note
        out["btx"] = section
    if dtype is not None:
        if dtype not in WEIGHT_DTYPES:
            raise ValueError(f"dtype {dtype!r}: expected one of {list(WEIGHT_DTYPES)}")
        out["torch_dtype"] = out["dtype"] = dtype
    for k, v in cfg.extra.items():
        if k not in out and k not in _COMMON and k not in _DROPPED and k not in _FORM_FIELDS:
            out[k] = v
    return out


def inference_note(cfg: ModelConfig) -> str | None:
    """How transformers' MoE classes (one softmax -> top-k for every layer) run this routing
    mode, for the "btx" section of config.json; None where they run exactly what btx runs."""
    k, E = cfg.experts_per_token, cfg.n_experts
    if cfg.router_mode == "soft":
        return (
            f"soft routing: num_experts_per_tok = {E} = the number of experts, so transformers' softmax -> "
            "top-k is the softmax over all experts and it computes exactly what btx computes"
        )
    if cfg.router_mode == "switch":
        return (
            "switch routing: transformers runs top-1 with no capacity limit (no token is dropped) and "
            "a gate of 1 after renormalisation, where btx scales the chosen expert by its router "
            f"probability and drops tokens beyond the capacity factor {cfg.capacity_factor}; outputs differ "
            "from btx's"
        )
    if cfg.router_mode == "sample_top1":
        note = (
            "sample_top1 routing: at inference btx takes the router's argmax with gate 1, which is "
            "top-1 with renormalisation exactly"
        )
        if cfg.first_layer_soft:
            note += (
                f"; but btx routes the first MoE layer softly over all {E} experts and transformers has one "
                f"num_experts_per_tok ({k}) for every layer, so transformers' first layer differs"
            )
        return note
    return None
