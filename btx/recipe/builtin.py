"""The recipes btx ships: `recipes/` in a source checkout, `btx/_recipes/` in a wheel. A name such
as `demo` resolves to its btx.yaml; anything else is taken as a path.
"""

import os
import re
from pathlib import Path
from typing import Dict

from btx.errors import BtxError
from btx.recipe.check import suggest


def builtin_recipes_dir() -> Path:
    """The recipes shipped with btx: `recipes/` in a source checkout or editable install,
    `btx/_recipes/` in a wheel (pyproject.toml maps one onto the other)."""
    package = Path(__file__).resolve().parents[1]  # btx/
    for candidate in (package / "_recipes", package.parent / "recipes"):
        if candidate.is_dir():
            return candidate
    raise BtxError(f"{package}: btx's built-in recipes are missing from this installation")


def resolve_recipe(spec: str | os.PathLike) -> Path:
    """A recipe file as given, or, when no such file exists and `spec` is a bare name, the built-in
    recipe of that name (recipes/<name>/btx.yaml), so `btx run demo` works from a wheel too."""
    path = Path(spec)
    if path.exists() or os.sep in str(spec) or path.suffix in (".yaml", ".yml"):
        return path
    shipped = builtin_recipes_dir() / str(spec) / "btx.yaml"
    return shipped if shipped.is_file() else path


def builtin_recipe_names() -> list[str]:
    """The names of the recipes btx ships, sorted (`demo`, `llama2-7b`, ...)."""
    return sorted(p.parent.name for p in builtin_recipes_dir().glob("*/btx.yaml"))


def builtin_recipes() -> Dict[str, str]:
    """{name: first line of its description} for every recipe btx ships."""
    out = {}
    for path in sorted(builtin_recipes_dir().glob("*/btx.yaml")):
        paragraph = []
        for line in path.read_text().splitlines():
            if not line.startswith("#") or not line.strip("# "):
                break
            paragraph.append(line.lstrip("#").strip())
        text = " ".join(paragraph)
        out[path.parent.name] = re.split(r"\.\s+(?=[A-Z])", text)[0].rstrip(".") + "." if text else ""
    return out


def builtin_recipe(name: str) -> Path:
    """`builtin_recipe("demo")` -> the demo's experiment recipe (recipes/demo/btx.yaml)."""
    path = builtin_recipes_dir() / name / "btx.yaml"
    if not path.is_file():
        available = builtin_recipe_names()
        raise BtxError(
            f"{name}: no built-in recipe of that name (available: {', '.join(available) or 'none'})"
            + suggest(name, available)
        )
    return path
