"""The Llama-family transformer and its Mixture-of-Experts feed-forward. Imports only torch.

Design choices
- One config (`ModelConfig`) describes both the dense model and the MoE: `n_experts == 0` is dense.
- Llama parts: RMSNorm, RoPE in the "rotate half" layout Hugging Face checkpoints use (so weights
  load without permutation), Llama-3 rope scaling, grouped-query attention through
  `scaled_dot_product_attention`, SwiGLU, optional tied embeddings (no `lm_head` parameter then).
- The MoE router is an fp32 `Linear(d, E)`; expert weights are stacked 3-D parameters
  (`w1[E,F,d]`, `w3[E,F,d]`, `w2[E,d,F]`), which keeps ZeRO-3 safe when an expert gets no tokens.
- Routing has one plug-in point, `Router.route`, which returns the chosen experts and their gates.
- Dispatch sorts token slots by expert once (stable argsort), syncs with the host once per layer
  for the per-expert counts, runs each expert on one contiguous slice (or one `grouped_mm`), and
  combines with `index_add_`. The loop path is the readable reference; the grouped path must agree.
- The model knows nothing of training, parallelism or checkpoint formats (see hf.py for those).

Shape legend: B batch, T tokens (flattened B*S), S sequence, D model dim, F ffn dim, E experts,
K experts per token, V vocab, H heads, G kv heads, Hd head dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

ROUTER_MODES = ("topk", "switch", "soft", "sample_top1")


@dataclass
class ModelConfig:
    vocab_size: int = 256
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 4
    ffn_dim: int = 172
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # Llama-3 style: {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    # "original_max_position_embeddings"}; None means plain RoPE.
    rope_scaling: dict | None = None
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    # Mixture of experts; n_experts == 0 is the dense model.
    n_experts: int = 0
    top_k: int = 2
    router_mode: str = "topk"
    capacity_factor: float = 1.5  # switch: slots per expert = ceil(cf * T / E)
    gumbel_rate: float = 1e-4  # sample_top1: temperature max(0.5, exp(-rate * step))
    first_layer_soft: bool = True  # sample_top1: the first MoE layer routes softly, as in the paper
    extra: dict = field(default_factory=dict)  # config.json fields btx carries along untouched

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0
