"""Sample std, paired differences and ties: the statistics behind every "±" the product prints."""

from __future__ import annotations

import statistics

import pytest

from oscqat.stats import is_tie, mean_std, paired_diff
from search.confirm import summarise, winner


def test_mean_std_is_the_sample_std():
    vals = [0.97, 0.99, 0.98]
    ms = mean_std(vals)
    assert ms.std == pytest.approx(statistics.stdev(vals))  # n-1
    assert ms.std > statistics.pstdev(vals)  # the population std understates it
    assert mean_std([0.5]).std is None and "n=1" in mean_std([0.5]).text()


def test_paired_diff_uses_shared_seeds_and_a_t_interval():
    a = {0: 0.90, 1: 0.80, 2: 0.85, 9: 0.1}
    b = {0: 0.88, 1: 0.79, 2: 0.82}
    d = paired_diff(a, b)  # seed 9 is not shared: left out
    diffs = [0.02, 0.01, 0.03]
    assert d.n == 3 and d.mean == pytest.approx(statistics.mean(diffs))
    assert d.std == pytest.approx(statistics.stdev(diffs))
    half = 4.302652729911275 * statistics.stdev(diffs) / 3 ** 0.5  # t(0.975, 2)
    assert d.ci95 == pytest.approx((d.mean - half, d.mean + half))
    with pytest.raises(ValueError):
        paired_diff({0: 1.0}, {1: 1.0})


def test_confirm_winner_is_the_best_mean_and_ties_are_reported():
    rows = [
        {"confirm_of": "a", "rank": 1, "seed": 1, "state": "COMPLETE", "val_top1": 0.9, "test_top1": 0.80},
        {"confirm_of": "a", "rank": 1, "seed": 2, "state": "COMPLETE", "val_top1": 0.8, "test_top1": 0.70},
        {"confirm_of": "b", "rank": 2, "seed": 1, "state": "COMPLETE", "val_top1": 0.85, "test_top1": 0.9},
        {"confirm_of": "b", "rank": 2, "seed": 2, "state": "COMPLETE", "val_top1": 0.85, "test_top1": 0.8},
        {"confirm_of": "c", "rank": 3, "seed": 1, "state": "FAIL", "val_top1": None, "test_top1": None},
    ]
    summaries = summarise(rows)
    best, ties = winner(summaries)
    assert best.trial_id == "a" and ties == ["b"]  # equal means (0.85): the search's better rank wins, tie said
    assert best.test_std == pytest.approx(statistics.stdev([0.8, 0.7]))
    assert summaries[-1].trial_id == "c" and summaries[-1].failed == 1
    rows[1]["val_top1"] = 0.79
    best, ties = winner(summarise(rows))
    assert best.trial_id == "b" and ties == []
    assert is_tie(0.5, 0.5) and not is_tie(0.5, 0.5028) and not is_tie(None, 0.5)


def test_median_ci_uses_the_binomial_order_statistics():
    from oscqat.stats import median_ci

    values = [float(v) for v in range(40, 0, -1)]  # 1..40, unsorted
    assert median_ci(values) == (14.0, 27.0)  # the textbook ranks for n = 40 at 95%
    assert median_ci([1.0, 2.0, 3.0, 4.0, 5.0]) is None  # even (x_1, x_5) covers only 93.75%
    assert median_ci([3.0, 1.0, 2.0, 6.0, 5.0, 4.0]) == (1.0, 6.0)  # n = 6: 96.9%
    lo, hi = median_ci(values, level=0.5)
    assert 14.0 < lo < hi < 27.0
