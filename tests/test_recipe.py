"""Recipes: loading, overrides, per-job training settings, and one-line errors for bad input."""

import dataclasses
import textwrap
from pathlib import Path

import pytest

from btx.errors import BtxError
from btx.recipe.builtin import builtin_recipes_dir
from btx.recipe.experiment import recipe_hash, to_yaml
from btx.recipe.load import load_domain, load_experiment
from btx.recipe.schema import ExperimentRecipe, ModelSection, TrainSection
from btx.units import parse_size

FIXTURE = Path(__file__).parent / "fixtures" / "tiny" / "btx.yaml"


def error_of(overrides=(), path=FIXTURE) -> str:
    with pytest.raises(BtxError) as info:
        load_experiment(path, list(overrides))
    message = str(info.value)
    assert "\n" not in message
    return message


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def test_fixture_loads_with_effective_train_settings():
    exp = load_experiment(FIXTURE)
    assert exp.name == "tiny" and exp.experiment == "tiny"
    assert exp.run_dir == Path("checkpoints/tiny").absolute()
    assert list(exp.domains) == ["code", "prose"]
    assert exp.model.dim == 32 and exp.merge.top_k == 2 and exp.finetune.router_mode == "topk"
    # experiment train, then each job's own keys
    assert exp.domains["code"].train.lr == 2e-3 and exp.domains["prose"].train.lr == 1e-3
    assert exp.domains["code"].train.steps == 4
    assert exp.seed_train.steps == 6 and exp.seed_train.lr == 1e-3
    assert exp.finetune_train.steps == 3 and exp.finetune_train.lr == 1e-3  # ${train.lr}
    assert isinstance(exp.finetune_train.lr, float)
    # paths are absolute, relative to the recipe that names them
    code = exp.domains["code"]
    assert code.sources[0].path == FIXTURE.parent / "data" / "code"
    assert [f.name for f in code.files] == [f"prog{i}.py.txt" for i in range(4)]
    prose = exp.domains["prose"].sources[0]
    assert prose.text_field == "body" and prose.files == [FIXTURE.parent / "data" / "prose.jsonl"]
    assert exp.finetune.mixture == {"code": 1.0, "prose": 1.0}


def test_overrides_and_command_line_train_precedence():
    exp = load_experiment(FIXTURE, ["merge.top_k=1", "train.steps=9", "finetune.train.steps=5", "run_dir=out/x"])
    assert exp.merge.top_k == 1
    assert exp.train.steps == 9
    assert exp.seed_train.steps == 9  # command-line train.* wins over seed.train in the file
    assert exp.domains["code"].train.steps == 9
    assert exp.domains["code"].train.lr == 2e-3  # keys the command line does not name stay
    assert exp.finetune_train.steps == 5  # the more specific command-line key wins
    assert exp.run_dir == Path("out/x").absolute()
    assert exp.seed_dir == exp.run_dir / "seed"  # a seed the run trains itself


def test_override_paths_are_relative_to_the_current_directory(tmp_path, monkeypatch):
    other = write(tmp_path, "elsewhere/code.yaml", "data:\n  sources: [one.txt]\n")
    (tmp_path / "elsewhere" / "one.txt").write_text("hello")
    monkeypatch.chdir(tmp_path)
    exp = load_experiment(FIXTURE.absolute(), ["domains.code=elsewhere/code.yaml"])
    assert exp.domains["code"].path == other
    assert exp.domains["code"].files == [tmp_path / "elsewhere" / "one.txt"]


def test_unknown_key_names_file_key_and_suggestion(tmp_path):
    assert error_of(["merge.topk=1"]) == (
        f"{FIXTURE} (override 'merge.topk=1'): merge.topk: unknown key (did you mean top_k?)"
    )
    bad = write(tmp_path, "exp.yaml", FIXTURE.read_text().replace("merge:\n  top_k: 2", "merge:\n  topk: 2"))
    for name in ("code.yaml", "prose.yaml"):
        (tmp_path / name).write_text((FIXTURE.parent / name).read_text())
    (tmp_path / "data").symlink_to(FIXTURE.parent / "data")
    assert error_of(path=bad) == f"{bad}: merge.topk: unknown key (did you mean top_k?)"


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.lr=abc", "train.lr: expected a number, got str 'abc'"),
        ("train.steps=1.5", "train.steps: expected an integer, got float 1.5"),
        ("merge.keep_seed=3", "merge.keep_seed: expected true or false, got int 3"),
        ("branch.slurm.time=24:00:00", "branch.slurm.time: expected a string, got int 86400 (quote the value)"),
        ("train=3", "train: expected a mapping, got int 3"),
        ("seed.train.lrr=1", "seed.train.lrr: unknown key (did you mean lr?)"),
        ("finetune.mixture.code=[1]", "finetune.mixture.code: expected a number, got list [1]"),
        ("train.steps=0", "train.steps: must be > 0, got 0"),
        ("train.lr=0", "train.lr: must be > 0, got 0.0"),
        (
            "train.precision=bf-16",
            "train.precision: expected one of auto, fp32, bf16, fp16; got 'bf-16' (did you mean bf16?)",
        ),
        ("train.betas=[0.9]", "train.betas: expected two numbers in [0, 1), got [0.9]"),
        (
            "finetune.router_mode=top2",
            "finetune.router_mode: expected one of topk, switch, soft, sample_top1; got 'top2'",
        ),
        (
            "finetune.trainable=router",
            "finetune.trainable: expected one of all, router_only, frozen_experts; got 'router'",
        ),
        ("finetune.zero_stage=4", "finetune.zero_stage: must be 0, 1, 2 or 3, got 4"),
        ("finetune.offload_optimizer=true", "finetune.offload_optimizer: needs zero_stage >= 1"),
        ("finetune.mixture={code: 0, prose: 0}", "finetune.mixture: weights must sum to more than 0"),
        (
            "finetune.mixture.cdoe=1",
            "finetune.mixture.cdoe: not a domain of this experiment (domains: code, prose) (did you mean code?)",
        ),
        ("merge.weights=even", "merge.weights: expected uniform, tokens or a mapping of weights; got 'even'"),
        ("merge.weights={code: 1, seed: -1}", "merge.weights.seed: weights must be >= 0, got -1"),
        ("merge.top_k=4", "merge.top_k: must be <= the number of experts (3), got 4"),
        ("merge.granularity=split", "merge.chunks: must be >= 2 with granularity split, got 1"),
        ("merge.shard_size=lots", "merge.shard_size: not a size: 'lots' (expected e.g. 5GB, 500MB, 2GiB)"),
        ("branch.executor=k8s", "branch.executor: expected one of local, slurm; got 'k8s'"),
        ("model.n_kv_heads=3", "model.n_kv_heads: must divide n_heads (4), got 3"),
        ("model.vocab_size=256", "model.vocab_size: the byte tokenizer needs vocab_size >= 264, got 256"),
        ("experiment=a/b", "experiment: 'a/b' is not a usable name"),
    ],
)
def test_bad_values_are_one_line_errors(override, expected):
    message = error_of([override])
    assert message.startswith(f"{FIXTURE}")
    assert expected in message
    if message.split(": ", 2)[1] == override.partition("=")[0]:  # the error is about the key it set
        assert message.startswith(f"{FIXTURE} (override {override!r}): ")


def test_command_line_train_override_is_checked_for_every_job():
    # 0 < min_lr_ratio is fine for the experiment, but the error must still name the key
    assert "train.warmup_steps: must be >= 0, got -1" in error_of(["train.warmup_steps=-1"])


@pytest.mark.parametrize(
    "override, expected",
    [
        ("domains.code=missing.yaml", "domains.code: "),
        ("seed.path=no/such/ckpt", "model: give either seed.path"),
        ("tokenizer=no/such/tokenizer.json", "tokenizer: "),
    ],
)
def test_missing_referenced_files(override, expected):
    assert expected in error_of([override])


def test_seed_path_must_exist(tmp_path):
    message = error_of(["seed.path=no/such/ckpt", "model=null"])
    assert "seed.path: " in message and "not a checkpoint directory" in message
    hub = error_of(["seed.path=Qwen/Qwen3-0.6B", "model=null"])  # a Hub id: download it first
    assert "'Qwen/Qwen3-0.6B' looks like a Hugging Face Hub id" in hub and "hf download Qwen/Qwen3-0.6B" in hub
    assert "give seed.path" in error_of(["model=null"])


def test_seed_dir_is_the_given_seed_path(tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text("{}")
    exp = load_experiment(FIXTURE, [f"seed.path={tmp_path / 'ckpt'}", "model=null"])
    assert exp.seed_dir == tmp_path / "ckpt"


def test_malformed_overrides_and_yaml(tmp_path):
    assert "expected KEY=VALUE" in error_of(["merge.top_k"])
    assert "expected KEY=VALUE" in error_of(["--force"])
    bad = write(tmp_path, "bad.yaml", "experiment: x\ntrain:\n  lr: [1\n")
    assert error_of(path=bad).startswith(f"{bad}: line ")
    dup = write(tmp_path, "dup.yaml", "experiment: x\nexperiment: y\n")
    assert "duplicate key" in error_of(path=dup)
    assert "no such recipe file" in error_of(path=tmp_path / "nope.yaml")
    assert "the recipe is empty" in error_of(path=write(tmp_path, "empty.yaml", ""))
    assert "expected a mapping" in error_of(path=write(tmp_path, "list.yaml", "- 1\n"))


def test_missing_experiment_name_and_interpolation_errors(tmp_path):
    assert "experiment: missing" in error_of(["experiment=???"])
    message = error_of(["finetune.train.lr=${train.nope}"])
    assert "finetune.train.lr" in message or "train.nope" in message


def test_domain_recipe_errors_name_the_domain_file(tmp_path):
    exp_path = write(
        tmp_path,
        "exp.yaml",
        """\
        experiment: t
        model: {vocab_size: 264}
        domains: {d: d.yaml}
    """,
    )
    write(tmp_path, "a.txt", "text")
    d = write(tmp_path, "d.yaml", "data: {sources: [a.txt]}\ntrain: {lrr: 1}\n")
    assert error_of(path=exp_path) == f"{d}: train.lrr: unknown key (did you mean lr?)"
    d.write_text("data: {sources: [a.txt]}\ntrain: {lr: -1}\n")
    assert error_of(path=exp_path) == f"{d}: train.lr: must be > 0, got -1.0"
    d.write_text("data: {sources: [b.txt]}\n")
    assert error_of(path=exp_path) == f"{d}: data.sources[0]: {tmp_path / 'b.txt'}: no such file or directory"
    d.write_text("data: {sources: ['*.md']}\n")
    assert "matches no file" in error_of(path=exp_path)
    d.write_text("data: {sources: [{path: a.txt, fromat: text}]}\n")
    assert "data.sources[0].fromat: unknown key (did you mean format?)" not in error_of(path=exp_path)
    assert "data.sources[0].fromat: unknown key" in error_of(path=exp_path)
    d.write_text("data: {sources: [a.txt], document_mask: true}\n")  # issue 22's spelling: one pointer
    assert error_of(path=exp_path) == (
        f"{d}: data.document_mask: not a key of this section: it is train.document_mask "
        "(in this domain recipe's train:, or the experiment's)"
    )
    d.write_text("name: other\ndata: {sources: [a.txt]}\n")
    assert "name: this recipe is for domain 'other'" in error_of(path=exp_path)
    d.write_text("data: {}\n")
    assert "data.sources: a domain needs data" in error_of(path=exp_path)
    d.write_text("data: {builtin: arithmatic}\n")
    assert "data.builtin: unknown built-in corpus 'arithmatic'" in error_of(path=exp_path)
    assert "(did you mean arithmetic?)" in error_of(path=exp_path)
    d.write_text("data: {builtin: arithmetic, val_fraction: 0}\n")
    assert "data.val_fraction: must be in (0, 1)" in error_of(path=exp_path)


def test_domain_sources_globs_and_standalone_load(tmp_path):
    for name in ("a.txt", "b.txt", "c.jsonl", "sub/d.txt", "sub/.hidden"):
        write(tmp_path, f"corpus/{name}", "x")
    d = write(
        tmp_path,
        "d.yaml",
        """\
        data:
          sources:
            - corpus/*.txt
            - {path: corpus, glob: "**/*.txt", text_field: body}
            - corpus
          builtin: arithmetic
        train: {steps: 7}
    """,
    )
    dom = load_domain(d, ["train.lr=0.5"])
    assert dom.name == "d" and dom.train.steps == 7 and dom.train.lr == 0.5
    c = tmp_path / "corpus"
    assert dom.sources[0].files == [c / "a.txt", c / "b.txt"]
    assert dom.sources[0].specs() == [
        {"path": str(c / "a.txt"), "text_field": "text"},
        {"path": str(c / "b.txt"), "text_field": "text"},
    ]
    assert dom.sources[1].files == [c / "a.txt", c / "b.txt", c / "sub" / "d.txt"]
    assert dom.sources[1].specs() == [{"path": str(c), "text_field": "body", "glob": "**/*.txt"}]
    assert dom.sources[2].files == [c / "a.txt", c / "b.txt", c / "c.jsonl", c / "sub" / "d.txt"]


def test_recipe_hash_and_yaml_round_trip(tmp_path):
    exp = load_experiment(FIXTURE)
    again = load_experiment(FIXTURE)
    assert recipe_hash(exp.merge) == recipe_hash(again.merge)
    assert recipe_hash(exp.merge) != recipe_hash(load_experiment(FIXTURE, ["merge.top_k=1"]).merge)
    assert recipe_hash({"a": 1, "b": 2}) == recipe_hash({"b": 2, "a": 1})
    saved = tmp_path / "resolved.yaml"
    saved.write_text(to_yaml(exp))
    reloaded = load_experiment(saved)
    assert recipe_hash(reloaded) == recipe_hash(exp)
    assert reloaded.domains["code"].train == exp.domains["code"].train


def test_model_section_mirrors_model_config():
    from btx.model.config import ModelConfig

    config_fields = {f.name: f for f in dataclasses.fields(ModelConfig)}
    for f in dataclasses.fields(ModelSection):
        assert f.name in config_fields, f"ModelSection.{f.name} is not a ModelConfig field"
        mine = f.default_factory() if f.default is dataclasses.MISSING else f.default
        cf = config_fields[f.name]
        theirs = cf.default_factory() if cf.default is dataclasses.MISSING else cf.default
        assert mine == theirs, f.name
    cfg = load_experiment(FIXTURE).model.to_model_config(n_experts=3)
    assert cfg.dim == 32 and cfg.n_experts == 3


def test_defaults_follow_the_paper():
    t = TrainSection()
    assert (t.lr, t.weight_decay, t.warmup_steps, t.min_lr_ratio) == (1e-4, 0.1, 100, 0.1)
    r = ExperimentRecipe()
    assert r.merge.keep_seed and r.merge.top_k == 2 and r.finetune.balance_alpha == 0.01
    assert r.finetune.capacity_factor == 1.5 and r.finetune.gumbel_rate == 1e-4


def test_parse_size_and_builtin_recipes_dir():
    assert parse_size("5GB") == 5_000_000_000 and parse_size("2GiB") == 2 << 30 and parse_size("100") == 100
    assert builtin_recipes_dir().is_dir()


def test_base_recipe_gives_every_key_the_child_does_not_change(tmp_path):
    """`base:` a path relative to the child: the base's keys, its paths relative to the base file,
    the child's keys over them (mappings merged key by key); the base's run_dir is not inherited."""
    study = tmp_path / "study"
    study.mkdir()
    text = f"base: {FIXTURE}\nexperiment: tiny-study\neval:\n  match: both\nmerge:\n  top_k: 1\n"
    (study / "btx.yaml").write_text(text)
    child, parent = load_experiment(study / "btx.yaml"), load_experiment(FIXTURE)
    assert child.name == "tiny-study" and child.recipe.base == str(FIXTURE)
    assert child.eval.match == "both" and child.merge.top_k == 1
    assert child.recipe.tokenizer == parent.recipe.tokenizer  # relative to the base's file
    assert {d: x.sources for d, x in child.domains.items()} == {d: x.sources for d, x in parent.domains.items()}
    assert child.merge.router_init == parent.merge.router_init and child.train == parent.train
    assert child.run_dir.name == "tiny-study"


def test_base_by_builtin_name_and_relative_path(tmp_path):
    (tmp_path / "a.yaml").write_text("base: demo\nexperiment: a\neval:\n  match: both\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\nexperiment: b\nfinetune:\n  top_k: 1\n")
    b, demo = load_experiment(tmp_path / "b.yaml"), load_experiment("demo")
    assert (b.eval.match, b.finetune.top_k, b.name) == ("both", 1, "b")
    assert b.recipe.tokenizer == demo.recipe.tokenizer and b.merge.router_scale == demo.merge.router_scale


@pytest.mark.parametrize(
    "files, expected",
    [
        ({"a.yaml": "base: b.yaml\nexperiment: a\n", "b.yaml": "base: a.yaml\nexperiment: b\n"}, "form a cycle"),
        ({"a.yaml": "base: a.yaml\nexperiment: a\n"}, "form a cycle"),
        ({"a.yaml": "base: demo\neval:\n  match: both\n"}, "experiment: required with base:"),
        ({"a.yaml": "base: demoo\nexperiment: a\n"}, "base: demoo: no such recipe"),
        ({"a.yaml": "base: b.yaml\nexperiment: a\n", "b.yaml": "experiment: b\nmerge:\n  top_kk: 1\n"}, "top_kk"),
    ],
)
def test_bad_base_is_one_line(tmp_path, files, expected):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(BtxError, match=expected) as e:
        load_experiment(tmp_path / "a.yaml")
    assert "\n" not in str(e.value)
