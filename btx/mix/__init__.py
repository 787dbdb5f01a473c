"""The MiX step and its relatives: dense checkpoints in, an MoE out (or a finished MoE grown or shrunk).

options.py         MergeOptions and EditOptions: what a merge or a grow can be asked to do
merge.py           `merge` and `btx merge`: validate, plan, stream the MoE to disk (start here)
merge_plan.py      everything a merge decides and checks before a byte is written
merged_tensors.py  the merged MoE's tensors, produced one at a time from the inputs
input_hashes.py    the inputs' sha256, hashed while the merge reads them
grow.py            `grow_moe` and `btx merge --into`: add or remove experts of a finished MoE
grow_plan.py       everything a grow decides and checks before a byte is written
grown_tensors.py   the grown MoE's tensors, produced one at a time
output.py          the one writer of both: lock, free space, atomic directory, stream, DONE.json
router_fit.py      router rows without training: seeded random rows, and the fitted inits'
                   layer-by-layer walk, closed forms and one entry (`fit_routers`)
router_data.py     the token sets routers are fitted on (shard windows, prompts)
progress.py        the progress bar of a merge, a grow and a router fit
"""
