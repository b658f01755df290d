"""The study: Optuna storage (SQLite in the output folder by default), sampler and pruner, and the workers that
ask for a trial, train it in its own process and tell Optuna the result.

Resuming: rerunning the same command opens the same study and runs trials until it holds exactly N COMPLETE +
PRUNED ones. A trial whose search process died (killed mid-trial) stops sending heartbeats; Optuna's
``fail_stale_trials`` marks it FAIL once its grace period is over and ``RetryFailedTrialCallback`` queues a copy
with the same parameters, which the next ``ask`` picks up. Running trials count towards N while they live, so
several workers (``--jobs``, or several commands on one storage) never start more trials than needed; the count
and the ``ask`` happen under one lock (a thread lock and an ``flock`` on a file beside the trials). The re-queued
copy of a killed trial resumes from the killed run's last checkpoint when there is one (trial.adopt_checkpoint).

A grid search asks for a new trial only while some grid point is neither done nor running: Optuna's GridSampler
hands out a running point again once every point has started, which with ``--jobs`` ran the last points twice.
"""

from __future__ import annotations

import fcntl
import threading
import warnings
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import ConfigError
from .space import Space
from .trial import Objective, Outcome, adopt_checkpoint, run_trial
from .values import with_values

TRIALS_DIR = "trials"
LOCK_FILE = ".search.lock"
#: a worker gives up after this many trials in a row that failed (the cause is almost surely not the parameters)
MAX_FAILURES_IN_A_ROW = 3


@dataclass
class Settings:
    output_dir: Path
    trials: int
    jobs: int = 1
    storage: str | None = None
    study: str = "search"
    timeout: float | None = None
    sampler: str = "tpe"
    pruner: str = "median"
    seed: int = 42
    pruner_startup_trials: int = 2
    heartbeat: int = 10
    processes: int = 1  # per trial: more than one runs each trial under torchrun

    @property
    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{(self.output_dir / 'study.db').resolve()}"


def make_sampler(settings: Settings, space: Space, objective: Objective):
    import optuna

    name = settings.sampler
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=settings.seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=settings.seed)
    if name == "grid":
        return _grid_sampler(space.grid(), seed=settings.seed)
    if name == "cmaes":
        if len(objective.names) > 1:
            raise ConfigError("--sampler cmaes optimises one objective; use tpe or random with --objectives")
        try:
            import cmaes  # noqa: F401
        except ImportError:
            raise ConfigError("--sampler cmaes needs the cmaes package: pip install cmaes (or use --sampler tpe)") from None
        return optuna.samplers.CmaEsSampler(seed=settings.seed)
    raise ConfigError(f"--sampler {name!r}: choose tpe, random, cmaes or grid")


def _grid_sampler(grid: dict, seed: int):
    from optuna.samplers import GridSampler

    class Grid(GridSampler):
        """Optuna's grid, without its ``study.stop()`` once every point was visited: that call is meant for
        ``study.optimize`` and fails under ask-and-tell; the workers stop on ``is_exhausted`` themselves."""

        def after_trial(self, study, trial, state, values) -> None:
            return None

        @property
        def grid_size(self) -> int:
            return len(self._all_grids)

    return Grid(grid, seed=seed)


def make_pruner(settings: Settings, objective: Objective):
    import optuna

    if settings.pruner != "none" and len(objective.names) > 1:
        raise ConfigError("pruning needs a single objective (Optuna prunes on one reported value); pass --pruner none "
                          "with --objectives")
    if settings.pruner != "none" and objective.intermediate_key is None:
        raise ConfigError(f"--pruner {settings.pruner}: the objective {objective.names[0]!r} is not reported during "
                          "training (only dev metrics are); pass --pruner none")
    if settings.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=settings.pruner_startup_trials, n_warmup_steps=0)
    if settings.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource="auto", reduction_factor=3)
    if settings.pruner == "none":
        return optuna.pruners.NopPruner()
    raise ConfigError(f"--pruner {settings.pruner!r}: choose median, hyperband or none")


def open_study(settings: Settings, space: Space, objective: Objective, base: dict[str, Any]):
    """Create the study, or open the one the same command created before (a different search is refused)."""
    import optuna

    settings.output_dir.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna, and meant for study.optimize
        warnings.simplefilter("ignore")
        storage = optuna.storages.RDBStorage(
            settings.storage_url, heartbeat_interval=settings.heartbeat,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3))
    study = optuna.create_study(storage=storage, study_name=settings.study, load_if_exists=True,
                                directions=objective.directions, sampler=make_sampler(settings, space, objective),
                                pruner=make_pruner(settings, objective))
    signature = {"space": space.source, "config": base, "objectives": objective.names}
    stored = {key: study.user_attrs.get(key) for key in signature}
    if stored["space"] is None:
        for key, value in signature.items():
            study.set_user_attr(key, value)
    elif stored != signature:
        changed = ", ".join(key for key in signature if stored[key] != signature[key])
        raise ConfigError(f"study {settings.study!r} in {settings.storage_url} was created by another search (its "
                          f"{changed} changed); rerun the same command to resume it, or pass another --study or "
                          "output_dir")
    if list(study.directions) != [optuna.study.StudyDirection[d.upper()] for d in objective.directions]:
        raise ConfigError(f"study {settings.study!r} was created with other directions; pass another --study")
    return study


class Search:
    """J workers (threads, each driving one training process at a time) on one study."""

    def __init__(self, study, settings: Settings, space: Space, objective: Objective, base: dict[str, Any],
                 say=print) -> None:
        self.study, self.settings, self.space, self.objective, self.base = study, settings, space, objective, base
        self.say = say
        self.lock = threading.Lock()
        self.deadline = time.monotonic() + settings.timeout if settings.timeout else None
        self.failures_in_a_row = 0
        self.error: str | None = None
        self.crash: BaseException | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        workers = [threading.Thread(target=self._worker, daemon=True, name=f"search-{i}")
                   for i in range(self.settings.jobs)]
        for worker in workers:
            worker.start()
        for worker in workers:
            while worker.is_alive():
                worker.join(timeout=0.5)
        if self.crash is not None:
            raise self.crash
        if self.error:
            raise ConfigError(self.error)

    @contextmanager
    def _claim(self):
        path = self.settings.output_dir / LOCK_FILE
        with self.lock, open(path, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _next_trial(self):
        """A trial to run, None to wait (others' trials may still finish or fail), or False: done."""
        import optuna
        from optuna.trial import TrialState

        with self._claim():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                optuna.storages.fail_stale_trials(self.study)
            states = [t.state for t in self.study.get_trials(deepcopy=False)]
            done = sum(s in (TrialState.COMPLETE, TrialState.PRUNED) for s in states)
            if done >= self.settings.trials or self.stop.is_set():
                return False
            if self.deadline is not None and time.monotonic() > self.deadline:
                return False
            if done + states.count(TrialState.RUNNING) >= self.settings.trials:
                return None
            if self.settings.sampler == "grid" and TrialState.WAITING not in states:  # a re-queued trial goes first
                free = self._free_grid_points()
                if free == 0:  # every point was tried (False), or is being tried (None: it may still fail)
                    return None if TrialState.RUNNING in states else False
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                trial = self.study.ask()
            self.study._storage.record_heartbeat(trial._trial_id)
            return trial

    def _free_grid_points(self) -> int:
        """Grid points no trial has taken yet (a failed point counts as tried, as for Optuna; a killed one comes
        back as a WAITING copy with its grid point)."""
        taken = {t.system_attrs["grid_id"] for t in self.study.get_trials(deepcopy=False) if "grid_id" in t.system_attrs}
        return self.study.sampler.grid_size - len(taken)

    def _worker(self) -> None:
        try:
            while True:
                trial = self._next_trial()
                if trial is False:
                    return
                if trial is None:
                    time.sleep(1.0)
                    continue
                self._run(trial)
        except BaseException as err:  # a worker's error ends the search (the others stop after their trial)
            self.crash = self.crash or err
            self.stop.set()

    def _run(self, trial) -> None:
        from optuna.trial import TrialState

        try:
            self._train(trial)
        except BaseException:
            self.study.tell(trial, state=TrialState.FAIL)  # never left RUNNING by a bug of ours
            raise

    def _folder(self, number: int) -> Path:
        return self.settings.output_dir / TRIALS_DIR / f"{number:03d}"

    def _adopt(self, trial, folder: Path) -> bool:
        """For the re-queued copy of a killed trial: take over that run's last checkpoint; True when there is one."""
        storage = self.study._storage
        retried = storage.get_trial(trial._trial_id).system_attrs.get("retry_history") or []
        if not retried:
            return False
        step = adopt_checkpoint(self._folder(retried[-1]), folder, self.settings.processes)
        if step is None:
            trial.set_user_attr("resumed_from", None)  # not the killed copy's, which the retry inherited
            return False
        trial.set_user_attr("resumed_from", {"trial": retried[-1], "step": step})
        self.say(f"trial {trial.number:03d} resumes trial {retried[-1]:03d} from its checkpoint at step {step}")
        return True

    def _train(self, trial) -> None:
        from optuna.trial import TrialState

        sampled = self.space.sample(trial, self.base)
        folder = self._folder(trial.number)
        trial.set_user_attr("folder", str(folder))
        trial.set_user_attr("processes", self.settings.processes)
        values = with_values(self.base, {**sampled, "output_dir": str(folder), "quiet": True})
        storage = self.study._storage
        resume = self._adopt(trial, folder)
        outcome: Outcome = run_trial(trial, folder, values, self.objective,
                                     heartbeat=lambda: storage.record_heartbeat(trial._trial_id),
                                     heartbeat_seconds=self.settings.heartbeat / 2,
                                     processes=self.settings.processes, resume=resume)
        trial.set_user_attr("seconds", round(outcome.seconds, 3))
        if outcome.state == "complete":
            self.study.tell(trial, outcome.values)
            self.failures_in_a_row = 0
        elif outcome.state == "pruned":
            self.study.tell(trial, state=TrialState.PRUNED)
            self.failures_in_a_row = 0
        else:
            trial.set_user_attr("error", outcome.message[-2000:])
            self.study.tell(trial, state=TrialState.FAIL)
            self.failures_in_a_row += 1
            if self.failures_in_a_row >= MAX_FAILURES_IN_A_ROW:
                self.error = (f"{self.failures_in_a_row} trials in a row failed; the last one: trial {trial.number} "
                              f"({folder}): {outcome.message}")
                self.stop.set()
        shown = ", ".join(f"{k}={_short(v)}" for k, v in sampled.items())
        if outcome.state == "complete":
            detail = ", ".join(f"{n} {v:.4g}" for n, v in zip(self.objective.names, outcome.values))
        else:
            detail = outcome.message.splitlines()[0] if outcome.message else ""
        self.say(f"trial {trial.number:03d} {outcome.state:<8} {outcome.seconds:6.1f}s  {detail}  [{shown}]")


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)
