#!/usr/bin/env python
"""Routing analysis demonstration: a tiny merged MoE, analysed with `btx analyze`, in seconds on CPU.

    python tools/routing_demo.py OUT_DIR

1. Token shards for three built-in domains (Python code, arithmetic, Python's reference docs),
   byte-level tokens.
2. A small random dense seed and three "experts": copies of the seed whose FFNs are perturbed,
   standing in for briefly trained branches.
3. Two merges of the same seed and experts (the seed kept as a 4th expert): `centroid` routers
   (each domain expert's row is the mean hidden state of its own domain, so routing starts
   domain-aware) and `random` routers.
4. `btx analyze` of the random merge (A) with the centroid merge as --compare B, on the domains'
   validation shards: OUT_DIR/analysis/ gets routing.json, routing.csv, heatmap_<domain>.png,
   layers_stacked.png, and compare/ B's own files plus diff_<domain>.png (B - A).

What to expect: random routers treat the three domains about alike (own-expert top-1 shares near
1/4); centroid routers send clearly more of each domain's tokens to its own expert, so the
difference heatmaps (centroid minus random) are mostly positive in each domain's own column.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the btx package next to tools/

DOMAINS = {"code": "python_code", "math": "arithmetic", "prose": "python_docs"}


def build(
    work: Path,
    *,
    dim: int = 64,
    n_layers: int = 4,
    data_bytes: int = 120_000,
    router_tokens: int = 4096,
    progress: bool = False,
) -> dict[str, Path]:
    """Write the shards, seed, experts and both merges under `work`; returns their paths."""
    import torch

    from btx.data.corpora import builtin_source
    from btx.data.prepare import prepare_domain
    from btx.data.tokenizer import ByteTokenizer
    from btx.io.checkpoint import save_model
    from btx.mix.merge import merge
    from btx.mix.options import MergeOptions
    from btx.model.config import ModelConfig
    from btx.model.transformer import Transformer

    tokenizer_dir = work / "tokenizer"
    ByteTokenizer().save(tokenizer_dir)
    val = {}
    for name, corpus in DOMAINS.items():
        prepare_domain(
            name,
            [builtin_source(corpus, data_bytes)],
            "byte",
            work / "data" / name,
            val_fraction=0.25,
            progress=progress,
        )
        val[name] = work / "data" / name / "val.bin"

    cfg = ModelConfig(vocab_size=ByteTokenizer.vocab_size, dim=dim, n_layers=n_layers, n_heads=4, n_kv_heads=2,
                      ffn_dim=2 * dim, max_seq_len=256)  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    seed = Transformer(cfg)
    seed.init_weights(generator=generator)
    save_model(seed, None, work / "seed", tokenizer_from=tokenizer_dir, force=True)
    experts = {}
    for name in DOMAINS:
        expert = Transformer(cfg)
        expert.load_state_dict(seed.state_dict())
        with torch.no_grad():  # a stand-in for a short branch training run: FFNs drift apart
            for pname, p in expert.named_parameters():
                if ".ffn." in pname:
                    p.add_(torch.randn(p.shape, generator=generator) * 0.02)
        experts[name] = work / "experts" / name
        save_model(expert, None, experts[name], tokenizer_from=tokenizer_dir, force=True)

    merged = {}
    for init in ("centroid", "random"):
        merged[init] = work / f"merged-{init}"
        merge(work / "seed", experts, merged[init],
              MergeOptions(router_init=init, router_tokens=router_tokens, top_k=2),
              router_data={name: str(path) for name, path in val.items()}, allow_no_manifest=True, force=True,
              progress=progress)  # fmt: skip
    return {"centroid": merged["centroid"], "random": merged["random"], **{f"val_{d}": p for d, p in val.items()}}


def analyze_args(paths: dict[str, Path], out: Path, tokens: int = 8192) -> list[str]:
    """The `btx analyze` command line of the demo."""
    args = [str(paths["random"]), "--compare", str(paths["centroid"]), "--out", str(out),
            "--tokens", str(tokens), "--seq-len", "256", "--show-text"]  # fmt: skip
    for name in DOMAINS:
        args += ["--data", f"{name}={paths[f'val_{name}']}"]
    return args


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="working directory (created)")
    parser.add_argument("--tokens", type=int, default=8192, help="tokens per domain to analyse")
    args = parser.parse_args(argv)
    from btx.cli import main as btx_main

    args.out.mkdir(parents=True, exist_ok=True)
    paths = build(args.out, progress=True)
    command = analyze_args(paths, args.out / "analysis", args.tokens)
    print("btx analyze " + " ".join(command))
    return btx_main(["analyze", *command])


if __name__ == "__main__":
    sys.exit(main())
