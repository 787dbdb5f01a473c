"""`btx finetune`: MoE finetuning of the merged checkpoint on the domain mixture, on DeepSpeed.

    exp = load_experiment("recipes/demo/btx.yaml", ["finetune.router_mode=switch"])
    job = finetune_job(exp)                        # <run_dir>/merged -> <run_dir>/finetuned
    done = run_finetune(job)                       # the training loop with a DeepSpeed engine

This module only builds the job; everything else is shared with dense training:
- the loop is `btx.train.loop.run_loop` (batches, loss = NLL + alpha * balance + z_coef * z-loss, the
  router step of sample_top1's temperature, metrics, validation, checkpoints, resume, export);
- the engine is `btx.train.engines.deepspeed.DeepSpeedEngine` (ZeRO stage, precision and optimizer
  offload from the recipe);
- routing modes are `btx.model.moe.Router.route` (the job only sets `router_mode`, `top_k`,
  `capacity_factor`, `gumbel_rate` on the model config); the export's config.json records them
  (see `btx.families.inference_note` for how transformers runs each mode).

What finetune adds through the loop's hooks:
- the data: a mixture of the domains' train shards (`finetune.mixture`), optionally with the
  data-only `general` domain (`finetune.general`), which stands for the seed's own pretraining
  data as in the paper (the seed, kept as an expert, has no domain of its own).
- which parameters train (`finetune.trainable`: all | router_only | frozen_experts; the job's
  `trainable`, which the loop sets before the optimizer exists, so frozen ones are not in it).
- `finetune.router_only_steps: N`: a router-only phase first, its own job (`<run_dir>/finetune-router/`,
  the finetune's settings for N steps, warmup at most half of them), on the first N steps' batches
  of the finetune's data; the finetune proper then starts from its export, on the batches after
  them, and its DONE.json `train_flops` counts both phases (`train_flops_phases`).
- `on_step`: per-layer balancing loss and z-loss, the switch drop rate (every step), and every
  `log_every` steps each layer's share of routed tokens per expert (`btx.evaluate.routing`).

Where things go (btx.recipe.run_dir.FinetuneDirs: the run's `exp.paths.finetune`, or beside `--out DIR`):
    <run_dir>/finetune-train/ckpt/step-N/   DeepSpeed checkpoints (resume)
    <run_dir>/finetune-train/metrics.jsonl  one JSON object per step
    <run_dir>/finetuned/                    the HF export (the seed family's MoE form), then DONE.json
    <run_dir>/finetune-router(-train)/      the router-only phase's export and training state

Launch on several processes with any launcher, e.g.
    torchrun --nproc_per_node 8 -m btx finetune RECIPE
    deepspeed --num_gpus 8 --module btx finetune RECIPE
"""

from __future__ import annotations

import dataclasses
import weakref
from pathlib import Path

import torch

from btx.choices import GENERAL_DOMAIN
from btx.data.sampling import DataStream
from btx.errors import BtxError
from btx.evaluate.routing import RoutingAccumulator
from btx.io.manifest import DONE_NAME, read_done
from btx.io.reader import CheckpointReader
from btx.model.transformer import Transformer
from btx.recipe.load import load_experiment
from btx.recipe.run_dir import FinetuneDirs
from btx.train.distributed import mean_over_ranks
from btx.train.engines.base import build_model
from btx.train.engines.deepspeed import DeepSpeedEngine, build_sharded_model
from btx.train.job import TrainJob, job_shard_path, sections_hash
from btx.train.loop import run_loop

ROUTER_PHASE = "finetune-router"  # the router-only phase's job name (in DONE.json's train_flops_phases)


def finetune_job(
    exp,
    model_dir: str | Path | None = None,
    out_dir: str | Path | None = None,
    *,
    trainable: str | None = None,
    router_only_steps: int | None = None,
) -> TrainJob:
    """The finetuning job of an experiment: the merged MoE (or `model_dir`) on the finetune mixture.
    `trainable` and `router_only_steps` replace the recipe's (the baselines train everything)."""
    ft = exp.finetune
    trainable = ft.trainable if trainable is None else trainable
    router_steps = ft.router_only_steps if router_only_steps is None else router_only_steps
    merged = Path(model_dir) if model_dir is not None else exp.paths.merged
    if model_dir is None and read_done(merged) is None:
        raise BtxError(
            f"{merged}: the merged MoE is not ready (no {DONE_NAME}); run `btx merge {exp.path}` "
            "first, or pass --model DIR"
        )
    if not (merged / "config.json").is_file():
        raise BtxError(f"{merged}: no config.json (expected an MoE Hugging Face checkpoint directory)")
    with CheckpointReader(merged) as reader:  # config and headers sound; no tensor data read
        cfg = reader.cfg
    if not cfg.is_moe:
        raise BtxError(
            f"{merged}: a dense checkpoint ({cfg.n_layers} layers, no experts); finetune needs the "
            "MoE that `btx merge` writes"
        )
    top_k = ft.top_k if ft.top_k is not None else cfg.top_k
    if top_k > cfg.n_experts:
        raise BtxError(f"{exp.path}: finetune.top_k: {top_k} is more than the model's {cfg.n_experts} experts")

    domains = list(exp.data_domains)  # the experts' domains and finetune.general's data-only one
    # Default mixture: the domains merged into the MoE (grow.domains join it later) and the general one.
    default = [d for d in domains if d in exp.merged_domains or d == GENERAL_DOMAIN]
    mixture = {name: float(w) for name, w in (dict(ft.mixture) or dict.fromkeys(default, 1.0)).items()}
    train_domains = [name for name in domains if mixture.get(name, 0.0) > 0]
    settings = exp.finetune_train
    # with --out, the training state sits next to that export, so two outputs never share checkpoints
    dirs = exp.paths.finetune if out_dir is None else FinetuneDirs.beside(Path(out_dir))
    merged_manifest = read_done(merged)
    job = TrainJob(
        name="finetune",
        experiment=exp.name,
        stage="finetune",
        settings=settings,
        train_shards={name: job_shard_path(exp, name, "train") for name in train_domains},
        val_shards={name: job_shard_path(exp, name, "val") for name in domains},
        mixture={name: mixture[name] for name in train_domains},
        work_dir=dirs.train,
        export_dir=dirs.export,
        manifest_dir=dirs.export,
        init_from=merged,
        config_overrides=routing_overrides(cfg, ft, top_k),
        tokenizer=str(exp.tokenizer),
        balance_alpha=ft.balance_alpha,
        z_loss_coef=ft.z_loss,
        recipe_hash=sections_hash(
            {
                "merged": merged_manifest.get("outputs") if merged_manifest else str(merged),
                "finetune": ft,
                "train": settings,
            }
        ),
        inputs={"merged": str(merged)},
        engine_settings={
            "trainable": trainable,
            "zero_stage": ft.zero_stage,
            "offload_optimizer": ft.offload_optimizer,
        },
        trainable=trainable,
    )
    return with_router_phase(job, router_steps, dirs) if router_steps else job


def finetune_stream(job: TrainJob) -> DataStream:
    """The finetune's batches from the first: the stream of its mixture and seed."""
    return DataStream(domains=list(job.train_shards), weights=job.mixture, seed=job.settings.seed, first=0, count=0)


def with_router_phase(job: TrainJob, steps: int, dirs: FinetuneDirs) -> TrainJob:
    """`job` preceded by `steps` router-only steps into `dirs.router` (see the module docstring)."""
    s = job.settings
    export = dirs.router
    first = dataclasses.replace(
        job,
        name=ROUTER_PHASE,
        settings=dataclasses.replace(
            s,
            steps=steps,
            warmup_steps=min(s.warmup_steps, steps // 2),
            eval_every=steps,
            checkpoint_every=min(s.checkpoint_every, steps) if s.checkpoint_every else 0,
        ),
        work_dir=dirs.router_train,
        export_dir=export,
        manifest_dir=export,
        trainable="router_only",
        engine_settings={**job.engine_settings, "trainable": "router_only"},
    )
    stream = dataclasses.replace(finetune_stream(job), first=steps * s.grad_accum, count=s.steps * s.grad_accum)
    return dataclasses.replace(
        job,
        init_from=export,
        before=first,
        data_plan=[[stream]],
        inputs={**job.inputs, "router_phase": str(export)},
        engine_settings={**job.engine_settings, "router_only_steps": steps},
    )


def routing_overrides(cfg, ft, top_k: int) -> dict:
    """The model-config fields finetuning changes: the routing mode and its knobs, and the
    balancing weight transformers would use (`router_aux_loss_coef`)."""
    return {
        "router_mode": ft.router_mode,
        "top_k": top_k,
        "capacity_factor": ft.capacity_factor,
        "gumbel_rate": ft.gumbel_rate,
        "extra": {**cfg.extra, "router_aux_loss_coef": ft.balance_alpha},
    }


class RoutingLog:
    """The finetune `on_step` hook: per-layer losses and drops every step, expert shares periodically.

    Per step (averaged over ranks, from each rank's last micro-batch):
        balance_loss_layers, z_loss_layers   [layer] unscaled, as the model returns them
        drop_rate, drop_rate_layers          share of tokens no expert processed (switch capacity)
        router_temperature                   sample_top1: the Gumbel-softmax temperature of the step
    Every `every` steps, over the tokens of the steps since the last report (all ranks):
        routing_load_share                   [layer][expert] share of routed slots (rows sum to 1)
        routing_mean_prob                    [layer][expert] mean router probability
    """

    def __init__(self, every: int):
        self.every = max(1, every)
        self._model = None
        self._acc = None

    def setup(self, model: Transformer) -> None:

        cfg = model.cfg
        self._model = weakref.ref(model)  # the engine owns the model; the hook must not keep it alive
        self._acc = RoutingAccumulator(n_layers=len(model.moe_layers()), n_experts=cfg.n_experts, top_k=cfg.top_k)
        model.set_routing_record(True)

    def __call__(self, step: int, output, inputs: torch.Tensor) -> dict:
        stats = output.moe_stats
        tokens = inputs.numel()
        losses = torch.stack([torch.stack([s.balance_loss, s.z_loss]) for s in stats]).detach()
        drops = torch.tensor([[s.dropped / tokens] for s in stats], dtype=torch.float64)
        per_layer = torch.cat([losses.to("cpu", torch.float64), drops], dim=1)  # one device->host copy
        per_layer = mean_over_ranks(per_layer)
        record = {
            "balance_loss_layers": per_layer[:, 0].tolist(),
            "z_loss_layers": per_layer[:, 1].tolist(),
            "drop_rate_layers": per_layer[:, 2].tolist(),
            "drop_rate": float(per_layer[:, 2].mean()),
        }
        model = self._model() if self._model is not None else None
        if model is not None:
            self._acc.update(model)
            if model.cfg.router_mode == "sample_top1":  # the schedule the loop drives (set_router_step)
                record["router_temperature"] = model.moe_layers()[-1].router.temperature()
        if step % self.every == 0 and self._acc is not None:
            summary = self._acc.overall(all_ranks=True)  # a collective: every rank runs this hook
            record["routing_load_share"] = summary["load_share"]
            record["routing_mean_prob"] = summary["mean_prob"]
            self._acc.reset()
        return record


def run_finetune(job: TrainJob, *, force: bool = False, console=None) -> dict:
    """Train a `finetune_job` with the DeepSpeed engine (its router-only phase first, when it has
    one); returns its DONE.json dict."""

    if job.before is not None:
        first = run_finetune(job.before, force=force, console=console)
        job = dataclasses.replace(job, prior_flops={job.before.name: first["train_flops"]})
    settings = job.engine_settings
    log = RoutingLog(every=job.settings.log_every)

    def setup_model(model: Transformer) -> None:
        log.setup(model)

    zero_stage, offload = settings.get("zero_stage", 0), settings.get("offload_optimizer", False)

    def make_engine(model: Transformer, job: TrainJob) -> DeepSpeedEngine:
        return DeepSpeedEngine(model, job.settings, zero_stage=zero_stage, offload_optimizer=offload)

    def make_model(job: TrainJob) -> Transformer:  # ZeRO-3: sharded as it is built
        if zero_stage == 3:
            return build_sharded_model(job, offload_optimizer=offload)
        return build_model(job)  # finetune.zero_stage decides, not train.zero_stage (dense jobs')

    return run_loop(
        job,
        make_engine,
        make_model=make_model,
        setup_model=setup_model,
        on_step=log,
        force=force,
        console=console,
    )


def finetune_command(args) -> int:
    """`btx finetune RECIPE [KEY=VALUE ...] [--model DIR] [--out DIR] [--force]` (arguments: btx.cli)."""

    exp = load_experiment(args.recipe, args.overrides)
    job = finetune_job(exp, model_dir=args.model, out_dir=args.out)
    run_finetune(job, force=args.force)
    return 0
