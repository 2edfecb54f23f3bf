"""Figures (titles, labels, one colour per strategy) and kernel-free sliders."""

import ipywidgets as W
import matplotlib.colors as matplotlib_colors
import matplotlib.pyplot as plt
import numpy as np
import pytest
from ipywidgets.widgets import widget as widget_module
from ipywidgets.widgets.widget_link import Link

from backfill_lib.backfill import evaluate_backfill, offline_backfill, old_only, rank_merge
from backfill_lib.plots import (COLORS, DIAGRAMS, INK, LABELS, PHI_N, PHI_O, SPACES, color, figure_problems, figure_to_png, label,
                                pair_scores, palette, plot_backfill_curves, plot_cross_model_matrix,
                                plot_score_distributions, plot_strategy_diagram, plot_strategy_diagrams,
                                set_book_style, show_image)
from backfill_lib.strategies import STRATEGY_REGISTRY
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
        assert {label("rank_merge"), label("old"), label("offline"), "new/new"} <= set(lines)
        # the old/old level is drawn, but not listed next to the "old" strategy's own entry
        assert list(lines["_old/old"].get_ydata()) == [0.4, 0.4] and "old/old" not in lines
        rm = lines[label("rank_merge")]
        np.testing.assert_allclose(rm.get_ydata(), curves["rank_merge"].map)
        assert rm.get_color() == color("rank_merge") == COLORS["rank_merge"]
        # offline is drawn as the AUC integrates it (straight segments, the jump from 0.9 to 1), and
        # apart from old/old, which it follows until r = 0.9
        off = lines[label("offline")]
        assert off.get_drawstyle() == "default"
        np.testing.assert_allclose(off.get_xdata(), curves["offline"].ratios)
        assert off.get_linestyle() != lines[label("old")].get_linestyle()
        # the legend is outside the axes and the figure breaks none of the book's rules
        legend_box = ax.get_legend().get_window_extent(ax.figure.canvas.get_renderer())
        assert legend_box.y1 < ax.get_window_extent().y0
        assert figure_problems(ax.figure) == []

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
        assert len(ax2.get_lines()) == 1 and ax2.get_ylabel() == "negative-flip rate (% of queries)"
        tick = ax2.yaxis.get_major_formatter()(0.05, 0)  # the text says percent: so do the ticks
        assert tick.endswith("%") and float(tick[:-1]) == 5.0
        np.testing.assert_allclose(ax2.get_lines()[0].get_ydata(), np.mean(entry["curve_negative_flips"], axis=0))

    def test_unknown_metric(self, curves):
        with pytest.raises(ValueError, match="unknown metric 'recall'"):
            plot_backfill_curves(curves, metric="recall")

    def test_colours_and_labels_fall_back(self):
        assert color("something_new") == "#999999" and label("something_new") == "something_new"
        assert len(set(COLORS.values())) == len(COLORS)  # one colour means one thing
        assert "#999999" not in COLORS.values()          # not even the fallback's

    def test_every_name_has_colour_and_label(self):
        for name in [*STRATEGY_REGISTRY, "old", "new", *SPACES]:
            assert name in COLORS and name in LABELS, name
        # the score spaces never borrow a model's colour (grey meant both once)
        assert not {color(s) for s in SPACES} & {color("old"), color("new")}

    def test_legend_lists_each_entry_once(self, curves):
        ax = plot_backfill_curves(curves, old_old=0.4, new_new=0.8, upto=0.5, show_seeds=True)
        texts = [t.get_text() for t in ax.get_legend().get_texts()]
        assert len(texts) == len(set(texts))
        # "old" is plotted, so the old/old reference line is not listed a second time
        assert label("old") in texts and "old/old" not in texts and "new/new" in texts
        # the × markers are listed once, in neutral ink (not in the first strategy's colour)
        seed_entries = [t for t in texts if t.startswith("one seed (×")]
        assert len(seed_entries) == 1
        handle = ax.get_legend().legend_handles[texts.index(seed_entries[0])]
        assert handle.get_color() == INK
        assert ax.get_xaxis().get_major_formatter()(0.5, 0) == "50%"

    def test_upto_draws_the_past_solid(self, curves):
        ax = plot_backfill_curves({"rank_merge": curves["rank_merge"]}, upto=0.3)
        solid = [line for line in ax.get_lines() if line.get_label() == label("rank_merge")]
        assert len(solid) == 1 and np.all(solid[0].get_xdata() <= 0.3 + 1e-9)
        assert len(solid[0].get_xdata()) == np.sum(curves["rank_merge"].ratios <= 0.3 + 1e-9)
        with pytest.raises(ValueError, match="upto must be a backfill ratio"):
            plot_backfill_curves(curves, upto=1.5)

    def test_results_entry_without_curve(self):
        with pytest.raises(ValueError, match="'curve_map'"):
            plot_backfill_curves({"rank_merge": {"ratios": [0, 1]}})


class TestPalette:
    def test_palette_is_ordered_and_matches_colors(self):
        p = palette(["mct", "old", "cross"])
        assert list(p) == ["mct", "old", "cross"] and p["mct"] == COLORS["mct"]
        assert palette(["rank_merge"], by_label=True) == {label("rank_merge"): COLORS["rank_merge"]}
        assert palette() == COLORS

    def test_palette_bad_names(self):
        with pytest.raises(ValueError, match="no colour for \\['rank_merj'\\]"):
            palette(["rank_merj"])
        with pytest.raises(TypeError, match="not the string"):
            palette("old")

    def test_palette_feeds_seaborn(self):
        import pandas as pd
        import seaborn as sns

        set_book_style()
        df = pd.DataFrame({"r": [0, 1, 0, 1], "m": [0.5, 0.6, 0.5, 0.9], "s": ["old", "old", "mct", "mct"]})
        p = palette(["old", "mct"])
        ax = sns.lineplot(df, x="r", y="m", hue="s", hue_order=list(p), palette=p)
        colours = [matplotlib_colors.to_hex(line.get_color()) for line in ax.get_lines()[:2]]
        assert colours == [COLORS["old"], COLORS["mct"]]


def _scores(rng, n=400):
    return {"old_stored": (rng.normal(0.8, 0.1, n), rng.normal(0.4, 0.2, n)),
            "cross": (rng.normal(0.7, 0.1, n), rng.normal(0.1, 0.2, n)),
            "new_stored": (rng.normal(0.9, 0.05, n), rng.normal(0.0, 0.2, n))}


class TestScoreDistributions:
    @pytest.mark.parametrize("kind", ["hist", "kde"])
    def test_hue_per_space_and_relevance(self, rng, kind):
        ax = plot_score_distributions(_scores(rng), kind=kind, log=(kind == "hist"))
        _check_labelled(ax)
        texts = [t.get_text() for t in ax.get_legend().get_texts()]
        assert texts == [f"{label(s)}: {r}" for s in SPACES for r in ("relevant", "irrelevant")]
        handles = ax.get_legend().legend_handles
        assert [matplotlib_colors.to_hex(h.get_edgecolor() if hasattr(h, "get_facecolor") else h.get_color())
                for h in handles[::2]] == [COLORS[s] for s in SPACES]
        assert "density" in ax.get_ylabel() and "score" in ax.get_xlabel()
        assert (ax.get_yscale() == "log") == (kind == "hist")

    def test_histogram_is_a_density(self, rng):
        rel = rng.uniform(0.0, 0.5, 1000)
        ax = plot_score_distributions({"new_stored": (rel, rel - 0.5)}, bins=np.linspace(-1, 1, 41))
        outline = ax.get_lines()[0]  # the relevant scores: a step outline
        assert np.max(outline.get_ydata()) == pytest.approx(2.0, rel=0.2)  # uniform on [0, 0.5]: density 2
        x, y = np.asarray(outline.get_xdata()), np.asarray(outline.get_ydata())
        assert np.all(y[x < -0.01] == 0) and np.sum(y[:-1] * np.diff(x)) == pytest.approx(1.0)  # a density
        assert ax.collections  # the irrelevant scores: filled

    def test_bad_input(self, rng):
        with pytest.raises(ValueError, match="unknown score space \\['new'\\]"):
            plot_score_distributions({"new": _scores(rng)["new_stored"]})
        with pytest.raises(ValueError, match="kind must be"):
            plot_score_distributions(_scores(rng), kind="violin")
        with pytest.raises(ValueError, match="scores is empty"):
            plot_score_distributions({})
        with pytest.raises(ValueError, match="no irrelevant scores"):
            plot_score_distributions({"cross": ([0.5], [])})

    def test_pair_scores_brute_force(self, embeddings):
        old, new, y = embeddings
        scores = pair_scores(rank_merge(old, new), y, n_queries=10, seed=3)
        assert set(scores) == {"old_stored", "new_stored"}
        rows = np.sort(np.random.default_rng(3).permutation(len(y))[:10])
        expected_rel = [old[i] @ old[j] for i in rows for j in range(len(y)) if j != i and y[j] == y[i]]
        np.testing.assert_allclose(np.sort(scores["old_stored"][0]), np.sort(expected_rel), rtol=1e-5)
        n_irr = sum(int((y != y[i]).sum()) for i in rows)
        assert len(scores["new_stored"][1]) == n_irr
        with pytest.raises(ValueError, match="one label per item"):
            pair_scores(rank_merge(old, new), y[:-1])
        with pytest.raises(ValueError, match="n_queries must be positive"):
            pair_scores(rank_merge(old, new), y, n_queries=0)


class TestCrossModelMatrix:
    def test_annotated_heatmap(self):
        m = np.array([[0.6, 0.1, np.nan], [0.2, 0.9, 0.5]])
        ax = plot_cross_model_matrix(m, ["old", "new"], ["old", "new", "bct"], tick_labels={"old": "old φ_o"})
        _check_labelled(ax)
        texts = {t.get_text() for t in ax.texts}
        assert {"0.600", "0.100", "0.200", "0.900", "0.500", "n/a"} <= texts
        assert [t.get_text() for t in ax.get_xticklabels()] == ["old φ_o", "new", "bct"]
        assert matplotlib_colors.to_hex(ax.get_xticklabels()[2].get_color()) == COLORS["bct"]
        assert ax.collections[0].colorbar.ax.get_ylabel() == "mAP"

    def test_shape_mismatch(self):
        with pytest.raises(ValueError, match="2 query models and 2 gallery models"):
            plot_cross_model_matrix(np.zeros((2, 3)), ["old", "new"])


def _text_of(ax):
    return " ".join([t.get_text() for t in ax.texts] + [ax.get_title()])


class TestStrategyDiagram:
    @pytest.mark.parametrize("name", sorted(set(STRATEGY_REGISTRY) | set(DIAGRAMS)))
    def test_every_strategy_draws_its_backbones(self, name):
        assert name in DIAGRAMS, f"registered strategy {name!r} has no diagram"
        ax = plot_strategy_diagram(name)
        text = _text_of(ax)
        d = DIAGRAMS[name]
        backbones = {lane.backbone for lane in (d.old_lane, d.new_lane) if lane is not None}
        for b in backbones:  # the backbone boxes are drawn, in the model's colour
            boxes = [t for t in ax.texts if t.get_text() == b]
            assert len(boxes) >= 1, (name, b)
        assert ("backbone pass" in text) and ax.get_title() == label(name)
        assert ax.figure.get_size_inches().tolist() == [6.0, 3.0]
        assert "stores" in text

    def test_backbones_and_passes(self):
        def backbone_boxes(name):
            return sorted(t.get_text() for t in plot_strategy_diagram(name).texts if t.get_text() in (PHI_O, PHI_N))

        assert backbone_boxes("rank_merge") == sorted([PHI_O, PHI_N]) and "2 backbone passes" in _text_of(
            plot_strategy_diagram("rank_merge"))
        assert backbone_boxes("old") == [PHI_O]
        for name in ("mct", "reverse_transform", "bct", "forward_transform"):
            assert backbone_boxes(name) == [PHI_N] and "1 backbone pass" in _text_of(plot_strategy_diagram(name))
        mct = _text_of(plot_strategy_diagram("mct"))
        assert r"\hat\psi" in mct and r"\hat\rho" in mct
        assert r"\hat h" in _text_of(plot_strategy_diagram("forward_transform"))
        assert "nothing is backfilled" in _text_of(plot_strategy_diagram("old"))

    def test_unknown_strategy_lists_choices(self):
        with pytest.raises(ValueError, match="no diagram for strategy 'rank_merj'; choose from: old, offline"):
            plot_strategy_diagram("rank_merj")

    def test_grid(self):
        fig = plot_strategy_diagrams(["old", "rank_merge", "mct"], ncols=2)
        assert fig.get_size_inches()[0] == 12.0
        drawn = [ax.get_title() for ax in fig.axes if ax.get_title()]
        assert drawn == [label("old"), label("rank_merge"), label("mct")]
        assert figure_to_png(fig).startswith(PNG_MAGIC)
        with pytest.raises(ValueError, match="no diagram for \\['x'\\]"):
            plot_strategy_diagrams(["old", "x"])
        with pytest.raises(TypeError, match="not the string"):
            plot_strategy_diagrams("old")
        with pytest.raises(ValueError, match="names is empty"):
            plot_strategy_diagrams([])
        with pytest.raises(ValueError, match="ncols must be"):
            plot_strategy_diagrams(["old"], ncols=0)

    def test_figure_to_png_closes(self):
        fig, ax = plt.subplots()
        ax.plot([0, 1])
        png = figure_to_png(fig)
        assert png.startswith(PNG_MAGIC) and not plt.fignum_exists(fig.number)


class TestShowImage:
    def test_grey_and_colour_with_frames(self, rng):
        fig, (a, b) = plt.subplots(1, 2)
        show_image(a, rng.uniform(size=(1, 8, 8)), stored="old_stored", correct=True, title="3")
        assert a.get_images()[0].get_array().shape == (8, 8) and a.get_title() == "3 ✓"
        spine = a.spines["left"]
        assert matplotlib_colors.to_hex(spine.get_edgecolor()) == COLORS["old_stored"] and spine.get_linestyle() == "--"
        show_image(b, rng.normal(size=(3, 4, 5)), stored="new_stored", correct=False)
        rgb = b.get_images()[0].get_array()
        assert rgb.shape == (4, 5, 3) and rgb.min() >= 0 and rgb.max() <= 1 and b.get_title() == "✗"
        assert matplotlib_colors.to_hex(b.spines["top"].get_edgecolor()) == COLORS["new_stored"]

    def test_bad_input(self, rng):
        _, ax = plt.subplots()
        with pytest.raises(ValueError, match="image must have shape"):
            show_image(ax, rng.uniform(size=(2, 8, 8)))
        with pytest.raises(ValueError, match="stored must be"):
            show_image(ax, rng.uniform(size=(8, 8)), stored="old")


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
