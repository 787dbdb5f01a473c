"""Benchmark: `btx merge` wall time against the I/O floor, and the merge's peak RSS.

    python bench/merge.py                 # scale 1: a seed and 3 experts of ~1 GB each (bf16)
    python bench/merge.py --scale 1 2     # also checkpoints twice as large (more layers)

Setup (not timed): a random Llama seed (vocab 32000, dim 2048, FFN 5632, bf16, with as many layers
as make about 1 GB per unit of --scale: 7 at scale 1, 17 at scale 2) and three random experts,
laid out as a btx run directory in --dir (default /tmp/btx-bench, deleted at the end):
experts/<d>/final with a DONE.json next to it, as `btx train` leaves them, and the seed as an
external checkpoint (no DONE.json).
Also printed: the merge's CPU seconds (all threads), which is what bounds it on a small machine:
besides the I/O it hashes its output and every input it reads (sha256, about 1.8 GB/s) and starts Python and
torch (1.3-1.7 s). What keeps it near the floor: the expert FFNs, 80-85% of the output here, are
copied file to file with sendfile and hashed from the mapped page cache (no user-space copy), and
the inputs are read ahead while torch imports (btx/io/startup.py).

Measured, in alternating order for --rounds rounds:
- merge: `python -m btx merge --seed ... --expert ... --out ...` as a subprocess, so interpreter and
  torch start-up count; the merge fsyncs its output. Peak RSS is the child's ru_maxrss from
  wait4(), the number GNU `time -v` prints as "Maximum resident set size".
- floor: read every input file once (16 MiB reads into one reused buffer), then write the number of
  bytes the merge wrote into one file and fsync it: the least any merge of these inputs must do.
Both start from the same page-cache state: cold (caches dropped with /proc/sys/vm/drop_caches)
when this process may do that (root), otherwise warm (every input read once beforehand); the table
says which. The ratio is median merge / median floor, the target <= 1.5 (mergekit-moe: 5.8x on such
inputs); "rounds" is the range of merge / floor within each round, which shows how noisy the
machine was (on a shared VM the disk's speed can change twofold from one minute to the next).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from btx.io.layout import TensorSpec, hf_shapes
from btx.io.manifest import hash_dir, write_done
from btx.io.writer import write_checkpoint
from btx.model.config import ModelConfig

DOMAINS = ("code", "math", "prose")
_BLOCK = 16 << 20


def bench_config(scale: int) -> ModelConfig:
    """A Llama of about `scale` GB in bf16: the layer count grows with the scale (the embeddings
    do not), so the largest tensor, and with it the merge's memory, stays the same."""
    cfg = ModelConfig(vocab_size=32000, dim=2048, n_layers=1, n_heads=16, n_kv_heads=16, ffn_dim=5632, max_seq_len=4096)
    one_layer = cfg.param_counts()["total"] - (ModelConfig(**{**cfg.__dict__, "n_layers": 0}).param_counts()["total"])
    fixed = cfg.param_counts()["total"] - one_layer
    cfg.n_layers = max(1, round((scale * 0.5e9 - fixed) / one_layer))
    return cfg


def write_random_checkpoint(path: Path, cfg: ModelConfig, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    specs = [
        TensorSpec(name, shape, torch.bfloat16,
                      lambda shape=shape: torch.empty(shape, dtype=torch.bfloat16).normal_(0, 0.02, generator=gen))
        for name, shape in hf_shapes(cfg).items()
    ]  # fmt: skip
    write_checkpoint(path, cfg, specs)


def build(root: Path, scale: int) -> tuple[Path, dict[str, Path]]:
    cfg = bench_config(scale)
    seed = root / "seed"
    size = cfg.param_counts()["total"] * 2 / 1e9
    print(f"building a seed and {len(DOMAINS)} experts of {size:.2f} GB each in {root}")
    write_random_checkpoint(seed, cfg, 0)
    experts = {}
    for i, d in enumerate(DOMAINS, 1):
        final = root / "experts" / d / "final"
        write_random_checkpoint(final, cfg, i)
        outputs = {f"final/{k}": v for k, v in hash_dir(final).items()}
        write_done(final.parent, {"stage": "train", "tokens": 10**9 * i, "outputs": outputs, "export": str(final)})
        experts[d] = final
    return seed, experts


def input_files(seed: Path, experts: dict[str, Path]) -> list[Path]:
    return [f for d in (seed, *experts.values()) for f in sorted(d.iterdir()) if f.is_file()]


def drop_caches() -> bool:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        return True
    except OSError:
        return False


def read_all(files: list[Path]) -> None:
    buf = bytearray(_BLOCK)
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass


def prepare_cache(cold: bool, files: list[Path]) -> None:
    if cold:
        drop_caches()
    else:
        read_all(files)


def floor(files: list[Path], out_bytes: int, scratch: Path, cold: bool) -> tuple[float, float, float]:
    """(read seconds, write+fsync seconds, CPU seconds)."""
    prepare_cache(cold, files)
    c0 = os.times()
    t0 = time.perf_counter()
    read_all(files)
    t1 = time.perf_counter()
    block = os.urandom(_BLOCK)
    with open(scratch, "wb", buffering=0) as fh:
        left = out_bytes
        while left > 0:
            left -= fh.write(block[: min(left, _BLOCK)])
        os.fsync(fh.fileno())
    fd = os.open(scratch.parent, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    t2 = time.perf_counter()
    c1 = os.times()
    scratch.unlink()
    return t1 - t0, t2 - t1, (c1.user - c0.user) + (c1.system - c0.system)


def run_merge(
    seed: Path, experts: dict[str, Path], out: Path, files: list[Path], cold: bool
) -> tuple[float, float, int, int]:
    """(wall seconds, CPU seconds, peak RSS bytes, output bytes) of one `python -m btx merge` subprocess."""
    shutil.rmtree(out, ignore_errors=True)
    prepare_cache(cold, files)
    cmd = [sys.executable, "-m", "btx", "merge", "--seed", str(seed), "--out", str(out), "--quiet",
           *(f"--expert={d}={p}" for d, p in experts.items())]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"merge failed with exit status {proc.returncode}")
    out_bytes = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    cpu = usage.ru_utime + usage.ru_stime
    return seconds, cpu, usage.ru_maxrss * 1024, out_bytes  # ru_maxrss is in KiB on Linux


def bench(scale: int, root: Path, rounds: int, cold: bool) -> dict:
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    seed, experts = build(root, scale)
    files = input_files(seed, experts)
    in_bytes = sum(f.stat().st_size for f in files)
    out = root / "merged"
    merges, floors, rss, cpus = [], [], [], []
    out_bytes = None
    for r in range(rounds):
        # alternate the order so that drift on a shared machine hits both sides alike
        order = ("merge", "floor") if r % 2 == 0 else ("floor", "merge")
        for what in order:
            if what == "merge":
                s, cpu, peak, out_bytes = run_merge(seed, experts, out, files, cold)
                merges.append(s)
                cpus.append(cpu)
                rss.append(peak)
                print(f"  round {r + 1}: merge {s:.1f} s (CPU {cpu:.1f} s), peak RSS {peak / 2**30:.2f} GiB")
            else:
                if out_bytes is None:  # the floor needs the merge's output size
                    out_bytes = run_merge(seed, experts, out, files, cold)[3]
                rd, wr, cpu = floor(files, out_bytes, root / "floor.bin", cold)
                floors.append((rd, wr))
                print(f"  round {r + 1}: floor read {rd:.1f} s + write/fsync {wr:.1f} s (CPU {cpu:.1f} s)")
    shutil.rmtree(root, ignore_errors=True)
    merge_s = statistics.median(merges)
    floor_s = statistics.median(rd + wr for rd, wr in floors)
    return {
        "scale": scale, "in_gb": in_bytes / 1e9, "out_gb": out_bytes / 1e9,
        "read_s": statistics.median(rd for rd, _ in floors), "write_s": statistics.median(wr for _, wr in floors),
        "floor_s": floor_s, "merge_s": merge_s, "ratio": merge_s / floor_s, "rss_gib": max(rss) / 2**30,
        "merge_cpu_s": statistics.median(cpus),
        "round_ratios": [m / (rd + wr) for m, (rd, wr) in zip(merges, floors)],
    }  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", type=int, nargs="+", default=[1], help="checkpoint sizes in units of ~1 GB (default 1)")
    p.add_argument("--rounds", type=int, default=2, help="merge/floor pairs per scale; medians are shown (default 2)")
    p.add_argument("--dir", type=Path, default=Path("/tmp/btx-bench"), help="scratch directory (deleted at the end)")
    p.add_argument("--warm", action="store_true", help="warm page cache even when caches could be dropped")
    args = p.parse_args()
    if args.dir.resolve().is_relative_to(REPO):
        raise SystemExit(f"--dir {args.dir}: keep the scratch data out of the repository")
    cold = not args.warm and drop_caches()
    rows = []
    try:
        for scale in args.scale:
            rows.append(bench(scale, args.dir / f"scale{scale}", args.rounds, cold))
    finally:
        shutil.rmtree(args.dir, ignore_errors=True)
    if cold:
        cache = "cold page cache (dropped before each run)"
    else:
        cache = "warm page cache (inputs read once before each run)"
    print(f"\nbtx merge vs the I/O floor, 3 experts + seed kept, bf16, {cache}; {os.cpu_count()} CPUs")
    head = (
        f"{'scale':>5} {'in GB':>6} {'out GB':>6} {'read s':>7} {'write s':>8} {'floor s':>8} {'merge s':>8} "
        f"{'ratio':>6} {'rounds':>11} {'merge CPU s':>11} {'peak RSS':>9}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['scale']:>5} {r['in_gb']:>6.2f} {r['out_gb']:>6.2f} {r['read_s']:>7.1f} {r['write_s']:>8.1f} "
              f"{r['floor_s']:>8.1f} {r['merge_s']:>8.1f} {r['ratio']:>5.2f}x "
              f"{min(r['round_ratios']):>5.2f}-{max(r['round_ratios']):.2f}x {r['merge_cpu_s']:>11.1f} "
              f"{r['rss_gib']:>5.2f} GiB")  # fmt: skip
    print("targets: ratio <= 1.5 (mergekit-moe: 5.8x), peak RSS <= 1.5 GB at every scale")


if __name__ == "__main__":
    main()
