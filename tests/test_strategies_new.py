"""Strategies of issue 9: bct_pseudo (BCT through old-feature class means) and rank_merge_calibrated."""

import math

import numpy as np
import pytest
import torch

from backfill_lib.context import MethodParams
from backfill_lib.data import load_dataset
from backfill_lib.losses import bct_pseudo_influence_loss, bct_pseudo_objective, pseudo_classifier
from backfill_lib.models import ModelSpec, build_model
from backfill_lib.strategies import ExperimentContext, NotApplicable, Preset, build_strategy
from backfill_lib.training import TrainConfig

SMALL = Preset(old=ModelSpec("mlp", 8, 8), new=ModelSpec("mlp", 8, 8), new_heterogeneous=ModelSpec("mlp", 12, 8),
               train=TrainConfig(epochs=2, batch_size=32, lr=5e-3))
DATA = {"n_per_class": 16, "dim": 8}


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic", **DATA)


def _ctx(data, cache, **kwargs):
    return ExperimentContext(data, preset=SMALL, device="cpu", progress=False, cache=cache, **kwargs)


# --- bct_pseudo ------------------------------------------------------------------------------------

def test_pseudo_classifier_is_the_normalised_class_mean():
    feats = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [-1.0, 0.0]], dtype=np.float32)
    w = pseudo_classifier(feats, [0, 0, 1, 2], 3)
    expected = np.array([[1, 1], [0.6, 0.8], [-1, 0]]) / np.array([[math.sqrt(2)], [1], [1]])
    np.testing.assert_allclose(w.numpy(), expected, rtol=1e-6)
    assert not w.requires_grad


def test_pseudo_classifier_refuses_a_class_without_images():
    with pytest.raises(ValueError, match=r"class\(es\) \[1\] have no training image"):
        pseudo_classifier([[1.0, 0.0], [0.0, 1.0]], [0, 2], 3)
    with pytest.raises(ValueError, match="is zero"):
        pseudo_classifier([[1.0, 0.0], [-1.0, 0.0]], [0, 0], 1)
    with pytest.raises(ValueError, match=r"labels must lie in 0 .. 1"):
        pseudo_classifier([[1.0, 0.0]], [2], 2)


def test_bct_pseudo_influence_hand_computed():
    # Two classes with means e1 and e2; feature z = (2, 0): logits (2, 0).
    w = torch.eye(2)
    z = torch.tensor([[2.0, 0.0], [2.0, 0.0]], requires_grad=True)
    y = torch.tensor([0, 1])  # class 1 is a class the old model never saw: it counts too
    loss = bct_pseudo_influence_loss(z, y, w)
    expected = (math.log(1 + math.exp(-2.0)) + math.log(1 + math.exp(2.0))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    # d/dz of CE through W_p = I: (softmax(z) - onehot) / B per row.
    p = 1 / (1 + math.exp(-2.0))
    np.testing.assert_allclose(z.grad.numpy(), [[(p - 1) / 2, (1 - p) / 2], [p / 2, (1 - p - 1) / 2]], rtol=1e-5)


def test_bct_pseudo_objective_adds_lambda_times_the_influence():
    new = build_model(ModelSpec("mlp", 4, 8), (6,), 3, seed=1)
    x, y = torch.randn(10, 6, generator=torch.Generator().manual_seed(0)), torch.arange(10) % 3
    w = torch.nn.functional.normalize(torch.randn(3, 4, generator=torch.Generator().manual_seed(1)), dim=1)
    ce = torch.nn.functional.cross_entropy(new.classifier(new.features(x)), y)
    influence = bct_pseudo_influence_loss(new.features(x), y, w)
    total = bct_pseudo_objective(w, lam=10.0)(new, x, y)
    assert total.item() == pytest.approx(ce.item() + 10.0 * influence.item(), rel=1e-5)
    total.backward()
    assert all(p.grad is not None for p in new.embedding.parameters())
    with pytest.raises(ValueError, match="lam must be non-negative"):
        bct_pseudo_objective(w, lam=-1.0)
    with pytest.raises(ValueError, match="BCT needs d_n = d_o"):
        bct_pseudo_influence_loss(torch.zeros(2, 5), torch.tensor([0, 1]), w)


def test_bct_pseudo_builds_trains_once_and_is_cached(data, tmp_path):
    ctx = _ctx(data, tmp_path)
    s = build_strategy("bct_pseudo", ctx)
    assert s.name == "bct_pseudo" and s.backbone_passes == 1 and s.queries_are_gallery
    np.testing.assert_array_equal(s.gallery_old, ctx.embeddings("old"))
    np.testing.assert_array_equal(s.gallery_new, ctx.embeddings("new_bct_pseudo"))
    assert not ctx.trained["new_bct_pseudo"]["cached"] and "λ=1" in ctx.trained["new_bct_pseudo"]["what"]
    again = _ctx(data, tmp_path)
    np.testing.assert_array_equal(build_strategy("bct_pseudo", again).gallery_new, s.gallery_new)
    assert again.trained["new_bct_pseudo"]["cached"]
    # λ changes the weights, so it is part of the checkpoint key: no stale model is loaded.
    other = _ctx(data, tmp_path, params=MethodParams(bct_pseudo_lambda=10.0))
    assert not np.array_equal(build_strategy("bct_pseudo", other).gallery_new, s.gallery_new)
    assert not other.trained["new_bct_pseudo"]["cached"]


def test_bct_pseudo_not_applicable_when_dimensions_differ(data, tmp_path):
    ctx = _ctx(data, tmp_path, setting="heterogeneous")
    with pytest.raises(NotApplicable, match="needs d_n = d_o"):
        build_strategy("bct_pseudo", ctx)
    assert "new_bct_pseudo" not in ctx.trained  # refused before any training


# --- rank_merge_calibrated -------------------------------------------------------------------------

from backfill_lib.backfill import (backfill_order, backfilled_mask, evaluate_backfill, fold_affine_scores,  # noqa: E402
                                   rank_merge, rank_merge_calibrated)
from backfill_lib.calibration import CALIBRATIONS, ScoreMap, fit_score_map, training_pairs  # noqa: E402
from core_helpers import unit  # noqa: E402
from reference_engine import average_precision  # noqa: E402


@pytest.fixture
def two_spaces(embeddings):
    old, new, labels = embeddings
    return old, new, labels


def _merged(q_old, g_old, q_new, g_new, mask):
    return np.where(mask[None, :], q_new @ g_new.T, q_old @ g_old.T)


@pytest.mark.parametrize("maps", [((2.0, -1.0), (5.0, 3.0)), ((0.3, 10.0), (40.0, -25.0)), ((1.0, 0.0), (1.0, 0.0))])
def test_folded_vectors_score_an_affine_image_of_the_calibrated_score(two_spaces, maps):
    old, new, _ = two_spaces
    s = rank_merge_calibrated(old, new, *maps)
    assert s.gallery_old.shape[1] == old.shape[1] + 1 and s.gallery_new.shape[1] == new.shape[1] + 1
    for m in (s.query_old, s.gallery_old, s.query_new, s.gallery_new):
        np.testing.assert_allclose(np.linalg.norm(m, axis=1), 1.0, atol=1e-6)  # the engine's requirement
    # Both spaces' folded scores are c·(t − m) with the SAME c > 0 and m: compare via two points.
    (ao, bo), (an, bn) = maps
    t_old, t_new = ao * (old @ old.T) + bo, an * (new @ new.T) + bn
    f_old, f_new = s.query_old @ s.gallery_old.T, s.query_new @ s.gallery_new.T
    t, f = np.concatenate([t_old.ravel(), t_new.ravel()]), np.concatenate([f_old.ravel(), f_new.ravel()])
    c, m0 = np.polyfit(t, f, 1)
    assert c > 0
    np.testing.assert_allclose(f, c * t + m0, atol=2e-6)


@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.7, 1.0])
def test_calibrated_merge_equals_brute_force_ranking(two_spaces, ratio):
    old, new, labels = two_spaces
    maps = (ScoreMap(3.0, -0.5, "platt"), ScoreMap(9.0, -4.0, "platt"))
    s = rank_merge_calibrated(old, new, *maps)
    mask = backfilled_mask(backfill_order(len(labels), seed=3), ratio)
    brute = np.where(mask[None, :], maps[1](new @ new.T), maps[0](old @ old.T))  # calibrated scores by hand
    folded = _merged(s.query_old, s.gallery_old, s.query_new, s.gallery_new, mask)
    np.fill_diagonal(brute, -np.inf), np.fill_diagonal(folded, -np.inf)       # leave-one-out
    np.testing.assert_array_equal(np.argsort(-folded, axis=1, kind="stable"), np.argsort(-brute, axis=1, kind="stable"))
    # ... and the engine's mAP is that of the brute-force ranking.
    curve = evaluate_backfill(s, labels, ratios=[ratio], order=backfill_order(len(labels), seed=3))
    relevant = labels[:, None] == labels[None, :]
    np.fill_diagonal(relevant, False)
    keep = ~np.eye(len(labels), dtype=bool)
    ap = average_precision(brute[keep].reshape(len(labels), -1), relevant[keep].reshape(len(labels), -1))
    assert curve.map[0] == pytest.approx(np.nanmean(ap), abs=1e-6)


def test_calibration_keeps_the_order_within_each_space_and_the_endpoints(two_spaces):
    old, new, labels = two_spaces
    s = rank_merge_calibrated(old, new, (0.5, 2.0), (20.0, -3.0))
    for raw, folded in ((old @ old.T, s.query_old @ s.gallery_old.T), (new @ new.T, s.query_new @ s.gallery_new.T)):
        np.testing.assert_array_equal(np.argsort(-folded, axis=1, kind="stable"), np.argsort(-raw, axis=1, kind="stable"))
    plain, cal = evaluate_backfill(rank_merge(old, new), labels), evaluate_backfill(s, labels)
    assert cal.map[0] == pytest.approx(plain.map[0]) and cal.map[-1] == pytest.approx(plain.map[-1])  # r=0, r=1
    assert s.backbone_passes == 2 and s.queries_are_gallery


def test_calibration_changes_how_the_spaces_interleave(rng):
    # Old scores sit high for everyone (a crowded old space), new ones are spread: plain rank merge
    # lets every old-stored item outrank the new-stored ones; calibration interleaves by relevance.
    n, labels = 80, np.repeat(np.arange(4), 20)
    centres = unit(rng.normal(size=(4, 6)))
    old = unit(np.ones(6) * 3 + centres[labels] * 0.6 + 0.4 * rng.normal(size=(n, 6)))
    new = unit(centres[labels] + 0.3 * rng.normal(size=(n, 6)))
    maps = [fit_score_map(e, labels) for e in (old, new)]
    plain = evaluate_backfill(rank_merge(old, new), labels, ratios=[0, 0.5, 1])
    cal = evaluate_backfill(rank_merge_calibrated(old, new, *maps), labels, ratios=[0, 0.5, 1])
    assert cal.map[1] > plain.map[1] + 0.05, (plain.map, cal.map)


def test_platt_fit_matches_sklearn_logistic_regression(rng):
    from sklearn.linear_model import LogisticRegression

    labels = np.repeat(np.arange(3), 15)
    e = unit(rng.normal(size=(3, 5))[labels] + 0.8 * rng.normal(size=(45, 5)))
    m = fit_score_map(e, labels, "platt")
    i, j, rel = training_pairs(labels)
    s = np.einsum("pd,pd->p", e[i], e[j])
    ref = LogisticRegression(C=1e6, tol=1e-10, max_iter=10_000).fit(s[:, None], rel)
    assert m.scale == pytest.approx(ref.coef_[0, 0], rel=2e-2) and m.offset == pytest.approx(ref.intercept_[0], rel=2e-2)
    neg = fit_score_map(e, labels, "negatives")
    assert neg(s[~rel]).mean() == pytest.approx(0.0, abs=1e-9) and neg(s[~rel]).std() == pytest.approx(1.0)
    assert m.n_pairs == len(s) == 45 * 44 // 2


def test_training_pairs_subsample_is_seeded_and_shared():
    labels = np.arange(50) % 5
    a, b = training_pairs(labels, max_items=10, seed=1), training_pairs(labels, max_items=10, seed=1)
    assert all(np.array_equal(x, y) for x, y in zip(a, b)) and len(a[0]) == 45 and (a[0] < a[1]).all()
    assert not np.array_equal(training_pairs(labels, max_items=10, seed=2)[0], a[0])


def test_calibration_errors():
    e = unit(np.eye(3))
    with pytest.raises(ValueError, match="unknown calibration 'ecdf'; choose one of: platt, negatives"):
        fit_score_map(e, [0, 1, 2], "ecdf")
    with pytest.raises(ValueError, match="all relevant or all irrelevant"):
        fit_score_map(e, [0, 1, 2])
    anti = unit(np.array([[1.0, 0.0], [-1.0, 0.0], [0.6, 0.8], [-0.6, -0.8]]))  # relevant pairs score -1
    for method in ("platt", "negatives"):       # the labelled ones: the label-free ones never see relevance
        with pytest.raises(ValueError, match="do not score higher"):
            fit_score_map(anti, [0, 0, 1, 1], method)
    with pytest.raises(ValueError, match="scale must be positive"):
        ScoreMap(-1.0, 0.0, "platt")
    with pytest.raises(ValueError, match="old_map must be an increasing affine map"):
        rank_merge_calibrated(e, e, (0.0, 1.0), (1.0, 0.0))
    with pytest.raises(ValueError, match="maps is empty"):
        fold_affine_scores([])
    with pytest.raises(ValueError, match="unknown calibration 'x'"):
        MethodParams(calibration="x")
    assert set(CALIBRATIONS) == {"platt", "negatives", "znorm", "neighbours"} and MethodParams().calibration == "platt"


@pytest.mark.parametrize("method", CALIBRATIONS)
def test_rank_merge_calibrated_strategy_fits_on_training_pairs_only(data, tmp_path, method):
    ctx = _ctx(data, tmp_path, params=MethodParams(calibration=method))
    s = build_strategy("rank_merge_calibrated", ctx)
    expected = [fit_score_map(ctx.embeddings(r, split="train"), data.train_labels, method, seed=0) for r in ("old", "new")]
    ref = rank_merge_calibrated(ctx.embeddings("old"), ctx.embeddings("new"), *expected)
    for a in ("query_old", "gallery_old", "query_new", "gallery_new"):
        np.testing.assert_array_equal(getattr(s, a), getattr(ref, a))
    assert s.name == "rank_merge_calibrated" and s.backbone_passes == 2
    assert method in ctx.trained["rank_merge_calibrated"]["what"]


# --- RA-BCT top-k negatives ------------------------------------------------------------------------

from backfill_lib.losses import ra_bct_loss, ra_bct_objective  # noqa: E402


def _ra_bct_by_hand(new, old, y, tau, topk):
    total = 0.0
    for i in range(len(y)):
        pos = float(new[i] @ old[i]) / tau
        negs = []
        for bank in (old, new):
            s = sorted((float(new[i] @ bank[j]) / tau for j in range(len(y)) if y[j] != y[i]), reverse=True)
            negs += s if topk is None else s[:topk]
        total += -pos + math.log(math.exp(pos) + sum(math.exp(v) for v in negs))
    return total / len(y)


@pytest.mark.parametrize("topk", [None, 1, 2, 100])
def test_ra_bct_topk_matches_a_hand_computation(topk):
    g = torch.Generator().manual_seed(3)
    new = torch.nn.functional.normalize(torch.randn(7, 4, generator=g), dim=1)
    old = torch.nn.functional.normalize(torch.randn(7, 4, generator=g), dim=1)
    y = torch.tensor([0, 0, 1, 1, 2, 2, 2])
    got = ra_bct_loss(new, old, y, tau=0.5, topk=topk).item()
    assert got == pytest.approx(_ra_bct_by_hand(new.numpy(), old.numpy(), y.numpy(), 0.5, topk), rel=1e-5)


def test_ra_bct_topk_none_or_large_is_the_published_loss_and_small_is_smaller():
    g = torch.Generator().manual_seed(4)
    new = torch.nn.functional.normalize(torch.randn(12, 5, generator=g), dim=1)
    old = torch.nn.functional.normalize(torch.randn(12, 5, generator=g), dim=1)
    y = torch.arange(12) % 3
    full = ra_bct_loss(new, old, y)
    assert ra_bct_loss(new, old, y, topk=12).item() == full.item()
    assert ra_bct_loss(new, old, y, topk=2).item() < full.item()  # fewer terms in the denominator
    with pytest.raises(ValueError, match="topk must be a positive integer"):
        ra_bct_loss(new, old, y, topk=0)
    with pytest.raises(TypeError, match="topk must be a positive integer"):
        ra_bct_objective(torch.nn.Linear(2, 2), topk=1.5)
    with pytest.raises(ValueError, match=r"ra_bct_topk must be a positive integer \(negatives kept per anchor and "
                                         r"set\) or None, got 0"):
        MethodParams(ra_bct_topk=0)
    with pytest.raises(TypeError, match="ra_bct_topk must be a positive integer"):
        MethodParams(ra_bct_topk=True)


def test_ra_bct_topk_is_part_of_the_checkpoint_key(data, tmp_path):
    default = _ctx(data, tmp_path)
    build_strategy("ra_bct", default)
    assert "top-" not in default.trained["new_ra_bct"]["what"]
    top = _ctx(data, tmp_path, params=MethodParams(ra_bct_topk=2))
    s = build_strategy("ra_bct", top)
    assert not top.trained["new_ra_bct"]["cached"] and "top-2 negatives" in top.trained["new_ra_bct"]["what"]
    assert not np.array_equal(s.gallery_new, default.embeddings("new_ra_bct"))
    assert top._keys["new_ra_bct"] != default._keys["new_ra_bct"]


# --- validation.check_positive_int (the shared positive-int check; here because this helper owns
# no test file of validation.py) --------------------------------------------------------------------

from backfill_lib.validation import check_positive_int  # noqa: E402


def test_check_positive_int():
    assert check_positive_int(3, "steps") == 3 and type(check_positive_int(np.int64(2), "k")) is int
    assert check_positive_int(None, "topk", allow_none=True) is None
    with pytest.raises(ValueError, match=r"^n must be a positive integer \(gallery size\), got 0$"):
        check_positive_int(0, "n", "gallery size")
    with pytest.raises(ValueError, match=r"^k must be a positive integer or None, got -2$"):
        check_positive_int(-2, "k", allow_none=True)
    for bad in (1.5, True, "3", None):
        with pytest.raises(TypeError, match="steps must be a positive integer"):
            check_positive_int(bad, "steps")


# ---- loss weights and temperatures: NaN, infinities and non-numbers are refused ------------------

from backfill_lib.losses import bct_objective, metric_compatible_loss  # noqa: E402


@pytest.mark.parametrize("field, value, error, message", [
    ("bct_lambda", float("nan"), ValueError, r"bct_lambda must be non-negative \(a loss weight\), got nan"),
    ("ra_bct_lambda", -0.5, ValueError, "ra_bct_lambda must be non-negative"),
    ("bct_pseudo_lambda", float("inf"), ValueError, "bct_pseudo_lambda must be non-negative"),
    ("mct_lambda_rt", "1", TypeError, "mct_lambda_rt must be a real number"),
    ("mct_tau", 0.0, ValueError, r"mct_tau must be positive \(a temperature\), got 0.0"),
    ("ra_bct_tau", float("nan"), ValueError, "ra_bct_tau must be positive"),
    ("transform_steps", 0, ValueError, "transform_steps must be a positive integer"),
])
def test_method_params_refuse_bad_weights_and_temperatures(field, value, error, message):
    with pytest.raises(error, match=message):
        MethodParams(**{field: value})


def test_losses_refuse_a_nan_weight_or_temperature():
    # `nan < 0` is False: before the check named the value, a NaN weight made every loss NaN.
    with pytest.raises(ValueError, match="lam must be non-negative"):
        bct_objective(torch.nn.Linear(2, 2), [0, 1], lam=float("nan"))
    with pytest.raises(ValueError, match="tau must be positive"):
        ra_bct_loss(torch.zeros(2, 2), torch.zeros(2, 2), torch.tensor([0, 1]), tau=float("nan"))
    z = torch.nn.functional.normalize(torch.randn(4, 3, generator=torch.Generator().manual_seed(0)), dim=1)
    with pytest.raises(ValueError, match="tau must be positive"):
        metric_compatible_loss(z, z, z, torch.arange(4) % 2, tau=float("nan"))


@pytest.mark.parametrize("labels", [[0.0, 1.7, 1.0, 2.0], np.array([0, 1, 2**64 - 1, 2], dtype=np.uint64)])
def test_pseudo_classifier_refuses_labels_a_cast_would_change(labels):
    # .long() turned 1.7 into 1 and wrapped huge unsigned labels round to negatives
    feats = np.eye(4, 3, dtype=np.float32) + 0.1
    with pytest.raises((TypeError, ValueError), match="labels"):
        pseudo_classifier(feats, labels, 3)
