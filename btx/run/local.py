"""The local executor: expert jobs as subprocesses, each with its own devices and its own process
group, at most `max_parallel` at a time, shown as a live table.

Ctrl-C or SIGTERM stops every child (SIGTERM, then SIGKILL after a grace period); each child
checkpoints and the next `btx branch` resumes it.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from rich.console import Console
from rich.live import Live

from btx.errors import BtxError
from btx.run.jobs import (
    ExpertJob,
    describe_exit,
    new_attempt,
    process_start,
    update_job,
)
from btx.run.progress import expert_status, last_lines, status_table


@dataclass
class Outcome:
    job: ExpertJob
    exit_code: Optional[int] = None  # None: not run (skipped) or still running when stopped
    interrupted: bool = False
    error: Optional[str] = None  # why it failed without a log (sbatch refused it)


def visible_gpus() -> list[str]:
    """The GPU ids this process may hand out (CUDA_VISIBLE_DEVICES when set)."""
    import torch  # lazy: `btx status` and `btx branch` start without torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d.strip() for d in env.split(",") if d.strip()][:count]
    return [str(i) for i in range(count)]


@dataclass
class LocalSlots:
    """Where local jobs may run: one entry per concurrent job, each a CUDA_VISIBLE_DEVICES value
    (a group of devices_per_expert GPUs), or None on CPU."""

    devices: list[Optional[str]]
    devices_per_expert: int
    threads_per_job: Optional[int] = None  # CPU: OMP/MKL threads per job, so jobs do not fight

    @classmethod
    def plan(cls, gpus: Sequence[str], devices_per_expert: int, max_parallel: Optional[int]) -> "LocalSlots":
        if not gpus:  # CPU: one job at a time unless asked, each with its share of the cores
            n = max_parallel or 1
            return cls([None] * n, 1, max(1, (os.cpu_count() or 1) // n))
        groups = [
            ",".join(gpus[i : i + devices_per_expert])
            for i in range(0, len(gpus) - devices_per_expert + 1, devices_per_expert)
        ]
        if not groups:
            raise BtxError(
                f"branch.devices_per_expert: {devices_per_expert} GPUs per expert, but only "
                f"{len(gpus)} visible ({','.join(gpus)}); override it, e.g. "
                f"branch.devices_per_expert={len(gpus)}"
            )
        if max_parallel is not None and max_parallel > len(groups):
            raise BtxError(
                f"--max-parallel / branch.max_parallel: {max_parallel} jobs of {devices_per_expert} GPU(s) need "
                f"{max_parallel * devices_per_expert} GPUs, only {len(gpus)} visible "
                f"(at most {len(groups)} at a time)"
            )
        return cls(groups[: max_parallel or len(groups)], devices_per_expert)

    def command(self, job: ExpertJob) -> list[str]:
        """The job's full command line: plain Python, or torchrun for several GPUs per expert."""
        if self.devices[0] is not None and self.devices_per_expert > 1:
            # --standalone: a private rendezvous on a free port, so concurrent experts do not clash.
            return [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc_per_node={self.devices_per_expert}",
                *job.program,
            ]
        return [sys.executable, *job.program]

    def env(self, slot: int) -> dict[str, str]:
        env = dict(os.environ)
        if self.devices[slot] is not None:
            env["CUDA_VISIBLE_DEVICES"] = self.devices[slot]
        elif self.threads_per_job is not None:
            for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
                env.setdefault(var, str(self.threads_per_job))
        env["PYTHONUNBUFFERED"] = "1"  # the log file shows progress as it happens
        return env


class _Running:
    def __init__(self, job: ExpertJob, slot: int, proc: subprocess.Popen, log_file):
        self.job, self.slot, self.proc, self.log_file = job, slot, proc, log_file


def run_local(
    jobs: Sequence[ExpertJob], slots: LocalSlots, *, console=None, refresh_s: float = 0.5, stop_grace_s: float = 300.0
) -> list[Outcome]:
    """Run `jobs` as subprocesses, at most one per slot at a time, each in its own process group
    with its output in `<expert_dir>/train.log`. A failing job does not stop the others.

    Ctrl-C (or SIGTERM to this process) stops every running job: SIGTERM to its process group, on
    which `btx train` finishes its step, writes a checkpoint and exits; SIGKILL after `stop_grace_s`.
    Each is waited for and recorded as interrupted, so nothing is orphaned and the next run resumes
    them. KeyboardInterrupt is then re-raised.
    """

    console = console or Console()
    waiting = deque(jobs)
    free = list(range(len(slots.devices)))
    running: list[_Running] = []
    outcomes = {job.domain: Outcome(job) for job in jobs}

    def table():
        return status_table([expert_status(job) for job in jobs], title="btx branch (local)")

    def start(job: ExpertJob, slot: int) -> None:
        cmd = slots.command(job)
        env = slots.env(slot)
        job.expert_dir.mkdir(parents=True, exist_ok=True)
        log_file = open(job.log, "ab")
        devices = slots.devices[slot]
        header = (
            f"\n=== btx branch {time.strftime('%Y-%m-%d %H:%M:%S')} on {socket.gethostname()}"
            f"{f' CUDA_VISIBLE_DEVICES={devices}' if devices is not None else ''}: {shlex.join(cmd)}\n"
        )
        log_file.write(header.encode())
        log_file.flush()
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        running.append(_Running(job, slot, proc, log_file))  # first: a Ctrl-C from here on stops it too
        update_job(
            job.expert_dir,
            **new_attempt(
                executor="local",
                command=cmd,
                host=socket.gethostname(),
                pid=proc.pid,
                pid_start=process_start(proc.pid),
                started_at=time.time(),
                devices=devices,
                launcher={"pid": os.getpid(), "start": process_start(os.getpid())},
            ),
        )
        where = f"GPUs {devices}" if devices is not None else "CPU"
        console.print(f"{job.domain}: started (pid {proc.pid}, {where}), log {job.log}", highlight=False)

    def finish(r: _Running, code: int, interrupted: bool = False) -> None:
        r.log_file.close()
        update_job(r.job.expert_dir, exit_code=code, ended_at=time.time(), interrupted=interrupted)
        outcomes[r.job.domain].exit_code, outcomes[r.job.domain].interrupted = code, interrupted
        running.remove(r)
        free.append(r.slot)
        # One line per event, above the live table: a log of the run when output is not a terminal.
        if interrupted:
            console.print(f"{r.job.domain}: stopped ({describe_exit(code)}); it resumes on the next btx branch")
        elif code == 0:
            console.print(f"{r.job.domain}: [green]done[/]")
        else:
            console.print(f"{r.job.domain}: [red]failed[/] ({describe_exit(code)}), log {r.job.log}", highlight=False)

    restore = _sigterm_as_interrupt()
    try:
        with LiveTable(console, table()) as display:
            shown_at = 0.0
            while waiting or running:
                while waiting and free:
                    start(waiting.popleft(), free.pop(0))
                for r in list(running):
                    code = r.proc.poll()
                    if code is not None:
                        finish(r, code)
                # Children are checked often (a freed slot is reused at once); the table, which
                # reads every expert's files, is redrawn every `refresh_s`.
                if time.monotonic() - shown_at >= refresh_s or not (waiting or running):
                    display.update(table())
                    shown_at = time.monotonic()
                if waiting or running:
                    time.sleep(0.05)
    except KeyboardInterrupt:
        if running:
            console.print(
                f"[yellow]stopping {len(running)} running job(s) (they checkpoint first; Ctrl-C again kills them)...[/]"
            )
        _stop_all(running, stop_grace_s, lambda r, code: finish(r, code, interrupted=True))
        raise
    finally:
        restore()
    return [outcomes[job.domain] for job in jobs]


def _stop_all(running: list[_Running], grace_s: float, finished: Callable[[_Running, int], None]) -> None:
    """SIGTERM to every job's process group (btx train's clean stop: end the step, checkpoint,
    exit); SIGKILL to those still alive after `grace_s`, or at once on a second Ctrl-C. Returns
    when every job has exited and been reaped."""
    deadline = time.monotonic() + grace_s
    _signal_groups(running, signal.SIGTERM)
    while running:
        try:
            for r in list(running):
                code = r.proc.poll()
                if code is not None:
                    finished(r, code)
            if running and time.monotonic() >= deadline:
                _signal_groups(running, signal.SIGKILL)
            time.sleep(0.05)
        except KeyboardInterrupt:  # a second Ctrl-C: do not wait any longer
            deadline = time.monotonic()


def _signal_groups(running: list[_Running], sig: int) -> None:
    for r in running:
        try:
            os.killpg(r.proc.pid, sig)  # the child leads its own session, so its group is its pid
        except ProcessLookupError:
            pass


def _sigterm_as_interrupt() -> Callable[[], None]:
    """Treat SIGTERM like Ctrl-C while jobs run (so a killed `btx branch` stops its children);
    returns the function that restores the previous handler."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    return lambda: signal.signal(signal.SIGTERM, previous)


class LiveTable:
    """A table redrawn in place (rich Live) on a terminal. Elsewhere (a log file, a pipe) redrawing
    would only repeat it, so the last version is printed once, on leaving."""

    def __init__(self, console, renderable):
        self.console, self.renderable = console, renderable
        self.live = None
        if console.is_terminal:
            self.live = Live(renderable, console=console, auto_refresh=False)

    def __enter__(self) -> "LiveTable":
        if self.live is not None:
            self.live.start(refresh=True)
        return self

    def update(self, renderable) -> None:
        self.renderable = renderable
        if self.live is not None:
            self.live.update(renderable, refresh=True)

    def __exit__(self, *exc_info) -> None:
        if self.live is not None:
            self.live.stop()
        else:
            self.console.print(self.renderable)


def log_tail(path: Path, lines: int = 20) -> str:
    return "\n".join(last_lines(path, lines))
