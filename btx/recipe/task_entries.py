"""The entries of `eval.tasks` (lm-evaluation-harness tasks): a task name, or a mapping of
TASK_KEYS, checked when the recipe loads (btx.recipe.schema.EvalSection.check)."""

from typing import Any

from btx.recipe.check import Checker

TASK_KEYS = ("task", "num_fewshot", "limit", "batch_size")  # what a mapping in eval.tasks may hold


def check_task_entry(entry: Any, c: Checker, key: str) -> str:
    """One entry of eval.tasks is a task name or a mapping of TASK_KEYS; returns its name."""
    if isinstance(entry, str):
        c.that(bool(entry.strip()) and "," not in entry, key, f"expected a task name, got {entry!r}")
        return entry
    if not isinstance(entry, dict):
        c.fail(key, f"expected a task name or a mapping {{task: NAME, num_fewshot, limit, batch_size}}, got {entry!r}")
    unknown = [k for k in entry if k not in TASK_KEYS]
    c.that(not unknown, key, f"unknown key {unknown[0] if unknown else ''!r}; expected {', '.join(TASK_KEYS)}")
    name = entry.get("task")
    c.that(isinstance(name, str) and bool(name.strip()), f"{key}.task", f"expected a task name, got {name!r}")
    shots, limit, batch = entry.get("num_fewshot"), entry.get("limit"), entry.get("batch_size")
    whole = (int,)
    c.that(
        shots is None or (isinstance(shots, whole) and not isinstance(shots, bool) and shots >= 0),
        f"{key}.num_fewshot",
        f"expected an integer >= 0, got {shots!r}",
    )
    c.that(
        limit is None
        or (isinstance(limit, int) and not isinstance(limit, bool) and limit > 0)
        or (isinstance(limit, float) and 0.0 < limit < 1.0),
        f"{key}.limit",
        f"expected a number of documents > 0 or a fraction in (0, 1), got {limit!r}",
    )
    c.that(
        batch is None or (isinstance(batch, int) and not isinstance(batch, bool) and batch > 0),
        f"{key}.batch_size",
        f"expected an integer > 0, got {batch!r}",
    )
    return name
