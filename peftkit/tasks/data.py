"""Labelled text data for training and evaluation: CSV / TSV / JSONL files, label maps, splits, batches.

Every problem with an input file is a ``DataError`` that names the file, the line and the column, raised before
any training starts.
"""

from __future__ import annotations

import csv
import difflib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence


class DataError(ValueError):
    """A data file that cannot be used as given (the message names the file, line and column)."""


@dataclass(frozen=True)
class Example:
    text: str
    text_pair: str | None
    label: object  # str or int as read; None for unlabelled data
    line: int  # 1-based line number in the file (for messages)


@dataclass(frozen=True)
class Columns:
    text: str = "text"
    label: str = "label"
    text_pair: str | None = None


FORMATS = {".csv": "csv", ".tsv": "tsv", ".txt": "tsv", ".jsonl": "jsonl", ".json": "jsonl"}


def read_examples(path: str | Path, columns: Columns, labelled: bool = True) -> list[Example]:
    """Read a CSV, TSV or JSONL file into examples, checking every row."""
    path = Path(path)
    rows = table_rows(path)
    wanted = [c for c in (columns.text, columns.text_pair, columns.label if labelled else None) if c]
    examples = []
    for line, row in rows:
        for column in wanted:
            if column not in row:
                available = sorted(row)
                close = difflib.get_close_matches(column, available, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise DataError(f"{path}, line {line}: no column {column!r} (columns: {', '.join(available)}){hint}")
        text = row[columns.text]
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{path}, line {line}, column {columns.text!r}: the text is empty")
        pair = None
        if columns.text_pair:
            pair = row[columns.text_pair]
            if not isinstance(pair, str) or not pair.strip():
                raise DataError(f"{path}, line {line}, column {columns.text_pair!r}: the text is empty")
        label = row.get(columns.label) if labelled else None
        if labelled and (label is None or (isinstance(label, str) and not label.strip())):
            raise DataError(f"{path}, line {line}, column {columns.label!r}: the label is missing")
        if isinstance(label, str):
            label = label.strip()
        examples.append(Example(text.strip(), pair.strip() if pair else None, label, line))
    if not examples:
        raise DataError(f"{path}: no data rows (only a header?)")
    if labelled:
        _check_label_types(path, examples, columns.label)
    return examples


def _delimited_rows(path: Path, raw: str, delimiter: str):
    reader = csv.reader(raw.splitlines(), delimiter=delimiter, quoting=csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL)
    try:
        header = next(reader)
    except StopIteration:
        raise DataError(f"{path}: the file is empty") from None
    header = [h.strip() for h in header]
    for index, values in enumerate(reader, start=2):
        if not values or all(not v.strip() for v in values):
            continue
        if len(values) != len(header):
            raise DataError(f"{path}, line {index}: {len(values)} fields where the header has {len(header)} "
                            f"({', '.join(header)}); check the quoting or the delimiter")
        yield index, dict(zip(header, values))


def table_rows(path: Path):
    """(line number, row as a dict) of a .csv, .tsv or .jsonl file, every problem a ``DataError`` naming the file
    and line."""
    kind = FORMATS.get(path.suffix.lower())
    if path.is_file() and kind is None:
        raise DataError(f"{path}: unknown file type {path.suffix!r}; use .csv, .tsv or .jsonl")
    raw = read_text(path)
    return jsonl_rows(path, raw) if kind == "jsonl" else _delimited_rows(path, raw, "," if kind == "csv" else "\t")


def read_text(path: Path) -> str:
    """A data file's text (UTF-8, a BOM allowed); a missing, undecodable or empty file is a ``DataError`` naming
    the file (and the line of the first bad byte)."""
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        raw = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = path.read_bytes()[: err.start].count(b"\n") + 1
        raise DataError(f"{path}, line {line}: not valid UTF-8 ({err.reason} at byte {err.start}); "
                        "save the file as UTF-8") from None
    if not raw.strip():
        raise DataError(f"{path}: the file is empty")
    return raw


def jsonl_rows(path: Path, raw: str, fields: str = ""):
    """(line number, object) of each non-blank JSON line; ``fields`` names what an object holds, for the message."""
    for index, text in enumerate(raw.splitlines(), start=1):
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}, line {index}: not valid JSON ({err.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}, line {index}: each line must be a JSON object{' with ' + fields if fields else ''}")
        yield index, row


def _check_label_types(path: Path, examples: list[Example], column: str) -> None:
    kinds = {type(e.label) for e in examples}
    if len(kinds) > 1:
        first = {k: next(e for e in examples if type(e.label) is k) for k in kinds}
        shown = "; ".join(f"line {e.line}: {e.label!r} ({type(e.label).__name__})" for e in first.values())
        raise DataError(f"{path}, column {column!r}: labels mix types ({shown}); use one type for every label")


# ------------------------------------------------------------------------------------------------ labels
class LabelMap:
    """Label name <-> class index. Integer-like labels sort numerically, others alphabetically."""

    def __init__(self, names: Sequence[str], ood=None) -> None:
        self.names = [str(n) for n in names]
        self.index = {name: i for i, name in enumerate(self.names)}
        self.ood = ood  # an ood.OodRule when the run rejects out-of-scope inputs, else None

    @classmethod
    def from_examples(cls, examples: Iterable[Example]) -> "LabelMap":
        labels = {str(e.label) for e in examples}
        numeric = all(_is_int(label) for label in labels)
        return cls(sorted(labels, key=(lambda s: int(s)) if numeric else None))

    def ids(self, examples: Sequence[Example], source: str) -> list[int]:
        """Class index of every example. With an out-of-scope rule, a label unseen in training (the rule's own
        label, or any other) marks an out-of-scope row (-1); without one, it is an error."""
        if self.ood is not None:
            return [self.index.get(str(e.label), -1) for e in examples]
        unseen = {}
        for example in examples:
            if str(example.label) not in self.index:
                unseen.setdefault(str(example.label), example.line)
        if unseen:
            shown = ", ".join(f"{label!r} (line {line})" for label, line in list(unseen.items())[:10])
            raise DataError(f"{source}: labels not seen in the training data: {shown}; "
                            f"training labels: {', '.join(self.names[:30])}")
        return [self.index[str(e.label)] for e in examples]

    def to_dict(self) -> dict:
        return {"labels": self.names, **({"ood": self.ood.to_dict()} if self.ood is not None else {})}

    @classmethod
    def from_dict(cls, data: dict) -> "LabelMap":
        ood = None
        if data.get("ood") is not None:
            from .ood import OodRule

            ood = OodRule.from_dict(data["ood"])
        return cls(data["labels"], ood)

    def __len__(self) -> int:
        return len(self.names)


def _is_int(text: str) -> bool:
    try:
        int(text)
        return True
    except ValueError:
        return False


def stratified_split(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """A seeded split that keeps each label's share; a label with one example stays in train."""
    by_label: dict[str, list[Example]] = {}
    for example in examples:
        by_label.setdefault(str(example.label), []).append(example)
    rng = random.Random(seed)
    train, dev = [], []
    for label in sorted(by_label):
        group = list(by_label[label])
        rng.shuffle(group)
        take = int(round(len(group) * fraction)) if len(group) > 1 else 0
        take = min(max(take, 1 if len(group) > 1 else 0), len(group) - 1)
        dev += group[:take]
        train += group[take:]
    rng.shuffle(train)
    return train, dev


# ----------------------------------------------------------------------------------------------- batches
def length_batches(lengths: Sequence[int], batch_size: int, seed: int, shuffle: bool = True) -> list[list[int]]:
    """Batches of examples of similar length (less padding): sort within pools of 50 batches, then shuffle."""
    order = list(range(len(lengths)))
    rng = random.Random(seed)
    if not shuffle:
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    rng.shuffle(order)
    pool = batch_size * 50
    batches = []
    for start in range(0, len(order), pool):
        chunk = sorted(order[start:start + pool], key=lambda i: lengths[i])
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def encode(tokenizer, examples: Sequence[Example], max_length: int) -> list[dict]:
    """Token ids of every example (no padding: batches are padded to their own longest row)."""
    if not examples:
        return []
    texts = [e.text for e in examples]
    pairs = [e.text_pair for e in examples] if examples and examples[0].text_pair is not None else None
    encoded = tokenizer(texts, pairs, truncation=True, max_length=max_length) if pairs else \
        tokenizer(texts, truncation=True, max_length=max_length)
    keys = list(encoded.keys())
    return [{k: encoded[k][i] for k in keys} for i in range(len(texts))]


def collate(tokenizer, features: Sequence[dict]):
    """Pad a batch dynamically to its longest row."""
    return tokenizer.pad(list(features), padding=True, return_tensors="pt")
