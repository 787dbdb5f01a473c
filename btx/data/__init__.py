"""Data: documents in, token shards out, batches drawn from them.

    sources.py    what a domain's data is: text files, directories, jsonl, Python callables
    tokenizer.py  the byte tokenizer and tokenizer.json (through `tokenizers`)
    writer.py     the train/val split by document and the streamed shard writer
    prepare.py    `prepare_domain` / `prepare_domains`: sources -> shards, resumable, locked
    shards.py     the shard format (btx-tokens-v1) and reading it back
    sampling.py   training batches as a pure function of (seed, step, rank); evaluation windows
    corpora.py    the demo's built-in corpora, made from the standard library (`builtin:NAME`)

Start at prepare.py to see how a corpus becomes shards, at sampling.py for what training reads.
"""
