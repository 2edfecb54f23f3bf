"""Score calibration for calibrated rank merge (ours; METHOD §7): one scale for two embedding spaces.

Distance rank merge compares an old/old score ``s_o = φ_o(q)·φ_o(g)`` with a new/new score
``s_n = φ_n(q)·φ_n(g)`` as if they were on one scale. They are not: each model spreads its
scores its own way, so at a given raw score one space may be far more likely to have found a
relevant item than the other. Calibrated rank merge maps each space's scores through an
increasing map ``f_o``, ``f_n`` fitted on that space's scores of **training pairs** (pairs of
training images, relevant when they share a label), and merges by ``f_o(s_o)`` and ``f_n(s_n)``.
An increasing map leaves the ranking *within* each space as it is; only how old-stored and
new-stored items interleave changes. No model is trained or changed.

**What is calibrated, on which data.** For each space, the scores of the same set of training
pairs: all pairs ``i < j`` of at most ``max_items`` training images (a seeded subset when the
training split is larger), embedded by that space's model, without augmentation. Both spaces use
the same pairs, so they see the same share of relevant pairs. The gallery and the queries (the
test split) are never looked at.

The maps (:data:`CALIBRATIONS`):

* ``"platt"`` (default): ``f(s) = a·s + b``, the logit of a logistic regression of relevance on
  the score (Platt scaling). Equal mapped scores then mean equal estimated probability that the
  pair is relevant, and ranking a merged list by the probability of relevance is the order that
  puts the most likely relevant items first (the probability ranking principle), which is what
  mAP and top-k reward. This is why it is the default.
* ``"negatives"``: ``f(s) = (s − μ⁻)/σ⁻`` with the mean and standard deviation of the scores of
  irrelevant (different-label) training pairs (a Z-norm against impostors, as in score
  normalisation for speaker verification): a mapped score says how far above a typical
  irrelevant item an item lies. It ignores how relevant pairs score.

Two more need no labels at all (ours), for a service that has none:

* ``"znorm"``: ``f(s) = (s − μ)/σ`` with the mean and spread of the scores of *all* training
  pairs. Most pairs of a many-class collection are irrelevant, so this is close to
  ``"negatives"`` without knowing which pairs those are;
* ``"neighbours"``: a two-point map that sends the mean score of a random pair to 0 and the mean
  score of an item's ``k`` nearest neighbours (``k = NEIGHBOURS``, the item itself left out) to 1.
  A mapped score of 1 then means "as close as a typical near neighbour is in this space", whatever
  the space's own spread; the items' neighbours are found among the same training items.

All four maps are affine and increasing, so a merged ranking by them can be computed by the unchanged
engine: :func:`~backfill_lib.backfill.rank_merge_calibrated` folds the maps into the stored
vectors. (A non-affine map, e.g. each space's empirical distribution function of scores, would
need a per-space score transform inside the evaluation engine.)

Caveat: both models were trained on these images, so their training-pair scores separate
relevant from irrelevant pairs better than unseen gallery pairs do; the new model, trained on
every class, more so than the old one. Fitting on a held-out split would avoid that bias.
Importing this module does not import torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .validation import as_embeddings, as_labels, check_choice, check_seed

#: The calibrations :func:`fit_score_map` offers (``MethodParams.calibration``).
CALIBRATIONS = ("platt", "negatives", "znorm", "neighbours")

#: The calibrations that need no labels.
LABEL_FREE = ("znorm", "neighbours")

#: Neighbours per item of the ``"neighbours"`` calibration.
NEIGHBOURS = 10

#: Default largest number of training images whose pairs are scored (``n(n−1)/2`` pairs).
MAX_ITEMS = 2000


def _check_count(n_pairs) -> int:
    if isinstance(n_pairs, (bool, np.bool_)) or not isinstance(n_pairs, (int, np.integer)) or n_pairs < 0:
        raise TypeError(f"n_pairs must be a non-negative integer (training pairs fitted on), got {n_pairs!r}")
    return int(n_pairs)


@dataclass(frozen=True)
class ScoreMap:
    """An increasing affine map of one space's scores, ``s ↦ scale·s + offset``.

    Each parameter is kept as an attribute of the same name.

    Parameters
    ----------
    scale : float
        Slope ``a > 0``.
    offset : float
        Intercept ``b``.
    method : str
        The calibration that fitted it (one of :data:`CALIBRATIONS`).
    n_pairs : int, default 0
        Number of training pairs it was fitted on.

    Raises
    ------
    TypeError
        If ``scale`` or ``offset`` is not a real number, ``method`` not a string, or
        ``n_pairs`` not a non-negative integer.
    ValueError
        If ``scale`` is not positive and finite or ``offset`` is not finite.
    """

    scale: float
    offset: float
    method: str
    n_pairs: int = 0

    def __post_init__(self):
        for name in ("scale", "offset"):
            value = getattr(self, name)
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
                raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
        if not isinstance(self.method, str):
            raise TypeError(f"method must be a string naming the calibration, e.g. 'platt', got {self.method!r}")
        object.__setattr__(self, "n_pairs", _check_count(self.n_pairs))
        if not (np.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"scale must be positive and finite (an increasing map keeps the ranking within "
                             f"the space), got {self.scale!r}")
        if not np.isfinite(self.offset):
            raise ValueError(f"offset must be finite, got {self.offset!r}")

    def __call__(self, scores) -> np.ndarray:
        """Map raw scores to the calibrated scale.

        Parameters
        ----------
        scores : array-like of float
            Raw inner products of this space.

        Returns
        -------
        ndarray of float64
            ``scale·scores + offset``, same shape.

        Raises
        ------
        TypeError
            If ``scores`` is not real numbers.
        """
        arr = np.asarray(scores)
        if arr.dtype == object or arr.dtype == bool or not np.issubdtype(arr.dtype, np.number) \
                or np.issubdtype(arr.dtype, np.complexfloating):
            raise TypeError(f"scores must be real numbers, got dtype {arr.dtype}")
        return self.scale * arr.astype(np.float64) + self.offset


def training_pairs(labels, max_items: int = MAX_ITEMS, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The training pairs a calibration is fitted on: all pairs ``i < j`` of a subset of items.

    Parameters
    ----------
    labels : int array (n,)
        Labels of the training items.
    max_items : int, default :data:`MAX_ITEMS`
        Use every item when ``n ≤ max_items``, else a seeded random subset of ``max_items`` items.
    seed : int, default 0
        Seed of the subset, in ``0 .. 2**32 - 1``.

    Returns
    -------
    i, j : int arrays (P,)
        The pairs, ``i < j``, as indices into ``labels``.
    relevant : bool array (P,)
        Whether the two items share a label.

    Raises
    ------
    ValueError
        If ``max_items < 2``, there are fewer than two items, or ``seed`` is negative.
    TypeError
        If ``seed`` is not an integer, or the labels are not integer class labels.
    """
    y = as_labels(labels, "labels")
    if isinstance(max_items, bool) or not isinstance(max_items, (int, np.integer)) or max_items < 2:
        raise ValueError(f"max_items must be an integer of at least 2 (a pair needs two items), got {max_items!r}")
    seed = check_seed(seed, "seed")
    if len(y) < 2:
        raise ValueError(f"calibration needs at least 2 training items to form a pair, got {len(y)}")
    items = np.arange(len(y))
    if len(y) > max_items:
        items = np.sort(np.random.default_rng(seed).choice(len(y), size=max_items, replace=False))
    a, b = np.triu_indices(len(items), k=1)
    i, j = items[a], items[b]
    return i, j, y[i] == y[j]


def _fit_platt(s: np.ndarray, relevant: np.ndarray, ridge: float = 1e-3, iters: int = 100) -> tuple[float, float]:
    """Logistic regression ``P(relevant | s) = σ(a·s + b)`` by Newton's method (a small ridge on the
    slope keeps it finite when the pairs are perfectly separated)."""
    mu, sd = s.mean(), s.std()
    x = (s - mu) / sd if sd > 0 else s - mu
    t = relevant.astype(np.float64)
    w = np.array([0.0, np.log(t.mean() / (1 - t.mean()))])  # slope, intercept on the standardised score
    for _ in range(iters):
        z = w[0] * x + w[1]
        p = 0.5 * (1 + np.tanh(0.5 * z))                      # σ(z), without overflow
        g = np.array([np.dot(p - t, x) + ridge * w[0], np.sum(p - t)])
        h = p * (1 - p)
        H = np.array([[np.dot(h, x * x) + ridge, np.dot(h, x)], [np.dot(h, x), h.sum() + 1e-12]])
        step = np.linalg.solve(H, g)
        w -= step
        if np.abs(step).max() < 1e-10:
            break
    a = w[0] / sd if sd > 0 else w[0]
    return float(a), float(w[1] - a * mu)


def _fit_label_free(e: np.ndarray, method: str, max_items: int, seed: int) -> ScoreMap:
    n = len(e)
    if n < 2:
        raise ValueError(f"calibration needs at least 2 training items to form a pair, got {n}")
    items = np.arange(n)
    if n > max_items:
        items = np.sort(np.random.default_rng(seed).choice(n, size=max_items, replace=False))
    x = e[items].astype(np.float64)
    sims = x @ x.T
    off_diag = ~np.eye(len(x), dtype=bool)
    s = sims[off_diag]
    if np.ptp(s) <= 1e-9:
        raise ValueError(f"every training pair has the same score ({s[0]:.6g}): the embeddings do not separate "
                         "anything (a collapsed model?), so no map can be fitted")
    if method == "znorm":
        mu, sd = s.mean(), s.std()
        return ScoreMap(float(1.0 / sd), float(-mu / sd), method, n_pairs=len(s) // 2)
    k = min(NEIGHBOURS, len(x) - 1)
    np.fill_diagonal(sims, -np.inf)
    near = np.partition(sims, len(x) - k, axis=1)[:, len(x) - k:]     # each item's k highest scores
    top, mean_all = float(near.mean()), float(s.mean())
    if not top > mean_all + 1e-9:
        raise ValueError("an item's nearest neighbours score no higher than a random pair in this space: "
                         "no increasing two-point map exists")
    scale = 1.0 / (top - mean_all)
    return ScoreMap(float(scale), float(-mean_all * scale), method, n_pairs=len(s) // 2)


def fit_score_map(embeddings, labels=None, method: str = "platt", max_items: int = MAX_ITEMS,
                  seed: int = 0) -> ScoreMap:
    """Fit one space's increasing score map on the scores of its training pairs.

    Parameters
    ----------
    embeddings : array (n, d)
        L2-normalised embeddings of the training items in this space (e.g. ``φ_o`` of the
        training split).
    labels : int array (n,), optional
        Their labels; a pair is relevant when the labels agree. Needed by ``"platt"`` and
        ``"negatives"``; the label-free maps (:data:`LABEL_FREE`) ignore them.
    method : {"platt", "negatives", "znorm", "neighbours"}, default "platt"
        The map (see the module docstring): logistic-regression logit of relevance, the Z-norm of
        irrelevant-pair scores, or, without labels, the Z-norm of all pairs' scores or the
        two-point map from a random pair (0) to a near neighbour (1).
    max_items : int, default :data:`MAX_ITEMS`
        At most this many training items form the pairs (see :func:`training_pairs`).
    seed : int, default 0
        Seed of the subset of items, in ``0 .. 2**32 - 1``; use the same for every space so that
        they share the pairs.

    Returns
    -------
    ScoreMap
        ``s ↦ scale·s + offset``, with ``scale > 0``.

    Raises
    ------
    TypeError
        If ``seed`` or a label is not an integer.
    ValueError
        If ``method`` is unknown, the embeddings are not unit-norm rows matching ``labels``,
        the pairs are all relevant or all irrelevant, every pair has the same score, or the
        scores do not rank relevant pairs higher (the fitted slope is not positive: an
        increasing map cannot calibrate them).

    Examples
    --------
    >>> e = np.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-0.6, 0.8]])
    >>> m = fit_score_map(e, [0, 0, 1, 1], method="negatives")
    >>> round(m.scale, 3), round(float(m(0.8)), 3)  # σ⁻ = 0.424 (μ⁻ = 0): 0.8 is 1.886 σ⁻ above
    (2.357, 1.886)
    """
    check_choice(method, CALIBRATIONS, "calibration")
    if method in LABEL_FREE:
        e = as_embeddings(embeddings, "embeddings", unit_norm=True)
        if isinstance(max_items, bool) or not isinstance(max_items, (int, np.integer)) or max_items < 2:
            raise ValueError(f"max_items must be an integer of at least 2 (a pair needs two items), got {max_items!r}")
        return _fit_label_free(e, method, int(max_items), check_seed(seed, "seed"))
    if labels is None:
        raise ValueError(f"calibration {method!r} fits on labelled pairs: give labels, or choose a label-free "
                         f"calibration ({', '.join(LABEL_FREE)})")
    y = as_labels(labels, "labels")
    e = as_embeddings(embeddings, "embeddings", unit_norm=True)
    if len(e) != len(y):
        raise ValueError(f"embeddings has {len(e)} rows but labels has {len(y)}: give one label per embedding")
    i, j, relevant = training_pairs(y, max_items, seed)
    if relevant.all() or not relevant.any():
        raise ValueError("the training pairs are all relevant or all irrelevant: calibration needs pairs of both "
                         "kinds (at least two classes, one with two items)")
    s = np.einsum("pd,pd->p", e[i].astype(np.float64), e[j].astype(np.float64))
    if np.ptp(s) <= 1e-9:
        # Nothing to fit: a slope would be set by the solver's ridge, not by the data.
        raise ValueError(f"every training pair has the same score ({s[0]:.6g}): the embeddings do not separate "
                         "anything (a collapsed model?), so no map can be fitted")
    if method == "negatives":
        neg = s[~relevant]
        sd = neg.std()
        if not sd > 0:
            raise ValueError("every irrelevant training pair has the same score: its spread cannot set the scale")
        scale, offset = 1.0 / sd, -neg.mean() / sd
        if s[relevant].mean() <= neg.mean():
            raise ValueError("relevant training pairs do not score higher than irrelevant ones in this space: an "
                             "increasing map cannot calibrate it")
    else:
        scale, offset = _fit_platt(s, relevant)
        if not scale > 0:
            raise ValueError(f"the logistic fit of relevance on the score has slope {scale:.3g} ≤ 0: relevant "
                             "training pairs do not score higher in this space, an increasing map cannot calibrate it")
    return ScoreMap(float(scale), float(offset), method, n_pairs=len(s))
