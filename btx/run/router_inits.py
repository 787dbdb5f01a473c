"""Merged-without-finetune loss for each router init, side by side: `btx eval RECIPE --router-inits`.

For every router init asked for (default: all five), the run's seed and merged experts are merged
with the recipe's merge settings and that init into <run_dir>/router-inits/<init>/, and each MoE is
scored on the validation windows every eval row uses. This is the table that says which routers
start where the experts are good before any finetune; the run's own merged/ is not touched.

- A merge already there is reused when its DONE.json records the same settings and inputs
  (its recipe_hash) and its files are intact; otherwise it is made again.
- `hidden` needs prompts (merge.prompts); without them its row is left out, with a note.
- centroid and ridge routers are fitted on each domain's train shard (btx.mix.merge.recipe_router_data),
  so the validation windows stay unseen by them.
- The table goes to <run_dir>/eval-router-inits/ (eval.md, eval.json, DONE.json).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from btx.choices import ROUTER_INITS
from btx.data.shards import load_shard
from btx.errors import BtxError
from btx.evaluate.checkpoints import pick_dtype, write_outputs
from btx.evaluate.routing_analysis import pick_device
from btx.evaluate.scores import EvalRow, domain_losses
from btx.evaluate.table import render
from btx.io.checkpoint import load_model
from btx.io.manifest import changed_inputs, damaged_outputs, read_done
from btx.io.reader import CheckpointReader
from btx.mix.merge import (
    merge,
    merge_recipe_hash,
    recipe_merge_options,
    recipe_router_data,
)


def parse_inits(text: str | None) -> list[str]:
    """`--router-inits` with no value: all; else a comma-separated list of router inits."""
    if not text:
        return list(ROUTER_INITS)
    inits = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [i for i in inits if i not in ROUTER_INITS]
    if unknown:
        raise BtxError(f"eval --router-inits: {unknown[0]!r} is not a router init (expected {', '.join(ROUTER_INITS)})")
    return inits


def _reusable(path: Path, wanted_hash: str) -> bool:
    done = read_done(path)
    return (
        done is not None
        and done.get("recipe_hash") == wanted_hash
        and not damaged_outputs(path)
        and not changed_inputs(done.get("input_identities"), path)
    )


def router_init_table(exp, inits: list[str], *, console: Console | None = None):
    """Merge the run with each init (or reuse those merges), score them, render and save the table."""

    console = console or Console()
    rd = exp.paths
    missing = [d for d in exp.merged_domains if read_done(rd.expert(d)) is None]
    if missing or not (exp.seed_dir / "config.json").is_file():
        raise BtxError(
            f"{exp.run_dir}: the router-init table needs the seed and every expert "
            f"({', '.join(missing) or 'seed'} not finished); run btx run {exp.path} --until branch first"
        )
    settings = exp.eval
    seq_len = settings.seq_len or exp.train.seq_len
    device = pick_device(settings.device)
    shards = {d: load_shard(rd.shard(d, "val")) for d in exp.domains}
    experts = {d: rd.expert_final(d) for d in exp.merged_domains}
    expert_flops = sum((read_done(rd.expert(d)) or {}).get("train_flops", 0.0) for d in experts)
    rows, notes = [], []
    for init in inits:
        if init == "hidden" and not exp.merge.prompts:
            notes.append("hidden: left out (no merge.prompts in the recipe)")
            continue
        # Prompts only shape hidden routers: other inits' merges do not depend on them.
        section = dataclasses.replace(
            exp.merge, router_init=init, **({} if init == "hidden" else {"prompts": {}, "negative_prompts": {}})
        )
        wanted = merge_recipe_hash(exp, section=section)
        out = rd.router_init(init)
        if not _reusable(out, wanted):
            options = recipe_merge_options(section, aux_loss_coef=exp.finetune.balance_alpha)
            options.prompts = {k: v for k, v in options.prompts.items() if k in [*experts, "seed"]}
            options.negative_prompts = {k: v for k, v in options.negative_prompts.items() if k in [*experts, "seed"]}
            console.print(escape(f"router inits: merging with {init} routers -> {out}"), soft_wrap=True)
            merge(
                exp.seed_dir,
                experts,
                out,
                options,
                force=True,
                recipe_hash=wanted,
                router_data=recipe_router_data(exp, experts) if init in ("centroid", "ridge") else None,
                seed_needs_manifest=exp.seed.path is None,
                console=console,
            )
        with CheckpointReader(out) as reader:  # where every evaluation of the run runs: eval.device, eval.dtype
            dtype = pick_dtype(settings.dtype, device, reader.dtype)
        model = load_model(out, dtype=dtype, device=device)
        losses, tokens = domain_losses(model, shards, seq_len, settings.batch_size, settings.batches)
        rows.append(
            EvalRow(
                f"merged, {init} routers",
                losses,
                expert_flops,
                model.cfg.param_counts()["active"],
                "no finetune",
                tokens,
            )
        )
    if not rows:
        raise BtxError("eval --router-inits: no row to show (" + "; ".join(notes) + ")")
    domains = list(exp.domains)
    render(
        rows,
        domains,
        title="Merged, no finetune: validation loss by router init (nats/token; lower is better)",
        console=console,
    )
    for note in notes:
        console.print(escape(note), soft_wrap=True)
    table_dir = rd.router_init_table
    record = {
        "recipe": str(exp.path),
        "overrides": list(exp.overrides),
        "inits": inits,
        "notes": notes,
        "batches": settings.batches,
        "batch_size": settings.batch_size,
        "seq_len": seq_len,
    }
    write_outputs(rows, domains, table_dir, {"settings": record}, {"settings": record})
    console.print(escape(f"wrote {table_dir}/ (eval.md, eval.json)"), soft_wrap=True)
    return rows
