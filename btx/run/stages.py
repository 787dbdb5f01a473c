"""The stages of `btx run` from prepare to grow, each a plain function of the Pipeline that returns
a StageOutcome. The modules named in btx/run/pipeline.py do the work; a stage computes its key,
decides whether its outputs can be adopted, and records what it did.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path

from btx.errors import BtxError
from btx.io.atomic import write_json_atomic
from btx.io.manifest import DONE_NAME, identity_changes, input_identity, read_done
from btx.run.ledger import (
    Adopt,
    Pipeline,
    StageOutcome,
    _baseline_settings,
    _key,
    _outputs_key,
    _train_summary,
)


def _prepare(p: Pipeline, force: bool) -> StageOutcome:
    from btx.data.recipe import prepare_experiment

    t0 = time.perf_counter()
    p.console.rule("[bold]prepare")
    results = prepare_experiment(p.exp, force=force)
    shas = {d: (r["train"]["sha256"], r["val"]["sha256"]) for d, r in results.items()}
    tokens = sum(r["train"]["tokens"] for r in results.values())
    key = _key(shas, p.exp.recipe.tokenizer)
    p.keys["prepare"] = key
    # Without the domains grow adds: what the seed and the merged experts read. A domain added to a
    # finished experiment (grow.domains) thus changes none of their keys. (With no grow.domains it
    # is the whole key.)
    grown = set(p.exp.grow.domains)
    p.keys["prepare:merged"] = _key({d: v for d, v in shas.items() if d not in grown}, p.exp.recipe.tokenizer)
    skipped = all(r.get("skipped") for r in results.values())
    summary = f"{len(results)} domains, {tokens:,} train tokens"
    if not skipped:
        p.record("prepare", key, summary, time.perf_counter() - t0)
    return StageOutcome("prepare", "skipped" if skipped else "ran", time.perf_counter() - t0, summary)




def _adopt_training(job) -> Adopt:
    """A training job's DONE.json follows from the recipe when it records the trajectory (settings,
    data, the init's config) that the recipe's job has now, and inputs with the content of the
    recipe's inputs now (the seed.path may name another checkpoint than the one it was trained from)."""
    from btx.train.job import trajectory_hash
    from btx.train.loop import current_input_identities

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


def _seed(p: Pipeline, force: bool) -> StageOutcome:
    exp = p.exp
    if exp.seed.path is not None:
        # The content of the given checkpoint (hashed once, then re-read only when it changes):
        # a replaced seed.path changes the key of every stage after it.
        p.keys["seed"] = _key(str(exp.seed.path), input_identity(exp.seed.path)["sha256"])
        return StageOutcome("seed", "off", 0.0, f"given: {exp.seed.path}")
    from btx.train.job import seed_job, trajectory_hash
    from btx.train.loop import run_loop

    job = seed_job(exp)
    reads_grown = any(d in exp.grow.domains for d in job.train_shards)
    key = _key(trajectory_hash(job), p.keys["prepare" if reads_grown else "prepare:merged"])
    return p.stage("seed", key, [job.manifest_dir], lambda: _train_summary(run_loop(job, console=p.console)),
                   force, extra_dirs=(job.work_dir,), adopt=_adopt_training(job), repairs_itself=True)


def _branch(p: Pipeline, force: bool) -> StageOutcome:
    from btx.run.branch import branch
    from btx.run.jobs import expert_state, plan_jobs, wait_for_running
    from btx.train.job import expert_job, trajectory_hash
    from btx.train.loop import discard_damaged_export

    exp = p.exp
    jobs = {d: expert_job(exp, d) for d in exp.domains}
    # Per-expert keys and verdicts: one changed domain recipe retrains that expert only.
    expert_keys = {d: _key(trajectory_hash(j), p.keys["seed"], p.keys["prepare" if d in exp.grow.domains else "prepare:merged"])
                   for d, j in jobs.items()}
    entry = p.ledger.get("branch", {})
    to_run = []
    for d, job in jobs.items():
        recorded = {"key": entry.get("experts", {}).get(d), "outputs": entry.get("outputs", {}).get(d)} \
            if d in entry.get("experts", {}) else {}
        verdict, why = ("stale", "--from branch") if force else p.verdict(expert_keys[d], [job.manifest_dir],
                                                                         _adopt_training(job), recorded)
        if verdict == "foreign":
            raise p.refuse("branch", job.manifest_dir, why)
        if verdict == "adopt":
            p.console.print(f"[yellow]branch: kept expert {d}: {why}, but its {DONE_NAME} records the recipe's "
                            "settings and inputs[/]", soft_wrap=True)
        if verdict in ("fresh", "adopt"):
            continue
        to_run.append(d)
        changed = recorded.get("key") not in (None, expert_keys[d])
        if expert_state(job.work_dir)[0] in ("running", "queued"):
            continue  # its own process owns the directory; branch waits for it below
        if verdict == "damaged" and not changed:
            discard_damaged_export(job, p.console)  # exported again from its final checkpoint
        elif (verdict == "stale" or changed) and job.work_dir.exists():
            p.console.print(f"[yellow]branch: expert {d}: {why or 'inputs changed'}; retraining it[/]", soft_wrap=True)
            shutil.rmtree(job.work_dir)
    if not to_run:
        _note_expert_keys(p, expert_keys, jobs)
        if entry.get("experts") != expert_keys or entry.get("outputs") != _expert_outputs(jobs):
            _record_branch(p, entry.get("summary", ""), 0.0, expert_keys, jobs)
        return StageOutcome("branch", "skipped", 0.0, p.ledger["branch"].get("summary", ""))
    p.console.rule("[bold]branch")
    t0 = time.perf_counter()
    status = branch(p.recipe_path, p.overrides, executor="local", console=p.console)
    if status != 0:
        raise BtxError("branch: some expert jobs failed (see above); fix the cause and re-run `btx run` "
                       "(finished experts are kept)")
    # Experts still running under an earlier, killed `btx run` or `btx branch`: wait for them.
    wait_for_running(plan_jobs(exp, p.recipe_path, p.overrides), p.console)
    dones = {d: read_done(j.manifest_dir) for d, j in jobs.items()}
    unfinished = [d for d, done in dones.items() if done is None]
    if unfinished:
        raise BtxError(f"branch: expert(s) {', '.join(unfinished)} not finished (see `btx status {p.recipe_path}`); "
                       "fix the cause (train.log), then re-run `btx run`")
    summary = ", ".join(f"{d} val {v.get('val_loss') or float('nan'):.3f}" for d, v in dones.items())
    seconds = time.perf_counter() - t0
    _record_branch(p, summary, seconds, expert_keys, jobs)
    _note_expert_keys(p, expert_keys, jobs)
    return StageOutcome("branch", "ran", seconds, summary)


def _expert_outputs(jobs: dict) -> dict[str, str]:
    return {d: _outputs_key([job.manifest_dir]) for d, job in jobs.items()}


def _branch_key(expert_keys: dict[str, str], jobs: dict, domains=None) -> str:
    """The key of the experts of `domains` (default: all), their settings and their outputs: the
    merge reads the merged domains' only, so an expert that grow adds later changes nothing of it."""
    outputs = _expert_outputs(jobs)
    return _key({d: _key(k, outputs[d]) for d, k in expert_keys.items() if domains is None or d in domains})


def _note_expert_keys(p: Pipeline, expert_keys: dict[str, str], jobs: dict) -> None:
    p.keys["branch"] = _branch_key(expert_keys, jobs)
    p.keys["branch:merged"] = _branch_key(expert_keys, jobs, p.exp.merged_domains)
    p.keys["branch:grown"] = _branch_key(expert_keys, jobs, p.exp.grow.domains)


def _record_branch(p: Pipeline, summary: str, seconds: float, expert_keys: dict, jobs: dict) -> None:
    p.record("branch", _key(expert_keys), summary, seconds)
    p.ledger["branch"]["experts"] = expert_keys
    p.ledger["branch"]["outputs"] = _expert_outputs(jobs)
    write_json_atomic(p.ledger_path, p.ledger)


def _merge(p: Pipeline, force: bool) -> StageOutcome:
    from btx.mix.merge import effective_merge_section, merge_from_recipe

    out = p.run_dir / "merged"
    key = _key(effective_merge_section(p.exp.merge), p.keys["branch:merged"], p.keys["seed"])

    def work() -> str:
        done = merge_from_recipe(p.exp, console=p.console)
        return f"{len(done.get('experts', []))} experts ({', '.join(done.get('experts', []))}), top-{p.exp.merge.top_k}"

    return p.stage("merge", key, [out], work, force, adopt=_adopt_merge(p.exp))


def _adopt_merge(exp) -> Adopt:
    """A merge made by `btx merge` follows from the recipe when it records the recipe's merge
    settings for the recipe's seed and experts (their content is compared before, by identity)."""
    from btx.mix.merge import merge_recipe_hash, recipe_merge_options

    wanted = merge_recipe_hash(exp)

    def adopt(dones: list[dict]) -> str | None:
        done = dones[0]
        if done.get("recipe_hash") == wanted and done.get("input_identities") is not None:
            return None
        if done.get("input_identities") is None and done.get("recipe_hash") == wanted:
            return f"its {DONE_NAME} records no input identities (made by an older btx)"
        recipe = dataclasses.asdict(recipe_merge_options(exp.merge, aux_loss_coef=exp.finetune.balance_alpha))
        made = done.get("options") or {}
        differ = [f"{k} {made.get(k)!r} where the recipe has {v!r}" for k, v in recipe.items()
                  if k in made and k != "dtype" and made.get(k) != v]
        return f"made with merge options {'; '.join(differ[:3])}" if differ else \
            "made from other merge settings or inputs than the recipe's"

    return adopt


def _finetune(p: Pipeline, force: bool) -> StageOutcome:
    from btx.train.finetune import WORK_DIR as FINETUNE_WORK_DIR
    from btx.train.finetune import finetune_job, run_finetune

    key = _key(p.exp.finetune, p.exp.finetune_train, p.keys["merge"])
    job = finetune_job(p.exp)
    done_dirs, extra_dirs = [p.run_dir / "finetuned"], [p.run_dir / FINETUNE_WORK_DIR]
    if job.before is not None:  # the router-only phase: its export is the finetune's start
        done_dirs.insert(0, Path(job.before.manifest_dir))
        extra_dirs.append(Path(job.before.work_dir))

    def work() -> str:
        return _train_summary(run_finetune(job, console=p.console))

    return p.stage("finetune", key, done_dirs, work, force, extra_dirs=tuple(extra_dirs),
                   adopt=_adopt_finetune(job), repairs_itself=True)


def _adopt_finetune(job) -> Adopt:
    """A finetune (and its router-only phase) made by `btx finetune` follows from the recipe when
    each job's DONE.json does (`_adopt_training`)."""
    jobs = [job] if job.before is None else [job.before, job]

    def adopt(dones: list[dict]) -> str | None:
        for one, done in zip(jobs, dones[-len(jobs):]):
            reason = _adopt_training(one)([done])
            if reason is not None:
                return reason
        return None

    return adopt


def _grow(p: Pipeline, force: bool) -> StageOutcome:
    """The finetuned MoE grown by the experts of grow.domains (btx.mix.grow), then briefly finetuned."""
    exp, g = p.exp, p.exp.grow
    if not g.domains:
        p.keys["grow"] = "off"
        return StageOutcome("grow", "off", 0.0, "no grow.domains")
    from btx.mix.grow import grow_moe
    from btx.mix.merge import recipe_router_data
    from btx.mix.options import EditOptions
    from btx.train.finetune import finetune_job, run_finetune

    out, tuned = p.run_dir / "grown", p.run_dir / "grown-finetuned"
    m = exp.merge
    fit = (m.router_tokens, m.ridge_lambda, m.router_scale, m.prompts, m.negative_prompts) if g.router_init in ("centroid", "ridge", "hidden") else ()
    key = _key(g, fit, p.keys["finetune"], p.keys["branch:grown"])

    def work() -> str:
        names = [*exp.merged_domains, *(["seed"] if m.keep_seed else []), *g.domains]
        options = EditOptions.from_sections(g, m, names)
        data = {"centroid": list(g.domains), "ridge": list(exp.domains)}.get(g.router_init, [])
        done = grow_moe(p.run_dir / "finetuned", out, add={d: exp.expert_dir(d) / "final" for d in g.domains},
                        options=options, force=True, router_data=recipe_router_data(exp, data),
                        console=p.console)
        summary = f"+{', '.join(g.domains)}: {done['n_experts']} experts, {g.router_init} routers"
        if g.steps:
            job = finetune_job(exp, model_dir=out, out_dir=tuned)
            mixture = {d: float(w) for d, w in (dict(g.mixture) or dict.fromkeys(exp.domains, 1.0)).items() if w > 0}
            job = dataclasses.replace(
                job, name="grow-finetune", settings=_baseline_settings(exp.finetune_train, g.steps), mixture=mixture,
                train_shards={d: exp.data_dir(d) / "train.json" for d in mixture},
                engine_settings={**job.engine_settings, "trainable": g.trainable},
            )
            summary += f"; finetuned {g.steps} steps ({g.trainable}): {_train_summary(run_finetune(job, console=p.console))}"
        return summary

    dirs = [out, tuned] if g.steps else [out]
    return p.stage("grow", key, dirs, work, force, extra_dirs=(tuned.with_name(tuned.name + "-train"),),
                   repairs_itself=True)
