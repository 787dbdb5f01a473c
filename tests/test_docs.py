"""The docs cannot rot: every fenced `btx` command parses, the walkthrough's examples run, and the
recipe schema lists exactly the recipe's keys.

- Every `btx ...` line inside a fenced block of README.md or docs/*.md (also `python -m btx`,
  `.venv/bin/btx`, `torchrun ... -m btx` and `deepspeed --module btx`) is parsed by btx's own
  argparse. A synopsis line (`[--force]`, `local|slurm`, `RECIPE`, `...`) is checked for its command
  and options; a concrete example must parse whole.
- The examples of docs/COMMANDS.md, docs/GROW.md and docs/ROUTING.md are one walkthrough on the
  demo recipe: they run, in document order, on a shrunken demo (TINY) in a scratch directory.
  Examples that name things outside it (a 7B checkpoint, a cluster launcher, shell variables) are
  parsed only.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import itertools
import os
import re
import shlex
import typing
from pathlib import Path

import pytest
import yaml

from btx import cli
from btx.recipe.domain_schema import DomainRecipe
from btx.recipe.schema import ExperimentRecipe, ModelSection

REPO = Path(__file__).resolve().parents[1]
DOC_FILES = [
    REPO / "README.md",
    *sorted((REPO / "docs").glob("*.md")),
    REPO / "recipes" / "README.md",
    REPO / "checkpoints" / "README.md",
]
WALKTHROUGH = [REPO / "docs" / name for name in ("COMMANDS.md", "GROW.md", "ROUTING.md")]
# Examples that need what a test machine does not have: parsed, not run.
# demo-seed: its corpora take a minute to prepare (tests/test_demo_seed.py trains it shrunken).
NOT_RUNNABLE = re.compile(r"/models/|/ckpts/|\$|llama2-7b|demo-seed|^(torchrun|deepspeed|srun)\b|--watch")
# The demo (its shipped 0.25M-parameter seed) with short jobs, so that the whole walkthrough takes
# seconds per command. Command-line train.* keys reach every job (the finetune's, the baselines').
TINY = [
    "train.seq_len=32",
    "train.batch_size=2",
    "train.steps=3",
    "train.warmup_steps=1",
    "train.checkpoint_every=2",
    "train.eval_every=2",
    "train.eval_batches=1",
    "train.log_every=1",
    "merge.router_tokens=256",
    "eval.batches=2",
    "eval.batch_size=2",
    "analyze.tokens=256",
]
DEMO_RECIPES = ("recipes/demo/btx.yaml", "demo")


@dataclasses.dataclass
class Example:
    file: Path
    line: int
    text: str  # the command line as written (continuations joined, comment removed)
    launcher: str  # "" for a plain btx, else what runs it (torchrun, deepspeed, ...)
    argv: list[str]  # after `btx`

    @property
    def synopsis(self) -> bool:
        return any(re.search(r"[\[\]|…]|\.\.\.|^<.*>$", a) or _placeholder(a) for a in self.argv)

    def __str__(self) -> str:
        return f"{self.file.relative_to(REPO)}:{self.line}: {self.text}"


def _placeholder(token: str) -> bool:
    """RECIPE, DIR, NAME=PATH, KEY=VALUE, CKPT: a word for what the user fills in."""
    return re.fullmatch(r"[A-Z][A-Z0-9_]*(=[A-Z][A-Z0-9_,.]*)?", token) is not None


def fenced_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of each line inside a ``` block, continuations joined: a line ending in a
    backslash, and, in a synopsis, an indented line that goes on with more options."""
    out: list[tuple[int, str]] = []
    inside, pending, start, last = False, "", 0, 0  # last: the physical line out[-1] ends on
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.lstrip().startswith("```"):
            inside, pending = not inside, ""
            continue
        if not inside:
            continue
        if not pending:
            start = number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        line = pending + line
        pending = ""
        if out and line[:1].isspace() and line.lstrip().startswith(("[", "--")) and last + 1 == start:
            out[-1] = (out[-1][0], out[-1][1] + " " + line.strip())
        else:
            out.append((start, line))
        last = number
    return out


def btx_examples(path: Path) -> list[Example]:
    out = []
    for number, line in fenced_lines(path):
        try:
            tokens = shlex.split(line, comments=True)
        except ValueError:
            continue  # not shell (a YAML or table line with a quote in it)
        command: list[str] = []
        for token in [*tokens, "&&"]:
            if token not in ("&&", ";", "||", "|"):
                command.append(token)
                continue
            example = _as_btx(command)
            if example is not None:
                launcher, argv = example
                text = shlex.join(command)
                out.append(Example(path, number, text, launcher, argv))
            command = []
    return out


def _as_btx(tokens: list[str]) -> tuple[str, list[str]] | None:
    for i, token in enumerate(tokens):
        if token == "btx" or token.endswith("/btx"):
            if i == 0 or tokens[i - 1] in ("-m", "--module"):
                return " ".join(tokens[: max(i - 1, 0)]), tokens[i + 1 :]
    if tokens[:2] == ["python", "tools/routing_analysis.py"]:
        return "", ["analyze", *tokens[2:]]
    return None


ALL_EXAMPLES = [e for path in DOC_FILES for e in btx_examples(path)]


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def test_the_docs_have_btx_commands():
    assert len(ALL_EXAMPLES) >= 50
    assert sum(not e.synopsis for e in ALL_EXAMPLES) > 30


@pytest.mark.parametrize("example", ALL_EXAMPLES, ids=str)
def test_every_fenced_btx_command_parses(example: Example):
    parser = cli.build_parser()
    subs = _subparsers(parser)
    words = [a for a in example.argv if not a.startswith("-")]
    assert words and words[0] in subs, f"{example}: no such command"
    if example.synopsis:
        sub = subs[words[0]]
        known = {o for action in [*sub._actions, *parser._actions] for o in action.option_strings}
        for token in example.argv:
            flag = re.sub(r"[\[\]]", "", token).split("=")[0]
            if flag.startswith("--") and flag != "--" and not flag.startswith("---"):
                assert flag in known, f"{example}: btx {words[0]} has no option {flag}"
        return
    argv = [re.sub(r"\$\{?\w+\}?", "X", a) for a in example.argv]  # shell variables: any value parses
    try:
        args = cli.parse_args(argv, parser)
    except SystemExit as e:
        pytest.fail(f"{example}: does not parse (exit {e.code})")
    assert args.command == words[0]


def walkthrough() -> list[Example]:
    return [
        e
        for path in WALKTHROUGH
        for e in btx_examples(path)
        if not e.synopsis and not NOT_RUNNABLE.search(e.launcher + " " + e.text)
    ]


def _runnable(example: Example, scratch: Path) -> list[str]:
    """The example's argv as run here: /tmp/ paths in the scratch directory, the demo shrunk."""
    argv = [a.replace("/tmp/", f"{scratch}/") for a in example.argv]
    positional = [i for i, a in enumerate(argv) if not a.startswith("-")]
    if len(positional) > 1 and argv[positional[1]] in DEMO_RECIPES:
        at = positional[1] + 1
        argv[at:at] = TINY  # before the example's own overrides, so that those win
    return argv


def test_the_walkthrough_examples_run(tmp_path, monkeypatch, capsys):
    """Every runnable example of the walkthrough, in document order, on the shrunken demo."""
    examples = walkthrough()
    assert len(examples) >= 20, [str(e) for e in examples]
    (tmp_path / "recipes").symlink_to(REPO / "recipes")  # `recipes/demo/btx.yaml` as written
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.chdir(tmp_path)  # the demo's run directory is checkpoints/demo/ under it
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    for example in examples:
        status = cli.main(_runnable(example, scratch))
        out = capsys.readouterr()
        assert status == 0, f"{example}: exit {status}\n{out.err[-2000:]}"
    run_dir = tmp_path / "checkpoints" / "demo"
    assert (run_dir / "eval" / "DONE.json").is_file()
    # docs/GROW.md: removing an added expert gives back the MoE it was added to, byte for byte
    before, after = run_dir / "without-prose", run_dir / "shrunk"
    files = sorted(p.name for p in before.iterdir() if p.name != "DONE.json")
    assert files == sorted(p.name for p in after.iterdir() if p.name != "DONE.json") and files
    assert all((before / f).read_bytes() == (after / f).read_bytes() for f in files)


# ---------------------------------------------------------------------------------------------
# The recipe schema in docs/RECIPES.md
# ---------------------------------------------------------------------------------------------


def _schema_blocks() -> dict[str, dict]:
    text = (REPO / "docs" / "RECIPES.md").read_text()
    blocks = {}
    for body in re.findall(r"```yaml\n(.*?)```", text, re.S):
        first = body.splitlines()[0]
        for kind in ("experiment recipe", "domain recipe", "model section"):
            if first.startswith(f"# {kind}"):
                blocks[kind] = yaml.safe_load(body)
    return blocks


def _dataclass_of(tp):
    for candidate in (tp, *typing.get_args(tp)):
        if dataclasses.is_dataclass(candidate):
            return candidate
    return None


def _schema_differences(schema: type, documented: dict, prefix: str = "") -> list[str]:
    hints = typing.get_type_hints(schema)
    fields = {f.name for f in dataclasses.fields(schema)}
    out = [f"{prefix}{k}: documented, but no such key" for k in documented if k not in fields]
    for name in sorted(fields):
        if name not in documented:
            out.append(f"{prefix}{name}: a recipe key the schema leaves out")
            continue
        inner = _dataclass_of(hints[name])
        if inner is not None and isinstance(documented[name], dict):
            out += _schema_differences(inner, documented[name], f"{prefix}{name}.")
    return out


def test_the_recipe_schema_lists_every_key():
    blocks = _schema_blocks()
    assert set(blocks) == {"experiment recipe", "domain recipe", "model section"}
    problems = _schema_differences(ExperimentRecipe, blocks["experiment recipe"])
    problems += _schema_differences(DomainRecipe, blocks["domain recipe"])
    problems += _schema_differences(ModelSection, blocks["model section"]["model"], "model.")
    assert problems == []


def test_the_model_section_shows_the_defaults():
    documented = _schema_blocks()["model section"]["model"]
    assert documented == dataclasses.asdict(ModelSection())


# ------------------------------------------------------------------------------------------------
# docs/RUN_DIR.md and btx.recipe.run_dir.RunDir name the same paths
# ------------------------------------------------------------------------------------------------


def run_dir_doc_paths() -> set[str]:
    """The paths docs/RUN_DIR.md's listing names: its entries two spaces in (those indented deeper
    are files of the job above them), without the trailing slash of a directory."""
    text = (REPO / "docs" / "RUN_DIR.md").read_text()
    listing = text[text.index("```\ncheckpoints/<experiment>/\n") :]
    listing = listing[: listing.index("\n```", 4)]
    return {m.group(1).rstrip("/") for m in re.finditer(r"^  (\S+)", listing, re.M)}


def run_dir_paths() -> dict[str, set[str]]:
    """Every path attribute of RunDir, relative to the run directory, by attribute: a parameter is
    shown as the doc shows it (<domain>), and a baseline's protocol takes each of its values."""
    from btx.recipe.run_dir import BASELINE_PROTOCOLS, FinetuneDirs, RunDir

    root = Path("R")
    rd = RunDir(root)
    values = {"domain": ["<domain>"], "split": ["<split>"], "init": ["<init>"], "match": list(BASELINE_PROTOCOLS)}
    found: dict[str, set[str]] = {}
    for name, member in vars(RunDir).items():
        if name.startswith("_") or name == "root":
            continue
        if isinstance(member, property):
            results = [getattr(rd, name)]
        elif callable(member):
            params = list(inspect.signature(member).parameters)[1:]  # after self
            results = [getattr(rd, name)(*args) for args in itertools.product(*(values[p] for p in params))]
        else:
            continue
        paths = [p for r in results for p in (dataclasses.astuple(r) if isinstance(r, FinetuneDirs) else (r,))]
        found[name] = {str(p.relative_to(root)) for p in paths}
    return found


def test_the_run_dir_doc_lists_every_path_of_run_dir():
    documented, attributes = run_dir_doc_paths(), run_dir_paths()
    assert {"pipeline.json", "experts/<domain>/final", "baselines/upcycled-data-work"} <= documented  # parsed
    assert {"merged", "finetuned", "expert_final", "shard", "dense_baseline", "grow_finetune"} <= set(attributes)
    in_code = set().union(*attributes.values())
    assert sorted(in_code - documented) == [], "RunDir paths missing from docs/RUN_DIR.md"
    assert sorted(documented - in_code) == [], "docs/RUN_DIR.md lists paths that RunDir does not have"


SOURCE_PATH = re.compile(r"\b(?:btx|tests|tools|bench|docs|recipes|scripts)/[\w./-]*[\w/]")


def test_architecture_names_only_paths_that_exist():
    """docs/ARCHITECTURE.md is the code map: every file or folder it names is there, and it names
    every package of btx/."""
    text = (REPO / "docs" / "ARCHITECTURE.md").read_text()
    named = set(SOURCE_PATH.findall(text))
    assert len(named) >= 40, sorted(named)
    assert [p for p in sorted(named) if not (REPO / p).exists()] == []
    packages = {f"btx/{p.parent.relative_to(REPO / 'btx')}/" for p in (REPO / "btx").glob("*/__init__.py")}
    assert packages <= named, sorted(packages - named)


def test_the_docs_name_only_source_files_that_exist():
    """A moved module leaves no stale path behind in the README or docs/."""
    stale = [
        f"{doc.name}: {path}"
        for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
        for path in SOURCE_PATH.findall(doc.read_text())
        if path.endswith(".py") and not (REPO / path).exists()
    ]
    assert stale == []
