"""What a stage of `btx run` is, declared once (STAGES in btx/run/pipeline.py), and how the pipeline
drives a stage from its declaration: its key, its verdict, its work, its record.

A Stage names the recipe paths it reads (`reads`: dotted paths into the Experiment, "merge",
"finetune.balance_alpha", "domains.{part}.train"), the stages whose content it consumes
(`consumes`), the directories it leaves (`outputs`, each with its DONE.json; `scratch`: its work
directories) and its work (`run`), which only works.

Invariants
- A stage's key is `stage_key`: the hash of the values of what it reads and of the content of
  what it consumes (the identity of their outputs, not their keys); nothing else goes into it. A
  section the work reads is thus keyed by declaring it, and tests/test_stage_table.py runs every
  stage with a recording Experiment to check that each path its work reads is declared: in
  `reads`, or in `uses` (read but not deciding its result, each with the reason why).
- A `Read` keys on a view of its path, the part that decides the result (the merge's prompts
  shape only a hidden router init); `inputs` are values taken from earlier stages' records rather
  than their content (the baselines' compute budget), hashed into the key too.
- A stage is skipped only when `Pipeline.verdict` finds its declared outputs fresh or adoptable;
  a stage that consumes one being redone is redone (`plan` tells which, without working).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from btx.errors import BtxError
from btx.io.manifest import DONE_NAME
from btx.recipe.experiment import to_plain
from btx.run.ledger import Adopt, Pipeline, StageOutcome, key_of, outputs_key, to_remove

# Experiment attributes that are not recipe settings: where the recipe and the run are, and how
# the run was asked for (messages and provenance records). The seed's location is in here because
# what it is, is the seed stage's content, which every stage reading the seed consumes.
NOT_SETTINGS = {"path", "overrides", "run_dir", "paths", "name", "seed_dir"}
REDO = "<redone>"  # a plan's content of a stage it redoes: unknown until it ran
# What a Read's view gives to stay out of the key: a setting added after run directories existed
# leaves their keys as they were while it keeps its old behaviour (train.document_mask off).
UNKEYED = "<unkeyed>"


@dataclass(frozen=True)
class Read:
    """`path`, keyed by `view(exp)`: the part of it that decides the stage's result."""

    path: str
    view: Callable[[Any], Any]


@dataclass(frozen=True)
class Parts:
    """Some parts of a stage with parts (`label` names them in the key): `which(exp, part)` lists
    them; the merge consumes the experts it merges, an expert the shards of its own domain."""

    stage: str
    label: str
    which: Callable[[Any, Optional[str]], Iterable[str]]


@dataclass(frozen=True)
class Task:
    """What the driver asks of a stage's work."""

    parts: list[str] = field(default_factory=list)  # the parts to do (a stage with parts)
    inputs: Any = None  # the values of the stage's `inputs`
    force: bool = False  # redo everything (`--from`): for a stage that decides by itself (prepare)
    key: str = ""  # its key (eval records it in its DONE.json)


def _nothing(exp, part) -> list[Path]:
    return []


def _never(*args) -> Any:
    return None


@dataclass(frozen=True)
class Stage:
    name: str  # its ledger entry; "group:row" for one of the rows of a stage (the baselines)
    run: Callable[[Pipeline, Task], Any]  # the work: returns its one-line summary
    reads: tuple = ()  # recipe paths (str) and views of them (Read) its key hashes
    uses: Mapping[str, str] = field(default_factory=dict)  # recipe paths read but not keyed: why not
    consumes: tuple = ()  # stage names (their content) and Parts of stages with parts
    outputs: Callable[[Any, Optional[str]], list[Path]] = _nothing  # (exp, part) -> dirs with DONE.json
    scratch: Callable[[Any, Optional[str]], list[Path]] = _nothing  # removed with a stale stage
    # A recipe mapping whose keys are the stage's parts, each decided on its own and done together
    # by one call of `run` (branch: one expert per domain); `part_label` names one in messages.
    parts: Optional[str] = None
    part_label: str = "part"
    inputs: Optional[Callable[[Any], Any]] = None  # exp -> values from earlier stages' records
    off: Callable[[Any], Optional[tuple[str, str]]] = _never  # exp -> (why, its content) when it does not run
    adopt: Optional[Callable[[Any, Optional[str]], Adopt]] = None  # outputs made outside this run follow?
    repairs_itself: bool = False  # its work exports a damaged output again by itself (training)
    busy: Callable[[Any, str], bool] = _never  # a part whose own process owns its directory: never cleared
    # (exp, part) -> the identity of its outputs, for outputs without a DONE.json (prepare's shards)
    content: Optional[Callable[[Any, Optional[str]], str]] = None
    # A stage that decides by itself what to redo (prepare: shards by their sidecars) drives itself.
    drive: Optional[Callable[[Pipeline, "Stage", bool], StageOutcome]] = None

    @property
    def group(self) -> str:
        """The stage of `btx run` this row belongs to (--from, --until, the summary)."""
        return self.name.split(":")[0]


# -- keys ----------------------------------------------------------------------------------------


def resolve(exp, path: str) -> Any:
    """The value at a dotted path into the Experiment: "merge.top_k", "domains.code.train"."""
    value = exp
    for name in path.split("."):
        value = value[name] if isinstance(value, Mapping) else getattr(value, name)
    return value


def read_paths(stage: Stage, part: Optional[str] = None) -> list[str]:
    return [r.path if isinstance(r, Read) else r.format(part=part) for r in stage.reads]


def consumed(p: Pipeline, stage: Stage, part: Optional[str] = None) -> dict:
    out = {}
    for c in stage.consumes:
        if isinstance(c, Parts):
            whole = p.keys[c.stage]
            out[f"{c.stage}:{c.label}"] = {d: whole[d] for d in c.which(p.exp, part)}
        else:
            out[c] = p.keys[c]
    return out


def stage_key(p: Pipeline, stage: Stage, part: Optional[str] = None, inputs: Any = None) -> str:
    """The hash of what the stage reads (its `reads`, their views) and consumes, and its inputs."""
    reads = {
        path: (r.view(p.exp) if isinstance(r, Read) else resolve(p.exp, path))
        for r, path in zip(stage.reads, read_paths(stage, part), strict=True)
    }
    reads = {path: value for path, value in reads.items() if not (isinstance(value, str) and value == UNKEYED)}
    # a section that knows what of it decides results (TrainSection: not how the job runs)
    reads = {path: value.key_view() if hasattr(value, "key_view") else value for path, value in reads.items()}
    return key_of(reads, consumed(p, stage, part), to_plain(inputs))


def parts_of(exp, stage: Stage) -> list[Optional[str]]:
    return list(resolve(exp, stage.parts)) if stage.parts is not None else [None]


# -- deciding ------------------------------------------------------------------------------------


@dataclass
class Decision:
    part: Optional[str]
    key: str
    verdict: str  # Pipeline.verdict's, or "stale" for --from
    why: str
    entry: dict  # what the ledger records of it


def decide(p: Pipeline, stage: Stage, part: Optional[str], key: str, force: bool) -> Decision:
    entry = p.ledger.get(stage.name, {})
    if part is not None:  # a part's own record inside its stage's entry
        entry = (
            {"key": entry["parts"][part], "outputs": entry["outputs"][part]} if part in entry.get("parts", {}) else {}
        )
    if force:
        return Decision(part, key, "stale", f"--from {stage.group}", entry)
    adopt = stage.adopt(p.exp, part) if stage.adopt is not None else None
    verdict, why = p.verdict(key, stage.outputs(p.exp, part), adopt, entry)
    return Decision(part, key, verdict, why, entry)


def plan(p: Pipeline, stages: Iterable[Stage]) -> list[str]:
    """What `btx run` would redo now, without working: the stages (and parts, "branch:code") whose
    verdict is neither fresh nor adopt, or which consume one that is redone (its content is then
    unknown). Values a stage takes from earlier records (`inputs`) are taken as they are."""
    redo = []
    for stage in stages:
        off = stage.off(p.exp)
        if off is not None:
            note(p, stage, off[1])
            continue
        contents = {
            part: content(p.exp, stage, part) if _fresh(p, stage, part) else REDO for part in parts_of(p.exp, stage)
        }
        for part, value in contents.items():
            if value == REDO:
                redo.append(stage.name if part is None else f"{stage.name}:{part}")
        note(p, stage, contents[None] if stage.parts is None else contents)
    return redo


def _fresh(p: Pipeline, stage: Stage, part: Optional[str]) -> bool:
    if _redone(consumed(p, stage, part)):
        return False  # its inputs are not made yet: nothing else can be known of it
    key = stage_key(p, stage, part, stage.inputs(p.exp) if stage.inputs is not None else None)
    if stage.drive is not None:  # decides by itself: redone when what it reads changed
        return p.ledger.get(stage.name, {}).get("parts", {}).get(part) == key
    return decide(p, stage, part, key, False).verdict in ("fresh", "adopt")


def note(p: Pipeline, stage: Stage, value) -> None:
    """Keep a stage's content for the stages after it; a row's also under its group's name."""
    p.keys[stage.name] = value
    if stage.group != stage.name:
        p.keys.setdefault(stage.group, {})[stage.name] = value


def _redone(consumed: dict) -> bool:
    values = [v for c in consumed.values() for v in (c.values() if isinstance(c, dict) else [c])]
    return REDO in values


def content(exp, stage: Stage, part: Optional[str]) -> str:
    """The identity of a finished stage's (or part's) outputs, which consumers key on."""
    if stage.content is not None:
        return stage.content(exp, part)
    return outputs_key(stage.outputs(exp, part))


# -- driving -------------------------------------------------------------------------------------


def drive(p: Pipeline, stage: Stage, force: bool) -> StageOutcome:
    """Run the stage unless its outputs are fresh (btx/run/ledger.py, docs/PROVENANCE.md)."""
    if stage.drive is not None:
        return stage.drive(p, stage, force)
    off = stage.off(p.exp)
    if off is not None:
        note(p, stage, off[1])
        return StageOutcome(stage.name, "off", 0.0, off[0])
    inputs = stage.inputs(p.exp) if stage.inputs is not None else None
    decisions = [decide(p, stage, part, stage_key(p, stage, part, inputs), force) for part in parts_of(p.exp, stage)]
    kept = [_settle(p, stage, d) for d in decisions]
    todo = [d for d in decisions if d.verdict not in ("fresh", "adopt")]
    seconds, summary = 0.0, p.ledger.get(stage.name, {}).get("summary", "")
    if stage.parts is None and decisions[0].verdict == "adopt":
        summary = kept[0]
    if todo:
        p.console.rule(f"[bold]{stage.name}")
        t0 = time.perf_counter()
        task = Task(
            parts=[d.part for d in todo if d.part is not None],
            inputs=inputs,
            key=todo[0].key if stage.parts is None else "",
        )
        try:
            summary = stage.run(p, task)
        except BtxError as e:
            raise BtxError(followable(str(e), p.recipe_path, stage.group)) from None
        seconds = time.perf_counter() - t0
    if todo or any(d.verdict == "adopt" for d in decisions) or stage.parts is not None:
        _record(p, stage, decisions, summary, seconds)
    contents = {d.part: content(p.exp, stage, d.part) for d in decisions}
    note(p, stage, contents[None] if stage.parts is None else contents)
    return StageOutcome(stage.name, "ran" if todo else "skipped", seconds, summary)


def followable(message: str, recipe, group: str) -> str:
    """A stage command's advice to `pass --force` is for that command; `btx run` has no --force
    (its ledger decides what to redo), so under it the line also says what does the same there:
    `--from STAGE` redoes the stage from the recipe, removing its outputs and scratch first."""
    if "--force" not in message:
        return message
    return f"{message} (under btx run: `btx run {recipe} --from {group}` redoes it from the recipe)"


def _settle(p: Pipeline, stage: Stage, d: Decision) -> str:
    """Before the work: refuse a foreign output, note an adopted one ("kept ..."), clear what must
    not survive."""
    outputs = stage.outputs(p.exp, d.part)
    if d.verdict == "foreign":
        raise p.refuse(stage.group, next(path for path in outputs if path.exists()), d.why)
    if d.verdict == "adopt":
        kept = "kept " + (
            ", ".join(str(path.relative_to(p.run_dir)) for path in outputs)
            if d.part is None
            else f"{stage.part_label} {d.part}"
        )
        p.console.print(
            f"[yellow]{stage.name}: {kept}: {d.why}, but its {DONE_NAME} records the recipe's settings and inputs[/]",
            soft_wrap=True,
        )
        return kept
    if d.verdict == "fresh" or (d.part is not None and stage.busy(p.exp, d.part)):
        return ""
    changed = d.entry.get("key") not in (None, d.key)
    remove = [
        path
        for path in to_remove(d.verdict, changed, stage.repairs_itself, outputs, stage.scratch(p.exp, d.part))
        if path.exists()
    ]
    if d.part is not None and remove:
        p.console.print(
            f"[yellow]{stage.name}: {stage.part_label} {d.part}: {d.why or 'inputs changed'}; retraining it[/]",
            soft_wrap=True,
        )
    p.remove(stage.name, remove, d.why, quiet=d.part is not None)
    return ""


def _record(p: Pipeline, stage: Stage, decisions: list[Decision], summary: str, seconds: float) -> None:
    if stage.parts is None:
        p.record(stage.name, decisions[0].key, summary, seconds, outputs_key(stage.outputs(p.exp, None)))
        return
    keys = {d.part: d.key for d in decisions}
    outputs = {d.part: outputs_key(stage.outputs(p.exp, d.part)) for d in decisions}
    entry = p.ledger.get(stage.name, {})
    if entry.get("parts") == keys and entry.get("outputs") == outputs:
        return  # nothing changed: the ledger stays as it is
    p.record(stage.name, key_of(keys), summary, seconds, outputs, parts=keys)
