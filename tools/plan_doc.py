"""The numbers of docs/PLAN.md, generated from `btx plan` on recipes/llama2-7b.

    python tools/plan_doc.py render   # rewrite the generated blocks of docs/PLAN.md
    python tools/plan_doc.py check    # exit 1 when they are stale (tests/test_plan.py runs this)

Each generated block sits between `<!-- plan:NAME -->` and `<!-- /plan:NAME -->`; the prose around
them is written by hand.
"""

from __future__ import annotations

import io
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rich.console import Console  # noqa: E402

from btx.cli import parse_args  # noqa: E402
from btx.plan.command import build_plan  # noqa: E402
from btx.plan.gpus import GPUS  # noqa: E402
from btx.plan.report import print_plan  # noqa: E402

DOC = ROOT / "docs" / "PLAN.md"
RECIPE = "recipes/llama2-7b/btx.yaml"
SEED_CONFIG = "recipes/llama2-7b/seed-config.json"
# The paper's Table 3 (Sukhbaatar et al. 2024): MoE share, wall days, GPU-days, tokens.
PAPER = {
    "btx": (0.23, 7.8, 926.1, 533e9),
    "upcycled": (1.0, 7.9, 1007.1, 252e9),
}
GPU = "H100"


def plan(*extra: str) -> dict:
    argv = ["plan", RECIPE, "--gpu", GPU, "--seed-config", SEED_CONFIG, *extra]
    return build_plan(parse_args(argv))


def _table3() -> str:
    default = plan()
    implied = plan("--reference-gpu-days", str(PAPER["btx"][2]))["reference"]["implied_mfu"]
    at_paper = plan("--mfu", f"{implied:.6f}")
    up = next(b for b in at_paper["baselines"] if b["job"] == "baseline:upcycled-compute")
    up_fpt = next(j for j in at_paper["jobs"] if j["job"] == "baseline:upcycled-compute")["flops_per_token"]
    paper_up_mfu = PAPER["upcycled"][3] * up_fpt / (PAPER["upcycled"][2] * 86400 * GPUS[GPU].peak_flops)

    def row(name: str, share: float, wall_h: float, gpu_h: float, tokens: float) -> str:
        return f"| {name} | {share:.1%} | {wall_h / 24:.1f} | {gpu_h / 24:,.1f} | {tokens / 1e9:,.1f}B |"

    b, bp = default["btx"], at_paper["btx"]
    lines = [
        "| | MoE share | wall (days) | GPU-days | tokens |",
        "|---|---|---|---|---|",
        "| **BTX**, paper Table 3 | 23% | 7.8 | 926.1 | 533B |",
        row(
            f"BTX, `btx plan` at MFU {default['mfu']:.0%} (default)",
            b["moe_share"],
            b["wall_hours"],
            b["gpu_hours"],
            b["tokens"],
        ),
        row(
            f"BTX, `btx plan` at MFU {implied:.1%} (the paper's GPU-days)",
            bp["moe_share"],
            bp["wall_hours"],
            bp["gpu_hours"],
            bp["tokens"],
        ),
        "| **sparse upcycling, compute-matched**, paper Table 3 | 100% | 7.9 | 1007.1 | 252B |",
        row(
            f"sparse upcycling, FLOP-matched, `btx plan` at MFU {implied:.1%}",
            1.0,
            up["wall_hours"],
            up["gpu_hours"],
            up["tokens"],
        ),
        "",
        f"- The paper's 926.1 GPU-days for BTX's {b['flops']:.3g} training FLOPs imply an MFU of "
        f"**{implied:.1%} on an {GPU}** (989 TFLOP/s bf16 dense); on an A100 (312 TFLOP/s) they would "
        f"need {implied * GPUS[GPU].peak_flops / GPUS['A100-80GB'].peak_flops:.1%} of its peak, which no training run "
        "reaches.",
        f"- The paper's upcycled baseline trained {PAPER['upcycled'][3] / 1e9:.0f}B tokens of "
        f"{up_fpt / 1e9:.1f} GFLOPs each in {PAPER['upcycled'][2]} GPU-days: an MFU of "
        f"{paper_up_mfu:.1%} on an {GPU}, below the {implied:.1%} of BTX's jobs. The paper matched the "
        "baseline on GPU-days; btx matches FLOPs (btx.run.baselines), which gives the upcycled MoE "
        f"{up['tokens'] / 1e9:,.1f}B tokens at one MFU for every job.",
    ]
    return "\n".join(lines)


def _terminal() -> str:
    out = io.StringIO()
    print_plan(plan("--reference-gpu-days", str(PAPER["btx"][2])), Console(file=out, width=120, no_color=True))
    text = "\n".join(line.rstrip() for line in out.getvalue().splitlines())
    return f"```\n$ btx plan {RECIPE} --gpu {GPU} --seed-config {SEED_CONFIG} --reference-gpu-days 926.1\n{text}\n```"


BLOCKS = {"table3": _table3, "terminal": _terminal}


def render(text: str) -> str:
    for name, make in BLOCKS.items():
        pattern = re.compile(rf"(<!-- plan:{name} -->\n).*?(<!-- /plan:{name} -->)", re.S)
        if not pattern.search(text):
            raise SystemExit(f"{DOC}: no <!-- plan:{name} --> block")
        body = make() + "\n"
        text = pattern.sub(lambda m, body=body: m.group(1) + body + m.group(2), text)
    return text


def main(argv: list[str]) -> int:
    if argv[:1] not in (["render"], ["check"]):
        print(__doc__)
        return 2
    current = DOC.read_text()
    fresh = render(current)
    if argv[0] == "render":
        DOC.write_text(fresh)
        return 0
    if fresh != current:
        print(f"{DOC} is stale: run python tools/plan_doc.py render", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
