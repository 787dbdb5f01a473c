"""Faults that must end in one clear line (exit 2) with nothing half-written, or be survived:
locks on jobs and outputs, full and read-only disks, non-finite numbers, a killed prepare, single
text files, reserved names, strict JSON, the hash cache. See docs/PROVENANCE.md.

The disk tests mount a small tmpfs where this process may (root); elsewhere they simulate the
error by making the first write into the destination raise ENOSPC / EROFS.
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
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from btx.cli import main
from btx.errors import BtxError
from btx.io.atomic import dumps_json, write_json_atomic
from btx.io.checkpoint import save_model
from btx.io.hashing import cached_sha256
from btx.io.locks import output_lock
from btx.io.manifest import changed_inputs, identity, read_done, write_done
from btx.model.config import ModelConfig
from btx.model.transformer import Transformer

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "fixtures" / "tiny" / "btx.yaml"
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
CFG = ModelConfig(vocab_size=264, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=64)


def btx(*args: str) -> tuple[int, str]:
    """`btx ARGS` in this process: (exit status, stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        status = main([str(a) for a in args])
    return status, err.getvalue().strip()


def one_line_error(status: int, err: str) -> str:
    assert status == 2 and err.startswith("btx: error: ") and "\n" not in err, err
    return err


def hold_lock(path: Path, what: str) -> subprocess.Popen:
    """Another process holding the lock of `path` (it prints 'held' once it has it)."""
    code = (
        "import sys, time\nfrom btx.io.locks import output_lock\n"
        "with output_lock(sys.argv[1], sys.argv[2]):\n    print('held', flush=True)\n    time.sleep(120)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code, str(path), what], stdout=subprocess.PIPE, text=True, env=ENV)
    assert holder.stdout.readline().strip() == "held"
    return holder


def hidden(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(".")) if directory.exists() else []


@pytest.fixture(scope="module")
def seed(tmp_path_factory) -> Path:
    """A random dense checkpoint (external: no DONE.json) with the byte tokenizer."""
    from btx.data.tokenizer import load_tokenizer

    path = tmp_path_factory.mktemp("faults") / "seed"
    model = Transformer(CFG)
    model.init_weights(generator=torch.Generator().manual_seed(0))
    save_model(model, None, path)
    load_tokenizer("byte").save(path)
    return path


# ------------------------------------------------------------------------------------- locks


def test_two_processes_on_one_job(tmp_path):
    """The second `btx train` of a job stops at once, naming the first one's pid and host; when
    the first dies its lock is simply taken over (the kernel drops an flock with its holder)."""
    run_dir = tmp_path / "run"
    assert btx("prepare", TINY, f"run_dir={run_dir}", "--quiet")[0] == 0
    holder = hold_lock(run_dir / "seed-train", "training job 'seed'")
    try:
        err = one_line_error(*btx("train", TINY, "--seed", f"run_dir={run_dir}"))
        assert f"seed-train: training job 'seed' is in use by pid {holder.pid} on " in err
        assert "(since " in err and "wait for it to finish or stop it" in err
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (run_dir.parent / "run" / ".seed-train.lock").exists()  # left by the killed holder
    with output_lock(run_dir / "seed-train", "training job 'seed'"):  # taken over at once
        pass
    assert not (run_dir / ".seed-train.lock").exists()


def test_locks_nest_in_one_process_and_work_without_flock(tmp_path, monkeypatch):
    import fcntl

    target = tmp_path / "out"
    with output_lock(target, "x"), output_lock(target, "x"):  # btx run -> merge: the same process
        pass

    # A file system without flock (some NFS setups): an exclusive lock file; one of a dead process
    # of this host is stale and taken over.
    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "no locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock = tmp_path / ".out.lock"
    lock.write_text(json.dumps({"pid": int(dead.stdout), "host": os.uname().nodename, "since": "-", "command": "x"}))
    with output_lock(target, "x"):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    lock.write_text(json.dumps({"pid": 1, "host": "elsewhere", "since": "-", "command": "btx merge"}))
    with pytest.raises(BtxError, match="x is in use by pid 1 on elsewhere .* delete the lock file"):
        with output_lock(target, "x"):
            pass


def test_two_merges_into_one_output(seed, tmp_path):
    """A slow merge holds its output's lock from the exists/--force check to the rename: a second
    merge into the same output, even with --force, stops with one line; after the first one
    finished, a merge without --force is refused and the first one's output stays."""
    out = tmp_path / "moe"
    slow = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "btx",
            "merge",
            "--seed",
            seed,
            "--upcycle",
            "2",
            "--out",
            out,
            "--quiet",
            "--router-seed",
            "1",
        ],
        env={**ENV, "BTX_MERGE_TEST_DELAY": "0.05"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not any(p.name.startswith(".moe.tmp-") for p in tmp_path.iterdir()):
        assert slow.poll() is None and time.monotonic() < deadline, slow.communicate()
        time.sleep(0.02)
    err = one_line_error(*btx("merge", "--seed", seed, "--upcycle", "2", "--out", out, "--quiet", "--force"))
    assert f"{out}: this merge output is in use by pid {slow.pid} on " in err
    assert slow.wait(timeout=120) == 0, slow.stderr.read()
    first = read_done(out)
    err = one_line_error(*btx("merge", "--seed", seed, "--upcycle", "2", "--out", out, "--quiet"))
    assert "already exists (a finished merge); pass --force" in err
    assert read_done(out) == first and first["options"]["router_seed"] == 1


def test_an_output_that_appears_meanwhile_is_not_replaced_without_force(tmp_path):
    from btx.io.atomic import atomic_dir

    out = tmp_path / "out"
    with pytest.raises(BtxError, match="appeared while this output was being written"):
        with atomic_dir(out) as tmp:
            (tmp / "mine").write_text("new")
            out.mkdir()
            (out / "theirs").write_text("first")
    assert [p.name for p in out.iterdir()] == ["theirs"] and hidden(tmp_path) == []


# ------------------------------------------------------------------------------ full disks


@pytest.fixture
def small_disk(tmp_path):
    """mount(kind, size) -> a directory on a tmpfs of `size` bytes (read-only for kind "ro"), or
    None where tmpfs cannot be mounted (not root): the test then simulates the error."""
    mounted = []

    def mount(kind: str = "rw", size: int = 200_000) -> Path | None:
        where = tmp_path / f"disk{len(mounted)}"
        where.mkdir()
        options = f"size={size}" + (",ro" if kind == "ro" else "")
        if (
            os.geteuid() != 0
            or subprocess.run(
                ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True
            ).returncode
            != 0
        ):
            return None
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", str(where)], check=False)


def fail_writes_into(monkeypatch, directory: Path, code: int) -> None:
    """The simulation where no tmpfs can be mounted: opening a file for writing under `directory`
    raises OSError(code), as a full or read-only file system would (empty lock files aside, which
    a full disk still makes room for)."""
    real_open = os.open

    def fake_open(path, flags, *args, **kwargs):
        if (
            str(os.fspath(path)).startswith(str(directory))
            and flags & (os.O_WRONLY | os.O_RDWR)
            and not str(os.fspath(path)).endswith(".lock")
        ):
            raise OSError(code, os.strerror(code), os.fspath(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", fake_open)
    import builtins

    real_builtin_open = builtins.open

    def fake_builtin_open(file, mode="r", *args, **kwargs):
        if (
            isinstance(file, (str, os.PathLike))
            and str(os.fspath(file)).startswith(str(directory))
            and any(m in mode for m in "wax+")
        ):
            raise OSError(code, os.strerror(code), os.fspath(file))
        return real_builtin_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake_builtin_open)


def test_a_full_disk_is_one_line_and_leaves_nothing(seed, tmp_path, small_disk, monkeypatch):
    disk = small_disk("rw", 200_000)  # the upcycled MoE needs about 0.5 MB
    where = disk if disk is not None else tmp_path / "full"
    if disk is None:
        from btx.io.disk import free_bytes

        real_free = free_bytes
        monkeypatch.setattr(
            "btx.io.disk.free_bytes", lambda p: 200_000 if str(p).startswith(str(where)) else real_free(p)
        )
    # Known sizes are checked before anything is written ...
    err = one_line_error(*btx("merge", "--seed", seed, "--upcycle", "4", "--out", where / "moe", "--quiet"))
    assert f"{where}: the merged checkpoint {where / 'moe'} needs about" in err and "are free there" in err
    # ... and a disk that fills up while writing is the same one line, with nothing left behind.
    monkeypatch.setattr("btx.mix.output.ensure_free_space", lambda *a: None)
    if disk is None:
        fail_writes_into(monkeypatch, where, errno.ENOSPC)
    err = one_line_error(*btx("merge", "--seed", seed, "--upcycle", "4", "--out", where / "moe", "--quiet"))
    assert "no space left on the device while writing the merged checkpoint" in err and "needs about" in err
    assert not (where / "moe").exists() and hidden(where) == []
    # btx prepare: the shards of a domain that does not fit.
    monkeypatch.undo()
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"{i} " + "x" * 500}) + "\n" for i in range(400)))
    if disk is None:
        fail_writes_into(monkeypatch, where, errno.ENOSPC)
    err = one_line_error(*btx("prepare", "--domain", f"big={corpus}", "--out", where / "data", "--quiet"))
    assert "no space left on the device while writing the shards of domain 'big'" in err
    assert hidden(where / "data" / "big") == [] and not (where / "data" / "big" / "train.json").exists()


def test_a_disk_that_fills_up_during_training_keeps_the_last_checkpoint(tmp_path, small_disk, monkeypatch):
    """torch.save reports a full disk as a RuntimeError without errno: still one line, naming the
    checkpoint and the space; the checkpoint before stays, and nothing half-written."""
    disk = small_disk("rw", 900_000)  # room for the shards and one checkpoint (about 0.43 MB) only
    run_dir = (disk if disk is not None else tmp_path) / "run"
    assert btx("prepare", TINY, f"run_dir={run_dir}", "--quiet")[0] == 0
    if disk is None:  # simulate: the second checkpoint's optimizer state does not fit
        saves = []
        real_save = torch.save

        def save(obj, path, *a, **kw):
            saves.append(path)
            if len(saves) > 2:
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 260032 vs 259920")
            return real_save(obj, path, *a, **kw)

        monkeypatch.setattr(torch, "save", save)
        monkeypatch.setattr("btx.io.disk.free_bytes", lambda path: 1000)
    status, err = btx("train", TINY, "--seed", f"run_dir={run_dir}")
    err = one_line_error(status, err.splitlines()[-1])
    assert (
        "seed-train/ckpt: no space left on the device while writing checkpoint step-4" in err and "needs about" in err
    )
    assert sorted(p.name for p in (run_dir / "seed-train" / "ckpt").iterdir()) == ["step-2"]
    assert not (run_dir / "seed").exists()


def test_a_read_only_destination_is_one_line(seed, tmp_path, small_disk, monkeypatch):
    disk = small_disk("ro")
    where = disk if disk is not None else tmp_path / "ro"
    if disk is None:
        where.mkdir()
        fail_writes_into(monkeypatch, where, errno.EROFS)
    err = one_line_error(*btx("merge", "--seed", seed, "--upcycle", "2", "--out", where / "moe", "--quiet"))
    assert "read-only file system" in err


# ------------------------------------------------------------------------ finite numbers


@pytest.mark.parametrize(
    "override",
    [
        "train.lr=.inf",
        "finetune.train.lr=-.inf",
        "train.betas=[0.9,.nan]",
        "merge.weights={code: 1e999, prose: 1, seed: 1}",
    ],
)
def test_every_float_of_a_recipe_is_finite(override, tmp_path):
    err = one_line_error(*btx("prepare", TINY, f"run_dir={tmp_path}", override))
    assert "must be a finite number" in err and f"(override '{override}')" in err
    assert not tmp_path.joinpath("data").exists()


@pytest.mark.parametrize("eval_every, what", [(0, "loss"), (1, "validation loss")])
def test_a_loss_that_is_not_finite_stops_training(tmp_path, eval_every, what):
    """lr 1e30 is finite but blows the weights up: training stops with one line at the first step
    whose loss (or validation loss) is not finite. It saves nothing of that step, names the last
    checkpoint whose weights still gave a finite loss, and writes no DONE.json."""
    run = [
        TINY,
        "--seed",
        f"run_dir={tmp_path}",
        "seed.train.lr=1e30",
        "seed.train.warmup_steps=0",
        "seed.train.checkpoint_every=1",
        "seed.train.keep_checkpoints=5",
        f"seed.train.eval_every={eval_every}",
    ]
    assert btx("prepare", TINY, f"run_dir={tmp_path}", "--quiet")[0] == 0
    status, err = btx("train", *run)
    err = one_line_error(status, err.splitlines()[-1])  # after the progress lines
    assert f"train seed: the {what} is nan at step " in err and "training stopped without saving this step" in err
    step = int(err.split(" at step ")[1].split()[0])
    good = step - 2 if what == "loss" else step - 1  # weights after step N give the loss of step N + 1
    assert f"the last good checkpoint is {tmp_path / 'seed-train' / 'ckpt' / f'step-{good}'})" in err
    ckpts = sorted(p.name for p in (tmp_path / "seed-train" / "ckpt").iterdir())
    assert ckpts == [f"step-{n}" for n in range(1, step)]  # nothing of the failing step
    assert not (tmp_path / "seed").exists()
    records = [json.loads(line) for line in (tmp_path / "seed-train" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, step))


def test_every_json_btx_writes_is_strict(tmp_path):
    write_done(tmp_path, {"loss": float("nan"), "nested": [float("inf"), 1.5]})
    assert json.loads((tmp_path / "DONE.json").read_text(), parse_constant=lambda c: pytest.fail(c)) == {
        "loss": None,
        "nested": [None, 1.5],
    }
    assert dumps_json({"x": float("-inf")}) == '{"x": null}'


# ------------------------------------------------------------------------------ prepare


def test_a_killed_prepare_then_its_rerun(tmp_path):
    """SIGKILL mid-way (before any checkpoint) leaves temporaries as large as what was tokenized;
    the re-run removes them and gives the shards an uninterrupted run gives."""
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"document {i} " + "abc " * 50}) + "\n" for i in range(3000)))
    spec = ["--domain", f"d={corpus}", "--quiet"]
    killed = subprocess.Popen(
        [sys.executable, "-m", "btx", "prepare", *spec, "--out", tmp_path / "out"],
        env={**ENV, "BTX_PREPARE_TEST_DELAY": "30"},
    )
    deadline = time.monotonic() + 60
    temporaries = []
    while not any(p.stat().st_size for p in temporaries):
        assert killed.poll() is None and time.monotonic() < deadline
        temporaries = list((tmp_path / "out" / "d").glob(".train.bin.*")) if (tmp_path / "out" / "d").exists() else []
        time.sleep(0.02)
    killed.kill()
    killed.wait()
    assert not (tmp_path / "out" / "d" / "train.json").exists()  # nothing looks finished
    assert btx("prepare", *spec, "--out", tmp_path / "out")[0] == 0
    assert hidden(tmp_path / "out" / "d") == [] and hidden(tmp_path / "out") == []
    assert btx("prepare", *spec, "--out", tmp_path / "clean")[0] == 0
    for name in ("train.bin", "val.bin"):
        assert (tmp_path / "out" / "d" / name).read_bytes() == (tmp_path / "clean" / "d" / name).read_bytes()


def test_a_single_text_file_is_cut_into_passages(tmp_path):
    from btx.data.shards import load_domain

    book = tmp_path / "book.txt"
    book.write_text("\n\n".join(f"Chapter {i}. " + "It was a dark night. " * (3 + i % 5) for i in range(400)))
    assert btx("prepare", "--domain", f"book={book}", "--out", tmp_path / "out", "--quiet")[0] == 0
    shards = load_domain(tmp_path / "out" / "book")
    assert shards["val"].num_tokens > 0 and shards["val"].num_documents >= 5
    assert shards["train"].num_documents + shards["val"].num_documents >= 150
    assert shards["train"].meta["sources"][0]["documents"].startswith("passages of >= ")
    # Passages end at blank lines: every document but the last ends in "\n\n" before its EOS.
    ids = [int(t) for t in shards["train"].tokens]
    eos = [i for i, t in enumerate(ids) if t == 256]
    assert all(bytes(ids[e - 2 : e]) == b"\n\n" for e in eos[:-1] if ids[e - 1] < 256)
    # Too little text for two passages: one line saying so, nothing written.
    (tmp_path / "note.txt").write_text("one short line\n")
    err = one_line_error(
        *btx("prepare", "--domain", f"note={tmp_path / 'note.txt'}", "--out", tmp_path / "o2", "--quiet")
    )
    assert "nothing to hold out for validation" in err and "one passage" in err
    assert not (tmp_path / "o2" / "note").exists()


def test_shards_have_the_permissions_of_any_new_file(tmp_path):
    book = tmp_path / "book.txt"
    book.write_text("\n\n".join(f"paragraph {i} " * 20 for i in range(50)))
    old = os.umask(0o022)
    try:
        assert btx("prepare", "--domain", f"d={book}", "--out", tmp_path / "out", "--quiet")[0] == 0
    finally:
        os.umask(old)
    for path in (tmp_path / "out" / "d").iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


# --------------------------------------------------------------------------- recipes, names


@pytest.mark.parametrize(
    "name, reason",
    [("seed", "the seed's expert"), ("seed.0", "merge names its experts"), ("blend.1", "merge names its experts")],
)
def test_reserved_domain_names_are_refused_when_the_recipe_loads(tmp_path, name, reason):
    shutil.copytree(TINY.parent, tmp_path / "r")
    recipe = tmp_path / "r" / "btx.yaml"
    recipe.write_text(recipe.read_text().replace("  code: code.yaml", f"  {name}: code.yaml"))
    (tmp_path / "r" / "code.yaml").write_text((tmp_path / "r" / "code.yaml").read_text().replace("name: code\n", ""))
    err = one_line_error(*btx("prepare", recipe, f"run_dir={tmp_path / 'run'}"))
    assert f"domains.{name}: '{name}' is reserved" in err and reason in err


# ------------------------------------------------------------------------------ identities


def test_the_hash_cache_sees_a_same_size_edit_with_the_mtime_put_back(tmp_path, monkeypatch):
    monkeypatch.setenv("BTX_HASH_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "weights.bin"
    path.write_bytes(bytes(range(256)) * 64)
    first = identity(path)
    assert len(list((tmp_path / "cache").iterdir())) == 1 and identity(path) == first
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(100)
        f.write(b"\x00")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert cached_sha256(path) != first["sha256"]["weights.bin"]
    assert changed_inputs({"w": first}) == [f"{path}: changed since it was used (input 'w')"]
    monkeypatch.setenv("BTX_HASH_CACHE", "off")
    assert cached_sha256(path) == cached_sha256(path)


def test_a_copied_run_directory_checks_its_own_files(tmp_path):
    """Identities record paths relative to their DONE.json too, so a copied run directory
    compares its own inputs, not the original's."""
    from btx.io.manifest import relative_identities

    (tmp_path / "a" / "in").mkdir(parents=True)
    (tmp_path / "a" / "in" / "x.bin").write_bytes(b"x")
    (tmp_path / "a" / "stage").mkdir()
    recorded = relative_identities({"x": identity(tmp_path / "a" / "in" / "x.bin")}, tmp_path / "a" / "stage")
    write_json_atomic(tmp_path / "a" / "stage" / "DONE.json", {"input_identities": recorded})
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    (tmp_path / "b" / "in" / "x.bin").write_bytes(b"y")
    copied = read_done(tmp_path / "b" / "stage")["input_identities"]
    assert changed_inputs(copied, tmp_path / "b" / "stage") == [
        f"{tmp_path / 'b' / 'in' / 'x.bin'}: changed since it was used (input 'x')"
    ]
    assert changed_inputs(recorded, tmp_path / "a" / "stage") == []


def test_an_orphaned_expert_job_is_named(tmp_path):
    from btx.run.jobs import orphan_note, update_job

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    update_job(tmp_path, launcher={"pid": int(gone.stdout), "start": None})
    assert orphan_note(tmp_path) == f", left running by a btx branch / btx run (pid {int(gone.stdout)}) that is gone"
    update_job(tmp_path, launcher={"pid": os.getpid(), "start": None})
    assert orphan_note(tmp_path) == ""
