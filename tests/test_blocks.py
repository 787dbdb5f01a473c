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
from btx.train.blocks import apply_block_settings, checkpoint_blocks
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


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_compiled_blocks_train_like_the_eager_model(kind):
    """10 AdamW steps, compiled (with full checkpointing on the MoE: the two combine) against eager."""
    settings = SimpleNamespace(lr=3e-3, weight_decay=0.1, betas=[0.9, 0.95], eps=1e-8)
    runs = {}
    for compiled in (False, True):
        model = model_of(KINDS[kind])
        mode = "full" if kind == "moe" else "none"
        apply_block_settings(model, SimpleNamespace(activation_checkpointing=mode, compile=compiled))
        optimizer = make_optimizer(model.parameters(), settings)
        losses = []
        for step in range(10):
            inputs, targets = batch(step % 2)
            loss = loss_terms(model(inputs), targets, 0.01, 0.0)[0]
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
        runs[compiled] = losses
    assert runs[True] == pytest.approx(runs[False], abs=1e-4)
    assert runs[False][-1] < runs[False][0]  # it trained


def test_graph_breaks_are_only_the_documented_ones():
    """dynamo alone (no inductor, fast): a dense block is one graph; an MoE block breaks only at the
    eager middle of its dispatch (btx.model.moe `_run_sorted`), and sample_top1's changing router
    step does not recompile it."""
    import torch._dynamo.testing

    def block_of(cfg):
        model = model_of(cfg)
        x = torch.randn(2, 16, cfg.dim)
        return model, model.layers[1], (x, *model.rope(16, "cpu"))

    _, dense, args = block_of(DENSE)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(dense)(*args)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)

    _, moe, args = block_of(MOE)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(moe)(*args)
    reasons = {str(b.reason).splitlines()[0] for b in explained.break_reasons}
    assert len(reasons) == 1 and "disable" in reasons.pop()

    model, sampled, args = block_of(SAMPLED)
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(sampled, backend=counter)
    frames = []
    for step in (0, 1000, 2000):
        model.set_router_step(step)
        compiled(*args)
        frames.append(counter.frame_count)
    assert frames[0] == frames[1] == frames[2]
