"""The whole workflow for each family: `btx run` on a tiny recipe whose seed.path is a checkpoint that
transformers itself saved, with a real tokenizer and a chat template.

Every output (the expert's final export, the merged MoE, the finetuned MoE, and for one family the
baselines) must load in transformers with no missing, unexpected or mismatched keys, compute what
btx computes, and carry the seed's tokenizer files, so that `apply_chat_template` works on it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from btx.io.checkpoint import load_model

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

FIXTURES = Path(__file__).parent / "fixtures" / "tiny"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
BASE = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=128)  # fmt: skip
# family -> (transformers class prefix, config overrides, MoE class the merge writes)
FAMILIES = {
    # a biased Llama with Llama-3 RoPE: merged into GraniteMoe (Mixtral has no biases); the plain
    # Llama -> Mixtral path is the pipeline tests' from-scratch seed, and mistral's below
    "llama": (
        "Llama",
        {
            "attention_bias": True,
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        },
        "GraniteMoe",
    ),
    "mistral": ("Mistral", {"sliding_window": 8}, "Mixtral"),  # training windows of 32 > 8
    "qwen2": ("Qwen2", {"tie_word_embeddings": True}, "Qwen2Moe"),
    "qwen3": ("Qwen3", {"head_dim": 16}, "Qwen3Moe"),
    "olmo2": ("Olmo2", {}, "FlexOlmo"),
}
MESSAGES = [{"role": "user", "content": "def f(x):"}]


def make_tokenizer(directory: Path):
    """A byte-level BPE trained on the fixture data, saved by transformers with a chat template."""
    texts = [p.read_text() for p in sorted((FIXTURES / "data" / "code").iterdir())]
    bpe = tokenizers.ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=320, min_frequency=1, special_tokens=["<s>", "</s>", "<pad>"])
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(directory)
    return tok


def make_seed(directory: Path, family: str) -> Path:
    prefix, overrides, _ = FAMILIES[family]
    tok = make_tokenizer(directory)
    vocab = (len(tok) + 7) // 8 * 8
    config = getattr(transformers, f"{prefix}Config")(
        vocab_size=vocab, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, **{**BASE, **overrides})  # fmt: skip
    torch.manual_seed(0)
    model = getattr(transformers, f"{prefix}ForCausalLM")(config)
    model.save_pretrained(directory)
    return directory


def write_recipe(directory: Path, seed: Path, baselines: bool) -> Path:
    recipe = {
        "experiment": "family",
        "tokenizer": str(seed),
        "seed": {"path": str(seed)},
        "domains": {"code": str(FIXTURES / "code.yaml")},
        "train": {
            "lr": 1e-3,
            "warmup_steps": 1,
            "steps": 3,
            "batch_size": 2,
            "seq_len": 32,
            "checkpoint_every": 0,
            "eval_every": 0,
            "eval_batches": 1,
            "log_every": 1,
        },
        "finetune": {"train": {"steps": 2}},
        "eval": {"batches": 1, "batch_size": 2, "baselines": baselines},
        "analyze": {"tokens": 256, "show_text": 0},
    }
    path = directory / "btx.yaml"
    path.write_text(json.dumps(recipe))  # JSON is YAML
    return path


def load_clean(path: Path):
    config = json.loads((path / "config.json").read_text())
    cls = getattr(transformers, config["architectures"][0])
    model, info = cls.from_pretrained(path, output_loading_info=True, dtype=torch.float32)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], (path, info)
    return model.eval()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_btx_run_from_a_transformers_seed(family, tmp_path):
    seed = make_seed(tmp_path / "seed", family)
    baselines = family == "qwen3"  # one family also runs the dense and upcycling baselines
    recipe = write_recipe(tmp_path, seed, baselines)
    run = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "btx", "run", str(recipe), f"run_dir={run}"], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]

    moe_class = f"{FAMILIES[family][2]}ForCausalLM"
    outputs = {"experts/code/final": f"{FAMILIES[family][0]}ForCausalLM", "merged": moe_class, "finetuned": moe_class}
    if baselines:
        outputs |= {"baselines/dense/final": f"{FAMILIES[family][0]}ForCausalLM", "baselines/upcycled": moe_class}
    tokens = torch.randint(3, 300, (1, 24), generator=torch.Generator().manual_seed(1))
    seed_chat = transformers.AutoTokenizer.from_pretrained(seed).apply_chat_template(MESSAGES, tokenize=False)
    for rel, cls in outputs.items():
        path = run / rel
        assert json.loads((path / "config.json").read_text())["architectures"] == [cls], rel
        model = load_clean(path)
        with torch.no_grad():
            theirs = model(tokens).logits
            ours = load_model(path, dtype=torch.float32).eval()(tokens).logits
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4, msg=rel)
        for file in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            assert (path / file).read_bytes() == (seed / file).read_bytes(), (rel, file)
        chat = transformers.AutoTokenizer.from_pretrained(path).apply_chat_template(MESSAGES, tokenize=False)
        assert chat == seed_chat == "<|user|>def f(x):<|end|>", rel
    if FAMILIES[family][2] == "Qwen2Moe":
        assert json.loads((run / "merged" / "config.json").read_text())["shared_expert_intermediate_size"] == 0
    routing = json.loads((run / "analysis" / "routing.json").read_text())  # analyze ran on the MoE form
    assert list(routing["domains"]) == ["code"] and routing["experts"] == ["code", "seed"]
    assert len(routing["domains"]["code"]["load_share"]) == 2  # one row per layer
