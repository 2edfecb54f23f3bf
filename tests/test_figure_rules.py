"""The book's figure rules (STYLE.md "Figures", issue 18), where a test can check them: every colour
of the palette reads on white, ``figure_problems`` catches each broken rule, the library's own
figures break none, and chapters take their colours from the palette only."""

import json
import re
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest

from backfill_lib import evaluate_backfill, offline_backfill, rank_merge, same_model
from backfill_lib.plots import (COLORS, GUIDE, INK, MIN_CONTRAST, contrast_ratio, figure_problems, outside_legend,
                                plot_backfill_curves, plot_cross_model_matrix, plot_score_distributions,
                                plot_strategy_diagrams)

ROOT = Path(__file__).resolve().parent.parent
BOOK_NOTEBOOKS = sorted((ROOT / "book").glob("*.ipynb"))


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture
def curves():
    rng = np.random.default_rng(0)
    y = np.arange(200) % 5
    old = _unit(rng.normal(size=(200, 8)) + 1.5 * np.eye(8)[y])
    new = _unit(rng.normal(size=(200, 8)) + 3.0 * np.eye(8)[y])
    return {s.name: evaluate_backfill(s, y) for s in (same_model(old), offline_backfill(old, new), rank_merge(old, new))}


@pytest.mark.parametrize("name", sorted(COLORS))
def test_every_palette_colour_reads_on_white(name):
    assert contrast_ratio(COLORS[name]) >= MIN_CONTRAST, (name, COLORS[name])


def test_palette_colours_are_distinct():
    assert len(set(COLORS.values())) == len(COLORS)


@pytest.mark.parametrize("ink", [INK, GUIDE])
def test_neutral_inks_read_on_white(ink):
    assert contrast_ratio(ink) >= 7.0


def test_contrast_ratio_known_values():
    assert contrast_ratio("black") == pytest.approx(21.0)
    assert contrast_ratio("white") == pytest.approx(1.0)
    # WCAG's own example: #767676 is the lightest grey with 4.5:1 on white
    assert contrast_ratio("#767676") == pytest.approx(4.54, abs=0.01)
    # a colour drawn half transparent is paler than itself
    assert contrast_ratio((0, 0, 0, 0.5)) < contrast_ratio((0, 0, 0, 1.0))


def _labelled(ax):
    ax.set(title="t", xlabel="x", ylabel="y")
    return ax


class TestFigureProblems:
    def test_a_clean_figure_has_none(self):
        fig, ax = plt.subplots()
        ax.plot([0, 1, 2], [0, 1, 2], color=COLORS["rank_merge"], label="a")
        ax.plot([0, 1, 2], [2, 1.5, 1], color=COLORS["mct"], label="b")
        _labelled(ax)
        outside_legend(ax)
        assert figure_problems(fig) == []

    def test_legend_over_data(self):
        fig, ax = plt.subplots()
        ax.plot(np.linspace(0, 1, 50), np.full(50, 0.5), color="black", label="flat")
        _labelled(ax).legend(loc="center")
        assert any("legend covers data" in p for p in figure_problems(fig))

    def test_legend_in_an_empty_corner_is_fine(self):
        fig, ax = plt.subplots()
        ax.plot([0, 1], [0, 0.2], color="black", label="low line")
        ax.set_ylim(0, 1)
        _labelled(ax).legend(loc="upper right")
        assert figure_problems(fig) == []

    def test_legend_over_bars_and_scatter(self):
        fig, (a, b) = plt.subplots(1, 2)
        a.bar(range(4), [1, 1, 1, 1], color="black", label="bars")
        _labelled(a).legend(loc="center")
        b.scatter(np.full(30, 0.5), np.linspace(0.3, 0.7, 30), color="black", label="points")
        _labelled(b).legend(loc="center")
        assert sum("legend covers data" in p for p in figure_problems(fig)) == 2

    def test_low_contrast_line_marker_and_text(self):
        fig, ax = plt.subplots()
        ax.plot([0, 1], [0, 1], color="#bcbd22", label="olive")
        ax.scatter([0.5], [0.2], color="#aec7e8", label="pale")
        ax.text(0.1, 0.9, "faint", color="#cccccc")
        found = figure_problems(_labelled(ax).figure)
        assert any("line 'olive'" in p for p in found)
        assert any("markers 'pale'" in p for p in found)
        assert any("text 'faint'" in p for p in found)

    def test_faint_context_lines_are_allowed(self):
        fig, ax = plt.subplots()
        ax.plot([0, 1], [0, 1], color="black", alpha=0.2)
        assert figure_problems(_labelled(ax).figure) == []

    def test_coinciding_lines_must_be_told_apart(self):
        x = np.linspace(0, 1, 11)
        fig, ax = plt.subplots()
        ax.plot(x, x, color="black", label="a")
        ax.plot(x, x + 1e-4, color=COLORS["rank_merge"], label="b")
        assert any("coincide" in p for p in figure_problems(_labelled(ax).figure))
        fig, ax = plt.subplots()
        ax.plot(x, x, color="black", label="a")
        ax.plot(x, x + 1e-4, color=COLORS["rank_merge"], ls="--", label="b")
        assert figure_problems(_labelled(ax).figure) == []

    def test_missing_title_and_labels(self):
        fig, ax = plt.subplots()
        ax.plot([0, 1], [0, 1], color="black")
        found = figure_problems(fig)
        assert any("no title" in p for p in found) and any("x axis" in p for p in found) \
            and any("y axis" in p for p in found)
        fig.suptitle("a figure title")
        assert not any("no title" in p for p in figure_problems(fig))

    def test_a_grid_may_share_its_axis_labels(self):
        fig, axes = plt.subplots(1, 2, sharey=True)
        for ax in axes:
            ax.plot([0, 1], [0, 1], color="black")
            ax.set(title="t", xlabel="x")
        axes[0].set_ylabel("y")
        assert figure_problems(fig) == []

    def test_overlapping_texts(self):
        fig, ax = plt.subplots()
        ax.plot([0, 1], [0, 1], color="black")
        ax.text(0.5, 0.5, "a long label here")
        ax.text(0.52, 0.5, "another long label")
        assert any("overlap" in p for p in figure_problems(_labelled(ax).figure))


class TestLibraryFigures:
    def test_backfill_curves(self, curves):
        ax = plot_backfill_curves(curves, old_old=curves["old"].map[0], new_new=curves["offline"].map[-1])
        assert figure_problems(ax.figure) == []

    def test_backfill_curves_slider_frame(self, curves):
        ax = plot_backfill_curves(curves, upto=0.4)
        assert figure_problems(ax.figure) == []

    def test_score_distributions(self):
        rng = np.random.default_rng(1)
        scores = {s: (rng.normal(0.6, 0.1, 200), rng.normal(0.1, 0.1, 800)) for s in ("old_stored", "cross", "new_stored")}
        ax = plot_score_distributions(scores)
        assert figure_problems(ax.figure) == []

    def test_cross_model_matrix(self):
        ax = plot_cross_model_matrix(np.array([[0.5, 0.1], [0.1, 0.8]]), ["old", "new"])
        assert figure_problems(ax.figure) == []

    def test_strategy_diagrams(self):
        fig = plot_strategy_diagrams(["old", "rank_merge", "reverse_transform", "mct", "forward_transform", "bct"])
        assert figure_problems(fig) == []


# A hex colour, or a named one passed as a colour ("white" and "none" are allowed: separators and
# empty faces, not things to read); neutral inks are plots.INK and plots.GUIDE.
_COLOUR_LITERAL = re.compile(r"#[0-9a-fA-F]{6}\b|\b(?:color|colour|c|facecolor|edgecolor)\s*=\s*[\"'](?!#|white[\"']|none[\"'])[a-z:]+[\"']")


@pytest.mark.parametrize("notebook", BOOK_NOTEBOOKS, ids=[p.stem for p in BOOK_NOTEBOOKS])
def test_chapters_take_colours_from_the_palette(notebook):
    """One colour per concept book-wide: a chapter's code names no colour of its own."""
    cells = json.loads(notebook.read_text(encoding="utf-8"))["cells"]
    found = [m.group(0) for c in cells if c["cell_type"] == "code"
             for m in _COLOUR_LITERAL.finditer("".join(c["source"]))]
    assert not found, f"{notebook.name} names colours outside plots.COLORS: {sorted(set(found))}"


def test_heatmap_numbers_read_on_every_cell():
    from backfill_lib.plots import plot_confusions

    shares = np.array([[0.05, 0.6, 0.35], [0.7, 0.1, 0.2], [0.45, 0.5, 0.05]])
    ax = plot_confusions(shares, [0, 1, 2])
    assert figure_problems(ax.figure) == []
    ax = plot_cross_model_matrix(np.array([[0.62, 0.1], [0.33, 0.95]]), ["old", "new"])
    assert figure_problems(ax.figure) == []


def test_strategy_diagram_labels_stay_off_slanted_arrows():
    from matplotlib.patches import FancyArrowPatch

    from backfill_lib.plots import plot_strategy_diagram

    ax = plot_strategy_diagram("new_on_old")
    fig = ax.figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    arrows = [p for p in ax.patches if isinstance(p, FancyArrowPatch)]
    labels = [t for t in ax.texts if t.get_text() in (r"$\varphi_n(q)$", "incompatible")]
    assert len(labels) == 3
    for t in labels:
        box = t.get_window_extent(renderer)
        for a in arrows:
            path = a.get_path().transformed(a.get_transform()) if a.get_transform() else a.get_path()
            pts = path.interpolated(50).vertices
            inside = (pts[:, 0] > box.x0) & (pts[:, 0] < box.x1) & (pts[:, 1] > box.y0) & (pts[:, 1] < box.y1)
            assert not inside.any(), f"label {t.get_text()!r} sits on an arrow"


def test_a_figure_whose_canvas_was_detached_is_still_checked():
    from matplotlib.backend_bases import FigureCanvasBase

    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1], color="#bcbd22", label="olive")
    _labelled(ax)
    FigureCanvasBase(fig)              # what the inline backend leaves after showing a figure
    assert any("contrast" in p for p in figure_problems(fig))
