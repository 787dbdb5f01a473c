"""Per-block training transforms: activation checkpointing and regional torch.compile.

    apply_block_settings(model, settings)   # settings: a TrainSection; before the engine wraps the model
    cross_entropy = cross_entropy_for(settings)   # the loss's (btx.train.loop.loss_terms)

Applied from outside the model, block by block (torchtitan's way): btx.model knows nothing of
training. Both transforms patch attributes of each block *instance* (`forward`, `attend`; the
compiled forward is `torch.compile` of the block's own), so no wrapper module enters the tree: parameter names,
state dicts, checkpoints and exports are exactly those of the plain model, on either engine
(accelerate or DeepSpeed, ZeRO-3 included, whose hooks sit on the submodules).

Activation checkpointing (`train.activation_checkpointing`), with
`torch.utils.checkpoint.checkpoint(..., use_reentrant=False)`:
- none: every activation is kept for the backward.
- full: each block keeps only its input; its whole forward (attention, FFN or MoE dispatch) runs
  again in the backward.
- selective: each block's attention sublayer (norm, projections, RoPE, SDPA, output projection,
  residual add: `Block.attend`) is recomputed; the FFN / MoE part keeps its activations, so the MoE
  dispatch (a host sync, routing, the expert GEMMs) never runs twice. With SDPA (no stored score
  matrix) attention holds the smaller share of a block's activations: measured savings are in
  docs/RECIPES.md and bench/train_blocks.py.
The patched methods close over their own block: a deep copy of a patched model would still call
the original's, so transform a model only once it is the one that trains (the loop does it just
before the engine wraps the model).
Recomputation restores the RNG state (sample_top1's Gumbel noise draws the same numbers), so the
gradients are those of the plain model (tests/test_blocks.py).

torch.compile (`train.compile`): each block is compiled on its own (one graph reused by every
layer of the same shape: short compile times), traced with dynamo's nested graph breaks. The MoE's
expert loop stays eager by design (btx.model.moe `_run_sorted`: shapes that depend on the
routing), so an MoE block runs as the graph before it and the graph after it; docs/RECIPES.md
lists the graph breaks that remain. With `full`, the checkpoint wraps the compiled block (a
checkpointed region that dynamo traces may hold no graph break, and the MoE block has one); with
`selective`, the compiled block holds the checkpointed attention (no graph break in it).
The loss's cross-entropy is compiled too (`cross_entropy_for`): `one_hot_cross_entropy`, the
reference `token_cross_entropy` in a form inductor fuses into one pass each way.
ZeRO-3 with compile is refused (one line): DeepSpeed's parameter-gathering hooks run inside each
block and dynamo cannot trace them; ZeRO 0-2 and accelerate compile.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from btx.choices import ACTIVATION_CHECKPOINTING
from btx.errors import BtxError
from btx.model.transformer import Transformer


def _checkpointed(fn):
    """`fn` whose activations are recomputed in the backward instead of kept."""

    @functools.wraps(fn)
    def run(*args):
        if not torch.is_grad_enabled():  # eval / no_grad: nothing to keep, nothing to recompute
            return fn(*args)
        return checkpoint(fn, *args, use_reentrant=False)

    return run


def _compiled(fn, backend):
    """torch.compile of `fn`, traced with nested graph breaks: a break deep inside the MoE block
    (the eager expert loop, three calls down) splits only the block's one frame into the graph
    before it and the graph after it, instead of breaking every enclosing frame (six graphs)."""
    compiled = torch.compile(fn, backend=backend)

    @functools.wraps(fn)
    def run(*args):
        with torch._dynamo.config.patch(nested_graph_breaks=True):
            return compiled(*args)

    return run


def checkpoint_blocks(model: Transformer, mode: str) -> None:
    """Recompute each block's activations (`full`) or its attention sublayer's (`selective`)."""
    _transform_blocks(model, mode, backend=None)


def compile_blocks(model: Transformer, backend="inductor") -> None:
    """torch.compile each transformer block in place (regional compilation); `backend`: torch.compile's."""
    _transform_blocks(model, "none", backend=backend)


def _transform_blocks(model: Transformer, mode: str, backend) -> None:
    """`mode`'s checkpointing on every block; compiled by `backend` unless it is None."""
    if mode not in ACTIVATION_CHECKPOINTING:
        expected = ", ".join(ACTIVATION_CHECKPOINTING)
        raise BtxError(f"train.activation_checkpointing: expected one of {expected}; got {mode!r}")
    for block in model.layers:
        if mode == "selective":
            block.attend = _checkpointed(block.attend)  # inside the compiled block: no graph break there
        if mode == "full":
            # The checkpoint goes around the compiled forward, not inside it: dynamo cannot trace a
            # checkpointed region with a graph break in it (the MoE's eager middle) and would run
            # the whole block eagerly.
            forward = block.forward if backend is None else _compiled(block.forward, backend)
            block.forward = _checkpointed(forward)
        elif backend is not None:
            block.forward = _compiled(block.forward, backend)


def token_cross_entropy(logits_BSV: torch.Tensor, targets_BS: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy per token, in fp32 whatever the logits' dtype (the reference)."""
    return F.cross_entropy(logits_BSV.reshape(-1, logits_BSV.shape[-1]).float(), targets_BS.reshape(-1))


def one_hot_cross_entropy(logits_BSV: torch.Tensor, targets_BS: torch.Tensor) -> torch.Tensor:
    """`token_cross_entropy` written for inductor: log-sum-exp minus the target's logit, picked by
    comparing the vocabulary index with the target rather than by a gather. Compiled, the forward
    is one pass over the logits and the backward one elementwise pass (softmax - one-hot) where
    eager takes a log-softmax, a scatter into zeros and log-softmax's backward (and where inductor
    compiles F.cross_entropy's own decomposition, or a gather, into a slower scatter)."""
    logits_TV = logits_BSV.reshape(-1, logits_BSV.shape[-1]).float()
    targets_T = targets_BS.reshape(-1)
    hit_TV = torch.arange(logits_TV.shape[-1], device=logits_TV.device) == targets_T[:, None]
    return (logits_TV.logsumexp(-1) - torch.where(hit_TV, logits_TV, 0.0).sum(-1)).mean()


@functools.cache
def _compiled_cross_entropy():
    # One compiled function per process: every job and engine of the process shares its graphs.
    return torch.compile(one_hot_cross_entropy)


def cross_entropy_for(settings) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The training loss's cross-entropy: `token_cross_entropy` (the reference), or with
    train.compile the compiled `one_hot_cross_entropy` (tests/test_blocks.py: they agree)."""
    return _compiled_cross_entropy() if getattr(settings, "compile", False) else token_cross_entropy


def apply_block_settings(model: nn.Module, settings, zero_stage: int | None = None) -> None:
    """train.activation_checkpointing and train.compile on every block of `model`; `zero_stage`
    is the DeepSpeed stage the job trains at (None: accelerate)."""
    if getattr(settings, "compile", False) and zero_stage == 3:
        # ZeRO-3 gathers each submodule's weights in forward hooks that dynamo traces into: it
        # sees the empty local partitions and fails (DeepSpeed's own compile path is not used here).
        raise BtxError(
            "train.compile: not supported with ZeRO stage 3 (DeepSpeed's parameter-gathering hooks "
            "cannot be traced); use zero_stage 0-2, or train.compile: false"
        )
    backend = "inductor" if getattr(settings, "compile", False) else None
    _transform_blocks(model, getattr(settings, "activation_checkpointing", "none"), backend)
