"""Collectives across ranks (through torch.distributed, whichever engine set it up), and turning
SIGTERM into a clean stop at the end of the current step.
"""

from __future__ import annotations

import signal

import torch


def is_distributed(engine) -> bool:
    return engine.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()


def all_reduce_sum(values: torch.Tensor, engine) -> torch.Tensor:
    """Sum over ranks. `values` lives on engine.device (NCCL reduces device tensors, gloo CPU ones)."""
    if is_distributed(engine):
        torch.distributed.all_reduce(values)
    return values


def barrier(engine) -> None:
    if is_distributed(engine):
        torch.distributed.barrier()


class StopRequest:
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


def mean_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """The mean over every rank of the default process group, for hooks that have no engine at hand
    (the finetune's routing statistics). `values` and the result are on the CPU; NCCL reduces a
    copy on this rank's GPU."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return values
    world = torch.distributed.get_world_size()
    if world == 1:
        return values
    nccl = torch.distributed.get_backend() == "nccl"
    on_device = values.to(torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu"))
    torch.distributed.all_reduce(on_device)
    return on_device.cpu() / world
