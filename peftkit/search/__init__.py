"""``peftkit search``: hyper-parameter search with Optuna over ``peftkit train`` runs.

    space.py    SPACE.yaml: dotted config keys with distributions and conditions, checked before any trial
    values.py   the run config as a plain mapping: dotted keys set on it, a method switch, file paths
    study.py    the study: storage, sampler, pruner, the workers that ask for trials and tell their results
    trial.py    one trial: a ``peftkit train`` subprocess, its dev metric reported as it grows, pruning
    report.py   the table of trials, best.yaml, summary.json and the plots
    command.py  the command line of ``peftkit search``
    launch.py   starts a trial's process (under torchrun when distributed) so that it dies with the search (Linux)

Nothing here is imported by ``import peftkit``; optuna is imported when a search runs.
"""
