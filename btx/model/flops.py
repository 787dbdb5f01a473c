"""Training FLOPs per token, counted for what autograd computes when some parameters are frozen.

One rule for every stage (DONE.json `train_flops`, the MFU of the progress line, the baselines'
compute matching, the eval table). A matmul y = x W with N weights costs per token:

    forward                  2N
    weight gradient dL/dW    2N   only when W trains
    input gradient  dL/dx    2N   only when x requires grad: something before it in the forward trains

So a trained weight costs 6N (the usual "6 x parameters"), a frozen one 4N, and a frozen one with
nothing trainable before it 2N (with `train.trainable: ffn`, the first layer's attention: the
embedding and that attention are frozen, so autograd never reaches them). Norm gains and biases
are counted like weights (a few in ten thousand of the total). Embedding lookups are no matmul: 0.
The causal attention scores (QK^T and AV, activation by activation) cost 2 x 2 x head_dim per
key and head in the forward and twice that in the backward, which runs when q, k or v require
grad. With everything trained this is 6 x (active parameters but the input embedding and the
final norm) + 6 x heads x head_dim x context per layer.
"""

from __future__ import annotations

from btx.model.trainable import trained_groups

FLOPS_RULE = (
    "per token: 6 FLOPs per trained weight (forward, weight and input gradients), 4 per frozen weight "
    "(forward, input gradient), 2 where nothing before it trains; embedding lookups 0; causal "
    "attention scores 6 x head_dim per key and head (2 without backward)"
)


def _matmul(n: float, trained: bool, grad_in: bool) -> tuple[float, bool]:
    """(FLOPs per token, whether the output requires grad) of a matmul with n weights."""
    return 2 * n + (2 * n if trained else 0) + (2 * n if grad_in else 0), grad_in or trained


def train_flops_per_token(cfg, seq_len: int, trainable: str = "all") -> float:
    """Forward + backward FLOPs per token of `cfg` (a btx ModelConfig) at `seq_len`, training the
    parameter groups of `trainable` (btx.model.trainable.MODES)."""
    return sum(train_flops_breakdown(cfg, seq_len, trainable).values())


def train_flops_breakdown(cfg, seq_len: int, trainable: str = "all") -> dict[str, float]:
    """`train_flops_per_token` in three parts: `weights` (every matmul with a weight matrix, and
    its bias), `norms` (the RMSNorm gains, counted like weights) and `attention_scores`."""
    trains = trained_groups(trainable)
    d, hd = cfg.dim, cfg.head_dim
    q, kv = cfg.n_heads * hd, cfg.n_kv_heads * hd
    qk_norm = {"none": 0, "head": 2 * hd, "proj": q + kv}[cfg.qk_norm]
    qkv = d * (q + 2 * kv) + (q + 2 * kv) * cfg.qkv_bias
    out = q * d + d * cfg.o_bias
    ffn_in, ffn_out = 2 * d * cfg.ffn_dim + 2 * cfg.ffn_dim * cfg.mlp_bias, d * cfg.ffn_dim + d * cfg.mlp_bias
    attn, norms, ffn = "attn" in trains, "norms" in trains, "ffn" in trains
    parts = {"weights": 0.0, "norms": 0.0, "attention_scores": 0.0}

    def matmul(part: str, n: float, trained: bool, grad_in: bool) -> bool:
        f, grad_out = _matmul(n, trained, grad_in)
        parts[part] += f
        return grad_out

    flows = "embed" in trains  # whether the residual stream requires grad
    for layer in range(cfg.n_layers):
        w = cfg.window(layer)
        context = seq_len if w is None or w >= seq_len else 2 * w - w * w / seq_len  # mean keys per token x 2
        post = cfg.norm_placement == "post"  # x + norm(f(x)) instead of x + f(norm(x))

        # attention
        grad = flows
        if not post:
            grad = matmul("norms", d, norms, grad)
        grad = matmul("weights", qkv, attn, grad)
        grad = matmul("norms", qk_norm, attn, grad) if qk_norm else grad
        parts["attention_scores"] += 2 * cfg.n_heads * hd * context * (3 if grad else 1)
        grad = matmul("weights", out, attn, grad)
        if post:
            grad = matmul("norms", d, norms, grad)
        flows = flows or grad

        # feed-forward: a dense FFN, or router + the experts that run per token (+ a shared expert)
        grad = flows
        if not post:
            grad = matmul("norms", d, norms, grad)
        branch = False
        if cfg.is_moe:
            branch = matmul("weights", d * cfg.n_experts, "router" in trains, grad)  # gates scale the experts
        active = cfg.experts_per_token
        if cfg.is_moe and cfg.router_mode == "sample_top1" and cfg.first_layer_soft and layer == 0:
            active = cfg.n_experts  # the first layer routes softly: every expert runs
        hidden = matmul("weights", active * ffn_in, ffn, grad)
        branch = matmul("weights", active * ffn_out, ffn, hidden) or branch
        if cfg.shared_expert_dim:
            shared, s = "shared" in trains, cfg.shared_expert_dim
            gate = matmul("weights", d, shared, grad)
            hidden = matmul("weights", 2 * d * s, shared, grad)
            branch = matmul("weights", d * s, shared, hidden) or gate or branch
        if post:
            branch = matmul("norms", d, norms, branch)
        flows = flows or branch

    head = "embed" in trains if cfg.tie_embeddings else "head" in trains
    matmul("weights", cfg.vocab_size * d, head, flows)
    return parts


def describe(trainable: str) -> dict:
    """What DONE.json records about how its `train_flops` were counted."""
    return {"trainable": trainable, "rule": FLOPS_RULE}
