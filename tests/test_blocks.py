"""btx.train.blocks: activation checkpointing and regional torch.compile, against the eager model.

Model-level checks on tiny fp32 models (dense and MoE): recomputation gives the gradients of the
plain model, the transforms leave parameter names alone, and compiled blocks train like eager ones.
The loop-level checks (both engines, the finetune) are in tests/test_train.py and
tests/test_finetune.py. Compiling is slow on a CPU, so the compile test is one small model per kind.
"""

from __future__ import annotations

import copy
import dataclasses
from types import SimpleNamespace

import pytest
import torch

from btx.errors import BtxError
from btx.model.config import ModelConfig
from btx.model.transformer import Transformer
from btx.train.blocks import (
    apply_block_settings,
    checkpoint_blocks,
    compile_blocks,
    cross_entropy_for,
    one_hot_cross_entropy,
    token_cross_entropy,
)
from btx.train.engines.base import make_optimizer
from btx.train.loop import loss_terms

DENSE = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, max_seq_len=64)
MOE = dataclasses.replace(DENSE, n_experts=4, top_k=2)
SAMPLED = dataclasses.replace(DENSE, n_experts=4, top_k=1, router_mode="sample_top1", first_layer_soft=False)
KINDS = {"dense": DENSE, "moe": MOE, "moe-sample_top1": SAMPLED}


def model_of(cfg: ModelConfig) -> Transformer:
    model = Transformer(cfg)
    model.init_weights(generator=torch.Generator().manual_seed(0))
    return model


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, DENSE.vocab_size, (2, 17), generator=torch.Generator().manual_seed(step))
    return tokens[:, :-1], tokens[:, 1:]


def loss_and_grads(model: Transformer, seed: int = 0) -> tuple[float, dict[str, torch.Tensor]]:
    inputs, targets = batch(0)
    torch.manual_seed(seed)  # sample_top1 draws Gumbel noise: recomputation must draw the same
    model.zero_grad(set_to_none=True)
    loss = loss_terms(model(inputs), targets, 0.01, 0.001)[0]
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("mode", ["full", "selective"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_recomputation_gives_the_same_gradients(kind, mode):
    eager = model_of(KINDS[kind])
    recomputing = copy.deepcopy(eager)
    checkpoint_blocks(recomputing, mode)
    loss, grads = loss_and_grads(eager)
    loss_ac, grads_ac = loss_and_grads(recomputing)
    assert loss_ac == loss
    assert grads.keys() == grads_ac.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ac[name], grad, rtol=1e-6, atol=1e-7, msg=name)
        assert grad.abs().sum() > 0, name  # every parameter takes part (nothing trivially equal)


def test_checkpointing_keeps_fewer_tensors_for_the_backward():
    """What full and selective keep for the backward, counted by saved-tensor hooks: less than
    none, and full less than selective (so the checkpoint is really in the graph)."""

    def saved_bytes(mode: str) -> int:
        model = model_of(DENSE)
        checkpoint_blocks(model, mode)
        seen: dict[int, int] = {}

        def pack(t: torch.Tensor):
            seen[id(t)] = t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(batch(0)[0]).logits.sum()
        return sum(seen.values())

    none, selective, full = (saved_bytes(mode) for mode in ("none", "selective", "full"))
    assert full < selective < none


def test_block_settings_keep_names_and_eval_mode_and_refuse_unknown_modes():
    model = model_of(MOE)
    names = list(model.state_dict())
    apply_block_settings(model, SimpleNamespace(activation_checkpointing="full", compile=False))
    assert list(model.state_dict()) == names
    with torch.no_grad():  # no recomputation without grad: runs as the plain model
        torch.testing.assert_close(model(batch(1)[0]).logits, model_of(MOE)(batch(1)[0]).logits)
    with pytest.raises(BtxError, match="train.activation_checkpointing: expected one of none, full, selective"):
        checkpoint_blocks(model_of(DENSE), "some")


@pytest.mark.parametrize(("kind", "mode"), [("dense", "none"), ("moe", "none"), ("moe", "full")])
def test_compiled_blocks_train_like_the_eager_model(kind, mode):
    """10 AdamW steps with compiled blocks and the compiled cross-entropy (as the loop builds them)
    against eager: losses within 1e-4, and the first step's gradients close."""
    settings = SimpleNamespace(lr=3e-3, weight_decay=0.1, betas=[0.9, 0.95], eps=1e-8)
    runs, first_grads = {}, {}
    for compiled in (False, True):
        model = model_of(KINDS[kind])
        block_settings = SimpleNamespace(activation_checkpointing=mode, compile=compiled)
        apply_block_settings(model, block_settings)
        cross_entropy = cross_entropy_for(block_settings)
        assert (cross_entropy is token_cross_entropy) == (not compiled)
        optimizer = make_optimizer(model.parameters(), settings)
        losses = []
        for step in range(10):
            inputs, targets = batch(step % 2)
            loss = loss_terms(model(inputs), targets, 0.01, 0.001, cross_entropy)[0]
            loss.backward()
            if step == 0:
                first_grads[compiled] = {n: p.grad.clone() for n, p in model.named_parameters()}
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
        runs[compiled] = losses
    assert runs[True] == pytest.approx(runs[False], abs=1e-4)
    assert runs[False][-1] < runs[False][0]  # it trained
    assert first_grads[True].keys() == first_grads[False].keys()
    for name, grad in first_grads[False].items():
        torch.testing.assert_close(first_grads[True][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_compiled_cross_entropy_is_the_reference():
    """The compiled path's formulation, eager and compiled, against F.cross_entropy."""
    logits = torch.randn(3, 7, 50, generator=torch.Generator().manual_seed(0), requires_grad=True)
    targets = torch.randint(0, 50, (3, 7), generator=torch.Generator().manual_seed(1))
    values, grads = [], []
    compiled = cross_entropy_for(SimpleNamespace(compile=True))
    for cross_entropy in (token_cross_entropy, one_hot_cross_entropy, compiled):
        logits.grad = None
        loss = cross_entropy(logits, targets)
        loss.backward()
        values.append(loss.detach())
        grads.append(logits.grad.clone())
    torch.testing.assert_close(values[0], torch.nn.functional.cross_entropy(logits.view(-1, 50), targets.view(-1)))
    for value, grad in zip(values[1:], grads[1:]):
        torch.testing.assert_close(value, values[0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(grad, grads[0], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    ("kind", "graphs"),
    # dense: one graph for every block; MoE: the graphs before and after the eager expert loop
    # (btx.model.moe `_run_sorted`); sample_top1: one more break, its temperature
    [("dense", 1), ("moe", 2), ("moe-sample_top1", 3)],
)
def test_graph_breaks_are_only_the_documented_ones(kind, graphs):
    """dynamo alone (CompileCounter backend, no inductor: fast) through compile_blocks: the graphs
    compiled for both layers over three steps, sample_top1's changing router step included (a
    recompile per step would add graphs)."""
    import torch._dynamo.testing

    torch._dynamo.reset()
    model = model_of(KINDS[kind])
    counter = torch._dynamo.testing.CompileCounter()
    compile_blocks(model, backend=counter)
    for step in (0, 1000, 2000):
        model.set_router_step(step)
        loss_terms(model(batch(step)[0]), batch(step)[1], 0.01, 0.0)[0].backward()
    assert counter.frame_count == graphs
