"""Progress of work done in named parts (a model on a domain, ...), counted in steps (batches).

    with PartsProgress(console, "eval", total=n_batches, unit="batches") as progress:
        for model in models:
            for domain in domains:
                with progress.part(f"{model} · {domain}", total=batches_of(domain)):
                    for batch in ...:
                        ...
                        progress.advance()

On a terminal: a rich bar for the part under way and one for the whole, each with its ETA.
Elsewhere (the log of a cluster job, `btx run > log`), where a live bar shows nothing: one plain line
per finished part, with the time it took and the ETA of the whole. The ETA of the whole is the mean
time per step so far times the steps left, so it holds for parts of different sizes.
"""

from __future__ import annotations

import contextlib
import time

from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


def duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class PartsProgress:
    def __init__(self, console, what: str, total: int, unit: str = "batches"):
        self.console, self.what, self.total, self.unit = console, what, max(1, total), unit
        self.live = console.is_terminal
        self.done = 0
        self.bar: Progress | None = None
        self._part = None
        self.t0 = time.perf_counter()

    def __enter__(self) -> "PartsProgress":
        if self.live:
            self.bar = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn(self.unit),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                console=self.console,
                transient=True,
            )
            self.bar.__enter__()
            self._all = self.bar.add_task(escape(f"{self.what}: all"), total=self.total)
        return self

    @contextlib.contextmanager
    def part(self, label: str, total: int):
        """One part of `total` steps; `advance` counts its steps."""
        started, done_before = time.perf_counter(), self.done
        if self.bar is not None:
            self._part = self.bar.add_task(escape(f"{self.what} {label}"), total=max(1, total))
        try:
            yield self
        finally:
            if self.bar is not None:
                self.bar.remove_task(self._part)
                self._part = None
        if not self.live:
            elapsed = time.perf_counter() - self.t0
            eta = elapsed / max(1, self.done) * max(0, self.total - self.done)
            self.console.print(
                f"{self.what} {label}: {self.done - done_before} {self.unit} in "
                f"{time.perf_counter() - started:.1f} s ({self.done}/{self.total}, eta {duration(eta)})",
                markup=False,
                highlight=False,
                soft_wrap=True,
            )

    def advance(self, steps: int = 1) -> None:
        self.done += steps
        if self.bar is not None:
            self.bar.advance(self._all, steps)
            if self._part is not None:
                self.bar.advance(self._part, steps)

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)
