"""`btx run` end to end on a seconds-scale recipe: every stage, skipping, redoing, kill and resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from btx.io.manifest import read_done

TINY = Path(__file__).parent / "fixtures" / "tiny" / "btx.yaml"
STAGE_MANIFESTS = [
    "seed",
    "experts/code",
    "experts/prose",
    "merged",
    "finetuned",
    "baselines/dense",
    "baselines/upcycled",
    "eval",
    "analysis",
]


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
    for rel in [
        "seed",
        "experts/code/final",
        "experts/prose/final",
        "merged",
        "finetuned",
        "baselines/dense/final",
        "baselines/upcycled",
    ]:
        assert (full_run / rel / "config.json").is_file(), rel
    assert (full_run / "analysis" / "routing.json").is_file()
    names = set(eval_losses(full_run))
    assert {
        "seed",
        "expert:code",
        "expert:prose",
        "BTM ensemble",
        "BTX",
        "dense (compute-matched)",
        "sparse upcycling (compute-matched)",
    } <= names
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
    assert "ran" not in [
        line.split("│")[2].strip()
        for line in result.stdout.splitlines()
        if line.count("│") >= 4
        and line.split("│")[1].strip() in ("seed", "branch", "merge", "finetune", "baselines", "eval", "analyze")
    ]
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
    proc.stderr.close()
    assert proc.returncode != 0
    assert read_done(run_dir / "merged") is None
    result = btx_run(run_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert eval_losses(run_dir) == eval_losses(full_run)


# ----------------------------------------------------------------------------------------------
# Provenance: a replaced, changed or damaged input is never served (docs/PROVENANCE.md)
# ----------------------------------------------------------------------------------------------


def btx_main(*args: str) -> tuple[int, str]:
    """`btx ARGS` in this process: (exit status, stderr's last line)."""
    import contextlib
    import io

    from btx.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        status = main(list(args))
    lines = err.getvalue().strip().splitlines()
    return status, lines[-1] if lines else ""


def run_here(run_dir: Path, *extra: str) -> tuple[int, str]:
    """`btx run TINY run_dir=... eval.baselines=true EXTRA` in this process: (status, what it printed)."""
    import io

    from rich.console import Console

    from btx.errors import BtxError
    from btx.run.pipeline import run

    out = io.StringIO()
    overrides = [a for a in extra if not a.startswith("--") and "=" in a]
    until = extra[extra.index("--until") + 1] if "--until" in extra else None
    try:
        status = run(
            TINY,
            [f"run_dir={run_dir}", "eval.baselines=true", *overrides],
            until=until,
            console=Console(file=out, width=300),
        )
    except BtxError as e:
        return 2, out.getvalue() + f"\nbtx: error: {e}"
    return status, out.getvalue()


def done_times(run_dir: Path, *stages: str) -> dict:
    return {s: (run_dir / s / "DONE.json").stat().st_mtime_ns for s in stages}


def flip_a_byte(path: Path, offset: int = 4096) -> None:
    """Change one byte in place, keeping the size and the modification time."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    st = path.stat()
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.fixture
def run_copy(full_run, tmp_path) -> Path:
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(full_run, run_dir, symlinks=True)
    return run_dir


def test_the_readme_merge_example_then_btx_run(run_copy, full_run):
    """`btx merge RECIPE merge.router_init=centroid ... --force` replaces merged/. A plain `btx run`
    then refuses, naming merged/; `btx finetune` and `btx eval` refuse the finetune of the old merge;
    `btx run` with the merge's settings keeps that merge and redoes finetune, baselines, eval, analyze."""
    run = [str(TINY), f"run_dir={run_copy}", "eval.baselines=true"]
    centroid = ["merge.router_init=centroid", "merge.router_tokens=256"]
    assert btx_main("merge", *run[:2], *centroid, "--force", "--quiet")[0] == 0
    status, message = btx_main("run", *run)
    assert status == 2 and f"{run_copy / 'merged'}: not made by this btx run" in message
    assert "router_init 'centroid' where the recipe has 'random'" in message and "--from merge" in message
    status, message = btx_main("finetune", *run[:2], *centroid)
    assert status == 2 and "finetuned/DONE.json: job 'finetune' finished, but" in message
    assert f"{run_copy / 'merged' / 'model.safetensors'}: changed since it was used" in message
    status, message = btx_main("eval", *run[:2], *centroid)
    assert status == 2 and "finetuned: stale:" in message and "--force" in message

    merged = read_done(run_copy / "merged")
    before = done_times(run_copy, "finetuned", "baselines/upcycled", "eval", "analysis", "experts/code")
    assert btx_main("run", *run, *centroid)[0] == 0
    after = done_times(run_copy, "finetuned", "baselines/upcycled", "eval", "analysis", "experts/code")
    assert read_done(run_copy / "merged") == merged  # kept: it follows from these settings
    # Redone: what follows from the merge. Kept: the experts, and the baselines, which take only the
    # merge's shape and upcycle options, not its routers.
    assert [s for s in before if before[s] != after[s]] == ["finetuned", "eval", "analysis"]
    init = read_done(run_copy / "finetuned")["input_identities"]["init_from"]["sha256"]
    assert init["model.safetensors"] == merged["outputs"]["model.safetensors"]
    # The table now describes the merge on disk, not the one it replaced.
    assert eval_losses(run_copy)["BTX merged (no finetune)"] != eval_losses(full_run)["BTX merged (no finetune)"]
    assert btx_main("eval", *run[:2], *centroid)[0] == 0  # nothing stale any more


def test_a_damaged_file_in_every_finished_stage_is_redone_to_the_same_result(run_copy, full_run):
    """A flipped byte (same size and mtime), a truncation, junk and a deletion, one per stage:
    `btx run` exports damaged checkpoints again from their final checkpoints, re-prepares the
    shard, re-merges, and ends with the uninterrupted run's numbers."""
    flip_a_byte(run_copy / "data" / "prose" / "train.bin", 10)
    flip_a_byte(run_copy / "experts" / "code" / "final" / "model.safetensors")
    merged = run_copy / "merged" / "model.safetensors"
    merged.write_bytes(merged.read_bytes()[:1000])
    (run_copy / "finetuned" / "config.json").write_text("junk")
    (run_copy / "eval" / "eval.md").unlink()
    status, printed = run_here(run_copy)
    assert status == 0, printed[-3000:]
    for text in ("train code: ", "exporting it again", "merge: redoing", "finetuned/config.json: differs"):
        assert text in printed, text
    for rel in (
        "data/prose/train.bin",
        "experts/code/final/model.safetensors",
        "merged/model.safetensors",
        "finetuned/config.json",
        "finetuned/model.safetensors",
    ):
        assert (run_copy / rel).read_bytes() == (full_run / rel).read_bytes(), rel
    assert eval_losses(run_copy) == eval_losses(full_run)
    assert (run_copy / "experts" / "code" / "metrics.jsonl").read_text() == (
        full_run / "experts" / "code" / "metrics.jsonl"
    ).read_text()  # exported again, not retrained


def test_a_changed_seed_path_checkpoint_retrains_the_experts(run_copy, tmp_path):
    """seed.path given: its content is the seed's identity. The same bytes keep the experts; one
    byte changed (same size and mtime) retrains them and redoes the merge."""
    import shutil

    seed = tmp_path / "llama"
    shutil.copytree(run_copy / "seed", seed)
    (seed / "DONE.json").unlink()  # an external checkpoint
    run = [f"seed.path={seed}", "model=null", "branch.max_parallel=2"]
    status, printed = run_here(run_copy, *run, "--until", "merge")
    assert status == 0, printed[-3000:]
    assert "branch: kept expert code" in printed and "merge: redoing" in printed
    code = read_done(run_copy / "experts" / "code")
    flip_a_byte(seed / "model.safetensors")
    status, message = btx_main("train", str(TINY), "--domain", "code", f"run_dir={run_copy}", *run[:2])
    assert status == 2 and f"{seed / 'model.safetensors'}: not what it was made from (input 'init_from')" in message
    status, printed = run_here(run_copy, *run, "--until", "merge")
    assert status == 0, printed[-3000:]
    assert "branch: expert code: " in printed and "retraining it" in printed
    retrained = read_done(run_copy / "experts" / "code")
    assert retrained["outputs"] != code["outputs"]
    assert retrained["input_identities"]["init_from"]["path"] == str(seed)
    assert (
        read_done(run_copy / "merged")["input_identities"]["code"]["sha256"]["model.safetensors"]
        == retrained["outputs"]["final/model.safetensors"]
    )


def test_a_bit_flip_in_an_expert_shard_is_refused_by_merge(run_copy):
    shard = run_copy / "experts" / "code" / "final" / "model.safetensors"
    flip_a_byte(shard)
    before = (run_copy / "merged" / "model.safetensors").read_bytes()
    status, message = btx_main("merge", str(TINY), f"run_dir={run_copy}", "--force", "--quiet")
    assert status == 2 and message.startswith(f"btx: error: {shard}: its sha256 is not the one its DONE.json")
    assert (run_copy / "merged" / "model.safetensors").read_bytes() == before  # the old merge stays
    assert not [p.name for p in run_copy.iterdir() if p.name.startswith(".merged.tmp")]


def test_two_btx_runs_of_one_recipe(run_copy):
    """The second one stops at once with one line naming the first (pid, host, command)."""
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from btx.io.locks import output_lock\n"
            "with output_lock(sys.argv[1], 'the run directory'):\n print('held', flush=True); time.sleep(60)",
            str(run_copy),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])},
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        status, message = btx_main("run", str(TINY), f"run_dir={run_copy}", "eval.baselines=true")
        assert status == 2 and f"{run_copy}: the run directory is in use by pid {holder.pid} on " in message
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    assert btx_main("run", str(TINY), f"run_dir={run_copy}", "eval.baselines=true")[0] == 0  # a dead holder's lock


def test_a_domain_added_to_a_finished_run_grows_the_moe_and_redoes_nothing_else(run_copy, tmp_path):
    """The issue's flow: a third domain in `domains:` and in `grow.domains` makes `btx run` train
    only its expert, grow the finished MoE by it (ridge routers) and finetune the grown MoE briefly;
    the seed, the other experts, the merge, the finetune and the baselines are kept."""
    import shutil

    import torch
    import transformers

    recipe_dir = tmp_path / "recipe"
    shutil.copytree(TINY.parent, recipe_dir)
    notes = recipe_dir / "data" / "notes"
    notes.mkdir()
    for i in range(4):
        (notes / f"n{i}.txt").write_text(
            "".join(f"NOTE {i}-{j}: remember the ZEBRA QUOTA {j * j}.\n" for j in range(60))
        )
    (recipe_dir / "notes.yaml").write_text("data:\n  sources:\n    - data/notes\n  val_fraction: 0.25\n")
    recipe = recipe_dir / "btx.yaml"
    text = recipe.read_text().replace("  prose: prose.yaml\n", "  prose: prose.yaml\n  notes: notes.yaml\n")
    # prompts in the recipe (for a hidden init elsewhere) must not trouble a ridge grow
    text = text.replace("merge:\n  top_k: 2\n", "merge:\n  top_k: 2\n  prompts: {code: [def f]}\n")
    recipe.write_text(text + "grow:\n  domains: [notes]\n  router_init: ridge\n  steps: 2\n")
    kept = ["seed", "experts/code", "experts/prose", "merged", "finetuned", "baselines/dense", "baselines/upcycled"]
    before = done_times(run_copy, *kept)
    status, out = btx_main("run", str(recipe), f"run_dir={run_copy}", "eval.baselines=true")
    assert status == 0, out[-3000:]
    assert done_times(run_copy, *kept) == before
    grown = read_done(run_copy / "grown")
    assert grown["experts"] == ["code", "prose", "seed", "notes"] and grown["added"] == ["notes"]
    assert grown["options"]["router_init"] == "ridge" and set(grown["router_tokens"]) == {"code", "prose", "notes"}
    tuned = read_done(run_copy / "grown-finetuned")
    assert tuned["steps"] == 2 and tuned["inputs"]["merged"] == str(run_copy / "grown")
    losses = eval_losses(run_copy)
    assert {"BTX", "BTX grown (no finetune)", "BTX grown", "expert:notes"} <= set(losses)
    assert all(set(row) == {"code", "prose", "notes"} for row in losses.values())
    for path in (run_copy / "grown", run_copy / "grown-finetuned"):
        model, info = transformers.AutoModelForCausalLM.from_pretrained(
            path, output_loading_info=True, dtype=torch.float32
        )
        assert not any(info.values()), info
    # and a second run does nothing
    again = done_times(run_copy, "grown", "grown-finetuned", "eval")
    assert btx_main("run", str(recipe), f"run_dir={run_copy}", "eval.baselines=true")[0] == 0
    assert done_times(run_copy, "grown", "grown-finetuned", "eval") == again


def test_router_init_table_on_a_run(run_copy):
    """`btx eval RECIPE --router-inits`: one merged-without-finetune row per init, the merges kept
    apart from merged/, reused when asked again; hidden rows need merge.prompts."""
    prompts = ["merge.prompts.code=[def f(x), import os]", "merge.prompts.prose=[The history of, She said]"]
    merged = done_times(run_copy, "merged")
    status, out = btx_main("eval", str(TINY), f"run_dir={run_copy}", *prompts, "--router-inits")
    assert status == 0, out
    table = json.loads((run_copy / "eval-router-inits" / "eval.json").read_text())["rows"]
    assert [r["name"] for r in table] == [
        f"merged, {i} routers" for i in ("random", "zeros", "centroid", "ridge", "hidden")
    ]
    assert len({round(sum(r["losses"].values()), 6) for r in table}) == 5  # five different MoEs
    assert done_times(run_copy, "merged") == merged
    assert read_done(run_copy / "router-inits" / "ridge")["options"]["router_init"] == "ridge"
    made = done_times(run_copy, "router-inits/ridge")
    status, _ = btx_main("eval", str(TINY), f"run_dir={run_copy}", "--router-inits", "ridge,random")
    assert status == 0 and done_times(run_copy, "router-inits/ridge") == made
    status, message = btx_main("eval", str(TINY), f"run_dir={run_copy}", "--router-inits", "hidden")
    assert status == 2 and "no merge.prompts" in message
    status, message = btx_main("eval", str(TINY), f"run_dir={run_copy}", "--router-inits", "learned")
    assert status == 2 and "'learned' is not a router init" in message


# ----------------------------------------------------------------------------------------------
# The paper's protocol beside btx's (issue 16): compute- and data-matched baselines
# ----------------------------------------------------------------------------------------------


def test_both_protocols_label_their_rows_and_the_baselines_train_everything(tmp_path):
    """FFN-only experts and a router-only BTX finetune (after a router-only phase): the baselines
    still train all their parameters; eval.match both adds the data-matched runs without redoing
    the compute-matched ones; the data-matched ones trained one step per BTX step."""
    from btx.recipe.load import load_experiment
    from btx.run.baselines import btx_data_plan

    run_dir = tmp_path / "run"
    common = ["train.trainable=ffn", "finetune.trainable=router_only", "finetune.router_only_steps=2"]
    result = btx_run(run_dir, *common, "--until", "eval")
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
    compute_done = {d: (run_dir / "baselines" / d / "DONE.json").stat().st_mtime_ns for d in ("dense", "upcycled")}
    assert set(eval_losses(run_dir)) >= {"dense (compute-matched)", "sparse upcycling (compute-matched)"}
    assert not (run_dir / "baselines" / "dense-data").exists()

    result = btx_run(run_dir, *common, "eval.match=both", "--until", "eval")
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
    assert compute_done == {d: (run_dir / "baselines" / d / "DONE.json").stat().st_mtime_ns for d in compute_done}
    data = json.loads((run_dir / "eval" / "eval.json").read_text())
    names = [r["name"] for r in data["rows"]]
    assert names == [
        "seed",
        "expert:code",
        "expert:prose",
        "BTM ensemble",
        "BTM top-1 (tf-idf)",
        "BTM top-2 (tf-idf)",
        "dense (compute-matched)",
        "dense (data-matched)",
        "sparse upcycling (compute-matched)",
        "sparse upcycling (data-matched)",
        "BTX merged (no finetune)",
        "BTX router-only (2 steps)",
        "BTX",
    ]
    base = run_dir / "baselines"
    finetuned = read_done(run_dir / "finetuned")
    assert finetuned["trainable"] == "router_only"
    for d in ("dense", "upcycled", "dense-data", "upcycled-data"):
        assert read_done(base / d)["trainable"] == "all", d
    experts = [read_done(run_dir / "experts" / d) for d in ("code", "prose")]
    assert {e["trainable"] for e in experts} == {"ffn"}
    # data-matched: every BTX step replayed once: 4 steps per expert, 2 router-only + 3 finetune steps
    for d in ("dense-data", "upcycled-data"):
        done = read_done(base / d)
        assert done["steps"] == 4 + 4 + 2 + 3 and done["tokens"] == done["inputs"]["data_matched_tokens"], d
    exp = load_experiment(TINY, [f"run_dir={run_dir}", *common, "eval.match=both"])
    plan = btx_data_plan(exp, exp.finetune_train)
    assert [[(s.domains, s.count) for s in phase] for phase in plan] == [
        [(["code"], 4), (["prose"], 4)],
        [(["code", "prose"], 5)],
    ]
    # compute-matched: the budget counts both finetune phases and the experts' honest FLOPs
    budget = sum(e["train_flops"] for e in experts) + finetuned["train_flops"]
    assert finetuned["train_flops"] == sum(finetuned["train_flops_phases"].values())
    assert read_done(base / "dense")["inputs"]["compute_budget"] == budget
    rows = {r["name"]: r for r in data["rows"]}
    assert rows["BTX"]["train_flops"] == budget
    assert (
        rows["BTX router-only (2 steps)"]["train_flops"]
        == sum(e["train_flops"] for e in experts) + finetuned["train_flops_phases"]["finetune-router"]
    )
    # every row carries its standard errors; the paired differences are taken against BTX
    for r in data["rows"]:
        assert r["average_stderr"] > 0 and set(r["stderr"]) == {"code", "prose"}, r["name"]
    assert set(data["differences_from"]["rows"]) == set(names) - {"BTX"}
    assert (run_dir / "eval" / "loss_vs_flops.png").is_file()
    md = (run_dir / "eval" / "eval.md").read_text()
    assert "± " in md and "4 per frozen weight" in md and "| dense (data-matched) |" in md
