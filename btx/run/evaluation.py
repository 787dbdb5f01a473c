"""`btx eval RECIPE`: every model of a run on the same validation windows, with the BTM ensembles.

`run_models` lists the run's checkpoints (seed, experts, merged, BTX, grown, baselines) with the
FLOPs each cost; a model whose stage is stale is refused rather than scored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.markup import escape

from btx.data.sampling import eval_batch_count
from btx.data.shards import load_shard
from btx.data.tokenizer import load_tokenizer
from btx.errors import BtxError
from btx.evaluate.btm import TfidfRouter, shard_sample
from btx.evaluate.checkpoints import btm_rows, check_out_dir, pick_dtype, write_outputs, written
from btx.evaluate.routing_analysis import pick_device
from btx.evaluate.scores import row_from_logprobs, window_logprobs
from btx.evaluate.table import render, save
from btx.evaluate.tasks import parse_task_names
from btx.io.atomic import atomic_dir
from btx.io.checkpoint import load_model
from btx.io.manifest import (
    changed_inputs,
    damaged_outputs,
    hash_dir,
    identity,
    input_identity,
    read_done,
    relative_identities,
    write_done,
)
from btx.io.reader import CheckpointReader
from btx.recipe.experiment import to_plain
from btx.recipe.load import load_experiment
from btx.recipe.schema import DEVICE_KEYS, EvalSection
from btx.recipe.settings import given
from btx.run.baselines import ROWS, matches
from btx.run.eval_tasks import prepare_tasks, run_tasks
from btx.run.ledger import Pipeline
from btx.run.stage import Task
from btx.ui.progress import PartsProgress


@dataclass
class RunModel:
    """One model of a run as eval shows it."""

    name: str  # its row
    path: Path  # the HF checkpoint
    done_dir: Path | None  # where its DONE.json is (None: a given seed.path)
    note: str


def run_models(exp) -> list[RunModel]:
    """Every model of the run that eval scores (whether it exists yet or not), in table order;
    the baselines of the protocols eval.match asks for."""
    rd = exp.paths
    models = [RunModel("seed", exp.seed_dir, rd.seed if exp.seed.path is None else None, "the dense seed")]
    models += [RunModel(f"expert:{d}", rd.expert_final(d), rd.expert(d), f"{d} expert alone") for d in exp.domains]
    models += [
        RunModel(ROWS["dense", m], rd.dense_baseline_final(m), rd.dense_baseline(m), "the seed trained further")
        for m in matches(exp)
    ]
    models += [
        RunModel(
            ROWS["upcycled", m],
            rd.upcycled_baseline(m),
            rd.upcycled_baseline(m),
            "seed copies as experts + MoE finetune",
        )
        for m in matches(exp)
    ]
    models.append(_model("BTX merged (no finetune)", rd.merged, "MiX only"))
    if exp.finetune.router_only_steps:
        models.append(
            _model(
                f"BTX router-only ({exp.finetune.router_only_steps} steps)",
                rd.finetune.router,
                "merged + the router-only phase",
            )
        )
    models.append(_model("BTX", rd.finetuned, "merged + MoE finetune"))
    if exp.grow.domains:
        added = "+" + ", ".join(exp.grow.domains)
        models.append(_model("BTX grown (no finetune)", rd.grown, f"BTX {added} experts"))
        if exp.grow.steps:
            models.append(
                _model("BTX grown", rd.grow_finetune.export, f"BTX {added}, then {exp.grow.steps} finetune steps")
            )
    return models


def _model(name: str, path: Path, note: str) -> RunModel:
    """A model whose checkpoint directory holds its DONE.json too."""
    return RunModel(name, path, path, note)


def model_stage_dirs(exp) -> list[Path]:
    """The directories whose DONE.json describe the run's models (the seed when the run trains it)."""
    dirs = [m.done_dir for m in run_models(exp) if m.done_dir is not None]
    return dirs + [exp.paths.upcycled_merged] if exp.eval.baselines else dirs


def stale_models(exp) -> list[str]:
    """One line per finished model of the run that no longer follows from what is on disk: its files
    differ from its DONE.json, or an input it recorded (the merge a finetune started from, ...) changed."""
    problems = []
    for directory in model_stage_dirs(exp):
        done = read_done(directory)
        if done is not None:
            problems += [f"{directory}: {p}" for p in damaged_outputs(directory)]
            problems += [f"{directory}: stale: {p}" for p in changed_inputs(done.get("input_identities"), directory)]
    return problems


def eval_input_identities(exp, out: Path) -> dict:
    """For eval's DONE.json: the identity of every model of the run that is evaluated, and of the
    validation shards they are scored on (paths also relative to `out`, where DONE.json goes)."""
    identities = {
        str(m.path.relative_to(exp.run_dir)) if m.path.is_relative_to(exp.run_dir) else "seed": input_identity(m.path)
        for m in run_models(exp)
        if (m.path / "config.json").is_file()
    }
    for d in exp.domains:
        identities[f"val:{d}"] = identity(load_shard(exp.paths.shard(d, "val"), verify=True).path)
    return relative_identities(identities, out)


def _row_flops(exp, model: RunModel) -> float | None:
    """Training FLOPs beyond the seed: a model's own, plus the experts' for the MoEs made of them."""
    if model.name == "seed":
        return 0.0
    done = read_done(model.done_dir) or {}

    def flops(path: Path) -> float:
        return (read_done(path) or {}).get("train_flops", 0.0)

    if model.name.startswith("BTX grown"):  # BTX, the added experts, and the finetune after growing
        finetuned = _row_flops(exp, _model("BTX", exp.paths.finetuned, ""))
        tuned = flops(model.done_dir) if model.name == "BTX grown" else 0.0
        return finetuned + sum(flops(exp.paths.expert(d)) for d in exp.grow.domains) + tuned
    experts = sum(flops(exp.paths.expert(d)) for d in exp.merged_domains)
    if model.name.startswith("BTX"):
        return experts + done.get("train_flops", 0.0) if done.get("stage") == "train" else experts
    return done.get("train_flops")


def eval_rows(exp, console: Console):
    """Every model of the run that exists, scored on the same validation windows, and the BTM rows
    of its experts (domain posterior; top-1 and top-2 by tf-idf against each domain's train data).
    The models run on eval.device in eval.dtype."""
    settings = exp.eval
    seq_len = settings.seq_len or exp.train.seq_len
    shards = {d: load_shard(exp.paths.shard(d, "val")) for d in exp.domains}
    # train.document_mask: every model is scored with attention inside documents, as it trained.
    eos = load_tokenizer(exp.tokenizer).eos_id if exp.train.document_mask else None
    present = [m for m in run_models(exp) if (m.path / "config.json").is_file()]
    device = pick_device(settings.device)
    counts = {d: eval_batch_count(s, seq_len, settings.batch_size, settings.batches) for d, s in shards.items()}
    rows = []
    experts: list[tuple[str, dict, int, float | None]] = []  # (domain, logprobs, active params, flops)
    with PartsProgress(console, "eval", total=sum(counts.values()) * len(present)) as progress:
        for m in present:
            with CheckpointReader(m.path) as reader:
                dtype = pick_dtype(settings.dtype, device, reader.dtype)
            model = load_model(m.path, dtype=dtype, device=device)
            lps = {}
            for d, shard in shards.items():
                with progress.part(f"{m.name} · {d}", counts[d]):
                    lps[d] = window_logprobs(
                        model, shard, seq_len, settings.batch_size, settings.batches, progress.advance, eos
                    )
            active, flops = model.cfg.param_counts()["active"], _row_flops(exp, m)
            rows.append(row_from_logprobs(m.name, lps, flops, active, m.note))
            if m.name.startswith("expert:"):
                experts.append((m.name.split(":", 1)[1], lps, active, flops))
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if experts:
        train = [exp.paths.shard(d, "train") for d, *_ in experts]
        router = None
        if len(experts) >= 2 and all(path.is_file() for path in train):
            router = TfidfRouter(
                [shard_sample(load_shard(path), settings.btm_tfidf_tokens) for path in train],
                min(CheckpointReader(exp.paths.expert_final(d)).cfg.vocab_size for d, *_ in experts),
            )
        btm = btm_rows(
            [lps for _, lps, _, _ in experts],
            [f for *_, f in experts],
            [a for _, _, a, _ in experts],
            f"the {len(experts)} experts",
            router=router,
            shards=shards,
            seq_len=seq_len,
            batch_size=settings.batch_size,
            batches=settings.batches,
            expert_names=[d for d, *_ in experts],
        )
        at = max(i for i, r in enumerate(rows) if r.name.startswith("expert:")) + 1
        rows[at:at] = btm
    return rows


def eval_recipe(exp, *, out: Path | None = None, console: Console | None = None, force: bool = False):
    """`btx eval RECIPE`: every model of the run that exists (`eval_rows`), shown and written to
    <run_dir>/eval/ (eval.md, eval.json, the plot, DONE.json). A model that no longer follows from
    its inputs (a finetune of an earlier merge, a damaged file) is refused unless `force`."""
    console = console or Console()
    missing = [str(exp.paths.shard(d, "val")) for d in exp.domains if not exp.paths.shard(d, "val").is_file()]
    if missing:
        raise BtxError(f"{missing[0]}: validation shard missing; run btx prepare {exp.path}")
    stale = [] if force else stale_models(exp)
    if stale:
        raise BtxError(
            f"{stale[0]}; its row would not describe the models on disk: redo that stage (its command with "
            f"--force, or btx run {exp.path}), or pass --force to evaluate the models as they are"
        )
    out = out or exp.paths.eval
    identities = eval_input_identities(exp, out)
    plan = prepare_tasks(exp, present_models(exp), **task_device(exp))  # task errors before any work
    rows = eval_rows(exp, Console(stderr=True))  # progress to stderr: stdout holds the table
    if not rows:
        raise BtxError(
            f"{exp.run_dir}: no finished model to evaluate yet (seed/, experts/<domain>/final/, merged/, "
            "finetuned/, baselines/); run btx run or its stages first"
        )
    domains = list(exp.domains)
    render(rows, domains, console=console)
    tasks = run_tasks(plan, {r.name: r.train_flops for r in rows}, console) if plan else None
    if tasks is not None:
        tasks.render(console)
    settings = eval_settings(exp)
    write_outputs(
        rows,
        domains,
        out,
        {**settings, "input_identities": identities},
        {"settings": settings},
        console=console,
        tasks=tasks,
    )
    console.print(escape(f"wrote {out}/ ({written(out)})"), soft_wrap=True)
    return rows


def eval_section_view(exp) -> dict:
    """What of the eval section decides the eval stage's result: all of it, and with local tasks
    the content of the include path (a task's YAML or data edited in place redoes the stage)."""
    view = to_plain(exp.eval)
    if exp.eval.tasks and exp.eval.include_path and Path(exp.eval.include_path).is_dir():
        view["include_path_files"] = hash_dir(exp.eval.include_path)
    return view


def present_models(exp) -> list[RunModel]:
    """The models of the run that exist, in table order."""
    return [m for m in run_models(exp) if (m.path / "config.json").is_file()]


def task_device(exp) -> dict:
    """The device and dtype downstream tasks run on: eval.device and eval.dtype, as the loss eval
    (auto: float32 on the CPU, bfloat16 on a GPU; tasks key their cached results on one name)."""
    device = pick_device(exp.eval.device)
    dtype = exp.eval.dtype
    if dtype == "auto":
        dtype = "float32" if device.type == "cpu" else "bfloat16"
    return {"device": str(device), "dtype": dtype}


def eval_settings(exp) -> dict:
    return {
        "recipe": str(exp.path),
        "overrides": list(exp.overrides),
        "batches": exp.eval.batches,
        "batch_size": exp.eval.batch_size,
        "seq_len": exp.eval.seq_len or exp.train.seq_len,
        "match": exp.eval.match,
        "btm_tfidf_tokens": exp.eval.btm_tfidf_tokens,
        # only when set, so that a loss-only eval.json stays what it was
        **({"tasks": list(exp.eval.tasks), "include_path": exp.eval.include_path} if exp.eval.tasks else {}),
        **({"device": exp.eval.device} if exp.eval.device is not None else {}),
        **({"dtype": exp.eval.dtype} if exp.eval.dtype != "auto" else {}),
    }


def eval_recipe_command(args) -> int:
    """`btx eval RECIPE [KEY=VALUE ...]` (arguments: btx.cli; checkpoints: btx.evaluate)."""
    rest = list(args.overrides or [])
    for flag, value in (("--data", args.data), ("--btm", args.btm), ("--names", args.names)):
        if value:
            raise BtxError(f"eval: {flag} is for checkpoints; a RECIPE brings its own models and validation shards")
    for key, value in (("batches", args.batches), ("batch_size", args.batch_size), ("seq_len", args.seq_len)):
        if value is not None:  # --batches N is shorthand for eval.batches=N
            rest.append(f"eval.{key}={value}")
    tasks, include_path = getattr(args, "tasks", None), getattr(args, "include_path", None)
    if tasks:  # --tasks T1,T2 is shorthand for eval.tasks=[T1, T2]
        rest.append("eval.tasks=[" + ", ".join(json.dumps(n) for n in parse_task_names(tasks)) + "]")
    if include_path:  # a path typed on the command line is the shell's, not the recipe's
        rest.append(f"eval.include_path={json.dumps(str(Path(include_path).resolve()))}")
    for key, value in given(args, EvalSection, only=DEVICE_KEYS).items():
        rest.append(f"eval.{key}={value}")  # --device cuda is shorthand for eval.device=cuda
    exp = load_experiment(args.target, rest)
    if args.out:
        check_out_dir(Path(args.out))
    eval_recipe(exp, out=Path(args.out) if args.out else None, force=args.force)
    return 0


def evaluate(p: Pipeline, task: Task) -> str:
    """btx run's eval stage: `eval_rows` into <run_dir>/eval/, with its DONE.json."""
    exp, out = p.exp, p.exp.paths.eval
    identities = eval_input_identities(exp, out)
    plan = prepare_tasks(exp, present_models(exp), **task_device(exp))
    rows = eval_rows(exp, p.console)
    domains = list(exp.domains)
    render(rows, domains, console=p.console)
    tasks = run_tasks(plan, {r.name: r.train_flops for r in rows}, p.console) if plan else None
    if tasks is not None:
        tasks.render(p.console)
    with atomic_dir(out, force=True) as tmp:
        groups = tasks.groups() if tasks is not None else None
        save(rows, domains, tmp, {"settings": eval_settings(exp)}, console=p.console, task_groups=groups)
        if tasks is not None:
            tasks.save(tmp, console=p.console)
        write_done(
            tmp,
            {
                "stage": "eval",
                "rows": [r.name for r in rows],
                "key": task.key,
                "outputs": hash_dir(tmp),
                "input_identities": identities,
            },
        )
    best = min(rows, key=lambda r: r.average)
    return f"best average: {best.name} ({best.average:.4f})"
