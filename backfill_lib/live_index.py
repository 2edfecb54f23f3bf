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

* ``"Flat"`` (default): exact; supports removal.
* ``"IVF<nlist>,Flat"`` (and other IVF types): must be trained before vectors are stored, either
  with :meth:`OnlineBackfillIndex.train_old` / :meth:`~OnlineBackfillIndex.train_new` or on the
  first batch added to that part (it must then hold at least ``nlist`` vectors). Approximate:
  raise ``nprobe`` with :meth:`~OnlineBackfillIndex.set_search_params`.
* ``"HNSW<M>"``: faiss cannot remove from an HNSW graph, so removed and backfilled items become
  *tombstones*, filtered out of every search with a faiss ``IDSelector``; :meth:`~backfill_lib.live_index.OnlineBackfillIndex.compact`
  rebuilds the part without them (and must run before a removed id is stored in that part again).
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import uuid
from contextlib import contextmanager
from importlib import import_module

import faiss
import numpy as np

from .retrieval import _as_ids, _sorted_topk
from .validation import as_embeddings, check_k

#: Marks a file written by :meth:`OnlineBackfillIndex.save` (with the format version below).
FILE_MAGIC = "backfill_lib.OnlineBackfillIndex"
FILE_VERSION = 1
PARTS = ("old", "new")


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


class _Part:
    """One sub-index: a faiss index with external ids, the sorted live ids and the tombstones."""

    def __init__(self, name: str, dim: int, spec: str):
        self.name, self.dim, self.spec = name, dim, spec
        try:
            base = faiss.index_factory(dim, spec, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as exc:
            raise ValueError(f"{name}_index={spec!r} is not a faiss factory string faiss can build for "
                             f"dim {dim} (e.g. 'Flat', 'IVF256,Flat', 'HNSW32'): {_faiss_message(exc)}") from None
        # IVF stores external ids itself; an IndexIDMap around it would lose track on removal
        # (IVF does not renumber what is left, the id map does). Other types get an IndexIDMap.
        self.index = base if faiss.try_extract_index_ivf(base) is not None else faiss.IndexIDMap(base)
        self.ids = np.empty(0, dtype=np.int64)    # live ids, sorted
        self.tombs = np.empty(0, dtype=np.int64)  # ids still in the faiss index but removed, sorted
        self._selector = None  # (IDSelectorNot, IDSelectorBatch) excluding self.tombs, built on demand
        self.params = {}  # search parameters set on the index, applied again when it is rebuilt
        # Most vectors the faiss index has held since it was built: its storage (a std::vector)
        # keeps that capacity after removals, which compact() gives back.
        self.peak = 0

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
        try:
            self.index.train(x)
        except RuntimeError as exc:
            raise ValueError(f"training the {self.name} part ({self.spec!r}) on {len(x)} vectors failed: "
                             f"{_faiss_message(exc)}; give more training vectors (IVF needs at least nlist)") from None

    def add(self, ids: np.ndarray, x: np.ndarray) -> None:
        if not self.is_trained:
            self.train(x)
        self.index.add_with_ids(x, ids)
        self.ids = np.union1d(self.ids, ids)
        self.peak = max(self.peak, self.index.ntotal)

    def remove(self, ids: np.ndarray) -> None:
        if self.uses_tombstones:
            self.tombs = np.union1d(self.tombs, ids)
            self._selector = None
        else:
            removed = self.index.remove_ids(ids)
            assert removed == len(ids), "faiss removed another number of vectors than asked"
        self.ids = np.setdiff1d(self.ids, ids, assume_unique=True)

    def search(self, q: np.ndarray, k: int):
        if not len(self.tombs):
            return self.index.search(q, k)
        if self._selector is None:
            batch = faiss.IDSelectorBatch(self.tombs)
            self._selector = (faiss.IDSelectorNot(batch), batch)  # the pair keeps `batch` alive
        # A fresh parameter object per call: IndexIDMap swaps the selector in it during a search,
        # so threads must not share one. The selector itself is only read.
        params = faiss.SearchParametersHNSW()
        params.efSearch = self._graph().hnsw.efSearch
        params.sel = self._selector[0]
        return self.index.search(q, k, params=params)

    def set_param(self, key: str, value) -> None:
        try:
            faiss.ParameterSpace().set_index_parameter(self.index, key, value)
        except RuntimeError as exc:
            raise ValueError(f"cannot set {key}={value!r} on the {self.name} part ({self.spec!r}): "
                             f"{_faiss_message(exc)}") from None
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
        self.index, self.ids, self.tombs, self.peak = fresh.index, fresh.ids, fresh.tombs, fresh.peak
        self._selector = None


def _faiss_message(exc: Exception) -> str:
    """The first line of a faiss exception without its C++ file and line."""
    text = str(exc).strip().splitlines()
    line = next((t for t in text if "Error" in t or "error" in t), text[0] if text else "")
    return line.split("Error: ")[-1].strip()


def _check_dim(name: str, d) -> int:
    if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 1:
        raise ValueError(f"{name} must be a positive integer (embedding dimension), got {d!r}")
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


def _merge_by_score_then_id(results, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge ``(scores, ids)`` lists into the top ``k`` by descending score, ties by smaller id.

    The rule of :func:`backfill_lib.retrieval.merge_topk`, without its input checks (the lists
    come from our own searches, on the query path).
    """
    scores = np.concatenate([s for s, _ in results], axis=1)
    ids = np.concatenate([i for _, i in results], axis=1)
    return _sorted_topk(np.where(ids < 0, -np.inf, scores), ids, k)


class OnlineBackfillIndex:
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
        :class:`backfill_lib.transforms.ReverseTransform`. Saved with the index if it also has
        ``save(path)`` and a class method ``load(path)``.

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
        If a dimension is not a positive integer or faiss cannot build a factory string.

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

    def __init__(self, dim_old: int, dim_new: int, old_index: str = "Flat", new_index: str = "Flat", psi=None):
        self.dim_old = _check_dim("dim_old", dim_old)
        self.dim_new = _check_dim("dim_new", dim_new)
        self._parts = {"old": _Part("old", self.dim_old, _check_spec("old_index", old_index)),
                       "new": _Part("new", self.dim_new, _check_spec("new_index", new_index))}
        self.psi = _check_psi(psi)
        self._lock = _RWLock()

    # ---- state -------------------------------------------------------------------------------

    @property
    def n_old(self) -> int:
        """Number of items stored old."""
        return len(self._parts["old"].ids)

    @property
    def n_new(self) -> int:
        """Number of items stored new."""
        return len(self._parts["new"].ids)

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
            return self._parts["old"].ids.copy()

    def new_ids(self) -> np.ndarray:
        """Ids of the items stored new, ascending.

        Returns
        -------
        array of int64
            A copy; later writes do not change it.
        """
        with self._lock.read():
            return self._parts["new"].ids.copy()

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
            if part.index.ntotal:
                raise ValueError(f"the {name} part already holds {part.index.ntotal} vectors: train it before adding")
            part.train(x)

    def set_search_params(self, part: str = "both", **params) -> None:
        """Set faiss search parameters of one or both parts, e.g. ``nprobe=32`` or ``efSearch=64``.

        Parameters
        ----------
        part : {"both", "old", "new"}, default "both"
            Which part to set them on.
        **params
            faiss ``ParameterSpace`` names and values (``nprobe`` for IVF, ``efSearch`` for HNSW).

        Raises
        ------
        ValueError
            If ``part`` is unknown or faiss does not know a parameter for that index type.
        """
        names = PARTS if part == "both" else (part,)
        if any(n not in PARTS for n in names):
            raise ValueError(f"part must be 'both', 'old' or 'new', got {part!r}")
        with self._lock.write():
            for n in names:
                for key, value in params.items():
                    self._parts[n].set_param(key, value)

    def compact(self) -> None:
        """Rebuild the parts that hold memory for items no longer in them, to free it.

        HNSW parts keep tombstones (removed or backfilled items): searches skip them anyway;
        compacting frees their memory, speeds up searches of a part that has lost most of its
        items, and lets a removed id be stored in that part again. A flat part frees removed
        vectors, but its storage keeps its largest size; compacting gives the rest back (worth it
        once the backfill is done, for the emptied old part). Parts of types that need training
        (IVF, PQ) are left as they are. Writes wait while it runs; searches too.
        """
        with self._lock.write():
            for part in self._parts.values():
                part.compact()

    # ---- writes --------------------------------------------------------------------------------

    def _where(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Boolean masks: which ids are stored old, which new."""
        return tuple(_isin_sorted(ids, self._parts[n].ids) for n in PARTS)

    def _check_new_ids(self, ids: np.ndarray, part: str, name: str = "ids") -> None:
        if len(np.unique(ids)) != len(ids):
            raise ValueError(f"{name} must not repeat: each item is stored once")
        in_old, in_new = self._where(ids)
        present = ids[in_old | in_new]
        if len(present):
            raise ValueError(f"{name} {present[:5].tolist()} are already in the index: remove them first "
                             "(or backfill them, to replace an old vector)")
        dead = ids[_isin_sorted(ids, self._parts[part].tombs)]
        if len(dead):
            raise ValueError(f"{name} {dead[:5].tolist()} were removed from the {part} part ({self._parts[part].spec!r}), "
                             "which keeps tombstones: call compact() before storing them there again")

    def add_old(self, ids, vectors) -> None:
        """Store items as old vectors (items that arrived before the switch to the new model).

        Parameters
        ----------
        ids : array of n non-negative ints
            New ids, none already in the index.
        vectors : array (n, dim_old)
            Their old vectors, unit-norm rows.

        Raises
        ------
        TypeError
            If ``ids`` is not integer or ``vectors`` is not numeric.
        ValueError
            If ``vectors`` is not ``n`` finite unit-norm rows of width ``dim_old``, or ``ids``
            repeats an id, holds one already stored, or a negative one.
        """
        self._add("old", ids, as_embeddings(vectors, "vectors", dim=self.dim_old, unit_norm=True))

    def add(self, ids, new_vectors) -> None:
        """Store items as new vectors (items that arrive during the backfill go straight to new).

        Parameters
        ----------
        ids : array of n non-negative ints
            New ids, none already in the index.
        new_vectors : array (n, dim_new)
            Their new vectors, unit-norm rows.

        Raises
        ------
        TypeError
            If ``ids`` is not integer or ``new_vectors`` is not numeric.
        ValueError
            If ``new_vectors`` is not ``n`` finite unit-norm rows of width ``dim_new``, or
            ``ids`` repeats an id, holds one already stored, or a negative one.
        """
        self._add("new", ids, as_embeddings(new_vectors, "new_vectors", dim=self.dim_new, unit_norm=True))

    def _add(self, part: str, ids, x: np.ndarray) -> None:
        ids = _as_ids(ids, len(x))
        with self._lock.write():
            self._check_new_ids(ids, part)
            self._parts[part].add(ids, x)

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
            if len(np.unique(ids)) != len(ids):
                raise ValueError("ids must not repeat: each item is backfilled once")
            in_old, in_new = self._where(ids)
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
            if len(np.unique(ids)) != len(ids):
                raise ValueError("ids must not repeat")
            in_old, in_new = self._where(ids)
            unknown = ids[~(in_old | in_new)]
            if len(unknown):
                raise ValueError(f"ids {unknown[:5].tolist()} are not in the index")
            for name, mask in zip(PARTS, (in_old, in_new)):
                if mask.any():
                    self._parts[name].remove(ids[mask])

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
            return self._merged_search([(self._parts[n], queries[n]) for n in PARTS if len(self._parts[n].ids)], k)

    def _merged_search(self, parts, k: int):
        # While a part's last fetched score ties the k-th merged score, items it did not return
        # could still enter the top k by the id rule: fetch twice as many. One more than k at
        # first, so that a part holding the whole top k does not tie with itself.
        fetched = [part.search(q, min(k + 1, len(part.ids))) for part, q in parts]
        while True:
            scores, ids = _merge_by_score_then_id(fetched, k)
            kth = scores[:, -1]
            done = True
            for j, (part, q) in enumerate(parts):
                s, i = fetched[j]
                width = s.shape[1]
                if width >= len(part.ids):
                    continue
                rows = np.nonzero((i[:, -1] >= 0) & (s[:, -1] >= kth))[0]
                if not len(rows):
                    continue
                done = False
                wider = min(2 * width, len(part.ids))
                s2, i2 = part.search(q[rows], wider)
                s = np.pad(s, ((0, 0), (0, wider - width)), constant_values=-np.inf)
                i = np.pad(i, ((0, 0), (0, wider - width)), constant_values=-1)
                s[rows], i[rows] = s2, i2
                fetched[j] = (s, i)
            if done:
                return scores, ids

    # ---- persistence ---------------------------------------------------------------------------

    def save(self, path) -> None:
        """Write the index (both parts, ids, tombstones and ``psi``) to one file, crash-safely.

        The file is written under a temporary name in the same directory, flushed to disk
        (``fsync``) and renamed over ``path`` in one step, so a crash at any moment leaves
        either the previous file or the new one, never a partial one. Searches may run during
        a save; writes wait for it.

        Parameters
        ----------
        path : str or os.PathLike
            File to write (its directory must exist).

        Raises
        ------
        TypeError
            If the attached ``psi`` cannot be saved (it needs ``save(path)`` and a class method
            ``load(path)``).
        """
        path = os.fspath(path)
        directory = os.path.dirname(os.path.abspath(path))
        psi_bytes, psi_class = self._psi_bytes(directory)
        with self._lock.read():
            arrays = {}
            header = {"magic": FILE_MAGIC, "version": FILE_VERSION, "dim_old": self.dim_old,
                      "dim_new": self.dim_new, "psi_class": psi_class}
            for name, part in self._parts.items():
                header[f"{name}_index"] = part.spec
                header[f"{name}_params"] = part.params
                arrays[f"{name}_faiss"] = faiss.serialize_index(part.index)
                arrays[f"{name}_ids"] = part.ids
                arrays[f"{name}_tombs"] = part.tombs
        arrays["header"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
        if psi_bytes is not None:
            arrays["psi"] = np.frombuffer(psi_bytes, dtype=np.uint8)
        _atomic_write(path, lambda f: np.savez(f, **arrays))

    def _psi_bytes(self, directory: str):
        psi = self.psi
        if psi is None:
            return None, None
        cls = type(psi)
        if not callable(getattr(psi, "save", None)) or not callable(getattr(cls, "load", None)):
            raise TypeError(f"psi ({cls.__name__}) cannot be saved with the index: it needs save(path) and a "
                            "class method load(path), like backfill_lib.transforms.ReverseTransform")
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".psi-", suffix=".tmp")
        os.close(fd)
        try:
            psi.save(tmp)
            with open(tmp, "rb") as f:
                return f.read(), f"{cls.__module__}:{cls.__qualname__}"
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    @classmethod
    def load(cls, path) -> "OnlineBackfillIndex":
        """Read an index written by :meth:`save`, with its ``psi``.

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
        FileNotFoundError
            If ``path`` does not exist.
        ValueError
            If ``path`` is not a file written by :meth:`save` (or is damaged).
        """
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no index file at {path!r}")
        not_index = f"{path!r} is not an OnlineBackfillIndex file (written by OnlineBackfillIndex.save)"
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {key: data[key] for key in data.files}
            header = json.loads(arrays["header"].tobytes().decode())
        except Exception as exc:
            raise ValueError(f"{not_index}: {type(exc).__name__}: {exc}") from None
        if not isinstance(header, dict) or header.get("magic") != FILE_MAGIC:
            raise ValueError(not_index)
        if header.get("version") != FILE_VERSION:
            raise ValueError(f"{path!r} has index format version {header.get('version')}; this library reads {FILE_VERSION}")
        index = cls(header["dim_old"], header["dim_new"], header["old_index"], header["new_index"])
        for name, part in index._parts.items():
            try:
                part.index = faiss.deserialize_index(arrays[f"{name}_faiss"])
            except (RuntimeError, KeyError) as exc:
                raise ValueError(f"{not_index}: the {name} part cannot be read ({exc})") from None
            part.ids, part.tombs = arrays[f"{name}_ids"].astype(np.int64), arrays[f"{name}_tombs"].astype(np.int64)
            part.params = dict(header.get(f"{name}_params", {}))
            part.peak = part.index.ntotal  # a read index has no spare capacity
            if part.index.ntotal != len(part.ids) + len(part.tombs):
                raise ValueError(f"{not_index}: the {name} part holds {part.index.ntotal} vectors for "
                                 f"{len(part.ids)} ids and {len(part.tombs)} tombstones")
        if header.get("psi_class"):
            index.psi = _load_psi(header["psi_class"], arrays["psi"].tobytes(), os.path.dirname(os.path.abspath(path)))
        return index


def _isin_sorted(values: np.ndarray, sorted_array: np.ndarray) -> np.ndarray:
    """``np.isin(values, sorted_array)`` by binary search (the live ids are kept sorted)."""
    if not len(sorted_array):
        return np.zeros(len(values), dtype=bool)
    pos = np.searchsorted(sorted_array, values)
    pos[pos == len(sorted_array)] = 0
    return sorted_array[pos] == values


def _load_psi(class_path: str, payload: bytes, directory: str):
    module, _, qualname = class_path.partition(":")
    obj = import_module(module)
    for attr in qualname.split("."):
        obj = getattr(obj, attr)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".psi-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
        return obj.load(tmp)
    finally:
        os.remove(tmp)


def _atomic_write(path: str, write) -> None:
    """Write a file under a temporary name, fsync it, rename it over ``path``, fsync the directory."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
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
