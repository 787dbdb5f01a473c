"""`btx plan`: compute, memory and wall-time accounting of a recipe on a named cluster.

Start at command.py (the command), then plan.py (the assembly and the suggestions).
- gpus.py      the accelerators: dense bf16 peak FLOP/s and memory; DEFAULT_MFU
- stages.py    the recipe's training jobs as `btx run` would run them (loaded without its inputs)
- compute.py   tokens, FLOPs (btx.model.flops), GPU-hours, wall time, experts in waves
- memory.py    bytes per GPU: parameters, gradients, optimizer states, buffers, activations
- plan.py      one plan dict; fits / does not fit; the changes that make a job fit
- measured.py  MFU and tokens/s of a finished run (--measured)
- report.py    the rich tables
- command.py   `btx plan` (flags: btx/cli/plan.py)
Depends on recipe, model, families and ui; nothing under run/ or train/.
"""
