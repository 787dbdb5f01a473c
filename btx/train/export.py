"""The export of a finished job: the final weights as an HF checkpoint of the family's class, with
the run's tokenizer files, and DONE.json written last (steps, tokens, losses, FLOPs, hashes).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from btx.errors import BtxError
from btx.io.atomic import atomic_dir
from btx.io.disk import disk_errors, ensure_free_space
from btx.io.layout import btx_shapes, hf_specs
from btx.io.manifest import (
    DONE_NAME,
    hash_dir,
    read_done,
    relative_identities,
    write_done,
)
from btx.io.reader import CheckpointReader
from btx.io.writer import copy_tokenizer_files, has_tokenizer, write_checkpoint
from btx.model.flops import describe as flops_counting
from btx.model.flops import train_flops_per_token
from btx.train.distributed import barrier
from btx.train.job import TrainJob
from btx.train.metrics import MetricsLog

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def export_job(job: TrainJob, engine, tokenizer, state: dict, trajectory: str, console) -> dict:
    """final HF checkpoint (atomic), then DONE.json (last).

    The weights stream to disk: the writer asks the engine for each parameter as it writes the
    tensors made of it (a sharded engine gathers one layer at a time), so no rank holds a whole
    copy of the model."""
    cfg = engine.unwrapped.cfg
    dtype = export_dtype(job)
    export_dir = Path(job.export_dir)
    with engine.exported_weights() as weight:  # collective: the other ranks serve the gathers
        if engine.is_main:
            size = sum(math.prod(shape) for shape in btx_shapes(cfg).values()) * dtype.itemsize
            ensure_free_space(export_dir.parent, size, f"the export {export_dir}")
            with (
                disk_errors(export_dir.parent, size, f"the export {export_dir}"),
                atomic_dir(export_dir, force=True) as tmp,
            ):
                write_checkpoint(tmp, cfg, hf_specs(cfg, weight, dtype), atomic=False)
                # Every tokenizer file of the checkpoint it started from (chat template included);
                # a seed trained from scratch gets the run's tokenizer.
                if job.init_from is None or not has_tokenizer(job.init_from):
                    tokenizer.save(tmp)
                if job.init_from is not None:
                    copy_tokenizer_files(job.init_from, tmp)
    if engine.is_main:
        records = MetricsLog(job.metrics_path, enabled=False).records()
        last = records[-1] if records else {}
        tail = [r["loss"] for r in records[-10:]]
        val = {k.split("/", 1)[1]: v for k, v in last.items() if k.startswith("val_loss/")}
        if not val and "val_loss" in last:
            val = {next(iter(job.val_shards)): last["val_loss"]}
        s = job.settings
        own_flops = train_flops_per_token(cfg, s.seq_len, job.trainable) * state["tokens"]
        manifest = {
            "stage": "train",
            "job": job.name,
            "steps": state["step"],
            "tokens": state["tokens"],
            "train_loss": last.get("loss"),  # the last step's
            "train_loss_last10": sum(tail) / len(tail) if tail else None,  # mean of the last <= 10 steps
            "val_loss": last.get("val_loss"),
            "val_losses": val,
            "wall_time_s": state["wall_time_s"],
            "train_flops": own_flops + sum(job.prior_flops.values()),
            "flops_counting": flops_counting(job.trainable),
            "trainable": job.trainable,
            "params": cfg.param_counts(),
            "world_size": engine.world_size,
            "recipe_hash": job.recipe_hash,
            "trajectory_hash": trajectory,
            "export": str(export_dir),
            "outputs": _output_hashes(export_dir, Path(job.manifest_dir)),
            "inputs": {
                **job.inputs,
                "init_from": str(job.init_from) if job.init_from else None,
                "train_shards": {k: str(v) for k, v in job.train_shards.items()},
                "mixture": job.mixture,
            },
            "input_identities": relative_identities(state.get("input_identities"), job.manifest_dir),
            **({"train_flops_phases": {**job.prior_flops, job.name: own_flops}} if job.prior_flops else {}),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        with disk_errors(job.manifest_dir, None, f"{job.manifest_dir / DONE_NAME}"):
            write_done(job.manifest_dir, manifest)
        console.print(
            f"train {job.name}: done, {state['step']} steps, {state['tokens']:,} tokens, "
            f"val loss {manifest['val_loss']:.4f} -> {export_dir}",
            soft_wrap=True,
        )
    barrier(engine)
    return read_done(job.manifest_dir)


def export_dtype(job: TrainJob) -> torch.dtype:
    if job.export_dtype is not None:
        if job.export_dtype not in _DTYPES:
            raise BtxError(f"train {job.name}: export dtype {job.export_dtype!r}; expected {', '.join(_DTYPES)}")
        return _DTYPES[job.export_dtype]
    if job.init_from is not None:
        with CheckpointReader(job.init_from) as reader:
            return reader.dtype
    return torch.float32


def _output_hashes(export_dir: Path, manifest_dir: Path) -> dict[str, str]:
    hashes = hash_dir(export_dir)
    try:
        prefix = export_dir.resolve().relative_to(manifest_dir.resolve())
    except ValueError:
        return hashes
    return {(prefix / name).as_posix(): digest for name, digest in hashes.items()}
