"""Benchmark: peak memory of `btx prepare` against corpus size (it must stay flat).

For each size (default 100 MB and 1 GB) a jsonl corpus of ~4 KB documents is generated, then a
fresh process prepares it (byte tokenizer: the pipeline's memory, not a tokenizer's, is measured;
the shards are as large as the text) and reports its peak RSS and its workers' peak RSS
(`getrusage`). Printed: the peaks per size and their ratio to the smallest size's.

    python bench/prepare_memory.py                     # 100 MB and 1000 MB, 1 and 2 workers
    python bench/prepare_memory.py --mb 50 200 --workers 2
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHILD = """
import json, resource, sys, time
from btx.data.prepare import prepare_domain
started = time.perf_counter()
prepare_domain("mem", sys.argv[1], "byte", sys.argv[2], progress=False, workers=int(sys.argv[3]))
seconds = time.perf_counter() - started
own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
print(json.dumps({"rss_mb": own, "worker_rss_mb": workers, "seconds": seconds}))
"""


def make_corpus(path: Path, megabytes: float) -> None:
    rng = random.Random(0)
    words = [f"w{i}" for i in range(2000)]
    block = [json.dumps({"text": " ".join(rng.choices(words, k=900))}) + "\n" for _ in range(256)]
    written = 0
    with open(path, "w", encoding="utf-8") as out:
        while written < megabytes * 1e6:
            line = block[rng.randrange(len(block))]
            out.write(line)
            written += len(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, nargs="+", default=[100, 1000])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        print(
            f"{'MB':>6} {'N':>3} {'seconds':>8} {'MB/s':>7} {'peak RSS MB':>12} {'worker RSS MB':>14} {'RSS ratio':>10}"
        )
        base: dict[int, float] = {}
        for megabytes in args.mb:
            corpus = tmp / "corpus.jsonl"
            make_corpus(corpus, megabytes)
            for workers in args.workers:
                out = tmp / f"out-{workers}"
                result = subprocess.run(
                    [sys.executable, "-c", CHILD, str(corpus), str(out), str(workers)],
                    capture_output=True,
                    text=True,
                    env={**os.environ, "PYTHONPATH": str(ROOT)},
                    check=True,
                )
                r = json.loads(result.stdout.strip().splitlines()[-1])
                base.setdefault(workers, r["rss_mb"])
                print(
                    f"{megabytes:>6.0f} {workers:>3} {r['seconds']:>8.1f} {megabytes / r['seconds']:>7.1f} "
                    f"{r['rss_mb']:>12.0f} {r['worker_rss_mb']:>14.0f} {r['rss_mb'] / base[workers]:>10.2f}"
                )
                for f in out.iterdir():
                    f.unlink()
            corpus.unlink()


if __name__ == "__main__":
    main()
