"""Helpers shared by the tests of the live indices (faiss and Qdrant) and the backfill job."""

from __future__ import annotations

import numpy as np

from backfill_lib.transforms import register_transform


def grid_unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    """``n`` unit vectors with four entries ±0.5 and the rest 0.

    Every inner product is a multiple of 0.25 and exact in float32 whatever the summation
    order, so scores tie often and exactly: the tie rule (smaller id first) is tested for real.
    """
    assert d >= 4
    x = np.zeros((n, d), dtype=np.float32)
    for row in x:
        row[rng.choice(d, 4, replace=False)] = rng.choice([-0.5, 0.5], 4)
    return x


class PsiStandIn:
    """A reverse transformation with the interface of ``transforms.ReverseTransform``.

    ``transform`` keeps the four coordinates of ``x @ W`` largest in magnitude, as ±0.5 with
    their signs: unit-norm grid vectors (see :func:`grid_unit`), so brute force ties exactly.
    """

    def __init__(self, d_new: int, d_old: int, seed: int = 0):
        self.W = np.random.default_rng(seed).normal(size=(d_new, d_old)).astype(np.float32)

    def transform(self, X) -> np.ndarray:
        z = np.asarray(X, dtype=np.float32) @ self.W
        out = np.zeros_like(z)
        top = np.argsort(-np.abs(z), axis=1, kind="stable")[:, :4]
        np.put_along_axis(out, top, np.where(np.take_along_axis(z, top, axis=1) >= 0, 0.5, -0.5), axis=1)
        return out

    def save(self, path) -> None:
        with open(path, "wb") as f:
            np.save(f, self.W)

    @classmethod
    def load(cls, path) -> "PsiStandIn":
        psi = cls.__new__(cls)
        with open(path, "rb") as f:
            psi.W = np.load(f, allow_pickle=False)
        return psi


# An index file names its psi's class; loading looks the name up among registered transforms.
PSI_STAND_IN = register_transform(PsiStandIn)


def brute_force_merged(query_old, query_new, ids, old_vectors, new_vectors, stored_new, k):
    """Top-``k`` of the full merged score matrix, ties by the smaller id.

    ``stored_new[j]`` says whether item ``ids[j]`` is scored with its new vector
    (``new_vectors[j]``) against ``query_new``, else with its old one against ``query_old``.
    """
    ids = np.asarray(ids)
    s_old = np.asarray(query_old, dtype=np.float64) @ np.asarray(old_vectors, dtype=np.float64).T
    s_new = np.asarray(query_new, dtype=np.float64) @ np.asarray(new_vectors, dtype=np.float64).T
    scores = np.where(np.asarray(stored_new)[None, :], s_new, s_old)
    out_s, out_i = [], []
    for row in scores:
        order = np.lexsort((ids, -row))[:k]
        out_s.append(row[order])
        out_i.append(ids[order])
    return np.array(out_s), np.array(out_i)


def backfill_in_batches(index, rng, ids, new_vectors, n_batches: int) -> np.ndarray:
    """Backfill a random order of ``ids`` in up to ``n_batches`` batches at random cuts; which are stored new."""
    stored_new = np.zeros(len(ids), dtype=bool)
    order = rng.permutation(len(ids))
    start = 0
    for cut in np.sort(rng.integers(0, len(ids) + 1, size=n_batches)):
        if cut > start:
            index.backfill(ids[order[start:cut]], new_vectors[order[start:cut]])
            stored_new[order[start:cut]] = True
            start = cut
    return stored_new


def assert_search_is_brute_force(index, qn, qo, k, ids, old_vectors, new_vectors, stored_new, by_psi: bool):
    """The index's merged top-``k`` (through its psi, or with ``query_old=qo``) is the brute-force one."""
    scores, got = index.search(qn, k) if by_psi else index.search(qn, k, query_old=qo)
    want_s, want_i = brute_force_merged(qo, qn, ids, old_vectors, new_vectors, stored_new, k)
    np.testing.assert_array_equal(got, want_i)
    np.testing.assert_allclose(scores, want_s, atol=1e-6)
