"""Routers fitted to data for a merge: centroid, ridge and hidden.

The merged model is run layer by layer (`btx.mix.router_fit.walk`) over each domain's tokens (or
prompts); `_MergedWeights` hands the walk each layer's merged weights as they will be written, so
the routers of a layer are fitted on the states the layers below produce as merged.
"""

from __future__ import annotations

import torch

from btx.mix.merge_plan import _Plan
from btx.mix.mixer import _Mixer, _Progress
from btx.mix.options import SEED


class _MergedWeights:
    """The merged MoE's layers for btx.mix.router_fit.walk, produced by the mixer (fp32 copies)."""

    def __init__(self, plan: _Plan, mixer: _Mixer):
        self.plan, self.mixer, self.cfg = plan, mixer, plan.out_cfg

    def embed(self) -> torch.Tensor:
        return self.mixer.average("embed.weight").float().clone()

    def block(self, layer: int) -> dict[str, torch.Tensor]:
        p = f"layers.{layer}."
        names = [k for k in self.mixer.shapes if k.startswith(p) and ".ffn." not in k]
        return {k.removeprefix(p): self.mixer.average(k).to(torch.float32, copy=True) for k in names}

    def experts(self, layer: int) -> dict[str, torch.Tensor]:
        out = {}
        for w in ("w1", "w3", "w2"):
            name = f"layers.{layer}.ffn.{w}"
            stacked = torch.empty(self.mixer.shapes[name], dtype=torch.float32)
            for e in range(self.cfg.n_experts):
                stacked[e].copy_(self.mixer.expert(name, e))
            out[f"ffn.{w}"] = stacked
        return out


def _fit_routers(plan: _Plan, mixer: _Mixer, progress: bool, console=None) -> dict[str, int]:
    """Fill mixer.fitted with every layer's router by walking the merged model (btx.mix.router_fit);
    returns the tokens each set contributed."""
    from btx.mix.router_fit import (
        centroid_rows,
        hidden_rows,
        ridge_rows,
        shard_windows,
        walk,
    )

    o, cfg = plan.options, plan.out_cfg
    domains = [None if g.domain == SEED else g.domain for g in plan.groups]  # one per router row group
    if o.router_init == "hidden":
        sets = plan.prompt_sets
        names = [g.name for g in plan.groups]
        positive = [f"pos:{n}" if n in o.prompts else None for n in names]
        negative = [
            [f"neg:{n}"] if n in o.negative_prompts else [f"pos:{m}" for m in o.prompts if m != n]
            for n in names
        ]

        def rule(layer, stats):
            return hidden_rows(stats, positive, negative)
    else:
        sets = [shard_windows(d, shard, o.router_tokens, cfg.max_seq_len) for d, shard in plan.centroid_shards.items()]
        if o.router_init == "centroid":
            def rule(layer, stats):
                return centroid_rows(stats, domains)
        else:
            def rule(layer, stats):
                return ridge_rows(stats, domains, o.ridge_lambda)


    def router_for_layer(layer: int, stats) -> torch.Tensor:
        rows_GD = rule(layer, stats) * o.router_scale
        mixer.fitted[layer] = rows_GD
        # The next layer's input is computed with the router as written (rounded to the output dtype).
        return mixer.router(layer).to(plan.dtype).float()

    with _Progress(progress, f"{o.router_init} routers", cfg.n_layers, bytes_=False, console=console) as bar:
        walk(_MergedWeights(plan, mixer), sets, router_for_layer, need_gram=o.router_init == "ridge",
             device=o.router_device, on_layer=lambda i: bar.advance(1, f"layer {i}"))
    return {s.name: s.tokens for s in sets}
