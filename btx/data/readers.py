"""Readers of one file (or one Hub dataset) as a stream of documents: `(text, bytes consumed)`.

Formats, by file name:
- `.jsonl`, `.jsonl.gz`, `.jsonl.zst`: one JSON object per line, its text under `text_field`;
- `.parquet`: one row per document, the string column `text_field` (pyarrow, extra `parquet`);
- `.arrow`: an Arrow IPC stream as `datasets.save_to_disk` writes it (pyarrow, extra `parquet`);
  a directory holding `state.json` (a saved `datasets.Dataset`) stands for its `.arrow` files;
- `.txt.gz`, `.gz`, `.zst` and anything else: text, one document per file (or passages, see
  btx.data.sources), decompressed on the fly (`.zst` needs the extra `zstd`);
- `hf:NAME[:CONFIG][@SPLIT]`: a Hub dataset, streamed through `datasets.load_dataset(..., streaming=True)`
  (extra `hf`).

Invariants
- Every reader streams: memory stays about one record batch (parquet/arrow: 1024 rows) or one line,
  whatever the file's size.
- The same documents give the same text whatever the format, so the shards are byte-identical to the
  same documents given as `.jsonl` (tests/test_data_formats.py).
- "bytes consumed" are bytes *of the file* (compressed bytes for compressed files, a row's share of
  the file for columnar files), so progress reaches the file's size exactly at its end.
- Bad input raises one BtxError naming the file and the line, row or column; an optional package that
  is missing raises one naming `pip install 'btx[EXTRA]'`.
"""

from __future__ import annotations

import codecs
import contextlib
import gzip
import importlib
import io
import json
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Iterator

from btx.errors import BtxError, first_line

HF_PREFIX = "hf:"
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")
COLUMNAR_SUFFIXES = (".parquet", ".arrow")
# Files of a `save_to_disk` directory that are metadata, not documents.
DATASETS_METADATA = ("state.json", "dataset_info.json", "dataset_dict.json")
_ROWS_PER_BATCH = 1024

# Optional packages: module -> (pip extra, what it reads).
EXTRAS = {
    "pyarrow": ("parquet", ".parquet/.arrow files and datasets directories"),
    "zstandard": ("zstd", ".zst files"),
    "datasets": ("hf", "hf: datasets"),
}


def optional_module(module: str, what: str) -> Any:
    """Import an optional package, or one BtxError naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        extra = EXTRAS[module][0]
        raise BtxError(f"{what}: reading it needs the optional package {module}; pip install 'btx[{extra}]'") from exc


# ---------------------------------------------------------------------------------------------
# Which reader a file gets
# ---------------------------------------------------------------------------------------------


def is_jsonl(file: Path) -> bool:
    return file.name.endswith(JSONL_SUFFIXES)


def is_columnar(file: Path) -> bool:
    return file.name.endswith(COLUMNAR_SUFFIXES)


def is_text(file: Path) -> bool:
    """A file read as text (one document, or passages): neither jsonl nor columnar."""
    return not is_jsonl(file) and not is_columnar(file)


def file_documents(file: Path, text_field: str) -> Iterator[tuple[str, int]]:
    """The documents of one jsonl or columnar file."""
    if is_jsonl(file):
        return _jsonl_documents(file, text_field)
    if file.name.endswith(".parquet"):
        return _parquet_documents(file, text_field)
    return _arrow_documents(file, text_field)


def text_document(file: Path) -> tuple[str, int]:
    """A (possibly compressed) text file as one document."""
    with open(file, "rb") as raw, _decompressed(raw, file) as handle:
        data = _read_all(handle, file)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BtxError(f"{file}: not UTF-8 text (byte {exc.start}); use a 'glob' to select text files") from exc
    return text, file.stat().st_size


def text_passages(file: Path, least: int) -> Iterator[tuple[str, int]]:
    """A (possibly compressed) text file as passages of at least `least` bytes, each ending at a
    blank line (or at a line end once it is 2 * least long without one), streamed: memory stays
    about one passage. Bytes consumed are the file's (compressed) bytes."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    piece: list[str] = []
    size = 0
    offset = 0
    reported = 0
    with open(file, "rb") as raw, _decompressed(raw, file) as handle:
        while True:
            line = _read_line(handle, file, 2 * least)
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
                position = raw.tell() if line else file.stat().st_size
                yield "".join(piece), position - reported
                reported = position
                piece, size = [], 0
            if not line:
                return


def _decompressed(raw: IO[bytes], file: Path):
    if file.name.endswith(".gz"):
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if file.name.endswith(".zst"):
        zstandard = optional_module("zstandard", str(file))
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=False))
    return contextlib.nullcontext(raw)  # plain: the raw file itself, closed by the outer `with`


def _decompress_error(file: Path, exc: Exception, line: int | None) -> BtxError:
    where = f" after line {line}" if line is not None else ""
    if isinstance(exc, EOFError):
        return BtxError(f"{file}: compressed data ends early{where} (a file cut short?)")
    return BtxError(f"{file}: not valid compressed data{where} ({first_line(exc)})")


_DECOMPRESS_ERRORS = (EOFError, OSError, zlib.error)


def _read_all(handle: IO[bytes], file: Path) -> bytes:
    try:
        return handle.read()
    except _DECOMPRESS_ERRORS as exc:
        raise _decompress_error(file, _zstd_error(exc), None) from exc


def _read_line(handle: IO[bytes], file: Path, limit: int = -1, line: int | None = None) -> bytes:
    try:
        return handle.readline(limit)
    except _DECOMPRESS_ERRORS as exc:
        raise _decompress_error(file, _zstd_error(exc), line) from exc


def _zstd_error(exc: Exception) -> Exception:
    # zstandard reports a truncated frame as a plain ZstdError; name it the way gzip does.
    return EOFError() if "truncated" in str(exc).lower() or "incomplete" in str(exc).lower() else exc


# ---------------------------------------------------------------------------------------------
# jsonl (plain or compressed)
# ---------------------------------------------------------------------------------------------


def _jsonl_documents(file: Path, text_field: str) -> Iterator[tuple[str, int]]:
    with open(file, "rb") as raw, _decompressed(raw, file) as handle:
        compressed = handle is not raw
        line_number, reported = 0, 0
        while True:
            line = _read_line(handle, file, line=line_number)
            if not line:
                if compressed and raw.tell() > reported:  # the compressed file's trailer
                    yield "", raw.tell() - reported
                return
            line_number += 1
            consumed = len(line)
            if compressed:  # progress in compressed bytes (the read-ahead makes it coarse but exact at the end)
                consumed, reported = raw.tell() - reported, raw.tell()
            if not line.strip():
                yield "", consumed  # blank lines are allowed; they still count for progress
                continue
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                reason = exc.msg if isinstance(exc, json.JSONDecodeError) else "not UTF-8"
                raise BtxError(f"{file}:{line_number}: not valid JSON ({reason})") from exc
            text = record.get(text_field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise BtxError(f"{file}:{line_number}: expected a JSON object with a string field {text_field!r}")
            yield text, consumed


# ---------------------------------------------------------------------------------------------
# Columnar: parquet, Arrow streams, datasets directories
# ---------------------------------------------------------------------------------------------


def _column_texts(batch, file: Path, text_field: str, first_row: int) -> list[str]:
    """The strings of `text_field` in a record batch, or one BtxError naming the column or row."""
    pa = optional_module("pyarrow", str(file))
    names = batch.schema.names
    if text_field not in names:
        raise BtxError(f"{file}: no column {text_field!r} (columns: {', '.join(names)}); set text_field")
    column = batch.column(names.index(text_field))
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        raise BtxError(f"{file}: column {text_field!r} holds {column.type}, expected strings")
    texts = column.to_pylist()
    if column.null_count:
        row = first_row + texts.index(None)
        raise BtxError(f"{file}: row {row}: column {text_field!r} is null, expected a string")
    return texts


def _share_documents(texts: list[str], rows_before: int, total_rows: int, file_bytes: int, consumed_before: int):
    """Documents with bytes consumed as their rows' share of the file: the sum is the file's size."""
    for i, text in enumerate(texts):
        position = file_bytes * (rows_before + i + 1) // max(total_rows, 1)
        yield text, position - consumed_before
        consumed_before = position


def _parquet_documents(file: Path, text_field: str) -> Iterator[tuple[str, int]]:
    pa = optional_module("pyarrow", str(file))
    pq = optional_module("pyarrow.parquet", str(file))
    try:
        parquet = pq.ParquetFile(file)
        names = parquet.schema_arrow.names
    except (pa.ArrowException, OSError) as exc:
        raise BtxError(f"{file}: not a readable parquet file ({first_line(exc)})") from exc
    if text_field not in names:
        raise BtxError(f"{file}: no column {text_field!r} (columns: {', '.join(names)}); set text_field")
    total_rows, file_bytes = parquet.metadata.num_rows, file.stat().st_size
    rows, consumed = 0, 0
    batches = parquet.iter_batches(batch_size=_ROWS_PER_BATCH, columns=[text_field])
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            break
        except (pa.ArrowException, OSError) as exc:
            raise BtxError(f"{file}: row {rows}: unreadable parquet data ({first_line(exc)})") from exc
        texts = _column_texts(batch, file, text_field, rows)
        yield from _share_documents(texts, rows, total_rows, file_bytes, consumed)
        rows += len(texts)
        consumed = file_bytes * rows // max(total_rows, 1)
    if total_rows == 0:
        yield "", file_bytes


def _arrow_documents(file: Path, text_field: str) -> Iterator[tuple[str, int]]:
    """An Arrow IPC stream (what `datasets.save_to_disk` writes), read batch by batch (a plain read,
    not a memory map: a mapped file's pages would count in the process's memory as it is read)."""
    pa = optional_module("pyarrow", str(file))
    with pa.OSFile(str(file), "rb") as handle:
        try:
            reader = pa.ipc.open_stream(handle)
        except (pa.ArrowException, OSError) as exc:
            raise BtxError(
                f"{file}: not an Arrow stream as datasets' save_to_disk writes it ({first_line(exc)}); "
                "save it again with datasets' save_to_disk, or give parquet or jsonl"
            ) from exc
        rows, consumed = 0, 0
        while True:
            try:
                batch = reader.read_next_batch()
            except StopIteration:
                break
            except (pa.ArrowException, OSError) as exc:
                raise BtxError(f"{file}: row {rows}: unreadable Arrow data ({first_line(exc)})") from exc
            texts = _column_texts(batch, file, text_field, rows)
            # The batch's bytes of the file, shared out over its rows.
            position = handle.tell()
            yield from _share_documents(texts, 0, len(texts), position - consumed, 0)
            rows += len(texts)
            consumed = position
        if file.stat().st_size > consumed:  # the end-of-stream marker
            yield "", file.stat().st_size - consumed


def datasets_directory_files(directory: Path) -> list[Path] | None:
    """The `.arrow` files of a `datasets.save_to_disk` directory in their order, or None when
    `directory` is not one. A saved DatasetDict (several splits) is an error naming the splits."""
    dict_file = directory / "dataset_dict.json"
    if dict_file.is_file():
        try:
            splits = json.loads(dict_file.read_text(encoding="utf-8"))["splits"]
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            splits = sorted(p.name for p in directory.iterdir() if p.is_dir())
        raise BtxError(
            f"{directory}: a saved DatasetDict with splits {', '.join(map(str, splits))}; give one split's "
            f"directory, e.g. {directory / str(splits[0] if splits else 'train')}"
        )
    state_file = directory / "state.json"
    if not state_file.is_file():
        return None
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
        names = [entry["filename"] for entry in state["_data_files"]]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise BtxError(
            f"{state_file}: not the state.json of datasets' save_to_disk that btx reads (expected "
            f"'_data_files' with 'filename's; from another datasets version?)"
        ) from exc
    files = [directory / name for name in names]
    for file in files:
        if Path(file.name) != Path(str(file.relative_to(directory))) or not file.is_file() or not is_columnar(file):
            raise BtxError(f"{state_file}: lists {file.name!r}, which is not an .arrow file in this directory")
    if not files:
        raise BtxError(f"{state_file}: lists no data files")
    return files


# ---------------------------------------------------------------------------------------------
# Hub datasets: hf:NAME[:CONFIG][@SPLIT]
# ---------------------------------------------------------------------------------------------

_HF_SPEC = re.compile(
    r"hf:(?P<name>[A-Za-z0-9][\w.\-]*(?:/[\w.\-]+)?)"  # NAME or OWNER/NAME
    r"(?::(?P<config>[\w.\-]+))?"  # :CONFIG
    r"(?:@(?P<split>[\w.\-\[\]:%]+))?"  # @SPLIT, slices such as train[:10%] included
)


@dataclass(frozen=True)
class HubSpec:
    name: str
    config: str | None
    split: str

    def __str__(self) -> str:
        return f"{HF_PREFIX}{self.name}{':' + self.config if self.config else ''}@{self.split}"


def parse_hub_spec(spec: str) -> HubSpec:
    """`hf:NAME[:CONFIG][@SPLIT]` -> HubSpec (split "train" when not given)."""
    match = _HF_SPEC.fullmatch(spec)
    if match is None:
        raise BtxError(
            f"{spec}: expected hf:NAME[:CONFIG][@SPLIT], e.g. hf:HuggingFaceFW/fineweb-edu:sample-10BT@train"
        )
    return HubSpec(match["name"], match["config"], match["split"] or "train")


def hub_documents(spec: HubSpec, text_field: str) -> Iterator[tuple[str, int]]:
    datasets = optional_module("datasets", str(spec))
    try:
        rows = datasets.load_dataset(spec.name, spec.config, split=spec.split, streaming=True)
        iterator = iter(rows)
    except Exception as exc:  # offline, unknown name or config: whatever the hub client raises
        raise BtxError(
            f"{spec}: could not open this Hugging Face dataset ({first_line(exc)}); the hub must be reachable "
            "(or its cache filled): otherwise save it with datasets' save_to_disk or as parquet and give that path"
        ) from exc
    index = 0
    while True:
        try:
            row = next(iterator)
        except StopIteration:
            return
        except Exception as exc:  # a connection lost mid-stream
            raise BtxError(f"{spec}: row {index}: reading failed ({first_line(exc)})") from exc
        text = row.get(text_field) if isinstance(row, dict) else None
        if not isinstance(text, str):
            raise BtxError(f"{spec}: row {index}: expected a string field {text_field!r} (fields: {', '.join(row)})")
        index += 1
        yield text, len(text.encode("utf-8"))
