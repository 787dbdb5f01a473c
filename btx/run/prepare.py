"""`btx prepare`: tokenize every domain of an experiment into `<run_dir>/data/<domain>/`.

The work is done by btx.data.prepare.prepare_domains (streamed tokenization, train/val split by document,
atomic shard writes, skipping domains whose shards already match their sources, tokenizer and
options). This module turns recipes and command-line specs into its arguments, and summarizes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from rich.markup import escape

from btx.data.corpora import BUILTIN_PREFIX, builtin_source
from btx.data.prepare import prepare_domains
from btx.data.readers import HF_PREFIX
from btx.data.sources import GLOB_CHARS
from btx.data.tokenizer import load_tokenizer
from btx.errors import BtxError
from btx.recipe.experiment import Domain, Experiment
from btx.ui.tables import Column, FitTable


def domain_sources(domain: Domain) -> list:
    """The source specs of one recipe domain, for btx.data.prepare.prepare_domain."""
    specs: list[Any] = [spec for source in domain.sources for spec in source.specs()]
    if domain.data.builtin is not None:
        specs.append(builtin_source(domain.data.builtin, domain.data.builtin_bytes, domain.data.seed))
    return specs


def prepare_experiment(
    exp: Experiment, *, force: bool = False, progress: bool = True, workers: int | None = None
) -> dict[str, dict]:
    """Prepare every domain of `exp` (finetune.general's too) into `exp.run_dir/data/<domain>/`;
    returns per-domain summaries."""

    tokenizer = load_tokenizer(exp.tokenizer)
    domains = {
        name: {
            "sources": domain_sources(d),
            "val_fraction": d.data.val_fraction,
            "seed": d.data.seed,
            "text_field": d.data.text_field,
        }
        for name, d in exp.data_domains.items()
    }
    workers = exp.prepare.workers if workers is None else workers
    return prepare_domains(domains, tokenizer, exp.paths.data_root, force=force, progress=progress, workers=workers)


def parse_domain_specs(specs: list[str]) -> dict[str, list]:
    """`["code=data/code", "code=more.jsonl", "math=builtin:arithmetic"]` -> {name: [sources]}."""
    out: dict[str, list] = {}
    for spec in specs:
        name, eq, path = spec.partition("=")
        if not eq or not name or not path:
            raise BtxError(f"--domain {spec}: expected NAME=PATH (or NAME=builtin:CORPUS)")
        if path.startswith(BUILTIN_PREFIX):
            source: Any = builtin_source(path[len(BUILTIN_PREFIX) :])
        elif path.startswith(HF_PREFIX):
            source = path
        elif GLOB_CHARS.search(path):
            source = os.path.abspath(os.path.expanduser(path))  # checked by PathSource: matches a file?
        else:
            if not Path(path).expanduser().exists():
                raise BtxError(f"--domain {spec}: {path}: no such file or directory")
            source = os.fspath(Path(path).expanduser().absolute())
        out.setdefault(name, []).append(source)
    return out


def prepare_adhoc(
    domains: dict[str, list],
    tokenizer: str,
    out: str | os.PathLike,
    *,
    val_fraction: float = 0.05,
    seed: int = 0,
    text_field: str = "text",
    force: bool = False,
    progress: bool = True,
    workers: int = 1,
) -> dict[str, dict]:
    if not 0.0 < val_fraction < 1.0:
        raise BtxError(f"--val-fraction: must be in (0, 1), got {val_fraction}")
    return prepare_domains(
        domains,
        tokenizer,
        Path(out),
        force=force,
        progress=progress,
        workers=workers,
        val_fraction=val_fraction,
        seed=seed,
        text_field=text_field,
    )


def summary_table(summaries: dict[str, dict]):
    """A table: one row per domain (tokens and documents per split, whether it was skipped)."""

    dirs = {str(Path(s["out_dir"]).parent) for s in summaries.values()}
    caption = escape(f"shards in {_short(dirs.pop())}/<domain>/") if len(dirs) == 1 else None
    columns = [
        Column("domain", "label"),
        Column("train tokens"),
        Column("val tokens"),
        Column("documents"),
        Column("status", "text"),
    ]
    rows = []
    for name, s in summaries.items():
        status = "up to date" if s.get("skipped") else f"done ({s.get('seconds', 0):.1f}s)"
        rows.append(
            [
                escape(name),
                f"{s['train']['tokens']:,}",
                f"{s['val']['tokens']:,}",
                f"{s['train']['documents']:,} + {s['val']['documents']:,}",
                status,
            ]
        )
    return FitTable(columns, rows, title="token shards", caption=caption)


def _short(path: str) -> str:
    try:
        return os.path.relpath(path)
    except ValueError:
        return path
