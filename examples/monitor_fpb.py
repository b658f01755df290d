"""The financial sentiment monitor recipe on Financial PhraseBank (CC BY-NC-SA 3.0: non-commercial use only).

    python examples/monitor_fpb.py split                 # runs/fpb-data/{train,dev,test}.csv (seeded, 75% agreement)
    peftkit train examples/monitor_fpb.yaml              # runs/fpb-sentiment
    python examples/monitor_fpb.py stream                # runs/fpb-data/stream.jsonl: a simulated news feed
    peftkit monitor --run runs/fpb-sentiment --input runs/fpb-data/stream.jsonl --rules examples/monitor_fpb.rules \
        --group-by ticker --alerts runs/fpb-data/alerts.jsonl --state runs/fpb-data/state

The stream is built from the test split only (sentences the classifier never saw): four tickers, one news item
every two minutes each; ticker ACME turns negative (share 0.6 instead of the corpus's ~0.12) for records
300-499 of its own, so the rules should fire for ACME there and stay quiet elsewhere. ``stream.truth.json`` lists
the records where ACME's negative phase starts and ends.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "financial_phrasebank"
TICKERS = ["ACME", "BOREAL", "CIRRUS", "DELTA"]
START = 1_735_689_600  # 2025-01-01T00:00:00Z


def read_fpb(path: Path) -> list[tuple[str, str]]:
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        text, _, label = line.rpartition("@")  # the label follows the last @ (SOURCE.md)
        if text.strip() and label in ("negative", "neutral", "positive"):
            rows.append((text.strip(), label))
    return list(dict.fromkeys(rows))  # exact duplicates once


def split(data: Path, out: Path, seed: int = 13) -> None:
    rows = read_fpb(data / "Sentences_75Agree.txt")
    random.Random(seed).shuffle(rows)
    n = len(rows)
    parts = {"train": rows[: int(0.7 * n)], "dev": rows[int(0.7 * n): int(0.8 * n)], "test": rows[int(0.8 * n):]}
    out.mkdir(parents=True, exist_ok=True)
    for name, part in parts.items():
        with open(out / f"{name}.csv", "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["text", "label"])
            writer.writerows(part)
        print(f"{out / name}.csv: {len(part)} rows")


def stream(out: Path, per_ticker: int = 800, seed: int = 7) -> None:
    rng = random.Random(seed)
    with open(out / "test.csv", encoding="utf-8") as handle:
        test = list(csv.DictReader(handle))
    by_label = {label: [r["text"] for r in test if r["label"] == label] for label in ("negative", "neutral", "positive")}
    negative_share = sum(r["label"] == "negative" for r in test) / len(test)
    lines, truth = [], {"ticker": "ACME", "negative_from_record": 300, "negative_until_record": 499,
                        "negative_share_there": 0.6, "negative_share_elsewhere": round(negative_share, 3)}
    for i in range(per_ticker):
        for k, ticker in enumerate(TICKERS):
            share = 0.6 if ticker == "ACME" and 300 <= i < 500 else negative_share
            if rng.random() < share:
                label = "negative"
            else:
                label = "positive" if rng.random() < 0.3 else "neutral"
            lines.append({"time": START + i * 120 + k * 30, "ticker": ticker, "source": "simulated-feed",
                          "text": rng.choice(by_label[label]), "gold": label})
    with open(out / "stream.jsonl", "w", encoding="utf-8") as handle:
        for line in lines:
            handle.write(json.dumps(line, ensure_ascii=False) + "\n")
    (out / "stream.truth.json").write_text(json.dumps(truth, indent=2) + "\n", encoding="utf-8")
    print(f"{out / 'stream.jsonl'}: {len(lines)} records, {len(TICKERS)} tickers; truth in stream.truth.json")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=["split", "stream"])
    parser.add_argument("--data", type=Path, default=DATA, help="the financial_phrasebank folder")
    parser.add_argument("--out", type=Path, default=Path("runs/fpb-data"))
    args = parser.parse_args()
    split(args.data, args.out) if args.step == "split" else stream(args.out)
