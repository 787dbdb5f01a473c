"""Training engines: what is device- and parallelism-specific about a training step.

The loop (`btx.train.run_loop`) owns everything that is the same for every engine: batches, the
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
import gc
import json
import math
from pathlib import Path
from typing import Any, Protocol

import torch

from btx import hf
from btx.errors import BtxError
from btx.manifest import atomic_dir, dumps_json
from btx.model import Transformer

OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
CLIENT_STATE_FILE = "trainer_state.json"  # the loop's own state (step, tokens, ...)


def build_model(job) -> Transformer:
    """The starting fp32 model of a training job (`btx.train.TrainJob`): the init checkpoint's
    weights, or `init_weights` from job.settings.seed. Here, below the loop and every engine, because
    both the loop and DeepSpeed's ZeRO-3 path (`engine_deepspeed.build_sharded_model`) start from it."""
    if job.init_from is None:
        if job.model_config is None:
            raise BtxError(f"train {job.name}: give init_from (a checkpoint) or model_config (from scratch)")
        cfg = dataclasses.replace(job.model_config, **job.config_overrides)
        model = Transformer(cfg)
        model.init_weights(generator=torch.Generator().manual_seed(job.settings.seed))
        return model
    model = hf.load_model(job.init_from, dtype=torch.float32)
    if job.config_overrides:  # same weights, a model built for the changed config (e.g. router mode)
        from accelerate import init_empty_weights

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
    return torch.optim.AdamW(groups, lr=settings.lr, betas=tuple(settings.betas), eps=settings.eps,
                             fused=fused or None)


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


# --------------------------------------------------------------------------------------------
# The accelerate engine
# --------------------------------------------------------------------------------------------


class AccelerateEngine:
    """Dense training on accelerate: DDP across processes (NCCL on GPUs, gloo on CPU), a plain
    single process otherwise.

    Launch several processes with `torchrun --nproc_per_node N -m btx train ...` (or
    `accelerate launch --multi_gpu`). On a CPU-only machine the accelerator is created with
    `cpu=True`, which is what makes accelerate set up a gloo process group under torchrun; without
    it every process would silently train alone.

    Grad accumulation: the engine counts micro-batches (one `backward` each) and lets DDP reduce
    gradients only in the backward of the last one of an optimizer step (DDP's no_sync must cover
    the forward too, hence the counting rather than a context the loop would have to enter).

    Only the main rank writes checkpoint files: DDP keeps weights and optimizer state identical on
    every rank.
    """

    def __init__(self, model: torch.nn.Module, job):
        from accelerate import Accelerator

        settings = job.settings
        use_cpu = not torch.cuda.is_available()
        self.precision = mixed_precision(settings.precision, "cpu" if use_cpu else "cuda")
        self.accelerator = Accelerator(cpu=use_cpu, mixed_precision=self.precision)
        self.unwrapped = model
        self.grad_accum = settings.grad_accum
        self.grad_clip = settings.grad_clip
        self._wrapped = self.accelerator.prepare_model(model)
        self.device = self.accelerator.device
        self.rank = self.accelerator.process_index
        self.world_size = self.accelerator.num_processes
        self.is_main = self.accelerator.is_main_process
        # The optimizer sees the parameters after prepare (on the device). It is prepared so that
        # an fp16 grad scaler, when there is one, unscales and skips overflowing steps.
        self._optimizer = make_optimizer(self.unwrapped.parameters(), settings)
        self.optimizer = self.accelerator.prepare_optimizer(self._optimizer)
        self.scheduler = make_scheduler(self._optimizer, settings)
        self._params = [p for p in self.unwrapped.parameters() if p.requires_grad]
        self._micro = 0  # micro-batches backpropagated since the last step

    def model(self, tokens: torch.Tensor):
        """Forward of the next micro-batch; gradient sync only for the last of the step."""
        if self._micro < self.grad_accum - 1:
            with self.accelerator.no_sync(self._wrapped):
                return self._wrapped(tokens)
        return self._wrapped(tokens)

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss / self.grad_accum)
        self._micro += 1

    def step(self) -> float | None:
        max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")  # inf: measure, never clip
        norm = self.accelerator.clip_grad_norm_(self._params, max_norm)
        self.optimizer.step()
        if not self.accelerator.optimizer_step_was_skipped:  # fp16 overflow: the step did not happen
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._micro = 0
        return None if norm is None else float(norm)

    @property
    def lr(self) -> float:
        return float(self._optimizer.param_groups[0]["lr"])

    def save(self, directory: Path, client_state: dict) -> None:
        if self.is_main:
            with atomic_dir(directory, force=True) as tmp:
                # Weights as an fp32 HF checkpoint (safetensors): exact, and loadable by any tool.
                hf.save_model(self.unwrapped, None, tmp, dtype=torch.float32, atomic=False)
                torch.save(self._optimizer.state_dict(), tmp / OPTIMIZER_FILE)
                torch.save(self.scheduler.state_dict(), tmp / SCHEDULER_FILE)
                (tmp / CLIENT_STATE_FILE).write_text(dumps_json(client_state, indent=2) + "\n")
        self.accelerator.wait_for_everyone()

    def load(self, directory: Path) -> dict:
        directory = Path(directory)
        _, state = hf.load_state_dict(directory, dtype=torch.float32, device=self.device)
        with torch.no_grad():
            self.unwrapped.load_state_dict(state, strict=True)
        # Files btx wrote itself, read with weights_only: tensors and numbers, nothing unpickled.
        self._optimizer.load_state_dict(
            torch.load(directory / OPTIMIZER_FILE, map_location=self.device, weights_only=True)
        )
        self.scheduler.load_state_dict(torch.load(directory / SCHEDULER_FILE, weights_only=True))
        try:
            return json.loads((directory / CLIENT_STATE_FILE).read_text())
        except (OSError, ValueError) as e:
            raise BtxError(f"{directory / CLIENT_STATE_FILE}: unreadable ({e}); delete {directory} to resume "
                           "from an earlier checkpoint") from None

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        if not self.is_main:
            return None
        return {k: v.detach().to("cpu", torch.float32) for k, v in self.unwrapped.state_dict().items()}

    def close(self) -> None:
        """Free everything before the process group goes: a DDP module still alive at gloo
        teardown can abort the process at exit ("terminate called without an active exception")."""
        from accelerate.state import AcceleratorState

        accelerator = self.accelerator
        if accelerator is None:
            return
        accelerator.free_memory()
        self._wrapped = self.unwrapped = self.optimizer = self._optimizer = self.scheduler = None
        self._params = []
        gc.collect()
        accelerator.end_training()  # destroys the process group when there is one
        self.accelerator = None
        # Forget accelerate's process-wide singletons so a later job in this process (btx run
        # trains the seed, then the experts) can choose its own precision and devices.
        AcceleratorState._reset_state(reset_partial_state=True)
