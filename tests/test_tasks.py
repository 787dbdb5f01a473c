"""Downstream tasks (eval.tasks) through lm-evaluation-harness: btx's lm-eval models, the BTM
ensembles as lm-eval models, the task table, reuse, and the one-line errors.

The models are test_evaluate's hand-built "bigram" transformers (the next token depends only on
the last one, through a table we choose), so every log-probability has a closed form: expert "ab"
alternates a and b, expert "xy" alternates x and y, and each is uniform on the other's letters.
The tasks are tests/fixtures/tasks/ (local: dataset_path json, a few documents each).
"""

from __future__ import annotations

import io
import json
import math
import shutil
import sys
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from rich.console import Console

pytest.importorskip("lm_eval")  # the eval extra, in the test extra too

from lm_eval.api.instance import Instance  # noqa: E402
from test_evaluate import bigram_model, markov_text, one_line_error, save_ckpt, skewed  # noqa: E402

from btx.cli import main  # noqa: E402
from btx.data.prepare import prepare_domain  # noqa: E402
from btx.errors import BtxError  # noqa: E402
from btx.evaluate.btm import TfidfRouter, btm_mixture, btm_topk_mixture  # noqa: E402
from btx.evaluate.lm import ScorerLM, hf_tokenizer  # noqa: E402
from btx.evaluate.next_token import ModelScorer, PosteriorScorer, TopKScorer  # noqa: E402
from btx.evaluate.scores import token_logprobs  # noqa: E402
from btx.evaluate.task_report import TaskReport, TaskRow, group_averages  # noqa: E402
from btx.evaluate.tasks import TaskSpec, TaskSuite, require_lm_eval, task_record  # noqa: E402
from btx.io.checkpoint import load_model  # noqa: E402
from btx.model.config import ModelConfig  # noqa: E402
from btx.model.transformer import Transformer  # noqa: E402
from btx.recipe.load import load_experiment  # noqa: E402
from btx.run.evaluation import evaluate  # noqa: E402
from btx.run.stage import Task  # noqa: E402

TASKS = Path(__file__).parent / "fixtures" / "tasks"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tasks")
    ab, ab_table = bigram_model(skewed("ab"))
    xy, xy_table = bigram_model(skewed("xy"))
    path = save_ckpt(ab, tmp / "ab")
    return {"tmp": tmp, "models": [ab, xy], "tables": [ab_table, xy_table], "tokenizer": hf_tokenizer(path)}


def request(context: str, continuation: str) -> Instance:
    return Instance("loglikelihood", {}, (context, continuation), 0)


def softmax_logprob(table: np.ndarray, prev: int, nxt: int) -> float:
    row = table[prev]
    top = row.max()
    return float(row[nxt] - top - math.log(np.exp(row - top).sum()))


# -- the ensembles' loglikelihood --------------------------------------------------------------


def test_posterior_loglikelihood_is_the_log_of_the_mixture_by_hand(world):
    """log p(continuation | context) = Σ_t log Σ_j w_j(t) p_j(x_t | x_<t), with w_j(t) ∝ Π_{s<t}
    p_j(x_s | x_<s) over the sequence's earlier tokens (the first is never predicted)."""
    lm = ScorerLM(PosteriorScorer(world["models"]), world["tokenizer"], batch_size=2)
    cases = [("abab", "ab"), ("xyx", "yxy"), ("ab", "x"), ("a", "bab")]
    got = lm.loglikelihood([request(c, x) for c, x in cases])
    for (context, continuation), (logprob, _) in zip(cases, got):
        ids = [ord(ch) for ch in context + continuation]
        evidence = np.zeros(2)
        total = 0.0
        for t in range(len(ids) - 1):
            lp = np.array([softmax_logprob(tab, ids[t], ids[t + 1]) for tab in world["tables"]])
            w = np.exp(evidence - evidence.max())
            w /= w.sum()
            if t + 1 >= len(context):
                total += math.log(float((w * np.exp(lp)).sum()))
            evidence += lp
        assert logprob == pytest.approx(total, abs=1e-4), (context, continuation)
    # the ab expert continues "abab" with "ab", and the ensemble follows it
    assert got[0][1] and got[1][1] and not got[2][1]


def test_ensemble_loglikelihood_equals_btx_ensemble_code_on_the_same_tokens(world, tmp_path):
    """The lm-eval models score a continuation with btm_mixture / btm_topk_mixture themselves."""
    models = world["models"]
    docs = [np.frombuffer(markov_text(d, 400, 3).encode(), dtype=np.uint8).astype(np.int64) for d in ("ab", "xy")]
    router = TfidfRouter(docs, 264)
    context, continuation = "xyxyab", "aba"
    ids = torch.tensor([[ord(c) for c in context + continuation]])
    lp_JNS = torch.stack([token_logprobs(m, ids[:, :-1], ids[:, 1:]) for m in models])
    n = len(continuation)
    posterior = float(btm_mixture(lp_JNS)[0][0, -n:].sum())
    scorer = PosteriorScorer(models)
    assert ScorerLM(scorer, world["tokenizer"]).loglikelihood([request(context, continuation)])[0][0] == pytest.approx(
        posterior, abs=1e-9
    )
    for k in (1, 2):
        mixed, _ = btm_topk_mixture(lp_JNS, router.scores(ids[:, :-1].numpy()), k)
        lm = ScorerLM(TopKScorer(models, router, k), world["tokenizer"])
        assert lm.loglikelihood([request(context, continuation)])[0][0] == pytest.approx(
            float(mixed[0, -n:].sum()), abs=1e-9
        )
    # the whole next-token distribution agrees with the token log-probabilities where both are known
    inputs, targets = ids[:, :-1], ids[:, 1:]
    positions = torch.arange(inputs.shape[1]).unsqueeze(0)
    for s in (scorer, TopKScorer(models, router, 1), TopKScorer(models, router, 2), ModelScorer(models[0])):
        lp, dist = s(inputs, targets, positions)
        assert torch.allclose(dist.double().gather(-1, targets.unsqueeze(-1)).squeeze(-1), lp.double(), atol=1e-5)
        assert torch.allclose(dist.double().exp().sum(-1), torch.ones(1, inputs.shape[1], dtype=torch.float64))


def test_greedy_generation_follows_the_distribution(world):
    gen = {"until": ["\n"], "max_gen_toks": 4, "do_sample": False}
    requests = [Instance("generate_until", {}, (c, gen), i) for i, c in enumerate(["abab", "xyx", "bab"])]
    assert ScorerLM(ModelScorer(world["models"][0]), world["tokenizer"]).generate_until(requests)[0] == "abab"
    ensemble = ScorerLM(PosteriorScorer(world["models"]), world["tokenizer"], batch_size=2)
    assert ensemble.generate_until(requests) == ["abab", "yxyx", "abab"]
    with pytest.raises(BtxError, match="greedily only"):
        ensemble.generate_until([Instance("generate_until", {}, ("ab", {**gen, "do_sample": True}), 0)])
    with pytest.raises(BtxError, match="max_gen_toks lower"):
        ensemble.generate_until([Instance("generate_until", {}, ("ab", {**gen, "max_gen_toks": 64}), 0)])


def test_rolling_loglikelihood_sums_the_tokens_after_the_prefix(world):
    model = world["models"][0]
    lm = ScorerLM(ModelScorer(model), world["tokenizer"])
    text = "abba"
    (got,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    ids = [world["tokenizer"].bos_token_id, *map(ord, text)]
    want = sum(softmax_logprob(world["tables"][0], a, b) for a, b in zip(ids, ids[1:]))
    assert got == pytest.approx(want, abs=1e-4)


# -- the task table ----------------------------------------------------------------------------


def test_task_records_and_paper_groups():
    results = {
        "results": {"gsm8k": {"exact_match,strict-match": 0.25, "exact_match_stderr,strict-match": 0.05}},
        "higher_is_better": {"gsm8k": {"exact_match": True}},
        "n-samples": {"gsm8k": {"original": 100, "effective": 40}},
        "n-shot": {"gsm8k": 8},
        "versions": {"gsm8k": 3.0},
    }
    record = task_record(results, "gsm8k")
    assert (record["metric"], record["value"], record["stderr"], record["n_samples"]) == (
        "exact_match,strict-match",
        0.25,
        0.05,
        40,
    )

    def rec(v):
        return {"metric": "acc,none", "value": v, "stderr": 0.01}

    row = TaskRow("BTX", 1e15, {"gsm8k": rec(0.2), "arc_easy": rec(0.6), "piqa": rec(0.8), "mine": rec(0.9)})
    groups = group_averages(row, ["gsm8k", "arc_easy", "piqa", "mine"])
    assert groups == pytest.approx({"Math": 0.2, "Reasoning": 0.7, "average": 0.45})
    local = group_averages(TaskRow("x", None, {"mine": rec(0.9), "other": rec(0.5)}), ["mine", "other"])
    assert local == pytest.approx({"average": 0.7})
    report = TaskReport(["gsm8k", "arc_easy", "piqa", "mine"], [row], {"lm_eval": "0.4"})
    markdown = report.to_markdown()
    assert "| BTX | 20.0 ± 1.0 | 60.0 ± 1.0 | 80.0 ± 1.0 | 90.0 ± 1.0 | 20.0 | 70.0 | 45.0 | 1e+15 |" in markdown


# -- a run: every model, the ensembles, reuse, errors --------------------------------------------


def make_run(tmp_path, world) -> Path:
    run = tmp_path / "run"
    for d in ("ab", "xy"):
        docs = [tmp_path / f"{d}{i}.txt" for i in range(4)]
        for i, doc in enumerate(docs):
            doc.write_text(markov_text(d, 300, 10 + i))
        (tmp_path / f"{d}.yaml").write_text(f"data:\n  sources: [{d}0.txt]\n")
        prepare_domain(
            d, [str(p) for p in docs], "byte", run / "data" / d, val_fraction=0.5, append_eos=False, progress=False
        )
    for d, model in zip(("ab", "xy"), world["models"]):
        save_ckpt(model, run / "experts" / d / "final", train_flops=1e12, done_in_parent=True)
    seed = Transformer(
        ModelConfig(vocab_size=264, dim=16, n_layers=1, n_heads=2, n_kv_heads=2, ffn_dim=8, max_seq_len=64)
    )
    save_ckpt(seed, run / "seed")
    recipe = tmp_path / "btx.yaml"
    recipe.write_text(
        f"experiment: ev\nrun_dir: {run}\ntokenizer: byte\n"
        "model: {vocab_size: 264, dim: 16, n_layers: 1, n_heads: 2, n_kv_heads: 2, ffn_dim: 8, max_seq_len: 64}\n"
        "domains: {ab: ab.yaml, xy: xy.yaml}\ntrain: {seq_len: 16}\neval: {batches: 2, batch_size: 2}\n"
    )
    return recipe


def test_btx_eval_runs_the_tasks_on_every_model_and_ensemble_then_reuses_them(world, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    recipe = make_run(tmp_path, world)
    run = tmp_path / "run"
    args = ["eval", str(recipe), "--tasks", "letters_mc,letters_gen", "--include-path", str(TASKS)]
    assert main(args) == 0, capsys.readouterr().err
    data = json.loads((run / "eval" / "tasks.json").read_text())
    rows = {r["name"]: r for r in data["rows"]}
    assert list(rows) == ["seed", "expert:ab", "expert:xy", "BTM ensemble", "BTM top-1 (tf-idf)", "BTM top-2 (tf-idf)"]
    for name in ("expert:ab", "expert:xy"):  # right on its own letters; on the others' every choice ties
        assert rows[name]["results"]["letters_gen"]["value"] == 0.5
    for name in ("BTM ensemble", "BTM top-1 (tf-idf)"):  # the right expert for each document
        assert rows[name]["results"]["letters_mc"]["value"] == 1.0
        assert rows[name]["results"]["letters_gen"]["value"] == 1.0
    assert rows["BTM ensemble"]["results"]["letters_mc"]["n_samples"] == 6
    assert rows["BTM ensemble"]["groups"]["average"] == 1.0
    assert sum(line.startswith("| ") for line in (run / "eval" / "tasks.md").read_text().splitlines()) == 1 + 6
    eval_md = (run / "eval" / "eval.md").read_text()
    assert "tasks: average (%)" in eval_md and "| 100.0 |" in eval_md
    done = json.loads((run / "eval" / "DONE.json").read_text())
    assert {"tasks.json", "tasks.md"} <= set(done["outputs"])
    assert len(list((run / "eval-tasks").glob("*.json"))) == 12
    before = (run / "eval" / "tasks.json").read_text()

    def no_work(*args, **kwargs):
        raise AssertionError("a stored result was scored again")

    monkeypatch.setattr(TaskSuite, "run", no_work)
    monkeypatch.setattr(TaskSuite, "load", no_work)  # not even the datasets
    capsys.readouterr()
    assert main(args) == 0
    assert "0 result(s) scored, 12 reused" in capsys.readouterr().out
    after = json.loads((run / "eval" / "tasks.json").read_text())
    assert after["rows"] == json.loads(before)["rows"]

    # btx run's eval stage writes the same outputs (here from the stored results)
    exp = load_experiment(recipe, ["eval.tasks=[letters_mc, letters_gen]", f"eval.include_path={TASKS}"])
    shutil.rmtree(run / "eval")
    evaluate(SimpleNamespace(exp=exp, console=Console(file=io.StringIO())), Task(key="k"))
    assert json.loads((run / "eval" / "tasks.json").read_text())["rows"] == after["rows"]
    assert "tasks: average (%)" in (run / "eval" / "eval.md").read_text()
    assert {"tasks.json", "tasks.md"} <= set(json.loads((run / "eval" / "DONE.json").read_text())["outputs"])


def test_bad_tasks_are_one_line_and_write_nothing(world, tmp_path, capsys, monkeypatch):
    recipe = make_run(tmp_path, world)
    eval_dir = tmp_path / "run" / "eval"
    inc = ["--include-path", str(TASKS)]
    import lm_eval.tasks

    # lm-eval's index of its ~15,000 built-in tasks takes half a minute to build: left out here
    monkeypatch.setattr(lm_eval.tasks, "TaskManager", partial(lm_eval.tasks.TaskManager, include_defaults=False))
    unknown = one_line_error(capsys, [recipe, "--tasks", "letters_mcq", *inc])
    assert "not an lm-eval task" in unknown and "did you mean letters_mc" in unknown
    assert "no such directory" in one_line_error(capsys, [recipe, "--tasks", "letters_mc", "--include-path", "nope"])
    import datasets.config
    import huggingface_hub.constants

    # offline as this machine is, without five retries: the libraries read these once, at import
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    assert "Hugging Face Hub" in one_line_error(capsys, [recipe, "--tasks", "letters_hub", *inc])
    assert "listed twice" in one_line_error(capsys, [recipe, "eval.tasks=[letters_mc, letters_mc]"])
    assert "eval.tasks[0].limit" in one_line_error(capsys, [recipe, "eval.tasks=[{task: letters_mc, limit: 0}]"])
    assert not eval_dir.exists() and not (tmp_path / "run" / "eval-tasks").exists()
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(BtxError, match=r"pip install 'btx\[eval\]'"):
        require_lm_eval()


def test_lm_evals_own_hf_model_agrees_on_an_exported_moe(tmp_path):
    """lm-eval's `hf` model (transformers' Mixtral) and btx's lm-eval model on the same checkpoint:
    the same loglikelihoods, the same accuracy on the same task."""
    from lm_eval.models.huggingface import HFLM

    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=264, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, max_seq_len=64, n_experts=4, top_k=2
    )
    moe = Transformer(cfg)
    moe.init_weights(std=0.2)
    path = save_ckpt(moe, tmp_path / "moe")
    suite = TaskSuite([TaskSpec("letters_mc"), TaskSpec("letters_gen")], TASKS)
    ours = ScorerLM(ModelScorer(load_model(path)), hf_tokenizer(path), batch_size=3)
    # batch_size 1: transformers' Mixtral cannot generate a padded batch while output_router_logits
    # is true (its balancing loss meets the attention mask's shape)
    theirs = HFLM(pretrained=str(path), device="cpu", dtype="float32", batch_size=1)
    cases = [request("abab", "a"), request("xyx", "yx"), request("", "abc")]
    for (a, ga), (b, gb) in zip(ours.loglikelihood(cases), theirs.loglikelihood(cases)):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb
    gen = {"until": ["\n"], "max_gen_toks": 6, "do_sample": False}
    prompts = [Instance("generate_until", {}, (c, gen), i) for i, c in enumerate(["abab", "xyx", "b"])]
    assert ours.generate_until(prompts) == theirs.generate_until(prompts)
    for spec in suite.specs:
        mine, hf = suite.run(ours, spec), suite.run(theirs, spec)
        assert mine["value"] == hf["value"] and mine["metric"] == hf["metric"], spec.name
