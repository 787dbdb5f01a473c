"""Memory per process predicted by `btx plan` (btx.plan.memory) against the measured peak, on this CPU.

Three jobs of a ~45M-parameter dense model (byte vocabulary, d 512, 8 layers, FFN 2048) and the
4-expert top-2 MoE upcycled from it (~110M parameters), all fp32 (btx's precision "auto" on a CPU):

  dense    `btx train RECIPE --domain code`                  accelerate, one process
  moe      `btx finetune RECIPE --model MERGED`              DeepSpeed ZeRO-0, one process
  zero3    `torchrun --nproc_per_node 2 -m btx finetune ...`  DeepSpeed ZeRO-3, 2 gloo ranks

Measured: the peak resident set size (RSS high-water mark, `ru_maxrss` of the job's process tree as
`getrusage(RUSAGE_CHILDREN)` reports it: the largest single process, i.e. one rank) minus the
idle baseline: the same measure for a python process that has imported torch, deepspeed,
accelerate and btx's training modules and done nothing else. The difference is what training
adds: weights, gradients, optimizer states, buffers, activations (plus allocator slack).
glibc's malloc keeps freed memory in its heap and hands it out again only for requests that fit the
holes, so an activation freed in one micro-batch's backward is often not reused by the next forward
and the RSS grows by ~40% over what is alive (a GPU's caching allocator reuses such blocks). The jobs
and the baseline therefore run with MALLOC_MMAP_THRESHOLD_=65536: every allocation of 64 KiB or more
is its own mapping, returned to the system when freed, so the RSS peak is the peak of the bytes
torch holds. (Without it the ratios were 1.45, 1.39 and 1.68.)
Each job trains 3 steps and is then killed by btx's test hook (BTX_TRAIN_KILL_AT_STEP) before it
saves or exports, so the peak is the training step's, not a checkpoint write's.

    flock /work/heavy.lock python bench/plan_memory.py        # ~2-3 minutes on 2 cores
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from btx.plan.memory import job_memory, param_counts  # noqa: E402
from btx.plan.stages import load_for_plan, seed_config, training_jobs  # noqa: E402

MIB = 2**20
RECIPE = """\
experiment: plan-memory
run_dir: {run}
tokenizer: byte
model: {{vocab_size: 320, dim: 512, n_layers: 8, n_heads: 8, n_kv_heads: 8, ffn_dim: 2048, max_seq_len: 256}}
domains: {{code: code.yaml, math: math.yaml, prose: prose.yaml}}
train:
  steps: 4
  batch_size: 4
  seq_len: 256
  grad_accum: 2
  precision: fp32
  checkpoint_every: 0
  eval_every: 0
  eval_batches: 1
  log_every: 1
seed: {{train: {{steps: 1}}}}
merge: {{top_k: 2}}
finetune: {{zero_stage: 0}}
"""
DOMAIN = "data: {{builtin: {name}, builtin_bytes: 400000}}\n"
IDLE = (
    "import torch, deepspeed, accelerate, transformers; import btx.train.loop, btx.train.finetune, "
    "btx.train.engines.deepspeed"
)


def peak_rss(cmd: list[str], env: dict | None = None, cwd: Path | None = None) -> int:
    """The largest RSS high-water mark (bytes) of any process of `cmd`'s tree, run in a fresh
    wrapper so earlier children do not count."""
    wrapper = (
        "import resource, subprocess, sys; "
        "subprocess.run(sys.argv[1:]); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    out = subprocess.run(
        [sys.executable, "-c", wrapper, *cmd], env=env, cwd=cwd, capture_output=True, text=True, check=True
    )
    return int(out.stdout.strip().splitlines()[-1]) * 1024  # Linux: KiB


def run(cmd: list[str], env: dict, cwd: Path) -> None:
    result = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"setup failed: {' '.join(cmd)}\n{result.stderr[-3000:]}")


def main() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2", "MALLOC_MMAP_THRESHOLD_": "65536"}
    py = [sys.executable, "-m", "btx"]
    with tempfile.TemporaryDirectory(prefix="btx-plan-memory-") as tmp:
        tmp = Path(tmp)
        recipe = tmp / "btx.yaml"
        recipe.write_text(RECIPE.format(run=tmp / "run"))
        for name, corpus in (("code", "python_code"), ("math", "arithmetic"), ("prose", "python_docs")):
            (tmp / f"{name}.yaml").write_text(DOMAIN.format(name=corpus))
        run([*py, "prepare", str(recipe)], env, tmp)
        run([*py, "train", str(recipe), "--seed"], env, tmp)  # the seed the jobs start from
        merged = tmp / "run" / "upcycled"
        run([*py, "merge", "--seed", str(tmp / "run" / "seed"), "--upcycle", "4", "--out", str(merged)], env, tmp)

        exp = load_for_plan(str(recipe))
        seed = seed_config(exp, None)
        jobs = {j.name: j for j in training_jobs(exp, seed)}
        dense_job, moe_job = jobs["expert:code"], jobs["finetune"]
        zero3_job = type(moe_job)(**{**moe_job.__dict__, "zero_stage": 3})

        kill = {**env, "BTX_TRAIN_KILL_AT_STEP": "3"}
        idle = peak_rss([sys.executable, "-c", IDLE], env, tmp)
        cases = [
            ("dense (accelerate, 1 process)", dense_job, 1, [*py, "train", str(recipe), "--domain", "code"]),
            (
                "MoE finetune (ZeRO-0, 1 process)",
                moe_job,
                1,
                [*py, "finetune", str(recipe), "--model", str(merged), "--out", str(tmp / "ft0")],
            ),
            (
                "MoE finetune (ZeRO-3, 2 gloo ranks)",
                zero3_job,
                2,
                [
                    sys.executable,
                    "-m",
                    "torch.distributed.run",
                    "--nproc_per_node",
                    "2",
                    "-m",
                    "btx",
                    "finetune",
                    str(recipe),
                    "--model",
                    str(merged),
                    "--out",
                    str(tmp / "ft3"),
                    "finetune.zero_stage=3",
                ],
            ),
        ]
        print(
            f"idle baseline (python + torch, deepspeed, accelerate, transformers, btx imported): {idle / MIB:,.0f} MiB"
            " (subtracted); MALLOC_MMAP_THRESHOLD_=65536"
        )
        header = f"{'job':<36} {'params':>8} {'predicted MiB':>14} {'measured MiB':>13} {'ratio':>6}"
        print(header)
        print("-" * len(header))
        for label, job, world, cmd in cases:
            predicted = job_memory(job, world, "fp32")
            measured = peak_rss(cmd, kill, tmp) - idle
            n = param_counts(job.cfg, job.trainable).total
            print(
                f"{label:<36} {n / 1e6:>7.1f}M {predicted.peak / MIB:>14,.0f} {measured / MIB:>13,.0f} "
                f"{measured / predicted.peak:>6.2f}"
            )
            parts = ", ".join(f"{k} {v / MIB:,.0f}" for k, v in predicted.to_dict().items() if k != "peak")
            print(textwrap.indent(f"predicted: {parts} MiB", "    "))


if __name__ == "__main__":
    main()
