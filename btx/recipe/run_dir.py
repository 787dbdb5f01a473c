"""The run directory: every path a run writes, by name (docs/RUN_DIR.md lists the same paths).

    rd = exp.paths                      # RunDir(exp.run_dir)
    rd.merged, rd.expert_final("code"), rd.shard("code", "val"), rd.dense_baseline("data")

Invariants
- No module joins a run-directory name by hand: a new output gets an attribute here and a line in
  docs/RUN_DIR.md (tests/test_docs.py checks that the two list the same paths).
- Attributes are the run's own outputs; what a job writes inside its directory (ckpt/,
  metrics.jsonl, DONE.json, job.json, ...) is the job's layout (btx.train.job, btx.run.jobs).
- A finetune keeps its training state and its router-only phase beside its export (`DIR-train`,
  `DIR-router`, `DIR-router-train`), as `btx finetune --out DIR` does; only the run's main
  finetune has older names (finetune-train/, finetune-router/).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# The protocols baselines are matched on that have directories of their own (eval.match: both is
# the two of them), each with the suffix of its baselines' directories.
BASELINE_PROTOCOLS = {"compute": "", "data": "-data"}


@dataclass(frozen=True)
class FinetuneDirs:
    """Where one MoE finetune writes: its export, its training state, and its router-only phase's
    (finetune.router_only_steps)."""

    export: Path
    train: Path
    router: Path
    router_train: Path

    @classmethod
    def beside(cls, export: Path) -> FinetuneDirs:
        """A finetune into `export` (`btx finetune --out DIR`), its state in directories beside it."""
        export = Path(export)
        router = _sibling(export, "-router")
        return cls(export, _sibling(export, "-train"), router, _sibling(router, "-train"))


def _sibling(path: Path, suffix: str) -> Path:
    return path.with_name(path.name + suffix)


@dataclass(frozen=True)
class RunDir:
    root: Path

    @property
    def ledger(self) -> Path:
        """btx run's record of its stages (btx.run.ledger)."""
        return self.root / "pipeline.json"

    # -- data ---------------------------------------------------------------------------------

    @property
    def data_root(self) -> Path:
        return self.root / "data"

    def data(self, domain: str) -> Path:
        return self.data_root / domain

    def shard(self, domain: str, split: str) -> Path:
        """A token shard's sidecar (what btx.data.shards.load_shard opens)."""
        return self.data(domain) / f"{split}.json"

    def tokens(self, domain: str, split: str) -> Path:
        """A token shard's token ids."""
        return self.data(domain) / f"{split}.bin"

    # -- seed and experts ---------------------------------------------------------------------

    @property
    def seed(self) -> Path:
        """The seed this run trains (a recipe's seed.path is read in place: Experiment.seed_dir)."""
        return self.root / "seed"

    @property
    def seed_train(self) -> Path:
        return self.root / "seed-train"

    @property
    def experts(self) -> Path:
        return self.root / "experts"

    def expert(self, domain: str) -> Path:
        """The expert's job directory: its state, log and DONE.json."""
        return self.experts / domain

    def expert_final(self, domain: str) -> Path:
        """The expert's HF checkpoint."""
        return self.expert(domain) / "final"

    # -- the MoE ------------------------------------------------------------------------------

    @property
    def merged(self) -> Path:
        return self.root / "merged"

    @property
    def finetune(self) -> FinetuneDirs:
        return FinetuneDirs(
            export=self.root / "finetuned",
            train=self.root / "finetune-train",
            router=self.root / "finetune-router",
            router_train=self.root / "finetune-router-train",
        )

    @property
    def finetuned(self) -> Path:
        return self.finetune.export

    @property
    def grown(self) -> Path:
        return self.root / "grown"

    @property
    def grow_finetune(self) -> FinetuneDirs:
        return FinetuneDirs.beside(self.root / "grown-finetuned")

    # -- baselines ----------------------------------------------------------------------------

    @property
    def upcycled_merged(self) -> Path:
        """The sparse-upcycling MoE before training: seed copies as experts."""
        return self.root / "baselines" / "upcycled-merged"

    def dense_baseline(self, match: str) -> Path:
        return self.root / "baselines" / f"dense{BASELINE_PROTOCOLS[match]}"

    def dense_baseline_final(self, match: str) -> Path:
        return self.dense_baseline(match) / "final"

    def upcycled_baseline(self, match: str) -> Path:
        return self.root / "baselines" / f"upcycled{BASELINE_PROTOCOLS[match]}"

    def upcycled_baseline_train(self, match: str) -> Path:
        return self.root / "baselines" / f"upcycled{BASELINE_PROTOCOLS[match]}-work"

    # -- evaluation ---------------------------------------------------------------------------

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    @property
    def task_cache(self) -> Path:
        """Downstream-task results, one file per (model, task, settings) key (btx.evaluate.tasks)."""
        return self.root / "eval-tasks"

    @property
    def analysis(self) -> Path:
        return self.root / "analysis"

    def router_init(self, init: str) -> Path:
        """A merge with router init `init` for the router-init table (btx eval RECIPE --router-inits)."""
        return self.root / "router-inits" / init

    @property
    def router_init_table(self) -> Path:
        return self.root / "eval-router-inits"
