"""Ranking metrics on hand-computed rankings, ties by expectation (checked against brute force over every tie
order), NDCG against scikit-learn's ndcg_score, and the listwise loss."""

from __future__ import annotations

import itertools
import math
import random

import numpy as np
import pytest
import torch

from peftkit.tasks.ranking_metrics import mean_metrics, query_metrics


def test_hand_computed_ranking_without_ties():
    # order by score: d (0), a (1), c (1), b (0), e (0): relevant at positions 2 and 3
    scores, gains = [0.9, 0.1, 0.5, 1.2, -3.0], [1, 0, 1, 0, 0]
    got = query_metrics(scores, gains, k=10)
    dcg = 1 / math.log2(3) + 1 / math.log2(4)
    idcg = 1 + 1 / math.log2(3)
    assert got["ndcg_10"] == pytest.approx(dcg / idcg)  # 0.6934
    assert got["hr_10"] == 1.0
    assert got["mrr"] == pytest.approx(0.5)


def test_cutoff_counts_only_the_top_k():
    scores = list(range(12, 0, -1))  # positions follow the list order
    gains = [0] * 12
    gains[10] = 1  # the only relevant item at position 11: outside the top 10
    got = query_metrics(scores, gains, k=10)
    assert got["ndcg_10"] == 0.0 and got["hr_10"] == 0.0
    assert got["mrr"] == pytest.approx(1 / 11)
    gains[10], gains[9] = 0, 1  # at position 10: inside
    got = query_metrics(scores, gains, k=10)
    assert got["hr_10"] == 1.0 and got["ndcg_10"] == pytest.approx(1 / math.log2(11))
    assert got["mrr"] == pytest.approx(0.1)


def test_graded_gains_are_linear():
    got = query_metrics([3.0, 2.0, 1.0], [1, 2, 0], k=10)
    assert got["ndcg_10"] == pytest.approx((1 + 2 / math.log2(3)) / (2 + 1 / math.log2(3)))


def test_constant_scores_give_a_random_rankings_expectation_not_the_file_order():
    # the relevant item first in the file must not win a tie: one relevant of 4, all tied
    got = query_metrics([0.0] * 4, [1, 0, 0, 0], k=2)
    assert got["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 3 + 1 / 4) / 4)
    assert got["hr_2"] == pytest.approx(0.5)
    assert got["ndcg_2"] == pytest.approx((1 + 1 / math.log2(3)) / 4)


def _brute_force(scores, gains, k):
    """The mean of the tie-free metrics over every order of the tied candidates."""
    values = {}
    for perm in itertools.permutations(range(len(scores))):
        # a total order consistent with the scores: ties broken by this permutation
        jitter = [scores[i] - 1e-9 * perm.index(i) for i in range(len(scores))]
        got = query_metrics(jitter, gains, k)
        for key, value in got.items():
            values.setdefault(key, []).append(value)
    return {key: float(np.mean(v)) for key, v in values.items()}


@pytest.mark.parametrize("seed", range(6))
def test_ties_equal_the_mean_over_every_tie_order(seed):
    rng = random.Random(seed)
    n = 6
    scores = [float(rng.choice([0, 1, 2])) for _ in range(n)]
    gains = [rng.choice([0, 0, 1, 2]) for _ in range(n)]
    gains[rng.randrange(n)] = 1
    got, expected = query_metrics(scores, gains, k=3), _brute_force(scores, gains, 3)
    for key in expected:
        assert got[key] == pytest.approx(expected[key], abs=1e-9), key


@pytest.mark.parametrize("seed", range(5))
def test_ndcg_matches_scikit_learn_with_and_without_ties(seed):
    from sklearn.metrics import ndcg_score

    rng = np.random.default_rng(seed)
    for _ in range(20):
        n = int(rng.integers(2, 30))
        gains = rng.integers(0, 3, n)
        gains[rng.integers(n)] = 1
        scores = rng.integers(0, 4, n).astype(float) if seed % 2 else rng.normal(size=n)
        expected = ndcg_score([gains], [scores], k=10)
        assert query_metrics(scores.tolist(), gains.tolist(), 10)["ndcg_10"] == pytest.approx(expected, abs=1e-12)


def test_mean_over_queries_and_nan_scores_rank_last():
    got = mean_metrics([[1.0, 0.0], [float("nan"), 0.0]], [[1, 0], [1, 0]], k=10)
    assert got["queries"] == 2 and got["mrr"] == pytest.approx((1 + 0.5) / 2)
    with pytest.raises(ValueError, match="relevant"):
        query_metrics([1.0, 2.0], [0, 0])


def test_listwise_loss_is_softmax_cross_entropy_per_query_and_ignores_padding():
    from peftkit.tasks.ranking import Ranking

    task = Ranking()
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.3, 1.0, float("-inf")]])
    targets = [[0, 1, 0], [1, 1]]
    expected = -torch.log_softmax(logits[0], -1)[1] - 0.5 * torch.log_softmax(logits[1, :2], -1).sum()
    got = task.loss_sum(logits, targets)
    assert torch.isfinite(got) and got == pytest.approx(float(expected))
