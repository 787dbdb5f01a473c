"""The demo recipe's arithmetic: what its training stages cost, from its values alone.

Tokens per step, each stage's tokens and training FLOPs, tokens per seed parameter, the MoE
stage's share of compute and the compute-matched baseline steps, with the FLOP count the training
loop records (`btx.model.flops.train_flops_per_token`, frozen parameters included) and the
finetune's routing settings (`btx.train.finetune.routing_overrides`). tools/published.py writes
them into the recipe's header and checks a run's DONE.json files against them.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

SEED_MANIFEST = "SEED.json"  # beside a shipped seed: what made it (tools/demo_seed.py writes it)


class Stale(Exception):
    """A published block or snapshot that no longer follows from its sources."""


@dataclasses.dataclass
class Stage:
    name: str
    steps: int
    tokens_per_step: int
    flops_per_token: float

    @property
    def tokens(self) -> int:
        return self.steps * self.tokens_per_step

    @property
    def flops(self) -> float:
        return self.flops_per_token * self.tokens  # as btx.train records train_flops in DONE.json


@dataclasses.dataclass
class Arithmetic:
    seed: Stage  # trained by this recipe, or by the recipe that made its shipped seed.path
    seed_recipe: str | None  # that recipe, for a shipped seed (None: this recipe trains it)
    experts: dict[str, Stage]
    finetune: Stage
    seed_params: int
    moe_params: dict[str, int]  # total, active
    n_experts: int
    top_k: int
    dense_flops_per_token: float
    dense_steps: int  # compute-matched baselines
    upcycled_steps: int

    @property
    def expert_flops(self) -> float:
        return sum(s.flops for s in self.experts.values())

    @property
    def budget(self) -> float:
        """BTX's training FLOPs beyond the seed: the experts and the MoE finetune."""
        return self.expert_flops + self.finetune.flops

    @property
    def moe_share(self) -> float:
        return self.finetune.flops / self.budget


def seed_stage(exp, seed_cfg) -> tuple[Stage, str | None]:
    """The seed's training: this recipe's, or the one SEED.json beside a shipped seed.path names
    (tools/demo_seed.py writes it)."""
    from btx.recipe.load import load_experiment

    if exp.seed.path is None:
        return _stage("seed", exp.seed_train, seed_cfg), None
    manifest = Path(exp.seed.path) / SEED_MANIFEST
    if not manifest.is_file():
        raise Stale(f"{manifest}: missing; the arithmetic block needs the recipe that trained seed.path")
    recipe = Path(exp.seed.path) / json.loads(manifest.read_text())["recipe"]
    return _stage("seed", load_experiment(recipe, inputs_exist=False).seed_train, seed_cfg), str(recipe)


def _stage(name, settings, cfg, trainable="all") -> Stage:
    from btx.model.flops import train_flops_per_token

    return Stage(
        name, settings.steps, settings.tokens_per_step, train_flops_per_token(cfg, settings.seq_len, trainable)
    )


def recipe_arithmetic(exp) -> Arithmetic:
    """What the recipe's training stages cost, from its values alone (and a shipped seed's config.json)."""
    from btx.plan.stages import seed_config
    from btx.train.finetune import routing_overrides

    seed_cfg = seed_config(exp)
    merge = exp.merge
    ffn_dim = seed_cfg.ffn_dim // merge.chunks if merge.granularity in ("split", "blend") else seed_cfg.ffn_dim
    merged_cfg = dataclasses.replace(
        seed_cfg, n_experts=merge.n_experts(len(exp.domains)), top_k=merge.top_k, ffn_dim=ffn_dim, router_mode="topk"
    )
    top_k = exp.finetune.top_k if exp.finetune.top_k is not None else merged_cfg.top_k
    moe_cfg = dataclasses.replace(merged_cfg, **routing_overrides(merged_cfg, exp.finetune, top_k))

    from btx.model.flops import train_flops_per_token

    ft = exp.finetune_train
    finetune = _stage("finetune", ft, moe_cfg, exp.finetune.trainable)
    experts = {d: _stage(d, dom.train, seed_cfg, dom.train.trainable) for d, dom in exp.domains.items()}
    budget = sum(s.flops for s in experts.values()) + finetune.flops
    dense_fpt = train_flops_per_token(seed_cfg, ft.seq_len)  # the baselines train everything
    # The baselines train with the finetune's settings for as many steps as spend the budget.
    matched = lambda fpt: max(1, round(budget / (fpt * ft.tokens_per_step)))  # noqa: E731
    seed, seed_recipe = seed_stage(exp, seed_cfg)
    return Arithmetic(
        seed=seed,
        seed_recipe=seed_recipe,
        experts=experts,
        finetune=finetune,
        seed_params=seed_cfg.param_counts()["total"],
        moe_params=moe_cfg.param_counts(),
        n_experts=moe_cfg.n_experts,
        top_k=moe_cfg.experts_per_token,
        dense_flops_per_token=dense_fpt,
        dense_steps=matched(dense_fpt),
        upcycled_steps=matched(train_flops_per_token(moe_cfg, ft.seq_len)),
    )


def _n(x: float) -> str:
    return f"{x:,.0f}"


def params_text(p: int) -> str:
    return f"{p / 1e6:.2f}M"


def _shipped_by(exp, a: Arithmetic) -> str:
    """The recipe that trained a shipped seed, as its directory's name (recipes/<name>/btx.yaml)."""
    return Path(a.seed_recipe).resolve().parent.name


def arithmetic_comment(exp) -> list[str]:
    """The recipe header's arithmetic lines (without the markers), each starting with '# '."""
    a = recipe_arithmetic(exp)
    t = exp.finetune_train
    same = len({(s.steps, s.tokens_per_step) for s in a.experts.values()}) == 1
    lines = [
        f"tokens per optimizer step = batch_size x seq_len x grad_accum = {t.batch_size} x {t.seq_len} x "
        f"{t.grad_accum} = {_n(t.tokens_per_step)}",
        f"seed      {a.seed.steps} steps x {_n(a.seed.tokens_per_step)} = {_n(a.seed.tokens)} tokens of "
        + (f"{_shipped_by(exp, a)}'s mixture, trained once and shipped, " if a.seed_recipe else "the mixture, ")
        + f"{a.seed.flops:.3g} FLOPs:",
        f"          {a.seed.tokens / a.seed_params:.2f} tokens per seed parameter "
        f"({params_text(a.seed_params)} parameters)",
    ]
    if same:
        e = next(iter(a.experts.values()))
        lines.append(
            f"experts   {len(a.experts)} x {e.steps} steps x {_n(e.tokens_per_step)} = {len(a.experts)} x "
            f"{_n(e.tokens)} tokens, each of its own domain, {len(a.experts)} x {e.flops:.3g} FLOPs"
        )
    else:
        for d, e in a.experts.items():
            lines.append(
                f"expert    {d}: {e.steps} steps x {_n(e.tokens_per_step)} = {_n(e.tokens)} tokens, {e.flops:.3g} FLOPs"
            )
    lines += [
        f"finetune  {a.finetune.steps} steps x {_n(a.finetune.tokens_per_step)} = {_n(a.finetune.tokens)} "
        "tokens of the "
        f"mixture, {a.finetune.flops:.3g} FLOPs:",
        f"          {a.moe_share:.1%} of BTX's {a.budget:.3g} training FLOPs beyond the seed",
        f"training FLOPs per token: dense {a.dense_flops_per_token / 1e6:.2f}M, MoE {a.n_experts} experts top-"
        f"{a.top_k} {a.finetune.flops_per_token / 1e6:.2f}M",
        f"MoE parameters: {params_text(a.moe_params['active'])} active of {params_text(a.moe_params['total'])}",
        f"compute-matched baselines ({a.budget:.3g} FLOPs each): dense {a.dense_steps} steps, sparse upcycling "
        f"{a.upcycled_steps} steps",
    ]
    return ["# " + line for line in lines]
