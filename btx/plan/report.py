"""The plan on the terminal: one table of the jobs (compute, then memory per GPU), one of the
stages, then the MoE share, BTX against its compute-matched baselines and the suggestions."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape

from btx.ui.tables import Column, FitTable

GIB = 2**30


def _tokens(n: float) -> str:
    return f"{n / 1e9:,.1f}B" if n >= 1e8 else f"{n:,.0f}"


def _hours(h: float) -> str:
    if h >= 48:
        return f"{h / 24:,.1f} d"
    return f"{h:,.2f} h" if h >= 1 else f"{h * 3600:,.0f} s"


def _days(gpu_hours: float) -> str:
    days = gpu_hours / 24
    return f"{days:,.1f}" if days >= 10 else f"{days:.3g}"


def _gib(b: float) -> str:
    return f"{b / GIB:,.1f}"


def _engine(row: dict) -> str:
    """accelerate: DDP with fp32 weights (autocast); deepspeed: its ZeRO stage."""
    if row["engine"] == "accelerate":
        return f"DDP {row['precision']}"
    stage = row["engine"].rsplit("-", 1)[-1]
    return f"ZeRO-{stage} {row['precision']}" + (" offload" if row["offload_optimizer"] else "")


def print_plan(plan: dict, console: Console) -> None:
    gpu = plan["gpu"]
    console.print(
        f"[bold]btx plan[/] {escape(plan['recipe'])}: {gpu['name']} ({gpu['peak_flops'] / 1e12:,.0f} TFLOP/s bf16, "
        f"{gpu['memory_bytes'] / 1e9:,.0f} GB; {plan['usable_bytes'] / GIB:,.1f} GiB usable), "
        f"{plan['gpus_per_job']} GPU{'s' * (plan['gpus_per_job'] != 1)} per job, {plan['cluster_gpus']} in all, "
        f"MFU {plan['mfu']:.1%}" + (f" ({escape(plan['mfu_source'])})" if plan.get("mfu_source") else "")
    )
    m = plan.get("measured")
    if m:
        done = m["done_tokens_per_s"]
        console.print(
            f"measured: MFU {m['mfu']:.1%} and {m['tokens_per_s'] or 0:,.0f} tokens/s per step (median of "
            f"{m['steps']} steps)"
            + (f"; DONE.json tokens / wall time {done:,.0f} tokens/s" if done else "")
            + "; a CPU run's MFU is against this CPU's matmul rate and says little about a GPU"
        )
    compute_rows = []
    for r in plan["jobs"]:
        name = r["job"] + ("" if r["in_recipe"] else " *")
        compute_rows.append(
            [
                escape(name),
                f"{r['steps']:,}",
                _tokens(r["tokens"]),
                f"{r['flops']:.3g}",
                _days(r["gpu_hours"]),
                _hours(r["wall_hours"]),
            ]
        )
    console.print(
        FitTable(
            [
                Column("job", "label"),
                Column("steps"),
                Column("tokens"),
                Column("train FLOPs"),
                Column("GPU-days"),
                Column("wall (one job)"),
            ],
            compute_rows,
            title="compute per job",
            caption="* a baseline the recipe's eval section does not train (shown for comparison)",
        )
    )
    memory_rows = []
    for r in plan["jobs"]:
        m = r["memory"]
        verdict = "[green]fits[/]" if r["fits"] else "[red]does not fit[/]"
        memory_rows.append(
            [
                escape(r["job"]),
                escape(_engine(r)),
                f"{r['micro_batch']} x {r['grad_accum']}",
                r["activation_checkpointing"],
                _gib(m["params"]),
                _gib(m["grads"]),
                _gib(m["optimizer"]),
                _gib(m["buffers"]),
                _gib(m["activations"]),
                _gib(m["peak"]),
                verdict,
            ]
        )
    console.print(
        FitTable(
            [
                Column("job", "label"),
                Column("engine", "text"),
                Column("micro x accum", optional=True),
                Column("act. ckpt", "text", optional=True),
                Column("params GiB"),
                Column("grads GiB"),
                Column("optim GiB"),
                Column("buffers GiB", optional=True),
                Column("activ. GiB"),
                Column("peak GiB"),
                Column("verdict", "text"),
            ],
            memory_rows,
            title="memory per GPU",
        )
    )
    stage_rows = [
        [
            escape(s["stage"]),
            _tokens(s["tokens"]),
            f"{s['flops']:.3g}",
            _days(s["gpu_hours"]),
            _hours(s["wall_hours"]),
            escape(s["note"]),
        ]
        for s in plan["stages"]
    ]
    console.print(
        FitTable(
            [
                Column("stage", "label"),
                Column("tokens"),
                Column("train FLOPs"),
                Column("GPU-days"),
                Column("wall"),
                Column("layout", "text"),
            ],
            stage_rows,
            title="stages",
        )
    )
    b = plan["btx"]
    console.print(
        f"BTX after the seed: {_tokens(b['tokens'])} tokens, {b['flops']:.3g} FLOPs, {b['gpu_hours'] / 24:,.1f} "
        f"GPU-days, {_hours(b['wall_hours'])} wall (experts, merge, finetune); "
        f"[bold]MoE share of compute {b['moe_share']:.1%}[/]"
    )
    for base in plan["baselines"]:
        console.print(
            f"  vs {escape(base['job'])}{'' if base['in_recipe'] else ' (not in the recipe)'}: "
            f"{_tokens(base['tokens'])} tokens ({base['tokens_vs_btx']:.2f}x BTX's), "
            f"{base['gpu_hours'] / 24:,.1f} GPU-days, {_hours(base['wall_hours'])} wall"
        )
    ref = plan.get("reference")
    if ref:
        console.print(
            f"{ref['gpu_days']:,.1f} GPU-days for BTX's {b['flops']:.3g} FLOPs imply an MFU of "
            f"[bold]{ref['implied_mfu']:.1%}[/] on {gpu['name']}"
            + (" (over 100%: impossible on this GPU)" if ref["implied_mfu"] > 1 else "")
        )
    for r in plan["jobs"]:
        s = r["suggestion"]
        if s is None:
            continue
        if s["changes"] is None:
            console.print(f"[red]{escape(r['job'])}[/]: {escape(s['why'])}")
        else:
            console.print(
                f"[yellow]{escape(r['job'])}[/] does not fit ({_gib(r['memory']['peak'])} GiB of "
                f"{plan['usable_bytes'] / GIB:,.1f}); with {escape(' '.join(s['changes']))}: {_gib(s['peak'])} GiB"
            )
