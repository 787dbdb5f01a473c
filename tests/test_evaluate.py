"""btx/evaluate/ and `btx eval`: per-domain loss, the BTM ensemble, the table, the CLI.

The workhorse is a hand-built "bigram" transformer: every attention and FFN weight is zero, so the
residual stream is the token embedding and the logits are lm_head(RMSNorm(embed[x_t])). With
one-hot embeddings the logits of the next token are a table we choose, so every loss has a closed
form computed here with numpy. Expert "ab" knows text over the letters a/b, expert "xy" text over
x/y; on the other's letters each predicts uniformly.
"""

from __future__ import annotations

import importlib.util
import json
import math
import random

import numpy as np
import pytest
import torch

from btx.cli import main
from btx.data.prepare import prepare_domain
from btx.data.shards import load_shard
from btx.data.tokenizer import ByteTokenizer
from btx.errors import BtxError
from btx.evaluate.btm import (
    BIGRAM_BUCKETS,
    TfidfRouter,
    btm_losses,
    btm_mixture,
    btm_topk_mixture,
)
from btx.evaluate.checkpoints import default_names
from btx.evaluate.scores import (
    EvalRow,
    domain_losses,
    paired_differences,
    row_from_logprobs,
)
from btx.evaluate.table import render, save, to_markdown
from btx.io.checkpoint import save_model
from btx.io.manifest import write_done
from btx.model.config import ModelConfig
from btx.model.transformer import Transformer

V, D, EPS = 264, 16, 1e-5  # the byte tokenizer's vocabulary; model dim; RMSNorm eps
SEQ = 16


def bigram_logits(follow: dict[str, dict[str, float]]) -> np.ndarray:
    """[V, V] next-token logits: row t is the logit of every next token after t (0 when unlisted)."""
    table = np.zeros((V, V))
    for prev, nxt in follow.items():
        for tok, logit in nxt.items():
            table[ord(prev), ord(tok)] = logit
    return table


def bigram_model(follow: dict[str, dict[str, float]], vocab: int = V) -> tuple[Transformer, np.ndarray]:
    """A dense Llama whose logits after token t are exactly row t of `bigram_logits(follow)`."""
    cfg = ModelConfig(vocab_size=vocab, dim=D, n_layers=1, n_heads=2, n_kv_heads=2, ffn_dim=8, max_seq_len=64,
                      norm_eps=EPS)  # fmt: skip
    model = Transformer(cfg)
    table = bigram_logits(follow)[:vocab, :vocab]
    scale = math.sqrt(1 / D + EPS)  # RMSNorm turns a one-hot embedding e into e / scale
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for layer in model.layers:
            layer.attn_norm.weight.fill_(1.0)
            layer.ffn_norm.weight.fill_(1.0)
        model.norm.weight.fill_(1.0)
        for slot, prev in enumerate(follow):
            model.embed.weight[ord(prev), slot] = 1.0
            model.lm_head.weight[:, slot] = torch.tensor(table[ord(prev)] * scale, dtype=torch.float32)
    return model.eval(), table


def skewed(letters: str, p: float = 0.85) -> dict[str, dict[str, float]]:
    """After one letter the other follows with probability ~p (logits offset so the letters dominate)."""
    x, y = letters
    hi, lo = math.log(p) + 9, math.log(1 - p) + 9
    return {x: {y: hi, x: lo}, y: {x: hi, y: lo}}


def markov_text(letters: str, n: int, seed: int, p: float = 0.85) -> str:
    rng = random.Random(seed)
    out = [letters[0]]
    for _ in range(n - 1):
        other = letters[1] if out[-1] == letters[0] else letters[0]
        out.append(other if rng.random() < p else out[-1])
    return "".join(out)


def make_shard(tmp_path, name, text, tokenizer="byte"):
    """A btx shard holding exactly the text's bytes (no EOS), all in the train split."""
    doc = tmp_path / f"{name}.txt"
    doc.write_text(text)
    prepare_domain(
        name, [str(doc)], tokenizer, tmp_path / "data" / name, val_fraction=0.0, append_eos=False, progress=False
    )
    return tmp_path / "data" / name / "train.json"


def hand_nll(table: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """-log p(ids[i+1] | ids[i]) for every i, float64."""
    logits = table[ids[:-1]]
    logz = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
    return logz - logits[np.arange(len(ids) - 1), ids[1:]]


def scored_ids(shard, seq_len, batch_size, batches) -> np.ndarray:
    """The token ids the eval windows cover: whole windows from the start, at most batches*batch_size."""
    windows = min((len(shard) - 1) // seq_len, batches * batch_size)
    return np.asarray(shard.tokens[: windows * seq_len + 1], dtype=np.int64)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    ab, ab_table = bigram_model(skewed("ab"))
    xy, xy_table = bigram_model(skewed("xy"))
    shards = {
        "ab": make_shard(tmp, "ab", markov_text("ab", 1000, 1)),  # 62 windows of 16: the last partial
        "xy": make_shard(tmp, "xy", markov_text("xy", 700, 2)),
    }
    return {
        "tmp": tmp,
        "models": {"ab": ab, "xy": xy},
        "tables": {"ab": ab_table, "xy": xy_table},
        "shards": shards,
        "loaded": {d: load_shard(p) for d, p in shards.items()},
    }


# ---------------------------------------------------------------------------------------- losses


def test_domain_losses_match_a_hand_computation(world):
    model, table = world["models"]["ab"], world["tables"]["ab"]
    for batch_size, batches in ((4, 3), (8, 100)):  # a truncated pass, and every window (partial batch last)
        losses, tokens = domain_losses(model, world["loaded"], SEQ, batch_size, batches)
        for d, shard in world["loaded"].items():
            ids = scored_ids(shard, SEQ, batch_size, batches)
            want = hand_nll(table, ids)
            assert tokens[d] == len(want)
            assert losses[d] == pytest.approx(want.mean(), rel=1e-5)
    assert tokens == {"ab": 62 * SEQ, "xy": 43 * SEQ}  # (1000 - 1) // 16 and (700 - 1) // 16 windows
    # the "ab" expert knows nothing of x/y: uniform over the vocabulary
    assert losses["xy"] == pytest.approx(math.log(V), rel=1e-6)


def test_domain_losses_of_a_real_model_match_window_by_window_forwards(world):
    """A random transformer (attention matters): the batched loss equals one forward per window,
    each window starting with a fresh context."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=V, dim=16, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=24,
                                    max_seq_len=64)).eval()  # fmt: skip
    shard = world["loaded"]["xy"]
    losses, tokens = domain_losses(model, {"xy": shard}, 8, 3, 4)  # 4 batches of 3 windows
    ids = torch.from_numpy(scored_ids(shard, 8, 3, 4))
    total = 0.0
    with torch.no_grad():
        for w in range(12):
            window = ids[w * 8 : w * 8 + 9]
            logp = torch.log_softmax(model(window[None, :-1]).logits[0].double(), -1)
            total -= logp[torch.arange(8), window[1:]].sum().item()
    assert tokens["xy"] == 96
    assert losses["xy"] == pytest.approx(total / 96, rel=1e-6)


# ---------------------------------------------------------------------------------------- BTM


def test_btm_of_identical_experts_is_the_expert(world):
    torch.manual_seed(1)
    model = Transformer(ModelConfig(vocab_size=V, dim=16, n_layers=1, n_heads=2, n_kv_heads=2, ffn_dim=16,
                                    max_seq_len=64)).eval()  # fmt: skip
    single, _ = domain_losses(model, world["loaded"], SEQ, 4, 2)
    twice = btm_losses([model, model], world["loaded"], SEQ, 4, 2)
    thrice = btm_losses([model, model, model], world["loaded"], SEQ, 4, 2)
    for d in single:
        assert twice[d] == pytest.approx(single[d], rel=1e-6)
        assert thrice[d] == pytest.approx(single[d], rel=1e-6)


def test_btm_follows_the_better_expert_per_domain(world):
    models, tables = world["models"], world["tables"]
    experts = [models["ab"], models["xy"]]
    alone = {name: domain_losses(m, world["loaded"], SEQ, 8, 100)[0] for name, m in models.items()}
    btm = btm_losses(experts, world["loaded"], SEQ, 8, 100)
    for d, shard in world["loaded"].items():
        better, worse = alone[d][d], alone["xy" if d == "ab" else "ab"][d]
        assert better < 0.6 and worse == pytest.approx(math.log(V), rel=1e-6)
        # the uniform mixture of the two next-token distributions, token by token
        ids = scored_ids(shard, SEQ, 8, 100)
        p = np.exp(-np.stack([hand_nll(tables["ab"], ids), hand_nll(tables["xy"], ids)]))
        uniform_mix = -np.log(p.mean(0)).mean()
        assert better < btm[d] < better + 0.08, (d, better, btm[d])  # the first tokens of a window cost a little
        assert btm[d] < uniform_mix - 0.5, (d, btm[d], uniform_mix)  # ~log 2 per token above the better expert
        assert uniform_mix == pytest.approx(better + math.log(2), abs=0.01)


def test_btm_posterior_by_hand(world, tmp_path):
    """One window mixing both experts' letters: the ensemble's loss is the hand-computed posterior
    mixture, and the posterior at position 0 is the uniform prior."""
    models, tables = world["models"], world["tables"]
    text = "abbaxyxxab" + "q" * 7  # 17 bytes: exactly one window of 16
    shard = load_shard(make_shard(tmp_path, "mixed", text))
    ids = np.frombuffer(text.encode(), dtype=np.uint8).astype(np.int64)
    p = np.exp(-np.stack([hand_nll(tables["ab"], ids), hand_nll(tables["xy"], ids)]))  # [2, 16]
    w = np.empty_like(p)
    for t in range(SEQ):
        evidence = 0.5 * p[:, :t].prod(1)  # uniform prior times the likelihood of the tokens before t
        w[:, t] = evidence / evidence.sum()
    mix = (w * p).sum(0)
    assert w[:, 0].tolist() == [0.5, 0.5]
    assert btm_losses([models["ab"], models["xy"]], {"mixed": shard}, SEQ, 1, 1)["mixed"] == pytest.approx(
        -np.log(mix).mean(), rel=1e-6
    )

    lp = torch.tensor(np.log(p))[:, None, :]  # [J=2, N=1, S]
    mix_NS, log_w_JNS = btm_mixture(lp)
    torch.testing.assert_close(log_w_JNS[:, 0, 0], torch.full((2,), math.log(0.5), dtype=torch.float64))
    torch.testing.assert_close(log_w_JNS.exp()[:, 0, :], torch.tensor(w))
    assert -mix_NS[0, 0].item() == pytest.approx(-math.log(0.5 * p[0, 0] + 0.5 * p[1, 0]), rel=1e-9)
    torch.testing.assert_close(mix_NS[0], torch.tensor(np.log(mix)))


def test_tfidf_scores_by_hand():
    """Two experts over a 4-token vocabulary: A's data is 0 1 0 1 ..., B's is 2 3 2 3 ... with one 0.
    Terms: unigrams, and bigram (a, b) = V + (a*V + b) mod 2^20; idf = ln((1 + J)/(1 + df)) + 1."""
    V = 4
    a_doc, b_doc = np.array([0, 1] * 4), np.array([2, 3, 2, 3, 0, 2, 3, 2])
    router = TfidfRouter([a_doc, b_doc], V)
    assert router.weight_JT.shape == (2, V + BIGRAM_BUCKETS)

    def counts(doc):
        c = np.zeros(V + BIGRAM_BUCKETS)
        for t in doc:
            c[t] += 1
        for x, y in zip(doc[:-1], doc[1:]):
            c[V + x * V + y] += 1
        return c

    ca, cb = counts(a_doc), counts(b_doc)
    df = (ca > 0).astype(int) + (cb > 0)
    idf = np.log(3 / (1 + df)) + 1
    assert idf[0] == pytest.approx(1.0) and idf[1] == pytest.approx(np.log(1.5) + 1)  # 0 is in both, 1 only in A
    unit = [(c / c.sum()) * idf / np.linalg.norm((c / c.sum()) * idf) for c in (ca, cb)]
    context = np.array([[0, 1, 3, 2]])
    scores = router.scores(context)  # [J, 1, 4]: the context of position t is context[0, :t+1]
    for t in range(4):
        c = counts(context[0, : t + 1]) * idf
        for j in range(2):
            assert scores[j, 0, t].item() == pytest.approx(c @ unit[j], rel=1e-5)
    assert scores[0, 0, 1] > scores[1, 0, 1] and scores[1, 0, 3] > scores[0, 0, 3]


def test_topk_mixture_takes_the_best_scoring_experts_with_equal_weights():
    lp = torch.log(torch.tensor([[[0.5, 0.1]], [[0.2, 0.6]], [[0.3, 0.3]]], dtype=torch.float64))  # [J=3, N=1, S=2]
    scores = torch.tensor([[[3.0, 0.0]], [[1.0, 2.0]], [[1.0, 1.0]]], dtype=torch.float64)
    top1, best = btm_topk_mixture(lp, scores, 1)
    torch.testing.assert_close(top1.exp(), torch.tensor([[0.5, 0.6]], dtype=torch.float64))
    assert best.tolist() == [[0, 1]]
    top2, _ = btm_topk_mixture(lp, scores, 2)  # position 0: expert 0, then 1 (tied with 2: the lower index)
    torch.testing.assert_close(top2.exp(), torch.tensor([[(0.5 + 0.2) / 2, (0.6 + 0.3) / 2]], dtype=torch.float64))


def test_btm_tfidf_rows_pick_each_domains_own_expert(world, ckpts, tmp_path, capsys, monkeypatch):
    """`btx eval --btm` of two btx experts whose DONE.json names their training shard: top-1 by
    tf-idf routes the a/b text to the ab expert and the x/y text to the xy one."""
    monkeypatch.setenv("COLUMNS", "200")
    experts = {}
    for name in ("ab", "xy"):
        job = tmp_path / "experts" / name
        save_ckpt(world["models"][name], job / "final")
        write_done(
            job, {"stage": "train", "train_flops": 1e12, "inputs": {"train_shards": {name: str(world["shards"][name])}}}
        )
        experts[name] = job / "final"
    shards = world["shards"]
    out = tmp_path / "out"
    status, stdout, err = run_cli(
        [
            "--btm",
            experts["ab"],
            experts["xy"],
            "--data",
            f"ab={shards['ab']}",
            "--data",
            f"xy={shards['xy']}",
            "--seq-len",
            SEQ,
            "--batches",
            3,
            "--out",
            out,
        ],
        capsys,
    )
    assert status == 0, err
    rows = {r["name"]: r for r in json.loads((out / "eval.json").read_text())["rows"]}
    assert list(rows) == ["BTM ensemble", "BTM top-1 (tf-idf)", "BTM top-2 (tf-idf)"]
    alone = {name: domain_losses(world["models"][name], world["loaded"], SEQ, 8, 3)[0] for name in ("ab", "xy")}
    for d in ("ab", "xy"):
        assert rows["BTM top-1 (tf-idf)"]["losses"][d] == pytest.approx(alone[d][d], rel=1e-6)  # always its own expert
    assert "ab: ab/final 100%, xy/final 0%; xy: ab/final 0%, xy/final 100%" in rows["BTM top-1 (tf-idf)"]["note"]
    top2 = rows["BTM top-2 (tf-idf)"]  # both experts, equal weights: the uniform mixture
    ids = scored_ids(world["loaded"]["ab"], SEQ, 8, 3)
    p = np.exp(-np.stack([hand_nll(world["tables"]["ab"], ids), hand_nll(world["tables"]["xy"], ids)]))
    assert top2["losses"]["ab"] == pytest.approx(-np.log(p.mean(0)).mean(), rel=1e-5)  # fp32 log-probabilities
    assert rows["BTM top-1 (tf-idf)"]["active_params"] * 2 == top2["active_params"]


def test_standard_errors_and_paired_differences_by_hand():
    # three windows of two tokens with mean NLLs 1, 2, 3 on domain x; 1, 1, 4 on y
    lp = {
        "x": -torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]]),
        "y": -torch.tensor([[1.0, 1.0], [1.0, 1.0], [4.0, 4.0]]),
    }
    row = row_from_logprobs("r", lp, 1e9, 10)
    assert row.losses == {"x": 2.0, "y": 2.0} and row.tokens == {"x": 6, "y": 6}
    assert row.stderr["x"] == pytest.approx(1 / math.sqrt(3)) and row.stderr["y"] == pytest.approx(
        math.sqrt(3) / math.sqrt(3)
    )
    assert row.average_stderr == pytest.approx(math.sqrt(1 / 3 + 1) / 2)
    assert row.window_losses == {"x": [1.0, 2.0, 3.0], "y": [1.0, 1.0, 4.0]}
    # BTX is 0.5 better on every window of x and better by 0, 0, 3 on y
    btx = row_from_logprobs("BTX", {"x": lp["x"] + 0.5, "y": -torch.tensor([[1.0] * 2, [1.0] * 2, [1.0] * 2])})
    diff = paired_differences([row, btx], "BTX")["r"]
    assert diff["losses"] == {"x": pytest.approx(0.5), "y": pytest.approx(1.0)}
    assert diff["average"] == pytest.approx(0.75)
    assert diff["stderr"] == pytest.approx(math.sqrt(0 + (np.std([0, 0, 3], ddof=1) / math.sqrt(3)) ** 2) / 2)
    assert paired_differences([row], "BTX") == {} and row_from_logprobs("one", {"x": lp["x"][:1]}).stderr == {"x": None}
    md = to_markdown([row, btx], ["x", "y"])
    assert "| r | 2.0000 ± 0.5774 | 2.0000 ± 1.0000 | 2.0000 ± 0.5774 |" in md
    assert "| r | +0.7500 ± 0.5000 |" in md


def test_the_loss_against_flops_plot_and_its_text_form(tmp_path, monkeypatch):
    from btx.evaluate.plot import PLOT_NAME, PLOTS_NOTE, text_scatter

    rows = [
        EvalRow("seed", {"x": 2.0}, 0.0),
        EvalRow("cheap", {"x": 1.8}, 1e12, stderr={"x": 0.01}),
        EvalRow("dear", {"x": 1.5}, 1e14),
        EvalRow("unknown", {"x": 1.0}, None),
    ]
    chart = text_scatter(rows, width=21, height=5).splitlines()
    grid = [line.split("|", 1)[1] for line in chart[1:6]]
    assert grid[0] == "-" * 21  # the seed's 0 FLOPs: a reference line at its loss, the top
    assert grid[2][0] == "A" and grid[4][20] == "B"  # log FLOPs left to right; 1.8 is 2/5 of the way down
    legend = [line.strip() for line in chart[8:]]
    assert legend == [
        "A  1.8000 ± 0.0100  1e+12 FLOPs  cheap",
        "B  1.5000  1e+14 FLOPs  dear",
        "-  2.0000  (0 FLOPs beyond the seed)  seed",
    ]  # no FLOPs ("unknown"): no place on the axis
    paths = save(rows, ["x"], tmp_path / "o")
    if importlib.util.find_spec("matplotlib") is not None:
        assert paths["plot"] == tmp_path / "o" / PLOT_NAME and paths["plot"].read_bytes()[:4] == b"\x89PNG"
    else:
        assert "plot" not in paths and not (tmp_path / "o" / PLOT_NAME).exists()
    # without matplotlib: everything else is written, and one line says why the PNG is not
    from rich.console import Console

    monkeypatch.setattr("btx.evaluate.plot._pyplot", lambda: None)
    console = Console(record=True, width=300)
    paths = save(rows, ["x"], tmp_path / "p", console=console)
    assert set(paths) == {"json", "markdown"} and not (tmp_path / "p" / PLOT_NAME).exists()
    assert console.export_text().strip() == PLOTS_NOTE


def test_evaluate_does_not_import_pipeline():
    """btx eval RECIPE lives in btx.run, which imports btx.evaluate; never the other way."""
    import ast
    from pathlib import Path

    import btx.evaluate

    for path in Path(btx.evaluate.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert not {m for m in imported if m and m.startswith(("btx.run", "btx.cli"))}, path.name


# ---------------------------------------------------------------------------------------- the table


def table_lines(markdown: str) -> list[str]:
    """The lines of the first table of a markdown text (the notes below it left out)."""
    return markdown.strip().split("\n\n")[0].splitlines()


def test_markdown_rows_and_average():
    rows = [
        EvalRow("seed", {"code": 2.5, "math": 3.25, "prose": 1.0}, 0.0, 1_000_000),
        EvalRow("BTX", {"code": 1.2345, "math": 2.0, "prose": 0.5}, 3.2e15, 2_500_000),
        EvalRow("BTM ensemble", {"code": 1.5, "math": 1.75, "prose": 0.75}),
    ]
    domains = ["code", "math", "prose"]
    lines = table_lines(to_markdown(rows, domains))
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    assert head == ["model", *domains, "average", "ppl (avg)", "train FLOPs", "active params"]
    assert set(lines[1]) <= set("|-")
    body = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    assert [r[0] for r in body] == ["seed", "BTX", "BTM ensemble"]
    for cells, row in zip(body, rows):
        values = [float(c) for c in cells[1:4]]
        assert float(cells[4]) == pytest.approx(sum(values) / 3, abs=1e-4)
        assert float(cells[4]) == pytest.approx(row.average, abs=5e-5)
        assert float(cells[5]) == pytest.approx(math.exp(row.average), rel=1e-3)
    assert body[0][6:] == ["0", "1.00M"] and body[1][6:] == ["3.2e+15", "2.50M"] and body[2][6:] == ["-", "-"]


def test_save_and_render(tmp_path):
    rows = [EvalRow("a|b", {"x": 1.0, "y": 3.0}, None, 10), EvalRow("[red]c", {"x": 2.0, "y": 2.5})]
    paths = save(rows, ["x", "y"], tmp_path / "o", {"settings": {"seq_len": 8}})
    data = json.loads(paths["json"].read_text())
    assert data["domains"] == ["x", "y"] and data["settings"] == {"seq_len": 8}
    assert [r["name"] for r in data["rows"]] == ["a|b", "[red]c"]
    assert data["rows"][0]["average"] == 2.0 and data["rows"][0]["perplexity"]["y"] == pytest.approx(math.exp(3))
    assert "a\\|b" in paths["markdown"].read_text()  # a pipe in a name does not break the table
    from rich.console import Console

    console = Console(record=True, width=200)
    render(rows, ["x", "y"], console=console)
    text = console.export_text()
    assert "[red]c" in text and "2.2500" in text


def test_default_names(tmp_path):
    assert default_names([tmp_path / "run/experts/code/final", tmp_path / "seed"]) == ["code/final", "seed"]
    a, b = tmp_path / "x/model", tmp_path / "y/model"
    assert default_names([a, b]) == [str(a), str(b)]


# ---------------------------------------------------------------------------------------- the CLI


def save_ckpt(model, path, train_flops=None, done_in_parent=False):
    tok = path.parent / f".{path.name}-tok"
    ByteTokenizer().save(tok)
    save_model(model, None, path, tokenizer_from=tok)
    if train_flops is not None:
        write_done(path.parent if done_in_parent else path, {"stage": "train", "train_flops": train_flops})
    return path


@pytest.fixture(scope="module")
def ckpts(world):
    tmp = world["tmp"]
    return {
        "ab": save_ckpt(world["models"]["ab"], tmp / "ab-expert", train_flops=2e12),
        "xy": save_ckpt(world["models"]["xy"], tmp / "experts" / "xy" / "final", train_flops=3e12, done_in_parent=True),
    }


def run_cli(args, capsys):
    status = main(["eval", *map(str, args)])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_cli_two_checkpoints_and_btm(world, ckpts, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # the terminal table on one line per row
    shards = world["shards"]
    out = tmp_path / "out"
    args = [
        ckpts["ab"],
        ckpts["xy"],
        "--data",
        f"ab={shards['ab']}",
        "--data",
        f"xy={shards['xy'].with_suffix('.bin')}",
        "--seq-len",
        SEQ,
        "--batch-size",
        4,
        "--batches",
        3,
        "--out",
        out,
        "--device",
        "cpu",
        "--btm",
        ckpts["ab"],
        ckpts["xy"],
    ]
    status, stdout, err = run_cli(args, capsys)
    assert status == 0, err
    data = json.loads((out / "eval.json").read_text())
    assert data["domains"] == ["ab", "xy"]
    rows = {r["name"]: r for r in data["rows"]}
    assert list(rows) == ["ab-expert", "xy/final", "BTM ensemble"]
    for name, model in (("ab-expert", "ab"), ("xy/final", "xy")):
        want, _ = domain_losses(world["models"][model], world["loaded"], SEQ, 4, 3)
        assert rows[name]["losses"] == pytest.approx(want, rel=1e-6)
        assert rows[name]["tokens"] == {"ab": 12 * SEQ, "xy": 12 * SEQ}
        assert rows[name]["active_params"] == world["models"][model].cfg.param_counts()["active"]
    assert rows["ab-expert"]["train_flops"] == 2e12 and rows["xy/final"]["train_flops"] == 3e12
    btm = btm_losses([world["models"]["ab"], world["models"]["xy"]], world["loaded"], SEQ, 4, 3)
    assert rows["BTM ensemble"]["losses"] == pytest.approx(btm, rel=1e-6)
    assert rows["BTM ensemble"]["train_flops"] == 5e12
    assert rows["BTM ensemble"]["active_params"] == 2 * rows["ab-expert"]["active_params"]
    assert data["settings"]["seq_len"] == SEQ and data["settings"]["batches"] == 3
    md = table_lines((out / "eval.md").read_text())
    assert [line.split("|")[1].strip() for line in md[2:]] == ["ab-expert", "xy/final", "BTM ensemble"]
    done = json.loads((out / "DONE.json").read_text())
    assert done["stage"] == "eval" and done["rows"] == list(rows)
    assert "BTM ensemble" in stdout and "xy/final" in stdout

    # again into the same --out (an earlier eval output is replaced), with --names and no BTM; a
    # training job's directory stands for its final/ export
    status, _, err = run_cli(
        [
            ckpts["xy"].parent,
            "--data",
            f"xy={shards['xy']}",
            "--seq-len",
            8,
            "--batches",
            1,
            "--names",
            "only-xy",
            "--out",
            out,
        ],
        capsys,
    )
    assert status == 0, err
    data = json.loads((out / "eval.json").read_text())
    assert [r["name"] for r in data["rows"]] == ["only-xy"] and data["domains"] == ["xy"]
    assert data["rows"][0]["tokens"] == {"xy": 8 * 8}
    assert data["rows"][0]["train_flops"] == 3e12 and data["rows"][0]["note"] == str(ckpts["xy"])


def test_cli_transformers_checkpoints(world, tmp_path, capsys):
    """Checkpoints written by transformers itself (a Llama and a Mixtral): the rows equal the loss
    transformers computes on the same windows."""
    transformers = pytest.importorskip("transformers")
    common = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    torch.manual_seed(0)
    models = {
        "llama": transformers.LlamaForCausalLM(transformers.LlamaConfig(**common)).eval(),
        "mixtral": transformers.MixtralForCausalLM(
            transformers.MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2)
        ).eval(),
    }
    for name, model in models.items():
        model.save_pretrained(tmp_path / name)
        ByteTokenizer().save(tmp_path / name)  # a tokenizer next to the weights, as on the Hub
    status, _, err = run_cli(
        [
            tmp_path / "llama",
            tmp_path / "mixtral",
            "--data",
            f"ab={world['shards']['ab']}",
            "--seq-len",
            32,
            "--batch-size",
            2,
            "--batches",
            2,
            "--out",
            tmp_path / "out",
        ],
        capsys,
    )
    assert status == 0, err
    rows = {r["name"]: r for r in json.loads((tmp_path / "out" / "eval.json").read_text())["rows"]}
    ids = torch.from_numpy(scored_ids(world["loaded"]["ab"], 32, 2, 2))
    windows = torch.stack([ids[w * 32 : w * 32 + 33] for w in range(4)])
    for name, model in models.items():
        with torch.no_grad():
            logits = model(windows[:, :-1]).logits.float()
        want = torch.nn.functional.cross_entropy(logits.reshape(-1, V), windows[:, 1:].reshape(-1)).item()
        assert rows[name]["losses"]["ab"] == pytest.approx(want, rel=1e-5), name
        assert rows[name]["train_flops"] is None
    assert rows["mixtral"]["active_params"] < sum(p.numel() for p in models["mixtral"].parameters())


def one_line_error(capsys, args):
    status, _, err = run_cli(args, capsys)
    assert status == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("btx: error:"), err
    return lines[0]


def test_cli_bad_inputs(world, ckpts, tmp_path, capsys):
    shards = world["shards"]
    ab = f"ab={shards['ab']}"
    out = tmp_path / "out"
    common = ["--seq-len", SEQ, "--batches", 1, "--out", out]
    assert "nope: checkpoint not found" in one_line_error(capsys, [tmp_path / "nope", "--data", ab, *common])
    assert "DOMAIN=SHARD" in one_line_error(capsys, [ckpts["ab"], "--data", str(shards["ab"]), *common])
    missing = f"ab={tmp_path / 'missing.json'}"
    assert "missing.json: not found" in one_line_error(capsys, [ckpts["ab"], "--data", missing, *common])
    assert "--data DOMAIN=SHARD" in one_line_error(capsys, [ckpts["ab"], *common])
    # the model's vocabulary is smaller than the shard's tokenizer's
    small, _ = bigram_model(skewed("ab"), vocab=128)
    save_model(small, None, tmp_path / "small")
    message = one_line_error(capsys, [tmp_path / "small", "--data", ab, *common])
    assert "vocabulary of 264" in message and "vocab_size 128" in message and "small" in message
    # a shard made with another tokenizer (same vocabulary, another identity)
    other = tmp_path / "other-tok" / "tokenizer.json"
    other.parent.mkdir()
    other.write_text(ByteTokenizer().to_hf_json())
    foreign = make_shard(tmp_path, "foreign", "abab" * 20, tokenizer=other)
    message = one_line_error(capsys, [ckpts["ab"], "--data", f"ab={foreign}", *common])
    assert "foreign" in message and "tokenizer" in message
    # a shard too short for one window
    short = make_shard(tmp_path, "short", "abba" * 3)
    message = one_line_error(capsys, [ckpts["ab"], "--data", f"s={short}", *common])
    assert "short/train.bin: 12 tokens, fewer than seq_len + 1 = 17" in message
    # flags
    assert "--seq-len 65" in one_line_error(capsys, [ckpts["ab"], "--data", ab, "--seq-len", 65, "--out", out])
    assert "--names" in one_line_error(capsys, [ckpts["ab"], ckpts["xy"], "--data", ab, "--names", "one", *common])
    assert "at least two" in one_line_error(capsys, [ckpts["ab"], "--data", ab, *common, "--btm", ckpts["ab"]])
    assert "--batches 0" in one_line_error(capsys, [ckpts["ab"], "--data", ab, "--batches", 0, "--out", out])
    message = one_line_error(capsys, [ckpts["ab"], "eval.batches=2", "--data", ab, "--out", out])
    assert "need an experiment RECIPE" in message
    assert not out.exists()  # nothing written by any of them
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep me")
    message = one_line_error(capsys, [ckpts["ab"], "--data", ab, "--seq-len", SEQ, "--out", tmp_path / "precious"])
    assert "not an earlier btx eval output" in message
    assert (tmp_path / "precious" / "notes.txt").read_text() == "keep me"


def test_cli_recipe(world, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    """`btx eval RECIPE`: every model of the run that exists, into <run_dir>/eval/ with DONE.json."""
    run = tmp_path / "run"
    for d in ("ab", "xy"):
        docs = [tmp_path / f"{d}{i}.txt" for i in range(4)]
        for i, doc in enumerate(docs):
            doc.write_text(markov_text(d, 300, 10 + i))
        (tmp_path / f"{d}.yaml").write_text(f"data:\n  sources: [{d}0.txt]\n")
        prepare_domain(
            d, [str(p) for p in docs], "byte", run / "data" / d, val_fraction=0.5, append_eos=False, progress=False
        )
    recipe = tmp_path / "btx.yaml"
    recipe.write_text(
        f"experiment: ev\nrun_dir: {run}\ntokenizer: byte\n"
        "model: {vocab_size: 264, dim: 16, n_layers: 1, n_heads: 2, n_kv_heads: 2, ffn_dim: 8, max_seq_len: 64}\n"
        "domains: {ab: ab.yaml, xy: xy.yaml}\ntrain: {seq_len: 16}\neval: {batches: 3, batch_size: 2}\n"
    )
    assert "no finished model" in one_line_error(capsys, [recipe])
    save_ckpt(world["models"]["ab"], run / "experts" / "ab" / "final", train_flops=1e12, done_in_parent=True)
    save_ckpt(world["models"]["xy"], run / "experts" / "xy" / "final", train_flops=1e12, done_in_parent=True)
    save_model(Transformer(ModelConfig(vocab_size=V, dim=16, n_layers=1, n_heads=2, n_kv_heads=2, ffn_dim=8,
                                          max_seq_len=64)), None, run / "seed")  # fmt: skip

    status, stdout, err = run_cli([recipe, "eval.batches=2", "--batch-size", 1], capsys)
    assert status == 0, err
    data = json.loads((run / "eval" / "eval.json").read_text())
    names = [r["name"] for r in data["rows"]]
    assert names == ["seed", "expert:ab", "expert:xy", "BTM ensemble", "BTM top-1 (tf-idf)", "BTM top-2 (tf-idf)"]
    rows = {r["name"]: r for r in data["rows"]}
    assert rows["expert:ab"]["tokens"] == {"ab": 2 * 16, "xy": 2 * 16}  # eval.batches=2 of --batch-size 1
    assert rows["expert:ab"]["losses"]["ab"] < 1.0 < rows["expert:ab"]["losses"]["xy"]
    assert rows["BTM ensemble"]["train_flops"] == 2e12
    done = json.loads((run / "eval" / "DONE.json").read_text())
    assert done["stage"] == "eval" and set(done["rows"]) == set(names)
    assert len(table_lines((run / "eval" / "eval.md").read_text())) == 2 + len(names)
    assert "BTM ensemble" in stdout
    assert "--btm is for checkpoints" in one_line_error(capsys, [recipe, "--btm", run / "seed", run / "seed"])
    # progress per model and domain; off a terminal one plain line each, with the ETA of the whole
    assert "eval expert:ab · xy: 2 batches in" in err and "(8/12, eta" in err

    # --device and --dtype are the recipe's eval.device and eval.dtype: bf16 weights on the CPU
    status, _, err = run_cli(
        [recipe, "eval.batches=2", "--batch-size", 1, "--device", "cpu", "--dtype", "bfloat16"], capsys
    )
    assert status == 0, err
    low = json.loads((run / "eval" / "eval.json").read_text())
    assert (low["settings"]["device"], low["settings"]["dtype"]) == ("cpu", "bfloat16")
    assert "device" not in data["settings"]  # the default run's eval.json is what it was
    for row in low["rows"]:
        fp32 = rows[row["name"]]["losses"]
        assert row["losses"] != fp32 and row["losses"] == pytest.approx(fp32, rel=0.05), row["name"]
    assert "eval.device: expected cpu, cuda or cuda:N" in one_line_error(capsys, [recipe, "--device", "tpu"])


def test_eval_is_registered():
    from btx.cli import COMMANDS
    from btx.evaluate.checkpoints import parse_data_specs

    assert "eval" in COMMANDS
    assert COMMANDS["eval"].help.startswith("per-domain validation loss/perplexity")
    with pytest.raises(BtxError, match="DOMAIN=SHARD"):
        parse_data_specs(["nodomain"])
