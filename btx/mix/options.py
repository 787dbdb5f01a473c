"""What a merge or an MoE edit can be asked to do, and the names both use.

MergeOptions is the recipe's `merge:` section (btx.recipe.schema.MergeSection: every key, with its
default and help) plus the settings only the command line gives; EditOptions (`btx merge --into`,
and a recipe's grow stage) takes the merge's router and output settings under the same names and
grow:'s own. Every field is a flag of `btx merge` (btx.recipe.settings), so no flag is listed
anywhere else. No torch here: the command line builds its flags from these classes at startup.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Dict, List, Optional

from btx.errors import BtxError
from btx.recipe.schema import GrowSection, MergeSection
from btx.recipe.settings import like, setting

SEED = "seed"
TEST_DELAY_ENV = "BTX_MERGE_TEST_DELAY"
CHUNK_BYTES = 32 << 20  # fp32 working set of one averaging / conversion step
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# ModelConfig fields that may differ between seed and experts (everything else must match).
MAY_DIFFER = ("extra",)
# config.json names of ModelConfig fields, for messages.
HF_FIELD = {
    "family": "model_type", "dim": "hidden_size", "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
    "n_kv_heads": "num_key_value_heads", "ffn_dim": "intermediate_size", "norm_eps": "rms_norm_eps",
    "max_seq_len": "max_position_embeddings", "tie_embeddings": "tie_word_embeddings",
    "rope_scaling": "rope_parameters", "qkv_bias": "attention_bias", "o_bias": "attention_bias",
}  # fmt: skip


def config_key(field: str, theirs_hf: dict, ours_hf: dict, theirs, ours) -> tuple[str, object, object]:
    """How a message names a ModelConfig field that differs between two checkpoints: its
    config.json key and values where it has one, else (a switch the family implies, such as
    qk_norm) the two config.json files' model_type."""
    if field in HF_FIELD and field != "family":  # a family is named by its config.json's model_type
        return HF_FIELD[field], theirs, ours
    if field in ("vocab_size", "rope_theta", "sliding_window", "head_dim"):
        return field, theirs, ours
    return "model_type", theirs_hf.get("model_type"), ours_hf.get("model_type")


@dataclass
class MergeOptions(MergeSection):
    """How to merge: every key of the recipe's merge: section, then what only the command line gives."""

    # A recipe always gives chunks; without one, blend's default is one expert per source FFN.
    chunks: Optional[int] = like(
        MergeSection, "chunks", default=None, default_help="split: required; blend: the number of source FFNs"
    )
    # A recipe's merge writes its finetune.balance_alpha here.
    router_aux_loss_coef: float = setting(
        0.01,
        flag="--router-aux-loss-coef",
        metavar="A",
        help="the load-balancing loss weight written to config.json, for whoever "
        "trains the MoE further with transformers",
    )
    upcycle: int = setting(
        0, flag="--upcycle", metavar="N", help="sparse upcycling: N experts, all copies of the seed (no --expert)"
    )
    average_all: bool = setting(
        False,
        flag="--average-all",
        help="Branch-Train-Merge style: average every tensor (FFNs too) into a dense model like the seed",
    )
    router_device: Optional[str] = setting(
        None,
        flag="--router-device",
        metavar="DEV",
        renamed="centroid_device",
        default_help="cuda if any",
        help="device of the pass that fits centroid, ridge or hidden routers",
    )

    @classmethod
    def from_section(cls, section: MergeSection, **more) -> MergeOptions:
        """Every key of `section`, then `more`. An expert merge's chunks is None, as without a recipe,
        so that a recipe's merge and the same merge from flags record the same options."""
        values = {f.name: copy.deepcopy(getattr(section, f.name)) for f in dataclasses.fields(MergeSection)}
        if values["granularity"] == "expert":
            values["chunks"] = None
        return cls(**{**values, **more})


MAX_SHARED_DISTANCE = 0.5  # relative L2 distance of shared weights above which an expert is foreign
# ModelConfig fields that describe the MoE, not the architecture a dense expert must share with it.
MOE_FIELDS = {
    "n_experts",
    "top_k",
    "router_mode",
    "norm_topk_prob",
    "shared_expert_dim",
    "capacity_factor",
    "moe_form",
    "gumbel_rate",
    "first_layer_soft",
    "expert_names",
    "extra",
}


# grow: keys that the run's grow stage reads itself; every other grow: key is an edit setting.
GROW_STAGE_KEYS = ("domains", "steps", "trainable", "mixture")
# merge: keys that a recipe's grow takes too: one token budget and one set of prompts per experiment.
FROM_MERGE = ("router_tokens", "ridge_lambda", "router_scale", "prompts", "negative_prompts")


@dataclass
class EditOptions:
    """How to edit a finished MoE: the merge's settings of the same names (flag, help, default), and
    grow:'s `shared` and `shared_weight`. Only the defaults where an edit keeps what the MoE has differ."""

    router_init: str = like(MergeOptions, "router_init")  # a recipe's grow: grow.router_init
    router_std: Optional[float] = like(
        MergeOptions, "router_std", default=None, default_help="each layer's existing rows' std"
    )
    router_seed: int = like(MergeOptions, "router_seed")
    router_tokens: int = like(MergeOptions, "router_tokens")
    ridge_lambda: float = like(MergeOptions, "ridge_lambda")
    router_scale: float = like(MergeOptions, "router_scale")
    prompts: Dict[str, List[str]] = like(MergeOptions, "prompts")
    negative_prompts: Dict[str, List[str]] = like(MergeOptions, "negative_prompts")
    router_device: Optional[str] = like(MergeOptions, "router_device")
    shared: str = like(GrowSection, "shared")
    shared_weight: Optional[float] = like(GrowSection, "shared_weight")
    top_k: Optional[int] = like(
        MergeOptions, "top_k", default=None, default_help="the MoE's, lowered when fewer experts remain"
    )
    dtype: Optional[str] = like(MergeOptions, "dtype", default_help="the MoE's")
    shard_size: str = like(MergeOptions, "shard_size")

    @classmethod
    def from_sections(cls, grow: GrowSection, merge: MergeSection, experts: List[str]) -> EditOptions:
        """A recipe's grow: every grow: key but GROW_STAGE_KEYS, and the merge: keys in FROM_MERGE.
        Prompts (kept by the recipe for every use) only for a hidden init, and only of `experts`."""
        own = {f.name for f in dataclasses.fields(cls)}
        stray = [f.name for f in dataclasses.fields(GrowSection) if f.name not in own | set(GROW_STAGE_KEYS)]
        if stray:
            raise TypeError(f"grow.{stray[0]} is neither an EditOptions field nor one of GROW_STAGE_KEYS")
        values = {name: copy.deepcopy(getattr(grow, name)) for name in own if hasattr(grow, name)}
        values |= {name: copy.deepcopy(getattr(merge, name)) for name in FROM_MERGE}
        hidden = values["router_init"] == "hidden"
        for key in ("prompts", "negative_prompts"):
            values[key] = {k: list(v) for k, v in values[key].items() if k in experts} if hidden else {}
        return cls(**values)


# The numbers a merge and an edit share, with what each must be. None (an edit's "keep the MoE's")
# passes; 0 is refused, never read as "the default".
_COUNTS = ("router_tokens", "top_k")
_POSITIVE = ("router_std", "ridge_lambda", "router_scale")


def check_shared_numbers(o: MergeOptions | EditOptions, command: str) -> None:
    """The one check of the router and routing numbers that `btx merge` and `btx merge --into`
    (and a recipe's grow stage) share: counts are integers >= 1, the rest positive finite numbers."""
    for key in _COUNTS:
        value = getattr(o, key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise BtxError(f"{command}: {key} must be an integer >= 1, got {value!r}")
    for key in _POSITIVE:
        value = getattr(o, key)
        if value is not None and not (
            isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 and math.isfinite(value)
        ):
            raise BtxError(f"{command}: {key} must be a positive number, got {value!r}")
