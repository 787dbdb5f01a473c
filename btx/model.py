"""The transformer btx trains, merges and finetunes, dense or MoE. Imports only torch.

Design choices
- One config (`ModelConfig`) describes both the dense model and the MoE: `n_experts == 0` is dense.
- One model for every family btx reads (see btx/families/): Llama's layout, plus the few switches
  the families need, and nothing family-specific beyond them:
  - `head_dim` (explicit, e.g. Qwen3's 128 with hidden/heads = 80), `qkv_bias` (Qwen2),
    `o_bias` and `mlp_bias` (Llama's attention_bias / mlp_bias);
  - `qk_norm`: RMSNorm of queries and keys before RoPE, per head ("head", Qwen3) or over the whole
    projection ("proj", OLMo-2);
  - `norm_placement`: "pre" (Llama: x + f(norm(x))) or "post" (OLMo-2: x + norm(f(x)); each
    block's `attn_norm` / `ffn_norm` is then applied to its sublayer's output);
  - `sliding_window` with `sliding_layers` (Mistral, Qwen2/3): a token sees itself and the
    window - 1 tokens before it;
  - RoPE in the "rotate half" layout Hugging Face checkpoints use (weights load without
    permutation), with every scaling transformers implements for these families: linear,
    dynamic NTK, YaRN, LongRoPE, Llama-3 (`rope_frequencies`);
  - MoE: `norm_topk_prob` (renormalise the top-k gates or not) and an optional sigmoid-gated
    shared expert (`shared_expert_dim`, Qwen2-MoE).
- Grouped-query attention through `scaled_dot_product_attention`, SwiGLU, optional tied embeddings.
- The MoE router is an fp32 `Linear(d, E)`; expert weights are stacked 3-D parameters
  (`w1[E,F,d]`, `w3[E,F,d]`, `w2[E,d,F]`), which keeps ZeRO-3 safe when an expert gets no tokens.
- Routing has one plug-in point, `Router.route`, which returns the chosen experts and their gates.
- Dispatch sorts token slots by expert once (stable argsort), syncs with the host once per layer
  for the per-expert counts, runs each expert on one contiguous slice (or one `grouped_mm`), and
  combines with `index_add_`. The loop path is the readable reference; the grouped path must agree.
- The model knows nothing of training, parallelism or checkpoint formats (see hf.py for those).

Shape legend: B batch, T tokens (flattened B*S), S sequence, D model dim, F ffn dim, E experts,
K experts per token, V vocab, H heads, G kv heads, Hd head dim, N expert-sorted token slots.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

ROUTER_MODES = ("topk", "switch", "soft", "sample_top1")
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


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 whatever the activation dtype, as Llama does.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_frequencies(cfg: ModelConfig, seq_len: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [Hd/2] for sequences of `seq_len` tokens, and the factor cos and sin are
    scaled by (YaRN and LongRoPE scale attention through it; 1 for the others).

    Each scaling follows transformers' definition. "dynamic" and "longrope" depend on the length:
    btx computes them from the current sequence's length on every call, which is what transformers
    computes on a fresh model (its cache of the longest length seen is not modelled).
    """
    hd = cfg.head_dim
    exponent = torch.arange(0, hd, 2, dtype=torch.float32) / hd
    base = cfg.rope_theta
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return 1.0 / (base**exponent), 1.0
    if kind == "linear":
        return 1.0 / (base**exponent) / scaling["factor"], 1.0
    if kind == "dynamic":
        # NTK-aware: past the trained length the base grows so the lowest frequency stretches with it.
        factor, trained = scaling["factor"], cfg.max_seq_len
        length = max(seq_len, trained)
        base = base * ((factor * length / trained) - (factor - 1)) ** (hd / (hd - 2))
        return 1.0 / (base**exponent), 1.0
    original = scaling.get("original_max_position_embeddings") or cfg.max_seq_len
    factor = scaling.get("factor") or cfg.max_seq_len / original
    if kind == "llama3":
        inv_freq = 1.0 / (base**exponent)
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        wavelen = 2 * math.pi / inv_freq
        # Long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
        smooth = ((original / wavelen - low) / (high - low)).clamp(0.0, 1.0)
        return (1 - smooth) * inv_freq / factor + smooth * inv_freq, 1.0
    if kind == "yarn":
        attention = scaling.get("attention_factor")
        if attention is None:
            mscale, mscale_all = scaling.get("mscale"), scaling.get("mscale_all_dim")

            def m(s: float, k: float = 1.0) -> float:
                return 1.0 if s <= 1 else 0.1 * k * math.log(s) + 1.0

            attention = m(factor, mscale) / m(factor, mscale_all) if mscale and mscale_all else m(factor)
        fast, slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

        def correction_dim(rotations: float) -> float:  # the dimension that turns `rotations` times
            return hd * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

        lo, hi = correction_dim(fast), correction_dim(slow)
        if scaling.get("truncate", True):
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, hd - 1)
        if lo == hi:
            hi += 0.001
        # High frequencies extrapolate (kept), low ones interpolate (divided by factor), ramped between.
        keep = 1 - ((torch.arange(hd // 2, dtype=torch.float32) - lo) / (hi - lo)).clamp(0, 1)
        pos_freqs = base**exponent
        return (1.0 / (factor * pos_freqs)) * (1 - keep) + (1.0 / pos_freqs) * keep, float(attention)
    if kind == "longrope":
        attention = scaling.get("attention_factor")
        if attention is None:
            attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
        ext = scaling["long_factor"] if seq_len > original else scaling["short_factor"]
        return 1.0 / (torch.tensor(ext, dtype=torch.float32) * base**exponent), float(attention)
    raise ValueError(f"unsupported rope_type {kind!r}; btx supports {', '.join(ROPE_TYPES)}")


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_index: int):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        self.wq = nn.Linear(cfg.dim, q, bias=cfg.qkv_bias)
        self.wk = nn.Linear(cfg.dim, kv, bias=cfg.qkv_bias)
        self.wv = nn.Linear(cfg.dim, kv, bias=cfg.qkv_bias)
        self.wo = nn.Linear(q, cfg.dim, bias=cfg.o_bias)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm != "none":
            width = (cfg.head_dim, cfg.head_dim) if cfg.qk_norm == "head" else (q, kv)
            self.q_norm = RMSNorm(width[0], cfg.norm_eps)
            self.k_norm = RMSNorm(width[1], cfg.norm_eps)
        self.window = cfg.window(layer_index)

    def forward(self, x_BSD: torch.Tensor, cos_SHd: torch.Tensor, sin_SHd: torch.Tensor) -> torch.Tensor:
        B, S, _ = x_BSD.shape
        q, k, v = self.wq(x_BSD), self.wk(x_BSD), self.wv(x_BSD)
        if self.qk_norm == "proj":  # over all heads at once (OLMo-2)
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(B, S, self.n_heads, self.head_dim)
        k = k.view(B, S, self.n_kv_heads, self.head_dim)
        if self.qk_norm == "head":  # each head on its own (Qwen3)
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = v.view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = cos_SHd.to(q.dtype), sin_SHd.to(q.dtype)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        gqa = self.n_kv_heads != self.n_heads
        if self.window is None or S <= self.window:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:  # token i sees keys i - window + 1 .. i
            i = torch.arange(S, device=x_BSD.device)
            offset_SS = i[:, None] - i[None, :]
            mask_SS = (offset_SS >= 0) & (offset_SS < self.window)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_SS, enable_gqa=gqa)
        return self.wo(out.transpose(1, 2).reshape(B, S, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, ffn_dim: int, bias: bool = False):
        super().__init__()
        self.w1 = nn.Linear(dim, ffn_dim, bias=bias)
        self.w3 = nn.Linear(dim, ffn_dim, bias=bias)
        self.w2 = nn.Linear(ffn_dim, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Router(nn.Module):
    """fp32 linear router; `route` is the one place where routing modes plug in."""

    def __init__(self, cfg: ModelConfig, layer_index: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cfg.n_experts, cfg.dim, dtype=torch.float32))
        self.n_experts, self.top_k, self.norm_topk_prob = cfg.n_experts, cfg.top_k, cfg.norm_topk_prob
        self.mode = cfg.router_mode
        if self.mode == "sample_top1" and cfg.first_layer_soft and layer_index == 0:
            self.mode = "soft"
        self.capacity_factor, self.gumbel_rate = cfg.capacity_factor, cfg.gumbel_rate
        self.step = 0  # set by the trainer; drives the sample_top1 temperature

    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        return F.linear(x_TD.float(), self.weight.float())

    def temperature(self) -> float:
        return max(0.5, math.exp(-self.gumbel_rate * self.step))

    def route(self, logits_TE: torch.Tensor) -> Routing:
        probs_TE = logits_TE.softmax(dim=-1)
        T, E = probs_TE.shape
        if self.mode == "topk":
            # renormalised: softmax over the top-k logits == Mixtral's softmax -> top-k -> renormalise
            top_TK, expert_TK = probs_TE.topk(self.top_k, dim=-1)
            if self.norm_topk_prob:
                top_TK = top_TK / top_TK.sum(-1, keepdim=True)
            return Routing(expert_TK, top_TK, probs_TE)
        if self.mode == "soft":
            expert_TK = torch.arange(E, device=logits_TE.device).expand(T, E)
            return Routing(expert_TK, probs_TE, probs_TE)
        if self.mode == "switch":
            gate_T1, expert_T1 = probs_TE.max(dim=-1, keepdim=True)
            capacity = math.ceil(self.capacity_factor * T / E)
            # Tokens claim their expert's slots in sequence order; the ones past capacity are
            # sent to the overflow id E and pass through the residual untouched.
            onehot_TE = F.one_hot(expert_T1.squeeze(1), E)
            position_T = (onehot_TE.cumsum(0) * onehot_TE).sum(-1) - 1
            over_T = position_T >= capacity
            expert_T1 = expert_T1.masked_fill(over_T[:, None], E)
            return Routing(expert_T1, gate_T1, probs_TE, dropped=int(over_T.sum()))
        if self.mode == "sample_top1":
            if not self.training:  # hard choice at inference
                expert_T1 = logits_TE.argmax(dim=-1, keepdim=True)
                return Routing(expert_T1, torch.ones_like(expert_T1, dtype=probs_TE.dtype), probs_TE)
            gumbel_TE = -torch.empty_like(logits_TE).exponential_().log()
            sample_TE = ((logits_TE + gumbel_TE) / self.temperature()).softmax(dim=-1)
            gate_T1, expert_T1 = sample_TE.max(dim=-1, keepdim=True)  # keep only the sample's max
            return Routing(expert_T1, gate_T1, probs_TE)
        raise ValueError(f"unknown router_mode {self.mode!r}; expected one of {ROUTER_MODES}")


def grouped_mm_supported(x: torch.Tensor) -> bool:
    """The grouped GEMM is the fast path on Hopper-class GPUs in bf16; elsewhere the loop wins."""
    return (
        x.is_cuda
        and x.dtype == torch.bfloat16
        and torch.cuda.get_device_capability(x.device)[0] >= 9
        and hasattr(torch, "_grouped_mm")
    )


class SortedExperts(torch.autograd.Function):
    """SwiGLU experts over expert-sorted slots, with a hand-written backward.

    Autograd through `w1[e]` (or `unbind`) would build each stacked weight gradient from E
    separate pieces, allocating and copying [E,F,D] several times per step; here every expert
    writes its gradient straight into one preallocated [E,F,D] tensor. Activations h1 = x w1^T,
    h3 = x w3^T and a = silu(h1) h3 are kept for the backward (autograd would keep one more).
    """

    @staticmethod
    def forward(ctx, x_ND, counts, w1_EFD, w3_EFD, w2_EDF):
        h1_NF = x_ND.new_empty(x_ND.shape[0], w1_EFD.shape[1])
        h3_NF = torch.empty_like(h1_NF)
        a_NF = torch.empty_like(h1_NF)
        out_ND = torch.empty_like(x_ND)
        start = 0
        for e, n in enumerate(counts):
            if n:
                s = slice(start, start + n)
                torch.mm(x_ND[s], w1_EFD[e].t(), out=h1_NF[s])
                torch.mm(x_ND[s], w3_EFD[e].t(), out=h3_NF[s])
                torch.mul(F.silu(h1_NF[s]), h3_NF[s], out=a_NF[s])
                torch.mm(a_NF[s], w2_EDF[e].t(), out=out_ND[s])
                start += n
        ctx.counts = counts
        ctx.save_for_backward(x_ND, h1_NF, h3_NF, a_NF, w1_EFD, w3_EFD, w2_EDF)
        return out_ND

    @staticmethod
    def backward(ctx, grad_ND):
        x_ND, h1_NF, h3_NF, a_NF, w1_EFD, w3_EFD, w2_EDF = ctx.saved_tensors
        grad_ND = grad_ND.contiguous()
        gx_ND = torch.empty_like(x_ND)
        # Frozen experts (finetuning with trainable=frozen_experts) get no weight gradient at all,
        # which saves two thirds of the expert backward.
        want1, want3, want2 = ctx.needs_input_grad[2:5]
        gw1 = torch.empty_like(w1_EFD) if want1 else None
        gw3 = torch.empty_like(w3_EFD) if want3 else None
        gw2 = torch.empty_like(w2_EDF) if want2 else None
        start = 0
        for e, n in enumerate(ctx.counts):
            if n == 0:
                for gw in (gw1, gw3, gw2):
                    if gw is not None:
                        gw[e].zero_()
                continue
            s = slice(start, start + n)
            x, h1, h3, g = x_ND[s], h1_NF[s], h3_NF[s], grad_ND[s]
            if want2:
                torch.mm(g.t(), a_NF[s], out=gw2[e])
            ga_nF = g @ w2_EDF[e]
            gh3_nF = ga_nF * F.silu(h1)
            gh1_nF = torch.ops.aten.silu_backward(ga_nF.mul_(h3), h1)  # fused d silu(h1)/dh1 * grad
            if want1:
                torch.mm(gh1_nF.t(), x, out=gw1[e])
            if want3:
                torch.mm(gh3_nF.t(), x, out=gw3[e])
            torch.mm(gh1_nF, w1_EFD[e], out=gx_ND[s])
            gx_ND[s].addmm_(gh3_nF, w3_EFD[e])
            start += n
        return gx_ND, None, gw1, gw3, gw2


class MoEFeedForward(nn.Module):
    """E SwiGLU experts with stacked weights and a router (plus an optional sigmoid-gated shared
    expert that every token passes through). `impl`: auto | loop | grouped."""

    def __init__(self, cfg: ModelConfig, layer_index: int):
        super().__init__()
        E, D, Fd = cfg.n_experts, cfg.dim, cfg.ffn_dim
        self.router = Router(cfg, layer_index)
        self.w1 = nn.Parameter(torch.empty(E, Fd, D))
        self.w3 = nn.Parameter(torch.empty(E, Fd, D))
        self.w2 = nn.Parameter(torch.empty(E, D, Fd))
        if cfg.shared_expert_dim:
            self.shared = FeedForward(D, cfg.shared_expert_dim)
            self.shared_gate = nn.Linear(D, 1, bias=False)
        self.impl = "auto"
        self.record_routing = False
        self.last_routing: Routing | None = None

    def forward(self, x_BSD: torch.Tensor) -> tuple[torch.Tensor, MoEStats]:
        B, S, D = x_BSD.shape
        x_TD = x_BSD.reshape(B * S, D)
        logits_TE = self.router.logits(x_TD)
        routing = self.router.route(logits_TE)
        if self.record_routing:
            self.last_routing = Routing(
                routing.expert_TK.detach(), routing.gate_TK.detach(), routing.probs_TE.detach(), routing.dropped
            )
        y_TD, counts = self.dispatch(x_TD, routing.expert_TK, routing.gate_TK)
        if hasattr(self, "shared"):
            y_TD = y_TD + torch.sigmoid(self.shared_gate(x_TD)) * self.shared(x_TD)
        stats = MoEStats(
            balance_loss=self.balance_loss(routing),
            z_loss=torch.logsumexp(logits_TE, dim=-1).pow(2).mean(),
            tokens_per_expert=counts,
            dropped=routing.dropped,
        )
        return y_TD.view(B, S, D), stats

    def balance_loss(self, routing: Routing) -> torch.Tensor:
        """Paper's L_LB / alpha = E * sum_i u_i p_i; u_i mean gate value, p_i mean router prob."""
        T, E = routing.probs_TE.shape
        gate_TE = torch.zeros_like(routing.probs_TE)
        kept_TK = routing.expert_TK < E
        gate_TE.scatter_add_(
            1, routing.expert_TK.clamp(max=E - 1), routing.gate_TK * kept_TK.to(routing.gate_TK.dtype)
        )
        return E * (gate_TE.mean(0) * routing.probs_TE.mean(0)).sum()

    def dispatch(
        self, x_TD: torch.Tensor, expert_TK: torch.Tensor, gate_TK: torch.Tensor
    ) -> tuple[torch.Tensor, list[int]]:
        """Run each token slot through its expert and sum the gated outputs per token."""
        T, K = expert_TK.shape
        E = self.w1.shape[0]
        expert_N = expert_TK.reshape(-1)  # N = T*K slots; id E marks a dropped slot
        order_N = torch.argsort(expert_N, stable=True)
        counts_E = torch.bincount(expert_N, minlength=E + 1)
        counts = counts_E.tolist()  # the one host sync of this layer
        kept = T * K - counts[E]
        order_N = order_N[:kept]
        token_N = order_N // K
        x_ND = x_TD.index_select(0, token_N)
        use_grouped = self.impl == "grouped" or (self.impl == "auto" and grouped_mm_supported(x_TD))
        if use_grouped:
            out_ND = self._experts_grouped(x_ND, counts_E[:E])
        else:
            out_ND = self._experts_loop(x_ND, counts[:E])
        gate_N = gate_TK.reshape(-1).index_select(0, order_N).to(out_ND.dtype)
        y_TD = torch.zeros_like(x_TD).index_add_(0, token_N, out_ND * gate_N[:, None])
        return y_TD, counts[:E]

    def _experts_loop(self, x_ND: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Portable path: one contiguous slice per expert, no further host syncs."""
        return SortedExperts.apply(x_ND, counts, self.w1, self.w3, self.w2)

    def _experts_grouped(self, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """Fast path: one grouped GEMM per projection over the expert-sorted slots."""
        grouped_mm = getattr(F, "grouped_mm", None) or torch._grouped_mm
        offs_E = counts_E.cumsum(0).to(torch.int32)
        h_NF = F.silu(grouped_mm(x_ND, self.w1.transpose(1, 2), offs=offs_E)) * grouped_mm(
            x_ND, self.w3.transpose(1, 2), offs=offs_E
        )
        return grouped_mm(h_NF, self.w2.transpose(1, 2), offs=offs_E)


class Block(nn.Module):
    """Attention then FFN, each added to the residual stream. With norm_placement "pre" a sublayer
    reads a normalised input (x + f(norm(x))); with "post" its output is normalised (x + norm(f(x)))."""

    def __init__(self, cfg: ModelConfig, layer_index: int):
        super().__init__()
        self.post_norm = cfg.norm_placement == "post"
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg, layer_index)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        if cfg.is_moe:
            self.ffn = MoEFeedForward(cfg, layer_index)
        else:
            self.ffn = FeedForward(cfg.dim, cfg.ffn_dim, cfg.mlp_bias)

    # The three steps of forward, public because router inits walk the layers one step at a time.
    def attend(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """The residual stream after the attention sublayer."""
        if self.post_norm:
            return x + self.attn_norm(self.attn(x, cos, sin))
        return x + self.attn(self.attn_norm(x), cos, sin)

    def ffn_input(self, h: torch.Tensor) -> torch.Tensor:
        """What the FFN (and so the router) reads."""
        return h if self.post_norm else self.ffn_norm(h)

    def add_ffn(self, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The residual stream after adding the FFN's output `y`."""
        return h + (self.ffn_norm(y) if self.post_norm else y)

    def forward(self, x, cos, sin) -> tuple[torch.Tensor, MoEStats | None]:
        h = self.attend(x, cos, sin)
        y = self.ffn(self.ffn_input(h))
        y, stats = y if isinstance(y, tuple) else (y, None)
        return self.add_ffn(h, y), stats


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        inv_freq, self.rope_scale = rope_frequencies(cfg, cfg.max_seq_len)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        kind = (cfg.rope_scaling or {}).get("rope_type", "default")
        self.rope_depends_on_length = kind in ("dynamic", "longrope")

    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None) -> None:
        """Normal(0, std) weights; residual-output projections scaled by 1/sqrt(2 n_layers) (GPT-2);
        norm gains 1, biases 0."""
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)
            else:
                scale = out_std if name.endswith(("wo.weight", "w2.weight", "ffn.w2")) else std
                with torch.no_grad():
                    p.normal_(0.0, scale, generator=generator)

    def rope(self, seq_len: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq, scale = self.inv_freq, self.rope_scale
        if self.rope_depends_on_length:
            inv_freq, scale = rope_frequencies(self.cfg, seq_len)
        pos = torch.arange(seq_len, device=device, dtype=torch.float32)
        freqs_SH = torch.outer(pos, inv_freq.to(device))
        emb = torch.cat((freqs_SH, freqs_SH), dim=-1)
        if scale == 1.0:
            return emb.cos(), emb.sin()
        return emb.cos() * scale, emb.sin() * scale

    def moe_layers(self) -> list[MoEFeedForward]:
        return [b.ffn for b in self.layers if isinstance(b.ffn, MoEFeedForward)]

    def set_routing_record(self, on: bool) -> None:
        for ffn in self.moe_layers():
            ffn.record_routing, ffn.last_routing = on, None

    def set_router_step(self, step: int) -> None:
        for ffn in self.moe_layers():
            ffn.router.step = step

    def set_moe_impl(self, impl: str) -> None:
        for ffn in self.moe_layers():
            ffn.impl = impl

    def forward(self, tokens_BS: torch.Tensor) -> ModelOutput:
        x = self.embed(tokens_BS)
        cos, sin = self.rope(tokens_BS.shape[1], tokens_BS.device)
        zero = x.new_zeros((), dtype=torch.float32)
        balance, z, stats = zero, zero, []
        for block in self.layers:
            x, layer_stats = block(x, cos, sin)
            if layer_stats is not None:
                balance = balance + layer_stats.balance_loss
                z = z + layer_stats.z_loss
                stats.append(layer_stats)
        x = self.norm(x)
        logits = self.lm_head(x) if self.lm_head is not None else F.linear(x, self.embed.weight)
        return ModelOutput(logits, balance, z, stats)
