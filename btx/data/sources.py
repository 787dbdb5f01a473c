"""Sources of documents: what a domain's `data.sources` stand for, opened one document at a time.

- A `PathSource` is a file, a directory (walked recursively in sorted order), a glob, or a
  `datasets.save_to_disk` directory; each text file, each jsonl line and each parquet/arrow row (its
  `text_field`) is one document. Formats and compression: btx.data.readers.
- A `HubSource` is `hf:NAME[:CONFIG][@SPLIT]`, a Hub dataset streamed by `datasets`.
- A lone text file is cut into passages so that something can be held out (`btx.data.readers.text_passages`).
- A `PythonSource` wraps a callable or iterable of documents (the demo's built-in corpora).
Each source has an identity (its files' sizes and mtimes, or the callable's qualified name) that
prepare compares to decide whether shards are still current.
"""

from __future__ import annotations

import glob as globlib
import hashlib
import json
import os
import re
from abc import ABC, abstractmethod
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

from btx.data.readers import (
    DATASETS_METADATA,
    HF_PREFIX,
    JSONL_SUFFIXES,
    datasets_directory_files,
    file_documents,
    hub_documents,
    is_text,
    optional_module,
    parse_hub_spec,
    text_document,
    text_passages,
)
from btx.errors import BtxError

# Passages of a lone text file: at least this long, and as many as about _PASSAGES_PER_FILE.
_PASSAGE_BYTES_MIN, _PASSAGE_BYTES_MAX, _PASSAGES_PER_FILE = 64, 64 << 10, 200

GLOB_CHARS = re.compile(r"[*?\[]")
__all__ = ["JSONL_SUFFIXES", "PathSource", "HubSource", "PythonSource", "Source", "resolve_sources"]
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
    """A file, a directory of files (recursive, sorted, hidden files skipped), a glob, or a
    `datasets.save_to_disk` directory. Each file is read by its format (btx.data.readers)."""

    def __init__(self, path: str | os.PathLike, *, glob: str | None = None, text_field: str = "text"):
        self.glob = glob
        self.text_field = text_field
        expanded = Path(path).expanduser()
        if glob is None and GLOB_CHARS.search(str(expanded)):  # a pattern in the path itself
            self.path = Path(os.path.abspath(expanded))
            self.root = _pattern_root(self.path)
            self.files = sorted(
                (Path(p) for p in globlib.glob(str(self.path), recursive=True) if Path(p).is_file()),
                key=lambda p: p.as_posix(),
            )
            if not self.files:
                raise BtxError(f"{path}: the pattern matches no file")
        else:
            self.path = expanded.resolve()
            self.root = self.path.parent
            if not self.path.exists():
                raise BtxError(f"{path}: source not found")
            if self.path.is_dir():
                saved = datasets_directory_files(self.path) if glob is None else None
                if saved is not None:
                    self.files = saved
                else:
                    pattern = glob or "**/*"
                    self.files = sorted(
                        (
                            p
                            for p in self.path.glob(pattern)
                            if p.is_file() and not _is_hidden(p, self.path) and not _datasets_metadata(p)
                        ),
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
        return len(self.files) == 1 and is_text(self.files[0])

    def describe(self) -> dict:
        # A cheap fingerprint (names, sizes, modification times) notices edited or added files
        # without reading the corpus again.
        listing = hashlib.sha256()
        for p in self.files:
            stat = p.stat()
            listing.update(f"{_relative(p, self.root)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
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
            if not is_text(file):
                yield from file_documents(file, self.text_field)
            elif self.passages:
                yield from text_passages(file, passage_bytes(file.stat().st_size))
            else:
                yield text_document(file)


def _pattern_root(pattern: Path) -> Path:
    """The directory above the first component of `pattern` that holds a glob character."""
    parts = pattern.parts
    for i, part in enumerate(parts):
        if GLOB_CHARS.search(part):
            return Path(*parts[:i]).parent if i else Path("/")
    return pattern.parent


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def passage_bytes(file_bytes: int) -> int:
    """The least length of a passage of a lone text file of `file_bytes` bytes."""
    return max(_PASSAGE_BYTES_MIN, min(_PASSAGE_BYTES_MAX, file_bytes // _PASSAGES_PER_FILE))


def _datasets_metadata(path: Path) -> bool:
    """The JSON files of a save_to_disk directory found inside a walked directory: its .arrow files
    are the documents, these are not."""
    return path.name in DATASETS_METADATA and (path.parent / "state.json").is_file()


def _is_hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


class HubSource(Source):
    """`hf:NAME[:CONFIG][@SPLIT]`: a Hugging Face Hub dataset, streamed (`datasets`, extra `hf`).
    Its identity is its name, config, split and text field: a dataset that changes on the Hub under
    the same name is not noticed (prepare with --force)."""

    def __init__(self, spec: str, *, text_field: str = "text"):
        self.spec = parse_hub_spec(spec)
        self.text_field = text_field
        optional_module("datasets", str(self.spec))  # a missing extra fails before anything is written

    def describe(self) -> dict:
        s = self.spec
        return {"hf": s.name, "config": s.config, "split": s.split, "text_field": self.text_field}

    def documents(self) -> Iterator[tuple[str, int]]:
        return hub_documents(self.spec, self.text_field)


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
        elif isinstance(spec, str) and spec.startswith(HF_PREFIX):
            resolved.append(HubSource(spec, text_field=text_field))
        elif isinstance(spec, (str, os.PathLike)):
            resolved.append(PathSource(spec, text_field=text_field))
        elif isinstance(spec, Mapping):
            unknown = set(spec) - {"path", "glob", "text_field"}
            if unknown or "path" not in spec:
                raise BtxError(
                    f"source {dict(spec)!r}: expected keys 'path' and optionally 'glob', 'text_field'"
                    + (f" (unknown: {', '.join(sorted(unknown))})" if unknown else "")
                )
            field = spec.get("text_field", text_field)
            if str(spec["path"]).startswith(HF_PREFIX) and spec.get("glob") is None:
                resolved.append(HubSource(str(spec["path"]), text_field=field))
            else:
                resolved.append(PathSource(spec["path"], glob=spec.get("glob"), text_field=field))
        elif callable(spec) or isinstance(spec, Iterable):
            resolved.append(PythonSource(spec, text_field=text_field))
        else:
            raise BtxError(f"source {spec!r}: expected a path, a dict with 'path', or a callable of documents")
    return resolved
