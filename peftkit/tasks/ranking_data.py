"""Ranking data: queries with their candidate items, read from JSONL / CSV / TSV files.

Two row shapes, which may be mixed in one file:

- pointwise ``{query, item, label}`` (any of the three formats): rows with the same query text form one query's
  candidate list, in file order; ``label`` is a number >= 0 (0 not relevant; 1 relevant; larger: graded), or
  true/false.
- listwise ``{query, positive, negatives}`` (JSONL): one row is one query's list; ``positive`` is an item or a list
  of items (label 1), ``negatives`` a list of items (label 0). Two such rows with the same query stay two lists
  (a training file may give each positive its own sampled negatives).

Every problem is a ``DataError`` naming the file and line (and column). Column names come from the run config
(``query_column``, ``item_column``, ``label_column``, ``positive_column``, ``negatives_column``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .data import DataError, table_rows


@dataclass(frozen=True)
class Group:
    """One query and its candidates (``labels``: one per item; None when unlabelled)."""

    query: str
    items: tuple[str, ...]
    labels: tuple[float, ...] | None
    line: int  # the query's first line in the file (for messages)


@dataclass(frozen=True)
class RankColumns:
    query: str = "query"
    item: str = "item"
    label: str = "label"
    positive: str = "positive"
    negatives: str = "negatives"

    @classmethod
    def of(cls, config) -> "RankColumns":
        return cls(config.query_column, config.item_column, config.label_column, config.positive_column,
                   config.negatives_column)


def _rows(path: Path):
    return table_rows(path)


def _text(value, where: str, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: {what} must be a non-empty text")
    return value.strip()


def _label(value, where: str) -> float:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        value = {"true": "1", "false": "0"}.get(value.strip().lower(), value.strip())
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if not math.isfinite(number) or number < 0:
        raise DataError(f"{where}: the label {value!r} is not a number >= 0 (0: not relevant, 1: relevant)")
    return number


def read_groups(path: str | Path, columns: RankColumns, labelled: bool = True) -> list[Group]:
    """The queries of a file with their candidates; unlabelled: only the query and item columns are needed."""
    path = Path(path)
    pointwise: dict[str, tuple[int, list[str], list[float]]] = {}  # query -> (first line, items, labels)
    found: list[tuple[int, object]] = []  # (line, a listwise Group or a pointwise query text), in file order
    for line, row in _rows(path):
        where = f"{path}, line {line}"
        if columns.query not in row:
            raise DataError(f"{where}: no column {columns.query!r} (columns: {', '.join(sorted(row))})")
        query = _text(row[columns.query], f"{where}, column {columns.query!r}", "the query")
        if columns.item in row:
            item = _text(row[columns.item], f"{where}, column {columns.item!r}", "the item")
            label = None
            if labelled:
                if columns.label not in row:
                    raise DataError(f"{where}: no column {columns.label!r} beside {columns.item!r} (columns: "
                                    f"{', '.join(sorted(row))}); give each item a label (1 relevant, 0 not)")
                label = _label(row[columns.label], f"{where}, column {columns.label!r}")
            if query not in pointwise:
                pointwise[query] = (line, [], [])
                found.append((line, query))
            pointwise[query][1].append(item)
            pointwise[query][2].append(label)
        elif columns.positive in row or columns.negatives in row:
            found.append((line, _listwise(row, columns, where, query, line, labelled)))
        else:
            raise DataError(f"{where}: no candidates: a row needs {columns.item!r} (with {columns.label!r}) or "
                            f"{columns.positive!r}/{columns.negatives!r} (columns: {', '.join(sorted(row))})")
    groups = []
    for line, entry in found:
        if isinstance(entry, Group):
            groups.append(entry)
        else:
            first, items, labels = pointwise[entry]
            groups.append(Group(entry, tuple(items), tuple(labels) if labelled else None, first))
    if not groups:
        raise DataError(f"{path}: no data rows (only a header?)")
    if labelled:
        for group in groups:
            if not any(label > 0 for label in group.labels):
                raise DataError(f"{path}, line {group.line}: the query has no relevant candidate (label > 0) among "
                                f"its {len(group.items)}; ranking metrics and the loss need one: add it or drop the query")
    return groups


def _listwise(row: dict, columns: RankColumns, where: str, query: str, line: int, labelled: bool) -> Group:
    positive = row.get(columns.positive, [])
    positives = [positive] if isinstance(positive, str) else positive
    negatives = row.get(columns.negatives, [])
    for name, values in ((columns.positive, positives), (columns.negatives, negatives)):
        if not isinstance(values, list):
            raise DataError(f"{where}, column {name!r}: expected a list of item texts (JSONL), got {type(values).__name__}")
    items = [_text(v, f"{where}, column {columns.positive!r}", "each item") for v in positives] + \
        [_text(v, f"{where}, column {columns.negatives!r}", "each item") for v in negatives]
    if not items:
        raise DataError(f"{where}: the query has no candidates ({columns.positive!r} and {columns.negatives!r} are "
                        "empty); give it items to rank or drop the row")
    labels = (1.0,) * len(positives) + (0.0,) * len(negatives)
    return Group(query, tuple(items), labels if labelled else None, line)


def read_candidates(path: str | Path, item_column: str = "item") -> list[dict]:
    """Candidates for ``peftkit rank``: a .txt file (one item per line) or .jsonl/.csv/.tsv rows with
    ``item_column``; each becomes ``{"item": text, **other columns}`` (an id column travels to the output)."""
    path = Path(path)
    if path.suffix.lower() == ".txt" and path.is_file():
        try:
            lines = path.read_bytes().decode("utf-8-sig").splitlines()
        except UnicodeDecodeError as err:
            raise DataError(f"{path}: not valid UTF-8 ({err.reason}); save the file as UTF-8") from None
        out = [{"item": text.strip()} for text in lines if text.strip()]
    else:
        out = []
        for line, row in _rows(path):
            if item_column not in row:
                raise DataError(f"{path}, line {line}: no column {item_column!r} (columns: {', '.join(sorted(row))}); "
                                "name it with --item_column")
            item = _text(row[item_column], f"{path}, line {line}, column {item_column!r}", "the item")
            out.append({**{k: v for k, v in row.items() if k != item_column}, "item": item})
    if not out:
        raise DataError(f"{path}: no candidates in the file")
    return out


def random_split(groups: Sequence[Group], fraction: float, seed: int) -> tuple[list[Group], list[Group]]:
    """(train, dev): a seeded share of the queries held out whole."""
    import random

    order = list(range(len(groups)))
    random.Random(seed).shuffle(order)
    take = max(1, int(round(len(groups) * fraction))) if len(groups) > 1 else 0
    held = set(order[:take])
    return [g for i, g in enumerate(groups) if i not in held], [g for i, g in enumerate(groups) if i in held]
