"""Collectives across ranks (through torch.distributed, whichever engine set it up), and turning
SIGTERM into a clean stop at the end of the current step.
"""

from __future__ import annotations

import signal

import torch


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
