"""btx/model/flops.py and btx/model/trainable.py: which parameters train, and the FLOPs that costs.

The numbers are worked out by hand for one small model (dim 32, 2 layers, 4 heads of 8 with 2 kv
heads, FFN 64, vocabulary 64, 16-token windows), and the matmul part is checked against what
torch's FlopCounterMode measures in one forward and backward of the real model with those
parameters frozen (dense models: their FFNs are plain nn.Linear, which it counts exactly).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from btx.errors import BtxError
from btx.model.config import ModelConfig
from btx.model.flops import train_flops_breakdown, train_flops_per_token
from btx.model.trainable import param_group, set_trainable
from btx.model.transformer import Transformer

SEQ = 16
DENSE = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=64)
MOE = dataclasses.replace(DENSE, n_experts=4, top_k=2)
# Weights of one layer: q 32x32 + k, v 16x32 each = 2048; o 1024; FFN 3 x 32 x 64 = 6144 (w1, w3:
# 4096; w2: 2048); two norms of 32. LM head 64 x 32 = 2048. Attention scores per layer and token:
# 2 x 2 x head_dim x mean keys (SEQ / 2) x heads = 2 x 4 x 8 x 16 = 1024 forward, x 3 with backward.
QKV, ATTN_OUT, FFN_IN, FFN_OUT, NORM, HEAD, SCORES = 2048, 1024, 4096, 2048, 32, 2048, 1024


def test_everything_trained_is_six_flops_per_weight_plus_attention():
    per_layer = QKV + ATTN_OUT + FFN_IN + FFN_OUT + 2 * NORM
    assert train_flops_per_token(DENSE, SEQ) == 6 * (2 * per_layer + HEAD) + 2 * 3 * SCORES == 129792
    assert train_flops_per_token(DENSE, SEQ, "all") == train_flops_per_token(DENSE, SEQ)


def test_ffn_only_counts_no_weight_gradient_for_frozen_weights_and_nothing_before_the_first_ffn():
    # layer 0: nothing before its FFN trains, so its norms and attention run forward only, and its
    # FFN's w1/w3 need no input gradient (their input does not require grad) but w2's input does
    layer0 = 2 * NORM + 2 * QKV + SCORES + 2 * ATTN_OUT + 2 * NORM + 4 * FFN_IN + 6 * FFN_OUT
    # layer 1: the residual stream requires grad (layer 0's FFN trains): frozen weights cost 4
    layer1 = 4 * NORM + 4 * QKV + 3 * SCORES + 4 * ATTN_OUT + 4 * NORM + 6 * (FFN_IN + FFN_OUT)
    assert train_flops_per_token(DENSE, SEQ, "ffn") == layer0 + layer1 + 4 * HEAD == 96640
    # training the norms too: layer 0's attention norm trains, so gradients reach its attention inputs
    layer0 = 4 * NORM + 4 * QKV + 3 * SCORES + 4 * ATTN_OUT + 6 * NORM + 6 * (FFN_IN + FFN_OUT)
    layer1 = 6 * NORM + 4 * QKV + 3 * SCORES + 4 * ATTN_OUT + 6 * NORM + 6 * (FFN_IN + FFN_OUT)
    assert train_flops_per_token(DENSE, SEQ, "ffn_norms") == layer0 + layer1 + 4 * HEAD


def test_router_only_moe_by_hand():
    # top-2 of 4 experts: two FFNs per token; the router (32 x 4) is the only thing that trains
    router, experts_in, experts_out = 128, 2 * FFN_IN, 2 * FFN_OUT
    # layer 0: nothing before the router trains; its experts' outputs are scaled by the gates, so
    # they run forward only; after the layer the residual stream requires grad
    layer0 = 2 * NORM + 2 * QKV + SCORES + 2 * ATTN_OUT + 2 * NORM + 4 * router + 2 * (experts_in + experts_out)
    layer1 = 4 * NORM + 4 * QKV + 3 * SCORES + 4 * ATTN_OUT + 4 * NORM + 6 * router + 4 * (experts_in + experts_out)
    parts = train_flops_breakdown(MOE, SEQ, "router_only")
    assert sum(parts.values()) == layer0 + layer1 + 4 * HEAD
    assert parts["norms"] == 2 * NORM + 2 * NORM + 4 * NORM + 4 * NORM and parts["attention_scores"] == 4 * SCORES


@pytest.mark.parametrize("cfg", [
    DENSE, dataclasses.replace(DENSE, tie_embeddings=True), dataclasses.replace(DENSE, qk_norm="head"),
    dataclasses.replace(DENSE, norm_placement="post", qk_norm="proj"),
    dataclasses.replace(DENSE, sliding_window=4, sliding_layers=[1]),
])  # fmt: skip
@pytest.mark.parametrize("mode", ["all", "ffn", "ffn_norms"])
def test_the_weight_part_is_what_autograd_computes(cfg, mode):
    model = Transformer(cfg)
    model.init_weights(generator=torch.Generator().manual_seed(0))
    set_trainable(model, mode)
    tokens = torch.randint(0, cfg.vocab_size, (2, SEQ), generator=torch.Generator().manual_seed(1))
    with FlopCounterMode(display=False) as counter:
        model(tokens).logits.float().sum().backward()
    measured = sum(counter.get_flop_counts()["Global"].values()) / tokens.numel()  # matmuls with weights only
    assert measured == train_flops_breakdown(cfg, SEQ, mode)["weights"]


def test_frozen_experts_and_the_counts_every_mode_gives():
    assert train_flops_per_token(MOE, SEQ, "frozen_experts") < train_flops_per_token(MOE, SEQ)
    assert train_flops_per_token(MOE, SEQ, "router_only") < train_flops_per_token(MOE, SEQ, "frozen_experts")
    with pytest.raises(BtxError, match="trainable: expected one of"):
        train_flops_per_token(DENSE, SEQ, "attention")


def test_set_trainable_freezes_exactly_the_other_groups():
    dense, moe = Transformer(DENSE), Transformer(dataclasses.replace(MOE, shared_expert_dim=8))
    set_trainable(dense, "ffn")
    assert {n for n, p in dense.named_parameters() if p.requires_grad} == {
        f"layers.{i}.ffn.{w}.weight" for i in range(2) for w in ("w1", "w2", "w3")
    }
    set_trainable(dense, "ffn_norms")
    trained = {n for n, p in dense.named_parameters() if p.requires_grad}
    assert trained - {f"layers.{i}.ffn.{w}.weight" for i in range(2) for w in ("w1", "w2", "w3")} == {
        "norm.weight",
        *(f"layers.{i}.{n}_norm.weight" for i in range(2) for n in ("attn", "ffn")),
    }
    set_trainable(moe, "router_only")
    assert {n for n, p in moe.named_parameters() if p.requires_grad} == {
        f"layers.{i}.ffn.router.weight" for i in range(2)
    }
    set_trainable(moe, "frozen_experts")
    frozen = {n for n, p in moe.named_parameters() if not p.requires_grad}
    assert frozen == {f"layers.{i}.ffn.{w}" for i in range(2) for w in ("w1", "w2", "w3")}  # the shared expert trains
    assert param_group("layers.0.ffn.shared_gate.weight") == "shared"
    with pytest.raises(BtxError, match="router_only is not a mode for a dense model"):
        set_trainable(dense, "router_only")
    with pytest.raises(BtxError, match="ffn is not a mode for an MoE"):
        set_trainable(moe, "ffn")
