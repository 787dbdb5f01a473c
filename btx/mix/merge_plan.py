"""The merge plan: everything decided and checked before a byte is written.

Inputs are opened (headers only), checked against each other (architecture, tokenizer files,
manifests), the experts of the output and the averaging weights are resolved, the router data is
located, and the output directory is checked. Any fault is one BtxError naming the input.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from btx import families
from btx.choices import GRANULARITIES, ROUTER_INITS, WEIGHT_DTYPES
from btx.data.shards import load_shard
from btx.errors import BtxError
from btx.io.hashing import sha256_file
from btx.io.layout import CONFIG_NAME, TOKENIZER_FILES
from btx.io.manifest import DONE_NAME, producer_manifest
from btx.io.reader import CheckpointReader
from btx.mix.options import (
    MAY_DIFFER,
    NAME_RE,
    SEED,
    MergeOptions,
    check_shared_numbers,
    config_key,
)
from btx.mix.router_data import (
    check_prompts,
    check_shard,
    prompt_sets,
    run_dir_val_shard,
)
from btx.mix.router_fit import FIT_INITS
from btx.model.config import ModelConfig
from btx.units import parse_size

DTYPES = {name: getattr(torch, name) for name in WEIGHT_DTYPES}  # what a merge or an MoE edit may write
# Tokenizer files whose contents must agree across inputs: everything the checkpoint carries for
# its tokenizer and chat template (generation_config.json may differ).
_TOKENIZER_IDENTITY = tuple(f for f in TOKENIZER_FILES if f != "generation_config.json")


@dataclass
class MergeInput:
    name: str  # a domain name, or "seed"
    path: Path
    reader: CheckpointReader
    manifest: dict | None
    recorded_hashes: dict[str, str] | None  # sha256 of its files, from its DONE.json

    @property
    def cfg(self) -> ModelConfig:
        return self.reader.cfg


@dataclass
class MergeExpert:
    name: str
    domain: str | None  # whose data its centroid row comes from ("seed": all domains; None: blend)
    pieces: list[tuple[int, int, int]]  # (FFN source index, f0, f1): rows of gate/up, columns of down
    down_scale: float
    group: int  # index of its router row before expansion (split chunks share their FFN's row)


@dataclass
class MergePlan:
    out: Path
    options: MergeOptions
    seed: MergeInput
    experts_in: list[MergeInput]  # the domain experts, in order
    ffn_sources: list[MergeInput]  # the FFNs that become experts (upcycling: the seed N times)
    averaged: list[tuple[MergeInput, float]]  # sources of every other tensor, normalised nonzero weights
    weights: dict[str, float]
    out_cfg: ModelConfig
    dtype: torch.dtype
    experts: list[MergeExpert]
    groups: list[MergeExpert]  # one representative expert per router row group
    shard_size: int
    force: bool
    centroid_shards: dict[str, Any] = field(default_factory=dict)  # domain -> btx.data.shards.Shard (centroid, ridge)
    prompt_sets: list = field(default_factory=list)  # hidden: btx.mix.router_fit.TokenSet per prompt list
    recipe_hash: str | None = None

    @property
    def kind(self) -> str:
        return "average" if self.options.average_all else "upcycle" if self.options.upcycle else "moe"

    @property
    def inputs(self) -> list[MergeInput]:
        return [*self.experts_in, self.seed]

    @property
    def tokenizer_from(self) -> Path | None:
        """The first input with tokenizer files (experts may leave them out: they are the seed's)."""
        return next(
            (i.path for i in (self.seed, *self.experts_in) if any((i.path / f).is_file() for f in TOKENIZER_FILES)),
            None,
        )

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
    check_shared_numbers(o, "merge")
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
        raise _fail(
            f"blend experts mix every domain, so router_init {o.router_init} does not apply; use random or zeros"
        )
    if o.router_init in FIT_INITS and o.upcycle:
        raise _fail(f"router_init {o.router_init} needs domain experts; upcycled experts are all the seed")
    _check_prompts(o, [*expert_names, *([SEED] if o.keep_seed else [])])
    for name in expert_names:
        if not NAME_RE.match(name):
            raise _fail(f"expert name {name!r}: use letters, digits, '_', '-', '.'")
        if name == SEED:
            raise _fail("'seed' names the seed; give the expert another name")
    dupes = sorted({n for n in expert_names if expert_names.count(n) > 1})
    if dupes:
        raise _fail(f"expert name(s) given twice: {', '.join(dupes)}")
    try:
        parse_size(o.shard_size)
    except BtxError as e:
        raise _fail(str(e)) from None


def _check_prompts(o: MergeOptions, experts: list[str]) -> None:
    check_prompts(o, experts, "this merge", _fail)
    if o.router_init == "hidden" and not o.prompts:
        raise _fail(
            "router_init hidden needs prompts: give each expert positive prompts "
            "(recipe merge.prompts {expert: [text, ...]}, or --prompt EXPERT=TEXT)"
        )


def _manifest_of(path: Path) -> tuple[dict | None, str]:
    """The DONE.json describing checkpoint `path`, and the prefix its "outputs" keys carry."""
    return producer_manifest(path)


def _recorded_hashes(manifest: dict | None, prefix: str) -> dict[str, str] | None:
    outputs = (manifest or {}).get("outputs")
    if not isinstance(outputs, dict):
        return None
    return {k[len(prefix) :]: v for k, v in outputs.items() if isinstance(k, str) and k.startswith(prefix)}


def _looks_like_btx_job(path: Path) -> bool:
    return path.name == "final" and any((path.parent / p).exists() for p in ("ckpt", "metrics.jsonl", "train.log"))


def _open_input(name: str, path: str | os.PathLike, *, need_manifest: bool, allow_no_manifest: bool) -> MergeInput:
    path = Path(path)
    if not (path / CONFIG_NAME).is_file() and (path / "final" / CONFIG_NAME).is_file():
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
    reader = CheckpointReader(path)  # validates config, index, headers, names and shapes
    if reader.cfg.is_moe:
        reader.close()
        raise BtxError(
            f"{path}: is an MoE ({reader.hf_config.get('model_type')}, {reader.cfg.n_experts} experts); merge takes "
            "dense checkpoints (to add experts to a finished MoE, use btx merge --into)"
        )
    return MergeInput(name, path, reader, manifest, _recorded_hashes(manifest, prefix))


def _check_same_architecture(seed: MergeInput, other: MergeInput) -> None:
    mine, theirs = dataclasses.asdict(seed.cfg), dataclasses.asdict(other.cfg)
    for key in mine:
        if key not in MAY_DIFFER and mine[key] != theirs[key]:
            name, value, seeds = config_key(key, other.reader.hf_config, seed.reader.hf_config, theirs[key], mine[key])
            raise BtxError(
                f"{other.path / CONFIG_NAME}: {name} is {value!r} but the seed ({seed.path}) has "
                f"{seeds!r}; experts must keep the seed's architecture"
            )
    check_same_tokenizer(seed.path, other.path)


def check_same_tokenizer(seed_dir: Path, other_dir: Path) -> None:
    """An expert's tokenizer files and chat template are the seed's, byte for byte. An expert
    without them is fine (the merge carries the seed's); one with a file the seed lacks is not."""
    for file in _TOKENIZER_IDENTITY:
        a, b = seed_dir / file, other_dir / file
        if b.is_file() and not a.is_file():
            raise BtxError(
                f"{b}: the seed ({seed_dir}) has no {file}; experts must share the seed's tokenizer and chat template"
            )
        if a.is_file() and b.is_file() and sha256_file(a) != sha256_file(b):
            raise BtxError(
                f"{b}: differs from the seed's {file} ({a}); experts must share the seed's tokenizer and chat template"
            )


def _resolve_weights(o: MergeOptions, sources: list[MergeInput]) -> dict[str, float]:
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
                    '(the "tokens" field of its DONE.json); give explicit weights instead'
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


def _plan_experts(o: MergeOptions, ffn_sources: list[MergeInput], ffn_dim: int) -> tuple[list[MergeExpert], int]:
    """The experts (which FFN rows/columns each is made of) and the output FFN width."""
    n = len(ffn_sources)
    domain = lambda s: s.name if not o.upcycle else SEED  # noqa: E731
    if o.granularity == "expert":
        experts = [MergeExpert(s.name, domain(s), [(i, 0, ffn_dim)], 1.0, i) for i, s in enumerate(ffn_sources)]
        return experts, ffn_dim
    c = o.chunks if o.chunks is not None else n
    if ffn_dim % c:
        raise _fail(f"chunks {c} must divide the FFN width (intermediate_size {ffn_dim})")
    f = ffn_dim // c
    if o.granularity == "split":
        experts = [
            MergeExpert(f"{s.name}.{k}", domain(s), [(i, k * f, (k + 1) * f)], float(c), i)
            for i, s in enumerate(ffn_sources)
            for k in range(c)
        ]
        return experts, f
    experts = [  # blend
        MergeExpert(f"blend.{k}", None, [(i, k * f, (k + 1) * f) for i in range(n)], c / n, k) for k in range(c)
    ]
    return experts, n * f


def check_output(out: Path, inputs: list[Path], force: bool) -> None:
    resolved = out.resolve()
    for p in inputs:
        q = p.resolve()
        if resolved == q or q.is_relative_to(resolved) or resolved.is_relative_to(q):
            raise BtxError(f"{out}: the output would overwrite or sit inside an input ({p}); choose another --out")
    if out.exists() and not force and (not out.is_dir() or any(out.iterdir())):
        what = "a finished merge" if (out / DONE_NAME).is_file() else "not empty"
        raise BtxError(f"{out}: already exists ({what}); pass --force to replace it")


def plan_merge(
    seed: str | os.PathLike,
    experts: dict[str, str | os.PathLike],
    out: str | os.PathLike,
    o: MergeOptions,
    *,
    router_data: dict[str, str | os.PathLike] | None,
    force: bool,
    allow_no_manifest: bool,
    seed_needs_manifest: bool,
) -> MergePlan:
    experts = dict(experts)
    _check_options(o, list(experts))
    out = Path(out)
    check_output(out, [Path(seed), *map(Path, experts.values())], force)

    opened: list[MergeInput] = []
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
                raise BtxError(f"{seed_in.path / CONFIG_NAME}: {why}; this seed cannot be merged into an MoE")
            out_cfg = dataclasses.replace(
                seed_in.cfg,
                n_experts=len(plan_experts),
                top_k=o.top_k,
                ffn_dim=ffn_out,
                router_mode="topk",
                norm_topk_prob=True,
                shared_expert_dim=0,
                expert_names=[e.name for e in plan_experts],
                extra={**seed_in.cfg.extra, "router_aux_loss_coef": o.router_aux_loss_coef},
            )
        groups = {e.group: e for e in plan_experts}
        plan = MergePlan(
            out=out, options=o, seed=seed_in, experts_in=experts_in, ffn_sources=ffn_sources,
            averaged=averaged, weights=weights, out_cfg=out_cfg, dtype=dtype, experts=plan_experts,
            groups=[groups[g] for g in sorted(groups)], shard_size=parse_size(o.shard_size), force=force,
        )  # fmt: skip
        if o.router_init in ("centroid", "ridge") and not o.average_all:
            plan.centroid_shards = _centroid_shards(plan, router_data or {})
        if o.router_init == "hidden" and not o.average_all:
            plan.prompt_sets = prompt_sets(o.prompts, o.negative_prompts, seed_in.path, out_cfg)
        return plan
    except BaseException:
        for inp in opened:
            inp.reader.close()
        raise


def _centroid_shards(plan: MergePlan, given: dict[str, str | os.PathLike]) -> dict:
    expert_dirs = {e.name: e.path for e in plan.experts_in if any(x.domain == e.name for x in plan.experts)}
    domains = list(expert_dirs)
    unknown = sorted(set(given) - set(domains))
    if unknown:
        raise _fail(f"router data for {', '.join(unknown)}: not an expert of this merge ({', '.join(domains)})")
    shards = {}
    for d in domains:
        path = given.get(d)
        if path is None:
            guess = run_dir_val_shard(expert_dirs[d], d)
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
