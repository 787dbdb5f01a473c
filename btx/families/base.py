"""What a model family is: the small interface every btx/families/<name>.py fills in.

A *form* is one config.json layout, i.e. one transformers model class (LlamaForCausalLM,
MixtralForCausalLM, ...): the config fields it owns, its defaults, and the key rules of its
feed-forward tensors. A *family* pairs a dense form with the MoE form its merge writes, and adds
what both share: the architecture switches of `btx.model.config.ModelConfig` it implies and the key rules
of its attention and norms. Everything generic (dimensions, RoPE, the MoE counts, carried fields,
refusals common to all) lives in btx/families/__init__.py, once.

Key rules map one btx parameter name to the HF tensor(s) it is stored as; the same table is read
in both directions (writing a checkpoint, reading one). `{i}` is the layer, `{e}` the expert.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

from btx.errors import BtxError
from btx.model.config import ModelConfig


@dataclass(frozen=True)
class KeyRule:
    """One btx parameter and the HF tensor(s) it is stored as.

    layout:
      "same"        one tensor each side, identical (a stacked expert weight may be stored whole).
      "expert"      btx stacks experts on dim 0; HF has one tensor per expert `{e}`.
      "gate_half"   a fused gate/up tensor [E, 2F, D] (HF 5.x `gate_up_proj`, GraniteMoe's
                    `input_linear`): btx w1 is rows [:F] of every expert.
      "up_half"     ... btx w3 is rows [F:].
    canonical: False marks a spelling btx accepts when reading but never writes.
    """

    btx: str
    hf: str
    layout: str = "same"
    canonical: bool = True


@dataclass(frozen=True)
class Filler:
    """A tensor a form's checkpoint must hold but btx's model does not: written as zeros, and on
    reading accepted (when its shape is `shape(cfg)`) and skipped. Qwen2-MoE's zero-width shared
    expert is the one case."""

    hf: str  # with {i}
    shape: Callable[[ModelConfig], tuple[int, ...]]
    when: Callable[[ModelConfig], bool]


def _regex(pattern: str) -> re.Pattern:
    body = re.escape(pattern).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{e\}", r"(?P<e>\d+)")
    return re.compile(f"^{body}$")


class Piece(NamedTuple):
    """Part of an HF tensor: btx parameter `btx` (stacked: expert `expert`, or every expert)."""

    btx: str
    layout: str  # same | expert | gate_half | up_half
    expert: int | None = None


class HfTensor(NamedTuple):
    """One tensor of a checkpoint, and the btx parameters it is made of."""

    name: str
    shape: tuple[int, ...]
    pieces: tuple[Piece, ...]


class KeyTable:
    """The key rules of one form of one family, matched both ways."""

    def __init__(self, rules: tuple[KeyRule, ...]):
        self.rules = rules
        self._btx = [(_regex(r.btx), r) for r in rules if r.canonical]
        self._hf = [(_regex(r.hf), r) for r in rules if r.canonical]
        self._all = [(_regex(r.btx), r) for r in rules]  # canonical rows come first in the tables

    def canonical(self, btx_name: str) -> tuple[KeyRule, str | None]:
        """The rule btx writes `btx_name` by, and its layer index."""
        for rx, rule in self._btx:
            if m := rx.match(btx_name):
                return rule, m.groupdict().get("i")
        raise KeyError(f"{btx_name!r} is not a btx parameter name this family's key table knows")

    def candidates(self, btx_name: str) -> list[KeyRule]:
        """Every spelling `btx_name` may be read from, the canonical one first."""
        return [r for rx, r in self._all if rx.match(btx_name)]

    def hf_name(self, btx_name: str, expert: int | None = None) -> str:
        rule, i = self.canonical(btx_name)
        if rule.layout == "expert":
            if expert is None:
                raise ValueError(f"{btx_name!r} stacks experts; pass expert=<index>")
            return rule.hf.format(i=i, e=expert)
        if expert is not None:
            raise ValueError(f"{btx_name!r} is not an expert-stacked weight")
        return rule.hf.format(i=i)

    def hf_names(self, btx_name: str, n_experts: int = 0) -> list[str]:
        rule, _ = self.canonical(btx_name)
        if rule.layout == "expert":
            return [self.hf_name(btx_name, e) for e in range(n_experts)]
        return [self.hf_name(btx_name)]

    def btx_name(self, hf_name: str) -> tuple[str, int | None]:
        """(btx name, expert index or None) for a canonical HF name."""
        for rx, rule in self._hf:
            if m := rx.match(hf_name):
                e = m.groupdict().get("e")
                return rule.btx.format(i=m.groupdict().get("i")), None if e is None else int(e)
        raise KeyError(f"{hf_name!r} is not a tensor name this family's key table knows")

    def stacked(self, btx_name: str) -> bool:
        """Whether `btx_name` is stored as one HF tensor per expert."""
        return self.canonical(btx_name)[0].layout == "expert"

    def layout(self, btx_shapes: Mapping[str, tuple[int, ...]]) -> list[HfTensor]:
        """Every HF tensor of a checkpoint whose btx parameters are `btx_shapes`, in order, with the
        parameters (or expert slices of them) each is made of."""
        out: dict[str, HfTensor] = {}
        for name, shape in btx_shapes.items():
            rule, i = self.canonical(name)
            if rule.layout == "expert":
                for e in range(shape[0]):
                    hf = rule.hf.format(i=i, e=e)
                    out[hf] = HfTensor(hf, shape[1:], (Piece(name, "expert", e),))
            elif rule.layout in ("gate_half", "up_half"):
                hf = rule.hf.format(i=i)
                E, F, D = shape
                prior = out.get(hf, HfTensor(hf, (E, 2 * F, D), ()))
                pieces = sorted((*prior.pieces, Piece(name, rule.layout)), key=lambda p: p.layout != "gate_half")
                out[hf] = prior._replace(pieces=tuple(pieces))
            else:
                hf = rule.hf.format(i=i)
                out[hf] = HfTensor(hf, shape, (Piece(name, "same"),))
        return list(out.values())


# The stacked [E, ...] expert weights of an MoE layer (their btx names have no .weight suffix).
EXPERT_PARAMS = ("ffn.w1", "ffn.w3", "ffn.w2")

# Key rules shared by every family: embeddings, the final norm, the LM head.
L = "model.layers.{i}"
COMMON_KEYS = (
    KeyRule("embed.weight", "model.embed_tokens.weight"),
    KeyRule("norm.weight", "model.norm.weight"),
    KeyRule("lm_head.weight", "lm_head.weight"),
)


def attention_keys(attn_norm: str, ffn_norm: str) -> tuple[KeyRule, ...]:
    """q/k/v/o projections (weights and biases), q/k norms, and the block's two norms under the
    HF names the family gives them."""
    rules = [
        KeyRule("layers.{i}.attn_norm.weight", f"{L}.{attn_norm}.weight"),
        KeyRule("layers.{i}.ffn_norm.weight", f"{L}.{ffn_norm}.weight"),
    ]
    for btx, hf in (("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj"), ("wo", "o_proj")):
        for part in ("weight", "bias"):
            rules.append(KeyRule(f"layers.{{i}}.attn.{btx}.{part}", f"{L}.self_attn.{hf}.{part}"))
    for norm in ("q_norm", "k_norm"):
        rules.append(KeyRule(f"layers.{{i}}.attn.{norm}.weight", f"{L}.self_attn.{norm}.weight"))
    return tuple(rules)


PRE_NORM_ATTENTION = attention_keys("input_layernorm", "post_attention_layernorm")

DENSE_FFN_KEYS = tuple(
    KeyRule(f"layers.{{i}}.ffn.{btx}.{part}", f"{L}.mlp.{hf}.{part}")
    for btx, hf in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj"))
    for part in ("weight", "bias")
)

# Read only: the fused names of a live transformers 5.x MoE (its state_dict(), or a file saved from
# it with plain safetensors), the same for every MoE class btx writes.
FUSED_EXPERT_KEYS = (
    KeyRule("layers.{i}.ffn.router.weight", f"{L}.mlp.gate.weight", canonical=False),
    KeyRule("layers.{i}.ffn.w1", f"{L}.mlp.experts.gate_up_proj", "gate_half", canonical=False),
    KeyRule("layers.{i}.ffn.w3", f"{L}.mlp.experts.gate_up_proj", "up_half", canonical=False),
    KeyRule("layers.{i}.ffn.w2", f"{L}.mlp.experts.down_proj", canonical=False),
)


def expert_keys(block: str, router: str, w1: str, w3: str, w2: str) -> tuple[KeyRule, ...]:
    """The per-expert layout transformers' save_pretrained writes (and vLLM reads): the router
    `{block}.{router}.weight` and `{block}.experts.{e}.{w}.weight`."""
    p = f"{L}.{block}"
    return (
        KeyRule("layers.{i}.ffn.router.weight", f"{p}.{router}.weight"),
        KeyRule("layers.{i}.ffn.w1", f"{p}.experts.{{e}}.{w1}.weight", "expert"),
        KeyRule("layers.{i}.ffn.w3", f"{p}.experts.{{e}}.{w3}.weight", "expert"),
        KeyRule("layers.{i}.ffn.w2", f"{p}.experts.{{e}}.{w2}.weight", "expert"),
        *FUSED_EXPERT_KEYS,
    )


QWEN_STYLE_EXPERTS = expert_keys("mlp", "gate", "gate_proj", "up_proj", "down_proj")


class Form:
    """One config.json layout. Subclasses set the class attributes and override the hooks."""

    model_type: str
    architecture: str
    moe: bool = False
    # transformers' defaults for fields a config.json may leave out, so btx reads what it would
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    max_positions: int = 2048
    ffn_keys: tuple[KeyRule, ...] = DENSE_FFN_KEYS
    fillers: tuple[Filler, ...] = ()
    # config.json fields this form reads or writes beyond the ones every form has; never carried
    # from one form to another (each form writes its own)
    fields: frozenset[str] = frozenset()
    # MoE forms: the field holding the expert count, and the one holding each expert's width
    experts_field: str = ""
    expert_width_field: str = "intermediate_size"

    def read(self, hf: Mapping, src: str) -> dict:
        """ModelConfig keyword arguments from this form's own fields (the common ones are read
        already). Raise BtxError for a value btx cannot honour."""
        return {}

    def write(self, cfg: ModelConfig) -> dict:
        """This form's own config.json fields for `cfg`."""
        return {}

    def unsupported(self, cfg: ModelConfig) -> str | None:
        """Why this form cannot express `cfg` (one sentence), or None when it can."""
        return None


@dataclass(frozen=True)
class Family:
    """A dense form, the MoE form btx merges it into, and what the two share."""

    name: str
    dense: Form
    moe: Form
    attention_keys: tuple[KeyRule, ...] = PRE_NORM_ATTENTION
    # ModelConfig fields every model of the family has (e.g. qk_norm="head" for Qwen3)
    switches: Mapping = field(default_factory=dict)
    summary: str = ""  # one line: what the family is and becomes
    # MoE forms for the models `moe` cannot express, tried in order (llama: GraniteMoe for biases)
    other_moe: tuple[Form, ...] = ()

    @property
    def moe_forms(self) -> tuple[Form, ...]:
        return (self.moe, *self.other_moe)

    def form_for(self, cfg: ModelConfig) -> Form:
        """The form `cfg` is written in: dense, the MoE form it was read from (`cfg.moe_form`), or
        the first MoE form that can express it (the default one when none can: it says why)."""
        if not cfg.is_moe:
            return self.dense
        if cfg.moe_form is not None:
            for form in self.moe_forms:
                if form.model_type == cfg.moe_form:
                    return form
            raise ValueError(f"{cfg.moe_form!r} is not an MoE form of family {self.name}")
        return next((f for f in self.moe_forms if f.unsupported(cfg) is None), self.moe)

    def keys(self, form: Form) -> tuple[KeyRule, ...]:
        return COMMON_KEYS + self.attention_keys + form.ffn_keys


def flag(hf: Mapping, key: str, src: str, default: bool = False) -> bool:
    value = hf.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise BtxError(f"{src}: '{key}' must be true or false, got {value!r}")
    return value


def integer(hf: Mapping, key: str, src: str, default: int | None = None, minimum: int = 0) -> int | None:
    value = hf.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise BtxError(f"{src}: '{key}' must be an integer >= {minimum}, got {value!r}")
    return value


def sliding_from_layer_types(hf: Mapping, src: str, n_layers: int) -> list[int] | None:
    """The sliding layers a `layer_types` list names, or None when the list is absent."""
    types = hf.get("layer_types")
    if types is None:
        return None
    if not isinstance(types, list) or len(types) != n_layers:
        raise BtxError(f"{src}: 'layer_types' must list one type per layer ({n_layers}), got {types!r}")
    bad = sorted({t for t in types if t not in ("full_attention", "sliding_attention")})
    if bad:
        raise BtxError(f"{src}: layer_types {bad} not supported; btx knows full_attention and sliding_attention")
    return [i for i, t in enumerate(types) if t == "sliding_attention"]


def layer_types(cfg: ModelConfig) -> list[str]:
    return ["sliding_attention" if cfg.window(i) is not None else "full_attention" for i in range(cfg.n_layers)]


def sliding_everywhere_or_nowhere(cfg: ModelConfig) -> str | None:
    """For forms with one `sliding_window` for all layers: why `cfg` does not fit, or None."""
    if cfg.sliding_window is None or cfg.sliding_layers is None:
        return None
    if sorted(cfg.sliding_layers) in ([], list(range(cfg.n_layers))):
        return None
    return (
        f"it slides its attention window in layers {cfg.sliding_layers} only, and this form has one "
        "sliding_window for every layer"
    )
