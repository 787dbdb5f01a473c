"""btx branch / btx status: planning, the local pool, Slurm scripts, job state, the paper's recipe.

Most tests run the executors against a stand-in for `btx train` (FAKE_TRAIN below): a few lines
of Python that log metrics and write DONE.json like the real command, in milliseconds. The
end-to-end test at the bottom runs the real `btx train` on a tiny model.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from rich.console import Console

from btx.errors import BtxError
from btx.io.manifest import write_done
from btx.recipe.load import load_experiment
from btx.run.branch import branch, status
from btx.run.jobs import (
    STALE_AFTER_S,
    ExpertJob,
    expert_state,
    plan_jobs,
    process_start,
    read_job,
    update_job,
)
from btx.run.local import LocalSlots
from btx.run.progress import expert_status
from btx.run.slurm import sbatch_script

REPO = Path(__file__).resolve().parents[1]

# Arguments: RUN_DIR RECIPE --domain NAME [overrides]. Environment: FAKE_FAIL=<domain> makes that
# domain fail; FAKE_SLEEP=<seconds per step> makes it slow. Every launch is appended to launches.txt.
FAKE_TRAIN = """
import json, os, signal, sys, time
run_dir, domain = sys.argv[1], sys.argv[sys.argv.index("--domain") + 1]
expert = os.path.join(run_dir, "experts", domain)
os.makedirs(expert, exist_ok=True)
def stop(signum, frame):  # like btx train on SIGTERM: checkpoint, exit 130
    print("fake train: stopped, checkpoint kept", flush=True)
    sys.exit(130)
signal.signal(signal.SIGTERM, stop)
with open(os.path.join(run_dir, "launches.txt"), "a") as f:  # (written once it can be stopped)
    f.write(domain + "\\n")
print("fake train", domain, "threads", os.environ.get("OMP_NUM_THREADS"), flush=True)
if os.environ.get("FAKE_FAIL") == domain:
    print("Traceback (most recent call last):\\nValueError: shard train.bin is corrupt", flush=True)
    sys.exit(3)
for step in range(1, 4):
    time.sleep(float(os.environ.get("FAKE_SLEEP", "0")))
    with open(os.path.join(expert, "metrics.jsonl"), "a") as f:
        f.write(json.dumps({"step": step, "loss": 5.0 / step, "tokens_per_s": 1000.0, "elapsed_s": step}) + "\\n")
os.makedirs(os.path.join(expert, "final"), exist_ok=True)
with open(os.path.join(expert, "DONE.json"), "w") as f:
    json.dump({"domain": domain}, f)
"""


def make_experiment(tmp_path: Path, domains=("a", "b", "c"), extra: str = "") -> Path:
    """A tiny experiment (from-scratch seed, byte tokenizer) with one text file per domain."""
    for name in domains:
        (tmp_path / "data" / name).mkdir(parents=True, exist_ok=True)
        (tmp_path / "data" / name / "doc.txt").write_text(f"some {name} text\n" * 50)
        (tmp_path / f"{name}.yaml").write_text(f"data:\n  sources: [data/{name}]\n  val_fraction: 0.5\n")
    recipe = tmp_path / "btx.yaml"
    recipe.write_text(
        textwrap.dedent(f"""\
        experiment: tiny3
        run_dir: {tmp_path / "run"}
        model: {{vocab_size: 264, dim: 16, n_layers: 1, n_heads: 2, n_kv_heads: 2, ffn_dim: 32, max_seq_len: 32}}
        domains: {{{", ".join(f"{d}: {d}.yaml" for d in domains)}}}
        train: {{steps: 3, batch_size: 2, seq_len: 16, warmup_steps: 1, checkpoint_every: 2, eval_every: 0,
                 log_every: 1}}
        """)
        + textwrap.dedent(extra)
    )
    return recipe


def fake_program(tmp_path: Path) -> list[str]:
    script = tmp_path / "fake_train.py"
    script.write_text(FAKE_TRAIN)
    return [str(script), str(tmp_path / "run")]


def launches(tmp_path: Path) -> list[str]:
    path = tmp_path / "run" / "launches.txt"
    return path.read_text().split() if path.exists() else []


def wait_for_launches(tmp_path: Path, n: int, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while len(launches(tmp_path)) < n:
        assert time.monotonic() < deadline, f"fewer than {n} launches after {timeout_s} s"
        time.sleep(0.02)


def quiet_console() -> Console:
    return Console(file=open(os.devnull, "w"), width=200)


def recording_console() -> Console:
    return Console(record=True, width=200, file=open(os.devnull, "w"))


def prepare_with_seed(recipe: Path) -> None:
    """What `btx branch` needs before it launches anything: token shards and a finished seed
    (here only its DONE.json: the stand-in training never reads it)."""
    from btx.run.prepare import prepare_experiment

    exp = load_experiment(recipe)
    prepare_experiment(exp, progress=False)
    write_done(_mkdir(exp.run_dir / "seed"), {"stage": "seed"})


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture
def experiment(tmp_path):
    recipe = make_experiment(tmp_path)
    prepare_with_seed(recipe)
    return recipe


# --- the local executor ---------------------------------------------------------------------------


def test_local_runs_every_expert_then_only_what_is_missing(tmp_path, experiment):
    program = fake_program(tmp_path)
    assert branch(experiment, train_program=program, console=quiet_console()) == 0
    assert sorted(launches(tmp_path)) == ["a", "b", "c"]
    run = tmp_path / "run"
    for name in "abc":
        job = json.loads((run / "experts" / name / "job.json").read_text())
        assert job["exit_code"] == 0 and job["executor"] == "local"
        assert job["command"] == [sys.executable, *program, str(experiment.absolute()), "--domain", name]
        assert "fake train" in (run / "experts" / name / "train.log").read_text()
        # CPU: one job at a time, each allowed every core (unless the environment says otherwise)
        threads = os.environ.get("OMP_NUM_THREADS", str(os.cpu_count()))
        assert f"threads {threads}" in (run / "experts" / name / "train.log").read_text()

    # Everything is done: nothing is launched, and `btx status --watch` has nothing to wait for.
    assert branch(experiment, train_program=program, console=quiet_console()) == 0
    assert len(launches(tmp_path)) == 3
    assert status(experiment, watch=True, interval_s=60, console=quiet_console()) == 0

    # One expert's outputs are deleted: only that one trains again.
    shutil.rmtree(run / "experts" / "b")
    assert branch(experiment, train_program=program, console=quiet_console()) == 0
    assert launches(tmp_path)[3:] == ["b"]


def test_overrides_and_only_reach_the_jobs(tmp_path, experiment):
    program = fake_program(tmp_path)
    jobs = plan_jobs(
        load_experiment(experiment, ["train.steps=2"]), experiment, ["train.steps=2"], only=["c"], train_program=program
    )
    assert [j.domain for j in jobs] == ["c"] and jobs[0].total_steps == 2
    assert jobs[0].program == [*program, str(experiment.absolute()), "--domain", "c", "train.steps=2"]
    with pytest.raises(BtxError, match=r"--only bb: not a domain .*\(did you mean b\?\)"):
        branch(experiment, only=["bb"], train_program=program, console=quiet_console())


def test_failed_job_is_reported_with_its_log_and_the_others_finish(tmp_path, experiment, monkeypatch, capsys):
    monkeypatch.setenv("FAKE_FAIL", "b")
    console = recording_console()
    assert branch(experiment, train_program=fake_program(tmp_path), console=console) == 1
    run = tmp_path / "run"
    assert (run / "experts" / "a" / "DONE.json").exists() and (run / "experts" / "c" / "DONE.json").exists()
    assert not (run / "experts" / "b" / "DONE.json").exists()
    shown = console.export_text()
    assert "b failed (exit 3)" in shown and "shard train.bin is corrupt" in shown  # the log's tail
    assert "1 of 3 expert job(s) failed: b (exit 3)" in capsys.readouterr().err
    assert expert_state(run / "experts" / "b")[0] == "failed"

    # Fixed: the re-run launches only the failed expert.
    monkeypatch.delenv("FAKE_FAIL")
    assert branch(experiment, train_program=fake_program(tmp_path), console=quiet_console()) == 0
    assert launches(tmp_path)[3:] == ["b"]


def test_ctrl_c_stops_every_child_and_they_resume(tmp_path, experiment):
    """SIGINT to `btx branch` reaches each job's process group; all exit, are recorded as
    interrupted (state `stopped`), and the next run launches them again."""
    program = fake_program(tmp_path)
    driver = tmp_path / "driver.py"
    driver.write_text(
        textwrap.dedent(f"""\
        import sys
        from btx.run.branch import branch
        sys.exit(branch({str(experiment)!r}, train_program={program!r}, max_parallel=2,
                        stop_grace_s=5))
        """)
    )
    env = {**os.environ, "FAKE_SLEEP": "30", "PYTHONPATH": str(REPO)}
    # Ctrl-C is what a terminal sends a foreground job. Run as a background job of a script
    # (`cmd & wait`, nohup), this suite inherits SIGINT ignored, and btx, like any POSIX program,
    # keeps an inherited "ignore" (docs/COMMANDS.md, Signals): give the driver the disposition a
    # foreground job has, whatever the suite was started with.
    proc = subprocess.Popen(
        [sys.executable, str(driver)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    experts = tmp_path / "run" / "experts"
    wait_for_launches(tmp_path, 2)
    pids = [read_job(experts / d)["pid"] for d in "ab"]
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode != 0, out.decode()
    for domain, pid in zip("ab", pids):
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # reaped and gone: no orphans
        job = read_job(experts / domain)
        assert job["interrupted"] is True and job["exit_code"] == 130
        assert expert_state(experts / domain)[0] == "stopped"
        assert "stopped, checkpoint kept" in (experts / domain / "train.log").read_text()
    assert expert_state(experts / "c")[0] == "pending"  # never started
    assert branch(experiment, train_program=program, console=quiet_console()) == 0
    assert sorted(launches(tmp_path)[2:]) == ["a", "b", "c"]


def test_missing_seed_or_data_is_refused_before_anything_starts(tmp_path):
    recipe = make_experiment(tmp_path)
    with pytest.raises(BtxError, match=r"seed: the seed is not trained yet \(no DONE.json\); run `btx train"):
        branch(recipe, train_program=fake_program(tmp_path), console=quiet_console())
    write_done(_mkdir(tmp_path / "run" / "seed"), {"stage": "seed"})
    with pytest.raises(BtxError, match=r"train shard of domain 'a' not found; run `btx prepare"):
        branch(recipe, train_program=fake_program(tmp_path), console=quiet_console())
    assert launches(tmp_path) == [] and not (tmp_path / "run" / "experts").exists()


def test_gpu_slots_group_devices_and_use_torchrun():
    slots = LocalSlots.plan(["0", "1", "2", "3", "5"], devices_per_expert=2, max_parallel=None)
    assert slots.devices == ["0,1", "2,3"]
    job = ExpertJob("a", Path("/x"), ["-m", "btx", "train", "r.yaml", "--domain", "a"], 3)
    cmd = slots.command(job)
    assert cmd[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    assert cmd[5:] == job.program
    assert slots.env(1)["CUDA_VISIBLE_DEVICES"] == "2,3"
    with pytest.raises(BtxError, match="branch.max_parallel: 3 jobs of 2 GPU"):
        LocalSlots.plan(["0", "1", "2", "3"], devices_per_expert=2, max_parallel=3)
    cpu = LocalSlots.plan([], devices_per_expert=1, max_parallel=2)
    assert cpu.devices == [None, None] and LocalSlots.plan([], 1, None).devices == [None]
    assert cpu.command(job) == [sys.executable, *job.program]


# --- Slurm ----------------------------------------------------------------------------------------


def slurm_section(nodes=2, gpus_per_node=4, setup='["module load cuda/12.4", "source /opt/venv/bin/activate"]'):
    return f"""\
branch:
  executor: slurm
  slurm:
    partition: gpu-long
    account: proj42
    time: "12:00:00"
    nodes: {nodes}
    gpus_per_node: {gpus_per_node}
    cpus_per_task: 32
    mem: 480G
    extra_sbatch: ["--constraint=h100", "#SBATCH --qos=high"]
    setup: {setup}
"""


def test_slurm_dry_run_prints_valid_resumable_scripts(tmp_path):
    recipe = make_experiment(tmp_path, extra=slurm_section())
    prepare_with_seed(recipe)
    console = recording_console()
    assert branch(recipe, ["train.steps=5"], dry_run=True, console=console) == 0
    shown = console.export_text()
    assert not (tmp_path / "run" / "experts").exists()  # a dry run writes nothing
    exp = load_experiment(recipe)
    for job in plan_jobs(exp, recipe, ["train.steps=5"]):
        script = sbatch_script(job, exp.branch.slurm, exp.name)
        assert script in shown.replace("\r", "")  # the dry run printed exactly this script
        lines = script.splitlines()
        assert lines[0] == "#!/bin/bash"
        sbatch = [line.split(None, 1)[1] for line in lines if line.startswith("#SBATCH ")]
        for expected in (
            "--partition=gpu-long",
            "--account=proj42",
            "--time=12:00:00",
            "--nodes=2",
            "--gpus-per-node=4",
            "--cpus-per-task=32",
            "--mem=480G",
            "--requeue",
            f"--output={job.log}",
            "--constraint=h100",
            "--qos=high",
        ):
            assert expected in sbatch, (expected, sbatch)
        assert any(s.startswith("--signal=B:USR1@") for s in sbatch)
        # the resume command: the same idempotent btx train, under torchrun on 2 nodes x 4 GPUs
        assert f"-m btx train {recipe.absolute()} --domain {job.domain} train.steps=5" in script
        assert "torch.distributed.run" in script and "--nproc_per_node=4" in script
        assert "resumes from the newest checkpoint" in script
        assert "module load cuda/12.4" in script
        path = tmp_path / f"{job.domain}.sbatch"
        path.write_text(script)
        subprocess.run(["bash", "-n", str(path)], check=True)


def sbatch_arguments(line: str) -> list[str]:
    """How sbatch reads one `#SBATCH` line (src/sbatch/opt.c): whitespace separates arguments
    unless quoted ('...' or "..."), a backslash escapes the next character, an unquoted # starts a
    comment."""
    args, current, quote, escaped, started = [], [], None, False, False
    for ch in line.removeprefix("#SBATCH"):
        if escaped:
            current.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = started = True
        elif quote:
            quote = None if ch == quote else quote
            if quote is not None:
                current.append(ch)
        elif ch in "'\"":
            quote, started = ch, True
        elif ch == "#":
            break
        elif ch.isspace():
            if started:
                args.append("".join(current))
            current, started = [], False
        else:
            current.append(ch)
            started = True
    if started:
        args.append("".join(current))
    return args


def test_sbatch_values_with_spaces_quotes_and_percent_signs_are_quoted(tmp_path):
    """A run directory with a space (and a %: Slurm expands %j in file names) stays one argument."""
    base = tmp_path / "my runs" / "100%"
    base.mkdir(parents=True)
    recipe = make_experiment(base, extra=slurm_section().replace("gpu-long", "gpu long#1"))
    exp = load_experiment(recipe)
    job = plan_jobs(exp, recipe)[0]
    lines = [
        line for line in sbatch_script(job, exp.branch.slurm, exp.name).splitlines() if line.startswith("#SBATCH ")
    ]
    args = [arg for line in lines for arg in sbatch_arguments(line)]
    assert f"--output={str(job.log).replace('%', '%%')}" in args and "--partition=gpu long#1" in args
    assert all(len(sbatch_arguments(line)) == 1 for line in lines)


def test_slurm_submit_records_job_and_the_script_reports_its_state(tmp_path, monkeypatch):
    """With a stand-in `sbatch` on PATH the job id lands in job.json; running the script itself
    (with stand-in srun/scontrol) trains through the same command and records its exit."""
    recipe = make_experiment(
        tmp_path, domains=("a", "b"), extra=slurm_section(nodes=1, gpus_per_node=0, setup='["export SETUP_RAN=1"]')
    )
    prepare_with_seed(recipe)
    bin_dir = _mkdir(tmp_path / "bin")
    for name, body in {
        "sbatch": 'echo "4242;cluster"',
        "scontrol": "exit 0",
        "srun": 'while [[ "$1" == --* ]]; do shift; done; exec "$@"',
    }.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    program = fake_program(tmp_path)
    assert branch(recipe, train_program=program, console=quiet_console()) == 0
    experts = tmp_path / "run" / "experts"
    for domain in "ab":
        assert read_job(experts / domain)["slurm_job_id"] == "4242"
        assert expert_state(experts / domain) == ("queued", "slurm 4242")
    # Already queued: a second branch submits nothing.
    assert branch(recipe, train_program=program, console=quiet_console()) == 0

    env = {
        **os.environ,
        "SLURM_JOB_ID": "4242",
        "PYTHONPATH": str(REPO),
        "FAKE_FAIL": "b",
        "BTX_PYTHON": sys.executable,
    }
    for domain, code in (("a", 0), ("b", 3)):
        # (run by bash, not sbatch, so the output comes here rather than into train.log)
        result = subprocess.run(["bash", str(experts / domain / "job.sbatch")], env=env, capture_output=True, text=True)
        assert result.returncode == code, result
    assert "shard train.bin is corrupt" in result.stdout
    assert expert_state(experts / "a")[0] == "done"
    state, detail = expert_state(experts / "b")
    assert state == "failed" and "exit 3 (slurm 4242)" in detail
    job = read_job(experts / "b")
    assert job["exit_code"] == 3 and job["slurm_job_id"] == "4242" and job["started_at"] <= job["ended_at"]

    # Near the time limit (USR1) the script stops training and requeues itself: queued again.
    # scancel / preemption (TERM): training stops and the attempt is recorded as interrupted.
    env.update(FAKE_FAIL="", FAKE_SLEEP="30")
    for sig, state in ((signal.SIGUSR1, "queued"), (signal.SIGTERM, "stopped")):
        (experts / "b" / "metrics.jsonl").unlink(missing_ok=True)
        script = subprocess.Popen(
            ["bash", str(experts / "b" / "job.sbatch")],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        wait_for_launches(tmp_path, len(launches(tmp_path)) + 1)
        script.send_signal(sig)
        out, _ = script.communicate(timeout=20)
        assert expert_state(experts / "b")[0] == state, out
        assert "stopped, checkpoint kept" in out


# --- state and btx status -------------------------------------------------------------------------


def test_status_derives_each_state_from_the_run_dir(tmp_path, experiment, monkeypatch):
    import socket

    exp = load_experiment(experiment)
    experts = {d: _mkdir(exp.expert_dir(d)) for d in ("a", "b", "c")}
    write_done(experts["a"], {"domain": "a"})
    update_job(
        experts["b"],
        executor="local",
        host=socket.gethostname(),
        pid=os.getpid(),
        pid_start=process_start(os.getpid()),
        started_at=time.time(),
        exit_code=None,
    )
    with open(experts["b"] / "metrics.jsonl", "w") as f:
        for step, t in ((1, 100.0), (2, 110.0)):
            f.write(json.dumps({"step": step, "loss": 2.5, "tokens_per_s": 1234.0, "elapsed_s": t}) + "\n")
        f.write('{"step": 3, "lo')  # a line being written: ignored
    jobs = {j.domain: j for j in plan_jobs(exp, experiment)}
    assert expert_state(experts["a"]) == ("done", "")
    running = expert_status(jobs["b"])
    assert (running.state, running.step, running.loss, running.tokens_per_s) == ("running", 2, 2.5, 1234.0)
    assert running.eta_s == pytest.approx(10.0)  # 1 step left at 10 s per step
    assert expert_state(experts["c"])[0] == "pending"

    # A recorded non-zero exit is a failure; a local pid that is gone without one is stopped.
    update_job(experts["b"], exit_code=1, ended_at=time.time())
    assert expert_state(experts["b"])[0] == "failed"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    update_job(experts["c"], executor="local", host=socket.gethostname(), pid=dead.pid, started_at=time.time())
    assert expert_state(experts["c"])[0] == "stopped"
    # Elsewhere (another host, a Slurm node): alive while it shows recent signs of progress.
    update_job(experts["c"], host="other-node", started_at=time.time() - 2 * STALE_AFTER_S)
    os.utime(experts["b"] / "metrics.jsonl")
    assert expert_state(experts["c"])[0] == "stopped"
    (experts["c"] / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n')
    assert expert_state(experts["c"])[0] == "running"

    console = recording_console()
    assert status(experiment, console=console) == 0
    shown = console.export_text()
    for domain, state in (("a", "done"), ("b", "failed"), ("c", "running")):
        assert re.search(rf"│ {domain}\s+│ {state}\s+│", shown), shown
    assert str(experts["a"] / "final") in shown and "3/3" in shown


def test_cli_status_and_branch_dry_run(tmp_path, experiment):
    def btx(*args):
        return subprocess.run(
            [sys.executable, "-m", "btx", *args],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"},
        )

    result = btx("status", str(experiment))
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("pending") == 3
    result = btx("branch", str(experiment), "--dry-run", "--only", "b", "train.steps=2")
    assert result.returncode == 0, result.stderr
    assert f"-m btx train {experiment.absolute()} --domain b train.steps=2" in result.stdout
    assert not (tmp_path / "run" / "experts").exists()
    result = btx("branch", str(experiment), "--executor", "pbs")
    assert result.returncode == 2 and "pbs" in result.stderr


def test_llama2_recipe_loads(tmp_path, monkeypatch):
    seed = _mkdir(tmp_path / "Llama-2-7b-hf")
    (seed / "config.json").write_text("{}")
    (seed / "tokenizer.json").write_text("{}")
    for domain in ("math", "code", "wiki", "general"):  # general: finetune-only data, no expert
        (_mkdir(tmp_path / "data" / domain) / "part-0.jsonl").write_text('{"text": "x"}\n')
    monkeypatch.setenv("BTX_LLAMA2_7B", str(seed))
    monkeypatch.setenv("BTX_DATA", str(tmp_path / "data"))
    exp = load_experiment(REPO / "recipes" / "llama2-7b" / "btx.yaml")
    assert list(exp.domains) == ["math", "code", "wiki"]
    for domain in exp.domains.values():
        t = domain.train
        assert (t.lr, t.weight_decay, t.warmup_steps, t.min_lr_ratio, t.seq_len) == (1e-4, 0.1, 100, 0.1, 4096)
        gpus = exp.branch.slurm.nodes * exp.branch.slurm.gpus_per_node
        assert t.tokens_per_step * gpus == 4_194_304  # ~4M tokens per step
    assert exp.merge.keep_seed and exp.merge.top_k == 2 and exp.merge.n_experts(3) == 4
    assert exp.finetune.balance_alpha == 0.01 and exp.finetune.top_k == 2
    assert exp.finetune.mixture == {"math": 30.16, "code": 40.31, "wiki": 10.30, "general": 19.23}
    assert list(exp.data_domains) == ["math", "code", "wiki", "general"]
    assert Path(exp.tokenizer) == seed


# --- end to end with the real btx train -----------------------------------------------------------


def test_real_btx_train_experts_in_parallel_one_with_a_corrupt_shard(tmp_path):
    """Three real `btx train` jobs at once on a tiny model; domain c's shard is truncated, so c fails
    (reported with btx train's own error in the log tail) while a and b finish and export."""
    from btx.run.prepare import prepare_experiment
    from btx.train.job import seed_job
    from btx.train.loop import run_loop

    for name in "abc":
        for i in range(6):  # several documents, so both splits get some
            _mkdir(tmp_path / "data" / name / "docs").joinpath(f"{i}.txt").write_text(f"{name} doc {i} " * 20)
    recipe = make_experiment(tmp_path)
    exp = load_experiment(recipe)
    prepare_experiment(exp, progress=False)
    run_loop(seed_job(exp), console=quiet_console())
    shard = exp.data_dir("c") / "train.bin"
    shard.write_bytes(shard.read_bytes()[:100])

    console = recording_console()
    assert branch(recipe, max_parallel=3, console=console) == 1
    experts = tmp_path / "run" / "experts"
    for name in "ab":
        assert (experts / name / "DONE.json").is_file() and (experts / name / "final" / "config.json").is_file()
        assert json.loads((experts / name / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 3
    assert f"{shard}: truncated" in console.export_text()
    statuses = {s.domain: s for s in (expert_status(job) for job in plan_jobs(exp, recipe))}
    assert {d: s.state for d, s in statuses.items()} == {"a": "done", "b": "done", "c": "failed"}
    assert statuses["a"].step == 3 and statuses["a"].path == experts / "a" / "final"
