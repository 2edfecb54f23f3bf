"""Figures of the book, with one palette the library owns (one colour per model, per strategy and
per score space, the same in every chapter), seaborn where it is the better tool (score
distributions, the cross-model matrix), and the strategy diagram every chapter shows.

This is the presentation layer: it draws arrays and results that other modules compute
(:mod:`~backfill_lib.backfill` for curves, :mod:`~backfill_lib.experiment` for the results JSON).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.lines import Line2D
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Patch, Rectangle
from matplotlib.ticker import PercentFormatter

from .validation import as_labels, check_k, check_no_repeats, check_positive_int

#: One colour per meaning, book-wide: models, strategies and score spaces never share a colour. Every
#: colour has a contrast of at least 3:1 on white (WCAG 2; checked by :func:`figure_problems` and the tests).
COLORS: dict[str, str] = {
    # models
    "old": "#7f7f7f",               # the old model φ_o, old/old retrieval
    "new": "#000000",               # the new model φ_n, new/new retrieval
    # strategies
    "offline": "#4d4d4d",
    "new_on_old": "#d62728",        # incompatible: new query, old gallery
    "rank_merge": "#1f77b4",
    "rank_merge_calibrated": "#00798c",  # ours: a teal, rank merge's blue moved towards green
    "bct": "#d95f02",
    "bct_pseudo": "#8c2d04",        # BCT's open-class variant: a dark BCT rust, dashed (LINESTYLES)
    "ra_bct": "#9467bd",
    "forward_transform": "#8c564b",
    "reverse_transform": "#7f7f00",
    "mct": "#2ca02c",
    "mct_old_neg": "#1b7837",        # mct's ablations: greens of mct's family, told apart by LINESTYLES/MARKERS
    "mct_new_neg": "#4d9221",
    "mct_no_rho": "#5b8c1a",
    "offline_rho": "#00441b",       # reference (ours): mct's head ρ on the new space alone, a dark mct green
    # closed-form, label-free bridges (backfill_lib.adapters)
    "procrustes": "#6a3d9a",
    "procrustes_forward": "#a6761d",
    "low_rank_affine": "#8e0152",
    "slerp": "#e7298a",
    # score spaces: what a query is compared with (never a model's colour, see SPACES)
    "old_stored": "#9c7a00",        # φ_o(q)·φ_o(g): old query against an old-stored item (a dark gold)
    "new_stored": "#00429d",        # new-side query against a new-stored item
    "cross": "#c51b7d",             # transformed or new query against an old-stored item
    # a gallery upgraded twice (chapter 7): v1 is drawn as old_stored, v3 as new_stored
    "v2_stored": "#626e4e",         # the version in between: half-way between those two colours
    # relevance of a retrieved item (plot_query_results): Okabe-Ito's bluish green and vermillion,
    # darkened to a contrast of 5.3:1 on white, told apart under red-green colour blindness, and
    # always drawn with a symbol (✓ / ✗) too, so the meaning never rests on colour alone
    "relevant": "#007a5a",
    "irrelevant": "#c13c00",
}

#: Neutral inks for what is not a model, strategy or space: annotation text and arrows (INK), and
#: guide lines such as a slider's position or a threshold (GUIDE). Both read on white (>= 7:1).
INK = "#333333"
GUIDE = "#555555"

#: Line style per strategy where a colour family is shared (a variant keeps its parent's hue) or
#: where two curves coincide over much of the backfill (offline and old/old until r = 0.9).
LINESTYLES: dict[str, str] = {"offline": "-.", "old": ":", "bct_pseudo": "--", "rank_merge_calibrated": "--",
                              "procrustes_forward": "--",
                              "mct_old_neg": "--", "mct_new_neg": ":", "mct_no_rho": "-.", "offline_rho": ":"}
#: Marker per strategy (default ``"o"``), so that curves that coincide stay told apart.
MARKERS: dict[str, str] = {"offline": "s", "old": "", "new": "", "bct_pseudo": "v", "rank_merge_calibrated": "D",
                           "mct_old_neg": "^", "mct_new_neg": "v", "mct_no_rho": "x", "offline_rho": "P",
                           "reverse_transform": "^", "forward_transform": "D", "ra_bct": "s",
                           "procrustes": "X", "procrustes_forward": "X", "low_rank_affine": "*", "slerp": "h"}

#: Human-readable names for legends.
LABELS: dict[str, str] = {
    "old": "old/old (no upgrade)",
    "new": "new/new",
    "offline": "offline backfill",
    "new_on_old": "new query on stored gallery (incompatible)",
    "rank_merge": "distance rank merge",
    "rank_merge_calibrated": "calibrated rank merge (ours)",
    "bct": "BCT",
    "bct_pseudo": "BCT, open-class (pseudo-classifier)",
    "ra_bct": "RA-BCT / Hot-Refresh",
    "forward_transform": "forward transformation (FCT-style)",
    "reverse_transform": "reverse transformation ψ (L_rt)",
    "mct": "metric-compatible training",
    "mct_old_neg": "MCT, old-space negatives only",
    "mct_new_neg": "MCT, new-space negatives only",
    "mct_no_rho": "MCT without learnable ρ",
    "offline_rho": "reference: new/new through a head ρ (ours)",
    "procrustes": "Procrustes: new query mapped to the old space (closed form)",
    "procrustes_forward": "Procrustes: stored old vectors rewritten (closed form)",
    "low_rank_affine": "low-rank affine: new query mapped (closed form)",
    "slerp": "SLERP query blend (old + mapped new query)",
    "old_stored": "old space: φ_o(q)·φ_o(g)",
    "new_stored": "new space: query · new-stored item",
    "cross": "cross: new-side query · old-stored item",
    "v2_stored": "stored under the intermediate version v2",
    "relevant": "✓ same class as the query",
    "irrelevant": "✗ another class",
}

#: The score spaces of :func:`plot_score_distributions`, in legend order.
SPACES: tuple[str, ...] = ("old_stored", "cross", "new_stored")

METRIC_LABELS = {"map": "mAP", "top1": "top-1 accuracy (CMC)", "top5": "top-5 accuracy (CMC)",
                 "negative_flips": "negative-flip rate"}


def color(name: str) -> str:
    """The colour of a model, strategy or score space (grey for unknown names).

    Parameters
    ----------
    name : str
        A key of ``COLORS``: ``"old"``, ``"new"``, a strategy name such as ``"rank_merge"``, or a
        score space (``"old_stored"``, ``"new_stored"``, ``"cross"``).

    Returns
    -------
    str
        A hex colour, e.g. ``"#1f77b4"``; ``"#999999"`` for a name without a colour.
    """
    return COLORS.get(name, "#999999")


def label(name: str) -> str:
    """The legend name of a model, strategy or score space (the name itself when it has none).

    Parameters
    ----------
    name : str
        A key of ``LABELS``: ``"old"``, ``"new"``, a strategy name such as ``"rank_merge"``, or a
        score space.

    Returns
    -------
    str
        E.g. ``"distance rank merge"`` for ``"rank_merge"``.
    """
    return LABELS.get(name, name)


def _check_names(names, what: str = "names") -> list[str]:
    if isinstance(names, str):
        raise TypeError(f"{what} must be a list of names, not the string {names!r}: write [{names!r}]")
    names = list(names)
    unknown = [n for n in names if n not in COLORS]
    if unknown:
        raise ValueError(f"{what} has no colour for {unknown}; choose from: {', '.join(COLORS)}")
    return names


def palette(names=None, by_label: bool = False) -> dict[str, str]:
    """A seaborn palette (``palette=`` argument) for the given models, strategies or spaces.

    Parameters
    ----------
    names : sequence of str, optional
        Keys of ``COLORS``, in the order wanted for ``hue_order``; default every key.
    by_label : bool, default False
        Key the palette by legend name (:func:`label`) instead of by name, for a data frame whose
        hue column holds legend names.

    Returns
    -------
    dict of str to str
        Name (or label) -> hex colour, in the order of ``names``; ``list(palette(names))`` is a
        matching ``hue_order``.

    Raises
    ------
    ValueError
        If a name has no colour.
    TypeError
        If ``names`` is a single string.

    Examples
    --------
    >>> palette(["old", "rank_merge"])
    {'old': '#7f7f7f', 'rank_merge': '#1f77b4'}
    """
    names = list(COLORS) if names is None else _check_names(names)
    return {(label(n) if by_label else n): COLORS[n] for n in names}


def set_book_style() -> None:
    """Set the book's figure style (seaborn's white grid, readable fonts, tight legends).

    Call it once at the top of a chapter; colours still come from :data:`COLORS`, never from the
    style's colour cycle.

    Examples
    --------
    >>> set_book_style()
    """
    import seaborn as sns

    sns.set_theme(context="notebook", style="whitegrid", font_scale=0.9,
                  rc={"figure.dpi": 100, "axes.titlesize": 11, "legend.fontsize": 8, "legend.framealpha": 0.9,
                      "axes.spines.top": False, "axes.spines.right": False, "grid.alpha": 0.4})


def _curves_of(entry, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """(ratios, values per seed) from a BackfillCurve, a list of them, or a results-JSON entry."""
    if isinstance(entry, dict):
        key = f"curve_{metric}"
        if "ratios" not in entry or key not in entry:
            raise ValueError(f"a results entry needs 'ratios' and {key!r}; this one has {sorted(entry)}")
        return np.asarray(entry["ratios"], dtype=float), np.atleast_2d(np.asarray(entry[key], dtype=float))
    curves = entry if isinstance(entry, (list, tuple)) else [entry]
    return np.asarray(curves[0].ratios), np.stack([getattr(c, metric) for c in curves])


def _legend_once(ax, **kwargs):
    """A legend with each label once (the first artist drawn under it)."""
    handles, labels = ax.get_legend_handles_labels()
    seen: dict[str, object] = {}
    for h, lab in zip(handles, labels):
        if not lab.startswith("_"):
            seen.setdefault(lab, h)
    return ax.legend(list(seen.values()), list(seen), **kwargs)


def plot_backfill_curves(curves: dict, metric: str = "map", old_old: float | None = None,
                         new_new: float | None = None, ax=None, title: str | None = None,
                         source: str = "our measurement", percent: bool | None = None,
                         upto: float | None = None, show_seeds: bool = False, legend_loc: str = "below"):
    """Plot backfill curves ``m(r)``, one line per strategy, mean ± std band over seeds.

    Colours, line styles, markers and legend names come from :data:`COLORS`, :data:`LINESTYLES`,
    :data:`MARKERS` and :func:`label`. Every curve, ``offline`` included, is drawn with straight
    segments between the measured ratios, the trapezoids its area (:func:`~backfill_lib.metrics.auc`)
    integrates; the legend sits outside the axes. The legend lists each entry once: the ``old_old`` reference line is
    left out of it when the ``"old"`` strategy is plotted too (they are the same level).

    Parameters
    ----------
    curves : dict
        Strategy name -> a :class:`~backfill_lib.backfill.BackfillCurve`, a list of them (one per
        seed), or a strategy entry of :func:`~backfill_lib.experiment.run_experiment`'s results
        (``result["strategies"][name]``; entries with status ``"n/a"`` are skipped). With
        several seeds the band is ± one standard deviation (ddof = 1).
    metric : {"map", "top1", "top5", "negative_flips"}, default "map"
        Which curve to draw.
    old_old, new_new : float, optional
        Reference levels drawn as dashed lines (in the units of ``metric``, fractions).
    ax : matplotlib Axes, optional
        Where to draw; default a new 6.4 × 4.0 inch figure.
    title : str, optional
        Default ``"<metric> during the backfill (<source>)"``.
    source : str, default "our measurement"
        Shown in the default title so our numbers are never confused with the paper's.
    percent : bool, optional
        Show the y axis in percent (the data stay fractions, the tick labels read ``"3%"``).
        Default: True for ``"negative_flips"`` (the book states flips in percent), else False.
    upto : float, optional
        For a slider frame: draw each curve faint over the whole range, solid up to ratio
        ``upto``, with a dotted vertical line at ``upto``.
    show_seeds : bool, default False
        Also draw every seed's values as × markers (one legend entry, "one seed").
    legend_loc : str, default "below"
        Where the legend goes: ``"below"`` the axes or to the ``"right"`` (outside, never over a
        curve), or a matplotlib location inside the axes (see :func:`outside_legend`).

    Returns
    -------
    matplotlib Axes
        The axes drawn on.

    Raises
    ------
    ValueError
        If ``metric`` is unknown, ``upto`` is outside [0, 1], or a results entry has no curve.
    """
    if metric not in METRIC_LABELS:
        raise ValueError(f"unknown metric {metric!r}; choose one of: {', '.join(METRIC_LABELS)}")
    if upto is not None and not 0.0 <= upto <= 1.0:
        raise ValueError(f"upto must be a backfill ratio in [0, 1], got {upto!r}")
    if percent is None:
        percent = metric == "negative_flips"
    if ax is None:
        _, ax = plt.subplots(figsize=(6.4, 4.0))
    for name, entry in curves.items():
        if isinstance(entry, dict) and entry.get("status") == "n/a":
            continue
        r, v = _curves_of(entry, metric)
        mean = v.mean(axis=0)
        # Every curve, offline included, is drawn as the AUC integrates it: straight lines between
        # the measured ratios (offline's jump is the segment from r = 0.9 to 1).
        style = dict(color=color(name), ls=LINESTYLES.get(name, "-"))
        marker = MARKERS.get(name, "o")
        if upto is None:
            ax.plot(r, mean, marker=marker, ms=4, label=label(name), **style)
        else:
            shown = r <= upto + 1e-9
            ax.plot(r, mean, alpha=0.2, **style)
            ax.plot(r[shown], mean[shown], marker=marker, ms=4, label=label(name), **style)
        if len(v) > 1:
            std = v.std(axis=0, ddof=1)  # the same spread as the "mean ± std" of the results tables
            ax.fill_between(r, mean - std, mean + std, color=color(name), alpha=0.15, lw=0)
        if show_seeds:
            for seed_values in v:   # drawn in the strategy's colour; listed once, in neutral ink, below
                ax.plot(r, seed_values, ls="none", marker="x", ms=4, color=color(name), alpha=0.6)
    if old_old is not None:
        ax.axhline(old_old, ls="--", lw=1, color=color("old"), label="_old/old" if "old" in curves else "old/old")
    if new_new is not None:
        ax.axhline(new_new, ls="--", lw=1, color=color("new"), label="new/new")
    if show_seeds:
        ax.plot([], [], ls="none", marker="x", ms=4, color=INK, label="one seed (×, in its strategy's colour)")
    if upto is not None:
        ax.axvline(upto, ls=":", lw=1, color=GUIDE)
    ax.set_xlabel("backfill ratio r (% of the gallery re-extracted)")
    ax.xaxis.set_major_formatter(PercentFormatter(xmax=1.0, decimals=0))
    ax.set_ylabel(METRIC_LABELS[metric] + (" (% of queries)" if percent else ""))
    if percent:
        ax.yaxis.set_major_formatter(PercentFormatter(xmax=1.0))
    ax.set_xlim(-0.03, 1.03)  # the points at r = 0 and r = 1 (offline's jump ends there) stay in view
    ax.set_title(title or f"{METRIC_LABELS[metric]} during the backfill ({source})")
    ax.grid(alpha=0.3)
    outside_legend(ax, loc=legend_loc)
    return ax


def outside_legend(ax, loc: str = "below", ncol: int | None = None):
    """A legend that never covers data: below the axes (default) or to their right.

    Each label is listed once (the first artist drawn under it).

    Parameters
    ----------
    ax : matplotlib Axes
        The axes whose labelled artists are listed.
    loc : {"below", "right"} or a matplotlib location, default "below"
        ``"below"`` puts the legend under the x-axis label, ``"right"`` beside the axes. Any other
        matplotlib location (``"best"``, ``"upper left"``, ...) places it inside the axes: use
        that only where :func:`figure_problems` confirms the region holds no data.
    ncol : int, optional
        Columns; default 2 below the axes, 1 to the right.

    Returns
    -------
    matplotlib Legend or None
        None when nothing is labelled.
    """
    handles, labels = ax.get_legend_handles_labels()
    if not any(not lab.startswith("_") for lab in labels):
        return None
    if loc == "below":
        return _legend_once(ax, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16),
                            ncol=ncol or 2, frameon=False)
    if loc == "right":
        return _legend_once(ax, fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0),
                            ncol=ncol or 1, frameon=False)
    return _legend_once(ax, fontsize=8, loc=loc, ncol=ncol or 1)


def plot_score_distributions(scores: dict, ax=None, title: str | None = None, kind: str = "hist",
                             bins=None, log: bool = False, source: str = "our measurement"):
    """Histograms (or KDEs) of query–item scores, a hue per score space, relevant vs irrelevant.

    Relevant pairs are drawn as outlines, irrelevant pairs filled, in the colour of their space
    (:data:`SPACES`). A merged ranking is sound when every relevant curve lies right of every
    irrelevant one, whichever space it comes from; rank merge sags because the old-space
    irrelevant scores overlap the new-space relevant ones.

    Parameters
    ----------
    scores : dict
        Space -> ``(relevant_scores, irrelevant_scores)``, two 1-D arrays of inner products
        ``s(a, b) = a·b``. Spaces are keys of :data:`SPACES`: ``"old_stored"`` (φ_o(q)·φ_o(g)),
        ``"cross"`` (a new-side query, e.g. ψ̂(φ_n(q)), against an old-stored item) and
        ``"new_stored"`` (a new-side query against a new-stored item), e.g. from
        :func:`pair_scores`.
    ax : matplotlib Axes, optional
        Where to draw; default a new 6.4 × 3.6 inch figure.
    title : str, optional
        Default ``"Score distributions per space (<source>)"``.
    kind : {"hist", "kde"}, default "hist"
        Seaborn ``histplot`` (density histograms) or ``kdeplot``.
    bins : int or sequence, optional
        Histogram bins; default 80 bins over [-1, 1] (scores of unit vectors).
    log : bool, default False
        Logarithmic density axis (shows the thin tails where rankings go wrong).
    source : str, default "our measurement"
        Shown in the default title.

    Returns
    -------
    matplotlib Axes
        The axes drawn on.

    Raises
    ------
    ValueError
        If a space is unknown, ``kind`` is unknown, ``scores`` is empty, or a score set is empty.
    """
    import seaborn as sns

    if kind not in ("hist", "kde"):
        raise ValueError(f"kind must be 'hist' or 'kde', got {kind!r}")
    if not scores:
        raise ValueError("scores is empty: give {space: (relevant, irrelevant)} for at least one space")
    unknown = [s for s in scores if s not in SPACES]
    if unknown:
        raise ValueError(f"unknown score space {unknown}; choose from: {', '.join(SPACES)}")
    if ax is None:
        _, ax = plt.subplots(figsize=(6.4, 3.6))
    bins = np.linspace(-1, 1, 81) if bins is None else bins
    handles = []
    for space in (s for s in SPACES if s in scores):
        pair = scores[space]
        if len(pair) != 2:
            raise ValueError(f"scores[{space!r}] must be (relevant_scores, irrelevant_scores)")
        for relevant, values in zip((True, False), pair):
            values = np.asarray(values, dtype=float).ravel()
            if values.size == 0:
                raise ValueError(f"scores[{space!r}] has no {'relevant' if relevant else 'irrelevant'} scores")
            c = color(space)
            if kind == "hist":
                sns.histplot(x=values, bins=bins, stat="density", ax=ax, color=c, element="step",
                             fill=not relevant, alpha=1.0 if relevant else 0.25, lw=2 if relevant else 0.8)
            else:
                sns.kdeplot(x=values, ax=ax, color=c, fill=not relevant, alpha=1.0 if relevant else 0.25, lw=2 if relevant else 1,
                            cut=0, warn_singular=False)
            handles.append(Line2D([], [], color=c, lw=2) if relevant
                           else Patch(facecolor=c, alpha=0.35, edgecolor=c))
    names = [f"{label(s)}: {'relevant' if rel else 'irrelevant'}" for s in SPACES if s in scores
             for rel in (True, False)]
    if log:
        ax.set_yscale("log")
    ax.set_xlim(-1, 1)
    ax.set_xlabel("score s(query, stored item) = inner product of unit vectors")
    ax.set_ylabel("density (per unit score)" + (", log scale" if log else ""))
    ax.set_title(title or f"Score distributions per space ({source})")
    ax.legend(handles, names, fontsize=7, loc="upper left")
    return ax


def pair_scores(strategy, labels, n_queries: int = 600, seed: int = 0) -> dict:
    """The scores of relevant and irrelevant (query, stored item) pairs of a strategy, per space.

    Each sampled query is scored against every other item twice: as stored old
    (``strategy.query_old · strategy.gallery_old``) and as stored new
    (``strategy.query_new · strategy.gallery_new``), whatever the backfill ratio; the input of
    :func:`plot_score_distributions`. The old-stored scores are ``"old_stored"`` when the query
    side is the old model itself (``old``, ``offline``, ``rank_merge``) and ``"cross"`` otherwise.

    Parameters
    ----------
    strategy : backfill_lib.backfill.Strategy
        A strategy whose queries are the gallery items (leave-one-out).
    labels : array of int, shape (N,)
        Class labels of the gallery items; relevance is the same label.
    n_queries : int, default 600
        How many queries to sample (all of them if the gallery is smaller).
    seed : int, default 0
        Seed of the query sample.

    Returns
    -------
    dict
        ``{space: (relevant_scores, irrelevant_scores)}`` with spaces ``"old_stored"`` or
        ``"cross"``, and ``"new_stored"``.

    Raises
    ------
    ValueError
        If ``labels`` does not match the gallery, or ``n_queries`` is not positive.
    """
    labels = np.asarray(labels)
    n = len(strategy.gallery_old)
    if labels.shape != (n,):
        raise ValueError(f"labels has shape {labels.shape}, but the gallery has {n} items: give one label per item")
    if len(strategy.query_old) != n:
        raise ValueError("pair_scores needs the queries to be the gallery items (leave-one-out)")
    if n_queries < 1:
        raise ValueError(f"n_queries must be positive, got {n_queries}")
    rows = np.sort(np.random.default_rng(seed).permutation(n)[:n_queries])
    relevant = labels[rows][:, None] == labels[None, :]
    not_self = rows[:, None] != np.arange(n)[None, :]
    pos, neg = relevant & not_self, ~relevant
    old_side = np.asarray(strategy.query_old)[rows] @ np.asarray(strategy.gallery_old).T
    new_side = np.asarray(strategy.query_new)[rows] @ np.asarray(strategy.gallery_new).T
    old_space = "old_stored" if strategy.name in ("old", "offline", "rank_merge") else "cross"
    return {old_space: (old_side[pos], old_side[neg]), "new_stored": (new_side[pos], new_side[neg])}


def _readable_cell_text(ax, values, cmap: str = "viridis") -> None:
    """Give each heatmap annotation the ink (INK or white) that reads best on its cell's colour."""
    cm = plt.get_cmap(cmap)
    values = np.asarray(values, dtype=float)
    for t in ax.texts:
        x, y = t.get_position()
        r, c = int(np.floor(y)), int(np.floor(x))
        if 0 <= r < values.shape[0] and 0 <= c < values.shape[1] and np.isfinite(values[r, c]):
            bg = cm(float(np.clip(values[r, c], 0.0, 1.0)))
            t.set_color(INK if contrast_ratio(INK, bg) >= contrast_ratio("white", bg) else "white")


def plot_cross_model_matrix(matrix, query_models, gallery_models=None, ax=None, title: str | None = None,
                            metric: str = "mAP", fmt: str = ".3f", source: str = "our measurement",
                            tick_labels: dict | None = None):
    """Seaborn heatmap of a cross-model retrieval matrix: query model (rows) × gallery model (columns).

    Cell ``(i, j)`` is the retrieval quality when queries are embedded by ``query_models[i]`` and
    the gallery by ``gallery_models[j]``; the diagonal is each model on its own. A NaN cell (the
    embeddings cannot be compared, e.g. different sizes) is left blank and annotated ``"n/a"``.

    Parameters
    ----------
    matrix : array-like, shape (n_query_models, n_gallery_models)
        The values, in [0, 1] (NaN for pairs that cannot be compared).
    query_models : sequence of str
        Row names (keys of :data:`COLORS` colour the tick labels).
    gallery_models : sequence of str, optional
        Column names; default ``query_models``.
    ax : matplotlib Axes, optional
        Where to draw; default a new figure sized to the matrix.
    title : str, optional
        Default ``"Cross-model <metric> (<source>)"``.
    metric : str, default "mAP"
        Name of the value, for the colour bar and the title.
    fmt : str, default ".3f"
        Format of the annotations.
    source : str, default "our measurement"
        Shown in the default title.
    tick_labels : dict of str to str, optional
        Display names of the models, e.g. ``{"new": "new φ_n"}``; default the names themselves.

    Returns
    -------
    matplotlib Axes
        The axes drawn on.

    Raises
    ------
    ValueError
        If the matrix is not 2-D or its shape does not match the model names.
    """
    import seaborn as sns

    m = np.asarray(matrix, dtype=float)
    query_models = list(query_models)
    gallery_models = query_models if gallery_models is None else list(gallery_models)
    if m.ndim != 2 or m.shape != (len(query_models), len(gallery_models)):
        raise ValueError(f"matrix has shape {m.shape}, but there are {len(query_models)} query models and "
                         f"{len(gallery_models)} gallery models: give one row per query model, one column per "
                         "gallery model")
    names = tick_labels or {}
    if ax is None:
        _, ax = plt.subplots(figsize=(1.3 * len(gallery_models) + 2.2, 0.8 * len(query_models) + 1.4))
    annot = np.array([["n/a" if np.isnan(v) else format(v, fmt) for v in row] for row in m])
    sns.heatmap(m, ax=ax, annot=annot, fmt="", cmap="viridis", vmin=0.0, vmax=1.0, square=False,
                linewidths=0.5, linecolor="white", cbar_kws={"label": metric}, mask=np.isnan(m),
                xticklabels=[names.get(g, g) for g in gallery_models],
                yticklabels=[names.get(q, q) for q in query_models])
    _readable_cell_text(ax, m)
    for tick, name in zip(ax.get_xticklabels(), gallery_models):
        tick.set_color(color(name) if name in COLORS else "black")
    for tick, name in zip(ax.get_yticklabels(), query_models):
        tick.set_color(color(name) if name in COLORS else "black")
        tick.set_rotation(0)
    for (i, j), v in np.ndenumerate(m):  # seaborn skips masked cells; say why they are empty
        if np.isnan(v):
            ax.text(j + 0.5, i + 0.5, "n/a", ha="center", va="center", fontsize=9, color="#555555")
    ax.set_xlabel("gallery embedded by")
    ax.set_ylabel("query embedded by")
    ax.set_title(title or f"Cross-model {metric} ({source})")
    return ax


# --- The strategy diagram -------------------------------------------------------------------------
# Symbols are matplotlib mathtext, so φ_o renders as a subscript: PHI_O, PHI_N, PSI, RHO, H below.

PHI_O, PHI_N = r"$\varphi_o$", r"$\varphi_n$"
_PSI_Q, _RHO_Q = r"$\hat\psi(\varphi_n(q))$", r"$\hat\rho(\varphi_n(q))$"
_OLD_Q, _NEW_Q = r"$\varphi_o(q)$", r"$\varphi_n(q)$"


@dataclass(frozen=True)
class _Lane:
    """One comparison: the query vector a strategy computes and the stored vectors it meets."""
    backbone: str               # PHI_O or PHI_N
    head: str | None            # r"$\hat\psi$", r"$\hat\rho$" or None
    query_vector: str           # e.g. _PSI_Q
    note: str = ""              # under the arrow, e.g. "until r = 1"
    incompatible: bool = False  # drawn red and dashed


@dataclass(frozen=True)
class _Diagram:
    stored_old: str                 # what a not-yet-backfilled item stores
    stored_new: str | None          # what a backfilled item stores (None: nothing is backfilled)
    old_lane: _Lane | None          # the comparison with not-yet-backfilled items
    new_lane: _Lane | None          # the comparison with backfilled items
    passes: str                     # backbone passes per query, in words
    ranking: str                    # how the two parts become one ranking
    trained: str = ""               # what training made it work


_BACKBONE_MODEL = {PHI_O: "old", PHI_N: "new"}
_PSI, _RHO = r"$\hat\psi$", r"$\hat\rho$"
_STORED_OLD, _STORED_NEW = r"$\varphi_o(g)$", r"$\varphi_n(g)$"
_ONE_NEW = r"1 backbone pass ($\varphi_n$)"

_MCT = dict(stored_old=_STORED_OLD, stored_new=r"$\hat\rho(\varphi_n(g))$", old_lane=_Lane(PHI_N, _PSI, _PSI_Q),
            new_lane=_Lane(PHI_N, _RHO, _RHO_Q), passes=_ONE_NEW + r" + heads $\psi$, $\rho$",
            ranking="one ranking by score (spaces made comparable)")

#: What every strategy stores and computes, drawn by :func:`plot_strategy_diagram`.
DIAGRAMS: dict = {  # name -> _Diagram (a private record)
    "old": _Diagram(_STORED_OLD, None, _Lane(PHI_O, None, _OLD_Q), None,
                    r"1 backbone pass ($\varphi_o$)", "no upgrade: the new model is never used"),
    "offline": _Diagram(_STORED_OLD, _STORED_NEW, _Lane(PHI_O, None, _OLD_Q, note="while r < 1"),
                        _Lane(PHI_N, None, _NEW_Q, note="from r = 1 on"),
                        r"1 backbone pass ($\varphi_o$, then $\varphi_n$)", "switch at r = 1; new vectors unused before"),
    "new_on_old": _Diagram(_STORED_OLD, _STORED_NEW, _Lane(PHI_N, None, _NEW_Q, note="incompatible", incompatible=True),
                           _Lane(PHI_N, None, _NEW_Q), _ONE_NEW, "one ranking by score (old part: noise)"),
    "bct": _Diagram(_STORED_OLD, _STORED_NEW, _Lane(PHI_N, None, _NEW_Q, note="compatible by training"),
                    _Lane(PHI_N, None, _NEW_Q), _ONE_NEW, "one ranking by score",
                    trained=r"$\varphi_n$ trained with BCT's influence loss"),
    "ra_bct": _Diagram(_STORED_OLD, _STORED_NEW, _Lane(PHI_N, None, _NEW_Q, note="compatible by training"),
                       _Lane(PHI_N, None, _NEW_Q), _ONE_NEW, "one ranking by score",
                       trained=r"$\varphi_n$ trained with InfoNCE towards $\varphi_o$"),
    "bct_pseudo": _Diagram(_STORED_OLD, _STORED_NEW, _Lane(PHI_N, None, _NEW_Q, note="compatible by training"),
                           _Lane(PHI_N, None, _NEW_Q), _ONE_NEW, "one ranking by score",
                           trained=r"$\varphi_n$ trained through $\varphi_o$'s class means, all classes"),
    "rank_merge_calibrated": _Diagram(_STORED_OLD, _STORED_NEW, _Lane(PHI_O, None, _OLD_Q), _Lane(PHI_N, None, _NEW_Q),
                                      r"2 backbone passes ($\varphi_o$ and $\varphi_n$)",
                                      "merge by calibrated scores (one map per space)",
                                      trained="no training: a score map per space, fitted on training pairs"),
    "rank_merge": _Diagram(_STORED_OLD, _STORED_NEW, _Lane(PHI_O, None, _OLD_Q), _Lane(PHI_N, None, _NEW_Q),
                           r"2 backbone passes ($\varphi_o$ and $\varphi_n$)", "merge the two ranked lists by score"),
    "reverse_transform": _Diagram(_STORED_OLD, _STORED_NEW, _Lane(PHI_N, _PSI, _PSI_Q), _Lane(PHI_N, None, _NEW_Q),
                                  _ONE_NEW + r" + head $\psi$", "one ranking by score",
                                  trained=r"$\psi$: new $\to$ old, trained with $L_{rt}$"),
    "forward_transform": _Diagram(r"$\hat h(\varphi_o(g))$", _STORED_NEW, _Lane(PHI_N, None, _NEW_Q),
                                  _Lane(PHI_N, None, _NEW_Q), _ONE_NEW, "one ranking by score",
                                  trained=r"$h$: old $\to$ new, applied once to the stored $\varphi_o(g)$"),
    "mct": _Diagram(trained=r"$\psi$, $\rho$ trained with $L_{mc}$, negatives from both spaces", **_MCT),
    "mct_old_neg": _Diagram(trained=r"ablation: $L_{mc}$ with old-stored negatives only", **_MCT),
    "mct_new_neg": _Diagram(trained=r"ablation: $L_{mc}$ with new-stored negatives only", **_MCT),
    "mct_no_rho": _Diagram(_STORED_OLD, _STORED_NEW, _Lane(PHI_N, _PSI, _PSI_Q), _Lane(PHI_N, None, _NEW_Q),
                           _ONE_NEW + r" + head $\psi$", "one ranking by score (spaces made comparable)",
                           trained=r"ablation: $\psi$ trained with $L_{mc}$, $\rho$ = identity"),
    "procrustes": _Diagram(_STORED_OLD, _STORED_NEW, _Lane(PHI_N, r"$P$", r"$\hat P(\varphi_n(q))$"),
                           _Lane(PHI_N, None, _NEW_Q), _ONE_NEW + r" + a matrix $P$", "one ranking by score",
                           trained=r"$P$: new $\to$ old, orthogonal Procrustes on training pairs, no labels"),
    "low_rank_affine": _Diagram(_STORED_OLD, _STORED_NEW, _Lane(PHI_N, r"$A$", r"$\hat A(\varphi_n(q))$"),
                                _Lane(PHI_N, None, _NEW_Q), _ONE_NEW + r" + an affine map $A$", "one ranking by score",
                                trained=r"$A$: new $\to$ old, least squares on training pairs, no labels"),
    "procrustes_forward": _Diagram(r"$\hat P(\varphi_o(g))$", _STORED_NEW, _Lane(PHI_N, None, _NEW_Q),
                                   _Lane(PHI_N, None, _NEW_Q), _ONE_NEW, "one ranking by score",
                                   trained=r"$P$: old $\to$ new, Procrustes, applied once to the stored $\varphi_o(g)$"),
    "slerp": _Diagram(_STORED_OLD, _STORED_NEW, _Lane(PHI_O, r"$S$", r"$S(q)$"),
                      _Lane(PHI_N, None, _NEW_Q), r"2 backbone passes ($\varphi_o$ and $\varphi_n$)",
                      "one ranking by score",
                      trained=r"$S$: half-way on the sphere from $\varphi_o(q)$ to $\hat P(\varphi_n(q))$ (Procrustes)"),
    "offline_rho": _Diagram(r"$\hat\rho_{ref}(\varphi_n(g))$", None,
                            _Lane(PHI_N, _RHO, r"$\hat\rho_{ref}(\varphi_n(q))$", note="every item at once"), None,
                            _ONE_NEW + r" + head $\rho_{ref}$",
                            "reference, not a backfill: the whole gallery re-embedded at once",
                            trained=r"$\rho_{ref}$: mct's head and budget, new-space term of $L_{mc}$ only"),
}

# Layout of a diagram, in axes coordinates (x, y in [0, 1]).
_Y_OLD, _Y_NEW, _Y_MID = 0.62, 0.30, 0.46
# The stored boxes end at 0.975, not 1: a box edge on the axes border is clipped.
_X_QUERY, _X_BACKBONE, _X_HEAD, _X_ARROW_END, _X_STORE = 0.06, 0.215, 0.37, 0.625, 0.80
_W_STORE, _H_STORE = 0.35, 0.2
_FONT = 11


def _box(ax, x, y, text, w, h, face, edge=None, text_color="black", lw=1.2, ls="-", size=_FONT):
    ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.01,rounding_size=0.02",
                                facecolor=face, edgecolor=edge or face, lw=lw, ls=ls, transform=ax.transAxes))
    ax.text(x, y, text, ha="center", va="center", fontsize=size, color=text_color, transform=ax.transAxes)


def _arrow(ax, start, end, c="#333333", ls="-", lw=1.3):
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=12, color=c, lw=lw, ls=ls,
                                 transform=ax.transAxes, shrinkA=0, shrinkB=0))


def plot_strategy_diagram(strategy: str, ax=None):
    """Draw what a strategy stores and computes: the book's picture of each method.

    On the right, the gallery: what a not-yet-backfilled item (``g ∉ B_r``, dashed frame) and a
    backfilled item (``g ∈ B_r``, solid frame) store. On the left, the query: which backbone(s)
    it runs (φ_o in the old model's grey, φ_n in the new model's black) and which heads (ψ̂, ρ̂,
    framed in the strategy's colour). Each arrow is one comparison, labelled with the query
    vector and scored by ``s = a·b`` against the stored vector it points at. The header gives the
    backbone passes per query and what training the strategy needs; the footer how the two
    parts become one ranking. Sized 6 × 3 inches, readable at phone width.

    Parameters
    ----------
    strategy : str
        A strategy name, a key of :data:`DIAGRAMS` (every strategy of
        :data:`~backfill_lib.strategies.STRATEGY_REGISTRY`): ``"old"``, ``"offline"``,
        ``"new_on_old"``, ``"bct"``, ``"ra_bct"``, ``"rank_merge"``, ``"reverse_transform"``,
        ``"forward_transform"``, ``"mct"`` and the ablations ``"mct_old_neg"``, ``"mct_new_neg"``,
        ``"mct_no_rho"``, and the reference ``"offline_rho"``.
    ax : matplotlib Axes, optional
        Where to draw; default a new 6 × 3 inch figure.

    Returns
    -------
    matplotlib Axes
        The axes drawn on (axis lines off); the title is the strategy's legend name.

    Raises
    ------
    ValueError
        If ``strategy`` has no diagram; the message lists the choices.

    Examples
    --------
    >>> ax = plot_strategy_diagram("rank_merge")
    >>> ax.get_title()
    'distance rank merge'
    """
    if strategy not in DIAGRAMS:
        raise ValueError(f"no diagram for strategy {strategy!r}; choose from: {', '.join(DIAGRAMS)}")
    d = DIAGRAMS[strategy]
    if ax is None:
        _, ax = plt.subplots(figsize=(6.0, 3.0))
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.axis("off")
    c = color(strategy)

    # The query image and the backbone(s) it runs: one box in the middle, or one per lane.
    lanes = {y: lane for y, lane in ((_Y_OLD, d.old_lane), (_Y_NEW, d.new_lane)) if lane is not None}
    backbones = {lane.backbone for lane in lanes.values()}
    backbone_y = ({backbones.pop(): _Y_MID} if len(backbones) == 1
                  else {lane.backbone: y for y, lane in lanes.items()})
    _box(ax, _X_QUERY, _Y_MID, "query\nimage\n$q$", 0.1, 0.26, "white", edge="#333333", size=_FONT - 2)
    for name, y in backbone_y.items():
        _box(ax, _X_BACKBONE, y, name, 0.08, 0.12, color(_BACKBONE_MODEL[name]), text_color="white",
             size=_FONT + 2)
        _arrow(ax, (_X_QUERY + 0.055, _Y_MID), (_X_BACKBONE - 0.045, y))

    # The gallery: what each part stores.
    _box(ax, _X_STORE, _Y_OLD, f"not backfilled ($g \\notin B_r$)\nstores {d.stored_old}", _W_STORE, _H_STORE,
         "white", edge=color("old_stored"), lw=2.2, ls="--", size=_FONT - 1)
    if d.stored_new is None:
        _box(ax, _X_STORE, _Y_NEW, "nothing is backfilled", _W_STORE, _H_STORE, "#f2f2f2", edge="#bbbbbb",
             text_color="#666666", ls=":", size=_FONT - 1)
    else:
        _box(ax, _X_STORE, _Y_NEW, f"backfilled ($g \\in B_r$)\nstores {d.stored_new}", _W_STORE, _H_STORE,
             "white", edge=color("new_stored"), lw=2.2, size=_FONT - 1)

    # One arrow per comparison, from the query vector to the stored vectors it is scored against.
    for y, lane in lanes.items():
        x, y0 = _X_BACKBONE + 0.045, backbone_y[lane.backbone]
        if lane.head is not None:
            _arrow(ax, (x, y0), (_X_HEAD - 0.03, y))
            _box(ax, _X_HEAD, y, lane.head, 0.05, 0.11, "white", edge=c, lw=2, size=_FONT + 1)
            x, y0 = _X_HEAD + 0.03, y
        arrow_c = color("new_on_old") if lane.incompatible else c
        _arrow(ax, (x, y0), (_X_ARROW_END, y), c=arrow_c, ls="--" if lane.incompatible else "-", lw=2)
        xm = (max(x, _X_HEAD) + _X_ARROW_END) / 2
        if abs(y - y0) < 1e-9:      # a level arrow: the label above it, the note below
            ax.text(xm, y + 0.04, lane.query_vector, ha="center", va="bottom", fontsize=_FONT,
                    transform=ax.transAxes)
            if lane.note:
                ax.text(xm, y - 0.045, lane.note, ha="center", va="top", fontsize=_FONT - 2, style="italic",
                        color=arrow_c, transform=ax.transAxes)
        else:                       # a slanted arrow: labels in the two corners the line leaves free
            # (a rising arrow leaves its upper left and lower right free, a falling one its lower
            # left: the label goes outside the gap between two lanes, a note of the upper lane in it)
            y_at = y0 + (y - y0) * (xm - x) / (_X_ARROW_END - x)
            if y > y0:
                ax.text(xm, y_at + 0.05, lane.query_vector, ha="right", va="bottom", fontsize=_FONT,
                        transform=ax.transAxes)
                note_at, note_ha = (xm, y_at - 0.05), "left"
            else:
                ax.text(xm, y_at - 0.05, lane.query_vector, ha="right", va="top", fontsize=_FONT,
                        transform=ax.transAxes)
                note_at, note_ha = (xm, y_at - 0.13), "right"
            if lane.note:
                ax.text(*note_at, lane.note, ha=note_ha, va="top", fontsize=_FONT - 2, style="italic",
                        color=arrow_c, transform=ax.transAxes)

    header = d.passes + " per query" + (f"\n{d.trained}" if d.trained else "")
    ax.text(0.5, 0.97, header, ha="center", va="top", fontsize=_FONT - 1.5, color="#222222", transform=ax.transAxes)
    ax.text(0.5, 0.03, f"arrow: score s = query vector · stored vector\n{d.ranking}", ha="center", va="bottom",
            fontsize=_FONT - 2, color="#444444", transform=ax.transAxes)
    ax.set_title(label(strategy), fontsize=_FONT + 1, color="black", pad=2)
    return ax


def plot_strategy_diagrams(names, ncols: int = 2):
    """Strategy diagrams side by side, one :func:`plot_strategy_diagram` per name.

    Parameters
    ----------
    names : sequence of str
        Strategy names (keys of :data:`DIAGRAMS`), in reading order.
    ncols : int, default 2
        Diagrams per row; 1 stacks them (best on a phone).

    Returns
    -------
    matplotlib Figure
        The grid, 6 × 3 inches per diagram.

    Raises
    ------
    ValueError
        If ``names`` is empty, a name has no diagram, or ``ncols`` is not positive.
    TypeError
        If ``names`` is a single string.
    """
    if isinstance(names, str):
        raise TypeError(f"names must be a list of strategy names, not the string {names!r}: write [{names!r}]")
    names = list(names)
    if not names:
        raise ValueError("names is empty: give at least one strategy name")
    unknown = [n for n in names if n not in DIAGRAMS]
    if unknown:
        raise ValueError(f"no diagram for {unknown}; choose from: {', '.join(DIAGRAMS)}")
    if ncols < 1:
        raise ValueError(f"ncols must be a positive number of columns, got {ncols}")
    ncols = min(ncols, len(names))
    nrows = -(-len(names) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.0 * ncols, 3.2 * nrows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        plot_strategy_diagram(name, ax=ax)
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    fig.tight_layout()
    return fig


def show_image(ax, image, stored: str | None = None, correct: bool | None = None, title: str | None = None):
    """Show one dataset image without ticks, optionally framed as stored-old / stored-new and marked ✓ / ✗.

    The frame of a gallery item says what the gallery stores for it: a dashed frame in
    ``COLORS["old_stored"]`` for a not-yet-backfilled item, a solid one in ``COLORS["new_stored"]``
    for a backfilled item (the colours of :func:`plot_strategy_diagram`).

    Parameters
    ----------
    ax : matplotlib Axes
        Where to draw.
    image : array-like, shape (C, H, W) or (H, W)
        One image as the datasets give it (a tensor works too): 1 channel is drawn in grey, 3
        channels as colour, rescaled to [0, 1].
    stored : {"old_stored", "new_stored"}, optional
        Frame the image as an item stored old or new; default no frame colour.
    correct : bool, optional
        Append ✓ (True) or ✗ (False) to the title.
    title : str, optional
        Text above the image, e.g. its class.

    Returns
    -------
    matplotlib Axes
        The axes drawn on.

    Raises
    ------
    ValueError
        If ``image`` does not have 1 or 3 channels, or ``stored`` is unknown.
    """
    x = np.asarray(image, dtype=np.float32)
    if x.ndim == 3 and x.shape[0] == 1:
        x = x[0]
    if x.ndim == 3 and x.shape[0] == 3:
        x = x.transpose(1, 2, 0)
        x = (x - x.min()) / (x.max() - x.min() + 1e-8)
    elif x.ndim != 2:
        raise ValueError(f"image must have shape (1, H, W), (3, H, W) or (H, W), got {np.shape(image)}")
    if stored not in (None, "old_stored", "new_stored"):
        raise ValueError(f"stored must be 'old_stored', 'new_stored' or None, got {stored!r}")
    ax.imshow(x, cmap="gray_r" if x.ndim == 2 else None)
    ax.set_xticks([])
    ax.set_yticks([])
    if stored is not None:
        for spine in ax.spines.values():
            spine.set_visible(True)
            spine.set_edgecolor(color(stored))
            spine.set_linewidth(3)
            spine.set_linestyle("--" if stored == "old_stored" else "-")
    text = " ".join(t for t in (title, {True: "✓", False: "✗", None: None}[correct]) if t)
    if text:
        ax.set_title(text, fontsize=8)
    return ax


# --- Images: a query and its results, and what a model confuses ----------------------------------

def _as_image_stack(images, name: str) -> np.ndarray:
    """``images`` as a float (n, C, H, W) array, C in {1, 3}, from (n, H, W), (n, 1, H, W) or (n, 3, H, W)."""
    if hasattr(images, "detach"):  # torch.Tensor, without importing torch here
        images = images.detach().cpu().numpy()
    x = np.asarray(images)
    if x.dtype == object or x.dtype == bool or not np.issubdtype(x.dtype, np.number) \
            or np.issubdtype(x.dtype, np.complexfloating):
        raise TypeError(f"{name} must be an array of real numbers, got dtype {x.dtype}")
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or x.shape[1] not in (1, 3) or 0 in x.shape:
        raise ValueError(f"{name} must have shape (n, H, W), (n, 1, H, W) or (n, 3, H, W) with n, H, W > 0, "
                         f"got {np.shape(images)}")
    x = x.astype(np.float64)
    if not np.isfinite(x).all():
        raise ValueError(f"{name} holds NaN or infinity")
    return x


def _as_ids(ids, name: str, n: int) -> np.ndarray:
    """Gallery ids as an int64 array (any shape), each in 0 .. n - 1."""
    if hasattr(ids, "detach"):
        ids = ids.detach().cpu().numpy()
    a = np.asarray(ids)
    if a.dtype == bool or not np.issubdtype(a.dtype, np.integer):
        raise TypeError(f"{name} must hold integer gallery ids, got dtype {a.dtype}")
    bad = a[(a < 0) | (a >= n)]
    if bad.size:
        raise ValueError(f"{name} has ids out of range {np.unique(bad)[:5].tolist()}: the gallery has {n} "
                         f"items (ids 0 .. {n - 1})")
    return a.astype(np.int64)


def _check_class_names(class_names, max_label: int, name: str = "class_names") -> list[str] | None:
    if class_names is None:
        return None
    if isinstance(class_names, str):
        raise TypeError(f"{name} must be a list of names, one per class, not the string {class_names!r}")
    names = [str(c) for c in class_names]
    if len(names) <= max_label:
        raise ValueError(f"{name} has {len(names)} names, but the labels go up to {max_label}: give one name "
                         "per class, indexed by label")
    return names


def _wrap_name(text: str, width: int) -> str:
    """Break a class name longer than ``width`` characters over two lines, after a '/' or at a space.

    The break nearest the middle is taken; a name with no such place stays on one line.
    """
    if len(text) <= width:
        return text
    cuts = [i + 1 for i, ch in enumerate(text) if ch == "/"] + [i for i, ch in enumerate(text) if ch == " "]
    if not cuts:
        return text
    cut = min(cuts, key=lambda i: abs(i - len(text) / 2))
    return text[:cut].rstrip() + "\n" + text[cut:].lstrip()


def plot_query_results(images, labels, query, rankings: dict, k: int = 8, class_names=None,
                       denormalize=None, title: str | None = None, width: float = 6.0):
    """A query image and its top-``k`` results under each model: one row per model.

    The query is drawn once, on the left. Each row shows one model's top-``k`` gallery images,
    best first, each framed in ``COLORS["relevant"]`` and marked ✓ when its label is the query's,
    framed in ``COLORS["irrelevant"]`` and marked ✗ when it is not (the symbol carries the meaning
    without colour); the class name is written under every image. Above each row: the model's
    legend name (:func:`label`, in its colour from :data:`COLORS` when it has one) and its
    precision@k, the share of the ``k`` results that are relevant.

    Display of the pixels: with ``denormalize=None`` the images shown (the query and every result)
    are rescaled together, by one minimum and one maximum over all of them, to [0, 1]. The datasets
    standardise with one mean and std per dataset (or per channel), an affine map, so this undoes
    the standardisation up to contrast and keeps the brightness of the images comparable; no
    image is stretched on its own. Give ``denormalize`` to map the stored values back exactly
    (e.g. ``lambda x: x * std + mean``); its output is clipped to [0, 1]. One-channel images are
    drawn with the ``gray_r`` colour map (0 is white), as :func:`show_image` draws them: digits
    appear as dark ink, Fashion-MNIST's items (stored as negatives, background 0) as dark
    products on white, as in the original shop photos.

    Parameters
    ----------
    images : array-like, shape (n, H, W), (n, 1, H, W) or (n, 3, H, W)
        The gallery's images as the dataset gives them (a tensor works too), e.g.
        ``data.test.tensors[0]``; 8 × 8 digits, 28 × 28 Fashion-MNIST or RGB images.
    labels : array-like of int, shape (n,)
        The class of every gallery image; relevance is the same class as the query.
    query : int or (image, label)
        The query: the index of a gallery image (the book's leave-one-out protocol, as
        :func:`~backfill_lib.retrieval.search` with ``exclude_self=True``; it must not appear in
        its own results), or a pair of an image of shape (H, W), (1, H, W) or (3, H, W) and its
        label, for a query from outside the gallery.
    rankings : dict of str to array-like of int
        Model name -> that model's ranking of the gallery for this query: gallery ids (indices into
        ``images``), best first, at least ``k`` of them, e.g. ``{"old": ids_old[q], "new":
        ids_new[q]}``. One row per entry, in the dict's order; names with a legend name
        (``"old"``, ``"new"``, a strategy) are shown by it, others as given.
    k : int, default 8
        Results shown per model; 8 fit a 6-inch-wide figure.
    class_names : sequence of str, optional
        Name of each class, indexed by label (e.g. ``FASHION_MNIST_CLASSES``); default the label
        numbers.
    denormalize : callable, optional
        Maps one stored image, an array of shape (C, H, W), to displayable values in [0, 1];
        default one shared min/max rescaling (see above).
    title : str, optional
        Default ``"A query and its top <k> results per model (✓ same class, ✗ another class)"``.
    width : float, default 6.0
        Figure width in inches (6 reads on a phone); the height follows from the number of rows.

    Returns
    -------
    matplotlib Figure
        The figure. ``fig.axes`` are the query's axes, then ``k`` axes per model, row by row;
        each result's axes title is its rank and symbol (``"1 ✓"``), its x label the class name.

    Raises
    ------
    TypeError
        If ``rankings`` is not a dict, ids or labels are not integers, ``query`` is neither an
        index nor an (image, label) pair, or ``denormalize`` is not callable.
    ValueError
        If ``images`` has the wrong shape, ``labels`` does not match it, ``rankings`` is empty, a
        ranking is not 1-D, has ids out of range, repeats an id in its top ``k`` or contains the
        query itself, ``k`` is larger than a ranking, ``class_names`` is too short, or
        ``denormalize`` changes an image's shape.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> fig = plot_query_results(rng.uniform(size=(20, 8, 8)), np.arange(20) % 2, query=0,
    ...                          rankings={"old": [1, 2, 3, 4], "new": [2, 4, 6, 8]}, k=4)
    >>> [ax.get_title() for ax in fig.axes[5:9]]
    ['1 ✓', '2 ✓', '3 ✓', '4 ✓']
    """
    x = _as_image_stack(images, "images")
    n = len(x)
    y = as_labels(labels, "labels", n=n)
    if isinstance(query, (int, np.integer)) and not isinstance(query, bool):
        if not 0 <= query < n:
            raise ValueError(f"query={query} is out of range: images has {n} items (ids 0 .. {n - 1})")
        q_image, q_label, q_id = x[int(query)], int(y[query]), int(query)
    elif isinstance(query, (tuple, list)) and len(query) == 2:
        q_image = _as_image_stack(np.asarray(query[0])[None], "query's image")[0]
        q_label, q_id = int(as_labels([query[1]], "query's label")[0]), None
    else:
        raise TypeError(f"query must be a gallery index or an (image, label) pair, got {type(query).__name__}")
    if not isinstance(rankings, dict):
        raise TypeError(f"rankings must be a dict {{model name: gallery ids}}, got {type(rankings).__name__}")
    if not rankings:
        raise ValueError("rankings is empty: give {model name: gallery ids, best first} for at least one model")
    k = check_k(k, n - (q_id is not None), name="k")
    tops = {}
    for name, ids in rankings.items():
        what = f"rankings[{name!r}]"
        ids = _as_ids(ids, what, n)
        if ids.ndim != 1:
            raise ValueError(f"{what} must be one ranking (1-D gallery ids), got shape {ids.shape}; for the ids "
                             "of all queries, pass the query's row: ids[query]")
        if len(ids) < k:
            raise ValueError(f"k={k} is larger than {what} ({len(ids)} ids): ask for at most {len(ids)}")
        top = ids[:k]
        check_no_repeats(top, what, "a ranking lists each gallery item once")
        if q_id is not None and q_id in top:
            raise ValueError(f"{what} contains the query itself (id {q_id}) in its top {k}: rank the gallery "
                             "without the query (search(..., exclude_self=True))")
        tops[name] = top
    names = _check_class_names(class_names, int(max(y.max(), q_label)))
    if denormalize is not None and not callable(denormalize):
        raise TypeError(f"denormalize must be a function of one image (C, H, W), got {type(denormalize).__name__}")

    # The pixels to show: one shared min/max rescaling, or the caller's denormalize.
    shown = [q_image] + [x[i] for top in tops.values() for i in top]
    if denormalize is None:
        lo, hi = min(im.min() for im in shown), max(im.max() for im in shown)
        scale = (lambda im: (im - lo) / (hi - lo)) if hi > lo else (lambda im: np.zeros_like(im))
    else:
        def scale(im):
            out = np.asarray(denormalize(im.copy()), dtype=np.float64)
            if out.shape != im.shape:
                raise ValueError(f"denormalize must keep an image's shape {im.shape}, returned {out.shape}")
            return np.clip(out, 0.0, 1.0)

    # Layout in inches: the query on the left, then k results per row, each row with a header.
    k_cols, rows = k, len(tops)
    left, right, gap_query, gap = 0.08, 0.08, 0.32, 0.1
    query_scale = 1.5  # the query is drawn 1.5 times as large as a result
    side = (width - left - right - gap_query - (k_cols - 1) * gap) / (k_cols + query_scale)
    head, foot, top_margin = 0.44, 0.3, 0.3   # row label + rank line; class name (two lines); title
    pitch = head + side + foot
    height = top_margin + rows * pitch + 0.04
    fig = plt.figure(figsize=(width, height))

    def axes_at(x0, y0, w, h):  # inches from the bottom left -> a new axes
        return fig.add_axes((x0 / width, y0 / height, w / width, h / height))

    font = 7.5
    chars = max(4, int((side + gap) * 72 / (font * 0.56)))  # how many characters fit under an image

    def class_name(lab: int) -> str:
        return _wrap_name(names[lab] if names is not None else str(lab), chars)

    def draw(ax, im):
        im = scale(im)
        if im.shape[0] == 1:
            ax.imshow(im[0], cmap="gray_r", vmin=0.0, vmax=1.0)
        else:
            ax.imshow(im.transpose(1, 2, 0))
        ax.set_xticks([])
        ax.set_yticks([])

    q_side = min(query_scale * side, rows * pitch - head - foot)
    images_bottom = 0.04 + foot                       # bottom of the last row's images
    images_top = height - top_margin - head           # top of the first row's images
    q_ax = axes_at(left, (images_bottom + images_top - q_side) / 2, q_side, q_side)
    draw(q_ax, q_image)
    for spine in q_ax.spines.values():  # a plain frame: the query is neither relevant nor not
        spine.set_visible(True)
        spine.set_edgecolor("#333333")
        spine.set_linewidth(1.0)
    q_ax.set_title("query", fontsize=9, fontweight="bold")
    q_ax.set_xlabel(class_name(q_label), fontsize=font + 1)
    x_results = left + query_scale * side + gap_query
    for row, (name, top) in enumerate(tops.items()):
        y0 = height - top_margin - row * pitch - head - side
        relevant = y[top] == q_label
        hits = int(relevant.sum())
        for j, (item, rel) in enumerate(zip(top, relevant)):
            ax = axes_at(x_results + j * (side + gap), y0, side, side)
            draw(ax, x[item])
            c = color("relevant" if rel else "irrelevant")
            for spine in ax.spines.values():
                spine.set_visible(True)
                spine.set_edgecolor(c)
                spine.set_linewidth(2.5)
            ax.set_title(f"{j + 1} {'✓' if rel else '✗'}", fontsize=8, color=c, fontweight="bold", pad=2)
            ax.set_xlabel(class_name(int(y[item])), fontsize=font, labelpad=2)
            if j == 0:
                ax.annotate(f"{label(name)}: precision@{k} = {hits / k:.2f} ({hits} of {k} relevant)",
                            xy=(0, 1), xycoords="axes fraction", xytext=(0, 15), textcoords="offset points",
                            ha="left", va="bottom", fontsize=9, fontweight="bold",
                            color=color(name) if name in COLORS else "black")
    fig.suptitle(title or f"A query and its top {k} results per model (✓ same class, ✗ another class)",
                 x=0.5, y=1 - 0.06 / height, va="top", fontsize=10.5)
    return fig


def topk_class_shares(ids, gallery_labels, query_labels, k: int, query_classes=None,
                      num_classes: int | None = None) -> np.ndarray:
    """The share of each class among the top-``k`` results, averaged over the queries of each class.

    Row ``i`` is query class ``query_classes[i]``, column ``j`` result class ``j``: entry
    ``(i, j)`` is, over the queries of class ``query_classes[i]``, the mean share of their top
    ``k`` results that have label ``j``. Each row sums to 1; the entry at the query's own class
    is the mean precision@k of those queries, the others say which classes a model confuses
    them with. (A computation on rankings, kept here beside :func:`plot_confusions`, which draws
    it; it would sit as well in :mod:`~backfill_lib.metrics`.)

    Parameters
    ----------
    ids : array-like of int, shape (n_queries, >= k)
        Each query's ranking, gallery ids best first: the ``ids`` of
        :func:`~backfill_lib.retrieval.search` (with ``exclude_self=True`` when the queries are
        the gallery).
    gallery_labels : array-like of int, shape (n_gallery,)
        The class of every gallery item.
    query_labels : array-like of int, shape (n_queries,)
        The class of every query.
    k : int
        How many results per query count.
    query_classes : sequence of int, optional
        The rows, in order, e.g. the classes the old model never saw; default every class that
        has a query. Queries of other classes are left out.
    num_classes : int, optional
        The number of columns; default one more than the largest label.

    Returns
    -------
    ndarray, shape (len(query_classes), num_classes)
        The shares, in [0, 1], rows summing to 1.

    Raises
    ------
    TypeError
        If ids or labels are not integers, or ``k`` is not an integer.
    ValueError
        If ``ids`` is not 2-D with one row per query and at least ``k`` columns, has ids out of
        range, a query class has no query, or a label is not below ``num_classes``.

    Examples
    --------
    >>> topk_class_shares([[1, 2], [0, 2]], gallery_labels=[0, 0, 1], query_labels=[0, 0], k=2)
    array([[0.5, 0.5]])
    """
    g = as_labels(gallery_labels, "gallery_labels")
    q = as_labels(query_labels, "query_labels")
    a = _as_ids(ids, "ids", len(g))
    if a.ndim != 2 or len(a) != len(q):
        raise ValueError(f"ids must have one row of gallery ids per query, shape ({len(q)}, >= k), got {a.shape}")
    k = check_k(k, a.shape[1], name="k")
    top_labels = g[a[:, :k]]
    largest = int(max(g.max(), q.max()))
    if (g < 0).any() or (q < 0).any():
        raise ValueError("labels must be class numbers 0, 1, 2, ...: got a negative label")
    if num_classes is None:
        num_classes = largest + 1
    num_classes = check_positive_int(num_classes, "num_classes")
    if largest >= num_classes:
        raise ValueError(f"num_classes={num_classes}, but a label is {largest}: labels must be below num_classes")
    rows = np.unique(q) if query_classes is None else as_labels(query_classes, "query_classes")
    shares = np.zeros((len(rows), num_classes))
    for i, c in enumerate(rows):
        mine = top_labels[q == c]
        if len(mine) == 0:
            raise ValueError(f"query_classes has class {int(c)}, but no query has that class")
        shares[i] = np.bincount(mine.ravel(), minlength=num_classes) / mine.size
    return shares


def plot_confusions(shares, query_classes, class_names=None, k: int | None = None, model: str | None = None,
                    seen_classes=None, ax=None, title: str | None = None):
    """What a model confuses: a heatmap of the classes among the top-``k`` results, per query class.

    Rows are query classes, columns result classes, each cell the share of the top-``k`` results
    (annotated in percent; colour scale fixed to 0-100 % so two models' matrices compare). The
    cell where the result class is the query's own is outlined: its share is the mean
    precision@k; the rest of the row is what the queries are confused with.

    Parameters
    ----------
    shares : array-like, shape (n_query_classes, n_classes)
        Shares in [0, 1], e.g. from :func:`topk_class_shares`.
    query_classes : sequence of int
        The class of each row (e.g. the classes the old model never saw).
    class_names : sequence of str, optional
        Name of each class, indexed by label (e.g. ``FASHION_MNIST_CLASSES``); default the label
        numbers.
    k : int, optional
        The ``k`` the shares were computed with, for the title and the colour bar.
    model : str, optional
        The model or strategy the rankings come from, e.g. ``"old"``; shown by its legend name
        (:func:`label`) in the default title.
    seen_classes : sequence of int, optional
        Classes the model was trained on (e.g. ``data.old_classes`` for the old model): their
        column labels get a ``*``, explained in the x label.
    ax : matplotlib Axes, optional
        Where to draw; default a new figure 6 inches wide.
    title : str, optional
        Default ``"<model>: classes of the top-<k> results, per query class"``.

    Returns
    -------
    matplotlib Axes
        The axes drawn on (its figure also holds the colour bar).

    Raises
    ------
    ValueError
        If ``shares`` is not 2-D with one row per query class, holds values outside [0, 1], a
        class is out of range, or ``class_names`` is too short.
    """
    import seaborn as sns

    m = np.asarray(shares, dtype=float)
    rows = as_labels(query_classes, "query_classes")
    if m.ndim != 2 or len(m) != len(rows) or m.shape[1] == 0:
        raise ValueError(f"shares has shape {m.shape}, but there are {len(rows)} query classes: give one row "
                         "per query class and one column per class")
    if not np.isfinite(m).all() or (m < 0).any() or (m > 1 + 1e-9).any():
        raise ValueError("shares must be finite shares in [0, 1] (from topk_class_shares)")
    n_classes = m.shape[1]
    if (rows < 0).any() or (rows >= n_classes).any():
        raise ValueError(f"query_classes must be classes 0 .. {n_classes - 1} (one column each), got {rows.tolist()}")
    seen = set() if seen_classes is None else {int(c) for c in as_labels(seen_classes, "seen_classes")}
    names = _check_class_names(class_names, n_classes - 1) or [str(c) for c in range(n_classes)]
    if ax is None:
        _, ax = plt.subplots(figsize=(6.0, 0.36 * len(rows) + 2.3))
    top = f"top-{k}" if k is not None else "top-k"
    annot = np.array([[f"{100 * v:.0f}" for v in row] for row in m])
    sns.heatmap(m, ax=ax, annot=annot, fmt="", annot_kws={"fontsize": 8}, cmap="viridis", vmin=0.0, vmax=1.0,
                linewidths=0.5, linecolor="white",
                cbar_kws={"label": f"share of the {top} results", "format": PercentFormatter(xmax=1.0, decimals=0)},
                xticklabels=[names[c] + (" *" if c in seen else "") for c in range(n_classes)],
                yticklabels=[names[c] for c in rows])
    _readable_cell_text(ax, m)
    for i, c in enumerate(rows):  # the query's own class: the hits
        ax.add_patch(Rectangle((c, i), 1, 1, fill=False, edgecolor="white", lw=3.0))
        ax.add_patch(Rectangle((c, i), 1, 1, fill=False, edgecolor="black", lw=1.2))
    ax.tick_params(axis="x", labelrotation=45, labelsize=8)
    ax.tick_params(axis="y", labelrotation=0, labelsize=8)
    for tick in ax.get_xticklabels():
        tick.set_horizontalalignment("right")
        tick.set_rotation_mode("anchor")
    ax.set_xlabel(f"class of a {top} result" + (" (* = seen in the model's training)" if seen else ""))
    ax.set_ylabel("query class")
    who = label(model) if model is not None else "Results"
    ax.set_title(title or f"{who}: classes of the {top} results,\nper query class (outlined: the query's own)",
                 fontsize=10.5)
    return ax


def figure_to_png(fig, dpi: int = 80) -> bytes:
    """Render a matplotlib figure to PNG bytes and close it.

    Parameters
    ----------
    fig : matplotlib Figure
        The figure; it is closed afterwards, so it is not shown again in a notebook.
    dpi : int, default 80
        Resolution; the image is cropped to the drawn area (``bbox_inches="tight"``).

    Returns
    -------
    bytes
        The PNG file.
    """
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


# --- The book's figure rules, checked (STYLE.md "Figures") ----------------------------------------

#: The least contrast a line, marker or text colour must have against its background (WCAG 2
#: "non-text contrast"; text of figures is small, so it is held to the same floor at least).
MIN_CONTRAST = 3.0


def _luminance(rgb) -> float:
    def channel(c):
        return c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4
    r, g, b = (channel(float(c)) for c in rgb[:3])
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def contrast_ratio(foreground, background="white") -> float:
    """The WCAG 2 contrast ratio of two colours, from 1 (equal) to 21 (black on white).

    A colour drawn with an alpha below 1 is first blended over the background, as it appears.

    Parameters
    ----------
    foreground, background : matplotlib colour
        Any colour matplotlib understands (``"#1f77b4"``, ``"white"``, an RGBA tuple).

    Returns
    -------
    float

    Examples
    --------
    >>> round(contrast_ratio("black"), 1), round(contrast_ratio("#7f7f7f"), 1)
    (21.0, 4.0)
    """
    from matplotlib.colors import to_rgba

    fg, bg = np.array(to_rgba(foreground)), np.array(to_rgba(background))
    seen = fg[:3] * fg[3] + bg[:3] * (1 - fg[3])
    hi, lo = sorted((_luminance(seen), _luminance(bg[:3])), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


def _data_points(ax) -> np.ndarray:
    """Display coordinates of what an axes draws as data: line vertices (densely along each
    segment), scatter points, and the corners and centres of bars."""
    pts = []
    for line in ax.get_lines():
        if not line.get_visible():
            continue
        xy = np.asarray(line.get_xydata(), dtype=float)
        xy = xy[np.isfinite(xy).all(axis=1)]
        if len(xy) == 0:
            continue
        if len(xy) > 1 and line.get_linestyle() not in ("None", "none", "", " "):
            t = np.linspace(0, 1, 25)[:, None]
            xy = np.concatenate([a + t * (b - a) for a, b in zip(xy[:-1], xy[1:])])
        pts.append(line.get_transform().transform(xy))
    for coll in ax.collections:
        offsets = np.asarray(coll.get_offsets(), dtype=float) if coll.get_visible() else np.empty((0, 2))
        if len(offsets) and type(coll).__name__ == "PathCollection":
            pts.append(coll.get_offset_transform().transform(offsets))
    for patch in ax.patches:
        if isinstance(patch, Rectangle) and patch.get_visible() and patch.get_height() != 0:
            box = patch.get_window_extent()
            pts.append(np.array([[box.x0, box.y0], [box.x1, box.y1], [box.x0, box.y1], [box.x1, box.y0],
                                 [(box.x0 + box.x1) / 2, (box.y0 + box.y1) / 2]]))
    return np.concatenate(pts) if pts else np.empty((0, 2))


def _background_under(pixels: np.ndarray, box, default):
    """The most common rendered colour inside a display-space box (RGB in [0, 1])."""
    h, w = pixels.shape[:2]
    x0, x1 = int(max(box.x0, 0)), int(min(box.x1, w))
    y0, y1 = int(max(h - box.y1, 0)), int(min(h - box.y0, h))
    if x1 <= x0 or y1 <= y0:
        return default
    region = pixels[y0:y1, x0:x1, :3].reshape(-1, 3)
    colours, counts = np.unique(region, axis=0, return_counts=True)
    return tuple(colours[counts.argmax()] / 255.0)


def _styles_differ(a, b) -> bool:
    return a.get_linestyle() != b.get_linestyle() or (a.get_marker() or "None") != (b.get_marker() or "None")


def _coincide(a, b, tol: float) -> bool:
    xa, ya = (np.asarray(v, dtype=float) for v in a.get_data())
    xb, yb = (np.asarray(v, dtype=float) for v in b.get_data())
    if xa.shape != xb.shape or len(xa) < 3 or not np.allclose(xa, xb):
        return False
    return bool(np.mean(np.abs(ya - yb) <= tol) >= 0.5)


def figure_problems(fig) -> list[str]:
    """What breaks the book's figure rules in a drawn figure, in words; empty when nothing does.

    Checked for every axes that shows data (axes switched off, such as diagrams and images, are
    checked for text contrast and overlapping labels only):

    * a title on the axes or the figure, and labels on both axes (an axes may leave a label to
      its neighbour in the same row or column of a grid);
    * every visible line, scatter marker, text and legend text at least :data:`MIN_CONTRAST`
      against the axes' background (faint context lines drawn with alpha below 0.5 excepted);
    * no legend inside an axes over a data point, line or bar of that axes;
    * no two texts of an axes overlapping;
    * no two lines that coincide over at least half their points (within 0.5 % of the y range)
      drawn with the same line style and marker.

    Parameters
    ----------
    fig : matplotlib Figure

    Returns
    -------
    list of str
        One sentence per problem, naming the axes by its title.

    Examples
    --------
    >>> fig, ax = plt.subplots()
    >>> _ = ax.plot([0, 1], [0, 1], color="#ffbb78", label="pale")
    >>> _ = ax.set(title="t", xlabel="x", ylabel="y")
    >>> figure_problems(fig)
    ["axes 't': line 'pale' has contrast 1.7:1 against its background (needs 3:1)"]
    >>> plt.close(fig)
    """
    if not hasattr(fig.canvas, "get_renderer"):
        # A figure already shown by the notebook's inline backend keeps a bare canvas: draw it on Agg.
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        FigureCanvasAgg(fig)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    pixels = np.asarray(fig.canvas.buffer_rgba())
    problems: list[str] = []
    has_suptitle = fig._suptitle is not None and fig._suptitle.get_text().strip() != ""
    data_axes = [ax for ax in fig.axes if ax.axison and (ax.get_lines() or ax.collections or ax.patches)
                 and ax.get_label() != "<colorbar>"]

    def neighbours_have(ax, getter, same):
        spec = ax.get_subplotspec() if hasattr(ax, "get_subplotspec") else None
        if spec is None:
            return False
        for other in data_axes:
            ospec = other.get_subplotspec() if hasattr(other, "get_subplotspec") else None
            if other is not ax and ospec is not None and getattr(ospec, same) == getattr(spec, same) \
                    and getter(other).strip():
                return True
        return False

    for ax in fig.axes:
        name = f"axes {ax.get_title()!r}" if ax.get_title() else f"axes {fig.axes.index(ax) + 1}"
        bg = ax.get_facecolor()
        if ax in data_axes:
            if not (ax.get_title().strip() or has_suptitle):
                problems.append(f"{name}: no title (on the axes or the figure)")
            if not ax.get_xlabel().strip() and not neighbours_have(ax, lambda a: a.get_xlabel(), "colspan"):
                problems.append(f"{name}: the x axis has no label")
            if not ax.get_ylabel().strip() and not neighbours_have(ax, lambda a: a.get_ylabel(), "rowspan"):
                problems.append(f"{name}: the y axis has no label")
            for line in ax.get_lines():
                alpha = line.get_alpha()
                if not line.get_visible() or (alpha is not None and alpha < 0.5):
                    continue
                c = contrast_ratio(line.get_color(), bg)
                if c < MIN_CONTRAST:
                    problems.append(f"{name}: line {line.get_label()!r} has contrast {c:.1f}:1 against its "
                                    f"background (needs {MIN_CONTRAST:g}:1)")
            for coll in ax.collections:
                if type(coll).__name__ != "PathCollection" or not coll.get_visible():
                    continue
                for fc in {tuple(np.round(c, 3)) for c in coll.get_facecolors()}:
                    if fc[3] >= 0.5 and contrast_ratio(fc[:3], bg) < MIN_CONTRAST:
                        problems.append(f"{name}: markers {coll.get_label()!r} have contrast "
                                        f"{contrast_ratio(fc[:3], bg):.1f}:1 (needs {MIN_CONTRAST:g}:1)")
                        break
            lines = [ln for ln in ax.get_lines() if ln.get_visible() and not ln.get_label().startswith("_child")]
            ylo, yhi = ax.get_ylim()
            tol = 0.005 * abs(yhi - ylo)
            for i, a in enumerate(lines):
                for b in lines[i + 1:]:
                    if _coincide(a, b, tol) and not _styles_differ(a, b):
                        problems.append(f"{name}: lines {a.get_label()!r} and {b.get_label()!r} coincide and are "
                                        "drawn alike (give one a marker or line style)")
            legend = ax.get_legend()
            if legend is not None and legend.get_visible():
                box = legend.get_window_extent(renderer)
                inside = ax.get_window_extent(renderer).overlaps(box)
                pts = _data_points(ax)
                if inside and len(pts):
                    hit = (pts[:, 0] > box.x0) & (pts[:, 0] < box.x1) & (pts[:, 1] > box.y0) & (pts[:, 1] < box.y1)
                    if hit.any():
                        problems.append(f"{name}: the legend covers data ({int(hit.sum())} drawn points under it); "
                                        "put it outside the axes (plots.outside_legend)")
        texts = [t for t in ax.texts if t.get_visible() and t.get_text().strip()]
        for t in texts:
            # a text's background is what is drawn under it (a heatmap cell, a diagram's box): the
            # most common colour of the rendered pixels in its box, where glyphs are the minority
            tbg = _background_under(pixels, t.get_window_extent(renderer), bg)
            c = contrast_ratio(t.get_color(), tbg)
            if c < MIN_CONTRAST:
                problems.append(f"{name}: text {t.get_text()[:30]!r} has contrast {c:.1f}:1 (needs {MIN_CONTRAST:g}:1)")
        boxes = [t.get_window_extent(renderer) for t in texts]
        for i in range(len(boxes)):
            for j in range(i + 1, len(boxes)):
                if boxes[i].overlaps(boxes[j]) and boxes[i].width > 0 and boxes[j].width > 0:
                    problems.append(f"{name}: texts {texts[i].get_text()[:25]!r} and {texts[j].get_text()[:25]!r} overlap")
        legend = ax.get_legend()
        if legend is not None:
            for t in legend.get_texts():
                c = contrast_ratio(t.get_color(), bg)
                if c < MIN_CONTRAST:
                    problems.append(f"{name}: legend text {t.get_text()!r} has contrast {c:.1f}:1")
    return problems
