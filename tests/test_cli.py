"""The command line: the command map and the parser agree, errors are one line, prepare works."""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from btx import cli
from btx.cli import COMMANDS, build_parser, main
from btx.cli.merge import merge_inputs
from btx.errors import BtxError

FIXTURE = Path(__file__).parent / "fixtures" / "tiny" / "btx.yaml"


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert len(actions) == 1
    return dict(actions[0].choices)


def test_command_map_and_parser_agree():
    subs = subparsers(build_parser())
    assert set(subs) == set(COMMANDS)
    for name, command in COMMANDS.items():
        assert callable(command.run) and callable(command.add_arguments)
        assert command.help and "\n" not in command.help
        assert subs[name].get_default("_run") is command.run


def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for name, command in COMMANDS.items():
        line = next(line for line in out.splitlines() if line.strip().startswith(name + " "))
        assert command.help.split()[0] in line


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_each_command_help_works(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([name, "--help"])
    assert exit_info.value.code == 0
    assert f"usage: btx {name}" in capsys.readouterr().out


def test_error_is_one_line_exit_2_and_debug_shows_traceback(capsys, tmp_path):
    assert main(["prepare", str(FIXTURE), "merge.topk=1"]) == 2
    err = capsys.readouterr().err
    assert err == f"btx: error: {FIXTURE} (override 'merge.topk=1'): merge.topk: unknown key (did you mean top_k?)\n"
    assert main(["--debug", "prepare", str(FIXTURE), "merge.topk=1"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.rstrip().splitlines()[-1].startswith("btx: error: ")
    assert main(["prepare", str(tmp_path / "nope.yaml"), "--debug"]) == 2  # --debug after the command too
    assert "Traceback" in capsys.readouterr().err


def test_bad_flags_are_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["prepare", "--no-such-flag"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "unrecognized arguments: --no-such-flag" in err
    with pytest.raises(SystemExit):
        main(["no-such-command"])
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_keyboard_interrupt_exits_130(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setitem(COMMANDS, "prepare", cli.Command(interrupted, "x", cli.add_prepare_arguments))
    assert main(["prepare", str(FIXTURE)]) == 130
    err = capsys.readouterr().err
    assert err.startswith("btx: interrupted") and len(err.strip().splitlines()) == 1


def test_other_exceptions_keep_their_traceback(monkeypatch):
    def broken(args):
        raise RuntimeError("a bug")

    monkeypatch.setitem(COMMANDS, "prepare", cli.Command(broken, "x", cli.add_prepare_arguments))
    with pytest.raises(RuntimeError):
        main(["prepare", str(FIXTURE)])


def test_python_dash_m_btx_exit_status(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "btx", "prepare", str(tmp_path / "nope.yaml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr == f"btx: error: {tmp_path / 'nope.yaml'}: no such recipe file\n"


def test_prepare_from_recipe(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["prepare", str(FIXTURE), f"run_dir={run_dir}", "--quiet"]) == 0
    for domain in ("code", "prose"):
        for split in ("train", "val"):
            meta = json.loads((run_dir / "data" / domain / f"{split}.json").read_text())
            assert meta["domain"] == domain and meta["split"] == split and meta["tokens"] > 0
    out = capsys.readouterr().out
    assert "code" in out and "prose" in out
    assert main(["prepare", str(FIXTURE), f"run_dir={run_dir}", "--quiet"]) == 0
    assert capsys.readouterr().out.count("up to date") == 2


def test_prepare_adhoc(tmp_path, capsys):
    out = tmp_path / "shards"
    code = FIXTURE.parent / "data" / "code"
    assert (
        main(
            [
                "prepare",
                "--domain",
                f"code={code}",
                "--domain",
                "math=builtin:arithmetic",
                "--out",
                str(out),
                "--quiet",
                "--val-fraction",
                "0.25",
            ]
        )
        == 0
    )
    assert json.loads((out / "code" / "train.json").read_text())["documents"] >= 1
    assert (out / "math" / "val.bin").stat().st_size > 0
    capsys.readouterr()
    for argv, expected in [
        (["prepare"], "give a RECIPE"),
        (["prepare", "--domain", f"code={code}"], "--domain needs --out"),
        (["prepare", "--domain", "code", "--out", str(out)], "expected NAME=PATH"),
        (["prepare", "--domain", "code=missing/dir", "--out", str(out)], "missing/dir: no such file"),
        (["prepare", "--domain", "x=builtin:nope", "--out", str(out)], "unknown built-in corpus"),
        (["prepare", str(FIXTURE), "--out", str(out)], "not both"),
    ]:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("btx: error: ") and expected in err and len(err.splitlines()) == 1, (argv, err)


def test_btx_errors_carry_one_line():
    assert cli._one_line(BtxError("a\n  b")) == "a b"


def test_merge_inputs_are_known_before_the_merge_runs(tmp_path):
    """`btx merge` reads its inputs ahead while torch imports: it must find the same directories
    the merge will read, and leave every error to the merge."""
    parse = build_parser().parse_args
    args = parse(["merge", "--seed", "s", "--expert", "code=c", "--expert=math=m/x", "--out", "o"])
    assert merge_inputs(args) == ["s", "c", "m/x"]
    args = parse(["merge", str(FIXTURE), f"run_dir={tmp_path}"])
    experts = [tmp_path / "experts" / d / "final" for d in ("code", "prose")]
    assert merge_inputs(args) == [tmp_path / "seed", *experts]
    assert merge_inputs(parse(["merge", str(FIXTURE), "no_such_key=1"])) == []


def test_named_recipes(tmp_path, capsys):
    from btx.recipe.builtin import builtin_recipes
    from btx.recipe.load import load_experiment

    assert load_experiment("demo").path == load_experiment(Path(__file__).parents[1] / "recipes/demo/btx.yaml").path
    assert set(builtin_recipes()) >= {"demo", "llama2-7b"}
    assert main(["recipes"]) == 0
    assert "demo" in capsys.readouterr().out
    assert main(["status", "demo", f"run_dir={tmp_path}"]) == 0
    assert main(["status", "demoo"]) == 2
    expected = "no built-in recipe of that name (built-in: demo, demo-seed, demo-study, llama2-7b (did you mean demo?))"
    assert expected in capsys.readouterr().err
    proc = subprocess.run([sys.executable, "-m", "btx", "status"], capture_output=True, text=True)
    assert proc.returncode == 2 and "KEY=VALUE" not in proc.stderr and "required: RECIPE (" in proc.stderr


def test_named_recipes_from_a_wheel_install(tmp_path):
    """A wheel has no recipes/ directory to point at: `btx run demo` and `btx status demo` find
    the recipes it ships inside the package (btx/_recipes)."""
    repo = Path(__file__).parents[1]
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(repo),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "wheel"),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = (tmp_path / "wheel").glob("btx-*.whl")
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
        check=True,
        capture_output=True,
    )
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "COLUMNS": "300"}

    def run(*args):
        return subprocess.run(
            [sys.executable, "-m", "btx", *args], cwd=tmp_path, env=env, capture_output=True, text=True
        )

    listed = run("recipes")
    assert (
        listed.returncode == 0
        and "demo" in listed.stdout
        and str(site / "btx" / "_recipes") in listed.stdout.replace("\n", "")
    )
    status = run("status", "demo", f"run_dir={tmp_path / 'run'}")
    assert status.returncode == 0, status.stderr
    assert "pending" in status.stdout
    shipped_seed = site / "btx" / "_recipes" / "demo" / "seed"
    assert {p.name for p in shipped_seed.iterdir()} >= {"config.json", "model.safetensors", "SEED.json"}
