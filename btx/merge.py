"""The MiX step: a dense seed and its domain experts become one MoE, streamed.

The MoE is written in the seed family's MoE form (btx/families/: Llama and Mistral -> Mixtral,
a Llama with attention biases -> GraniteMoe, Qwen2 -> Qwen2-MoE, Qwen3 -> Qwen3-MoE, OLMo 2 ->
FlexOlmo); a seed no MoE form can express (a Llama with MLP biases) is refused before anything is
written.

What goes where
- Each source FFN (`gate/up/down_proj`) becomes one expert of its layer's MoE. The sources are the
  domain experts in the order given, then the seed (kept as an extra expert by default, as in the
  paper; `keep_seed=False` drops it). DONE.json lists them: `"experts": ["code", "math", "seed"]`.
- Every other tensor (attention, norms, embeddings, LM head) is the weighted mean over the same
  sources: uniform by default, by the tokens each expert trained on (`weights="tokens"`, from its
  DONE.json; the seed counts as the mean of the experts, since its training is every expert's
  shared past), or by explicit weights `{name: w}`. The mean is computed in fp32 as
  `x_0 + sum_i w_i (x_i - x_0)` (weights normalised), so identical sources give back exactly
  the original, and the small differences between branched experts lose nothing to rounding.
- Routers (`[E, D]`, one per layer) are the only new weights:
  - `random`: normal(0, router_std), reproducible from `router_seed` and the layer index;
  - `zeros`: every expert equally likely (top-k then breaks ties arbitrarily);
  - `centroid`: the row of a domain expert is the unit-normalised mean hidden state at that layer's
    FFN input (after the FFN norm) over `centroid_tokens` tokens of its own domain's data (a
    recipe's merge: its train shard, so eval's validation windows stay unseen; `btx merge --seed`:
    the validation shard beside the expert, or `--router-data`), computed with the *merged* model: averaged embeddings and attention, and the MoE of the
    layers below with their centroid routers. The seed's row is the normalised mean of the domain
    means (the centre of all domains). A token's logit for an expert is |x| cos(x, centroid), so
    each domain's tokens start out routed to their own expert.
  - `ridge` (DUME) and `hidden` (mergekit's prompts): btx/router_fit.py, on the same walk.
- Granularity (the paper's variants):
  - `split` cuts every FFN into C chunks along F, giving N*C experts. Chunk (n, c) keeps rows
    c*F/C.. of gate/up and those columns of down, which is scaled by C; the C chunks of FFN n share
    FFN n's router row. With top-k = C*k the split MoE therefore computes exactly the unsplit MoE
    with top-k (and the seed, for copies of the seed) until finetuning unties the chunks. The
    scale is exact in bf16 when C is a power of two. (zeros routers tie every logit, so top-k picks
    arbitrary chunks: the equivalence then holds only with top-k = all.)
  - `blend` builds C experts (default C = N sources), expert c being chunk c of *every* source FFN
    concatenated along F (width N*F/C), its down projection scaled by C/N, so that uniform routing
    over all experts computes the mean of the source FFNs (no scaling in the paper's C = N case).
    Blend experts belong to no domain, so `centroid` routers do not apply.
- Special cases: `upcycle=N` (sparse upcycling: N experts, all copies of the seed, no experts
  needed; the MoE computes exactly the seed, for any router) and `average_all` (Branch-Train-Merge
  style: every tensor averaged, FFNs too, into a dense model of the seed's family; over the same sources, so the seed
  takes part unless keep_seed=False).

Validation, before any byte is written: options; that the output would not overwrite a
checkpoint (without `force`) or an input; every input checkpoint (config, index, safetensors
headers, truncation, tensor names and shapes, through hf.CheckpointReader); that every expert has
a DONE.json (a finished btx job; `allow_no_manifest` lets external checkpoints in); that seed and
experts agree on the architecture, vocab, tie_word_embeddings, rope and tokenizer files; the
centroid shards. Each fault is one BtxError naming the directory, field or file.

Streaming and memory
- The output is written tensor by tensor through hf.write_checkpoint (header first, then each
  tensor produced, written and dropped). Inputs are read with plain reads (hf.CheckpointReader.
  read_into) into buffers that are reused from tensor to tensor, never memory-mapped, so memory is
  about one output tensor plus a few 32 MB working chunks, whatever the model size (the averaging
  runs in row chunks). An output tensor that is a source tensor's bytes unchanged (an expert FFN
  in the inputs' dtype: most of the output) is not read at all: `_Mixer.stored` names the file
  range and the writer copies it inside the kernel (hf.FileRange).
- A `centroid` init is the exception: it runs the merged model layer by layer before writing and
  holds, besides the streaming buffers, one merged layer in fp32 (for a 7B seed with 4 experts,
  about 2.4 GB) and the hidden states of every centroid token (domains x tokens x D x 4 bytes; 3
  domains x 64k tokens x 4096 = 3.2 GB). That is fine at demo scale, on a GPU, or with
  `centroid_tokens` lowered; on a CPU a 7B centroid pass also takes a long while (it is a forward
  pass of the MoE over all those tokens).
- Atomic and reproducible: the directory is built in a hidden temporary sibling, fsynced, and
  renamed into place with its DONE.json already inside, so a killed merge leaves nothing that
  looks finished, and the same inputs and options give the same bytes (routers from a seed, a
  fixed tensor order, no timestamps inside the safetensors files).
- Input hashes: every input file is hashed while the merge runs (a background thread, from the
  page cache that the merge's own reads and the read-ahead fill), so DONE.json records what was
  actually read. A btx-made input whose hash differs from what its own DONE.json records (a bit
  flipped after its job finished, say) fails the merge before the output appears.
- Locking: the output's lock (btx.manifest.output_lock) is held from the "exists / --force"
  check to the final rename, so two merges into one output cannot both succeed; the second stops
  with one line naming the first one's pid and host.

Test hook: BTX_MERGE_TEST_DELAY=<seconds> sleeps after every written tensor, so a test can kill a
merge half-way.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import re
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from btx import families, hf
from btx.errors import BtxError
from btx.manifest import (DONE_NAME, atomic_dir, disk_errors, ensure_free_space, fsync_tree, identity, output_lock,
                          producer_manifest, relative_identities, sha256_file, update_from_file, write_done)
from btx.model import ModelConfig
from btx.recipe import GRANULARITIES, MERGE_DTYPES, ROUTER_INITS, MergeSection
from btx.router_fit import FIT_INITS, check_shard

__all__ = ["MergeOptions", "merge", "merge_from_recipe", "merge_command"]

SEED = "seed"
DTYPES = {name: getattr(torch, name) for name in MERGE_DTYPES}
TEST_DELAY_ENV = "BTX_MERGE_TEST_DELAY"
_CHUNK_BYTES = 32 << 20  # fp32 working set of one averaging / conversion step
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# Tokenizer files whose contents must agree across inputs: everything the checkpoint carries for
# its tokenizer and chat template (generation_config.json may differ).
_TOKENIZER_IDENTITY = tuple(f for f in hf.TOKENIZER_FILES if f != "generation_config.json")
# ModelConfig fields that may differ between seed and experts (everything else must match).
_MAY_DIFFER = ("extra",)
# config.json names of ModelConfig fields, for messages.
_HF_FIELD = {
    "family": "model_type", "dim": "hidden_size", "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
    "n_kv_heads": "num_key_value_heads", "ffn_dim": "intermediate_size", "norm_eps": "rms_norm_eps",
    "max_seq_len": "max_position_embeddings", "tie_embeddings": "tie_word_embeddings",
    "rope_scaling": "rope_parameters", "qkv_bias": "attention_bias", "o_bias": "attention_bias",
}  # fmt: skip

_RECIPE = MergeSection()  # the recipe schema's defaults are the defaults here too


@dataclass
class MergeOptions:
    """How to merge. The recipe's `merge:` section maps onto the first block one to one."""

    keep_seed: bool = _RECIPE.keep_seed
    weights: Any = _RECIPE.weights  # "uniform" | "tokens" | {source name: weight}
    router_init: str = _RECIPE.router_init  # random | zeros | centroid | ridge | hidden
    router_std: float = _RECIPE.router_std
    router_seed: int = _RECIPE.router_seed
    centroid_tokens: int = _RECIPE.centroid_tokens  # per domain, for centroid and ridge
    ridge_lambda: float = _RECIPE.ridge_lambda
    router_scale: float = _RECIPE.router_scale  # fitted inits: rows times this
    prompts: dict = field(default_factory=dict)  # hidden: {expert: [positive prompt, ...]}
    negative_prompts: dict = field(default_factory=dict)  # hidden: {expert: [...]}; default: the others' prompts
    granularity: str = _RECIPE.granularity  # expert | split | blend
    chunks: int | None = None  # split: required; blend: default the number of source FFNs
    top_k: int = _RECIPE.top_k
    dtype: str | None = _RECIPE.dtype  # None: the inputs' dtype (the seed's when they differ)
    shard_size: int | str = _RECIPE.shard_size
    # Not in the recipe section:
    # Written to the MoE's config.json for whoever trains it further with transformers: the
    # recipe's finetune.balance_alpha in recipe mode, the paper's 0.01 otherwise.
    router_aux_loss_coef: float = 0.01
    upcycle: int = 0  # > 0: sparse upcycling into this many copies of the seed
    average_all: bool = False  # Branch-Train-Merge style dense average
    centroid_device: str | None = None  # None: cuda when available, else cpu

    @classmethod
    def from_section(cls, section: MergeSection, **more) -> MergeOptions:
        from btx.recipe import to_plain

        own = {f.name for f in dataclasses.fields(cls)}
        values = {k: to_plain(getattr(section, k)) for k in own if hasattr(section, k)}
        if values.get("granularity") == "expert":
            values["chunks"] = None
        return cls(**{**values, **more})


# --------------------------------------------------------------------------------------------
# The plan: everything decided and checked before a byte is written
# --------------------------------------------------------------------------------------------


@dataclass
class _Input:
    name: str  # a domain name, or "seed"
    path: Path
    reader: hf.CheckpointReader
    manifest: dict | None
    recorded_hashes: dict[str, str] | None  # sha256 of its files, from its DONE.json

    @property
    def cfg(self) -> ModelConfig:
        return self.reader.cfg


@dataclass
class _Expert:
    name: str
    domain: str | None  # whose data its centroid row comes from ("seed": all domains; None: blend)
    pieces: list[tuple[int, int, int]]  # (FFN source index, f0, f1): rows of gate/up, columns of down
    down_scale: float
    group: int  # index of its router row before expansion (split chunks share their FFN's row)


@dataclass
class _Plan:
    out: Path
    options: MergeOptions
    seed: _Input
    experts_in: list[_Input]  # the domain experts, in order
    ffn_sources: list[_Input]  # the FFNs that become experts (upcycling: the seed N times)
    averaged: list[tuple[_Input, float]]  # sources of every other tensor, normalised nonzero weights
    weights: dict[str, float]
    out_cfg: ModelConfig
    dtype: torch.dtype
    experts: list[_Expert]
    groups: list[_Expert]  # one representative expert per router row group
    shard_size: int
    force: bool
    centroid_shards: dict[str, Any] = field(default_factory=dict)  # domain -> btx.data.Shard (centroid, ridge)
    prompt_sets: list = field(default_factory=list)  # hidden: btx.router_fit.TokenSet per prompt list
    recipe_hash: str | None = None

    @property
    def kind(self) -> str:
        return "average" if self.options.average_all else "upcycle" if self.options.upcycle else "moe"

    @property
    def inputs(self) -> list[_Input]:
        return [*self.experts_in, self.seed]

    def close(self) -> None:
        for inp in self.inputs:
            inp.reader.close()


def _fail(message: str) -> BtxError:
    return BtxError(f"merge: {message}")


def _check_options(o: MergeOptions, expert_names: list[str]) -> None:
    def choice(key: str, options: tuple) -> None:
        if getattr(o, key) not in options:
            raise _fail(f"{key} {getattr(o, key)!r}: expected one of {', '.join(map(str, options))}")

    choice("router_init", ROUTER_INITS)
    choice("granularity", GRANULARITIES)
    if o.dtype is not None:
        choice("dtype", tuple(DTYPES))
    for key in ("router_std", "centroid_tokens", "top_k"):
        if not getattr(o, key) > 0:
            raise _fail(f"{key} must be > 0, got {getattr(o, key)!r}")
    if isinstance(o.upcycle, bool) or not isinstance(o.upcycle, int) or o.upcycle < 0:
        raise _fail(f"upcycle must be a number of experts >= 1, got {o.upcycle!r}")
    if o.upcycle and expert_names:
        raise _fail(f"upcycle builds every expert from the seed; it takes no experts (got {', '.join(expert_names)})")
    if not o.upcycle and not expert_names:
        raise _fail("nothing to merge: give at least one expert (--expert NAME=DIR), or --upcycle N")
    if o.average_all and o.upcycle:
        raise _fail("average_all and upcycle exclude each other (an average of seed copies is the seed)")
    if o.average_all and o.granularity != "expert":
        raise _fail(f"average_all writes a dense model; granularity {o.granularity} does not apply")
    if o.average_all and o.router_init in FIT_INITS:
        raise _fail(f"average_all writes a dense model without routers; router_init {o.router_init} does not apply")
    if o.granularity == "expert" and o.chunks not in (None, 1):
        raise _fail(f"chunks {o.chunks} needs granularity split or blend")
    if o.granularity == "split" and (o.chunks is None or o.chunks < 2):
        raise _fail(f"granularity split needs chunks >= 2, got {o.chunks}")
    if o.granularity == "blend" and o.chunks is not None and o.chunks < 2:
        raise _fail(f"granularity blend needs chunks >= 2, got {o.chunks}")
    if o.granularity == "blend" and o.router_init in FIT_INITS:
        raise _fail(f"blend experts mix every domain, so router_init {o.router_init} does not apply; use random or zeros")
    if o.router_init in FIT_INITS and o.upcycle:
        raise _fail(f"router_init {o.router_init} needs domain experts; upcycled experts are all the seed")
    for key in ("ridge_lambda", "router_scale"):
        if not (getattr(o, key) > 0 and math.isfinite(getattr(o, key))):
            raise _fail(f"{key} must be a positive number, got {getattr(o, key)!r}")
    _check_prompts(o, [*expert_names, *([SEED] if o.keep_seed else [])])
    for name in expert_names:
        if not _NAME_RE.match(name):
            raise _fail(f"expert name {name!r}: use letters, digits, '_', '-', '.'")
        if name == SEED:
            raise _fail("'seed' names the seed; give the expert another name")
    dupes = sorted({n for n in expert_names if expert_names.count(n) > 1})
    if dupes:
        raise _fail(f"expert name(s) given twice: {', '.join(dupes)}")
    try:
        hf.parse_size(o.shard_size)
    except BtxError as e:
        raise _fail(str(e)) from None


def _check_prompts(o: MergeOptions, experts: list[str]) -> None:
    for key in ("prompts", "negative_prompts"):
        given = getattr(o, key) or {}
        if given and o.router_init != "hidden":
            raise _fail(f"{key} are for router_init hidden, not {o.router_init}")
        for name, texts in given.items():
            if name not in experts:
                raise _fail(f"{key} of {name!r}: not an expert of this merge ({', '.join(experts)})")
            if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) and t for t in texts):
                raise _fail(f"{key} of {name!r}: expected a list of non-empty strings")
    if o.router_init == "hidden" and not o.prompts:
        raise _fail("router_init hidden needs prompts: give each expert positive prompts "
                    "(recipe merge.prompts {expert: [text, ...]}, or --prompt EXPERT=TEXT)")


def _manifest_of(path: Path) -> tuple[dict | None, str]:
    """The DONE.json describing checkpoint `path`, and the prefix its "outputs" keys carry."""
    return producer_manifest(path)


def _recorded_hashes(manifest: dict | None, prefix: str) -> dict[str, str] | None:
    outputs = (manifest or {}).get("outputs")
    if not isinstance(outputs, dict):
        return None
    return {k[len(prefix):]: v for k, v in outputs.items() if isinstance(k, str) and k.startswith(prefix)}


def _looks_like_btx_job(path: Path) -> bool:
    return path.name == "final" and any((path.parent / p).exists() for p in ("ckpt", "metrics.jsonl", "train.log"))


def _open_input(name: str, path: str | os.PathLike, *, need_manifest: bool, allow_no_manifest: bool) -> _Input:
    path = Path(path)
    if not (path / hf.CONFIG_NAME).is_file() and (path / "final" / hf.CONFIG_NAME).is_file():
        path = path / "final"  # a branch job's directory: its export is final/
    manifest, prefix = _manifest_of(path) if path.is_dir() else (None, "")
    if manifest is None and need_manifest and not allow_no_manifest and path.is_dir():
        if _looks_like_btx_job(path) or name == SEED:
            what = "its training job" if name == SEED else "its branch job"
            raise BtxError(
                f"{path}: {what} has no {DONE_NAME}, so it has not finished (see `btx status`); merge once "
                "it is done, or pass --allow-no-manifest to merge these weights anyway"
            )
        raise BtxError(
            f"{path}: expert '{name}' has no {DONE_NAME} (not made by btx?); pass --allow-no-manifest "
            "to merge an external checkpoint"
        )
    reader = hf.CheckpointReader(path)  # validates config, index, headers, names and shapes
    if reader.cfg.is_moe:
        reader.close()
        raise BtxError(
            f"{path}: is an MoE ({reader.hf_config.get('model_type')}, {reader.cfg.n_experts} experts); merge takes "
            "dense checkpoints (to add experts to a finished MoE, use btx merge --into)"
        )
    return _Input(name, path, reader, manifest, _recorded_hashes(manifest, prefix))


def _check_same_architecture(seed: _Input, other: _Input) -> None:
    mine, theirs = dataclasses.asdict(seed.cfg), dataclasses.asdict(other.cfg)
    for key in mine:
        if key not in _MAY_DIFFER and mine[key] != theirs[key]:
            name = _HF_FIELD.get(key, key)
            raise BtxError(
                f"{other.path / hf.CONFIG_NAME}: {name} is {theirs[key]!r} but the seed ({seed.path}) has "
                f"{mine[key]!r}; experts must keep the seed's architecture"
            )
    _check_same_tokenizer(seed.path, other.path)


def _check_same_tokenizer(seed_dir: Path, other_dir: Path) -> None:
    """An expert's tokenizer files and chat template are the seed's, byte for byte. An expert
    without them is fine (the merge carries the seed's); one with a file the seed lacks is not."""
    for file in _TOKENIZER_IDENTITY:
        a, b = seed_dir / file, other_dir / file
        if b.is_file() and not a.is_file():
            raise BtxError(f"{b}: the seed ({seed_dir}) has no {file}; experts must share the seed's tokenizer "
                           "and chat template")
        if a.is_file() and b.is_file() and sha256_file(a) != sha256_file(b):
            raise BtxError(f"{b}: differs from the seed's {file} ({a}); experts must share the seed's tokenizer "
                           "and chat template")


def _resolve_weights(o: MergeOptions, sources: list[_Input]) -> dict[str, float]:
    names = [s.name for s in sources]
    w = o.weights
    if w == "uniform" or len(sources) == 1:
        raw = {n: 1.0 for n in names}
    elif w == "tokens":
        raw = {}
        for s in sources:
            if s.name == SEED:
                continue
            tokens = (s.manifest or {}).get("tokens")
            if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens <= 0:
                where = s.path if s.manifest is None else f"{s.path}'s {DONE_NAME}"
                raise BtxError(
                    f"{where}: weights=tokens needs the tokens expert '{s.name}' trained on "
                    "(the \"tokens\" field of its DONE.json); give explicit weights instead"
                )
            raw[s.name] = float(tokens)
        if SEED in names:  # the seed's training is the shared past of every expert
            raw[SEED] = sum(raw.values()) / len(raw)
    elif isinstance(w, dict):
        unknown = sorted(set(w) - set(names))
        missing = [n for n in names if n not in w]
        if unknown or missing:
            raise _fail(
                f"weights: give one weight per averaged source ({', '.join(names)})"
                + (f"; unknown {', '.join(unknown)}" if unknown else "")
                + (f"; missing {', '.join(missing)}" if missing else "")
            )
        raw = {}
        for n in names:
            v = w[n]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise _fail(f"weights.{n}: expected a number >= 0, got {v!r}")
            raw[n] = float(v)
    else:
        raise _fail(f"weights {w!r}: expected uniform, tokens or a mapping of weights")
    total = sum(raw.values())
    if total <= 0:
        raise _fail("weights must sum to more than 0")
    return {n: raw[n] / total for n in names}


def _plan_experts(o: MergeOptions, ffn_sources: list[_Input], ffn_dim: int) -> tuple[list[_Expert], int]:
    """The experts (which FFN rows/columns each is made of) and the output FFN width."""
    n = len(ffn_sources)
    domain = lambda s: s.name if not o.upcycle else SEED  # noqa: E731
    if o.granularity == "expert":
        experts = [_Expert(s.name, domain(s), [(i, 0, ffn_dim)], 1.0, i) for i, s in enumerate(ffn_sources)]
        return experts, ffn_dim
    c = o.chunks if o.chunks is not None else n
    if ffn_dim % c:
        raise _fail(f"chunks {c} must divide the FFN width (intermediate_size {ffn_dim})")
    f = ffn_dim // c
    if o.granularity == "split":
        experts = [
            _Expert(f"{s.name}.{k}", domain(s), [(i, k * f, (k + 1) * f)], float(c), i)
            for i, s in enumerate(ffn_sources)
            for k in range(c)
        ]
        return experts, f
    experts = [  # blend
        _Expert(f"blend.{k}", None, [(i, k * f, (k + 1) * f) for i in range(n)], c / n, k) for k in range(c)
    ]
    return experts, n * f


def _check_output(out: Path, inputs: list[Path], force: bool) -> None:
    resolved = out.resolve()
    for p in inputs:
        q = p.resolve()
        if resolved == q or q.is_relative_to(resolved) or resolved.is_relative_to(q):
            raise BtxError(f"{out}: the output would overwrite or sit inside an input ({p}); choose another --out")
    if out.exists() and not force and (not out.is_dir() or any(out.iterdir())):
        what = "a finished merge" if (out / DONE_NAME).is_file() else "not empty"
        raise BtxError(f"{out}: already exists ({what}); pass --force to replace it")


def _plan(
    seed: str | os.PathLike,
    experts: dict[str, str | os.PathLike],
    out: str | os.PathLike,
    o: MergeOptions,
    *,
    centroid_data: dict[str, str | os.PathLike] | None,
    force: bool,
    allow_no_manifest: bool,
    seed_needs_manifest: bool,
) -> _Plan:
    experts = dict(experts)
    _check_options(o, list(experts))
    out = Path(out)
    _check_output(out, [Path(seed), *map(Path, experts.values())], force)

    opened: list[_Input] = []
    try:
        seed_in = _open_input(SEED, seed, need_manifest=seed_needs_manifest, allow_no_manifest=allow_no_manifest)
        opened.append(seed_in)
        for name, path in experts.items():
            opened.append(_open_input(name, path, need_manifest=True, allow_no_manifest=allow_no_manifest))
        experts_in = opened[1:]
        for inp in experts_in:
            _check_same_architecture(seed_in, inp)

        if o.upcycle:
            ffn_sources = [dataclasses.replace(seed_in, name=f"{SEED}.{i}") for i in range(o.upcycle)]
            averaged_sources = [seed_in]
        else:
            ffn_sources = [*experts_in, seed_in] if o.keep_seed else list(experts_in)
            averaged_sources = list(ffn_sources)
        weights = _resolve_weights(o, averaged_sources)
        averaged = [(s, weights[s.name]) for s in averaged_sources if weights[s.name] > 0]
        # Default: the inputs' dtype, which is the seed's (experts keep it); the seed's when they differ.
        dtype = DTYPES[o.dtype] if o.dtype is not None else seed_in.reader.dtype

        if o.average_all:
            plan_experts, out_cfg = [], seed_in.cfg
        else:
            plan_experts, ffn_out = _plan_experts(o, ffn_sources, seed_in.cfg.ffn_dim)
            if o.top_k > len(plan_experts):
                raise _fail(f"top_k {o.top_k} is more than the {len(plan_experts)} experts")
            why = families.moe_unsupported(seed_in.cfg)
            if why:
                raise BtxError(f"{seed_in.path / hf.CONFIG_NAME}: {why}; this seed cannot be merged into an MoE")
            out_cfg = dataclasses.replace(
                seed_in.cfg, n_experts=len(plan_experts), top_k=o.top_k, ffn_dim=ffn_out, router_mode="topk",
                norm_topk_prob=True, shared_expert_dim=0, expert_names=[e.name for e in plan_experts],
                extra={**seed_in.cfg.extra, "router_aux_loss_coef": o.router_aux_loss_coef},
            )
        groups = {e.group: e for e in plan_experts}
        plan = _Plan(
            out=out, options=o, seed=seed_in, experts_in=experts_in, ffn_sources=ffn_sources,
            averaged=averaged, weights=weights, out_cfg=out_cfg, dtype=dtype, experts=plan_experts,
            groups=[groups[g] for g in sorted(groups)], shard_size=hf.parse_size(o.shard_size), force=force,
        )  # fmt: skip
        if o.router_init in ("centroid", "ridge") and not o.average_all:
            plan.centroid_shards = _centroid_shards(plan, centroid_data or {})
        if o.router_init == "hidden" and not o.average_all:
            plan.prompt_sets = _prompt_sets(plan)
        return plan
    except BaseException:
        for inp in opened:
            inp.reader.close()
        raise


# --------------------------------------------------------------------------------------------
# Producing output tensors
# --------------------------------------------------------------------------------------------


def _hf_name(reader: hf.CheckpointReader, btx_name: str) -> str:
    """The HF tensor a dense source stores btx parameter `btx_name` as (through hf.KEY_TABLE)."""
    (name,) = reader.plan[btx_name].hf_names
    return name


class _Mixer:
    """Produces each output tensor from the sources, in buffers reused from tensor to tensor.

    A produced tensor is valid until the next call (the writer writes it at once); callers that
    keep one must copy it.
    """

    def __init__(self, plan: _Plan):
        self.plan = plan
        self.shapes = hf.btx_shapes(plan.out_cfg)
        self.fitted: dict[int, torch.Tensor] = {}  # layer -> [groups, D] fp32 (centroid, ridge, hidden)
        self._buffers: dict[str, torch.Tensor] = {}

    def _buffer(self, key: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
        nbytes = numel * dtype.itemsize
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < nbytes:
            buf = self._buffers[key] = torch.empty(nbytes, dtype=torch.uint8)
        return buf[:nbytes].view(dtype)

    def _output(self, shape: tuple[int, ...]) -> torch.Tensor:
        return self._buffer("out", math.prod(shape), self.plan.dtype).view(shape)

    def _read(self, inp: _Input, btx_name: str, r0: int, r1: int, key: str) -> torch.Tensor:
        """Rows [r0, r1) of a source tensor, in its stored dtype."""
        name = _hf_name(inp.reader, btx_name)
        info = inp.reader.info(name)
        buf = self._buffer(key, (r1 - r0) * (math.prod(info.shape[1:])), info.dtype)
        return inp.reader.read_into(name, buf, (r0, r1))

    def _fp32(self, key: str, like: torch.Tensor) -> torch.Tensor:
        return self._buffer(key, like.numel(), torch.float32).view(like.shape)

    @staticmethod
    def _row_step(shape: tuple[int, ...]) -> int:
        return max(1, (_CHUNK_BYTES // 4) // max(1, math.prod(shape[1:])))

    def _copy_rows(self, inp: _Input, btx_name: str, r0: int, r1: int, dst: torch.Tensor, scale: float) -> None:
        """dst <- rows [r0, r1) of a source tensor times `scale`. Raw bytes when nothing changes."""
        name = _hf_name(inp.reader, btx_name)
        if scale == 1.0 and inp.reader.info(name).dtype == dst.dtype:
            inp.reader.read_into(name, dst, (r0, r1))
            return
        step = self._row_step(tuple(dst.shape))
        for a in range(r0, r1, step):
            b = min(r1, a + step)
            self._store(dst[a - r0 : b - r0], self._read(inp, btx_name, a, b, "in"), scale)

    def _store(self, dst: torch.Tensor, x: torch.Tensor, scale: float) -> None:
        if scale == 1.0:
            dst.copy_(x)  # a plain copy when the dtypes match, else one rounding
            return
        tmp = self._fp32("scaled", x)
        tmp.copy_(x).mul_(scale)
        dst.copy_(tmp)

    def average(self, btx_name: str) -> torch.Tensor:
        """The weighted mean over the averaged sources, as a running mean in fp32:
        m <- m + (w_k / W_k)(x_k - m), W_k the weight seen so far (torch.lerp). Where the sources
        agree, x_k - m is exactly 0, so identical copies give back the original bit for bit."""
        shape = self.shapes[btx_name]
        out = self._output(shape)
        (first, w_first), *rest = self.plan.averaged
        if not rest:
            self._copy_rows(first, btx_name, 0, shape[0], out, 1.0)
            return out
        step = self._row_step(shape)
        for r0 in range(0, shape[0], step):
            r1 = min(shape[0], r0 + step)
            x0 = self._read(first, btx_name, r0, r1, "in")
            mean = self._fp32("mean", x0).copy_(x0)
            seen = w_first
            for inp, w in rest:
                seen += w
                x = self._fp32("x", x0).copy_(self._read(inp, btx_name, r0, r1, "in"))
                mean.lerp_(x, w / seen)
            out[r0:r1].copy_(mean)
        return out

    def expert(self, btx_name: str, e: int) -> torch.Tensor:
        """Expert e's gate (w1), up (w3) or down (w2) projection; `btx_name` is the stacked name."""
        shape = self.shapes[btx_name][1:]
        dense = f"{btx_name}.weight"  # the dense FFN parameter the expert comes from (CONTRACTS.md)
        ex = self.plan.experts[e]
        sources = self.plan.ffn_sources
        out = self._output(shape)
        if not btx_name.endswith(".w2"):  # gate/up [F, D]: pieces are row ranges
            pos = 0
            for s, f0, f1 in ex.pieces:
                self._copy_rows(sources[s], dense, f0, f1, out[pos : pos + f1 - f0], 1.0)
                pos += f1 - f0
            return out
        # down [D, F]: pieces are column ranges, scaled so that the routing sums stay right
        ffn_in = self.plan.seed.cfg.ffn_dim
        if len(ex.pieces) == 1 and ex.pieces[0][1:] == (0, ffn_in):  # a whole FFN: whole rows
            self._copy_rows(sources[ex.pieces[0][0]], dense, 0, shape[0], out, ex.down_scale)
            return out
        step = self._row_step((shape[0], ffn_in))
        for r0 in range(0, shape[0], step):
            r1 = min(shape[0], r0 + step)
            col = 0
            for s, f0, f1 in ex.pieces:
                x = self._read(sources[s], dense, r0, r1, "in")
                self._store(out[r0:r1, col : col + f1 - f0], x[:, f0:f1], ex.down_scale)
                col += f1 - f0
        return out

    def stored(self, btx_name: str, e: int | None = None) -> hf.FileRange | None:
        """Where output tensor `btx_name` (expert `e` of a stacked one) already lies, byte for
        byte, in a source file: an expert that is one source FFN's rows, unscaled, or a mean over a
        single source, in the output dtype. The writer copies such bytes file to file. None when
        the tensor must be computed (`expert` / `average`)."""
        if e is None:
            if len(self.plan.averaged) != 1:
                return None
            inp, name, rows = self.plan.averaged[0][0], btx_name, None
        else:
            ex = self.plan.experts[e]
            if len(ex.pieces) != 1:
                return None
            s, f0, f1 = ex.pieces[0]
            inp, name, rows = self.plan.ffn_sources[s], f"{btx_name}.weight", (f0, f1)
            if btx_name.endswith(".w2"):  # down [D, F]: only whole rows are contiguous
                if (f0, f1) != (0, self.plan.seed.cfg.ffn_dim) or ex.down_scale != 1.0:
                    return None
                rows = (0, self.shapes[btx_name][1])
        hf_name = _hf_name(inp.reader, name)
        if inp.reader.info(hf_name).dtype != self.plan.dtype:
            return None
        return inp.reader.file_range(hf_name, rows)

    def router(self, layer: int) -> torch.Tensor:
        """[E, D] router of `layer` in fp32 (before rounding to the output dtype)."""
        o, D = self.plan.options, self.plan.out_cfg.dim
        n_groups = len(self.plan.groups)
        if o.router_init == "zeros":
            rows = torch.zeros(n_groups, D)
        elif o.router_init == "random":
            key = hashlib.sha256(f"btx-merge-router:{o.router_seed}:{layer}".encode()).digest()
            gen = torch.Generator().manual_seed(int.from_bytes(key[:8], "little") >> 1)
            rows = torch.randn(n_groups, D, generator=gen) * o.router_std
        else:
            rows = self.fitted[layer]
        return rows[torch.tensor([e.group for e in self.plan.experts])]

    def specs(self) -> list[hf.TensorSpec]:
        """Every output tensor, by HF name through the family's key table, in checkpoint order."""
        dtype = self.plan.dtype

        def piece(name: str, e: int | None):
            if name.endswith(".ffn.router.weight"):
                return self.router(int(name.split(".")[1]))
            if e is not None:
                return self.stored(name, e) or self.expert(name, e)
            return self.stored(name) or self.average(name)

        return [hf.TensorSpec(t.name, t.shape, dtype, lambda t=t: hf.build_hf_tensor(t, piece, dtype))
                for t in hf.hf_layout(self.plan.out_cfg)]


# --------------------------------------------------------------------------------------------
# Centroid routers
# --------------------------------------------------------------------------------------------


def _centroid_shards(plan: _Plan, given: dict[str, str | os.PathLike]) -> dict:
    from btx.data import load_shard

    expert_dirs = {e.name: e.path for e in plan.experts_in if any(x.domain == e.name for x in plan.experts)}
    domains = list(expert_dirs)
    unknown = sorted(set(given) - set(domains))
    if unknown:
        raise _fail(f"router data for {', '.join(unknown)}: not an expert of this merge ({', '.join(domains)})")
    shards = {}
    for d in domains:
        path = given.get(d)
        if path is None:
            guess = _run_dir_val_shard(expert_dirs[d], d)
            if guess is None:
                raise _fail(
                    f"router_init {plan.options.router_init} needs validation tokens of domain '{d}': pass "
                    f"--router-data {d}=<run_dir>/data/{d}/val.bin"
                )
            path = guess
        shard = load_shard(path)
        check_shard(shard, f"router_init {plan.options.router_init} (domain '{d}')", plan.out_cfg.vocab_size)
        shards[d] = shard
    return shards


def _run_dir_val_shard(expert_path: Path, domain: str) -> Path | None:
    """<run_dir>/data/<domain>/val.bin for an expert at <run_dir>/experts/<domain>/final."""
    p = expert_path.resolve()
    if p.name == "final" and p.parent.name == domain and p.parent.parent.name == "experts":
        candidate = p.parent.parent.parent / "data" / domain / "val.bin"
        if candidate.with_suffix(".json").is_file():
            return candidate
    return None


def _prompt_sets(plan: _Plan) -> list:
    """hidden: one token set per expert's positive prompts ("pos:NAME") and explicit negatives ("neg:NAME")."""
    from btx.router_fit import prompt_set
    from btx.tokenizer import load_tokenizer

    o, cfg = plan.options, plan.out_cfg
    try:
        tokenizer = load_tokenizer(plan.seed.path)
    except BtxError as e:
        raise BtxError(f"router_init hidden tokenizes the prompts with the checkpoint's tokenizer: {e}") from None
    sets = []
    for kind, given in (("pos", o.prompts), ("neg", o.negative_prompts)):
        for name, texts in given.items():
            sets.append(prompt_set(f"{kind}:{name}", texts, tokenizer, cfg.max_seq_len, cfg.vocab_size))
    return sets


class _MergedWeights:
    """The merged MoE's layers for btx.router_fit.walk, produced by the mixer (fp32 copies)."""

    def __init__(self, plan: _Plan, mixer: _Mixer):
        self.plan, self.mixer, self.cfg = plan, mixer, plan.out_cfg

    def embed(self) -> torch.Tensor:
        return self.mixer.average("embed.weight").float().clone()

    def block(self, layer: int) -> dict[str, torch.Tensor]:
        p = f"layers.{layer}."
        names = [k for k in self.mixer.shapes if k.startswith(p) and ".ffn." not in k]
        return {k.removeprefix(p): self.mixer.average(k).to(torch.float32, copy=True) for k in names}

    def experts(self, layer: int) -> dict[str, torch.Tensor]:
        out = {}
        for w in ("w1", "w3", "w2"):
            name = f"layers.{layer}.ffn.{w}"
            stacked = torch.empty(self.mixer.shapes[name], dtype=torch.float32)
            for e in range(self.cfg.n_experts):
                stacked[e].copy_(self.mixer.expert(name, e))
            out[f"ffn.{w}"] = stacked
        return out


def _fit_routers(plan: _Plan, mixer: _Mixer, progress: bool, console=None) -> dict[str, int]:
    """Fill mixer.fitted with every layer's router by walking the merged model (btx.router_fit);
    returns the tokens each set contributed."""
    from btx.router_fit import centroid_rows, hidden_rows, ridge_rows, shard_windows, walk

    o, cfg = plan.options, plan.out_cfg
    domains = [None if g.domain == SEED else g.domain for g in plan.groups]  # one per router row group
    if o.router_init == "hidden":
        sets = plan.prompt_sets
        names = [g.name for g in plan.groups]
        positive = [f"pos:{n}" if n in o.prompts else None for n in names]
        negative = [
            [f"neg:{n}"] if n in o.negative_prompts else [f"pos:{m}" for m in o.prompts if m != n]
            for n in names
        ]

        def rule(layer, stats):
            return hidden_rows(stats, positive, negative)
    else:
        sets = [shard_windows(d, shard, o.centroid_tokens, cfg.max_seq_len) for d, shard in plan.centroid_shards.items()]
        if o.router_init == "centroid":
            def rule(layer, stats):
                return centroid_rows(stats, domains)
        else:
            def rule(layer, stats):
                return ridge_rows(stats, domains, o.ridge_lambda)


    def router_for_layer(layer: int, stats) -> torch.Tensor:
        rows_GD = rule(layer, stats) * o.router_scale
        mixer.fitted[layer] = rows_GD
        # The next layer's input is computed with the router as written (rounded to the output dtype).
        return mixer.router(layer).to(plan.dtype).float()

    with _Progress(progress, f"{o.router_init} routers", cfg.n_layers, bytes_=False, console=console) as bar:
        walk(_MergedWeights(plan, mixer), sets, router_for_layer, need_gram=o.router_init == "ridge",
             device=o.centroid_device, on_layer=lambda i: bar.advance(1, f"layer {i}"))
    return {s.name: s.tokens for s in sets}


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------


class _Progress:
    """A rich progress bar (bytes with GB/s, or steps), or nothing when disabled."""

    def __init__(self, enabled: bool, title: str, total: int, bytes_: bool = True, console=None):
        self.enabled, self.title, self.total, self.bytes_, self.console = enabled, title, total, bytes_, console

    def __enter__(self) -> _Progress:
        if self.enabled:
            from rich.progress import (
                BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                TimeRemainingColumn, TransferSpeedColumn,
            )  # fmt: skip

            if self.bytes_:
                counts = [DownloadColumn(binary_units=False), TransferSpeedColumn()]
            else:
                counts = [MofNCompleteColumn()]
            self.bar = Progress(
                TextColumn(f"[bold]{self.title}"), BarColumn(), *counts, TimeElapsedColumn(), TimeRemainingColumn(),
                TextColumn("{task.description}", style="dim"), console=self.console,
            )  # fmt: skip
            self.bar.__enter__()
            self.task = self.bar.add_task("", total=self.total)
        return self

    def advance(self, amount: int, description: str) -> None:
        if self.enabled:
            self.bar.update(self.task, advance=amount, description=description)

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self.bar.__exit__(*exc)


_HASH_WINDOW = 32 << 20  # input bytes hashed per file per turn, in step with the read-ahead


def _input_files(inp: _Input) -> list[str]:
    """The files of an input that the merge reads or copies: config, weights, index, tokenizer."""
    files = [hf.CONFIG_NAME, *sorted(inp.reader.metadata)]
    files += [f for f in (hf.INDEX_FILE, *hf.TOKENIZER_FILES) if (inp.path / f).is_file() and f not in files]
    return files


def _input_hashes(plan: _Plan, pool: ThreadPoolExecutor, stop: threading.Event) -> dict[str, dict[str, Future]]:
    """sha256 of every file each input is read from, hashed on `pool` while the merge runs: what
    DONE.json records is what the merge read, never a copy of the inputs' own manifests.

    One thread hashes all files a window at a time, round robin by offset: the order in which the
    read-ahead (btx.startup) and the layer-by-layer merge bring them into the page cache, so the
    hashing reads what is cached already instead of adding a second stream of disk reads."""
    files = [(inp.name, f, inp.path / f) for inp in plan.inputs for f in _input_files(inp)]
    out: dict[str, dict[str, Future]] = {inp.name: {} for inp in plan.inputs}
    for name, f, _ in files:
        out[name][f] = Future()
    pool.submit(_hash_round_robin, [(path, out[name][f]) for name, f, path in files], stop)
    return out


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


def _checked_input_hashes(plan: _Plan, pending: dict[str, dict[str, Future]]) -> dict[str, dict[str, str]]:
    """The finished hashes; BtxError when a btx-made input is not what its DONE.json says it wrote."""
    hashes = {name: {f: h.result() for f, h in files.items()} for name, files in pending.items()}
    for inp in plan.inputs:
        for f, digest in hashes[inp.name].items():
            recorded = (inp.recorded_hashes or {}).get(f)
            if recorded is not None and recorded != digest:
                raise BtxError(f"{inp.path / f}: its sha256 is not the one its {DONE_NAME} records (damaged or "
                               "edited after its job finished); nothing was merged: restore the file, or redo "
                               f"the job that made {inp.path}")
    return hashes


def _same_content_warnings(plan: _Plan, hashes: dict[str, dict[str, str]]) -> list[str]:
    """Inputs that are the same checkpoint (a symlink, one directory given twice) or hold the same
    weights: legal, but seldom what was meant (an expert that is the seed adds nothing)."""
    if plan.options.upcycle:
        return []
    seen: dict[tuple, str] = {}
    warnings = []
    for inp in plan.inputs:
        weights = tuple(sorted((f, h) for f, h in hashes[inp.name].items() if f.endswith(".safetensors")))
        if weights in seen:
            warnings.append(f"merge: warning: {inp.name} ({inp.path}) has the same weights as {seen[weights]}; "
                            "the MoE gets two identical experts")
        else:
            seen[weights] = f"{inp.name} ({inp.path})"
    return warnings


def _run(plan: _Plan, progress: bool, console=None) -> dict:
    started = time.monotonic()
    o = plan.options
    mixer = _Mixer(plan)
    fitted = plan.options.router_init in FIT_INITS and not plan.options.average_all
    router_tokens = _fit_routers(plan, mixer, progress, console) if fitted else None
    specs = mixer.specs()
    total = sum(math.prod(s.shape) * s.dtype.itemsize for s in specs)
    # The streaming phase is bound by I/O; its elementwise work runs fastest on one thread, and
    # leaves the other cores to the hashing threads and the kernel's writeback. (torch's intra-op
    # threads synchronise on every op: on a busy machine two of them run several times slower.)
    threads = torch.get_num_threads()
    delay = float(os.environ.get(TEST_DELAY_ENV, 0) or 0)
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="btx-merge-hash")
    stop_hashing = threading.Event()
    try:
        torch.set_num_threads(1)
        pending_hashes = _input_hashes(plan, pool, stop_hashing)
        tokenizer_from = next(
            (i.path for i in (plan.seed, *plan.experts_in) if any((i.path / f).is_file() for f in hf.TOKENIZER_FILES)),
            None,
        )
        with atomic_dir(plan.out, force=plan.force) as tmp, _Progress(progress, "merge", total, console=console) as bar:

            def on_tensor(name: str, nbytes: int) -> None:
                bar.advance(nbytes, name)
                if delay:
                    time.sleep(delay)

            outputs = hf.write_checkpoint(
                tmp, plan.out_cfg, specs, shard_size=plan.shard_size, tokenizer_from=tokenizer_from,
                atomic=False, on_tensor=on_tensor,
            )  # fmt: skip
            fsync_tree(tmp)  # the seconds below include making the bytes durable
            input_hashes = _checked_input_hashes(plan, pending_hashes)
            for warning in _same_content_warnings(plan, input_hashes):
                _console(console).print(f"[yellow]{warning}[/]", soft_wrap=True)
            inputs = {
                inp.name: {
                    "path": str(inp.path.resolve()),
                    "sha256": input_hashes[inp.name],
                    "sha256_from": "read",  # hashed from the bytes this merge read (DONE.json's checked)
                    "tokens": (inp.manifest or {}).get("tokens"),
                    "dtype": str(inp.reader.dtype).removeprefix("torch."),
                }
                for inp in plan.inputs
            }
            manifest = {
                "stage": "merge",
                "kind": plan.kind,
                "inputs": inputs,
                # The same hashes in the shape every stage's manifest uses (btx.manifest.changed_inputs),
                # with the centroid shards, which decide the routers too.
                "input_identities": relative_identities({
                    **{name: {"path": record["path"], "sha256": record["sha256"]} for name, record in inputs.items()},
                    **{f"centroid:{d}": identity(shard.path) for d, shard in plan.centroid_shards.items()},
                }, plan.out),
                "weights": plan.weights,
                "options": {**dataclasses.asdict(o), "dtype": str(plan.dtype).removeprefix("torch.")},
                "outputs": outputs,
                "bytes": sum((tmp / f).stat().st_size for f in outputs),
                "seconds": round(time.monotonic() - started, 3),
            }
            if plan.kind != "average":
                manifest |= {
                    "experts": [e.name for e in plan.experts],
                    "expert_domains": [e.domain for e in plan.experts],
                    "n_experts": plan.out_cfg.n_experts,
                    "top_k": plan.out_cfg.top_k,
                    "ffn_dim": plan.out_cfg.ffn_dim,
                }
            if router_tokens is not None:
                manifest["router_tokens"] = router_tokens
            if plan.recipe_hash is not None:
                manifest["recipe_hash"] = plan.recipe_hash
            write_done(tmp, manifest)  # inside the temporary: the directory appears with it
    finally:
        stop_hashing.set()  # a merge that failed does not wait for (or keep) its hashing
        pool.shutdown(wait=False, cancel_futures=True)
        torch.set_num_threads(threads)
    return manifest


def merge(
    seed: str | os.PathLike,
    experts: dict[str, str | os.PathLike] | None,
    out: str | os.PathLike,
    options: MergeOptions | None = None,
    *,
    centroid_data: dict[str, str | os.PathLike] | None = None,
    force: bool = False,
    allow_no_manifest: bool = False,
    seed_needs_manifest: bool = False,
    recipe_hash: str | None = None,
    progress: bool = True,
    console=None,
) -> dict:
    """Merge `seed` and `experts` ({domain: checkpoint dir}, in expert order) into `out`.

    Everything is validated before anything is written (BtxError otherwise). Returns the DONE.json
    written into `out`. `centroid_data` maps a domain to its validation shard (default:
    <run_dir>/data/<domain>/val.bin when the expert sits at <run_dir>/experts/<domain>/final).
    `console`: the rich Console progress bars draw on (default: rich's own).
    """
    options = options or MergeOptions()
    centroid_data = {d: _centroid_shard_path(d, p) for d, p in (centroid_data or {}).items()}
    for warning in _same_path_warnings(seed, experts or {}):
        _console(console).print(f"[yellow]{warning}[/]", soft_wrap=True)
    # The exists / --force decision (in _plan) and the final rename happen under one lock.
    with output_lock(out, "this merge output"):
        plan = _plan(
            seed, experts or {}, out, options, centroid_data=centroid_data, force=force,
            allow_no_manifest=allow_no_manifest, seed_needs_manifest=seed_needs_manifest,
        )  # fmt: skip
        plan.recipe_hash = recipe_hash
        try:
            size = _output_bytes(plan)
            ensure_free_space(plan.out.parent, size, f"the merged checkpoint {plan.out}")
            with disk_errors(plan.out.parent, size, f"the merged checkpoint {plan.out}"):
                return _run(plan, progress, console)
        finally:
            plan.close()


def _console(console):
    from rich.console import Console

    return console or Console(stderr=True)


def _output_bytes(plan: _Plan) -> int:
    """The size of the merged checkpoint's tensors (headers and config add a few kB)."""
    return sum(math.prod(shape) for shape in hf.hf_shapes(plan.out_cfg).values()) * plan.dtype.itemsize


def _centroid_shard_path(domain: str, spec: str | os.PathLike) -> Path:
    """--centroid-data NAME=PATH takes what `btx eval --data` takes: a shard, or a prepared domain
    directory (its val shard), checked against its sidecar's sha256 before the merge starts."""
    from btx.data import load_shard, shard_spec_path

    path = shard_spec_path(spec, f"centroid data of {domain!r}: {spec}")
    load_shard(path, verify=True)
    return path


def _same_path_warnings(seed, experts: dict) -> list[str]:
    """Inputs that are one directory (a symlink to the seed, a checkpoint given twice)."""
    seen: dict[Path, str] = {}
    warnings = []
    for name, path in [(SEED, seed), *experts.items()]:
        real = Path(path).resolve()
        if (real / "final" / hf.CONFIG_NAME).is_file() and not (real / hf.CONFIG_NAME).is_file():
            real = real / "final"
        if real in seen:
            warnings.append(f"merge: warning: {name} ({path}) is the same checkpoint as {seen[real]}")
        else:
            seen[real] = f"{name} ({path})"
    return warnings


def merge_from_recipe(
    exp,
    *,
    out_dir: str | os.PathLike | None = None,
    upcycle: int = 0,
    force: bool = False,
    allow_no_manifest: bool = False,
    progress: bool = True,
    console=None,
) -> dict:
    """The recipe's merge stage: <run_dir>/seed (or seed.path) and <run_dir>/experts/<domain>/final,
    with the `merge:` section, into <run_dir>/merged (or `out_dir`).

    `upcycle=N` builds the sparse-upcycling baseline instead: N copies of the seed with the same
    section's settings (a `centroid` router init, which needs domain experts, becomes `random`,
    the paper's init for upcycling).
    """
    seed = exp.seed_dir
    options = recipe_merge_options(exp.merge, upcycle, aux_loss_coef=exp.finetune.balance_alpha)
    experts = {} if upcycle else {d: exp.expert_dir(d) / "final" for d in exp.merged_domains}
    merged = set(experts) | {SEED}  # prompts of experts that grow adds later are not this merge's
    options.prompts = {k: v for k, v in options.prompts.items() if k in merged}
    options.negative_prompts = {k: v for k, v in options.negative_prompts.items() if k in merged}
    return merge(
        seed, experts, Path(out_dir) if out_dir is not None else exp.run_dir / "merged", options,
        centroid_data=recipe_router_data(exp, experts) if options.router_init in ("centroid", "ridge") else None,
        force=force, allow_no_manifest=allow_no_manifest, seed_needs_manifest=exp.seed.path is None,
        recipe_hash=merge_recipe_hash(exp, upcycle), progress=progress, console=console,
    )  # fmt: skip


def effective_merge_section(section: MergeSection) -> MergeSection:
    """The merge section as the merge reads it: prompts shape only a hidden init (the recipe keeps
    them for grow and the router-init table), so a merge with another init does not depend on them."""
    if section.router_init == "hidden" or not (section.prompts or section.negative_prompts):
        return section
    return dataclasses.replace(section, prompts={}, negative_prompts={})


def recipe_router_data(exp, domains) -> dict[str, Path]:
    """The shards a recipe's centroid and ridge routers are fitted on: each domain's *train* shard,
    so that the validation windows every eval row is scored on stay unseen by the routers too."""
    return {d: exp.data_dir(d) / "train.bin" for d in domains}


def recipe_merge_options(section: MergeSection, upcycle: int = 0, aux_loss_coef: float = 0.01) -> MergeOptions:
    """The options a recipe's merge runs with; an upcycle's centroid, ridge or hidden init (it has
    no domain experts) is `random`, the paper's init for upcycling. `aux_loss_coef` (the recipe's
    finetune.balance_alpha) goes into the MoE's config.json for training it further elsewhere."""
    options = MergeOptions.from_section(section, upcycle=upcycle, router_aux_loss_coef=aux_loss_coef)
    if upcycle and options.router_init in FIT_INITS:
        options.router_init = "random"
    if options.router_init != "hidden":  # the recipe keeps prompts for grow and the router-init table
        options.prompts, options.negative_prompts = {}, {}
    return options


def merge_recipe_hash(exp, upcycle: int = 0, section: MergeSection | None = None) -> str:
    """The recipe_hash a recipe's merge records in DONE.json (btx run compares it to adopt a merge
    made by `btx merge` with the same settings); `section` in place of the recipe's merge section."""
    from btx.recipe import recipe_hash

    experts = [] if upcycle else list(exp.merged_domains)
    merge_section = effective_merge_section(exp.merge if section is None else section)
    return recipe_hash({"merge": merge_section, "seed": str(exp.seed_dir), "experts": experts, "upcycle": upcycle})


# --------------------------------------------------------------------------------------------
# The command line (arguments are declared in btx/cli.py)
# --------------------------------------------------------------------------------------------

_ADHOC_FLAGS = {  # argparse dest -> MergeOptions field (None: not an option)
    "seed": None, "expert": None, "out": None, "centroid_data": None, "no_keep_seed": None,
    "weights": "weights", "router_init": "router_init", "router_std": "router_std",
    "router_seed": "router_seed", "centroid_tokens": "centroid_tokens", "granularity": "granularity",
    "chunks": "chunks", "top_k": "top_k", "dtype": "dtype", "shard_size": "shard_size", "upcycle": "upcycle",
    "average_all": "average_all", "centroid_device": "centroid_device", "ridge_lambda": "ridge_lambda",
    "router_scale": "router_scale",
    "prompt": None, "negative_prompt": None,
}  # fmt: skip


def _pairs(items: list[str], flag: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items or []:
        name, eq, value = item.partition("=")
        if not eq or not name or not value:
            raise BtxError(f"{flag} {item!r}: expected NAME=VALUE")
        if name in out:
            raise BtxError(f"{flag}: '{name}' given twice")
        out[name] = value
    return out


def prompt_lists(items: list[str], flag: str) -> dict[str, list[str]]:
    """--prompt NAME=TEXT, repeated: {NAME: [TEXT, ...]} in the order given."""
    out: dict[str, list[str]] = {}
    for item in items or []:
        name, eq, text = item.partition("=")
        if not eq or not name or not text:
            raise BtxError(f"{flag} {item!r}: expected NAME=TEXT")
        out.setdefault(name, []).append(text)
    return out


def _parse_weights(text: str | None):
    if text is None or text in ("uniform", "tokens"):
        return text
    weights = {}
    for name, value in _pairs(text.split(","), "--weights").items():
        try:
            weights[name] = float(value)
        except ValueError:
            raise BtxError(f"--weights {name}={value}: not a number") from None
    return weights


def merge_command(args) -> int:
    """`btx merge RECIPE [KEY=VALUE ...]` or `btx merge --seed DIR --expert NAME=DIR ... --out DIR`."""
    given = {}
    for dest in _ADHOC_FLAGS:
        value = getattr(args, dest, None)
        if value is not None and value is not False and value != []:
            given[dest] = value
    progress = not args.quiet
    if args.recipe is not None:
        if given:
            flags = ", ".join("--" + d.replace("_", "-") for d in given)
            raise BtxError(f"merge: {flags}: give merge settings as recipe overrides (e.g. merge.top_k=1), not flags")
        from btx.recipe import load_experiment

        exp = load_experiment(args.recipe, args.overrides)
        manifest = merge_from_recipe(exp, force=args.force, allow_no_manifest=args.allow_no_manifest, progress=progress)
        out = exp.run_dir / "merged"
    else:
        if args.overrides:
            raise BtxError(f"merge: overrides ({args.overrides[0]}) need a RECIPE")
        if not args.seed or not args.out:
            raise BtxError("merge: give a RECIPE, or --seed DIR, --expert NAME=DIR ... (or --upcycle N) and --out DIR")
        fields = {_ADHOC_FLAGS[d]: v for d, v in given.items() if _ADHOC_FLAGS[d] is not None}
        if "weights" in fields:
            fields["weights"] = _parse_weights(fields["weights"])
        if args.no_keep_seed:
            fields["keep_seed"] = False
        fields["prompts"] = prompt_lists(args.prompt, "--prompt")
        fields["negative_prompts"] = prompt_lists(args.negative_prompt, "--negative-prompt")
        manifest = merge(
            args.seed, _pairs(args.expert, "--expert"), args.out, MergeOptions(**fields),
            centroid_data=_pairs(args.centroid_data, "--router-data"), force=args.force,
            allow_no_manifest=args.allow_no_manifest, progress=progress,
        )  # fmt: skip
        out = Path(args.out)
    seconds = manifest["seconds"]
    what = (
        f"{manifest['n_experts']} experts ({', '.join(manifest['experts'])}), top-{manifest['top_k']}"
        if "experts" in manifest
        else "a dense average"
    )
    from rich.console import Console

    Console().print(
        f"merge: {what} -> {out}: {manifest['bytes'] / 1e9:.2f} GB in {seconds:.1f} s "
        f"({manifest['bytes'] / 1e9 / max(seconds, 1e-9):.2f} GB/s)"
    )
    return 0
