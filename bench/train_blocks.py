"""Benchmark: btx's training step under `train.compile` and `train.activation_checkpointing`.

    python bench/train_step.py --blocks                 # every part, both sizes, dense and MoE (CPU fp32, 2 threads)
    python bench/train_step.py --blocks --part speed --sizes demo --contenders eager/none compiled/none
    python bench/train_step.py --blocks --part compile  # first-step compile time, cold and warm caches

Two workloads, each through the engine its job uses in btx, at two sizes (`--sizes`):
- dense: a Llama on the accelerate engine;
- MoE: its 4-expert top-2 upcycled MoE (experts = the dense model's FFN plus noise, random routers)
  on the DeepSpeed engine at ZeRO-0 with alpha 0.01, as `btx finetune`.
Size "bench": bench/train_step.py's ~27M dense (d 512, 6 layers, vocab 8192) and
bench/finetune_step.py's ~46M MoE (4 layers, ~29M active), batch 4 x 256. Size "demo": the CPU
demo's model (recipes/demo/btx.yaml: d 64, 2 layers, vocab 1024, FFN 256) and its MoE, batch 16 x 256.

Part "speed": one process; contenders eager/compiled x none/full/selective, each built from the same
weights (btx.train.blocks.apply_block_settings and the loss's cross-entropy from
`cross_entropy_for`, as the loop does). Every contender first trains `--check-steps` steps on the
same batches (this also compiles): the table prints the largest difference of those losses from
eager/none. Then `--rounds` interleaved rounds (a, b, ..., b, a) of one timed step each; tokens/s
from the median step and the ratio to eager/none of the same run (the machine is shared: only
ratios within one run mean much).

Part "compile": what compiling costs a job, one fresh process per row (a job compiles anew in its
own process): the first training step's time against the median of the next steps, for eager/none
and compiled/none; compiled/none twice, first with an empty inductor cache directory (cold:
TORCHINDUCTOR_CACHE_DIR set to a new temporary directory), then again with that directory as the
first run left it (warm: inductor's FX graph cache and AOT autograd cache, on by default, hit;
dynamo still traces). The demo runs about nine training jobs; the warm row is what the later ones pay.

Part "memory": one fresh subprocess per configuration at batch 1 x `--mem-seq` (1024), run with
MALLOC_MMAP_THRESHOLD_=65536 so that glibc hands every allocation of 64 KiB or more straight back
to the OS when it is freed (RSS then follows live tensors rather than the allocator's cache). The
child trains one full step (compiling, allocating the optimizer state), gives every parameter a
zeroed .grad (so the gradients are not part of what is measured), resets the kernel's RSS
high-water mark (`/proc/self/clear_refs` <- 5), then runs forward, loss and backward. Reported:
activation peak = VmHWM during that forward+backward - VmRSS just before the forward; and the
bytes autograd saved for the backward (saved-tensor hooks, distinct storages, parameters excluded).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from finetune_step import ALPHA, seed_and_moe
from finetune_step import SEED as BENCH_MOE_SEED
from finetune_step import settings as moe_settings
from timing import interleaved_times

from btx.model.config import ModelConfig
from btx.model.transformer import Transformer
from btx.train.blocks import apply_block_settings, cross_entropy_for
from btx.train.loop import loss_terms

HERE = Path(__file__).resolve().parent
CONTENDERS = ("eager/none", "eager/full", "eager/selective", "compiled/none", "compiled/full", "compiled/selective")
SIZES = ("bench", "demo")
# recipes/demo/btx.yaml's model (its vocabulary is the demo tokenizer's 1024)
DEMO = ModelConfig(vocab_size=1024, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=256, max_seq_len=256)
BATCH = {"bench": 4, "demo": 16}  # the demo's train.batch_size is 16


def dense_config(size: str) -> ModelConfig:
    from train_step import CONFIG

    return CONFIG if size == "bench" else DEMO


def build(kind: str, contender: str, size: str, batch: int):
    """(engine, alpha, cross_entropy) for `kind` (dense | moe) at `size` with `contender`'s block
    settings ("compiled/full")."""
    how, mode = contender.split("/")
    block_settings = SimpleNamespace(activation_checkpointing=mode, compile=how == "compiled")
    cross_entropy = cross_entropy_for(block_settings)
    if kind == "dense":
        from train_step import settings

        from btx.train.engines.accelerate import AccelerateEngine

        model = Transformer(dense_config(size))
        model.init_weights(generator=torch.Generator().manual_seed(0))
        apply_block_settings(model, block_settings)
        engine_settings = settings("fp32")
        engine_settings.batch_size = batch
        return AccelerateEngine(model, SimpleNamespace(settings=engine_settings)), 0.0, cross_entropy
    from btx.train.engines.deepspeed import DeepSpeedEngine

    torch.manual_seed(0)  # seed_and_moe's expert noise draws from the global generator
    _, model = seed_and_moe(BENCH_MOE_SEED if size == "bench" else DEMO)
    apply_block_settings(model, block_settings, zero_stage=0)
    engine_settings = moe_settings()
    engine_settings.batch_size = batch
    return DeepSpeedEngine(model, engine_settings, zero_stage=0), ALPHA, cross_entropy


def batches(vocab: int, batch: int, seq: int, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(2)
    out = []
    for _ in range(n):
        tokens = torch.randint(0, vocab, (batch, seq + 1), generator=gen)
        out.append((tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()))
    return out


def one_step(engine, alpha: float, cross_entropy, inputs, targets) -> float:
    loss = loss_terms(engine.model(inputs), targets, alpha, 0.0, cross_entropy)[0]
    engine.backward(loss)
    engine.step()
    return loss.item()


def batch_of(size: str, args) -> int:
    return args.batch or BATCH[size]


def close(engines) -> None:
    for engine in reversed(list(engines)):  # DeepSpeed: the last engine tears the group down
        engine.close()


# ------------------------------------------------------------------------------------ speed


def speed(kind: str, size: str, args) -> None:
    batch = batch_of(size, args)
    engines = {name: build(kind, name, size, batch) for name in args.contenders}
    vocab = engines[args.contenders[0]][0].unwrapped.cfg.vocab_size
    check = batches(vocab, batch, args.seq, args.check_steps)
    losses = {}
    for name, (engine, alpha, cross_entropy) in engines.items():
        losses[name] = [one_step(engine, alpha, cross_entropy, x, y) for x, y in check]
    inputs, targets = batches(vocab, batch, args.seq, 1)[0]
    contenders = {
        name: (lambda e=engine, a=alpha, ce=cross_entropy: one_step(e, a, ce, inputs, targets))
        for name, (engine, alpha, cross_entropy) in engines.items()
    }
    times = interleaved_times(contenders, args.rounds)
    tokens = batch * args.seq
    base = statistics.median(times[args.contenders[0]])
    print(f"{kind} ({size} size): batch {batch} x {args.seq}, {args.rounds} rounds, {args.check_steps} checked steps")
    vs = "vs " + args.contenders[0]
    print(f"  {'contender':20s} {'median ms':>10s} {'tokens/s':>10s} {vs:>18s}  max |loss diff|")
    for name, ts in times.items():
        median = statistics.median(ts)
        diffs = [abs(a - b) for a, b in zip(losses[name], losses[args.contenders[0]])]
        print(f"  {name:20s} {median * 1e3:10.1f} {tokens / median:10,.0f} {base / median:17.3f}x  {max(diffs):.2e}")
        if args.verbose:
            print("    loss differences by step: " + " ".join(f"{d:.1e}" for d in diffs))
    close(engine for engine, _, _ in engines.values())


# ------------------------------------------------------------------------------------ compile


def compile_child(kind: str, contender: str, size: str, batch: int, seq: int, steps: int) -> dict:
    """Runs in a fresh process: the first step's seconds and the median of the next `steps`."""
    engine, alpha, cross_entropy = build(kind, contender, size, batch)
    inputs, targets = batches(engine.unwrapped.cfg.vocab_size, batch, seq, 1)[0]
    seconds = []
    for _ in range(steps + 1):
        started = time.perf_counter()
        one_step(engine, alpha, cross_entropy, inputs, targets)
        seconds.append(time.perf_counter() - started)
    close([engine])
    return {"first": seconds[0], "step": statistics.median(seconds[1:])}


def child_env(**extra: str) -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), **extra}


def run_child(flag: str, params: list[str], args, env: dict) -> dict:
    command = [sys.executable, str(HERE / "train_blocks.py"), flag, *params, "--threads", str(args.threads)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        print(done.stderr[-3000:])
        raise SystemExit(f"child {flag} {' '.join(params)} failed")
    return json.loads(done.stdout.strip().splitlines()[-1])


def compile_cost(kind: str, size: str, args) -> None:
    batch = batch_of(size, args)
    params = [kind, size, str(batch), str(args.seq), str(args.compile_steps)]
    with tempfile.TemporaryDirectory(prefix="btx-inductor-") as cache:
        env = child_env(TORCHINDUCTOR_CACHE_DIR=cache)
        rows = [
            ("eager/none", run_child("--compile-child", ["eager/none", *params], args, env)),
            ("compiled/none, cold cache", run_child("--compile-child", ["compiled/none", *params], args, env)),
            ("compiled/none, warm cache", run_child("--compile-child", ["compiled/none", *params], args, env)),
        ]
    print(f"{kind} ({size} size): first step against the next {args.compile_steps}, batch {batch} x {args.seq}")
    print(f"  {'run (fresh process)':28s} {'first step s':>12s} {'later step s':>12s} {'first - later s':>15s}")
    for name, r in rows:
        print(f"  {name:28s} {r['first']:12.2f} {r['step']:12.3f} {r['first'] - r['step']:15.2f}")


# ------------------------------------------------------------------------------------ memory


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def memory_child(kind: str, contender: str, size: str, seq: int) -> dict:
    """Runs in a fresh process (see the module docstring): the activation peak of one step."""
    engine, alpha, cross_entropy = build(kind, contender, size, 1)
    inputs, targets = batches(engine.unwrapped.cfg.vocab_size, 1, seq, 1)[0]
    one_step(engine, alpha, cross_entropy, inputs, targets)  # compiles, allocates the optimizer state
    params = [p for p in engine.unwrapped.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.zeros_like(p)
    param_storages = {p.untyped_storage().data_ptr() for p in engine.unwrapped.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in param_storages:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    before = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_terms(engine.model(inputs), targets, alpha, 0.0, cross_entropy)[0]
    engine.backward(loss)
    peak = _status("VmHWM")
    return {"activation_peak": peak - before, "saved": sum(saved.values())}


def memory(kind: str, size: str, args) -> None:
    env = child_env(MALLOC_MMAP_THRESHOLD_="65536")
    rows = [run_child("--memory-child", [kind, c, size, str(args.mem_seq)], args, env) for c in args.contenders]
    base = rows[0]["activation_peak"]
    print(f"{kind} ({size} size): peak activation memory of one step, batch 1 x {args.mem_seq} (fresh process each)")
    print(f"  {'contender':20s} {'peak MB':>9s} {'vs ' + rows[0]['contender']:>18s} {'saved for bwd MB':>17s}")
    for r in rows:
        print(
            f"  {r['contender']:20s} {r['activation_peak'] / 2**20:9.1f} {r['activation_peak'] / base:17.2f}x "
            f"{r['saved'] / 2**20:17.1f}"
        )


PARTS = ("speed", "compile", "memory")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--part", choices=(*PARTS, "all"), default="all")
    ap.add_argument("--sizes", nargs="+", choices=SIZES, default=list(SIZES))
    ap.add_argument("--kinds", nargs="+", choices=("dense", "moe"), default=["dense", "moe"])
    ap.add_argument("--contenders", nargs="+", choices=CONTENDERS, default=list(CONTENDERS))
    ap.add_argument("--batch", type=int, default=0, help="sequences per step (0: the size's, bench 4, demo 16)")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--check-steps", type=int, default=10)
    ap.add_argument("--compile-steps", type=int, default=4, help="steps after the first, part compile")
    ap.add_argument("--mem-seq", type=int, default=1024)
    ap.add_argument("--verbose", action="store_true", help="print each checked step's loss difference")
    ap.add_argument("--memory-child", nargs=4, metavar=("KIND", "CONTENDER", "SIZE", "SEQ"), help=argparse.SUPPRESS)
    ap.add_argument("--compile-child", nargs=6, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # a CPU benchmark, whatever the machine has
    if args.memory_child:
        kind, contender, size, seq = args.memory_child
        print(json.dumps({"contender": contender, **memory_child(kind, contender, size, int(seq))}))
        return
    if args.compile_child:
        contender, kind, size, batch, seq, steps = args.compile_child
        print(json.dumps(compile_child(kind, contender, size, int(batch), int(seq), int(steps))))
        return
    print(f"CPU fp32, {torch.get_num_threads()} threads")
    parts = PARTS if args.part == "all" else (args.part,)
    for size in args.sizes:
        for kind in args.kinds:
            if "speed" in parts:
                speed(kind, size, args)
            if "compile" in parts:
                compile_cost(kind, size, args)
            if "memory" in parts:
                memory(kind, size, args)


if __name__ == "__main__":
    main()
