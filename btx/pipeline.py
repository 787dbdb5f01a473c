"""`btx run`: the whole Branch-Train-MiX workflow from one recipe, resumable and incremental.

Stages, in order (each a plain function of the experiment; the modules do the work):

    prepare    domain text -> token shards                       btx.prepare
    seed       the dense seed, when the recipe trains one         btx.train (seed_job)
    branch     one expert per domain from the seed               btx.branch (local executor)
    merge      seed + experts -> Mixtral MoE                      btx.merge
    finetune   the MoE on the domain mixture                      btx.finetune
    baselines  dense and sparse-upcycling runs, compute-matched   btx.train / btx.merge / btx.finetune
    eval       per-domain validation loss of every model + BTM    btx.evaluate
    analyze    routing analysis of the finetuned MoE              btx.routing

Skipping and redoing. The ledger `<run_dir>/pipeline.json` records, per stage, a key: the hash of
the recipe sections the stage reads and of the keys of the stages it consumes. A stage is skipped
when its outputs' DONE.json exists and its key is unchanged; when the key changed (the recipe or
an input changed), its stale outputs are removed and it runs again, and so does everything
downstream (their keys contain its key). Work inside a stage is itself resumable (training
checkpoints, finished experts), so Ctrl-C or a crash is resumed by running the same command again.

Compute matching. With `eval.baselines`, the dense baseline continues the seed on the finetune
mixture, and the sparse-upcycling baseline finetunes an MoE made of seed copies, each for as many
steps as make its training FLOPs equal the experts' plus the BTX finetune's (the FLOPs recorded in
their DONE.json manifests).
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
from btx.manifest import read_done, write_json_atomic

STAGES = ("prepare", "seed", "branch", "merge", "finetune", "baselines", "eval", "analyze")
LEDGER = "pipeline.json"


def _key(*parts) -> str:
    from btx.recipe import to_plain

    blob = json.dumps([to_plain(p) if not isinstance(p, (str, int, float, type(None))) else p for p in parts],
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _outputs_key(directory: Path) -> str:
    """Identity of a finished output: the sha256 of its files as its DONE.json lists them."""
    done = read_done(directory) or {}
    return _key(done.get("outputs") or done.get("output_sha256") or done)


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

    def fresh(self, stage: str, key: str, done_dirs: list[Path]) -> bool:
        """True when every manifest of the stage exists and the stage was made from the same inputs."""
        entry = self.ledger.get(stage, {})
        return entry.get("key") == key and all(read_done(p) is not None for p in done_dirs)

    def invalidate(self, stage: str, done_dirs: list[Path], extra_dirs: tuple[Path, ...]) -> None:
        """Remove what a stage that is not fresh left behind, so that it runs again from its inputs.

        Finished outputs go in any case (made from other inputs, or by hand outside `btx run`).
        Work directories (checkpoints) go only when the recipe changed: after a crash they hold the
        partial run that the stage resumes."""
        changed = self.ledger.get(stage, {}).get("key") not in (None, self.keys.get(stage))
        for path in [*done_dirs, *extra_dirs]:
            if path.exists() and (changed or (path in done_dirs and read_done(path) is not None)):
                why = "its inputs changed" if changed else "it was not made by this recipe's run"
                self.console.print(f"[yellow]{stage}: redoing {path}: {why}[/]")
                shutil.rmtree(path)

    def record(self, stage: str, key: str, summary: str, seconds: float) -> None:
        self.ledger[stage] = {"key": key, "summary": summary, "seconds": round(seconds, 2),
                              "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        self.run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.ledger_path, self.ledger)

    def stage(self, name: str, key: str, done_dirs: list[Path], work: Callable[[], str], force: bool,
              extra_dirs: tuple[Path, ...] = ()) -> StageOutcome:
        """Run `work` unless the stage is fresh. `done_dirs` hold its DONE.json manifests; they and
        `extra_dirs` (work directories: checkpoints, logs) are removed when its inputs changed."""
        self.keys[name] = key
        outputs = [*done_dirs, *extra_dirs]
        if not force and self.fresh(name, key, done_dirs):
            return StageOutcome(name, "skipped", 0.0, self.ledger[name].get("summary", ""))
        if force:
            self.ledger.pop(name, None)
            for path in outputs:
                if path.exists():
                    shutil.rmtree(path)
        else:
            self.invalidate(name, done_dirs, extra_dirs)
        self.console.rule(f"[bold]{name}")
        t0 = time.perf_counter()
        summary = work()
        seconds = time.perf_counter() - t0
        self.record(name, key, summary, seconds)
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
    skipped = all(r.get("skipped") for r in results.values())
    summary = f"{len(results)} domains, {tokens:,} train tokens"
    if not skipped:
        p.record("prepare", key, summary, time.perf_counter() - t0)
    return StageOutcome("prepare", "skipped" if skipped else "ran", time.perf_counter() - t0, summary)


def _train_summary(done: dict) -> str:
    return f"{done['steps']} steps, {done['tokens']:,} tokens, val loss {done.get('val_loss') or float('nan'):.3f}"


def _seed(p: Pipeline, force: bool) -> StageOutcome:
    exp = p.exp
    if exp.seed.path is not None:
        p.keys["seed"] = _key(str(exp.seed.path), _outputs_key(Path(exp.seed.path)))
        return StageOutcome("seed", "off", 0.0, f"given: {exp.seed.path}")
    from btx.train import run_loop, seed_job, trajectory_hash

    job = seed_job(exp)
    key = _key(trajectory_hash(job), p.keys["prepare"])
    return p.stage("seed", key, [job.manifest_dir], lambda: _train_summary(run_loop(job, console=p.console)),
                   force, extra_dirs=(job.work_dir,))


def _branch(p: Pipeline, force: bool) -> StageOutcome:
    from btx.branch import branch
    from btx.train import expert_job, trajectory_hash

    exp = p.exp
    jobs = {d: expert_job(exp, d) for d in exp.domains}
    # Per-expert keys: one changed domain recipe retrains that expert only.
    expert_keys = {d: _key(trajectory_hash(j), p.keys["seed"], p.keys["prepare"]) for d, j in jobs.items()}
    key = _key(expert_keys)
    previous = p.ledger.get("branch", {}).get("experts", {})
    if force:
        stale = list(jobs)
    else:
        stale = [d for d in jobs if previous.get(d) not in (None, expert_keys[d])]
    for d in stale:
        if jobs[d].work_dir.exists():
            p.console.print(f"[yellow]branch: expert {d}: inputs changed; retraining it[/]")
            shutil.rmtree(jobs[d].work_dir)
    p.keys["branch"] = key
    if not stale and all(read_done(j.manifest_dir) is not None for j in jobs.values()) and previous == expert_keys:
        return StageOutcome("branch", "skipped", 0.0, p.ledger["branch"].get("summary", ""))
    p.console.rule("[bold]branch")
    t0 = time.perf_counter()
    status = branch(p.recipe_path, p.overrides, executor="local", console=p.console)
    if status != 0:
        raise BtxError("branch: some expert jobs failed (see above); fix the cause and re-run `btx run` "
                       "(finished experts are kept)")
    dones = {d: read_done(j.manifest_dir) for d, j in jobs.items()}
    unfinished = [d for d, done in dones.items() if done is None]
    if unfinished:  # e.g. still running under an earlier, killed `btx run`
        raise BtxError(f"branch: expert(s) {', '.join(unfinished)} not finished (see `btx status {p.recipe_path}`); "
                       "wait for running jobs or stop them, then re-run `btx run`")
    summary = ", ".join(f"{d} val {v.get('val_loss') or float('nan'):.3f}" for d, v in dones.items())
    seconds = time.perf_counter() - t0
    p.record("branch", key, summary, seconds)
    p.ledger["branch"]["experts"] = expert_keys
    write_json_atomic(p.ledger_path, p.ledger)
    return StageOutcome("branch", "ran", seconds, summary)


def _merge(p: Pipeline, force: bool) -> StageOutcome:
    from btx.merge import merge_from_recipe

    out = p.run_dir / "merged"
    key = _key(p.exp.merge, p.keys["branch"], p.keys["seed"])

    def work() -> str:
        done = merge_from_recipe(p.exp, console=p.console)
        return f"{len(done.get('experts', []))} experts ({', '.join(done.get('experts', []))}), top-{p.exp.merge.top_k}"

    return p.stage("merge", key, [out], work, force)


def _finetune(p: Pipeline, force: bool) -> StageOutcome:
    from btx.finetune import WORK_DIR as FINETUNE_WORK_DIR
    from btx.finetune import finetune_job, run_finetune

    key = _key(p.exp.finetune, p.exp.finetune_train, p.keys["merge"])

    def work() -> str:
        job = finetune_job(p.exp)
        return _train_summary(run_finetune(job, console=p.console))

    return p.stage("finetune", key, [p.run_dir / "finetuned"], work, force, extra_dirs=(p.run_dir / FINETUNE_WORK_DIR,))


def compute_budget(p: Pipeline) -> float:
    """Training FLOPs of BTX beyond the seed: every expert plus the MoE finetune."""
    exp = p.exp
    experts = sum(read_done(exp.expert_dir(d))["train_flops"] for d in exp.domains)
    return experts + read_done(p.run_dir / "finetuned")["train_flops"]


def _matched_steps(budget: float, cfg, settings) -> int:
    flops_per_step = cfg.train_flops_per_token(settings.seq_len) * settings.batch_size * settings.seq_len * settings.grad_accum
    return max(1, round(budget / flops_per_step))


def _baseline_settings(settings, steps: int):
    """The finetune's optimisation for `steps` steps; validation only at the end (eval then scores
    every model on the same windows anyway)."""
    return dataclasses.replace(settings, steps=steps, eval_every=steps)


def _baselines(p: Pipeline, force: bool) -> StageOutcome:
    exp = p.exp
    if not exp.eval.baselines:
        p.keys["baselines"] = "off"
        return StageOutcome("baselines", "off", 0.0, "eval.baselines is off")
    from btx import hf
    from btx.finetune import finetune_job, run_finetune
    from btx.merge import merge_from_recipe
    from btx.train import TrainJob, run_loop

    root = p.run_dir / "baselines"
    budget = compute_budget(p)
    seed_dir = exp.seed_dir
    key = _key(budget, p.keys["seed"], p.keys["merge"], exp.finetune, exp.finetune_train)

    def work() -> str:
        settings = exp.finetune_train
        mixture = dict(exp.finetune.mixture) or {d: 1.0 for d in exp.domains}
        seed_cfg = hf.CheckpointReader(seed_dir).cfg
        dense_steps = _matched_steps(budget, seed_cfg, settings)
        dense = TrainJob(
            name="dense-baseline", settings=_baseline_settings(settings, dense_steps),
            train_shards={d: exp.data_dir(d) / "train.json" for d in mixture},
            val_shards={d: exp.data_dir(d) / "val.json" for d in mixture}, mixture=mixture,
            work_dir=root / "dense", export_dir=root / "dense" / "final", manifest_dir=root / "dense",
            init_from=seed_dir, tokenizer=str(exp.recipe.tokenizer), inputs={"compute_budget": budget},
        )
        run_loop(dense, console=p.console)
        merged_cfg = hf.CheckpointReader(p.run_dir / "merged").cfg
        upcycled = merge_from_recipe(exp, upcycle=merged_cfg.n_experts, out_dir=root / "upcycled-merged",
                                     console=p.console)
        del upcycled
        moe_cfg = dataclasses.replace(merged_cfg, router_mode=exp.finetune.router_mode,
                                      top_k=exp.finetune.top_k or merged_cfg.top_k)
        up_steps = _matched_steps(budget, moe_cfg, settings)
        up_job = finetune_job(exp, model_dir=root / "upcycled-merged", out_dir=root / "upcycled")
        up_job = dataclasses.replace(up_job, name="upcycled-baseline", work_dir=root / "upcycled-work",
                                     settings=_baseline_settings(settings, up_steps),
                                     inputs={**up_job.inputs, "compute_budget": budget})
        run_finetune(up_job, console=p.console)
        return f"budget {budget / 1e12:.2f} TFLOPs: dense {dense_steps} steps, upcycled {up_steps} steps"

    return p.stage("baselines", key, [root / "dense", root / "upcycled"], work, force, extra_dirs=(root,))


def eval_rows(exp, console: Console):
    """Every model of the run that exists, scored on the same validation windows."""
    from btx import hf
    from btx.data import load_shard
    from btx.evaluate import EvalRow, btm_losses, domain_losses

    run_dir = exp.run_dir
    settings = exp.eval
    seq_len = settings.seq_len or exp.train.seq_len
    shards = {d: load_shard(exp.data_dir(d) / "val.json") for d in exp.domains}
    seed_dir = exp.seed_dir
    candidates: list[tuple[str, Path, float | None, str]] = [("seed", seed_dir, 0.0, "the dense seed")]
    expert_flops = 0.0
    for d in exp.domains:
        done = read_done(exp.expert_dir(d)) or {}
        expert_flops += done.get("train_flops", 0.0)
        candidates.append((f"expert:{d}", exp.expert_dir(d) / "final", done.get("train_flops"), f"{d} expert alone"))
    ft = read_done(run_dir / "finetuned") or {}
    btx_flops = expert_flops + ft.get("train_flops", 0.0)
    candidates.append(("BTX merged (no finetune)", run_dir / "merged", expert_flops, "MiX only"))
    candidates.append(("BTX", run_dir / "finetuned", btx_flops, "merged + MoE finetune"))
    base = run_dir / "baselines"
    dense_done = read_done(base / "dense") or {}
    candidates.append(("dense (compute-matched)", base / "dense" / "final", dense_done.get("train_flops"),
                       "seed trained on the mixture"))
    up_done = read_done(base / "upcycled") or {}
    candidates.append(("sparse upcycling (compute-matched)", base / "upcycled", up_done.get("train_flops"),
                       "seed copies as experts + finetune"))

    present = [c for c in candidates if (c[1] / "config.json").is_file()]
    n_batches = len(exp.domains) * settings.batches * (len(present) + len(exp.domains))
    rows: list[EvalRow] = []
    from rich.progress import Progress

    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("eval", total=n_batches)
        tick = lambda: bar.advance(task)  # noqa: E731
        experts = []
        for name, path, flops, note in present:
            model = hf.load_model(path, dtype=__import__("torch").float32)
            losses, tokens = domain_losses(model, shards, seq_len, settings.batch_size, settings.batches, tick)
            rows.append(EvalRow(name, losses, flops, model.cfg.param_counts()["active"], note, tokens))
            if name.startswith("expert:"):
                experts.append(model)
        if experts:
            losses = btm_losses(experts, shards, seq_len, settings.batch_size, settings.batches, tick)
            active = sum(m.cfg.param_counts()["active"] for m in experts)
            rows.insert(len(exp.domains) + 1, EvalRow("BTM ensemble", losses, expert_flops, active,
                                                      "experts mixed by domain posterior"))
    order = {"seed": 0, "BTM ensemble": 2, "dense (compute-matched)": 3, "sparse upcycling (compute-matched)": 4,
             "BTX merged (no finetune)": 5, "BTX": 6}
    rows.sort(key=lambda r: order.get(r.name, 1))
    return rows


def _eval(p: Pipeline, force: bool) -> StageOutcome:
    from btx.evaluate import render, save

    exp = p.exp
    out = p.run_dir / "eval"
    key = _key(exp.eval, p.keys["finetune"], p.keys["baselines"], p.keys["branch"])

    def work() -> str:
        from btx.manifest import atomic_dir, write_done

        rows = eval_rows(exp, p.console)
        domains = list(exp.domains)
        render(rows, domains, console=p.console)
        with atomic_dir(out, force=True) as tmp:
            save(rows, domains, tmp)
            write_done(tmp, {"stage": "eval", "rows": [r.name for r in rows], "key": key})
        best = min(rows, key=lambda r: r.average)
        return f"best average: {best.name} ({best.average:.4f})"

    return p.stage("eval", key, [out], work, force)


def _analyze(p: Pipeline, force: bool) -> StageOutcome:
    from btx.routing import analyze_recipe

    out = p.run_dir / "analysis"
    key = _key(p.exp.analyze, p.keys["finetune"])

    def work() -> str:
        report = analyze_recipe(p.exp, console=p.console)
        return report.get("headline", "routing.json written") if isinstance(report, dict) else "done"

    return p.stage("analyze", key, [out], work, force)


STAGE_FUNCTIONS: dict[str, Callable[[Pipeline, bool], StageOutcome]] = {
    "prepare": _prepare, "seed": _seed, "branch": _branch, "merge": _merge, "finetune": _finetune,
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
    pipeline = Pipeline(exp, recipe_path, overrides, console)
    start = time.perf_counter()
    outcomes: list[StageOutcome] = []
    redo = False
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
