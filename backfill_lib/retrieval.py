"""Exact retrieval on faiss, the leave-one-out protocol and search over a mixed gallery.

The vocabulary is faiss's: a gallery has ``add``, ``remove_ids`` and ``search``, and
``search`` returns ``(scores, ids)``. Scores are inner products of L2-normalised vectors, so
ranking by descending score is ranking by ascending distance ``d = 2 - 2 a·b`` (METHOD §1).

Ties, one rule for every search here
    Results are ranked by descending score, ties broken by the **smaller id** (for
    :func:`search`, the smaller row index of the gallery). This is the rule of the evaluation
    engine (:mod:`backfill_lib.evaluation`, :func:`backfill_lib.metrics.topk_hits`), so a
    :class:`MixedGallery` over ids ``0..N-1`` and
    :func:`~backfill_lib.backfill.evaluate_backfill` rank the same state alike. faiss itself
    makes no promise about tied items and may return any subset of them at the ``k``-th place;
    the searches here therefore ask faiss for one result more than needed, and for more again
    while the last one is still tied with the ``k``-th, so the answer is exact. Two scores are
    tied when they are equal as float32 numbers; scores computed by another routine (numpy's
    matrix product, a GPU) can differ from faiss's in the last bit and then order two items of
    almost equal score differently.

Norms
    Every function and class that takes embeddings has a ``normalize`` switch. With
    ``normalize=False`` (the default) rows must already have unit L2 norm (within
    :data:`~backfill_lib.validation.UNIT_NORM_TOL`); a row like ``0.5 * x`` is refused with a
    ``ValueError`` naming the argument, because its inner products would not rank like the
    distance. With ``normalize=True`` every row is scaled to unit norm first (cosine
    similarity); an all-zero row is refused then, as it has no direction. Complex numbers, NaN
    or infinite values and zero columns are refused in both cases.
"""

from __future__ import annotations

import faiss
import numpy as np

from .validation import as_embeddings, check_k, check_no_repeats, check_positive_int, normalize_rows

_INT64_MAX = np.iinfo(np.int64).max


def _as_ids(ids, n: int, name: str = "ids") -> np.ndarray:
    """``ids`` as a 1-D int64 array of ``n`` non-negative ids (not checked for repeats)."""
    arr = np.asarray(ids)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise ValueError(f"{name} must be 1-D with one id per vector ({n}), got shape {arr.shape}")
    return _check_id_values(arr, name)


def _as_id_list(ids, name: str = "ids") -> np.ndarray:
    """An int or a 1-D array of ints as a 1-D int64 array (any length, empty allowed)."""
    arr = np.asarray(ids)
    if arr.ndim > 1:
        raise ValueError(f"{name} must be one id or a 1-D array of ids, got shape {arr.shape}")
    return _check_id_values(arr.ravel(), name)


def _check_id_values(arr: np.ndarray, name: str) -> np.ndarray:
    if not arr.size:
        return np.empty(0, dtype=np.int64)
    if not np.issubdtype(arr.dtype, np.integer):
        # A float id would be truncated by faiss (1.7 -> 1) and name another item.
        raise TypeError(f"{name} must be integers, got dtype {arr.dtype}: ids are whole numbers, e.g. np.int64")
    if arr.min() < 0:
        raise ValueError(f"{name} must be non-negative (faiss uses -1 for 'no result'), got {int(arr.min())}")
    if arr.max() > _INT64_MAX:
        raise ValueError(f"{name} must fit in int64, got {arr.max()}")
    return arr.astype(np.int64)


def _check_flag(value, name: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def _unit_rows(x, name: str, normalize: bool, dim: int | None = None) -> np.ndarray:
    """``x`` as float32 with unit-norm rows: normalised when ``normalize``, else checked."""
    arr = as_embeddings(x, name, dim=dim)
    if normalize:
        return normalize_rows(arr, name)
    try:
        return as_embeddings(arr, name, unit_norm=True)
    except ValueError as exc:  # only the norm check can fail here: the shape passed above
        raise ValueError(f"{exc}, or pass normalize=True to normalise the rows inside") from None


def _sorted_topk(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the ``k`` best of ``(scores, ids)``: descending score, ties to the smaller id."""
    empty = ids < 0  # faiss's "no result": after every real result
    order = np.lexsort((ids, -scores, empty), axis=-1)[:, :k]
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(ids, order, axis=1)


class Gallery:
    """An exact inner-product index (``faiss.IndexFlatIP``) with stable, distinct external ids.

    Parameters
    ----------
    dim : int
        Embedding dimension.
    normalize : bool, default False
        ``False``: stored vectors and queries must have unit-norm rows (a ``ValueError`` names
        the argument otherwise). ``True``: rows are L2-normalised before they are stored or
        searched, so scores are cosine similarities.

    Attributes
    ----------
    dim : int
        Embedding dimension.
    normalize : bool
        Whether rows are normalised (``True``) or required to be unit-norm (``False``).

    Raises
    ------
    ValueError
        If ``dim < 1``.
    TypeError
        If ``dim`` is not an integer or ``normalize`` is not a bool.

    Notes
    -----
    Every id is stored at most once: :meth:`add` refuses an id that repeats or is already
    stored. :meth:`search` ranks by descending score with ties broken by the smaller id, exactly
    (see the module docstring).

    Examples
    --------
    >>> g = Gallery(2)
    >>> g.add(np.array([[1.0, 0.0], [0.0, 1.0]]), ids=[10, 20])
    >>> g.search(np.array([[0.8, 0.6]]), k=1)[1]
    array([[10]])
    """

    def __init__(self, dim: int, normalize: bool = False):
        self.dim = check_positive_int(dim, "dim", "the vectors' dimension")
        self.normalize = _check_flag(normalize, "normalize")
        self._index = faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))
        self._next_id = 0  # default ids continue after the largest id ever stored

    @property
    def index(self) -> faiss.IndexIDMap2:
        """The underlying faiss index (an ``IndexFlatIP`` with external ids), for reading only.

        Adding or removing vectors through it bypasses the checks of :meth:`add` (an id
        stored twice is then returned twice by :meth:`search`).
        """
        return self._index

    @property
    def ntotal(self) -> int:
        """Number of stored vectors."""
        return int(self._index.ntotal)

    @property
    def ids(self) -> np.ndarray:
        """The stored ids, ascending (a copy: changing it does not change the gallery)."""
        return np.sort(self._stored_ids())

    def __len__(self) -> int:
        return self.ntotal

    def _stored_ids(self) -> np.ndarray:
        return faiss.vector_to_array(self._index.id_map).astype(np.int64, copy=False)

    def add(self, vectors, ids=None) -> None:
        """Store ``vectors`` under ``ids`` (default: the next unused ids, ``0, 1, ...`` at first).

        Nothing is stored when a check fails.

        Parameters
        ----------
        vectors : array (n, dim)
            Vectors to store, at least one row; unit-norm rows unless the gallery was built
            with ``normalize=True`` (then they are normalised here). Stored as float32.
        ids : array of n non-negative ints, optional
            External ids, distinct and not stored yet. Default: consecutive ids after the
            largest id ever stored, so an id freed by :meth:`remove_ids` is not reused.

        Raises
        ------
        TypeError
            If ``vectors`` is not real numbers or ``ids`` is not integer.
        ValueError
            If ``vectors`` is empty, not 2-D, of another width than ``dim``, not finite, or
            (without ``normalize``) has rows off unit norm (with ``normalize``, all-zero rows);
            or if ``ids`` does not hold one non-negative id per vector, repeats an id, or holds
            an id that is already stored; or if ``ids`` is not given and the default ids would
            pass ``2**63 - 1``.
        """
        x = _unit_rows(vectors, "vectors", self.normalize, dim=self.dim)
        if ids is None:
            # Counting on from ntotal would reuse an id after a removal, and two items would share it.
            if self._next_id + len(x) - 1 > _INT64_MAX:
                raise ValueError(f"no default ids left: the next {len(x)} ids after the largest stored id "
                                 f"({self._next_id - 1}) do not fit in int64; give ids explicitly")
            ids = np.arange(self._next_id, self._next_id + len(x), dtype=np.int64)
        else:
            ids = _as_ids(ids, len(x))
            self._check_new_ids(ids)
        self._add_checked(x, ids)

    def _check_new_ids(self, ids: np.ndarray) -> None:
        check_no_repeats(ids, "ids", "each item is stored under one id, once")
        stored = ids[np.isin(ids, self._stored_ids())]
        if len(stored):
            raise ValueError(
                f"ids {stored[:5].tolist()} are already stored: remove them first (remove_ids) "
                "to replace their vectors"
            )

    def _add_checked(self, x: np.ndarray, ids: np.ndarray) -> None:
        """Store validated unit-norm float32 rows under distinct, unused ids."""
        self._index.add_with_ids(x, ids)
        self._next_id = max(self._next_id, int(ids.max()) + 1)

    def remove_ids(self, ids) -> int:
        """Remove the vectors stored under ``ids``; returns how many were removed.

        As in faiss, an id that is not stored is ignored: compare the returned count with the
        number of ids to detect one.

        Parameters
        ----------
        ids : int or 1-D array of ints
            External ids to remove (non-negative integers; an id given twice is removed once).

        Returns
        -------
        int
            Number of vectors removed.

        Raises
        ------
        TypeError
            If ``ids`` is not integer (``1.7`` is refused, not rounded to an id).
        ValueError
            If ``ids`` is not one id or a 1-D array, or holds a negative id.
        """
        arr = _as_id_list(ids)
        return int(self._index.remove_ids(arr)) if arr.size else 0

    def search(self, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` items per query by inner product: ``(scores, ids)``, best first.

        Ranked by descending score, ties broken by the smaller id; exact even when faiss would
        cut a group of tied items at the ``k``-th place (see the module docstring).

        Parameters
        ----------
        queries : array (n_q, dim)
            Query vectors; unit-norm rows unless the gallery was built with ``normalize=True``
            (then they are normalised here).
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
            If ``queries`` is not real numbers or ``k`` is not an integer.
        ValueError
            If ``queries`` is not a finite non-empty ``(n_q, dim)`` matrix, (without
            ``normalize``) has rows off unit norm (with ``normalize``, all-zero rows), or ``k``
            is below 1 or larger than the number of stored vectors.
        """
        q = _unit_rows(queries, "queries", self.normalize, dim=self.dim)
        k = check_k(k, self.ntotal)
        return self._topk(q, k)

    def _topk(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-``k`` with the tie rule, for validated queries and ``1 <= k <= ntotal``."""
        n = self.ntotal
        out_scores = np.empty((len(q), k), dtype=np.float32)
        out_ids = np.empty((len(q), k), dtype=np.int64)
        rows = np.arange(len(q))
        fetch = min(k + 1, n)  # one more than k shows whether the k-th score is tied further down
        while len(rows):
            scores, ids = self._index.search(q[rows], fetch)
            # Items tied with the k-th may be missing only when the last one fetched is tied with it;
            # each row's answer comes from one faiss call, so its scores are comparable.
            open_rows = scores[:, -1] == scores[:, k - 1] if fetch < n else np.zeros(len(rows), dtype=bool)
            done = ~open_rows
            out_scores[rows[done]], out_ids[rows[done]] = _sorted_topk(scores[done], ids[done], k)
            rows = rows[open_rows]
            fetch = min(2 * fetch, n)
        return out_scores, out_ids


def search(queries, gallery, k: int, exclude_self: bool = False,
           normalize: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-``k`` search of ``queries`` in ``gallery``.

    A one-off :class:`Gallery` is built from ``gallery``. Results are ranked by descending
    score, ties broken by the smaller gallery row index, exactly (see the module docstring).

    Parameters
    ----------
    queries : array (n_q, d)
        Query vectors, unit-norm rows unless ``normalize``.
    gallery : array (n_g, d)
        Gallery vectors, in the same space as the queries, unit-norm rows unless ``normalize``.
    k : int
        Results per query; at most the number of searchable items (``n_g``, or ``n_g - 1``
        with ``exclude_self``).
    exclude_self : bool, default False
        Leave-one-out protocol: query ``i`` is gallery item ``i`` (same set), and is removed
        from its own results. Requires ``n_q == n_g``.
    normalize : bool, default False
        ``False``: rows off unit norm are refused. ``True``: both inputs are L2-normalised
        first (cosine similarity).

    Returns
    -------
    scores : array (n_q, k) of float32
        Inner products, best first.
    ids : array (n_q, k) of int64
        Row indices into ``gallery``.

    Raises
    ------
    TypeError
        If an input is not real numbers, ``k`` is not an integer, or a flag is not a bool.
    ValueError
        If the inputs are not finite non-empty 2-D arrays of one width, have rows off unit
        norm (without ``normalize``) or all-zero rows (with it), ``exclude_self`` is set with
        ``n_q != n_g``, or ``k`` is out of range.

    Examples
    --------
    >>> x = np.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
    >>> search(x, x, k=1, exclude_self=True)[1]
    array([[1],
           [0],
           [1]])
    """
    exclude_self = _check_flag(exclude_self, "exclude_self")
    normalize = _check_flag(normalize, "normalize")
    g = _unit_rows(gallery, "gallery", normalize)
    q = _unit_rows(queries, "queries", normalize, dim=g.shape[1])
    if exclude_self and len(q) != len(g):
        raise ValueError(
            f"exclude_self=True needs queries and gallery to be the same items, but there are "
            f"{len(q)} queries and {len(g)} gallery items"
        )
    k = check_k(k, len(g) - int(exclude_self))
    index = Gallery(g.shape[1])
    index._add_checked(g, np.arange(len(g), dtype=np.int64))
    scores, ids = index._topk(q, k + int(exclude_self))
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


def score_matrix(queries, gallery, normalize: bool = False) -> np.ndarray:
    """All inner products ``queries @ gallery.T`` (what ``IndexFlatIP`` computes before its top-k).

    Used where a metric needs the full ranking (mAP), not only a top-k list. Ranking a row by
    descending score with ties to the smaller column index (a stable sort of ``-scores``) gives
    the order of :func:`search`, up to the last bit of the float32 products (see the module
    docstring).

    Parameters
    ----------
    queries : array (n_q, d)
        Query vectors, unit-norm rows unless ``normalize``.
    gallery : array (n_g, d)
        Gallery vectors, in the same space as the queries, unit-norm rows unless ``normalize``.
    normalize : bool, default False
        ``False``: rows off unit norm are refused. ``True``: both inputs are L2-normalised
        first (cosine similarity).

    Returns
    -------
    array (n_q, n_g) of float32
        ``scores[i, j]`` is the inner product of query ``i`` and gallery item ``j``.

    Raises
    ------
    TypeError
        If an input is not real numbers or ``normalize`` is not a bool.
    ValueError
        If the inputs are not finite non-empty 2-D arrays of one width, or have rows off unit
        norm (without ``normalize``) or all-zero rows (with it).
    """
    normalize = _check_flag(normalize, "normalize")
    g = _unit_rows(gallery, "gallery", normalize)
    q = _unit_rows(queries, "queries", normalize, dim=g.shape[1])
    return q @ g.T


def merge_topk(results: list[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge several per-query ``(scores, ids)`` lists into one top-``k`` list, best first.

    Ranked by descending score, ties broken by the smaller id (whatever the order of
    ``results`` or within each list). ``ids == -1`` marks an empty slot (faiss convention) and
    comes after every real result. Scores are used as given: they are not embeddings, so there
    is nothing to normalise. The merge is exact when each list holds its index's top ``k``
    with the same tie rule (as :meth:`Gallery.search` returns) and ids are distinct across lists.

    Parameters
    ----------
    results : list of (scores, ids) pairs
        One pair per searched index, each two arrays ``(n_q, k_i)`` (real scores, integer
        ids in ``0 .. 2**63 - 1``, or -1 for an empty slot), e.g. from :meth:`Gallery.search`.
        All lists must have the same number of rows; an id may appear in one query's results
        once.
    k : int
        Results to keep per query, at least 1.

    Returns
    -------
    scores : array (n_q, min(k, sum of k_i))
        Merged scores, best first; empty slots get ``-inf``.
    ids : array (n_q, min(k, sum of k_i)) of int64
        Ids of the merged results (``-1`` only where fewer real results than ``k`` exist).

    Raises
    ------
    TypeError
        If ``results`` is not a list of pairs, scores are not real numbers, ids are not
        integers, or ``k`` is not an integer.
    ValueError
        If ``results`` is empty, a pair's arrays are not 2-D of one shape, the lists have
        different numbers of rows, a score is NaN, an id is below -1 or does not fit in int64
        (an unsigned id of ``2**63`` or more), an id appears twice in one query's results, or
        ``k < 1``.

    Examples
    --------
    >>> a = (np.array([[0.9, 0.1]]), np.array([[5, -1]]))
    >>> b = (np.array([[0.5]]), np.array([[7]]))
    >>> merge_topk([a, b], k=2)[1]
    array([[5, 7]])
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"k must be a positive integer, got {type(k).__name__}")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if not isinstance(results, (list, tuple)) or not results:
        raise ValueError("results must be a non-empty list of (scores, ids) pairs, one per searched index")
    all_scores, all_ids = [], []
    for i, pair in enumerate(results):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise TypeError(f"results[{i}] must be a (scores, ids) pair, got {type(pair).__name__}")
        s, ids = np.asarray(pair[0]), np.asarray(pair[1])
        if s.ndim != 2 or s.shape != ids.shape:
            raise ValueError(
                f"results[{i}] must hold two 2-D arrays of one shape (n_queries, k_i), got scores "
                f"{s.shape} and ids {ids.shape}"
            )
        if not (np.issubdtype(s.dtype, np.floating) or np.issubdtype(s.dtype, np.integer)):
            raise TypeError(f"results[{i}] scores must be real numbers, got dtype {s.dtype}")
        if ids.size and not np.issubdtype(ids.dtype, np.integer):
            raise TypeError(f"results[{i}] ids must be integers, got dtype {ids.dtype}")
        if ids.size and ids.max() > _INT64_MAX:
            # As int64 it would wrap to a negative number and pass for an empty slot (-1) or another id.
            raise ValueError(f"results[{i}] ids must fit in int64 (at most 2**63 - 1), got {int(ids.max())}")
        if ids.size and ids.min() < -1:
            raise ValueError(f"results[{i}] ids must be non-negative, or -1 for an empty slot (faiss's "
                             f"'no result'), got {int(ids.min())}")
        if np.isnan(s).any():
            raise ValueError(f"results[{i}] scores contain NaN: they cannot be ranked")
        if len(s) != len(np.asarray(results[0][0])):
            raise ValueError(
                f"results[{i}] has {len(s)} rows but results[0] has {len(np.asarray(results[0][0]))}: "
                "one row per query in every list"
            )
        all_scores.append(s)
        all_ids.append(ids.astype(np.int64))
    ids = np.concatenate(all_ids, axis=1)
    scores = np.concatenate(all_scores, axis=1)
    srt = np.sort(ids, axis=1)
    twice = (srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)
    if twice.any():
        row = int(np.flatnonzero(twice.any(axis=1))[0])
        raise ValueError(
            f"id {int(srt[row, 1:][twice[row]][0])} appears twice in the results of query {row}: each item must be "
            "stored in one index only (the merged list would rank it twice)"
        )
    scores = np.where(ids < 0, -np.inf, scores).astype(np.result_type(scores.dtype, np.float32))
    return _sorted_topk(scores, ids, k)


class MixedGallery:
    """A gallery in the middle of an online backfill (METHOD §1–2).

    Every item is stored either as an *old* vector (in the old model's space, or however the
    strategy stores it) or, once backfilled, as a *new* vector. Each space is one faiss index;
    a query brings one vector per space, both sub-galleries are searched, and the two
    ``(score, id)`` lists are merged into one ranking. This is distance rank merge when the
    query vectors are ``φ_o(q)`` and ``φ_n(q)``, and the reverse transformation when the old-space
    query is ``ψ̂(φ_n(q))``.

    The two sub-indices are private: items change only through :meth:`backfill` (old to new),
    :meth:`add` (a new item, stored new) and :meth:`remove`, so every id is in exactly one of
    the two parts. :attr:`old_ids` and :attr:`new_ids` show where each item is.

    Parameters
    ----------
    old_vectors : array (N, d_old)
        The gallery as it is stored before the upgrade; unit-norm rows unless ``normalize``.
    new_dim : int
        Dimension of the vectors the backfill writes.
    ids : array of N ints, optional
        External ids, distinct and non-negative (default ``0..N-1``).
    normalize : bool, default False
        ``False``: every vector given to the gallery (stored or query) must have unit-norm rows,
        else a ``ValueError`` names the argument. ``True``: rows are L2-normalised first.

    Attributes
    ----------
    normalize : bool
        Whether rows are normalised (``True``) or required to be unit-norm (``False``).

    Raises
    ------
    TypeError
        If ``old_vectors`` is not real numbers, ``ids`` or ``new_dim`` is not integer or
        ``normalize`` is not a bool.
    ValueError
        If ``old_vectors`` is not a finite non-empty 2-D array or (without ``normalize``) has
        rows off unit norm (with ``normalize``, all-zero rows), ``new_dim < 1``, or ``ids``
        repeats an id, holds a negative one or does not hold one id per item.

    Examples
    --------
    >>> old = np.eye(3, dtype="float32")
    >>> mg = MixedGallery(old, new_dim=2)
    >>> mg.backfill([2], np.array([[0.0, 1.0]]))
    >>> mg.search(query_old=[[1.0, 0.0, 0.0]], query_new=[[0.0, 1.0]], k=2)[1]
    array([[0, 2]])
    >>> mg.remove([1])
    >>> mg.add([7], np.array([[1.0, 0.0]]))
    >>> mg.old_ids, mg.new_ids, mg.backfill_ratio
    (array([0]), array([2, 7]), 0.6666666666666666)
    """

    def __init__(self, old_vectors, new_dim: int, ids=None, normalize: bool = False):
        self.normalize = _check_flag(normalize, "normalize")
        old = _unit_rows(old_vectors, "old_vectors", self.normalize)
        new_dim = check_positive_int(new_dim, "new_dim", "the new vectors' dimension")
        ids = np.arange(len(old), dtype=np.int64) if ids is None else _as_ids(ids, len(old))
        check_no_repeats(ids, "ids", "one id per gallery item")
        self._old = Gallery(old.shape[1])
        self._new = Gallery(new_dim)
        self._old._add_checked(old, ids)

    @property
    def old_dim(self) -> int:
        """Dimension of the vectors stored old (and of ``query_old``)."""
        return self._old.dim

    @property
    def new_dim(self) -> int:
        """Dimension of the vectors stored new (and of ``query_new``)."""
        return self._new.dim

    @property
    def ntotal(self) -> int:
        """Number of gallery items, stored old or new."""
        return self._old.ntotal + self._new.ntotal

    def __len__(self) -> int:
        return self.ntotal

    @property
    def old_ids(self) -> np.ndarray:
        """Ids of the items stored old, ascending (a copy)."""
        return self._old.ids

    @property
    def new_ids(self) -> np.ndarray:
        """Ids of the items stored new (backfilled or added new), ascending (a copy)."""
        return self._new.ids

    @property
    def ids(self) -> np.ndarray:
        """Ids of all items, ascending (a copy)."""
        return np.sort(np.concatenate([self._old._stored_ids(), self._new._stored_ids()]))

    @property
    def backfill_ratio(self) -> float:
        """Share of the items in the gallery now that are stored as new vectors.

        ``len(new_ids) / ntotal``: an item added with :meth:`add` counts as new (it is stored
        new), a removed item no longer counts at all. It is the ratio ``r`` of METHOD §1 when the
        gallery only ever changed by :meth:`backfill`. ``nan`` when the gallery is empty (every
        item removed): there is no share to give.
        """
        n = self.ntotal
        return self._new.ntotal / n if n else float("nan")

    def _where(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return np.isin(ids, self._old._stored_ids()), np.isin(ids, self._new._stored_ids())

    def _new_rows(self, new_vectors, ids) -> tuple[np.ndarray, np.ndarray]:
        x = _unit_rows(new_vectors, "new_vectors", self.normalize, dim=self._new.dim)
        ids = _as_ids(ids, len(x))
        check_no_repeats(ids, "ids", "each item is stored once")  # faiss would store one item twice
        return x, ids

    def backfill(self, ids, new_vectors) -> None:
        """Replace the old vectors of ``ids`` by ``new_vectors`` (one step of the backfill).

        All or nothing: when a check fails the gallery is unchanged.

        Parameters
        ----------
        ids : array of n ints
            Ids of items stored old, each once.
        new_vectors : array (n, new_dim)
            Their new vectors (e.g. ``φ_n(g)`` or ``ρ̂(φ_n(g))``), one row per id; unit-norm
            rows unless ``normalize``.

        Raises
        ------
        TypeError
            If ``new_vectors`` is not real numbers or ``ids`` is not integer.
        ValueError
            If ``new_vectors`` has the wrong shape, non-finite values or rows off unit norm
            (without ``normalize``), or ``ids`` does not hold one id per row, repeats an id,
            holds a negative one, or names an item that is not in the gallery (never stored, or
            removed) or is already stored new (backfilled before, or added with :meth:`add`).
        """
        x, ids = self._new_rows(new_vectors, ids)
        in_old, in_new = self._where(ids)
        if in_new.any():
            raise ValueError(
                f"ids {ids[in_new][:5].tolist()} are already backfilled (stored new): each item is "
                "backfilled once"
            )
        if not in_old.all():
            raise ValueError(f"ids {ids[~in_old][:5].tolist()} are not in the gallery (never stored, or removed)")
        self._old.remove_ids(ids)
        self._new._add_checked(x, ids)

    def add(self, ids, new_vectors) -> None:
        """Store new items as new vectors: an item that arrives during the backfill needs no old vector.

        All or nothing: when a check fails the gallery is unchanged.

        Parameters
        ----------
        ids : array of n ints
            Ids of the new items: non-negative, distinct, none in the gallery. An id that was
            removed may be used again.
        new_vectors : array (n, new_dim)
            Their new vectors, one row per id; unit-norm rows unless ``normalize``.

        Raises
        ------
        TypeError
            If ``new_vectors`` is not real numbers or ``ids`` is not integer.
        ValueError
            If ``new_vectors`` has the wrong shape, non-finite values or rows off unit norm
            (without ``normalize``), or ``ids`` does not hold one id per row, repeats an id,
            holds a negative one or one already in the gallery (use :meth:`backfill` to give an
            item stored old its new vector).
        """
        x, ids = self._new_rows(new_vectors, ids)
        in_old, in_new = self._where(ids)
        if in_old.any() or in_new.any():
            present = ids[in_old | in_new][:5].tolist()
            raise ValueError(
                f"ids {present} are already in the gallery: backfill(ids, new_vectors) replaces the "
                "vector of an item stored old; remove(ids) first to replace an item"
            )
        self._new._add_checked(x, ids)

    def remove(self, ids) -> None:
        """Delete items from the gallery, wherever they are stored (old or new).

        All or nothing: when a check fails nothing is removed. A removed item is gone for good:
        it cannot be backfilled; :meth:`add` may store its id again.

        Parameters
        ----------
        ids : int or 1-D array of ints
            Ids of items in the gallery, each once.

        Raises
        ------
        TypeError
            If ``ids`` is not integer.
        ValueError
            If ``ids`` is not one id or a 1-D array, repeats an id, holds a negative one, or
            names an item that is not in the gallery.
        """
        ids = _as_id_list(ids)
        check_no_repeats(ids, "ids", "each item is removed once")
        in_old, in_new = self._where(ids)
        unknown = ids[~(in_old | in_new)]
        if len(unknown):
            raise ValueError(f"ids {unknown[:5].tolist()} are not in the gallery: nothing was removed")
        self._old.remove_ids(ids[in_old])
        self._new.remove_ids(ids[in_new])

    def search(self, query_old, query_new, k: int, exclude_ids=None) -> tuple[np.ndarray, np.ndarray]:
        """Merged top-``k`` over both sub-galleries: ``(scores, ids)``, best first.

        The ranking is that of the full merged score (``query_old`` against items stored old,
        ``query_new`` against items stored new), by descending score with ties broken by the
        smaller id, exactly (see the module docstring); over ids ``0..N-1`` it is the ranking of
        :func:`~backfill_lib.backfill.evaluate_backfill` in the same state.

        Parameters
        ----------
        query_old : array (n_q, old_dim)
            Query vector used against items stored old; unit-norm rows unless ``normalize``.
        query_new : array (n_q, new_dim)
            Query vector used against items stored new; unit-norm rows unless ``normalize``.
        k : int
            Results per query; at most :attr:`ntotal` (minus one with ``exclude_ids``).
        exclude_ids : array of n_q ints, optional
            Leave-one-out: the id of each query's own gallery item, removed from its results
            (an id not in the gallery excludes nothing).

        Returns
        -------
        scores : array (n_q, k) of float32
            Merged scores, best first (each against the query vector of its own space).
        ids : array (n_q, k) of int64
            External ids of the results.

        Raises
        ------
        TypeError
            If a query is not real numbers, ``k`` is not an integer or ``exclude_ids`` is not
            integer.
        ValueError
            If a query has the wrong width, non-finite values or rows off unit norm (without
            ``normalize``), the two queries have different numbers of rows, ``k`` is out of
            range, or ``exclude_ids`` does not hold one non-negative id per query.
        """
        qo = _unit_rows(query_old, "query_old", self.normalize, dim=self._old.dim)
        qn = _unit_rows(query_new, "query_new", self.normalize, dim=self._new.dim)
        if len(qo) != len(qn):
            raise ValueError(f"query_old has {len(qo)} rows but query_new has {len(qn)}: one of each per query")
        own = None if exclude_ids is None else _as_ids(exclude_ids, len(qo), "exclude_ids")
        n_extra = 0 if own is None else 1
        k = check_k(k, self.ntotal - n_extra)
        parts = []
        for sub, q in ((self._old, qo), (self._new, qn)):
            kk = min(k + n_extra, sub.ntotal)
            if kk > 0:
                parts.append(sub._topk(q, kk))
        # Each part's exact top-(k + n_extra) holds every item of the merged top-(k + n_extra).
        scores, ids = _sorted_topk(np.concatenate([s for s, _ in parts], axis=1),
                                   np.concatenate([i for _, i in parts], axis=1), k + n_extra)
        if own is not None:
            scores, ids = _drop_self(scores, ids, own, k)
        return scores, ids
