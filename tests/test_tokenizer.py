"""Tokenizers: the byte tokenizer, tokenizer.json through `tokenizers`, and load_tokenizer."""

import hashlib
import json

import numpy as np
import pytest

from btx.data.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer
from btx.errors import BtxError

SAMPLES = ["hello world", "héllo wörld", "日本語のテキスト", "emoji 🙂 and tabs\t\n", ""]


def make_word_level_tokenizer(directory, *, with_config=False):
    """A tiny WordLevel tokenizer.json built with the `tokenizers` library (no downloads)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["[UNK]", "<s>", "</s>"])
    tok.train_from_iterator(["the cat sat on the mat", "the dog ate the cat", "a bird sang"], trainer)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "tokenizer.json"
    tok.save(str(path))
    if with_config:
        (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "[UNK]"}))
    return path


def test_byte_round_trip_including_non_ascii():
    tok = ByteTokenizer()
    for text in SAMPLES:
        ids = tok.encode(text)
        assert ids == list(text.encode("utf-8"))
        assert tok.decode(ids) == text
    batch = tok.encode_batch(SAMPLES)
    assert [b.tolist() for b in batch] == [tok.encode(t) for t in SAMPLES]


def test_byte_decode_skips_specials_and_replaces_broken_utf8():
    tok = ByteTokenizer()
    ids = [tok.bos_id] + tok.encode("é") + [tok.eos_id]
    assert tok.decode(ids) == "é"
    assert tok.decode(tok.encode("é")[:1]) == "\ufffd"  # a window cut mid-character


def test_byte_identity_is_stable_and_survives_save(tmp_path):
    tok = ByteTokenizer()
    identity = tok.identity()
    assert identity["kind"] == "byte" and identity["vocab_size"] == 264 == tok.vocab_size
    assert len(identity["hash"]) == 64 and identity == ByteTokenizer().identity()
    tok.save(tmp_path / "ckpt")
    loaded = load_tokenizer(tmp_path / "ckpt")
    assert isinstance(loaded, ByteTokenizer) and loaded.identity() == identity
    assert load_tokenizer(tmp_path / "ckpt" / "btx_tokenizer.json").identity() == identity
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)


def test_byte_save_writes_an_equivalent_hf_tokenizer(tmp_path):
    ByteTokenizer().save(tmp_path)
    hf = HFTokenizer(tmp_path / "tokenizer.json")
    byte = ByteTokenizer()
    assert (hf.vocab_size, hf.bos_id, hf.eos_id) == (byte.vocab_size, byte.bos_id, byte.eos_id)
    for text in SAMPLES:
        assert hf.encode(text) == byte.encode(text)
        assert hf.decode(byte.encode(text)) == text


def test_transformers_opens_a_saved_byte_tokenizer(tmp_path):
    transformers = pytest.importorskip("transformers")
    ByteTokenizer().save(tmp_path)
    auto = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert auto("héllo", add_special_tokens=False)["input_ids"] == list("héllo".encode())
    assert auto.eos_token_id == ByteTokenizer.eos_id


def test_hf_tokenizer_from_tokenizer_json(tmp_path):
    path = make_word_level_tokenizer(tmp_path / "tok")
    tok = load_tokenizer(path)
    assert isinstance(tok, HFTokenizer)
    ids = tok.encode("the cat sat")
    assert len(ids) == 3 and tok.decode(ids) == "the cat sat"
    assert [a.tolist() for a in tok.encode_batch(["the cat", "a bird"])] == [
        tok.encode("the cat"),
        tok.encode("a bird"),
    ]
    assert tok.eos_id == tok._tok.token_to_id("</s>") and tok.bos_id == tok._tok.token_to_id("<s>")
    identity = tok.identity()
    assert identity == {
        "kind": "hf",
        "vocab_size": tok.vocab_size,
        "hash": hashlib.sha256(path.read_bytes()).hexdigest(),
    }
    # Directory form, and save() keeps the identity (byte-for-byte copy).
    assert load_tokenizer(tmp_path / "tok").identity() == identity
    tok.save(tmp_path / "copy")
    assert load_tokenizer(tmp_path / "copy").identity() == identity


def test_hf_tokenizer_reads_special_tokens_from_config(tmp_path):
    path = make_word_level_tokenizer(tmp_path / "tok", with_config=True)
    tok = HFTokenizer(path)
    assert tok.eos_id == tok._tok.token_to_id("[UNK]")
    tok.save(tmp_path / "copy")
    assert (tmp_path / "copy" / "tokenizer_config.json").is_file()


def test_hf_vocab_size_covers_the_largest_id(tmp_path):
    from tokenizers import Tokenizer, models

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "b": 70000}, unk_token="[UNK]"))
    tok.save(str(tmp_path / "tokenizer.json"))
    assert HFTokenizer(tmp_path / "tokenizer.json").vocab_size == 70001


def test_load_tokenizer_errors_name_the_path(tmp_path):
    with pytest.raises(BtxError, match="nowhere.json"):
        load_tokenizer(tmp_path / "nowhere.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BtxError, match="empty: no tokenizer.json"):
        load_tokenizer(tmp_path / "empty")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(BtxError, match="bad.json: not a valid tokenizer.json"):
        load_tokenizer(tmp_path / "bad.json")
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "btx_tokenizer.json").write_text(json.dumps({"kind": "byte", "version": 0, "hash": "x"}))
    with pytest.raises(BtxError, match="btx_tokenizer.json"):
        load_tokenizer(tmp_path / "old")


def test_encode_batch_returns_numpy_arrays(tmp_path):
    tok = HFTokenizer(make_word_level_tokenizer(tmp_path))
    assert all(isinstance(a, np.ndarray) for a in tok.encode_batch(["the cat", ""]))
