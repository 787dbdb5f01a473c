"""The training job: what a run trains, from what, on which data, where it writes.

`seed_job` and `expert_job` build TrainJobs from a recipe; `btx finetune` and the baselines build
their own. The trajectory hash covers every setting that changes what a run computes, so a
checkpoint or DONE.json from other settings is never resumed or adopted.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from btx.data.sampling import PlannedSampler, TokenSampler, eval_batches
from btx.data.shards import check_tokenizer, load_shard
from btx.data.tokenizer import load_tokenizer
from btx.errors import BtxError
from btx.io.hashing import sha256_file
from btx.io.manifest import DONE_NAME, read_done
from btx.io.reader import CheckpointReader
from btx.io.writer import has_tokenizer
from btx.model.config import ModelConfig, ModelOutput
from btx.recipe.experiment import recipe_hash

CKPT_DIR = "ckpt"
CKPT_MANIFEST = "btx_checkpoint.json"  # sha256 of every file of a checkpoint, written last
CKPT_BYTES_PER_PARAM = 16  # fp32 weights and master copy plus two AdamW moments: a checkpoint's size
METRICS_FILE = "metrics.jsonl"
KILL_HOOK_ENV = "BTX_TRAIN_KILL_AT_STEP"
STEP_DIR = re.compile(r"^step-(\d+)$")
# Settings that change what a run computes. The others (logging, eval and checkpoint cadence) may
# change between a run and its resumption.
_TRAJECTORY_SETTINGS = (
    "lr", "weight_decay", "warmup_steps", "min_lr_ratio", "betas", "eps", "steps", "batch_size",
    "seq_len", "grad_accum", "grad_clip", "precision", "seed", "zero_stage",
)  # fmt: skip


# --------------------------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------------------------


@dataclass
class TrainJob:
    """Everything one training run needs; plain data, built by `seed_job`, `expert_job` or finetune.

    `settings` is a btx.recipe.schema.TrainSection (lr, steps, batch_size per rank, seq_len, grad_accum,
    grad_clip, precision, checkpoint_every, keep_checkpoints, eval_every, eval_batches, log_every, seed).
    """

    name: str  # "seed", a domain, "finetune": names the job in logs and DONE.json
    settings: Any
    train_shards: dict[str, Path]  # domain -> train shard (.bin or .json)
    val_shards: dict[str, Path]  # domain -> held-out shard
    work_dir: Path  # ckpt/ and metrics.jsonl
    export_dir: Path  # the final HF checkpoint
    manifest_dir: Path  # where DONE.json goes
    mixture: dict[str, float] | None = None  # sampling weights of train_shards; None: by token count
    init_from: Path | None = None  # an HF checkpoint to start from; None: from scratch (model_config)
    model_config: ModelConfig | None = None
    config_overrides: dict = field(default_factory=dict)  # ModelConfig fields to change (router_mode, ...)
    tokenizer: str = "byte"  # the run's tokenizer ("byte" or a path); saved with the export
    balance_alpha: float = 0.0  # load-balancing loss weight (MoE)
    z_loss_coef: float = 0.0  # router z-loss weight (MoE)
    export_dtype: str | None = None  # float32 | bfloat16 | float16; None: the init checkpoint's (fp32 from scratch)
    recipe_hash: str = ""  # of the recipe sections this job depends on (for DONE.json)
    inputs: dict = field(default_factory=dict)  # provenance for DONE.json (seed manifest, ...)
    # Engine-side settings that change what a run computes or how its checkpoints are laid out
    # (finetune: trainable, zero_stage, offload_optimizer); part of the trajectory hash.
    engine_settings: dict = field(default_factory=dict)
    trainable: str = "all"  # which parameters train (btx.model.trainable.MODES); the others are frozen
    # The batches, when not the TokenSampler of (train_shards, mixture, settings.seed): phases of
    # btx.data.sampling.DataStream (data-matched baselines replay BTX's batches; a finetune after its
    # router-only phase takes the batches after that phase's).
    data_plan: list | None = None
    # A job that runs first, whose export this one starts from (init_from) and whose FLOPs count
    # in this one's train_flops: the finetune's router-only phase (btx.train.finetune runs it).
    before: "TrainJob | None" = None
    prior_flops: dict = field(default_factory=dict)  # {earlier phase's name: its train_flops}
    # Names the job in experiment trackers (btx.train.loggers.run_name): the recipe's experiment and
    # the stage of btx run the job belongs to (seed, branch, finetune, baselines, grow).
    experiment: str = ""
    stage: str = ""

    @property
    def ckpt_dir(self) -> Path:
        return Path(self.work_dir) / CKPT_DIR

    @property
    def metrics_path(self) -> Path:
        return Path(self.work_dir) / METRICS_FILE


StepHook = Callable[[int, ModelOutput, torch.Tensor], "dict | None"]


# --------------------------------------------------------------------------------------------
# Jobs from an experiment recipe
# --------------------------------------------------------------------------------------------


def _seed_weights(exp) -> dict:
    # Default: the domains merged (those grow.domains adds later are not the seed's data).
    return dict(exp.seed.mixture) or {name: 1.0 for name in exp.merged_domains}


def seed_domains(exp) -> list[str]:
    """The domains the seed trains on, in recipe order."""
    weights = _seed_weights(exp)
    return [n for n in exp.domains if weights.get(n, 0) > 0]


def seed_job(exp) -> TrainJob:
    """The demo's seed: trained from scratch (recipe `model:`) on the domain mixture into <run_dir>/seed/."""
    if exp.seed.path is not None:
        raise BtxError(
            f"{exp.path}: seed.path is set ({exp.seed.path}): the seed exists already; "
            "`btx train --seed` trains one from scratch from a `model:` section"
        )
    mixture, names = _seed_weights(exp), seed_domains(exp)
    return TrainJob(
        name="seed",
        experiment=exp.name,
        stage="seed",
        settings=exp.seed_train,
        train_shards={n: job_shard_path(exp, n, "train") for n in names},
        val_shards={n: job_shard_path(exp, n, "val") for n in names},
        mixture={n: float(mixture[n]) for n in names},
        work_dir=exp.paths.seed_train,
        export_dir=exp.paths.seed,
        manifest_dir=exp.paths.seed,
        model_config=exp.model.to_model_config(),
        tokenizer=str(exp.tokenizer),
        recipe_hash=sections_hash(
            {
                "model": exp.model,
                "train": exp.seed_train,
                "mixture": mixture,
                "tokenizer": exp.tokenizer,
                "data": {n: exp.domains[n].data for n in names},
            }
        ),
    )


def expert_job(exp, domain: str) -> TrainJob:
    """Domain expert `domain`: the seed continued on that domain into <run_dir>/experts/<domain>/."""
    if domain not in exp.domains:
        close = difflib.get_close_matches(domain, list(exp.domains), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise BtxError(
            f"{exp.path}: unknown domain {domain!r}{hint}; the recipe's domains are {', '.join(exp.domains)}"
        )
    seed = exp.seed_dir
    seed_manifest = None
    if exp.seed.path is None:
        seed_manifest = read_done(seed)
        if seed_manifest is None:
            raise BtxError(
                f"{seed}: the seed is not trained yet (no {DONE_NAME}); run "
                f"`btx train {exp.path} --seed` first, or set seed.path to a checkpoint"
            )
    elif not (seed / "config.json").is_file():
        raise BtxError(
            f"{exp.path}: seed.path: {seed} has no config.json (expected a Hugging Face dense checkpoint directory)"
        )
    settings = exp.domains[domain].train
    expert_dir = exp.paths.expert(domain)
    seed_identity = seed_manifest.get("outputs") if seed_manifest else str(seed)
    return TrainJob(
        name=domain,
        experiment=exp.name,
        stage="branch",
        settings=settings,
        train_shards={domain: job_shard_path(exp, domain, "train")},
        val_shards={domain: job_shard_path(exp, domain, "val")},
        work_dir=expert_dir,
        export_dir=exp.paths.expert_final(domain),
        manifest_dir=expert_dir,
        init_from=seed,
        tokenizer=str(exp.tokenizer),
        recipe_hash=sections_hash(
            {"seed": seed_identity, "train": settings, "data": exp.domains[domain].data, "tokenizer": exp.tokenizer}
        ),
        inputs={"seed": str(seed)},
        trainable=settings.trainable,
    )


def job_shard_path(exp, domain: str, split: str) -> Path:
    path = exp.paths.shard(domain, split)
    if not path.is_file():
        raise BtxError(f"{path}: {split} shard of domain '{domain}' not found; run `btx prepare {exp.path}` first")
    return path


def sections_hash(sections: dict) -> str:

    return recipe_hash(sections)


def open_inputs(job: TrainJob):
    """Tokenizer and shards, checked against each other (BtxError naming the file at fault)."""

    if job.init_from is not None:
        CheckpointReader(job.init_from).close()  # config and headers sound (reads no tensor data)
    tokenizer = load_tokenizer(job.tokenizer)
    if job.init_from is not None and has_tokenizer(job.init_from):
        # The export carries the checkpoint's own tokenizer files: the data must be tokenized by it.
        own = load_tokenizer(job.init_from)
        if own.identity() != tokenizer.identity():
            raise BtxError(
                f"{job.init_from}: its tokenizer differs from the run's tokenizer ({job.tokenizer}); "
                f"set the recipe's tokenizer to {job.init_from} (the checkpoint's own)"
            )
    if job.mixture is not None:
        unknown = sorted(set(job.mixture) - set(job.train_shards))
        if unknown:
            raise BtxError(f"train {job.name}: mixture names {unknown}, which have no train shard")
    train = {name: load_shard(path) for name, path in job.train_shards.items()}
    val = {name: load_shard(path) for name, path in job.val_shards.items()}
    for shard in [*train.values(), *val.values()]:
        check_tokenizer(shard, tokenizer.identity())
    # Shards long enough for the windows, and sound weights: found now, not at the first validation.
    s = job.settings
    sampler = job_sampler(job, train, s.batch_size)
    if job.data_plan is not None and len(sampler) < s.steps * s.grad_accum:
        raise BtxError(
            f"train {job.name}: its data plan holds {len(sampler)} micro-batches; {s.steps} steps of "
            f"{s.grad_accum} need {s.steps * s.grad_accum}"
        )
    for shard in val.values():
        next(eval_batches(shard, s.seq_len, 1, 1))
    return tokenizer, train, val


def check_model_fits(job: TrainJob, cfg: ModelConfig, tokenizer) -> None:
    where = str(job.init_from) if job.init_from is not None else f"train {job.name}: model"
    if cfg.vocab_size < tokenizer.vocab_size:
        raise BtxError(
            f"{where}: vocab_size {cfg.vocab_size} is smaller than the tokenizer's "
            f"{tokenizer.vocab_size}; the data's token ids would not fit"
        )
    if job.settings.seq_len > cfg.max_seq_len:
        raise BtxError(
            f"train {job.name}: train.seq_len {job.settings.seq_len} exceeds the model's max_seq_len {cfg.max_seq_len}"
        )


def trajectory_hash(job: TrainJob) -> str:
    """sha256 of everything that decides what the run computes (not where it writes or how often it logs)."""
    init = None
    if job.init_from is not None:
        config = Path(job.init_from) / "config.json"
        weights = sorted(Path(job.init_from).glob("*.safetensors*"))
        # Sizes and names, not contents: hashing a 13 GB seed on every start would be slow.
        init = {
            "config": sha256_file(config) if config.is_file() else None,
            "weights": [(p.name, p.stat().st_size) for p in weights],
        }
    shards = {}
    for name, path in job.train_shards.items():
        sidecar = Path(path).with_suffix(".json")
        shards[name] = json.loads(sidecar.read_text()).get("sha256") if sidecar.is_file() else None
    what = {
        "settings": {k: getattr(job.settings, k, None) for k in _TRAJECTORY_SETTINGS},
        "init": init,
        "model_config": dataclasses.asdict(job.model_config) if job.model_config is not None else None,
        "config_overrides": job.config_overrides,
        "mixture": job.mixture,
        "train_shards": shards,
        "balance_alpha": job.balance_alpha,
        "z_loss_coef": job.z_loss_coef,
    }
    if job.engine_settings:  # only when set, so jobs without any keep their hash
        what["engine_settings"] = job.engine_settings
    if job.trainable != "all":  # likewise
        what["trainable"] = job.trainable
    if getattr(job.settings, "document_mask", False):  # likewise
        what["document_mask"] = True
    if job.data_plan is not None:
        what["data_plan"] = [[dataclasses.asdict(stream) for stream in phase] for phase in job.data_plan]
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()


def job_sampler(job: TrainJob, train_shards: dict, global_batch: int):
    """The job's batches: its data plan, or the TokenSampler of its mixture and seed."""

    s = job.settings
    if job.data_plan is not None:
        return PlannedSampler(train_shards, job.data_plan, seq_len=s.seq_len, batch_size=global_batch)
    return TokenSampler(train_shards, job.mixture, seq_len=s.seq_len, batch_size=global_batch, seed=s.seed)
