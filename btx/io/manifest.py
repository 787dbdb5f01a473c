"""Stage manifests (DONE.json) and content identities: what provenance checks compare.

A stage is finished exactly when its directory holds a DONE.json. It is written last, atomically
(temporary file, fsync, rename, fsync of the directory), so a killed process leaves either no
manifest or a complete one, never a half-written one.

Provenance (docs/PROVENANCE.md): a DONE.json lists the sha256 of every file the stage wrote
("outputs") and the content identity of every input it consumed ("input_identities": {label:
{"path", "sha256": {file: digest}}}). `damaged_outputs` compares a finished stage with its files,
`changed_inputs` compares recorded input identities with what is on disk now. Hashes of files that
did not change since they were last hashed come from a stat-keyed cache (`cached_sha256`), so these
checks read a file again only after something wrote to it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from btx.errors import BtxError
from btx.io.atomic import write_json_atomic
from btx.io.hashing import cached_sha256, sha256_file

DONE_NAME = "DONE.json"

# Files of a checkpoint directory that make up the model (what an HF loader reads).
_CHECKPOINT_NAMES = (
    "config.json",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "generation_config.json",
    "btx_tokenizer.json",
)


def checkpoint_files(directory: str | os.PathLike) -> list[str]:
    """Names of the files of a checkpoint directory that define the model: config, weights,
    index, tokenizer and generation files (top level only; other files there do not count)."""
    root = Path(directory)
    return sorted(
        p.name
        for p in root.iterdir()
        if p.is_file() and (p.name in _CHECKPOINT_NAMES or p.name.endswith(".safetensors"))
    )


def identity(path: str | os.PathLike) -> dict:
    """The content identity of an input: {"path", "sha256": {file: digest}}. A directory is a
    checkpoint (its `checkpoint_files`); a file is itself (a token shard's .bin, say)."""
    path = Path(path).absolute()
    if path.is_dir():
        names = checkpoint_files(path)
        if not names:
            raise BtxError(f"{path}: no checkpoint files (config.json, *.safetensors) to identify")
        return {"path": str(path), "sha256": {name: cached_sha256(path / name) for name in names}}
    if not path.is_file():
        raise BtxError(f"{path}: not found")
    return {"path": str(path), "sha256": {path.name: cached_sha256(path)}}


def relative_identities(identities: dict | None, manifest_dir: str | os.PathLike) -> dict | None:
    """`identities` with each input's path also relative to the directory of the DONE.json that
    records them ("rel"), so that a run directory copied or moved elsewhere checks its own files."""
    if identities is None:
        return None
    base = os.path.realpath(manifest_dir)  # `..` in a path is resolved physically, after symlinks
    return {
        label: {**record, "rel": os.path.relpath(os.path.realpath(record["path"]), base)}
        for label, record in identities.items()
    }


def _recorded_path(record: dict, base: Path | None) -> Path:
    if base is not None and isinstance(record.get("rel"), str):
        candidate = (base / record["rel"]).resolve()
        if candidate.exists():
            return candidate
    return Path(record["path"])


def _identity_file(path: Path, name: str) -> Path:
    return path.parent / name if path.name == name and not path.is_dir() else path / name


def changed_inputs(recorded: dict | None, base: str | os.PathLike | None = None) -> list[str]:
    """One line per recorded input identity that no longer matches the disk ("<file>: changed").
    `base`: the directory of the DONE.json that recorded them (its "rel" paths are tried first)."""
    problems = []
    for label, record in (recorded or {}).items():
        if not isinstance(record, dict) or not isinstance(record.get("sha256"), dict) or "path" not in record:
            continue
        where = _recorded_path(record, Path(base) if base is not None else None)
        for name, digest in sorted(record["sha256"].items()):
            file = _identity_file(where, name)
            if not file.is_file():
                problems.append(f"{file}: missing (input '{label}')")
                break
            if cached_sha256(file) != digest:
                problems.append(f"{file}: changed since it was used (input '{label}')")
                break
    return problems


def identity_changes(recorded: dict | None, current: dict) -> list[str]:
    """One line per input whose content now (`current`: label -> identity of what the job would use
    now, e.g. the recipe's seed.path) is not what `recorded` says the result was made from."""
    problems = []
    for label, now in current.items():
        then = ((recorded or {}).get(label) or {}).get("sha256") or {}
        names = [n for n in sorted(set(now["sha256"]) | set(then)) if now["sha256"].get(n) != then.get(n)]
        if names:
            where = _identity_file(Path(now["path"]), names[0]) if names[0] in now["sha256"] else Path(now["path"])
            problems.append(f"{where}: not what it was made from (input '{label}')")
    return problems


def producer_manifest(path: str | os.PathLike) -> tuple[dict | None, str]:
    """The DONE.json describing checkpoint `path`, and the prefix its "outputs" keys carry.

    A btx job keeps its DONE.json next to its export: `experts/<d>/DONE.json` describes
    `experts/<d>/final/` (keys "final/<file>"); a seed's or a merge's sits inside the directory.
    """
    path = Path(path)
    own = read_done(path)
    if own is not None:
        return own, ""
    parent = read_done(path.parent)
    if parent is not None:
        export = parent.get("export")
        outputs = parent.get("outputs") or {}
        if (export and Path(export).resolve() == path.resolve()) or any(
            str(k).startswith(f"{path.name}/") for k in outputs
        ):
            return parent, f"{path.name}/"
    return None, ""


def damaged_outputs(directory: str | os.PathLike, prefix: str = "") -> list[str]:
    """Files of the finished stage in `directory` that differ from its DONE.json ("outputs"):
    one line each, "<file>: missing" or "<file>: differs from ..."; [] when all match. Only the
    keys under `prefix` are checked (an expert's export: "final/")."""
    root = Path(directory)
    done = read_done(root)
    outputs = (done or {}).get("outputs")
    if not isinstance(outputs, dict):
        return []
    problems = []
    for rel, digest in sorted(outputs.items()):
        if not str(rel).startswith(prefix):
            continue
        file = root / rel
        if not file.is_file():
            problems.append(f"{file}: missing, though {root / DONE_NAME} lists it")
        elif cached_sha256(file) != digest:
            problems.append(
                f"{file}: differs from the sha256 that {root / DONE_NAME} records "
                "(damaged or edited after the stage finished)"
            )
    return problems


def input_identity(path: str | os.PathLike) -> dict:
    """The identity of a checkpoint a stage is about to consume. A btx-made checkpoint must
    still be what its producer's DONE.json says it wrote (BtxError naming the file otherwise)."""
    path = Path(path)
    if path.is_dir():
        manifest, prefix = producer_manifest(path)
        if manifest is not None:
            root = path if not prefix else path.parent
            problems = damaged_outputs(root, prefix)
            if problems:
                raise BtxError(f"{problems[0]}; redo the stage that made {path} or restore the file")
    return identity(path)


def hash_dir(directory: str | os.PathLike, exclude: tuple[str, ...] = (DONE_NAME,)) -> dict[str, str]:
    """sha256 of every file under `directory`, keyed by relative POSIX path, sorted.

    Hidden temporaries (names starting with '.') and the manifest itself are left out, since they
    are not part of what a stage produced.
    """
    root = Path(directory)
    out: dict[str, str] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if not path.is_file() or rel.as_posix() in exclude or any(p.startswith(".") for p in rel.parts):
            continue
        out[rel.as_posix()] = sha256_file(path)
    return out


def write_done(directory: str | os.PathLike, info: dict) -> Path:
    """Mark `directory` finished: write its DONE.json (call this after every output is complete)."""
    path = Path(directory) / DONE_NAME
    write_json_atomic(path, info)
    return path


def read_done(directory: str | os.PathLike) -> dict | None:
    """The stage manifest of `directory`, or None when the stage is not finished."""
    path = Path(directory) / DONE_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise BtxError(f"{path}: unreadable stage manifest ({e}); delete it to redo the stage") from None
    if not isinstance(data, dict):
        raise BtxError(f"{path}: a stage manifest must be a JSON object")
    return data


def is_done(directory: str | os.PathLike) -> bool:
    return (Path(directory) / DONE_NAME).is_file()


def read_step_records(path: Path) -> list[dict]:
    """The step records of a job's metrics.jsonl (btx.train.metrics writes it), in order; a line
    cut short by a kill is skipped. [] when there is no such file."""
    if not Path(path).is_file():
        return []
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut short by a kill
        if isinstance(record, dict) and "step" in record:
            out.append(record)
    return out
