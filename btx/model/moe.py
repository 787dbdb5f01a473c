"""The feed-forward layers: dense SwiGLU, the router and the MoE.

- The router is an fp32 `Linear(d, E)`; `Router.route` is the one place routing modes plug in
  (topk, switch with capacity, soft, sample_top1 with Gumbel noise).
- Experts are stacked 3-D parameters (`w1[E,F,D]`, `w3[E,F,D]`, `w2[E,D,F]`), which keeps ZeRO-3
  safe when an expert gets no tokens.
- Dispatch sorts token slots by expert once (stable argsort), syncs with the host once per layer
  for the per-expert counts, runs each expert on one contiguous slice (or one `grouped_mm`) and
  combines with `index_add_`. The loop path is the readable reference; the grouped path must agree
  (tests/test_model.py).

Shape legend: T tokens (flattened B*S), D model dim, F ffn dim, E experts, K experts per token,
N expert-sorted token slots.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from btx.choices import ROUTER_MODES
from btx.model.config import ModelConfig, MoEStats, Routing


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

    # Eager under torch.compile: `step` is a Python int that changes every step; traced, it would
    # be a constant of the graph and recompile it at every step. As a tensor it is a graph input.
    @torch.compiler.disable
    def _temperature_tensor(self, like: torch.Tensor) -> torch.Tensor:
        return torch.tensor(self.temperature(), dtype=like.dtype, device=like.device)

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
            sample_TE = ((logits_TE + gumbel_TE) / self._temperature_tensor(logits_TE)).softmax(dim=-1)
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
        gate_TE.scatter_add_(1, routing.expert_TK.clamp(max=E - 1), routing.gate_TK * kept_TK.to(routing.gate_TK.dtype))
        return E * (gate_TE.mean(0) * routing.probs_TE.mean(0)).sum()

    def dispatch(
        self, x_TD: torch.Tensor, expert_TK: torch.Tensor, gate_TK: torch.Tensor
    ) -> tuple[torch.Tensor, list[int]]:
        """Run each token slot through its expert and sum the gated outputs per token.

        Three parts, so that torch.compile traces the two with static shapes (sorting the slots;
        gating and combining) and leaves only the middle one, whose shapes depend on the routing,
        to run eagerly (`_run_sorted`)."""
        T, K = expert_TK.shape
        E = self.w1.shape[0]
        expert_N = expert_TK.reshape(-1)  # N = T*K slots; id E marks a dropped slot
        order_N = torch.argsort(expert_N, stable=True)
        # bincount's output length depends on the data (a graph break under torch.compile); this
        # count has the static length E + 1 and the same integers.
        counts_E = expert_N.new_zeros(E + 1).index_add_(0, expert_N, torch.ones_like(expert_N))
        out_ND, order_N, counts = self._run_sorted(x_TD, order_N, counts_E, K)
        token_N = order_N // K
        gate_N = gate_TK.reshape(-1).index_select(0, order_N).to(out_ND.dtype)
        y_TD = torch.zeros_like(x_TD).index_add_(0, token_N, out_ND * gate_N[:, None])
        return y_TD, counts

    # Eager under torch.compile: the host sync (`tolist`) and the per-expert slices have shapes
    # that depend on the routing, which would break the graph or recompile at every step; the
    # expert GEMMs gain nothing from compiling anyway.
    @torch.compiler.disable
    def _run_sorted(
        self, x_TD: torch.Tensor, order_N: torch.Tensor, counts_E: torch.Tensor, K: int
    ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """The expert outputs of the kept slots in expert order, those slots, and the per-expert counts."""
        counts = counts_E.tolist()  # the one host sync of this layer
        E = len(counts) - 1
        order_N = order_N[: order_N.shape[0] - counts[E]]  # dropped slots (id E) sort last
        x_ND = x_TD.index_select(0, order_N // K)
        use_grouped = self.impl == "grouped" or (self.impl == "auto" and grouped_mm_supported(x_TD))
        if use_grouped:
            out_ND = self._experts_grouped(x_ND, counts_E[:E])
        else:
            out_ND = self._experts_loop(x_ND, counts[:E])
        return out_ND, order_N, counts[:E]

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
