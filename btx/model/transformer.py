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

import torch
import torch.nn.functional as F
from torch import nn

from btx.model.config import ROPE_TYPES, ModelConfig, ModelOutput, MoEStats
from btx.model.moe import FeedForward, MoEFeedForward


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

    def forward(
        self, x_BSD: torch.Tensor, cos_SHd: torch.Tensor, sin_SHd: torch.Tensor, mask_B1SS: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`cos`/`sin` are [S, Hd], or [B, 1, S, Hd] with per-row positions (document masking).
        `mask_B1SS` (True: may attend) replaces the plain causal mask: a document mask, already
        causal; None keeps SDPA's is_causal fast path."""
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
        windowed = self.window is not None and S > self.window
        if mask_B1SS is None and not windowed:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            mask = mask_B1SS
            if windowed:  # token i sees keys i - window + 1 .. i
                i = torch.arange(S, device=x_BSD.device)
                offset_SS = i[:, None] - i[None, :]
                window_SS = (offset_SS >= 0) & (offset_SS < self.window)
                mask = window_SS if mask is None else mask & window_SS
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.wo(out.transpose(1, 2).reshape(B, S, -1))


def document_attention(document_ids_BS: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token positions inside its document [B, S] and the attention mask [B, 1, S, S]
    (True: query i may attend key j: j <= i and the same document) of a document-id tensor."""
    B, S = document_ids_BS.shape
    index_S = torch.arange(S, device=document_ids_BS.device)
    starts_BS = torch.ones_like(document_ids_BS, dtype=torch.bool)
    starts_BS[:, 1:] = document_ids_BS[:, 1:] != document_ids_BS[:, :-1]
    first_BS = torch.where(starts_BS, index_S, torch.zeros_like(index_S)).cummax(dim=1).values
    same_BSS = document_ids_BS[:, :, None] == document_ids_BS[:, None, :]
    causal_SS = index_S[:, None] >= index_S[None, :]
    return index_S - first_BS, (same_BSS & causal_SS)[:, None]


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
    def attend(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask=None) -> torch.Tensor:
        """The residual stream after the attention sublayer (`mask`: see Attention.forward)."""
        if self.post_norm:
            return x + self.attn_norm(self.attn(x, cos, sin, mask))
        return x + self.attn(self.attn_norm(x), cos, sin, mask)

    def ffn_input(self, h: torch.Tensor) -> torch.Tensor:
        """What the FFN (and so the router) reads."""
        return h if self.post_norm else self.ffn_norm(h)

    def add_ffn(self, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The residual stream after adding the FFN's output `y`."""
        return h + (self.ffn_norm(y) if self.post_norm else y)

    # `mask` is the one argument document masking added (None: plain causal attention, as before).
    def forward(self, x, cos, sin, mask=None) -> tuple[torch.Tensor, MoEStats | None]:
        h = self.attend(x, cos, sin, mask)
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
        for name, p in self.named_parameters():
            self.init_parameter(name, p, std, generator)

    @torch.no_grad()
    def init_parameter(
        self, name: str, p: torch.Tensor, std: float = 0.02, generator: torch.Generator | None = None
    ) -> None:
        """`init_weights` for the one parameter `name`, written into `p` (that parameter, or a tensor
        of its shape). Called for every parameter in `named_parameters` order with one generator,
        it draws exactly what `init_weights` draws: sharded construction (ZeRO-3) fills a model
        whose parameters exist only in pieces this way, one gathered parameter at a time."""
        if name.endswith("norm.weight"):
            nn.init.ones_(p)
        elif name.endswith(".bias"):
            nn.init.zeros_(p)
        else:
            scale = (
                std / math.sqrt(2 * self.cfg.n_layers) if name.endswith(("wo.weight", "w2.weight", "ffn.w2")) else std
            )
            p.normal_(0.0, scale, generator=generator)

    def rope(self, seq_len: int, device, positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [S, Hd] of positions 0 .. seq_len - 1, or [B, 1, S, Hd] of `positions` [B, S]."""
        inv_freq, scale = self.inv_freq, self.rope_scale
        if self.rope_depends_on_length:
            inv_freq, scale = rope_frequencies(self.cfg, seq_len)
        if positions is None:
            pos = torch.arange(seq_len, device=device, dtype=torch.float32)
            freqs_SH = torch.outer(pos, inv_freq.to(device))
        else:
            freqs_SH = (positions.float()[..., None] * inv_freq.to(device))[:, None]  # [B, 1, S, Hd/2]
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

    def forward(self, tokens_BS: torch.Tensor, document_ids_BS: torch.Tensor | None = None) -> ModelOutput:
        """Logits of every position. `document_ids_BS` (optional, non-decreasing along each row)
        marks which document each token belongs to: attention then stays inside a document and
        positions restart at 0 at each document's first token, so each document is computed as if
        it were alone in its row. None: one causal sequence per row (the SDPA fast path)."""
        x = self.embed(tokens_BS)
        if document_ids_BS is None:
            cos, sin = self.rope(tokens_BS.shape[1], tokens_BS.device)
            mask = None
        else:
            positions_BS, mask = document_attention(document_ids_BS)
            cos, sin = self.rope(tokens_BS.shape[1], tokens_BS.device, positions_BS)
        zero = x.new_zeros((), dtype=torch.float32)
        balance, z, stats = zero, zero, []
        for block in self.layers:
            x, layer_stats = block(x, cos, sin, mask)
            if layer_stats is not None:
                balance = balance + layer_stats.balance_loss
                z = z + layer_stats.z_loss
                stats.append(layer_stats)
        x = self.norm(x)
        logits = self.lm_head(x) if self.lm_head is not None else F.linear(x, self.embed.weight)
        return ModelOutput(logits, balance, z, stats)
