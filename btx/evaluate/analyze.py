"""`btx analyze`: the routing analysis of a checkpoint on domain data, or of a run's finetuned MoE
(`analyze_recipe`, the analyze stage of `btx run`), shown in the terminal and written to files.

The numbers are btx/evaluate/routing_analysis.py's; btx/evaluate/routing_report.py presents them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from rich.console import Console

from btx.data.shards import load_shard
from btx.errors import BtxError
from btx.evaluate.routing_analysis import (
    DEFAULT_TOKENS,
    analyze_checkpoint,
    compare_reports,
    moe_checkpoint_config,
    parse_data_specs,
)
from btx.evaluate.routing_report import METRICS, _mean, escape, render, write_files
from btx.io.atomic import atomic_dir
from btx.io.manifest import (
    hash_dir,
    identity,
    input_identity,
    is_done,
    relative_identities,
    write_done,
)
from btx.recipe.load import load_experiment
from btx.recipe.schema import DEVICE_KEYS, EvalSection
from btx.recipe.settings import given


def _prepare_out_dir(out: Path) -> None:
    """An analysis replaces an earlier analysis in `out`, but never an unrelated directory."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "routing.json").is_file())):
        raise BtxError(f"--out {out}: exists and is not an earlier routing analysis; choose another directory")


def headline(report: dict) -> str:
    """One line for `btx run`'s summary: own-expert shares when known, else the balance."""
    doms = report["domains"]
    own = [f"{d} {_mean(s['own_top1_frac']) * 100:.0f}%" for d, s in doms.items() if s.get("own_expert")]
    balance = f"load imbalance {_mean(report['overall']['load_imbalance']):.2f}"
    return (f"tokens on their own expert (top-1): {', '.join(own)}; " if own else "") + balance


def analyze_and_write(
    checkpoints: Sequence[str | Path],
    data: dict[str, str],
    out: Path,
    *,
    options: dict,
    metric: str = "load_share",
    layer: int | None = None,
    show_text: int = 0,
    console=None,
    done: dict | None = None,
) -> dict:
    """Analyse one checkpoint (or two, side by side), show the result and write `out`.

    Every checkpoint and flag is checked before the first forward. `out` appears atomically;
    with `done` (a stage manifest), DONE.json is written into it last. Returns the report of
    the first checkpoint (with "compare" when there are two).
    """

    if metric not in METRICS:
        raise BtxError(f"--metric {metric}: expected one of {', '.join(METRICS)}")
    _prepare_out_dir(out)
    configs = [moe_checkpoint_config(ckpt)[0] for ckpt in checkpoints]
    shapes = {(cfg.n_layers, cfg.n_experts) for cfg in configs}
    if len(shapes) > 1:
        raise BtxError(
            f"--compare: {checkpoints[0]} and {checkpoints[1]} differ in layers x experts "
            f"({' vs '.join(f'{n} x {e}' for n, e in shapes)}); a comparison needs the same shape"
        )
    n_layers = configs[0].n_layers
    if layer is not None and not 0 <= layer < n_layers:
        raise BtxError(f"--layer {layer}: the model has MoE layers 0..{n_layers - 1}")

    console = console or Console()
    err = Console(stderr=True)  # progress and notes; the analysis itself goes to `console`
    reports = [
        analyze_checkpoint(ckpt, data, console=err, samples=max(show_text, 1), **options) for ckpt in checkpoints
    ]
    report, compare = reports[0], (reports[1] if len(reports) > 1 else None)
    difference = compare_reports(report, compare) if compare is not None else None
    render(report, console, metric=metric, layer=layer, show_text=show_text, compare=compare, difference=difference)
    with atomic_dir(out, force=True) as tmp:
        notes = write_files(report, tmp, metric=metric, compare=compare, difference=difference)
        if done is not None:
            write_done(tmp, {**done, "files": sorted(p.name for p in tmp.iterdir()), "outputs": hash_dir(tmp)})
    for note in notes:
        err.print(f"[yellow]note:[/] {escape(note)}", soft_wrap=True)
    err.print(escape(f"wrote {out}/ (routing.json, routing.csv{'' if notes else ', PNGs'})"), soft_wrap=True)
    report["headline"] = headline(report)
    return report


def run_analyze(args) -> int:
    """`btx analyze` (and tools/routing_analysis.py)."""

    checkpoints = [args.target] if args.target else []
    if args.compare:
        if len(args.compare) > 2 or len(checkpoints) + len(args.compare) != 2:
            raise BtxError("--compare: give --compare B (with CHECKPOINT as A) or --compare A B (without CHECKPOINT)")
        checkpoints += args.compare
    if not checkpoints:
        raise BtxError("analyze: give a CHECKPOINT directory (with --data) or an experiment RECIPE")
    options = _options(args)
    if Path(checkpoints[0]).is_file():  # an experiment recipe
        if args.data:
            raise BtxError("--data: a RECIPE brings its domains' validation shards; give --data with a CHECKPOINT")
        # --device and --dtype are shorthand for the recipe's eval.device and eval.dtype
        devices = [f"eval.{key}={value}" for key, value in given(args, EvalSection, only=DEVICE_KEYS).items()]
        exp = load_experiment(args.target, [*args.overrides, *devices])
        del options["device"], options["dtype"]
        analyze_recipe(
            exp,
            out=Path(args.out) if args.out else None,
            compare=checkpoints[1:],
            metric=args.metric,
            layer=args.layer,
            show_text=args.show_text or None,
            **options,
        )
        return 0
    if args.overrides:
        raise BtxError(f"analyze: overrides ({args.overrides[0]}) need an experiment RECIPE")
    out = Path(args.out) if args.out else Path(f"analysis-{Path(checkpoints[0]).resolve().name}")
    options["tokens"] = options["tokens"] or DEFAULT_TOKENS
    analyze_and_write(
        checkpoints,
        parse_data_specs(args.data),
        out,
        options=options,
        metric=args.metric,
        layer=args.layer,
        show_text=args.show_text,
    )
    return 0


_DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _options(args) -> dict:
    return dict(
        tokens=args.tokens,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        device=args.device,
        dtype=_DTYPES[args.dtype or "auto"],
        experts=args.experts.split(",") if args.experts else None,
        tokenizer=args.tokenizer,
    )


def analyze_recipe(
    exp,
    *,
    out: Path | None = None,
    compare: Sequence[str] = (),
    metric: str = "load_share",
    layer: int | None = None,
    show_text: int | None = None,
    tokens: int | None = None,
    console=None,
    **options,
) -> dict:
    """Recipe mode (`btx analyze RECIPE`, `btx run`'s analyze stage): the finetuned model (else the
    merged one) on each domain's validation shard, with the recipe's analyze.tokens and
    analyze.show_text, on eval.device in eval.dtype (one place says where a run's models are
    evaluated); output <run_dir>/analysis/ with DONE.json. Returns the report."""

    for checkpoint in (exp.paths.finetuned, exp.paths.merged):
        if is_done(checkpoint):
            break
    else:
        raise BtxError(
            f"{exp.run_dir}: no finished finetuned/ or merged/ model yet; run btx merge (and btx finetune) first"
        )
    data = {}
    for name in exp.domains:
        val = exp.paths.shard(name, "val")
        if not val.is_file():
            raise BtxError(f"{val}: validation shard missing; run btx prepare {exp.path}")
        data[name] = str(val)
    tokens = tokens or exp.analyze.tokens
    show_text = exp.analyze.show_text if show_text is None else show_text
    out = out or exp.paths.analysis

    identities = {
        "model": input_identity(checkpoint),
        **{f"val:{d}": identity(load_shard(v, verify=True).path) for d, v in data.items()},
    }
    done = {
        "stage": "analyze",
        "checkpoint": str(checkpoint),
        "recipe": str(exp.path),
        "domains": list(data),
        "tokens_per_domain": tokens,
        "input_identities": relative_identities(identities, out),
    }
    return analyze_and_write(
        [checkpoint, *compare],
        data,
        out,
        options={**options, "tokens": tokens, "device": exp.eval.device, "dtype": _DTYPES[exp.eval.dtype]},
        metric=metric,
        layer=layer,
        show_text=show_text,
        console=console,
        done=done,
    )
