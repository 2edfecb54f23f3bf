"""The online backfill on a vector database: :class:`QdrantBackfillIndex`, on Qdrant.

The same methods as :class:`~backfill_lib.live_index.OnlineBackfillIndex`, over one Qdrant
collection whose points have two named vectors, ``old`` and ``new``. A point holds only the
vector it is stored with; :meth:`QdrantBackfillIndex.backfill` rewrites a batch of points with
their ``new`` vector in one upsert (which drops the ``old`` one and keeps the payload), and a
search queries each named vector and merges the two lists, ties broken by the smaller id.

Qdrant is an optional dependency: ``pip install "backfill_lib[qdrant]"`` (or ``qdrant-client``).
The tests run qdrant-client's embedded local mode (``QdrantClient(":memory:")`` or ``path=``);
the same code runs against a Qdrant server or cluster (``QdrantClient(url=...)``).

What Qdrant guarantees and what this class adds: on a server one upsert request is applied
whole (per shard), and each point holds one vector at any moment. The two named-vector queries
of a search are two requests, so a search and a backfill batch in *this process* are serialised
by a readers-writer lock (a search sees each item exactly once); writers in other processes can
move a point between the two requests, in which case a duplicate is dropped but an item may be
missed by that one search.

Embedded local mode with ``path=`` writes an upsert point by point (one SQLite commit per
point): a process killed during an upsert leaves a prefix of it on disk, each point whole (its
old vector or its new one, never neither). Repeating the interrupted call finishes it:
:meth:`~QdrantBackfillIndex.add_old`, :meth:`~QdrantBackfillIndex.add` and
:meth:`~QdrantBackfillIndex.backfill` accept points already stored as the call would store them
(same part, same vector) and write the rest.

Every point must be one this class can represent: an integer id in ``0..2**63-1`` (numpy
``int64``; Qdrant also allows UUIDs and ids up to ``2**64-1``) holding exactly one of the two
vectors. A point that is not (written by another client) is reported by name, with what to do,
when the index is attached to the collection, and later by ``old_ids``, ``new_ids`` and a search
that meets it; ``progress`` refuses a point holding neither or both vectors too (it could not
count it truthfully), and counts a point with a UUID id as what it holds.
"""

from __future__ import annotations

import inspect

import numpy as np

from .live_index import _calibrated, _check_dim, _check_psi, _check_score_maps, _merged_topk, _RWLock
from .retrieval import _as_ids
from .validation import as_embeddings, check_no_repeats

PARTS = ("old", "new")

#: Largest point id: ids are numpy int64 here (Qdrant's own ids go up to 2**64-1, or are UUIDs).
MAX_ID = 2**63 - 1

#: A search asking for more results than the collection holds is padded up to ``k``, but only
#: while the padded result has at most this many entries per query batch (``n_q * k``): beyond,
#: ``k`` is refused instead of allocating gigabytes of padding.
MAX_PADDED_RESULTS = 2**24

#: Largest difference per coordinate between a vector given again and the stored one for them
#: to count as the same (float32 round trip; float16 storage rounds to about 5e-4).
_SAME_ATOL = {None: 1e-6, "float32": 1e-6, "float16": 1e-3}

# Methods of qdrant_client.QdrantClient this class calls.
_CLIENT_METHODS = ("collection_exists", "get_collection", "create_collection", "count", "scroll", "retrieve",
                   "upsert", "delete", "query_batch_points")

# Characters Qdrant refuses in a new collection name (the server and the local mode alike).
_BAD_NAME_CHARS = '<>:"/\\|?*\0\x1f'


def _models():
    try:
        from qdrant_client import models
    except ImportError:
        raise ImportError("QdrantBackfillIndex needs qdrant-client, an optional dependency: "
                          "pip install 'backfill_lib[qdrant]' (or pip install qdrant-client)") from None
    return models


def _check_client(client):
    missing = [m for m in _CLIENT_METHODS if not callable(getattr(client, m, None))]
    if missing:
        raise TypeError(f"client must be a qdrant_client.QdrantClient (QdrantClient(':memory:'), QdrantClient(path=...) "
                        f"or QdrantClient(url=...)), got {type(client).__name__} (it has no {missing[0]}() method)")
    if inspect.iscoroutinefunction(client.collection_exists):
        raise TypeError("client is asynchronous (AsyncQdrantClient): QdrantBackfillIndex calls Qdrant synchronously; "
                        "pass a QdrantClient with the same arguments")
    return client


def _check_collection_name(name):
    if not isinstance(name, str) or not name:
        raise TypeError(f"collection must be a non-empty string (a Qdrant collection name), got {name!r}")
    bad = [c for c in _BAD_NAME_CHARS if c in name]
    if bad or name in (".", "..") or len(name) > 255:
        why = f"it contains {bad[0]!r}" if bad else "it is too long" if len(name) > 255 else f"it is {name!r}"
        raise ValueError(f"collection={name[:60]!r} is not a valid Qdrant collection name ({why}): use 1 to 255 "
                         f"characters without {' '.join(repr(c) for c in _BAD_NAME_CHARS)}, other than '.' and '..'")
    return name


def _check_search_params(params):
    models = _models()
    if params is None or isinstance(params, models.SearchParams):
        return params
    if isinstance(params, dict):
        try:
            return models.SearchParams(**params)
        except Exception as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in getattr(exc, "errors", list)())
            raise ValueError(f"search_params {params!r} are not valid Qdrant SearchParams ({problems or exc}): "
                             "e.g. {'hnsw_ef': 128} or {'exact': True}") from None
    raise TypeError("search_params must be a qdrant_client.models.SearchParams (e.g. SearchParams(hnsw_ef=128) or "
                    f"SearchParams(exact=True)), a dict of its fields, or None; got {type(params).__name__}")


def _check_k(k) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"k must be a positive integer, got {type(k).__name__}")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    return int(k)


def _ids_arg(ids, n: int | None = None, name: str = "ids") -> np.ndarray:
    """``ids`` as int64 (``n`` of them, or one id or any number with ``n=None``), checked like the faiss index's."""
    arr = np.asarray(ids)
    if n is None:
        arr = np.atleast_1d(arr)
    if arr.dtype == object:
        # Python ints beyond int64 land here (np.asarray([2**64]) is an object array).
        big = [i for i in arr.ravel() if type(i) is int and not 0 <= i <= MAX_ID]
        if big:
            raise ValueError(f"{name} must lie in 0..2**63-1 (int64 point ids), got {big[0]}")
    return _as_ids(arr, arr.size if n is None else n, name)


def _foreign_id(pid, collection: str) -> ValueError:
    return ValueError(
        f"collection {collection!r} holds a point with id {pid!r}: QdrantBackfillIndex supports integer point ids "
        f"0..2**63-1 only (numpy int64), not UUIDs or ids from 2**63 on. Delete that point "
        f"(client.delete({collection!r}, points_selector=[{pid!r}])) or move it to an integer id, or use another "
        "collection")


def _point_id(pid, collection: str) -> int:
    if type(pid) is int and 0 <= pid <= MAX_ID:
        return pid
    raise _foreign_id(pid, collection)


def _holds(vector) -> tuple:
    """The part names of ``old``/``new`` a retrieved point holds, sorted."""
    return tuple(p for p in PARTS if isinstance(vector, dict) and p in vector)


def _invalid_point(pid, holds: tuple, collection: str) -> ValueError:
    what = "neither an 'old' nor a 'new' vector" if not holds else "both an 'old' and a 'new' vector"
    return ValueError(
        f"point {pid!r} of collection {collection!r} holds {what}, so it is neither stored old nor stored new and "
        "progress, old_ids and new_ids cannot count it (it was written by another client): every point must hold "
        f"exactly one of the two. Remove it (index.remove([{pid!r}])) and add it again with add_old or add, or use "
        "another collection")


def _describe(vectors) -> str:
    if not isinstance(vectors, dict):
        return f"one unnamed vector (size {getattr(vectors, 'size', '?')})"
    return ", ".join(f"{name!r}: size {getattr(p, 'size', '?')}, {getattr(getattr(p, 'distance', None), 'value', '?')}"
                     for name, p in vectors.items()) or "no vectors"


_ADD_DOC = """Store points as {what} vectors ({when}).

        Repeating a call that was interrupted (a crash part-way through an upsert in embedded
        local mode) finishes it: ids already stored {what} with the same vector are accepted
        and left as they are, the others are written.

        Parameters
        ----------
        ids : array of n ints in 0..2**63-1
            New ids, none already in the index (unless stored {what} with the same vector).
        {arg} : array (n, {dim})
            Their {what} vectors, unit-norm rows.

        Raises
        ------
        TypeError
            If ``ids`` is not integer or ``{arg}`` is not numeric.
        ValueError
            If ``{arg}`` is not ``n`` finite unit-norm rows of width ``{dim}``, or ``ids``
            repeats an id, holds a negative one or one above 2**63-1, or holds one already
            stored in the other part or with another vector (nothing is written then).
        RuntimeError
            If the collection was deleted underneath the index.
        """


class QdrantBackfillIndex:
    """A Qdrant collection being backfilled while it serves: points stored old or new.

    Parameters
    ----------
    client : qdrant_client.QdrantClient
        A connected client: ``QdrantClient(":memory:")`` or ``QdrantClient(path=...)`` (embedded
        local mode) or ``QdrantClient(url="http://host:6333")`` (a server or cluster).
    collection : str
        Collection name. It is created (two named vectors, dot product) if it does not exist;
        an existing one must have exactly the named vectors ``old`` (``dim_old``) and ``new``
        (``dim_new``), float vectors with the dot product, and only points this class can
        represent (integer ids in 0..2**63-1, each holding exactly one of the two vectors).
    dim_old : int
        Dimension of the old vectors.
    dim_new : int
        Dimension of the new vectors.
    psi : object, optional
        The fitted reverse transformation: ``transform(X)`` maps new-model rows to unit-norm
        old-space rows (e.g. :class:`backfill_lib.transforms.ReverseTransform`). Not stored in
        Qdrant: keep it with the service.
    search_params : qdrant_client.models.SearchParams or dict, optional
        Passed to every query, e.g. ``SearchParams(exact=True)`` for exact search on a server
        (which otherwise searches its HNSW graph). Local mode is always exact.
    score_maps : dict, optional
        ``{"old": ScoreMap, "new": ScoreMap}``: serve the calibrated merge (see
        :attr:`score_maps`); default None, the raw scores.

    Attributes
    ----------
    client : qdrant_client.QdrantClient
        The client.
    collection : str
        The collection name.
    dim_old : int
        Dimension of the old vectors.
    dim_new : int
        Dimension of the new vectors.
    psi : object or None
        The attached reverse transformation (may be replaced; checked when set).
    search_params : qdrant_client.models.SearchParams or None
        The parameters of every query (may be replaced; checked when set).

    Raises
    ------
    ImportError
        If qdrant-client is not installed.
    TypeError
        If ``client`` is not a (synchronous) Qdrant client, ``collection`` is not a non-empty
        string, ``psi`` has no ``transform`` method or ``search_params`` is not search params.
    ValueError
        If a dimension is not a positive integer (at most 65536), ``collection`` is not a valid
        name, an existing collection has other vectors, or it holds a point with a UUID id, an
        id above 2**63-1, or neither or both of the two vectors.
    """

    def __init__(self, client, collection: str, dim_old: int, dim_new: int, psi=None, search_params=None,
                 score_maps=None):
        models = _models()
        self.client = _check_client(client)
        if not isinstance(collection, str) or not collection:
            raise TypeError(f"collection must be a non-empty string (a Qdrant collection name), got {collection!r}")
        self.collection = collection
        self.dim_old, self.dim_new = _check_dim("dim_old", dim_old), _check_dim("dim_new", dim_new)
        self.psi = psi
        self.search_params = search_params
        self.score_maps = score_maps
        self._dims = {"old": self.dim_old, "new": self.dim_new}
        self._atol = {part: _SAME_ATOL[None] for part in PARTS}
        self._lock = _RWLock()
        try:
            exists = client.collection_exists(collection)
        except ValueError as exc:  # local mode: a name that points outside its folder
            raise ValueError(f"collection={collection!r} is not a usable collection name: {exc}") from None
        if exists:
            self._check_collection()
            self._check_ids()
            self._check_points()
            return
        _check_collection_name(collection)
        for name, dim in self._dims.items():
            if dim > 65536:
                raise ValueError(f"dim_{name}={dim}: Qdrant vectors have at most 65536 dimensions")
        client.create_collection(collection, vectors_config={
            name: models.VectorParams(size=dim, distance=models.Distance.DOT) for name, dim in self._dims.items()})

    @property
    def psi(self):
        """The attached reverse transformation, or None (checked for a ``transform`` method when set)."""
        return self._psi

    @psi.setter
    def psi(self, value):
        self._psi = _check_psi(value)

    @property
    def score_maps(self):
        """The calibration of the merged search, as :attr:`backfill_lib.live_index.OnlineBackfillIndex.score_maps`
        (``{"old": ScoreMap, "new": ScoreMap}`` or None; kept in this process, not in Qdrant)."""
        return self._score_maps

    @score_maps.setter
    def score_maps(self, value):
        self._score_maps = _check_score_maps(value)

    @property
    def search_params(self):
        """The ``SearchParams`` of every query, or None (a dict is converted when set)."""
        return self._search_params

    @search_params.setter
    def search_params(self, value):
        self._search_params = _check_search_params(value)

    def _check_collection(self) -> None:
        models = _models()
        params = self.client.get_collection(self.collection).config.params
        vectors, sparse = params.vectors, params.sparse_vectors
        have = _describe(vectors)
        for name, dim in self._dims.items():
            p = vectors.get(name) if isinstance(vectors, dict) else None
            if p is None or p.size != dim or p.distance != models.Distance.DOT:
                raise ValueError(f"collection {self.collection!r} exists but has no named vector {name!r} of size "
                                 f"{dim} with the dot product (it has {have}): pass its dimensions as dim_old and "
                                 "dim_new, or use another collection name")
            if getattr(p, "multivector_config", None) is not None:
                raise ValueError(f"collection {self.collection!r}: its vector {name!r} is a multivector; "
                                 "QdrantBackfillIndex stores one vector per point: use another collection name")
            datatype = getattr(getattr(p, "datatype", None), "value", None)
            if datatype not in _SAME_ATOL:
                raise ValueError(f"collection {self.collection!r}: its vector {name!r} stores {datatype} numbers, "
                                 "which cannot hold unit-norm embeddings (they would be rounded to integers); use "
                                 "float32 or float16 vectors (another collection name)")
            self._atol[name] = _SAME_ATOL[datatype]
        others = sorted(set(vectors) - set(PARTS)) + sorted(sparse or {})
        if others:
            raise ValueError(f"collection {self.collection!r} has other vectors too ({others}): a backfill rewrites a "
                             "point with its new vector alone and would delete them; use a collection with only "
                             "'old' and 'new' vectors")

    def _check_points(self) -> tuple[int, int]:
        """``(points, points stored new)``, after checking that each point is one this class can
        represent; raises naming one that is not."""
        models = _models()
        has = [models.HasVectorCondition(has_vector=p) for p in PARTS]
        total, n_old, n_new = self._count(), self._count("old"), self._count("new")
        # n_old + n_new = total + (points holding both) - (points holding neither): when the two
        # sides agree, there are as many of each, and counting one kind settles it.
        neither = models.Filter(must_not=has)
        if n_old + n_new != total or self._call("count", count_filter=neither, exact=True).count:
            bad = models.Filter(should=[neither, models.Filter(must=has)])
            points, _ = self._call("scroll", scroll_filter=bad, limit=1, with_payload=False, with_vectors=list(PARTS))
            if points:  # (else another client wrote between the counts: nothing to report)
                pid = points[0].id
                _point_id(pid, self.collection)
                raise _invalid_point(pid, _holds(points[0].vector), self.collection)
        return total, n_new

    def _check_ids(self) -> None:
        """Raise naming a point whose id is a UUID or above 2**63-1."""
        # Qdrant orders integer ids before UUIDs, so one point from 2**63 on stands for all of them.
        points, _ = self._call("scroll", offset=MAX_ID + 1, limit=1, with_payload=False, with_vectors=False)
        if points:
            raise _foreign_id(points[0].id, self.collection)

    def _call(self, method: str, *args, **kwargs):
        """``client.<method>(collection, ...)``; a collection deleted or re-created with other
        vectors underneath the index is reported as such."""
        try:
            return getattr(self.client, method)(self.collection, *args, **kwargs)
        except Exception as exc:
            try:
                gone = not self.client.collection_exists(self.collection)
                changed = None if gone else self._changed()
            except Exception:
                raise exc from None
            if gone:
                raise RuntimeError(f"collection {self.collection!r} no longer exists (deleted by another client?): "
                                   "create a new QdrantBackfillIndex and add the gallery again, or restore the "
                                   "collection from a snapshot") from None
            if changed:
                raise RuntimeError(f"collection {self.collection!r} was changed underneath the index (re-created by "
                                   f"another client?): {changed}") from None
            raise

    def _changed(self) -> str | None:
        """What is wrong with the collection's vectors now, or None."""
        try:
            self._check_collection()
        except ValueError as exc:
            return str(exc)
        return None

    # ---- state -------------------------------------------------------------------------------

    def _count(self, part: str | None = None) -> int:
        models = _models()
        flt = None if part is None else models.Filter(must=[models.HasVectorCondition(has_vector=part)])
        return int(self._call("count", count_filter=flt, exact=True).count)

    @property
    def n_old(self) -> int:
        """Number of points holding an old vector."""
        return self._count("old")

    @property
    def n_new(self) -> int:
        """Number of points holding a new vector."""
        return self._count("new")

    @property
    def ntotal(self) -> int:
        """Number of points in the collection."""
        return self._count()

    def __len__(self) -> int:
        return self.ntotal

    @property
    def progress(self) -> float:
        """Share of the points stored new, in [0, 1] (0 when empty).

        Raises ``ValueError`` naming a point written by another client that holds neither or
        both of the two vectors (it is neither stored old nor stored new).
        """
        with self._lock.read():
            total, n_new = self._check_points()
            return n_new / total if total else 0.0

    def _ids_of(self, part: str) -> np.ndarray:
        models = _models()
        self._check_points()
        flt = models.Filter(must=[models.HasVectorCondition(has_vector=part)])
        ids, offset = [], None
        while True:
            points, offset = self._call("scroll", scroll_filter=flt, limit=10_000, offset=offset,
                                        with_payload=False, with_vectors=False)
            ids += [_point_id(p.id, self.collection) for p in points]
            if offset is None:
                return np.sort(np.array(ids, dtype=np.int64))

    def old_ids(self) -> np.ndarray:
        """Ids of the points still stored old, ascending (what a backfill job has left to do).

        Returns
        -------
        array of int64
            The ids at the time of the call.

        Raises
        ------
        ValueError
            If the collection holds a point this class cannot represent (a UUID id, an id above
            2**63-1, or neither or both vectors), named in the message.
        RuntimeError
            If the collection was deleted underneath the index.
        """
        with self._lock.read():
            return self._ids_of("old")

    def new_ids(self) -> np.ndarray:
        """Ids of the points stored new, ascending.

        Returns
        -------
        array of int64
            The ids at the time of the call.

        Raises
        ------
        ValueError
            If the collection holds a point this class cannot represent (a UUID id, an id above
            2**63-1, or neither or both vectors), named in the message.
        RuntimeError
            If the collection was deleted underneath the index.
        """
        with self._lock.read():
            return self._ids_of("new")

    # ---- writes --------------------------------------------------------------------------------

    def _stored(self, ids: np.ndarray) -> dict:
        """``{id: (parts held, payload, vectors)}`` of the ids that exist."""
        records = self._call("retrieve", ids.tolist(), with_payload=True, with_vectors=list(PARTS))
        return {int(r.id): (_holds(r.vector), r.payload, r.vector) for r in records}

    def _same(self, part: str, stored_vectors: dict, x: np.ndarray) -> bool:
        v = np.asarray(stored_vectors[part], dtype=np.float32)
        return v.shape == x.shape and bool(np.all(np.abs(v - x) <= self._atol[part]))

    def _upsert(self, ids: np.ndarray, x: np.ndarray, part: str, payloads=None) -> None:
        models = _models()
        points = [models.PointStruct(id=int(i), vector={part: v.tolist()}, payload=None if payloads is None else payloads[j])
                  for j, (i, v) in enumerate(zip(ids, x))]
        # One request (applied whole per shard on a server; point by point in local mode);
        # wait=True so that a search right after sees it.
        self._call("upsert", points=points, wait=True)

    def add_old(self, ids, vectors) -> None:
        self._add("old", ids, as_embeddings(vectors, "vectors", dim=self.dim_old, unit_norm=True))

    def add(self, ids, new_vectors) -> None:
        self._add("new", ids, as_embeddings(new_vectors, "new_vectors", dim=self.dim_new, unit_norm=True))

    add_old.__doc__ = _ADD_DOC.format(what="old", when="items that arrived before the switch to the new model",
                                      arg="vectors", dim="dim_old")
    add.__doc__ = _ADD_DOC.format(what="new", when="items that arrive during the backfill go straight to new",
                                  arg="new_vectors", dim="dim_new")

    def _add(self, part: str, ids, x: np.ndarray) -> None:
        ids = _ids_arg(ids, len(x))
        with self._lock.write():
            check_no_repeats(ids, "ids", "each item is stored once")
            stored = self._stored(ids)
            todo = np.ones(len(ids), dtype=bool)
            elsewhere, other_vector = [], []
            for j, i in enumerate(ids.tolist()):
                if i not in stored:
                    continue
                holds, _, vectors = stored[i]
                if holds != (part,):
                    if len(holds) != 1:
                        raise _invalid_point(i, holds, self.collection)
                    elsewhere.append(i)
                elif not self._same(part, vectors, x[j]):
                    other_vector.append(i)
                todo[j] = False
            if elsewhere:
                raise ValueError(f"ids {elsewhere[:5]} are already in the index, stored "
                                 f"{'new' if part == 'old' else 'old'}: remove them first "
                                 "(or backfill them, to replace an old vector)")
            if other_vector:
                raise ValueError(f"ids {other_vector[:5]} are already in the index, stored {part} with other "
                                 "vectors: remove them first to replace them (a call repeated after a crash is "
                                 "accepted only with the same vectors)")
            if todo.any():
                self._upsert(ids[todo], x[todo], part)

    def backfill(self, ids, new_vectors) -> None:
        """Rewrite points stored old with their new vector (the old one is deleted), in one upsert.

        Payloads are kept. Repeating a call that was interrupted (a crash part-way through the
        upsert in embedded local mode) finishes it: ids already stored new with the same new
        vector are accepted and left as they are.

        Parameters
        ----------
        ids : array of n ints
            Ids of points stored old (or already stored new with the same vector), each once.
        new_vectors : array (n, dim_new)
            Their new vectors, unit-norm rows.

        Raises
        ------
        TypeError
            If ``ids`` is not integer or ``new_vectors`` is not numeric.
        ValueError
            If ``new_vectors`` is not ``n`` finite unit-norm rows of width ``dim_new``, or
            ``ids`` repeats an id, or names a point that is unknown, already backfilled with
            another vector, or holds neither or both vectors (nothing is written then).
        RuntimeError
            If the collection was deleted underneath the index.
        """
        x = as_embeddings(new_vectors, "new_vectors", dim=self.dim_new, unit_norm=True)
        ids = _ids_arg(ids, len(x))
        with self._lock.write():
            check_no_repeats(ids, "ids", "each item is backfilled once")
            stored = self._stored(ids)
            unknown = [i for i in ids.tolist() if i not in stored]
            if unknown:
                raise ValueError(f"ids {unknown[:5]} are not in the index")
            todo = np.ones(len(ids), dtype=bool)
            again = []
            for j, i in enumerate(ids.tolist()):
                holds, _, vectors = stored[i]
                if len(holds) != 1:
                    raise _invalid_point(i, holds, self.collection)
                if holds == ("new",):
                    todo[j] = False
                    if not self._same("new", vectors, x[j]):
                        again.append(i)
            if again:
                raise ValueError(f"ids {again[:5]} are already backfilled (stored new, with other vectors)")
            if todo.any():
                self._upsert(ids[todo], x[todo], "new", [stored[i][1] for i in ids[todo].tolist()])

    def remove(self, ids) -> None:
        """Remove points from the index, wherever they are stored.

        Parameters
        ----------
        ids : int or array of ints
            Ids of stored points, each once (an empty array removes nothing).

        Raises
        ------
        TypeError
            If ``ids`` is not integer.
        ValueError
            If ``ids`` repeats an id or names a point that is not in the index (nothing is
            removed then).
        RuntimeError
            If the collection was deleted underneath the index.
        """
        ids = _ids_arg(ids)
        if not len(ids):
            return
        models = _models()
        with self._lock.write():
            check_no_repeats(ids, "ids", "each item is removed once")
            stored = self._stored(ids)
            unknown = [i for i in ids.tolist() if i not in stored]
            if unknown:
                raise ValueError(f"ids {unknown[:5]} are not in the index")
            self._call("delete", points_selector=models.PointIdsList(points=ids.tolist()), wait=True)

    # ---- search --------------------------------------------------------------------------------

    def search(self, query_new, k: int, query_old=None) -> tuple[np.ndarray, np.ndarray]:
        """Merged top-``k`` over the ``old`` and ``new`` vectors: ``(scores, ids)``, ties by smaller id.

        Parameters
        ----------
        query_new : array (n_q, dim_new)
            New-model query vectors, unit-norm rows.
        k : int
            Results per query, at least 1; rows are padded with ``-1`` / ``-inf`` when the
            collection holds fewer than ``k`` points (up to :data:`MAX_PADDED_RESULTS`
            entries in all).
        query_old : array (n_q, dim_old), optional
            Old-model query vectors (rank merge); default ``psi.transform(query_new)``.

        Returns
        -------
        scores : array (n_q, k) of float32
            Merged scores, descending.
        ids : array (n_q, k) of int64
            Point ids of the results.

        Raises
        ------
        TypeError
            If a query is not numeric or ``k`` is not an integer.
        ValueError
            If a query is not finite unit-norm rows of its dimension, the queries have different
            numbers of rows, ``k < 1``, ``k`` exceeds the collection and the padded result would
            exceed :data:`MAX_PADDED_RESULTS`, points are stored old but neither ``query_old``
            nor ``psi`` is given, or a result is a point with an id this class cannot represent.
        RuntimeError
            If the collection was deleted underneath the index.
        """
        k = _check_k(k)
        qn = as_embeddings(query_new, "query_new", dim=self.dim_new, unit_norm=True)
        psi = self.psi
        if query_old is not None:
            qo = as_embeddings(query_old, "query_old", dim=self.dim_old, unit_norm=True)
            if len(qo) != len(qn):
                raise ValueError(f"query_old has {len(qo)} rows but query_new has {len(qn)}: one of each per query")
        elif psi is not None:
            qo = as_embeddings(psi.transform(qn), "psi.transform(query_new)", dim=self.dim_old, unit_norm=True)
            if len(qo) != len(qn):
                raise ValueError(f"psi.transform returned {len(qo)} rows for {len(qn)} queries: one per query")
        else:
            qo = None
        with self._lock.read():
            total = self._count()
            if k > total and len(qn) * k > MAX_PADDED_RESULTS:
                raise ValueError(f"k={k} is more than the collection holds ({total} points) and the padded result "
                                 f"would have {len(qn) * k} entries: ask for at most {max(total, 1)}")
            parts = [("new", qn)]
            if qo is not None:
                parts.insert(0, ("old", qo))
            elif self._count("old"):
                raise ValueError("points are stored old: give query_old (rank merge) or attach a fitted "
                                 "reverse transformation psi (index.psi = ReverseTransform(...).fit(...))")
            scores = np.full((len(qn), k), -np.inf, dtype=np.float32)
            ids = np.full((len(qn), k), -1, dtype=np.int64)
            if total:
                # No list holds more than the collection's points: no query asks for more.
                width = min(k, total)
                scores[:, :width], ids[:, :width] = self._merged_search(parts, width, total)
            return scores, ids

    def _query(self, part: str, q: np.ndarray, limit: int):
        models = _models()
        requests = [models.QueryRequest(query=row.tolist(), using=part, limit=limit, params=self.search_params,
                                        with_payload=False, with_vector=False) for row in q]
        responses = self._call("query_batch_points", requests=requests)
        scores = np.full((len(q), limit), -np.inf, dtype=np.float32)
        ids = np.full((len(q), limit), -1, dtype=np.int64)
        for r, resp in enumerate(responses):
            for c, point in enumerate(resp.points[:limit]):
                scores[r, c], ids[r, c] = point.score, _point_id(point.id, self.collection)
        return scores, ids

    def _merged_search(self, parts, k: int, total: int):
        # The merge of OnlineBackfillIndex; a point moved by another process between the two
        # queries would appear twice, so each merge drops repeats. Each list holds at most the
        # collection's ``total`` points (as counted under the lock).
        maps = self.score_maps or {}
        sources = [(_calibrated(lambda q, width, part=part: self._query(part, q, width), maps.get(part)), total, q)
                   for part, q in parts]
        return _merged_topk(sources, k, clean=_drop_repeats)


def _drop_repeats(ids: np.ndarray, scores: np.ndarray, k: int):
    """Keep the first occurrence of each id per row (rows stay sorted), padded to ``k``."""
    out_i = np.full_like(ids, -1)
    out_s = np.full_like(scores, -np.inf)
    for r in range(len(ids)):
        _, first = np.unique(ids[r], return_index=True)
        keep = np.sort(first[ids[r][first] >= 0])[:k]
        out_i[r, :len(keep)], out_s[r, :len(keep)] = ids[r, keep], scores[r, keep]
    return out_i, out_s
