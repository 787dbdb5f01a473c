"""Data: documents in, token shards out, batches drawn from them.

    sources.py    what a domain's data is: files, directories, globs, save_to_disk dirs, hf:, Python callables
    readers.py    one file's documents by format: text, jsonl (.gz/.zst), parquet, arrow; hf: datasets
    tokenizer.py  the byte tokenizer and tokenizer.json (through `tokenizers`)
    writer.py     the train/val split by document and the streamed shard writer
    prepare.py    `prepare_domain` / `prepare_domains`: sources -> shards, resumable, locked
    encode.py     chunks of documents -> token ids, in this process or N worker processes, in order
    resume.py     checkpoints of an unfinished preparation (`.prepare-state.json`)
    shards.py     the shard format (btx-tokens-v1) and reading it back
    sampling.py   training batches as a pure function of (seed, step, rank); evaluation windows;
                  document ids of a window (document masking)
    corpora.py    the demo's built-in corpora, made from the standard library (`builtin:NAME`)

Start at prepare.py to see how a corpus becomes shards, at sampling.py for what training reads.
"""
