"""Sampling: training batches and evaluation windows from shards.

- Training windows of `seq_len + 1` tokens start at random offsets. Everything about a batch is
  derived from `(seed, step)` alone, so **the data position of a run is its step**: a run resumed
  at step N sees exactly the batches it would have seen, with no sampler state to checkpoint.
- With several domains each row's domain is drawn by the mixture weights, also from (seed, step).
- Data-parallel ranks take disjoint slices of one global batch, which does not depend on the
  number of ranks.
- `PlannedSampler` replays another run's batches step by step (the data-matched baselines).
- `eval_batches` gives every model the same consecutive validation windows, so rows compare.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np
import torch

from btx.data.prepare import check_seed
from btx.data.shards import Shard
from btx.errors import BtxError


class TokenSampler:
    """Random training windows from one or more domains, a pure function of (seed, step).

    `batch(step, rank, world_size)` returns `(inputs, targets)`, int64 tensors of shape
    `[batch_size // world_size, seq_len]`, targets shifted by one token. `batch_size` is the
    *global* batch: rank r gets rows r*b .. (r+1)*b-1 of it, so ranks never share a row and the
    global batch is the same for any world size.

    Weights: a dict (or a sequence aligned with `shards`) of non-negative numbers, normalized;
    None weights each domain by its token count (the natural mixture). Within a domain every
    window start is equally likely.

    There is no sampler state: the data position is the step. Checkpoint the step and pass it back.
    """

    def __init__(
        self,
        shards: Mapping[str, Shard] | Sequence[Shard] | Shard,
        weights: Mapping[str, float] | Sequence[float] | None = None,
        *,
        seq_len: int,
        batch_size: int,
        seed: int = 0,
    ):
        self.shards = _named_shards(shards)
        self.names = list(self.shards)
        if seq_len < 1:
            raise BtxError(f"seq_len: expected a positive integer, got {seq_len}")
        if batch_size < 1:
            raise BtxError(f"batch_size: expected a positive integer, got {batch_size}")
        check_seed(seed, "seed")
        self.seq_len, self.batch_size, self.seed = int(seq_len), int(batch_size), int(seed)
        self.probabilities = self._probabilities(weights)
        for name, probability in zip(self.names, self.probabilities):
            shard = self.shards[name]
            if probability > 0 and len(shard) < self.seq_len + 1:
                raise BtxError(
                    f"{shard.path}: {len(shard)} tokens, fewer than seq_len + 1 = {self.seq_len + 1} (domain '{name}')"
                )
        # Window starts are drawn from [0, len - seq_len): the window needs seq_len + 1 tokens.
        self._start_limits = np.array([max(len(self.shards[n]) - self.seq_len, 1) for n in self.names], dtype=np.int64)

    def _probabilities(self, weights) -> np.ndarray:
        if weights is None:
            raw = np.array([len(self.shards[n]) for n in self.names], dtype=np.float64)
        elif isinstance(weights, Mapping):
            unknown = set(weights) - set(self.names)
            missing = set(self.names) - set(weights)
            if unknown or missing:
                raise BtxError(
                    f"weights: keys must be the domains {sorted(self.names)}"
                    + (f"; unknown {sorted(unknown)}" if unknown else "")
                    + (f"; missing {sorted(missing)}" if missing else "")
                )
            raw = np.array([float(weights[n]) for n in self.names], dtype=np.float64)
        else:
            raw = np.array([float(w) for w in weights], dtype=np.float64)
            if len(raw) != len(self.names):
                raise BtxError(f"weights: expected {len(self.names)} numbers (one per shard), got {len(raw)}")
        if not np.all(np.isfinite(raw)) or np.any(raw < 0) or raw.sum() <= 0:
            raise BtxError(f"weights: expected non-negative numbers with a positive sum, got {raw.tolist()}")
        return raw / raw.sum()

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    def _plan(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """Domain index and window start of every row of the global batch at `step`."""
        if step < 0:
            raise ValueError(f"step must be non-negative, got {step}")
        rng = np.random.default_rng([self.seed, int(step)])
        domains = rng.choice(len(self.names), size=self.batch_size, p=self.probabilities)
        starts = rng.integers(0, self._start_limits[domains])
        return domains, starts

    def _rows(self, rank: int, world_size: int) -> slice:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in a world of size {world_size}")
        if self.batch_size % world_size:
            raise BtxError(f"batch_size: {self.batch_size} does not divide evenly over {world_size} ranks")
        per_rank = self.batch_size // world_size
        return slice(rank * per_rank, (rank + 1) * per_rank)

    def batch(self, step: int, rank: int = 0, world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        domains, starts = self._plan(step)
        rows = self._rows(rank, world_size)
        windows = np.stack(
            [
                np.asarray(self.shards[self.names[d]].tokens[s : s + self.seq_len + 1], dtype=np.int64)
                for d, s in zip(domains[rows], starts[rows])
            ]
        )
        windows_t = torch.from_numpy(windows)
        return windows_t[:, :-1].contiguous(), windows_t[:, 1:].contiguous()

    def row_domains(self, step: int, rank: int = 0, world_size: int = 1) -> list[str]:
        """The domain of each row that `batch(step, rank, world_size)` returns."""
        domains, _ = self._plan(step)
        return [self.names[d] for d in domains[self._rows(rank, world_size)]]


@dataclass
class DataStream:
    """Micro-batches `first` .. `first + count - 1` of the TokenSampler over `domains` (in this
    order, which the sampler's draws depend on), with `weights` (None: by token count) and `seed`:
    the batches one job drew, to be drawn again by another (data-matched baselines), or the ones
    after an earlier phase of the same data (the finetune after its router-only phase)."""

    domains: list[str]
    weights: dict[str, float] | None
    seed: int
    first: int
    count: int


class PlannedSampler:
    """A job's micro-batches from a plan: phases one after another; within a phase, its streams
    interleaved evenly (the i-th batch of a stream of n sits at (i + 0.5) / n of the phase; ties in
    stream order), so every batch of every stream is drawn once, and each stream's batches in their
    own order. `batch(index, rank, world_size)` as TokenSampler's, every stream drawn at the global
    `batch_size` and `seq_len` given (a replayed batch is the same batch only at the same ones)."""

    def __init__(
        self, shards: Mapping[str, Shard], plan: Sequence[Sequence[DataStream]], *, seq_len: int, batch_size: int
    ):
        self.samplers: list[TokenSampler] = []
        self.order: list[tuple[int, int]] = []  # (stream, its micro-batch) for every index of the plan
        for phase in plan:
            keys = []
            for stream in phase:
                missing = [d for d in stream.domains if d not in shards]
                if missing:
                    raise BtxError(
                        f"data plan: stream over {stream.domains} names {missing}, which have no train shard"
                    )
                if stream.count < 0 or stream.first < 0:
                    raise BtxError(f"data plan: stream over {stream.domains}: first and count must be >= 0")
                weights = None if stream.weights is None else {d: stream.weights[d] for d in stream.domains}
                sampler = TokenSampler(
                    {d: shards[d] for d in stream.domains},
                    weights,
                    seq_len=seq_len,
                    batch_size=batch_size,
                    seed=stream.seed,
                )
                self.samplers.append(sampler)
                j = len(self.samplers) - 1
                keys += [((i + 0.5) / stream.count, j, stream.first + i) for i in range(stream.count)]
            self.order += [(j, i) for _, j, i in sorted(keys)]

    def __len__(self) -> int:
        return len(self.order)

    def batch(self, index: int, rank: int = 0, world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < len(self.order):
            raise BtxError(f"data plan: micro-batch {index} asked for, but the plan holds {len(self.order)}")
        stream, own = self.order[index]
        return self.samplers[stream].batch(own, rank, world_size)


def _named_shards(shards) -> dict[str, Shard]:
    if isinstance(shards, Shard):
        shards = [shards]
    if isinstance(shards, Mapping):
        named = dict(shards)
    else:
        named = {}
        for shard in shards:
            if shard.domain in named:
                raise BtxError(
                    f"{shard.path}: a second shard for domain '{shard.domain}'; pass a dict of names to shards"
                )
            named[shard.domain] = shard
    if not named:
        raise BtxError("shards: expected at least one shard")
    return named


def eval_batch_count(shard: Shard, seq_len: int, batch_size: int, max_batches: int | None = None) -> int:
    """How many batches `eval_batches` yields (for progress bars)."""
    windows = (len(shard) - 1) // seq_len if len(shard) else 0
    if max_batches is not None:
        windows = min(windows, max_batches * batch_size)
    return -(-windows // batch_size)


def eval_batches(
    shard: Shard, seq_len: int, batch_size: int, max_batches: int | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Contiguous, non-overlapping windows from the start of `shard`, in order, for held-out loss.

    Window i predicts tokens i*seq_len+1 .. (i+1)*seq_len from the ones before, so every token
    after the first is scored at most once. A final partial window is dropped; the last batch may
    have fewer rows. `max_batches` bounds the work (None: the whole shard).
    """
    if seq_len < 1 or batch_size < 1:
        raise BtxError(f"eval: seq_len and batch_size must be positive, got {seq_len} and {batch_size}")
    windows = (len(shard) - 1) // seq_len if len(shard) else 0
    if windows == 0:
        raise BtxError(
            f"{shard.path}: {len(shard)} tokens, fewer than seq_len + 1 = {seq_len + 1}; "
            f"use a shorter seq_len or a larger val_fraction"
        )
    if max_batches is not None:
        windows = min(windows, max_batches * batch_size)
    for first in range(0, windows, batch_size):
        count = min(batch_size, windows - first)
        flat = np.asarray(shard.tokens[first * seq_len : (first + count) * seq_len + 1], dtype=np.int64)
        # Rows overlap by one token: a row's last target is the next row's first input.
        inputs = torch.from_numpy(flat[:-1].reshape(count, seq_len).copy())
        targets = torch.from_numpy(flat[1:].reshape(count, seq_len).copy())
        yield inputs, targets


def document_ids(tokens_BS: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Which document each token of a window belongs to: the number of EOS tokens before it in its
    row. A document's EOS is its own last token; the token after it starts the next document.
    (The model's `document_ids_BS`: attention and positions per document.)"""
    is_eos = (tokens_BS == eos_id).to(torch.int64)
    return is_eos.cumsum(dim=1) - is_eos


_DOMAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def shard_spec_path(spec: str | os.PathLike, label: str, split: str = "val") -> Path:
    """The shard a command-line DOMAIN=PATH names: a `.bin`/`.json` shard made by btx prepare, or a
    prepared domain directory (its `split` shard). `label` names the flag, e.g. "--data code=dir"."""
    path = Path(spec).expanduser()
    if not path.exists():
        raise BtxError(f"{path}: not found ({label})")
    if path.is_dir():
        if not (path / f"{split}.json").is_file():
            raise BtxError(
                f"{path}: a directory without {split}.json ({label}); expected a btx shard "
                ".bin/.json or a prepared domain directory"
            )
        return path / f"{split}.json"
    if path.suffix not in (".bin", ".json"):
        raise BtxError(
            f"{path}: not a btx token shard ({label}); expected a .bin/.json shard made "
            "by btx prepare, or a prepared domain directory"
        )
    return path


def parse_domain_paths(specs, expected: str, flag: str = "--data") -> dict[str, str]:
    """Command-line `DOMAIN=PATH` specs -> {domain: path}, one path per domain, in order given.
    `expected` says what PATH may be, for the error message."""
    out: dict[str, str] = {}
    for spec in specs:
        name, eq, path = spec.partition("=")
        if not eq or not name or not path:
            raise BtxError(f"{flag} {spec}: expected DOMAIN={expected}")
        if not _DOMAIN_NAME.fullmatch(name):
            raise BtxError(f"{flag} {spec}: domain name {name!r} must be letters, digits, '_', '.' or '-'")
        if name in out:
            raise BtxError(f"{flag} {spec}: domain {name!r} given twice")
        out[name] = path
    if not out:
        raise BtxError(f"no data given: add {flag} DOMAIN={expected.split(' ')[0]} (repeat per domain)")
    return out
