"""btx merge: tiny random checkpoints on CPU, built once per session.

The world: a seed whose embeddings carry one direction per domain (code, math and prose use
disjoint characters), three experts branched from it (seed + noise), and validation shards, laid
out as a btx run directory (experts/<d>/final with DONE.json next to it, data/<d>/val.bin).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from btx.cli import main as cli_main
from btx.data.prepare import prepare_domain
from btx.data.shards import load_shard
from btx.data.tokenizer import load_tokenizer
from btx.errors import BtxError
from btx.io.checkpoint import load_model, save_model
from btx.io.manifest import hash_dir, read_done, write_done
from btx.io.reader import CheckpointReader
from btx.mix.merge import merge, merge_from_recipe
from btx.mix.options import MergeOptions
from btx.model.config import ModelConfig
from btx.model.transformer import Transformer

REPO = Path(__file__).resolve().parents[1]
DOMAINS = {"code": "abcdefghij", "math": "0123456789", "prose": "KLMNOPQRST"}
CFG = ModelConfig(vocab_size=264, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, max_seq_len=128)


def random_model(cfg: ModelConfig, seed: int) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(cfg)
    model.init_weights(std=0.1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)  # away from 1, so a swapped norm would show
    return model.eval()


def save_expert(run: Path, name: str, model_or_sd, cfg=CFG, tokens: int = 1000, done: bool = True) -> Path:
    """An expert the way `btx train` leaves it: experts/<name>/final plus experts/<name>/DONE.json."""
    final = run / "experts" / name / "final"
    save_model(model_or_sd, cfg, final, dtype=torch.float32)
    load_tokenizer("byte").save(final)
    (run / "experts" / name / "metrics.jsonl").write_text("")
    if done:
        outputs = {f"final/{k}": v for k, v in hash_dir(final).items()}
        manifest = {"stage": "train", "tokens": tokens, "outputs": outputs, "export": str(final)}
        write_done(run / "experts" / name, manifest)
    return final


def copy_as_expert(run: Path, name: str, src: Path, tokens: int = 1000) -> Path:
    final = run / "experts" / name / "final"
    shutil.copytree(src, final)
    outputs = {f"final/{k}": v for k, v in hash_dir(final).items()}
    write_done(run / "experts" / name, {"tokens": tokens, "outputs": outputs})
    return final


class World:
    def __init__(self, root: Path):
        self.root = root
        self.run = root / "run"
        seed = random_model(CFG, 0)
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():  # one direction per domain in the embedding of its characters
            for chars in DOMAINS.values():
                direction = torch.randn(CFG.dim, generator=gen)
                seed.embed.weight[[ord(c) for c in chars]] += direction / direction.norm()
        self.seed_model = seed
        self.seed = self.run / "seed"
        save_model(seed, CFG, self.seed, dtype=torch.float32)
        load_tokenizer("byte").save(self.seed)
        self.experts = {}
        for i, name in enumerate(DOMAINS):
            sd = {k: v + 0.02 * torch.randn(v.shape, generator=gen) for k, v in seed.state_dict().items()}
            self.experts[name] = save_expert(self.run, name, sd, tokens=1000 * (i + 1))
        rng = np.random.default_rng(0)
        for name, chars in DOMAINS.items():
            docs = ["".join(rng.choice(list(chars), size=200)) for _ in range(20)]
            prepare_domain(name, [docs], "byte", self.run / "data" / name, val_fraction=0.5, progress=False)
        # The same layout with every expert an exact copy of the seed.
        self.copies = root / "copies"
        shutil.copytree(self.seed, self.copies / "seed")
        self.copy_experts = {name: copy_as_expert(self.copies, name, self.seed) for name in DOMAINS}
        shutil.copytree(self.run / "data", self.copies / "data")
        self.tokens = torch.randint(0, 264, (2, 24), generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> World:
    return World(tmp_path_factory.mktemp("merge-world"))


def logits(path_or_model, tokens):
    model = load_model(path_or_model, dtype=torch.float32) if isinstance(path_or_model, Path) else path_or_model
    with torch.no_grad():
        return model.eval()(tokens).logits


def run_merge(world, out, experts=None, **options):
    quiet = dict(progress=False)
    for key in ("router_data", "force", "allow_no_manifest"):
        if key in options:
            quiet[key] = options.pop(key)
    return merge(world.seed, world.experts if experts is None else experts, out, MergeOptions(**options), **quiet)


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name) if parent.exists() else []


# ------------------------------------------------------------------------------ equivalences


PROMPTS = {name: [chars * 3, chars[::-1] * 2] for name, chars in DOMAINS.items()}


@pytest.mark.parametrize("router_init", ["random", "zeros", "centroid", "ridge", "hidden"])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_moe_of_seed_copies_computes_the_seed(world, tmp_path, router_init, k):
    prompts = PROMPTS if router_init == "hidden" else {}
    manifest = merge(world.copies / "seed", world.copy_experts, tmp_path / "m",
                     MergeOptions(router_init=router_init, top_k=k, prompts=prompts), progress=False)  # fmt: skip
    assert manifest["experts"] == ["code", "math", "prose", "seed"]
    torch.testing.assert_close(logits(tmp_path / "m", world.tokens), logits(world.seed_model, world.tokens),
                               atol=1e-5, rtol=1e-5)  # fmt: skip


@pytest.mark.parametrize("router_init", ["random", "zeros"])
@pytest.mark.parametrize("k", [1, 3])
def test_sparse_upcycling_computes_the_seed(world, tmp_path, router_init, k):
    manifest = merge(world.seed, None, tmp_path / "up", MergeOptions(upcycle=3, top_k=k, router_init=router_init),
                     progress=False)  # fmt: skip
    assert manifest["kind"] == "upcycle" and manifest["experts"] == ["seed.0", "seed.1", "seed.2"]
    cfg = CheckpointReader(tmp_path / "up").cfg
    assert (cfg.n_experts, cfg.top_k) == (3, k)
    torch.testing.assert_close(logits(tmp_path / "up", world.tokens), logits(world.seed_model, world.tokens),
                               atol=1e-5, rtol=1e-5)  # fmt: skip


def test_merged_moe_opens_in_transformers_with_btx_logits(world, tmp_path):
    from transformers import MixtralForCausalLM

    run_merge(world, tmp_path / "m", top_k=2)
    theirs = MixtralForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(logits(tmp_path / "m", world.tokens), theirs(world.tokens).logits,
                                   atol=1e-5, rtol=1e-5)  # fmt: skip
    for file in ("btx_tokenizer.json", "tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "m" / file).read_bytes() == (world.seed / file).read_bytes()


@pytest.mark.parametrize("router_init", ["random", "centroid"])
@pytest.mark.parametrize("k", [1, 2])
def test_split_is_the_unsplit_moe_with_top_k_times_chunks(world, tmp_path, router_init, k):
    run_merge(world, tmp_path / "whole", top_k=k, router_init=router_init, router_tokens=256)
    manifest = run_merge(
        world,
        tmp_path / "split",
        granularity="split",
        chunks=2,
        top_k=2 * k,
        router_init=router_init,
        router_tokens=256,
    )
    assert manifest["n_experts"] == 8 and manifest["ffn_dim"] == CFG.ffn_dim // 2
    assert manifest["experts"][:2] == ["code.0", "code.1"] and manifest["expert_domains"][:2] == ["code", "code"]
    torch.testing.assert_close(logits(tmp_path / "split", world.tokens), logits(tmp_path / "whole", world.tokens),
                               atol=1e-5, rtol=1e-5)  # fmt: skip
    # ... and over copies of the seed, the seed itself
    merge(
        world.copies / "seed",
        world.copy_experts,
        tmp_path / "split-copies",
        MergeOptions(granularity="split", chunks=4, top_k=4 * k, router_init=router_init),
        progress=False,
    )
    torch.testing.assert_close(logits(tmp_path / "split-copies", world.tokens), logits(world.seed_model, world.tokens),
                               atol=1e-5, rtol=1e-5)  # fmt: skip


@pytest.mark.parametrize("chunks", [None, 2])
def test_blend_builds_each_expert_from_one_chunk_of_every_ffn(world, tmp_path, chunks):
    manifest = run_merge(world, tmp_path / "b", granularity="blend", chunks=chunks, top_k=2)
    sources = [world.experts["code"], world.experts["math"], world.experts["prose"], world.seed]
    n, F = len(sources), CFG.ffn_dim
    c = chunks or n
    f = F // c
    assert manifest["n_experts"] == c and manifest["ffn_dim"] == n * f
    assert manifest["experts"] == [f"blend.{i}" for i in range(c)] and manifest["expert_domains"] == [None] * c
    out = load_file(tmp_path / "b" / "model.safetensors")
    src = [load_file(s / "model.safetensors") for s in sources]
    for layer in range(CFG.n_layers):
        p = f"model.layers.{layer}."
        for e in range(c):
            w1 = out[p + f"block_sparse_moe.experts.{e}.w1.weight"]
            w2 = out[p + f"block_sparse_moe.experts.{e}.w2.weight"]
            assert w1.shape == (n * f, CFG.dim) and w2.shape == (CFG.dim, n * f)
            assert torch.equal(w1, torch.cat([s[p + "mlp.gate_proj.weight"][e * f : (e + 1) * f] for s in src]))
            assert torch.equal(
                out[p + f"block_sparse_moe.experts.{e}.w3.weight"],
                torch.cat([s[p + "mlp.up_proj.weight"][e * f : (e + 1) * f] for s in src]),
            )
            down = torch.cat([s[p + "mlp.down_proj.weight"][:, e * f : (e + 1) * f] for s in src], dim=1)
            torch.testing.assert_close(w2, down * (c / n), atol=0, rtol=1e-6)


# ------------------------------------------------------------------------------ averaging


@pytest.mark.parametrize("weights", ["uniform", "tokens", {"code": 1, "math": 2, "prose": 3.5, "seed": 0.25}])
def test_average_of_identical_copies_is_the_original(world, tmp_path, weights):
    manifest = merge(world.copies / "seed", world.copy_experts, tmp_path / "avg",
                     MergeOptions(average_all=True, weights=weights), progress=False)  # fmt: skip
    assert manifest["kind"] == "average" and "experts" not in manifest
    got, want = load_file(tmp_path / "avg" / "model.safetensors"), load_file(world.seed / "model.safetensors")
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert CheckpointReader(tmp_path / "avg").cfg.is_moe is False


@pytest.mark.parametrize("weights", [{"code": 1, "math": 2, "prose": 0, "seed": 5}, "tokens"])
def test_weighted_average_matches_a_hand_computation(world, tmp_path, weights):
    manifest = run_merge(world, tmp_path / "moe", weights=weights)
    run_merge(world, tmp_path / "avg", weights=weights, average_all=True)
    names = ["code", "math", "prose", "seed"]
    if weights == "tokens":  # experts by their DONE.json tokens; the seed as their mean
        raw = {"code": 1000, "math": 2000, "prose": 3000, "seed": 2000}
    else:
        raw = weights
    w = {n: raw[n] / sum(raw.values()) for n in names}
    assert manifest["weights"] == pytest.approx(w)
    paths = {**world.experts, "seed": world.seed}
    src = {n: load_file(paths[n] / "model.safetensors") for n in names}
    avg = load_file(tmp_path / "avg" / "model.safetensors")
    moe = load_file(tmp_path / "moe" / "model.safetensors")
    for key, tensor in avg.items():
        expected = sum(w[n] * src[n][key].double() for n in names).float()
        torch.testing.assert_close(tensor, expected, atol=1e-6, rtol=1e-6)
        if ".mlp." not in key:
            assert torch.equal(moe[key], tensor)  # the MoE's shared tensors are the same average
    # experts are the sources' FFNs, byte for byte
    for e, n in enumerate(names):
        for w_, proj in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
            assert torch.equal(moe[f"model.layers.1.block_sparse_moe.experts.{e}.{w_}.weight"],
                               src[n][f"model.layers.1.mlp.{proj}.weight"])  # fmt: skip


def test_bf16_output_and_no_seed_expert(world, tmp_path):
    manifest = run_merge(world, tmp_path / "m", keep_seed=False, dtype="bfloat16", shard_size="10KB")
    assert manifest["experts"] == ["code", "math", "prose"] and set(manifest["weights"]) == set(DOMAINS)
    reader = CheckpointReader(tmp_path / "m")
    assert reader.dtype == torch.bfloat16 and reader.cfg.n_experts == 3 and len(reader.metadata) > 1
    assert json.loads((tmp_path / "m" / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_inputs_of_another_dtype_are_converted_to_the_seeds(world, tmp_path):
    sd = {k: v.to(torch.bfloat16) for k, v in world.seed_model.state_dict().items()}
    half = tmp_path / "half"
    save_model(sd, CFG, half, dtype=torch.bfloat16)
    manifest = run_merge(world, tmp_path / "m", experts={"code": world.experts["code"], "half": half},
                         allow_no_manifest=True)  # fmt: skip
    assert manifest["options"]["dtype"] == "float32" and manifest["inputs"]["half"]["dtype"] == "bfloat16"
    out = load_file(tmp_path / "m" / "model.safetensors")
    assert torch.equal(out["model.layers.0.block_sparse_moe.experts.1.w2.weight"],
                       sd["layers.0.ffn.w2.weight"].float())  # fmt: skip


# ------------------------------------------------------------------------------ centroid routers


def own_expert_share(path: Path, names: list[str], run: Path) -> dict[tuple[str, int], float]:
    """{(domain, layer): share of the domain's validation tokens whose top-1 expert is its own}."""
    model = load_model(path, dtype=torch.float32).eval()
    model.set_routing_record(True)
    shares = {}
    for domain in DOMAINS:
        shard = load_shard(run / "data" / domain / "val.bin")
        val = torch.from_numpy(np.asarray(shard.tokens[:1024], dtype=np.int64)).view(4, 256)
        with torch.no_grad():
            model(val)
        for layer, ffn in enumerate(model.moe_layers()):
            top1 = ffn.last_routing.expert_TK[:, 0]
            shares[domain, layer] = (top1 == names.index(domain)).float().mean().item()
    return shares


@pytest.mark.parametrize("router_init", ["centroid", "ridge", "hidden"])
def test_data_fitted_routers_send_each_domain_to_its_own_expert(world, tmp_path, router_init):
    """On well-separated synthetic domains every layer's router sends at least 95% of a domain's
    tokens to its own expert (random routers: 0-83% here)."""
    prompts = PROMPTS if router_init == "hidden" else {}
    manifest = run_merge(world, tmp_path / "m", router_init=router_init, router_tokens=512, prompts=prompts)
    names = manifest["experts"]
    assert names == ["code", "math", "prose", "seed"]
    used = manifest["router_tokens"]
    if router_init == "hidden":
        assert used == {f"pos:{n}": len(PROMPTS[n][0]) + len(PROMPTS[n][1]) for n in DOMAINS}
    else:
        assert set(used) == set(DOMAINS) and all(0 < n <= 512 for n in used.values())
    low = {key: share for key, share in own_expert_share(tmp_path / "m", names, world.run).items() if share < 0.95}
    assert not low, f"{router_init}: (domain, layer) with too few tokens on their own expert: {low}"


def test_ridge_rows_solve_the_regression():
    """ridge_rows against a direct least-squares solve on the stacked hidden states."""
    from btx.mix.router_fit import LayerStats, ridge_rows

    gen = torch.Generator().manual_seed(0)
    X = {d: torch.randn(50, 6, generator=gen, dtype=torch.float64) + i for i, d in enumerate("abc")}
    all_X = torch.cat(list(X.values()))
    Y = torch.zeros(150, 3, dtype=torch.float64)
    for i in range(3):
        Y[50 * i : 50 * (i + 1), i] = 1
    stats = LayerStats(
        list(X),
        torch.tensor([50.0] * 3, dtype=torch.float64),
        torch.stack([x.sum(0) for x in X.values()]),
        all_X.T @ all_X,
    )
    lam = 0.1 * float(torch.diagonal(all_X.T @ all_X).sum()) / 6
    expected = torch.linalg.solve(all_X.T @ all_X + lam * torch.eye(6, dtype=torch.float64), all_X.T @ Y).T
    rows = ridge_rows(stats, ["a", "b", "c", None], 0.1)
    torch.testing.assert_close(rows[:3], expected.float())
    torch.testing.assert_close(rows[3], expected.mean(0).float())


def test_router_scale_multiplies_the_fitted_rows(world, tmp_path):
    one = run_merge(world, tmp_path / "one", router_init="ridge", router_tokens=256)
    ten = run_merge(world, tmp_path / "ten", router_init="ridge", router_tokens=256, router_scale=10.0)
    assert ten["options"]["router_scale"] == 10.0 and one["options"]["router_scale"] == 1.0
    a, b = CheckpointReader(tmp_path / "one"), CheckpointReader(tmp_path / "ten")
    # layer 0 exactly (same hidden states); above it the inputs differ, since layer 0 routes differently
    torch.testing.assert_close(b.get_btx("layers.0.ffn.router.weight"), 10 * a.get_btx("layers.0.ffn.router.weight"))


def test_centroid_needs_each_domains_data(world, tmp_path):
    outside = {n: tmp_path / "elsewhere" / n for n in DOMAINS}
    for n in DOMAINS:
        shutil.copytree(world.experts[n], outside[n])
    with pytest.raises(BtxError, match="--router-data code="):
        run_merge(world, tmp_path / "m", experts=outside, router_init="centroid", allow_no_manifest=True)
    data = {n: world.run / "data" / n / "val.bin" for n in DOMAINS}
    manifest = run_merge(world, tmp_path / "m", experts=outside, router_init="centroid", allow_no_manifest=True,
                         router_data=data, router_tokens=64)  # fmt: skip
    assert all(i["sha256_from"] == "read" for i in manifest["inputs"].values())


def test_centroid_data_takes_what_btx_eval_data_takes(world, tmp_path, capsys):
    """A prepared domain directory (its val shard) or a shard, as `btx eval --data` takes them."""
    common = [
        "merge",
        "--seed",
        str(world.seed),
        "--allow-no-manifest",
        "--router-init",
        "centroid",
        "--centroid-tokens",
        "64",
        "--quiet",
    ]
    experts = [a for n in DOMAINS for a in ("--expert", f"{n}={world.experts[n]}")]
    by_dir = [a for n in DOMAINS for a in ("--centroid-data", f"{n}={world.run / 'data' / n}")]
    by_shard = [a for n in DOMAINS for a in ("--centroid-data", f"{n}={world.run / 'data' / n / 'val.bin'}")]
    assert cli_main([*common, *experts, *by_dir, "--out", str(tmp_path / "a")]) == 0
    assert cli_main([*common, *experts, *by_shard, "--out", str(tmp_path / "b")]) == 0
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    identities = read_done(tmp_path / "a")["input_identities"]
    assert identities["centroid:code"]["sha256"] == {
        "val.bin": load_shard(world.run / "data" / "code" / "val.json").meta["sha256"]
    }
    capsys.readouterr()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli_main([*common, *experts, "--centroid-data", f"code={empty}", "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{empty}: a directory without val.json (centroid data of 'code'" in err
    assert not (tmp_path / "c").exists()


def test_an_expert_that_is_the_seed_or_given_twice_gets_a_warning(world, tmp_path, capsys):
    (tmp_path / "link").symlink_to(world.seed, target_is_directory=True)
    manifest = merge(
        world.seed,
        {"code": world.experts["code"], "alias": tmp_path / "link"},
        tmp_path / "m",
        MergeOptions(),
        allow_no_manifest=True,
        progress=False,
    )
    err = " ".join(capsys.readouterr().err.split())
    assert f"merge: warning: alias ({tmp_path / 'link'}) is the same checkpoint as seed ({world.seed})" in err
    assert f"merge: warning: seed ({world.seed}) has the same weights as alias" in err
    assert manifest["experts"] == ["code", "alias", "seed"]  # a warning, not an error


# ------------------------------------------------------------------------------ bad inputs


def _variant(world, tmp_path, **changes):
    import dataclasses

    cfg = dataclasses.replace(CFG, **changes)
    return save_expert(tmp_path / "run", "odd", random_model(cfg, 3), cfg=cfg)


def _truncated(world, tmp_path):
    final = copy_as_expert(tmp_path / "run", "odd", world.experts["code"])
    path = final / "model.safetensors"
    os.truncate(path, path.stat().st_size - 100)
    return final


def _unfinished(world, tmp_path):
    return save_expert(tmp_path / "run", "odd", world.seed_model, done=False)


def _other_tokenizer(world, tmp_path):
    final = copy_as_expert(tmp_path / "run", "odd", world.experts["code"])
    tokenizer = json.loads((final / "tokenizer.json").read_text())
    tokenizer["added_tokens"] = tokenizer.get("added_tokens", [])[:-1]  # any change at all
    (final / "tokenizer.json").write_text(json.dumps(tokenizer))
    return final


def _external(world, tmp_path):
    final = tmp_path / "downloaded"
    shutil.copytree(world.seed, final)
    return final


BAD_EXPERTS = {
    "shapes": (lambda w, t: _variant(w, t, ffn_dim=64), "intermediate_size is 64 but the seed"),
    "vocab": (lambda w, t: _variant(w, t, vocab_size=300), "vocab_size is 300"),
    "tie": (lambda w, t: _variant(w, t, tie_embeddings=True), "tie_word_embeddings is True"),
    "rope": (lambda w, t: _variant(w, t, rope_theta=500000.0), "rope_theta is 500000.0"),
    "truncated": (_truncated, "truncated"),
    "tokenizer": (_other_tokenizer, "differs from the seed's tokenizer.json"),
    "no DONE.json (btx job)": (_unfinished, "branch job has no DONE.json"),
    "no DONE.json (external)": (_external, "--allow-no-manifest"),
}


@pytest.mark.parametrize("case", BAD_EXPERTS)
def test_a_bad_expert_is_one_clear_error_and_nothing_is_written(world, tmp_path, case):
    make, message = BAD_EXPERTS[case]
    odd = make(world, tmp_path)
    out = tmp_path / "out" / "merged"
    with pytest.raises(BtxError, match=message) as err:
        run_merge(world, out, experts={"code": world.experts["code"], "odd": odd})
    assert "\n" not in str(err.value)
    assert not out.exists() and leftovers(out.parent) == []


def test_external_experts_need_the_flag(world, tmp_path):
    odd = _external(world, tmp_path)
    experts = {"code": world.experts["code"], "ext": odd}
    with pytest.raises(BtxError, match="--allow-no-manifest"):
        run_merge(world, tmp_path / "m", experts=experts)
    manifest = run_merge(world, tmp_path / "m", experts=experts, allow_no_manifest=True)
    assert manifest["inputs"]["ext"]["sha256_from"] == "read"


BAD_OPTIONS = {
    "top_k": (dict(top_k=5), "top_k 5 is more than the 4 experts"),
    "chunks": (dict(granularity="split", chunks=5), "chunks 5 must divide"),
    "split without chunks": (dict(granularity="split"), "split needs chunks"),
    "blend centroid": (dict(granularity="blend", router_init="centroid"), "blend experts mix every domain"),
    "weights": (dict(weights={"code": 1}), "missing math, prose, seed"),
    "average split": (dict(average_all=True, granularity="split", chunks=2), "dense model"),
    "upcycle with experts": (dict(upcycle=2), "takes no experts"),
    "router init": (dict(router_init="learned"), "router_init 'learned'"),
    "hidden without prompts": (dict(router_init="hidden"), "router_init hidden needs prompts"),
    "prompts of a stranger": (
        dict(router_init="hidden", prompts={"poetry": ["x"]}),
        "prompts of 'poetry': not an expert",
    ),
    "prompts for ridge": (dict(router_init="ridge", prompts={"code": ["x"]}), "prompts are for router_init hidden"),
    "empty prompt": (dict(router_init="hidden", prompts={"code": [""]}), "expected a list of non-empty strings"),
    "ridge lambda": (dict(router_init="ridge", ridge_lambda=0.0), "ridge_lambda must be a positive number"),
    "router scale": (dict(router_init="ridge", router_scale=float("inf")), "router_scale must be a positive number"),
}


@pytest.mark.parametrize("case", BAD_OPTIONS)
def test_bad_options_are_refused_before_writing(world, tmp_path, case):
    options, message = BAD_OPTIONS[case]
    with pytest.raises(BtxError, match=message):
        run_merge(world, tmp_path / "m", **options)
    assert not (tmp_path / "m").exists()


def test_existing_output_needs_force_and_inputs_are_never_outputs(world, tmp_path):
    out = tmp_path / "m"
    run_merge(world, out)
    before = hash_dir(out)
    with pytest.raises(BtxError, match="already exists.*--force"):
        run_merge(world, out, top_k=1)
    assert hash_dir(out) == before
    run_merge(world, out, top_k=1, force=True)
    assert CheckpointReader(out).cfg.top_k == 1 and leftovers(tmp_path) == []
    with pytest.raises(BtxError, match="overwrite or sit inside an input"):
        run_merge(world, world.seed / "merged", force=True)
    assert not (world.seed / "merged").exists()


# ------------------------------------------------------------------------------ atomic, reproducible


def test_killed_merge_leaves_nothing_finished_and_a_rerun_gives_the_same_bytes(world, tmp_path):
    out = tmp_path / "killed" / "merged"
    cmd = [sys.executable, "-m", "btx", "merge", "--seed", str(world.seed), "--out", str(out), "--quiet",
           "--shard-size", "20KB", "--router-init", "random", "--router-seed", "7",
           *(f"--expert={n}={p}" for n, p in world.experts.items())]  # fmt: skip
    env = {**os.environ, "BTX_MERGE_TEST_DELAY": "0.05", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if any(len(list(p.glob("model-*.safetensors"))) >= 2 for p in out.parent.glob(".merged.tmp-*")):
            break
        time.sleep(0.02)
    assert proc.poll() is None, f"the merge ended before it could be killed: {proc.stderr.read().decode()}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()  # only a hidden temporary is left

    options = MergeOptions(shard_size="20KB", router_seed=7)
    merge(world.seed, world.experts, out, options, progress=False)
    merge(world.seed, world.experts, tmp_path / "clean", options, progress=False)
    a, b = hash_dir(out), hash_dir(tmp_path / "clean")
    assert len(a) > 3 and a == b  # every file, byte for byte (DONE.json aside)
    assert read_done(out)["outputs"] == read_done(tmp_path / "clean")["outputs"]


# ------------------------------------------------------------------------------ recipe and CLI


def test_recipe_form_and_cli(world, tmp_path, capsys):
    recipe = REPO / "tests" / "fixtures" / "tiny" / "btx.yaml"
    run = tmp_path / "run"
    from btx.recipe.load import load_experiment

    exp = load_experiment(recipe, [f"run_dir={run}"])
    cfg = exp.model.to_model_config()
    seed = random_model(cfg, 0)
    save_model(seed, cfg, run / "seed", dtype=torch.float32)
    load_tokenizer("byte").save(run / "seed")  # as btx train leaves a seed: its experts carry the same
    with pytest.raises(BtxError, match="training job has no DONE.json"):
        merge_from_recipe(exp, progress=False)
    write_done(run / "seed", {"outputs": hash_dir(run / "seed")})
    for i, domain in enumerate(exp.domains):
        save_expert(run, domain, random_model(cfg, i + 1), cfg=cfg)
    manifest = merge_from_recipe(exp, progress=False)
    assert manifest["experts"] == [*exp.domains, "seed"] and manifest["recipe_hash"]
    assert read_done(run / "merged")["experts"] == manifest["experts"]
    up = merge_from_recipe(exp, upcycle=3, out_dir=tmp_path / "upcycled", progress=False)
    assert up["kind"] == "upcycle" and up["experts"] == ["seed.0", "seed.1", "seed.2"]

    rc = cli_main(
        ["merge", str(recipe), f"run_dir={run}", "merge.top_k=1", "merge.router_seed=3", "--force", "--quiet"]
    )
    assert rc == 0 and CheckpointReader(run / "merged").cfg.top_k == 1
    assert read_done(run / "merged")["options"]["router_seed"] == 3
    assert cli_main(["merge", str(recipe), f"run_dir={run}", "--top-k", "1"]) == 2
    assert "as recipe overrides" in capsys.readouterr().err
    rc = cli_main(["merge", "--seed", str(world.seed), "--expert", f"code={world.experts['code']}",
                   "--out", str(tmp_path / "adhoc"), "--weights", "code=3,seed=1", "--top-k", "1",
                   "--quiet"])  # fmt: skip
    assert rc == 0 and read_done(tmp_path / "adhoc")["weights"] == {"code": 0.75, "seed": 0.25}
    assert cli_main(["merge", "--seed", str(world.seed), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nothing to merge" in err


# ------------------------------------------------------------------------------ copied tensors


N_SEED_TENSORS = 3 + 9 * CFG.n_layers  # embed, norm, head; per layer 4 attention, 2 norms, 3 FFN
N_FFN_TENSORS = 3 * CFG.n_layers
ONLY = {"code": 0, "math": 0, "prose": 0, "seed": 0}


@pytest.mark.parametrize("options, n_copied", [
    # whole unscaled FFNs in the output dtype are copied; shared tensors are averaged over 4
    pytest.param({}, 4 * N_FFN_TENSORS, id="moe"),
    # gate and up rows of each chunk are copied; a chunk of down is a column range
    pytest.param({"keep_seed": False, "granularity": "split", "chunks": 2}, 3 * 2 * 2 * CFG.n_layers, id="split"),
    pytest.param({"granularity": "blend", "chunks": 2}, 0, id="blend"),  # each expert has a piece of several FFNs
    pytest.param({"upcycle": 3}, 3 * N_FFN_TENSORS + N_SEED_TENSORS - N_FFN_TENSORS, id="upcycle"),
    pytest.param({"average_all": True, "weights": {**ONLY, "code": 1}}, N_SEED_TENSORS, id="average-one"),
    pytest.param({"weights": {**ONLY, "seed": 1}, "shard_size": "10KB"},
                 4 * N_FFN_TENSORS + N_SEED_TENSORS - N_FFN_TENSORS, id="shared-from-seed"),
    pytest.param({"dtype": "bfloat16"}, 0, id="bf16"),  # every tensor is converted
])  # fmt: skip
def test_copied_tensors_are_the_computed_ones(world, tmp_path, monkeypatch, options, n_copied):
    """Tensors that already lie byte for byte in a source are copied file to file
    (`MergedTensors.stored`); the checkpoint is the same as when every tensor is computed."""
    from btx.mix.merged_tensors import MergedTensors

    real, copied = MergedTensors.stored, []

    def counting(self, *args):
        found = real(self, *args)
        copied.extend([args] if found is not None else [])
        return found

    experts = {} if options.get("upcycle") else None
    monkeypatch.setattr(MergedTensors, "stored", counting)
    run_merge(world, tmp_path / "copied", experts=experts, router_seed=3, **options)
    monkeypatch.setattr(MergedTensors, "stored", lambda self, *args: None)
    run_merge(world, tmp_path / "computed", experts=experts, router_seed=3, **options)
    copied_files, computed_files = hash_dir(tmp_path / "copied"), hash_dir(tmp_path / "computed")
    assert len(copied_files) > 2 and copied_files == computed_files
    assert read_done(tmp_path / "copied")["outputs"] == read_done(tmp_path / "computed")["outputs"]
    assert len(copied) == n_copied
