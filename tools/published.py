#!/usr/bin/env python
"""The figures btx publishes, generated from a real run and from the recipe, never typed in.

Generated blocks:

- one README block per published recipe (PUBLISHED: `demo`, between `<!-- demo:begin -->` and
  `<!-- demo:end -->`, and `demo-study`, the demo with both baseline protocols): the eval table of
  a real run of that recipe (every row of its eval/eval.json, with standard errors where the rows
  carry them), the seed-to-seed lines (BTX's margin over each baseline under both seeds), the
  stage times from its pipeline.json, the machine it ran on, and its figures;
- the arithmetic comment in the demo recipe's header (between `# <arithmetic>` and
  `# </arithmetic>`; tools/published_arithmetic.py says how it is computed).

A run is kept in the repository as a snapshot, docs/<recipe>/: its eval.json as written, run.json
(the stage times, the machine, each training job's steps, tokens and FLOPs from its DONE.json, and
the recipe's values it was run with, its base's included) and its PNGs. The README blocks are
rendered from the snapshots only, so they can be checked without rerunning anything.

    python tools/published.py snapshot checkpoints/demo [--machine TEXT]          # after `btx run demo`
    python tools/published.py snapshot checkpoints/demo-study --recipe demo-study  # after `btx run demo-study`
    python tools/published.py snapshot-seed RUN_DIR --seed 1 [--recipe NAME]      # a rerun with train.seed=1
    python tools/published.py render                                             # rewrite every block
    python tools/published.py --check                                            # CI: exit 1 when stale

`--check` (tests/test_published.py runs it) fails when a block differs from what its sources
give, when a snapshot was made from other recipe values than its recipe's now, or when the run's
steps and FLOPs are not what the recipe's arithmetic predicts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import re
import shutil
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # the btx package next to tools/, as in tools/routing_analysis.py
if str(ROOT / "tools") not in sys.path:
    sys.path.insert(0, str(ROOT / "tools"))
from published_arithmetic import (  # noqa: E402
    SEED_MANIFEST,
    Stale,
    arithmetic_comment,
    params_text,
    recipe_arithmetic,
)

from btx.recipe.run_dir import RunDir  # noqa: E402  (light: paths only)


@dataclasses.dataclass(frozen=True)
class Published:
    """A recipe whose real run the README shows: its snapshot directory and its README block."""

    name: str  # the built-in recipe's name: `btx run NAME`

    @property
    def recipe(self) -> str:
        return f"recipes/{self.name}/btx.yaml"

    @property
    def snapshot(self) -> str:
        return f"docs/{self.name}"

    @property
    def markers(self) -> tuple[str, str]:
        return f"<!-- {self.name}:begin -->", f"<!-- {self.name}:end -->"


# The demo (compute-matched baselines, as the paper's Table 3) and the study of both protocols.
DEMO, STUDY = Published("demo"), Published("demo-study")
PUBLISHED = {p.name: p for p in (DEMO, STUDY)}
README = "README.md"
RECIPE, SNAPSHOT = DEMO.recipe, DEMO.snapshot  # the recipe whose header holds the arithmetic
README_BEGIN, README_END = DEMO.markers
RECIPE_BEGIN, RECIPE_END = "# <arithmetic>", "# </arithmetic>"
RUN = RunDir(Path())  # the layout of a run directory, relative to it
# The run's pictures, copied into the snapshot: (file in the run directory, name in docs/demo/, alt text).
FIGURES = ((RUN.analysis / "layers_stacked.png", "routing.png", "routing of the finetuned demo MoE per layer"),)
# Any PNG eval/ writes (a loss-against-FLOPs plot, say) is copied too, under its own name.
# A row key holding standard errors: `stderr`, `losses_se`, `average_sem`, ... (a dict over the
# domains for the per-domain losses; a number when the key names the average).
STDERR_KEY = re.compile(r"(^|_)(se|sem|stderr|std_err)($|_)")
JOB_DIRS = {
    "seed": RUN.seed,
    "finetune": RUN.finetuned,
    "dense baseline": RUN.dense_baseline("compute"),
    "upcycled baseline": RUN.upcycled_baseline("compute"),
}


# ---------------------------------------------------------------------------------------------
# The snapshot of a run
# ---------------------------------------------------------------------------------------------


def recipe_values(recipe_path: Path) -> dict:
    """The values of an experiment recipe and its domain recipes as written (comments and paths
    of other checkouts do not count): {"btx.yaml": {...}, "<domain recipe path>": {...}}."""
    raw = yaml.safe_load(recipe_path.read_text()) or {}
    values = {recipe_path.name: raw}
    for _, rel in sorted((raw.get("domains") or {}).items()):
        values[str(rel)] = yaml.safe_load((recipe_path.parent / rel).read_text()) or {}
    if raw.get("base"):  # a recipe that changes another: the base's values count too
        values["base"] = recipe_values(recipe_path.parent / raw["base"])
    shipped_seed = recipe_path.parent / str((raw.get("seed") or {}).get("path")) / SEED_MANIFEST
    if shipped_seed.is_file():  # a seed that ships with the recipe: its bytes count too
        values["seed"] = json.loads(shipped_seed.read_text())["files"]
    return values


def _differences(old, new, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            where = f"{prefix}.{key}" if prefix else str(key)
            if key not in old:
                out.append(f"{where} added")
            elif key not in new:
                out.append(f"{where} removed")
            else:
                out += _differences(old[key], new[key], where)
        return out
    return [] if old == new else [f"{prefix}: {old!r} then, {new!r} now"]


def machine_description() -> str:
    """This machine in one line: CPU cores and model, OS, torch, GPU."""
    import torch

    model = ""
    try:
        model = next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            "",
        )
    except OSError:
        pass
    cpu = f"{os.cpu_count()} CPU cores" + (f" ({model})" if model else "")
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {gpu}, {platform.system()}, Python {platform.python_version()}, torch {torch.__version__}"


def snapshot(run_dir: Path, root: Path = ROOT, machine: str | None = None, pub: Published = DEMO) -> Path:
    """Copy a finished run of `pub`'s recipe into `root`/docs/<name>/ (replacing the old one)."""
    from btx.io.manifest import read_done
    from btx.run.pipeline import STAGE_NAMES

    run_dir, rd = Path(run_dir), RunDir(Path(run_dir))
    eval_json = rd.eval / "eval.json"
    ledger_path = rd.ledger
    for needed in (eval_json, ledger_path):
        if not needed.is_file():
            raise Stale(f"{needed}: missing; snapshot takes a run directory that `btx run` finished")
    ledger = json.loads(ledger_path.read_text())
    stages = [
        {"stage": s, "seconds": ledger[s]["seconds"], "summary": ledger[s].get("summary", "")}
        for s in STAGE_NAMES
        if isinstance(ledger.get(s), dict)
    ]  # in pipeline order
    finished = max((ledger[s["stage"]].get("finished_at", "") for s in stages), default="")
    jobs = {}
    for name, rel in [
        *JOB_DIRS.items(),
        *((f"expert:{p.name}", RUN.expert(p.name)) for p in sorted(rd.experts.glob("*"))),
    ]:
        done = read_done(run_dir / rel)
        if done is not None and "steps" in done:
            jobs[name] = {k: done.get(k) for k in ("steps", "tokens", "train_flops", "wall_time_s")}
    out = root / pub.snapshot
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    shutil.copyfile(eval_json, out / "eval.json")
    figures = []
    for rel, name, alt in FIGURES:
        if (run_dir / rel).is_file():
            shutil.copyfile(run_dir / rel, out / name)
            figures.append({"file": name, "alt": alt})
    for png in sorted(rd.eval.glob("*.png")):
        shutil.copyfile(png, out / png.name)
        figures.append({"file": png.name, "alt": f"demo eval: {png.stem.replace('_', ' ')}"})
    record = {
        "recipe": pub.recipe,
        "recipe_values": recipe_values(root / pub.recipe),
        "machine": machine or machine_description(),
        "finished_at": finished,
        "stages": stages,
        "jobs": jobs,
        "figures": figures,
    }
    (out / "run.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return out


# ---------------------------------------------------------------------------------------------
# The README block
# ---------------------------------------------------------------------------------------------


def _stderrs(row: dict, domains: list[str]) -> tuple[dict, float | None]:
    per_domain, average = {}, None
    for key, value in row.items():
        if not STDERR_KEY.search(key):
            continue
        if isinstance(value, dict) and set(value) >= set(domains):
            per_domain = value
        elif isinstance(value, (int, float)) and "average" in key:
            average = float(value)
    return per_domain, average


def _loss(value, se) -> str:
    return f"{value:.4f}" if not isinstance(se, (int, float)) else f"{value:.4f} ± {se:.4f}"


def duration(seconds: float) -> str:
    s = round(seconds)
    return f"{s // 60} min {s % 60} s" if s >= 60 else f"{seconds:.1f} s"


def _md(text: str) -> str:
    return str(text).replace("|", "\\|")


def eval_table(data: dict) -> list[str]:
    """A markdown table of every row of an eval.json, best value of each loss column in bold."""
    domains = list(data["domains"])
    rows = data["rows"]
    averages = [r.get("average", sum(r["losses"][d] for d in domains) / len(domains)) for r in rows]
    best = {d: min(r["losses"][d] for r in rows) for d in domains}
    head = ["model", *domains, "average", "train FLOPs", "active params"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" + "---:|" * (len(head) - 1)]
    for row, average in zip(rows, averages, strict=True):
        se, average_se = _stderrs(row, domains)
        cells = [_md(row["name"])]
        for d in domains:
            cell = _loss(row["losses"][d], se.get(d))
            cells.append(f"**{cell}**" if row["losses"][d] == best[d] else cell)
        cell = _loss(average, average_se)
        cells.append(f"**{cell}**" if average == min(averages) else cell)
        flops, active = row.get("train_flops"), row.get("active_params")
        cells.append("-" if flops is None else f"{flops:.3g}")
        cells.append("-" if active is None else params_text(active))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


SPREAD_ROWS = (
    "BTX",
    "BTM ensemble",
    "dense (compute-matched)",
    "dense (data-matched)",
    "sparse upcycling (compute-matched)",
    "sparse upcycling (data-matched)",
)


def snapshot_seed(run_dir: Path, seed: int, root: Path = ROOT, pub: Published = DEMO) -> Path:
    """Record the averages of a rerun of `pub`'s recipe with train.seed=`seed` (docs/<name>/seed-N.json)."""
    eval_json = RunDir(Path(run_dir)).eval / "eval.json"
    if not eval_json.is_file():
        raise Stale(f"{eval_json}: missing; snapshot-seed takes a run directory that `btx run` finished")
    rows = json.loads(eval_json.read_text())["rows"]
    out = root / pub.snapshot / f"seed-{seed}.json"
    out.write_text(
        json.dumps(
            {
                "train_seed": seed,
                "recipe_values": recipe_values(root / pub.recipe),
                "averages": {r["name"]: r["average"] for r in rows},
            },
            indent=2,
            sort_keys=True,
        )
        + "\n"
    )
    return out


def spread_lines(data: dict, spreads: list[dict]) -> list[str]:
    """The seed-to-seed spread: each rerun's averages beside the snapshot's, and BTX's margin over
    each baseline (the baseline's average minus BTX's: positive when BTX is lower) under both seeds."""
    base = {r["name"]: r["average"] for r in data["rows"]}
    out = []
    for other in spreads:
        seed = other["train_seed"]
        names = [n for n in SPREAD_ROWS if n in base and n in other["averages"]]
        out.append(
            f"- Seed-to-seed: the same recipe with `train.seed={seed}` "
            "(the init and batches of every job it trains) gives "
            + ", ".join(f"{_md(n)} {base[n]:.4f} → {other['averages'][n]:.4f}" for n in names)
            + "."
        )
        margins = []
        for n in names:
            if n == "BTX":
                continue
            first, second = base[n] - base["BTX"], other["averages"][n] - other["averages"]["BTX"]
            margins.append(f"{_md(n)} {first:+.4f} / {second:+.4f} (spread {abs(first - second):.4f})")
        if margins:
            out.append(
                f"- BTX's margin over each (its average minus BTX's; positive: BTX is lower), seed 0 / seed {seed}: "
                + "; ".join(margins)
                + "."
            )
    if len(spreads) > 1:
        out.append(_margin_ranges(base, spreads))
    return out


def _margin_ranges(base: dict, spreads: list[dict]) -> str:
    """BTX's margin over each baseline under every seed at once: its lowest, its highest, their spread."""
    runs = [(0, base), *((o["train_seed"], o["averages"]) for o in spreads)]
    parts = []
    for n in SPREAD_ROWS:
        if n == "BTX" or not all(n in avg and "BTX" in avg for _, avg in runs):
            continue
        margins = [avg[n] - avg["BTX"] for _, avg in runs]
        parts.append(f"{_md(n)} {min(margins):+.4f} to {max(margins):+.4f} (spread {max(margins) - min(margins):.4f})")
    seeds = ", ".join(str(seed) for seed, _ in runs)
    return f"- Over seeds {seeds}, BTX's lowest and highest margin over each: " + "; ".join(parts) + "."


def readme_block(data: dict, run: dict, tokenizer: str, spreads: list[dict] | None = None, pub=DEMO) -> list[str]:
    """`pub`'s README block (without the markers), from its snapshot's eval.json and run.json."""
    domains = list(data["domains"])
    rows = {r["name"]: r for r in data["rows"]}
    unit = "nats/token" + ("; the demo's tokens are bytes, so nats/token = nats/byte" if tokenizer == "byte" else "")
    out = [
        f"<!-- generated by tools/published.py from {pub.snapshot}/ (a real `btx run {pub.name}`): "
        "do not edit by hand -->",
        "",
        f"Validation loss of every model of the run ({unit}; lower is better, the best of each column in bold):",
        "",
        *eval_table(data),
        "",
    ]
    seed = rows.get("seed")
    experts = [(d, rows[f"expert:{d}"]) for d in domains if f"expert:{d}" in rows]
    if seed and experts:
        out.append(
            "- Each expert on its own domain, against the seed: "
            + ", ".join(f"{d} {r['losses'][d]:.4f} vs {seed['losses'][d]:.4f}" for d, r in experts)
            + "."
        )
    ranked = sorted(data["rows"], key=lambda r: r.get("average", math.inf))
    out.append("- Averages, best first: " + ", ".join(f"{_md(r['name'])} {r['average']:.4f}" for r in ranked) + ".")
    out += spread_lines(data, spreads or [])
    stages = run["stages"]
    total = sum(s["seconds"] for s in stages)
    out.append(
        f"- The run took {duration(total)} ("
        + ", ".join(f"{s['stage']} {duration(s['seconds'])}" for s in stages)
        + ")"
    )
    out += [f"  on {run['machine']}, finishing {run['finished_at'][:10]}.", ""]
    for figure in run.get("figures", []):
        out += [f"![{figure['alt']}]({pub.snapshot}/{figure['file']})", ""]
    return out[:-1] if out[-1] == "" else out


# ---------------------------------------------------------------------------------------------
# Blocks in files
# ---------------------------------------------------------------------------------------------


def _replace_block(text: str, begin: str, end: str, lines: list[str], where: str) -> str:
    pattern = re.compile(rf"^{re.escape(begin)}[^\n]*\n(.*?)^{re.escape(end)}[^\n]*$", re.S | re.M)
    found = pattern.findall(text)
    if len(found) != 1:
        raise Stale(f"{where}: expected one block between the markers {begin!r} and {end!r}, found {len(found)}")
    match = pattern.search(text)
    head = match.group(0).split("\n", 1)[0]
    tail = match.group(0).rsplit("\n", 1)[1]
    return text[: match.start()] + "\n".join([head, *lines, tail]) + text[match.end() :]


def expected_files(root: Path = ROOT, missing_ok: bool = False) -> dict[Path, str]:
    """{file: its text with every generated block as its sources give it}. A published recipe
    without a snapshot is Stale, or with `missing_ok` keeps its block as it is."""
    from btx.recipe.load import load_experiment

    recipe_path = root / RECIPE
    exp = load_experiment(recipe_path)
    out = {
        recipe_path: _replace_block(
            recipe_path.read_text(), RECIPE_BEGIN, RECIPE_END, arithmetic_comment(exp), str(recipe_path)
        )
    }
    readme = root / README
    text = readme.read_text()
    for pub in PUBLISHED.values():
        snap = root / pub.snapshot
        missing = [p for p in (snap / "eval.json", snap / "run.json") if not p.is_file()]
        if missing and missing_ok:
            continue
        if missing:
            raise Stale(
                f"{missing[0]}: missing; run `btx run {pub.name}` and "
                f"`python tools/published.py snapshot checkpoints/{pub.name} --recipe {pub.name}`"
            )
        data = json.loads((snap / "eval.json").read_text())
        run = json.loads((snap / "run.json").read_text())
        spreads = [json.loads(p.read_text()) for p in sorted(snap.glob("seed-*.json"))]
        tokenizer = str(load_experiment(root / pub.recipe).recipe.tokenizer)
        text = _replace_block(text, *pub.markers, readme_block(data, run, tokenizer, spreads, pub), str(readme))
    out[readme] = text
    return out


def snapshot_problems(root: Path = ROOT, pub: Published = DEMO) -> list[str]:
    """Why `pub`'s snapshot (docs/<name>/) does not describe a run of its recipe as it is now."""
    from btx.recipe.load import load_experiment

    snap = root / pub.snapshot
    if not (snap / "run.json").is_file():
        return []  # expected_files names it
    run = json.loads((snap / "run.json").read_text())
    redo = (
        f"; run `btx run {pub.name}`, then "
        f"`python tools/published.py snapshot checkpoints/{pub.name} --recipe {pub.name}`"
    )
    values = recipe_values(root / pub.recipe)
    changed = _differences(run.get("recipe_values"), values)
    if changed:
        return [
            f"{snap / 'run.json'}: made from other recipe values than {pub.recipe}'s now ({'; '.join(changed[:3])})"
            + redo
        ]
    for spread in sorted(snap.glob("seed-*.json")):
        changed = _differences(json.loads(spread.read_text()).get("recipe_values"), values)
        if changed:
            return [
                f"{spread}: made from other recipe values than {pub.recipe}'s now ({'; '.join(changed[:3])}); rerun "
                "it, or remove it"
            ]
    a = recipe_arithmetic(load_experiment(root / pub.recipe))
    predicted = {"finetune": a.finetune, **{f"expert:{d}": s for d, s in a.experts.items()}}
    if a.seed_recipe is None:  # a shipped seed is checked by tests/test_demo_seed.py instead
        predicted["seed"] = a.seed
    problems = []
    for name, stage in predicted.items():
        job = run["jobs"].get(name)
        if job is None:
            problems.append(f"{snap / 'run.json'}: no {name} job recorded" + redo)
        elif (job["steps"], job["tokens"]) != (stage.steps, stage.tokens) or not math.isclose(
            job["train_flops"], stage.flops, rel_tol=1e-9
        ):
            problems.append(
                f"{snap / 'run.json'}: {name} ran {job['steps']} steps, {job['tokens']} tokens, "
                f"{job['train_flops']:.6g} FLOPs; the recipe's arithmetic says {stage.steps}, "
                f"{stage.tokens}, {stage.flops:.6g}"
            )
    for name, steps in (("dense baseline", a.dense_steps), ("upcycled baseline", a.upcycled_steps)):
        job = run["jobs"].get(name)
        if job is not None and job["steps"] != steps:
            problems.append(
                f"{snap / 'run.json'}: the {name} ran {job['steps']} steps; the recipe's arithmetic says {steps}"
            )
    return problems


def check(root: Path = ROOT) -> list[str]:
    """Every way the published figures under `root` disagree with their sources (empty: all true)."""
    try:
        problems = [p for pub in PUBLISHED.values() for p in snapshot_problems(root, pub)]
        for path, text in expected_files(root).items():
            if path.read_text() != text:
                problems.append(
                    f"{path}: its generated block differs from what its sources give; run "
                    "`python tools/published.py render`"
                )
    except Stale as e:
        problems = [str(e)]
    return problems


def render(root: Path = ROOT) -> list[Path]:
    """Rewrite every block that has its sources; returns the files that changed."""
    changed = []
    for path, text in expected_files(root, missing_ok=True).items():
        if path.read_text() != text:
            path.write_text(text)
            changed.append(path)
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tools/published.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when a published figure is stale (for CI)")
    sub = parser.add_subparsers(dest="command")
    snap = sub.add_parser("snapshot", help="copy a finished run into docs/<recipe>/, then render")
    snap.add_argument("run_dir", metavar="RUN_DIR", type=Path)
    snap.add_argument("--machine", default=None, help="the machine it ran on (default: this one, detected)")
    seed = sub.add_parser("snapshot-seed", help="record a rerun's averages (train.seed=N) for the spread lines")
    seed.add_argument("run_dir", metavar="RUN_DIR", type=Path)
    seed.add_argument("--seed", type=int, required=True)
    for p in (snap, seed):
        p.add_argument("--recipe", choices=sorted(PUBLISHED), default=DEMO.name, help="the recipe it ran (demo)")
    sub.add_parser("render", help="rewrite the README blocks and the recipe's arithmetic block")
    args = parser.parse_args(argv)
    try:
        if args.check or args.command is None:
            problems = check()
            for p in problems:
                print(f"published: {p}", file=sys.stderr)
            return 1 if problems else 0
        if args.command == "snapshot":
            print(f"wrote {snapshot(args.run_dir, machine=args.machine, pub=PUBLISHED[args.recipe])}")
        if args.command == "snapshot-seed":
            print(f"wrote {snapshot_seed(args.run_dir, args.seed, pub=PUBLISHED[args.recipe])}")
        for path in render():
            print(f"rewrote {path}")
        problems = check()
        for p in problems:  # e.g. a run made before the recipe's values were edited
            print(f"published: {p}", file=sys.stderr)
        return 1 if problems else 0
    except Stale as e:
        print(f"published: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
