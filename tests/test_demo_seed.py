"""The demo's shipped seed (recipes/demo/seed/): what recipes/demo-seed made, by tools/demo_seed.py.

- The shipped files are the ones SEED.json records, and SEED.json records today's recipe, domain
  recipes and tokenizer: an edit to any of them without a new seed fails here.
- The tool's training is bit for bit: the same recipe trained twice gives the same bytes (on a
  shrunken copy of the recipe, so that it takes seconds).
- The seed's corpora begin with the demo domains' documents, so the same split holds out the
  same documents: the seed never trained on a document the demo validates on.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _tool():
    spec = importlib.util.spec_from_file_location("demo_seed", REPO / "tools" / "demo_seed.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["demo_seed"] = module
    spec.loader.exec_module(module)
    return module


demo_seed = _tool()
TINY = (
    "model.dim=16", "model.n_heads=2", "model.n_kv_heads=1", "model.ffn_dim=32", "model.max_seq_len=32",
    "train.seq_len=32", "train.batch_size=2", "seed.train.steps=4", "seed.train.warmup_steps=1",
    "seed.train.checkpoint_every=2", "seed.train.eval_every=2", "train.eval_batches=1", "train.log_every=1",
)  # fmt: skip


def test_the_shipped_seed_is_what_its_recipe_made():
    assert demo_seed.problems() == []
    recorded = json.loads((demo_seed.SHIPPED_DIR / "SEED.json").read_text())
    assert set(recorded["files"]) == set(demo_seed.FILES)
    assert (demo_seed.SHIPPED_DIR / recorded["recipe"]).resolve() == demo_seed.RECIPE.resolve()
    assert demo_seed.rendered() == demo_seed.RECIPE.read_text(), "run python tools/demo_seed.py --render"


def test_transformers_opens_the_shipped_seed():
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(demo_seed.SHIPPED_DIR)
    recorded = json.loads((demo_seed.SHIPPED_DIR / "SEED.json").read_text())
    assert sum(p.numel() for p in model.parameters()) == recorded["training"]["params"]["total"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(demo_seed.SHIPPED_DIR)
    assert len(tokenizer) == model.config.vocab_size


@pytest.fixture
def small_recipe(tmp_path) -> Path:
    """recipes/demo-seed with a few KB of each corpus."""
    recipe = tmp_path / "demo-seed"
    shutil.copytree(demo_seed.RECIPE.parent, recipe)
    text = (recipe / "btx.yaml").read_text().replace("../demo/tokenizer", str(REPO / "recipes" / "demo" / "tokenizer"))
    (recipe / "btx.yaml").write_text(text)
    for domain in (recipe / "domains").glob("*.yaml"):
        lines = domain.read_text().splitlines()
        domain.write_text("\n".join("  builtin_bytes: 40000" if "builtin_bytes" in ln else ln for ln in lines) + "\n")
    return recipe / "btx.yaml"


def test_the_tool_trains_the_same_bytes_twice_and_notices_a_changed_recipe(small_recipe, tmp_path):
    first = demo_seed.train(small_recipe, tmp_path / "a", TINY)
    second = demo_seed.train(small_recipe, tmp_path / "b", TINY)
    assert demo_seed.sha256(first / "model.safetensors") == demo_seed.sha256(second / "model.safetensors")
    shipped = demo_seed.ship(first, small_recipe, tmp_path / "shipped")
    assert demo_seed.problems(shipped, small_recipe) == []
    assert demo_seed.compare(second, shipped) == []
    (shipped / "model.safetensors").write_bytes(b"0")
    assert "model.safetensors: sha256" in demo_seed.problems(shipped, small_recipe)[0]
    shutil.copyfile(first / "model.safetensors", shipped / "model.safetensors")
    (small_recipe.parent / "domains" / "math.yaml").write_text("data:\n  builtin: arithmetic\n  builtin_bytes: 50000\n")
    assert demo_seed.problems(shipped, small_recipe) == [
        f"{small_recipe}: changed since the shipped seed was trained; run python tools/demo_seed.py"
    ]


@pytest.mark.parametrize(("demo", "seed"), [("python_code", "python_library"), ("python_docs", "python_prose")])
def test_the_seed_corpora_begin_with_the_demo_domains_documents(demo, seed):
    from btx.data.corpora import BUILTIN_CORPORA

    smaller = list(BUILTIN_CORPORA[demo](max_bytes=10**9))
    larger = list(BUILTIN_CORPORA[seed](max_bytes=10**9))
    assert larger[: len(smaller)] == smaller and len(larger) > len(smaller)


def test_the_seed_domains_split_as_the_demo_domains_do():
    """Same corpus prefix, same split key and fraction: the same documents held out."""
    from btx.recipe.load import load_experiment

    demo, seed = load_experiment("demo"), load_experiment("demo-seed")
    assert list(demo.domains) == list(seed.domains)
    for name, domain in demo.domains.items():
        ours, theirs = domain.recipe.data, seed.domains[name].recipe.data
        assert (ours.seed, ours.val_fraction) == (theirs.seed, theirs.val_fraction), name
        assert theirs.builtin_bytes >= ours.builtin_bytes, name
