"""`btx merge`: a merge of dense experts, or (`--into`) a grow or shrink of a finished MoE.

The flags are generated from the merge and edit settings (btx/recipe/settings.py); only the
inputs and outputs are declared here.
"""

from __future__ import annotations

import argparse
import dataclasses

from btx.cli.common import add_recipe_arguments
from btx.errors import BtxError
from btx.mix.options import EditOptions, MergeOptions
from btx.recipe.settings import FlagAction, add_flags, add_renamed, flags


def add_merge_arguments(p: argparse.ArgumentParser) -> None:
    add_recipe_arguments(p, required=False)
    p.add_argument("--force", action="store_true", help="replace an existing output checkpoint")
    p.add_argument(
        "--allow-no-manifest",
        action="store_true",
        help="accept experts without a DONE.json: external checkpoints, or a job you know is finished "
        "(their weights are still fully checked)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    adhoc = p.add_argument_group("without a recipe (a recipe takes these as merge.* overrides)")
    adhoc.add_argument("--seed", metavar="DIR", help="the dense seed checkpoint the experts were branched from")
    adhoc.add_argument(
        "--expert",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="a domain expert (a checkpoint, or a branch job's directory); repeat, in expert order",
    )
    adhoc.add_argument("--out", metavar="DIR", help="output directory of the MoE checkpoint")
    add_renamed(
        adhoc,
        "--router-data",
        "--centroid-data",
        dest="router_data",
        action=FlagAction,
        repeat=True,
        default=[],
        metavar="NAME=SHARD",
        help="validation shard of domain NAME for centroid and ridge routers (default: "
        "<run_dir>/data/NAME/val.bin when the expert sits in a btx run directory)",
    )
    add_flags(adhoc, MergeOptions)  # every field of MergeOptions is a flag (btx/recipe/settings.py)
    merge_fields = {f.name: f for f in dataclasses.fields(MergeOptions)}
    shared = {flag: f for flag, f in flags(EditOptions).items() if f.name in merge_fields}
    # The defaults an edit has of its own: what the MoE already has.
    defaults = [
        f"{flag}: {f.metadata['default_help']}"
        for flag, f in shared.items()
        if f.metadata["default_help"] != merge_fields[f.name].metadata["default_help"]
    ]
    edit = p.add_argument_group(
        "editing a finished MoE (with --out)",
        f"{', '.join(shared)} and --router-data apply too, with these defaults: {'; '.join(defaults)}.",
    )
    edit.add_argument("--into", metavar="MOE", help="the MoE to grow or shrink (btx's, or any MoE btx reads)")
    edit.add_argument(
        "--add-expert",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="a dense expert trained from the MoE's seed, added as one more expert; repeat",
    )
    edit.add_argument(
        "--remove-expert",
        action="append",
        default=[],
        metavar="NAME",
        help="an expert to remove, with its router rows (FlexOlmo's opt-out); repeat",
    )
    add_flags(edit, EditOptions, skip=merge_fields)
    edit.add_argument(
        "--allow-foreign",
        action="store_true",
        help="add an expert even if nothing shows it was trained from the MoE's seed",
    )


# What only a merge of dense experts, or only an edit of an MoE, takes besides its own settings.
_MERGE_INPUTS = {"seed": "--seed", "expert": "--expert", "recipe": "RECIPE"}
_EDIT_INPUTS = {"add_expert": "--add-expert", "remove_expert": "--remove-expert", "allow_foreign": "--allow-foreign"}


def _given_only(args: argparse.Namespace, inputs: dict[str, str], own: type, other: type) -> list[str]:
    """The flags the command line gave among `inputs` and the settings of `own` that `other` lacks."""
    theirs = {f.name for f in dataclasses.fields(other)}
    named = [flag for dest, flag in inputs.items() if getattr(args, dest, None) not in (None, False, [])]
    return named + [
        flag for flag, f in flags(own).items() if f.name not in theirs and getattr(args, f.name) is not None
    ]


def cmd_merge(args: argparse.Namespace) -> int:
    from btx.io.startup import checkpoint_files, quick_import, readahead

    if args.into is not None:
        clash = _given_only(args, _MERGE_INPUTS, MergeOptions, EditOptions)
        if clash:
            raise BtxError(f"merge --into: {clash[0]} belongs to a merge of dense experts, not to editing an MoE")
        readahead(checkpoint_files([args.into, *(e.partition("=")[2] for e in args.add_expert)]))
        with quick_import():
            from btx.mix.grow import edit_command
        return edit_command(args)
    given = _given_only(args, _EDIT_INPUTS, EditOptions, MergeOptions)
    if given:
        raise BtxError(f"merge: {given[0]} edits a finished MoE: give --into MOE")
    # A merge is mostly I/O: have the disk read the inputs while torch is imported.
    readahead(checkpoint_files(merge_inputs(args)))
    with quick_import():
        from btx.mix.merge import merge_command

    return merge_command(args)


def merge_inputs(args: argparse.Namespace) -> list[str]:
    """The merge's input checkpoint directories, as far as they can be known before it runs."""
    if args.recipe is None:
        return [d for d in (args.seed, *(e.partition("=")[2] for e in args.expert)) if d]
    from btx.recipe.load import load_experiment

    try:
        exp = load_experiment(args.recipe, args.overrides)
    except BtxError:
        return []  # the merge reports it
    return [exp.seed_dir, *(exp.expert_dir(d) / "final" for d in exp.merged_domains)]
