"""The model in isolation: MoE dispatch paths, routing modes, losses, and the MoE block vs transformers."""

import math

import pytest
import torch

from btx.model.config import ModelConfig, Routing
from btx.model.moe import MoEFeedForward
from btx.model.transformer import Transformer


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=96, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, max_seq_len=64)
    base.update(kw)
    return ModelConfig(**base)


def random_moe(cfg: ModelConfig, seed=0) -> MoEFeedForward:
    torch.manual_seed(seed)
    layer = MoEFeedForward(cfg, layer_index=1)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.2)
    return layer


@pytest.mark.parametrize("mode", ["topk", "switch", "soft"])
def test_grouped_mm_path_matches_loop_path(mode):
    cfg = tiny(n_experts=4, top_k=2, router_mode=mode, capacity_factor=1.0)
    layer = random_moe(cfg)
    x = torch.randn(3, 10, cfg.dim)
    results = []
    for impl in ("loop", "grouped"):
        layer.impl = impl
        layer.zero_grad()
        xi = x.clone().requires_grad_()
        y, stats = layer(xi)
        (y.pow(2).sum() + stats.balance_loss).backward()
        results.append((y, xi.grad, [p.grad.clone() for p in layer.parameters()]))
    (y0, gx0, gp0), (y1, gx1, gp1) = results
    torch.testing.assert_close(y1, y0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gx1, gx0, atol=1e-5, rtol=1e-5)
    for a, b in zip(gp1, gp0):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_moe_block_matches_transformers_mixtral_block(k):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = tiny(n_experts=4, top_k=k)
    layer = random_moe(cfg)
    hf_cfg = MixtralConfig(
        hidden_size=cfg.dim, intermediate_size=cfg.ffn_dim, num_local_experts=4, num_experts_per_tok=k
    )
    hf_cfg._experts_implementation = "eager"
    block = MixtralSparseMoeBlock(hf_cfg)
    with torch.no_grad():
        block.gate.weight.copy_(layer.router.weight)
        block.experts.gate_up_proj.copy_(torch.cat([layer.w1, layer.w3], dim=1))
        block.experts.down_proj.copy_(layer.w2)
    x = torch.randn(2, 7, cfg.dim)
    torch.testing.assert_close(layer(x)[0], block(x), atol=1e-5, rtol=1e-5)


def test_identical_experts_equal_the_dense_ffn_whatever_the_router():
    torch.manual_seed(0)
    dense_cfg = tiny()
    dense = Transformer(dense_cfg)
    dense.init_weights()
    for mode in ("topk", "soft", "sample_top1"):
        moe_cfg = tiny(n_experts=3, top_k=2, router_mode=mode)
        moe = Transformer(moe_cfg)
        moe.init_weights()  # random routers
        state = {k: v for k, v in dense.state_dict().items() if ".ffn." not in k}
        for i, block in enumerate(dense.layers):
            for w in ("w1", "w2", "w3"):
                state[f"layers.{i}.ffn.{w}"] = getattr(block.ffn, w).weight.expand(3, -1, -1).clone()
            state[f"layers.{i}.ffn.router.weight"] = moe.layers[i].ffn.router.weight.detach().clone()
        moe.load_state_dict(state)
        moe.eval()
        tokens = torch.randint(0, dense_cfg.vocab_size, (2, 12))
        torch.testing.assert_close(moe(tokens).logits, dense(tokens).logits, atol=1e-5, rtol=1e-5)


def test_switch_drops_tokens_beyond_capacity_as_computed_by_hand():
    cfg = tiny(n_experts=2, router_mode="switch", capacity_factor=1.0)
    layer = random_moe(cfg)
    # Router sends everything with x[0] > 0 to expert 0; 8 tokens: 6 want expert 0, 2 want expert 1.
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0, 0], layer.router.weight[1, 0] = 5.0, -5.0
    x = torch.randn(8, cfg.dim)
    x[:, 0] = torch.tensor([1, 1, -1, 1, 1, 1, -1, 1.0])
    routing = layer.router.route(layer.router.logits(x))
    capacity = math.ceil(1.0 * 8 / 2)  # 4 slots per expert
    assert routing.dropped == 6 - capacity
    # The first four expert-0 tokens in sequence order keep their slot; the last two are dropped.
    assert routing.expert_TK.squeeze(1).tolist() == [0, 0, 1, 0, 0, 2, 1, 2]
    y, stats = layer(x.view(1, 8, -1))
    assert stats.dropped == 2 and stats.tokens_per_expert == [4, 2]
    assert torch.all(y[0, 5] == 0) and torch.all(y[0, 7] == 0)  # dropped: residual only


def test_balance_loss_matches_the_paper_formula_on_a_hand_built_example():
    cfg = tiny(n_experts=2, top_k=1)
    layer = random_moe(cfg)
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    routing = Routing(
        expert_TK=torch.tensor([[0], [1], [0]]), gate_TK=torch.tensor([[0.9], [0.8], [0.6]]), probs_TE=probs
    )
    u = [(0.9 + 0.6) / 3, 0.8 / 3]  # batch mean of each expert's gate value (0 where not chosen)
    p = [(0.9 + 0.2 + 0.6) / 3, (0.1 + 0.8 + 0.4) / 3]  # batch mean of router probabilities
    expected = 2 * (u[0] * p[0] + u[1] * p[1])  # N * sum_i u_i p_i (alpha applied by the trainer)
    assert layer.balance_loss(routing).item() == pytest.approx(expected, rel=1e-6)


def test_sample_top1_is_stochastic_in_training_and_deterministic_at_eval():
    cfg = tiny(n_experts=4, router_mode="sample_top1")
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.init_weights(std=0.5)
    assert model.layers[0].ffn.router.mode == "soft" and model.layers[1].ffn.router.mode == "sample_top1"
    tokens = torch.randint(0, cfg.vocab_size, (2, 16))
    model.eval()
    a, b = model(tokens).logits, model(tokens).logits
    assert torch.equal(a, b)
    model.train()
    assert not torch.equal(model(tokens).logits, model(tokens).logits)
    router = model.layers[1].ffn.router
    router.step = 0
    assert router.temperature() == 1.0
    router.step = 100_000
    assert router.temperature() == 0.5  # max(0.5, exp(-1e-4 * 1e5)) = max(0.5, 0.37)


def test_routing_is_recorded_only_when_asked():
    cfg = tiny(n_experts=4, top_k=2)
    model = Transformer(cfg)
    model.init_weights()
    tokens = torch.randint(0, cfg.vocab_size, (2, 5))
    model(tokens)
    assert all(f.last_routing is None for f in model.moe_layers())
    model.set_routing_record(True)
    out = model(tokens)
    for f, stats in zip(model.moe_layers(), out.moe_stats):
        r = f.last_routing
        assert r.expert_TK.shape == (10, 2) and r.probs_TE.shape == (10, 4)
        assert torch.bincount(r.expert_TK.flatten(), minlength=4).tolist() == stats.tokens_per_expert
        assert not r.probs_TE.requires_grad


def test_router_stays_fp32_in_a_bf16_model():
    cfg = tiny(n_experts=4, top_k=2)
    model = Transformer(cfg)
    model.init_weights()
    model.to(torch.bfloat16)
    for f in model.moe_layers():
        f.router.float()
    out = model(torch.randint(0, cfg.vocab_size, (1, 6)))
    assert out.logits.dtype == torch.bfloat16
    assert model.layers[0].ffn.router.weight.dtype == torch.float32


def test_param_counts_active_vs_total():
    cfg = tiny(n_experts=4, top_k=2)
    counts = cfg.param_counts()
    model = Transformer(cfg)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    ffn = 3 * cfg.dim * cfg.ffn_dim
    assert counts["total"] - counts["active"] == cfg.n_layers * 2 * ffn


def test_sample_top1_counts_its_soft_first_layer_as_active():
    cfg = tiny(n_experts=4, router_mode="sample_top1", n_layers=3)
    ffn = 3 * cfg.dim * cfg.ffn_dim
    counts = cfg.param_counts()
    # layer 0 runs all 4 experts, layers 1 and 2 one each: 6 of 12 expert FFNs are active
    assert counts["total"] - counts["active"] == 6 * ffn
    hard = tiny(n_experts=4, router_mode="sample_top1", n_layers=3, first_layer_soft=False).param_counts()
    assert hard["total"] - hard["active"] == 9 * ffn


def test_frozen_experts_get_no_weight_gradient_and_the_rest_is_unchanged():
    cfg = tiny(n_experts=4, top_k=2)
    layer = random_moe(cfg)
    x = torch.randn(2, 7, cfg.dim)
    grads = []
    for frozen in (False, True):
        layer.zero_grad(set_to_none=True)
        for w in (layer.w1, layer.w2, layer.w3):
            w.requires_grad_(not frozen)
        xi = x.clone().requires_grad_()
        y, _ = layer(xi)
        y.pow(2).sum().backward()
        grads.append((xi.grad, layer.router.weight.grad))
        if frozen:
            assert layer.w1.grad is None and layer.w2.grad is None and layer.w3.grad is None
    torch.testing.assert_close(grads[1][0], grads[0][0])
    torch.testing.assert_close(grads[1][1], grads[0][1])
