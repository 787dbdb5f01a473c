"""Routing statistics: which expert each domain's tokens go to, layer by layer.

One mechanism serves three users:
- training loops (btx finetune) log per-layer expert shares through `RoutingAccumulator`;
- `btx analyze` and `tools/routing_analysis.py` (`analyze_checkpoint` plus `routing_report` for
  the terminal, CSV and PNG output) compute every number below from the same accumulator.

The accumulator keeps sums and counts only (a few [layers, experts] tensors per domain, on the
routing's device, no host sync per update), so memory does not grow with the number of tokens.

Definitions (T tokens of one domain, layer l, expert e; the router's softmax p_t over E experts;
"chosen" = the experts a token was actually sent to, dropped switch slots excluded)
    top1_frac[l][e]       share of tokens whose top-1 expert is e. Top-1 is the chosen expert with
                          the largest gate (for top-k routing: the router's argmax).
    topk_frac[l][e]       share of tokens whose chosen experts include e. Sums to k over experts.
    load_share[l][e]      share of all chosen (token, expert) slots that went to e. Sums to 1;
                          equals topk_frac / k when nothing is dropped. Plots and heatmaps use it.
    mean_prob[l][e]       mean router probability p_t[e] (before top-k), over tokens.
    entropy_of_mean[l]    H(mean_t p_t) in nats: how evenly the router spreads probability
                          over experts across the whole domain (ln E is perfectly even).
    mean_token_entropy[l] mean_t H(p_t) in nats: how undecided the router is for a single token.
                          entropy_of_mean - mean_token_entropy is the mutual information between
                          tokens and experts: high when tokens are routed confidently and differently.
    load_imbalance[l]     max_e load / mean_e load over chosen slots (= E * max load_share):
                          1 is perfectly balanced, E means one expert takes every slot.
    dropped_frac[l]       share of tokens that no expert processed (switch capacity overflow).
    top1_agreement[l]     share of tokens whose top-1 expert at layer l equals the one at l+1.
    own_top1_frac[l]      (analysis, when expert names are known) top1_frac of the expert whose
    own_topk_frac[l]      name equals the domain's, e.g. code tokens on the "code" expert.
Layers are the model's MoE layers, numbered from 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from btx.model.config import Routing

# One line per number in routing.json (copied into the file, so it documents itself).
DEFINITIONS = {
    "tokens": "tokens analysed",
    "top1_frac": "[layer][expert] share of tokens whose top-1 expert (largest gate among chosen) is this expert",
    "topk_frac": "[layer][expert] share of tokens whose chosen experts include this expert (sums to k)",
    "load_share": "[layer][expert] share of chosen (token, expert) slots on this expert (sums to 1)",
    "mean_prob": "[layer][expert] mean router softmax probability of this expert, before top-k",
    "entropy_of_mean": "[layer] entropy in nats of the mean router distribution (ln E = perfectly even)",
    "mean_token_entropy": "[layer] mean over tokens of the entropy in nats of each token's router distribution",
    "load_imbalance": "[layer] max / mean expert load over chosen slots (1 = balanced, E = one expert takes all)",
    "dropped_frac": "[layer] share of tokens no expert processed (switch capacity overflow)",
    "top1_agreement": "[layer pair l, l+1] share of tokens with the same top-1 expert at both layers",
    "own_expert": "the expert named like the domain (from the merge's DONE.json), or null",
    "own_top1_frac": "[layer] top1_frac of the domain's own expert (overall: token-weighted over domains)",
    "own_topk_frac": "[layer] topk_frac of the domain's own expert (overall: token-weighted over domains)",
}


def routings_of(source) -> list[Routing]:
    """The routing decisions of the last forward: from a list of `Routing`, or from a model
    (a btx Transformer, or a wrapper with `.module` such as DDP or a DeepSpeed engine) whose
    routing record is on (`model.set_routing_record(True)`)."""
    if isinstance(source, Routing):
        return [source]
    if isinstance(source, (list, tuple)):
        return list(source)
    model = source
    while not hasattr(model, "moe_layers") and hasattr(model, "module"):
        model = model.module
    if not hasattr(model, "moe_layers"):
        raise TypeError(f"expected a btx Transformer or a list of Routing, got {type(source).__name__}")
    routings = [layer.last_routing for layer in model.moe_layers()]
    if any(r is None for r in routings):
        raise RuntimeError("no routing recorded: call model.set_routing_record(True) before the forward")
    return routings


def top1_experts(expert_TK: torch.Tensor, gate_TK: torch.Tensor, n_experts: int) -> torch.Tensor:
    """[T] top-1 expert of each token: the chosen expert with the largest gate, or `n_experts`
    when every slot of the token was dropped (switch overflow)."""
    kept_TK = expert_TK < n_experts
    best_T1 = gate_TK.float().masked_fill(~kept_TK, -math.inf).argmax(dim=-1, keepdim=True)
    return expert_TK.gather(1, best_T1).squeeze(1).masked_fill(~kept_TK.any(-1), n_experts)


class _Sums:
    """Running sums for one group of tokens (one domain), kept on the routing's device."""

    def __init__(self, n_layers: int, n_experts: int, device: torch.device):
        L, E = n_layers, n_experts
        self.tokens = torch.zeros((), dtype=torch.long, device=device)
        self.top1 = torch.zeros(L, E + 1, dtype=torch.long, device=device)  # column E: dropped
        self.slots = torch.zeros(L, E + 1, dtype=torch.long, device=device)
        self.prob = torch.zeros(L, E, dtype=torch.float64, device=device)
        self.token_entropy = torch.zeros(L, dtype=torch.float64, device=device)
        self.agree = torch.zeros(max(L - 1, 0), dtype=torch.long, device=device)

    FIELDS = ("tokens", "top1", "slots", "prob", "token_entropy", "agree")

    def add(self, other: _Sums) -> None:
        for name in self.FIELDS:
            getattr(self, name).add_(getattr(other, name).to(getattr(self, name).device))


class RoutingAccumulator:
    """Per-domain running routing statistics over many batches; cheap enough for a training loop.

        acc = RoutingAccumulator(n_layers=cfg.n_layers, n_experts=cfg.n_experts, top_k=cfg.top_k)
        model.set_routing_record(True)
        out = model(tokens_BS)
        acc.update(model, domain="code")        # or domain=["code", "math", ...], one per batch row
        acc.summary()["overall"]["load_share"]  # [layer][expert], each row sums to 1

    `update` only adds into a few small tensors on the routing's device (no host sync); `summary`
    moves them to the host once. `domain=None` counts towards "overall" only. Sums are local to
    the process: under data parallelism each rank sees its own tokens.
    """

    def __init__(self, n_layers: int, n_experts: int, top_k: int = 2):
        self.n_layers, self.n_experts, self.top_k = n_layers, n_experts, top_k
        self._groups: dict[str | None, _Sums] = {}

    def reset(self) -> None:
        self._groups.clear()

    @property
    def domains(self) -> list[str]:
        return [d for d in self._groups if d is not None]

    def update(self, source, domain: str | None | Sequence[str | None] = None) -> None:
        """Add one forward's routing. `source`: a model with routing recorded, or its list of
        `Routing` (one per MoE layer). `domain`: one name for all tokens, or one per batch row
        (tokens are flattened row-major, so row b owns tokens [b*S, (b+1)*S))."""
        routings = routings_of(source)
        if len(routings) != self.n_layers:
            raise ValueError(f"got routing for {len(routings)} layers, the accumulator has {self.n_layers}")
        with torch.no_grad():
            if domain is None or isinstance(domain, str):
                self._add(domain, routings, None)
                return
            rows = list(domain)
            n_tokens = routings[0].expert_TK.shape[0]
            if not rows or n_tokens % len(rows):
                raise ValueError(f"{len(rows)} row domains do not divide {n_tokens} routed tokens")
            per_row = n_tokens // len(rows)
            device = routings[0].expert_TK.device
            for name in dict.fromkeys(rows):
                row_ids = torch.tensor([b for b, d in enumerate(rows) if d == name], device=device)
                token_ids = (row_ids[:, None] * per_row + torch.arange(per_row, device=device)).reshape(-1)
                self._add(name, routings, token_ids)

    def _add(self, domain: str | None, routings: list[Routing], token_ids: torch.Tensor | None) -> None:
        E = self.n_experts
        device = routings[0].expert_TK.device
        group = self._groups.get(domain)
        if group is None:
            group = self._groups[domain] = _Sums(self.n_layers, E, device)
        top1_by_layer = []
        for layer, r in enumerate(routings):
            expert_TK, gate_TK, probs_TE = r.expert_TK, r.gate_TK, r.probs_TE
            if token_ids is not None:
                expert_TK, gate_TK, probs_TE = expert_TK[token_ids], gate_TK[token_ids], probs_TE[token_ids]
            if probs_TE.shape[-1] != E:
                raise ValueError(f"layer {layer}: router has {probs_TE.shape[-1]} experts, the accumulator {E}")
            top1_T = top1_experts(expert_TK, gate_TK, E)
            top1_by_layer.append(top1_T)
            # A token's slots name distinct experts, so counting slots counts tokens per expert.
            group.top1[layer].scatter_add_(0, top1_T, torch.ones_like(top1_T))
            slots = expert_TK.reshape(-1)
            group.slots[layer].scatter_add_(0, slots, torch.ones_like(slots))
            probs = probs_TE.double()
            group.prob[layer] += probs.sum(0)
            group.token_entropy[layer] += torch.special.entr(probs).sum()
        for layer in range(self.n_layers - 1):
            group.agree[layer] += (top1_by_layer[layer] == top1_by_layer[layer + 1]).sum()
        group.tokens += top1_by_layer[0].shape[0] if top1_by_layer else 0

    def _total(self, domains) -> _Sums:
        total = _Sums(self.n_layers, self.n_experts, torch.device("cpu"))
        for d in domains:
            total.add(self._groups[d])
        return total

    def overall(self, all_ranks: bool = False) -> dict:
        """Statistics over every token seen (named domain or not). `all_ranks=True` sums the
        counts over the ranks of the default torch.distributed group first; it is a collective,
        so every rank must call it."""
        total = self._total(list(self._groups))
        if all_ranks and torch.distributed.is_available() and torch.distributed.is_initialized():
            nccl = torch.distributed.get_backend() == "nccl"
            device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
            for name in _Sums.FIELDS:
                on_device = getattr(total, name).to(device)
                torch.distributed.all_reduce(on_device)
                setattr(total, name, on_device.cpu())
        return routing_stats(total)

    def summary(self) -> dict:
        """{"overall": stats, "domains": {name: stats}}, stats as in this module's docstring
        (plain floats and lists, JSON-ready). "overall" covers every token, named domain or not."""
        return {
            "overall": routing_stats(self._total(list(self._groups))),
            "domains": {d: routing_stats(self._total([d])) for d in self.domains},
        }


def routing_stats(sums: _Sums) -> dict:
    """Finished statistics from running sums (see the module docstring for each number)."""
    n = int(sums.tokens)
    top1 = sums.top1.double().cpu()
    slots = sums.slots.double().cpu()
    E = top1.shape[1] - 1
    denom = max(n, 1)
    kept_slots = slots[:, :E]
    load_share = kept_slots / kept_slots.sum(-1, keepdim=True).clamp(min=1)
    mean_prob = sums.prob.cpu() / denom
    return {
        "tokens": n,
        "top1_frac": _rows(top1[:, :E] / denom),
        "topk_frac": _rows(kept_slots / denom),
        "load_share": _rows(load_share),
        "mean_prob": _rows(mean_prob),
        "entropy_of_mean": _floats(torch.special.entr(mean_prob).sum(-1)),
        "mean_token_entropy": _floats(sums.token_entropy.cpu() / denom),
        "load_imbalance": _floats(load_share.max(-1).values * E),
        "dropped_frac": _floats(top1[:, E] / denom),
        "top1_agreement": _floats(sums.agree.double().cpu() / denom),
    }


def add_own_share(summary: dict, experts: Sequence[str]) -> dict:
    """Add each domain's share on the expert named like it (in place; returns `summary`).

    "overall" gets the token-weighted average over the domains that have an own expert, i.e. the
    fraction of all those domains' tokens that went to their own expert.
    """
    weighted_top1, weighted_topk, n_total = None, None, 0
    for name, stats in summary["domains"].items():
        own = experts.index(name) if name in experts else None
        stats["own_expert"] = name if own is not None else None
        if own is None:
            stats["own_top1_frac"] = stats["own_topk_frac"] = None
            continue
        stats["own_top1_frac"] = [row[own] for row in stats["top1_frac"]]
        stats["own_topk_frac"] = [row[own] for row in stats["topk_frac"]]
        n = stats["tokens"]
        top1 = torch.tensor(stats["own_top1_frac"], dtype=torch.float64) * n
        topk = torch.tensor(stats["own_topk_frac"], dtype=torch.float64) * n
        weighted_top1 = top1 if weighted_top1 is None else weighted_top1 + top1
        weighted_topk = topk if weighted_topk is None else weighted_topk + topk
        n_total += n
    overall = summary["overall"]
    overall["own_top1_frac"] = _floats(weighted_top1 / n_total) if n_total else None
    overall["own_topk_frac"] = _floats(weighted_topk / n_total) if n_total else None
    return summary


def _floats(t: torch.Tensor) -> list[float]:
    return [float(x) for x in t.tolist()]


def _rows(t: torch.Tensor) -> list[list[float]]:
    return [[float(x) for x in row] for row in t.tolist()]
