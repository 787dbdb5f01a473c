"""Benchmark: per-rank peak host memory of ZeRO-3 against ZeRO-0, two gloo ranks, dense and MoE.

Workload: the real commands, each on 2 CPU processes (gloo), fp32, a few steps of short sequences,
so that the model, its gradients and AdamW's state dominate memory and activations do not:
- dense: `btx train RECIPE --domain text` from a seed written by transformers itself
  (`LlamaForCausalLM`, hidden 1024, 12 layers, FFN 2816, vocab 32000: ~220M parameters, fp32
  safetensors, `save_pretrained`), at `train.zero_stage=0` and `=3`;
- moe: `btx finetune RECIPE --model DIR` of a Mixtral written by transformers (hidden 768,
  8 layers, 4 experts top-2, FFN 2048, vocab 32000: ~220M parameters), at `finetune.zero_stage=0`
  and `=3`.

Each rank is started by this script (the rendezvous variables torchrun would set), so
`os.wait4` gives each rank's own peak resident set (ru_maxrss), which is what a machine must hold.
The target (issue 21): the dense job's ZeRO-3 peak is at most 0.6x its ZeRO-0 peak, and the
losses agree within 1e-5.

Where a rank's bytes are (P parameters, fp32, AdamW; measured phase by phase with --phases, docs/BENCHMARKS.md):
- ZeRO-0 (DeepSpeed's engine): weights 4P, gradients 4P, moments 8P, and at the end of each
  backward the all-reduce's flat copy of the gradients 4P: 20P at the peak.
- ZeRO-3 over N ranks: the weights' partition, the gradients' partition and the moments, 16P / N,
  plus what a backward holds for a while (the gathered layers, each parameter's full gradient until
  it is reduced; the largest here are the 32000 x 1024 embedding and output matrices).
Two things used to add to ZeRO-3 (0.86x dense, 0.83x MoE): DeepSpeed's fp32 master partition, an
exact copy of the weights' partition in fp32 (4P / N), now shared with it
(btx/train/engines/zero3_master.py); and glibc's heaps, which kept 1.75 GB of freed tensors
resident per rank, now returned (btx/train/engines/host_memory.py).

Measured (2 gloo ranks, 2-core CPU, default sizes, 3 steps of 1 x 64 tokens per rank):

| job | params | ZeRO-0 | ZeRO-3 | ZeRO-3 / ZeRO-0 | max loss diff | max weight diff |
|---|---|---|---|---|---|---|
| dense | 220M | 5.01 GB / 5.04 GB | 2.71 GB / 2.71 GB | 0.54x | 4.8e-07 | 1.5e-06 |
| moe | 219M | 5.45 GB / 5.44 GB | 2.59 GB / 2.59 GB | 0.47x | 9.5e-07 | 2.0e-06 |

Printed: per-rank peak RSS in GB, the ZeRO-3 / ZeRO-0 ratio (of the larger rank), the largest
loss difference over the steps, and the largest difference between the two exports' weights.

    flock /work/heavy.lock python bench/zero3_memory.py               # both jobs (~12 GB at peak)
    python bench/zero3_memory.py --jobs dense --steps 2 --seq-len 32
    python bench/zero3_memory.py --small                              # a quick check of the script
    python bench/zero3_memory.py --jobs dense --phases                # where rank 0's memory goes

(--phases walks the live objects at each phase, which takes time but no memory worth counting.)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from btx.io.reader import CheckpointReader

REPO = Path(__file__).resolve().parents[1]
WORLD = 2
WORDS = "the of and to in is was for on that with as by at from his her which or be an are it this".split()


def write_text(path: Path, n_docs: int) -> None:
    rng = random.Random(0)
    lines = (
        json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(60, 200)))}) for _ in range(n_docs)
    )
    path.write_text("\n".join(lines) + "\n")


# --small: both seeds at a size that runs in seconds (a check of the script, not a measurement).
SMALL_MODEL = dict(
    hidden_size=64,
    num_hidden_layers=2,
    intermediate_size=128,
    vocab_size=512,
    num_attention_heads=4,
    num_key_value_heads=4,
)


def write_dense_seed(out: Path, small: bool) -> int:
    from transformers import LlamaConfig, LlamaForCausalLM

    size = SMALL_MODEL if small else {}
    config = LlamaConfig(
        **{
            "hidden_size": 1024,
            "num_hidden_layers": 12,
            "intermediate_size": 2816,
            "vocab_size": 32000,
            "num_attention_heads": 16,
            "num_key_value_heads": 16,
            "max_position_embeddings": 2048,
            "tie_word_embeddings": False,
            **size,
        }
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).float()
    model.save_pretrained(out, safe_serialization=True)
    return sum(p.numel() for p in model.parameters())


def write_moe(out: Path, small: bool) -> int:
    from transformers import MixtralConfig, MixtralForCausalLM

    size = SMALL_MODEL if small else {}
    config = MixtralConfig(
        **{
            "hidden_size": 768,
            "num_hidden_layers": 8,
            "intermediate_size": 2048,
            "vocab_size": 32000,
            "num_attention_heads": 12,
            "num_key_value_heads": 12,
            "num_local_experts": 4,
            "num_experts_per_tok": 2,
            "max_position_embeddings": 2048,
            "tie_word_embeddings": False,
            **size,
        }
    )
    torch.manual_seed(1)
    model = MixtralForCausalLM(config).float()
    model.save_pretrained(out, safe_serialization=True)
    return sum(p.numel() for p in model.parameters())


def recipe(root: Path, seed: Path, steps: int, seq_len: int) -> Path:
    (root / "text.yaml").write_text("data:\n  sources: [text.jsonl]\n  val_fraction: 0.1\n")
    path = root / "btx.yaml"
    path.write_text(
        f"""experiment: zero3-memory
tokenizer: byte
seed: {{path: {seed}}}
domains: {{text: text.yaml}}
train: {{lr: 1.0e-4, warmup_steps: 1, steps: {steps}, batch_size: 1, seq_len: {seq_len}, precision: fp32,
        checkpoint_every: 0, eval_every: 0, eval_batches: 1, log_every: 1}}
finetune:
  mixture: {{text: 1}}
"""
    )
    return path


def btx(*args: str, env: dict | None = None) -> None:
    subprocess.run([sys.executable, "-m", "btx", *args], check=True, env=env, cwd=REPO)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(args: list[str], log: Path, phases: bool = False) -> list[int]:
    """`python -m btx ARGS` on WORLD ranks; each rank's peak RSS in bytes. With `phases`, every rank
    logs its memory phase by phase into LOG.phases.txt (bench/rss_phases/sitecustomize.py)."""
    port = str(free_port())
    tracing = (
        {"PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'bench' / 'rss_phases'}", "BTX_PHASE_TRACE": str(phase_log(log))}
        if phases
        else {}
    )
    procs = []
    with open(log, "w") as out:
        for rank in range(WORLD):
            env = {
                **os.environ,
                "PYTHONPATH": str(REPO),
                "OMP_NUM_THREADS": "1",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": port,
                "RANK": str(rank),
                "LOCAL_RANK": str(rank),
                "WORLD_SIZE": str(WORLD),
                "LOCAL_WORLD_SIZE": str(WORLD),
                **tracing,
            }
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "btx", *args], env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO
                )
            )
        peaks, failed = [], []
        for proc in procs:
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            peaks.append(usage.ru_maxrss * 1024)  # KiB on Linux
            if proc.returncode:
                failed.append(proc.returncode)
    if failed:
        sys.exit(f"{' '.join(args[:2])} failed (exit {failed}); see {log}:\n{log.read_text()[-3000:]}")
    return peaks


def phase_log(log: Path) -> Path:
    return log.with_suffix(".phases.txt")


def losses(metrics: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in metrics.read_text().splitlines()]


def median_step_s(metrics: Path) -> float:
    times = sorted(json.loads(line)["step_time_s"] for line in metrics.read_text().splitlines())
    return times[len(times) // 2]


def max_weight_diff(a: Path, b: Path) -> float:
    """Largest |a - b| over every tensor of two checkpoints, one tensor at a time."""
    worst = 0.0
    with CheckpointReader(a) as ra, CheckpointReader(b) as rb:
        for name in ra.btx_names():
            x, y = ra.get_btx(name, torch.float32), rb.get_btx(name, torch.float32)
            worst = max(worst, float((x - y).abs().max()))
    return worst


def gigabytes(peaks: list[int]) -> str:
    return " / ".join(f"{p / 1e9:.2f} GB" for p in peaks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", default="dense,moe", help="comma-separated: dense, moe")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--small", action="store_true", help="tiny models: checks the script, measures nothing")
    parser.add_argument("--keep", help="work in this directory and keep it")
    parser.add_argument(
        "--phases", action="store_true", help="print rank 0's memory phase by phase (RSS, live tensors, heaps)"
    )
    args = parser.parse_args()
    jobs = [j for j in args.jobs.split(",") if j]

    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="btx-zero3-mem-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        write_text(root / "text.jsonl", 400)
        models = {}
        if "dense" in jobs:
            models["dense"] = write_dense_seed(root / "seed", args.small)
        if "moe" in jobs:
            models["moe"] = write_moe(root / "moe", args.small)
        seed = root / "seed" if "dense" in jobs else root / "moe"  # recipes need a seed; moe runs pass --model
        path = recipe(root, seed, args.steps, args.seq_len)
        btx("prepare", str(path), f"run_dir={root / 'shared'}")

        rows = []
        for job in jobs:
            peaks, curves, exports = {}, {}, {}
            for stage in (0, 3):
                run_dir = root / f"{job}-zero{stage}"
                shutil.rmtree(run_dir, ignore_errors=True)
                shutil.copytree(root / "shared" / "data", run_dir / "data")
                if job == "dense":
                    cmd = ["train", str(path), "--domain", "text", f"train.zero_stage={stage}"]
                    metrics, export = (
                        run_dir / "experts" / "text" / "metrics.jsonl",
                        run_dir / "experts" / "text" / "final",
                    )
                else:
                    cmd = ["finetune", str(path), "--model", str(root / "moe"), f"finetune.zero_stage={stage}"]
                    metrics, export = run_dir / "finetune-train" / "metrics.jsonl", run_dir / "finetuned"
                started = time.perf_counter()
                log = root / f"{job}-zero{stage}.log"
                peaks[stage] = run_ranks([*cmd, f"run_dir={run_dir}"], log, args.phases)
                if args.phases:
                    print("".join(line for line in phase_log(log).open() if line.startswith("rank0")), end="")
                print(
                    f"{job} ZeRO-{stage}: {time.perf_counter() - started:.0f} s (median step "
                    f"{median_step_s(metrics):.2f} s), peak RSS per rank "
                    + ", ".join(f"{p / 1e9:.2f} GB" for p in peaks[stage]),
                    flush=True,
                )
                curves[stage], exports[stage] = losses(metrics), export
            loss_diff = max(abs(a - b) for a, b in zip(curves[0], curves[3]))
            rows.append(
                (
                    job,
                    models[job],
                    peaks[0],
                    peaks[3],
                    max(peaks[3]) / max(peaks[0]),
                    loss_diff,
                    max_weight_diff(exports[0], exports[3]),
                )
            )
            for stage in (0, 3):  # a GB or two of checkpoints each
                shutil.rmtree(root / f"{job}-zero{stage}", ignore_errors=True)

        print(f"\n2 gloo ranks, fp32, {args.steps} steps of 1 x {args.seq_len} tokens per rank; peak RSS per rank")
        print("| job | params | ZeRO-0 | ZeRO-3 | ZeRO-3 / ZeRO-0 | max loss diff | max weight diff |")
        print("|---|---|---|---|---|---|---|")
        for job, params, zero0, zero3, ratio, loss_diff, weight_diff in rows:
            print(
                f"| {job} | {params / 1e6:.0f}M | {gigabytes(zero0)} | {gigabytes(zero3)} | {ratio:.2f}x "
                f"| {loss_diff:.1e} | {weight_diff:.1e} |"
            )
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
