"""The progress line of a merge or a grow: bytes written (with GB/s), or layers fitted."""

from __future__ import annotations

from rich import progress as bars


class Progress:
    """A rich progress bar (bytes with GB/s, or steps), or nothing when disabled."""

    def __init__(self, enabled: bool, title: str, total: int, bytes_: bool = True, console=None):
        self.enabled, self.title, self.total, self.bytes_, self.console = enabled, title, total, bytes_, console

    def __enter__(self) -> Progress:
        if self.enabled:
            # Imported here: a quiet run (tests, `--quiet`, the pipeline's own bars) never pays for it.

            if self.bytes_:
                counts = [bars.DownloadColumn(binary_units=False), bars.TransferSpeedColumn()]
            else:
                counts = [bars.MofNCompleteColumn()]
            self.bar = bars.Progress(
                bars.TextColumn(f"[bold]{self.title}"), bars.BarColumn(), *counts, bars.TimeElapsedColumn(),
                bars.TimeRemainingColumn(), bars.TextColumn("{task.description}", style="dim"), console=self.console,
            )  # fmt: skip
            self.bar.__enter__()
            self.task = self.bar.add_task("", total=self.total)
        return self

    def advance(self, amount: int, description: str) -> None:
        if self.enabled:
            self.bar.update(self.task, advance=amount, description=description)

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self.bar.__exit__(*exc)
