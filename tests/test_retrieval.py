"""Exact search on faiss, leave-one-out, and the mixed gallery of an online backfill."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from backfill_lib.retrieval import Gallery, MixedGallery, merge_topk, score_matrix, search
from core_helpers import unit


class TestGallery:
    def test_add_search_remove(self):
        g = Gallery(2)
        g.add(np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]), ids=[10, 20, 30])
        assert g.ntotal == len(g) == 3
        scores, ids = g.search(np.array([[1.0, 0.0]]), k=3)
        np.testing.assert_array_equal(ids, [[10, 30, 20]])
        np.testing.assert_allclose(scores, [[1.0, 0.6, 0.0]], atol=1e-6)
        assert g.remove_ids([30, 99]) == 1
        assert g.remove_ids([]) == 0
        np.testing.assert_array_equal(g.search(np.array([[0.6, 0.8]]), k=2)[1], [[20, 10]])

    def test_default_ids_count_on(self):
        g = Gallery(1)
        g.add(np.ones((2, 1)))
        g.add(np.ones((1, 1)))
        assert sorted(g.search(np.ones((1, 1)), k=3)[1][0].tolist()) == [0, 1, 2]

    def test_default_ids_are_not_reused_after_removal(self):
        g = Gallery(1)
        g.add(np.ones((3, 1)))
        g.remove_ids([0])
        g.add(np.full((1, 1), 2.0))
        assert sorted(g.search(np.ones((1, 1)), k=3)[1][0].tolist()) == [1, 2, 3]
        assert g.remove_ids([2]) == 1 and g.ntotal == 2
        g.add(np.ones((1, 1)), ids=[10])
        g.add(np.full((1, 1), 3.0))
        assert g.search(np.ones((1, 1)), k=1)[1][0, 0] == 11

    def test_bad_input(self):
        with pytest.raises(ValueError, match="dim must be a positive integer"):
            Gallery(0)
        g = Gallery(3)
        with pytest.raises(ValueError, match="vectors has dimension 2 but 3 is expected"):
            g.add(np.ones((1, 2)))
        with pytest.raises(ValueError, match="ids must be non-negative"):
            g.add(np.ones((1, 3)), ids=[-1])
        with pytest.raises(ValueError, match=r"ids must be 1-D with one id per vector \(2\)"):
            g.add(np.ones((2, 3)), ids=[1])
        with pytest.raises(TypeError, match="ids must be integers"):
            g.add(np.ones((1, 3)), ids=[0.5])
        g.add(np.ones((2, 3)))
        with pytest.raises(ValueError, match="k=3 is larger than the gallery"):
            g.search(np.ones((1, 3)), k=3)
        with pytest.raises(ValueError, match="queries has dimension 2 but 3 is expected"):
            g.search(np.ones((1, 2)), k=1)


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
        # Items 0 and 1 are identical and item 2 is the query 0's best match after itself:
        # whatever faiss returns first, the query's own id must go and k results remain.
        x = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
        _, ids = search(x, x, k=2, exclude_self=True)
        assert ids[0].tolist() == [1, 2] and ids[1].tolist() == [0, 2]
        assert ids[2, 0] in (0, 1) and 2 not in ids[2]

    def test_bad_input(self, rng):
        g = rng.normal(size=(5, 3))
        with pytest.raises(ValueError, match="queries has dimension 4 but 3 is expected"):
            search(rng.normal(size=(2, 4)), g, k=1)
        with pytest.raises(ValueError, match="gallery is empty"):
            search(rng.normal(size=(2, 3)), np.zeros((0, 3)), k=1)
        with pytest.raises(ValueError, match="k=6 is larger than the gallery"):
            search(g, g, k=6)
        with pytest.raises(ValueError, match=r"k=5 is larger than the gallery \(4 items searchable\)"):
            search(g, g, k=5, exclude_self=True)
        with pytest.raises(ValueError, match="exclude_self=True needs queries and gallery to be the same"):
            search(g[:2], g, k=1, exclude_self=True)
        bad = g.copy()
        bad[2, 1] = np.nan
        with pytest.raises(ValueError, match="gallery contains NaN"):
            search(g, bad, k=1)
        with pytest.raises(ValueError, match="queries contains NaN"):
            search(bad, g, k=1)


def test_score_matrix(rng):
    q, g = rng.normal(size=(3, 4)), rng.normal(size=(6, 4))
    np.testing.assert_allclose(score_matrix(q, g), q @ g.T, rtol=1e-5, atol=1e-5)
    assert score_matrix(q, g).shape == (3, 6)
    with pytest.raises(ValueError, match="queries has dimension 4 but 5 is expected"):
        score_matrix(q, rng.normal(size=(6, 5)))


def test_merge_topk_skips_empty_slots():
    a = (np.array([[0.9, 0.1]]), np.array([[4, 5]]))
    b = (np.array([[0.5, 0.0]]), np.array([[7, -1]]))  # -1: faiss found nothing for this slot
    scores, ids = merge_topk([a, b], k=3)
    np.testing.assert_array_equal(ids, [[4, 7, 5]])
    np.testing.assert_allclose(scores, [[0.9, 0.5, 0.1]])
    assert merge_topk([a, b], k=4)[1][0, -1] == -1  # empty slot only after every real result


class TestMixedGallery:
    def test_backfill_moves_items_between_spaces(self):
        mg = MixedGallery(np.eye(4), new_dim=2, ids=[10, 11, 12, 13])
        assert mg.ntotal == 4 and mg.backfill_ratio == 0.0
        mg.backfill([11, 13], np.array([[1.0, 0.0], [0.0, 1.0]]))
        assert mg.old.ntotal == 2 and mg.new.ntotal == 2 and mg.backfill_ratio == 0.5
        # The old-space query only sees old-stored items, the new-space query only new ones.
        scores, ids = mg.search(query_old=[[0, 1.0, 0, 0]], query_new=[[0.0, 1.0]], k=4)
        assert ids[0, 0] == 13 and scores[0, 0] == pytest.approx(1.0)
        assert set(ids[0].tolist()) == {10, 11, 12, 13}

    def test_exclude_ids(self):
        mg = MixedGallery(np.eye(3), new_dim=3)
        mg.backfill([0], np.array([[1.0, 0, 0]]))
        _, ids = mg.search(np.eye(3), np.eye(3), k=2, exclude_ids=[0, 1, 2])
        for i in range(3):
            assert i not in ids[i]

    def test_bad_input(self):
        mg = MixedGallery(np.eye(3), new_dim=2)
        with pytest.raises(ValueError, match=r"ids \[7\] are not in the gallery"):
            mg.backfill([7], np.ones((1, 2)))
        with pytest.raises(ValueError, match="ids must not repeat"):
            mg.backfill([1, 1], np.ones((2, 2)))
        with pytest.raises(ValueError, match="new_vectors has dimension 3 but 2 is expected"):
            mg.backfill([1], np.ones((1, 3)))
        mg.backfill([1], np.ones((1, 2)))
        with pytest.raises(ValueError, match=r"ids \[1\] are already backfilled"):
            mg.backfill([1], np.ones((1, 2)))
        assert mg.ntotal == 3
        with pytest.raises(ValueError, match="query_old has 2 rows but query_new has 1"):
            mg.search(np.ones((2, 3)), np.ones((1, 2)), k=1)
        with pytest.raises(ValueError, match="query_new has dimension 3 but 2 is expected"):
            mg.search(np.ones((1, 3)), np.ones((1, 3)), k=1)
        with pytest.raises(ValueError, match="k=3 is larger than the gallery"):
            mg.search(np.ones((1, 3)), np.ones((1, 2)), k=3, exclude_ids=[0])
        with pytest.raises(ValueError, match="exclude_ids must be 1-D with one id per vector"):
            mg.search(np.ones((1, 3)), np.ones((1, 2)), k=1, exclude_ids=[0, 1])
        with pytest.raises(ValueError, match="new_dim must be a positive integer"):
            MixedGallery(np.eye(3), new_dim=0)
        with pytest.raises(ValueError, match="ids must not repeat"):
            MixedGallery(np.eye(3), new_dim=2, ids=[1, 1, 2])
        with pytest.raises(ValueError, match="old_vectors is empty"):
            MixedGallery(np.zeros((0, 3)), new_dim=2)

    @given(n=st.integers(1, 40), d_old=st.integers(1, 6), d_new=st.integers(1, 6), n_q=st.integers(1, 6),
           exclude=st.booleans(), custom_ids=st.booleans(), seed=st.integers(0, 2**32 - 1), data=st.data())
    def test_merged_topk_equals_brute_force(self, n, d_old, d_new, n_q, exclude, custom_ids, seed, data):
        """METHOD §2: the merged top-k is the top-k of the full merged score."""
        if exclude and n < 2:
            exclude = False
        rng = np.random.default_rng(seed)
        old, new = rng.normal(size=(n, d_old)), rng.normal(size=(n, d_new))
        q_old, q_new = rng.normal(size=(n_q, d_old)), rng.normal(size=(n_q, d_new))
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
        merged = np.where(in_new[None, :], q_new @ new.T, q_old @ old.T)  # float64 reference
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
