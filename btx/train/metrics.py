"""Metrics and progress: metrics.jsonl (one JSON object per optimizer step, main rank only), the rich
progress line (loss, tokens/s, MFU, ETA) and the peak FLOP/s MFU is measured against.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import torch
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)

from btx.io.atomic import dumps_json, fsync_dir
from btx.io.manifest import read_step_records

PEAK_ENV = "BTX_PEAK_TFLOPS"


class MetricsLog:
    """metrics.jsonl: one object per optimizer step. Only the main rank writes."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = Path(path), enabled

    def records(self) -> list[dict]:
        return read_step_records(self.path)

    def keep_until(self, step: int) -> None:
        """On (re)start: keep the records of steps <= `step`, the ones the checkpoint has seen."""
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = [r for r in self.records() if r["step"] <= step]
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with open(tmp, "w") as f:
            f.writelines(dumps_json(r) + "\n" for r in kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        fsync_dir(self.path.parent)

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(dumps_json(record) + "\n")


class _Progress:
    """A rich progress line (step, loss, tokens/s, ETA) on a terminal; a plain line every
    `log_every` steps otherwise (logs of branch jobs). Main rank only."""

    def __init__(self, name: str, total: int, start: int, log_every: int, console, enabled: bool, mfu_note: str = ""):
        self.name, self.total, self.start, self.log_every = name, total, start, log_every
        self.mfu_note = mfu_note
        self.console, self.enabled = console, enabled
        self.live = enabled and console.is_terminal
        self.t0 = time.perf_counter()
        self.bar = None

    def __enter__(self):
        if self.live:
            self.bar = Progress(
                TextColumn(f"[bold]train {self.name}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn(
                    "loss {task.fields[loss]}  val {task.fields[val]}  {task.fields[tps]} tok/s  "
                    "mfu {task.fields[mfu]}  eta"
                ),
                TimeRemainingColumn(),
                console=self.console,
            )
            self.bar.__enter__()
            self.task = self.bar.add_task(
                "train", total=self.total, completed=self.start, loss="-", val="-", tps="-", mfu="-"
            )
        return self

    def update(self, step: int, record: dict) -> None:
        if not self.enabled:
            return
        loss = f"{record['loss']:.4f}"
        tps = f"{record['tokens_per_s']:,.0f}"
        mfu = f"{record['mfu']:.1%}{self.mfu_note}" if record.get("mfu") is not None else "-"
        if self.bar is not None:
            fields = {"val": f"{record['val_loss']:.4f}"} if "val_loss" in record else {}
            self.bar.update(self.task, completed=step, loss=loss, tps=tps, mfu=mfu, **fields)
        elif step % self.log_every == 0 or step == self.total:
            rate = (time.perf_counter() - self.t0) / max(1, step - self.start)
            eta = duration(rate * (self.total - step))
            val = f" val {record['val_loss']:.4f}" if "val_loss" in record else ""
            self.console.print(
                f"train {self.name} step {step}/{self.total} loss {loss}{val} {tps} tok/s mfu {mfu} eta {eta}",
                highlight=False,
                soft_wrap=True,
            )

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)


def duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


# Dense peak TFLOP/s per device for bf16/fp16 autocast and for plain fp32 (no TF32), by name.
# Matched in order against torch.cuda.get_device_name(); override with BTX_PEAK_TFLOPS.
GPU_PEAK_TFLOPS = (
    ("H100 PCIe", 756.0, 51.0),
    ("H100", 989.0, 67.0),
    ("H200", 989.0, 67.0),
    ("GH200", 989.0, 67.0),
    ("A100", 312.0, 19.5),
    ("L40S", 362.0, 91.6),
)
_cpu_peak: float | None = None


def peak_flops(device: torch.device, precision: str) -> float | None:
    """Peak FLOP/s of one device, for MFU; None when unknown (MFU is then not reported).

    GPUs: the dense tensor-core peak from GPU_PEAK_TFLOPS. CPU: measured once per process as the
    best rate of a 1024x1024 fp32 matmul with torch's current threads (~0.3 s; a 512 matmul reads
    low enough that training's larger matmuls showed over 100%), so CPU MFU reads
    "share of what a plain matmul attains here". BTX_PEAK_TFLOPS (per device) overrides both.
    """
    global _cpu_peak
    if os.environ.get(PEAK_ENV):
        return float(os.environ[PEAK_ENV]) * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        half = precision in ("bf16", "fp16", "auto")
        for key, low_precision, fp32 in GPU_PEAK_TFLOPS:
            if key in name:
                return (low_precision if half else fp32) * 1e12
        return None
    if device.type == "cpu":
        if _cpu_peak is None:
            n = 1024
            a = torch.randn(n, n)
            best = math.inf
            for _ in range(8):  # the first one warms up
                t0 = time.perf_counter()
                a @ a
                best = min(best, time.perf_counter() - t0)
            _cpu_peak = 2 * n**3 / best
        return _cpu_peak
    return None
