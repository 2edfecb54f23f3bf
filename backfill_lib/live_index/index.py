"""The live index itself: :class:`~backfill_lib.live_index.OnlineBackfillIndex`, two parts in one id space.

Which items exist, and in which part, is kept once for the whole index (every id, sorted, with a
stored-new flag), the parts hold the vectors (:mod:`backfill_lib.live_index.parts`), a
readers-writer lock makes every write atomic for the searches, a search is the exact merge of
the parts' lists (:mod:`backfill_lib.live_index.merge`), and ``save``/``load`` are those of
:mod:`backfill_lib.live_index.fileformat`. The class is documented (and imported) as
``backfill_lib.live_index.OnlineBackfillIndex``.
"""

from __future__ import annotations

import os

import numpy as np

from ..retrieval import _as_id_list, _as_ids
from ..validation import as_embeddings, check_k, check_no_repeats, check_path
from ._lock import _RWLock
from .adopt import _from_faiss
from .fileformat import _load, _save
from .merge import _bridge_queries, _calibrated, _merged_topk
from .parts import CHUNK_ROWS, _check_search_param, _isin_sorted, _make_part

#: The two parts of an index, in the order they are saved and searched.
PARTS = ("old", "new")


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
    from ..calibration import ScoreMap

    if not isinstance(value, dict) or set(value) != {"old", "new"} \
            or not all(isinstance(v, ScoreMap) for v in value.values()):
        raise TypeError("score_maps must be None or {'old': ScoreMap, 'new': ScoreMap}, one increasing map per space "
                        f"(backfill_lib.calibration.fit_score_map on each space's training embeddings), got {value!r}")
    return dict(value)



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
        ``"HNSW32"``; see :mod:`backfill_lib.live_index.parts` for training and removal.
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
        a backfill moves out of the old part is given back as it goes (see
        :mod:`backfill_lib.live_index.parts`).
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
        builds a type a part cannot serve (see :mod:`backfill_lib.live_index.parts`: e.g.
        ``Refine`` wrappers, which cannot add with ids, and NSG, which cannot remove, are
        refused here).

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

    Adopting the faiss index file that serves (:meth:`from_faiss`; the file is never written):

    >>> import os, shutil, tempfile, faiss, numpy as np
    >>> served = faiss.IndexIDMap(faiss.IndexFlatIP(2))
    >>> served.add_with_ids(np.array([[1.0, 0.0], [0.0, 1.0]], dtype="float32"), np.array([10, 11]))
    >>> path = os.path.join(tempfile.mkdtemp(), "served.faiss")
    >>> faiss.write_index(served, path)
    >>> adopted = OnlineBackfillIndex.from_faiss(path, dim_new=2)
    >>> adopted.backfill([11], [[0.6, 0.8]])
    >>> parts, vectors = adopted.stored_vectors([10, 11])
    >>> parts.tolist(), vectors[1].tolist()
    (['old', 'new'], [0.6000000238418579, 0.800000011920929])
    >>> shutil.rmtree(os.path.dirname(path))
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
        self._adopted_from = None  # the faiss file from_faiss read (never written: save refuses it)

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

    def old_vectors(self, ids) -> np.ndarray:
        """The old vectors stored for items stored old, read back from the old part.

        Exact for ``Flat``, ``IVF<nlist>,Flat`` and HNSW over ``Flat`` parts (the float32 rows that
        were added); for quantised parts (SQ, PQ, IVF-PQ, ...) the decoded codes, which are
        approximate.

        Parameters
        ----------
        ids : int or array of ints
            Ids of items stored old (repeats allowed).

        Returns
        -------
        array (len(ids), dim_old) of float32
            One row per id, in the order of ``ids``.

        Raises
        ------
        TypeError
            If ``ids`` is not integer.
        ValueError
            If ``ids`` is not one id or a 1-D array, or an id is not in the index or is stored new.
        """
        return self._read("old", ids)

    def new_vectors(self, ids) -> np.ndarray:
        """The new vectors stored for items stored new, read back from the new part.

        Exact for ``Flat``, ``IVF<nlist>,Flat`` and HNSW over ``Flat`` parts; the decoded codes
        (approximate) for quantised parts.

        Parameters
        ----------
        ids : int or array of ints
            Ids of items stored new (repeats allowed).

        Returns
        -------
        array (len(ids), dim_new) of float32
            One row per id, in the order of ``ids``.

        Raises
        ------
        TypeError
            If ``ids`` is not integer.
        ValueError
            If ``ids`` is not one id or a 1-D array, or an id is not in the index or is stored old.
        """
        return self._read("new", ids)

    def stored_vectors(self, ids) -> tuple[np.ndarray, list]:
        """What is stored for each id: its part and its vector (as :meth:`old_vectors` / :meth:`new_vectors`).

        Parameters
        ----------
        ids : int or array of ints
            Ids of stored items (repeats allowed).

        Returns
        -------
        parts : array of str
            ``"old"`` or ``"new"`` per id.
        vectors : list of arrays of float32
            The stored vector of each id (``dim_old`` or ``dim_new`` long, after its part).

        Raises
        ------
        TypeError
            If ``ids`` is not integer.
        ValueError
            If ``ids`` is not one id or a 1-D array, or an id is not in the index.
        """
        ids = _as_id_list(ids)
        with self._lock.read():
            _, in_old, in_new = self._locate(ids)
            unknown = ids[~(in_old | in_new)]
            if len(unknown):
                raise ValueError(f"ids {unknown[:5].tolist()} are not in the index")
            rows = {name: self._read_locked(name, ids[mask]) for name, mask in (("old", in_old), ("new", in_new))}
        parts = np.where(in_new, "new", "old")
        at = {"old": iter(rows["old"]), "new": iter(rows["new"])}
        return parts, [next(at[p]) for p in parts.tolist()]

    def _read(self, name: str, ids) -> np.ndarray:
        ids = _as_id_list(ids)
        with self._lock.read():
            _, in_old, in_new = self._locate(ids)
            here = in_new if name == "new" else in_old
            if not here.all():
                other = ids[(in_old | in_new) & ~here]
                if len(other):
                    raise ValueError(f"ids {other[:5].tolist()} are stored {'old' if name == 'new' else 'new'}, "
                                     f"not {name}: read them with {'old' if name == 'new' else 'new'}_vectors "
                                     "(or stored_vectors, for both parts)")
                raise ValueError(f"ids {ids[~here][:5].tolist()} are not in the index")
            return self._read_locked(name, ids)

    def _read_locked(self, name: str, ids: np.ndarray) -> np.ndarray:
        """The part's vectors of ``ids`` (all stored in it; repeats allowed), under the caller's lock."""
        unique, inverse = np.unique(ids, return_inverse=True)
        return self._parts[name].read(unique)[inverse.reshape(-1)]

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
        ``query_old`` if it is given (rank merge, or queries you transformed yourself), else the
        attached bridge makes both queries of ``query_new = φ_n(q)``: ``psi.transform(query_new)``
        (``ψ̂``, reverse transformation) for the items stored old, and, when the bridge has a
        learned ``ρ`` (``psi.new_embedding``, ψ + ρ trained metric-compatibly), ``ρ̂(query_new)``
        for the items stored new, which were backfilled as ``ρ̂(φ_n(g))``. When no item is stored
        old, neither is needed (but a ``ρ`` still applies).

        Parameters
        ----------
        query_new : array (n_q, dim_new)
            New-model query vectors, unit-norm rows: ``φ_n(q)`` when the bridge makes the queries;
            the vectors to score the items stored new with when ``query_old`` is given.
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
            # ψ̂ (and ρ̂) run outside the lock: they are the query's own work, not the index's.
            qn, qo = _bridge_queries(self.psi, qn, self.dim_new, self.dim_old)
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
        ValueError
            If ``path`` is the faiss index file this index adopted (:meth:`from_faiss`): that file
            is the rollback point of the migration and is never written.
        """
        source = self._adopted_from
        if source is not None and os.path.exists(source) and os.path.exists(check_path(path)) \
                and os.path.samefile(source, path):
            raise ValueError(f"path {path!r} is the faiss index file this index adopted, the rollback point of the "
                             "migration: save the live index to a file of its own")
        _save(self, path)

    @classmethod
    def from_faiss(cls, path, dim_new: int, new_index: str = "Flat", ids=None, psi=None, score_maps=None,
                   chunk_rows: int = CHUNK_ROWS) -> "OnlineBackfillIndex":
        """Adopt an existing faiss index file of old vectors: an index holding them all, stored old.

        The start of a migration from the index that already serves: the file's vectors become
        the old part, with their ids, and a backfill moves them to the new part from there. The
        file is the rollback point and is never written: it is opened read-only (mapped where
        faiss can), and this index saves to a file of its own (:meth:`save`), so serving the
        file again undoes the migration. The vectors are copied once, into the old part's
        layout (chunks of ``chunk_rows`` for a flat index, one container per list for IVF-Flat),
        so that the old part gives memory back as the backfill moves items out; the file is
        mapped, not read, so no second copy is held (see :mod:`backfill_lib.live_index.adopt`).

        Parameters
        ----------
        path : str or os.PathLike
            A file written by ``faiss.write_index``: an ``IndexFlatIP`` (bare, or in an
            ``IndexIDMap`` / ``IndexIDMap2``) or an ``IndexIVFFlat``, inner-product metric,
            unit-norm rows. Its dimension is ``dim_old``.
        dim_new : int
            Dimension of the new vectors.
        new_index : str, default "Flat"
            faiss factory string of the new part, as for :class:`OnlineBackfillIndex`.
        ids : array of ints, optional
            Ids of a bare ``IndexFlatIP``'s rows, in the order they were added (default ``0 ..
            n-1``, faiss's own numbering). Refused for a file that stores ids.
        psi : object, optional
            The reverse transformation ``ψ̂`` that serves the old part, as for
            :class:`OnlineBackfillIndex`.
        score_maps : dict, optional
            ``{"old": ScoreMap, "new": ScoreMap}``, as for :class:`OnlineBackfillIndex`.
        chunk_rows : int, default 8192
            Rows per storage chunk of a flat-codes part, as for :class:`OnlineBackfillIndex`.

        Returns
        -------
        OnlineBackfillIndex
            Every item of the file stored old (old part ``"Flat"`` or ``"IVF<nlist>,Flat"``, with
            the file's coarse quantizer and ``nprobe``); searches return what the file's index
            returned for the same old queries.

        Raises
        ------
        TypeError
            If ``path`` is not a path, ``new_index`` is not a string, ``psi`` has no
            ``transform`` method, ``score_maps`` is not a pair of score maps, or ``ids`` is not
            integer.
        FileNotFoundError
            If ``path`` does not exist.
        IsADirectoryError
            If ``path`` is a directory.
        ValueError
            If ``dim_new`` or ``chunk_rows`` is not a positive integer, the file is not a faiss
            index, holds another type (HNSW, PQ, a transform, ...), uses the L2 metric, holds
            rows that are not finite and unit-norm, or stores an id twice or a negative one, or
            ``ids`` is given for a file that stores ids, is not one distinct non-negative id per
            row.
        """
        _check_dim("dim_new", dim_new)
        _check_dim("chunk_rows", chunk_rows, "rows per storage chunk")
        _check_spec("new_index", new_index)
        _check_psi(psi)
        _check_score_maps(score_maps)
        return _from_faiss(cls, path, dim_new, new_index, ids, psi, score_maps, chunk_rows)

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
        return _load(cls, path)


# Documented, imported and shown (repr, pickling of its name) as backfill_lib.live_index.OnlineBackfillIndex,
# where it lived before the module became a package. doctest then finds the class's own examples through
# the package; __test__ hands it the methods' examples here, whose functions belong to this module.
OnlineBackfillIndex.__module__ = "backfill_lib.live_index"
__test__ = {"OnlineBackfillIndex": OnlineBackfillIndex}
