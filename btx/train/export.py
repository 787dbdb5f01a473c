"""The export of a finished job: the final weights as an HF checkpoint of the family's class, with
the run's tokenizer files, and DONE.json written last (steps, tokens, losses, FLOPs, hashes).

Every checkpoint also gets `export/` (`write_export_record`): the same tokenizer files and the
config and dtype the export uses, so that `btx export` (btx.train.checkpoint_export) writes any
checkpoint in the form of the final export, through the same `write_export`.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Callable

import torch

from btx.data.tokenizer import load_tokenizer
from btx.errors import BtxError
from btx.io.atomic import atomic_dir, dumps_json
from btx.io.disk import disk_errors, ensure_free_space
from btx.io.layout import TensorSpec, hf_specs
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
from btx.train.engines.base import param_groups
from btx.train.job import TrainJob
from btx.train.metrics import MetricsLog

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
EXPORT_RECORD_DIR = "export"  # in every checkpoint: what `btx export` needs besides the weights
EXPORT_RECORD = "export.json"


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
            specs = hf_specs(cfg, weight, dtype)
            write_export(specs, cfg, export_dir, lambda tmp: save_tokenizer_files(job, tmp, tokenizer))
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


def write_export(
    specs: list[TensorSpec],
    cfg,
    export_dir: Path,
    add_tokenizer: Callable[[Path], object],
    force: bool = True,
) -> None:
    """The HF form of a job's weights in `export_dir`, atomically: the family's config.json and
    the safetensors of `specs` (btx.io.layout: `hf_specs` streams from an engine that gathers on
    demand, `hf_specs_from_btx` from a state dict), and the files `add_tokenizer(directory)`
    writes. The final export and `btx export` of a checkpoint (btx.train.checkpoint_export) both
    write here."""
    size = sum(math.prod(spec.shape) * spec.dtype.itemsize for spec in specs)
    ensure_free_space(export_dir.parent, size, f"the export {export_dir}")
    with (
        disk_errors(export_dir.parent, size, f"the export {export_dir}"),
        atomic_dir(export_dir, force=force) as tmp,
    ):
        write_checkpoint(tmp, cfg, specs, atomic=False)
        add_tokenizer(tmp)


def save_tokenizer_files(job: TrainJob, directory: Path, tokenizer=None) -> None:
    """Every tokenizer file of the checkpoint the job started from (chat template included); a
    seed trained from scratch gets the run's tokenizer (`tokenizer`, loaded when not given)."""
    if job.init_from is None or not has_tokenizer(job.init_from):
        (tokenizer if tokenizer is not None else load_tokenizer(job.tokenizer)).save(directory)
    if job.init_from is not None:
        copy_tokenizer_files(job.init_from, directory)


def write_export_record(job: TrainJob, model, directory: Path) -> None:
    """What `btx export` needs to turn a checkpoint into the job's HF form, written into each
    checkpoint (`directory`: its EXPORT_RECORD_DIR): the tokenizer files the final export gets,
    and EXPORT_RECORD (the model's config, the export dtype, the names of the parameters in each
    optimizer group, in the order the optimizer holds them, for engines that keep fp32 masters
    in those groups)."""
    names = {id(p): name for name, p in model.named_parameters()}
    groups = [[names[id(p)] for p in g["params"]] for g in param_groups(model.parameters(), 0.0)]
    directory.mkdir(parents=True, exist_ok=True)
    save_tokenizer_files(job, directory)
    record = {
        "job": job.name,
        "config": dataclasses.asdict(model.cfg),
        "dtype": str(export_dtype(job)).removeprefix("torch."),
        "optimizer_groups": groups,
    }
    (directory / EXPORT_RECORD).write_text(dumps_json(record, indent=1) + "\n")


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
