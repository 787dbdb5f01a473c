"""Routers computed from hidden states, with no training: `centroid`, `ridge` and `hidden`.

Merge (a new MoE) and grow (an MoE with experts added) share this walk. Both hand it the MoE's
weights layer by layer and some sets of token sequences; the walk runs the sequences through the
MoE one layer at a time and, at each layer, collects statistics of the FFN inputs (what the
router reads) per set. The caller turns those statistics into that layer's router rows, and the
walk routes the layers above with the rows it was given, so every layer's router is fitted on the
hidden states the finished MoE actually produces there.

The three rules (x: a token's FFN input at the layer, D wide):
- `centroid`: an expert's row is the unit-normalised mean x over its domain's validation tokens.
  A token's logit is |x| cos(x, centroid).
- `ridge` (DUME's closed form): with X the FFN inputs of every domain's tokens ([N, D]) and Y
  their one-hot expert targets ([N, G]), W = (XᵀX + λI)⁻¹ XᵀY and the rows are Wᵀ. λ is relative:
  `ridge_lambda` times the mean eigenvalue of XᵀX (trace / D), so it means the same at any width
  and token count. A token's logits are then a least-squares estimate of "which domain is this".
  Only XᵀX ([D, D]) and the per-domain sums of x are accumulated, never X itself.
- `hidden` (mergekit's hidden-state gate): an expert's row is the mean x over its positive prompts
  minus the mean x over its negative prompts (by default: every other expert's positive prompts),
  unit-normalised. An expert with no prompts gets a zero row.

`router_scale` (merge and grow) multiplies the fitted rows: an inverse temperature. A ridge row
predicts ~1 for its own domain and ~0 for the others, so at scale 1 the top-2 gates of a clear-cut
token are still about 0.66 / 0.34; a larger scale puts a confident token's weight on its own expert
and still mixes where the prediction is split.

The seed kept as an expert belongs to no domain. Its row is the rule applied to all domains
together: the normalised mean of the domain means (centroid), the mean of the domain rows
(ridge: for every token its logit is the mean of the domain logits, so it is never the first
choice of a clear-cut token but is the natural second one), zero (hidden, without prompts).

Memory: the hidden states of every token of every set (tokens x D x 4 bytes) plus one layer's
weights in fp32, plus XᵀX in fp64 for ridge.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import numpy as np
import torch

from btx.errors import BtxError
from btx.model.config import ModelConfig

FIT_INITS = ("centroid", "ridge", "hidden")  # router inits that need hidden states
SEQ_LEN = 1024  # data tokens are read as windows of this many (capped by max_seq_len and the shard)
BATCH_TOKENS = 8192  # tokens per forward micro-batch


@dataclass
class TokenSet:
    """Token sequences whose FFN inputs are pooled into one statistic (a domain, a prompt list)."""

    name: str
    batches: list[torch.Tensor]  # each [n, S] int64; S may differ between batches

    @property
    def tokens(self) -> int:
        return sum(b.numel() for b in self.batches)


@dataclass
class LayerStats:
    """FFN-input statistics of one layer: per set, the token count and the sum of x (fp64); and,
    when asked for, XᵀX over all sets together."""

    names: list[str]
    counts: torch.Tensor  # [sets]
    sums: torch.Tensor  # [sets, D]
    gram: torch.Tensor | None  # [D, D]

    def mean(self, name: str) -> torch.Tensor:
        i = self.names.index(name)
        return self.sums[i] / self.counts[i]

    def pooled_mean(self, names: Sequence[str]) -> torch.Tensor:
        """The mean x over the tokens of several sets together."""
        idx = [self.names.index(n) for n in names]
        return self.sums[idx].sum(0) / self.counts[idx].sum()


class LayerWeights(Protocol):
    """The MoE's weights in btx names (fp32), one layer at a time."""

    cfg: ModelConfig

    def embed(self) -> torch.Tensor: ...  # [V, D]

    def block(self, layer: int) -> dict[str, torch.Tensor]: ...  # the block's non-FFN tensors, names within it

    def experts(self, layer: int) -> dict[str, torch.Tensor]: ...  # "ffn.w1" etc. (and a shared expert), no router


def _unit(rows: torch.Tensor) -> torch.Tensor:
    return rows / rows.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def centroid_rows(stats: LayerStats, domains: Sequence[str | None]) -> torch.Tensor:
    """[len(domains), D]: a domain's unit mean; None (the seed) the unit mean of the domain means."""
    means = {n: stats.mean(n) for n in stats.names}
    centre = torch.stack(list(means.values())).mean(0)
    return _unit(torch.stack([centre if d is None else means[d] for d in domains])).float()


def ridge_rows(stats: LayerStats, domains: Sequence[str | None], ridge_lambda: float) -> torch.Tensor:
    """[len(domains), D]: the ridge solution's rows; None (the seed) the mean of the domain rows."""
    targets = [d for d in domains if d is not None]
    if stats.gram is None:
        raise ValueError("ridge_rows needs the walk to collect XᵀX (need_gram=True)")
    gram = stats.gram
    D = gram.shape[0]
    lam = ridge_lambda * float(torch.diagonal(gram).sum()) / D
    xty_DG = torch.stack([stats.sums[stats.names.index(d)] for d in targets], dim=1)
    w_DG = torch.linalg.solve(gram + lam * torch.eye(D, dtype=gram.dtype), xty_DG)
    rows = {d: w_DG[:, j] for j, d in enumerate(targets)}
    mean = w_DG.mean(1)
    return torch.stack([mean if d is None else rows[d] for d in domains]).float()


def hidden_rows(stats: LayerStats, positive: Sequence[str | None], negative: Sequence[Sequence[str]]) -> torch.Tensor:
    """[len(positive), D]: unit(mean(positive set) - mean(its negative sets)); None: a zero row."""
    D = stats.sums.shape[1]
    rows = []
    for pos, neg in zip(positive, negative):
        if pos is None:
            rows.append(torch.zeros(D, dtype=torch.float64))
            continue
        row = stats.mean(pos) - (stats.pooled_mean(neg) if neg else 0.0)
        rows.append(_unit(row))
    return torch.stack(rows).float()


@torch.inference_mode()
def walk(
    weights: LayerWeights,
    sets: Sequence[TokenSet],
    router_for_layer: Callable[[int, LayerStats], torch.Tensor],
    *,
    need_gram: bool = False,
    device: str | torch.device | None = None,
    on_layer: Callable[[int], None] | None = None,
) -> dict[int, torch.Tensor]:
    """Run `sets` through the MoE layer by layer; `router_for_layer(i, stats)` gives layer i's
    router rows [E, D] from its FFN-input statistics, and those rows route layer i on the way up.
    Returns {layer: rows} (fp32)."""
    from accelerate import init_empty_weights

    from btx.model.transformer import Transformer

    cfg = weights.cfg
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    with init_empty_weights(include_buffers=False):  # parameters on the meta device: nothing allocated
        model = Transformer(cfg)
    embed = weights.embed()
    # Hidden states per (set, batch), kept on the CPU between layers.
    states = [[embed[b].float() for b in s.batches] for s in sets]
    del embed
    rope = {}
    routers: dict[int, torch.Tensor] = {}
    for i, block in enumerate(model.layers):
        block.load_state_dict({k: v.to(device, torch.float32) for k, v in weights.block(i).items()},
                              strict=False, assign=True)
        counts = torch.zeros(len(sets), dtype=torch.float64)
        sums = torch.zeros(len(sets), cfg.dim, dtype=torch.float64)
        gram = torch.zeros(cfg.dim, cfg.dim, dtype=torch.float64) if need_gram else None
        for j, batches in enumerate(states):
            for b, x in enumerate(batches):
                S = x.shape[1]
                if S not in rope:
                    rope[S] = model.rope(S, device)
                h = block.attend(x.to(device), *rope[S])
                batches[b] = h.cpu()
                u = block.ffn_input(h).reshape(-1, cfg.dim).double()
                counts[j] += u.shape[0]
                sums[j] += u.sum(0).cpu()
                if gram is not None:
                    gram += (u.T @ u).cpu()
        stats = LayerStats([s.name for s in sets], counts, sums, gram)
        rows = router_for_layer(i, stats).float()
        routers[i] = rows
        if i + 1 < cfg.n_layers:  # the next layer's input: this layer's MoE with the rows just fitted
            ffn = {k: v.to(device, torch.float32) for k, v in weights.experts(i).items()}
            ffn["ffn.router.weight"] = rows.to(device)
            block.load_state_dict(ffn, strict=False, assign=True)
            for batches in states:
                for b, x in enumerate(batches):
                    x = x.to(device)
                    y, _ = block.ffn(block.ffn_input(x))
                    batches[b] = block.add_ffn(x, y).cpu()
        block.to("meta")  # drop this layer's weights
        if on_layer is not None:
            on_layer(i)
    return routers


# --------------------------------------------------------------------------------------------
# Token sets from shards and prompts
# --------------------------------------------------------------------------------------------


def check_shard(shard, what: str, vocab_size: int) -> None:
    """A validation shard a router can be fitted on: a few tokens, all within the vocabulary."""
    if len(shard) < 2:
        raise BtxError(f"{shard.path}: {len(shard)} tokens; {what} needs validation tokens")
    top = int(np.max(shard.tokens))
    if top >= vocab_size:
        raise BtxError(
            f"{shard.path}: holds token id {top}, but the model's vocab_size is {vocab_size} "
            "(tokenized with another tokenizer?)"
        )


def shard_windows(name: str, shard, tokens: int, max_seq_len: int) -> TokenSet:
    """Evenly spaced windows covering about `tokens` tokens of the shard, in micro-batches."""
    n_tokens = len(shard)
    seq_len = min(SEQ_LEN, max_seq_len, n_tokens)
    count = max(1, min(math.ceil(tokens / seq_len), n_tokens // seq_len))
    starts = np.linspace(0, n_tokens - seq_len, count).astype(np.int64)
    windows = torch.from_numpy(np.stack([np.asarray(shard.tokens[s : s + seq_len], dtype=np.int64) for s in starts]))
    per_batch = max(1, BATCH_TOKENS // seq_len)
    return TokenSet(name, list(windows.split(per_batch)))


def prompt_set(name: str, prompts: Sequence[str], tokenizer, max_seq_len: int, vocab_size: int) -> TokenSet:
    """Each prompt as its own sequence (no padding, so no prompt sees another's tokens)."""
    batches = []
    for text in prompts:
        ids = list(tokenizer.encode(text))[:max_seq_len]
        if not ids:
            raise BtxError(f"prompt {text!r} of {name!r}: no tokens")
        if max(ids) >= vocab_size:
            raise BtxError(f"prompt {text!r} of {name!r}: token id {max(ids)} is outside the vocabulary ({vocab_size})")
        batches.append(torch.tensor([ids], dtype=torch.int64))
    return TokenSet(name, batches)
