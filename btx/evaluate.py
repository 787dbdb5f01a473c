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

`btx eval` (see `eval_command`): a recipe's run (every model of it that exists, via
`btx.pipeline.eval_rows`) or any list of HF checkpoints on `--data DOMAIN=SHARD` validation shards.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.markup import escape

from btx.data import Shard, eval_batches
from btx.errors import BtxError
from btx.manifest import dumps_json


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
# The table: terminal, markdown, JSON
# ----------------------------------------------------------------------------------------------


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
        losses = [f"[bold green]{r.losses[d]:.4f}[/]" if r.losses[d] == best[d] else f"{r.losses[d]:.4f}"
                  for d in domains]
        average = f"[bold green]{r.average:.4f}[/]" if r.average == best_avg else f"{r.average:.4f}"
        cells.append([escape(r.name), *losses, average, _ppl(r.average), _flops(r.train_flops),
                      _params(r.active_params)])
    # btx.tables keeps every number whole: a narrow terminal or a log file gets fewer columns or
    # one block per model instead of cut values.
    console.print(FitTable(columns, cells, title=title))


def _ppl(loss: float) -> str:
    return f"{math.exp(loss):.3f}" if loss < 700 else "inf"


def _flops(f: float | None) -> str:
    return "-" if f is None else f"{f:.3g}"


def _params(p: int | None) -> str:
    return "-" if p is None else f"{p / 1e6:.2f}M"


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|")


def to_markdown(rows: list[EvalRow], domains: list[str]) -> str:
    head = ["model", *domains, "average", "ppl (avg)", "train FLOPs", "active params"]
    lines = ["| " + " | ".join(map(_md_cell, head)) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [_md_cell(r.name), *(f"{r.losses[d]:.4f}" for d in domains), f"{r.average:.4f}",
                 _ppl(r.average), _flops(r.train_flops), _params(r.active_params)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _perplexity(loss: float) -> float | None:
    return math.exp(loss) if loss < 700 else None


def save(rows: list[EvalRow], domains: list[str], out_dir: str | Path, extra: dict | None = None) -> dict[str, Path]:
    """Write `eval.json` and `eval.md` into out_dir (created if needed)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = {"domains": domains,
            "rows": [asdict(r) | {"average": r.average, "perplexity": {d: _perplexity(v) for d, v in r.losses.items()},
                                  "average_perplexity": _perplexity(r.average)} for r in rows],
            **(extra or {})}
    (out / "eval.json").write_text(dumps_json(data, indent=2) + "\n")
    (out / "eval.md").write_text(to_markdown(rows, domains))
    return {"json": out / "eval.json", "markdown": out / "eval.md"}


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
    rows = []
    for name, key in zip(row_names, row_keys):
        c = unique[key]
        rows.append(EvalRow(name, {d: nll(lp) for d, lp in lps[key].items()}, c.train_flops,
                            c.cfg.param_counts()["active"], str(c.path), {d: lp.numel() for d, lp in lps[key].items()}))
    if btm:
        experts = [unique[k] for k in btm_keys]
        flops = [e.train_flops for e in experts]
        rows.append(EvalRow(
            "BTM ensemble", btm_losses_from_logprobs([lps[k] for k in btm_keys]),
            sum(flops) if all(f is not None for f in flops) else None,
            sum(e.cfg.param_counts()["active"] for e in experts),
            "experts mixed by domain posterior: " + ", ".join(str(e.path) for e in experts),
            {d: lp.numel() for d, lp in lps[btm_keys[0]].items()},
        ))
    settings = {
        "checkpoints": {name: str(unique[key].path) for name, key in zip(row_names, row_keys)},
        "btm_experts": [str(unique[k].path) for k in btm_keys],
        "data": {d: str(s.path) for d, s in shards.items()},
        "seq_len": seq_len, "batch_size": batch_size, "batches": batches,
        "device": str(dev), "dtype": dtype,
    }
    return rows, settings


def _check_out_dir(out: Path) -> None:
    """`--out` may be new, empty, or an earlier eval output (replaced); nothing else is overwritten."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "eval.json").is_file())):
        raise BtxError(f"--out {out}: exists and is not an earlier btx eval output (no eval.json); "
                       "choose another directory")


def write_outputs(rows: list[EvalRow], domains: list[str], out: Path, done: dict, extra: dict | None = None) -> None:
    """eval.json, eval.md and DONE.json (last), appearing in `out` all at once."""
    from btx.manifest import atomic_dir, hash_dir, write_done

    with atomic_dir(out, force=True) as tmp:
        save(rows, domains, tmp, extra)
        write_done(tmp, {"stage": "eval", "rows": [r.name for r in rows], "domains": domains, **done,
                         "outputs": hash_dir(tmp)})


def eval_recipe(exp, *, out: Path | None = None, console: Console | None = None, force: bool = False) -> list[EvalRow]:
    """`btx eval RECIPE`: every model of the run that exists (`pipeline.eval_rows`), shown and
    written to <run_dir>/eval/ (eval.md, eval.json, DONE.json). A model that no longer follows from
    its inputs (a finetune of an earlier merge, a damaged file) is refused unless `force`."""
    from btx.pipeline import eval_input_identities, eval_rows, stale_models

    console = console or Console()
    missing = [str(exp.data_dir(d) / "val.json") for d in exp.domains if not (exp.data_dir(d) / "val.json").is_file()]
    if missing:
        raise BtxError(f"{missing[0]}: validation shard missing; run btx prepare {exp.path}")
    stale = [] if force else stale_models(exp)
    if stale:
        raise BtxError(f"{stale[0]}; its row would not describe the models on disk: redo that stage (its command with "
                       f"--force, or btx run {exp.path}), or pass --force to evaluate the models as they are")
    out = out or exp.run_dir / "eval"
    identities = eval_input_identities(exp, out)
    rows = eval_rows(exp, console)
    if not rows:
        raise BtxError(f"{exp.run_dir}: no finished model to evaluate yet (seed/, experts/<domain>/final/, merged/, "
                       "finetuned/, baselines/); run btx run or its stages first")
    domains = list(exp.domains)
    render(rows, domains, console=console)
    settings = {"recipe": str(exp.path), "overrides": list(exp.overrides), "batches": exp.eval.batches,
                "batch_size": exp.eval.batch_size, "seq_len": exp.eval.seq_len or exp.train.seq_len}
    write_outputs(rows, domains, out, {**settings, "input_identities": identities}, {"settings": settings})
    console.print(escape(f"wrote {out}/ (eval.md, eval.json)"), soft_wrap=True)
    return rows


def eval_command(args) -> int:
    """`btx eval RECIPE [KEY=VALUE ...]` or `btx eval CKPT [CKPT ...] --data DOMAIN=SHARD ...`."""
    target = args.target
    rest = list(args.overrides or [])
    if target is None:
        if not args.btm:
            raise BtxError("eval: give an experiment RECIPE, or CHECKPOINT directories with --data DOMAIN=SHARD")
        checkpoints: list[str] = []
    elif Path(target).is_file() or Path(target).suffix in (".yaml", ".yml"):
        from btx.recipe import load_experiment

        for flag, value in (("--data", args.data), ("--btm", args.btm), ("--names", args.names)):
            if value:
                raise BtxError(f"eval: {flag} is for checkpoints; a RECIPE brings its own models and "
                               "validation shards")
        for key, value in (("batches", args.batches), ("batch_size", args.batch_size), ("seq_len", args.seq_len)):
            if value is not None:  # --batches N is shorthand for eval.batches=N
                rest.append(f"eval.{key}={value}")
        if args.device not in (None, "cpu") or args.dtype != "auto":
            raise BtxError("eval: --device/--dtype are for checkpoints; a RECIPE is evaluated in fp32 on the CPU")
        exp = load_experiment(target, rest)
        if args.out:
            _check_out_dir(Path(args.out))
        eval_recipe(exp, out=Path(args.out) if args.out else None, force=args.force)
        return 0
    else:
        bad = [r for r in rest if "=" in r and not Path(r).exists()]
        if bad:
            raise BtxError(f"eval: {bad[0]}: overrides need an experiment RECIPE (and this is not a checkpoint)")
        checkpoints = [target, *rest]
    data = parse_data_specs(args.data)
    names = [n.strip() for n in args.names.split(",")] if args.names else None
    out = Path(args.out) if args.out else Path("eval")
    _check_out_dir(out)
    console = Console()
    rows, settings = evaluate_checkpoints(
        checkpoints, data, btm=args.btm or (), names=names,
        batches=args.batches if args.batches is not None else DEFAULT_BATCHES,
        batch_size=args.batch_size if args.batch_size is not None else DEFAULT_BATCH_SIZE,
        seq_len=args.seq_len, device=args.device, dtype=args.dtype, console=Console(stderr=True),
    )
    domains = list(data)
    render(rows, domains, console=console)
    write_outputs(rows, domains, out, {"settings": settings}, {"settings": settings})
    Console(stderr=True).print(escape(f"wrote {out}/ (eval.md, eval.json)"), soft_wrap=True)
    return 0
