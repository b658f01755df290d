"""peftkit monitor as a process: SIGKILL mid-stream and restart (no repeated alert, no missed record), and the
real command on a tiny trained run (the same inference path as peftkit predict)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from monitor_helpers import read_alerts, stream, write_lines

HERE = Path(__file__).parent
RULES = ["--rule", "share(negative) > 0.35 over 50 for 2 windows", "--rule", "count(negative) >= 25 in 5m every 1m"]
SHARES = [0.2, 0.5, 0.5, 0.5, 0.1, 0.5, 0.5, 0.2, 0.6, 0.6, 0.1, 0.5, 0.5, 0.5, 0.2, 0.6, 0.6, 0.6, 0.1, 0.5]


def _start(data: Path, out: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": f"{HERE.parent}{os.pathsep}{HERE}"}
    return subprocess.Popen([sys.executable, str(HERE / "monitor_helpers.py"), "--input", str(data), "--alerts",
                             str(out / "alerts.jsonl"), "--state", str(out / "state"), *RULES, *extra],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _line(state: Path) -> int:
    try:
        return json.loads((state / "state.json").read_text())["input"]["line"]
    except (OSError, ValueError):
        return 0


def test_sigkill_and_restart_neither_repeats_an_alert_nor_misses_a_record(tmp_path):
    records = stream(SHARES, per_window=50, seconds=6)  # 1,000 records, 50 every 5 minutes
    data = write_lines(tmp_path / "in.jsonl", records)
    reference = tmp_path / "reference"
    done = _start(data, reference, "--batch", "7")
    assert done.wait(120) == 0, done.stderr.read()
    expected = read_alerts(reference / "alerts.jsonl")
    assert len(expected) >= 6  # both rules fire several times: the stream crosses up and down

    killed = tmp_path / "killed"
    kills = 0
    for stop_at in (230, 610):  # kill twice, mid-stream, while batches (of a slow model) are being processed
        process = _start(data, killed, "--batch", "7", "--sleep", "0.03")
        deadline = time.time() + 120
        while _line(killed / "state") < stop_at and process.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        assert process.poll() is None, "the monitor finished before it could be killed"
        process.send_signal(signal.SIGKILL)
        process.wait()
        kills += 1
        assert 0 < _line(killed / "state") < len(records)
    final = _start(data, killed, "--batch", "7")
    assert final.wait(120) == 0, final.stderr.read()
    got = read_alerts(killed / "alerts.jsonl")
    assert [a["id"] for a in got] == [a["id"] for a in expected]  # none repeated, none missed, same order
    assert got == expected  # the same windows: same counts, shares and examples
    state = json.loads((killed / "state" / "state.json").read_text())
    assert state["totals"]["records"] == len(records) and state["input"]["line"] == len(records)
    assert kills == 2


def test_sigterm_stops_after_the_batch_with_the_state_saved(tmp_path):
    data = write_lines(tmp_path / "in.jsonl", stream(SHARES, per_window=50))
    process = _start(data, tmp_path, "--follow", "--poll", "0.05")
    deadline = time.time() + 60
    while _line(tmp_path / "state") < 1000 and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    assert process.wait(30) == 0
    assert "1000 records classified" in process.stderr.read()


# -------------------------------------------------------------------------------- a real run, the real CLI
@pytest.fixture(scope="module")
def intent_run(tmp_path_factory):
    from peftkit.cli import main
    from workflow_helpers import intent_rows, tiny_model_dir, write_csv

    root = tmp_path_factory.mktemp("monitor-run")
    train = write_csv(root / "train.csv", intent_rows(60, seed=1))
    dev = write_csv(root / "dev.csv", intent_rows(15, seed=2))
    run = root / "run"
    assert main(["train", "--model", str(tiny_model_dir(root)), "--train_file", str(train), "--dev_file", str(dev),
                 "--output_dir", str(run), "--epochs", "6", "--batch_size", "8", "--quiet", "true", "--max_length",
                 "16", "--lora.r", "4", "--learning_rate", "2e-2", "--pooling", "mean"]) == 0
    return run


def test_the_command_on_a_trained_run_alerts_on_what_predict_says(intent_run, tmp_path, capsys):
    from peftkit.cli import main
    from peftkit.train.run import Run
    from workflow_helpers import intent_rows

    texts = [text for text, _ in intent_rows(120, seed=7)]
    rows = [{"text": t, "entity": "bank"} for t in texts]
    data = write_lines(tmp_path / "in.jsonl", rows[:40] + ["not json"] + rows[40:])
    alerts = tmp_path / "alerts.jsonl"
    code = main(["monitor", "--run", str(intent_run), "--input", str(data), "--alerts", str(alerts), "--group-by",
                 "entity", "--rule", "share(card) >= 0.4 over 10", "--batch", "16"])
    assert code == 0, capsys.readouterr().err
    assert "line 41: skipped, not JSON" in capsys.readouterr().err
    # what peftkit predict says about the same texts, windows of 10 computed here: fire on each crossing
    run = Run(intent_run)
    labels = [r["label"] for r in run.predict(run.task.inputs(texts))]
    holds = [labels[i:i + 10].count("card") / 10 >= 0.4 for i in range(0, 120, 10)]
    expected = [i for i, h in enumerate(holds) if h and (i == 0 or not holds[i - 1])]
    got = read_alerts(alerts)
    assert [a["counts"].get("card", 0) for a in got] == [labels[i * 10:i * 10 + 10].count("card") for i in expected]
    assert 0 < len(got) < len(holds) and all(a["group"] == "bank" for a in got)

    code = main(["monitor", "--run", str(intent_run), "--input", str(data), "--rule", "share(cards) >= 0.4 over 10"])
    err = capsys.readouterr().err
    assert code == 2 and "label 'cards' is not one of the run's labels (card, hours, refund)" in err
