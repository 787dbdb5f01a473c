"""`btx plan RECIPE [KEY=VALUE ...] --gpu NAME [--gpus-per-job N | --nodes M --gpus-per-node G]
[--cluster-gpus T] [--mfu X | --measured RUN_DIR] [--json]` (arguments: btx.cli.plan).

GPUs per job default to the recipe's layout: Slurm's nodes x gpus_per_node with branch.executor
slurm, branch.devices_per_expert otherwise. The cluster defaults to enough GPUs for every expert
side by side. A bad GPU name or a layout the cluster cannot hold is one line, exit 2.
"""

from __future__ import annotations

import json

from rich.console import Console

from btx.errors import BtxError
from btx.plan.compute import Layout
from btx.plan.gpus import DEFAULT_MFU, gpu
from btx.plan.measured import measured
from btx.plan.plan import check_layout, make_plan
from btx.plan.report import print_plan
from btx.plan.stages import load_for_plan, seed_config, training_jobs, with_activation_checkpointing


def gpus_per_job(exp, args) -> int:
    slurm = exp.branch.slurm
    if args.gpus_per_job is not None:
        if args.nodes is not None or args.gpus_per_node is not None:
            raise BtxError("--gpus-per-job: give it, or --nodes/--gpus-per-node, not both")
        return args.gpus_per_job
    if args.nodes is not None or args.gpus_per_node is not None:
        nodes = args.nodes if args.nodes is not None else slurm.nodes
        per_node = args.gpus_per_node if args.gpus_per_node is not None else slurm.gpus_per_node
        return nodes * per_node
    if exp.branch.executor == "slurm":
        return slurm.nodes * slurm.gpus_per_node
    return exp.branch.devices_per_expert


def build_plan(args) -> dict:
    card = gpu(args.gpu)
    exp = load_for_plan(args.recipe, args.overrides)
    per_job = gpus_per_job(exp, args)
    n_experts = len(exp.merged_domains)
    cluster = args.cluster_gpus if args.cluster_gpus is not None else per_job * max(1, n_experts)
    check_layout(per_job, cluster)
    source = None
    if args.measured is not None:
        if args.mfu is not None:
            raise BtxError("--mfu: give it or --measured, not both")
        m = measured(args.measured)
        mfu = m["mfu"]
        source = f"median of {m['steps']} steps in {args.measured}"
    else:
        mfu = DEFAULT_MFU if args.mfu is None else args.mfu
        source = "btx.plan.gpus.DEFAULT_MFU" if args.mfu is None else "--mfu"
        m = None
    if not 0 < mfu <= 1:
        raise BtxError(f"--mfu: must be in (0, 1], got {mfu}")
    seed = seed_config(exp, args.seed_config)
    jobs = with_activation_checkpointing(training_jobs(exp, seed), args.activation_checkpointing)
    layout = Layout(card, per_job, cluster, mfu, exp.branch.max_parallel)
    plan = make_plan(exp, seed, layout, jobs)
    plan["mfu_source"] = source
    if m is not None:
        plan["measured"] = m
    if args.reference_gpu_days is not None:
        days = args.reference_gpu_days
        if days <= 0:
            raise BtxError(f"--reference-gpu-days: must be > 0, got {days}")
        plan["reference"] = {
            "gpu_days": days,
            "implied_mfu": plan["btx"]["flops"] / (days * 86400 * card.peak_flops),
        }
    return plan


def plan_command(args) -> int:
    plan = build_plan(args)
    if args.json:
        print(json.dumps(plan, indent=2))
    else:
        print_plan(plan, Console())
    return 0
