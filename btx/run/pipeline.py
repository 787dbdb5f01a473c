"""`btx run`: the whole Branch-Train-MiX workflow from one recipe, resumable and incremental.

Stages, in order (each a plain function of the experiment; the modules do the work):

    prepare    domain text -> token shards                       btx.data.recipe
    seed       the dense seed, when the recipe trains one         btx.train (seed_job)
    branch     one expert per domain from the seed               btx.run.branch (local executor)
    merge      seed + experts -> MoE (the family's form)          btx.mix.merge
    finetune   the MoE on the domain mixture                      btx.train.finetune
    grow       the finetuned MoE + the experts of grow.domains     btx.mix.grow (then a short finetune)
    baselines  dense and sparse-upcycling runs, compute-matched   btx.train / btx.mix.merge / btx.train.finetune
    eval       per-domain validation loss of every model + BTM    btx.evaluate
    analyze    routing analysis of the finetuned MoE              btx.evaluate.routing

Skipping and redoing (docs/PROVENANCE.md). The ledger `<run_dir>/pipeline.json` records, per
stage, a key and the identity of the outputs it left. The key hashes the recipe sections the stage
reads and the *content* of the stages it consumes (their DONE.json output hashes), so a replaced
input changes the key of every stage after it. A stage is skipped only when all of these hold:
its DONE.json files exist, its files still have the sha256 they record, the inputs they record
are still what is on disk (`btx.io.manifest.changed_inputs`), its key is unchanged and its outputs
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
a second stops with one line naming the first (`btx.io.locks.output_lock`).

Baselines (`eval.baselines`), matched on what `eval.match` says, each training all its parameters
whatever BTX's finetune freezes (finetune.trainable, router_only_steps are BTX's alone):
- compute (default): the dense baseline continues the seed on the finetune mixture, and the
  sparse-upcycling baseline finetunes an MoE made of seed copies, each for as many steps as make
  its training FLOPs equal the experts' plus the BTX finetune's (the FLOPs recorded in their
  DONE.json manifests; btx.model.flops counts frozen weights without their weight gradients);
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

import time
from pathlib import Path
from typing import Callable

from rich.console import Console
from rich.table import Table

from btx.errors import BtxError
from btx.io.locks import output_lock
from btx.run.baselines import _baselines
from btx.run.evaluation import _eval
from btx.run.ledger import STAGES, Pipeline, StageOutcome, _key
from btx.run.stages import _branch, _finetune, _grow, _merge, _prepare, _seed


def _analyze(p: Pipeline, force: bool) -> StageOutcome:
    from btx.evaluate.routing_report import analyze_recipe

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
    from btx.recipe.builtin import builtin_recipe, resolve_recipe
    from btx.recipe.load import load_experiment

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
