"""Compute accounting: tokens, training FLOPs, GPU-hours and wall time per job and stage.

- Tokens of a job = steps x batch_size x seq_len x grad_accum x data-parallel GPUs (btx.train.loop).
- FLOPs = tokens x btx.model.flops.train_flops_per_token(cfg, seq_len, trainable): btx's own count,
  the one DONE.json records, where a frozen weight still costs its forward and input gradient.
- A compute-matched baseline trains as many steps of the finetune's settings as make its FLOPs
  the experts' plus the finetune's (btx.run.baselines.compute_budget); a data-matched one sees
  their tokens.
- GPU-hours = FLOPs / (peak x MFU) / 3600, whatever the layout. Wall time of a job =
  FLOPs / (GPUs per job x peak x MFU). The experts are independent jobs: as many run side by side
  as the cluster's GPUs (and branch.max_parallel) allow, the rest in waves (longest first).
- The merge trains nothing: its wall time is the bytes it reads and writes at `io_bytes_per_s`.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

from btx.model.flops import train_flops_per_token
from btx.plan.gpus import Gpu
from btx.plan.stages import Job

DEFAULT_IO_BYTES_PER_S = 1e9  # merge: a shared file system at ~1 GB/s (btx streams at the I/O floor)


@dataclass(frozen=True)
class Layout:
    gpu: Gpu
    gpus_per_job: int  # data-parallel ranks of one training job
    cluster_gpus: int  # GPUs available at once (experts run side by side within this)
    mfu: float
    max_parallel: int | None = None  # branch.max_parallel

    @property
    def jobs_at_once(self) -> int:
        n = self.cluster_gpus // self.gpus_per_job
        return max(1, min(n, self.max_parallel) if self.max_parallel else n)


@dataclass
class JobCompute:
    name: str
    steps: int
    tokens: float
    flops: float
    gpu_hours: float
    wall_hours: float  # of this job alone, on gpus_per_job GPUs
    flops_per_token: float


def tokens_per_step(job: Job, world: int) -> int:
    s = job.settings
    return s.batch_size * s.seq_len * s.grad_accum * world


def flops_per_token(job: Job, trainable: str | None = None) -> float:
    return train_flops_per_token(job.cfg, job.settings.seq_len, trainable or job.trainable)


def job_compute(job: Job, layout: Layout, steps: int | None = None) -> JobCompute:
    """One job's accounting; `steps` replaces its settings' (the matched baselines)."""
    steps = job.settings.steps if steps is None else steps
    per_step = tokens_per_step(job, layout.gpus_per_job)
    tokens = float(steps * per_step)
    fpt = flops_per_token(job)
    flops = tokens * fpt
    if job.router_phase_steps:  # finetune.router_only_steps: a router-only job first, same batches
        router_tokens = float(job.router_phase_steps * per_step)
        tokens += router_tokens
        flops += router_tokens * flops_per_token(job, "router_only")
        steps += job.router_phase_steps
    rate = layout.gpu.peak_flops * layout.mfu
    return JobCompute(
        name=job.name,
        steps=steps,
        tokens=tokens,
        flops=flops,
        gpu_hours=flops / rate / 3600,
        wall_hours=flops / (rate * layout.gpus_per_job) / 3600,
        flops_per_token=fpt,
    )


def waves(durations: list[float], slots: int) -> tuple[float, int]:
    """(makespan, number of waves) of independent jobs on `slots` slots, longest first (LPT)."""
    if not durations:
        return 0.0, 0
    free = [0.0] * min(slots, len(durations))
    heapq.heapify(free)
    for d in sorted(durations, reverse=True):
        heapq.heappush(free, heapq.heappop(free) + d)
    return max(free), math.ceil(len(durations) / slots)


def merge_bytes(seed_params: int, n_sources: int, moe_params: int, out_dtype_bytes: int) -> float:
    """Bytes a merge reads (every source checkpoint, bf16) and writes (the MoE in its dtype)."""
    return 2.0 * seed_params * n_sources + float(out_dtype_bytes) * moe_params


def matched_steps(budget_flops: float, job: Job, layout: Layout) -> int:
    """btx.run.baselines._matched_steps at the plan's layout: all parameters train."""
    per_step = flops_per_token(job, "all") * tokens_per_step(job, layout.gpus_per_job)
    return max(1, round(budget_flops / per_step))
