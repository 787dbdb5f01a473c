"""Experiment trackers (`train.loggers`): every record metrics.jsonl gets also goes to tensorboard
and/or wandb, from the main rank only.

    loggers = open_loggers(job, start_step=state["step"], main=engine.is_main)
    with loggers:
        ...
        metrics.write(record); loggers.log(record)

What a tracker receives is `scalars(record)`: every number of the record under its own key (loss,
lr, grad_norm, tokens, tokens_per_s, step_time_s, mfu, elapsed_s, val_loss, val_loss/<domain>,
an MoE's nll, balance_loss, z_loss, drop_rate, router_temperature), and a list's items as KEY/i
(KEY/i/j for a layer x expert table: routing_load_share/<layer>/<expert>); the record's step is the
tracker's step. A value that is None (MFU where no peak is known) is left out.

Where they write, inside the job's work directory (beside metrics.jsonl):
    tensorboard/   event files; `tensorboard --logdir <run_dir>` shows every job of a run, each
                   under its own directory (seed-train/, experts/<domain>/, finetune-train/, ...)
    wandb/         wandb's run directory (offline-run-* with WANDB_MODE=offline, to `wandb sync`
                   later); the run is named <experiment>-<stage>[-<domain>], grouped by experiment,
                   in project WANDB_PROJECT (default: the experiment's name)

Resume: tensorboard purges the events after the step a run resumes from (SummaryWriter's
purge_step), as metrics.jsonl drops its lines after it; wandb continues the same run (its id is
kept in wandb/btx-run-id; a job started from step 0 gets a new one).

Both packages are optional extras (`pip install 'btx[tensorboard]'`, `'btx[wandb]'`); a recipe that
asks for a missing one stops with one line before anything is trained (`check_loggers`).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import secrets
import string
from pathlib import Path

from btx.choices import LOGGERS
from btx.errors import BtxError

TENSORBOARD_DIR = "tensorboard"
WANDB_DIR = "wandb"
WANDB_ID_FILE = "btx-run-id"
_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}  # logger -> the module it needs (and its extra)


def check_loggers(names) -> None:
    """BtxError (one line, naming the extra) for a logger that is unknown or whose package is missing."""
    for name in names:
        if name not in LOGGERS:
            raise BtxError(f"train.loggers: unknown logger {name!r}; expected any of {', '.join(LOGGERS)}")
        if importlib.util.find_spec(_PACKAGES[name]) is None:
            raise BtxError(
                f"train.loggers: {name} needs the {_PACKAGES[name]} package: pip install 'btx[{name}]' "
                f"(or drop {name} from train.loggers)"
            )


def scalars(record: dict) -> dict[str, float]:
    """The record's numbers by tracker key (see the module docstring); the step is not one of them."""
    out: dict[str, float] = {}

    def add(key: str, value) -> None:
        if isinstance(value, bool) or value is None:
            return
        if isinstance(value, (int, float)):
            if math.isfinite(value):
                out[key] = float(value)
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                add(f"{key}/{i}", item)

    for key, value in record.items():
        if key != "step":
            add(key, value)
    return out


def run_name(job) -> str:
    """<experiment>-<stage>[-<job name>]: demo-seed, demo-branch-code, demo-finetune-router, ..."""
    parts = [job.experiment] if job.experiment else []
    if job.stage and not job.name.startswith(job.stage):
        parts.append(job.stage)
    parts.append(job.name)
    return "-".join(parts)


class _TensorBoard:
    def __init__(self, job, start_step: int):
        from torch.utils.tensorboard import SummaryWriter  # optional extra: imported only when asked for

        # purge_step: events of steps after the checkpoint resumed from (a killed session's) are hidden
        self.writer = SummaryWriter(
            log_dir=str(Path(job.work_dir) / TENSORBOARD_DIR), purge_step=start_step + 1, flush_secs=30
        )

    def log(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, global_step=step)

    def close(self, failed: bool) -> None:
        self.writer.close()


class _Wandb:
    def __init__(self, job, start_step: int):
        import wandb  # optional extra: imported only when asked for

        root = Path(job.work_dir) / WANDB_DIR
        root.mkdir(parents=True, exist_ok=True)
        id_file = root / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if start_step > 0 and id_file.is_file() else None
        if not run_id:
            run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
            id_file.write_text(run_id + "\n")
        config = {"job": job.name, "stage": job.stage, "experiment": job.experiment, "trainable": job.trainable}
        if dataclasses.is_dataclass(job.settings):
            config["train"] = dataclasses.asdict(job.settings)
        try:
            self.run = wandb.init(
                project=None if os.environ.get("WANDB_PROJECT") else (job.experiment or "btx"),
                group=job.experiment or None,
                job_type=job.stage or None,
                name=run_name(job),
                id=run_id,
                resume="allow",
                dir=str(Path(job.work_dir)),
                config=config,
                # btx's own progress line stays as it is: wandb neither wraps the console nor talks
                settings=wandb.Settings(console="off", quiet=True),
            )
        except Exception as e:  # wandb's errors have no common base; any of them means: no run
            raise BtxError(
                f"train.loggers: wandb could not start its run ({' '.join(str(e).split())[:200]}); set "
                "WANDB_MODE=offline to log without network, or run `wandb login`"
            ) from None

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


_TRACKERS = {"tensorboard": _TensorBoard, "wandb": _Wandb}


class Loggers:
    """The job's trackers (none on other ranks, or when train.loggers is empty)."""

    def __init__(self, trackers: list):
        self.trackers = trackers

    def log(self, record: dict) -> None:
        if self.trackers:
            values = scalars(record)
            for tracker in self.trackers:
                tracker.log(values, int(record["step"]))

    def __enter__(self) -> "Loggers":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        trackers, self.trackers = self.trackers, []
        for tracker in trackers:
            tracker.close(failed=exc_type is not None and exc_type is not KeyboardInterrupt)


def open_loggers(job, start_step: int, main: bool) -> Loggers:
    """The trackers train.loggers names, opened for `job` resuming after `start_step` (main rank only)."""
    names = list(getattr(job.settings, "loggers", None) or [])
    if not main or not names:
        return Loggers([])
    check_loggers(names)
    trackers = []
    try:
        for name in names:
            trackers.append(_TRACKERS[name](job, start_step))
    except BaseException:
        Loggers(trackers).__exit__(BtxError, None, None)
        raise
    return Loggers(trackers)
