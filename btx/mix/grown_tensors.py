"""The grown (or shrunk) MoE's tensors, produced one at a time (btx.mix.output.OutputTensors).

Whatever the output keeps unchanged is the stored bytes of its input, copied file to file by the
writer (a FileRange) whenever the output dtype is theirs: the kept experts, the new experts' dense
FFNs, and with `shared: keep` every shared tensor. The router keeps the MoE's rows of the kept
experts (cast to fp32 and back, which is exact, so they keep their bytes) and appends the new
experts' rows (random, zeros, or fitted); a ridge fit replaces every row.

Shapes (btx names): E output experts (K kept, then N new), F the expert width, D the model width;
gate/up [E, F, D], down [E, D, F], router [E, D]; a new expert's dense FFN is [F, D] / [D, F].
"""

from __future__ import annotations

import torch

from btx.io.layout import FileRange
from btx.io.reader import CheckpointReader
from btx.mix.grow_plan import GrowPlan
from btx.mix.router_fit import random_rows


class GrownTensors:
    """Each output tensor, from the MoE (kept experts, shared weights, router rows) and the new experts."""

    def __init__(self, plan: GrowPlan):
        self.plan = plan
        self.fitted: dict[int, torch.Tensor] = {}  # layer -> every output row [E, D] fp32 (fitted inits)

    def _file_range(self, reader: CheckpointReader, btx_name: str, row: int | None) -> FileRange | None:
        """The bytes of one stored tensor (row `row` of a stacked one), when they are the output
        tensor unchanged: one tensor per expert, or an expert's rows of a stacked tensor."""
        src = reader.plan[btx_name]
        if src.rule.layout == "expert":
            name, rows = src.hf_names[row], None
        elif src.rule.layout == "same":
            name = src.hf_names[0]
            rows = (row, row + 1) if row is not None else None
        else:
            return None  # half of a fused gate/up tensor: computed from it instead
        if reader.info(name).dtype != self.plan.dtype:
            return None
        return reader.file_range(name, rows)

    def stored(self, btx_name: str, e: int | None = None) -> FileRange | None:
        plan = self.plan
        if e is None:
            return self._file_range(plan.moe, btx_name, None) if plan.shared_weight == 0.0 else None
        if e < len(plan.keep):
            return self._file_range(plan.moe, btx_name, plan.keep[e])
        return self._file_range(plan.new[e - len(plan.keep)].reader, f"{btx_name}.weight", None)

    def expert(self, btx_name: str, e: int) -> torch.Tensor:
        plan = self.plan
        if e < len(plan.keep):
            return plan.moe.get_btx(btx_name)[plan.keep[e]].to(plan.dtype)
        return plan.new[e - len(plan.keep)].reader.get_btx(f"{btx_name}.weight").to(plan.dtype)

    def shared(self, btx_name: str) -> torch.Tensor:
        """The MoE's tensor, or with `shared: average`, x_moe moved towards the new experts' mean."""
        plan = self.plan
        if plan.shared_weight == 0.0:
            return plan.moe.get_btx(btx_name).to(plan.dtype)
        mean = plan.moe.get_btx(btx_name, torch.float32)
        new = torch.stack([n.reader.get_btx(btx_name, torch.float32) for n in plan.new]).mean(0)
        return mean.lerp_(new, plan.shared_weight).to(plan.dtype)

    def router(self, layer: int) -> torch.Tensor:
        plan, o = self.plan, self.plan.options
        name = f"layers.{layer}.ffn.router.weight"
        stored = plan.moe.info(plan.moe.plan[name].hf_names[0]).dtype
        if self.fitted:
            return self.fitted[layer].to(stored).to(plan.dtype)
        old = plan.moe.get_btx(name, torch.float32)
        rows = [old[plan.keep]]
        if plan.new:
            n, d = len(plan.new), old.shape[1]
            if o.router_init == "zeros":
                rows.append(torch.zeros(n, d))
            else:  # on the scale of the layer's trained rows unless told otherwise
                std = o.router_std if o.router_std is not None else float(old.std()) or 0.02
                rows.append(random_rows("btx-grow-router", o.router_seed, layer, n, d, std))
        return torch.cat(rows).to(stored).to(plan.dtype)

    def layer_experts(self, layer: int) -> dict[str, torch.Tensor]:
        plan, p = self.plan, f"layers.{layer}.ffn."
        out = {}
        for w in ("w1", "w3", "w2"):
            old = plan.moe.get_btx(p + w, torch.float32)[plan.keep]
            new = [n.reader.get_btx(f"{p}{w}.weight", torch.float32)[None] for n in plan.new]
            out[f"ffn.{w}"] = torch.cat([old, *new]).to(plan.dtype).float()
        for k in plan.moe.btx_names():  # a shared expert (Qwen2-MoE) stays as it is
            if k.startswith(p + "shared"):
                out[k.removeprefix(f"layers.{layer}.")] = plan.moe.get_btx(k, torch.float32)
        return out
