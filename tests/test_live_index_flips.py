"""An index file with one damaged byte is refused or loads the same index, never a different one (issue 16).

Uses only ``save``, ``load`` and numpy's own npz reader and writer, so the same tests run against a
library from before checksums (file format 3): there, the first test passes too (the zip
container's CRC-32, which Python's ``zipfile`` checks when numpy reads an array to its end, refuses
every flipped byte of the data), while the second fails: a changed byte under an intact container
(an array rewritten, its zip CRC-32 with it) loaded as another index (a vector changed, the ids of
a chunk permuted, another psi).

Every load runs in this process: a format-4 file is checked against its checksums before any
byte of it reaches faiss or psi's reader, so a damaged one cannot crash the process.
"""

import io
import time
import warnings

import numpy as np
import pytest

from backfill_lib.live_index import OnlineBackfillIndex
from backfill_lib.transforms import ReverseTransform
from backfill_lib.validation import normalize_rows

D_OLD, D_NEW, N = 4, 6, 24


def make_index(new_spec):
    """Flat old part in chunks of 8, ``new_spec`` new part, a tiny fitted psi, three removals
    (tombstones in an HNSW part)."""
    rng = np.random.default_rng(0)
    new = normalize_rows(rng.normal(size=(N, D_NEW))).astype(np.float32)
    old = normalize_rows(rng.normal(size=(N, D_OLD))).astype(np.float32)
    psi = ReverseTransform(steps=2, batch_size=8, device="cpu", seed=0).fit(new[:16], old[:16])
    index = OnlineBackfillIndex(D_OLD, D_NEW, "Flat", new_spec, psi=psi, chunk_rows=8)
    ids = np.arange(100, 100 + N)
    if new_spec.startswith("IVF"):
        index.train_new(normalize_rows(rng.normal(size=(80, D_NEW))).astype(np.float32))
    index.add_old(ids, old)
    index.backfill(ids[:14], new[:14])
    index.remove(ids[[1, 2, 20]])
    return index, new


def is_same(loaded, index, queries) -> bool:
    """Same ids in each part, same search results (scores and ids, all items), same psi map."""
    if not (np.array_equal(loaded.old_ids(), index.old_ids()) and np.array_equal(loaded.new_ids(), index.new_ids())):
        return False
    for a, b in zip(loaded.search(queries, index.ntotal), index.search(queries, index.ntotal)):
        if not np.array_equal(a, b):
            return False
    return type(loaded.psi) is type(index.psi) and np.array_equal(loaded.psi.transform(queries),
                                                                  index.psi.transform(queries))


def load_quietly(path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no damage may turn the file into one loaded unchecked
        return OnlineBackfillIndex.load(path)


@pytest.mark.parametrize("new_spec, step", [("HNSW4", 23), ("IVF2,Flat", 61)])
def test_every_flipped_byte_is_refused_or_loads_the_same_index(tmp_path, new_spec, step):
    # Every 23rd byte of an 11 kB file (about 500 flips, 4 s on one loaded core); measured over
    # every byte of this file: 0 of 11,287 flips load a different index (every one refused).
    index, queries = make_index(new_spec)
    index.save(tmp_path / "live.idx")
    data = (tmp_path / "live.idx").read_bytes()
    start = time.perf_counter()
    refused = same = 0
    different = []
    for i in range(step // 2, len(data), step):
        flipped = bytearray(data)
        flipped[i] ^= 0xFF
        (tmp_path / "flipped.idx").write_bytes(flipped)
        try:
            loaded = load_quietly(tmp_path / "flipped.idx")
        except ValueError:
            refused += 1
            continue
        if is_same(loaded, index, queries):
            same += 1
        else:
            different.append(i)
    assert different == [], f"{len(different)} byte flips (at {different[:10]}, ...) loaded a different index"
    assert refused > 100
    assert time.perf_counter() - start < 60


def npz_members(path) -> dict:
    with np.load(path, allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


@pytest.mark.parametrize("new_spec", ["HNSW4", "IVF2,Flat"])
def test_a_changed_byte_under_an_intact_container_is_refused_naming_its_array(tmp_path, new_spec):
    # The zip CRC-32 guards a byte changed in the file, not one changed before the container was
    # written (an array rewritten, a copy tool re-zipping it): a byte of each stored array is
    # flipped (several per array, faiss blobs and psi included) and the file written again by numpy.
    index, queries = make_index(new_spec)
    index.save(tmp_path / "live.idx")
    arrays = npz_members(tmp_path / "live.idx")
    different, loaded_unchecked, flips = [], [], 0
    for key, value in arrays.items():
        raw = value.reshape(-1).view(np.uint8)
        for i in sorted({0, raw.size // 3, raw.size // 2, raw.size - 1}) if raw.size else []:
            changed = raw.copy()
            changed[i] ^= 0xFF
            buffer = io.BytesIO()
            np.savez(buffer, **dict(arrays, **{key: changed.view(value.dtype).reshape(value.shape)}))
            (tmp_path / "changed.idx").write_bytes(buffer.getvalue())
            flips += 1
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    loaded = OnlineBackfillIndex.load(tmp_path / "changed.idx")
            except ValueError as exc:
                named = "header" if key == "header_checksum" else key  # the header and its checksum disagree
                expected = f"is damaged: {named} does not match the checksum stored with it"
                if expected not in str(exc) or "restore it from a backup or rebuild the index" not in str(exc):
                    different.append(f"{key}[{i}] refused as: {exc}")
                continue
            if caught:
                loaded_unchecked.append(f"{key}[{i}]")
            if not is_same(loaded, index, queries):
                different.append(f"{key}[{i}] loaded as another index")
    assert flips > 40
    assert different == [] and loaded_unchecked == [], (different[:8], loaded_unchecked[:8])
