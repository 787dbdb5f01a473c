"""Recipes: the typed schema of experiment and domain YAML files, loading them, and their hashes.

schema.py      the experiment recipe's sections (dataclasses), each with its `check` (start here to add a setting)
domain_schema.py  the domain recipe's sections (data:, train:)
task_entries.py   the entries of eval.tasks and their check
settings.py    `setting`: a field that is also a command-line flag; the flags made from such fields
check.py       the Checker that sections state their ranges with
load.py        load_experiment / load_domain: strict loading, overrides, paths, base:, effective settings
typecheck.py   plain YAML values against the schema's types (one-line errors, old key names)
experiment.py  the loaded objects (Experiment, Domain, Source) and recipe hashes
builtin.py     the recipes btx ships (`btx run demo`)
"""
