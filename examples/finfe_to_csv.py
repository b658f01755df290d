"""FinFE (BBT-FinCUGE, Chinese financial social-media sentiment) as CSV files peftkit trains on.

    python examples/finfe_to_csv.py ../shared/data/fincuge_finfe data/finfe
    peftkit train --model gemma3-270m --method lora --train_file data/finfe/train.csv \
        --dev_file data/finfe/dev.csv --test_file data/finfe/test.csv --output_dir runs/finfe

The source folder holds ``train_list.json``, ``eval_list.json`` and ``test_list.json``: each one JSON array of
``[text, label]`` pairs, labels ``"0"`` (negative), ``"0.5"`` (neutral), ``"1"`` (positive). The data are read in
place and never copied into the repository (no licence is stated: research use only). What the conversion does,
following the data's SOURCE.md:

- labels become ``negative`` / ``neutral`` / ``positive``; rows with any other label (one ``"=-D310"`` in train) are
  dropped;
- repeated texts are kept once per file; a text given two different labels in one file is dropped;
- train texts that also occur in dev or test, and dev texts that also occur in test, are dropped from the earlier
  file, so that no evaluated text was trained on.

Writes ``train.csv``, ``dev.csv`` and ``test.csv`` (columns ``text,label``, UTF-8) atomically into the output folder
and prints what was kept and dropped. Exit status 2 with a message for a missing or malformed file.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections import Counter
from pathlib import Path

LABELS = {"0": "negative", "0.5": "neutral", "1": "positive"}
SPLITS = {"train": "train_list.json", "dev": "eval_list.json", "test": "test_list.json"}


class FinFEError(ValueError):
    """A missing or malformed FinFE file; the message names it."""


def read_split(path: Path) -> tuple[list[tuple[str, str]], Counter]:
    """The ``(text, label name)`` rows of one FinFE file, each text once, and a count of what was dropped."""
    if not path.is_file():
        raise FinFEError(f"{path}: no such file (expected the FinFE folder with {', '.join(SPLITS.values())})")
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise FinFEError(f"{path}: not a UTF-8 JSON file ({err})") from None
    if not isinstance(rows, list):
        raise FinFEError(f"{path}: expected a JSON array of [text, label] pairs, found {type(rows).__name__}")
    dropped: Counter = Counter()
    labels_of: dict[str, set[str]] = {}
    for index, row in enumerate(rows):
        if not (isinstance(row, list) and len(row) == 2 and all(isinstance(v, str) for v in row)):
            raise FinFEError(f"{path}: item {index} is {json.dumps(row, ensure_ascii=False)[:80]}, expected a "
                             "[text, label] pair of strings")
        text, label = row[0].strip(), row[1]
        if label not in LABELS or not text:
            dropped["unknown label" if text else "empty text"] += 1
            continue
        if text in labels_of:
            dropped["repeated"] += 1
        labels_of.setdefault(text, set()).add(LABELS[label])
    kept = []
    for text, labels in labels_of.items():  # dicts keep the file's order
        if len(labels) > 1:
            dropped["conflicting labels"] += 1
            continue
        kept.append((text, next(iter(labels))))
    return kept, dropped


def convert(source: Path) -> tuple[dict[str, list[tuple[str, str]]], dict[str, Counter]]:
    """The three splits, cleaned (see the module's docstring), and per split what was dropped."""
    splits, dropped = {}, {}
    for name, file in SPLITS.items():
        splits[name], dropped[name] = read_split(Path(source) / file)
    later: set[str] = set()
    for name in ("test", "dev", "train"):  # a text evaluated later is not trained (or tuned) on earlier
        before = len(splits[name])
        splits[name] = [row for row in splits[name] if row[0] not in later]
        if before - len(splits[name]):
            dropped[name]["also in a later split"] += before - len(splits[name])
        later |= {text for text, _ in splits[name]}
    return splits, dropped


def write_csv(path: Path, rows: list[tuple[str, str]]) -> None:
    """``text,label`` rows, written under a temporary name and renamed into place."""
    from peftkit.atomic import atomic_write

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["text", "label"])
            writer.writerows(rows)

    atomic_write(path, write)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="the FinFE folder (train_list.json, eval_list.json, test_list.json)")
    parser.add_argument("output", help="folder to write train.csv, dev.csv and test.csv into (created if needed)")
    args = parser.parse_args(argv)
    try:
        splits, dropped = convert(Path(args.source))
        out = Path(args.output)
        out.mkdir(parents=True, exist_ok=True)
        for name, rows in splits.items():
            write_csv(out / f"{name}.csv", rows)
    except (FinFEError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for name, rows in splits.items():
        counts = Counter(label for _, label in rows)
        lost = ", ".join(f"{n} {why}" for why, n in sorted(dropped[name].items())) or "none"
        print(f"{name}: {len(rows)} rows ({', '.join(f'{k} {counts[k]}' for k in sorted(counts))}); dropped: {lost}")
    print(f"wrote {', '.join(str(out / f'{name}.csv') for name in splits)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
