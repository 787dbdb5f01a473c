"""Preparing token shards from a domain's documents (`prepare_domain`, `prepare_domains`).

- A domain's *sources* are files of any format btx.data.readers reads (text, jsonl, parquet, arrow,
  compressed), directories, globs, `hf:` datasets and Python callables/iterables of documents. Each
  text file, jsonl line, parquet/arrow row and item yielded is one document. Directories and globs
  are walked in sorted order, so the document order is deterministic.
- A domain whose data is one text file (one corpus in one file, given alone or as the only file
  of a directory) would be one document, so nothing could be held out: unless val_fraction is 0,
  such a file is cut into
  *passages* instead (`btx.data.readers.text_passages`): at the first blank line once a passage is at least
  `passage_bytes(file size)` long (64 bytes to 64 KiB: about 200 passages for files up to 12 MB,
  more above), or at the first line end past twice that where no blank line comes. Each passage is
  a document (its own EOS, its own train/val draw).
- With `val_fraction > 0` a domain whose val split ends up empty (a single document) is an error,
  not an empty shard that only a later evaluation would trip over.
- Documents are split into train/val **by document**: a document goes to val when a keyed hash of
  its text (the key is the seed) falls below `val_fraction`. Identical documents therefore always
  land in the same split, and adding documents never moves the others. When `val_fraction > 0` and
  there are at least two documents, both splits get at least one document (see `Splitter`).
- Documents are read in chunks (1024 documents or 8 MB) and tokenized in this process or in
  `workers` processes (btx.data.encode), chunks taken back in order: the shards are byte-identical
  for any number of workers, and memory stays bounded by a few chunks, whatever the corpus size.
- Resumable: every few seconds a checkpoint (btx.data.resume) records how far the sources were
  read; a killed preparation run again resumes from it and ends with the same bytes.

A domain is prepared under a lock on its directory, and the temporaries a killed run left there are
removed first (unless its checkpoint resumes them). The shard format is btx/data/shards.py's.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from btx.data.encode import Chunk, EncodeOptions, encode_chunks
from btx.data.resume import clear_state, load_state, resume_key, save_state
from btx.data.shards import SHARD_FORMAT, SPLITS, load_shard, token_dtype
from btx.data.sources import (
    PathSource,
    Source,
    SourceSpec,
    passage_bytes,
    resolve_sources,
)
from btx.data.tokenizer import Tokenizer, load_tokenizer
from btx.data.writer import Document, ShardWriter, Splitter
from btx.errors import BtxError
from btx.io.atomic import dumps_json, fsync_dir, write_bytes_atomic
from btx.io.disk import disk_errors
from btx.io.locks import output_lock

# Tokenize this many documents (or this much text) per call to the tokenizer's batch encoder.
_ENCODE_BATCH_DOCS = 1024
_ENCODE_BATCH_BYTES = 8 << 20
TEST_DELAY_ENV = "BTX_PREPARE_TEST_DELAY"  # test hook: seconds to sleep after each tokenized batch
# Test hook: checkpoint after every chunk, and SIGKILL this process after this many chunks.
TEST_KILL_ENV = "BTX_PREPARE_TEST_KILL_AFTER_CHUNKS"
# A checkpoint (fsync of the partial shards, then the state) at most this often.
_CHECKPOINT_SECONDS = 5.0


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
    workers: int = 1,
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
    check_seed(seed, f"domain '{name}': seed")
    tokenizer = load_tokenizer(tokenizer)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise BtxError(f"prepare workers: expected a positive integer, got {workers!r}")
    if append_eos and tokenizer.eos_id is None:
        raise BtxError(f"domain '{name}': the tokenizer has no EOS token; set append_eos=False or name one")
    resolved = resolve_sources(sources, text_field=text_field)  # fails on a missing path, before any write
    mark_passages(resolved, val_fraction)
    out_dir = Path(out_dir)
    with (
        output_lock(out_dir, f"domain '{name}'"),
        disk_errors(out_dir, _shard_bytes_bound(resolved, tokenizer), f"the shards of domain '{name}'", "up to"),
    ):
        return _prepare_locked(
            name, resolved, tokenizer, out_dir, val_fraction, seed, text_field, append_eos, progress, started, workers
        )


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


def _remove_leftovers(out_dir: Path, keep_partials: bool) -> None:
    """Temporaries of the shard files that a killed run left (the caller holds the domain's lock,
    so no live writer owns any), whatever their naming (older btx used mkstemp names); the
    `.partial` files too, unless a matching checkpoint resumes them."""
    names = [f"{split}.{ext}" for split in SPLITS for ext in ("bin", "json")]
    for entry in out_dir.iterdir():
        if entry.is_file() and any(entry.name.startswith(f".{n}.") for n in names):
            if keep_partials and entry.name.endswith(".partial"):
                continue
            entry.unlink(missing_ok=True)


def _chunks(resolved: Sequence[Source], skip: int) -> Iterator[Chunk]:
    """The sources' documents in chunks of up to _ENCODE_BATCH_DOCS documents or
    _ENCODE_BATCH_BYTES bytes, after the first `skip` documents (read, not tokenized: resume)."""
    texts: list[str] = []
    documents, consumed_bytes, seen = 0, 0, 0
    for source in resolved:
        for text, consumed in source.documents():
            seen += 1
            if seen <= skip:
                continue
            documents += 1
            consumed_bytes += consumed
            if text:
                texts.append(text)
            if len(texts) >= _ENCODE_BATCH_DOCS or consumed_bytes >= _ENCODE_BATCH_BYTES:
                yield Chunk(texts, documents, consumed_bytes)
                texts, documents, consumed_bytes = [], 0, 0
    if documents:
        yield Chunk(texts, documents, consumed_bytes)


def _prepare_locked(
    name, resolved, tokenizer, out_dir: Path, val_fraction, seed, text_field, append_eos, progress, started, workers
) -> dict:
    descriptions = [s.describe() for s in resolved]
    options = _options(val_fraction, seed, text_field, append_eos)
    created_dir = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(tokenizer.vocab_size)
    key = resume_key(descriptions, tokenizer.identity(), options, dtype)
    # Only sources that read the same documents again can be resumed (a one-shot iterator cannot).
    resumable = all(s.reproducible for s in resolved)
    state = load_state(out_dir, key, dtype) if resumable else None
    _remove_leftovers(out_dir, keep_partials=state is not None)
    if state is None:
        clear_state(out_dir)
    delay = float(os.environ.get(TEST_DELAY_ENV, 0) or 0)
    kill_after = int(os.environ.get(TEST_KILL_ENV, 0) or 0)
    writers: dict[str, ShardWriter] = {}
    resumed = {"documents": 0, "bytes": 0, "chunks": 0}
    try:
        for split in SPLITS:
            done = state["splits"][split] if state else {"tokens": 0, "documents": 0}
            writers[split] = ShardWriter(
                out_dir / f"{split}.bin",
                dtype,
                tokenizer.vocab_size,
                resumable=resumable,
                resume_tokens=int(done["tokens"]),
                resume_documents=int(done["documents"]),
            )
        splitter = Splitter(writers["train"], writers["val"], val_fraction)
        if state:
            splitter.held = state["held"]
            resumed = {"documents": state["documents_read"], "bytes": state["bytes_read"], "chunks": state["chunks"]}
        encode_options = EncodeOptions(
            seed_key=int(seed).to_bytes(8, "little"),
            eos_id=tokenizer.eos_id if append_eos else None,
            vocab_size=tokenizer.vocab_size,
            dtype=dtype.name,
        )
        documents_read, bytes_read, chunks = resumed["documents"], resumed["bytes"], resumed["chunks"]
        last_checkpoint = time.monotonic()
        with _Progress(name, resolved, enabled=progress, resumed=resumed) as bar:
            stream = _chunks(resolved, skip=resumed["documents"])
            for encoded in encode_chunks(stream, tokenizer, encode_options, workers):
                for document_key_, tokens in encoded.packed.documents():
                    splitter.add(Document(document_key_, [tokens]))
                chunk = encoded.chunk
                documents_read += chunk.documents_read
                bytes_read += chunk.bytes_read
                chunks += 1
                bar.advance(chunk.bytes_read, documents=len(chunk.texts), tokens=encoded.tokens)
                if resumable and (kill_after or time.monotonic() - last_checkpoint >= _CHECKPOINT_SECONDS):
                    where = {"documents_read": documents_read, "bytes_read": bytes_read, "chunks": chunks}
                    save_state(out_dir, key, writers, splitter, **where)
                    last_checkpoint = time.monotonic()
                    if kill_after and chunks - resumed["chunks"] >= kill_after:  # test hook: a kill -9 here
                        os.kill(os.getpid(), signal.SIGKILL)
                if delay:  # test hook: a slow preparation, with its temporaries on disk
                    for writer in writers.values():
                        writer.flush()
                    time.sleep(delay)
        splitter.finish()

        digests = {split: writer.finish() for split, writer in writers.items()}
        if resumed["documents"] and progress:
            Console(stderr=True).print(
                f"prepare {name}: resumed a killed run after {resumed['documents']:,} documents "
                f"({resumed['bytes'] / 1e6:,.1f} MB, {resumed['chunks']} chunks) that were not tokenized again",
                highlight=False,
            )
        where = ", ".join(d.get("path") or d.get("callable") or d.get("iterable") or "documents" for d in descriptions)
        if writers["train"].tokens == 0:
            raise BtxError(f"domain '{name}': no documents with any tokens in {where or 'its sources'}")
        if val_fraction > 0 and writers["val"].tokens == 0:
            lone = resolved[0] if len(resolved) == 1 and getattr(resolved[0], "passages", False) else None
            what = (
                f"one passage (a lone text file is cut at blank lines into passages of at least "
                f"{passage_bytes(lone.total_bytes)} bytes)"
                if lone
                else f"{writers['train'].documents} document"
            )
            raise BtxError(
                f"domain '{name}': nothing to hold out for validation: {where or 'its sources'} holds "
                f"{what}, and a validation split needs a second; give more text, or several documents "
                "(a directory of files, a .jsonl file with one per line)"
            )

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
        fsync_dir(out_dir)
        for split in SPLITS:
            write_bytes_atomic(out_dir / f"{split}.json", _json_bytes(sidecars[split]))
        clear_state(out_dir)
    except (KeyboardInterrupt, SystemExit):
        # Interrupted, not wrong: the partial files and the last checkpoint stay for the next run.
        for writer in writers.values():
            writer.close()
        raise
    except BaseException:
        for writer in writers.values():
            writer.discard()
        clear_state(out_dir)
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
        "resumed": resumed,
    }


_DOMAIN_OPTIONS = ("val_fraction", "seed", "text_field", "append_eos")


def prepare_domains(
    domains: Mapping[str, Any],
    tokenizer: Tokenizer | str | os.PathLike,
    out_root: str | os.PathLike,
    *,
    force: bool = False,
    progress: bool = True,
    workers: int = 1,
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
        summaries[name] = prepare_domain(
            name, sources, tokenizer, out_dir, progress=progress, workers=workers, **options
        )
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
        options.get("val_fraction", 0.05),
        options.get("seed", 0),
        options.get("text_field", "text"),
        options.get("append_eos", True),
    )
    sidecars = {}
    for split in SPLITS:
        try:
            shard = load_shard(out_dir / f"{split}.json", verify=True)
        except BtxError as e:  # damaged (a changed byte too: the sha256 is checked) or partial: prepare again
            Console(stderr=True).print(
                f"[yellow]prepare {name}: {e}; preparing it again[/]", soft_wrap=True, highlight=False
            )
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
    return {
        "val_fraction": float(val_fraction),
        "seed": int(seed),
        "text_field": text_field,
        "append_eos": bool(append_eos),
    }


def _check_domain_name(name: str) -> None:
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name:
        raise BtxError(f"domain name {name!r}: expected a non-empty name usable as a directory name")


def check_seed(seed: int, what: str) -> None:
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
    """A rich progress bar per domain (on stderr): bytes read against the sources' size, with
    documents/s, tokens/s, MB/s and the time left; a no-op when disabled. Rates count this run's
    work only (a resumed run starts the bar at the bytes it skipped)."""

    def __init__(self, name: str, sources: Sequence[Source], *, enabled: bool, resumed: Mapping[str, int]):
        self.enabled = enabled
        totals = [s.total_bytes for s in sources]
        self.total = None if any(t is None for t in totals) else sum(totals)
        self.name = name
        self.skipped_bytes = int(resumed.get("bytes", 0))
        self.documents = self.tokens = self.bytes = 0

    def __enter__(self) -> "_Progress":
        if self.enabled:
            self._progress = Progress(
                TextColumn("[bold]prepare {task.description}"),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TextColumn("{task.fields[rates]}"),
                TimeRemainingColumn(),
                console=Console(stderr=True),
                transient=False,
            )
            self._progress.__enter__()
            self._started = time.monotonic()
            self._task = self._progress.add_task(
                self.name, total=self.total, completed=self.skipped_bytes, rates=self.rates(0.0)
            )
        return self

    def rates(self, seconds: float) -> str:
        if seconds <= 0:
            return "docs/s - tok/s"
        return f"{self.documents / seconds:,.0f} docs/s {self.tokens / seconds / 1e6:,.2f}M tok/s"

    def advance(self, consumed: int, documents: int, tokens: int) -> None:
        self.documents += documents
        self.tokens += tokens
        self.bytes += consumed
        if self.enabled:
            rates = self.rates(time.monotonic() - self._started)
            self._progress.update(self._task, advance=consumed, rates=rates)

    def __exit__(self, *exc_info) -> None:
        if self.enabled:
            self._progress.__exit__(*exc_info)
