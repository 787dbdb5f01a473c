"""Benchmark: the btx MoE layer against transformers' Mixtral block and the dense compute floor.

Workload: forward + backward (input grad and every weight grad, router included) of one MoE
feed-forward, E=4 experts, top-2, d=512, F=1408, on the same weights and tokens for every
contender. The compute floor is k x a dense SwiGLU FFN of the same shape on the same tokens: an
MoE cannot do less arithmetic than that.

    python bench/moe_layer.py                 # CPU fp32, 2 threads (the numbers in the README)
    python bench/moe_layer.py --device cuda   # bf16 on a GPU

Prints medians and the ratios btx/floor and btx/best-transformers at 8192 and 256 tokens.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from timing import interleaved_times

from btx.model import FeedForward, ModelConfig, MoEFeedForward


def timed_rounds(fns: dict, device: str, reps: int, warmup: int = 2) -> dict[str, float]:
    """Median time of each contender over interleaved rounds."""
    times = interleaved_times(fns, reps, warmup=warmup, cuda=device == "cuda")
    return {name: statistics.median(ts) for name, ts in times.items()}


def fwd_bwd(module, x, grad_out, unpack=False):
    def step():
        for p in module.parameters():
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
        hidden_size=cfg.dim, intermediate_size=cfg.ffn_dim, num_local_experts=cfg.n_experts,
        num_experts_per_tok=cfg.top_k,
    )
    hf_cfg._experts_implementation = impl
    block = MixtralSparseMoeBlock(hf_cfg)
    with torch.no_grad():
        block.gate.weight.copy_(btx_moe.router.weight)
        block.experts.gate_up_proj.copy_(torch.cat([btx_moe.w1, btx_moe.w3], dim=1))
        block.experts.down_proj.copy_(btx_moe.w2)
    return block.to(dtype)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, nargs="+", default=[8192, 256])
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = args.device
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    cfg = ModelConfig(dim=512, ffn_dim=1408, n_experts=4, top_k=2)
    torch.manual_seed(0)
    moe = MoEFeedForward(cfg, layer_index=0)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.02)
    dense = FeedForward(cfg.dim, cfg.ffn_dim)
    with torch.no_grad():
        dense.w1.weight.copy_(moe.w1[0]); dense.w3.weight.copy_(moe.w3[0]); dense.w2.weight.copy_(moe.w2[0])
    hf = {impl: hf_block(cfg, moe, impl, dtype).to(device) for impl in ("eager", "grouped_mm")}  # batched_mm gathers E weights per token: 94 GB at 8192 tokens
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
