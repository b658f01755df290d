"""Ranking end to end on a tiny BERT: a run trains and evaluates (NDCG@10/HR@10/MRR), `peftkit rank` orders
candidates as the in-memory trained model does, every method trains, and bad data exits 2 naming file and line."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from peftkit.cli import main

from workflow_helpers import tiny_model_dir

GENRES = ["comedy", "horror", "romance", "space"]
# what every viewer of this toy world likes: items with a "good" word are the relevant ones, whatever the query
GOOD, BAD = ["classic", "masterpiece", "acclaimed"], ["boring", "awful", "dull"]


def _item(rng: random.Random, good: bool) -> str:
    return f"{rng.choice(GOOD if good else BAD)} {rng.choice(GENRES)} film"


def _write_lists(path: Path, count: int, seed: int, negatives: int = 3) -> Path:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as handle:
        for i in range(count):
            row = {"query": f"a viewer who likes {rng.choice(GENRES)} films", "positive": _item(rng, True),
                   "negatives": [_item(rng, False) for _ in range(negatives)]}
            handle.write(json.dumps(row) + "\n")
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("rank")
    return {"root": root, "model": tiny_model_dir(root), "train": _write_lists(root / "train.jsonl", 80, 0),
            "dev": _write_lists(root / "dev.jsonl", 16, 1, negatives=11)}


def _args(data, out: Path, *extra: str) -> list[str]:
    return ["train", "--task", "ranking", "--model", str(data["model"]), "--train_file", str(data["train"]),
            "--dev_file", str(data["dev"]), "--output_dir", str(out), "--epochs", "6", "--batch_size", "8",
            "--learning_rate", "3e-3", "--max_length", "32", "--pooling", "mean", "--quiet", "true", *extra]


@pytest.fixture(scope="module")
def trained(data):
    """A LoRA ranking run trained without evaluations, so the in-memory model is the saved result."""
    from peftkit.train.config import load
    from peftkit.train.trainer import Trainer

    trainer = Trainer(load(None, _args(data, data["root"] / "run", "--eval_strategy", "no", "--lora.r", "4")[1:]))
    trainer.train()
    return trainer


def test_a_ranking_run_trains_and_ranks_held_out_lists(trained, data, capsys):
    run_dir = data["root"] / "run"
    report = json.loads((run_dir / "report.json").read_text())
    assert report["metric_for_best_model"] == "ndcg_10" and report["dev"]["queries"] == 16
    # one relevant among 12: a random order scores MRR ~0.26; the trained ranker finds the good item
    assert report["dev"]["mrr"] > 0.8 and report["dev"]["ndcg_10"] > 0.8, report["dev"]
    assert main(["eval", "--run", str(run_dir), "--data", str(data["dev"])]) == 0
    out = capsys.readouterr().out
    assert f"NDCG@10 {report['dev']['ndcg_10']:.4f}" in out
    assert json.loads((run_dir / "ranking.json").read_text()) == {"outputs": ["relevance"], "k": 10}


def test_peftkit_rank_orders_candidates_like_the_in_memory_model(trained, data, capsys, tmp_path):
    from peftkit.tasks.ranking_data import Group
    from peftkit.train.folder import no_grad_forward

    items = ["dull horror film", "boring romance film", "classic space film", "awful comedy film",
             "dull space film", "masterpiece horror film", "boring comedy film"]
    (tmp_path / "items.txt").write_text("\n".join(items) + "\n", encoding="utf-8")
    query = "a viewer who likes space films"
    features = trained.task.encode(trained.tokenizer, [Group(query, tuple(items), None, 1)], 32)
    scores = no_grad_forward(trained.task, trained.model.eval(), trained.tokenizer, features, 4)[0].tolist()
    expected = sorted(range(len(items)), key=lambda i: -scores[i])
    assert main(["rank", "--run", str(data["root"] / "run"), "--query", query, "--candidates",
                 str(tmp_path / "items.txt"), "--top", "5"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["item"] for r in rows] == [items[i] for i in expected[:5]]
    assert [r["rank"] for r in rows] == [1, 2, 3, 4, 5]
    for row, i in zip(rows, expected):
        assert row["score"] == pytest.approx(scores[i], abs=1e-5)
    assert rows[0]["item"] in {"classic space film", "masterpiece horror film"}  # it learned what is good
    # .jsonl candidates keep their other columns (an id) in the output
    (tmp_path / "items.jsonl").write_text("".join(json.dumps({"id": i, "item": t}) + "\n" for i, t in enumerate(items)))
    assert main(["rank", "--run", str(data["root"] / "run"), "--query", query, "--candidates",
                 str(tmp_path / "items.jsonl"), "--top", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["id"] == expected[0]


@pytest.mark.parametrize("method", ["head", "bitfit", "dora", "bottleneck"])
def test_every_method_trains_a_ranker(method, data, tmp_path):
    assert main(_args(data, tmp_path / method, "--method", method, "--epochs", "1")) == 0
    report = json.loads((tmp_path / method / "report.json").read_text())
    assert report["dev"]["queries"] == 16 and 0 < report["dev"]["mrr"] <= 1


def test_merge_keeps_the_rankers_scores(trained, data, tmp_path):
    from peftkit.train.run import Run

    assert main(["merge", "--run", str(data["root"] / "run"), "--out", str(tmp_path / "merged")]) == 0
    run, merged = Run(data["root"] / "run"), Run(tmp_path / "merged")
    groups = run.read_file(data["dev"], labelled=False)
    torch.testing.assert_close(merged.logits(groups), run.logits(groups), atol=1e-5, rtol=1e-5)


BAD = [
    ('{"query": "q", "positive": "a"}\n{"query": "q2", "positive": [], "negatives": []}\n',
     "bad.jsonl, line 2: the query has no candidates"),
    ("query,text,label\nq,a,1\n", "bad.csv, line 2: no candidates: a row needs 'item'"),
    ("query,item,label\nq,a,1\nq,b,0\nr,c,0\n", "bad.csv, line 4: the query has no relevant candidate"),
    ("query,item,label\nq,a,yes\n", "bad.csv, line 2, column 'label': the label 'yes' is not a number"),
    ('{"query": "q", "item": "a"}\n', "bad.jsonl, line 1: no column 'label' beside 'item'"),
    ('{"query": "q", "positive": "a", "negatives": "b"}\n', "bad.jsonl, line 1, column 'negatives': expected a list"),
    ('{"query": "q", "positive": "a"}\n', "bad.jsonl, line 1: the query has no negative candidate"),
]


@pytest.mark.parametrize("text,message", BAD)
def test_bad_ranking_data_exits_2_naming_file_and_line(text, message, data, tmp_path, capsys):
    bad = tmp_path / message.split(",")[0]
    bad.write_text(text, encoding="utf-8")
    args = _args(data, tmp_path / "run", "--train_file", str(bad))
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()


def test_rank_bad_input_exits_2(trained, data, tmp_path, capsys):
    run = str(data["root"] / "run")
    (tmp_path / "empty.txt").write_text("\n\n", encoding="utf-8")
    (tmp_path / "c.csv").write_text("title\nx\n", encoding="utf-8")
    cases = [(["--candidates", str(tmp_path / "empty.txt")], "no candidates in the file"),
             (["--candidates", str(tmp_path / "c.csv")], "c.csv, line 2: no column 'item'"),
             (["--candidates", str(tmp_path / "missing.txt")], "missing.txt: no such file"),
             (["--candidates", str(tmp_path / "c.csv"), "--top", "0"], "--top must be at least 1")]
    for extra, message in cases:
        assert main(["rank", "--run", run, "--query", "q", *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
