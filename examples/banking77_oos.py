"""BANKING77 with a held-out group of intents: write a train file without them (the test file stays as it is).

The held-out intents are a fixed, documented choice: every 4th intent of the sorted list of the 77 names
(positions 3, 7, 11, ...: 19 intents). In a run with ``ood`` set, their test rows are out of scope (a label unseen
in training), so the run must reject them.

    python examples/banking77_oos.py [--data ../shared/data/banking77] [--out runs/data/banking77_oos]
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "banking77"


def held_out(names: list[str]) -> list[str]:
    """The out-of-scope intents: every 4th of the sorted names, starting at position 3."""
    return sorted(names)[3::4]


def write_train(data: Path, out: Path) -> tuple[int, list[str]]:
    names = json.loads((data / "categories.json").read_text(encoding="utf-8"))
    hidden = set(held_out(names))
    with open(data / "train.csv", encoding="utf-8", newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row["category"] not in hidden]
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".train.csv.tmp"
    with open(tmp, "w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["text", "category"])
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(out / "train.csv")
    (out / "held_out_intents.json").write_text(json.dumps(sorted(hidden), indent=1), encoding="utf-8")
    return len(rows), sorted(hidden)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--out", type=Path, default=Path("runs/data/banking77_oos"))
    args = parser.parse_args()
    count, hidden = write_train(args.data, args.out)
    print(f"{count} train rows of {77 - len(hidden)} intents written to {args.out / 'train.csv'}; "
          f"held out ({len(hidden)}): {', '.join(hidden)}")


if __name__ == "__main__":
    main()
