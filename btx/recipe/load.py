"""Loading recipes: the experiment and domain YAML files, overrides, validation, effective settings.

An *experiment recipe* describes one BTX run (seed, domains, merge, finetune, eval, analyze); it
names one *domain recipe* per domain (data sources and training overrides for that expert).

    exp = load_experiment("recipes/demo/btx.yaml", ["merge.top_k=1", "train.steps=20"])
    exp.merge.top_k                    # sections are typed dataclasses, each a property of exp
    exp.run_dir, exp.paths.merged      # run_dir is an absolute Path; paths, its layout (RunDir)
    exp.domains["code"].train.lr       # per-domain effective training settings
    exp.domains["code"].sources        # resolved data sources (absolute paths, expanded files)
    recipe_hash(exp.merge)             # sha256 of the resolved YAML of what a stage depends on

Rules
- The schema is the dataclasses of btx/recipe/schema.py; OmegaConf.structured builds the typed config from them.
  To add a setting: add a field (with a default) to the right section and, if it has a range,
  a line in that section's `check`. Nothing else needs to change.
- Loading is strict: an unknown key (with a did-you-mean), a wrong type, a missing referenced file
  or a value out of range is a BtxError of one line, `<file>: <key>: <what was expected>`.
  No OmegaConf or YAML traceback escapes.
- Overrides are OmegaConf dotlists (`merge.top_k=1`, `finetune.mixture={code: 2, math: 1}`),
  applied after the file and checked the same way.
- Paths: input paths written in a recipe (seed.path, tokenizer, domains.*, data.sources) are
  relative to that recipe file's directory; paths given as command-line overrides are relative to
  the current directory. Both are stored absolute after loading. `run_dir` (an output) is relative
  to the current directory and defaults to `checkpoints/<experiment>`.
- Training settings: `train:` in the experiment recipe holds the defaults of every training job.
  `seed.train`, each domain recipe's `train:` and `finetune.train` name only the keys they change.
  A `train.<key>=...` given on the command line wins over all of them (it names what every job
  should use), unless the command line also names the more specific key (`finetune.train.<key>`).
"""

import dataclasses
import glob
import math
import os
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from btx.choices import GENERAL_DOMAIN
from btx.data.readers import HF_PREFIX
from btx.data.tokenizer import ByteTokenizer
from btx.errors import BtxError, first_line, missing_checkpoint
from btx.recipe.builtin import builtin_recipe_names, resolve_recipe
from btx.recipe.check import (
    GLOB_CHARS,
    RESERVED_DOMAIN_PREFIXES,
    RESERVED_DOMAINS,
    Checker,
    join_key,
    suggest,
)
from btx.recipe.domain_schema import DataSection, DomainRecipe
from btx.recipe.experiment import Domain, Experiment, Source, to_plain
from btx.recipe.schema import ExperimentRecipe, TrainSection
from btx.recipe.typecheck import describe, is_interpolation, rename_old_keys, typecheck
from btx.units import machine_memory, oversize


def _check_sizes(c: Checker, recipe: ExperimentRecipe, trains: Dict[str, TrainSection]) -> None:
    """The size guard (btx.units.oversize) on the recipe's numbers, before anything is built: the
    seed's fp32 weights, and one micro-batch's tokens and fp32 logits, must fit in this machine's
    memory (docs/RECIPES.md, Sizes)."""
    memory = machine_memory()
    vocab = recipe.model.vocab_size if recipe.model is not None else 0
    if recipe.model is not None:
        m = recipe.model
        head_dim = m.dim // m.n_heads
        per_layer = 2 * m.dim * m.n_heads * head_dim + 2 * m.dim * m.n_kv_heads * head_dim + 3 * m.dim * m.ffn_dim
        params = m.vocab_size * m.dim * (1 if m.tie_embeddings else 2) + m.n_layers * per_layer
        factors = {"vocab_size": m.vocab_size, "dim": m.dim, "n_layers": m.n_layers, "ffn_dim": m.ffn_dim}
        found = oversize(4 * params, memory, factors, "the seed's fp32 weights", "this machine's memory")
        if found is not None:
            c.fail(f"model.{found[0]}", found[1])
    batches = {key: (t.batch_size, t.seq_len) for key, t in trains.items()}
    batches["eval"] = (recipe.eval.batch_size, recipe.eval.seq_len or recipe.train.seq_len)
    for key, (batch_size, seq_len) in batches.items():
        need = batch_size * seq_len * (16 + 4 * vocab)  # input and target ids (int64), fp32 logits
        found = oversize(
            need, memory, {"batch_size": batch_size, "seq_len": seq_len}, "one batch", "this machine's memory"
        )
        if found is not None:
            c.fail(f"{key}.{found[0]}", found[1])


def load_experiment(
    path: str | os.PathLike, overrides: Optional[List[str]] = None, *, inputs_exist: bool = True
) -> Experiment:
    """Load, resolve and validate an experiment recipe and every domain recipe it names. `path` is
    a recipe file, or the name of a recipe btx ships (`demo`; see `btx recipes`). With
    `inputs_exist=False` (`btx plan`, before the seed and the data are on this machine) the
    tokenizer, seed.path and data sources need not exist; a missing source has no files."""
    path = resolve_recipe(path)
    overrides = list(overrides or [])
    label = _label(path, overrides)
    raw = _experiment_raw(path, ())
    override_dicts = _parse_overrides(overrides, ExperimentRecipe, str(path))
    for od in override_dicts:
        _resolve_paths(od, _EXPERIMENT_PATHS, Path.cwd())
        _deep_merge(raw, od)
    recipe: ExperimentRecipe = _build(ExperimentRecipe, raw, label, overrides)

    c = Checker(label, origins=_origins(overrides))
    c.name(recipe.experiment, "experiment")
    if recipe.run_dir is None:
        recipe.run_dir = str(Path("checkpoints") / recipe.experiment)
    if recipe.tokenizer != "byte" and inputs_exist:
        c.that(
            Path(recipe.tokenizer).exists(),
            "tokenizer",
            f"{recipe.tokenizer}: no such file or directory "
            "(expected 'byte', a tokenizer.json or a directory holding one)",
        )
    if recipe.seed.path is not None:
        c.that(
            recipe.model is None,
            "model",
            "give either seed.path (an existing checkpoint) or model (a seed trained from scratch), not both",
        )
        if inputs_exist and not Path(recipe.seed.path).is_dir():
            c.fail("seed.path", missing_checkpoint(recipe.seed.path, _written_path(recipe.seed.path, path.parent)))
    elif recipe.model is None:
        c.fail("seed", "give seed.path (an existing dense checkpoint) or a model section (a seed trained from scratch)")
    if recipe.model is not None:
        recipe.model.check(c.at("model"))
        if recipe.tokenizer == "byte":
            c.that(
                recipe.model.vocab_size >= ByteTokenizer.vocab_size,
                "model.vocab_size",
                f"the byte tokenizer needs vocab_size >= {ByteTokenizer.vocab_size}, got {recipe.model.vocab_size}",
            )
    c.that(bool(recipe.domains), "domains", "an experiment needs at least one domain (domains: {name: recipe.yaml})")
    names = list(recipe.domains)
    folded: Dict[str, str] = {}
    for name in names:
        c.name(name, f"domains.{name}")
        c.that(
            name not in RESERVED_DOMAINS,
            f"domains.{name}",
            f"{name!r} is reserved: it names the seed's expert "
            "in the merged MoE and the seed's row in eval tables; rename this domain",
        )
        c.that(
            not name.startswith(RESERVED_DOMAIN_PREFIXES),
            f"domains.{name}",
            f"{name!r} is reserved: merge names its experts seed.<i> and blend.<i>; rename this domain",
        )
        c.that(
            name.lower() not in folded,
            f"domains.{name}",
            f"differs from domain {folded.get(name.lower())!r} only in case; on a case-insensitive file "
            "system both would share one directory",
        )
        folded[name.lower()] = name
    recipe.train.check(c.at("train"))
    recipe.seed.check(c.at("seed"), names)
    recipe.branch.check(c.at("branch"))
    merged = [n for n in names if n not in recipe.grow.domains]
    recipe.merge.check(c.at("merge"), merged, recipe.grow)
    recipe.grow.check(c.at("grow"), names, recipe.merge)
    recipe.finetune.check(c.at("finetune"), names)
    recipe.eval.check(c.at("eval"))
    recipe.analyze.check(c.at("analyze"))

    # Command-line train.* overrides win over every job's own train settings (see module doc).
    cli_train = _cli_keys(override_dicts, "train")
    cli_seed, cli_finetune = _cli_keys(override_dicts, "seed.train"), _cli_keys(override_dicts, "finetune.train")
    seed_train = _effective_train(recipe.train, recipe.seed.train, cli_train, cli_seed, c.at("seed.train"))
    finetune_train = _effective_train(
        recipe.train, recipe.finetune.train, cli_train, cli_finetune, c.at("finetune.train")
    )
    # train.trainable is the experts'; the seed trains from scratch and the finetune has its own key.
    for key, own, why in (
        (
            "seed.train",
            {**recipe.seed.train, **cli_seed},
            "the seed trains from scratch, so all of it trains (train.trainable applies to the experts)",
        ),
        (
            "finetune.train",
            {**recipe.finetune.train, **cli_finetune},
            "the MoE finetune's is finetune.trainable (all, router_only, frozen_experts)",
        ),
    ):
        c.that(own.get("trainable", "all") == "all", f"{key}.trainable", why)
    seed_train = dataclasses.replace(seed_train, trainable="all")
    finetune_train = dataclasses.replace(finetune_train, trainable="all")
    _check_sizes(c, recipe, {"train": recipe.train, "seed.train": seed_train, "finetune.train": finetune_train})
    domains: Dict[str, Domain] = {}
    for name, domain_path in recipe.domains.items():
        dpath = Path(domain_path)
        c.that(dpath.is_file(), f"domains.{name}", f"{domain_path}: no such domain recipe file")
        domains[name] = load_domain(
            dpath, base_train=recipe.train, name=name, cli_train=cli_train, inputs_exist=inputs_exist
        )
    general = None
    if recipe.finetune.general is not None:
        c.that(
            GENERAL_DOMAIN not in domains,
            f"domains.{GENERAL_DOMAIN}",
            f"'{GENERAL_DOMAIN}' names finetune.general's data-only domain; rename this expert's domain",
        )
        gpath = Path(recipe.finetune.general)
        c.that(gpath.is_file(), "finetune.general", f"{gpath}: no such domain recipe file")
        general = load_domain(
            gpath, base_train=recipe.train, name=GENERAL_DOMAIN, cli_train=cli_train, inputs_exist=inputs_exist
        )

    return Experiment(
        path=path,
        recipe=recipe,
        domains=domains,
        run_dir=Path(recipe.run_dir).absolute(),
        seed_train=seed_train,
        finetune_train=finetune_train,
        overrides=overrides,
        general=general,
    )


def load_domain(
    path: str | os.PathLike,
    overrides: Optional[List[str]] = None,
    *,
    base_train: Optional[TrainSection] = None,
    name: Optional[str] = None,
    cli_train: Optional[Dict[str, Any]] = None,
    inputs_exist: bool = True,
) -> Domain:
    """Load and validate one domain recipe. `base_train` holds the experiment's training defaults
    (TrainSection() when the domain stands alone); the domain's `train:` overrides them."""
    path = Path(path)
    overrides = list(overrides or [])
    label = _label(path, overrides)
    raw = _read_yaml(path)
    rename_old_keys(raw, DomainRecipe, str(path))
    typecheck(raw, DomainRecipe, str(path), "")
    _resolve_sources(raw, path.parent)
    override_dicts = _parse_overrides(overrides, DomainRecipe, str(path))
    for od in override_dicts:
        _resolve_sources(od, Path.cwd())
        _deep_merge(raw, od)
    recipe: DomainRecipe = _build(DomainRecipe, raw, label, overrides)

    c = Checker(label, origins=_origins(overrides))
    expected = name or recipe.name or path.stem
    if recipe.name is not None and name is not None and recipe.name != name:
        c.fail("name", f"this recipe is for domain {recipe.name!r} but the experiment lists it as {name!r}")
    recipe.name = expected
    c.name(recipe.name, "name")
    recipe.data.check(c.at("data"))
    sources = [_source(s, recipe.data, c, i, inputs_exist) for i, s in enumerate(recipe.data.sources)]
    train = _effective_train(
        base_train or TrainSection(), recipe.train, cli_train or {}, _cli_keys(override_dicts, "train"), c.at("train")
    )
    return Domain(name=recipe.name, path=path, recipe=recipe, sources=sources, train=train)


# Keys holding input paths, which resolve relative to the recipe file (or the CWD for overrides).
_EXPERIMENT_PATHS = ("seed.path", "tokenizer", "domains.*", "finetune.general", "eval.include_path")


def _experiment_raw(path: Path, chain: tuple) -> dict:
    """An experiment recipe file's keys, its paths resolved, over those of its `base:` recipe (and
    the base's base): a recipe names only what it changes. Mappings merge key by key, as overrides
    do; each file's paths are relative to that file."""
    raw = _read_yaml(path)
    rename_old_keys(raw, ExperimentRecipe, str(path))
    typecheck(raw, ExperimentRecipe, str(path), "")
    _resolve_paths(raw, _EXPERIMENT_PATHS, path.parent)
    base = raw.pop("base", None)
    if base is None:
        return raw
    beside = Path(_abs(base, path.parent))
    base_path = beside if beside.is_file() else resolve_recipe(base)
    if not base_path.is_file():
        names = builtin_recipe_names()
        raise BtxError(
            f"{path}: base: {base}: no such recipe (a path relative to this file, or a built-in "
            f"recipe: {', '.join(names)}{suggest(base, names)})"
        )
    if base_path.resolve() in chain + (path.resolve(),):
        raise BtxError(f"{path}: base: {base} leads back to this recipe (the bases form a cycle)")
    if "experiment" not in raw:
        raise BtxError(f"{path}: experiment: required with base: (its own name, so it gets its own run directory)")
    merged = _experiment_raw(base_path, chain + (path.resolve(),))
    merged.pop("run_dir", None)  # an output of the base's run, not of this one
    _deep_merge(merged, raw)
    merged["base"] = str(base_path)
    return merged


def _written_path(resolved: str, recipe_dir: Path) -> str:
    """A path as written (relative to the recipe's directory, or to the current one for an
    override) from its resolved form."""
    for base in (recipe_dir.absolute(), Path.cwd()):
        try:
            return str(Path(resolved).relative_to(base))
        except ValueError:
            pass
    return resolved


def _label(path: Path, overrides: List[str]) -> str:
    return str(path)


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        hint = ""
        if os.sep not in str(path) and path.suffix not in (".yaml", ".yml"):
            names = builtin_recipe_names()
            hint = f" and no built-in recipe of that name (built-in: {', '.join(names)}{suggest(str(path), names)})"
        raise BtxError(f"{path}: no such recipe file{hint}")
    try:
        cfg = OmegaConf.load(path)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise BtxError(f"{path}: {where}invalid YAML ({problem})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise BtxError(f"{path}: cannot read ({e})") from None
    except OmegaConfBaseException as e:
        raise BtxError(f"{path}: {first_line(e)}") from None
    if cfg is None or (OmegaConf.is_dict(cfg) and len(cfg) == 0):
        raise BtxError(f"{path}: the recipe is empty")
    if not OmegaConf.is_dict(cfg):
        raise BtxError(f"{path}: expected a mapping of keys at the top level, got a list")
    return OmegaConf.to_container(cfg, resolve=False)


def _origins(overrides: List[str]) -> List[tuple]:
    return [(item.partition("=")[0].strip(), item) for item in overrides]


def _parse_overrides(overrides: List[str], schema: type, path: str) -> List[dict]:
    out = []
    for item in overrides:
        label = f"{path} (override {item!r})"
        key, eq, _ = item.partition("=")
        if not eq or not key.strip() or key.strip().startswith(("-", "+", "~")):
            raise BtxError(f"{label}: expected KEY=VALUE (e.g. merge.top_k=1)")
        try:
            d = OmegaConf.to_container(OmegaConf.from_dotlist([item]), resolve=False)
        except (OmegaConfBaseException, yaml.YAMLError, ValueError) as e:
            raise BtxError(f"{label}: cannot parse ({first_line(e)})") from None
        rename_old_keys(d, schema, label)
        typecheck(d, schema, label, "")
        out.append(d)
    return out


def _build(schema: type, raw: dict, label: str, overrides: List[str]):
    """raw (already type-checked) -> a schema dataclass instance, through OmegaConf.structured."""
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(schema), raw)
        OmegaConf.resolve(cfg)
        obj = OmegaConf.to_object(cfg)
    except MissingMandatoryValue as e:
        Checker(label, origins=_origins(overrides)).fail(
            str(getattr(e, "full_key", None) or "?"), "missing (this key is required)"
        )
    except OmegaConfBaseException as e:
        Checker(label, origins=_origins(overrides)).fail(str(getattr(e, "full_key", None) or ""), first_line(e))
    # Interpolated values are converted by OmegaConf after our type check; check them again here.
    plain = to_plain(obj)
    typecheck(plain, schema, label, "")
    _check_finite(plain, Checker(label, origins=_origins(overrides)), "")
    return obj


def _check_finite(value: Any, c: Checker, key: str) -> None:
    """Every number in a recipe is finite: YAML's .inf / .nan (or 1e999) would reach training
    and JSON manifests, which cannot hold them."""
    if isinstance(value, float) and not math.isfinite(value):
        c.fail(key, f"must be a finite number, got {value!r}")
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_finite(v, c, join_key(key, str(k)))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_finite(v, c, f"{key}[{i}]")


def _deep_merge(base: dict, new: dict) -> None:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _deep_merge(base[k], v)
        else:
            base[k] = v


def _abs(value: Any, root: Path) -> Any:
    if not isinstance(value, str) or is_interpolation(value):
        return value
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else (root / p).absolute())


def _resolve_paths(raw: dict, keys: tuple, root: Path) -> None:
    for dotted in keys:
        *parents, last = dotted.split(".")
        node = raw
        for p in parents:
            node = node.get(p) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            continue
        if last == "*":
            for k in list(node):
                node[k] = _abs(node[k], root)
        elif last in node and not (dotted == "tokenizer" and node[last] == "byte"):
            node[last] = _abs(node[last], root)


def _resolve_sources(raw: dict, root: Path) -> None:
    sources = raw.get("data", {}).get("sources") if isinstance(raw.get("data"), dict) else None
    if not isinstance(sources, list):
        return
    for i, s in enumerate(sources):
        if isinstance(s, str) and not s.startswith(HF_PREFIX):
            sources[i] = _abs(s, root)
        elif isinstance(s, dict) and "path" in s and not str(s["path"]).startswith(HF_PREFIX):
            s["path"] = _abs(s["path"], root)


_SOURCE_KEYS = ("path", "glob", "text_field")


def _source(spec: Any, data: DataSection, c: Checker, i: int, inputs_exist: bool = True) -> Source:
    key = f"data.sources[{i}]"
    if isinstance(spec, str):
        spec = {"path": spec}
    if not isinstance(spec, dict):
        c.fail(key, f"expected a path or a mapping {{path, glob, text_field}}, got {describe(spec)}")
    for k, v in spec.items():
        if k not in _SOURCE_KEYS:
            c.fail(f"{key}.{k}", f"unknown key{suggest(str(k), _SOURCE_KEYS)}")
        if not isinstance(v, str):
            c.fail(f"{key}.{k}", f"expected a string, got {describe(v)}")
    if "path" not in spec:
        c.fail(key, "missing path")
    path = Path(spec["path"])
    pattern = spec.get("glob")
    if spec["path"].startswith(HF_PREFIX):  # a Hub dataset: checked (and read) by btx.data.sources
        if pattern is not None:
            c.fail(f"{key}.glob", "applies to directories, not to hf: datasets")
        return Source(path=path, glob=None, text_field=spec.get("text_field", data.text_field), files=[])
    if not inputs_exist and not path.exists():
        return Source(path=path, glob=pattern, text_field=spec.get("text_field", data.text_field), files=[])
    if pattern is not None:
        if not path.is_dir():
            c.fail(f"{key}.path", f"{path}: no such directory")
        files = sorted(
            p
            for p in path.glob(pattern)
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
    elif GLOB_CHARS.search(str(path)):
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
    elif path.is_dir():
        files = sorted(
            p
            for p in path.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
    elif path.is_file():
        files = [path]
    else:
        c.fail(key, f"{path}: no such file or directory")
    if not files:
        c.fail(key, f"{path}{' ' + pattern if pattern else ''}: matches no file")
    return Source(path=path, glob=pattern, text_field=spec.get("text_field", data.text_field), files=files)


def _cli_keys(override_dicts: List[dict], dotted: str) -> Dict[str, Any]:
    """The keys that command-line overrides set under `dotted` (e.g. "train", "finetune.train")."""
    out: Dict[str, Any] = {}
    for d in override_dicts:
        node: Any = d
        for part in dotted.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            out.update(node)
    return out


def _effective_train(
    base: TrainSection, own: Dict[str, Any], cli_train: Dict[str, Any], cli_own: Dict[str, Any], c: Checker
) -> TrainSection:
    """base <- the job's own train keys <- command-line train.* <- command-line <job>.train.*"""
    merged = {**own, **cli_train, **cli_own}
    if not merged:
        return dataclasses.replace(base, betas=list(base.betas))
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(base), merged)
        result = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or ""
        c.fail(key, first_line(e))
    result.check(c)
    return result
