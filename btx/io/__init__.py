"""Hugging Face checkpoints and btx's own files on disk, the same for every family.

A btx checkpoint is a plain HF directory in its family's dense form (`LlamaForCausalLM`,
`Qwen3ForCausalLM`, ...) or MoE form (`MixtralForCausalLM`, `Qwen3MoeForCausalLM`, ...; see
btx/families/), in the per-expert layout save_pretrained writes, so transformers, vLLM and
lm-evaluation-harness open it with no btx code.

    layout.py      config.json <-> ModelConfig and btx names <-> HF names, through the family key tables
    reader.py      safetensors headers parsed by btx, lazy tensor reads (never unpickled)
    writer.py      streaming safetensors writes: header first, one tensor at a time
    checkpoint.py  whole-model save/load for small models and tests
    atomic.py      atomic files and directories, strict JSON
    hashing.py     sha256 of files and its stat-keyed cache
    finite.py      the NaN / Inf check on every tensor read (on tensors, and on raw bytes)
    manifest.py    DONE.json and content identities (provenance)
    locks.py       one process per output
    disk.py        disk-full and permission errors as one line
    startup.py     read-ahead and a gc-paused import for fast short commands
"""
