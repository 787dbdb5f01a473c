"""Write the demo's local lm-eval tasks (recipes/demo/tasks/): two multiple-choice tasks made
from the demo's domains, small enough for a CPU and readable offline (dataset_path: json).

    demo_arith_mc        Q: What is 463 + 219?  A: 463 + 219 = [ 682 |  692 |  672 |  582 ]
    demo_code_next_line  six lines of a standard-library module, then which line comes next
                         (the true one or three other lines of the same module)

The documents are a pure function of the seeds below (and, for the code task, of this Python's
standard library), so the files are written once and committed; run this again only to change them:
    python tools/demo_tasks.py
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "recipes" / "demo" / "tasks"
DOCS = 200
MODULES = ("textwrap", "shlex", "fnmatch", "glob", "colorsys", "bisect", "heapq", "getopt", "calendar", "string")


def arithmetic(rng: random.Random) -> dict:
    op = rng.choice("+-*")
    a, b = (rng.randint(2, 999), rng.randint(2, 999)) if op != "*" else (rng.randint(2, 99), rng.randint(2, 99))
    answer = {"+": a + b, "-": a - b, "*": a * b}[op]
    wrong: list[int] = []
    for delta in rng.sample([1, -1, 10, -10, 100, -100, 2, -2], 8):
        if len(wrong) < 3 and answer + delta not in wrong:
            wrong.append(answer + delta)
    choices = [answer, *wrong]
    rng.shuffle(choices)
    return {
        "question": f"Q: What is {a} {op} {b}?\nA: {a} {op} {b} =",
        "choices": [f" {c}" for c in choices],
        "answer": choices.index(answer),
    }


def code_docs(rng: random.Random, n: int) -> list[dict]:
    import importlib
    import inspect

    lines_of = {}
    for name in MODULES:
        source = inspect.getsource(importlib.import_module(name))
        lines_of[name] = [line for line in source.splitlines() if line.strip() and not line.strip().startswith("#")]
    docs = []
    while len(docs) < n:
        name = rng.choice(MODULES)
        lines = lines_of[name]
        start = rng.randrange(0, len(lines) - 8)
        context, true = lines[start : start + 6], lines[start + 6]
        others = list(dict.fromkeys(line for line in rng.sample(lines, 12) if line != true and line not in context))[:3]
        if len(others) < 3:
            continue
        choices = [true, *sorted(others)]
        rng.shuffle(choices)
        docs.append(
            {
                "context": "\n".join(context) + "\n",
                "choices": choices,
                "answer": choices.index(true),
                "module": name,
            }
        )
    return docs


def write(name: str, docs: list[dict]) -> None:
    path = OUT / f"{name}.jsonl"
    path.write_text("".join(json.dumps(d, sort_keys=True) + "\n" for d in docs))
    print(f"wrote {path} ({len(docs)} documents)")


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    rng = random.Random("btx-demo-task-arithmetic")
    write("demo_arith_mc", [arithmetic(rng) for _ in range(DOCS)])
    write("demo_code_next_line", code_docs(random.Random("btx-demo-task-code"), DOCS))
    print(f"(python {sys.version.split()[0]})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
