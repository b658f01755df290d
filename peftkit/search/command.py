"""``peftkit search [CONFIG.yaml] --space SPACE.yaml --trials N [options] [--key value ...]``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..config import ConfigError

USAGE = """peftkit search [CONFIG.yaml] --space SPACE.yaml --trials N [--jobs J] [--storage URL] [--study NAME]
                      [--timeout S] [--objectives a,b] [--direction maximize[,minimize]] [--sampler tpe|random|cmaes|grid]
                      [--pruner median|hyperband|none] [--sampler_seed S] [--nproc_per_node N] [--key value ...]"""

DESCRIPTION = """Search hyper-parameters with Optuna. Every trial is a normal run folder, output_dir/trials/NNN/,
trained by `peftkit train` in its own process; its dev metric is reported at each evaluation so that the pruner can
stop bad trials early. The study is stored in output_dir/study.db (SQLite) unless --storage says otherwise:
rerunning the same command resumes it (a trial cut short by a killed search is failed and queued again), until it
holds N complete + pruned trials. At the end: a table of the trials, output_dir/best.yaml (peftkit train
best.yaml trains the best trial again), output_dir/summary.json and output_dir/plots/. The storage opens in
optuna-dashboard (pip install optuna-dashboard; optuna-dashboard sqlite:///output_dir/study.db).
A trial re-queued after a kill resumes from the killed run's last checkpoint, in its own trial folder.
--nproc_per_node N trains every trial distributed, under torchrun (python -m torch.distributed.run --standalone):
N processes per trial, J x N with --jobs J. Started itself under torchrun, the search runs on rank 0 with as many
processes per trial as torchrun started on its node; the other ranks exit at once.
CONFIG is the base run config (default: the embedded demo, as for peftkit train); the remaining --key value pairs
override it, as for peftkit train.

SPACE.yaml maps dotted config keys to distributions (the whole syntax: peftkit/search/space.py):
    learning_rate: {log: [1.0e-5, 1.0e-2]}
    method: {choice: [lora, dora]}
    lora.r: {choice: [4, 8, 16]}          # lora.* keys are sampled only in lora trials (dora.* in dora trials)
    lora.dropout: {float: [0.0, 0.3], step: 0.05}
    epochs: {int: [1, 4], when: {method: [lora]}}"""

#: objectives besides the task's dev metrics, and the direction each one defaults to
EXTRA_OBJECTIVES = {"trainable_parameters": "minimize", "trainable_share": "minimize", "seconds": "minimize"}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="peftkit search", usage=USAGE, description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("--space", required=True, help="SPACE.yaml: config keys and their distributions")
    p.add_argument("--trials", type=int, required=True, help="complete + pruned trials the study should hold")
    p.add_argument("--resume", action="store_true", help="continue the study (rerunning the same command does anyway)")
    p.add_argument("--jobs", type=int, default=1, help="trials trained at the same time")
    p.add_argument("--storage", help="Optuna storage URL (default: sqlite:///<output_dir>/study.db)")
    p.add_argument("--study", default="search", help="study name in the storage")
    p.add_argument("--timeout", type=float, help="start no new trial after this many seconds")
    p.add_argument("--objectives", help="comma-separated: dev metrics (accuracy, macro_f1, loss...), "
                                        "trainable_parameters, trainable_share, seconds (default: metric_for_best_model)")
    p.add_argument("--direction", help="maximize or minimize, one per objective, comma-separated (default: minimize "
                                       "for loss, trainable_parameters, trainable_share and seconds; maximize otherwise)")
    p.add_argument("--sampler", default="tpe", choices=["tpe", "random", "cmaes", "grid"])
    p.add_argument("--pruner", choices=["median", "hyperband", "none"],
                   help="default: median with one objective, none with several")
    p.add_argument("--pruner_startup_trials", type=int, default=2, help="median: trials finished before any is pruned")
    p.add_argument("--sampler_seed", type=int, default=42, help="seed of the sampler (--seed is the runs' own seed)")
    p.add_argument("--heartbeat", type=int, default=10, help="seconds between a running trial's heartbeats; a trial "
                                                             "silent for twice as long is failed and queued again")
    p.add_argument("--nproc_per_node", "--nproc-per-node", type=int, dest="nproc_per_node",
                   help="processes per trial: more than 1 trains each trial under torchrun (default: 1, or the "
                        "processes per node of the torchrun that started the search)")
    return p


def run(argv: list[str]) -> int:
    argv = list(argv)
    config_file = argv.pop(0) if argv and not argv[0].startswith("-") else None  # as for train: CONFIG comes first
    args, overrides = parser().parse_known_args(argv)
    from .launch import outer_torchrun

    outer = outer_torchrun()
    if outer is not None:  # started under torchrun: one study, driven by rank 0; its trials are distributed instead
        rank, world, local = outer
        if rank != 0:
            print(f"peftkit search: rank {rank} of {world} exits; rank 0 drives the search and runs each trial as "
                  f"{local if args.nproc_per_node is None else args.nproc_per_node} processes", flush=True)
            return 0
        args.nproc_per_node = local if args.nproc_per_node is None else args.nproc_per_node
    from ..train.config import load
    from .report import finish
    from .space import load_space
    from .study import Search, Settings, open_study
    from .values import base_values

    embedded = False
    if config_file is None and not any(a.split("=")[0] == "--train_file" for a in overrides):
        from ..tasks.demo import DATA_DIR

        config_file, embedded = DATA_DIR / "demo.yaml", True
    config = load(config_file, overrides, embedded=embedded)
    processes = 1 if args.nproc_per_node is None else args.nproc_per_node
    for name, value, low in (("--trials", args.trials, 1), ("--jobs", args.jobs, 1), ("--heartbeat", args.heartbeat, 1),
                             ("--nproc_per_node", processes, 1)):
        if value < low:
            raise ConfigError(f"{name} must be at least {low} (got {value})")
    base = base_values(config)
    space = load_space(args.space, base)  # every key and value checked before any trial
    objective = _objective(args, config)
    output_dir = Path(config.output_dir)
    pruner = args.pruner or ("median" if len(objective.names) == 1 else "none")
    settings = Settings(output_dir=output_dir, trials=args.trials, jobs=args.jobs, storage=args.storage,
                        study=args.study, timeout=args.timeout, sampler=args.sampler, pruner=pruner, seed=args.sampler_seed,
                        pruner_startup_trials=args.pruner_startup_trials, heartbeat=args.heartbeat,
                        processes=processes)
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = open_study(settings, space, objective, base)
    print(f"study {settings.study!r} in {settings.storage_url}: {args.trials} trials, {objective.names} "
          f"({', '.join(objective.directions)}), sampler {settings.sampler}, pruner {settings.pruner}"
          + (f", {processes} processes per trial (torchrun)" if processes > 1 else ""), flush=True)
    try:
        Search(study, settings, space, objective, base, say=lambda text: print(text, flush=True)).run()
    except KeyboardInterrupt:  # the running trials die with us; the next run fails and re-queues them
        print("\ninterrupted: rerun the same command to resume the study", file=sys.stderr)
        return 130
    finish(study, settings, objective)
    return 0


def _objective(args, config):
    from ..tasks import get_task
    from .trial import Objective

    task = get_task(config.task)
    names = [n.strip() for n in (args.objectives or config.metric_for_best_model).split(",") if n.strip()]
    allowed = list(dict.fromkeys([*task.best_metrics, *task.curve_metrics, *EXTRA_OBJECTIVES]))
    for name in names:
        if name not in allowed:
            raise ConfigError(f"--objectives: {name!r} is not something a {task.name} run reports; choose from "
                              f"{', '.join(allowed)}")
    if len(set(names)) != len(names):
        raise ConfigError(f"--objectives names an objective twice: {','.join(names)}")
    if args.direction:
        directions = [d.strip() for d in args.direction.split(",")]
        if len(directions) != len(names) or any(d not in ("maximize", "minimize") for d in directions):
            raise ConfigError(f"--direction: give maximize or minimize once per objective ({len(names)}: "
                              f"{', '.join(names)}), comma-separated; got {args.direction!r}")
    else:
        directions = [EXTRA_OBJECTIVES.get(n, "minimize" if n == "loss" else "maximize") for n in names]
    return Objective(names, directions, tuple(task.curve_metrics))
