"""Downstream tasks (eval.tasks) for `btx eval RECIPE` and btx run's eval stage: every model of the
run that exists and the BTM ensembles of its experts, through lm-evaluation-harness.

`prepare_tasks` runs before the loss eval: it finds the tasks (a bad name or include path is a
one-line error), computes each (model, task) result's key and loads the datasets of those that are
not stored yet (a Hub dataset offline is a one-line error), so nothing is scored and nothing is
written when a task cannot run. `run_tasks` then scores only the missing results, each model
loaded once on the eval device, and returns the TaskReport the eval outputs gain. Results are kept
in <run_dir>/eval-tasks/ (btx.evaluate.tasks.TaskCache), outside eval/, so a redone eval stage or
a second `btx eval` reuses every result whose model, task and settings are unchanged.

The ensembles are the loss table's: "BTM ensemble" (domain posterior) with two experts or more,
and "BTM top-1 (tf-idf)" / "BTM top-2 (tf-idf)" when every expert's training shard is there.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from btx.data.shards import load_shard
from btx.errors import BtxError
from btx.evaluate.btm import TfidfRouter, shard_sample
from btx.evaluate.checkpoints import BTM_POSTERIOR_ROW
from btx.evaluate.next_token import ModelScorer, PosteriorScorer, TopKScorer
from btx.evaluate.task_report import TaskReport, TaskRow
from btx.evaluate.tasks import TaskCache, TaskSpec, TaskSuite, task_specs
from btx.io.checkpoint import load_model
from btx.io.manifest import identity

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class TaskModel:
    """A row of the task table: how to build its scorer, and what its results are keyed by."""

    name: str
    identity: dict  # the content that decides its results
    note: str
    tokenizer_dir: Path
    scorer: Callable[[torch.device, torch.dtype], object]


def _sha(path: Path) -> dict:
    return identity(path)["sha256"]


def task_models(exp, present: list) -> list[TaskModel]:
    """The models of the run that exist (btx.run.evaluation.RunModel, in the loss table's order),
    with the BTM rows after the experts."""

    def single(m) -> TaskModel:
        return TaskModel(
            m.name,
            {"model": _sha(m.path)},
            m.note,
            m.path,
            lambda device, dtype, path=m.path: ModelScorer(load_model(path, dtype=dtype, device=device)),
        )

    models = [single(m) for m in present]
    experts = [m for m in present if m.name.startswith("expert:")]
    if len(experts) < 2:
        return models
    domains = [m.name.split(":", 1)[1] for m in experts]
    expert_ids = [_sha(m.path) for m in experts]

    def load_experts(device, dtype):
        return [load_model(m.path, dtype=dtype, device=device) for m in experts]

    btm = [
        TaskModel(
            BTM_POSTERIOR_ROW,
            {"btm": "posterior", "experts": expert_ids},
            "experts mixed by domain posterior",
            experts[0].path,
            lambda device, dtype: PosteriorScorer(load_experts(device, dtype)),
        )
    ]
    train = [exp.paths.shard(d, "train") for d in domains]
    if all(p.is_file() for p in train):
        tokens = exp.eval.btm_tfidf_tokens
        router_id = {"tokens": tokens, "shards": [_sha(exp.paths.tokens(d, "train")) for d in domains]}

        def router(models) -> TfidfRouter:
            vocab = min(m.cfg.vocab_size for m in models)
            return TfidfRouter([shard_sample(load_shard(p), tokens) for p in train], vocab)

        for k in (1, 2):
            btm.append(
                TaskModel(
                    f"BTM top-{k} (tf-idf)",
                    {"btm": f"top-{k}", "experts": expert_ids, "router": router_id},
                    f"the {k} expert(s) most tf-idf-similar to the context",
                    experts[0].path,
                    lambda device, dtype, k=k: _topk(load_experts(device, dtype), router, k),
                )
            )
    at = max(i for i, m in enumerate(models) if m.name.startswith("expert:")) + 1
    return models[:at] + btm + models[at:]


def _topk(experts, router, k):
    return TopKScorer(experts, router(experts), k)


@dataclass
class TaskPlan:
    suite: TaskSuite
    specs: list[TaskSpec]
    models: list[TaskModel]
    cache: TaskCache
    keys: dict[tuple[str, str], str]  # (model, task) -> its result's key
    device: str
    dtype: str

    @property
    def missing(self) -> list[tuple[str, str]]:
        return [pair for pair, key in self.keys.items() if self.cache.get(key) is None]


def prepare_tasks(exp, present: list, *, device: str = "cpu", dtype: str = "float32") -> TaskPlan | None:
    """The tasks of eval.tasks, checked and keyed (see the module docstring); None without tasks."""
    if not exp.eval.tasks:
        return None
    if dtype not in TORCH_DTYPES:
        raise BtxError(f"eval dtype {dtype!r}: expected one of {', '.join(TORCH_DTYPES)}")
    specs = task_specs(exp.eval.tasks, exp.eval.batch_size)
    suite = TaskSuite(specs, exp.eval.include_path)
    models = task_models(exp, present)
    keys = {(m.name, s.name): suite.key(s, m.identity, device, dtype) for m in models for s in specs}
    plan = TaskPlan(suite, specs, models, TaskCache(exp.paths.task_cache), keys, device, dtype)
    missing_tasks = {task for _, task in plan.missing}
    suite.check([s for s in specs if s.name in missing_tasks])
    return plan


def run_tasks(plan: TaskPlan, flops: dict[str, float | None], console: Console) -> TaskReport:
    """Every (model, task) result: stored ones read back, missing ones scored and stored."""
    from btx.evaluate.lm import ScorerLM, hf_tokenizer  # imports lm_eval: the eval extra, checked by TaskSuite

    missing = set(plan.missing)
    rows = []
    device = torch.device(plan.device)
    with Progress(
        TextColumn("[bold]tasks {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        console=console,
        transient=True,
    ) as bar:
        overall = bar.add_task("", total=len(missing))
        for m in plan.models:
            row = TaskRow(m.name, flops.get(m.name), note=m.note)
            todo = [s for s in plan.specs if (m.name, s.name) in missing]
            lm = None
            if todo:
                scorer = m.scorer(device, TORCH_DTYPES[plan.dtype])
                lm = ScorerLM(scorer, hf_tokenizer(m.tokenizer_dir), name=m.name)
            for spec in plan.specs:
                key = plan.keys[m.name, spec.name]
                if spec not in todo:
                    row.results[spec.name] = plan.cache.get(key)
                    continue
                requests = bar.add_task(escape(f"{m.name}: {spec.name} (requests)"), total=None)
                lm.batch_size = spec.batch_size
                lm.progress = lambda n, requests=requests: bar.advance(requests, n)
                record = plan.suite.run(lm, spec)
                plan.cache.put(key, record, {"model": m.name, "task": spec.name, "model_identity": m.identity})
                row.results[spec.name] = record
                bar.remove_task(requests)
                bar.advance(overall)
            del lm
            if device.type == "cuda":
                torch.cuda.empty_cache()
            rows.append(row)
    reused = len(plan.keys) - len(missing)
    settings = {
        "lm_eval": plan.suite.version,
        "tasks": [vars(s) for s in plan.specs],
        "include_path": str(plan.suite.include_path) if plan.suite.include_path else None,
        "device": plan.device,
        "dtype": plan.dtype,
        "reused_results": reused,
        "scored_results": len(missing),
    }
    console.print(f"tasks: {len(missing)} result(s) scored, {reused} reused from {plan.cache.directory}")
    return TaskReport([s.name for s in plan.specs], rows, settings)
