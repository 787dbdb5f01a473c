"""`btx plan`: the whole accounting of a recipe on a named cluster, as one JSON-ready dict.

make_plan(exp, seed_cfg, layout) -> {"jobs": [...], "stages": [...], "btx": {...}, "baselines": [...]}

Each training job gets its compute (btx.plan.compute) and its memory per GPU (btx.plan.memory) with a
verdict; a job that does not fit gets the recipe changes that make it fit (`suggest`), found by
re-running the memory model with each change, so applying them gives a plan that fits. The BTX
totals and the MoE share count what BTX trains after the seed (the experts and the finetune), the
same budget the compute-matched baselines are matched on (btx.run.baselines.compute_budget).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from btx.errors import BtxError
from btx.model.config import ModelConfig
from btx.plan.compute import (
    DEFAULT_IO_BYTES_PER_S,
    Layout,
    job_compute,
    matched_steps,
    merge_bytes,
    waves,
)
from btx.plan.memory import job_memory, param_counts
from btx.plan.stages import Job, replace_settings, training_jobs
from btx.recipe.experiment import Experiment

HOURS_PER_DAY = 24.0


@dataclass(frozen=True)
class Change:
    """One recipe change a suggestion makes: `key=value` as an override, or a `btx plan` flag when
    the recipe schema has no such key yet (train.activation_checkpointing before it lands)."""

    key: str
    value: object
    flag: str | None = None  # the plan flag standing in for a key the schema lacks

    def render(self) -> str:
        if self.flag:
            return f"{self.flag} {_plain(self.value)}"
        return f"{self.key}={_plain(self.value)}"


def _plain(v: object) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


def resolved_precision(job: Job) -> str:
    """What a GPU runs: bf16 unless the recipe asks for fp32 (fp16 takes as many bytes as bf16)."""
    return "fp32" if job.settings.precision == "fp32" else "bf16"


def _has_ac_key(job: Job) -> bool:
    return any(f.name == "activation_checkpointing" for f in dataclasses.fields(job.settings))


def _with(job: Job, change: str) -> tuple[Job, Change] | None:
    """`job` with one more memory-saving change, or None when that change is not available."""
    s = job.settings
    if change in ("zero", "zero_up_to_2"):
        stage = -1 if job.zero_stage is None else job.zero_stage
        if stage >= (2 if change == "zero_up_to_2" else 3):
            return None
        new = dataclasses.replace(
            job, engine="deepspeed", zero_stage=stage + 1, settings=replace_settings(s, zero_stage=stage + 1)
        )
        return new, Change(f"{job.engine_prefix}zero_stage", stage + 1)
    if change == "checkpointing":
        if job.activation_checkpointing == "full":
            return None
        key = f"{job.train_prefix}activation_checkpointing"
        flag = None if _has_ac_key(job) else "--activation-checkpointing"
        settings = replace_settings(s, activation_checkpointing="full")
        return dataclasses.replace(job, settings=settings), Change(key, "full", flag)
    if change == "micro_batch":
        if s.batch_size <= 1:
            return None
        half = s.batch_size // 2
        accum = s.grad_accum * s.batch_size // half if s.batch_size % half == 0 else s.grad_accum * 2
        settings = replace_settings(s, batch_size=half, grad_accum=accum)
        return dataclasses.replace(job, settings=settings), Change(f"{job.train_prefix}batch_size", half)
    if change == "offload":
        if job.offload_optimizer or job.engine_prefix != "finetune." or not job.zero_stage:
            return None
        return dataclasses.replace(job, offload_optimizer=True), Change("finetune.offload_optimizer", True)
    raise ValueError(change)


# The order a suggestion tries changes in: ZeRO up to 2 costs little; checkpointing costs ~1/3 more
# compute; ZeRO-3 more communication; smaller micro-batches lower MFU; offload is the slowest.
_ORDER = ("zero_up_to_2", "zero_up_to_2", "zero_up_to_2", "checkpointing", "zero", "micro_batch", "offload")


def suggest(job: Job, world: int, capacity: float) -> tuple[list[Change], Job] | None:
    """The changes (in order) that make `job` fit in `capacity` bytes per GPU, and the changed job;
    None when nothing btx offers makes it fit."""
    changes: list[Change] = []
    current = job

    def fits(j: Job) -> bool:
        return job_memory(j, world, resolved_precision(j)).peak <= capacity

    for step in _ORDER:
        if fits(current):
            break
        nxt = _with(current, step)
        if step == "micro_batch":  # halve until it fits or reaches 1
            while nxt is not None:
                current, change = nxt
                changes = [c for c in changes if c.key != change.key] + [change]
                if fits(current):
                    break
                nxt = _with(current, step)
            continue
        if nxt is not None:
            current, change = nxt
            changes = [c for c in changes if c.key != change.key] + [change]
    if not fits(current):
        return None
    accum = current.settings.grad_accum
    if accum != job.settings.grad_accum:
        changes.append(Change(f"{job.train_prefix}grad_accum", accum))
    return changes, current


def make_plan(exp: Experiment, seed_cfg: ModelConfig, layout: Layout, jobs: list[Job] | None = None) -> dict:
    """The plan of `exp` on `layout` (see the module doc); `jobs` defaults to btx.plan.stages.training_jobs."""
    jobs = training_jobs(exp, seed_cfg) if jobs is None else jobs
    world = layout.gpus_per_job
    capacity = layout.gpu.usable_bytes
    computed = {}
    for job in jobs:
        if job.kind != "baseline":
            computed[job.name] = job_compute(job, layout)
    experts = [computed[j.name] for j in jobs if j.kind == "expert"]
    finetune = computed["finetune"]
    budget = sum(c.flops for c in experts) + finetune.flops
    btx_tokens = sum(c.tokens for c in experts) + finetune.tokens
    for job in jobs:
        if job.kind == "baseline":
            if job.name.endswith("-compute"):
                steps = matched_steps(budget, job, layout)
            else:
                per_step = job.settings.batch_size * job.settings.seq_len * job.settings.grad_accum * world
                steps = max(1, round(btx_tokens / per_step))
            computed[job.name] = job_compute(dataclasses.replace(job, router_phase_steps=0), layout, steps=steps)

    rows = []
    for job in jobs:
        c = computed[job.name]
        precision = resolved_precision(job)
        memory = job_memory(job, world, precision)
        counts = param_counts(job.cfg, job.trainable)
        fits = memory.peak <= capacity
        row = {
            "job": job.name,
            "kind": job.kind,
            "in_recipe": job.in_recipe,
            "steps": c.steps,
            "tokens": c.tokens,
            "flops_per_token": c.flops_per_token,
            "flops": c.flops,
            "gpu_hours": c.gpu_hours,
            "wall_hours": c.wall_hours,
            "params": counts.total,
            "trained_params": counts.trained,
            "engine": job.engine if job.engine == "accelerate" else f"deepspeed zero-{job.zero_stage}",
            "precision": precision,
            "micro_batch": job.settings.batch_size,
            "grad_accum": job.settings.grad_accum,
            "activation_checkpointing": job.activation_checkpointing,
            "offload_optimizer": job.offload_optimizer,
            "memory": memory.to_dict(),
            "fits": fits,
            "suggestion": None,
        }
        if not fits:
            found = suggest(job, world, capacity)
            if found is None:
                row["suggestion"] = {"changes": None, "why": "nothing btx offers fits it: use more memory per GPU"}
            else:
                changes, changed = found
                row["suggestion"] = {
                    "changes": [c.render() for c in changes],
                    "peak": job_memory(changed, world, resolved_precision(changed)).peak,
                }
        rows.append(row)

    stages = _stages(exp, jobs, computed, layout, seed_cfg)
    btx = {
        "tokens": btx_tokens,
        "flops": budget,
        "gpu_hours": sum(c.gpu_hours for c in experts) + finetune.gpu_hours,
        "wall_hours": sum(s["wall_hours"] for s in stages if s["stage"] in ("experts", "merge", "finetune")),
        "moe_share": finetune.flops / budget if budget else 0.0,
    }
    baselines = [
        {
            "job": r["job"],
            "in_recipe": r["in_recipe"],
            "tokens": r["tokens"],
            "flops": r["flops"],
            "gpu_hours": r["gpu_hours"],
            "wall_hours": r["wall_hours"],
            "tokens_vs_btx": r["tokens"] / btx_tokens if btx_tokens else None,
        }
        for r in rows
        if r["kind"] == "baseline"
    ]
    return {
        "recipe": str(exp.path),
        "gpu": {"name": layout.gpu.name, "peak_flops": layout.gpu.peak_flops, "memory_bytes": layout.gpu.memory_bytes},
        "usable_bytes": capacity,
        "gpus_per_job": world,
        "cluster_gpus": layout.cluster_gpus,
        "mfu": layout.mfu,
        "jobs": rows,
        "stages": stages,
        "btx": btx,
        "baselines": baselines,
        "fits": all(r["fits"] for r in rows if r["in_recipe"]),
    }


def _stages(exp: Experiment, jobs: list[Job], computed: dict, layout: Layout, seed_cfg: ModelConfig) -> list[dict]:
    out = []

    def stage(name: str, names: list[str], wall: float, note: str = "") -> None:
        cs = [computed[n] for n in names]
        out.append(
            {
                "stage": name,
                "jobs": names,
                "tokens": sum(c.tokens for c in cs),
                "flops": sum(c.flops for c in cs),
                "gpu_hours": sum(c.gpu_hours for c in cs),
                "wall_hours": wall,
                "note": note,
            }
        )

    if "seed" in computed:
        stage("seed", ["seed"], computed["seed"].wall_hours)
    expert_names = [j.name for j in jobs if j.kind == "expert"]
    span, n_waves = waves([computed[n].wall_hours for n in expert_names], layout.jobs_at_once)
    at_once = min(layout.jobs_at_once, len(expert_names))
    stage("experts", expert_names, span, f"{at_once} side by side, {n_waves} wave{'s' * (n_waves != 1)}")
    moe = next(j for j in jobs if j.kind == "finetune").cfg
    out_bytes = 2 if exp.merge.dtype in (None, "bfloat16", "float16") else 4
    sources = len(expert_names) + 1
    nbytes = merge_bytes(param_counts(seed_cfg, "all").total, sources, param_counts(moe, "all").total, out_bytes)
    out.append(
        {
            "stage": "merge",
            "jobs": [],
            "tokens": 0.0,
            "flops": 0.0,
            "gpu_hours": 0.0,
            "wall_hours": nbytes / DEFAULT_IO_BYTES_PER_S / 3600,
            "note": f"{nbytes / 1e9:,.0f} GB read and written at {DEFAULT_IO_BYTES_PER_S / 1e9:g} GB/s, no GPU",
        }
    )
    stage("finetune", ["finetune"], computed["finetune"].wall_hours)
    for j in jobs:
        if j.kind == "baseline":
            stage(j.name, [j.name], computed[j.name].wall_hours, "" if j.in_recipe else "not in the recipe's eval")
    return out


def check_layout(gpus_per_job: int, cluster_gpus: int) -> None:
    if gpus_per_job < 1:
        raise BtxError(f"--gpus-per-job: must be >= 1, got {gpus_per_job}")
    if cluster_gpus < gpus_per_job:
        raise BtxError(
            f"impossible layout: {gpus_per_job} GPUs per job but the cluster has {cluster_gpus} (--cluster-gpus)"
        )
