"""Checkpoints of a preparation in progress, so a killed `btx prepare` resumes from its last
finished chunk instead of from zero.

While a domain is prepared, its shards grow as `.<split>.bin.partial` next to where they will
land, and every few seconds (after a whole chunk went through the splitter) `.prepare-state.json`
records:
- `key`: the sha256 of what decides the bytes (sources' descriptions, tokenizer hash, options);
- how far the sources were read (`documents_read`, `bytes_read`, `chunks`);
- each split's token and document counts (the length the partial file is cut back to on resume);
- the splitter's held-back documents (btx.data.writer.Splitter), tokens in base64.
The partial files are fsynced before the state that points into them is written (atomically).

A later run of the same domain with the same key cuts the partial files back to the recorded
lengths, hashes the kept prefix, skips the first `documents_read` documents without tokenizing
them, and ends with the same bytes as a run never interrupted. A different key, a missing or
short partial file, or an unreadable state: the leftovers are removed and the domain starts over.
"""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import numpy as np

from btx.data.shards import SPLITS
from btx.data.writer import Document, ShardWriter, Splitter, partial_path
from btx.io.atomic import dumps_json, write_bytes_atomic

STATE_FILE = ".prepare-state.json"
STATE_FORMAT = "btx-prepare-state-v1"


def resume_key(descriptions: list[dict], tokenizer_identity: dict, options: dict, dtype: np.dtype) -> str:
    identity = {"sources": descriptions, "tokenizer": tokenizer_identity, "options": options, "dtype": dtype.name}
    blob = dumps_json(identity)
    return hashlib.sha256(blob.encode()).hexdigest()


def save_state(
    out_dir: Path,
    key: str,
    writers: dict[str, ShardWriter],
    splitter: Splitter,
    *,
    documents_read: int,
    bytes_read: int,
    chunks: int,
) -> None:
    for writer in writers.values():
        writer.flush(durable=True)
    state = {
        "format": STATE_FORMAT,
        "key": key,
        "documents_read": documents_read,
        "bytes_read": bytes_read,
        "chunks": chunks,
        "splits": {s: {"tokens": writers[s].tokens, "documents": writers[s].documents} for s in SPLITS},
        "held": {s: _encode_held(splitter.held[s]) for s in SPLITS},
    }
    write_bytes_atomic(out_dir / STATE_FILE, (dumps_json(state) + "\n").encode())


def load_state(out_dir: Path, key: str, dtype: np.dtype) -> dict | None:
    """The checkpoint of an interrupted preparation with this key whose partial files are all
    there and long enough, or None (the caller then starts over)."""
    try:
        state = json.loads((out_dir / STATE_FILE).read_text(encoding="utf-8"))
        if state.get("format") != STATE_FORMAT or state.get("key") != key:
            return None
        for split in SPLITS:
            partial = partial_path(out_dir / f"{split}.bin")
            if partial.stat().st_size < int(state["splits"][split]["tokens"]) * dtype.itemsize:
                return None
        state["held"] = {s: _decode_held(state["held"][s], dtype) for s in SPLITS}
        return state
    except (OSError, ValueError, KeyError, TypeError):
        return None


def clear_state(out_dir: Path) -> None:
    (out_dir / STATE_FILE).unlink(missing_ok=True)


def _encode_held(document: Document | None) -> dict | None:
    if document is None:
        return None
    tokens = np.concatenate(document.pieces) if document.pieces else np.zeros(0)
    return {"key": document.key, "tokens": base64.b64encode(tokens.tobytes()).decode("ascii")}


def _decode_held(entry: dict | None, dtype: np.dtype) -> Document | None:
    if entry is None:
        return None
    tokens = np.frombuffer(base64.b64decode(entry["tokens"]), dtype=dtype).copy()
    return Document(float(entry["key"]), [tokens])
