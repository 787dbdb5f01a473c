"""Token shards: preparing domains, the train/val split, shard checks, and batch sampling."""

import json
import os

import numpy as np
import pytest
import torch

from btx.data.prepare import prepare_domain, prepare_domains
from btx.data.sampling import DataStream, PlannedSampler, TokenSampler, eval_batches
from btx.data.shards import check_tokenizer, load_domain, load_shard, token_dtype
from btx.data.sources import PythonSource
from btx.data.tokenizer import ByteTokenizer
from btx.errors import BtxError

BYTE = ByteTokenizer()


def documents_of(shard, tokenizer=BYTE) -> list[str]:
    """Decode a shard back into its documents (they end with EOS)."""
    ids = np.asarray(shard.tokens).tolist()
    docs, current = [], []
    for i in ids:
        if i == tokenizer.eos_id:
            docs.append(tokenizer.decode(current))
            current = []
        else:
            current.append(i)
    assert not current, "every document ends with EOS"
    return docs


def shard_files(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


@pytest.fixture
def text_dir(tmp_path):
    """40 small documents in nested directories, plus files that must be ignored or filtered."""
    root = tmp_path / "corpus"
    for i in range(40):
        sub = root / f"part{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"doc{i:02d}.txt").write_text(f"document number {i} — ünïcode {'x' * i}\n", encoding="utf-8")
    (root / ".hidden").write_text("never read")
    (root / "part0" / "notes.md").write_text("a markdown note")
    return root


def small_shard(tmp_path, name, text, copies=1, **kw):
    """A prepared train shard whose documents are `text` repeated (distinct by an index suffix)."""
    docs = [f"{text}{i}" for i in range(copies)]
    prepare_domain(name, [PythonSource(docs)], BYTE, tmp_path / name, progress=False, val_fraction=0.0, **kw)
    return load_shard(tmp_path / name / "train.bin")


# ------------------------------------------------------------------------------------------
# prepare_domain
# ------------------------------------------------------------------------------------------


def test_prepare_directory_of_text_files(tmp_path, text_dir):
    summary = prepare_domain("prose", [str(text_dir)], "byte", tmp_path / "out", val_fraction=0.2, progress=False)
    shards = load_domain(tmp_path / "out")
    train, val = shards["train"], shards["val"]
    expected = sorted(p.read_text(encoding="utf-8") for p in text_dir.rglob("*") if p.is_file() and p.name != ".hidden")
    assert len(expected) == 41
    train_docs, val_docs = documents_of(train), documents_of(val)
    # Split by document: no document in both, none lost.
    assert not set(train_docs) & set(val_docs)
    assert sorted(train_docs + val_docs) == expected
    assert 1 <= len(val_docs) < len(expected) // 2
    for split, shard in shards.items():
        meta = shard.meta
        assert meta["format"] == "btx-tokens-v1" and meta["domain"] == "prose" and meta["split"] == split
        assert meta["dtype"] == "uint16" and shard.tokens.dtype == np.uint16
        assert meta["tokenizer"] == BYTE.identity()
        assert meta["documents"] == len(documents_of(shard)) and meta["tokens"] == len(shard)
        assert meta["sources"][0]["files"] == 41
        shard.verify()
    assert summary["train"]["tokens"] + summary["val"]["tokens"] == sum(len(d.encode()) + 1 for d in expected)
    assert isinstance(train.tokens, np.memmap) and not train.tokens.flags.writeable
    assert shard_files(tmp_path / "out") == ["train.bin", "train.json", "val.bin", "val.json"]


def test_prepare_is_deterministic_and_seed_changes_the_split(tmp_path, text_dir):
    a = prepare_domain("d", [text_dir], BYTE, tmp_path / "a", val_fraction=0.3, progress=False)
    b = prepare_domain("d", [text_dir], BYTE, tmp_path / "b", val_fraction=0.3, progress=False)
    c = prepare_domain("d", [text_dir], BYTE, tmp_path / "c", val_fraction=0.3, seed=1, progress=False)
    assert a["train"]["sha256"] == b["train"]["sha256"] and a["val"]["sha256"] == b["val"]["sha256"]
    assert a["val"]["sha256"] != c["val"]["sha256"]


def test_glob_selects_files(tmp_path, text_dir):
    prepare_domain(
        "d", [{"path": text_dir, "glob": "**/*.md"}], BYTE, tmp_path / "out", val_fraction=0.0, progress=False
    )  # one file: nothing to hold out
    shards = load_domain(tmp_path / "out")
    assert documents_of(shards["train"]) + documents_of(shards["val"]) == ["a markdown note"]


def test_prepare_jsonl_with_custom_field(tmp_path):
    path = tmp_path / "docs.jsonl"
    lines = [json.dumps({"body": f"line {i} ∑"}) for i in range(30)]
    path.write_text("\n".join(lines[:10]) + "\n\n" + "\n".join(lines[10:]) + "\n", encoding="utf-8")
    summary = prepare_domain("math", path, BYTE, tmp_path / "out", text_field="body", progress=False)
    shards = load_domain(tmp_path / "out")
    docs = documents_of(shards["train"]) + documents_of(shards["val"])
    assert sorted(docs) == sorted(f"line {i} ∑" for i in range(30))
    assert summary["train"]["documents"] + summary["val"]["documents"] == 30


def test_prepare_from_callable_and_generator(tmp_path):
    def corpus():
        yield from ({"text": f"def f{i}(): return {i}"} for i in range(10))

    prepare_domain("code", corpus, BYTE, tmp_path / "a", progress=False)
    prepare_domain("code", (f"def f{i}(): return {i}" for i in range(10)), BYTE, tmp_path / "b", progress=False)
    assert (
        load_shard(tmp_path / "a" / "train.json").meta["sha256"]
        == load_shard(tmp_path / "b" / "train.json").meta["sha256"]
    )
    assert load_shard(tmp_path / "a" / "train.json").meta["sources"][0]["callable"].endswith("corpus")


def test_progress_bar_runs(tmp_path, text_dir, capsys):
    prepare_domain("prose", text_dir, BYTE, tmp_path / "out", progress=True)
    assert "prepare prose" in capsys.readouterr().err


def test_val_gets_a_document_even_when_the_fraction_rounds_to_none(tmp_path):
    summary = prepare_domain(
        "d", PythonSource(["first doc", "second doc"]), BYTE, tmp_path / "two", val_fraction=1e-9, progress=False
    )
    assert summary["train"]["documents"] == 1 and summary["val"]["documents"] == 1
    # One document: nothing can be held out, which is an error now rather than an empty val shard
    # that only a later evaluation would trip over; nothing is left behind.
    with pytest.raises(BtxError, match="nothing to hold out for validation: .* holds 1 document"):
        prepare_domain("d", PythonSource(["only doc"]), BYTE, tmp_path / "one", val_fraction=0.99, progress=False)
    assert not (tmp_path / "one").exists()


def test_val_fraction_zero_means_no_val(tmp_path):
    summary = prepare_domain("d", PythonSource(["a", "b", "c"]), BYTE, tmp_path, val_fraction=0.0, progress=False)
    assert summary["val"]["documents"] == 0 and summary["train"]["documents"] == 3


class BigVocabTokenizer(ByteTokenizer):
    """Bytes shifted beyond 65536: needs uint32 shards."""

    vocab_size = 70_000
    eos_id = 69_999

    def encode_batch(self, texts):
        return [ids.astype(np.uint32) + 65_600 for ids in super().encode_batch(texts)]

    def identity(self):
        return {"kind": "fake", "vocab_size": self.vocab_size, "hash": "f" * 64}


def test_dtype_follows_vocab_size(tmp_path):
    assert token_dtype(256) == np.uint16 and token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32
    prepare_domain("big", PythonSource(["héllo", "world"]), BigVocabTokenizer(), tmp_path, progress=False)
    train = load_shard(tmp_path / "train.bin")
    assert train.meta["dtype"] == "uint32" and train.tokens.dtype == np.uint32
    assert int(train.tokens.max()) == 69_999 and int(np.asarray(train.tokens)[:-1].min()) >= 65_600
    assert (tmp_path / "train.bin").stat().st_size == 4 * len(train)


def test_tokenizer_ids_beyond_vocab_are_rejected(tmp_path):
    class Broken(ByteTokenizer):
        vocab_size = 100

    with pytest.raises(BtxError, match="beyond its vocab_size 100"):
        prepare_domain("d", PythonSource(["zzz"]), Broken(), tmp_path / "out", progress=False)
    assert shard_files(tmp_path / "out") == []


def test_hf_tokenizer_shards(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["[UNK]", "</s>", "the", "cat", "sat", "a", "bird", "sang", "dog", "ate"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path / "tok" / "tokenizer.json"
    path.parent.mkdir()
    tok.save(str(path))
    prepare_domain(
        "d",
        PythonSource(["the cat sat", "a bird sang", "the dog ate"]),
        path,
        tmp_path / "out",
        val_fraction=0.0,
        progress=False,
    )
    train = load_shard(tmp_path / "out" / "train.bin")
    check_tokenizer(train, path)
    with pytest.raises(BtxError, match="train.bin: tokenized with a hf tokenizer"):
        check_tokenizer(train, BYTE)
    assert len(train) == 3 * 3 + 3  # three words and one EOS per document


# ------------------------------------------------------------------------------------------
# Bad input: one clear error naming the culprit, and nothing half-written
# ------------------------------------------------------------------------------------------


def test_missing_source_path(tmp_path):
    with pytest.raises(BtxError, match="no-such-dir: source not found"):
        prepare_domain("d", [tmp_path / "no-such-dir"], BYTE, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_bad_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "also fine"}\n{"text": broken\n')
    with pytest.raises(BtxError, match=r"docs.jsonl:3: not valid JSON"):
        prepare_domain("d", path, BYTE, tmp_path / "out", progress=False)
    assert shard_files(tmp_path / "out") == []
    path.write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    with pytest.raises(BtxError, match=r"docs.jsonl:2: expected a JSON object with a string field 'text'"):
        prepare_domain("d", path, BYTE, tmp_path / "out", progress=False)


def test_empty_domain(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(BtxError, match="empty: no files match"):
        prepare_domain("d", tmp_path / "empty", BYTE, tmp_path / "out", progress=False)
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.txt").write_text("")
    with pytest.raises(BtxError, match=r"domain 'd': no documents .*blank"):
        prepare_domain("d", tmp_path / "blank", BYTE, tmp_path / "out", progress=False)
    with pytest.raises(BtxError, match="domain 'd': no documents"):
        prepare_domain("d", lambda: iter(()), BYTE, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_failed_prepare_keeps_the_previous_shards(tmp_path):
    good = tmp_path / "docs.jsonl"
    good.write_text('{"text": "one"}\n{"text": "two"}\n')
    first = prepare_domain("d", good, BYTE, tmp_path / "out", progress=False)
    good.write_text('{"text": "one"}\n{"oops": 1}\n')
    with pytest.raises(BtxError, match="docs.jsonl:2"):
        prepare_domain("d", good, BYTE, tmp_path / "out", progress=False)
    assert shard_files(tmp_path / "out") == ["train.bin", "train.json", "val.bin", "val.json"]
    assert load_shard(tmp_path / "out" / "train.bin", verify=True).meta["sha256"] == first["train"]["sha256"]


def test_non_utf8_file_is_named(tmp_path):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    with pytest.raises(BtxError, match="image.png: not UTF-8 text"):
        prepare_domain("d", tmp_path / "corpus", BYTE, tmp_path / "out", progress=False)


def test_bad_options(tmp_path):
    with pytest.raises(BtxError, match="val_fraction"):
        prepare_domain("d", PythonSource(["a"]), BYTE, tmp_path, val_fraction=1.0, progress=False)
    with pytest.raises(BtxError, match="domain name"):
        prepare_domain("../escape", PythonSource(["a"]), BYTE, tmp_path, progress=False)
    with pytest.raises(BtxError, match="unknown key"):
        prepare_domains({"d": {"sources": ["x"], "val_fraktion": 0.1}}, BYTE, tmp_path, progress=False)


def test_truncated_bin(tmp_path):
    shard = small_shard(tmp_path, "d", "some text ", copies=5)
    with open(shard.path, "r+b") as handle:
        handle.truncate(shard.path.stat().st_size - 2)
    with pytest.raises(BtxError, match=r"d/train.bin: truncated: expected \d+ bytes"):
        load_shard(tmp_path / "d" / "train.json")


def test_missing_sidecar_and_corrupt_contents(tmp_path):
    shard = small_shard(tmp_path, "d", "some text ", copies=5)
    data = bytearray(shard.path.read_bytes())
    data[0] ^= 1
    del shard
    (tmp_path / "d" / "train.bin").write_bytes(bytes(data))
    load_shard(tmp_path / "d" / "train.bin")  # sizes still agree: only verify notices
    with pytest.raises(BtxError, match="do not match the sha256"):
        load_shard(tmp_path / "d" / "train.bin", verify=True)
    os.remove(tmp_path / "d" / "train.json")
    with pytest.raises(BtxError, match="train.json: sidecar missing"):
        load_shard(tmp_path / "d" / "train.bin")
    with pytest.raises(BtxError, match="nope.bin: shard not found"):
        load_shard(tmp_path / "d" / "nope.bin")


# ------------------------------------------------------------------------------------------
# prepare_domains
# ------------------------------------------------------------------------------------------


def test_prepare_domains_skips_prepared_domains(tmp_path, text_dir):
    jsonl = tmp_path / "math.jsonl"
    jsonl.write_text("".join(json.dumps({"text": f"{i} + {i} = {2 * i}"}) + "\n" for i in range(20)))
    domains = {"prose": [text_dir], "math": {"sources": [jsonl], "val_fraction": 0.25}}
    first = prepare_domains(domains, BYTE, tmp_path / "data", progress=False)
    assert not first["prose"]["skipped"] and not first["math"]["skipped"]
    assert first["math"]["train"]["options"]["val_fraction"] == 0.25
    again = prepare_domains(domains, BYTE, tmp_path / "data", progress=False)
    assert again["prose"]["skipped"] and again["math"]["skipped"]
    assert again["math"]["train"]["sha256"] == first["math"]["train"]["sha256"]
    # A changed source, a different tokenizer, or force: prepared again.
    jsonl.write_text(jsonl.read_text() + json.dumps({"text": "new"}) + "\n")
    changed = prepare_domains(domains, BYTE, tmp_path / "data", progress=False)
    assert not changed["math"]["skipped"] and changed["prose"]["skipped"]
    big = prepare_domains({"prose": [text_dir]}, BigVocabTokenizer(), tmp_path / "data", progress=False)
    assert not big["prose"]["skipped"] and big["prose"]["train"]["dtype"] == "uint32"
    forced = prepare_domains(domains, BYTE, tmp_path / "data", force=True, progress=False)
    assert not forced["math"]["skipped"]


# ------------------------------------------------------------------------------------------
# Sampling
# ------------------------------------------------------------------------------------------


@pytest.fixture
def two_domains(tmp_path):
    """Domain 'a' is all 'a' bytes, domain 'b' all 'b' bytes (plus EOS), so rows reveal their domain."""
    a = small_shard(tmp_path, "a", "a" * 200, copies=10, append_eos=False)
    b = small_shard(tmp_path, "b", "b" * 200, copies=10, append_eos=False)
    return {"a": a, "b": b}


def test_batch_is_a_function_of_seed_and_step(two_domains):
    sampler = TokenSampler(two_domains, {"a": 0.5, "b": 0.5}, seq_len=16, batch_size=8, seed=3)
    inputs, targets = sampler.batch(7)
    assert inputs.shape == targets.shape == (8, 16) and inputs.dtype == targets.dtype == torch.int64
    assert torch.equal(inputs[:, 1:], targets[:, :-1])  # targets are the next tokens
    # A fresh sampler (a resumed run) sees the same batch at the same step.
    again = TokenSampler(two_domains, {"a": 0.5, "b": 0.5}, seq_len=16, batch_size=8, seed=3).batch(7)
    assert torch.equal(again[0], inputs) and torch.equal(again[1], targets)
    assert not torch.equal(sampler.batch(8)[0], inputs)
    other_seed = TokenSampler(two_domains, {"a": 0.5, "b": 0.5}, seq_len=16, batch_size=8, seed=4)
    assert not torch.equal(other_seed.batch(7)[0], inputs)


def test_a_planned_sampler_replays_every_stream_batch_once_interleaved_then_the_next_phase(two_domains):
    """Data-matched baselines: the experts' batches (one stream per domain, interleaved evenly),
    then the finetune's mixture from its batch `first` on; each batch as its own sampler drew it."""
    a = TokenSampler({"a": two_domains["a"]}, None, seq_len=16, batch_size=4, seed=1)
    b = TokenSampler({"b": two_domains["b"]}, None, seq_len=16, batch_size=4, seed=2)
    mix = TokenSampler(two_domains, {"a": 1.0, "b": 3.0}, seq_len=16, batch_size=4, seed=5)
    plan = [
        [DataStream(["a"], None, 1, 0, 2), DataStream(["b"], None, 2, 0, 4)],
        [DataStream(["a", "b"], {"a": 1.0, "b": 3.0}, 5, 3, 2)],
    ]
    sampler = PlannedSampler(two_domains, plan, seq_len=16, batch_size=4)
    # a's batches sit at 1/4 and 3/4 of the first phase, b's at 1/8, 3/8, 5/8, 7/8
    expected = [(b, 0), (a, 0), (b, 1), (b, 2), (a, 1), (b, 3), (mix, 3), (mix, 4)]
    assert len(sampler) == len(expected)
    for index, (source, own) in enumerate(expected):
        for rank in (0, 1):  # the rows of each rank, as for the sampler it replays
            got, want = sampler.batch(index, rank, 2), source.batch(own, rank, 2)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (index, rank)
    with pytest.raises(BtxError, match="micro-batch 8 asked for, but the plan holds 8"):
        sampler.batch(8)
    with pytest.raises(BtxError, match="names \\['c'\\], which have no train shard"):
        PlannedSampler(two_domains, [[DataStream(["c"], None, 0, 0, 1)]], seq_len=16, batch_size=4)


def test_windows_come_from_the_shard(tmp_path):
    shard = small_shard(tmp_path, "d", "0123456789", copies=30)
    flat = np.asarray(shard.tokens).astype(np.int64)
    sampler = TokenSampler([shard], seq_len=12, batch_size=16, seed=0)
    inputs, targets = sampler.batch(0)
    for row_in, row_target in zip(inputs.numpy(), targets.numpy()):
        window = np.concatenate([row_in, row_target[-1:]])
        starts = [s for s in range(len(flat) - 12) if np.array_equal(flat[s : s + 13], window)]
        assert starts, "every row is a contiguous window of the shard"


def test_rank_split_is_disjoint_and_covers_the_global_batch(two_domains):
    sampler = TokenSampler(two_domains, seq_len=8, batch_size=12, seed=0)
    global_inputs, global_targets = sampler.batch(5)
    parts = [sampler.batch(5, rank=r, world_size=3) for r in range(3)]
    assert all(p[0].shape == (4, 8) for p in parts)
    assert torch.equal(torch.cat([p[0] for p in parts]), global_inputs)
    assert torch.equal(torch.cat([p[1] for p in parts]), global_targets)
    domains = sum((sampler.row_domains(5, r, 3) for r in range(3)), [])
    assert domains == sampler.row_domains(5)
    with pytest.raises(BtxError, match="batch_size: 12 does not divide evenly over 5 ranks"):
        sampler.batch(5, rank=0, world_size=5)


def test_mixture_weights_are_respected(two_domains):
    sampler = TokenSampler(two_domains, {"a": 0.8, "b": 0.2}, seq_len=4, batch_size=2000, seed=0)
    inputs, _ = sampler.batch(0)
    from_a = (inputs == ord("a")).any(dim=1)  # a window of 4 always holds some of its domain's letter
    assert abs(from_a.float().mean().item() - 0.8) < 0.03
    assert sampler.row_domains(0).count("a") == int(from_a.sum())
    only_b = TokenSampler(two_domains, {"a": 0, "b": 1}, seq_len=4, batch_size=64, seed=0)
    assert not bool((only_b.batch(1)[0] == ord("a")).any())


def test_sampler_errors(tmp_path, two_domains):
    tiny = small_shard(tmp_path, "tiny", "abc")  # "abc0" + EOS
    with pytest.raises(BtxError, match=r"tiny/train.bin: 5 tokens, fewer than seq_len \+ 1 = 9"):
        TokenSampler({"tiny": tiny}, seq_len=8, batch_size=2)
    with pytest.raises(BtxError, match="weights: keys must be the domains"):
        TokenSampler(two_domains, {"a": 1.0, "c": 1.0}, seq_len=8, batch_size=2)
    with pytest.raises(BtxError, match="weights: expected non-negative"):
        TokenSampler(two_domains, {"a": -1.0, "b": 1.0}, seq_len=8, batch_size=2)


def test_eval_batches_are_contiguous_and_non_overlapping(tmp_path):
    shard = small_shard(tmp_path, "d", "the quick brown fox ", copies=5)  # 5 * 22 tokens
    flat = torch.from_numpy(np.asarray(shard.tokens).astype(np.int64))
    seq_len = 8
    batches = list(eval_batches(shard, seq_len=seq_len, batch_size=4))
    inputs = torch.cat([b[0] for b in batches])
    targets = torch.cat([b[1] for b in batches])
    windows = (len(flat) - 1) // seq_len
    assert inputs.shape == (windows, seq_len) and [len(b[0]) for b in batches] == [4, 4, 4, 1]
    assert torch.equal(inputs.flatten(), flat[: windows * seq_len])
    assert torch.equal(targets.flatten(), flat[1 : windows * seq_len + 1])
    assert list(map(lambda b: b[0].tolist(), eval_batches(shard, seq_len, 4))) == [b[0].tolist() for b in batches]
    assert len(list(eval_batches(shard, seq_len, 4, max_batches=2))) == 2
    with pytest.raises(BtxError, match="fewer than seq_len"):
        next(eval_batches(shard, seq_len=len(flat), batch_size=1))
