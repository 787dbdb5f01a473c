"""Tokenizing chunks of documents, in this process or in N worker processes, in order.

A *chunk* is a run of consecutive documents of a domain (up to 1024 documents or 8 MB of text).
`encode_chunk` turns one into `(split key, token ids + EOS)` per document, packed into a few
arrays (`Packed`); it is the one function
both paths run, so the output does not depend on the number of workers:
- `workers == 1`: chunks are encoded here, one after the other (the reference path);
- `workers > 1`: a `spawn` pool of N processes, each with its own copy of the tokenizer and one
  Rust thread (TOKENIZERS_PARALLELISM=false: the processes are the parallelism). Chunks are
  submitted in order and their results taken back in the same order, with at most 2 N chunks in
  flight, so memory is bounded whatever the corpus size and the shards are byte-identical for
  every N (tests/test_prepare_workers.py).
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np

from btx.data.tokenizer import Tokenizer
from btx.data.writer import document_key
from btx.errors import BtxError


@dataclass
class Chunk:
    texts: list[str]  # the non-empty documents, in order
    documents_read: int  # documents of the sources this chunk covers (empty ones included)
    bytes_read: int  # source bytes it covers


@dataclass
class Packed:
    """A chunk's documents with tokens, packed in three arrays (one allocation each, so that what
    crosses between processes is a few large buffers, not a thousand small ones): document i has
    split key `keys[i]` and tokens `tokens[offsets[i]:offsets[i + 1]]`."""

    keys: np.ndarray  # float64 [n]
    offsets: np.ndarray  # int64 [n + 1]
    tokens: np.ndarray  # the shard dtype

    def documents(self) -> Iterator[tuple[float, np.ndarray]]:
        for i, key in enumerate(self.keys.tolist()):
            yield key, self.tokens[self.offsets[i] : self.offsets[i + 1]]


@dataclass
class EncodedChunk:
    chunk: Chunk
    packed: Packed

    @property
    def tokens(self) -> int:
        return len(self.packed.tokens)


@dataclass(frozen=True)
class EncodeOptions:
    seed_key: bytes
    eos_id: int | None  # appended to every document when not None
    vocab_size: int
    dtype: str


def encode_chunk(tokenizer: Tokenizer, texts: list[str], options: EncodeOptions) -> Packed:
    """Each text's split key and its token ids (EOS appended) in the shard dtype, packed; documents
    that tokenize to nothing are dropped."""
    keys, pieces, lengths = [], [], [0]
    eos = np.array([] if options.eos_id is None else [options.eos_id], dtype=np.uint32)
    for text, ids in zip(texts, tokenizer.encode_batch(texts)):
        ids = np.asarray(ids)
        if ids.size and int(ids.max()) >= options.vocab_size:
            raise BtxError(f"tokenizer: produced id {int(ids.max())}, beyond its vocab_size {options.vocab_size}")
        if ids.size + eos.size == 0:
            continue  # a document that tokenizes to nothing is not a document
        keys.append(document_key(text.encode("utf-8"), options.seed_key))
        pieces += [ids, eos]
        lengths.append(ids.size + eos.size)
    tokens = np.concatenate(pieces).astype(options.dtype) if pieces else np.zeros(0, dtype=options.dtype)
    return Packed(np.array(keys, dtype=np.float64), np.cumsum(lengths, dtype=np.int64), tokens)


# -- worker processes ----------------------------------------------------------------------------

_worker_tokenizer: Tokenizer | None = None
_worker_options: EncodeOptions | None = None


def _start_worker(tokenizer: Tokenizer, options: EncodeOptions) -> None:
    global _worker_tokenizer, _worker_options
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one Rust thread: the processes are the parallelism
    _worker_tokenizer, _worker_options = tokenizer, options


def _encode_in_worker(texts: list[str]) -> Packed:
    assert _worker_tokenizer is not None and _worker_options is not None
    return encode_chunk(_worker_tokenizer, texts, _worker_options)


def encode_chunks(
    chunks: Iterable[Chunk], tokenizer: Tokenizer, options: EncodeOptions, workers: int
) -> Iterator[EncodedChunk]:
    """The chunks encoded, in their order, by `workers` processes (1: in this process)."""
    if workers <= 1:
        for chunk in chunks:
            yield EncodedChunk(chunk, encode_chunk(tokenizer, chunk.texts, options))
        return
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, initializer=_start_worker, initargs=(tokenizer, options)) as pool:
        in_flight: deque = deque()
        try:
            for chunk in chunks:
                in_flight.append((chunk, pool.apply_async(_encode_in_worker, (chunk.texts,))))
                if len(in_flight) >= 2 * workers:
                    yield _finished(*in_flight.popleft())
            while in_flight:
                yield _finished(*in_flight.popleft())
        finally:
            pool.terminate()


def _finished(chunk: Chunk, result) -> EncodedChunk:
    return EncodedChunk(chunk, result.get())
