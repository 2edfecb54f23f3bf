"""Figures with one colour per model and strategy, the same in every chapter."""

from __future__ import annotations

import io

import matplotlib.pyplot as plt
import numpy as np

#: One colour per model and strategy (colour-blind-friendly where it matters).
COLORS: dict[str, str] = {
    "old": "#7f7f7f",               # the old model, old/old retrieval
    "new": "#000000",               # the new model, new/new retrieval
    "offline": "#4d4d4d",
    "new_on_old": "#d62728",        # incompatible: new query, old gallery
    "rank_merge": "#1f77b4",
    "bct": "#ff7f0e",
    "ra_bct": "#9467bd",
    "forward_transform": "#8c564b",
    "reverse_transform": "#bcbd22",
    "mct": "#2ca02c",
    "mct_old_neg": "#98df8a",
    "mct_new_neg": "#17becf",
    "mct_no_rho": "#e377c2",
}

#: Human-readable names for legends.
LABELS: dict[str, str] = {
    "old": "old/old (no upgrade)",
    "new": "new/new",
    "offline": "offline backfill",
    "new_on_old": "new query on stored gallery (incompatible)",
    "rank_merge": "distance rank merge",
    "bct": "BCT",
    "ra_bct": "RA-BCT / Hot-Refresh",
    "forward_transform": "forward transformation (FCT-style)",
    "reverse_transform": "reverse transformation ψ (L_rt)",
    "mct": "metric-compatible training",
    "mct_old_neg": "MCT, old-space negatives only",
    "mct_new_neg": "MCT, new-space negatives only",
    "mct_no_rho": "MCT without learnable ρ",
}

METRIC_LABELS = {"map": "mAP", "top1": "top-1 accuracy (CMC)", "top5": "top-5 accuracy (CMC)",
                 "negative_flips": "negative-flip rate"}


def color(name: str) -> str:
    """The colour of a model or strategy (grey for unknown names).

    Parameters
    ----------
    name : str
        A key of ``COLORS``: ``"old"``, ``"new"`` or a strategy name such as ``"rank_merge"``.

    Returns
    -------
    str
        A hex colour, e.g. ``"#1f77b4"``; ``"#999999"`` for a name without a colour.
    """
    return COLORS.get(name, "#999999")


def label(name: str) -> str:
    """The legend name of a model or strategy (the name itself when it has none).

    Parameters
    ----------
    name : str
        A key of ``LABELS``: ``"old"``, ``"new"`` or a strategy name such as ``"rank_merge"``.

    Returns
    -------
    str
        E.g. ``"distance rank merge"`` for ``"rank_merge"``.
    """
    return LABELS.get(name, name)


def _curves_of(entry, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """(ratios, values per seed) from a BackfillCurve, a list of them, or a results-JSON entry."""
    if isinstance(entry, dict):
        return np.asarray(entry["ratios"]), np.asarray(entry[f"curve_{metric}"])
    curves = entry if isinstance(entry, (list, tuple)) else [entry]
    return np.asarray(curves[0].ratios), np.stack([getattr(c, metric) for c in curves])


def plot_backfill_curves(curves: dict, metric: str = "map", old_old: float | None = None,
                         new_new: float | None = None, ax=None, title: str | None = None,
                         source: str = "our measurement"):
    """Plot backfill curves ``m(r)``, one line per strategy, mean ± std band over seeds.

    Colours and legend names come from :func:`color` and :func:`label`; the ``offline`` curve
    is drawn as a step.

    Parameters
    ----------
    curves : dict
        Strategy name -> a :class:`~backfill_lib.backfill.BackfillCurve`, a list of them (one per
        seed), or a strategy entry of :func:`~backfill_lib.experiment.run_experiment`'s results
        (``result["strategies"][name]``; entries with status ``"n/a"`` are skipped). With
        several seeds the band is ± one standard deviation.
    metric : {"map", "top1", "top5", "negative_flips"}, default "map"
        Which curve to draw.
    old_old, new_new : float, optional
        Reference levels drawn as dashed lines.
    ax : matplotlib Axes, optional
        Where to draw; default a new 6.4 × 4.0 inch figure.
    title : str, optional
        Default ``"<metric> during the backfill (<source>)"``.
    source : str, default "our measurement"
        Shown in the default title so our numbers are never confused with the paper's.

    Returns
    -------
    matplotlib Axes
        The axes drawn on.

    Raises
    ------
    ValueError
        If ``metric`` is unknown.
    """
    if metric not in METRIC_LABELS:
        raise ValueError(f"unknown metric {metric!r}; choose one of: {', '.join(METRIC_LABELS)}")
    if ax is None:
        _, ax = plt.subplots(figsize=(6.4, 4.0))
    for name, entry in curves.items():
        if isinstance(entry, dict) and entry.get("status") == "n/a":
            continue
        r, v = _curves_of(entry, metric)
        mean = v.mean(axis=0)
        ax.plot(r, mean, marker="o", ms=3, color=color(name), label=label(name),
                drawstyle="steps-post" if name == "offline" else "default")
        if len(v) > 1:
            std = v.std(axis=0, ddof=1)  # the same spread as the "mean ± std" of the results tables
            ax.fill_between(r, mean - std, mean + std, color=color(name), alpha=0.15, lw=0)
    if old_old is not None:
        ax.axhline(old_old, ls="--", lw=1, color=color("old"), label="old/old")
    if new_new is not None:
        ax.axhline(new_new, ls="--", lw=1, color=color("new"), label="new/new")
    ax.set_xlabel("backfill ratio r (share of gallery re-extracted)")
    ax.set_ylabel(METRIC_LABELS[metric])
    ax.set_xlim(0, 1)
    ax.set_title(title or f"{METRIC_LABELS[metric]} during the backfill ({source})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
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
