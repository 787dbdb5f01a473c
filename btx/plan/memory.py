"""Memory per GPU of one training job: parameters, gradients, optimizer states, buffers, activations.

Bytes per parameter, Psi parameters of which Psi_t train, N data-parallel ranks (ZeRO, Rajbhandari et
al. 2020), as btx's engines lay them out (btx/train/engines/):

- accelerate (DDP, dense jobs with train.zero_stage null): fp32 weights 4 Psi whatever the precision
  (bf16 is autocast of the forward), fp32 gradients 4 Psi_t, AdamW moments 8 Psi_t. With N > 1 DDP
  keeps its own gradient buckets (4 Psi_t). Under bf16 autocast the bf16 copies of the weights are
  held from forward to backward (2 Psi).
- deepspeed: weights in the run's dtype p (bf16: 2, fp32: 4); fp32 master copy (4; none in fp32 at
  ZeRO-0, and at ZeRO-3 where btx.train.engines.zero3_master shares it with the weights) and AdamW
  moments (8) per trained parameter; gradients in dtype p; the fp32 gradient of the rank's partition
  when the optimizer steps (4 Psi_t / N, Psi_t at ZeRO-0 bf16); the gradients flattened into reduce
  buckets of up to 5e8 elements (reduce_bucket_size) for the all-reduce, at every stage (at ZeRO-0
  the engine's buffered all-reduce copies them, even at N = 1).
    stage 0: p Psi + p Psi_t + (master + 8) Psi_t
    stage 1: the master and moments are sharded: / N
    stage 2: the gradients too
    stage 3: the weights too (+ the gathered weights of about two layers: the one running and the
             prefetched one)
  optimizer offload (finetune.offload_optimizer): master, moments and fp32 gradients live in host
  memory, not on the GPU.
- Activations per micro-batch of b x s tokens (what autograd saves for the backward in btx's
  Transformer; activation dtype a, residual-stream dtype r, both 2 in bf16 and 4 in fp32; accelerate
  keeps an fp32 residual under autocast): per layer and token
    each RMSNorm       4d (its fp32 input) + r d (normalised) + a d (the next matmul's input)
    attention          a (3 q + 2 kv) (q, k, v after RoPE, the output and its re-layout) + 4 heads
    dense FFN          4 a F (w1 and w3 outputs, silu, their product)
    MoE FFN (k active) k a (2d + 3F) (each slot's input, hidden states and output) + the router's
                       fp32 input 4d (when a is 2) and 8 E
  plus the loss: (2a + 8) V per token (logits, their fp32 log-softmax and its gradient). Windowed
  layers longer than their window keep the a x heads x s x s scores (masked SDPA).
  Full activation checkpointing keeps each layer's input (r d per token) and recomputes one layer at
  a time in the backward.
The peak counts everything at once: with gradient accumulation the gradients of one micro-batch are
held while the next runs its forward.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from btx.model.config import ModelConfig
from btx.model.trainable import param_group, trained_groups
from btx.model.transformer import Transformer

DS_BUCKET = 5e8  # DeepSpeed's default reduce_bucket_size (elements)


@dataclass(frozen=True)
class ParamCounts:
    total: int
    trained: int
    largest_layer: int  # parameters of the largest transformer block (ZeRO-3 gathers blocks)


_COUNTS: dict[str, tuple[dict[str, int], int]] = {}  # repr(cfg) -> counts (ModelConfig is not hashable)


def _group_counts(cfg: ModelConfig) -> tuple[dict[str, int], int]:
    key = repr(cfg)
    if key not in _COUNTS:
        _COUNTS[key] = _count(cfg)
    return _COUNTS[key]


def _count(cfg: ModelConfig) -> tuple[dict[str, int], int]:
    with torch.device("meta"):  # shapes only: nothing is allocated
        model = Transformer(cfg)
    groups: dict[str, int] = {}
    for name, p in model.named_parameters():
        g = param_group(name)
        groups[g] = groups.get(g, 0) + p.numel()
    largest = max(sum(p.numel() for p in block.parameters()) for block in model.layers)
    return groups, largest


def param_counts(cfg: ModelConfig, trainable: str) -> ParamCounts:
    groups, largest = _group_counts(cfg)
    trains = trained_groups(trainable)
    return ParamCounts(
        total=sum(groups.values()),
        trained=sum(n for g, n in groups.items() if g in trains),
        largest_layer=largest,
    )


@dataclass
class Memory:
    """Bytes per GPU of one job, by part; `peak` is their sum."""

    params: float
    grads: float
    optimizer: float
    buffers: float  # DDP buckets, autocast weight copies, DeepSpeed buckets and gathered weights
    activations: float

    @property
    def peak(self) -> float:
        return self.params + self.grads + self.optimizer + self.buffers + self.activations

    def to_dict(self) -> dict:
        return {**asdict(self), "peak": self.peak}


def state_bytes(
    counts: ParamCounts, *, engine: str, precision: str, zero_stage: int | None, world: int, offload: bool
) -> tuple[float, float, float, float]:
    """(params, grads, optimizer, buffers) bytes per rank."""
    psi, psi_t, n = float(counts.total), float(counts.trained), max(1, world)
    if engine == "accelerate":
        buffers = (4 * psi_t if n > 1 else 0.0) + (2 * psi if precision == "bf16" else 0.0)
        return 4 * psi, 4 * psi_t, 8 * psi_t, buffers
    p = 4 if precision == "fp32" else 2
    stage = zero_stage or 0
    master = 0 if (stage in (0, 3) and p == 4) else 4  # fp32: ZeRO-0 has none, ZeRO-3's shares the weights
    bucket = p * min(DS_BUCKET, psi_t)
    if stage == 0:  # the engine's all-reduce flattens the gradients into buckets (a copy), even at N = 1
        params, grads, optim = p * psi, p * psi_t, (master + 8) * psi_t
        buffers = (4 * psi_t if p != 4 else 0) + bucket
    elif stage == 1:
        params, grads, optim, buffers = p * psi, p * psi_t, (master + 8) * psi_t / n, 4 * psi_t / n + bucket
    elif stage == 2:
        params, grads, optim, buffers = p * psi, p * psi_t / n, (master + 8) * psi_t / n, 4 * psi_t / n + bucket
    else:
        gathered = 2 * p * counts.largest_layer if n > 1 else 0.0
        params, grads = p * psi / n, p * psi_t / n
        optim, buffers = (master + 8) * psi_t / n, 4 * psi_t / n + bucket + gathered
    if offload and stage >= 1:
        optim, buffers = 0.0, buffers - 4 * psi_t / n
    return params, grads, optim, buffers


def activation_bytes(
    cfg: ModelConfig, *, batch: int, seq: int, act_bytes: int, residual_bytes: int, checkpointing: str
) -> float:
    """Bytes autograd holds for one micro-batch at the start of the backward (see the module doc)."""
    a, r, d = act_bytes, residual_bytes, cfg.dim
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    tokens = batch * seq
    norm = 4 * d + r * d + a * d
    attn = a * (3 * q + 2 * kv) + 4 * cfg.n_heads
    if cfg.is_moe:
        k = cfg.experts_per_token
        ffn = k * a * (2 * d + 3 * cfg.ffn_dim) + (4 * d if a != 4 else 0) + 8 * cfg.n_experts
        if cfg.shared_expert_dim:
            ffn += 4 * a * cfg.shared_expert_dim
    else:
        ffn = 4 * a * cfg.ffn_dim
    layers = []
    for i in range(cfg.n_layers):
        w = cfg.window(i)
        scores = a * cfg.n_heads * seq * seq * batch if w is not None and seq > w else 0.0
        layers.append((2 * norm + attn + ffn) * tokens + scores)
    loss = ((2 * a + 8) * cfg.vocab_size + norm) * tokens
    if checkpointing == "full":
        return r * d * tokens * cfg.n_layers + max(layers) + loss
    return sum(layers) + loss


def job_memory(job, world: int, precision: str) -> Memory:
    """Memory per GPU of a btx.plan.stages.Job at `world` data-parallel ranks; `precision` is the
    resolved one (bf16 | fp32)."""
    counts = param_counts(job.cfg, job.trainable)
    params, grads, optim, buffers = state_bytes(
        counts,
        engine=job.engine,
        precision=precision,
        zero_stage=job.zero_stage,
        world=world,
        offload=job.offload_optimizer,
    )
    a = 2 if precision == "bf16" else 4
    r = 4 if job.engine == "accelerate" else a
    acts = activation_bytes(
        job.cfg,
        batch=job.settings.batch_size,
        seq=job.settings.seq_len,
        act_bytes=a,
        residual_bytes=r,
        checkpointing=job.activation_checkpointing,
    )
    return Memory(params, grads, optim, buffers, acts)
