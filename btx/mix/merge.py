"""The MiX step: a dense seed and its domain experts become one MoE, streamed.

The MoE is written in the seed family's MoE form (btx/families/: Llama and Mistral -> Mixtral,
a Llama with attention biases -> GraniteMoe, Qwen2 -> Qwen2-MoE, Qwen3 -> Qwen3-MoE, OLMo 2 ->
FlexOlmo); a seed no MoE form can express (a Llama with MLP biases) is refused before anything is
written.

What goes where
- Each source FFN (`gate/up/down_proj`) becomes one expert of its layer's MoE. The sources are the
  domain experts in the order given, then the seed (kept as an extra expert by default, as in the
  paper; `keep_seed=False` drops it). DONE.json lists them: `"experts": ["code", "math", "seed"]`.
- Every other tensor (attention, norms, embeddings, LM head) is the weighted mean over the same
  sources: uniform by default, by the tokens each expert trained on (`weights="tokens"`, from its
  DONE.json; the seed counts as the mean of the experts, since its training is every expert's
  shared past), or by explicit weights `{name: w}`. The mean is computed in fp32 as
  `x_0 + sum_i w_i (x_i - x_0)` (weights normalised), so identical sources give back exactly
  the original, and the small differences between branched experts lose nothing to rounding.
- Routers (`[E, D]`, one per layer) are the only new weights:
  - `random`: normal(0, router_std), reproducible from `router_seed` and the layer index;
  - `zeros`: every expert equally likely (top-k then breaks ties arbitrarily);
  - `centroid`: the row of a domain expert is the unit-normalised mean hidden state at that layer's
    FFN input (after the FFN norm) over `router_tokens` tokens of its own domain's data (a
    recipe's merge: its train shard, so eval's validation windows stay unseen; `btx merge --seed`:
    the validation shard beside the expert, or `--router-data`), computed with the *merged* model:
    averaged embeddings and attention, and the MoE of the layers below with their centroid routers.
    The seed's row is the normalised mean of the domain means (the centre of all domains). A
    token's logit for an expert is |x| cos(x, centroid), so each domain's tokens start out routed
    to their own expert.
  - `ridge` (DUME) and `hidden` (mergekit's prompts): btx/mix/router_fit.py, on the same walk.
- Granularity (the paper's variants):
  - `split` cuts every FFN into C chunks along F, giving N*C experts. Chunk (n, c) keeps rows
    c*F/C.. of gate/up and those columns of down, which is scaled by C; the C chunks of FFN n share
    FFN n's router row. With top-k = C*k the split MoE therefore computes exactly the unsplit MoE
    with top-k (and the seed, for copies of the seed) until finetuning unties the chunks. The
    scale is exact in bf16 when C is a power of two. (zeros routers tie every logit, so top-k picks
    arbitrary chunks: the equivalence then holds only with top-k = all.)
  - `blend` builds C experts (default C = N sources), expert c being chunk c of *every* source FFN
    concatenated along F (width N*F/C), its down projection scaled by C/N, so that uniform routing
    over all experts computes the mean of the source FFNs (no scaling in the paper's C = N case).
    Blend experts belong to no domain, so `centroid` routers do not apply.
- Special cases: `upcycle=N` (sparse upcycling: N experts, all copies of the seed, no experts
  needed; the MoE computes exactly the seed, for any router) and `average_all` (Branch-Train-Merge
  style: every tensor averaged, FFNs too, into a dense model of the seed's family; over the same
  sources, so the seed takes part unless keep_seed=False).

Shapes: N source FFNs, C chunks, E experts, F an FFN's width, D the model width.

Validation, before any byte is written: options; that the output would not overwrite a
checkpoint (without `force`) or an input; every input checkpoint (config, index, safetensors
headers, truncation, tensor names and shapes, through CheckpointReader); that every expert has
a DONE.json (a finished btx job; `allow_no_manifest` lets external checkpoints in); that seed and
experts agree on the architecture, vocab, tie_word_embeddings, rope and tokenizer files; the
centroid shards. Each fault is one BtxError naming the directory, field or file.

Streaming and memory
- The output is written by btx/mix/output.py, the writer merge and grow share (lock, free-space
  check, atomic directory, streaming, tokenizer files, DONE.json). Inputs are read with plain reads
  (CheckpointReader.read_into) into buffers that are reused from tensor to tensor, never
  memory-mapped, so memory is about one output tensor plus a few 32 MB working chunks, whatever
  the model size (the averaging runs in row chunks). An output tensor that is a source tensor's
  bytes unchanged (an expert FFN in the inputs' dtype: most of the output) is not read at all:
  `MergedTensors.stored` names the file range and the writer copies it inside the kernel.
- A `centroid` init is the exception: it runs the merged model layer by layer before writing and
  holds, besides the streaming buffers, one merged layer in fp32 (for a 7B seed with 4 experts,
  about 2.4 GB) and the hidden states of every centroid token (domains x tokens x D x 4 bytes; 3
  domains x 64k tokens x 4096 = 3.2 GB). That is fine at demo scale, on a GPU, or with
  `router_tokens` lowered; on a CPU a 7B centroid pass also takes a long while (it is a forward
  pass of the MoE over all those tokens).
- Atomic, locked and reproducible (btx/mix/output.py): a killed merge leaves nothing that looks
  finished, a second merge into the same output stops with one line naming the first one's pid
  and host, and the same inputs and options give the same bytes.
- Input hashes (btx/mix/input_hashes.py): every input file is hashed while the merge runs, so
  DONE.json records what was actually read, and a btx-made input that is not what its own
  DONE.json records fails the merge before the output appears.

Test hook: BTX_MERGE_TEST_DELAY=<seconds> sleeps after every written tensor, so a test can kill a
merge half-way.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch
from rich.console import Console

from btx.errors import BtxError
from btx.io.layout import CONFIG_NAME
from btx.io.manifest import identity, relative_identities
from btx.mix.input_hashes import InputHashes, same_content_warnings
from btx.mix.merge_plan import MergePlan, plan_merge
from btx.mix.merged_tensors import MergedTensors
from btx.mix.options import SEED, MergeOptions
from btx.mix.output import OutputNames, write_output
from btx.mix.router_data import router_shard, shard_windows
from btx.mix.router_fit import (
    FIT_INITS,
    LayerStats,
    fit_routers,
    fitted_rows,
    hidden_targets,
)
from btx.recipe.experiment import recipe_hash
from btx.recipe.load import load_experiment
from btx.recipe.schema import MergeSection
from btx.recipe.settings import flags, given, pairs

MERGE_OUTPUT = OutputNames(title="merge", lock="this merge output", what="the merged checkpoint")


class _MergeJob:
    """A planned merge as the writer sees it (btx.mix.output.OutputJob): the merged tensors, the
    fitted routers, and what DONE.json records, with the inputs hashed while the merge runs."""

    def __init__(self, plan: MergePlan, console):
        self.plan, self.console = plan, console
        self.tensors = MergedTensors(plan)
        self.hashes = InputHashes(plan.inputs)
        self.router_tokens: dict[str, int] | None = None

    def fit_routers(self, progress: bool, console) -> None:
        """centroid, ridge, hidden: one row per router row group, fitted on the merged model."""
        plan, o = self.plan, self.plan.options
        if o.router_init not in FIT_INITS or o.average_all:
            return
        if o.router_init == "hidden":
            sets = plan.prompt_sets
            rows, negative = hidden_targets([g.name for g in plan.groups], o.prompts, o.negative_prompts)
        else:
            sets = [
                shard_windows(d, shard, o.router_tokens, plan.out_cfg.max_seq_len)
                for d, shard in plan.centroid_shards.items()
            ]
            rows, negative = [None if g.domain == SEED else g.domain for g in plan.groups], ()

        def rows_for_layer(layer: int, stats: LayerStats) -> torch.Tensor:
            fitted = fitted_rows(o.router_init, stats, rows, negative=negative, ridge_lambda=o.ridge_lambda)
            return fitted * o.router_scale

        fit_routers(
            self.tensors,
            plan.out_cfg,
            sets,
            rows_for_layer,
            init=o.router_init,
            device=o.router_device,
            progress=progress,
            console=console,
        )
        self.router_tokens = {s.name: s.tokens for s in sets}

    def manifest(self) -> dict:
        plan, o = self.plan, self.plan.options
        input_hashes = self.hashes.checked()
        for warning in [] if o.upcycle else same_content_warnings(plan.inputs, input_hashes):
            _console(self.console).print(f"[yellow]{warning}[/]", soft_wrap=True)
        inputs = {
            inp.name: {
                "path": str(inp.path.resolve()),
                "sha256": input_hashes[inp.name],
                "sha256_from": "read",  # hashed from the bytes this merge read (DONE.json's checked)
                "tokens": (inp.manifest or {}).get("tokens"),
                "dtype": str(inp.reader.dtype).removeprefix("torch."),
            }
            for inp in plan.inputs
        }
        manifest = {
            "stage": "merge",
            "kind": plan.kind,
            "inputs": inputs,
            # The same hashes in the shape every stage's manifest uses (btx.io.manifest.changed_inputs),
            # with the centroid shards, which decide the routers too.
            "input_identities": relative_identities(
                {
                    **{name: {"path": record["path"], "sha256": record["sha256"]} for name, record in inputs.items()},
                    **{f"centroid:{d}": identity(shard.path) for d, shard in plan.centroid_shards.items()},
                },
                plan.out,
            ),
            "weights": plan.weights,
            "options": {**dataclasses.asdict(o), "dtype": str(plan.dtype).removeprefix("torch.")},
        }
        if plan.kind != "average":
            manifest |= {
                "experts": [e.name for e in plan.experts],
                "expert_domains": [e.domain for e in plan.experts],
                "n_experts": plan.out_cfg.n_experts,
                "top_k": plan.out_cfg.top_k,
                "ffn_dim": plan.out_cfg.ffn_dim,
            }
        if self.router_tokens is not None:
            manifest["router_tokens"] = self.router_tokens
        if plan.recipe_hash is not None:
            manifest["recipe_hash"] = plan.recipe_hash
        return manifest

    def close(self) -> None:
        self.hashes.stop()
        self.plan.close()


def merge(
    seed: str | os.PathLike,
    experts: dict[str, str | os.PathLike] | None,
    out: str | os.PathLike,
    options: MergeOptions | None = None,
    *,
    router_data: dict[str, str | os.PathLike] | None = None,
    force: bool = False,
    allow_no_manifest: bool = False,
    seed_needs_manifest: bool = False,
    recipe_hash: str | None = None,
    progress: bool = True,
    console=None,
) -> dict:
    """Merge `seed` and `experts` ({domain: checkpoint dir}, in expert order) into `out`.

    Everything is validated before anything is written (BtxError otherwise). Returns the DONE.json
    written into `out`. `router_data` maps a domain to its validation shard (default:
    <run_dir>/data/<domain>/val.bin when the expert sits at <run_dir>/experts/<domain>/final).
    `console`: the rich Console progress bars draw on (default: rich's own).
    """
    options = options or MergeOptions()
    router_data = {d: router_shard(d, p) for d, p in (router_data or {}).items()}
    for warning in _same_path_warnings(seed, experts or {}):
        _console(console).print(f"[yellow]{warning}[/]", soft_wrap=True)

    def open_job() -> _MergeJob:  # under the output's lock, with the exists / --force decision
        plan = plan_merge(
            seed, experts or {}, out, options, router_data=router_data, force=force,
            allow_no_manifest=allow_no_manifest, seed_needs_manifest=seed_needs_manifest,
        )  # fmt: skip
        plan.recipe_hash = recipe_hash
        return _MergeJob(plan, console)

    return write_output(Path(out), MERGE_OUTPUT, open_job, progress=progress, console=console)


def _console(console):

    return console or Console(stderr=True)


def _same_path_warnings(seed, experts: dict) -> list[str]:
    """Inputs that are one directory (a symlink to the seed, a checkpoint given twice)."""
    seen: dict[Path, str] = {}
    warnings = []
    for name, path in [(SEED, seed), *experts.items()]:
        real = Path(path).resolve()
        if (real / "final" / CONFIG_NAME).is_file() and not (real / CONFIG_NAME).is_file():
            real = real / "final"
        if real in seen:
            warnings.append(f"merge: warning: {name} ({path}) is the same checkpoint as {seen[real]}")
        else:
            seen[real] = f"{name} ({path})"
    return warnings


def merge_from_recipe(
    exp,
    *,
    out_dir: str | os.PathLike | None = None,
    upcycle: int = 0,
    force: bool = False,
    allow_no_manifest: bool = False,
    progress: bool = True,
    console=None,
) -> dict:
    """The recipe's merge stage: <run_dir>/seed (or seed.path) and <run_dir>/experts/<domain>/final,
    with the `merge:` section, into <run_dir>/merged (or `out_dir`).

    `upcycle=N` builds the sparse-upcycling baseline instead: N copies of the seed with the same
    section's settings (a `centroid` router init, which needs domain experts, becomes `random`,
    the paper's init for upcycling).
    """
    seed = exp.seed_dir
    options = recipe_merge_options(exp.merge, upcycle, aux_loss_coef=exp.finetune.balance_alpha)
    experts = {} if upcycle else {d: exp.paths.expert_final(d) for d in exp.merged_domains}
    merged = set(experts) | {SEED}  # prompts of experts that grow adds later are not this merge's
    options.prompts = {k: v for k, v in options.prompts.items() if k in merged}
    options.negative_prompts = {k: v for k, v in options.negative_prompts.items() if k in merged}
    return merge(
        seed, experts, Path(out_dir) if out_dir is not None else exp.paths.merged, options,
        router_data=recipe_router_data(exp, experts) if options.router_init in ("centroid", "ridge") else None,
        force=force, allow_no_manifest=allow_no_manifest, seed_needs_manifest=exp.seed.path is None,
        recipe_hash=merge_recipe_hash(exp, upcycle), progress=progress, console=console,
    )  # fmt: skip


def effective_merge_section(section: MergeSection) -> MergeSection:
    """The merge section as the merge reads it: prompts shape only a hidden init (the recipe keeps
    them for grow and the router-init table), so a merge with another init does not depend on them."""
    if section.router_init == "hidden" or not (section.prompts or section.negative_prompts):
        return section
    return dataclasses.replace(section, prompts={}, negative_prompts={})


def recipe_router_data(exp, domains) -> dict[str, Path]:
    """The shards a recipe's centroid and ridge routers are fitted on: each domain's *train* shard,
    so that the validation windows every eval row is scored on stay unseen by the routers too."""
    return {d: exp.paths.tokens(d, "train") for d in domains}


def recipe_merge_options(section: MergeSection, upcycle: int = 0, aux_loss_coef: float = 0.01) -> MergeOptions:
    """The options a recipe's merge runs with; an upcycle's centroid, ridge or hidden init (it has
    no domain experts) is `random`, the paper's init for upcycling. `aux_loss_coef` (the recipe's
    finetune.balance_alpha) goes into the MoE's config.json for training it further elsewhere."""
    options = MergeOptions.from_section(section, upcycle=upcycle, router_aux_loss_coef=aux_loss_coef)
    if upcycle and options.router_init in FIT_INITS:
        options.router_init = "random"
    if options.router_init != "hidden":  # the recipe keeps prompts for grow and the router-init table
        options.prompts, options.negative_prompts = {}, {}
    return options


def merge_recipe_hash(exp, upcycle: int = 0, section: MergeSection | None = None) -> str:
    """The recipe_hash a recipe's merge records in DONE.json (btx run compares it to adopt a merge
    made by `btx merge` with the same settings); `section` in place of the recipe's merge section."""

    experts = [] if upcycle else list(exp.merged_domains)
    merge_section = effective_merge_section(exp.merge if section is None else section)
    return recipe_hash({"merge": merge_section, "seed": str(exp.seed_dir), "experts": experts, "upcycle": upcycle})


# --------------------------------------------------------------------------------------------
# The command line (arguments are declared in btx/cli/merge.py)
# --------------------------------------------------------------------------------------------

# Flags (argparse dests) that name the merge's inputs and output, not its settings: with a recipe,
# the recipe names them.
_INPUT_FLAGS = {"seed": "--seed", "expert": "--expert", "out": "--out", "router_data": "--router-data"}


def merge_command(args) -> int:
    """`btx merge RECIPE [KEY=VALUE ...]` or `btx merge --seed DIR --expert NAME=DIR ... --out DIR`."""
    settings = given(args, MergeOptions)
    progress = not args.quiet
    if args.recipe is not None:
        named = [flag for dest, flag in _INPUT_FLAGS.items() if getattr(args, dest, None)]
        named += [flag for flag, f in flags(MergeOptions).items() if f.name in settings]
        if named:
            raise BtxError(
                f"merge: {', '.join(named)}: give merge settings as recipe overrides (e.g. merge.top_k=1), not flags"
            )

        exp = load_experiment(args.recipe, args.overrides)
        manifest = merge_from_recipe(exp, force=args.force, allow_no_manifest=args.allow_no_manifest, progress=progress)
        out = exp.run_dir / "merged"
    else:
        if args.overrides:
            raise BtxError(f"merge: overrides ({args.overrides[0]}) need a RECIPE")
        if not args.seed or not args.out:
            raise BtxError("merge: give a RECIPE, or --seed DIR, --expert NAME=DIR ... (or --upcycle N) and --out DIR")
        manifest = merge(
            args.seed, pairs(args.expert, "--expert"), args.out, MergeOptions(**settings),
            router_data=pairs(args.router_data, "--router-data"), force=args.force,
            allow_no_manifest=args.allow_no_manifest, progress=progress,
        )  # fmt: skip
        out = Path(args.out)
    seconds = manifest["seconds"]
    what = (
        f"{manifest['n_experts']} experts ({', '.join(manifest['experts'])}), top-{manifest['top_k']}"
        if "experts" in manifest
        else "a dense average"
    )

    Console().print(
        f"merge: {what} -> {out}: {manifest['bytes'] / 1e9:.2f} GB in {seconds:.1f} s "
        f"({manifest['bytes'] / 1e9 / max(seconds, 1e-9):.2f} GB/s)"
    )
    return 0
