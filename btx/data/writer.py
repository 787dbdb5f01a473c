"""Writing shards: the train/val split by document and the streamed, atomic shard writer.

`Splitter` sends a document to val when a keyed hash of its text falls below val_fraction, so
identical documents always land in the same split and adding documents never moves the others.
`ShardWriter` buffers tokens and writes them to a temporary sibling, fsynced and renamed into
place by prepare once the sidecar is written.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from btx.data.shards import SPLITS
from btx.errors import BtxError
from btx.io.atomic import temporary_sibling

# Tokens buffered per shard before a write to disk.
_WRITE_BUFFER_TOKENS = 4 << 20


def partial_path(final_path: Path) -> Path:
    """Where a resumable writer keeps `<split>.bin` until it is complete: `.<split>.bin.partial`."""
    return final_path.with_name(f".{final_path.name}.partial")


class ShardWriter:
    """Streams token ids into a temporary sibling of `<split>.bin`; `commit` renames it into place.

    A resumable writer (`resumable=True`) writes `.<split>.bin.partial`, a name a later run finds:
    `resume_tokens`/`resume_documents` continue such a file from a checkpoint (btx.data.resume),
    cutting it back to the checkpoint's length and hashing the kept prefix again."""

    def __init__(
        self,
        final_path: Path,
        dtype: np.dtype,
        vocab_size: int,
        *,
        resumable: bool = False,
        resume_tokens: int = 0,
        resume_documents: int = 0,
    ):
        self.final_path = final_path
        self.dtype = np.dtype(dtype)
        self.vocab_size = vocab_size
        self._sha256 = hashlib.sha256()
        # A fixed buffer the documents are copied into: what callers pass may be views of larger
        # arrays (a chunk's packed tokens), which must not be kept alive until the next write.
        self._buffer = np.empty(_WRITE_BUFFER_TOKENS, dtype=self.dtype)
        self._filled = 0
        self.tokens = 0
        self.documents = 0
        if not resumable:
            self.tmp_path = temporary_sibling(final_path)
            # 0666 less the umask, as for every other file btx writes (mkstemp would make it 0600).
            self._file = os.fdopen(os.open(self.tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb")
            return
        self.tmp_path = partial_path(final_path)
        if resume_tokens == 0:
            self._file = os.fdopen(os.open(self.tmp_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666), "wb")
            return
        self._file = open(self.tmp_path, "r+b")
        keep = resume_tokens * self.dtype.itemsize
        self._file.truncate(keep)
        while self._file.tell() < keep:
            block = self._file.read(min(16 << 20, keep - self._file.tell()))
            if not block:
                raise BtxError(f"{self.tmp_path}: shorter than its checkpoint says ({keep} bytes)")
            self._sha256.update(block)
        self.tokens, self.documents = resume_tokens, resume_documents

    def add_document(self, pieces: Sequence[np.ndarray]) -> None:
        for piece in pieces:
            if piece.size and int(piece.max()) >= self.vocab_size:
                raise BtxError(f"tokenizer: produced id {int(piece.max())}, beyond its vocab_size {self.vocab_size}")
            if self._filled + piece.size > self._buffer.size:
                self._flush()
            if piece.size > self._buffer.size:  # a document longer than the buffer: written as it is
                self._write(piece.astype(self.dtype, copy=False))
            else:
                self._buffer[self._filled : self._filled + piece.size] = piece
                self._filled += piece.size
        self.documents += 1

    def flush(self, durable: bool = False) -> None:
        """Write what is buffered; `durable` also fsyncs (a checkpoint's files must be on disk
        before the checkpoint that points into them)."""
        self._flush()
        self._file.flush()
        if durable:
            os.fsync(self._file.fileno())

    def _flush(self) -> None:
        if self._filled:
            self._write(self._buffer[: self._filled])
            self._filled = 0

    def _write(self, tokens: np.ndarray) -> None:
        data = memoryview(np.ascontiguousarray(tokens)).cast("B")
        self._file.write(data)
        self._sha256.update(data)
        self.tokens += tokens.size

    def finish(self) -> str:
        """Flush and fsync; returns the sha256 of the file's contents."""
        self._flush()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        return self._sha256.hexdigest()

    def commit(self) -> None:
        os.replace(self.tmp_path, self.final_path)

    def close(self) -> None:
        """Close, keeping the file (an interrupted resumable preparation)."""
        if not self._file.closed:
            self._file.close()

    def discard(self) -> None:
        """Remove the temporary. Closing flushes what is buffered, which fails again on a full disk:
        that error must not stop the removal (nor that of the other split's temporary)."""
        try:
            if not self._file.closed:
                self._file.close()
        except OSError:
            pass
        finally:
            self.tmp_path.unlink(missing_ok=True)


@dataclass
class Document:
    key: float  # the document's hash in [0, 1): below val_fraction means val
    pieces: list[np.ndarray]


class Splitter:
    """Routes documents to the train or val writer by their hash, streaming.

    To guarantee both splits at least one document (when val_fraction > 0 and there are two or
    more documents) without a second pass, it holds back the train document with the lowest key
    and the val document with the highest key: the ones nearest the boundary. At the end, if a
    split is empty, the other split's held-back document moves over; otherwise each goes to its
    own split (appended after the rest of that split).
    """

    def __init__(self, train: ShardWriter, val: ShardWriter, val_fraction: float):
        self.writers = {"train": train, "val": val}
        self.val_fraction = val_fraction
        self.held: dict[str, Document | None] = {"train": None, "val": None}

    def add(self, document: Document) -> None:
        split = "val" if document.key < self.val_fraction else "train"
        held = self.held[split]
        # Train keeps back its lowest key, val its highest: the candidates for crossing over.
        nearer_boundary = held is None or (document.key < held.key if split == "train" else document.key > held.key)
        if nearer_boundary:
            self.held[split], document = document, held
        if document is not None:
            self.writers[split].add_document(document.pieces)

    def finish(self) -> None:
        counts = {s: self.writers[s].documents + (self.held[s] is not None) for s in SPLITS}
        if self.val_fraction > 0 and counts["val"] == 0 and counts["train"] >= 2:
            self.held["val"], self.held["train"] = self.held["train"], None
        elif counts["train"] == 0 and counts["val"] >= 1:
            self.held["train"], self.held["val"] = self.held["val"], None
        for split in SPLITS:
            if self.held[split] is not None:
                self.writers[split].add_document(self.held[split].pieces)
                self.held[split] = None


def document_key(text_bytes: bytes, seed_key: bytes) -> float:
    digest = hashlib.blake2b(text_bytes, digest_size=8, key=seed_key).digest()
    return int.from_bytes(digest, "little") / 2.0**64
