"""The `btx` command line: one thin map from command name to a plain function.

Adding a command
    1. write `def add_<name>_arguments(p: argparse.ArgumentParser)` and `def cmd_<name>(args) -> int | None`
       (import the heavy modules inside `cmd_<name>`, so `btx --help` stays instant);
    2. add one entry to COMMANDS: `"<name>": Command(cmd_<name>, "<one-line help>", add_<name>_arguments)`.
    tests/test_cli.py then checks that the parser and the map agree and that `btx <name> --help` works.

Errors: a BtxError (bad recipe, data, checkpoint or flag) prints `btx: error: <message>` on one line
to stderr and exits 2; `--debug` prints the traceback too. Ctrl-C exits 130 with a one-line note.
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import traceback
from dataclasses import dataclass
from typing import Callable

from btx import __version__
from btx.choices import EXECUTORS, WEIGHT_DTYPES
from btx.errors import BtxError
from btx.mix.options import EditOptions, MergeOptions
from btx.recipe.settings import FlagAction, add_flags, add_renamed, flags


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
    p.add_argument("recipe", metavar="RECIPE", nargs=None if required else "?",
                   help="experiment recipe (a YAML file, or the name of a built-in one: see `btx recipes`)")
    p.add_argument("overrides", metavar="KEY=VALUE", nargs="*",
                   help="recipe overrides in OmegaConf dotlist form, e.g. merge.top_k=1 train.steps=20")


def load_experiment_args(args: argparse.Namespace):
    from btx.recipe.load import load_experiment

    return load_experiment(args.recipe, args.overrides)


def console():
    from rich.console import Console

    return Console()


# ---------------------------------------------------------------------------------------------
# btx prepare
# ---------------------------------------------------------------------------------------------


def add_prepare_arguments(p: argparse.ArgumentParser) -> None:
    add_recipe_arguments(p, required=False)
    p.add_argument("--force", action="store_true", help="re-tokenize domains whose shards are up to date")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    adhoc = p.add_argument_group("without a recipe")
    adhoc.add_argument("--domain", action="append", default=[], metavar="NAME=PATH",
                       help="a domain and one of its sources: a text file, a .jsonl file, a directory, "
                            "or builtin:CORPUS; repeat for more sources or domains")
    adhoc.add_argument("--tokenizer", default=None, help="'byte' (default) or a tokenizer.json / directory")
    adhoc.add_argument("--out", default=None, metavar="DIR", help="output directory (one subdirectory per domain)")
    adhoc.add_argument("--val-fraction", type=float, default=0.05, help="share of documents held out (default 0.05)")
    adhoc.add_argument("--text-field", default="text", help="jsonl field holding the text (default: text)")
    adhoc.add_argument("--seed", type=int, default=0, help="keys the train/val split (default 0)")


def cmd_prepare(args: argparse.Namespace) -> int:
    from btx.run.prepare import (
        parse_domain_specs,
        prepare_adhoc,
        prepare_experiment,
        summary_table,
    )

    if args.recipe is not None:
        if args.domain or args.out or args.tokenizer:
            raise BtxError("prepare: give a RECIPE or --domain/--tokenizer/--out, not both")
        exp = load_experiment_args(args)
        summaries = prepare_experiment(exp, force=args.force, progress=not args.quiet)
    else:
        if args.overrides:
            raise BtxError(f"prepare: overrides ({args.overrides[0]}) need a RECIPE")
        if not args.domain:
            raise BtxError("prepare: give a RECIPE, or --domain NAME=PATH with --out DIR")
        if not args.out:
            raise BtxError("prepare: --domain needs --out DIR")
        summaries = prepare_adhoc(parse_domain_specs(args.domain), args.tokenizer or "byte", args.out,
                                  val_fraction=args.val_fraction, seed=args.seed, text_field=args.text_field,
                                  force=args.force, progress=not args.quiet)
    console().print(summary_table(summaries))
    return 0


# ---------------------------------------------------------------------------------------------
# btx analyze
# ---------------------------------------------------------------------------------------------


def add_analyze_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", metavar="CHECKPOINT|RECIPE", nargs="?",
                   help="an MoE checkpoint directory (any MoE form btx reads; with --data), or an experiment recipe "
                        "(its finetuned or merged model on its domains' validation shards -> <run_dir>/analysis/)")
    p.add_argument("overrides", metavar="KEY=VALUE", nargs="*", help="recipe overrides, e.g. analyze.tokens=4096")
    p.add_argument("--data", action="append", default=[], metavar="DOMAIN=PATH",
                   help="a domain's data: a btx token shard (.bin/.json, or a prepared domain directory), a text "
                        "or .jsonl file, or builtin:CORPUS; repeat per domain")
    p.add_argument("--tokens", type=int, default=None, help="tokens per domain (default 65536; recipe: analyze.tokens)")
    p.add_argument("--seq-len", type=int, default=None, help="window length (default: the model's, at most 1024)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward (default 8)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="output directory (default ./analysis-<checkpoint name>; recipe: <run_dir>/analysis)")
    p.add_argument("--show-text", type=int, nargs="?", const=1, default=0, metavar="N",
                   help="print N sample(s) per domain with each token coloured by its top-1 expert")
    p.add_argument("--layer", type=int, default=None, help="MoE layer for --show-text (default: the middle one)")
    p.add_argument("--compare", nargs="+", default=None, metavar="CKPT",
                   help="--compare B: CHECKPOINT (A) and B side by side; or --compare A B without CHECKPOINT")
    p.add_argument("--metric", default="load_share", choices=("load_share", "top1_frac", "topk_frac", "mean_prob"),
                   help="what heatmaps show (default load_share: share of routed slots)")
    p.add_argument("--experts", default=None, metavar="NAMES",
                   help="comma-separated expert names (default: the merge's DONE.json, else e0, e1, ...)")
    p.add_argument("--tokenizer", default=None, help="tokenizer for text data (default: the checkpoint's)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--dtype", default="auto", choices=("auto", *WEIGHT_DTYPES),
                   help="weights dtype (default: float32 on CPU, the checkpoint's on GPU)")


def cmd_analyze(args: argparse.Namespace) -> int:
    from btx.evaluate.routing_report import run_analyze

    return run_analyze(args)


# ---------------------------------------------------------------------------------------------
# btx train
# ---------------------------------------------------------------------------------------------


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", metavar="RECIPE", help="experiment recipe (YAML)")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--domain", metavar="NAME",
                        help="train the expert of domain NAME from the seed into <run_dir>/experts/NAME/")
    target.add_argument("--seed", action="store_true",
                        help="train the seed from scratch (the recipe's model: section) on the domain mixture "
                             "into <run_dir>/seed/")
    p.add_argument("overrides", metavar="KEY=VALUE", nargs="*",
                   help="recipe overrides, e.g. train.steps=20 train.lr=3e-4")
    p.add_argument("--force", action="store_true",
                   help="discard this job's checkpoints, metrics and export; train from the start")


def cmd_train(args: argparse.Namespace) -> int:
    from btx.train.loop import train_command

    return train_command(args)


# ---------------------------------------------------------------------------------------------
# btx finetune
# ---------------------------------------------------------------------------------------------


def add_finetune_arguments(p: argparse.ArgumentParser) -> None:
    add_recipe_arguments(p)
    p.add_argument("--model", metavar="DIR", default=None,
                   help="the MoE checkpoint to finetune (default: <run_dir>/merged, which needs its DONE.json)")
    p.add_argument("--out", metavar="DIR", default=None,
                   help="where the finetuned MoE checkpoint goes (default: <run_dir>/finetuned); its "
                        "checkpoints and metrics then go to DIR-train/")
    p.add_argument("--force", action="store_true",
                   help="discard the finetune's checkpoints, metrics and export; train from the start")


def cmd_finetune(args: argparse.Namespace) -> int:
    from btx.train.finetune import finetune_command

    return finetune_command(args)


# ---------------------------------------------------------------------------------------------
# btx branch / btx status
# ---------------------------------------------------------------------------------------------


def add_branch_arguments(p: argparse.ArgumentParser) -> None:
    add_recipe_arguments(p)
    p.add_argument("--executor", choices=EXECUTORS, default=None,
                   help="local: subprocesses on this machine; slurm: one sbatch script per expert "
                        "(default: the recipe's branch.executor)")
    p.add_argument("--max-parallel", type=int, default=None, metavar="N",
                   help="local: at most N jobs at a time (default: branch.max_parallel, else one per "
                        "group of devices_per_expert GPUs, one at a time on CPU)")
    p.add_argument("--dry-run", action="store_true", help="print the commands / sbatch scripts; run nothing")
    p.add_argument("--only", nargs="+", default=None, metavar="DOMAIN", help="only these experts")


def cmd_branch(args: argparse.Namespace) -> int:
    from btx.run.branch import branch

    # `--only a b key=value` takes the override too (argparse cannot tell them apart); domain names
    # never contain '=', so hand those back to the overrides.
    only = [d for d in args.only or [] if "=" not in d] or None
    overrides = [*args.overrides, *(d for d in args.only or [] if "=" in d)]
    return branch(args.recipe, overrides, executor=args.executor, max_parallel=args.max_parallel,
                  dry_run=args.dry_run, only=only)


def add_status_arguments(p: argparse.ArgumentParser) -> None:
    add_recipe_arguments(p)
    p.add_argument("--watch", action="store_true", help="refresh live until every expert is done (Ctrl-C leaves)")


def cmd_status(args: argparse.Namespace) -> int:
    from btx.run.branch import status

    return status(args.recipe, args.overrides, watch=args.watch)


# ---------------------------------------------------------------------------------------------
# btx merge
# ---------------------------------------------------------------------------------------------


def add_merge_arguments(p: argparse.ArgumentParser) -> None:
    add_recipe_arguments(p, required=False)
    p.add_argument("--force", action="store_true", help="replace an existing output checkpoint")
    p.add_argument("--allow-no-manifest", action="store_true",
                   help="accept experts without a DONE.json: external checkpoints, or a job you know is finished "
                        "(their weights are still fully checked)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    adhoc = p.add_argument_group("without a recipe (a recipe takes these as merge.* overrides)")
    adhoc.add_argument("--seed", metavar="DIR", help="the dense seed checkpoint the experts were branched from")
    adhoc.add_argument("--expert", action="append", default=[], metavar="NAME=DIR",
                       help="a domain expert (a checkpoint, or a branch job's directory); repeat, in expert order")
    adhoc.add_argument("--out", metavar="DIR", help="output directory of the MoE checkpoint")
    add_renamed(adhoc, "--router-data", "--centroid-data", dest="router_data", action=FlagAction, repeat=True,
                default=[], metavar="NAME=SHARD",
                help="validation shard of domain NAME for centroid and ridge routers (default: "
                     "<run_dir>/data/NAME/val.bin when the expert sits in a btx run directory)")
    add_flags(adhoc, MergeOptions)  # every field of MergeOptions is a flag (btx/recipe/settings.py)
    merge_fields = {f.name: f for f in dataclasses.fields(MergeOptions)}
    shared = {flag: f for flag, f in flags(EditOptions).items() if f.name in merge_fields}
    # The defaults an edit has of its own: what the MoE already has.
    defaults = [f"{flag}: {f.metadata['default_help']}" for flag, f in shared.items()
                if f.metadata["default_help"] != merge_fields[f.name].metadata["default_help"]]
    edit = p.add_argument_group("editing a finished MoE (with --out)",
                                f"{', '.join(shared)} and --router-data apply too, with these defaults: "
                                f"{'; '.join(defaults)}.")
    edit.add_argument("--into", metavar="MOE", help="the MoE to grow or shrink (btx's, or any MoE btx reads)")
    edit.add_argument("--add-expert", action="append", default=[], metavar="NAME=DIR",
                      help="a dense expert trained from the MoE's seed, added as one more expert; repeat")
    edit.add_argument("--remove-expert", action="append", default=[], metavar="NAME",
                      help="an expert to remove, with its router rows (FlexOlmo's opt-out); repeat")
    add_flags(edit, EditOptions, skip=merge_fields)
    edit.add_argument("--allow-foreign", action="store_true",
                      help="add an expert even if nothing shows it was trained from the MoE's seed")


# What only a merge of dense experts, or only an edit of an MoE, takes besides its own settings.
_MERGE_INPUTS = {"seed": "--seed", "expert": "--expert", "recipe": "RECIPE"}
_EDIT_INPUTS = {"add_expert": "--add-expert", "remove_expert": "--remove-expert", "allow_foreign": "--allow-foreign"}


def _given_only(args: argparse.Namespace, inputs: dict[str, str], own: type, other: type) -> list[str]:
    """The flags the command line gave among `inputs` and the settings of `own` that `other` lacks."""
    theirs = {f.name for f in dataclasses.fields(other)}
    named = [flag for dest, flag in inputs.items() if getattr(args, dest, None) not in (None, False, [])]
    return named + [flag for flag, f in flags(own).items()
                    if f.name not in theirs and getattr(args, f.name) is not None]


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
    readahead(checkpoint_files(_merge_inputs(args)))
    with quick_import():
        from btx.mix.merge import merge_command

    return merge_command(args)


def _merge_inputs(args: argparse.Namespace) -> list[str]:
    """The merge's input checkpoint directories, as far as they can be known before it runs."""
    if args.recipe is None:
        return [d for d in (args.seed, *(e.partition("=")[2] for e in args.expert)) if d]
    from btx.recipe.load import load_experiment

    try:
        exp = load_experiment(args.recipe, args.overrides)
    except BtxError:
        return []  # the merge reports it
    return [exp.seed_dir, *(exp.expert_dir(d) / "final" for d in exp.merged_domains)]


# ---------------------------------------------------------------------------------------------
# btx eval
# ---------------------------------------------------------------------------------------------


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", metavar="RECIPE|CKPT", nargs="?",
                   help="an experiment recipe (every model of its run that exists, on its domains' validation "
                        "shards -> <run_dir>/eval/), or checkpoint directories (dense or MoE, any family; with --data)")
    p.add_argument("overrides", metavar="KEY=VALUE|CKPT", nargs="*",
                   help="recipe overrides (eval.batches=20), or more checkpoints")
    p.add_argument("--data", action="append", default=[], metavar="DOMAIN=SHARD",
                   help="a domain's validation shard (btx .bin/.json, or a prepared domain directory); repeat per "
                        "domain")
    p.add_argument("--btm", nargs="+", default=None, metavar="CKPT",
                   help="add a BTM ensemble row: these expert checkpoints mixed by the domain posterior")
    p.add_argument("--names", default=None, metavar="A,B,...",
                   help="row names of the checkpoints (default: directory names)")
    p.add_argument("--batches", type=int, default=None, help="batches per domain (default 50; recipe: eval.batches)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="windows per batch (default 8; recipe: eval.batch_size)")
    p.add_argument("--seq-len", type=int, default=None,
                   help="window length (default: the models' max_position_embeddings, at most 1024; recipe: "
                        "eval.seq_len)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="output directory for eval.md/eval.json (default ./eval; recipe: <run_dir>/eval)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (checkpoints; default: cuda when available)")
    p.add_argument("--dtype", default="auto", choices=("auto", *WEIGHT_DTYPES),
                   help="weights dtype (default: float32 on CPU, the checkpoint's on GPU)")
    p.add_argument("--force", action="store_true",
                   help="recipe: evaluate the run's models even when one no longer follows from its inputs "
                        "(e.g. a finetune of an earlier merge)")
    p.add_argument("--router-inits", nargs="?", const="", default=None, metavar="A,B,...",
                   help="recipe: the merged-without-finetune loss of each router init side by side (default: "
                        "random,zeros,centroid,ridge,hidden), merged into <run_dir>/router-inits/")


def cmd_eval(args: argparse.Namespace) -> int:
    from btx.recipe.builtin import resolve_recipe

    if args.router_inits is not None:
        from btx.recipe.load import load_experiment
        from btx.run.router_inits import parse_inits, router_init_table

        inits = parse_inits(args.router_inits)
        if args.target is None or not resolve_recipe(args.target).is_file():
            raise BtxError("eval --router-inits: give an experiment RECIPE (its run's seed and experts are merged)")
        router_init_table(load_experiment(args.target, list(args.overrides or [])), inits)
        return 0

    target = args.target
    if target is not None and (resolve_recipe(target).is_file() or target.endswith((".yaml", ".yml"))):
        from btx.run.evaluation import eval_recipe_command

        return eval_recipe_command(args)
    from btx.evaluate.checkpoints import eval_checkpoints_command

    return eval_checkpoints_command(args)


# ---------------------------------------------------------------------------------------------
# The command map and the parser
# ---------------------------------------------------------------------------------------------

# ---------------------------------------------------------------------------------------------
# btx run
# ---------------------------------------------------------------------------------------------


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    add_recipe_arguments(p, required=False)
    p.add_argument("--until", metavar="STAGE", default=None,
                   help="stop after STAGE (prepare, seed, branch, merge, finetune, baselines, eval, analyze)")
    p.add_argument("--from", dest="from_stage", metavar="STAGE", default=None,
                   help="redo STAGE and everything after it, even if finished")


def cmd_run(args: argparse.Namespace) -> int:
    from btx.run.pipeline import run

    recipe, overrides = args.recipe, list(args.overrides)
    if recipe is not None and "=" in recipe and not recipe.endswith((".yaml", ".yml")):
        recipe, overrides = None, [recipe, *overrides]  # `btx run k=v`: overrides of the demo
    return run(recipe, overrides, until=args.until, from_stage=args.from_stage)


# ---------------------------------------------------------------------------------------------
# btx recipes
# ---------------------------------------------------------------------------------------------


def add_recipes_arguments(p: argparse.ArgumentParser) -> None:
    pass


def cmd_recipes(args: argparse.Namespace) -> int:
    from rich.markup import escape

    from btx.recipe.builtin import builtin_recipes, builtin_recipes_dir
    from btx.ui.tables import Column, FitTable

    rows = [[escape(name), escape(what)] for name, what in builtin_recipes().items()]
    title = escape(f"built-in recipes ({builtin_recipes_dir()})")
    console().print(FitTable([Column("name", "label"), Column("what it is", "text")], rows, title=title))
    console().print("Run one by name, e.g. `btx run demo`; copy its directory to make your own.")
    return 0


COMMANDS: dict[str, Command] = {
    "prepare": Command(cmd_prepare, "tokenize each domain's text/jsonl into train/val token shards",
                       add_prepare_arguments),
    "train": Command(cmd_train, "train a domain expert from the seed (--domain NAME), or the demo's seed (--seed); "
                     "resumes by itself", add_train_arguments),
    "finetune": Command(cmd_finetune, "MoE finetuning of the merged checkpoint on the domain mixture (DeepSpeed "
                        "ZeRO 0-3; routing mode, balancing loss and freezing from the recipe); resumes by itself",
                        add_finetune_arguments),
    "analyze": Command(cmd_analyze, "routing analysis: which expert each domain's tokens go to, layer by layer",
                       add_analyze_arguments),
    "branch": Command(cmd_branch, "train one expert per domain from the seed (local jobs or Slurm); resumable",
                      add_branch_arguments),
    "status": Command(cmd_status, "where every expert job stands: state, step, loss, tokens/s, ETA",
                      add_status_arguments),
    "merge": Command(cmd_merge, "seed + domain experts -> one MoE checkpoint (FFNs become experts, the rest "
                     "averaged, new routers); --into grows or shrinks a finished MoE", add_merge_arguments),
    "eval": Command(cmd_eval, "per-domain validation loss/perplexity of checkpoints, with the BTM ensemble and "
                    "baselines", add_eval_arguments),
    "run": Command(cmd_run, "the whole pipeline from one recipe (prepare, seed, branch, merge, finetune, "
                   "baselines, eval, analyze); skips finished stages; alone it runs the embedded CPU demo",
                   add_run_arguments),
    "recipes": Command(cmd_recipes, "list the recipes btx ships (run one by name: btx run demo)",
                       add_recipes_arguments),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, like every other btx error
        # argparse names the optional KEY=VALUE list too when RECIPE is missing; only RECIPE is required
        message = message.replace("required: RECIPE, KEY=VALUE", "required: RECIPE (a recipe file, or a built-in "
                                  "recipe's name such as demo: see `btx recipes`)")
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="btx",
        description="Branch-Train-MiX: branch a dense seed into domain experts, mix them into an "
                    "MoE (Mixtral, Qwen2-MoE, Qwen3-MoE, FlexOlmo, ...), finetune its routing, evaluate and "
                    "analyse it.",
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    parser.add_argument("--version", action="version", version=f"btx {__version__}")
    # The `deepspeed` launcher passes --local_rank=N before the command; ranks come from LOCAL_RANK.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands", parser_class=_Parser)
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.help, description=command.help)
        # --debug is accepted after the command too; SUPPRESS keeps `btx --debug CMD` from being reset.
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the full traceback on errors")
        command.add_arguments(p)
        p.set_defaults(_run=command.run)
    return parser


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def parse_args(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    """The command line as `main` reads it (argparse errors exit 2 with one line)."""
    parser = parser or build_parser()
    # argparse fills a `nargs="*"` positional in one go, so in `btx train RECIPE --domain code
    # train.steps=5` the overrides after the option would be "unrecognized". Collect them here.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*(args.overrides or []), *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse_args(argv, parser)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        status = args._run(args)
    except BtxError as e:
        if args.debug:
            traceback.print_exc()
        print(f"btx: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.debug:
            traceback.print_exc()
        print(f"btx: interrupted ({args.command} stopped; finished work is kept, re-run to continue)", file=sys.stderr)
        return 130
    except OSError as e:  # a full, read-only or forbidden destination is bad input too
        from btx.io.disk import disk_error_message

        message = disk_error_message(e)
        if message is None:
            raise
        if args.debug:
            traceback.print_exc()
        print(f"btx: error: {_one_line(message)}", file=sys.stderr)
        return 2
    return int(status or 0)


if __name__ == "__main__":
    sys.exit(main())
