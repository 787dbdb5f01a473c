"""ModelConfig, one config for the dense model and the MoE (`n_experts == 0` is dense), and the
small records the forward pass returns (Routing, MoEStats, ModelOutput).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

QK_NORMS = ("none", "head", "proj")
NORM_PLACEMENTS = ("pre", "post")
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3")


@dataclass
class ModelConfig:
    vocab_size: int = 256
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 4
    ffn_dim: int = 172
    head_dim: int = 0  # 0: dim // n_heads
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # RoPE scaling: {"rope_type": one of ROPE_TYPES, and that type's fields as transformers names
    # them (factor, original_max_position_embeddings, ...)}; None means plain RoPE.
    rope_scaling: dict | None = None
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    # Architecture switches the model families need (defaults: Llama).
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: str = "none"  # none | head | proj
    norm_placement: str = "pre"  # pre | post
    sliding_window: int | None = None
    sliding_layers: list[int] | None = None  # with sliding_window: None = every layer
    # Which btx.families spec reads and writes this model's checkpoints, and, for an MoE, which of
    # its MoE forms (model_type) when not the family's default (None: chosen by the family).
    family: str = "llama"
    moe_form: str | None = None
    # Mixture of experts; n_experts == 0 is the dense model.
    n_experts: int = 0
    top_k: int = 2
    router_mode: str = "topk"
    norm_topk_prob: bool = True  # topk: renormalise the k gates to sum to 1 (Mixtral does)
    shared_expert_dim: int = 0  # > 0: a shared expert of this width, gated by sigmoid(w x)
    capacity_factor: float = 1.5  # switch: slots per expert = ceil(cf * T / E)
    gumbel_rate: float = 1e-4  # sample_top1: temperature max(0.5, exp(-rate * step))
    first_layer_soft: bool = True  # sample_top1: the first MoE layer routes softly, as in the paper
    expert_names: list[str] | None = None  # labels (e.g. the domains); the model itself ignores them
    extra: dict = field(default_factory=dict)  # config.json fields btx carries along untouched

    def __post_init__(self):
        if not self.head_dim:
            self.head_dim = self.dim // self.n_heads
        # One spelling per meaning: sliding_layers None = every layer; no sliding layer = no window.
        if self.sliding_window is None:
            self.sliding_layers = None
        elif self.sliding_layers is not None:
            layers = sorted(set(self.sliding_layers))
            if not layers:
                self.sliding_window, layers = None, None
            elif layers == list(range(self.n_layers)):
                layers = None
            self.sliding_layers = layers

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0

    def window(self, layer: int) -> int | None:
        """The sliding window of layer `layer`, or None for full causal attention."""
        if self.sliding_window is None or (self.sliding_layers is not None and layer not in self.sliding_layers):
            return None
        return self.sliding_window

    @property
    def experts_per_token(self) -> int:
        """How many expert FFNs run per token (the 'active' experts)."""
        if not self.is_moe:
            return 1
        if self.router_mode == "soft":
            return self.n_experts
        if self.router_mode in ("switch", "sample_top1"):
            return 1
        return self.top_k

    def param_counts(self) -> dict[str, int]:
        """Total and active (per token) parameter counts, embeddings included."""
        d, f, hd = self.dim, self.ffn_dim, self.head_dim
        q, kv = self.n_heads * hd, self.n_kv_heads * hd
        attn = d * (2 * q + 2 * kv) + 2 * d  # q, o, k, v, two norms
        attn += (q + 2 * kv) * self.qkv_bias + d * self.o_bias
        attn += {"none": 0, "head": 2 * hd, "proj": q + kv}[self.qk_norm]
        ffn = 3 * d * f + (2 * f + d) * self.mlp_bias
        shared = 3 * d * self.shared_expert_dim + d if self.shared_expert_dim else 0
        embed = self.vocab_size * d * (1 if self.tie_embeddings else 2) + d
        experts = max(self.n_experts, 1)
        router = d * self.n_experts
        total = embed + self.n_layers * (attn + router + experts * ffn + shared)
        active_ffns = self.n_layers * self.experts_per_token
        if self.router_mode == "sample_top1" and self.first_layer_soft and self.is_moe:
            active_ffns += self.n_experts - 1  # the first layer routes softly: all experts run
        active = embed + self.n_layers * (attn + router + shared) + active_ffns * ffn
        return {"total": total, "active": active}


@dataclass
class Routing:
    """A router's decision for T tokens. Slots whose expert id equals E were dropped (switch)."""

    expert_TK: torch.Tensor  # long
    gate_TK: torch.Tensor  # fp32 weight of each chosen expert
    probs_TE: torch.Tensor  # fp32 softmax over all experts (for the balancing loss and analysis)
    dropped: int = 0


@dataclass
class MoEStats:
    """Per-layer by-products of an MoE forward: losses (tensors) and load (host ints)."""

    balance_loss: torch.Tensor  # E * sum_i u_i * p_i, not yet scaled by alpha
    z_loss: torch.Tensor  # mean(logsumexp(logits)^2)
    tokens_per_expert: list[int]
    dropped: int


@dataclass
class ModelOutput:
    logits: torch.Tensor
    balance_loss: torch.Tensor  # summed over MoE layers (0 for dense); the trainer scales it by alpha
    z_loss: torch.Tensor  # summed over MoE layers
    moe_stats: list[MoEStats]
