"""The comparison table of an evaluation: the terminal (fitted to its width), markdown and JSON.

Each row shows per-domain loss ± standard error, the average, perplexity, the training FLOPs
beyond the seed and the active parameters; paired differences are taken against REFERENCE_ROW.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from btx.evaluate.plot import PLOT_NAME, plot_loss_vs_flops, text_scatter
from btx.evaluate.scores import EvalRow, paired_differences
from btx.io.atomic import dumps_json
from btx.ui.tables import Column, FitTable

# The wording predates btx/model/flops.py's move; kept so that eval.json and eval.md stay byte for byte
# what they were (docs/demo/ snapshots, published figures).
FLOPS_NOTE = (
    "train FLOPs: training FLOPs beyond the seed, counted as btx.flops does: 6 per trained weight and "
    "token, 4 per frozen weight (no weight gradient), 2 where nothing before it trains; embedding "
    "lookups 0. ± is the standard error over the validation windows."
)
REFERENCE_ROW = "BTX"  # the row the paired differences are taken against


def _loss_cell(loss: float, stderr: float | None) -> str:
    return f"{loss:.4f}" if stderr is None else f"{loss:.4f} ± {stderr:.4f}"


def _cells(r: EvalRow, domains: list[str], domain_stderr: bool = True) -> list[str]:
    return [
        r.name,
        *(_loss_cell(r.losses[d], r.stderr.get(d) if domain_stderr else None) for d in domains),
        _loss_cell(r.average, r.average_stderr),
        _ppl(r.average),
        _flops(r.train_flops),
        _params(r.active_params),
    ]


def render(
    rows: list[EvalRow],
    domains: list[str],
    title: str = "Validation loss (nats/token; lower is better)",
    console: Console | None = None,
) -> None:

    console = console or Console()
    columns = [
        Column("model", "label"),
        *(Column(escape(d)) for d in domains),
        Column("average"),
        Column("ppl (avg)", optional=True),
        Column("train FLOPs"),
        Column("active params"),
    ]
    best = {d: min(r.losses[d] for r in rows) for d in domains}
    best_avg = min(r.average for r in rows)
    cells = []
    for r in rows:
        row = _cells(r, domains)
        row[0] = escape(row[0])
        for i, d in enumerate(domains, start=1):
            if r.losses[d] == best[d]:
                row[i] = f"[bold green]{row[i]}[/]"
        if r.average == best_avg:
            row[len(domains) + 1] = f"[bold green]{row[len(domains) + 1]}[/]"
        cells.append(row)
    # btx.ui.tables keeps every number whole: a narrow terminal or a log file gets fewer columns or
    # one block per model instead of cut values.
    console.print(
        FitTable(columns, cells, title=title, caption=FLOPS_NOTE if any(r.train_flops for r in rows) else None)
    )
    differences = paired_differences(rows, REFERENCE_ROW)
    if differences:
        console.print(f"average minus {REFERENCE_ROW}'s, paired over the same windows (± standard error):")
        for name, diff in differences.items():
            console.print(f"  {escape(name):<40} {_signed(diff['average'], diff['stderr'])}", highlight=False)
    chart = text_scatter(rows)
    if chart:
        console.print(chart, markup=False, highlight=False, soft_wrap=True)


def _signed(value: float, stderr: float | None) -> str:
    return f"{value:+.4f}" + ("" if stderr is None else f" ± {stderr:.4f}")


def _ppl(loss: float) -> str:
    return f"{math.exp(loss):.3f}" if loss < 700 else "inf"


def _flops(f: float | None) -> str:
    return "-" if f is None else f"{f:.3g}"


def _params(p: int | None) -> str:
    return "-" if p is None else f"{p / 1e6:.2f}M"


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|")


def to_markdown(rows: list[EvalRow], domains: list[str], task_groups: dict[str, dict] | None = None) -> str:
    """The table; below it, when there is more than the table to say, the FLOPs note and the
    paired differences from the BTX row. `task_groups` ({row: {group: score}}, when downstream
    tasks ran) adds a column per group, in %."""
    groups = list(dict.fromkeys(g for averages in (task_groups or {}).values() for g in averages))
    head = ["model", *domains, "average", "ppl (avg)", "train FLOPs", "active params"]
    head += [f"tasks: {g} (%)" for g in groups]
    lines = ["| " + " | ".join(map(_md_cell, head)) + " |", "|" + "---|" * len(head)]
    for r in rows:
        scores = (task_groups or {}).get(r.name, {})
        extra = [f"{100 * scores[g]:.1f}" if g in scores else "-" for g in groups]
        lines.append("| " + " | ".join(map(_md_cell, [*_cells(r, domains), *extra])) + " |")
    if any(r.train_flops for r in rows):
        lines += ["", FLOPS_NOTE]
    if groups:
        lines += ["", "tasks: downstream-task group averages from tasks.md (lm-evaluation-harness)."]
    differences = paired_differences(rows, REFERENCE_ROW)
    if differences:
        lines += ["", f"| model | average minus {REFERENCE_ROW}'s (paired, ± standard error) |", "|---|---|"]
        lines += [f"| {_md_cell(name)} | {_signed(d['average'], d['stderr'])} |" for name, d in differences.items()]
    return "\n".join(lines) + "\n"


def _perplexity(loss: float) -> float | None:
    return math.exp(loss) if loss < 700 else None


def save(
    rows: list[EvalRow],
    domains: list[str],
    out_dir: str | Path,
    extra: dict | None = None,
    console: Console | None = None,
    task_groups: dict[str, dict] | None = None,
) -> dict[str, Path]:
    """Write `eval.json`, `eval.md` and, with matplotlib, `loss_vs_flops.png` into out_dir
    (`task_groups`: see `to_markdown`; eval.json gains them under "task_groups")."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = {
        "domains": domains,
        "rows": [
            asdict(r)
            | {
                "average": r.average,
                "average_stderr": r.average_stderr,
                "perplexity": {d: _perplexity(v) for d, v in r.losses.items()},
                "average_perplexity": _perplexity(r.average),
            }
            for r in rows
        ],
        "flops_counting": FLOPS_NOTE,
        "differences_from": {"reference": REFERENCE_ROW, "rows": paired_differences(rows, REFERENCE_ROW)},
        **(extra or {}),
        **({"task_groups": task_groups} if task_groups else {}),
    }
    (out / "eval.json").write_text(dumps_json(data, indent=2) + "\n")
    (out / "eval.md").write_text(to_markdown(rows, domains, task_groups))
    paths = {"json": out / "eval.json", "markdown": out / "eval.md"}
    note = plot_loss_vs_flops(rows, out / PLOT_NAME)
    if note is None:
        paths["plot"] = out / PLOT_NAME
    elif console is not None and note:
        console.print(escape(note), soft_wrap=True)
    return paths
