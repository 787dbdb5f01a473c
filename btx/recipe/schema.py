"""The recipe schema: one dataclass per section, with defaults, and a `check` per section.

A setting is declared here once, with its default and a comment saying what it does, or, when it
is also a command-line flag, with `setting(...)` (btx/recipe/settings.py), whose help is both; its
range goes in the section's `check`, its choices (btx.choices) in the field where it has them.
OmegaConf builds typed configs from these classes, so unknown keys and wrong types are refused at load.
"""

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from btx.choices import (
    ACTIVATION_CHECKPOINTING,
    DENSE_TRAINABLE,
    EVAL_DTYPES,
    EVAL_MATCHES,
    EXECUTORS,
    GENERAL_DOMAIN,
    GRANULARITIES,
    LOGGERS,
    PRECISIONS,
    ROUTER_INITS,
    ROUTER_MODES,
    SHARED_POLICIES,
    TRAINABLE,
    WEIGHT_DTYPES,
)
from btx.errors import BtxError
from btx.recipe.check import Checker, suggest
from btx.recipe.settings import parse_weights, prompt_lists, setting
from btx.recipe.task_entries import check_task_entry
from btx.units import parse_size


@dataclass
class TrainSection:
    """One training job's settings (dense expert training, seed training, MoE finetuning).

    Tokens per optimizer step = batch_size * seq_len * grad_accum * number of data-parallel ranks.
    """

    lr: float = 1e-4  # peak learning rate (paper: 1e-4)
    weight_decay: float = 0.1
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # cosine decay to this fraction of the peak
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    steps: int = 1000  # optimizer steps
    batch_size: int = 8  # sequences per micro-batch, per data-parallel rank
    seq_len: int = 1024
    grad_accum: int = 1
    grad_clip: float = 1.0  # 0 turns clipping off
    precision: str = "auto"  # auto: bf16 where the device has it, else fp32
    checkpoint_every: int = 500  # 0: only the final export
    keep_checkpoints: int = 2  # resumable step-N checkpoints kept on disk
    eval_every: int = 500  # 0: no periodic validation
    eval_batches: int = 20
    log_every: int = 10
    seed: int = 0
    # Dense jobs (seed, experts, baselines): null trains data-parallel with DDP (accelerate); 0-3
    # trains with DeepSpeed ZeRO at that stage. Stage 3 shards weights, gradients and optimizer
    # state over the GPUs, as FSDP does: needed when a replica does not fit (a 7B model with AdamW
    # needs ~112 GB per replica). MoE finetuning uses finetune.zero_stage instead.
    zero_stage: Optional[int] = None
    # Which parameters an expert trains (btx.model.trainable): all (the paper), ffn (only the FFNs: the
    # shared weights stay the seed's, so their merge is exact), ffn_norms (FFNs and norm gains).
    # The seed trains from scratch and the finetune has finetune.trainable: both always train all here.
    trainable: str = "all"
    # Attention stays inside each document of a window (documents end at the tokenizer's EOS) and
    # positions restart at each one, as if every document had its row to itself; the job's
    # validation windows do the same. Off: windows are one causal sequence (the SDPA fast path).
    document_mask: bool = False
    # Recompute activations in the backward instead of keeping them (btx.train.blocks), per block:
    # none; full (each block keeps only its input); selective (each block's attention sublayer is
    # recomputed, the FFN or MoE dispatch keeps its activations: a smaller saving for less
    # recomputation; docs/RECIPES.md has measurements). Same losses and gradients; memory for time.
    activation_checkpointing: str = "none"
    # torch.compile each transformer block on its own (regional, as torchtitan does) and the loss's
    # cross-entropy; the eager model is the reference. Each job's first step is slower (compiling).
    compile: bool = False
    # Where every metrics.jsonl record also goes (main rank only): any of tensorboard (event files in
    # the job's tensorboard/) and wandb (its run in the job's wandb/; WANDB_MODE=offline logs without
    # network). Extras: pip install 'btx[tensorboard]', 'btx[wandb]'. Not part of what a run computes.
    loggers: List[str] = field(default_factory=list)

    # How a job runs, never what it computes: left out of every stage's key (btx.run.stage), so that
    # turning a logger, checkpointing or compile on for a finished run redoes nothing. (compile moves
    # losses by ~1e-6 in fp32, as another number of GPUs would.)
    HOW_IT_RUNS = ("activation_checkpointing", "compile", "loggers")

    def key_view(self) -> dict:
        """What of this section decides a stage's result (btx.run.stage keys on it)."""
        view = {k: v for k, v in dataclasses.asdict(self).items() if k not in self.HOW_IT_RUNS}
        if not self.document_mask:  # keyed only when on: run directories from before it keep their keys
            del view["document_mask"]
        return view

    @property
    def tokens_per_step(self) -> int:
        """Tokens per optimizer step on one data-parallel rank."""
        return self.batch_size * self.seq_len * self.grad_accum

    def check(self, c: Checker) -> None:
        c.positive(self, "lr", "eps", "steps", "batch_size", "seq_len", "grad_accum", "eval_batches", "log_every")
        c.positive(self, "keep_checkpoints")
        c.non_negative(self, "weight_decay", "warmup_steps", "grad_clip", "checkpoint_every", "eval_every", "seed")
        c.that(0.0 <= self.min_lr_ratio <= 1.0, "min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio!r}")
        c.that(
            len(self.betas) == 2 and all(0.0 <= b < 1.0 for b in self.betas),
            "betas",
            f"expected two numbers in [0, 1), got {list(self.betas)!r}",
        )
        c.choice(self, "precision", PRECISIONS)
        c.choice(self, "trainable", DENSE_TRAINABLE)
        c.choice(self, "activation_checkpointing", ACTIVATION_CHECKPOINTING)
        for name in self.loggers:
            c.that(
                name in LOGGERS,
                "loggers",
                f"unknown logger {name!r}; expected any of {', '.join(LOGGERS)}{suggest(str(name), LOGGERS)}",
            )
        c.that(len(set(self.loggers)) == len(self.loggers), "loggers", "a logger listed twice")
        c.that(
            self.zero_stage is None or 0 <= self.zero_stage <= 3,
            "zero_stage",
            f"must be null (DDP), 0, 1, 2 or 3, got {self.zero_stage!r}",
        )


def key_view_with_train(section) -> dict:
    """A section holding a partial `train:` (seed, finetune), without how its jobs run."""
    view = dataclasses.asdict(section)
    view["train"] = {k: v for k, v in view["train"].items() if k not in TrainSection.HOW_IT_RUNS}
    return view


@dataclass
class ModelSection:
    """The architecture of a seed trained from scratch. Mirrors btx.model.config.ModelConfig's dense fields
    (same names, same defaults); the MoE fields come from `merge` and `finetune`."""

    vocab_size: int = 256
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 4
    ffn_dim: int = 172
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Optional[Dict[str, Any]] = None  # Llama-3 style, see btx.model.config.ModelConfig
    max_seq_len: int = 2048
    tie_embeddings: bool = False

    def check(self, c: Checker) -> None:
        c.positive(
            self,
            "vocab_size",
            "dim",
            "n_layers",
            "n_heads",
            "n_kv_heads",
            "ffn_dim",
            "norm_eps",
            "rope_theta",
            "max_seq_len",
        )
        c.that(self.dim % self.n_heads == 0, "dim", f"must be a multiple of n_heads ({self.n_heads}), got {self.dim}")
        c.that(
            self.n_heads % self.n_kv_heads == 0,
            "n_kv_heads",
            f"must divide n_heads ({self.n_heads}), got {self.n_kv_heads}",
        )

    def to_model_config(self, **moe):
        """A btx.model.config.ModelConfig (imports torch); `moe` sets MoE fields such as n_experts."""
        # lazy: loading a recipe (and `btx --help`) imports no torch
        from btx.model.config import ModelConfig

        return ModelConfig(**dataclasses.asdict(self), **moe)


@dataclass
class SeedSection:
    path: Optional[str] = None  # an existing HF dense checkpoint; None: train one from `model:`
    train: Dict[str, Any] = field(default_factory=dict, metadata={"partial": TrainSection})
    mixture: Dict[str, float] = field(default_factory=dict)  # domain weights; empty: all equal

    key_view = key_view_with_train

    def check(self, c: Checker, domains: List[str]) -> None:
        c.weights(self.mixture, "mixture", domains)


@dataclass
class SlurmSection:
    partition: Optional[str] = None
    account: Optional[str] = None
    time: str = "24:00:00"  # quote it in YAML: unquoted 24:00:00 is the number 86400
    nodes: int = 1
    gpus_per_node: int = 8
    cpus_per_task: Optional[int] = None
    mem: Optional[str] = None
    extra_sbatch: List[str] = field(default_factory=list)  # extra '#SBATCH ...' arguments
    setup: List[str] = field(default_factory=list)  # shell lines run before the job (module load, ...)

    def check(self, c: Checker) -> None:
        c.positive(self, "nodes", "cpus_per_task")
        c.non_negative(self, "gpus_per_node")


@dataclass
class BranchSection:
    executor: str = "local"
    max_parallel: Optional[int] = None  # None: as many as the devices allow (one at a time on CPU)
    devices_per_expert: int = 1
    slurm: SlurmSection = field(default_factory=SlurmSection)

    def check(self, c: Checker) -> None:
        c.choice(self, "executor", EXECUTORS)
        c.positive(self, "max_parallel", "devices_per_expert")
        self.slurm.check(c.at("slurm"))


@dataclass
class MergeSection:
    """How the seed and the experts become one MoE (btx/mix/merge.py). Every key is also a flag of
    `btx merge` without a recipe (btx.mix.options.MergeOptions adds the flags only it has)."""

    keep_seed: bool = setting(
        True,
        flag="--no-keep-seed",
        help="the seed's FFN is one more expert and the seed takes part in the average, as in "
        "the paper (--no-keep-seed: neither)",
    )
    weights: Any = setting(
        "uniform",
        flag="--weights",
        metavar="W",
        parse=parse_weights,
        help="averaging of the non-FFN tensors: uniform, tokens (each expert's training tokens, "
        "from its DONE.json; the seed counts as the experts' mean), or a weight per source "
        "(in a recipe {code: 3, seed: 1}; as a flag code=3,seed=1)",
    )
    router_init: str = setting(
        "random",
        flag="--router-init",
        choices=ROUTER_INITS,
        help="random: normal(0, router_std); zeros: uniform routing; centroid: each expert's "
        "mean hidden state on its domain's tokens; ridge: closed-form least squares on "
        "those hidden states (DUME); hidden: its prompts' mean hidden state minus the "
        "others' (prompts)",
    )
    router_std: float = setting(0.02, flag="--router-std", metavar="STD", help="random routers: their std")
    router_seed: int = setting(
        0, flag="--router-seed", metavar="N", help="random routers: their seed (the same seed gives the same routers)"
    )
    router_tokens: int = setting(
        65536,
        flag="--router-tokens",
        metavar="N",
        renamed="centroid_tokens",
        help="centroid and ridge routers: tokens per domain (a recipe's: of its train shard)",
    )
    ridge_lambda: float = setting(
        0.01,
        flag="--ridge-lambda",
        metavar="L",
        help="ridge routers: regularisation relative to the hidden states' mean eigenvalue (btx/mix/router_fit.py)",
    )
    router_scale: float = setting(
        1.0,
        flag="--router-scale",
        metavar="S",
        help="centroid, ridge and hidden routers: the fitted rows times S, an inverse temperature",
    )
    # Prompts are kept whatever router_init is: grow (grow.router_init hidden) and the router-init
    # table (`btx eval --router-inits`) read them too.
    prompts: Dict[str, List[str]] = setting(
        factory=dict,
        flag="--prompt",
        metavar="NAME=TEXT",
        repeat=True,
        parse=prompt_lists,
        help="hidden routers: a positive prompt of expert NAME; repeat (in a recipe {NAME: [TEXT, ...]})",
    )
    negative_prompts: Dict[str, List[str]] = setting(
        factory=dict,
        flag="--negative-prompt",
        metavar="NAME=TEXT",
        repeat=True,
        parse=prompt_lists,
        help="hidden routers: a negative prompt of expert NAME (default: the other experts' prompts)",
    )
    granularity: str = setting(
        "expert",
        flag="--granularity",
        choices=GRANULARITIES,
        help="expert: one expert per FFN; split: each FFN cut into C chunks (N*C experts); "
        "blend: expert c made of chunk c of every FFN",
    )
    chunks: int = setting(
        1, flag="--chunks", metavar="C", help="chunks per FFN (expert: 1; split: C >= 2; blend: C >= 2 experts)"
    )
    top_k: int = setting(2, flag="--top-k", metavar="K", help="experts per token, written to config.json")
    dtype: Optional[str] = setting(
        None, flag="--dtype", choices=WEIGHT_DTYPES, default_help="the inputs'", help="the output's dtype"
    )
    shard_size: str = setting(
        "5GB",
        flag="--shard-size",
        metavar="SIZE",
        help="the output's safetensors shard size, e.g. 5GB, 5G, 2GiB, 500MB or bytes",
    )

    def n_experts(self, n_domains: int) -> int:
        """Experts of the merged model: one per FFN (split: chunks per FFN; blend: one per chunk)."""
        n_ffns = n_domains + (1 if self.keep_seed else 0)
        if self.granularity == "split":
            return n_ffns * self.chunks
        if self.granularity == "blend":
            return self.chunks
        return n_ffns

    @property
    def shard_bytes(self) -> int:
        return parse_size(self.shard_size)

    def check(self, c: Checker, domains: List[str], grow: Optional["GrowSection"] = None) -> None:
        """`domains`: the merged ones; `grow`: the recipe's grow section, whose experts may have prompts."""
        w = self.weights
        if isinstance(w, str):
            c.that(
                w in ("uniform", "tokens"),
                "weights",
                f"expected uniform, tokens or a mapping of weights; got {w!r}{suggest(w, ('uniform', 'tokens'))}",
            )
        elif isinstance(w, dict):
            for name, value in w.items():
                c.that(
                    isinstance(value, (int, float)) and not isinstance(value, bool),
                    f"weights.{name}",
                    f"expected a number, got {value!r}",
                )
            c.weights(w, "weights", list(domains) + (["seed"] if self.keep_seed else []))
        else:
            c.fail("weights", f"expected uniform, tokens or a mapping of weights; got {w!r}")
        c.choices(self)
        c.positive(self, "router_std", "router_tokens", "chunks", "top_k", "ridge_lambda", "router_scale")
        c.non_negative(self, "router_seed")
        grown = list(grow.domains) if grow is not None else []
        experts = list(domains) + grown + (["seed"] if self.keep_seed else [])
        for key in ("prompts", "negative_prompts"):
            given = getattr(self, key)
            for name, texts in given.items():
                c.that(name in experts, f"{key}.{name}", f"not an expert of this merge ({', '.join(experts)})")
                c.that(all(isinstance(t, str) and t for t in texts), f"{key}.{name}", "expected non-empty strings")
        c.that(
            self.router_init != "hidden" or bool(self.prompts),
            "prompts",
            "router_init hidden needs each expert's positive prompts: prompts: {domain: [text, ...]}",
        )
        if self.granularity == "expert":
            c.that(self.chunks == 1, "chunks", f"must be 1 with granularity expert, got {self.chunks}")
        else:
            c.that(self.chunks >= 2, "chunks", f"must be >= 2 with granularity {self.granularity}, got {self.chunks}")
        try:
            c.that(self.shard_bytes > 0, "shard_size", "must be > 0")
        except BtxError as e:
            c.fail("shard_size", str(e))
        if domains:
            n = self.n_experts(len(domains))
            c.that(self.top_k <= n, "top_k", f"must be <= the number of experts ({n}), got {self.top_k}")


@dataclass
class FinetuneSection:
    train: Dict[str, Any] = field(default_factory=dict, metadata={"partial": TrainSection})
    mixture: Dict[str, float] = field(default_factory=dict)  # domain weights; empty: all equal
    router_mode: str = "topk"
    top_k: Optional[int] = None  # None: the merged checkpoint's (merge.top_k)
    capacity_factor: float = 1.5  # switch
    gumbel_rate: float = 1e-4  # sample_top1: temperature max(0.5, exp(-rate * step))
    balance_alpha: float = 0.01  # load-balancing loss weight (paper: 0.01); 0 turns it off
    z_loss: float = 0.0  # router z-loss weight
    trainable: str = "all"
    # The first N steps train only the routers (a separate job, finetune-router/), then the
    # finetune proper runs its finetune.train.steps from there on the batches that follow.
    router_only_steps: int = 0
    zero_stage: int = 0
    offload_optimizer: bool = False
    # A domain recipe of data like the seed's own pretraining data (the paper's "general" 19.23%):
    # prepared into data/general/ with the other domains and sampled in the mixture as "general",
    # but never branched into an expert (the seed, kept as an expert, stands for it).
    general: Optional[str] = None

    key_view = key_view_with_train

    def check(self, c: Checker, domains: List[str]) -> None:
        c.weights(self.mixture, "mixture", domains + ([GENERAL_DOMAIN] if self.general else []))
        c.choice(self, "router_mode", ROUTER_MODES)
        c.choice(self, "trainable", TRAINABLE)
        c.positive(self, "top_k", "capacity_factor")
        c.non_negative(self, "gumbel_rate", "balance_alpha", "z_loss", "router_only_steps")
        c.that(0 <= self.zero_stage <= 3, "zero_stage", f"must be 0, 1, 2 or 3, got {self.zero_stage}")
        c.that(not self.offload_optimizer or self.zero_stage >= 1, "offload_optimizer", "needs zero_stage >= 1")


@dataclass
class GrowSection:
    """Domains added to the finished MoE instead of merged into it (btx/mix/grow.py): `btx run` trains
    their experts, merges and finetunes the other domains as usual, then grows the finetuned MoE by
    these experts into grown/ and, with `steps` > 0, finetunes it briefly into grown-finetuned/.
    The fitted router inits read merge.router_tokens, merge.ridge_lambda, merge.router_scale and
    merge.prompts. router_init, shared and shared_weight are also `btx merge --into`'s
    (btx.mix.options.EditOptions)."""

    domains: List[str] = field(default_factory=list)  # each is also listed in `domains:`
    router_init: str = setting(
        "ridge", choices=ROUTER_INITS, help="the new experts' router rows, by any router init (ridge refits every row)"
    )
    shared: str = setting(
        "keep",
        flag="--shared",
        choices=SHARED_POLICIES,
        help="the shared (non-FFN) weights: keep the MoE's, or average in the new experts'",
    )
    shared_weight: Optional[float] = setting(
        None,
        flag="--shared-weight",
        metavar="W",
        default_help="as much as each expert already there",
        help="shared average: the new experts' weight",
    )
    steps: int = 0  # the finetune after growing; 0: none
    trainable: str = setting("router_only", choices=TRAINABLE, help="what the finetune after growing trains")
    mixture: Dict[str, float] = field(default_factory=dict)  # empty: every domain equally

    def check(self, c: Checker, domains: List[str], merge: "MergeSection") -> None:
        for name in self.domains:
            c.that(name in domains, "domains", f"{name!r} is not a domain of this experiment ({', '.join(domains)})")
        c.that(len(set(self.domains)) == len(self.domains), "domains", "a domain listed twice")
        c.that(
            not self.domains or len(self.domains) < len(domains),
            "domains",
            "at least one domain must be merged before others can be added",
        )
        c.that(
            not self.domains or merge.granularity == "expert",
            "domains",
            f"growing needs whole experts; merge.granularity is {merge.granularity}",
        )
        c.choices(self)
        c.non_negative(self, "steps")
        c.that(self.shared_weight is None or 0 <= self.shared_weight <= 1, "shared_weight", "must be in [0, 1]")
        c.weights(self.mixture, "mixture", domains)
        if self.router_init == "hidden":  # what the grow stage needs (btx.mix.grow_plan), checked at load
            for name in self.domains:
                c.that(
                    name in merge.prompts,
                    "router_init",
                    f"hidden needs merge.prompts.{name} (the prompts of the expert to add)",
                )
                c.that(
                    name in merge.negative_prompts or any(other != name for other in merge.prompts),
                    "router_init",
                    f"hidden needs something to contrast {name!r}'s prompts with: merge.negative_prompts.{name}, "
                    "or merge.prompts of another expert",
                )


DEVICE_KEYS = ("device", "dtype")  # the eval section's keys that are flags of btx eval and btx analyze too


@dataclass
class EvalSection:
    baselines: bool = False  # also train/evaluate dense and sparse-upcycling baselines
    # What the baselines are matched on: compute (their training FLOPs = the experts' + the BTX
    # finetune's), data (exactly the tokens BTX trained on, as the paper's Table 2), or both.
    match: str = "compute"
    batches: int = 50  # validation batches per domain
    batch_size: int = 8
    seq_len: Optional[int] = None  # None: train.seq_len
    # BTM top-k rows (the paper's BTM): experts picked per context by tf-idf similarity to a
    # sample of this many training tokens of each expert's domain (btx.evaluate.btm.TfidfRouter).
    btm_tfidf_tokens: int = 1_000_000
    # Downstream tasks through lm-evaluation-harness (the `eval` extra; docs/TASKS.md), run on every
    # model of the run and the BTM ensembles: task names, or mappings {task: NAME, num_fewshot: N,
    # limit: N (documents; a fraction in (0, 1) for a share), batch_size: N (default eval.batch_size)}.
    tasks: List[Any] = field(default_factory=list)
    # A directory of lm-eval task YAMLs (local tasks), relative to the recipe; a relative
    # data_files path in such a YAML is read relative to the YAML.
    include_path: Optional[str] = None
    # Where and in what precision `btx eval RECIPE` and `btx analyze RECIPE` (and their stages of
    # btx run) run the models; --device and --dtype override them.
    device: Optional[str] = setting(
        None,
        flag="--device",
        metavar="DEVICE",
        default_help="cuda when available, else cpu",
        help="where the models run: cpu, cuda, cuda:1, ...",
    )
    dtype: str = setting(
        "auto",
        flag="--dtype",
        choices=EVAL_DTYPES,
        help="the models' weights dtype; auto: float32 on a CPU (bf16 matmuls are slow there), the "
        "checkpoint's own on a GPU",
    )

    def check(self, c: Checker) -> None:
        c.positive(self, "batches", "batch_size", "seq_len", "btm_tfidf_tokens")
        c.choice(self, "match", EVAL_MATCHES)
        c.choice(self, "dtype", EVAL_DTYPES)
        c.that(
            self.device is None or re.fullmatch(r"cpu|cuda(:\d+)?|mps|xpu(:\d+)?", self.device) is not None,
            "device",
            f"expected cpu, cuda or cuda:N, got {self.device!r}",
        )
        seen = set()
        for i, entry in enumerate(self.tasks):
            name = check_task_entry(entry, c, f"tasks[{i}]")
            c.that(name not in seen, f"tasks[{i}]", f"task {name!r} is listed twice")
            seen.add(name)
        if self.include_path is not None:
            c.that(
                Path(self.include_path).is_dir(),
                "include_path",
                f"{self.include_path}: no such directory (expected a directory of lm-eval task YAMLs)",
            )


@dataclass
class AnalyzeSection:
    tokens: int = 16384  # validation tokens per domain
    show_text: int = 2  # token-level examples coloured by expert, per domain (0: none)

    def check(self, c: Checker) -> None:
        c.positive(self, "tokens")
        c.non_negative(self, "show_text")


@dataclass
class PrepareSection:
    # Tokenizer processes per domain (btx.data.encode). The shards are byte-identical for every
    # value, so it is not part of any stage's key. On a big node: about one per core, less the
    # one that reads and writes.
    workers: int = 1

    def check(self, c: Checker) -> None:
        c.positive(self, "workers")


@dataclass
class ExperimentRecipe:
    """The experiment recipe file."""

    experiment: str = "???"  # required; names the run directory
    base: Optional[str] = None  # another experiment recipe (a path, or a built-in name) this one changes
    run_dir: Optional[str] = None  # default checkpoints/<experiment>, relative to the current directory
    tokenizer: str = "byte"  # "byte" or a tokenizer.json / a directory holding one
    seed: SeedSection = field(default_factory=SeedSection)
    model: Optional[ModelSection] = None  # a seed trained from scratch; None with seed.path
    domains: Dict[str, str] = field(default_factory=dict)  # name -> domain recipe path
    train: TrainSection = field(default_factory=TrainSection)
    branch: BranchSection = field(default_factory=BranchSection)
    merge: MergeSection = field(default_factory=MergeSection)
    finetune: FinetuneSection = field(default_factory=FinetuneSection)
    grow: GrowSection = field(default_factory=GrowSection)
    eval: EvalSection = field(default_factory=EvalSection)
    analyze: AnalyzeSection = field(default_factory=AnalyzeSection)
    prepare: PrepareSection = field(default_factory=PrepareSection)
