"""Per-domain held-out loss of any set of models, the BTM ensemble, and the comparison table.

Every model is scored on exactly the same validation windows (`data.eval_batches` is
deterministic), so rows are comparable. A row carries, besides its losses, the training FLOPs
that went into it beyond the seed and its active parameters per token, so the table shows the
compute each result cost.

BTM (Branch-Train-Merge) ensemble: the next-token distribution is a mixture of the experts'
distributions, weighted by the posterior over domains given the context so far:
    w_j(t) ∝ prior_j · Π_{s<t} p_j(x_s | x_<s)      (uniform prior, restarted in each window)
    p(x_t | x_<t) = Σ_j w_j(t) · p_j(x_t | x_<t)
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from btx.data import Shard, eval_batches


@dataclass
class EvalRow:
    name: str
    losses: dict[str, float]  # domain -> mean NLL (nats/token)
    train_flops: float | None = None  # beyond the seed
    active_params: int | None = None  # per token
    note: str = ""
    tokens: dict[str, int] = field(default_factory=dict)

    @property
    def average(self) -> float:
        return sum(self.losses.values()) / len(self.losses)


def _windows(shard: Shard, seq_len: int, batch_size: int, max_batches: int):
    return list(eval_batches(shard, seq_len, batch_size, max_batches))


@torch.inference_mode()
def token_logprobs(model, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target_t | inputs_<=t) for every position, [B, S] fp32."""
    logits = model(inputs).logits.float()
    return -F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")


def domain_losses(model, shards: dict[str, Shard], seq_len: int, batch_size: int, max_batches: int,
                  progress=None) -> tuple[dict[str, float], dict[str, int]]:
    model.eval()
    losses, counts = {}, {}
    for domain, shard in shards.items():
        total, n = 0.0, 0
        for inputs, targets in _windows(shard, seq_len, batch_size, max_batches):
            lp = token_logprobs(model, inputs, targets)
            total -= lp.double().sum().item()
            n += lp.numel()
            if progress is not None:
                progress()
        losses[domain], counts[domain] = total / n, n
    return losses, counts


def btm_losses(experts: list, shards: dict[str, Shard], seq_len: int, batch_size: int, max_batches: int,
               progress=None) -> dict[str, float]:
    """Per-domain NLL of the BTM ensemble (domain-posterior mixture of the experts)."""
    for m in experts:
        m.eval()
    log_prior = -math.log(len(experts))
    losses = {}
    for domain, shard in shards.items():
        total, n = 0.0, 0
        for inputs, targets in _windows(shard, seq_len, batch_size, max_batches):
            lp_JBS = torch.stack([token_logprobs(m, inputs, targets) for m in experts])
            # Evidence for each expert from the tokens *before* t: exclusive cumulative sum.
            seen_JBS = lp_JBS.cumsum(-1) - lp_JBS
            log_w_JBS = torch.log_softmax(log_prior + seen_JBS, dim=0)
            mix_BS = torch.logsumexp(log_w_JBS + lp_JBS, dim=0)
            total -= mix_BS.double().sum().item()
            n += mix_BS.numel()
            if progress is not None:
                progress()
        losses[domain] = total / n
    return losses


def render(rows: list[EvalRow], domains: list[str], title: str = "Validation loss (nats/token; lower is better)",
           console: Console | None = None) -> None:
    console = console or Console()
    table = Table(title=title)
    table.add_column("model")
    for d in domains:
        table.add_column(d, justify="right")
    table.add_column("average", justify="right")
    table.add_column("ppl (avg)", justify="right")
    table.add_column("train PFLOPs", justify="right")
    table.add_column("active params", justify="right")
    best = {d: min(r.losses[d] for r in rows) for d in domains}
    best_avg = min(r.average for r in rows)
    for r in rows:
        cells = [f"[bold green]{r.losses[d]:.4f}[/]" if r.losses[d] == best[d] else f"{r.losses[d]:.4f}" for d in domains]
        avg = f"[bold green]{r.average:.4f}[/]" if r.average == best_avg else f"{r.average:.4f}"
        table.add_row(r.name, *cells, avg, f"{math.exp(r.average):.3f}", _flops(r.train_flops), _params(r.active_params))
    console.print(table)


def _flops(f: float | None) -> str:
    return "-" if f is None else f"{f / 1e15:.3f}"


def _params(p: int | None) -> str:
    return "-" if p is None else f"{p / 1e6:.2f}M"


def to_markdown(rows: list[EvalRow], domains: list[str]) -> str:
    head = ["model", *domains, "average", "ppl (avg)", "train PFLOPs", "active params"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.name, *(f"{r.losses[d]:.4f}" for d in domains), f"{r.average:.4f}",
                 f"{math.exp(r.average):.3f}", _flops(r.train_flops), _params(r.active_params)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def save(rows: list[EvalRow], domains: list[str], out_dir: str | Path, extra: dict | None = None) -> dict[str, Path]:
    """Write `eval.json` and `eval.md` into out_dir (created if needed)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = {"domains": domains, "rows": [asdict(r) | {"average": r.average} for r in rows], **(extra or {})}
    (out / "eval.json").write_text(json.dumps(data, indent=2) + "\n")
    (out / "eval.md").write_text(to_markdown(rows, domains))
    return {"json": out / "eval.json", "markdown": out / "eval.md"}
