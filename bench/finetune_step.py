"""Benchmark: one MoE finetuning step against one dense step of its seed, and the engines around it.

Workload: one optimizer step (forward, fp32 cross-entropy (+ 0.01 x balancing loss for the MoE),
backward, grad-norm clipping, AdamW) on the same batch of 4 x 256 tokens, for
- the dense seed: a Llama of d 512, 4 layers, 8 heads / 4 kv heads, FFN 1408, vocab 8192 (~20M);
- its 4-expert top-2 MoE (~46M, ~29M active): experts are copies of the seed's FFN with a little
  noise and routers are random, as after an upcycling merge, so the load is roughly balanced.

Part 1, the model step: plain torch, the same AdamW (btx.train.engines.base.make_optimizer) for both. The
MoE/dense time ratio is compared with the ratio of training FLOPs per token of the *active*
parameters (`btx.model.flops.train_flops_per_token`), which is what an MoE ought to cost; the target
is time ratio <= 1.25 x FLOP ratio.

Part 2, the engines on the MoE step: the training loop's calls (`engine.model`, `train.loss_terms`,
`engine.backward`, `engine.step`) through btx's DeepSpeed engine at ZeRO-0 and ZeRO-2 and through
the accelerate engine of dense training, one process.

Rounds are interleaved (a, b, b, a, ...) so background load hits every contender alike; medians
are reported, and the fastest step too (on a shared machine load only ever adds time).

    python bench/finetune_step.py                 # CPU fp32, 2 threads (the README's numbers)
    python bench/finetune_step.py --no-engines    # part 1 only
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
from types import SimpleNamespace

import torch
from timing import interleaved_times

from btx.model.config import ModelConfig
from btx.model.flops import train_flops_per_token
from btx.model.transformer import Transformer
from btx.train.engines.base import make_optimizer
from btx.train.loop import loss_terms

SEED = ModelConfig(vocab_size=8192, dim=512, n_layers=4, n_heads=8, n_kv_heads=4, ffn_dim=1408, max_seq_len=1024)
MOE = dataclasses.replace(SEED, n_experts=4, top_k=2)
ALPHA = 0.01


def settings() -> SimpleNamespace:
    """The TrainSection fields the engines read (paper optimisation, fp32 on CPU)."""
    return SimpleNamespace(
        lr=1e-4,
        weight_decay=0.1,
        betas=[0.9, 0.95],
        eps=1e-8,
        warmup_steps=100,
        steps=1000,
        min_lr_ratio=0.1,
        batch_size=4,
        grad_accum=1,
        grad_clip=1.0,
        precision="fp32",
    )


def seed_and_moe(seed: ModelConfig = SEED) -> tuple[Transformer, Transformer]:
    """The dense `seed` and its 4-expert top-2 upcycled MoE (experts = its FFN + noise, random routers)."""
    dense = Transformer(seed)
    dense.init_weights(generator=torch.Generator().manual_seed(0))
    moe = Transformer(dataclasses.replace(seed, n_experts=4, top_k=2))
    moe.init_weights(generator=torch.Generator().manual_seed(1))  # routers: random normal(0, 0.02)
    state = dense.state_dict()
    with torch.no_grad():
        for name, p in moe.named_parameters():
            if name in state:
                p.copy_(state[name])
            elif name.endswith(("ffn.w1", "ffn.w2", "ffn.w3")):  # each expert: the seed's FFN + noise
                dense_w = state[name + ".weight"]
                p.copy_(dense_w.expand_as(p) + 1e-3 * torch.randn(p.shape) * dense_w.std())
    return dense, moe


def plain_step(model: Transformer, inputs, targets, alpha: float):
    optimizer = make_optimizer(model.parameters(), settings())

    def step() -> float:
        loss = loss_terms(model(inputs), targets, alpha, 0.0)[0]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def engine_step(engine, inputs, targets, alpha: float):
    def step() -> float:
        loss = loss_terms(engine.model(inputs), targets, alpha, 0.0)[0]
        engine.backward(loss)
        engine.step()
        return loss.item()

    return step


def report(times: dict[str, list[float]], tokens: int) -> dict[str, float]:
    medians = {}
    for name, ts in times.items():
        medians[name] = statistics.median(ts)
        print(
            f"  {name:22s} median {medians[name] * 1e3:8.1f} ms  {tokens / medians[name]:8,.0f} tokens/s  "
            f"(min {min(ts) * 1e3:.1f}, max {max(ts) * 1e3:.1f} ms)"
        )
    return medians


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--no-engines", action="store_true", help="skip part 2 (DeepSpeed and accelerate engines)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # a CPU benchmark, whatever the machine has
    tokens = args.batch * args.seq
    gen = torch.Generator().manual_seed(2)
    batch = torch.randint(0, SEED.vocab_size, (args.batch, args.seq + 1), generator=gen)
    inputs, targets = batch[:, :-1].contiguous(), batch[:, 1:].contiguous()

    dense, moe = seed_and_moe()
    counts_d, counts_m = SEED.param_counts(), MOE.param_counts()
    flop_ratio = train_flops_per_token(MOE, args.seq) / train_flops_per_token(SEED, args.seq)
    print(
        f"seed {counts_d['total'] / 1e6:.1f}M params; MoE 4 experts top-2 {counts_m['total'] / 1e6:.1f}M, "
        f"{counts_m['active'] / 1e6:.1f}M active; batch {args.batch} x {args.seq}; CPU fp32, "
        f"{torch.get_num_threads()} threads; {args.rounds} interleaved rounds"
    )

    print("part 1: the model step (torch AdamW for both)")
    times = interleaved_times(
        {"dense seed": plain_step(dense, inputs, targets, 0.0), "MoE top-2": plain_step(moe, inputs, targets, ALPHA)},
        args.rounds,
    )
    med = report(times, tokens)
    time_ratio = med["MoE top-2"] / med["dense seed"]
    best_ratio = min(times["MoE top-2"]) / min(times["dense seed"])
    print(
        f"  MoE/dense time ratio {time_ratio:.3f} (fastest steps: {best_ratio:.3f}); active training FLOP "
        f"ratio {flop_ratio:.3f}; time/FLOP = {time_ratio / flop_ratio:.3f} (target <= 1.25)"
    )
    if args.no_engines:
        return

    print("part 2: the MoE step through the training loop's engines")
    from btx.train.engines.accelerate import AccelerateEngine
    from btx.train.engines.deepspeed import DeepSpeedEngine

    engines = {}
    for stage in (0, 2):
        _, model = seed_and_moe()
        engines[f"DeepSpeed ZeRO-{stage}"] = DeepSpeedEngine(model, settings(), zero_stage=stage)
    _, model = seed_and_moe()
    engines["accelerate"] = AccelerateEngine(model, SimpleNamespace(settings=settings()))
    times = interleaved_times(
        {name: engine_step(e, inputs, targets, ALPHA) for name, e in engines.items()}, args.rounds
    )
    med = report(times, tokens)
    for name in engines:
        if name != "accelerate":
            print(f"  {name} / accelerate: {med[name] / med['accelerate']:.3f} (median step)")
    for name in [n for n in engines if n != "accelerate"] + ["accelerate"]:  # accelerate tears down the group last
        engines[name].close()


if __name__ == "__main__":
    main()
