"""The one error type btx raises for bad input.

The CLI turns a BtxError into a single line on stderr and exit status 2; anything
else is a bug and keeps its traceback. Messages name the file, key or tensor at
fault and say what was expected. Input that uses an old name still works, with one line of note.
"""

import re
import sys
from pathlib import Path


class BtxError(Exception):
    """Bad input from the user: a recipe, a checkpoint, a data file or a flag."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread (btx.cli.main installs the handler where SIGTERM has its
    default action): unwinds like Ctrl-C, so atomic writes remove their temporaries and locks are
    released, and the command ends with one line and status 143 instead of vanishing."""


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def missing_checkpoint(path, written: str | None = None) -> str:
    """The message for a checkpoint directory that does not exist. `written` is how the user wrote
    it, when that differs from the resolved path; a Hugging Face Hub id (org/name) gets a hint."""
    given = str(written if written is not None else path)
    if _HUB_ID.match(given) and not Path(path).exists():
        return (
            f"{path}: no such directory; '{given}' looks like a Hugging Face Hub id, and btx reads local "
            f"checkpoints only: download it first (hf download {given} --local-dir DIR) and pass DIR"
        )
    return f"{path}: not a checkpoint directory (missing, or a file)"


_NOTED: set[str] = set()


def note_renamed(old: str, new: str) -> None:
    """One line on stderr, once per process, when a setting or flag is given by its old name."""
    if old not in _NOTED:
        _NOTED.add(old)
        print(f"btx: note: {old} is now {new}; the old name still works but will go", file=sys.stderr)


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (OmegaConf's `msg` when it has one), for one-line errors."""
    text = str(getattr(e, "msg", None) or e).strip()
    return text.splitlines()[0] if text else type(e).__name__
