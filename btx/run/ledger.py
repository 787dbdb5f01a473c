"""The ledger of a run (`<run_dir>/pipeline.json`) and the Pipeline object stages run through.

A stage's key hashes the recipe sections it reads and the content of the stages it consumes;
`Pipeline.stage` runs a stage's work unless its outputs are finished, intact, made from the same
inputs and recorded under the same key (docs/PROVENANCE.md has the rules).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from rich.console import Console

from btx.errors import BtxError
from btx.io.atomic import write_json_atomic
from btx.io.manifest import DONE_NAME, changed_inputs, damaged_outputs, read_done

STAGES = ("prepare", "seed", "branch", "merge", "finetune", "grow", "baselines", "eval", "analyze")
LEDGER = "pipeline.json"


def _key(*parts) -> str:
    from btx.recipe.experiment import to_plain

    blob = json.dumps([to_plain(p) if not isinstance(p, (str, int, float, type(None))) else p for p in parts],
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _outputs_key(directories: list[Path]) -> str:
    """Identity of finished outputs: the sha256 of their files as their DONE.json list them."""
    return _key([(read_done(d) or {}).get("outputs") for d in directories])


Adopt = Callable[[list[dict]], "str | None"]  # DONE.json dicts -> why they do not follow from the recipe, or None


@dataclass
class StageOutcome:
    name: str
    state: str  # ran | skipped | off
    seconds: float = 0.0
    summary: str = ""


class Pipeline:
    def __init__(self, exp, recipe_path: Path, overrides: list[str], console: Console):
        self.exp, self.recipe_path, self.overrides, self.console = exp, recipe_path, overrides, console
        self.run_dir: Path = exp.run_dir
        self.ledger_path = self.run_dir / LEDGER
        self.ledger: dict = json.loads(self.ledger_path.read_text()) if self.ledger_path.is_file() else {}
        self.keys: dict[str, str] = {}

    # -- the ledger -----------------------------------------------------------------------------

    def verdict(self, key: str, done_dirs: list[Path], adopt: Adopt | None, entry: dict) -> tuple[str, str]:
        """What to do with a stage (or one expert) whose ledger entry is `entry`:
        fresh | adopt (kept, made outside this run from the same settings) | missing | damaged |
        stale (redo) | foreign (made outside this run from other settings: refuse), and why."""
        dones = [read_done(p) for p in done_dirs]
        if any(done is None for done in dones):
            return "missing", ""
        for path in done_dirs:
            problems = damaged_outputs(path)
            if problems:
                return "damaged", problems[0]
        made_here = bool(entry) and entry.get("outputs") in (None, _outputs_key(done_dirs))
        changed = [c for path, done in zip(done_dirs, dones) for c in changed_inputs(done.get("input_identities"), path)]
        if changed:
            return ("stale" if made_here or adopt is None else "foreign"), changed[0]
        if entry.get("key") == key and made_here:
            return "fresh", ""
        if not entry:
            why = "this run's ledger has no record of it (made by a stage command, or by a btx run killed before it noted it)"
        elif entry.get("key") != key:
            why = "its recipe sections or inputs changed"
        else:
            why = "replaced since this run made it"
        reason = adopt(dones) if adopt is not None else why
        if reason is None:
            return "adopt", why
        return ("stale", why) if made_here or adopt is None else ("foreign", reason)

    def refuse(self, stage: str, path: Path, reason: str) -> BtxError:
        return BtxError(f"{path}: not made by this btx run, and it does not follow from the recipe as given "
                        f"({reason}); give btx run the settings it was made with to go on from it, or run "
                        f"`btx run {self.recipe_path} --from {stage}` to redo it from the recipe (or move it away)")

    def clear(self, name: str, verdict: str, why: str, done_dirs: list[Path], extra_dirs, *, changed: bool,
              repairs_itself: bool) -> None:
        """Remove what must not survive a redo: everything of a stale stage (also an unfinished one
        whose key changed: its checkpoints are of other settings); the outputs of a damaged one,
        unless its work exports them again by itself from its checkpoints."""
        if verdict == "stale" or (changed and verdict in ("missing", "damaged")):
            remove = [*done_dirs, *extra_dirs]
        elif verdict == "damaged" and not repairs_itself:
            remove = list(done_dirs)
        else:
            remove = []  # a damaged training stage: its job says so and exports it again
        for path in remove:
            if path.exists():
                self.console.print(f"[yellow]{name}: redoing {path}: {why or 'its inputs changed'}[/]", soft_wrap=True)
                shutil.rmtree(path)

    def record(self, stage: str, key: str, summary: str, seconds: float, outputs: str | None = None) -> None:
        self.ledger[stage] = {"key": key, "summary": summary, "seconds": round(seconds, 2), "outputs": outputs,
                              "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        self.run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.ledger_path, self.ledger)

    def stage(self, name: str, key: str, done_dirs: list[Path], work: Callable[[], str], force: bool,
              extra_dirs: tuple[Path, ...] = (), adopt: Adopt | None = None,
              repairs_itself: bool = False) -> StageOutcome:
        """Run `work` unless the stage is fresh (see the module docstring). `done_dirs` hold its
        DONE.json manifests; they and `extra_dirs` (work directories: checkpoints, logs) are
        removed when it is stale. `adopt` tells whether outputs made outside this run follow from
        the recipe; `repairs_itself`: `work` exports a damaged output again by itself (training)."""
        outputs = [*done_dirs, *extra_dirs]
        entry = self.ledger.get(name, {})
        if force:
            self.ledger.pop(name, None)
            for path in outputs:
                if path.exists():
                    shutil.rmtree(path)
        else:
            verdict, why = self.verdict(key, done_dirs, adopt, entry)
            if verdict == "fresh":
                self.keys[name] = _key(key, _outputs_key(done_dirs))
                return StageOutcome(name, "skipped", 0.0, entry.get("summary", ""))
            if verdict == "adopt":
                summary = f"kept {', '.join(str(p.relative_to(self.run_dir)) for p in done_dirs)}"
                self.console.print(f"[yellow]{name}: {summary}: {why}, but its {DONE_NAME} records the recipe's "
                                   "settings and inputs[/]", soft_wrap=True)
                self.record(name, key, summary, 0.0, _outputs_key(done_dirs))
                self.keys[name] = _key(key, _outputs_key(done_dirs))
                return StageOutcome(name, "skipped", 0.0, summary)
            if verdict == "foreign":
                raise self.refuse(name, next(p for p in done_dirs if p.exists()), why)
            self.clear(name, verdict, why, done_dirs, extra_dirs, changed=entry.get("key") not in (None, key),
                       repairs_itself=repairs_itself)
        self.console.rule(f"[bold]{name}")
        t0 = time.perf_counter()
        summary = work()
        seconds = time.perf_counter() - t0
        self.record(name, key, summary, seconds, _outputs_key(done_dirs))
        self.keys[name] = _key(key, _outputs_key(done_dirs))
        return StageOutcome(name, "ran", seconds, summary)


def _train_summary(done: dict) -> str:
    return f"{done['steps']} steps, {done['tokens']:,} tokens, val loss {done.get('val_loss') or float('nan'):.3f}"


def _baseline_settings(settings, steps: int):
    """The finetune's optimisation for `steps` steps; validation only at the end (eval then scores
    every model on the same windows anyway)."""
    return dataclasses.replace(settings, steps=steps, eval_every=steps)
