"""Token shards on disk: the format and reading it back.

Shard format (`btx-tokens-v1`)
- `<split>.bin`: a flat array of token ids, `uint16` when the vocabulary fits (<= 65536), else
  `uint32`, native little-endian. Documents follow each other, each ending with EOS by default.
- `<split>.json`, the sidecar: format, dtype, token and document counts, domain, split, the
  tokenizer's identity (kind, vocab size, hash), the sources, the preparation options and the
  sha256 of the .bin. It is written last, so a shard without a sidecar is not finished.
- Every file is written to a temporary sibling, fsynced and renamed into place, with the same
  permissions as any new file (0666 less the umask, like checkpoints).

`load_shard` checks the sidecar's keys and types and the .bin's size (and, with verify, its
sha256) and memory-maps the tokens; `check_tokenizer` refuses a shard made by another tokenizer.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from btx.data.tokenizer import Tokenizer, load_tokenizer
from btx.errors import BtxError
from btx.io.hashing import cached_sha256

SHARD_FORMAT = "btx-tokens-v1"
SPLITS = ("train", "val")


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned dtype that holds every id: uint16 up to 65536 ids, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


@dataclass
class Shard:
    """One prepared split of one domain: its sidecar and its tokens as a read-only memmap."""

    path: Path  # the .bin file
    meta: dict
    tokens: np.ndarray = field(repr=False)

    @property
    def domain(self) -> str:
        return self.meta["domain"]

    @property
    def split(self) -> str:
        return self.meta["split"]

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.meta["dtype"])

    @property
    def num_tokens(self) -> int:
        return int(self.meta["tokens"])

    @property
    def num_documents(self) -> int:
        return int(self.meta["documents"])

    @property
    def tokenizer(self) -> dict:
        return self.meta["tokenizer"]

    def __len__(self) -> int:
        return self.num_tokens

    def verify(self) -> None:
        """Check the .bin's sha256 against the sidecar (reads the file unless btx hashed it since
        it last changed: `btx.io.hashing.cached_sha256`)."""
        if cached_sha256(self.path) != self.meta["sha256"]:
            raise BtxError(
                f"{self.path}: contents do not match the sha256 in its sidecar (corrupted or edited "
                "after btx prepare); prepare the domain again (btx prepare ... --force)"
            )


_SIDECAR_KEYS = {
    "format": str,
    "dtype": str,
    "tokens": int,
    "documents": int,
    "domain": str,
    "split": str,
    "tokenizer": dict,
    "sha256": str,
}


def load_shard(path: str | os.PathLike, *, verify: bool = False) -> Shard:
    """Open a shard from its `.bin` or its `.json` sidecar. Checks the sidecar and that the .bin
    holds exactly `tokens` ids ("truncated" otherwise); `verify=True` also checks the sha256."""
    path = Path(path)
    sidecar_path = path.with_suffix(".json")
    if not sidecar_path.is_file():
        if not path.exists():
            raise BtxError(f"{path}: shard not found")
        raise BtxError(f"{sidecar_path}: sidecar missing, so the shard is unfinished; run btx prepare again")
    try:
        meta = json.loads(sidecar_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BtxError(f"{sidecar_path}: not valid JSON ({exc})") from exc
    if not isinstance(meta, dict) or meta.get("format") != SHARD_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise BtxError(f'{sidecar_path}: expected "format": "{SHARD_FORMAT}", found {found!r}')
    for key, kind in _SIDECAR_KEYS.items():
        if not isinstance(meta.get(key), kind) or isinstance(meta.get(key), bool):
            raise BtxError(f"{sidecar_path}: key {key!r} missing or not a {kind.__name__}")
    if meta["dtype"] not in ("uint16", "uint32"):
        raise BtxError(f"{sidecar_path}: dtype must be uint16 or uint32, found {meta['dtype']!r}")

    # The .bin lives next to its sidecar; a "bin" entry may only rename it, never point elsewhere.
    bin_name = meta.get("bin")
    if not isinstance(bin_name, str) or Path(bin_name).name != bin_name:
        bin_name = sidecar_path.with_suffix(".bin").name
    bin_path = sidecar_path.with_name(bin_name)
    if not bin_path.is_file():
        raise BtxError(f"{bin_path}: token file missing (its sidecar is {sidecar_path.name})")
    dtype = np.dtype(meta["dtype"])
    expected_bytes = meta["tokens"] * dtype.itemsize
    actual_bytes = bin_path.stat().st_size
    if actual_bytes != expected_bytes:
        state = "truncated" if actual_bytes < expected_bytes else "longer than its sidecar says"
        raise BtxError(
            f"{bin_path}: {state}: expected {expected_bytes} bytes ({meta['tokens']} tokens), found {actual_bytes}"
        )
    # numpy cannot memory-map an empty file; an empty split (a one-document domain's val) is legal.
    tokens = np.memmap(bin_path, dtype=dtype, mode="r") if meta["tokens"] else np.zeros(0, dtype=dtype)
    shard = Shard(path=bin_path, meta=meta, tokens=tokens)
    if verify:
        shard.verify()
    return shard


def load_domain(directory: str | os.PathLike) -> dict[str, Shard]:
    """`{"train": Shard, "val": Shard}` from a prepared domain directory."""
    directory = Path(directory)
    return {split: load_shard(directory / f"{split}.json") for split in SPLITS}


def check_tokenizer(shard: Shard, tokenizer: Tokenizer | dict | str | os.PathLike) -> None:
    """BtxError unless `shard` was made with `tokenizer` (same identity hash)."""
    expected = tokenizer if isinstance(tokenizer, dict) else load_tokenizer(tokenizer).identity()
    found = shard.tokenizer
    if found.get("hash") != expected.get("hash"):
        raise BtxError(
            f"{shard.path}: tokenized with a {found.get('kind')} tokenizer (hash {str(found.get('hash'))[:12]}, "
            f"vocab {found.get('vocab_size')}), expected {expected.get('kind')} "
            f"(hash {str(expected.get('hash'))[:12]}, vocab {expected.get('vocab_size')}); "
            "prepare the data again with this tokenizer"
        )
