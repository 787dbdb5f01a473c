"""Benchmark: the cost of `train.document_mask` on a training step (forward + backward).

Workload: one forward and backward of a Llama-shaped model (d 256, 4 layers, 8 heads / 4 kv heads,
FFN 704, vocab 8192; dense, and its 4-expert top-2 MoE) on 4 x 512 tokens whose documents are
~128 tokens long (EOS every 96-160 tokens), in fp32 on the CPU, for
- `plain`: the causal SDPA fast path (`is_causal=True`), what runs with the setting off;
- `masked`: document ids computed from the window (btx.data.sampling.document_ids) and passed to
  the model, so SDPA gets a [B, 1, S, S] boolean mask and RoPE per-token positions.

Rounds are interleaved; medians are printed with masked/plain.

    python bench/document_mask.py
    python bench/document_mask.py --seq-len 2048 --rounds 6
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from timing import interleaved_times

from btx.data.sampling import document_ids
from btx.model.config import ModelConfig
from btx.model.transformer import Transformer

EOS = 1


def windows(batch: int, seq_len: int, vocab: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(2, vocab, (batch, seq_len), generator=generator)
    for row in range(batch):
        position = int(torch.randint(96, 160, (1,), generator=generator))
        while position < seq_len:
            tokens[row, position] = EOS
            position += int(torch.randint(96, 160, (1,), generator=generator))
    return tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(2)
    tokens = windows(args.batch, args.seq_len, 8192)
    targets = torch.roll(tokens, -1, dims=1)
    print(f"{args.batch} x {args.seq_len} tokens, documents of 96-160 tokens; fp32 CPU forward + backward")
    print(f"{'model':>6} {'plain s':>9} {'masked s':>9} {'masked/plain':>13}")
    for name, moe in (("dense", {}), ("moe", {"n_experts": 4, "top_k": 2})):
        cfg = ModelConfig(
            vocab_size=8192, dim=256, n_layers=4, n_heads=8, n_kv_heads=4, ffn_dim=704, max_seq_len=4096, **moe
        )
        torch.manual_seed(0)
        model = Transformer(cfg)
        model.init_weights()

        def step(masked: bool, model: Transformer = model) -> None:
            extra = (document_ids(tokens, EOS),) if masked else ()
            logits = model(tokens, *extra).logits
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
            loss.backward()
            model.zero_grad(set_to_none=True)

        times = interleaved_times({"plain": lambda: step(False), "masked": lambda: step(True)}, args.rounds)
        plain, masked = statistics.median(times["plain"]), statistics.median(times["masked"])
        print(f"{name:>6} {plain:>9.3f} {masked:>9.3f} {masked / plain:>13.2f}")


if __name__ == "__main__":
    main()
