"""The grow plan: everything a grow (or shrink) of a finished MoE decides and checks before a byte
is written.

The MoE and the new experts are opened (headers only) and checked: the MoE is an MoE btx can
extend (expert granularity), each new expert is dense, has the MoE's architecture and tokenizer
files and comes from the MoE's seed (a DONE.json lineage, or shared weights close to the MoE's);
the names add up; the router data or prompts of a fitted init are found and checked. The output
keeps the MoE's kept experts in order, then the new ones. Any fault is one line, as a BtxError.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from btx.choices import ROUTER_INITS, SHARED_POLICIES
from btx.data.shards import load_shard
from btx.errors import BtxError
from btx.io.layout import CONFIG_NAME
from btx.io.manifest import identity, input_identity, read_done
from btx.io.reader import CheckpointReader
from btx.mix.merge_plan import DTYPES, check_output, check_same_tokenizer
from btx.mix.options import (
    MAX_SHARED_DISTANCE,
    MOE_FIELDS,
    NAME_RE,
    SEED,
    EditOptions,
    check_shared_numbers,
    config_key,
)
from btx.mix.router_data import (
    check_prompts,
    check_shard,
    prompt_sets,
    router_shard,
    run_dir_val_shard,
    shard_windows,
)
from btx.mix.router_fit import FIT_INITS, TokenSet
from btx.model.config import ModelConfig
from btx.units import parse_size


def moe_expert_names(path: Path, cfg: ModelConfig) -> list[str]:
    """The experts' names: config.json's btx.experts, else the MoE's (or its merge's) DONE.json,
    else expert0, expert1, ..."""
    if cfg.expert_names is not None:
        return list(cfg.expert_names)
    done = read_done(path) or {}
    for manifest in (done, read_done(Path(str((done.get("inputs") or {}).get("merged", "")))) or {}):
        names = manifest.get("experts") if isinstance(manifest, dict) else None
        if isinstance(names, list) and len(names) == cfg.n_experts and len(set(names)) == len(names):
            return [str(n) for n in names]
    return [f"expert{e}" for e in range(cfg.n_experts)]


@dataclass
class AddedExpert:
    name: str
    path: Path
    reader: CheckpointReader


@dataclass
class GrowPlan:
    moe: CheckpointReader
    names: list[str]  # the MoE's experts
    keep: list[int]  # indices of the MoE's experts that stay, in order
    new: list[AddedExpert]
    removed: list[str]
    out: Path
    out_cfg: ModelConfig
    dtype: torch.dtype
    options: EditOptions
    shared_weight: float
    shard_size: int
    force: bool
    sets: list[TokenSet] = dataclasses.field(default_factory=list)  # the fitted inits' token sets
    set_paths: dict = dataclasses.field(default_factory=dict)  # centroid, ridge: expert -> its validation shard
    identities: dict = dataclasses.field(default_factory=dict)  # what the grow reads (btx.io.manifest.identity)

    @property
    def tokenizer_from(self) -> Path:
        return self.moe.path

    def close(self) -> None:
        for r in (self.moe, *(n.reader for n in self.new)):
            r.close()


def _fail(message: str) -> BtxError:
    return BtxError(f"merge --into: {message}")


def _check_extendable(path: Path, reader: CheckpointReader) -> None:
    done = read_done(path) or {}
    options = done.get("options") if isinstance(done.get("options"), dict) else {}
    granularity = options.get("granularity", "expert")
    if granularity != "expert":
        raise BtxError(
            f"{path}: a {granularity} merge (its experts are FFN chunks that share router rows or "
            "belong to no domain); btx can only add or remove whole experts of an expert-granularity MoE"
        )


def _check_compatible(moe: CheckpointReader, new: AddedExpert) -> None:
    a, b = dataclasses.asdict(moe.cfg), dataclasses.asdict(new.reader.cfg)
    if new.reader.cfg.is_moe:
        raise BtxError(f"{new.path}: is an MoE itself; --add-expert takes a dense expert trained from the MoE's seed")
    for key, mine in a.items():
        if key in MOE_FIELDS:
            continue
        if b[key] != mine:
            what = (
                "an added expert's FFN width must equal the MoE's expert width"
                if key == "ffn_dim"
                else "experts must keep the seed's architecture"
            )
            name, theirs, ours = config_key(key, new.reader.hf_config, moe.hf_config, b[key], mine)
            raise BtxError(
                f"{new.path / CONFIG_NAME}: {name} is {theirs!r} but the MoE ({moe.path}) has {ours!r}; {what}"
            )
    if new.reader.cfg.mlp_bias:
        raise BtxError(f"{new.path}: its FFN has biases, which MoE experts do not have")
    check_same_tokenizer(moe.path, new.path)


def _lineage_seeds(path: Path, depth: int = 4) -> set[str]:
    """Resolved paths of the checkpoints a btx output descends from, through DONE.json records."""
    out: set[str] = set()
    frontier = [path]
    for _ in range(depth):
        nxt = []
        for p in frontier:
            done = read_done(p) or read_done(p.parent) or {}
            inputs = done.get("inputs") if isinstance(done.get("inputs"), dict) else {}
            for value in inputs.values():
                where = value.get("path") if isinstance(value, dict) else value
                if isinstance(where, str) and where:
                    q = Path(where).resolve()
                    if str(q) not in out:
                        out.add(str(q))
                        nxt.append(q)
        frontier = nxt
    return out


def _relative_distance(moe: CheckpointReader, new: CheckpointReader) -> float:
    """||x_new - x_moe|| / ||x_moe|| over the embedding and every layer's attention weights."""
    num = den = 0.0
    for name in moe.btx_names():
        if ".ffn." in name or not (name == "embed.weight" or ".attn.w" in name):
            continue
        a, b = moe.get_btx(name, torch.float32), new.get_btx(name, torch.float32)
        num += float((b - a).pow(2).sum())
        den += float(a.pow(2).sum())
    return math.sqrt(num / max(den, 1e-30))


def _check_ancestry(moe: CheckpointReader, new: AddedExpert, allow_foreign: bool) -> None:
    if allow_foreign:
        return
    shared = _lineage_seeds(moe.path) & _lineage_seeds(new.path)
    if shared:
        return  # both descend from a common checkpoint, on record
    distance = _relative_distance(moe, new.reader)
    if distance > MAX_SHARED_DISTANCE:
        raise BtxError(
            f"{new.path}: its shared (non-FFN) weights are {distance:.0%} away from the MoE's and no DONE.json "
            f"links it to the MoE's seed: it was not trained from that seed (pass --allow-foreign to add it anyway)"
        )


def _check_options(o: EditOptions, add: dict[str, Path], remove: list[str], router_data: dict[str, Path]) -> None:
    if not add and not remove:
        raise _fail("nothing to do: give --add-expert NAME=DIR or --remove-expert NAME")
    if o.router_init not in ROUTER_INITS:
        raise _fail(f"router_init {o.router_init!r}: expected one of {', '.join(ROUTER_INITS)}")
    if o.shared not in SHARED_POLICIES:
        raise _fail(f"shared {o.shared!r}: expected one of {', '.join(SHARED_POLICIES)}")
    if o.dtype is not None and o.dtype not in DTYPES:
        raise _fail(f"dtype {o.dtype!r}: expected one of {', '.join(DTYPES)}")
    if o.shared_weight is not None and not (0.0 <= o.shared_weight <= 1.0):
        raise _fail(f"shared_weight must be in [0, 1], got {o.shared_weight!r}")
    check_shared_numbers(o, "merge --into")
    if (o.prompts or o.negative_prompts) and o.router_init != "hidden":
        raise _fail(f"prompts are for router_init hidden, not {o.router_init}")
    if router_data and o.router_init not in ("centroid", "ridge"):
        raise _fail(f"--router-data is for router_init centroid or ridge, not {o.router_init}")
    if o.router_init in FIT_INITS and not add:
        raise _fail(f"router_init {o.router_init} fits the rows of added experts; removing needs no router init")


def _open_moe(into: Path, remove: list[str]) -> tuple[CheckpointReader, list[str]]:
    """The MoE and its experts' names, checked: an MoE btx can extend, that has every expert to remove."""
    moe = CheckpointReader(into)
    try:
        if not moe.cfg.is_moe:
            raise BtxError(
                f"{into}: a dense checkpoint; --into takes an MoE (to merge dense experts, use btx merge --seed)"
            )
        _check_extendable(into, moe)
        names = moe_expert_names(into, moe.cfg)
        unknown = [n for n in remove if n not in names]
        if unknown:
            raise _fail(
                f"--remove-expert {', '.join(unknown)}: not an expert of {into} (its experts: {', '.join(names)})"
            )
        if len(set(remove)) != len(remove):
            raise _fail("--remove-expert: an expert given twice")
        return moe, names
    except BaseException:
        moe.close()
        raise


def _open_new(
    moe: CheckpointReader, names: list[str], remove: list[str], name: str, path: Path, allow_foreign: bool
) -> AddedExpert:
    """One expert to add, checked: a new name, and a dense model from the MoE's seed."""
    if not NAME_RE.match(name):
        raise _fail(f"expert name {name!r}: use letters, digits, '_', '-', '.'")
    if name in names and name not in remove:
        raise _fail(f"--add-expert {name}: {moe.path} has an expert of that name already")
    item = AddedExpert(name, Path(path), CheckpointReader(path))
    try:
        _check_compatible(moe, item)
        _check_ancestry(moe, item, allow_foreign)
        return item
    except BaseException:
        item.reader.close()
        raise


def plan_grow(
    into: Path,
    add: dict[str, Path],
    remove: list[str],
    out: Path,
    o: EditOptions,
    *,
    force: bool,
    allow_foreign: bool,
    router_data: dict[str, Path],
) -> GrowPlan:
    """Everything a grow decides, checked before anything is written; BtxError naming the fault."""
    _check_options(o, add, remove, router_data)
    check_output(out, [into, *add.values()], force)
    shard_size = parse_size(o.shard_size)
    moe, names = _open_moe(into, remove)
    new: list[AddedExpert] = []
    try:
        for name, path in add.items():
            new.append(_open_new(moe, names, remove, name, path, allow_foreign))
        keep = [e for e, n in enumerate(names) if n not in remove]
        n_out = len(keep) + len(new)
        if n_out == 0:
            raise _fail(f"removing {', '.join(remove)} would leave {into} with no expert")
        if o.top_k is not None and o.top_k > n_out:
            raise _fail(f"top_k {o.top_k} is more than the {n_out} experts left")
        out_cfg = dataclasses.replace(
            moe.cfg,
            n_experts=n_out,
            top_k=min(moe.cfg.top_k if o.top_k is None else o.top_k, n_out),
            expert_names=[names[e] for e in keep] + [n.name for n in new],
        )
        weight = o.shared_weight if o.shared_weight is not None else len(new) / max(n_out, 1)
        plan = GrowPlan(
            moe=moe, names=names, keep=keep, new=new, removed=list(remove), out=out, out_cfg=out_cfg,
            dtype=DTYPES[o.dtype] if o.dtype is not None else moe.dtype, options=o,
            shared_weight=weight if new and o.shared == "average" else 0.0, shard_size=shard_size, force=force,
        )  # fmt: skip
        if o.router_init == "hidden":
            plan.sets = _prompt_sets(plan)
        elif o.router_init in FIT_INITS:
            plan.sets, plan.set_paths = _shard_sets(plan, router_data)
        # Checked against what their producers recorded: a damaged input stops the grow here.
        plan.identities = {
            "moe": input_identity(into),
            **{n.name: input_identity(n.path) for n in new},
            **{f"router-data:{name}": identity(path) for name, path in plan.set_paths.items()},
        }
        return plan
    except BaseException:
        for r in (moe, *(n.reader for n in new)):
            r.close()
        raise


def _prompt_sets(plan: GrowPlan) -> list[TokenSet]:
    """hidden: the prompts of every expert that has some; each new expert needs its own, and
    something to contrast them with."""
    o, names = plan.options, list(plan.out_cfg.expert_names)
    check_prompts(o, names, "the output", _fail)
    for name in (n.name for n in plan.new):
        if name not in o.prompts:
            raise _fail(f"router_init hidden: give the new expert {name!r} prompts (--prompt {name}=TEXT)")
        if name not in o.negative_prompts and not [m for m in o.prompts if m != name]:
            raise _fail(
                f"router_init hidden: {name!r} needs negative prompts (--negative-prompt {name}=TEXT) "
                "or prompts of another expert to contrast with"
            )
    return prompt_sets(o.prompts, o.negative_prompts, plan.moe.path, plan.out_cfg)


def _shard_sets(plan: GrowPlan, given: dict[str, Path]) -> tuple[list[TokenSet], dict[str, Path]]:
    """centroid: windows of each new expert's validation shard; ridge: of every expert's."""
    o, cfg = plan.options, plan.out_cfg
    names, new = list(cfg.expert_names), [n.name for n in plan.new]
    needed = new if o.router_init == "centroid" else [n for n in names if n != SEED]
    unknown = sorted(set(given) - set(needed))
    if unknown:
        raise _fail(
            f"--router-data {', '.join(unknown)}: router_init {o.router_init} reads the data of "
            f"{', '.join(needed)} only"
        )
    sources = {n.name: n.path for n in plan.new}
    sets, paths = [], {}
    for name in needed:
        path = given.get(name)
        if path is None and name in sources:
            path = run_dir_val_shard(sources[name], name)
        elif path is None:
            path = _moe_run_val_shard(plan.moe.path, name)
        if path is None:
            raise _fail(
                f"router_init {o.router_init} needs validation tokens of expert {name!r}: pass "
                f"--router-data {name}=<run_dir>/data/{name}/val.bin"
            )
        path = router_shard(name, path)
        shard = load_shard(path)
        check_shard(shard, f"router_init {o.router_init} (expert {name!r})", cfg.vocab_size)
        sets.append(shard_windows(name, shard, o.router_tokens, cfg.max_seq_len))
        paths[name] = path
    return sets, paths


def _moe_run_val_shard(into: Path, name: str) -> Path | None:
    """<run_dir>/data/<name>/val.bin for an MoE that sits in a btx run directory (merged/, finetuned/, ...)."""
    candidate = into.resolve().parent / "data" / name / "val.bin"
    return candidate if candidate.with_suffix(".json").is_file() else None
