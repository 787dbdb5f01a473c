"""Growing and shrinking a finished MoE (`btx merge --into`), in every MoE form btx writes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from btx.cli import main as cli_main
from btx.data.prepare import prepare_domain
from btx.data.shards import load_shard
from btx.data.tokenizer import load_tokenizer
from btx.errors import BtxError
from btx.io.checkpoint import load_model, save_model
from btx.io.manifest import read_done
from btx.io.reader import CheckpointReader
from btx.mix.grow import grow_moe
from btx.mix.merge import merge
from btx.mix.options import EditOptions, MergeOptions

transformers = pytest.importorskip("transformers")

BASE = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
FAMILIES = {
    "llama": ("Llama", {}),
    "qwen2": ("Qwen2", {}),
    "qwen3": ("Qwen3", {"head_dim": 16}),
    "olmo2": ("Olmo2", {}),
    "llama-biased": ("Llama", {"attention_bias": True}),
}  # GraniteMoe: experts fused per layer
TOKENS = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
# Synthetic well-separated domains, as bytes below the tiny vocabulary (byte id = token id).
CHARS = {"code": "ABCDEFGHIJ", "math": "0123456789", "prose": "!#$%&()*+,"}
PROMPTS = {d: [c * 2, c[::-1]] for d, c in CHARS.items()}


def perturbed(seed: Path, out: Path, index: int, shared: float = 0.01) -> Path:
    """An expert as branch training leaves it: FFNs moved a lot, shared weights a little."""
    model = load_model(seed, dtype=torch.float32)
    g = torch.Generator().manual_seed(10 + index)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_((0.05 if ".ffn." in name else shared) * torch.randn(p.shape, generator=g))
    save_model(model, None, out, tokenizer_from=seed)
    return out


class World:
    def __init__(self, root: Path, family: str):
        self.family = family
        prefix, overrides = FAMILIES[family]
        torch.manual_seed(3)
        model = getattr(transformers, f"{prefix}ForCausalLM")(
            getattr(transformers, f"{prefix}Config")(**BASE, **overrides)
        )
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
        self.seed = root / "seed"
        model.save_pretrained(self.seed)
        load_tokenizer("byte").save(self.seed)  # the hidden init tokenizes prompts with it
        self.experts = {d: perturbed(self.seed, root / d, i) for i, d in enumerate(("code", "math", "prose"))}
        self.moe = root / "moe"  # code + math + seed
        merge(
            self.seed,
            {d: self.experts[d] for d in ("code", "math")},
            self.moe,
            MergeOptions(router_std=0.5),
            allow_no_manifest=True,
            progress=False,
        )
        self.full = root / "full"  # code + math + prose + seed, merged in one go
        merge(self.seed, self.experts, self.full, MergeOptions(router_std=0.5), allow_no_manifest=True, progress=False)
        self.data = {}
        rng = np.random.default_rng(0)
        for d, chars in CHARS.items():
            docs = ["".join(rng.choice(list(chars), size=120)) for _ in range(12)]
            prepare_domain(d, [docs], "byte", root / "data" / d, val_fraction=0.5, append_eos=False, progress=False)
            self.data[d] = root / "data" / d / "val.bin"


@pytest.fixture(scope="module", params=list(FAMILIES))
def world(request, tmp_path_factory) -> World:
    return World(tmp_path_factory.mktemp(f"grow-{request.param}"), request.param)


def logits(path: Path) -> torch.Tensor:
    with torch.no_grad():
        return load_model(path, dtype=torch.float32).eval()(TOKENS).logits


def load_clean(path: Path):
    cls = getattr(transformers, json.loads((path / "config.json").read_text())["architectures"][0])
    model, info = cls.from_pretrained(path, output_loading_info=True, dtype=torch.float32)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in path.iterdir() if p.name != "DONE.json"}


def test_add_then_remove_gives_back_the_original_byte_for_byte(world, tmp_path):
    grown = tmp_path / "grown"
    done = grow_moe(world.moe, grown, add={"prose": world.experts["prose"]}, progress=False)
    assert done["experts"] == ["code", "math", "seed", "prose"] and done["added"] == ["prose"]
    cfg = CheckpointReader(grown).cfg
    assert cfg.n_experts == 4 and cfg.expert_names == done["experts"]
    # the grown MoE is a checkpoint transformers opens as its own class, computing what btx computes
    torch.testing.assert_close(load_clean(grown)(TOKENS).logits, logits(grown), rtol=1e-5, atol=1e-5)
    back = tmp_path / "back"
    undone = grow_moe(grown, back, remove=["prose"], progress=False)
    assert undone["experts"] == ["code", "math", "seed"]
    assert [step["stage"] for step in undone["lineage"]] == ["merge", "grow", "grow"]
    assert files(back) == files(world.moe)


def test_an_expert_that_never_wins_changes_nothing(world, tmp_path):
    """New router rows far below the others on these tokens: the logits stay bit for bit the same."""
    grown = tmp_path / "grown"
    grow_moe(world.moe, grown, add={"prose": world.experts["prose"]}, progress=False)
    model = load_model(grown, dtype=torch.float32).eval()
    for layer in model.layers:  # layer by layer: each row changes the next layer's inputs
        seen = []
        hook = layer.ffn.register_forward_pre_hook(
            lambda m, a, seen=seen: seen.append(a[0].reshape(-1, a[0].shape[-1]))
        )
        with torch.no_grad():
            model(TOKENS)
        hook.remove()
        u = seen[0].double()
        # 32 tokens in 32 dimensions: some v has u.v = 1 for every one of them; the row -1e4 v
        # gives the new expert a logit of -1e4 on every token, below every other expert's.
        v = torch.linalg.lstsq(u, torch.ones(len(u), 1, dtype=torch.float64)).solution[:, 0]
        assert ((u @ v) > 0.5).all()
        with torch.no_grad():
            layer.ffn.router.weight[3] = (-1e4 * v).float()
    model.set_routing_record(True)
    with torch.no_grad():
        out = model(TOKENS).logits
    assert all((r.last_routing.expert_TK != 3).all() for r in model.moe_layers())
    # Not bit for bit: a router matmul one row wider may round the other rows' logits differently
    # (BLAS blocking), by an ulp; everything the MoE holds is carried byte for byte (test above).
    torch.testing.assert_close(out, logits(world.moe), rtol=1e-6, atol=1e-6)


def test_growing_an_upcycled_moe_by_the_seed_still_computes_the_seed(world, tmp_path):
    up = tmp_path / "up"
    merge(world.seed, {}, up, MergeOptions(upcycle=2, router_std=1.0), progress=False)
    grown = tmp_path / "grown"
    grow_moe(up, grown, add={"again": world.seed}, options=EditOptions(router_std=1.0), progress=False)
    seed = load_model(world.seed, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = seed(TOKENS).logits
    torch.testing.assert_close(logits(grown), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(load_clean(grown)(TOKENS).logits, expected, rtol=1e-5, atol=1e-5)


def own_expert_share(path: Path, data: dict[str, Path]) -> dict[tuple[str, int], float]:
    """{(domain, layer): share of the domain's tokens whose top-1 expert is its own}."""
    model = load_model(path, dtype=torch.float32).eval()
    names = CheckpointReader(path).cfg.expert_names
    model.set_routing_record(True)
    shares = {}
    for d, shard in data.items():
        val = torch.from_numpy(np.asarray(load_shard(shard).tokens[:512], dtype=np.int64)).view(8, 64)
        with torch.no_grad():
            model(val)
        for layer, ffn in enumerate(model.moe_layers()):
            shares[d, layer] = (ffn.last_routing.expert_TK[:, 0] == names.index(d)).float().mean().item()
    return shares


@pytest.mark.parametrize("init", ["centroid", "ridge", "hidden"])
def test_fitted_router_inits_for_a_new_expert(world, tmp_path, init):
    """centroid and hidden add the new expert's rows and keep every existing row byte for byte;
    ridge refits every row, and sends at least 95% of each domain's tokens to its own expert in
    every layer (the MoE's random routers: far less). Each output opens in transformers."""
    grown = tmp_path / "grown"
    options = EditOptions(router_init=init, prompts=PROMPTS if init == "hidden" else {})
    data = {d: world.data[d] for d in (("code", "math", "prose") if init == "ridge" else ("prose",))}
    done = grow_moe(
        world.moe,
        grown,
        add={"prose": world.experts["prose"]},
        options=options,
        router_data=data if init != "hidden" else None,
        progress=False,
    )
    assert done["experts"] == ["code", "math", "seed", "prose"]
    assert set(done["router_tokens"]) == ({"pos:code", "pos:math", "pos:prose"} if init == "hidden" else set(data))
    before, after = CheckpointReader(world.moe), CheckpointReader(grown)
    for layer in range(2):
        name = f"layers.{layer}.ffn.router.weight"
        old, new = before.get_btx(name), after.get_btx(name)
        assert new.shape == (4, 32)
        if init == "ridge":
            assert not torch.equal(new[:3], old)
        else:
            assert torch.equal(new[:3], old)
            torch.testing.assert_close(new[3].norm(), old.norm(dim=1).mean(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(load_clean(grown)(TOKENS).logits, logits(grown), rtol=1e-5, atol=1e-5)
    if init == "ridge":
        low = {k: v for k, v in own_expert_share(grown, world.data).items() if v < 0.95}
        assert not low, f"(domain, layer) below 95% on their own expert: {low}"
        assert min(own_expert_share(world.moe, {d: world.data[d] for d in ("code", "math")}).values()) < 0.9


def test_fitted_router_inits_need_their_inputs(world, tmp_path):
    out = tmp_path / "out"
    add = {"prose": world.experts["prose"]}
    far = tmp_path / "far" / "moe"  # outside the run directory whose data/ holds the experts' shards
    shutil.copytree(world.moe, far)
    with pytest.raises(BtxError, match="needs validation tokens of expert 'code'"):
        grow_moe(
            far,
            out,
            add=add,
            options=EditOptions(router_init="ridge"),
            router_data={"prose": world.data["prose"]},
            progress=False,
        )
    with pytest.raises(BtxError, match="give the new expert 'prose' prompts"):
        grow_moe(
            world.moe, out, add=add, options=EditOptions(router_init="hidden", prompts={"code": ["A"]}), progress=False
        )
    with pytest.raises(BtxError, match="needs negative prompts"):
        grow_moe(
            world.moe, out, add=add, options=EditOptions(router_init="hidden", prompts={"prose": ["!"]}), progress=False
        )
    with pytest.raises(BtxError, match="reads the data of prose only"):
        grow_moe(
            world.moe,
            out,
            add=add,
            options=EditOptions(router_init="centroid"),
            router_data={"prose": world.data["prose"], "code": world.data["code"]},
            progress=False,
        )
    with pytest.raises(BtxError, match="prompts are for router_init hidden"):
        grow_moe(world.moe, out, add=add, options=EditOptions(prompts={"prose": ["!"]}), progress=False)
    assert not out.exists()


def test_shared_weights_keep_or_average(world, tmp_path):
    moe = CheckpointReader(world.moe)
    prose = CheckpointReader(world.experts["prose"])
    kept = tmp_path / "kept"
    grow_moe(world.moe, kept, add={"prose": world.experts["prose"]}, progress=False)
    avg = tmp_path / "avg"
    grow_moe(
        world.moe, avg, add={"prose": world.experts["prose"]}, options=EditOptions(shared="average"), progress=False
    )
    for name in ("embed.weight", "layers.1.attn.wq.weight"):
        a, p = moe.get_btx(name), prose.get_btx(name)
        assert torch.equal(CheckpointReader(kept).get_btx(name), a)
        torch.testing.assert_close(CheckpointReader(avg).get_btx(name), a + 0.25 * (p - a))  # 1 of 4 experts
    rows = CheckpointReader(kept).get_btx("layers.0.ffn.router.weight")
    assert torch.equal(rows[:3], moe.get_btx("layers.0.ffn.router.weight"))
    assert 0.5 < float(rows[3].std() / rows[:3].std()) < 2  # random, on the existing rows' scale


def test_bad_edits_are_refused_and_write_nothing(world, tmp_path):
    foreign = tmp_path / "foreign"
    prefix, overrides = FAMILIES[world.family]
    torch.manual_seed(99)
    getattr(transformers, f"{prefix}ForCausalLM")(
        getattr(transformers, f"{prefix}Config")(**BASE, **overrides)
    ).save_pretrained(foreign)
    wide = tmp_path / "wide"
    getattr(transformers, f"{prefix}ForCausalLM")(
        getattr(transformers, f"{prefix}Config")(**{**BASE, "intermediate_size": 64}, **overrides)
    ).save_pretrained(wide)
    split = tmp_path / "split"
    merge(
        world.seed,
        {"code": world.experts["code"]},
        split,
        MergeOptions(granularity="split", chunks=2),
        allow_no_manifest=True,
        progress=False,
    )
    cases = [
        (dict(add={"prose": foreign}), "away from the MoE's and no DONE.json links it to the MoE's seed"),
        (dict(add={"prose": wide}), "intermediate_size is 64 but the MoE"),
        (dict(add={"code": world.experts["prose"]}), "has an expert of that name already"),
        (dict(remove=["code", "math", "seed"]), "would leave"),
        (dict(remove=["nope"]), "--remove-expert nope: not an expert"),
        (dict(add={"prose": world.moe}), "is an MoE itself"),
    ]
    out = tmp_path / "out"
    for kwargs, message in cases:
        with pytest.raises(BtxError, match=message):
            grow_moe(world.moe, out, progress=False, **kwargs)
        assert not out.exists()
    with pytest.raises(BtxError, match="a split merge"):
        grow_moe(split, out, add={"prose": world.experts["prose"]}, progress=False)
    with pytest.raises(BtxError, match="a dense checkpoint; --into takes an MoE"):
        grow_moe(world.seed, out, add={"prose": world.experts["prose"]}, progress=False)
    assert not out.exists()
    # --allow-foreign takes it anyway
    grow_moe(world.moe, out, add={"prose": foreign}, allow_foreign=True, progress=False)


def test_cli(world, tmp_path, capsys):
    out = tmp_path / "cli"
    rc = cli_main(
        [
            "merge",
            "--into",
            str(world.moe),
            "--add-expert",
            f"prose={world.experts['prose']}",
            "--router-init",
            "zeros",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert rc == 0 and CheckpointReader(out).cfg.expert_names == ["code", "math", "seed", "prose"]
    assert torch.equal(CheckpointReader(out).get_btx("layers.1.ffn.router.weight")[3], torch.zeros(32))
    assert (
        cli_main(["merge", "--into", str(out), "--remove-expert", "math", "--out", str(tmp_path / "less"), "--quiet"])
        == 0
    )
    assert CheckpointReader(tmp_path / "less").cfg.expert_names == ["code", "seed", "prose"]
    capsys.readouterr()
    assert cli_main(["merge", "--into", str(out), "--seed", str(world.seed), "--out", str(tmp_path / "x")]) == 2
    assert "--seed belongs to a merge of dense experts" in capsys.readouterr().err
    assert cli_main(["merge", "--seed", str(world.seed), "--remove-expert", "x", "--out", str(tmp_path / "x")]) == 2
    assert "--remove-expert edits a finished MoE: give --into MOE" in capsys.readouterr().err


def test_cli_fitted_inits(world, tmp_path, capsys):
    """--router-init ridge with --router-data and --ridge-lambda; hidden with --prompt."""
    ridge = tmp_path / "ridge"
    data = [a for d in ("code", "math", "prose") for a in ("--router-data", f"{d}={world.data[d]}")]
    rc = cli_main(
        [
            "merge",
            "--into",
            str(world.moe),
            "--add-expert",
            f"prose={world.experts['prose']}",
            "--router-init",
            "ridge",
            "--ridge-lambda",
            "0.1",
            *data,
            "--out",
            str(ridge),
            "--quiet",
        ]
    )
    assert rc == 0 and read_done(ridge)["options"]["ridge_lambda"] == 0.1
    hidden = tmp_path / "hidden"
    prompts = [a for d in ("math", "prose") for t in PROMPTS[d] for a in ("--prompt", f"{d}={t}")]
    rc = cli_main(
        [
            "merge",
            "--into",
            str(world.moe),
            "--add-expert",
            f"prose={world.experts['prose']}",
            "--router-init",
            "hidden",
            *prompts,
            "--out",
            str(hidden),
            "--quiet",
        ]
    )
    assert rc == 0 and read_done(hidden)["options"]["prompts"] == {d: PROMPTS[d] for d in ("math", "prose")}
    capsys.readouterr()
    rc = cli_main(
        [
            "merge",
            "--into",
            str(world.moe),
            "--add-expert",
            f"prose={world.experts['prose']}",
            "--router-init",
            "hidden",
            "--out",
            str(tmp_path / "bad"),
            "--quiet",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "give the new expert 'prose' prompts" in err
    assert not (tmp_path / "bad").exists()
