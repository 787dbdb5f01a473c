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
    FFN input (after the FFN norm) over `centroid_tokens` tokens of its own domain's data (a
    recipe's merge: its train shard, so eval's validation windows stay unseen; `btx merge --seed`:
    the validation shard beside the expert, or `--router-data`), computed with the *merged* model: averaged embeddings and attention, and the MoE of the
    layers below with their centroid routers. The seed's row is the normalised mean of the domain
    means (the centre of all domains). A token's logit for an expert is |x| cos(x, centroid), so
    each domain's tokens start out routed to their own expert.
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
  style: every tensor averaged, FFNs too, into a dense model of the seed's family; over the same sources, so the seed
  takes part unless keep_seed=False).

Validation, before any byte is written: options; that the output would not overwrite a
checkpoint (without `force`) or an input; every input checkpoint (config, index, safetensors
headers, truncation, tensor names and shapes, through CheckpointReader); that every expert has
a DONE.json (a finished btx job; `allow_no_manifest` lets external checkpoints in); that seed and
experts agree on the architecture, vocab, tie_word_embeddings, rope and tokenizer files; the
centroid shards. Each fault is one BtxError naming the directory, field or file.

Streaming and memory
- The output is written tensor by tensor through write_checkpoint (header first, then each
  tensor produced, written and dropped). Inputs are read with plain reads (CheckpointReader.
  read_into) into buffers that are reused from tensor to tensor, never memory-mapped, so memory is
  about one output tensor plus a few 32 MB working chunks, whatever the model size (the averaging
  runs in row chunks). An output tensor that is a source tensor's bytes unchanged (an expert FFN
  in the inputs' dtype: most of the output) is not read at all: `_Mixer.stored` names the file
  range and the writer copies it inside the kernel (FileRange).
- A `centroid` init is the exception: it runs the merged model layer by layer before writing and
  holds, besides the streaming buffers, one merged layer in fp32 (for a 7B seed with 4 experts,
  about 2.4 GB) and the hidden states of every centroid token (domains x tokens x D x 4 bytes; 3
  domains x 64k tokens x 4096 = 3.2 GB). That is fine at demo scale, on a GPU, or with
  `centroid_tokens` lowered; on a CPU a 7B centroid pass also takes a long while (it is a forward
  pass of the MoE over all those tokens).
- Atomic and reproducible: the directory is built in a hidden temporary sibling, fsynced, and
  renamed into place with its DONE.json already inside, so a killed merge leaves nothing that
  looks finished, and the same inputs and options give the same bytes (routers from a seed, a
  fixed tensor order, no timestamps inside the safetensors files).
- Input hashes: every input file is hashed while the merge runs (a background thread, from the
  page cache that the merge's own reads and the read-ahead fill), so DONE.json records what was
  actually read. A btx-made input whose hash differs from what its own DONE.json records (a bit
  flipped after its job finished, say) fails the merge before the output appears.
- Locking: the output's lock (btx.io.locks.output_lock) is held from the "exists / --force"
  check to the final rename, so two merges into one output cannot both succeed; the second stops
  with one line naming the first one's pid and host.

Test hook: BTX_MERGE_TEST_DELAY=<seconds> sleeps after every written tensor, so a test can kill a
merge half-way.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from btx.errors import BtxError
from btx.io.atomic import atomic_dir, fsync_tree
from btx.io.disk import disk_errors, ensure_free_space
from btx.io.hashing import update_from_file
from btx.io.layout import CONFIG_NAME, INDEX_FILE, TOKENIZER_FILES, hf_shapes
from btx.io.locks import output_lock
from btx.io.manifest import DONE_NAME, identity, relative_identities, write_done
from btx.io.writer import write_checkpoint
from btx.mix.merge_plan import _Input, _Plan, _plan
from btx.mix.merge_routers import _fit_routers
from btx.mix.mixer import _Mixer, _Progress
from btx.mix.options import SEED, TEST_DELAY_ENV, MergeOptions
from btx.mix.router_fit import FIT_INITS
from btx.recipe.schema import MergeSection

_HASH_WINDOW = 32 << 20  # input bytes hashed per file per turn, in step with the read-ahead


def _input_files(inp: _Input) -> list[str]:
    """The files of an input that the merge reads or copies: config, weights, index, tokenizer."""
    files = [CONFIG_NAME, *sorted(inp.reader.metadata)]
    files += [f for f in (INDEX_FILE, *TOKENIZER_FILES) if (inp.path / f).is_file() and f not in files]
    return files


def _input_hashes(plan: _Plan, pool: ThreadPoolExecutor, stop: threading.Event) -> dict[str, dict[str, Future]]:
    """sha256 of every file each input is read from, hashed on `pool` while the merge runs: what
    DONE.json records is what the merge read, never a copy of the inputs' own manifests.

    One thread hashes all files a window at a time, round robin by offset: the order in which the
    read-ahead (btx.io.startup) and the layer-by-layer merge bring them into the page cache, so the
    hashing reads what is cached already instead of adding a second stream of disk reads."""
    files = [(inp.name, f, inp.path / f) for inp in plan.inputs for f in _input_files(inp)]
    out: dict[str, dict[str, Future]] = {inp.name: {} for inp in plan.inputs}
    for name, f, _ in files:
        out[name][f] = Future()
    pool.submit(_hash_round_robin, [(path, out[name][f]) for name, f, path in files], stop)
    return out


def _hash_round_robin(files: list[tuple[Path, Future]], stop: threading.Event) -> None:
    try:
        pending = [(path, future, hashlib.sha256(), os.stat(path).st_size) for path, future in files]
        offset = 0
        while pending and not stop.is_set():
            for path, future, digest, size in pending:
                update_from_file(digest, path, offset, min(_HASH_WINDOW, max(0, size - offset)))
                if offset + _HASH_WINDOW >= size:
                    future.set_result(digest.hexdigest())
            pending = [p for p in pending if offset + _HASH_WINDOW < p[3]]
            offset += _HASH_WINDOW
    except BaseException as e:  # a vanished input, say: whoever waits on a hash sees why
        for _, future in files:
            if not future.done():
                future.set_exception(e)


def _checked_input_hashes(plan: _Plan, pending: dict[str, dict[str, Future]]) -> dict[str, dict[str, str]]:
    """The finished hashes; BtxError when a btx-made input is not what its DONE.json says it wrote."""
    hashes = {name: {f: h.result() for f, h in files.items()} for name, files in pending.items()}
    for inp in plan.inputs:
        for f, digest in hashes[inp.name].items():
            recorded = (inp.recorded_hashes or {}).get(f)
            if recorded is not None and recorded != digest:
                raise BtxError(f"{inp.path / f}: its sha256 is not the one its {DONE_NAME} records (damaged or "
                               "edited after its job finished); nothing was merged: restore the file, or redo "
                               f"the job that made {inp.path}")
    return hashes


def _same_content_warnings(plan: _Plan, hashes: dict[str, dict[str, str]]) -> list[str]:
    """Inputs that are the same checkpoint (a symlink, one directory given twice) or hold the same
    weights: legal, but seldom what was meant (an expert that is the seed adds nothing)."""
    if plan.options.upcycle:
        return []
    seen: dict[tuple, str] = {}
    warnings = []
    for inp in plan.inputs:
        weights = tuple(sorted((f, h) for f, h in hashes[inp.name].items() if f.endswith(".safetensors")))
        if weights in seen:
            warnings.append(f"merge: warning: {inp.name} ({inp.path}) has the same weights as {seen[weights]}; "
                            "the MoE gets two identical experts")
        else:
            seen[weights] = f"{inp.name} ({inp.path})"
    return warnings


def _run(plan: _Plan, progress: bool, console=None) -> dict:
    started = time.monotonic()
    o = plan.options
    mixer = _Mixer(plan)
    fitted = plan.options.router_init in FIT_INITS and not plan.options.average_all
    router_tokens = _fit_routers(plan, mixer, progress, console) if fitted else None
    specs = mixer.specs()
    total = sum(math.prod(s.shape) * s.dtype.itemsize for s in specs)
    # The streaming phase is bound by I/O; its elementwise work runs fastest on one thread, and
    # leaves the other cores to the hashing threads and the kernel's writeback. (torch's intra-op
    # threads synchronise on every op: on a busy machine two of them run several times slower.)
    threads = torch.get_num_threads()
    delay = float(os.environ.get(TEST_DELAY_ENV, 0) or 0)
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="btx-merge-hash")
    stop_hashing = threading.Event()
    try:
        torch.set_num_threads(1)
        pending_hashes = _input_hashes(plan, pool, stop_hashing)
        tokenizer_from = next(
            (i.path for i in (plan.seed, *plan.experts_in) if any((i.path / f).is_file() for f in TOKENIZER_FILES)),
            None,
        )
        with atomic_dir(plan.out, force=plan.force) as tmp, _Progress(progress, "merge", total, console=console) as bar:

            def on_tensor(name: str, nbytes: int) -> None:
                bar.advance(nbytes, name)
                if delay:
                    time.sleep(delay)

            outputs = write_checkpoint(
                tmp, plan.out_cfg, specs, shard_size=plan.shard_size, tokenizer_from=tokenizer_from,
                atomic=False, on_tensor=on_tensor,
            )  # fmt: skip
            fsync_tree(tmp)  # the seconds below include making the bytes durable
            input_hashes = _checked_input_hashes(plan, pending_hashes)
            for warning in _same_content_warnings(plan, input_hashes):
                _console(console).print(f"[yellow]{warning}[/]", soft_wrap=True)
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
                "input_identities": relative_identities({
                    **{name: {"path": record["path"], "sha256": record["sha256"]} for name, record in inputs.items()},
                    **{f"centroid:{d}": identity(shard.path) for d, shard in plan.centroid_shards.items()},
                }, plan.out),
                "weights": plan.weights,
                "options": {**dataclasses.asdict(o), "dtype": str(plan.dtype).removeprefix("torch.")},
                "outputs": outputs,
                "bytes": sum((tmp / f).stat().st_size for f in outputs),
                "seconds": round(time.monotonic() - started, 3),
            }
            if plan.kind != "average":
                manifest |= {
                    "experts": [e.name for e in plan.experts],
                    "expert_domains": [e.domain for e in plan.experts],
                    "n_experts": plan.out_cfg.n_experts,
                    "top_k": plan.out_cfg.top_k,
                    "ffn_dim": plan.out_cfg.ffn_dim,
                }
            if router_tokens is not None:
                manifest["router_tokens"] = router_tokens
            if plan.recipe_hash is not None:
                manifest["recipe_hash"] = plan.recipe_hash
            write_done(tmp, manifest)  # inside the temporary: the directory appears with it
    finally:
        stop_hashing.set()  # a merge that failed does not wait for (or keep) its hashing
        pool.shutdown(wait=False, cancel_futures=True)
        torch.set_num_threads(threads)
    return manifest


def merge(
    seed: str | os.PathLike,
    experts: dict[str, str | os.PathLike] | None,
    out: str | os.PathLike,
    options: MergeOptions | None = None,
    *,
    centroid_data: dict[str, str | os.PathLike] | None = None,
    force: bool = False,
    allow_no_manifest: bool = False,
    seed_needs_manifest: bool = False,
    recipe_hash: str | None = None,
    progress: bool = True,
    console=None,
) -> dict:
    """Merge `seed` and `experts` ({domain: checkpoint dir}, in expert order) into `out`.

    Everything is validated before anything is written (BtxError otherwise). Returns the DONE.json
    written into `out`. `centroid_data` maps a domain to its validation shard (default:
    <run_dir>/data/<domain>/val.bin when the expert sits at <run_dir>/experts/<domain>/final).
    `console`: the rich Console progress bars draw on (default: rich's own).
    """
    options = options or MergeOptions()
    centroid_data = {d: _centroid_shard_path(d, p) for d, p in (centroid_data or {}).items()}
    for warning in _same_path_warnings(seed, experts or {}):
        _console(console).print(f"[yellow]{warning}[/]", soft_wrap=True)
    # The exists / --force decision (in _plan) and the final rename happen under one lock.
    with output_lock(out, "this merge output"):
        plan = _plan(
            seed, experts or {}, out, options, centroid_data=centroid_data, force=force,
            allow_no_manifest=allow_no_manifest, seed_needs_manifest=seed_needs_manifest,
        )  # fmt: skip
        plan.recipe_hash = recipe_hash
        try:
            size = _output_bytes(plan)
            ensure_free_space(plan.out.parent, size, f"the merged checkpoint {plan.out}")
            with disk_errors(plan.out.parent, size, f"the merged checkpoint {plan.out}"):
                return _run(plan, progress, console)
        finally:
            plan.close()


def _console(console):
    from rich.console import Console

    return console or Console(stderr=True)


def _output_bytes(plan: _Plan) -> int:
    """The size of the merged checkpoint's tensors (headers and config add a few kB)."""
    return sum(math.prod(shape) for shape in hf_shapes(plan.out_cfg).values()) * plan.dtype.itemsize


def _centroid_shard_path(domain: str, spec: str | os.PathLike) -> Path:
    """--centroid-data NAME=PATH takes what `btx eval --data` takes: a shard, or a prepared domain
    directory (its val shard), checked against its sidecar's sha256 before the merge starts."""
    from btx.data.sampling import shard_spec_path
    from btx.data.shards import load_shard

    path = shard_spec_path(spec, f"centroid data of {domain!r}: {spec}")
    load_shard(path, verify=True)
    return path


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
        centroid_data=recipe_router_data(exp, experts) if options.router_init in ("centroid", "ridge") else None,
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
    from btx.recipe.experiment import recipe_hash

    experts = [] if upcycle else list(exp.merged_domains)
    merge_section = effective_merge_section(exp.merge if section is None else section)
    return recipe_hash({"merge": merge_section, "seed": str(exp.seed_dir), "experts": experts, "upcycle": upcycle})


# --------------------------------------------------------------------------------------------
# The command line (arguments are declared in btx/cli.py)
# --------------------------------------------------------------------------------------------

_ADHOC_FLAGS = {  # argparse dest -> MergeOptions field (None: not an option)
    "seed": None, "expert": None, "out": None, "centroid_data": None, "no_keep_seed": None,
    "weights": "weights", "router_init": "router_init", "router_std": "router_std",
    "router_seed": "router_seed", "centroid_tokens": "centroid_tokens", "granularity": "granularity",
    "chunks": "chunks", "top_k": "top_k", "dtype": "dtype", "shard_size": "shard_size", "upcycle": "upcycle",
    "average_all": "average_all", "centroid_device": "centroid_device", "ridge_lambda": "ridge_lambda",
    "router_scale": "router_scale",
    "prompt": None, "negative_prompt": None,
}  # fmt: skip


def _pairs(items: list[str], flag: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items or []:
        name, eq, value = item.partition("=")
        if not eq or not name or not value:
            raise BtxError(f"{flag} {item!r}: expected NAME=VALUE")
        if name in out:
            raise BtxError(f"{flag}: '{name}' given twice")
        out[name] = value
    return out


def prompt_lists(items: list[str], flag: str) -> dict[str, list[str]]:
    """--prompt NAME=TEXT, repeated: {NAME: [TEXT, ...]} in the order given."""
    out: dict[str, list[str]] = {}
    for item in items or []:
        name, eq, text = item.partition("=")
        if not eq or not name or not text:
            raise BtxError(f"{flag} {item!r}: expected NAME=TEXT")
        out.setdefault(name, []).append(text)
    return out


def _parse_weights(text: str | None):
    if text is None or text in ("uniform", "tokens"):
        return text
    weights = {}
    for name, value in _pairs(text.split(","), "--weights").items():
        try:
            weights[name] = float(value)
        except ValueError:
            raise BtxError(f"--weights {name}={value}: not a number") from None
    return weights


def merge_command(args) -> int:
    """`btx merge RECIPE [KEY=VALUE ...]` or `btx merge --seed DIR --expert NAME=DIR ... --out DIR`."""
    given = {}
    for dest in _ADHOC_FLAGS:
        value = getattr(args, dest, None)
        if value is not None and value is not False and value != []:
            given[dest] = value
    progress = not args.quiet
    if args.recipe is not None:
        if given:
            flags = ", ".join("--" + d.replace("_", "-") for d in given)
            raise BtxError(f"merge: {flags}: give merge settings as recipe overrides (e.g. merge.top_k=1), not flags")
        from btx.recipe.load import load_experiment

        exp = load_experiment(args.recipe, args.overrides)
        manifest = merge_from_recipe(exp, force=args.force, allow_no_manifest=args.allow_no_manifest, progress=progress)
        out = exp.run_dir / "merged"
    else:
        if args.overrides:
            raise BtxError(f"merge: overrides ({args.overrides[0]}) need a RECIPE")
        if not args.seed or not args.out:
            raise BtxError("merge: give a RECIPE, or --seed DIR, --expert NAME=DIR ... (or --upcycle N) and --out DIR")
        fields = {_ADHOC_FLAGS[d]: v for d, v in given.items() if _ADHOC_FLAGS[d] is not None}
        if "weights" in fields:
            fields["weights"] = _parse_weights(fields["weights"])
        if args.no_keep_seed:
            fields["keep_seed"] = False
        fields["prompts"] = prompt_lists(args.prompt, "--prompt")
        fields["negative_prompts"] = prompt_lists(args.negative_prompt, "--negative-prompt")
        manifest = merge(
            args.seed, _pairs(args.expert, "--expert"), args.out, MergeOptions(**fields),
            centroid_data=_pairs(args.centroid_data, "--router-data"), force=args.force,
            allow_no_manifest=args.allow_no_manifest, progress=progress,
        )  # fmt: skip
        out = Path(args.out)
    seconds = manifest["seconds"]
    what = (
        f"{manifest['n_experts']} experts ({', '.join(manifest['experts'])}), top-{manifest['top_k']}"
        if "experts" in manifest
        else "a dense average"
    )
    from rich.console import Console

    Console().print(
        f"merge: {what} -> {out}: {manifest['bytes'] / 1e9:.2f} GB in {seconds:.1f} s "
        f"({manifest['bytes'] / 1e9 / max(seconds, 1e-9):.2f} GB/s)"
    )
    return 0
