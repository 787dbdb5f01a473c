"""Llama: `LlamaForCausalLM` seeds (Llama 2, 3.x, and everything else transformers runs as
`model_type: llama`), merged into `MixtralForCausalLM`.

config.json fields beyond the common ones (btx/families/__init__.py):
    attention_bias   -> qkv_bias and o_bias (Llama puts a bias on all four projections)
    mlp_bias         -> mlp_bias (biases on gate/up/down)
    head_dim         -> head_dim (explicit, may differ from hidden_size / num_attention_heads)
    rope_parameters  every rope_type transformers implements for Llama: default, linear, dynamic,
                     yarn, longrope, llama3 (btx/model/ rope_frequencies)
    pretraining_tp   carried along; it only splits matmuls in transformers 4.x, same result

MoE form: Mixtral. Mixtral's projections have no biases, so a seed with attention_bias becomes
GraniteMoe instead (btx/families/granitemoe.py: Llama's biased attention around SwiGLU experts,
with Granite's multipliers at their neutral values). A seed with mlp_bias has no MoE form (no
transformers MoE class has experts with biases and SwiGLU): it trains, evaluates and is analysed
as a dense model, and merge refuses it with that reason.
A Llama config carrying `sliding_window` (a relabelled Mistral) is refused: Llama has none.
"""

from btx.errors import BtxError
from btx.families.base import Family, Form, flag
from btx.families.granitemoe import GRANITE_MOE
from btx.families.mixtral import MIXTRAL


class LlamaForm(Form):
    model_type = "llama"
    architecture = "LlamaForCausalLM"
    rope_theta = 10000.0
    norm_eps = 1e-6
    max_positions = 2048
    fields = frozenset({"attention_bias", "mlp_bias"})

    def read(self, hf, src):
        if hf.get("sliding_window") is not None:
            raise BtxError(
                f"{src}: 'sliding_window' is set, but Llama has no sliding window (transformers' "
                "LlamaForCausalLM ignores it); if this is a Mistral model, its model_type is 'mistral'"
            )
        bias = flag(hf, "attention_bias", src)
        return {"qkv_bias": bias, "o_bias": bias, "mlp_bias": flag(hf, "mlp_bias", src)}

    def write(self, cfg):
        return {"attention_bias": cfg.qkv_bias, "mlp_bias": cfg.mlp_bias}

    def unsupported(self, cfg):
        if cfg.qkv_bias != cfg.o_bias:
            return "Llama's attention_bias puts a bias on all four attention projections or on none"
        if cfg.sliding_window is not None:
            return "Llama has no sliding window"
        if cfg.qk_norm != "none" or cfg.norm_placement != "pre":
            return "Llama has pre-norm blocks without q/k norms"
        return None


FAMILY = Family(
    name="llama",
    dense=LlamaForm(),
    moe=MIXTRAL,
    other_moe=(GRANITE_MOE,),
    summary="LlamaForCausalLM (Llama 2/3.x and variants) -> MixtralForCausalLM (GraniteMoeForCausalLM with biases)",
)
