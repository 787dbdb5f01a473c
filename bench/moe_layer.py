"""Benchmark: the btx MoE layer against transformers' Mixtral block and the dense compute floor.

Workload: forward + backward (input grad and every weight grad, router included) of one MoE
feed-forward, E=4 experts, top-2, d=512, F=1408, on the same weights and tokens for every
contender. The compute floor is k x a dense SwiGLU FFN of the same shape on the same tokens: an
MoE cannot do less arithmetic than that.

    python bench/moe_layer.py                 # CPU fp32, 2 threads (the numbers in the README)
    python bench/moe_layer.py --device cuda   # bf16 on a GPU
    python bench/moe_layer.py --block qwen3   # a whole Qwen3-MoE decoder layer (see below)

Prints medians and the ratios btx/floor and btx/best-transformers at 8192 and 256 tokens.

`--block qwen3` measures a whole decoder layer of Qwen3-MoE shape instead of the feed-forward alone:
RMSNorm, attention with an explicit head_dim (128, where hidden/heads is 64) and per-head q/k
RMSNorm, RoPE, causal SDPA, then the MoE, against transformers' `Qwen3MoeDecoderLayer` on the same
weights, tokens as 8 sequences. The floor is then the same block with k x a dense FFN in place of
the MoE (`btx.model.transformer.Block` on a dense config): attention costs what it costs, the MoE can only add.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from timing import interleaved_times

from btx.model.config import ModelConfig
from btx.model.moe import FeedForward, MoEFeedForward


def timed_rounds(fns: dict, device: str, reps: int, warmup: int = 2) -> dict[str, float]:
    """Median time of each contender over interleaved rounds."""
    times = interleaved_times(fns, reps, warmup=warmup, cuda=device == "cuda")
    return {name: statistics.median(ts) for name, ts in times.items()}


def fwd_bwd(module, x, grad_out, unpack=False, params=None):
    params = list(params if params is not None else module.parameters())

    def step():
        for p in params:
            p.grad = None
        x.grad = None
        out = module(x)
        if unpack:
            out = out[0]
        out.backward(grad_out)

    return step


def hf_block(cfg: ModelConfig, btx_moe: MoEFeedForward, impl: str, dtype):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    hf_cfg = MixtralConfig(
        hidden_size=cfg.dim,
        intermediate_size=cfg.ffn_dim,
        num_local_experts=cfg.n_experts,
        num_experts_per_tok=cfg.top_k,
    )
    hf_cfg._experts_implementation = impl
    block = MixtralSparseMoeBlock(hf_cfg)
    with torch.no_grad():
        block.gate.weight.copy_(btx_moe.router.weight)
        block.experts.gate_up_proj.copy_(torch.cat([btx_moe.w1, btx_moe.w3], dim=1))
        block.experts.down_proj.copy_(btx_moe.w2)
    return block.to(dtype)


def qwen3_blocks(device, dtype):
    """(btx MoE block, btx dense block with a k x wide FFN, transformers' layer, rope), same weights."""
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeDecoderLayer

    from btx.model.transformer import Block

    shape = dict(
        dim=512,
        n_heads=8,
        n_kv_heads=4,
        head_dim=128,
        ffn_dim=1408,
        qk_norm="head",
        family="qwen3",
        norm_eps=1e-6,
        max_seq_len=4096,
    )
    cfg = ModelConfig(**shape, n_experts=4, top_k=2)
    torch.manual_seed(0)
    block = Block(cfg, 0)
    with torch.no_grad():
        for name, p in block.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.02 * torch.randn_like(p))
    dense = Block(ModelConfig(**{**shape, "ffn_dim": cfg.top_k * cfg.ffn_dim}), 0)
    with torch.no_grad():
        for p in dense.parameters():
            p.normal_(0, 0.02)
    hf_cfg = Qwen3MoeConfig(
        hidden_size=512,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=128,
        moe_intermediate_size=1408,
        num_experts=4,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        rms_norm_eps=1e-6,
        max_position_embeddings=4096,
    )
    hf_cfg._attn_implementation = "sdpa"
    hf_cfg._experts_implementation = "grouped_mm"  # transformers 5.x's default
    layer = Qwen3MoeDecoderLayer(hf_cfg, 0)
    with torch.no_grad():  # btx's weights into transformers' names
        a, m = layer.self_attn, layer.mlp
        for ours, theirs in (("wq", a.q_proj), ("wk", a.k_proj), ("wv", a.v_proj), ("wo", a.o_proj)):
            theirs.weight.copy_(getattr(block.attn, ours).weight)
        a.q_norm.weight.copy_(block.attn.q_norm.weight)
        a.k_norm.weight.copy_(block.attn.k_norm.weight)
        layer.input_layernorm.weight.copy_(block.attn_norm.weight)
        layer.post_attention_layernorm.weight.copy_(block.ffn_norm.weight)
        m.gate.weight.copy_(block.ffn.router.weight)
        m.experts.gate_up_proj.copy_(torch.cat([block.ffn.w1, block.ffn.w3], dim=1))
        m.experts.down_proj.copy_(block.ffn.w2)
    return block.to(device), dense.to(device, dtype), layer.to(device, dtype), cfg


def run_block(args, device, dtype) -> None:
    from btx.model.transformer import rope_frequencies

    block, dense, layer, cfg = qwen3_blocks(device, dtype)
    for name in ("w1", "w2", "w3"):
        getattr(block.ffn, name).data = getattr(block.ffn, name).data.to(dtype)
    for name, p in block.named_parameters():
        if "router" not in name:
            p.data = p.data.to(dtype)
    print(
        f"device={device} dtype={dtype} threads={torch.get_num_threads()} Qwen3-MoE block: d=512 heads 8/4 "
        "head_dim 128 q/k norm, E=4 k=2 F=1408"
    )
    for T in args.tokens:
        B = 8 if T >= 8 else 1
        S = T // B
        inv_freq, _ = rope_frequencies(cfg, S)
        pos = torch.arange(S, dtype=torch.float32)
        emb = torch.cat([torch.outer(pos, inv_freq)] * 2, dim=-1)
        cos, sin = emb.cos().to(device), emb.sin().to(device)
        hf_rope = (cos[None].to(dtype), sin[None].to(dtype))
        g = torch.Generator().manual_seed(T)
        x = torch.randn(B, S, cfg.dim, generator=g).to(device, dtype).requires_grad_()
        grad = torch.randn(B, S, cfg.dim, generator=g).to(device, dtype)
        if dtype == torch.float32:  # the two layers compute the same thing before they are timed
            with torch.no_grad():
                torch.testing.assert_close(
                    block(x, cos, sin)[0],
                    layer(x, attention_mask=None, position_embeddings=hf_rope),
                    rtol=1e-4,
                    atol=1e-4,
                )
        fns = {
            "floor": fwd_bwd(
                lambda x, cos=cos, sin=sin: dense(x, cos, sin), x, grad, unpack=True, params=dense.parameters()
            ),
            "btx": fwd_bwd(
                lambda x, cos=cos, sin=sin: block(x, cos, sin), x, grad, unpack=True, params=block.parameters()
            ),
            "hf": fwd_bwd(
                lambda x, hf_rope=hf_rope: layer(x, attention_mask=None, position_embeddings=hf_rope),
                x,
                grad,
                params=layer.parameters(),
            ),
        }
        reps = args.reps if T > 1024 else args.reps * 5
        t = timed_rounds(fns, device, reps)
        print(f"\nT={T} ({B} x {S}): " + "  ".join(f"{k} {v * 1e3:.2f} ms" for k, v in t.items()))
        print(f"  btx / floor (same block, dense k x FFN) = {t['btx'] / t['floor']:.3f}")
        print(f"  transformers / btx                     = {t['hf'] / t['btx']:.3f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, nargs="+", default=[8192, 256])
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--block", choices=["qwen3"], help="measure a whole decoder layer of this shape")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = args.device
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    if args.block:
        return run_block(args, device, dtype)
    cfg = ModelConfig(dim=512, ffn_dim=1408, n_experts=4, top_k=2)
    torch.manual_seed(0)
    moe = MoEFeedForward(cfg, layer_index=0)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.02)
    dense = FeedForward(cfg.dim, cfg.ffn_dim)
    with torch.no_grad():
        dense.w1.weight.copy_(moe.w1[0])
        dense.w3.weight.copy_(moe.w3[0])
        dense.w2.weight.copy_(moe.w2[0])
    hf = {
        impl: hf_block(cfg, moe, impl, dtype).to(device) for impl in ("eager", "grouped_mm")
    }  # batched_mm gathers E weights per token: 94 GB at 8192 tokens
    moe = moe.to(device)
    with torch.no_grad():  # experts in the compute dtype, router stays fp32 as in btx models
        for name in ("w1", "w2", "w3"):
            getattr(moe, name).data = getattr(moe, name).data.to(dtype)
    dense = dense.to(device, dtype)
    print(f"device={device} dtype={dtype} threads={torch.get_num_threads()} E=4 k=2 d=512 F=1408")
    for T in args.tokens:
        g = torch.Generator().manual_seed(T)
        x = torch.randn(1, T, cfg.dim, generator=g).to(device, dtype).requires_grad_()
        grad = torch.randn(1, T, cfg.dim, generator=g).to(device, dtype)
        reps = args.reps if T > 1024 else args.reps * 5
        fns = {"dense": fwd_bwd(dense, x, grad), "btx": fwd_bwd(moe, x, grad, unpack=True)}
        fns.update({f"hf-{impl}": fwd_bwd(block, x, grad) for impl, block in hf.items()})
        t = timed_rounds(fns, device, reps)
        t["floor"] = cfg.top_k * t.pop("dense")
        best_hf = min((v, k) for k, v in t.items() if k.startswith("hf-"))
        print(f"\nT={T}: " + "  ".join(f"{k} {v * 1e3:.2f} ms" for k, v in t.items()))
        print(f"  btx / compute floor           = {t['btx'] / t['floor']:.3f}")
        print(f"  btx / best transformers ({best_hf[1]}) = {t['btx'] / best_hf[0]:.3f}")
        print(f"  transformers default (grouped_mm) / btx = {t['hf-grouped_mm'] / t['btx']:.3f}x")


if __name__ == "__main__":
    main()
