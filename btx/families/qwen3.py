"""Qwen3: `Qwen3ForCausalLM` seeds, merged into `Qwen3MoeForCausalLM`.

config.json fields beyond the common ones (btx/families/__init__.py):
    (always)        -> qk_norm "head": RMSNorm over each head's queries and keys, before RoPE
    head_dim        -> head_dim (default 128 in Qwen3Config, whatever hidden_size / heads is)
    attention_bias  -> qkv_bias and o_bias (all four projections)
    use_sliding_window, sliding_window, max_window_layers, layer_types -> as for qwen2

MoE form: Qwen3-MoE, routed experts only (`mlp.gate`, `mlp.experts.{e}.gate/up/down_proj`), with
`norm_topk_prob: true` (Mixtral's renormalised top-k; false is honoured on read). Qwen3-MoE has
one `sliding_window` for all layers, so a seed sliding in some layers only is refused at merge.
"""

from btx.families.base import (
    QWEN_STYLE_EXPERTS,
    Family,
    Form,
    flag,
    integer,
    sliding_everywhere_or_nowhere,
)
from btx.families.qwen2 import SLIDING_FIELDS, read_sliding, write_sliding


def _unsupported(cfg) -> str | None:
    if cfg.qkv_bias != cfg.o_bias or cfg.mlp_bias:
        return "Qwen3's attention_bias puts a bias on all four attention projections or on none, and its FFN has none"
    if cfg.qk_norm != "head" or cfg.norm_placement != "pre":
        return "Qwen3 has pre-norm blocks with per-head q/k norms"
    return None


class Qwen3Form(Form):
    model_type = "qwen3"
    architecture = "Qwen3ForCausalLM"
    rope_theta = 10000.0
    norm_eps = 1e-6
    max_positions = 32768
    default_head_dim = 128
    fields = SLIDING_FIELDS | {"attention_bias"}

    def read(self, hf, src):
        bias = flag(hf, "attention_bias", src)
        out = read_sliding(hf, src, hf["num_hidden_layers"], lambda first, n: list(range(first, n)))
        return out | {"qkv_bias": bias, "o_bias": bias}

    def write(self, cfg):
        return {**write_sliding(cfg), "attention_bias": cfg.qkv_bias}

    def unsupported(self, cfg):
        return _unsupported(cfg)


class Qwen3MoeForm(Form):
    model_type = "qwen3_moe"
    architecture = "Qwen3MoeForCausalLM"
    moe = True
    rope_theta = 10000.0
    norm_eps = 1e-6
    max_positions = 32768
    ffn_keys = QWEN_STYLE_EXPERTS
    fields = frozenset(
        {
            "attention_bias",
            "norm_topk_prob",
            "decoder_sparse_step",
            "mlp_only_layers",
            "use_sliding_window",
            "sliding_window",
            "max_window_layers",
        }
    )
    experts_field = "num_experts"
    expert_width_field = "moe_intermediate_size"

    def read(self, hf, src):
        bias = flag(hf, "attention_bias", src)
        slide = flag(hf, "use_sliding_window", src)
        return {
            "qkv_bias": bias,
            "o_bias": bias,
            "norm_topk_prob": flag(hf, "norm_topk_prob", src, False),
            "sliding_window": integer(hf, "sliding_window", src, 4096, minimum=1) if slide else None,
        }

    def write(self, cfg):
        return {
            "attention_bias": cfg.qkv_bias,
            "norm_topk_prob": cfg.norm_topk_prob,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            "use_sliding_window": cfg.sliding_window is not None,
            "sliding_window": cfg.sliding_window,
        }

    def unsupported(self, cfg):
        if cfg.shared_expert_dim:
            return "Qwen3-MoE has no shared expert"
        return _unsupported(cfg) or sliding_everywhere_or_nowhere(cfg)


FAMILY = Family(
    name="qwen3",
    dense=Qwen3Form(),
    moe=Qwen3MoeForm(),
    switches={"qk_norm": "head"},
    summary="Qwen3ForCausalLM (per-head q/k norm, explicit head_dim) -> Qwen3MoeForCausalLM",
)
