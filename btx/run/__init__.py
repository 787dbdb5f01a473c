"""Running the workflow: `btx run` (the pipeline of stages and its ledger), `btx branch` and
`btx status` (expert jobs, locally or on Slurm).

    pipeline.py    `btx run`: STAGES, the table declaring every stage; the run, then a summary (start here)
    stage.py       what a Stage declares, and driving one from its row: key, verdict, work, record
    ledger.py      pipeline.json and the skip / redo / adopt verdict
    stages.py      the work of prepare, seed, branch, merge, finetune and grow
    baselines.py   the dense and sparse-upcycling baselines, matched on compute or data
    evaluation.py  `btx eval RECIPE`: every model of a run
    eval_tasks.py  its downstream tasks (eval.tasks): every model and the BTM ensembles, results reused
    router_inits.py `btx eval RECIPE --router-inits`: merged models side by side, per router init
    prepare.py     `btx prepare`: a recipe's domains (or command-line specs) -> token shards
    branch.py      `btx branch` and `btx status`
    jobs.py        expert jobs and their state, derived from the expert directory
    progress.py    progress of expert jobs from metrics.jsonl; the status table
    local.py       the local executor: subprocesses on their own devices
    slurm.py       the Slurm executor: batch scripts that requeue
"""
