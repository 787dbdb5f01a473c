"""Qwen2 and Qwen2.5: `Qwen2ForCausalLM` seeds, merged into `Qwen2MoeForCausalLM`.

config.json fields beyond the common ones (btx/families/__init__.py):
    (always)           -> qkv_bias: Qwen2 has biases on q, k and v (not on o)
    use_sliding_window, sliding_window, max_window_layers, layer_types
                       -> sliding_window and sliding_layers: with use_sliding_window, the layers
                          `layer_types` marks sliding_attention (default: layer >= max_window_layers)

MoE form: Qwen2-MoE. Its block always has a shared expert, `sigmoid(shared_expert_gate(x)) *
shared_expert(x)`, added to the routed experts. btx writes it with zero width
(`shared_expert_intermediate_size: 0`, zero-size tensors, a zero gate), so it adds exactly nothing:
the merged model computes the routed-only BTX MoE, the seed stays one of the routed experts
("seed kept as an expert" means what it means for Mixtral), and N copies of the seed compute the
seed exactly. The alternative, the seed's FFN as the shared expert, cannot be exact: the sigmoid
gate scales it by a number strictly between 0 and 1. A Qwen2-MoE read from elsewhere (e.g.
Qwen1.5-MoE) keeps its real shared expert: btx's model implements it (`shared_expert_dim`).
`norm_topk_prob` is written true (Mixtral's renormalised top-k); a checkpoint with false is honoured.
"""

from btx.families.base import (
    QWEN_STYLE_EXPERTS,
    Family,
    Filler,
    Form,
    KeyRule,
    L,
    flag,
    integer,
    layer_types,
    sliding_from_layer_types,
)


def read_sliding(hf, src, n_layers: int, default_layers) -> dict:
    """Qwen's sliding-window fields: nothing slides unless use_sliding_window is true."""
    if not flag(hf, "use_sliding_window", src):
        return {"sliding_window": None, "sliding_layers": None}
    window = integer(hf, "sliding_window", src, 4096, minimum=1)
    layers = sliding_from_layer_types(hf, src, n_layers)
    if layers is None:
        first = integer(hf, "max_window_layers", src, 28)
        layers = default_layers(first, n_layers)
    return {"sliding_window": window, "sliding_layers": layers}


def write_sliding(cfg) -> dict:
    types = layer_types(cfg)
    sliding = [i for i, t in enumerate(types) if t == "sliding_attention"]
    return {
        "use_sliding_window": bool(sliding),
        "sliding_window": cfg.sliding_window if sliding else None,
        "max_window_layers": sliding[0] if sliding else cfg.n_layers,
        "layer_types": types,
    }


SLIDING_FIELDS = frozenset({"use_sliding_window", "sliding_window", "max_window_layers", "layer_types"})


class Qwen2Form(Form):
    model_type = "qwen2"
    architecture = "Qwen2ForCausalLM"
    rope_theta = 10000.0
    norm_eps = 1e-6
    max_positions = 32768
    fields = SLIDING_FIELDS

    def read(self, hf, src):
        return read_sliding(hf, src, hf["num_hidden_layers"], lambda first, n: list(range(first, n)))

    def write(self, cfg):
        return write_sliding(cfg)

    def unsupported(self, cfg):
        if not cfg.qkv_bias or cfg.o_bias or cfg.mlp_bias:
            return "Qwen2 has biases on q, k and v and nowhere else"
        if cfg.qk_norm != "none" or cfg.norm_placement != "pre":
            return "Qwen2 has pre-norm blocks without q/k norms"
        return None


_E = f"{L}.mlp.shared_expert"
SHARED_EXPERT_KEYS = (
    KeyRule("layers.{i}.ffn.shared.w1.weight", f"{_E}.gate_proj.weight"),
    KeyRule("layers.{i}.ffn.shared.w3.weight", f"{_E}.up_proj.weight"),
    KeyRule("layers.{i}.ffn.shared.w2.weight", f"{_E}.down_proj.weight"),
    KeyRule("layers.{i}.ffn.shared_gate.weight", f"{L}.mlp.shared_expert_gate.weight"),
)


def _no_shared(cfg) -> bool:
    return cfg.shared_expert_dim == 0


class Qwen2MoeForm(Form):
    model_type = "qwen2_moe"
    architecture = "Qwen2MoeForCausalLM"
    moe = True
    rope_theta = 10000.0
    norm_eps = 1e-6
    max_positions = 32768
    ffn_keys = QWEN_STYLE_EXPERTS + SHARED_EXPERT_KEYS
    fillers = (  # the zero-width shared expert btx writes (see the module docstring)
        Filler(f"{_E}.gate_proj.weight", lambda c: (0, c.dim), _no_shared),
        Filler(f"{_E}.up_proj.weight", lambda c: (0, c.dim), _no_shared),
        Filler(f"{_E}.down_proj.weight", lambda c: (c.dim, 0), _no_shared),
        Filler(f"{L}.mlp.shared_expert_gate.weight", lambda c: (1, c.dim), _no_shared),
    )
    fields = SLIDING_FIELDS | {
        "qkv_bias",
        "shared_expert_intermediate_size",
        "norm_topk_prob",
        "decoder_sparse_step",
        "mlp_only_layers",
    }
    experts_field = "num_experts"
    expert_width_field = "moe_intermediate_size"

    def read(self, hf, src):
        n = hf["num_hidden_layers"]
        # transformers' default for Qwen2-MoE when layer_types is absent: odd layers below max_window_layers
        out = read_sliding(hf, src, n, lambda first, n: [i for i in range(n) if (i + 1) % 2 and i < first])
        out["qkv_bias"] = flag(hf, "qkv_bias", src, True)
        out["shared_expert_dim"] = integer(hf, "shared_expert_intermediate_size", src, 5632)
        out["norm_topk_prob"] = flag(hf, "norm_topk_prob", src, False)
        return out

    def write(self, cfg):
        return {
            **write_sliding(cfg),
            "qkv_bias": cfg.qkv_bias,
            "shared_expert_intermediate_size": cfg.shared_expert_dim,
            "norm_topk_prob": cfg.norm_topk_prob,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
        }

    def unsupported(self, cfg):
        if cfg.o_bias or cfg.mlp_bias:
            return "Qwen2-MoE has biases on q, k and v only (qkv_bias)"
        if cfg.qk_norm != "none" or cfg.norm_placement != "pre":
            return "Qwen2-MoE has pre-norm blocks without q/k norms"
        return None


FAMILY = Family(
    name="qwen2",
    dense=Qwen2Form(),
    moe=Qwen2MoeForm(),
    switches={"qkv_bias": True},
    summary="Qwen2ForCausalLM (Qwen2, Qwen2.5) -> Qwen2MoeForCausalLM with a zero-width shared expert",
)
