"""Adopting a Qdrant collection that already serves (issue 20): QdrantBackfillIndex.adopt.

A collection whose points hold one dense vector (unnamed or named; dot or cosine) gets the new
model's named vector in place; a backfill adds it next to the old one; the merged search finds
each item once; rollback returns the collection bit for bit; finalize drops the old vector.
Embedded local mode, in memory and on disk (``path=``, one client per folder at a time).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

qdrant_client = pytest.importorskip("qdrant_client", reason="qdrant-client is not installed (pip install qdrant-client)")
from qdrant_client import models  # noqa: E402

from backfill_lib.backfill_job import run_backfill  # noqa: E402
from backfill_lib.qdrant_index import QdrantBackfillIndex  # noqa: E402
from live_helpers import PsiStandIn, assert_search_is_brute_force, backfill_in_batches, grid_unit  # noqa: E402

D_OLD, D_NEW = 6, 8
DIST = {"dot": models.Distance.DOT, "cosine": models.Distance.COSINE}
# (vector name: "" is the unnamed default vector, distance)
LAYOUTS = [("", "dot"), ("", "cosine"), ("image", "dot"), ("image", "cosine")]


def serving(client, rng, n, name="", distance="dot", collection="g", datatype=None):
    """A collection as a service would have it: one vector per point, payloads, random ids."""
    params = models.VectorParams(size=D_OLD, distance=DIST[distance], datatype=datatype)
    client.create_collection(collection, vectors_config=params if name == "" else {name: params})
    ids = rng.choice(10**9, size=n, replace=False).astype(np.int64)
    old, new = grid_unit(rng, n, D_OLD), grid_unit(rng, n, D_NEW)
    client.upsert(collection, points=[
        models.PointStruct(id=int(i), vector=v.tolist() if name == "" else {name: v.tolist()},
                           payload={"url": f"img{i}.jpg", "rank": j})
        for j, (i, v) in enumerate(zip(ids, old))], wait=True)
    return ids, old, new


def snapshot(client, name="", collection="g"):
    """``{id: (old vector as float32 bytes, payload)}`` of every point, read back from Qdrant."""
    out, offset = {}, None
    while True:
        points, offset = client.scroll(collection, limit=256, offset=offset, with_payload=True, with_vectors=True)
        for p in points:
            v = p.vector if isinstance(p.vector, list) else p.vector.get(name)
            out[p.id] = (None if v is None else np.asarray(v, dtype=np.float32).tobytes(), p.payload)
        if offset is None:
            return out


def open_client(where, tmp_path):
    return qdrant_client.QdrantClient(":memory:") if where == "memory" else qdrant_client.QdrantClient(
        path=str(tmp_path / "q"))


# ---- 1. adoption: the new vector in place, nothing copied ------------------------------------------

@pytest.mark.parametrize("where", ["memory", "path"])
@pytest.mark.parametrize("name, distance", LAYOUTS)
def test_adoption_adds_the_new_vector_in_place_and_copies_no_point(tmp_path, where, name, distance):
    client = open_client(where, tmp_path)
    ids, old, new = serving(client, np.random.default_rng(1), 25, name, distance)
    before = snapshot(client, name)
    index = QdrantBackfillIndex.adopt(client, "g", D_NEW)
    assert index.adopted and index.vector_names == {"old": name, "new": "new"} and index.dim_old == D_OLD
    vectors = client.get_collection("g").config.params.vectors
    assert set(vectors) == {name, "new"} and vectors["new"].size == D_NEW
    assert vectors["new"].distance == DIST[distance]  # the new vector gets the old one's distance
    assert client.count("g", exact=True).count == 25 and index.ntotal == 25
    assert snapshot(client, name) == before  # every old vector and payload untouched
    assert index.progress == 0.0 and index.n_new == 0
    np.testing.assert_array_equal(index.old_ids(), np.sort(ids))
    index.backfill(ids[:10], new[:10])
    after = snapshot(client, name)
    assert after == before  # a backfill adds the new vector and rewrites neither old vectors nor payloads
    records = client.retrieve("g", ids[:10].tolist(), with_vectors=True)
    assert all(set(r.vector) == {name, "new"} for r in records)
    np.testing.assert_array_equal(index.new_ids(), np.sort(ids[:10]))
    assert index.progress == pytest.approx(0.4)


# ---- 2. the merged search: each item once, as brute force --------------------------------------------

@settings(max_examples=12)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 25), layout=st.sampled_from(LAYOUTS),
       n_batches=st.integers(0, 3), use_psi=st.booleans(), data=st.data())
def test_merged_search_on_an_adopted_collection_equals_brute_force(seed, n, layout, n_batches, use_psi, data):
    rng = np.random.default_rng(seed)
    client = qdrant_client.QdrantClient(":memory:")
    ids, old, new = serving(client, rng, n, *layout)
    psi = PsiStandIn(D_NEW, D_OLD, seed) if use_psi else None
    index = QdrantBackfillIndex.adopt(client, "g", D_NEW, psi=psi)
    stored_new = backfill_in_batches(index, rng, ids, new, n_batches)
    if data.draw(st.booleans()):  # items arriving during the migration go straight to new
        extra = np.array([10**9 + 1, 10**9 + 2], dtype=np.int64)
        extra_new = grid_unit(rng, 2, D_NEW)
        index.add(extra, extra_new)
        ids, new = np.r_[ids, extra], np.r_[new, extra_new]
        old, stored_new = np.r_[old, np.zeros((2, D_OLD), np.float32)], np.r_[stored_new, True, True]
    assert index.progress == pytest.approx(stored_new.mean())
    qn = grid_unit(rng, 4, D_NEW)
    qo = psi.transform(qn) if use_psi else grid_unit(rng, 4, D_OLD)
    k = data.draw(st.integers(1, len(ids)))
    assert_search_is_brute_force(index, qn, qo, k, ids, old, new, stored_new, use_psi)
    # Each item exactly once: a backfilled point holds both vectors but is found by its new one only.
    _, everything = index.search(qn[:1], len(ids), query_old=qo[:1])
    assert sorted(everything[0].tolist()) == sorted(ids.tolist())


# ---- 3. the job, rollback, finalize -----------------------------------------------------------------------

def test_the_backfill_job_runs_on_an_adopted_collection_and_resumes_after_reattaching(tmp_path):
    n = 30
    client = open_client("path", tmp_path)
    ids, old, new = serving(client, np.random.default_rng(2), n, "image", "cosine")
    table = dict(zip(ids.tolist(), new))

    def embed(batch):
        return np.stack([table[int(i)] for i in batch])

    index = QdrantBackfillIndex.adopt(client, "g", D_NEW)
    run = run_backfill(index, embed, tmp_path / "job.json", batch_size=4, max_items=10, show_progress=False)
    assert run.written == 12 and run.remaining == n - 12
    client.close()
    # A new client (as a new process would open it): adopt re-attaches to the migration under way.
    client = open_client("path", tmp_path)
    index = QdrantBackfillIndex.adopt(client, "g", D_NEW)
    assert index.n_new == 12 and index.progress == pytest.approx(12 / n)
    run = run_backfill(index, embed, tmp_path / "job.json", batch_size=4, show_progress=False)
    assert run.written == n - 12 and run.remaining == 0 and index.progress == 1.0
    parts, vectors = index.stored_vectors(ids)
    assert (parts == "new").all()
    np.testing.assert_allclose(np.stack(vectors), new, atol=1e-6)
    client.close()


@pytest.mark.parametrize("where", ["memory", "path"])
@pytest.mark.parametrize("name, distance", LAYOUTS)
def test_rollback_returns_the_collection_bit_for_bit(tmp_path, where, name, distance):
    rng = np.random.default_rng(3)
    client = open_client(where, tmp_path)
    ids, old, new = serving(client, rng, 30, name, distance)
    if where == "path":  # read what is on disk, before and after, each from a fresh client
        client.close()
        client = open_client(where, tmp_path)
    config_before = client.get_collection("g").config.params.vectors
    before = snapshot(client, name)
    index = QdrantBackfillIndex.adopt(client, "g", D_NEW)
    index.backfill(ids[:18], new[:18])
    index.add([10**9 + 5, 10**9 + 6], grid_unit(rng, 2, D_NEW))  # arrived during the migration
    index.remove(ids[29:])                                           # left during the migration
    cost = index.rollback_cost()
    assert cost["points_kept"] == 18 and cost["points_added"] == 2 and cost["bytes"] == 18 * D_OLD * 4
    assert "18 x 6 x 4 B = 432 B" in cost["text"] and "remove the 2 point(s)" in cost["text"]
    assert index.rollback() == {"points": 29, "dropped_new_vectors": 18, "removed_points": 2}
    if where == "path":
        client.close()
        client = open_client(where, tmp_path)
    after = snapshot(client, name)
    del before[int(ids[29])]
    assert after.keys() == before.keys()
    for pid, (vector, payload) in before.items():
        assert after[pid][0] == vector, f"point {pid}: its old vector changed"  # the same float32 bytes
        assert after[pid][1] == payload
    config_after = client.get_collection("g").config.params.vectors
    # Qdrant keeps a once-unnamed vector as {"": params}: the same vector, under its empty name.
    assert (config_after if isinstance(config_after, dict) else {"": config_after}) == \
        (config_before if isinstance(config_before, dict) else {"": config_before})
    # Reads and queries without a vector name work as before (for the unnamed vector).
    if name == "":
        assert isinstance(client.retrieve("g", [int(ids[0])], with_vectors=True)[0].vector, list)
        hit = client.query_points("g", query=old[0].tolist(), limit=1).points[0]
        assert hit.score == pytest.approx(1.0, abs=1e-6)
    if where == "path":
        client.close()


def test_after_a_rollback_the_index_refuses_and_the_collection_can_be_adopted_again():
    client = qdrant_client.QdrantClient(":memory:")
    ids, old, new = serving(client, np.random.default_rng(4), 8)
    index = QdrantBackfillIndex.adopt(client, "g", D_NEW)
    index.backfill(ids[:3], new[:3])
    index.rollback()
    for call in (lambda: index.progress, index.old_ids, lambda: index.backfill(ids[3:4], new[3:4]),
                 lambda: index.search(new[:1], 2, query_old=old[:1]), index.rollback, index.rollback_cost):
        with pytest.raises(RuntimeError, match="was rolled back.*adopt it again"):
            call()
    again = QdrantBackfillIndex.adopt(client, "g", D_NEW)
    assert again.progress == 0.0 and again.n_old == 8


def test_finalize_refuses_before_every_point_is_new_then_drops_the_old_vector():
    client = qdrant_client.QdrantClient(":memory:")
    ids, old, new = serving(client, np.random.default_rng(5), 10, "", "cosine")
    index = QdrantBackfillIndex.adopt(client, "g", D_NEW, psi=PsiStandIn(D_NEW, D_OLD))
    index.backfill(ids[:9], new[:9])
    with pytest.raises(ValueError, match=r"1 of 10 points .* still stored old \(progress 90\.0%\).*rollback\(\) is "
                                         "still possible"):
        index.finalize()
    assert set(client.get_collection("g").config.params.vectors) == {"", "new"}  # nothing dropped
    index.backfill(ids[9:], new[9:])
    assert index.finalize() == {"points": 10, "dropped_old_vectors": 10, "freed_bytes": 10 * D_OLD * 4}
    assert set(client.get_collection("g").config.params.vectors) == {"new"}
    assert index.psi is None
    records = client.retrieve("g", ids.tolist(), with_vectors=True, with_payload=True)
    assert all(set(r.vector) == {"new"} and r.payload["url"] == f"img{r.id}.jpg" for r in records)
    hit = client.query_points("g", query=new[4].tolist(), using="new", limit=1).points[0]
    assert hit.id == ids[4]
    with pytest.raises(RuntimeError, match="was finalized.*using='new'"):
        index.search(new[:1], 1)
    with pytest.raises(ValueError, match="no vector to migrate from.*already 'new'.*finalized"):
        QdrantBackfillIndex.adopt(client, "g", D_NEW)


def test_rollback_cost_counts_the_kept_old_vectors_by_datatype():
    client = qdrant_client.QdrantClient(":memory:")
    ids, old, new = serving(client, np.random.default_rng(6), 12, "image", "dot", datatype=models.Datatype.FLOAT16)
    index = QdrantBackfillIndex.adopt(client, "g", D_NEW)
    assert index.rollback_cost()["bytes"] == 0
    index.backfill(ids[:5], new[:5])
    cost = index.rollback_cost()
    assert (cost["possible"], cost["points_kept"], cost["bytes_per_number"], cost["bytes"]) == (True, 5, 2, 5 * 6 * 2)
    fresh = QdrantBackfillIndex(client, "fresh", D_OLD, D_NEW)
    assert fresh.rollback_cost()["possible"] is False
    with pytest.raises(ValueError, match="rollback needs an adopted collection"):
        fresh.rollback()
    with pytest.raises(ValueError, match="finalize needs an adopted collection"):
        fresh.finalize()


def test_stored_vectors_reports_the_part_and_the_searched_vector():
    client = qdrant_client.QdrantClient(":memory:")
    ids, old, new = serving(client, np.random.default_rng(7), 6, "", "dot")
    index = QdrantBackfillIndex.adopt(client, "g", D_NEW)
    index.backfill(ids[:2], new[:2])
    parts, vectors = index.stored_vectors(ids[[1, 4, 1]])
    assert parts.tolist() == ["new", "old", "new"]
    np.testing.assert_array_equal(vectors[0], new[1])
    np.testing.assert_array_equal(vectors[1], old[4])
    assert vectors[1].dtype == np.float32 and len(vectors[1]) == D_OLD
    with pytest.raises(ValueError, match=r"ids \[123\] are not in the index"):
        index.stored_vectors([123])
    np.testing.assert_array_equal(index.old_vectors(ids[[4, 3]]), old[[4, 3]])
    np.testing.assert_array_equal(index.new_vectors(ids[:2]), new[:2])
    assert index.new_vectors(np.array([], dtype=np.int64)).shape == (0, D_NEW)
    with pytest.raises(ValueError, match=rf"ids \[{ids[0]}\] are stored new, not old"):
        index.old_vectors(ids[:1])


@pytest.mark.parametrize("name", ["", "image"])
def test_items_added_old_or_new_during_the_migration_are_stored_and_counted(name):
    rng = np.random.default_rng(13)
    client = qdrant_client.QdrantClient(":memory:")
    ids, old, new = serving(client, rng, 4, name)
    index = QdrantBackfillIndex.adopt(client, "g", D_NEW)
    more_old, more_new = grid_unit(rng, 2, D_OLD), grid_unit(rng, 2, D_NEW)
    index.add_old([501, 502], more_old)
    index.add_old([501, 502], more_old)  # a repeat after a crash is accepted
    index.add([601, 602], more_new)
    assert (index.ntotal, index.n_old, index.n_new) == (8, 6, 2)
    parts, vectors = index.stored_vectors([501, 601])
    assert parts.tolist() == ["old", "new"]
    np.testing.assert_array_equal(vectors[0], more_old[0])
    np.testing.assert_array_equal(vectors[1], more_new[0])
    index.backfill([501], more_new[:1])
    assert index.rollback() == {"points": 6, "dropped_new_vectors": 1, "removed_points": 2}
    assert sorted(snapshot(client, name)) == sorted(ids.tolist() + [501, 502])


REATTACH = textwrap.dedent("""
    import sys
    import numpy as np
    from qdrant_client import QdrantClient
    from backfill_lib.qdrant_index import QdrantBackfillIndex

    path, step = sys.argv[1], sys.argv[2]
    data = np.load(path + ".npz")
    client = QdrantClient(path=path)
    index = QdrantBackfillIndex.adopt(client, "g", 8)
    print(index.n_new, index.progress)
    if step == "more":
        todo = index.old_ids()[:7]
        index.backfill(todo, data["new"][np.searchsorted(data["ids"], todo)])
    else:
        print(index.rollback())
    client.close()
""")


def test_a_new_process_reattaches_mid_migration_and_goes_on(tmp_path):
    client = open_client("path", tmp_path)
    ids, old, new = serving(client, np.random.default_rng(8), 20)
    order = np.argsort(ids)
    np.savez(str(tmp_path / "q") + ".npz", ids=ids[order], new=new[order])
    before = snapshot(client)
    index = QdrantBackfillIndex.adopt(client, "g", D_NEW)
    index.backfill(ids[:5], new[:5])
    client.close()  # local mode: one client per folder at a time

    def run(step):
        return subprocess.run([sys.executable, "-c", REATTACH, str(tmp_path / "q"), step], capture_output=True,
                              text=True, timeout=300, check=True).stdout.splitlines()

    assert run("more")[0] == "5 0.25"
    out = run("rollback")
    assert out[0] == "12 0.6" and out[1] == "{'points': 20, 'dropped_new_vectors': 12, 'removed_points': 0}"
    client = open_client("path", tmp_path)
    assert snapshot(client) == before
    assert set(client.get_collection("g").config.params.vectors) == {""}
    client.close()


# ---- 4. what cannot be adopted, with what to do ------------------------------------------------------

def _two_vectors(client):
    client.create_collection("c", vectors_config={"a": models.VectorParams(size=4, distance=models.Distance.DOT),
                                                  "b": models.VectorParams(size=4, distance=models.Distance.DOT)})


def _sparse(client):
    client.create_collection("c", vectors_config=models.VectorParams(size=4, distance=models.Distance.DOT),
                             sparse_vectors_config={"bm25": models.SparseVectorParams()})


def _params(**kw):
    def make(client):
        client.create_collection("c", vectors_config=models.VectorParams(size=4, **{
            "distance": models.Distance.DOT, **kw}))
    return make


def _not_unit(client):
    _params()(client)
    client.upsert("c", points=[models.PointStruct(id=1, vector=[0.6, 0.8, 0, 0]),
                               models.PointStruct(id=2, vector=[1.0, 1.0, 0, 0])], wait=True)


def _no_vector(client):
    client.create_collection("c", vectors_config={"img": models.VectorParams(size=4, distance=models.Distance.DOT)})
    client.upsert("c", points=[models.PointStruct(id=1, vector={"img": [1.0, 0, 0, 0]}),
                               models.PointStruct(id=2, vector={}, payload={"a": 1})], wait=True)


def _uuid(client):
    _params()(client)
    client.upsert("c", points=[models.PointStruct(id="5c56c793-69f3-4fbf-87e6-c4bf54c28c26", vector=[1.0, 0, 0, 0])],
                  wait=True)


@pytest.mark.parametrize("make, match", [
    (_two_vectors, r"has 2 dense vectors other than 'new' \(\['a', 'b'\]\).*migrate it into a new collection"),
    (_sparse, r"sparse vectors \['bm25'\].*one dense vector"),
    (_params(datatype=models.Datatype.UINT8), "stores uint8 numbers.*float32 or float16"),
    (_params(multivector_config=models.MultiVectorConfig(comparator=models.MultiVectorComparator.MAX_SIM)),
     "is a multivector"),
    (_params(distance=models.Distance.EUCLID), "Euclid distance.*dot product or cosine"),
    (_not_unit, r"point 2 has a vector of norm 1\.41421.*normalise the vectors"),
    (_no_vector, r"point 2 holds no vector 'img': every point must hold.*client\.update_vectors"),
    (_uuid, "integer point ids 0..2\\*\\*63-1"),
    (lambda client: None, "there is no collection 'c' to adopt.*QdrantBackfillIndex\\(client, collection"),
])
def test_a_collection_that_cannot_be_adopted_is_refused_and_left_as_it_is(make, match):
    client = qdrant_client.QdrantClient(":memory:")
    make(client)
    config = client.get_collection("c").config.params if client.collection_exists("c") else None
    with pytest.raises(ValueError, match=match):
        QdrantBackfillIndex.adopt(client, "c", D_NEW)
    if config is not None:
        assert client.get_collection("c").config.params == config  # no vector added


@pytest.mark.parametrize("kwargs, error, match", [
    ({"dim_new": 0}, ValueError, "dim_new must be a positive integer"),
    ({"dim_new": "8"}, ValueError, "dim_new must be a positive integer"),
    ({"dim_new": True}, ValueError, "dim_new must be a positive integer"),
    ({"dim_new": 70000}, ValueError, "at most 65536"),
    ({"new_vector": ""}, TypeError, "new_vector must be a non-empty string"),
    ({"new_vector": 5}, TypeError, "new_vector must be a non-empty string"),
    ({"new_vector": "a/b"}, ValueError, "new_vector='a/b' is not a valid Qdrant vector name"),
    ({"new_vector": "image"}, ValueError, "its only vector is already 'image'.*pass another new_vector"),
    ({"collection": ""}, TypeError, "collection must be a non-empty string"),
    ({"psi": object()}, TypeError, "psi must have a transform"),
])
def test_bad_arguments_are_named(kwargs, error, match):
    client = qdrant_client.QdrantClient(":memory:")
    serving(client, np.random.default_rng(9), 3, "image")
    args = {"client": client, "collection": "g", "dim_new": D_NEW, **kwargs}
    with pytest.raises(error, match=match):
        QdrantBackfillIndex.adopt(**args)
    assert set(client.get_collection("g").config.params.vectors) == {"image"}


def test_reattaching_with_another_new_dimension_is_refused():
    client = qdrant_client.QdrantClient(":memory:")
    serving(client, np.random.default_rng(10), 3)
    QdrantBackfillIndex.adopt(client, "g", D_NEW)
    with pytest.raises(ValueError, match=r"has the vector 'new' of size 8, not dim_new=5: pass dim_new=8"):
        QdrantBackfillIndex.adopt(client, "g", 5)
    with pytest.raises(ValueError, match=r"no named vector 'old'.*QdrantBackfillIndex\.adopt"):
        QdrantBackfillIndex(client, "g", D_OLD, D_NEW)  # the two-vector constructor points to adopt


def test_wrong_vectors_on_an_adopted_collection_are_refused_and_write_nothing():
    client = qdrant_client.QdrantClient(":memory:")
    ids, old, new = serving(client, np.random.default_rng(11), 6)
    index = QdrantBackfillIndex.adopt(client, "g", D_NEW)
    index.backfill(ids[:2], new[:2])
    before = snapshot(client)
    for call, match in [
        (lambda: index.backfill(ids[2:3], old[2:3]), "dimension 6 but 8"),
        (lambda: index.backfill(ids[:1], new[1:2]), "already backfilled"),
        (lambda: index.backfill([77], new[:1]), "not in the index"),
        (lambda: index.add(ids[3:4], new[3:4]), "stored old: remove them first"),
        (lambda: index.add_old(ids[:1], old[:1]), "stored new: remove them first"),
        (lambda: index.search(new[:1], 2, query_old=new[:1]), "dimension 8 but 6"),
    ]:
        with pytest.raises(ValueError, match=match):
            call()
    assert snapshot(client) == before
    index.backfill(ids[:3], new[:3])  # a repeat after a crash (same vectors) finishes the batch
    assert index.n_new == 3


class _ClientWithout:
    """A QdrantClient as an older qdrant-client has it: no create_vector_name."""

    def __init__(self, client):
        self._client = client

    def __getattr__(self, name):
        if name == "create_vector_name":
            raise AttributeError(name)
        return getattr(self._client, name)


def test_a_client_or_server_that_cannot_add_a_vector_says_what_to_do(monkeypatch):
    client = qdrant_client.QdrantClient(":memory:")
    serving(client, np.random.default_rng(12), 3)
    with pytest.raises(RuntimeError, match=r"no create_vector_name.*qdrant-client>=1\.18.*new collection"):
        QdrantBackfillIndex.adopt(_ClientWithout(client), "g", D_NEW)
    monkeypatch.setattr(client, "info", lambda: models.VersionInfo(title="qdrant", version="1.17.2"))
    with pytest.raises(RuntimeError, match=r"server is version 1\.17.*needs Qdrant 1\.18 or later"):
        QdrantBackfillIndex.adopt(client, "g", D_NEW)
    monkeypatch.setattr(client, "info", lambda: models.VersionInfo(title="qdrant", version="1.18.0"))

    def refuse(*args, **kwargs):
        raise RuntimeError("Unexpected Response: 404 (Not Found)")

    monkeypatch.setattr(client, "create_vector_name", refuse)
    with pytest.raises(RuntimeError, match=r"refused create_vector_name \(RuntimeError: Unexpected Response: 404"):
        QdrantBackfillIndex.adopt(client, "g", D_NEW)
    assert not isinstance(client.get_collection("g").config.params.vectors, dict)  # left as it was
