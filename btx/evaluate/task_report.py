"""The downstream-task table: model x task with lm-eval's standard errors, the paper's group
averages, and accuracy against training FLOPs (tasks.json, tasks.md, accuracy_vs_flops.png).

Groups (the paper's Table 2): a group's average is the mean of the primary metric of those of its
tasks that ran, and a row's "average" is the mean over the groups present; with no paper task
(local tasks only) it is the mean over all tasks. Values are lm-eval's fractions, shown as
percentages in the tables.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from btx.evaluate.plot import plot_points_vs_flops
from btx.io.atomic import dumps_json
from btx.ui.tables import Column, FitTable

# The paper's groups and the lm-eval tasks (or groups) that stand for their benchmarks.
PAPER_GROUPS: dict[str, tuple[str, ...]] = {
    "Math": ("gsm8k", "hendrycks_math", "minerva_math"),
    "Code": ("humaneval", "mbpp"),
    "Knowledge": ("nq_open", "triviaqa"),
    "Reasoning": ("arc_easy", "arc_challenge", "social_iqa", "siqa", "piqa", "winogrande"),
    "MMLU": ("mmlu",),
}
TASKS_PLOT = "accuracy_vs_flops.png"
AVERAGE = "average"


@dataclass
class TaskRow:
    name: str
    train_flops: float | None
    results: dict[str, dict] = field(default_factory=dict)  # task -> TaskSuite record
    note: str = ""

    def value(self, task: str) -> float | None:
        record = self.results.get(task)
        return None if record is None else record["value"]


def group_averages(row: TaskRow, tasks: list[str]) -> dict[str, float]:
    """{group: mean of its present tasks, ..., "average": mean of the groups (or of all tasks)}."""
    out = {}
    for group, members in PAPER_GROUPS.items():
        values = [row.value(t) for t in tasks if t in members and row.value(t) is not None]
        if values:
            out[group] = sum(values) / len(values)
    values = list(out.values()) or [row.value(t) for t in tasks if row.value(t) is not None]
    if values:
        out[AVERAGE] = sum(values) / len(values)
    return out


@dataclass
class TaskReport:
    tasks: list[str]
    rows: list[TaskRow]
    settings: dict = field(default_factory=dict)

    def groups(self) -> dict[str, dict[str, float]]:
        """{row name: group_averages}, for the rows that ran tasks."""
        return {r.name: group_averages(r, self.tasks) for r in self.rows if r.results}

    def group_names(self) -> list[str]:
        present = {g for averages in self.groups().values() for g in averages}
        return [g for g in [*PAPER_GROUPS, AVERAGE] if g in present]

    def cells(self, row: TaskRow) -> list[str]:
        groups = group_averages(row, self.tasks)
        return [
            row.name,
            *(_cell(row.results.get(t)) for t in self.tasks),
            *(_percent(groups.get(g)) for g in self.group_names()),
            "-" if row.train_flops is None else f"{row.train_flops:.3g}",
        ]

    def header(self) -> list[str]:
        groups = [f"{g} (avg)" if g != AVERAGE else AVERAGE for g in self.group_names()]
        return ["model", *self.tasks, *groups, "train FLOPs"]

    def metric_note(self) -> str:
        metrics = {}
        for row in self.rows:
            for task, record in row.results.items():
                metrics.setdefault(task, record["metric"])
        described = "; ".join(f"{t}: {m}" for t, m in metrics.items())
        return (
            f"lm-eval {self.settings.get('lm_eval', '')} metrics in % (± its standard error): {described}. "
            "Group averages as in the paper's Table 2 (the mean of the group's tasks that ran); "
            "average: the mean over the groups present, else over the tasks."
        )

    def to_markdown(self) -> str:
        head = self.header()
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in self.cells(r)) + " |" for r in self.rows]
        return "\n".join([*lines, "", self.metric_note()]) + "\n"

    def to_json(self) -> dict:
        return {
            "tasks": self.tasks,
            "paper_groups": {g: list(m) for g, m in PAPER_GROUPS.items()},
            "rows": [
                {
                    "name": r.name,
                    "train_flops": r.train_flops,
                    "note": r.note,
                    "results": r.results,
                    "groups": group_averages(r, self.tasks),
                }
                for r in self.rows
            ],
            "settings": self.settings,
        }

    def render(self, console: Console) -> None:
        columns = [Column("model", "label"), *(Column(escape(h)) for h in self.header()[1:])]
        cells = [[escape(c) for c in self.cells(r)] for r in self.rows]
        console.print(FitTable(columns, cells, title="Downstream tasks (lm-eval; higher is better)"))

    def save(self, out: Path, console: Console | None = None) -> None:
        """tasks.json, tasks.md and (with matplotlib, FLOPs and two rows or more) the plot."""
        (out / "tasks.json").write_text(dumps_json(self.to_json(), indent=2) + "\n")
        (out / "tasks.md").write_text(self.to_markdown())
        points = []
        for r in self.rows:
            average = group_averages(r, self.tasks).get(AVERAGE)
            if average is not None:
                points.append((r.name, 100 * average, r.train_flops))
        note = plot_points_vs_flops(
            points,
            out / TASKS_PLOT,
            ylabel="average task score (%)",
            title="Downstream tasks against training compute (higher is better)",
        )
        if note and console is not None:
            console.print(escape(note), soft_wrap=True)


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _cell(record: dict | None) -> str:
    if record is None:
        return "-"
    stderr = record.get("stderr")
    return _percent(record["value"]) + ("" if stderr is None else f" ± {100 * stderr:.1f}")
