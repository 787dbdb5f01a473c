"""`btx plan --measured RUN_DIR`: the MFU and tokens/s a finished run reached, from its records.

Every metrics.jsonl under RUN_DIR (a job directory or a whole run directory) gives its steps' `mfu`
and `tokens_per_s`; the first logged step of each file is left out (it pays for warm-up). The MFU a
plan uses is the median over every remaining step. DONE.json files next to them give tokens over
wall time, reported beside it. A CPU run's MFU is against the matmul rate measured on that CPU
(btx.train.metrics.peak_flops), so it says little about a GPU: the plan says so.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from btx.errors import BtxError
from btx.io.manifest import read_step_records

METRICS_NAME = "metrics.jsonl"
DONE_NAME = "DONE.json"


def measured(run_dir: str | Path) -> dict:
    """{"mfu", "tokens_per_s", "files", "steps", "done_tokens_per_s"}; BtxError when RUN_DIR has no
    step with an MFU."""
    root = Path(run_dir)
    if not root.is_dir():
        raise BtxError(f"--measured: {root}: no such directory (expected a finished run or job directory)")
    files = sorted(root.rglob(METRICS_NAME))
    mfus, tps = [], []
    for f in files:
        records = read_step_records(f)[1:]
        mfus += [r["mfu"] for r in records if isinstance(r.get("mfu"), (int, float))]
        tps += [r["tokens_per_s"] for r in records if isinstance(r.get("tokens_per_s"), (int, float))]
    if not mfus:
        raise BtxError(
            f"--measured: {root}: no {METRICS_NAME} with an mfu after its first step (found {len(files)} "
            "file(s)); train at least two steps on a device with a known peak, or pass --mfu"
        )
    done_rates = []
    for f in sorted(root.rglob(DONE_NAME)):
        try:
            done = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(done, dict) and done.get("tokens") and done.get("wall_time_s"):
            done_rates.append(done["tokens"] / done["wall_time_s"])
    return {
        "mfu": statistics.median(mfus),
        "tokens_per_s": statistics.median(tps) if tps else None,
        "files": [str(f) for f in files],
        "steps": len(mfus),
        "done_tokens_per_s": statistics.median(done_rates) if done_rates else None,
    }
