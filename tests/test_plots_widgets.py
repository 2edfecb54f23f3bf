"""Figures (titles, labels, one colour per strategy) and kernel-free sliders."""

import ipywidgets as W
import matplotlib.pyplot as plt
import numpy as np
import pytest
from ipywidgets.widgets import widget as widget_module
from ipywidgets.widgets.widget_link import Link

from backfill_lib.backfill import evaluate_backfill, offline_backfill, old_only, rank_merge
from backfill_lib.plots import COLORS, color, figure_to_png, label, plot_backfill_curves
from backfill_lib.widgets import FRAMES_CLASS, SLIDER_CLASS, backfill_slider, frame_slider, render_frames

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


@pytest.fixture
def curves(embeddings):
    old, new, y = embeddings
    return {s.name: evaluate_backfill(s, y, order_seed=0)
            for s in (old_only(old), offline_backfill(old, new), rank_merge(old, new))}


def _check_labelled(ax):
    assert ax.get_title() and ax.get_xlabel() and ax.get_ylabel()


class TestPlots:
    def test_curves_with_references(self, curves):
        ax = plot_backfill_curves(curves, old_old=0.4, new_new=0.8)
        _check_labelled(ax)
        assert "our measurement" in ax.get_title()
        assert "backfill ratio" in ax.get_xlabel() and ax.get_ylabel() == "mAP"
        lines = {line.get_label(): line for line in ax.get_lines()}
        assert {label("rank_merge"), label("old"), label("offline"), "old/old", "new/new"} <= set(lines)
        rm = lines[label("rank_merge")]
        np.testing.assert_allclose(rm.get_ydata(), curves["rank_merge"].map)
        assert rm.get_color() == color("rank_merge") == COLORS["rank_merge"]
        assert lines[label("offline")].get_drawstyle() == "steps-post"

    def test_seeds_band_and_json_entry(self, embeddings):
        old, new, y = embeddings
        per_seed = [evaluate_backfill(rank_merge(old, new), y, order_seed=s) for s in range(3)]
        ax = plot_backfill_curves({"rank_merge": per_seed}, metric="top1", title="custom")
        assert ax.get_title() == "custom" and ax.get_ylabel().startswith("top-1")
        assert len(ax.collections) == 1  # one band for the one multi-seed strategy
        mean = np.mean([c.top1 for c in per_seed], axis=0)
        np.testing.assert_allclose(ax.get_lines()[0].get_ydata(), mean)
        entry = {"ratios": per_seed[0].ratios.tolist(), "curve_negative_flips": [c.negative_flips.tolist()
                                                                                for c in per_seed]}
        _, ax2 = plt.subplots()
        assert plot_backfill_curves({"rank_merge": entry, "bct": {"status": "n/a"}}, metric="negative_flips",
                                    ax=ax2) is ax2
        assert len(ax2.get_lines()) == 1 and ax2.get_ylabel() == "negative-flip rate"

    def test_unknown_metric(self, curves):
        with pytest.raises(ValueError, match="unknown metric 'recall'"):
            plot_backfill_curves(curves, metric="recall")

    def test_colours_and_labels_fall_back(self):
        assert color("something_new") == "#999999" and label("something_new") == "something_new"
        assert len(set(COLORS.values())) == len(COLORS)  # one colour means one thing

    def test_figure_to_png_closes(self):
        fig, ax = plt.subplots()
        ax.plot([0, 1])
        png = figure_to_png(fig)
        assert png.startswith(PNG_MAGIC) and not plt.fignum_exists(fig.number)


def _links():
    """Every live Link widget (ipywidgets 8 keeps them in ``_instances``, 7 in ``Widget.widgets``)."""
    registry = getattr(widget_module, "_instances", None)
    if registry is None:
        registry = W.Widget.widgets
    return [w for w in list(registry.values()) if isinstance(w, Link)]


class TestWidgets:
    def test_backfill_slider_links_slider_to_frames(self):
        def draw(r):
            fig, ax = plt.subplots()
            ax.bar([0], [r])
            ax.set_title(f"r = {r:.1f}")
            return fig

        ratios = [0.0, 0.25, 0.5, 1.0]
        box = backfill_slider(draw, ratios, description="r")
        assert isinstance(box, W.VBox)
        slider, tab = box.children
        assert isinstance(slider, W.SelectionSlider) and isinstance(tab, W.Tab)
        assert list(slider.options) == ["0%", "25%", "50%", "100%"] and slider.description == "r"
        assert len(tab.children) == len(ratios)
        assert all(isinstance(im, W.Image) and bytes(im.value).startswith(PNG_MAGIC) for im in tab.children)
        assert len({bytes(im.value) for im in tab.children}) == len(ratios)  # one distinct frame per ratio
        assert SLIDER_CLASS in slider._dom_classes and FRAMES_CLASS in tab._dom_classes
        # The link lives in the browser (jslink), so the static book needs no kernel.
        assert any(link.source == (slider, "index") and link.target == (tab, "selected_index")
                   for link in _links())
        assert not plt.get_fignums()  # every frame's figure was closed

    def test_frame_slider_bad_input(self):
        with pytest.raises(ValueError, match="frames has 1 items but labels has 2"):
            frame_slider([b"x"], ["a", "b"])
        with pytest.raises(ValueError, match="frames is empty"):
            frame_slider([], [])
        with pytest.raises(ValueError, match="values is empty"):
            render_frames(lambda v: plt.figure(), [])
