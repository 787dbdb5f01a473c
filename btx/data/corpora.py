"""Built-in corpora for the embedded demo, made deterministically from what every Python has.

- `python_code`: the standard library's own top-level modules (`Lib/*.py`), one document per file.
- `arithmetic`: generated arithmetic problems with worked answers, one document per worksheet.
- `python_docs`: the English reference documentation that ships inside the standard library
  (`pydoc_data.topics`, the text behind `help("assert")`), one document per section.
- `python_library` and `python_prose`: the same two, extended for the demo's seed (recipes/demo-seed),
  which must see more text than the experts: `python_code`'s documents in the same order, then the
  standard library's packages (`Lib/<package>/**.py`, test suites, codec tables and `pydoc_data`
  left out); `python_docs`'s sections, then the docstrings of those packages. Because each starts
  with its smaller corpus's documents, a domain built on it with the same `data.seed` and
  `val_fraction` holds out exactly the documents the demo's domain holds out, and more.

Each is a function `(max_bytes, seed) -> iterator of documents`. The standard library differs a
little between Python versions, so the demo's exact numbers do too; the arithmetic corpus is the
same everywhere for a given seed.
"""

from __future__ import annotations

import ast
import functools
import itertools
import random
import sysconfig
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from pydoc_data.topics import topics

from btx.errors import BtxError

BUILTIN_PREFIX = "builtin:"

# Top-level modules that are mostly data or generated tables, not code people write.
_SKIP_MODULES = {"_pydecimal.py", "pydoc.py", "this.py", "antigravity.py", "_collections_abc.py"}


# Package directories left out of `python_library`: generated codec tables, the text of
# `python_docs`, installed third-party code, build files.
_SKIP_PACKAGES = {"encodings", "pydoc_data", "site-packages", "dist-packages", "__pycache__"}
_TEST_DIRS = {"test", "tests", "idle_test"}


def python_code(max_bytes: int = 2_000_000, seed: int = 0) -> Iterator[str]:
    return _capped(_module_documents(_top_level_modules(seed)), max_bytes)


def python_library(max_bytes: int = 2_000_000, seed: int = 0) -> Iterator[str]:
    modules = itertools.chain(_top_level_modules(seed), _package_modules(seed))
    return _capped(_module_documents(modules), max_bytes)


def _stdlib() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _top_level_modules(seed: int) -> list[Path]:
    files = sorted(p for p in _stdlib().glob("*.py") if p.name not in _SKIP_MODULES)
    random.Random(seed).shuffle(files)  # a spread of modules, not just the alphabet's start
    return files


def _package_modules(seed: int) -> list[Path]:
    stdlib = _stdlib()
    files = sorted(p for p in stdlib.glob("*/**/*.py") if _is_library_module(p.relative_to(stdlib).parts))
    random.Random(seed).shuffle(files)
    return files


def _is_library_module(parts: tuple[str, ...]) -> bool:
    """A module of a standard-library package (path parts under Lib/), not a test or a build file."""
    return not (_SKIP_PACKAGES | _TEST_DIRS) & set(parts) and not parts[0].startswith("config-")


def _module_documents(files: Iterable[Path]) -> Iterator[str]:
    for path in files:
        source = path.read_text(encoding="utf-8", errors="replace")
        # Top-level definitions are separated by two blank lines (PEP 8): cut there into ~3 KB
        # documents, so that the train/validation split by document has enough documents.
        yield from _chunks(source.split("\n\n\n"), "\n\n\n", 3000)


def _capped(documents: Iterable[str], max_bytes: int) -> Iterator[str]:
    """The documents while their running total stays within max_bytes (characters, as ever)."""
    total = 0
    for text in documents:
        if total + len(text) > max_bytes:
            return
        total += len(text)
        yield text


def _chunks(pieces: list[str], sep: str, size: int) -> Iterator[str]:
    group: list[str] = []
    for piece in pieces:
        group.append(piece)
        if sum(map(len, group)) >= size:
            yield sep.join(group).strip() + "\n"
            group = []
    if group and sep.join(group).strip():
        yield sep.join(group).strip() + "\n"


def python_docs(max_bytes: int = 2_000_000, seed: int = 0) -> Iterator[str]:
    return _capped(_topic_sections(), max_bytes)


def python_prose(max_bytes: int = 2_000_000, seed: int = 0) -> Iterator[str]:
    return _capped(itertools.chain(_topic_sections(), _docstring_sections(_package_modules(seed))), max_bytes)


def _topic_sections() -> Iterator[str]:
    for name in sorted(topics):
        # Topics run to tens of KB; ~2 KB sections make a finer train/validation split.
        yield from _chunks(topics[name].split("\n\n"), "\n\n", 2000)


def _docstring_sections(files: Iterable[Path]) -> Iterator[str]:
    """Each module's docstrings (its own, its classes', its functions'), as ~2 KB sections of
    English. The source is parsed, never imported."""
    for path in files:
        try:
            tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
        except (SyntaxError, ValueError):  # a module written for another Python version
            continue
        docs = [
            ast.get_docstring(node)
            for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        ]
        yield from _chunks([d for d in docs if d], "\n\n", 2000)


def _problem(rng: random.Random) -> str:
    kind = rng.choice(("add", "sub", "mul", "div", "two_step", "paren"))
    a, b, c = rng.randint(2, 999), rng.randint(2, 999), rng.randint(2, 99)
    if kind == "add":
        return f"Q: What is {a} + {b}?\nA: {a} + {b} = {a + b}. The answer is {a + b}.\n"
    if kind == "sub":
        return f"Q: What is {a} - {b}?\nA: {a} - {b} = {a - b}. The answer is {a - b}.\n"
    if kind == "mul":
        x, y = rng.randint(2, 99), rng.randint(2, 99)
        return f"Q: What is {x} * {y}?\nA: {x} * {y} = {x * y}. The answer is {x * y}.\n"
    if kind == "div":
        x, y = rng.randint(2, 99), rng.randint(2, 99)
        return f"Q: What is {x * y} / {y}?\nA: {x * y} / {y} = {x}. The answer is {x}.\n"
    if kind == "two_step":
        return (
            f"Q: Compute {a} + {b} - {c}.\nA: First {a} + {b} = {a + b}. "
            f"Then {a + b} - {c} = {a + b - c}. The answer is {a + b - c}.\n"
        )
    x, y = rng.randint(2, 99), rng.randint(2, 20)
    return (
        f"Q: Compute ({x} + {c}) * {y}.\nA: First {x} + {c} = {x + c}. "
        f"Then {x + c} * {y} = {(x + c) * y}. The answer is {(x + c) * y}.\n"
    )


def arithmetic(max_bytes: int = 2_000_000, seed: int = 0) -> Iterator[str]:
    rng = random.Random(f"btx-arithmetic-{seed}")
    total = 0
    while True:
        sheet = "".join(_problem(rng) for _ in range(rng.randint(10, 30)))
        if total + len(sheet) > max_bytes:
            return
        total += len(sheet)
        yield sheet


BUILTIN_CORPORA: dict[str, Callable[..., Iterator[str]]] = {
    "python_code": python_code,
    "arithmetic": arithmetic,
    "python_docs": python_docs,
    "python_library": python_library,
    "python_prose": python_prose,
}


def builtin_corpus(name: str, max_bytes: int, seed: int = 0) -> Iterator[str]:
    if name not in BUILTIN_CORPORA:
        raise BtxError(f"data.builtin: unknown built-in corpus {name!r}; expected one of {sorted(BUILTIN_CORPORA)}")
    return BUILTIN_CORPORA[name](max_bytes=max_bytes, seed=seed)


def builtin_source(name: str, max_bytes: int = 2_000_000, seed: int = 0):
    """A built-in corpus as a reproducible source (a partial, so its description is stable)."""
    if name not in BUILTIN_CORPORA:
        raise BtxError(
            f"{BUILTIN_PREFIX}{name}: unknown built-in corpus; expected one of {', '.join(sorted(BUILTIN_CORPORA))}"
        )
    return functools.partial(builtin_corpus, name, max_bytes, seed)
