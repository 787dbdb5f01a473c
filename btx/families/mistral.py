"""Mistral: `MistralForCausalLM` seeds (Mistral 7B, Nemo, Small, ...), merged into `MixtralForCausalLM`.

config.json fields beyond the common ones (btx/families/__init__.py):
    sliding_window   -> sliding_window for every layer (null: full attention). A token attends to
                        itself and the sliding_window - 1 tokens before it, as transformers' mask
                        does; btx's training, eval and analyze compute the same.
    head_dim         -> head_dim (explicit in Mistral Nemo: 128 with hidden_size 5120, 32 heads)

MoE form: Mixtral, which has the same `sliding_window` field, so the window carries over exactly.
"""

from btx.families.base import Family, Form, integer
from btx.families.mixtral import MIXTRAL


class MistralForm(Form):
    model_type = "mistral"
    architecture = "MistralForCausalLM"
    rope_theta = 10000.0
    norm_eps = 1e-6
    max_positions = 4096 * 32
    fields = frozenset({"sliding_window"})

    def read(self, hf, src):
        return {"sliding_window": integer(hf, "sliding_window", src, None, minimum=1)}

    def write(self, cfg):
        return {"sliding_window": cfg.sliding_window}

    def unsupported(self, cfg):
        return MIXTRAL.unsupported(cfg)  # the same layout, dense


FAMILY = Family(
    name="mistral",
    dense=MistralForm(),
    moe=MIXTRAL,
    summary="MistralForCausalLM (sliding window) -> MixtralForCausalLM",
)
