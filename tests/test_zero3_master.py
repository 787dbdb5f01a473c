"""ZeRO-3 in fp32 keeps one copy of its partition (btx.train.engines.zero3_master), and CPU DeepSpeed
processes hand freed tensors back to the system (btx.train.engines.host_memory).

A tiny btx Transformer trained under the DeepSpeed engine at ZeRO-3 in one process (a world of one,
gloo): with the master shared, each fp32 master partition is a view of the module's partition; the
losses, the exported weights and a save / resume cycle give exactly what the stock path (the master
a separate copy) gives, and a closed engine is freed. bf16, and an untested DeepSpeed, keep the stock copies.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import textwrap
import weakref
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import btx.train.engines.deepspeed as ds_engine
from btx.model.config import ModelConfig
from btx.model.transformer import Transformer
from btx.recipe.schema import TrainSection
from btx.train.checkpoint_export import zero_weights
from btx.train.engines.zero3_master import share_fp32_master, shares_fp32_master

pytest.importorskip("deepspeed")

REPO = Path(__file__).resolve().parents[1]
CFG = ModelConfig(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=4, ffn_dim=64, max_seq_len=64)
SETTINGS = TrainSection(lr=1e-2, warmup_steps=1, steps=6, batch_size=2, seq_len=16, precision="fp32", grad_clip=1.0)


def batch(step: int) -> torch.Tensor:
    shape = (SETTINGS.batch_size, SETTINGS.seq_len + 1)
    return torch.randint(0, CFG.vocab_size, shape, generator=torch.Generator().manual_seed(step))


def new_engine(monkeypatch, shared: bool, settings=SETTINGS):
    if not shared:  # the stock path: DeepSpeed's separate master copy
        monkeypatch.setattr(ds_engine, "share_fp32_master", lambda optimizer: "stock path (test)")
    torch.manual_seed(0)
    return ds_engine.DeepSpeedEngine(Transformer(CFG), settings, zero_stage=3)


def train(engine, steps: range) -> list[float]:
    losses = []
    for step in steps:
        tokens = batch(step)
        logits = engine.model(tokens[:, :-1]).logits
        loss = F.cross_entropy(logits.float().reshape(-1, CFG.vocab_size), tokens[:, 1:].reshape(-1))
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


def weights(engine) -> dict[str, torch.Tensor]:
    return engine.full_state_dict()


def test_fp32_master_shares_the_module_partition_and_trains_bit_identically(monkeypatch, tmp_path):
    runs = {}
    for shared in (True, False):
        with monkeypatch.context() as patch:
            engine = new_engine(patch, shared)
        try:
            opt = engine.ds.optimizer
            assert shares_fp32_master(opt) is shared and (engine.master_not_shared is None) is shared
            if shared:  # one storage: the master is a view of the module's flat partition
                for module, master in zip(opt.fp16_partitioned_groups_flat, opt.fp32_partitioned_groups_flat):
                    assert master.untyped_storage().data_ptr() == module.untyped_storage().data_ptr()
                    assert master.data_ptr() == module.data_ptr() and master.dtype == torch.float32
            losses = train(engine, range(1, 4))
            at_step3 = weights(engine)
            engine.save(tmp_path / f"ckpt-{shared}", {"step": 3})
            # `btx export` of the checkpoint (zero_to_fp32 over the saved master partitions) reads those weights
            saved = zero_weights(tmp_path / f"ckpt-{shared}" / "deepspeed")
            assert saved.keys() == at_step3.keys()
            assert all(torch.equal(saved[name], at_step3[name]) for name in saved)
            losses += train(engine, range(4, 7))
            runs[shared] = losses, weights(engine)
            assert shares_fp32_master(opt) is shared  # DeepSpeed's steps kept the sharing
            freed = weakref.ref(opt)
            del opt
        finally:
            engine.close()
        assert freed() is None  # closing frees the partitions and moments (DeepSpeed's module stack let go)
    assert runs[True][0] == runs[False][0]  # bit-identical, not approximately
    assert runs[True][0][-1] < runs[True][0][0]  # and it learned
    for name, expected in runs[False][1].items():
        assert torch.equal(runs[True][1][name], expected), name

    # Resume from the step-3 checkpoint: the master is loaded (and still shared), steps 4-6 repeat exactly.
    for shared in (True, False):
        with monkeypatch.context() as patch:
            engine = new_engine(patch, shared)
        try:
            assert engine.load(tmp_path / f"ckpt-{shared}")["step"] == 3
            assert shares_fp32_master(engine.ds.optimizer) is shared
            assert train(engine, range(4, 7)) == runs[True][0][3:]
            for name, expected in weights(engine).items():
                assert torch.equal(expected, runs[True][1][name]), name
        finally:
            engine.close()


def test_bf16_and_an_untested_deepspeed_keep_the_stock_master(monkeypatch):
    engine = new_engine(monkeypatch, True, dataclasses.replace(SETTINGS, precision="bf16"))
    try:  # bf16: the master holds what the module's rounding loses, so it is not a duplicate
        assert "bfloat16" in engine.master_not_shared and not shares_fp32_master(engine.ds.optimizer)
        assert len(train(engine, range(1, 3))) == 2
    finally:
        engine.close()

    monkeypatch.setattr("deepspeed.__version__", "0.99.0")
    engine = new_engine(monkeypatch, True)
    try:
        assert "0.99.0 is untested" in engine.master_not_shared and not shares_fp32_master(engine.ds.optimizer)
        assert share_fp32_master(object()).startswith("not a ZeRO-3 optimizer")
    finally:
        engine.close()


# Fresh processes: glibc's mmap threshold is per process. 2 MiB tensors freed between small live
# ones: with the threshold raised by an earlier large free (glibc's default) they stay resident.
FRAGMENT = """
import sys, torch
from btx.train.engines.host_memory import keep_freed_memory_returned
if sys.argv[1] == "fixed":
    assert keep_freed_memory_returned()
def rss():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) * 1024
x = torch.ones(16 << 20, dtype=torch.uint8)
del x  # a mapped 16 MiB block freed: glibc raises its threshold to 16 MiB (up to 32)
big, small = [], []
for _ in range(100):
    big.append(torch.ones(2 << 20, dtype=torch.uint8))
    small.append(torch.ones(4096, dtype=torch.uint8))
before = rss()
big.clear()
print((before - rss()) >> 20)
"""


def test_cpu_deepspeed_processes_return_freed_tensors_to_the_system():
    returned = {}
    for mode in ("default", "fixed"):
        proc = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(FRAGMENT), mode],
            capture_output=True,
            text=True,
            env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        returned[mode] = int(proc.stdout.split()[-1])  # MiB the resident set shrank when 200 MiB were freed
    assert returned["default"] < 50 and returned["fixed"] > 150, returned
