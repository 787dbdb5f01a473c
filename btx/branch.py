"""Branch: one `btx train` job per domain from the same seed, run locally or on Slurm; job state.

    branch("recipes/demo/btx.yaml", ["train.steps=20"])   # what `btx branch` does, returns the exit status
    jobs = plan_jobs(exp, recipe_path, overrides)          # one ExpertJob per domain (its command, its dir)
    run_local(jobs, LocalSlots.plan(visible_gpus(), devices_per_expert=1, max_parallel=2))
    sbatch_script(job, exp.branch.slurm, exp.name)         # or one Slurm batch script per expert
    expert_state(exp.expert_dir("code"))                   # ("running", "pid 123 on node7")

Every job is the same idempotent command, `btx train RECIPE --domain NAME [overrides]`: it resumes
from the newest `ckpt/step-N/` and does nothing once the expert's DONE.json exists. Re-running
`btx branch` therefore only launches what is missing, and any expert can be re-run or added later
without touching the others.

Job state (`expert_state`) is derived from the expert directory alone, so `btx status` works the
same for local and Slurm jobs, from any machine that sees the run directory:

    done     DONE.json exists
    failed   job.json records a non-zero exit of the last attempt (not an interruption)
    running  the last attempt has no recorded exit, and: it is a local process on this host whose pid
             is alive (same start time, so a recycled pid does not count); or it runs elsewhere
             (Slurm, another host) and metrics.jsonl or its start is fresher than STALE_AFTER_S
    queued   a Slurm job was submitted (or requeued) and has not started
    stopped  the last attempt was interrupted (Ctrl-C, SIGTERM, scancel), exited 0 before DONE.json,
             or vanished without a recorded exit (pid gone, no sign of life, or squeue no longer
             knows the job); the next `btx branch` resumes it from its last checkpoint
    pending  nothing was ever started
Where squeue exists it refines the Slurm states; without it they rest on the files alone.

`job.json` is written by whoever starts an attempt (the local executor; for Slurm the submitter and
the batch script itself, through `python -m btx.branch record`): executor, command, host, pid,
slurm_job_id, submitted_at / started_at / ended_at, exit_code, interrupted, and for local jobs the
launcher (the `btx branch` / `btx run` process). Each write merges into the file atomically
(temporary sibling + rename). A local job whose launcher is gone (a SIGKILLed `btx run`) keeps
running on its own: the next `btx branch` says so, and `btx run` waits for it.
"""

from __future__ import annotations

import difflib
import json
import os
import shlex
import shutil
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

from btx.errors import BtxError
from btx.manifest import is_done, write_json_atomic

JOB_FILE = "job.json"
LOG_FILE = "train.log"
METRICS_FILE = "metrics.jsonl"
SBATCH_FILE = "job.sbatch"
STATES = ("pending", "queued", "running", "stopped", "failed", "done")
# A job that is not a local process on this host counts as running while it shows signs of life
# this recent: expert training logs every few steps, so half an hour of silence means it is gone.
STALE_AFTER_S = 30 * 60
# Slurm sends USR1 this many seconds before the time limit; the batch script then stops training
# (SIGTERM) and requeues itself, and the requeued job resumes from the last checkpoint.
SLURM_STOP_GRACE_S = 300
# The program the jobs run (what follows the Python interpreter or the torchrun launcher).
TRAIN_PROGRAM = ("-m", "btx", "train")


# ---------------------------------------------------------------------------------------------
# Planning
# ---------------------------------------------------------------------------------------------


@dataclass
class ExpertJob:
    """One expert's training job: the program and its arguments, without any launcher."""

    domain: str
    expert_dir: Path  # where btx train puts it: ckpt/, metrics.jsonl, final/, DONE.json (+ ours: job.json, train.log)
    program: list[str]  # e.g. ["-m", "btx", "train", "/abs/btx.yaml", "--domain", "math", "train.steps=5"]
    total_steps: int

    @property
    def log(self) -> Path:
        return self.expert_dir / LOG_FILE

    @property
    def sbatch(self) -> Path:
        return self.expert_dir / SBATCH_FILE


def plan_jobs(exp, recipe_path: str | os.PathLike, overrides: Sequence[str] = (),
              only: Optional[Sequence[str]] = None,
              train_program: Sequence[str] = TRAIN_PROGRAM) -> list[ExpertJob]:
    """One job per domain of the experiment (or of `only`), in recipe order; done ones included
    (callers skip them by state). `train_program` replaces `-m btx train` (tests use a stand-in).
    Nothing is checked here (`btx status` plans a run that has not started); see `check_ready`."""
    names = list(exp.domains)
    if only:
        for name in only:
            if name not in exp.domains:
                close = difflib.get_close_matches(name, names, n=1)
                raise BtxError(f"--only {name}: not a domain of {exp.path} (domains: {', '.join(names)})"
                               + (f" (did you mean {close[0]}?)" if close else ""))
        names = [n for n in names if n in set(only)]
    recipe = str(Path(recipe_path).absolute())
    return [
        ExpertJob(domain=name, expert_dir=exp.expert_dir(name),
                  program=[*train_program, recipe, "--domain", name, *overrides],
                  total_steps=exp.domains[name].train.steps)
        for name in names
    ]


def check_ready(exp, jobs: Sequence[ExpertJob]) -> Path:
    """Refuse before launching anything when a job could not start: the seed is missing or not
    done, or a domain's shards are not prepared. The checks are btx.train's own (`expert_job`),
    so branch and train agree on them. Returns the seed directory the experts start from."""
    from btx.train import expert_job

    seeds = {expert_job(exp, job.domain).init_from for job in jobs}
    return seeds.pop()


# ---------------------------------------------------------------------------------------------
# Job records (job.json) and derived state
# ---------------------------------------------------------------------------------------------


def read_job(expert_dir: str | os.PathLike) -> dict:
    """The expert's job record, {} when no attempt was ever recorded (or it is unreadable)."""
    try:
        data = json.loads((Path(expert_dir) / JOB_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def update_job(expert_dir: str | os.PathLike, **fields) -> dict:
    """Merge `fields` into the job record and write it atomically."""
    expert_dir = Path(expert_dir)
    expert_dir.mkdir(parents=True, exist_ok=True)
    record = {**read_job(expert_dir), **fields}
    write_json_atomic(expert_dir / JOB_FILE, record)
    return record


def _new_attempt(**fields) -> dict:
    """The fields that start an attempt, clearing what the previous attempt left."""
    return {"submitted_at": None, "started_at": None, "ended_at": None, "exit_code": None,
            "interrupted": False, "pid": None, "pid_start": None, **fields}


def _process_start(pid: int) -> Optional[int]:
    """The start time of a process in clock ticks since boot (Linux /proc), to tell a live job from
    a recycled pid; None where /proc is not available."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22; the command name (field 2) is in parentheses and may itself contain spaces.
    return int(stat.rsplit(")", 1)[1].split()[19])


def _pid_alive(pid: int, start: Optional[int]) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    return start is None or _process_start(pid) in (None, start)


def _slurm_active(job_id: str) -> Optional[bool]:
    """Whether Slurm still knows the job as queued or running; None when squeue cannot tell."""
    if shutil.which("squeue") is None:
        return None
    try:
        out = subprocess.run(["squeue", "-h", "-j", str(job_id), "-o", "%T"], capture_output=True,
                             text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        # squeue refuses job ids it has forgotten ("Invalid job id"); other errors (a busy
        # controller) say nothing about the job.
        return False if "invalid job id" in out.stderr.lower() else None
    return bool(out.stdout.strip())


def expert_state(expert_dir: str | os.PathLike, now: Optional[float] = None) -> tuple[str, str]:
    """(state, detail) of one expert, from its directory alone; see the module docstring."""
    expert_dir = Path(expert_dir)
    if is_done(expert_dir):
        return "done", ""
    job = read_job(expert_dir)
    if not job:
        return "pending", ""
    now = time.time() if now is None else now
    where = f"slurm {job['slurm_job_id']}" if job.get("slurm_job_id") else f"pid {job.get('pid')} on {job.get('host')}"
    if job.get("interrupted"):
        return "stopped", f"interrupted ({where}); resumes on the next btx branch"
    if job.get("exit_code") is not None:
        if job["exit_code"] == 0:  # exited cleanly without DONE.json: it will simply run again
            return "stopped", f"exited 0 before finishing ({where})"
        return "failed", f"{describe_exit(job['exit_code'])} ({where}), see {expert_dir / LOG_FILE}"
    if job.get("started_at") is None:
        if job.get("slurm_job_id"):
            if _slurm_active(job["slurm_job_id"]) is False:
                return "stopped", f"{where} left the queue without starting"
            return "queued", where
        return "pending", ""
    if job.get("pid") and job.get("host") == socket.gethostname():
        if _pid_alive(int(job["pid"]), job.get("pid_start")):
            return "running", where
        return "stopped", f"{where} is gone (no exit status recorded)"
    last_sign = max(job["started_at"], _mtime(expert_dir / METRICS_FILE))
    if job.get("slurm_job_id") and _slurm_active(job["slurm_job_id"]) is False:
        return "stopped", f"{where} ended without recording an exit status"
    if now - last_sign < STALE_AFTER_S:
        return "running", where
    return "stopped", f"{where}: no progress for {_duration(now - last_sign)}"


def orphan_note(expert_dir: str | os.PathLike) -> str:
    """", left running by a btx branch / btx run (pid N) that is gone" for a local job whose
    launcher died (SIGKILL); "" otherwise."""
    launcher = read_job(expert_dir).get("launcher")
    if not isinstance(launcher, dict) or not isinstance(launcher.get("pid"), int):
        return ""
    if _pid_alive(launcher["pid"], launcher.get("start")):
        return ""
    return f", left running by a btx branch / btx run (pid {launcher['pid']}) that is gone"


def wait_for_running(jobs: Sequence[ExpertJob], console, poll_s: float = 2.0) -> None:
    """Wait until none of `jobs` is running or queued any more, saying which ones and why."""
    waiting = [job for job in jobs if expert_state(job.expert_dir)[0] in ("running", "queued")]
    for job in waiting:
        state, detail = expert_state(job.expert_dir)
        console.print(f"[yellow]{job.domain}: still {state} ({detail}{orphan_note(job.expert_dir)}); waiting for "
                      f"it to finish (log {job.log}; Ctrl-C stops waiting, not the job)[/]", soft_wrap=True)
    while any(expert_state(job.expert_dir)[0] in ("running", "queued") for job in waiting):
        time.sleep(poll_s)


def describe_exit(code: int) -> str:
    """'exit 3', or 'killed by SIGKILL' for a process that a signal ended (Popen's negative codes)."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit {code}"


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


# ---------------------------------------------------------------------------------------------
# Progress from metrics.jsonl
# ---------------------------------------------------------------------------------------------


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


def _last_lines(path: Path, n: int, block: int = 1 << 16) -> list[str]:
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
    for line in _last_lines(expert_dir / METRICS_FILE, 64):
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line being written right now
        if isinstance(row, dict) and "step" in row and "loss" in row:
            rows.append(row)
    return rows


def expert_status(job: ExpertJob, now: Optional[float] = None) -> ExpertStatus:
    state, detail = expert_state(job.expert_dir, now)
    final = job.expert_dir / "final"
    status = ExpertStatus(domain=job.domain, state=state, detail=detail, total_steps=job.total_steps,
                          path=final if state == "done" else job.expert_dir)
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


def _duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return ""
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


_STATE_STYLE = {"pending": "dim", "queued": "cyan", "running": "yellow", "stopped": "magenta",
                "failed": "bold red", "done": "green"}


def status_table(statuses: Sequence[ExpertStatus], title: Optional[str] = None):
    """The table that `btx status` prints and `btx branch` keeps live (btx.tables: values and paths
    stay whole; a narrow terminal or log file gets one block per expert)."""
    from rich.markup import escape

    from btx.tables import Column, FitTable

    columns = [Column("expert", "label"), Column("state", "text"), Column("step"), Column("loss"),
               Column("tokens/s"), Column("ETA"), Column("output / note", "text")]
    rows = []
    for s in statuses:
        step = f"{s.step if s.step is not None else '-'}/{s.total_steps}"
        loss = f"{s.loss:.4f}" if isinstance(s.loss, (int, float)) else ""
        tps = f"{s.tokens_per_s:,.0f}" if isinstance(s.tokens_per_s, (int, float)) else ""
        note = escape(str(s.path)) + (f"\n[dim]{escape(s.detail)}[/dim]" if s.detail else "")
        rows.append([escape(s.domain), f"[{_STATE_STYLE[s.state]}]{s.state}[/]", step, loss, tps, _duration(s.eta_s),
                     note])
    return FitTable(columns, rows, title=title)


# ---------------------------------------------------------------------------------------------
# Local executor
# ---------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    job: ExpertJob
    exit_code: Optional[int] = None  # None: not run (skipped) or still running when stopped
    interrupted: bool = False
    error: Optional[str] = None  # why it failed without a log (sbatch refused it)


def visible_gpus() -> list[str]:
    """The GPU ids this process may hand out (CUDA_VISIBLE_DEVICES when set)."""
    import torch

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
        groups = [",".join(gpus[i:i + devices_per_expert])
                  for i in range(0, len(gpus) - devices_per_expert + 1, devices_per_expert)]
        if not groups:
            raise BtxError(f"branch.devices_per_expert: {devices_per_expert} GPUs per expert, but only "
                           f"{len(gpus)} visible ({','.join(gpus)}); override it, e.g. "
                           f"branch.devices_per_expert={len(gpus)}")
        if max_parallel is not None and max_parallel > len(groups):
            raise BtxError(f"--max-parallel / branch.max_parallel: {max_parallel} jobs of {devices_per_expert} GPU(s) need "
                           f"{max_parallel * devices_per_expert} GPUs, only {len(gpus)} visible "
                           f"(at most {len(groups)} at a time)")
        return cls(groups[:max_parallel or len(groups)], devices_per_expert)

    def command(self, job: ExpertJob) -> list[str]:
        """The job's full command line: plain Python, or torchrun for several GPUs per expert."""
        if self.devices[0] is not None and self.devices_per_expert > 1:
            # --standalone: a private rendezvous on a free port, so concurrent experts do not clash.
            return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                    f"--nproc_per_node={self.devices_per_expert}", *job.program]
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


def run_local(jobs: Sequence[ExpertJob], slots: LocalSlots, *, console=None, refresh_s: float = 0.5,
              stop_grace_s: float = 300.0) -> list[Outcome]:
    """Run `jobs` as subprocesses, at most one per slot at a time, each in its own process group
    with its output in `<expert_dir>/train.log`. A failing job does not stop the others.

    Ctrl-C (or SIGTERM to this process) stops every running job: SIGTERM to its process group, on
    which `btx train` finishes its step, writes a checkpoint and exits; SIGKILL after `stop_grace_s`.
    Each is waited for and recorded as interrupted, so nothing is orphaned and the next run resumes
    them. KeyboardInterrupt is then re-raised.
    """
    from rich.console import Console

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
        header = (f"\n=== btx branch {time.strftime('%Y-%m-%d %H:%M:%S')} on {socket.gethostname()}"
                  f"{f' CUDA_VISIBLE_DEVICES={devices}' if devices is not None else ''}: {shlex.join(cmd)}\n")
        log_file.write(header.encode())
        log_file.flush()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)
        running.append(_Running(job, slot, proc, log_file))  # first: a Ctrl-C from here on stops it too
        update_job(job.expert_dir, **_new_attempt(
            executor="local", command=cmd, host=socket.gethostname(), pid=proc.pid,
            pid_start=_process_start(proc.pid), started_at=time.time(), devices=devices,
            launcher={"pid": os.getpid(), "start": _process_start(os.getpid())}))
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
            console.print(f"[yellow]stopping {len(running)} running job(s) (they checkpoint first; Ctrl-C "
                          "again kills them)...[/]")
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
            from rich.live import Live

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
    return "\n".join(_last_lines(path, lines))


# ---------------------------------------------------------------------------------------------
# Slurm executor
# ---------------------------------------------------------------------------------------------


def sbatch_script(job: ExpertJob, slurm, experiment: str, *, python: Optional[str] = None,
                  workdir: Optional[Path] = None) -> str:
    """The batch script of one expert. `slurm` is the recipe's branch.slurm section."""
    workdir = Path.cwd() if workdir is None else workdir
    # After setup lines (module load, venv activation) the environment's own python is the right
    # one; without them, the interpreter running btx branch now (on the cluster's shared disk).
    python = python or ("python" if slurm.setup else sys.executable)
    q = shlex.quote
    gpus_per_node = slurm.gpus_per_node
    processes = slurm.nodes * max(gpus_per_node, 1)
    if processes > 1:
        # One torchrun per node (srun starts them), gpus_per_node workers each; the first node of
        # the allocation hosts the rendezvous, on a port derived from the job id.
        launch = ('srun --kill-on-bad-exit=1 --ntasks-per-node=1 "$PYTHON" -m torch.distributed.run '
                  f'--nnodes="$SLURM_NNODES" --nproc_per_node={max(gpus_per_node, 1)} '
                  '--rdzv_backend=c10d --rdzv_endpoint="$HEAD_NODE:$RDZV_PORT" --rdzv_id="$SLURM_JOB_ID" '
                  + shlex.join(job.program))
    else:
        launch = 'srun --kill-on-bad-exit=1 "$PYTHON" ' + shlex.join(job.program)
    if slurm.cpus_per_task is not None:  # srun does not inherit sbatch's --cpus-per-task (Slurm >= 22.05)
        launch = launch.replace("srun ", f"srun --cpus-per-task={slurm.cpus_per_task} ", 1)

    sbatch = [f"--job-name={sbatch_quote(f'{experiment}-{job.domain}')}"]
    for key, value in (("partition", slurm.partition), ("account", slurm.account), ("time", slurm.time)):
        if value is not None:
            sbatch.append(f"--{key}={sbatch_quote(str(value))}")
    sbatch += [f"--nodes={slurm.nodes}", "--ntasks-per-node=1"]
    if gpus_per_node:
        sbatch.append(f"--gpus-per-node={gpus_per_node}")
    if slurm.cpus_per_task is not None:
        sbatch.append(f"--cpus-per-task={slurm.cpus_per_task}")
    if slurm.mem is not None:
        sbatch.append(f"--mem={sbatch_quote(str(slurm.mem))}")
    # Slurm expands %j, %x, ... in file names; %% is a literal %.
    log = sbatch_quote(str(job.log).replace("%", "%%"))
    sbatch += [f"--output={log}", f"--error={log}", "--open-mode=append",
               "--requeue", f"--signal=B:USR1@{SLURM_STOP_GRACE_S}"]
    sbatch += [line.removeprefix("#SBATCH").strip() for line in slurm.extra_sbatch]

    lines = [
        "#!/bin/bash",
        f"# btx branch: expert {job.domain!r} of experiment {experiment!r}.",
        "#",
        "# This script is idempotent: `btx train` resumes from the newest checkpoint in",
        f"# {job.expert_dir}/ckpt/ and does nothing once DONE.json exists there. So the job may be",
        "# requeued (--requeue: preemption, node failure, or the stop before the time limit below) or",
        "# resubmitted by hand with `sbatch` any number of times: it continues where it stopped.",
        *(f"#SBATCH {arg}" for arg in sbatch),
        "",
        "set -u",
        *slurm.setup,
        f"cd {q(str(workdir))}",
        "",
        "# The interpreter (BTX_PYTHON overrides it).",
        f'PYTHON="${{BTX_PYTHON:-{python}}}"',
        f"EXPERT_DIR={q(str(job.expert_dir))}",
        'HEAD_NODE=$(scontrol show hostnames "${SLURM_JOB_NODELIST:-localhost}" 2>/dev/null | head -n 1)',
        'HEAD_NODE=${HEAD_NODE:-localhost}',
        "RDZV_PORT=$((20000 + ${SLURM_JOB_ID:-0} % 20000))",
        "",
        "# job.json tells `btx status` where this job stands (started, exit status, requeued).",
        'record() { "$PYTHON" -m btx.branch record "$EXPERT_DIR" "$@" || true; }',
        "",
        f"# {SLURM_STOP_GRACE_S} s before the time limit Slurm sends USR1 to this script: stop training",
        "# (on SIGTERM btx train finishes its step and checkpoints) and requeue the job, which then",
        "# resumes. scancel and preemption send SIGTERM: training checkpoints the same way.",
        "requeue=0",
        'trap \'echo "btx: time limit near, stopping and requeueing job $SLURM_JOB_ID"; requeue=1; '
        'kill -TERM "$train_pid" 2>/dev/null\' USR1',
        'trap \'kill -TERM "$train_pid" 2>/dev/null; wait "$train_pid"; record interrupted "$?"; exit 143\' TERM',
        "",
        "record started",
        f"{launch} &",
        "train_pid=$!",
        'wait "$train_pid"',
        "status=$?",
        'if [ "$requeue" = 1 ]; then',
        '    wait "$train_pid"  # the first wait returned when the signal arrived',
        "    record requeued",
        '    scontrol requeue "$SLURM_JOB_ID"',
        "    exit 0",
        "fi",
        'record exited "$status"',
        'exit "$status"',
        "",
    ]
    return "\n".join(lines)


_SBATCH_PLAIN = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-.,:/=+@%")


def sbatch_quote(value: str) -> str:
    """A value as sbatch reads it from a `#SBATCH` line: whitespace ends an argument there unless it
    is quoted, `#` starts a comment, and a backslash escapes the next character (also inside
    quotes), so anything but plain characters goes in double quotes with `\\` and `"` escaped."""
    if value and all(ch in _SBATCH_PLAIN for ch in value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def submit_slurm(jobs: Sequence[ExpertJob], scripts: dict[str, str], console) -> list[Outcome]:
    """Write each job's script to `<expert_dir>/job.sbatch` and submit it with `sbatch` when that
    exists (the job id goes into job.json); without sbatch, say how to submit the scripts."""
    sbatch = shutil.which("sbatch")
    outcomes = []
    for job in jobs:
        job.expert_dir.mkdir(parents=True, exist_ok=True)
        _write_text_atomic(job.sbatch, scripts[job.domain])
        job.sbatch.chmod(0o755)
        if sbatch is None:
            console.print(f"{job.domain}: wrote {job.sbatch}")
            outcomes.append(Outcome(job))
            continue
        out = subprocess.run([sbatch, "--parsable", str(job.sbatch)], capture_output=True, text=True)
        if out.returncode != 0:
            message = (out.stderr or out.stdout).strip() or f"sbatch exited {out.returncode}"
            console.print(f"[red]{job.domain}: sbatch failed[/]: {message.splitlines()[-1]}", highlight=False)
            outcomes.append(Outcome(job, exit_code=out.returncode, error=message))
            continue
        job_id = out.stdout.strip().split(";")[0]
        update_job(job.expert_dir, **_new_attempt(executor="slurm", command=["sbatch", str(job.sbatch)],
                                                  slurm_job_id=job_id, host=None, submitted_at=time.time()))
        console.print(f"{job.domain}: submitted Slurm job {job_id} ({job.sbatch})")
        outcomes.append(Outcome(job))
    if sbatch is None and jobs:
        console.print("[yellow]sbatch is not on PATH here[/]: submit the scripts from a Slurm login node with "
                      + " ; ".join(f"sbatch {job.sbatch}" for job in jobs))
    return outcomes


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# `btx branch` and `btx status`
# ---------------------------------------------------------------------------------------------


def branch(recipe_path: str | os.PathLike, overrides: Sequence[str] = (), *, executor: Optional[str] = None,
           max_parallel: Optional[int] = None, dry_run: bool = False, only: Optional[Sequence[str]] = None,
           train_program: Sequence[str] = TRAIN_PROGRAM, console=None, stop_grace_s: float = 300.0) -> int:
    """`btx branch`: launch every expert that is neither done nor already running. Returns the exit
    status: 0 when every launched job succeeded (or was submitted), 1 when any failed."""
    from rich.console import Console
    from rich.panel import Panel
    from rich.text import Text

    from btx.recipe import load_experiment

    console = console or Console()
    exp = load_experiment(recipe_path, list(overrides))
    executor = executor or exp.branch.executor
    if max_parallel is not None and max_parallel < 1:
        raise BtxError(f"--max-parallel: expected a positive number of jobs, got {max_parallel}")
    max_parallel = max_parallel or exp.branch.max_parallel

    jobs = plan_jobs(exp, recipe_path, overrides, only, train_program)
    to_run = []
    for job in jobs:
        state, detail = expert_state(job.expert_dir)
        if state == "done":
            console.print(f"{job.domain}: done ({job.expert_dir / 'final'}), skipped")
        elif state in ("running", "queued"):
            console.print(f"{job.domain}: already {state} ({detail}{orphan_note(job.expert_dir)}), skipped",
                          highlight=False)
        else:
            to_run.append(job)
    if not to_run:
        console.print("nothing to do: every expert is done or running")
        return 0
    try:
        seed = check_ready(exp, to_run)
    except BtxError as e:
        if not dry_run:
            raise
        console.print(f"[yellow]note: {e}[/] (a real run refuses to start)", highlight=False)
        seed = exp.seed_dir
    console.print(f"{len(to_run)} expert job(s) from seed {seed} with the {executor} executor", highlight=False)

    if executor == "slurm":
        scripts = {job.domain: sbatch_script(job, exp.branch.slurm, exp.name) for job in to_run}
        if dry_run:
            for job in to_run:
                console.rule(f"{job.sbatch}")
                console.print(scripts[job.domain], markup=False, highlight=False, soft_wrap=True)
                console.print(f"$ sbatch --parsable {job.sbatch}", markup=False, highlight=False)
            return 0
        outcomes = submit_slurm(to_run, scripts, console)
    else:
        slots = LocalSlots.plan(visible_gpus(), exp.branch.devices_per_expert, max_parallel)
        if dry_run:
            for i, job in enumerate(to_run):
                env = slots.env(i % len(slots.devices))
                prefix = "".join(f"{var}={env[var]} " for var in ("CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS")
                                 if var in env)
                console.print(f"{prefix}{shlex.join(slots.command(job))} >> {job.log}", markup=False,
                              highlight=False, soft_wrap=True)
            console.print(f"(at most {len(slots.devices)} at a time)")
            return 0
        outcomes = run_local(to_run, slots, console=console, stop_grace_s=stop_grace_s)

    failed = [o for o in outcomes if o.exit_code not in (None, 0)]
    for o in failed:
        where = "sbatch's answer" if o.error else f"last lines of {o.job.log}"
        body = Text(o.error or log_tail(o.job.log) or "(empty log)")  # plain text: logs hold stray [brackets]
        console.print(Panel(body, border_style="red", title_align="left",
                            title=f"{o.job.domain} failed ({describe_exit(o.exit_code)}): {where}"))
    if failed:
        names = ", ".join(f"{o.job.domain} ({describe_exit(o.exit_code)})" for o in failed)
        print(f"btx branch: {len(failed)} of {len(outcomes)} expert job(s) failed: {names}; "
              "fix the cause and re-run btx branch (finished experts are kept)", file=sys.stderr)
        return 1
    return 0


def status(recipe_path: str | os.PathLike, overrides: Sequence[str] = (), *, watch: bool = False,
           interval_s: float = 2.0, console=None) -> int:
    """`btx status`: a table of every expert of the experiment, read from the run directory."""
    from rich.console import Console

    from btx.recipe import load_experiment

    console = console or Console()
    exp = load_experiment(recipe_path, list(overrides))
    jobs = plan_jobs(exp, recipe_path, overrides)
    title = f"{exp.name}: experts in {exp.run_dir / 'experts'}"

    def snapshot():
        return [expert_status(job) for job in jobs]

    if not watch:
        console.print(status_table(snapshot(), title=title))
        return 0
    try:
        with LiveTable(console, status_table(snapshot(), title=title)) as display:
            while True:
                statuses = snapshot()
                display.update(status_table(statuses, title=title))
                if all(s.state == "done" for s in statuses):
                    break
                time.sleep(interval_s)
    except KeyboardInterrupt:
        pass  # Ctrl-C is how one leaves --watch
    return 0


# ---------------------------------------------------------------------------------------------
# `python -m btx.branch record EXPERT_DIR EVENT [EXIT_CODE]` (called by the Slurm batch script)
# ---------------------------------------------------------------------------------------------


def record_event(expert_dir: str | os.PathLike, event: str, exit_code: Optional[int] = None) -> None:
    now = time.time()
    slurm_job_id = os.environ.get("SLURM_JOB_ID")
    if event == "started":
        update_job(expert_dir, **_new_attempt(executor="slurm" if slurm_job_id else "script",
                                              slurm_job_id=slurm_job_id, host=socket.gethostname(),
                                              pid=os.getppid(), started_at=now))
    elif event in ("exited", "interrupted"):
        update_job(expert_dir, exit_code=exit_code, ended_at=now, interrupted=event == "interrupted")
    elif event == "requeued":
        update_job(expert_dir, **_new_attempt(executor="slurm", slurm_job_id=slurm_job_id, submitted_at=now))
    else:
        raise BtxError(f"record: unknown event {event!r} (expected started, exited, interrupted or requeued)")


def _record_main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[0] != "record":
        print("usage: python -m btx.branch record EXPERT_DIR started|exited CODE|interrupted CODE|requeued",
              file=sys.stderr)
        return 2
    record_event(argv[1], argv[2], int(argv[3]) if len(argv) > 3 else None)
    return 0


if __name__ == "__main__":
    sys.exit(_record_main(sys.argv[1:]))
