"""Corpora as researchers have them: every format gives the same shards as the same documents in
.jsonl; bad input is one line naming the file and the row or column, with nothing written; a
missing optional reader names its extra; hf: specs parse, and an unreachable hub is one line."""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from btx.data.prepare import prepare_domain
from btx.data.readers import parse_hub_spec
from btx.data.sources import resolve_sources
from btx.errors import BtxError

DOCS = [f"document {i}: " + "héllo wörld " * (i % 7 + 1) + ("\n\nsecond paragraph" if i % 3 else "") for i in range(60)]


def _jsonl_bytes(docs, field="text") -> bytes:
    return "".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)).encode()


def _shards(out: Path) -> dict[str, bytes]:
    return {name: (out / name).read_bytes() for name in ("train.bin", "val.bin")}


def _prepare(source, out: Path, **kw) -> dict[str, bytes]:
    prepare_domain("d", source, "byte", out, val_fraction=0.2, progress=False, **kw)
    return _shards(out)


def _write_format(kind: str, tmp: Path) -> Path:
    if kind == "jsonl.gz":
        path = tmp / "docs.jsonl.gz"
        path.write_bytes(gzip.compress(_jsonl_bytes(DOCS)))
    elif kind == "jsonl.zst":
        path = tmp / "docs.jsonl.zst"
        path.write_bytes(zstandard.ZstdCompressor().compress(_jsonl_bytes(DOCS)))
    elif kind == "parquet":
        path = tmp / "docs.parquet"
        # Small row groups: the reader crosses row-group boundaries.
        pq.write_table(pa.table({"id": list(range(len(DOCS))), "text": DOCS}), path, row_group_size=7)
    elif kind == "datasets":
        datasets = pytest.importorskip("datasets")
        path = tmp / "saved"
        datasets.Dataset.from_dict({"text": DOCS, "id": list(range(len(DOCS)))}).save_to_disk(str(path))
    elif kind == "datasets-inside":  # a directory holding a saved dataset: its metadata is no document
        datasets = pytest.importorskip("datasets")
        datasets.Dataset.from_dict({"text": DOCS}).save_to_disk(str(tmp / "corpus" / "saved"))
        path = tmp / "corpus"
    elif kind == "glob":
        for part in range(3):
            chunk = DOCS[part * 20 : (part + 1) * 20]
            (tmp / f"part-{part}.jsonl").write_bytes(_jsonl_bytes(chunk))
        path = tmp / "part-*.jsonl"
    else:
        raise AssertionError(kind)
    return path


@pytest.mark.parametrize("kind", ["jsonl.gz", "jsonl.zst", "parquet", "datasets", "datasets-inside", "glob"])
def test_each_format_gives_the_shards_of_the_same_jsonl(tmp_path, kind):
    reference = tmp_path / "docs.jsonl"
    reference.write_bytes(_jsonl_bytes(DOCS))
    expected = _prepare(reference, tmp_path / "ref")
    (tmp_path / "in").mkdir()
    source = _write_format(kind, tmp_path / "in")
    assert _prepare(str(source), tmp_path / "out") == expected
    # The sidecar's count matches too, and every document made it (60 docs, 12 held out or so).
    meta = json.loads((tmp_path / "out" / "train.json").read_text())
    val = json.loads((tmp_path / "out" / "val.json").read_text())
    assert meta["documents"] + val["documents"] == len(DOCS)


def test_txt_gz_is_the_text_file(tmp_path):
    text = "\n\n".join(DOCS)
    (tmp_path / "a.txt").write_text(text, encoding="utf-8")
    (tmp_path / "b.txt.gz").write_bytes(gzip.compress(text.encode()))
    # A lone file is cut into passages the same way, compressed or not.
    assert _prepare(tmp_path / "b.txt.gz", tmp_path / "gz") == _prepare(tmp_path / "a.txt", tmp_path / "plain")
    # In a directory each file is one document, compressed or not.
    for name, data in (("x.txt", b"one document"), ("y.txt.gz", gzip.compress(b"another document"))):
        (tmp_path / "dir").mkdir(exist_ok=True)
        (tmp_path / "dir" / name).write_bytes(data)
    docs = [d for d, _ in resolve_sources(tmp_path / "dir")[0].documents()]
    assert docs == ["one document", "another document"]


def _assert_one_line_nothing_written(source, out: Path, *expected: str, text_field="text"):
    with pytest.raises(BtxError) as info:
        prepare_domain("d", source, "byte", out, val_fraction=0.2, progress=False, text_field=text_field)
    message = str(info.value)
    assert "\n" not in message
    for part in expected:
        assert part in message, message
    assert not out.exists() or not any(out.iterdir()), list(out.iterdir())


def test_bad_input_is_one_line_naming_file_and_row_or_column(tmp_path):
    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(b"PAR1" + b"\0" * 100 + b"PAR1")
    _assert_one_line_nothing_written(corrupt, tmp_path / "o1", str(corrupt), "parquet")

    table = tmp_path / "t.parquet"
    pq.write_table(pa.table({"body": DOCS, "n": list(range(len(DOCS)))}), table)
    _assert_one_line_nothing_written(table, tmp_path / "o2", str(table), "'text'", "body")
    _assert_one_line_nothing_written(table, tmp_path / "o3", str(table), "'n'", "int64", text_field="n")

    nulls = tmp_path / "nulls.parquet"
    pq.write_table(pa.table({"text": ["a", "b", None, "d"]}), nulls)
    _assert_one_line_nothing_written(nulls, tmp_path / "o4", str(nulls), "row 2", "null")

    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(gzip.compress(_jsonl_bytes(DOCS * 20))[:-200])
    _assert_one_line_nothing_written(cut, tmp_path / "o5", str(cut), "ends early")

    bad_line = tmp_path / "bad.jsonl.zst"
    bad_line.write_bytes(zstandard.ZstdCompressor().compress(b'{"text": "a"}\n{"text": 3}\n'))
    _assert_one_line_nothing_written(bad_line, tmp_path / "o6", f"{bad_line}:2")


def test_a_datasets_directory_from_another_version_is_one_line(tmp_path):
    saved = tmp_path / "saved"
    saved.mkdir()
    (saved / "dataset_info.json").write_text("{}")
    (saved / "state.json").write_text(json.dumps({"_data_files_v9": []}))
    _assert_one_line_nothing_written(saved, tmp_path / "o1", "state.json", "another datasets version")

    (saved / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    (saved / "data-00000-of-00001.arrow").write_bytes(b"not arrow at all")
    _assert_one_line_nothing_written(saved, tmp_path / "o2", "data-00000-of-00001.arrow", "save_to_disk")

    datasets = pytest.importorskip("datasets")
    both = tmp_path / "dict"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict({"text": DOCS}), "test": datasets.Dataset.from_dict({"text": DOCS})}
    ).save_to_disk(str(both))
    _assert_one_line_nothing_written(both, tmp_path / "o3", "DatasetDict", "train", str(both / "train"))
    assert _prepare(both / "train", tmp_path / "o4")["train.bin"]


@pytest.mark.parametrize(
    "module, source, extra",
    [("pyarrow", "docs.parquet", "parquet"), ("zstandard", "docs.jsonl.zst", "zstd"), ("datasets", "hf:x/y", "hf")],
)
def test_a_missing_reader_names_its_extra(tmp_path, monkeypatch, module, source, extra):
    if not source.startswith("hf:"):
        (tmp_path / "in").mkdir()
        kind = source.split(".", 1)[1]
        source = str(_write_format(kind, tmp_path / "in"))
    # None in sys.modules makes every import of the package (and of its submodules) fail.
    for name in [m for m in sys.modules if m == module or m.startswith(module + ".")] + [module]:
        monkeypatch.setitem(sys.modules, name, None)
    _assert_one_line_nothing_written(source, tmp_path / "out", f"pip install 'btx[{extra}]'")


def test_hub_specs_parse():
    spec = parse_hub_spec("hf:HuggingFaceFW/fineweb-edu:sample-10BT@train")
    assert (spec.name, spec.config, spec.split) == ("HuggingFaceFW/fineweb-edu", "sample-10BT", "train")
    spec = parse_hub_spec("hf:wikitext:wikitext-2-raw-v1@validation[:10%]")
    assert (spec.name, spec.config, spec.split) == ("wikitext", "wikitext-2-raw-v1", "validation[:10%]")
    spec = parse_hub_spec("hf:EleutherAI/proof-pile-2")
    assert (spec.name, spec.config, spec.split) == ("EleutherAI/proof-pile-2", None, "train")
    assert str(spec) == "hf:EleutherAI/proof-pile-2@train"
    for bad in ("hf:", "hf:/x", "hf:a/b/c", "hf:a b", "hf:a:b:c"):
        with pytest.raises(BtxError, match="expected hf:NAME"):
            parse_hub_spec(bad)


def test_an_unreachable_hub_is_one_line(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")

    def offline(*args, **kwargs):  # what the hub client raises on a machine without the network
        raise ConnectionError("Couldn't reach 'org/corpus' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    _assert_one_line_nothing_written("hf:org/corpus@train", tmp_path / "out", "hf:org/corpus@train", "reachable")


def test_a_hub_dataset_streams_its_rows(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    seen = {}

    def fake_load(name, config, split, streaming):
        seen.update(name=name, config=config, split=split, streaming=streaming)
        return iter({"text": d, "id": i} for i, d in enumerate(DOCS))

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    reference = tmp_path / "docs.jsonl"
    reference.write_bytes(_jsonl_bytes(DOCS))
    assert _prepare("hf:org/corpus:cfg@train", tmp_path / "hub") == _prepare(reference, tmp_path / "ref")
    assert seen == {"name": "org/corpus", "config": "cfg", "split": "train", "streaming": True}
