"""`btx eval` and `btx analyze`: the loss table of checkpoints or of a run, and the routing analysis."""

from __future__ import annotations

import argparse

from btx.errors import BtxError
from btx.recipe.schema import DEVICE_KEYS, EvalSection
from btx.recipe.settings import add_flags, given

# ---------------------------------------------------------------------------------------------
# btx analyze
# ---------------------------------------------------------------------------------------------


def add_analyze_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "target",
        metavar="CHECKPOINT|RECIPE",
        nargs="?",
        help="an MoE checkpoint directory (any MoE form btx reads; with --data), or an experiment recipe "
        "(its finetuned or merged model on its domains' validation shards -> <run_dir>/analysis/)",
    )
    p.add_argument("overrides", metavar="KEY=VALUE", nargs="*", help="recipe overrides, e.g. analyze.tokens=4096")
    p.add_argument(
        "--data",
        action="append",
        default=[],
        metavar="DOMAIN=PATH",
        help="a domain's data: a btx token shard (.bin/.json, or a prepared domain directory), a text "
        "or .jsonl file, or builtin:CORPUS; repeat per domain",
    )
    p.add_argument("--tokens", type=int, default=None, help="tokens per domain (default 65536; recipe: analyze.tokens)")
    p.add_argument("--seq-len", type=int, default=None, help="window length (default: the model's, at most 1024)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward (default 8)")
    p.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="output directory (default ./analysis-<checkpoint name>; recipe: <run_dir>/analysis)",
    )
    p.add_argument(
        "--show-text",
        type=int,
        nargs="?",
        const=1,
        default=0,
        metavar="N",
        help="print N sample(s) per domain with each token coloured by its top-1 expert",
    )
    p.add_argument("--layer", type=int, default=None, help="MoE layer for --show-text (default: the middle one)")
    p.add_argument(
        "--compare",
        nargs="+",
        default=None,
        metavar="CKPT",
        help="--compare B: CHECKPOINT (A) and B side by side; or --compare A B without CHECKPOINT",
    )
    p.add_argument(
        "--metric",
        default="load_share",
        choices=("load_share", "top1_frac", "topk_frac", "mean_prob"),
        help="what heatmaps show (default load_share: share of routed slots)",
    )
    p.add_argument(
        "--experts",
        default=None,
        metavar="NAMES",
        help="comma-separated expert names (default: the merge's DONE.json, else e0, e1, ...)",
    )
    p.add_argument("--tokenizer", default=None, help="tokenizer for text data (default: the checkpoint's)")
    add_flags(p, EvalSection, only=DEVICE_KEYS)  # a RECIPE's eval.device and eval.dtype


def cmd_analyze(args: argparse.Namespace) -> int:
    from btx.evaluate.analyze import run_analyze

    return run_analyze(args)


# ---------------------------------------------------------------------------------------------
# btx eval
# ---------------------------------------------------------------------------------------------


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "target",
        metavar="RECIPE|CKPT",
        nargs="?",
        help="an experiment recipe (every model of its run that exists, on its domains' validation "
        "shards -> <run_dir>/eval/), or checkpoint directories (dense or MoE, any family; with --data)",
    )
    p.add_argument(
        "overrides", metavar="KEY=VALUE|CKPT", nargs="*", help="recipe overrides (eval.batches=20), or more checkpoints"
    )
    p.add_argument(
        "--data",
        action="append",
        default=[],
        metavar="DOMAIN=SHARD",
        help="a domain's validation shard (btx .bin/.json, or a prepared domain directory); repeat per domain",
    )
    p.add_argument(
        "--btm",
        nargs="+",
        default=None,
        metavar="CKPT",
        help="add a BTM ensemble row: these expert checkpoints mixed by the domain posterior",
    )
    p.add_argument(
        "--names", default=None, metavar="A,B,...", help="row names of the checkpoints (default: directory names)"
    )
    p.add_argument("--batches", type=int, default=None, help="batches per domain (default 50; recipe: eval.batches)")
    p.add_argument(
        "--batch-size", type=int, default=None, help="windows per batch (default 8; recipe: eval.batch_size)"
    )
    p.add_argument(
        "--seq-len",
        type=int,
        default=None,
        help="window length (default: the models' max_position_embeddings, at most 1024; recipe: eval.seq_len)",
    )
    p.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="output directory for eval.md/eval.json (default ./eval; recipe: <run_dir>/eval)",
    )
    add_flags(p, EvalSection, only=DEVICE_KEYS)  # a RECIPE's eval.device and eval.dtype
    p.add_argument(
        "--tasks",
        default=None,
        metavar="T1,T2",
        help="recipe: downstream tasks through lm-evaluation-harness on every model and the BTM ensembles "
        "(shorthand for eval.tasks=[T1, T2]; needs pip install 'btx[eval]'; docs/TASKS.md)",
    )
    p.add_argument(
        "--include-path",
        default=None,
        metavar="DIR",
        help="recipe: a directory of lm-eval task YAMLs (local tasks; eval.include_path)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="recipe: evaluate the run's models even when one no longer follows from its inputs "
        "(e.g. a finetune of an earlier merge)",
    )
    p.add_argument(
        "--router-inits",
        nargs="?",
        const="",
        default=None,
        metavar="A,B,...",
        help="recipe: the merged-without-finetune loss of each router init side by side (default: "
        "random,zeros,centroid,ridge,hidden), merged into <run_dir>/router-inits/",
    )


def cmd_eval(args: argparse.Namespace) -> int:
    from btx.recipe.builtin import resolve_recipe

    if args.router_inits is not None:
        from btx.recipe.load import load_experiment
        from btx.run.router_inits import parse_inits, router_init_table

        inits = parse_inits(args.router_inits)
        if args.target is None or not resolve_recipe(args.target).is_file():
            raise BtxError("eval --router-inits: give an experiment RECIPE (its run's seed and experts are merged)")
        devices = [f"eval.{key}={value}" for key, value in given(args, EvalSection, only=DEVICE_KEYS).items()]
        router_init_table(load_experiment(args.target, [*(args.overrides or []), *devices]), inits)
        return 0

    target = args.target
    if target is not None and (resolve_recipe(target).is_file() or target.endswith((".yaml", ".yml"))):
        from btx.run.evaluation import eval_recipe_command

        return eval_recipe_command(args)
    from btx.evaluate.checkpoints import eval_checkpoints_command

    return eval_checkpoints_command(args)
