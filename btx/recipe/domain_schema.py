"""The schema of a domain recipe file: its data (sources, split) and its own training settings.

As btx/recipe/schema.py for the experiment recipe: one dataclass per section, a default and a
comment per setting, the range in the section's `check`.
"""

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from btx.data.corpora import BUILTIN_CORPORA
from btx.recipe.check import Checker, suggest
from btx.recipe.schema import TrainSection


@dataclass
class DataSection:
    # Keys that belong to another section, and where: a one-line pointer instead of "unknown key".
    # Document masking decides how a job trains, so it is a train setting (a domain recipe's
    # `train:` for one domain, the experiment's `train:` for all of them).
    MOVED_KEYS = {"document_mask": "train.document_mask (in this domain recipe's train:, or the experiment's)"}
    # Files, directories or globs (relative to the domain recipe), or mappings {path, glob,
    # text_field}. Directories are read recursively (hidden files skipped). A `.jsonl` file holds one
    # JSON document per line (its text under `text_field`); any other file is one text document.
    sources: List[Any] = field(default_factory=list)
    builtin: Optional[str] = None  # a named built-in corpus (btx.data.corpora: the demo's)
    builtin_bytes: int = 2_000_000  # how much of the built-in corpus to take
    val_fraction: float = 0.05  # share of documents held out for validation
    text_field: str = "text"  # jsonl: the field holding the document text
    seed: int = 0  # keys the train/val split (independent of the training seed)

    def check(self, c: Checker) -> None:
        c.that(0.0 < self.val_fraction < 1.0, "val_fraction", f"must be in (0, 1), got {self.val_fraction!r}")
        c.positive(self, "builtin_bytes")
        c.non_negative(self, "seed")
        c.that(
            bool(self.sources) or self.builtin is not None,
            "sources",
            "a domain needs data: give data.sources or data.builtin",
        )
        if self.builtin is not None:
            c.that(
                self.builtin in BUILTIN_CORPORA,
                "builtin",
                f"unknown built-in corpus {self.builtin!r}; expected one of {', '.join(sorted(BUILTIN_CORPORA))}"
                + suggest(self.builtin, BUILTIN_CORPORA),
            )


@dataclass
class DomainRecipe:
    """One domain recipe file."""

    name: Optional[str] = None  # default: the name the experiment gives it (or the file's stem)
    data: DataSection = field(default_factory=DataSection)
    train: Dict[str, Any] = field(default_factory=dict, metadata={"partial": TrainSection})
