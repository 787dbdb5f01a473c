"""Checking a recipe's plain YAML values against the schema's types, before OmegaConf builds it.

    typecheck(raw, ExperimentRecipe, "recipes/demo/btx.yaml", "")   # BtxError of one line, or nothing
    rename_old_keys(raw, ExperimentRecipe, label)                     # old setting names, with a note

Every error names the file (`label`) and the dotted key: `<file>: <key>: <what was expected>`.
An unknown key gets a did-you-mean, a key that moved to another section (a schema's MOVED_KEYS)
says where it went, and a value that OmegaConf would interpolate (`${...}`) is left for it.
"""

import dataclasses
import typing
from typing import Any, Dict, List, Optional

from btx.errors import BtxError, note_renamed
from btx.recipe.check import join_key, suggest


def is_interpolation(value: Any) -> bool:
    return isinstance(value, str) and "${" in value


def describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}" if value is not None else "null"


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " or null"
    if origin in (dict, Dict):
        return "a mapping"
    if origin in (list, List):
        return "a list"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def typecheck(value: Any, tp: Any, label: str, key: str, partial: Optional[type] = None) -> None:
    """Check a plain YAML value against a schema type; unknown keys and wrong types are errors."""
    if is_interpolation(value) or tp is Any:
        return
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    fail = lambda msg: fail_at(label, key, msg)  # noqa: E731

    if partial is not None:  # a Dict[str, Any] that overrides some keys of `partial`
        if not isinstance(value, dict):
            fail(f"expected a mapping of {partial.__name__} keys, got {describe(value)}")
        _typecheck_fields(value, partial, label, key)
        return
    if origin is typing.Union:
        if value is None and type(None) in args:
            return
        inner = [a for a in args if a is not type(None)]
        if value is None:
            fail(f"expected {_type_name(tp)}, got null")
        typecheck(value, inner[0], label, key)
        return
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            fail(f"expected a mapping, got {describe(value)}")
        _typecheck_fields(value, tp, label, key)
        return
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            fail(f"expected a mapping, got {describe(value)}")
        for k, v in value.items():
            if not isinstance(k, str):
                fail_at(label, join_key(key, str(k)), f"keys must be strings, got {describe(k)} (quote it)")
            typecheck(v, args[1] if args else Any, label, join_key(key, k))
        return
    if origin in (list, List):
        if not isinstance(value, list):
            fail(f"expected a list, got {describe(value)}")
        for i, v in enumerate(value):
            typecheck(v, args[0] if args else Any, label, f"{key}[{i}]")
        return
    if value is None:
        fail(f"expected {_type_name(tp)}, got null")
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif tp is str:
        ok = isinstance(value, str)
        if not ok and isinstance(value, (int, float)) and not isinstance(value, bool):
            fail(f"expected a string, got {describe(value)} (quote the value)")
    else:
        ok = True
    if not ok:
        fail(f"expected {_type_name(tp)}, got {describe(value)}")


def _typecheck_fields(value: dict, schema: type, label: str, key: str) -> None:
    fields = {f.name: f for f in dataclasses.fields(schema)}
    hints = typing.get_type_hints(schema)
    for k, v in value.items():
        if k not in fields:
            moved = getattr(schema, "MOVED_KEYS", {}).get(k)
            if moved is not None:
                fail_at(label, join_key(key, str(k)), f"not a key of this section: it is {moved}")
            fail_at(label, join_key(key, str(k)), f"unknown key{suggest(str(k), fields)}")
        typecheck(v, hints[k], label, join_key(key, k), partial=fields[k].metadata.get("partial"))


def rename_old_keys(value: Any, schema: Any, label: str, key: str = "") -> None:
    """A key given by its setting's old name (btx.recipe.settings.setting(renamed=...)) takes the
    new name, with a one-line note; both names at once is an error."""
    schema = next((t for t in (schema, *typing.get_args(schema)) if dataclasses.is_dataclass(t)), None)
    if schema is None or not isinstance(value, dict):
        return
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        old, new = f.metadata.get("renamed"), join_key(key, f.name)
        if old is not None and old in value:
            if f.name in value:
                fail_at(label, join_key(key, old), f"the old name of {new}, which is given too: give {new} only")
            note_renamed(join_key(key, old), new)
            value[f.name] = value.pop(old)
        rename_old_keys(value.get(f.name), hints[f.name], label, new)


def fail_at(label: str, key: str, msg: str) -> typing.NoReturn:
    raise BtxError(f"{label}: {key}: {msg}" if key else f"{label}: {msg}")
