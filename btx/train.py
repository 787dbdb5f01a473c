"""`btx train`: the one training loop, for a domain expert, the demo's seed and MoE finetuning.

    job = expert_job(exp, "code")          # or seed_job(exp); btx finetune builds its own TrainJob
    done = run_loop(job)                   # DDP (accelerate) or ZeRO (train.zero_stage); returns DONE.json

The loop (`run_loop`) owns what every engine shares: batches (`TokenSampler`, a pure function of
(seed, step)), the loss `NLL + balance_alpha * balance_loss + z_loss_coef * z_loss`, the router step
of an MoE, per-step metrics (metrics.jsonl), the rich progress line, periodic validation,
checkpoint cadence, resume and the HF export with its DONE.json. The engine owns the device, the
parallelism, backward, the optimizer step and its own checkpoint files (docs/CONTRACTS.md): dense
jobs use btx.engine.AccelerateEngine (DDP; a plain process on CPU), or btx.engine_deepspeed's ZeRO
engine when `train.zero_stage` is set (sharded, for models whose replicas do not fit).
`btx finetune` passes its DeepSpeed engine through `make_engine` and routing statistics through
`on_step`.

Frozen parameters (`job.trainable`, btx.trainable: an expert's `train.trainable: ffn`, the
finetune's `finetune.trainable`) get requires_grad False before the engine exists, so no optimizer
holds them. FLOPs (DONE.json `train_flops`, the MFU) follow btx.flops: a frozen weight costs no
weight gradient, and DONE.json records `trainable` and `flops_counting`.

Where things go (TrainJob):
    work_dir/ckpt/step-N/     resumable state, the engine's format (accelerate: fp32 weights as an
                              HF checkpoint, optimizer.pt, scheduler.pt, trainer_state.json);
                              the newest `keep_checkpoints` are kept
    work_dir/metrics.jsonl    one JSON object per optimizer step (main rank only)
    export_dir/               the final HF checkpoint (the family's dense or MoE class) with
                              the run's tokenizer files
    manifest_dir/DONE.json    written last: steps, tokens, losses, FLOPs, hashes of the export
For an expert: work_dir = manifest_dir = experts/<domain>/, export_dir = experts/<domain>/final/.
For the seed: work_dir = seed-train/, export_dir = manifest_dir = seed/ (the seed is an HF dir).

Determinism and resume
- The data position is the step (see btx.data.TokenSampler). So is the random state: torch, numpy
  and Python's `random` are re-seeded from (seed, step, rank) before every step, which makes a
  resumed run exact on every rank with no RNG files to carry (only MoE sample_top1 routing draws
  random numbers; dense training uses none).
- A checkpoint holds the weights in fp32 and the full optimizer and scheduler state, so on CPU a
  resumed run reproduces the uninterrupted run's losses and final weights bit for bit.
- Re-running a job resumes from the newest complete `ckpt/step-N/` (directories appear atomically,
  so every one that exists is complete) and rewrites metrics.jsonl up to that step. A job whose
  DONE.json exists is not trained again. Checkpoints and DONE.json carry a hash of everything that
  shapes the run's trajectory; a mismatch (the recipe changed) is an error until `--force`.
- SIGTERM (Slurm's stop before the time limit, `btx branch` stopping jobs) ends the current step,
  writes a checkpoint and exits 130 via KeyboardInterrupt; nothing is lost.

Provenance and faults (docs/PROVENANCE.md)
- One process per job: the main rank holds the job's lock (`.<work_dir>.lock`) from before the
  "done / --force" decision to the end; a second process on the same job stops with one line
  naming the holder's pid and host.
- DONE.json and every checkpoint record the content identity of the job's inputs (the init
  checkpoint, checked against its producer's DONE.json, and the train shards). A finished job
  whose inputs changed since is refused until --force; so is resuming a checkpoint made from
  other inputs. A finished job whose own export was damaged is exported again from its final
  checkpoint.
- Each checkpoint lists the sha256 of its files (`btx_checkpoint.json`, written last); resume
  takes the newest checkpoint whose files match it, and never one whose files btx did not record.
- A loss that is not finite stops training with one line: nothing of that step is saved, the
  last good checkpoint stays, no DONE.json is written.

Test hook: BTX_TRAIN_KILL_AT_STEP=N makes the main process SIGKILL itself right after step N's
metrics line is written (N:TERM sends SIGTERM instead); tests/test_train.py checks that resuming
then reproduces the uninterrupted run exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import re
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from btx import hf
from btx.engine import build_model  # the starting model; engine_deepspeed shares it
from btx.errors import BtxError
from btx.flops import describe as flops_counting
from btx.flops import train_flops_per_token
from btx.manifest import (DONE_NAME, atomic_dir, cached_sha256, changed_inputs, damaged_outputs, disk_errors,
                          dumps_json, ensure_free_space, fsync_dir, hash_dir, identity, identity_changes,
                          input_identity, output_lock,
                          read_done, relative_identities, sha256_file, write_done, write_json_atomic)
from btx.model import ModelConfig, ModelOutput, Transformer
from btx.trainable import set_trainable

CKPT_DIR = "ckpt"
CKPT_MANIFEST = "btx_checkpoint.json"  # sha256 of every file of a checkpoint, written last
CKPT_BYTES_PER_PARAM = 16  # fp32 weights and master copy plus two AdamW moments: a checkpoint's size
METRICS_FILE = "metrics.jsonl"
KILL_HOOK_ENV = "BTX_TRAIN_KILL_AT_STEP"
PEAK_ENV = "BTX_PEAK_TFLOPS"
_STEP_DIR = re.compile(r"^step-(\d+)$")
# Settings that change what a run computes. The others (logging, eval and checkpoint cadence) may
# change between a run and its resumption.
_TRAJECTORY_SETTINGS = (
    "lr", "weight_decay", "warmup_steps", "min_lr_ratio", "betas", "eps", "steps", "batch_size",
    "seq_len", "grad_accum", "grad_clip", "precision", "seed", "zero_stage",
)  # fmt: skip


# --------------------------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------------------------


@dataclass
class TrainJob:
    """Everything one training run needs; plain data, built by `seed_job`, `expert_job` or finetune.

    `settings` is a btx.recipe.TrainSection (lr, steps, batch_size per rank, seq_len, grad_accum,
    grad_clip, precision, checkpoint_every, keep_checkpoints, eval_every, eval_batches, log_every, seed).
    """

    name: str  # "seed", a domain, "finetune": names the job in logs and DONE.json
    settings: Any
    train_shards: dict[str, Path]  # domain -> train shard (.bin or .json)
    val_shards: dict[str, Path]  # domain -> held-out shard
    work_dir: Path  # ckpt/ and metrics.jsonl
    export_dir: Path  # the final HF checkpoint
    manifest_dir: Path  # where DONE.json goes
    mixture: dict[str, float] | None = None  # sampling weights of train_shards; None: by token count
    init_from: Path | None = None  # an HF checkpoint to start from; None: from scratch (model_config)
    model_config: ModelConfig | None = None
    config_overrides: dict = field(default_factory=dict)  # ModelConfig fields to change (router_mode, ...)
    tokenizer: str = "byte"  # the run's tokenizer ("byte" or a path); saved with the export
    balance_alpha: float = 0.0  # load-balancing loss weight (MoE)
    z_loss_coef: float = 0.0  # router z-loss weight (MoE)
    export_dtype: str | None = None  # float32 | bfloat16 | float16; None: the init checkpoint's (fp32 from scratch)
    recipe_hash: str = ""  # of the recipe sections this job depends on (for DONE.json)
    inputs: dict = field(default_factory=dict)  # provenance for DONE.json (seed manifest, ...)
    # Engine-side settings that change what a run computes or how its checkpoints are laid out
    # (finetune: trainable, zero_stage, offload_optimizer); part of the trajectory hash.
    engine_settings: dict = field(default_factory=dict)
    trainable: str = "all"  # which parameters train (btx.trainable.MODES); the others are frozen
    # The batches, when not the TokenSampler of (train_shards, mixture, settings.seed): phases of
    # btx.data.DataStream (data-matched baselines replay BTX's batches; a finetune after its
    # router-only phase takes the batches after that phase's).
    data_plan: list | None = None
    # A job that runs first, whose export this one starts from (init_from) and whose FLOPs count
    # in this one's train_flops: the finetune's router-only phase (btx.finetune runs it).
    before: "TrainJob | None" = None
    prior_flops: dict = field(default_factory=dict)  # {earlier phase's name: its train_flops}

    @property
    def ckpt_dir(self) -> Path:
        return Path(self.work_dir) / CKPT_DIR

    @property
    def metrics_path(self) -> Path:
        return Path(self.work_dir) / METRICS_FILE


StepHook = Callable[[int, ModelOutput, torch.Tensor], "dict | None"]


# --------------------------------------------------------------------------------------------
# Jobs from an experiment recipe
# --------------------------------------------------------------------------------------------


def seed_job(exp) -> TrainJob:
    """The demo's seed: trained from scratch (recipe `model:`) on the domain mixture into <run_dir>/seed/."""
    if exp.seed.path is not None:
        raise BtxError(f"{exp.path}: seed.path is set ({exp.seed.path}): the seed exists already; "
                       "`btx train --seed` trains one from scratch from a `model:` section")
    names = list(exp.domains)
    # Default: the domains merged (those grow.domains adds later are not the seed's data).
    mixture = dict(exp.seed.mixture) or {name: 1.0 for name in exp.merged_domains}
    names = [n for n in names if mixture.get(n, 0) > 0]
    return TrainJob(
        name="seed",
        settings=exp.seed_train,
        train_shards={n: _shard_path(exp, n, "train") for n in names},
        val_shards={n: _shard_path(exp, n, "val") for n in names},
        mixture={n: float(mixture[n]) for n in names},
        work_dir=exp.run_dir / "seed-train",
        export_dir=exp.run_dir / "seed",
        manifest_dir=exp.run_dir / "seed",
        model_config=exp.model.to_model_config(),
        tokenizer=str(exp.recipe.tokenizer),
        recipe_hash=_recipe_hash({"model": exp.model, "train": exp.seed_train, "mixture": mixture,
                                  "tokenizer": exp.recipe.tokenizer,
                                  "data": {n: exp.domains[n].data for n in names}}),
    )


def expert_job(exp, domain: str) -> TrainJob:
    """Domain expert `domain`: the seed continued on that domain into <run_dir>/experts/<domain>/."""
    if domain not in exp.domains:
        import difflib

        close = difflib.get_close_matches(domain, list(exp.domains), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise BtxError(f"{exp.path}: unknown domain {domain!r}{hint}; the recipe's domains are "
                       f"{', '.join(exp.domains)}")
    seed = exp.seed_dir
    seed_manifest = None
    if exp.seed.path is None:
        seed_manifest = read_done(seed)
        if seed_manifest is None:
            raise BtxError(f"{seed}: the seed is not trained yet (no {DONE_NAME}); run "
                           f"`btx train {exp.path} --seed` first, or set seed.path to a checkpoint")
    elif not (seed / "config.json").is_file():
        raise BtxError(f"{exp.path}: seed.path: {seed} has no config.json (expected a Hugging Face "
                       "dense checkpoint directory)")
    settings = exp.domains[domain].train
    expert_dir = exp.expert_dir(domain)
    seed_identity = seed_manifest.get("outputs") if seed_manifest else str(seed)
    return TrainJob(
        name=domain,
        settings=settings,
        train_shards={domain: _shard_path(exp, domain, "train")},
        val_shards={domain: _shard_path(exp, domain, "val")},
        work_dir=expert_dir,
        export_dir=expert_dir / "final",
        manifest_dir=expert_dir,
        init_from=seed,
        tokenizer=str(exp.recipe.tokenizer),
        recipe_hash=_recipe_hash({"seed": seed_identity, "train": settings, "data": exp.domains[domain].data,
                                  "tokenizer": exp.recipe.tokenizer}),
        inputs={"seed": str(seed)},
        trainable=settings.trainable,
    )


def _shard_path(exp, domain: str, split: str) -> Path:
    path = exp.data_dir(domain) / f"{split}.json"
    if not path.is_file():
        raise BtxError(f"{path}: {split} shard of domain '{domain}' not found; run `btx prepare {exp.path}` first")
    return path


def _recipe_hash(sections: dict) -> str:
    from btx.recipe import recipe_hash

    return recipe_hash(sections)


# --------------------------------------------------------------------------------------------
# The loss
# --------------------------------------------------------------------------------------------


def loss_terms(output: ModelOutput, targets: torch.Tensor, balance_alpha: float, z_loss_coef: float):
    """(total, nll, balance, z): total = NLL + alpha * balance + z_coef * z; NLL in fp32, mean per token."""
    logits = output.logits
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))
    total = nll
    if balance_alpha:
        total = total + balance_alpha * output.balance_loss
    if z_loss_coef:
        total = total + z_loss_coef * output.z_loss
    return total, nll, output.balance_loss, output.z_loss


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


def run_loop(
    job: TrainJob,
    make_engine: Callable[[Transformer, TrainJob], Any] | None = None,
    *,
    make_model: Callable[[TrainJob], Transformer] | None = None,
    setup_model: Callable[[Transformer], None] | None = None,
    on_step: StepHook | None = None,
    force: bool = False,
    console=None,
) -> dict:
    """Train `job` to its last step (resuming from its newest checkpoint), export, write DONE.json.

    make_engine(model, job) -> engine (default: `dense_engine`, by job.settings.zero_stage).
    make_model(job) -> the starting model (default: `build_model`); DeepSpeed ZeRO-3 builds one whose
    parameters are sharded over the ranks as they are created.
    setup_model(model) runs before the engine wraps the model (e.g. freeze parameters).
    on_step(step, output, inputs) runs on every rank after each optimizer step with the last
    micro-batch's ModelOutput and inputs; the dict it returns is merged into the step's metrics.
    force: discard this job's checkpoints, metrics and export and train from the start.
    Returns the DONE.json dict (also when the job was already done).
    """
    from rich.console import Console

    console = console or Console(stderr=True)
    main = int(os.environ.get("RANK", "0")) == 0
    # The main rank holds the job's lock from the done / --force decision to the end.
    lock = output_lock(job.work_dir, f"training job '{job.name}'") if main else contextlib.nullcontext()
    with lock:
        return _run_locked(job, make_engine, make_model, setup_model, on_step, force, console, main)


def _run_locked(job, make_engine, make_model, setup_model, on_step, force, console, main) -> dict:
    trajectory = trajectory_hash(job)
    done = read_done(job.manifest_dir)
    if done is not None and not force and main and int(os.environ.get("WORLD_SIZE", "1")) == 1 \
            and discard_damaged_export(job, console):
        done = None  # exported again below, from the final checkpoint
    if done is not None and not force:
        if done.get("trajectory_hash") != trajectory:
            raise BtxError(f"{Path(job.manifest_dir) / DONE_NAME}: this job finished with different settings "
                           "(recipe, data or seed changed); pass --force to train it again")
        if main:
            recorded = done.get("input_identities")
            stale = _damaged_export(job)
            if recorded is None:  # made by a btx from before provenance: nothing to compare
                console.print(f"[yellow]train {job.name}: {job.manifest_dir / DONE_NAME} records no input identities "
                              "(an older btx), so its inputs cannot be checked[/]", soft_wrap=True)
            else:
                stale = stale or changed_inputs(recorded, job.manifest_dir) or \
                    identity_changes(recorded, current_input_identities(job))
            if stale:
                raise BtxError(f"{Path(job.manifest_dir) / DONE_NAME}: job '{job.name}' finished, but {stale[0]}; "
                               "pass --force to train it again from its inputs as they are now")
            console.print(f"train {job.name}: already done ({job.manifest_dir / DONE_NAME})", soft_wrap=True)
        return done

    # Everything is checked before anything is written or any process group is started.
    tokenizer, train_shards, val_shards = _open_inputs(job)
    identities = job_input_identities(job, train_shards, val_shards) if main else None
    model = (make_model or build_model)(job)
    _check_model_fits(job, model.cfg, tokenizer)
    _export_dtype(job)  # a bad export dtype is an error now, not after training
    set_trainable(model, job.trainable)
    if setup_model is not None:
        setup_model(model)

    engine = (make_engine or dense_engine)(model, job)
    del model  # the engine owns it now (closing the engine must be able to free it)
    stop = _StopRequest()
    try:
        if force and engine.is_main:
            _discard_outputs(job)
        _barrier(engine)
        return _train(job, engine, tokenizer, train_shards, val_shards, trajectory, on_step, stop, console,
                      identities)
    finally:
        stop.restore()
        engine.close()


def dense_engine(model: Transformer, job: TrainJob):
    """The engine a dense job's settings ask for: DDP on accelerate (train.zero_stage null), or the
    DeepSpeed engine at ZeRO stage train.zero_stage (3 shards the model, like FSDP)."""
    stage = getattr(job.settings, "zero_stage", None)
    if stage is None:
        from btx.engine import AccelerateEngine

        return AccelerateEngine(model, job)
    from btx.engine_deepspeed import DeepSpeedEngine

    return DeepSpeedEngine(model, job.settings, zero_stage=stage)


def job_input_identities(job: TrainJob, train_shards: dict, val_shards: dict) -> dict:
    """The content identity of what decides a job's result: its init checkpoint (which must still
    be what its producer's DONE.json says, when btx made it) and its train shards (whose .bin must
    match its sidecar's sha256; the val shards are checked the same way)."""
    identities = {}
    if job.init_from is not None:
        identities["init_from"] = input_identity(job.init_from)
    for name, shard in train_shards.items():
        shard.verify()
        identities[f"train:{name}"] = identity(shard.path)
    for shard in val_shards.values():
        shard.verify()
    return identities


def current_input_identities(job: TrainJob) -> dict:
    """The identities of the inputs the job would use now (`job_input_identities`)."""
    from btx.data import load_shard

    return job_input_identities(job, {name: load_shard(path) for name, path in job.train_shards.items()}, {})


def _damaged_export(job: TrainJob) -> list[str]:
    manifest_dir = Path(job.manifest_dir)
    try:
        prefix = Path(job.export_dir).resolve().relative_to(manifest_dir.resolve()).as_posix()
    except ValueError:
        return []
    return damaged_outputs(manifest_dir, "" if prefix == "." else f"{prefix}/")


def discard_damaged_export(job: TrainJob, console=None) -> bool:
    """When the finished job's export no longer matches its DONE.json, forget both (DONE.json
    first), so that the next run exports again from the job's final checkpoint; True if it did.
    The checkpoints stay, so nothing is trained again unless none of them is sound."""
    problems = _damaged_export(job)
    if not problems:
        return False
    found = checkpoints(job)
    source = f"from {found[-1][1]}" if found else "by training again (no checkpoint left)"
    if console is not None:
        console.print(f"[yellow]train {job.name}: {problems[0]}; exporting it again {source}[/]", soft_wrap=True)
    (Path(job.manifest_dir) / DONE_NAME).unlink(missing_ok=True)
    shutil.rmtree(job.export_dir, ignore_errors=True)
    return True


def job_sampler(job: TrainJob, train_shards: dict, global_batch: int):
    """The job's batches: its data plan, or the TokenSampler of its mixture and seed."""
    from btx.data import PlannedSampler, TokenSampler

    s = job.settings
    if job.data_plan is not None:
        return PlannedSampler(train_shards, job.data_plan, seq_len=s.seq_len, batch_size=global_batch)
    return TokenSampler(train_shards, job.mixture, seq_len=s.seq_len, batch_size=global_batch, seed=s.seed)


def _train(job, engine, tokenizer, train_shards, val_shards, trajectory, on_step, stop, console,
           identities: dict | None = None) -> dict:
    s = job.settings
    cfg = engine.unwrapped.cfg
    rank, world = engine.rank, engine.world_size
    sampler = job_sampler(job, train_shards, s.batch_size * world)
    tokens_per_step = s.batch_size * s.seq_len * s.grad_accum * world
    flops_per_token = train_flops_per_token(cfg, s.seq_len, job.trainable)

    state = _resume(job, engine, trajectory, console, identities)
    metrics = _MetricsLog(job.metrics_path, enabled=engine.is_main)
    metrics.keep_until(state["step"])
    peak = peak_flops(engine.device, getattr(engine, "precision", s.precision))
    peak = peak * world if peak else None
    # A CPU has no datasheet peak: its MFU is against the matmul rate peak_flops measured, so say so.
    mfu_note = " (of matmul peak)" if engine.device.type == "cpu" and not os.environ.get(PEAK_ENV) else ""
    progress = _Progress(job.name, s.steps, state["step"], s.log_every, console, enabled=engine.is_main,
                         mfu_note=mfu_note)
    session_start, wall_before = time.perf_counter(), state["wall_time_s"]  # earlier sessions' time
    kill_at, kill_signal = _kill_hook()

    with progress:
        for step in range(state["step"] + 1, s.steps + 1):
            started = time.perf_counter()
            seed_everything(s.seed, step, rank)
            if cfg.is_moe:
                engine.unwrapped.set_router_step(step - 1)
            lr = engine.lr
            # Loss terms summed on the device (no host sync per micro-batch), then one all-reduce
            # that also tells every rank whether any of them was asked to stop.
            sums = torch.zeros(5, dtype=torch.float64, device=engine.device)  # total, nll, balance, z, stop
            for micro in range(s.grad_accum):
                inputs, targets = sampler.batch((step - 1) * s.grad_accum + micro, rank, world)
                inputs = inputs.to(engine.device, non_blocking=True)
                targets = targets.to(engine.device, non_blocking=True)
                output = engine.model(inputs)
                terms = loss_terms(output, targets, job.balance_alpha, job.z_loss_coef)
                engine.backward(terms[0])
                sums[:4] += torch.stack([t.detach().double() for t in terms])
            grad_norm = engine.step()
            sums[4] = float(stop.requested)
            *means, stop_votes = _all_reduce_sum(sums, engine).tolist()
            total, nll, balance, z = (value / (s.grad_accum * world) for value in means)
            if not (math.isfinite(total) and math.isfinite(nll)):  # the same all-reduced sums on every rank
                _non_finite_loss(job, step, "loss", total, lr, good_upto=step - 2)
            stop_now = stop_votes > 0
            elapsed = time.perf_counter() - started
            state["step"], state["tokens"] = step, state["tokens"] + tokens_per_step

            record = {"step": step, "loss": total, "lr": lr, "grad_norm": grad_norm, "tokens": state["tokens"],
                      "tokens_per_s": tokens_per_step / elapsed, "step_time_s": elapsed}
            if cfg.is_moe:
                record.update(nll=nll, balance_loss=balance, z_loss=z)
            record["mfu"] = flops_per_token * tokens_per_step / elapsed / peak if peak else None
            record["elapsed_s"] = wall_before + (time.perf_counter() - session_start)
            if on_step is not None:
                record.update(on_step(step, output, inputs) or {})
            del output, terms, inputs, targets
            if (s.eval_every and step % s.eval_every == 0) or step == s.steps:
                record.update(_val_record(validate(engine, val_shards, s.seq_len, s.batch_size, s.eval_batches)))
                if not math.isfinite(record["val_loss"]):  # this step's update broke the weights
                    _non_finite_loss(job, step, "validation loss", record["val_loss"], lr, good_upto=step - 1)
            metrics.write(record)
            progress.update(step, record)
            if kill_at == step and engine.is_main:  # test hook: die like a preempted node would
                os.kill(os.getpid(), kill_signal)  # SIGTERM: seen by every rank at the next step

            if (s.checkpoint_every and step % s.checkpoint_every == 0) or step == s.steps or stop_now:
                state["wall_time_s"] = record["elapsed_s"]
                save_checkpoint(job, engine, state, trajectory)
            if stop_now:
                if engine.is_main:
                    console.print(f"train {job.name}: stopped at step {step} (checkpoint saved); re-run to continue")
                raise KeyboardInterrupt

    state["wall_time_s"] = wall_before + (time.perf_counter() - session_start)
    return _export(job, engine, tokenizer, state, trajectory, console)


def _non_finite_loss(job: TrainJob, step: int, what: str, value: float, lr: float, good_upto: int) -> None:
    """Stop: nothing of this step is saved. The weights of a checkpoint after step `good_upto` made
    the loss that is not finite (weights after step N give the loss of step N + 1), so the last good
    checkpoint is the newest one up to that step."""
    good = [path for step_n, path in checkpoints(job) if step_n <= good_upto]
    last = f"the last good checkpoint is {good[-1]}" if good else "no good checkpoint was written yet"
    raise BtxError(f"train {job.name}: the {what} is {value} at step {step} (lr {lr:.3g}); training stopped without "
                   f"saving this step or writing {DONE_NAME} ({last}); lower train.lr or check the data, then "
                   "re-run with --force")


def _kill_hook() -> tuple[int, int]:
    """BTX_TRAIN_KILL_AT_STEP=N (SIGKILL after step N) or N:TERM (SIGTERM: the clean stop)."""
    value = os.environ.get(KILL_HOOK_ENV, "")
    step, _, name = value.partition(":")
    return (int(step) if step else 0), getattr(signal, f"SIG{name or 'KILL'}")


def seed_everything(seed: int, step: int, rank: int) -> None:
    """The random state as a pure function of (seed, step, rank), like the data position."""
    mixed = int.from_bytes(hashlib.sha256(f"{seed}:{step}:{rank}".encode()).digest()[:8], "little") >> 1
    torch.manual_seed(mixed)  # all devices
    np.random.seed(mixed % 2**32)
    random.seed(mixed)


def _val_record(losses: dict[str, float]) -> dict:
    record = {"val_loss": sum(losses.values()) / len(losses)}
    if len(losses) > 1:
        record.update({f"val_loss/{domain}": loss for domain, loss in losses.items()})
    return record


@torch.no_grad()
def validate(engine, val_shards: dict, seq_len: int, batch_size: int, max_batches: int) -> dict[str, float]:
    """Mean NLL per domain over the same held-out windows every time (`btx.data.eval_batches`).

    Batches are dealt round-robin over ranks; every rank runs the same number of forwards (padding
    with a repeat of batch 0, weighted 0) so sharded engines (ZeRO-3) stay in lockstep.
    """
    from btx.data import eval_batches

    model = engine.unwrapped
    was_training = model.training
    model.eval()
    rank, world = engine.rank, engine.world_size
    losses = {}
    try:
        for domain, shard in val_shards.items():
            batches = list(eval_batches(shard, seq_len, batch_size, max_batches))
            sums = torch.zeros(2, dtype=torch.float64, device=engine.device)  # summed NLL, tokens
            for first in range(0, len(batches), world):
                index = first + rank
                inputs, targets = batches[index] if index < len(batches) else batches[0]
                logits = model(inputs.to(engine.device)).logits
                nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                      targets.to(engine.device).reshape(-1), reduction="sum")
                if index < len(batches):
                    sums[0] += nll.double()
                    sums[1] += targets.numel()
            total_nll, tokens = _all_reduce_sum(sums, engine).tolist()
            losses[domain] = total_nll / tokens
    finally:
        model.train(was_training)
    return losses


# --------------------------------------------------------------------------------------------
# Model, inputs, checks
# --------------------------------------------------------------------------------------------


def _open_inputs(job: TrainJob):
    """Tokenizer and shards, checked against each other (BtxError naming the file at fault)."""
    from btx.data import check_tokenizer, eval_batches, load_shard
    from btx.tokenizer import load_tokenizer

    if job.init_from is not None:
        hf.CheckpointReader(job.init_from).close()  # config and headers sound (reads no tensor data)
    tokenizer = load_tokenizer(job.tokenizer)
    if job.init_from is not None and hf.has_tokenizer(job.init_from):
        # The export carries the checkpoint's own tokenizer files: the data must be tokenized by it.
        own = load_tokenizer(job.init_from)
        if own.identity() != tokenizer.identity():
            raise BtxError(f"{job.init_from}: its tokenizer differs from the run's tokenizer ({job.tokenizer}); "
                           f"set the recipe's tokenizer to {job.init_from} (the checkpoint's own)")
    if job.mixture is not None:
        unknown = sorted(set(job.mixture) - set(job.train_shards))
        if unknown:
            raise BtxError(f"train {job.name}: mixture names {unknown}, which have no train shard")
    train = {name: load_shard(path) for name, path in job.train_shards.items()}
    val = {name: load_shard(path) for name, path in job.val_shards.items()}
    for shard in [*train.values(), *val.values()]:
        check_tokenizer(shard, tokenizer.identity())
    # Shards long enough for the windows, and sound weights: found now, not at the first validation.
    s = job.settings
    sampler = job_sampler(job, train, s.batch_size)
    if job.data_plan is not None and len(sampler) < s.steps * s.grad_accum:
        raise BtxError(f"train {job.name}: its data plan holds {len(sampler)} micro-batches; {s.steps} steps of "
                       f"{s.grad_accum} need {s.steps * s.grad_accum}")
    for shard in val.values():
        next(eval_batches(shard, s.seq_len, 1, 1))
    return tokenizer, train, val


def _check_model_fits(job: TrainJob, cfg: ModelConfig, tokenizer) -> None:
    where = str(job.init_from) if job.init_from is not None else f"train {job.name}: model"
    if cfg.vocab_size < tokenizer.vocab_size:
        raise BtxError(f"{where}: vocab_size {cfg.vocab_size} is smaller than the tokenizer's "
                       f"{tokenizer.vocab_size}; the data's token ids would not fit")
    if job.settings.seq_len > cfg.max_seq_len:
        raise BtxError(f"train {job.name}: train.seq_len {job.settings.seq_len} exceeds the model's "
                       f"max_seq_len {cfg.max_seq_len}")


def trajectory_hash(job: TrainJob) -> str:
    """sha256 of everything that decides what the run computes (not where it writes or how often it logs)."""
    init = None
    if job.init_from is not None:
        config = Path(job.init_from) / "config.json"
        weights = sorted(Path(job.init_from).glob("*.safetensors*"))
        # Sizes and names, not contents: hashing a 13 GB seed on every start would be slow.
        init = {"config": sha256_file(config) if config.is_file() else None,
                "weights": [(p.name, p.stat().st_size) for p in weights]}
    shards = {}
    for name, path in job.train_shards.items():
        sidecar = Path(path).with_suffix(".json")
        shards[name] = json.loads(sidecar.read_text()).get("sha256") if sidecar.is_file() else None
    what = {
        "settings": {k: getattr(job.settings, k, None) for k in _TRAJECTORY_SETTINGS},
        "init": init,
        "model_config": dataclasses.asdict(job.model_config) if job.model_config is not None else None,
        "config_overrides": job.config_overrides,
        "mixture": job.mixture,
        "train_shards": shards,
        "balance_alpha": job.balance_alpha,
        "z_loss_coef": job.z_loss_coef,
    }
    if job.engine_settings:  # only when set, so jobs without any keep their hash
        what["engine_settings"] = job.engine_settings
    if job.trainable != "all":  # likewise
        what["trainable"] = job.trainable
    if job.data_plan is not None:
        what["data_plan"] = [[dataclasses.asdict(stream) for stream in phase] for phase in job.data_plan]
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()


# --------------------------------------------------------------------------------------------
# Checkpoints and resume
# --------------------------------------------------------------------------------------------


def checkpoints(job: TrainJob) -> list[tuple[int, Path]]:
    """(step, dir) of every complete checkpoint, oldest first. Directories appear atomically."""
    root = job.ckpt_dir
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        m = _STEP_DIR.match(path.name)
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
        _record_checkpoint(final, engine)
    if engine.is_main:
        kept = checkpoints(job)
        for _, old in kept[: max(0, len(kept) - job.settings.keep_checkpoints)]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier(engine)
    return final


def _checkpoint_files(path: Path) -> list[str]:
    return sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file() and p.name != CKPT_MANIFEST)


def _share(items: list, engine) -> list:
    """This rank's share of `items` (every rank hashes a part of a sharded checkpoint)."""
    return items[engine.rank :: engine.world_size]


def _gather(value, engine) -> list:
    if not _distributed(engine):
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
    _barrier(engine)


def _checkpoint_problem(path: Path, engine) -> str | None:
    """Collective: why the checkpoint at `path` may not be resumed from (None: its files are the
    ones its manifest lists, byte for byte)."""
    try:
        recorded = json.loads((path / CKPT_MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        recorded = None
    problem = None
    if not isinstance(recorded, dict):
        problem = (f"{path}: btx has no record of its files ({CKPT_MANIFEST}: a save cut short, or an older "
                   "btx), so it is not resumed from")
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


def _resume(job: TrainJob, engine, trajectory: str, console, identities: dict | None = None) -> dict:
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
        raise BtxError(f"{path}: this checkpoint was made with different settings (recipe, data or seed "
                       "changed); pass --force to discard the job's checkpoints and start over")
    recorded = state.get("input_identities")
    changed = identity_changes(recorded, identities) if engine.is_main and recorded and identities else []
    changed = [c for part in _gather(changed, engine) for c in part]
    if changed:
        raise BtxError(f"{path}: this checkpoint was trained from other inputs ({changed[0]}); pass --force to "
                       "discard the job's checkpoints and start over")
    if state.get("world_size") != engine.world_size and engine.is_main:
        console.print(f"[yellow]train {job.name}: resuming a {state.get('world_size')}-process run on "
                      f"{engine.world_size} processes; batches per step change accordingly[/yellow]")
    if engine.is_main:
        console.print(f"train {job.name}: resuming from {path} (step {step})", soft_wrap=True)
    return {"step": int(state["step"]), "tokens": int(state["tokens"]), "wall_time_s": float(state["wall_time_s"]),
            "input_identities": identities}


def _discard_outputs(job: TrainJob) -> None:
    """--force: forget DONE.json first (so nothing half-redone looks finished), then the rest."""
    (Path(job.manifest_dir) / DONE_NAME).unlink(missing_ok=True)
    shutil.rmtree(job.ckpt_dir, ignore_errors=True)
    job.metrics_path.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _export(job: TrainJob, engine, tokenizer, state: dict, trajectory: str, console) -> dict:
    """final HF checkpoint (atomic), then DONE.json (last)."""
    weights = engine.full_state_dict()  # collective
    if engine.is_main:
        cfg = engine.unwrapped.cfg
        dtype = _export_dtype(job)
        export_dir = Path(job.export_dir)
        size = sum(t.numel() for t in weights.values()) * dtype.itemsize
        ensure_free_space(export_dir.parent, size, f"the export {export_dir}")
        with disk_errors(export_dir.parent, size, f"the export {export_dir}"), atomic_dir(export_dir, force=True) as tmp:
            hf.save_model(weights, cfg, tmp, dtype=dtype, atomic=False)
            # Every tokenizer file of the checkpoint it started from (chat template included);
            # a seed trained from scratch gets the run's tokenizer.
            if job.init_from is None or not hf.has_tokenizer(job.init_from):
                tokenizer.save(tmp)
            if job.init_from is not None:
                hf.copy_tokenizer_files(job.init_from, tmp)
        del weights
        records = _MetricsLog(job.metrics_path, enabled=False).records()
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
            "inputs": {**job.inputs, "init_from": str(job.init_from) if job.init_from else None,
                       "train_shards": {k: str(v) for k, v in job.train_shards.items()},
                       "mixture": job.mixture},
            "input_identities": relative_identities(state.get("input_identities"), job.manifest_dir),
            **({"train_flops_phases": {**job.prior_flops, job.name: own_flops}} if job.prior_flops else {}),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        with disk_errors(job.manifest_dir, None, f"{job.manifest_dir / DONE_NAME}"):
            write_done(job.manifest_dir, manifest)
        console.print(f"train {job.name}: done, {state['step']} steps, {state['tokens']:,} tokens, "
                      f"val loss {manifest['val_loss']:.4f} -> {export_dir}", soft_wrap=True)
    _barrier(engine)
    return read_done(job.manifest_dir)


def _export_dtype(job: TrainJob) -> torch.dtype:
    if job.export_dtype is not None:
        if job.export_dtype not in _DTYPES:
            raise BtxError(f"train {job.name}: export dtype {job.export_dtype!r}; expected {', '.join(_DTYPES)}")
        return _DTYPES[job.export_dtype]
    if job.init_from is not None:
        with hf.CheckpointReader(job.init_from) as reader:
            return reader.dtype
    return torch.float32


def _output_hashes(export_dir: Path, manifest_dir: Path) -> dict[str, str]:
    hashes = hash_dir(export_dir)
    try:
        prefix = export_dir.resolve().relative_to(manifest_dir.resolve())
    except ValueError:
        return hashes
    return {(prefix / name).as_posix(): digest for name, digest in hashes.items()}


# --------------------------------------------------------------------------------------------
# Metrics, progress, throughput
# --------------------------------------------------------------------------------------------


class _MetricsLog:
    """metrics.jsonl: one object per optimizer step. Only the main rank writes."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = Path(path), enabled

    def records(self) -> list[dict]:
        if not self.path.is_file():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line cut short by a kill
            if isinstance(record, dict) and "step" in record:
                out.append(record)
        return out

    def keep_until(self, step: int) -> None:
        """On (re)start: keep the records of steps <= `step`, the ones the checkpoint has seen."""
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = [r for r in self.records() if r["step"] <= step]
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with open(tmp, "w") as f:
            f.writelines(dumps_json(r) + "\n" for r in kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        fsync_dir(self.path.parent)

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(dumps_json(record) + "\n")


class _Progress:
    """A rich progress line (step, loss, tokens/s, ETA) on a terminal; a plain line every
    `log_every` steps otherwise (logs of branch jobs). Main rank only."""

    def __init__(self, name: str, total: int, start: int, log_every: int, console, enabled: bool, mfu_note: str = ""):
        self.name, self.total, self.start, self.log_every = name, total, start, log_every
        self.mfu_note = mfu_note
        self.console, self.enabled = console, enabled
        self.live = enabled and console.is_terminal
        self.t0 = time.perf_counter()
        self.bar = None

    def __enter__(self):
        if self.live:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn(f"[bold]train {self.name}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}  val {task.fields[val]}  {task.fields[tps]} tok/s  "
                           "mfu {task.fields[mfu]}  eta"),
                TimeRemainingColumn(),
                console=self.console,
            )
            self.bar.__enter__()
            self.task = self.bar.add_task("train", total=self.total, completed=self.start, loss="-", val="-",
                                          tps="-", mfu="-")
        return self

    def update(self, step: int, record: dict) -> None:
        if not self.enabled:
            return
        loss = f"{record['loss']:.4f}"
        tps = f"{record['tokens_per_s']:,.0f}"
        mfu = f"{record['mfu']:.1%}{self.mfu_note}" if record.get("mfu") is not None else "-"
        if self.bar is not None:
            fields = {"val": f"{record['val_loss']:.4f}"} if "val_loss" in record else {}
            self.bar.update(self.task, completed=step, loss=loss, tps=tps, mfu=mfu, **fields)
        elif step % self.log_every == 0 or step == self.total:
            rate = (time.perf_counter() - self.t0) / max(1, step - self.start)
            eta = _duration(rate * (self.total - step))
            val = f" val {record['val_loss']:.4f}" if "val_loss" in record else ""
            self.console.print(f"train {self.name} step {step}/{self.total} loss {loss}{val} "
                               f"{tps} tok/s mfu {mfu} eta {eta}", highlight=False, soft_wrap=True)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


# Dense peak TFLOP/s per device for bf16/fp16 autocast and for plain fp32 (no TF32), by name.
# Matched in order against torch.cuda.get_device_name(); override with BTX_PEAK_TFLOPS.
GPU_PEAK_TFLOPS = (
    ("H100 PCIe", 756.0, 51.0),
    ("H100", 989.0, 67.0),
    ("H200", 989.0, 67.0),
    ("GH200", 989.0, 67.0),
    ("A100", 312.0, 19.5),
    ("L40S", 362.0, 91.6),
)
_cpu_peak: float | None = None


def peak_flops(device: torch.device, precision: str) -> float | None:
    """Peak FLOP/s of one device, for MFU; None when unknown (MFU is then not reported).

    GPUs: the dense tensor-core peak from GPU_PEAK_TFLOPS. CPU: measured once per process as the
    best rate of a 1024x1024 fp32 matmul with torch's current threads (~0.3 s; a 512 matmul reads
    low enough that training's larger matmuls showed over 100%), so CPU MFU reads
    "share of what a plain matmul attains here". BTX_PEAK_TFLOPS (per device) overrides both.
    """
    global _cpu_peak
    if os.environ.get(PEAK_ENV):
        return float(os.environ[PEAK_ENV]) * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        half = precision in ("bf16", "fp16", "auto")
        for key, low_precision, fp32 in GPU_PEAK_TFLOPS:
            if key in name:
                return (low_precision if half else fp32) * 1e12
        return None
    if device.type == "cpu":
        if _cpu_peak is None:
            n = 1024
            a = torch.randn(n, n)
            best = math.inf
            for _ in range(8):  # the first one warms up
                t0 = time.perf_counter()
                a @ a
                best = min(best, time.perf_counter() - t0)
            _cpu_peak = 2 * n**3 / best
        return _cpu_peak
    return None


# --------------------------------------------------------------------------------------------
# Collectives (through torch.distributed, whichever engine set it up) and signals
# --------------------------------------------------------------------------------------------


def _distributed(engine) -> bool:
    return engine.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()


def _all_reduce_sum(values: torch.Tensor, engine) -> torch.Tensor:
    """Sum over ranks. `values` lives on engine.device (NCCL reduces device tensors, gloo CPU ones)."""
    if _distributed(engine):
        torch.distributed.all_reduce(values)
    return values


def _barrier(engine) -> None:
    if _distributed(engine):
        torch.distributed.barrier()


class _StopRequest:
    """SIGTERM asks for a clean stop: finish the step, checkpoint, exit. Main thread only."""

    def __init__(self):
        self.requested = False
        self._previous = None
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            pass

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------


def train_command(args) -> int:
    """`btx train RECIPE (--domain NAME | --seed) [KEY=VALUE ...] [--force]` (arguments: btx.cli).

    Re-running resumes from the newest checkpoint and does nothing once DONE.json exists. Several
    processes: `torchrun --nproc_per_node N -m btx train ...` (DDP; gloo on CPU)."""
    from btx.recipe import load_experiment

    exp = load_experiment(args.recipe, args.overrides)
    job = seed_job(exp) if args.seed else expert_job(exp, args.domain)
    run_loop(job, force=args.force)
    return 0
