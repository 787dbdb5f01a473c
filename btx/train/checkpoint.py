"""Checkpoints and exact resume.

A checkpoint is a directory `ckpt/step-N/` that appears atomically with the engine's files and
`btx_checkpoint.json` (the sha256 of every file, written last). Resume takes the newest checkpoint
whose files match what was recorded, whose trajectory hash is the job's and whose inputs are the
job's; the newest `keep_checkpoints` are kept.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from btx.errors import BtxError
from btx.io.atomic import write_json_atomic
from btx.io.disk import disk_errors
from btx.io.hashing import cached_sha256
from btx.io.manifest import (
    DONE_NAME,
    identity_changes,
)
from btx.train.distributed import barrier, is_distributed
from btx.train.export import EXPORT_RECORD_DIR, write_export_record
from btx.train.job import CKPT_BYTES_PER_PARAM, CKPT_MANIFEST, STEP_DIR, TrainJob


def checkpoints(job: TrainJob) -> list[tuple[int, Path]]:
    """(step, dir) of every complete checkpoint, oldest first. Directories appear atomically."""
    root = job.ckpt_dir
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        m = STEP_DIR.match(path.name)
        if m and path.is_dir():
            found.append((int(m.group(1)), path))
    return sorted(found)


def save_checkpoint(job: TrainJob, engine, state: dict, trajectory: str) -> Path:
    """ckpt/step-N/: the engine's files plus the loop's state, then the list of their sha256
    (CKPT_MANIFEST, the checkpoint's completion mark); prunes to `keep_checkpoints`."""
    final = job.ckpt_dir / f"step-{state['step']}"
    client_state = {**state, "trajectory_hash": trajectory, "world_size": engine.world_size, "job": job.name}
    size = CKPT_BYTES_PER_PARAM * engine.unwrapped.cfg.param_counts()["total"]
    with disk_errors(job.ckpt_dir, size, f"checkpoint {final.name}"):
        engine.save(final, client_state)
        if engine.is_main:  # before the files are listed: btx_checkpoint.json covers it
            write_export_record(job, engine.unwrapped, final / EXPORT_RECORD_DIR)
        barrier(engine)
        _record_checkpoint(final, engine)
    if engine.is_main:
        kept = checkpoints(job)
        for _, old in kept[: max(0, len(kept) - job.settings.keep_checkpoints)]:
            shutil.rmtree(old, ignore_errors=True)
    barrier(engine)
    return final


def _checkpoint_files(path: Path) -> list[str]:
    return sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file() and p.name != CKPT_MANIFEST)


def _share(items: list, engine) -> list:
    """This rank's share of `items` (every rank hashes a part of a sharded checkpoint)."""
    return items[engine.rank :: engine.world_size]


def _gather(value, engine) -> list:
    if not is_distributed(engine):
        return [value]
    out = [None] * engine.world_size
    torch.distributed.all_gather_object(out, value)
    return out


def _record_checkpoint(path: Path, engine) -> None:
    """Collective: every rank hashes its share of the checkpoint's files; the main rank writes the
    list (the hashes also land in btx's hash cache, so a resume re-reads only changed files)."""
    mine = {rel: cached_sha256(path / rel) for rel in _share(_checkpoint_files(path), engine)}
    hashes = {k: v for part in _gather(mine, engine) for k, v in part.items()}
    if engine.is_main:
        write_json_atomic(path / CKPT_MANIFEST, {"files": dict(sorted(hashes.items()))})
    barrier(engine)


def _checkpoint_problem(path: Path, engine) -> str | None:
    """Collective: why the checkpoint at `path` may not be resumed from (None: its files are the
    ones its manifest lists, byte for byte)."""
    try:
        recorded = json.loads((path / CKPT_MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        recorded = None
    problem = None
    if not isinstance(recorded, dict):
        problem = (
            f"{path}: btx has no record of its files ({CKPT_MANIFEST}: a save cut short, or an older "
            "btx), so it is not resumed from"
        )
    else:
        on_disk = _checkpoint_files(path)
        extra = sorted(set(on_disk) - set(recorded))
        if extra or set(recorded) - set(on_disk):
            name = extra[0] if extra else sorted(set(recorded) - set(on_disk))[0]
            problem = f"{path / name}: {'not' if extra else 'missing, though'} listed in {CKPT_MANIFEST}"
        else:
            for rel in _share(on_disk, engine):
                if cached_sha256(path / rel) != recorded[rel]:
                    problem = f"{path / rel}: differs from the sha256 in {CKPT_MANIFEST} (damaged or edited)"
                    break
    problems = [p for p in _gather(problem, engine) if p]
    return problems[0] if problems else None


def resume_job(job: TrainJob, engine, trajectory: str, console, identities: dict | None = None) -> dict:
    """The loop state to continue from: the newest sound checkpoint's, or a fresh start."""
    fresh = {"step": 0, "tokens": 0, "wall_time_s": 0.0, "input_identities": identities}
    found = checkpoints(job)
    if engine.is_main:  # leftovers of a save that was killed half-way
        for path in job.ckpt_dir.glob(".step-*"):
            shutil.rmtree(path, ignore_errors=True)
    while found:
        problem = _checkpoint_problem(found[-1][1], engine)
        if problem is None:
            break
        found.pop()
        if engine.is_main:
            instead = f"resuming from {found[-1][1].name} instead" if found else "starting from step 0"
            console.print(f"[yellow]train {job.name}: {problem}; {instead}[/]", soft_wrap=True)
    if not found:
        return fresh
    step, path = found[-1]
    state = engine.load(path)
    if state.get("trajectory_hash") != trajectory:
        raise BtxError(
            f"{path}: this checkpoint was made with different settings (recipe, data or seed "
            "changed); pass --force to discard the job's checkpoints and start over"
        )
    recorded = state.get("input_identities")
    changed = identity_changes(recorded, identities) if engine.is_main and recorded and identities else []
    changed = [c for part in _gather(changed, engine) for c in part]
    if changed:
        raise BtxError(
            f"{path}: this checkpoint was trained from other inputs ({changed[0]}); pass --force to "
            "discard the job's checkpoints and start over"
        )
    if state.get("world_size") != engine.world_size and engine.is_main:
        console.print(
            f"[yellow]train {job.name}: resuming a {state.get('world_size')}-process run on "
            f"{engine.world_size} processes; batches per step change accordingly[/yellow]"
        )
    if engine.is_main:
        console.print(f"train {job.name}: resuming from {path} (step {step})", soft_wrap=True)
    return {
        "step": int(state["step"]),
        "tokens": int(state["tokens"]),
        "wall_time_s": float(state["wall_time_s"]),
        "input_identities": identities,
    }


def discard_outputs(job: TrainJob) -> None:
    """--force: forget DONE.json first (so nothing half-redone looks finished), then the rest."""
    (Path(job.manifest_dir) / DONE_NAME).unlink(missing_ok=True)
    shutil.rmtree(job.ckpt_dir, ignore_errors=True)
    job.metrics_path.unlink(missing_ok=True)
