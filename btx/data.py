"""Token shards: preparing them from a domain's documents, reading them, and sampling batches.

Preparing (`prepare_domain`, `prepare_domains`)
- A domain's *sources* are text files, directories, `.jsonl` files and Python callables/iterables
  of documents. Each text file, each jsonl line and each item yielded is one document. Directories
  are walked recursively in sorted order, so the document order is deterministic.
- A domain whose data is one text file (one corpus in one file, given alone or as the only file
  of a directory) would be one document, so nothing could be held out: unless val_fraction is 0,
  such a file is cut into
  *passages* instead (`_passages`): at the first blank line once a passage is at least
  `passage_bytes(file size)` long (64 bytes to 64 KiB: about 200 passages for files up to 12 MB,
  more above), or at the first line end past twice that where no blank line comes. Each passage is
  a document (its own EOS, its own train/val draw).
- With `val_fraction > 0` a domain whose val split ends up empty (a single document) is an error,
  not an empty shard that only a later evaluation would trip over.
- Documents are split into train/val **by document**: a document goes to val when a keyed hash of
  its text (the key is the seed) falls below `val_fraction`. Identical documents therefore always
  land in the same split, and adding documents never moves the others. When `val_fraction > 0` and
  there are at least two documents, both splits get at least one document (see `_Splitter`).
- Text is tokenized in batches and streamed to disk: memory stays bounded by the batch size,
  whatever the corpus size.

Shard format (`btx-tokens-v1`)
- `<split>.bin`: a flat array of token ids, `uint16` when the vocabulary fits (<= 65536), else
  `uint32`, native little-endian. Documents follow each other, each ending with EOS by default.
- `<split>.json`, the sidecar: format, dtype, token and document counts, domain, split, the
  tokenizer's identity (kind, vocab size, hash), the sources, the preparation options and the
  sha256 of the .bin. It is written last, so a shard without a sidecar is not finished.
- Every file is written to a temporary sibling, fsynced and renamed into place, with the same
  permissions as any new file (0666 less the umask, like checkpoints). A domain is prepared under
  a lock on its directory, and the temporaries a killed run left there are removed first.

Sampling (`TokenSampler`, `eval_batches`)
- Training windows of `seq_len + 1` tokens start at random offsets. Everything about a batch is
  derived from `(seed, step)` alone, so **the data position of a run is its step**: a run resumed
  at step N sees exactly the batches it would have seen, with no sampler state to checkpoint.
- With several domains each row's domain is drawn by the mixture weights, also from (seed, step).
- Data-parallel ranks take disjoint slices of one global batch, which does not depend on the
  number of ranks.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch

from btx.errors import BtxError
from btx.manifest import cached_sha256, disk_errors, dumps_json, output_lock, temporary_sibling, write_bytes_atomic
from btx.tokenizer import Tokenizer, fsync_directory, load_tokenizer

SHARD_FORMAT = "btx-tokens-v1"
SPLITS = ("train", "val")
JSONL_SUFFIXES = (".jsonl",)
# Tokenize this many documents (or this much text) per call to the tokenizer's batch encoder.
_ENCODE_BATCH_DOCS = 1024
_ENCODE_BATCH_BYTES = 8 << 20
# Tokens buffered per shard before a write to disk.
_WRITE_BUFFER_TOKENS = 4 << 20
# Passages of a lone text file: at least this long, and as many as about _PASSAGES_PER_FILE.
_PASSAGE_BYTES_MIN, _PASSAGE_BYTES_MAX, _PASSAGES_PER_FILE = 64, 64 << 10, 200
TEST_DELAY_ENV = "BTX_PREPARE_TEST_DELAY"  # test hook: seconds to sleep after each tokenized batch

SourceSpec = Any  # str | PathLike | {"path", "glob", "text_field"} | callable | iterable of documents


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned dtype that holds every id: uint16 up to 65536 ids, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


# --------------------------------------------------------------------------------------------
# Sources of documents
# --------------------------------------------------------------------------------------------


class Source(ABC):
    """One source of documents. `describe()` is JSON for the sidecar and for "already prepared?"."""

    #: Bytes this source will read, for the progress bar; None when unknown (callables).
    total_bytes: int | None = None
    #: False when the source cannot be fingerprinted (a one-shot iterator): never skipped then.
    reproducible: bool = True

    @abstractmethod
    def describe(self) -> dict: ...

    @abstractmethod
    def documents(self) -> Iterator[tuple[str, int]]:
        """Yields (text, bytes consumed) per document."""


class PathSource(Source):
    """A text file, a `.jsonl` file, or a directory of them (recursive, sorted, hidden files skipped)."""

    def __init__(self, path: str | os.PathLike, *, glob: str | None = None, text_field: str = "text"):
        self.path = Path(path).expanduser().resolve()
        self.glob = glob
        self.text_field = text_field
        if not self.path.exists():
            raise BtxError(f"{path}: source not found")
        if self.path.is_dir():
            pattern = glob or "**/*"
            self.files = sorted(
                (p for p in self.path.glob(pattern) if p.is_file() and not _is_hidden(p, self.path)),
                key=lambda p: p.relative_to(self.path).as_posix(),
            )
            if not self.files:
                raise BtxError(f"{path}: no files match {pattern!r} in this directory")
        else:
            if glob is not None:
                raise BtxError(f"{path}: 'glob' applies to directories, but this is a file")
            self.files = [self.path]
        self.total_bytes = sum(p.stat().st_size for p in self.files)
        self.passages = False  # set by prepare_domain for a domain that is this one text file

    @property
    def lone_text_file(self) -> bool:
        return len(self.files) == 1 and not self.files[0].name.endswith(JSONL_SUFFIXES)

    def describe(self) -> dict:
        # A cheap fingerprint (names, sizes, modification times) notices edited or added files
        # without reading the corpus again.
        listing = hashlib.sha256()
        for p in self.files:
            stat = p.stat()
            listing.update(f"{p.relative_to(self.path.parent).as_posix()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        description = {
            "path": str(self.path),
            "glob": self.glob,
            "text_field": self.text_field,
            "files": len(self.files),
            "bytes": self.total_bytes,
            "fingerprint": listing.hexdigest(),
        }
        if self.passages:
            description["documents"] = f"passages of >= {passage_bytes(self.total_bytes)} bytes"
        return description

    def documents(self) -> Iterator[tuple[str, int]]:
        for file in self.files:
            if file.name.endswith(JSONL_SUFFIXES):
                yield from _jsonl_documents(file, self.text_field)
            elif self.passages:
                yield from _passages(file, passage_bytes(file.stat().st_size))
            else:
                data = file.read_bytes()
                try:
                    text = data.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise BtxError(
                        f"{file}: not UTF-8 text (byte {exc.start}); use a 'glob' to select text files"
                    ) from exc
                yield text, len(data)


def passage_bytes(file_bytes: int) -> int:
    """The least length of a passage of a lone text file of `file_bytes` bytes."""
    return max(_PASSAGE_BYTES_MIN, min(_PASSAGE_BYTES_MAX, file_bytes // _PASSAGES_PER_FILE))


def _passages(file: Path, least: int) -> Iterator[tuple[str, int]]:
    """A text file as passages of at least `least` bytes, each ending at a blank line (or at a line
    end once it is 2 * least long without one), streamed: memory stays about one passage."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    piece: list[str] = []
    size = 0
    offset = 0
    with open(file, "rb") as handle:
        while True:
            line = handle.readline(2 * least)
            try:
                text = decoder.decode(line, final=not line)
            except UnicodeDecodeError as exc:
                raise BtxError(f"{file}: not UTF-8 text (byte {offset + exc.start})") from exc
            offset += len(line)
            if text:
                piece.append(text)
                size += len(line)
            at_blank = not line.strip() or not line
            if piece and (not line or (size >= least and at_blank) or size >= 2 * least):
                yield "".join(piece), size
                piece, size = [], 0
            if not line:
                return


def _is_hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _jsonl_documents(file: Path, text_field: str) -> Iterator[tuple[str, int]]:
    with open(file, "rb") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                yield "", len(line)  # blank lines are allowed; they still count for progress
                continue
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                reason = exc.msg if isinstance(exc, json.JSONDecodeError) else "not UTF-8"
                raise BtxError(f"{file}:{line_number}: not valid JSON ({reason})") from exc
            text = record.get(text_field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise BtxError(f"{file}:{line_number}: expected a JSON object with a string field {text_field!r}")
            yield text, len(line)


class PythonSource(Source):
    """A callable returning documents, or an iterable of documents. A document is a string, or a
    dict holding the text under `text_field`. Built-in demo corpora come in this way."""

    def __init__(self, obj: Callable[[], Iterable] | Iterable, *, text_field: str = "text"):
        self.obj = obj
        self.text_field = text_field
        if callable(obj):
            self.name = _qualified_name(obj)
            self._description = {"callable": self.name, "text_field": text_field}
        elif isinstance(obj, (list, tuple)):
            # A list can be fingerprinted cheaply, so re-preparing it is skipped when unchanged.
            self.name = f"{type(obj).__name__} of {len(obj)} documents"
            digest = hashlib.sha256(json.dumps(list(obj), sort_keys=True, default=str).encode()).hexdigest()
            self._description = {"documents": len(obj), "sha256": digest, "text_field": text_field}
        else:
            self.name = type(obj).__name__
            self._description = {"iterable": self.name, "text_field": text_field}
            self.reproducible = False  # a one-shot iterator: nothing to compare a later run against

    def describe(self) -> dict:
        return dict(self._description)

    def documents(self) -> Iterator[tuple[str, int]]:
        items = self.obj() if callable(self.obj) else self.obj
        if isinstance(items, (str, bytes)) or not isinstance(items, Iterable):
            raise BtxError(f"{self.name}: expected an iterable of documents, got {type(items).__name__}")
        for index, item in enumerate(items):
            text = item.get(self.text_field) if isinstance(item, Mapping) else item
            if not isinstance(text, str):
                raise BtxError(
                    f"{self.name}: document {index}: expected a string or a dict with a string field {self.text_field!r}"
                )
            yield text, len(text.encode("utf-8"))


def _qualified_name(fn: Callable) -> str:
    if isinstance(fn, partial):
        arguments = [repr(a) for a in fn.args] + [f"{k}={v!r}" for k, v in sorted(fn.keywords.items())]
        return f"{_qualified_name(fn.func)}({', '.join(arguments)})"
    module = getattr(fn, "__module__", None) or "?"
    return f"{module}.{getattr(fn, '__qualname__', type(fn).__qualname__)}"


def resolve_sources(sources: SourceSpec | Sequence[SourceSpec], *, text_field: str = "text") -> list[Source]:
    """Turn source specs into `Source` objects, checking that every path exists (before anything is
    written). A spec is a path, a dict `{"path", "glob", "text_field"}`, a callable returning
    documents, or a generator of documents; a list of specs combines several.

    A list of strings is a list of *paths*. Documents held in memory come as a callable, a
    `PythonSource([...])`, or a list nested inside the list of specs."""
    if isinstance(sources, (str, os.PathLike, Mapping, Source)) or callable(sources):
        sources = [sources]
    elif isinstance(sources, Iterator):
        sources = [PythonSource(sources, text_field=text_field)]  # a generator of documents
    resolved: list[Source] = []
    for spec in sources:
        if isinstance(spec, Source):
            resolved.append(spec)
        elif isinstance(spec, (str, os.PathLike)):
            resolved.append(PathSource(spec, text_field=text_field))
        elif isinstance(spec, Mapping):
            unknown = set(spec) - {"path", "glob", "text_field"}
            if unknown or "path" not in spec:
                raise BtxError(
                    f"source {dict(spec)!r}: expected keys 'path' and optionally 'glob', 'text_field'"
                    + (f" (unknown: {', '.join(sorted(unknown))})" if unknown else "")
                )
            resolved.append(
                PathSource(spec["path"], glob=spec.get("glob"), text_field=spec.get("text_field", text_field))
            )
        elif callable(spec) or isinstance(spec, Iterable):
            resolved.append(PythonSource(spec, text_field=text_field))
        else:
            raise BtxError(f"source {spec!r}: expected a path, a dict with 'path', or a callable of documents")
    return resolved


# --------------------------------------------------------------------------------------------
# Writing shards
# --------------------------------------------------------------------------------------------


class _ShardWriter:
    """Streams token ids into a temporary sibling of `<split>.bin`; `commit` renames it into place."""

    def __init__(self, final_path: Path, dtype: np.dtype, vocab_size: int):
        self.final_path = final_path
        self.dtype = dtype
        self.vocab_size = vocab_size
        self.tmp_path = temporary_sibling(final_path)
        # 0666 less the umask, as for every other file btx writes (mkstemp would make it 0600).
        self._file = os.fdopen(os.open(self.tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb")
        self._sha256 = hashlib.sha256()
        self._pending: list[np.ndarray] = []
        self._pending_tokens = 0
        self.tokens = 0
        self.documents = 0

    def add_document(self, pieces: Sequence[np.ndarray]) -> None:
        self._pending.extend(pieces)
        self._pending_tokens += sum(len(p) for p in pieces)
        self.documents += 1
        if self._pending_tokens >= _WRITE_BUFFER_TOKENS:
            self._flush()

    def flush(self) -> None:
        self._flush()
        self._file.flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        chunk = np.concatenate(self._pending)
        if chunk.size and int(chunk.max()) >= self.vocab_size:
            raise BtxError(f"tokenizer: produced id {int(chunk.max())}, beyond its vocab_size {self.vocab_size}")
        data = chunk.astype(self.dtype, copy=False).tobytes()
        self._file.write(data)
        self._sha256.update(data)
        self.tokens += chunk.size
        self._pending, self._pending_tokens = [], 0

    def finish(self) -> str:
        """Flush and fsync; returns the sha256 of the file's contents."""
        self._flush()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        return self._sha256.hexdigest()

    def commit(self) -> None:
        os.replace(self.tmp_path, self.final_path)

    def discard(self) -> None:
        if not self._file.closed:
            self._file.close()
        self.tmp_path.unlink(missing_ok=True)


@dataclass
class _Document:
    key: float  # the document's hash in [0, 1): below val_fraction means val
    pieces: list[np.ndarray]


class _Splitter:
    """Routes documents to the train or val writer by their hash, streaming.

    To guarantee both splits at least one document (when val_fraction > 0 and there are two or
    more documents) without a second pass, it holds back the train document with the lowest key
    and the val document with the highest key: the ones nearest the boundary. At the end, if a
    split is empty, the other split's held-back document moves over; otherwise each goes to its
    own split (appended after the rest of that split).
    """

    def __init__(self, train: _ShardWriter, val: _ShardWriter, val_fraction: float):
        self.writers = {"train": train, "val": val}
        self.val_fraction = val_fraction
        self.held: dict[str, _Document | None] = {"train": None, "val": None}

    def add(self, document: _Document) -> None:
        split = "val" if document.key < self.val_fraction else "train"
        held = self.held[split]
        # Train keeps back its lowest key, val its highest: the candidates for crossing over.
        nearer_boundary = held is None or (
            document.key < held.key if split == "train" else document.key > held.key
        )
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


def _document_key(text_bytes: bytes, seed_key: bytes) -> float:
    digest = hashlib.blake2b(text_bytes, digest_size=8, key=seed_key).digest()
    return int.from_bytes(digest, "little") / 2.0**64


# --------------------------------------------------------------------------------------------
# prepare_domain / prepare_domains
# --------------------------------------------------------------------------------------------


def prepare_domain(
    name: str,
    sources: SourceSpec | Sequence[SourceSpec],
    tokenizer: Tokenizer | str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    val_fraction: float = 0.05,
    seed: int = 0,
    text_field: str = "text",
    append_eos: bool = True,
    progress: bool = True,
) -> dict:
    """Tokenize one domain into `out_dir/{train,val}.bin` with their `.json` sidecars.

    Returns `{"domain", "out_dir", "train": sidecar, "val": sidecar, "skipped": False, "seconds"}`.
    Raises BtxError, leaving no shard file behind, for a missing source, a bad jsonl line or an
    empty domain. Existing shards in `out_dir` are replaced only once the new ones are complete.
    """
    started = time.monotonic()
    _check_domain_name(name)
    if not 0.0 <= val_fraction < 1.0:
        raise BtxError(f"domain '{name}': val_fraction must be in [0, 1), got {val_fraction}")
    _check_seed(seed, f"domain '{name}': seed")
    tokenizer = load_tokenizer(tokenizer)
    if append_eos and tokenizer.eos_id is None:
        raise BtxError(f"domain '{name}': the tokenizer has no EOS token; set append_eos=False or name one")
    resolved = resolve_sources(sources, text_field=text_field)  # fails on a missing path, before any write
    mark_passages(resolved, val_fraction)
    out_dir = Path(out_dir)
    with output_lock(out_dir, f"domain '{name}'"), \
            disk_errors(out_dir, _shard_bytes_bound(resolved, tokenizer), f"the shards of domain '{name}'", "up to"):
        return _prepare_locked(name, resolved, tokenizer, out_dir, val_fraction, seed, text_field, append_eos,
                               progress, started)


def mark_passages(resolved: list[Source], val_fraction: float) -> None:
    """A domain that is one text file is read as passages when something is to be held out (see
    the module docstring); with val_fraction 0 it stays one document."""
    if val_fraction > 0 and len(resolved) == 1 and isinstance(resolved[0], PathSource) and resolved[0].lone_text_file:
        resolved[0].passages = True


def _shard_bytes_bound(resolved: list[Source], tokenizer: Tokenizer) -> int | None:
    """At most one token per input byte (plus EOS): an upper bound of the shards' size."""
    totals = [s.total_bytes for s in resolved]
    if any(t is None for t in totals):
        return None
    return 2 * sum(totals) * token_dtype(tokenizer.vocab_size).itemsize


def _remove_leftovers(out_dir: Path) -> None:
    """Temporaries of the shard files that a killed run left (the caller holds the domain's lock,
    so no live writer owns any), whatever their naming (older btx used mkstemp names)."""
    names = [f"{split}.{ext}" for split in SPLITS for ext in ("bin", "json")]
    for entry in out_dir.iterdir():
        if entry.is_file() and any(entry.name.startswith(f".{n}.") for n in names):
            entry.unlink(missing_ok=True)


def _prepare_locked(name, resolved, tokenizer, out_dir: Path, val_fraction, seed, text_field, append_eos,
                    progress, started) -> dict:
    descriptions = [s.describe() for s in resolved]
    options = _options(val_fraction, seed, text_field, append_eos)
    created_dir = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(out_dir)
    delay = float(os.environ.get(TEST_DELAY_ENV, 0) or 0)
    dtype = token_dtype(tokenizer.vocab_size)
    writers: dict[str, _ShardWriter] = {}
    try:
        for split in SPLITS:
            writers[split] = _ShardWriter(out_dir / f"{split}.bin", dtype, tokenizer.vocab_size)
        splitter = _Splitter(writers["train"], writers["val"], val_fraction)
        eos = np.array([tokenizer.eos_id], dtype=np.uint32) if append_eos else None
        seed_key = int(seed).to_bytes(8, "little")

        def tokenize(texts: list[str]) -> None:
            for text, ids in zip(texts, tokenizer.encode_batch(texts)):
                pieces = [ids, eos] if eos is not None else [ids]
                if sum(len(p) for p in pieces) == 0:
                    continue  # a document that tokenizes to nothing is not a document
                splitter.add(_Document(_document_key(text.encode("utf-8"), seed_key), pieces))
            if delay and texts:  # test hook: a slow preparation, with its temporaries on disk
                for writer in writers.values():
                    writer.flush()
                time.sleep(delay)

        with _Progress(name, resolved, enabled=progress) as bar:
            pending, pending_bytes = [], 0
            for source in resolved:
                for text, consumed in source.documents():
                    bar.advance(consumed, documents=1 if text else 0)
                    if not text:
                        continue
                    pending.append(text)
                    pending_bytes += consumed
                    if len(pending) >= _ENCODE_BATCH_DOCS or pending_bytes >= _ENCODE_BATCH_BYTES:
                        tokenize(pending)
                        pending, pending_bytes = [], 0
            tokenize(pending)
        splitter.finish()

        digests = {split: writer.finish() for split, writer in writers.items()}
        where = ", ".join(d.get("path") or d.get("callable") or d.get("iterable") or "documents" for d in descriptions)
        if writers["train"].tokens == 0:
            raise BtxError(f"domain '{name}': no documents with any tokens in {where or 'its sources'}")
        if val_fraction > 0 and writers["val"].tokens == 0:
            lone = resolved[0] if len(resolved) == 1 and getattr(resolved[0], "passages", False) else None
            what = (f"one passage (a lone text file is cut at blank lines into passages of at least "
                    f"{passage_bytes(lone.total_bytes)} bytes)" if lone else f"{writers['train'].documents} document")
            raise BtxError(f"domain '{name}': nothing to hold out for validation: {where or 'its sources'} holds "
                           f"{what}, and a validation split needs a second; give more text, or several documents "
                           "(a directory of files, a .jsonl file with one per line)")

        sidecars = {
            split: {
                "format": SHARD_FORMAT,
                "dtype": dtype.name,
                "tokens": writers[split].tokens,
                "documents": writers[split].documents,
                "domain": name,
                "split": split,
                "bin": f"{split}.bin",
                "tokenizer": tokenizer.identity(),
                "sources": descriptions,
                "options": options,
                "sha256": digests[split],
            }
            for split in SPLITS
        }
        # Old sidecars go first: from here until the new sidecars exist the domain reads as
        # unprepared, never as old metadata describing new token files.
        for split in SPLITS:
            (out_dir / f"{split}.json").unlink(missing_ok=True)
        for writer in writers.values():
            writer.commit()
        fsync_directory(out_dir)
        for split in SPLITS:
            write_bytes_atomic(out_dir / f"{split}.json", _json_bytes(sidecars[split]))
    except BaseException:
        for writer in writers.values():
            writer.discard()
        if created_dir:
            _remove_if_empty(out_dir)
        raise

    return {
        "domain": name,
        "out_dir": str(out_dir),
        "train": sidecars["train"],
        "val": sidecars["val"],
        "skipped": False,
        "seconds": round(time.monotonic() - started, 3),
    }


_DOMAIN_OPTIONS = ("val_fraction", "seed", "text_field", "append_eos")


def prepare_domains(
    domains: Mapping[str, Any],
    tokenizer: Tokenizer | str | os.PathLike,
    out_root: str | os.PathLike,
    *,
    force: bool = False,
    progress: bool = True,
    **defaults: Any,
) -> dict[str, dict]:
    """Prepare each domain into `out_root/<name>/`.

    `domains` maps a name to its sources, or to a dict `{"sources": ..., "val_fraction": ...,
    "seed": ..., "text_field": ..., "append_eos": ...}` whose options override `defaults`.
    A domain whose sidecars already record the same sources, tokenizer and options (and whose
    .bin sizes check out) is skipped unless `force`; its summary then has `"skipped": True`.
    """
    unknown = set(defaults) - set(_DOMAIN_OPTIONS)
    if unknown:
        raise TypeError(f"prepare_domains: unknown option(s) {', '.join(sorted(unknown))}")
    tokenizer = load_tokenizer(tokenizer)
    out_root = Path(out_root)
    summaries: dict[str, dict] = {}
    for name, spec in domains.items():
        if isinstance(spec, Mapping) and "sources" in spec:
            extra = set(spec) - {"sources", *_DOMAIN_OPTIONS}
            if extra:
                raise BtxError(
                    f"domain '{name}': unknown key(s) {', '.join(sorted(extra))} "
                    f"(expected sources, {', '.join(_DOMAIN_OPTIONS)})"
                )
            sources = spec["sources"]
            options = {**defaults, **{k: v for k, v in spec.items() if k != "sources"}}
        else:
            sources, options = spec, dict(defaults)
        _check_domain_name(name)
        out_dir = out_root / name
        if not force:
            existing = _already_prepared(name, sources, tokenizer, out_dir, options)
            if existing is not None:
                summaries[name] = existing
                continue
        summaries[name] = prepare_domain(name, sources, tokenizer, out_dir, progress=progress, **options)
    return summaries


def _already_prepared(name: str, sources, tokenizer: Tokenizer, out_dir: Path, options: dict) -> dict | None:
    """The summary of a finished, matching preparation in `out_dir`, or None."""
    if not all((out_dir / f"{split}.json").is_file() for split in SPLITS):
        return None
    resolved = resolve_sources(sources, text_field=options.get("text_field", "text"))
    mark_passages(resolved, options.get("val_fraction", 0.05))
    if not all(s.reproducible for s in resolved):
        return None
    wanted_options = _options(
        options.get("val_fraction", 0.05), options.get("seed", 0), options.get("text_field", "text"),
        options.get("append_eos", True),
    )
    sidecars = {}
    for split in SPLITS:
        try:
            shard = load_shard(out_dir / f"{split}.json", verify=True)
        except BtxError as e:  # damaged (a changed byte too: the sha256 is checked) or partial: prepare again
            from rich.console import Console

            Console(stderr=True).print(f"[yellow]prepare {name}: {e}; preparing it again[/]", soft_wrap=True,
                                       highlight=False)
            return None
        meta = shard.meta
        if (
            meta.get("domain") != name
            or meta.get("tokenizer", {}).get("hash") != tokenizer.identity()["hash"]
            or meta.get("sources") != [s.describe() for s in resolved]
            or meta.get("options") != wanted_options
        ):
            return None
        sidecars[split] = meta
    return {"domain": name, "out_dir": str(out_dir), **sidecars, "skipped": True, "seconds": 0.0}


def _options(val_fraction: float, seed: int, text_field: str, append_eos: bool) -> dict:
    return {"val_fraction": float(val_fraction), "seed": int(seed), "text_field": text_field, "append_eos": bool(append_eos)}


def _check_domain_name(name: str) -> None:
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name:
        raise BtxError(f"domain name {name!r}: expected a non-empty name usable as a directory name")


def _check_seed(seed: int, what: str) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**63:
        raise BtxError(f"{what}: expected a non-negative integer, got {seed!r}")


def _remove_if_empty(directory: Path) -> None:
    try:
        directory.rmdir()
    except OSError:
        pass


def _json_bytes(obj) -> bytes:
    return (dumps_json(obj, indent=2) + "\n").encode("utf-8")


class _Progress:
    """A rich progress bar over bytes read and documents seen (on stderr); a no-op when disabled."""

    def __init__(self, name: str, sources: Sequence[Source], *, enabled: bool):
        self.enabled = enabled
        totals = [s.total_bytes for s in sources]
        self.total = None if any(t is None for t in totals) else sum(totals)
        self.name = name
        self.documents = 0

    def __enter__(self) -> "_Progress":
        if self.enabled:
            from rich.console import Console
            from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                                       TransferSpeedColumn)

            self._progress = Progress(
                TextColumn("[bold]prepare {task.description}"),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TextColumn("{task.fields[documents]} docs"),
                TimeRemainingColumn(),
                console=Console(stderr=True),
                transient=False,
            )
            self._progress.__enter__()
            self._task = self._progress.add_task(self.name, total=self.total, documents=0)
        return self

    def advance(self, consumed: int, documents: int) -> None:
        if self.enabled:
            self.documents += documents
            self._progress.update(self._task, advance=consumed, documents=self.documents)

    def __exit__(self, *exc_info) -> None:
        if self.enabled:
            self._progress.__exit__(*exc_info)


# --------------------------------------------------------------------------------------------
# Reading shards
# --------------------------------------------------------------------------------------------


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
        it last changed: `btx.manifest.cached_sha256`)."""
        if cached_sha256(self.path) != self.meta["sha256"]:
            raise BtxError(f"{self.path}: contents do not match the sha256 in its sidecar (corrupted or edited "
                           "after btx prepare); prepare the domain again (btx prepare ... --force)")


_SIDECAR_KEYS = {"format": str, "dtype": str, "tokens": int, "documents": int, "domain": str, "split": str,
                 "tokenizer": dict, "sha256": str}


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
        raise BtxError(f"{sidecar_path}: expected \"format\": \"{SHARD_FORMAT}\", found {found!r}")
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
        raise BtxError(f"{bin_path}: {state}: expected {expected_bytes} bytes ({meta['tokens']} tokens), found {actual_bytes}")
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
            f"vocab {found.get('vocab_size')}), expected {expected.get('kind')} (hash {str(expected.get('hash'))[:12]}, "
            f"vocab {expected.get('vocab_size')}); prepare the data again with this tokenizer"
        )


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------


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
        _check_seed(seed, "seed")
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

    def __init__(self, shards: Mapping[str, Shard], plan: Sequence[Sequence[DataStream]], *, seq_len: int,
                 batch_size: int):
        self.samplers: list[TokenSampler] = []
        self.order: list[tuple[int, int]] = []  # (stream, its micro-batch) for every index of the plan
        for phase in plan:
            keys = []
            for stream in phase:
                missing = [d for d in stream.domains if d not in shards]
                if missing:
                    raise BtxError(f"data plan: stream over {stream.domains} names {missing}, which have no train shard")
                if stream.count < 0 or stream.first < 0:
                    raise BtxError(f"data plan: stream over {stream.domains}: first and count must be >= 0")
                weights = None if stream.weights is None else {d: stream.weights[d] for d in stream.domains}
                sampler = TokenSampler({d: shards[d] for d in stream.domains}, weights, seq_len=seq_len,
                                       batch_size=batch_size, seed=stream.seed)
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
                raise BtxError(f"{shard.path}: a second shard for domain '{shard.domain}'; pass a dict of names to shards")
            named[shard.domain] = shard
    if not named:
        raise BtxError("shards: expected at least one shard")
    return named


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


__all__ = [
    "SHARD_FORMAT",
    "PathSource",
    "PythonSource",
    "DataStream",
    "PlannedSampler",
    "Shard",
    "Source",
    "TokenSampler",
    "check_tokenizer",
    "eval_batches",
    "load_domain",
    "load_shard",
    "prepare_domain",
    "prepare_domains",
    "resolve_sources",
    "token_dtype",
]


_DOMAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def shard_spec_path(spec: str | os.PathLike, label: str, split: str = "val") -> Path:
    """The shard a command-line DOMAIN=PATH names: a `.bin`/`.json` shard made by btx prepare, or a
    prepared domain directory (its `split` shard). `label` names the flag, e.g. "--data code=dir"."""
    path = Path(spec).expanduser()
    if not path.exists():
        raise BtxError(f"{path}: not found ({label})")
    if path.is_dir():
        if not (path / f"{split}.json").is_file():
            raise BtxError(f"{path}: a directory without {split}.json ({label}); expected a btx shard "
                           ".bin/.json or a prepared domain directory")
        return path / f"{split}.json"
    if path.suffix not in (".bin", ".json"):
        raise BtxError(f"{path}: not a btx token shard ({label}); expected a .bin/.json shard made "
                       "by btx prepare, or a prepared domain directory")
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
