"""prepare at scale: shards byte-identical for any number of tokenizer workers, and a prepare
killed (SIGKILL) halfway resumes from its last checkpointed chunk and ends with the same bytes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from btx.data import prepare as prepare_module
from btx.data.prepare import TEST_KILL_ENV, prepare_domain
from btx.data.resume import STATE_FILE

ROOT = Path(__file__).resolve().parents[1]
KILLED_PREPARE = (
    "import sys; from btx.data.prepare import prepare_domain; "
    "prepare_domain('d', sys.argv[1], 'byte', sys.argv[2], progress=False)"
)


def _corpus(path: Path, documents: int) -> Path:
    with open(path, "w", encoding="utf-8") as out:
        for i in range(documents):
            out.write(json.dumps({"text": f"doc {i} " + "lorem ipsum dolor " * (i % 5 + 1)}) + "\n")
    return path


def _bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if not p.name.startswith(".")}


def test_one_and_two_workers_give_byte_identical_shards(tmp_path, monkeypatch):
    corpus = _corpus(tmp_path / "c.jsonl", 3000)
    monkeypatch.setattr(prepare_module, "_ENCODE_BATCH_DOCS", 256)  # several chunks in flight
    one = prepare_domain("d", corpus, "byte", tmp_path / "w1", progress=False, workers=1)
    two = prepare_domain("d", corpus, "byte", tmp_path / "w2", progress=False, workers=2)
    assert _bytes(tmp_path / "w1") == _bytes(tmp_path / "w2")
    assert one["train"]["documents"] + one["val"]["documents"] == 3000
    assert one["val"]["documents"] == two["val"]["documents"] > 0


def test_a_killed_prepare_resumes_and_ends_with_the_same_bytes(tmp_path):
    corpus = _corpus(tmp_path / "c.jsonl", 5000)  # 5 chunks of 1024 documents
    prepare_domain("d", corpus, "byte", tmp_path / "whole", progress=False)

    out = tmp_path / "killed"
    env = {**os.environ, TEST_KILL_ENV: "2", "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-c", KILLED_PREPARE, str(corpus), str(out)], env=env, capture_output=True)
    assert run.returncode == -signal.SIGKILL, run.stderr.decode()
    assert (out / STATE_FILE).is_file() and not (out / "train.json").exists()

    summary = prepare_domain("d", corpus, "byte", out, progress=False)
    assert summary["resumed"] == {"documents": 2048, "bytes": summary["resumed"]["bytes"], "chunks": 2}
    assert 0 < summary["resumed"]["bytes"] < corpus.stat().st_size
    assert _bytes(out) == _bytes(tmp_path / "whole")
    assert not (out / STATE_FILE).exists() and not [p for p in out.iterdir() if p.name.startswith(".")]


def test_a_checkpoint_of_other_sources_is_not_resumed(tmp_path):
    corpus = _corpus(tmp_path / "c.jsonl", 3000)
    out = tmp_path / "out"
    env = {**os.environ, TEST_KILL_ENV: "1", "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-c", KILLED_PREPARE, str(corpus), str(out)], env=env, capture_output=True)
    assert run.returncode == -signal.SIGKILL, run.stderr.decode()
    _corpus(corpus, 2500)  # the corpus changed in between: start over
    summary = prepare_domain("d", corpus, "byte", out, progress=False)
    assert summary["resumed"]["documents"] == 0
    prepare_domain("d", corpus, "byte", tmp_path / "fresh", progress=False)
    assert _bytes(out) == _bytes(tmp_path / "fresh")


def test_progress_shows_rates_and_a_resume_says_what_it_skipped(tmp_path, capsys):
    corpus = _corpus(tmp_path / "c.jsonl", 3000)
    out = tmp_path / "out"
    env = {**os.environ, TEST_KILL_ENV: "1", "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-c", KILLED_PREPARE, str(corpus), str(out)], env=env, capture_output=True)
    assert run.returncode == -signal.SIGKILL, run.stderr.decode()
    prepare_domain("d", corpus, "byte", out, progress=True, workers=2)
    err = capsys.readouterr().err
    assert "docs/s" in err and "tok/s" in err and "prepare d" in err
    assert "resumed a killed run after 1,024 documents" in err
    prepare_domain("d", corpus, "byte", tmp_path / "fresh", progress=False)
    assert _bytes(out) == _bytes(tmp_path / "fresh")  # killed at 1 worker, finished at 2: the same bytes
