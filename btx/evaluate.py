"""Per-domain held-out loss of any set of models, the BTM ensemble, and the comparison table.

Every model is scored on exactly the same validation windows (`data.eval_batches` is
deterministic), so rows are comparable. A row carries, besides its losses, the training FLOPs
that went into it beyond the seed and its active parameters per token, so the table shows the
compute each result cost.

BTM (Branch-Train-Merge) ensemble: the next-token distribution is a mixture of the experts'
distributions, weighted by the posterior over domains given the context so far:
    w_j(t) ∝ prior_j · Π_{s<t} p_j(x_s | x_<s)      (uniform prior, restarted in each window)
    p(x_t | x_<t) = Σ_j w_j(t) · p_j(x_t | x_<t)
The posterior needs only each expert's log-probabilities of the observed tokens, so the experts
are run one after another (`window_logprobs`) and mixed afterwards (`btm_mixture`): one model in
memory at a time, and a checkpoint that is both a row and a BTM expert is run once.

BTM top-k (the paper's BTM): at every position the k experts whose training data is most similar
to the context so far (the window's tokens up to that position) by tf-idf are averaged, with equal
weights (`TfidfRouter`, `btm_topk_mixture`). Terms are token ids and token-id bigrams (a bigram
(a, b) is term V + (a*V + b) mod 2^20, exact for vocabularies up to 1024); each expert's document
is an evenly spread sample of its domain's training shard; idf = ln((1 + J) / (1 + df)) + 1 over
the J experts (scikit-learn's smooth idf); similarity is the cosine, whose ranking needs only the
context's term counts against each expert's unit tf-idf vector, so it is a cumulative sum over
the window. Ties go to the expert listed first.

Uncertainty: a row's loss on a domain is the mean over its validation windows (all of equal
length), and its standard error is the windows' standard deviation / sqrt(windows); the average's
is sqrt(sum of squares) / domains. Windows are consecutive text, so neighbours correlate and the
standard error is an estimate of the sampling noise of the validation set, not of training noise
(another seed). Rows scored on the same windows are compared more sharply by the paired
difference of their window losses (`paired_differences`).

`btx eval CHECKPOINT ... --data DOMAIN=SHARD` (`eval_checkpoints_command`) evaluates any list of HF
checkpoints; `btx eval RECIPE` (every model of a run) is btx.pipeline.eval_recipe_command.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.markup import escape

from btx.data import Shard, eval_batches
from btx.errors import BtxError
from btx.eval_plot import PLOT_NAME, plot_loss_vs_flops, text_scatter
from btx.manifest import dumps_json


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


def row_from_logprobs(name: str, lps: dict[str, torch.Tensor], train_flops: float | None = None,
                      active_params: int | None = None, note: str = "") -> EvalRow:
    """An EvalRow from {domain: token log-probabilities [N, S]}: losses, standard errors, windows."""
    scores = {d: window_scores(lp) for d, lp in lps.items()}
    return EvalRow(name, {d: sc[0] for d, sc in scores.items()}, train_flops, active_params, note,
                   {d: lp.numel() for d, lp in lps.items()}, {d: sc[1] for d, sc in scores.items()},
                   {d: sc[2] for d, sc in scores.items()})


def paired_differences(rows: list[EvalRow], reference: str) -> dict[str, dict]:
    """{row: {"average", "stderr", "losses"}}: each row's loss minus the `reference` row's, with the
    standard error of the difference paired window by window (rows scored on the same windows);
    {} when there is no such row."""
    ref = next((r for r in rows if r.name == reference), None)
    if ref is None or not ref.window_losses:
        return {}
    out = {}
    for r in rows:
        if r is ref or set(r.window_losses) != set(ref.window_losses) or \
                any(len(r.window_losses[d]) != len(w) for d, w in ref.window_losses.items()):
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
def token_logprobs(model, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target_t | inputs_<=t) for every position, [B, S] fp32 (on the model's device)."""
    device = _device_of(model)
    logits = model(inputs.to(device)).logits.float()
    return -F.cross_entropy(logits.transpose(1, 2), targets.to(device), reduction="none")


def window_logprobs(model, shard: Shard, seq_len: int, batch_size: int, max_batches: int | None,
                    progress: Callable[[], None] | None = None) -> torch.Tensor:
    """Token log-probabilities of every evaluation window of `shard`, [N, S] fp32 on the CPU."""
    model.eval()
    out = []
    for inputs, targets in eval_batches(shard, seq_len, batch_size, max_batches):
        out.append(token_logprobs(model, inputs, targets).cpu())
        if progress is not None:
            progress()
    return torch.cat(out)


def nll(lp: torch.Tensor) -> float:
    """Mean negative log-likelihood (nats/token) of a tensor of token log-probabilities."""
    return -lp.double().sum().item() / lp.numel()


def domain_losses(model, shards: dict[str, Shard], seq_len: int, batch_size: int, max_batches: int,
                  progress=None) -> tuple[dict[str, float], dict[str, int]]:
    """({domain: mean NLL}, {domain: scored tokens}) of one model."""
    losses, counts = {}, {}
    for domain, shard in shards.items():
        lp = window_logprobs(model, shard, seq_len, batch_size, max_batches, progress)
        losses[domain], counts[domain] = nll(lp), lp.numel()
    return losses, counts


def btm_mixture(lp_JNS: torch.Tensor, log_prior_J: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The BTM ensemble from its experts' token log-probabilities.

    lp_JNS: log p_j(x_t | x_<t) of J experts on N windows of S tokens. Returns (mix_NS, log_w_JNS):
    the ensemble's log-probability of every token and the log posterior weight of every expert at
    every position, computed from the tokens before it in the same window (uniform prior by default,
    so the weights at position 0 are the prior).
    """
    lp_JNS = lp_JNS.double()
    J = lp_JNS.shape[0]
    if log_prior_J is None:
        log_prior_J = torch.full((J,), -math.log(J), dtype=torch.float64)
    # Evidence for each expert from the tokens *before* t: exclusive cumulative sum.
    seen_JNS = lp_JNS.cumsum(-1) - lp_JNS
    log_w_JNS = torch.log_softmax(log_prior_J.double().view(J, 1, 1) + seen_JNS, dim=0)
    mix_NS = torch.logsumexp(log_w_JNS + lp_JNS, dim=0)
    return mix_NS, log_w_JNS


def btm_losses_from_logprobs(per_expert: Sequence[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Per-domain NLL of the BTM ensemble given each expert's `window_logprobs` per domain."""
    return {d: nll(btm_mixture(torch.stack([lp[d] for lp in per_expert]))[0]) for d in per_expert[0]}


def btm_posterior_logprobs(per_expert: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """{domain: the BTM ensemble's token log-probabilities [N, S]} from each expert's."""
    return {d: btm_mixture(torch.stack([lp[d] for lp in per_expert]))[0] for d in per_expert[0]}


def btm_losses(experts: list, shards: dict[str, Shard], seq_len: int, batch_size: int, max_batches: int,
               progress=None) -> dict[str, float]:
    """Per-domain NLL of the BTM ensemble (domain-posterior mixture of the experts)."""
    per_expert = [{d: window_logprobs(m, s, seq_len, batch_size, max_batches) for d, s in shards.items()}
                  for m in experts]
    if progress is not None:  # one tick per batch and domain, as for a single model
        for _ in range(sum(-(-len(lp) // batch_size) for lp in per_expert[0].values())):
            progress()
    return btm_losses_from_logprobs(per_expert)


# ----------------------------------------------------------------------------------------------
# BTM top-k by tf-idf (the paper's BTM)
# ----------------------------------------------------------------------------------------------

BIGRAM_BUCKETS = 1 << 20
TFIDF_SAMPLES = 64  # an expert's document: this many evenly spaced stretches of its training shard


def term_ids(tokens: np.ndarray, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(unigram terms [..., S], bigram terms [..., S]) of token ids [..., S]; a position's bigram is
    (its previous token, it), and position 0 of a row has none (-1)."""
    tokens = np.asarray(tokens, dtype=np.int64)
    bigrams = np.full(tokens.shape, -1, dtype=np.int64)
    bigrams[..., 1:] = vocab_size + (tokens[..., :-1] * vocab_size + tokens[..., 1:]) % BIGRAM_BUCKETS
    return tokens, bigrams


def shard_sample(shard: Shard, tokens: int) -> np.ndarray:
    """About `tokens` tokens of `shard` in TFIDF_SAMPLES evenly spaced stretches (all of a small shard)."""
    n = len(shard)
    if n <= tokens:
        return np.asarray(shard.tokens[:n], dtype=np.int64)
    size = tokens // TFIDF_SAMPLES
    starts = np.linspace(0, n - size, TFIDF_SAMPLES).astype(np.int64)
    return np.concatenate([np.asarray(shard.tokens[s : s + size], dtype=np.int64) for s in starts])


class TfidfRouter:
    """Scores of J experts for every context, by the tf-idf cosine of the context with each
    expert's training data (see the module docstring)."""

    def __init__(self, documents: Sequence[np.ndarray], vocab_size: int):
        self.vocab_size = vocab_size
        size = vocab_size + BIGRAM_BUCKETS
        counts = []
        for doc in documents:
            uni, bi = term_ids(doc, vocab_size)
            counts.append(np.bincount(np.concatenate([uni, bi[bi >= 0]]), minlength=size).astype(np.float64))
        counts_JT = np.stack(counts)
        df = (counts_JT > 0).sum(0)
        self.idf_T = np.log((1 + len(documents)) / (1 + df)) + 1.0
        tfidf_JT = counts_JT / counts_JT.sum(1, keepdims=True) * self.idf_T
        unit_JT = tfidf_JT / np.linalg.norm(tfidf_JT, axis=1, keepdims=True)
        # cosine(context, expert) = (counts * idf) . unit_j / |counts * idf|; the norm is the same for every expert
        self.weight_JT = (unit_JT * self.idf_T).astype(np.float32)

    def scores(self, inputs_NS: np.ndarray) -> torch.Tensor:
        """[J, N, S]: expert j's similarity (up to a positive factor per context) to inputs[n, :t+1],
        the context of the prediction at position t."""
        uni, bi = term_ids(inputs_NS, self.vocab_size)
        per_token = self.weight_JT[:, uni] + np.where(bi >= 0, self.weight_JT[:, np.maximum(bi, 0)], 0.0)
        return torch.from_numpy(per_token.astype(np.float64)).cumsum(-1)


def btm_topk_mixture(lp_JNS: torch.Tensor, scores_JNS: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mix_NS, top1_NS): the equal-weight mixture of the k best-scoring experts at every position
    (ties to the lower index), and the index of the best one."""
    J = lp_JNS.shape[0]
    # A stable descending sort: equal scores keep the experts' order.
    order = torch.sort(-scores_JNS, dim=0, stable=True).indices[: min(k, J)]
    chosen = torch.gather(lp_JNS.double(), 0, order)
    return torch.logsumexp(chosen, dim=0) - math.log(order.shape[0]), order[0]


def window_inputs(shard: Shard, seq_len: int, batch_size: int, max_batches: int | None) -> np.ndarray:
    """The input tokens [N, S] of the evaluation windows `window_logprobs` scores."""
    return np.concatenate([inputs.numpy() for inputs, _ in eval_batches(shard, seq_len, batch_size, max_batches)])


def btm_topk_logprobs(per_expert: Sequence[dict[str, torch.Tensor]], router: TfidfRouter, shards: dict[str, Shard],
                      seq_len: int, batch_size: int, max_batches: int | None, k: int
                      ) -> tuple[dict[str, torch.Tensor], dict[str, list[float]]]:
    """({domain: the top-k ensemble's token log-probabilities}, {domain: share of positions whose
    best expert is expert j, for every j})."""
    mixed, top1_share = {}, {}
    for d, shard in shards.items():
        scores = router.scores(window_inputs(shard, seq_len, batch_size, max_batches))
        mixed[d], top1 = btm_topk_mixture(torch.stack([lp[d] for lp in per_expert]), scores, k)
        top1_share[d] = (torch.bincount(top1.flatten(), minlength=len(per_expert)) / top1.numel()).tolist()
    return mixed, top1_share


# ----------------------------------------------------------------------------------------------
# The table: terminal, markdown, JSON
# ----------------------------------------------------------------------------------------------


FLOPS_NOTE = ("train FLOPs: training FLOPs beyond the seed, counted as btx.flops does: 6 per trained weight and "
              "token, 4 per frozen weight (no weight gradient), 2 where nothing before it trains; embedding "
              "lookups 0. ± is the standard error over the validation windows.")
REFERENCE_ROW = "BTX"  # the row the paired differences are taken against


def _loss_cell(loss: float, stderr: float | None) -> str:
    return f"{loss:.4f}" if stderr is None else f"{loss:.4f} ± {stderr:.4f}"


def _cells(r: EvalRow, domains: list[str], domain_stderr: bool = True) -> list[str]:
    return [r.name, *(_loss_cell(r.losses[d], r.stderr.get(d) if domain_stderr else None) for d in domains),
            _loss_cell(r.average, r.average_stderr), _ppl(r.average), _flops(r.train_flops), _params(r.active_params)]


def render(rows: list[EvalRow], domains: list[str], title: str = "Validation loss (nats/token; lower is better)",
           console: Console | None = None) -> None:
    from btx.tables import Column, FitTable

    console = console or Console()
    columns = [Column("model", "label"), *(Column(escape(d)) for d in domains), Column("average"),
               Column("ppl (avg)", optional=True), Column("train FLOPs"), Column("active params")]
    best = {d: min(r.losses[d] for r in rows) for d in domains}
    best_avg = min(r.average for r in rows)
    cells = []
    for r in rows:
        row = _cells(r, domains)
        row[0] = escape(row[0])
        for i, d in enumerate(domains, start=1):
            if r.losses[d] == best[d]:
                row[i] = f"[bold green]{row[i]}[/]"
        if r.average == best_avg:
            row[len(domains) + 1] = f"[bold green]{row[len(domains) + 1]}[/]"
        cells.append(row)
    # btx.tables keeps every number whole: a narrow terminal or a log file gets fewer columns or
    # one block per model instead of cut values.
    console.print(FitTable(columns, cells, title=title,
                           caption=FLOPS_NOTE if any(r.train_flops for r in rows) else None))
    differences = paired_differences(rows, REFERENCE_ROW)
    if differences:
        console.print(f"average minus {REFERENCE_ROW}'s, paired over the same windows (± standard error):")
        for name, diff in differences.items():
            console.print(f"  {escape(name):<40} {_signed(diff['average'], diff['stderr'])}", highlight=False)
    chart = text_scatter(rows)
    if chart:
        console.print(chart, markup=False, highlight=False, soft_wrap=True)


def _signed(value: float, stderr: float | None) -> str:
    return f"{value:+.4f}" + ("" if stderr is None else f" ± {stderr:.4f}")


def _ppl(loss: float) -> str:
    return f"{math.exp(loss):.3f}" if loss < 700 else "inf"


def _flops(f: float | None) -> str:
    return "-" if f is None else f"{f:.3g}"


def _params(p: int | None) -> str:
    return "-" if p is None else f"{p / 1e6:.2f}M"


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|")


def to_markdown(rows: list[EvalRow], domains: list[str]) -> str:
    """The table; below it, when there is more than the table to say, the FLOPs note and the
    paired differences from the BTX row."""
    head = ["model", *domains, "average", "ppl (avg)", "train FLOPs", "active params"]
    lines = ["| " + " | ".join(map(_md_cell, head)) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join(map(_md_cell, _cells(r, domains))) + " |")
    if any(r.train_flops for r in rows):
        lines += ["", FLOPS_NOTE]
    differences = paired_differences(rows, REFERENCE_ROW)
    if differences:
        lines += ["", f"| model | average minus {REFERENCE_ROW}'s (paired, ± standard error) |", "|---|---|"]
        lines += [f"| {_md_cell(name)} | {_signed(d['average'], d['stderr'])} |" for name, d in differences.items()]
    return "\n".join(lines) + "\n"


def _perplexity(loss: float) -> float | None:
    return math.exp(loss) if loss < 700 else None


def save(rows: list[EvalRow], domains: list[str], out_dir: str | Path, extra: dict | None = None,
         console: Console | None = None) -> dict[str, Path]:
    """Write `eval.json`, `eval.md` and, with matplotlib, `loss_vs_flops.png` into out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = {"domains": domains,
            "rows": [asdict(r) | {"average": r.average, "average_stderr": r.average_stderr,
                                  "perplexity": {d: _perplexity(v) for d, v in r.losses.items()},
                                  "average_perplexity": _perplexity(r.average)} for r in rows],
            "flops_counting": FLOPS_NOTE,
            "differences_from": {"reference": REFERENCE_ROW, "rows": paired_differences(rows, REFERENCE_ROW)},
            **(extra or {})}
    (out / "eval.json").write_text(dumps_json(data, indent=2) + "\n")
    (out / "eval.md").write_text(to_markdown(rows, domains))
    paths = {"json": out / "eval.json", "markdown": out / "eval.md"}
    note = plot_loss_vs_flops(rows, out / PLOT_NAME)
    if note is None:
        paths["plot"] = out / PLOT_NAME
    elif console is not None and note:
        console.print(escape(note), soft_wrap=True)
    return paths


# ----------------------------------------------------------------------------------------------
# btx eval
# ----------------------------------------------------------------------------------------------

DEFAULT_BATCHES = 50
DEFAULT_BATCH_SIZE = 8
MAX_DEFAULT_SEQ_LEN = 1024


def parse_data_specs(specs: Sequence[str]) -> dict[str, str]:
    from btx.data import parse_domain_paths

    return parse_domain_paths(specs, "SHARD (a btx validation shard .bin/.json, or a prepared domain directory holding val.json)")


def open_shard(name: str, spec: str) -> Shard:
    from btx.data import load_shard, shard_spec_path

    return load_shard(shard_spec_path(spec, f"--data {name}={spec}"))


@dataclass
class _Checkpoint:
    path: Path
    name: str
    cfg: object  # ModelConfig
    stored_dtype: torch.dtype
    train_flops: float | None
    tokenizer: object | None  # the tokenizer the checkpoint ships with, when it has one


def checkpoint_train_flops(path: Path) -> float | None:
    """`train_flops` of the run that made the checkpoint: its own DONE.json, or, for a btx expert's
    `final/` export, the job's DONE.json one level up."""
    from btx.manifest import read_done

    for directory in (path, path.parent) if path.name == "final" else (path,):
        try:
            done = read_done(directory)
        except BtxError:
            continue
        flops = (done or {}).get("train_flops")
        if isinstance(flops, (int, float)) and not isinstance(flops, bool):
            return float(flops)
    return None


def _open_checkpoint(spec: str | Path, name: str) -> _Checkpoint:
    from btx.hf import CheckpointReader
    from btx.routing import checkpoint_tokenizer

    path = Path(spec).expanduser()
    if not path.exists():
        raise BtxError(f"{path}: checkpoint not found")
    if not path.is_dir():
        raise BtxError(f"{path}: expected a checkpoint directory (config.json and *.safetensors)")
    if not (path / "config.json").is_file() and (path / "final" / "config.json").is_file():
        path = path / "final"  # a btx training job's directory: its HF export
    with CheckpointReader(path) as reader:  # headers only: every input is checked before any forward
        cfg, stored = reader.cfg, reader.dtype
    return _Checkpoint(path, name, cfg, stored, checkpoint_train_flops(path), checkpoint_tokenizer(path))


def default_names(paths: Sequence[str | Path]) -> list[str]:
    """Short row names: the directory name (a btx expert's `final/` is named by its domain); the
    paths as given when two would collide."""
    short = []
    for p in paths:
        path = Path(p).expanduser()
        resolved = path.resolve()
        short.append(f"{resolved.parent.name}/{resolved.name}" if resolved.name == "final" else resolved.name or str(p))
    if len(set(short)) == len(short):
        return short
    return [str(p) for p in paths]


def _check_data(ckpt: _Checkpoint, name: str, shard: Shard, seq_len: int, batch_size: int, batches: int) -> None:
    """The shard's tokenizer fits the model and its windows hold only ids the model knows."""
    import numpy as np

    from btx.data import check_tokenizer

    label = f"--data {name}"
    vocab = shard.tokenizer.get("vocab_size")
    if isinstance(vocab, int) and vocab > ckpt.cfg.vocab_size:
        raise BtxError(f"{shard.path}: tokenized with a vocabulary of {vocab} ({shard.tokenizer.get('kind')} "
                       f"tokenizer), but {ckpt.path} has vocab_size {ckpt.cfg.vocab_size} ({label}); "
                       "prepare the data with the model's tokenizer")
    if ckpt.tokenizer is not None:
        try:
            check_tokenizer(shard, ckpt.tokenizer.identity())
        except BtxError as e:
            raise BtxError(f"{e} ({label}, model {ckpt.path})") from None
    used = min((len(shard) - 1) // seq_len, batches * batch_size) * seq_len + 1
    top = int(np.asarray(shard.tokens[:used]).max())
    if top >= ckpt.cfg.vocab_size:
        raise BtxError(f"{shard.path}: token id {top} is outside the vocabulary of {ckpt.path} "
                       f"(vocab_size {ckpt.cfg.vocab_size}; {label}); the data was made with another tokenizer")


def _pick_dtype(name: str, device: torch.device, stored: torch.dtype) -> torch.dtype:
    if name == "auto":  # fp32 on the CPU (bf16 matmuls are slow there); as stored on a GPU
        return torch.float32 if device.type == "cpu" else stored
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def evaluate_checkpoints(
    checkpoints: Sequence[str | Path],
    data: dict[str, str],
    *,
    btm: Sequence[str | Path] = (),
    names: Sequence[str] | None = None,
    batches: int = DEFAULT_BATCHES,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seq_len: int | None = None,
    device: str | None = None,
    dtype: str = "auto",
    console: Console | None = None,
) -> tuple[list[EvalRow], dict]:
    """Rows for any HF checkpoints (dense Llama or Mixtral) on `data` ({domain: shard}), plus a
    "BTM ensemble" row of the `btm` checkpoints. Every input is checked before the first forward.
    Returns (rows, settings) where settings records what was evaluated and how."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from btx.hf import load_model
    from btx.routing import pick_device

    if not checkpoints and not btm:
        raise BtxError("eval: give at least one CHECKPOINT directory (or --btm experts)")
    for flag, value in (("--batches", batches), ("--batch-size", batch_size), ("--seq-len", seq_len)):
        if value is not None and value < 1:
            raise BtxError(f"{flag} {value}: expected a positive integer")
    if btm and len(btm) < 2:
        raise BtxError(f"--btm {btm[0]}: a BTM ensemble needs at least two expert checkpoints")
    checkpoints = [str(c) for c in checkpoints]
    btm = [str(c) for c in btm]
    if names is not None:
        if len(names) != len(checkpoints):
            raise BtxError(f"--names {','.join(names)}: expected {len(checkpoints)} names (one per CHECKPOINT), "
                           f"got {len(names)}")
        if len(set(names)) != len(names) or not all(n.strip() for n in names):
            raise BtxError(f"--names {','.join(names)}: expected distinct, non-empty names")
        if "BTM ensemble" in names and btm:
            raise BtxError("--names: 'BTM ensemble' is the name of the --btm row")
    row_names = list(names) if names is not None else default_names(checkpoints)
    shards = {d: open_shard(d, spec) for d, spec in data.items()}
    if not shards:
        raise BtxError("eval: give the validation data as --data DOMAIN=SHARD (repeat per domain)")

    # Every checkpoint is run once, even when it is both a row and a BTM expert.
    row_keys = [Path(c).expanduser().resolve() for c in checkpoints]
    btm_keys = [Path(b).expanduser().resolve() for b in btm]
    if len(set(btm_keys)) != len(btm_keys):
        raise BtxError(f"--btm: the same checkpoint given twice ({' '.join(btm)})")
    unique: dict[Path, _Checkpoint] = {}
    for spec, key, name in [*zip(checkpoints, row_keys, row_names), *zip(btm, btm_keys, default_names(btm))]:
        if key not in unique:
            unique[key] = _open_checkpoint(spec, name)
    ckpts = list(unique.values())
    dev = pick_device(device)
    max_len = min(c.cfg.max_seq_len for c in ckpts)
    if seq_len is None:
        seq_len = min(max_len, MAX_DEFAULT_SEQ_LEN)
    elif seq_len > max_len:
        short = min(ckpts, key=lambda c: c.cfg.max_seq_len)
        raise BtxError(f"--seq-len {seq_len}: longer than {short.path}'s max_position_embeddings {max_len}")
    for d, shard in shards.items():
        if len(shard) < seq_len + 1:
            raise BtxError(f"{shard.path}: {len(shard)} tokens, fewer than seq_len + 1 = {seq_len + 1} (--data {d}); "
                           "use a shorter --seq-len or more validation data")
        for c in ckpts:
            _check_data(c, d, shard, seq_len, batch_size, batches)

    console = console or Console(stderr=True)
    n_batches = sum(-(-min((len(s) - 1) // seq_len, batches * batch_size) // batch_size) for s in shards.values())
    lps: dict[Path, dict[str, torch.Tensor]] = {}
    with Progress(TextColumn("[bold]eval {task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("batches"), TimeRemainingColumn(), console=console, transient=True) as bar:
        for key, c in unique.items():
            task = bar.add_task(escape(c.name), total=n_batches)
            model = load_model(c.path, dtype=_pick_dtype(dtype, dev, c.stored_dtype), device=dev)
            lps[key] = {d: window_logprobs(model, s, seq_len, batch_size, batches, lambda: bar.advance(task))
                        for d, s in shards.items()}
            del model
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            bar.remove_task(task)
    rows = [row_from_logprobs(name, lps[key], unique[key].train_flops, unique[key].cfg.param_counts()["active"],
                              str(unique[key].path)) for name, key in zip(row_names, row_keys)]
    tfidf_note = None
    if btm:
        experts = [unique[k] for k in btm_keys]
        documents = [checkpoint_train_shard(e.path) for e in experts]
        router = None
        if all(doc is not None for doc in documents):
            router = TfidfRouter([shard_sample(doc, TFIDF_TOKENS) for doc in documents],
                                 min(e.cfg.vocab_size for e in experts))
        else:
            tfidf_note = ("BTM top-k (tf-idf) rows need each --btm expert's training shard, which btx finds in "
                          "the DONE.json of a btx training job; not every expert has one")
        rows += btm_rows([lps[k] for k in btm_keys], [e.train_flops for e in experts],
                         [e.cfg.param_counts()["active"] for e in experts],
                         "experts: " + ", ".join(str(e.path) for e in experts), router=router, shards=shards,
                         seq_len=seq_len, batch_size=batch_size, batches=batches,
                         expert_names=[e.name for e in experts])
    settings = {
        "checkpoints": {name: str(unique[key].path) for name, key in zip(row_names, row_keys)},
        "btm_experts": [str(unique[k].path) for k in btm_keys],
        "data": {d: str(s.path) for d, s in shards.items()},
        "seq_len": seq_len, "batch_size": batch_size, "batches": batches,
        "device": str(dev), "dtype": dtype,
        **({"btm_tfidf": tfidf_note} if tfidf_note else {}),
    }
    return rows, settings


BTM_POSTERIOR_ROW = "BTM ensemble"
TFIDF_TOKENS = 1_000_000  # training tokens per expert for the tf-idf documents (a recipe: eval.btm_tfidf_tokens)


def btm_rows(per_expert: Sequence[dict[str, torch.Tensor]], flops: Sequence[float | None], active: Sequence[int],
             note: str, *, router: TfidfRouter | None = None, shards: dict[str, Shard] | None = None,
             seq_len: int = 0, batch_size: int = 0, batches: int | None = None,
             expert_names: Sequence[str] = ()) -> list[EvalRow]:
    """The BTM rows from the experts' token log-probabilities: the domain-posterior ensemble and,
    with a tf-idf `router`, top-1 and top-2 by tf-idf. Training FLOPs are the experts'; active
    parameters those of the experts that run per token."""
    total = sum(flops) if all(f is not None for f in flops) else None
    rows = [row_from_logprobs(BTM_POSTERIOR_ROW, btm_posterior_logprobs(per_expert), total, sum(active),
                              "experts mixed by domain posterior; " + note)]
    if router is not None:
        for k in [k for k in (1, 2) if k <= len(per_expert)]:
            mixed, top1 = btm_topk_logprobs(per_expert, router, shards, seq_len, batch_size, batches, k)
            picks = "; ".join(f"{d}: " + ", ".join(f"{n} {share:.0%}" for n, share in zip(expert_names, shares))
                              for d, shares in top1.items())
            rows.append(row_from_logprobs(f"BTM top-{k} (tf-idf)", mixed, total, sum(sorted(active)[-k:]),
                                          ("the expert" if k == 1 else f"the {k} experts") + f" most tf-idf-similar to the context; top-1 picks: {picks}"))
    return rows


def checkpoint_train_shard(path: Path) -> Shard | None:
    """The one training shard of the btx job that made the checkpoint (its DONE.json
    inputs.train_shards, for a domain expert), or None."""
    from btx.data import load_shard
    from btx.manifest import read_done

    for directory in (path, path.parent) if path.name == "final" else (path,):
        try:
            shards = ((read_done(directory) or {}).get("inputs") or {}).get("train_shards") or {}
        except BtxError:
            continue
        if len(shards) == 1 and Path(next(iter(shards.values()))).is_file():
            return load_shard(next(iter(shards.values())))
    return None


def check_out_dir(out: Path) -> None:
    """`--out` may be new, empty, or an earlier eval output (replaced); nothing else is overwritten."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "eval.json").is_file())):
        raise BtxError(f"--out {out}: exists and is not an earlier btx eval output (no eval.json); "
                       "choose another directory")


def written(out: Path) -> str:
    """The files of an eval output, for the closing line."""
    return ", ".join(name for name in ("eval.md", "eval.json", PLOT_NAME) if (out / name).is_file())


def write_outputs(rows: list[EvalRow], domains: list[str], out: Path, done: dict, extra: dict | None = None,
                  console: Console | None = None) -> None:
    """eval.json, eval.md, the plot and DONE.json (last), appearing in `out` all at once."""
    from btx.manifest import atomic_dir, hash_dir, write_done

    with atomic_dir(out, force=True) as tmp:
        save(rows, domains, tmp, extra, console=console)
        write_done(tmp, {"stage": "eval", "rows": [r.name for r in rows], "domains": domains, **done,
                         "outputs": hash_dir(tmp)})


def eval_checkpoints_command(args) -> int:
    """`btx eval CKPT [CKPT ...] --data DOMAIN=SHARD ...` (`btx eval RECIPE` is btx.pipeline's)."""
    rest = list(args.overrides or [])
    if args.target is None:
        if not args.btm:
            raise BtxError("eval: give an experiment RECIPE, or CHECKPOINT directories with --data DOMAIN=SHARD")
        checkpoints: list[str] = []
    else:
        bad = [r for r in rest if "=" in r and not Path(r).exists()]
        if bad:
            raise BtxError(f"eval: {bad[0]}: overrides need an experiment RECIPE (and this is not a checkpoint)")
        checkpoints = [args.target, *rest]
    data = parse_data_specs(args.data)
    names = [n.strip() for n in args.names.split(",")] if args.names else None
    out = Path(args.out) if args.out else Path("eval")
    check_out_dir(out)
    console = Console()
    rows, settings = evaluate_checkpoints(
        checkpoints, data, btm=args.btm or (), names=names,
        batches=args.batches if args.batches is not None else DEFAULT_BATCHES,
        batch_size=args.batch_size if args.batch_size is not None else DEFAULT_BATCH_SIZE,
        seq_len=args.seq_len, device=args.device, dtype=args.dtype, console=Console(stderr=True),
    )
    domains = list(data)
    render(rows, domains, console=console)
    write_outputs(rows, domains, out, {"settings": settings}, {"settings": settings}, console=Console(stderr=True))
    Console(stderr=True).print(escape(f"wrote {out}/ ({written(out)})"), soft_wrap=True)
    return 0
