"""The baselines stage: dense and sparse-upcycling runs matched to BTX on compute or on data.

See btx/run/pipeline.py for the two protocols. `compute_budget` is the experts' and the BTX
finetune's FLOPs from their DONE.json; `btx_data_plan` lists the batches BTX trained on after the
seed, which the data-matched baselines replay.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from btx.errors import BtxError
from btx.io.manifest import DONE_NAME, read_done
from btx.run.ledger import (
    Pipeline,
    StageOutcome,
    _baseline_settings,
    _key,
    _outputs_key,
    _train_summary,
)


def compute_budget(p: Pipeline) -> float:
    """Training FLOPs of BTX beyond the seed: every expert plus the MoE finetune."""
    exp = p.exp
    experts = sum(read_done(exp.expert_dir(d))["train_flops"] for d in exp.merged_domains)
    return experts + read_done(p.run_dir / "finetuned")["train_flops"]


def _matched_steps(budget: float, cfg, settings) -> int:
    """Steps of a baseline that trains all of `cfg` (btx.model.flops) within one step of `budget` FLOPs."""
    from btx.model.flops import train_flops_per_token

    flops_per_step = train_flops_per_token(cfg, settings.seq_len) * settings.batch_size * settings.seq_len * \
        settings.grad_accum
    return max(1, round(budget / flops_per_step))


def btx_data_plan(exp, settings) -> list[list]:
    """The batches BTX trained on after the seed, for the data-matched baselines (btx.data.sampling.PlannedSampler):
    first every expert's batches, the domains interleaved evenly (the union of the experts' data,
    in a mixed order, as one dense run sees its data), then the finetune's (its router-only phase's
    included), in order. A batch is the same batch only at the same global batch size and seq_len,
    so every expert and the finetune must have trained at the baselines' (`settings`)."""
    from btx.data.sampling import DataStream
    from btx.train.finetune import finetune_job, finetune_stream
    from btx.train.job import expert_job

    batch_tokens = settings.batch_size * settings.seq_len  # one micro-batch of one process (btx run)

    def micro_batches(job, done: dict, where: Path) -> int:
        s = job.settings
        micro = done["steps"] * s.grad_accum
        if s.seq_len != settings.seq_len or done["tokens"] != micro * batch_tokens:
            raise BtxError(f"{where / DONE_NAME}: trained {done['tokens']:,} tokens in {micro} micro-batches of "
                           f"seq_len {s.seq_len}; the data-matched baselines replay BTX's batches at "
                           f"{settings.batch_size} x {settings.seq_len} tokens (finetune.train), so every expert "
                           "needs that batch_size and seq_len, on one process (or use eval.match: compute)")
        return micro

    experts = []
    for d in exp.merged_domains:  # the data-matched baselines see what BTX saw: the merged experts
        job = expert_job(exp, d)
        done = read_done(job.manifest_dir)
        experts.append(DataStream(domains=[d], weights=None, seed=job.settings.seed, first=0,
                                  count=micro_batches(job, done, Path(job.manifest_dir))))
    finetune = finetune_job(exp)
    micro = micro_batches(finetune, read_done(Path(finetune.manifest_dir)), Path(finetune.manifest_dir))
    if finetune.before is not None:
        micro += micro_batches(finetune.before, read_done(Path(finetune.before.manifest_dir)),
                               Path(finetune.before.manifest_dir))
    return [experts, [dataclasses.replace(finetune_stream(finetune), count=micro)]]




# The baselines (eval.baselines), by what they are matched on (eval.match): directory under
# baselines/ -> eval row. Each is its own ledger entry ("baselines:<dir>"), so adding a protocol
# trains only its own runs.
BASELINES = {
    "compute": {"dense": "dense (compute-matched)", "upcycled": "sparse upcycling (compute-matched)"},
    "data": {"dense-data": "dense (data-matched)", "upcycled-data": "sparse upcycling (data-matched)"},
}


def matches(exp) -> list[str]:
    """The protocols eval.match asks for."""
    return ["compute", "data"] if exp.eval.match == "both" else [exp.eval.match]


def _baselines(p: Pipeline, force: bool) -> StageOutcome:
    """Dense and sparse-upcycling baselines (see the module docstring), each one trained ALL its
    parameters whatever BTX's finetune freezes, from the seed:
    - compute-matched: as many steps of the finetune's settings as make its training FLOPs the
      experts' plus the BTX finetune's (dense on the finetune mixture);
    - data-matched (the paper's Table 2): exactly the batches BTX trained on (`btx_data_plan`),
      the experts' interleaved and then the finetune's, one step per BTX step."""
    exp = p.exp
    if not exp.eval.baselines:
        p.keys["baselines"] = "off"
        return StageOutcome("baselines", "off", 0.0, "eval.baselines is off")
    from btx.io.reader import CheckpointReader
    from btx.mix.merge import merge_from_recipe, recipe_merge_options
    from btx.train.finetune import finetune_job, run_finetune
    from btx.train.job import TrainJob
    from btx.train.loop import run_loop

    t0 = time.perf_counter()
    root = p.run_dir / "baselines"
    seed_dir = exp.seed_dir
    settings = exp.finetune_train
    mixture = dict(exp.finetune.mixture) or {d: 1.0 for d in exp.merged_domains}
    # Of the merge, the baselines use its shape (the upcycled MoE copies its expert count and top-k)
    # and the options an upcycle takes from the merge section: other routers do not redo them.
    merged_cfg = CheckpointReader(p.run_dir / "merged").cfg
    upcycle = dataclasses.asdict(recipe_merge_options(exp.merge, merged_cfg.n_experts, exp.finetune.balance_alpha))
    for unused in ("router_tokens", "router_device", "ridge_lambda", "router_scale", "prompts", "negative_prompts"):
        del upcycle[unused]  # an upcycle has no routers fitted to data
    moe_cfg = dataclasses.replace(merged_cfg, router_mode=exp.finetune.router_mode,
                                  top_k=exp.finetune.top_k or merged_cfg.top_k)
    outcomes: list[StageOutcome] = []

    def dense_job(name: str, steps: int, inputs: dict, data_plan=None) -> TrainJob:
        shards = exp.data_domains if data_plan is not None else mixture  # a plan draws every domain
        return TrainJob(
            name=f"{name}-baseline", settings=_baseline_settings(settings, steps),
            train_shards={d: exp.data_dir(d) / "train.json" for d in shards},
            val_shards={d: exp.data_dir(d) / "val.json" for d in mixture}, mixture=mixture,
            work_dir=root / name, export_dir=root / name / "final", manifest_dir=root / name,
            init_from=seed_dir, tokenizer=str(exp.recipe.tokenizer), inputs=inputs, data_plan=data_plan,
        )

    def upcycled_job(name: str, steps: int, inputs: dict, data_plan=None) -> TrainJob:
        job = finetune_job(exp, model_dir=root / "upcycled-merged", out_dir=root / name, trainable="all",
                           router_only_steps=0)
        if data_plan is not None:
            job = dataclasses.replace(job, train_shards={d: exp.data_dir(d) / "train.json" for d in exp.data_domains})
        return dataclasses.replace(job, name=f"{name}-baseline", work_dir=root / f"{name}-work",
                                   settings=_baseline_settings(settings, steps), data_plan=data_plan,
                                   inputs={**job.inputs, **inputs})

    def up_merge() -> str:
        merge_from_recipe(exp, upcycle=merged_cfg.n_experts, out_dir=root / "upcycled-merged", force=True,
                          console=p.console)
        return f"{merged_cfg.n_experts} copies of the seed, top-{merged_cfg.top_k}"

    up_key = _key(p.keys["seed"], merged_cfg.top_k, upcycle)
    outcomes.append(p.stage("baselines:upcycled-merged", up_key, [root / "upcycled-merged"], up_merge, force))
    up_key = _key(up_key, _outputs_key([root / "upcycled-merged"]))
    sub_keys = [up_key]

    for match in matches(exp):
        if match == "compute":
            budget = compute_budget(p)
            dense_steps = _matched_steps(budget, CheckpointReader(seed_dir).cfg, settings)
            up_steps = _matched_steps(budget, moe_cfg, settings)
            plan = None
            inputs = {"compute_budget": budget}
            dense_name, up_name = "dense", "upcycled"
        else:
            plan = btx_data_plan(exp, settings)
            micro = sum(stream.count for phase in plan for stream in phase)
            if micro % settings.grad_accum:
                raise BtxError(f"{exp.path}: BTX trained {micro} micro-batches, which finetune.train.grad_accum "
                               f"{settings.grad_accum} does not divide; the data-matched baselines replay them in "
                               "whole steps (or use eval.match: compute)")
            dense_steps = up_steps = micro // settings.grad_accum
            inputs = {"data_matched_tokens": micro * settings.batch_size * settings.seq_len}
            dense_name, up_name = "dense-data", "upcycled-data"
        plan_key = None if plan is None else [[dataclasses.asdict(x) for x in phase] for phase in plan]
        dense = dense_job(dense_name, dense_steps, inputs, plan)
        key = _key(match, inputs, plan_key, p.keys["seed"], settings, mixture)
        outcomes.append(p.stage(f"baselines:{dense_name}", key, [root / dense_name],
                                lambda job=dense: _train_summary(run_loop(job, console=p.console)), force,
                                repairs_itself=True))
        sub_keys.append(_key(key, _outputs_key([root / dense_name])))
        up = upcycled_job(up_name, up_steps, inputs, plan)
        key = _key(match, inputs, plan_key, up_key, exp.finetune, settings)
        outcomes.append(p.stage(f"baselines:{up_name}", key, [root / up_name],
                                lambda job=up: _train_summary(run_finetune(job, console=p.console)), force,
                                extra_dirs=(root / f"{up_name}-work",), repairs_itself=True))
        sub_keys.append(_key(key, _outputs_key([root / up_name])))

    p.keys["baselines"] = _key(sub_keys)
    ran = [o for o in outcomes if o.state == "ran"]
    summary = "; ".join(f"{o.name.split(':')[1]}: {o.summary}" for o in outcomes[1:])
    if ran:
        p.record("baselines", p.keys["baselines"], summary, time.perf_counter() - t0)
        return StageOutcome("baselines", "ran", time.perf_counter() - t0, summary)
    return StageOutcome("baselines", "skipped", 0.0, summary)
