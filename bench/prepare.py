"""Benchmark: `btx prepare` throughput against the tokenizer's floor, for 1 and N worker processes.

Workload: a generated jsonl corpus (default 8 MB: code-like and prose-like documents of 200 B to
8 KB) and a BPE tokenizer.json of 8192 tokens trained on it by `tokenizers` in this run (the same
kind of tokenizer a real run uses; the byte tokenizer would measure nothing).

- **floor(N)**: the same tokenizer's `encode_batch` over the same documents split across N spawned
  processes of one Rust thread each (TOKENIZERS_PARALLELISM=false), each process timing only its
  encode calls over documents it already holds; floor time = the slowest process. This is what
  the machine's cores can tokenize, with no reading, splitting or writing.
- **btx(N)**: `prepare_domain(..., workers=N)` end to end: reading the jsonl, the pool's start-up
  (spawn), the split, writing and fsyncing the shards.

Printed: tokens/s and MB/s of each, and btx/floor per N; then btx(N)/btx(1). Run it alone on the
machine (`flock /work/heavy.lock python bench/prepare.py`): timings on a shared CPU are noisy,
ratios within one run less so.

    python bench/prepare.py                 # 8 MB, N = 1 and 2
    python bench/prepare.py --mb 32 --workers 1 4 8
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from btx.data.prepare import prepare_domain
from btx.data.tokenizer import load_tokenizer

WORDS = (
    "the of and to in is that for it as with was on be by this are from or an which at not have "
    "def return import class self if else for while yield lambda None True False print range len "
    "model expert router token domain merge train loss gradient layer attention window batch"
).split()


def make_corpus(path: Path, megabytes: float, seed: int = 0) -> int:
    rng = random.Random(seed)
    written, documents = 0, 0
    with open(path, "w", encoding="utf-8") as out:
        while written < megabytes * 1e6:
            words = rng.randint(40, 1400)
            if rng.random() < 0.5:  # code-like
                lines = [
                    "    " * rng.randint(0, 3) + " ".join(rng.choices(WORDS, k=rng.randint(2, 9))) + ":"
                    for _ in range(words // 6)
                ]
                text = "\n".join(lines)
            else:
                text = " ".join(rng.choices(WORDS, k=words)) + "."
            line = json.dumps({"text": text}) + "\n"
            out.write(line)
            written += len(line.encode())
            documents += 1
    return documents


def train_tokenizer(corpus: Path, directory: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=8192, special_tokens=["<|endoftext|>"])
    with open(corpus, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for _, line in zip(range(4000), f)]
    tokenizer.train_from_iterator(texts, trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    return directory / "tokenizer.json"


def _floor_worker(args) -> tuple[float, int]:
    tokenizer_path, corpus, index, count = args
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    tokenizer = load_tokenizer(tokenizer_path)
    with open(corpus, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for i, line in enumerate(f) if i % count == index]
    started, tokens = time.perf_counter(), 0
    for first in range(0, len(texts), 1024):
        tokens += sum(len(ids) for ids in tokenizer.encode_batch(texts[first : first + 1024]))
    return time.perf_counter() - started, tokens


def floor(tokenizer_path: Path, corpus: Path, workers: int) -> tuple[float, int]:
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        results = pool.map(_floor_worker, [(str(tokenizer_path), str(corpus), i, workers) for i in range(workers)])
    return max(seconds for seconds, _ in results), sum(tokens for _, tokens in results)


def btx_prepare(tokenizer_path: Path, corpus: Path, out: Path, workers: int) -> tuple[float, int]:
    started = time.perf_counter()
    summary = prepare_domain("bench", corpus, tokenizer_path, out, progress=False, workers=workers)
    seconds = time.perf_counter() - started
    tokens = (
        summary["train"]["tokens"]
        + summary["val"]["tokens"]
        - summary["train"]["documents"]
        - summary["val"]["documents"]
    )
    return seconds, tokens  # tokens without the EOS btx appends, as the floor counts them


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=8.0, help="corpus size in MB (default 8)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts (default 1 2)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per measurement; the best is kept")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        corpus = tmp / "corpus.jsonl"
        documents = make_corpus(corpus, args.mb)
        megabytes = corpus.stat().st_size / 1e6
        tokenizer_path = train_tokenizer(corpus, tmp / "tok")
        print(
            f"corpus: {megabytes:.1f} MB, {documents:,} documents; BPE tokenizer of 8192 tokens; {os.cpu_count()} cores"
        )
        print(f"{'N':>3} {'floor tok/s':>12} {'btx tok/s':>12} {'btx MB/s':>9} {'btx/floor':>10} {'btx/btx(1)':>11}")
        base = None
        for workers in args.workers:
            floor_s = min(floor(tokenizer_path, corpus, workers)[0] for _ in range(args.rounds))
            _, floor_tokens = floor(tokenizer_path, corpus, 1) if base is None else (0, base[1])
            times = []
            for r in range(args.rounds):
                seconds, tokens = btx_prepare(tokenizer_path, corpus, tmp / f"out-{workers}-{r}", workers)
                times.append(seconds)
            btx_s = min(times)
            assert tokens == floor_tokens, (tokens, floor_tokens)
            if base is None:
                base = (btx_s, floor_tokens)
            print(
                f"{workers:>3} {floor_tokens / floor_s:>12,.0f} {tokens / btx_s:>12,.0f} {megabytes / btx_s:>9.2f} "
                f"{floor_s / btx_s:>10.2f} {base[0] / btx_s:>11.2f}"
            )
        outputs = [tmp / f"out-{w}-0" / "train.bin" for w in args.workers]
        same = len({p.read_bytes() for p in outputs}) == 1
        print(f"shards byte-identical across N: {same}")


if __name__ == "__main__":
    main()
