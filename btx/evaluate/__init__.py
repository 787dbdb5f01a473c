"""Evaluation: held-out loss of any set of checkpoints, the BTM ensembles, tables, routing analysis.

    scores.py            per-window log-probabilities and losses of one model, standard errors
    btm.py               the Branch-Train-Merge ensembles: domain posterior and tf-idf top-k
    table.py             the comparison table: terminal, markdown, JSON
    plot.py              loss (and task accuracy) against training FLOPs (PNG and a text scatter)
    next_token.py        next-token distributions of a model or a BTM ensemble, for the tasks
    lm.py                those as lm-evaluation-harness models (imports lm_eval: the eval extra)
    tasks.py             lm-eval tasks: finding, running, and keeping each result (TaskCache)
    task_report.py       the task table, the paper's group averages, tasks.json / tasks.md
    checkpoints.py       `btx eval CKPT ... --data DOMAIN=SHARD`
    routing.py           routing statistics (shared with the finetune's logging)
    routing_analysis.py  `btx analyze`'s numbers for one checkpoint on domain data
    routing_report.py    showing and saving them
    analyze.py           `btx analyze`, and the analyze stage of `btx run`

Nothing here knows about runs or recipes' stages: `btx eval RECIPE` is btx.run.evaluation, which
imports this package, never the other way.
"""
