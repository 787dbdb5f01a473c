"""btx plan: the paper's accounting on recipes/llama2-7b, the memory model's arithmetic, the
suggestions, the layout errors, --measured and the generated docs/PLAN.md."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from btx.cli import main, parse_args
from btx.errors import BtxError
from btx.model.config import ModelConfig
from btx.plan.command import build_plan
from btx.plan.compute import waves
from btx.plan.gpus import GPUS, gpu
from btx.plan.memory import activation_bytes, param_counts, state_bytes
from btx.recipe.load import load_experiment
from btx.recipe.schema import TrainSection

REPO = Path(__file__).resolve().parents[1]
RECIPE = str(REPO / "recipes" / "llama2-7b" / "btx.yaml")
SEED_CONFIG = str(REPO / "recipes" / "llama2-7b" / "seed-config.json")
TINY = ModelConfig(vocab_size=10, dim=4, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=6)


def plan(*flags: str, recipe: str = RECIPE) -> dict:
    return build_plan(parse_args(["plan", recipe, "--gpu", "H100", "--seed-config", SEED_CONFIG, *flags]))


# -- the paper's accounting ----------------------------------------------------------------------


def test_llama2_7b_tokens_and_moe_share_match_the_paper():
    p = plan()
    assert abs(p["btx"]["tokens"] - 533e9) / 533e9 < 0.01
    assert 0.22 <= p["btx"]["moe_share"] <= 0.24
    experts = [j for j in p["jobs"] if j["kind"] == "expert"]
    assert [j["tokens"] for j in experts] == [36000 * 4_194_304] * 3
    assert p["gpus_per_job"] == 64 and p["cluster_gpus"] == 192  # the recipe's Slurm layout


def test_paper_gpu_days_imply_an_mfu_on_the_named_gpu(capsys):
    h100 = plan("--reference-gpu-days", "926.1")["reference"]["implied_mfu"]
    assert 0.28 < h100 < 0.35  # about 31% of an H100's 989 TFLOP/s
    a100 = build_plan(
        parse_args(["plan", RECIPE, "--gpu", "A100", "--seed-config", SEED_CONFIG, "--reference-gpu-days", "926.1"])
    )["reference"]["implied_mfu"]
    assert a100 > 0.95  # all of an A100's peak: no training run gets there
    assert main(["plan", RECIPE, "--gpu", "H100", "--seed-config", SEED_CONFIG, "--reference-gpu-days", "926.1"]) == 0
    assert f"MFU of {h100:.1%} on H100" in " ".join(capsys.readouterr().out.split())


def test_gpu_hours_and_wall_time_follow_the_layout():
    p = plan("--mfu", "0.5")
    finetune = next(j for j in p["jobs"] if j["job"] == "finetune")
    assert finetune["gpu_hours"] == pytest.approx(finetune["flops"] / (989e12 * 0.5) / 3600)
    assert finetune["wall_hours"] == pytest.approx(finetune["gpu_hours"] / 64)
    side_by_side = next(s for s in p["stages"] if s["stage"] == "experts")
    one_at_a_time = next(s for s in plan("--mfu", "0.5", "--cluster-gpus", "64")["stages"] if s["stage"] == "experts")
    assert one_at_a_time["wall_hours"] == pytest.approx(3 * side_by_side["wall_hours"])
    assert "3 waves" in one_at_a_time["note"] and "1 wave" in side_by_side["note"]
    # GPU-hours do not depend on how many GPUs share the work; tokens do (4M tokens per step at 64 GPUs)
    half = plan("--mfu", "0.5", "--nodes", "4")
    assert half["gpus_per_job"] == 32 and half["btx"]["tokens"] == pytest.approx(p["btx"]["tokens"] / 2)


def test_compute_matched_baselines_spend_btx_flops():
    p = plan()
    for b in p["baselines"]:
        assert b["flops"] == pytest.approx(p["btx"]["flops"], rel=1e-4)
    upcycled = next(b for b in p["baselines"] if b["job"] == "baseline:upcycled-compute")
    assert upcycled["tokens"] < p["btx"]["tokens"]  # an MoE token costs more than a dense one


def test_waves_longest_first():
    assert waves([3.0, 1.0, 1.0, 1.0], 2) == (3.0, 2)
    assert waves([2.0, 2.0, 2.0], 3) == (2.0, 1)
    assert waves([], 4) == (0.0, 0)


# -- bad input -----------------------------------------------------------------------------------


def test_unknown_gpu_and_impossible_layout_are_one_line_exit_2(capsys):
    assert main(["plan", RECIPE, "--gpu", "H1000", "--seed-config", SEED_CONFIG]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown GPU 'H1000'" in err and "H100" in err
    assert main(["plan", RECIPE, "--gpu", "H100", "--seed-config", SEED_CONFIG, "--cluster-gpus", "32"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "impossible layout: 64 GPUs per job but the cluster has 32" in err


def test_gpu_table():
    assert gpu("h100") is GPUS["H100"] and gpu("A100") is GPUS["A100-80GB"]
    assert {"A100-40GB", "A100-80GB", "H100", "H200", "B200", "L40S", "MI300X"} == set(GPUS)
    with pytest.raises(BtxError, match="MI300X"):
        gpu("MI30")


def test_seed_config_needed_when_the_seed_is_elsewhere(capsys):
    assert main(["plan", RECIPE, "--gpu", "H100"]) == 2
    assert "--seed-config" in capsys.readouterr().err


# -- the memory model ----------------------------------------------------------------------------


def test_memory_arithmetic_on_a_tiny_config_by_hand():
    # 212 parameters: embed 40 + head 40 + final norm 4; the layer: 2 norms 8, q 16, k 8, v 8, o 16, FFN 72
    counts = param_counts(TINY, "all")
    assert counts.total == 212 == TINY.param_counts()["total"] and counts.trained == 212
    assert counts.largest_layer == 128
    assert param_counts(TINY, "ffn").trained == 72
    kw = dict(precision="fp32", zero_stage=None, world=1, offload=False)
    assert state_bytes(counts, engine="accelerate", **kw) == (848, 848, 1696, 0)
    ffn = param_counts(TINY, "ffn")
    assert state_bytes(ffn, engine="accelerate", **{**kw, "world": 2}) == (848, 288, 576, 288)  # + DDP buckets
    bf16 = dict(engine="deepspeed", precision="bf16", world=4, offload=False)
    assert state_bytes(counts, zero_stage=0, **bf16) == (424, 424, 2544, 848 + 424)  # + the reduce bucket
    assert state_bytes(counts, zero_stage=2, **bf16) == (424, 106, 636, 212 + 424)
    assert state_bytes(counts, zero_stage=3, **bf16) == (106, 106, 636, 212 + 424 + 512)
    assert state_bytes(counts, zero_stage=3, **{**bf16, "offload": True}) == (106, 106, 0, 424 + 512)
    fp32 = dict(engine="deepspeed", precision="fp32", world=1, offload=False)
    assert state_bytes(counts, zero_stage=0, **fp32) == (848, 848, 1696, 848)  # no master copy at ZeRO-0 fp32
    assert state_bytes(counts, zero_stage=3, **fp32) == (848, 848, 1696, 848 + 848)  # ZeRO-3 fp32: shared master
    assert state_bytes(counts, zero_stage=1, **fp32) == (848, 848, 2544, 848 + 848)  # ZeRO-1 fp32: a master copy
    # activations, fp32, 1 x 3 tokens: per layer and token norms 2 x 48, attention 72, FFN 96 = 264;
    # loss (16 x 10 + the final norm's 48) per token
    acts = activation_bytes(TINY, batch=1, seq=3, act_bytes=4, residual_bytes=4, checkpointing="none")
    assert acts == 264 * 3 + 208 * 3
    full = activation_bytes(TINY, batch=1, seq=3, act_bytes=4, residual_bytes=4, checkpointing="full")
    assert full == 4 * 4 * 3 + 264 * 3 + 208 * 3  # the layer inputs + one layer recomputed + the loss


def test_checkpointing_and_zero_shrink_memory_on_llama2_7b():
    base = {j["job"]: j for j in plan()["jobs"]}
    ac = {j["job"]: j for j in plan("--activation-checkpointing", "full")["jobs"]}
    assert ac["expert:math"]["memory"]["activations"] < base["expert:math"]["memory"]["activations"] / 5
    z3 = {j["job"]: j for j in plan("train.zero_stage=3")["jobs"]}
    assert z3["expert:math"]["memory"]["params"] == pytest.approx(base["expert:math"]["memory"]["params"] / 64)


def test_suggestions_make_a_plan_that_does_not_fit_fit():
    argv = ["plan", RECIPE, "--gpu", "A100-40GB", "--seed-config", SEED_CONFIG, "finetune.zero_stage=1"]
    before = build_plan(parse_args(argv))
    assert not before["fits"]
    flags, overrides = [], []
    for job in before["jobs"]:
        if job["fits"]:
            continue
        changes = job["suggestion"]["changes"]
        assert changes and job["suggestion"]["peak"] <= before["usable_bytes"]
        for change in changes:
            if change.startswith("--"):
                flags += [f for f in change.split() if f not in flags]
            else:
                overrides.append(change)
    jobs = {j["job"]: j for j in before["jobs"]}
    # ZeRO-2 experts on a 40 GB card: checkpointing comes before ZeRO-3; the ZeRO-1 finetune needs both.
    # Checkpointing is a recipe key once train.activation_checkpointing exists, a plan flag before.
    has_key = "activation_checkpointing" in {f.name for f in dataclasses.fields(TrainSection)}

    def ac(prefix: str) -> str:
        return f"{prefix}activation_checkpointing=full" if has_key else "--activation-checkpointing full"

    assert jobs["expert:math"]["suggestion"]["changes"] == [ac("train.")]
    assert jobs["finetune"]["suggestion"]["changes"] == [ac("finetune.train."), "finetune.zero_stage=3"]
    after = build_plan(parse_args([*argv, *overrides, *flags]))
    assert after["fits"] and all(j["fits"] for j in after["jobs"])


# -- --measured, --json ----------------------------------------------------------------------------


def test_measured_takes_the_median_mfu_after_the_first_step(tmp_path, capsys):
    job = tmp_path / "experts" / "code"
    job.mkdir(parents=True)
    records = [{"step": i + 1, "mfu": m, "tokens_per_s": 1000.0 * (i + 1)} for i, m in enumerate([0.9, 0.3, 0.5, 0.4])]
    (job / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 5, "mf')
    p = plan("--measured", str(tmp_path))
    assert p["mfu"] == pytest.approx(0.4) and p["measured"]["steps"] == 3
    assert p["measured"]["tokens_per_s"] == pytest.approx(3000.0)
    (tmp_path / "empty").mkdir()
    argv = ["plan", RECIPE, "--gpu", "H100", "--seed-config", SEED_CONFIG, "--measured", str(tmp_path / "empty")]
    assert main(argv) == 2 and "no metrics.jsonl with an mfu" in capsys.readouterr().err


def test_json_output(capsys):
    assert main(["plan", RECIPE, "--gpu", "B200", "--seed-config", SEED_CONFIG, "--json"]) == 0
    p = json.loads(capsys.readouterr().out)
    assert p["gpu"]["name"] == "B200" and {j["job"] for j in p["jobs"]} >= {"finetune", "expert:code"}


def test_demo_plan_agrees_with_the_demo_recipes_published_arithmetic():
    """`btx plan demo` and recipes/demo/btx.yaml's arithmetic block (tools/published_arithmetic.py)
    count the same FLOPs and the same compute-matched baseline steps."""
    spec = importlib.util.spec_from_file_location("published_arithmetic", REPO / "tools" / "published_arithmetic.py")
    arithmetic = importlib.util.module_from_spec(spec)
    sys.modules["published_arithmetic"] = arithmetic  # dataclasses look their module up while it loads
    spec.loader.exec_module(arithmetic)
    a = arithmetic.recipe_arithmetic(load_experiment("demo"))
    p = build_plan(parse_args(["plan", "demo", "--gpu", "H100", "--gpus-per-job", "1"]))
    jobs = {j["job"]: j for j in p["jobs"]}
    assert "seed" not in jobs  # the demo's seed ships (recipes/demo/seed/); demo-seed's plan has it
    seed_plan = build_plan(parse_args(["plan", "demo-seed", "--gpu", "H100", "--gpus-per-job", "1"]))
    (seed_job,) = [j for j in seed_plan["jobs"] if j["job"] == "seed"]
    assert seed_job["flops"] == pytest.approx(a.seed.flops, rel=1e-9) and a.seed_recipe is not None
    assert jobs["expert:code"]["flops"] == pytest.approx(a.experts["code"].flops, rel=1e-9)
    assert jobs["finetune"]["flops"] == pytest.approx(a.finetune.flops, rel=1e-9)
    assert p["btx"]["moe_share"] == pytest.approx(a.moe_share, rel=1e-9)
    assert jobs["baseline:dense-compute"]["steps"] == a.dense_steps
    assert jobs["baseline:upcycled-compute"]["steps"] == a.upcycled_steps


def test_demo_recipe_plans_without_a_seed_config(capsys):
    assert main(["plan", "demo", "--gpu", "L40S"]) == 0
    out = capsys.readouterr().out
    assert "seed" in out and "MoE share" in out


def test_docs_plan_md_numbers_are_current():
    result = subprocess.run(
        [sys.executable, str(REPO / "tools" / "plan_doc.py"), "check"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
