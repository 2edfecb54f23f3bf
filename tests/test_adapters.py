"""Closed-form bridges (issue 19): Procrustes recovers a known rotation (and a scale), handles
different widths, low-rank affine recovers a low-rank map, SLERP's ends are the two queries it
blends, files round-trip and refuse what is not ours, selection picks the right family."""

import numpy as np
import pytest

from backfill_lib.adapters import (ClosedFormAdapter, LowRankAffineAdapter, ProcrustesAdapter, select_adapter,
                                   slerp, slerp_query)
from backfill_lib.validation import normalize_rows


@pytest.fixture
def rng():
    return np.random.default_rng(7)


def _rotation(rng, d):
    q, r = np.linalg.qr(rng.normal(size=(d, d)))
    return q * np.sign(np.diag(r))


class TestProcrustes:
    def test_recovers_a_known_rotation_with_shifted_means(self, rng):
        X = rng.normal(size=(300, 8))
        R = _rotation(rng, 8)
        Y = X @ R + 3.0
        p = ProcrustesAdapter(normalize=False).fit(X, Y)
        np.testing.assert_allclose(p.rotation_, R, atol=1e-6)
        np.testing.assert_allclose(p.transform(X[:5]), Y[:5], atol=1e-4)
        assert float(p.scale_) == 1.0

    def test_uncentred_fit_misses_a_shift(self, rng):
        X = rng.normal(size=(300, 8))
        Y = X @ _rotation(rng, 8) + 3.0
        err_c = np.abs(ProcrustesAdapter(normalize=False).fit(X, Y).transform(X) - Y).max()
        err_u = np.abs(ProcrustesAdapter(center=False, normalize=False).fit(X, Y).transform(X) - Y).max()
        assert err_c < 1e-4 < 0.5 < err_u

    def test_scale(self, rng):
        X = rng.normal(size=(200, 5))
        R = _rotation(rng, 5)
        p = ProcrustesAdapter(scale=True, normalize=False).fit(X, 2.5 * X @ R)
        assert float(p.scale_) == pytest.approx(2.5, rel=1e-6)
        np.testing.assert_allclose(p.rotation_, R, atol=1e-6)

    def test_rotation_is_orthogonal_under_noise(self, rng):
        X = rng.normal(size=(100, 6))
        p = ProcrustesAdapter().fit(X, rng.normal(size=(100, 6)))
        np.testing.assert_allclose(p.rotation_.T @ p.rotation_, np.eye(6), atol=1e-8)

    @pytest.mark.parametrize("d_in, d_out", [(4, 7), (7, 4)])
    def test_different_widths(self, rng, d_in, d_out):
        # the target holds the source rotated into a subspace (or the source's first coordinates)
        X = rng.normal(size=(400, d_in))
        big = _rotation(rng, max(d_in, d_out))
        padded = np.zeros((400, max(d_in, d_out)))
        padded[:, :d_in] = X
        Y = (padded @ big)[:, :d_out]
        p = ProcrustesAdapter(normalize=False).fit(X, Y)
        assert p.rotation_.shape == (d_in, d_out)
        gram = p.rotation_ @ p.rotation_.T if d_in < d_out else p.rotation_.T @ p.rotation_
        np.testing.assert_allclose(gram, np.eye(min(d_in, d_out)), atol=1e-6)
        if d_in < d_out:   # the embedding of a narrower space into a wider one is exact
            np.testing.assert_allclose(p.transform(X[:5]), Y[:5], atol=1e-4)

    def test_unit_rows_by_default(self, rng):
        X = normalize_rows(rng.normal(size=(50, 4)))
        out = ProcrustesAdapter().fit(X, X @ _rotation(rng, 4)).transform(X)
        np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)


class TestLowRank:
    def test_recovers_a_low_rank_affine_map(self, rng):
        X = rng.normal(size=(500, 8))
        W = rng.normal(size=(8, 3)) @ rng.normal(size=(3, 6))
        a = LowRankAffineAdapter(rank=3, ridge=0.0, normalize=False).fit(X, X @ W - 2.0)
        np.testing.assert_allclose(a.weight_, W, atol=1e-6)
        np.testing.assert_allclose(a.bias_, -2.0, atol=1e-6)
        assert np.linalg.matrix_rank(a.weight_, tol=1e-6) == 3

    def test_rank_truncates(self, rng):
        X = rng.normal(size=(300, 6))
        a = LowRankAffineAdapter(rank=2).fit(X, rng.normal(size=(300, 6)))
        assert np.linalg.matrix_rank(a.weight_, tol=1e-8) == 2

    def test_bad_rank(self, rng):
        with pytest.raises(ValueError, match="rank=9 is larger"):
            LowRankAffineAdapter(rank=9).fit(rng.normal(size=(20, 4)), rng.normal(size=(20, 5)))
        with pytest.raises((TypeError, ValueError), match="rank"):
            LowRankAffineAdapter(rank=0)
        with pytest.raises((TypeError, ValueError), match="ridge"):
            LowRankAffineAdapter(ridge=-1.0)


class TestSlerp:
    def test_ends_are_the_two_queries(self, rng):
        a, b = normalize_rows(rng.normal(size=(10, 5))), normalize_rows(rng.normal(size=(10, 5)))
        np.testing.assert_allclose(slerp(a, b, 0.0), a, atol=1e-6)
        np.testing.assert_allclose(slerp(a, b, 1.0), b, atol=1e-6)

    def test_midpoint_is_on_the_arc(self, rng):
        a, b = normalize_rows(rng.normal(size=(10, 5))), normalize_rows(rng.normal(size=(10, 5)))
        m = slerp(a, b, 0.3)
        np.testing.assert_allclose(np.linalg.norm(m, axis=1), 1.0, atol=1e-5)
        total = np.arccos(np.clip((a * b).sum(1), -1, 1))
        np.testing.assert_allclose(np.arccos(np.clip((a * m).sum(1), -1, 1)), 0.3 * total, atol=1e-3)
        np.testing.assert_allclose(np.arccos(np.clip((m * b).sum(1), -1, 1)), 0.7 * total, atol=1e-3)

    def test_equal_rows_stay(self, rng):
        a = normalize_rows(rng.normal(size=(3, 4)))
        np.testing.assert_allclose(slerp(a, a, 0.4), a, atol=1e-6)

    def test_bad_input(self, rng):
        a = normalize_rows(rng.normal(size=(3, 4)))
        with pytest.raises(ValueError, match="t must be in"):
            slerp(a, a, 1.5)
        with pytest.raises(ValueError, match="rows"):
            slerp(a, a[:2], 0.5)
        with pytest.raises(ValueError):
            slerp(a * 2, a, 0.5)            # not unit rows

    def test_slerp_query_ends(self, rng):
        old_q = normalize_rows(rng.normal(size=(6, 4)))
        new_q = normalize_rows(rng.normal(size=(6, 5)))
        p = ProcrustesAdapter().fit(rng.normal(size=(50, 5)), rng.normal(size=(50, 4)))
        np.testing.assert_allclose(slerp_query(old_q, new_q, p, 0.0), old_q, atol=1e-6)
        np.testing.assert_allclose(slerp_query(old_q, new_q, p, 1.0), p.transform(new_q), atol=1e-6)
        with pytest.raises(TypeError, match="new_to_old"):
            slerp_query(old_q, new_q, "procrustes")


class TestFiles:
    @pytest.mark.parametrize("adapter", [ProcrustesAdapter(scale=True), LowRankAffineAdapter(rank=2)])
    def test_round_trip(self, rng, tmp_path, adapter):
        X, Y = rng.normal(size=(60, 4)), rng.normal(size=(60, 3))
        adapter.fit(X, Y)
        back = ClosedFormAdapter.load(adapter.save(tmp_path / "a.npz"))
        assert type(back) is type(adapter) and back.get_params() == adapter.get_params()
        np.testing.assert_array_equal(back.transform(X[:7]), adapter.transform(X[:7]))

    def test_refuses_other_files(self, rng, tmp_path):
        bad = tmp_path / "x.npz"
        bad.write_bytes(b"not a zip")
        with pytest.raises(ValueError, match="not an adapter file"):
            ClosedFormAdapter.load(bad)
        np.savez(tmp_path / "k.npz", kind=np.asarray("os.system"), version=np.asarray(1))
        with pytest.raises(ValueError, match="kind 'os.system'"):
            ClosedFormAdapter.load(tmp_path / "k.npz")
        with pytest.raises(FileNotFoundError):
            ClosedFormAdapter.load(tmp_path / "missing.npz")

    def test_refuses_a_damaged_map(self, rng, tmp_path):
        a = ProcrustesAdapter().fit(rng.normal(size=(30, 4)), rng.normal(size=(30, 4)))
        a.rotation_ = a.rotation_[:, :3]
        with pytest.raises(ValueError, match="damaged"):
            ClosedFormAdapter.from_bytes(a.to_bytes())

    def test_unfitted(self):
        with pytest.raises(ValueError, match="not fitted"):
            ProcrustesAdapter().transform(np.ones((2, 3)))
        with pytest.raises(ValueError, match="not fitted"):
            ProcrustesAdapter().to_bytes()

    def test_wrong_width_and_pairs(self, rng):
        a = ProcrustesAdapter().fit(rng.normal(size=(30, 4)), rng.normal(size=(30, 4)))
        with pytest.raises(ValueError, match="X"):
            a.transform(np.ones((2, 5)))
        with pytest.raises(ValueError, match="same item"):
            ProcrustesAdapter().fit(rng.normal(size=(30, 4)), rng.normal(size=(29, 4)))
        with pytest.raises(TypeError, match="center"):
            ProcrustesAdapter(center="yes")


class TestSelect:
    def test_pairs_criterion_picks_procrustes_for_a_rotation_and_affine_for_a_shear(self, rng):
        X = rng.normal(size=(400, 6))
        name, best, scores = select_adapter(X, X @ _rotation(rng, 6) + 0.01 * rng.normal(size=(400, 6)),
                                            criterion="pairs")
        assert name.startswith("procrustes") and scores[name] > 0.95
        shear = np.diag([5.0, 3.0, 1.0, 0.3, 0.2, 0.1]) @ _rotation(rng, 6)
        name2, _, scores2 = select_adapter(X, X @ shear + 0.01 * rng.normal(size=(400, 6)), criterion="pairs")
        assert name2 == "affine" and scores2["affine"] > scores2["procrustes"]
        assert best.fitted

    def test_neighbours_criterion_rewards_keeping_the_new_models_neighbourhoods(self, rng):
        # The old space is the new one rotated and flattened along half its directions: an
        # orthogonal map keeps the new query's neighbourhoods in the old space better than a
        # least-squares map, which learns to flatten the query as the old space does.
        new = normalize_rows(rng.normal(size=(800, 8)))
        squash = np.diag([1.0, 1.0, 1.0, 1.0, 0.15, 0.15, 0.15, 0.15]) @ _rotation(rng, 8)
        old = normalize_rows(new @ squash)
        name, _, scores = select_adapter(new, old, maps="queries", k=20, holdout=0.5)
        assert set(scores) == {"procrustes", "procrustes_scaled", "affine", "affine_half_rank"}
        assert all(0.0 <= v <= 1.0 for v in scores.values())
        # a perfect rotation reproduces every neighbourhood
        name_r, _, scores_r = select_adapter(new, new @ _rotation(rng, 8), maps="queries", k=20)
        assert scores_r["procrustes"] == pytest.approx(1.0) and name_r == "procrustes"

    def test_bad_holdout(self, rng):
        X = rng.normal(size=(10, 3))
        with pytest.raises(ValueError, match="holdout"):
            select_adapter(X, X, holdout=1.0)
        with pytest.raises(ValueError, match="empty"):
            select_adapter(X, X, candidates={})
        with pytest.raises(ValueError, match="criterion"):
            select_adapter(X, X, criterion="mAP")
        with pytest.raises(ValueError, match="maps"):
            select_adapter(X, X, maps="both")


# --- the bridges as strategies of the evaluation harness --------------------------------------------

from backfill_lib import evaluate_backfill  # noqa: E402
from backfill_lib.context import MethodParams  # noqa: E402
from backfill_lib.data import load_dataset  # noqa: E402
from backfill_lib.models import ModelSpec  # noqa: E402
from backfill_lib.strategies import STRATEGY_REGISTRY, ExperimentContext, Preset, build_strategy  # noqa: E402
from backfill_lib.training import TrainConfig  # noqa: E402

SMALL = Preset(old=ModelSpec("mlp", 8, 8), new=ModelSpec("mlp", 8, 8), new_heterogeneous=ModelSpec("mlp", 12, 8),
               train=TrainConfig(epochs=2, batch_size=32, lr=5e-3))


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    data = load_dataset("synthetic", n_per_class=16, dim=8)
    return ExperimentContext(data, preset=SMALL, device="cpu", progress=False, cache=tmp_path_factory.mktemp("cache"))


@pytest.mark.parametrize("name", ["procrustes", "procrustes_forward", "low_rank_affine", "slerp"])
def test_bridge_strategies_build_and_evaluate(ctx, name):
    s = build_strategy(name, ctx)
    assert s.name == name and name in STRATEGY_REGISTRY and name in ctx.trained
    assert s.backbone_passes == (2 if name == "slerp" else 1)
    curve = evaluate_backfill(s, ctx.data.test_labels, ratios=[0.0, 1.0])
    new_new = evaluate_backfill(build_strategy("offline", ctx), ctx.data.test_labels, ratios=[1.0]).map[0]
    # fully backfilled, every bridge is new/new (Procrustes-forward rewrites nothing once all is new)
    assert curve.map[1] == pytest.approx(new_new, abs=1e-6)


def test_slerp_at_zero_is_old_old(ctx, tmp_path):
    c0 = ExperimentContext(ctx.data, preset=SMALL, device="cpu", progress=False, cache=ctx.cache,
                           params=MethodParams(slerp_t=0.0))
    s = build_strategy("slerp", c0)
    old = build_strategy("old", c0)
    np.testing.assert_allclose(s.query_old, old.query_old, atol=1e-6)


def test_slerp_t_is_checked():
    with pytest.raises(ValueError, match="slerp_t"):
        MethodParams(slerp_t=1.5)


# --- label-free calibration, in the merge and in the live indexes -----------------------------------

from backfill_lib.calibration import LABEL_FREE, ScoreMap, fit_score_map  # noqa: E402
from backfill_lib.live_index import OnlineBackfillIndex  # noqa: E402


def _clustered(rng, n=120, d=6, classes=4, spread=0.3):
    y = np.arange(n) % classes
    centres = normalize_rows(rng.normal(size=(classes, d)))
    return normalize_rows(centres[y] + spread * rng.normal(size=(n, d))), y


@pytest.mark.parametrize("method", LABEL_FREE)
def test_label_free_maps_need_no_labels_and_are_increasing(rng, method):
    e, _ = _clustered(rng)
    m = fit_score_map(e, method=method)
    assert m.method == method and m.scale > 0
    sims = e @ e.T
    off = sims[~np.eye(len(e), dtype=bool)]
    if method == "znorm":
        mapped = m(off)
        assert mapped.mean() == pytest.approx(0.0, abs=1e-6) and mapped.std() == pytest.approx(1.0, rel=1e-6)
    else:   # a random pair maps to 0 on average, a near neighbour to 1 on average
        np.fill_diagonal(sims, -np.inf)
        near = np.sort(sims, axis=1)[:, -10:]
        assert m(off).mean() == pytest.approx(0.0, abs=1e-6) and m(near).mean() == pytest.approx(1.0, rel=1e-6)


def test_labelled_maps_still_need_labels(rng):
    e, _ = _clustered(rng)
    with pytest.raises(ValueError, match="give labels, or choose a label-free"):
        fit_score_map(e, method="platt")


@pytest.mark.parametrize("method", LABEL_FREE)
def test_label_free_calibration_repairs_a_merge_of_two_scales(rng, method):
    """An old space whose scores are all high (every vector shares one direction) swamps a raw
    merge with old-stored items; maps fitted without labels put the two spaces on one scale."""
    from backfill_lib import evaluate_backfill, rank_merge
    from backfill_lib.backfill import rank_merge_calibrated

    y = np.arange(300) % 6
    centres = normalize_rows(rng.normal(size=(6, 8)))
    new = normalize_rows(centres[y] + 0.35 * rng.normal(size=(300, 8)))
    old_raw = normalize_rows(centres[y] + 0.6 * rng.normal(size=(300, 8)))
    old = normalize_rows(np.hstack([old_raw, np.full((300, 1), 2.5)]))     # cosines all above ~0.85
    raw = evaluate_backfill(rank_merge(old, new), y, ratios=[0.5]).map[0]
    maps = [fit_score_map(e, method=method) for e in (old, new)]
    calibrated = evaluate_backfill(rank_merge_calibrated(old, new, *maps), y, ratios=[0.5]).map[0]
    assert calibrated > raw + 0.05, (raw, calibrated)


class TestCalibratedLiveIndex:
    def _index(self, rng, maps=None):
        old, _ = _clustered(rng, n=40, d=4)
        new, _ = _clustered(rng, n=40, d=4)
        index = OnlineBackfillIndex(4, 4, score_maps=maps)
        index.add_old(np.arange(40), old)
        index.backfill(np.arange(20), new[:20])
        return index, old, new

    def test_maps_change_the_merge_as_calibrated_rank_merge_does(self, rng):
        maps = {"old": ScoreMap(1.0, 0.0, "znorm"), "new": ScoreMap(3.0, -1.0, "znorm")}
        index, old, new = self._index(rng, maps)
        q_old, q_new = old[:5], new[:5]
        scores, ids = index.search(q_new, k=40, query_old=q_old)
        # brute force: every item scored in its own space, then mapped
        expected = np.concatenate([maps["new"](q_new @ new[:20].T), maps["old"](q_old @ old[20:].T)], axis=1)
        all_ids = np.concatenate([np.arange(20), np.arange(20, 40)])
        for r in range(5):
            order = np.lexsort((all_ids, -expected[r]))
            np.testing.assert_array_equal(ids[r], all_ids[order])
            np.testing.assert_allclose(scores[r], expected[r][order], rtol=1e-5, atol=1e-5)

    def test_save_and_load_keep_the_maps(self, rng, tmp_path):
        maps = {"old": ScoreMap(2.0, 0.5, "neighbours", 10), "new": ScoreMap(1.5, -0.2, "neighbours", 10)}
        index, old, new = self._index(rng, maps)
        index.save(tmp_path / "i.npz")
        back = OnlineBackfillIndex.load(tmp_path / "i.npz")
        assert back.score_maps == maps
        a = index.search(new[:3], k=10, query_old=old[:3])
        b = back.search(new[:3], k=10, query_old=old[:3])
        np.testing.assert_array_equal(a[1], b[1])

    def test_bad_maps(self, rng):
        with pytest.raises(TypeError, match="score_maps"):
            OnlineBackfillIndex(4, 4, score_maps={"old": ScoreMap(1.0, 0.0, "znorm")})
        with pytest.raises(TypeError, match="score_maps"):
            OnlineBackfillIndex(4, 4, score_maps={"old": (1.0, 0.0), "new": (1.0, 0.0)})


def test_an_index_saved_with_an_adapter_attached_loads_in_a_fresh_process(tmp_path):
    # The index file names its bridge's class; the adapters are registered transforms wherever
    # backfill_lib.transforms is imported (the file's loader imports it), not only by the CLI.
    import subprocess
    import sys

    from backfill_lib.adapters import ProcrustesAdapter
    from backfill_lib.live_index import OnlineBackfillIndex

    rng = np.random.default_rng(0)
    x = normalize_rows(rng.normal(size=(60, 5)).astype(np.float32))
    y = normalize_rows(x @ np.linalg.qr(rng.normal(size=(5, 5)))[0].astype(np.float32))
    index = OnlineBackfillIndex(5, 5, psi=ProcrustesAdapter().fit(y, x))
    index.add_old(np.arange(60), x)
    index.save(tmp_path / "live.obi")
    code = ("from backfill_lib.live_index import OnlineBackfillIndex as I; i = I.load(%r); "
            "print(type(i.psi).__name__, i.n_old)" % str(tmp_path / "live.obi"))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["ProcrustesAdapter", "60"]
