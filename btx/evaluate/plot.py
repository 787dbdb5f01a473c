"""Average validation loss against training FLOPs, like the paper's accuracy-vs-compute figure:
a PNG in eval/ (matplotlib, the optional `plots` extra) and a text scatter for the terminal.

Rows are btx.evaluate.scores.EvalRow objects (only their name, average, average_stderr and train_flops
are read). A row without FLOPs is left out; one with 0 FLOPs beyond the seed (the seed itself)
has no place on a log axis and is drawn as a dashed reference line instead.
"""

from __future__ import annotations

import math
from pathlib import Path

from btx.ui.pyplot import pyplot

PLOT_NAME = "loss_vs_flops.png"
PLOTS_NOTE = f"{PLOT_NAME} skipped: matplotlib is not installed (pip install 'btx[plots]' or pip install matplotlib)"
MARKERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _points(rows) -> tuple[list, list]:
    """(rows with FLOPs > 0, rows with 0 FLOPs: references)."""
    placed = [r for r in rows if r.train_flops]
    references = [r for r in rows if r.train_flops == 0]
    return placed, references


def text_scatter(rows, width: int = 60, height: int = 12) -> str:
    """A text scatter (x: log FLOPs, y: average loss, lower is better) with a legend, or "" when
    fewer than two rows have FLOPs."""
    placed, references = _points(rows)
    if len(placed) < 2:
        return ""
    xs = [math.log10(r.train_flops) for r in placed]
    ys = [r.average for r in placed] + [r.average for r in references]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    x_span, y_span = (x1 - x0) or 1.0, (y1 - y0) or 1.0
    grid = [[" "] * width for _ in range(height)]

    def row_of(y: float) -> int:
        return round((y1 - y) / y_span * (height - 1))

    for r in references:
        grid[row_of(r.average)] = list("-" * width)
    legend = []
    for i, (r, x) in enumerate(zip(placed, xs)):
        marker = MARKERS[i % len(MARKERS)]
        line, col = row_of(r.average), round((x - x0) / x_span * (width - 1))
        while col < width - 1 and grid[line][col] not in (" ", "-"):
            col += 1  # a neighbour took the cell: the next free one to the right
        grid[line][col] = marker
        stderr = "" if r.average_stderr is None else f" ± {r.average_stderr:.4f}"
        legend.append(f"  {marker}  {r.average:.4f}{stderr}  {r.train_flops:.3g} FLOPs  {r.name}")
    legend += [f"  -  {r.average:.4f}  (0 FLOPs beyond the seed)  {r.name}" for r in references]
    label_width = 8
    lines = ["average loss against training FLOPs beyond the seed (log scale; lower is better)"]
    for i, cells in enumerate(grid):
        label = f"{y1:.4f}" if i == 0 else f"{y0:.4f}" if i == height - 1 else ""
        lines.append(f"{label:>{label_width}} |{''.join(cells)}")
    lines.append(" " * label_width + " +" + "-" * width)
    left, right = f"{10**x0:.3g}", f"{10**x1:.3g}"
    lines.append(" " * (label_width + 2) + left + " " * max(1, width - len(left) - len(right)) + right)
    return "\n".join(lines + legend)


def _pyplot():

    return pyplot()


def plot_loss_vs_flops(rows, path: Path) -> str | None:
    """Write the PNG; None when written, else why not (a one-line note, "" when there is nothing
    to plot)."""
    placed, references = _points(rows)
    if not placed:
        return ""
    plt = _pyplot()
    if plt is None:
        return PLOTS_NOTE
    fig, ax = plt.subplots(figsize=(10, 5))
    for r in references:
        ax.axhline(r.average, color="grey", linestyle="--", linewidth=1, label=f"{r.name} ({r.average:.4f})")
    # Close points would hide each other's labels: a legend names them instead (marker and colour).
    shapes = "os^vD<>pPX*h"
    for i, r in enumerate(placed):
        ax.errorbar(
            [r.train_flops],
            [r.average],
            yerr=[r.average_stderr or 0.0],
            fmt=shapes[i % len(shapes)],
            capsize=3,
            label=f"{r.name} ({r.average:.4f})",
        )
    return _finish(
        plt,
        fig,
        ax,
        path,
        "average validation loss (nats/token)",
        "Validation loss against training compute (error bars: standard error over windows)",
    )


def plot_points_vs_flops(points, path: Path, *, ylabel: str, title: str) -> str | None:
    """A PNG of (name, value, train FLOPs) points on a log FLOPs axis, rows with 0 FLOPs as dashed
    reference lines (the accuracy beside the loss plot); None when written, else why not ("" when
    there is nothing to plot)."""
    placed = [p for p in points if p[2]]
    references = [p for p in points if p[2] == 0]
    if not placed:
        return ""
    plt = _pyplot()
    if plt is None:
        return PLOTS_NOTE.replace(PLOT_NAME, path.name)
    fig, ax = plt.subplots(figsize=(10, 5))
    for name, value, _ in references:
        ax.axhline(value, color="grey", linestyle="--", linewidth=1, label=f"{name} ({value:.1f})")
    shapes = "os^vD<>pPX*h"
    for i, (name, value, flops) in enumerate(placed):
        ax.plot([flops], [value], shapes[i % len(shapes)], label=f"{name} ({value:.1f})")
    return _finish(plt, fig, ax, path, ylabel, title)


def _finish(plt, fig, ax, path: Path, ylabel: str, title: str) -> None:
    """The FLOPs axis, labels and legend every plot against compute shares, and the file."""
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs beyond the seed")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    fig.tight_layout()
    # No timestamps in the file, so the same rows give the same bytes.
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)
    return None
