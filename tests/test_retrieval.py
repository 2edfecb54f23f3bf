"""Exact search on faiss, leave-one-out, and the mixed gallery of an online backfill."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from backfill_lib.retrieval import Gallery, MixedGallery, merge_topk, score_matrix, search
from backfill_lib.validation import normalize_rows
from core_helpers import unit


def tie_ranking(scores, ids):
    """Reference order of the tie rule: descending score, then smaller id (per row)."""
    ids = np.broadcast_to(ids, scores.shape)
    return np.lexsort((ids, -scores), axis=-1)


def signed_axes(rng, n, d):
    """``n`` vectors ``±e_j``: inner products with any query are exact copies of its coordinates,
    so equal coordinates are exact ties in faiss, numpy and the float64 reference alike."""
    x = np.zeros((n, d), dtype=np.float32)
    x[np.arange(n), rng.integers(0, d, size=n)] = rng.choice([-1.0, 1.0], size=n)
    return x


def tied_queries(rng, n, d):
    """Unit queries with few distinct coordinate values, so different axes tie too."""
    q = rng.integers(-2, 3, size=(n, d)).astype(np.float64)
    q[(q == 0).all(axis=1), 0] = 1.0
    return normalize_rows(q)


class TestGallery:
    def test_add_search_remove(self):
        g = Gallery(2)
        g.add(np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]), ids=[10, 20, 30])
        assert g.ntotal == len(g) == 3
        np.testing.assert_array_equal(g.ids, [10, 20, 30])
        scores, ids = g.search(np.array([[1.0, 0.0]]), k=3)
        np.testing.assert_array_equal(ids, [[10, 30, 20]])
        np.testing.assert_allclose(scores, [[1.0, 0.6, 0.0]], atol=1e-6)
        assert g.remove_ids([30]) == 1
        assert g.remove_ids([]) == 0
        np.testing.assert_array_equal(g.search(np.array([[0.6, 0.8]]), k=2)[1], [[20, 10]])

    def test_default_ids_count_on(self):
        g = Gallery(2)
        g.add(unit(np.ones((2, 2))))
        g.add(unit(np.ones((1, 2))))
        np.testing.assert_array_equal(g.ids, [0, 1, 2])

    def test_default_ids_are_not_reused_after_removal(self):
        g = Gallery(2)
        g.add(unit(np.ones((3, 2))))
        g.remove_ids([0])
        g.add(np.array([[1.0, 0.0]]))
        np.testing.assert_array_equal(g.ids, [1, 2, 3])
        assert g.remove_ids(2) == 1 and g.ntotal == 2  # a single int works too
        g.add(np.array([[0.0, 1.0]]), ids=[10])
        g.add(np.array([[0.0, 1.0]]))
        np.testing.assert_array_equal(g.ids, [1, 3, 10, 11])

    def test_ids_is_a_copy(self):
        g = Gallery(2)
        g.add(np.eye(2), ids=[4, 5])
        g.ids[:] = 0
        np.testing.assert_array_equal(g.ids, [4, 5])

    def test_duplicate_ids_in_one_call_refused(self):
        g = Gallery(2)
        with pytest.raises(ValueError, match=r"ids must not repeat: each item is stored under one id, once \(\[3\]"):
            g.add(unit(np.ones((3, 2))), ids=[3, 4, 3])
        assert g.ntotal == 0  # nothing stored

    def test_id_already_stored_refused(self):
        g = Gallery(2)
        g.add(np.eye(2), ids=[1, 2])
        with pytest.raises(ValueError, match=r"ids \[2\] are already stored: remove them first"):
            g.add(np.eye(2), ids=[5, 2])
        np.testing.assert_array_equal(g.ids, [1, 2])  # 5 was not stored either
        g.remove_ids([2])
        g.add(np.eye(2)[:1], ids=[2])  # once removed, the id is free again
        _, ids = g.search(np.array([[1.0, 0.0]]), k=2)
        assert sorted(ids[0].tolist()) == [1, 2]

    @pytest.mark.parametrize("ids", [[1.7], np.array([1.0]), [True], np.array(["1"])])
    def test_remove_ids_refuses_non_integers(self, ids):
        g = Gallery(2)
        g.add(np.eye(2), ids=[1, 2])
        with pytest.raises(TypeError, match="ids must be integers"):
            g.remove_ids(ids)
        assert g.ntotal == 2  # in particular id 1 is still there

    def test_remove_ids_ignores_unknown_ids_and_counts(self):
        """Documented choice (faiss's): unknown ids are ignored, the count tells what happened."""
        g = Gallery(2)
        g.add(np.eye(2), ids=[1, 2])
        assert g.remove_ids([2, 99]) == 1
        assert g.remove_ids([2]) == 0
        assert g.remove_ids([1, 1]) == 1
        assert g.ntotal == 0

    def test_remove_ids_bad_shape_or_negative(self):
        g = Gallery(2)
        with pytest.raises(ValueError, match="ids must be non-negative"):
            g.remove_ids([-1])
        with pytest.raises(ValueError, match="ids must be one id or a 1-D array"):
            g.remove_ids([[1, 2]])

    def test_index_is_read_only_attribute(self):
        g = Gallery(2)
        with pytest.raises(AttributeError):
            g.index = None
        assert g.index.ntotal == 0

    def test_bad_input(self):
        with pytest.raises(ValueError, match="dim must be a positive integer"):
            Gallery(0)
        with pytest.raises(TypeError, match="normalize must be True or False"):
            Gallery(2, normalize="yes")
        g = Gallery(3)
        with pytest.raises(ValueError, match="vectors has dimension 2 but 3 is expected"):
            g.add(unit(np.ones((1, 2))))
        with pytest.raises(ValueError, match="ids must be non-negative"):
            g.add(unit(np.ones((1, 3))), ids=[-1])
        with pytest.raises(ValueError, match=r"ids must be 1-D with one id per vector \(2\)"):
            g.add(unit(np.ones((2, 3))), ids=[1])
        with pytest.raises(TypeError, match="ids must be integers"):
            g.add(unit(np.ones((1, 3))), ids=[0.5])
        g.add(unit(np.ones((2, 3))))
        with pytest.raises(ValueError, match="k=3 is larger than the gallery"):
            g.search(unit(np.ones((1, 3))), k=3)
        with pytest.raises(ValueError, match="queries has dimension 2 but 3 is expected"):
            g.search(unit(np.ones((1, 2))), k=1)


class TestTies:
    """Ties go to the smaller id, exactly, also when faiss would cut a tied group at the k-th place."""

    def test_duplicated_vectors_smaller_ids_first(self):
        g = Gallery(2)
        # ids stored in descending order: faiss's own order of tied items would be the reverse.
        ids = np.arange(300, 0, -1)
        g.add(np.tile([[1.0, 0.0]], (300, 1)), ids=ids)
        g.add(np.tile([[0.0, 1.0]], (5, 1)), ids=[1000, 1001, 1002, 1003, 1004])
        for k in (1, 7, 299, 300, 303):
            _, got = g.search(np.array([[1.0, 0.0], [0.6, 0.8]]), k=k)
            np.testing.assert_array_equal(got[0], np.arange(1, k + 1) if k <= 300
                                          else np.r_[np.arange(1, 301), 1000, 1001, 1002][:k])
            np.testing.assert_array_equal(got[1], np.r_[1000, 1001, 1002, 1003, 1004, np.arange(1, 301)][:k])

    @given(n=st.integers(1, 80), d=st.integers(1, 4), n_q=st.integers(1, 30), seed=st.integers(0, 2**32 - 1),
           data=st.data())
    def test_gallery_matches_brute_force_with_many_ties(self, n, d, n_q, seed, data):
        rng = np.random.default_rng(seed)
        x, q = signed_axes(rng, n, d), tied_queries(rng, n_q, d)
        ids = rng.choice(5 * n, size=n, replace=False)
        k = data.draw(st.integers(1, n))
        g = Gallery(d)
        g.add(x, ids=ids)
        scores, got = g.search(q, k)
        full = q.astype(np.float64) @ x.T.astype(np.float64)
        order = tie_ranking(full, ids)[:, :k]
        np.testing.assert_array_equal(got, ids[order])
        np.testing.assert_array_equal(scores, np.take_along_axis(full, order, axis=1).astype(np.float32))

    @given(n=st.integers(2, 60), d=st.integers(1, 4), seed=st.integers(0, 2**32 - 1), data=st.data())
    def test_search_matches_brute_force_with_many_ties(self, n, d, seed, data):
        rng = np.random.default_rng(seed)
        x = signed_axes(rng, n, d)
        exclude = data.draw(st.booleans())
        q = x if exclude else tied_queries(rng, 7, d)
        k = data.draw(st.integers(1, n - int(exclude)))
        scores, got = search(q, x, k, exclude_self=exclude)
        full = q.astype(np.float64) @ x.T.astype(np.float64)
        if exclude:
            np.fill_diagonal(full, -np.inf)
        order = tie_ranking(full, np.arange(n))[:, :k]
        np.testing.assert_array_equal(got, order)
        np.testing.assert_array_equal(scores, np.take_along_axis(full, order, axis=1).astype(np.float32))

    def test_merge_topk_breaks_ties_by_id_not_list_order(self):
        a = (np.array([[0.5, 0.5]]), np.array([[9, 3]]))
        b = (np.array([[0.5, 0.2]]), np.array([[4, 1]]))
        for results in ([a, b], [b, a]):
            scores, ids = merge_topk(results, k=4)
            np.testing.assert_array_equal(ids, [[3, 4, 9, 1]])
            np.testing.assert_allclose(scores, [[0.5, 0.5, 0.5, 0.2]])


class TestSearch:
    def test_matches_brute_force(self, rng):
        q, g = unit(rng.normal(size=(7, 5))), unit(rng.normal(size=(30, 5)))
        scores, ids = search(q, g, k=4)
        full = q.astype(np.float64) @ g.T.astype(np.float64)
        np.testing.assert_array_equal(ids, np.argsort(-full, axis=1)[:, :4])
        np.testing.assert_allclose(scores, np.sort(full, axis=1)[:, ::-1][:, :4], atol=1e-5)

    def test_exclude_self_is_leave_one_out(self, rng):
        x = unit(rng.normal(size=(25, 4)))
        scores, ids = search(x, x, k=24, exclude_self=True)
        assert ids.shape == scores.shape == (25, 24)
        assert not (ids == np.arange(25)[:, None]).any()
        full = x.astype(np.float64) @ x.T.astype(np.float64)
        np.fill_diagonal(full, -np.inf)
        np.testing.assert_array_equal(ids, np.argsort(-full, axis=1)[:, :24])

    def test_exclude_self_when_self_is_not_first(self):
        # Items 0 and 1 are identical: query 1's own item is tied with item 0, which ranks
        # first (smaller id); its own id must still go and k results remain.
        x = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
        _, ids = search(x, x, k=2, exclude_self=True)
        assert ids.tolist() == [[1, 2], [0, 2], [0, 1]]

    def test_normalize_switch(self, rng):
        q, g = rng.normal(size=(4, 3)), rng.normal(size=(9, 3))
        scores, ids = search(q, g, k=9, normalize=True)
        cos = unit(q).astype(np.float64) @ unit(g).T.astype(np.float64)
        np.testing.assert_allclose(scores, np.sort(cos, axis=1)[:, ::-1], atol=1e-5)
        with pytest.raises(TypeError, match="exclude_self must be True or False"):
            search(unit(q), unit(g), k=1, exclude_self=None)

    def test_bad_input(self, rng):
        g = unit(rng.normal(size=(5, 3)))
        with pytest.raises(ValueError, match="queries has dimension 4 but 3 is expected"):
            search(unit(rng.normal(size=(2, 4))), g, k=1)
        with pytest.raises(ValueError, match="gallery is empty"):
            search(g[:2], np.zeros((0, 3)), k=1)
        with pytest.raises(ValueError, match="k=6 is larger than the gallery"):
            search(g, g, k=6)
        with pytest.raises(ValueError, match=r"k=5 is larger than the gallery \(4 items searchable\)"):
            search(g, g, k=5, exclude_self=True)
        with pytest.raises(ValueError, match="exclude_self=True needs queries and gallery to be the same"):
            search(g[:2], g, k=1, exclude_self=True)


def test_score_matrix(rng):
    q, g = unit(rng.normal(size=(3, 4))), unit(rng.normal(size=(6, 4)))
    np.testing.assert_allclose(score_matrix(q, g), q @ g.T, rtol=1e-5, atol=1e-5)
    assert score_matrix(q, g).shape == (3, 6)
    np.testing.assert_allclose(score_matrix(3 * q, 0.5 * g, normalize=True), q @ g.T, atol=1e-5)
    with pytest.raises(ValueError, match="queries has dimension 4 but 5 is expected"):
        score_matrix(q, unit(rng.normal(size=(6, 5))))


class TestMergeTopk:
    def test_skips_empty_slots(self):
        a = (np.array([[0.9, 0.1]]), np.array([[4, 5]]))
        b = (np.array([[0.5, 0.0]]), np.array([[7, -1]]))  # -1: faiss found nothing for this slot
        scores, ids = merge_topk([a, b], k=3)
        np.testing.assert_array_equal(ids, [[4, 7, 5]])
        np.testing.assert_allclose(scores, [[0.9, 0.5, 0.1]])
        scores, ids = merge_topk([a, b], k=4)
        assert ids[0, -1] == -1 and scores[0, -1] == -np.inf  # empty slot only after every real result
        assert merge_topk([a, b], k=10)[1].shape == (1, 4)

    def test_empty_slot_after_real_minus_inf(self):
        a = (np.array([[-np.inf, 0.0]]), np.array([[8, -1]]))
        np.testing.assert_array_equal(merge_topk([a], k=2)[1], [[8, -1]])

    def test_bad_input(self):
        a = (np.array([[0.9, 0.1]]), np.array([[4, 5]]))
        with pytest.raises(ValueError, match="results must be a non-empty list"):
            merge_topk([], k=1)
        with pytest.raises(TypeError, match=r"results\[0\] must be a \(scores, ids\) pair"):
            merge_topk([np.ones((1, 2))], k=1)
        with pytest.raises(ValueError, match=r"results\[1\] must hold two 2-D arrays of one shape"):
            merge_topk([a, (np.ones((1, 2)), np.ones((1, 3), dtype=int))], k=1)
        with pytest.raises(ValueError, match=r"results\[1\] has 2 rows but results\[0\] has 1"):
            merge_topk([a, (np.ones((2, 1)), np.ones((2, 1), dtype=int))], k=1)
        with pytest.raises(TypeError, match=r"results\[0\] ids must be integers"):
            merge_topk([(np.ones((1, 1)), np.ones((1, 1)))], k=1)
        with pytest.raises(ValueError, match=r"results\[0\] scores contain NaN"):
            merge_topk([(np.full((1, 1), np.nan), np.ones((1, 1), dtype=int))], k=1)
        with pytest.raises(ValueError, match="k must be at least 1"):
            merge_topk([a], k=0)
        with pytest.raises(TypeError, match="k must be a positive integer"):
            merge_topk([a], k=1.0)


class TestNorms:
    """Every function refuses rows off unit norm by default, and normalises with normalize=True."""

    @staticmethod
    def calls(make):
        """(argument name, call) for every embedding argument of the module; ``make(name)`` is its value."""
        u2, u3 = np.eye(2), np.eye(3)

        def mixed(normalize=False):
            return MixedGallery(u3, new_dim=2, normalize=normalize)

        def gallery(normalize=False):
            g = Gallery(2, normalize=normalize)
            g.add(u2)
            return g

        return [
            ("vectors", lambda n: Gallery(2, normalize=n).add(make("vectors", 2))),
            ("queries", lambda n: gallery(n).search(make("queries", 2), k=1)),
            ("gallery", lambda n: search(u2, make("gallery", 2), k=1, normalize=n)),
            ("queries", lambda n: search(make("queries", 2), u2, k=1, normalize=n)),
            ("gallery", lambda n: score_matrix(u2, make("gallery", 2), normalize=n)),
            ("queries", lambda n: score_matrix(make("queries", 2), u2, normalize=n)),
            ("old_vectors", lambda n: MixedGallery(make("old_vectors", 3), new_dim=2, normalize=n)),
            ("new_vectors", lambda n: mixed(n).backfill([0, 1], make("new_vectors", 2))),
            ("new_vectors", lambda n: mixed(n).add([5, 6], make("new_vectors", 2))),
            ("query_old", lambda n: mixed(n).search(make("query_old", 3), u2, k=1)),
            ("query_new", lambda n: mixed(n).search(u3[:2], make("query_new", 2), k=1)),
        ]

    @pytest.mark.parametrize("case", range(11))
    def test_half_norm_refused_or_normalised(self, case):
        x = {2: 0.5 * np.eye(2), 3: 0.5 * np.eye(3)[:2]}
        name, call = self.calls(lambda arg, d: x[d])[case]
        with pytest.raises(ValueError, match=rf"^{name} must have unit-norm rows.*pass normalize=True"):
            call(False)
        call(True)  # accepted, normalised

    @pytest.mark.parametrize("case", range(11))
    @pytest.mark.parametrize("normalize", [False, True])
    @pytest.mark.parametrize("bad,exc,message", [
        ("zero_columns", ValueError, "has 0 columns"),
        ("complex", TypeError, "must be real-valued"),
        ("nan", ValueError, "contains NaN or infinite values"),
        ("zero_row", ValueError, None),
    ])
    def test_bad_rows_refused(self, case, normalize, bad, exc, message):
        def make(arg, d):
            if bad == "zero_columns":
                return np.zeros((2, 0))
            x = np.eye(d)[:2].astype(np.complex128 if bad == "complex" else np.float64)
            x[1] = {"nan": np.nan, "zero_row": 0.0}.get(bad, x[1])
            return x

        name, call = self.calls(make)[case]
        if message is None:  # a zero row is off unit norm, and has no direction to normalise
            message = "all-zero row" if normalize else "must have unit-norm rows"
        with pytest.raises(exc, match=rf"^{name} (.* )?{message}"):
            call(normalize)

    def test_normalised_gallery_scores_are_cosines(self, rng):
        x, q = rng.normal(size=(20, 4)), rng.normal(size=(3, 4))
        g = Gallery(4, normalize=True)
        g.add(7 * x)
        scores, ids = g.search(0.1 * q, k=5)
        cos = unit(q).astype(np.float64) @ unit(x).T.astype(np.float64)
        np.testing.assert_array_equal(ids, np.argsort(-cos, axis=1)[:, :5])
        np.testing.assert_allclose(scores, np.sort(cos, axis=1)[:, ::-1][:, :5], atol=1e-5)


class TestMixedGallery:
    def test_backfill_moves_items_between_spaces(self):
        mg = MixedGallery(np.eye(4), new_dim=2, ids=[10, 11, 12, 13])
        assert mg.ntotal == len(mg) == 4 and mg.backfill_ratio == 0.0
        assert (mg.old_dim, mg.new_dim) == (4, 2)
        mg.backfill([11, 13], np.array([[1.0, 0.0], [0.0, 1.0]]))
        np.testing.assert_array_equal(mg.old_ids, [10, 12])
        np.testing.assert_array_equal(mg.new_ids, [11, 13])
        np.testing.assert_array_equal(mg.ids, [10, 11, 12, 13])
        assert mg.backfill_ratio == 0.5
        # The old-space query only sees old-stored items, the new-space query only new ones.
        scores, ids = mg.search(query_old=[[0, 1.0, 0, 0]], query_new=[[0.0, 1.0]], k=4)
        np.testing.assert_array_equal(ids, [[13, 10, 11, 12]])  # 10, 11, 12 tie at 0: by id
        np.testing.assert_allclose(scores, [[1.0, 0.0, 0.0, 0.0]], atol=1e-6)

    def test_sub_indices_are_private(self):
        mg = MixedGallery(np.eye(3), new_dim=2)
        for name in ("old", "new"):
            assert not hasattr(mg, name)
        with pytest.raises(AttributeError):
            mg.old_ids = np.array([0])
        mg.old_ids[:] = 99  # a copy
        np.testing.assert_array_equal(mg.old_ids, [0, 1, 2])

    def test_add_goes_straight_to_new(self):
        mg = MixedGallery(np.eye(3), new_dim=2)
        mg.add([7, 8], np.array([[1.0, 0.0], [0.0, 1.0]]))
        np.testing.assert_array_equal(mg.new_ids, [7, 8])
        np.testing.assert_array_equal(mg.old_ids, [0, 1, 2])
        assert mg.ntotal == 5 and mg.backfill_ratio == pytest.approx(2 / 5)
        _, ids = mg.search(np.zeros((1, 3)) + [[1.0, 0, 0]], [[0.0, 1.0]], k=2)
        np.testing.assert_array_equal(ids, [[0, 8]])
        with pytest.raises(ValueError, match=r"ids \[7\] are already backfilled"):
            mg.backfill([7], np.array([[1.0, 0.0]]))

    def test_removed_item_does_not_come_back(self):
        mg = MixedGallery(np.eye(3), new_dim=2)
        mg.backfill([0], np.array([[1.0, 0.0]]))
        mg.remove([1, 0])  # one stored old, one stored new
        np.testing.assert_array_equal(mg.ids, [2])
        assert mg.backfill_ratio == 0.0
        with pytest.raises(ValueError, match=r"ids \[1\] are not in the gallery \(never stored, or removed\)"):
            mg.backfill([1], np.array([[1.0, 0.0]]))
        _, ids = mg.search(np.eye(3)[:1], np.array([[1.0, 0.0]]), k=1)
        assert ids.tolist() == [[2]]
        mg.add([1], np.array([[1.0, 0.0]]))  # a removed id may be stored again, as new
        np.testing.assert_array_equal(mg.new_ids, [1])
        mg.remove(2)
        mg.remove([1])
        assert mg.ntotal == 0 and np.isnan(mg.backfill_ratio)
        with pytest.raises(ValueError, match=r"k=1 is larger than the gallery \(0 items searchable\)"):
            mg.search(np.eye(3)[:1], np.array([[1.0, 0.0]]), k=1)

    def test_exclude_ids(self):
        mg = MixedGallery(np.eye(3), new_dim=3)
        mg.backfill([0], np.array([[1.0, 0, 0]]))
        _, ids = mg.search(np.eye(3), np.eye(3), k=2, exclude_ids=[0, 1, 2])
        for i in range(3):
            assert i not in ids[i]

    def test_errors_leave_the_gallery_unchanged(self):
        mg = MixedGallery(np.eye(3), new_dim=2)
        mg.backfill([1], np.array([[1.0, 0.0]]))
        before = (mg.old_ids, mg.new_ids)
        with pytest.raises(ValueError, match=r"ids \[1\] are already backfilled"):
            mg.backfill([0, 1], np.eye(2))
        with pytest.raises(ValueError, match=r"ids \[9\] are not in the gallery"):
            mg.backfill([0, 9], np.eye(2))
        with pytest.raises(ValueError, match=r"ids \[2\] are already in the gallery"):
            mg.add([5, 2], np.eye(2))
        with pytest.raises(ValueError, match=r"ids \[1\] are already in the gallery"):
            mg.add([1], np.eye(2)[:1])
        with pytest.raises(ValueError, match=r"ids \[9\] are not in the gallery: nothing was removed"):
            mg.remove([0, 9])
        with pytest.raises(ValueError, match=r"ids must not repeat: each item is removed once \(\[0\]"):
            mg.remove([0, 0])
        with pytest.raises(ValueError, match=r"ids must not repeat: each item is stored once \(\[5\]"):
            mg.add([5, 5], np.eye(2))
        with pytest.raises(TypeError, match="ids must be integers"):
            mg.remove([0.7])
        np.testing.assert_array_equal(mg.old_ids, before[0])
        np.testing.assert_array_equal(mg.new_ids, before[1])

    def test_bad_input(self):
        mg = MixedGallery(np.eye(3), new_dim=2)
        with pytest.raises(ValueError, match=r"ids \[7\] are not in the gallery"):
            mg.backfill([7], unit(np.ones((1, 2))))
        with pytest.raises(ValueError, match=r"ids must not repeat: each item is stored once \(\[1\] appear"):
            mg.backfill([1, 1], unit(np.ones((2, 2))))
        with pytest.raises(ValueError, match="new_vectors has dimension 3 but 2 is expected"):
            mg.backfill([1], unit(np.ones((1, 3))))
        mg.backfill([1], unit(np.ones((1, 2))))
        with pytest.raises(ValueError, match=r"ids \[1\] are already backfilled"):
            mg.backfill([1], unit(np.ones((1, 2))))
        assert mg.ntotal == 3
        with pytest.raises(ValueError, match="query_old has 2 rows but query_new has 1"):
            mg.search(np.eye(3)[:2], unit(np.ones((1, 2))), k=1)
        with pytest.raises(ValueError, match="query_new has dimension 3 but 2 is expected"):
            mg.search(np.eye(3)[:1], np.eye(3)[:1], k=1)
        with pytest.raises(ValueError, match="k=3 is larger than the gallery"):
            mg.search(np.eye(3)[:1], unit(np.ones((1, 2))), k=3, exclude_ids=[0])
        with pytest.raises(ValueError, match="exclude_ids must be 1-D with one id per vector"):
            mg.search(np.eye(3)[:1], unit(np.ones((1, 2))), k=1, exclude_ids=[0, 1])
        with pytest.raises(ValueError, match="new_dim must be a positive integer"):
            MixedGallery(np.eye(3), new_dim=0)
        with pytest.raises(ValueError, match=r"ids must not repeat: one id per gallery item \(\[1\] appear"):
            MixedGallery(np.eye(3), new_dim=2, ids=[1, 1, 2])
        with pytest.raises(ValueError, match="old_vectors is empty"):
            MixedGallery(np.zeros((0, 3)), new_dim=2)
        with pytest.raises(TypeError, match="normalize must be True or False"):
            MixedGallery(np.eye(3), new_dim=2, normalize=1)

    @given(n=st.integers(1, 40), d_old=st.integers(1, 6), d_new=st.integers(1, 6), n_q=st.integers(1, 6),
           exclude=st.booleans(), custom_ids=st.booleans(), seed=st.integers(0, 2**32 - 1), data=st.data())
    def test_merged_topk_equals_brute_force(self, n, d_old, d_new, n_q, exclude, custom_ids, seed, data):
        """METHOD §2: the merged top-k is the top-k of the full merged score (continuous vectors)."""
        if exclude and n < 2:
            exclude = False
        rng = np.random.default_rng(seed)
        old, new = unit(rng.normal(size=(n, d_old))), unit(rng.normal(size=(n, d_new)))
        q_old, q_new = unit(rng.normal(size=(n_q, d_old))), unit(rng.normal(size=(n_q, d_new)))
        ext = rng.choice(10 * n, size=n, replace=False) if custom_ids else np.arange(n)
        backfilled = np.array(data.draw(st.lists(st.integers(0, n - 1), unique=True)), dtype=int)
        k = data.draw(st.integers(1, n - int(exclude)))
        own = rng.integers(0, n, size=n_q) if exclude else None

        mg = MixedGallery(old, new_dim=d_new, ids=ext)
        if len(backfilled):
            mg.backfill(ext[backfilled], new[backfilled])
        scores, ids = mg.search(q_old, q_new, k, exclude_ids=None if own is None else ext[own])

        in_new = np.zeros(n, dtype=bool)
        in_new[backfilled] = True
        merged = np.where(in_new[None, :], q_new.astype(np.float64) @ new.T, q_old.astype(np.float64) @ old.T)
        if exclude:
            merged[np.arange(n_q), own] = -np.inf
        best = np.sort(merged, axis=1)[:, ::-1][:, :k]
        position = {int(e): i for i, e in enumerate(ext)}
        got = np.vectorize(position.__getitem__)(ids)
        assert ids.shape == scores.shape == (n_q, k)
        np.testing.assert_allclose(scores, best, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(np.take_along_axis(merged, got, axis=1), scores, rtol=1e-4, atol=1e-4)
        for row in got:
            assert len(set(row.tolist())) == k
        if exclude:
            assert not (got == own[:, None]).any()
        # With no near-ties the ids are exactly those of the brute-force ranking.
        gaps = -np.diff(np.sort(merged, axis=1)[:, ::-1][:, : k + 1], axis=1)
        if gaps.size == 0 or gaps.min() > 1e-3:
            np.testing.assert_array_equal(got, np.argsort(-merged, axis=1, kind="stable")[:, :k])

    @given(d_old=st.integers(1, 4), d_new=st.integers(1, 4), seed=st.integers(0, 2**32 - 1),
           ops=st.lists(st.tuples(st.sampled_from(["backfill", "add", "remove", "bad"]),
                                  st.integers(0, 6), st.integers(0, 2**32 - 1)), max_size=12),
           data=st.data())
    def test_random_histories_match_brute_force(self, d_old, d_new, seed, ops, data):
        """After any sequence of backfills, adds and removes (valid or not), every id is in exactly one
        part, ``backfill_ratio`` is the share stored new, and search is the exact tie-ruled top-k
        of the full merged score. Vectors are signed axes, so scores tie exactly and often."""
        rng = np.random.default_rng(seed)
        n0 = int(rng.integers(1, 30))
        vec_old = {int(i): v for i, v in zip(rng.choice(100, size=n0, replace=False), signed_axes(rng, n0, d_old))}
        mg = MixedGallery(np.stack(list(vec_old.values())), d_new, ids=list(vec_old))
        vec_new = {}  # the model: id -> stored vector, per part
        next_id = 100
        for op, size, op_seed in ops:
            r = np.random.default_rng(op_seed)
            if op == "backfill" and vec_old:
                ids = r.choice(sorted(vec_old), size=min(size, len(vec_old)), replace=False)
                x = signed_axes(r, len(ids), d_new)
                if len(ids):
                    mg.backfill(ids, x)
                    for i, v in zip(ids.tolist(), x):
                        vec_new[i] = v
                        del vec_old[i]
            elif op == "add" and size:
                reuse = [i for i in range(100) if i not in vec_old and i not in vec_new][:1]  # a freed id, if any
                ids = np.array(reuse + list(range(next_id, next_id + size - len(reuse))))
                next_id += size
                x = signed_axes(r, len(ids), d_new)
                mg.add(ids, x)
                vec_new.update(zip(ids.tolist(), x))
            elif op == "remove" and (vec_old or vec_new):
                present = sorted(vec_old) + sorted(vec_new)
                ids = r.choice(present, size=min(size, len(present)), replace=False)
                mg.remove(ids)
                for i in ids.tolist():
                    vec_old.pop(i, None)
                    vec_new.pop(i, None)
            elif op == "bad":
                # Each must be refused and change nothing.
                stored_new = sorted(vec_new)
                attempts = [lambda: mg.remove([10**6]),
                            lambda: mg.backfill([10**6], signed_axes(r, 1, d_new))]
                if stored_new:
                    attempts.append(lambda: mg.backfill(stored_new[:1], signed_axes(r, 1, d_new)))
                    attempts.append(lambda: mg.add(stored_new[:1], signed_axes(r, 1, d_new)))
                if vec_old:
                    attempts.append(lambda: mg.add(sorted(vec_old)[:1], signed_axes(r, 1, d_new)))
                for attempt in attempts:
                    with pytest.raises(ValueError):
                        attempt()

            old_ids, new_ids = mg.old_ids, mg.new_ids
            assert old_ids.tolist() == sorted(vec_old) and new_ids.tolist() == sorted(vec_new)
            assert not set(old_ids.tolist()) & set(new_ids.tolist())
            assert mg.ntotal == len(vec_old) + len(vec_new)

        n = mg.ntotal
        if n == 0:
            assert np.isnan(mg.backfill_ratio)
            return
        assert mg.backfill_ratio == len(vec_new) / n
        q_old, q_new = tied_queries(rng, 5, d_old), tied_queries(rng, 5, d_new)
        ids = np.array(sorted(vec_old) + sorted(vec_new))
        merged = np.concatenate(
            [q_old.astype(np.float64) @ np.array([vec_old[i] for i in sorted(vec_old)]).reshape(-1, d_old).T,
             q_new.astype(np.float64) @ np.array([vec_new[i] for i in sorted(vec_new)]).reshape(-1, d_new).T],
            axis=1)
        exclude = n > 1 and data.draw(st.booleans())
        k = data.draw(st.integers(1, n - int(exclude)))
        own = ids[rng.integers(0, n, size=5)] if exclude else None
        if exclude:
            merged[ids[None, :] == own[:, None]] = -np.inf
        scores, got = mg.search(q_old, q_new, k, exclude_ids=own)
        order = tie_ranking(merged, ids)[:, :k]
        np.testing.assert_array_equal(got, ids[order])
        np.testing.assert_array_equal(scores, np.take_along_axis(merged, order, axis=1).astype(np.float32))


def test_ties_agree_with_evaluate_backfill():
    """With many exact ties (duplicated vectors, mixed labels) the top-1 of a MixedGallery over
    ids 0..N-1 is the top-1 of evaluate_backfill in the same state: both break ties by the smaller id."""
    from backfill_lib.backfill import backfill_order, backfilled_mask, evaluate_backfill, rank_merge

    rng = np.random.default_rng(0)
    n = 120
    old, new = signed_axes(rng, n, 3), signed_axes(rng, n, 4)
    labels = rng.integers(0, 3, size=n)
    order = backfill_order(n, seed=1)
    curve = evaluate_backfill(rank_merge(old, new), labels, ratios=[0, 0.4, 1], order=order)
    for state, ratio in enumerate([0, 0.4, 1]):
        mask = backfilled_mask(order, ratio)
        mg = MixedGallery(old, new_dim=4)
        if mask.any():
            mg.backfill(np.flatnonzero(mask), new[mask])
        _, ids = mg.search(old, new, k=5, exclude_ids=np.arange(n))
        np.testing.assert_array_equal(curve.per_query_top1[state], labels[ids[:, 0]] == labels)
        assert curve.top5[state] == pytest.approx(np.mean((labels[ids] == labels[:, None]).any(axis=1)))
