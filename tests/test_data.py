"""Reading labelled data: formats, checks with file/line/column in the message, label maps, splits, batches."""

from __future__ import annotations

import json

import pytest

from peftkit.tasks import data as D


def write(path, text, encoding="utf-8"):
    path.write_bytes(text.encode(encoding) if isinstance(text, str) else text)
    return path


def test_csv_tsv_jsonl_and_pairs(tmp_path):
    csv = write(tmp_path / "a.csv", 'text,label\n"hello, world",greet\nbye,leave\n')
    tsv = write(tmp_path / "a.tsv", "premise\thypothesis\tlabel\nA man sleeps.\tA person rests.\t0\nA cat.\tA dog.\t2\n")
    jsonl = write(tmp_path / "a.jsonl", '{"text": "hi", "label": 1}\n\n{"text": "yo", "label": 0}\n')
    assert [(e.text, e.label, e.line) for e in D.read_examples(csv, D.Columns())] == [("hello, world", "greet", 2), ("bye", "leave", 3)]
    pairs = D.read_examples(tsv, D.Columns("premise", "label", "hypothesis"))
    assert pairs[0].text_pair == "A person rests." and pairs[1].label == "2"
    assert [e.label for e in D.read_examples(jsonl, D.Columns())] == [1, 0]


@pytest.mark.parametrize("content,columns,message", [
    ("txt,label\nhi,a\n", D.Columns(), r"a.csv, line 2: no column 'text' .*did you mean 'txt'"),
    ("", D.Columns(), r"a.csv: the file is empty"),
    ("text,label\n", D.Columns(), r"no data rows"),
    ("text,label\nhi,a\n,b\n", D.Columns(), r"a.csv, line 3, column 'text': the text is empty"),
    ("text,label\nhi,a\nho,\n", D.Columns(), r"a.csv, line 3, column 'label': the label is missing"),
    ("text,label\nhi,a\nho,b,c\n", D.Columns(), r"a.csv, line 3: 3 fields where the header has 2"),
])
def test_bad_files_name_file_line_and_column(tmp_path, content, columns, message):
    path = write(tmp_path / "a.csv", content)
    with pytest.raises(D.DataError, match=message):
        D.read_examples(path, columns)


def test_encoding_and_mixed_label_types(tmp_path):
    bad = write(tmp_path / "b.csv", b"text,label\nok,a\ncaf\xe9,b\n")
    with pytest.raises(D.DataError, match=r"b.csv, line 3: not valid UTF-8"):
        D.read_examples(bad, D.Columns())
    mixed = write(tmp_path / "m.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": "pos"}\n')
    with pytest.raises(D.DataError, match=r"labels mix types"):
        D.read_examples(mixed, D.Columns())
    with pytest.raises(D.DataError, match=r"line 1: not valid JSON"):
        D.read_examples(write(tmp_path / "j.jsonl", "{oops\n"), D.Columns())
    with pytest.raises(D.DataError, match="no such file"):
        D.read_examples(tmp_path / "none.csv", D.Columns())


def test_label_map_and_unseen_labels(tmp_path):
    train = [D.Example("a", None, "10", 2), D.Example("b", None, "9", 3), D.Example("c", None, "2", 4)]
    labels = D.LabelMap.from_examples(train)
    assert labels.names == ["2", "9", "10"]  # integer-like labels sort numerically
    assert D.LabelMap.from_examples([D.Example("x", None, n, 1) for n in ("b", "a")]).names == ["a", "b"]
    dev = [D.Example("d", None, "9", 2), D.Example("e", None, "7", 5)]
    with pytest.raises(D.DataError, match=r"dev.csv: labels not seen in the training data: '7' \(line 5\)"):
        labels.ids(dev, "dev.csv")
    assert D.LabelMap.from_dict(json.loads(json.dumps(labels.to_dict()))).names == labels.names


def test_stratified_split_is_seeded_and_keeps_shares():
    examples = [D.Example(f"t{i}", None, "a" if i < 80 else "b", i + 2) for i in range(100)]
    train, dev = D.stratified_split(examples, 0.2, seed=3)
    assert len(dev) == 20 and sum(e.label == "b" for e in dev) == 4
    assert {e.text for e in train} | {e.text for e in dev} == {e.text for e in examples}
    assert D.stratified_split(examples, 0.2, seed=3)[1] == dev
    assert D.stratified_split(examples, 0.2, seed=4)[1] != dev


def test_length_batches_cover_everything_once():
    lengths = [(i * 7) % 23 for i in range(103)]
    batches = D.length_batches(lengths, 8, seed=1)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(103)) and all(len(b) <= 8 for b in batches)
    assert D.length_batches(lengths, 8, seed=1) == batches
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches)
    unsorted = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in D.length_batches(lengths, 8, 1, shuffle=False))
    assert spread < unsorted  # similar lengths together: less padding
