"""A live index in the middle of an online backfill: one id space over two faiss indices.

This is the serving layer of the book (chapter 8). :class:`~backfill_lib.retrieval.MixedGallery`
is its small simulation twin: both keep every item in exactly one of two sub-indices (old vectors,
new vectors) and merge the two top-k lists; :class:`OnlineBackfillIndex` adds what a service
needs: any faiss index type per part, a reverse transformation ψ attached to the index (one
backbone pass per query, METHOD §2), removals, crash-safe ``save``/``load`` and searches from
several threads while a backfill job writes (:mod:`backfill_lib.backfill_job`).

Scores are inner products of unit vectors (larger is better). The merged ranking is the one of
the full merged score ``s(q, g)`` (old query against items stored old, new query against items
stored new), ties broken by the smaller id.

Index types. Each part is built by ``faiss.index_factory(dim, spec, METRIC_INNER_PRODUCT)``:

* ``"Flat"`` (default): exact; supports removal. Flat and the other flat-codes types (``"SQ8"``,
  ``"PQ16"``, ...) are stored in chunks of at most ``chunk_rows`` vectors, each its own faiss
  index; a search queries them one after the other and merges. One faiss flat index would keep
  the largest size its storage ever had (removals do not shrink a ``std::vector``) and grow it
  by doubling, so during a backfill the old part would keep the gallery's full size while the
  new part doubles its own. In chunks, a removal compacts each chunk in place and then moves
  rows from the last chunk into the room this left in the others (room already allocated, so
  nothing is allocated), and a last chunk emptied that way is freed. Every chunk but the last
  is then full: a part holds less than one chunk of spare rows, in whatever order the items
  leave, and the memory of the old part shrinks as the backfill moves items out of it.
  Which items exist, and in which part, is kept once for the whole index (every id, sorted, with
  a stored-new flag): a backfill batch flips flags in place, so moving items allocates nothing
  of the gallery's size.
* ``"IVF<nlist>,Flat"`` (and other IVF types): must be trained before vectors are stored, either
  with :meth:`OnlineBackfillIndex.train_old` / :meth:`~OnlineBackfillIndex.train_new` or on the
  first batch added to that part (it must then hold at least ``nlist`` vectors). Approximate:
  raise ``nprobe`` with :meth:`~OnlineBackfillIndex.set_search_params`. One faiss index would
  keep each inverted list in a ``std::vector`` that keeps its largest size after removals and
  grows by doubling (and faiss offers no way to shrink one list). So an ``IVF<nlist>,Flat`` part
  holds each list in its own faiss container, rebuilt at its size once removals leave its storage
  more than a sixteenth (plus 4 entries) above its entries, and rebuilt with that much room when
  it must grow: its memory follows its size as the backfill moves items, within a sixteenth per
  list, and a rebuild allocates one list at a time. A search is still one faiss
  ``IndexIVFFlat`` search (one coarse-quantizer pass, the same lists scanned as one index
  holding the same vectors would scan), over a read-only view that stacks the lists
  (``faiss.VStackInvertedLists``, no copy). ``chunk_rows`` does not apply. Measured with
  ``benchmarks/live_index.py`` (10⁶ vectors, ``IVF1024,Flat``, nprobe 16, half backfilled):
  resident memory 0.92x that of one IVF index of the same vectors (peak 0.96x; that index keeps
  the spare capacity of lists grown by doubling), merged search 0.95x its speed; a backfill
  moved about two thirds as many vectors per second as with one faiss index per part. Other
  IVF types (``"IVF<nlist>,PQ16"``, ``"IVF<nlist>,SQ8"``, ...) are one faiss index per part: a
  removal compacts their inverted lists in place, but their memory is not bounded during a
  backfill.
* ``"HNSW<M>"``: faiss cannot remove from an HNSW graph, so removed and backfilled items become
  *tombstones*, filtered out of every search with a faiss ``IDSelector``; :meth:`~backfill_lib.live_index.OnlineBackfillIndex.compact`
  rebuilds the part without them (and must run before a removed id is stored in that part again).
  One graph per part, so the memory of an HNSW part is its largest size until ``compact()``.
  A search runs with ``efSearch`` at least the number of results asked, and a query that a
  search skipping tombstones left short of them is searched again with a wider beam.

Other types faiss can build (``Refine`` wrappers, NSG, a transform in front of HNSW, ...) are
refused when the index is made (:data:`SUPPORTED_TYPES`): a part must add with ids, search and
remove.

Files. :meth:`OnlineBackfillIndex.load` runs no code named by a file: the class of ``psi`` is
looked up among the transforms registered with :func:`backfill_lib.transforms.register_transform`
(never imported), and every header field is checked against the arrays (each part's ids are the
ids its faiss storage holds; types, dimensions, counts, search parameters, graph links and exact
vectors fit), so a file either loads into an index that returns only the items it holds, or is
refused with a ``ValueError`` naming it. Loading writes nothing; it removes the temporary files
that killed saves of that path left (only those whose writing process is gone).

Damage. A file of format 4 holds a SHA-256 checksum of every array (name, dtype, shape and bytes)
in its header, and the checksum of the header in an array of its own (``header_checksum``).
:meth:`OnlineBackfillIndex.load` checks them all before any array is interpreted or any byte
reaches faiss or psi's reader, so a damaged file (a flipped bit, a lost sector, a bad copy) is
refused with ``ValueError: '<path>' is damaged: <array> does not match the checksum stored with
it; restore it from a backup or rebuild the index``, never loaded as another index nor able to
crash the process in faiss's reader. The zip container's own CRC-32 of each array, checked as
it is read, gives the same message. Checksums tell damage, not intent: whoever can rewrite the
file can rewrite them, which the checks of every field above still cover. Files of formats 1 to
3 still load, unchecked, with a warning; saving them again adds the checksums. Measured at
10⁶ vectors of dimension 128 (one Flat part, 528 MB; one run each, on a shared and loaded
machine, /tmp): save 0.77 s (0.48 s in format 3), load 1.48 s (1.15 s), no copy of the data.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import tempfile
import threading
import time
import uuid
import warnings
import zipfile
import zlib
from contextlib import contextmanager

import faiss
import numpy as np

from .retrieval import _as_ids, _sorted_topk
from .validation import UNIT_NORM_TOL, as_embeddings, check_k, check_no_repeats, check_path, repeated

#: Marks a file written by :meth:`OnlineBackfillIndex.save` (with the format version below).
FILE_MAGIC = "backfill_lib.OnlineBackfillIndex"
#: 2: flat-codes parts saved chunk by chunk; 3: IVF-Flat parts saved list by list; 4: a checksum of
#: every array. Versions 1 to 3 still load (unchecked, with a warning).
FILE_VERSION = 4
#: The hash of format 4's checksums (``hashlib``; SHA-256 is hardware-accelerated on most x86 and
#: ARM CPUs: 0.9 GB/s here, twice BLAKE2b).
CHECKSUM = "sha256"
#: The array of a format-4 file holding the checksum of its header (which holds those of the others).
HEADER_CHECKSUM = "header_checksum"
PARTS = ("old", "new")
#: Default rows per storage chunk of a flat-codes part (``chunk_rows`` of :class:`OnlineBackfillIndex`).
CHUNK_ROWS = 1 << 13


class _RWLock:
    """Many readers or one writer; a waiting writer blocks new readers (no writer starvation)."""

    def __init__(self):
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextmanager
    def read(self):
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def write(self):
        with self._cond:
            self._writers_waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


#: What a part can be (an error lists them when a factory string builds something else).
SUPPORTED_TYPES = ("flat-codes types ('Flat', 'SQ8', 'PQ16', 'PQ16x4fs', ...), IVF types ('IVF256,Flat', "
                   "'IVF256,PQ16', 'IVF256,SQ8', optionally after a transform: 'PCA64,IVF256,Flat') or HNSW "
                   "('HNSW32', 'HNSW32_SQ8')")


def _build_base(name: str, dim: int, spec: str):
    """``faiss.index_factory(dim, spec, inner product)``, with an error naming the argument.

    Only index types a part can serve are accepted: it must add vectors with ids, search, and
    remove them (or, for HNSW, hide them behind tombstones). faiss builds other types too (a
    ``Refine`` wrapper cannot add with ids, NSG cannot remove): they are refused here, not at the
    first ``add``.
    """
    try:
        base = faiss.index_factory(dim, spec, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise ValueError(f"{name}_index={spec!r} is not a faiss factory string faiss can build for "
                         f"dim {dim} (e.g. 'Flat', 'IVF256,Flat', 'HNSW32'): {_faiss_message(exc)}") from None
    if not _servable(base):
        raise ValueError(f"{name}_index={spec!r} builds a faiss {type(faiss.downcast_index(base)).__name__}, which a "
                         f"part of this index cannot serve (it must add with ids, search and remove): use one of the "
                         f"{SUPPORTED_TYPES}")
    return base


def _servable(index, top: bool = True) -> bool:
    """Whether a part can hold ``index`` (the types checked to add with ids, search, remove, save)."""
    index = faiss.downcast_index(index)
    if isinstance(index, (faiss.IndexFlatCodes, faiss.IndexIVF, faiss.IndexFastScan)):
        return True
    if isinstance(index, faiss.IndexHNSW):
        return top  # tombstones need the graph itself in the part's IndexIDMap
    if isinstance(index, faiss.IndexPreTransform) and top:
        inner = faiss.downcast_index(index.index)
        return isinstance(inner, (faiss.IndexFlatCodes, faiss.IndexIVF, faiss.IndexFastScan))
    return False


def _describe(index) -> tuple:
    """What must match between a part built from its factory string and the faiss index a file holds."""
    index = faiss.downcast_index(index)
    kind = "IndexFlat" if isinstance(index, faiss.IndexFlat) else type(index).__name__  # IP/L2: the metric says
    out = (kind, int(index.d), int(index.metric_type))
    if isinstance(index, (faiss.IndexIDMap, faiss.IndexPreTransform)):
        return out + _describe(index.index)
    if isinstance(index, faiss.IndexIVF):
        return out + (int(index.nlist), int(index.code_size))
    if isinstance(index, faiss.IndexFlatCodes):
        return out + (int(index.code_size),)
    if isinstance(index, faiss.IndexHNSW):
        return out + _describe(index.storage)
    return out


def _make_part(name: str, dim: int, spec: str, chunk_rows: int):
    """A chunked part for the flat-codes types (Flat, SQ, PQ, ...), list by list for IVF-Flat,
    one faiss index otherwise."""
    base = _build_base(name, dim, spec)
    if isinstance(base, faiss.IndexFlatCodes):
        return _ChunkedPart(name, dim, spec, base, chunk_rows)
    if type(base) is faiss.IndexIVFFlat:  # not its subclasses (FlatDedup, ...), nor IVF-PQ, IVF-SQ
        return _IVFListsPart(name, dim, spec, base)
    return _Part(name, dim, spec, base)


class _Part:
    """One sub-index held in one faiss index (IVF, HNSW, ...): external ids, live ids, tombstones."""

    def __init__(self, name: str, dim: int, spec: str, base=None):
        self.name, self.dim, self.spec = name, dim, spec
        base = _build_base(name, dim, spec) if base is None else base
        # IVF stores external ids itself; an IndexIDMap around it would lose track on removal
        # (IVF does not renumber what is left, the id map does). Other types get an IndexIDMap.
        self.index = base if faiss.try_extract_index_ivf(base) is not None else faiss.IndexIDMap(base)
        self.count = 0  # live items (the index's sorted ids say which: OnlineBackfillIndex._ids)
        self.tombs = np.empty(0, dtype=np.int64)  # ids still in the faiss index but removed, sorted
        self._selector = None  # (IDSelectorNot, IDSelectorBatch) excluding self.tombs, built on demand
        self.params = {}  # search parameters set on the index, applied again when it is rebuilt
        # Most vectors the faiss index has held since it was built: a flat storage (a std::vector)
        # keeps that capacity after removals, which compact() gives back.
        self.peak = 0

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def is_trained(self) -> bool:
        return bool(self.index.is_trained)

    def _graph(self):
        inner = faiss.downcast_index(self.index.index) if isinstance(self.index, faiss.IndexIDMap) else None
        return inner if isinstance(inner, faiss.IndexHNSW) else None

    @property
    def uses_tombstones(self) -> bool:
        return self._graph() is not None

    def train(self, x: np.ndarray) -> None:
        _train(self.index, self.name, self.spec, x)

    def add(self, ids: np.ndarray, x: np.ndarray) -> None:
        if not self.is_trained:
            self.train(x)
        self.index.add_with_ids(x, ids)
        self.count += len(ids)
        self.peak = max(self.peak, self.index.ntotal)

    def remove(self, ids: np.ndarray) -> None:
        if self.uses_tombstones:
            self.tombs = np.union1d(self.tombs, ids)
            self._selector = None
        else:
            removed = self.index.remove_ids(ids)
            assert removed == len(ids), "faiss removed another number of vectors than asked"
        self.count -= len(ids)

    def sources(self) -> list:
        """What a merged search queries: ``[(searchable, number of live items)]``."""
        return [(self, self.count)]

    def search(self, q: np.ndarray, k: int):
        graph = self._graph()
        if graph is None:
            return self.index.search(q, k)
        # efSearch is at least k: an HNSW search keeps efSearch candidates, so a smaller one
        # returns fewer than k results.
        ef = max(int(graph.hnsw.efSearch), k)
        scores, ids = self.index.search(q, k, params=self._hnsw_params(ef))
        # A search that skips tombstones can still end with fewer than k results while the part
        # holds k live items: those queries are searched again with a wider beam (at most every
        # node of the graph, which then finds every live item the graph connects).
        want = min(k, self.count)
        while want and ef < self.index.ntotal:
            rows = np.nonzero(ids[:, want - 1] < 0)[0]
            if not len(rows):
                break
            ef = min(2 * ef, int(self.index.ntotal))
            scores[rows], ids[rows] = self.index.search(q[rows], k, params=self._hnsw_params(ef))
        return scores, ids

    def _hnsw_params(self, ef: int):
        # A fresh parameter object per call: IndexIDMap swaps the selector in it during a search,
        # so threads must not share one. The selector itself is only read.
        params = faiss.SearchParametersHNSW()
        params.efSearch = ef
        if len(self.tombs):
            if self._selector is None:
                batch = faiss.IDSelectorBatch(self.tombs)
                self._selector = (faiss.IDSelectorNot(batch), batch)  # the pair keeps `batch` alive
            params.sel = self._selector[0]
        return params

    def set_param(self, key: str, value) -> None:
        _set_param(self.index, self.name, self.spec, key, value)
        self.params[key] = value

    def compact(self) -> None:
        # Only parts with an IndexIDMap whose type needs no training can be rebuilt from their
        # stored vectors (IVF frees removed vectors list by list itself).
        if not isinstance(self.index, faiss.IndexIDMap) or not (len(self.tombs) or self.peak > self.index.ntotal):
            return
        fresh = _Part(self.name, self.dim, self.spec)
        if not fresh.is_trained:
            return
        for key, value in self.params.items():
            fresh.set_param(key, value)
        id_map = faiss.vector_to_array(self.index.id_map)
        keep = np.nonzero(~np.isin(id_map, self.tombs))[0]
        if len(keep):
            vectors = self.index.index.reconstruct_n(0, self.index.ntotal)[keep]
            fresh.add(id_map[keep], np.ascontiguousarray(vectors))
        self.index, self.count, self.tombs, self.peak = fresh.index, fresh.count, fresh.tombs, fresh.peak
        self._selector = None

    def state(self) -> tuple[dict, dict]:
        """``(header entries, arrays)`` that :meth:`OnlineBackfillIndex.save` writes for this part."""
        return {"layout": "single"}, {"faiss": faiss.serialize_index(self.index), "tombs": self.tombs}

    def restore(self, header: dict, arrays: dict, version: int) -> None:
        """Set the part from what :meth:`state` wrote (``version`` of the file format).

        Raises ``ValueError`` if the stored faiss index is not of the type the factory string
        builds, or is inconsistent (its graph, lists or search parameters).
        """
        stored = faiss.deserialize_index(_bytes_array(arrays["faiss"], "faiss"))
        if _describe(stored) != _describe(self.index):
            raise ValueError(f"the stored faiss index is {_describe(stored)}, not the {_describe(self.index)} "
                             f"that {self.spec!r} builds")
        tombs = _id_array(arrays["tombs"], "tombs")
        if len(tombs) and (not self._graph_of(stored) or np.any(tombs[1:] <= tombs[:-1])):
            raise ValueError("tombstones must be ascending, distinct, and only in an HNSW part")
        ivf = faiss.try_extract_index_ivf(stored)
        if ivf is not None:
            sizes = [ivf.invlists.list_size(l) for l in range(ivf.nlist)]
            if sum(sizes) != stored.ntotal or not 1 <= ivf.nprobe <= ivf.nlist:
                raise ValueError(f"the IVF index counts {stored.ntotal} vectors in lists holding {sum(sizes)}, "
                                 f"nprobe {ivf.nprobe} (of {ivf.nlist} lists)")
        graph = self._graph_of(stored)
        if graph is not None:
            _check_graph(graph)
        if isinstance(stored, faiss.IndexIDMap) and stored.id_map.size() != stored.ntotal:
            raise ValueError(f"the id map holds {stored.id_map.size()} ids for {stored.ntotal} vectors")
        self.index = stored
        self.tombs = tombs
        self.count = self.index.ntotal - len(self.tombs)
        self.peak = self.index.ntotal  # a read index has no spare capacity
        self._selector = None

    @staticmethod
    def _graph_of(index):
        inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else None
        return inner if isinstance(inner, faiss.IndexHNSW) else None

    def held_ids(self) -> np.ndarray:
        """Every id the faiss index holds (tombstones included), in storage order."""
        if isinstance(self.index, faiss.IndexIDMap):
            return faiss.vector_to_array(self.index.id_map).astype(np.int64)
        ivf = faiss.try_extract_index_ivf(self.index)
        held = []
        for l in range(ivf.nlist):
            n = ivf.invlists.list_size(l)
            if n:
                ptr = ivf.invlists.get_ids(l)
                held.append(faiss.rev_swig_ptr(ptr, n).astype(np.int64))
                ivf.invlists.release_ids(l, ptr)
        return np.concatenate(held) if held else np.empty(0, np.int64)

    def param_range(self, key: str):
        """``(low, high)`` of a search parameter this part supports (``high`` None: unbounded), else None."""
        if key == "nprobe":
            ivf = faiss.try_extract_index_ivf(self.index)
            return None if ivf is None else (1, int(ivf.nlist))
        if key == "efSearch" and self.uses_tombstones:
            return (1, None)
        return None


class _Chunk:
    """At most ``cap`` vectors in one faiss flat-codes index, with their ids in storage order.

    The index's storage (a ``std::vector``) is reserved for ``cap`` rows when the chunk is made
    (resizing a vector down keeps its capacity), so filling the chunk never reallocates it: a
    chunk holds exactly ``cap`` rows of memory, whatever its adds and removals.
    """

    def __init__(self, template, cap: int, reserve: bool = True):
        self.index = faiss.clone_index(template)
        if reserve:  # not needed for a chunk filled by one add: that allocates exactly its rows
            self.index.codes.resize(cap * self.index.code_size)
            self.index.codes.resize(0)
        self.ids = np.empty(cap, dtype=np.int64)
        self.cap, self.n = cap, 0

    def codes(self) -> np.ndarray:
        """A view (no copy) of the stored codes, ``(n, code_size)`` uint8; valid until the next write."""
        size = self.index.code_size
        if not self.n:
            return np.empty((0, size), dtype=np.uint8)
        return faiss.rev_swig_ptr(self.index.codes.data(), self.n * size).reshape(self.n, size)

    def append(self, ids: np.ndarray, x=None, codes=None) -> None:
        """Store rows (vectors ``x`` or encoded ``codes``) within the reserved capacity."""
        m = len(ids)
        assert self.n + m <= self.cap, "a chunk was filled beyond its capacity"
        if codes is not None:
            self.index.add_sa_codes(codes)
        else:
            self.index.add(x)
        self.ids[self.n:self.n + m] = ids
        self.n += m

    def remove(self, mask: np.ndarray) -> None:
        """Remove the rows where ``mask`` (over the ``n`` stored rows) is true, in place."""
        bitmap = np.packbits(mask, bitorder="little")
        removed = self.index.remove_ids(faiss.IDSelectorBitmap(len(mask), faiss.swig_ptr(bitmap)))
        assert removed == int(mask.sum()), "faiss removed another number of vectors than asked"
        keep = self.ids[:self.n][~mask]  # faiss keeps the order of the rows it leaves
        self.n = len(keep)
        self.ids[:self.n] = keep

    def truncate(self, n: int) -> None:
        """Keep the first ``n`` rows."""
        removed = self.index.remove_ids(faiss.IDSelectorRange(n, self.n))
        assert removed == self.n - n, "faiss removed another number of vectors than asked"
        self.n = n

    def search(self, q: np.ndarray, k: int):
        scores, rows = self.index.search(q, k)
        return scores, np.where(rows >= 0, self.ids[np.maximum(rows, 0)], -1)


class _ChunkedPart:
    """A sub-index of a flat-codes type stored as chunks of at most ``chunk_rows`` vectors.

    New rows fill the last chunk's reserved room, then new chunks. A removal compacts the chunks
    it touches in place and refills them from the last chunk (:meth:`_refill`), so all chunks but
    the last stay full: spare memory is under one chunk and no removal allocates. Searches query
    every chunk and merge them (exact, ties by the id rule).
    """

    def __init__(self, name: str, dim: int, spec: str, template, chunk_rows: int):
        self.name, self.dim, self.spec = name, dim, spec
        self.template = template  # empty; trained once the part is
        self.chunk_rows = chunk_rows
        self.chunks: list[_Chunk] = []
        self.tombs = np.empty(0, dtype=np.int64)  # always empty: flat codes remove for real
        self.params = {}
        self.uses_tombstones = False

    @property
    def ntotal(self) -> int:
        return sum(c.n for c in self.chunks)

    @property
    def count(self) -> int:
        """Live items: every stored row (a removal removes the row)."""
        return self.ntotal

    @property
    def capacity(self) -> int:
        """Rows of memory the chunks hold (``ntotal`` plus spare rows)."""
        return sum(c.cap for c in self.chunks)

    @property
    def is_trained(self) -> bool:
        return bool(self.template.is_trained)

    def train(self, x: np.ndarray) -> None:
        _train(self.template, self.name, self.spec, x)

    def _new_chunk(self, cap: int, reserve: bool = True) -> _Chunk:
        chunk = _Chunk(self.template, cap, reserve)
        for key, value in self.params.items():
            _set_param(chunk.index, self.name, self.spec, key, value)
        return chunk

    def _fill(self, ids: np.ndarray, x=None, codes=None, exact: bool = False) -> None:
        """Append rows: the last chunk's room first, then new chunks (``exact``: sized to fit)."""
        last = self.chunks[-1] if self.chunks else None
        room = last.cap - last.n if last is not None else 0
        rest = len(ids) - room
        # Every chunk is allocated before a row moves: if memory runs out, nothing has changed.
        caps = []
        while rest > 0:
            caps.append(min(self.chunk_rows, rest) if exact else self.chunk_rows)
            rest -= caps[-1]
        # Reserved only if an add leaves it part-filled; filled by one add it is exactly its rows.
        fresh = [self._new_chunk(cap, reserve=j == len(caps) - 1 and rest < 0) for j, cap in enumerate(caps)]
        start = 0
        for chunk in ([last] if room else []) + fresh:
            stop = min(len(ids), start + chunk.cap - chunk.n)
            if stop > start:
                chunk.append(ids[start:stop], None if x is None else x[start:stop],
                             None if codes is None else codes[start:stop])
            start = stop
        self.chunks += fresh

    def add(self, ids: np.ndarray, x: np.ndarray) -> None:
        if not self.is_trained:
            self.train(x)
        self._fill(ids, x=x)

    def remove(self, ids: np.ndarray) -> None:
        gone = np.sort(ids)
        for chunk in self.chunks:
            mask = _isin_sorted(chunk.ids[:chunk.n], gone)
            if mask.any():
                chunk.remove(mask)
        self._refill()

    def _refill(self) -> None:
        """Fill the spare rows of every chunk but the last with rows moved from the last one.

        No memory is allocated: rows are copied into room already reserved, and a last chunk
        that this empties is freed. Afterwards every chunk but the last is full, so a part
        holds less than one chunk of spare rows, whatever order the items left in.
        """
        j = 0
        while j < len(self.chunks) - 1:
            chunk, last = self.chunks[j], self.chunks[-1]
            m = min(chunk.cap - chunk.n, last.n)
            if m:
                chunk.append(last.ids[last.n - m:last.n], codes=last.codes()[last.n - m:])
                last.truncate(last.n - m)
            if not last.n:
                self.chunks.pop()  # freed
            elif chunk.n == chunk.cap:
                j += 1
        if self.chunks and not self.chunks[-1].n:
            self.chunks.pop()

    def sources(self) -> list:
        return [(c, c.n) for c in self.chunks if c.n]

    def set_param(self, key: str, value) -> None:
        for index in [self.template] + [c.index for c in self.chunks]:
            _set_param(index, self.name, self.spec, key, value)
        self.params[key] = value

    def compact(self) -> None:
        # Only the last chunk can have spare rows: rebuild it at its size.
        last = self.chunks[-1] if self.chunks else None
        if last is not None and last.cap > last.n:
            fresh = self._new_chunk(last.n, reserve=False)
            fresh.append(last.ids[:last.n], codes=last.codes())
            self.chunks[-1] = fresh

    def state(self) -> tuple[dict, dict]:
        arrays = {"faiss": faiss.serialize_index(self.template), "tombs": self.tombs}
        for j, chunk in enumerate(self.chunks):
            arrays[f"chunk{j}_codes"] = chunk.codes()  # views: written while the caller holds the lock
            arrays[f"chunk{j}_ids"] = chunk.ids[:chunk.n]
        return {"layout": "chunks", "chunks": len(self.chunks), "chunk_rows": self.chunk_rows}, arrays

    def param_range(self, key: str):
        """Flat-codes parts have no search parameter."""
        return None

    def held_ids(self) -> np.ndarray:
        """Every id the chunks hold, in storage order."""
        return np.concatenate([c.ids[:c.n] for c in self.chunks] or [np.empty(0, np.int64)])

    def restore(self, header: dict, arrays: dict, version: int) -> None:
        """Set the part from what :meth:`state` wrote; ``ValueError`` if it does not fit the part."""
        stored = faiss.deserialize_index(_bytes_array(arrays["faiss"], "faiss"))
        want = _describe(self.template)
        if version == 1:
            # Format 1 held the part in one IndexIDMap around a flat-codes index: split it.
            if not isinstance(stored, faiss.IndexIDMap) or _describe(stored.index) != want:
                raise ValueError(f"the stored faiss index is {_describe(stored)}, not an IndexIDMap around {want}")
            inner = faiss.downcast_index(stored.index)
            ids = faiss.vector_to_array(stored.id_map).astype(np.int64)
            size = int(inner.code_size)
            if len(ids) != inner.ntotal or inner.codes.size() != len(ids) * size:
                raise ValueError(f"the stored index holds {inner.codes.size()} bytes of codes for {len(ids)} ids")
            codes = np.empty((len(ids), size), dtype=np.uint8)
            if len(ids):
                codes[:] = faiss.rev_swig_ptr(inner.codes.data(), codes.size).reshape(codes.shape)
            self._check_codes(codes)
            inner.reset()
            self.template = faiss.deserialize_index(faiss.serialize_index(inner))  # empty, no spare capacity
            self._fill(ids, codes=codes, exact=True)
            return
        if _describe(stored) != want or stored.ntotal:
            raise ValueError(f"the stored faiss template is {_describe(stored)} holding {stored.ntotal} vectors, "
                             f"not an empty {want} as {self.spec!r} builds")
        self.template = stored
        n_chunks = header.get("chunks")
        if isinstance(n_chunks, bool) or not isinstance(n_chunks, int) or n_chunks < 0:
            raise ValueError(f"the number of chunks is {n_chunks!r}")
        for j in range(n_chunks):
            ids = _id_array(arrays[f"chunk{j}_ids"], f"chunk{j}_ids")
            codes = arrays[f"chunk{j}_codes"]
            if codes.dtype != np.uint8 or codes.shape != (len(ids), stored.code_size):
                raise ValueError(f"chunk {j} holds codes of {codes.dtype} {codes.shape} for {len(ids)} ids "
                                 f"(uint8 rows of {stored.code_size} bytes expected)")
            if len(ids) and not stored.is_trained:
                raise ValueError("the part holds vectors but its faiss index is not trained")
            self._check_codes(codes)
            self._fill(ids, codes=np.ascontiguousarray(codes), exact=True)

    def _check_codes(self, codes: np.ndarray) -> None:
        if type(self.template) in (faiss.IndexFlat, faiss.IndexFlatIP):  # codes are the float32 vectors
            _check_unit_rows(codes, self.dim)


class _IVFListsPart:
    """An ``IndexIVFFlat`` sub-index whose inverted lists are each held in their own container.

    One faiss ``IndexIVFFlat`` keeps every inverted list in a ``std::vector`` that never gives
    memory back (removals keep its largest allocation) and grows by doubling, and faiss offers
    no way to shrink one list. Here list ``l`` is the single list of its own
    ``faiss.ArrayInvertedLists(1, code_size)``, so a list can be replaced by a fresh one
    allocated at the size it needs (the old one is freed): a list's capacity is kept within
    :attr:`HEADROOM` of its size (plus :attr:`SPARE` entries) as items come and go, and the
    transient of a rebuild is one list. Searches go through one ``IndexIVFFlat`` (the
    template's coarse quantizer, shared) whose inverted lists are a
    ``faiss.VStackInvertedLists`` over the containers: a read-only view that forwards list
    ``l`` to its container without copying, rebuilt (pointers only) after every write. So a
    search is the one of a single IVF index holding the same vectors: one quantizer pass, the
    same lists scanned.
    """

    #: A list's storage holds at most its entries times (1 + HEADROOM), plus SPARE entries: a list
    #: that must grow is rebuilt with that much room for the adds to come, and a list that removals
    #: leave with more storage is rebuilt at its size.
    HEADROOM = 1 / 16
    #: (Small lists would otherwise be rebuilt at almost every add.)
    SPARE = 4
    LAYOUT = "ivf_lists"

    def __init__(self, name: str, dim: int, spec: str, template):
        self.name, self.dim, self.spec = name, dim, spec
        self.template = template  # trained once; never holds an entry
        self.nlist, self.code_size = int(self.template.nlist), int(self.template.code_size)
        self.tombs = np.empty(0, dtype=np.int64)  # always empty: entries are removed for real
        self.params = {}
        self.uses_tombstones = False
        self._empty = faiss.ArrayInvertedLists(1, self.code_size)  # stands for every empty list
        self._lists = [self._empty] * self.nlist
        self.sizes = np.zeros(self.nlist, dtype=np.int64)  # entries per list
        self.caps = np.zeros(self.nlist, dtype=np.int64)   # entries each list's storage holds
        self._view = None
        self._make_view()

    # ---- the search view ------------------------------------------------------------------

    def _make_view(self) -> None:
        # A one-list IVF index that removals point at each list in turn (its quantizer unused).
        self._remover = faiss.IndexIVFFlat(self.template.quantizer, self.dim, 1, faiss.METRIC_INNER_PRODUCT)
        self._remover.own_fields = False
        self._remover.replace_invlists(self._empty, False)
        view = faiss.IndexIVFFlat(self.template.quantizer, self.dim, self.nlist, faiss.METRIC_INNER_PRODUCT)
        view.own_fields = False  # the quantizer is the template's
        for key, value in self.params.items():
            _set_param(view, self.name, self.spec, key, value)
        self._view = view
        self._refresh()

    def _refresh(self) -> None:
        """Point the search view at the current containers (after every write)."""
        pointers = faiss.InvertedListsPtrVector()
        for il in self._lists:
            pointers.push_back(il)
        stack = faiss.VStackInvertedLists(self.nlist, pointers.data())
        self._view.replace_invlists(stack, False)
        self._stack = stack  # kept alive here: the view does not own it
        self._view.ntotal = self.ntotal
        self._view.is_trained = self.template.is_trained

    # ---- state ------------------------------------------------------------------------------

    @property
    def ntotal(self) -> int:
        return int(self.sizes.sum())

    @property
    def count(self) -> int:
        """Live items: every stored entry (a removal removes the entry)."""
        return self.ntotal

    @property
    def capacity(self) -> int:
        """Entries of memory the lists hold (``ntotal`` plus room for adds)."""
        return int(self.caps.sum())

    @property
    def is_trained(self) -> bool:
        return bool(self.template.is_trained)

    def train(self, x: np.ndarray) -> None:
        _train(self.template, self.name, self.spec, x)
        self._view.is_trained = self.template.is_trained

    def _entries(self, l: int) -> tuple[np.ndarray, np.ndarray]:
        """Views (no copy) of list ``l``'s ids and codes; valid until the list is written."""
        n = int(self.sizes[l])
        if not n:
            return np.empty(0, np.int64), np.empty((0, self.code_size), np.uint8)
        il = self._lists[l]
        ids = faiss.rev_swig_ptr(il.get_ids(0), n)
        codes = faiss.rev_swig_ptr(il.get_codes(0), n * self.code_size).reshape(n, self.code_size)
        return ids, codes

    def _set_list(self, l: int, ids: np.ndarray, codes: np.ndarray, cap: int) -> None:
        """Replace list ``l`` by a fresh container of ``cap`` entries holding ``ids``/``codes``."""
        ids, codes = np.ascontiguousarray(ids, dtype=np.int64), np.ascontiguousarray(codes, dtype=np.uint8)
        self._rebuild(l, [(len(ids), faiss.swig_ptr(ids), faiss.swig_ptr(codes))], cap)

    def _stored(self, l: int) -> tuple:
        """List ``l``'s entries as a piece for :meth:`_rebuild`: ``(n, ids pointer, codes pointer)``."""
        il = self._lists[l]
        return int(self.sizes[l]), il.get_ids(0), il.get_codes(0)

    def _shrink(self, l: int) -> None:
        """Rebuild list ``l`` at exactly its size (its spare room freed)."""
        self._rebuild(l, [self._stored(l)], 0)

    def _rebuild(self, l: int, pieces: list, cap: int) -> None:
        """Replace list ``l`` by a fresh container of ``cap`` entries (at least what it holds)
        filled with ``pieces``, ``(n, ids pointer, codes pointer)`` each, in order.

        The old container is freed once nothing refers to it (the search view is repointed by
        the caller before the write lock is released).
        """
        n = sum(m for m, _, _ in pieces)
        if not n:
            self._lists[l], self.sizes[l], self.caps[l] = self._empty, 0, 0
            return
        cap = max(cap, n)
        il = faiss.ArrayInvertedLists(1, self.code_size)
        pieces = [piece for piece in pieces if piece[0]]
        if cap == n and len(pieces) == 1:
            il.add_entries(0, *pieces[0])  # from empty: allocated exactly, one copy
        else:
            # A std::vector resized up from empty is allocated exactly; resized down it keeps that.
            il.resize(0, cap)
            il.resize(0, n)
            at = 0
            for m, ids, codes in pieces:
                il.update_entries(0, at, m, ids, codes)
                at += m
        self._lists[l], self.sizes[l], self.caps[l] = il, n, cap

    # ---- writes -----------------------------------------------------------------------------

    def add(self, ids: np.ndarray, x: np.ndarray) -> None:
        if not self.is_trained:
            self.train(x)
        x = np.ascontiguousarray(x, dtype=np.float32)
        lists = self.template.quantizer.assign(x, 1)[:, 0]  # as IndexIVF.add would assign them
        order = np.argsort(lists, kind="stable")
        # Grouped by list (one copy of the batch): every list's new entries are then contiguous.
        ids = np.ascontiguousarray(np.asarray(ids, dtype=np.int64)[order])
        codes = np.ascontiguousarray(x[order]).view(np.uint8)  # an IndexIVFFlat code is the vector's bytes
        bounds = np.searchsorted(lists[order], np.arange(self.nlist + 1))
        try:
            for l in np.nonzero(np.diff(bounds))[0]:
                a, b = bounds[l], bounds[l + 1]
                m, n = int(b - a), int(self.sizes[l])
                new = (m, faiss.swig_ptr(ids[a:b]), faiss.swig_ptr(codes[a:b]))
                if n + m <= self.caps[l]:  # room left: written in place, nothing allocated
                    self._lists[l].add_entries(0, *new)
                    self.sizes[l] += m
                elif not n:  # filled from empty: exactly its entries (add_old of a whole gallery)
                    self._rebuild(l, [new], m)
                else:  # a list that grows gets room for the adds to come
                    self._rebuild(l, [self._stored(l), new], self._bound(n + m))
        except BaseException:
            self._remove_found(ids)  # all or nothing: take back what was stored
            self._refresh()
            raise
        self._refresh()

    def remove(self, ids: np.ndarray) -> None:
        try:
            removed = self._remove_found(ids)
        finally:
            self._refresh()  # never leave the view pointing at a freed list
        assert removed == len(ids), "the IVF lists removed another number of entries than asked"

    def _remove_found(self, gone: np.ndarray) -> int:
        """Remove the entries whose ids are in ``gone``; returns how many were found.

        First every entry is removed in place, by faiss (``IndexIVF.remove_ids`` on a one-list
        index over each list's container in turn: the last entries fill the holes, nothing is
        allocated), then the lists whose storage is now beyond :meth:`_bound` are rebuilt at
        their size. Should memory run out during a rebuild, the lists left are kept as they are
        (valid, with room to spare, rebuilt at a later removal or by ``compact()``): the removal
        itself is done.
        """
        if not len(gone):
            return 0
        selector = faiss.IDSelectorBatch(np.ascontiguousarray(gone, dtype=np.int64))
        remover = self._remover
        found, shrink = 0, []
        try:
            for l in np.nonzero(self.sizes)[0]:
                if found == len(gone):
                    break
                remover.replace_invlists(self._lists[l], False)
                m = int(remover.remove_ids(selector))
                if not m:
                    continue
                found += m
                n = int(self.sizes[l]) - m
                self.sizes[l] = n
                if not n:
                    self._lists[l], self.caps[l] = self._empty, 0  # freed
                elif self.caps[l] > self._bound(n):
                    shrink.append(l)
        finally:
            remover.replace_invlists(self._empty, False)  # never left pointing at a list that may go
        try:
            for l in shrink:
                self._shrink(l)
        except MemoryError:
            pass
        return found

    def _bound(self, n: int) -> int:
        """Most entries of storage a list of ``n`` entries may keep before it is rebuilt."""
        return n + int(n * self.HEADROOM) + self.SPARE

    def sources(self) -> list:
        return [(self, self.count)]

    def search(self, q: np.ndarray, k: int):
        return self._view.search(q, k)

    def set_param(self, key: str, value) -> None:
        for index in (self.template, self._view):
            _set_param(index, self.name, self.spec, key, value)
        self.params[key] = value

    def compact(self) -> None:
        # Rebuild every list with room at its size: the part then holds exactly its entries.
        try:
            for l in np.nonzero(self.caps > self.sizes)[0]:
                self._shrink(l)
        finally:
            self._refresh()

    # ---- persistence --------------------------------------------------------------------------

    def state(self) -> tuple[dict, dict]:
        arrays = {"faiss": faiss.serialize_index(self.template), "tombs": self.tombs, "list_sizes": self.sizes}
        for l in np.nonzero(self.sizes)[0]:
            ids, codes = self._entries(l)  # views: written while the caller holds the lock
            arrays[f"list{l}_ids"], arrays[f"list{l}_codes"] = ids, codes
        return {"layout": self.LAYOUT, "nlist": self.nlist}, arrays

    def param_range(self, key: str):
        """``(1, nlist)`` for ``nprobe``, else None."""
        return (1, self.nlist) if key == "nprobe" else None

    def held_ids(self) -> np.ndarray:
        """Every id the lists hold, list by list."""
        return np.concatenate([self._entries(l)[0] for l in range(self.nlist)] or [np.empty(0, np.int64)])

    def restore(self, header: dict, arrays: dict, version: int) -> None:
        """Set the part from what :meth:`state` wrote; ``ValueError`` if it does not fit the part."""
        ivf = faiss.deserialize_index(_bytes_array(arrays["faiss"], "faiss"))
        if _describe(ivf) != _describe(self.template):
            raise ValueError(f"the stored faiss index is {_describe(ivf)}, not the {_describe(self.template)} "
                             f"that {self.spec!r} builds")
        self.template = ivf
        self.nlist, self.code_size = int(ivf.nlist), int(ivf.code_size)
        self._empty = faiss.ArrayInvertedLists(1, self.code_size)
        self._lists = [self._empty] * self.nlist
        self.sizes = np.zeros(self.nlist, dtype=np.int64)
        self.caps = np.zeros(self.nlist, dtype=np.int64)
        if header.get("layout") == self.LAYOUT:
            sizes = _id_array(arrays["list_sizes"], "list_sizes")  # non-negative integers too
            if len(sizes) != self.nlist or ivf.ntotal:
                raise ValueError(f"{len(sizes)} list sizes for {self.nlist} lists, template holding {ivf.ntotal}")
            if sizes.any() and not ivf.is_trained:
                raise ValueError("the part holds vectors but its faiss index is not trained")
            for l in np.nonzero(sizes)[0]:
                ids, codes = _id_array(arrays[f"list{l}_ids"], f"list{l}_ids"), arrays[f"list{l}_codes"]
                if len(ids) != sizes[l] or codes.dtype != np.uint8 or codes.shape != (sizes[l], self.code_size):
                    raise ValueError(f"list {l} holds {len(ids)} ids and codes of {codes.dtype} {codes.shape} "
                                     f"for {sizes[l]} entries")
                _check_unit_rows(codes, self.dim)
                self._set_list(l, ids, codes, int(sizes[l]))
        else:
            # Formats 1 and 2 held the part in one IndexIVFFlat: each list copied out, exactly.
            if len(arrays["tombs"]):
                raise ValueError("an IVF part has no tombstones")
            invlists = ivf.invlists
            for l in range(self.nlist):
                n = invlists.list_size(l)
                if n:
                    ids = faiss.rev_swig_ptr(invlists.get_ids(l), n)
                    codes = faiss.rev_swig_ptr(invlists.get_codes(l), n * self.code_size).reshape(n, self.code_size)
                    _check_unit_rows(codes, self.dim)
                    self._set_list(l, ids, codes, n)
            # The stored lists are freed with the container the template owned (kept empty here).
            self._template_lists = faiss.ArrayInvertedLists(self.nlist, self.code_size)
            ivf.replace_invlists(self._template_lists, False)
            ivf.ntotal = 0
        self._make_view()


def _train(index, name: str, spec: str, x: np.ndarray) -> None:
    try:
        index.train(x)
    except RuntimeError as exc:
        raise ValueError(f"training the {name} part ({spec!r}) on {len(x)} vectors failed: "
                         f"{_faiss_message(exc)}; give more training vectors (IVF needs at least nlist)") from None


def _set_param(index, name: str, spec: str, key: str, value) -> None:
    try:
        faiss.ParameterSpace().set_index_parameter(index, key, value)
    except RuntimeError as exc:
        raise ValueError(f"cannot set {key}={value!r} on the {name} part ({spec!r}): "
                         f"{_faiss_message(exc)}") from None


def _faiss_message(exc: Exception) -> str:
    """The first line of a faiss exception without its C++ file and line."""
    text = str(exc).strip().splitlines()
    line = next((t for t in text if "Error" in t or "error" in t), text[0] if text else "")
    return line.split("Error: ")[-1].strip()


def _check_search_param(part, key: str, value):
    """Check one search parameter for one part: ``ValueError``/``TypeError`` naming it, else its value.

    ``nprobe`` (IVF parts) must be an integer from 1 to the part's number of lists (0 breaks
    every later search, more than ``nlist`` probes no more lists); ``efSearch`` (HNSW parts)
    an integer of at least 1.
    """
    bounds = part.param_range(key)
    if bounds is None:
        raise ValueError(f"cannot set {key}={value!r} on the {part.name} part ({part.spec!r}): it has no search "
                         f"parameter {key!r}; the parameters are nprobe (IVF parts) and efSearch (HNSW parts)")
    low, high = bounds
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{key} must be an integer, got {type(value).__name__} {value!r}")
    if value < low or (high is not None and value > high):
        span = f"from {low} to {high} (the {part.name} part {part.spec!r} has {high} lists)" if high is not None \
            else f"at least {low}"
        raise ValueError(f"{key}={value} is out of range for the {part.name} part: give an integer {span}")
    return int(value)


def _check_graph(graph) -> None:
    """``ValueError`` unless an HNSW graph read from a file only points at nodes it holds."""
    h, n = graph.hnsw, int(graph.ntotal)
    levels = faiss.vector_to_array(h.levels)
    offsets = faiss.vector_to_array(h.offsets).astype(np.int64)
    neighbors = faiss.vector_to_array(h.neighbors)
    cum = faiss.vector_to_array(h.cum_nneighbor_per_level).astype(np.int64)
    ok = (len(levels) == n and len(offsets) == n + 1 and graph.storage.ntotal == n
          and (not n or (levels.min() >= 1 and levels.max() < len(cum)
                         and offsets[0] == 0 and offsets[-1] == len(neighbors)
                         and np.all(offsets[:-1] + cum[levels] <= offsets[1:])
                         and 0 <= h.entry_point < n and h.max_level == levels.max() - 1))
          and (not len(neighbors) or (neighbors.min() >= -1 and neighbors.max() < n))
          and h.efSearch >= 1)
    storage = faiss.downcast_index(graph.storage)
    if isinstance(storage, faiss.IndexFlatCodes):
        ok = ok and storage.codes.size() == n * storage.code_size
    if not ok:
        raise ValueError(f"the HNSW graph of {n} vectors is inconsistent (levels, neighbour lists or efSearch)")


def _array_digest(name: str, arr: np.ndarray) -> str:
    """The format-4 checksum (:data:`CHECKSUM`, hex) of one array: its name, dtype, shape and bytes.

    The bytes are those of the array in C order, as ``np.save`` writes them; a C-contiguous array
    (every array a save writes, views of faiss storage included) is hashed in place, anything
    else (only a crafted file holds one) in blocks of at most 16 MiB: never a copy of the array.
    """
    digest = hashlib.new(CHECKSUM, json.dumps([name, arr.dtype.str, list(arr.shape)]).encode() + b"\0")
    if arr.size and arr.dtype.itemsize:
        if arr.flags.c_contiguous:
            digest.update(arr.reshape(-1).view(np.uint8))
        else:
            arr = arr.reshape(1) if arr.ndim == 0 else arr
            step = max(1, (1 << 24) // max(1, arr[:1].nbytes))
            for i in range(0, len(arr), step):
                digest.update(np.ascontiguousarray(arr[i:i + step]).reshape(-1).view(np.uint8))
    return digest.hexdigest()


def _seal(header: dict, arrays: dict) -> dict:
    """The arrays of a format-4 file: ``arrays``, the header and the header's checksum.

    The header gets the checksum of every array (:func:`_array_digest`); its own checksum,
    which thus covers the whole file, is the array :data:`HEADER_CHECKSUM` (32 bytes).
    """
    header = dict(header, checksum=CHECKSUM,
                  checksums={key: _array_digest(key, value) for key, value in arrays.items()})
    sealed = dict(arrays, header=np.frombuffer(json.dumps(header).encode(), dtype=np.uint8))
    sealed[HEADER_CHECKSUM] = np.frombuffer(bytes.fromhex(_array_digest("header", sealed["header"])), dtype=np.uint8)
    return sealed


def _check_digests(path: str, header: dict, arrays: dict) -> None:
    """``ValueError`` naming the first array of a format-4 file that does not match its checksum.

    Runs before any array is interpreted: the header was checked against its own checksum
    (:data:`HEADER_CHECKSUM`) by the caller, and it lists every other array of the file.
    """
    stored = header.get("checksums")
    if header.get("checksum") != CHECKSUM or not isinstance(stored, dict):
        raise ValueError(_damaged(path, "header", f"it lists no {CHECKSUM} checksums"))
    for key in sorted(set(stored) | (set(arrays) - {"header", HEADER_CHECKSUM})):
        if key not in arrays:
            raise ValueError(_damaged(path, key, "the array is missing"))
        if key not in stored:
            raise ValueError(_damaged(path, key, "the array has no checksum stored for it"))
        if stored[key] != _array_digest(key, arrays[key]):
            raise ValueError(_damaged(path, key))


def _damaged(path: str, key: str, why: str | None = None) -> str:
    """The message of a file whose array ``key`` does not match the checksum stored with it."""
    what = f"{key} does not match the checksum stored with it" if why is None else f"{key}: {why}"
    return f"{path!r} is damaged: {what}; restore it from a backup or rebuild the index"


def _bytes_array(arr: np.ndarray, key: str) -> np.ndarray:
    if arr.dtype != np.uint8 or arr.ndim != 1:
        raise ValueError(f"{key} is {arr.dtype} {arr.shape}, not serialized bytes")
    return arr


def _id_array(arr: np.ndarray, key: str) -> np.ndarray:
    """An array from a file as 1-D non-negative int64 ids, or ``ValueError``."""
    if arr.ndim != 1 or not (np.issubdtype(arr.dtype, np.integer) or arr.size == 0):
        raise ValueError(f"{key} is {arr.dtype} {arr.shape}, not a 1-D array of integer ids")
    if arr.size and (arr.min() < 0 or arr.max() > np.iinfo(np.int64).max):
        raise ValueError(f"{key} holds ids outside 0 .. 2**63 - 1")
    return arr.astype(np.int64)


def _check_unit_rows(codes: np.ndarray, dim: int) -> None:
    """``ValueError`` unless float32 vectors stored as bytes are finite and unit-norm (as added)."""
    if not len(codes):
        return
    x = np.ascontiguousarray(codes).view(np.float32).reshape(len(codes), dim)
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))
    if not np.all(np.abs(norms - 1.0) <= UNIT_NORM_TOL):  # NaN fails too
        raise ValueError(f"{int((~(np.abs(norms - 1.0) <= UNIT_NORM_TOL)).sum())} stored vectors are not finite "
                         "unit-norm rows")


def _check_dim(name: str, d, what: str = "embedding dimension") -> int:
    if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 1:
        raise ValueError(f"{name} must be a positive integer ({what}), got {d!r}")
    return int(d)


def _check_spec(name: str, spec) -> str:
    if not isinstance(spec, str) or not spec.strip():
        raise TypeError(f"{name} must be a faiss factory string such as 'Flat', 'IVF256,Flat' or 'HNSW32', got {spec!r}")
    if "IDMap" in spec:
        raise ValueError(f"{name}={spec!r}: leave out 'IDMap', the index maps ids itself")
    return spec


def _check_psi(psi):
    if psi is not None and not callable(getattr(psi, "transform", None)):
        raise TypeError(f"psi must have a transform(X) method returning unit-norm float32 rows "
                        f"(e.g. backfill_lib.transforms.ReverseTransform), got {type(psi).__name__}")
    return psi


def _check_score_maps(value):
    """``None`` or ``{"old": ScoreMap, "new": ScoreMap}``: the calibration a merged search applies."""
    if value is None:
        return None
    from .calibration import ScoreMap

    if not isinstance(value, dict) or set(value) != {"old", "new"} \
            or not all(isinstance(v, ScoreMap) for v in value.values()):
        raise TypeError("score_maps must be None or {'old': ScoreMap, 'new': ScoreMap}, one increasing map per space "
                        f"(backfill_lib.calibration.fit_score_map on each space's training embeddings), got {value!r}")
    return dict(value)


def _calibrated(search, score_map):
    """``search`` with its scores mapped onto the calibrated scale (missing results stay ``-inf``)."""
    if score_map is None:
        return search

    def run(q, width):
        scores, ids = search(q, width)
        return np.where(ids >= 0, score_map(scores), -np.inf).astype(np.float32), ids
    return run


def _merge_by_score_then_id(results, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge ``(scores, ids)`` lists into the top ``k`` by descending score, ties by smaller id.

    The rule of :func:`backfill_lib.retrieval.merge_topk`, without its input checks (the lists
    come from our own searches, on the query path).
    """
    scores = np.concatenate([s for s, _ in results], axis=1)
    ids = np.concatenate([i for _, i in results], axis=1)
    return _sorted_topk(np.where(ids < 0, -np.inf, scores), ids, k)


def _merged_topk(sources, k: int, clean=None) -> tuple[np.ndarray, np.ndarray]:
    """The exact merged top ``k`` of several searchable lists, ties by the smaller id.

    ``sources`` holds ``(search, size, queries)``: ``search(queries, width)`` returns the best
    ``width`` ``(scores, ids)`` of one list (``-1`` ids where it has fewer), ``size`` is how many
    items it holds (``None``: unknown, e.g. a remote collection). ``clean(ids, scores, k)``, if
    given, rewrites each merge (the Qdrant backend drops an id seen twice).
    """
    def width_of(width, size):
        return width if size is None else min(width, size)

    # While a list's last fetched score ties the k-th merged score, items it did not return
    # could still enter the top k by the id rule: fetch twice as many. One more than k at first,
    # so that a list holding the whole top k does not tie with itself.
    fetched = [search(q, width_of(k + 1, size)) for search, size, q in sources]
    while True:
        scores, ids = _merge_by_score_then_id(fetched, k)
        if clean is not None:
            ids, scores = clean(ids, scores, k)
        kth = scores[:, -1]
        done = True
        for j, (search, size, q) in enumerate(sources):
            s, i = fetched[j]
            width = s.shape[1]
            if size is not None and width >= size:
                continue
            rows = np.nonzero((i[:, -1] >= 0) & (s[:, -1] >= kth))[0]
            if not len(rows):
                continue
            done = False
            wider = width_of(2 * width, size)
            s2, i2 = search(q[rows], wider)
            s = np.pad(s, ((0, 0), (0, wider - width)), constant_values=-np.inf)
            i = np.pad(i, ((0, 0), (0, wider - width)), constant_values=-1)
            s[rows], i[rows] = s2, i2
            fetched[j] = (s, i)
        if done:
            return scores, ids


_ADD_DOC = """Store items as {what} vectors ({when}).

        Parameters
        ----------
        ids : array of n non-negative ints
            New ids, none already in the index.
        {arg} : array (n, {dim})
            Their {what} vectors, unit-norm rows.

        Raises
        ------
        TypeError
            If ``ids`` is not integer or ``{arg}`` is not numeric.
        ValueError
            If ``{arg}`` is not ``n`` finite unit-norm rows of width ``{dim}``, or ``ids``
            repeats an id, holds one already stored, or a negative one.
        """


class _TwoPartWrites:
    """``add_old``, ``add`` and ``remove`` of both backends, checked, then ``self._add`` / ``self._remove``."""

    def add_old(self, ids, vectors) -> None:
        self._add("old", ids, as_embeddings(vectors, "vectors", dim=self.dim_old, unit_norm=True))

    def add(self, ids, new_vectors) -> None:
        self._add("new", ids, as_embeddings(new_vectors, "new_vectors", dim=self.dim_new, unit_norm=True))

    def remove(self, ids) -> None:
        """Remove items from the index, wherever they are stored.

        Parameters
        ----------
        ids : int or array of ints
            Ids of stored items, each once.

        Raises
        ------
        TypeError
            If ``ids`` is not integer.
        ValueError
            If ``ids`` repeats an id or names an item that is not in the index (nothing is
            removed then).
        """
        arr = np.atleast_1d(np.asarray(ids))
        ids = _as_ids(arr, arr.size)
        with self._lock.write():
            check_no_repeats(ids, "ids", "each item is removed once")
            self._remove(ids)

    add_old.__doc__ = _ADD_DOC.format(what="old", when="items that arrived before the switch to the new model",
                                      arg="vectors", dim="dim_old")
    add.__doc__ = _ADD_DOC.format(what="new", when="items that arrive during the backfill go straight to new",
                                  arg="new_vectors", dim="dim_new")


class OnlineBackfillIndex(_TwoPartWrites):
    """A gallery being backfilled while it serves: items stored old or new, one merged search.

    Every item is stored in exactly one part: *old* (a ``dim_old`` vector of the old model) or
    *new* (a ``dim_new`` vector of the new model, or ``ρ̂`` of it). :meth:`backfill` moves a batch
    of items from old to new at once. A query is scored against each item in the space the item
    is stored in, and the two top-k lists are merged: the old part is searched with
    ``psi.transform(query_new)`` (``ψ̂``, one backbone pass per query, the reverse
    transformation of METHOD §2) or with an explicit ``query_old`` (distance rank merge, two
    passes).

    Thread safety: any number of threads may call :meth:`search` (and :meth:`save`) while one
    thread writes (:meth:`add_old`, :meth:`add`, :meth:`backfill`, :meth:`remove`, ...). A
    readers-writer lock makes every write atomic for the searches: a search sees each item
    exactly once, in the part it is stored in before or after a batch, never both or neither.
    faiss releases the GIL while it searches, so searches run in parallel.

    Parameters
    ----------
    dim_old : int
        Dimension of the old vectors.
    dim_new : int
        Dimension of the new vectors.
    old_index : str, default "Flat"
        faiss factory string of the old part (inner-product metric), e.g. ``"IVF1024,Flat"`` or
        ``"HNSW32"``; see the module docstring for training and removal.
    new_index : str, default "Flat"
        faiss factory string of the new part.
    psi : object, optional
        The fitted reverse transformation ``ψ̂``: any object with ``transform(X)`` mapping
        ``(n, dim_new)`` rows to unit-norm ``(n, dim_old)`` float32 rows, such as
        :class:`backfill_lib.transforms.ReverseTransform`. Saved with the index if its class is
        registered with :func:`backfill_lib.transforms.register_transform` (the library's
        transforms are); :meth:`save` refuses an unregistered one.
    chunk_rows : int, default 8192
        Rows per storage chunk of a flat-codes part (``"Flat"``, ``"SQ8"``, ``"PQ16"``, ...):
        such a part is a list of faiss indices of at most this many vectors, so that the memory
        a backfill moves out of the old part is given back as it goes (see the module docstring).
        Each part then holds less than one chunk of spare rows. ``"IVF<nlist>,Flat"`` parts are
        stored list by list instead and do not use it.
    score_maps : dict, optional
        ``{"old": ScoreMap, "new": ScoreMap}``: serve the calibrated merge (see
        :attr:`score_maps`); default None, the raw scores.

    Attributes
    ----------
    dim_old : int
        Dimension of the old vectors.
    dim_new : int
        Dimension of the new vectors.
    psi : object or None
        The attached reverse transformation (may be replaced at any time).

    Raises
    ------
    TypeError
        If a factory string is not a string or ``psi`` has no ``transform`` method.
    ValueError
        If a dimension is not a positive integer, faiss cannot build a factory string, or it
        builds a type a part cannot serve (see the module docstring: e.g. ``Refine`` wrappers,
        which cannot add with ids, and NSG, which cannot remove, are refused here).

    Examples
    --------
    >>> index = OnlineBackfillIndex(dim_old=2, dim_new=2)
    >>> index.add_old([10, 11], [[1.0, 0.0], [0.0, 1.0]])
    >>> index.backfill([11], [[0.6, 0.8]])
    >>> index.progress
    0.5
    >>> scores, ids = index.search([[0.0, 1.0]], k=2, query_old=[[1.0, 0.0]])
    >>> ids
    array([[10, 11]])
    """

    # One implementation for both backends (_TwoPartWrites); bound here so each class documents them.
    add_old, add, remove = _TwoPartWrites.add_old, _TwoPartWrites.add, _TwoPartWrites.remove

    def __init__(self, dim_old: int, dim_new: int, old_index: str = "Flat", new_index: str = "Flat", psi=None,
                 chunk_rows: int = CHUNK_ROWS, score_maps=None):
        self.dim_old = _check_dim("dim_old", dim_old)
        self.dim_new = _check_dim("dim_new", dim_new)
        self.chunk_rows = _check_dim("chunk_rows", chunk_rows, "rows per storage chunk")
        self._parts = {"old": _make_part("old", self.dim_old, _check_spec("old_index", old_index), self.chunk_rows),
                       "new": _make_part("new", self.dim_new, _check_spec("new_index", new_index), self.chunk_rows)}
        self.psi = _check_psi(psi)
        self.score_maps = score_maps
        self._lock = _RWLock()
        # Which items exist and where: every stored id once, ascending, and whether it is stored
        # new. A backfill only flips flags in place, so moving items allocates nothing of the
        # gallery's size (two sorted id arrays, one per part, were rewritten by every batch).
        self._ids = np.empty(0, dtype=np.int64)
        self._in_new = np.empty(0, dtype=bool)
        self._n_new = 0

    # ---- state -------------------------------------------------------------------------------

    @property
    def psi(self):
        """The attached reverse transformation ``ψ̂`` (or None); checked when set.

        Setting it to an object without a ``transform`` method raises ``TypeError``.
        """
        return self._psi

    @psi.setter
    def psi(self, value):
        self._psi = _check_psi(value)

    @property
    def score_maps(self):
        """The calibration of the merged search: ``{"old": ScoreMap, "new": ScoreMap}`` or None.

        With maps, each part's scores are mapped onto one scale before the two lists are merged
        (calibrated rank merge, or a calibrated ψ merge), and :meth:`search` returns the mapped
        scores. Each map is increasing, so the ranking within a part is unchanged. Fit them with
        :func:`backfill_lib.calibration.fit_score_map` on each space's training embeddings; a
        label-free method (``"znorm"``, ``"neighbours"``) needs no labels. The old part's map is
        of the scores the old part is searched with: ``ψ̂(φ_n(q))·φ_o(g)`` when ``psi`` serves,
        ``φ_o(q)·φ_o(g)`` under rank merge. Setting anything else raises ``TypeError``.
        """
        return self._score_maps

    @score_maps.setter
    def score_maps(self, value):
        self._score_maps = _check_score_maps(value)

    @property
    def n_old(self) -> int:
        """Number of items stored old."""
        return len(self._ids) - self._n_new

    @property
    def n_new(self) -> int:
        """Number of items stored new."""
        return self._n_new

    @property
    def ntotal(self) -> int:
        """Number of items stored (old and new)."""
        return self.n_old + self.n_new

    def __len__(self) -> int:
        return self.ntotal

    @property
    def progress(self) -> float:
        """Share of the items stored new, in [0, 1] (the backfill ratio ``r``; 0 when empty)."""
        with self._lock.read():
            total = self.ntotal
            return self.n_new / total if total else 0.0

    def old_ids(self) -> np.ndarray:
        """Ids of the items still stored old, ascending (what a backfill job has left to do).

        Returns
        -------
        array of int64
            A copy; later writes do not change it.
        """
        with self._lock.read():
            return self._ids[~self._in_new]

    def new_ids(self) -> np.ndarray:
        """Ids of the items stored new, ascending.

        Returns
        -------
        array of int64
            A copy; later writes do not change it.
        """
        with self._lock.read():
            return self._ids[self._in_new]

    # ---- training and parameters ---------------------------------------------------------------

    def train_old(self, vectors) -> None:
        """Train the old part (IVF and other trained types) on representative old vectors.

        Parameters
        ----------
        vectors : array (n, dim_old)
            Unit-norm old vectors, e.g. a sample of the gallery; ``n`` at least the number of
            IVF lists (faiss advises 39 per list).

        Raises
        ------
        ValueError
            If the vectors are not finite unit-norm ``dim_old`` rows, the part already holds
            vectors, or faiss cannot train on them.
        """
        self._train("old", as_embeddings(vectors, "vectors", dim=self.dim_old, unit_norm=True))

    def train_new(self, vectors) -> None:
        """Train the new part (IVF and other trained types) on representative new vectors.

        Parameters
        ----------
        vectors : array (n, dim_new)
            Unit-norm new vectors; ``n`` at least the number of IVF lists.

        Raises
        ------
        ValueError
            If the vectors are not finite unit-norm ``dim_new`` rows, the part already holds
            vectors, or faiss cannot train on them.
        """
        self._train("new", as_embeddings(vectors, "vectors", dim=self.dim_new, unit_norm=True))

    def _train(self, name: str, x: np.ndarray) -> None:
        with self._lock.write():
            part = self._parts[name]
            if part.ntotal:
                raise ValueError(f"the {name} part already holds {part.ntotal} vectors: train it before adding")
            part.train(x)

    def set_search_params(self, part: str = "both", **params) -> None:
        """Set faiss search parameters of one or both parts, e.g. ``nprobe=32`` or ``efSearch=64``.

        Every value is checked before any is set: a bad one leaves the parameters as they were.

        Parameters
        ----------
        part : {"both", "old", "new"}, default "both"
            Which part to set them on. With ``"both"``, each parameter is set on the parts whose
            type has it (``nprobe`` on an IVF old part and not on an HNSW new part).
        **params
            ``nprobe``: IVF parts, an integer from 1 to the part's number of lists (``nlist``).
            ``efSearch``: HNSW parts, an integer of at least 1; a search that asks a part for
            more results than ``efSearch`` runs with ``efSearch`` raised to that number (an HNSW
            search keeps ``efSearch`` candidates, so a smaller value would return fewer results).

        Raises
        ------
        TypeError
            If a value is not an integer.
        ValueError
            If ``part`` is unknown, a parameter is not one of the part's type (or of either
            part's, with ``"both"``), or a value is out of range.
        """
        if not isinstance(part, str) or part not in ("both",) + PARTS:
            raise ValueError(f"part must be 'both', 'old' or 'new', got {part!r}")
        names = PARTS if part == "both" else (part,)
        with self._lock.write():
            todo = []
            for key, value in params.items():
                parts = [self._parts[n] for n in names if self._parts[n].param_range(key) is not None]
                if not parts:  # the error of the (first) part asked
                    _check_search_param(self._parts[names[0]], key, value)
                todo += [(p, key, _check_search_param(p, key, value)) for p in parts]
            for p, key, value in todo:
                p.set_param(key, value)

    def compact(self) -> None:
        """Rebuild the parts that hold memory for items no longer in them, to free it.

        HNSW parts keep tombstones (removed or backfilled items): searches skip them anyway;
        compacting frees their memory, speeds up searches of a part that has lost most of its
        items, and lets a removed id be stored in that part again. A flat-codes part (Flat, SQ,
        PQ) gives memory back by itself as it loses items; compacting frees the spare rows of
        its last chunk (less than one chunk). An ``IVF<nlist>,Flat`` part also follows its size
        (within a sixteenth per list); compacting rebuilds every list at its size. Other IVF parts
        are left as they are: a removal compacts each inverted list in place, but faiss keeps
        the largest allocation of every list (and offers no way to shrink one). Writes wait
        while it runs; searches too.
        """
        with self._lock.write():
            for part in self._parts.values():
                part.compact()

    # ---- writes --------------------------------------------------------------------------------

    def _locate(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(pos, in_old, in_new)``: each id's place in ``_ids`` (valid where stored) and two masks."""
        if not len(self._ids):
            none = np.zeros(len(ids), dtype=bool)
            return np.zeros(len(ids), dtype=np.intp), none, none.copy()
        pos = np.searchsorted(self._ids, ids)
        pos[pos == len(self._ids)] = 0
        found = self._ids[pos] == ids
        in_new = found & self._in_new[pos]
        return pos, found & ~in_new, in_new

    def _check_new_ids(self, ids: np.ndarray, part: str, name: str = "ids") -> None:
        check_no_repeats(ids, name, "each item is stored once")
        _, in_old, in_new = self._locate(ids)
        present = ids[in_old | in_new]
        if len(present):
            raise ValueError(f"{name} {present[:5].tolist()} are already in the index: remove them first "
                             "(or backfill them, to replace an old vector)")
        dead = ids[_isin_sorted(ids, self._parts[part].tombs)]
        if len(dead):
            raise ValueError(f"{name} {dead[:5].tolist()} were removed from the {part} part ({self._parts[part].spec!r}), "
                             "which keeps tombstones: call compact() before storing them there again")

    def _add(self, part: str, ids, x: np.ndarray) -> None:
        ids = _as_ids(ids, len(x))
        with self._lock.write():
            self._check_new_ids(ids, part)
            # The new bookkeeping arrays first: if memory runs out, nothing has changed.
            ascending = np.sort(ids)
            at = np.searchsorted(self._ids, ascending)
            all_ids = np.insert(self._ids, at, ascending)
            in_new = np.insert(self._in_new, at, part == "new")
            self._parts[part].add(ids, x)
            self._ids, self._in_new = all_ids, in_new
            self._n_new += len(ids) if part == "new" else 0

    def backfill(self, ids, new_vectors) -> None:
        """Move items from the old part to the new one: one step of the backfill, all or nothing.

        Parameters
        ----------
        ids : array of n ints
            Ids of items stored old, each once.
        new_vectors : array (n, dim_new)
            Their new vectors (``φ_n(g)`` or ``ρ̂(φ_n(g))``), unit-norm rows.

        Raises
        ------
        TypeError
            If ``ids`` is not integer or ``new_vectors`` is not numeric.
        ValueError
            If ``new_vectors`` is not ``n`` finite unit-norm rows of width ``dim_new``, or
            ``ids`` repeats an id, or names an item that is unknown or already backfilled. The
            index is then unchanged.
        """
        x = as_embeddings(new_vectors, "new_vectors", dim=self.dim_new, unit_norm=True)
        ids = _as_ids(ids, len(x))
        with self._lock.write():
            check_no_repeats(ids, "ids", "each item is backfilled once")
            pos, in_old, in_new = self._locate(ids)
            if in_new.any():
                raise ValueError(f"ids {ids[in_new][:5].tolist()} are already backfilled (stored new)")
            if not in_old.all():
                raise ValueError(f"ids {ids[~in_old][:5].tolist()} are not in the index")
            old, new = self._parts["old"], self._parts["new"]
            dead = ids[_isin_sorted(ids, new.tombs)]
            if len(dead):
                raise ValueError(f"ids {dead[:5].tolist()} were removed from the new part before; call compact() first")
            # New first, then old: if removing failed, the batch is taken back out of the new part.
            new.add(ids, x)
            try:
                old.remove(ids)
            except BaseException:
                new.remove(ids)
                raise
            self._in_new[pos] = True  # in place: nothing allocated
            self._n_new += len(ids)

    def _remove(self, ids: np.ndarray) -> None:
        pos, in_old, in_new = self._locate(ids)
        unknown = ids[~(in_old | in_new)]
        if len(unknown):
            raise ValueError(f"ids {unknown[:5].tolist()} are not in the index")
        keep = np.ones(len(self._ids), dtype=bool)
        keep[pos] = False
        all_ids, flags = self._ids[keep], self._in_new[keep]
        for name, mask in zip(PARTS, (in_old, in_new)):
            if mask.any():
                self._parts[name].remove(ids[mask])
        self._ids, self._in_new = all_ids, flags
        self._n_new -= int(in_new.sum())

    # ---- search --------------------------------------------------------------------------------

    def search(self, query_new, k: int, query_old=None) -> tuple[np.ndarray, np.ndarray]:
        """Merged top-``k`` over both parts: ``(scores, ids)``, best first, ties by smaller id.

        Items stored new are scored against ``query_new``; items stored old against
        ``query_old`` if it is given (rank merge), else against ``psi.transform(query_new)``
        (reverse transformation). When no item is stored old, neither is needed.

        Parameters
        ----------
        query_new : array (n_q, dim_new)
            New-model query vectors, unit-norm rows.
        k : int
            Results per query, from 1 to :attr:`ntotal`.
        query_old : array (n_q, dim_old), optional
            Old-model query vectors, unit-norm rows; takes precedence over an attached ``psi``.

        Returns
        -------
        scores : array (n_q, k) of float32
            Merged scores, descending (``-inf`` where an approximate part returned fewer items).
        ids : array (n_q, k) of int64
            Ids of the results (``-1`` with the ``-inf`` scores).

        Raises
        ------
        TypeError
            If a query is not numeric or ``k`` is not an integer.
        ValueError
            If a query is not finite unit-norm rows of its dimension, the queries have different
            numbers of rows, ``k`` is out of range, items are stored old but neither ``query_old``
            nor ``psi`` is given, or ``psi`` returns rows of the wrong shape or norm.
        """
        qn = as_embeddings(query_new, "query_new", dim=self.dim_new, unit_norm=True)
        qo = None
        if query_old is not None:
            qo = as_embeddings(query_old, "query_old", dim=self.dim_old, unit_norm=True)
            if len(qo) != len(qn):
                raise ValueError(f"query_old has {len(qo)} rows but query_new has {len(qn)}: one of each per query")
        elif self.psi is not None:
            # ψ̂ runs outside the lock: it is the query's own work, not the index's.
            qo = as_embeddings(self.psi.transform(qn), "psi.transform(query_new)", dim=self.dim_old, unit_norm=True)
            if len(qo) != len(qn):
                raise ValueError(f"psi.transform returned {len(qo)} rows for {len(qn)} queries")
        with self._lock.read():
            k = check_k(k, self.ntotal)
            if self.n_old and qo is None:
                raise ValueError(f"{self.n_old} items are stored old: give query_old (rank merge) or attach a "
                                 "fitted reverse transformation psi to the index (index.psi = ReverseTransform(...).fit(...))")
            queries = {"old": qo, "new": qn}
            maps = self.score_maps or {}
            return self._merged_search([(self._parts[n], queries[n], maps.get(n)) for n in PARTS
                                        if self._parts[n].count], k)

    def _merged_search(self, parts, k: int):
        # Each part is one faiss index or a list of chunks: one top-k list per index, all merged
        # (each list's scores first mapped onto the calibrated scale, when the index has maps).
        return _merged_topk([(_calibrated(src.search, score_map), size, q) for part, q, score_map in parts
                             for src, size in part.sources()], k)

    # ---- persistence ---------------------------------------------------------------------------

    def save(self, path) -> None:
        """Write the index (both parts, ids, tombstones and ``psi``) to one file, crash-safely.

        The file is written under a temporary name in the same directory (holding this
        process's id), flushed to disk (``fsync``) and renamed over ``path`` in one step, so a
        crash at any moment leaves either the previous file or the new one, never a partial
        one. Temporary files of ``path`` left by a killed save are removed by the next save or
        load of ``path`` (only those whose writing process is gone). Searches may run during a
        save; writes wait for it. Nothing else is written: ``psi`` is serialized in memory (or
        in a private system temporary folder, for a class with only ``save(path)``).

        Parameters
        ----------
        path : str or os.PathLike
            File to write (its directory must exist).

        Raises
        ------
        TypeError
            If ``path`` is not a path, or the attached ``psi`` cannot be loaded back: its class
            must be registered with :func:`backfill_lib.transforms.register_transform` (the
            library's transforms are). A class defined in ``__main__`` is saved with a warning:
            the file loads only where that class is registered again.
        FileNotFoundError
            If the directory of ``path`` does not exist.
        IsADirectoryError
            If ``path`` is a directory.
        """
        path = check_path(path)
        psi_bytes, psi_class = _psi_payload(self.psi)
        with self._lock.read():
            arrays = {}
            header = {"magic": FILE_MAGIC, "version": FILE_VERSION, "dim_old": self.dim_old,
                      "dim_new": self.dim_new, "chunk_rows": self.chunk_rows, "psi_class": psi_class}
            if self.score_maps is not None:
                header["score_maps"] = {n: [m.scale, m.offset, m.method, m.n_pairs] for n, m in self.score_maps.items()}
            for name, part in self._parts.items():
                header[f"{name}_index"] = part.spec
                header[f"{name}_params"] = part.params
                part_header, part_arrays = part.state()
                header.update({f"{name}_{key}": value for key, value in part_header.items()})
                arrays.update({f"{name}_{key}": value for key, value in part_arrays.items()})
                arrays[f"{name}_ids"] = self._ids[self._in_new == (name == "new")]
            if psi_bytes is not None:
                arrays["psi"] = np.frombuffer(psi_bytes, dtype=np.uint8)
            # Hashed and written inside the lock: chunk codes and IVF lists are views of the faiss
            # storage (hashed in place, written without a copy).
            arrays = _seal(header, arrays)
            _atomic_write(path, lambda f: np.savez(f, **arrays))

    @classmethod
    def load(cls, path) -> "OnlineBackfillIndex":
        """Read an index written by :meth:`save`, with its ``psi``.

        Loading runs no code named by the file and writes nothing (it removes the temporary
        files of killed saves of ``path``, see :meth:`save`). Every field is checked against
        the arrays: each part's ids are exactly the ids its faiss storage holds, the index
        types, dimensions, counts, search parameters and (for exact parts) the stored vectors
        fit, so a file that loads searches only items it holds; anything else is refused. The
        ``psi`` class named in the file is looked up among registered transforms
        (:func:`backfill_lib.transforms.register_transform`), never imported.

        A file of format 4 (written by this version) is first checked against its checksums
        (SHA-256 of every array and of the header): a damaged file is refused before any of it
        is interpreted or handed to faiss, so it loads as the index that was saved or not at
        all. Files of formats 1 to 3 load without that check, with a warning.

        Parameters
        ----------
        path : str or os.PathLike
            File written by :meth:`save`.

        Returns
        -------
        OnlineBackfillIndex
            The index as it was saved.

        Raises
        ------
        TypeError
            If ``path`` is not a path.
        FileNotFoundError
            If ``path`` does not exist.
        IsADirectoryError
            If ``path`` is a directory.
        ValueError
            If ``path`` is not a file written by :meth:`save`, is damaged (``'<path>' is
            damaged: <array> does not match the checksum stored with it; ...``) or altered, or
            names a ``psi`` class that is not registered.

        Warns
        -----
        UserWarning
            When the file was written in format 1 to 3, before checksums: it loads, but damage
            cannot be detected; save it again to add a checksum.
        """
        path = check_path(path)
        if os.path.isdir(path):
            raise IsADirectoryError(f"path {path!r} is a directory, not an index file written by OnlineBackfillIndex.save")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no index file at {path!r}")
        _remove_stale_temps(path)
        not_index = f"{path!r} is not an OnlineBackfillIndex file (written by OnlineBackfillIndex.save)"
        reading = None  # the array being read
        try:
            data = np.load(path, allow_pickle=False)
            if not isinstance(data, np.lib.npyio.NpzFile):
                raise ValueError(f"it holds one numpy array of shape {data.shape} (a .npy file), not an index")
            arrays = {}
            with data:
                for reading in data.files:
                    arrays[reading] = data[reading]
            reading = None
            header_bytes = _bytes_array(arrays["header"], "header")
        except zipfile.BadZipFile as exc:
            if reading is not None and "CRC" in str(exc):  # the zip container's CRC-32 of that array
                raise ValueError(_damaged(path, reading)) from None
            raise ValueError(f"{not_index}: {type(exc).__name__}: {exc}") from None
        except Exception as exc:
            raise ValueError(f"{not_index}: {type(exc).__name__}: {exc}") from None
        # Format 4: the header is checked against its own checksum before it is read, and every
        # other array against the checksum the header holds for it before any is interpreted.
        sealed = HEADER_CHECKSUM in arrays
        if sealed:
            stored = arrays[HEADER_CHECKSUM]
            digest = bytes.fromhex(_array_digest("header", header_bytes))
            if stored.dtype != np.uint8 or stored.ndim != 1 or stored.tobytes() != digest:
                raise ValueError(_damaged(path, "header"))
        try:
            header = json.loads(header_bytes.tobytes().decode())
        except Exception as exc:
            raise ValueError(f"{not_index}: {type(exc).__name__}: {exc}") from None
        if not isinstance(header, dict) or header.get("magic") != FILE_MAGIC:
            raise ValueError(not_index)
        version = header.get("version")
        if type(version) is not int or not 1 <= version <= FILE_VERSION:
            raise ValueError(f"{path!r} has index format version {version!r}; this library reads 1 to {FILE_VERSION}")
        if version >= 4:
            if not sealed:
                raise ValueError(_damaged(path, HEADER_CHECKSUM, "the array is missing"))
            _check_digests(path, header, arrays)
        elif sealed:
            raise ValueError(_damaged(path, "header", f"format version {version} has no {HEADER_CHECKSUM}"))
        else:
            warnings.warn(f"{path!r} was written in index format version {version}, without a checksum: damage to "
                          "it cannot be detected; save it again (OnlineBackfillIndex.save) to add one",
                          UserWarning, stacklevel=2)
        damaged = f"{path!r} is not a valid OnlineBackfillIndex file (damaged or altered)"
        try:
            index = cls._from_arrays(header, arrays, version)
        except _BadFile as exc:
            raise ValueError(f"{damaged}: {exc}") from None
        if "score_maps" in header:
            from .calibration import ScoreMap

            try:
                index.score_maps = {n: ScoreMap(float(v[0]), float(v[1]), str(v[2]), int(v[3]))
                                    for n, v in header["score_maps"].items()}
            except Exception as exc:
                raise ValueError(f"{damaged}: score_maps: {exc}") from None
        psi_class = header.get("psi_class")
        if psi_class is not None:
            if not isinstance(psi_class, str) or "psi" not in arrays:
                raise ValueError(f"{damaged}: psi_class {psi_class!r} without a stored psi")
            index.psi = _load_psi(psi_class, arrays["psi"], damaged)
        elif "psi" in arrays:
            raise ValueError(f"{damaged}: a stored psi without its class")
        return index

    @classmethod
    def _from_arrays(cls, header: dict, arrays: dict, version: int) -> "OnlineBackfillIndex":
        """The index a file's header and arrays describe, every field checked (``_BadFile`` if not)."""
        for key in ("dim_old", "dim_new", "chunk_rows"):
            value = header.get(key, CHUNK_ROWS if key == "chunk_rows" else None)
            if type(value) is not int or value < 1:
                raise _BadFile(f"{key} is {value!r}, not a positive integer")
        for key in ("old_index", "new_index"):
            if not isinstance(header.get(key), str):
                raise _BadFile(f"{key} is {header.get(key)!r}, not a faiss factory string")
        try:
            index = cls(header["dim_old"], header["dim_new"], header["old_index"], header["new_index"],
                        chunk_rows=header.get("chunk_rows", CHUNK_ROWS))
        except (TypeError, ValueError) as exc:
            raise _BadFile(str(exc)) from None
        part_ids = {}
        for name, part in index._parts.items():
            part_header = {key[len(name) + 1:]: value for key, value in header.items() if key.startswith(f"{name}_")}
            part_arrays = {key[len(name) + 1:]: value for key, value in arrays.items() if key.startswith(f"{name}_")}
            where = f"the {name} part ({part.spec!r})"
            if version > 1 and part_header.get("layout") != _layout(part, version):
                raise _BadFile(f"{where}: layout {part_header.get('layout')!r} does not fit its index type")
            if "chunk_rows" in part_header and part_header["chunk_rows"] != index.chunk_rows:
                raise _BadFile(f"{where}: chunk_rows {part_header['chunk_rows']!r} is not the index's {index.chunk_rows}")
            params = part_header.get("params", {})
            if not isinstance(params, dict):
                raise _BadFile(f"{where}: params {params!r} is not a mapping")
            try:
                params = {key: _check_search_param(part, key, value) for key, value in params.items()}
            except (TypeError, ValueError) as exc:
                raise _BadFile(f"{where}: {exc}") from None
            part.params = dict(params)  # set on the chunks and views that restore() makes
            try:
                part.restore(part_header, part_arrays, version)
                ids = _id_array(part_arrays["ids"], f"{name}_ids")
                held = part.held_ids()
            except (RuntimeError, KeyError, ValueError, TypeError, AttributeError, IndexError) as exc:
                message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
                raise _BadFile(f"{where} cannot be read ({type(exc).__name__}: {message})") from None
            for key, value in params.items():
                part.set_param(key, value)  # over what the stored faiss index carried
            tombs = part.tombs
            dup = repeated(held)
            if len(dup):
                raise _BadFile(f"{where}: its faiss storage holds ids {dup[:5].tolist()} twice")
            if len(held) != len(ids) + len(tombs) or not np.array_equal(np.sort(held), np.sort(np.r_[ids, tombs])):
                raise _BadFile(f"{where}: its {len(ids)} ids (and {len(tombs)} tombstones) are not the "
                               f"{len(held)} ids its faiss storage holds")
            part_ids[name] = ids
        all_ids = np.concatenate([part_ids["old"], part_ids["new"]])
        order = np.argsort(all_ids, kind="stable")
        index._ids = all_ids[order]
        index._in_new = (order >= len(part_ids["old"]))
        index._n_new = len(part_ids["new"])
        dup = repeated(index._ids)
        if len(dup):
            raise _BadFile(f"ids {dup[:5].tolist()} are stored twice")
        return index


class _BadFile(Exception):
    """A file that does not describe a valid index (turned into a ``ValueError`` naming the file)."""


def _layout(part, version: int) -> str:
    """The layout a part of this type has in a file of format ``version`` (2 or later)."""
    if isinstance(part, _ChunkedPart):
        return "chunks"
    if isinstance(part, _IVFListsPart) and version >= 3:
        return part.LAYOUT
    return "single"  # before format 3, an IVF-Flat part was one faiss index too


def _isin_sorted(values: np.ndarray, sorted_array: np.ndarray) -> np.ndarray:
    """``np.isin(values, sorted_array)`` by binary search (the live ids are kept sorted)."""
    if not len(sorted_array):
        return np.zeros(len(values), dtype=bool)
    pos = np.searchsorted(sorted_array, values)
    pos[pos == len(sorted_array)] = 0
    return sorted_array[pos] == values


def _psi_payload(psi) -> tuple:
    """``(bytes, registered class name)`` of ``psi`` for :meth:`OnlineBackfillIndex.save` (None, None without one).

    Refuses a class that is not registered (the file could not be loaded back) and warns for a
    class defined in ``__main__`` (the file then loads only where it is registered again).
    """
    if psi is None:
        return None, None
    from . import transforms

    cls = type(psi)
    name = transforms.transform_name(cls)
    if name is None:
        raise TypeError(f"psi ({cls.__module__}.{cls.__qualname__}) cannot be saved with the index: its class is not "
                        f"registered, so the file could not be loaded back (loading never imports code named in a "
                        f"file). Register it first: backfill_lib.transforms.register_transform({cls.__qualname__}) "
                        f"(the class needs to_bytes() and a class method from_bytes(data), or save(path) and a "
                        f"class method load(path)); or set index.psi = None to save the index without it")
    if cls.__module__ == "__main__":
        warnings.warn(f"psi's class {cls.__qualname__} is defined in __main__ (a script or notebook): the index file "
                      f"loads only in a process that registers it again first, with backfill_lib.transforms."
                      f"register_transform({cls.__qualname__}, name={name!r}); define it in a module to avoid this",
                      UserWarning, stacklevel=3)
    if callable(getattr(psi, "to_bytes", None)) and callable(getattr(cls, "from_bytes", None)):
        data = psi.to_bytes()
    else:  # a class with save(path) / load(path): a private folder in the system's temp, not the index's
        with tempfile.TemporaryDirectory(prefix="backfill_psi-") as folder:
            file = os.path.join(folder, "psi")
            psi.save(file)
            if not os.path.isfile(file):
                raise TypeError(f"psi.save({file!r}) wrote no file at that path: {cls.__qualname__}.save must write "
                                "the path it is given")
            with open(file, "rb") as f:
                data = f.read()
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"psi.to_bytes() returned {type(data).__name__}, not bytes")
    return bytes(data), name


def _load_psi(name: str, payload: np.ndarray, damaged: str):
    """The ``psi`` a file stores, by its class registered under ``name`` (never imported by name)."""
    from . import transforms

    try:
        cls = transforms.transform_class(name)
    except ValueError:
        raise ValueError(f"the index file stores psi of class {name!r}, which is not a registered transform: loading "
                         f"never imports a module named in a file (that would run code from the file). If you trust "
                         f"the file and have that class, call backfill_lib.transforms.register_transform(TheClass, "
                         f"name={name!r}) before OnlineBackfillIndex.load") from None
    if payload.dtype != np.uint8 or payload.ndim != 1:
        raise ValueError(f"{damaged}: psi is {payload.dtype} {payload.shape}, not serialized bytes")
    data = payload.tobytes()
    try:
        if callable(getattr(cls, "from_bytes", None)):
            psi = cls.from_bytes(data)
        else:  # a class with only load(path): a private folder in the system's temp, not the index's
            with tempfile.TemporaryDirectory(prefix="backfill_psi-") as folder:
                file = os.path.join(folder, "psi")
                with open(file, "wb") as f:
                    f.write(data)
                psi = cls.load(file)
    except Exception as exc:
        raise ValueError(f"{damaged}: its psi ({name}) cannot be read ({type(exc).__name__}: {exc})") from None
    if not isinstance(psi, cls) or not callable(getattr(psi, "transform", None)):
        raise ValueError(f"{damaged}: its psi was read as a {type(psi).__name__}, not the {name} its header names")
    return psi


#: Temporary files of a path written by another version of this library (no writer id in their
#: name) are removed once left unmodified this long (seconds): a live writer changes its file as
#: it writes, and no save stalls for an hour.
LEGACY_TEMP_AGE = 3600
_HOST = format(zlib.crc32(socket.gethostname().encode()), "08x")


def _temp_name(path: str) -> str:
    """``.<name>.<host>-<pid>.<random>.tmp`` beside ``path``: its writer can be told alive or gone."""
    directory, base = os.path.split(os.path.abspath(path))
    return os.path.join(directory, f".{base}.{_HOST}-{os.getpid()}.{uuid.uuid4().hex}.tmp")


def _process_alive(pid: int) -> bool:
    if pid <= 0 or pid == os.getpid() or os.name != "posix":
        return True  # not a process id, this process (another thread's save), or no safe probe: kept
    try:
        os.kill(pid, 0)  # signal 0: nothing is sent, only whether the process exists
    except ProcessLookupError:
        return False
    except (OSError, OverflowError, ValueError):
        return True  # exists (another user's) or unknown: kept
    return True


def _remove_stale_temps(path: str) -> list:
    """Remove the temporary files of ``path`` that a killed save left; returns their paths.

    A temporary file is removed only when it cannot belong to a save still running: written on
    this host by a process that no longer exists (its pid, a kill's leftover), or with a name
    from before writers put their pid in it and unmodified for :data:`LEGACY_TEMP_AGE`. A
    running save's file (this process or another, this host or another) is never touched.
    Errors are ignored: a folder that cannot be listed or written (read-only) keeps its files.
    """
    directory, base = os.path.split(os.path.abspath(path))
    pattern = re.compile(r"\." + re.escape(base) + r"\.(?:([0-9a-f]{8})-([0-9]{1,10})\.)?[0-9a-f]{32}\.tmp\Z")
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    removed = []
    for name in names:
        match = pattern.match(name)
        if match is None:
            continue
        full = os.path.join(directory, name)
        host, pid = match.groups()
        try:
            if host is None:
                stale = time.time() - os.stat(full).st_mtime > LEGACY_TEMP_AGE
            else:
                stale = host == _HOST and not _process_alive(int(pid))
            if stale:
                os.remove(full)
                removed.append(full)
        except OSError:
            pass
    return removed


def _atomic_write(path: str, write) -> None:
    """Write a file under a temporary name, fsync it, rename it over ``path``, fsync the directory.

    Temporary files of ``path`` left by killed writers are removed first (:func:`_remove_stale_temps`).
    """
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"cannot write {path!r}: its folder {directory!r} does not exist (create it first)")
    if os.path.isdir(path):
        raise IsADirectoryError(f"cannot write {path!r}: it is a directory; give a file path, e.g. "
                                f"{os.path.join(path, 'index.npz')!r}")
    _remove_stale_temps(path)
    tmp = _temp_name(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    # The rename itself is durable only once the directory entry is on disk.
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
