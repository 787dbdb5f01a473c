"""HF checkpoint I/O: config.json, the key table, lazy reads, streaming writes, atomic directories.

Tiny configs on CPU. Model parity (logits) lives elsewhere; these tests are about bytes and names.
"""

import dataclasses
import errno
import json
import os
import re
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from btx.errors import BtxError
from btx.families import key_table, read_config
from btx.io.atomic import atomic_dir
from btx.io.checkpoint import load_model, load_state_dict, save_model
from btx.io.hashing import sha256_file
from btx.io.layout import (
    DEFAULT_SHARD_SIZE,
    FileRange,
    TensorSpec,
    btx_shapes,
    btx_state_dict_from_hf,
    config_to_hf,
    hf_shapes,
    hf_specs_from_btx,
    hf_tensors_from_btx,
)
from btx.io.manifest import hash_dir, read_done, write_done
from btx.io.reader import CheckpointReader, read_safetensors_header
from btx.io.writer import write_checkpoint, write_safetensors
from btx.model.config import ModelConfig
from btx.units import parse_size

LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=96, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, max_seq_len=128)
    base.update(kw)
    return ModelConfig(**base)


def random_state_dict(cfg: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """A btx state dict from the shape table alone (independent of the model class)."""
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=g) for name, shape in btx_shapes(cfg).items()}


def leftovers(parent) -> list[str]:
    """Hidden temporaries next to an output: there must be none after any failure."""
    return sorted(p for p in os.listdir(parent) if ".tmp-" in p or ".old-" in p)


def core_fields(cfg: ModelConfig) -> dict:
    d = dataclasses.asdict(cfg)
    d.pop("extra")
    return d


# ---------------------------------------------------------------------------------- config


CONFIGS = {
    "dense": tiny(),
    "dense_tied_llama3": tiny(tie_embeddings=True, rope_theta=5e5, rope_scaling=dict(LLAMA3)),
    "moe": tiny(n_experts=3, top_k=2, rope_theta=1e6),
    "moe_btx_settings": tiny(
        n_experts=4, top_k=1, router_mode="sample_top1", capacity_factor=2.0, gumbel_rate=3e-4,
        first_layer_soft=False, rope_scaling=dict(LLAMA3),
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", CONFIGS)
def test_config_round_trip(name):
    cfg = CONFIGS[name]
    written = config_to_hf(cfg, torch.bfloat16)
    back = read_config(json.loads(json.dumps(written)))
    assert core_fields(back) == core_fields(cfg)
    assert config_to_hf(back, torch.bfloat16) == written  # stable under a second round trip
    assert written["model_type"] == ("mixtral" if cfg.is_moe else "llama")
    assert written["torch_dtype"] == written["dtype"] == "bfloat16"
    # both rope spellings, so transformers 4.x and 5.x read the same model
    assert written["rope_theta"] == written["rope_parameters"]["rope_theta"] == cfg.rope_theta
    if cfg.rope_scaling:
        assert written["rope_scaling"]["rope_type"] == written["rope_parameters"]["rope_type"] == "llama3"
    else:
        assert "rope_scaling" not in written and written["rope_parameters"]["rope_type"] == "default"
    assert ("lm_head" in str(written)) is False
    if cfg.is_moe:
        assert written["num_local_experts"] == cfg.n_experts and written["num_experts_per_tok"] == cfg.top_k
        assert written["btx"]["router_mode"] == cfg.router_mode


def test_config_reads_both_rope_spellings():
    common = dict(
        model_type="llama", vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4,
    )  # fmt: skip
    old_scaling = {k: v for k, v in LLAMA3.items() if k != "rope_type"} | {"type": "llama3"}
    v4 = dict(common, rope_theta=5e5, rope_scaling=old_scaling)
    v5 = dict(common, rope_parameters=dict(LLAMA3, rope_theta=5e5))
    a, b = read_config(v4), read_config(v5)
    assert a.rope_theta == b.rope_theta == 5e5
    assert a.rope_scaling == b.rope_scaling == LLAMA3
    assert a.n_kv_heads == 4  # num_key_value_heads defaults to the head count
    # absent rope: transformers' per-architecture defaults
    assert read_config(common).rope_theta == 1e4
    moe = dict(common, model_type="mixtral", num_local_experts=2, num_experts_per_tok=1, head_dim=None)
    assert read_config(moe).rope_theta == 1e6


def test_config_carries_unknown_fields_and_drops_writer_fields():
    d = config_to_hf(tiny(n_experts=2))
    d |= {"bos_token_id": 5, "eos_token_id": [6, 7], "torch_dtype": "float16", "transformers_version": "4.57.6"}
    cfg = read_config(d)
    assert cfg.extra["bos_token_id"] == 5 and cfg.extra["eos_token_id"] == [6, 7]
    assert cfg.extra["torch_dtype"] == "float16"
    assert "transformers_version" not in cfg.extra
    out = config_to_hf(cfg)  # no dtype given: the carried one stays
    assert out["bos_token_id"] == 5 and out["torch_dtype"] == "float16"
    assert config_to_hf(cfg, torch.float32)["torch_dtype"] == "float32"
    # a Mixtral-only field does not leak into a dense Llama config written from the same extra
    dense = dataclasses.replace(cfg, n_experts=0)
    assert "router_aux_loss_coef" not in config_to_hf(dense)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model_type": "gpt2"}, "model_type 'gpt2' is not supported (it uses learned positions"),
        ({"model_type": "gemma"}, "transformers has no MoE form of it); btx reads the dense families 'llama'"),
        ({"architectures": ["LlamaForSequenceClassification"]}, "architectures"),
        ({"head_dim": 15}, "head_dim must be a positive even integer, got 15"),
        ({"num_key_value_heads": 3}, "num_key_value_heads 3 must divide"),
        ({"rope_parameters": {"rope_type": "su", "rope_theta": 1e4, "factor": 2.0}}, "rope_type 'su' is not supported"),
        ({"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4}}, "rope_type 'linear' lacks factor"),
        (
            {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}},
            "partial_rotary_factor 0.5 is not supported",
        ),
        ({"quantization_config": {"quant_method": "gptq"}}, "'quantization_config' is a quantized checkpoint"),
        ({"embedding_multiplier": 12.0}, "'embedding_multiplier' is Granite's embedding multiplier"),
        ({"sliding_window": 64}, "'sliding_window' is set, but Llama has no sliding window"),
        ({"rope_theta": 1e4, "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}}, "disagrees"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
        ({"hidden_size": None}, "missing 'hidden_size'"),
        ({"btx": {"router_mode": "best"}}, "router_mode 'best'"),
    ],
)
def test_config_errors_name_file_and_field(change, message):
    d = config_to_hf(tiny(n_experts=2) if "btx" in change else tiny()) | change
    with pytest.raises(BtxError, match="^some/dir/config.json: ") as e:
        read_config(d, source="some/dir/config.json")
    assert message in str(e.value)


@pytest.mark.parametrize("name", CONFIGS)
def test_transformers_reads_written_config(tmp_path, name):
    transformers = pytest.importorskip("transformers")
    cfg = CONFIGS[name]
    (tmp_path / "config.json").write_text(json.dumps(config_to_hf(cfg, torch.bfloat16)))
    cls = transformers.MixtralConfig if cfg.is_moe else transformers.LlamaConfig
    t = cls.from_pretrained(tmp_path)
    rope = getattr(t, "rope_parameters", None)  # 5.x
    theta = rope["rope_theta"] if rope else t.rope_theta
    assert theta == cfg.rope_theta
    rope_type = (rope or t.rope_scaling or {}).get("rope_type", "default")
    assert rope_type == (cfg.rope_scaling or {}).get("rope_type", "default")
    assert (t.hidden_size, t.num_key_value_heads, t.head_dim) == (cfg.dim, cfg.n_kv_heads, cfg.head_dim)
    assert t.tie_word_embeddings == cfg.tie_embeddings and t.rms_norm_eps == cfg.norm_eps
    if cfg.is_moe:
        assert (t.num_local_experts, t.num_experts_per_tok) == (cfg.n_experts, cfg.top_k)


# --------------------------------------------------------------------------------- key map


@pytest.mark.parametrize("cfg", [tiny(), tiny(tie_embeddings=True), tiny(n_experts=3)], ids=["dense", "tied", "moe"])
def test_key_table_maps_every_name_both_ways(cfg):
    table = key_table(cfg)
    hf_names = hf_shapes(cfg)
    seen = set()
    for name in btx_shapes(cfg):
        for e, hf_name in enumerate(table.hf_names(name, cfg.n_experts)):
            stacked = name.endswith(("ffn.w1", "ffn.w2", "ffn.w3"))
            assert table.btx_name(hf_name) == (name, e if stacked else None)
            assert hf_name in hf_names
            seen.add(hf_name)
    assert seen == set(hf_names)  # nothing unmapped, nothing invented
    assert ("lm_head.weight" in hf_names) == (not cfg.tie_embeddings)
    if cfg.is_moe:
        assert table.hf_name("layers.1.ffn.w3", expert=2) == "model.layers.1.block_sparse_moe.experts.2.w3.weight"
        assert table.hf_name("layers.0.ffn.router.weight") == "model.layers.0.block_sparse_moe.gate.weight"
        assert hf_names["model.layers.0.block_sparse_moe.experts.0.w2.weight"] == (cfg.dim, cfg.ffn_dim)
        with pytest.raises(ValueError, match="expert"):
            table.hf_name("layers.0.ffn.w1")
    else:
        assert table.hf_name("layers.1.ffn.w1.weight") == "model.layers.1.mlp.gate_proj.weight"
    with pytest.raises(KeyError):
        table.btx_name("model.layers.0.mlp.experts.gate_up_proj")  # read-only spelling, never written


def test_unstack_and_stack_round_trip():
    cfg = tiny(n_experts=3)
    sd = random_state_dict(cfg)
    pairs = dict(hf_tensors_from_btx(sd, cfg))
    assert torch.equal(pairs["model.layers.1.block_sparse_moe.experts.2.w1.weight"], sd["layers.1.ffn.w1"][2])
    back = btx_state_dict_from_hf(pairs, cfg)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)


# ------------------------------------------------------------------------- write and read


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("sharded", [True, False], ids=["sharded", "single"])
def test_write_then_read_gives_identical_tensors(tmp_path, dtype, sharded):
    cfg = tiny(n_experts=3)
    sd = random_state_dict(cfg)
    out = tmp_path / "ckpt"
    shard_size = 20_000 if sharded else DEFAULT_SHARD_SIZE
    hashes = save_model(sd, cfg, out, dtype=dtype, shard_size=shard_size)

    files = sorted(p.name for p in out.iterdir())
    shards = [f for f in files if f.endswith(".safetensors")]
    if sharded:
        assert len(shards) >= 3 and "model.safetensors.index.json" in files
        assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"].values()) == set(shards)
        assert index["metadata"]["total_size"] == sum(t.numel() * dtype.itemsize for t in sd.values())
    else:
        assert shards == ["model.safetensors"] and "model.safetensors.index.json" not in files
    assert hashes == {f: sha256_file(out / f) for f in files} == hash_dir(out)
    assert leftovers(tmp_path) == []

    # The files are plain safetensors: the library opens them, lazily and eagerly.
    expected = {n: t.to(dtype) for n, t in hf_tensors_from_btx(sd, cfg)}
    loaded = {}
    for shard in shards:
        with safe_open(out / shard, framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
            loaded |= {k: f.get_tensor(k) for k in f.keys()}
        assert load_file(out / shard).keys() <= expected.keys()
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)

    with CheckpointReader(out) as ckpt:
        assert core_fields(ckpt.cfg) == core_fields(cfg)
        assert ckpt.dtype == dtype and ckpt.hf_config["torch_dtype"] == str(dtype).removeprefix("torch.")
        assert ckpt.btx_names() == list(sd)
        for name, t in ckpt.iter_btx():
            assert t.dtype == dtype and torch.equal(t, sd[name].to(dtype)), name
    cfg2, sd2 = load_state_dict(out)
    assert sd2["layers.0.ffn.router.weight"].dtype == torch.float32  # routers always come back fp32
    assert sd2["embed.weight"].dtype == dtype


def test_header_is_read_without_touching_data(tmp_path, monkeypatch):
    cfg = tiny(tie_embeddings=True)
    save_model(random_state_dict(cfg), cfg, tmp_path / "c", dtype=torch.float16, shard_size=10_000)
    import safetensors

    def refuse(*a, **k):
        raise AssertionError("tensor data was opened while only headers were needed")

    monkeypatch.setattr(safetensors, "safe_open", refuse)
    ckpt = CheckpointReader(tmp_path / "c")
    info = ckpt.info("model.layers.1.mlp.down_proj.weight")
    assert (info.shape, info.dtype) == ((cfg.dim, cfg.ffn_dim), torch.float16)
    assert "lm_head.weight" not in ckpt.keys()
    assert ckpt.btx_shape("layers.0.attn.wk.weight") == (cfg.n_kv_heads * cfg.head_dim, cfg.dim)
    assert ckpt.total_size == sum(i.nbytes for i in ckpt.tensors.values())


def test_own_header_parser_agrees_with_safetensors(tmp_path):
    tensors = {"a": torch.randn(3, 5), "b": torch.zeros(7, dtype=torch.bfloat16), "c": torch.arange(4)}
    save_file(tensors, tmp_path / "x.safetensors", metadata={"format": "pt"})
    infos, meta = read_safetensors_header(tmp_path / "x.safetensors")
    assert meta == {"format": "pt"}
    assert {n: (i.shape, i.dtype) for n, i in infos.items()} == {
        n: (tuple(t.shape), t.dtype) for n, t in tensors.items()
    }


def test_writer_streams_one_tensor_at_a_time(tmp_path):
    """Producers run lazily, once each, after the header; the writer keeps no reference."""
    cfg = tiny()
    sd = random_state_dict(cfg)
    calls, alive = [], []
    specs = []
    for name, t in hf_tensors_from_btx(sd, cfg):

        def produce(name=name, t=t):
            calls.append(name)
            alive.append(name)
            return t.clone()

        specs.append(TensorSpec(name, tuple(t.shape), torch.float32, produce))
    written = []
    write_checkpoint(tmp_path / "o", cfg, specs, shard_size=30_000, on_tensor=lambda n, b: written.append((n, b)))
    assert sorted(calls) == sorted(s.name for s in specs) and len(calls) == len(specs)
    assert [n for n, _ in written] == calls
    assert sum(b for _, b in written) == sum(t.numel() * 4 for t in sd.values())


@pytest.mark.parametrize("sendfile", ["kernel", "unsupported", "absent"])
def test_file_ranges_are_copied_and_hashed_like_the_tensors(tmp_path, monkeypatch, sendfile):
    """A producer may return where its bytes already lie (FileRange): the file and its sha256
    are the same as when it returns the tensor, whether the kernel copies (sendfile) or not."""
    if sendfile == "unsupported":

        def refuse(*args):
            raise OSError(errno.EINVAL, "sendfile: not for these files")

        monkeypatch.setattr("btx.io.writer.os.sendfile", refuse)
    elif sendfile == "absent":
        monkeypatch.delattr("btx.io.writer.os.sendfile")
    src = {"a": torch.randn(37, 5), "b": torch.randn(4, 3).to(torch.bfloat16), "c": torch.randn(0, 2)}
    write_safetensors(tmp_path / "src.safetensors", [TensorSpec(n, tuple(t.shape), t.dtype, lambda t=t: t)
                                                        for n, t in src.items()])  # fmt: skip
    infos = read_safetensors_header(tmp_path / "src.safetensors")[0]
    ranges = {n: FileRange(tmp_path / "src.safetensors", infos[n].offset, infos[n].nbytes) for n in src}
    rows = FileRange(ranges["a"].path, ranges["a"].offset + 20 * 5 * 4, 7 * 5 * 4)  # a[20:27]
    wanted = {**src, "a_rows": src["a"][20:27], "a2": src["a"].clone()}
    given = {**ranges, "a_rows": rows, "a2": src["a"]}
    files = {}
    for kind, values in (("tensors", wanted), ("ranges", given)):
        specs = [TensorSpec(n, tuple(t.shape), t.dtype, lambda v=values[n]: v) for n, t in wanted.items()]
        digest = write_safetensors(tmp_path / f"{kind}.safetensors", specs)
        assert digest == sha256_file(tmp_path / f"{kind}.safetensors")
        files[kind] = (tmp_path / f"{kind}.safetensors").read_bytes()
    assert files["ranges"] == files["tensors"]
    loaded = load_file(tmp_path / "ranges.safetensors")
    assert all(torch.equal(loaded[n], t) for n, t in wanted.items())


def test_file_range_errors(tmp_path):
    (tmp_path / "short.bin").write_bytes(bytes(100))
    spec = TensorSpec("w", (30,), torch.float32, lambda: FileRange(tmp_path / "short.bin", 0, 120))
    with pytest.raises(BtxError, match=r"short.bin: ended 20 bytes early while being copied \(truncated\?\)"):
        write_safetensors(tmp_path / "o.safetensors", [spec])
    spec = TensorSpec("w", (30,), torch.float32, lambda: FileRange(tmp_path / "short.bin", 0, 100))
    with pytest.raises(ValueError, match="w: produced 100 bytes of .*short.bin, announced 120"):
        write_safetensors(tmp_path / "o.safetensors", [spec])


def test_a_failed_hash_of_a_copied_range_is_not_lost(tmp_path, monkeypatch):
    """Copied ranges are hashed in the background without a join per tensor; a failure there
    still fails the write, even when more tensors follow."""
    (tmp_path / "src.bin").write_bytes(bytes(120))

    def broken(*args):
        raise OSError("mmap failed")

    monkeypatch.setattr("btx.io.writer.update_from_file", broken)
    specs = [TensorSpec("a", (30,), torch.float32, lambda: FileRange(tmp_path / "src.bin", 0, 120)),
             TensorSpec("b", (3,), torch.float32, lambda: torch.ones(3))]  # fmt: skip
    with pytest.raises(OSError, match="mmap failed"):
        write_safetensors(tmp_path / "o.safetensors", specs)


def test_reader_file_range_points_at_the_stored_bytes(saved):
    reader = CheckpointReader(saved)
    name = "model.layers.1.mlp.down_proj.weight"
    info = reader.info(name)
    with open(reader.file_range(name).path, "rb") as f:
        f.seek(reader.file_range(name, (3, 5)).offset)
        raw = f.read(reader.file_range(name, (3, 5)).nbytes)
    stored = torch.frombuffer(bytearray(raw), dtype=info.dtype).view(2, info.shape[1])
    assert torch.equal(stored, reader.get(name)[3:5])
    assert reader.file_range(name).nbytes == info.nbytes
    with pytest.raises(ValueError, match="outside its shape"):
        reader.file_range(name, (0, info.shape[0] + 1))


@pytest.mark.parametrize("window", [1, 2])
def test_update_from_file_hashes_any_range(tmp_path, monkeypatch, window):
    """Hashing through memory-map windows: ranges that start off a page, span several windows,
    are empty or end at the file's end, all hash as hashlib does on the bytes."""
    import hashlib
    import mmap

    from btx.io.hashing import update_from_file

    granule = mmap.ALLOCATIONGRANULARITY
    monkeypatch.setattr("btx.io.hashing._CHUNK", window * granule)
    data = os.urandom(5 * granule + 123)
    (tmp_path / "f").write_bytes(data)
    for offset, nbytes in [(0, 0), (0, 1), (7, granule), (granule - 1, 2), (granule, 3 * granule + 5),
                           (13, len(data) - 13), (0, len(data))]:  # fmt: skip
        h = hashlib.sha256()
        update_from_file(h, tmp_path / "f", offset, nbytes)
        assert h.hexdigest() == hashlib.sha256(data[offset : offset + nbytes]).hexdigest(), (offset, nbytes)
    assert sha256_file(tmp_path / "f") == hashlib.sha256(data).hexdigest()
    (tmp_path / "empty").write_bytes(b"")
    assert sha256_file(tmp_path / "empty") == hashlib.sha256(b"").hexdigest()


def test_mixed_dtypes_stay_aligned(tmp_path):
    """An fp32 tensor after 2-byte ones would sit misaligned in the memory map: the writer lays
    out wider dtypes first, and the library reads every tensor back exactly."""
    tensors = {"a": torch.randn(3, dtype=torch.bfloat16), "b": torch.randn(5), "c": torch.arange(3)}
    specs = [TensorSpec(n, tuple(t.shape), t.dtype, lambda t=t: t) for n, t in tensors.items()]
    path = tmp_path / "m.safetensors"
    write_safetensors(path, specs)
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert (8 + n) % 8 == 0
    header = json.loads(raw[8 : 8 + n])
    for name, t in tensors.items():
        assert header[name]["data_offsets"][0] % t.dtype.itemsize == 0, name
    loaded = load_file(path)
    assert all(torch.equal(loaded[n], t) for n, t in tensors.items())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_written_checkpoint_loads_in_transformers(tmp_path, dtype):
    transformers = pytest.importorskip("transformers")
    for cfg in (tiny(tie_embeddings=True), tiny(n_experts=3)):
        sd = random_state_dict(cfg)
        out = tmp_path / f"m{cfg.n_experts}"
        save_model(sd, cfg, out, dtype=dtype, shard_size=40_000)
        model = transformers.AutoModelForCausalLM.from_pretrained(out)
        assert model.dtype == dtype
        assert type(model).__name__ == ("MixtralForCausalLM" if cfg.is_moe else "LlamaForCausalLM")
        back = btx_state_dict_from_hf(model.state_dict(), cfg)  # 5.x fuses experts in memory
        assert back.keys() == sd.keys()
        for k in sd:
            assert torch.equal(back[k], sd[k].to(dtype)), k


# --------------------------------------------------------------------- transformers -> btx


def test_reads_transformers_llama(tmp_path):
    transformers = pytest.importorskip("transformers")
    for tied in (False, True):
        config = transformers.LlamaConfig(
            vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=tied, rope_theta=5e5, rope_scaling=dict(LLAMA3),
        )  # fmt: skip
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(config)
        model.save_pretrained(tmp_path / f"llama{tied}")
        with CheckpointReader(tmp_path / f"llama{tied}") as ckpt:
            cfg = ckpt.cfg
            assert (cfg.rope_theta, cfg.rope_scaling, cfg.tie_embeddings) == (5e5, LLAMA3, tied)
            assert ckpt.btx_names() == list(btx_shapes(cfg))
            hf_sd = model.state_dict()
            for name in ckpt.btx_names():
                assert torch.equal(ckpt.get_btx(name), hf_sd[key_table(ckpt.cfg).hf_name(name)]), name


def test_reads_transformers_mixtral(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.MixtralConfig(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=3, num_experts_per_tok=2,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(config)
    model.save_pretrained(tmp_path / "mix")
    keys = set(read_safetensors_header(tmp_path / "mix" / "model.safetensors")[0])
    # What save_pretrained puts on disk: the classic per-expert Mixtral layout (4.x and 5.x alike).
    assert "model.layers.1.block_sparse_moe.experts.2.w3.weight" in keys
    assert not any("gate_up_proj" in k for k in keys)

    with CheckpointReader(tmp_path / "mix") as ckpt:
        cfg = ckpt.cfg
        assert (cfg.n_experts, cfg.top_k, cfg.rope_theta) == (3, 2, 1e6)
        w1, w3, w2 = (ckpt.get_btx(f"layers.1.ffn.{w}") for w in ("w1", "w3", "w2"))
        router = ckpt.get_btx("layers.1.ffn.router.weight")
    # In memory, 5.x fuses experts (gate rows, then up rows); 4.x keeps modules. Both must agree.
    live = model.state_dict()
    if "model.layers.1.mlp.experts.gate_up_proj" in live:
        gate_up = live["model.layers.1.mlp.experts.gate_up_proj"]
        torch.testing.assert_close(torch.cat([w1, w3], dim=1), gate_up, rtol=0, atol=0)
        torch.testing.assert_close(w2, live["model.layers.1.mlp.experts.down_proj"], rtol=0, atol=0)
        torch.testing.assert_close(router, live["model.layers.1.mlp.gate.weight"], rtol=0, atol=0)
    from_live = btx_state_dict_from_hf(live, cfg)
    assert torch.equal(from_live["layers.1.ffn.w1"], w1) and torch.equal(from_live["layers.1.ffn.w2"], w2)

    # A file saved straight from a live 5.x model (fused names) reads the same.
    fused = tmp_path / "fused"
    fused.mkdir()
    (fused / "config.json").write_bytes((tmp_path / "mix" / "config.json").read_bytes())
    save_file({k: v.contiguous() for k, v in live.items()}, fused / "model.safetensors")
    with CheckpointReader(fused) as ckpt:
        assert torch.equal(ckpt.get_btx("layers.1.ffn.w3"), w3)
        assert torch.equal(ckpt.get_btx("layers.1.ffn.router.weight"), router)


def test_load_model_builds_a_transformer(tmp_path):
    model_mod = pytest.importorskip("btx.model.transformer")
    if not hasattr(model_mod, "Transformer"):
        pytest.skip("btx.model.transformer.Transformer not written yet")
    cfg = tiny(n_experts=2)
    sd = random_state_dict(cfg)
    save_model(sd, cfg, tmp_path / "m", dtype=torch.bfloat16)
    model = load_model(tmp_path / "m")
    got = model.state_dict()
    assert got.keys() == sd.keys()
    assert got["layers.0.ffn.router.weight"].dtype == torch.float32
    assert got["layers.0.ffn.w1"].dtype == torch.bfloat16
    assert torch.equal(got["layers.0.ffn.w1"], sd["layers.0.ffn.w1"].to(torch.bfloat16))
    # and a model saves back to the same bytes
    save_model(model, None, tmp_path / "again", dtype=torch.bfloat16)
    assert sha256_file(tmp_path / "m/model.safetensors") == sha256_file(tmp_path / "again/model.safetensors")


# ------------------------------------------------------------------------------ bad inputs


@pytest.fixture
def saved(tmp_path):
    cfg = tiny()
    out = tmp_path / "ckpt"
    save_model(random_state_dict(cfg), cfg, out, shard_size=30_000)
    return out


def shard_files(path):
    return sorted(p for p in path.iterdir() if p.suffix == ".safetensors")


def test_truncated_shard_is_named(saved):
    victim = shard_files(saved)[1]
    data = victim.read_bytes()
    victim.write_bytes(data[:-100])
    data_bytes = len(data) - 8 - struct.unpack("<Q", data[:8])[0]
    message = f"{victim}: header says {data_bytes} bytes of data but the file has {data_bytes - 100}"
    with pytest.raises(BtxError, match=re.escape(message)):
        CheckpointReader(saved)


def test_truncated_header_and_garbage_are_named(saved):
    victim = shard_files(saved)[0]
    victim.write_bytes(victim.read_bytes()[:50])
    with pytest.raises(BtxError, match=re.escape(f"{victim}: not a safetensors file or truncated")):
        CheckpointReader(saved)
    victim.write_bytes(struct.pack("<Q", 6) + b"{oops}")
    with pytest.raises(BtxError, match=re.escape(f"{victim}: safetensors header is not valid JSON")):
        CheckpointReader(saved)
    victim.write_bytes(b"abc")
    with pytest.raises(BtxError, match="too short"):
        CheckpointReader(saved)


def test_missing_shard_file_is_named(saved):
    victim = shard_files(saved)[-1]
    victim.unlink()
    message = f"model.safetensors.index.json: lists shard(s) that do not exist: {victim.name}"
    with pytest.raises(BtxError, match=re.escape(message)):
        CheckpointReader(saved)


def test_unknown_model_type_is_named(saved):
    config = json.loads((saved / "config.json").read_text())
    (saved / "config.json").write_text(json.dumps(config | {"model_type": "granite"}))
    with pytest.raises(BtxError, match=re.escape(f"{saved / 'config.json'}: model_type 'granite' is not supported")):
        CheckpointReader(saved)


def resave_single(path, edit):
    """Rewrite a checkpoint as one model.safetensors after editing its HF tensors."""
    with CheckpointReader(path) as ckpt:
        tensors = {k: ckpt.get(k) for k in ckpt.keys()}
    edit(tensors)
    for f in shard_files(path):
        f.unlink()
    (path / "model.safetensors.index.json").unlink()
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_missing_tensor_is_named(saved, tmp_path):
    resave_single(saved, lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    message = "missing 1 tensor(s) that config.json implies: model.layers.1.self_attn.k_proj.weight"
    with pytest.raises(BtxError, match=re.escape(message)):
        load_state_dict(saved)
    assert leftovers(tmp_path) == []


def test_extra_tensor_is_named(saved):
    def add(t):
        t["model.layers.0.mlp.surprise.weight"] = torch.zeros(2)
        t["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.zeros(4)  # harmless old buffer: ignored

    resave_single(saved, add)
    message = "1 tensor(s) config.json does not explain: model.layers.0.mlp.surprise.weight (in model.safetensors)"
    with pytest.raises(BtxError, match=re.escape(message)):
        CheckpointReader(saved)


def test_wrong_shape_is_named(saved):
    config = json.loads((saved / "config.json").read_text())
    (saved / "config.json").write_text(json.dumps(config | {"vocab_size": 100}))
    message = r"tensor model.embed_tokens.weight \(in model-00001-of-\d+.safetensors\) has shape \[96, 32\]"
    with pytest.raises(BtxError, match=message + r", but config.json implies \[100, 32\]"):
        CheckpointReader(saved)


def test_tied_config_with_lm_head_hints(saved):
    config = json.loads((saved / "config.json").read_text())
    (saved / "config.json").write_text(json.dumps(config | {"tie_word_embeddings": True}))
    with pytest.raises(BtxError, match="lm_head.weight should be absent"):
        CheckpointReader(saved)


def test_tied_head_stored_anyway_is_accepted_when_equal(tmp_path):
    cfg = tiny(tie_embeddings=True)
    sd = random_state_dict(cfg)
    tensors = {n: t.contiguous() for n, t in hf_tensors_from_btx(sd, cfg)}
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    (tmp_path / "config.json").write_text(json.dumps(config_to_hf(cfg)))
    save_file(tensors, tmp_path / "model.safetensors")
    cfg2, sd2 = load_state_dict(tmp_path)
    assert sd2.keys() == sd.keys()


def test_pickle_only_checkpoint_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(config_to_hf(tiny())))
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(BtxError, match="pytorch_model.bin: btx reads safetensors only"):
        CheckpointReader(tmp_path)


def test_existing_output_without_force(saved, tmp_path):
    before = hash_dir(saved)
    cfg = tiny()
    with pytest.raises(BtxError, match=re.escape(f"{saved}: already exists and is not empty; pass --force")):
        save_model(random_state_dict(cfg, seed=1), cfg, saved)
    assert hash_dir(saved) == before and leftovers(tmp_path) == []
    save_model(random_state_dict(cfg, seed=1), cfg, saved, force=True)  # replaced at the end
    assert hash_dir(saved) != before and leftovers(tmp_path) == []
    assert not (saved / "model.safetensors.index.json").exists()  # nothing of the old output remains


def test_failed_write_leaves_nothing(tmp_path):
    cfg = tiny()

    def boom():
        raise RuntimeError("disk on fire")

    specs = [s for s in hf_specs_from_btx(random_state_dict(cfg), cfg, torch.float32)]
    specs[5] = specs[5]._replace(produce=boom)
    with pytest.raises(RuntimeError, match="disk on fire"):
        write_checkpoint(tmp_path / "out", cfg, specs, shard_size=10_000)
    assert os.listdir(tmp_path) == []


KILLED_WRITER = """
import os, signal, sys, torch
from btx.io.layout import btx_shapes, hf_specs_from_btx
from btx.io.writer import write_checkpoint
from btx.model.config import ModelConfig
cfg = ModelConfig(vocab_size=96, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48)
sd = {n: torch.zeros(s) for n, s in btx_shapes(cfg).items()}
specs = hf_specs_from_btx(sd, cfg, torch.float32)
def die():
    os.kill(os.getpid(), signal.SIGKILL)
specs[7] = specs[7]._replace(produce=die)
write_checkpoint(sys.argv[1], cfg, specs, shard_size=10_000)
"""


def test_killed_writer_leaves_nothing_that_looks_finished(tmp_path):
    import subprocess
    import sys

    import btx

    root = os.path.dirname(os.path.dirname(os.path.abspath(btx.__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(tmp_path / "out")], env=env)
    assert proc.returncode == -9
    # Only the hidden temporary remains: no `out`, so no reader or stage mistakes it for output.
    assert [p.startswith(".out.tmp-") for p in os.listdir(tmp_path)] == [True]
    with pytest.raises(BtxError, match="not a checkpoint directory"):
        CheckpointReader(tmp_path / "out")


def test_tokenizer_files_are_carried(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("tokenizer.json", "generation_config.json", "btx_tokenizer.json", "notes.txt"):
        (src / name).write_text(name)
    cfg = tiny()
    hashes = save_model(random_state_dict(cfg), cfg, tmp_path / "out", tokenizer_from=src)
    got = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert got == ["btx_tokenizer.json", "config.json", "generation_config.json", "model.safetensors", "tokenizer.json"]
    assert hashes == hash_dir(tmp_path / "out")


# ---------------------------------------------------------------- atomic dirs, manifests


def test_atomic_dir_exception_leaves_nothing(tmp_path):
    target = tmp_path / "stage"
    with pytest.raises(ZeroDivisionError):
        with atomic_dir(target) as tmp:
            (tmp / "half.bin").write_bytes(b"x" * 10)
            assert tmp.name.startswith(".stage.tmp-")
            raise ZeroDivisionError
    assert os.listdir(tmp_path) == []


def test_atomic_dir_replace_and_empty_target(tmp_path):
    target = tmp_path / "stage"
    target.mkdir()  # an empty directory is not an output: no force needed
    with atomic_dir(target) as tmp:
        (tmp / "a").write_text("1")
    assert (target / "a").read_text() == "1"
    with pytest.raises(ZeroDivisionError):  # failure under force keeps the old output
        with atomic_dir(target, force=True) as tmp:
            (tmp / "b").write_text("2")
            raise ZeroDivisionError
    assert sorted(os.listdir(target)) == ["a"]
    with atomic_dir(target, force=True) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(os.listdir(target)) == ["b"] and os.listdir(tmp_path) == ["stage"]


def test_done_manifest(tmp_path):
    assert read_done(tmp_path) is None
    (tmp_path / "w.bin").write_bytes(b"abc")
    write_done(tmp_path, {"files": hash_dir(tmp_path), "stage": "merge"})
    done = read_done(tmp_path)
    assert done["files"] == {"w.bin": "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"}
    assert hash_dir(tmp_path) == done["files"]  # the manifest does not hash itself
    (tmp_path / "DONE.json").write_text("{trunc")
    with pytest.raises(BtxError, match="DONE.json: unreadable stage manifest"):
        read_done(tmp_path)


def test_parse_size():
    assert parse_size(123) == 123
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("500MB") == 500 * 10**6
    assert parse_size("2GiB") == 2 * 2**30
    with pytest.raises(BtxError, match="shard size"):
        parse_size("lots")


def test_atomic_dir_removes_temporaries_of_dead_writers_only(tmp_path):
    import subprocess
    import sys

    from btx.io.atomic import atomic_dir

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".out.tmp-{int(dead.stdout)}"
    stale.mkdir()
    (stale / "half-written.safetensors").write_bytes(b"x")
    live = tmp_path / f".out.tmp-{os.getppid()}"  # a live process's temporary (our parent)
    live.mkdir()
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "f").write_text("done")
    assert not stale.exists() and live.exists()
    assert (tmp_path / "out" / "f").read_text() == "done"
