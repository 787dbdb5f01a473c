"""ZeRO-3's host memory: in fp32 the optimizer's master partition shares the module's partition
instead of copying it, and a closed engine leaves nothing behind.

DeepSpeed's ZeRO-3 optimizer holds, per optimizer sub-group, the module's flat partition
(`fp16_partitioned_groups_flat`, named for mixed precision, fp32 when training in fp32) and the
optimizer's master partition (`fp32_partitioned_groups_flat`), made as a `.to(fp32).clone()` of
it. In bf16/fp16 the master holds what the module's rounding loses and is needed. In fp32 it is an
exact duplicate: 4 bytes per trained parameter over N ranks, a quarter of the sharded model state
(weights 4, master 4, gradients 4, AdamW's moments 8, all / N). DeepSpeed means to share the two
when their dtype and device agree (its torch-autocast case, `_create_fp32_partitions`), but it
compares `tensor.device` with the string "cpu", which torch 2.x answers False, so on the CPU it copies.

`share_fp32_master` makes each master tensor a view of its module partition after
`deepspeed.initialize` (`master.data = module_partition`: the master keeps its identity, which the
torch optimizer's param groups and state are keyed by), and the copy is freed. From then on
DeepSpeed's own writes act on one storage: the optimizer step updates the master in place, its
copy of the master into the module partition (`_reassign_or_swap_out_partitioned_parameters`)
copies a tensor onto itself, a checkpoint load copies into the master and then master -> module
partition. Values never differ from the stock path's, so losses are bit-identical
(tests/test_zero3_master.py: storage shared, losses and exports equal to the stock path's, save
and resume).

Invariants: sharing happens only on the DeepSpeed versions tested (`TESTED_DEEPSPEED`), with the
optimizer neither offloaded nor swapped, before the optimizer holds any state, and only when every
sub-group's master is an fp32 tensor on the module partition's device with its shape and equal to
it; otherwise nothing is changed (the stock copies stay: bf16, fp16, offload, another DeepSpeed)
and the reason is returned. A DeepSpeed whose internals moved therefore costs memory, never
correctness.

`release_zero3_references` runs when an engine closes. DeepSpeed 0.19's ZeRO-3 keeps two references
that `destroy` leaves: its module-level stack of running modules (`FWD_MODULE_STACK`) keeps the
model, and an unbounded `functools.lru_cache` on a coordinator method (`__params_to_release`, keyed
by the coordinator, a submodule and the step) keeps the coordinator and through it the parameters;
either keeps the whole engine (partitions, gradients, moments) alive for the rest of the process,
which for a process that runs several jobs (a pipeline, the tests) is that much more per job.
Dropping the model from that stack and clearing that cache only forgets what a new forward computes
again.
"""

from __future__ import annotations

import importlib

import torch

TESTED_DEEPSPEED = ("0.19.",)  # version prefixes whose ZeRO-3 optimizer internals this module was checked against


def share_fp32_master(zero_optimizer) -> str | None:
    """Make every fp32 master partition of a ZeRO-3 optimizer share its module partition's storage.
    Returns None when they share it (now or already), else why the stock copies stay."""
    import deepspeed
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    if not isinstance(zero_optimizer, DeepSpeedZeroOptimizer_Stage3):
        return f"not a ZeRO-3 optimizer ({type(zero_optimizer).__name__})"
    if not deepspeed.__version__.startswith(TESTED_DEEPSPEED):
        return f"DeepSpeed {deepspeed.__version__} is untested (tested: {', '.join(TESTED_DEEPSPEED)}x)"
    if getattr(zero_optimizer, "offload_optimizer", True) or getattr(zero_optimizer, "swap_optimizer", True):
        return "the optimizer is offloaded"
    modules = getattr(zero_optimizer, "fp16_partitioned_groups_flat", None)
    masters = getattr(zero_optimizer, "fp32_partitioned_groups_flat", None)
    inner = getattr(zero_optimizer, "optimizer", None)
    if not isinstance(modules, list) or not isinstance(masters, list) or len(modules) != len(masters) or not masters:
        return "DeepSpeed's flat partitions are not where btx expects them"
    if getattr(inner, "state", None):
        return "the optimizer already holds state"
    for module, master in zip(modules, masters):  # every check before anything changes
        if not isinstance(module, torch.Tensor) or not isinstance(master, torch.Tensor):
            return "a sub-group's partition is not in memory"
        if module.dtype != torch.float32 or master.dtype != torch.float32:
            return f"the module partition is {module.dtype}: the master is not a duplicate"
        if module.device != master.device or module.shape != master.shape:
            return "a master partition differs from its module partition in device or shape"
        if master.data_ptr() != module.data_ptr() and not torch.equal(master, module):
            return "a master partition does not hold its module partition's values"
    for module, master in zip(modules, masters):
        if master.data_ptr() != module.data_ptr():
            master.data = module  # a view of the module's partition; the clone is freed
    return None


def shares_fp32_master(zero_optimizer) -> bool:
    """Whether every master partition is the module partition's storage (what `share_fp32_master` makes)."""
    modules = getattr(zero_optimizer, "fp16_partitioned_groups_flat", None) or []
    masters = getattr(zero_optimizer, "fp32_partitioned_groups_flat", None) or []
    return bool(masters) and all(
        a is not None and a.data_ptr() == b.data_ptr() and a.numel() == b.numel() for a, b in zip(modules, masters)
    )


def release_zero3_references(module: torch.nn.Module) -> None:
    """Drop what DeepSpeed's ZeRO-3 keeps of a destroyed engine in module-level state (see the module doc)."""
    offload = importlib.import_module("deepspeed.runtime.zero.parameter_offload")
    stack = getattr(offload, "FWD_MODULE_STACK", None)
    if isinstance(stack, list):
        stack[:] = [m for m in stack if m is not module]
    coordinator = importlib.import_module("deepspeed.runtime.zero.partitioned_param_coordinator")
    for attribute in vars(getattr(coordinator, "PartitionedParameterCoordinator", object)).values():
        for cache in _caches(attribute):
            cache.cache_clear()


def _caches(function, depth: int = 0):
    """The functools caches a (possibly wrapped) function holds: itself, its __wrapped__, its closure."""
    if depth > 3 or function is None:
        return
    if callable(getattr(function, "cache_clear", None)):
        yield function
    yield from _caches(getattr(function, "__wrapped__", None), depth + 1)
    for cell in getattr(function, "__closure__", None) or ():
        try:
            content = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        if callable(content):
            yield from _caches(content, depth + 1)
