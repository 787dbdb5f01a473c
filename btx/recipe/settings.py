"""Settings that are recipe keys and command-line flags at once, declared once as dataclass fields.

    top_k: int = setting(2, flag="--top-k", metavar="K", help="experts per token, written to config.json")

The field holds the name, type and default; `setting` adds what the command line needs: the flag
(explicit, so that grep finds it), its help, its choices (from btx.choices), and `renamed`, the
field's old name, whose key (in a recipe) and flag (`--old-name`) still work with a one-line note.
`add_flags` declares the flags of a dataclass on an argparse parser, and `given` reads back the
values the command line gave, by field name: flag and field map one to one, and every field of a
class that `flags` is asked about must have a flag.

How a flag reads its value follows from the field's type: a bool's flag takes no value and sets
the opposite of the default (`--no-keep-seed`, `--average-all`); int, float and str take one;
`repeat` collects every use into a list, and `parse(value, flag)` turns the text into the field's
value where the type does not say how (`--weights code=3,seed=1`, `--prompt NAME=TEXT`).
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any, Callable

from btx.errors import BtxError, note_renamed

MISSING = dataclasses.MISSING


def setting(
    default: Any = MISSING,
    *,
    help: str,
    factory: Callable[[], Any] | Any = MISSING,
    flag: str | None = None,
    metavar: str | None = None,
    choices: tuple | None = None,
    repeat: bool = False,
    parse: Callable[[Any, str], Any] | None = None,
    renamed: str | None = None,
    default_help: str | None = None,
) -> Any:
    """A dataclass field that is also a command-line flag (`flag`; None: the recipe only).
    `default_help` says what a None default means, for the flag's help."""
    metadata = {
        "help": help,
        "flag": flag,
        "metavar": metavar,
        "choices": choices,
        "repeat": repeat,
        "parse": parse,
        "renamed": renamed,
        "default_help": default_help,
    }
    if factory is not MISSING:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def like(cls: type, name: str, *, default: Any = MISSING, default_help: str | None = None) -> Any:
    """The field `name` of `cls` again, for another dataclass that takes the same setting: the same
    flag, help and choices, and the same default unless `default` says otherwise."""
    source = next(f for f in dataclasses.fields(cls) if f.name == name)
    metadata = dict(source.metadata)
    if default_help is not None:
        metadata["default_help"] = default_help
    if default is not MISSING:
        return dataclasses.field(default=default, metadata=metadata)
    if source.default_factory is not MISSING:
        return dataclasses.field(default_factory=source.default_factory, metadata=metadata)
    return dataclasses.field(default=source.default, metadata=metadata)


def flags(cls: type) -> dict[str, dataclasses.Field]:
    """{flag: field} of every field of `cls`; a field without a flag is a programming error."""
    out = {}
    for f in dataclasses.fields(cls):
        flag = f.metadata.get("flag")
        if flag is None:
            raise TypeError(f"{cls.__name__}.{f.name} has no command-line flag (declare it with setting(flag=...))")
        if flag in out:
            raise TypeError(f"{cls.__name__}: {flag} is the flag of both {out[flag].name} and {f.name}")
        out[flag] = f
    return out


def renamed_flag(f: dataclasses.Field) -> str | None:
    """The flag a field had under its old name (`renamed`), still accepted."""
    old = f.metadata.get("renamed")
    return "--" + old.replace("_", "-") if old else None


class FlagAction(argparse.Action):
    """Stores a flag's value (appends it, with `repeat`; stores `const`, for a flag without a value).
    A flag's old spelling is a hidden flag of its own with `renamed_to`: using it prints a note."""

    def __init__(self, option_strings, dest, repeat: bool = False, renamed_to: str | None = None, **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.repeat, self.renamed_to = repeat, renamed_to

    def __call__(self, parser, namespace, values, option_string=None):
        if self.renamed_to is not None:
            note_renamed(option_string, self.renamed_to)
        if self.nargs == 0:
            values = self.const
        elif self.repeat:
            values = [*(getattr(namespace, self.dest, None) or []), values]
        setattr(namespace, self.dest, values)


def flags_of(cls: type, names: typing.Collection[str]) -> dict[str, dataclasses.Field]:
    """{flag: field} of the fields `names` of `cls` (a section whose other fields are recipe keys only)."""
    return {flag: f for flag, f in _all_flags(cls).items() if f.name in names}


def _all_flags(cls: type) -> dict[str, dataclasses.Field]:
    return {f.metadata["flag"]: f for f in dataclasses.fields(cls) if f.metadata.get("flag")}


def add_flags(group, cls: type, skip: typing.Collection[str] = (), only: typing.Collection[str] | None = None) -> None:
    """Declare the flag of every field of `cls` (or of the fields named in `only`) but those named
    in `skip` on `group` (an argparse parser or argument group). Each stores under the field's
    name, None when not given."""
    hints = typing.get_type_hints(cls)
    for flag, f in (flags(cls) if only is None else flags_of(cls, only)).items():
        if f.name in skip:
            continue
        meta, kind = f.metadata, _plain_type(hints[f.name])
        kwargs: dict[str, Any] = {"dest": f.name, "default": None, "action": FlagAction}
        if kind is bool:
            kwargs.update(nargs=0, const=not f.default)
        else:
            kwargs.update(
                type=kind if kind in (int, float) else str,
                metavar=meta.get("metavar"),
                choices=meta.get("choices"),
                repeat=meta.get("repeat"),
            )
        add_renamed(group, flag, renamed_flag(f), help=_help(f).replace("%", "%%"), **kwargs)


def add_renamed(group, flag: str, old: str | None, **kwargs) -> None:
    """`flag`, and its `old` spelling (if any) as a hidden flag that still works, with a note."""
    group.add_argument(flag, **kwargs)
    if old is not None:
        group.add_argument(old, **{**kwargs, "help": argparse.SUPPRESS, "renamed_to": flag})


def given(args: argparse.Namespace, cls: type, only: typing.Collection[str] | None = None) -> dict[str, Any]:
    """{field name: value} of the fields of `cls` (or of those named in `only`) whose flags the
    command line gave, parsed."""
    out = {}
    for flag, f in (flags(cls) if only is None else flags_of(cls, only)).items():
        value = getattr(args, f.name, None)
        if value is not None:
            parse = f.metadata.get("parse")
            out[f.name] = parse(value, flag) if parse is not None else value
    return out


def _plain_type(tp: Any) -> Any:
    """Optional[X] -> X; containers and Any -> the container / Any (read as text)."""
    if typing.get_origin(tp) is typing.Union:
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    return typing.get_origin(tp) or tp


def _help(f: dataclasses.Field) -> str:
    meta = f.metadata
    default = f.default if f.default is not MISSING else None
    if meta.get("default_help"):
        return f"{meta['help']} (default: {meta['default_help']})"
    if default is None or isinstance(default, bool):
        return meta["help"]
    return f"{meta['help']} (default {default})"


# ---------------------------------------------------------------------------------------------
# Values that a flag writes as text: NAME=VALUE pairs, prompts, averaging weights
# ---------------------------------------------------------------------------------------------


def pairs(items: list[str] | None, flag: str) -> dict[str, str]:
    """--flag NAME=VALUE, repeated: {NAME: VALUE}; a name given twice is an error."""
    out: dict[str, str] = {}
    for item in items or []:
        name, eq, value = item.partition("=")
        if not eq or not name or not value:
            raise BtxError(f"{flag} {item!r}: expected NAME=VALUE")
        if name in out:
            raise BtxError(f"{flag}: '{name}' given twice")
        out[name] = value
    return out


def prompt_lists(items: list[str] | None, flag: str) -> dict[str, list[str]]:
    """--prompt NAME=TEXT, repeated: {NAME: [TEXT, ...]} in the order given."""
    out: dict[str, list[str]] = {}
    for item in items or []:
        name, eq, text = item.partition("=")
        if not eq or not name or not text:
            raise BtxError(f"{flag} {item!r}: expected NAME=TEXT")
        out.setdefault(name, []).append(text)
    return out


def parse_weights(text: str, flag: str) -> str | dict[str, float]:
    """uniform, tokens, or NAME=W,NAME=W,...: {NAME: W}."""
    if text in ("uniform", "tokens"):
        return text
    weights = {}
    for name, value in pairs(text.split(","), flag).items():
        try:
            weights[name] = float(value)
        except ValueError:
            raise BtxError(f"{flag} {name}={value}: not a number") from None
    return weights
