"""Recipes: the typed schema of experiment and domain YAML files, loading, overrides, validation.

An *experiment recipe* describes one BTX run (seed, domains, merge, finetune, eval, analyze); it
names one *domain recipe* per domain (data sources and training overrides for that expert).

    exp = load_experiment("recipes/demo/btx.yaml", ["merge.top_k=1", "train.steps=20"])
    exp.merge.top_k                    # sections are typed dataclasses (attribute access is
    exp.run_dir                        #   delegated to exp.recipe); run_dir is an absolute Path
    exp.domains["code"].train.lr       # per-domain effective training settings
    exp.domains["code"].sources        # resolved data sources (absolute paths, expanded files)
    recipe_hash(exp.merge)             # sha256 of the resolved YAML of what a stage depends on

Rules
- The schema is the dataclasses below; OmegaConf.structured builds the typed config from them.
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
import difflib
import glob
import hashlib
import math
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from btx.errors import BtxError, missing_checkpoint

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
ROUTER_MODES = ("topk", "switch", "soft", "sample_top1")  # the same names as btx.model.ROUTER_MODES
TRAINABLE = ("all", "router_only", "frozen_experts")  # finetune.trainable (btx.trainable.MOE_MODES)
DENSE_TRAINABLE = ("all", "ffn", "ffn_norms")  # train.trainable of an expert (btx.trainable.DENSE_MODES)
EVAL_MATCHES = ("compute", "data", "both")
GENERAL_DOMAIN = "general"  # the data-only domain of finetune.general
ROUTER_INITS = ("random", "zeros", "centroid", "ridge", "hidden")
GRANULARITIES = ("expert", "split", "blend")
EXECUTORS = ("local", "slurm")
MERGE_DTYPES = ("float32", "bfloat16", "float16")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_GLOB_CHARS = re.compile(r"[*?\[]")
# Names the run directory and the merge give meanings of their own, so no domain may take them:
# "seed" is the seed's expert and row, "seed.<i>" and "blend.<i>" are merge expert names, and
# "general" is finetune.general's data-only domain (refused only when that is set).
RESERVED_DOMAINS = ("seed",)
RESERVED_DOMAIN_PREFIXES = ("seed.", "blend.")


# ---------------------------------------------------------------------------------------------
# Value checks. Each section's `check(c)` states its ranges; `c` knows the file and key prefix.
# ---------------------------------------------------------------------------------------------


class Checker:
    """Raises BtxError("<file>: <prefix.key>: <message>") for a value out of range."""

    def __init__(self, label: str, prefix: str = "", origins: Optional[List[tuple]] = None):
        self.label, self.prefix = label, prefix
        self.origins = origins or []  # (dotted key, override text) for keys set on the command line

    def at(self, prefix: str) -> "Checker":
        return Checker(self.label, _join(self.prefix, prefix), self.origins)

    def fail(self, key: str, message: str) -> typing.NoReturn:
        full = _join(self.prefix, key)
        label = self.label
        for okey, text in reversed(self.origins):  # name the override that set this value, if one did
            if okey == full or full.startswith((okey + ".", okey + "[")) or okey.startswith(full + "."):
                label = f"{label} (override {text!r})"
                break
        raise BtxError(f"{label}: {full}: {message}" if full else f"{label}: {message}")

    def that(self, ok: bool, key: str, message: str) -> None:
        if not ok:
            self.fail(key, message)

    def positive(self, obj: Any, *keys: str) -> None:
        for key in keys:
            value = getattr(obj, key)
            self.that(value is None or value > 0, key, f"must be > 0, got {value!r}")

    def non_negative(self, obj: Any, *keys: str) -> None:
        for key in keys:
            value = getattr(obj, key)
            self.that(value is None or value >= 0, key, f"must be >= 0, got {value!r}")

    def choice(self, obj: Any, key: str, options: tuple) -> None:
        value = getattr(obj, key)
        if value is not None and value not in options:
            self.fail(key, f"expected one of {', '.join(map(str, options))}; got {value!r}{_suggest(str(value), options)}")

    def name(self, value: str, key: str) -> None:
        self.that(bool(_NAME_RE.match(value)), key,
                  f"{value!r} is not a usable name (letters, digits, '_', '-', '.'; it names a directory)")

    def weights(self, weights: Dict[str, float], key: str, allowed: Optional[List[str]] = None) -> None:
        for name, w in weights.items():
            if allowed is not None and name not in allowed:
                self.fail(f"{key}.{name}", f"not a domain of this experiment (domains: {', '.join(allowed) or 'none'})"
                          + _suggest(name, allowed))
            self.that(w >= 0, f"{key}.{name}", f"weights must be >= 0, got {w!r}")
        if weights:
            self.that(sum(weights.values()) > 0, key, "weights must sum to more than 0")


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix and key else (prefix or key)


def _suggest(word: str, options) -> str:
    close = difflib.get_close_matches(word, [str(o) for o in options], n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def parse_size(text: str) -> int:
    """'5GB' -> 5_000_000_000, '512MiB' -> 536_870_912, '1000' -> 1000 bytes."""
    m = _SIZE_RE.match(str(text))
    if not m:
        raise ValueError(f"not a size: {text!r} (expected e.g. 5GB, 500MB, 2GiB)")
    number, unit = float(m.group(1)), (m.group(2) or "B").upper()
    power = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[0]]
    base = 1024 if unit.endswith("IB") else 1000
    return int(number * base**power)


# ---------------------------------------------------------------------------------------------
# The schema
# ---------------------------------------------------------------------------------------------


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
    # Which parameters an expert trains (btx.trainable): all (the paper), ffn (only the FFNs: the
    # shared weights stay the seed's, so their merge is exact), ffn_norms (FFNs and norm gains).
    # The seed trains from scratch and the finetune has finetune.trainable: both always train all here.
    trainable: str = "all"

    @property
    def tokens_per_step(self) -> int:
        """Tokens per optimizer step on one data-parallel rank."""
        return self.batch_size * self.seq_len * self.grad_accum

    def check(self, c: Checker) -> None:
        c.positive(self, "lr", "eps", "steps", "batch_size", "seq_len", "grad_accum", "eval_batches", "log_every")
        c.positive(self, "keep_checkpoints")
        c.non_negative(self, "weight_decay", "warmup_steps", "grad_clip", "checkpoint_every", "eval_every", "seed")
        c.that(0.0 <= self.min_lr_ratio <= 1.0, "min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio!r}")
        c.that(len(self.betas) == 2 and all(0.0 <= b < 1.0 for b in self.betas), "betas",
               f"expected two numbers in [0, 1), got {list(self.betas)!r}")
        c.choice(self, "precision", PRECISIONS)
        c.choice(self, "trainable", DENSE_TRAINABLE)
        c.that(self.zero_stage is None or 0 <= self.zero_stage <= 3, "zero_stage",
               f"must be null (DDP), 0, 1, 2 or 3, got {self.zero_stage!r}")


@dataclass
class ModelSection:
    """The architecture of a seed trained from scratch. Mirrors btx.model.ModelConfig's dense fields
    (same names, same defaults); the MoE fields come from `merge` and `finetune`."""

    vocab_size: int = 256
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 4
    ffn_dim: int = 172
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Optional[Dict[str, Any]] = None  # Llama-3 style, see btx.model.ModelConfig
    max_seq_len: int = 2048
    tie_embeddings: bool = False

    def check(self, c: Checker) -> None:
        c.positive(self, "vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "norm_eps",
                   "rope_theta", "max_seq_len")
        c.that(self.dim % self.n_heads == 0, "dim", f"must be a multiple of n_heads ({self.n_heads}), got {self.dim}")
        c.that(self.n_heads % self.n_kv_heads == 0, "n_kv_heads",
               f"must divide n_heads ({self.n_heads}), got {self.n_kv_heads}")

    def to_model_config(self, **moe):
        """A btx.model.ModelConfig (imports torch); `moe` sets MoE fields such as n_experts."""
        from btx.model import ModelConfig

        return ModelConfig(**dataclasses.asdict(self), **moe)


@dataclass
class SeedSection:
    path: Optional[str] = None  # an existing HF dense checkpoint; None: train one from `model:`
    train: Dict[str, Any] = field(default_factory=dict, metadata={"partial": TrainSection})
    mixture: Dict[str, float] = field(default_factory=dict)  # domain weights; empty: all equal

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
    keep_seed: bool = True  # the seed's FFN becomes one more expert (as in the paper)
    # Averaging of the non-FFN weights: "uniform", "tokens" (by training tokens of each expert), or
    # a mapping {domain or "seed": weight}.
    weights: Any = "uniform"
    router_init: str = "random"
    router_std: float = 0.02  # random init
    router_seed: int = 0  # random init: the same seed gives the same routers
    centroid_tokens: int = 65536  # centroid and ridge inits: validation tokens per domain
    ridge_lambda: float = 0.01  # ridge init: λ relative to XᵀX's mean eigenvalue (btx/router_fit.py)
    router_scale: float = 1.0  # centroid, ridge, hidden: the fitted rows times this (an inverse temperature)
    # hidden init: each expert's positive prompts, and optionally its negative ones (default: the
    # other experts' positive prompts); the seed, kept as an expert, may have prompts too. Read by
    # the merge (router_init hidden), by grow (grow.router_init hidden) and by the router-init table.
    prompts: Dict[str, List[str]] = field(default_factory=dict)
    negative_prompts: Dict[str, List[str]] = field(default_factory=dict)
    granularity: str = "expert"  # expert: one FFN per expert; split / blend: chunks of FFNs
    chunks: int = 1
    top_k: int = 2  # written to the merged config (num_experts_per_tok)
    dtype: Optional[str] = None  # None: the seed's dtype
    shard_size: str = "5GB"

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
            c.that(w in ("uniform", "tokens"), "weights",
                   f"expected uniform, tokens or a mapping of weights; got {w!r}{_suggest(w, ('uniform', 'tokens'))}")
        elif isinstance(w, dict):
            for name, value in w.items():
                c.that(isinstance(value, (int, float)) and not isinstance(value, bool), f"weights.{name}",
                       f"expected a number, got {value!r}")
            c.weights(w, "weights", list(domains) + (["seed"] if self.keep_seed else []))
        else:
            c.fail("weights", f"expected uniform, tokens or a mapping of weights; got {w!r}")
        c.choice(self, "router_init", ROUTER_INITS)
        c.choice(self, "granularity", GRANULARITIES)
        c.choice(self, "dtype", MERGE_DTYPES)
        c.positive(self, "router_std", "centroid_tokens", "chunks", "top_k", "ridge_lambda", "router_scale")
        c.non_negative(self, "router_seed")
        # Prompts are kept whatever router_init is: grow and `btx eval --router-inits` use them too.
        grown = list(grow.domains) if grow is not None else []
        experts = list(domains) + grown + (["seed"] if self.keep_seed else [])
        for key in ("prompts", "negative_prompts"):
            given = getattr(self, key)
            for name, texts in given.items():
                c.that(name in experts, f"{key}.{name}", f"not an expert of this merge ({', '.join(experts)})")
                c.that(all(isinstance(t, str) and t for t in texts), f"{key}.{name}", "expected non-empty strings")
        c.that(self.router_init != "hidden" or bool(self.prompts), "prompts",
               "router_init hidden needs each expert's positive prompts: prompts: {domain: [text, ...]}")
        if self.granularity == "expert":
            c.that(self.chunks == 1, "chunks", f"must be 1 with granularity expert, got {self.chunks}")
        else:
            c.that(self.chunks >= 2, "chunks", f"must be >= 2 with granularity {self.granularity}, got {self.chunks}")
        try:
            c.that(self.shard_bytes > 0, "shard_size", "must be > 0")
        except ValueError as e:
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

    def check(self, c: Checker, domains: List[str]) -> None:
        c.weights(self.mixture, "mixture", domains + ([GENERAL_DOMAIN] if self.general else []))
        c.choice(self, "router_mode", ROUTER_MODES)
        c.choice(self, "trainable", TRAINABLE)
        c.positive(self, "top_k", "capacity_factor")
        c.non_negative(self, "gumbel_rate", "balance_alpha", "z_loss", "router_only_steps")
        c.that(0 <= self.zero_stage <= 3, "zero_stage", f"must be 0, 1, 2 or 3, got {self.zero_stage}")
        c.that(not self.offload_optimizer or self.zero_stage >= 1, "offload_optimizer",
               "needs zero_stage >= 1")


@dataclass
class GrowSection:
    """Domains added to the finished MoE instead of merged into it (btx/grow.py): `btx run` trains
    their experts, merges and finetunes the other domains as usual, then grows the finetuned MoE by
    these experts into grown/ and, with `steps` > 0, finetunes it briefly into grown-finetuned/.
    The fitted router inits read merge.centroid_tokens, merge.ridge_lambda, merge.router_scale and
    merge.prompts."""

    domains: List[str] = field(default_factory=list)  # each is also listed in `domains:`
    router_init: str = "ridge"  # the new experts' router rows (ridge refits every row)
    shared: str = "keep"  # keep the MoE's shared weights, or average in the new experts'
    shared_weight: Optional[float] = None  # average: None = as much as each expert already there
    steps: int = 0  # the finetune after growing; 0: none
    trainable: str = "router_only"
    mixture: Dict[str, float] = field(default_factory=dict)  # empty: every domain equally

    def check(self, c: Checker, domains: List[str], merge: "MergeSection") -> None:
        for name in self.domains:
            c.that(name in domains, "domains", f"{name!r} is not a domain of this experiment ({', '.join(domains)})")
        c.that(len(set(self.domains)) == len(self.domains), "domains", "a domain listed twice")
        c.that(not self.domains or len(self.domains) < len(domains), "domains",
               "at least one domain must be merged before others can be added")
        c.that(not self.domains or merge.granularity == "expert", "domains",
               f"growing needs whole experts; merge.granularity is {merge.granularity}")
        c.choice(self, "router_init", ROUTER_INITS)
        c.choice(self, "shared", ("keep", "average"))
        c.choice(self, "trainable", TRAINABLE)
        c.non_negative(self, "steps")
        c.that(self.shared_weight is None or 0 <= self.shared_weight <= 1, "shared_weight", "must be in [0, 1]")
        c.weights(self.mixture, "mixture", domains)
        if self.router_init == "hidden":
            for name in self.domains:
                c.that(name in merge.prompts, "router_init",
                       f"hidden needs merge.prompts.{name} (the prompts of the expert to add)")


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
    # sample of this many training tokens of each expert's domain (btx.evaluate.TfidfRouter).
    btm_tfidf_tokens: int = 1_000_000

    def check(self, c: Checker) -> None:
        c.positive(self, "batches", "batch_size", "seq_len", "btm_tfidf_tokens")
        c.choice(self, "match", EVAL_MATCHES)


@dataclass
class AnalyzeSection:
    tokens: int = 16384  # validation tokens per domain
    show_text: int = 2  # token-level examples coloured by expert, per domain (0: none)

    def check(self, c: Checker) -> None:
        c.positive(self, "tokens")
        c.non_negative(self, "show_text")


@dataclass
class ExperimentRecipe:
    """The experiment recipe file."""

    experiment: str = "???"  # required; names the run directory
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


@dataclass
class DataSection:
    # Files, directories or globs (relative to the domain recipe), or mappings {path, glob,
    # text_field}. Directories are read recursively (hidden files skipped). A `.jsonl` file holds one
    # JSON document per line (its text under `text_field`); any other file is one text document.
    sources: List[Any] = field(default_factory=list)
    builtin: Optional[str] = None  # a named built-in corpus (btx.corpora: the demo's)
    builtin_bytes: int = 2_000_000  # how much of the built-in corpus to take
    val_fraction: float = 0.05  # share of documents held out for validation
    text_field: str = "text"  # jsonl: the field holding the document text
    seed: int = 0  # keys the train/val split (independent of the training seed)

    def check(self, c: Checker) -> None:
        c.that(0.0 < self.val_fraction < 1.0, "val_fraction", f"must be in (0, 1), got {self.val_fraction!r}")
        c.positive(self, "builtin_bytes")
        c.non_negative(self, "seed")
        c.that(bool(self.sources) or self.builtin is not None, "sources",
               "a domain needs data: give data.sources or data.builtin")
        if self.builtin is not None:
            from btx.corpora import BUILTIN_CORPORA

            c.that(self.builtin in BUILTIN_CORPORA, "builtin",
                   f"unknown built-in corpus {self.builtin!r}; expected one of {', '.join(sorted(BUILTIN_CORPORA))}"
                   + _suggest(self.builtin, BUILTIN_CORPORA))


@dataclass
class DomainRecipe:
    """One domain recipe file."""

    name: Optional[str] = None  # default: the name the experiment gives it (or the file's stem)
    data: DataSection = field(default_factory=DataSection)
    train: Dict[str, Any] = field(default_factory=dict, metadata={"partial": TrainSection})


# ---------------------------------------------------------------------------------------------
# Loaded objects
# ---------------------------------------------------------------------------------------------


@dataclass
class Source:
    """One data source, resolved: `files` are the existing files it stands for, sorted."""

    path: Path  # a file, a directory, or (for a glob written in the path) the pattern itself
    glob: Optional[str]  # the mapping form's glob, applied inside the directory `path`
    text_field: str
    files: List[Path]

    def specs(self) -> List[Dict[str, Any]]:
        """Source specs for btx.data.prepare_domain."""
        if self.glob is None and _GLOB_CHARS.search(str(self.path)):
            return [{"path": str(f), "text_field": self.text_field} for f in self.files]
        spec: Dict[str, Any] = {"path": str(self.path), "text_field": self.text_field}
        if self.glob is not None:
            spec["glob"] = self.glob
        return [spec]


@dataclass
class Domain:
    name: str
    path: Optional[Path]  # the domain recipe file
    recipe: DomainRecipe
    sources: List[Source]
    train: TrainSection  # effective: experiment train + this domain's train + command-line train.*

    @property
    def data(self) -> DataSection:
        return self.recipe.data

    @property
    def files(self) -> List[Path]:
        return [f for s in self.sources for f in s.files]


@dataclass
class Experiment:
    """A loaded, validated experiment. Attribute access falls through to the recipe sections
    (`exp.merge.top_k`, `exp.finetune.router_mode`, ...)."""

    path: Path  # the experiment recipe file
    recipe: ExperimentRecipe
    domains: Dict[str, Domain]  # in recipe order
    run_dir: Path  # absolute
    seed_train: TrainSection  # effective settings of the from-scratch seed job
    finetune_train: TrainSection  # effective settings of MoE finetuning
    overrides: List[str] = field(default_factory=list)
    general: Optional[Domain] = None  # finetune.general: data only, no expert

    @property
    def data_domains(self) -> Dict[str, Domain]:
        """Every domain with data to prepare: the experts' domains, then the general one."""
        return {**self.domains, **({GENERAL_DOMAIN: self.general} if self.general is not None else {})}

    def __getattr__(self, name: str):
        if name.startswith("__") or name == "recipe":
            raise AttributeError(name)
        return getattr(self.recipe, name)

    @property
    def name(self) -> str:
        return self.recipe.experiment

    @property
    def seed_dir(self) -> Path:
        """The dense seed checkpoint: seed.path, or the seed this run trains (<run_dir>/seed)."""
        return Path(self.recipe.seed.path) if self.recipe.seed.path is not None else self.run_dir / "seed"

    @property
    def merged_domains(self) -> list[str]:
        """The domains merged into the MoE: all, but those grow.domains adds to it afterwards."""
        return [d for d in self.domains if d not in self.recipe.grow.domains]

    def data_dir(self, domain: str) -> Path:
        return self.run_dir / "data" / domain

    def expert_dir(self, domain: str) -> Path:
        return self.run_dir / "experts" / domain

    def to_yaml(self) -> str:
        return to_yaml(self.recipe)


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def load_experiment(path: str | os.PathLike, overrides: Optional[List[str]] = None) -> Experiment:
    """Load, resolve and validate an experiment recipe and every domain recipe it names. `path` is
    a recipe file, or the name of a recipe btx ships (`demo`; see `btx recipes`)."""
    path = resolve_recipe(path)
    overrides = list(overrides or [])
    label = _label(path, overrides)
    raw = _read_yaml(path)
    _typecheck(raw, ExperimentRecipe, str(path), "")
    _resolve_paths(raw, _EXPERIMENT_PATHS, path.parent)
    override_dicts = _parse_overrides(overrides, ExperimentRecipe, str(path))
    for od in override_dicts:
        _resolve_paths(od, _EXPERIMENT_PATHS, Path.cwd())
        _deep_merge(raw, od)
    recipe: ExperimentRecipe = _build(ExperimentRecipe, raw, label, overrides)

    c = Checker(label, origins=_origins(overrides))
    c.name(recipe.experiment, "experiment")
    if recipe.run_dir is None:
        recipe.run_dir = str(Path("checkpoints") / recipe.experiment)
    if recipe.tokenizer != "byte":
        c.that(Path(recipe.tokenizer).exists(), "tokenizer", f"{recipe.tokenizer}: no such file or directory "
               "(expected 'byte', a tokenizer.json or a directory holding one)")
    if recipe.seed.path is not None:
        c.that(recipe.model is None, "model",
               "give either seed.path (an existing checkpoint) or model (a seed trained from scratch), not both")
        if not Path(recipe.seed.path).is_dir():
            c.fail("seed.path", missing_checkpoint(recipe.seed.path, _written_path(recipe.seed.path, path.parent)))
    elif recipe.model is None:
        c.fail("seed", "give seed.path (an existing dense checkpoint) or a model section (a seed trained from scratch)")
    if recipe.model is not None:
        recipe.model.check(c.at("model"))
        if recipe.tokenizer == "byte":
            from btx.tokenizer import ByteTokenizer

            c.that(recipe.model.vocab_size >= ByteTokenizer.vocab_size, "model.vocab_size",
                   f"the byte tokenizer needs vocab_size >= {ByteTokenizer.vocab_size}, got {recipe.model.vocab_size}")
    c.that(bool(recipe.domains), "domains", "an experiment needs at least one domain (domains: {name: recipe.yaml})")
    names = list(recipe.domains)
    folded: Dict[str, str] = {}
    for name in names:
        c.name(name, f"domains.{name}")
        c.that(name not in RESERVED_DOMAINS, f"domains.{name}", f"{name!r} is reserved: it names the seed's expert "
               "in the merged MoE and the seed's row in eval tables; rename this domain")
        c.that(not name.startswith(RESERVED_DOMAIN_PREFIXES), f"domains.{name}",
               f"{name!r} is reserved: merge names its experts seed.<i> and blend.<i>; rename this domain")
        c.that(name.lower() not in folded, f"domains.{name}",
               f"differs from domain {folded.get(name.lower())!r} only in case; on a case-insensitive file "
               "system both would share one directory")
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
    finetune_train = _effective_train(recipe.train, recipe.finetune.train, cli_train, cli_finetune,
                                      c.at("finetune.train"))
    # train.trainable is the experts'; the seed trains from scratch and the finetune has its own key.
    for key, own, why in (("seed.train", {**recipe.seed.train, **cli_seed}, "the seed trains from scratch, "
                           "so all of it trains (train.trainable applies to the experts)"),
                          ("finetune.train", {**recipe.finetune.train, **cli_finetune},
                           "the MoE finetune's is finetune.trainable (all, router_only, frozen_experts)")):
        c.that(own.get("trainable", "all") == "all", f"{key}.trainable", why)
    seed_train = dataclasses.replace(seed_train, trainable="all")
    finetune_train = dataclasses.replace(finetune_train, trainable="all")
    domains: Dict[str, Domain] = {}
    for name, domain_path in recipe.domains.items():
        dpath = Path(domain_path)
        c.that(dpath.is_file(), f"domains.{name}", f"{domain_path}: no such domain recipe file")
        domains[name] = load_domain(dpath, base_train=recipe.train, name=name, cli_train=cli_train)
    general = None
    if recipe.finetune.general is not None:
        c.that(GENERAL_DOMAIN not in domains, f"domains.{GENERAL_DOMAIN}",
               f"'{GENERAL_DOMAIN}' names finetune.general's data-only domain; rename this expert's domain")
        gpath = Path(recipe.finetune.general)
        c.that(gpath.is_file(), "finetune.general", f"{gpath}: no such domain recipe file")
        general = load_domain(gpath, base_train=recipe.train, name=GENERAL_DOMAIN, cli_train=cli_train)

    return Experiment(path=path, recipe=recipe, domains=domains, run_dir=Path(recipe.run_dir).absolute(),
                      seed_train=seed_train, finetune_train=finetune_train, overrides=overrides, general=general)


def load_domain(path: str | os.PathLike, overrides: Optional[List[str]] = None, *,
                base_train: Optional[TrainSection] = None, name: Optional[str] = None,
                cli_train: Optional[Dict[str, Any]] = None) -> Domain:
    """Load and validate one domain recipe. `base_train` holds the experiment's training defaults
    (TrainSection() when the domain stands alone); the domain's `train:` overrides them."""
    path = Path(path)
    overrides = list(overrides or [])
    label = _label(path, overrides)
    raw = _read_yaml(path)
    _typecheck(raw, DomainRecipe, str(path), "")
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
    sources = [_source(s, recipe.data, c, i) for i, s in enumerate(recipe.data.sources)]
    train = _effective_train(base_train or TrainSection(), recipe.train, cli_train or {},
                             _cli_keys(override_dicts, "train"), c.at("train"))
    return Domain(name=recipe.name, path=path, recipe=recipe, sources=sources, train=train)


# ---------------------------------------------------------------------------------------------
# Hashing and printing
# ---------------------------------------------------------------------------------------------


def to_plain(obj: Any) -> Any:
    """Dataclasses, OmegaConf nodes, Paths, tuples -> plain dicts, lists, strings and numbers."""
    if isinstance(obj, Experiment):
        return to_plain(obj.recipe)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if OmegaConf.is_config(obj):
        return to_plain(OmegaConf.to_container(obj, resolve=True))
    if isinstance(obj, dict):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return obj


def to_yaml(obj: Any, sort_keys: bool = False) -> str:
    """The resolved YAML of a recipe, a section, an Experiment or a Domain."""
    return yaml.safe_dump(to_plain(obj), sort_keys=sort_keys, default_flow_style=False, allow_unicode=True)


def recipe_hash(section: Any) -> str:
    """sha256 (hex) of the resolved YAML (sorted keys) of what a stage depends on: pass the
    sections, or a dict of them ({"merge": exp.merge, "experts": [...]}), for DONE.json."""
    return hashlib.sha256(to_yaml(section, sort_keys=True).encode()).hexdigest()


def builtin_recipes_dir() -> Path:
    """The recipes shipped with btx: `recipes/` in a source checkout or editable install,
    `btx/_recipes/` in a wheel (pyproject.toml maps one onto the other)."""
    package = Path(__file__).resolve().parent
    for candidate in (package / "_recipes", package.parent / "recipes"):
        if candidate.is_dir():
            return candidate
    raise BtxError(f"{package}: btx's built-in recipes are missing from this installation")


def resolve_recipe(spec: str | os.PathLike) -> Path:
    """A recipe file as given, or, when no such file exists and `spec` is a bare name, the built-in
    recipe of that name (recipes/<name>/btx.yaml), so `btx run demo` works from a wheel too."""
    path = Path(spec)
    if path.exists() or os.sep in str(spec) or path.suffix in (".yaml", ".yml"):
        return path
    shipped = builtin_recipes_dir() / str(spec) / "btx.yaml"
    return shipped if shipped.is_file() else path


def builtin_recipes() -> Dict[str, str]:
    """{name: first line of its description} for every recipe btx ships."""
    out = {}
    for path in sorted(builtin_recipes_dir().glob("*/btx.yaml")):
        paragraph = []
        for line in path.read_text().splitlines():
            if not line.startswith("#") or not line.strip("# "):
                break
            paragraph.append(line.lstrip("#").strip())
        text = " ".join(paragraph)
        out[path.parent.name] = re.split(r"\.\s+(?=[A-Z])", text)[0].rstrip(".") + "." if text else ""
    return out


def builtin_recipe(name: str) -> Path:
    """`builtin_recipe("demo")` -> the demo's experiment recipe (recipes/demo/btx.yaml)."""
    path = builtin_recipes_dir() / name / "btx.yaml"
    if not path.is_file():
        available = sorted(p.parent.name for p in builtin_recipes_dir().glob("*/btx.yaml"))
        raise BtxError(f"{name}: no built-in recipe of that name (available: {', '.join(available) or 'none'})"
                       + _suggest(name, available))
    return path


# ---------------------------------------------------------------------------------------------
# Internals
# ---------------------------------------------------------------------------------------------

# Keys holding input paths, which resolve relative to the recipe file (or the CWD for overrides).
_EXPERIMENT_PATHS = ("seed.path", "tokenizer", "domains.*", "finetune.general")


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
            names = sorted(p.parent.name for p in builtin_recipes_dir().glob("*/btx.yaml"))
            hint = f" and no built-in recipe of that name (built-in: {', '.join(names)}{_suggest(str(path), names)})"
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
        raise BtxError(f"{path}: {_first_line(e)}") from None
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
            raise BtxError(f"{label}: cannot parse ({_first_line(e)})") from None
        _typecheck(d, schema, label, "")
        out.append(d)
    return out


def _first_line(e: BaseException) -> str:
    text = str(getattr(e, "msg", None) or e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _is_interpolation(value: Any) -> bool:
    return isinstance(value, str) and "${" in value


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}" if value is not None else "null"


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " or null"
    if origin in (dict, Dict):
        return "a mapping"
    if origin in (list, List):
        return "a list"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def _typecheck(value: Any, tp: Any, label: str, key: str, partial: Optional[type] = None) -> None:
    """Check a plain YAML value against a schema type; unknown keys and wrong types are errors."""
    if _is_interpolation(value) or tp is Any:
        return
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    fail = lambda msg: _raise(label, key, msg)  # noqa: E731

    if partial is not None:  # a Dict[str, Any] that overrides some keys of `partial`
        if not isinstance(value, dict):
            fail(f"expected a mapping of {partial.__name__} keys, got {_describe(value)}")
        _typecheck_fields(value, partial, label, key)
        return
    if origin is typing.Union:
        if value is None and type(None) in args:
            return
        inner = [a for a in args if a is not type(None)]
        if value is None:
            fail(f"expected {_type_name(tp)}, got null")
        _typecheck(value, inner[0], label, key)
        return
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            fail(f"expected a mapping, got {_describe(value)}")
        _typecheck_fields(value, tp, label, key)
        return
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            fail(f"expected a mapping, got {_describe(value)}")
        for k, v in value.items():
            if not isinstance(k, str):
                _raise(label, _join(key, str(k)), f"keys must be strings, got {_describe(k)} (quote it)")
            _typecheck(v, args[1] if args else Any, label, _join(key, k))
        return
    if origin in (list, List):
        if not isinstance(value, list):
            fail(f"expected a list, got {_describe(value)}")
        for i, v in enumerate(value):
            _typecheck(v, args[0] if args else Any, label, f"{key}[{i}]")
        return
    if value is None:
        fail(f"expected {_type_name(tp)}, got null")
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif tp is str:
        ok = isinstance(value, str)
        if not ok and isinstance(value, (int, float)) and not isinstance(value, bool):
            fail(f"expected a string, got {_describe(value)} (quote the value)")
    else:
        ok = True
    if not ok:
        fail(f"expected {_type_name(tp)}, got {_describe(value)}")


def _typecheck_fields(value: dict, schema: type, label: str, key: str) -> None:
    fields = {f.name: f for f in dataclasses.fields(schema)}
    hints = typing.get_type_hints(schema)
    for k, v in value.items():
        if k not in fields:
            _raise(label, _join(key, str(k)), f"unknown key{_suggest(str(k), fields)}")
        _typecheck(v, hints[k], label, _join(key, k), partial=fields[k].metadata.get("partial"))


def _raise(label: str, key: str, msg: str) -> typing.NoReturn:
    raise BtxError(f"{label}: {key}: {msg}" if key else f"{label}: {msg}")


def _build(schema: type, raw: dict, label: str, overrides: List[str]):
    """raw (already type-checked) -> a schema dataclass instance, through OmegaConf.structured."""
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(schema), raw)
        OmegaConf.resolve(cfg)
        obj = OmegaConf.to_object(cfg)
    except MissingMandatoryValue as e:
        Checker(label, origins=_origins(overrides)).fail(str(getattr(e, "full_key", None) or "?"),
                                                         "missing (this key is required)")
    except OmegaConfBaseException as e:
        Checker(label, origins=_origins(overrides)).fail(str(getattr(e, "full_key", None) or ""), _first_line(e))
    # Interpolated values are converted by OmegaConf after our type check; check them again here.
    plain = to_plain(obj)
    _typecheck(plain, schema, label, "")
    _check_finite(plain, Checker(label, origins=_origins(overrides)), "")
    return obj


def _check_finite(value: Any, c: Checker, key: str) -> None:
    """Every number in a recipe is finite: YAML's .inf / .nan (or 1e999) would reach training
    and JSON manifests, which cannot hold them."""
    if isinstance(value, float) and not math.isfinite(value):
        c.fail(key, f"must be a finite number, got {value!r}")
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_finite(v, c, _join(key, str(k)))
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
    if not isinstance(value, str) or _is_interpolation(value):
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
        if isinstance(s, str):
            sources[i] = _abs(s, root)
        elif isinstance(s, dict) and "path" in s:
            s["path"] = _abs(s["path"], root)


_SOURCE_KEYS = ("path", "glob", "text_field")


def _source(spec: Any, data: DataSection, c: Checker, i: int) -> Source:
    key = f"data.sources[{i}]"
    if isinstance(spec, str):
        spec = {"path": spec}
    if not isinstance(spec, dict):
        c.fail(key, f"expected a path or a mapping {{path, glob, text_field}}, got {_describe(spec)}")
    for k, v in spec.items():
        if k not in _SOURCE_KEYS:
            c.fail(f"{key}.{k}", f"unknown key{_suggest(str(k), _SOURCE_KEYS)}")
        if not isinstance(v, str):
            c.fail(f"{key}.{k}", f"expected a string, got {_describe(v)}")
    if "path" not in spec:
        c.fail(key, "missing path")
    path = Path(spec["path"])
    pattern = spec.get("glob")
    if pattern is not None:
        if not path.is_dir():
            c.fail(f"{key}.path", f"{path}: no such directory")
        files = sorted(p for p in path.glob(pattern)
                       if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts))
    elif _GLOB_CHARS.search(str(path)):
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*")
                       if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts))
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


def _effective_train(base: TrainSection, own: Dict[str, Any], cli_train: Dict[str, Any],
                     cli_own: Dict[str, Any], c: Checker) -> TrainSection:
    """base <- the job's own train keys <- command-line train.* <- command-line <job>.train.*"""
    merged = {**own, **cli_train, **cli_own}
    if not merged:
        return dataclasses.replace(base, betas=list(base.betas))
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(base), merged)
        result = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or ""
        c.fail(key, _first_line(e))
    result.check(c)
    return result
