"""The `btx` command line: one thin map from command name to a plain function.

The small commands are declared here; `btx merge` is btx/cli/merge.py, `btx eval` and `btx analyze`
btx/cli/evaluate.py, and what they share btx/cli/common.py.

Adding a command
    1. write `def add_<name>_arguments(p: argparse.ArgumentParser)` and `def cmd_<name>(args) -> int | None`
       here or in a module of this package (import the heavy modules inside `cmd_<name>`, so `btx --help`
       stays instant: the imports inside functions in this package are lazy for that reason);
    2. add one entry to COMMANDS: `"<name>": Command(cmd_<name>, "<one-line help>", add_<name>_arguments)`.
    tests/test_cli.py then checks that the parser and the map agree and that `btx <name> --help` works.

Errors: a BtxError (bad recipe, data, checkpoint or flag) prints `btx: error: <message>` on one line
to stderr and exits 2; `--debug` prints the traceback too. Ctrl-C exits 130 with a one-line note.
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import signal
import sys
import traceback

from btx import __version__
from btx.choices import EXECUTORS
from btx.cli.common import Command, add_recipe_arguments, console, load_experiment_args
from btx.cli.evaluate import (
    add_analyze_arguments,
    add_eval_arguments,
    cmd_analyze,
    cmd_eval,
)
from btx.cli.merge import add_merge_arguments, cmd_merge
from btx.cli.plan import add_plan_arguments, cmd_plan
from btx.errors import BtxError, Terminated

# ---------------------------------------------------------------------------------------------
# btx prepare
# ---------------------------------------------------------------------------------------------


def add_prepare_arguments(p: argparse.ArgumentParser) -> None:
    add_recipe_arguments(p, required=False)
    p.add_argument("--force", action="store_true", help="re-tokenize domains whose shards are up to date")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help="tokenizer processes per domain (default: prepare.workers, else 1); the shards are the same for any N",
    )
    adhoc = p.add_argument_group("without a recipe")
    adhoc.add_argument(
        "--domain",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="a domain and one of its sources: a text, .jsonl(.gz/.zst), .parquet or .arrow file, a directory "
        "(a datasets save_to_disk one too), a glob, hf:NAME[:CONFIG][@SPLIT] or builtin:CORPUS; repeat for more",
    )
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
        summaries = prepare_experiment(exp, force=args.force, progress=not args.quiet, workers=args.workers)
    else:
        if args.overrides:
            raise BtxError(f"prepare: overrides ({args.overrides[0]}) need a RECIPE")
        if not args.domain:
            raise BtxError("prepare: give a RECIPE, or --domain NAME=PATH with --out DIR")
        if not args.out:
            raise BtxError("prepare: --domain needs --out DIR")
        summaries = prepare_adhoc(
            parse_domain_specs(args.domain),
            args.tokenizer or "byte",
            args.out,
            val_fraction=args.val_fraction,
            seed=args.seed,
            text_field=args.text_field,
            force=args.force,
            progress=not args.quiet,
            workers=args.workers or 1,
        )
    console().print(summary_table(summaries))
    return 0


# ---------------------------------------------------------------------------------------------
# btx train
# ---------------------------------------------------------------------------------------------


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", metavar="RECIPE", help="experiment recipe (YAML)")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument(
        "--domain", metavar="NAME", help="train the expert of domain NAME from the seed into <run_dir>/experts/NAME/"
    )
    target.add_argument(
        "--seed",
        action="store_true",
        help="train the seed from scratch (the recipe's model: section) on the domain mixture into <run_dir>/seed/",
    )
    p.add_argument(
        "overrides", metavar="KEY=VALUE", nargs="*", help="recipe overrides, e.g. train.steps=20 train.lr=3e-4"
    )
    p.add_argument(
        "--force", action="store_true", help="discard this job's checkpoints, metrics and export; train from the start"
    )


def cmd_train(args: argparse.Namespace) -> int:
    from btx.train.loop import train_command

    return train_command(args)


# ---------------------------------------------------------------------------------------------
# btx finetune
# ---------------------------------------------------------------------------------------------


def add_finetune_arguments(p: argparse.ArgumentParser) -> None:
    add_recipe_arguments(p)
    p.add_argument(
        "--model",
        metavar="DIR",
        default=None,
        help="the MoE checkpoint to finetune (default: <run_dir>/merged, which needs its DONE.json)",
    )
    p.add_argument(
        "--out",
        metavar="DIR",
        default=None,
        help="where the finetuned MoE checkpoint goes (default: <run_dir>/finetuned); its "
        "checkpoints and metrics then go to DIR-train/",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="discard the finetune's checkpoints, metrics and export; train from the start",
    )


def cmd_finetune(args: argparse.Namespace) -> int:
    from btx.train.finetune import finetune_command

    return finetune_command(args)


# ---------------------------------------------------------------------------------------------
# btx export
# ---------------------------------------------------------------------------------------------


def add_export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "checkpoint",
        metavar="CHECKPOINT_DIR",
        help="a training checkpoint (<job>/ckpt/step-N/ of btx train, btx finetune or btx run, either "
        "engine, any ZeRO stage), or a job directory (its newest checkpoint)",
    )
    p.add_argument(
        "--out", metavar="DIR", required=True, help="the HF checkpoint to write, in the form of the job's final export"
    )
    p.add_argument("--force", action="store_true", help="replace DIR if it exists")


def cmd_export(args: argparse.Namespace) -> int:
    from btx.train.checkpoint_export import export_command

    return export_command(args)


# ---------------------------------------------------------------------------------------------
# btx branch / btx status
# ---------------------------------------------------------------------------------------------


def add_branch_arguments(p: argparse.ArgumentParser) -> None:
    add_recipe_arguments(p)
    p.add_argument(
        "--executor",
        choices=EXECUTORS,
        default=None,
        help="local: subprocesses on this machine; slurm: one sbatch script per expert "
        "(default: the recipe's branch.executor)",
    )
    p.add_argument(
        "--max-parallel",
        type=int,
        default=None,
        metavar="N",
        help="local: at most N jobs at a time (default: branch.max_parallel, else one per "
        "group of devices_per_expert GPUs, one at a time on CPU)",
    )
    p.add_argument("--dry-run", action="store_true", help="print the commands / sbatch scripts; run nothing")
    p.add_argument("--only", nargs="+", default=None, metavar="DOMAIN", help="only these experts")


def cmd_branch(args: argparse.Namespace) -> int:
    from btx.run.branch import branch

    # `--only a b key=value` takes the override too (argparse cannot tell them apart); domain names
    # never contain '=', so hand those back to the overrides.
    only = [d for d in args.only or [] if "=" not in d] or None
    overrides = [*args.overrides, *(d for d in args.only or [] if "=" in d)]
    return branch(
        args.recipe, overrides, executor=args.executor, max_parallel=args.max_parallel, dry_run=args.dry_run, only=only
    )


def add_status_arguments(p: argparse.ArgumentParser) -> None:
    add_recipe_arguments(p)
    p.add_argument("--watch", action="store_true", help="refresh live until every expert is done (Ctrl-C leaves)")


def cmd_status(args: argparse.Namespace) -> int:
    from btx.run.branch import status

    return status(args.recipe, args.overrides, watch=args.watch)


# ---------------------------------------------------------------------------------------------
# The command map and the parser
# ---------------------------------------------------------------------------------------------

# ---------------------------------------------------------------------------------------------
# btx run
# ---------------------------------------------------------------------------------------------


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    add_recipe_arguments(p, required=False)
    p.add_argument(
        "--until",
        metavar="STAGE",
        default=None,
        help="stop after STAGE (prepare, seed, branch, merge, finetune, baselines, eval, analyze)",
    )
    p.add_argument(
        "--from",
        dest="from_stage",
        metavar="STAGE",
        default=None,
        help="redo STAGE and everything after it, even if finished",
    )


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
    "prepare": Command(
        cmd_prepare, "tokenize each domain's text/jsonl into train/val token shards", add_prepare_arguments
    ),
    "train": Command(
        cmd_train,
        "train a domain expert from the seed (--domain NAME), or the demo's seed (--seed); resumes by itself",
        add_train_arguments,
    ),
    "finetune": Command(
        cmd_finetune,
        "MoE finetuning of the merged checkpoint on the domain mixture (DeepSpeed "
        "ZeRO 0-3; routing mode, balancing loss and freezing from the recipe); resumes by itself",
        add_finetune_arguments,
    ),
    "export": Command(
        cmd_export,
        "write any training checkpoint (either engine, any ZeRO stage) as an HF checkpoint, in the form "
        "of the job's final export",
        add_export_arguments,
    ),
    "analyze": Command(
        cmd_analyze, "routing analysis: which expert each domain's tokens go to, layer by layer", add_analyze_arguments
    ),
    "branch": Command(
        cmd_branch, "train one expert per domain from the seed (local jobs or Slurm); resumable", add_branch_arguments
    ),
    "status": Command(
        cmd_status, "where every expert job stands: state, step, loss, tokens/s, ETA", add_status_arguments
    ),
    "merge": Command(
        cmd_merge,
        "seed + domain experts -> one MoE checkpoint (FFNs become experts, the rest "
        "averaged, new routers); --into grows or shrinks a finished MoE",
        add_merge_arguments,
    ),
    "eval": Command(
        cmd_eval,
        "per-domain validation loss/perplexity of checkpoints, with the BTM ensemble and baselines",
        add_eval_arguments,
    ),
    "run": Command(
        cmd_run,
        "the whole pipeline from one recipe (prepare, seed, branch, merge, finetune, "
        "baselines, eval, analyze); skips finished stages; alone it runs the embedded CPU demo",
        add_run_arguments,
    ),
    "plan": Command(
        cmd_plan,
        "compute, memory per GPU and wall time of a recipe on a named cluster, with what to change "
        "when a stage does not fit",
        add_plan_arguments,
    ),
    "recipes": Command(
        cmd_recipes, "list the recipes btx ships (run one by name: btx run demo)", add_recipes_arguments
    ),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, like every other btx error
        # argparse names the optional KEY=VALUE list too when RECIPE is missing; only RECIPE is required
        message = message.replace(
            "required: RECIPE, KEY=VALUE",
            "required: RECIPE (a recipe file, or a built-in recipe's name such as demo: see `btx recipes`)",
        )
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
        p.add_argument(
            "--debug", action="store_true", default=argparse.SUPPRESS, help="show the full traceback on errors"
        )
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
    previous = signal.getsignal(signal.SIGTERM)
    if previous == signal.SIG_DFL:  # an inherited ignore, or a caller's handler, is kept
        signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        status = args._run(args)
    except BtxError as e:
        if args.debug:
            traceback.print_exc()
        print(f"btx: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except Terminated:
        if args.debug:
            traceback.print_exc()
        print(
            f"btx: terminated ({args.command} stopped by SIGTERM; finished work is kept, re-run to continue)",
            file=sys.stderr,
        )
        return 128 + signal.SIGTERM
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
    finally:
        if previous == signal.SIG_DFL:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
    return int(status or 0)


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


if __name__ == "__main__":
    sys.exit(main())
