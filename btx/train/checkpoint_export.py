"""`btx export CHECKPOINT_DIR --out DIR`: any checkpoint of any training job in the HF form of the
job's final export.

    btx export checkpoints/demo/finetune-train/ckpt/step-200 --out finetuned-200

A checkpoint (`<work_dir>/ckpt/step-N/`, btx.train.checkpoint) holds the engine's own files and
`export/` (btx.train.export.write_export_record): the tokenizer files of the final export and
export.json (the model's config, the export dtype, the optimizer's groups of parameter names).
The weights are read in fp32 and written by `btx.train.export.write_export`, the function the
final export writes with, so the last step's checkpoint exports to the final export byte for byte.

Where the fp32 weights are, by engine:
- accelerate: the checkpoint is itself an fp32 HF checkpoint (config.json, *.safetensors);
- DeepSpeed ZeRO-0: the module in mp_rank_00_model_states.pt; in bf16/fp16 the trained
  parameters' fp32 masters are the optimizer's `fp32_groups`, matched to names through
  export.json's optimizer groups (what the engine's `full_state_dict` takes too);
- DeepSpeed ZeRO-1/2/3: the fp32 partitions of every rank's optimizer file, put together by
  DeepSpeed's own zero_to_fp32 (any number of ranks).

Nothing is unpickled: every file must be one btx recorded when it saved the checkpoint (the sha256
of each in btx_checkpoint.json, checked first), and every torch.load is weights_only=True with only
DeepSpeed's few plain classes allowed (btx.train.engines.deepspeed.load_weights_only). Host memory:
the fp32 model once (as zero_to_fp32 needs).
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import torch
from accelerate import init_empty_weights
from rich.console import Console

from btx.choices import WEIGHT_DTYPES
from btx.errors import BtxError
from btx.io.checkpoint import load_state_dict
from btx.io.hashing import cached_sha256
from btx.io.layout import hf_specs_from_btx
from btx.model.config import ModelConfig
from btx.model.transformer import Transformer
from btx.train.export import EXPORT_RECORD, EXPORT_RECORD_DIR, write_export
from btx.train.job import CKPT_DIR, CKPT_MANIFEST, STEP_DIR

_DEEPSPEED_TAG = "deepspeed"  # btx.train.engines.deepspeed saves under this tag


def find_checkpoint(path: Path) -> Path:
    """`path` itself (a ckpt/step-N/ directory), or the newest checkpoint of a job directory."""
    if not path.exists():
        raise BtxError(f"{path}: not found (expected a checkpoint directory such as <job>/ckpt/step-N)")
    if not path.is_dir():
        raise BtxError(f"{path}: not a directory (expected a checkpoint directory such as <job>/ckpt/step-N)")
    if (path / CKPT_MANIFEST).is_file():
        return path
    for root in (path, path / CKPT_DIR):
        steps = sorted(
            (int(m.group(1)), p)
            for p in (root.iterdir() if root.is_dir() else [])
            if (m := STEP_DIR.match(p.name)) and (p / CKPT_MANIFEST).is_file()
        )
        if steps:
            return steps[-1][1]
    raise BtxError(
        f"{path}: not a btx training checkpoint (no {CKPT_MANIFEST}; expected <job>/ckpt/step-N, "
        "or a job directory holding ckpt/)"
    )


def verify_files(ckpt: Path) -> None:
    """Every file of the checkpoint is one btx recorded at save, byte for byte (so no file that btx
    did not write is ever read), and nothing else is there."""
    try:
        recorded = json.loads((ckpt / CKPT_MANIFEST).read_text())["files"]
        assert isinstance(recorded, dict)
    except (OSError, ValueError, KeyError, AssertionError):
        raise BtxError(f"{ckpt / CKPT_MANIFEST}: unreadable (expected btx's list of the checkpoint's files)") from None
    on_disk = {p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file() and p.name != CKPT_MANIFEST}
    for name in sorted(on_disk ^ set(recorded)):
        where = "not listed in" if name in on_disk else "missing, though listed in"
        raise BtxError(f"{ckpt / name}: {where} {CKPT_MANIFEST}; btx exports only checkpoints it wrote, unchanged")
    for name in sorted(on_disk):
        if cached_sha256(ckpt / name) != recorded[name]:
            raise BtxError(f"{ckpt / name}: differs from the sha256 in {CKPT_MANIFEST} (damaged or edited)")


def read_record(ckpt: Path) -> dict:
    path = ckpt / EXPORT_RECORD_DIR / EXPORT_RECORD
    if not path.is_file():
        raise BtxError(
            f"{ckpt}: has no {EXPORT_RECORD_DIR}/{EXPORT_RECORD} (a checkpoint of a btx from before `btx export`); "
            "only checkpoints saved since can be exported"
        )
    try:
        record = json.loads(path.read_text())
        record["model_config"] = ModelConfig(**record["config"])
        if record["dtype"] not in WEIGHT_DTYPES:
            raise KeyError(f"dtype {record['dtype']!r}")
        record["export_dtype"] = getattr(torch, record["dtype"])
    except (ValueError, KeyError, TypeError) as e:
        raise BtxError(f"{path}: unreadable ({e})") from None
    return record


def parameter_names(cfg: ModelConfig) -> list[str]:
    with init_empty_weights(include_buffers=False):  # meta tensors: names and shapes only
        model = Transformer(cfg)
    return [name for name, _ in model.named_parameters()]


def _weights_only_torch():
    """torch as DeepSpeed's zero_to_fp32 sees it, whose every torch.load is weights_only=True."""
    from btx.train.engines.deepspeed import load_weights_only

    class WeightsOnlyTorch:
        def __getattr__(self, name):
            return getattr(torch, name)

        @staticmethod
        def load(f, map_location=None, weights_only=None, mmap=None, **_):
            return load_weights_only(str(f), map_location=map_location)

    return WeightsOnlyTorch()


def zero_weights(ds_dir: Path) -> dict[str, torch.Tensor]:
    """fp32 weights of a ZeRO-1/2/3 checkpoint from every rank's optimizer partition (zero_to_fp32)."""
    import deepspeed.utils.zero_to_fp32 as zero_to_fp32  # heavy; only for DeepSpeed checkpoints

    real = zero_to_fp32.torch
    zero_to_fp32.torch = _weights_only_torch()
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            state = zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(str(ds_dir.parent), tag=ds_dir.name)
    except (ValueError, KeyError, RuntimeError, FileNotFoundError) as e:
        raise BtxError(f"{ds_dir}: not a readable ZeRO checkpoint ({' '.join(str(e).split())[:300]})") from None
    finally:
        zero_to_fp32.torch = real
    return {k: v.detach().to(torch.float32) for k, v in state.items()}


def stage0_weights(ds_dir: Path, record: dict) -> dict[str, torch.Tensor]:
    """fp32 weights of a ZeRO-0 checkpoint: the module's, with the optimizer's fp32 masters of the
    trained parameters where a bf16/fp16 run keeps them (`fp32_groups`, in optimizer-group order)."""
    from btx.train.engines.deepspeed import load_weights_only

    state = load_weights_only(str(ds_dir / "mp_rank_00_model_states.pt"), map_location="cpu")
    weights = {k: v.detach().to(torch.float32) for k, v in state["module"].items()}
    masters = (state.get("optimizer") or {}).get("fp32_groups")
    if masters:
        groups = record["optimizer_groups"]
        if [len(g) for g in masters] != [len(g) for g in groups]:
            raise BtxError(f"{ds_dir}: its optimizer's groups do not match {EXPORT_RECORD_DIR}/{EXPORT_RECORD}")
        for names, tensors in zip(groups, masters):
            for name, tensor in zip(names, tensors):
                weights[name] = tensor.detach().to(torch.float32).reshape(weights[name].shape)
    return weights


def checkpoint_weights(ckpt: Path, record: dict) -> dict[str, torch.Tensor]:
    """The fp32 btx state dict of a checkpoint of either engine."""
    ds_dir = ckpt / _DEEPSPEED_TAG
    if ds_dir.is_dir():
        if (ds_dir / "mp_rank_00_model_states.pt").is_file() and not any(ds_dir.glob("*optim_states.pt")):
            weights = stage0_weights(ds_dir, record)
        else:
            weights = zero_weights(ds_dir)
    elif (ckpt / "config.json").is_file():  # accelerate: an fp32 HF checkpoint
        weights = load_state_dict(ckpt, dtype=torch.float32)[1]
    else:
        raise BtxError(f"{ckpt}: holds neither a DeepSpeed checkpoint ({_DEEPSPEED_TAG}/) nor fp32 weights")
    names = parameter_names(record["model_config"])
    missing = [n for n in names if n not in weights]
    if missing:
        raise BtxError(f"{ckpt}: no weights for {missing[0]} (of {len(missing)} missing parameters)")
    return {name: weights[name] for name in names}


def export_checkpoint(path: str | Path, out: str | Path, *, force: bool = False, console=None) -> Path:
    """Write the checkpoint at `path` (or a job directory's newest) into `out` in the HF form of
    the job's final export; returns the checkpoint exported."""
    console = console or Console(stderr=True)
    ckpt = find_checkpoint(Path(path).expanduser())
    out = Path(out).expanduser()
    if not force and out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BtxError(f"--out {out}: already exists and is not empty; pass --force to replace it")
    if out.resolve() == ckpt.resolve() or ckpt.resolve() in out.resolve().parents:
        raise BtxError(f"--out {out}: inside the checkpoint {ckpt}; choose a directory outside it")
    with console.status(f"checking {ckpt}"):
        verify_files(ckpt)
        record = read_record(ckpt)
    with console.status(f"reading the weights of {ckpt}"):
        weights = checkpoint_weights(ckpt, record)
    files = ckpt / EXPORT_RECORD_DIR

    def add_tokenizer(directory: Path) -> None:
        for item in sorted(files.iterdir()):
            if item.name != EXPORT_RECORD:
                shutil.copyfile(item, directory / item.name)

    with console.status(f"writing {out}"):
        cfg, dtype = record["model_config"], record["export_dtype"]
        try:
            specs = hf_specs_from_btx(weights, cfg, dtype)
        except ValueError as e:
            raise BtxError(f"{ckpt}: {e}") from None
        write_export(specs, cfg, out, add_tokenizer, force=force)
    console.print(f"export: {ckpt} ({record['job']}) -> {out} ({record['dtype']})", soft_wrap=True, highlight=False)
    return ckpt


def export_command(args) -> int:
    """`btx export CHECKPOINT_DIR --out DIR [--force]` (arguments: btx.cli)."""
    export_checkpoint(args.checkpoint, args.out, force=args.force)
    return 0
