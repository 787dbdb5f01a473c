"""The ledger of a run (`<run_dir>/pipeline.json`) and the Pipeline object stages run through.

The ledger records, per stage (btx/run/stage.py drives them), its key, the identity of the outputs
it left, a one-line summary, its seconds and when it finished; a stage with parts (the experts of
branch) records each part's key and outputs in its entry. `Pipeline.verdict` decides from it and
from the outputs' DONE.json whether a stage is fresh, adoptable, missing, damaged, stale or foreign
(docs/PROVENANCE.md has the rules).
"""

from __future__ import annotations

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
from btx.io.manifest import changed_inputs, damaged_outputs, read_done
from btx.recipe.experiment import to_plain


def key_of(*parts) -> str:
    blob = json.dumps(
        [to_plain(p) if not isinstance(p, (str, int, float, type(None))) else p for p in parts],
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def outputs_key(directories: list[Path]) -> str:
    """Identity of finished outputs: the sha256 of their files as their DONE.json list them."""
    return key_of([(read_done(d) or {}).get("outputs") for d in directories])


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
        self.ledger_path = exp.paths.ledger
        self.ledger: dict = json.loads(self.ledger_path.read_text()) if self.ledger_path.is_file() else {}
        # The content key of each stage done or kept so far (a stage with parts: one per part), which
        # the stages after it key on.
        self.keys: dict[str, str | dict[str, str]] = {}

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
        made_here = bool(entry) and entry.get("outputs") in (None, outputs_key(done_dirs))
        changed = [
            c
            for path, done in zip(done_dirs, dones, strict=True)
            for c in changed_inputs(done.get("input_identities"), path)
        ]
        if changed:
            return ("stale" if made_here or adopt is None else "foreign"), changed[0]
        if entry.get("key") == key and made_here:
            return "fresh", ""
        if not entry:
            why = (
                "this run's ledger has no record of it (made by a stage command, or by a btx run killed before it "
                "noted it)"
            )
        elif entry.get("key") != key:
            why = "its recipe sections or inputs changed"
        else:
            why = "replaced since this run made it"
        reason = adopt(dones) if adopt is not None else why
        if reason is None:
            return "adopt", why
        return ("stale", why) if made_here or adopt is None else ("foreign", reason)

    def refuse(self, stage: str, path: Path, reason: str) -> BtxError:
        return BtxError(
            f"{path}: not made by this btx run, and it does not follow from the recipe as given "
            f"({reason}); give btx run the settings it was made with to go on from it, or run "
            f"`btx run {self.recipe_path} --from {stage}` to redo it from the recipe (or move it away)"
        )

    def remove(self, name: str, paths: list[Path], why: str, quiet: bool = False) -> None:
        for path in paths:
            if not quiet:
                self.console.print(f"[yellow]{name}: redoing {path}: {why or 'its inputs changed'}[/]", soft_wrap=True)
            if path.is_symlink():  # the link goes, not what it points to (btx.io.atomic.remove_path)
                path.unlink()
            else:
                shutil.rmtree(path)

    def record(
        self,
        stage: str,
        key: str,
        summary: str,
        seconds: float,
        outputs: str | dict | None = None,
        parts: dict[str, str] | None = None,
    ) -> None:
        self.ledger[stage] = {
            "key": key,
            "summary": summary,
            "seconds": round(seconds, 2),
            "outputs": outputs,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **({"parts": parts} if parts is not None else {}),
        }
        self.run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.ledger_path, self.ledger)


def to_remove(
    verdict: str, changed: bool, repairs_itself: bool, outputs: list[Path], scratch: list[Path]
) -> list[Path]:
    """What must not survive a redo: everything of a stale stage (also an unfinished one whose key
    changed: its checkpoints are of other settings); the outputs of a damaged one, unless its work
    exports them again by itself from its checkpoints (training)."""
    if verdict == "stale" or (changed and verdict in ("missing", "damaged")):
        return [*outputs, *scratch]
    if verdict == "damaged" and not repairs_itself:
        return list(outputs)
    return []
