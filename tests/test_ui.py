"""`peftkit ui` without a browser: the path guard (symlinks, encodings), run states from the folder, the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from fastapi.testclient import TestClient

from peftkit.ui.app import create_app

ROOT = Path(__file__).resolve().parents[1]


def fake_run(folder: Path, report: dict | None = None, live: dict | None = None) -> Path:
    """A run folder as the trainer leaves it (config.yaml, then live.json while training, report.json at the end)."""
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump({"model": "/models/tiny-bert", "method": "lora",
                                                        "metric_for_best_model": "accuracy"}), encoding="utf-8")
    if live is not None:
        (folder / "live.json").write_text(json.dumps(live), encoding="utf-8")
    if report is not None:
        (folder / "report.json").write_text(json.dumps(report), encoding="utf-8")
    return folder


@pytest.fixture
def client(tmp_path):
    runs = tmp_path / "runs"
    fake_run(runs / "done", report={"metric_for_best_model": "accuracy", "dev": {"accuracy": 0.75}, "steps": 4,
                                    "trainable_share": 0.01, "history": [{"step": 1, "train_loss": 1.0}]})
    import socket

    history = [{"step": 1, "train_loss": 1.2}, {"step": 2, "train_loss": 0.9}, {"step": 2, "dev_loss": 1.0, "dev_accuracy": 0.5}]
    fake_run(runs / "training", live={"state": "running", "pid": os.getpid(), "host": socket.gethostname(), "step": 2,
                                      "total_steps": 10, "started": time.time() - 5, "updated": time.time(),
                                      "seconds": 5.0, "history": history})
    crashed = fake_run(runs / "crashed", live={"state": "running", "pid": 2 ** 22 + 1, "host": socket.gethostname(),
                                               "step": 1, "total_steps": 10, "history": []})
    old = time.time() - 3600
    for path in (crashed / "live.json", crashed / "config.yaml"):
        os.utime(path, (old, old))
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "plot.png").write_bytes(b"\x89PNG secret")
    fake_run(tmp_path / "secret" / "run", report={"dev": {"accuracy": 1.0}})
    return TestClient(create_app(runs)), runs, tmp_path


def test_states_from_the_folder_running_finished_failed(client):
    c, runs, _ = client
    states = {r["path"]: r["state"] for r in c.get("/api/runs").json()["runs"]}
    assert states == {"done": "finished", "training": "running", "crashed": "failed"}
    rows = c.get("/api/runs/rows").text  # what the page's live refresh puts in the table
    assert 'data-run="training" data-state="running"' in rows and "running (2/10)" in rows


def test_a_running_run_shows_its_live_curves_and_refreshes(client):
    c, runs, _ = client
    html = c.get("/run?p=training").text
    assert html.count('<circle class="point"') == 3 + 1  # 3 loss points, 1 dev accuracy point
    assert '<meta http-equiv="refresh" content="5">' in html
    assert 'http-equiv="refresh"' not in c.get("/run?p=done").text


def test_symlinks_out_of_the_runs_folder_are_refused(client):
    c, runs, tmp = client
    (runs / "link-run").symlink_to(tmp / "secret" / "run")
    (runs / "done" / "plots").mkdir()
    (runs / "done" / "plots" / "leak.png").symlink_to(tmp / "secret" / "plot.png")
    assert c.get("/run?p=link-run").status_code == 404
    assert c.get("/file?p=done/plots/leak.png").status_code == 404
    assert "link-run" not in {r["path"] for r in c.get("/api/runs").json()["runs"]}  # not listed either


@pytest.mark.parametrize("path", ["../secret/run", "/etc", "done/../../secret/run", "done\\..\\..", "%2e%2e/secret/run",
                                  "done/\x00"])
def test_paths_outside_are_refused_in_every_spelling(client, path):
    c, _, _ = client
    assert c.get("/run", params={"p": path}).status_code == 404
    assert c.get("/api/run", params={"p": path}).status_code == 404
    assert c.get("/file", params={"p": path + "/plot.png"}).status_code == 404


def test_only_plots_are_served_not_configs_or_weights(client):
    c, runs, _ = client
    assert c.get("/file", params={"p": "done/config.yaml"}).status_code == 404
    (runs / "done" / "plots").mkdir()
    (runs / "done" / "plots" / "loss.png").write_bytes(b"\x89PNG")
    answer = c.get("/file", params={"p": "done/plots/loss.png"})
    assert answer.status_code == 200 and answer.headers["content-type"] == "image/png"


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "peftkit.cli", "ui", *args], capture_output=True, text=True, env=env,
                          timeout=120)


def test_cli_bad_arguments_exit_2_with_the_fix(tmp_path):
    missing = _cli("--runs", str(tmp_path / "nowhere"), "--port", "0")
    assert missing.returncode == 2 and "no such folder" in missing.stderr and "Traceback" not in missing.stderr
    server = _cli("--runs", str(tmp_path), "--server", "localhost:8000")
    assert server.returncode == 2 and "http://127.0.0.1:8000" in server.stderr and "Traceback" not in server.stderr


def test_binds_to_localhost_by_default():
    import argparse

    from peftkit.ui.command import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([])
    assert (args.host, args.port, args.runs) == ("127.0.0.1", 7860, "runs")


def test_ner_run_shows_per_entity_type_table_and_matrix(tmp_path):
    runs = tmp_path / "runs"
    matrix = [[5, 1, 0], [0, 3, 2], [1, 0, 4]]
    fake_run(runs / "ner", report={"metric_for_best_model": "f1", "labels": ["B-LOC", "I-LOC", "O"],
                                   "dev": {"f1": 0.7, "per_type": {"LOC": {"precision": 0.8, "recall": 0.6, "f1-score": 0.69,
                                                                           "support": 10}},
                                           "entity_types": ["LOC", "PER", "O"], "confusion_matrix": matrix}})
    html = TestClient(create_app(runs)).get("/run?p=ner").text
    assert "<th>entity type</th>" in html and "<td>LOC</td><td>0.8</td><td>0.6</td>" in html
    cells = [int(v) for v in __import__("re").findall(r'class="cell" data-row="\d" data-col="\d" data-value="(\d+)"', html)]
    assert cells == [v for row in matrix for v in row]
    assert ">PER</text>" in html  # the matrix is labelled by entity type, not by tag


def test_causal_lm_run_shows_base_vs_adapted_and_generations(tmp_path):
    runs = tmp_path / "runs"
    fake_run(runs / "lm", report={"metric_for_best_model": "perplexity",
                                  "dev": {"loss": 1.5, "perplexity": 4.48}, "base_dev": {"loss": 2.5, "perplexity": 12.18},
                                  "generation": {"base": {"rougeL": 0.1}, "adapted": {"rougeL": 0.4},
                                                 "examples": [{"prompt": "2+2?", "reference": "4", "base": "five <b>",
                                                               "adapted": "4"}]}})
    html = TestClient(create_app(runs)).get("/run?p=lm").text
    assert "<tr><th>perplexity</th><td>12.18</td><td>4.48</td></tr>" in html
    assert "<td>2+2?</td><td>4</td><td>five &lt;b&gt;</td><td>4</td>" in html  # escaped, side by side


def test_bound_to_localhost_it_answers_only_local_host_names(tmp_path):
    from peftkit.ui.app import LOCAL_HOSTS

    fake_run(tmp_path / "runs" / "done", report={"dev": {"accuracy": 0.5}})
    app = create_app(tmp_path / "runs", allowed_hosts=LOCAL_HOSTS)
    assert TestClient(app, base_url="http://127.0.0.1:7860").get("/api/runs").status_code == 200
    assert TestClient(app, base_url="http://localhost:7860").get("/").status_code == 200
    assert TestClient(app, base_url="http://attacker.example").get("/api/runs").status_code == 400  # DNS rebinding


def test_try_it_on_a_causal_lm_run_answers_what_peftkit_generate_answers(tmp_path, monkeypatch, capsys):
    import re
    from html import unescape

    from causal_helpers import chat_rows, tiny_chat_model, write_jsonl
    from peftkit.cli import main

    folder = tiny_chat_model(tmp_path / "tiny")
    write_jsonl(tmp_path / "train.jsonl", chat_rows(24))
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--model", str(folder), "--task", "causal-lm", "--train_file", "train.jsonl", "--output_dir",
                 "runs/lm", "--max_steps", "12", "--batch_size", "8", "--learning_rate", "2e-2", "--quiet", "true",
                 "--eval_generations", "0", "--seed", "1"]) == 0
    capsys.readouterr()
    assert main(["generate", "--run", "runs/lm", "--prompt", "hello there", "--max_new_tokens", "64"]) == 0
    expected = capsys.readouterr().out.strip()
    assert expected  # the tiny model says something
    html = TestClient(create_app(tmp_path / "runs")).get("/try", params={"text": "hello there", "runs": ["lm"]}).text
    (answer,) = re.findall(r'<td class="label">(.*?)</td>', html, re.S)
    assert unescape(answer).strip() == expected
    assert "&quot;finish_reason&quot;" in html  # the whole row of peftkit generate, in the details
