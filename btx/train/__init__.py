"""Training: the one loop for the seed, the experts, the MoE finetune and the baselines.

job.py        TrainJob: what a run trains, on what, where it writes; jobs from a recipe
loop.py       `run_loop` and `btx train` (start here: its docstring states the contract)
blocks.py     per-block activation checkpointing and torch.compile (train.activation_checkpointing, train.compile)
checkpoint.py checkpoints and exact resume
export.py     the final HF checkpoint and DONE.json
checkpoint_export.py  `btx export`: any checkpoint in the final export's HF form
metrics.py    metrics.jsonl, the progress line, MFU
loggers.py    train.loggers: tensorboard and wandb get every metrics.jsonl record
distributed.py collectives across ranks and SIGTERM handling
engines/      what is device- and parallelism-specific: accelerate (DDP) and DeepSpeed (ZeRO)
finetune.py   `btx finetune`: the MoE job on the domain mixture
"""
