"""Every family against transformers: tiny random checkpoints that transformers itself saved, read by
btx, written back, merged into the family's MoE form and upcycled, with fp32 logits compared by
`assert_close` at each step and every output loaded by transformers with nothing missing,
unexpected or re-initialised.

The checkpoints are built once per session (`seeds`); each variant exercises one switch of
btx/model/ (explicit head_dim, biases, q/k norms, post-norm, sliding windows, RoPE scalings).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from btx.errors import BtxError
from btx.families import read_config
from btx.io.checkpoint import load_model, save_model
from btx.io.layout import config_to_hf
from btx.io.reader import CheckpointReader
from btx.mix.merge import merge
from btx.mix.options import MergeOptions

transformers = pytest.importorskip("transformers")

V, S = 96, 16  # vocab; sequence length (longer than every sliding window and short RoPE length below)
BASE = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2,
            pad_token_id=0)  # fmt: skip
HD = 8  # head dim of BASE
ROPE = 10000.0

# name -> (transformers class prefix, config overrides, can merge into the family's MoE form)
VARIANTS = {
    "llama": ("Llama", {}, True),
    "llama-head_dim": ("Llama", {"head_dim": 16}, True),
    "llama-bias": ("Llama", {"attention_bias": True, "mlp_bias": True}, False),
    "llama-attention-bias": ("Llama", {"attention_bias": True}, True),  # -> GraniteMoe, Mixtral has no biases
    "llama-rope-linear": (
        "Llama",
        {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": ROPE}},
        True,
    ),
    "llama-rope-dynamic": (
        "Llama",
        {
            "max_position_embeddings": 8,  # S > 8: the NTK base grows
            "rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": ROPE},
        },
        True,
    ),
    "llama-rope-yarn": (
        "Llama",
        {
            "rope_parameters": {
                "rope_type": "yarn",
                "factor": 4.0,
                "rope_theta": ROPE,
                "original_max_position_embeddings": 16,
            }
        },
        True,
    ),
    "llama-rope-longrope": (
        "Llama",
        {
            "max_position_embeddings": 32,
            "rope_parameters": {
                "rope_type": "longrope",
                "rope_theta": ROPE,
                "original_max_position_embeddings": 8,  # S > 8: long factors
                "short_factor": [1.0, 1.1, 1.3, 1.6],
                "long_factor": [1.0, 2.0, 3.0, 4.0],
            },
        },
        True,
    ),
    "llama-rope-llama3": (
        "Llama",
        {
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8,
            }
        },
        True,
    ),
    "mistral-sliding": ("Mistral", {"sliding_window": 4}, True),
    "qwen2": ("Qwen2", {}, True),
    "qwen2-tied": ("Qwen2", {"tie_word_embeddings": True}, True),
    "qwen2-sliding": ("Qwen2", {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1}, True),
    "qwen3": ("Qwen3", {"head_dim": 16}, True),
    "qwen3-bias": ("Qwen3", {"head_dim": 16, "attention_bias": True}, True),
    "olmo2": ("Olmo2", {}, True),
}
MERGEABLE = [name for name, (_, _, ok) in VARIANTS.items() if ok]
MOE_CLASS = {"Llama": "Mixtral", "Mistral": "Mixtral", "Qwen2": "Qwen2Moe", "Qwen3": "Qwen3Moe", "Olmo2": "FlexOlmo"}
TOKENS = torch.randint(3, V, (2, S), generator=torch.Generator().manual_seed(0))


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Every weight random (norm gains around 1), so each switch changes the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.2 * noise if "norm" in name else 0.1 * noise)


def transformers_model(prefix: str, overrides: dict, seed: int):
    config = getattr(transformers, f"{prefix}Config")(**{**BASE, **overrides})
    model = getattr(transformers, f"{prefix}ForCausalLM")(config).eval()
    randomize(model, seed)
    return model


def load_clean(path: Path):
    """transformers' own class for the checkpoint, asserting nothing was missing or re-initialised."""
    config = json.loads((path / "config.json").read_text())
    cls = getattr(transformers, config["architectures"][0])
    model, info = cls.from_pretrained(path, output_loading_info=True, dtype=torch.float32)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def hf_logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS).logits.float()


def btx_logits(path: Path) -> torch.Tensor:
    model = load_model(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(TOKENS).logits


@pytest.fixture(scope="session")
def seeds(tmp_path_factory) -> dict[str, Path]:
    """Each variant as transformers' save_pretrained writes it, with its logits on TOKENS."""
    root = tmp_path_factory.mktemp("families")
    out = {}
    for i, (name, (prefix, overrides, _)) in enumerate(VARIANTS.items()):
        model = transformers_model(prefix, overrides, seed=i)
        model.save_pretrained(root / name)
        torch.save(hf_logits(model), root / name / "logits.pt")
        out[name] = root / name
    return out


def reference_logits(path: Path) -> torch.Tensor:
    return torch.load(path / "logits.pt", weights_only=True)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_dense_seed_matches_transformers_both_ways(seeds, name, tmp_path):
    seed = seeds[name]
    cfg = CheckpointReader(seed).cfg
    assert cfg.family == VARIANTS[name][0].lower()
    torch.testing.assert_close(btx_logits(seed), reference_logits(seed), rtol=1e-5, atol=1e-5)
    # and back: what btx writes is what transformers computed in the first place
    save_model(load_model(seed, dtype=torch.float32), None, tmp_path / "out", tokenizer_from=seed)
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["model_type"] == json.loads((seed / "config.json").read_text())["model_type"]
    torch.testing.assert_close(hf_logits(load_clean(tmp_path / "out")), reference_logits(seed), rtol=1e-5, atol=1e-5)


def make_expert(seed: Path, out: Path, seed_index: int) -> Path:
    """A domain expert: the seed with every weight moved a little (attention too, so the merge's
    averaging is exercised), saved by btx."""
    model = load_model(seed, dtype=torch.float32)
    g = torch.Generator().manual_seed(100 + seed_index)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    save_model(model, None, out, tokenizer_from=seed)
    return out


@pytest.fixture(scope="module")
def router_data(tmp_path_factory) -> dict[str, Path]:
    """Validation shards of two synthetic domains, as bytes below the tiny vocabulary."""
    import numpy as np

    from btx.data.prepare import prepare_domain

    root, rng, out = tmp_path_factory.mktemp("router-data"), np.random.default_rng(0), {}
    for d, chars in {"code": "ABCDEFGHIJ", "math": "0123456789"}.items():
        docs = ["".join(rng.choice(list(chars), size=100)) for _ in range(8)]
        prepare_domain(d, [docs], "byte", root / d, val_fraction=0.5, append_eos=False, progress=False)
        out[d] = root / d / "val.bin"
    return out


@pytest.mark.parametrize("router_init", ["random", "ridge"])
@pytest.mark.parametrize("name", MERGEABLE)
def test_merged_moe_matches_transformers(seeds, name, router_init, router_data, tmp_path):
    """Every family's MoE form, with random routers and with ridge routers fitted by walking the
    family's own layers (q/k norms, biases, sliding windows, post-norms)."""
    seed = seeds[name]
    experts = {d: make_expert(seed, tmp_path / d, i) for i, d in enumerate(("code", "math"))}
    out = tmp_path / "merged"
    merge(
        seed,
        experts,
        out,
        MergeOptions(router_std=0.5, router_init=router_init),
        allow_no_manifest=True,
        router_data=router_data if router_init == "ridge" else None,
        progress=False,
    )
    config = json.loads((out / "config.json").read_text())
    prefix = VARIANTS[name][0]
    moe_class = "GraniteMoe" if name == "llama-attention-bias" else MOE_CLASS[prefix]
    assert config["architectures"] == [f"{moe_class}ForCausalLM"]
    assert config["output_router_logits"] is True and config["router_aux_loss_coef"] == 0.01
    moe = load_clean(out)
    assert moe.config.num_experts_per_tok == 2
    torch.testing.assert_close(hf_logits(moe), btx_logits(out), rtol=1e-5, atol=1e-5)
    if prefix == "Qwen2":  # the shared expert adds nothing: zero width
        assert moe.config.shared_expert_intermediate_size == 0


@pytest.mark.parametrize("name", MERGEABLE)
@pytest.mark.parametrize("k", [1, 2])
def test_upcycled_copies_of_the_seed_compute_the_seed(seeds, name, k, tmp_path):
    seed = seeds[name]
    out = tmp_path / "up"
    merge(seed, {}, out, MergeOptions(upcycle=3, top_k=k, router_std=1.0), progress=False)
    reference = reference_logits(seed)
    torch.testing.assert_close(hf_logits(load_clean(out)), reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(btx_logits(out), reference, rtol=1e-5, atol=1e-5)


def test_sliding_window_is_what_transformers_computes_beyond_the_window(seeds):
    """The window matters at S > window: without it the logits differ, with it they agree."""
    seed = seeds["mistral-sliding"]
    model = load_model(seed, dtype=torch.float32).eval()
    for layer in model.layers:
        layer.attn.window = None
    with torch.no_grad():
        full = model(TOKENS).logits
    assert not torch.allclose(full, reference_logits(seed), atol=1e-3)
    assert CheckpointReader(seeds["qwen2-sliding"]).cfg.sliding_layers == [1]


def test_seed_the_moe_form_cannot_express_is_refused(seeds, tmp_path):
    seed = seeds["llama-bias"]
    with pytest.raises(
        BtxError, match="MixtralForCausalLM cannot express this LlamaForCausalLM: Mixtral's projections have no biases"
    ):
        merge(
            seed,
            {"code": make_expert(seed, tmp_path / "code", 0)},
            tmp_path / "out",
            allow_no_manifest=True,
            progress=False,
        )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "model_type, change, message",
    [
        ("llama", {"model_type": "gemma"}, "model_type 'gemma' is not supported (its RMSNorm scales by (1 + weight)"),
        ("llama", {"model_type": "phi3"}, "model_type 'phi3' is not supported (it fuses q/k/v"),
        ("llama", {"model_type": "granite"}, "'granite' is not supported (it scales embeddings"),
        ("llama", {"sliding_window": 8}, "Llama has no sliding window"),
        ("llama", {"residual_multiplier": 0.22}, "Granite's residual multiplier"),
        ("llama", {"hidden_act": "gelu_pytorch_tanh"}, "hidden_act 'gelu_pytorch_tanh' is not supported"),
        ("qwen2", {"quantization_config": {"quant_method": "awq"}}, "a quantized checkpoint"),
        ("olmo2", {"sliding_window": 4}, "OLMo 2 has no sliding window"),
        (
            "qwen3",
            {"layer_types": ["full_attention", "chunked_attention"], "use_sliding_window": True},
            "layer_types ['chunked_attention'] not supported",
        ),
    ],
)
def test_configs_btx_cannot_honour_are_refused_by_name(seeds, model_type, change, message):
    name = {"llama": "llama", "qwen2": "qwen2", "olmo2": "olmo2", "qwen3": "qwen3"}[model_type]
    config = json.loads((seeds[name] / "config.json").read_text()) | change
    with pytest.raises(BtxError, match="^x/config.json: ") as e:
        read_config(config, source="x/config.json")
    assert message in str(e.value)
    assert "btx reads the dense families" in str(e.value) or "model_type" not in change


def test_configs_round_trip_through_btx_for_every_family(seeds):
    """Read then written, a config reads back to the same ModelConfig (both RoPE spellings kept)."""
    for name, path in seeds.items():
        cfg = CheckpointReader(path).cfg
        written = config_to_hf(cfg)
        assert "rope_theta" in written and written["rope_parameters"]["rope_theta"] == cfg.rope_theta
        assert read_config(json.loads(json.dumps(written))) == cfg, name


# MoE checkpoints btx did not write (another tool's merge, a released MoE): read, finetuned and
# analysed as they are, each with the switches its class has.
FOREIGN_MOE = {
    "mixtral-sliding": ("Mixtral", {"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": 4}),
    "qwen2_moe-shared": (
        "Qwen2Moe",
        {
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 24,
            "shared_expert_intermediate_size": 40,
            "norm_topk_prob": False,
        },
    ),
    "qwen3_moe": (
        "Qwen3Moe",
        {
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 24,
            "head_dim": 16,
            "norm_topk_prob": False,
        },
    ),
    "flex_olmo": ("FlexOlmo", {"num_experts": 4, "num_experts_per_tok": 2, "norm_topk_prob": True}),
    "granitemoe-neutral": (
        "GraniteMoe",
        {
            "num_local_experts": 4,
            "num_experts_per_tok": 2,
            "attention_bias": True,
            "embedding_multiplier": 1.0,
            "residual_multiplier": 1.0,
            "logits_scaling": 1.0,
            "attention_multiplier": HD**-0.5,
        },
    ),
}


@pytest.mark.parametrize("name", list(FOREIGN_MOE))
def test_moe_checkpoints_from_elsewhere_match_transformers(name, tmp_path):
    prefix, overrides = FOREIGN_MOE[name]
    model = transformers_model(prefix, overrides, seed=7)
    model.save_pretrained(tmp_path)
    cfg = CheckpointReader(tmp_path).cfg
    assert cfg.n_experts == 4 and cfg.norm_topk_prob == overrides.get("norm_topk_prob", True)
    assert cfg.shared_expert_dim == overrides.get("shared_expert_intermediate_size", 0)
    torch.testing.assert_close(btx_logits(tmp_path), hf_logits(model), rtol=1e-5, atol=1e-5)


def test_granite_multipliers_btx_does_not_implement_are_refused(tmp_path):
    model = transformers_model(
        "GraniteMoe", {"num_local_experts": 2, "num_experts_per_tok": 1, "embedding_multiplier": 12.0}, seed=8
    )
    model.save_pretrained(tmp_path)
    with pytest.raises(
        BtxError, match="'embedding_multiplier' is 12.0; btx reads GraniteMoe only with its multipliers at 1"
    ):
        CheckpointReader(tmp_path)


def test_expert_with_another_chat_template_is_refused(seeds, tmp_path):
    seed = tmp_path / "seed"
    save_model(load_model(seeds["qwen3"]), None, seed)
    (seed / "chat_template.jinja").write_text("{{ messages }}")
    expert = make_expert(seed, tmp_path / "code", 0)
    assert (expert / "chat_template.jinja").is_file()  # save_model(tokenizer_from=seed) carried it
    (expert / "chat_template.jinja").write_text("{{ messages | tojson }}")
    with pytest.raises(BtxError, match=r"code/chat_template.jinja: differs from the seed's chat_template.jinja"):
        merge(seed, {"code": expert}, tmp_path / "out", allow_no_manifest=True, progress=False)
    assert not (tmp_path / "out").exists()


def test_cli_refusals_are_one_line_with_exit_2_and_write_nothing(seeds, tmp_path, capsys):
    from btx.cli import main as cli_main

    gemma = tmp_path / "gemma"
    gemma.mkdir()
    (gemma / "config.json").write_text(
        json.dumps(
            json.loads((seeds["llama"] / "config.json").read_text())
            | {"model_type": "gemma", "architectures": ["GemmaForCausalLM"]}
        )
    )
    cases = [
        (["--seed", str(seeds["llama-bias"]), "--upcycle", "2"], "Mixtral's projections have no biases"),
        (["--seed", str(gemma), "--upcycle", "2"], "model_type 'gemma' is not supported"),
        (["--seed", "meta-llama/Llama-3.2-1B", "--upcycle", "2"], "looks like a Hugging Face Hub id"),
        (["--seed", str(seeds["qwen3"]), "--expert", "code=Qwen/Qwen3-0.6B"], "hf download Qwen/Qwen3-0.6B"),
    ]
    for args, message in cases:
        out = tmp_path / "out"
        assert cli_main(["merge", *args, "--out", str(out), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
        assert not out.exists()
