"""btx finetune: the training loop on the DeepSpeed engine, with every routing mode of the paper.

One tiny experiment (two repetitive byte-level domains, a random 4-expert top-2 MoE as the
"merged" checkpoint) is built once per module; each finetune run gets its own run directory
that links to the shared data and checkpoint. Runs are cached by their overrides, so tests that
look at the same run share it. All runs are fp32 on CPU (gloo), in this process unless a test is
about processes (two ranks, kill and resume).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from btx.cli import main
from btx.data.sampling import TokenSampler
from btx.data.shards import load_shard
from btx.errors import BtxError
from btx.families import read_config
from btx.io.checkpoint import load_model, load_state_dict, save_model
from btx.io.layout import config_to_hf
from btx.io.manifest import write_done
from btx.io.reader import CheckpointReader
from btx.model.config import ModelConfig
from btx.model.transformer import Transformer

pytest.importorskip("deepspeed")

REPO = Path(__file__).resolve().parents[1]
E, TOP_K, SEQ_LEN, BATCH = 4, 2, 32, 4
TEXTS = {"words": "the cat sat on the mat. ", "sums": "1 + 1 = 2; 2 + 2 = 4. "}
RECIPE = """\
experiment: tiny-finetune
tokenizer: byte
model: {{vocab_size: 264, dim: 32, n_layers: 2, n_heads: 4, n_kv_heads: 2, ffn_dim: 48, max_seq_len: 64}}
domains: {{words: words.yaml, sums: sums.yaml}}
train: {{lr: 3.0e-3, warmup_steps: 2, steps: 24, batch_size: {batch}, seq_len: {seq_len}, precision: fp32,
        checkpoint_every: 0, eval_every: 0, eval_batches: 2, log_every: 4}}
finetune:
  mixture: {{words: 1, sums: 1}}
  router_mode: topk
  top_k: {top_k}
"""


# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """Recipe, prepared shards (data/) and two MoE checkpoints: merged/ (random routers) and
    idle-expert/ (routers that never pick expert 3 with top-1 routing)."""
    from btx.recipe.load import load_experiment
    from btx.run.prepare import prepare_experiment

    root = tmp_path_factory.mktemp("finetune")
    for name, text in TEXTS.items():
        lines = "".join(json.dumps({"text": f"{i} " + text * 4}) + "\n" for i in range(200))
        (root / f"{name}.jsonl").write_text(lines)
        (root / f"{name}.yaml").write_text(f"data:\n  sources: [{name}.jsonl]\n  val_fraction: 0.2\n")
    (root / "btx.yaml").write_text(RECIPE.format(batch=BATCH, seq_len=SEQ_LEN, top_k=TOP_K))
    exp = load_experiment(root / "btx.yaml", [f"run_dir={root / 'shared'}"])
    prepare_experiment(exp, progress=False)

    cfg = exp.model.to_model_config(n_experts=E, top_k=TOP_K)
    model = Transformer(cfg)
    model.init_weights(generator=torch.Generator().manual_seed(0))
    save_model(model, None, root / "shared" / "merged")
    write_done(root / "shared" / "merged", {"stage": "merge"})
    with torch.no_grad():  # expert 3's logit is 0, expert 0's or 1's is |v.x| > 0: top-1 never picks 3
        for layer in model.moe_layers():
            v = torch.randn(cfg.dim, generator=torch.Generator().manual_seed(1)) * 4
            layer.router.weight.copy_(torch.stack([v, -v, -v.abs() * 0.1, torch.zeros_like(v)]))
    save_model(model, None, root / "shared" / "idle-expert")
    return root


class Run:
    def __init__(self, run_dir: Path, done: dict | None):
        self.dir, self.done = run_dir, done

    @property
    def records(self) -> list[dict]:
        lines = (self.dir / "finetune-train" / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line) for line in lines]

    @property
    def losses(self) -> list[float]:
        return [r["loss"] for r in self.records]

    @property
    def export(self) -> Path:
        return self.dir / "finetuned"

    def config(self) -> dict:
        return json.loads((self.export / "config.json").read_text())


def make_run_dir(base: Path, name: str) -> Path:
    run_dir = base / "runs" / name
    run_dir.mkdir(parents=True)
    for shared in ("data", "merged"):
        (run_dir / shared).symlink_to(base / "shared" / shared)
    return run_dir


@pytest.fixture(scope="module")
def finetune(base):
    """finetune(*overrides) -> Run, trained in this process; cached by overrides."""
    from btx.recipe.load import load_experiment
    from btx.train.finetune import finetune_job, run_finetune

    cache: dict[tuple, Run] = {}

    def run(*overrides: str) -> Run:
        if overrides not in cache:
            run_dir = make_run_dir(base, f"run{len(cache)}")
            exp = load_experiment(base / "btx.yaml", [f"run_dir={run_dir}", *overrides])
            cache[overrides] = Run(run_dir, run_finetune(finetune_job(exp)))
        return cache[overrides]

    return run


def steps(n: int) -> str:
    return f"train.steps={n}"


def env_without_rendezvous() -> dict:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


# ------------------------------------------------------------------------------- routing modes

MIXTRAL_K = {"topk": TOP_K, "soft": E, "switch": 1, "sample_top1": 1}


@pytest.mark.parametrize("mode", ["topk", "switch", "soft", "sample_top1"])
def test_every_routing_mode_trains_and_the_export_records_it(finetune, mode):
    run = finetune(f"finetune.router_mode={mode}")
    losses = run.losses
    assert len(losses) == 24 and all(math.isfinite(x) for x in losses)
    assert sum(losses[:3]) / 3 > sum(losses[-3:]) / 3 + 0.5, losses
    record = run.records[3]  # step 4: a routing report (log_every = 4)
    assert len(record["balance_loss_layers"]) == 2 and record["mfu"] > 0 and record["tokens_per_s"] > 0
    for row in record["routing_load_share"]:
        assert len(row) == E and sum(row) == pytest.approx(1.0)

    config = run.config()
    assert config["btx"]["router_mode"] == mode and config["btx"]["top_k"] == TOP_K
    assert config["num_experts_per_tok"] == MIXTRAL_K[mode]
    assert ("inference_note" in config["btx"]) == (mode != "topk")
    assert run.done["steps"] == 24 and (run.export / "DONE.json").is_file()


def test_switch_logs_the_drop_rate_of_its_capacity(finetune, base):
    run = finetune("finetune.router_mode=switch", "finetune.capacity_factor=0.5", steps(2))
    # By hand: step 1's batch through the merged weights; capacity ceil(0.5 * T / E) per expert,
    # every token past it is dropped.
    sampler = TokenSampler(
        {n: load_shard(base / "shared" / "data" / n / "train.bin") for n in TEXTS},
        {n: 1.0 for n in TEXTS},
        seq_len=SEQ_LEN,
        batch_size=BATCH,
        seed=0,
    )
    inputs, _ = sampler.batch(0)
    model = switch_model(base, capacity_factor=0.5)
    model.set_routing_record(True)
    model(inputs)
    T = inputs.numel()
    capacity = math.ceil(0.5 * T / E)
    expected = []
    for layer in model.moe_layers():
        counts = torch.bincount(layer.last_routing.probs_TE.argmax(-1), minlength=E)
        expected.append(sum(max(0, int(n) - capacity) for n in counts) / T)
    logged = run.records[0]["drop_rate_layers"]
    assert logged == pytest.approx(expected)
    assert min(logged) > 0  # capacity 0.5 must drop something
    assert run.records[0]["drop_rate"] == pytest.approx(sum(expected) / len(expected))


def switch_model(base: Path, capacity_factor: float) -> Transformer:
    cfg, state = load_state_dict(base / "shared" / "merged", dtype=torch.float32)
    cfg.router_mode, cfg.capacity_factor = "switch", capacity_factor
    model = Transformer(cfg)
    model.load_state_dict(state)
    return model


def test_sample_top1_temperature_follows_the_step(finetune):
    rate = 0.3
    run = finetune("finetune.router_mode=sample_top1", f"finetune.gumbel_rate={rate}", steps(4))
    logged = [r["router_temperature"] for r in run.records]
    assert logged == pytest.approx([max(0.5, math.exp(-rate * (step - 1))) for step in range(1, 5)])
    assert logged[-1] == 0.5  # the floor


def test_sample_top1_is_deterministic_at_eval_and_samples_in_training(finetune):
    run = finetune("finetune.router_mode=sample_top1")
    model = load_model(run.export)
    assert model.cfg.router_mode == "sample_top1" and model.cfg.top_k == TOP_K
    tokens = torch.randint(0, 256, (2, SEQ_LEN), generator=torch.Generator().manual_seed(3))
    model.eval()
    model.set_routing_record(True)
    with torch.no_grad():
        a, b = model(tokens).logits, model(tokens).logits
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        hard = model.moe_layers()[1].last_routing  # layer 0 routes softly, as in the paper
        assert hard.expert_TK.shape[1] == 1 and bool((hard.gate_TK == 1).all())
        model.train()
        torch.manual_seed(0)
        c = model(tokens).logits
        d = model(tokens).logits
    assert not torch.equal(c, d)  # Gumbel noise while training


# -------------------------------------------------------------------------------------- losses


def test_the_loss_adds_alpha_times_the_balancing_loss_and_the_z_loss(finetune, base):
    alpha, z_coef = 0.5, 0.1
    run = finetune(f"finetune.balance_alpha={alpha}", f"finetune.z_loss={z_coef}", steps(3))
    for r in run.records:
        assert r["loss"] == pytest.approx(r["nll"] + alpha * r["balance_loss"] + z_coef * r["z_loss"], rel=1e-6)
        assert r["balance_loss"] == pytest.approx(sum(r["balance_loss_layers"]), rel=1e-6)
        assert r["z_loss"] == pytest.approx(sum(r["z_loss_layers"]), rel=1e-6)
    # Step 1's balancing loss is the paper's sum over layers of E * sum_i u_i p_i on its batch.
    sampler = TokenSampler(
        {n: load_shard(base / "shared" / "data" / n / "train.bin") for n in TEXTS},
        {n: 1.0 for n in TEXTS},
        seq_len=SEQ_LEN,
        batch_size=BATCH,
        seed=0,
    )
    model = load_model(base / "shared" / "merged", dtype=torch.float32)
    model.set_routing_record(True)
    with torch.no_grad():
        model(sampler.batch(0)[0])
    by_hand = 0.0
    for layer in model.moe_layers():
        r = layer.last_routing
        gate_TE = torch.zeros_like(r.probs_TE).scatter_(1, r.expert_TK, r.gate_TK)
        by_hand += E * float((gate_TE.mean(0) * r.probs_TE.mean(0)).sum())
    assert run.records[0]["balance_loss"] == pytest.approx(by_hand, rel=1e-5)

    off = finetune("finetune.balance_alpha=0", steps(2))
    for r in off.records:
        assert r["loss"] == pytest.approx(r["nll"], rel=1e-7) and r["balance_loss"] > 0  # logged, not added


# ---------------------------------------------------------------------------- what trains


@pytest.mark.parametrize("trainable", ["router_only", "frozen_experts"])
def test_trainable_changes_exactly_its_parameters(finetune, base, trainable):
    run = finetune(f"finetune.trainable={trainable}", steps(3))
    _, before = load_state_dict(base / "shared" / "merged", dtype=torch.float32)
    _, after = load_state_dict(run.export, dtype=torch.float32)
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    routers = {n for n in before if n.endswith("ffn.router.weight")}
    experts = {n for n in before if n.endswith(("ffn.w1", "ffn.w2", "ffn.w3"))}
    if trainable == "router_only":
        assert changed == routers
    else:
        assert changed == set(before) - experts


def test_a_router_only_phase_trains_the_routers_first_then_the_finetune_goes_on_from_it(finetune, base):
    """finetune.router_only_steps=2: finetune-router/ changes only the routers of merged/, on the
    finetune's first 2 steps' batches; the finetune starts from that export on the batches after
    them, and its train_flops count both phases (the router phase without weight gradients)."""
    from btx.model.flops import train_flops_per_token
    from btx.recipe.load import load_experiment
    from btx.train.finetune import finetune_job
    from btx.train.job import job_sampler

    run = finetune("finetune.router_only_steps=2", steps(3))
    router_phase = run.dir / "finetune-router"
    _, merged = load_state_dict(base / "shared" / "merged", dtype=torch.float32)
    _, routed = load_state_dict(router_phase, dtype=torch.float32)
    changed = {name for name in merged if not torch.equal(merged[name], routed[name])}
    assert changed == {n for n in merged if n.endswith("ffn.router.weight")}
    first, done = json.loads((router_phase / "DONE.json").read_text()), run.done
    assert first["steps"] == 2 and first["trainable"] == "router_only" and done["steps"] == 3
    cfg = CheckpointReader(run.export).cfg
    own = train_flops_per_token(cfg, SEQ_LEN) * done["tokens"]
    assert first["train_flops"] == train_flops_per_token(cfg, SEQ_LEN, "router_only") * first["tokens"]
    assert done["train_flops"] == own + first["train_flops"]
    assert done["train_flops_phases"] == {"finetune-router": first["train_flops"], "finetune": own}
    assert done["inputs"]["init_from"] == str(router_phase)
    # the finetune's batch i is the finetune stream's batch 2 + i
    exp = load_experiment(base / "btx.yaml", [f"run_dir={run.dir}", "finetune.router_only_steps=2", steps(3)])
    job = finetune_job(exp)
    shards = {d: load_shard(p) for d, p in job.train_shards.items()}
    plain = TokenSampler(shards, job.mixture, seq_len=SEQ_LEN, batch_size=BATCH, seed=job.settings.seed)
    for i in range(3):
        assert torch.equal(job_sampler(job, shards, BATCH).batch(i)[0], plain.batch(2 + i)[0])
    assert job_sampler(job.before, shards, BATCH).batch(1)[0].equal(plain.batch(1)[0])


# ---------------------------------------------------------------------------------- ZeRO


def test_zero_stages_0_2_3_give_the_same_losses(finetune):
    runs = [finetune(f"finetune.zero_stage={stage}", steps(4)) for stage in (0, 2, 3)]
    for run in runs[1:]:
        assert run.losses == pytest.approx(runs[0].losses, rel=1e-5)
        assert [r["grad_norm"] for r in run.records] == pytest.approx(
            [r["grad_norm"] for r in runs[0].records], rel=1e-4
        )
    _, zero0 = load_state_dict(runs[0].export)
    _, zero3 = load_state_dict(runs[2].export)
    for name in zero0:
        torch.testing.assert_close(zero3[name], zero0[name], rtol=1e-4, atol=1e-6)


def test_grad_accumulation_counts_micro_batches_like_deepspeed(finetune):
    """The loop calls backward per micro-batch and step once; the engine keeps DeepSpeed's
    micro-step count in line, so ZeRO-2 (which reduces inside backward) matches ZeRO-0."""
    runs = [finetune(f"finetune.zero_stage={stage}", "train.grad_accum=2", steps(3)) for stage in (0, 2)]
    assert runs[1].losses == pytest.approx(runs[0].losses, rel=1e-5)
    assert runs[0].done["tokens"] == 3 * 2 * BATCH * SEQ_LEN


def test_bf16_zero3_with_optimizer_offload_trains(finetune):
    run = finetune("finetune.zero_stage=3", "finetune.offload_optimizer=true", "train.precision=bf16", steps(6))
    losses = run.losses
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    assert run.config()["dtype"] == "float32"  # the merged checkpoint's dtype, from fp32 master weights


def test_two_processes_zero3_with_an_idle_expert_train_and_exit_cleanly(base):
    """torchrun, 2 ranks on gloo, ZeRO-3, top-1 routing that never picks expert 3: no hang
    (stacked expert weights are gathered and reduced like any other parameter), rc 0. With k = 1
    the gate is 1 whatever the logits and the balancing loss is off, so the routers get no
    gradient and expert 3 stays idle for the whole run."""
    run_dir = make_run_dir(base, "two-ranks")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "btx",
        "finetune",
        str(base / "btx.yaml"),
        f"run_dir={run_dir}",
        "finetune.zero_stage=3",
        "finetune.top_k=1",
        "finetune.balance_alpha=0",
        steps(4),
        "--model",
        str(base / "shared" / "idle-expert"),
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env_without_rendezvous(), capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    assert "terminate called" not in output
    done = json.loads((run_dir / "finetuned" / "DONE.json").read_text())
    assert done["world_size"] == 2 and done["steps"] == 4
    shares = Run(run_dir, done).records[3]["routing_load_share"]
    assert all(row[3] == 0.0 for row in shares) and all(sum(row) == pytest.approx(1.0) for row in shares)


# -------------------------------------------------------------------------------- resume


def test_a_killed_run_resumes_at_its_checkpoint_with_the_same_losses(finetune, base):
    settings = (
        "finetune.router_mode=sample_top1",
        "finetune.zero_stage=2",
        steps(6),
        "train.checkpoint_every=2",
        "train.keep_checkpoints=1",
    )
    uninterrupted = finetune(*settings)
    run_dir = make_run_dir(base, "killed")
    cmd = [sys.executable, "-m", "btx", "finetune", str(base / "btx.yaml"), f"run_dir={run_dir}", *settings]
    env = env_without_rendezvous()
    killed = subprocess.run(
        cmd, cwd=REPO, env={**env, "BTX_TRAIN_KILL_AT_STEP": "5"}, capture_output=True, text=True, timeout=300
    )
    assert killed.returncode == -9, killed.stderr[-3000:]
    ckpt = run_dir / "finetune-train" / "ckpt"
    assert sorted(p.name for p in ckpt.iterdir()) == ["step-4"] and not (run_dir / "finetuned").exists()
    (ckpt / ".step-6.partial" / "deepspeed").mkdir(parents=True)  # what a save killed half-way leaves
    resumed = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr and not (ckpt / ".step-6.partial").exists()
    run = Run(run_dir, None)
    assert [r["step"] for r in run.records] == list(range(1, 7))
    assert run.losses == pytest.approx(uninterrupted.losses, rel=1e-6)
    _, a = load_state_dict(run.export)
    _, b = load_state_dict(uninterrupted.export)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-6, atol=1e-7)


# -------------------------------------------------------------------------------- export


@pytest.mark.parametrize("mode", ["topk", "soft"])
def test_export_loads_in_transformers_mixtral_with_the_same_logits(finetune, mode):
    """topk is Mixtral's routing; soft is Mixtral with num_experts_per_tok = E (see the README)."""
    transformers = pytest.importorskip("transformers")
    run = finetune(f"finetune.router_mode={mode}")
    theirs = transformers.MixtralForCausalLM.from_pretrained(run.export, dtype=torch.float32).eval()
    ours = load_model(run.export).eval()
    tokens = torch.randint(0, 256, (2, SEQ_LEN), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(theirs(tokens).logits, ours(tokens).logits, rtol=1e-4, atol=1e-4)


def test_exported_config_round_trips_every_mode():
    for mode in MIXTRAL_K:
        cfg = ModelConfig(
            vocab_size=96,
            dim=32,
            n_heads=4,
            n_kv_heads=2,
            ffn_dim=48,
            n_experts=E,
            top_k=TOP_K,
            router_mode=mode,
            capacity_factor=1.25,
            gumbel_rate=1e-3,
        )
        written = json.loads(json.dumps(config_to_hf(cfg)))
        assert written["num_experts_per_tok"] == MIXTRAL_K[mode]
        back = read_config(written)
        assert (back.router_mode, back.top_k, back.capacity_factor, back.gumbel_rate) == (mode, TOP_K, 1.25, 1e-3)


# ------------------------------------------------------------------------------- general data


def test_a_general_data_domain_joins_the_mixture_without_becoming_an_expert(base):
    """finetune.general: prepared with the domains, sampled as "general", never branched."""
    from btx.recipe.load import load_experiment
    from btx.run.prepare import prepare_experiment
    from btx.train.finetune import finetune_job, run_finetune

    (base / "general.jsonl").write_text(
        "".join(json.dumps({"text": f"{i} a general sentence. " * 3}) + "\n" for i in range(100))
    )
    (base / "general.yaml").write_text("data:\n  sources: [general.jsonl]\n  val_fraction: 0.2\n")
    run_dir = base / "runs" / "general"
    exp = load_experiment(
        base / "btx.yaml",
        [
            f"run_dir={run_dir}",
            f"finetune.general={base / 'general.yaml'}",
            "finetune.mixture={words: 1, sums: 1, general: 2}",
            steps(2),
        ],
    )
    assert list(exp.domains) == list(TEXTS) and list(exp.data_domains) == [*TEXTS, "general"]
    prepare_experiment(exp, progress=False)
    (run_dir / "merged").symlink_to(base / "shared" / "merged")
    job = finetune_job(exp)
    assert job.mixture == {"words": 1.0, "sums": 1.0, "general": 2.0}
    done = run_finetune(job)
    assert set(done["inputs"]["train_shards"]) == {*TEXTS, "general"} and "general" in done["val_losses"]


def test_the_deepspeed_launchers_local_rank_argument_is_accepted():
    """`deepspeed --module btx finetune ...` runs `python -m btx --local_rank=N finetune ...`."""
    from btx.cli import build_parser

    args, extra = build_parser().parse_known_args(["--local_rank=1", "finetune", "r.yaml", "train.steps=2"])
    assert extra == [] and args.command == "finetune" and args.overrides == ["train.steps=2"]


# ------------------------------------------------------------------------------------ errors


def test_bad_input_is_one_line_and_exit_2(base, capsys):
    recipe = str(base / "btx.yaml")
    empty = base / "runs" / "empty"
    cases = [
        ([f"run_dir={empty}"], "merged MoE is not ready"),
        ([f"run_dir={empty}", "finetune.top_k=9", "--model", str(base / "shared" / "merged")], "finetune.top_k"),
        ([f"run_dir={empty}", "finetune.trainable=experts"], "finetune.trainable"),
        ([f"run_dir={empty}", "--model", str(base / "shared" / "data")], "config.json"),
        ([f"run_dir={empty}", "finetune.mixture={general: 1}"], "finetune.mixture.general"),
    ]
    for args, message in cases:
        assert main(["finetune", recipe, *args]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    assert not (empty / "finetuned").exists() and not (empty / "finetune-train").exists()


def test_resume_reads_checkpoints_weights_only_and_only_files_btx_recorded(base, monkeypatch, tmp_path, capsys):
    """Resuming never unpickles (every torch.load is weights_only=True), skips a checkpoint whose
    files differ from what btx recorded at save (a flipped byte here) for the one before, and
    refuses a file holding any object btx does not allow."""
    from btx.recipe.load import load_experiment
    from btx.train.engines.deepspeed import load_weights_only
    from btx.train.finetune import finetune_job, run_finetune
    from btx.train.job import CKPT_MANIFEST

    run_dir = make_run_dir(base, "weights-only")
    exp = load_experiment(
        base / "btx.yaml", [f"run_dir={run_dir}", "finetune.zero_stage=2", steps(2), "train.checkpoint_every=1"]
    )
    first = run_finetune(finetune_job(exp))
    ckpt = run_dir / "finetune-train" / "ckpt"
    assert json.loads((ckpt / "step-2" / CKPT_MANIFEST).read_text())["files"]
    optimizer = next((ckpt / "step-2").rglob("*optim_states.pt"))
    data = bytearray(optimizer.read_bytes())
    data[-100] ^= 1
    optimizer.write_bytes(bytes(data))
    (run_dir / "finetuned" / "DONE.json").unlink()  # so that the job runs again, from a checkpoint
    loads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **kw: loads.append(kw.get("weights_only")) or real_load(*a, **kw))
    capsys.readouterr()
    again = run_finetune(finetune_job(exp))
    assert f"{optimizer}: differs from the sha256 in {CKPT_MANIFEST}" in capsys.readouterr().err.replace("\n", "")
    assert loads and all(w is True for w in loads)
    assert again["outputs"] == first["outputs"]  # resumed at step 1, the same result
    assert [r["step"] for r in Run(run_dir, None).records] == [1, 2]

    import argparse  # any class but DeepSpeed's few allowed ones

    torch.save({"state": argparse.Namespace(code="runs on load")}, tmp_path / "evil.pt")
    with pytest.raises(Exception, match="holds a Python object btx does not unpickle"):
        load_weights_only(str(tmp_path / "evil.pt"))


# ------------------------------------------------------------------- activation checkpointing, compile


@pytest.mark.parametrize("setting", ["train.activation_checkpointing=full", "train.activation_checkpointing=selective"])
def test_activation_checkpointing_at_zero3_trains_the_same_moe(finetune, setting):
    """Recomputation under ZeRO-3 (whose hooks gather each submodule's weights again in the backward)."""
    plain = finetune("finetune.zero_stage=3", steps(3))
    recomputed = finetune("finetune.zero_stage=3", setting, steps(3))
    assert recomputed.losses == pytest.approx(plain.losses, abs=1e-6)
    norms = [r["grad_norm"] for r in plain.records]
    assert [r["grad_norm"] for r in recomputed.records] == pytest.approx(norms, rel=1e-5)


def test_compiled_blocks_finetune_like_eager_on_deepspeed(finetune, base):
    """Compiled blocks on the DeepSpeed engine (tests/test_blocks.py compares 10 steps; compiling is
    slow on a CPU). ZeRO-3 is refused with one line before anything is written."""
    plain = finetune("finetune.zero_stage=2", steps(3))
    compiled = finetune("finetune.zero_stage=2", "train.compile=true", steps(3))
    assert compiled.losses == pytest.approx(plain.losses, abs=1e-4)
    from btx.recipe.load import load_experiment
    from btx.train.finetune import finetune_job, run_finetune

    run_dir = make_run_dir(base, "compile-zero3")  # not through `finetune`: its cache counts runs
    exp = load_experiment(base / "btx.yaml", [f"run_dir={run_dir}", "finetune.zero_stage=3", "train.compile=true"])
    with pytest.raises(BtxError, match="train.compile: not supported with ZeRO stage 3"):
        run_finetune(finetune_job(exp))
    assert not (run_dir / "finetune-train" / "metrics.jsonl").exists() and not (run_dir / "finetuned").exists()
    # the sharded build had started a process group: a refused job leaves none, and no rendezvous
    # port in the environment (later jobs in this process and its children would collide on it)
    assert not torch.distributed.is_initialized() and "MASTER_PORT" not in os.environ
