"""Several upgrades in a row: a gallery whose items are stored under K model versions (METHOD §7; ours).

After a first upgrade ``v1 → v2`` is part-way through its backfill, a third model ``v3`` arrives:
the gallery now holds vectors of three versions, and the second backfill rewrites items with
``v3`` whatever they were stored as. A :class:`MultiVersionStrategy` says, for each version
``v``, which query vector is compared with an item stored under ``v`` and what is stored; the
two-version :class:`~backfill_lib.backfill.Strategy` is the case ``K = 2``. Examples:

* rank merge over K spaces (:func:`multi_rank_merge`): each version's own backbone embeds the
  query, K backbone passes;
* transformations of the newest embedding, ``ψ̂_{K→v}(φ_K(q))`` against items stored under
  ``v`` (direct, or chained ``ψ_{2→1} ∘ ψ_{3→2}``), one backbone pass; :func:`fit_multi_reverse`
  trains the maps ``ψ_{K→v}`` together with ``L_mc`` over all K stored sets.

:func:`storage_states` says which version each item is stored under at each ratio of a backfill,
and :func:`evaluate_versions` returns the same :class:`~backfill_lib.backfill.BackfillCurve` as
:func:`~backfill_lib.backfill.evaluate_backfill`, computed exactly by
:func:`backfill_lib.evaluation.evaluate_version_states`.

This module imports numpy only; :func:`fit_multi_reverse` and :func:`multi_reverse_heads` import torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .backfill import DEFAULT_RATIOS, BackfillCurve, _curve_from_states, _prepare_evaluation
from .evaluation import check_order, check_versions, evaluate_version_states
from .validation import as_embeddings, as_labels, check_non_negative, check_positive_int, check_ratios

__all__ = ["MultiVersionStrategy", "evaluate_versions", "fit_multi_reverse", "multi_rank_merge",
           "multi_reverse_heads", "storage_states"]


def _array_list(arrays, name: str) -> list:
    if isinstance(arrays, np.ndarray) or not isinstance(arrays, (list, tuple)):
        raise TypeError(f"{name} must be a list (or tuple) of arrays, one per model version, got "
                        f"{type(arrays).__name__}")
    return list(arrays)


@dataclass(frozen=True)
class MultiVersionStrategy:
    """How queries are scored against a gallery whose items are stored under K model versions.

    The score of item ``g`` stored under version ``v`` for query ``q`` is
    ``queries[v][q] · galleries[v][g]`` (higher is better). Each parameter is kept as an
    attribute of the same name; the matrices are stored as tuples of C-contiguous float32 arrays
    with unit-norm rows (normalise other vectors first, e.g. with
    :func:`backfill_lib.validation.normalize_rows`).

    Parameters
    ----------
    name : str
        Name of the strategy (the ``strategy`` of its curves).
    queries : sequence of K arrays (n_q, d_v)
        ``queries[v]``: the query vector used against items stored under version ``v``.
    galleries : sequence of K arrays (N, d_v)
        ``galleries[v]``: what is stored for each item under version ``v``.
    backbone_passes : int, default 1
        Backbone forward passes per query.
    queries_are_gallery : bool or None, default None
        Whether query ``i`` is gallery item ``i`` (leave-one-out), as in
        :class:`~backfill_lib.backfill.Strategy`.

    Raises
    ------
    TypeError
        If ``name`` is not a non-empty string, ``backbone_passes`` not an integer, ``queries``
        or ``galleries`` not a list or tuple of arrays, or ``queries_are_gallery`` not a bool
        or None.
    ValueError
        If they hold different numbers of versions (or none), a matrix is not a finite 2-D array
        of unit-norm rows, a query matrix and its gallery differ in width, the galleries differ
        in length or the query matrices in rows, ``queries_are_gallery=True`` with
        ``n_q != N``, or ``backbone_passes < 1``.

    Examples
    --------
    >>> import numpy as np
    >>> x = np.eye(3, dtype=np.float32)
    >>> MultiVersionStrategy("demo", [x, x], [x, x]).n_versions
    2
    """

    name: str
    queries: tuple
    galleries: tuple
    backbone_passes: int = 1
    queries_are_gallery: bool | None = None

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise TypeError(f"name must be a non-empty string (the strategy's key in results), got {self.name!r}")
        qs, gs = _array_list(self.queries, "queries"), _array_list(self.galleries, "galleries")
        if len(qs) != len(gs) or not gs:
            raise ValueError(f"queries and galleries must hold one array per model version (K >= 1 of each), got "
                             f"{len(qs)} query and {len(gs)} gallery arrays")
        object.__setattr__(self, "backbone_passes",
                           check_positive_int(self.backbone_passes, "backbone_passes", "forward passes per query"))
        gs = [as_embeddings(g, f"galleries[{v}]", unit_norm=True) for v, g in enumerate(gs)]
        qs = [as_embeddings(q, f"queries[{v}]", dim=gs[v].shape[1], unit_norm=True) for v, q in enumerate(qs)]
        for v in range(1, len(gs)):
            if len(gs[v]) != len(gs[0]):
                raise ValueError(f"galleries[0] has {len(gs[0])} items but galleries[{v}] has {len(gs[v])}: every "
                                 "version must hold a vector for every gallery item")
            if len(qs[v]) != len(qs[0]):
                raise ValueError(f"queries[0] has {len(qs[0])} rows but queries[{v}] has {len(qs[v])}")
        same = self.queries_are_gallery
        if same is not None and not isinstance(same, (bool, np.bool_)):
            raise TypeError(f"queries_are_gallery must be True, False or None, got {same!r}")
        if same and len(qs[0]) != len(gs[0]):
            raise ValueError(f"queries_are_gallery=True but there are {len(qs[0])} queries for {len(gs[0])} gallery "
                             "items: query i must be gallery item i")
        if same is None and len(qs[0]) != len(gs[0]):
            same = False
        object.__setattr__(self, "queries_are_gallery", None if same is None else bool(same))
        object.__setattr__(self, "queries", tuple(qs))
        object.__setattr__(self, "galleries", tuple(gs))

    @property
    def n_versions(self) -> int:
        """Number of model versions ``K``."""
        return len(self.galleries)

    @property
    def n_gallery(self) -> int:
        """Number of gallery items ``N``."""
        return len(self.galleries[0])

    @property
    def n_queries(self) -> int:
        """Number of queries ``n_q``."""
        return len(self.queries[0])


def multi_rank_merge(embeddings, query_embeddings=None, name: str = "rank_merge",
                     queries_are_gallery: bool | None = None) -> MultiVersionStrategy:
    """Rank merge over K spaces: each version's own backbone embeds the query; K backbone passes.

    Parameters
    ----------
    embeddings : sequence of K arrays (N, d_v)
        ``φ_v(g)`` of the gallery items under each version.
    query_embeddings : sequence of K arrays (n_q, d_v), optional
        ``φ_v(q)`` of the queries; default ``embeddings`` (leave-one-out: the queries are the
        gallery items).
    name : str, default "rank_merge"
        Name of the strategy.
    queries_are_gallery : bool, optional
        As in :class:`MultiVersionStrategy`; default True when no query arrays are given.

    Returns
    -------
    MultiVersionStrategy
        With ``backbone_passes = K``.

    Raises
    ------
    TypeError, ValueError
        As :class:`MultiVersionStrategy`.
    """
    galleries = _array_list(embeddings, "embeddings")
    if query_embeddings is None:
        queries, same = galleries, (True if queries_are_gallery is None else queries_are_gallery)
    else:
        queries, same = _array_list(query_embeddings, "query_embeddings"), queries_are_gallery
    return MultiVersionStrategy(name, tuple(queries), tuple(galleries), backbone_passes=len(galleries),
                                queries_are_gallery=same)


def storage_states(initial, order, ratios, new_version: int, n_versions: int | None = None) -> np.ndarray:
    """Which version each item is stored under at each ratio of a backfill to ``new_version``.

    At ratio ``r`` the first ``round(r·N)`` items of ``order`` are stored under ``new_version``
    and the others under their ``initial`` version (a backfill rewrites an item whatever it was
    stored as).

    Parameters
    ----------
    initial : int array (N,)
        Version of each item when this backfill starts (e.g. the result of a first backfill cut
        short: ``storage_states(np.zeros(N, int), order1, [0.6], 1)[0]``).
    order : int array (N,)
        Backfill order ``π``, a permutation of ``range(N)``.
    ratios : sequence of floats in [0, 1]
        Ratios ``r`` (sorted, repeats dropped).
    new_version : int
        The version the backfill writes.
    n_versions : int, optional
        Number of versions ``K``, for checking; default ``max(initial.max(), new_version) + 1``.

    Returns
    -------
    ndarray (len(ratios), N) of int64
        ``out[s, g]``: the version item ``g`` is stored under at the ``s``-th ratio.

    Raises
    ------
    ValueError
        If ``order`` is not a permutation, a ratio is outside [0, 1], ``n_versions < 1``, or a
        version index is negative or not below ``n_versions``.
    TypeError
        If a ratio is not a number, or ``initial``, ``new_version`` or ``n_versions`` is not
        integer.

    Examples
    --------
    >>> storage_states([0, 0, 1, 1], [3, 0, 1, 2], [0.0, 0.5], 2).tolist()
    [[0, 0, 1, 1], [2, 0, 1, 2]]
    """
    initial = np.asarray(initial)
    if initial.ndim != 1:
        raise ValueError(f"initial must be a 1-D array of version indices (one per item), got shape {initial.shape}")
    if initial.size and (initial.dtype == bool or not np.issubdtype(initial.dtype, np.integer)):
        raise TypeError(f"initial must hold integer version indices, got dtype {initial.dtype}")
    initial = initial.astype(np.int64) if initial.size else np.zeros(0, dtype=np.int64)
    n = len(initial)
    order = check_order(order, n)
    ratios = check_ratios(ratios)
    if isinstance(new_version, bool) or not isinstance(new_version, (int, np.integer)):
        raise TypeError(f"new_version must be an integer version index, got {new_version!r}")
    if n_versions is None:
        n_versions = max(int(initial.max(initial=0)), int(new_version)) + 1
    n_versions = check_positive_int(n_versions, "n_versions", "number of model versions")
    if not 0 <= new_version < n_versions:
        raise ValueError(f"new_version={new_version} is not a version index in [0, {n_versions - 1}]")
    check_versions(initial[None, :], n_versions, n)
    out = np.tile(initial.astype(np.int64), (len(ratios), 1))
    for s, r in enumerate(ratios):
        out[s, order[: int(round(r * n))]] = new_version
    return out


def evaluate_versions(strategy: MultiVersionStrategy, query_labels, gallery_labels=None, initial=None,
                      new_version: int | None = None, ratios=DEFAULT_RATIOS, order=None, order_seed: int = 0,
                      exclude_self: bool | None = None, reference_top1=None, chunk_size: int = 1024,
                      device=None) -> BackfillCurve:
    """Evaluate a multi-version strategy along a backfill: mAP, top-1, top-5 and negative flips per ratio.

    The gallery starts stored as ``initial`` and the backfill rewrites items in ``order`` with
    ``new_version`` (:func:`storage_states`); at each ratio every item is scored in the space of
    the version it is stored under (:class:`MultiVersionStrategy`). Exact, with the tie rule of
    :func:`~backfill_lib.backfill.evaluate_backfill`.

    Parameters
    ----------
    strategy : MultiVersionStrategy
        The query and gallery vectors of every version.
    query_labels : int array (n_q,)
        Class label of each query.
    gallery_labels : int array (N,), optional
        Class label of each gallery item; default ``query_labels`` (only when the queries are the
        gallery items).
    initial : int array (N,), optional
        Version of each item when the backfill starts; default version 0 everywhere.
    new_version : int, optional
        The version the backfill writes; default the newest, ``K - 1``.
    ratios : sequence of floats in [0, 1], default DEFAULT_RATIOS
        Backfill ratios to evaluate.
    order : array (N,), optional
        Backfill order ``π``; default a random order drawn with ``order_seed``.
    order_seed : int, default 0
        Seed of the default order (see :func:`~backfill_lib.backfill.backfill_order`).
    exclude_self : bool, optional
        Leave-one-out; default decided by ``strategy.queries_are_gallery`` (as in
        :func:`~backfill_lib.backfill.evaluate_backfill`).
    reference_top1 : bool array (n_q,), optional
        Per-query top-1 correctness negative flips are counted against; default this strategy
        at ``r = 0`` (the service just before this backfill starts).
    chunk_size : int, default 1024
        Queries scored at once.
    device : str, optional
        Where the engine runs (see :func:`backfill_lib.evaluation.choose_device`).

    Returns
    -------
    BackfillCurve
        Named after the strategy, with its ``backbone_passes``.

    Raises
    ------
    TypeError
        If ``strategy`` is not a :class:`MultiVersionStrategy`, or a ratio, label,
        ``exclude_self`` or ``chunk_size`` has the wrong type.
    ValueError
        If labels, ``initial``, ``order`` or ``reference_top1`` do not match the gallery and
        queries, a version index is out of range, leave-one-out is undecided or asked for
        separate queries, fewer than 5 items are searchable, or a ratio is outside [0, 1].

    Examples
    --------
    Versions 0 and 1 know nothing (every item orthogonal to every other), version 2 knows the
    classes; the backfill writes version 2 in the order 0, 1, ..., 5:

    >>> import numpy as np
    >>> x = np.eye(6, dtype=np.float32)
    >>> by_class = np.repeat(np.eye(3, dtype=np.float32), 2, axis=0)
    >>> s = multi_rank_merge([x, x, by_class])
    >>> c = evaluate_versions(s, [0, 0, 1, 1, 2, 2], initial=[0, 1, 0, 1, 0, 1], ratios=[0, 0.5, 1],
    ...                       order=np.arange(6), device="numpy")
    >>> c.map.round(3).tolist()
    [0.2, 0.6, 1.0]
    """
    if not isinstance(strategy, MultiVersionStrategy):
        raise TypeError(f"strategy must be a MultiVersionStrategy, got {type(strategy).__name__}")
    run = _prepare_evaluation(strategy, query_labels, gallery_labels, ratios, order, order_seed, exclude_self,
                              reference_top1, chunk_size)
    n, k = strategy.n_gallery, strategy.n_versions
    initial = np.zeros(n, dtype=np.int64) if initial is None else np.asarray(initial)
    if initial.shape != (n,):
        raise ValueError(f"initial must hold one version index per gallery item ({n}), got shape {initial.shape}")
    new_version = k - 1 if new_version is None else new_version
    versions = storage_states(initial, run.order, run.eval_ratios, new_version, n_versions=k)
    m = evaluate_version_states(list(strategy.queries), list(strategy.galleries), versions, run.query_labels,
                                run.gallery_labels, exclude_self=run.leave_one_out, ks=(1, 5),
                                chunk_size=run.chunk_size, device=device)
    return _curve_from_states(strategy, run, m)


def multi_reverse_heads(d_new: int, d_targets):
    """Untrained maps ``ψ_{K→v}`` from the newest space into each older one (a ``torch.nn.ModuleList``).

    Parameters
    ----------
    d_new : int
        Embedding size of the newest version.
    d_targets : sequence of int
        Embedding size of each older version the maps read into.

    Returns
    -------
    torch.nn.ModuleList
        One :class:`~backfill_lib.transforms.MLPTransform` (as
        :func:`~backfill_lib.transforms.reverse_transformation` builds it) per target.

    Raises
    ------
    TypeError
        If a size is not an integer or ``d_targets`` is not a sequence.
    ValueError
        If a size is below 1.
    """
    from torch import nn

    from .transforms import reverse_transformation

    d_new = check_positive_int(d_new, "d_new", "an embedding size")
    if isinstance(d_targets, (str, bytes)) or not hasattr(d_targets, "__iter__"):
        raise TypeError(f"d_targets must be a sequence of embedding sizes, one per older version, got {d_targets!r}")
    # int(2.7) would be 2: a size is refused unless it is an integer.
    sizes = [check_positive_int(d, f"d_targets[{v}]", "an embedding size") for v, d in enumerate(d_targets)]
    return nn.ModuleList([reverse_transformation(d_new, d) for d in sizes])


def fit_multi_reverse(new, targets, labels, tau: float = 0.2, lam_rt: float = 0.0, config=None, steps: int | None = None,
                      device=None, progress: bool = False):
    """Train the maps ``ψ_{K→v}`` into every older stored space together, with ``L_mc`` over all K stored sets.

    The objective (ours) is :func:`~backfill_lib.losses.multi_compatible.multi_compatible_loss`
    with the query vectors ``ψ̂_{K→v}(φ_K(x))`` against the stored ``φ_v(x)`` of every older
    version, and ``φ_K(x)`` against the newest stored set (``ρ`` is the identity), plus
    ``λ_rt`` times each map's ``L_rt``. Backbones are frozen: it trains on cached embeddings.

    Parameters
    ----------
    new : array (n, d_K)
        Newest-version embeddings of the training images (unit-norm rows).
    targets : sequence of arrays (n, d_v)
        Embeddings of the same images under each older stored version (unit-norm rows).
    labels : int array (n,)
        Labels: positives are the same-label items.
    tau : float, default 0.2
        Temperature (the two-version ``mct`` default, ``MethodParams.mct_tau``).
    lam_rt : float, default 0.0
        Weight of the maps' ``L_rt``.
    config : TrainConfig, optional
        Optimiser, default :data:`~backfill_lib.transforms.TRANSFORM_CONFIG`; its seed seeds the
        initial weights and the batch order.
    steps : int, optional
        Minimum number of optimiser steps, default
        :data:`~backfill_lib.transforms.TRANSFORM_STEPS`.
    device : str or torch.device, optional
        Where to train; default :func:`~backfill_lib.training.default_device`.
    progress : bool, default False
        Show a progress bar.

    Returns
    -------
    torch.nn.ModuleList
        The trained maps (as :func:`multi_reverse_heads`), in eval mode; apply one with
        :func:`~backfill_lib.transforms.apply_transform`.

    Raises
    ------
    TypeError
        If ``targets`` is not a list or tuple, or an input is not numeric.
    ValueError
        If ``targets`` is empty, arrays do not have one row per image or are not unit norm,
        ``tau`` is not positive, ``lam_rt`` is negative or not finite, or there are fewer than
        2 images.
    """
    import torch
    from torch.utils.data import TensorDataset

    from . import transforms as tf
    from .losses.multi_compatible import multi_compatible_loss
    from .losses.reverse import reverse_loss
    from .training import default_device, train

    targets = _array_list(targets, "targets")
    if not targets:
        raise ValueError("targets is empty: give the embeddings of at least one older version")
    tau = check_non_negative(tau, "tau", "a temperature", strict=True)
    lam_rt = check_non_negative(lam_rt, "lam_rt", "the weight of L_rt")
    new = as_embeddings(new, "new", unit_norm=True)
    targets = [as_embeddings(t, f"targets[{v}]", unit_norm=True) for v, t in enumerate(targets)]
    for v, t in enumerate(targets):
        if len(t) != len(new):
            raise ValueError(f"new has {len(new)} rows but targets[{v}] has {len(t)}: all must embed the same images")
    if len(new) < 2:
        raise ValueError("fitting the maps needs at least 2 training images")
    y = as_labels(labels, "labels", n=len(new))
    config = tf.TRANSFORM_CONFIG if config is None else config
    steps = tf.TRANSFORM_STEPS if steps is None else steps
    dims = [new.shape[1]] + [t.shape[1] for t in targets]
    cuts = np.cumsum(dims)[:-1]
    heads = tf._seeded(lambda: multi_reverse_heads(dims[0], dims[1:]), config.seed)
    dataset = TensorDataset(torch.from_numpy(np.hstack([new, *targets])), torch.from_numpy(y))

    def loss_fn(model, x, labels_batch):
        z, *stored = torch.tensor_split(x, [int(c) for c in cuts], dim=1)
        psi = [m(z) for m in model]
        z_hat = torch.nn.functional.normalize(z, dim=1)
        loss = multi_compatible_loss(psi + [z_hat], stored + [z_hat], labels_batch, tau)
        if lam_rt:
            loss = loss + lam_rt * sum(reverse_loss(p, t) for p, t in zip(psi, stored))
        return loss

    train(heads, dataset, tf.schedule(config, len(dataset), steps), loss_fn=loss_fn,
          device=device or default_device(), desc="psi (L_mc over K sets)", progress=progress)
    return heads.eval()
