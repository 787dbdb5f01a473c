"""The baselines stage: dense and sparse-upcycling runs matched to BTX on compute or on data.

See btx/run/pipeline.py for the two protocols; STAGES there declares one row per baseline (the
upcycled MoE they start from, then a dense and an upcycled run per protocol of eval.match), each
its own ledger entry ("baselines:<its directory>"), so adding a protocol trains only its runs.
Every baseline trains ALL its parameters from the seed, whatever BTX's finetune freezes:
- compute-matched: as many steps of the finetune's settings as make its training FLOPs the
  experts' plus the BTX finetune's (`compute_budget`, from their DONE.json);
- data-matched (the paper's Table 2): exactly the batches BTX trained on (`btx_data_plan`), the
  experts' interleaved and then the finetune's, one step per BTX step.
What a baseline takes from BTX's records (its budget or its batches, the merge's shape) is its
`inputs`: it keys on them, not on the content of the experts, the merge or the finetune.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from btx.data.sampling import DataStream
from btx.errors import BtxError
from btx.io.manifest import DONE_NAME, read_done
from btx.io.reader import CheckpointReader
from btx.mix.merge import merge_from_recipe, recipe_merge_options
from btx.model.flops import train_flops_per_token
from btx.run.ledger import Pipeline
from btx.run.stage import Task
from btx.run.stages import short_settings, train_summary
from btx.train.finetune import finetune_job, finetune_stream, run_finetune
from btx.train.job import TrainJob, expert_job
from btx.train.loop import run_loop

# The eval row of each baseline, by kind and protocol (eval.match).
ROWS = {
    ("dense", "compute"): "dense (compute-matched)",
    ("upcycled", "compute"): "sparse upcycling (compute-matched)",
    ("dense", "data"): "dense (data-matched)",
    ("upcycled", "data"): "sparse upcycling (data-matched)",
}
# Merge options an upcycle does not take: it has no routers fitted to data.
_FIT_OPTIONS = ("router_tokens", "router_device", "ridge_lambda", "router_scale", "prompts", "negative_prompts")


def matches(exp) -> list[str]:
    """The protocols eval.match asks for."""
    return ["compute", "data"] if exp.eval.match == "both" else [exp.eval.match]


def baselines_off(exp, match: str | None = None) -> tuple[str, str] | None:
    """Why a baseline row does not run: eval.baselines is off, or eval.match does not ask for it."""
    if not exp.eval.baselines:
        return "eval.baselines is off", "off"
    return None if match is None or match in matches(exp) else (f"eval.match is {exp.eval.match}", "off")


# -- the upcycled MoE ----------------------------------------------------------------------------


def merge_shape(exp) -> dict:
    """What the baselines take of the merge: its expert count and top-k (the upcycled MoE copies
    them), not its routers, so a merge with other routers redoes none of them."""
    cfg = CheckpointReader(exp.paths.merged).cfg
    return {"n_experts": cfg.n_experts, "top_k": cfg.top_k}


def upcycle_options(exp) -> dict:
    """The merge section as an upcycle reads it: the options it takes from it."""
    options = dataclasses.asdict(recipe_merge_options(exp.merge, 1, exp.finetune.balance_alpha))
    return {k: v for k, v in options.items() if k not in (*_FIT_OPTIONS, "upcycle")}


def upcycle(p: Pipeline, task: Task) -> str:
    shape = task.inputs
    merge_from_recipe(
        p.exp, upcycle=shape["n_experts"], out_dir=p.exp.paths.upcycled_merged, force=True, console=p.console
    )
    return f"{shape['n_experts']} copies of the seed, top-{shape['top_k']}"


# -- what a baseline is matched on ---------------------------------------------------------------


@dataclass
class Matched:
    """A baseline's length and data, matched to BTX; `record` goes into its DONE.json's inputs."""

    steps: int
    record: dict
    plan: list | None = None  # the batches (btx_data_plan), data-matched


def compute_budget(exp) -> float:
    """Training FLOPs of BTX beyond the seed: every expert plus the MoE finetune."""
    experts = sum(read_done(exp.paths.expert(d))["train_flops"] for d in exp.merged_domains)
    return experts + read_done(exp.paths.finetuned)["train_flops"]


def _matched_steps(budget: float, cfg, settings) -> int:
    """Steps of a baseline that trains all of `cfg` (btx.model.flops) within one step of `budget` FLOPs."""
    flops_per_step = (
        train_flops_per_token(cfg, settings.seq_len) * settings.batch_size * settings.seq_len * settings.grad_accum
    )
    return max(1, round(budget / flops_per_step))


def btx_data_plan(exp, settings) -> list[list]:
    """The batches BTX trained on after the seed, for the data-matched baselines (btx.data.sampling.PlannedSampler):
    first every expert's batches, the domains interleaved evenly (the union of the experts' data,
    in a mixed order, as one dense run sees its data), then the finetune's (its router-only phase's
    included), in order. A batch is the same batch only at the same global batch size and seq_len,
    so every expert and the finetune must have trained at the baselines' (`settings`)."""
    batch_tokens = settings.batch_size * settings.seq_len  # one micro-batch of one process (btx run)

    def micro_batches(job) -> int:
        where, s = Path(job.manifest_dir), job.settings
        done = read_done(where)
        micro = done["steps"] * s.grad_accum
        if s.seq_len != settings.seq_len or done["tokens"] != micro * batch_tokens:
            raise BtxError(
                f"{where / DONE_NAME}: trained {done['tokens']:,} tokens in {micro} micro-batches of "
                f"seq_len {s.seq_len}; the data-matched baselines replay BTX's batches at "
                f"{settings.batch_size} x {settings.seq_len} tokens (finetune.train), so every expert "
                "needs that batch_size and seq_len, on one process (or use eval.match: compute)"
            )
        return micro

    experts = []
    for d in exp.merged_domains:  # the data-matched baselines see what BTX saw: the merged experts
        job = expert_job(exp, d)
        experts.append(DataStream(domains=[d], weights=None, seed=job.settings.seed, first=0, count=micro_batches(job)))
    finetune = finetune_job(exp)
    micro = micro_batches(finetune) + (micro_batches(finetune.before) if finetune.before is not None else 0)
    return [experts, [dataclasses.replace(finetune_stream(finetune), count=micro)]]


def matched(exp, match: str, cfg) -> Matched:
    """A baseline of model `cfg` matched to BTX on `match` (see the module docstring)."""
    settings = exp.finetune_train
    if match == "compute":
        budget = compute_budget(exp)
        return Matched(_matched_steps(budget, cfg, settings), {"compute_budget": budget})
    plan = btx_data_plan(exp, settings)
    micro = sum(stream.count for phase in plan for stream in phase)
    if micro % settings.grad_accum:
        raise BtxError(
            f"{exp.path}: BTX trained {micro} micro-batches, which finetune.train.grad_accum "
            f"{settings.grad_accum} does not divide; the data-matched baselines replay them in "
            "whole steps (or use eval.match: compute)"
        )
    return Matched(
        micro // settings.grad_accum, {"data_matched_tokens": micro * settings.batch_size * settings.seq_len}, plan
    )


def dense_inputs(exp, match: str) -> Matched:
    return matched(exp, match, CheckpointReader(exp.seed_dir).cfg)


def upcycled_inputs(exp, match: str) -> Matched:
    """Matched for the upcycled MoE as the finetune routes it; its shape is the merge's."""
    merged = CheckpointReader(exp.paths.merged).cfg
    moe = dataclasses.replace(merged, router_mode=exp.finetune.router_mode, top_k=exp.finetune.top_k or merged.top_k)
    return matched(exp, match, moe)


# -- the runs ------------------------------------------------------------------------------------


def baseline_mixture(exp) -> dict[str, float]:
    return dict(exp.finetune.mixture) or {d: 1.0 for d in exp.merged_domains}


def dense_job(exp, match: str, m: Matched) -> TrainJob:
    """The seed trained further, all of it, on the finetune mixture (or on BTX's batches)."""
    rd, mixture = exp.paths, baseline_mixture(exp)
    shards = exp.data_domains if m.plan is not None else mixture  # a plan draws every domain
    return TrainJob(
        name=f"{rd.dense_baseline(match).name}-baseline",
        experiment=exp.name,
        stage="baselines",
        settings=short_settings(exp.finetune_train, m.steps),
        train_shards={d: rd.shard(d, "train") for d in shards},
        val_shards={d: rd.shard(d, "val") for d in mixture},
        mixture=mixture,
        work_dir=rd.dense_baseline(match),
        export_dir=rd.dense_baseline_final(match),
        manifest_dir=rd.dense_baseline(match),
        init_from=exp.seed_dir,
        tokenizer=str(exp.tokenizer),
        inputs=m.record,
        data_plan=m.plan,
    )


def upcycled_job(exp, match: str, m: Matched) -> TrainJob:
    """The upcycled MoE finetuned, all of it, as BTX's MoE is (or on BTX's batches)."""
    rd = exp.paths
    job = finetune_job(
        exp, model_dir=rd.upcycled_merged, out_dir=rd.upcycled_baseline(match), trainable="all", router_only_steps=0
    )
    if m.plan is not None:
        job = dataclasses.replace(job, train_shards={d: rd.shard(d, "train") for d in exp.data_domains})
    return dataclasses.replace(
        job,
        name=f"{rd.upcycled_baseline(match).name}-baseline",
        stage="baselines",
        work_dir=rd.upcycled_baseline_train(match),
        settings=short_settings(exp.finetune_train, m.steps),
        data_plan=m.plan,
        inputs={**job.inputs, **m.record},
    )


def train_dense(p: Pipeline, task: Task, match: str) -> str:
    return train_summary(run_loop(dense_job(p.exp, match, task.inputs), console=p.console))


def train_upcycled(p: Pipeline, task: Task, match: str) -> str:
    return train_summary(run_finetune(upcycled_job(p.exp, match, task.inputs), console=p.console))
