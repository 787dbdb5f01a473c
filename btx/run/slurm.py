"""The Slurm executor: one sbatch script per expert, submitted with sbatch; the job requeues itself
before its time limit (SIGTERM to `btx train`, which checkpoints) and resumes when it runs again.

The batch script records its attempts in job.json through `python -m btx.run.slurm record
EXPERT_DIR EVENT [EXIT_CODE]`.
"""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from btx.errors import BtxError
from btx.run.jobs import SLURM_STOP_GRACE_S, ExpertJob, new_attempt, update_job
from btx.run.local import Outcome


def sbatch_script(
    job: ExpertJob, slurm, experiment: str, *, python: Optional[str] = None, workdir: Optional[Path] = None
) -> str:
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
        launch = (
            'srun --kill-on-bad-exit=1 --ntasks-per-node=1 "$PYTHON" -m torch.distributed.run '
            f'--nnodes="$SLURM_NNODES" --nproc_per_node={max(gpus_per_node, 1)} '
            '--rdzv_backend=c10d --rdzv_endpoint="$HEAD_NODE:$RDZV_PORT" --rdzv_id="$SLURM_JOB_ID" '
            + shlex.join(job.program)
        )
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
    sbatch += [
        f"--output={log}",
        f"--error={log}",
        "--open-mode=append",
        "--requeue",
        f"--signal=B:USR1@{SLURM_STOP_GRACE_S}",
    ]
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
        "HEAD_NODE=${HEAD_NODE:-localhost}",
        "RDZV_PORT=$((20000 + ${SLURM_JOB_ID:-0} % 20000))",
        "",
        "# job.json tells `btx status` where this job stands (started, exit status, requeued).",
        'record() { "$PYTHON" -m btx.run.slurm record "$EXPERT_DIR" "$@" || true; }',
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
        update_job(
            job.expert_dir,
            **new_attempt(
                executor="slurm",
                command=["sbatch", str(job.sbatch)],
                slurm_job_id=job_id,
                host=None,
                submitted_at=time.time(),
            ),
        )
        console.print(f"{job.domain}: submitted Slurm job {job_id} ({job.sbatch})")
        outcomes.append(Outcome(job))
    if sbatch is None and jobs:
        console.print(
            "[yellow]sbatch is not on PATH here[/]: submit the scripts from a Slurm login node with "
            + " ; ".join(f"sbatch {job.sbatch}" for job in jobs)
        )
    return outcomes


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def record_event(expert_dir: str | os.PathLike, event: str, exit_code: Optional[int] = None) -> None:
    now = time.time()
    slurm_job_id = os.environ.get("SLURM_JOB_ID")
    if event == "started":
        update_job(
            expert_dir,
            **new_attempt(
                executor="slurm" if slurm_job_id else "script",
                slurm_job_id=slurm_job_id,
                host=socket.gethostname(),
                pid=os.getppid(),
                started_at=now,
            ),
        )
    elif event in ("exited", "interrupted"):
        update_job(expert_dir, exit_code=exit_code, ended_at=now, interrupted=event == "interrupted")
    elif event == "requeued":
        update_job(expert_dir, **new_attempt(executor="slurm", slurm_job_id=slurm_job_id, submitted_at=now))
    else:
        raise BtxError(f"record: unknown event {event!r} (expected started, exited, interrupted or requeued)")


def _record_main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[0] != "record":
        print(
            "usage: python -m btx.run.slurm record EXPERT_DIR started|exited CODE|interrupted CODE|requeued",
            file=sys.stderr,
        )
        return 2
    record_event(argv[1], argv[2], int(argv[3]) if len(argv) > 3 else None)
    return 0


if __name__ == "__main__":
    sys.exit(_record_main(sys.argv[1:]))
