"""`btx run`: the whole Branch-Train-MiX workflow from one recipe, resumable and incremental.

Stages, in order (the work of each is a function of btx/run/stages.py, baselines.py, evaluation.py
or this module; the modules named here do it):

    prepare    domain text -> token shards                       btx.run.prepare
    seed       the dense seed, when the recipe trains one         btx.train (seed_job)
    branch     one expert per domain from the seed               btx.run.branch (local executor)
    merge      seed + experts -> MoE (the family's form)          btx.mix.merge
    finetune   the MoE on the domain mixture                      btx.train.finetune
    grow       the finetuned MoE + the experts of grow.domains     btx.mix.grow (then a short finetune)
    baselines  dense and sparse-upcycling runs, compute-matched   btx.train / btx.mix.merge / btx.train.finetune
    eval       per-domain validation loss of every model + BTM    btx.evaluate
    analyze    routing analysis of the finetuned MoE              btx.evaluate.routing

STAGES below declares each stage once: the recipe paths it reads, the stages it consumes, the
directories it leaves and its work (btx/run/stage.py drives a stage from its row, and computes its
key from the row alone); the baselines are several rows of one stage, one per run.

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
from functools import partial
from pathlib import Path

from rich.console import Console
from rich.table import Table

from btx.errors import BtxError
from btx.evaluate.analyze import analyze_recipe
from btx.io.locks import output_lock
from btx.mix.merge import effective_merge_section
from btx.recipe.builtin import builtin_recipe, resolve_recipe
from btx.recipe.load import load_experiment
from btx.recipe.run_dir import BASELINE_PROTOCOLS
from btx.run import baselines, evaluation, stages
from btx.run.evaluation import evaluate
from btx.run.ledger import Pipeline, StageOutcome, key_of
from btx.run.stage import UNKEYED, Parts, Read, Stage, Task, drive
from btx.train.job import expert_job, seed_domains, seed_job


def analyze(p: Pipeline, task: Task) -> str:
    report = analyze_recipe(p.exp, console=p.console)
    return report.get("headline", "routing.json written") if isinstance(report, dict) else "done"


def names(exp) -> list[str]:
    """The domains' names, not their recipes: what a stage that only lists them reads."""
    return list(exp.domains)


def _baseline_rows(match: str) -> tuple[Stage, Stage]:
    """The dense and the upcycled baseline matched on `match`: each a row of the baselines stage."""
    suffix, off = BASELINE_PROTOCOLS[match], partial(baselines.baselines_off, match=match)
    data = "its validation shards, and the domains a data plan draws from (the plan, an input, names them)"
    dense = Stage(
        f"baselines:dense{suffix}",
        partial(baselines.train_dense, match=match),
        reads=("finetune_train", "finetune.mixture", "merged_domains", "tokenizer"),
        uses={"data_domains": data},
        consumes=("seed",),
        inputs=partial(baselines.dense_inputs, match=match),
        outputs=lambda exp, part: [exp.paths.dense_baseline(match)],
        off=off,
        repairs_itself=True,
    )
    upcycled = Stage(
        f"baselines:upcycled{suffix}",
        partial(baselines.train_upcycled, match=match),
        reads=("finetune", "finetune_train", "merged_domains", "tokenizer"),
        uses={"data_domains": data},
        consumes=("baselines:upcycled-merged",),
        inputs=partial(baselines.upcycled_inputs, match=match),
        outputs=lambda exp, part: [exp.paths.upcycled_baseline(match)],
        scratch=lambda exp, part: [exp.paths.upcycled_baseline_train(match)],
        off=off,
        repairs_itself=True,
    )
    return dense, upcycled


_BALANCE_ALPHA = (
    "only the default that the merged config.json records for training the MoE elsewhere; the finetune sets its own"
)
_SHARDS = "recorded in its DONE.json's recipe_hash; what it trains on is its shards' content, which it consumes"

# Every stage of `btx run`, in order (btx/run/stage.py says what each field means). Reads are dotted
# paths into the Experiment ("{part}": each part's own); a Read keys on a view of its path.
STAGES: tuple[Stage, ...] = (
    Stage(
        "prepare",
        stages.prepare,
        drive=stages.drive_prepare,
        parts="data_domains",
        content=stages.shard_content,
        reads=("data_domains.{part}.data", "data_domains.{part}.sources", "tokenizer"),
        uses={"prepare.workers": "how fast, never what: the shards are byte-identical for any number"},
    ),
    Stage(
        "seed",
        stages.train_seed,
        off=stages.given_seed,
        reads=("seed", "seed_train", "model", "tokenizer", "merged_domains"),
        uses={
            "domains": "orders the domains of its mixture, which seed.mixture or merged_domains decide",
            "domains.*.data": _SHARDS,
        },
        consumes=(Parts("prepare", "seed", lambda exp, part: seed_domains(exp)),),
        outputs=lambda exp, part: [exp.paths.seed],
        scratch=lambda exp, part: [exp.paths.seed_train],
        repairs_itself=True,
        adopt=lambda exp, part: stages.adopt_training(seed_job(exp)),
    ),
    Stage(
        "branch",
        stages.train_experts,
        parts="domains",
        part_label="expert",
        busy=stages.expert_busy,
        reads=("domains.{part}.train", "tokenizer", "seed.path"),
        uses={
            "domains.{part}.data": _SHARDS,
            "branch": "how the experts run (executor, parallel jobs, Slurm), not what they compute",
        },
        consumes=("seed", Parts("prepare", "own", lambda exp, part: [part])),
        outputs=lambda exp, part: [exp.paths.expert(part)],
        repairs_itself=True,
        adopt=lambda exp, part: stages.adopt_training(expert_job(exp, part)),
    ),
    Stage(
        "merge",
        stages.merge,
        adopt=stages.adopt_merge,
        outputs=lambda exp, part: [exp.paths.merged],
        # prompts shape only a hidden router init: another merge does not depend on them
        reads=(Read("merge", lambda exp: effective_merge_section(exp.merge)), "merged_domains", "seed.path"),
        uses={"finetune.balance_alpha": _BALANCE_ALPHA},
        consumes=("seed", Parts("branch", "merged", lambda exp, part: exp.merged_domains)),
    ),
    Stage(
        "finetune",
        stages.finetune,
        adopt=stages.adopt_finetune,
        repairs_itself=True,
        reads=("finetune", "finetune_train", "merged_domains", "tokenizer"),
        uses={"data_domains": "the validation shards it reports on: what it shows, not what it trains"},
        consumes=("merge",),
        outputs=stages.finetune_outputs,
        scratch=stages.finetune_scratch,
    ),
    Stage(
        "grow",
        stages.grow,
        off=stages.grow_off,
        repairs_itself=True,
        reads=(
            "grow",
            "merge.router_tokens",
            "merge.ridge_lambda",
            "merge.router_scale",
            "merge.keep_seed",
            # only a hidden init reads the prompts
            Read("merge.prompts", partial(stages.grow_prompts, field="prompts")),
            Read("merge.negative_prompts", partial(stages.grow_prompts, field="negative_prompts")),
            Read("domains", names),
            "merged_domains",
            "finetune",
            "finetune_train",
            "tokenizer",
        ),
        uses={"data_domains": "the validation shards of its finetune: what it shows, not what it trains"},
        consumes=("finetune", Parts("branch", "grown", lambda exp, part: exp.grow.domains)),
        outputs=stages.grow_dirs,
        scratch=stages.grow_scratch,
    ),
    Stage(
        "baselines:upcycled-merged",
        baselines.upcycle,
        off=baselines.baselines_off,
        inputs=baselines.merge_shape,
        reads=(Read("merge", baselines.upcycle_options), "finetune.balance_alpha", "seed.path"),
        consumes=("seed",),
        outputs=lambda exp, part: [exp.paths.upcycled_merged],
    ),
    *(row for match in BASELINE_PROTOCOLS for row in _baseline_rows(match)),
    Stage(
        "eval",
        evaluate,
        outputs=lambda exp, part: [exp.paths.eval],
        reads=(
            Read("eval", evaluation.eval_section_view),
            "train.seq_len",
            # Scored with document masking when training used it (keyed only when on).
            Read("train.document_mask", lambda exp: exp.train.document_mask or UNKEYED),
            Read("domains", names),
            "merged_domains",
            "grow.domains",
            "grow.steps",
            "finetune.router_only_steps",
            "seed.path",
        ),
        consumes=("seed", "branch", "merge", "finetune", "grow", "baselines"),
    ),
    Stage(
        "analyze",
        analyze,
        reads=("analyze", "eval.device", "eval.dtype", Read("domains", names)),
        consumes=("finetune",),
        outputs=lambda exp, part: [exp.paths.analysis],
    ),
)
STAGE_NAMES = tuple(dict.fromkeys(stage.group for stage in STAGES))


def run(
    recipe: str | Path | None = None,
    overrides: list[str] | None = None,
    *,
    until: str | None = None,
    from_stage: str | None = None,
    console: Console | None = None,
) -> int:
    """Run the pipeline; returns the exit status. `recipe=None` runs the embedded demo."""
    console = console or Console()
    overrides = list(overrides or [])
    for flag, stage in (("--until", until), ("--from", from_stage)):
        if stage is not None and stage not in STAGE_NAMES:
            raise BtxError(f"{flag} {stage}: unknown stage; expected one of {', '.join(STAGE_NAMES)}")
    recipe_path = resolve_recipe(recipe) if recipe is not None else builtin_recipe("demo")
    exp = load_experiment(recipe_path, overrides)
    start = time.perf_counter()
    outcomes: list[StageOutcome] = []
    with output_lock(exp.run_dir, "the run directory"):  # one btx run per run directory
        pipeline = Pipeline(exp, recipe_path, overrides, console)
        redo = False
        for name in STAGE_NAMES:
            redo = redo or name == from_stage
            outcomes.append(_run_group(pipeline, [s for s in STAGES if s.group == name], redo))
            if name == until:
                break
    _summary(outcomes, exp, time.perf_counter() - start, console)
    return 0


def _run_group(p: Pipeline, rows: list[Stage], force: bool) -> StageOutcome:
    """One stage of `btx run`: its row, or its rows (the baselines) in order, as one outcome."""
    outcomes = [drive(p, row, force) for row in rows]
    if len(rows) == 1:
        return outcomes[0]
    name, on = rows[0].group, [o for o in outcomes if o.state != "off"]
    if not on:
        return StageOutcome(name, "off", 0.0, outcomes[0].summary)
    summary = "; ".join(f"{o.name.split(':')[1]}: {o.summary}" for o in on)
    seconds = sum(o.seconds for o in on)
    if any(o.state == "ran" for o in on):
        p.record(name, key_of(p.keys[name]), summary, seconds)
        return StageOutcome(name, "ran", seconds, summary)
    return StageOutcome(name, "skipped", 0.0, summary)


def _summary(outcomes: list[StageOutcome], exp, seconds: float, console: Console) -> None:
    table = Table(title=f"btx run {exp.name}: {seconds:.0f} s")
    table.add_column("stage")
    table.add_column("state")
    table.add_column("time", justify="right")
    table.add_column("result")
    colour = {"ran": "green", "skipped": "cyan", "off": "dim"}
    for o in outcomes:
        table.add_row(
            o.name, f"[{colour[o.state]}]{o.state}[/]", f"{o.seconds:.1f} s" if o.state == "ran" else "", o.summary
        )
    console.print(table)
    console.print(
        f"outputs in {exp.run_dir}: seed/, experts/<domain>/final/, merged/, finetuned/, eval/eval.md, "
        "analysis/routing.json",
        soft_wrap=True,
    )
    eval_md = exp.paths.eval / "eval.md"
    if eval_md.is_file() and not any(o.name == "eval" and o.state == "ran" for o in outcomes):
        console.print(f"eval table ({eval_md}):")
        console.print(eval_md.read_text(), markup=False, highlight=False, soft_wrap=True)
