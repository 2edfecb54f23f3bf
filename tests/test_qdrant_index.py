"""QdrantBackfillIndex on qdrant-client's embedded local mode: the same contract as the faiss index."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

qdrant_client = pytest.importorskip("qdrant_client", reason="qdrant-client is not installed (pip install qdrant-client)")

from backfill_lib.qdrant_index import QdrantBackfillIndex  # noqa: E402
from live_helpers import PsiStandIn, assert_search_is_brute_force, backfill_in_batches, grid_unit  # noqa: E402

D_OLD, D_NEW = 6, 8


def build(rng, n, psi=None, client=None, name="gallery"):
    ids = rng.choice(10**6, size=n, replace=False).astype(np.int64)
    old, new = grid_unit(rng, n, D_OLD), grid_unit(rng, n, D_NEW)
    index = QdrantBackfillIndex(client or qdrant_client.QdrantClient(":memory:"), name, D_OLD, D_NEW, psi=psi)
    index.add_old(ids, old)
    return index, ids, old, new


@settings(max_examples=15)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 30), n_batches=st.integers(0, 4),
       use_psi=st.booleans(), data=st.data())
def test_merged_search_equals_brute_force(seed, n, n_batches, use_psi, data):
    rng = np.random.default_rng(seed)
    psi = PsiStandIn(D_NEW, D_OLD, seed) if use_psi else None
    index, ids, old, new = build(rng, n, psi)
    stored_new = backfill_in_batches(index, rng, ids, new, n_batches)
    keep = np.ones(n, dtype=bool)
    if n > 1 and data.draw(st.booleans()):
        gone = rng.choice(n, size=rng.integers(1, n), replace=False)
        index.remove(ids[gone])
        keep[gone] = False
    assert index.ntotal == keep.sum()
    assert index.progress == pytest.approx(stored_new[keep].mean())
    np.testing.assert_array_equal(index.old_ids(), np.sort(ids[keep & ~stored_new]))

    qn = grid_unit(rng, 5, D_NEW)
    qo = psi.transform(qn) if use_psi else grid_unit(rng, 5, D_OLD)
    k = data.draw(st.integers(1, int(keep.sum())))
    assert_search_is_brute_force(index, qn, qo, k, ids[keep], old[keep], new[keep], stored_new[keep], use_psi)


def test_a_point_holds_only_the_vector_it_is_stored_with_and_keeps_its_payload():
    rng = np.random.default_rng(0)
    index, ids, old, new = build(rng, 5)
    index.client.set_payload(index.collection, {"url": "img.jpg"}, points=[int(ids[0])], wait=True)
    index.backfill(ids[:2], new[:2])
    records = {r.id: r for r in index.client.retrieve(index.collection, ids[:3].tolist(), with_vectors=True, with_payload=True)}
    assert set(records[int(ids[0])].vector) == {"new"}
    assert set(records[int(ids[2])].vector) == {"old"}
    assert records[int(ids[0])].payload == {"url": "img.jpg"}
    np.testing.assert_allclose(records[int(ids[1])].vector["new"], new[1])


def test_more_results_than_points_are_padded():
    rng = np.random.default_rng(1)
    index, ids, old, new = build(rng, 3)
    scores, got = index.search(new[:1], 5, query_old=old[:1])
    assert sorted(got[0, :3].tolist()) == sorted(ids.tolist()) and got[0, 3:].tolist() == [-1, -1]
    assert np.isneginf(scores[0, 3:]).all()


def test_state_persists_in_a_local_collection_on_disk(tmp_path):
    rng = np.random.default_rng(2)
    client = qdrant_client.QdrantClient(path=str(tmp_path / "qdrant"))
    index, ids, old, new = build(rng, 20, client=client)
    index.backfill(ids[:8], new[:8])
    client.close()
    reopened = QdrantBackfillIndex(qdrant_client.QdrantClient(path=str(tmp_path / "qdrant")), "gallery", D_OLD, D_NEW)
    assert reopened.progress == 0.4
    np.testing.assert_array_equal(reopened.new_ids(), np.sort(ids[:8]))
    reopened.client.close()


@pytest.fixture
def small():
    rng = np.random.default_rng(5)
    index, ids, old, new = build(rng, 10)
    index.backfill(ids[:3], new[:3])
    return index, ids, old, new


@pytest.mark.parametrize("call, match", [
    (lambda ix, ids, o, n: ix.backfill([123456789], n[:1]), "not in the index"),
    (lambda ix, ids, o, n: ix.backfill(ids[:1], n[1:2]), "already backfilled"),
    (lambda ix, ids, o, n: ix.backfill(ids[[5, 5]], n[:2]), "must not repeat"),
    (lambda ix, ids, o, n: ix.backfill(ids[[5, 0]], n[:2]), "already backfilled"),
    (lambda ix, ids, o, n: ix.add_old(ids[4:5], o[:1]), "already in the index"),
    (lambda ix, ids, o, n: ix.add([-3], n[:1]), "non-negative"),
    (lambda ix, ids, o, n: ix.remove([123456789]), "not in the index"),
    (lambda ix, ids, o, n: ix.backfill(ids[5:6], o[5:6]), "dimension 6 but 8"),
    (lambda ix, ids, o, n: ix.backfill(ids[5:6], 0.5 * n[5:6]), "unit-norm"),
    (lambda ix, ids, o, n: ix.add_old([99], np.full((1, D_OLD), np.inf)), "NaN or infinite"),
    (lambda ix, ids, o, n: ix.search(n[:1], 3), "query_old.*psi"),
    (lambda ix, ids, o, n: ix.search(n[:1], 0, query_old=o[:1]), "at least 1"),
    (lambda ix, ids, o, n: ix.search(n[:2], 3, query_old=o[:1]), "rows"),
])
def test_bad_input_raises_and_leaves_the_collection_unchanged(small, call, match):
    index, ids, old, new = small
    before = (index.old_ids(), index.new_ids())
    with pytest.raises(ValueError, match=match):
        call(index, ids, old, new)
    np.testing.assert_array_equal(index.old_ids(), before[0])
    np.testing.assert_array_equal(index.new_ids(), before[1])


def test_an_existing_collection_with_other_vectors_is_refused():
    client = qdrant_client.QdrantClient(":memory:")
    QdrantBackfillIndex(client, "c", 4, 8)
    QdrantBackfillIndex(client, "c", 4, 8)  # reopening with the same shape is fine
    with pytest.raises(ValueError, match="named vector 'new' of size 6"):
        QdrantBackfillIndex(client, "c", 4, 6)


def test_missing_qdrant_client_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "qdrant_client", None)
    with pytest.raises(ImportError, match=r"backfill_lib\[qdrant\]"):
        QdrantBackfillIndex(object(), "c", 4, 4)


def test_a_bridge_with_a_learned_rho_queries_the_new_points_with_rho():
    # As the faiss index: given φ_n(q) alone, the points stored new (ρ̂(φ_n(g))) are scored
    # against ρ̂(φ_n(q)), the old ones against ψ̂(φ_n(q)).
    from backfill_lib.transforms import ReverseTransform
    from backfill_lib.validation import normalize_rows

    rng = np.random.default_rng(8)
    labels = rng.integers(0, 4, size=120)
    new = normalize_rows(rng.normal(size=(4, D_NEW))[labels] + 0.8 * rng.normal(size=(120, D_NEW)))
    old = normalize_rows(new[:, :D_OLD] + 0.3 * rng.normal(size=(120, D_OLD)))
    psi = ReverseTransform(objective="mc", learn_rho=True, steps=30, device="cpu", seed=0).fit(
        new[:60], old[:60], labels[:60])
    index = QdrantBackfillIndex(qdrant_client.QdrantClient(":memory:"), "rho", D_OLD, D_NEW, psi=psi)
    index.add_old(np.arange(60, 120), old[60:])
    index.backfill(np.arange(60, 95), psi.new_embedding(new[60:95]))
    q = new[:10]
    by_bridge = index.search(q, 8)
    explicit = index.search(psi.new_embedding(q), 8, query_old=psi.transform(q))
    np.testing.assert_array_equal(by_bridge[1], explicit[1])
    np.testing.assert_allclose(by_bridge[0], explicit[0], atol=1e-6)
