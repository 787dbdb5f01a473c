"""Sources of documents: what a domain's `data.sources` stand for, opened one document at a time.

- A `PathSource` is a file, a directory (walked recursively in sorted order) or a glob; each text
  file and each jsonl line (its `text_field`) is one document.
- A lone text file is cut into passages (`_passages`) so that something can be held out.
- A `PythonSource` wraps a callable or iterable of documents (the demo's built-in corpora).
Each source has an identity (its files' sizes and mtimes, or the callable's qualified name) that
prepare compares to decide whether shards are still current.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
from abc import ABC, abstractmethod
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

from btx.errors import BtxError

# Passages of a lone text file: at least this long, and as many as about _PASSAGES_PER_FILE.
_PASSAGE_BYTES_MIN, _PASSAGE_BYTES_MAX, _PASSAGES_PER_FILE = 64, 64 << 10, 200

JSONL_SUFFIXES = (".jsonl",)
SourceSpec = Any  # str | PathLike | {"path", "glob", "text_field"} | callable | iterable of documents


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
            listing.update(
                f"{p.relative_to(self.path.parent).as_posix()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode()
            )
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
                    f"{self.name}: document {index}: expected a string or a dict with a string field "
                    f"{self.text_field!r}"
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
