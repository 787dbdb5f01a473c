"""Grow or shrink a finished MoE: add domain experts trained from the same seed, or remove experts.

    btx merge --into MOE --add-expert NAME=DIR [--add-expert ...] --out DIR [--shared keep|average]
    btx merge --into MOE --remove-expert NAME [--remove-expert ...] --out DIR

`MOE` is any MoE btx reads, in any family's form: a btx merge or finetune, or one made by another
tool (mergekit's Mixtral, say). The output is the same form with the experts edited; everything
else is carried byte for byte.

Adding an expert
- Its dense FFN becomes one more expert in every layer (appended after the existing ones), copied
  file to file.
- Its router row in every layer: `random` (normal, with the standard deviation of that layer's
  existing rows, so the new expert starts on their scale; reproducible from `router_seed`) or
  `zeros`. The existing rows are kept.
- The shared (non-FFN) weights: `keep` (default) keeps the MoE's, so nothing the MoE learned is
  disturbed; `average` moves them towards the new experts' by `shared_weight` (default: each new
  expert weighs as much as each expert already there, `n_new / (E + n_new)`),
  `x <- (1 - w) x_moe + w mean(x_new)`. An expert trained with the shared layers frozen
  (`train.trainable: ffn`) has exactly the seed's shared weights; added with `keep` to an MoE whose
  experts were all trained that way, it computes exactly what it computed alone when routed to.
- It must come from the MoE's seed: same architecture and tokenizer files, and either a DONE.json
  lineage that leads to the MoE's seed, or shared weights close to the MoE's (relative distance
  below `MAX_SHARED_DISTANCE`; experts branched from one seed differ by a few percent, unrelated
  models by more than 100%). `allow_foreign` adds such an expert anyway.

Removing an expert (FlexOlmo's opt-out): its FFN and its router row go, everywhere; top_k is
lowered if fewer experts than k remain. Removing an expert that was just added gives back the
original checkpoint byte for byte (DONE.json aside, which records the lineage).

Refused with one line, before anything is written: a dense or unknown `MOE`, an expert name
that exists already (or is given twice), an expert from another seed, removing every expert, and
an MoE whose router btx cannot extend (a `split` or `blend` merge, whose experts share router
rows or belong to no domain).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from btx import hf
from btx.errors import BtxError
from btx.manifest import (atomic_dir, disk_errors, ensure_free_space, fsync_tree, input_identity, output_lock, read_done,
                          relative_identities, write_done)
from btx.merge import DTYPES, _NAME_RE, _check_same_tokenizer, _Progress
from btx.model import ModelConfig

__all__ = ["EditOptions", "edit_command", "edit_moe", "moe_expert_names"]

GROW_INITS = ("random", "zeros")
SHARED_POLICIES = ("keep", "average")
MAX_SHARED_DISTANCE = 0.5  # relative L2 distance of shared weights above which an expert is foreign
_CHUNK_BYTES = 32 << 20
# ModelConfig fields that describe the MoE, not the architecture a dense expert must share with it.
_MOE_FIELDS = {"n_experts", "top_k", "router_mode", "norm_topk_prob", "shared_expert_dim", "capacity_factor", "moe_form",
               "gumbel_rate", "first_layer_soft", "expert_names", "extra"}


@dataclass
class EditOptions:
    router_init: str = "random"  # the new experts' router rows: random | zeros
    router_std: float | None = None  # random: None = each layer's existing rows' standard deviation
    router_seed: int = 0
    shared: str = "keep"  # keep | average
    shared_weight: float | None = None  # average: weight of the new experts' shared weights
    top_k: int | None = None  # None: the MoE's (lowered when fewer experts remain)
    dtype: str | None = None  # None: the MoE's
    shard_size: int | str = "5GB"


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
class _New:
    name: str
    path: Path
    reader: hf.CheckpointReader


@dataclass
class _Edit:
    moe: hf.CheckpointReader
    names: list[str]  # the MoE's experts
    keep: list[int]  # indices of the MoE's experts that stay, in order
    new: list[_New]
    out_cfg: ModelConfig
    dtype: torch.dtype
    options: EditOptions
    shared_weight: float


def _fail(message: str) -> BtxError:
    return BtxError(f"merge --into: {message}")


def _check_extendable(path: Path, reader: hf.CheckpointReader) -> None:
    done = read_done(path) or {}
    options = done.get("options") if isinstance(done.get("options"), dict) else {}
    granularity = options.get("granularity", "expert")
    if granularity != "expert":
        raise BtxError(f"{path}: a {granularity} merge (its experts are FFN chunks that share router rows or "
                       "belong to no domain); btx can only add or remove whole experts of an expert-granularity MoE")


def _check_compatible(moe: hf.CheckpointReader, new: _New) -> None:
    a, b = dataclasses.asdict(moe.cfg), dataclasses.asdict(new.reader.cfg)
    if new.reader.cfg.is_moe:
        raise BtxError(f"{new.path}: is an MoE itself; --add-expert takes a dense expert trained from the MoE's seed")
    for key, mine in a.items():
        if key in _MOE_FIELDS:
            continue
        if b[key] != mine:
            what = "intermediate_size (its FFN width) must equal the MoE's expert width" if key == "ffn_dim" else \
                "experts must keep the seed's architecture"
            raise BtxError(f"{new.path / hf.CONFIG_NAME}: {key} is {b[key]!r} but the MoE ({moe.path}) has {mine!r}; {what}")
    if new.reader.cfg.mlp_bias:
        raise BtxError(f"{new.path}: its FFN has biases, which MoE experts do not have")
    _check_same_tokenizer(moe.path, new.path)


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


def _relative_distance(moe: hf.CheckpointReader, new: hf.CheckpointReader) -> float:
    """||x_new - x_moe|| / ||x_moe|| over the embedding and every layer's attention weights."""
    num = den = 0.0
    for name in moe.btx_names():
        if ".ffn." in name or not (name == "embed.weight" or ".attn.w" in name):
            continue
        a, b = moe.get_btx(name, torch.float32), new.get_btx(name, torch.float32)
        num += float((b - a).pow(2).sum())
        den += float(a.pow(2).sum())
    return math.sqrt(num / max(den, 1e-30))


def _check_ancestry(moe: hf.CheckpointReader, new: _New, allow_foreign: bool) -> None:
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


def _plan(into: Path, add: dict[str, Path], remove: list[str], out: Path, o: EditOptions, *, force: bool,
          allow_foreign: bool) -> _Edit:
    if not add and not remove:
        raise _fail("nothing to do: give --add-expert NAME=DIR or --remove-expert NAME")
    if o.router_init not in GROW_INITS:
        raise _fail(f"router_init {o.router_init!r}: expected one of {', '.join(GROW_INITS)}")
    if o.shared not in SHARED_POLICIES:
        raise _fail(f"shared {o.shared!r}: expected keep or average")
    if o.dtype is not None and o.dtype not in DTYPES:
        raise _fail(f"dtype {o.dtype!r}: expected one of {', '.join(DTYPES)}")
    if o.shared_weight is not None and not (0.0 <= o.shared_weight <= 1.0):
        raise _fail(f"shared_weight must be in [0, 1], got {o.shared_weight!r}")
    if o.router_std is not None and not (o.router_std > 0 and math.isfinite(o.router_std)):
        raise _fail(f"router_std must be a positive number, got {o.router_std!r}")
    from btx.merge import _check_output

    _check_output(out, [into, *add.values()], force)
    moe = hf.CheckpointReader(into)
    opened = [moe]
    try:
        if not moe.cfg.is_moe:
            raise BtxError(f"{into}: a dense checkpoint; --into takes an MoE (to merge dense experts, use btx merge --seed)")
        _check_extendable(into, moe)
        names = moe_expert_names(into, moe.cfg)
        unknown = [n for n in remove if n not in names]
        if unknown:
            raise _fail(f"--remove-expert {', '.join(unknown)}: not an expert of {into} (its experts: {', '.join(names)})")
        if len(set(remove)) != len(remove):
            raise _fail("--remove-expert: an expert given twice")
        keep = [e for e, n in enumerate(names) if n not in remove]
        new: list[_New] = []
        for name, path in add.items():
            if not _NAME_RE.match(name):
                raise _fail(f"expert name {name!r}: use letters, digits, '_', '-', '.'")
            if name in names and name not in remove:
                raise _fail(f"--add-expert {name}: {into} has an expert of that name already")
            reader = hf.CheckpointReader(path)
            opened.append(reader)
            item = _New(name, Path(path), reader)
            _check_compatible(moe, item)
            _check_ancestry(moe, item, allow_foreign)
            new.append(item)
        n_out = len(keep) + len(new)
        if n_out == 0:
            raise _fail(f"removing {', '.join(remove)} would leave {into} with no expert")
        top_k = min(o.top_k or moe.cfg.top_k, n_out)
        if o.top_k is not None and o.top_k > n_out:
            raise _fail(f"top_k {o.top_k} is more than the {n_out} experts left")
        out_cfg = dataclasses.replace(
            moe.cfg, n_experts=n_out, top_k=top_k, expert_names=[names[e] for e in keep] + [n.name for n in new]
        )
        weight = o.shared_weight if o.shared_weight is not None else len(new) / max(n_out, 1)
        dtype = DTYPES[o.dtype] if o.dtype is not None else moe.dtype
        return _Edit(moe, names, keep, new, out_cfg, dtype, o, weight if new and o.shared == "average" else 0.0)
    except BaseException:
        for r in opened:
            r.close()
        raise


class _Producer:
    """Each output tensor, from the MoE (kept experts, shared weights, router rows) and the new experts."""

    def __init__(self, edit: _Edit):
        self.edit = edit

    def _stored(self, reader: hf.CheckpointReader, btx_name: str, expert: int | None) -> hf.FileRange | None:
        """The bytes of one stored tensor (expert `expert` of a stacked one), when they are the output
        tensor unchanged: one tensor per expert, or an expert's rows of a stacked tensor."""
        src = reader.plan[btx_name]
        if src.rule.layout == "expert":
            name, rows = src.hf_names[expert], None
        elif src.rule.layout == "same":
            name = src.hf_names[0]
            rows = (expert, expert + 1) if expert is not None else None
        else:
            return None  # half of a fused gate/up tensor: computed from it instead
        if reader.info(name).dtype != self.edit.dtype:
            return None
        return reader.file_range(name, rows)

    def expert(self, btx_name: str, e: int) -> torch.Tensor | hf.FileRange:
        edit = self.edit
        if e < len(edit.keep):
            old = edit.keep[e]
            return self._stored(edit.moe, btx_name, old) or edit.moe.get_btx(btx_name)[old].to(edit.dtype)
        reader = edit.new[e - len(edit.keep)].reader
        dense = f"{btx_name}.weight"
        return self._stored(reader, dense, None) or reader.get_btx(dense).to(edit.dtype)

    def router(self, btx_name: str, layer: int) -> torch.Tensor:
        edit, o = self.edit, self.edit.options
        old = edit.moe.get_btx(btx_name, torch.float32)
        rows = [old[edit.keep]]
        if edit.new:
            n, d = len(edit.new), old.shape[1]
            if o.router_init == "zeros":
                rows.append(torch.zeros(n, d))
            else:
                std = o.router_std if o.router_std is not None else float(old.std()) or 0.02
                key = hashlib.sha256(f"btx-grow-router:{o.router_seed}:{layer}".encode()).digest()
                gen = torch.Generator().manual_seed(int.from_bytes(key[:8], "little") >> 1)
                rows.append(torch.randn(n, d, generator=gen) * std)
        stored = edit.moe.info(edit.moe.plan[btx_name].hf_names[0]).dtype
        # Kept rows keep their stored bytes (the cast back from fp32 is exact).
        return torch.cat(rows).to(stored).to(edit.dtype)

    def shared(self, btx_name: str) -> torch.Tensor | hf.FileRange:
        edit = self.edit
        if edit.shared_weight == 0.0:
            return self._stored(edit.moe, btx_name, None) or edit.moe.get_btx(btx_name).to(edit.dtype)
        mean = edit.moe.get_btx(btx_name, torch.float32)
        new = torch.stack([n.reader.get_btx(btx_name, torch.float32) for n in edit.new]).mean(0)
        return mean.lerp_(new, edit.shared_weight).to(edit.dtype)

    def specs(self) -> list[hf.TensorSpec]:
        dtype = self.edit.dtype

        def piece(name: str, e: int | None):
            if name.endswith(".ffn.router.weight"):
                return self.router(name, int(name.split(".")[1]))
            return self.expert(name, e) if e is not None else self.shared(name)

        return [hf.TensorSpec(t.name, t.shape, dtype, lambda t=t: hf.build_hf_tensor(t, piece, dtype))
                for t in hf.hf_layout(self.edit.out_cfg)]


def edit_moe(
    into: str | os.PathLike,
    out: str | os.PathLike,
    *,
    add: dict[str, str | os.PathLike] | None = None,
    remove: list[str] | None = None,
    options: EditOptions | None = None,
    force: bool = False,
    allow_foreign: bool = False,
    progress: bool = True,
    console=None,
) -> dict:
    """Add experts to (`add`: {name: dense expert dir}) and/or remove experts from (`remove`) the MoE
    at `into`, writing the result to `out`. Returns the DONE.json written into `out`."""
    started = time.monotonic()
    into, out, o = Path(into), Path(out), options or EditOptions()
    with output_lock(out, "this MoE output"):  # the exists / --force decision and the rename under one lock
        edit = _plan(into, {k: Path(v) for k, v in (add or {}).items()}, list(remove or []), out, o, force=force,
                     allow_foreign=allow_foreign)
        try:
            specs = _Producer(edit).specs()
            total = sum(math.prod(s.shape) * s.dtype.itemsize for s in specs)
            ensure_free_space(out.parent, total, f"the edited MoE {out}")
            with disk_errors(out.parent, total, f"the edited MoE {out}"):
                return _write(edit, specs, total, into, out, o, remove or [], force, progress, console, started)
        finally:
            for r in (edit.moe, *(n.reader for n in edit.new)):
                r.close()


def _write(edit: _Edit, specs, total: int, into: Path, out: Path, o: EditOptions, remove: list[str], force: bool,
           progress: bool, console, started: float) -> dict:
    # What this edit reads, checked against what its producers recorded (btx.manifest.input_identity).
    identities = {"moe": input_identity(into), **{n.name: input_identity(n.path) for n in edit.new}}
    with atomic_dir(out, force=force) as tmp, _Progress(progress, "edit MoE", total, console=console) as bar:
        outputs = hf.write_checkpoint(tmp, edit.out_cfg, specs, shard_size=hf.parse_size(o.shard_size),
                                      tokenizer_from=into, atomic=False, on_tensor=lambda name, n: bar.advance(n, name))
        fsync_tree(tmp)
        moe_done = read_done(into) or {}
        added = [n.name for n in edit.new]
        manifest = {
            "stage": "grow",
            "kind": "moe",
            "inputs": {"moe": {"path": str(into.resolve()), "experts": edit.names},
                       **{n.name: {"path": str(n.path.resolve())} for n in edit.new}},
            "input_identities": relative_identities(identities, out),
            "added": added,
            "removed": list(remove),
            "experts": edit.out_cfg.expert_names,
            "n_experts": edit.out_cfg.n_experts,
            "top_k": edit.out_cfg.top_k,
            "options": dataclasses.asdict(o) | {"shared_weight": edit.shared_weight},
            # the MoE's own history, then this step
            "lineage": [*(moe_done.get("lineage") or [{"stage": moe_done.get("stage"), "path": str(into.resolve()),
                                                       "experts": edit.names}]),
                        {"stage": "grow", "added": added, "removed": list(remove)}],
            "outputs": outputs,
            "bytes": sum((tmp / f).stat().st_size for f in outputs),
            "seconds": round(time.monotonic() - started, 3),
        }
        write_done(tmp, manifest)
    return manifest


def edit_command(args) -> int:
    """`btx merge --into MOE (--add-expert NAME=DIR | --remove-expert NAME)... --out DIR`."""
    from btx.merge import _pairs

    if not args.out:
        raise BtxError("merge --into: give --out DIR for the edited MoE")
    options = EditOptions(
        router_init=args.router_init or "random", router_std=args.router_std, router_seed=args.router_seed or 0,
        shared=args.shared or "keep", shared_weight=args.shared_weight, top_k=args.top_k, dtype=args.dtype,
        shard_size=args.shard_size or "5GB",
    )
    manifest = edit_moe(args.into, args.out, add=_pairs(args.add_expert, "--add-expert"), remove=args.remove_expert,
                        options=options, force=args.force, allow_foreign=args.allow_foreign, progress=not args.quiet)
    from rich.console import Console

    Console().print(
        f"merge --into: {manifest['n_experts']} experts ({', '.join(manifest['experts'])}), top-{manifest['top_k']} "
        f"-> {args.out}: {manifest['bytes'] / 1e9:.2f} GB in {manifest['seconds']:.1f} s"
    )
    return 0

