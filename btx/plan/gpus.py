"""The accelerators `btx plan` knows: dense bf16 peak FLOP/s and memory per device.

Peaks are the vendors' dense (no 2:4 sparsity) bf16 tensor rates, in FLOP/s:
- A100 SXM 40/80 GB: 312 TFLOP/s (NVIDIA A100 datasheet).
- H100 SXM 80 GB: 989 TFLOP/s (NVIDIA H100 datasheet; the PCIe card is lower, 756).
- H200 SXM 141 GB: 989 TFLOP/s, the H100's compute with more, faster memory (NVIDIA H200 datasheet).
- B200 (HGX, 180 GB usable of 192): about 2,250 TFLOP/s dense (NVIDIA Blackwell datasheet: 4.5 PFLOP/s
  is the sparse figure).
- L40S 48 GB: 362 TFLOP/s (NVIDIA L40S datasheet; 733 is the sparse figure).
- MI300X 192 GB: 1,307 TFLOP/s (AMD Instinct MI300X datasheet).
Memory is what a training process can use: the card's memory (GiB as the vendor's GB, 10^9 bytes) less
a reserve for the CUDA/ROCm context, NCCL buffers and allocator fragmentation (`RESERVED_BYTES`).

DEFAULT_MFU (0.40) is the model-FLOPs utilisation a plan assumes without `--mfu` or `--measured`: dense
7B-70B training on H100/A100 with a tuned stack reaches 0.40-0.50 and MoE training 0.44-0.49 (Megatron-Core
Mixtral 8x7B on H100; NVIDIA's Llama-3 8B upcycling 46.8%); btx's plain PyTorch loop without fused
kernels is assumed to sit at the low end. Pass `--measured RUN_DIR` to use what a real run reached.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from btx.errors import BtxError

DEFAULT_MFU = 0.40
GB = 1e9
RESERVED_BYTES = 2.5 * GB  # context, communication buffers, fragmentation


@dataclass(frozen=True)
class Gpu:
    name: str
    peak_flops: float  # dense bf16 FLOP/s
    memory_bytes: float  # the card's memory (vendor GB)

    @property
    def usable_bytes(self) -> float:
        """What a training process can allocate: the memory less RESERVED_BYTES."""
        return self.memory_bytes - RESERVED_BYTES


GPUS: dict[str, Gpu] = {
    g.name: g
    for g in (
        Gpu("A100-40GB", 312e12, 40 * GB),
        Gpu("A100-80GB", 312e12, 80 * GB),
        Gpu("H100", 989e12, 80 * GB),
        Gpu("H200", 989e12, 141 * GB),
        Gpu("B200", 2250e12, 180 * GB),
        Gpu("L40S", 362e12, 48 * GB),
        Gpu("MI300X", 1307e12, 192 * GB),
    )
}
# Other spellings people type for the same cards.
ALIASES = {
    "A100": "A100-80GB",
    "A100-80G": "A100-80GB",
    "A100-40G": "A100-40GB",
    "H100-SXM": "H100",
    "H100-80GB": "H100",
}


def gpu(name: str) -> Gpu:
    """The GPU called `name` (case-insensitive, aliases allowed); BtxError naming the known ones."""
    by_lower = {k.lower(): v for k, v in GPUS.items()} | {k.lower(): GPUS[v] for k, v in ALIASES.items()}
    found = by_lower.get(name.strip().lower())
    if found is None:
        close = difflib.get_close_matches(name.lower(), list(by_lower), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise BtxError(f"--gpu: unknown GPU {name!r}{hint}; expected one of {', '.join(GPUS)}")
    return found
