"""examples/recsys_movielens/prepare.py on a tiny synthetic MovieLens: the split is by time, exactly."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _prepare():
    spec = importlib.util.spec_from_file_location("ml_prepare", ROOT / "examples" / "recsys_movielens" / "prepare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _source(root: Path) -> Path:
    movies = ["movieId,title,genres"] + [f"{m},Movie {m} (2000),Drama|Comedy" for m in range(1, 41)]
    (root / "movies.csv").write_text("\r\n".join(movies) + "\r\n", encoding="utf-8")
    (root / "tags.csv").write_text("userId,movieId,tag,timestamp\r\n9,3,twist ending,5\r\n", encoding="utf-8")
    ratings = ["userId,movieId,rating,timestamp"]
    # user 1: 8 ratings, written out of time order; timestamps decide, not file order or movieId
    user1 = [(5, 4.0, 800), (1, 5.0, 100), (2, 3.0, 200), (9, 4.5, 700), (3, 4.0, 300), (7, 2.0, 600),
             (4, 1.0, 400), (6, 5.0, 500)]
    ratings += [f"1,{m},{r},{t}" for m, r, t in user1]
    # user 2: 3 ratings, too few for a history of 5 before the held-out window: no rows
    ratings += ["2,1,5.0,10", "2,2,5.0,20", "2,3,5.0,30"]
    # users 3..12: movie 10 rated early by everyone (popular), held-out window all negative except for user 3
    for u in range(3, 13):
        ratings += [f"{u},10,4.0,1"] + [f"{u},{10 + j},3.0,{1 + j}" for j in range(1, 6)]
        ratings += [f"{u},{20 + u},{4.0 if u == 3 else 2.0},100", f"{u},30,1.0,101"]
    (root / "ratings.csv").write_text("\r\n".join(ratings) + "\r\n", encoding="utf-8")
    return root


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_the_last_k_ratings_by_time_are_held_out(tmp_path):
    prepare = _prepare()
    source = _source(tmp_path)
    counts = prepare.prepare(source, tmp_path / "out", k=3, negatives=5, train_negatives=2, profile_items=2,
                             min_history=5, train_windows=1, dev_share=0.0, seed=0)
    texts = prepare.item_texts(source)
    test = {row["user"]: row for row in _rows(tmp_path / "out" / "test.jsonl")}
    # user 1 by time: 1@100 2@200 3@300 4@400 6@500 | 7@600 9@700 5@800: positives of the window: 9 and 5
    assert sorted(test[1]["positive"]) == sorted([texts[9], texts[5]])
    assert texts[3].endswith("tags: twist ending") and texts[1] == "Movie 1 (2000). genres: Drama, Comedy"
    # the profile: the 2 highest-rated of the 5 earlier ratings (5.0 at 500 and 5.0 at 100: the most recent first)
    assert test[1]["query"] == "liked: Movie 6 (2000). genres: Drama, Comedy; Movie 1 (2000). genres: Drama, Comedy"
    # negatives: never rated by the user, sampled among rated movies, reproducible
    rated_by_1 = {texts[m] for m in (1, 2, 3, 4, 5, 6, 7, 9)}
    assert len(test[1]["negatives"]) == 5 and not set(test[1]["negatives"]) & rated_by_1
    assert 2 not in test  # too short a history
    assert set(test) == {1, 3}  # users 4..12 have no positive in their window
    # user 1 has no train window (5 earlier ratings < 3 + min_history): train comes from users 3.. only if positive
    assert counts["train"] == 0 and counts["dev"] == 0
    again = tmp_path / "again"
    prepare.prepare(source, again, k=3, negatives=5, train_negatives=2, profile_items=2, min_history=5,
                    train_windows=1, dev_share=0.0, seed=0)
    assert (again / "test.jsonl").read_bytes() == (tmp_path / "out" / "test.jsonl").read_bytes()
    # popularity sees no held-out rating: movie 10 (rated early by 10 users) counts 10, a held-out movie 0
    popularity = json.loads((tmp_path / "out" / "popularity.json").read_text(encoding="utf-8"))
    assert popularity[texts[10]] == 10 and popularity[texts[23]] == 0 and popularity[texts[30]] == 0


def test_train_windows_come_before_the_test_window(tmp_path):
    prepare = _prepare()
    source = _source(tmp_path)
    # k=1: user 1's test window is movie 5 (t=800), the train window before it movie 9 (t=700, rating 4.5)
    prepare.prepare(source, tmp_path / "out", k=1, negatives=3, train_negatives=2, profile_items=1, min_history=5,
                    train_windows=1, dev_share=0.0, seed=0)
    texts = prepare.item_texts(source)
    train = [row for row in _rows(tmp_path / "out" / "train.jsonl") if row["user"] == 1]
    assert [row["positive"] for row in train] == [texts[9]]
    assert train[0]["query"] == "liked: " + texts[6]  # the profile of ratings before t=700 only
    assert len(train[0]["negatives"]) == 2
    test = {row["user"]: row for row in _rows(tmp_path / "out" / "test.jsonl")}
    assert test[1]["positive"] == [texts[5]]
