"""The one writer of a merge's and a grow's output checkpoint.

A merge (btx/mix/merge.py) and a grow (btx/mix/grow.py) each plan their output, produce its
tensors and say what their DONE.json records (an `OutputJob`); `write_output` does the rest, the
same way for both:

- Locking: the output's lock (btx.io.locks.output_lock) is held from the plan's "exists /
  --force" check to the final rename, so two writers into one output cannot both succeed; the
  second stops with one line naming the first one's pid and host.
- Space: the free space is checked before routers are fitted or a byte is written, and a disk that
  fills up anyway is reported as one line (btx.io.disk).
- Atomic: the directory is built in a hidden temporary sibling, fsynced, and renamed into place
  with its DONE.json already inside, so a killed writer leaves nothing that looks finished.
- Streaming: tensors go through btx.io.writer.write_checkpoint (header first, then each tensor
  produced, written and dropped); a tensor whose bytes already lie in an input (`stored`, a
  FileRange) is copied file to file, inside the kernel. The tokenizer files come from the input
  the plan names.
- Reproducible: the same plan gives the same bytes (a fixed tensor order, routers from seeds, no
  timestamps inside the safetensors files).

Tensors are produced in btx names (btx/io/layout.py, docs/CONTRACTS.md) and stored under the
family's HF names. Shapes: E experts, F an expert's FFN width, D the model width;
`layers.{i}.ffn.w1` / `w3` are [E, F, D], `w2` is [E, D, F], the router `layers.{i}.ffn.router.weight`
is [E, D]; `fitted` router rows are [rows, D], one per router row before any expansion to experts.

Test hook: BTX_MERGE_TEST_DELAY=<seconds> sleeps after every written tensor, so a test can kill a
writer half-way.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import torch

from btx.io.atomic import atomic_dir, fsync_tree
from btx.io.disk import disk_errors, ensure_free_space
from btx.io.layout import FileRange, TensorSpec, build_hf_tensor, hf_layout
from btx.io.locks import output_lock
from btx.io.manifest import write_done
from btx.io.writer import write_checkpoint
from btx.mix.options import TEST_DELAY_ENV
from btx.mix.progress import Progress
from btx.model.config import ModelConfig


class OutputTensors(Protocol):
    """The output's tensors in btx names, each produced when asked for.

    A produced tensor may live in a buffer reused by the next call: callers that keep one copy it."""

    fitted: dict[int, torch.Tensor]  # layer -> fitted router rows [rows, D] fp32 (btx.mix.router_fit)

    def stored(self, btx_name: str, e: int | None = None) -> FileRange | None:
        """Where the tensor (expert `e` of a stacked one) lies byte for byte in an input; None when
        it must be computed."""

    def expert(self, btx_name: str, e: int) -> torch.Tensor:
        """Expert `e` of a stacked FFN tensor, in the output dtype."""

    def shared(self, btx_name: str) -> torch.Tensor:
        """A tensor outside the routed experts (attention, norms, embeddings), in the output dtype."""

    def router(self, layer: int) -> torch.Tensor:
        """Layer `layer`'s router [E, D] in the output dtype."""

    def layer_experts(self, layer: int) -> dict[str, torch.Tensor]:
        """The layer's expert tensors as written, stacked, in fp32 ("ffn.w1", ...; a shared expert
        too): what btx.mix.router_fit.walk routes through."""


class OutputPlan(Protocol):
    """What a plan decided about its output checkpoint."""

    out_cfg: ModelConfig
    dtype: torch.dtype
    shard_size: int | str
    force: bool  # replace what is there
    tokenizer_from: Path | None  # the input whose tokenizer files the output carries


class OutputJob(Protocol):
    """A planned merge or grow, as the writer sees it."""

    plan: OutputPlan
    tensors: OutputTensors

    def fit_routers(self, progress: bool, console) -> None:
        """Fill tensors.fitted where the router init is fitted to data; nothing otherwise."""

    def manifest(self) -> dict:
        """What DONE.json records about the job; the writer adds outputs, bytes and seconds."""

    def close(self) -> None:
        """Release the inputs, and anything the job runs beside the write."""


@dataclass(frozen=True)
class OutputNames:
    """How one kind of output is named where a user sees it."""

    title: str  # the progress bar's title: "merge"
    lock: str  # what a second writer is told is in use: "this merge output"
    what: str  # what a disk-space message says is being written: "the merged checkpoint"


def tensor_specs(tensors: OutputTensors, cfg: ModelConfig, dtype: torch.dtype) -> list[TensorSpec]:
    """Every output tensor, by HF name through the family's key table, in checkpoint order."""

    def piece(name: str, e: int | None):
        if name.endswith(".ffn.router.weight"):
            return tensors.router(int(name.split(".")[1]))
        if e is not None:
            return tensors.stored(name, e) or tensors.expert(name, e)
        return tensors.stored(name) or tensors.shared(name)

    return [TensorSpec(t.name, t.shape, dtype, lambda t=t: build_hf_tensor(t, piece, dtype)) for t in hf_layout(cfg)]


def write_output(
    out: Path, names: OutputNames, open_job: Callable[[], OutputJob], *, progress: bool, console=None
) -> dict:
    """Plan the job (`open_job`, under the output's lock), fit its routers, write its checkpoint to
    `out` with its DONE.json, and return that DONE.json."""
    started = time.monotonic()
    with output_lock(out, names.lock):
        job = open_job()
        try:
            specs = tensor_specs(job.tensors, job.plan.out_cfg, job.plan.dtype)
            size = sum(math.prod(s.shape) * s.dtype.itemsize for s in specs)
            what = f"{names.what} {out}"
            ensure_free_space(out.parent, size, what)  # before the routers, which can take a while
            with disk_errors(out.parent, size, what):
                job.fit_routers(progress, console)
                with Progress(progress, names.title, size, console=console) as bar:
                    return _stream(job, specs, out, bar, started)
        finally:
            job.close()


def _stream(job: OutputJob, specs: list[TensorSpec], out: Path, bar: Progress, started: float) -> dict:
    plan = job.plan
    delay = float(os.environ.get(TEST_DELAY_ENV, 0) or 0)

    def on_tensor(name: str, nbytes: int) -> None:
        bar.advance(nbytes, name)
        if delay:
            time.sleep(delay)

    # The stream is bound by I/O; its elementwise work runs fastest on one thread, and leaves the
    # other cores to hashing and the kernel's writeback. (torch's intra-op threads synchronise on
    # every op: on a busy machine two of them run several times slower.)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with atomic_dir(out, force=plan.force) as tmp:
            outputs = write_checkpoint(
                tmp,
                plan.out_cfg,
                specs,
                shard_size=plan.shard_size,
                tokenizer_from=plan.tokenizer_from,
                atomic=False,
                on_tensor=on_tensor,
            )
            fsync_tree(tmp)  # the seconds below include making the bytes durable
            manifest = job.manifest()
            manifest |= {
                "outputs": outputs,
                "bytes": sum((tmp / f).stat().st_size for f in outputs),
                "seconds": round(time.monotonic() - started, 3),
            }
            write_done(tmp, manifest)  # inside the temporary: the directory appears with it
    finally:
        torch.set_num_threads(threads)
    return manifest
