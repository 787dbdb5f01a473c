"""train.loggers: tensorboard and wandb get every number metrics.jsonl records, read back from
their own files (tensorboard's event files through its EventAccumulator; wandb's offline run
through its record protocol), and a missing package is one line naming the extra.
"""

import json
import shutil
import struct
from pathlib import Path

import pytest
from rich.console import Console

from btx.errors import BtxError
from btx.model.config import ModelConfig
from btx.recipe.load import load_experiment
from btx.train import loggers as loggers_module
from btx.train.finetune import RoutingLog
from btx.train.job import TrainJob, seed_job
from btx.train.loggers import check_loggers, run_name, scalars
from btx.train.loop import run_loop

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "tiny"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from btx.run.prepare import prepare_experiment

    root = tmp_path_factory.mktemp("loggers")
    shutil.copytree(FIXTURE, root / "recipe")
    exp = load_experiment(root / "recipe" / "btx.yaml", [f"run_dir={root / 'run'}"])
    prepare_experiment(exp, progress=False)
    return exp


def tensorboard_scalars(log_dir: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def wandb_records(path: Path):
    """The protobuf records of a .wandb file: wandb's log format (leveldb's: 32 KiB blocks of
    chunks with a 7-byte header: crc32, length, type FULL/FIRST/MIDDLE/LAST) after a 7-byte file
    header (':W&B', magic 0xBEE1, version), each record a wandb_internal_pb2.Record."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    ident, magic, _ = struct.unpack("<4sHB", data[:7])
    assert (ident, magic) == (b":W&B", 0xBEE1)
    block, pos, pending = 32768, 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:  # zero padding
            pos += left
            continue
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a record is complete
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def wandb_history(work_dir: Path) -> dict[str, dict[int, float]]:
    (run_file,) = (work_dir / "wandb").glob("offline-run-*/run-*.wandb")
    out: dict[str, dict[int, float]] = {}
    for record in wandb_records(run_file):
        if record.WhichOneof("record_type") == "history":
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                if not key.startswith("_"):  # wandb's own (_step, _runtime, _timestamp)
                    out.setdefault(key, {})[record.history.step.num] = json.loads(item.value_json)
    return out


def test_tensorboard_and_wandb_get_every_scalar_of_metrics_jsonl(run_dir, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    exp = run_dir
    cfg = ModelConfig(
        vocab_size=264, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=64, n_experts=2, top_k=1
    )
    work = exp.run_dir / "moe-logged"
    import dataclasses

    job = TrainJob(
        name="finetune",
        experiment=exp.name,
        stage="finetune",
        settings=dataclasses.replace(exp.finetune_train, loggers=["tensorboard", "wandb"], eval_every=2),
        train_shards={d: exp.paths.shard(d, "train") for d in exp.domains},
        val_shards={d: exp.paths.shard(d, "val") for d in exp.domains},
        mixture={"code": 1.0, "prose": 1.0},
        work_dir=work,
        export_dir=work / "final",
        manifest_dir=work,
        model_config=cfg,
        balance_alpha=0.01,
    )
    routing = RoutingLog(every=1)
    run_loop(job, setup_model=routing.setup, on_step=routing, console=Console(stderr=True, quiet=True))

    records = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    expected: dict[str, dict[int, float]] = {}
    for record in records:
        for key, value in scalars(record).items():
            expected.setdefault(key, {})[record["step"]] = value
    # what the issue names is among them: loss, lr, grad norm, tok/s, MFU, routing shares, eval loss
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "val_loss", "val_loss/code", "balance_loss"):
        assert key in expected, key
    assert "routing_load_share/1/0" in expected and "routing_mean_prob/0/1" in expected
    assert len(expected["loss"]) == job.settings.steps and len(expected["val_loss"]) == 2

    board = tensorboard_scalars(work / "tensorboard")
    assert set(board) == set(expected)
    for key, by_step in expected.items():
        assert board[key] == pytest.approx(by_step, rel=1e-6), key  # event files hold float32

    history = wandb_history(work)
    assert history == expected  # JSON numbers: exactly what metrics.jsonl has
    assert (work / "wandb" / "btx-run-id").is_file()


def test_a_missing_tracker_package_is_one_line_naming_the_extra(monkeypatch):
    real = loggers_module.importlib.util.find_spec
    monkeypatch.setattr(
        loggers_module.importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    check_loggers(["tensorboard"])
    with pytest.raises(BtxError, match=r"pip install 'btx\[wandb\]'"):
        check_loggers(["tensorboard", "wandb"])


def test_a_recipe_asking_for_a_missing_tracker_stops_before_training(run_dir, monkeypatch):
    monkeypatch.setattr(loggers_module.importlib.util, "find_spec", lambda name, *a: None)
    exp = load_experiment(
        Path(run_dir.path), [f"run_dir={run_dir.run_dir}", "seed.train.loggers=[tensorboard]", "seed.train.steps=1"]
    )
    job = seed_job(exp)
    with pytest.raises(BtxError, match=r"btx\[tensorboard\]"):
        run_loop(job, console=Console(stderr=True, quiet=True))
    assert not (Path(job.work_dir) / "ckpt").exists()


def test_run_names_come_from_experiment_stage_and_domain():
    def job(name, stage):
        return TrainJob(name, None, {}, {}, Path(), Path(), Path(), experiment="demo", stage=stage)

    assert run_name(job("seed", "seed")) == "demo-seed"
    assert run_name(job("code", "branch")) == "demo-branch-code"
    assert run_name(job("finetune-router", "finetune")) == "demo-finetune-router"


def test_unknown_loggers_are_refused_by_the_recipe(run_dir):
    with pytest.raises(BtxError, match="train.loggers: unknown logger 'tensorbord'.*did you mean tensorboard"):
        load_experiment(Path(run_dir.path), [f"run_dir={run_dir.run_dir}", "train.loggers=[tensorbord]"])
