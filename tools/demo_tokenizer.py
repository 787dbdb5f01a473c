"""The demo's BPE tokenizer (recipes/demo/tokenizer/), trained on the demo's own three corpora.

    python tools/demo_tokenizer.py           # write recipes/demo/tokenizer/
    python tools/demo_tokenizer.py --check   # exit 1 if the committed files differ from a fresh build

Why the demo is not byte-level: BTX routes tokens, one at a time. A byte carries little of its
domain (a space, an `e`), so a router that sees a tiny model's hidden state of one byte sends a
quarter of code tokens to the wrong expert; 1024 BPE tokens (about 2.5 bytes each) carry enough
that the same router sends 87-99% of each domain's tokens to its own expert (docs/DEMO.md).

Byte-level BPE (every byte is in the vocabulary, so nothing is out of vocabulary), 1024 tokens
including `<|endoftext|>`, the document separator btx appends. Training is deterministic for a
given corpus; the corpora come from the running Python's standard library, so a build on another
Python version can differ slightly (`--check` says so rather than failing on a different stdlib).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
OUT = REPO / "recipes" / "demo" / "tokenizer"
VOCAB = 1024
EOS = "<|endoftext|>"
CORPORA = ("python_code", "arithmetic", "python_docs")
CORPUS_BYTES = 1_500_000  # as the demo's domain recipes


def build() -> dict[str, bytes]:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from btx.data.corpora import builtin_corpus

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=[EOS],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([t for name in CORPORA for t in builtin_corpus(name, CORPUS_BYTES)], trainer)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": EOS,
        "bos_token": None,
        "model_max_length": 256,
        "clean_up_tokenization_spaces": False,
        "btx_built_by": f"tools/demo_tokenizer.py on Python {sys.version_info.major}.{sys.version_info.minor}",
    }
    return {
        "tokenizer.json": tok.to_str().encode() + b"\n",
        "tokenizer_config.json": (json.dumps(config, indent=2) + "\n").encode(),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    files = build()
    if args.check:
        recorded = json.loads((OUT / "tokenizer_config.json").read_text())["btx_built_by"]
        mine = json.loads(files["tokenizer_config.json"])["btx_built_by"]
        if recorded != mine:
            print(
                f"demo tokenizer: committed one was built {recorded.split(' on ')[-1]}, "
                f"this is {mine.split(' on ')[-1]}: its corpora differ, so no byte comparison",
                file=sys.stderr,
            )
            return 0
        differ = [n for n, data in files.items() if (OUT / n).read_bytes() != data]
        if differ:
            print(
                f"demo tokenizer: {', '.join(differ)} differ from a fresh build; run tools/demo_tokenizer.py",
                file=sys.stderr,
            )
            return 1
        return 0
    OUT.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (OUT / name).write_bytes(data)
    print(f"wrote {OUT}/ ({', '.join(files)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
