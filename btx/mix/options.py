"""What a merge or an MoE edit can be asked to do, and the names both use.

MergeOptions mirrors the recipe's `merge:` section (the schema's defaults are the defaults here)
plus what only the command line gives; EditOptions is `btx merge --into`'s.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from btx.choices import MERGE_DTYPES
from btx.io.layout import TOKENIZER_FILES
from btx.recipe.schema import MergeSection

SEED = "seed"
DTYPES = {name: getattr(torch, name) for name in MERGE_DTYPES}
TEST_DELAY_ENV = "BTX_MERGE_TEST_DELAY"
_CHUNK_BYTES = 32 << 20  # fp32 working set of one averaging / conversion step
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# Tokenizer files whose contents must agree across inputs: everything the checkpoint carries for
# its tokenizer and chat template (generation_config.json may differ).
_TOKENIZER_IDENTITY = tuple(f for f in TOKENIZER_FILES if f != "generation_config.json")
# ModelConfig fields that may differ between seed and experts (everything else must match).
_MAY_DIFFER = ("extra",)
# config.json names of ModelConfig fields, for messages.
_HF_FIELD = {
    "family": "model_type", "dim": "hidden_size", "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
    "n_kv_heads": "num_key_value_heads", "ffn_dim": "intermediate_size", "norm_eps": "rms_norm_eps",
    "max_seq_len": "max_position_embeddings", "tie_embeddings": "tie_word_embeddings",
    "rope_scaling": "rope_parameters", "qkv_bias": "attention_bias", "o_bias": "attention_bias",
}  # fmt: skip

_RECIPE = MergeSection()  # the recipe schema's defaults are the defaults here too


@dataclass
class MergeOptions:
    """How to merge. The recipe's `merge:` section maps onto the first block one to one."""

    keep_seed: bool = _RECIPE.keep_seed
    weights: Any = _RECIPE.weights  # "uniform" | "tokens" | {source name: weight}
    router_init: str = _RECIPE.router_init  # random | zeros | centroid | ridge | hidden
    router_std: float = _RECIPE.router_std
    router_seed: int = _RECIPE.router_seed
    centroid_tokens: int = _RECIPE.centroid_tokens  # per domain, for centroid and ridge
    ridge_lambda: float = _RECIPE.ridge_lambda
    router_scale: float = _RECIPE.router_scale  # fitted inits: rows times this
    prompts: dict = field(default_factory=dict)  # hidden: {expert: [positive prompt, ...]}
    negative_prompts: dict = field(default_factory=dict)  # hidden: {expert: [...]}; default: the others' prompts
    granularity: str = _RECIPE.granularity  # expert | split | blend
    chunks: int | None = None  # split: required; blend: default the number of source FFNs
    top_k: int = _RECIPE.top_k
    dtype: str | None = _RECIPE.dtype  # None: the inputs' dtype (the seed's when they differ)
    shard_size: int | str = _RECIPE.shard_size
    # Not in the recipe section:
    # Written to the MoE's config.json for whoever trains it further with transformers: the
    # recipe's finetune.balance_alpha in recipe mode, the paper's 0.01 otherwise.
    router_aux_loss_coef: float = 0.01
    upcycle: int = 0  # > 0: sparse upcycling into this many copies of the seed
    average_all: bool = False  # Branch-Train-Merge style dense average
    centroid_device: str | None = None  # None: cuda when available, else cpu

    @classmethod
    def from_section(cls, section: MergeSection, **more) -> MergeOptions:
        from btx.recipe.experiment import to_plain

        own = {f.name for f in dataclasses.fields(cls)}
        values = {k: to_plain(getattr(section, k)) for k in own if hasattr(section, k)}
        if values.get("granularity") == "expert":
            values["chunks"] = None
        return cls(**{**values, **more})



GROW_INITS = ("random", "zeros", "centroid", "ridge", "hidden")
SHARED_POLICIES = ("keep", "average")
MAX_SHARED_DISTANCE = 0.5  # relative L2 distance of shared weights above which an expert is foreign
_CHUNK_BYTES = 32 << 20
# ModelConfig fields that describe the MoE, not the architecture a dense expert must share with it.
_MOE_FIELDS = {"n_experts", "top_k", "router_mode", "norm_topk_prob", "shared_expert_dim", "capacity_factor", "moe_form",
               "gumbel_rate", "first_layer_soft", "expert_names", "extra"}


@dataclass
class EditOptions:
    router_init: str = "random"  # the new experts' router rows: random | zeros | centroid | ridge | hidden
    router_std: float | None = None  # random: None = each layer's existing rows' standard deviation
    router_seed: int = 0
    router_tokens: int = 65536  # centroid, ridge: validation tokens per expert
    ridge_lambda: float = 0.01
    router_scale: float = 1.0  # the fitted rows (ridge's; centroid's and hidden's after matching the norm) times this
    prompts: dict = dataclasses.field(default_factory=dict)  # hidden: {expert: [text, ...]}
    negative_prompts: dict = dataclasses.field(default_factory=dict)
    router_device: str | None = None
    shared: str = "keep"  # keep | average
    shared_weight: float | None = None  # average: weight of the new experts' shared weights
    top_k: int | None = None  # None: the MoE's (lowered when fewer experts remain)
    dtype: str | None = None  # None: the MoE's
    shard_size: int | str = "5GB"
