"""Whole-model conveniences on top of the reader and writer: save a btx state dict as an HF
checkpoint, load one into a Transformer. For models that fit in memory (tests, eval, the demo).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from accelerate import init_empty_weights

from btx.io.layout import DEFAULT_SHARD_SIZE, hf_specs_from_btx
from btx.io.reader import CheckpointReader
from btx.io.writer import write_checkpoint
from btx.model.config import ModelConfig
from btx.model.transformer import Transformer


def save_model(
    model_or_state_dict,
    cfg: ModelConfig | None,
    out_dir: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    shard_size: int | str = DEFAULT_SHARD_SIZE,
    tokenizer_from: str | os.PathLike | None = None,
    force: bool = False,
    atomic: bool = True,
    on_tensor: Callable[[str, int], None] | None = None,
) -> dict[str, str]:
    """Save a btx Transformer (or its state dict) as an HF checkpoint; returns {file: sha256}.

    Every tensor is stored in one `dtype` (default: the embedding's), the router too, as
    transformers and vLLM expect a uniform checkpoint; btx upcasts the router to fp32 on load.
    `cfg` may be None for a model that carries `.cfg`.
    """
    if isinstance(model_or_state_dict, torch.nn.Module):
        cfg = cfg if cfg is not None else model_or_state_dict.cfg
        state_dict = model_or_state_dict.state_dict()
    else:
        state_dict = model_or_state_dict
    if cfg is None:
        raise ValueError("save_model needs a ModelConfig for a plain state dict")
    dtype = dtype or state_dict["embed.weight"].dtype
    return write_checkpoint(
        out_dir,
        cfg,
        hf_specs_from_btx(state_dict, cfg, dtype),
        shard_size=shard_size,
        tokenizer_from=tokenizer_from,
        force=force,
        atomic=atomic,
        on_tensor=on_tensor,
    )


def load_state_dict(
    path: str | os.PathLike, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(cfg, btx state dict) of an HF checkpoint. Floating tensors are cast to `dtype` when
    given (else kept as stored); routers are always fp32, as btx's model keeps them."""
    with CheckpointReader(path) as ckpt:
        sd = {}
        for name in ckpt.btx_names():
            want = torch.float32 if name.endswith("ffn.router.weight") else dtype
            sd[name] = ckpt.get_btx(name, want, device)
        return ckpt.cfg, sd


def load_model(path: str | os.PathLike, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"):
    """A btx `Transformer` with the weights of an HF checkpoint (see `load_state_dict`)."""

    cfg, sd = load_state_dict(path, dtype, device)
    with init_empty_weights(include_buffers=False):  # parameters on the meta device: no wasted init
        model = Transformer(cfg)
    model.load_state_dict(sd, strict=True, assign=True)  # adopt the loaded tensors
    return model.to(device)
