"""Image figures: a query and its top results per model (frames, ✓/✗, precision@k, class names),
the class-confusion matrix and its helper, bad input, and one render on real data."""

from pathlib import Path

import matplotlib.colors as matplotlib_colors
import matplotlib.pyplot as plt
import numpy as np
import pytest

from backfill_lib.data import FASHION_MNIST_CLASSES, load_dataset
from backfill_lib.plots import (COLORS, LABELS, figure_to_png, label, plot_confusions, plot_query_results,
                                topk_class_shares)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


# 12 images of 6 x 6 pixels, classes 0, 1, 2, 0, 1, 2, ...; image i is filled with the value i.
N = 12
LABELS_12 = np.arange(N) % 3
IMAGES_12 = np.repeat(np.arange(N, dtype=float), 36).reshape(N, 1, 6, 6)
NAMES_3 = ["zero", "one", "two"]
# Query 0 has class 0; its relevant items are 3, 6, 9.
RANKINGS = {"old": [3, 1, 6, 2, 4], "new": [3, 6, 9, 1, 2]}


def _contrast_on_white(hex_colour: str) -> float:
    def channel(c):
        return c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4
    r, g, b = (channel(c) for c in matplotlib_colors.to_rgb(hex_colour))
    return 1.05 / (0.2126 * r + 0.7152 * g + 0.0722 * b + 0.05)


def _result_axes(fig, k):
    """{row index: [the k result axes]} (fig.axes = the query's, then k per model)."""
    axes = fig.axes[1:]
    return [axes[i:i + k] for i in range(0, len(axes), k)]


def _row_label(axes_row) -> str:
    texts = [t.get_text() for t in axes_row[0].texts]
    assert len(texts) == 1
    return texts[0]


class TestQueryResults:
    def test_frames_symbols_and_precision(self):
        fig = plot_query_results(IMAGES_12, LABELS_12, 0, RANKINGS, k=4, class_names=NAMES_3)
        assert len(fig.axes) == 1 + 2 * 4
        assert "top 4 results" in fig._suptitle.get_text()
        query = fig.axes[0]
        assert query.get_title() == "query" and query.get_xlabel() == "zero"
        expected = {0: [True, False, True, False], 1: [True, True, True, False]}  # labels of the ranked ids
        for row, (name, axes_row) in enumerate(zip(RANKINGS, _result_axes(fig, 4))):
            for rank, (ax, relevant, item) in enumerate(zip(axes_row, expected[row], RANKINGS[name]), start=1):
                colour = COLORS["relevant" if relevant else "irrelevant"]
                assert ax.get_title() == f"{rank} {'✓' if relevant else '✗'}"
                assert matplotlib_colors.to_hex(ax.title.get_color()) == colour
                for spine in ax.spines.values():
                    assert spine.get_visible() and matplotlib_colors.to_hex(spine.get_edgecolor()) == colour
                assert ax.get_xlabel() == NAMES_3[LABELS_12[item]]
        old_row, new_row = _result_axes(fig, 4)
        assert _row_label(old_row) == f"{label('old')}: precision@4 = 0.50 (2 of 4 relevant)"
        assert _row_label(new_row) == f"{label('new')}: precision@4 = 0.75 (3 of 4 relevant)"
        assert matplotlib_colors.to_hex(old_row[0].texts[0].get_color()) == COLORS["old"]

    def test_relevance_colours_read_on_white_and_mean_nothing_else(self):
        for name in ("relevant", "irrelevant"):
            assert _contrast_on_white(COLORS[name]) >= 3.0 and name in LABELS
        assert len(set(COLORS.values())) == len(COLORS)  # no strategy, model or space shares them

    def test_unknown_model_names_and_default_class_names(self):
        fig = plot_query_results(IMAGES_12, LABELS_12, 0, {"my model": [3, 1]}, k=2, title="custom")
        assert fig._suptitle.get_text() == "custom"
        row = _result_axes(fig, 2)[0]
        assert _row_label(row).startswith("my model: precision@2 = 0.50")
        assert matplotlib_colors.to_hex(row[0].texts[0].get_color()) == "#000000"
        assert [ax.get_xlabel() for ax in row] == ["0", "1"] and fig.axes[0].get_xlabel() == "0"

    def test_pixels_are_rescaled_together(self):
        fig = plot_query_results(IMAGES_12, LABELS_12, 0, {"old": [3, 6, 9]}, k=3)
        shown = [ax.get_images()[0].get_array() for ax in fig.axes]
        # the query (value 0) is the darkest, item 9 the brightest: one shared scale 0 .. 9
        np.testing.assert_allclose([float(a.mean()) for a in shown], [0, 3 / 9, 6 / 9, 1])
        assert fig.axes[0].get_images()[0].get_cmap().name == "gray_r"

    def test_denormalize_is_applied_and_clipped(self):
        fig = plot_query_results(IMAGES_12, LABELS_12, 0, {"old": [3, 6]}, k=2, denormalize=lambda im: im / 4)
        assert [float(ax.get_images()[0].get_array().mean()) for ax in fig.axes] == [0.0, 0.75, 1.0]

    @pytest.mark.parametrize("shape", [(N, 8, 8), (N, 1, 8, 8), (N, 3, 5, 7)])
    def test_grey_and_colour_shapes(self, rng, shape):
        fig = plot_query_results(rng.normal(size=shape), LABELS_12, 0, RANKINGS, k=3)
        arr = fig.axes[1].get_images()[0].get_array()
        assert arr.shape == ((5, 7, 3) if shape[1] == 3 else (8, 8))
        assert 0.0 <= arr.min() and arr.max() <= 1.0

    def test_query_from_outside_the_gallery(self, rng):
        fig = plot_query_results(IMAGES_12, LABELS_12, (np.zeros((6, 6)), 2), {"new": [0, 2, 5]}, k=3,
                                 class_names=NAMES_3)
        assert fig.axes[0].get_xlabel() == "two"
        assert [ax.get_title() for ax in fig.axes[1:]] == ["1 ✗", "2 ✓", "3 ✓"]

    def test_long_class_names_break_after_slash(self):
        names = list(FASHION_MNIST_CLASSES)
        images = np.zeros((10, 28, 28))
        images[:, 0, 0] = 1
        fig = plot_query_results(images, np.arange(10), 1, {"old": [0, 2, 3, 4, 5, 6, 7, 8]}, class_names=names)
        assert fig.axes[1].get_xlabel() == "T-shirt/\ntop"
        assert fig.get_size_inches()[0] == 6.0

    @pytest.mark.parametrize("kwargs, error, match", [
        (dict(images=np.zeros((N, 2, 6, 6))), ValueError, r"images must have shape \(n, H, W\)"),
        (dict(images=np.zeros((N, 36))), ValueError, "images must have shape"),
        (dict(labels=np.arange(N - 1)), ValueError, "labels"),
        (dict(rankings={"old": [3, 12]}), ValueError, r"rankings\['old'\] has ids out of range \[12\]"),
        (dict(rankings={"old": [3, -1]}), ValueError, r"out of range \[-1\]"),
        (dict(rankings={"old": [3, 6]}, k=3), ValueError, r"k=3 is larger than rankings\['old'\] \(2 ids\)"),
        (dict(rankings={"old": [3, 3, 6]}, k=3), ValueError, r"rankings\['old'\] must not repeat"),
        (dict(rankings={"old": [0, 3]}, k=2), ValueError, "contains the query itself"),
        (dict(rankings={"old": [[3, 6]]}, k=1), ValueError, r"pass the query's row: ids\[query\]"),
        (dict(rankings={"old": [3.0, 6.0]}, k=1), TypeError, "integer gallery ids"),
        (dict(rankings=[[3, 6]]), TypeError, "rankings must be a dict"),
        (dict(rankings={}), ValueError, "rankings is empty"),
        (dict(query=12), ValueError, "query=12 is out of range"),
        (dict(query="cat"), TypeError, "query must be a gallery index"),
        (dict(k=0), ValueError, "k must be at least 1"),
        (dict(class_names=["a", "b"]), ValueError, "class_names has 2 names, but the labels go up to 2"),
        (dict(denormalize="x / 4"), TypeError, "denormalize must be a function"),
        (dict(denormalize=lambda im: im[0]), ValueError, "denormalize must keep an image's shape"),
    ])
    def test_bad_input(self, kwargs, error, match):
        args = dict(images=IMAGES_12, labels=LABELS_12, query=0, rankings={"old": [3, 6, 9]}, k=2)
        args.update(kwargs)
        with pytest.raises(error, match=match):
            plot_query_results(**args)


# Two queries of class 0 and one of class 2; gallery labels by id.
GALLERY = np.array([0, 0, 1, 2, 2, 1])
QUERY_LABELS = np.array([0, 2, 0])
IDS = np.array([[0, 2, 3, 5],
                [3, 4, 1, 0],
                [1, 0, 4, 2]])


class TestTopkClassShares:
    def test_matches_a_hand_computation(self):
        shares = topk_class_shares(IDS, GALLERY, QUERY_LABELS, k=3)
        # class 0 queries: top 3 labels (0, 1, 2) and (0, 0, 2) -> 3/6, 1/6, 2/6
        # class 2 query: (2, 2, 0) -> 1/3, 0, 2/3; no query of class 1, so no row for it
        np.testing.assert_allclose(shares, [[3 / 6, 1 / 6, 2 / 6], [1 / 3, 0, 2 / 3]])
        np.testing.assert_allclose(shares.sum(axis=1), 1.0)

    def test_chosen_rows_and_columns(self):
        shares = topk_class_shares(IDS, GALLERY, QUERY_LABELS, k=1, query_classes=[2], num_classes=5)
        np.testing.assert_allclose(shares, [[0, 0, 1, 0, 0]])

    @pytest.mark.parametrize("kwargs, error, match", [
        (dict(k=5), ValueError, "k=5 is larger"),
        (dict(ids=IDS[:2]), ValueError, "one row of gallery ids per query"),
        (dict(ids=IDS[0]), ValueError, "one row of gallery ids per query"),
        (dict(ids=IDS + 3), ValueError, "ids has ids out of range"),
        (dict(query_classes=[1]), ValueError, "no query has that class"),
        (dict(num_classes=2), ValueError, "num_classes=2, but a label is 2"),
        (dict(gallery_labels=GALLERY.astype(str)), TypeError, "gallery_labels"),
    ])
    def test_bad_input(self, kwargs, error, match):
        args = dict(ids=IDS, gallery_labels=GALLERY, query_labels=QUERY_LABELS, k=3)
        args.update(kwargs)
        with pytest.raises(error, match=match):
            topk_class_shares(**args)


class TestConfusions:
    def test_labelled_matrix(self):
        shares = topk_class_shares(IDS, GALLERY, QUERY_LABELS, k=3)
        ax = plot_confusions(shares, [0, 2], class_names=NAMES_3, k=3, model="old", seen_classes=[0])
        assert ax.get_title().startswith(f"{label('old')}: classes of the top-3 results")
        assert ax.get_xlabel() == "class of a top-3 result (* = seen in the model's training)"
        assert ax.get_ylabel() == "query class"
        assert [t.get_text() for t in ax.get_xticklabels()] == ["zero *", "one", "two"]
        assert [t.get_text() for t in ax.get_yticklabels()] == ["zero", "two"]
        cbar = ax.collections[0].colorbar
        assert cbar.ax.get_ylabel() == "share of the top-3 results"
        assert cbar.mappable.get_clim() == (0.0, 1.0)
        annotations = [t.get_text() for t in ax.texts]
        assert annotations == ["50", "17", "33", "33", "0", "67"]
        # the query's own class is outlined: cells (row 0, column 0) and (row 1, column 2)
        outlined = {(p.get_x(), p.get_y()) for p in ax.patches}
        assert outlined == {(0, 0), (2, 1)}

    def test_defaults_without_names(self):
        ax = plot_confusions([[0.25, 0.75]], [1])
        assert ax.get_title().startswith("Results: classes of the top-k results")
        assert ax.get_xlabel() == "class of a top-k result"
        assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "1"]

    @pytest.mark.parametrize("shares, classes, kwargs, match", [
        ([[0.5, 0.5]], [0, 1], {}, "one row per query class"),
        ([0.5, 0.5], [0], {}, "one row per query class"),
        ([[1.5, 0.5]], [0], {}, r"shares in \[0, 1\]"),
        ([[np.nan, 0.5]], [0], {}, r"shares in \[0, 1\]"),
        ([[0.5, 0.5]], [2], {}, r"query_classes must be classes 0 \.\. 1"),
        ([[0.5, 0.5]], [0], dict(class_names=["a"]), "class_names has 1 names"),
    ])
    def test_bad_input(self, shares, classes, kwargs, match):
        with pytest.raises(ValueError, match=match):
            plot_confusions(shares, classes, **kwargs)


def _pixel_rankings(images, k):
    flat = images.reshape(len(images), -1)
    flat = flat / np.linalg.norm(flat, axis=1, keepdims=True)
    scores = flat @ flat.T
    np.fill_diagonal(scores, -np.inf)
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


@pytest.mark.parametrize("name", ["digits", "fashion_mnist"])
def test_real_images_render(name):
    """Both figures on a real dataset, ranked by nearest neighbours in pixel space."""
    if name == "fashion_mnist" and not DEBIAN_FASHION.is_dir():
        pytest.skip("Fashion-MNIST's Debian package (dataset-fashion-mnist) is not installed")
    data = load_dataset(name, **({"n_train": 200, "n_test": 300} if name == "fashion_mnist" else {}))
    images, labels = data.test.tensors[0], data.test_labels
    ids = _pixel_rankings(images.numpy(), 10)
    classes = FASHION_MNIST_CLASSES if name == "fashion_mnist" else None
    fig = plot_query_results(images, labels, 0, {"old": ids[0], "new": ids[0][::-1]}, class_names=classes)
    assert figure_to_png(fig).startswith(PNG_MAGIC)
    unseen = [c for c in range(data.num_classes) if c not in data.old_classes]
    shares = topk_class_shares(ids, labels, labels, k=10, query_classes=unseen)
    ax = plot_confusions(shares, unseen, class_names=classes, k=10, model="old", seen_classes=data.old_classes)
    assert figure_to_png(ax.figure).startswith(PNG_MAGIC)
