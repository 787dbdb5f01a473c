"""Branch: one `btx train` job per domain from the same seed, run locally or on Slurm.

    branch("recipes/demo/btx.yaml", ["train.steps=20"])   # what `btx branch` does, returns the exit status
    jobs = plan_jobs(exp, recipe_path, overrides)          # one ExpertJob per domain (its command, its dir)
    run_local(jobs, LocalSlots.plan(visible_gpus(), devices_per_expert=1, max_parallel=2))
    sbatch_script(job, exp.branch.slurm, exp.name)         # or one Slurm batch script per expert
    expert_state(exp.paths.expert("code"))                 # ("running", "pid 123 on node7")

Every job is the same idempotent command, `btx train RECIPE --domain NAME [overrides]`: it resumes
from the newest `ckpt/step-N/` and does nothing once the expert's DONE.json exists. Re-running
`btx branch` therefore only launches what is missing, and any expert can be re-run or added later
without touching the others.

Job state and job.json are btx/run/jobs.py's; the executors are local.py and slurm.py.
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from typing import Optional, Sequence

from rich.console import Console
from rich.panel import Panel
from rich.text import Text

from btx.errors import BtxError
from btx.recipe.load import load_experiment
from btx.run.jobs import (
    TRAIN_PROGRAM,
    check_ready,
    describe_exit,
    expert_state,
    orphan_note,
    plan_jobs,
)
from btx.run.local import LiveTable, LocalSlots, log_tail, run_local, visible_gpus
from btx.run.progress import expert_status, status_table
from btx.run.slurm import sbatch_script, submit_slurm


def branch(
    recipe_path: str | os.PathLike,
    overrides: Sequence[str] = (),
    *,
    executor: Optional[str] = None,
    max_parallel: Optional[int] = None,
    dry_run: bool = False,
    only: Optional[Sequence[str]] = None,
    train_program: Sequence[str] = TRAIN_PROGRAM,
    console=None,
    stop_grace_s: float = 300.0,
) -> int:
    """`btx branch`: launch every expert that is neither done nor already running. Returns the exit
    status: 0 when every launched job succeeded (or was submitted), 1 when any failed."""

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
            console.print(f"{job.domain}: done ({job.final}), skipped")
        elif state in ("running", "queued"):
            console.print(
                f"{job.domain}: already {state} ({detail}{orphan_note(job.expert_dir)}), skipped", highlight=False
            )
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
                prefix = "".join(
                    f"{var}={env[var]} " for var in ("CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS") if var in env
                )
                console.print(
                    f"{prefix}{shlex.join(slots.command(job))} >> {job.log}",
                    markup=False,
                    highlight=False,
                    soft_wrap=True,
                )
            console.print(f"(at most {len(slots.devices)} at a time)")
            return 0
        outcomes = run_local(to_run, slots, console=console, stop_grace_s=stop_grace_s)

    failed = [o for o in outcomes if o.exit_code not in (None, 0)]
    for o in failed:
        where = "sbatch's answer" if o.error else f"last lines of {o.job.log}"
        body = Text(o.error or log_tail(o.job.log) or "(empty log)")  # plain text: logs hold stray [brackets]
        console.print(
            Panel(
                body,
                border_style="red",
                title_align="left",
                title=f"{o.job.domain} failed ({describe_exit(o.exit_code)}): {where}",
            )
        )
    if failed:
        names = ", ".join(f"{o.job.domain} ({describe_exit(o.exit_code)})" for o in failed)
        print(
            f"btx branch: {len(failed)} of {len(outcomes)} expert job(s) failed: {names}; "
            "fix the cause and re-run btx branch (finished experts are kept)",
            file=sys.stderr,
        )
        return 1
    return 0


def status(
    recipe_path: str | os.PathLike,
    overrides: Sequence[str] = (),
    *,
    watch: bool = False,
    interval_s: float = 2.0,
    console=None,
) -> int:
    """`btx status`: a table of every expert of the experiment, read from the run directory."""

    console = console or Console()
    exp = load_experiment(recipe_path, list(overrides))
    jobs = plan_jobs(exp, recipe_path, overrides)
    title = f"{exp.name}: experts in {exp.paths.experts}"

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
