"""Sliders that work live in Jupyter and Colab *and* in the static HTML book with no kernel.

Every frame is rendered in advance (one PNG per slider position) and placed in a ``Tab``; the
slider is linked to the tab's ``selected_index`` in the browser with ``jslink``. No Python runs
when the reader moves the slider, so the website behaves exactly like the notebook. (``interact``
would show a moving slider over a frozen plot in the static book.)
"""

from __future__ import annotations

from typing import Callable, Sequence

from .plots import figure_to_png

#: CSS class of the frame container; the book's stylesheet hides its tab headers.
FRAMES_CLASS = "backfill-frames"
SLIDER_CLASS = "backfill-slider"


def render_frames(draw: Callable[[float], object], values: Sequence[float], dpi: int = 80) -> list[bytes]:
    """Call ``draw(value) -> matplotlib Figure`` for each value and return the PNG bytes.

    Each figure is closed once rendered (:func:`~backfill_lib.plots.figure_to_png`).

    Parameters
    ----------
    draw : callable ``(value) -> matplotlib Figure``
        Makes the figure of one slider position.
    values : sequence of float
        The slider positions, in order.
    dpi : int, default 80
        Resolution of the PNGs.

    Returns
    -------
    list of bytes
        One PNG per value.

    Raises
    ------
    ValueError
        If ``values`` is empty.
    """
    values = list(values)
    if not values:
        raise ValueError("values is empty: a slider needs at least one position")
    return [figure_to_png(draw(v), dpi=dpi) for v in values]


def frame_slider(frames: Sequence[bytes], labels: Sequence[str], description: str = "backfill"):
    """A slider over precomputed PNG ``frames`` (one per label), alive without a kernel.

    Parameters
    ----------
    frames : sequence of bytes
        PNG images, e.g. from :func:`render_frames`.
    labels : sequence of str
        Shown as the slider's readout, one per frame (e.g. ``"30%"``).
    description : str, default "backfill"
        Text before the slider.

    Returns
    -------
    ipywidgets.VBox
        The slider above the frames. ``box.children[0]`` is the slider, ``box.children[1]`` the tab.

    Raises
    ------
    ValueError
        If ``frames`` and ``labels`` differ in length, or are empty.
    """
    import ipywidgets as W

    frames, labels = list(frames), [str(s) for s in labels]
    if len(frames) != len(labels):
        raise ValueError(f"frames has {len(frames)} items but labels has {len(labels)}")
    if not frames:
        raise ValueError("frames is empty: a slider needs at least one frame")
    images = [W.Image(value=f, format="png", layout=W.Layout(max_width="100%", height="auto")) for f in frames]
    tab = W.Tab(children=images)
    for i, text in enumerate(labels):
        tab.set_title(i, text)
    tab.add_class(FRAMES_CLASS)
    slider = W.SelectionSlider(options=labels, value=labels[0], description=description, continuous_update=True,
                               style={"description_width": "initial"}, layout=W.Layout(width="95%", max_width="600px"))
    slider.add_class(SLIDER_CLASS)
    W.jslink((slider, "index"), (tab, "selected_index"))
    return W.VBox([slider, tab], layout=W.Layout(max_width="100%"))


def backfill_slider(draw: Callable[[float], object], ratios: Sequence[float], description: str = "backfill ratio r",
                    dpi: int = 80):
    """A backfill-progress slider: ``draw(r)`` makes the figure shown at ratio ``r``.

    Every figure is drawn now (:func:`render_frames`) and the slider reads out each ratio as a
    percentage (:func:`frame_slider`), so it works without a kernel.

    Parameters
    ----------
    draw : callable ``(r) -> matplotlib Figure``
        Makes the figure at backfill ratio ``r``.
    ratios : sequence of float
        The backfill ratios of the slider positions, in order, e.g. ``DEFAULT_RATIOS``.
    description : str, default "backfill ratio r"
        Text before the slider.
    dpi : int, default 80
        Resolution of the frames.

    Returns
    -------
    ipywidgets.VBox
        The slider above the frames (see :func:`frame_slider`).

    Raises
    ------
    ValueError
        If ``ratios`` is empty.

    Examples
    --------
    >>> import matplotlib.pyplot as plt
    >>> def draw(r):
    ...     fig, ax = plt.subplots(); ax.bar([0], [r]); ax.set_title(f"r = {r:.1f}"); return fig
    >>> box = backfill_slider(draw, [0.0, 0.5, 1.0])
    >>> len(box.children[1].children)
    3
    """
    ratios = list(ratios)
    return frame_slider(render_frames(draw, ratios, dpi=dpi), [f"{r:.0%}" for r in ratios], description)
