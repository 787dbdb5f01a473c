"""btx's model against transformers' LlamaForCausalLM and MixtralForCausalLM, through real checkpoints.

Weights go both ways: written by btx and loaded by transformers, and written by transformers'
`save_pretrained` and loaded by btx. Logits must agree within 1e-5 in fp32.
"""

import pytest
import torch

from btx.io.checkpoint import load_model, save_model
from btx.io.layout import config_to_hf
from btx.model.config import ModelConfig
from btx.model.transformer import Transformer

CONFIGS = {
    "mha-untied": dict(n_heads=4, n_kv_heads=4, tie_embeddings=False, rope_theta=10000.0),
    "gqa-tied": dict(n_heads=4, n_kv_heads=2, tie_embeddings=True, rope_theta=500000.0),
    "mqa-theta": dict(n_heads=4, n_kv_heads=1, tie_embeddings=False, rope_theta=1234.5),
    "llama3-scaling": dict(
        n_heads=4,
        n_kv_heads=2,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    ),
}


def make_cfg(name: str, **moe) -> ModelConfig:
    return ModelConfig(
        vocab_size=100, dim=32, n_layers=2, ffn_dim=64, max_seq_len=64, norm_eps=1e-6, **CONFIGS[name], **moe
    )


def random_model(cfg: ModelConfig, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(cfg)
    model.init_weights(std=0.1)
    with torch.no_grad():  # norms away from 1 so that a swapped norm weight would show
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model.eval()


def tokens(cfg, seed=1):
    return torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(seed))


def hf_class(cfg):
    from transformers import LlamaForCausalLM, MixtralForCausalLM

    return MixtralForCausalLM if cfg.is_moe else LlamaForCausalLM


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("experts", [0, 3])
def test_btx_checkpoint_loads_in_transformers_with_the_same_logits(tmp_path, name, experts):
    cfg = make_cfg(name, n_experts=experts, top_k=2)
    model = random_model(cfg)
    save_model(model, cfg, tmp_path / "ckpt", dtype=torch.float32)
    theirs = hf_class(cfg).from_pretrained(tmp_path / "ckpt", dtype=torch.float32).eval()
    x = tokens(cfg)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, theirs(x).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["gqa-tied", "mqa-theta", "llama3-scaling"])
@pytest.mark.parametrize("experts", [0, 4])
def test_transformers_checkpoint_loads_in_btx_with_the_same_logits(tmp_path, name, experts):
    cfg = make_cfg(name, n_experts=experts, top_k=2)
    # Build the transformers model from the config btx would write, then let it save itself.
    from transformers import AutoConfig

    hf_cfg_path = tmp_path / "cfg"
    hf_cfg_path.mkdir()
    (hf_cfg_path / "config.json").write_text(__import__("json").dumps(config_to_hf(cfg, torch.float32)))
    torch.manual_seed(3)
    theirs = hf_class(cfg)(AutoConfig.from_pretrained(hf_cfg_path)).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(0, 0.1)
    theirs.save_pretrained(tmp_path / "theirs")
    ours = load_model(tmp_path / "theirs", dtype=torch.float32).eval()
    assert ours.cfg.rope_theta == cfg.rope_theta and ours.cfg.n_experts == experts
    x = tokens(cfg)
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits, theirs(x).logits, atol=1e-5, rtol=1e-5)


def test_upcycled_moe_equals_the_dense_model_whatever_the_router(tmp_path):
    """An MoE whose experts all copy one dense FFN computes the dense model, for any router and k."""
    dense_cfg = make_cfg("gqa-tied")
    dense = random_model(dense_cfg)
    x = tokens(dense_cfg)
    for k in (1, 2, 4):
        moe_cfg = make_cfg("gqa-tied", n_experts=4, top_k=k)
        moe = random_model(moe_cfg, seed=k)  # random routers
        sd = moe.state_dict()
        for name, t in dense.state_dict().items():
            if ".ffn." in name:
                stacked = name.replace(".weight", "")
                sd[stacked] = t.expand(4, *t.shape).clone()
            else:
                sd[name] = t
        moe.load_state_dict(sd)
        with torch.no_grad():
            torch.testing.assert_close(moe(x).logits, dense(x).logits, atol=1e-5, rtol=1e-5)
