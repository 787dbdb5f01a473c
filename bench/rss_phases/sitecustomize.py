"""Phase log of a training process's memory, for bench/zero3_memory.py --phases.

Python imports `sitecustomize` at start-up from the path; the bench puts this folder on the ranks'
PYTHONPATH and names a log file in BTX_PHASE_TRACE. Once btx.train.loop is imported, the loop's
model builders, the DeepSpeed engine's methods, the checkpoint save and the export are wrapped, and
each logs the process's RSS and high-water mark (/proc/self/status) before and after; after the
build, `deepspeed.initialize`, each step, the save and the export it also logs the bytes of live
CPU tensors (each storage once) and glibc's heap statistics (mallinfo2: heap size, in use, free;
bytes in mappings of their own). The walk over live objects adds a little time, not memory.
"""

import builtins
import ctypes
import functools
import gc
import os
import sys

LOG = os.environ.get("BTX_PHASE_TRACE")
DETAILED = ("build_model", "build_sharded_model", "DS.__init__", "DS.step", "DS.save", "export_job")


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (n, ctypes.c_size_t)
        for n in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()
    ]


def _status() -> dict:
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS", "VmHWM")):
                key, value = line.split(":")
                fields[key] = int(value.split()[0]) * 1024
    return fields


def _log(message: str) -> None:
    s = _status()
    with open(LOG, "a") as f:
        f.write(
            f"rank{os.environ.get('RANK')} {message:<40} rss {s['VmRSS'] / 1e9:.2f} GB  hwm {s['VmHWM'] / 1e9:.2f} GB\n"
        )


def _live() -> str:
    import torch

    seen, total = set(), 0
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.device.type == "cpu":
            storage = obj.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
    text = f"   live tensors {total / 1e9:.2f} GB"
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
        m = libc.mallinfo2()
        text += f"; heaps {m.arena / 1e9:.2f} GB (in use {m.uordblks / 1e9:.2f}, free {m.fordblks / 1e9:.2f})"
        text += f", own mappings {m.hblkhd / 1e9:.2f} GB"
    except (OSError, AttributeError):
        pass
    return text


def _wrap(owner, name: str, label: str | None = None) -> None:
    function, label = getattr(owner, name), label or name

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        _log(f"before {label}")
        result = function(*args, **kwargs)
        _log(f"after  {label}")
        if label in DETAILED:
            _log(_live())
        return result

    setattr(owner, name, wrapper)


def _install() -> None:
    real_import = builtins.__import__
    done = []

    def hook(name, *args, **kwargs):
        module = real_import(name, *args, **kwargs)
        loop = sys.modules.get("btx.train.loop")
        if not done and hasattr(loop, "train_command"):  # fully imported
            done.append(True)
            engine = sys.modules["btx.train.engines.deepspeed"]
            for function in ("dense_model", "build_model", "build_sharded_model", "save_checkpoint", "export_job"):
                _wrap(loop, function)
            for method in ("__init__", "backward", "step", "save", "load", "close"):
                _wrap(engine.DeepSpeedEngine, method, "DS." + method)
            _log("phase log installed")
        return module

    builtins.__import__ = hook
    import atexit

    atexit.register(lambda: _log("exit"))


if LOG:
    _install()
