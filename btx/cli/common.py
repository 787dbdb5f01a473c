"""What every command shares: the Command record, RECIPE with its overrides, the console."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Command:
    run: Callable[[argparse.Namespace], "int | None"]  # returns the exit status (None: 0)
    help: str  # one line, shown by `btx --help`
    add_arguments: Callable[[argparse.ArgumentParser], None]


# ---------------------------------------------------------------------------------------------
# Shared argument helpers
# ---------------------------------------------------------------------------------------------


def add_recipe_arguments(p: argparse.ArgumentParser, required: bool = True) -> None:
    """RECIPE and its KEY=VALUE overrides, as every recipe-driven command takes them."""
    p.add_argument(
        "recipe",
        metavar="RECIPE",
        nargs=None if required else "?",
        help="experiment recipe (a YAML file, or the name of a built-in one: see `btx recipes`)",
    )
    p.add_argument(
        "overrides",
        metavar="KEY=VALUE",
        nargs="*",
        help="recipe overrides in OmegaConf dotlist form, e.g. merge.top_k=1 train.steps=20",
    )


def load_experiment_args(args: argparse.Namespace):
    from btx.recipe.load import load_experiment

    return load_experiment(args.recipe, args.overrides)


def console():
    from rich.console import Console

    return Console()
