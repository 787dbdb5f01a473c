"""Which parameters a training job trains: the `train.trainable` and `finetune.trainable` modes.

Every parameter of a btx Transformer belongs to one group (`param_group`, by its btx name):

    embed    the input embedding (also the LM head when embeddings are tied)
    attn     q/k/v/o projections, their biases and the q/k norms
    norms    the RMSNorm gains of the residual stream (attn_norm, ffn_norm, the final norm)
    ffn      the FFN of a dense layer, or the stacked expert FFNs of an MoE layer
    shared   an MoE layer's shared expert and its gate
    router   an MoE layer's router
    head     the LM head

A mode is a set of groups (`MODES`); the others are frozen: requires_grad False, left out of the
optimizer (btx.train.engines.base.param_groups), and counted without their weight gradients (btx.model.flops).

Dense jobs (`train.trainable`): `all` (the paper), `ffn` (FlexOlmo-style experts: only the FFNs
train, so the shared weights stay the seed's and their merge is exact), `ffn_norms` (the FFNs and
the residual norms). MoE finetuning (`finetune.trainable`): `all`, `router_only`, `frozen_experts`
(everything but the expert FFNs).
"""

from __future__ import annotations

from btx.choices import DENSE_TRAINABLE, TRAINABLE
from btx.errors import BtxError

GROUPS = ("embed", "attn", "norms", "ffn", "shared", "router", "head")
MODES: dict[str, frozenset[str]] = {
    "all": frozenset(GROUPS),
    "ffn": frozenset({"ffn", "shared"}),
    "ffn_norms": frozenset({"ffn", "shared", "norms"}),
    "router_only": frozenset({"router"}),
    "frozen_experts": frozenset(GROUPS) - {"ffn"},
}


def param_group(name: str) -> str:
    """The group of a btx parameter name (`layers.3.attn.wq.weight` -> attn)."""
    if name == "embed.weight":
        return "embed"
    if name == "lm_head.weight":
        return "head"
    if name == "norm.weight" or name.endswith((".attn_norm.weight", ".ffn_norm.weight")):
        return "norms"
    if ".attn." in name:
        return "attn"
    if ".ffn.router." in name:
        return "router"
    if ".ffn.shared" in name:  # shared.w1/w2/w3 and shared_gate
        return "shared"
    if ".ffn." in name:
        return "ffn"
    raise BtxError(f"{name}: a parameter btx does not know the group of (expected btx Transformer names)")


def trained_groups(mode: str) -> frozenset[str]:
    if mode not in MODES:
        raise BtxError(f"trainable: expected one of {', '.join(MODES)}, got {mode!r}")
    return MODES[mode]


def set_trainable(model, mode: str) -> None:
    """requires_grad of every parameter of `model` (a btx Transformer) as `mode` says."""
    groups = trained_groups(mode)
    allowed = TRAINABLE if model.cfg.is_moe else DENSE_TRAINABLE
    if mode not in allowed:
        kind = "an MoE" if model.cfg.is_moe else "a dense model"
        raise BtxError(f"trainable: {mode} is not a mode for {kind} (expected one of {', '.join(allowed)})")
    for name, p in model.named_parameters():
        p.requires_grad_(param_group(name) in groups)
