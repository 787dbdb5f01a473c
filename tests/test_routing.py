"""Routing analysis (btx/evaluate/routing.py, btx/evaluate/routing_report.py, `btx analyze`).

The central test builds a model whose routing is known in closed form: attention and expert
outputs are zero, so every layer's FFN input is the token's embedding, and the embedding of
token id t is (a, b, 0, ...) with a = +1 if t < 128 else -1 and b = +1 if t is even else -1. The
routers read those two coordinates, so each token's router probabilities follow from (a, b)
alone, and every number in routing.json can be computed here by hand.
"""

import csv
import json
import math
import sys

import numpy as np
import pytest
import torch

from btx.cli import main
from btx.data.prepare import prepare_domain
from btx.data.tokenizer import ByteTokenizer
from btx.errors import BtxError
from btx.evaluate.routing import RoutingAccumulator, routings_of
from btx.evaluate.routing_analysis import analyze_checkpoint
from btx.io.checkpoint import load_model, save_model
from btx.io.manifest import write_done
from btx.model.config import ModelConfig
from btx.model.transformer import Transformer

E, TOP_K, DIM = 4, 2, 8
# Router rows over the embedding coordinates (a, b), per layer. Layer 0 sorts by a (low ids to
# expert 0, high ids to expert 1) with parity as the runner-up; layer 1 swaps the two roles.
ROUTERS = [
    [[4, 0], [-4, 0], [0, 2], [0, -2]],
    [[0, 4], [0, -4], [2, 0], [-2, 0]],
]
EXPERT_NAMES = ["low", "high", "even", "odd"]
LOW_TEXT = "abcd efgh " * 20 + "Hello, world. 0123456789"  # ASCII only: every id < 128
HIGH_TEXT = "é" * 40 + "ü" * 25 + "ab" * 10  # é = C3 A9 (both odd), ü = C3 BC (odd, even)


def hand_routed_model(router_scale: float = 1.0) -> Transformer:
    cfg = ModelConfig(vocab_size=264, dim=DIM, n_layers=2, n_heads=2, n_kv_heads=2, ffn_dim=8,
                      n_experts=E, top_k=TOP_K, max_seq_len=64)  # fmt: skip
    model = Transformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        ids = torch.arange(cfg.vocab_size)
        model.embed.weight[:, 0] = torch.where(ids < 128, 1.0, -1.0)
        model.embed.weight[:, 1] = torch.where(ids % 2 == 0, 1.0, -1.0)
        for layer, rows in zip(model.layers, ROUTERS):
            layer.attn_norm.weight.fill_(1.0)
            layer.ffn_norm.weight.fill_(1.0)
            layer.ffn.router.weight[:, :2] = torch.tensor(rows, dtype=torch.float32) * router_scale
        model.norm.weight.fill_(1.0)
    return model


def save(model, path, experts=EXPERT_NAMES):
    tok_dir = path.parent / f"{path.name}-tok"
    ByteTokenizer().save(tok_dir)
    save_model(model, None, path, tokenizer_from=tok_dir)
    if experts is not None:
        write_done(path, {"stage": "merge", "experts": list(experts)})
    return path


def make_shard(tmp_path, name, text, tokenizer="byte"):
    """A btx shard holding exactly the text's bytes (no EOS), all in the train split."""
    doc = tmp_path / f"{name}.txt"
    doc.write_text(text)
    prepare_domain(
        name, [str(doc)], tokenizer, tmp_path / "data" / name, val_fraction=0.0, append_eos=False, progress=False
    )
    return tmp_path / "data" / name / "train.bin"


def expected_stats(ids, router_scale=1.0):
    """By hand, with numpy: the statistics of routing.json for tokens `ids`."""
    ids = np.asarray(ids)
    a = np.where(ids < 128, 1.0, -1.0)
    b = np.where(ids % 2 == 0, 1.0, -1.0)
    x = np.stack([a, b], 1) / math.sqrt(2 / DIM + 1e-5)  # RMSNorm of (a, b, 0, ..., 0)
    out = {k: [] for k in ("top1_frac", "topk_frac", "load_share", "mean_prob", "entropy_of_mean",
                           "mean_token_entropy", "load_imbalance", "dropped_frac")}  # fmt: skip
    top1_by_layer = []
    for rows in ROUTERS:
        logits = x @ (np.array(rows, dtype=np.float64) * router_scale).T
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        order = np.argsort(-p, axis=1, kind="stable")
        top1, chosen = order[:, 0], order[:, :TOP_K]
        top1_by_layer.append(top1)
        top1_frac = np.bincount(top1, minlength=E) / len(ids)
        topk_frac = np.bincount(chosen.ravel(), minlength=E) / len(ids)
        mean_p = p.mean(0)
        out["top1_frac"].append(top1_frac)
        out["topk_frac"].append(topk_frac)
        out["load_share"].append(topk_frac / TOP_K)
        out["mean_prob"].append(mean_p)
        out["entropy_of_mean"].append(-(mean_p * np.log(mean_p)).sum())
        out["mean_token_entropy"].append((-(p * np.log(p)).sum(1)).mean())
        out["load_imbalance"].append((topk_frac / TOP_K).max() * E)
        out["dropped_frac"].append(0.0)
    out["top1_agreement"] = [(top1_by_layer[0] == top1_by_layer[1]).mean()]
    out["tokens"] = len(ids)
    return out


def assert_stats(got, want, own=None):
    assert got["tokens"] == want["tokens"]
    for key, value in want.items():
        np.testing.assert_allclose(
            np.asarray(got[key], dtype=float), np.asarray(value, dtype=float), rtol=1e-6, atol=1e-9, err_msg=key
        )
    if own is not None:
        e = EXPERT_NAMES.index(own)
        assert got["own_expert"] == own
        np.testing.assert_allclose(got["own_top1_frac"], [row[e] for row in want["top1_frac"]], rtol=1e-6)
        np.testing.assert_allclose(got["own_topk_frac"], [row[e] for row in want["topk_frac"]], rtol=1e-6)


def run_cli(args, capsys):
    status = main(["analyze", *map(str, args)])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("routing")
    ckpt = save(hand_routed_model(), tmp / "moe")
    shards = {"low": make_shard(tmp, "low", LOW_TEXT), "high": make_shard(tmp, "high", HIGH_TEXT)}
    return tmp, ckpt, shards


# ------------------------------------------------------------------------- the numbers


def test_every_number_matches_a_hand_computation(setup, capsys):
    tmp, ckpt, shards = setup
    out = tmp / "out-hand"
    status, stdout, err = run_cli(
        [
            ckpt,
            "--data",
            f"low={shards['low']}",
            "--data",
            f"high={shards['high']}",
            "--seq-len",
            16,
            "--batch-size",
            3,
            "--out",
            out,
            "--show-text",
        ],
        capsys,
    )
    assert status == 0, err
    report = json.loads((out / "routing.json").read_text())
    low_ids, high_ids = list(LOW_TEXT.encode()), list(HIGH_TEXT.encode())

    assert report["experts"] == EXPERT_NAMES and report["experts_from"].endswith("DONE.json")
    assert report["model"] == {"n_layers": 2, "n_experts": E, "top_k": TOP_K, "router_mode": "topk",
                               "experts_per_token": TOP_K}  # fmt: skip
    assert report["data"]["low"]["tokenizer_checked"] is True
    assert set(report["definitions"]) >= {"top1_frac", "load_imbalance", "top1_agreement"}

    # Closed form for the ASCII-only domain: layer 0 sends every token to "low" first.
    low = report["domains"]["low"]
    assert low["top1_frac"][0] == [1.0, 0.0, 0.0, 0.0]
    assert low["own_top1_frac"][0] == 1.0 and low["load_imbalance"][0] == pytest.approx(2.0)
    assert_stats(low, expected_stats(low_ids), own="low")
    assert_stats(report["domains"]["high"], expected_stats(high_ids), own="high")
    assert_stats(report["overall"], expected_stats(low_ids + high_ids))
    # overall own share: the share of all tokens that went to their own domain's expert
    own_low, own_high = expected_stats(low_ids)["top1_frac"], expected_stats(high_ids)["top1_frac"]
    n_low, n_high = len(low_ids), len(high_ids)
    for layer in range(2):
        want = (own_low[layer][0] * n_low + own_high[layer][1] * n_high) / (n_low + n_high)
        assert report["overall"]["own_top1_frac"][layer] == pytest.approx(want)

    # The CSV holds the same numbers in long format.
    rows = list(csv.DictReader((out / "routing.csv").read_text().splitlines()))
    assert len(rows) == 3 * 2 * E  # low, high, (overall) x layers x experts
    row = next(r for r in rows if (r["domain"], r["layer"], r["expert"]) == ("high", "1", "even"))
    for key in ("top1_frac", "topk_frac", "mean_prob", "load_share"):
        assert float(row[key]) == report["domains"]["high"][key][1][2]

    # The terminal view: heatmaps, summary, and the token-level text with its legend.
    assert "low tokens: load_share" in stdout and "summary" in stdout and "top-1 expert at layer 1" in stdout
    sample = report["samples"]["high"][0]
    assert "".join(sample["pieces"]) == HIGH_TEXT[: len("".join(sample["pieces"]))]
    assert sample["top1"][0][:2] == [1, 1]  # é's two bytes are high ids: expert "high" at layer 0


def test_token_budget_and_streaming(setup):
    """--tokens caps each domain; windows are spread over the shard; text files are packed with EOS."""
    tmp, ckpt, shards = setup
    report = analyze_checkpoint(ckpt, {"low": str(shards["low"])}, tokens=50, seq_len=16, batch_size=2)
    assert report["domains"]["low"]["tokens"] == 50
    # The 50 tokens are 4 windows spread over the whole shard, without overlap, first to last token.
    from btx.data.shards import load_shard
    from btx.evaluate.routing_analysis import DomainData

    shard = load_shard(make_shard(tmp, "distinct", "".join(chr(33 + i) for i in range(90))))  # 90 distinct ids
    windows = list(DomainData("distinct", "distinct", "shard", shard=shard).windows(seq_len=16, max_tokens=50))
    assert [len(w) for w in windows] == [16, 16, 16, 2]
    starts = [next(s for s in range(len(shard)) if np.array_equal(shard.tokens[s : s + len(w)], w)) for w in windows]
    assert starts[0] == 0 and starts[-1] + 2 == len(shard)
    assert all(b - a >= 16 for a, b in zip(starts, starts[1:]))

    text = tmp / "mixed.jsonl"
    text.write_text(json.dumps({"text": "abc"}) + "\n" + json.dumps({"text": "é"}) + "\n")
    report = analyze_checkpoint(ckpt, {"mixed": str(text)}, seq_len=4, batch_size=2)
    ids = list(b"abc") + [257] + list("é".encode()) + [257]  # each document ends with EOS
    assert_stats(report["domains"]["mixed"], expected_stats(ids))


def test_accumulator_matches_the_analysis(setup):
    """What btx finetune logs (RoutingAccumulator over full forwards) equals the analysis."""
    tmp, ckpt, shards = setup
    model = load_model(ckpt)
    model.set_routing_record(True)
    acc = RoutingAccumulator(n_layers=2, n_experts=E, top_k=TOP_K)
    mixed = RoutingAccumulator(n_layers=2, n_experts=E, top_k=TOP_K)
    seq = 8
    for name in ("low", "high"):
        ids = torch.from_numpy(np.fromfile(shards[name], dtype=np.uint16).astype(np.int64))
        full = len(ids) // seq * seq
        for batch in (ids[:full].view(-1, seq), ids[full:].view(1, -1)):  # the last window is shorter
            if batch.numel() == 0:
                continue
            model(batch)
            acc.update(model, domain=name)
            mixed.update(model, domain=[name] * batch.shape[0])
    # One batch with rows from two domains, labelled per row.
    low = torch.tensor(list(LOW_TEXT.encode())[:seq])
    high = torch.tensor(list(HIGH_TEXT.encode())[:seq])
    model(torch.stack([low, high, low]))
    rows = RoutingAccumulator(n_layers=2, n_experts=E, top_k=TOP_K)
    rows.update(routings_of(model), domain=["low", "high", "low"])
    assert_stats(rows.summary()["domains"]["low"], expected_stats(low.tolist() * 2))
    assert_stats(rows.summary()["domains"]["high"], expected_stats(high.tolist()))

    report = analyze_checkpoint(ckpt, {n: str(p) for n, p in shards.items()}, seq_len=seq, batch_size=4)
    summary = acc.summary()
    for name in ("low", "high"):
        for key in (
            "tokens",
            "top1_frac",
            "topk_frac",
            "load_share",
            "mean_prob",
            "load_imbalance",
            "entropy_of_mean",
            "mean_token_entropy",
            "top1_agreement",
        ):
            np.testing.assert_allclose(
                summary["domains"][name][key], report["domains"][name][key], rtol=1e-9, err_msg=key
            )
            np.testing.assert_allclose(
                mixed.summary()["domains"][name][key], summary["domains"][name][key], rtol=1e-12, err_msg=key
            )
    np.testing.assert_allclose(summary["overall"]["load_share"], report["overall"]["load_share"], rtol=1e-9)

    acc.update(model)  # domain None: overall only
    assert acc.domains == ["low", "high"]
    assert acc.summary()["overall"]["tokens"] == report["overall"]["tokens"] + 3 * seq
    model.set_routing_record(False)
    with pytest.raises(RuntimeError, match="set_routing_record"):
        acc.update(model)


# ------------------------------------------------------------------------- any Mixtral checkpoint


def test_transformers_mixtral_checkpoint(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    config = transformers.MixtralConfig(
        vocab_size=264, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=128,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(config).eval()
    with torch.no_grad():  # a sharper router than the default init, so the top-1 choices are clear-cut
        for name, p in model.named_parameters():
            if name.endswith("gate.weight"):
                p.normal_(0, 1.0)
    model.save_pretrained(tmp_path / "mix")
    ByteTokenizer().save(tmp_path / "mix")  # a tokenizer next to the weights, as on the Hub
    text = "def f(x):\n    return x * 2\n" * 6
    (tmp_path / "code.txt").write_text(text)

    status, stdout, err = run_cli(
        [tmp_path / "mix", "--data", f"code={tmp_path / 'code.txt'}", "--seq-len", 32, "--out", tmp_path / "out"],
        capsys,
    )
    assert status == 0, err
    report = json.loads((tmp_path / "out" / "routing.json").read_text())
    assert report["experts"] == ["e0", "e1", "e2", "e3"] and report["experts_from"] == "default"
    code = report["domains"]["code"]
    ids = list(text.encode()) + [ByteTokenizer.eos_id]
    assert code["tokens"] == len(ids)

    # transformers' own router logits on the same windows give the same top-1 shares.
    counts = np.zeros((3, 4))
    for start in range(0, len(ids), 32):
        window = torch.tensor([ids[start : start + 32]])
        with torch.no_grad():
            logits = model(window, output_router_logits=True).router_logits
        for layer, layer_logits in enumerate(logits):
            counts[layer] += np.bincount(layer_logits.argmax(-1).numpy(), minlength=4)
    np.testing.assert_allclose(code["top1_frac"], counts / len(ids), atol=1e-12)
    for layer in range(3):
        assert sum(code["load_share"][layer]) == pytest.approx(1.0)


# ------------------------------------------------------------------------- plots


def test_pngs_written(setup, capsys):
    pytest.importorskip("matplotlib")
    tmp, ckpt, shards = setup
    status, _, err = run_cli(
        [ckpt, "--data", f"low={shards['low']}", "--data", f"high={shards['high']}", "--out", tmp / "out-png"], capsys
    )
    assert status == 0, err
    for name in ("heatmap_low.png", "heatmap_high.png", "layers_stacked.png"):
        data = (tmp / "out-png" / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 2000, name
    assert "matplotlib is not installed" not in err


def test_works_without_matplotlib(setup, capsys, monkeypatch):
    tmp, ckpt, shards = setup
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    status, _, err = run_cli([ckpt, "--data", f"low={shards['low']}", "--out", tmp / "out-noplt"], capsys)
    assert status == 0, err
    assert "pip install 'btx[plots]'" in err
    assert (tmp / "out-noplt" / "routing.json").is_file() and (tmp / "out-noplt" / "routing.csv").is_file()
    assert not list((tmp / "out-noplt").glob("*.png"))


# ------------------------------------------------------------------------- comparison


def test_compare_two_checkpoints(setup, capsys):
    tmp, ckpt, shards = setup
    softer = save(hand_routed_model(router_scale=0.5), tmp / "moe-soft")
    out = tmp / "out-cmp"
    status, stdout, err = run_cli(["--compare", ckpt, softer, "--data", f"high={shards['high']}", "--out", out], capsys)
    assert status == 0, err
    report = json.loads((out / "routing.json").read_text())
    b = json.loads((out / "compare" / "routing.json").read_text())
    ids = list(HIGH_TEXT.encode())
    assert_stats(b["domains"]["high"], expected_stats(ids, router_scale=0.5), own="high")
    diff = report["compare"]["difference"]["domains"]["high"]
    want_a, want_b = expected_stats(ids), expected_stats(ids, router_scale=0.5)
    np.testing.assert_allclose(diff["mean_prob"], np.subtract(want_b["mean_prob"], want_a["mean_prob"]), atol=1e-6)
    np.testing.assert_allclose(
        diff["mean_token_entropy"], np.subtract(want_b["mean_token_entropy"], want_a["mean_token_entropy"]), atol=1e-6
    )
    assert "B minus A" in stdout and "(A → B)" in stdout
    if (out / "compare").joinpath("diff_high.png").exists():  # with matplotlib
        assert (out / "compare" / "layers_stacked.png").is_file()


# ------------------------------------------------------------------------- bad input


def one_line_error(capsys, args):
    status, _, err = run_cli(args, capsys)
    assert status == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("btx: error:"), err
    return lines[0]


def test_bad_inputs(setup, tmp_path, capsys):
    _, ckpt, shards = setup
    low = f"low={shards['low']}"
    # a missing checkpoint, and a missing data path
    assert "not found" in one_line_error(capsys, [tmp_path / "nope", "--data", low])
    assert "missing.txt: not found" in one_line_error(capsys, [ckpt, "--data", f"x={tmp_path / 'missing.txt'}"])
    # a dense checkpoint
    dense = ModelConfig(vocab_size=264, dim=16, n_layers=1, n_heads=2, n_kv_heads=2, ffn_dim=16)
    save_model(Transformer(dense), None, tmp_path / "dense")
    assert "dense model" in one_line_error(capsys, [tmp_path / "dense", "--data", low])
    # an empty data file
    (tmp_path / "empty.txt").write_text("")
    assert "empty.txt: empty data file" in one_line_error(capsys, [ckpt, "--data", f"e={tmp_path / 'empty.txt'}"])
    # a shard made with another tokenizer (same ids, different identity)
    other = tmp_path / "other-tok" / "tokenizer.json"
    other.parent.mkdir()
    other.write_text(ByteTokenizer().to_hf_json())
    foreign = make_shard(tmp_path, "foreign", LOW_TEXT, tokenizer=other)
    message = one_line_error(capsys, [ckpt, "--data", f"foreign={foreign}"])
    assert "foreign" in message and "tokenizer" in message
    # malformed flags
    assert "DOMAIN=PATH" in one_line_error(capsys, [ckpt, "--data", "nodomain"])
    assert "--layer" in one_line_error(capsys, [ckpt, "--data", low, "--layer", 7, "--out", tmp_path / "o"])
    assert "--experts" in one_line_error(capsys, [ckpt, "--data", low, "--experts", "a,b"])
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep me")
    assert "not an earlier routing analysis" in one_line_error(
        capsys, [ckpt, "--data", low, "--out", tmp_path / "precious"]
    )
    assert (tmp_path / "precious" / "notes.txt").read_text() == "keep me"


def test_analyze_is_registered():
    from btx.cli import COMMANDS

    assert "analyze" in COMMANDS
    with pytest.raises(BtxError, match="--tokens"):
        analyze_checkpoint("unused", {}, tokens=0)


# ------------------------------------------------------------------------- recipe mode


def test_recipe_mode(tmp_path, capsys):
    """`btx analyze RECIPE`: the run's model, its domains' validation shards, <run_dir>/analysis/."""
    run = tmp_path / "run"
    for name, text in (("low", LOW_TEXT), ("high", HIGH_TEXT)):
        (tmp_path / f"{name}.txt").write_text(text)
        (tmp_path / f"{name}.yaml").write_text(f"data:\n  sources: [{name}.txt]\n")
        prepare_domain(
            name,
            [str(tmp_path / f"{name}.txt"), str(tmp_path / f"{name}.txt")],
            "byte",
            run / "data" / name,
            val_fraction=0.5,
            append_eos=False,
            progress=False,
        )
    (tmp_path / "btx.yaml").write_text(
        f"experiment: rt\nrun_dir: {run}\ntokenizer: byte\n"
        "model: {vocab_size: 264, dim: 8, n_layers: 2, n_heads: 2, n_kv_heads: 2, ffn_dim: 8, max_seq_len: 64}\n"
        "domains: {low: low.yaml, high: high.yaml}\nanalyze: {tokens: 100, show_text: 1}\n"
    )
    assert "no finished finetuned/ or merged/" in one_line_error(capsys, [tmp_path / "btx.yaml"])
    save(hand_routed_model(), run / "merged")  # its DONE.json names the experts

    status, stdout, err = run_cli([tmp_path / "btx.yaml", "analyze.tokens=50"], capsys)
    assert status == 0, err
    report = json.loads((run / "analysis" / "routing.json").read_text())
    assert report["checkpoint"] == str(run / "merged") and report["experts"] == EXPERT_NAMES
    assert {d: s["tokens"] for d, s in report["domains"].items()} == {"low": 50, "high": 50}
    assert report["data"]["low"]["source"].endswith("data/low/val.json")
    done = json.loads((run / "analysis" / "DONE.json").read_text())
    assert done["stage"] == "analyze" and "routing.json" in done["files"]
    assert "top-1 expert at layer 1" in stdout  # analyze.show_text: 1

    from btx.evaluate.analyze import analyze_recipe
    from btx.recipe.load import load_experiment

    report = analyze_recipe(load_experiment(tmp_path / "btx.yaml"))  # what btx run's analyze stage calls
    assert report["domains"]["low"]["tokens"] == 100
    own_low = report["domains"]["low"]["own_top1_frac"]
    assert own_low[0] == 1.0  # layer 0 sends every ASCII token to "low"; layer 1 sorts by parity
    assert report["headline"].startswith(f"tokens on their own expert (top-1): low {sum(own_low) / 2 * 100:.0f}%")


def test_overall_over_ranks(setup):
    """`overall(all_ranks=True)` sums counts over torch.distributed ranks (one rank here)."""
    import torch.distributed as dist

    tmp, ckpt, _ = setup
    model = load_model(ckpt)
    model.set_routing_record(True)
    model(torch.tensor([list(LOW_TEXT.encode())[:16]]))
    acc = RoutingAccumulator(n_layers=2, n_experts=E, top_k=TOP_K)
    acc.update(model, domain="low")
    dist.init_process_group("gloo", init_method=f"file://{tmp}/pg", rank=0, world_size=1)
    try:
        assert acc.overall(all_ranks=True) == acc.summary()["overall"]
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------- demonstration


def test_demo_merged_model(tmp_path, capsys):
    """tools/routing_demo.py at a smaller size: a real btx merge (random vs centroid routers) analysed
    side by side. Centroid routers send more of every domain to its own expert than random ones."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "routing_demo", Path(__file__).parent.parent / "tools" / "routing_demo.py"
    )
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    paths = demo.build(tmp_path, dim=32, n_layers=2, data_bytes=40_000, router_tokens=2048)
    status, stdout, err = run_cli(demo.analyze_args(paths, tmp_path / "analysis", tokens=4096), capsys)
    assert status == 0, err
    random_routers = json.loads((tmp_path / "analysis" / "routing.json").read_text())
    centroid = json.loads((tmp_path / "analysis" / "compare" / "routing.json").read_text())
    assert centroid["experts"] == ["code", "math", "prose", "seed"]  # from the merge's DONE.json
    for report in (random_routers, centroid):
        assert all(s["tokens"] == 4096 for s in report["domains"].values())
    gain = [np.mean(centroid["overall"]["own_top1_frac"]), np.mean(random_routers["overall"]["own_top1_frac"])]
    assert gain[0] > gain[1] + 0.1, gain
    diff = random_routers["compare"]["difference"]["overall"]["own_top1_frac"]
    np.testing.assert_allclose(
        diff, np.subtract(centroid["overall"]["own_top1_frac"], random_routers["overall"]["own_top1_frac"]), atol=1e-12
    )
