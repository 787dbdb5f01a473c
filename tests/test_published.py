"""The published figures (README demo block, demo recipe arithmetic) are what their sources give."""

import dataclasses
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("published", REPO / "tools" / "published.py")
published = importlib.util.module_from_spec(_spec)
sys.modules["published"] = published  # dataclasses look their module up while it loads
_spec.loader.exec_module(published)


@pytest.fixture
def copy(tmp_path) -> Path:
    """The files the published figures live in and come from, in a scratch root."""
    recipes = (*(p.recipe.rsplit("/", 1)[0] for p in published.PUBLISHED.values()), "recipes/demo-seed")
    for rel in (published.README, *recipes, *(p.snapshot for p in published.PUBLISHED.values())):
        src, dst = REPO / rel, tmp_path / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copyfile)(src, dst)
    return tmp_path


def test_committed_figures_are_current():
    assert published.check(REPO) == []


def test_check_mode_is_the_ci_entry_point():
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "published.py"), "--check"], capture_output=True, text=True, cwd=REPO
    )
    assert proc.returncode == 0, proc.stderr


def test_a_readme_number_edited_by_hand_fails(copy):
    readme = copy / published.README
    text = readme.read_text()
    block = text[text.index(published.README_BEGIN) : text.index(published.README_END)]
    number = re.search(r"\d\.\d{4}", block).group(0)
    readme.write_text(text.replace(number, "9.9999", 1))
    problems = published.check(copy)
    assert len(problems) == 1 and str(readme) in problems[0] and "render" in problems[0]
    published.render(copy)
    assert readme.read_text() == text and published.check(copy) == []


def test_a_recipe_value_changed_without_rerunning_fails(copy):
    recipe = copy / published.RECIPE
    text = recipe.read_text()
    line = next(ln for ln in text.splitlines() if ln.startswith("  steps: "))  # train.steps
    steps = int(line.split()[1])
    recipe.write_text(text.replace(line, f"  steps: {steps + 20}", 1))
    problems = published.check(copy)
    # the arithmetic comment is stale, and so is the run snapshot, which names the changed key
    assert any(str(recipe) in p and "render" in p for p in problems)
    assert any(f"train.steps: {steps} then, {steps + 20} now" in p for p in problems)
    published.render(copy)
    comment = recipe.read_text()
    assert f"3 x {steps + 20} steps" in comment and f"3 x {steps} steps" not in comment
    assert [p for p in published.check(copy) if str(recipe) in p and "render" in p] == []
    assert any(f"{steps + 20} now" in p for p in published.check(copy))  # until the demo is rerun


def test_a_hand_edited_arithmetic_comment_fails(copy):
    recipe = copy / published.RECIPE
    text = recipe.read_text()
    recipe.write_text(re.sub(r"(\d+\.\d)% of BTX", "23.0% of BTX", text, count=1))
    assert recipe.read_text() != text
    assert any(str(recipe) in p for p in published.check(copy))


def test_a_snapshot_from_another_run_fails(copy):
    run_json = copy / published.SNAPSHOT / "run.json"
    run = json.loads(run_json.read_text())
    run["jobs"]["finetune"]["steps"] += 1
    run_json.write_text(json.dumps(run))
    problems = published.check(copy)
    assert any("finetune ran" in p and "arithmetic says" in p for p in problems)


def test_the_arithmetic_uses_the_recipe_and_the_loops_flop_count():
    from btx.plan.stages import seed_config
    from btx.recipe.load import load_experiment

    exp = load_experiment(REPO / published.RECIPE)
    a = published.recipe_arithmetic(exp)
    # The demo's seed ships (recipes/demo/seed/): its cost is its own recipe's, demo-seed's.
    made_by = load_experiment(REPO / "recipes" / "demo-seed" / "btx.yaml")
    cfg = made_by.recipe.model.to_model_config()
    assert dataclasses.replace(seed_config(exp), extra={}) == cfg and exp.recipe.model is None
    st = made_by.seed_train
    assert a.seed.tokens == st.steps * st.batch_size * st.seq_len
    from btx.model.flops import train_flops_per_token

    assert a.seed.flops == train_flops_per_token(cfg, st.seq_len) * a.seed.tokens
    expert = next(iter(exp.domains.values())).train  # FFN-only experts: frozen weights cost 4 (or 2), not 6
    assert (
        a.experts[next(iter(exp.domains))].flops
        == train_flops_per_token(cfg, expert.seq_len, expert.trainable) * expert.steps * expert.tokens_per_step
    )
    assert a.seed_params == cfg.param_counts()["total"]
    assert 0 < a.moe_share < 1 and a.budget == a.expert_flops + a.finetune.flops
    assert a.n_experts == len(exp.domains) + 1 and a.finetune.flops_per_token > a.dense_flops_per_token


def test_eval_rows_are_read_generically():
    """Rows and fields the table does not know (standard errors, new baselines) just appear."""
    data = {
        "domains": ["a", "b"],
        "rows": [
            {"name": "seed", "losses": {"a": 1.0, "b": 2.0}, "average": 1.5, "train_flops": 0.0, "active_params": 1000},
            {
                "name": "dense (data-matched)",
                "losses": {"a": 0.9, "b": 2.1},
                "average": 1.5,
                "stderr": {"a": 0.01, "b": 0.02},
                "average_stderr": 0.011,
                "train_flops": 1.8625e12,
                "active_params": 2_000_000,
                "matched": "data",
            },
            {"name": "BTM | top-1 (tf-idf)", "losses": {"a": 0.8, "b": 1.9}, "average": 1.35},
        ],
    }
    lines = published.eval_table(data)
    assert len(lines) == 2 + 3
    assert "0.9000 ± 0.0100" in lines[3] and "1.5000 ± 0.0110" in lines[3] and "1.86e+12" in lines[3]
    assert lines[4].startswith("| BTM \\| top-1 (tf-idf) |") and lines[4].rstrip().endswith("| - | - |")
    assert "**1.3500**" in lines[4]  # the best average


def test_snapshot_copies_a_run(copy, tmp_path):
    """snapshot reads a run directory's eval.json, pipeline.json and DONE.json files."""
    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    shutil.copyfile(copy / published.SNAPSHOT / "eval.json", run / "eval" / "eval.json")
    old = json.loads((copy / published.SNAPSHOT / "run.json").read_text())
    (run / "pipeline.json").write_text(
        json.dumps(
            {
                s["stage"]: {"seconds": s["seconds"], "summary": s["summary"], "finished_at": old["finished_at"]}
                for s in old["stages"]
            }
        )
    )
    for name, job in old["jobs"].items():
        rel = f"experts/{name.split(':')[1]}" if name.startswith("expert:") else published.JOB_DIRS[name]
        (run / rel).mkdir(parents=True)
        (run / rel / "DONE.json").write_text(json.dumps(job))
    (run / "eval" / "loss_vs_flops.png").write_bytes(b"\x89PNG")
    published.snapshot(run, root=copy, machine="a test machine")
    new = json.loads((copy / published.SNAPSHOT / "run.json").read_text())
    assert new["jobs"] == old["jobs"] and new["stages"] == old["stages"] and new["machine"] == "a test machine"
    assert (copy / published.SNAPSHOT / "loss_vs_flops.png").is_file()
    assert not (copy / published.SNAPSHOT / "routing.png").exists()  # this run had no analysis
    published.render(copy)
    readme = (copy / published.README).read_text()
    assert "on a test machine" in readme and "docs/demo/loss_vs_flops.png" in readme
    assert published.check(copy) == []


def test_the_seed_spread_line_and_its_staleness(copy):
    """A rerun's averages (docs/demo/seed-N.json) become the README's spread line; a rerun made
    from other recipe values makes the check fail."""
    data = {
        "rows": [
            {"name": "BTX", "average": 2.0},
            {"name": "dense (compute-matched)", "average": 2.01},
            {"name": "seed", "average": 3.0},
        ]
    }
    lines = published.spread_lines(
        data, [{"train_seed": 1, "averages": {"BTX": 2.02, "dense (compute-matched)": 2.02}}]
    )
    assert lines == [
        "- Seed-to-seed: the same recipe with `train.seed=1` (the init and batches of every job it trains) gives "
        "BTX 2.0000 → 2.0200, dense (compute-matched) 2.0100 → 2.0200.",
        "- BTX's margin over each (its average minus BTX's; positive: BTX is lower), seed 0 / seed 1: "
        "dense (compute-matched) +0.0100 / +0.0000 (spread 0.0100).",
    ]
    two = [
        {"train_seed": k, "averages": {"BTX": 2.0, "dense (compute-matched)": 2.0 + m}}
        for k, m in ((1, 0.03), (2, 0.02))
    ]
    assert published.spread_lines(data, two)[-1] == (
        "- Over seeds 0, 1, 2, BTX's lowest and highest margin over each: "
        "dense (compute-matched) +0.0100 to +0.0300 (spread 0.0200)."
    )
    seed_file = copy / published.SNAPSHOT / "seed-7.json"
    seed_file.write_text(
        json.dumps({"train_seed": 7, "recipe_values": {"btx.yaml": {"experiment": "other"}}, "averages": {"BTX": 1.0}})
    )
    assert any(str(seed_file) in p and "other recipe values" in p for p in published.check(copy))


def test_the_study_recipe_changes_only_the_protocol_and_its_values_count_its_base(copy):
    """demo-study is the demo with both protocols: a value edited in the demo makes both snapshots stale."""
    from btx.recipe.load import load_experiment

    demo, study = (load_experiment(copy / p.recipe) for p in (published.DEMO, published.STUDY))
    assert (demo.eval.match, study.eval.match) == ("compute", "both")
    assert study.merge == demo.merge and study.finetune == demo.finetune and study.train == demo.train
    assert published.recipe_values(copy / published.STUDY.recipe)["base"] == published.recipe_values(
        copy / published.DEMO.recipe
    )
    recipe = copy / published.DEMO.recipe
    recipe.write_text(recipe.read_text().replace("router_scale: 10", "router_scale: 3", 1))
    stale = " ".join(published.check(copy))
    assert "docs/demo/run.json" in stale and "docs/demo-study/run.json" in stale
