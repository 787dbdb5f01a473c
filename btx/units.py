"""Sizes in bytes as people write them, one grammar for every place that takes one: a recipe's
`merge.shard_size`, `btx merge --shard-size`, and the writer's `shard_size`.
"""

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
