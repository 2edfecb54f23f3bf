"""QdrantBackfillIndex against what another client, a crash or a careless caller can do (issue 16).

Points written behind the index's back (UUID or huge ids, no vector, both vectors), a SIGKILL
part-way through an upsert in embedded local mode, and bad arguments at every public entry:
each gives a clear error naming the point or the argument, or a correct answer.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid

import numpy as np
import pytest

qdrant_client = pytest.importorskip("qdrant_client", reason="qdrant-client is not installed (pip install qdrant-client)")
from qdrant_client import models  # noqa: E402

from backfill_lib.qdrant_index import QdrantBackfillIndex  # noqa: E402
from live_helpers import PsiStandIn, grid_unit  # noqa: E402

D_OLD, D_NEW = 6, 8


def make(n=6, name="g", client=None, seed=0):
    rng = np.random.default_rng(seed)
    client = client or qdrant_client.QdrantClient(":memory:")
    index = QdrantBackfillIndex(client, name, D_OLD, D_NEW)
    ids = np.arange(10, 10 + n, dtype=np.int64)
    old, new = grid_unit(rng, n, D_OLD), grid_unit(rng, n, D_NEW)
    index.add_old(ids, old)
    return index, ids, old, new


def write_behind(index, pid, vector):
    """A point written by another client, straight into the collection."""
    index.client.upsert(index.collection, points=[models.PointStruct(id=pid, vector=vector)], wait=True)


# ---- 1. ids this backend cannot represent ---------------------------------------------------------

FOREIGN_IDS = [str(uuid.UUID(int=7)), 2**63, 2**64 - 1]


@pytest.mark.parametrize("pid", FOREIGN_IDS)
def test_attaching_to_a_collection_with_a_foreign_id_names_it(pid):
    index, ids, old, new = make()
    write_behind(index, pid, {"old": old[0].tolist()})
    with pytest.raises(ValueError, match=rf"id {pid!r}.*integer point ids 0\.\.2\*\*63-1.*client\.delete"):
        QdrantBackfillIndex(index.client, "g", D_OLD, D_NEW)


@pytest.mark.parametrize("pid", FOREIGN_IDS)
@pytest.mark.parametrize("call", ["old_ids", "new_ids", "search_old", "search_new"])
def test_a_foreign_id_written_meanwhile_is_named_not_a_numpy_overflow(pid, call):
    index, ids, old, new = make()
    index.backfill(ids[:1], new[:1])
    # Stored as the best match of the query, in the part the call looks at.
    part, vec = ("new", new[0]) if call in ("new_ids", "search_new") else ("old", old[1])
    write_behind(index, pid, {part: vec.tolist()})
    assert index.progress == pytest.approx((2 if part == "new" else 1) / (len(ids) + 1))  # counted as what it holds
    actions = {"old_ids": index.old_ids, "new_ids": index.new_ids,
               "search_old": lambda: index.search(new[:1], 3, query_old=old[1:2]),
               "search_new": lambda: index.search(new[:1], 3, query_old=old[1:2])}
    with pytest.raises(ValueError, match=rf"id {pid!r}.*integer point ids 0\.\.2\*\*63-1"):
        actions[call]()


def test_the_largest_int64_id_is_fine():
    index, ids, old, new = make()
    index.add_old([2**63 - 1], grid_unit(np.random.default_rng(9), 1, D_OLD))
    assert index.old_ids()[-1] == 2**63 - 1
    assert QdrantBackfillIndex(index.client, "g", D_OLD, D_NEW).ntotal == len(ids) + 1


# ---- 2. points holding neither or both vectors ----------------------------------------------------

@pytest.mark.parametrize("vector, what", [({}, "neither"), ("both", "both")])
def test_a_point_holding_neither_or_both_vectors_is_refused_not_miscounted(vector, what):
    index, ids, old, new = make()
    if vector == "both":
        vector = {"old": old[0].tolist(), "new": new[0].tolist()}
    write_behind(index, 99, vector)
    message = rf"point 99 .*holds {what}.*index\.remove\(\[99\]\)"
    with pytest.raises(ValueError, match=message):
        QdrantBackfillIndex(index.client, "g", D_OLD, D_NEW)
    # The old code let the job finish (old_ids empty) with progress stuck below 1.
    for call in (lambda: index.progress, index.old_ids, index.new_ids, lambda: index.backfill([99], new[:1])):
        with pytest.raises(ValueError, match=message):
            call()
    with pytest.raises(ValueError, match=message):
        index.add_old([99], old[:1])
    # The way out the message gives works.
    index.remove([99])
    index.backfill(ids, new)
    assert index.progress == 1.0 and len(index.old_ids()) == 0


@pytest.mark.parametrize("config, match", [
    ({"old": models.VectorParams(size=D_OLD, distance=models.Distance.DOT,
                                 multivector_config=models.MultiVectorConfig(comparator=models.MultiVectorComparator.MAX_SIM))},
     "multivector"),
    ({"old": models.VectorParams(size=D_OLD, distance=models.Distance.DOT, datatype=models.Datatype.UINT8)}, "uint8"),
    ({"clip": models.VectorParams(size=3, distance=models.Distance.DOT)}, r"other vectors too \(\['clip'\]\)"),
])
def test_an_existing_collection_whose_vectors_would_lose_data_is_refused(config, match):
    client = qdrant_client.QdrantClient(":memory:")
    vectors = {"old": models.VectorParams(size=D_OLD, distance=models.Distance.DOT),
               "new": models.VectorParams(size=D_NEW, distance=models.Distance.DOT), **config}
    client.create_collection("c", vectors_config=vectors)
    with pytest.raises(ValueError, match=match):
        QdrantBackfillIndex(client, "c", D_OLD, D_NEW)


def test_an_existing_collection_with_sparse_vectors_is_refused():
    client = qdrant_client.QdrantClient(":memory:")
    client.create_collection("c", vectors_config={
        "old": models.VectorParams(size=D_OLD, distance=models.Distance.DOT),
        "new": models.VectorParams(size=D_NEW, distance=models.Distance.DOT)},
        sparse_vectors_config={"bm25": models.SparseVectorParams()})
    with pytest.raises(ValueError, match=r"other vectors too \(\['bm25'\]\).*would delete them"):
        QdrantBackfillIndex(client, "c", D_OLD, D_NEW)


# ---- 3. a repeated call after a crash ----------------------------------------------------------------

def test_repeating_add_old_and_backfill_finishes_them_and_keeps_payloads():
    index, ids, old, new = make()
    extra_ids, extra = np.array([50, 51, 52]), grid_unit(np.random.default_rng(3), 3, D_OLD)
    index.add_old(extra_ids[:1], extra[:1])       # what a crash left of add_old(extra_ids, extra)
    index.add_old(extra_ids, extra)               # the repeat finishes it
    np.testing.assert_array_equal(index.old_ids(), np.sort(np.r_[ids, extra_ids]))
    index.client.set_payload("g", {"url": "a.jpg"}, points=[int(ids[0])], wait=True)
    index.backfill(ids[:2], new[:2])              # what a crash left of backfill(ids[:4], new[:4])
    index.backfill(ids[:4], new[:4])
    np.testing.assert_array_equal(index.new_ids(), ids[:4])
    record = index.client.retrieve("g", [int(ids[0])], with_payload=True, with_vectors=True)[0]
    assert record.payload == {"url": "a.jpg"} and set(record.vector) == {"new"}
    np.testing.assert_allclose(record.vector["new"], new[0])


@pytest.mark.parametrize("call, match", [
    (lambda ix, ids, o, n: ix.add_old(ids[:2], o[[0, 0]]), r"\[11\] are already in the index, stored old with other"),
    (lambda ix, ids, o, n: ix.add_old(ids[:1], o[:1] @ np.eye(D_OLD)[::-1]), "stored old with other"),
    (lambda ix, ids, o, n: ix.add(ids[:1], n[:1]), "stored old: remove them first"),
    (lambda ix, ids, o, n: ix.add_old(ids[4:5], o[4:5]), "stored new: remove them first"),
    (lambda ix, ids, o, n: ix.backfill(ids[4:5], n[3:4]), r"already backfilled \(stored new, with other"),
])
def test_a_repeat_with_other_vectors_or_into_the_other_part_is_still_refused(call, match):
    index, ids, old, new = make()
    index.backfill(ids[4:], new[4:])
    before = (index.old_ids(), index.new_ids())
    with pytest.raises(ValueError, match=match):
        call(index, ids, old, new)
    np.testing.assert_array_equal(index.old_ids(), before[0])
    np.testing.assert_array_equal(index.new_ids(), before[1])


WRITER = textwrap.dedent("""
    import sys, time
    import numpy as np
    from qdrant_client import QdrantClient
    from qdrant_client.local import persistence
    from backfill_lib.qdrant_index import QdrantBackfillIndex

    path, call, n, stop_after, marker = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    index = QdrantBackfillIndex(QdrantClient(path=path), "g", 6, 8)
    data = np.load(path + ".npz")
    persist, calls = persistence.CollectionPersistence.persist, [0]

    def persist_then_hang(self, point):
        # After stop_after points of this upsert are on disk, say so and wait for the SIGKILL.
        if calls[0] == stop_after:
            open(marker, "w").close()
            time.sleep(600)
        calls[0] += 1
        persist(self, point)

    persistence.CollectionPersistence.persist = persist_then_hang
    if call == "add_old":
        index.add_old(data["ids"], data["old"])
    else:
        index.backfill(data["ids"], data["new"])
    sys.exit(3)  # not reached: killed above
""")


def sigkill_during(tmp_path, call, n, stop_after):
    """Run ``index.<call>`` on all ``n`` points in a subprocess and SIGKILL it mid-upsert."""
    marker = tmp_path / f"{call}.started"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path / "q"), call, str(n), str(stop_after),
                             str(marker)], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not marker.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the writer exited before the kill: {proc.stderr.read()}")
        assert time.monotonic() < deadline, "the writer never reached the middle of its upsert"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    proc.stderr.close()


def test_a_sigkill_during_add_old_then_backfill_on_disk_and_the_repeats_finish_them(tmp_path):
    n = 40
    rng = np.random.default_rng(4)
    ids = rng.choice(10**9, size=n, replace=False).astype(np.int64)
    old, new = grid_unit(rng, n, D_OLD), grid_unit(rng, n, D_NEW)
    np.savez(str(tmp_path / "q") + ".npz", ids=ids, old=old, new=new)
    QdrantBackfillIndex(qdrant_client.QdrantClient(path=str(tmp_path / "q")), "g", D_OLD, D_NEW).client.close()

    sigkill_during(tmp_path, "add_old", n, stop_after=15)
    client = qdrant_client.QdrantClient(path=str(tmp_path / "q"))
    index = QdrantBackfillIndex(client, "g", D_OLD, D_NEW)
    assert index.ntotal == 15  # local mode kept part of the one upsert
    index.add_old(ids, old)
    np.testing.assert_array_equal(index.old_ids(), np.sort(ids))
    with pytest.raises(ValueError, match="with other vectors"):
        index.add_old(ids[:1], old[1:2])
    client.set_payload("g", {"tag": 1}, points=ids.tolist(), wait=True)
    client.close()

    sigkill_during(tmp_path, "backfill", n, stop_after=25)
    client = qdrant_client.QdrantClient(path=str(tmp_path / "q"))
    index = QdrantBackfillIndex(client, "g", D_OLD, D_NEW)
    assert len(index.new_ids()) == 25 and index.ntotal == n  # every point whole: old or new
    index.backfill(ids, new)
    assert index.progress == 1.0 and len(index.old_ids()) == 0
    records = client.retrieve("g", ids.tolist(), with_payload=True, with_vectors=True)
    assert all(r.payload == {"tag": 1} and set(r.vector) == {"new"} for r in records)
    scores, found = index.search(new[:3], 1)
    np.testing.assert_array_equal(found[:, 0], ids[:3])
    client.close()


# ---- 4. the rest of the public surface --------------------------------------------------------------

@pytest.mark.parametrize("client", [None, "http://localhost:6333", object()])
def test_a_client_that_is_not_a_client_is_named(client):
    with pytest.raises(TypeError, match=r"client must be a qdrant_client\.QdrantClient"):
        QdrantBackfillIndex(client, "g", D_OLD, D_NEW)


def test_an_async_client_is_refused():
    client = qdrant_client.AsyncQdrantClient(":memory:")
    with pytest.raises(TypeError, match="AsyncQdrantClient.*QdrantClient with the same arguments"):
        QdrantBackfillIndex(client, "g", D_OLD, D_NEW)


@pytest.mark.parametrize("name, match", [
    ("a/b", "contains '/'"), ("..", "it is '..'"), ("x" * 256, "too long"), ("a\0b", "contains"), ("a:b", "contains ':'")])
def test_an_invalid_collection_name_is_named(name, match, tmp_path):
    for client in (qdrant_client.QdrantClient(":memory:"), qdrant_client.QdrantClient(path=str(tmp_path / "q"))):
        with pytest.raises(ValueError, match=rf"collection=.*not a (valid|usable).*"):
            QdrantBackfillIndex(client, name, D_OLD, D_NEW)
        client.close()
    with pytest.raises(ValueError, match=match):
        QdrantBackfillIndex(qdrant_client.QdrantClient(":memory:"), name, D_OLD, D_NEW)


def test_odd_but_valid_collection_names_work():
    client = qdrant_client.QdrantClient(":memory:")
    for name in ("a b", "галерея", "g-1.v2"):
        index, ids, old, new = make(client=client, name=name)
        assert index.ntotal == len(ids)


def test_a_dimension_qdrant_cannot_store_is_named():
    with pytest.raises(ValueError, match="dim_new=70000.*at most 65536"):
        QdrantBackfillIndex(qdrant_client.QdrantClient(":memory:"), "g", D_OLD, 70000)


def test_dimensions_other_than_the_collections_say_what_it_has():
    index, ids, old, new = make()
    with pytest.raises(ValueError, match=r"'old' of size 5 .*it has 'old': size 6, Dot, 'new': size 8, Dot.*dim_old"):
        QdrantBackfillIndex(index.client, "g", 5, D_NEW)


def test_search_params_are_checked_when_given_and_a_dict_is_accepted():
    client = qdrant_client.QdrantClient(":memory:")
    with pytest.raises(TypeError, match="search_params must be"):
        QdrantBackfillIndex(client, "g", D_OLD, D_NEW, search_params="exact")
    with pytest.raises(ValueError, match="search_params .*hnsw_ef"):
        QdrantBackfillIndex(client, "g", D_OLD, D_NEW, search_params={"hnsw_ef": "many"})
    with pytest.raises(ValueError, match="search_params .*colour"):
        QdrantBackfillIndex(client, "g", D_OLD, D_NEW, search_params={"colour": 1})
    index, ids, old, new = make(client=client)
    index.search_params = {"exact": True}
    assert index.search_params == models.SearchParams(exact=True)
    with pytest.raises(TypeError, match="search_params must be"):
        index.search_params = 3
    scores, found = index.search(new[:1], 2, query_old=old[:1])
    assert found[0, 0] == ids[0]


def test_psi_is_checked_when_replaced_and_its_output_is_named():
    index, ids, old, new = make()
    with pytest.raises(TypeError, match="psi must have a transform"):
        index.psi = object()
    index.psi = PsiStandIn(D_NEW, D_OLD + 1)
    with pytest.raises(ValueError, match=r"psi\.transform\(query_new\) has dimension 7 but 6"):
        index.search(new[:1], 2)

    class OneRow:
        def transform(self, x):
            return old[:1]
    index.psi = OneRow()
    with pytest.raises(ValueError, match="psi.transform returned 1 rows for 2 queries"):
        index.search(new[:2], 2)


@pytest.mark.parametrize("ids, error, match", [
    ([2**64], ValueError, r"0\.\.2\*\*63-1"),
    ([2**63], ValueError, "int64"),
    (np.array([2**63], dtype=np.uint64), ValueError, "int64"),
    ([1.0], TypeError, "integers"),
    ([True], TypeError, "integers"),
    (["7"], TypeError, "integers"),
    ([-1], ValueError, "non-negative"),
    ([[7]], ValueError, "1-D"),
])
def test_bad_ids_are_named_in_every_write(ids, error, match):
    index, known, old, new = make()
    for call in (lambda: index.add_old(ids, old[:1]), lambda: index.add(ids, new[:1]),
                 lambda: index.backfill(ids, new[:1]), lambda: index.remove(ids)):
        with pytest.raises(error, match=match):
            call()
    assert index.ntotal == len(known)


def test_remove_of_nothing_removes_nothing():
    index, ids, old, new = make()
    index.remove([])  # the old code passed an empty list to Qdrant: "Empty update request"
    index.remove(np.array([], dtype=np.int64))
    assert index.ntotal == len(ids)
    index.remove(int(ids[0]))
    assert index.ntotal == len(ids) - 1


def test_a_huge_k_is_refused_and_a_large_one_is_padded():
    index, ids, old, new = make()
    with pytest.raises(ValueError, match=r"k=1000000000 is more than the collection holds \(6 points\).*at most 6"):
        index.search(new[:1], 10**9, query_old=old[:1])
    scores, found = index.search(new[:2], 1000, query_old=old[:2])
    assert found.shape == (2, 1000) and (found[:, 6:] == -1).all() and np.isneginf(scores[:, 6:]).all()
    assert sorted(found[0, :6].tolist()) == ids.tolist()
    for k, error in [(2.0, TypeError), (True, TypeError), (None, TypeError), (-1, ValueError)]:
        with pytest.raises(error, match="k must be"):
            index.search(new[:1], k, query_old=old[:1])


def test_an_empty_collection_searches_to_padding():
    index = QdrantBackfillIndex(qdrant_client.QdrantClient(":memory:"), "g", D_OLD, D_NEW)
    q = grid_unit(np.random.default_rng(0), 2, D_NEW)
    scores, found = index.search(q, 3)
    assert (found == -1).all() and np.isneginf(scores).all()
    assert index.progress == 0.0 and len(index.old_ids()) == 0


@pytest.mark.parametrize("call", [
    lambda ix, ids, o, n: ix.old_ids(), lambda ix, ids, o, n: ix.progress, lambda ix, ids, o, n: ix.ntotal,
    lambda ix, ids, o, n: ix.search(n[:1], 2, query_old=o[:1]), lambda ix, ids, o, n: ix.add_old([77], o[:1]),
    lambda ix, ids, o, n: ix.backfill(ids[:1], n[:1]), lambda ix, ids, o, n: ix.remove(ids[:1]),
])
def test_a_collection_deleted_underneath_is_reported_as_such(call):
    index, ids, old, new = make()
    index.client.delete_collection("g")
    with pytest.raises(RuntimeError, match="collection 'g' no longer exists"):
        call(index, ids, old, new)


@pytest.mark.parametrize("vectors, match", [
    (np.full((1, D_OLD), np.nan), "NaN"), (np.zeros((1, D_OLD)), "unit-norm"), (np.zeros((0, D_OLD)), "empty")])
def test_nan_zero_and_empty_vectors_are_refused(vectors, match):
    index, ids, old, new = make()
    with pytest.raises(ValueError, match=match):
        index.add_old([1] * len(vectors), vectors)
    with pytest.raises(ValueError, match=match):
        index.search(new[:1], 2, query_old=vectors)


def test_a_collection_re_created_with_other_vectors_underneath_is_reported_as_such():
    index, ids, old, new = make()
    index.client.delete_collection("g")
    index.client.create_collection("g", vectors_config={
        name: models.VectorParams(size=dim, distance=models.Distance.DOT) for name, dim in (("old", 5), ("new", D_NEW))})
    with pytest.raises(RuntimeError, match=r"'g' was changed underneath.*'old' of size 6.*it has 'old': size 5"):
        index.add_old(ids, old)


def test_a_point_whose_vectors_another_client_changed_is_named():
    index, ids, old, new = make()
    index.client.update_vectors("g", points=[models.PointVectors(id=int(ids[2]), vector={"new": new[2].tolist()})])
    with pytest.raises(ValueError, match=rf"point {ids[2]} .*holds both"):
        index.old_ids()
    index.client.delete_vectors("g", vectors=["old", "new"], points=[int(ids[2])])
    with pytest.raises(ValueError, match=rf"point {ids[2]} .*holds neither"):
        index.progress
