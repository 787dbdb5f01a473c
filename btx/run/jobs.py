"""Expert jobs: planning one `btx train` job per domain, their records (job.json) and their state.

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
the batch script itself, through `python -m btx.run.slurm record`): executor, command, host, pid,
slurm_job_id, submitted_at / started_at / ended_at, exit_code, interrupted, and for local jobs the
launcher (the `btx branch` / `btx run` process). Each write merges into the file atomically
(temporary sibling + rename). A local job whose launcher is gone (a SIGKILLed `btx run`) keeps
running on its own: the next `btx branch` says so, and `btx run` waits for it.
"""

from __future__ import annotations

import difflib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from btx.errors import BtxError
from btx.io.atomic import write_json_atomic
from btx.io.manifest import is_done
from btx.recipe.builtin import resolve_recipe

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
    final: Optional[Path] = None  # its HF checkpoint (RunDir.expert_final)

    @property
    def log(self) -> Path:
        return self.expert_dir / LOG_FILE

    @property
    def sbatch(self) -> Path:
        return self.expert_dir / SBATCH_FILE


def plan_jobs(
    exp,
    recipe_path: str | os.PathLike,
    overrides: Sequence[str] = (),
    only: Optional[Sequence[str]] = None,
    train_program: Sequence[str] = TRAIN_PROGRAM,
) -> list[ExpertJob]:
    """One job per domain of the experiment (or of `only`), in recipe order; done ones included
    (callers skip them by state). `train_program` replaces `-m btx train` (tests use a stand-in).
    Nothing is checked here (`btx status` plans a run that has not started); see `check_ready`."""
    names = list(exp.domains)
    if only:
        for name in only:
            if name not in exp.domains:
                close = difflib.get_close_matches(name, names, n=1)
                raise BtxError(
                    f"--only {name}: not a domain of {exp.path} (domains: {', '.join(names)})"
                    + (f" (did you mean {close[0]}?)" if close else "")
                )
        names = [n for n in names if n in set(only)]
    # The file the recipe name resolved to (a name `btx recipes` lists lives in the package, not
    # beside the working directory), absolute: jobs start elsewhere, on other machines.
    recipe = str(Path(resolve_recipe(recipe_path)).absolute())
    return [
        ExpertJob(
            domain=name,
            expert_dir=exp.paths.expert(name),
            final=exp.paths.expert_final(name),
            program=[*train_program, recipe, "--domain", name, *overrides],
            total_steps=exp.domains[name].train.steps,
        )
        for name in names
    ]


def check_ready(exp, jobs: Sequence[ExpertJob]) -> Path:
    """Refuse before launching anything when a job could not start: the seed is missing or not
    done, or a domain's shards are not prepared. The checks are btx.train's own (`expert_job`),
    so branch and train agree on them. Returns the seed directory the experts start from."""

    from btx.train.job import (
        expert_job,  # lazy: `btx status` and `btx branch` start without torch
    )

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


def new_attempt(**fields) -> dict:
    """The fields that start an attempt, clearing what the previous attempt left."""
    return {
        "submitted_at": None,
        "started_at": None,
        "ended_at": None,
        "exit_code": None,
        "interrupted": False,
        "pid": None,
        "pid_start": None,
        **fields,
    }


def process_start(pid: int) -> Optional[int]:
    """The start time of a process in clock ticks since boot (Linux /proc), to tell a live job from
    a recycled pid; None where /proc is not available."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22; the command name (field 2) is in parentheses and may itself contain spaces.
    return int(stat.rsplit(")", 1)[1].split()[19])


def pid_alive(pid: int, start: Optional[int]) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    return start is None or process_start(pid) in (None, start)


def _slurm_active(job_id: str) -> Optional[bool]:
    """Whether Slurm still knows the job as queued or running; None when squeue cannot tell."""
    if shutil.which("squeue") is None:
        return None
    try:
        out = subprocess.run(
            ["squeue", "-h", "-j", str(job_id), "-o", "%T"], capture_output=True, text=True, timeout=20
        )
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
        if pid_alive(int(job["pid"]), job.get("pid_start")):
            return "running", where
        return "stopped", f"{where} is gone (no exit status recorded)"
    last_sign = max(job["started_at"], _mtime(expert_dir / METRICS_FILE))
    if job.get("slurm_job_id") and _slurm_active(job["slurm_job_id"]) is False:
        return "stopped", f"{where} ended without recording an exit status"
    if now - last_sign < STALE_AFTER_S:
        return "running", where
    return "stopped", f"{where}: no progress for {duration(now - last_sign)}"


def orphan_note(expert_dir: str | os.PathLike) -> str:
    """ ", left running by a btx branch / btx run (pid N) that is gone" for a local job whose
    launcher died (SIGKILL); "" otherwise."""
    launcher = read_job(expert_dir).get("launcher")
    if not isinstance(launcher, dict) or not isinstance(launcher.get("pid"), int):
        return ""
    if pid_alive(launcher["pid"], launcher.get("start")):
        return ""
    return f", left running by a btx branch / btx run (pid {launcher['pid']}) that is gone"


def wait_for_running(jobs: Sequence[ExpertJob], console, poll_s: float = 2.0) -> None:
    """Wait until none of `jobs` is running or queued any more, saying which ones and why."""
    waiting = [job for job in jobs if expert_state(job.expert_dir)[0] in ("running", "queued")]
    for job in waiting:
        state, detail = expert_state(job.expert_dir)
        console.print(
            f"[yellow]{job.domain}: still {state} ({detail}{orphan_note(job.expert_dir)}); waiting for "
            f"it to finish (log {job.log}; Ctrl-C stops waiting, not the job)[/]",
            soft_wrap=True,
        )
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


def duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return ""
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
