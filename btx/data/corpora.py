"""Built-in corpora for the embedded demo, made deterministically from what every Python has.

- `python_code`: the standard library's own top-level modules (`Lib/*.py`), one document per file.
- `arithmetic`: generated arithmetic problems with worked answers, one document per worksheet.
- `python_docs`: the English reference documentation that ships inside the standard library
  (`pydoc_data.topics`, the text behind `help("assert")`), one document per section.

Each is a function `(max_bytes, seed) -> iterator of documents`. The standard library differs a
little between Python versions, so the demo's exact numbers do too; the arithmetic corpus is the
same everywhere for a given seed.
"""

from __future__ import annotations

import functools
import random
import sysconfig
from collections.abc import Callable, Iterator
from pathlib import Path
from pydoc_data.topics import topics

from btx.errors import BtxError

BUILTIN_PREFIX = "builtin:"

# Top-level modules that are mostly data or generated tables, not code people write.
_SKIP_MODULES = {"_pydecimal.py", "pydoc.py", "this.py", "antigravity.py", "_collections_abc.py"}


def python_code(max_bytes: int = 2_000_000, seed: int = 0) -> Iterator[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.glob("*.py") if p.name not in _SKIP_MODULES)
    random.Random(seed).shuffle(files)  # a spread of modules, not just the alphabet's start
    total = 0
    for path in files:
        source = path.read_text(encoding="utf-8", errors="replace")
        # Top-level definitions are separated by two blank lines (PEP 8): cut there into ~3 KB
        # documents, so that the train/validation split by document has enough documents.
        for text in _chunks(source.split("\n\n\n"), "\n\n\n", 3000):
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

    total = 0
    for name in sorted(topics):
        # Topics run to tens of KB; ~2 KB sections make a finer train/validation split.
        for text in _chunks(topics[name].split("\n\n"), "\n\n", 2000):
            if total + len(text) > max_bytes:
                return
            total += len(text)
            yield text


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
