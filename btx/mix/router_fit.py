"""Router rows with no training: seeded random rows, and rows fitted to hidden states (`centroid`,
`ridge`, `hidden`).

Merge (a new MoE) and grow (an MoE with experts added) share one entry, `fit_routers`: each hands
it the tensors its output will hold (btx.mix.output.OutputTensors), some sets of token sequences
(btx/mix/router_data.py) and the rule that turns a layer's statistics into its rows. The walk runs
the sequences through the output MoE one layer at a time and, at each layer, collects statistics
of the FFN inputs (what the router reads) per set; the rule gives that layer's rows, and the walk
routes the layers above with those rows as the output will store them, so every layer's router is
fitted on the hidden states the finished MoE actually produces there.

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

Random rows (`random_rows`) come from a generator seeded by the stream's name, the seed and the
layer, so they are the same on every run and independent of the layer order.

Shapes: D the model width, E experts, G fitted rows (one per domain), V the vocabulary, S a
sequence's length, N tokens.

Memory: the hidden states of every token of every set (tokens x D x 4 bytes) plus one layer's
weights in fp32, plus XᵀX in fp64 for ridge.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import torch
from accelerate import init_empty_weights

from btx.io.layout import btx_shapes
from btx.mix.output import OutputTensors
from btx.mix.progress import Progress
from btx.model.config import ModelConfig
from btx.model.transformer import Transformer

FIT_INITS = ("centroid", "ridge", "hidden")  # router inits that need hidden states


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
    for pos, neg in zip(positive, negative, strict=True):
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
        block.load_state_dict(
            {k: v.to(device, torch.float32) for k, v in weights.block(i).items()}, strict=False, assign=True
        )
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


def fitted_rows(
    init: str,
    stats: LayerStats,
    rows: Sequence[str | None],
    *,
    negative: Sequence[Sequence[str]] = (),
    ridge_lambda: float = 0.0,
) -> torch.Tensor:
    """[len(rows), D]: `init`'s closed form for each row, named by the token set it is fitted to
    (None: the seed's row for centroid and ridge, a zero row for hidden); `negative`: hidden's
    contrast sets per row."""
    if init == "centroid":
        return centroid_rows(stats, rows)
    if init == "ridge":
        return ridge_rows(stats, rows, ridge_lambda)
    return hidden_rows(stats, rows, negative)


def hidden_targets(names: Sequence[str], prompts: dict, negative_prompts: dict) -> tuple[list, list]:
    """hidden's sets for the rows of experts `names`: each one's positive prompts ("pos:NAME", None
    without prompts) and what it is contrasted with: its negative prompts ("neg:NAME"), by default
    every other expert's positive prompts."""
    positive = [f"pos:{n}" if n in prompts else None for n in names]
    negative = [[f"neg:{n}"] if n in negative_prompts else [f"pos:{m}" for m in prompts if m != n] for n in names]
    return positive, negative


def random_rows(stream: str, seed: int, layer: int, n: int, dim: int, std: float) -> torch.Tensor:
    """[n, dim] normal(0, std) router rows of `layer`, the same on every run for one (stream, seed)."""
    key = hashlib.sha256(f"{stream}:{seed}:{layer}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(key[:8], "little") >> 1)
    return torch.randn(n, dim, generator=gen) * std


class OutputLayers:
    """The output MoE's layers for `walk` (a LayerWeights): fp32 copies of its tensors as they will
    be written, from its OutputTensors, before its routers are known."""

    def __init__(self, tensors: OutputTensors, cfg: ModelConfig):
        self.tensors, self.cfg = tensors, cfg
        self.names = list(btx_shapes(cfg))

    def embed(self) -> torch.Tensor:
        return self.tensors.shared("embed.weight").to(torch.float32, copy=True)

    def block(self, layer: int) -> dict[str, torch.Tensor]:
        p = f"layers.{layer}."
        return {
            k.removeprefix(p): self.tensors.shared(k).to(torch.float32, copy=True)
            for k in self.names
            if k.startswith(p) and ".ffn." not in k
        }

    def experts(self, layer: int) -> dict[str, torch.Tensor]:
        return self.tensors.layer_experts(layer)


def fit_routers(
    tensors: OutputTensors,
    cfg: ModelConfig,
    sets: Sequence[TokenSet],
    rows_for_layer: Callable[[int, LayerStats], torch.Tensor],
    *,
    init: str,
    device: str | None,
    progress: bool,
    console=None,
) -> None:
    """Fill `tensors.fitted` with every layer's router rows, fitted on the output MoE itself:
    `rows_for_layer(i, stats)` turns layer i's FFN-input statistics into its rows, and the layers
    above are routed by `tensors.router(i)`, the rows as the output stores them."""

    def router_for_layer(layer: int, stats: LayerStats) -> torch.Tensor:
        tensors.fitted[layer] = rows_for_layer(layer, stats)
        return tensors.router(layer).float()

    with Progress(progress, f"{init} routers", cfg.n_layers, bytes_=False, console=console) as bar:
        walk(
            OutputLayers(tensors, cfg),
            sets,
            router_for_layer,
            need_gram=init == "ridge",
            device=device,
            on_layer=lambda i: bar.advance(1, f"layer {i}"),
        )
