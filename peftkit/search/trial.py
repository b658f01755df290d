"""One trial: a normal ``peftkit train`` run in its own process and folder (``output_dir/trials/NNN/``), so that a
crash or a kill of the trial never takes the search down.

The dev metric is read as it grows from the run's newest checkpoint (``checkpoints/step-*/state.json``: the trainer
checkpoints after every evaluation, atomically, with the history so far) and reported to Optuna step by step; when
the pruner says so the process is killed and the trial is PRUNED. The trial's heartbeat is recorded in the storage
while it runs, so a search killed mid-trial leaves a trial that the next run finds stale, fails and re-queues.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from ..atomic import atomic_write
from ..train.folder import CHECKPOINTS_DIR, REPORT_FILE

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


def run_trial(trial, folder: Path, values: dict[str, Any], objective: Objective,
              heartbeat: Callable[[], None], heartbeat_seconds: float) -> Outcome:
    """Train ``values`` in ``folder``; report evaluations to ``trial`` and stop the run when it should be pruned."""
    folder.mkdir(parents=True, exist_ok=True)
    config_file = write_trial_config(folder, values)
    env = dict(os.environ, PEFTKIT_SEARCH_PARENT=str(os.getpid()))
    command = [sys.executable, "-m", "peftkit.search.launch", "train", str(config_file)]
    started = time.monotonic()
    with open(folder / TRIAL_LOG, "ab") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
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
            if key is not None and _report(trial, folder, key, reported) and trial.should_prune():
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


def _report(trial, folder: Path, key: str, reported: set[int]) -> bool:
    """Report the evaluations not reported yet; True when there was a new one."""
    new = [(step, value) for step, value in dev_history(folder, key) if step not in reported]
    for step, value in new:
        trial.report(value, step)
        reported.add(step)
    return bool(new)


def _stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _tail(path: Path, lines: int = 8) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return "\n    " + "\n    ".join(text[-lines:]) + f"\n    (whole log: {path})"
