"""The accelerate engine: one plain process, or DDP across several (gloo on CPU, NCCL on GPUs).
Its checkpoints hold fp32 weights as an HF checkpoint plus optimizer.pt, scheduler.pt and the
loop's trainer_state.json; they are loaded with `weights_only=True`.
"""

from __future__ import annotations

import contextlib
import gc
import json
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from btx.errors import BtxError
from btx.io.atomic import atomic_dir, dumps_json
from btx.io.checkpoint import load_state_dict, save_model
from btx.train.engines.base import (
    CLIENT_STATE_FILE,
    OPTIMIZER_FILE,
    SCHEDULER_FILE,
    make_optimizer,
    make_scheduler,
    mixed_precision,
)


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

    def model(self, tokens: torch.Tensor, *document_ids: torch.Tensor):
        """Forward of the next micro-batch (with its document ids, under document masking);
        gradient sync only for the last of the step."""
        if self._micro < self.grad_accum - 1:
            with self.accelerator.no_sync(self._wrapped):
                return self._wrapped(tokens, *document_ids)
        return self._wrapped(tokens, *document_ids)

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
                save_model(self.unwrapped, None, tmp, dtype=torch.float32, atomic=False)
                torch.save(self._optimizer.state_dict(), tmp / OPTIMIZER_FILE)
                torch.save(self.scheduler.state_dict(), tmp / SCHEDULER_FILE)
                (tmp / CLIENT_STATE_FILE).write_text(dumps_json(client_state, indent=2) + "\n")
        self.accelerator.wait_for_everyone()

    def load(self, directory: Path) -> dict:
        directory = Path(directory)
        _, state = load_state_dict(directory, dtype=torch.float32, device=self.device)
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
            raise BtxError(
                f"{directory / CLIENT_STATE_FILE}: unreadable ({e}); delete {directory} to resume "
                "from an earlier checkpoint"
            ) from None

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        if not self.is_main:
            return None
        return {k: v.detach().to("cpu", torch.float32) for k, v in self.unwrapped.state_dict().items()}

    @contextlib.contextmanager
    def exported_weights(self):
        """Every rank holds the whole model: the main rank reads its own copy, one parameter at a time."""
        if not self.is_main:
            yield None
            return
        params = dict(self.unwrapped.named_parameters())
        yield lambda name: params[name].detach().to("cpu", torch.float32)

    def close(self) -> None:
        """Free everything before the process group goes: a DDP module still alive at gloo
        teardown can abort the process at exit ("terminate called without an active exception")."""

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
