"""Per-domain held-out loss of a model, window by window, with standard errors and paired differences.

Every model is scored on exactly the same validation windows (`data.eval_batches` is
deterministic), so rows are comparable. A row carries, besides its losses, the training FLOPs
that went into it beyond the seed and its active parameters per token, so the table shows the
compute each result cost.

The BTM ensembles are btx/evaluate/btm.py's.

Uncertainty: a row's loss on a domain is the mean over its validation windows (all of equal
length), and its standard error is the windows' standard deviation / sqrt(windows); the average's
is sqrt(sum of squares) / domains. Windows are consecutive text, so neighbours correlate and the
standard error is an estimate of the sampling noise of the validation set, not of training noise
(another seed). Rows scored on the same windows are compared more sharply by the paired
difference of their window losses (`paired_differences`).

`btx eval CHECKPOINT ... --data DOMAIN=SHARD` (`eval_checkpoints_command`) evaluates any list of HF
checkpoints; `btx eval RECIPE` (every model of a run) is btx.run.evaluation.eval_recipe_command.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from btx.data.sampling import document_ids, eval_batches
from btx.data.shards import Shard


@dataclass
class EvalRow:
    name: str
    losses: dict[str, float]  # domain -> mean NLL (nats/token)
    train_flops: float | None = None  # beyond the seed
    active_params: int | None = None  # per token
    note: str = ""
    tokens: dict[str, int] = field(default_factory=dict)
    stderr: dict[str, float | None] = field(default_factory=dict)  # domain -> standard error of the loss
    window_losses: dict[str, list[float]] = field(default_factory=dict)  # domain -> mean NLL of each window

    @property
    def average(self) -> float:
        return sum(self.losses.values()) / len(self.losses)

    @property
    def average_stderr(self) -> float | None:
        """Standard error of `average` (the domains' validation sets are independent samples)."""
        errors = [self.stderr.get(d) for d in self.losses]
        if not errors or any(e is None for e in errors):
            return None
        return math.sqrt(sum(e * e for e in errors)) / len(errors)


def window_scores(lp_NS: torch.Tensor) -> tuple[float, float | None, list[float]]:
    """(mean NLL, its standard error over the N windows, each window's mean NLL) of token
    log-probabilities [N, S]; the standard error is None for a single window."""
    per_window = -lp_NS.double().mean(-1)
    n = per_window.numel()
    stderr = (per_window.std(unbiased=True) / math.sqrt(n)).item() if n > 1 else None
    return nll(lp_NS), stderr, per_window.tolist()


def row_from_logprobs(
    name: str,
    lps: dict[str, torch.Tensor],
    train_flops: float | None = None,
    active_params: int | None = None,
    note: str = "",
) -> EvalRow:
    """An EvalRow from {domain: token log-probabilities [N, S]}: losses, standard errors, windows."""
    scores = {d: window_scores(lp) for d, lp in lps.items()}
    return EvalRow(
        name,
        {d: sc[0] for d, sc in scores.items()},
        train_flops,
        active_params,
        note,
        {d: lp.numel() for d, lp in lps.items()},
        {d: sc[1] for d, sc in scores.items()},
        {d: sc[2] for d, sc in scores.items()},
    )


def paired_differences(rows: list[EvalRow], reference: str) -> dict[str, dict]:
    """{row: {"average", "stderr", "losses"}}: each row's loss minus the `reference` row's, with the
    standard error of the difference paired window by window (rows scored on the same windows);
    {} when there is no such row."""
    ref = next((r for r in rows if r.name == reference), None)
    if ref is None or not ref.window_losses:
        return {}
    out = {}
    for r in rows:
        if (
            r is ref
            or set(r.window_losses) != set(ref.window_losses)
            or any(len(r.window_losses[d]) != len(w) for d, w in ref.window_losses.items())
        ):
            continue
        diffs = {d: np.asarray(r.window_losses[d]) - np.asarray(ref.window_losses[d]) for d in ref.window_losses}
        errors = [float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else None for v in diffs.values()]
        out[r.name] = {
            "average": r.average - ref.average,
            "stderr": None if None in errors else math.sqrt(sum(e * e for e in errors)) / len(errors),
            "losses": {d: r.losses[d] - ref.losses[d] for d in ref.losses},
        }
    return out


def _device_of(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover - a model without parameters
        return torch.device("cpu")


@torch.inference_mode()
def token_logprobs(model, inputs: torch.Tensor, targets: torch.Tensor, document_eos: int | None = None) -> torch.Tensor:
    """log p(target_t | inputs_<=t) for every position, [B, S] fp32 (on the model's device); with
    `document_eos`, attention stays inside the documents that token ends (document masking)."""
    device = _device_of(model)
    inputs = inputs.to(device)
    masking = () if document_eos is None else (document_ids(inputs, document_eos),)
    logits = model(inputs, *masking).logits.float()
    return -F.cross_entropy(logits.transpose(1, 2), targets.to(device), reduction="none")


def window_logprobs(
    model,
    shard: Shard,
    seq_len: int,
    batch_size: int,
    max_batches: int | None,
    progress: Callable[[], None] | None = None,
    document_eos: int | None = None,
) -> torch.Tensor:
    """Token log-probabilities of every evaluation window of `shard`, [N, S] fp32 on the CPU
    (`document_eos`: document masking, see token_logprobs)."""
    model.eval()
    out = []
    for inputs, targets in eval_batches(shard, seq_len, batch_size, max_batches):
        out.append(token_logprobs(model, inputs, targets, document_eos).cpu())
        if progress is not None:
            progress()
    return torch.cat(out)


def nll(lp: torch.Tensor) -> float:
    """Mean negative log-likelihood (nats/token) of a tensor of token log-probabilities."""
    return -lp.double().sum().item() / lp.numel()


def domain_losses(
    model, shards: dict[str, Shard], seq_len: int, batch_size: int, max_batches: int, progress=None
) -> tuple[dict[str, float], dict[str, int]]:
    """({domain: mean NLL}, {domain: scored tokens}) of one model."""
    losses, counts = {}, {}
    for domain, shard in shards.items():
        lp = window_logprobs(model, shard, seq_len, batch_size, max_batches, progress)
        losses[domain], counts[domain] = nll(lp), lp.numel()
    return losses, counts
