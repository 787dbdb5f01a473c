"""Routing analysis of one MoE checkpoint on domain data (`btx analyze`, tools/routing_analysis.py).

Domain data is a prepared shard or raw text tokenized on the fly (`open_domain_data`). The
checkpoint's MoE layers route consecutive windows of each domain, and btx.evaluate.routing's
accumulator turns the routings into the report (`analyze_checkpoint`); `compare_reports` gives
the difference of two reports, layer by layer. Token-level samples keep the chosen experts of
the first tokens of each domain for colouring.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)

from btx.data.corpora import builtin_source
from btx.data.sampling import parse_domain_paths
from btx.data.shards import check_tokenizer, load_shard
from btx.data.sources import PathSource, PythonSource
from btx.data.tokenizer import BTX_TOKENIZER_FILE, HF_TOKENIZER_FILE, load_tokenizer
from btx.errors import BtxError
from btx.evaluate.routing import (
    DEFINITIONS,
    RoutingAccumulator,
    add_own_share,
    routings_of,
    top1_experts,
)
from btx.io.checkpoint import load_model
from btx.io.manifest import read_done
from btx.io.reader import CheckpointReader
from btx.model.config import Routing

REPORT_FORMAT = "btx-routing-v1"
DEFAULT_TOKENS = 65536  # per domain
MAX_DEFAULT_SEQ_LEN = 1024  # the default window: the model's max_seq_len, capped here
SAMPLE_TOKENS = 160  # tokens kept per --show-text example


@dataclass
class DomainData:
    """One domain's evaluation tokens: a btx token shard, or text/jsonl tokenized on the fly."""

    name: str
    label: str  # what the user gave, for messages and routing.json
    kind: str  # "shard" | "text"
    shard: object = None  # btx.data.shards.Shard
    source: object = None  # btx.data.sources.Source
    tokenizer: object = None  # for text sources
    tokenizer_checked: bool = False  # the shard's tokenizer hash was compared with the model's

    def describe(self) -> dict:
        out = {"source": self.label, "kind": self.kind}
        if self.shard is not None:
            out |= {
                "shard_tokens": len(self.shard),
                "tokenizer": self.shard.tokenizer,
                "tokenizer_checked": self.tokenizer_checked,
            }
        return out

    def planned_tokens(self, max_tokens: int) -> int:
        return min(max_tokens, len(self.shard)) if self.shard is not None else max_tokens

    def windows(self, seq_len: int, max_tokens: int) -> Iterator[np.ndarray]:
        """Token windows of at most `seq_len` ids, `max_tokens` ids in all (fewer when the data
        is shorter). A shard is sampled with evenly spaced windows so that the whole split is
        represented, not just its first documents; text is read from the start."""
        if self.shard is not None:
            tokens = self.shard.tokens
            n = len(tokens)
            if n <= max_tokens:
                for start in range(0, n, seq_len):
                    yield np.asarray(tokens[start : start + seq_len], dtype=np.int64)
                return
            # `count` windows holding max_tokens ids, the n - max_tokens unread ids spread evenly
            # between them: no overlap, the first starts at 0 and the last ends at n.
            count = -(-max_tokens // seq_len)
            for i in range(count):
                length = min(seq_len, max_tokens - i * seq_len)
                start = i * seq_len + (i * (n - max_tokens)) // max(count - 1, 1)
                yield np.asarray(tokens[start : start + length], dtype=np.int64)
            return
        # Text: each document followed by EOS, as btx.data writes shards; packed into windows.
        eos = self.tokenizer.eos_id
        buffer: list[int] = []
        produced = 0
        for text, _ in self.source.documents():
            if not text:
                continue
            # Encode only what the budget can use: a token rarely spans 32 characters, so a huge
            # document is cut there instead of being tokenized whole for a few thousand tokens.
            buffer.extend(self.tokenizer.encode(text[: (max_tokens - produced) * 32 + 1]))
            if eos is not None:
                buffer.append(eos)
            while len(buffer) >= seq_len and produced < max_tokens:
                take = min(seq_len, max_tokens - produced)
                yield np.asarray(buffer[:take], dtype=np.int64)
                del buffer[:take]
                produced += take
            if produced >= max_tokens:
                return
        if buffer and produced < max_tokens:
            yield np.asarray(buffer[: max_tokens - produced], dtype=np.int64)


def parse_data_specs(specs: Sequence[str]) -> dict[str, str]:

    return parse_domain_paths(specs, "PATH (a btx shard .bin/.json, a text or .jsonl file)")


def open_domain_data(name: str, spec: str, tokenizer) -> DomainData:
    """Resolve one --data value. A `.bin`/`.json` file, or a directory holding `val.json`
    (a prepared domain), is a btx shard; its sidecar's tokenizer must be the model's. Anything
    else is text (a file, a .jsonl file, a directory of them, or builtin:CORPUS)."""

    label = f"--data {name}={spec}"
    if spec.startswith("builtin:"):
        return _text_data(name, spec, PythonSource(builtin_source(spec.removeprefix("builtin:"))), tokenizer, label)
    path = Path(spec).expanduser()
    if not path.exists():
        raise BtxError(f"{path}: not found ({label})")
    if path.is_dir() and (path / "val.json").is_file():
        path = path / "val.json"
    if path.suffix in (".bin", ".json"):
        shard = load_shard(path)
        if len(shard) == 0:
            raise BtxError(f"{shard.path}: empty shard, no tokens to analyse ({label})")
        if tokenizer is not None:
            check_tokenizer(shard, tokenizer.identity())
        return DomainData(name, str(path), "shard", shard=shard, tokenizer_checked=tokenizer is not None)
    source = PathSource(path)
    if source.total_bytes == 0:
        raise BtxError(f"{path}: empty data file, no text to analyse ({label})")
    return _text_data(name, str(path), source, tokenizer, label)


def _text_data(name, label_path, source, tokenizer, label) -> DomainData:
    if tokenizer is None:
        raise BtxError(
            f"{label}: text needs a tokenizer, and the checkpoint has no tokenizer.json or btx_tokenizer.json; "
            "pass --tokenizer or a prepared token shard"
        )
    return DomainData(name, label_path, "text", source=source, tokenizer=tokenizer)


def checkpoint_tokenizer(checkpoint: Path, explicit: str | None = None):
    """The tokenizer the checkpoint ships with (or `explicit`), or None when it has none."""

    if explicit is not None:
        return load_tokenizer(explicit)
    if (checkpoint / BTX_TOKENIZER_FILE).is_file() or (checkpoint / HF_TOKENIZER_FILE).is_file():
        return load_tokenizer(checkpoint)
    return None


def moe_checkpoint_config(path: str | os.PathLike):
    """(ModelConfig, stored dtype) of an MoE checkpoint (any form btx reads), from its headers only
    (no weights), so that every input is checked before any work. Dense is a BtxError."""

    path = Path(path).expanduser()
    if not path.exists():
        raise BtxError(f"{path}: checkpoint not found")
    if not path.is_dir():
        raise BtxError(f"{path}: expected a checkpoint directory (config.json and *.safetensors)")
    with CheckpointReader(path) as reader:
        cfg, stored = reader.cfg, reader.dtype
    if not cfg.is_moe:
        raise BtxError(
            f"{path / 'config.json'}: a dense model (no experts) has no routers to analyse; expected an MoE checkpoint"
        )
    return cfg, stored


def load_moe_checkpoint(path: str | os.PathLike, device: torch.device, dtype: torch.dtype | None):
    """A btx Transformer from an MoE checkpoint directory; a dense checkpoint is a BtxError."""

    path = Path(path).expanduser()
    _, stored = moe_checkpoint_config(path)
    if dtype is None:  # fp32 on CPU (bf16 matmuls are slow there); the stored dtype on a GPU
        dtype = torch.float32 if device.type == "cpu" else stored
    model = load_model(path, dtype=dtype, device=device)
    model.eval()  # sample_top1 routes by argmax at inference
    return model


def expert_names(checkpoint: Path, n_experts: int, explicit: Sequence[str] | None = None) -> tuple[list[str], str]:
    """Expert names and where they came from: --experts, the checkpoint's DONE.json "experts"
    (btx merge writes them), a sibling merged/DONE.json (a finetuned model next to its merge),
    or e0..eN-1."""

    if explicit:
        names = list(explicit)
        if len(names) != n_experts or len(set(names)) != len(names):
            raise BtxError(
                f"--experts: expected {n_experts} distinct names (the model has {n_experts} experts), got {names}"
            )
        return names, "--experts"
    for directory in (checkpoint, checkpoint.parent / "merged"):
        try:
            done = read_done(directory)
        except BtxError:
            continue
        names = (done or {}).get("experts")
        if (
            isinstance(names, list)
            and len(names) == n_experts
            and all(isinstance(n, str) for n in names)
            and len(set(names)) == n_experts
        ):
            return names, str(directory / "DONE.json")
    return [f"e{i}" for i in range(n_experts)], "default"


def pick_device(name: str | None) -> torch.device:
    if not name:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise BtxError(f"--device {name}: not a device (expected cpu, cuda, cuda:N, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BtxError(f"--device {name}: CUDA is not available on this machine")
    return device


@torch.inference_mode()
def route_batch(model, tokens_BS: torch.Tensor) -> list[Routing]:
    """Run the transformer blocks only and return each MoE layer's routing.

    The final norm and the LM head are skipped on purpose: the analysis needs no logits, and a
    [B, S, vocab] logits tensor would be the largest allocation of the whole forward.
    """
    x = model.embed(tokens_BS)
    cos, sin = model.rope(tokens_BS.shape[1], tokens_BS.device)
    for block in model.layers:
        x, _ = block(x, cos, sin)
    return routings_of(model)


def _progress(console):

    return Progress(
        TextColumn("[bold]analyze {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("tokens"),
        TextColumn("{task.fields[rate]}"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


def analyze_checkpoint(
    checkpoint: str | os.PathLike,
    data: Mapping[str, str],
    *,
    tokens: int = DEFAULT_TOKENS,
    seq_len: int | None = None,
    batch_size: int = 8,
    device: str | None = None,
    dtype: torch.dtype | None = None,
    experts: Sequence[str] | None = None,
    tokenizer: str | None = None,
    samples: int = 0,
    console=None,
) -> dict:
    """Route `tokens` tokens of every domain through `checkpoint`; returns the report (the
    content of routing.json, see `DEFINITIONS`). `data` maps domain -> shard, text or jsonl path.
    `samples` keeps that many short token sequences per domain with their top-1 experts at every
    layer, for the coloured text view. Memory holds sums only, whatever `tokens` is."""

    console = console or Console(stderr=True)
    if tokens < 1 or batch_size < 1 or (seq_len is not None and seq_len < 1):
        raise BtxError("--tokens, --batch-size and --seq-len must be positive")
    checkpoint = Path(checkpoint).expanduser()
    dev = pick_device(device)
    with console.status(escape(f"loading {checkpoint}")):
        model = load_moe_checkpoint(checkpoint, dev, dtype)
    cfg = model.cfg
    tok = checkpoint_tokenizer(checkpoint, tokenizer)
    domains = {name: open_domain_data(name, spec, tok) for name, spec in data.items()}
    unchecked = [dd.label for dd in domains.values() if dd.kind == "shard" and not dd.tokenizer_checked]
    if unchecked:
        console.print(
            f"note: {checkpoint} has no tokenizer files, so the tokenizer of {', '.join(unchecked)} "
            "cannot be checked (token ids are only checked against vocab_size)",
            markup=False,
            soft_wrap=True,
        )
    names, names_from = expert_names(checkpoint, cfg.n_experts, experts)
    seq_len = seq_len or min(cfg.max_seq_len, MAX_DEFAULT_SEQ_LEN)
    if seq_len > cfg.max_seq_len:
        raise BtxError(f"--seq-len {seq_len}: longer than the model's max_position_embeddings {cfg.max_seq_len}")

    model.set_routing_record(True)
    acc = RoutingAccumulator(cfg.n_layers, cfg.n_experts, cfg.top_k)
    kept: dict[str, list[dict]] = {name: [] for name in domains}
    started = time.perf_counter()
    with _progress(console) as progress:
        for name, dd in domains.items():
            task = progress.add_task(name, total=dd.planned_tokens(tokens), rate="")
            seen = 0
            t0 = time.perf_counter()
            for batch in _batches(dd.windows(seq_len, tokens), batch_size):
                if int(batch.max()) >= cfg.vocab_size or int(batch.min()) < 0:
                    raise BtxError(
                        f"{dd.label}: token id {int(batch.max())} is outside the model's vocabulary "
                        f"(vocab_size {cfg.vocab_size}); the data was made with another tokenizer"
                    )
                tokens_BS = torch.from_numpy(batch).to(dev)
                routings = route_batch(model, tokens_BS)
                acc.update(routings, domain=name)
                _keep_samples(kept[name], samples, batch, routings, cfg.n_experts)
                seen += batch.size
                rate = seen / max(time.perf_counter() - t0, 1e-9)
                progress.update(task, completed=seen, rate=f"{rate:,.0f} tok/s")
            progress.update(task, total=seen, completed=seen)
            if seen == 0:
                raise BtxError(f"{dd.label}: no tokens (empty data)")
    model.set_routing_record(False)

    summary = add_own_share(acc.summary(), names)
    return {
        "format": REPORT_FORMAT,
        "definitions": DEFINITIONS,
        "checkpoint": str(checkpoint),
        "model": {
            "n_layers": cfg.n_layers,
            "n_experts": cfg.n_experts,
            "top_k": cfg.top_k,
            "router_mode": cfg.router_mode,
            "experts_per_token": cfg.experts_per_token,
        },
        "experts": names,
        "experts_from": names_from,
        "settings": {
            "tokens_per_domain": tokens,
            "seq_len": seq_len,
            "batch_size": batch_size,
            "device": str(dev),
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "seconds": round(time.perf_counter() - started, 3),
        },
        "data": {name: dd.describe() for name, dd in domains.items()},
        "domains": summary["domains"],
        "overall": summary["overall"],
        "samples": {name: _decode_samples(s, tok) for name, s in kept.items() if s},
    }


def _batches(windows: Iterator[np.ndarray], batch_size: int) -> Iterator[np.ndarray]:
    """Stack windows of equal length into [B, S] batches (a shorter last window goes alone)."""
    pending: list[np.ndarray] = []
    for window in windows:
        if pending and len(window) != len(pending[0]):
            yield np.stack(pending)
            pending = []
        pending.append(window)
        if len(pending) == batch_size:
            yield np.stack(pending)
            pending = []
    if pending:
        yield np.stack(pending)


def _keep_samples(kept: list[dict], wanted: int, batch: np.ndarray, routings: list[Routing], n_experts: int) -> None:
    """Keep the first SAMPLE_TOKENS tokens of the first `wanted` rows seen, with their top-1
    expert at every layer: the only per-token data the analysis holds on to."""
    S = batch.shape[1]
    for row in range(batch.shape[0]):
        if len(kept) >= wanted:
            return
        n = min(S, SAMPLE_TOKENS)
        ids = slice(row * S, row * S + n)
        kept.append(
            {
                "token_ids": batch[row, :n].tolist(),
                "top1": [top1_experts(r.expert_TK[ids], r.gate_TK[ids], n_experts).tolist() for r in routings],
            }
        )


def _decode_samples(samples: list[dict], tokenizer) -> list[dict]:
    for sample in samples:
        sample["pieces"] = token_pieces(sample["token_ids"], tokenizer)
    return samples


def token_pieces(ids: Sequence[int], tokenizer) -> list[str]:
    """The text each token adds, for colouring text token by token.

    Decoding tokens one by one breaks multi-byte characters (byte tokens) and word-initial spaces
    (SentencePiece), so each piece is the growth of the decoded prefix. A character still
    incomplete (U+FFFD at the end) is credited to the token that completes it.
    """
    if tokenizer is None:
        return [f"[{i}]" for i in ids]
    pieces, committed = [], ""
    for n in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:n])
        if text.endswith("\ufffd") and n < len(ids):
            pieces.append("")
            continue
        if text.startswith(committed):
            pieces.append(text[len(committed) :])
        else:  # the tokenizer rewrote earlier text (rare normalisation); show the token alone
            pieces.append(tokenizer.decode(ids[n - 1 : n]))
        committed = text
    return pieces


def compare_reports(a: dict, b: dict) -> dict:
    """B - A, per domain ([layer][expert] matrices and per-layer numbers), for --compare."""
    shape_a = (a["model"]["n_layers"], a["model"]["n_experts"])
    shape_b = (b["model"]["n_layers"], b["model"]["n_experts"])
    if shape_a != shape_b:
        raise BtxError(
            f"--compare: {b['checkpoint']} has {shape_b[0]} layers x {shape_b[1]} experts, "
            f"{a['checkpoint']} has {shape_a[0]} x {shape_a[1]}; a comparison needs the same shape"
        )

    def diff(sa: dict, sb: dict) -> dict:
        out = {}
        for key in ("top1_frac", "topk_frac", "load_share", "mean_prob"):
            out[key] = [[y - x for x, y in zip(ra, rb)] for ra, rb in zip(sa[key], sb[key])]
        for key in (
            "entropy_of_mean",
            "mean_token_entropy",
            "load_imbalance",
            "top1_agreement",
            "own_top1_frac",
            "own_topk_frac",
        ):
            if sa.get(key) is not None and sb.get(key) is not None:
                out[key] = [y - x for x, y in zip(sa[key], sb[key])]
        return out

    return {
        "a": a["checkpoint"],
        "b": b["checkpoint"],
        "overall": diff(a["overall"], b["overall"]),
        "domains": {d: diff(a["domains"][d], b["domains"][d]) for d in a["domains"]},
    }
