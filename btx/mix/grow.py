"""Grow or shrink a finished MoE: add domain experts trained from the same seed, or remove experts.

    btx merge --into MOE --add-expert NAME=DIR [--add-expert ...] --out DIR [--shared keep|average]
    btx merge --into MOE --remove-expert NAME [--remove-expert ...] --out DIR

`MOE` is any MoE btx reads, in any family's form: a btx merge or finetune, or one made by another
tool (mergekit's Mixtral, say). The output is the same form with the experts edited; everything
else is carried byte for byte.

Adding an expert
- Its dense FFN becomes one more expert in every layer (appended after the existing ones), copied
  file to file.
- Its router row in every layer, by any router init (btx/mix/router_fit.py for the three fitted ones):
  - `random`: normal, with the standard deviation of that layer's existing rows, so the new
    expert starts on their scale; reproducible from `router_seed`;
  - `zeros`;
  - `centroid`: the unit mean FFN input of its domain's validation tokens (`router_data`), scaled
    to the mean norm of the layer's existing rows;
  - `hidden`: the unit mean FFN input of its prompts minus that of its negative prompts (default:
    the prompts given for the other experts), scaled the same way;
  - `ridge`: DUME's closed form over every expert's validation tokens. Ridge refits *all* rows of
    every layer (a least-squares router is one solve over all experts; appending a row to a trained
    router would not be one), so it needs data for each expert; an expert named `seed` gets the
    mean of the domain rows, as in a merge.
  For the fitted inits, the hidden states come from the grown MoE itself, layer by layer: each
  layer's new rows are fitted on the states produced by the layers below as grown.
  Except with ridge, the existing rows are kept byte for byte.
- The shared (non-FFN) weights: `keep` (default) keeps the MoE's, so nothing the MoE learned is
  disturbed; `average` moves them towards the new experts' by `shared_weight` (default: each new
  expert weighs as much as each expert already there, `n_new / (E + n_new)`),
  `x <- (1 - w) x_moe + w mean(x_new)`. An expert trained with the shared layers frozen
  (`train.trainable: ffn`) has exactly the seed's shared weights; added with `keep` to an MoE whose
  experts were all trained that way, it computes exactly what it computed alone when routed to.
- It must come from the MoE's seed: same architecture and tokenizer files, and either a DONE.json
  lineage that leads to the MoE's seed, or shared weights close to the MoE's (relative distance
  below `MAX_SHARED_DISTANCE`; experts branched from one seed differ by a few percent, unrelated
  models by more than 100%). `allow_foreign` adds such an expert anyway.

Removing an expert (FlexOlmo's opt-out): its FFN and its router row go, everywhere; top_k is
lowered if fewer experts than k remain. Removing an expert that was just added gives back the
original checkpoint byte for byte (DONE.json aside, which records the lineage).

Shapes: E the MoE's experts, D the model width (a router is [E, D]).

The plan and its checks are btx/mix/grow_plan.py, the tensors btx/mix/grown_tensors.py; the
output is written by btx/mix/output.py, the writer a merge uses too (lock, free-space check,
atomic directory, streaming, tokenizer files, DONE.json).

Refused with one line, before anything is written: a dense or unknown `MOE`, an expert name
that exists already (or is given twice), an expert from another seed, removing every expert, and
an MoE whose router btx cannot extend (a `split` or `blend` merge, whose experts share router
rows or belong to no domain).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch
from rich.console import Console

from btx.errors import BtxError
from btx.io.manifest import read_done, relative_identities
from btx.mix.grow_plan import GrowPlan, plan_grow
from btx.mix.grown_tensors import GrownTensors
from btx.mix.options import SEED, EditOptions
from btx.mix.output import OutputNames, write_output
from btx.mix.router_fit import LayerStats, fit_routers, fitted_rows, hidden_targets
from btx.recipe.settings import given, pairs

GROW_OUTPUT = OutputNames(title="edit MoE", lock="this MoE output", what="the edited MoE")


class _GrowJob:
    """A planned grow as the writer sees it (btx.mix.output.OutputJob): the grown tensors, the
    fitted router rows, and what DONE.json records."""

    def __init__(self, plan: GrowPlan):
        self.plan, self.tensors = plan, GrownTensors(plan)

    def fit_routers(self, progress: bool, console) -> None:
        """centroid and hidden: the new experts' rows, on the scale of the kept ones; ridge: every row."""
        plan, o = self.plan, self.plan.options
        if not plan.sets:
            return
        new = [n.name for n in plan.new]
        if o.router_init == "ridge":
            rows, negative = [None if n == SEED else n for n in plan.out_cfg.expert_names], ()
        elif o.router_init == "centroid":
            rows, negative = new, ()
        else:
            rows, negative = hidden_targets(new, o.prompts, o.negative_prompts)

        def rows_for_layer(layer: int, stats: LayerStats) -> torch.Tensor:
            fresh = fitted_rows(o.router_init, stats, rows, negative=negative, ridge_lambda=o.ridge_lambda)
            if o.router_init == "ridge":  # one solve over all experts: no trained row survives it
                return fresh * o.router_scale
            old = plan.moe.get_btx(f"layers.{layer}.ffn.router.weight", torch.float32)[plan.keep]
            scale = float(old.norm(dim=1).mean()) if len(old) else 1.0
            return torch.cat([old, fresh * scale * o.router_scale])

        fit_routers(
            self.tensors,
            plan.out_cfg,
            plan.sets,
            rows_for_layer,
            init=o.router_init,
            device=o.router_device,
            progress=progress,
            console=console,
        )

    def manifest(self) -> dict:
        plan, into = self.plan, self.plan.moe.path
        moe_done = read_done(into) or {}
        added = [n.name for n in plan.new]
        return {
            "stage": "grow",
            "kind": "moe",
            "inputs": {
                "moe": {"path": str(into.resolve()), "experts": plan.names},
                **{n.name: {"path": str(n.path.resolve())} for n in plan.new},
            },
            "input_identities": relative_identities(plan.identities, plan.out),
            "added": added,
            "removed": plan.removed,
            "experts": plan.out_cfg.expert_names,
            "n_experts": plan.out_cfg.n_experts,
            "top_k": plan.out_cfg.top_k,
            "options": dataclasses.asdict(plan.options) | {"shared_weight": plan.shared_weight},
            **({"router_tokens": {st.name: st.tokens for st in plan.sets}} if plan.sets else {}),
            # the MoE's own history, then this step
            "lineage": [
                *(
                    moe_done.get("lineage")
                    or [{"stage": moe_done.get("stage"), "path": str(into.resolve()), "experts": plan.names}]
                ),
                {"stage": "grow", "added": added, "removed": plan.removed},
            ],
        }

    def close(self) -> None:
        self.plan.close()


def grow_moe(
    into: str | os.PathLike,
    out: str | os.PathLike,
    *,
    add: dict[str, str | os.PathLike] | None = None,
    remove: list[str] | None = None,
    options: EditOptions | None = None,
    force: bool = False,
    allow_foreign: bool = False,
    router_data: dict[str, str | os.PathLike] | None = None,
    progress: bool = True,
    console=None,
) -> dict:
    """Grow the MoE at `into` by experts (`add`: {name: dense expert dir}) and/or shrink it
    (`remove`: names), writing the result to `out`. Returns the DONE.json written into `out`.
    `router_data` ({expert: validation shard or prepared domain dir}) feeds the centroid and ridge
    inits (default: the shard beside each expert in its btx run directory)."""
    into, out = Path(into), Path(out)

    def open_job() -> _GrowJob:  # under the output's lock, with the exists / --force decision
        plan = plan_grow(
            into,
            {k: Path(v) for k, v in (add or {}).items()},
            list(remove or []),
            out,
            options or EditOptions(),
            force=force,
            allow_foreign=allow_foreign,
            router_data={k: Path(v) for k, v in (router_data or {}).items()},
        )
        return _GrowJob(plan)

    return write_output(out, GROW_OUTPUT, open_job, progress=progress, console=console)


def edit_command(args) -> int:
    """`btx merge --into MOE (--add-expert NAME=DIR | --remove-expert NAME)... --out DIR`."""
    if not args.out:
        raise BtxError("merge --into: give --out DIR for the edited MoE")
    manifest = grow_moe(
        args.into,
        args.out,
        add=pairs(args.add_expert, "--add-expert"),
        remove=args.remove_expert,
        options=EditOptions(**given(args, EditOptions)),
        force=args.force,
        allow_foreign=args.allow_foreign,
        router_data=pairs(args.router_data, "--router-data"),
        progress=not args.quiet,
    )

    Console().print(
        f"merge --into: {manifest['n_experts']} experts ({', '.join(manifest['experts'])}), top-{manifest['top_k']} "
        f"-> {args.out}: {manifest['bytes'] / 1e9:.2f} GB in {manifest['seconds']:.1f} s"
    )
    return 0
