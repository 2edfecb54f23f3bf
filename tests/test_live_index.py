"""OnlineBackfillIndex: merged search against brute force, errors, crash-safe save, threads."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import zipfile

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backfill_lib import live_index
from backfill_lib.live_index import CHUNK_ROWS, FILE_MAGIC, OnlineBackfillIndex
from backfill_lib.retrieval import MixedGallery
from backfill_lib.validation import normalize_rows
from live_helpers import PsiStandIn, assert_search_is_brute_force, brute_force_merged, grid_unit

D_OLD, D_NEW = 6, 8
TESTS = os.path.dirname(os.path.abspath(__file__))


def build(rng, n, specs=("Flat", "Flat"), psi=None, chunk_rows=CHUNK_ROWS):
    """An index of ``n`` items with random ids, all stored old, and the vectors behind it."""
    ids = rng.choice(10**6, size=n, replace=False).astype(np.int64)
    old, new = grid_unit(rng, n, D_OLD), grid_unit(rng, n, D_NEW)
    index = OnlineBackfillIndex(D_OLD, D_NEW, *specs, psi=psi, chunk_rows=chunk_rows)
    if specs[0].startswith("IVF"):
        index.train_old(grid_unit(rng, 64, D_OLD))
    if specs[1].startswith("IVF"):
        index.train_new(grid_unit(rng, 64, D_NEW))
    index.add_old(ids, old)
    if specs[0].startswith("IVF") or specs[1].startswith("IVF"):
        index.set_search_params(nprobe=4)  # every list: exact
    return index, ids, old, new


@settings(max_examples=40)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 40), n_batches=st.integers(0, 5),
       use_psi=st.booleans(), spec=st.sampled_from(["Flat", "IVF4,Flat"]),
       chunk_rows=st.sampled_from([1, 3, 7, CHUNK_ROWS]), data=st.data())
def test_merged_search_equals_brute_force(seed, n, n_batches, use_psi, spec, chunk_rows, data):
    # chunk_rows: flat parts stored in chunks of 1, 3, 7 rows (many chunks, rebuilt, freed and
    # refilled as items leave) or in one chunk. IVF-Flat parts ignore it: they are stored list by
    # list, each list rebuilt at its size as it grows and shrinks (assert_list_bounds).
    rng = np.random.default_rng(seed)
    psi = PsiStandIn(D_NEW, D_OLD, seed) if use_psi else None
    index, ids, old, new = build(rng, n, (spec, spec), psi, chunk_rows)
    stored_new = np.zeros(n, dtype=bool)
    # Backfill a random order in random batch sizes, up to a random point.
    order = rng.permutation(n)
    cuts = np.sort(rng.integers(0, n + 1, size=n_batches))
    start = 0
    for cut in cuts:
        if cut > start:
            batch = order[start:cut]
            index.backfill(ids[batch], new[batch])
            stored_new[batch] = True
            start = cut
    # A few items arrive new and a few leave.
    n_arrive = data.draw(st.integers(0, 3))
    arrive_ids = np.arange(10**6, 10**6 + n_arrive)
    arrive_new = grid_unit(rng, n_arrive, D_NEW)
    if n_arrive:
        index.add(arrive_ids, arrive_new)
    keep = np.ones(n, dtype=bool)
    if n > 1 and data.draw(st.booleans()):
        gone = rng.choice(n, size=rng.integers(1, n), replace=False)
        index.remove(ids[gone])
        keep[gone] = False
    all_ids = np.concatenate([ids[keep], arrive_ids])
    all_old = np.concatenate([old[keep], np.zeros((n_arrive, D_OLD), np.float32)])
    all_new = np.concatenate([new[keep], arrive_new])
    all_stored_new = np.concatenate([stored_new[keep], np.ones(n_arrive, bool)])
    assert index.ntotal == len(all_ids)
    assert index.progress == pytest.approx(all_stored_new.mean())

    qn = grid_unit(rng, 7, D_NEW)
    qo = psi.transform(qn) if use_psi else grid_unit(rng, 7, D_OLD)
    k = data.draw(st.integers(1, len(all_ids)))
    assert_search_is_brute_force(index, qn, qo, k, all_ids, all_old, all_new, all_stored_new, use_psi)
    if spec == "Flat":
        assert_chunk_bounds(index)
    else:
        assert_list_bounds(index)


def assert_chunk_bounds(index):
    """Every live id in exactly one chunk of its part, and the spare rows within the bound."""
    for name, part in index._parts.items():
        stored = np.concatenate([c.ids[:c.n] for c in part.chunks] or [np.empty(0, np.int64)])
        np.testing.assert_array_equal(np.sort(stored), index.old_ids() if name == "old" else index.new_ids())
        assert all(c.n for c in part.chunks), "an emptied chunk was kept"
        assert all(c.n == c.cap for c in part.chunks[:-1]), "a chunk other than the last has spare rows"
        assert part.capacity - part.ntotal < part.chunk_rows


def test_chunked_parts_give_memory_back_during_a_backfill():
    # 2,000 items in chunks of 64: as a random order moves them, the old part shrinks with them
    # (holes refilled from the last chunk, emptied chunks freed) and the new part grows chunk by chunk.
    rng = np.random.default_rng(3)
    index, ids, old, new = build(rng, 2000, chunk_rows=64)
    order = rng.permutation(2000)
    old_part, new_part = index._parts["old"], index._parts["new"]
    for start in range(0, 2000, 100):
        batch = order[start:start + 100]
        index.backfill(ids[batch], new[batch])
        assert_chunk_bounds(index)
        assert old_part.capacity + new_part.capacity < 2000 + 2 * 64
    assert old_part.chunks == [] and old_part.capacity == 0
    index.compact()
    assert new_part.capacity == 2000
    q = grid_unit(rng, 3, D_NEW)
    _, got = index.search(q, 5)
    _, want = brute_force_merged(q[:, :D_OLD], q, ids, old, new, np.ones(2000, bool), 5)
    np.testing.assert_array_equal(got, want)


def assert_list_bounds(index):
    """IVF-Flat parts: every live id in one list, each list's storage within its bound, empty lists freed."""
    for name, part in index._parts.items():
        stored = [part._entries(l)[0] for l in range(part.nlist)]
        live = index.old_ids() if name == "old" else index.new_ids()
        np.testing.assert_array_equal(np.sort(np.concatenate(stored)), live)
        for l, il in enumerate(part._lists):
            assert il.list_size(0) == part.sizes[l]
            assert part.sizes[l] <= part.caps[l] <= part._bound(part.sizes[l])
            assert (il is part._empty) == (part.sizes[l] == 0), "an emptied list kept its storage"
        assert part._view.ntotal == part.ntotal


def test_ivf_lists_give_memory_back_during_a_backfill():
    # 2,000 items in IVF16,Flat parts: as a random order moves them, every list of the old part is
    # rebuilt smaller once its storage exceeds its entries by more than HEADROOM (a sixteenth, plus
    # SPARE entries), and the new part's lists grow with at most that much room each. Searches
    # stay exact (nprobe 16).
    rng = np.random.default_rng(3)
    n, nlist = 2000, 16
    ids = rng.choice(10**6, size=n, replace=False).astype(np.int64)
    old, new = grid_unit(rng, n, D_OLD), grid_unit(rng, n, D_NEW)
    index = OnlineBackfillIndex(D_OLD, D_NEW, f"IVF{nlist},Flat", f"IVF{nlist},Flat")
    index.train_old(grid_unit(rng, 40 * nlist, D_OLD))
    index.train_new(grid_unit(rng, 40 * nlist, D_NEW))
    index.add_old(ids, old)
    index.set_search_params(nprobe=nlist)
    old_part, new_part = index._parts["old"], index._parts["new"]
    assert old_part.capacity == n  # filled by one add: every list allocated exactly
    order = rng.permutation(n)
    stored_new = np.zeros(n, dtype=bool)
    q, qo = grid_unit(rng, 3, D_NEW), grid_unit(rng, 3, D_OLD)
    for start in range(0, n, 100):
        batch = order[start:start + 100]
        index.backfill(ids[batch], new[batch])
        stored_new[batch] = True
        assert_list_bounds(index)
        assert old_part.capacity + new_part.capacity <= n * (1 + old_part.HEADROOM) + 2 * old_part.SPARE * nlist
        if start % 500 == 0:
            _, got = index.search(q, 20, query_old=qo)
            _, want = brute_force_merged(qo, q, ids, old, new, stored_new, 20)
            np.testing.assert_array_equal(got, want)
    assert old_part.capacity == 0 and all(il is old_part._empty for il in old_part._lists)
    index.compact()
    assert new_part.capacity == n
    _, got = index.search(q, 5)
    _, want = brute_force_merged(qo, q, ids, old, new, np.ones(n, bool), 5)
    np.testing.assert_array_equal(got, want)


def test_ivf_list_storage_is_what_the_part_counts():
    # The bound above is on the part's own count of each list's storage (caps): check that faiss
    # really holds that much, no more. A list rebuilt with room takes adds up to its count in place
    # (the buffer does not move), and the next add moves it.
    import faiss

    rng = np.random.default_rng(11)
    index = OnlineBackfillIndex(D_OLD, D_NEW, "IVF4,Flat", "IVF4,Flat")
    index.train_new(grid_unit(rng, 64, D_NEW))
    part = index._parts["new"]
    x = grid_unit(rng, 200, D_NEW)
    index.add(np.arange(100), x[:100])
    assert part.capacity == 100  # filled from empty: exact
    index.add(np.arange(100, 110), x[100:110])  # every touched list grows: rebuilt with room
    grown = np.nonzero(part.caps > part.sizes)[0]
    assert len(grown)
    for l in grown:
        il, room = part._lists[l], int(part.caps[l] - part.sizes[l])
        codes, list_ids = int(il.get_codes(0)), int(il.get_ids(0))
        fill = np.zeros((room + 1, part.code_size), np.uint8)
        fill_ids = np.arange(room + 1, dtype=np.int64)
        il.add_entries(0, room, faiss.swig_ptr(fill_ids), faiss.swig_ptr(fill))
        assert (int(il.get_codes(0)), int(il.get_ids(0))) == (codes, list_ids)
        il.add_entries(0, 1, faiss.swig_ptr(fill_ids), faiss.swig_ptr(fill))
        assert int(il.get_codes(0)) != codes


def test_an_ivf_batch_that_fails_midway_is_taken_back():
    rng = np.random.default_rng(12)
    index, ids, old, new = build(rng, 300, ("IVF4,Flat", "IVF4,Flat"))
    index.backfill(ids[:150], new[:150])
    part = index._parts["new"]
    before = [part._entries(l)[0].copy() for l in range(part.nlist)]
    q, qo = grid_unit(rng, 4, D_NEW), grid_unit(rng, 4, D_OLD)
    want = index.search(q, 30, query_old=qo)
    calls, real = [], part._rebuild

    def failing(*args):
        calls.append(1)
        if len(calls) == 3:
            raise MemoryError("no room")
        return real(*args)

    part._rebuild = failing
    with pytest.raises(MemoryError):
        index.backfill(ids[150:], new[150:])
    del part._rebuild
    assert (index.n_old, index.n_new) == (150, 150)
    for l in range(part.nlist):
        np.testing.assert_array_equal(np.sort(part._entries(l)[0]), np.sort(before[l]))
    for a, b in zip(index.search(q, 30, query_old=qo), want):
        np.testing.assert_array_equal(a, b)
    assert_list_bounds(index)


def test_ivf_save_load_mid_backfill(tmp_path):
    rng = np.random.default_rng(13)
    index, ids, old, new = build(rng, 200, ("IVF4,Flat", "IVF4,Flat"))
    index.backfill(ids[:120], new[:120])
    index.remove(ids[[0, 150]])
    index.add([10**6 + 1], new[:1])
    index.save(tmp_path / "ivf.idx")
    with np.load(tmp_path / "ivf.idx") as data:
        header = json.loads(data["header"].tobytes().decode())
    assert header["version"] == live_index.FILE_VERSION and header["old_layout"] == header["new_layout"] == "ivf_lists"
    loaded = OnlineBackfillIndex.load(tmp_path / "ivf.idx")
    for name in ("old", "new"):
        part = loaded._parts[name]
        assert part.capacity == part.ntotal == index._parts[name].ntotal  # read back exactly
        assert part.params == {"nprobe": 4} and part._view.nprobe == 4
    q, qo = grid_unit(rng, 5, D_NEW), grid_unit(rng, 5, D_OLD)
    for a, b in zip(loaded.search(q, 50, query_old=qo), index.search(q, 50, query_old=qo)):
        np.testing.assert_array_equal(a, b)
    assert_list_bounds(loaded)
    loaded.backfill(ids[120:150], new[120:150])  # and it goes on working
    assert (loaded.n_old, loaded.n_new) == (49, 150)


def test_a_version_2_file_with_ivf_parts_still_loads(tmp_path):
    # Format 2 held an IVF-Flat part in one faiss IndexIVFFlat (layout "single"), written here by hand.
    import faiss

    rng = np.random.default_rng(14)
    n = 60
    ids = rng.choice(10**6, size=n, replace=False).astype(np.int64)
    old, new = grid_unit(rng, n, D_OLD), grid_unit(rng, n, D_NEW)
    stored_new = np.arange(n) < 25
    header = {"magic": FILE_MAGIC, "version": 2, "dim_old": D_OLD, "dim_new": D_NEW, "psi_class": None,
              "chunk_rows": CHUNK_ROWS, "old_index": "IVF4,Flat", "new_index": "IVF4,Flat",
              "old_params": {"nprobe": 4}, "new_params": {"nprobe": 4},
              "old_layout": "single", "new_layout": "single"}
    arrays = {}
    for name, dim, x, mask in (("old", D_OLD, old, ~stored_new), ("new", D_NEW, new, stored_new)):
        ivf = faiss.index_factory(dim, "IVF4,Flat", faiss.METRIC_INNER_PRODUCT)
        ivf.train(grid_unit(rng, 64, dim))
        ivf.nprobe = 4
        ivf.add_with_ids(x[mask], ids[mask])
        arrays.update({f"{name}_faiss": faiss.serialize_index(ivf), f"{name}_ids": np.sort(ids[mask]),
                       f"{name}_tombs": np.empty(0, np.int64)})
    arrays["header"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    with open(tmp_path / "v2.idx", "wb") as f:
        np.savez(f, **arrays)
    with pytest.warns(UserWarning, match="format version 2, without a checksum"):
        loaded = OnlineBackfillIndex.load(tmp_path / "v2.idx")
    assert (loaded.n_old, loaded.n_new) == (35, 25)
    for part in loaded._parts.values():
        assert part.capacity == part.ntotal and part.template.ntotal == 0  # lists copied out exactly
    q, qo = grid_unit(rng, 4, D_NEW), grid_unit(rng, 4, D_OLD)
    _, want = brute_force_merged(qo, q, ids, old, new, stored_new, n)
    np.testing.assert_array_equal(loaded.search(q, n, query_old=qo)[1], want)
    loaded.backfill(ids[30:40], new[30:40])  # and it goes on working
    stored_new[30:40] = True
    _, want = brute_force_merged(qo, q, ids, old, new, stored_new, n)
    np.testing.assert_array_equal(loaded.search(q, n, query_old=qo)[1], want)
    assert_list_bounds(loaded)


def test_a_version_1_file_still_loads(tmp_path):
    # The format before chunked parts: one IndexIDMap(flat) per part, written here by hand.
    import faiss

    rng = np.random.default_rng(4)
    ids, old = np.array([7, 3, 11, 5]), grid_unit(rng, 4, D_OLD)
    new = grid_unit(rng, 1, D_NEW)
    parts = {}
    for name, dim, x, i in (("old", D_OLD, old[[0, 1, 3]], ids[[0, 1, 3]]), ("new", D_NEW, new, ids[[2]])):
        flat = faiss.IndexIDMap(faiss.IndexFlatIP(dim))
        flat.add_with_ids(x, i)
        parts[name] = (flat, np.sort(i))
    header = {"magic": FILE_MAGIC, "version": 1, "dim_old": D_OLD, "dim_new": D_NEW, "psi_class": None,
              "old_index": "Flat", "new_index": "Flat", "old_params": {}, "new_params": {}}
    arrays = {"header": np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)}
    for name, (flat, live) in parts.items():
        arrays.update({f"{name}_faiss": faiss.serialize_index(flat), f"{name}_ids": live,
                       f"{name}_tombs": np.empty(0, np.int64)})
    with open(tmp_path / "v1.idx", "wb") as f:
        np.savez(f, **arrays)
    with pytest.warns(UserWarning, match="format version 1, without a checksum"):
        loaded = OnlineBackfillIndex.load(tmp_path / "v1.idx")
    np.testing.assert_array_equal(loaded.old_ids(), [3, 5, 7])
    np.testing.assert_array_equal(loaded.new_ids(), [11])
    qo, qn = grid_unit(rng, 2, D_OLD), grid_unit(rng, 2, D_NEW)
    stored_new = np.array([False, False, True, False])
    all_new = np.zeros((4, D_NEW), np.float32)
    all_new[2] = new[0]
    _, want = brute_force_merged(qo, qn, ids, old, all_new, stored_new, 4)
    np.testing.assert_array_equal(loaded.search(qn, 4, query_old=qo)[1], want)
    loaded.backfill([3], grid_unit(rng, 1, D_NEW))  # and it goes on working
    assert loaded.progress == 0.5


def test_a_backfill_batch_flips_flags_in_place():
    # The index's bookkeeping (every id once, sorted, and a stored-new flag) is not rewritten by a
    # backfill: the same arrays, changed in place. Rewriting them per batch cost a copy of the
    # gallery's ids at every batch (the peak memory of benchmarks/live_index.py).
    rng = np.random.default_rng(8)
    index, ids, old, new = build(rng, 300, chunk_rows=16)
    all_ids, in_new = index._ids, index._in_new
    index.backfill(ids[:100], new[:100])
    index.backfill(ids[200:250], new[200:250])
    assert index._ids is all_ids and index._in_new is in_new
    np.testing.assert_array_equal(index.new_ids(), np.sort(np.r_[ids[:100], ids[200:250]]))
    np.testing.assert_array_equal(index.old_ids(), np.sort(np.r_[ids[100:200], ids[250:]]))
    assert (index.n_old, index.n_new, index.progress) == (150, 150, 0.5)
    index.remove(ids[[0, 150]])  # one stored new, one old
    assert (index.n_old, index.n_new) == (149, 149)
    assert not np.isin(ids[[0, 150]], np.r_[index.old_ids(), index.new_ids()]).any()


def test_load_refuses_an_id_stored_in_both_parts(tmp_path):
    rng = np.random.default_rng(9)
    index, ids, old, new = build(rng, 5)
    index.backfill(ids[:2], new[:2])
    good = tmp_path / "good.idx"
    index.save(good)
    with np.load(good) as data:
        arrays = {key: data[key] for key in data.files}
    # The new part's second item relabelled as an item that is stored old: the counts still fit.
    twice = int(index.old_ids()[0])
    for key in ("new_ids", "new_chunk0_ids"):
        arrays[key] = np.where(arrays[key] == arrays[key].max(), twice, arrays[key])
    # Sealed again (fresh checksums), so that the check on what the arrays say is reached: an
    # unsealed edit is refused earlier as damage (tests/test_live_index_flips.py).
    header = json.loads(arrays.pop("header").tobytes().decode())
    arrays.pop(live_index.HEADER_CHECKSUM)
    header = {k: v for k, v in header.items() if k not in ("checksum", "checksums")}
    with open(tmp_path / "twice.idx", "wb") as f:
        np.savez(f, **live_index._seal(header, arrays))
    with pytest.raises(ValueError, match=rf"ids \[{twice}\] are stored twice"):
        OnlineBackfillIndex.load(tmp_path / "twice.idx")


def test_ties_go_to_the_smaller_id_even_beyond_the_first_fetch():
    # 30 identical old vectors and one query: every score ties, and faiss returns whichever it
    # likes among them; the index must return the 3 smallest ids.
    index = OnlineBackfillIndex(4, 4)
    ids = np.array([50 - i for i in range(30)])
    index.add_old(ids, np.tile([[1.0, 0, 0, 0]], (30, 1)))
    index.backfill([35, 21], [[1.0, 0, 0, 0], [1.0, 0, 0, 0]])
    q = np.array([[1.0, 0, 0, 0]])
    _, got = index.search(q, 3, query_old=q)
    assert got.tolist() == [[21, 22, 23]]


def test_agrees_with_mixed_gallery_on_continuous_vectors():
    rng = np.random.default_rng(3)
    old, new = normalize_rows(rng.normal(size=(300, D_OLD))), normalize_rows(rng.normal(size=(300, D_NEW)))
    index = OnlineBackfillIndex(D_OLD, D_NEW)
    index.add_old(np.arange(300), old)
    gallery = MixedGallery(old, D_NEW)
    batch = rng.permutation(300)[:120]
    index.backfill(batch, new[batch])
    gallery.backfill(batch, new[batch])
    qo, qn = normalize_rows(rng.normal(size=(25, D_OLD))), normalize_rows(rng.normal(size=(25, D_NEW)))
    s1, i1 = index.search(qn, 10, query_old=qo)
    s2, i2 = gallery.search(qo, qn, 10)
    np.testing.assert_allclose(s1, s2, atol=1e-6)
    np.testing.assert_array_equal(i1, i2)


def test_hnsw_parts_use_tombstones_and_compact():
    rng = np.random.default_rng(1)
    n = 200
    old, new = normalize_rows(rng.normal(size=(n, D_OLD))), normalize_rows(rng.normal(size=(n, D_NEW)))
    index = OnlineBackfillIndex(D_OLD, D_NEW, "HNSW8", "HNSW8")
    index.set_search_params(efSearch=400)  # larger than the part: the graph search is exhaustive
    index.add_old(np.arange(n), old)
    index.backfill(np.arange(0, n, 2), new[::2])
    index.remove([1, 4])
    qo, qn = normalize_rows(rng.normal(size=(5, D_OLD))), normalize_rows(rng.normal(size=(5, D_NEW)))
    stored_new = np.arange(n) % 2 == 0
    keep = ~np.isin(np.arange(n), [1, 4])
    want = brute_force_merged(qo, qn, np.arange(n)[keep], old[keep], new[keep], stored_new[keep], n - 2)[1]
    _, got = index.search(qn, n - 2, query_old=qo)
    np.testing.assert_array_equal(got, want)  # every item once, none of the tombstones
    with pytest.raises(ValueError, match="compact"):
        index.add([4], new[4:5])
    index.compact()
    index.add([4], new[4:5])
    _, got = index.search(qn, n - 1, query_old=qo)
    assert sorted(got[0].tolist()) == sorted(np.arange(n)[np.arange(n) != 1].tolist())


def test_psi_is_used_for_the_old_part_and_query_old_takes_precedence():
    rng = np.random.default_rng(2)
    psi = PsiStandIn(D_NEW, D_OLD)
    index, ids, old, new = build(rng, 30, psi=psi)
    index.backfill(ids[:10], new[:10])
    qn = grid_unit(rng, 4, D_NEW)
    stored = np.arange(30) < 10
    with_psi = index.search(qn, 30)[1]
    np.testing.assert_array_equal(with_psi, brute_force_merged(psi.transform(qn), qn, ids, old, new, stored, 30)[1])
    qo = grid_unit(rng, 4, D_OLD)
    merged = index.search(qn, 30, query_old=qo)[1]
    np.testing.assert_array_equal(merged, brute_force_merged(qo, qn, ids, old, new, stored, 30)[1])


def test_no_old_query_needed_once_everything_is_new():
    rng = np.random.default_rng(4)
    index, ids, old, new = build(rng, 10)
    with pytest.raises(ValueError, match="query_old.*psi"):
        index.search(new[:1], 3)
    index.backfill(ids, new)
    assert index.progress == 1.0
    scores, _ = index.search(new[:1], 1)
    assert scores[0, 0] == 1.0  # the item's own new vector (or an equal one)


@pytest.fixture
def small():
    rng = np.random.default_rng(5)
    index, ids, old, new = build(rng, 10)
    index.backfill(ids[:3], new[:3])
    return index, ids, old, new


@pytest.mark.parametrize("call, match", [
    (lambda ix, ids, o, n: ix.backfill([123456789], n[:1]), "not in the index"),
    (lambda ix, ids, o, n: ix.backfill(ids[:1], n[:1]), "already backfilled"),
    (lambda ix, ids, o, n: ix.backfill(ids[[5, 5]], n[:2]), r"must not repeat.*\[\d+\] appear more than once"),
    (lambda ix, ids, o, n: ix.add_old(ids[4:5], o[:1]), "already in the index"),
    (lambda ix, ids, o, n: ix.add(ids[:1], n[:1]), "already in the index"),
    (lambda ix, ids, o, n: ix.add([7, 7], n[:2]), "must not repeat"),
    (lambda ix, ids, o, n: ix.add([-1], n[:1]), "non-negative"),
    (lambda ix, ids, o, n: ix.add([7, 8], n[:1]), "one id per vector"),
    (lambda ix, ids, o, n: ix.remove([123456789]), "not in the index"),
    (lambda ix, ids, o, n: ix.backfill(ids[5:6], o[5:6]), "dimension 6 but 8"),
    (lambda ix, ids, o, n: ix.add_old([99], n[:1]), "dimension 8 but 6"),
    (lambda ix, ids, o, n: ix.backfill(ids[5:6], 0.5 * n[5:6]), "unit-norm"),
    (lambda ix, ids, o, n: ix.backfill(ids[5:6], np.full((1, D_NEW), np.nan)), "NaN"),
    (lambda ix, ids, o, n: ix.search(n[:1], 3, query_old=0.9 * o[:1]), "unit-norm"),
    (lambda ix, ids, o, n: ix.search(n[:1], 3, query_old=o[:2]), "rows"),
    (lambda ix, ids, o, n: ix.search(n[:1], 11, query_old=o[:1]), "larger than the gallery"),
    (lambda ix, ids, o, n: ix.search(n[:1], 0, query_old=o[:1]), "at least 1"),
    (lambda ix, ids, o, n: ix.set_search_params(part="both", nprobe=3), "cannot set nprobe"),
    (lambda ix, ids, o, n: ix.set_search_params(part="middle"), "part must be"),
])
def test_bad_input_raises_and_leaves_the_index_unchanged(small, call, match):
    index, ids, old, new = small
    before = (index.old_ids(), index.new_ids())
    with pytest.raises(ValueError, match=match):
        call(index, ids, old, new)
    np.testing.assert_array_equal(index.old_ids(), before[0])
    np.testing.assert_array_equal(index.new_ids(), before[1])


def test_a_batch_is_applied_whole_or_not_at_all(small):
    index, ids, old, new = small
    # One bad id (already backfilled) at the end of the batch: none of the others moves.
    with pytest.raises(ValueError, match="already backfilled"):
        index.backfill(np.concatenate([ids[5:9], ids[:1]]), new[[5, 6, 7, 8, 0]])
    assert index.n_new == 3 and index.n_old == 7


@pytest.mark.parametrize("kwargs, err, match", [
    (dict(dim_old=0, dim_new=4), ValueError, "dim_old"),
    (dict(dim_old=4, dim_new=2.5), ValueError, "dim_new"),
    (dict(dim_old=4, dim_new=4, old_index="Nonsense"), ValueError, "factory string"),
    (dict(dim_old=4, dim_new=4, new_index=7), TypeError, "factory string"),
    (dict(dim_old=4, dim_new=4, old_index="IDMap,Flat"), ValueError, "IDMap"),
    (dict(dim_old=4, dim_new=4, psi=object()), TypeError, "transform"),
])
def test_bad_constructor_arguments(kwargs, err, match):
    with pytest.raises(err, match=match):
        OnlineBackfillIndex(**kwargs)


def test_ivf_needs_enough_training_vectors():
    index = OnlineBackfillIndex(4, 4, old_index="IVF16,Flat")
    with pytest.raises(ValueError, match="training the old part"):
        index.add_old([1, 2], [[1.0, 0, 0, 0], [0, 1.0, 0, 0]])
    assert index.ntotal == 0


def test_save_load_roundtrip_keeps_everything_and_psi(tmp_path, small):
    index, ids, old, new = small
    index.psi = PsiStandIn(D_NEW, D_OLD, seed=9)
    path = tmp_path / "live.idx"
    index.save(path)
    loaded = OnlineBackfillIndex.load(path)
    assert isinstance(loaded.psi, PsiStandIn)
    np.testing.assert_array_equal(loaded.psi.W, index.psi.W)
    np.testing.assert_array_equal(loaded.old_ids(), index.old_ids())
    np.testing.assert_array_equal(loaded.new_ids(), index.new_ids())
    assert loaded.progress == index.progress
    q = grid_unit(np.random.default_rng(0), 5, D_NEW)
    for a, b in zip(loaded.search(q, 10), index.search(q, 10)):
        np.testing.assert_array_equal(a, b)
    assert os.listdir(tmp_path) == ["live.idx"]  # no temporary file left behind


def test_psi_that_cannot_be_saved_is_refused_before_writing(tmp_path, small):
    index = small[0]

    class Bare:
        def transform(self, x):
            return x

    index.psi = Bare()
    with pytest.raises(TypeError, match="cannot be saved"):
        index.save(tmp_path / "x.idx")
    assert os.listdir(tmp_path) == []


def test_load_refuses_what_is_not_an_index(tmp_path, small):
    junk = tmp_path / "junk.idx"
    junk.write_bytes(b"not an index at all")
    with pytest.raises(ValueError, match="not an OnlineBackfillIndex file"):
        OnlineBackfillIndex.load(junk)
    other = tmp_path / "other.npz"
    np.savez(other, x=np.arange(3))
    with pytest.raises(ValueError, match="not an OnlineBackfillIndex file"):
        OnlineBackfillIndex.load(other)
    good = tmp_path / "good.idx"
    small[0].save(good)
    truncated = tmp_path / "truncated.idx"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match="not an OnlineBackfillIndex file"):
        OnlineBackfillIndex.load(truncated)
    with pytest.raises(FileNotFoundError):
        OnlineBackfillIndex.load(tmp_path / "missing.idx")
    assert zipfile.is_zipfile(good)


# ---- crash injection: a child process is killed with SIGKILL in the middle of a save ----------

CHILD = textwrap.dedent("""
    import os, sys, time
    import numpy as np
    sys.path.insert(0, {tests!r})
    from backfill_lib.live_index import OnlineBackfillIndex
    from live_helpers import PsiStandIn, grid_unit
    path, mode = sys.argv[1], sys.argv[2]
    rng = np.random.default_rng(0)
    ids = np.arange(2000)
    index = OnlineBackfillIndex(6, 8, psi=PsiStandIn(8, 6))
    index.add_old(ids, grid_unit(rng, 2000, 6))
    new = grid_unit(rng, 2000, 8)
    index.backfill(ids[:500], new[:500])   # state A: progress 0.25
    index.save(path)
    index.backfill(ids[500:1500], new[500:1500])  # state B: progress 0.75
    marker = path + ".marker"
    if mode in ("before_rename", "after_rename"):
        real_fsync, calls = os.fsync, []
        def fsync(fd):
            real_fsync(fd)
            calls.append(fd)
            # 1st fsync: the temporary file is complete, not yet renamed; 2nd: renamed.
            if len(calls) == (1 if mode == "before_rename" else 2):
                open(marker, "w").close()
                time.sleep(120)
        os.fsync = fsync
        index.save(path)
    else:  # save over and over, A and B alternately, until killed
        open(marker, "w").close()
        while True:
            index.save(path)
""")


def _run_child_and_kill(tmp_path, mode, delay=0.0):
    path = str(tmp_path / "live.idx")
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(tests=TESTS))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    child = subprocess.Popen([sys.executable, str(script), path, mode], env=env)
    try:
        deadline = time.monotonic() + 60
        while not os.path.exists(path + ".marker"):
            assert child.poll() is None, "the child process died before the save"
            assert time.monotonic() < deadline, "the child process never reached the save"
            time.sleep(0.02)
        time.sleep(delay)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    return path


@pytest.mark.parametrize("mode, progress", [("before_rename", 0.25), ("after_rename", 0.75)])
def test_kill_during_save_leaves_the_state_before_or_after(tmp_path, mode, progress):
    path = _run_child_and_kill(tmp_path, mode)
    loaded = OnlineBackfillIndex.load(path)
    assert loaded.progress == progress
    assert loaded.ntotal == 2000 and isinstance(loaded.psi, PsiStandIn)
    assert len(np.union1d(loaded.old_ids(), loaded.new_ids())) == 2000


def test_kill_at_a_random_moment_of_repeated_saves(tmp_path):
    path = _run_child_and_kill(tmp_path, "loop", delay=float(np.random.default_rng(0).uniform(0.05, 0.3)))
    loaded = OnlineBackfillIndex.load(path)
    assert loaded.progress == 0.75  # every save in the loop writes state B over state B
    assert loaded.ntotal == 2000


def test_a_killed_save_leaves_a_temporary_file_that_the_next_load_removes_but_not_while_it_runs(tmp_path):
    # The child stops inside save() with its temporary file written (before the rename): while it
    # lives, that file belongs to a running save and a load or save by another process keeps it;
    # once the child is killed, the next load removes it.
    path = str(tmp_path / "live.idx")
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(tests=TESTS))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    child = subprocess.Popen([sys.executable, str(script), path, "before_rename"], env=env)
    try:
        deadline = time.monotonic() + 60
        while not os.path.exists(path + ".marker"):
            assert child.poll() is None and time.monotonic() < deadline, "the child never reached the save"
            time.sleep(0.02)
        temps = [f for f in os.listdir(tmp_path) if f.startswith(".live.idx.") and f.endswith(".tmp")]
        assert len(temps) == 1 and f"-{child.pid}." in temps[0]
        assert OnlineBackfillIndex.load(path).progress == 0.25  # the file before the save
        OnlineBackfillIndex.load(path).save(path)  # another writer of the same path
        assert temps[0] in os.listdir(tmp_path), "the temporary file of a running save was removed"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert temps[0] in os.listdir(tmp_path)  # the kill's leftover
    assert OnlineBackfillIndex.load(path).progress == 0.25
    assert sorted(os.listdir(tmp_path)) == ["child.py", "live.idx", "live.idx.marker"]


# ---- threads -----------------------------------------------------------------------------------

def test_searches_during_a_backfill_see_every_item_exactly_once():
    rng = np.random.default_rng(6)
    n = 3000
    old, new = normalize_rows(rng.normal(size=(n, 16))), normalize_rows(rng.normal(size=(n, 16)))
    index = OnlineBackfillIndex(16, 16)
    index.add_old(np.arange(n), old)
    qo, qn = normalize_rows(rng.normal(size=(2, 16))), normalize_rows(rng.normal(size=(2, 16)))
    stop, errors, counts = threading.Event(), [], []

    def searcher():
        done = 0
        while not stop.is_set():
            _, ids = index.search(qn, n, query_old=qo)
            for row in ids:
                if not np.array_equal(np.sort(row), np.arange(n)):
                    errors.append((done, np.setdiff1d(np.arange(n), row)[:5], len(row) - len(np.unique(row))))
            done += 1
        counts.append(done)

    threads = [threading.Thread(target=searcher) for _ in range(3)]
    for t in threads:
        t.start()
    order = rng.permutation(n)
    for batch in np.array_split(order, 60):
        index.backfill(batch, new[batch])
        time.sleep(0.002)
    stop.set()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert index.progress == 1.0
    assert min(counts) > 0  # every thread searched while the backfill ran


def test_with_the_real_reverse_transform_saved_and_loaded_with_the_index(tmp_path):
    from backfill_lib.transforms import ReverseTransform

    rng = np.random.default_rng(7)
    new = normalize_rows(rng.normal(size=(200, D_NEW)))
    old = normalize_rows(new[:, :D_OLD] + 0.1 * rng.normal(size=(200, D_OLD)))
    psi = ReverseTransform(steps=20, device="cpu", seed=0).fit(new[:100], old[:100])
    index = OnlineBackfillIndex(D_OLD, D_NEW, psi=psi)
    index.add_old(np.arange(100, 200), old[100:])
    index.backfill(np.arange(100, 150), new[100:150])
    q = new[:5]
    stored = np.arange(100) < 50
    want = brute_force_merged(psi.transform(q), q, np.arange(100, 200), old[100:], new[100:], stored, 10)
    scores, got = index.search(q, 10)
    np.testing.assert_allclose(scores, want[0], atol=1e-5)
    index.save(tmp_path / "live.idx")
    loaded = OnlineBackfillIndex.load(tmp_path / "live.idx")
    assert isinstance(loaded.psi, ReverseTransform)
    for a, b in zip(loaded.search(q, 10), (scores, got)):
        np.testing.assert_array_equal(a, b)


def test_a_bridge_with_a_learned_rho_queries_the_new_part_with_rho():
    # ψ + ρ (metric-compatible): the backfill stores ρ̂(φ_n(g)); a search given φ_n(q) alone must
    # score the items stored new against ρ̂(φ_n(q)) (and the old ones against ψ̂(φ_n(q))), exactly
    # as a search given both queries; the raw φ_n(q) against ρ̂-stored items is another ranking.
    from backfill_lib.transforms import ReverseTransform

    rng = np.random.default_rng(8)
    labels = rng.integers(0, 4, size=200)
    centres = rng.normal(size=(4, D_NEW))
    new = normalize_rows(centres[labels] + 0.8 * rng.normal(size=(200, D_NEW)))
    old = normalize_rows(new[:, :D_OLD] + 0.3 * rng.normal(size=(200, D_OLD)))
    psi = ReverseTransform(objective="mc", learn_rho=True, steps=30, device="cpu", seed=0).fit(
        new[:100], old[:100], labels[:100])
    index = OnlineBackfillIndex(D_OLD, D_NEW, psi=psi)
    index.add_old(np.arange(100, 200), old[100:])
    index.backfill(np.arange(100, 160), psi.new_embedding(new[100:160]))
    q = new[:20]
    by_bridge = index.search(q, 10)
    explicit = index.search(psi.new_embedding(q), 10, query_old=psi.transform(q))
    for a, b in zip(by_bridge, explicit):
        np.testing.assert_array_equal(a, b)
    raw = index.search(q, 10, query_old=psi.transform(q))
    assert not np.allclose(raw[0], by_bridge[0])  # the raw query would rank the new part otherwise


def test_trained_flat_codes_parts_are_chunked_and_equal_one_faiss_index(tmp_path):
    # SQ8 parts, trained on the first batch, in chunks of 37: the old part's results are those of
    # one faiss SQ8 index trained on the same vectors; a save and load keep them.
    import faiss

    rng = np.random.default_rng(5)
    n, d = 500, 16
    x = normalize_rows(rng.standard_normal((n, d)).astype(np.float32))
    ids = rng.choice(10**6, n, replace=False).astype(np.int64)
    index = OnlineBackfillIndex(d, d, "SQ8", "SQ8", chunk_rows=37)
    index.add_old(ids, x)
    assert len(index._parts["old"].chunks) == -(-n // 37)
    reference = faiss.index_factory(d, "SQ8", faiss.METRIC_INNER_PRODUCT)
    reference.train(x)
    reference = faiss.IndexIDMap(reference)
    reference.add_with_ids(x, ids)
    q = x[:5]
    scores, got = index.search(q, 10, query_old=q)
    want_s, want_i = reference.search(q, 10)
    np.testing.assert_array_equal(got, want_i)
    np.testing.assert_allclose(scores, want_s, rtol=1e-6)
    index.backfill(ids[:300], x[:300])
    index.remove(ids[300:350])
    index.save(tmp_path / "sq8.idx")
    loaded = OnlineBackfillIndex.load(tmp_path / "sq8.idx")
    for a, b in zip(loaded.search(q, 10, query_old=q), index.search(q, 10, query_old=q)):
        np.testing.assert_array_equal(a, b)
    assert (loaded.n_old, loaded.n_new) == (150, 300)
