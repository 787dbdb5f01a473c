"""The work of the stages of `btx run` from prepare to grow: each a function of the Pipeline and
the driver's Task that returns a one-line summary, and the hooks STAGES (btx/run/pipeline.py)
declares them with: what outputs made outside this run may be adopted, which parts a stage reads.
The modules named in btx/run/pipeline.py do the work; btx/run/stage.py keys, decides and records.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Optional

from btx.data.shards import load_shard
from btx.errors import BtxError
from btx.io.manifest import DONE_NAME, identity_changes, input_identity, read_done
from btx.mix.grow import grow_moe
from btx.mix.merge import (
    merge_from_recipe,
    merge_recipe_hash,
    recipe_merge_options,
    recipe_router_data,
)
from btx.mix.options import EditOptions
from btx.run.branch import branch
from btx.run.jobs import expert_state, plan_jobs, wait_for_running
from btx.run.ledger import Adopt, Pipeline, StageOutcome, key_of
from btx.run.prepare import prepare_experiment
from btx.run.stage import Stage, Task, content, note, parts_of, stage_key
from btx.train.finetune import finetune_job, run_finetune
from btx.train.job import TrainJob, expert_job, sections_hash, seed_job, trajectory_hash
from btx.train.loop import current_input_identities, discard_damaged_export, run_loop


def train_summary(done: dict) -> str:
    return f"{done['steps']} steps, {done['tokens']:,} tokens, val loss {done.get('val_loss') or float('nan'):.3f}"


def short_settings(settings, steps: int):
    """The finetune's optimisation for `steps` steps; validation only at the end (eval then scores
    every model on the same windows anyway): the baselines' and the grown MoE's finetune."""
    return dataclasses.replace(settings, steps=steps, eval_every=steps)


# -- prepare -------------------------------------------------------------------------------------


def prepare(p: Pipeline, task: Task) -> dict[str, dict]:
    return prepare_experiment(p.exp, force=task.force)


def shard_content(exp, domain: Optional[str]) -> str:
    """A prepared domain's identity: the sha256 of its shards, as their sidecars record them."""
    return key_of([load_shard(exp.paths.shard(domain, split)).meta["sha256"] for split in ("train", "val")])


def drive_prepare(p: Pipeline, stage: Stage, force: bool) -> StageOutcome:
    """Prepare runs every time: btx.data.prepare skips a domain whose shards match their sources,
    tokenizer and options (and prepares a damaged one again), so it is the judge of its own work."""
    t0 = time.perf_counter()
    p.console.rule("[bold]prepare")
    results = stage.run(p, Task(force=force))
    note(p, stage, {d: content(p.exp, stage, d) for d in parts_of(p.exp, stage)})
    summary = f"{len(results)} domains, {sum(r['train']['tokens'] for r in results.values()):,} train tokens"
    if all(r.get("skipped") for r in results.values()):
        return StageOutcome("prepare", "skipped", time.perf_counter() - t0, summary)
    keys = {d: stage_key(p, stage, d) for d in parts_of(p.exp, stage)}
    p.record("prepare", key_of(keys), summary, time.perf_counter() - t0, parts=keys)
    return StageOutcome("prepare", "ran", time.perf_counter() - t0, summary)


# -- training jobs -------------------------------------------------------------------------------


def adopt_training(job: TrainJob) -> Adopt:
    """A training job's DONE.json follows from the recipe when it records the trajectory (settings,
    data, the init's config) that the recipe's job has now, and inputs with the content of the
    recipe's inputs now (the seed.path may name another checkpoint than the one it was trained from)."""

    def adopt(dones: list[dict]) -> str | None:
        done = dones[0]
        if done.get("trajectory_hash") != trajectory_hash(job):
            return f"its {DONE_NAME} records other training settings or data than the recipe's job '{job.name}'"
        recorded = done.get("input_identities")
        if recorded is None:
            return f"its {DONE_NAME} records no input identities (made by an older btx)"
        changes = identity_changes(recorded, current_input_identities(job))
        return changes[0] if changes else None

    return adopt


def adopt_jobs(jobs: list[TrainJob]) -> Adopt:
    """Jobs that run one after the other (a finetune after its router-only phase) follow from the
    recipe when each job's DONE.json does (`adopt_training`)."""

    def adopt(dones: list[dict]) -> str | None:
        for job, done in zip(jobs, dones[-len(jobs) :], strict=True):
            reason = adopt_training(job)([done])
            if reason is not None:
                return reason
        return None

    return adopt


def given_seed(exp) -> tuple[str, str] | None:
    """A recipe's seed.path: nothing to train; its identity is the content of the checkpoint
    (hashed once, then re-read only when it changes), so a replaced one redoes all after it."""
    if exp.seed.path is None:
        return None
    return f"given: {exp.seed.path}", key_of(str(exp.seed.path), input_identity(exp.seed.path)["sha256"])


def train_seed(p: Pipeline, task: Task) -> str:
    return train_summary(run_loop(seed_job(p.exp), console=p.console))


def expert_busy(exp, domain: str) -> bool:
    """An expert still running or queued under an earlier, killed `btx run` or `btx branch`."""
    return expert_state(exp.paths.expert(domain))[0] in ("running", "queued")


def train_experts(p: Pipeline, task: Task) -> str:
    """The experts of `task.parts` (and any still running), with branch's local executor."""
    exp = p.exp
    for domain in task.parts:  # a damaged export is made again from the expert's final checkpoint
        discard_damaged_export(expert_job(exp, domain), p.console)
    status = branch(p.recipe_path, p.overrides, executor="local", console=p.console)
    if status != 0:
        raise BtxError(
            "branch: some expert jobs failed (see above); fix the cause and re-run `btx run` "
            "(finished experts are kept)"
        )
    wait_for_running(plan_jobs(exp, p.recipe_path, p.overrides), p.console)
    dones = {d: read_done(exp.paths.expert(d)) for d in exp.domains}
    unfinished = [d for d, done in dones.items() if done is None]
    if unfinished:
        raise BtxError(
            f"branch: expert(s) {', '.join(unfinished)} not finished (see `btx status {p.recipe_path}`); "
            "fix the cause (train.log), then re-run `btx run`"
        )
    return ", ".join(f"{d} val {v.get('val_loss') or float('nan'):.3f}" for d, v in dones.items())


def finetune_outputs(exp, part=None) -> list:
    """The finetune's export, after its router-only phase's (which the finetune starts from)."""
    dirs = exp.paths.finetune
    return [dirs.router, dirs.export] if exp.finetune.router_only_steps else [dirs.export]


def finetune_scratch(exp, part=None) -> list:
    dirs = exp.paths.finetune
    return [dirs.train, dirs.router_train] if exp.finetune.router_only_steps else [dirs.train]


def adopt_finetune(exp, part=None) -> Adopt:
    job = finetune_job(exp)
    return adopt_jobs([job] if job.before is None else [job.before, job])


def finetune(p: Pipeline, task: Task) -> str:
    return train_summary(run_finetune(finetune_job(p.exp), console=p.console))


# -- merge and grow ------------------------------------------------------------------------------


def merge(p: Pipeline, task: Task) -> str:
    done = merge_from_recipe(p.exp, console=p.console)
    return f"{len(done.get('experts', []))} experts ({', '.join(done.get('experts', []))}), top-{p.exp.merge.top_k}"


def adopt_merge(exp, part=None) -> Adopt:
    """A merge made by `btx merge` follows from the recipe when it records the recipe's merge
    settings for the recipe's seed and experts (their content is compared before, by identity)."""
    wanted = merge_recipe_hash(exp)

    def adopt(dones: list[dict]) -> str | None:
        done = dones[0]
        if done.get("recipe_hash") == wanted and done.get("input_identities") is not None:
            return None
        if done.get("input_identities") is None and done.get("recipe_hash") == wanted:
            return f"its {DONE_NAME} records no input identities (made by an older btx)"
        recipe = dataclasses.asdict(recipe_merge_options(exp.merge, aux_loss_coef=exp.finetune.balance_alpha))
        made = done.get("options") or {}
        differ = [
            f"{k} {made.get(k)!r} where the recipe has {v!r}"
            for k, v in recipe.items()
            if k in made and k != "dtype" and made.get(k) != v
        ]
        return (
            f"made with merge options {'; '.join(differ[:3])}"
            if differ
            else "made from other merge settings or inputs than the recipe's"
        )

    return adopt


def grow_off(exp) -> tuple[str, str] | None:
    return None if exp.grow.domains else ("no grow.domains", "off")


def grow_dirs(exp, part=None) -> list:
    return [exp.paths.grown, exp.paths.grow_finetune.export] if exp.grow.steps else [exp.paths.grown]


def grow_scratch(exp, part=None) -> list:
    dirs = exp.paths.grow_finetune
    return [dirs.train, dirs.router, dirs.router_train]


def grow_prompts(exp, field: str) -> dict:
    """merge.prompts (or negative_prompts) as a grow reads them: only a hidden init does, for the
    experts of the grown MoE."""
    return getattr(grow_options(exp), field)


def grow_options(exp) -> EditOptions:
    """The grow's edit options: grow: and the merge: keys a grow shares (EditOptions.from_sections)."""
    names = [*exp.merged_domains, *(["seed"] if exp.merge.keep_seed else []), *exp.grow.domains]
    return EditOptions.from_sections(exp.grow, exp.merge, names)


def grow_finetune_job(exp):
    """The short finetune of the grown MoE: grow.steps steps of grow.trainable on grow.mixture.
    finetune.trainable and finetune.router_only_steps are the main finetune's and do not apply:
    the grown MoE trains what grow.trainable says from its first step (its default, router_only, is
    itself a router-only phase), so it has no router-only phase of its own (docs/GROW.md)."""
    g, rd = exp.grow, exp.paths
    out = rd.grow_finetune.export
    job = finetune_job(exp, model_dir=rd.grown, out_dir=out, trainable=g.trainable, router_only_steps=0)
    mixture = {d: float(w) for d, w in (dict(g.mixture) or dict.fromkeys(exp.domains, 1.0)).items() if w > 0}
    return dataclasses.replace(
        job,
        name="grow-finetune",
        stage="grow",
        settings=short_settings(exp.finetune_train, g.steps),
        mixture=mixture,
        train_shards={d: rd.shard(d, "train") for d in mixture},
        # the grow's own settings key its job too, not only the finetune: section's
        recipe_hash=sections_hash({"finetune": job.recipe_hash, "grow": g}),
    )


def grow(p: Pipeline, task: Task) -> str:
    """The finetuned MoE grown by the experts of grow.domains (btx.mix.grow), then briefly finetuned."""
    exp, g, rd = p.exp, p.exp.grow, p.exp.paths
    data = {"centroid": list(g.domains), "ridge": list(exp.domains)}.get(g.router_init, [])
    done = grow_moe(
        rd.finetuned,
        rd.grown,
        add={d: rd.expert_final(d) for d in g.domains},
        options=grow_options(exp),
        force=True,
        router_data=recipe_router_data(exp, data),
        console=p.console,
    )
    summary = f"+{', '.join(g.domains)}: {done['n_experts']} experts, {g.router_init} routers"
    if not g.steps:
        return summary
    done = run_finetune(grow_finetune_job(exp), console=p.console)
    return summary + f"; finetuned {g.steps} steps ({g.trainable}): {train_summary(done)}"
