"""The demo's committed BPE tokenizer: what tools/demo_tokenizer.py builds, and loadable by btx and transformers."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO / "recipes" / "demo" / "tokenizer"


def test_the_committed_tokenizer_is_what_the_tool_builds():
    """`--check` compares byte for byte when the committed one was built on this Python version
    (the corpora come from the standard library) and says why it cannot otherwise."""
    result = subprocess.run(
        [sys.executable, str(REPO / "tools" / "demo_tokenizer.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    built_on = json.loads((TOKENIZER / "tokenizer_config.json").read_text())["btx_built_by"]
    if f"Python {sys.version_info.major}.{sys.version_info.minor}" not in built_on:
        assert "no byte comparison" in result.stderr


def test_btx_and_transformers_read_it_alike():
    from btx.data.tokenizer import load_tokenizer
    from btx.plan.stages import seed_config
    from btx.recipe.load import load_experiment

    tok = load_tokenizer(TOKENIZER)
    assert tok.vocab_size == 1024 == seed_config(load_experiment("demo")).vocab_size  # the shipped seed's
    assert tok.vocab_size == load_experiment("demo-seed").recipe.model.vocab_size
    assert tok.eos_id == tok._tok.token_to_id("<|endoftext|>") and tok.bos_id is None
    text = "def f(x):\n    return 12 * 3  # the answer\n"
    ids = tok.encode(text)
    assert tok.decode(ids) == text and len(ids) < len(text.encode()) / 2
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(TOKENIZER)
    assert hf.encode(text, add_special_tokens=False) == ids and hf.eos_token == "<|endoftext|>"
