"""The third fault campaign (issue 26), one regression test per case: the grow stage's finetune,
non-finite weights, `merge --into`'s numbers, hostile safetensors headers, sizes refused before
anything is allocated, symlinked outputs, the hash cache, disk-error paths, prepare's temporaries,
grow's mismatch lines, hidden routers checked at load, tokenizer file modes, signals, Slurm
scripts. The end-to-end cases that need a whole `btx run` are in tests/test_pipeline.py.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import shutil
import signal
import stat
import struct
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import pytest
import torch

from btx.cli import main
from btx.data.tokenizer import load_tokenizer
from btx.errors import BtxError
from btx.io.atomic import atomic_dir, write_json_atomic
from btx.io.checkpoint import save_model
from btx.io.disk import disk_error_message
from btx.io.hashing import cached_sha256
from btx.io.reader import CheckpointReader, read_safetensors_header
from btx.mix.merge import merge
from btx.mix.options import MergeOptions
from btx.model.config import ModelConfig
from btx.model.transformer import Transformer
from btx.recipe.load import load_experiment

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "fixtures" / "tiny" / "btx.yaml"
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
CFG = ModelConfig(vocab_size=264, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=64)


def btx(*args) -> tuple[int, str]:
    """`btx ARGS` in this process: (exit status, stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        status = main([str(a) for a in args])
    return status, err.getvalue().strip()


def one_line_error(status: int, err: str) -> str:
    assert status == 2 and err.startswith("btx: error: ") and "\n" not in err, err
    return err


def dense(path: Path, seed: int, cfg: ModelConfig = CFG) -> Path:
    model = Transformer(cfg)
    model.init_weights(generator=torch.Generator().manual_seed(seed))
    save_model(model, None, path)
    load_tokenizer("byte").save(path)
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """A seed, two experts and a 2-expert MoE (expert a + the seed), all external (no DONE.json)."""
    root = tmp_path_factory.mktemp("faults3")
    paths = {name: dense(root / name, i) for i, name in enumerate(("seed", "a", "b"))}
    merge(paths["seed"], {"a": paths["a"]}, root / "moe", MergeOptions(), allow_no_manifest=True, progress=False)
    paths["moe"] = root / "moe"
    return paths


def poisoned(src: Path, dst: Path, tensor: str, value: float) -> Path:
    """A copy of checkpoint `src` whose HF tensor `tensor` holds `value` in one place."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    weights = load_file(dst / "model.safetensors")
    weights[tensor].view(-1)[3] = value
    save_file(weights, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def entries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


# -- 1. the grow stage's finetune trains grow.trainable, without finetune's router-only phase ---------


def grow_recipe(tmp_path: Path, extra: str = "") -> Path:
    recipe_dir = tmp_path / "recipe"
    shutil.copytree(TINY.parent, recipe_dir)
    notes = recipe_dir / "data" / "notes"
    notes.mkdir()
    (notes / "n.txt").write_text("".join(f"NOTE {j}: remember the ZEBRA QUOTA.\n\n" for j in range(40)))
    (recipe_dir / "notes.yaml").write_text("data:\n  sources:\n    - data/notes\n  val_fraction: 0.25\n")
    recipe = recipe_dir / "btx.yaml"
    text = recipe.read_text().replace("  prose: prose.yaml\n", "  prose: prose.yaml\n  notes: notes.yaml\n")
    recipe.write_text(text + f"run_dir: {tmp_path / 'run'}\ngrow:\n  domains: [notes]\n  steps: 2\n" + extra)
    return recipe


def test_the_grow_finetune_trains_what_grow_trainable_says(tmp_path, world):
    from btx.run.stages import grow_finetune_job

    recipe = grow_recipe(tmp_path)
    assert btx("prepare", recipe, "--quiet")[0] == 0
    exp = load_experiment(recipe, ["finetune.trainable=all", "finetune.router_only_steps=2"])
    shutil.copytree(world["moe"], exp.paths.grown)  # the grown MoE the job starts from
    job = grow_finetune_job(exp)
    # grow.trainable (router_only by default), for the loop and for DONE.json alike
    assert job.trainable == "router_only" and job.engine_settings["trainable"] == "router_only"
    # finetune.router_only_steps is the main finetune's: no router phase on a mixture without notes
    assert job.before is None and "notes" in job.mixture and job.settings.steps == 2
    other = grow_finetune_job(load_experiment(recipe, ["grow.trainable=frozen_experts"]))
    assert other.trainable == "frozen_experts" and other.recipe_hash != job.recipe_hash


# -- 2. non-finite weights -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "tensor, value",
    [
        ("model.layers.1.mlp.down_proj.weight", float("nan")),  # an expert: copied file to file
        ("model.layers.0.self_attn.q_proj.weight", float("inf")),  # shared: averaged
    ],
)
def test_non_finite_weights_are_refused_naming_file_and_tensor(world, tmp_path, tensor, value):
    bad = poisoned(world["b"], tmp_path / "bad", tensor, value)
    out = tmp_path / "out"
    err = one_line_error(
        *btx("merge", "--seed", world["seed"], "--expert", f"a={world['a']}", "--expert", f"b={bad}",
             "--out", out, "--allow-no-manifest", "--quiet")
    )  # fmt: skip
    assert f"{bad / 'model.safetensors'}: tensor {tensor} holds a non-finite value" in err
    assert not out.exists() and entries(tmp_path) == ["bad"]
    err = one_line_error(
        *btx("merge", "--into", world["moe"], "--add-expert", f"b={bad}", "--out", out, "--allow-foreign",
             "--shared", "average", "--quiet")
    )  # fmt: skip
    assert f"tensor {tensor} holds a non-finite value" in err and not out.exists()
    with CheckpointReader(bad) as reader, pytest.raises(BtxError, match="non-finite"):
        reader.get(tensor)


# -- 3. merge --into checks its numbers as merge does ----------------------------------------------


@pytest.mark.parametrize(
    "flag, value, expected",
    [
        ("--top-k", "-1", "top_k must be an integer >= 1, got -1"),
        ("--top-k", "0", "top_k must be an integer >= 1, got 0"),
        ("--ridge-lambda", "0", "ridge_lambda must be a positive number, got 0.0"),
        ("--router-scale", "0", "router_scale must be a positive number, got 0.0"),
        ("--router-scale", "nan", "router_scale must be a positive number, got nan"),
        ("--router-tokens", "0", "router_tokens must be an integer >= 1, got 0"),
    ],
)
def test_merge_into_checks_its_numbers_as_merge_does(world, tmp_path, flag, value, expected):
    into = one_line_error(
        *btx("merge", "--into", world["moe"], "--add-expert", f"b={world['b']}", "--out", tmp_path / "g",
             "--allow-foreign", "--quiet", flag, value)
    )  # fmt: skip
    merged = one_line_error(
        *btx("merge", "--seed", world["seed"], "--expert", f"a={world['a']}", "--out", tmp_path / "m",
             "--allow-no-manifest", "--quiet", flag, value)
    )  # fmt: skip
    assert into == f"btx: error: merge --into: {expected}" and merged == f"btx: error: merge: {expected}"
    assert entries(tmp_path) == []


# -- 5. hostile safetensors headers ----------------------------------------------------------------


def raw_safetensors(path: Path, header: bytes, data: bytes = b"") -> Path:
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


@pytest.mark.parametrize(
    "header, expected",
    [
        (b'{"w": {"dtype": "F32", "shape": [Infinity], "data_offsets": [0, 4]}}', "not valid JSON"),
        (b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, NaN]}}', "not valid JSON"),
        (b'{"w": {"dtype": "F32", "shape": [1.0], "data_offsets": [0, 4]}}', "malformed header entry for tensor w"),
        (b'{"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}', "malformed header entry for tensor w"),
        (b'{"__metadata__": [1, 2], "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', "__metadata__"),
        (b'{"__metadata__": {"a": 1}, "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', "__metadata__"),
        (b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),
    ],
)
def test_hostile_headers_are_one_line(tmp_path, header, expected):
    path = raw_safetensors(tmp_path / "model.safetensors", header, b"\0" * 4)
    with pytest.raises(BtxError, match=expected) as e:
        read_safetensors_header(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_a_header_of_too_many_tensors_is_refused_before_it_is_parsed(tmp_path, monkeypatch):
    import btx.io.reader as reader

    entry = '"t{}": {{"dtype": "U8", "shape": [1], "data_offsets": [{}, {}]}}'
    header = ("{" + ", ".join(entry.format(i, i, i + 1) for i in range(50)) + "}").encode()
    path = raw_safetensors(tmp_path / "model.safetensors", header, b"\0" * 50)
    assert len(read_safetensors_header(path)[0]) == 50
    parsed = []
    monkeypatch.setattr(reader, "MAX_TENSORS_PER_FILE", 49)
    monkeypatch.setattr(reader.json, "loads", lambda *a, **k: parsed.append(1))
    with pytest.raises(BtxError, match=r"lists about 50 tensors, more than the 49 btx accepts"):
        read_safetensors_header(path)
    assert parsed == []  # refused on the raw bytes: nothing was parsed


def test_metadata_that_safe_open_would_refuse_is_one_line(world, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(world["seed"], bad)
    blob = (bad / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + n])
    header["__metadata__"] = {"format": "pt", "step": 3}
    raw = json.dumps(header).encode()  # offsets count from the end of the header: they stay right
    (bad / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + blob[8 + n :])
    with pytest.raises(BtxError, match="__metadata__ must be a map of strings to strings"):
        CheckpointReader(bad)  # what eval, analyze, merge and finetune open a checkpoint with


# -- 6. sizes refused before anything is allocated -------------------------------------------------


@pytest.mark.parametrize("layers", [1_000_000_000, 1e9])
def test_a_config_of_a_billion_layers_is_refused_on_arithmetic(world, tmp_path, layers):
    big = tmp_path / "big"
    shutil.copytree(world["b"], big)
    config = json.loads((big / "config.json").read_text())
    config["num_hidden_layers"] = layers
    (big / "config.json").write_text(json.dumps(config))
    err = one_line_error(
        *btx("merge", "--seed", world["seed"], "--expert", f"big={big}", "--out", tmp_path / "out",
             "--allow-no-manifest", "--quiet")
    )  # fmt: skip
    if isinstance(layers, float):  # JSON's 1e9 is a float: not a number of layers at all
        assert f"{big / 'config.json'}: 'num_hidden_layers' must be a positive integer" in err
        return
    assert f"{big / 'config.json'}: num_hidden_layers: 1000000000 makes the weights" in err
    assert "more than the checkpoint's safetensors files hold" in err


@pytest.mark.parametrize(
    "override, key",
    [
        ("model.vocab_size=1000000000000", "model.vocab_size"),
        ("model.dim=1048576", "model.dim"),
        ("model.ffn_dim=100000000000", "model.ffn_dim"),
        ("train.batch_size=100000000", "train.batch_size"),
        ("finetune.train.batch_size=100000000", "finetune.train.batch_size"),
        ("eval.batch_size=100000000", "eval.batch_size"),
    ],
)
def test_recipe_sizes_beyond_this_machine_are_refused_at_load(tmp_path, override, key):
    err = one_line_error(*btx("run", TINY, f"run_dir={tmp_path / 'run'}", override))
    assert f"{key}: " in err and "more than this machine's memory" in err
    assert not (tmp_path / "run").exists()


# -- 7. a stale stage whose output is a symbolic link ------------------------------------------------


def test_a_stale_output_that_is_a_symlink_is_unlinked_not_followed(tmp_path):
    from rich.console import Console

    from btx.run.ledger import Pipeline

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("the user's")
    link = tmp_path / "run" / "merged"
    link.parent.mkdir()
    link.symlink_to(elsewhere)
    pipeline = Pipeline.__new__(Pipeline)
    pipeline.console = Console(file=io.StringIO())
    pipeline.remove("merge", [link], "inputs changed")
    assert not link.exists() and not link.is_symlink() and (elsewhere / "keep.txt").read_text() == "the user's"
    # an atomic output written over a link replaces the link and leaves nothing hidden behind
    link.symlink_to(elsewhere)
    with atomic_dir(link, force=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert link.is_dir() and not link.is_symlink() and entries(link.parent) == ["merged"]
    assert entries(elsewhere) == ["keep.txt"]


# -- 8. a hash-cache entry that is JSON but not an object ------------------------------------------


@pytest.mark.parametrize("entry", ["[1, 2, 3]", "7", '"x"', '{"path": 1, "stat": 2, "sha256": 3}', "null"])
def test_a_foreign_hash_cache_entry_is_a_miss(tmp_path, monkeypatch, entry):
    import hashlib

    cache = tmp_path / "cache"
    monkeypatch.setenv("BTX_HASH_CACHE", str(cache))
    target = tmp_path / "f.bin"
    target.write_bytes(b"hello")
    real = os.path.realpath(target)
    cache.mkdir()
    (cache / f"{hashlib.sha256(real.encode()).hexdigest()[:40]}.json").write_text(entry)
    assert cached_sha256(target) == hashlib.sha256(b"hello").hexdigest()
    assert cached_sha256(target) == hashlib.sha256(b"hello").hexdigest()  # and the rewritten entry


# -- 9. disk errors name the output being written and its disk ---------------------------------------


def test_disk_errors_name_the_output_being_written(tmp_path, monkeypatch):
    out = tmp_path / "run" / "eval"
    # a failed write() names no file: the output the caller writes is named
    line = disk_error_message(OSError(errno.ENOSPC, "No space left on device"), out, 10, "the eval")
    assert line.startswith(f"{out}: no space left on the device while writing the eval")
    # a copy names its source first; the line names the destination, as the output will be called
    copy = OSError(
        errno.ENOSPC,
        "No space left on device",
        "/input/tokenizer.json",
        None,
        str(tmp_path / ".grown.tmp-9-ab" / "tokenizer.json"),
    )
    assert disk_error_message(copy, tmp_path).startswith(f"{tmp_path / 'grown' / 'tokenizer.json'}: no space")
    # an input's path outside the output is not what ran out of space
    read = OSError(errno.ENOSPC, "No space left on device", "/input/model.safetensors")
    assert disk_error_message(read, out).startswith(f"{out}: no space")
    # atomic writes give a nameless error their path, so the command line's last resort names it
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left")))
    ledger = tmp_path / "run" / "pipeline.json"
    ledger.parent.mkdir(parents=True, exist_ok=True)
    with pytest.raises(OSError) as e:
        write_json_atomic(ledger, {"a": 1})
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert disk_error_message(e.value).startswith(f"{ledger}: no space left")
    with pytest.raises(OSError) as e, atomic_dir(out):
        raise OSError(errno.ENOSPC, "No space left on device")
    assert disk_error_message(e.value).startswith(f"{out}: no space left") and entries(out.parent) == []


# -- 10. prepare on a full disk leaves no temporaries ------------------------------------------------


def test_a_shard_writer_on_a_full_disk_leaves_no_temporary(tmp_path):
    import numpy as np

    from btx.data.writer import ShardWriter

    writer = ShardWriter(tmp_path / "train.bin", np.dtype(np.uint16), 300)
    writer.add_document([np.arange(10, dtype=np.uint32)])

    class FullFile(io.BufferedWriter):
        def flush(self):
            raise OSError(errno.ENOSPC, "No space left on device")

    real = writer._file
    writer._file = FullFile(io.FileIO(real.fileno(), "w", closefd=False))
    with pytest.raises(OSError):
        writer.flush()
    writer.discard()  # closing flushes, and fails again: the temporary goes all the same
    real.close()
    assert entries(tmp_path) == []


# -- 11. grow's mismatch line names config.json keys ------------------------------------------------


def test_grow_names_config_keys_when_an_expert_does_not_fit(world, tmp_path):
    wide = dense(tmp_path / "wide", 5, ModelConfig(**{**CFG.__dict__, "dim": 48, "head_dim": 0}))
    err = one_line_error(
        *btx("merge", "--into", world["moe"], "--add-expert", f"w={wide}", "--out", tmp_path / "g", "--quiet")
    )
    assert "hidden_size is 48 but the MoE" in err and " dim " not in err
    qwen = dense(tmp_path / "qwen", 5, ModelConfig(**{**CFG.__dict__, "family": "qwen3", "qk_norm": "head"}))
    err = one_line_error(
        *btx("merge", "--into", world["moe"], "--add-expert", f"q={qwen}", "--out", tmp_path / "g", "--quiet")
    )
    assert "model_type is 'qwen3' but the MoE" in err and "qk_norm" not in err


# -- 12. grow.router_init hidden is checked when the recipe loads ------------------------------------


def test_a_hidden_grow_without_contrast_is_refused_at_load(tmp_path):
    recipe = grow_recipe(tmp_path, "  router_init: hidden\nmerge:\n  top_k: 2\n  prompts: {notes: [ZEBRA]}\n")
    recipe.write_text(recipe.read_text().replace("merge:\n  top_k: 2\n", "", 1))
    with pytest.raises(BtxError, match=r"grow\.router_init: hidden needs something to contrast 'notes'") as e:
        load_experiment(recipe)
    assert "merge.negative_prompts.notes" in str(e.value) and "--" not in str(e.value)
    load_experiment(recipe, ["merge.prompts.code=[def f]"])  # another expert's prompts contrast them


# -- 13. tokenizer files have the mode of any new file ----------------------------------------------


def test_exported_tokenizer_files_are_0644(tmp_path):
    old = os.umask(0o022)
    try:
        path = dense(tmp_path / "seed", 0)
    finally:
        os.umask(old)
    for name in ("tokenizer.json", "btx_tokenizer.json", "tokenizer_config.json", "config.json"):
        if (path / name).exists():
            assert stat.S_IMODE((path / name).stat().st_mode) == 0o644, name


# -- 14 and SIGTERM: signals -----------------------------------------------------------------------


def test_sigterm_stops_a_command_with_one_line(world, tmp_path):
    """SIGTERM during a command that has no stop of its own (here a merge; the campaign's eval and
    analyze) ends in one line and status 143 with nothing half-written, not a silent death."""
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "btx", "merge", "--seed", str(world["seed"]), "--upcycle", "2", "--out", str(out),
         "--quiet"],
        env={**ENV, "BTX_MERGE_TEST_DELAY": "30"}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while not any(".tmp-" in name for name in entries(tmp_path)) and time.monotonic() < deadline:
        time.sleep(0.05)  # until the merge writes
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1].startswith("btx: terminated (merge stopped by SIGTERM")
    assert entries(tmp_path) == []


def test_btx_keeps_an_inherited_sigint_ignore(tmp_path):
    """As POSIX programs do (docs/COMMANDS.md, Signals): a background job of a script ignores
    Ctrl-C, and btx does not undo that; SIGTERM stops it."""
    code = (
        "import signal, sys\nfrom btx.cli import main\nmain(['recipes'])\n"
        "print(signal.getsignal(signal.SIGINT) == signal.SIG_IGN, file=sys.stderr)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=ENV, capture_output=True, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )  # fmt: skip
    assert out.returncode == 0 and out.stderr.strip().splitlines()[-1] == "True", out.stderr


# -- 15. Slurm scripts name the recipe file a name resolved to ----------------------------------------


def test_jobs_of_a_named_recipe_run_its_file(tmp_path, monkeypatch):
    from btx.recipe.builtin import builtin_recipes_dir
    from btx.run.jobs import plan_jobs

    monkeypatch.chdir(tmp_path)  # no recipes/ here, as after a wheel install
    exp = load_experiment("demo")
    for job in plan_jobs(exp, "demo"):
        recipe = job.program[job.program.index("--domain") - 1]
        assert recipe == str((builtin_recipes_dir() / "demo" / "btx.yaml").absolute()) and Path(recipe).is_file()


# -- note: tokenizer files that are symbolic links ---------------------------------------------------


def test_symlinked_tokenizer_files_are_copied_as_files(world, tmp_path):
    """A Hugging Face cache snapshot is links into its blobs: outputs get the files' contents."""
    linked = tmp_path / "linked"
    linked.mkdir()
    for entry in world["seed"].iterdir():
        (linked / entry.name).symlink_to(entry)
    out = tmp_path / "out"
    merge(linked, {"a": world["a"]}, out, MergeOptions(), allow_no_manifest=True, progress=False)
    assert not (out / "tokenizer.json").is_symlink()
    assert (out / "tokenizer.json").read_bytes() == (world["seed"] / "tokenizer.json").read_bytes()


# -- 4. no advice btx run cannot follow ---------------------------------------------------------------


def test_advice_to_pass_force_says_what_does_that_under_btx_run():
    from btx.run.stage import followable

    line = followable(
        "x/DONE.json: this job finished with different settings; pass --force to train it again", "r.yaml", "grow"
    )
    assert line.endswith("(under btx run: `btx run r.yaml --from grow` redoes it from the recipe)")
    assert followable("x: no such file", "r.yaml", "grow") == "x: no such file"


def test_the_grow_stage_clears_its_router_phase_leftovers(tmp_path):
    from btx.run.stages import grow_dirs, grow_scratch

    exp = load_experiment(grow_recipe(tmp_path), ["finetune.router_only_steps=2"])
    cleared = {p.name for p in grow_dirs(exp) + grow_scratch(exp)}
    assert {"grown", "grown-finetuned", "grown-finetuned-router", "grown-finetuned-router-train"} <= cleared


@pytest.mark.parametrize(
    "dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.float8_e5m2, torch.float8_e4m3fn]
)
def test_the_bit_level_finiteness_check_agrees_with_torch(dtype):
    """The writer's check on raw bytes (btx.io.finite.check_finite_bytes) and the reference
    (torch.isfinite) refuse exactly the same tensors."""
    from btx.io.finite import check_finite, check_finite_bytes

    g = torch.Generator().manual_seed(0)
    for special in (None, float("nan"), float("inf"), float("-inf"), 448.0, -0.0, 1e-40):
        t = (torch.randn(1000, generator=g) * 100).to(dtype)
        if special is not None:
            t[517] = special
        data = t.view(torch.uint8).numpy().tobytes()
        verdicts = []
        for check, arg in ((check_finite, t), (partial(check_finite_bytes, dtype=dtype), data)):
            try:
                check(arg, where="f", name="w")
                verdicts.append(True)
            except BtxError:
                verdicts.append(False)
        assert verdicts[0] == verdicts[1], (dtype, special, verdicts)
        assert verdicts[0] == bool(torch.isfinite(t.to(torch.float32)).all())
