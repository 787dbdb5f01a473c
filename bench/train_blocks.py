"""Benchmark: btx's training step under `train.compile` and `train.activation_checkpointing`.

    python bench/train_step.py --blocks                 # both parts, dense and MoE (CPU fp32, 2 threads)
    python bench/train_step.py --blocks --part speed --kinds dense

Two workloads, each through the engine its job uses in btx:
- dense: bench/train_step.py's ~27M-parameter Llama (d 512, 6 layers) on the accelerate engine;
- MoE: bench/finetune_step.py's 4-expert top-2 MoE (~46M, ~29M active; experts = the seed's FFN
  plus noise, random routers) on the DeepSpeed engine at ZeRO-0 with alpha 0.01, as `btx finetune`.

Part "speed": one process; contenders eager/compiled x none/full/selective, each built from the same
weights (btx.train.blocks.apply_block_settings, as the loop does). Every contender first trains
`--check-steps` steps on the same batches (this also compiles): the table prints the largest
difference of those losses from eager/none. Then `--rounds` interleaved rounds (a, b, ..., b, a)
of one timed step each at batch `--batch` x `--seq`; tokens/s from the median step and the ratio
to eager/none of the same run (the machine is shared: only ratios within one run mean much).

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
from pathlib import Path
from types import SimpleNamespace

import torch
from finetune_step import ALPHA, seed_and_moe
from finetune_step import settings as moe_settings
from timing import interleaved_times

from btx.model.transformer import Transformer
from btx.train.blocks import apply_block_settings
from btx.train.loop import loss_terms

HERE = Path(__file__).resolve().parent
CONTENDERS = ("eager/none", "eager/full", "eager/selective", "compiled/none", "compiled/full", "compiled/selective")


def dense_settings() -> SimpleNamespace:
    from train_step import settings

    s = settings("fp32")
    s.batch_size = 4
    return s


def build(kind: str, contender: str):
    """(engine, alpha) for `kind` (dense | moe) with `contender`'s block settings ("compiled/full")."""
    how, mode = contender.split("/")
    block_settings = SimpleNamespace(activation_checkpointing=mode, compile=how == "compiled")
    if kind == "dense":
        from train_step import CONFIG

        from btx.train.engines.accelerate import AccelerateEngine

        model = Transformer(CONFIG)
        model.init_weights(generator=torch.Generator().manual_seed(0))
        apply_block_settings(model, block_settings)
        return AccelerateEngine(model, SimpleNamespace(settings=dense_settings())), 0.0
    from btx.train.engines.deepspeed import DeepSpeedEngine

    torch.manual_seed(0)  # seed_and_moe's expert noise draws from the global generator
    _, model = seed_and_moe()
    apply_block_settings(model, block_settings, zero_stage=0)
    return DeepSpeedEngine(model, moe_settings(), zero_stage=0), ALPHA


def batches(vocab: int, batch: int, seq: int, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(2)
    out = []
    for _ in range(n):
        tokens = torch.randint(0, vocab, (batch, seq + 1), generator=gen)
        out.append((tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()))
    return out


def one_step(engine, alpha: float, inputs, targets) -> float:
    loss = loss_terms(engine.model(inputs), targets, alpha, 0.0)[0]
    engine.backward(loss)
    engine.step()
    return loss.item()


# ------------------------------------------------------------------------------------ speed


def speed(kind: str, args) -> None:
    engines = {name: build(kind, name) for name in args.contenders}
    vocab = engines[args.contenders[0]][0].unwrapped.cfg.vocab_size
    check = batches(vocab, args.batch, args.seq, args.check_steps)
    losses = {}
    for name, (engine, alpha) in engines.items():
        losses[name] = [one_step(engine, alpha, x, y) for x, y in check]
    inputs, targets = batches(vocab, args.batch, args.seq, 1)[0]
    contenders = {
        name: (lambda e=engine, a=alpha: one_step(e, a, inputs, targets)) for name, (engine, alpha) in engines.items()
    }
    times = interleaved_times(contenders, args.rounds)
    tokens = args.batch * args.seq
    base = statistics.median(times[args.contenders[0]])
    print(f"{kind}: batch {args.batch} x {args.seq}, {args.rounds} rounds, {args.check_steps} checked steps")
    vs = "vs " + args.contenders[0]
    print(f"  {'contender':20s} {'median ms':>10s} {'tokens/s':>10s} {vs:>18s}  max |loss diff|")
    for name, ts in times.items():
        median = statistics.median(ts)
        diffs = [abs(a - b) for a, b in zip(losses[name], losses[args.contenders[0]])]
        print(f"  {name:20s} {median * 1e3:10.1f} {tokens / median:10,.0f} {base / median:17.3f}x  {max(diffs):.2e}")
        if args.verbose:
            print("    loss differences by step: " + " ".join(f"{d:.1e}" for d in diffs))
    for engine, _ in reversed(list(engines.values())):  # DeepSpeed: the last engine tears the group down
        engine.close()


# ------------------------------------------------------------------------------------ memory


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def memory_child(kind: str, contender: str, seq: int) -> dict:
    """Runs in a fresh process (see the module docstring): the activation peak of one step."""
    engine, alpha = build(kind, contender)
    inputs, targets = batches(engine.unwrapped.cfg.vocab_size, 1, seq, 1)[0]
    one_step(engine, alpha, inputs, targets)  # compiles, allocates the optimizer state
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
        loss = loss_terms(engine.model(inputs), targets, alpha, 0.0)[0]
    engine.backward(loss)
    peak = _status("VmHWM")
    return {"contender": contender, "activation_peak": peak - before, "saved": sum(saved.values())}


def memory(kind: str, args) -> None:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": os.pathsep.join(sys.path)}
    rows = []
    for contender in args.contenders:
        command = [sys.executable, str(HERE / "train_blocks.py"), "--memory-child", kind, contender, str(args.mem_seq)]
        command += ["--threads", str(args.threads)]
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            print(done.stderr[-3000:])
            raise SystemExit(f"memory child {kind} {contender} failed")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    base = rows[0]["activation_peak"]
    print(f"{kind}: peak activation memory of one step, batch 1 x {args.mem_seq} (fresh process each)")
    print(f"  {'contender':20s} {'peak MB':>9s} {'vs ' + rows[0]['contender']:>18s} {'saved for bwd MB':>17s}")
    for r in rows:
        print(
            f"  {r['contender']:20s} {r['activation_peak'] / 2**20:9.1f} {r['activation_peak'] / base:17.2f}x "
            f"{r['saved'] / 2**20:17.1f}"
        )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--part", choices=("speed", "memory", "both"), default="both")
    ap.add_argument("--kinds", nargs="+", choices=("dense", "moe"), default=["dense", "moe"])
    ap.add_argument("--contenders", nargs="+", choices=CONTENDERS, default=list(CONTENDERS))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--check-steps", type=int, default=10)
    ap.add_argument("--mem-seq", type=int, default=1024)
    ap.add_argument("--verbose", action="store_true", help="print each checked step's loss difference")
    ap.add_argument("--memory-child", nargs=3, metavar=("KIND", "CONTENDER", "SEQ"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # a CPU benchmark, whatever the machine has
    if args.memory_child:
        kind, contender, seq = args.memory_child
        print(json.dumps(memory_child(kind, contender, int(seq))))
        return
    print(f"CPU fp32, {torch.get_num_threads()} threads")
    for kind in args.kinds:
        if args.part in ("speed", "both"):
            speed(kind, args)
        if args.part in ("memory", "both"):
            memory(kind, args)


if __name__ == "__main__":
    main()
