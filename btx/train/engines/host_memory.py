"""Host memory of CPU training processes: freed tensors go back to the operating system.

glibc's malloc serves a request of at least its mmap threshold with a mapping of its own, which
`free` unmaps; smaller ones come from its heaps, whose freed blocks stay resident until reused.
The threshold starts at 128 KiB but rises to the size of each mapped block freed, up to 32 MiB, so
after the first large tensor is freed every tensor under 32 MiB comes from the heaps. ZeRO-3
allocates and frees such tensors all the time (each layer's gathered parameters and full-size
gradients, the reduce buckets, the optimizer's temporaries): measured on 2 gloo ranks training a
220M model (bench/zero3_memory.py), a rank's heaps held 1.9 GB of which 0.16 GB was in use, beside
2.2 GB of live tensors, and its peak RSS was 4.4 GB where the live state needs about 3.

`keep_freed_memory_returned` fixes the threshold at 1 MiB (setting it also stops the rise), so a
tensor of 1 MiB or more is its own mapping and leaves the resident set when freed, the way a GPU's
caching allocator hands its blocks back to the next tensor. The cost is a page fault per 4 KiB of
each new large tensor. It runs where a ZeRO-3 job on the CPU builds its sharded model, before any
of its state is allocated (not for ZeRO 0-2 or accelerate jobs, which gain no memory that matters
from it and would pay the page faults: `btx run demo` trains its MoE at ZeRO-0 in-process); a
user's own MALLOC_MMAP_THRESHOLD_ wins, and a C library other than glibc is left alone.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)
MMAP_THRESHOLD_BYTES = 1 << 20


def keep_freed_memory_returned() -> bool:
    """Fix glibc's mmap threshold at 1 MiB for this process; True when set (now or before)."""
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 (glibc only: musl has no such symbol)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
