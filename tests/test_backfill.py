"""The backfill engine: strategies of METHOD §2, backfill order and masks, curves along the backfill."""

import numpy as np
import pytest

from backfill_lib.backfill import (DEFAULT_RATIOS, BackfillCurve, Strategy, backfill_order, backfilled_mask,
                                   compatible_single_space, evaluate_backfill, forward_transform, offline_backfill,
                                   new_query_on_stored, old_only, rank_merge, reverse_transform, same_model,
                                   simulate_backfill)
from backfill_lib.metrics import average_precision, same_label
from backfill_lib.retrieval import MixedGallery
from core_helpers import unit


def _same(a, b):
    return np.array_equal(a, np.asarray(b, dtype=np.float32))


class TestStrategyConstructors:
    """Each constructor stores what METHOD §2's table says is compared with what."""

    @pytest.fixture
    def spaces(self, rng):
        n = 12
        return {name: unit(rng.normal(size=(n, d))) for name, d in
                (("old", 4), ("new", 5), ("psi", 4), ("rho", 5), ("h_old", 5))}

    def test_old_only(self, spaces):
        s = old_only(spaces["old"])
        assert (s.name, s.backbone_passes, s.offline) == ("old", 1, False)
        assert all(_same(a, spaces["old"]) for a in (s.query_old, s.gallery_old, s.query_new, s.gallery_new))

    def test_same_model_is_old_only_or_new_new(self, spaces, rng):
        s = same_model(spaces["old"])
        ref = old_only(spaces["old"])
        assert (s.name, s.backbone_passes, s.offline, s.queries_are_gallery) == ("old", 1, False, True)
        assert all(_same(getattr(s, f), getattr(ref, f)) for f in ("query_old", "gallery_old", "query_new", "gallery_new"))
        q = unit(rng.normal(size=(3, 5)))
        n = same_model(spaces["new"], q, name="new")
        assert n.name == "new" and n.queries_are_gallery is False
        assert _same(n.query_old, q) and _same(n.query_new, q) and _same(n.gallery_new, spaces["new"])
        # new/new's curve is flat at new/new's mAP: the same at r = 0 and r = 1
        labels = np.arange(12) % 3
        curve = evaluate_backfill(same_model(spaces["new"], name="new"), labels, ratios=[0.0, 1.0])
        assert curve.map[0] == curve.map[1]
        with pytest.raises(TypeError, match="name"):
            same_model(spaces["old"], name="")

    def test_new_query_on_stored_is_the_single_space_rule(self, spaces):
        new4 = unit(spaces["new"][:, :4])
        s = new_query_on_stored(spaces["old"], new4)
        assert (s.name, s.backbone_passes) == ("new_on_old", 1)
        assert _same(s.query_old, new4) and _same(s.gallery_old, spaces["old"]) and _same(s.gallery_new, new4)
        with pytest.raises(ValueError):
            new_query_on_stored(spaces["old"], spaces["new"])     # 4 vs 5 dimensions

    def test_offline_backfill(self, spaces):
        s = offline_backfill(spaces["old"], spaces["new"])
        assert (s.name, s.backbone_passes, s.offline) == ("offline", 1, True)
        assert _same(s.query_old, spaces["old"]) and _same(s.gallery_old, spaces["old"])
        assert _same(s.query_new, spaces["new"]) and _same(s.gallery_new, spaces["new"])

    def test_compatible_single_space(self, spaces):
        # φ_n(q) against whatever is stored: old vectors before the backfill, new ones after.
        new4 = unit(spaces["new"][:, :4])
        s = compatible_single_space(spaces["old"], new4, name="bct")
        assert (s.name, s.backbone_passes, s.offline) == ("bct", 1, False)
        assert _same(s.query_old, new4) and _same(s.gallery_old, spaces["old"])
        assert _same(s.query_new, new4) and _same(s.gallery_new, new4)

    def test_rank_merge(self, spaces):
        s = rank_merge(spaces["old"], spaces["new"])
        assert (s.name, s.backbone_passes, s.offline) == ("rank_merge", 2, False)
        assert _same(s.query_old, spaces["old"]) and _same(s.gallery_old, spaces["old"])
        assert _same(s.query_new, spaces["new"]) and _same(s.gallery_new, spaces["new"])

    def test_reverse_transform(self, spaces):
        s = reverse_transform(spaces["old"], spaces["psi"], spaces["rho"])
        assert (s.name, s.backbone_passes, s.offline) == ("reverse_transform", 1, False)
        assert _same(s.query_old, spaces["psi"]) and _same(s.gallery_old, spaces["old"])
        assert _same(s.query_new, spaces["rho"]) and _same(s.gallery_new, spaces["rho"])

    def test_forward_transform(self, spaces):
        s = forward_transform(spaces["h_old"], spaces["new"])
        assert (s.name, s.backbone_passes, s.offline) == ("forward_transform", 1, False)
        assert _same(s.query_old, spaces["new"]) and _same(s.gallery_old, spaces["h_old"])
        assert _same(s.query_new, spaces["new"]) and _same(s.gallery_new, spaces["new"])

    def test_separate_queries(self, spaces, rng):
        qo, qn = unit(rng.normal(size=(3, 4))), unit(rng.normal(size=(3, 5)))
        s = rank_merge(spaces["old"], spaces["new"], old_query=qo, new_query=qn)
        assert s.n_queries == 3 and s.n_gallery == 12
        assert _same(s.query_old, qo) and _same(s.query_new, qn)

    def test_bad_input(self, spaces):
        with pytest.raises(ValueError, match="gallery_old has 12 items but gallery_new has 11"):
            rank_merge(spaces["old"], spaces["new"][:11])
        with pytest.raises(ValueError, match="query_old has dimension 5 but 4 is expected"):
            compatible_single_space(spaces["old"], spaces["new"])
        with pytest.raises(ValueError, match="query_old has 3 rows but query_new has 2"):
            rank_merge(spaces["old"], spaces["new"], old_query=spaces["old"][:3], new_query=spaces["new"][:2])
        bad = spaces["new"].copy()
        bad[0, 0] = np.nan
        with pytest.raises(ValueError, match="gallery_new contains NaN"):
            rank_merge(spaces["old"], bad, new_query=spaces["new"])


class TestBackfillOrder:
    def test_seeded_permutation(self):
        a, b = backfill_order(50, seed=3), backfill_order(50, seed=3)
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(np.sort(a), np.arange(50))
        assert not np.array_equal(a, backfill_order(50, seed=4))

    def test_uncertain_first(self):
        u = np.array([0.1, 0.9, 0.5, 0.9, 0.0])
        order = backfill_order(5, seed=0, policy="uncertain_first", uncertainty=u)
        np.testing.assert_array_equal(u[order], [0.9, 0.9, 0.5, 0.1, 0.0])
        assert set(order[:2].tolist()) == {1, 3}

    def test_class_coverage_is_round_robin_over_groups(self, rng):
        groups = rng.integers(0, 4, size=40)
        groups[:3] = 4  # a small group of 3
        order = backfill_order(40, seed=2, policy="class_coverage", groups=groups)
        np.testing.assert_array_equal(np.sort(order), np.arange(40))
        sizes = np.bincount(groups)
        # Item k's round = how many of its group were backfilled before it: rounds never go back, and
        # round t holds one item of every group with more than t items.
        rounds = np.array([np.sum(groups[order[:k]] == groups[order[k]]) for k in range(40)])
        assert (np.diff(rounds) >= 0).all()
        np.testing.assert_array_equal(np.bincount(rounds), [(sizes > t).sum() for t in range(sizes.max())])
        assert set(order[:15].tolist()) >= set(np.flatnonzero(groups == 4).tolist())  # small group done in round 3
        np.testing.assert_array_equal(order, backfill_order(40, seed=2, policy="class_coverage", groups=groups))
        assert not np.array_equal(order, backfill_order(40, seed=3, policy="class_coverage", groups=groups))

    def test_policies_keep_the_random_order_backward_compatible(self):
        np.testing.assert_array_equal(backfill_order(30, seed=5), np.random.default_rng(5).permutation(30))
        np.testing.assert_array_equal(backfill_order(30, seed=5, policy="random", groups=np.zeros(30, int)),
                                      backfill_order(30, seed=5))
        one_group = backfill_order(30, seed=5, policy="class_coverage", groups=np.zeros(30, int))
        np.testing.assert_array_equal(one_group, backfill_order(30, seed=5))  # one group: the random order

    def test_bad_input(self):
        with pytest.raises(ValueError, match="needs groups"):
            backfill_order(5, policy="class_coverage")
        with pytest.raises(ValueError, match="groups must hold 5 integers"):
            backfill_order(5, policy="class_coverage", groups=[0.5] * 5)
        with pytest.raises(ValueError, match="groups must hold 5 integers"):
            backfill_order(5, policy="class_coverage", groups=[0] * 4)
        with pytest.raises(ValueError, match=r"n must be a positive integer \(gallery size\), got 0"):
            backfill_order(0)
        with pytest.raises(TypeError, match="n must be a positive integer"):
            backfill_order(2.5)
        with pytest.raises(ValueError, match="unknown policy 'oldest'"):
            backfill_order(5, policy="oldest")
        with pytest.raises(ValueError, match="needs uncertainty"):
            backfill_order(5, policy="uncertain_first")
        with pytest.raises(ValueError, match="uncertainty must hold 5 finite values"):
            backfill_order(5, policy="uncertain_first", uncertainty=[0.1] * 4)


class TestBackfilledMask:
    def test_hand_computed(self):
        order = [3, 1, 0, 2]
        np.testing.assert_array_equal(backfilled_mask(order, 0.5), [False, True, False, True])
        np.testing.assert_array_equal(backfilled_mask(order, 0.25), [False, False, False, True])
        assert not backfilled_mask(order, 0).any()
        assert backfilled_mask(order, 1).all()

    def test_size_is_round_r_n_and_masks_are_nested(self):
        order = backfill_order(37, seed=1)
        previous = np.zeros(37, dtype=bool)
        for r in DEFAULT_RATIOS:
            mask = backfilled_mask(order, r)
            assert mask.sum() == round(r * 37)
            assert (mask >= previous).all()  # once backfilled, an item stays backfilled
            previous = mask

    def test_bad_input(self):
        with pytest.raises(ValueError, match=r"ratio must lie in \[0, 1\]"):
            backfilled_mask([0, 1], 1.5)
        with pytest.raises(ValueError, match=r"ratio must lie in \[0, 1\]"):
            backfilled_mask([0, 1], -0.1)
        with pytest.raises(ValueError, match=r"order must be a permutation of range\(3\)"):
            backfilled_mask([0, 0, 1], 0.5)
        with pytest.raises(ValueError, match=r"order must be a permutation of range\(2\)"):
            backfilled_mask([0.0, 1.0], 0.5)
        with pytest.raises(ValueError, match="order must be a 1-D permutation"):
            backfilled_mask(3, 0.5)


class TestEvaluateBackfill:
    def test_rank_merge_endpoints(self, embeddings):
        """METHOD §2: at r = 0 rank merge is old/old retrieval, at r = 1 new/new."""
        old, new, y = embeddings
        rm = evaluate_backfill(rank_merge(old, new), y)
        oo, nn = evaluate_backfill(old_only(old), y), evaluate_backfill(old_only(new), y)
        for metric in ("map", "top1", "top5"):
            assert getattr(rm, metric)[0] == getattr(oo, metric)[0]
            assert getattr(rm, metric)[-1] == getattr(nn, metric)[0]
        np.testing.assert_array_equal(rm.ratios, DEFAULT_RATIOS)
        assert rm.backbone_passes == 2 and rm.strategy == "rank_merge"
        assert nn.map[0] > oo.map[0]  # the fixture's new space is the better one

    def test_offline_is_a_step(self, embeddings):
        old, new, y = embeddings
        off = evaluate_backfill(offline_backfill(old, new), y)
        oo, nn = evaluate_backfill(old_only(old), y), evaluate_backfill(old_only(new), y)
        np.testing.assert_array_equal(off.map[:-1], oo.map[:-1])
        assert off.map[-1] == nn.map[0]

    def test_old_only_is_flat_with_no_flips(self, embeddings):
        old, _, y = embeddings
        c = evaluate_backfill(old_only(old), y)
        assert np.all(c.map == c.map[0]) and np.all(c.negative_flips == 0)
        assert c.auc_map == pytest.approx(c.map[0])

    def test_map_matches_leave_one_out_by_hand(self, embeddings):
        old, new, y = embeddings
        r = 0.4
        order = backfill_order(len(y), seed=5)
        curve = evaluate_backfill(rank_merge(old, new), y, ratios=[0, r, 1], order=order)
        mask = backfilled_mask(order, r)
        scores = np.where(mask[None, :], new @ new.T, old @ old.T).astype(np.float64)
        np.fill_diagonal(scores, -np.inf)
        relevant = same_label(y, y)
        np.fill_diagonal(relevant, False)
        assert curve.map[1] == pytest.approx(np.nanmean(average_precision(scores, relevant)), abs=1e-6)

    @pytest.mark.parametrize("seed,ratio", [(0, 0.3), (1, 0.5), (2, 0.8)])
    def test_top1_agrees_with_mixed_gallery_search(self, embeddings, seed, ratio):
        old, new, y = embeddings
        n = len(y)
        order = backfill_order(n, seed=seed)
        curve = evaluate_backfill(rank_merge(old, new), y, ratios=[0, ratio, 1], order=order)
        mask = backfilled_mask(order, ratio)
        mg = MixedGallery(old, new_dim=new.shape[1])
        mg.backfill(np.flatnonzero(mask), new[mask])
        _, ids = mg.search(old, new, k=5, exclude_ids=np.arange(n))
        np.testing.assert_array_equal(curve.per_query_top1[1], y[ids[:, 0]] == y)
        assert curve.top5[1] == pytest.approx(np.mean((y[ids] == y[:, None]).any(axis=1)))

    def test_negative_flips_against_reference(self, embeddings):
        old, new, y = embeddings
        ref = evaluate_backfill(old_only(old), y, ratios=[0]).per_query_top1[0]
        c = evaluate_backfill(compatible_single_space(old[:, :6], unit(new[:, :6]), name="c"), y,
                              reference_top1=ref)
        expected = [np.mean(ref & ~hit) for hit in c.per_query_top1]
        np.testing.assert_allclose(c.negative_flips, expected)

    def test_default_flip_reference_is_r0_even_when_r0_not_asked(self, embeddings):
        old, new, y = embeddings
        full = evaluate_backfill(rank_merge(old, new), y, ratios=[0, 0.5, 1])
        part = evaluate_backfill(rank_merge(old, new), y, ratios=[0.5, 1])
        np.testing.assert_array_equal(part.ratios, [0.5, 1])
        np.testing.assert_allclose(part.negative_flips, full.negative_flips[1:])
        np.testing.assert_allclose(part.map, full.map[1:])
        assert part.per_query_top1.shape == (2, len(y))

    def test_chunks_do_not_change_results(self, embeddings):
        old, new, y = embeddings
        a = evaluate_backfill(rank_merge(old, new), y, chunk_size=7)
        b = evaluate_backfill(rank_merge(old, new), y)
        np.testing.assert_allclose(a.map, b.map)
        np.testing.assert_array_equal(a.per_query_top1, b.per_query_top1)

    def test_separate_query_set(self, embeddings, rng):
        old, new, y = embeddings
        c = evaluate_backfill(rank_merge(old, new, old_query=old[:10], new_query=new[:10]), y[:10],
                              gallery_labels=y, exclude_self=False, ratios=[0, 1])
        assert c.per_query_top1.shape == (2, 10)
        assert c.top1[0] == 1.0  # every query finds itself first without leave-one-out

    def test_bad_input(self, embeddings):
        old, new, y = embeddings
        s = rank_merge(old, new)
        with pytest.raises(TypeError, match="strategy must be a Strategy"):
            evaluate_backfill((old, new), y)
        with pytest.raises(ValueError, match="query_labels has 59 labels but there are 60 items"):
            evaluate_backfill(s, y[:-1])
        with pytest.raises(ValueError, match=r"ratios\[1\] must lie in \[0, 1\]"):
            evaluate_backfill(s, y, ratios=[0, 1.2])
        with pytest.raises(ValueError, match=r"order must be a permutation of range\(60\)"):
            evaluate_backfill(s, y, order=np.zeros(60, dtype=int))
        with pytest.raises(ValueError, match=r"reference_top1 must hold one bool per query \(60\)"):
            evaluate_backfill(s, y, reference_top1=[True])
        with pytest.raises(ValueError, match="at least 5 searchable items"):
            evaluate_backfill(rank_merge(old[:5], new[:5]), y[:5])
        separate = rank_merge(old, new, old_query=old[:3], new_query=new[:3])
        with pytest.raises(ValueError, match="exclude_self=True but strategy 'rank_merge' has separate queries"):
            evaluate_backfill(separate, y[:3], gallery_labels=y, exclude_self=True)
        with pytest.raises(ValueError, match="gallery_labels is needed"):
            evaluate_backfill(separate, y[:3])
        with pytest.raises(TypeError, match="exclude_self must be True, False or None"):
            evaluate_backfill(s, y, exclude_self="yes")

    @pytest.mark.parametrize("bad,error", [(-1, ValueError), (0, ValueError), (2.5, TypeError), (True, TypeError)])
    def test_chunk_size_is_checked(self, embeddings, bad, error):
        """Issue 7: chunk_size=-1 gave all-zero mAP, 0 a bare range() error."""
        old, new, y = embeddings
        with pytest.raises(error, match="chunk_size must be"):
            evaluate_backfill(rank_merge(old, new), y, chunk_size=bad)

    def test_chunk_size_one_and_larger_than_queries(self, embeddings):
        old, new, y = embeddings
        a = evaluate_backfill(rank_merge(old, new), y, chunk_size=1)
        b = evaluate_backfill(rank_merge(old, new), y, chunk_size=10_000)
        np.testing.assert_allclose(a.map, b.map, rtol=0, atol=1e-12)
        np.testing.assert_array_equal(a.per_query_top1, b.per_query_top1)


class TestLeaveOneOut:
    """Issue 7: a separate query set with N rows used to lose gallery item i for query i."""

    def test_constructors_record_whether_queries_are_the_gallery(self, embeddings):
        old, new, _ = embeddings
        assert rank_merge(old, new).queries_are_gallery is True
        assert old_only(old, old_query=old[:7]).queries_are_gallery is False  # 7 queries, 60 items
        assert old_only(old, old_query=old[::-1].copy()).queries_are_gallery is None  # 60 for 60: unsaid
        assert old_only(old, old_query=old, queries_are_gallery=True).queries_are_gallery is True
        assert reverse_transform(old, old, new, psi_query=old[:2], rho_query=new[:2]).queries_are_gallery is False
        with pytest.raises(ValueError, match="queries_are_gallery=True but there are 7 queries for 60"):
            old_only(old, old_query=old[:7], queries_are_gallery=True)
        with pytest.raises(TypeError, match="queries_are_gallery must be True, False or None"):
            old_only(old, queries_are_gallery="yes")

    def test_separate_queries_of_gallery_size_keep_every_item(self, embeddings):
        old, new, y = embeddings
        # The queries are copies of the gallery items, but declared separate: item i stays in the
        # ranking of query i, so every query finds itself first.
        s = rank_merge(old, new, old_query=old.copy(), new_query=new.copy(), queries_are_gallery=False)
        c = evaluate_backfill(s, y, gallery_labels=y, ratios=[0, 0.5, 1])
        assert np.all(c.top1 == 1.0)
        loo = evaluate_backfill(rank_merge(old, new), y, ratios=[0, 0.5, 1])
        assert np.all(loo.top1 < 1.0)

    def test_undecided_is_refused_until_decided(self, embeddings):
        old, new, y = embeddings
        s = old_only(old, old_query=old.copy())
        with pytest.raises(ValueError, match="queries_are_gallery=True/False"):
            evaluate_backfill(s, y)
        decided = evaluate_backfill(old_only(old, old_query=old.copy(), queries_are_gallery=True), y, ratios=[0])
        np.testing.assert_allclose(evaluate_backfill(s, y, exclude_self=True, ratios=[0]).map, decided.map)
        np.testing.assert_allclose(decided.map, evaluate_backfill(old_only(old), y, ratios=[0]).map)

    def test_exclude_self_false_on_the_gallery_keeps_self(self, embeddings):
        old, _, y = embeddings
        c = evaluate_backfill(old_only(old), y, ratios=[0], exclude_self=False)
        assert c.top1[0] == 1.0

    def test_simulate_with_separate_queries(self, embeddings):
        old, new, y = embeddings
        qo, qn = old[:12], new[:12]
        curves = simulate_backfill([old_only(old, old_query=qo), rank_merge(old, new, old_query=qo, new_query=qn)],
                                   y, ratios=[0, 1], query_labels=y[:12])
        assert curves["rank_merge"].per_query_top1.shape == (2, 12)
        assert curves["old"].top1[0] == 1.0  # not leave-one-out: each query is in the gallery
        with pytest.raises(ValueError, match="must share the gallery and the queries"):
            simulate_backfill([old_only(old), rank_merge(old, new, old_query=qo, new_query=qn)], y)


class TestUnitNorm:
    """Issue 7: rows far from unit norm (e.g. 0.5 * new) were accepted silently."""

    def test_half_norm_is_refused_with_advice(self, embeddings):
        old, new, _ = embeddings
        with pytest.raises(ValueError, match=r"gallery_new must have unit-norm rows.*normalize_rows"):
            rank_merge(old, 0.5 * new)
        with pytest.raises(ValueError, match="query_old must have unit-norm rows"):
            old_only(old, old_query=2 * old[:3])

    def test_complex_and_zero_columns_are_refused(self, embeddings):
        old, new, _ = embeddings
        with pytest.raises(TypeError, match="real-valued"):
            rank_merge(old.astype(complex), new)
        with pytest.raises(ValueError, match="0 columns"):
            rank_merge(np.zeros((60, 0)), new)


class TestCurve:
    def test_auc_gain_and_map_at(self):
        c = BackfillCurve("x", np.array([0, 0.5, 1.0]), map=np.array([0.5, 0.5, 1.0]), top1=np.array([0, 1, 1.0]),
                          top5=np.ones(3), negative_flips=np.zeros(3))
        assert c.auc_map == pytest.approx(0.625)
        assert c.auc_top1 == pytest.approx(0.75)
        assert c.relative_gain(old_old=0.5, new_new=1.0) == pytest.approx(0.25)
        assert c.map_at(0.5) == 0.5
        with pytest.raises(ValueError, match=r"ratio 0.3 was not evaluated"):
            c.map_at(0.3)

    def test_map_at_on_a_float32_grid(self, embeddings):
        """Issue 7: a curve evaluated on np.arange(0, 1.01, .1, dtype="float32") refused map_at(0.3)."""
        old, new, y = embeddings
        grid = np.arange(0, 1.01, 0.1, dtype="float32")
        c = evaluate_backfill(rank_merge(old, new), y, ratios=grid)
        assert c.map_at(0.3) == c.map[3]
        assert c.map_at(np.float32(0.7)) == c.map[7]
        with pytest.raises(ValueError, match="ratio 0.35 was not evaluated"):
            c.map_at(0.35)


class TestSimulate:
    def test_one_order_for_all_and_flips_against_old(self, embeddings):
        old, new, y = embeddings
        curves = simulate_backfill([old_only(old), rank_merge(old, new)], y, order_seed=2)
        assert list(curves) == ["old", "rank_merge"]
        assert np.all(curves["old"].negative_flips == 0)
        order = backfill_order(len(y), 2)
        ref = curves["old"].per_query_top1[0]
        direct = evaluate_backfill(rank_merge(old, new), y, order=order, reference_top1=ref)
        np.testing.assert_allclose(curves["rank_merge"].map, direct.map)
        np.testing.assert_allclose(curves["rank_merge"].negative_flips, direct.negative_flips)

    def test_dict_input_and_errors(self, embeddings):
        old, new, y = embeddings
        out = simulate_backfill({"a": rank_merge(old, new)}, y, ratios=[0, 1])
        assert set(out) == {"rank_merge"}
        with pytest.raises(ValueError, match="strategies is empty"):
            simulate_backfill([], y)
        with pytest.raises(ValueError, match="strategy names must be unique"):
            simulate_backfill([old_only(old), old_only(new)], y)


def test_strategy_is_frozen(embeddings):
    old, new, _ = embeddings
    s = rank_merge(old, new)
    assert isinstance(s, Strategy)
    with pytest.raises(AttributeError):
        s.name = "other"
