"""GraniteMoe (`GraniteMoeForCausalLM`): the MoE form of a Llama seed with attention biases.

Mixtral's projections have no biases. GraniteMoe has Llama's attention with `attention_bias` on
all four projections, pre-norm RMSNorm blocks, RoPE and SwiGLU experts with softmax-over-top-k
routing (Mixtral's renormalised top-k), plus four multipliers. With the multipliers at their
neutral values (`embedding_multiplier`, `residual_multiplier`, `logits_scaling` = 1 and
`attention_multiplier` = head_dim^-0.5, the usual attention scale) it computes exactly a biased
Llama's attention around an MoE. btx writes those values and reads only those: other values are
Granite's own model, which btx's does not implement.

On disk the experts are fused per layer: `block_sparse_moe.input_linear.weight` [E, 2F, D] (gate
rows, then up rows), `block_sparse_moe.output_linear.weight` [E, D, F], and the router
`block_sparse_moe.router.layer.weight` [E, D].
"""

import math

from btx.errors import BtxError
from btx.families.base import Form, KeyRule, L, flag

_B = f"{L}.block_sparse_moe"
_NEUTRAL = ("embedding_multiplier", "residual_multiplier", "logits_scaling")


class GraniteMoeForm(Form):
    model_type = "granitemoe"
    architecture = "GraniteMoeForCausalLM"
    moe = True
    rope_theta = 10000.0
    norm_eps = 1e-6
    max_positions = 2048
    ffn_keys = (
        KeyRule("layers.{i}.ffn.router.weight", f"{_B}.router.layer.weight"),
        KeyRule("layers.{i}.ffn.w1", f"{_B}.input_linear.weight", "gate_half"),
        KeyRule("layers.{i}.ffn.w3", f"{_B}.input_linear.weight", "up_half"),
        KeyRule("layers.{i}.ffn.w2", f"{_B}.output_linear.weight"),
        # read only: a live transformers 5.x GraniteMoe's names
        KeyRule("layers.{i}.ffn.router.weight", f"{_B}.router.weight", canonical=False),
        KeyRule("layers.{i}.ffn.w1", f"{_B}.experts.gate_up_proj", "gate_half", canonical=False),
        KeyRule("layers.{i}.ffn.w3", f"{_B}.experts.gate_up_proj", "up_half", canonical=False),
        KeyRule("layers.{i}.ffn.w2", f"{_B}.experts.down_proj", canonical=False),
    )
    fields = frozenset({"attention_bias", "attention_multiplier", *_NEUTRAL})
    experts_field = "num_local_experts"

    def read(self, hf, src):
        for key in _NEUTRAL:
            if hf.get(key, 1.0) != 1.0:
                raise BtxError(
                    f"{src}: '{key}' is {hf[key]}; btx reads GraniteMoe only with its multipliers at 1 "
                    "(the form btx writes for a biased Llama), not Granite's own scaled model"
                )
        head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
        scale = hf.get("attention_multiplier", 1.0)
        if not math.isclose(scale, head_dim**-0.5, rel_tol=1e-6):
            raise BtxError(
                f"{src}: 'attention_multiplier' is {scale}; btx reads GraniteMoe only with the usual "
                f"attention scale head_dim^-0.5 = {head_dim**-0.5:.6g}"
            )
        bias = flag(hf, "attention_bias", src)
        return {"qkv_bias": bias, "o_bias": bias}

    def write(self, cfg):
        return {
            "attention_bias": cfg.qkv_bias,
            "embedding_multiplier": 1.0,
            "residual_multiplier": 1.0,
            "logits_scaling": 1.0,
            "attention_multiplier": cfg.head_dim**-0.5,
        }

    def unsupported(self, cfg):
        if cfg.qkv_bias != cfg.o_bias:
            return "GraniteMoe's attention_bias puts a bias on all four attention projections or on none"
        if cfg.mlp_bias:
            return "GraniteMoe's experts have no biases"
        if cfg.qk_norm != "none" or cfg.norm_placement != "pre":
            return "GraniteMoe has pre-norm blocks without q/k norms"
        if cfg.sliding_window is not None:
            return "GraniteMoe has no sliding window"
        if cfg.shared_expert_dim:
            return "GraniteMoe has no shared expert"
        if not cfg.norm_topk_prob:
            return "GraniteMoe always renormalises the top-k gates"
        return None


GRANITE_MOE = GraniteMoeForm()
