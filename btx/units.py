"""Sizes in bytes as people write them, one grammar for every place that takes one: a recipe's
`merge.shard_size`, `btx merge --shard-size`, and the writer's `shard_size`.
"""

import os
import re

from btx.errors import BtxError

# A number, then optionally K, M, G or T (powers of 1000, as transformers reads "5GB"), an `i` for
# powers of 1024 instead, and an optional B: 5G, 5GB, 5GiB, 500MB, 1000 and 1000B all parse.
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(?:([KMGT])(i?))?B?\s*", re.IGNORECASE)


def parse_size(size: int | str) -> int:
    """Bytes from 123, "123", "500MB", "5G", "5GB" or "2GiB"."""
    if isinstance(size, int) and not isinstance(size, bool):
        return size
    m = _SIZE.fullmatch(str(size))
    if not m:
        raise BtxError(
            f"not a size: {size!r} (expected e.g. 5GB, 500MB, 2GiB); a shard size is bytes, or a number "
            "with K, M, G or T (x1000) or Ki, Mi, Gi or Ti (x1024)"
        )
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base ** " KMGT".index((m.group(2) or " ").upper()))


def machine_memory() -> int:
    """This machine's physical memory in bytes (0 where the system does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
        return 0


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError  # pragma: no cover


def oversize(need: int, limit: int, factors: dict[str, int], what: str, limit_what: str) -> tuple[str, str] | None:
    """The one size guard, run on numbers alone before anything is allocated: None when `need`
    bytes fit in `limit`, else (the key to blame, the message). The key is the largest of
    `factors` (the sizes that multiply into `need`), which is the one out of line in practice: a
    vocab_size of 1e12, a num_hidden_layers of 1e9, a batch_size of 1e8."""
    if limit <= 0 or need <= limit:
        return None
    key = max(factors, key=lambda k: factors[k])
    return key, (
        f"{factors[key]} makes {what} about {human_bytes(need)}, more than {limit_what} "
        f"({human_bytes(limit)}); expected a smaller value"
    )
