"""Metrics of METHOD §4: AP/mAP, CMC, AUC, relative gain, negative flips."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from sklearn.metrics import average_precision_score

from backfill_lib.metrics import (auc, average_precision, mean_average_precision, negative_flip_rate, relative_gain,
                                  same_label, topk_hits)


class TestAveragePrecision:
    def test_hand_computed(self):
        # Ranking: rel, irrel, rel -> precisions at the hits 1/1 and 2/3.
        assert average_precision([[0.9, 0.8, 0.1]], [[True, False, True]])[0] == pytest.approx((1 + 2 / 3) / 2)
        # Only relevant item at rank 2 of 4.
        assert average_precision([[0.1, 0.9, 0.5, 0.3]], [[False, False, True, False]])[0] == pytest.approx(0.5)
        # Relevant items at ranks 2 and 4: (1/2 + 2/4) / 2.
        ap = average_precision([[4.0, 3.0, 2.0, 1.0]], [[False, True, False, True]])
        assert ap[0] == pytest.approx(0.5)

    def test_perfect_and_worst(self):
        s = [[3.0, 2.0, 1.0]]
        assert average_precision(s, [[True, True, False]])[0] == 1.0
        assert average_precision(s, [[False, False, True]])[0] == pytest.approx(1 / 3)

    def test_no_relevant_item_is_nan_and_skipped_by_map(self):
        ap = average_precision([[1.0, 0.0], [1.0, 0.0]], [[False, False], [False, True]])
        assert np.isnan(ap[0]) and ap[1] == 0.5
        assert mean_average_precision([[1.0, 0.0], [1.0, 0.0]], [[False, False], [False, True]]) == 0.5

    def test_minus_inf_ranks_last(self):
        # The excluded item (score -inf) is ranked after everything else.
        ap = average_precision([[-np.inf, 0.2, 0.1]], [[False, False, True]])
        assert ap[0] == pytest.approx(0.5)

    def test_a_tie_is_one_threshold_like_sklearn(self):
        # Whatever the order inside the tied group, the precision there is 1/2.
        assert average_precision([[1.0, 1.0]], [[False, True]])[0] == 0.5
        assert average_precision([[1.0, 1.0]], [[True, False]])[0] == 0.5
        # Ranking 0.9 (rel), then a group {0.5 rel, 0.5 irrel, 0.5 rel}: (1 + 3/4 + 3/4) / 3.
        ap = average_precision([[0.5, 0.9, 0.5, 0.5]], [[True, True, False, True]])[0]
        assert ap == pytest.approx((1 + 0.75 + 0.75) / 3)
        assert ap == pytest.approx(average_precision_score([1, 1, 0, 1], [0.5, 0.9, 0.5, 0.5]))

    @given(n_g=st.integers(2, 40), levels=st.integers(1, 4), seed=st.integers(0, 2**32 - 1))
    def test_matches_sklearn_with_ties(self, n_g, levels, seed):
        rng = np.random.default_rng(seed)
        scores = rng.integers(0, levels, size=n_g) / 4.0  # a few levels: many ties
        rel = rng.random(n_g) < 0.4
        rel[rng.integers(n_g)] = True
        assert average_precision(scores[None, :], rel[None, :])[0] == pytest.approx(
            average_precision_score(rel, scores), abs=1e-12)

    def test_minus_zero_ties_with_zero(self):
        assert average_precision([[0.0, -0.0]], [[False, True]])[0] == 0.5

    def test_float64_scores_are_not_rounded_to_ties(self):
        # In float32 these two scores are equal and the tie would put item 0 first.
        scores = np.array([[1.0, 1.0 + 1e-12]])
        assert average_precision(scores, [[True, False]])[0] == 0.5

    def test_matches_sklearn_on_random_cases(self):
        rng = np.random.default_rng(0)
        for _ in range(50):
            n = int(rng.integers(2, 60))
            rel = rng.random(n) < rng.uniform(0.05, 0.9)
            rel[rng.integers(n)] = True
            scores = rng.normal(size=n)
            ours = average_precision(scores[None, :], rel[None, :])[0]
            assert ours == pytest.approx(average_precision_score(rel, scores), abs=1e-12)

    @given(n_q=st.integers(1, 5), n_g=st.integers(1, 40), seed=st.integers(0, 2**32 - 1))
    def test_map_matches_sklearn(self, n_q, n_g, seed):
        rng = np.random.default_rng(seed)
        scores = rng.normal(size=(n_q, n_g))
        rel = rng.random((n_q, n_g)) < 0.3
        expected = [average_precision_score(r, s) for s, r in zip(scores, rel) if r.any()]
        if not expected:
            with pytest.warns(RuntimeWarning):  # nanmean of all-nan: no query has a relevant item
                assert np.isnan(mean_average_precision(scores, rel))
        else:
            assert mean_average_precision(scores, rel) == pytest.approx(np.mean(expected), abs=1e-12)

    def test_bad_input(self):
        with pytest.raises(ValueError, match="scores must be a non-empty"):
            average_precision([1.0, 2.0], [True, False])
        with pytest.raises(ValueError, match="scores contains NaN"):
            average_precision([[np.nan, 1.0]], [[True, False]])
        with pytest.raises(ValueError, match=r"relevant has shape \(1, 3\) but scores has \(1, 2\)"):
            average_precision([[0.0, 1.0]], [[True, False, True]])
        with pytest.raises(TypeError, match="scores must be an array of numbers"):
            average_precision([["a", "b"]], [[True, False]])


class TestTopk:
    def test_hand_computed(self):
        scores = [[0.9, 0.1, 0.5, 0.3], [0.2, 0.8, 0.7, 0.1]]
        rel = [[False, False, True, False], [True, False, False, False]]
        hits = topk_hits(scores, rel, ks=(1, 2, 3, 4))
        np.testing.assert_array_equal(hits[1], [False, False])
        np.testing.assert_array_equal(hits[2], [True, False])
        np.testing.assert_array_equal(hits[3], [True, True])
        np.testing.assert_array_equal(hits[4], [True, True])

    def test_k_larger_than_gallery(self):
        with pytest.raises(ValueError, match="ks asks for top-5 but the gallery has 3 items"):
            topk_hits(np.zeros((1, 3)), np.zeros((1, 3), bool), ks=(1, 5))

    def test_ties_broken_by_smaller_gallery_index(self):
        hits = topk_hits([[1.0, 1.0, 1.0]], [[False, True, True]], ks=(1, 2))
        assert not hits[1][0] and hits[2][0]
        hits = topk_hits([[1.0, 1.0, 1.0]], [[True, False, False]], ks=(1,))
        assert hits[1][0]

    @pytest.mark.parametrize("ks,error,match", [
        ((-1,), ValueError, r"ks\[0\] = -1: a cut-off must be at least 1"),
        ((0,), ValueError, r"ks\[0\] = 0"),
        ((1, 0), ValueError, r"ks\[1\] = 0"),
        ((), ValueError, "ks is empty"),
        (3, TypeError, "ks must be a sequence"),
        ((1.5,), TypeError, r"ks\[0\] must be a positive integer"),
        ((True,), TypeError, r"ks\[0\] must be a positive integer"),
    ])
    def test_bad_ks(self, ks, error, match):
        """Issue 7: ks=(-1,) answered top-(n-1), ks=(0,) answered False."""
        with pytest.raises(error, match=match):
            topk_hits(np.zeros((1, 3)), np.zeros((1, 3), bool), ks=ks)

    def test_numpy_integer_ks(self):
        hits = topk_hits([[0.2, 0.9]], [[True, False]], ks=(np.int64(2),))
        assert list(hits) == [2] and hits[2][0]


class TestAuc:
    def test_hand_computed(self):
        assert auc([0, 0.5, 1], [0.5, 0.5, 1.0]) == pytest.approx(0.625)
        assert auc([0, 1], [0.2, 0.6]) == pytest.approx(0.4)

    def test_constant_curve_is_its_value(self):
        assert auc(np.linspace(0, 1, 11), np.full(11, 0.37)) == pytest.approx(0.37)

    def test_unsorted_ratios_stay_paired_with_their_values(self):
        assert auc([1, 0, 0.5], [1.0, 0.0, 0.5]) == pytest.approx(0.5)

    def test_bad_input(self):
        with pytest.raises(ValueError, match="ratios must start at 0 and end at 1"):
            auc([0.1, 1], [0.5, 0.5])
        with pytest.raises(ValueError, match="values has 2 points but ratios has 3"):
            auc([0, 0.5, 1], [0.5, 0.5])
        with pytest.raises(ValueError, match=r"ratios\[1\] must lie in \[0, 1\]"):
            auc([0, 1.5, 1], [0.5, 0.5, 0.5])
        with pytest.raises(ValueError, match="ratios has repeated values"):
            auc([0, 0.5, 0.5, 1], [0.5, 0.5, 0.6, 0.5])


class TestRelativeGain:
    def test_hand_computed(self):
        assert relative_gain(0.7, old_old=0.5, new_new=0.9) == pytest.approx(0.5)
        assert relative_gain(0.5, 0.5, 0.9) == 0.0
        assert relative_gain(0.9, 0.5, 0.9) == pytest.approx(1.0)
        assert relative_gain(0.4, 0.5, 0.9) == pytest.approx(-0.25)  # worse than never upgrading

    def test_no_gain_is_undefined(self):
        with pytest.raises(ValueError, match=r"new_new \(0.5\) must differ from old_old \(0.5\)"):
            relative_gain(0.6, 0.5, 0.5)
        with pytest.raises(ValueError, match="new_new"):
            relative_gain(0.6, 0.5, np.nan)


class TestNegativeFlips:
    def test_hand_computed(self):
        before = [True, True, False, False]
        after = [True, False, True, False]
        assert negative_flip_rate(before, after) == 0.25  # only query 1 flips right -> wrong
        assert negative_flip_rate(before, before) == 0.0

    def test_bad_input(self):
        with pytest.raises(ValueError, match=r"correct_after has shape \(2,\) but correct_before has \(3,\)"):
            negative_flip_rate([True] * 3, [True] * 2)
        with pytest.raises(ValueError, match="correct_before is empty"):
            negative_flip_rate([], [])


def test_same_label():
    rel = same_label([0, 1], [1, 0, 1])
    np.testing.assert_array_equal(rel, [[False, True, False], [True, False, True]])
    with pytest.raises(ValueError, match="query_labels must be 1-D"):
        same_label([[0]], [0])
