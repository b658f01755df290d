"""examples/finfe_to_csv.py: FinFE's JSON lists as clean train/dev/test CSV files (labels named, malformed labels,
repeats, conflicting labels and train/dev copies of evaluated texts dropped); bad input exits 2 with a message."""

from __future__ import annotations

import csv
import importlib.util
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "data" / "fincuge_finfe"


def converter():
    spec = importlib.util.spec_from_file_location("finfe_to_csv", ROOT / "examples" / "finfe_to_csv.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_finfe(folder: Path, train: list, dev: list, test: list) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train_list.json", train), ("eval_list.json", dev), ("test_list.json", test)):
        (folder / name).write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    return folder


def read_csv(path: Path) -> list[tuple[str, str]]:
    with open(path, encoding="utf-8", newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["text", "label"]
    return [tuple(r) for r in rows[1:]]


def test_finfe_is_converted_with_named_labels_and_no_leaks(tmp_path, capsys):
    source = write_finfe(tmp_path / "finfe",
                         train=[["股市大涨", "1"], ["垃圾股，快跑", "0"], ["股市大涨", "1"], ["辰欣药业", "1"],
                                ["辰欣药业", "0.5"], ["今天横盘", "0.5"], ["坏掉了", "=-D310"], ["测试集的话", "0"],
                                ["开发集的话", "1"]],
                         dev=[["开发集的话", "1"], ["稳住", "0.5"]],
                         test=[["测试集的话", "0"], ["又跌了", "0"]])
    assert converter().main([str(source), str(tmp_path / "out")]) == 0
    assert read_csv(tmp_path / "out" / "train.csv") == [("股市大涨", "positive"), ("垃圾股，快跑", "negative"),
                                                        ("今天横盘", "neutral")]
    assert read_csv(tmp_path / "out" / "dev.csv") == [("开发集的话", "positive"), ("稳住", "neutral")]
    assert read_csv(tmp_path / "out" / "test.csv") == [("测试集的话", "negative"), ("又跌了", "negative")]
    out = capsys.readouterr().out
    assert "train: 3 rows" in out and "1 unknown label" in out and "1 conflicting labels" in out
    assert "2 also in a later split" in out
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no temporary file left


@pytest.mark.parametrize("content, problem", [
    ('{"text": "x"}', "expected a JSON array"),
    ('[["股市大涨", 1]]', r"item 0 is \[\"股市大涨\", 1\], expected a \[text, label\] pair of strings"),
    ('[["股市大涨", "1"]', "not a UTF-8 JSON file"),
])
def test_a_malformed_finfe_file_exits_2_naming_it(tmp_path, capsys, content, problem):
    source = write_finfe(tmp_path / "finfe", [], [], [])
    (source / "eval_list.json").write_text(content, encoding="utf-8")
    assert converter().main([str(source), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "eval_list.json" in err and re.search(problem, err), err
    assert not (tmp_path / "out").exists()  # nothing written when an input is bad


def test_a_missing_finfe_folder_exits_2(tmp_path, capsys):
    assert converter().main([str(tmp_path / "nowhere"), str(tmp_path / "out")]) == 2
    assert "train_list.json: no such file" in capsys.readouterr().err


@pytest.mark.skipif(not REAL.is_dir(), reason="../shared/data/fincuge_finfe not present")
def test_the_real_finfe_converts_to_three_disjoint_splits(tmp_path):
    assert converter().main([str(REAL), str(tmp_path)]) == 0
    splits = {name: read_csv(tmp_path / f"{name}.csv") for name in ("train", "dev", "test")}
    assert {name: len(rows) for name, rows in splits.items()} == {"train": 10490, "dev": 1331, "test": 1328}
    texts = {name: {t for t, _ in rows} for name, rows in splits.items()}
    assert not texts["train"] & (texts["dev"] | texts["test"]) and not texts["dev"] & texts["test"]
    assert {label for rows in splits.values() for _, label in rows} == {"negative", "neutral", "positive"}
