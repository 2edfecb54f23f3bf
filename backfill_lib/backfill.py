"""The backfill simulation engine (METHOD §1, §2, §4).

A :class:`Strategy` says how a query is scored against a partly backfilled gallery: which
query vector is compared with items still stored *old*, and which with items already stored
*new*. Every strategy of METHOD §2 is one of these (the constructors below), so transformation
methods (ψ, h, ρ) plug in by handing over transformed embeddings; the engine never changes.

Embeddings are extracted once per model. At each backfill ratio the engine only re-selects,
per gallery item, which stored vector is used, then ranks the whole gallery by the merged score.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .metrics import average_precision, auc, negative_flip_rate, relative_gain, same_label, topk_hits
from .validation import as_embeddings, as_labels, check_choice, check_ratio, check_ratios

#: The 11 ratios of METHOD §4.
DEFAULT_RATIOS: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(11))

ORDER_POLICIES = ("random", "uncertain_first")


@dataclass(frozen=True)
class Strategy:
    """How queries are scored against a gallery in the middle of a backfill.

    The score of gallery item ``g`` for query ``q`` is ``query_old[q] · gallery_old[g]`` while
    ``g`` is stored old and ``query_new[q] · gallery_new[g]`` once it is backfilled (higher is
    better; on unit vectors this is ``1 - d/2``).

    Usually built by one of the constructors (:func:`old_only`, :func:`rank_merge`,
    :func:`reverse_transform`, ...). Each parameter is kept as an attribute of the same name;
    the four embedding matrices are stored as C-contiguous float32 (not normalised here).

    Parameters
    ----------
    name : str
        Name of the strategy (its key in the result of :func:`simulate_backfill`).
    query_old : array (n_q, d1)
        Query vector used against items still stored old.
    gallery_old : array (N, d1)
        What is stored for each gallery item before it is backfilled.
    query_new : array (n_q, d2)
        Query vector used against backfilled items.
    gallery_new : array (N, d2)
        What the backfill writes for each gallery item.
    backbone_passes : int, default 1
        Backbone forward passes needed per query (METHOD §2).
    offline : bool, default False
        Offline backfilling: the new index is switched on only when ``r = 1``.

    Raises
    ------
    TypeError
        If an embedding matrix is not numeric.
    ValueError
        If an embedding matrix is not a finite non-empty 2-D array, a query and its gallery
        differ in width, the two galleries differ in length, or the two query matrices differ
        in length.
    """

    name: str
    query_old: np.ndarray
    gallery_old: np.ndarray
    query_new: np.ndarray
    gallery_new: np.ndarray
    backbone_passes: int = 1
    offline: bool = False

    def __post_init__(self):
        go = as_embeddings(self.gallery_old, "gallery_old")
        qo = as_embeddings(self.query_old, "query_old", dim=go.shape[1])
        gn = as_embeddings(self.gallery_new, "gallery_new")
        qn = as_embeddings(self.query_new, "query_new", dim=gn.shape[1])
        if len(go) != len(gn):
            raise ValueError(
                f"gallery_old has {len(go)} items but gallery_new has {len(gn)}: both must store "
                "the same gallery"
            )
        if len(qo) != len(qn):
            raise ValueError(f"query_old has {len(qo)} rows but query_new has {len(qn)}")
        for name, arr in (("query_old", qo), ("gallery_old", go), ("query_new", qn), ("gallery_new", gn)):
            object.__setattr__(self, name, arr)

    @property
    def n_gallery(self) -> int:
        """Number of gallery items ``N``."""
        return len(self.gallery_old)

    @property
    def n_queries(self) -> int:
        """Number of queries ``n_q``."""
        return len(self.query_old)


def _same_items(x, query):
    return x if query is None else query


def old_only(old, old_query=None) -> Strategy:
    """No upgrade: ``d(φ_o(q), φ_o(g))`` for every ``g``, whatever the ratio.

    Parameters
    ----------
    old : array (N, d_o)
        Old embeddings ``φ_o(g)`` of the gallery items.
    old_query : array (n_q, d_o), optional
        Old embeddings ``φ_o(q)`` of the queries; default ``old`` (leave-one-out: the queries are the gallery items).

    Returns
    -------
    Strategy
        Named ``"old"``, one backbone pass per query.
    """
    q = _same_items(old, old_query)
    return Strategy("old", q, old, q, old, backbone_passes=1)


def offline_backfill(old, new, old_query=None, new_query=None) -> Strategy:
    """Old/old until the backfill is complete, then new/new (a step curve).

    Parameters
    ----------
    old : array (N, d_o)
        Old embeddings ``φ_o(g)`` of the gallery items.
    new : array (N, d_n)
        New embeddings ``φ_n(g)`` of the gallery items.
    old_query : array (n_q, d_o), optional
        ``φ_o(q)`` of the queries; default ``old`` (leave-one-out: the queries are the gallery items).
    new_query : array (n_q, d_n), optional
        ``φ_n(q)`` of the queries; default ``new``.

    Returns
    -------
    Strategy
        Named ``"offline"``, with ``offline=True`` (the backfill order is ignored); one
        backbone pass per query.
    """
    return Strategy("offline", _same_items(old, old_query), old, _same_items(new, new_query), new,
                    backbone_passes=1, offline=True)


def compatible_single_space(old, new, new_query=None, name: str = "compatible") -> Strategy:
    """BCT-style: the new query ``φ_n(q)`` searches whatever is stored (old or new vectors).

    Parameters
    ----------
    old : array (N, d)
        Old embeddings ``φ_o(g)`` of the gallery items (what is stored before the backfill).
    new : array (N, d)
        Embeddings of the gallery items under the compatible new model (BCT, RA-BCT), same
        dimension as ``old``.
    new_query : array (n_q, d), optional
        The compatible new model's embeddings of the queries; default ``new`` (leave-one-out: the queries are the gallery items).
    name : str, default "compatible"
        Name of the strategy, e.g. ``"bct"``.

    Returns
    -------
    Strategy
        One backbone pass (new) per query.

    Raises
    ------
    ValueError
        If ``old`` and ``new`` differ in dimension (the single space needs ``d_n = d_o``).
    """
    q = _same_items(new, new_query)
    return Strategy(name, q, old, q, new, backbone_passes=1)


def rank_merge(old, new, old_query=None, new_query=None) -> Strategy:
    """Distance rank merge: ``φ_o(q)`` against old-stored items, ``φ_n(q)`` against new-stored
    ones, one ranking by distance. Two backbone passes per query.

    Parameters
    ----------
    old : array (N, d_o)
        Old embeddings ``φ_o(g)`` of the gallery items.
    new : array (N, d_n)
        New embeddings ``φ_n(g)`` of the gallery items.
    old_query : array (n_q, d_o), optional
        ``φ_o(q)`` of the queries; default ``old`` (leave-one-out: the queries are the gallery items).
    new_query : array (n_q, d_n), optional
        ``φ_n(q)`` of the queries; default ``new``.

    Returns
    -------
    Strategy
        Named ``"rank_merge"``, two backbone passes per query.
    """
    return Strategy("rank_merge", _same_items(old, old_query), old, _same_items(new, new_query), new,
                    backbone_passes=2)


def reverse_transform(old, psi_new, rho_new, psi_query=None, rho_query=None,
                      name: str = "reverse_transform") -> Strategy:
    """Reverse transformation: ``ψ̂(φ_n(q))`` against old-stored items, ``ρ̂(φ_n(q))`` against
    backfilled items ``ρ̂(φ_n(g))``. One backbone pass (new) plus a small MLP.

    ``psi_new`` and ``rho_new`` are the (normalised) transformed new embeddings of the items;
    pass ``rho_new = φ_n`` when there is no learnable new embedding.

    Parameters
    ----------
    old : array (N, d_o)
        Old embeddings ``φ_o(g)`` stored for the gallery items.
    psi_new : array (N, d_o)
        ``ψ̂(φ_n(g))`` of the gallery items; used as the queries against old-stored items
        unless ``psi_query`` is given.
    rho_new : array (N, d_ρ)
        ``ρ̂(φ_n(g))``, what the backfill writes; also the queries against backfilled items
        unless ``rho_query`` is given.
    psi_query : array (n_q, d_o), optional
        ``ψ̂(φ_n(q))`` of the queries; default ``psi_new`` (leave-one-out: the queries are the gallery items).
    rho_query : array (n_q, d_ρ), optional
        ``ρ̂(φ_n(q))`` of the queries; default ``rho_new``.
    name : str, default "reverse_transform"
        Name of the strategy (e.g. to tell ablations apart).

    Returns
    -------
    Strategy
        One backbone pass per query.
    """
    return Strategy(name, _same_items(psi_new, psi_query), old, _same_items(rho_new, rho_query), rho_new,
                    backbone_passes=1)


def forward_transform(h_old, new, new_query=None, name: str = "forward_transform") -> Strategy:
    """FCT-style: stored old vectors mapped by ``ĥ`` into the new space, searched with ``φ_n(q)``.

    Parameters
    ----------
    h_old : array (N, d_n)
        ``ĥ(φ_o(g))``, the stored old vectors of the gallery items transformed into the new
        space.
    new : array (N, d_n)
        New embeddings ``φ_n(g)`` of the gallery items, what the backfill writes.
    new_query : array (n_q, d_n), optional
        ``φ_n(q)`` of the queries; default ``new`` (leave-one-out: the queries are the gallery items).
    name : str, default "forward_transform"
        Name of the strategy.

    Returns
    -------
    Strategy
        One backbone pass (new) per query.
    """
    q = _same_items(new, new_query)
    return Strategy(name, q, h_old, q, new, backbone_passes=1)


def backfill_order(n: int, seed: int = 0, policy: str = "random", uncertainty=None) -> np.ndarray:
    """The order ``π`` in which gallery items are re-extracted with the new model.

    Parameters
    ----------
    n : int
        Gallery size.
    seed : int
        Seed of the random order (ties of ``uncertain_first`` are broken at random too).
    policy : {"random", "uncertain_first"}
        ``uncertain_first`` backfills items with the largest ``uncertainty`` first (an extension).
    uncertainty : array of n floats, optional
        Needed by ``uncertain_first``, e.g. ``1 -`` the old model's top class probability;
        ignored by ``random``.

    Returns
    -------
    order : array (n,) of int
        A permutation of ``range(n)``: ``order[:round(r·n)]`` is ``B_r``.

    Raises
    ------
    ValueError
        If ``n`` is not a positive integer, ``policy`` is unknown, or ``uncertain_first`` gets
        no ``uncertainty`` or one that is not ``n`` finite values.

    Examples
    --------
    >>> sorted(backfill_order(4, seed=1).tolist())
    [0, 1, 2, 3]
    >>> backfill_order(3, policy="uncertain_first", uncertainty=[0.1, 0.9, 0.5]).tolist()
    [1, 2, 0]
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be a positive integer (gallery size), got {n!r}")
    check_choice(policy, ORDER_POLICIES, "policy")
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    if policy == "random":
        return perm
    if uncertainty is None:
        raise ValueError("policy='uncertain_first' needs uncertainty (one value per gallery item)")
    u = np.asarray(uncertainty, dtype=np.float64)
    if u.shape != (n,) or not np.isfinite(u).all():
        raise ValueError(f"uncertainty must hold {n} finite values, got shape {u.shape}")
    return perm[np.argsort(-u[perm], kind="stable")]


def backfilled_mask(order, ratio: float) -> np.ndarray:
    """Boolean mask of the items in ``B_r``: the first ``round(r·N)`` items of ``order``.

    ``round`` is Python's (halves go to the even number).

    Parameters
    ----------
    order : array (N,) of int
        A backfill order ``π``, a permutation of ``range(N)`` (e.g. from
        :func:`backfill_order`).
    ratio : float in [0, 1]
        Backfill ratio ``r``.

    Returns
    -------
    mask : bool array (N,)
        ``mask[g]`` is True when item ``g`` is stored new.

    Raises
    ------
    TypeError
        If ``ratio`` is not a number.
    ValueError
        If ``order`` is not a permutation or ``ratio`` is outside [0, 1].

    Examples
    --------
    >>> backfilled_mask([2, 0, 1, 3], 0.5)
    array([ True, False,  True, False])
    """
    return _mask(_check_order(order), check_ratio(ratio, "ratio"))


def _check_order(order, n: int | None = None) -> np.ndarray:
    order = np.asarray(order)
    if order.ndim != 1:
        raise ValueError(f"order must be a 1-D permutation of the gallery items, got shape {order.shape}")
    n = len(order) if n is None else n
    # A repeated or missing index would silently backfill fewer than round(r·N) items.
    if order.shape != (n,) or (n and not np.issubdtype(order.dtype, np.integer)) \
            or not np.array_equal(np.sort(order), np.arange(n)):
        raise ValueError(f"order must be a permutation of range({n}), e.g. from backfill_order")
    return order


def _mask(order: np.ndarray, r: float) -> np.ndarray:
    mask = np.zeros(len(order), dtype=bool)
    mask[order[: int(round(r * len(order)))]] = True
    return mask


@dataclass
class BackfillCurve:
    """Metrics of one strategy at each backfill ratio (one order seed).

    Returned by :func:`evaluate_backfill`. Each parameter is kept as an attribute of the same
    name; the per-ratio arrays follow ``ratios``.

    Parameters
    ----------
    strategy : str
        Name of the strategy.
    ratios : array (n_r,) of float
        Backfill ratios ``r``, ascending.
    map : array (n_r,) of float
        mAP at each ratio.
    top1 : array (n_r,) of float
        CMC top-1 accuracy at each ratio.
    top5 : array (n_r,) of float
        CMC top-5 accuracy at each ratio.
    negative_flips : array (n_r,) of float
        Negative flip rate at each ratio (see
        :func:`~backfill_lib.metrics.negative_flip_rate`).
    backbone_passes : int, default 1
        Backbone forward passes per query of the strategy.
    per_query_top1 : bool array (n_r, n_q), optional
        Top-1 correctness of each query at each ratio.
    """

    strategy: str
    ratios: np.ndarray
    map: np.ndarray
    top1: np.ndarray
    top5: np.ndarray
    negative_flips: np.ndarray
    backbone_passes: int = 1
    per_query_top1: np.ndarray = field(default=None, repr=False)

    @property
    def auc_map(self) -> float:
        """Area under the mAP curve, by :func:`~backfill_lib.metrics.auc` (needs r = 0 and r = 1)."""
        return auc(self.ratios, self.map)

    @property
    def auc_top1(self) -> float:
        """Area under the top-1 curve, by :func:`~backfill_lib.metrics.auc` (needs r = 0 and r = 1)."""
        return auc(self.ratios, self.top1)

    def relative_gain(self, old_old: float, new_new: float) -> float:
        """Relative gain of the mAP curve (METHOD §4).

        Parameters
        ----------
        old_old : float
            mAP of old/old retrieval.
        new_new : float
            mAP of new/new retrieval after a full backfill.

        Returns
        -------
        float
            ``(auc_map − old_old) / (new_new − old_old)``, see
            :func:`~backfill_lib.metrics.relative_gain`.

        Raises
        ------
        ValueError
            If ``new_new`` equals ``old_old``, or the ratios do not span [0, 1].
        """
        return relative_gain(self.auc_map, old_old, new_new)

    def map_at(self, ratio: float) -> float:
        """mAP at one of the evaluated ratios.

        Parameters
        ----------
        ratio : float in [0, 1]
            One of the evaluated ``ratios`` (matched within ``1e-9``).

        Returns
        -------
        float
            The mAP at ``ratio``.

        Raises
        ------
        TypeError
            If ``ratio`` is not a number.
        ValueError
            If ``ratio`` is outside [0, 1] or was not evaluated.
        """
        i = int(np.argmin(np.abs(self.ratios - check_ratio(ratio))))
        if abs(self.ratios[i] - ratio) > 1e-9:
            raise ValueError(f"ratio {ratio} was not evaluated; evaluated: {self.ratios.tolist()}")
        return float(self.map[i])


def evaluate_backfill(strategy: Strategy, query_labels, gallery_labels=None, ratios=DEFAULT_RATIOS,
                      order=None, order_seed: int = 0, exclude_self: bool = True,
                      reference_top1=None, chunk_size: int = 1024) -> BackfillCurve:
    """Evaluate a strategy along the backfill: mAP, top-1, top-5 and negative flips per ratio.

    At each ratio ``r`` item ``g`` is scored with the new pair of vectors if ``g ∈ B_r`` and
    with the old pair otherwise (for an offline strategy, new only at ``r = 1``); the whole
    gallery is then ranked by the merged score. Relevance is the same label.

    Parameters
    ----------
    strategy : Strategy
        The query and gallery vectors of both spaces.
    query_labels : int array (n_q,)
        Class label of each query.
    gallery_labels : int array (N,), optional
        Defaults to ``query_labels`` (leave-one-out: queries are the gallery items).
    ratios : sequence of floats in [0, 1], default DEFAULT_RATIOS
        Backfill ratios to evaluate (sorted, repeats dropped); default ``0, 0.1, ..., 1``.
    order : array (N,), optional
        Backfill order ``π``, a permutation of ``range(N)``; default a random order drawn with
        ``order_seed``.
    order_seed : int, default 0
        Seed of the default order (see :func:`backfill_order`); unused when ``order`` is given.
    exclude_self : bool, default True
        Leave-one-out: drop query ``i`` from its own ranking (requires ``n_q == N``).
    reference_top1 : bool array (n_q,), optional
        Per-query top-1 correctness under old/old; negative flips are counted against it
        (default: this strategy at ``r = 0``).
    chunk_size : int, default 1024
        Queries scored at once (bounds memory at ``chunk_size × N`` floats).

    Returns
    -------
    BackfillCurve
        mAP (mean over queries with a relevant item), top-1, top-5 and negative flips at each
        ratio, named after the strategy.

    Raises
    ------
    TypeError
        If ``strategy`` is not a :class:`Strategy`, or a ratio or label has the wrong type.
    ValueError
        If a ratio is outside [0, 1], the labels do not match the numbers of queries and
        items, ``exclude_self`` is set with ``n_q != N``, fewer than 5 items are searchable,
        ``order`` is not a permutation, or ``reference_top1`` has the wrong shape.
    """
    if not isinstance(strategy, Strategy):
        raise TypeError(f"strategy must be a Strategy, got {type(strategy).__name__}")
    ratios = check_ratios(ratios)
    qy = as_labels(query_labels, "query_labels", n=strategy.n_queries)
    gy = qy if gallery_labels is None else as_labels(gallery_labels, "gallery_labels", n=strategy.n_gallery)
    n, n_q = strategy.n_gallery, strategy.n_queries
    if exclude_self and n_q != n:
        raise ValueError(f"exclude_self=True needs one query per gallery item, got {n_q} queries for {n} items")
    if n - int(exclude_self) < 5:
        raise ValueError(f"the gallery needs at least 5 searchable items for top-5, got {n - int(exclude_self)}")
    if order is None:
        order = backfill_order(n, order_seed)
    order = _check_order(order, n)
    if reference_top1 is not None:
        reference_top1 = np.asarray(reference_top1, dtype=bool)
        if reference_top1.shape != (n_q,):
            raise ValueError(f"reference_top1 must hold one bool per query ({n_q}), got shape {reference_top1.shape}")
    # Negative flips are counted against r = 0 by default: evaluate it even when not asked for.
    add_zero = reference_top1 is None and ratios[0] != 0.0
    eval_ratios = np.concatenate([[0.0], ratios]) if add_zero else ratios
    masks = [np.full(n, r == 1.0) if strategy.offline else _mask(order, r) for r in eval_ratios]

    ap = np.zeros((len(eval_ratios), n_q))
    hit1 = np.zeros((len(eval_ratios), n_q), dtype=bool)
    hit5 = np.zeros((len(eval_ratios), n_q), dtype=bool)
    for start in range(0, n_q, chunk_size):
        rows = slice(start, min(start + chunk_size, n_q))
        s_old = strategy.query_old[rows] @ strategy.gallery_old.T
        s_new = strategy.query_new[rows] @ strategy.gallery_new.T
        relevant = same_label(qy[rows], gy)
        if exclude_self:
            idx = np.arange(rows.start, rows.stop)
            relevant[idx - rows.start, idx] = False
        for i, mask in enumerate(masks):
            scores = np.where(mask[None, :], s_new, s_old)
            if exclude_self:
                scores[idx - rows.start, idx] = -np.inf
            ap[i, rows] = average_precision(scores, relevant)
            hits = topk_hits(scores, relevant, ks=(1, 5))
            hit1[i, rows], hit5[i, rows] = hits[1], hits[5]

    ref = hit1[0] if reference_top1 is None else reference_top1
    if add_zero:
        ap, hit1, hit5 = ap[1:], hit1[1:], hit5[1:]
    return BackfillCurve(
        strategy=strategy.name,
        ratios=ratios,
        map=np.nanmean(ap, axis=1),
        top1=hit1.mean(axis=1),
        top5=hit5.mean(axis=1),
        negative_flips=np.array([negative_flip_rate(ref, h) for h in hit1]),
        backbone_passes=strategy.backbone_passes,
        per_query_top1=hit1,
    )


def simulate_backfill(strategies, labels, ratios=DEFAULT_RATIOS, order_seed: int = 0,
                      reference: Strategy | None = None) -> dict[str, BackfillCurve]:
    """Evaluate several strategies on one backfill order (leave-one-out over ``labels``).

    Negative flips are counted against ``reference`` (usually :func:`old_only`), evaluated at
    ``r = 0``; by default the strategy named ``"old"`` if present, else each strategy's own
    ``r = 0``.

    Parameters
    ----------
    strategies : dict of str to Strategy, or iterable of Strategy
        Strategies over the same gallery, with unique names (dict keys are ignored; the
        strategies' own names are used).
    labels : int array (N,)
        Class label of each gallery item (the items are also the queries).
    ratios : sequence of floats in [0, 1], default DEFAULT_RATIOS
        Backfill ratios to evaluate.
    order_seed : int, default 0
        Seed of the one random backfill order ``π`` shared by all strategies.
    reference : Strategy, optional
        Strategy whose top-1 at ``r = 0`` defines the negative flips.

    Returns
    -------
    dict of str to BackfillCurve
        One curve per strategy, keyed by strategy name, in the given order.

    Raises
    ------
    ValueError
        If ``strategies`` is empty or repeats a name; also the errors of
        :func:`evaluate_backfill`.
    """
    strategies = list(strategies.values()) if isinstance(strategies, dict) else list(strategies)
    if not strategies:
        raise ValueError("strategies is empty: give at least one Strategy")
    names = [s.name for s in strategies]
    if len(set(names)) != len(names):
        raise ValueError(f"strategy names must be unique, got {names}")
    if reference is None:
        reference = next((s for s in strategies if s.name == "old"), None)
    order = backfill_order(strategies[0].n_gallery, order_seed)
    ref_top1 = None
    if reference is not None:
        ref_top1 = evaluate_backfill(reference, labels, ratios=[0.0], order=order).per_query_top1[0]
    return {s.name: evaluate_backfill(s, labels, ratios=ratios, order=order, reference_top1=ref_top1)
            for s in strategies}
