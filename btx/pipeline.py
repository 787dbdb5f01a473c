"""`btx run`: the whole Branch-Train-MiX workflow from one recipe, resumable and incremental.

Stages, in order (each a plain function of the experiment; the modules do the work):

    prepare    domain text -> token shards                       btx.prepare
    seed       the dense seed, when the recipe trains one         btx.train (seed_job)
    branch     one expert per domain from the seed               btx.branch (local executor)
    merge      seed + experts -> MoE (the family's form)          btx.merge
    finetune   the MoE on the domain mixture                      btx.finetune
    grow       the finetuned MoE + the experts of grow.domains     btx.grow (then a short finetune)
    baselines  dense and sparse-upcycling runs, compute-matched   btx.train / btx.merge / btx.finetune
    eval       per-domain validation loss of every model + BTM    btx.evaluate
    analyze    routing analysis of the finetuned MoE              btx.routing

Skipping and redoing (docs/PROVENANCE.md). The ledger `<run_dir>/pipeline.json` records, per
stage, a key and the identity of the outputs it left. The key hashes the recipe sections the stage
reads and the *content* of the stages it consumes (their DONE.json output hashes), so a replaced
input changes the key of every stage after it. A stage is skipped only when all of these hold:
its DONE.json files exist, its files still have the sha256 they record, the inputs they record
are still what is on disk (`btx.manifest.changed_inputs`), its key is unchanged and its outputs
are the ones this run left. Otherwise:
- damaged (a file edited, truncated or deleted): redone; a training stage is only exported again
  from its final checkpoint;
- stale (its recipe sections or inputs changed): its outputs are removed and it runs again, and
  so does everything downstream;
- made outside this run (by a stage command) from the same settings and inputs: kept (adopted);
  from other settings: refused with one line naming it, so that `btx run` never removes a result
  it did not make, nor builds on one that does not follow from the recipe.
Work inside a stage is itself resumable (training checkpoints, finished experts), so Ctrl-C or a
crash is resumed by running the same command again. One `btx run` per run directory at a time:
a second stops with one line naming the first (`btx.manifest.output_lock`).

Baselines (`eval.baselines`), matched on what `eval.match` says, each training all its parameters
whatever BTX's finetune freezes (finetune.trainable, router_only_steps are BTX's alone):
- compute (default): the dense baseline continues the seed on the finetune mixture, and the
  sparse-upcycling baseline finetunes an MoE made of seed copies, each for as many steps as make
  its training FLOPs equal the experts' plus the BTX finetune's (the FLOPs recorded in their
  DONE.json manifests; btx.flops counts frozen weights without their weight gradients);
- data (the paper's Table 2): both see exactly the batches BTX trained on after the seed, one step
  per BTX step: every expert's batches (the domains interleaved evenly, so the dense model sees
  the experts' union as one mixed stream rather than one domain after another), then the
  finetune's, router-only phase included (`btx_data_plan`). The upcycled MoE costs more FLOPs
  per token than a dense expert, so it gets more compute than BTX here; BTM has no finetune.
- both: the four rows. Each baseline is its own ledger entry, so adding a protocol trains only its runs.

`btx eval RECIPE` (`eval_recipe`) lives here, beside `eval_rows`: btx.evaluate scores checkpoints
and draws tables and knows nothing of runs, so nothing imports back.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from rich.console import Console
from rich.table import Table

from btx.errors import BtxError
from btx.manifest import (DONE_NAME, changed_inputs, damaged_outputs, hash_dir, identity_changes, input_identity,
                          output_lock, read_done, write_json_atomic)

STAGES = ("prepare", "seed", "branch", "merge", "finetune", "grow", "baselines", "eval", "analyze")
LEDGER = "pipeline.json"


def _key(*parts) -> str:
    from btx.recipe import to_plain

    blob = json.dumps([to_plain(p) if not isinstance(p, (str, int, float, type(None))) else p for p in parts],
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _outputs_key(directories: list[Path]) -> str:
    """Identity of finished outputs: the sha256 of their files as their DONE.json list them."""
    return _key([(read_done(d) or {}).get("outputs") for d in directories])


Adopt = Callable[[list[dict]], "str | None"]  # DONE.json dicts -> why they do not follow from the recipe, or None


@dataclass
class StageOutcome:
    name: str
    state: str  # ran | skipped | off
    seconds: float = 0.0
    summary: str = ""


class Pipeline:
    def __init__(self, exp, recipe_path: Path, overrides: list[str], console: Console):
        self.exp, self.recipe_path, self.overrides, self.console = exp, recipe_path, overrides, console
        self.run_dir: Path = exp.run_dir
        self.ledger_path = self.run_dir / LEDGER
        self.ledger: dict = json.loads(self.ledger_path.read_text()) if self.ledger_path.is_file() else {}
        self.keys: dict[str, str] = {}

    # -- the ledger -----------------------------------------------------------------------------

    def verdict(self, key: str, done_dirs: list[Path], adopt: Adopt | None, entry: dict) -> tuple[str, str]:
        """What to do with a stage (or one expert) whose ledger entry is `entry`:
        fresh | adopt (kept, made outside this run from the same settings) | missing | damaged |
        stale (redo) | foreign (made outside this run from other settings: refuse), and why."""
        dones = [read_done(p) for p in done_dirs]
        if any(done is None for done in dones):
            return "missing", ""
        for path in done_dirs:
            problems = damaged_outputs(path)
            if problems:
                return "damaged", problems[0]
        made_here = bool(entry) and entry.get("outputs") in (None, _outputs_key(done_dirs))
        changed = [c for path, done in zip(done_dirs, dones) for c in changed_inputs(done.get("input_identities"), path)]
        if changed:
            return ("stale" if made_here or adopt is None else "foreign"), changed[0]
        if entry.get("key") == key and made_here:
            return "fresh", ""
        if not entry:
            why = "this run's ledger has no record of it (made by a stage command, or by a btx run killed before it noted it)"
        elif entry.get("key") != key:
            why = "its recipe sections or inputs changed"
        else:
            why = "replaced since this run made it"
        reason = adopt(dones) if adopt is not None else why
        if reason is None:
            return "adopt", why
        return ("stale", why) if made_here or adopt is None else ("foreign", reason)

    def refuse(self, stage: str, path: Path, reason: str) -> BtxError:
        return BtxError(f"{path}: not made by this btx run, and it does not follow from the recipe as given "
                        f"({reason}); give btx run the settings it was made with to go on from it, or run "
                        f"`btx run {self.recipe_path} --from {stage}` to redo it from the recipe (or move it away)")

    def clear(self, name: str, verdict: str, why: str, done_dirs: list[Path], extra_dirs, *, changed: bool,
              repairs_itself: bool) -> None:
        """Remove what must not survive a redo: everything of a stale stage (also an unfinished one
        whose key changed: its checkpoints are of other settings); the outputs of a damaged one,
        unless its work exports them again by itself from its checkpoints."""
        if verdict == "stale" or (changed and verdict in ("missing", "damaged")):
            remove = [*done_dirs, *extra_dirs]
        elif verdict == "damaged" and not repairs_itself:
            remove = list(done_dirs)
        else:
            remove = []  # a damaged training stage: its job says so and exports it again
        for path in remove:
            if path.exists():
                self.console.print(f"[yellow]{name}: redoing {path}: {why or 'its inputs changed'}[/]", soft_wrap=True)
                shutil.rmtree(path)

    def record(self, stage: str, key: str, summary: str, seconds: float, outputs: str | None = None) -> None:
        self.ledger[stage] = {"key": key, "summary": summary, "seconds": round(seconds, 2), "outputs": outputs,
                              "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        self.run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.ledger_path, self.ledger)

    def stage(self, name: str, key: str, done_dirs: list[Path], work: Callable[[], str], force: bool,
              extra_dirs: tuple[Path, ...] = (), adopt: Adopt | None = None,
              repairs_itself: bool = False) -> StageOutcome:
        """Run `work` unless the stage is fresh (see the module docstring). `done_dirs` hold its
        DONE.json manifests; they and `extra_dirs` (work directories: checkpoints, logs) are
        removed when it is stale. `adopt` tells whether outputs made outside this run follow from
        the recipe; `repairs_itself`: `work` exports a damaged output again by itself (training)."""
        outputs = [*done_dirs, *extra_dirs]
        entry = self.ledger.get(name, {})
        if force:
            self.ledger.pop(name, None)
            for path in outputs:
                if path.exists():
                    shutil.rmtree(path)
        else:
            verdict, why = self.verdict(key, done_dirs, adopt, entry)
            if verdict == "fresh":
                self.keys[name] = _key(key, _outputs_key(done_dirs))
                return StageOutcome(name, "skipped", 0.0, entry.get("summary", ""))
            if verdict == "adopt":
                summary = f"kept {', '.join(str(p.relative_to(self.run_dir)) for p in done_dirs)}"
                self.console.print(f"[yellow]{name}: {summary}: {why}, but its {DONE_NAME} records the recipe's "
                                   "settings and inputs[/]", soft_wrap=True)
                self.record(name, key, summary, 0.0, _outputs_key(done_dirs))
                self.keys[name] = _key(key, _outputs_key(done_dirs))
                return StageOutcome(name, "skipped", 0.0, summary)
            if verdict == "foreign":
                raise self.refuse(name, next(p for p in done_dirs if p.exists()), why)
            self.clear(name, verdict, why, done_dirs, extra_dirs, changed=entry.get("key") not in (None, key),
                       repairs_itself=repairs_itself)
        self.console.rule(f"[bold]{name}")
        t0 = time.perf_counter()
        summary = work()
        seconds = time.perf_counter() - t0
        self.record(name, key, summary, seconds, _outputs_key(done_dirs))
        self.keys[name] = _key(key, _outputs_key(done_dirs))
        return StageOutcome(name, "ran", seconds, summary)


# ----------------------------------------------------------------------------------------------
# The stages
# ----------------------------------------------------------------------------------------------


def _prepare(p: Pipeline, force: bool) -> StageOutcome:
    from btx.prepare import prepare_experiment

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


def _train_summary(done: dict) -> str:
    return f"{done['steps']} steps, {done['tokens']:,} tokens, val loss {done.get('val_loss') or float('nan'):.3f}"


def _adopt_training(job) -> Adopt:
    """A training job's DONE.json follows from the recipe when it records the trajectory (settings,
    data, the init's config) that the recipe's job has now, and inputs with the content of the
    recipe's inputs now (the seed.path may name another checkpoint than the one it was trained from)."""
    from btx.train import current_input_identities, trajectory_hash

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
    from btx.train import run_loop, seed_job, trajectory_hash

    job = seed_job(exp)
    reads_grown = any(d in exp.grow.domains for d in job.train_shards)
    key = _key(trajectory_hash(job), p.keys["prepare" if reads_grown else "prepare:merged"])
    return p.stage("seed", key, [job.manifest_dir], lambda: _train_summary(run_loop(job, console=p.console)),
                   force, extra_dirs=(job.work_dir,), adopt=_adopt_training(job), repairs_itself=True)


def _branch(p: Pipeline, force: bool) -> StageOutcome:
    from btx.branch import branch, expert_state, plan_jobs, wait_for_running
    from btx.train import discard_damaged_export, expert_job, trajectory_hash

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
    from btx.merge import effective_merge_section, merge_from_recipe

    out = p.run_dir / "merged"
    key = _key(effective_merge_section(p.exp.merge), p.keys["branch:merged"], p.keys["seed"])

    def work() -> str:
        done = merge_from_recipe(p.exp, console=p.console)
        return f"{len(done.get('experts', []))} experts ({', '.join(done.get('experts', []))}), top-{p.exp.merge.top_k}"

    return p.stage("merge", key, [out], work, force, adopt=_adopt_merge(p.exp))


def _adopt_merge(exp) -> Adopt:
    """A merge made by `btx merge` follows from the recipe when it records the recipe's merge
    settings for the recipe's seed and experts (their content is compared before, by identity)."""
    from btx.merge import merge_recipe_hash, recipe_merge_options

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
    from btx.finetune import WORK_DIR as FINETUNE_WORK_DIR
    from btx.finetune import finetune_job, run_finetune

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
    """The finetuned MoE grown by the experts of grow.domains (btx.grow), then briefly finetuned."""
    exp, g = p.exp, p.exp.grow
    if not g.domains:
        p.keys["grow"] = "off"
        return StageOutcome("grow", "off", 0.0, "no grow.domains")
    from btx.finetune import finetune_job, run_finetune
    from btx.grow import EditOptions, edit_moe
    from btx.merge import recipe_router_data

    out, tuned = p.run_dir / "grown", p.run_dir / "grown-finetuned"
    m = exp.merge
    fit = (m.centroid_tokens, m.ridge_lambda, m.router_scale, m.prompts, m.negative_prompts) if g.router_init in ("centroid", "ridge", "hidden") else ()
    key = _key(g, fit, p.keys["finetune"], p.keys["branch:grown"])

    def work() -> str:
        from btx.recipe import to_plain

        names = [*exp.merged_domains, *(["seed"] if m.keep_seed else []), *g.domains]
        hidden = g.router_init == "hidden"
        options = EditOptions(
            router_init=g.router_init, shared=g.shared, shared_weight=g.shared_weight, router_tokens=m.centroid_tokens,
            ridge_lambda=m.ridge_lambda, router_scale=m.router_scale,
            # the recipe keeps prompts for every use; only a hidden init reads them
            prompts={k: list(v) for k, v in to_plain(m.prompts).items() if k in names} if hidden else {},
            negative_prompts={k: list(v) for k, v in to_plain(m.negative_prompts).items() if k in names} if hidden else {},
        )  # fmt: skip
        data = {"centroid": list(g.domains), "ridge": list(exp.domains)}.get(g.router_init, [])
        done = edit_moe(p.run_dir / "finetuned", out, add={d: exp.expert_dir(d) / "final" for d in g.domains},
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


def compute_budget(p: Pipeline) -> float:
    """Training FLOPs of BTX beyond the seed: every expert plus the MoE finetune."""
    exp = p.exp
    experts = sum(read_done(exp.expert_dir(d))["train_flops"] for d in exp.merged_domains)
    return experts + read_done(p.run_dir / "finetuned")["train_flops"]


def _matched_steps(budget: float, cfg, settings) -> int:
    """Steps of a baseline that trains all of `cfg` (btx.flops) within one step of `budget` FLOPs."""
    from btx.flops import train_flops_per_token

    flops_per_step = train_flops_per_token(cfg, settings.seq_len) * settings.batch_size * settings.seq_len * \
        settings.grad_accum
    return max(1, round(budget / flops_per_step))


def btx_data_plan(exp, settings) -> list[list]:
    """The batches BTX trained on after the seed, for the data-matched baselines (btx.data.PlannedSampler):
    first every expert's batches, the domains interleaved evenly (the union of the experts' data,
    in a mixed order, as one dense run sees its data), then the finetune's (its router-only phase's
    included), in order. A batch is the same batch only at the same global batch size and seq_len,
    so every expert and the finetune must have trained at the baselines' (`settings`)."""
    from btx.data import DataStream
    from btx.finetune import finetune_job, finetune_stream
    from btx.train import expert_job

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


def _baseline_settings(settings, steps: int):
    """The finetune's optimisation for `steps` steps; validation only at the end (eval then scores
    every model on the same windows anyway)."""
    return dataclasses.replace(settings, steps=steps, eval_every=steps)


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
    from btx import hf
    from btx.finetune import finetune_job, run_finetune
    from btx.merge import merge_from_recipe, recipe_merge_options
    from btx.train import TrainJob, run_loop

    t0 = time.perf_counter()
    root = p.run_dir / "baselines"
    seed_dir = exp.seed_dir
    settings = exp.finetune_train
    mixture = dict(exp.finetune.mixture) or {d: 1.0 for d in exp.merged_domains}
    # Of the merge, the baselines use its shape (the upcycled MoE copies its expert count and top-k)
    # and the options an upcycle takes from the merge section: other routers do not redo them.
    merged_cfg = hf.CheckpointReader(p.run_dir / "merged").cfg
    upcycle = dataclasses.asdict(recipe_merge_options(exp.merge, merged_cfg.n_experts, exp.finetune.balance_alpha))
    for unused in ("centroid_tokens", "centroid_device", "ridge_lambda", "router_scale", "prompts", "negative_prompts"):
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
            dense_steps = _matched_steps(budget, hf.CheckpointReader(seed_dir).cfg, settings)
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
    from btx.finetune import ROUTER_PHASE

    run_dir, base = exp.run_dir, exp.run_dir / "baselines"
    models = [RunModel("seed", exp.seed_dir, run_dir / "seed" if exp.seed.path is None else None, "the dense seed")]
    models += [RunModel(f"expert:{d}", exp.expert_dir(d) / "final", exp.expert_dir(d), f"{d} expert alone")
               for d in exp.domains]
    notes = {"dense": "the seed trained further", "upcycled": "seed copies as experts + MoE finetune"}
    for kind, note in notes.items():
        for match in matches(exp):
            directory = next(d for d in BASELINES[match] if d.startswith(kind))
            path = base / directory / "final" if kind == "dense" else base / directory
            models.append(RunModel(BASELINES[match][directory], path, base / directory, note))
    models.append(RunModel("BTX merged (no finetune)", run_dir / "merged", run_dir / "merged", "MiX only"))
    if exp.finetune.router_only_steps:
        models.append(RunModel(f"BTX router-only ({exp.finetune.router_only_steps} steps)", run_dir / ROUTER_PHASE,
                               run_dir / ROUTER_PHASE, "merged + the router-only phase"))
    models.append(RunModel("BTX", run_dir / "finetuned", run_dir / "finetuned", "merged + MoE finetune"))
    if exp.grow.domains:
        added = "+" + ", ".join(exp.grow.domains)
        models.append(RunModel("BTX grown (no finetune)", run_dir / "grown", run_dir / "grown", f"BTX {added} experts"))
        if exp.grow.steps:
            models.append(RunModel("BTX grown", run_dir / "grown-finetuned", run_dir / "grown-finetuned",
                                   f"BTX {added}, then {exp.grow.steps} finetune steps"))
    return models


def model_stage_dirs(exp) -> list[Path]:
    """The directories whose DONE.json describe the run's models (the seed when the run trains it)."""
    dirs = [m.done_dir for m in run_models(exp) if m.done_dir is not None]
    return dirs + [exp.run_dir / "baselines" / "upcycled-merged"] if exp.eval.baselines else dirs


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
    from btx.data import load_shard
    from btx.manifest import identity, relative_identities

    identities = {str(m.path.relative_to(exp.run_dir)) if m.path.is_relative_to(exp.run_dir) else "seed":
                  input_identity(m.path) for m in run_models(exp) if (m.path / "config.json").is_file()}
    for d in exp.domains:
        identities[f"val:{d}"] = identity(load_shard(exp.data_dir(d) / "val.json", verify=True).path)
    return relative_identities(identities, out)


def _row_flops(exp, model: RunModel) -> float | None:
    """Training FLOPs beyond the seed: a model's own, plus the experts' for the MoEs made of them."""
    if model.name == "seed":
        return 0.0
    done = read_done(model.done_dir) or {}

    def flops(path: Path) -> float:
        return (read_done(path) or {}).get("train_flops", 0.0)

    if model.name.startswith("BTX grown"):  # BTX, the added experts, and the finetune after growing
        finetuned = _row_flops(exp, RunModel("BTX", exp.run_dir / "finetuned", exp.run_dir / "finetuned", ""))
        tuned = flops(model.done_dir) if model.name == "BTX grown" else 0.0
        return finetuned + sum(flops(exp.expert_dir(d)) for d in exp.grow.domains) + tuned
    experts = sum(flops(exp.expert_dir(d)) for d in exp.merged_domains)
    if model.name.startswith("BTX"):
        return experts + done.get("train_flops", 0.0) if done.get("stage") == "train" else experts
    return done.get("train_flops")


def eval_rows(exp, console: Console):
    """Every model of the run that exists, scored on the same validation windows, and the BTM rows
    of its experts (domain posterior; top-1 and top-2 by tf-idf against each domain's train data)."""
    import torch
    from rich.progress import Progress

    from btx import hf
    from btx.data import load_shard
    from btx.evaluate import TfidfRouter, btm_rows, row_from_logprobs, shard_sample, window_logprobs

    settings = exp.eval
    seq_len = settings.seq_len or exp.train.seq_len
    shards = {d: load_shard(exp.data_dir(d) / "val.json") for d in exp.domains}
    present = [m for m in run_models(exp) if (m.path / "config.json").is_file()]
    n_batches = len(exp.domains) * settings.batches * len(present)
    rows = []
    experts: list[tuple[str, dict, int, float | None]] = []  # (domain, logprobs, active params, flops)
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("eval", total=n_batches)
        for m in present:
            model = hf.load_model(m.path, dtype=torch.float32)
            lps = {d: window_logprobs(model, shard, seq_len, settings.batch_size, settings.batches,
                                      lambda: bar.advance(task)) for d, shard in shards.items()}
            active, flops = model.cfg.param_counts()["active"], _row_flops(exp, m)
            rows.append(row_from_logprobs(m.name, lps, flops, active, m.note))
            if m.name.startswith("expert:"):
                experts.append((m.name.split(":", 1)[1], lps, active, flops))
            del model
    if experts:
        train = [exp.data_dir(d) / "train.json" for d, *_ in experts]
        router = None
        if len(experts) >= 2 and all(path.is_file() for path in train):
            router = TfidfRouter([shard_sample(load_shard(path), settings.btm_tfidf_tokens) for path in train],
                                 min(hf.CheckpointReader(exp.expert_dir(d) / "final").cfg.vocab_size
                                     for d, *_ in experts))
        btm = btm_rows([lps for _, lps, _, _ in experts], [f for *_, f in experts], [a for _, _, a, _ in experts],
                       f"the {len(experts)} experts", router=router, shards=shards, seq_len=seq_len,
                       batch_size=settings.batch_size, batches=settings.batches,
                       expert_names=[d for d, *_ in experts])
        at = max(i for i, r in enumerate(rows) if r.name.startswith("expert:")) + 1
        rows[at:at] = btm
    return rows


def eval_recipe(exp, *, out: Path | None = None, console: Console | None = None, force: bool = False):
    """`btx eval RECIPE`: every model of the run that exists (`eval_rows`), shown and written to
    <run_dir>/eval/ (eval.md, eval.json, the plot, DONE.json). A model that no longer follows from
    its inputs (a finetune of an earlier merge, a damaged file) is refused unless `force`."""
    from rich.markup import escape

    from btx.evaluate import render, write_outputs, written

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
    settings = eval_settings(exp)
    write_outputs(rows, domains, out, {**settings, "input_identities": identities}, {"settings": settings},
                  console=console)
    console.print(escape(f"wrote {out}/ ({written(out)})"), soft_wrap=True)
    return rows


def eval_settings(exp) -> dict:
    return {"recipe": str(exp.path), "overrides": list(exp.overrides), "batches": exp.eval.batches,
            "batch_size": exp.eval.batch_size, "seq_len": exp.eval.seq_len or exp.train.seq_len,
            "match": exp.eval.match, "btm_tfidf_tokens": exp.eval.btm_tfidf_tokens}


def eval_recipe_command(args) -> int:
    """`btx eval RECIPE [KEY=VALUE ...]` (arguments: btx.cli; checkpoints: btx.evaluate)."""
    from btx.evaluate import check_out_dir
    from btx.recipe import load_experiment

    rest = list(args.overrides or [])
    for flag, value in (("--data", args.data), ("--btm", args.btm), ("--names", args.names)):
        if value:
            raise BtxError(f"eval: {flag} is for checkpoints; a RECIPE brings its own models and validation shards")
    for key, value in (("batches", args.batches), ("batch_size", args.batch_size), ("seq_len", args.seq_len)):
        if value is not None:  # --batches N is shorthand for eval.batches=N
            rest.append(f"eval.{key}={value}")
    if args.device not in (None, "cpu") or args.dtype != "auto":
        raise BtxError("eval: --device/--dtype are for checkpoints; a RECIPE is evaluated in fp32 on the CPU")
    exp = load_experiment(args.target, rest)
    if args.out:
        check_out_dir(Path(args.out))
    eval_recipe(exp, out=Path(args.out) if args.out else None, force=args.force)
    return 0


def _eval(p: Pipeline, force: bool) -> StageOutcome:
    from btx.evaluate import render, save

    exp = p.exp
    out = p.run_dir / "eval"
    key = _key(exp.eval, p.keys["finetune"], p.keys["grow"], p.keys["baselines"], p.keys["branch"])

    def work() -> str:
        from btx.manifest import atomic_dir, write_done

        identities = eval_input_identities(exp, out)
        rows = eval_rows(exp, p.console)
        domains = list(exp.domains)
        render(rows, domains, console=p.console)
        with atomic_dir(out, force=True) as tmp:
            save(rows, domains, tmp, {"settings": eval_settings(exp)}, console=p.console)
            write_done(tmp, {"stage": "eval", "rows": [r.name for r in rows], "key": key, "outputs": hash_dir(tmp),
                             "input_identities": identities})
        best = min(rows, key=lambda r: r.average)
        return f"best average: {best.name} ({best.average:.4f})"

    return p.stage("eval", key, [out], work, force)


def _analyze(p: Pipeline, force: bool) -> StageOutcome:
    from btx.routing_report import analyze_recipe

    out = p.run_dir / "analysis"
    key = _key(p.exp.analyze, p.keys["finetune"])

    def work() -> str:
        report = analyze_recipe(p.exp, console=p.console)
        return report.get("headline", "routing.json written") if isinstance(report, dict) else "done"

    return p.stage("analyze", key, [out], work, force)


STAGE_FUNCTIONS: dict[str, Callable[[Pipeline, bool], StageOutcome]] = {
    "prepare": _prepare, "seed": _seed, "branch": _branch, "merge": _merge, "finetune": _finetune, "grow": _grow,
    "baselines": _baselines, "eval": _eval, "analyze": _analyze,
}


def run(recipe: str | Path | None = None, overrides: list[str] | None = None, *, until: str | None = None,
        from_stage: str | None = None, console: Console | None = None) -> int:
    """Run the pipeline; returns the exit status. `recipe=None` runs the embedded demo."""
    from btx.recipe import builtin_recipe, load_experiment, resolve_recipe

    console = console or Console()
    overrides = list(overrides or [])
    for flag, stage in (("--until", until), ("--from", from_stage)):
        if stage is not None and stage not in STAGES:
            raise BtxError(f"{flag} {stage}: unknown stage; expected one of {', '.join(STAGES)}")
    recipe_path = resolve_recipe(recipe) if recipe is not None else builtin_recipe("demo")
    exp = load_experiment(recipe_path, overrides)
    start = time.perf_counter()
    outcomes: list[StageOutcome] = []
    redo = False
    with output_lock(exp.run_dir, "the run directory"):  # one btx run per run directory
        pipeline = Pipeline(exp, recipe_path, overrides, console)
        for name in STAGES:
            if from_stage is not None and name == from_stage:
                redo = True
            outcomes.append(STAGE_FUNCTIONS[name](pipeline, redo))
            if until is not None and name == until:
                break
    _summary(outcomes, exp, time.perf_counter() - start, console)
    return 0


def _summary(outcomes: list[StageOutcome], exp, seconds: float, console: Console) -> None:
    table = Table(title=f"btx run {exp.name}: {seconds:.0f} s")
    table.add_column("stage")
    table.add_column("state")
    table.add_column("time", justify="right")
    table.add_column("result")
    colour = {"ran": "green", "skipped": "cyan", "off": "dim"}
    for o in outcomes:
        table.add_row(o.name, f"[{colour[o.state]}]{o.state}[/]", f"{o.seconds:.1f} s" if o.state == "ran" else "",
                      o.summary)
    console.print(table)
    run_dir = exp.run_dir
    console.print(f"outputs in {run_dir}: seed/, experts/<domain>/final/, merged/, finetuned/, eval/eval.md, "
                  "analysis/routing.json", soft_wrap=True)
    eval_md = run_dir / "eval" / "eval.md"
    if eval_md.is_file() and not any(o.name == "eval" and o.state == "ran" for o in outcomes):
        console.print(f"eval table ({eval_md}):")
        console.print(eval_md.read_text(), markup=False, highlight=False, soft_wrap=True)
