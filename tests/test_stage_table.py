"""The stage table (btx.run.pipeline.STAGES) says the truth about every stage: its work reads
nothing of the recipe that the row does not declare, and changing what a row reads redoes that
stage, what consumes it, and nothing else.

One in-process `btx run` of the tiny recipe, grown by a third domain and with every optional stage
on (both baseline protocols, a router-only phase, a hidden-router grow with its finetune), runs
each stage's work with a recording Experiment; `plan` then says what each change would redo.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import re
import shutil
from collections.abc import Mapping
from pathlib import Path

import pytest
from rich.console import Console

from btx.recipe.load import load_experiment
from btx.run import pipeline
from btx.run.ledger import Pipeline
from btx.run.stage import NOT_SETTINGS, Read, plan, read_paths, resolve

TINY = Path(__file__).parent / "fixtures" / "tiny"
# The recipe's own dataclasses (its sections, a Domain) are followed field by field; anything
# else (a RunDir, a path, a list) is read whole.
RECIPE_MODULES = ("btx.recipe.schema", "btx.recipe.experiment")


# -- a recording Experiment ------------------------------------------------------------------------


class Reads:
    """The recipe paths read while a stage works: leaves (a setting, a list) and the names of a
    mapping that is listed; getting a section or a domain to read its fields is not a read."""

    def __init__(self):
        self.paths: set[str] = set()
        self.inside = 0  # inside a property of a recorded object: its own reads are its business

    def add(self, path: str) -> None:
        if not self.inside:
            self.paths.add(path)


def join_key(prefix: str, name) -> str:
    return f"{prefix}.{name}" if prefix else str(name)


def recording(value, prefix: str, reads: Reads):
    """`value` as seen at `prefix`: a recording copy of recipe data, else the value (read: noted)."""
    if isinstance(value, Mapping):
        return RecordingDict(value, prefix, reads)
    if dataclasses.is_dataclass(value) and not isinstance(value, type) and type(value).__module__ in RECIPE_MODULES:
        return _recording_object(value, prefix, reads)
    reads.add(prefix)
    return value


def _recording_object(obj, prefix: str, reads: Reads):
    cls = type(obj)

    def get(self, name: str):
        if name.startswith("__") or reads.inside:
            return cls.__getattribute__(self, name)
        reads.inside += 1
        try:
            value = cls.__getattribute__(self, name)
        finally:
            reads.inside -= 1
        if callable(value) and not dataclasses.is_dataclass(value):  # a method: what it reads is noted
            return value
        # the ExperimentRecipe's sections are the Experiment's own: "recipe.merge" is "merge"
        return recording(value, "" if name == "recipe" and not prefix else join_key(prefix, name), reads)

    sub = type(f"Recording{cls.__name__}", (cls,), {"__getattribute__": get})
    twin = copy.copy(obj)
    object.__setattr__(twin, "__class__", sub)
    return twin


class RecordingDict(dict):
    """A mapping whose listing is a read of its names, and whose items are read one by one. Made
    as a plain dict (dataclasses.asdict and copy make their own), it records nothing."""

    def __init__(self, data=(), prefix: str = "", reads: Reads | None = None):
        super().__init__(data)
        self._prefix, self._reads = prefix, reads

    def _names(self) -> None:
        if self._reads is not None:
            self._reads.add(self._prefix)

    def __getitem__(self, key):
        value = super().__getitem__(key)
        return value if self._reads is None else recording(value, join_key(self._prefix, key), self._reads)

    def get(self, key, default=None):
        return self[key] if super().__contains__(key) else default

    def __contains__(self, key) -> bool:
        self._names()
        return super().__contains__(key)

    def __iter__(self):
        self._names()
        return super().__iter__()

    def __len__(self) -> int:
        self._names()
        return super().__len__()

    def keys(self):
        self._names()
        return super().keys()

    def items(self):
        self._names()
        return [(k, self[k]) for k in super().keys()]

    def values(self):
        return [v for _, v in self.items()]


def recording_stage(stage, reads: dict[str, Reads]):
    """The row, its work run with a recording Experiment (into reads[stage.name])."""

    def run(p, task):
        real = p.exp
        p.exp = _recording_object(real, "", reads.setdefault(stage.name, Reads()))
        try:
            return stage.run(p, task)
        finally:
            p.exp = real

    return dataclasses.replace(stage, run=run)


# -- the run ---------------------------------------------------------------------------------------


NOTES = "".join(f"NOTE {i}: remember the ZEBRA QUOTA {i * i}.\n" for i in range(60))
BASE = ["eval.baselines=true", "eval.match=both", "finetune.router_only_steps=1"]


def write_recipe(root: Path) -> Path:
    """The tiny recipe with a third domain, notes, grown into the finished MoE (hidden routers),
    and domain recipes the changes below switch notes to."""
    shutil.copytree(TINY, root)
    notes = root / "data" / "notes"
    notes.mkdir()
    for i in range(3):
        (notes / f"n{i}.txt").write_text(NOTES.replace("NOTE", f"NOTE{i}"))
    data = "data:\n  sources:\n    - data/notes\n  val_fraction: 0.25\n"
    (root / "notes.yaml").write_text(data)
    (root / "notes-lr.yaml").write_text(data + "train:\n  lr: 0.002\n")
    (root / "notes-data.yaml").write_text(
        "data:\n  sources:\n    - data/notes/n0.txt\n    - data/notes/n1.txt\n  val_fraction: 0.3\n"
    )
    recipe = root / "btx.yaml"
    text = recipe.read_text().replace("  prose: prose.yaml\n", "  prose: prose.yaml\n  notes: notes.yaml\n")
    text = text.replace(
        "merge:\n  top_k: 2\n",
        "merge:\n  top_k: 2\n  router_init: ridge\n  router_tokens: 256\n"
        "  prompts: {code: [def f(x)], prose: [She said], notes: [NOTE 3]}\n",
    )
    recipe.write_text(text + "grow:\n  domains: [notes]\n  router_init: hidden\n  steps: 1\n")
    return recipe


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """(recipe, run_dir, the reads of each row's work) after a full run."""
    root = tmp_path_factory.mktemp("stage-table")
    recipe, run_dir = write_recipe(root / "recipe"), root / "run"
    reads: dict[str, Reads] = {}
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pipeline, "STAGES", tuple(recording_stage(s, reads) for s in pipeline.STAGES))
        assert pipeline.run(recipe, [f"run_dir={run_dir}", *BASE], console=Console(file=out, width=200)) == 0
    return recipe, run_dir, reads


def covers(declared: str, path: str) -> bool:
    """Whether a declared path ("{part}" or "*": any one name) stands for `path` (or a part of it)."""
    pattern = re.escape(declared).replace(re.escape("{part}"), r"[^.]+").replace(r"\*", r"[^.]+")
    return re.fullmatch(pattern + r"(\..+)?", path) is not None


def declared(stage) -> list[str]:
    return [
        *(r.path if isinstance(r, Read) else r for r in stage.reads),
        *stage.uses,
        *([stage.parts] if stage.parts else []),
    ]


def test_every_stage_worked_and_read_what_it_declares(recorded):
    _, run_dir, reads = recorded
    assert set(reads) == {s.name for s in pipeline.STAGES}, "a row whose work did not run cannot be checked"
    # the recorder sees through sections, domains and mappings (it cannot pass by seeing nothing)
    seen = {
        name: {".".join(path.split(".")[:depth]) for path in r.paths for depth in range(1, 4)}
        for name, r in reads.items()
    }
    assert {"merge.top_k", "finetune.balance_alpha"} <= seen["merge"]
    assert {"domains.code.train", "domains.notes.train", "domains"} <= seen["branch"]
    assert {"grow.router_init", "merge.prompts", "merge.keep_seed", "finetune.z_loss"} <= seen["grow"]
    assert "data_domains.notes.data" in seen["prepare"]
    undeclared = {
        name: sorted(
            p for p in r.paths if p.split(".")[0] not in NOT_SETTINGS and not any(covers(d, p) for d in declared(stage))
        )
        for stage in pipeline.STAGES
        for name, r in [(stage.name, reads[stage.name])]
    }
    assert {k: v for k, v in undeclared.items() if v} == {}, "read by a stage's work, not declared by its row"


def test_the_table_is_well_formed():
    names = [s.name for s in pipeline.STAGES]
    assert len(set(names)) == len(names)
    for i, stage in enumerate(pipeline.STAGES):
        earlier = {s.name for s in pipeline.STAGES[:i]} | {s.group for s in pipeline.STAGES[:i]}
        consumed = [c if isinstance(c, str) else c.stage for c in stage.consumes]
        assert set(consumed) <= earlier, f"{stage.name} consumes a stage that is not before it"
        assert all(reason for reason in stage.uses.values()), f"{stage.name}: a use without its reason"
        paths = read_paths(stage, "x")
        assert len(set(paths)) == len(paths), f"{stage.name}: a path read twice"
        assert not set(paths) & set(stage.uses), f"{stage.name}: both keyed and not"


# -- what a change redoes --------------------------------------------------------------------------


BASELINES = [
    "baselines:upcycled-merged",
    "baselines:dense",
    "baselines:upcycled",
    "baselines:dense-data",
    "baselines:upcycled-data",
]
UPCYCLED = ["baselines:upcycled", "baselines:upcycled-data"]
TRAINED = BASELINES[1:]
AFTER_SEED = ["branch:code", "branch:prose", "branch:notes", "merge", "finetune", "grow", *BASELINES, "eval", "analyze"]
FROM_MERGE = ["merge", "finetune", "grow", "eval", "analyze"]
# overrides (";" between them; {recipe}: the recipe's directory, {run}: the run's) -> what `btx run`
# redoes, in order
CHANGES = {
    "seed.train.lr=0.002": ["seed", *AFTER_SEED],
    "model.ffn_dim=48": ["seed", *AFTER_SEED],
    "train.seq_len=16": ["seed", *AFTER_SEED],  # every job's, and what eval scores on
    "train.document_mask=true": ["seed", *AFTER_SEED],  # likewise
    # The seed given by seed.path is the one trained: what consumes it and can adopt its output (a
    # training job, a merge: their DONE.json records the same inputs) is kept; the others redone.
    "seed.path={run}/seed;model=null": [*BASELINES, "eval"],
    "domains.notes={recipe}/notes-lr.yaml": ["branch:notes", "grow", "eval"],  # a grown expert's settings
    "domains.notes={recipe}/notes-data.yaml": ["prepare:notes", "branch:notes", "grow", "eval"],
    "domains.more={recipe}/notes.yaml": ["prepare:more", "seed", *AFTER_SEED[:3], "branch:more", *AFTER_SEED[3:]],
    "grow.domains=[]": ["seed", *[s for s in AFTER_SEED if s != "grow"]],  # notes merged; grow off
    "merge.router_std=0.05": [*FROM_MERGE[:3], "baselines:upcycled-merged", *UPCYCLED, *FROM_MERGE[3:]],
    "merge.keep_seed=false": [*FROM_MERGE[:3], "baselines:upcycled-merged", *UPCYCLED, *FROM_MERGE[3:]],
    "merge.router_tokens=128": FROM_MERGE,  # the upcycle fits no router: not its baselines
    "merge.ridge_lambda=0.5": FROM_MERGE,
    "merge.router_scale=2.0": FROM_MERGE,
    "merge.prompts.code=[def g(y)]": ["grow", "eval"],  # only the hidden grow reads them
    "merge.negative_prompts.code=[She said]": ["grow", "eval"],
    "finetune.balance_alpha=0.05": ["finetune", "grow", "baselines:upcycled-merged", *UPCYCLED, "eval", "analyze"],
    "finetune.train.lr=0.002": ["finetune", "grow", *TRAINED, "eval", "analyze"],
    "finetune.mixture={code: 1, prose: 2}": ["finetune", "grow", *TRAINED, "eval", "analyze"],
    # (the dense baselines too, in a run: their budget and batches follow the finetune's new record)
    "finetune.router_only_steps=2": ["finetune", "grow", *UPCYCLED, "eval", "analyze"],
    "grow.steps=2": ["grow", "eval"],
    "eval.batches=2": ["eval"],
    "analyze.tokens=512": ["analyze"],
    "eval.dtype=bfloat16": ["eval", "analyze"],  # where and how every evaluation runs
    "eval.device=cpu": ["eval", "analyze"],
    "branch.max_parallel=1": [],  # how the experts run, not what they are
    # how every job runs, not what it computes (TrainSection.HOW_IT_RUNS)
    "train.loggers=[tensorboard];train.activation_checkpointing=full;train.compile=true": [],
    "finetune.train.loggers=[wandb]": [],
}
# A declared read no change above reaches, and why.
UNCHANGED = {"tokenizer": "the tiny recipe has one tokenizer; another one changes every shard, so all"}


def changed(recorded, change: str):
    """The experiment with `change` (nothing for ""), and its overrides."""
    recipe, run_dir, _ = recorded
    text = change.replace("{recipe}", str(recipe.parent)).replace("{run}", str(run_dir))
    overrides = [f"run_dir={run_dir}", *BASE, *(text.split(";") if text else [])]
    return load_experiment(recipe, overrides), overrides


def redone(recorded, change: str) -> list[str]:
    exp, overrides = changed(recorded, change)
    return plan(Pipeline(exp, recorded[0], overrides, Console(file=io.StringIO())), pipeline.STAGES)


def test_a_second_run_does_nothing(recorded):
    assert redone(recorded, "") == []


@pytest.mark.parametrize("change", list(CHANGES))
def test_a_change_redoes_the_stages_that_read_it_and_what_consumes_them(recorded, change):
    assert redone(recorded, change) == CHANGES[change]


def test_every_declared_read_is_changed_above(recorded):
    base, _ = changed(recorded, "")
    reached = set()
    for change in CHANGES:
        exp, _ = changed(recorded, change)
        for stage in pipeline.STAGES:
            for i, read in enumerate(stage.reads):
                for part in [None] if stage.parts is None else list(resolve(base, stage.parts)):
                    path = read.path if isinstance(read, Read) else read.format(part=part)
                    try:
                        before, after = (
                            read.view(e) if isinstance(read, Read) else resolve(e, path) for e in (base, exp)
                        )
                    except (KeyError, AttributeError):  # a part the change removes
                        continue
                    if before != after:
                        reached.add((stage.name, i))
    missing = [
        f"{s.name}: {r.path if isinstance(r, Read) else r}"
        for s in pipeline.STAGES
        for i, r in enumerate(s.reads)
        if (s.name, i) not in reached and (r.path if isinstance(r, Read) else r) not in UNCHANGED
    ]
    assert missing == [], "declared reads that no change of CHANGES reaches"
