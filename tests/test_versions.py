"""The K-version evaluation engine (backfill_lib.evaluation.evaluate_version_states) and the
multi-version layer (backfill_lib.versions) against brute force.

Brute force: every state's merged score matrix built column by column from the version each item
is stored under, ranked with a stable numpy argsort (descending score, ties to the smaller index)
for top-k, and average precision with a tied group as one threshold (scikit-learn's rule), counted
item by item.
"""

import itertools

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from sklearn.metrics import average_precision_score

from backfill_lib.evaluation import evaluate_states, evaluate_version_states
from core_helpers import unit

# Unit vectors whose inner products are exact multiples of 1/16: scores tie often and exactly.
_DYADIC = np.array([v for v in itertools.product(range(-4, 5), repeat=5) if sum(x * x for x in v) == 16],
                   dtype=np.float32) / 4


def _embeddings(rng, n, tied, dim):
    if tied:
        return _DYADIC[rng.integers(len(_DYADIC), size=n)]
    return unit(rng.normal(size=(n, dim)))


def merged_scores(queries, galleries, storage, exclude_self):
    """Merged float32 score matrix of one state: column g scored in the space it is stored in."""
    per_version = [q @ g.T for q, g in zip(queries, galleries)]
    scores = np.stack(per_version)[storage, :, np.arange(len(storage))].T.copy()
    if exclude_self:
        np.fill_diagonal(scores, -np.inf)
    return scores


def brute_force(queries, galleries, versions, qy, gy, exclude_self, ks):
    n_states, n_q = len(versions), len(queries[0])
    ap = np.full((n_states, n_q), np.nan)
    hits = {k: np.zeros((n_states, n_q), dtype=bool) for k in ks}
    for s, storage in enumerate(versions):
        scores = merged_scores(queries, galleries, storage, exclude_self)
        relevant = qy[:, None] == gy[None, :]
        if exclude_self:
            np.fill_diagonal(relevant, False)
        ranking = np.argsort(-scores, axis=1, kind="stable")
        for k in ks:
            hits[k][s] = np.take_along_axis(relevant, ranking[:, :k], axis=1).any(axis=1)
        for i in range(n_q):
            rel = np.flatnonzero(relevant[i])
            if len(rel) == 0:
                continue
            finite = np.isfinite(scores[i])
            precision = [(relevant[i] & (scores[i] >= scores[i, g])).sum() / (finite & (scores[i] >= scores[i, g])).sum()
                         for g in rel]
            ap[s, i] = np.mean(precision)
    return ap, hits


@st.composite
def cases(draw):
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    n_versions = draw(st.integers(1, 3))
    n = draw(st.integers(6, 35))
    tied = draw(st.booleans())
    separate = draw(st.booleans())
    exclude_self = not separate and draw(st.booleans())
    n_q = int(rng.integers(1, 25)) if separate else n
    dims = [5 if tied else int(rng.integers(2, 7)) for _ in range(n_versions)]
    galleries = [_embeddings(rng, n, tied, d) for d in dims]
    queries = [_embeddings(rng, n_q, tied, d) for d in dims] if separate else galleries
    n_classes = draw(st.integers(1, 5))
    gy = rng.integers(0, n_classes, size=n)
    qy = gy if not separate else rng.integers(0, n_classes + 1, size=n_q)  # label n_classes: no relevant item
    n_states = draw(st.integers(1, 6))
    kind = draw(st.sampled_from(["random", "backfill"]))
    if kind == "random":  # any storage in any state
        versions = rng.integers(0, n_versions, size=(n_states, n))
    else:  # a backfill to the newest version in an order, from a random mixed start
        start, order = rng.integers(0, n_versions, size=n), rng.permutation(n)
        versions = np.tile(start, (n_states, 1))
        for s, m in enumerate(sorted(rng.integers(0, n + 1, size=n_states))):
            versions[s, order[:m]] = n_versions - 1
    ks = tuple(sorted({1, min(3, n - exclude_self), min(5, n - exclude_self)}))
    return dict(queries=queries, galleries=galleries, versions=versions, query_labels=qy, gallery_labels=gy,
                exclude_self=exclude_self, ks=ks, chunk_size=draw(st.integers(1, 2 * n)))


@given(cases())
def test_engine_is_brute_force(case):
    got = evaluate_version_states(**case, device="numpy")
    ap, hits = brute_force(case["queries"], case["galleries"], case["versions"], case["query_labels"],
                           case["gallery_labels"], case["exclude_self"], case["ks"])
    np.testing.assert_allclose(got.ap, ap, rtol=0, atol=1e-12)  # nan where no relevant item, in both
    for k in case["ks"]:
        np.testing.assert_array_equal(got.hits[k], hits[k])


@given(cases())
def test_ap_is_sklearns(case):
    got = evaluate_version_states(**case, device="numpy")
    s = len(case["versions"]) - 1
    scores = merged_scores(case["queries"], case["galleries"], case["versions"][s], case["exclude_self"])
    for i, row in enumerate(scores):
        keep = np.isfinite(row)
        rel = (case["gallery_labels"] == case["query_labels"][i])[keep]
        if rel.any():
            assert got.ap[s, i] == pytest.approx(average_precision_score(rel, row[keep]), abs=1e-12)
        else:
            assert np.isnan(got.ap[s, i])


@given(cases())
def test_torch_on_the_cpu_gives_the_numpy_numbers(case):
    pytest.importorskip("torch")
    a = evaluate_version_states(**case, device="numpy")
    b = evaluate_version_states(**case, device="cpu")
    assert (a.device, b.device) == ("numpy", "cpu")
    np.testing.assert_allclose(a.ap, b.ap, rtol=0, atol=1e-6)
    for k in case["ks"]:
        np.testing.assert_array_equal(a.hits[k], b.hits[k])


@given(st.integers(0, 2**32 - 1), st.booleans(), st.booleans())
def test_two_versions_equal_the_two_version_engine(seed, tied, exclude_self):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(6, 40))
    old, new = _embeddings(rng, n, tied, 4), _embeddings(rng, n, tied, 6)
    y = rng.integers(0, 4, size=n)
    order = rng.permutation(n)
    n_backfilled = sorted(rng.integers(0, n + 1, size=int(rng.integers(1, 7))).tolist())
    versions = np.zeros((len(n_backfilled), n), dtype=int)
    for s, m in enumerate(n_backfilled):
        versions[s, order[:m]] = 1
    ks = (1, 5)
    two = evaluate_states(old, old, new, new, y, y, order, n_backfilled, exclude_self=exclude_self, ks=ks,
                          device="numpy")
    k_ver = evaluate_version_states([old, new], [old, new], versions, y, y, exclude_self=exclude_self, ks=ks,
                                    device="numpy")
    np.testing.assert_allclose(k_ver.ap, two.ap, rtol=0, atol=1e-12)
    for k in ks:
        np.testing.assert_array_equal(k_ver.hits[k], two.hits[k])


@pytest.mark.parametrize("n_states", [62, 63, 70])
def test_many_states(n_states):
    # Up to 62 states the engine tracks states as bits; beyond, it counts every needle (the same numbers).
    rng = np.random.default_rng(n_states)
    n = 12
    spaces = [_DYADIC[rng.integers(len(_DYADIC), size=n)] for _ in range(3)]
    versions = rng.integers(0, 3, size=(n_states, n))
    y = rng.integers(0, 3, size=n)
    got = evaluate_version_states(spaces, spaces, versions, y, y, exclude_self=True, ks=(1, 5), device="numpy")
    ap, hits = brute_force(spaces, spaces, versions, y, y, True, (1, 5))
    np.testing.assert_allclose(got.ap, ap, rtol=0, atol=1e-12)
    for k in (1, 5):
        np.testing.assert_array_equal(got.hits[k], hits[k])


def test_hand_computed_three_spaces():
    # Items 0..3; item g stored under version g % 3. Query = item 0 (left out), label 0; items 2, 3 relevant.
    e = np.eye(3, dtype=np.float32)
    q = [np.array([[1, 0, 0]] * 4, np.float32), np.array([[0, 1, 0]] * 4, np.float32),
         np.array([[0, 0, 1]] * 4, np.float32)]
    galleries = [e[[0, 1, 2, 2]], e[[1, 0, 2, 1]], e[[2, 2, 0, 2]]]
    # Scores of query row 0: item1 (v1): q1·g1[1] = [0,1,0]·[1,0,0] = 0; item2 (v2): [0,0,1]·[1,0,0] = 0;
    # item3 (v0): [1,0,0]·[0,0,1] = 0 -> all tie at 0; ranking 1, 2, 3 by index.
    versions = np.array([[0, 1, 2, 0]])
    m = evaluate_version_states(q, galleries, versions, [0, 1, 0, 0], [0, 1, 0, 0], exclude_self=True, ks=(1, 2),
                                device="numpy")
    assert not m.hits[1][0, 0] and m.hits[2][0, 0]
    assert m.ap[0, 0] == pytest.approx(2 / 3)  # one threshold of 3 items, 2 relevant
    # Give item 3 a score of 1 through version 0's query: it moves to the top.
    galleries[0][3] = [1, 0, 0]
    m = evaluate_version_states(q, galleries, versions, [0, 1, 0, 0], [0, 1, 0, 0], exclude_self=True, ks=(1, 2),
                                device="numpy")
    assert m.hits[1][0, 0]
    assert m.ap[0, 0] == pytest.approx((1 + 2 / 3) / 2)


class TestBadInput:
    @pytest.fixture
    def args(self):
        rng = np.random.default_rng(0)
        g = [unit(rng.normal(size=(8, 3))), unit(rng.normal(size=(8, 4))), unit(rng.normal(size=(8, 5)))]
        y = np.arange(8) % 2
        return dict(queries=g, galleries=g, versions=np.array([[0, 1, 2, 0, 1, 2, 0, 1]]), query_labels=y,
                    gallery_labels=y)

    def test_version_index_out_of_range(self, args):
        with pytest.raises(ValueError, match=r"versions holds index 3, but there are 3 versions: each entry must be in \[0, 2\]"):
            evaluate_version_states(**{**args, "versions": [[0, 1, 2, 3, 0, 0, 0, 0]]})
        with pytest.raises(ValueError, match="versions holds index -1"):
            evaluate_version_states(**{**args, "versions": [[0, 1, 2, -1, 0, 0, 0, 0]]})

    def test_versions_shape_and_type(self, args):
        with pytest.raises(ValueError, match=r"versions must be a 2-D array \(n_states, 8\).*wrap a single state"):
            evaluate_version_states(**{**args, "versions": [0, 1, 2, 0, 1, 2, 0, 1]})
        with pytest.raises(ValueError, match=r"versions must be a 2-D array \(n_states, 8\)"):
            evaluate_version_states(**{**args, "versions": [[0, 1]]})
        with pytest.raises(ValueError, match="versions must hold integer version indices"):
            evaluate_version_states(**{**args, "versions": [[0.5] * 8]})

    def test_mismatched_dims_and_lengths(self, args):
        q = list(args["queries"])
        q[1] = q[2]
        with pytest.raises(ValueError, match=r"queries\[1\]"):
            evaluate_version_states(**{**args, "queries": q})
        g = list(args["galleries"])
        g[2] = g[2][:5]
        with pytest.raises(ValueError, match=r"galleries\[0\] has 8 items but galleries\[2\] has 5"):
            evaluate_version_states(**{**args, "galleries": g, "queries": args["queries"][:2] + [g[2]]})
        with pytest.raises(ValueError, match=r"queries\[0\] has 8 rows but queries\[1\] has 3"):
            evaluate_version_states(**{**args, "queries": [q[0], args["queries"][1][:3], q[2]]})

    def test_number_of_versions(self, args):
        with pytest.raises(ValueError, match="one array per model version"):
            evaluate_version_states(**{**args, "queries": args["queries"][:2]})
        with pytest.raises(ValueError, match="one array per model version"):
            evaluate_version_states(**{**args, "queries": [], "galleries": []})
        with pytest.raises(TypeError, match="lists \\(or tuples\\) of K arrays"):
            evaluate_version_states(**{**args, "queries": np.stack([args["queries"][0]] * 3)})

    def test_leave_one_out_and_ks(self, args):
        with pytest.raises(ValueError, match="exclude_self=True needs one query per gallery item"):
            evaluate_version_states(**{**args, "queries": [q[:3] for q in args["queries"]],
                                       "query_labels": args["query_labels"][:3]}, exclude_self=True)
        with pytest.raises(ValueError, match=r"ks\[0\] must be at least 1"):
            evaluate_version_states(**args, ks=(0,))
        with pytest.raises(ValueError, match=r"chunk_size must be a positive integer \(queries scored at once"):
            evaluate_version_states(**args, chunk_size=0)


# --- the multi-version layer (backfill_lib.versions) ------------------------------------------

from backfill_lib.backfill import evaluate_backfill, rank_merge, reverse_transform  # noqa: E402
from backfill_lib.versions import (MultiVersionStrategy, evaluate_versions, multi_rank_merge,  # noqa: E402
                                   storage_states)


def test_storage_states():
    initial = np.array([0, 1, 1, 0, 1])
    out = storage_states(initial, [4, 2, 0, 1, 3], [0.0, 0.4, 1.0], 2)
    assert out.tolist() == [[0, 1, 1, 0, 1], [0, 1, 2, 0, 2], [2, 2, 2, 2, 2]]
    with pytest.raises(ValueError, match=r"new_version=3 is not a version index in \[0, 2\]"):
        storage_states(initial, np.arange(5), [0.5], 3, n_versions=3)
    with pytest.raises(ValueError, match="order must be a permutation"):
        storage_states(initial, [0, 0, 1, 2, 3], [0.5], 2)
    with pytest.raises(ValueError, match="versions holds index 5"):
        storage_states([0, 5, 0, 0, 0], np.arange(5), [0.5], 2, n_versions=3)


@pytest.mark.parametrize("exclude_self", [True, False])
def test_two_versions_give_evaluate_backfills_curve(exclude_self):
    rng = np.random.default_rng(7)
    old, new, psi = unit(rng.normal(size=(60, 4))), unit(rng.normal(size=(60, 6))), unit(rng.normal(size=(60, 4)))
    y = rng.integers(0, 4, size=60)
    order = rng.permutation(60)
    for two, k in [(rank_merge(old, new), multi_rank_merge([old, new])),
                   (reverse_transform(old, psi, new), MultiVersionStrategy("rt", (psi, new), (old, new),
                                                                           queries_are_gallery=True))]:
        a = evaluate_backfill(two, y, order=order, exclude_self=exclude_self)
        b = evaluate_versions(k, y, order=order, exclude_self=exclude_self, device="numpy")
        for field in ("map", "top1", "top5", "negative_flips"):
            np.testing.assert_allclose(getattr(b, field), getattr(a, field), rtol=0, atol=1e-12)
        assert b.backbone_passes == two.backbone_passes


def test_curve_is_brute_force_for_three_versions():
    rng = np.random.default_rng(11)
    n = 40
    spaces = [unit(rng.normal(size=(n, d))) for d in (3, 4, 5)]
    queries = [unit(rng.normal(size=(n, d))) for d in (3, 4, 5)]
    y = rng.integers(0, 3, size=n)
    initial = storage_states(np.zeros(n, dtype=int), rng.permutation(n), [0.6], 1)[0]
    order = rng.permutation(n)
    ratios = [0.0, 0.3, 0.7, 1.0]
    s = MultiVersionStrategy("x", queries, spaces, queries_are_gallery=True)
    curve = evaluate_versions(s, y, initial=initial, ratios=ratios, order=order, device="numpy")
    ap, hits = brute_force(queries, spaces, storage_states(initial, order, ratios, 2), y, y, True, (1, 5))
    np.testing.assert_allclose(curve.map, np.nanmean(ap, axis=1), rtol=0, atol=1e-12)
    np.testing.assert_array_equal(curve.top1, hits[1].mean(axis=1))
    flips = (hits[1][0][None, :] & ~hits[1]).mean(axis=1)  # right at r = 0, wrong at r
    np.testing.assert_allclose(curve.negative_flips, flips, rtol=0, atol=1e-12)
    assert multi_rank_merge(spaces).backbone_passes == 3


class TestStrategyBadInput:
    def test_non_unit_rows(self):
        x = unit(np.random.default_rng(0).normal(size=(6, 3)))
        with pytest.raises(ValueError, match=r"galleries\[1\]"):
            MultiVersionStrategy("s", (x, x), (x, 2 * x))
        with pytest.raises(ValueError, match=r"queries\[0\]"):
            MultiVersionStrategy("s", (0.5 * x, x), (x, x))

    def test_shapes(self):
        rng = np.random.default_rng(0)
        x, z = unit(rng.normal(size=(6, 3))), unit(rng.normal(size=(6, 4)))
        with pytest.raises(ValueError, match=r"queries\[1\]"):
            MultiVersionStrategy("s", (x, x), (x, z))
        with pytest.raises(ValueError, match="one array per model version"):
            MultiVersionStrategy("s", (x,), (x, z))
        with pytest.raises(ValueError, match=r"galleries\[0\] has 6 items but galleries\[1\] has 5"):
            MultiVersionStrategy("s", (x, z), (x, z[:5]))
        with pytest.raises(ValueError, match="queries_are_gallery=True but there are 3 queries"):
            MultiVersionStrategy("s", (x[:3], z[:3]), (x, z), queries_are_gallery=True)
        with pytest.raises(TypeError, match="list \\(or tuple\\) of arrays"):
            MultiVersionStrategy("s", x, (x,))

    def test_evaluate_versions_arguments(self):
        x = unit(np.random.default_rng(0).normal(size=(8, 3)))
        s = multi_rank_merge([x, x, x])
        y = np.arange(8) % 2
        with pytest.raises(ValueError, match=r"new_version=3 is not a version index in \[0, 2\]"):
            evaluate_versions(s, y, new_version=3)
        with pytest.raises(ValueError, match=r"initial must hold one version index per gallery item \(8\)"):
            evaluate_versions(s, y, initial=[0, 1])
        with pytest.raises(ValueError, match="versions holds index 4"):
            evaluate_versions(s, y, initial=[0, 1, 2, 4, 0, 0, 0, 0])
        with pytest.raises(TypeError, match="strategy must be a MultiVersionStrategy"):
            evaluate_versions(rank_merge(x, x), y)
        sep = MultiVersionStrategy("sep", (x[:4], x[:4]), (x, x))
        with pytest.raises(ValueError, match="exclude_self=True but strategy 'sep' has separate queries"):
            evaluate_versions(sep, y[:4], y, exclude_self=True)
        with pytest.raises(ValueError, match="gallery_labels is needed"):
            evaluate_versions(sep, y[:4])


# --- L_mc over K stored sets -----------------------------------------------------------------

def test_multi_compatible_loss_with_two_sets_is_metric_compatible_loss():
    torch = pytest.importorskip("torch")
    from backfill_lib.losses import metric_compatible_loss, multi_compatible_loss

    g = torch.Generator().manual_seed(0)
    norm = torch.nn.functional.normalize
    psi, old, rho = (norm(torch.randn(16, d, generator=g), dim=1) for d in (4, 4, 6))
    y = torch.randint(0, 3, (16,), generator=g)
    a = metric_compatible_loss(psi, old, rho, y, tau=0.2)
    b = multi_compatible_loss([psi, rho], [old, rho], y, tau=0.2)
    assert torch.allclose(a, b, atol=1e-6)
    # A third set changes the loss; stored copies of the query set keep j = i only when told.
    other = norm(torch.randn(16, 5, generator=g), dim=1)
    c = multi_compatible_loss([psi, other, rho], [old, other.clone(), rho], y, tau=0.2)
    assert not torch.allclose(b, c)
    d = multi_compatible_loss([psi, other, rho], [old, other, rho], y, tau=0.2,
                              exclude_self=[False, False, True])
    assert torch.allclose(c, d, atol=1e-6)
    with pytest.raises(ValueError, match="one tensor per version"):
        multi_compatible_loss([psi], [old, rho], y)
    with pytest.raises(ValueError, match="tau must be positive"):
        multi_compatible_loss([psi], [old], y, tau=0)
    with pytest.raises(ValueError, match=r"queries\[0\] \(16, 4\) and stored\[0\] \(16, 6\)"):
        multi_compatible_loss([psi], [rho], y)


def test_fit_multi_reverse_trains_maps_into_every_older_space():
    pytest.importorskip("torch")
    from backfill_lib.transforms import TRANSFORM_CONFIG, apply_transform
    from backfill_lib.versions import fit_multi_reverse

    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, size=200)
    centres = [rng.normal(size=(4, d)) for d in (3, 5, 6)]
    v1, v2, v3 = (unit(c[y] + 0.3 * rng.normal(size=(200, c.shape[1]))) for c in centres)
    heads = fit_multi_reverse(v3, [v1, v2], y, steps=150, config=TRANSFORM_CONFIG)
    assert len(heads) == 2
    for head, target in zip(heads, (v1, v2)):
        mapped = apply_transform(head, v3)
        assert mapped.shape == target.shape
        # Mapped queries find same-class stored items: top-1 over the target space well above chance (0.25).
        scores = mapped @ target.T
        np.fill_diagonal(scores, -np.inf)
        assert (y[scores.argmax(axis=1)] == y).mean() > 0.8
    with pytest.raises(ValueError, match="targets is empty"):
        fit_multi_reverse(v3, [], y)
    with pytest.raises(ValueError, match=r"new has 200 rows but targets\[1\] has 10"):
        fit_multi_reverse(v3, [v1, v2[:10]], y)
