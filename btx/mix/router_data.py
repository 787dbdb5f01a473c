"""The token sets routers are fitted on: windows of a domain's shard, or prompts.

centroid and ridge read validation (or train) tokens of each domain, as evenly spaced windows of
its shard; hidden reads prompts, each its own sequence, in sets named "pos:EXPERT" (an expert's
prompts) and "neg:EXPERT" (what it is contrasted with). Every set is checked against the model's
vocabulary before anything is written; a set's batches are [n, S] int64 token ids (S a window's
or a prompt's length).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from btx.data.sampling import shard_spec_path
from btx.data.shards import load_shard
from btx.data.tokenizer import load_tokenizer
from btx.errors import BtxError
from btx.mix.router_fit import TokenSet
from btx.model.config import ModelConfig

SEQ_LEN = 1024  # data tokens are read as windows of this many (capped by max_seq_len and the shard)
BATCH_TOKENS = 8192  # tokens per forward micro-batch


def router_shard(name: str, spec: str | os.PathLike) -> Path:
    """--router-data NAME=PATH takes what `btx eval --data` takes: a shard, or a prepared domain
    directory (its val shard), checked against its sidecar's sha256 before anything is written."""
    path = shard_spec_path(spec, f"centroid data of {name!r}: {spec}")
    load_shard(path, verify=True)
    return path


def run_dir_val_shard(expert_path: Path, domain: str) -> Path | None:
    """<run_dir>/data/<domain>/val.bin for an expert at <run_dir>/experts/<domain>/final."""
    p = expert_path.resolve()
    if p.name == "final" and p.parent.name == domain and p.parent.parent.name == "experts":
        candidate = p.parent.parent.parent / "data" / domain / "val.bin"
        if candidate.with_suffix(".json").is_file():
            return candidate
    return None


def check_shard(shard, what: str, vocab_size: int) -> None:
    """A validation shard a router can be fitted on: a few tokens, all within the vocabulary."""
    if len(shard) < 2:
        raise BtxError(f"{shard.path}: {len(shard)} tokens; {what} needs validation tokens")
    top = int(np.max(shard.tokens))
    if top >= vocab_size:
        raise BtxError(
            f"{shard.path}: holds token id {top}, but the model's vocab_size is {vocab_size} "
            "(tokenized with another tokenizer?)"
        )


def shard_windows(name: str, shard, tokens: int, max_seq_len: int) -> TokenSet:
    """Evenly spaced windows covering about `tokens` tokens of the shard, in micro-batches."""
    n_tokens = len(shard)
    seq_len = min(SEQ_LEN, max_seq_len, n_tokens)
    count = max(1, min(math.ceil(tokens / seq_len), n_tokens // seq_len))
    starts = np.linspace(0, n_tokens - seq_len, count).astype(np.int64)
    windows = torch.from_numpy(np.stack([np.asarray(shard.tokens[s : s + seq_len], dtype=np.int64) for s in starts]))
    per_batch = max(1, BATCH_TOKENS // seq_len)
    return TokenSet(name, list(windows.split(per_batch)))


def prompt_set(name: str, prompts: Sequence[str], tokenizer, max_seq_len: int, vocab_size: int) -> TokenSet:
    """Each prompt as its own sequence (no padding, so no prompt sees another's tokens)."""
    batches = []
    for text in prompts:
        ids = list(tokenizer.encode(text))[:max_seq_len]
        if not ids:
            raise BtxError(f"prompt {text!r} of {name!r}: no tokens")
        if max(ids) >= vocab_size:
            raise BtxError(f"prompt {text!r} of {name!r}: token id {max(ids)} is outside the vocabulary ({vocab_size})")
        batches.append(torch.tensor([ids], dtype=torch.int64))
    return TokenSet(name, batches)


def check_prompts(options, experts: Sequence[str], whose: str, fail: Callable[[str], BtxError]) -> None:
    """hidden's prompt lists (`options.prompts`, `options.negative_prompts`): given only for a
    hidden init, each naming an expert of `whose` and holding non-empty strings."""
    for key in ("prompts", "negative_prompts"):
        given = getattr(options, key) or {}
        if given and options.router_init != "hidden":
            raise fail(f"{key} are for router_init hidden, not {options.router_init}")
        for name, texts in given.items():
            if name not in experts:
                raise fail(f"{key} of {name!r}: not an expert of {whose} ({', '.join(experts)})")
            if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) and t for t in texts):
                raise fail(f"{key} of {name!r}: expected a list of non-empty strings")


def prompt_sets(prompts: dict, negative_prompts: dict, tokenizer_dir: Path, cfg: ModelConfig) -> list[TokenSet]:
    """hidden: one token set per expert's positive prompts ("pos:NAME") and explicit negatives
    ("neg:NAME"), tokenized with the checkpoint's tokenizer."""
    try:
        tokenizer = load_tokenizer(tokenizer_dir)
    except BtxError as e:
        raise BtxError(f"router_init hidden tokenizes the prompts with the checkpoint's tokenizer: {e}") from None
    return [
        prompt_set(f"{kind}:{name}", texts, tokenizer, cfg.max_seq_len, cfg.vocab_size)
        for kind, given in (("pos", prompts), ("neg", negative_prompts))
        for name, texts in given.items()
    ]
