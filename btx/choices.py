"""The closed sets of names btx accepts, declared once: recipes check against them, the CLI offers
them as choices, and the code that acts on them imports them from here. No imports, so any module
(the model's included) can depend on it without depending on anything else.
"""

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
ROUTER_MODES = ("topk", "switch", "soft", "sample_top1")  # finetune.router_mode (btx.model.moe)
TRAINABLE = ("all", "router_only", "frozen_experts")  # finetune.trainable (btx.model.trainable)
DENSE_TRAINABLE = ("all", "ffn", "ffn_norms")  # train.trainable of an expert (btx.model.trainable)
ACTIVATION_CHECKPOINTING = ("none", "full", "selective")  # train.activation_checkpointing (btx.train.blocks)
EVAL_MATCHES = ("compute", "data", "both")
GENERAL_DOMAIN = "general"  # the data-only domain of finetune.general
ROUTER_INITS = ("random", "zeros", "centroid", "ridge", "hidden")
GRANULARITIES = ("expert", "split", "blend")
SHARED_POLICIES = ("keep", "average")  # grow.shared: an MoE edit's shared (non-FFN) weights
EXECUTORS = ("local", "slurm")
WEIGHT_DTYPES = ("float32", "bfloat16", "float16")  # what btx writes checkpoints in (merge.dtype, --dtype)
EVAL_DTYPES = ("auto", *WEIGHT_DTYPES)  # eval.dtype / --dtype: auto is float32 on a CPU, the checkpoint's on a GPU
LOGGERS = ("tensorboard", "wandb")  # train.loggers: where metrics.jsonl's records also go (btx.train.loggers)
