"""btx train: the loop, exact resume after SIGKILL/SIGTERM, 2-process DDP on gloo, experts, export,
MoE loss terms and hooks, and one clear error per bad input.

Everything runs on the tiny fixture experiment (tests/fixtures/tiny: 2 layers, d=32, byte
tokenizer, 32-token windows). The seed is trained once per module and copied into each test's
run directory.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from btx.cli import main as btx_main
from btx.errors import BtxError
from btx.io.checkpoint import load_model, load_state_dict, save_model
from btx.io.hashing import sha256_file
from btx.io.manifest import read_done
from btx.io.reader import CheckpointReader
from btx.model.config import ModelConfig
from btx.model.flops import train_flops_per_token
from btx.model.transformer import Transformer
from btx.recipe.load import load_experiment
from btx.train.engines.base import lr_factor, make_optimizer
from btx.train.job import TrainJob, expert_job, seed_job
from btx.train.loop import run_loop

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "tiny"
QUIET = None  # run_loop's default console (stderr), captured by pytest


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


@pytest.fixture
def run_dir(prepared, tmp_path):
    """A fresh run directory holding the prepared data and the trained seed."""
    recipe, source = prepared
    target = tmp_path / "run"
    shutil.copytree(source / "data", target / "data")
    shutil.copytree(source / "seed", target / "seed")
    return target


def experiment(prepared, run_dir, *overrides):
    return load_experiment(prepared[0], [f"run_dir={run_dir}", *overrides])


def btx_train(recipe, run_dir, *args, env=None, launcher=(sys.executable,)):
    """`python -m btx train RECIPE ARGS run_dir=...` in a subprocess (the real command line)."""
    environment = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run(
        [*launcher, "-m", "btx", "train", str(recipe), *args, f"run_dir={run_dir}"],
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )


def curve(metrics_path):
    """What must not change when a run is resumed: everything but timings."""
    keep = ("step", "loss", "lr", "grad_norm", "tokens", "val_loss")
    return [{k: r.get(k) for k in keep} for r in map(json.loads, Path(metrics_path).read_text().splitlines())]


def weights(checkpoint):
    return load_state_dict(checkpoint)[1]


# ------------------------------------------------------------------------------------------------


def test_schedule_warms_up_then_decays_to_ten_percent_and_norms_are_not_decayed():
    factors = [lr_factor(s, warmup_steps=4, total_steps=20, min_ratio=0.1) for s in range(21)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(factors[3:], factors[4:]))  # cosine never rises
    assert factors[20] == pytest.approx(0.1)

    class Settings:
        lr, weight_decay, betas, eps = 1e-4, 0.1, [0.9, 0.95], 1e-8

    model = Transformer(ModelConfig(dim=32, n_heads=4, n_kv_heads=2, ffn_dim=64))
    opt = make_optimizer(model.parameters(), Settings)
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] == 0.1 for p in g["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in decayed) == (not name.endswith("norm.weight")), name


def test_resume_after_sigterm_and_sigkill_reproduces_the_uninterrupted_run(prepared, run_dir, tmp_path):
    recipe = prepared[0]
    args = ["--domain", "prose", "train.steps=6"]  # checkpoint_every 2, eval_every 2 (fixture)
    reference_dir = tmp_path / "reference"
    shutil.copytree(run_dir, reference_dir)
    reference = btx_train(recipe, reference_dir, *args)
    assert reference.returncode == 0, reference.stderr

    # SIGTERM after step 3: the next step ends, step 4 is checkpointed, the process exits 130.
    stopped = btx_train(recipe, run_dir, *args, env={"BTX_TRAIN_KILL_AT_STEP": "3:TERM"})
    assert stopped.returncode == 130, stopped.stderr
    expert = run_dir / "experts" / "prose"
    assert sorted(p.name for p in (expert / "ckpt").iterdir()) == ["step-2", "step-4"]
    # Resumed from step 4, then SIGKILL after step 5: its metrics line is written, no checkpoint.
    killed = btx_train(recipe, run_dir, *args, env={"BTX_TRAIN_KILL_AT_STEP": "5"})
    assert killed.returncode == -9
    assert "resuming from" in killed.stderr and curve(expert / "metrics.jsonl")[-1]["step"] == 5
    assert read_done(expert) is None
    # Resumed from step 4 again: step 5's stale line is dropped and recomputed.
    finished = btx_train(recipe, run_dir, *args)
    assert finished.returncode == 0, finished.stderr

    ref_expert = reference_dir / "experts" / "prose"
    assert curve(expert / "metrics.jsonl") == curve(ref_expert / "metrics.jsonl")
    a, b = weights(expert / "final"), weights(ref_expert / "final")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # The last two checkpoints are kept (keep_checkpoints: 2); nothing temporary is left behind.
    assert sorted(p.name for p in (expert / "ckpt").iterdir()) == ["step-4", "step-6"]
    done = read_done(expert)
    assert done["steps"] == 6 and done["tokens"] == 6 * 2 * 32


def test_two_gloo_processes_train_one_model_together(prepared, run_dir, tmp_path):
    """torchrun, 2 CPU processes of batch 2 with grad accumulation: the same global batches as one
    process of batch 4, so the same model up to float summation order."""
    recipe = prepared[0]
    torchrun = Path(sys.executable).with_name("torchrun")
    launcher = [str(torchrun), "--nproc_per_node", "2", "--master_port", str(_free_port())]
    result = btx_train(
        recipe,
        run_dir,
        "--domain",
        "code",
        "train.grad_accum=2",
        "train.steps=3",
        env={"OMP_NUM_THREADS": "1"},
        launcher=launcher,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "terminate called" not in result.stderr
    done = read_done(run_dir / "experts" / "code")
    assert done["world_size"] == 2
    assert done["tokens"] == 3 * 2 * 2 * 32 * 2  # steps * accum * per-rank batch * seq * ranks

    single_dir = tmp_path / "single"
    shutil.copytree(run_dir / "data", single_dir / "data")
    shutil.copytree(run_dir / "seed", single_dir / "seed")
    exp = experiment(prepared, single_dir, "train.grad_accum=2", "train.steps=3", "train.batch_size=4")
    run_loop(expert_job(exp, "code"), console=quiet_console())
    together = curve(run_dir / "experts" / "code" / "metrics.jsonl")
    alone = curve(single_dir / "experts" / "code" / "metrics.jsonl")
    assert [r["loss"] for r in together] == pytest.approx([r["loss"] for r in alone], abs=1e-5)
    a, b = weights(run_dir / "experts" / "code" / "final"), weights(single_dir / "experts" / "code" / "final")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)


def test_zero3_dense_training_stops_on_sigterm_and_resumes_exactly(prepared, run_dir, tmp_path, monkeypatch):
    """train.zero_stage=3: the same loop on the DeepSpeed engine (sharded like FSDP). In-process:
    the SIGTERM hook only sets the stop flag, so the run checkpoints and raises KeyboardInterrupt."""
    overrides = ("train.zero_stage=3", "train.steps=5")
    reference_dir = tmp_path / "reference"
    shutil.copytree(run_dir, reference_dir)
    reference = expert_job(experiment(prepared, reference_dir, *overrides), "prose")
    run_loop(reference, console=quiet_console())

    job = expert_job(experiment(prepared, run_dir, *overrides), "prose")
    monkeypatch.setenv("BTX_TRAIN_KILL_AT_STEP", "2:TERM")
    with pytest.raises(KeyboardInterrupt):
        run_loop(job, console=quiet_console())
    assert sorted(p.name for p in job.ckpt_dir.iterdir()) == ["step-2", "step-3"]  # stopped a step later, saved
    monkeypatch.delenv("BTX_TRAIN_KILL_AT_STEP")
    done = run_loop(job, console=quiet_console())

    assert done["steps"] == 5 and curve(job.metrics_path) == curve(reference.metrics_path)
    a, b = weights(job.export_dir), weights(reference.export_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_expert_beats_the_seed_on_its_domain_and_exports_a_loadable_checkpoint(prepared, run_dir):
    from btx.data.shards import load_shard
    from btx.evaluate.scores import domain_losses

    exp = experiment(prepared, run_dir, "train.steps=8")
    done = run_loop(expert_job(exp, "code"), console=quiet_console())
    expert = run_dir / "experts" / "code"

    val = {"code": load_shard(run_dir / "data" / "code" / "val.json")}
    seed_loss, _ = domain_losses(load_model(run_dir / "seed"), val, 32, 2, 4)
    expert_loss, _ = domain_losses(load_model(expert / "final"), val, 32, 2, 4)
    assert expert_loss["code"] < seed_loss["code"] - 0.05

    # The export is the last checkpoint's weights (fp32 seed -> fp32 export), with the tokenizer.
    final, last = weights(expert / "final"), weights(expert / "ckpt" / "step-8")
    assert all(torch.equal(final[k], last[k]) for k in final)
    assert (expert / "final" / "btx_tokenizer.json").is_file() and (expert / "final" / "tokenizer.json").is_file()
    # DONE.json: the numbers a reader needs, and hashes that match the files.
    for key in ("tokens", "steps", "train_loss", "val_loss", "wall_time_s", "train_flops", "recipe_hash", "outputs"):
        assert done[key] is not None, key
    cfg = load_model(expert / "final").cfg
    assert done["steps"] == 8 and done["tokens"] == 8 * 2 * 32
    assert done["train_flops"] == train_flops_per_token(cfg, 32) * done["tokens"]
    assert done["trainable"] == "all" and "4 per frozen weight" in done["flops_counting"]["rule"]
    assert done["val_losses"]["code"] == done["val_loss"]
    for name, digest in done["outputs"].items():
        assert sha256_file(expert / name) == digest
    assert "final/model.safetensors" in done["outputs"]

    # Running it again does nothing; changing what it computes needs --force.
    before = (expert / "metrics.jsonl").read_text()
    assert run_loop(expert_job(exp, "code"), console=quiet_console()) == done
    assert (expert / "metrics.jsonl").read_text() == before
    changed = experiment(prepared, run_dir, "train.steps=8", "train.lr=0.01")
    with pytest.raises(BtxError, match="different settings"):
        run_loop(expert_job(changed, "code"), console=quiet_console())


@pytest.mark.parametrize("engine", ["accelerate", "deepspeed"])
def test_an_ffn_only_expert_keeps_every_other_weight_of_the_seed_bit_for_bit(prepared, run_dir, engine):
    """train.trainable=ffn: the optimizer holds the FFNs only; the export's other tensors are the
    seed's exactly; DONE.json says what trained and counts the FLOPs of that (btx.model.flops)."""
    from btx.model.trainable import param_group

    overrides = ["train.trainable=ffn", "train.steps=3"] + (["train.zero_stage=0"] if engine == "deepspeed" else [])
    exp = experiment(prepared, run_dir, *overrides)
    job = expert_job(exp, "code")
    assert job.trainable == "ffn" and exp.seed_train.trainable == "all"  # the seed is not an expert
    held = []

    def engine_of(model, job):
        from btx.train.loop import dense_engine

        built = dense_engine(model, job)
        optimizer = built._optimizer if engine == "accelerate" else built.ds.optimizer
        held.extend(p for group in optimizer.param_groups for p in group["params"])
        return built

    done = run_loop(job, make_engine=engine_of, console=quiet_console())
    seed, expert = weights(run_dir / "seed"), weights(job.export_dir)
    names = [n for n, p in Transformer(CheckpointReader(run_dir / "seed").cfg).named_parameters()]
    ffn = {n for n in names if param_group(n) == "ffn"}
    assert len(held) == len(ffn) and sum(p.numel() for p in held) == sum(seed[n].numel() for n in ffn)
    for name in seed:
        assert torch.equal(seed[name], expert[name]) == (name not in ffn), name
    cfg = CheckpointReader(job.export_dir).cfg
    assert done["trainable"] == "ffn" and done["flops_counting"]["trainable"] == "ffn"
    assert done["train_flops"] == train_flops_per_token(cfg, 32, "ffn") * done["tokens"]
    assert done["train_flops"] < train_flops_per_token(cfg, 32) * done["tokens"]
    records = [json.loads(line) for line in job.metrics_path.read_text().splitlines()]
    assert len(records) == 3


def test_train_trainable_is_the_experts_and_refused_for_the_seed_and_the_finetune(prepared, run_dir):
    with pytest.raises(BtxError, match="seed.train.trainable: the seed trains from scratch"):
        experiment(prepared, run_dir, "seed.train.trainable=ffn")
    with pytest.raises(BtxError, match="finetune.train.trainable: .*finetune.trainable"):
        experiment(prepared, run_dir, "finetune.train.trainable=ffn_norms")
    with pytest.raises(BtxError, match="train.trainable: expected one of all, ffn, ffn_norms"):
        experiment(prepared, run_dir, "train.trainable=router_only")
    exp = experiment(prepared, run_dir, "train.trainable=ffn_norms")
    assert seed_job(exp).trainable == "all" and exp.finetune_train.trainable == "all"
    assert expert_job(exp, "prose").trainable == "ffn_norms"


def test_moe_loss_has_the_balance_term_and_hooks_see_every_step(prepared, run_dir):
    """What btx finetune relies on: the same loop trains an MoE with alpha * balance loss, sets the
    router step, and merges the on_step hook's numbers into metrics.jsonl."""
    exp = experiment(prepared, run_dir)
    base = exp.finetune_train
    cfg = ModelConfig(
        vocab_size=264,
        dim=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        ffn_dim=64,
        max_seq_len=64,
        n_experts=2,
        top_k=1,
        router_mode="sample_top1",
    )
    steps_seen, frozen = [], []

    def on_step(step, output, inputs):
        router = job_model[0].layers[1].ffn.router
        steps_seen.append((step, router.step))
        return {"tokens_per_expert": output.moe_stats[1].tokens_per_expert}  # layer 0 routes softly

    job_model = []

    def setup(model):  # e.g. finetune's "frozen_experts": stop training the expert weights
        job_model.append(model)
        for layer in model.moe_layers():
            for p in (layer.w1, layer.w2, layer.w3):
                p.requires_grad_(False)
                frozen.append(p.detach().clone())

    work = run_dir / "moe"
    job = TrainJob(
        name="moe",
        settings=base,
        train_shards={d: run_dir / "data" / d / "train.json" for d in exp.domains},
        val_shards={d: run_dir / "data" / d / "val.json" for d in exp.domains},
        mixture={"code": 1.0, "prose": 1.0},
        work_dir=work,
        export_dir=work / "final",
        manifest_dir=work,
        model_config=cfg,
        balance_alpha=0.5,
    )
    done = run_loop(job, setup_model=setup, on_step=on_step, console=quiet_console())
    records = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, base.steps + 1))
    for r in records:
        assert r["loss"] == pytest.approx(r["nll"] + 0.5 * r["balance_loss"], rel=1e-6)
        assert sum(r["tokens_per_expert"]) == 2 * 32
    assert steps_seen == [(s, s - 1) for s in range(1, base.steps + 1)]
    # Exported as a Mixtral checkpoint; the frozen expert weights did not move.
    assert json.loads((work / "final" / "config.json").read_text())["model_type"] == "mixtral"
    exported = weights(work / "final")
    assert torch.equal(exported["layers.0.ffn.w1"], frozen[0])
    assert set(done["val_losses"]) == {"code", "prose"}


def test_bad_inputs_give_one_clear_error_and_write_nothing(prepared, run_dir, tmp_path, capsys):
    recipe = prepared[0]

    def fails(*args, match):
        assert btx_main(["train", str(recipe), *args]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("btx: error:") and "\n" not in err and match in err, err

    fails("--domain", "cod", f"run_dir={run_dir}", match="unknown domain 'cod' (did you mean code?)")
    # An expert before its seed exists.
    no_seed = tmp_path / "no_seed"
    shutil.copytree(run_dir / "data", no_seed / "data")
    fails("--domain", "code", f"run_dir={no_seed}", match="the seed is not trained yet")
    # A missing shard (btx prepare not run, or its output deleted).
    (run_dir / "data" / "prose" / "val.json").unlink()
    fails("--domain", "prose", f"run_dir={run_dir}", match="data/prose/val.json: val shard of domain 'prose' not found")
    # A seed.path that is not a checkpoint.
    not_a_checkpoint = tmp_path / "empty"
    not_a_checkpoint.mkdir()
    fails(
        "--domain",
        "code",
        f"run_dir={run_dir}",
        f"seed.path={not_a_checkpoint}",
        "model=null",
        match="has no config.json",
    )
    # A seed whose vocabulary is smaller than the tokenizer's.
    exp = experiment(prepared, run_dir)
    small = Transformer(ModelConfig(vocab_size=100, dim=32, n_heads=4, n_kv_heads=2, ffn_dim=64))
    save_model(small, None, tmp_path / "small_seed")
    fails(
        "--domain",
        "code",
        f"run_dir={run_dir}",
        f"seed.path={tmp_path / 'small_seed'}",
        "model=null",
        match="vocab_size 100 is smaller than the tokenizer's 264",
    )
    assert not (run_dir / "experts").exists() and not (no_seed / "experts").exists()
    assert exp.domains  # the recipe itself was fine


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("engine", ["accelerate", "deepspeed"])
def test_activation_checkpointing_and_compile_train_an_expert_like_eager(prepared, run_dir, engine):
    """An expert job on either engine: full and selective recomputation give the eager losses
    (fp32, 1e-6); compiled blocks too within 1e-4 (accelerate only: compiling is slow on a CPU;
    tests/test_finetune.py compiles on DeepSpeed)."""
    variants = {
        "none": [],
        "full": ["train.activation_checkpointing=full"],
        "selective": ["train.activation_checkpointing=selective"],
    }
    if engine == "accelerate":
        variants["compile"] = ["train.compile=true"]
    losses = {}
    for name, overrides in variants.items():
        target = run_dir.parent / f"run-{name}"
        shutil.copytree(run_dir, target)
        zero = ["train.zero_stage=0"] if engine == "deepspeed" else []
        job = expert_job(experiment(prepared, target, "train.steps=3", *zero, *overrides), "code")
        run_loop(job, console=quiet_console())
        losses[name] = [r["loss"] for r in map(json.loads, job.metrics_path.read_text().splitlines())]
    assert len(losses["none"]) == 3
    for name in ("full", "selective"):
        assert losses[name] == pytest.approx(losses["none"], abs=1e-6), name
    if "compile" in losses:
        assert losses["compile"] == pytest.approx(losses["none"], abs=1e-4)
