"""Interleaved timing shared by the benchmark scripts.

Contenders run in alternating order each round (a, b, b, a, ...), so background load and clock
drift hit every contender alike; a script then compares medians (or minima) measured in one run.
"""

from __future__ import annotations

import time
from typing import Callable

import torch


def interleaved_times(
    contenders: dict[str, Callable[[], object]], rounds: int, *, warmup: int = 1, repeat: int = 1, cuda: bool = False
) -> dict[str, list[float]]:
    """Seconds of every call of every contender: `rounds` rounds of `repeat` calls each, after
    `warmup` untimed calls. With `cuda`, the device is synchronised around each timed call."""
    for fn in contenders.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    order = list(contenders)
    for r in range(rounds):
        for name in order if r % 2 == 0 else order[::-1]:
            for _ in range(repeat):
                if cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                contenders[name]()
                if cuda:
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - t0)
    return times
