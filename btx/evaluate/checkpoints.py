"""`btx eval CHECKPOINT ... --data DOMAIN=SHARD`: the loss table of any list of HF checkpoints.

Each checkpoint is opened, checked against the data (tokenizer, vocabulary, window length) and
scored on the same windows; with two or more domain experts the BTM rows follow. The outputs
(eval.json, eval.md, the plot) are written together, with a DONE.json naming their inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from rich.console import Console
from rich.markup import escape

from btx.data.sampling import eval_batch_count, parse_domain_paths, shard_spec_path
from btx.data.shards import Shard, check_tokenizer, load_shard
from btx.errors import BtxError
from btx.evaluate.btm import (
    TfidfRouter,
    btm_posterior_logprobs,
    btm_topk_logprobs,
    shard_sample,
)
from btx.evaluate.plot import PLOT_NAME
from btx.evaluate.routing_analysis import checkpoint_tokenizer, pick_device
from btx.evaluate.scores import EvalRow, row_from_logprobs, window_logprobs
from btx.evaluate.table import render, save
from btx.evaluate.task_report import TASKS_PLOT
from btx.io.atomic import atomic_dir
from btx.io.checkpoint import load_model
from btx.io.manifest import hash_dir, read_done, write_done
from btx.io.reader import CheckpointReader
from btx.ui.progress import PartsProgress

DEFAULT_BATCHES = 50
DEFAULT_BATCH_SIZE = 8
MAX_DEFAULT_SEQ_LEN = 1024


def parse_data_specs(specs: Sequence[str]) -> dict[str, str]:

    return parse_domain_paths(
        specs, "SHARD (a btx validation shard .bin/.json, or a prepared domain directory holding val.json)"
    )


def open_shard(name: str, spec: str) -> Shard:

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

    label = f"--data {name}"
    vocab = shard.tokenizer.get("vocab_size")
    if isinstance(vocab, int) and vocab > ckpt.cfg.vocab_size:
        raise BtxError(
            f"{shard.path}: tokenized with a vocabulary of {vocab} ({shard.tokenizer.get('kind')} "
            f"tokenizer), but {ckpt.path} has vocab_size {ckpt.cfg.vocab_size} ({label}); "
            "prepare the data with the model's tokenizer"
        )
    if ckpt.tokenizer is not None:
        try:
            check_tokenizer(shard, ckpt.tokenizer.identity())
        except BtxError as e:
            raise BtxError(f"{e} ({label}, model {ckpt.path})") from None
    used = min((len(shard) - 1) // seq_len, batches * batch_size) * seq_len + 1
    top = int(np.asarray(shard.tokens[:used]).max())
    if top >= ckpt.cfg.vocab_size:
        raise BtxError(
            f"{shard.path}: token id {top} is outside the vocabulary of {ckpt.path} "
            f"(vocab_size {ckpt.cfg.vocab_size}; {label}); the data was made with another tokenizer"
        )


def pick_dtype(name: str, device: torch.device, stored: torch.dtype) -> torch.dtype:
    """The weights dtype of eval.dtype / --dtype `name` on `device` for a checkpoint stored in `stored`."""
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
            raise BtxError(
                f"--names {','.join(names)}: expected {len(checkpoints)} names (one per CHECKPOINT), got {len(names)}"
            )
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
            raise BtxError(
                f"{shard.path}: {len(shard)} tokens, fewer than seq_len + 1 = {seq_len + 1} (--data {d}); "
                "use a shorter --seq-len or more validation data"
            )
        for c in ckpts:
            _check_data(c, d, shard, seq_len, batch_size, batches)

    console = console or Console(stderr=True)
    counts = {d: eval_batch_count(s, seq_len, batch_size, batches) for d, s in shards.items()}
    lps: dict[Path, dict[str, torch.Tensor]] = {}
    with PartsProgress(console, "eval", total=sum(counts.values()) * len(unique)) as progress:
        for key, c in unique.items():
            model = load_model(c.path, dtype=pick_dtype(dtype, dev, c.stored_dtype), device=dev)
            lps[key] = {}
            for d, s in shards.items():
                with progress.part(f"{c.name} · {d}", counts[d]):
                    lps[key][d] = window_logprobs(model, s, seq_len, batch_size, batches, progress.advance)
            del model
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    rows = [
        row_from_logprobs(
            name, lps[key], unique[key].train_flops, unique[key].cfg.param_counts()["active"], str(unique[key].path)
        )
        for name, key in zip(row_names, row_keys)
    ]
    tfidf_note = None
    if btm:
        experts = [unique[k] for k in btm_keys]
        documents = [checkpoint_train_shard(e.path) for e in experts]
        router = None
        if all(doc is not None for doc in documents):
            router = TfidfRouter(
                [shard_sample(doc, TFIDF_TOKENS) for doc in documents], min(e.cfg.vocab_size for e in experts)
            )
        else:
            tfidf_note = (
                "BTM top-k (tf-idf) rows need each --btm expert's training shard, which btx finds in "
                "the DONE.json of a btx training job; not every expert has one"
            )
        rows += btm_rows(
            [lps[k] for k in btm_keys],
            [e.train_flops for e in experts],
            [e.cfg.param_counts()["active"] for e in experts],
            "experts: " + ", ".join(str(e.path) for e in experts),
            router=router,
            shards=shards,
            seq_len=seq_len,
            batch_size=batch_size,
            batches=batches,
            expert_names=[e.name for e in experts],
        )
    settings = {
        "checkpoints": {name: str(unique[key].path) for name, key in zip(row_names, row_keys)},
        "btm_experts": [str(unique[k].path) for k in btm_keys],
        "data": {d: str(s.path) for d, s in shards.items()},
        "seq_len": seq_len,
        "batch_size": batch_size,
        "batches": batches,
        "device": str(dev),
        "dtype": dtype,
        **({"btm_tfidf": tfidf_note} if tfidf_note else {}),
    }
    return rows, settings


BTM_POSTERIOR_ROW = "BTM ensemble"
TFIDF_TOKENS = 1_000_000  # training tokens per expert for the tf-idf documents (a recipe: eval.btm_tfidf_tokens)


def btm_rows(
    per_expert: Sequence[dict[str, torch.Tensor]],
    flops: Sequence[float | None],
    active: Sequence[int],
    note: str,
    *,
    router: TfidfRouter | None = None,
    shards: dict[str, Shard] | None = None,
    seq_len: int = 0,
    batch_size: int = 0,
    batches: int | None = None,
    expert_names: Sequence[str] = (),
) -> list[EvalRow]:
    """The BTM rows from the experts' token log-probabilities: the domain-posterior ensemble and,
    with a tf-idf `router`, top-1 and top-2 by tf-idf. Training FLOPs are the experts'; active
    parameters those of the experts that run per token."""
    total = sum(flops) if all(f is not None for f in flops) else None
    rows = [
        row_from_logprobs(
            BTM_POSTERIOR_ROW,
            btm_posterior_logprobs(per_expert),
            total,
            sum(active),
            "experts mixed by domain posterior; " + note,
        )
    ]
    if router is not None:
        for k in [k for k in (1, 2) if k <= len(per_expert)]:
            mixed, top1 = btm_topk_logprobs(per_expert, router, shards, seq_len, batch_size, batches, k)
            picks = "; ".join(
                f"{d}: " + ", ".join(f"{n} {share:.0%}" for n, share in zip(expert_names, shares))
                for d, shares in top1.items()
            )
            rows.append(
                row_from_logprobs(
                    f"BTM top-{k} (tf-idf)",
                    mixed,
                    total,
                    sum(sorted(active)[-k:]),
                    ("the expert" if k == 1 else f"the {k} experts")
                    + f" most tf-idf-similar to the context; top-1 picks: {picks}",
                )
            )
    return rows


def checkpoint_train_shard(path: Path) -> Shard | None:
    """The one training shard of the btx job that made the checkpoint (its DONE.json
    inputs.train_shards, for a domain expert), or None."""

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
        raise BtxError(
            f"--out {out}: exists and is not an earlier btx eval output (no eval.json); choose another directory"
        )


def written(out: Path) -> str:
    """The files of an eval output, for the closing line."""
    names = ("eval.md", "eval.json", PLOT_NAME, "tasks.md", "tasks.json", TASKS_PLOT)
    return ", ".join(name for name in names if (out / name).is_file())


def write_outputs(
    rows: list[EvalRow],
    domains: list[str],
    out: Path,
    done: dict,
    extra: dict | None = None,
    console: Console | None = None,
    tasks=None,
) -> None:
    """eval.json, eval.md, the plot and DONE.json (last), appearing in `out` all at once; with
    `tasks` (a btx.evaluate.task_report.TaskReport) tasks.json, tasks.md and their plot too."""

    with atomic_dir(out, force=True) as tmp:
        save(rows, domains, tmp, extra, console=console, task_groups=tasks.groups() if tasks else None)
        if tasks is not None:
            tasks.save(tmp, console=console)
        write_done(
            tmp, {"stage": "eval", "rows": [r.name for r in rows], "domains": domains, **done, "outputs": hash_dir(tmp)}
        )


def eval_checkpoints_command(args) -> int:
    """`btx eval CKPT [CKPT ...] --data DOMAIN=SHARD ...` (`btx eval RECIPE` is btx.run.pipeline's)."""
    rest = list(args.overrides or [])
    for flag, name in (("--tasks", "tasks"), ("--include-path", "include_path")):
        if getattr(args, name, None):
            raise BtxError(f"eval: {flag} is for an experiment RECIPE (its run's models and BTM ensembles)")
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
        checkpoints,
        data,
        btm=args.btm or (),
        names=names,
        batches=args.batches if args.batches is not None else DEFAULT_BATCHES,
        batch_size=args.batch_size if args.batch_size is not None else DEFAULT_BATCH_SIZE,
        seq_len=args.seq_len,
        device=args.device,
        dtype=args.dtype or "auto",
        console=Console(stderr=True),
    )
    domains = list(data)
    render(rows, domains, console=console)
    write_outputs(rows, domains, out, {"settings": settings}, {"settings": settings}, console=Console(stderr=True))
    Console(stderr=True).print(escape(f"wrote {out}/ ({written(out)})"), soft_wrap=True)
    return 0
