"""The storage layouts of a part (the old or the new sub-index of a live index) and their faiss helpers.

Each part is built by ``faiss.index_factory(dim, spec, METRIC_INNER_PRODUCT)`` and held in one
of three layouts, chosen by its index type:

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
  with :meth:`backfill_lib.live_index.OnlineBackfillIndex.train_old` /
  :meth:`~backfill_lib.live_index.OnlineBackfillIndex.train_new` or on the first batch added to
  that part (it must then hold at least ``nlist`` vectors). Approximate: raise ``nprobe`` with
  :meth:`~backfill_lib.live_index.OnlineBackfillIndex.set_search_params`. One faiss index would
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
  *tombstones*, filtered out of every search with a faiss ``IDSelector``;
  :meth:`~backfill_lib.live_index.OnlineBackfillIndex.compact` rebuilds the part without them
  (and must run before a removed id is stored in that part again). One graph per part, so the
  memory of an HNSW part is its largest size until ``compact()``. A search runs with
  ``efSearch`` at least the number of results asked, and a query that a search skipping
  tombstones left short of them is searched again with a wider beam.

Other types faiss can build (``Refine`` wrappers, NSG, a transform in front of HNSW, ...) are
refused when the index is made (:data:`SUPPORTED_TYPES`): a part must add with ids, search and
remove.

Every layout has the same methods (``add``, ``remove``, ``sources`` for the merged search,
``set_param``, ``compact``, and ``state`` / ``restore`` / ``held_ids`` for
:mod:`backfill_lib.live_index.fileformat`), so the index does not know which one it holds.
"""

from __future__ import annotations

import faiss
import numpy as np

from ..validation import UNIT_NORM_TOL

#: Default rows per storage chunk of a flat-codes part (``chunk_rows`` of
#: :class:`backfill_lib.live_index.OnlineBackfillIndex`).
CHUNK_ROWS = 1 << 13


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

    def read(self, ids: np.ndarray) -> np.ndarray:
        """The stored vectors of ``ids`` (live items of this part, distinct), float32 rows in their order.

        Reconstructed by faiss from what the index stores: exact for flat storage (HNSW over
        ``Flat``), the decoded codes otherwise (IVF-PQ, IVF-SQ, HNSW over SQ: approximate).
        """
        out = np.empty((len(ids), self.dim), dtype=np.float32)
        if isinstance(self.index, faiss.IndexIDMap):
            rows, where = _positions(faiss.vector_to_array(self.index.id_map), ids)
            if len(rows):
                out[where] = self.index.index.reconstruct_batch(rows.astype(np.int64))
            return out
        ivf = faiss.try_extract_index_ivf(self.index)
        for l in range(ivf.nlist):
            n = ivf.invlists.list_size(l)
            if n:
                offsets, where = _positions(faiss.rev_swig_ptr(ivf.invlists.get_ids(l), n), ids)
                for offset, at in zip(offsets.tolist(), where.tolist()):
                    row = np.empty(self.dim, dtype=np.float32)
                    ivf.reconstruct_from_offset(l, offset, faiss.swig_ptr(row))
                    out[at] = row
        return out

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

    def read(self, ids: np.ndarray) -> np.ndarray:
        """The stored vectors of ``ids`` (items of this part, distinct), float32 rows in their order.

        The codes decoded by faiss (``sa_decode``): the exact vectors for ``Flat`` (its codes are
        the float32 vectors), approximate for the quantised types (SQ, PQ).
        """
        out = np.empty((len(ids), self.dim), dtype=np.float32)
        for chunk in self.chunks:
            rows, where = _positions(chunk.ids[:chunk.n], ids)
            if len(rows):
                out[where] = chunk.index.sa_decode(np.ascontiguousarray(chunk.codes()[rows]))
        return out

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

    def read(self, ids: np.ndarray) -> np.ndarray:
        """The stored vectors of ``ids`` (items of this part, distinct), float32 rows in their order.

        Exact: an ``IndexIVFFlat`` code is the vector's float32 bytes.
        """
        out = np.empty((len(ids), self.dim), dtype=np.float32)
        for l in np.nonzero(self.sizes)[0]:
            held, codes = self._entries(l)
            rows, where = _positions(held, ids)
            if len(rows):
                out[where] = codes[rows].view(np.float32)
        return out

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



def _isin_sorted(values: np.ndarray, sorted_array: np.ndarray) -> np.ndarray:
    """``np.isin(values, sorted_array)`` by binary search (the live ids are kept sorted)."""
    if not len(sorted_array):
        return np.zeros(len(values), dtype=bool)
    pos = np.searchsorted(sorted_array, values)
    pos[pos == len(sorted_array)] = 0
    return sorted_array[pos] == values


def _positions(held: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(rows, where)``: ``held[rows[j]] == ids[where[j]]`` for every id of ``ids`` that ``held`` holds."""
    order = np.argsort(ids, kind="stable")
    wanted = ids[order]
    pos = np.searchsorted(wanted, held)
    pos[pos == len(wanted)] = 0
    hit = np.nonzero(wanted[pos] == held)[0] if len(wanted) else np.empty(0, dtype=np.intp)
    return hit, order[pos[hit]]
