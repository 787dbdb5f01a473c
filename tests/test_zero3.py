"""ZeRO-3 jobs build their model sharded and export it streamed (btx.train.engines.deepspeed).

Every ZeRO-3 job, dense or MoE, builds under `deepspeed.zero.Init` and fills one parameter at a
time (`build_sharded_model`); its export gathers one layer at a time as the writer asks
(`exported_weights`). On the tiny fixture experiment (tests/fixtures/tiny): in one process, the
sharded model holds what `build_model` would and the streamed export writes the same bytes as the
whole-model writer; on two gloo ranks (torchrun), a dense ZeRO-3 expert never builds the whole
model, holds only its partition of every parameter, and trains and exports as ZeRO-0 does.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from btx.io.checkpoint import load_state_dict, save_model
from btx.io.layout import hf_specs
from btx.io.writer import write_checkpoint
from btx.recipe.load import load_experiment
from btx.train.engines.base import build_model
from btx.train.job import expert_job, seed_job
from btx.train.loop import run_loop

pytest.importorskip("deepspeed")

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "tiny"

# Runs under torchrun on every rank: one expert job at the given ZeRO stage. At stage 3 the loop's
# whole-model builder is replaced by one that fails, and each rank records, right after
# construction, how much of every parameter it holds.
WORKER = """
import json, sys
from pathlib import Path

import btx.train.loop as loop
from btx.recipe.load import load_experiment
from btx.train.job import expert_job

recipe, run_dir, stage, out = sys.argv[1:5]


def whole_model(job):
    raise AssertionError("a ZeRO-3 job built the whole model")


if stage == "3":
    loop.build_model = whole_model
held = {}


def record(model):
    for name, p in model.named_parameters():
        held[name] = {"local": p.numel(), "full": p.ds_numel, "partition": p.ds_tensor.numel()} if stage == "3" else {}


exp = load_experiment(recipe, [f"run_dir={run_dir}", f"train.zero_stage={stage}", "train.steps=3"])
loop.run_loop(expert_job(exp, "code"), setup_model=record)
rank = loop.os.environ["RANK"]
Path(out, f"rank{rank}.json").write_text(json.dumps(held))
"""


def quiet_console():
    from rich.console import Console

    return Console(stderr=True, quiet=True)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """The tiny experiment with prepared shards and a trained seed: (recipe path, run_dir)."""
    from btx.run.prepare import prepare_experiment

    root = tmp_path_factory.mktemp("tiny")
    shutil.copytree(FIXTURE, root / "recipe")
    recipe = root / "recipe" / "btx.yaml"
    run_dir = root / "run"
    exp = load_experiment(recipe, [f"run_dir={run_dir}"])
    prepare_experiment(exp, progress=False)
    run_loop(seed_job(exp), console=quiet_console())
    return recipe, run_dir


def fresh_run_dir(prepared, target: Path) -> Path:
    shutil.copytree(prepared[1] / "data", target / "data")
    shutil.copytree(prepared[1] / "seed", target / "seed")
    return target


@pytest.mark.parametrize("start", ["checkpoint", "scratch"])
def test_sharded_model_holds_what_build_model_builds_and_exports_the_same_bytes(prepared, tmp_path, start):
    """One process (a world of one): an expert from the seed checkpoint, and a seed from scratch
    (init_weights' draws, one parameter at a time on rank 0)."""
    from btx.train.engines.deepspeed import DeepSpeedEngine, build_sharded_model

    exp = load_experiment(prepared[0], [f"run_dir={fresh_run_dir(prepared, tmp_path / 'run')}", "train.zero_stage=3"])
    job = expert_job(exp, "code") if start == "checkpoint" else seed_job(exp)
    whole = build_model(job)
    model = build_sharded_model(job)
    for name, p in model.named_parameters():  # created partitioned: nothing of it outside ds_tensor
        assert p.numel() == 0 and p.ds_tensor.numel() == p.ds_numel == whole.get_parameter(name).numel(), name
    engine = DeepSpeedEngine(model, job.settings, zero_stage=3)
    try:
        with engine.exported_weights() as weight:
            for name, expected in whole.named_parameters():
                assert torch.equal(weight(name), expected), name
            streamed = write_checkpoint(
                tmp_path / "streamed", whole.cfg, hf_specs(whole.cfg, weight, torch.float32), atomic=False
            )
        assert save_model(whole, None, tmp_path / "whole", dtype=torch.float32) == streamed
    finally:
        engine.close()


def test_two_rank_zero3_expert_is_sharded_and_trains_and_exports_as_zero0(prepared, tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    runs = {}
    for stage in ("0", "3"):
        run_dir = fresh_run_dir(prepared, tmp_path / f"zero{stage}")
        out = tmp_path / f"held{stage}"
        out.mkdir()
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        cmd += [str(worker), str(prepared[0]), str(run_dir), stage, str(out)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
        assert "terminate called" not in proc.stderr
        expert = run_dir / "experts" / "code"
        losses = [json.loads(line)["loss"] for line in (expert / "metrics.jsonl").read_text().splitlines()]
        runs[stage] = (
            losses,
            load_state_dict(expert / "final")[1],
            [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)],
        )

    for held in runs["3"][2]:  # each rank: an empty parameter and its half of the flat weight
        assert held and all(h["local"] == 0 and h["partition"] == -(-h["full"] // 2) for h in held.values())
    assert len(runs["0"][0]) == 3
    assert runs["3"][0] == pytest.approx(runs["0"][0], abs=1e-5)
    zero0, zero3 = runs["0"][1], runs["3"][1]
    assert zero0.keys() == zero3.keys()
    for name in zero0:
        torch.testing.assert_close(zero3[name], zero0[name], rtol=1e-5, atol=1e-6)
