"""Grow or shrink a finished MoE: add domain experts trained from the same seed, or remove experts.

    btx merge --into MOE --add-expert NAME=DIR [--add-expert ...] --out DIR [--shared keep|average]
    btx merge --into MOE --remove-expert NAME [--remove-expert ...] --out DIR

`MOE` is any MoE btx reads, in any family's form: a btx merge or finetune, or one made by another
tool (mergekit's Mixtral, say). The output is the same form with the experts edited; everything
else is carried byte for byte.

Adding an expert
- Its dense FFN becomes one more expert in every layer (appended after the existing ones), copied
  file to file.
- Its router row in every layer, by any router init (btx/mix/router_fit.py for the three fitted ones):
  - `random`: normal, with the standard deviation of that layer's existing rows, so the new
    expert starts on their scale; reproducible from `router_seed`;
  - `zeros`;
  - `centroid`: the unit mean FFN input of its domain's validation tokens (`router_data`), scaled
    to the mean norm of the layer's existing rows;
  - `hidden`: the unit mean FFN input of its prompts minus that of its negative prompts (default:
    the prompts given for the other experts), scaled the same way;
  - `ridge`: DUME's closed form over every expert's validation tokens. Ridge refits *all* rows of
    every layer (a least-squares router is one solve over all experts; appending a row to a trained
    router would not be one), so it needs data for each expert; an expert named `seed` gets the
    mean of the domain rows, as in a merge.
  For the fitted inits, the hidden states come from the grown MoE itself, layer by layer: each
  layer's new rows are fitted on the states produced by the layers below as grown.
  Except with ridge, the existing rows are kept byte for byte.
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

from btx.choices import ROUTER_INITS, SHARED_POLICIES
from btx.errors import BtxError
from btx.io.atomic import atomic_dir, fsync_tree
from btx.io.disk import disk_errors, ensure_free_space
from btx.io.layout import CONFIG_NAME, FileRange, TensorSpec, build_hf_tensor, hf_layout
from btx.io.locks import output_lock
from btx.io.manifest import (
    identity,
    input_identity,
    read_done,
    relative_identities,
    write_done,
)
from btx.io.reader import CheckpointReader
from btx.io.writer import write_checkpoint
from btx.mix.merge_plan import DTYPES, _check_same_tokenizer
from btx.mix.mixer import _Progress
from btx.mix.options import (
    _MOE_FIELDS,
    _NAME_RE,
    MAX_SHARED_DISTANCE,
    SEED,
    EditOptions,
)
from btx.mix.router_fit import FIT_INITS
from btx.model.config import ModelConfig
from btx.recipe.settings import given, pairs
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
class _New:
    name: str
    path: Path
    reader: CheckpointReader


@dataclass
class _Edit:
    moe: CheckpointReader
    names: list[str]  # the MoE's experts
    keep: list[int]  # indices of the MoE's experts that stay, in order
    new: list[_New]
    out_cfg: ModelConfig
    dtype: torch.dtype
    options: EditOptions
    shared_weight: float
    sets: list = dataclasses.field(default_factory=list)  # fitted inits: btx.mix.router_fit.TokenSet
    set_paths: dict = dataclasses.field(default_factory=dict)  # centroid, ridge: expert -> its validation shard
    fitted: dict = dataclasses.field(default_factory=dict)  # layer -> every output row [E, D] fp32


def _fail(message: str) -> BtxError:
    return BtxError(f"merge --into: {message}")


def _check_extendable(path: Path, reader: CheckpointReader) -> None:
    done = read_done(path) or {}
    options = done.get("options") if isinstance(done.get("options"), dict) else {}
    granularity = options.get("granularity", "expert")
    if granularity != "expert":
        raise BtxError(f"{path}: a {granularity} merge (its experts are FFN chunks that share router rows or "
                       "belong to no domain); btx can only add or remove whole experts of an expert-granularity MoE")


def _check_compatible(moe: CheckpointReader, new: _New) -> None:
    a, b = dataclasses.asdict(moe.cfg), dataclasses.asdict(new.reader.cfg)
    if new.reader.cfg.is_moe:
        raise BtxError(f"{new.path}: is an MoE itself; --add-expert takes a dense expert trained from the MoE's seed")
    for key, mine in a.items():
        if key in _MOE_FIELDS:
            continue
        if b[key] != mine:
            what = "intermediate_size (its FFN width) must equal the MoE's expert width" if key == "ffn_dim" else \
                "experts must keep the seed's architecture"
            raise BtxError(f"{new.path / CONFIG_NAME}: {key} is {b[key]!r} but the MoE ({moe.path}) has {mine!r}; {what}")
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


def _check_ancestry(moe: CheckpointReader, new: _New, allow_foreign: bool) -> None:
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
          allow_foreign: bool, router_data: dict[str, Path]) -> _Edit:
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
    if o.router_std is not None and not (o.router_std > 0 and math.isfinite(o.router_std)):
        raise _fail(f"router_std must be a positive number, got {o.router_std!r}")
    if not all(getattr(o, k) > 0 and math.isfinite(getattr(o, k)) for k in ("ridge_lambda", "router_scale", "router_tokens")):
        raise _fail("ridge_lambda, router_scale and router_tokens must be positive numbers")
    if (o.prompts or o.negative_prompts) and o.router_init != "hidden":
        raise _fail(f"prompts are for router_init hidden, not {o.router_init}")
    if router_data and o.router_init not in ("centroid", "ridge"):
        raise _fail(f"--router-data is for router_init centroid or ridge, not {o.router_init}")
    if o.router_init in FIT_INITS and not add:
        raise _fail(f"router_init {o.router_init} fits the rows of added experts; removing needs no router init")
    from btx.mix.merge_plan import _check_output

    _check_output(out, [into, *add.values()], force)
    moe = CheckpointReader(into)
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
            reader = CheckpointReader(path)
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
        edit = _Edit(moe, names, keep, new, out_cfg, dtype, o, weight if new and o.shared == "average" else 0.0)
        edit.sets, edit.set_paths = _fit_sets(edit, into, router_data)
        return edit
    except BaseException:
        for r in opened:
            r.close()
        raise


def _fit_sets(edit: _Edit, into: Path, given: dict[str, Path]) -> tuple[list, dict[str, Path]]:
    """The token sets the fitted router inits read: validation shards (centroid: the new experts';
    ridge: every expert's) or prompts (hidden). Checked here, before anything is written."""
    from btx.mix.merge import _centroid_shard_path
    from btx.mix.merge_plan import _run_dir_val_shard
    from btx.mix.router_fit import check_shard, prompt_set, shard_windows

    o, cfg = edit.options, edit.out_cfg
    names, new = list(cfg.expert_names), [n.name for n in edit.new]
    if o.router_init not in FIT_INITS:
        return [], {}
    if o.router_init == "hidden":
        from btx.data.tokenizer import load_tokenizer

        for key in ("prompts", "negative_prompts"):
            for name, texts in getattr(o, key).items():
                if name not in names:
                    raise _fail(f"{key} of {name!r}: not an expert of the output ({', '.join(names)})")
                if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) and t for t in texts):
                    raise _fail(f"{key} of {name!r}: expected a list of non-empty strings")
        for name in new:
            if name not in o.prompts:
                raise _fail(f"router_init hidden: give the new expert {name!r} prompts (--prompt {name}=TEXT)")
            if name not in o.negative_prompts and not [m for m in o.prompts if m != name]:
                raise _fail(f"router_init hidden: {name!r} needs negative prompts (--negative-prompt {name}=TEXT) "
                            "or prompts of another expert to contrast with")
        try:
            tokenizer = load_tokenizer(into)
        except BtxError as e:
            raise BtxError(f"router_init hidden tokenizes the prompts with the checkpoint's tokenizer: {e}") from None
        sets = [prompt_set(f"{kind}:{name}", texts, tokenizer, cfg.max_seq_len, cfg.vocab_size)
                for kind, given_prompts in (("pos", o.prompts), ("neg", o.negative_prompts))
                for name, texts in given_prompts.items()]
        return sets, {}
    from btx.data.shards import load_shard

    needed = new if o.router_init == "centroid" else [n for n in names if n != SEED]
    unknown = sorted(set(given) - set(needed))
    if unknown:
        raise _fail(f"--router-data {', '.join(unknown)}: router_init {o.router_init} reads the data of "
                    f"{', '.join(needed)} only")
    sources = {n.name: n.path for n in edit.new}
    sets, paths = [], {}
    for name in needed:
        path = given.get(name)
        if path is None:
            path = _run_dir_val_shard(sources[name], name) if name in sources else _moe_run_val_shard(into, name)
        if path is None:
            raise _fail(f"router_init {o.router_init} needs validation tokens of expert {name!r}: pass "
                        f"--router-data {name}=<run_dir>/data/{name}/val.bin")
        path = _centroid_shard_path(name, path)
        shard = load_shard(path)
        check_shard(shard, f"router_init {o.router_init} (expert {name!r})", cfg.vocab_size)
        sets.append(shard_windows(name, shard, o.router_tokens, cfg.max_seq_len))
        paths[name] = path
    return sets, paths


def _moe_run_val_shard(into: Path, name: str) -> Path | None:
    """<run_dir>/data/<name>/val.bin for an MoE that sits in a btx run directory (merged/, finetuned/, ...)."""
    candidate = into.resolve().parent / "data" / name / "val.bin"
    return candidate if candidate.with_suffix(".json").is_file() else None


class _GrownWeights:
    """The grown MoE's layers for btx.mix.router_fit.walk (fp32), before its routers are known."""

    def __init__(self, edit: _Edit):
        self.edit, self.cfg = edit, edit.out_cfg

    def _shared(self, name: str) -> torch.Tensor:
        edit = self.edit
        x = edit.moe.get_btx(name, torch.float32)
        if edit.shared_weight:
            new = torch.stack([n.reader.get_btx(name, torch.float32) for n in edit.new]).mean(0)
            x = x.lerp_(new, edit.shared_weight)
        return x.to(edit.dtype).float()  # as it will be written

    def embed(self) -> torch.Tensor:
        return self._shared("embed.weight")

    def block(self, layer: int) -> dict[str, torch.Tensor]:
        p = f"layers.{layer}."
        return {k.removeprefix(p): self._shared(k) for k in self.edit.moe.btx_names()
                if k.startswith(p) and ".ffn." not in k}

    def experts(self, layer: int) -> dict[str, torch.Tensor]:
        edit, p = self.edit, f"layers.{layer}.ffn."
        out = {}
        for w in ("w1", "w3", "w2"):
            old = edit.moe.get_btx(p + w, torch.float32)[edit.keep]
            new = [n.reader.get_btx(f"{p}{w}.weight", torch.float32)[None] for n in edit.new]
            out[f"ffn.{w}"] = torch.cat([old, *new]).to(edit.dtype).float()
        for k in edit.moe.btx_names():  # a shared expert (Qwen2-MoE) stays as it is
            if k.startswith(p + "shared"):
                out[k.removeprefix(f"layers.{layer}.")] = edit.moe.get_btx(k, torch.float32)
        return out


def _fit_routers(edit: _Edit, progress: bool, console) -> None:
    """Fill edit.fitted with every layer's output router rows (btx.mix.router_fit.walk over the grown MoE)."""
    from btx.mix.router_fit import centroid_rows, hidden_rows, ridge_rows, walk

    o, names = edit.options, list(edit.out_cfg.expert_names)
    new = [n.name for n in edit.new]
    negative = [[f"neg:{n}"] if n in o.negative_prompts else [f"pos:{m}" for m in o.prompts if m != n] for n in new]

    def router_for_layer(layer: int, stats) -> torch.Tensor:
        name = f"layers.{layer}.ffn.router.weight"
        if o.router_init == "ridge":
            rows = ridge_rows(stats, [None if n == SEED else n for n in names], o.ridge_lambda)
        else:
            old = edit.moe.get_btx(name, torch.float32)[edit.keep]
            fresh = (centroid_rows(stats, new) if o.router_init == "centroid"
                     else hidden_rows(stats, [f"pos:{n}" for n in new], negative))
            scale = float(old.norm(dim=1).mean()) if len(old) else 1.0
            rows = torch.cat([old, fresh * scale])
        if o.router_scale != 1.0:
            rows = torch.cat([rows[: len(edit.keep)], rows[len(edit.keep):] * o.router_scale]) \
                if o.router_init != "ridge" else rows * o.router_scale
        edit.fitted[layer] = rows
        stored = edit.moe.info(edit.moe.plan[name].hf_names[0]).dtype
        return rows.to(stored).to(edit.dtype).float()  # routed as it will be written

    with _Progress(progress, f"{o.router_init} routers", edit.out_cfg.n_layers, bytes_=False, console=console) as bar:
        walk(_GrownWeights(edit), edit.sets, router_for_layer, need_gram=o.router_init == "ridge",
             device=o.router_device, on_layer=lambda i: bar.advance(1, f"layer {i}"))


class _Producer:
    """Each output tensor, from the MoE (kept experts, shared weights, router rows) and the new experts."""

    def __init__(self, edit: _Edit):
        self.edit = edit

    def _stored(self, reader: CheckpointReader, btx_name: str, expert: int | None) -> FileRange | None:
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

    def expert(self, btx_name: str, e: int) -> torch.Tensor | FileRange:
        edit = self.edit
        if e < len(edit.keep):
            old = edit.keep[e]
            return self._stored(edit.moe, btx_name, old) or edit.moe.get_btx(btx_name)[old].to(edit.dtype)
        reader = edit.new[e - len(edit.keep)].reader
        dense = f"{btx_name}.weight"
        return self._stored(reader, dense, None) or reader.get_btx(dense).to(edit.dtype)

    def router(self, btx_name: str, layer: int) -> torch.Tensor:
        edit, o = self.edit, self.edit.options
        stored = edit.moe.info(edit.moe.plan[btx_name].hf_names[0]).dtype
        if edit.fitted:
            return edit.fitted[layer].to(stored).to(edit.dtype)
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
        # Kept rows keep their stored bytes (the cast back from fp32 is exact).
        return torch.cat(rows).to(stored).to(edit.dtype)

    def shared(self, btx_name: str) -> torch.Tensor | FileRange:
        edit = self.edit
        if edit.shared_weight == 0.0:
            return self._stored(edit.moe, btx_name, None) or edit.moe.get_btx(btx_name).to(edit.dtype)
        mean = edit.moe.get_btx(btx_name, torch.float32)
        new = torch.stack([n.reader.get_btx(btx_name, torch.float32) for n in edit.new]).mean(0)
        return mean.lerp_(new, edit.shared_weight).to(edit.dtype)

    def specs(self) -> list[TensorSpec]:
        dtype = self.edit.dtype

        def piece(name: str, e: int | None):
            if name.endswith(".ffn.router.weight"):
                return self.router(name, int(name.split(".")[1]))
            return self.expert(name, e) if e is not None else self.shared(name)

        return [TensorSpec(t.name, t.shape, dtype, lambda t=t: build_hf_tensor(t, piece, dtype))
                for t in hf_layout(self.edit.out_cfg)]


def edit_moe(
    into: str | os.PathLike,
    out: str | os.PathLike,
    *,
    add: dict[str, str | os.PathLike] | None = None,
    remove: list[str] | None = None,
    options: EditOptions | None = None,
    force: bool = False,
    allow_foreign: bool = False,
    router_data: dict[str, str | os.PathLike] | None = None,
    progress: bool = True,
    console=None,
) -> dict:
    """Add experts to (`add`: {name: dense expert dir}) and/or remove experts from (`remove`) the MoE
    at `into`, writing the result to `out`. Returns the DONE.json written into `out`. `router_data`
    ({expert: validation shard or prepared domain dir}) feeds the centroid and ridge inits (default:
    the shard beside each expert in its btx run directory)."""
    started = time.monotonic()
    into, out, o = Path(into), Path(out), options or EditOptions()
    with output_lock(out, "this MoE output"):  # the exists / --force decision and the rename under one lock
        edit = _plan(into, {k: Path(v) for k, v in (add or {}).items()}, list(remove or []), out, o, force=force,
                     allow_foreign=allow_foreign, router_data={k: Path(v) for k, v in (router_data or {}).items()})
        try:
            if edit.sets:
                _fit_routers(edit, progress, console)
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
    # What this edit reads, checked against what its producers recorded (btx.io.manifest.input_identity).
    identities = {"moe": input_identity(into), **{n.name: input_identity(n.path) for n in edit.new},
                  **{f"router-data:{name}": identity(path) for name, path in edit.set_paths.items()}}
    with atomic_dir(out, force=force) as tmp, _Progress(progress, "edit MoE", total, console=console) as bar:
        outputs = write_checkpoint(tmp, edit.out_cfg, specs, shard_size=parse_size(o.shard_size),
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
            **({"router_tokens": {st.name: st.tokens for st in edit.sets}} if edit.sets else {}),
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
    if not args.out:
        raise BtxError("merge --into: give --out DIR for the edited MoE")
    manifest = edit_moe(args.into, args.out, add=pairs(args.add_expert, "--add-expert"), remove=args.remove_expert,
                        options=EditOptions(**given(args, EditOptions)), force=args.force,
                        allow_foreign=args.allow_foreign, router_data=pairs(args.router_data, "--router-data"),
                        progress=not args.quiet)
    from rich.console import Console

    Console().print(
        f"merge --into: {manifest['n_experts']} experts ({', '.join(manifest['experts'])}), top-{manifest['top_k']} "
        f"-> {args.out}: {manifest['bytes'] / 1e9:.2f} GB in {manifest['seconds']:.1f} s"
    )
    return 0
