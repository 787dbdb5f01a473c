"""btx.io.startup: input read-ahead and the gc-paused import that make `btx merge` start fast."""

import gc
import os
import subprocess
import sys

import pytest

from btx.io import startup
from btx.io.startup import _STEP, checkpoint_files, readahead


def test_checkpoint_files_lists_shards_and_skips_what_is_missing(tmp_path):
    (tmp_path / "a").mkdir()
    for name in ("model-00002-of-00002.safetensors", "model-00001-of-00002.safetensors", "config.json"):
        (tmp_path / "a" / name).write_bytes(b"x")
    (tmp_path / "a" / "dir.safetensors").mkdir()
    files = checkpoint_files([tmp_path / "a", tmp_path / "missing", tmp_path / "a" / "config.json"])
    assert [f.name for f in files] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="no posix_fadvise here")
def test_readahead_hints_every_file_round_robin_within_the_budget(tmp_path, monkeypatch):
    step = _STEP
    sizes = {"a": 2 * step + 5, "b": step // 2, "c": 0}
    files = []
    for name, size in sizes.items():
        (tmp_path / name).write_bytes(b"")
        os.truncate(tmp_path / name, size)
        files.append(tmp_path / name)
    fd_names = {}
    real_open = os.open

    def recording_open(path, *args):
        fd = real_open(path, *args)
        fd_names[fd] = os.path.basename(path)
        return fd

    hints = []
    monkeypatch.setattr(startup.os, "open", recording_open)
    monkeypatch.setattr(startup.os, "posix_fadvise", lambda fd, off, n, advice: hints.append((fd_names[fd], off, n)))
    readahead(files).join(timeout=10)
    assert hints == [("a", 0, step), ("b", 0, step // 2), ("a", step, step), ("a", 2 * step, 5)]
    hints.clear()
    readahead(files, budget=step + 100).join(timeout=10)
    assert hints == [("a", 0, step), ("b", 0, 100)]
    assert readahead([]) is None


def test_readahead_of_an_unreadable_file_is_silent(tmp_path):
    thread = readahead([tmp_path / "gone.safetensors"])
    if thread is not None:
        thread.join(timeout=10)
        assert not thread.is_alive()


def test_quick_import_pauses_the_collector_and_restores_it():
    code = (
        "import gc; from btx.io.startup import quick_import\n"
        "with quick_import():\n"
        "    assert not gc.isenabled()\n"
        "    import json\n"
        "assert gc.isenabled() and gc.get_freeze_count() > 0\n"
        "gc.disable()\n"
        "with quick_import():\n"
        "    pass\n"
        "assert not gc.isenabled()\n"
        "import sys; assert 'torch' not in sys.modules\n"  # startup itself stays torch-free
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    assert gc.isenabled()
