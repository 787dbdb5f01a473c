"""The DeepSpeed engine of the training loop (`btx finetune`): ZeRO 0-3, bf16/fp16/fp32, offload.

It implements the `btx.train.engines.base.Engine` protocol, so `btx.train.loop.run_loop` drives it exactly as it
drives the accelerate engine; it knows nothing of steps, data, losses, logging or export. The
optimizer (AdamW, decay on matrices only) and the LR schedule are btx.train.engines.base's, shared with dense
training.

Why it looks the way it does
- Launchers: under `deepspeed`, `torchrun` or `accelerate launch` the rendezvous variables are
  set. A single process started without one (tests, `btx finetune` on a laptop) gets those of a
  world of one for the life of the engine; without them DeepSpeed tries MPI discovery and fails.
- CPU: DeepSpeed's CPU accelerator JIT-compiles a shared-memory all-reduce op on its first
  `init_distributed` (26 s, and a crash without a compiler). Training does not need it, so it is
  skipped; collectives run on gloo.
- Optimizer: a plain `torch.optim.AdamW` goes in (DeepSpeed's FusedAdam/CPUAdam JIT-compile for
  ~40 s); with ZeRO-Offload that needs `zero_force_ds_cpu_optimizer: false`. It holds only the
  parameters that require grad, so frozen ones carry no optimizer state.
- Grad accumulation: DeepSpeed counts micro-batches itself and reduces gradients at the boundary.
  The loop calls `backward` once per micro-batch and `step` once per optimizer step; `backward`
  advances DeepSpeed's micro-step counter between boundaries, so both counts agree. DeepSpeed
  divides each micro-batch loss by grad_accum, as the protocol asks.
- Checkpoints are DeepSpeed's own (module, ZeRO partitions of the optimizer, scheduler) with the
  loop's `client_state`. Every rank writes into one hidden sibling directory that rank 0 renames
  into place after a barrier: a killed run never leaves a directory that looks finished (the loop
  removes `.step-*` leftovers when it resumes; a save that fails, a full disk say, removes its own).
- Resume never unpickles: DeepSpeed's loader would `torch.load(weights_only=False)` its files, so
  `load` hands it a checkpoint engine that loads them with `weights_only=True`, allowing only the
  few plain DeepSpeed classes its optimizer states hold (`SAFE_GLOBALS`: a loss-scaler record, the
  ZeRO stage enum, a tensor-fragment address). A file holding anything else is refused with one
  line. The loop also resumes only from checkpoints whose files it recorded at save (sha256 of
  each, btx.train.job.CKPT_MANIFEST), so a damaged or swapped file is never read.
- Every ZeRO-3 job, dense or MoE, builds its model sharded (`build_sharded_model`:
  `deepspeed.zero.Init`, then filled from the checkpoint, or with the from-scratch init, one
  parameter at a time), so no rank ever holds the whole model.
- Memory at ZeRO-3 in fp32: the optimizer's master partition shares the module's instead of
  DeepSpeed's copy of it (btx.train.engines.zero3_master). On the CPU, a ZeRO-3 job's freed tensors
  of 1 MiB or more leave the process (btx.train.engines.host_memory): glibc would keep them resident.
- Export: `exported_weights` takes each trained parameter from the optimizer's fp32 master copy
  (the bf16 module only holds its rounding), gathered one layer at a time as the main rank's
  writer asks for it, so that the export streams to disk without a whole copy on any rank.
- Every engine of a process shares one process group; the last one to close tears it down.
- Stacked expert weights (`w1[E,F,D]`, ...) are single parameters of the MoE layer, so ZeRO-3
  gathers and reduces them whether or not an expert received tokens: no rank waits on a
  collective that another rank skipped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import importlib
import os
import pickle
import shutil
import socket
from pathlib import Path

import torch
import torch.distributed as dist

# deepspeed itself is imported inside the functions that use it: importing it takes seconds and probes
# the accelerator, and dense training, merges and evals load this module without using DeepSpeed.
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

from btx.errors import BtxError
from btx.io.atomic import fsync_dir, fsync_tree
from btx.io.reader import CheckpointReader
from btx.model.transformer import Transformer
from btx.train.engines.base import (
    make_optimizer,
    make_scheduler,
    mixed_precision,
)
from btx.train.engines.host_memory import keep_freed_memory_returned
from btx.train.engines.zero3_master import release_zero3_references, share_fp32_master

_live_engines = 0  # engines in this process that still need the process group (see `close`)
_env_added: dict[str, str] = {}  # rendezvous variables btx set for a world of one (see `init_distributed`)
_TAG = "deepspeed"  # the one checkpoint tag inside a step directory: <step-N>/deepspeed/...
PRECISIONS = {"no": "fp32", "bf16": "bf16", "fp16": "fp16"}  # accelerate's names -> DeepSpeed's

# Without CUDA, DeepSpeed's accelerator detection falls back to the CPU with a warning on every
# import ("Setting accelerator to CPU..."); naming the CPU ourselves is the same choice, quietly.
# A user's own DS_ACCELERATOR wins.
if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
    os.environ["DS_ACCELERATOR"] = "cpu"


def safe_globals() -> list:
    """The classes DeepSpeed's checkpoints hold besides tensors and containers (found by loading
    ZeRO 0-3 checkpoints with weights_only=True): plain records and an enum, no code runs when
    they are rebuilt."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def load_weights_only(path: str, map_location=None):
    """torch.load of a DeepSpeed checkpoint file without unpickling anything but tensors,
    containers and `safe_globals()`; BtxError for a file that holds anything else."""

    try:
        with torch.serialization.safe_globals(safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        found = next((line.strip() for line in str(e).splitlines() if "GLOBAL" in line), " ".join(str(e).split())[:200])
        raise BtxError(
            f"{path}: holds a Python object btx does not unpickle ({found[:200]}); btx resumes only "
            "from checkpoints it can read with weights_only=True; pass --force to start over"
        ) from None


def on_gpu() -> bool:
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name() != "cpu"


def _world_of_one_env() -> dict[str, str]:
    """Set the rendezvous variables of a world of one when no launcher did; returns what was
    added, which the engine removes when it closes, so later jobs and child processes start clean."""
    if "RANK" in os.environ or "OMPI_COMM_WORLD_RANK" in os.environ:
        return {}  # a launcher (deepspeed, torchrun, accelerate, mpirun) is in charge
    with socket.socket() as s:  # a free port, so concurrent processes do not collide
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    wanted = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    added = {k: v for k, v in wanted.items() if k not in os.environ}
    os.environ.update(added)
    return added


def _remove_env(added: dict[str, str]) -> None:
    for key, value in added.items():
        if os.environ.get(key) == value:
            del os.environ[key]


def init_distributed() -> None:
    """Start the process group DeepSpeed uses (nccl on GPUs, gloo on CPU) unless one is up."""
    import deepspeed
    from deepspeed.utils import groups

    global _env_added
    if dist.is_available() and dist.is_initialized():
        return
    if not on_gpu():
        # Skip the shared-memory all-reduce op: a slow JIT build that training does not need.
        # (`import deepspeed.comm.torch as m` would bind the torch package, hence importlib.)
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    # DeepSpeed caches its copy of the world group; one from an earlier, torn-down process group
    # (an earlier engine, or accelerate's end_training, in this process) must not be reused.
    groups._WORLD_GROUP = None
    _env_added = _world_of_one_env()
    try:
        deepspeed.init_distributed(dist_backend=None if on_gpu() else "gloo", verbose=False)
    except BaseException:
        _remove_env(_env_added)
        raise


def release_idle_world() -> None:
    """Tear down the process group and the rendezvous variables btx set, when no engine of this
    process uses them: after the last engine closes, or when a job fails between a sharded build
    (which starts the group) and its engine. Later jobs and child processes then start clean."""
    if _live_engines == 0:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        _remove_env(_env_added)


def deepspeed_config(
    settings, *, zero_stage: int, offload_optimizer: bool, precision: str, world_size: int, dim: int
) -> dict:
    """The DeepSpeed config for a TrainSection (batch_size per rank, grad_accum, grad_clip) plus
    the finetune section's ZeRO settings; `precision` is resolved (fp32 | bf16 | fp16); `dim` is
    the model's hidden size, which sizes ZeRO-3's buffers (`stage3_buffers`)."""
    zero: dict = {"stage": zero_stage, **(stage3_buffers(dim) if zero_stage == 3 else {})}
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu()}
    config = {
        "train_micro_batch_size_per_gpu": settings.batch_size,
        "gradient_accumulation_steps": settings.grad_accum,
        "train_batch_size": settings.batch_size * settings.grad_accum * world_size,
        "gradient_clipping": 0.0 if _clips_itself(zero_stage, precision) else settings.grad_clip,
        "zero_optimization": zero,
        # btx hands in a torch AdamW; ZeRO-Offload would otherwise insist on DeepSpeed's CPUAdam.
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**62,  # btx logs; DeepSpeed stays quiet
    }
    if precision == "bf16":
        config["bf16"] = {"enabled": True}
    elif precision == "fp16":
        config["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    return config


def stage3_buffers(dim: int) -> dict:
    """ZeRO-3's buffers sized by the model rather than by DeepSpeed's defaults, which are sized for
    GPUs and models of billions of parameters and, below that, hold more than the shards save:
    - a gradient bucket of 5e8 elements whatever the model (2 GB in fp32, filled up to the whole
      model's gradients before it is reduced): here dim^2, with the prefetch bucket 0.9 dim^2 and
      parameters under 10 dim kept whole, the rules of the "auto" values of transformers and
      accelerate;
    - parameters used again within 1e9 elements stay gathered from the forward to the backward,
      which for a model under 1B parameters is every one of them, a whole copy on every rank:
      here about two layers' worth (24 dim^2), and as many live at once;
    - one optimizer sub-group of up to 1e9 elements, whose fp32 gradient buffer is then a whole
      partition beside the partition's own gradients: here sub-groups of about two layers.
    """
    layers = 24 * dim * dim
    return {
        "reduce_bucket_size": dim * dim,
        "stage3_prefetch_bucket_size": int(0.9 * dim * dim),
        "stage3_param_persistence_threshold": 10 * dim,
        "stage3_max_live_parameters": layers,
        "stage3_max_reuse_distance": layers,
        "sub_group_size": layers,
    }


def resolve_precision(settings) -> str:
    """A TrainSection's `precision` as DeepSpeed runs it: auto -> bf16 where the device has it."""
    return PRECISIONS[mixed_precision(settings.precision, "cuda" if on_gpu() else "cpu")]


def build_sharded_model(job, *, offload_optimizer: bool = False):
    """The starting model of any ZeRO-3 job, dense or MoE, with every parameter partitioned over
    the ranks as it is created (`deepspeed.zero.Init`), then filled one parameter at a time:
    from the init checkpoint (read by rank 0 with plain reads, `CheckpointReader.read_btx`), or,
    from scratch, with what `btx.train.engines.base.build_model` would draw (rank 0 runs
    `Transformer.init_parameter` in the same order with the same generator).

    No rank ever holds the whole model: host memory is bounded by the largest parameter, where
    `build_model` would hold the full fp32 model on every rank (~80 GB for 4 x 7B)."""

    import deepspeed

    if not on_gpu():
        # Freed tensors leave the resident set (btx.train.engines.host_memory). Only ZeRO-3 jobs,
        # which allocate and free gathered layers and full gradients all the time: elsewhere the
        # page faults of each new large tensor would cost time for no memory that matters.
        keep_freed_memory_returned()
    init_distributed()
    writer = dist.get_rank() == 0
    with contextlib.ExitStack() as stack:
        if job.init_from is not None:
            reader = stack.enter_context(CheckpointReader(job.init_from))
            cfg, source = reader.cfg, str(job.init_from)
        else:
            if job.model_config is None:
                raise BtxError(f"train {job.name}: give init_from (a checkpoint) or model_config (from scratch)")
            reader, cfg, source = None, job.model_config, "initial weights"
        cfg = dataclasses.replace(cfg, **job.config_overrides)
        config = deepspeed_config(
            job.settings,
            zero_stage=3,
            offload_optimizer=offload_optimizer,
            precision=resolve_precision(job.settings),
            world_size=dist.get_world_size(),
            dim=cfg.dim,
        )
        with deepspeed.zero.Init(config_dict_or_path=config):
            model = Transformer(cfg)
        generator = torch.Generator().manual_seed(job.settings.seed)
        params = list(model.named_parameters())
        progress = stack.enter_context(_progress(writer))
        task = progress.add_task(f"loading {source} (ZeRO-3 shards)", total=len(params))
        for name, param in params:
            # Rank 0 writes the full parameter; leaving the context broadcasts and re-partitions it.
            with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                if writer:
                    if reader is not None:
                        value = reader.read_btx(name, torch.float32)
                    else:  # drawn in fp32, as build_model draws it, whatever dtype ZeRO holds
                        value = torch.empty(param.shape, dtype=torch.float32)
                        model.init_parameter(name, value, generator=generator)
                    param.data.copy_(value)
                    del value
            progress.advance(task)
    return model


def _export_group(name: str) -> str:
    """What `exported_weights` gathers together: a layer ("layers.3"), or one top-level parameter."""
    head, _, rest = name.partition(".")
    return f"{head}.{rest.partition('.')[0]}" if head == "layers" else name


def _progress(enabled: bool):

    console = Console(stderr=True)
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=not (enabled and console.is_terminal),
        transient=True,
    )


def _clips_itself(zero_stage: int, precision: str) -> bool:
    """ZeRO-0 in fp32 clips through torch but throws the norm away, so btx clips there itself."""
    return zero_stage == 0 and precision == "fp32"


class DeepSpeedEngine:
    """A btx Transformer under `deepspeed.initialize`, behind the loop's engine protocol.

    make_engine = lambda model, job: DeepSpeedEngine(model, job.settings, zero_stage=3)
    run_loop(job, make_engine)
    """

    def __init__(self, model: torch.nn.Module, settings, *, zero_stage: int = 0, offload_optimizer: bool = False):
        import deepspeed

        if not 0 <= zero_stage <= 3:
            raise BtxError(f"zero_stage: must be 0, 1, 2 or 3, got {zero_stage}")
        self.precision = resolve_precision(settings)
        self.zero_stage, self.grad_clip = zero_stage, settings.grad_clip
        global _live_engines
        init_distributed()
        _live_engines += 1
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.is_main = self.rank == 0
        optimizer = make_optimizer(model.parameters(), settings)  # leaves frozen parameters out
        self.ds, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            # built on DeepSpeed's wrapper of the optimizer, stepped by DeepSpeed, saved in its checkpoints
            lr_scheduler=lambda wrapped: make_scheduler(wrapped, settings),
            config=deepspeed_config(
                settings,
                zero_stage=zero_stage,
                offload_optimizer=offload_optimizer,
                precision=self.precision,
                world_size=self.world_size,
                dim=model.cfg.dim,
            ),
            dist_init_required=False,
        )
        self.device = self.ds.device
        # In fp32 the ZeRO-3 master partition would be a copy of the module's (btx.train.engines.zero3_master).
        self.master_not_shared = share_fp32_master(self.ds.optimizer) if zero_stage == 3 else "not ZeRO-3"
        if zero_stage == 3 and self.precision == "fp32" and not offload_optimizer and self.master_not_shared:
            if self.is_main:
                Console(stderr=True).print(
                    f"[yellow]ZeRO-3: the fp32 master weights stay a copy ({self.master_not_shared})[/]", soft_wrap=True
                )
        if zero_stage == 0 and self.world_size == 1:
            # A world of one has nothing to all-reduce; DeepSpeed would still flatten every
            # gradient into buckets and copy it back after a no-op collective.
            self.ds.enable_backward_allreduce = False

    @property
    def model(self):
        return self.ds

    @property
    def unwrapped(self):
        return self.ds.module

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch's mean loss (DeepSpeed divides it by grad_accum)."""
        self.ds.backward(loss)
        if not self.ds.is_gradient_accumulation_boundary():
            self.ds.step()  # between boundaries this only advances DeepSpeed's micro-step count

    def step(self) -> float | None:
        """Clip, optimizer step, scheduler step, zero grads; the global grad norm before clipping."""
        if not self.ds.is_gradient_accumulation_boundary():
            raise RuntimeError("DeepSpeedEngine.step() before the last micro-batch of the accumulation")
        if _clips_itself(self.zero_stage, self.precision):  # gradients are all-reduced by now
            params = [p for p in self.ds.module.parameters() if p.grad is not None]
            norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip if self.grad_clip > 0 else float("inf"))
            self.ds.step()
            return float(norm)
        self.ds.step()
        norm = self.ds.get_global_grad_norm()
        return None if norm is None else float(norm)

    @property
    def lr(self) -> float:
        return float(self.ds.get_lr()[0])

    def save(self, directory: str | os.PathLike, client_state: dict) -> None:
        """Collective: a DeepSpeed checkpoint in `directory`, which appears once every rank wrote."""

        final = Path(directory)
        partial = final.parent / f".{final.name}.partial"  # one name for every rank (not per pid)
        if self.is_main:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        dist.barrier()
        try:
            self.ds.save_checkpoint(str(partial), tag=_TAG, client_state=client_state, save_latest=False)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)  # a full disk, say: leave nothing half-written
            raise
        dist.barrier()  # every rank's files are written
        if self.is_main:
            fsync_tree(partial)
            if final.exists():  # a re-save of the same step replaces it
                shutil.rmtree(final)
            os.rename(partial, final)
            fsync_dir(final.parent)
        dist.barrier()

    def load(self, directory: str | os.PathLike) -> dict:
        """Collective: restore module, optimizer and scheduler; returns the loop's client_state.
        Every file is read with weights_only=True (`load_weights_only`), never unpickled."""
        checkpoint_engine = self.ds.checkpoint_engine
        checkpoint_engine.load = load_weights_only  # this instance only: DeepSpeed's loaders all go through it
        try:
            path, client_state = self.ds.load_checkpoint(
                str(directory), tag=_TAG, load_optimizer_states=True, load_lr_scheduler_states=True
            )
        except BtxError:
            raise
        except (RuntimeError, ValueError, AssertionError, KeyError, OSError) as e:
            raise BtxError(
                f"{directory}: cannot resume from this DeepSpeed checkpoint ({' '.join(str(e).split())[:300]}); "
                "resume with the zero_stage and number of processes that wrote it, or pass --force"
            ) from None
        finally:
            del checkpoint_engine.load
        if path is None:
            raise BtxError(f"{directory}: no DeepSpeed checkpoint inside (expected {Path(directory) / _TAG}/)")
        return client_state or {}

    @contextlib.contextmanager
    def exported_weights(self):
        """Collective for the life of the context: on the main rank a function that returns the
        full fp32 weight (CPU) of a btx parameter, None on the other ranks.

        Trained parameters come from the optimizer's fp32 master copy (the bf16 module only holds
        its rounding), frozen ones from the module. Nothing holds the whole model: the main rank
        gathers one group at a time (a layer's parameters, or one top-level parameter), in
        whatever order its writer asks for them, and keeps only that group; every other rank
        joins each gather until the main rank leaves the context.
        """
        params = dict(self.ds.module.named_parameters())
        groups: dict[str, list[str]] = {}
        for name in params:
            groups.setdefault(_export_group(name), []).append(name)
        order = list(groups)
        masters = self._stage0_masters()

        def gather(index: int) -> dict[str, torch.Tensor]:
            return {name: self._full_fp32(params[name], masters) for name in groups[order[index]]}

        if not self.is_main:
            while (index := self._export_request()) >= 0:
                gather(index)
            yield None
            return
        held: dict[str, torch.Tensor] = {}

        def weight(name: str) -> torch.Tensor:
            nonlocal held
            if name not in held:
                held = {}  # the previous group goes before the next one is gathered
                index = order.index(_export_group(name))
                self._export_request(index)
                held = gather(index)
            return held[name]

        try:
            yield weight
        finally:
            self._export_request(-1)  # the other ranks stop serving

    def _export_request(self, index: int | None = None) -> int:
        """The main rank's next group for `exported_weights` (-1: done), sent to every rank."""
        message = torch.tensor([-1 if index is None else index], dtype=torch.int64, device=self.device)
        dist.broadcast(message, src=0)
        return int(message.item())

    def _full_fp32(self, param: torch.Tensor, masters: dict) -> torch.Tensor | None:
        """Collective: one parameter's full fp32 weight on the main rank's CPU, None elsewhere."""
        import deepspeed
        from deepspeed.utils import safe_get_full_fp32_param

        full = safe_get_full_fp32_param(param) if param.requires_grad else None  # collective
        if full is None and hasattr(param, "ds_id"):  # ZeRO-3 and frozen: gather the module's copy
            with deepspeed.zero.GatheredParameters([param]):
                full = param.detach().clone() if self.is_main else None
        elif full is None:
            full = masters.get(param, param)
        return full.detach().to("cpu", torch.float32, copy=True) if self.is_main else None

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Collective: the full fp32 weights on the main rank (None elsewhere), all at once;
        the export streams through `exported_weights` instead."""
        with self.exported_weights() as weight:
            if weight is None:
                return None
            return {name: weight(name) for name, _ in self.ds.module.named_parameters()}

    def _stage0_masters(self) -> dict:
        """ZeRO-0 in bf16/fp16 keeps the fp32 masters in parallel lists of its wrapper optimizer."""
        opt = self.ds.optimizer
        if not hasattr(opt, "fp16_groups") or not hasattr(opt, "fp32_groups"):
            return {}
        return {p: m for low, high in zip(opt.fp16_groups, opt.fp32_groups) for p, m in zip(low, high)}

    def close(self) -> None:
        """Free the engine (module, optimizer, scheduler), then tear the process group down
        unless another engine of this process still uses it."""

        global _live_engines
        if getattr(self, "ds", None) is None:
            return  # closed already
        self.ds.destroy()
        release_zero3_references(self.ds.module)  # else DeepSpeed's module-level state keeps the engine alive
        self.ds = self.optimizer = self.scheduler = None
        gc.collect()  # nothing of the engine may outlive the process group
        _live_engines -= 1
        release_idle_world()
