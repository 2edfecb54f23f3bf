"""The evaluation engine (backfill_lib.evaluation) against the old engine and scikit-learn.

The old engine (tests/reference_engine.py) sorts every merged row at every state; the new one
must give the same numbers: top-k hits always (same tie rule: descending score, smaller index
first), average precision exactly where no scores tie, and scikit-learn's
``average_precision_score`` (a tied group is one threshold) everywhere.
"""

import itertools

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from sklearn.metrics import average_precision_score

from backfill_lib.evaluation import StateMetrics, choose_device, evaluate_states
from core_helpers import unit
from reference_engine import reference_states

# Unit vectors with entries in {0, ±1/4, ±2/4, ±3/4, ±1} (integer vectors of norm 4, over 4): every
# inner product is an exact multiple of 1/16 on any BLAS, so scores tie often and exactly.
_DYADIC = np.array([v for v in itertools.product(range(-4, 5), repeat=5) if sum(x * x for x in v) == 16],
                   dtype=np.float32) / 4


def _embeddings(rng, n, tied, dim=None):
    if tied:
        return _DYADIC[rng.integers(len(_DYADIC), size=n)]
    return unit(rng.normal(size=(n, dim or int(rng.integers(2, 7)))))


def _merged_rows(q_old, g_old, q_new, g_new, order, m, exclude_self):
    """Merged score matrix of one state (float32, as the engines compute it); -inf for self."""
    mask = np.zeros(len(g_old), dtype=bool)
    mask[order[:m]] = True
    scores = np.where(mask[None, :], q_new @ g_new.T, q_old @ g_old.T)
    if exclude_self:
        np.fill_diagonal(scores, -np.inf)
    return scores


@st.composite
def cases(draw):
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    n = draw(st.integers(6, 40))
    tied = draw(st.booleans())
    separate = draw(st.booleans())
    exclude_self = not separate and draw(st.booleans())
    n_q = int(rng.integers(1, 30)) if separate else n
    g_old, g_new = _embeddings(rng, n, tied), _embeddings(rng, n, tied)
    if separate:
        q_old = _embeddings(rng, n_q, tied, g_old.shape[1])
        q_new = _embeddings(rng, n_q, tied, g_new.shape[1])
    else:
        q_old, q_new = g_old, g_new
    n_classes = draw(st.integers(1, 5))
    gy = rng.integers(0, n_classes, size=n)
    qy = gy if not separate else rng.integers(0, n_classes + 1, size=n_q)  # label n_classes: no relevant item
    order_kind = draw(st.sampled_from(["random", "identity", "reversed"]))
    order = {"random": rng.permutation(n), "identity": np.arange(n), "reversed": np.arange(n)[::-1].copy()}[order_kind]
    if draw(st.booleans()):  # offline: old until the end, then everything new
        n_backfilled = [0] * draw(st.integers(0, 3)) + [n]
    else:
        n_backfilled = sorted(rng.integers(0, n + 1, size=draw(st.integers(1, 6))).tolist())
    chunk_size = draw(st.integers(1, 2 * n))
    return dict(query_old=q_old, gallery_old=g_old, query_new=q_new, gallery_new=g_new, query_labels=qy,
                gallery_labels=gy, order=order, n_backfilled=n_backfilled, exclude_self=exclude_self,
                chunk_size=chunk_size), tied


# Both ways the numpy path counts (binary searches in the slices; one sort of each query's 2N
# scores) must give the reference's numbers; "auto" picks one of them per block of queries.
COUNTINGS = ("blocks", "sorted")


def _n_searchable(case):
    return len(case["gallery_old"]) - int(case["exclude_self"])


@pytest.mark.parametrize("counting", COUNTINGS)
@given(drawn=cases())
def test_same_hits_as_the_reference_and_same_ap_without_ties(counting, drawn):
    case, tied = drawn
    ks = tuple(sorted({1, min(5, _n_searchable(case))}))
    new = evaluate_states(**case, ks=ks, device="numpy", counting=counting)
    ap, hits = reference_states(**case, ks=ks)
    for k in ks:
        np.testing.assert_array_equal(new.hits[k], hits[k])
    # AP agrees wherever no two scores of a row tie (continuous vectors can still tie in float32,
    # e.g. two nearly equal items both scoring 1.0 against a query).
    for s, m in enumerate(case["n_backfilled"]):
        scores = _merged_rows(case["query_old"], case["gallery_old"], case["query_new"], case["gallery_new"],
                              case["order"], m, case["exclude_self"])
        untied = np.array([len(np.unique(r[np.isfinite(r)])) == np.isfinite(r).sum() for r in scores])
        assert tied or untied.mean() > 0.5  # the comparison below must not be vacuous
        np.testing.assert_allclose(new.ap[s, untied], ap[s, untied], rtol=0, atol=1e-9)


@pytest.mark.parametrize("counting", COUNTINGS)
@given(drawn=cases())
def test_ap_is_sklearns_with_ties(counting, drawn):
    case, _ = drawn
    new = evaluate_states(**case, ks=(1,), device="numpy", counting=counting)
    for s, m in enumerate(case["n_backfilled"]):
        scores = _merged_rows(case["query_old"], case["gallery_old"], case["query_new"], case["gallery_new"],
                              case["order"], m, case["exclude_self"])
        for i, row in enumerate(scores):
            keep = np.isfinite(row)
            rel = (case["gallery_labels"] == case["query_labels"][i])[keep]
            if not rel.any():
                assert np.isnan(new.ap[s, i])
                continue
            assert new.ap[s, i] == pytest.approx(average_precision_score(rel, row[keep]), abs=1e-12)


@given(cases())
def test_torch_on_the_cpu_gives_the_numpy_numbers(drawn):
    case, _ = drawn
    ks = tuple(sorted({1, min(5, _n_searchable(case))}))
    a = evaluate_states(**case, ks=ks, device="numpy")
    b = evaluate_states(**case, ks=ks, device="cpu")
    assert (a.device, b.device) == ("numpy", "cpu")
    np.testing.assert_allclose(a.ap, b.ap, rtol=0, atol=1e-6)
    for k in ks:
        np.testing.assert_array_equal(a.hits[k], b.hits[k])


@pytest.mark.parametrize("counting", COUNTINGS)
def test_hand_computed_ties(counting):
    # Query 0 (label 0) against items 1..3 after leave-one-out; all scores tie at 0.
    x = np.eye(4, dtype=np.float32)
    y = np.array([0, 1, 0, 0])
    m = evaluate_states(x, x, x, x, y, y, np.arange(4), [0], exclude_self=True, ks=(1, 2, 3), device="numpy",
                        counting=counting)
    # Ranking 1, 2, 3 by index: top-1 is item 1 (wrong), top-2 has item 2.
    assert not m.hits[1][0, 0] and m.hits[2][0, 0]
    # One threshold holding 3 items, 2 relevant: AP = 2/3 for each of them.
    assert m.ap[0, 0] == pytest.approx(2 / 3)
    assert np.isnan(m.ap[0, 1])  # label 1 has no other item


def test_states_share_one_computation_but_are_independent():
    rng = np.random.default_rng(3)
    old, new = unit(rng.normal(size=(50, 4))), unit(rng.normal(size=(50, 6)))
    y = rng.integers(0, 3, size=50)
    order = rng.permutation(50)
    together = evaluate_states(old, old, new, new, y, y, order, [0, 10, 25, 50], exclude_self=True, device="numpy")
    for s, m in enumerate([0, 10, 25, 50]):
        alone = evaluate_states(old, old, new, new, y, y, order, [m], exclude_self=True, device="numpy")
        np.testing.assert_allclose(together.ap[s], alone.ap[0], rtol=0, atol=1e-12)
        np.testing.assert_array_equal(together.hits[5][s], alone.hits[5][0])


def test_returns_state_metrics():
    x = unit(np.random.default_rng(0).normal(size=(8, 3)))
    m = evaluate_states(x, x, x, x, np.zeros(8, int), np.zeros(8, int), np.arange(8), [0, 8], device="numpy")
    assert isinstance(m, StateMetrics) and m.ap.shape == (2, 8) and set(m.hits) == {1, 5}
    assert np.all(m.ap == 1.0)  # one class: every item relevant


class TestBadInput:
    @pytest.fixture
    def args(self):
        x = unit(np.random.default_rng(0).normal(size=(8, 3)))
        y = np.arange(8) % 2
        return dict(query_old=x, gallery_old=x, query_new=x, gallery_new=x, query_labels=y, gallery_labels=y,
                    order=np.arange(8), n_backfilled=[0, 4])

    def test_n_backfilled(self, args):
        with pytest.raises(ValueError, match="n_backfilled must be non-decreasing"):
            evaluate_states(**{**args, "n_backfilled": [4, 2]})
        with pytest.raises(ValueError, match=r"n_backfilled must be non-decreasing integers in \[0, 8\]"):
            evaluate_states(**{**args, "n_backfilled": [9]})
        with pytest.raises(ValueError, match="n_backfilled must be a non-empty"):
            evaluate_states(**{**args, "n_backfilled": []})

    def test_ks_and_chunks(self, args):
        with pytest.raises(ValueError, match=r"ks\[0\] must be at least 1"):
            evaluate_states(**args, ks=(0,))
        with pytest.raises(ValueError, match=r"ks\[1\]=8 is larger than the gallery \(7 items searchable\)"):
            evaluate_states(**args, ks=(1, 8), exclude_self=True)
        with pytest.raises(TypeError, match="ks must be a non-empty sequence"):
            evaluate_states(**args, ks=5)
        with pytest.raises(ValueError, match=r"chunk_size must be a positive integer \(queries scored at once"):
            evaluate_states(**args, chunk_size=0)

    def test_shapes(self, args):
        with pytest.raises(ValueError, match="exclude_self=True needs one query per gallery item"):
            evaluate_states(**{**args, "query_old": args["query_old"][:3], "query_new": args["query_new"][:3],
                               "query_labels": args["query_labels"][:3]}, exclude_self=True)
        with pytest.raises(ValueError, match=r"order must be a permutation of range\(8\)"):
            evaluate_states(**{**args, "order": np.zeros(8, int)})

    def test_device(self, args):
        with pytest.raises(ValueError, match="device must be None, 'numpy', 'cpu' or 'cuda'"):
            evaluate_states(**args, device="tpu")
        assert choose_device("numpy") == "numpy"
        assert choose_device(None) in ("numpy", "cuda")


def test_cuda_without_gpu_is_a_clear_error():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ValueError, match="torch sees no GPU"):
        choose_device("cuda")


def test_the_counting_is_chosen_by_the_number_of_relevant_items():
    from backfill_lib.evaluation import _prefer_sorted
    # 5,000 items, 11 states: 10 classes (500 relevant items per query) are counted sorted,
    # 50 classes (100) too, 100 classes (50) by the blocks; one relevant item never sorted.
    assert _prefer_sorted(500, 5000, 11) and _prefer_sorted(100, 5000, 11)
    assert not _prefer_sorted(50, 5000, 11) and not _prefer_sorted(1, 5000, 11)


def test_an_unknown_counting_is_refused():
    x = np.eye(3, dtype=np.float32)
    with pytest.raises(ValueError, match="counting must be 'auto', 'blocks' or 'sorted', got 'fast'"):
        evaluate_states(x, x, x, x, [0, 1, 1], [0, 1, 1], np.arange(3), [0], ks=(1,), counting="fast")


@pytest.mark.parametrize("n_classes", [2, 10])
def test_sorted_and_blocks_agree_at_scale_with_leave_one_out(n_classes):
    # Several blocks of queries (chunk 64) and of the sorted path's scratch rows, 11 states.
    rng = np.random.default_rng(n_classes)
    n = 600
    y = rng.integers(0, n_classes, size=n)
    old, new = unit(rng.normal(size=(n, 8)) + 2 * np.eye(8)[y % 8]), unit(rng.normal(size=(n, 12)))
    states = [int(round(r * n)) for r in np.linspace(0, 1, 11)]
    args = (old, old, new, new, y, y, rng.permutation(n), states)
    a = evaluate_states(*args, exclude_self=True, ks=(1, 5, 50), chunk_size=64, device="numpy", counting="blocks")
    b = evaluate_states(*args, exclude_self=True, ks=(1, 5, 50), chunk_size=64, device="numpy", counting="sorted")
    np.testing.assert_allclose(a.ap, b.ap, rtol=0, atol=1e-12)
    for k in (1, 5, 50):
        np.testing.assert_array_equal(a.hits[k], b.hits[k])
    assert 0.2 < np.nanmean(b.ap) < 1.0  # a real ranking, not a degenerate one


# The sorted counting places every score among the query's relevant scores (the needles) through
# score buckets, without sorting the row; it must be an exact searchsorted whatever the scores.
_SCORE_KINDS = st.sampled_from(["normal", "ties", "huge", "tiny spread", "signed zeros", "subnormal"])


def _scores_of(kind, rng, shape):
    if kind == "normal":
        x = rng.normal(size=shape)
    elif kind == "ties":
        x = rng.integers(-3, 4, size=shape) / 4
    elif kind == "huge":
        x = rng.choice([-1, 1], size=shape) * 10.0 ** rng.uniform(30, 38, size=shape)
    elif kind == "tiny spread":
        x = 0.5 + rng.integers(-3, 4, size=shape) * np.finfo(np.float32).eps
    elif kind == "signed zeros":
        x = rng.choice([-0.0, 0.0, 1.0, -1.0], size=shape)
    else:
        x = rng.integers(-5, 6, size=shape) * np.finfo(np.float32).smallest_subnormal
    return x.astype(np.float32)


@given(kind=_SCORE_KINDS, seed=st.integers(0, 2**32 - 1), buckets=st.sampled_from([3, 4, 11, 64]))
def test_needles_are_placed_exactly(kind, seed, buckets):
    from backfill_lib.evaluation import _TOP, _keys_inplace, _needles_at_or_below
    rng = np.random.default_rng(seed)
    r, n, width = int(rng.integers(1, 5)), int(rng.integers(1, 30)), int(rng.integers(1, 6))
    scores = _scores_of(kind, rng, (r, 2 * n))
    scores[rng.random(scores.shape) < 0.05] = -np.inf  # leave-one-out marks
    cols = np.sort(np.stack([rng.choice(n, size=min(width, n), replace=False) for _ in range(r)]), axis=1)
    valid = rng.random(cols.shape) < 0.8
    at = np.concatenate([cols, cols + n], axis=1)
    scores[np.arange(r)[:, None], at] = np.where(np.isinf(scores[np.arange(r)[:, None], at]), 0.0,
                                                 scores[np.arange(r)[:, None], at])  # a needle is a real score
    keys = _keys_inplace(scores.copy())
    needles = np.where(np.concatenate([valid, valid], axis=1), np.take_along_axis(keys, at, axis=1), _TOP)
    needles.sort(axis=1)
    seg, equal_to = _needles_at_or_below(scores, needles, valid, cols, n, buckets)
    for i in range(r):
        real = needles[i][needles[i] < _TOP]
        np.testing.assert_array_equal(seg[i], np.searchsorted(real, keys[i], side="right"))
        for k, v in enumerate(real):
            if (real == v).sum() == 1:  # counted for needles alone among the needles
                assert equal_to[i, k] == (keys[i] == v).sum()


@pytest.mark.parametrize("kind", ["huge", "tiny spread", "signed zeros"])
def test_sorted_counting_with_extreme_scores(kind):
    # Scores near float32's limits, all but equal, or signed zeros: the buckets must stay exact.
    rng = np.random.default_rng(11)
    n, d = 60, 4
    if kind == "huge":
        old, new = unit(rng.normal(size=(n, d))) * 3e18, unit(rng.normal(size=(n, d))) * 2e18
    elif kind == "tiny spread":
        base = unit(rng.normal(size=(1, d)))
        old = (base + 1e-7 * rng.integers(-2, 3, size=(n, d))).astype(np.float32)
        new = (base + 1e-6 * rng.normal(size=(n, d))).astype(np.float32)
    else:
        old, new = np.eye(d, dtype=np.float32)[rng.integers(d, size=n)], -np.eye(d, dtype=np.float32)[rng.integers(d, size=n)]
    y = rng.integers(0, 3, size=n)
    order, states = rng.permutation(n), [0, 15, 30, 45, 60]
    case = dict(query_old=old, gallery_old=old, query_new=new, gallery_new=new, query_labels=y, gallery_labels=y,
                order=order, n_backfilled=states, exclude_self=True)
    got = evaluate_states(**case, ks=(1, 5), device="numpy", counting="sorted")
    _, hits = reference_states(**case, ks=(1, 5))
    for k in (1, 5):
        np.testing.assert_array_equal(got.hits[k], hits[k])
    for s, m in enumerate(states):
        scores = _merged_rows(old, old, new, new, order, m, True)
        for i, row in enumerate(scores):
            keep = np.isfinite(row)
            rel = (y == y[i])[keep]
            expected = average_precision_score(rel, row[keep]) if rel.any() else np.nan
            np.testing.assert_allclose(got.ap[s, i], expected, rtol=0, atol=1e-12)
