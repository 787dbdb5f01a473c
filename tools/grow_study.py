"""Growing versus merging in one go, measured on a recipe (default: the demo).

    python tools/grow_study.py [--recipe demo] [--root /tmp/grow-study] [--add prose] [--router-init ridge]

1. `one-go`: `btx run RECIPE` with every domain merged and finetuned together.
2. `grown`: the same seed and experts (copied from the one-go run, which `btx run` adopts), but
   `grow.domains=[ADD]`: the other domains are merged and finetuned, and the finished MoE is then
   grown by ADD's expert and finetuned for as many steps as the one-go finetune (the same
   finetune budget), on the same mixture of every domain.
3. The router-init table (`btx eval --router-inits`) on the one-go run.

Prints, and writes to ROOT/grow_study.md: the per-domain validation loss of each MoE, and what
growing cost against re-merging and re-finetuning (wall seconds from each run's ledger, training
FLOPs from the DONE.json files). The new domain's expert is trained in both paths, so it is left
out of both costs. Run one study at a time: timings of concurrent runs are meaningless.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from btx.recipe.run_dir import RunDir  # noqa: E402  (the btx package of this checkout, on the path just above)


def run(recipe: str, overrides: list[str]) -> float:
    from btx.run.pipeline import run as btx_run

    t0 = time.perf_counter()
    btx_run(recipe, overrides)
    return time.perf_counter() - t0


def rows(run: RunDir) -> dict[str, dict]:
    return {r["name"]: r for r in json.loads((run.eval / "eval.json").read_text())["rows"]}


def ledger(run: RunDir) -> dict:
    return json.loads(run.ledger.read_text())


def flops(path: Path) -> float:
    from btx.io.manifest import read_done

    return float((read_done(path) or {}).get("train_flops") or 0.0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="demo")
    ap.add_argument("--root", default="/tmp/grow-study")
    ap.add_argument("--add", default="prose", help="the domain grown in afterwards")
    ap.add_argument("--router-init", default="ridge")
    ap.add_argument("--trainable", default="all", help="the grown MoE's finetune: all or router_only")
    ap.add_argument("--extra", nargs="*", default=[], help="overrides for both runs (e.g. train.trainable=ffn)")
    args = ap.parse_args()

    from btx.recipe.load import load_experiment

    root = Path(args.root)
    onego, grown = root / "one-go", root / "grown"
    rd_onego, rd_grown = RunDir(onego), RunDir(grown)
    common = ["eval.baselines=false", *args.extra]
    wall_onego = run(args.recipe, [f"run_dir={onego}", *common])
    exp = load_experiment(args.recipe, [f"run_dir={onego}", *common])
    steps = exp.finetune_train.steps
    if grown.exists():
        shutil.rmtree(grown)
    grown.mkdir(parents=True)
    for part in ("data_root", "seed", "experts"):  # made outside the grown run: it adopts them
        shutil.copytree(getattr(rd_onego, part), getattr(rd_grown, part), symlinks=True)
    # The MoE without ADD is finetuned without ADD's data (weight 0 in the mixture) and the grown
    # one on every domain equally, as the one-go finetune.
    grow = [
        f"grow.domains=[{args.add}]",
        f"grow.router_init={args.router_init}",
        f"grow.steps={steps}",
        f"grow.trainable={args.trainable}",
        *([f"finetune.mixture.{args.add}=0"] if exp.finetune.mixture else []),
    ]
    wall_grown = run(args.recipe, [f"run_dir={grown}", *common, *grow])

    from btx.recipe.load import load_experiment as load
    from btx.run.router_inits import router_init_table

    t0 = time.perf_counter()
    inits = ["random", "zeros", "centroid", "ridge", *(["hidden"] if exp.merge.prompts else [])]
    router_init_table(load(args.recipe, [f"run_dir={onego}", *common]), inits)
    wall_table = time.perf_counter() - t0

    a, b = rows(rd_onego), rows(rd_grown)
    domains = list(exp.domains)
    table = [
        ("one go: BTX, every domain merged", a["BTX"]),
        ("one go: merged, no finetune", a["BTX merged (no finetune)"]),
        (f"without {args.add}: BTX", b["BTX"]),
        ("grown: no finetune", b["BTX grown (no finetune)"]),
        (f"grown: + {steps} finetune steps ({args.trainable})", b["BTX grown"]),
    ]
    lines = [
        f"# Growing vs merging in one go ({args.recipe}, {args.add} added, {args.router_init} routers)",
        "",
        "| MoE | " + " | ".join(domains) + " | average |",
        "|---|" + "---|" * (len(domains) + 1),
    ]
    for name, r in table:
        lines.append(f"| {name} | " + " | ".join(f"{r['losses'][d]:.4f}" for d in domains) + f" | {r['average']:.4f} |")
    la, lb = ledger(rd_onego), ledger(rd_grown)
    remerge_s = la["merge"]["seconds"] + la["finetune"]["seconds"]
    grow_s = lb["grow"]["seconds"]
    remerge_f = flops(rd_onego.finetuned)
    grow_f = flops(rd_grown.grow_finetune.export)
    lines += [
        "",
        "| cost of the new domain (its expert aside) | wall s | training FLOPs |",
        "|---|---|---|",
        f"| re-merge + re-finetune ({steps} steps) | {remerge_s:.1f} | {remerge_f:.3e} |",
        f"| grow + finetune ({steps} steps) | {grow_s:.1f} | {grow_f:.3e} |",
        f"| ratio grow / re-merge | {grow_s / remerge_s:.2f} | {grow_f / max(remerge_f, 1):.2f} |",
        "",
        f"whole runs: one go {wall_onego:.0f} s, grown {wall_grown:.0f} s (seed and experts adopted); "
        f"router-init table {wall_table:.0f} s",
        "",
        "router-init table (merged, no finetune): " + str(rd_onego.router_init_table / "eval.md"),
    ]
    text = "\n".join(lines) + "\n"
    (root / "grow_study.md").write_text(text)
    print(text)
    print((rd_onego.router_init_table / "eval.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
