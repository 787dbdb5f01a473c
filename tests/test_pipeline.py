"""`btx run` end to end on a seconds-scale recipe: every stage, skipping, redoing, kill and resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from btx.manifest import read_done

TINY = Path(__file__).parent / "fixtures" / "tiny" / "btx.yaml"
STAGE_MANIFESTS = ["seed", "experts/code", "experts/prose", "merged", "finetuned", "baselines/dense",
                   "baselines/upcycled", "eval", "analysis"]


def btx_run(run_dir: Path, *extra: str, **kw) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "btx", "run", str(TINY), f"run_dir={run_dir}", "eval.baselines=true", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)


def eval_losses(run_dir: Path) -> dict:
    rows = json.loads((run_dir / "eval" / "eval.json").read_text())["rows"]
    return {r["name"]: r["losses"] for r in rows}


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("pipeline") / "run"
    result = btx_run(run_dir)
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
    return run_dir


def test_every_stage_leaves_its_outputs_and_manifest(full_run):
    for rel in STAGE_MANIFESTS:
        assert read_done(full_run / rel) is not None, f"{rel}/DONE.json missing"
    for rel in ["seed", "experts/code/final", "experts/prose/final", "merged", "finetuned",
                "baselines/dense/final", "baselines/upcycled"]:
        assert (full_run / rel / "config.json").is_file(), rel
    assert (full_run / "analysis" / "routing.json").is_file()
    names = set(eval_losses(full_run))
    assert {"seed", "expert:code", "expert:prose", "BTM ensemble", "BTX", "dense (compute-matched)",
            "sparse upcycling (compute-matched)"} <= names
    # The baselines were given the BTX training budget (experts + finetune), within one step's FLOPs.
    ledger = json.loads((full_run / "pipeline.json").read_text())
    assert set(ledger) >= {"seed", "branch", "merge", "finetune", "baselines", "eval", "analyze"}
    budget = read_done(full_run / "baselines" / "dense")["inputs"]["compute_budget"]
    dense_flops = read_done(full_run / "baselines" / "dense")["train_flops"]
    per_step = dense_flops / read_done(full_run / "baselines" / "dense")["steps"]
    assert abs(dense_flops - budget) <= per_step


def test_a_second_run_does_no_work(full_run):
    before = {p: p.stat().st_mtime_ns for p in full_run.rglob("DONE.json")}
    result = btx_run(full_run)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ran" not in [line.split("│")[2].strip() for line in result.stdout.splitlines()
                         if line.count("│") >= 4 and line.split("│")[1].strip() in
                         ("seed", "branch", "merge", "finetune", "baselines", "eval", "analyze")]
    after = {p: p.stat().st_mtime_ns for p in full_run.rglob("DONE.json")}
    assert before == after


def test_a_changed_finetune_setting_redoes_finetune_and_what_depends_on_it(full_run, tmp_path):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(full_run, run_dir)
    seed_done = (run_dir / "seed" / "DONE.json").stat().st_mtime_ns
    merged_done = (run_dir / "merged" / "DONE.json").stat().st_mtime_ns
    result = btx_run(run_dir, "finetune.balance_alpha=0.05", "--until", "finetune")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run_dir / "seed" / "DONE.json").stat().st_mtime_ns == seed_done
    assert (run_dir / "merged" / "DONE.json").stat().st_mtime_ns == merged_done
    assert read_done(run_dir / "finetuned")["trajectory_hash"] != read_done(full_run / "finetuned")["trajectory_hash"]


def test_killed_during_branch_then_rerun_matches_an_uninterrupted_run(full_run, tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "btx", "run", str(TINY), f"run_dir={run_dir}", "eval.baselines=true"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    # Stop it once the first expert has a checkpoint: mid-branch, with a partial expert on disk.
    while not any((run_dir / "experts").glob("*/ckpt/step-*")) and time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # what Ctrl-C or a scheduler's stop does
    proc.wait(timeout=120)
    assert proc.returncode != 0
    assert read_done(run_dir / "merged") is None
    result = btx_run(run_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert eval_losses(run_dir) == eval_losses(full_run)
