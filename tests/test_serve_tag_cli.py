"""`peftkit serve --task auto` for real (a subprocess on a free port): a classification run and a token-classification
run, both trained by `peftkit train` on one tiny base, served side by side; /v1/classify and /v1/tag answer what
`peftkit predict` prints for each run, and the texts counter tells the two tasks apart."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from peftkit.cli import main

from serve_helpers import MAX_LENGTH, start_server, stop_server
from serve_tag_helpers import same_rows
from workflow_helpers import intent_rows, tiny_model_dir, write_csv

CLASSIFY_TEXTS = ["please block my card now", "when do you open"]
TAG_TEXTS = ["Yesterday bob went to New York.",
             # more than MAX_LENGTH sub-tokens: windows on both sides
             " ".join(["yesterday alice went to paris and then carol went to berlin ."] * 3)]


def _write_conll(path: Path, count: int, seed: int) -> Path:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as handle:
        for _ in range(count):
            place = rng.choice(["paris", "berlin", "new york"]).split()
            words = ["yesterday", rng.choice(["alice", "bob", "carol"]), "went", "to", *place, "."]
            tags = ["O", "B-person", "O", "O", "B-location", *["I-location"] * (len(place) - 1), "O"]
            handle.write("".join(f"{w}\t{t}\n" for w, t in zip(words, tags)) + "\n")
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_auto")
    model = tiny_model_dir(root)
    adapters = root / "adapters"
    common = ["--model", str(model), "--max_length", str(MAX_LENGTH), "--batch_size", "8", "--quiet", "true",
              "--learning_rate", "5e-3"]
    assert main(["train", *common, "--train_file", str(write_csv(root / "intents.csv", intent_rows(24, 0))),
                 "--pooling", "mean", "--epochs", "2", "--output_dir", str(adapters / "intents")]) == 0
    assert main(["train", *common, "--task", "token-classification", "--epochs", "6",
                 "--train_file", str(_write_conll(root / "train.conll", 24, 0)),
                 "--dev_file", str(_write_conll(root / "dev.conll", 8, 1)), "--output_dir", str(adapters / "ner")]) == 0
    return {"root": root, "model": model, "adapters": adapters}


def _predict(run: Path, texts: list[str], capsys) -> list[dict]:
    """What `peftkit predict --run RUN --text ...` prints (one thread, as the server: the last bits can differ)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        capsys.readouterr()
        assert main(["predict", "--run", str(run), *[a for text in texts for a in ("--text", text)]]) == 0
    finally:
        torch.set_num_threads(threads)
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_served_classify_and_tag_equal_predict_for_each_run(runs, capsys):
    process, client = start_server(runs["model"], runs["adapters"], runs["root"] / "server.log", "--task", "auto")
    try:
        classified = client.post("/v1/classify", json={"adapter": "intents", "texts": CLASSIFY_TEXTS})
        tagged = client.post("/v1/tag", json={"adapter": "ner", "texts": TAG_TEXTS})
        metrics = client.get("/metrics").text
    finally:
        stop_server(process, client)
    assert classified.status_code == 200, classified.text
    assert tagged.status_code == 200, tagged.text
    predicted = _predict(runs["adapters"] / "intents", CLASSIFY_TEXTS, capsys)
    for got, want in zip(classified.json()["predictions"], predicted, strict=True):
        assert got["label"] == want["label"] and got["probabilities"].keys() == want["probabilities"].keys()
        assert all(abs(got["probabilities"][k] - p) <= 1e-5 for k, p in want["probabilities"].items()), (got, want)
    rows = _predict(runs["adapters"] / "ner", TAG_TEXTS, capsys)
    assert ("bob", "person") in [(e["text"], e["type"]) for e in rows[0]["entities"]]  # trained, not noise
    same_rows(tagged.json()["results"], rows)
    # one counter for both tasks: a tagged text is counted as tagged, not classified
    assert 'peftkit_texts_total{adapter="intents",task="classification"} 2.0' in metrics
    assert 'peftkit_texts_total{adapter="ner",task="token-classification"} 2.0' in metrics
