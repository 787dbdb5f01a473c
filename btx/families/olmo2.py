"""OLMo 2: `Olmo2ForCausalLM` seeds, merged into `FlexOlmoForCausalLM` (the MoE form of OLMo 2 that
FlexOlmo uses, `model_type: flex_olmo`).

config.json fields beyond the common ones (btx/families/__init__.py):
    (always)        -> norm_placement "post": each sublayer's output is normalised before it is
                       added (x + norm(attn(x)), h + norm(mlp(h))); btx's `attn_norm` is OLMo's
                       `post_attention_layernorm`, `ffn_norm` its `post_feedforward_layernorm`
                    -> qk_norm "proj": RMSNorm over the whole q and k projections, before RoPE
    attention_bias  -> qkv_bias and o_bias

MoE form: FlexOlmo, routed experts only, `norm_topk_prob: true` written (false honoured on read).
The router reads the residual stream itself (there is no pre-FFN norm in this layout), so centroid
and ridge router inits use it too.
"""

from btx.errors import BtxError
from btx.families.base import QWEN_STYLE_EXPERTS, Family, Form, attention_keys, flag


def _unsupported(cfg) -> str | None:
    if cfg.qkv_bias != cfg.o_bias or cfg.mlp_bias:
        return "OLMo 2's attention_bias puts a bias on all four attention projections or on none, and its FFN has none"
    if cfg.qk_norm != "proj" or cfg.norm_placement != "post":
        return "OLMo 2 has post-norm blocks with q/k norms over the whole projections"
    if cfg.sliding_window is not None:
        return "OLMo 2 has no sliding window"
    if cfg.shared_expert_dim:
        return "FlexOlmo has no shared expert"
    return None


def _read(hf, src) -> dict:
    if hf.get("sliding_window") is not None:
        raise BtxError(f"{src}: 'sliding_window' is set, but OLMo 2 has no sliding window")
    bias = flag(hf, "attention_bias", src)
    return {"qkv_bias": bias, "o_bias": bias}


class Olmo2Form(Form):
    model_type = "olmo2"
    architecture = "Olmo2ForCausalLM"
    rope_theta = 10000.0
    norm_eps = 1e-5
    max_positions = 2048
    fields = frozenset({"attention_bias"})

    def read(self, hf, src):
        return _read(hf, src)

    def write(self, cfg):
        return {"attention_bias": cfg.qkv_bias}

    def unsupported(self, cfg):
        return _unsupported(cfg)


class FlexOlmoForm(Form):
    model_type = "flex_olmo"
    architecture = "FlexOlmoForCausalLM"
    moe = True
    rope_theta = 500000.0
    norm_eps = 1e-6
    max_positions = 4096
    ffn_keys = QWEN_STYLE_EXPERTS
    fields = frozenset({"attention_bias", "norm_topk_prob"})
    experts_field = "num_experts"

    def read(self, hf, src):
        return _read(hf, src) | {"norm_topk_prob": flag(hf, "norm_topk_prob", src, False)}

    def write(self, cfg):
        return {"attention_bias": cfg.qkv_bias, "norm_topk_prob": cfg.norm_topk_prob}

    def unsupported(self, cfg):
        return _unsupported(cfg)


FAMILY = Family(
    name="olmo2",
    dense=Olmo2Form(),
    moe=FlexOlmoForm(),
    attention_keys=attention_keys("post_attention_layernorm", "post_feedforward_layernorm"),
    switches={"qk_norm": "proj", "norm_placement": "post"},
    summary="Olmo2ForCausalLM (post-norm, q/k norm over the projections) -> FlexOlmoForCausalLM",
)
