"""btx.ui.tables and the tables built on it keep every value whole in 80 columns and in log files."""

import io
import re

import pytest
from rich.console import Console
from rich.text import Text

from btx.ui.tables import Column, FitTable

EVAL_ROWS = [  # the demo's eval table: long row names, FLOPs like 1.86e+12
    ["seed", "1.7397", "0.7080", "1.6257", "1.3578", "3.888", "0", "0.66M"],
    ["expert:code", "1.6457", "1.7302", "1.7685", "1.7148", "5.555", "1.86e+12", "0.66M"],
    ["dense (compute-matched)", "1.5894", "0.6776", "1.3921", "1.2197", "3.386", "6.98e+12", "0.66M"],
    ["sparse upcycling (compute-matched)", "1.6108", "0.6830", "1.4289", "1.2409", "3.459", "6.99e+12", "1.05M"],
    ["BTX merged (no finetune)", "1.7272", "0.7107", "1.5771", "1.3383", "3.813", "5.57e+12", "1.05M"],
]


def eval_columns(domains=("code", "math", "prose")):
    return [
        Column("model", "label"),
        *(Column(d) for d in domains),
        Column("average"),
        Column("ppl (avg)", optional=True),
        Column("train FLOPs"),
        Column("active params"),
    ]


def draw(renderable, width: int | None = 80) -> str:
    out = io.StringIO()
    console = Console(file=out, width=width, color_system=None) if width else Console(file=out, color_system=None)
    console.print(renderable)
    return out.getvalue()


def assert_whole(text: str, width: int, values, names=()):
    lines = text.splitlines()
    assert max(len(line.rstrip()) for line in lines) <= width
    for value in values:  # a number is never cut, folded or ellipsized
        assert re.search(rf"(?<![\w.+]){re.escape(value)}(?![\w.+])", text), value
    assert "…" not in text
    for name in names:  # a row name takes at most two lines of its cell (or, stacked, one line)
        if name in lines:
            continue
        first = name.split()[0]
        at = next(i for i, line in enumerate(lines) if re.search(rf"│ {re.escape(first)}\b", line))
        joined = " ".join(line.split("│")[1].strip() for line in lines[at : at + 2] if "│" in line)
        assert joined.startswith(name), (name, lines[at : at + 3])


@pytest.mark.parametrize("width", [200, 100, 80, 60, 40])
def test_eval_table_values_stay_whole(width):
    table = FitTable(eval_columns(), EVAL_ROWS, title="Validation loss")
    chosen = table.layout(width)
    kept = chosen[0] if chosen else range(len(eval_columns()))
    text = draw(table, width)
    assert_whole(text, width, {row[i] for row in EVAL_ROWS for i in kept if i > 0}, names=[r[0] for r in EVAL_ROWS])


def test_layouts_by_width():
    table = FitTable(eval_columns(), EVAL_ROWS)
    wide = table.layout(200)
    assert wide is not None and len(wide[0]) == 8  # everything
    narrow = table.layout(80)
    assert narrow is not None and len(narrow[0]) == 7  # ppl (avg) left out, names on two lines
    assert table.layout(50) is None  # stacked
    text = draw(table, 50)
    assert "sparse upcycling (compute-matched)\n" in text and "train FLOPs 6.99e+12" in text
    assert "ppl (avg) 3.459" in text  # stacked keeps every column


def test_log_file_output_is_80_columns_and_whole(monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)
    text = draw(FitTable(eval_columns(), EVAL_ROWS), width=None)
    assert_whole(text, 80, ["1.86e+12", "6.99e+12", "0.66M", "1.2409"])


def test_text_columns_wrap_at_spaces_and_paths_stay_whole():
    path = "/very/long/run/directory/checkpoints/demo/experts/prose/final"
    rows = [["prose", "done", "100/100", "1.4522", path + "\nresumes from step 50 when started again"]]
    cols = [
        Column("expert", "label"),
        Column("state", "text"),
        Column("step"),
        Column("loss"),
        Column("output / note", "text"),
    ]
    wide = draw(FitTable(cols, rows), 120)
    assert path in wide and "resumes from step 50 when started again" in wide
    narrow = draw(FitTable(cols, rows), 80)
    assert path in narrow  # stacked: the path on a line of its own, not folded
    assert_whole(narrow, 80, ["100/100", "1.4522"])


def test_a_value_longer_than_the_line_is_folded_not_cut():
    path = "/" + "x" * 120
    text = draw(FitTable([Column("name", "label"), Column("path", "text")], [["a", path]]), 60)
    assert text.replace("\n", "").count("x") == 120


def test_cells_may_be_rich_text_and_markup():
    rows = [["0", Text("12.5", style="white on red"), "[bold green]40.0[/]"]]
    text = draw(FitTable([Column("layer", "label"), Column("[red]■[/]code"), Column("math")], rows, compact=True), 80)
    assert "12.5" in text and "40.0" in text and "■code" in text and "[red]" not in text


def test_rows_must_match_the_columns():
    with pytest.raises(ValueError):
        FitTable([Column("a", "label")], [["x", "y"]])
    with pytest.raises(ValueError):
        Column("a", "nonsense")


def test_btx_eval_render_fits_80_columns():
    from btx.evaluate.scores import EvalRow
    from btx.evaluate.table import render

    rows = [
        EvalRow(
            r[0],
            {"code": float(r[1]), "math": float(r[2]), "prose": float(r[3])},
            float(r[6]),
            int(float(r[7][:-1]) * 1e6),
        )
        for r in EVAL_ROWS
    ]
    out = io.StringIO()
    render(rows, ["code", "math", "prose"], console=Console(file=out, width=80, color_system=None))
    assert_whole(
        out.getvalue(), 80, ["1.86e+12", "6.99e+12", "1.7397", "0.66M"], names=["sparse upcycling (compute-matched)"]
    )


def test_btx_status_table_fits_80_columns():
    from btx.run.progress import ExpertStatus, status_table

    path = "checkpoints/a-long-experiment-name/experts/prose/final"  # too wide for the table at 80
    statuses = [
        ExpertStatus(
            domain="prose",
            state="running",
            step=50,
            total_steps=100,
            loss=1.4522,
            tokens_per_s=31415.0,
            eta_s=90,
            path=path,
            detail="resumes where it stopped",
        )
    ]
    text = draw(status_table(statuses, title="status"), 80)
    assert str(path) in text and "31,415" in text and "1.4522" in text and "50/100" in text


def test_routing_tables_fit_80_columns_with_many_experts():
    from btx.evaluate.routing_report import heatmap_table

    experts = [f"expert{e}" for e in range(12)]
    matrix = [[(e + layer) / 20 for e in range(12)] for layer in range(4)]
    text = draw(heatmap_table(matrix, experts, own="expert3"), 80)
    assert max(len(line.rstrip()) for line in text.splitlines()) <= 80
    assert "expert3*" in text and "…" not in text
    assert text.count("70.0") == 1  # the largest cell, whole
