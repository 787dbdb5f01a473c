"""Downstream tasks through lm-evaluation-harness (the optional `eval` extra): finding the tasks,
running one model on one task, and keeping each result for reuse.

- `task_specs` turns eval.tasks (names, or mappings {task, num_fewshot, limit, batch_size}) into
  TaskSpecs; the recipe's check has already refused malformed entries.
- `TaskSuite` finds them through lm-eval's TaskManager: the include path alone first (building
  lm-eval's index of its ~15,000 built-in tasks takes half a minute), the built-ins too only when
  a name is not there. An unknown name, or a task whose dataset cannot be had (the Hub offline),
  is a one-line BtxError before any model runs (`check`). A relative `data_files` path in a task
  YAML under the include path is read relative to that YAML (lm-eval alone reads it relative to
  the current directory), so the tasks btx ships work from anywhere.
- `TaskSuite.run` scores one lm-eval model (btx/evaluate/lm.py) on one task with
  `lm_eval.simple_evaluate`, lm-eval's seeds and metrics; its record holds every metric, the
  primary one (the first lm-eval reports) with its standard error, and for a group its members.
- `TaskCache`: a record is stored under the sha256 of what decides it: the model's content (the
  sha256 of its checkpoint files, or of an ensemble's experts and router data), the task's
  configuration (its YAML and, for a local task, every file of the include path), num_fewshot,
  limit, batch size, device, dtype and the lm-eval version. A second run finds it and does no work.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import math
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import partialmethod
from pathlib import Path
from typing import Any, Iterator

from btx.errors import BtxError, first_line
from btx.io.atomic import dumps_json, write_bytes_atomic
from btx.io.hashing import cached_sha256

EVAL_EXTRA = "pip install 'btx[eval]'"
RECORD_VERSION = 1  # bump when btx's lm-eval models change what they compute


def require_lm_eval():
    """The lm_eval module, or a one-line BtxError naming the extra."""
    try:
        import lm_eval  # optional (the eval extra): imported only where tasks are asked for
    except ImportError:
        raise BtxError(
            f"downstream tasks (eval.tasks, --tasks) need lm-evaluation-harness: {EVAL_EXTRA} (or pip install lm_eval)"
        ) from None
    return lm_eval


@dataclass(frozen=True)
class TaskSpec:
    name: str
    num_fewshot: int | None = None  # None: the task's own default
    limit: int | float | None = None  # documents (a fraction in (0, 1): a share); None: all
    batch_size: int = 8


def task_specs(entries, batch_size: int) -> list[TaskSpec]:
    """eval.tasks (already checked by the recipe) as TaskSpecs; batch_size: eval.batch_size."""
    specs = []
    for entry in entries:
        if isinstance(entry, str):
            specs.append(TaskSpec(entry.strip(), batch_size=batch_size))
        else:
            specs.append(
                TaskSpec(
                    entry["task"].strip(),
                    entry.get("num_fewshot"),
                    entry.get("limit"),
                    entry.get("batch_size") or batch_size,
                )
            )
    return specs


def parse_task_names(text: str) -> list[str]:
    """--tasks T1,T2 -> ["T1", "T2"]."""
    names = [n.strip() for n in text.split(",")]
    if not all(names):
        raise BtxError(f"--tasks {text}: expected comma-separated task names, e.g. --tasks arc_easy,piqa")
    return names


def canonical_hash(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode("utf-8")).hexdigest()


@contextmanager
def quiet_lm_eval() -> Iterator[None]:
    """lm-eval logs every step at INFO and draws tqdm bars; btx shows its own progress."""
    from tqdm import tqdm  # lm_eval's dependency: its bars are this class

    loggers = [logging.getLogger(name) for name in ("lm_eval", "datasets", "evaluate")]
    levels = [lg.level for lg in loggers]
    init = tqdm.__init__
    tqdm.__init__ = partialmethod(init, disable=True)  # tqdm reads TQDM_DISABLE only at import
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        tqdm.__init__ = init
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


class TaskSuite:
    """The requested tasks, found through lm-eval (see the module docstring)."""

    def __init__(self, specs: list[TaskSpec], include_path: str | os.PathLike | None = None):
        self.lm_eval = require_lm_eval()
        from lm_eval.tasks import TaskManager  # optional package, as above

        self.specs = specs
        self.include_path = Path(include_path).absolute() if include_path else None
        if self.include_path is not None and not self.include_path.is_dir():
            raise BtxError(f"--include-path {include_path}: no such directory (expected lm-eval task YAMLs)")
        self.version = self.lm_eval.__version__
        with quiet_lm_eval():
            manager = None
            if self.include_path is not None:
                manager = TaskManager(include_path=str(self.include_path), include_defaults=False)
            if manager is None or any(s.name not in manager.task_index for s in specs):
                manager = TaskManager(include_path=str(self.include_path) if self.include_path else None)
        self.manager = manager
        for s in specs:
            if s.name not in manager.task_index:
                close = difflib.get_close_matches(s.name, manager.all_tasks, n=1, cutoff=0.6)
                where = f" or under {self.include_path}" if self.include_path else " (local tasks: --include-path DIR)"
                hint = f"; did you mean {close[0]}?" if close else ""
                raise BtxError(f"task {s.name!r}: not an lm-eval task{where}{hint}")
        self._loaded: dict[str, Any] = {}
        self._identity = {s.name: self._task_identity(s.name) for s in specs}

    # -- what a task is -------------------------------------------------------------------

    def _local_yaml(self, name: str) -> Path | None:
        entry = self.manager.task_index[name]
        path = getattr(entry, "yaml_path", None)
        if path is None or self.include_path is None:
            return None
        path = Path(path).absolute()
        return path if path.is_relative_to(self.include_path) else None

    def _task_identity(self, name: str) -> dict:
        entry = self.manager.task_index[name]
        identity: dict[str, Any] = {"name": name, "kind": str(entry.kind), "lm_eval": self.version}
        local = self._local_yaml(name)
        if local is not None:  # any file of the include path may be part of it (includes, data, functions)
            identity["files"] = {
                p.relative_to(self.include_path).as_posix(): cached_sha256(p)
                for p in sorted(self.include_path.rglob("*"))
                if p.is_file() and not any(part.startswith(".") for part in p.relative_to(self.include_path).parts)
            }
            identity["data"] = {str(p): cached_sha256(p) for p in _data_files(self._config(name) or {}) if p.is_file()}
        elif getattr(entry, "yaml_path", None):
            identity["yaml"] = cached_sha256(entry.yaml_path)
        return identity

    def _config(self, name: str) -> dict | None:
        """A local task's config with its relative data_files made absolute (None: load it by name)."""
        local = self._local_yaml(name)
        if local is None or self.manager.task_index[name].kind.name != "TASK":
            return None
        from lm_eval.tasks._yaml_loader import load_yaml  # optional package, as above

        config = load_yaml(local, resolve_func=True)
        if config.get("task") != name:
            return None
        kwargs = config.get("dataset_kwargs") or {}
        if "data_files" in kwargs:
            config["dataset_kwargs"] = {**kwargs, "data_files": _absolute_files(kwargs["data_files"], local.parent)}
        return config

    def key(self, spec: TaskSpec, model_identity: dict, device: str, dtype: str) -> str:
        """The sha256 a result of `spec` on a model is stored under (see TaskCache)."""
        return canonical_hash(
            {
                "record": RECORD_VERSION,
                "task": self._identity[spec.name],
                "spec": asdict(spec),
                "model": model_identity,
                "device": device,
                "dtype": dtype,
            }
        )

    # -- loading and running --------------------------------------------------------------

    def load(self, spec: TaskSpec):
        """The built lm-eval Task or Group of `spec` (its dataset read once per suite)."""
        if spec.name not in self._loaded:
            config = self._config(spec.name)
            try:
                with quiet_lm_eval():
                    loaded = self.manager.load([config if config is not None else spec.name])
            except (ConnectionError, OSError) as exc:
                raise BtxError(
                    f"task {spec.name!r}: its dataset could not be read ({first_line(exc)}); a task "
                    "whose data is on the Hugging Face Hub needs the Hub (or its cached copy, with "
                    "HF_DATASETS_OFFLINE=1); offline, use local tasks (docs/TASKS.md)"
                ) from None
            except Exception as exc:  # lm-eval reports a bad task YAML with whatever its parts raise
                raise BtxError(f"task {spec.name!r}: lm-eval could not load it ({first_line(exc)})") from None
            built = loaded["groups"].get(spec.name) or loaded["tasks"].get(spec.name)
            self._loaded[spec.name] = built if built is not None else (config or spec.name)
        return self._loaded[spec.name]

    def check(self, specs: list[TaskSpec] | None = None) -> None:
        """Load every task (the datasets): the errors come before any model runs."""
        for spec in specs if specs is not None else self.specs:
            self.load(spec)

    def run(self, lm, spec: TaskSpec) -> dict:
        """One model on one task: lm-eval's results as a record (see `task_record`)."""
        task = self.load(spec)
        try:
            with quiet_lm_eval(), _without_env_report():
                results = self.lm_eval.simple_evaluate(
                    model=lm,
                    tasks=[task],
                    num_fewshot=spec.num_fewshot,
                    limit=spec.limit,
                    task_manager=self.manager,
                    log_samples=False,
                    confirm_run_unsafe_code=False,
                )
        except BtxError:
            raise
        except Exception as exc:
            raise BtxError(
                f"task {spec.name!r} on {getattr(lm, 'name', 'the model')}: lm-eval failed ({first_line(exc)})"
            ) from exc
        return task_record(results, spec.name)


@contextmanager
def _without_env_report() -> Iterator[None]:
    """simple_evaluate ends by collecting torch's environment report (pip, nvidia-smi: about 1.5 s
    a call, once per model and task here); btx's records name the versions that decide a result."""
    import lm_eval.evaluator as evaluator  # optional package, imported by TaskSuite already

    report = evaluator.add_env_info
    evaluator.add_env_info = lambda results: None
    try:
        yield
    finally:
        evaluator.add_env_info = report


def _data_files(config: dict) -> list[Path]:
    files = (config.get("dataset_kwargs") or {}).get("data_files")
    if isinstance(files, str):
        return [Path(files)]
    if isinstance(files, list):
        return [Path(f) for f in files]
    if isinstance(files, dict):
        return [Path(f) for v in files.values() for f in ([v] if isinstance(v, str) else v)]
    return []


def _absolute_files(files, base: Path):
    """data_files (a path, a list, or {split: path or list}) with relative paths under `base`."""

    def one(f: str) -> str:
        return f if Path(f).is_absolute() or not (base / f).exists() else str(base / f)

    if isinstance(files, str):
        return one(files)
    if isinstance(files, list):
        return [one(f) for f in files]
    if isinstance(files, dict):
        return {k: one(v) if isinstance(v, str) else [one(f) for f in v] for k, v in files.items()}
    return files


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def task_record(results: dict, name: str) -> dict:
    """{metric, value, stderr, metrics, stderrs, higher_is_better, n_samples, num_fewshot,
    version, subtasks} of task or group `name` from simple_evaluate's results. The primary metric
    is the first lm-eval reports; a group without an aggregate of its own averages its members'."""
    subtasks = list((results.get("group_subtasks") or {}).get(name) or [])
    row = (results.get("results") or {}).get(name) or {}
    metrics, stderrs = {}, {}
    for key, value in row.items():
        if "," not in key:
            continue
        metric, _, filt = key.partition(",")
        if metric.endswith("_stderr"):
            stderrs[f"{metric[: -len('_stderr')]},{filt}"] = _number(value)
        elif _number(value) is not None:
            metrics[key] = _number(value)
    members = {s: task_record(results, s) for s in subtasks}
    if not metrics and members:  # a group that reports no aggregate: the mean of its members
        values = [m["value"] for m in members.values() if m["value"] is not None]
        metrics = {"mean of members": sum(values) / len(values)} if values else {}
    if not metrics:
        raise BtxError(f"task {name!r}: lm-eval reported no metric")
    primary = next(iter(metrics))
    metric_name = primary.partition(",")[0]
    higher = (results.get("higher_is_better") or {}).get(name, {}).get(metric_name, True)
    samples = (results.get("n-samples") or {}).get(name) or {}
    return {
        "metric": primary,
        "value": metrics[primary],
        "stderr": stderrs.get(primary),
        "higher_is_better": bool(higher) if higher is not None else True,
        "metrics": metrics,
        "stderrs": stderrs,
        "n_samples": samples.get("effective") if samples else sum(m["n_samples"] or 0 for m in members.values()),
        "num_fewshot": (results.get("n-shot") or {}).get(name),
        "version": (results.get("versions") or {}).get(name),
        "subtasks": {s: m["value"] for s, m in members.items()},
    }


class TaskCache:
    """One JSON file per result, named by its key (TaskSuite.key), in `directory`."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)

    def path(self, key: str) -> Path:
        return self.directory / f"{key}.json"

    def get(self, key: str) -> dict | None:
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            stored = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None  # a damaged entry is redone
        return stored.get("result") if isinstance(stored, dict) and stored.get("key") == key else None

    def put(self, key: str, result: dict, about: dict) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        data = dumps_json({"key": key, **about, "result": result}, indent=2, sort_keys=True) + "\n"
        write_bytes_atomic(self.path(key), data.encode("utf-8"), durable=False)
