"""Ranking metrics of one query's candidate list and their means over queries: NDCG@k, HR@k (hit rate) and MRR.

Definitions (``gains``: a candidate's label, > 0 relevant; positions counted from 1):

- NDCG@k = DCG@k / IDCG@k with DCG@k = sum over the top k of gain / log2(position + 1) (linear gain, as
  scikit-learn's ``ndcg_score``) and IDCG@k the DCG@k of the candidates sorted by gain.
- HR@k = 1 if a relevant candidate is among the top k, else 0.
- MRR = 1 / position of the first relevant candidate (no cut-off).

Ties are scored by their expectation over a uniformly random order of the tied candidates (McSherry & Najork,
ECIR 2008), so that no order of the input file favours anyone: a model that gives every candidate the same score
gets the metrics of a random ranking, and a popularity baseline with many equal counts is not flattered or
penalised by where its ties happen to sit. scikit-learn's ``ndcg_score`` treats ties the same way; HR and MRR with
ties have no well-kept implementation, hence this module (cross-checked against ``ndcg_score`` and against brute
force over every tie order in the tests).
"""

from __future__ import annotations

import math
from typing import Sequence

CUTOFF = 10


def _tie_groups(scores: Sequence[float], gains: Sequence[float]) -> list[tuple[int, int, list[float]]]:
    """(first position, size, gains) of each group of equal scores, best scores first; positions from 0. A NaN score
    ranks last (a broken model must not look good)."""
    clean = [float("-inf") if math.isnan(s) else float(s) for s in scores]
    order = sorted(range(len(clean)), key=lambda i: -clean[i])
    groups: list[tuple[int, int, list[float]]] = []
    start = 0
    while start < len(order):
        end = start
        while end < len(order) and clean[order[end]] == clean[order[start]]:
            end += 1
        groups.append((start, end - start, [float(gains[i]) for i in order[start:end]]))
        start = end
    return groups


def _discount(position: int, k: int | None) -> float:
    return 0.0 if k is not None and position >= k else 1.0 / math.log2(position + 2)


def query_metrics(scores: Sequence[float], gains: Sequence[float], k: int = CUTOFF) -> dict[str, float]:
    """NDCG@k, HR@k and MRR of one query (``gains``: one label per candidate, at least one > 0)."""
    if len(scores) != len(gains):
        raise ValueError(f"{len(scores)} scores but {len(gains)} labels")
    if not any(g > 0 for g in gains):
        raise ValueError("a query needs at least one relevant candidate (label > 0)")
    groups = _tie_groups(scores, gains)
    # DCG: every candidate of a tie group is equally likely at each of the group's positions
    dcg = sum(sum(g) * sum(_discount(p, k) for p in range(a, a + n)) / n for a, n, g in groups)
    ideal = sorted((float(g) for g in gains), reverse=True)
    idcg = sum(g * _discount(p, k) for p, g in enumerate(ideal))
    # the first relevant candidate sits in the first group that has one; within it, its offset X is the smallest of
    # r random slots out of n: P(X >= j) = C(n - j, r) / C(n, r)
    a, n, g = next(group for group in groups if any(x > 0 for x in group[2]))
    r = sum(x > 0 for x in g)
    at_least = [math.comb(n - j, r) / math.comb(n, r) for j in range(n + 1)]
    mrr = sum((at_least[j] - at_least[j + 1]) / (a + j + 1) for j in range(n))
    hr = sum(at_least[j] - at_least[j + 1] for j in range(n) if a + j < k)
    return {f"ndcg_{k}": dcg / idcg, f"hr_{k}": hr, "mrr": mrr}


def mean_metrics(score_lists: Sequence[Sequence[float]], gain_lists: Sequence[Sequence[float]],
                 k: int = CUTOFF) -> dict[str, float]:
    """The mean of ``query_metrics`` over queries, and ``queries`` (their count)."""
    totals = {f"ndcg_{k}": 0.0, f"hr_{k}": 0.0, "mrr": 0.0}
    for scores, gains in zip(score_lists, gain_lists):
        for key, value in query_metrics(scores, gains, k).items():
            totals[key] += value
    count = len(gain_lists)
    return {**{key: (value / count if count else float("nan")) for key, value in totals.items()}, "queries": count}


def report_text(result: dict, k: int = CUTOFF) -> str:
    return (f"queries {result['queries']}   NDCG@{k} {result[f'ndcg_{k}']:.4f}   HR@{k} {result[f'hr_{k}']:.4f}   "
            f"MRR {result['mrr']:.4f}")
