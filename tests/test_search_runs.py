"""Whole searches on a tiny model: pruning, best.yaml, a search killed mid-trial and resumed, two workers on one
storage. Every trial is a ``peftkit train`` process (a few seconds each), so these are slow tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from search_helpers import env, load_study, processes_running, run_search, search_command, search_setup

pytest.importorskip("optuna")
pytestmark = pytest.mark.slow

#: a clear good / bad split: trials with the tiny learning rate do not learn and are pruned against the others
SPACE = {"learning_rate": {"choice": [1.0e-6, 3.0e-2]}, "lora.r": {"choice": [2, 4]}}


def _states(study) -> dict[str, int]:
    counts: dict[str, int] = {}
    for trial in study.get_trials():
        counts[trial.state.name] = counts.get(trial.state.name, 0) + 1
    return counts


def _assert_no_collisions(study, root: Path) -> None:
    trials = study.get_trials()
    numbers = [t.number for t in trials]
    folders = [t.user_attrs["folder"] for t in trials]
    assert len(set(numbers)) == len(numbers)
    assert len(set(folders)) == len(folders), folders
    assert sorted(p.name for p in (root / "out" / "trials").iterdir()) == sorted(Path(f).name for f in folders)
    for trial in trials:
        assert Path(trial.user_attrs["folder"]).name == f"{trial.number:03d}"


def test_six_trials_with_pruning_and_a_best_config_that_trains(tmp_path):
    config, space = search_setup(tmp_path, SPACE, epochs=10)  # 30 steps, an evaluation every 3
    done = run_search(config, space, "--trials", "6", "--sampler", "random")
    assert done.returncode == 0, done.stderr
    study = load_study(tmp_path)
    states = _states(study)
    assert states.get("COMPLETE", 0) + states.get("PRUNED", 0) == 6 and states.get("PRUNED", 0) >= 1, states
    out = tmp_path / "out"
    for trial in study.get_trials():  # every trial is a normal run folder; a pruned one was stopped early
        folder = Path(trial.user_attrs["folder"])
        assert (folder / "config.yaml").is_file()
        assert (folder / "report.json").is_file() == (trial.state.name == "COMPLETE")
        if trial.state.name == "PRUNED":
            assert max(trial.intermediate_values) < 30  # stopped before its end
    summary = json.loads((out / "summary.json").read_text())
    assert summary["states"] == states and summary["best"][0]["number"] == study.best_trial.number
    assert "PRUNED" in done.stdout and f"{study.best_trial.number:03d}" in done.stdout
    for plot in ("history", "parallel_coordinates", "importances"):
        assert (out / "plots" / f"{plot}.png").is_file(), summary["plots"]

    best = yaml.safe_load((out / "best.yaml").read_text())
    assert best["learning_rate"] == study.best_trial.params["learning_rate"]
    assert best["lora"]["r"] == study.best_trial.params["lora.r"]
    again = subprocess.run([sys.executable, "-m", "peftkit.cli", "train", str(out / "best.yaml")], capture_output=True,
                           text=True, env=env(), timeout=300)
    assert again.returncode == 0, again.stderr
    report = json.loads((out / "best" / "report.json").read_text())
    assert report["dev"]["accuracy"] == pytest.approx(study.best_value)  # the same run, trained again


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; trials die with the search on Linux")
def test_search_killed_mid_trial_resumes_with_exactly_n_trials(tmp_path):
    """SIGKILL of the search after trial 0 checkpointed: the rerun fails trial 0, and its re-queued copy trains on
    from that checkpoint (same parameters, in its own folder); the study ends with exactly 3 complete trials."""
    from peftkit.train.checkpoint import complete

    config, space = search_setup(tmp_path, SPACE, epochs=6)  # 18 steps, a checkpoint at each evaluation (every 3)
    args = ("--trials", "3", "--sampler", "random", "--pruner", "none", "--heartbeat", "1")
    search = subprocess.Popen(search_command(config, space, *args), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, env=env())
    first = tmp_path / "out" / "trials" / "000"
    deadline = time.monotonic() + 120
    while not complete(first / "checkpoints"):  # mid-trial: trial 0 has evaluated and checkpointed at least once
        assert time.monotonic() < deadline and search.poll() is None, "trial 000 never got going"
        time.sleep(0.1)
    os.kill(search.pid, signal.SIGKILL)
    search.wait()
    time.sleep(1.0)
    assert processes_running(str(first / "trial.yaml")) == []  # the trial died with the search
    assert not (first / "report.json").exists()
    step = int(complete(first / "checkpoints")[-1].name.split("-")[1])
    assert 3 <= step < 18

    done = run_search(config, space, *args)
    assert done.returncode == 0, done.stderr
    study = load_study(tmp_path)
    states = _states(study)
    assert states == {"COMPLETE": 3, "FAIL": 1}, states  # the killed trial failed, and was run again
    killed = study.get_trials()[0]
    assert killed.state.name == "FAIL"
    retry = [t for t in study.get_trials() if t.system_attrs.get("failed_trial") == 0]
    assert len(retry) == 1 and retry[0].params == killed.params and retry[0].state.name == "COMPLETE"
    assert retry[0].user_attrs["resumed_from"] == {"trial": 0, "step": step}
    log = (Path(retry[0].user_attrs["folder"]) / "train.log").read_text()
    assert f"resumed from step-{step:09d} (step {step}," in log  # trained on from the killed run's checkpoint
    assert f"trial {retry[0].number:03d} resumes trial 000 from its checkpoint at step {step}" in done.stdout
    assert json.loads((Path(retry[0].user_attrs["folder"]) / "report.json").read_text())["steps"] == 18
    _assert_no_collisions(study, tmp_path)
    again = run_search(config, space, *args)  # a finished study: nothing more runs
    assert again.returncode == 0 and len(load_study(tmp_path).get_trials()) == 4


def test_two_jobs_share_one_storage_without_collisions(tmp_path):
    config, space = search_setup(tmp_path, SPACE)
    done = run_search(config, space, "--trials", "4", "--jobs", "2", "--pruner", "none")
    assert done.returncode == 0, done.stderr
    study = load_study(tmp_path)
    assert _states(study) == {"COMPLETE": 4}
    _assert_no_collisions(study, tmp_path)
    starts = sorted((t.datetime_start, t.datetime_complete) for t in study.get_trials())
    assert any(b[0] < a[1] for a, b in zip(starts, starts[1:])), "the two workers never trained at the same time"


def test_multi_objective_gives_a_pareto_front(tmp_path):
    config, space = search_setup(tmp_path, {"lora.r": {"choice": [1, 8]}, "learning_rate": {"choice": [3.0e-2]}})
    done = run_search(config, space, "--trials", "3", "--objectives", "accuracy,trainable_parameters")
    assert done.returncode == 0, done.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["directions"] == ["maximize", "minimize"] and summary["pareto_front"]
    study = load_study(tmp_path)
    assert {t.number for t in study.best_trials} == {b["number"] for b in summary["best"]}
    assert (tmp_path / "out" / "plots" / "pareto_front.png").is_file()
    assert (tmp_path / "out" / "best.yaml").is_file()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_distributed_trials_two_processes_each_with_pruning(tmp_path):
    """--nproc-per-node 2: every trial is a 2-process DDP run (gloo) under torchrun; the study reads the evaluations
    rank 0 writes, prunes the bad trial, and the pruning stops both of its ranks."""
    from peftkit.train.checkpoint import complete

    # 24 steps, evaluated every 3: long enough that the study sees the bad trial's first evaluations while it runs
    config, space = search_setup(tmp_path, {"learning_rate": {"choice": [3.0e-2, 1.0e-6]}}, epochs=12)
    # grid order with sampler seed 1: the good rate first, so that the tiny one is pruned against it
    done = run_search(config, space, "--trials", "2", "--sampler", "grid", "--sampler_seed", "1",
                      "--pruner_startup_trials", "1", "--nproc-per-node", "2")
    assert done.returncode == 0, done.stderr
    assert "2 processes per trial (torchrun)" in done.stdout
    study = load_study(tmp_path)
    trials = study.get_trials()
    assert [t.params["learning_rate"] for t in trials] == [3.0e-2, 1.0e-6], "Optuna's grid order changed"
    assert [t.state.name for t in trials] == ["COMPLETE", "PRUNED"], done.stdout
    for trial in trials:
        folder = Path(trial.user_attrs["folder"])
        assert trial.user_attrs["processes"] == 2
        state = json.loads((complete(folder / "checkpoints")[-1] / "state.json").read_text())
        assert state["world"] == 2  # written by a 2-process run
        assert processes_running(str(folder / "trial.yaml")) == []  # no rank left behind
    assert max(trials[1].intermediate_values) < 24  # stopped before its end (24 steps with 2 processes)
    report = json.loads((Path(trials[0].user_attrs["folder"]) / "report.json").read_text())
    assert report["steps"] == 24  # 48 rows, global batch 2 x 16: 2 steps an epoch, 12 epochs
