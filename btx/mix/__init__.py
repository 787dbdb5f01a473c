"""The MiX step and its relatives: dense checkpoints in, an MoE out (or an MoE edited).

    options.py        MergeOptions and EditOptions: what a merge or an edit can be asked to do
    merge.py          `merge` and `btx merge`: validate, plan, stream the MoE to disk (start here)
    merge_plan.py     everything a merge decides and checks before a byte is written
    mixer.py          the tensors of the output, produced one at a time from the inputs
    merge_routers.py  routers fitted to data for a merge (centroid, ridge, hidden)
    router_fit.py     the layer-by-layer walk and closed forms that fitted routers share
    grow.py           `btx merge --into`: add or remove experts of a finished MoE
    router_inits.py   `btx eval RECIPE --router-inits`: merged models side by side, per router init
"""
