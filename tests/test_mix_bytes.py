"""Regression check: the bytes a merge and a grow write are the ones they wrote before merge and
grow were moved onto one tensor writer and one router-fitting entry.

The hashes below were computed on the code before that refactor (commit 589447b), on inputs whose
every weight is a small multiple of 1/16, mixed only with weights 1/2: every mean and every cast
is exact, so the bytes do not depend on the CPU's vector width or on how a kernel rounds. What
does depend on the installed torch is its normal generator (the random router rows), so a torch
upgrade that changes that stream changes these hashes: recompute them on the code before a
change, never from the code under test.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from btx.io.checkpoint import save_model
from btx.mix.grow import grow_moe
from btx.mix.merge import merge
from btx.mix.options import EditOptions, MergeOptions
from btx.model.config import ModelConfig
from btx.model.transformer import Transformer

CFG = ModelConfig(vocab_size=64, dim=16, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=32, max_seq_len=64)
HALVES = {"code": 1, "math": 1, "seed": 2}  # running means with lerp weights 1/2: exact

# sha256 over the output's safetensors files (names and bytes, in name order), from commit 589447b.
EXPECTED = {
    "merge": "2d6c174b61a944e4542b7b2393f62fc62cec65b6c6d21d1f496584c9a2a40dfe",
    "merge-split-bf16": "60b4d8d3ebfae79d405e0c7b0f45574b22bb76def0482fc4fcb1cf0c7d597ed7",
    "grow-average": "ba5f99eccfca1d0dbb026415e22a4670ba4e7f967741381580f8a1eccb1cde7c",
    "grow-remove": "cf5bdc67278dde37275feb510e52a1223b8208fd973b8b88a68b04bd7f7d3a53",
}


def dyadic_model(seed: int) -> dict[str, torch.Tensor]:
    """A model whose weights are multiples of 1/16 in [-1/2, 1/2) (norms in [1/2, 3/2)), from numpy."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, p in sorted(Transformer(CFG).state_dict().items()):
        low, high = (8, 24) if name.endswith("norm.weight") else (-8, 8)
        out[name] = torch.from_numpy(rng.integers(low, high, tuple(p.shape)).astype(np.float32) / 16)
    return out


def weights_digest(path: Path) -> str:
    digest = hashlib.sha256()
    for f in sorted(path.glob("*.safetensors")):
        digest.update(f.name.encode())
        digest.update(f.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mix-bytes")
    paths = {}
    for i, name in enumerate(("seed", "code", "math", "prose")):
        paths[name] = root / name
        save_model(dyadic_model(i), CFG, paths[name], dtype=torch.float32)
    return paths


def merged(inputs, out: Path, **options) -> Path:
    experts = {d: inputs[d] for d in ("code", "math")}
    merge(
        inputs["seed"],
        experts,
        out,
        MergeOptions(weights=HALVES, router_std=0.5, router_seed=7, **options),
        allow_no_manifest=True,
        progress=False,
    )
    return out


def test_merge_bytes_are_unchanged(inputs, tmp_path):
    assert weights_digest(merged(inputs, tmp_path / "moe")) == EXPECTED["merge"]
    split = merged(inputs, tmp_path / "split", granularity="split", chunks=2, top_k=4, dtype="bfloat16")
    assert weights_digest(split) == EXPECTED["merge-split-bf16"]


def test_grow_bytes_are_unchanged(inputs, tmp_path):
    moe = merged(inputs, tmp_path / "moe")
    grown, shrunk = tmp_path / "grown", tmp_path / "shrunk"
    grow_moe(
        moe,
        grown,
        add={"prose": inputs["prose"]},
        allow_foreign=True,
        progress=False,
        options=EditOptions(router_std=0.25, router_seed=3, shared="average", shared_weight=0.5),
    )
    assert weights_digest(grown) == EXPECTED["grow-average"]
    grow_moe(grown, shrunk, remove=["math"], progress=False)
    assert weights_digest(shrunk) == EXPECTED["grow-remove"]
