"""Benchmark: one btx dense training step against transformers' LlamaForCausalLM.

Workload: one optimizer step (forward, fp32 cross-entropy, backward, grad-norm clipping, AdamW)
of a ~27M-parameter Llama (d 512, 6 layers, 8 heads / 4 kv heads, FFN 1408, vocab 8192) on a
batch of 4 x 256 tokens. Both contenders start from the same weights (btx writes an HF checkpoint,
transformers loads it with attn_implementation="sdpa", its default) and use the same AdamW (btx's
parameter groups: weight decay on matrices only).

- btx: the training loop's own step: `AccelerateEngine` (accelerate, fp32 on CPU) and
  `train.loss_terms`, exactly the calls `btx.train.loop.run_loop` makes per step.
- transformers: the same step written directly against `LlamaForCausalLM` (logits -> the same
  cross-entropy on the same targets, `clip_grad_norm_`, AdamW).

Rounds are interleaved (btx, transformers, transformers, btx, ...) so that background load hits both
alike; the figure is the median step time of each (the fastest step is printed too: on a shared
machine background load only ever adds time, so the minimum is the steadier estimate).

    python bench/train_step.py                    # CPU fp32, 2 threads (the README's numbers)
    python bench/train_step.py --device cuda      # bf16 autocast on a GPU (precision auto)
    python bench/train_step.py --blocks           # the train.compile x train.activation_checkpointing table

Prints tokens/s of each and the ratio btx/transformers (higher is better for btx; target >= 1.0).
`--blocks` instead times and measures btx's own step under each `train.compile` and
`train.activation_checkpointing` setting (bench/train_blocks.py says how).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from timing import interleaved_times

from btx.io.checkpoint import save_model
from btx.model.config import ModelConfig
from btx.model.transformer import Transformer
from btx.train.engines.accelerate import AccelerateEngine
from btx.train.engines.base import make_optimizer
from btx.train.loop import loss_terms

CONFIG = ModelConfig(vocab_size=8192, dim=512, n_layers=6, n_heads=8, n_kv_heads=4, ffn_dim=1408, max_seq_len=1024)


def settings(precision: str) -> SimpleNamespace:
    """The recipe's TrainSection fields the engine reads (paper defaults)."""
    return SimpleNamespace(
        lr=1e-4,
        weight_decay=0.1,
        betas=[0.9, 0.95],
        eps=1e-8,
        warmup_steps=100,
        steps=1000,
        min_lr_ratio=0.1,
        grad_accum=1,
        grad_clip=1.0,
        precision=precision,
    )


def btx_step(engine, inputs, targets):
    def step() -> float:
        output = engine.model(inputs)
        loss = loss_terms(output, targets, 0.0, 0.0)[0]
        engine.backward(loss)
        engine.step()
        return loss.item()

    return step


def hf_step(model, optimizer, inputs, targets, autocast: bool):
    def step() -> float:
        with torch.autocast(inputs.device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = model(input_ids=inputs).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=16)
    ap.add_argument("--steps", type=int, default=1, help="timed steps per contender per round")
    ap.add_argument("--blocks", action="store_true", help="eager/compiled x none/full/selective (train_blocks.py)")
    if "--blocks" in sys.argv[1:]:  # the rest of the command line is train_blocks.py's
        import train_blocks

        return train_blocks.main([a for a in sys.argv[1:] if a != "--blocks"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.device == "cpu":
        import os

        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the engine picks CUDA whenever it sees one
    precision = "fp32" if args.device == "cpu" else "auto"
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = Transformer(CONFIG)
    model.init_weights(generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as tmp:
        save_model(model, None, f"{tmp}/ckpt", dtype=torch.float32)
        reference = LlamaForCausalLM.from_pretrained(f"{tmp}/ckpt", dtype=torch.float32, attn_implementation="sdpa")
    engine = AccelerateEngine(model, SimpleNamespace(settings=settings(precision)))
    device = engine.device
    reference = reference.to(device).train()
    hf_optimizer = make_optimizer(reference.parameters(), settings(precision))

    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, CONFIG.vocab_size, (args.batch, args.seq + 1), generator=gen).to(device)
    inputs, targets = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    contenders = {
        "btx": btx_step(engine, inputs, targets),
        "transformers": hf_step(reference, hf_optimizer, inputs, targets, autocast=engine.precision == "bf16"),
    }
    first = {name: fn() for name, fn in contenders.items()}  # also the warm-up
    print(f"same weights, first-step loss: btx {first['btx']:.5f}, transformers {first['transformers']:.5f}")
    times = interleaved_times(contenders, args.rounds, repeat=args.steps, cuda=device.type == "cuda")

    n_params = CONFIG.param_counts()["total"]
    tokens_per_step = args.batch * args.seq
    print(
        f"config: {n_params / 1e6:.1f}M params, batch {args.batch} x {args.seq}, {args.device} "
        f"{'fp32' if engine.precision == 'no' else engine.precision}, {torch.get_num_threads()} threads, "
        f"{args.rounds} interleaved rounds x {args.steps} steps"
    )
    rate = {}
    for name, ts in times.items():
        median = statistics.median(ts)
        rate[name] = tokens_per_step / median
        print(
            f"  {name:13s} median step {median * 1e3:8.1f} ms   {rate[name]:10,.0f} tokens/s   "
            f"(min {min(ts) * 1e3:.1f} ms, max {max(ts) * 1e3:.1f} ms)"
        )
    best = {name: tokens_per_step / min(ts) for name, ts in times.items()}
    print(
        f"tokens/s ratio btx/transformers: {rate['btx'] / rate['transformers']:.3f} (median step), "
        f"{best['btx'] / best['transformers']:.3f} (fastest step: background load only ever adds time)"
    )
    engine.close()


if __name__ == "__main__":
    main()
