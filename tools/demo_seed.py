"""The demo's shipped seed: trained once from recipes/demo-seed/, kept in recipes/demo/seed/.

    python tools/demo_seed.py            train it afresh (in --work, default checkpoints/demo-seed/)
                                         and ship it: recipes/demo/seed/ with SEED.json
    python tools/demo_seed.py --check    train it again in --work and compare byte for byte

SEED.json records what made the files: the recipe's fingerprint (its values, its domain recipes'
and the tokenizer's bytes), every shipped file's sha256, the Python and torch that trained it and
the run's steps, tokens, FLOPs, losses and wall time. Training is deterministic (the same weights
whatever the thread count), so the same recipe, Python (the corpora are its standard library) and
torch give the same bytes. tests/test_demo_seed.py checks the shipped files against SEED.json and
SEED.json against the recipe, so an edited recipe without a new seed fails the suite.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from published import recipe_values  # noqa: E402
from published_arithmetic import SEED_MANIFEST as MANIFEST  # noqa: E402

SPLITS = ("train", "val")
BLOCK = ("# <seed-data>", "# </seed-data>")
RECIPE = ROOT / "recipes" / "demo-seed" / "btx.yaml"
SHIPPED_DIR = ROOT / "recipes" / "demo" / "seed"
FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
TRAINING_KEYS = (
    "steps",
    "tokens",
    "train_flops",
    "params",
    "train_loss_last10",
    "val_loss",
    "val_losses",
    "wall_time_s",
)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def recipe_fingerprint(recipe: Path = RECIPE) -> str:
    """sha256 of the recipe's values, its domain recipes' values and its tokenizer's files."""
    from btx.recipe.load import load_experiment

    h = hashlib.sha256(json.dumps(recipe_values(recipe), sort_keys=True).encode())
    tokenizer = Path(load_experiment(recipe, inputs_exist=False).recipe.tokenizer)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        h.update((tokenizer / name).read_bytes())
    return h.hexdigest()


def train(recipe: Path, work: Path, overrides: tuple[str, ...] = ()) -> Path:
    """Train the recipe's seed from scratch in `work` (emptied first); returns the exported seed."""
    from btx.cli import main

    shutil.rmtree(work, ignore_errors=True)
    for command in (["prepare", str(recipe)], ["train", str(recipe), "--seed"]):
        status = main([*command, f"run_dir={work}", *overrides])
        if status != 0:
            raise SystemExit(f"btx {' '.join(command)} failed (exit {status})")
    return work / "seed"


def made_with() -> dict:
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "machine": platform.machine()}


def manifest(seed: Path, recipe: Path, dest: Path) -> dict:
    done = json.loads((seed / "DONE.json").read_text())
    shards = seed.parent / "data"
    return {
        "recipe": os.path.relpath(recipe, dest),  # relative, so that it holds in a wheel's btx/_recipes/ too
        "recipe_sha256": recipe_fingerprint(recipe),
        "files": {name: sha256(seed / name) for name in FILES},
        "made_with": made_with(),
        "training": {key: done[key] for key in TRAINING_KEYS if key in done},
        "mixture": done["inputs"]["mixture"],
        "data": {
            domain: {split: json.loads((shards / domain / f"{split}.json").read_text())["tokens"] for split in SPLITS}
            for domain in done["inputs"]["mixture"]
        },
    }


def ship(seed: Path, recipe: Path, dest: Path = SHIPPED_DIR) -> Path:
    """Copy the seed's files and its SEED.json into `dest`, replacing what was there whole."""
    staging = Path(tempfile.mkdtemp(prefix=".seed-", dir=dest.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; a shipped directory is readable by all
    for name in FILES:
        shutil.copyfile(seed / name, staging / name)
    (staging / MANIFEST).write_text(json.dumps(manifest(seed, recipe, dest), indent=1) + "\n")
    old = dest.with_name(f".{dest.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if dest.exists():
        dest.rename(old)
    staging.rename(dest)
    shutil.rmtree(old, ignore_errors=True)
    return dest


def problems(dest: Path = SHIPPED_DIR, recipe: Path = RECIPE) -> list[str]:
    """Why the shipped seed does not follow from its recipe: a changed file or a changed recipe."""
    path = dest / MANIFEST
    if not path.is_file():
        return [f"{path}: missing; run python tools/demo_seed.py"]
    recorded = json.loads(path.read_text())
    out = [
        f"{dest / name}: sha256 {found or 'missing'}, {MANIFEST} records {digest}"
        for name, found, digest in differing_files(dest, recorded["files"])
    ]
    if recorded["recipe_sha256"] != recipe_fingerprint(recipe):
        out.append(f"{recipe}: changed since the shipped seed was trained; run python tools/demo_seed.py")
    return out


def data_comment(recorded: dict) -> list[str]:
    """The recipe's generated block: what the shipped seed's run saw, from its SEED.json."""
    t, weights = recorded["training"], recorded["mixture"]
    params = t["params"]["total"]
    lines = [
        f"# {t['steps']} steps, {t['tokens']:,} tokens: {t['tokens'] / params:.1f} per parameter ({params:,});"
        " per domain, its train shard and what the mixture drew from it:",
    ]
    for domain, tokens in recorded["data"].items():
        drawn = t["tokens"] * weights[domain] / sum(weights.values())
        lines.append(
            f"#   {domain:6s} {tokens['train']:>10,} train tokens, {drawn:>12,.0f} drawn "
            f"({drawn / tokens['train']:.1f} epochs)"
        )
    return lines


def rendered(recipe: Path = RECIPE, dest: Path = SHIPPED_DIR) -> str:
    """The recipe's text with its seed-data block written from SEED.json."""
    text = recipe.read_text()
    begin, end = text.index(BLOCK[0]) + len(BLOCK[0]) + 1, text.index(BLOCK[1])
    lines = data_comment(json.loads((dest / MANIFEST).read_text()))
    return text[:begin] + "".join(line + "\n" for line in lines) + text[end:]


def render(recipe: Path = RECIPE, dest: Path = SHIPPED_DIR) -> bool:
    """Rewrite the recipe's seed-data block from SEED.json; True when it changed."""
    text, new = recipe.read_text(), rendered(recipe, dest)
    if new != text:
        recipe.write_text(new)
    return new != text


def differing_files(directory: Path, recorded: dict[str, str]) -> list[tuple[str, str | None, str]]:
    """(name, its sha256 in `directory` or None when missing, the recorded sha256) of each file
    that is not as recorded."""
    found = {name: sha256(directory / name) if (directory / name).is_file() else None for name in recorded}
    return [(name, found[name], digest) for name, digest in recorded.items() if found[name] != digest]


def compare(seed: Path, dest: Path = SHIPPED_DIR) -> list[str]:
    """The files of a fresh training that differ from the shipped ones."""
    recorded = json.loads((dest / MANIFEST).read_text())["files"]
    return [
        f"{name}: {found or 'missing'} trained, {digest} shipped"
        for name, found, digest in differing_files(seed, recorded)
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="train again and compare with the shipped seed")
    parser.add_argument("--render", action="store_true", help="only rewrite the recipe's seed-data block")
    parser.add_argument("--work", type=Path, default=ROOT / "checkpoints" / "demo-seed", help="where to train")
    args = parser.parse_args(argv)
    if args.render:
        print(f"{'rewrote' if render() else 'unchanged'}: {RECIPE}")
        return 0
    seed = train(RECIPE, args.work)
    if args.check:
        differ = compare(seed)
        for line in differ:
            print(line)
        made, here = json.loads((SHIPPED_DIR / MANIFEST).read_text())["made_with"], made_with()
        print(f"{'differs' if differ else 'identical'}: {seed} against {SHIPPED_DIR}")
        if made != here:  # the corpora are this Python's standard library; the kernels this torch's
            print(f"note: the shipped seed was made with {made}, this is {here}: bytes need not match across them")
        return 1 if differ else 0
    print(f"shipped {ship(seed, RECIPE)}")
    render()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
