"""Training engines: what is device- and parallelism-specific about a training step.

The loop (`btx.train.loop.run_loop`) owns everything that is the same for every engine: batches, the
loss, logging, validation, checkpoint cadence and atomicity, resume and export. An engine owns the
wrapped model, the optimizer and scheduler, backward, the optimizer step, and how its state is
written into (and read back from) a checkpoint directory. `AccelerateEngine` (dense training, DDP on
several GPUs or gloo CPU processes, a plain single process otherwise) lives here; the DeepSpeed
engine of `btx finetune` implements the same `Engine` protocol.

Shared optimisation choices, so that every engine trains the same way:
- AdamW (paper: lr 1e-4, weight decay 0.1, betas from the recipe, 0.9/0.95 by default).
- Weight decay applies to matrices only (every parameter with 2 or more dimensions: attention and
  FFN projections, stacked experts, routers, embeddings, LM head). Norm gains (1-D) are not decayed:
  shrinking them towards 0 changes the scale of every activation, not model capacity. Embeddings
  are decayed, as in Llama and torchtitan; btx's projections have no biases.
- Learning rate: linear warmup over `warmup_steps` to the peak, then cosine decay to
  `min_lr_ratio * peak` at the last step (`lr_factor`). A pure function of the step, so the
  scheduler's state is its step count.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Callable, ContextManager, Protocol

import torch
from accelerate import init_empty_weights

from btx.errors import BtxError
from btx.io.checkpoint import load_model
from btx.model.transformer import Transformer

OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
CLIENT_STATE_FILE = "trainer_state.json"  # the loop's own state (step, tokens, ...)


def build_model(job) -> Transformer:
    """The starting fp32 model of a training job (`btx.train.job.TrainJob`), whole on this rank: the
    init checkpoint's weights, or `init_weights` from job.settings.seed. A ZeRO-3 job builds the
    same model sharded instead (`btx.train.engines.deepspeed.build_sharded_model`)."""
    if job.init_from is None:
        if job.model_config is None:
            raise BtxError(f"train {job.name}: give init_from (a checkpoint) or model_config (from scratch)")
        cfg = dataclasses.replace(job.model_config, **job.config_overrides)
        model = Transformer(cfg)
        model.init_weights(generator=torch.Generator().manual_seed(job.settings.seed))
        return model
    model = load_model(job.init_from, dtype=torch.float32)
    if job.config_overrides:  # same weights, a model built for the changed config (e.g. router mode)
        cfg = dataclasses.replace(model.cfg, **job.config_overrides)
        with init_empty_weights(include_buffers=False):
            changed = Transformer(cfg)
        changed.load_state_dict(model.state_dict(), strict=True, assign=True)
        model = changed
    return model


class Engine(Protocol):
    """What the training loop needs from an engine (see docs/CONTRACTS.md)."""

    model: Any  # callable: model(tokens) -> ModelOutput (DDP-wrapped, autocast, DeepSpeed, ...)
    unwrapped: Any  # the plain btx Transformer
    rank: int
    world_size: int
    is_main: bool
    device: torch.device

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch's plain mean loss; the engine divides by `grad_accum`.
        The loop calls it once per micro-batch, then `step()` once per optimizer step."""

    def step(self) -> float | None:
        """Clip, optimizer step, scheduler step, zero grads. Returns the gradient norm before
        clipping (None when the engine cannot tell)."""

    @property
    def lr(self) -> float:
        """The learning rate the next `step()` uses."""

    def save(self, directory: Path, client_state: dict) -> None:
        """Collective: model, optimizer, scheduler and the loop's `client_state` (JSON-able) into
        `directory`, which appears atomically (complete or not at all)."""

    def load(self, directory: Path) -> dict:
        """Collective: restore what `save` wrote; returns the client_state."""

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Collective: the full btx state dict on the main rank (gathered if sharded), None elsewhere."""

    def exported_weights(self) -> ContextManager[Callable[[str], torch.Tensor] | None]:
        """Collective for the life of the context: on the main rank a function from a btx parameter
        name to its full fp32 weight on the CPU (gathered on demand if sharded, so that an export
        streams to disk without a whole copy), None on the other ranks."""

    def close(self) -> None:
        """Drop model/optimizer references, collect garbage, end the process group if it owns it."""


# --------------------------------------------------------------------------------------------
# Shared optimisation pieces (used by every engine)
# --------------------------------------------------------------------------------------------


def param_groups(params, weight_decay: float) -> list[dict]:
    """AdamW groups: matrices decay, 1-D parameters (norm gains) do not. Frozen parameters are left out."""
    decay, no_decay = [], []
    for p in params:
        if p.requires_grad:
            # A parameter partitioned at creation (DeepSpeed ZeRO-3) holds an empty 1-D tensor;
            # its real shape is in ds_shape.
            ndim = len(getattr(p, "ds_shape", p.shape))
            (decay if ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def make_optimizer(params, settings) -> torch.optim.AdamW:
    """The one AdamW of btx (every engine), over `params` (an iterable of parameters).

    The fused kernel where torch has one (CPU, CUDA): on CPU torch's default is a per-tensor
    Python loop, 3x slower (a third of a small model's step time on 2 cores).
    """
    groups = param_groups(params, settings.weight_decay)
    if not groups:
        raise BtxError("train: the model has no trainable parameters")
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=settings.lr, betas=tuple(settings.betas), eps=settings.eps, fused=fused or None)


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Multiplier of the peak lr for optimizer step `step` (0-based): linear warmup to 1 over
    `warmup_steps`, then cosine from 1 down to `min_ratio`, reached after the last step."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class _LrSchedule:
    """The schedule as a callable object: LambdaLR then saves its fields (plain numbers) in its state_dict."""

    def __init__(self, settings):
        self.warmup, self.total, self.min_ratio = settings.warmup_steps, settings.steps, settings.min_lr_ratio

    def __call__(self, step: int) -> float:
        return lr_factor(step, self.warmup, self.total, self.min_ratio)


def make_scheduler(optimizer: torch.optim.Optimizer, settings) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, _LrSchedule(settings))


def mixed_precision(precision: str, device_type: str) -> str:
    """accelerate's mixed_precision for a recipe's `precision` ("auto": bf16 on CUDA with bf16, else fp32).

    Master weights and optimizer state stay fp32 in every mode; bf16/fp16 is autocast of the forward.
    """
    if precision == "auto":
        return "bf16" if device_type == "cuda" and torch.cuda.is_bf16_supported() else "no"
    if precision == "fp32":
        return "no"
    if precision == "fp16" and device_type != "cuda":
        raise BtxError("train.precision: fp16 needs a CUDA device; use bf16 or fp32 on this machine")
    return precision
