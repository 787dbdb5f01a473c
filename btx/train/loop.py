"""`btx train`: the one training loop, for a domain expert, the demo's seed and MoE finetuning.

    job = expert_job(exp, "code")          # or seed_job(exp); btx finetune builds its own TrainJob
    done = run_loop(job)                   # DDP (accelerate) or ZeRO (train.zero_stage); returns DONE.json

The loop (`run_loop`) owns what every engine shares: batches (`TokenSampler`, a pure function of
(seed, step)), the loss `NLL + balance_alpha * balance_loss + z_loss_coef * z_loss`, the router step
of an MoE, per-step metrics (metrics.jsonl), the rich progress line, periodic validation,
checkpoint cadence, resume and the HF export with its DONE.json. The engine owns the device, the
parallelism, backward, the optimizer step and its own checkpoint files (docs/CONTRACTS.md): dense
jobs use btx.train.engines.accelerate.AccelerateEngine (DDP; a plain process on CPU), or
btx.train.engines.deepspeed's ZeRO engine when `train.zero_stage` is set (sharded, for models whose
replicas do not fit).
`btx finetune` passes its DeepSpeed engine through `make_engine` and routing statistics through
`on_step`.

Frozen parameters (`job.trainable`, btx.model.trainable: an expert's `train.trainable: ffn`, the
finetune's `finetune.trainable`) get requires_grad False before the engine exists, so no optimizer
holds them. FLOPs (DONE.json `train_flops`, the MFU) follow btx.model.flops: a frozen weight costs no
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
- The data position is the step (see btx.data.sampling.TokenSampler). So is the random state: torch, numpy
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
import hashlib
import math
import os
import random
import shutil
import signal
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console

from btx.data.sampling import document_ids, eval_batches
from btx.data.shards import load_shard
from btx.errors import BtxError
from btx.io.locks import output_lock
from btx.io.manifest import (
    DONE_NAME,
    changed_inputs,
    damaged_outputs,
    identity,
    identity_changes,
    input_identity,
    read_done,
)
from btx.model.config import ModelOutput
from btx.model.flops import train_flops_per_token
from btx.model.trainable import set_trainable
from btx.model.transformer import Transformer
from btx.recipe.load import load_experiment
from btx.train.blocks import apply_block_settings, cross_entropy_for, token_cross_entropy
from btx.train.checkpoint import (
    checkpoints,
    discard_outputs,
    resume_job,
    save_checkpoint,
)
from btx.train.distributed import StopRequest, all_reduce_sum, barrier
from btx.train.engines.accelerate import AccelerateEngine
from btx.train.engines.base import build_model
from btx.train.engines.deepspeed import DeepSpeedEngine, build_sharded_model, release_idle_world
from btx.train.export import export_dtype, export_job
from btx.train.job import (
    KILL_HOOK_ENV,
    StepHook,
    TrainJob,
    check_model_fits,
    expert_job,
    job_sampler,
    open_inputs,
    seed_job,
    trajectory_hash,
)
from btx.train.loggers import check_loggers, open_loggers
from btx.train.metrics import PEAK_ENV, MetricsLog, _Progress, peak_flops


def loss_terms(
    output: ModelOutput,
    targets: torch.Tensor,
    balance_alpha: float,
    z_loss_coef: float,
    cross_entropy: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = token_cross_entropy,
):
    """(total, nll, balance, z): total = NLL + alpha * balance + z_coef * z; NLL in fp32, mean per
    token, by `cross_entropy` (btx.train.blocks.cross_entropy_for: compiled with train.compile)."""
    nll = cross_entropy(output.logits, targets)
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
    make_model(job) -> the starting model (default: `dense_model`, by job.settings.zero_stage); at
    ZeRO-3 it is `build_sharded_model`, whose parameters are sharded over the ranks as they are created.
    setup_model(model) runs before the engine wraps the model (e.g. freeze parameters).
    on_step(step, output, inputs) runs on every rank after each optimizer step with the last
    micro-batch's ModelOutput and inputs; the dict it returns is merged into the step's metrics.
    force: discard this job's checkpoints, metrics and export and train from the start.
    Returns the DONE.json dict (also when the job was already done).
    """

    console = console or Console(stderr=True)
    main = int(os.environ.get("RANK", "0")) == 0
    # The main rank holds the job's lock from the done / --force decision to the end.
    lock = output_lock(job.work_dir, f"training job '{job.name}'") if main else contextlib.nullcontext()
    with lock:
        return _run_locked(job, make_engine, make_model, setup_model, on_step, force, console, main)


def _run_locked(job, make_engine, make_model, setup_model, on_step, force, console, main) -> dict:
    trajectory = trajectory_hash(job)
    done = read_done(job.manifest_dir)
    if (
        done is not None
        and not force
        and main
        and int(os.environ.get("WORLD_SIZE", "1")) == 1
        and discard_damaged_export(job, console)
    ):
        done = None  # exported again below, from the final checkpoint
    if done is not None and not force:
        if done.get("trajectory_hash") != trajectory:
            raise BtxError(
                f"{Path(job.manifest_dir) / DONE_NAME}: this job finished with different settings "
                "(recipe, data or seed changed); pass --force to train it again"
            )
        if main:
            recorded = done.get("input_identities")
            stale = _damaged_export(job)
            if recorded is None:  # made by a btx from before provenance: nothing to compare
                console.print(
                    f"[yellow]train {job.name}: {job.manifest_dir / DONE_NAME} records no input identities "
                    "(an older btx), so its inputs cannot be checked[/]",
                    soft_wrap=True,
                )
            else:
                stale = (
                    stale
                    or changed_inputs(recorded, job.manifest_dir)
                    or identity_changes(recorded, current_input_identities(job))
                )
            if stale:
                raise BtxError(
                    f"{Path(job.manifest_dir) / DONE_NAME}: job '{job.name}' finished, but {stale[0]}; "
                    "pass --force to train it again from its inputs as they are now"
                )
            console.print(f"train {job.name}: already done ({job.manifest_dir / DONE_NAME})", soft_wrap=True)
        return done

    # Everything is checked before anything is written or any process group is started.
    tokenizer, train_shards, val_shards = open_inputs(job)
    identities = job_input_identities(job, train_shards, val_shards) if main else None
    export_dtype(job)  # a bad export dtype is an error now, not after training
    check_loggers(getattr(job.settings, "loggers", None) or [])  # a missing tracker package, likewise
    model = (make_model or dense_model)(job)  # a ZeRO-3 job's sharded build starts the process group
    try:
        check_model_fits(job, model.cfg, tokenizer)
        set_trainable(model, job.trainable)
        if setup_model is not None:
            setup_model(model)
        zero_stage = job.engine_settings.get("zero_stage", getattr(job.settings, "zero_stage", None))
        apply_block_settings(model, job.settings, zero_stage)  # activation checkpointing, torch.compile (per block)
        engine = (make_engine or dense_engine)(model, job)
    except BaseException:
        release_idle_world()  # nothing of a job that never started may outlive it (its port, its group)
        raise
    del model  # the engine owns it now (closing the engine must be able to free it)
    stop = StopRequest()
    try:
        if force and engine.is_main:
            discard_outputs(job)
        barrier(engine)
        return _train(job, engine, tokenizer, train_shards, val_shards, trajectory, on_step, stop, console, identities)
    finally:
        stop.restore()
        engine.close()


def dense_model(job: TrainJob) -> Transformer:
    """The starting model of a dense job: at train.zero_stage 3 built sharded over the ranks
    (`build_sharded_model`, as the finetune's), so that no rank holds the whole model; whole otherwise."""
    if getattr(job.settings, "zero_stage", None) == 3:
        return build_sharded_model(job)
    return build_model(job)


def dense_engine(model: Transformer, job: TrainJob):
    """The engine a dense job's settings ask for: DDP on accelerate (train.zero_stage null), or the
    DeepSpeed engine at ZeRO stage train.zero_stage (3 shards the model, like FSDP)."""
    stage = getattr(job.settings, "zero_stage", None)
    if stage is None:
        return AccelerateEngine(model, job)

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


def _train(
    job, engine, tokenizer, train_shards, val_shards, trajectory, on_step, stop, console, identities: dict | None = None
) -> dict:
    s = job.settings
    cfg = engine.unwrapped.cfg
    rank, world = engine.rank, engine.world_size
    sampler = job_sampler(job, train_shards, s.batch_size * world)
    tokens_per_step = s.batch_size * s.seq_len * s.grad_accum * world
    flops_per_token = train_flops_per_token(cfg, s.seq_len, job.trainable)
    eos_id = tokenizer.eos_id if s.document_mask else None
    if s.document_mask and eos_id is None:
        raise BtxError(f"{job.name}: train.document_mask needs a tokenizer with an EOS token (documents end at it)")

    state = resume_job(job, engine, trajectory, console, identities)
    metrics = MetricsLog(job.metrics_path, enabled=engine.is_main)
    metrics.keep_until(state["step"])
    peak = peak_flops(engine.device, getattr(engine, "precision", s.precision))
    peak = peak * world if peak else None
    # A CPU has no datasheet peak: its MFU is against the matmul rate peak_flops measured, so say so.
    mfu_note = " (of matmul peak)" if engine.device.type == "cpu" and not os.environ.get(PEAK_ENV) else ""
    progress = _Progress(
        job.name, s.steps, state["step"], s.log_every, console, enabled=engine.is_main, mfu_note=mfu_note
    )
    session_start, wall_before = time.perf_counter(), state["wall_time_s"]  # earlier sessions' time
    kill_at, kill_signal = _kill_hook()
    loggers = open_loggers(job, state["step"], main=engine.is_main)  # train.loggers: tensorboard, wandb

    cross_entropy = cross_entropy_for(s)  # compiled with train.compile
    with progress, loggers:
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
                # Off, the call is the model's plain forward, exactly as without the setting.
                masking = () if eos_id is None else (document_ids(inputs, eos_id),)
                output = engine.model(inputs, *masking)
                terms = loss_terms(output, targets, job.balance_alpha, job.z_loss_coef, cross_entropy)
                engine.backward(terms[0])
                sums[:4] += torch.stack([t.detach().double() for t in terms])
            grad_norm = engine.step()
            sums[4] = float(stop.requested)
            *means, stop_votes = all_reduce_sum(sums, engine).tolist()
            total, nll, balance, z = (value / (s.grad_accum * world) for value in means)
            if not (math.isfinite(total) and math.isfinite(nll)):  # the same all-reduced sums on every rank
                _non_finite_loss(job, step, "loss", total, lr, good_upto=step - 2)
            stop_now = stop_votes > 0
            elapsed = time.perf_counter() - started
            state["step"], state["tokens"] = step, state["tokens"] + tokens_per_step

            record = {
                "step": step,
                "loss": total,
                "lr": lr,
                "grad_norm": grad_norm,
                "tokens": state["tokens"],
                "tokens_per_s": tokens_per_step / elapsed,
                "step_time_s": elapsed,
            }
            if cfg.is_moe:
                record.update(nll=nll, balance_loss=balance, z_loss=z)
            record["mfu"] = flops_per_token * tokens_per_step / elapsed / peak if peak else None
            record["elapsed_s"] = wall_before + (time.perf_counter() - session_start)
            if on_step is not None:
                record.update(on_step(step, output, inputs) or {})
            del output, terms, inputs, targets
            if (s.eval_every and step % s.eval_every == 0) or step == s.steps:
                record.update(
                    _val_record(validate(engine, val_shards, s.seq_len, s.batch_size, s.eval_batches, eos_id))
                )
                if not math.isfinite(record["val_loss"]):  # this step's update broke the weights
                    _non_finite_loss(job, step, "validation loss", record["val_loss"], lr, good_upto=step - 1)
            metrics.write(record)
            loggers.log(record)
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
    return export_job(job, engine, tokenizer, state, trajectory, console)


def _non_finite_loss(job: TrainJob, step: int, what: str, value: float, lr: float, good_upto: int) -> None:
    """Stop: nothing of this step is saved. The weights of a checkpoint after step `good_upto` made
    the loss that is not finite (weights after step N give the loss of step N + 1), so the last good
    checkpoint is the newest one up to that step."""
    good = [path for step_n, path in checkpoints(job) if step_n <= good_upto]
    last = f"the last good checkpoint is {good[-1]}" if good else "no good checkpoint was written yet"
    raise BtxError(
        f"train {job.name}: the {what} is {value} at step {step} (lr {lr:.3g}); training stopped without "
        f"saving this step or writing {DONE_NAME} ({last}); lower train.lr or check the data, then "
        "re-run with --force"
    )


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
def validate(
    engine, val_shards: dict, seq_len: int, batch_size: int, max_batches: int, document_eos: int | None = None
) -> dict[str, float]:
    """Mean NLL per domain over the same held-out windows every time (`btx.data.sampling.eval_batches`);
    with `document_eos` (document masking), attention stays inside the documents it ends.

    Batches are dealt round-robin over ranks; every rank runs the same number of forwards (padding
    with a repeat of batch 0, weighted 0) so sharded engines (ZeRO-3) stay in lockstep.
    """

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
                inputs = inputs.to(engine.device)
                masking = () if document_eos is None else (document_ids(inputs, document_eos),)
                logits = model(inputs, *masking).logits
                nll = F.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]).float(), targets.to(engine.device).reshape(-1), reduction="sum"
                )
                if index < len(batches):
                    sums[0] += nll.double()
                    sums[1] += targets.numel()
            total_nll, tokens = all_reduce_sum(sums, engine).tolist()
            losses[domain] = total_nll / tokens
    finally:
        model.train(was_training)
    return losses


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------


def train_command(args) -> int:
    """`btx train RECIPE (--domain NAME | --seed) [KEY=VALUE ...] [--force]` (arguments: btx.cli).

    Re-running resumes from the newest checkpoint and does nothing once DONE.json exists. Several
    processes: `torchrun --nproc_per_node N -m btx train ...` (DDP; gloo on CPU)."""

    exp = load_experiment(args.recipe, args.overrides)
    job = seed_job(exp) if args.seed else expert_job(exp, args.domain)
    run_loop(job, force=args.force)
    return 0
