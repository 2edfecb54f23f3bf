"""Adopting an existing faiss index file of old vectors (OnlineBackfillIndex.from_faiss) and reading
back what the live index stores (old_vectors, new_vectors, stored_vectors).

Every file here is written by faiss.write_index, as the service that serves it would have written it."""

from __future__ import annotations

import hashlib
import os

import faiss
import numpy as np
import pytest

from backfill_lib.live_index import OnlineBackfillIndex

N, D_OLD, D_NEW, NLIST = 600, 16, 12, 8


def _unit(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(20)
    ids = rng.choice(10 * N, size=N, replace=False).astype(np.int64)  # not 0..n-1, not sorted
    return {"ids": ids, "old": _unit(rng, N, D_OLD), "new": _unit(rng, N, D_NEW),
            "q_old": _unit(rng, 25, D_OLD), "q_new": _unit(rng, 25, D_NEW)}


def _fingerprint(path) -> tuple:
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    st = os.stat(path)
    return digest, st.st_size, st.st_mtime_ns


def _write(tmp_path, index, name="served.faiss") -> str:
    path = str(tmp_path / name)
    faiss.write_index(index, path)
    return path


def _flat_file(tmp_path, data, kind):
    if kind == "bare":
        index = faiss.IndexFlatIP(D_OLD)
        index.add(data["old"])
        return _write(tmp_path, index), np.arange(N)
    index = (faiss.IndexIDMap if kind == "idmap" else faiss.IndexIDMap2)(faiss.IndexFlatIP(D_OLD))
    index.add_with_ids(data["old"], data["ids"])
    return _write(tmp_path, index), data["ids"]


def _ivf(data, metric=faiss.METRIC_INNER_PRODUCT, quantizer=faiss.IndexFlatIP, nprobe=3):
    index = faiss.IndexIVFFlat(quantizer(D_OLD), D_OLD, NLIST, metric)
    index.train(data["old"])
    index.add_with_ids(data["old"], data["ids"])
    index.nprobe = nprobe
    return index


def _search(index, data, k):
    """The merged search with old queries (rank merge) while items are stored old."""
    return index.search(data["q_new"], k, query_old=data["q_old"] if index.n_old else None)


def _fresh(data, ids, **kw):
    index = OnlineBackfillIndex(D_OLD, D_NEW, **kw)
    index.add_old(ids, data["old"])
    return index


@pytest.mark.parametrize("kind", ["idmap", "idmap2", "bare"])
def test_an_adopted_flat_file_searches_as_a_fresh_index_of_the_same_vectors(tmp_path, data, kind):
    path, ids = _flat_file(tmp_path, data, kind)
    adopted = OnlineBackfillIndex.from_faiss(path, D_NEW, chunk_rows=128)
    fresh = _fresh(data, ids, chunk_rows=128)
    assert adopted.n_old == N and adopted.n_new == 0 and np.array_equal(adopted.old_ids(), np.sort(ids))
    # Before, during and after a backfill: the same merged results, scores bit for bit.
    rng = np.random.default_rng(1)
    row_of = {i: r for r, i in enumerate(ids.tolist())}
    for step in (None, 200, 400, N):
        if step is not None:
            todo = adopted.old_ids()
            batch = rng.choice(todo, size=min(len(todo), 200), replace=False)
            rows = np.array([row_of[i] for i in batch.tolist()])
            adopted.backfill(batch, data["new"][rows])
            fresh.backfill(batch, data["new"][rows])
        for k in (1, 10, 50):
            got, want = _search(adopted, data, k), _search(fresh, data, k)
            assert np.array_equal(got[1], want[1]) and np.array_equal(got[0], want[0])
    # The file's own faiss index returns the same old results before any backfill.
    served = OnlineBackfillIndex.from_faiss(path, D_NEW)
    scores, found = faiss.read_index(path).search(data["q_old"], 10)
    found = ids[found] if kind == "bare" else found
    got_scores, got_ids = served.search(data["q_new"], 10, query_old=data["q_old"])
    assert np.allclose(got_scores, scores, atol=1e-6) and _same_up_to_ties(got_scores, got_ids, found)


def _same_up_to_ties(scores, ids, other_ids) -> bool:
    # faiss breaks score ties by its storage order, the live index by the smaller id.
    return all(set(a[~np.isclose(s, s[-1])]) == set(b[~np.isclose(s, s[-1])])
               for s, a, b in zip(scores, ids, other_ids))


def test_a_bare_flat_file_takes_the_ids_given_in_row_order(tmp_path, data):
    path, _ = _flat_file(tmp_path, data, "bare")
    adopted = OnlineBackfillIndex.from_faiss(path, D_NEW, ids=data["ids"])
    assert np.array_equal(adopted.old_ids(), np.sort(data["ids"]))
    assert np.array_equal(adopted.old_vectors(data["ids"]), data["old"])


@pytest.mark.parametrize("kind", ["idmap", "idmap2", "bare", "ivf"])
def test_the_file_is_never_written_by_adoption_a_backfill_or_a_save(tmp_path, data, kind):
    path, ids = (_write(tmp_path, _ivf(data)), data["ids"]) if kind == "ivf" else _flat_file(tmp_path, data, kind)
    before = _fingerprint(path)
    listing = sorted(os.listdir(tmp_path))
    adopted = OnlineBackfillIndex.from_faiss(path, D_NEW, chunk_rows=128)
    adopted.backfill(ids[:300], data["new"][:300])
    adopted.remove(ids[300:310])
    adopted.save(tmp_path / "live.npz")
    adopted.compact()
    with pytest.raises(ValueError, match="is the faiss index file this index adopted, the rollback point"):
        adopted.save(path)
    assert _fingerprint(path) == before
    assert sorted(os.listdir(tmp_path)) == sorted(listing + ["live.npz"])  # nothing else beside it
    # The saved index loads as it was (its own file, not the adopted one).
    loaded = OnlineBackfillIndex.load(tmp_path / "live.npz")
    assert np.array_equal(loaded.old_ids(), adopted.old_ids()) and np.array_equal(loaded.new_ids(), adopted.new_ids())
    got, want = _search(loaded, data, 20), _search(adopted, data, 20)
    assert np.array_equal(got[1], want[1]) and np.array_equal(got[0], want[0])


@pytest.mark.parametrize("quantizer", [faiss.IndexFlatIP, faiss.IndexFlatL2])
def test_an_adopted_ivf_flat_file_searches_as_the_file_did_and_exactly_at_full_nprobe(tmp_path, data, quantizer):
    served = _ivf(data, quantizer=quantizer, nprobe=3)
    path = _write(tmp_path, served)
    adopted = OnlineBackfillIndex.from_faiss(path, D_NEW)
    assert adopted._parts["old"].spec == f"IVF{NLIST},Flat" and adopted.n_old == N
    # The file's quantizer, lists and nprobe: the results of the faiss index that served.
    scores, found = served.search(data["q_old"], 10)
    got_scores, got_ids = adopted.search(data["q_new"], 10, query_old=data["q_old"])
    assert np.allclose(got_scores, scores, atol=1e-6)
    assert _same_up_to_ties(got_scores, got_ids, found)
    # Every list probed: exact, the results of a fresh flat index of the same vectors.
    adopted.set_search_params("old", nprobe=NLIST)
    fresh = _fresh(data, data["ids"])
    got, want = _search(adopted, data, 30), _search(fresh, data, 30)
    assert np.array_equal(got[1], want[1]) and np.allclose(got[0], want[0], atol=1e-6)
    # Backfilled half-way, still the same merge.
    half = data["ids"][::2]
    adopted.backfill(half, data["new"][::2])
    fresh.backfill(half, data["new"][::2])
    got, want = _search(adopted, data, 30), _search(fresh, data, 30)
    assert np.array_equal(got[1], want[1]) and np.allclose(got[0], want[0], atol=1e-6)
    # Saved and loaded with the file's quantizer: the same results again.
    adopted.save(tmp_path / "live.npz")
    loaded = OnlineBackfillIndex.load(tmp_path / "live.npz")
    again = _search(loaded, data, 30)
    assert np.array_equal(again[1], got[1]) and np.array_equal(again[0], got[0])


@pytest.mark.parametrize("kind", ["idmap", "bare", "ivf"])
def test_stored_vectors_read_back_exactly_what_was_stored(tmp_path, data, kind):
    path, ids = (_write(tmp_path, _ivf(data)), data["ids"]) if kind == "ivf" else _flat_file(tmp_path, data, kind)
    index = OnlineBackfillIndex.from_faiss(path, D_NEW, chunk_rows=100)
    moved = ids[1::3]
    index.backfill(moved, data["new"][1::3])
    rng = np.random.default_rng(3)
    ask = rng.choice(ids, size=120)  # repeats included
    row = {int(i): r for r, i in enumerate(ids)}
    parts, vectors = index.stored_vectors(ask)
    for i, p, v in zip(ask.tolist(), parts.tolist(), vectors):
        want = data["new"][row[i]] if p == "new" else data["old"][row[i]]
        assert p == ("new" if i in set(moved.tolist()) else "old")
        assert v.dtype == np.float32 and np.array_equal(v, want)  # bit for bit
    old = ids[~np.isin(ids, moved)]
    assert np.array_equal(index.old_vectors(old), data["old"][~np.isin(ids, moved)])
    assert np.array_equal(index.new_vectors(moved[::-1]), data["new"][1::3][::-1])
    with pytest.raises(ValueError, match=r"stored new, not old: read them with new_vectors"):
        index.old_vectors(moved[:2])
    with pytest.raises(ValueError, match=r"stored old, not new"):
        index.new_vectors(old[:1])
    with pytest.raises(ValueError, match=r"not in the index"):
        index.stored_vectors([int(ids.max()) + 1])
    with pytest.raises(TypeError):
        index.old_vectors([0.5])
    with pytest.raises(ValueError, match="one id or a 1-D array"):
        index.stored_vectors([[int(ids[0])]])
    empty_parts, empty_vectors = index.stored_vectors([])
    assert len(empty_parts) == 0 and empty_vectors == [] and index.old_vectors([]).shape == (0, D_OLD)
    assert index.new_vectors(int(moved[0])).shape == (1, D_NEW)  # one id


def test_read_back_of_a_quantised_part_is_its_decoded_codes(data):
    index = OnlineBackfillIndex(D_OLD, D_NEW, old_index="SQ8", new_index="IVF4,PQ4x4")
    index.train_new(data["new"])
    index.add_old(data["ids"], data["old"])
    index.backfill(data["ids"][:200], data["new"][:200])
    old = index.old_vectors(data["ids"][200:])
    assert np.max(np.abs(old - data["old"][200:])) < 0.05  # approximate, close
    new = index.new_vectors(data["ids"][:200])
    assert new.shape == (200, D_NEW) and np.all(np.isfinite(new))
    assert np.mean(np.sum(new * data["new"][:200], axis=1)) > 0.5  # decoded near the stored direction


def test_the_adopted_flat_part_gives_memory_back_as_the_backfill_moves_items(tmp_path, data):
    path, ids = _flat_file(tmp_path, data, "idmap")
    index = OnlineBackfillIndex.from_faiss(path, D_NEW, chunk_rows=64)
    old = index._parts["old"]
    assert old.capacity - old.ntotal < 64 and all(c.cap <= 64 for c in old.chunks)
    index.backfill(ids[:450], data["new"][:450])
    assert old.ntotal == N - 450 and old.capacity - old.ntotal < 64


def test_psi_and_score_maps_are_attached(tmp_path, data):
    path, ids = _flat_file(tmp_path, data, "idmap")

    class Psi:
        def transform(self, x):
            out = np.zeros((len(x), D_OLD), dtype=np.float32)
            out[:, :D_NEW] = x
            return out

    index = OnlineBackfillIndex.from_faiss(path, D_NEW, psi=Psi())
    scores, found = index.search(data["q_new"], 5)
    assert found.shape == (25, 5) and np.all(found >= 0)
    with pytest.raises(TypeError, match="psi must have a transform"):
        OnlineBackfillIndex.from_faiss(path, D_NEW, psi=object())
    with pytest.raises(TypeError, match="score_maps"):
        OnlineBackfillIndex.from_faiss(path, D_NEW, score_maps={"old": 1})


@pytest.mark.parametrize("build", [
    lambda d: faiss.IndexFlatL2(D_OLD),
    lambda d: faiss.IndexIDMap(faiss.IndexFlatL2(D_OLD)),
    lambda d: _ivf(d, metric=faiss.METRIC_L2, quantizer=faiss.IndexFlatL2),
])
def test_an_l2_file_is_refused_saying_what_to_do(tmp_path, data, build):
    index = build(data)
    if not index.ntotal:
        if isinstance(index, faiss.IndexIDMap):
            index.add_with_ids(data["old"], data["ids"])
        else:
            index.add(data["old"])
    path = _write(tmp_path, index)
    before = _fingerprint(path)
    with pytest.raises(ValueError, match=r"METRIC_L2: this index scores by inner product .* adopt that file"):
        OnlineBackfillIndex.from_faiss(path, D_NEW)
    assert _fingerprint(path) == before


def test_rows_that_are_not_unit_norm_are_refused(tmp_path, data):
    flat = faiss.IndexIDMap(faiss.IndexFlatIP(D_OLD))
    flat.add_with_ids(2 * data["old"], data["ids"])
    with pytest.raises(ValueError, match=r"600 stored vectors are not finite unit-norm rows; .*normalize_L2"):
        OnlineBackfillIndex.from_faiss(_write(tmp_path, flat), D_NEW)
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(D_OLD), D_OLD, NLIST, faiss.METRIC_INNER_PRODUCT)
    ivf.train(data["old"])
    x = data["old"].copy()
    x[7] *= 1.5
    ivf.add_with_ids(x, data["ids"])
    with pytest.raises(ValueError, match=r"1 stored vectors are not finite unit-norm rows"):
        OnlineBackfillIndex.from_faiss(_write(tmp_path, ivf, "ivf.faiss"), D_NEW)


@pytest.mark.parametrize("kind", ["idmap", "ivf"])
def test_repeated_or_negative_ids_in_the_file_are_refused(tmp_path, data, kind):
    for bad, message in ((np.r_[data["ids"][:-1], data["ids"][0]], r"stores ids \[\d+\] more than once"),
                         (np.r_[data["ids"][:-1], -5], r"stores negative ids \[-5\]")):
        if kind == "ivf":
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(D_OLD), D_OLD, NLIST, faiss.METRIC_INNER_PRODUCT)
            index.train(data["old"])
        else:
            index = faiss.IndexIDMap(faiss.IndexFlatIP(D_OLD))
        index.add_with_ids(data["old"], bad)
        with pytest.raises(ValueError, match=message):
            OnlineBackfillIndex.from_faiss(_write(tmp_path, index), D_NEW)


@pytest.mark.parametrize("factory", ["HNSW8", "IVF8,PQ4", "PCA8,Flat", "SQ8", "IVF8,SQ8"])
def test_a_type_it_cannot_adopt_is_refused_naming_what_it_reads(tmp_path, data, factory):
    index = faiss.index_factory(D_OLD, factory, faiss.METRIC_INNER_PRODUCT)
    index.train(data["old"])
    index.add(data["old"])
    with pytest.raises(ValueError, match=r"which from_faiss cannot adopt: it reads IndexFlatIP .*add_old"):
        OnlineBackfillIndex.from_faiss(_write(tmp_path, index), D_NEW)


def test_bad_arguments_are_refused_before_the_file_is_read(tmp_path, data):
    path, _ = _flat_file(tmp_path, data, "bare")
    with pytest.raises(ValueError, match="dim_new must be a positive integer"):
        OnlineBackfillIndex.from_faiss(path, 0)
    with pytest.raises(ValueError, match="chunk_rows must be a positive integer"):
        OnlineBackfillIndex.from_faiss(path, D_NEW, chunk_rows=-1)
    with pytest.raises(TypeError, match="new_index must be a faiss factory string"):
        OnlineBackfillIndex.from_faiss(path, D_NEW, new_index=None)
    with pytest.raises(ValueError, match=r"new_index='Nope'"):
        OnlineBackfillIndex.from_faiss(path, D_NEW, new_index="Nope")
    with pytest.raises(ValueError, match=r"ids has shape \(3,\), but .* holds 600 vectors"):
        OnlineBackfillIndex.from_faiss(path, D_NEW, ids=[1, 2, 3])
    with pytest.raises(ValueError, match=r"ids .* repeats|repeat"):
        OnlineBackfillIndex.from_faiss(path, D_NEW, ids=np.zeros(N, dtype=np.int64))
    with pytest.raises(ValueError, match="negative"):
        OnlineBackfillIndex.from_faiss(path, D_NEW, ids=-np.arange(1, N + 1))
    with pytest.raises(TypeError):
        OnlineBackfillIndex.from_faiss(path, D_NEW, ids=np.linspace(0, 1, N))
    stored_ids, _ = _flat_file(tmp_path, data, "idmap")
    with pytest.raises(ValueError, match=r"ids: .* stores its own ids; give ids only for a bare IndexFlatIP"):
        OnlineBackfillIndex.from_faiss(stored_ids, D_NEW, ids=data["ids"])
    with pytest.raises(FileNotFoundError, match="no faiss index file"):
        OnlineBackfillIndex.from_faiss(tmp_path / "missing.faiss", D_NEW)
    with pytest.raises(IsADirectoryError, match="is a directory"):
        OnlineBackfillIndex.from_faiss(tmp_path, D_NEW)
    with pytest.raises(TypeError):
        OnlineBackfillIndex.from_faiss(3.5, D_NEW)
    junk = tmp_path / "junk.faiss"
    junk.write_bytes(b"not a faiss index at all")
    with pytest.raises(ValueError, match=r"is not a faiss index file faiss can read"):
        OnlineBackfillIndex.from_faiss(junk, D_NEW)
    saved = tmp_path / "live.npz"
    _fresh(data, data["ids"]).save(saved)
    with pytest.raises(ValueError, match=r"is not a faiss index file faiss can read .*faiss.write_index"):
        OnlineBackfillIndex.from_faiss(saved, D_NEW)  # an OnlineBackfillIndex file: OnlineBackfillIndex.load


def test_an_empty_file_is_adopted_as_an_empty_index(tmp_path):
    path = _write(tmp_path, faiss.IndexIDMap(faiss.IndexFlatIP(D_OLD)))
    index = OnlineBackfillIndex.from_faiss(path, D_NEW)
    assert index.ntotal == 0 and index.dim_old == D_OLD and index.progress == 0.0
    index.add_old([4], np.eye(1, D_OLD, dtype=np.float32))
    assert index.old_ids().tolist() == [4]
