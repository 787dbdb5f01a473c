"""The sha256 of every file a merge reads, hashed while the merge runs.

What DONE.json records is what the merge read, never a copy of the inputs' own manifests. One
background thread hashes all files a window at a time, round robin by offset: the order in which
the read-ahead (btx.io.startup) and the layer-by-layer merge bring them into the page cache, so the
hashing reads what is cached already instead of adding a second stream of disk reads. A btx-made
input whose hash differs from what its own DONE.json records (a bit flipped after its job
finished, say) fails the merge before the output appears.
"""

from __future__ import annotations

import hashlib
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from btx.errors import BtxError
from btx.io.hashing import update_from_file
from btx.io.layout import CONFIG_NAME, INDEX_FILE, TOKENIZER_FILES
from btx.io.manifest import DONE_NAME
from btx.mix.merge_plan import MergeInput

_HASH_WINDOW = 32 << 20  # input bytes hashed per file per turn, in step with the read-ahead


def _input_files(inp: MergeInput) -> list[str]:
    """The files of an input that the merge reads or copies: config, weights, index, tokenizer."""
    files = [CONFIG_NAME, *sorted(inp.reader.metadata)]
    files += [f for f in (INDEX_FILE, *TOKENIZER_FILES) if (inp.path / f).is_file() and f not in files]
    return files


class InputHashes:
    """The inputs' files, hashed on a background thread from construction on; `stop` ends it."""

    def __init__(self, inputs: list[MergeInput]):
        self.inputs = inputs
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="btx-merge-hash")
        files = [(inp.name, f, inp.path / f) for inp in inputs for f in _input_files(inp)]
        self._pending: dict[str, dict[str, Future]] = {inp.name: {} for inp in inputs}
        for name, f, _ in files:
            self._pending[name][f] = Future()
        self._pool.submit(_hash_round_robin, [(path, self._pending[name][f]) for name, f, path in files], self._stop)

    def checked(self) -> dict[str, dict[str, str]]:
        """The finished hashes; BtxError when a btx-made input is not what its DONE.json says it wrote."""
        hashes = {name: {f: h.result() for f, h in files.items()} for name, files in self._pending.items()}
        for inp in self.inputs:
            for f, digest in hashes[inp.name].items():
                recorded = (inp.recorded_hashes or {}).get(f)
                if recorded is not None and recorded != digest:
                    raise BtxError(
                        f"{inp.path / f}: its sha256 is not the one its {DONE_NAME} records (damaged or "
                        "edited after its job finished); nothing was merged: restore the file, or redo "
                        f"the job that made {inp.path}"
                    )
        return hashes

    def stop(self) -> None:
        """A merge that failed does not wait for (or keep) its hashing."""
        self._stop.set()
        self._pool.shutdown(wait=False, cancel_futures=True)


def _hash_round_robin(files: list[tuple[Path, Future]], stop: threading.Event) -> None:
    try:
        pending = [(path, future, hashlib.sha256(), os.stat(path).st_size) for path, future in files]
        offset = 0
        while pending and not stop.is_set():
            for path, future, digest, size in pending:
                update_from_file(digest, path, offset, min(_HASH_WINDOW, max(0, size - offset)))
                if offset + _HASH_WINDOW >= size:
                    future.set_result(digest.hexdigest())
            pending = [p for p in pending if offset + _HASH_WINDOW < p[3]]
            offset += _HASH_WINDOW
    except BaseException as e:  # a vanished input, say: whoever waits on a hash sees why
        for _, future in files:
            if not future.done():
                future.set_exception(e)


def same_content_warnings(inputs: list[MergeInput], hashes: dict[str, dict[str, str]]) -> list[str]:
    """Inputs that are the same checkpoint (a symlink, one directory given twice) or hold the same
    weights: legal, but seldom what was meant (an expert that is the seed adds nothing)."""
    seen: dict[tuple, str] = {}
    warnings = []
    for inp in inputs:
        weights = tuple(sorted((f, h) for f, h in hashes[inp.name].items() if f.endswith(".safetensors")))
        if weights in seen:
            warnings.append(
                f"merge: warning: {inp.name} ({inp.path}) has the same weights as {seen[weights]}; "
                "the MoE gets two identical experts"
            )
        else:
            seen[weights] = f"{inp.name} ({inp.path})"
    return warnings
