"""MovieLens (ml-latest-small) -> ranking files for ``task: ranking`` (research / non-commercial use only: see the
data's SOURCE.md and README.txt; nothing of the data is kept in this repository).

    python examples/recsys_movielens/prepare.py --source ../shared/data/movielens_latest_small --out runs/movielens_data

- item text: "title. genres: a, b. tags: x, y" (the tags every user gave the movie, most frequent first);
- each user's ratings sorted by time (timestamp, then movieId); the last ``k`` are held out (test);
- a user's profile text: their highest-rated items before the window being predicted (ties: the most recent);
- positives: ratings >= 4 in the window; candidates of a held-out user: their held-out positives + ``negatives``
  items sampled (seeded per user) from the rated movies the user never rated;
- train: for each user, the ``train_windows`` windows of ``k`` ratings before the test window, each predicted from
  the ratings before it; one listwise row per positive with ``train_negatives`` sampled negatives;
- dev: the window just before the test window for a seeded share of users (``dev_share``), who give no train rows.

Writes train.jsonl, dev.jsonl, test.jsonl (listwise rows: query, positive, negatives, user), items.jsonl (every
movie: id, item) and popularity.json (rating counts outside every held-out window, for the popularity baseline).
"""

from __future__ import annotations

import argparse
import csv
import json
import random
from collections import Counter, defaultdict
from pathlib import Path

POSITIVE = 4.0


def _csv(path: Path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


def item_texts(source: Path, max_tags: int = 8) -> dict[int, str]:
    tags: dict[int, Counter] = defaultdict(Counter)
    if (source / "tags.csv").is_file():
        for row in _csv(source / "tags.csv"):
            tags[int(row["movieId"])][row["tag"].strip().lower()] += 1
    texts = {}
    for row in _csv(source / "movies.csv"):
        movie = int(row["movieId"])
        genres = [g for g in row["genres"].split("|") if g and g != "(no genres listed)"]
        text = row["title"].strip() + (f". genres: {', '.join(genres)}" if genres else "")
        top = [t for t, _ in sorted(tags[movie].items(), key=lambda kv: (-kv[1], kv[0]))[:max_tags]]
        texts[movie] = text + (f". tags: {', '.join(top)}" if top else "")
    return texts


def user_histories(source: Path) -> dict[int, list[tuple[int, int, float]]]:
    """Each user's (timestamp, movieId, rating), oldest first."""
    users: dict[int, list] = defaultdict(list)
    for row in _csv(source / "ratings.csv"):
        users[int(row["userId"])].append((int(row["timestamp"]), int(row["movieId"]), float(row["rating"])))
    return {user: sorted(rows) for user, rows in sorted(users.items())}


def profile(history: list[tuple[int, int, float]], texts: dict[int, str], size: int) -> str:
    """The user's ``size`` highest-rated items of ``history`` (ties: the most recent first), titles and genres."""
    best = sorted(history, key=lambda r: (-r[2], -r[0], r[1]))[:size]
    return "liked: " + "; ".join(texts[m].split(". tags:")[0] for _, m, _ in best)


def prepare(source: Path, out: Path, k: int = 10, negatives: int = 50, train_negatives: int = 3,
            profile_items: int = 5, min_history: int = 5, train_windows: int = 2, dev_share: float = 0.1,
            dev_negatives: int = 20, seed: int = 0, max_users: int | None = None) -> dict:
    texts = item_texts(source)
    users = user_histories(source)
    if max_users:
        users = dict(list(users.items())[:max_users])
    rated = sorted({m for rows in users.values() for _, m, _ in rows})
    ids = list(users)
    dev_users = set(random.Random(f"{seed}:dev").sample(ids, int(round(len(ids) * dev_share))))
    popularity: Counter = Counter()
    rows = {"train": [], "dev": [], "test": []}

    def candidates(user: int, split: str, count: int, seen: set[int]) -> list[str]:
        pool = [m for m in rated if m not in seen]
        return [texts[m] for m in random.Random(f"{seed}:{split}:{user}").sample(pool, min(count, len(pool)))]

    for user, history in users.items():
        seen = {m for _, m, _ in history}
        windows = []  # (split, history before, the window's ratings); test = the last k
        for w in range(0, 1 + (1 if user in dev_users else train_windows)):
            end = len(history) - w * k
            if end - k < min_history:
                break
            split = "test" if w == 0 else ("dev" if user in dev_users else "train")
            windows.append((split, history[:end - k], history[end - k:end]))
        # popularity (a baseline's score) sees no held-out rating: not the test window, nor a dev user's dev window
        popularity.update(m for _, m, _ in history[:max(0, len(history) - k * (2 if user in dev_users else 1))])
        for split, before, window in windows:
            positives = [texts[m] for _, m, r in window if r >= POSITIVE]
            if not positives:
                continue
            query = profile(before, texts, profile_items)
            if split == "train":
                for n, item in enumerate(positives):
                    sample = candidates(user, f"train{len(before)}:{n}", train_negatives, seen)
                    rows[split].append({"query": query, "positive": item, "negatives": sample, "user": user})
            else:
                count = negatives if split == "test" else dev_negatives
                rows[split].append({"query": query, "positive": positives, "negatives": candidates(user, split, count, seen),
                                    "user": user})
    out.mkdir(parents=True, exist_ok=True)
    for split, lines in rows.items():
        _write_jsonl(out / f"{split}.jsonl", lines)
    _write_jsonl(out / "items.jsonl", [{"id": m, "item": texts[m]} for m in rated])
    by_text = {texts[m]: popularity[m] for m in rated}
    (out / "popularity.json").write_text(json.dumps(by_text, ensure_ascii=False), encoding="utf-8")
    return {split: len(lines) for split, lines in rows.items()}


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)  # atomic: a reader never sees half a file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # the defaults size one LoRA epoch and both test evaluations for a 2-core CPU (tens of minutes, not hours)
    parser.add_argument("--source", default="../shared/data/movielens_latest_small", help="folder with ratings.csv etc.")
    parser.add_argument("--out", default="runs/movielens_data", help="output folder (runs/ is ignored by git)")
    parser.add_argument("--k", type=int, default=10, help="ratings per user held out (the last k by time)")
    parser.add_argument("--negatives", type=int, default=50, help="sampled unseen items per test user")
    parser.add_argument("--dev_negatives", type=int, default=20)
    parser.add_argument("--train_negatives", type=int, default=3, help="sampled negatives per training positive")
    parser.add_argument("--train_windows", type=int, default=2, help="windows of k ratings per user used for training")
    parser.add_argument("--profile_items", type=int, default=5,
                        help="highest-rated earlier items in a profile (5 keep a pair near 110 tokens)")
    parser.add_argument("--max_users", type=int, default=None, help="only the first N users (a smoke run)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    counts = prepare(Path(args.source), Path(args.out), k=args.k, negatives=args.negatives,
                     train_negatives=args.train_negatives, profile_items=args.profile_items,
                     train_windows=args.train_windows, dev_negatives=args.dev_negatives, seed=args.seed,
                     max_users=args.max_users)
    print(f"wrote {args.out}: " + ", ".join(f"{split} {n} rows" for split, n in counts.items()))


if __name__ == "__main__":
    main()
