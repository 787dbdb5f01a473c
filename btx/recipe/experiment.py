"""What loading a recipe gives: an Experiment (the resolved experiment recipe, its domains and run
directory), each Domain's effective settings and resolved Sources; and the hashes stages key on.

An Experiment names each recipe section it gives (`exp.merge`, `exp.finetune`, ...) as a property
of its own, so that grep and a type checker follow every use of a section (btx.run.stage records
them to check that each stage keys on what it reads); `exp.paths` is the run directory's layout.
"""

import dataclasses
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml
from omegaconf import OmegaConf

from btx.choices import GENERAL_DOMAIN
from btx.recipe.check import GLOB_CHARS
from btx.recipe.domain_schema import DataSection, DomainRecipe
from btx.recipe.run_dir import RunDir
from btx.recipe.schema import (
    AnalyzeSection,
    BranchSection,
    EvalSection,
    ExperimentRecipe,
    FinetuneSection,
    GrowSection,
    MergeSection,
    ModelSection,
    PrepareSection,
    SeedSection,
    TrainSection,
)


@dataclass
class Source:
    """One data source, resolved: `files` are the existing files it stands for, sorted."""

    path: Path  # a file, a directory, or (for a glob written in the path) the pattern itself
    glob: Optional[str]  # the mapping form's glob, applied inside the directory `path`
    text_field: str
    files: List[Path]

    def specs(self) -> List[Dict[str, Any]]:
        """Source specs for btx.data.prepare.prepare_domain."""
        if self.glob is None and GLOB_CHARS.search(str(self.path)):
            return [{"path": str(f), "text_field": self.text_field} for f in self.files]
        spec: Dict[str, Any] = {"path": str(self.path), "text_field": self.text_field}
        if self.glob is not None:
            spec["glob"] = self.glob
        return [spec]


@dataclass
class Domain:
    name: str
    path: Optional[Path]  # the domain recipe file
    recipe: DomainRecipe
    sources: List[Source]
    train: TrainSection  # effective: experiment train + this domain's train + command-line train.*

    @property
    def data(self) -> DataSection:
        return self.recipe.data

    @property
    def files(self) -> List[Path]:
        return [f for s in self.sources for f in s.files]


@dataclass
class Experiment:
    """A loaded, validated experiment: its recipe's sections (`exp.merge.top_k`), its domains with
    their effective settings, and its run directory (`exp.paths`)."""

    path: Path  # the experiment recipe file
    recipe: ExperimentRecipe
    domains: Dict[str, Domain]  # in recipe order
    run_dir: Path  # absolute
    seed_train: TrainSection  # effective settings of the from-scratch seed job
    finetune_train: TrainSection  # effective settings of MoE finetuning
    overrides: List[str] = field(default_factory=list)
    general: Optional[Domain] = None  # finetune.general: data only, no expert

    @property
    def data_domains(self) -> Dict[str, Domain]:
        """Every domain with data to prepare: the experts' domains, then the general one."""
        return {**self.domains, **({GENERAL_DOMAIN: self.general} if self.general is not None else {})}

    @property
    def paths(self) -> RunDir:
        """Every path the run writes."""
        return RunDir(self.run_dir)

    # -- the recipe's sections ------------------------------------------------------------------

    @property
    def experiment(self) -> str:
        return self.recipe.experiment

    @property
    def name(self) -> str:
        return self.recipe.experiment

    @property
    def tokenizer(self) -> str:
        return self.recipe.tokenizer

    @property
    def seed(self) -> SeedSection:
        return self.recipe.seed

    @property
    def model(self) -> Optional[ModelSection]:
        return self.recipe.model

    @property
    def train(self) -> TrainSection:
        """The experiment's training defaults (each job's effective settings: `seed_train`,
        `Domain.train`, `finetune_train`)."""
        return self.recipe.train

    @property
    def branch(self) -> BranchSection:
        return self.recipe.branch

    @property
    def merge(self) -> MergeSection:
        return self.recipe.merge

    @property
    def finetune(self) -> FinetuneSection:
        return self.recipe.finetune

    @property
    def grow(self) -> GrowSection:
        return self.recipe.grow

    @property
    def eval(self) -> EvalSection:
        return self.recipe.eval

    @property
    def analyze(self) -> AnalyzeSection:
        return self.recipe.analyze

    @property
    def prepare(self) -> PrepareSection:
        return self.recipe.prepare

    # -- derived ----------------------------------------------------------------------------------

    @property
    def seed_dir(self) -> Path:
        """The dense seed checkpoint: seed.path, or the seed this run trains (<run_dir>/seed)."""
        return Path(self.seed.path) if self.seed.path is not None else self.paths.seed

    @property
    def merged_domains(self) -> list[str]:
        """The domains merged into the MoE: all, but those grow.domains adds to it afterwards."""
        return [d for d in self.domains if d not in self.grow.domains]

    def data_dir(self, domain: str) -> Path:
        """Shorthand for `paths.data(domain)`."""
        return self.paths.data(domain)

    def expert_dir(self, domain: str) -> Path:
        """Shorthand for `paths.expert(domain)`."""
        return self.paths.expert(domain)

    def to_yaml(self) -> str:
        return to_yaml(self.recipe)


def to_plain(obj: Any) -> Any:
    """Dataclasses, OmegaConf nodes, Paths, tuples -> plain dicts, lists, strings and numbers."""
    if isinstance(obj, Experiment):
        return to_plain(obj.recipe)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if OmegaConf.is_config(obj):
        return to_plain(OmegaConf.to_container(obj, resolve=True))
    if isinstance(obj, dict):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return obj


def to_yaml(obj: Any, sort_keys: bool = False) -> str:
    """The resolved YAML of a recipe, a section, an Experiment or a Domain."""
    return yaml.safe_dump(to_plain(obj), sort_keys=sort_keys, default_flow_style=False, allow_unicode=True)


def recipe_hash(section: Any) -> str:
    """sha256 (hex) of the resolved YAML (sorted keys) of what a stage depends on: pass the
    sections, or a dict of them ({"merge": exp.merge, "experts": [...]}), for DONE.json."""
    return hashlib.sha256(to_yaml(section, sort_keys=True).encode()).hexdigest()
