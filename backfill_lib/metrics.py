"""Retrieval and backfilling metrics (METHOD §4).

All functions take a *score* matrix (higher = more similar, e.g. inner products of unit
vectors) or precomputed per-query results.

Ties, one rule for the whole library's evaluation: the ranking is by descending score, ties
broken by the smaller gallery index (a stable sort); :func:`topk_hits` follows it, and so do
:func:`backfill_lib.backfill.evaluate_backfill` and
:meth:`backfill_lib.retrieval.MixedGallery.search`. :func:`average_precision` does not depend on
the tie-break: a group of tied items counts as one threshold, as in scikit-learn's
``average_precision_score`` (the precision at a relevant item with score ``s`` is the share of
relevant items among all items scoring ``≥ s``). Ties matter only for exactly equal scores.
"""

from __future__ import annotations

import numpy as np

from .validation import as_embeddings, as_flags, as_labels, check_real, check_ratio, check_seed


def _check_scores(scores, relevant) -> tuple[np.ndarray, np.ndarray]:
    try:
        scores = np.asarray(scores)
    except (ValueError, TypeError):
        raise ValueError("scores must be a (n_queries, n_gallery) matrix of numbers, got a ragged sequence") from None
    if scores.dtype == object or not (np.issubdtype(scores.dtype, np.number) or scores.dtype == bool) \
            or np.issubdtype(scores.dtype, np.complexfloating):
        raise TypeError(f"scores must be an array of numbers (real, not complex), got dtype {scores.dtype}")
    # Keep float64 input as is: down-casting to float32 would turn close scores into ties and
    # change the ranking.
    if not np.issubdtype(scores.dtype, np.floating):
        scores = scores.astype(np.float64)
    if scores.ndim != 2 or scores.shape[0] == 0 or scores.shape[1] == 0:
        raise ValueError(f"scores must be a non-empty (n_queries, n_gallery) matrix, got shape {scores.shape}")
    if np.isnan(scores).any() or np.isposinf(scores).any():
        raise ValueError("scores contains NaN or +inf: only -inf is allowed (it excludes an item)")
    relevant = as_flags(relevant, "relevant")
    if relevant.shape != scores.shape:
        raise ValueError(f"relevant has shape {relevant.shape} but scores has {scores.shape}")
    excluded = relevant & np.isneginf(scores)
    if excluded.any():
        i, j = np.argwhere(excluded)[0]
        raise ValueError(f"relevant[{i}, {j}] is True but scores[{i}, {j}] is -inf (an excluded item): an excluded "
                         "item cannot be relevant; set its relevant entry to False")
    return scores, relevant


def average_precision(scores, relevant) -> np.ndarray:
    """Average precision of each query over the full ranking.

    A group of items with equal scores counts as one threshold, as in scikit-learn's
    ``average_precision_score``: each relevant item contributes the share of relevant items
    among the items scoring at least as high as it, whatever the order inside the group.

    Parameters
    ----------
    scores : array of shape (n_queries, n_gallery)
        Similarity of each query to each gallery item; use ``-inf`` to exclude an item (the
        query itself in the leave-one-out protocol).
    relevant : bool array of shape (n_queries, n_gallery)
        Whether each gallery item is relevant to each query. Excluded items must be False.

    Returns
    -------
    ap : array of shape (n_queries,)
        AP per query; ``nan`` for a query with no relevant item.

    Raises
    ------
    TypeError
        If ``scores`` is not real numbers or ``relevant`` is not booleans (or 0/1).
    ValueError
        If ``scores`` is not a non-empty 2-D matrix, holds NaN or ``+inf``, ``relevant``
        has another shape or values other than 0/1, or an item scored ``-inf`` is relevant.

    Examples
    --------
    >>> average_precision([[0.9, 0.8, 0.1]], [[True, False, True]]).round(3)
    array([0.833])
    >>> average_precision([[0.5, 0.5]], [[True, False]])  # a tie is one threshold: 1/2
    array([0.5])
    """
    scores, relevant = _check_scores(scores, relevant)
    order = np.argsort(-scores, axis=1, kind="stable")
    ranked_scores = np.take_along_axis(scores, order, axis=1)
    ranked = np.take_along_axis(relevant, order, axis=1)
    n_g = scores.shape[1]
    # Each position counts up to the end of its group of equal scores (one threshold per group).
    last_of_group = np.ones(ranked.shape, dtype=bool)
    last_of_group[:, :-1] = ranked_scores[:, 1:] != ranked_scores[:, :-1]
    group_end = np.where(last_of_group, np.arange(n_g), n_g)
    group_end = np.minimum.accumulate(group_end[:, ::-1], axis=1)[:, ::-1]
    hits = np.take_along_axis(np.cumsum(ranked, axis=1), group_end, axis=1)
    precision_at_hit = np.where(ranked, hits / (group_end + 1), 0.0)
    n_rel = ranked.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n_rel > 0, precision_at_hit.sum(axis=1) / n_rel, np.nan)


def topk_hits(scores, relevant, ks=(1, 5)) -> dict[int, np.ndarray]:
    """CMC: for each ``k``, whether a relevant item is among each query's top ``k``.

    Parameters
    ----------
    scores : array of shape (n_queries, n_gallery)
        Similarity of each query to each gallery item (higher is better); ``-inf`` excludes an
        item (its ``relevant`` entry must be False), as in :func:`average_precision`.
    relevant : bool array of shape (n_queries, n_gallery)
        Whether each gallery item is relevant to each query.
    ks : sequence of int, default (1, 5)
        Cut-offs, each a positive integer no larger than ``n_gallery``. The ranking is by
        descending score, ties broken by the smaller gallery index.

    Returns
    -------
    hits : dict of int to bool array of shape (n_queries,)
        ``hits[k][i]`` is True when query ``i`` has a relevant item in its top ``k``; the mean
        over queries is the top-``k`` accuracy.

    Raises
    ------
    TypeError
        If ``scores`` is not real numbers, ``relevant`` is not booleans (or 0/1), or ``ks`` is
        not a sequence of integers.
    ValueError
        If ``scores`` is not a non-empty 2-D matrix, holds NaN or ``+inf``, ``relevant`` has
        another shape or values other than 0/1, an item scored ``-inf`` is relevant, ``ks`` is
        empty, or a ``k`` is below 1 or exceeds ``n_gallery``.

    Examples
    --------
    >>> topk_hits([[0.9, 0.8, 0.1]], [[False, True, False]], ks=(1, 2))
    {1: array([False]), 2: array([ True])}
    """
    scores, relevant = _check_scores(scores, relevant)
    if isinstance(ks, (int, np.integer)) or not hasattr(ks, "__len__"):
        raise TypeError(f"ks must be a sequence of positive integers, e.g. (1, 5), got {ks!r}")
    if len(ks) == 0:
        raise ValueError("ks is empty: give at least one cut-off, e.g. (1, 5)")
    for i, k in enumerate(ks):
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
            raise TypeError(f"ks[{i}] must be a positive integer, got {k!r}")
        if k < 1:
            raise ValueError(f"ks[{i}] = {k}: a cut-off must be at least 1 (top-1 is the first result)")
        if k > scores.shape[1]:
            raise ValueError(f"ks asks for top-{k} but the gallery has {scores.shape[1]} items")
    ks = tuple(int(k) for k in ks)
    kmax = max(ks)
    top = np.argsort(-scores, axis=1, kind="stable")[:, :kmax]
    rel_top = np.take_along_axis(relevant, top, axis=1)
    return {k: rel_top[:, :k].any(axis=1) for k in ks}


def mean_average_precision(scores, relevant) -> float:
    """mAP: the mean of :func:`average_precision` over queries that have a relevant item.

    Parameters
    ----------
    scores : array of shape (n_queries, n_gallery)
        Similarity of each query to each gallery item (higher is better); ``-inf`` excludes an
        item (its ``relevant`` entry must be False).
    relevant : bool array of shape (n_queries, n_gallery)
        Whether each gallery item is relevant to each query.

    Returns
    -------
    float
        Mean AP; ``nan`` (with a ``RuntimeWarning``) if no query has a relevant item.

    Raises
    ------
    TypeError
        If ``scores`` is not real numbers or ``relevant`` is not booleans (or 0/1).
    ValueError
        If ``scores`` is not a non-empty 2-D matrix, holds NaN or ``+inf``, ``relevant``
        has another shape or values other than 0/1, or an item scored ``-inf`` is relevant.

    Examples
    --------
    >>> round(mean_average_precision([[0.9, 0.8, 0.1]], [[True, False, True]]), 3)
    0.833
    """
    return float(np.nanmean(average_precision(scores, relevant)))


def auc(ratios, values) -> float:
    """Area under a backfill curve by the trapezoidal rule over ``ratios`` (METHOD §4).

    The ratios must span [0, 1] for the area to be comparable with a single mAP: it is then
    the mean of the metric over the backfill.

    Parameters
    ----------
    ratios : sequence of float in [0, 1]
        Backfill ratios ``r``, each once, in any order (the points are sorted together); must
        include 0 and 1.
    values : sequence of float
        The metric ``m(r)`` at each ratio (same length as ``ratios``).

    Returns
    -------
    float
        ``AUC(m)``, the trapezoidal area.

    Raises
    ------
    TypeError
        If ``ratios`` is not a sequence, a ratio is not a number, or ``values`` is not numbers.
    ValueError
        If a ratio is outside [0, 1] or repeated, the lengths differ, a value is NaN or
        infinite, or the ratios do not start at 0 and end at 1.

    Examples
    --------
    >>> auc([0, 0.5, 1], [0.5, 0.5, 1.0])
    0.625
    """
    if isinstance(ratios, (str, bytes)) or not hasattr(ratios, "__iter__") \
            or (isinstance(ratios, np.ndarray) and ratios.ndim != 1):
        raise TypeError(f"ratios must be a 1-D sequence of numbers in [0, 1], got {ratios!r}")
    r = np.array([check_ratio(x, f"ratios[{i}]") for i, x in enumerate(ratios)], dtype=np.float64)
    try:
        v = np.asarray(values, dtype=np.float64)
    except (ValueError, TypeError):
        raise TypeError(f"values must be a 1-D sequence of real numbers, got {values!r}") from None
    if v.ndim != 1:
        raise ValueError(f"values must be 1-D (one number per ratio), got shape {v.shape}")
    if v.shape != r.shape:
        raise ValueError(f"values has {v.shape[0]} points but ratios has {r.shape[0]}")
    if not np.isfinite(v).all():
        i = int(np.flatnonzero(~np.isfinite(v))[0])
        raise ValueError(f"values[{i}] is {v[i]}: the area under a curve with an undefined point is undefined "
                         "(a mAP is NaN when no query has a relevant item)")
    if len(np.unique(r)) != len(r):
        raise ValueError(f"ratios has repeated values {r.tolist()}: give each ratio once")
    # Sort the points together: sorting the ratios alone would pair them with the wrong values.
    order = np.argsort(r, kind="stable")
    r, v = r[order], v[order]
    if len(r) == 0 or r[0] != 0.0 or r[-1] != 1.0:
        raise ValueError("ratios must start at 0 and end at 1 for the area to be a mean over the backfill")
    return float(np.trapezoid(v, r)) if hasattr(np, "trapezoid") else float(np.trapz(v, r))


def relative_gain(auc_value: float, old_old: float, new_new: float) -> float:
    """``(AUC − m_old/old) / (m_new/new − m_old/old)``: the share of the upgrade's gain obtained
    on average during the backfill (0 = never upgrading, 1 = new-model quality at once).

    Values below 0 (worse than never upgrading) and above 1 are possible.

    Parameters
    ----------
    auc_value : float
        Area under the strategy's backfill curve (see :func:`auc`).
    old_old : float
        The metric of old/old retrieval (``r = 0`` with no upgrade).
    new_new : float
        The metric of new/new retrieval after a full backfill.

    Returns
    -------
    float
        The relative gain.

    Raises
    ------
    TypeError
        If an argument is not one real number.
    ValueError
        If an argument is NaN or infinite, or ``new_new`` equals ``old_old`` (within ``1e-12``).

    Examples
    --------
    >>> relative_gain(0.75, old_old=0.5, new_new=1.0)
    0.5
    """
    auc_value = check_real(auc_value, "auc_value", "an area under a backfill curve")
    old_old = check_real(old_old, "old_old", "the old/old metric")
    new_new = check_real(new_new, "new_new", "the new/new metric")
    gap = new_new - old_old
    if not np.isfinite(gap) or abs(gap) < 1e-12:
        raise ValueError(
            f"new_new ({new_new}) must differ from old_old ({old_old}): the relative gain is "
            "undefined when the upgrade brings no gain"
        )
    return (auc_value - old_old) / gap


def negative_flip_rate(correct_before, correct_after) -> float:
    """Share of queries whose top-1 was right before (old/old) and is wrong after.

    The share is over all queries, not only those that were right before.

    Parameters
    ----------
    correct_before : bool array of shape (n_queries,)
        Top-1 correctness of each query before the change (usually old/old retrieval).
    correct_after : bool array of shape (n_queries,)
        Top-1 correctness of the same queries after it (e.g. at backfill ratio ``r``).

    Returns
    -------
    float in [0, 1]
        The negative flip rate.

    Raises
    ------
    TypeError
        If an array is not booleans (or 0/1): a string ``"False"`` or a score would pass for
        True.
    ValueError
        If the arrays are not 1-D, have different shapes, are empty, or hold numbers other
        than 0 and 1.

    Examples
    --------
    >>> negative_flip_rate([True, True, False, False], [True, False, True, False])
    0.25
    """
    before = as_flags(correct_before, "correct_before")
    after = as_flags(correct_after, "correct_after")
    if before.ndim != 1:
        raise ValueError(f"correct_before must be 1-D (one flag per query), got shape {before.shape}")
    if before.shape != after.shape:
        raise ValueError(f"correct_after has shape {after.shape} but correct_before has {before.shape}")
    if before.size == 0:
        raise ValueError("correct_before is empty: there are no queries")
    return float(np.mean(before & ~after))


def same_label(query_labels, gallery_labels) -> np.ndarray:
    """Relevance matrix: ``relevant[i, j] = query_labels[i] == gallery_labels[j]``.

    Parameters
    ----------
    query_labels : int array of shape (n_queries,)
        Class label of each query.
    gallery_labels : int array of shape (n_gallery,)
        Class label of each gallery item.

    Returns
    -------
    relevant : bool array of shape (n_queries, n_gallery)
        Whether gallery item ``j`` has the label of query ``i``.

    Raises
    ------
    TypeError
        If the labels are not integers.
    ValueError
        If a label array is not 1-D.

    Examples
    --------
    >>> same_label([0, 1], [1, 0, 1])
    array([[False,  True, False],
           [ True, False,  True]])
    """
    q = as_labels(query_labels, "query_labels")
    g = as_labels(gallery_labels, "gallery_labels")
    return q[:, None] == g[None, :]


def linear_probe(train_x, train_y, test_x, test_y, seed: int = 0) -> float:
    """Test accuracy of a linear probe: a logistic regression on standardised embeddings, fitted on train.

    How much class information an embedding holds, whether or not it is arranged well for
    retrieval (the book probes the old embedding on all classes, also those it never saw).

    Parameters
    ----------
    train_x, test_x : array (n, d)
        Embeddings of the training and test items.
    train_y, test_y : array (n,) of int
        Their labels (all classes).
    seed : int, default 0
        Seed of the solver, in ``0 .. 2**32 - 1``.

    Returns
    -------
    float
        Share of test items whose class the probe predicts.

    Raises
    ------
    ValueError
        If the arrays do not match in length or width (the message names the argument), or
        ``train_y`` holds a single class.
    TypeError
        If an array is not numeric or ``seed`` is not an integer.

    Examples
    --------
    >>> x = np.repeat(np.eye(3), 4, axis=0) + 0.01 * np.arange(12)[:, None]
    >>> linear_probe(x, np.repeat([0, 1, 2], 4), x, np.repeat([0, 1, 2], 4))
    1.0
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    train_x = as_embeddings(train_x, "train_x").astype(np.float64)
    test_x = as_embeddings(test_x, "test_x", dim=train_x.shape[1]).astype(np.float64)
    train_y = as_labels(train_y, "train_y", n=len(train_x))
    test_y = as_labels(test_y, "test_y", n=len(test_x))
    seed = check_seed(seed, "seed")
    if len(np.unique(train_y)) < 2:
        raise ValueError(f"train_y holds a single class ({int(train_y[0])}): a probe needs at least two classes "
                         "to tell apart")
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000, random_state=seed))
    probe.fit(train_x, train_y)
    return float(probe.score(test_x, test_y))
