"""Progress of expert jobs, read from their metrics.jsonl (step, loss, tokens/s, ETA), and the
status table `btx status` and `btx branch` show.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from rich.markup import escape

from btx.run.jobs import METRICS_FILE, ExpertJob, duration, expert_state
from btx.ui.tables import Column, FitTable


@dataclass
class ExpertStatus:
    domain: str
    state: str
    detail: str
    total_steps: int
    path: Path  # final/ when done, else the expert directory
    step: Optional[int] = None
    loss: Optional[float] = None
    tokens_per_s: Optional[float] = None
    eta_s: Optional[float] = None


def last_lines(path: Path, n: int, block: int = 1 << 16) -> list[str]:
    """The last `n` lines of a file, reading only its end."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            end = f.tell()
            data = b""
            while end > 0 and data.count(b"\n") <= n:
                start = max(0, end - block)
                f.seek(start)
                data = f.read(end - start) + data
                end = start
    except OSError:
        return []
    return data.decode("utf-8", errors="replace").splitlines()[-n:]


def read_progress(expert_dir: Path) -> list[dict]:
    """The last few training records of metrics.jsonl (those with a loss), oldest first."""
    rows = []
    for line in last_lines(expert_dir / METRICS_FILE, 64):
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line being written right now
        if isinstance(row, dict) and "step" in row and "loss" in row:
            rows.append(row)
    return rows


def expert_status(job: ExpertJob, now: Optional[float] = None) -> ExpertStatus:
    state, detail = expert_state(job.expert_dir, now)
    status = ExpertStatus(
        domain=job.domain,
        state=state,
        detail=detail,
        total_steps=job.total_steps,
        path=job.final if state == "done" else job.expert_dir,
    )
    rows = read_progress(job.expert_dir)
    if rows:
        last = rows[-1]
        status.step = int(last["step"])
        status.loss = last.get("loss")
        status.tokens_per_s = last.get("tokens_per_s")
        status.eta_s = _eta(rows, job.total_steps) if state == "running" else None
    if state == "done":
        status.step = job.total_steps
    return status


def _eta(rows: list[dict], total_steps: int) -> Optional[float]:
    """Seconds left at the recent pace: wall time per step between the oldest and newest records at
    hand (`elapsed_s`, which counts validation and checkpoints too), else the last step's time."""
    timed = [r for r in rows if isinstance(r.get("elapsed_s"), (int, float))]
    last = rows[-1]
    if len(timed) >= 2 and timed[-1]["step"] > timed[0]["step"]:
        seconds_per_step = (timed[-1]["elapsed_s"] - timed[0]["elapsed_s"]) / (timed[-1]["step"] - timed[0]["step"])
    elif isinstance(last.get("step_time_s"), (int, float)):
        seconds_per_step = last["step_time_s"]
    else:
        return None
    return max(0.0, (total_steps - last["step"]) * seconds_per_step)


_STATE_STYLE = {
    "pending": "dim",
    "queued": "cyan",
    "running": "yellow",
    "stopped": "magenta",
    "failed": "bold red",
    "done": "green",
}


def status_table(statuses: Sequence[ExpertStatus], title: Optional[str] = None):
    """The table that `btx status` prints and `btx branch` keeps live (btx.ui.tables: values and paths
    stay whole; a narrow terminal or log file gets one block per expert)."""

    columns = [
        Column("expert", "label"),
        Column("state", "text"),
        Column("step"),
        Column("loss"),
        Column("tokens/s"),
        Column("ETA"),
        Column("output / note", "text"),
    ]
    rows = []
    for s in statuses:
        step = f"{s.step if s.step is not None else '-'}/{s.total_steps}"
        loss = f"{s.loss:.4f}" if isinstance(s.loss, (int, float)) else ""
        tps = f"{s.tokens_per_s:,.0f}" if isinstance(s.tokens_per_s, (int, float)) else ""
        note = escape(str(s.path)) + (f"\n[dim]{escape(s.detail)}[/dim]" if s.detail else "")
        rows.append(
            [escape(s.domain), f"[{_STATE_STYLE[s.state]}]{s.state}[/]", step, loss, tps, duration(s.eta_s), note]
        )
    return FitTable(columns, rows, title=title)
