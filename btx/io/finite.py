"""The finiteness check on every tensor btx reads from a checkpoint.

A NaN or an Inf in one expert makes every token of a merged MoE NaN, so btx refuses such a tensor
with one line naming its file and name. Two paths, which tests/test_faults3.py checks agree:

- `check_finite`, the reference: `torch.isfinite` over a tensor in hand (CheckpointReader.get and
  read_into), a chunk at a time so the boolean scratch stays small.
- `check_finite_bytes`, for bytes the writer copies file to file without reading them into a
  tensor (a FileRange): the same test on the raw little-endian bits with numpy, run on the writer's
  hashing thread over the page-cache windows it hashes anyway, so it adds no read and no copy. An
  IEEE float is non-finite exactly when its exponent bits are all ones (float8_e4m3fn has no Inf:
  its NaN is every bit but the sign set).
"""

from __future__ import annotations

import numpy as np
import torch

from btx.errors import BtxError

_CHUNK = 8 << 20  # elements per step: bounds the scratch

# dtype -> (unsigned view, mask, value): non-finite where (bits & mask) == value
_BITS = {
    torch.float64: (np.uint64, 0x7FF0_0000_0000_0000, 0x7FF0_0000_0000_0000),
    torch.float32: (np.uint32, 0x7F80_0000, 0x7F80_0000),
    torch.float16: (np.uint16, 0x7C00, 0x7C00),
    torch.bfloat16: (np.uint16, 0x7F80, 0x7F80),
    torch.float8_e5m2: (np.uint8, 0x7C, 0x7C),
    torch.float8_e4m3fn: (np.uint8, 0x7F, 0x7F),
}


def _refuse(where: str, name: str, what: str):
    raise BtxError(f"{where}: tensor {name} holds a non-finite value ({what}); refusing to use it")


def check_finite(t: torch.Tensor, where: str, name: str) -> None:
    """Refuse a floating tensor holding NaN or Inf, naming the file and the tensor."""
    if not t.dtype.is_floating_point or t.numel() == 0:
        return
    flat = t.reshape(-1)
    for start in range(0, flat.numel(), _CHUNK):
        part = flat[start : start + _CHUNK]
        if part.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            part = part.to(torch.float16)  # isfinite has no float8 kernel; the cast keeps NaN and Inf
        finite = torch.isfinite(part)
        if not bool(finite.all()):
            _refuse(where, name, str(part[~finite][0].item()))


def can_check_bytes(dtype: torch.dtype) -> bool:
    return dtype in _BITS


def check_finite_bytes(data, dtype: torch.dtype, where: str, name: str) -> None:
    """`check_finite` on the stored bytes of `dtype` elements (a buffer of whole elements)."""
    view, mask, value = _BITS[dtype]
    bits = np.frombuffer(data, dtype=np.dtype(view).newbyteorder("<"))
    bad = any(np.any((bits[i : i + _CHUNK] & view(mask)) == view(value)) for i in range(0, bits.size, _CHUNK))
    del bits  # no array may outlive the call: `data` is often a memory map's window, closed next
    if bad:
        _refuse(where, name, "NaN or Inf")
