"""Showing and saving a routing analysis: rich tables in the terminal, routing.json, CSV, PNGs.

The numbers come from `btx.evaluate.routing_analysis.analyze_checkpoint` (see btx/evaluate/routing.py
for what each means); this module only presents them (`btx analyze` itself is btx/evaluate/analyze.py).

Output directory
    routing.json            every number (structure: docs/ROUTING.md; the file's own "definitions")
    routing.csv             long format: domain, layer, expert, top1_frac, topk_frac, mean_prob, load_share
                            (domain "(overall)" = all domains together)
    heatmap_<domain>.png    layers x experts, coloured by the chosen metric (default load_share)
    layers_stacked.png      per domain, stacked bars of expert shares per layer (paper Fig. 3)
    compare/                with --compare: B's routing.json and CSV, diff_<domain>.png (B - A),
                            B's layers_stacked.png
    DONE.json               (recipe mode) written last: the analysis stage is finished
PNGs need matplotlib (`pip install 'btx[plots]'`); without it everything else is written and a
note says so.
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections.abc import Sequence
from pathlib import Path

from rich.console import Group
from rich.markup import escape as rich_escape
from rich.rule import Rule
from rich.text import Text

from btx.io.atomic import dumps_json
from btx.ui.pyplot import pyplot
from btx.ui.tables import Column, FitTable


def escape(text: str) -> str:
    """User-given names (paths, domains, experts) shown inside rich markup stay literal."""

    return rich_escape(text)


# matplotlib's tab10: distinct, colour-blind-friendlier than a rainbow, and the same in the
# terminal and in the PNGs so an expert keeps its colour everywhere.
EXPERT_COLORS = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
    "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
)  # fmt: skip
METRICS = ("load_share", "top1_frac", "topk_frac", "mean_prob")
PLOTS_NOTE = "PNG plots skipped: matplotlib is not installed (pip install 'btx[plots]' or pip install matplotlib)"
OVERALL = "(overall)"


def expert_color(e: int) -> str:
    return EXPERT_COLORS[e % len(EXPERT_COLORS)]


def text_on(color: str) -> str:
    """Black or white, whichever reads better on `color` (by its relative luminance)."""
    r, g, b = (int(color[i : i + 2], 16) / 255 for i in (1, 3, 5))
    return "black" if 0.2126 * r + 0.7152 * g + 0.0722 * b > 0.45 else "white"


# --------------------------------------------------------------------------------------------
# Terminal
# --------------------------------------------------------------------------------------------


def _blend(t: float, low=(247, 251, 255), high=(8, 48, 107)) -> str:
    """A colour between `low` and `high` (matplotlib's Blues ends) for t in [0, 1]."""
    t = min(max(t, 0.0), 1.0)
    return "#" + "".join(f"{round(a + (b - a) * t):02x}" for a, b in zip(low, high, strict=False))


def _cell(value: float, vmax: float, diverging: bool = False):

    if diverging:  # red for B > A, blue for B < A, white at 0
        t = 0.0 if vmax <= 0 else min(abs(value) / vmax, 1.0)
        bg = _blend(t, (255, 255, 255), (178, 24, 43) if value > 0 else (33, 102, 172))
        label = f"{value * 100:+5.1f}"
    else:
        t = 0.0 if vmax <= 0 else value / vmax
        bg = _blend(t)
        label = f"{value * 100:5.1f}"
    return Text(label, style=f"{'white' if t > 0.55 else 'black'} on {bg}")


def heatmap_table(
    matrix: Sequence[Sequence[float]], experts: Sequence[str], own: str | None = None, diverging: bool = False
):
    """Layers x experts, cells in percent, coloured 0 -> table maximum (one block per layer when
    the experts do not fit across)."""

    vmax = max((abs(v) for row in matrix for v in row), default=0.0)
    columns = [
        Column("layer", "label", justify="right", style="dim"),
        *(
            Column(f"[{expert_color(e)}]■[/]{escape(name)}{'*' if name == own else ''}")
            for e, name in enumerate(experts)
        ),
    ]
    rows = [[str(layer), *(_cell(v, vmax, diverging) for v in row)] for layer, row in enumerate(matrix)]
    return FitTable(columns, rows, compact=True)


def _mean(values) -> float | None:
    values = [v for v in (values or []) if v is not None]
    return sum(values) / len(values) if values else None


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v * 100:.1f}%"


def _num(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


# Column legends, printed under the tables (short headers keep the tables within 80 columns).
LEGEND = (
    "own top-1: tokens whose top-1 expert is the domain's own; busiest: expert with the largest load share; "
    "imbal.: max/mean expert load (1 = balanced); H(p̄): entropy of the mean router distribution "
    "(ln E = even); H(p): mean per-token router entropy; agree: same top-1 expert at layers l and l+1. "
    "Summary values are means over layers."
)


def summary_table(report: dict):

    experts = report["experts"]
    E = len(experts)
    show_dropped = any(v > 0 for s in [report["overall"]] for v in s["dropped_frac"])
    columns = [
        Column("domain", "label"),
        Column("tokens"),
        Column("own top-1"),
        Column("busiest", justify="left"),
        Column("imbal."),
        Column(f"H(p̄)\n≤{math.log(E):.2f}"),
        Column("H(p)"),
        Column("agree"),
    ]
    columns += [Column("dropped")] if show_dropped else []
    rows = []
    for name, s in list(report["domains"].items()) + [(OVERALL, report["overall"])]:
        share_by_expert = [_mean(col) for col in zip(*s["load_share"], strict=False)]
        busiest = max(range(E), key=lambda e: share_by_expert[e])
        cells = [
            escape(name),
            f"{s['tokens']:,}",
            _pct(_mean(s.get("own_top1_frac"))),
            f"[{expert_color(busiest)}]■[/]{escape(experts[busiest])} {share_by_expert[busiest] * 100:.0f}%",
            _num(_mean(s["load_imbalance"])),
            _num(_mean(s["entropy_of_mean"])),
            _num(_mean(s["mean_token_entropy"])),
            _pct(_mean(s["top1_agreement"])),
        ]
        rows.append(cells + ([_pct(_mean(s["dropped_frac"]))] if show_dropped else []))
    return FitTable(columns, rows)


def layer_table(reports: Sequence[dict]):
    """Per-layer numbers over all domains; with two reports each cell reads "A → B"."""

    keys = [("load_imbalance", "imbal.", _num), ("entropy_of_mean", "H(p̄)", _num),
            ("mean_token_entropy", "H(p)", _num), ("own_top1_frac", "own top-1", _pct),
            ("top1_agreement", "agree", _pct)]  # fmt: skip
    columns = [Column("layer", "label", justify="right"), *(Column(header) for _, header, _ in keys)]
    rows = []
    for layer in range(reports[0]["model"]["n_layers"]):
        cells = [str(layer)]
        for key, _, fmt in keys:
            values = [r["overall"].get(key) for r in reports]
            cells.append("→".join(fmt(v[layer]) if v is not None and layer < len(v) else "-" for v in values))
        rows.append(cells)
    return FitTable(columns, rows)


def text_view(report: dict, domain: str, layer: int, max_samples: int):
    """Sample text of `domain`, each token coloured by its top-1 expert at `layer` (paper Table 6)."""

    parts = []
    for sample in report.get("samples", {}).get(domain, [])[:max_samples]:
        text = Text()
        for piece, expert in zip(sample["pieces"], sample["top1"][layer], strict=False):
            if not piece:
                continue
            shown = "".join(c if c.isprintable() or c in "\n\t" else "·" for c in piece)
            color = "#dddddd" if expert >= len(report["experts"]) else expert_color(expert)  # grey: dropped
            style = f"{text_on(color)} on {color}"
            text.append(shown, style=style)
        parts.append(text)
        parts.append(Text(""))
    return Group(*parts)


def legend(experts: Sequence[str]):

    line = Text("experts: ")
    for e, name in enumerate(experts):
        line.append(f" {name} ", style=f"{text_on(expert_color(e))} on {expert_color(e)}")
        line.append(" ")
    return line


def render(
    report: dict,
    console,
    *,
    metric: str = "load_share",
    layer: int | None = None,
    show_text: int = 0,
    compare: dict | None = None,
    difference: dict | None = None,
) -> None:
    """Everything in the terminal: heatmaps per domain, the summary, per-layer tables, text."""

    def heading(text: str) -> None:
        console.print(escape(text), style="bold", soft_wrap=True)

    experts = report["experts"]
    model = report["model"]
    console.print(Rule(escape(f"routing of {report['checkpoint']}")))
    console.print(
        escape(
            f"{model['n_experts']} experts ({', '.join(experts)}; names from {report['experts_from']}), "
            f"top-{model['top_k']} {model['router_mode']} routing, {model['n_layers']} MoE layers. "
            f"Heatmap cells: {metric} in %, * marks the domain's own expert."
        ),
        soft_wrap=True,
    )
    for domain, stats in report["domains"].items():
        heading(f"\n{domain} tokens: {metric} per layer and expert")
        console.print(heatmap_table(stats[metric], experts, own=stats.get("own_expert")))
    heading("\nsummary" + ("" if compare is None else f" of A = {report['checkpoint']}"))
    console.print(summary_table(report))
    if compare is not None:
        heading(f"summary of B = {compare['checkpoint']}")
        console.print(summary_table(compare))
    heading("per layer, all domains together" + ("" if compare is None else " (A → B)"))
    console.print(layer_table([report] if compare is None else [report, compare]))
    console.print(escape(LEGEND), style="dim", soft_wrap=True)
    if compare is not None:
        for domain, d in difference["domains"].items():
            heading(f"\n{domain} tokens: {metric} of B minus A, in percentage points")
            console.print(
                heatmap_table(d[metric], experts, own=report["domains"][domain].get("own_expert"), diverging=True)
            )
    if show_text:
        layer = default_layer(report) if layer is None else layer
        console.print()
        console.print(Rule(f"tokens coloured by their top-1 expert at layer {layer}"))
        console.print(legend(experts))
        for domain in report["domains"]:
            heading(domain)
            console.print(text_view(report, domain, layer, show_text))


def default_layer(report: dict) -> int:
    return report["model"]["n_layers"] // 2


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def csv_text(report: dict) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["domain", "layer", "expert", "top1_frac", "topk_frac", "mean_prob", "load_share"])
    rows = list(report["domains"].items()) + [(OVERALL, report["overall"])]
    for domain, s in rows:
        for layer in range(len(s["top1_frac"])):
            for e, expert in enumerate(report["experts"]):
                writer.writerow(
                    [domain, layer, expert]
                    + [repr(s[key][layer][e]) for key in ("top1_frac", "topk_frac", "mean_prob", "load_share")]
                )
    return buffer.getvalue()


def _file_name(domain: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", domain)


def write_files(
    report: dict,
    out_dir: Path,
    *,
    metric: str = "load_share",
    compare: dict | None = None,
    difference: dict | None = None,
) -> list[str]:
    """Write routing.json, routing.csv and the PNGs into `out_dir` (which must exist).
    Returns notes for the user (e.g. that plots were skipped)."""
    full = dict(report)
    if compare is not None:
        full["compare"] = {"checkpoint": compare["checkpoint"], "difference": difference}
    (out_dir / "routing.json").write_text(dumps_json(full, indent=1) + "\n")
    (out_dir / "routing.csv").write_text(csv_text(report))
    if compare is not None:
        (out_dir / "compare").mkdir()
        (out_dir / "compare" / "routing.json").write_text(dumps_json(compare, indent=1) + "\n")
        (out_dir / "compare" / "routing.csv").write_text(csv_text(compare))

    plt = _pyplot()
    if plt is None:
        return [PLOTS_NOTE]
    for domain, stats in report["domains"].items():
        plot_heatmap(
            plt,
            stats[metric],
            report["experts"],
            f"{domain} tokens: {metric}",
            out_dir / f"heatmap_{_file_name(domain)}.png",
            own=stats.get("own_expert"),
        )
    plot_stacked(plt, report, out_dir / "layers_stacked.png")
    if compare is not None:
        names = f"A = {Path(report['checkpoint']).name}, B = {Path(compare['checkpoint']).name}"
        for domain, d in difference["domains"].items():
            plot_heatmap(
                plt,
                d[metric],
                report["experts"],
                f"{domain} tokens: {metric}, B - A\n{names}",
                out_dir / "compare" / f"diff_{_file_name(domain)}.png",
                diverging=True,
                own=report["domains"][domain].get("own_expert"),
            )
        plot_stacked(plt, compare, out_dir / "compare" / "layers_stacked.png")
    return []


def _pyplot():

    return pyplot()


def plot_heatmap(plt, matrix, experts, title, path: Path, own: str | None = None, diverging: bool = False) -> None:
    n_layers, n_experts = len(matrix), len(experts)
    fig, ax = plt.subplots(figsize=(1.6 + 0.9 * n_experts, 1.2 + 0.32 * n_layers))
    if diverging:
        vmax = max((abs(v) for row in matrix for v in row), default=0.0) or 1e-9
        image = ax.imshow(matrix, cmap="RdBu_r", vmin=-vmax, vmax=vmax, aspect="auto")
    else:
        image = ax.imshow(matrix, cmap="Blues", vmin=0.0, vmax=max(max(map(max, matrix)), 1e-9), aspect="auto")
    if n_layers * n_experts <= 600:  # numbers stay legible up to about a 32 x 16 grid
        norm_max = image.norm.vmax
        for layer, row in enumerate(matrix):
            for e, v in enumerate(row):
                dark = abs(v) / norm_max > 0.55 if norm_max else False
                ax.text(
                    e,
                    layer,
                    f"{v * 100:{'+' if diverging else ''}.0f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if dark else "black",
                )
    ax.set_xticks(range(n_experts), [f"{n}*" if n == own else n for n in experts], rotation=30, ha="right")
    ax.set_yticks(range(n_layers))
    ax.set_xlabel("expert" + (" (* = the domain's own expert)" if own else ""))
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, label="B - A" if diverging else "share")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_stacked(plt, report: dict, path: Path) -> None:
    """Per domain, each layer's load_share over experts as a stacked bar (paper Figure 3)."""
    experts = report["experts"]
    domains = list(report["domains"])
    cols = min(len(domains), 3)
    rows = math.ceil(len(domains) / cols)
    n_layers = report["model"]["n_layers"]
    fig, axes = plt.subplots(
        rows,
        cols,
        figsize=(0.6 + max(3.0, 0.22 * n_layers + 1.5) * cols, 0.8 + 2.6 * rows),
        squeeze=False,
        sharey=True,
        layout="constrained",
    )
    for i, domain in enumerate(domains):
        ax = axes[i // cols][i % cols]
        share = report["domains"][domain]["load_share"]
        bottom = [0.0] * n_layers
        for e, name in enumerate(experts):
            heights = [share[layer][e] for layer in range(n_layers)]
            ax.bar(range(n_layers), heights, bottom=bottom, color=expert_color(e), width=0.85, label=name)
            bottom = [b + h for b, h in zip(bottom, heights, strict=False)]
        ax.set_title(f"{domain} tokens", fontsize=10)
        ax.set_xlabel("layer")
        ax.set_ylim(0, 1)
        ax.set_xticks(range(0, n_layers, max(1, n_layers // 8)))
        if i % cols == 0:
            ax.set_ylabel("share of routed slots")
    for j in range(len(domains), rows * cols):
        axes[j // cols][j % cols].axis("off")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside upper center", ncol=min(len(experts), 8), frameon=False, fontsize=9)
    fig.supxlabel(f"expert shares per layer: {Path(report['checkpoint']).name}", fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)
