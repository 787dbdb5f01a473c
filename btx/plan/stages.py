"""The jobs a recipe runs, as `btx plan` accounts for them: one `Job` per training run (the seed when
the recipe trains one, each expert, the finetune, each baseline) and the merge, with the model, the
effective train settings, the engine and the recipe keys that change them.

The recipe is loaded with `inputs_exist=False`: a plan is made before the seed checkpoint and the
data are on this machine. `${oc.env:NAME}` values that are not set stand for a placeholder while the
recipe loads. The seed's architecture comes from seed.path/config.json, from `--seed-config`, or
from the recipe's `model:` section; the MoE's from the merge and finetune sections, exactly as
`btx merge` and `btx finetune` build it. Invariant: a job's settings are the ones `btx run` would
give it (btx.train.job.expert_job, btx.train.finetune.finetune_job, btx.run.baselines).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from btx.errors import BtxError
from btx.families import read_config
from btx.model.config import ModelConfig
from btx.recipe.experiment import Experiment
from btx.recipe.load import load_experiment
from btx.recipe.schema import TrainSection

ENV_REFERENCE = re.compile(r"\$\{oc\.env:([A-Za-z_][A-Za-z0-9_]*)\}")
AC_MODES = ("none", "full")  # activation checkpointing the memory model knows


@dataclass
class Job:
    """One training run of the recipe, as the plan sees it."""

    name: str  # seed, expert:<domain>, finetune, baseline:<kind>-<match>
    kind: str  # seed | expert | finetune | baseline
    cfg: ModelConfig
    settings: TrainSection  # effective train settings (steps, batch, seq_len, grad_accum, ...)
    trainable: str  # btx.model.trainable mode
    engine: str  # accelerate (DDP, fp32 master under autocast) | deepspeed
    zero_stage: int | None  # None: accelerate
    offload_optimizer: bool
    train_prefix: str  # the override prefix of its train settings: "train.", "seed.train.", "finetune.train."
    engine_prefix: str  # where its zero_stage lives: "train." ... or "finetune."
    in_recipe: bool = True  # False: a baseline the recipe's eval section does not ask for
    router_phase_steps: int = 0  # finetune.router_only_steps: a router-only job before it

    @property
    def activation_checkpointing(self) -> str:
        # train.activation_checkpointing may not exist in this recipe schema yet: none then.
        return getattr(self.settings, "activation_checkpointing", "none") or "none"


@contextlib.contextmanager
def placeholder_env(recipe_path: Path):
    """Every ${oc.env:NAME} the recipe's directory mentions and the environment lacks stands for
    '<NAME unset>' while the recipe loads; the environment is restored afterwards."""
    names: set[str] = set()
    root = recipe_path.parent
    for f in [recipe_path, *root.rglob("*.yaml"), *root.rglob("*.yml")]:
        with contextlib.suppress(OSError, UnicodeDecodeError):
            names.update(ENV_REFERENCE.findall(f.read_text()))
    added = {n: f"<{n} unset>" for n in sorted(names) if n not in os.environ}
    os.environ.update(added)
    try:
        yield added
    finally:
        for name in added:
            os.environ.pop(name, None)


def load_for_plan(recipe: str, overrides: list[str] | None = None) -> Experiment:
    from btx.recipe.builtin import resolve_recipe

    path = resolve_recipe(recipe)
    with placeholder_env(Path(path)):
        return load_experiment(path, overrides, inputs_exist=False)


def seed_config(exp: Experiment, seed_config_path: str | None = None) -> ModelConfig:
    """The dense seed's architecture: `seed_config_path` (a config.json), seed.path/config.json, or
    the recipe's model section."""
    if seed_config_path is not None:
        path = Path(seed_config_path)
    elif exp.seed.path is not None:
        path = Path(exp.seed.path) / "config.json"
        if not path.is_file():
            raise BtxError(
                f"{exp.path}: seed.path {exp.seed.path} has no config.json here; pass --seed-config "
                "CONFIG.json (the seed's Hugging Face config) to plan without the checkpoint"
            )
    else:
        return exp.model.to_model_config()
    try:
        hf = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise BtxError(f"{path}: not a readable config.json ({e})") from None
    if not isinstance(hf, dict):
        raise BtxError(f"{path}: expected a JSON object (a Hugging Face config.json)")
    cfg = read_config(hf, path)
    if cfg.is_moe:
        raise BtxError(f"{path}: an MoE config ({cfg.n_experts} experts); the seed is a dense model")
    return cfg


def moe_config(exp: Experiment, seed: ModelConfig) -> ModelConfig:
    """The merged MoE as the finetune routes it (btx.mix.merge's shape, btx.train.finetune's routing)."""
    merge, ft = exp.merge, exp.finetune
    n_experts = merge.n_experts(len(exp.merged_domains))
    ffn_dim = seed.ffn_dim // merge.chunks if merge.granularity in ("split", "blend") else seed.ffn_dim
    return dataclasses.replace(
        seed,
        n_experts=n_experts,
        ffn_dim=ffn_dim,
        top_k=ft.top_k if ft.top_k is not None else merge.top_k,
        router_mode=ft.router_mode,
        capacity_factor=ft.capacity_factor,
    )


def _dense_engine(settings: TrainSection) -> tuple[str, int | None]:
    return ("accelerate", None) if settings.zero_stage is None else ("deepspeed", settings.zero_stage)


def training_jobs(exp: Experiment, seed: ModelConfig) -> list[Job]:
    """The seed (when trained), each merged expert, the finetune, then the baselines: compute-matched
    always (the comparison a plan exists to show), data-matched when eval.match asks for them."""
    jobs: list[Job] = []
    if exp.seed.path is None:
        engine, zero = _dense_engine(exp.seed_train)
        jobs.append(Job("seed", "seed", seed, exp.seed_train, "all", engine, zero, False, "seed.train.", "seed.train."))
    for domain in exp.merged_domains:
        s = exp.domains[domain].train
        engine, zero = _dense_engine(s)
        jobs.append(Job(f"expert:{domain}", "expert", seed, s, s.trainable, engine, zero, False, "train.", "train."))
    ft = exp.finetune
    moe = moe_config(exp, seed)
    fts = exp.finetune_train
    jobs.append(
        Job(
            "finetune",
            "finetune",
            moe,
            fts,
            ft.trainable,
            "deepspeed",
            ft.zero_stage,
            ft.offload_optimizer,
            "finetune.train.",
            "finetune.",
            router_phase_steps=ft.router_only_steps,
        )
    )
    asked = set(["compute", "data"] if exp.eval.match == "both" else [exp.eval.match]) if exp.eval.baselines else set()
    for match in ("compute", "data"):
        if match == "data" and match not in asked:
            continue
        engine, zero = _dense_engine(fts)  # the dense baseline trains with the finetune's train settings
        on = match in asked
        jobs.append(
            Job(
                f"baseline:dense-{match}",
                "baseline",
                seed,
                fts,
                "all",
                engine,
                zero,
                False,
                "finetune.train.",
                "finetune.train.",
                in_recipe=on,
            )
        )
        jobs.append(
            Job(
                f"baseline:upcycled-{match}",
                "baseline",
                moe,
                fts,
                "all",
                "deepspeed",
                ft.zero_stage,
                ft.offload_optimizer,
                "finetune.train.",
                "finetune.",
                in_recipe=on,
            )
        )
    return jobs


def replace_settings(settings: TrainSection, **changes) -> TrainSection:
    """dataclasses.replace for train settings that keeps activation_checkpointing whether or not the
    schema has that key yet (before it does, the plan carries it as an attribute of the copy)."""
    fields = {f.name for f in dataclasses.fields(settings)}
    ac = changes.pop("activation_checkpointing", getattr(settings, "activation_checkpointing", None))
    if "activation_checkpointing" in fields:
        changes["activation_checkpointing"] = ac
    new = dataclasses.replace(settings, **changes)
    if ac is not None and "activation_checkpointing" not in fields:
        object.__setattr__(new, "activation_checkpointing", ac)
    return new


def with_activation_checkpointing(jobs: list[Job], mode: str | None) -> list[Job]:
    """`--activation-checkpointing MODE` for every job (a what-if before the recipe key exists)."""
    if mode is None:
        return jobs
    if mode not in AC_MODES:
        raise BtxError(f"--activation-checkpointing: expected one of {', '.join(AC_MODES)}, got {mode!r}")
    return [
        dataclasses.replace(job, settings=replace_settings(job.settings, activation_checkpointing=mode)) for job in jobs
    ]
