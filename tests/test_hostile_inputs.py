"""Issue 16: a hostile but fair practitioner's inputs to the evaluation side of the library.

Each test is a case that, before the fix, either gave a silent wrong answer or crashed deep inside
numpy / scikit-learn with a message that did not name the argument. Now each is refused with a
TypeError or ValueError naming the argument (or, where the answer can be exact, answered exactly).
"""

from __future__ import annotations

import numpy as np
import pytest

from backfill_lib import backfill as bf
from backfill_lib import calibration, evaluation, metrics, retrieval, versions
from backfill_lib.validation import as_flags, as_labels, check_ratios, check_seed


def _unit(n, d, seed=0):
    x = np.random.default_rng(seed).normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


G_OLD, G_NEW = _unit(8, 4, 0), _unit(8, 3, 1)
LABELS = np.array([0, 0, 1, 1, 2, 2, 3, 3])


# --- Labels: exact or refused ---------------------------------------------------------------------

def test_huge_float_labels_are_refused_not_merged():
    # 1e19 and 2e19 both overflowed int64 to the same number: one class, mAP 1.0 instead of 0.5.
    with pytest.raises(ValueError, match=r"query_labels .*2\*\*53"):
        metrics.same_label(np.array([1e19]), np.array([1e19, 2e19]))
    scores = np.array([[0.9, 0.8]])
    with pytest.raises(ValueError, match="labels"):
        bf.evaluate_backfill(bf.rank_merge(G_OLD, G_NEW), np.array([1e19, 2e19] * 4), device="numpy")
    assert metrics.mean_average_precision(scores, metrics.same_label([1], [2, 1])) == 0.5  # as integers: exact


def test_float32_labels_beyond_exact_range_are_refused():
    with pytest.raises(ValueError, match=r"y holds float labels .*float32 .*2\*\*24"):
        as_labels(np.array([2.0 ** 24, 1.0], dtype=np.float32), "y")
    assert as_labels(np.array([2.0 ** 24 - 1, 3.0], dtype=np.float32), "y").tolist() == [2 ** 24 - 1, 3]


def test_unsigned_labels_past_int64_are_refused():
    # 2**63 wrapped to -2**63 as int64 and was reported as a negative class.
    with pytest.raises(ValueError, match="y holds the label 9223372036854775808"):
        as_labels(np.array([2 ** 63, 1], dtype=np.uint64), "y")
    assert as_labels(np.array([2 ** 63 - 1, 1], dtype=np.uint64), "y").tolist() == [2 ** 63 - 1, 1]


@pytest.mark.parametrize("bad, kind, message", [
    (np.array([np.inf, 1.0]), ValueError, "NaN or infinite"),
    (np.array([np.nan, 1.0]), ValueError, "NaN or infinite"),
    ([[1], [1, 2]], ValueError, "y must be a 1-D array of integer class labels, got a ragged"),
    (np.array([True, False]), TypeError, r"dtype bool \(a mask\?\)"),
    (np.array([1.5, 1.0]), TypeError, "fractional values such as 1.5"),
])
def test_bad_labels_name_the_argument(bad, kind, message):
    with pytest.raises(kind, match=message):
        as_labels(bad, "y")


# --- Ids: exact or refused ------------------------------------------------------------------------

def test_merge_topk_refuses_ids_past_int64():
    # 2**63 became -2**63 as int64: dropped as an empty slot, and a bogus id returned.
    pair = (np.array([[0.9, 0.5]]), np.array([[2 ** 63, 3]], dtype=np.uint64))
    with pytest.raises(ValueError, match=r"results\[0\] ids must fit in int64"):
        retrieval.merge_topk([pair], k=2)
    ok = (np.array([[0.9, 0.5]]), np.array([[2 ** 63 - 1, 3]], dtype=np.uint64))
    assert retrieval.merge_topk([ok], k=2)[1].tolist() == [[2 ** 63 - 1, 3]]


def test_merge_topk_refuses_negative_ids_other_than_empty_slot():
    with pytest.raises(ValueError, match=r"results\[0\] ids must be non-negative, or -1"):
        retrieval.merge_topk([(np.array([[0.9, 0.5]]), np.array([[-5, 3]]))], k=2)


def test_merge_topk_refuses_an_id_returned_by_two_indices():
    a = (np.array([[0.9]]), np.array([[1]]))
    b = (np.array([[0.8]]), np.array([[1]]))
    with pytest.raises(ValueError, match="id 1 appears twice in the results of query 0"):
        retrieval.merge_topk([a, b], k=2)
    empty = (np.array([[0.2, 0.1]]), np.array([[-1, -1]]))  # empty slots may repeat
    assert retrieval.merge_topk([a, empty], k=1)[1].tolist() == [[1]]


def test_gallery_default_ids_do_not_overflow():
    g = retrieval.Gallery(4)
    g.add(_unit(1, 4), ids=[2 ** 63 - 1])
    with pytest.raises(ValueError, match="no default ids left"):
        g.add(_unit(1, 4, 3))  # was an OverflowError from numpy
    assert g.ntotal == 1


# --- Metrics --------------------------------------------------------------------------------------

@pytest.mark.parametrize("relevant, kind", [
    ([[0.3, 0.0]], ValueError),      # graded relevance passed for True
    ([[np.nan, 0.0]], ValueError),
    ([["False", "True"]], TypeError),  # the string "False" passed for True
    ([[2, 0]], ValueError),
])
def test_relevance_must_be_booleans(relevant, kind):
    with pytest.raises(kind, match="relevant must hold booleans"):
        metrics.average_precision([[0.9, 0.1]], relevant)
    with pytest.raises(kind, match="relevant must hold booleans"):
        metrics.topk_hits([[0.9, 0.1]], relevant, ks=(1,))
    assert metrics.average_precision([[0.9, 0.1]], [[0, 1]]).tolist() == [0.5]  # 0/1 integers are fine


def test_excluded_item_cannot_be_relevant():
    with pytest.raises(ValueError, match=r"relevant\[0, 0\] is True but scores\[0, 0\] is -inf"):
        metrics.average_precision([[-np.inf, 0.5]], [[True, False]])


def test_complex_and_ragged_scores_are_refused():
    with pytest.raises(TypeError, match="scores must be an array of numbers"):
        metrics.average_precision([[1j, 2.0]], [[True, False]])
    with pytest.raises(ValueError, match="scores must be .* got a ragged sequence"):
        metrics.average_precision([[0.9], [0.1, 2.0]], [[True, False]])


def test_no_queries_is_refused():
    with pytest.raises(ValueError, match=r"scores must be a non-empty .* got shape \(0, 3\)"):
        metrics.mean_average_precision(np.zeros((0, 3)), np.zeros((0, 3), bool))


def test_auc_refuses_undefined_points_and_scalars():
    with pytest.raises(ValueError, match=r"values\[0\] is nan"):
        metrics.auc([0, 1], [np.nan, 1.0])
    with pytest.raises(ValueError, match=r"values\[1\] is inf"):
        metrics.auc([0, 1], [0.5, np.inf])
    with pytest.raises(TypeError, match="ratios must be a 1-D sequence"):
        metrics.auc(0.5, [1.0])
    with pytest.raises(TypeError, match="values must be a 1-D sequence of real numbers"):
        metrics.auc([0, 1], ["a", 1])


@pytest.mark.parametrize("value, kind", [(np.nan, ValueError), ("0.7", TypeError), (None, TypeError),
                                         (np.array([0.7, 0.8]), TypeError), (True, TypeError)])
def test_relative_gain_checks_its_numbers(value, kind):
    with pytest.raises(kind, match="auc_value must be"):
        metrics.relative_gain(value, 0.5, 1.0)
    assert metrics.relative_gain(np.float32(0.75), 0.5, 1.0) == 0.5


@pytest.mark.parametrize("before, kind", [(["True", "False"], TypeError), ([0.2, 0.0], ValueError),
                                          ([np.nan, 0.0], ValueError)])
def test_negative_flip_rate_needs_booleans(before, kind):
    with pytest.raises(kind, match="correct_before must hold booleans"):
        metrics.negative_flip_rate(before, [False, False])
    with pytest.raises(ValueError, match="correct_before must be 1-D"):
        metrics.negative_flip_rate([[True]], [[False]])


def test_linear_probe_checks_classes_and_seed():
    with pytest.raises(ValueError, match="train_y holds a single class"):
        metrics.linear_probe(G_OLD, np.zeros(8, int), G_OLD, np.zeros(8, int))
    with pytest.raises(ValueError, match="seed must be an integer seed"):
        metrics.linear_probe(G_OLD, LABELS, G_OLD, LABELS, seed=-1)
    with pytest.raises(TypeError, match="seed must be an integer seed"):
        metrics.linear_probe(G_OLD, LABELS, G_OLD, LABELS, seed="0")


# --- Evaluation engine ----------------------------------------------------------------------------

def test_exclude_self_must_be_a_bool():
    # bool("no") is True: leave-one-out was switched on silently.
    with pytest.raises(TypeError, match="exclude_self must be True or False, got 'no'"):
        evaluation.evaluate_states(G_OLD, G_OLD, G_OLD, G_OLD, LABELS, LABELS, np.arange(8), [0],
                                   exclude_self="no", device="numpy")


def test_ks_none_names_the_argument():
    with pytest.raises(TypeError, match="ks must be a non-empty sequence"):
        evaluation.evaluate_states(G_OLD, G_OLD, G_OLD, G_OLD, LABELS, LABELS, np.arange(8), [0], ks=None,
                                   device="numpy")


def test_scores_that_overflow_float32_are_refused():
    # Rows of norm 1e20: every product overflowed to inf and the whole ranking tied.
    big = G_OLD * np.float32(1e20)
    with pytest.raises(ValueError, match="query_old and gallery_old have rows of norm .* overflow float32"):
        evaluation.evaluate_states(big, big, G_OLD, G_OLD, LABELS, LABELS, np.arange(8), [0, 8], device="numpy")
    with pytest.raises(ValueError, match=r"queries\[0\] and galleries\[0\] .* overflow float32"):
        evaluation.evaluate_version_states([big], [big], [[0] * 8], LABELS, LABELS, device="numpy")


def test_empty_order_gives_an_empty_mask():
    assert bf.backfilled_mask([], 0.5).shape == (0,)  # was an IndexError on a float64 index array


# --- evaluate_backfill and the strategies ---------------------------------------------------------

@pytest.mark.parametrize("seed, kind", [(-1, ValueError), (1.5, TypeError), ("a", TypeError), (None, TypeError),
                                        (True, TypeError)])
def test_seeds_are_checked(seed, kind):
    with pytest.raises(kind, match="seed must be an integer seed"):
        bf.backfill_order(5, seed=seed)
    with pytest.raises(kind, match="order_seed must be an integer seed"):
        bf.evaluate_backfill(bf.rank_merge(G_OLD, G_NEW), LABELS, order_seed=seed, device="numpy")
    with pytest.raises(kind, match="seed must be an integer seed"):
        calibration.training_pairs(np.arange(50) % 5, max_items=10, seed=seed)


def test_simulate_backfill_checks_reference_and_seed():
    s = bf.rank_merge(G_OLD, G_NEW)
    with pytest.raises(TypeError, match="reference must be a Strategy"):
        bf.simulate_backfill([s], LABELS, reference="old")
    with pytest.raises(ValueError, match="order_seed must be an integer seed"):
        bf.simulate_backfill([s], LABELS, order_seed=-1)


@pytest.mark.parametrize("ref, kind", [(np.full(8, 0.3), ValueError), (np.full(8, 2), ValueError),
                                       (["False"] * 8, TypeError)])
def test_reference_top1_must_be_booleans(ref, kind):
    with pytest.raises(kind, match="reference_top1 must hold booleans"):
        bf.evaluate_backfill(bf.rank_merge(G_OLD, G_NEW), LABELS, reference_top1=ref, device="numpy")


def test_no_relevant_item_is_an_error_not_a_nan_curve():
    with pytest.raises(ValueError, match="no query has a relevant gallery item"):
        bf.evaluate_backfill(bf.rank_merge(G_OLD, G_NEW), np.arange(8), device="numpy")
    one_each = bf.evaluate_backfill(bf.rank_merge(G_OLD, G_NEW), [0, 0, 1, 2, 3, 4, 5, 6], device="numpy")
    assert np.isfinite(one_each.map).all()  # one query pair is enough


def test_strategy_fields_are_checked():
    with pytest.raises(TypeError, match="offline must be True or False, got 'no'"):
        bf.Strategy("x", G_OLD, G_OLD, G_NEW, G_NEW, offline="no")  # was evaluated as offline
    with pytest.raises(ValueError, match="backbone_passes must be a positive integer"):
        bf.Strategy("x", G_OLD, G_OLD, G_NEW, G_NEW, backbone_passes=-1)
    with pytest.raises(TypeError, match="name must be a non-empty string"):
        bf.Strategy(3, G_OLD, G_OLD, G_NEW, G_NEW)


@pytest.mark.parametrize("bad, kind, message", [
    (("a", 0), TypeError, r"old_map must hold two real numbers"),
    ((1, 0, 2), TypeError, r"old_map must be a ScoreMap or a \(scale, offset\) pair"),
    (None, TypeError, r"old_map must be a ScoreMap or a \(scale, offset\) pair"),
    ((1e300, 0), ValueError, "differ too much to fold into float32"),
])
def test_calibrated_rank_merge_checks_its_maps(bad, kind, message):
    with pytest.raises(kind, match=message):
        bf.rank_merge_calibrated(G_OLD, G_NEW, bad, (1e-300, 0) if bad == (1e300, 0) else (1, 0))


def test_fold_refuses_offsets_it_cannot_fold():
    # The spread of the offsets overflowed to inf: every space folded to one constant score.
    with pytest.raises(ValueError, match="fold into float32"):
        bf.fold_affine_scores([(1, 1e308), (1, -1e308)])


@pytest.mark.parametrize("uncertainty, kind", [(["a", "b", "c"], TypeError), ([1j, 1, 2], TypeError)])
def test_uncertainty_must_be_real(uncertainty, kind):
    with pytest.raises(kind, match="uncertainty must hold real numbers"):
        bf.backfill_order(3, policy="uncertain_first", uncertainty=uncertainty)


def test_policy_must_be_a_string():
    with pytest.raises(TypeError, match="policy must be a string"):
        bf.backfill_order(3, policy=["random"])


def test_ratios_must_be_a_sequence():
    with pytest.raises(TypeError, match="ratios must be a 1-D sequence"):
        check_ratios(0.5)
    with pytest.raises(TypeError, match="ratios must be a 1-D sequence"):
        bf.evaluate_backfill(bf.rank_merge(G_OLD, G_NEW), LABELS, ratios=0.5, device="numpy")


# --- Calibration ----------------------------------------------------------------------------------

def test_constant_scores_cannot_be_calibrated():
    # Platt scaling used to return scale 1000, offset -1002: a map fitted on nothing.
    e = np.repeat(_unit(1, 4), 8, axis=0)
    for method in ("platt", "negatives"):
        with pytest.raises(ValueError, match="every training pair has the same score"):
            calibration.fit_score_map(e, LABELS, method=method)


def test_score_map_checks_its_fields():
    with pytest.raises(TypeError, match="scale must be a real number"):
        calibration.ScoreMap("1", 0, "platt")
    with pytest.raises(TypeError, match="offset must be a real number"):
        calibration.ScoreMap(1.0, None, "platt")
    with pytest.raises(TypeError, match="scores must be real numbers"):
        calibration.ScoreMap(1.0, 0.0, "platt")("a")


# --- Several versions -----------------------------------------------------------------------------

def test_storage_states_checks_initial_and_n_versions():
    assert versions.storage_states([], [], [0], 0).shape == (1, 0)  # was an IndexError
    with pytest.raises(TypeError, match="initial must hold integer version indices"):
        versions.storage_states(["a", "b"], [0, 1], [1], 0)
    with pytest.raises(TypeError, match="n_versions must be a positive integer"):
        versions.storage_states([0, 0], [0, 1], [1], 0, n_versions=2.5)  # was accepted


def test_multi_version_strategy_checks_backbone_passes():
    with pytest.raises(ValueError, match="backbone_passes must be a positive integer"):
        versions.MultiVersionStrategy("a", [G_OLD], [G_OLD], backbone_passes=-2)


def test_multi_reverse_heads_refuses_fractional_sizes():
    pytest.importorskip("torch")
    with pytest.raises(TypeError, match=r"d_targets\[0\] must be a positive integer"):
        versions.multi_reverse_heads(4, [2.7])  # was silently truncated to 2
    with pytest.raises(TypeError, match=r"d_targets\[0\] must be a positive integer"):
        versions.multi_reverse_heads(4, ["a"])
    with pytest.raises(TypeError, match="d_targets must be a sequence"):
        versions.multi_reverse_heads(4, 3)


def test_fit_multi_reverse_checks_lam_rt():
    pytest.importorskip("torch")
    with pytest.raises(ValueError, match="lam_rt must be non-negative"):
        versions.fit_multi_reverse(G_OLD, [G_OLD], LABELS, lam_rt=np.nan, steps=1)
    with pytest.raises(TypeError, match="lam_rt must be a real number"):
        versions.fit_multi_reverse(G_OLD, [G_OLD], LABELS, lam_rt="a", steps=1)


# --- The new helpers ------------------------------------------------------------------------------

def test_as_flags_and_check_seed():
    assert as_flags([1, 0, True], "f").tolist() == [True, False, True]
    with pytest.raises(ValueError, match=r"f must have shape \(3,\)"):
        as_flags([1, 0], "f", shape=(3,))
    assert check_seed(np.uint32(7)) == 7
    with pytest.raises(ValueError, match="seed must be an integer seed"):
        check_seed(2 ** 32)
