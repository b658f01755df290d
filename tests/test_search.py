"""``peftkit search``: the space file and the command line, checked before any trial runs (fast tests; the
searches themselves are in test_search_runs.py)."""

from __future__ import annotations

import pytest
import yaml

from peftkit import cli

pytest.importorskip("optuna")


def _files(tmp_path, space, **config):
    values = {"model": "minilm", "method": "lora", "output_dir": str(tmp_path / "out"), **config}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(values), encoding="utf-8")
    (tmp_path / "space.yaml").write_text(space if isinstance(space, str) else yaml.safe_dump(space, sort_keys=False), encoding="utf-8")
    return str(tmp_path / "base.yaml"), str(tmp_path / "space.yaml")


def _search(tmp_path, capsys, space, *args, **config) -> tuple[int, str]:
    base, space_file = _files(tmp_path, space, **config)
    status = cli.main(["search", base, "--space", space_file, "--trials", "2", *args])
    return status, capsys.readouterr().err


def test_unknown_space_key_exits_2_naming_it_and_the_closest_keys(tmp_path, capsys):
    status, err = _search(tmp_path, capsys, {"learning_rate": {"log": [1e-5, 1e-2]}, "lora.rank": {"choice": [4, 8]}})
    assert status == 2
    assert "'lora.rank'" in err and "did you mean lora.r" in err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()  # refused before anything was created


def test_misspelt_top_level_key_is_named_with_suggestions(tmp_path, capsys):
    status, err = _search(tmp_path, capsys, {"learning_rat": {"log": [1e-5, 1e-2]}})
    assert status == 2 and "'learning_rat'" in err and "learning_rate" in err


@pytest.mark.parametrize("spec, words", [
    ({"learning_rate": {"log": [0, 1e-2]}}, ["learning_rate", "positive low bound"]),
    ({"learning_rate": {"float": [1e-2, 1e-5]}}, ["learning_rate", "low < high"]),
    ({"epochs": {"int": [1.5, 3]}}, ["epochs", "whole-number"]),
    ({"lora.r": {"choice": []}}, ["lora.r", "non-empty list"]),
    ({"lora.r": {"uniform": [1, 4]}}, ["lora.r", "exactly one of log, float, int, choice"]),
    ({"lora.r": 8}, ["lora.r", "expected a distribution"]),
    ({"batch_size": {"int": [0, 8]}}, ["batch_size", "the value 0 is refused by the config"]),
    ({"lora.r": {"float": [2, 9]}}, ["lora.r", "refused by the config"]),  # a float range on an integer key
    ({"method": {"choice": ["lora", "lorax"]}}, ["method", "'lorax'"]),
    ({"output_dir": {"choice": ["a", "b"]}}, ["output_dir", "cannot be searched"]),
    ({"lora.r": {"choice": [4]}, "method": {"choice": ["lora"]}, "lora.alpha": {"choice": [8], "when": {"lora.r": [4]}},
      "learning_rate": {"log": [1e-4, 1e-3], "when": {"epochs": 2, "lora.dropout": [0.1]}}}, None),
])
def test_bad_distributions_exit_2_naming_the_key(tmp_path, capsys, spec, words):
    if words is None:  # a valid space (conditions on sampled and on fixed keys): refused only for a later reason
        status, err = _search(tmp_path, capsys, spec, "--objectives", "nonsense")
        assert status == 2 and "--objectives" in err, err
        return
    status, err = _search(tmp_path, capsys, spec)
    assert status == 2, err
    for word in words:
        assert word in err, err
    assert "Traceback" not in err


def test_condition_listed_before_its_key_and_unknown_condition_keys(tmp_path, capsys):
    status, err = _search(tmp_path, capsys, {"lora.alpha": {"choice": [8], "when": {"lora.r": [4]}},
                                             "lora.r": {"choice": [4, 8]}})
    assert status == 2 and "list lora.r first" in err
    status, err = _search(tmp_path, capsys, {"lora.r": {"choice": [4], "when": {"metod": ["lora"]}}})
    assert status == 2 and "'metod'" in err and "method" in err


def test_objectives_and_pruner_are_checked(tmp_path, capsys):
    space = {"learning_rate": {"log": [1e-5, 1e-2]}}
    status, err = _search(tmp_path, capsys, space, "--objectives", "accuracy,bogus")
    assert status == 2 and "'bogus'" in err and "trainable_parameters" in err
    status, err = _search(tmp_path, capsys, space, "--objectives", "accuracy,trainable_parameters", "--pruner", "median")
    assert status == 2 and "single objective" in err
    status, err = _search(tmp_path, capsys, space, "--objectives", "accuracy", "--direction", "maximize,minimize")
    assert status == 2 and "once per objective" in err
    status, err = _search(tmp_path, capsys, space, "--sampler", "grid")
    assert status == 2 and "grid needs choice or int" in err


def test_method_keys_are_sampled_only_with_their_method(tmp_path):
    """lora.r is sampled in lora trials only; a bitfit trial gets a config without a lora section that validates."""
    from optuna.trial import FixedTrial

    from peftkit.search.space import load_space
    from peftkit.search.values import base_values, with_values
    from peftkit.train.config import load, validate

    base_file, space_file = _files(tmp_path, {
        "method": {"choice": ["lora", "bitfit"]}, "lora.r": {"choice": [4, 16]},
        "learning_rate": {"log": [1e-4, 1e-2], "when": {"method": "bitfit"}}}, lora={"r": 8, "alpha": 16})
    base = base_values(load(base_file, []))
    space = load_space(space_file, base)
    lora = space.sample(FixedTrial({"method": "lora", "lora.r": 16}), base)
    assert lora == {"method": "lora", "lora.r": 16}
    config = validate(with_values(base, lora))
    assert config.section().r == 16 and config.section().alpha == 16  # the base's other lora keys stay
    bitfit = space.sample(FixedTrial({"method": "bitfit", "learning_rate": 1e-3}), base)
    assert bitfit == {"method": "bitfit", "learning_rate": 1e-3}
    config = validate(with_values(base, bitfit))
    assert config.method == "bitfit" and "lora" not in config.to_yaml()


# ------------------------------------------------------------------ the study loop, with trials that do not train
def _fake_trials(monkeypatch, outcome):
    """Trials that write their config and return ``outcome(values)`` at once (no training process)."""
    from peftkit.search import study as S
    from peftkit.search.trial import write_trial_config

    seen = []

    def fake(trial, folder, values, objective, heartbeat, heartbeat_seconds, processes=1, resume=False):
        folder.mkdir(parents=True, exist_ok=True)
        write_trial_config(folder, values)
        heartbeat()
        seen.append({**values, "processes": processes})
        return outcome(values)

    monkeypatch.setattr(S, "run_trial", fake)
    return seen


def test_grid_search_stops_when_every_point_was_tried(tmp_path, capsys, monkeypatch):
    from peftkit.search.trial import Outcome

    seen = _fake_trials(monkeypatch, lambda v: Outcome("complete", [v["lora"]["r"] / 10], 0.1))
    base, space = _files(tmp_path, {"lora.r": {"choice": [2, 4, 8]}})
    assert cli.main(["search", base, "--space", space, "--trials", "5", "--sampler", "grid", "--pruner", "none"]) == 0
    assert sorted(v["lora"]["r"] for v in seen) == [2, 4, 8]  # each point once, then the grid is done
    best = yaml.safe_load((tmp_path / "out" / "best.yaml").read_text())
    assert best["lora"]["r"] == 8 and best["output_dir"] == str((tmp_path / "out" / "best").resolve())
    out = capsys.readouterr().out
    assert "best trial" in out and "optuna-dashboard sqlite:///" in out


def test_trials_failing_in_a_row_stop_the_search_with_exit_2(tmp_path, capsys, monkeypatch):
    from peftkit.search.trial import Outcome

    seen = _fake_trials(monkeypatch, lambda v: Outcome("fail", seconds=0.1, message="peftkit train exited with status 2: data"))
    base, space = _files(tmp_path, {"lora.r": {"choice": [2, 4, 8]}})
    assert cli.main(["search", base, "--space", space, "--trials", "6"]) == 2
    assert len(seen) == 3
    assert "3 trials in a row failed" in capsys.readouterr().err


def test_rerun_with_another_space_is_refused(tmp_path, capsys, monkeypatch):
    from peftkit.search.trial import Outcome

    _fake_trials(monkeypatch, lambda v: Outcome("complete", [0.5], 0.1))
    base, space = _files(tmp_path, {"lora.r": {"choice": [2, 4]}})
    assert cli.main(["search", base, "--space", space, "--trials", "2"]) == 0
    (tmp_path / "space.yaml").write_text("lora.r: {choice: [2, 16]}\n", encoding="utf-8")
    assert cli.main(["search", base, "--space", space, "--trials", "2"]) == 2
    assert "created by another search (its space changed)" in capsys.readouterr().err


def test_config_overrides_after_the_search_options_reach_every_trial(tmp_path, monkeypatch):
    from peftkit.search.trial import Outcome

    seen = _fake_trials(monkeypatch, lambda v: Outcome("complete", [0.5], 0.1))
    base, space = _files(tmp_path, {"lora.r": {"choice": [2, 4]}})
    other = tmp_path / "elsewhere"
    assert cli.main(["search", base, "--space", space, "--trials", "2", "--epochs", "2",
                     "--output_dir", str(other)]) == 0
    assert [v["epochs"] for v in seen] == [2, 2]
    assert all(v["output_dir"].startswith(str(other / "trials")) for v in seen)
    assert (other / "study.db").is_file() and (other / "summary.json").is_file()


def test_grid_with_two_jobs_runs_every_point_exactly_once(tmp_path, monkeypatch):
    """Once every grid point has started, Optuna's GridSampler hands out a running one again: a second worker
    must wait for the last running point instead of training it twice."""
    import time

    from peftkit.search.trial import Outcome

    def slow(values):
        time.sleep(0.4)  # the workers overlap: one asks while the other still trains the last point
        return Outcome("complete", [values["lora"]["r"] / 10], 0.4)

    seen = _fake_trials(monkeypatch, slow)
    base, space = _files(tmp_path, {"lora.r": {"choice": [2, 4, 8]}})
    assert cli.main(["search", base, "--space", space, "--trials", "6", "--sampler", "grid", "--pruner", "none",
                     "--jobs", "2"]) == 0
    assert sorted(v["lora"]["r"] for v in seen) == [2, 4, 8]
    import optuna

    study = optuna.load_study(study_name="search", storage=f"sqlite:///{tmp_path / 'out' / 'study.db'}")
    assert sorted(t.params["lora.r"] for t in study.get_trials()) == [2, 4, 8]


def test_search_under_torchrun_runs_on_rank_0_with_distributed_trials(tmp_path, capsys, monkeypatch):
    """Started by torchrun: rank 1 exits 0 at once with one line and writes nothing; rank 0 runs the study and
    trains each trial with as many processes as torchrun started on its node."""
    from peftkit.search.trial import Outcome

    seen = _fake_trials(monkeypatch, lambda v: Outcome("complete", [0.5], 0.1))
    base, space = _files(tmp_path, {"lora.r": {"choice": [2, 4]}})
    for key, value in {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(key, value)
    assert cli.main(["search", base, "--space", space, "--trials", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "rank 0 drives the search" in out
    assert seen == [] and not (tmp_path / "out").exists()

    monkeypatch.setenv("RANK", "0")
    assert cli.main(["search", base, "--space", space, "--trials", "2"]) == 0
    assert [v["processes"] for v in seen] == [2, 2]
    assert "2 processes per trial (torchrun)" in capsys.readouterr().out


def test_trial_command_and_environment_under_torchrun(monkeypatch):
    """A distributed trial goes through torchrun --standalone; the outer torchrun's variables never reach it."""
    import sys

    from peftkit.search import launch

    assert launch.command(["train", "t.yaml"], 1) == [sys.executable, "-m", "peftkit.search.launch", "train", "t.yaml"]
    assert launch.command(["train", "t.yaml"], 2)[3:] == ["--nproc", "2", "train", "t.yaml"]
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"):
        monkeypatch.setenv(key, "1")
    monkeypatch.setenv("PEFTKIT_KEEP_ME", "yes")
    env = launch.trial_environment(1234)
    assert not {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"} & env.keys()
    assert env["PEFTKIT_KEEP_ME"] == "yes" and env["PEFTKIT_SEARCH_PARENT"] == "1234"


def test_nproc_per_node_is_checked(tmp_path, capsys):
    status, err = _search(tmp_path, capsys, {"lora.r": {"choice": [2, 4]}}, "--nproc-per-node", "0")
    assert status == 2 and "--nproc_per_node must be at least 1" in err


def test_piled_up_evaluations_are_judged_one_by_one(tmp_path):
    """Several evaluations may appear between two polls of a trial; the pruner must see them one at a time, so the
    trial is pruned at the first evaluation it rejects and nothing after it is reported."""
    import json

    from peftkit.search.trial import _report

    step_dir = tmp_path / "checkpoints" / "step-00000012"
    step_dir.mkdir(parents=True)
    history = [{"step": s, "dev_accuracy": v} for s, v in ((3, 0.9), (6, 0.2), (9, 0.2), (12, 0.2))]
    (step_dir / "state.json").write_text(json.dumps({"history": history}))

    class Trial:  # prunes once a value under 0.5 was reported
        def __init__(self):
            self.values = {}

        def report(self, value, step):
            self.values[step] = value

        def should_prune(self):
            return min(self.values.values()) < 0.5

    trial, reported = Trial(), set()
    assert _report(trial, tmp_path, "dev_accuracy", reported, prune_check=True)
    assert trial.values == {3: 0.9, 6: 0.2} and reported == {3, 6}
