"""btx export: a training checkpoint in the HF form of the job's final export. The last step's
checkpoint exports to the final export byte for byte, for a dense job (accelerate) and for MoE
finetunes on DeepSpeed (ZeRO-0 in bf16, where the fp32 masters live in the optimizer, and ZeRO-3
with frozen experts, put together from the optimizer partitions); an earlier step exports its own
weights; a bad directory is one line and exit 2; nothing is unpickled.
"""

import filecmp
import json
import shutil
from pathlib import Path

import pytest
import torch
from rich.console import Console

from btx.cli import main
from btx.data.tokenizer import ByteTokenizer
from btx.io.checkpoint import load_state_dict, save_model
from btx.io.hashing import sha256_file
from btx.io.manifest import write_done
from btx.model.transformer import Transformer
from btx.recipe.load import load_experiment
from btx.train.finetune import finetune_job, run_finetune
from btx.train.job import CKPT_MANIFEST, seed_job
from btx.train.loop import run_loop

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "tiny"
QUIET = Console(stderr=True, quiet=True)
CHAT_TEMPLATE = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}"


@pytest.fixture(scope="module")
def seeded(tmp_path_factory):
    """The tiny experiment's seed, trained from scratch (6 steps, a checkpoint every 2), and a small
    MoE made from it with tokenizer files and a chat template (what finetunes start from)."""
    from btx.run.prepare import prepare_experiment

    root = tmp_path_factory.mktemp("export")
    shutil.copytree(FIXTURE, root / "recipe")
    exp = load_experiment(root / "recipe" / "btx.yaml", [f"run_dir={root / 'run'}"])
    prepare_experiment(exp, progress=False)
    run_loop(seed_job(exp), console=QUIET)
    cfg = exp.model.to_model_config(n_experts=3, top_k=2)
    moe = Transformer(cfg)
    moe.init_weights(generator=torch.Generator().manual_seed(0))
    merged = exp.run_dir / "merged"
    save_model(moe, None, merged, dtype=torch.float32)
    ByteTokenizer().save(merged)
    config = json.loads((merged / "tokenizer_config.json").read_text())
    (merged / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHAT_TEMPLATE}))
    write_done(merged, {"stage": "merge"})
    return exp


def export(args, capsys):
    status = main(["export", *map(str, args)])
    return status, capsys.readouterr().err


def same_files(final: Path, exported: Path) -> list[str]:
    """The export's files; those of the final export (DONE.json aside) must be the same, byte for byte."""
    names = sorted(p.name for p in final.iterdir() if p.name != "DONE.json")
    assert names == sorted(p.name for p in exported.iterdir())
    assert [n for n in names if not filecmp.cmp(final / n, exported / n, shallow=False)] == []
    return names


def test_a_dense_jobs_last_checkpoint_exports_to_its_final_export_and_earlier_ones_to_their_weights(
    seeded, tmp_path, capsys
):
    ckpts = seeded.paths.seed_train / "ckpt"
    status, err = export([ckpts / "step-6", "--out", tmp_path / "last"], capsys)
    assert status == 0, err
    assert "model.safetensors" in same_files(seeded.paths.seed, tmp_path / "last")
    # a job directory: its newest checkpoint
    assert export([seeded.paths.seed_train, "--out", tmp_path / "newest"], capsys)[0] == 0
    same_files(seeded.paths.seed, tmp_path / "newest")
    # an earlier step: that step's weights, in the export's form
    assert export([ckpts / "step-4", "--out", tmp_path / "step4"], capsys)[0] == 0
    _, at_step4 = load_state_dict(tmp_path / "step4")
    _, in_checkpoint = load_state_dict(ckpts / "step-4")
    _, final = load_state_dict(seeded.paths.seed)
    assert all(torch.equal(at_step4[k], in_checkpoint[k]) for k in final)
    assert not all(torch.equal(at_step4[k], final[k]) for k in final)


@pytest.mark.parametrize(
    "overrides",
    [
        ["finetune.zero_stage=0", "train.precision=bf16"],
        ["finetune.zero_stage=3", "train.precision=bf16", "finetune.trainable=frozen_experts"],
    ],
    ids=["zero0-bf16", "zero3-bf16-frozen"],
)
def test_an_moe_finetunes_last_deepspeed_checkpoint_exports_to_its_final_export(seeded, tmp_path, capsys, overrides):
    run = tmp_path / "run"
    run.mkdir()
    for shared in ("data", "merged"):
        (run / shared).symlink_to(seeded.run_dir / shared)
    exp = load_experiment(seeded.path, [f"run_dir={run}", "finetune.train.steps=3", *overrides])
    run_finetune(finetune_job(exp), console=QUIET)
    last = exp.paths.finetune.train / "ckpt" / "step-3"
    assert (last / "deepspeed").is_dir()
    status, err = export([last, "--out", tmp_path / "last"], capsys)
    assert status == 0, err
    names = same_files(exp.paths.finetuned, tmp_path / "last")
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(names)
    assert json.loads((tmp_path / "last" / "tokenizer_config.json").read_text())["chat_template"] == CHAT_TEMPLATE
    assert json.loads((tmp_path / "last" / "config.json").read_text())["model_type"] == "mixtral"
    # fp32 export (the merged checkpoint is fp32): the weights are the optimizer's fp32 masters,
    # not the module's bf16 copy, or the files above would differ
    assert "float32" in err


def test_bad_directories_are_one_line_and_exit_2_and_nothing_is_unpickled(seeded, tmp_path, capsys):
    def one_line(args) -> str:
        status, err = export(args, capsys)
        lines = err.strip().splitlines()
        assert status == 2 and len(lines) == 1 and lines[0].startswith("btx: error:"), err
        return lines[0]

    out = tmp_path / "out"
    assert "not found" in one_line([tmp_path / "nope", "--out", out])
    (tmp_path / "empty").mkdir()
    assert "not a btx training checkpoint" in one_line([tmp_path / "empty", "--out", out])
    step = tmp_path / "step-4"
    shutil.copytree(seeded.paths.seed_train / "ckpt" / "step-4", step)
    (out / "x").mkdir(parents=True)
    assert "already exists" in one_line([step, "--out", out])
    shutil.rmtree(out)
    # a file btx did not write (or one changed since) is never read
    (step / "extra.pt").write_bytes(b"not btx's")
    assert "extra.pt: not listed in" in one_line([step, "--out", out])
    (step / "extra.pt").unlink()
    optimizer = step / "optimizer.pt"
    original = optimizer.read_bytes()
    optimizer.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    assert "differs from the sha256" in one_line([step, "--out", out])
    optimizer.write_bytes(original)
    assert not out.exists()

    # a DeepSpeed file holding a Python object, even with its sha256 recorded, is refused unread
    run = tmp_path / "ds"
    run.mkdir()
    for shared in ("data", "merged"):
        (run / shared).symlink_to(seeded.run_dir / shared)
    exp = load_experiment(seeded.path, [f"run_dir={run}", "finetune.train.steps=2", "train.checkpoint_every=2"])
    run_finetune(finetune_job(exp), console=QUIET)
    last = exp.paths.finetune.train / "ckpt" / "step-2"
    states = last / "deepspeed" / "mp_rank_00_model_states.pt"
    torch.save({"module": {}, "hook": Path("/")}, states)  # unpickling would build a PosixPath
    manifest = json.loads((last / CKPT_MANIFEST).read_text())
    manifest["files"]["deepspeed/mp_rank_00_model_states.pt"] = sha256_file(states)
    (last / CKPT_MANIFEST).write_text(json.dumps(manifest))
    assert "does not unpickle" in one_line([last, "--out", out])
    assert not out.exists()
