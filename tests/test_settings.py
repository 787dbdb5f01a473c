"""Each setting is declared once and reaches the code that uses it.

- Every field of every recipe section, set to a value other than its default, arrives where it is
  used: the merge's and the MoE edit's options, the training and finetuning jobs, eval, analyze,
  branch. A field added to a section fails here until it is given a value below (and so a consumer).
- Every flag of `btx merge` (and `btx merge --into`) is a field of MergeOptions or EditOptions, and
  a command line giving each a non-default value gets each value into the options.
- One size grammar for recipes and flags; old names (merge.centroid_tokens, --centroid-*) still
  work, with a one-line note.
"""

from __future__ import annotations

import dataclasses
import shlex
from pathlib import Path

import pytest
import torch
from rich.console import Console

from btx import cli, errors
from btx.errors import BtxError
from btx.io.checkpoint import save_model
from btx.io.manifest import hash_dir, write_done
from btx.mix.merge import recipe_merge_options
from btx.mix.options import FROM_MERGE, GROW_STAGE_KEYS, EditOptions, MergeOptions
from btx.model.config import ModelConfig
from btx.model.transformer import Transformer
from btx.recipe.load import load_experiment
from btx.recipe.schema import (
    AnalyzeSection,
    BranchSection,
    EvalSection,
    FinetuneSection,
    GrowSection,
    MergeSection,
    ModelSection,
    PrepareSection,
    SeedSection,
    SlurmSection,
    TrainSection,
)
from btx.recipe.settings import flags, given
from btx.units import parse_size

FIXTURE = Path(__file__).parent / "fixtures" / "tiny" / "btx.yaml"

# A value other than the default for every field of every section (the tiny fixture's domains are
# code and prose). The tests below check that each list is complete.
MERGE = dict(
    keep_seed=False,
    weights={"code": 2.0, "prose": 1.0},
    router_init="hidden",
    router_std=0.5,
    router_seed=7,
    router_tokens=123,
    ridge_lambda=0.5,
    router_scale=3.0,
    prompts={"code": ["def f():"], "prose": ["The"]},
    negative_prompts={"code": ["Once upon"]},
    granularity="split",
    chunks=4,
    top_k=3,
    dtype="bfloat16",
    shard_size="5G",
)
GROW = dict(
    domains=["prose"],
    router_init="hidden",
    shared="average",
    shared_weight=0.25,
    steps=5,
    trainable="all",
    mixture={"code": 1.0, "prose": 2.0},
)
TRAIN = dict(
    lr=3e-3,
    weight_decay=0.05,
    warmup_steps=3,
    min_lr_ratio=0.2,
    betas=[0.8, 0.9],
    eps=1e-6,
    steps=7,
    batch_size=3,
    seq_len=16,
    grad_accum=2,
    grad_clip=0.5,
    precision="fp32",
    checkpoint_every=3,
    keep_checkpoints=3,
    eval_every=3,
    eval_batches=2,
    log_every=2,
    seed=5,
    zero_stage=1,
    trainable="ffn",
    document_mask=True,
    activation_checkpointing="selective",
    compile=True,
    loggers=["tensorboard", "wandb"],
)
PREPARE = dict(workers=2)
FINETUNE = dict(
    train={"steps": 9},
    mixture={"code": 3.0, "prose": 1.0},
    router_mode="switch",
    top_k=1,
    capacity_factor=2.0,
    gumbel_rate=1e-3,
    balance_alpha=0.1,
    z_loss=0.01,
    trainable="frozen_experts",
    router_only_steps=2,
    zero_stage=2,
    offload_optimizer=True,
    general="general.yaml",
)
EVAL = dict(
    baselines=True,
    match="both",
    batches=3,
    batch_size=4,
    seq_len=16,
    btm_tfidf_tokens=1000,
    tasks=["letters_mc", {"task": "letters_gen", "num_fewshot": 1, "limit": 2, "batch_size": 3}],
    include_path=str(Path(__file__).parent / "fixtures" / "tasks"),
    device="cpu",
    dtype="bfloat16",
)
ANALYZE = dict(tokens=100, show_text=1)
SLURM = dict(
    partition="gpu",
    account="lab",
    time="1:00:00",
    nodes=2,
    gpus_per_node=4,
    cpus_per_task=8,
    mem="10G",
    extra_sbatch=["--qos=high"],
    setup=["module load cuda"],
)
BRANCH = dict(executor="slurm", max_parallel=2, devices_per_expert=2, slurm=SLURM)
SEED = dict(path=None, train={"steps": 11}, mixture={"code": 2.0, "prose": 1.0})  # path: see its own test
MODEL = dict(
    vocab_size=300,
    dim=48,
    n_layers=3,
    n_heads=6,
    n_kv_heads=3,
    ffn_dim=96,
    norm_eps=1e-6,
    rope_theta=5e5,
    rope_scaling={"rope_type": "linear", "factor": 2.0},
    max_seq_len=128,
    tie_embeddings=True,
)
SECTIONS = {
    "merge": (MergeSection, MERGE),
    "grow": (GrowSection, GROW),
    "train": (TrainSection, TRAIN),
    "finetune": (FinetuneSection, FINETUNE),
    "eval": (EvalSection, EVAL),
    "analyze": (AnalyzeSection, ANALYZE),
    "prepare": (PrepareSection, PREPARE),
    "branch": (BranchSection, BRANCH),
    "branch.slurm": (SlurmSection, SLURM),
    "seed": (SeedSection, SEED),
    "model": (ModelSection, MODEL),
}


def yaml_value(value) -> str:
    """A value as an OmegaConf dotlist takes it."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {yaml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(yaml_value(v) for v in value) + "]"
    return repr(value)  # strings quoted: 1:00:00 stays a string


def overrides(section: str, values: dict) -> list[str]:
    return [f"{section}.{k}={yaml_value(v)}" for k, v in values.items()]


@pytest.mark.parametrize("name", list(SECTIONS))
def test_every_field_of_every_section_has_a_non_default_value_here(name):
    cls, values = SECTIONS[name]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    assert set(values) == set(fields), f"{name}: give every field a value above"
    default = cls()
    same = [k for k, v in values.items() if getattr(default, k) == v and not (name == "seed" and k == "path")]
    assert same == [], f"{name}: these values are the defaults"


# ---------------------------------------------------------------------------------------------
# Merge and grow: the options come from the sections
# ---------------------------------------------------------------------------------------------


def test_every_merge_key_reaches_the_merge_options():
    options = recipe_merge_options(MergeSection(**MERGE), aux_loss_coef=0.5)
    for key, value in MERGE.items():
        assert getattr(options, key) == value, key
    assert options.router_aux_loss_coef == 0.5
    # MergeOptions is the section and more: a key added to the section is an option with no second edit
    section_fields = [f.name for f in dataclasses.fields(MergeSection)]
    assert [f.name for f in dataclasses.fields(MergeOptions)][: len(section_fields)] == section_fields


def test_every_merge_key_reaches_the_merge_from_a_recipe(tmp_path):
    exp = load_experiment(FIXTURE, [f"run_dir={tmp_path}", *overrides("merge", MERGE)])
    options = recipe_merge_options(exp.merge, aux_loss_coef=exp.finetune.balance_alpha)
    for key, value in MERGE.items():
        assert getattr(options, key) == value, key


def test_every_grow_key_reaches_the_edit_options():
    experts = ["code", "seed", "prose"]
    edit = EditOptions.from_sections(GrowSection(**GROW), MergeSection(**MERGE), experts)
    own = {f.name for f in dataclasses.fields(EditOptions)}
    for key, value in GROW.items():
        if key in own:
            assert getattr(edit, key) == value, key
        else:  # read by the run's grow stage itself
            assert key in GROW_STAGE_KEYS, f"grow.{key} reaches neither the edit nor the grow stage"
    for key in FROM_MERGE:  # the fitted inits read the merge's token budget and prompts
        assert getattr(edit, key) == MERGE[key], key
    # prompts only of the output's experts, and only for a hidden init
    assert EditOptions.from_sections(GrowSection(**GROW), MergeSection(**MERGE), ["prose"]).prompts == {
        "prose": ["The"]
    }
    ridge = EditOptions.from_sections(GrowSection(**{**GROW, "router_init": "ridge"}), MergeSection(**MERGE), experts)
    assert ridge.prompts == {} and ridge.negative_prompts == {}


def test_an_edit_takes_the_merge_settings_of_the_same_name():
    """Same flag, help and default, unless the edit's default keeps what the MoE has."""
    merge_names = {f.name for f in dataclasses.fields(MergeOptions)}
    kept = {"router_std": None, "top_k": None}  # None: each layer's rows' std; the MoE's top_k
    for f in dataclasses.fields(EditOptions):
        source_cls = MergeOptions if f.name in merge_names else GrowSection
        source = next(g for g in dataclasses.fields(source_cls) if g.name == f.name)
        assert f.metadata["flag"] == source.metadata["flag"] and f.metadata["help"] == source.metadata["help"]
        assert getattr(EditOptions(), f.name) == kept.get(f.name, getattr(source_cls(), f.name)), f.name


# ---------------------------------------------------------------------------------------------
# The other sections: their consumers
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def every_value(tmp_path_factory):
    """The tiny experiment with every key of train, finetune, eval, analyze, branch, seed and model
    set to a non-default value, its data prepared, a finished seed and a small merged MoE."""
    from btx.run.prepare import prepare_experiment

    tmp = tmp_path_factory.mktemp("every-value")
    general = tmp / "general.yaml"
    general.write_text(f"data:\n  sources: [{FIXTURE.parent / 'data' / 'code'}]\n  val_fraction: 0.25\n")
    finetune = {**FINETUNE, "general": str(general)}
    args = [
        f"run_dir={tmp / 'run'}",
        *overrides("train", TRAIN),
        *overrides("finetune", finetune),
        *overrides("eval", EVAL),
        *overrides("analyze", ANALYZE),
        *overrides("prepare", PREPARE),
        *overrides("seed", SEED),
        *overrides("model", MODEL),
        *overrides("branch", {k: v for k, v in BRANCH.items() if k != "slurm"}),
        *overrides("branch.slurm", SLURM),
    ]
    exp = load_experiment(FIXTURE, args)
    prepare_experiment(exp, progress=False)
    (exp.run_dir / "seed").mkdir(parents=True)
    write_done(exp.run_dir / "seed", {"stage": "train", "outputs": {}})
    cfg = ModelConfig(
        vocab_size=264, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=32, max_seq_len=64, n_experts=3, top_k=2
    )
    merged = exp.run_dir / "merged"
    torch.manual_seed(0)
    save_model(Transformer(cfg), cfg, merged, dtype=torch.float32)
    write_done(merged, {"stage": "merge", "outputs": hash_dir(merged)})
    return exp, args


def test_train_keys_reach_the_expert_job(every_value):
    from btx.train.job import expert_job

    exp, _ = every_value
    job = expert_job(exp, "code")
    for key, value in TRAIN.items():
        assert getattr(job.settings, key) == value, key
    assert job.trainable == TRAIN["trainable"]


def test_seed_and_model_keys_reach_the_seed_job(every_value):
    from btx.train.job import seed_job

    exp, _ = every_value
    job = seed_job(exp)
    assert job.settings.steps == SEED["train"]["steps"] and job.mixture == SEED["mixture"]
    for key, value in MODEL.items():
        assert getattr(job.model_config, key) == value, key


def test_seed_path_is_the_seed(tmp_path):
    exp = load_experiment(FIXTURE, [f"run_dir={tmp_path}", "model=null", f"seed.path={tmp_path}"])
    assert exp.seed_dir == tmp_path


def test_finetune_keys_reach_the_finetune_job(every_value):
    from btx.train.finetune import finetune_job

    exp, _ = every_value
    job = finetune_job(exp)
    assert job.settings.steps == FINETUNE["train"]["steps"] and job.mixture == FINETUNE["mixture"]
    routing = job.config_overrides
    assert (routing["router_mode"], routing["top_k"], routing["capacity_factor"], routing["gumbel_rate"]) == (
        FINETUNE["router_mode"],
        FINETUNE["top_k"],
        FINETUNE["capacity_factor"],
        FINETUNE["gumbel_rate"],
    )
    assert job.balance_alpha == FINETUNE["balance_alpha"] and job.z_loss_coef == FINETUNE["z_loss"]
    assert job.engine_settings["trainable"] == FINETUNE["trainable"]
    assert (job.engine_settings["zero_stage"], job.engine_settings["offload_optimizer"]) == (2, True)
    assert job.before is not None and job.before.settings.steps == FINETUNE["router_only_steps"]
    assert "general" in job.val_shards  # finetune.general: prepared, and read by the finetune


def test_eval_keys_reach_eval(every_value):
    from btx.run.baselines import matches
    from btx.run.evaluation import eval_settings, model_stage_dirs

    exp, _ = every_value
    settings = eval_settings(exp)
    for key in (
        "batches",
        "batch_size",
        "seq_len",
        "match",
        "btm_tfidf_tokens",
        "tasks",
        "include_path",
        "device",
        "dtype",
    ):
        assert settings[key] == EVAL[key], key
    from btx.evaluate.tasks import TaskSpec, task_specs

    assert task_specs(exp.eval.tasks, exp.eval.batch_size) == [
        TaskSpec("letters_mc", batch_size=4),
        TaskSpec("letters_gen", num_fewshot=1, limit=2, batch_size=3),
    ]
    assert exp.run_dir / "baselines" / "upcycled-merged" in model_stage_dirs(exp)  # eval.baselines
    assert matches(exp) == ["compute", "data"]


def test_analyze_keys_reach_analyze(every_value, monkeypatch):
    from btx.evaluate import analyze

    exp, _ = every_value
    seen = {}
    monkeypatch.setattr(analyze, "analyze_and_write", lambda *a, **kw: seen.update(kw) or {})
    analyze.analyze_recipe(exp)
    assert seen["options"]["tokens"] == ANALYZE["tokens"] and seen["show_text"] == ANALYZE["show_text"]
    # where every evaluation of the run runs: eval.device and eval.dtype
    assert seen["options"]["device"] == EVAL["device"] and seen["options"]["dtype"] == torch.bfloat16


def test_analyze_device_flags_override_the_eval_keys(every_value, monkeypatch):
    """`btx analyze RECIPE --device D --dtype T` is the recipe with eval.device=D eval.dtype=T."""
    from btx.evaluate import analyze

    _, args = every_value
    seen = {}
    monkeypatch.setattr(analyze, "analyze_and_write", lambda *a, **kw: seen.update(kw) or {})
    assert cli.main(["analyze", str(FIXTURE), *args, "--device", "cpu", "--dtype", "float32"]) == 0
    assert seen["options"]["device"] == "cpu" and seen["options"]["dtype"] == torch.float32


def test_prepare_keys_reach_prepare(every_value, monkeypatch):
    from btx.run import prepare

    exp, _ = every_value
    seen = {}
    monkeypatch.setattr(prepare, "prepare_domains", lambda *a, **kw: seen.update(kw) or {})
    prepare.prepare_experiment(exp)
    assert seen["workers"] == PREPARE["workers"]


def test_branch_keys_reach_the_job_scripts(every_value, tmp_path):
    from btx.run.branch import branch

    exp, args = every_value
    console = Console(record=True, width=400)
    assert branch(FIXTURE, args, dry_run=True, console=console) == 0
    text = console.export_text()
    assert "with the slurm executor" in text
    for line in (
        "--partition=gpu",
        "--account=lab",
        "--time=1:00:00",
        "--nodes=2",
        "--gpus-per-node=4",
        "--cpus-per-task=8",
        "--mem=10G",
        "--qos=high",
        "module load cuda",
    ):
        assert line in text, line
    console = Console(record=True, width=400)
    assert branch(FIXTURE, args, executor="local", dry_run=True, console=console) == 0
    assert "(at most 2 at a time)" in console.export_text()  # branch.max_parallel (devices_per_expert: GPUs only)


# ---------------------------------------------------------------------------------------------
# The command line: every flag is a field
# ---------------------------------------------------------------------------------------------

# Non-default command-line text for every setting flag, and the value it gives (None: a flag without one).
MERGE_FLAGS = {
    "keep_seed": (None, False), "weights": ("code=2,seed=1", {"code": 2.0, "seed": 1.0}),
    "router_init": ("ridge", "ridge"), "router_std": ("0.5", 0.5), "router_seed": ("7", 7),
    "router_tokens": ("123", 123), "ridge_lambda": ("0.5", 0.5), "router_scale": ("3", 3.0),
    "prompts": ("code=def f", {"code": ["def f"]}), "negative_prompts": ("code=The", {"code": ["The"]}),
    "granularity": ("split", "split"), "chunks": ("4", 4), "top_k": ("3", 3), "dtype": ("float16", "float16"),
    "shard_size": ("5G", "5G"), "router_aux_loss_coef": ("0.5", 0.5), "upcycle": ("2", 2),
    "average_all": (None, True), "router_device": ("cpu", "cpu"),
}  # fmt: skip
EDIT_FLAGS = {
    **{k: v for k, v in MERGE_FLAGS.items() if k in {f.name for f in dataclasses.fields(EditOptions)}},
    "shared": ("average", "average"),
    "shared_weight": ("0.25", 0.25),
    "top_k": ("1", 1),
}
# Flags of `btx merge` that are not settings: inputs, outputs and how the command runs.
NOT_SETTINGS = {
    "-h",
    "--help",
    "--debug",
    "--force",
    "--allow-no-manifest",
    "--quiet",
    "--seed",
    "--expert",
    "--out",
    "--router-data",
    "--centroid-data",
    "--into",
    "--add-expert",
    "--remove-expert",
    "--allow-foreign",
}


def merge_parser():
    parser = cli.build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, cli.argparse._SubParsersAction)]
    return parser, sub.choices["merge"]


def argv_of(table: dict, cls: type) -> list[str]:
    out = []
    for flag, f in flags(cls).items():
        text, _ = table[f.name]
        out += [flag] if text is None else [flag, text]
    return out


def test_every_flag_of_btx_merge_is_a_field():
    _, merge = merge_parser()
    settings = {**flags(MergeOptions), **flags(EditOptions)}
    renamed = {"--" + f.metadata["renamed"].replace("_", "-") for f in settings.values() if f.metadata["renamed"]}
    for action in merge._actions:
        for option in action.option_strings:
            assert option in settings or option in renamed or option in NOT_SETTINGS, option
            if option in settings:
                assert action.dest == settings[option].name
    # the same flag is the same field in both classes
    both = set(flags(MergeOptions)) & set(flags(EditOptions))
    assert all(flags(MergeOptions)[f].name == flags(EditOptions)[f].name for f in both)


def test_a_command_line_giving_every_merge_flag_reaches_the_merge(monkeypatch):
    assert set(MERGE_FLAGS) == {f.name for f in dataclasses.fields(MergeOptions)}
    seen = {}

    def fake_merge(seed, experts, out, options, **kw):
        seen.update(options=options, router_data=kw["router_data"])
        return {"seconds": 1.0, "bytes": 0, "n_experts": 1, "experts": ["code"], "top_k": 1}

    monkeypatch.setattr("btx.mix.merge.merge", fake_merge)
    argv = [
        "merge",
        "--seed",
        "s",
        "--expert",
        "code=c",
        "--out",
        "o",
        "--router-data",
        "code=d",
        *argv_of(MERGE_FLAGS, MergeOptions),
    ]
    assert cli.main(argv) == 0
    options = seen["options"]
    for name, (_, value) in MERGE_FLAGS.items():
        assert getattr(options, name) == value, name
        assert value != getattr(MergeOptions(), name), name
    assert seen["router_data"] == {"code": "d"}


def test_a_command_line_giving_every_edit_flag_reaches_the_edit(monkeypatch):
    assert set(EDIT_FLAGS) == {f.name for f in dataclasses.fields(EditOptions)}
    seen = {}

    def fake_edit(into, out, **kw):
        seen.update(kw)
        return {"seconds": 1.0, "bytes": 0, "n_experts": 1, "experts": ["code"], "top_k": 1}

    monkeypatch.setattr("btx.mix.grow.grow_moe", fake_edit)
    argv = [
        "merge",
        "--into",
        "m",
        "--add-expert",
        "new=d",
        "--out",
        "o",
        "--router-data",
        "new=v",
        *argv_of(EDIT_FLAGS, EditOptions),
    ]
    assert cli.main(argv) == 0
    for name, (_, value) in EDIT_FLAGS.items():
        assert getattr(seen["options"], name) == value, name
        assert value != getattr(EditOptions(), name), name
    assert seen["add"] == {"new": "d"} and seen["router_data"] == {"new": "v"}


def test_flags_of_the_other_kind_are_refused(capsys):
    assert cli.main(["merge", "--into", "m", "--out", "o", "--granularity", "split"]) == 2
    assert "--granularity belongs to a merge of dense experts" in capsys.readouterr().err
    assert cli.main(["merge", "--seed", "s", "--out", "o", "--shared-weight", "0.5"]) == 2
    assert "--shared-weight edits a finished MoE" in capsys.readouterr().err
    assert cli.main(["merge", str(FIXTURE), "--no-keep-seed", "--router-tokens", "5"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--no-keep-seed, --router-tokens: give merge settings as recipe overrides" in err


# ---------------------------------------------------------------------------------------------
# Sizes, and settings only a recipe gives
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, size",
    [
        ("5G", 5 * 10**9),
        ("5GB", 5 * 10**9),
        ("5GiB", 5 << 30),
        ("500MB", 5 * 10**8),
        ("1000", 1000),
        ("2gi", 2 << 30),
        (123, 123),
    ],
)
def test_one_size_grammar(text, size):
    assert parse_size(text) == size


def tiny_recipe(tmp_path: Path, *merge_lines: str) -> Path:
    """The tiny fixture recipe in tmp_path, with more lines in its merge: section."""
    text = FIXTURE.read_text().replace("merge:\n", "merge:\n" + "".join(f"  {line}\n" for line in merge_lines))
    for name in ("code", "prose"):
        text = text.replace(f"{name}: {name}.yaml", f"{name}: {FIXTURE.parent / name}.yaml")
    recipe = tmp_path / "btx.yaml"
    recipe.write_text(text)
    return recipe


def test_a_size_and_a_setting_given_only_in_a_recipe_reach_the_merge(tmp_path, monkeypatch):
    recipe = tiny_recipe(tmp_path, "shard_size: 5G", "router_seed: 9")
    exp = load_experiment(recipe, [f"run_dir={tmp_path / 'run'}"])
    assert exp.merge.shard_size == "5G" and exp.merge.shard_bytes == 5 * 10**9
    seen = {}
    monkeypatch.setattr("btx.mix.merge.merge", lambda seed, experts, out, options, **kw: seen.update(o=options))
    from btx.mix.merge import merge_from_recipe

    merge_from_recipe(exp, progress=False)
    assert seen["o"].shard_size == "5G" and seen["o"].router_seed == 9
    with pytest.raises(BtxError, match="merge.shard_size: not a size: '5X'"):
        load_experiment(recipe, [f"run_dir={tmp_path / 'run'}", "merge.shard_size=5X"])


# ---------------------------------------------------------------------------------------------
# Old names
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def fresh_notes(monkeypatch):
    monkeypatch.setattr(errors, "_NOTED", set())


def test_the_old_recipe_key_still_works_with_a_note(tmp_path, capsys, fresh_notes):
    exp = load_experiment(FIXTURE, [f"run_dir={tmp_path}", "merge.centroid_tokens=123"])
    assert exp.merge.router_tokens == 123
    err = capsys.readouterr().err
    assert err == "btx: note: merge.centroid_tokens is now merge.router_tokens; the old name still works but will go\n"
    load_experiment(FIXTURE, [f"run_dir={tmp_path}", "merge.centroid_tokens=5"])
    assert capsys.readouterr().err == ""  # once per process
    # an override by either name wins over the file, the later one over the earlier
    exp = load_experiment(FIXTURE, [f"run_dir={tmp_path}", "merge.centroid_tokens=5", "merge.router_tokens=6"])
    assert exp.merge.router_tokens == 6


def test_the_old_recipe_key_in_a_file(tmp_path, capsys, fresh_notes):
    recipe = tiny_recipe(tmp_path, "centroid_tokens: 77")
    assert load_experiment(recipe, [f"run_dir={tmp_path}"]).merge.router_tokens == 77
    assert "merge.centroid_tokens is now merge.router_tokens" in capsys.readouterr().err
    assert load_experiment(recipe, [f"run_dir={tmp_path}", "merge.router_tokens=6"]).merge.router_tokens == 6
    both = tiny_recipe(tmp_path, "centroid_tokens: 77", "router_tokens: 6")
    with pytest.raises(BtxError, match="merge.centroid_tokens: the old name of merge.router_tokens, which is given"):
        load_experiment(both, [f"run_dir={tmp_path}"])


def test_the_old_flags_still_work_with_a_note(capsys, fresh_notes):
    args = cli.parse_args(
        shlex.split(
            "merge --seed s --out o --centroid-tokens 7 --centroid-data code=d "
            "--centroid-device cpu --centroid-data prose=p"
        )
    )
    assert given(args, MergeOptions) == {"router_tokens": 7, "router_device": "cpu"}
    assert args.router_data == ["code=d", "prose=p"]
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        f"btx: note: --centroid-{old} is now --router-{old}; the old name still works but will go"
        for old in ("tokens", "data", "device")
    ]
    _, merge = merge_parser()
    assert "--centroid-tokens" not in merge.format_help()  # hidden, but working
