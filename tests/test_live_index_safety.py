"""OnlineBackfillIndex files and settings under attack: crafted files, read-only folders, killed
saves, search parameters and factory strings that faiss accepts but the index cannot serve."""

from __future__ import annotations

import builtins
import json
import os
import re
import subprocess
import sys
import tempfile
import uuid
import warnings

import numpy as np
import pytest

from backfill_lib import live_index
from backfill_lib.live_index import OnlineBackfillIndex
from backfill_lib.transforms import register_transform, transform_name
from backfill_lib.validation import normalize_rows
from live_helpers import PsiStandIn, grid_unit

D_OLD, D_NEW = 6, 8


def small_index(specs=("Flat", "Flat"), n=40, seed=0, psi=True, chunk_rows=16):
    rng = np.random.default_rng(seed)
    ids = rng.choice(10**6, size=n, replace=False).astype(np.int64)
    index = OnlineBackfillIndex(D_OLD, D_NEW, *specs, psi=PsiStandIn(D_NEW, D_OLD, seed) if psi else None,
                                chunk_rows=chunk_rows)
    for name, dim in (("old", D_OLD), ("new", D_NEW)):
        if specs[name == "new"].startswith("IVF"):
            getattr(index, f"train_{name}")(grid_unit(rng, 64, dim))
    index.add_old(ids, grid_unit(rng, n, D_OLD))
    index.backfill(ids[: n // 2], grid_unit(rng, n // 2, D_NEW))
    index.remove(ids[[1, n - 1]])
    if any(s.startswith("IVF") for s in specs):
        index.set_search_params(nprobe=4)
    return index


def read_arrays(path):
    with np.load(path) as data:
        arrays = {key: data[key] for key in data.files}
    return arrays, json.loads(arrays["header"].tobytes().decode())


def write_arrays(path, arrays, header=None, seal=True):
    """Write a crafted file. ``seal``: with the checksums of what it holds (``live_index._seal``).

    Checksums detect damage, not alteration: whoever can rewrite a file can rewrite them too, so
    the checks of every field against the arrays are tested on sealed files.
    """
    if header is None:
        header = json.loads(arrays["header"].tobytes().decode())
    if seal:
        body = {k: v for k, v in arrays.items() if k not in ("header", live_index.HEADER_CHECKSUM)}
        arrays = live_index._seal({k: v for k, v in header.items() if k not in ("checksum", "checksums")}, body)
    else:
        arrays = dict(arrays, header=np.frombuffer(json.dumps(header).encode(), dtype=np.uint8))
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def assert_same_index(a, b):
    np.testing.assert_array_equal(a.old_ids(), b.old_ids())
    np.testing.assert_array_equal(a.new_ids(), b.new_ids())
    rng = np.random.default_rng(1)
    qn, qo = grid_unit(rng, 4, D_NEW), grid_unit(rng, 4, D_OLD)
    for x, y in zip(a.search(qn, a.ntotal, query_old=qo), b.search(qn, b.ntotal, query_old=qo)):
        np.testing.assert_array_equal(x, y)


# ---- 1. loading never imports a module named in the file --------------------------------------

EVIL = '''
import os
import re
open(os.environ["EVIL_MARKER"] + ".imported", "w").close()

class Evil:
    @classmethod
    def load(cls, *args):
        open(os.environ["EVIL_MARKER"] + ".called", "w").close()
    from_bytes = load
'''


@pytest.mark.parametrize("psi_class", ["evil_psi_module:Evil", "joblib:numpy_pickle", "os:system",
                                       "backfill_lib.transforms:register_transform"])
def test_a_file_naming_an_unregistered_class_is_refused_and_nothing_is_imported(tmp_path, monkeypatch, psi_class):
    (tmp_path / "evil_psi_module.py").write_text(EVIL)
    monkeypatch.syspath_prepend(str(tmp_path))
    marker = str(tmp_path / "marker")
    monkeypatch.setenv("EVIL_MARKER", marker)
    path = tmp_path / "live.idx"
    small_index().save(path)
    arrays, header = read_arrays(path)
    header["psi_class"] = psi_class
    arrays["psi"] = np.frombuffer(b"echo pwned", dtype=np.uint8)
    write_arrays(path, arrays, header)
    modules = set(sys.modules)
    with pytest.raises(ValueError, match=rf"{psi_class}.*not a registered transform.*register_transform"):
        OnlineBackfillIndex.load(path)
    assert not os.path.exists(marker + ".imported") and not os.path.exists(marker + ".called")
    assert "evil_psi_module" not in sys.modules
    assert not {"joblib", "joblib.numpy_pickle"} & (set(sys.modules) - modules)


# ---- 2. loading and saving write nothing beside the index ---------------------------------------

@pytest.fixture
def no_writes_in(monkeypatch):
    """Make creating any file in a folder fail (tests run as root: chmod would not stop them)."""
    folders = []

    def inside(path):
        try:
            full = os.path.abspath(os.fsdecode(path))
        except TypeError:
            return False
        return any(os.path.dirname(full) == f for f in folders)

    real_open, real_os_open, real_mkstemp = builtins.open, os.open, tempfile.mkstemp

    def guarded_open(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, bytes, os.PathLike)) and any(c in mode for c in "wax+") and inside(file):
            raise PermissionError(13, "read-only folder", os.fsdecode(file))
        return real_open(file, mode, *args, **kwargs)

    def guarded_os_open(file, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and inside(file):
            raise PermissionError(13, "read-only folder", os.fsdecode(file))
        return real_os_open(file, flags, *args, **kwargs)

    def guarded_mkstemp(suffix=None, prefix=None, dir=None, text=False):
        if dir is not None and os.path.abspath(os.fsdecode(dir)) in folders:
            raise PermissionError(13, "read-only folder", os.fsdecode(dir))
        return real_mkstemp(suffix, prefix, dir, text)

    monkeypatch.setattr(builtins, "open", guarded_open)
    monkeypatch.setattr(os, "open", guarded_os_open)
    monkeypatch.setattr(tempfile, "mkstemp", guarded_mkstemp)
    return lambda folder: folders.append(os.path.abspath(folder))


def test_load_from_a_read_only_folder_writes_nothing_there(tmp_path, no_writes_in):
    # PsiStandIn has only save(path)/load(path): it goes through a private system temp folder.
    index = small_index()
    index.save(tmp_path / "live.idx")
    no_writes_in(tmp_path)
    loaded = OnlineBackfillIndex.load(tmp_path / "live.idx")
    np.testing.assert_array_equal(loaded.psi.W, index.psi.W)
    assert_same_index(loaded, index)
    assert os.listdir(tmp_path) == ["live.idx"]


def test_with_the_real_reverse_transform_load_works_from_a_read_only_folder(tmp_path, no_writes_in):
    from backfill_lib.transforms import ReverseTransform

    rng = np.random.default_rng(2)
    new = normalize_rows(rng.normal(size=(60, D_NEW)))
    old = normalize_rows(new[:, :D_OLD] + 0.1 * rng.normal(size=(60, D_OLD)))
    psi = ReverseTransform(steps=5, device="cpu", seed=0).fit(new, old)
    index = OnlineBackfillIndex(D_OLD, D_NEW, psi=psi)
    index.add_old(np.arange(60), old)
    index.save(tmp_path / "live.idx")
    no_writes_in(tmp_path)
    loaded = OnlineBackfillIndex.load(tmp_path / "live.idx")
    assert isinstance(loaded.psi, ReverseTransform)
    for a, b in zip(loaded.search(new[:3], 5), index.search(new[:3], 5)):
        np.testing.assert_array_equal(a, b)


def test_save_writes_only_its_own_temporary_file_beside_the_index(tmp_path, monkeypatch):
    created = []
    real_open = builtins.open

    def recording_open(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and "w" in mode:
            created.append(os.path.abspath(file))
        return real_open(file, mode, *args, **kwargs)

    real_mkstemp = tempfile.mkstemp

    def recording_mkstemp(suffix=None, prefix=None, dir=None, text=False):
        fd, name = real_mkstemp(suffix, prefix, dir, text)
        created.append(os.path.abspath(name))
        return fd, name

    monkeypatch.setattr(builtins, "open", recording_open)
    monkeypatch.setattr(tempfile, "mkstemp", recording_mkstemp)
    small_index().save(tmp_path / "live.idx")
    beside = [c for c in created if os.path.dirname(c) == str(tmp_path)]
    assert len(beside) == 1 and os.path.basename(beside[0]).startswith(".live.idx.")  # the atomic write's
    assert os.listdir(tmp_path) == ["live.idx"]


# ---- 3. what cannot be loaded back is said at save time -----------------------------------------

class Unregistered(PsiStandIn):
    pass


def test_saving_an_unregistered_psi_class_is_refused(tmp_path):
    index = small_index()
    index.psi = Unregistered(D_NEW, D_OLD)
    with pytest.raises(TypeError, match=r"Unregistered.*not registered.*register_transform\(Unregistered\)"):
        index.save(tmp_path / "live.idx")
    assert os.listdir(tmp_path) == []


def test_saving_a_psi_class_from_main_warns_that_the_file_needs_it_registered(tmp_path):
    main_class = type("ScriptPsi", (PsiStandIn,), {"__module__": "__main__"})
    name = register_transform(main_class)
    assert name == "__main__:ScriptPsi"
    index = small_index()
    index.psi = main_class(D_NEW, D_OLD)
    with pytest.warns(UserWarning, match=r"ScriptPsi is defined in __main__.*register_transform\(ScriptPsi, "
                                         r"name='__main__:ScriptPsi'\)"):
        index.save(tmp_path / "live.idx")
    assert isinstance(OnlineBackfillIndex.load(tmp_path / "live.idx").psi, main_class)  # registered here


def test_a_psi_class_with_to_bytes_is_stored_in_memory(tmp_path, no_writes_in):
    class InMemory(PsiStandIn):
        def to_bytes(self):
            return self.W.tobytes()

        @classmethod
        def from_bytes(cls, data):
            psi = cls.__new__(cls)
            psi.W = np.frombuffer(data, dtype=np.float32).reshape(D_NEW, D_OLD).copy()
            return psi

    register_transform(InMemory, name="tests:InMemory")
    index = small_index()
    index.psi = InMemory(D_NEW, D_OLD, seed=4)
    index.save(tmp_path / "live.idx")
    _, header = read_arrays(tmp_path / "live.idx")
    assert header["psi_class"] == "tests:InMemory" == transform_name(InMemory)
    no_writes_in(tmp_path)
    no_writes_in(tempfile.gettempdir())  # not even the system temp folder
    loaded = OnlineBackfillIndex.load(tmp_path / "live.idx")
    np.testing.assert_array_equal(loaded.psi.W, index.psi.W)


def test_psi_is_checked_when_set_after_construction():
    index = small_index(psi=False)
    with pytest.raises(TypeError, match="psi must have a transform"):
        index.psi = object()
    assert index.psi is None


# ---- 4. temporary files of killed saves ---------------------------------------------------------

def _dead_pid():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _plant(folder, base, tag, age=0.0):
    path = os.path.join(folder, f".{base}.{tag}{uuid.uuid4().hex}.tmp")
    with open(path, "wb") as f:
        f.write(b"half an index")
    if age:
        os.utime(path, (os.stat(path).st_atime - age, os.stat(path).st_mtime - age))
    return os.path.basename(path)


@pytest.mark.parametrize("action", ["save", "load"])
def test_stale_temporary_files_are_removed_and_live_ones_kept(tmp_path, action):
    path = tmp_path / "live.idx"
    index = small_index()
    index.save(path)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        host = live_index._HOST
        dead = _plant(tmp_path, "live.idx", f"{host}-{_dead_pid()}.")
        legacy_old = _plant(tmp_path, "live.idx", "", age=2 * live_index.LEGACY_TEMP_AGE)
        keep = {
            _plant(tmp_path, "live.idx", f"{host}-{sleeper.pid}."),  # a save running in another process
            _plant(tmp_path, "live.idx", f"{host}-{os.getpid()}."),  # one running in this process
            _plant(tmp_path, "live.idx", f"{'0' if host[0] != '0' else '1'}{host[1:]}-{_dead_pid()}."),  # other host
            _plant(tmp_path, "live.idx", ""),  # an old-style name, recently written: maybe a running save
            _plant(tmp_path, "other.idx", f"{host}-{_dead_pid()}."),  # another path's
        }
        if action == "save":
            index.save(path)
        else:
            OnlineBackfillIndex.load(path)
        left = set(os.listdir(tmp_path))
        assert dead not in left and legacy_old not in left
        assert keep <= left
        assert left == keep | {"live.idx"}
    finally:
        sleeper.kill()
        sleeper.wait()


# ---- 5. every header field and array is checked against the others -----------------------------

def test_ids_that_are_not_the_stored_ids_are_refused(tmp_path):
    index = small_index()
    path = tmp_path / "live.idx"
    index.save(path)
    arrays, header = read_arrays(path)
    arrays["old_ids"] = arrays["old_ids"] + 10**7  # same count, other ids: searches would return ids not held
    write_arrays(tmp_path / "crafted.idx", arrays)
    with pytest.raises(ValueError, match=r"not a valid OnlineBackfillIndex file.*old part.*ids"):
        OnlineBackfillIndex.load(tmp_path / "crafted.idx")


@pytest.mark.parametrize("field, value", [("dim_old", 7), ("dim_new", 4), ("dim_old", True), ("chunk_rows", 0),
                                          ("old_params", {"nprobe": 0}), ("new_index", "HNSW8"),
                                          ("old_chunks", 99), ("version", True), ("psi_class", 3)])
def test_header_fields_that_do_not_fit_the_arrays_are_refused(tmp_path, field, value):
    index = small_index()
    index.save(tmp_path / "live.idx")
    arrays, header = read_arrays(tmp_path / "live.idx")
    header[field] = value
    write_arrays(tmp_path / "crafted.idx", arrays, header)
    with pytest.raises(ValueError, match=r"not a valid OnlineBackfillIndex file|format version"):
        OnlineBackfillIndex.load(tmp_path / "crafted.idx")


def _mutations(rng, header, arrays):
    """Yield ``(description, header, arrays)``: one field or array changed each."""
    values = [None, True, False, 0, -1, 1, 2, 3, 7, 2**40, 2.5, "", "Flat", "HNSW8", "IVF4,Flat", [], {}, [1],
              {"nprobe": 2}, {"nprobe": 99}, {"efSearch": 0}, {"efSearch": 3}, "chunks", "single", "ivf_lists"]
    for key in list(header):
        for value in values:
            if value != header[key]:
                yield f"header[{key!r}] = {value!r}", dict(header, **{key: value}), arrays
        yield f"header without {key!r}", {k: v for k, v in header.items() if k != key}, arrays
    for key in list(arrays):
        if key == "header":
            continue
        arr = arrays[key]
        variants = {"dropped": None, "empty": arr[:0], "as float": arr.astype(np.float64),
                    "as int32": arr.astype(np.int32), "2-D": arr.reshape(1, -1) if arr.ndim == 1 else arr.ravel(),
                    "one row short": arr[:-1], "reversed": arr[::-1].copy()}
        if arr.dtype == np.uint8 and arr.ndim == 1:  # a serialized faiss index or psi: cut, not rewritten
            variants.pop("reversed")
            variants["truncated"] = arr[: arr.size // 2]
        elif arr.size and np.issubdtype(arr.dtype, np.integer):
            variants.update({"shifted": arr + 1, "negated": -arr.astype(np.int64) - 1,
                             "one changed": np.r_[arr.ravel()[:-1], int(arr.ravel()[-1]) ^ 1].astype(arr.dtype).reshape(arr.shape)})
        for name, value in variants.items():
            changed = {k: v for k, v in arrays.items() if k != key}
            if value is not None:
                changed[key] = value
            yield f"{key} {name}", header, changed
    for a, b in (("old_faiss", "new_faiss"), ("old_ids", "new_ids"), ("old_tombs", "old_ids")):
        if a in arrays and b in arrays:
            yield f"{a} <-> {b}", header, dict(arrays, **{a: arrays[b], b: arrays[a]})


@pytest.mark.parametrize("specs", [("Flat", "Flat"), ("IVF4,Flat", "IVF4,Flat"), ("HNSW8", "IVF4,SQ8")])
def test_fuzzed_files_are_refused_or_load_as_the_original(tmp_path, specs):
    index = small_index(specs)
    if specs[0].startswith("HNSW"):
        index.set_search_params(efSearch=40)
    path = tmp_path / "live.idx"
    index.save(path)
    arrays, header = read_arrays(path)
    rng = np.random.default_rng(0)
    outcomes = {"refused": 0, "equal": 0}
    for what, h, a in _mutations(rng, header, arrays):
        write_arrays(tmp_path / "fuzzed.idx", a, h)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                loaded = OnlineBackfillIndex.load(tmp_path / "fuzzed.idx")
        except ValueError as exc:
            assert "OnlineBackfillIndex file" in str(exc) or "format version" in str(exc) or "psi" in str(exc), what
            outcomes["refused"] += 1
            continue
        try:
            key = what.split()[0]
            if (key.endswith("_codes") or "_params" in what
                    or (what.endswith("reversed") and ("_chunk" in key or "_list" in key))):
                # The stored vectors, which id each belongs to (rows swapped) or the search
                # parameters make another self-consistent index of the same items (a format
                # without a checksum cannot tell): it must hold exactly those items, return only them.
                np.testing.assert_array_equal(loaded.old_ids(), index.old_ids())
                np.testing.assert_array_equal(loaded.new_ids(), index.new_ids())
                q = grid_unit(rng, 4, D_NEW)
                got = loaded.search(q, loaded.ntotal, query_old=grid_unit(rng, 4, D_OLD))[1]
                assert np.isin(got[got >= 0], np.r_[index.old_ids(), index.new_ids()]).all()
            else:
                assert_same_index(loaded, index)
        except AssertionError as exc:
            raise AssertionError(f"{what}: loaded into another index") from exc
        outcomes["equal"] += 1
    assert outcomes["refused"] > 100 and outcomes["equal"] > 0, outcomes


def test_every_unsealed_change_is_refused_as_damage_before_it_is_read(tmp_path):
    # The same changes, written without new checksums (what damage does): each is refused by the
    # checksums alone, before any field or array is interpreted.
    index = small_index(("Flat", "IVF4,Flat"))
    path = tmp_path / "live.idx"
    index.save(path)
    arrays, header = read_arrays(path)
    count = 0
    for what, h, a in _mutations(np.random.default_rng(0), header, arrays):
        if h == header and a.keys() == arrays.keys() and all(
                a[k].dtype == arrays[k].dtype and a[k].shape == arrays[k].shape and np.array_equal(a[k], arrays[k])
                for k in a):
            continue  # no change (an empty array emptied, ...)
        write_arrays(tmp_path / "changed.idx", a, h, seal=False)
        with pytest.raises(ValueError, match=r"is damaged: .*(does not match the checksum stored with it|missing|no "
                                             r"checksum).*restore it from a backup or rebuild the index"):
            OnlineBackfillIndex.load(tmp_path / "changed.idx")
        count += 1
    assert count > 200


# ---- 6. search parameters and factory strings ---------------------------------------------------

@pytest.mark.parametrize("specs, part, params, err, match", [
    (("HNSW8", "HNSW8"), "both", {"efSearch": 0}, ValueError, "efSearch=0 is out of range.*at least 1"),
    (("IVF4,Flat", "IVF4,SQ8"), "old", {"nprobe": 0}, ValueError, r"nprobe=0 is out of range.*from 1 to 4"),
    (("IVF4,Flat", "IVF4,SQ8"), "new", {"nprobe": 5}, ValueError, r"nprobe=5 is out of range.*from 1 to 4"),
    (("IVF4,Flat", "IVF4,SQ8"), "both", {"nprobe": -1}, ValueError, "nprobe=-1 is out of range"),
    (("IVF4,Flat", "IVF4,SQ8"), "both", {"nprobe": 2.5}, TypeError, "nprobe must be an integer"),
    (("IVF4,Flat", "IVF4,SQ8"), "both", {"nprobe": True}, TypeError, "nprobe must be an integer"),
    (("IVF4,Flat", "IVF4,SQ8"), "both", {"nprobe": "3"}, TypeError, "nprobe must be an integer"),
    (("IVF4,Flat", "HNSW8"), "new", {"nprobe": 2}, ValueError, "cannot set nprobe=2 on the new part"),
    (("IVF4,Flat", "HNSW8"), "both", {"nprob": 2}, ValueError, "no search parameter 'nprob'"),
    (("IVF4,Flat", "HNSW8"), "both", {"nprobe": 2, "efSearch": 0}, ValueError, "efSearch=0"),
    (("Flat", "Flat"), None, {"nprobe": 2}, ValueError, "part must be"),
])
def test_bad_search_parameters_are_refused_and_change_nothing(specs, part, params, err, match):
    index = small_index(specs, psi=False)
    before = {name: dict(p.params) for name, p in index._parts.items()}
    with pytest.raises(err, match=match):
        index.set_search_params(part=part, **params)
    assert {name: p.params for name, p in index._parts.items()} == before
    qo, qn = grid_unit(np.random.default_rng(0), 2, D_OLD), grid_unit(np.random.default_rng(0), 2, D_NEW)
    assert (index.search(qn, 5, query_old=qo)[1] >= 0).all()  # and searches still work


def test_both_sets_each_parameter_on_the_parts_that_have_it():
    index = small_index(("IVF4,Flat", "HNSW8"), psi=False)
    index.set_search_params(nprobe=2, efSearch=16)
    assert index._parts["old"].params == {"nprobe": 2} and index._parts["new"].params == {"efSearch": 16}


def test_a_small_efsearch_still_returns_k_results():
    rng = np.random.default_rng(3)
    x = normalize_rows(rng.normal(size=(300, 16)))
    index = OnlineBackfillIndex(16, 16, "HNSW8", "HNSW8")
    index.add_old(np.arange(300), x)
    index.set_search_params(efSearch=1)
    scores, ids = index.search(x[:3], 40, query_old=x[:3])
    assert (ids >= 0).all() and len(set(ids[0])) == 40


@pytest.mark.parametrize("spec", ["IVF2,Flat,Refine(Flat)", "Flat,RFlat", "NSG8", "PCA8,HNSW8"])
def test_factory_strings_the_index_cannot_serve_are_refused_at_construction(spec):
    with pytest.raises(ValueError, match=re.escape(f"new_index='{spec}'") + ".*cannot serve"):
        OnlineBackfillIndex(16, 16, new_index=spec)


@pytest.mark.parametrize("spec", ["SQ8", "PQ4x4fs", "IVF4,PQ4x4fs", "IVF4,SQ8", "HNSW8_SQ8", "PCA8,IVF4,Flat",
                                  "PCA8,Flat"])
def test_accepted_factory_strings_add_search_remove_save_and_load(tmp_path, spec):
    rng = np.random.default_rng(4)
    x = normalize_rows(rng.normal(size=(400, 16)))
    index = OnlineBackfillIndex(16, 16, spec, spec)
    index.add_old(np.arange(400), x)
    index.remove(np.arange(0, 400, 3))
    index.backfill(np.arange(1, 300, 3), x[1:300:3])
    index.save(tmp_path / "x.idx")
    loaded = OnlineBackfillIndex.load(tmp_path / "x.idx")
    for a, b in zip(loaded.search(x[:4], 20, query_old=x[:4]), index.search(x[:4], 20, query_old=x[:4])):
        np.testing.assert_array_equal(a, b)
    assert np.isin(b[b >= 0], np.r_[index.old_ids(), index.new_ids()]).all()


# ---- 7. the rest of the public surface, probed -------------------------------------------------

def test_an_hnsw_part_with_many_tombstones_still_returns_every_live_item():
    # A filtered HNSW search (tombstones skipped) ended with -1s while the part held k live items.
    rng = np.random.default_rng(0)
    x = normalize_rows(rng.normal(size=(50, 4)))
    index = OnlineBackfillIndex(4, 4, "HNSW8", "HNSW8")
    index.add_old(np.arange(50), x)
    index.backfill(np.arange(10), x[:10])
    index.remove(np.arange(10, 40))
    scores, ids = index.search(x[:5], index.ntotal, query_old=x[:5])
    for row in ids:
        np.testing.assert_array_equal(np.sort(row), np.r_[np.arange(10), np.arange(40, 50)])
    assert np.isfinite(scores).all()


@pytest.mark.parametrize("call, err, match", [
    (lambda ix, tmp: ix.save(tmp), IsADirectoryError, "is a directory; give a file path"),
    (lambda ix, tmp: ix.save(tmp / "missing" / "x.idx"), FileNotFoundError, "its folder .* does not exist"),
    (lambda ix, tmp: ix.save(True), TypeError, "path must be a file path"),
    (lambda ix, tmp: ix.save(3), TypeError, "path must be a file path"),
    (lambda ix, tmp: ix.save(""), ValueError, "path must be a file path"),
    (lambda ix, tmp: OnlineBackfillIndex.load(True), TypeError, "path must be a file path"),
    (lambda ix, tmp: OnlineBackfillIndex.load(tmp), IsADirectoryError, "is a directory, not an index file"),
    (lambda ix, tmp: (np.save(tmp / "a.npy", np.arange(3)), OnlineBackfillIndex.load(tmp / "a.npy")),
     ValueError, r"not an OnlineBackfillIndex file.*one numpy array .*\.npy"),
])
def test_bad_paths_get_errors_naming_the_path(tmp_path, call, err, match):
    index = small_index(psi=False)
    with pytest.raises(err, match=match):
        call(index, tmp_path)
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_a_bytes_path_saves_and_loads(tmp_path):
    index = small_index()
    path = os.fsencode(str(tmp_path / "live.idx"))
    index.save(path)
    assert_same_index(OnlineBackfillIndex.load(path), index)
