"""Exact retrieval on faiss, the leave-one-out protocol and search over a mixed gallery.

The vocabulary is faiss's: a gallery has ``add``, ``remove_ids`` and ``search``, and
``search`` returns ``(scores, ids)``. Scores are inner products of L2-normalised vectors, so
ranking by descending score is ranking by ascending distance ``d = 2 - 2 a·b`` (METHOD §1).
"""

from __future__ import annotations

import faiss
import numpy as np

from .validation import as_embeddings, check_k


def _as_ids(ids, n: int, name: str = "ids") -> np.ndarray:
    arr = np.asarray(ids)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise ValueError(f"{name} must be 1-D with one id per vector ({n}), got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{name} must be integers, got dtype {arr.dtype}")
    if arr.size and arr.min() < 0:
        raise ValueError(f"{name} must be non-negative (faiss uses -1 for 'no result')")
    return arr.astype(np.int64)


class Gallery:
    """An exact inner-product index (``faiss.IndexFlatIP``) with stable external ids.

    Vectors are stored as given (as float32): normalise them first so that the inner product
    ranks like the distance ``d``.

    Parameters
    ----------
    dim : int
        Embedding dimension.

    Attributes
    ----------
    dim : int
        Embedding dimension.
    index : faiss.IndexIDMap2
        The underlying faiss index (an ``IndexFlatIP`` with external ids).

    Raises
    ------
    ValueError
        If ``dim`` is not a positive integer.

    Examples
    --------
    >>> g = Gallery(2)
    >>> g.add(np.array([[1.0, 0.0], [0.0, 1.0]]), ids=[10, 20])
    >>> g.search(np.array([[0.9, 0.1]]), k=1)[1]
    array([[10]])
    """

    def __init__(self, dim: int):
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
            raise ValueError(f"dim must be a positive integer, got {dim!r}")
        self.dim = int(dim)
        self.index = faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))
        self._next_id = 0  # default ids continue after the largest id ever stored

    @property
    def ntotal(self) -> int:
        """Number of stored vectors."""
        return int(self.index.ntotal)

    def __len__(self) -> int:
        return self.ntotal

    def add(self, vectors, ids=None) -> None:
        """Store ``vectors`` under ``ids`` (default: the next unused ids, ``0, 1, ...`` at first).

        Parameters
        ----------
        vectors : array (n, dim)
            Vectors to store, at least one row; stored as float32, not normalised here.
        ids : array of n non-negative ints, optional
            External ids. Default: consecutive ids after the largest id ever stored, so an id
            freed by :meth:`remove_ids` is not reused.

        Raises
        ------
        TypeError
            If ``vectors`` or ``ids`` is not numeric (``ids`` must be integers).
        ValueError
            If ``vectors`` is empty, not 2-D, of another width than ``dim`` or not finite, or
            ``ids`` does not hold one non-negative id per vector.
        """
        x = as_embeddings(vectors, "vectors", dim=self.dim)
        # Counting on from ntotal would reuse an id after a removal, and two items would share it.
        ids = np.arange(self._next_id, self._next_id + len(x)) if ids is None else _as_ids(ids, len(x))
        self.index.add_with_ids(x, _as_ids(ids, len(x)))
        self._next_id = max(self._next_id, int(ids.max()) + 1)

    def remove_ids(self, ids) -> int:
        """Remove the vectors stored under ``ids``; returns how many were removed.

        Parameters
        ----------
        ids : int or array of ints
            External ids to remove; ids that are not stored are ignored.

        Returns
        -------
        int
            Number of vectors removed.
        """
        arr = np.asarray(ids, dtype=np.int64).ravel()
        return int(self.index.remove_ids(arr)) if arr.size else 0

    def search(self, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` items per query by inner product: ``(scores, ids)``, best first.

        Parameters
        ----------
        queries : array (n_q, dim)
            Query vectors.
        k : int
            Results per query, from 1 to :attr:`ntotal`.

        Returns
        -------
        scores : array (n_q, k) of float32
            Inner products, descending.
        ids : array (n_q, k) of int64
            External ids of the results.

        Raises
        ------
        TypeError
            If ``queries`` is not numeric or ``k`` is not an integer.
        ValueError
            If ``queries`` is not a finite non-empty ``(n_q, dim)`` matrix, or ``k`` is below 1
            or larger than the number of stored vectors.
        """
        q = as_embeddings(queries, "queries", dim=self.dim)
        k = check_k(k, self.ntotal)
        return self.index.search(q, k)


def search(queries, gallery, k: int, exclude_self: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-``k`` search of ``queries`` in ``gallery``.

    A one-off :class:`Gallery` is built from ``gallery``. Vectors are used as given (not
    normalised here).

    Parameters
    ----------
    queries : array (n_q, d)
        Query vectors.
    gallery : array (n_g, d)
        Gallery vectors, in the same space as the queries.
    k : int
        Results per query; at most the number of searchable items (``n_g``, or ``n_g - 1``
        with ``exclude_self``).
    exclude_self : bool, default False
        Leave-one-out protocol: query ``i`` is gallery item ``i`` (same set), and is removed
        from its own results. Requires ``n_q == n_g``.

    Returns
    -------
    scores : array (n_q, k) of float32
        Inner products, best first.
    ids : array (n_q, k) of int64
        Row indices into ``gallery``.

    Raises
    ------
    TypeError
        If an input is not numeric or ``k`` is not an integer.
    ValueError
        If the inputs are not finite non-empty 2-D arrays of one width, ``exclude_self`` is
        set with ``n_q != n_g``, or ``k`` is out of range.

    Examples
    --------
    >>> x = np.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
    >>> search(x, x, k=1, exclude_self=True)[1]
    array([[1],
           [0],
           [1]])
    """
    g = as_embeddings(gallery, "gallery")
    q = as_embeddings(queries, "queries", dim=g.shape[1])
    if exclude_self and len(q) != len(g):
        raise ValueError(
            f"exclude_self=True needs queries and gallery to be the same items, but there are "
            f"{len(q)} queries and {len(g)} gallery items"
        )
    k = check_k(k, len(g) - int(exclude_self))
    index = Gallery(g.shape[1])
    index.add(g)
    scores, ids = index.index.search(q, k + int(exclude_self))
    if exclude_self:
        scores, ids = _drop_self(scores, ids, np.arange(len(q)), k)
    return scores, ids


def _drop_self(scores: np.ndarray, ids: np.ndarray, self_ids: np.ndarray, k: int):
    """Remove each query's own id from its result row and keep ``k`` results."""
    keep = ids != self_ids[:, None]
    # Rows that did not contain their own id drop their last (worst) result instead.
    no_self = keep.all(axis=1)
    keep[no_self, -1] = False
    n = len(ids)
    return scores[keep].reshape(n, k), ids[keep].reshape(n, k)


def score_matrix(queries, gallery) -> np.ndarray:
    """All inner products ``queries @ gallery.T`` (what ``IndexFlatIP`` computes before its top-k).

    Used where a metric needs the full ranking (mAP), not only a top-k list.

    Parameters
    ----------
    queries : array (n_q, d)
        Query vectors.
    gallery : array (n_g, d)
        Gallery vectors, in the same space as the queries.

    Returns
    -------
    array (n_q, n_g) of float32
        ``scores[i, j]`` is the inner product of query ``i`` and gallery item ``j``.

    Raises
    ------
    TypeError
        If an input is not numeric.
    ValueError
        If the inputs are not finite non-empty 2-D arrays of one width.
    """
    g = as_embeddings(gallery, "gallery")
    q = as_embeddings(queries, "queries", dim=g.shape[1])
    return q @ g.T


def merge_topk(results: list[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge several per-query ``(scores, ids)`` lists into one top-``k`` list, best first.

    ``ids == -1`` marks an empty slot (faiss convention) and is never returned while real
    results remain. Ties keep the order of ``results``. Inputs are not validated.

    Parameters
    ----------
    results : list of (scores, ids) pairs
        One pair per searched index, each two arrays ``(n_q, k_i)``, e.g. from
        :meth:`Gallery.search`. All lists must have the same number of rows.
    k : int
        Results to keep per query.

    Returns
    -------
    scores : array (n_q, min(k, sum of k_i))
        Merged scores, best first; empty slots get ``-inf``.
    ids : array (n_q, min(k, sum of k_i))
        Ids of the merged results (``-1`` only where fewer real results than ``k`` exist).

    Examples
    --------
    >>> a = (np.array([[0.9, 0.1]]), np.array([[5, -1]]))
    >>> b = (np.array([[0.5]]), np.array([[7]]))
    >>> merge_topk([a, b], k=2)[1]
    array([[5, 7]])
    """
    scores = np.concatenate([s for s, _ in results], axis=1)
    ids = np.concatenate([i for _, i in results], axis=1)
    scores = np.where(ids < 0, -np.inf, scores)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(ids, order, axis=1)


class MixedGallery:
    """A gallery in the middle of an online backfill (METHOD §1–2).

    Every item is stored either as an *old* vector (in the old model's space, or however the
    strategy stores it) or, once backfilled, as a *new* vector. Each space is one faiss index;
    a query brings one vector per space, both sub-galleries are searched, and the two
    ``(score, id)`` lists are merged into one ranking. This is distance rank merge when the
    query vectors are ``φ_o(q)`` and ``φ_n(q)``, and the reverse transformation when the old-space
    query is ``ψ̂(φ_n(q))``.

    Parameters
    ----------
    old_vectors : array (N, d_old)
        The gallery as it is stored before the upgrade.
    new_dim : int
        Dimension of the vectors the backfill writes.
    ids : array of N ints, optional
        External ids, distinct and non-negative (default ``0..N-1``).

    Attributes
    ----------
    old : Gallery
        Items still stored old.
    new : Gallery
        Backfilled items.

    Raises
    ------
    TypeError
        If ``old_vectors`` is not numeric or ``ids`` is not integer.
    ValueError
        If ``old_vectors`` is not a finite non-empty 2-D array, ``new_dim`` is not a positive
        integer, or ``ids`` repeats an id, holds a negative one or does not hold one id per
        item.

    Examples
    --------
    >>> old = np.eye(3, dtype="float32")
    >>> mg = MixedGallery(old, new_dim=2)
    >>> mg.backfill([2], np.array([[0.0, 1.0]]))
    >>> mg.search(query_old=[[1.0, 0.0, 0.0]], query_new=[[0.0, 1.0]], k=2)[1]
    array([[0, 2]])
    """

    def __init__(self, old_vectors, new_dim: int, ids=None):
        old = as_embeddings(old_vectors, "old_vectors")
        if isinstance(new_dim, bool) or not isinstance(new_dim, (int, np.integer)) or new_dim < 1:
            raise ValueError(f"new_dim must be a positive integer, got {new_dim!r}")
        if ids is not None and len(np.unique(np.asarray(ids))) != len(np.asarray(ids)):
            raise ValueError("ids must not repeat: one id per gallery item")
        self.old = Gallery(old.shape[1])
        self.new = Gallery(new_dim)
        self.old.add(old, ids)
        self._all_ids = set(np.asarray(ids if ids is not None else np.arange(len(old))).tolist())
        self._backfilled: set[int] = set()

    @property
    def ntotal(self) -> int:
        """Number of gallery items, stored old or new."""
        return self.old.ntotal + self.new.ntotal

    @property
    def backfill_ratio(self) -> float:
        """Share of the gallery already stored as new vectors."""
        return self.new.ntotal / self.ntotal

    def backfill(self, ids, new_vectors) -> None:
        """Replace the old vectors of ``ids`` by ``new_vectors`` (one step of the backfill).

        Parameters
        ----------
        ids : array of n ints
            Ids of gallery items not yet backfilled, each once.
        new_vectors : array (n, new_dim)
            Their new vectors (e.g. ``φ_n(g)`` or ``ρ̂(φ_n(g))``), one row per id.

        Raises
        ------
        TypeError
            If ``new_vectors`` is not numeric or ``ids`` is not integer.
        ValueError
            If ``new_vectors`` has the wrong shape or non-finite values, or ``ids`` does not
            hold one id per row, repeats an id, holds a negative one, or names an item that is
            unknown or already backfilled.
        """
        x = as_embeddings(new_vectors, "new_vectors", dim=self.new.dim)
        ids = _as_ids(ids, len(x))
        if len(np.unique(ids)) != len(ids):
            # faiss would store one item twice in the new index.
            raise ValueError("ids must not repeat: each item is backfilled once")
        unknown = [i for i in ids.tolist() if i not in self._all_ids]
        if unknown:
            raise ValueError(f"ids {unknown[:5]} are not in the gallery")
        again = [i for i in ids.tolist() if i in self._backfilled]
        if again:
            raise ValueError(f"ids {again[:5]} are already backfilled")
        self.old.remove_ids(ids)
        self.new.add(x, ids)
        self._backfilled.update(ids.tolist())

    def search(self, query_old, query_new, k: int, exclude_ids=None) -> tuple[np.ndarray, np.ndarray]:
        """Merged top-``k`` over both sub-galleries: ``(scores, ids)``, best first.

        Parameters
        ----------
        query_old : array (n_q, d_old)
            Query vector used against items still stored old.
        query_new : array (n_q, d_new)
            Query vector used against backfilled items.
        k : int
            Results per query; at most :attr:`ntotal` (minus one with ``exclude_ids``).
        exclude_ids : array of n_q ints, optional
            Leave-one-out: the id of each query's own gallery item, removed from its results.

        Returns
        -------
        scores : array (n_q, k)
            Merged scores, best first (each against the query vector of its own space).
        ids : array (n_q, k) of int64
            External ids of the results.

        Raises
        ------
        TypeError
            If a query is not numeric or ``k`` is not an integer.
        ValueError
            If a query has the wrong width or non-finite values, the two queries have different
            numbers of rows, ``k`` is out of range, or ``exclude_ids`` does not hold one
            non-negative id per query.
        """
        qo = as_embeddings(query_old, "query_old", dim=self.old.dim)
        qn = as_embeddings(query_new, "query_new", dim=self.new.dim)
        if len(qo) != len(qn):
            raise ValueError(f"query_old has {len(qo)} rows but query_new has {len(qn)}: one of each per query")
        n_extra = 0 if exclude_ids is None else 1
        k = check_k(k, self.ntotal - n_extra)
        parts = []
        for sub, q in ((self.old, qo), (self.new, qn)):
            kk = min(k + n_extra, sub.ntotal)
            if kk > 0:
                parts.append(sub.index.search(q, kk))
        scores, ids = merge_topk(parts, k + n_extra)
        if exclude_ids is not None:
            scores, ids = _drop_self(scores, ids, _as_ids(exclude_ids, len(qo), "exclude_ids"), k)
        return scores, ids
