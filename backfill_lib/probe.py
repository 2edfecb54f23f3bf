"""The upgrade probe: is an upgrade worth it, and is a bridge enough? Answered before migrating.

From a labelled sample of items embedded by both models (the old model's vectors are usually
already stored; the new model embeds the sample once), :func:`probe_upgrade` reports

* the **gain** of the upgrade, ``mAP(new/new) − mAP(old/old)`` on the sample (leave-one-out
  retrieval within the sample's evaluation half), with a **bootstrap** confidence interval that
  resamples the items (queries and gallery at once). mAP depends on the gallery's size, so the
  gain is the gain at the evaluation half's size: compare probes of one size;
* what each **bridge** reaches with nothing re-embedded (``r = 0``) and with half of the gallery
  re-embedded (``r = 0.5``), as mAP and as the share of the gain it recovers: the closed-form
  bridges of :mod:`~backfill_lib.adapters` (Procrustes, SLERP, fitted on the sample's other half
  without labels), a fitted ``ψ`` if one is given, and calibrated rank merge (label-free maps);
* the measured **cost** of embedding one item with the new model (when an embedding function is
  given) and the projected **backfill time** of the whole gallery;
* a **decision** in one line, with its reason: ``skip`` (the new model is not measurably
  better), ``bridge`` (a bridge recovers at least ``bridge_share`` of the gain with nothing
  re-embedded: serve it, backfill at leisure or never) or ``backfill`` (no bridge is enough:
  re-embed, serving the best bridge meanwhile).

The rule and its thresholds are ours; the report says which numbers decided.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from .metrics import average_precision
from .validation import as_embeddings, as_labels, check_non_negative, check_open_fraction, check_positive_int, check_seed

#: The decisions :func:`probe_upgrade` makes.
DECISIONS = ("skip", "bridge", "backfill")


@dataclass(frozen=True)
class BridgeResult:
    """What one bridge reaches on the probe's evaluation half.

    Each parameter is kept as an attribute of the same name.

    Parameters
    ----------
    name : str
        The bridge (a strategy name of the book: ``"procrustes"``, ``"slerp"``, ...).
    map_r0 : float
        mAP with nothing re-embedded.
    map_half : float
        mAP with half of the items re-embedded (a seeded random half).
    share_r0 : float
        ``(map_r0 − old/old) / (new/new − old/old)``: the share of the upgrade's gain recovered
        at ``r = 0`` (NaN when the gain is zero).
    needs : str
        What it needs in production, in words.
    """

    name: str
    map_r0: float
    map_half: float
    share_r0: float
    needs: str


@dataclass(frozen=True)
class ProbeReport:
    """The probe's findings (see :func:`probe_upgrade`). Each parameter is an attribute.

    Parameters
    ----------
    n_fit, n_eval : int
        Items the bridges were fitted on, and items evaluated (queries and gallery).
    old_map, new_map : float
        mAP of old/old and new/new on the evaluation half.
    gain : float
        ``new_map − old_map``.
    gain_interval : tuple of float
        The bootstrap confidence interval of ``gain`` (``confidence`` level).
    confidence : float
        The level of ``gain_interval``.
    bridges : tuple of BridgeResult
        Every bridge, best share at ``r = 0`` first.
    seconds_per_item : float or None
        Measured (or given) seconds to embed one item with the new model.
    gallery_size : int or None
        Items in the gallery to migrate.
    projected_seconds : float or None
        ``gallery_size × seconds_per_item / workers``.
    decision : str
        One of :data:`DECISIONS`.
    reason : str
        Why, in one sentence with the numbers that decided.
    """

    n_fit: int
    n_eval: int
    old_map: float
    new_map: float
    gain: float
    gain_interval: tuple
    confidence: float
    bridges: tuple = field(default_factory=tuple)
    seconds_per_item: float | None = None
    gallery_size: int | None = None
    projected_seconds: float | None = None
    decision: str = "backfill"
    reason: str = ""

    def __str__(self) -> str:
        lo, hi = self.gain_interval
        lines = [f"upgrade probe on {self.n_eval} items (bridges fitted on {self.n_fit} others, no labels)",
                 f"  old/old mAP {self.old_map:.3f}, new/new mAP {self.new_map:.3f}: gain {self.gain:+.3f} "
                 f"[{lo:+.3f}, {hi:+.3f}] ({self.confidence:.0%} bootstrap interval)"]
        for b in self.bridges:
            share = "n/a" if np.isnan(b.share_r0) else f"{b.share_r0:.0%} of the gain"
            lines.append(f"  {b.name:22s} r = 0: mAP {b.map_r0:.3f} ({share}); r = 0.5: {b.map_half:.3f}; needs {b.needs}")
        if self.seconds_per_item is not None:
            lines.append(f"  embedding: {1e3 * self.seconds_per_item:.2f} ms per item")
        if self.projected_seconds is not None:
            lines.append(f"  backfill of {self.gallery_size:,} items: {_duration(self.projected_seconds)}")
        lines.append(f"decision: {self.decision}: {self.reason}")
        return "\n".join(lines)


def _duration(seconds: float) -> str:
    for unit, size in (("days", 86400.0), ("hours", 3600.0), ("minutes", 60.0)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.1f} s"


def _per_query_ap(query, gallery, labels, exclude_self: bool) -> np.ndarray:
    scores = query.astype(np.float64) @ gallery.astype(np.float64).T
    relevant = labels[:, None] == labels[None, :]
    if exclude_self:
        np.fill_diagonal(scores, -np.inf)
        np.fill_diagonal(relevant, False)
    return average_precision(scores, relevant)


def _mixed_ap(query_old, gallery_old, query_new, gallery_new, labels, is_new, maps=None) -> np.ndarray:
    """Per-query AP of a merged search: items in ``is_new`` scored in the new space, the rest in the old."""
    s_old = query_old.astype(np.float64) @ gallery_old.astype(np.float64).T
    s_new = query_new.astype(np.float64) @ gallery_new.astype(np.float64).T
    if maps is not None:
        s_old, s_new = maps[0](s_old), maps[1](s_new)
    scores = np.where(is_new[None, :], s_new, s_old)
    relevant = labels[:, None] == labels[None, :]
    np.fill_diagonal(scores, -np.inf)
    np.fill_diagonal(relevant, False)
    return average_precision(scores, relevant)


def _item_bootstrap(old, new, labels, confidence: float, n_boot: int, seed: int) -> tuple:
    """Percentile interval of the gain when the *items* are resampled: each resample is a new
    sample of the collection, its items the queries and the gallery at once (copies of a query's
    own item are left out of its gallery), so the interval holds the gallery's sampling
    variability too, not only the queries'."""
    s_old = old.astype(np.float64) @ old.astype(np.float64).T
    s_new = new.astype(np.float64) @ new.astype(np.float64).T
    rng = np.random.default_rng(seed)
    n = len(labels)
    gains = []
    for _ in range(n_boot):
        b = rng.integers(0, n, size=n)
        same_item = b[:, None] == b[None, :]
        relevant = (labels[b][:, None] == labels[b][None, :]) & ~same_item
        has = relevant.any(axis=1)
        if has.sum() < 2:
            continue
        ap = [average_precision(np.where(same_item, -np.inf, s[b][:, b])[has], relevant[has]).mean()
              for s in (s_old, s_new)]
        gains.append(ap[1] - ap[0])
    alpha = (1.0 - confidence) / 2
    return float(np.quantile(gains, alpha)), float(np.quantile(gains, 1.0 - alpha))


def decide(gain: float, gain_interval: tuple, bridges, bridge_share: float = 0.9) -> tuple[str, str]:
    """The probe's decision and its reason (the rule is ours).

    ``skip`` when the interval's lower end is at or below zero (the new model is not measurably
    better); else ``bridge`` when the best bridge recovers at least ``bridge_share`` of the gain
    with nothing re-embedded; else ``backfill``, naming the bridge to serve meanwhile.

    Parameters
    ----------
    gain : float
        ``mAP(new/new) − mAP(old/old)``.
    gain_interval : (float, float)
        Its confidence interval.
    bridges : sequence of BridgeResult
        The bridges measured.
    bridge_share : float, default 0.9
        The share of the gain a bridge must recover at ``r = 0`` to make the backfill optional.

    Returns
    -------
    (str, str)
        The decision (one of :data:`DECISIONS`) and one sentence saying why.
    """
    lo, hi = gain_interval
    if lo <= 0.0:
        return "skip", (f"the new model is not measurably better: gain {gain:+.3f}, interval [{lo:+.3f}, {hi:+.3f}] "
                        "reaches zero")
    ranked = sorted((b for b in bridges if not np.isnan(b.share_r0)), key=lambda b: -b.share_r0)
    if ranked and ranked[0].share_r0 >= bridge_share:
        b = ranked[0]
        return "bridge", (f"{b.name} recovers {b.share_r0:.0%} of the gain {gain:+.3f} with nothing re-embedded "
                          f"(at least {bridge_share:.0%} asked); serve it, and backfill only if the rest is worth it")
    best = (f"; serve {ranked[0].name} meanwhile ({ranked[0].share_r0:.0%} of the gain at r = 0)" if ranked
            and ranked[0].share_r0 > 0 else "")
    return "backfill", (f"the gain {gain:+.3f} [{lo:+.3f}, {hi:+.3f}] is real and no bridge recovers "
                        f"{bridge_share:.0%} of it{best}")


def probe_upgrade(old, new, labels, psi=None, embed_fn=None, embed_sample=None, gallery_size: int | None = None,
                  seconds_per_item: float | None = None, workers: int = 1, fit_share: float = 0.5,
                  confidence: float = 0.95, n_boot: int = 500, bridge_share: float = 0.9, seed: int = 0,
                  slerp_t: float = 0.5) -> ProbeReport:
    """Probe an upgrade on a labelled sample embedded by both models (see the module docstring).

    The sample is split at random (``seed``): ``fit_share`` of it fits the bridges (no labels
    used), the rest is evaluated with leave-one-out retrieval (each item a query against the
    others). The calibrated merge uses the label-free ``"neighbours"`` maps fitted on the fit half.

    Parameters
    ----------
    old : array (n, d_o)
        The sample under the old model, unit rows.
    new : array (n, d_n)
        The same items, same order, under the new model, unit rows.
    labels : int array (n,)
        Their classes (relevance = same class), used only to measure.
    psi : object, optional
        A fitted reverse transformation (``transform(new) -> old space``), e.g. a
        :class:`~backfill_lib.transforms.ReverseTransform`, measured beside the closed-form bridges.
    embed_fn : callable, optional
        ``embed_fn(batch) -> vectors``: the new model's embedding of raw items; timed on
        ``embed_sample`` to measure the cost per item.
    embed_sample : sequence, optional
        Raw items to time ``embed_fn`` on (required with ``embed_fn``).
    gallery_size : int, optional
        Items to migrate; with a cost per item, the projected backfill time is reported.
    seconds_per_item : float, optional
        The cost per item, when it is known rather than measured.
    workers : int, default 1
        Embedding workers the backfill will run (the projection divides by it).
    fit_share : float, default 0.5
        Share of the sample that fits the bridges, in (0, 1).
    confidence : float, default 0.95
        Level of the gain's bootstrap interval.
    n_boot : int, default 500
        Bootstrap resamples of the items (each costs two AP computations over the evaluation half).
    bridge_share : float, default 0.9
        See :func:`decide`.
    seed : int, default 0
        Seed of the split, the half-backfilled set and the bootstrap.
    slerp_t : float, default 0.5
        The SLERP bridge's blend (see :func:`~backfill_lib.adapters.slerp_query`).

    Returns
    -------
    ProbeReport
        ``str(report)`` prints it.

    Raises
    ------
    ValueError
        If the arrays do not describe the same items, a half would hold fewer than 4 items, a
        share is outside (0, 1), or ``embed_fn`` is given without ``embed_sample``.
    """
    from .adapters import ProcrustesAdapter, slerp_query
    from .calibration import fit_score_map

    o = as_embeddings(old, "old", unit_norm=True)
    n_ = as_embeddings(new, "new", unit_norm=True)
    y = as_labels(labels, "labels")
    if not len(o) == len(n_) == len(y):
        raise ValueError(f"old, new and labels must describe the same items: {len(o)}, {len(n_)} and {len(y)} rows")
    fit_share = check_open_fraction(fit_share, "fit_share", "the share of the sample that fits the bridges")
    confidence = check_open_fraction(confidence, "confidence", "the level of the interval")
    workers = check_positive_int(workers, "workers", "embedding workers")
    rng = np.random.default_rng(check_seed(seed))
    idx = rng.permutation(len(y))
    n_fit = int(round(fit_share * len(y)))
    fit, ev = idx[:n_fit], idx[n_fit:]
    if len(fit) < 4 or len(ev) < 4:
        raise ValueError(f"the sample of {len(y)} items leaves {len(fit)} to fit and {len(ev)} to evaluate: give "
                         "more items (a few hundred per class is a good probe)")
    oe, ne, ye = o[ev], n_[ev], y[ev]
    ap_old = _per_query_ap(oe, oe, ye, True)
    ap_new = _per_query_ap(ne, ne, ye, True)
    has_rel = np.array([(ye == c).sum() > 1 for c in ye])
    old_map, new_map = float(ap_old[has_rel].mean()), float(ap_new[has_rel].mean())
    gain = new_map - old_map
    interval = _item_bootstrap(oe, ne, ye, confidence, check_positive_int(n_boot, "n_boot", "bootstrap resamples"),
                               seed)

    half = np.zeros(len(ev), dtype=bool)
    half[rng.permutation(len(ev))[: len(ev) // 2]] = True

    def share(m):
        return (m - old_map) / gain if abs(gain) > 1e-12 else float("nan")

    def bridge(name, query_old, needs, maps=None):
        m0 = float(_mixed_ap(query_old, oe, ne, ne, ye, np.zeros(len(ev), dtype=bool), maps)[has_rel].mean())
        mh = float(_mixed_ap(query_old, oe, ne, ne, ye, half, maps)[has_rel].mean())
        return BridgeResult(name, m0, mh, share(m0), needs)

    p = ProcrustesAdapter().fit(n_[fit], o[fit])
    results = [bridge("procrustes", p.transform(ne), "nothing re-encoded; a matrix per query (no labels)"),
               bridge("slerp", slerp_query(oe, ne, p, t=slerp_t), "both backbones per query; nothing re-encoded")]
    if psi is not None:
        results.append(bridge("reverse_transform", as_embeddings(psi.transform(ne), "psi.transform(new)",
                                                                 dim=o.shape[1], unit_norm=True),
                              "a trained head ψ per query; nothing re-encoded"))
    maps = [fit_score_map(e[fit], method="neighbours", seed=seed) for e in (o, n_)]
    results.append(bridge("rank_merge_calibrated", oe, "both backbones per query; label-free score maps", maps))
    results.sort(key=lambda b: -(b.share_r0 if not np.isnan(b.share_r0) else -np.inf))

    if embed_fn is not None:
        if embed_sample is None or len(embed_sample) == 0:
            raise ValueError("embed_fn needs embed_sample: a few raw items to time the new model on")
        embed_fn(embed_sample[:1])                      # warm up
        start = time.perf_counter()
        embed_fn(embed_sample)
        seconds_per_item = (time.perf_counter() - start) / len(embed_sample)
    elif seconds_per_item is not None:
        seconds_per_item = check_non_negative(seconds_per_item, "seconds_per_item", "seconds to embed one item")
    if gallery_size is not None:
        gallery_size = check_positive_int(gallery_size, "gallery_size", "items to migrate")
    projected = (gallery_size * seconds_per_item / workers
                 if gallery_size is not None and seconds_per_item is not None else None)
    decision, reason = decide(gain, interval, results, bridge_share)
    if decision == "backfill" and projected is not None:
        reason += f"; the backfill takes about {_duration(projected)}"
    return ProbeReport(len(fit), len(ev), old_map, new_map, gain, interval, confidence, tuple(results),
                       seconds_per_item, gallery_size, projected, decision, reason)
