"""Document masking (train.document_mask): inside a window, each document is computed as if it
were alone (attention and positions per document), in the dense model and the MoE; off, the
forward is the plain causal one, bit for bit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from btx.data.sampling import document_ids
from btx.model.config import ModelConfig
from btx.model.transformer import Transformer

EOS = 7


def _model(moe: bool, **extra) -> Transformer:
    cfg = ModelConfig(
        vocab_size=32,
        dim=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        ffn_dim=48,
        max_seq_len=64,
        **({"n_experts": 4, "top_k": 2} if moe else {}),
        **extra,
    )
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.init_weights(std=0.2)
    return model.eval()


def test_document_ids_count_the_eos_before_each_token():
    tokens = torch.tensor([[3, 4, EOS, 5, EOS, EOS, 6], [1, 2, 3, 4, 5, 6, 7]])
    assert document_ids(tokens, EOS).tolist() == [[0, 0, 0, 1, 1, 2, 3], [0, 0, 0, 0, 0, 0, 0]]


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_each_document_of_a_masked_window_computes_as_if_alone(moe):
    model = _model(moe)
    generator = torch.Generator().manual_seed(1)
    first = torch.cat([torch.randint(8, 32, (9,), generator=generator), torch.tensor([EOS])])
    second = torch.cat([torch.randint(8, 32, (12,), generator=generator), torch.tensor([EOS])])
    third = torch.randint(8, 32, (5,), generator=generator)  # cut by the window's end
    window = torch.cat([first, second, third])[None]
    with torch.no_grad():
        masked = model(window, document_ids(window, EOS)).logits[0]
        alone = [model(doc[None]).logits[0] for doc in (first, second, third)]
        unmasked = model(window).logits[0]
    torch.testing.assert_close(masked, torch.cat(alone), rtol=1e-5, atol=1e-5)
    # The second document's per-token losses equal those of the document alone.
    targets = window[0, 1:]
    per_token = F.cross_entropy(masked[:-1], targets, reduction="none")
    start, end = len(first), len(first) + len(second)
    alone_second = F.cross_entropy(alone[1][:-1], second[1:], reduction="none")
    torch.testing.assert_close(per_token[start : end - 1], alone_second, rtol=1e-5, atol=1e-6)
    # Without the mask the later documents see the earlier ones: the numbers differ.
    assert not torch.allclose(unmasked[len(first) :], torch.cat(alone[1:]), atol=1e-3)
    torch.testing.assert_close(unmasked[: len(first)], alone[0], rtol=1e-5, atol=1e-5)


def test_the_window_loss_is_its_documents_losses():
    model = _model(False)
    docs = [torch.tensor([9, 10, 11, EOS]), torch.tensor([12, 13, 14, 15, 16, EOS]), torch.tensor([17, 18, 19, 20])]
    window = torch.cat(docs)[None]
    with torch.no_grad():
        logits = model(window, document_ids(window, EOS)).logits[0]
        # Within-document predictions only: the token after an EOS starts a document and has no context.
        within = document_ids(window, EOS)[0, 1:] == document_ids(window, EOS)[0, :-1]
        window_loss = F.cross_entropy(logits[:-1][within], window[0, 1:][within], reduction="sum")
        separate = sum(
            F.cross_entropy(model(d[None]).logits[0, :-1], d[1:], reduction="sum") for d in docs if len(d) > 1
        )
    torch.testing.assert_close(window_loss, separate, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_off_is_the_plain_forward_bit_for_bit(moe):
    model = _model(moe)
    tokens = torch.randint(0, 32, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        plain = model(tokens).logits
        explicit_none = model(tokens, None).logits
        one_document = model(tokens, torch.zeros_like(tokens)).logits  # the masked path, one document a row
    assert torch.equal(plain, explicit_none)
    # The masked path with one document per row agrees with the fast path (the reference agrees).
    torch.testing.assert_close(one_document, plain, rtol=1e-5, atol=1e-5)


def test_sliding_window_and_document_mask_combine():
    model = _model(False, sliding_window=4)
    doc_a, doc_b = torch.tensor([9, 10, 11, 12, 13, 14, EOS]), torch.tensor([15, 16, 17, 18, 19, 20, 21, 22])
    window = torch.cat([doc_a, doc_b])[None]
    with torch.no_grad():
        masked = model(window, document_ids(window, EOS)).logits[0]
        alone = torch.cat([model(doc_a[None]).logits[0], model(doc_b[None]).logits[0]])
    torch.testing.assert_close(masked, alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("on", [False, True], ids=["off", "on"])
def test_the_training_loop_passes_document_ids_when_on(tmp_path, monkeypatch, on):
    """The seed job of the tiny fixture (byte tokenizer, EOS 257): with train.document_mask every
    training and validation forward gets its window's document ids; off, none does."""
    from rich.console import Console

    from btx.data.tokenizer import ByteTokenizer
    from btx.recipe.load import load_experiment
    from btx.run.prepare import prepare_experiment
    from btx.train.job import seed_job
    from btx.train.loop import run_loop

    fixture = Path(__file__).parent / "fixtures" / "tiny" / "btx.yaml"
    overrides = [f"run_dir={tmp_path / 'run'}", "seed.train.steps=2", "train.eval_every=1", "train.seq_len=64"]
    exp = load_experiment(fixture, [*overrides, f"train.document_mask={str(on).lower()}"])
    prepare_experiment(exp, progress=False)
    calls = []
    forward = Transformer.forward

    def spy(self, tokens_BS, document_ids_BS=None):
        calls.append((tokens_BS.clone(), None if document_ids_BS is None else document_ids_BS.clone()))
        return forward(self, tokens_BS, document_ids_BS)

    monkeypatch.setattr(Transformer, "forward", spy)
    run_loop(seed_job(exp), console=Console(stderr=True, quiet=True))
    assert len(calls) >= 4  # 2 training steps, 2 validations
    eos = ByteTokenizer.eos_id
    for tokens, ids in calls:
        if on:
            assert ids is not None and torch.equal(ids, document_ids(tokens, eos))
        else:
            assert ids is None
    if on:  # the windows do hold several documents, so the mask changes something
        assert any(int(ids.max()) > 0 for _, ids in calls)


def test_eval_scores_honour_the_mask():
    from btx.evaluate.scores import token_logprobs

    model = _model(True)
    doc_a, doc_b = torch.tensor([9, 10, 11, 12, EOS]), torch.tensor([13, 14, 15, 16, 17, 18])
    window = torch.cat([doc_a, doc_b])[None]
    inputs, targets = window[:, :-1], window[:, 1:]
    masked = token_logprobs(model, inputs, targets, document_eos=EOS)[0]
    plain = token_logprobs(model, inputs, targets)[0]
    alone = token_logprobs(model, doc_b[None, :-1], doc_b[None, 1:])[0]
    torch.testing.assert_close(masked[len(doc_a) :], alone, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(plain[len(doc_a) :], alone, atol=1e-4)
