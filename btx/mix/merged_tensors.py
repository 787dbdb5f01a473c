"""The merged MoE's tensors, produced one at a time (btx.mix.output.OutputTensors).

`MergedTensors` builds each output tensor from the inputs named by the plan: an expert FFN is the
source tensor's bytes unchanged where possible (a FileRange the writer copies inside the kernel),
an averaged tensor is computed in fp32 row chunks into buffers reused from tensor to tensor, so
memory stays at one output tensor plus a few 32 MB working chunks whatever the model size.

Shapes (btx names): E experts, F the output's expert width, D the model width, G router row
groups (split chunks share their FFN's row); gate/up [E, F, D], down [E, D, F], router [E, D].
"""

from __future__ import annotations

import math

import torch

from btx.io.layout import FileRange, btx_shapes
from btx.io.reader import CheckpointReader
from btx.mix.merge_plan import MergeInput, MergePlan
from btx.mix.options import CHUNK_BYTES
from btx.mix.router_fit import random_rows


def _hf_name(reader: CheckpointReader, btx_name: str) -> str:
    """The HF tensor a dense source stores btx parameter `btx_name` as (through hf.KEY_TABLE)."""
    (name,) = reader.plan[btx_name].hf_names
    return name


class MergedTensors:
    """Produces each output tensor from the sources, in buffers reused from tensor to tensor.

    A produced tensor is valid until the next call (the writer writes it at once); callers that
    keep one must copy it.
    """

    def __init__(self, plan: MergePlan):
        self.plan = plan
        self.shapes = btx_shapes(plan.out_cfg)
        self.fitted: dict[int, torch.Tensor] = {}  # layer -> [G, D] fp32 (centroid, ridge, hidden)
        self._buffers: dict[str, torch.Tensor] = {}

    def _buffer(self, key: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
        nbytes = numel * dtype.itemsize
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < nbytes:
            buf = self._buffers[key] = torch.empty(nbytes, dtype=torch.uint8)
        return buf[:nbytes].view(dtype)

    def _output(self, shape: tuple[int, ...]) -> torch.Tensor:
        return self._buffer("out", math.prod(shape), self.plan.dtype).view(shape)

    def _read(self, inp: MergeInput, btx_name: str, r0: int, r1: int, key: str) -> torch.Tensor:
        """Rows [r0, r1) of a source tensor, in its stored dtype."""
        name = _hf_name(inp.reader, btx_name)
        info = inp.reader.info(name)
        buf = self._buffer(key, (r1 - r0) * (math.prod(info.shape[1:])), info.dtype)
        return inp.reader.read_into(name, buf, (r0, r1))

    def _fp32(self, key: str, like: torch.Tensor) -> torch.Tensor:
        return self._buffer(key, like.numel(), torch.float32).view(like.shape)

    @staticmethod
    def _row_step(shape: tuple[int, ...]) -> int:
        return max(1, (CHUNK_BYTES // 4) // max(1, math.prod(shape[1:])))

    def _copy_rows(self, inp: MergeInput, btx_name: str, r0: int, r1: int, dst: torch.Tensor, scale: float) -> None:
        """dst <- rows [r0, r1) of a source tensor times `scale`. Raw bytes when nothing changes."""
        name = _hf_name(inp.reader, btx_name)
        if scale == 1.0 and inp.reader.info(name).dtype == dst.dtype:
            inp.reader.read_into(name, dst, (r0, r1))
            return
        step = self._row_step(tuple(dst.shape))
        for a in range(r0, r1, step):
            b = min(r1, a + step)
            self._store(dst[a - r0 : b - r0], self._read(inp, btx_name, a, b, "in"), scale)

    def _store(self, dst: torch.Tensor, x: torch.Tensor, scale: float) -> None:
        if scale == 1.0:
            dst.copy_(x)  # a plain copy when the dtypes match, else one rounding
            return
        tmp = self._fp32("scaled", x)
        tmp.copy_(x).mul_(scale)
        dst.copy_(tmp)

    def shared(self, btx_name: str) -> torch.Tensor:
        """A tensor outside the experts: the weighted mean over the averaged sources, as a running
        mean in fp32: m <- m + (w_k / W_k)(x_k - m), W_k the weight seen so far (torch.lerp). Where
        the sources agree, x_k - m is exactly 0, so identical copies give back the original bit for
        bit."""
        shape = self.shapes[btx_name]
        out = self._output(shape)
        (first, w_first), *rest = self.plan.averaged
        if not rest:
            self._copy_rows(first, btx_name, 0, shape[0], out, 1.0)
            return out
        step = self._row_step(shape)
        for r0 in range(0, shape[0], step):
            r1 = min(shape[0], r0 + step)
            x0 = self._read(first, btx_name, r0, r1, "in")
            mean = self._fp32("mean", x0).copy_(x0)
            seen = w_first
            for inp, w in rest:
                seen += w
                x = self._fp32("x", x0).copy_(self._read(inp, btx_name, r0, r1, "in"))
                mean.lerp_(x, w / seen)
            out[r0:r1].copy_(mean)
        return out

    def expert(self, btx_name: str, e: int) -> torch.Tensor:
        """Expert e's gate (w1), up (w3) or down (w2) projection; `btx_name` is the stacked name."""
        shape = self.shapes[btx_name][1:]
        dense = f"{btx_name}.weight"  # the dense FFN parameter the expert comes from (CONTRACTS.md)
        ex = self.plan.experts[e]
        sources = self.plan.ffn_sources
        out = self._output(shape)
        if not btx_name.endswith(".w2"):  # gate/up [F, D]: pieces are row ranges
            pos = 0
            for s, f0, f1 in ex.pieces:
                self._copy_rows(sources[s], dense, f0, f1, out[pos : pos + f1 - f0], 1.0)
                pos += f1 - f0
            return out
        # down [D, F]: pieces are column ranges, scaled so that the routing sums stay right
        ffn_in = self.plan.seed.cfg.ffn_dim
        if len(ex.pieces) == 1 and ex.pieces[0][1:] == (0, ffn_in):  # a whole FFN: whole rows
            self._copy_rows(sources[ex.pieces[0][0]], dense, 0, shape[0], out, ex.down_scale)
            return out
        step = self._row_step((shape[0], ffn_in))
        for r0 in range(0, shape[0], step):
            r1 = min(shape[0], r0 + step)
            col = 0
            for s, f0, f1 in ex.pieces:
                x = self._read(sources[s], dense, r0, r1, "in")
                self._store(out[r0:r1, col : col + f1 - f0], x[:, f0:f1], ex.down_scale)
                col += f1 - f0
        return out

    def stored(self, btx_name: str, e: int | None = None) -> FileRange | None:
        """Where output tensor `btx_name` (expert `e` of a stacked one) already lies, byte for
        byte, in a source file: an expert that is one source FFN's rows, unscaled, or a mean over a
        single source, in the output dtype. The writer copies such bytes file to file. None when
        the tensor must be computed (`expert` / `shared`)."""
        if e is None:
            if len(self.plan.averaged) != 1:
                return None
            inp, name, rows = self.plan.averaged[0][0], btx_name, None
        else:
            ex = self.plan.experts[e]
            if len(ex.pieces) != 1:
                return None
            s, f0, f1 = ex.pieces[0]
            inp, name, rows = self.plan.ffn_sources[s], f"{btx_name}.weight", (f0, f1)
            if btx_name.endswith(".w2"):  # down [D, F]: only whole rows are contiguous
                if (f0, f1) != (0, self.plan.seed.cfg.ffn_dim) or ex.down_scale != 1.0:
                    return None
                rows = (0, self.shapes[btx_name][1])
        hf_name = _hf_name(inp.reader, name)
        if inp.reader.info(hf_name).dtype != self.plan.dtype:
            return None
        return inp.reader.file_range(hf_name, rows)

    def router(self, layer: int) -> torch.Tensor:
        """[E, D] router of `layer` in the output dtype: the row of each expert's group."""
        o, D = self.plan.options, self.plan.out_cfg.dim
        n_groups = len(self.plan.groups)
        if o.router_init == "zeros":
            rows = torch.zeros(n_groups, D)
        elif o.router_init == "random":
            rows = random_rows("btx-merge-router", o.router_seed, layer, n_groups, D, o.router_std)
        else:
            rows = self.fitted[layer]
        return rows[torch.tensor([e.group for e in self.plan.experts])].to(self.plan.dtype)

    def layer_experts(self, layer: int) -> dict[str, torch.Tensor]:
        """The layer's experts stacked in fp32, as they will be written."""
        out = {}
        for w in ("w1", "w3", "w2"):
            name = f"layers.{layer}.ffn.{w}"
            stacked = torch.empty(self.shapes[name], dtype=torch.float32)
            for e in range(self.plan.out_cfg.n_experts):
                stacked[e].copy_(self.expert(name, e))
            out[f"ffn.{w}"] = stacked
        return out
