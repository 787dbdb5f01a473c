"""Value checks for recipe sections: each section's `check(c)` states its ranges through a Checker
that knows the file and the key prefix, so every message reads `<file>: <key>: <expected>`.
"""

import dataclasses
import difflib
import re
import typing
from typing import Any, Dict, List, Optional

from btx.errors import BtxError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
GLOB_CHARS = re.compile(r"[*?\[]")
# Names the run directory and the merge give meanings of their own, so no domain may take them:
# "seed" is the seed's expert and row, "seed.<i>" and "blend.<i>" are merge expert names, and
# "general" is finetune.general's data-only domain (refused only when that is set).
RESERVED_DOMAINS = ("seed",)
RESERVED_DOMAIN_PREFIXES = ("seed.", "blend.")


# ---------------------------------------------------------------------------------------------
# Value checks. Each section's `check(c)` states its ranges; `c` knows the file and key prefix.
# ---------------------------------------------------------------------------------------------


class Checker:
    """Raises BtxError("<file>: <prefix.key>: <message>") for a value out of range."""

    def __init__(self, label: str, prefix: str = "", origins: Optional[List[tuple]] = None):
        self.label, self.prefix = label, prefix
        self.origins = origins or []  # (dotted key, override text) for keys set on the command line

    def at(self, prefix: str) -> "Checker":
        return Checker(self.label, join_key(self.prefix, prefix), self.origins)

    def fail(self, key: str, message: str) -> typing.NoReturn:
        full = join_key(self.prefix, key)
        label = self.label
        for okey, text in reversed(self.origins):  # name the override that set this value, if one did
            if okey == full or full.startswith((okey + ".", okey + "[")) or okey.startswith(full + "."):
                label = f"{label} (override {text!r})"
                break
        raise BtxError(f"{label}: {full}: {message}" if full else f"{label}: {message}")

    def that(self, ok: bool, key: str, message: str) -> None:
        if not ok:
            self.fail(key, message)

    def positive(self, obj: Any, *keys: str) -> None:
        for key in keys:
            value = getattr(obj, key)
            self.that(value is None or value > 0, key, f"must be > 0, got {value!r}")

    def non_negative(self, obj: Any, *keys: str) -> None:
        for key in keys:
            value = getattr(obj, key)
            self.that(value is None or value >= 0, key, f"must be >= 0, got {value!r}")

    def choice(self, obj: Any, key: str, options: tuple) -> None:
        value = getattr(obj, key)
        if value is not None and value not in options:
            expected = ", ".join(map(str, options))
            self.fail(key, f"expected one of {expected}; got {value!r}{suggest(str(value), options)}")

    def choices(self, obj: Any) -> None:
        """Every field of `obj` that declares its choices (btx.recipe.settings.setting) holds one of them."""
        for f in dataclasses.fields(obj):
            if f.metadata.get("choices") is not None:
                self.choice(obj, f.name, f.metadata["choices"])

    def name(self, value: str, key: str) -> None:
        self.that(
            bool(NAME_RE.match(value)),
            key,
            f"{value!r} is not a usable name (letters, digits, '_', '-', '.'; it names a directory)",
        )

    def weights(self, weights: Dict[str, float], key: str, allowed: Optional[List[str]] = None) -> None:
        for name, w in weights.items():
            if allowed is not None and name not in allowed:
                self.fail(
                    f"{key}.{name}",
                    f"not a domain of this experiment (domains: {', '.join(allowed) or 'none'})"
                    + suggest(name, allowed),
                )
            self.that(w >= 0, f"{key}.{name}", f"weights must be >= 0, got {w!r}")
        if weights:
            self.that(sum(weights.values()) > 0, key, "weights must sum to more than 0")


def join_key(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix and key else (prefix or key)


def suggest(word: str, options) -> str:
    close = difflib.get_close_matches(word, [str(o) for o in options], n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""
