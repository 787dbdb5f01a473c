"""Routing statistics: which expert each domain's tokens go to, layer by layer.

One mechanism serves three users:
- training loops (btx finetune) log per-layer expert shares through `RoutingAccumulator`;
- `btx analyze` and `tools/routing_analysis.py` (`analyze_checkpoint` plus `routing_report` for
  the terminal, CSV and PNG output) compute every number below from the same accumulator.

The accumulator keeps sums and counts only (a few [layers, experts] tensors per domain, on the
routing's device, no host sync per update), so memory does not grow with the number of tokens.

Definitions (T tokens of one domain, layer l, expert e; the router's softmax p_t over E experts;
"chosen" = the experts a token was actually sent to, dropped switch slots excluded)
    top1_frac[l][e]       share of tokens whose top-1 expert is e. Top-1 is the chosen expert with
                          the largest gate (for top-k routing: the router's argmax).
    topk_frac[l][e]       share of tokens whose chosen experts include e. Sums to k over experts.
    load_share[l][e]      share of all chosen (token, expert) slots that went to e. Sums to 1;
                          equals topk_frac / k when nothing is dropped. Plots and heatmaps use it.
    mean_prob[l][e]       mean router probability p_t[e] (before top-k), over tokens.
    entropy_of_mean[l]    H(mean_t p_t) in nats: how evenly the router spreads probability
                          over experts across the whole domain (ln E is perfectly even).
    mean_token_entropy[l] mean_t H(p_t) in nats: how undecided the router is for a single token.
                          entropy_of_mean - mean_token_entropy is the mutual information between
                          tokens and experts: high when tokens are routed confidently and differently.
    load_imbalance[l]     max_e load / mean_e load over chosen slots (= E * max load_share):
                          1 is perfectly balanced, E means one expert takes every slot.
    dropped_frac[l]       share of tokens that no expert processed (switch capacity overflow).
    top1_agreement[l]     share of tokens whose top-1 expert at layer l equals the one at l+1.
    own_top1_frac[l]      (analysis, when expert names are known) top1_frac of the expert whose
    own_topk_frac[l]      name equals the domain's, e.g. code tokens on the "code" expert.
Layers are the model's MoE layers, numbered from 0.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from btx.errors import BtxError
from btx.model import Routing

__all__ = [
    "DEFINITIONS",
    "RoutingAccumulator",
    "add_own_share",
    "analyze_checkpoint",
    "compare_reports",
    "routing_stats",
    "routings_of",
    "top1_experts",
]

# One line per number in routing.json (copied into the file, so it documents itself).
DEFINITIONS = {
    "tokens": "tokens analysed",
    "top1_frac": "[layer][expert] share of tokens whose top-1 expert (largest gate among chosen) is this expert",
    "topk_frac": "[layer][expert] share of tokens whose chosen experts include this expert (sums to k)",
    "load_share": "[layer][expert] share of chosen (token, expert) slots on this expert (sums to 1)",
    "mean_prob": "[layer][expert] mean router softmax probability of this expert, before top-k",
    "entropy_of_mean": "[layer] entropy in nats of the mean router distribution (ln E = perfectly even)",
    "mean_token_entropy": "[layer] mean over tokens of the entropy in nats of each token's router distribution",
    "load_imbalance": "[layer] max / mean expert load over chosen slots (1 = balanced, E = one expert takes all)",
    "dropped_frac": "[layer] share of tokens no expert processed (switch capacity overflow)",
    "top1_agreement": "[layer pair l, l+1] share of tokens with the same top-1 expert at both layers",
    "own_expert": "the expert named like the domain (from the merge's DONE.json), or null",
    "own_top1_frac": "[layer] top1_frac of the domain's own expert (overall: token-weighted over domains)",
    "own_topk_frac": "[layer] topk_frac of the domain's own expert (overall: token-weighted over domains)",
}


def routings_of(source) -> list[Routing]:
    """The routing decisions of the last forward: from a list of `Routing`, or from a model
    (a btx Transformer, or a wrapper with `.module` such as DDP or a DeepSpeed engine) whose
    routing record is on (`model.set_routing_record(True)`)."""
    if isinstance(source, Routing):
        return [source]
    if isinstance(source, (list, tuple)):
        return list(source)
    model = source
    while not hasattr(model, "moe_layers") and hasattr(model, "module"):
        model = model.module
    if not hasattr(model, "moe_layers"):
        raise TypeError(f"expected a btx Transformer or a list of Routing, got {type(source).__name__}")
    routings = [layer.last_routing for layer in model.moe_layers()]
    if any(r is None for r in routings):
        raise RuntimeError("no routing recorded: call model.set_routing_record(True) before the forward")
    return routings


def top1_experts(expert_TK: torch.Tensor, gate_TK: torch.Tensor, n_experts: int) -> torch.Tensor:
    """[T] top-1 expert of each token: the chosen expert with the largest gate, or `n_experts`
    when every slot of the token was dropped (switch overflow)."""
    kept_TK = expert_TK < n_experts
    best_T1 = gate_TK.float().masked_fill(~kept_TK, -math.inf).argmax(dim=-1, keepdim=True)
    return expert_TK.gather(1, best_T1).squeeze(1).masked_fill(~kept_TK.any(-1), n_experts)


class _Sums:
    """Running sums for one group of tokens (one domain), kept on the routing's device."""

    def __init__(self, n_layers: int, n_experts: int, device: torch.device):
        L, E = n_layers, n_experts
        self.tokens = torch.zeros((), dtype=torch.long, device=device)
        self.top1 = torch.zeros(L, E + 1, dtype=torch.long, device=device)  # column E: dropped
        self.slots = torch.zeros(L, E + 1, dtype=torch.long, device=device)
        self.prob = torch.zeros(L, E, dtype=torch.float64, device=device)
        self.token_entropy = torch.zeros(L, dtype=torch.float64, device=device)
        self.agree = torch.zeros(max(L - 1, 0), dtype=torch.long, device=device)

    FIELDS = ("tokens", "top1", "slots", "prob", "token_entropy", "agree")

    def add(self, other: _Sums) -> None:
        for name in self.FIELDS:
            getattr(self, name).add_(getattr(other, name).to(getattr(self, name).device))


class RoutingAccumulator:
    """Per-domain running routing statistics over many batches; cheap enough for a training loop.

        acc = RoutingAccumulator(n_layers=cfg.n_layers, n_experts=cfg.n_experts, top_k=cfg.top_k)
        model.set_routing_record(True)
        out = model(tokens_BS)
        acc.update(model, domain="code")        # or domain=["code", "math", ...], one per batch row
        acc.summary()["overall"]["load_share"]  # [layer][expert], each row sums to 1

    `update` only adds into a few small tensors on the routing's device (no host sync); `summary`
    moves them to the host once. `domain=None` counts towards "overall" only. Sums are local to
    the process: under data parallelism each rank sees its own tokens.
    """

    def __init__(self, n_layers: int, n_experts: int, top_k: int = 2):
        self.n_layers, self.n_experts, self.top_k = n_layers, n_experts, top_k
        self._groups: dict[str | None, _Sums] = {}

    def reset(self) -> None:
        self._groups.clear()

    @property
    def domains(self) -> list[str]:
        return [d for d in self._groups if d is not None]

    def update(self, source, domain: str | None | Sequence[str | None] = None) -> None:
        """Add one forward's routing. `source`: a model with routing recorded, or its list of
        `Routing` (one per MoE layer). `domain`: one name for all tokens, or one per batch row
        (tokens are flattened row-major, so row b owns tokens [b*S, (b+1)*S))."""
        routings = routings_of(source)
        if len(routings) != self.n_layers:
            raise ValueError(f"got routing for {len(routings)} layers, the accumulator has {self.n_layers}")
        with torch.no_grad():
            if domain is None or isinstance(domain, str):
                self._add(domain, routings, None)
                return
            rows = list(domain)
            n_tokens = routings[0].expert_TK.shape[0]
            if not rows or n_tokens % len(rows):
                raise ValueError(f"{len(rows)} row domains do not divide {n_tokens} routed tokens")
            per_row = n_tokens // len(rows)
            device = routings[0].expert_TK.device
            for name in dict.fromkeys(rows):
                row_ids = torch.tensor([b for b, d in enumerate(rows) if d == name], device=device)
                token_ids = (row_ids[:, None] * per_row + torch.arange(per_row, device=device)).reshape(-1)
                self._add(name, routings, token_ids)

    def _add(self, domain: str | None, routings: list[Routing], token_ids: torch.Tensor | None) -> None:
        E = self.n_experts
        device = routings[0].expert_TK.device
        group = self._groups.get(domain)
        if group is None:
            group = self._groups[domain] = _Sums(self.n_layers, E, device)
        top1_by_layer = []
        for l, r in enumerate(routings):
            expert_TK, gate_TK, probs_TE = r.expert_TK, r.gate_TK, r.probs_TE
            if token_ids is not None:
                expert_TK, gate_TK, probs_TE = expert_TK[token_ids], gate_TK[token_ids], probs_TE[token_ids]
            if probs_TE.shape[-1] != E:
                raise ValueError(f"layer {l}: router has {probs_TE.shape[-1]} experts, the accumulator {E}")
            top1_T = top1_experts(expert_TK, gate_TK, E)
            top1_by_layer.append(top1_T)
            # A token's slots name distinct experts, so counting slots counts tokens per expert.
            group.top1[l].scatter_add_(0, top1_T, torch.ones_like(top1_T))
            slots = expert_TK.reshape(-1)
            group.slots[l].scatter_add_(0, slots, torch.ones_like(slots))
            probs = probs_TE.double()
            group.prob[l] += probs.sum(0)
            group.token_entropy[l] += torch.special.entr(probs).sum()
        for l in range(self.n_layers - 1):
            group.agree[l] += (top1_by_layer[l] == top1_by_layer[l + 1]).sum()
        group.tokens += top1_by_layer[0].shape[0] if top1_by_layer else 0

    def _total(self, domains) -> _Sums:
        total = _Sums(self.n_layers, self.n_experts, torch.device("cpu"))
        for d in domains:
            total.add(self._groups[d])
        return total

    def overall(self, all_ranks: bool = False) -> dict:
        """Statistics over every token seen (named domain or not). `all_ranks=True` sums the
        counts over the ranks of the default torch.distributed group first; it is a collective,
        so every rank must call it."""
        total = self._total(list(self._groups))
        if all_ranks and torch.distributed.is_available() and torch.distributed.is_initialized():
            nccl = torch.distributed.get_backend() == "nccl"
            device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
            for name in _Sums.FIELDS:
                on_device = getattr(total, name).to(device)
                torch.distributed.all_reduce(on_device)
                setattr(total, name, on_device.cpu())
        return routing_stats(total)

    def summary(self) -> dict:
        """{"overall": stats, "domains": {name: stats}}, stats as in this module's docstring
        (plain floats and lists, JSON-ready). "overall" covers every token, named domain or not."""
        return {
            "overall": routing_stats(self._total(list(self._groups))),
            "domains": {d: routing_stats(self._total([d])) for d in self.domains},
        }


def routing_stats(sums: _Sums) -> dict:
    """Finished statistics from running sums (see the module docstring for each number)."""
    n = int(sums.tokens)
    top1 = sums.top1.double().cpu()
    slots = sums.slots.double().cpu()
    E = top1.shape[1] - 1
    denom = max(n, 1)
    kept_slots = slots[:, :E]
    load_share = kept_slots / kept_slots.sum(-1, keepdim=True).clamp(min=1)
    mean_prob = sums.prob.cpu() / denom
    return {
        "tokens": n,
        "top1_frac": _rows(top1[:, :E] / denom),
        "topk_frac": _rows(kept_slots / denom),
        "load_share": _rows(load_share),
        "mean_prob": _rows(mean_prob),
        "entropy_of_mean": _floats(torch.special.entr(mean_prob).sum(-1)),
        "mean_token_entropy": _floats(sums.token_entropy.cpu() / denom),
        "load_imbalance": _floats(load_share.max(-1).values * E),
        "dropped_frac": _floats(top1[:, E] / denom),
        "top1_agreement": _floats(sums.agree.double().cpu() / denom),
    }


def add_own_share(summary: dict, experts: Sequence[str]) -> dict:
    """Add each domain's share on the expert named like it (in place; returns `summary`).

    "overall" gets the token-weighted average over the domains that have an own expert, i.e. the
    fraction of all those domains' tokens that went to their own expert.
    """
    weighted_top1, weighted_topk, n_total = None, None, 0
    for name, stats in summary["domains"].items():
        own = experts.index(name) if name in experts else None
        stats["own_expert"] = name if own is not None else None
        if own is None:
            stats["own_top1_frac"] = stats["own_topk_frac"] = None
            continue
        stats["own_top1_frac"] = [row[own] for row in stats["top1_frac"]]
        stats["own_topk_frac"] = [row[own] for row in stats["topk_frac"]]
        n = stats["tokens"]
        top1 = torch.tensor(stats["own_top1_frac"], dtype=torch.float64) * n
        topk = torch.tensor(stats["own_topk_frac"], dtype=torch.float64) * n
        weighted_top1 = top1 if weighted_top1 is None else weighted_top1 + top1
        weighted_topk = topk if weighted_topk is None else weighted_topk + topk
        n_total += n
    overall = summary["overall"]
    overall["own_top1_frac"] = _floats(weighted_top1 / n_total) if n_total else None
    overall["own_topk_frac"] = _floats(weighted_topk / n_total) if n_total else None
    return summary


def _floats(t: torch.Tensor) -> list[float]:
    return [float(x) for x in t.tolist()]


def _rows(t: torch.Tensor) -> list[list[float]]:
    return [[float(x) for x in row] for row in t.tolist()]


# --------------------------------------------------------------------------------------------
# Analysis of a checkpoint on domain data (btx analyze, tools/routing_analysis.py)
# --------------------------------------------------------------------------------------------

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
    shard: object = None  # btx.data.Shard
    source: object = None  # btx.data.Source
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
    from btx.data import parse_domain_paths

    return parse_domain_paths(specs, "PATH (a btx shard .bin/.json, a text or .jsonl file)")


def open_domain_data(name: str, spec: str, tokenizer) -> DomainData:
    """Resolve one --data value. A `.bin`/`.json` file, or a directory holding `val.json`
    (a prepared domain), is a btx shard; its sidecar's tokenizer must be the model's. Anything
    else is text (a file, a .jsonl file, a directory of them, or builtin:CORPUS)."""
    from btx.data import PathSource, PythonSource, check_tokenizer, load_shard

    label = f"--data {name}={spec}"
    if spec.startswith("builtin:"):
        from btx.prepare import builtin_source

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
    from btx.tokenizer import BTX_TOKENIZER_FILE, HF_TOKENIZER_FILE, load_tokenizer

    if explicit is not None:
        return load_tokenizer(explicit)
    if (checkpoint / BTX_TOKENIZER_FILE).is_file() or (checkpoint / HF_TOKENIZER_FILE).is_file():
        return load_tokenizer(checkpoint)
    return None


def moe_checkpoint_config(path: str | os.PathLike):
    """(ModelConfig, stored dtype) of an MoE checkpoint (any form btx reads), from its headers only
    (no weights), so that every input is checked before any work. Dense is a BtxError."""
    from btx.hf import CheckpointReader

    path = Path(path).expanduser()
    if not path.exists():
        raise BtxError(f"{path}: checkpoint not found")
    if not path.is_dir():
        raise BtxError(f"{path}: expected a checkpoint directory (config.json and *.safetensors)")
    with CheckpointReader(path) as reader:
        cfg, stored = reader.cfg, reader.dtype
    if not cfg.is_moe:
        raise BtxError(
            f"{path / 'config.json'}: a dense model (no experts) has no routers to analyse; "
            "expected an MoE checkpoint"
        )
    return cfg, stored


def load_moe_checkpoint(path: str | os.PathLike, device: torch.device, dtype: torch.dtype | None):
    """A btx Transformer from an MoE checkpoint directory; a dense checkpoint is a BtxError."""
    from btx.hf import load_model

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
    from btx.manifest import read_done

    if explicit:
        names = list(explicit)
        if len(names) != n_experts or len(set(names)) != len(names):
            raise BtxError(f"--experts: expected {n_experts} distinct names (the model has {n_experts} experts), got {names}")
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
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

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
    from rich.console import Console
    from rich.markup import escape

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
        console.print(f"note: {checkpoint} has no tokenizer files, so the tokenizer of {', '.join(unchecked)} "
                      "cannot be checked (token ids are only checked against vocab_size)", markup=False,
                      soft_wrap=True)
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
        kept.append({
            "token_ids": batch[row, :n].tolist(),
            "top1": [top1_experts(r.expert_TK[ids], r.gate_TK[ids], n_experts).tolist() for r in routings],
        })


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
            pieces.append(text[len(committed):])
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
        for key in ("entropy_of_mean", "mean_token_entropy", "load_imbalance", "top1_agreement",
                    "own_top1_frac", "own_topk_frac"):
            if sa.get(key) is not None and sb.get(key) is not None:
                out[key] = [y - x for x, y in zip(sa[key], sb[key])]
        return out

    return {
        "a": a["checkpoint"],
        "b": b["checkpoint"],
        "overall": diff(a["overall"], b["overall"]),
        "domains": {d: diff(a["domains"][d], b["domains"][d]) for d in a["domains"]},
    }
