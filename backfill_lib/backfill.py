"""The backfill simulation engine (METHOD §1, §2, §4).

A :class:`Strategy` says how a query is scored against a partly backfilled gallery: which
query vector is compared with items still stored *old*, and which with items already stored
*new*. Every strategy of METHOD §2 is one of these (the constructors below), so transformation
methods (ψ, h, ρ) plug in by handing over transformed embeddings; the engine never changes.

Embeddings are extracted once per model. At each backfill ratio the engine only re-selects,
per gallery item, which stored vector is used, and ranks the whole gallery by the merged score;
the counting is done by :mod:`backfill_lib.evaluation` (exact, at about the cost of one ranking).

Ties: the ranking is by descending score, ties broken by the smaller gallery index; average
precision counts a group of tied items as one threshold, as scikit-learn's
``average_precision_score`` (see :mod:`backfill_lib.evaluation`).

Leave-one-out: a strategy built from the gallery's own embeddings (no query arrays given) has
``queries_are_gallery=True`` and is evaluated leave-one-out (query ``i`` is gallery item ``i``
and is left out of its own ranking); with separate query arrays it is not, unless told so.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .evaluation import check_chunk_size, check_order, evaluate_states
from .metrics import auc, negative_flip_rate, relative_gain
from .validation import (as_embeddings, as_flags, as_labels, check_choice, check_positive_int, check_ratio,
                         check_ratios, check_seed)

#: The 11 ratios of METHOD §4.
DEFAULT_RATIOS: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(11))

#: Backfill order policies of :func:`backfill_order` (METHOD §7; all but ``random`` are extensions).
ORDER_POLICIES = ("random", "uncertain_first", "class_coverage")


@dataclass(frozen=True)
class Strategy:
    """How queries are scored against a gallery in the middle of a backfill.

    The score of gallery item ``g`` for query ``q`` is ``query_old[q] · gallery_old[g]`` while
    ``g`` is stored old and ``query_new[q] · gallery_new[g]`` once it is backfilled (higher is
    better; on unit vectors this is ``1 - d/2``).

    Usually built by one of the constructors (:func:`old_only`, :func:`rank_merge`,
    :func:`reverse_transform`, ...). Each parameter is kept as an attribute of the same name;
    the four embedding matrices are stored as C-contiguous float32. Their rows must have unit
    norm (inner products then rank like distances): normalise other vectors first, e.g. with
    :func:`backfill_lib.validation.normalize_rows`.

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
    queries_are_gallery : bool or None, default None
        Whether query ``i`` is gallery item ``i`` (the leave-one-out protocol of
        :func:`evaluate_backfill`). ``None``: not said; it becomes ``False`` when the numbers
        of queries and items differ, and :func:`evaluate_backfill` then needs ``exclude_self``.

    Raises
    ------
    TypeError
        If ``name`` is not a non-empty string, ``backbone_passes`` not an integer, ``offline``
        not a bool, an embedding matrix not real numbers, or ``queries_are_gallery`` not a bool
        or None.
    ValueError
        If an embedding matrix is not a finite non-empty 2-D array of unit-norm rows, a query
        and its gallery differ in width, the two galleries differ in length, the two query
        matrices differ in length, ``queries_are_gallery=True`` with ``n_q != N``, or
        ``backbone_passes < 1``.
    """

    name: str
    query_old: np.ndarray
    gallery_old: np.ndarray
    query_new: np.ndarray
    gallery_new: np.ndarray
    backbone_passes: int = 1
    offline: bool = False
    queries_are_gallery: bool | None = None

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise TypeError(f"name must be a non-empty string (the strategy's key in results), got {self.name!r}")
        object.__setattr__(self, "backbone_passes",
                           check_positive_int(self.backbone_passes, "backbone_passes", "forward passes per query"))
        if not isinstance(self.offline, (bool, np.bool_)):
            # bool("no") is True: the strategy would silently be evaluated as an offline backfill.
            raise TypeError(f"offline must be True or False, got {self.offline!r}")
        object.__setattr__(self, "offline", bool(self.offline))
        go = as_embeddings(self.gallery_old, "gallery_old", unit_norm=True)
        qo = as_embeddings(self.query_old, "query_old", dim=go.shape[1], unit_norm=True)
        gn = as_embeddings(self.gallery_new, "gallery_new", unit_norm=True)
        qn = as_embeddings(self.query_new, "query_new", dim=gn.shape[1], unit_norm=True)
        if len(go) != len(gn):
            raise ValueError(
                f"gallery_old has {len(go)} items but gallery_new has {len(gn)}: both must store "
                "the same gallery"
            )
        if len(qo) != len(qn):
            raise ValueError(f"query_old has {len(qo)} rows but query_new has {len(qn)}")
        same = self.queries_are_gallery
        if same is not None and not isinstance(same, (bool, np.bool_)):
            raise TypeError(f"queries_are_gallery must be True, False or None, got {same!r}")
        if same and len(qo) != len(go):
            raise ValueError(
                f"queries_are_gallery=True but there are {len(qo)} queries for {len(go)} gallery items: "
                "query i must be gallery item i"
            )
        if same is None and len(qo) != len(go):
            object.__setattr__(self, "queries_are_gallery", False)
        elif same is not None:
            object.__setattr__(self, "queries_are_gallery", bool(same))
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


def _queries_are_gallery(flag, *queries):
    # No query arrays given: the queries are the gallery items. Given: only if the caller says so.
    if flag is not None:
        return flag
    return True if all(q is None for q in queries) else None



def old_only(old, old_query=None, queries_are_gallery: bool | None = None) -> Strategy:
    """No upgrade: ``d(φ_o(q), φ_o(g))`` for every ``g``, whatever the ratio.

    Parameters
    ----------
    old : array (N, d_o)
        Old embeddings ``φ_o(g)`` of the gallery items.
    old_query : array (n_q, d_o), optional
        Old embeddings ``φ_o(q)`` of the queries; default ``old`` (leave-one-out: the queries are the gallery items).
    queries_are_gallery : bool, optional
        Whether query ``i`` is gallery item ``i`` (leave-one-out in :func:`evaluate_backfill`);
        default True when no query arrays are given and unset otherwise (see :class:`Strategy`).

    Returns
    -------
    Strategy
        Named ``"old"``, one backbone pass per query.
    """
    q = _same_items(old, old_query)
    return Strategy("old", q, old, q, old, backbone_passes=1,
                    queries_are_gallery=_queries_are_gallery(queries_are_gallery, old_query))


def offline_backfill(old, new, old_query=None, new_query=None, queries_are_gallery: bool | None = None) -> Strategy:
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
    queries_are_gallery : bool, optional
        Whether query ``i`` is gallery item ``i`` (leave-one-out in :func:`evaluate_backfill`);
        default True when no query arrays are given and unset otherwise (see :class:`Strategy`).

    Returns
    -------
    Strategy
        Named ``"offline"``, with ``offline=True`` (the backfill order is ignored); one
        backbone pass per query.
    """
    return Strategy("offline", _same_items(old, old_query), old, _same_items(new, new_query), new,
                    backbone_passes=1, offline=True,
                    queries_are_gallery=_queries_are_gallery(queries_are_gallery, old_query, new_query))


def compatible_single_space(old, new, new_query=None, name: str = "compatible",
                            queries_are_gallery: bool | None = None) -> Strategy:
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
    queries_are_gallery : bool, optional
        Whether query ``i`` is gallery item ``i`` (leave-one-out in :func:`evaluate_backfill`);
        default True when no query arrays are given and unset otherwise (see :class:`Strategy`).

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
    return Strategy(name, q, old, q, new, backbone_passes=1,
                    queries_are_gallery=_queries_are_gallery(queries_are_gallery, new_query))


def same_model(vectors, query=None, name: str = "old", queries_are_gallery: bool | None = None) -> Strategy:
    """One model embeds both the queries and the whole gallery, whatever the ratio.

    The readable way to write the two references of every chapter: ``same_model(old)`` is
    old/old retrieval (no upgrade, the same strategy as :func:`old_only`), and
    ``same_model(new, name="new")`` is new/new retrieval (the gallery fully re-embedded).

    Parameters
    ----------
    vectors : array (N, d)
        The gallery items' embeddings under one model.
    query : array (n_q, d), optional
        The queries' embeddings under the same model; default ``vectors`` (leave-one-out: the
        queries are the gallery items).
    name : str, default "old"
        The strategy's name (``"old"`` for old/old, ``"new"`` for new/new: the names
        :mod:`~backfill_lib.plots` colours).
    queries_are_gallery : bool, optional
        Whether query ``i`` is gallery item ``i``; default True when ``query`` is not given.

    Returns
    -------
    Strategy
        One backbone pass per query; its curve is flat.

    Examples
    --------
    >>> import numpy as np
    >>> x = np.eye(3)
    >>> same_model(x, name="new").name, same_model(x).backbone_passes
    ('new', 1)
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty string such as 'old' or 'new', got {name!r}")
    q = _same_items(vectors, query)
    return Strategy(name, q, vectors, q, vectors, backbone_passes=1,
                    queries_are_gallery=_queries_are_gallery(queries_are_gallery, query))


def new_query_on_stored(old, new, new_query=None, name: str = "new_on_old",
                        queries_are_gallery: bool | None = None) -> Strategy:
    """The new model's query searches whatever is stored: old vectors, then re-embedded ones.

    With an ordinary (incompatible) new model this is the shortcut that fails: at ``r = 0`` a
    new query meets only old vectors. It is the same scoring rule as
    :func:`compatible_single_space`, which the book uses for compatible new models (BCT,
    RA-BCT); this name says what happens without compatibility.

    Parameters
    ----------
    old : array (N, d)
        Old embeddings ``φ_o(g)`` of the gallery items.
    new : array (N, d)
        New embeddings ``φ_n(g)`` of the gallery items, the same dimension as ``old`` (a new
        query cannot even be compared with old vectors of another size).
    new_query : array (n_q, d), optional
        ``φ_n(q)`` of the queries; default ``new`` (leave-one-out).
    name : str, default "new_on_old"
        The strategy's name.
    queries_are_gallery : bool, optional
        Whether query ``i`` is gallery item ``i``; default True when ``new_query`` is not given.

    Returns
    -------
    Strategy
        One backbone pass (new) per query.

    Raises
    ------
    ValueError
        If ``old`` and ``new`` differ in dimension.
    """
    return compatible_single_space(old, new, new_query=new_query, name=name,
                                   queries_are_gallery=queries_are_gallery)


def rank_merge(old, new, old_query=None, new_query=None, queries_are_gallery: bool | None = None) -> Strategy:
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
    queries_are_gallery : bool, optional
        Whether query ``i`` is gallery item ``i`` (leave-one-out in :func:`evaluate_backfill`);
        default True when no query arrays are given and unset otherwise (see :class:`Strategy`).

    Returns
    -------
    Strategy
        Named ``"rank_merge"``, two backbone passes per query.
    """
    return Strategy("rank_merge", _same_items(old, old_query), old, _same_items(new, new_query), new,
                    backbone_passes=2,
                    queries_are_gallery=_queries_are_gallery(queries_are_gallery, old_query, new_query))


def _affine(score_map, name: str) -> tuple[float, float]:
    pair = (score_map.scale, score_map.offset) if hasattr(score_map, "scale") else score_map
    if isinstance(pair, (str, bytes)) or not hasattr(pair, "__len__") or len(pair) != 2:
        raise TypeError(f"{name} must be a ScoreMap or a (scale, offset) pair, got {score_map!r}")
    if any(isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)) for v in pair):
        raise TypeError(f"{name} must hold two real numbers (scale, offset), got {pair!r}")
    scale, offset = float(pair[0]), float(pair[1])
    if not (np.isfinite(scale) and scale > 0 and np.isfinite(offset)):
        raise ValueError(f"{name} must be an increasing affine map (scale > 0, finite offset), got scale={scale!r}, "
                         f"offset={offset!r}")
    return scale, offset


def fold_affine_scores(maps) -> list[tuple[float, float]]:
    """Angles that put increasing affine score maps into unit vectors, one pair per space.

    For spaces ``k`` with maps ``t_k = a_k·s + b_k``, returns ``(θ_q, θ_g)`` per space such that
    the unit vectors ``[cos θ_q · q, sin θ_q]`` and ``[cos θ_g · g, sin θ_g]`` have inner
    product ``c·(t_k − m)`` for one ``c > 0`` and one ``m`` shared by all spaces: merged
    rankings are those of the ``t_k``, and the vectors stay unit norm (what :class:`Strategy`
    requires).

    Why it works: ``cos θ_q cos θ_g = A`` and ``sin θ_q sin θ_g = B`` have a solution for any
    ``|A| + |B| ≤ 1`` (``θ_q ∓ θ_g = arccos(A ± B)``); ``c = 1 / (max_k a_k + (max_k b_k −
    min_k b_k)/2)`` and ``m`` the midpoint of the offsets bring every ``(c·a_k, c·(b_k − m))``
    inside that diamond.

    Parameters
    ----------
    maps : sequence of ScoreMap or (scale, offset)
        One increasing affine map per space (e.g. from
        :func:`~backfill_lib.calibration.fit_score_map`).

    Returns
    -------
    list of (float, float)
        ``(θ_q, θ_g)`` of each space, in radians.

    Raises
    ------
    TypeError
        If a map is not a ScoreMap or a pair of real numbers.
    ValueError
        If a map is not increasing (``scale ≤ 0``) or not finite, ``maps`` is empty, or the
        maps are too far apart to fold into float32 unit vectors (a scaled space would fall
        below float32 precision).
    """
    ab = [_affine(m, f"maps[{k}]") for k, m in enumerate(maps)]
    if not ab:
        raise ValueError("maps is empty: give one score map per space")
    offsets = [b for _, b in ab]
    mid, half = max(offsets) / 2 + min(offsets) / 2, max(offsets) / 2 - min(offsets) / 2
    c = 1.0 / (max(a for a, _ in ab) + half)
    if not (np.isfinite(c) and c > 0 and np.isfinite(mid)):
        raise ValueError(f"the maps' scales and offsets are too large to fold into unit vectors, got {ab}: "
                         "calibrated scores of this size cannot be compared")
    if min(c * a for a, _ in ab) < 1e-6:
        # float32 vectors keep about 7 digits: a space scaled below 1e-6 of the other loses its ranking.
        raise ValueError(f"the maps' scales and offsets differ too much to fold into float32 unit vectors, got {ab}: the "
                         "scores of one space would shrink below float32 precision and tie")
    angles = []
    for a, b in ab:
        A, B = c * a, c * (b - mid)
        minus, plus = np.arccos(np.clip(A + B, -1.0, 1.0)), np.arccos(np.clip(A - B, -1.0, 1.0))
        angles.append((float((plus + minus) / 2), float((plus - minus) / 2)))
    return angles


def _append_constant(x, cos_t: float, sin_t: float) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return np.hstack([cos_t * x, np.full((len(x), 1), sin_t)]).astype(np.float32)


def rank_merge_calibrated(old, new, old_map, new_map, old_query=None, new_query=None,
                          queries_are_gallery: bool | None = None) -> Strategy:
    """Calibrated rank merge (ours): rank merge by ``f_o(φ_o(q)·φ_o(g))`` and ``f_n(φ_n(q)·φ_n(g))``.

    ``f_o`` and ``f_n`` are increasing affine maps of each space's scores onto one scale, fitted
    beforehand (e.g. on training pairs by :func:`~backfill_lib.calibration.fit_score_map`; this
    constructor does not look at any data but the vectors). The ranking within each space is
    unchanged; only how old-stored and new-stored items interleave differs from
    :func:`rank_merge`. Two backbone passes per query.

    The maps are folded into the vectors (:func:`fold_affine_scores`): every vector gets one more
    coordinate, so that the engine's inner product of the stored pair is ``c·(f(s) − m)`` for a
    ``c > 0`` and an ``m`` common to both spaces, and all rows stay unit norm.

    Parameters
    ----------
    old : array (N, d_o)
        Old embeddings ``φ_o(g)`` of the gallery items.
    new : array (N, d_n)
        New embeddings ``φ_n(g)`` of the gallery items.
    old_map, new_map : ScoreMap or (scale, offset)
        Increasing affine maps of old/old and new/new scores (``scale > 0``).
    old_query : array (n_q, d_o), optional
        ``φ_o(q)`` of the queries; default ``old`` (leave-one-out: the queries are the gallery items).
    new_query : array (n_q, d_n), optional
        ``φ_n(q)`` of the queries; default ``new``.
    queries_are_gallery : bool, optional
        Whether query ``i`` is gallery item ``i`` (leave-one-out in :func:`evaluate_backfill`);
        default True when no query arrays are given and unset otherwise (see :class:`Strategy`).

    Returns
    -------
    Strategy
        Named ``"rank_merge_calibrated"``, two backbone passes per query; its vectors have
        ``d_o + 1`` and ``d_n + 1`` columns.

    Raises
    ------
    TypeError
        If a map is not a ScoreMap or a pair of real numbers.
    ValueError
        If a map is not increasing, the maps are too far apart to fold (see
        :func:`fold_affine_scores`), or the embeddings are not unit-norm rows of matching shapes.
    """
    (oq, og), (nq, ng) = fold_affine_scores([(_affine(old_map, "old_map")), _affine(new_map, "new_map")])
    old_g = as_embeddings(old, "old", unit_norm=True)
    new_g = as_embeddings(new, "new", unit_norm=True)
    old_q = as_embeddings(_same_items(old, old_query), "old_query", dim=old_g.shape[1], unit_norm=True)
    new_q = as_embeddings(_same_items(new, new_query), "new_query", dim=new_g.shape[1], unit_norm=True)
    return Strategy("rank_merge_calibrated", _append_constant(old_q, np.cos(oq), np.sin(oq)),
                    _append_constant(old_g, np.cos(og), np.sin(og)),
                    _append_constant(new_q, np.cos(nq), np.sin(nq)), _append_constant(new_g, np.cos(ng), np.sin(ng)),
                    backbone_passes=2,
                    queries_are_gallery=_queries_are_gallery(queries_are_gallery, old_query, new_query))


def reverse_transform(old, psi_new, rho_new, psi_query=None, rho_query=None,
                      name: str = "reverse_transform", queries_are_gallery: bool | None = None) -> Strategy:
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
    queries_are_gallery : bool, optional
        Whether query ``i`` is gallery item ``i`` (leave-one-out in :func:`evaluate_backfill`);
        default True when no query arrays are given and unset otherwise (see :class:`Strategy`).

    Returns
    -------
    Strategy
        One backbone pass per query.
    """
    return Strategy(name, _same_items(psi_new, psi_query), old, _same_items(rho_new, rho_query), rho_new,
                    backbone_passes=1,
                    queries_are_gallery=_queries_are_gallery(queries_are_gallery, psi_query, rho_query))


def forward_transform(h_old, new, new_query=None, name: str = "forward_transform",
                      queries_are_gallery: bool | None = None) -> Strategy:
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
    queries_are_gallery : bool, optional
        Whether query ``i`` is gallery item ``i`` (leave-one-out in :func:`evaluate_backfill`);
        default True when no query arrays are given and unset otherwise (see :class:`Strategy`).

    Returns
    -------
    Strategy
        One backbone pass (new) per query.
    """
    q = _same_items(new, new_query)
    return Strategy(name, q, h_old, q, new, backbone_passes=1,
                    queries_are_gallery=_queries_are_gallery(queries_are_gallery, new_query))


def backfill_order(n: int, seed: int = 0, policy: str = "random", uncertainty=None, groups=None) -> np.ndarray:
    """The order ``π`` in which gallery items are re-extracted with the new model.

    Every policy is a permutation fixed before the backfill starts.

    * ``random`` (default): a uniform random permutation drawn with ``seed``.
    * ``uncertain_first``: items with the largest ``uncertainty`` first (e.g. ``1 −`` the old
      classifier's top probability): the items the old vectors serve worst are replaced first.
    * ``class_coverage`` (ours): round-robin over ``groups`` (e.g. k-means clusters of the old
      embeddings, see :func:`~backfill_lib.strategies.experiment_order`): one item of each group
      in turn, in random order within a group, so that after ``k·G`` items each of the ``G``
      groups holds ``k`` new vectors (or all of its items). The argument for it (to be
      measured, not a result): a random order gives each region of the gallery new vectors in
      proportion to its size, and by chance some regions lag; round-robin gives every region new
      vectors from the first step, and so a small region — a class the old model packs into a
      corner, a rare class — gets its share early instead of last, and is fully backfilled
      soonest, after which its queries compare their relevant items in one space only.

    Parameters
    ----------
    n : int
        Gallery size.
    seed : int
        Seed of the random order (also the tie-break of ``uncertain_first`` and the order within
        and between groups of ``class_coverage``), in ``0 .. 2**32 - 1``.
    policy : {"random", "uncertain_first", "class_coverage"}
        One of :data:`ORDER_POLICIES`.
    uncertainty : array of n floats, optional
        Needed by ``uncertain_first``, e.g. ``1 -`` the old model's top class probability;
        ignored by the other policies.
    groups : array of n ints, optional
        Needed by ``class_coverage``: a group (cluster, predicted class) per gallery item;
        ignored by the other policies.

    Returns
    -------
    order : array (n,) of int
        A permutation of ``range(n)``: ``order[:round(r·n)]`` is ``B_r``. ``random`` gives the
        same permutation for the same ``(n, seed)`` whatever the other arguments.

    Raises
    ------
    TypeError
        If ``n`` or ``seed`` is not an integer, ``policy`` is not a string, or
        ``uncertainty`` is not real numbers.
    ValueError
        If ``n < 1``, ``seed`` is outside ``0 .. 2**32 - 1``, ``policy`` is unknown, or
        ``uncertain_first`` gets no ``uncertainty`` (or not ``n`` finite values), or
        ``class_coverage`` no ``groups`` (or not ``n`` integers).

    Examples
    --------
    >>> sorted(backfill_order(4, seed=1).tolist())
    [0, 1, 2, 3]
    >>> backfill_order(3, policy="uncertain_first", uncertainty=[0.1, 0.9, 0.5]).tolist()
    [1, 2, 0]
    >>> g = [0, 0, 0, 0, 1, 1]  # a big group and a small one: the small one is done after 4 items
    >>> [g[i] for i in backfill_order(6, policy="class_coverage", groups=g)]
    [0, 1, 0, 1, 0, 0]
    """
    n = check_positive_int(n, "n", "gallery size")
    seed = check_seed(seed, "seed")
    if not isinstance(policy, str):
        raise TypeError(f"policy must be a string, one of {', '.join(ORDER_POLICIES)}; got {policy!r}")
    check_choice(policy, ORDER_POLICIES, "policy")
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    if policy == "random":
        return perm
    if policy == "class_coverage":
        if groups is None:
            raise ValueError("policy='class_coverage' needs groups (one group id per gallery item, e.g. k-means "
                             "clusters of the old embeddings)")
        g = np.asarray(groups)
        if g.shape != (n,) or not np.issubdtype(g.dtype, np.integer):
            raise ValueError(f"groups must hold {n} integers (one group id per gallery item), got shape {g.shape} "
                             f"and dtype {g.dtype}")
        _, first, gp = np.unique(g[perm], return_index=True, return_inverse=True)  # group of each item of perm
        turn = np.empty(n, dtype=np.int64)                     # how many of its group come before it in perm
        for k in range(len(first)):
            at = np.flatnonzero(gp == k)
            turn[at] = np.arange(len(at))
        # Round k holds the k-th item of every group; within a round, groups in their order of first appearance.
        return perm[np.lexsort((first[gp], turn))]
    if uncertainty is None:
        raise ValueError("policy='uncertain_first' needs uncertainty (one value per gallery item)")
    u = np.asarray(uncertainty)
    if u.dtype == object or u.dtype == bool or not np.issubdtype(u.dtype, np.number) \
            or np.issubdtype(u.dtype, np.complexfloating):
        raise TypeError(f"uncertainty must hold real numbers (one per gallery item), got dtype {u.dtype}")
    u = u.astype(np.float64)
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
    return _mask(check_order(order), check_ratio(ratio, "ratio"))


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
            One of the evaluated ``ratios``, matched within ``1e-6`` (so a curve evaluated on a
            float32 grid, where 0.3 is stored as 0.30000001, answers ``map_at(0.3)``).

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
        r = check_ratio(ratio)
        i = int(np.argmin(np.abs(np.asarray(self.ratios, dtype=np.float64) - r)))
        if abs(float(self.ratios[i]) - r) > 1e-6:
            raise ValueError(f"ratio {ratio} was not evaluated; evaluated: {self.ratios.tolist()}")
        return float(self.map[i])


def _leave_one_out(strategy: Strategy, exclude_self) -> bool:
    same = strategy.queries_are_gallery
    if exclude_self is None:
        if same is None:
            raise ValueError(
                f"strategy {strategy.name!r} was built with separate query arrays, as many as the gallery "
                "items: say whether query i is gallery item i, with queries_are_gallery=True/False when "
                "building it, or exclude_self=True/False here"
            )
        return same
    if not isinstance(exclude_self, (bool, np.bool_)):
        raise TypeError(f"exclude_self must be True, False or None, got {exclude_self!r}")
    if exclude_self and same is False:
        raise ValueError(
            f"exclude_self=True but strategy {strategy.name!r} has separate queries "
            f"(queries_are_gallery=False; {strategy.n_queries} queries, {strategy.n_gallery} items): "
            "leave-one-out drops gallery item i for query i, which is only right when they are the same "
            "item; leave exclude_self unset"
        )
    return bool(exclude_self)


def evaluate_backfill(strategy: Strategy, query_labels, gallery_labels=None, ratios=DEFAULT_RATIOS,
                      order=None, order_seed: int = 0, exclude_self: bool | None = None,
                      reference_top1=None, chunk_size: int = 1024, device=None) -> BackfillCurve:
    """Evaluate a strategy along the backfill: mAP, top-1, top-5 and negative flips per ratio.

    At each ratio ``r`` item ``g`` is scored with the new pair of vectors if ``g ∈ B_r`` and
    with the old pair otherwise (for an offline strategy, new only at ``r = 1``); the whole
    gallery is then ranked by the merged score. Relevance is the same label. The numbers are
    exact; they are computed by :func:`backfill_lib.evaluation.evaluate_states` without
    sorting every row at every ratio.

    Ties: the ranking is by descending score, ties broken by the smaller gallery index (top-1,
    top-5, negative flips). Average precision treats a group of tied items as one threshold,
    as scikit-learn's ``average_precision_score`` does, so it does not depend on the tie-break.

    Parameters
    ----------
    strategy : Strategy
        The query and gallery vectors of both spaces.
    query_labels : int array (n_q,)
        Class label of each query.
    gallery_labels : int array (N,), optional
        Class label of each gallery item. Defaults to ``query_labels``, which is only allowed
        when the queries are the gallery items (leave-one-out).
    ratios : sequence of floats in [0, 1], default DEFAULT_RATIOS
        Backfill ratios to evaluate (sorted, repeats dropped); default ``0, 0.1, ..., 1``.
    order : array (N,), optional
        Backfill order ``π``, a permutation of ``range(N)``; default a random order drawn with
        ``order_seed``.
    order_seed : int, default 0
        Seed of the default order (see :func:`backfill_order`), in ``0 .. 2**32 - 1``; unused
        (but checked) when ``order`` is given.
    exclude_self : bool, optional
        Leave-one-out: drop query ``i`` from its own ranking. Default: decided by the strategy
        (``strategy.queries_are_gallery``): on when it was built from the gallery's own
        embeddings, off when it was built with separate queries. ``True`` for a strategy with
        separate queries (``queries_are_gallery=False``) is an error.
    reference_top1 : bool array (n_q,), optional
        Per-query top-1 correctness under old/old; negative flips are counted against it
        (default: this strategy at ``r = 0``).
    chunk_size : int, default 1024
        Queries scored at once (memory about ``24 · chunk_size · N`` bytes).
    device : str, optional
        Where the engine runs: ``"numpy"``, ``"cpu"`` (torch), ``"cuda"``; default automatic
        (see :func:`backfill_lib.evaluation.choose_device`).

    Returns
    -------
    BackfillCurve
        mAP (mean over queries with a relevant item), top-1, top-5 and negative flips at each
        ratio, named after the strategy.

    Raises
    ------
    TypeError
        If ``strategy`` is not a :class:`Strategy`, or a ratio, label, ``exclude_self``,
        ``order_seed``, ``reference_top1`` (booleans or 0/1) or ``chunk_size`` has the wrong
        type.
    ValueError
        If a ratio is outside [0, 1], the labels do not match the numbers of queries and
        items, ``gallery_labels`` is missing for separate queries, leave-one-out is undecided
        or asked for separate queries, fewer than 5 items are searchable, no query has a
        relevant item, ``order`` is not a permutation, ``order_seed`` is negative,
        ``reference_top1`` has the wrong shape, ``chunk_size < 1`` or ``device`` is not
        available.
    """
    if not isinstance(strategy, Strategy):
        raise TypeError(f"strategy must be a Strategy, got {type(strategy).__name__}")
    run = _prepare_evaluation(strategy, query_labels, gallery_labels, ratios, order, order_seed, exclude_self,
                              reference_top1, chunk_size)
    n = strategy.n_gallery
    n_new = [(n if r == 1.0 else 0) if strategy.offline else int(round(r * n)) for r in run.eval_ratios]
    m = evaluate_states(strategy.query_old, strategy.gallery_old, strategy.query_new, strategy.gallery_new,
                        run.query_labels, run.gallery_labels, run.order, n_new, exclude_self=run.leave_one_out,
                        ks=(1, 5), chunk_size=run.chunk_size, device=device)
    return _curve_from_states(strategy, run, m)


@dataclass(frozen=True)
class _Evaluation:
    """The checked inputs of one evaluation along a backfill (shared by the two- and K-version paths)."""
    ratios: np.ndarray          # the ratios asked for
    eval_ratios: np.ndarray     # ... with r = 0 first when it is needed for negative flips
    leave_one_out: bool
    query_labels: np.ndarray
    gallery_labels: np.ndarray
    order: np.ndarray
    reference_top1: np.ndarray | None
    chunk_size: int


def _prepare_evaluation(strategy, query_labels, gallery_labels, ratios, order, order_seed, exclude_self,
                        reference_top1, chunk_size) -> _Evaluation:
    """Check the arguments of :func:`evaluate_backfill` (or of ``versions.evaluate_versions``) once.

    ``strategy`` needs ``name``, ``n_gallery``, ``n_queries`` and ``queries_are_gallery``.
    """
    ratios = check_ratios(ratios)
    chunk_size = check_chunk_size(chunk_size)
    order_seed = check_seed(order_seed, "order_seed")
    n, n_q = strategy.n_gallery, strategy.n_queries
    loo = _leave_one_out(strategy, exclude_self)
    if loo and n_q != n:
        raise ValueError(f"exclude_self=True needs one query per gallery item, got {n_q} queries for {n} items")
    qy = as_labels(query_labels, "query_labels", n=n_q)
    if gallery_labels is None:
        if not (loo or strategy.queries_are_gallery):
            raise ValueError(
                f"gallery_labels is needed: strategy {strategy.name!r} has separate queries, so "
                "query_labels are not the gallery's labels"
            )
        gy = as_labels(qy, "query_labels", n=n)
    else:
        gy = as_labels(gallery_labels, "gallery_labels", n=n)
    if n - int(loo) < 5:
        raise ValueError(f"the gallery needs at least 5 searchable items for top-5, got {n - int(loo)}")
    classes, per_class = np.unique(gy, return_counts=True)
    at = np.minimum(np.searchsorted(classes, qy), len(classes) - 1)
    n_relevant = np.where(classes[at] == qy, per_class[at], 0) - (loo & (gy == qy) if loo else 0)
    if not (n_relevant > 0).any():
        raise ValueError(
            "no query has a relevant gallery item (an item of its label"
            f"{', other than itself' if loo else ''}): mAP and top-k are undefined; check the labels (every "
            "label unique? query and gallery labels from different numberings?)"
        )
    order = check_order(backfill_order(n, order_seed) if order is None else order, n)
    if reference_top1 is not None:
        reference_top1 = as_flags(reference_top1, "reference_top1")
        if reference_top1.shape != (n_q,):
            raise ValueError(f"reference_top1 must hold one bool per query ({n_q}), got shape {reference_top1.shape}")
    # Negative flips are counted against r = 0 by default: evaluate it even when not asked for.
    add_zero = reference_top1 is None and ratios[0] != 0.0
    eval_ratios = np.concatenate([[0.0], ratios]) if add_zero else ratios
    return _Evaluation(ratios, eval_ratios, loo, qy, gy, order, reference_top1, chunk_size)


def _curve_from_states(strategy, run: _Evaluation, m) -> BackfillCurve:
    """The :class:`BackfillCurve` of the engine's per-state metrics ``m`` (``ap``, ``hits[1]``, ``hits[5]``)."""
    ap, hit1, hit5 = m.ap, m.hits[1], m.hits[5]
    ref = hit1[0] if run.reference_top1 is None else run.reference_top1
    if len(run.eval_ratios) > len(run.ratios):  # r = 0 was added for the negative flips only
        ap, hit1, hit5 = ap[1:], hit1[1:], hit5[1:]
    return BackfillCurve(
        strategy=strategy.name,
        ratios=run.ratios,
        map=np.nanmean(ap, axis=1),
        top1=hit1.mean(axis=1),
        top5=hit5.mean(axis=1),
        negative_flips=np.array([negative_flip_rate(ref, h) for h in hit1]),
        backbone_passes=strategy.backbone_passes,
        per_query_top1=hit1,
    )


def simulate_backfill(strategies, labels, ratios=DEFAULT_RATIOS, order_seed: int = 0,
                      reference: Strategy | None = None, query_labels=None, device=None) -> dict[str, BackfillCurve]:
    """Evaluate several strategies on one backfill order.

    Leave-one-out is decided by each strategy (see :func:`evaluate_backfill`): strategies built
    from the gallery's own embeddings are evaluated leave-one-out over ``labels``. Negative
    flips are counted against ``reference`` (usually :func:`old_only`), evaluated at ``r = 0``;
    by default the strategy named ``"old"`` if present, else each strategy's own ``r = 0``.

    Parameters
    ----------
    strategies : dict of str to Strategy, or iterable of Strategy
        Strategies over the same gallery and the same queries, with unique names (dict keys
        are ignored; the strategies' own names are used).
    labels : int array (N,)
        Class label of each gallery item (also of the queries when they are the gallery items).
    ratios : sequence of floats in [0, 1], default DEFAULT_RATIOS
        Backfill ratios to evaluate.
    order_seed : int, default 0
        Seed of the one random backfill order ``π`` shared by all strategies.
    reference : Strategy, optional
        Strategy whose top-1 at ``r = 0`` defines the negative flips.
    query_labels : int array (n_q,), optional
        Class label of each query, needed when the strategies have separate queries; default
        ``labels``.
    device : str, optional
        Where the evaluation engine runs (see :func:`evaluate_backfill`).

    Returns
    -------
    dict of str to BackfillCurve
        One curve per strategy, keyed by strategy name, in the given order.

    Raises
    ------
    TypeError
        If ``strategies`` holds something else than :class:`Strategy` objects, ``reference``
        is not a :class:`Strategy` or ``order_seed`` is not an integer.
    ValueError
        If ``strategies`` is empty, repeats a name, or mixes strategies whose queries differ
        (number of queries or ``queries_are_gallery``); also the errors of
        :func:`evaluate_backfill`.
    """
    strategies = list(strategies.values()) if isinstance(strategies, dict) else list(strategies)
    if not strategies:
        raise ValueError("strategies is empty: give at least one Strategy")
    if not all(isinstance(s, Strategy) for s in strategies):
        raise TypeError("strategies must hold Strategy objects (e.g. from rank_merge)")
    names = [s.name for s in strategies]
    if len(set(names)) != len(names):
        raise ValueError(f"strategy names must be unique, got {names}")
    if reference is not None and not isinstance(reference, Strategy):
        raise TypeError(f"reference must be a Strategy (e.g. old_only(old)) or None, got {type(reference).__name__}")
    order_seed = check_seed(order_seed, "order_seed")
    if reference is None:
        reference = next((s for s in strategies if s.name == "old"), None)
    everyone = strategies + ([reference] if reference is not None else [])
    kinds = {(s.n_gallery, s.n_queries, s.queries_are_gallery) for s in everyone}
    if len(kinds) > 1:
        raise ValueError(
            "the strategies (and the reference) must share the gallery and the queries, got (N, n_q, "
            f"queries_are_gallery) = {sorted(kinds, key=str)}"
        )
    qy = labels if query_labels is None else query_labels
    gy = None if query_labels is None else labels
    order = backfill_order(strategies[0].n_gallery, order_seed)
    ref_top1 = None
    if reference is not None:
        ref_top1 = evaluate_backfill(reference, qy, gy, ratios=[0.0], order=order,
                                     device=device).per_query_top1[0]
    return {s.name: evaluate_backfill(s, qy, gy, ratios=ratios, order=order, reference_top1=ref_top1, device=device)
            for s in strategies}
