"""The transformer btx trains, merges and finetunes, dense or MoE. Imports only torch (and
btx.choices, a leaf of names).

    config.py       ModelConfig and the routing records the model returns
    transformer.py  attention, blocks and the model (start here: its docstring states the design)
    moe.py          the FFNs: dense SwiGLU, the router and the MoE dispatch
    flops.py        training FLOPs per token, frozen parameters counted as autograd runs them
    trainable.py    which parameters train in each trainable mode
"""
