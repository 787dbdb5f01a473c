"""`btx plan`'s flags (its work: btx.plan.command)."""

from __future__ import annotations

import argparse

from btx.cli.common import add_recipe_arguments


def add_plan_arguments(p: argparse.ArgumentParser) -> None:
    add_recipe_arguments(p)
    p.add_argument(
        "--gpu",
        required=True,
        metavar="NAME",
        help="the accelerator: A100-40GB, A100-80GB, H100, H200, B200, L40S, MI300X (btx/plan/gpus.py)",
    )
    p.add_argument(
        "--gpus-per-job",
        type=int,
        metavar="N",
        help="data-parallel GPUs of each training job (default: the recipe's branch.slurm nodes x "
        "gpus_per_node with the slurm executor, else branch.devices_per_expert)",
    )
    p.add_argument("--nodes", type=int, metavar="M", help="nodes per job (default: branch.slurm.nodes)")
    p.add_argument("--gpus-per-node", type=int, metavar="G", help="GPUs per node (default: branch.slurm.gpus_per_node)")
    p.add_argument(
        "--cluster-gpus",
        type=int,
        metavar="T",
        help="GPUs available at once (default: enough for every expert side by side); fewer run the experts in waves",
    )
    p.add_argument("--mfu", type=float, metavar="X", help="model-FLOPs utilisation to assume, in (0, 1] (default 0.40)")
    p.add_argument(
        "--measured", metavar="RUN_DIR", help="take the MFU from a finished run's metrics.jsonl (median over its steps)"
    )
    p.add_argument(
        "--seed-config",
        metavar="CONFIG.json",
        help="the seed's Hugging Face config.json, when seed.path is not on this machine",
    )
    p.add_argument(
        "--activation-checkpointing",
        choices=("none", "full"),
        help="what-if for every job (default: each job's train.activation_checkpointing, or none)",
    )
    p.add_argument(
        "--reference-gpu-days",
        type=float,
        metavar="D",
        help="also print the MFU that D GPU-days for BTX's FLOPs imply on --gpu (e.g. the paper's 926.1)",
    )
    p.add_argument("--json", action="store_true", help="print the plan as JSON")


def cmd_plan(args: argparse.Namespace) -> int:
    from btx.plan.command import plan_command

    return plan_command(args)
