"""Mixtral (`MixtralForCausalLM`): the MoE form of the llama and mistral families.

Classic per-expert layout on disk, which transformers 4.x and 5.x save_pretrained write and vLLM
reads: `block_sparse_moe.gate` [E, D] and `block_sparse_moe.experts.{e}.w1/w3/w2` (gate, up, down).
Routing is softmax -> top-k -> renormalise, which is btx's topk with norm_topk_prob.
`sliding_window` applies to every layer. No biases, no q/k norms, no shared expert.
"""

from btx.families.base import Form, expert_keys, integer, sliding_everywhere_or_nowhere


class MixtralForm(Form):
    model_type = "mixtral"
    architecture = "MixtralForCausalLM"
    moe = True
    rope_theta = 1e6
    norm_eps = 1e-5
    max_positions = 4096 * 32
    ffn_keys = expert_keys("block_sparse_moe", "gate", "w1", "w3", "w2")
    fields = frozenset({"sliding_window", "router_jitter_noise"})
    experts_field = "num_local_experts"

    def read(self, hf, src):
        return {"sliding_window": integer(hf, "sliding_window", src, None, minimum=1)}

    def write(self, cfg):
        return {"sliding_window": cfg.sliding_window, "router_jitter_noise": 0.0}

    def unsupported(self, cfg):
        if cfg.qkv_bias or cfg.o_bias or cfg.mlp_bias:
            return "Mixtral's projections have no biases"
        if cfg.qk_norm != "none" or cfg.norm_placement != "pre":
            return "Mixtral has pre-norm blocks without q/k norms"
        if cfg.shared_expert_dim:
            return "Mixtral has no shared expert"
        if not cfg.norm_topk_prob:
            return "Mixtral always renormalises the top-k gates"
        return sliding_everywhere_or_nowhere(cfg)


MIXTRAL = MixtralForm()
