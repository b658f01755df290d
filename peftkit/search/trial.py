"""One trial: a normal ``peftkit train`` run in its own process and folder (``output_dir/trials/NNN/``), so that a
crash or a kill of the trial never takes the search down.

The dev metric is read as it grows from the run's newest checkpoint (``checkpoints/step-*/state.json``: the trainer
checkpoints after every evaluation, atomically, with the history so far) and reported to Optuna step by step; when
the pruner says so the process is killed and the trial is PRUNED. The trial's heartbeat is recorded in the storage
while it runs, so a search killed mid-trial leaves a trial that the next run finds stale, fails and re-queues.

A trial is distributed when the search says so (``processes`` > 1: torchrun, see launch.py); it runs in a process
group of its own, which a pruning stops whole. A re-queued trial adopts the killed one's run folder when it holds
a complete checkpoint (``adopt_checkpoint``): the folder is copied into the new trial's own ``trials/NNN/`` and
trained on with ``peftkit train --resume``, so every trial number keeps its own folder and the killed trial's
folder stays as it was left.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from ..atomic import atomic_write
from ..train.checkpoint import complete
from ..train.folder import CHECKPOINTS_DIR, REPORT_FILE
from ..train.tracking import LIVE_FILE
from .launch import command, trial_environment

TRIAL_CONFIG = "trial.yaml"
TRIAL_LOG = "train.log"
POLL_SECONDS = 0.25


@dataclass
class Outcome:
    state: str  # "complete", "pruned" or "fail"
    values: list[float] = field(default_factory=list)
    seconds: float = 0.0
    message: str = ""
    exit_status: int | None = None


@dataclass
class Objective:
    """What a finished run is scored on: dev metrics (``accuracy``, ``loss``...), ``trainable_parameters``,
    ``trainable_share`` or ``seconds`` (the trial's wall time)."""

    names: list[str]
    directions: list[str]
    curve_metrics: tuple[str, ...] = ()

    @property
    def intermediate_key(self) -> str | None:
        """The history key reported at each evaluation (the first objective, when it is a dev metric)."""
        first = self.names[0]
        if len(self.names) > 1:  # Optuna takes intermediate values (and prunes) with one objective only
            return None
        return f"dev_{first}" if first == "loss" or first in self.curve_metrics else None

    def values(self, report: dict, seconds: float) -> list[float]:
        out = []
        for name in self.names:
            if name == "seconds":
                out.append(seconds)
            elif name in ("trainable_parameters", "trainable_share"):
                out.append(float(report[name]))
            elif name in report.get("dev", {}):
                out.append(float(report["dev"][name]))
            else:
                raise KeyError(f"the run's report has no dev {name!r} (is there a dev set?)")
        return out


def write_trial_config(folder: Path, values: dict[str, Any]) -> Path:
    path = folder / TRIAL_CONFIG
    text = yaml.safe_dump(values, sort_keys=False, allow_unicode=True)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return path


def dev_history(folder: Path, key: str) -> list[tuple[int, float]]:
    """(step, value) of every evaluation so far, from the newest complete checkpoint (read only: the trainer
    renames checkpoints into place whole, and may drop old ones while we read, so a vanished one is skipped)."""
    root = folder / CHECKPOINTS_DIR
    try:
        found = sorted((p for p in root.iterdir() if p.name.startswith("step-")), key=lambda p: p.name, reverse=True)
    except OSError:
        return []
    for path in found:
        try:
            state = json.loads((path / "state.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        return [(h["step"], float(h[key])) for h in state.get("history", []) if key in h]
    return []


def adopt_checkpoint(previous: Path, folder: Path, processes: int) -> int | None:
    """Copy the run folder of a killed trial into ``folder`` when it holds a complete checkpoint written by as many
    processes as this trial will have; the checkpoint's step, or None (then the trial starts from scratch)."""
    found = complete(previous / CHECKPOINTS_DIR)
    if not found:
        return None
    try:
        state = json.loads((found[-1] / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if state.get("world", 1) != processes:  # train --resume refuses another process count
        return None
    # the killed run's best/, labels, plots... come along: the resumed run keeps its best model so far
    shutil.copytree(previous, folder, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns(TRIAL_LOG, TRIAL_CONFIG, LIVE_FILE))
    return int(state["step"])


def run_trial(trial, folder: Path, values: dict[str, Any], objective: Objective,
              heartbeat: Callable[[], None], heartbeat_seconds: float, processes: int = 1,
              resume: bool = False) -> Outcome:
    """Train ``values`` in ``folder`` (as ``processes`` torchrun workers when more than one; from the folder's last
    checkpoint with ``resume``); report evaluations to ``trial`` and stop the run when it should be pruned."""
    folder.mkdir(parents=True, exist_ok=True)
    config_file = write_trial_config(folder, values)
    argv = command(["train", str(config_file), *(["--resume"] if resume else [])], processes)
    started = time.monotonic()
    with open(folder / TRIAL_LOG, "ab") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env=trial_environment(os.getpid()), start_new_session=os.name == "posix")
        reported: set[int] = set()
        last_beat = 0.0
        key = objective.intermediate_key
        while True:
            status = process.poll()
            if time.monotonic() - last_beat >= heartbeat_seconds:
                heartbeat()
                last_beat = time.monotonic()
            if status is not None:  # finished (a run that got to its end is scored whole, never pruned)
                break
            if key is not None and _report(trial, folder, key, reported, prune_check=True):
                _stop(process)
                return Outcome("pruned", seconds=time.monotonic() - started,
                               message=f"pruned after step {max(reported)}")
            time.sleep(POLL_SECONDS)
    seconds = time.monotonic() - started
    if key is not None:
        _report(trial, folder, key, reported)  # the evaluations of the last moments, for the plots
    if status != 0:
        return Outcome("fail", seconds=seconds, exit_status=status,
                       message=f"peftkit train exited with status {status}: {_tail(folder / TRIAL_LOG)}")
    try:
        report = json.loads((folder / REPORT_FILE).read_text(encoding="utf-8"))
        return Outcome("complete", objective.values(report, seconds), seconds)
    except (OSError, ValueError, KeyError) as err:
        return Outcome("fail", seconds=seconds, message=f"{folder / REPORT_FILE}: {err}")


def _report(trial, folder: Path, key: str, reported: set[int], prune_check: bool = False) -> bool:
    """Report the evaluations not reported yet, oldest first. With ``prune_check``: stop at the first one after
    which the pruner would prune, and return True (several evaluations may have piled up between two polls: the
    decision must not depend on that)."""
    for step, value in dev_history(folder, key):
        if step in reported:
            continue
        trial.report(value, step)
        reported.add(step)
        if prune_check and trial.should_prune():
            return True
    return False


def _stop(process: subprocess.Popen) -> None:
    """Stop the trial's whole process group (torchrun's agent and what it started; its workers, in sessions of their
    own, die with the agent): SIGTERM, then SIGKILL after 10 s."""
    _signal(process, signal.SIGTERM)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        _signal(process, signal.SIGKILL)
        process.wait()
    _signal(process, signal.SIGKILL)  # anything of the group still there


def _signal(process: subprocess.Popen, number: int) -> None:
    try:
        if os.name == "posix":
            os.killpg(process.pid, number)
        elif process.poll() is None:
            process.send_signal(number)
    except (ProcessLookupError, PermissionError):
        pass


def _tail(path: Path, lines: int = 8) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return "\n    " + "\n    ".join(text[-lines:]) + f"\n    (whole log: {path})"
