"""The online backfill on a vector database: :class:`QdrantBackfillIndex`, on Qdrant.

The same methods as :class:`~backfill_lib.live_index.OnlineBackfillIndex`, over one Qdrant
collection, in one of two layouts:

* **A fresh collection** (``QdrantBackfillIndex(client, collection, dim_old, dim_new)``): two
  named vectors, ``old`` and ``new``. A point holds only the vector it is stored with;
  :meth:`QdrantBackfillIndex.backfill` rewrites a batch of points with their ``new`` vector in
  one upsert (which drops the ``old`` one and keeps the payload).
* **An adopted collection** (:meth:`QdrantBackfillIndex.adopt`): the collection that already
  serves, whose points hold one dense vector (the unnamed default vector or one named vector).
  Adoption adds the named vector for the new model in place (``client.create_vector_name``; no
  point is copied). A backfilled point *keeps* its old vector (the new one is added with
  ``update_vectors``), so that :meth:`QdrantBackfillIndex.rollback` returns the collection as it
  was (the old vectors are never rewritten) until :meth:`QdrantBackfillIndex.finalize` drops
  them. A point is stored new when it holds the new vector; the old vector is searched only over
  the points without one (a has-vector filter), so each item is found once.

A search queries each vector and merges the two lists, ties broken by the smaller id.

Qdrant is an optional dependency: ``pip install "backfill_lib[qdrant]"`` (or ``qdrant-client``).
The tests run qdrant-client's embedded local mode (``QdrantClient(":memory:")`` or ``path=``);
the same code runs against a Qdrant server or cluster (``QdrantClient(url=...)``). Adding and
dropping a named vector of an existing collection needs qdrant-client and a Qdrant server 1.18 or
later (embedded local mode does both); embedded local mode with ``path=`` admits one client per
folder at a time: close one (``client.close()``) before opening another, in this process or
another.

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
vectors (in an adopted collection: its old vector, the new one, or both). A point that is not
(written by another client) is reported by name, with what to do, when the index is attached to
the collection, and later by ``old_ids``, ``new_ids`` and a search that meets it; ``progress``
refuses such a point too (it could not count it truthfully), and counts a point with a UUID id
as what it holds.
"""

from __future__ import annotations

import inspect

import numpy as np

from .live_index import _bridge_queries, _calibrated, _check_dim, _check_psi, _check_score_maps, _merged_topk, _RWLock
from .retrieval import _as_ids
from .validation import UNIT_NORM_TOL, as_embeddings, check_no_repeats

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


def _invalid_point(pid, holds: tuple, collection: str) -> ValueError:
    what = "neither an 'old' nor a 'new' vector" if not holds else "both an 'old' and a 'new' vector"
    return ValueError(
        f"point {pid!r} of collection {collection!r} holds {what}, so it is neither stored old nor stored new and "
        "progress, old_ids and new_ids cannot count it (it was written by another client): every point must hold "
        f"exactly one of the two. Remove it (index.remove([{pid!r}])) and add it again with add_old or add, or use "
        "another collection")


def _vector_label(name: str) -> str:
    return "the unnamed vector" if name == "" else f"the vector {name!r}"


def _describe(vectors) -> str:
    if not isinstance(vectors, dict):
        return f"one unnamed vector (size {getattr(vectors, 'size', '?')})"
    return ", ".join(f"{name!r}: size {getattr(p, 'size', '?')}, {getattr(getattr(p, 'distance', None), 'value', '?')}"
                     for name, p in vectors.items()) or "no vectors"


def _dense_vectors(params) -> dict:
    """``{name: VectorParams}`` of a collection's dense vectors (``""`` for the unnamed one)."""
    vectors = params.vectors
    if vectors is None:
        return {}
    return dict(vectors) if isinstance(vectors, dict) else {"": vectors}


def _check_vector_name(name) -> str:
    if not isinstance(name, str) or not name:
        raise TypeError(f"new_vector must be a non-empty string (the name of the new model's vector), got {name!r}")
    bad = [c for c in _BAD_NAME_CHARS if c in name]
    if bad or name in (".", "..") or len(name.encode()) > 200:
        why = f"it contains {bad[0]!r}" if bad else "it is longer than 200 bytes" if len(name.encode()) > 200 \
            else f"it is {name!r}"
        raise ValueError(f"new_vector={name[:60]!r} is not a valid Qdrant vector name ({why}): use 1 to 200 bytes "
                         f"without {' '.join(repr(c) for c in _BAD_NAME_CHARS)}, other than '.' and '..'")
    return name


def _server_version(client):
    """``(major, minor)`` of the Qdrant the client talks to, or None when it does not say."""
    try:
        version = str(client.info().version)
        major, minor = version.split(".")[:2]
        return int(major), int(minor)
    except Exception:
        return None


#: Bytes per stored number of a vector datatype (what ``rollback_cost`` counts).
_BYTES_PER_NUMBER = {None: 4, "float32": 4, "float16": 2}

#: The Qdrant release (server and client) that adds and drops named vectors of an existing collection.
CREATE_VECTOR_NAME_SINCE = (1, 18)


def _human_bytes(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    size, unit = float(n), "B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        size /= 1024
        if size < 1024:
            break
    return f"{size:.1f} {unit}"


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
        To start from a collection that already serves (one vector per point), use
        :meth:`QdrantBackfillIndex.adopt` instead.
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
    vector_names : dict
        ``{"old": name, "new": name}``: the Qdrant vector of each part (``""`` is the unnamed
        vector of an adopted collection).
    adopted : bool
        Whether the index was attached with :meth:`QdrantBackfillIndex.adopt` (a backfilled point
        keeps its old vector until :meth:`QdrantBackfillIndex.finalize`).

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
        self._setup(client, collection, dim_old, dim_new, psi, search_params, score_maps)
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

    def _setup(self, client, collection, dim_old, dim_new, psi, search_params, score_maps, adopted=False,
               names=("old", "new")) -> None:
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
        self._datatype = {part: None for part in PARTS}
        self._lock = _RWLock()
        self._adopted = adopted
        self._names = dict(zip(PARTS, names))
        self._ended = None  # "rolled back" or "finalized" (adopted collections)

    # ---- adopting a collection that already serves -------------------------------------------

    @classmethod
    def adopt(cls, client, collection: str, dim_new: int, new_vector: str = "new", psi=None, search_params=None,
              score_maps=None) -> "QdrantBackfillIndex":
        """Attach to a collection that already serves, adding the new model's vector in place.

        The collection's points hold one dense vector: the unnamed default vector or one named
        vector, with the dot product or cosine, stored as float32 or float16. Adoption adds the
        named vector ``new_vector`` (``dim_new``, the old vector's distance) to the collection
        with ``client.create_vector_name``: no point is copied or rewritten, every point is
        stored old. A backfilled point keeps its old vector next to the new one, so that
        :meth:`QdrantBackfillIndex.rollback` can return the collection as it was, bit for bit,
        until :meth:`QdrantBackfillIndex.finalize`; what that keeps is
        :meth:`QdrantBackfillIndex.rollback_cost`.

        Called again on a collection that already has ``new_vector`` (a migration under way,
        e.g. from a new process), it re-attaches and goes on where the migration stands.

        Adopting a dot-product collection reads every old vector once to check that it is
        unit-norm (the merged search compares dot products with cosines); nothing is written
        but the new vector's schema. The old vector is then searched with a has-vector filter
        (the points without a new vector); on a server, ``search_params=SearchParams(exact=True)``
        rules out the recall loss of a filtered HNSW search.

        Parameters
        ----------
        client : qdrant_client.QdrantClient
            A connected client (embedded local mode, or a Qdrant server 1.18 or later: older
            servers cannot add a vector to an existing collection).
        collection : str
            The existing collection.
        dim_new : int
            Dimension of the new vectors (the old dimension is the collection's).
        new_vector : str, default "new"
            Name of the new model's vector: one the collection does not have yet (adoption), or
            the one it has from an earlier ``adopt`` (re-attaching).
        psi : object, optional
            The fitted reverse transformation, as in the constructor.
        search_params : qdrant_client.models.SearchParams or dict, optional
            Passed to every query, as in the constructor.
        score_maps : dict, optional
            ``{"old": ScoreMap, "new": ScoreMap}``, as in the constructor.

        Returns
        -------
        QdrantBackfillIndex
            The index over the collection (its ``adopted`` is True).

        Raises
        ------
        ImportError
            If qdrant-client is not installed.
        TypeError
            If ``client`` is not a (synchronous) Qdrant client, ``collection`` or ``new_vector``
            is not a non-empty string, ``psi`` has no ``transform`` method or ``search_params``
            is not search params.
        ValueError
            If the collection does not exist; it has sparse vectors, no dense vector or two
            dense vectors or more (other than an earlier adoption's ``new_vector``), or only
            ``new_vector``; its vector is a multivector, stores integers (uint8) or uses another
            distance than dot or cosine; a dot-product collection holds a vector that is not
            unit-norm; ``dim_new`` is not a positive integer (at most 65536) or differs from the
            size of an existing ``new_vector``; or a point has a UUID id, an id above 2**63-1 or
            no vector.
        RuntimeError
            If the client or the server cannot add a vector to an existing collection (Qdrant
            before 1.18): the message says what to do.
        """
        _models()  # ImportError naming the extra, before anything else
        client = _check_client(client)
        if not isinstance(collection, str) or not collection:
            raise TypeError(f"collection must be a non-empty string (a Qdrant collection name), got {collection!r}")
        new_vector = _check_vector_name(new_vector)
        dim_new = _check_dim("dim_new", dim_new)
        if dim_new > 65536:
            raise ValueError(f"dim_new={dim_new}: Qdrant vectors have at most 65536 dimensions")
        try:
            exists = client.collection_exists(collection)
        except ValueError as exc:
            raise ValueError(f"collection={collection!r} is not a usable collection name: {exc}") from None
        if not exists:
            raise ValueError(f"there is no collection {collection!r} to adopt: give the name of the collection that "
                             "serves (client.get_collections() lists them), or start a fresh one with "
                             "QdrantBackfillIndex(client, collection, dim_old, dim_new)")
        params = client.get_collection(collection).config.params
        dense, sparse = _dense_vectors(params), sorted(params.sparse_vectors or {})
        where = f"collection {collection!r} ({_describe(params.vectors)}"
        where += f"; sparse vectors {sparse})" if sparse else ")"
        if sparse:
            raise ValueError(f"{where} has sparse vectors: QdrantBackfillIndex adopts a collection whose points hold "
                             "one dense vector (a hybrid search would not be migrated, and points added during the "
                             "migration would lack them); migrate it into a new collection instead")
        resume = new_vector in dense
        others = [name for name in dense if name != new_vector]
        if not others:
            raise ValueError(f"{where} has no vector to migrate from" + (
                f": its only vector is already {new_vector!r} (a finalized migration? it needs no index: query it "
                f"with using={new_vector!r}); to adopt a collection whose vector is called {new_vector!r}, pass "
                "another new_vector=" if resume else ""))
        if len(others) > 1:
            raise ValueError(f"{where} has {len(others)} dense vectors other than {new_vector!r} ({others}): "
                             "QdrantBackfillIndex adopts a collection whose points hold one vector; migrate it "
                             "into a new collection instead (QdrantBackfillIndex(client, new_name, dim_old, "
                             "dim_new) and add_old)")
        old_name = others[0]
        index = cls.__new__(cls)
        index._setup(client, collection, _check_dim("dim_old", dense[old_name].size), dim_new, psi, search_params,
                     score_maps, adopted=True, names=(old_name, new_vector))
        index._check_collection(adopting=not resume)
        index._check_ids()
        if not resume:
            index._check_old_vectors()
            index._add_new_vector()
        index._check_points()
        return index

    def _add_new_vector(self) -> None:
        models = _models()
        new, since = self._names["new"], ".".join(map(str, CREATE_VECTOR_NAME_SINCE))
        cannot = (f"collection {self.collection!r} cannot get the named vector {new!r} in place")
        alternative = ("; or migrate into a new collection: QdrantBackfillIndex(client, new_name, dim_old, dim_new), "
                       "add_old the gallery and backfill it there")
        if not callable(getattr(self.client, "create_vector_name", None)):
            raise RuntimeError(f"{cannot}: this qdrant-client has no create_vector_name (added in qdrant-client "
                               f"{since}): pip install -U 'qdrant-client>={since}' (the server must be {since} or "
                               f"later too){alternative}")
        version = _server_version(self.client)
        if version is not None and version < CREATE_VECTOR_NAME_SINCE:
            raise RuntimeError(f"{cannot}: the Qdrant server is version {version[0]}.{version[1]}, and adding a vector "
                               f"to an existing collection needs Qdrant {since} or later: upgrade the server"
                               f"{alternative}")
        config = models.DenseVectorNameConfig(dense=models.DenseVectorConfig(
            size=self.dim_new, distance=self._distance["old"]))
        try:
            self.client.create_vector_name(self.collection, new, config, wait=True)
        except Exception as exc:
            raise RuntimeError(f"{cannot}: Qdrant refused create_vector_name ({type(exc).__name__}: {exc}); it needs "
                               f"a Qdrant server and qdrant-client {since} or later{alternative}") from None

    def _check_old_vectors(self) -> None:
        """Refuse a dot-product collection holding a vector that is not unit-norm, or a point without one."""
        models = _models()
        name = self._names["old"]
        without = self.client.count(self.collection, count_filter=models.Filter(
            must_not=[models.HasVectorCondition(has_vector=name)]), exact=True).count
        if without:
            points, _ = self.client.scroll(self.collection, scroll_filter=models.Filter(
                must_not=[models.HasVectorCondition(has_vector=name)]), limit=1, with_payload=False, with_vectors=False)
            pid = points[0].id if points else "?"
            more = f" (and {without - 1} more)" if without > 1 else ""
            what = "unnamed vector" if name == "" else f"vector {name!r}"
            raise ValueError(f"collection {self.collection!r}: point {pid!r}{more} holds no {what}: every point must "
                             "hold the vector being migrated; give it one "
                             f"(client.update_vectors) or delete it (client.delete({self.collection!r}, "
                             f"points_selector=[{pid!r}])) before adopting")
        if self._distance["old"] != models.Distance.DOT:
            return  # cosine: Qdrant scores normalised vectors
        tol = _SAME_ATOL[self._datatype["old"]] + UNIT_NORM_TOL
        offset = None
        while True:
            points, offset = self.client.scroll(self.collection, limit=1024, offset=offset, with_payload=False,
                                                with_vectors=[name])
            for point in points:
                norm = float(np.linalg.norm(np.asarray(self._vector(point.vector, "old"), dtype=np.float64)))
                if not abs(norm - 1.0) <= tol:
                    raise ValueError(f"collection {self.collection!r} uses the dot product and point {point.id!r} "
                                     f"has a vector of norm {norm:.6g}, not 1: the merged search compares scores "
                                     "of unit vectors (cosines); normalise the vectors (client.update_vectors) or "
                                     "serve the collection with the cosine distance, then adopt it")
            if offset is None:
                return

    # ---- rollback and finalize (adopted collections) ------------------------------------------

    def _require_adopted(self, what: str) -> None:
        if not self._adopted:
            raise ValueError(f"{what} needs an adopted collection (QdrantBackfillIndex.adopt): in this index's "
                             f"collection {self.collection!r} a backfill replaces each point's old vector, so "
                             "there is nothing to roll back to or drop")

    def rollback_cost(self) -> dict:
        """What keeping the way back costs now: the old vectors of the backfilled points.

        Returns
        -------
        dict
            ``possible`` (bool: an adopted collection), ``points_kept`` (backfilled points that
            keep their old vector), ``dim_old``, ``bytes_per_number`` (of the old vector's
            datatype: 4 for float32, 2 for float16), ``bytes`` (``points_kept × dim_old ×
            bytes_per_number``, the raw vectors; a server adds the old vector's HNSW links),
            ``points_added`` (points holding only the new vector, added with ``add`` during the
            migration: a rollback removes them) and ``text``, one line saying it.

        Raises
        ------
        RuntimeError
            If the collection was deleted underneath the index, or the migration was rolled
            back or finalized.
        """
        models = _models()
        bpn = _BYTES_PER_NUMBER[self._datatype["old"]]
        if not self._adopted:
            return {"possible": False, "points_kept": 0, "dim_old": self.dim_old, "bytes_per_number": bpn, "bytes": 0,
                    "points_added": 0, "text": "no rollback: a backfill of this (not adopted) collection replaces "
                                               "each point's old vector; nothing is kept"}
        has_old, has_new = (models.HasVectorCondition(has_vector=self._names[p]) for p in PARTS)
        with self._lock.read():
            kept = int(self._call("count", count_filter=models.Filter(must=[has_old, has_new]), exact=True).count)
            added = int(self._call("count", count_filter=models.Filter(must=[has_new], must_not=[has_old]),
                                   exact=True).count)
        n_bytes = kept * self.dim_old * bpn
        text = (f"rollback keeps the old vectors of {kept} backfilled points in Qdrant: {kept} x {self.dim_old} x "
                f"{bpn} B = {_human_bytes(n_bytes)} (plus their index on a server) until finalize")
        if added:
            text += f"; a rollback would remove the {added} point(s) added during the migration"
        return {"possible": True, "points_kept": kept, "dim_old": self.dim_old, "bytes_per_number": bpn,
                "bytes": n_bytes, "points_added": added, "text": text}

    def rollback(self) -> dict:
        """Return an adopted collection to the state before adoption: drop the new vector.

        The points added during the migration (holding only the new vector) are removed, then
        the new vector is dropped from every point and from the collection's schema
        (``client.delete_vector_name``). The old vectors and the payloads were never rewritten:
        they are as before adoption, bit for bit. Points removed during the migration stay
        removed. Qdrant keeps the schema of a collection that had the unnamed vector as a map
        ``{"": params}`` (the unnamed vector under its empty name): reads, writes and queries
        without a vector name work as before. Afterwards this index no longer serves the
        collection (its methods raise); ``adopt`` again to start over.

        Returns
        -------
        dict
            ``points`` (points in the collection after the rollback), ``dropped_new_vectors``
            (new vectors dropped from old points) and ``removed_points`` (points added during
            the migration, removed).

        Raises
        ------
        ValueError
            If the index was not adopted (a backfill there replaced the old vectors).
        RuntimeError
            If the collection was deleted underneath the index, the migration was already
            rolled back or finalized, or Qdrant refused to drop the vector (the message says
            what to do; repeating the call after a crash finishes it).
        """
        self._require_adopted("rollback")
        models = _models()
        has_old, has_new = (models.HasVectorCondition(has_vector=self._names[p]) for p in PARTS)
        with self._lock.write():
            added, offset = [], None
            only_new = models.Filter(must=[has_new], must_not=[has_old])
            while True:
                points, offset = self._call("scroll", scroll_filter=only_new, limit=10_000, offset=offset,
                                            with_payload=False, with_vectors=False)
                added += [p.id for p in points]
                if offset is None:
                    break
            dropped = int(self._call("count", count_filter=models.Filter(must=[has_old, has_new]), exact=True).count)
            if added:
                self._call("delete", points_selector=models.PointIdsList(points=added), wait=True)
            try:
                self._call("delete_vector_name", self._names["new"], wait=True)
            except Exception as exc:
                raise RuntimeError(f"Qdrant could not drop the vector {self._names['new']!r} of collection "
                                   f"{self.collection!r} ({type(exc).__name__}: {exc}): the collection still serves "
                                   "the old vectors; retry rollback (a Qdrant server needs 1.18 or later), or clear "
                                   f"the new values with client.delete_vectors({self.collection!r}, "
                                   f"[{self._names['new']!r}], <all points>)") from None
            self._ended = "rolled back"
            points = int(self.client.count(self.collection, exact=True).count)
        return {"points": points, "dropped_new_vectors": dropped, "removed_points": len(added)}

    def finalize(self) -> dict:
        """End a finished migration: drop the old vector (rollback is no longer possible).

        Refused unless every point is stored new. Then the old vector is dropped from every
        point and from the collection's schema (``client.delete_vector_name``, which also works
        for the unnamed vector once the collection has the new one); the collection serves the
        new vector alone (query it with ``using=`` the new vector's name). The attached ``psi``
        and ``score_maps`` are dropped, and this index no longer serves the collection (its
        methods raise).

        Returns
        -------
        dict
            ``points`` (all stored new), ``dropped_old_vectors`` (old vectors removed) and
            ``freed_bytes`` (their raw size, as :meth:`QdrantBackfillIndex.rollback_cost`).

        Raises
        ------
        ValueError
            If the index was not adopted, or a point is still stored old (finish the backfill
            first; rollback stays possible).
        RuntimeError
            If the collection was deleted underneath the index, the migration was already
            rolled back or finalized, or Qdrant refused to drop the old vector (the message
            says what to do).
        """
        self._require_adopted("finalize")
        with self._lock.write():
            total, n_new = self._check_points()
            has_old = _models().Filter(must=[self._has("old")])
            with_old = int(self._call("count", count_filter=has_old, exact=True).count)
            if n_new < total:
                raise ValueError(f"{total - n_new} of {total} points of collection {self.collection!r} are still "
                                 f"stored old (progress {n_new / total:.1%}): finish the backfill (run_backfill, or "
                                 "'backfill resume') before finalize; rollback() is still possible")
            try:
                self._call("delete_vector_name", self._names["old"], wait=True)
            except Exception as exc:
                raise RuntimeError(f"every point of collection {self.collection!r} is stored new, but Qdrant could not "
                                   f"drop {_vector_label(self._names['old'])} ({type(exc).__name__}: {exc}): the "
                                   "collection serves correctly and rollback stays possible; to free the space, "
                                   f"retry finalize on Qdrant 1.18 or later, or clear the old values with "
                                   f"client.delete_vectors({self.collection!r}, [{self._names['old']!r}], "
                                   "<all points>)") from None
            self._ended = "finalized"
            self.psi, self.score_maps = None, None
        return {"points": total, "dropped_old_vectors": with_old,
                "freed_bytes": with_old * self.dim_old * _BYTES_PER_NUMBER[self._datatype["old"]]}

    def stored_vectors(self, ids) -> tuple[np.ndarray, list]:
        """What is stored for each id: its part and the vector searched for it.

        For a point stored new, the new vector (an adopted collection also keeps its old vector
        until ``finalize``: it is not returned here); for a point stored old, the old vector.
        Exact as Qdrant returns it: float32 values (float16 storage on a server rounds them; a
        cosine collection may return the vector normalised, as Qdrant scores it).

        Parameters
        ----------
        ids : int or array of ints
            Ids of stored points (repeats allowed).

        Returns
        -------
        parts : array of str
            ``"old"`` or ``"new"`` per id.
        vectors : list of arrays of float32
            The vector of each id (``dim_old`` or ``dim_new`` long, after its part).

        Raises
        ------
        TypeError
            If ``ids`` is not integer.
        ValueError
            If an id is not in the index or its point holds a combination of vectors this class
            cannot represent.
        RuntimeError
            If the collection was deleted underneath the index.
        """
        ids = _ids_arg(ids)
        with self._lock.read():
            unique = np.unique(ids)
            stored = self._stored(unique) if len(unique) else {}
        unknown = [i for i in unique.tolist() if i not in stored]
        if unknown:
            raise ValueError(f"ids {unknown[:5]} are not in the index")
        parts, vectors = [], []
        for i in ids.tolist():
            holds, _, vector = stored[i]
            part = self._part_of(i, holds)
            parts.append(part)
            vectors.append(np.asarray(self._vector(vector, part), dtype=np.float32))
        return np.array(parts, dtype="<U3"), vectors

    def _read(self, part: str, ids) -> np.ndarray:
        parts, vectors = self.stored_vectors(ids)
        elsewhere = np.asarray(_ids_arg(ids))[parts != part]
        if len(elsewhere):
            raise ValueError(f"ids {elsewhere[:5].tolist()} are stored {'new' if part == 'old' else 'old'}, not {part}: "
                             "stored_vectors(ids) reads each id from the part it is stored in")
        if not vectors:
            return np.zeros((0, self._dims[part]), dtype=np.float32)
        return np.stack(vectors)

    def old_vectors(self, ids) -> np.ndarray:
        """The old vectors of points stored old, read back from Qdrant (as ``stored_vectors``).

        Parameters
        ----------
        ids : int or array of ints
            Ids of points stored old (repeats allowed).

        Returns
        -------
        array (len(ids), dim_old) of float32
            One row per id, in the order of ``ids``.

        Raises
        ------
        TypeError
            If ``ids`` is not integer.
        ValueError
            If an id is not in the index or is stored new.
        RuntimeError
            If the collection was deleted underneath the index.
        """
        return self._read("old", ids)

    def new_vectors(self, ids) -> np.ndarray:
        """The new vectors of points stored new, read back from Qdrant (as ``stored_vectors``).

        Parameters
        ----------
        ids : int or array of ints
            Ids of points stored new (repeats allowed).

        Returns
        -------
        array (len(ids), dim_new) of float32
            One row per id, in the order of ``ids``.

        Raises
        ------
        TypeError
            If ``ids`` is not integer.
        ValueError
            If an id is not in the index or is stored old.
        RuntimeError
            If the collection was deleted underneath the index.
        """
        return self._read("new", ids)

    @property
    def adopted(self) -> bool:
        """Whether the index was attached with ``adopt`` (a backfilled point keeps its old vector)."""
        return self._adopted

    @property
    def vector_names(self) -> dict:
        """``{"old": name, "new": name}``: the Qdrant vector of each part (``""``: the unnamed vector)."""
        return dict(self._names)

    # ---- properties --------------------------------------------------------------------------

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

    # ---- the collection's layout ---------------------------------------------------------------

    def _check_vector_params(self, part: str, p, where: str) -> None:
        """Refuse a multivector or an integer datatype for ``part``'s vector; note its datatype."""
        name = self._names[part]
        if getattr(p, "multivector_config", None) is not None:
            raise ValueError(f"{where}: its vector {name!r} is a multivector; QdrantBackfillIndex stores one vector "
                             "per point: use another collection" + (" name" if not self._adopted else ""))
        datatype = getattr(getattr(p, "datatype", None), "value", None)
        if datatype not in _SAME_ATOL:
            raise ValueError(f"{where}: its vector {name!r} stores {datatype} numbers, which cannot hold unit-norm "
                             "embeddings (they would be rounded to integers); use float32 or float16 vectors "
                             "(another collection" + (" name)" if not self._adopted else ")"))
        self._atol[part] = _SAME_ATOL[datatype]
        self._datatype[part] = datatype

    def _check_collection(self, adopting: bool = False) -> None:
        if self._adopted:
            return self._check_adopted_collection(adopting)
        models = _models()
        params = self.client.get_collection(self.collection).config.params
        vectors, sparse = params.vectors, params.sparse_vectors
        have = _describe(vectors)
        for name, dim in self._dims.items():
            p = vectors.get(name) if isinstance(vectors, dict) else None
            if p is None or p.size != dim or p.distance != models.Distance.DOT:
                raise ValueError(f"collection {self.collection!r} exists but has no named vector {name!r} of size "
                                 f"{dim} with the dot product (it has {have}): pass its dimensions as dim_old and "
                                 "dim_new, or use another collection name (a collection that serves one vector per "
                                 "point, or was adopted, is attached with QdrantBackfillIndex.adopt)")
            self._check_vector_params(name, p, f"collection {self.collection!r}")
        self._distance = {part: models.Distance.DOT for part in PARTS}
        others = sorted(set(vectors) - set(PARTS)) + sorted(sparse or {})
        if others:
            raise ValueError(f"collection {self.collection!r} has other vectors too ({others}): a backfill rewrites a "
                             "point with its new vector alone and would delete them; use a collection with only "
                             "'old' and 'new' vectors")

    def _check_adopted_collection(self, adopting: bool) -> None:
        models = _models()
        params = self.client.get_collection(self.collection).config.params
        dense, sparse = _dense_vectors(params), sorted(params.sparse_vectors or {})
        old, new = self._names["old"], self._names["new"]
        where = f"collection {self.collection!r} ({_describe(params.vectors)})"
        expected = {old} if adopting else {old, new}
        if set(dense) != expected or sparse:
            raise ValueError(f"{where} no longer has exactly {' and '.join(map(_vector_label, sorted(expected)))}"
                             + (f" (it has sparse vectors {sparse})" if sparse else "")
                             + ": it was changed by another client; adopt it again (QdrantBackfillIndex.adopt)")
        ok = (models.Distance.DOT, models.Distance.COSINE)
        self._distance = {}
        for part in PARTS if not adopting else ("old",):
            p = dense[self._names[part]]
            if p.distance not in ok:
                raise ValueError(f"{where}: {_vector_label(self._names[part])} uses the {p.distance.value} distance; "
                                 "QdrantBackfillIndex merges dot products and cosines of unit vectors. For unit "
                                 "vectors, Euclidean distance ranks as the dot product does: copy the points into a "
                                 "collection with the dot product or cosine and adopt that one")
            self._check_vector_params(part, p, where)
            self._distance[part] = p.distance
        if dense[old].size != self.dim_old:
            raise ValueError(f"{where}: {_vector_label(old)} has size {dense[old].size}, not {self.dim_old} (changed "
                             "by another client?); adopt it again")
        if not adopting and dense[new].size != self.dim_new:
            raise ValueError(f"{where} has the vector {new!r} of size {dense[new].size}, not dim_new={self.dim_new}: "
                             f"pass dim_new={dense[new].size} to go on with that migration, or roll it back "
                             "(adopt with that size, then rollback()) before adopting with another new model")
        if adopting:
            self._distance["new"] = self._distance["old"]

    def _check_points(self) -> tuple[int, int]:
        """``(points, points stored new)``, after checking that each point is one this class can
        represent; raises naming one that is not."""
        models = _models()
        has = [self._has(p) for p in PARTS]
        total, n_old, n_new = self._count(), self._count("old"), self._count("new")
        # n_old + n_new = total + (points counted in both) - (points in neither): when the two
        # sides agree, there are as many of each, and counting one kind settles it. An adopted
        # collection counts a point holding both vectors as new, so only "neither" is wrong.
        neither = models.Filter(must_not=has)
        if n_old + n_new != total or self._call("count", count_filter=neither, exact=True).count:
            bad = neither if self._adopted else models.Filter(should=[neither, models.Filter(must=has)])
            points, _ = self._call("scroll", scroll_filter=bad, limit=1, with_payload=False,
                                   with_vectors=list(self._names.values()))
            if points:  # (else another client wrote between the counts: nothing to report)
                pid = points[0].id
                _point_id(pid, self.collection)
                raise self._invalid(pid, self._held(points[0].vector))
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
        if self._ended is not None:
            raise RuntimeError(self._ended_message())
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

    def _ended_message(self) -> str:
        if self._ended == "finalized":
            return (f"the migration of collection {self.collection!r} was finalized: the collection serves the vector "
                    f"{self._names['new']!r} alone; query it directly (client.query_points(..., "
                    f"using={self._names['new']!r}))")
        return (f"the migration of collection {self.collection!r} was rolled back: the collection serves "
                f"{_vector_label(self._names['old'])} as before adoption; adopt it again "
                "(QdrantBackfillIndex.adopt) to start over")

    def _changed(self) -> str | None:
        """What is wrong with the collection's vectors now, or None."""
        try:
            self._check_collection()
        except ValueError as exc:
            return str(exc)
        return None

    # ---- what a point holds ----------------------------------------------------------------------

    def _has(self, part: str):
        return _models().HasVectorCondition(has_vector=self._names[part])

    def _held(self, vector) -> tuple:
        """The parts (``old``/``new``) whose vector a retrieved point holds, in that order."""
        if isinstance(vector, dict):
            names = set(vector)
        else:  # a bare list is the unnamed vector; None holds nothing
            names = set() if vector is None else {""}
        return tuple(p for p in PARTS if self._names[p] in names)

    def _part_of(self, pid, holds: tuple) -> str:
        """The part a point holding ``holds`` is stored in, or raise naming it."""
        if self._adopted:
            if "new" in holds:
                return "new"
            if holds == ("old",):
                return "old"
        elif len(holds) == 1:
            return holds[0]
        raise self._invalid(pid, holds)

    def _vector(self, vector, part: str):
        name = self._names[part]
        return vector[name] if isinstance(vector, dict) else vector

    def _invalid(self, pid, holds: tuple) -> ValueError:
        if not self._adopted:
            return _invalid_point(pid, holds, self.collection)
        return ValueError(
            f"point {pid!r} of collection {self.collection!r} holds neither {_vector_label(self._names['old'])} nor "
            f"the new vector {self._names['new']!r}, so it is neither stored old nor stored new and progress, "
            "old_ids and new_ids cannot count it (another client deleted its vectors): remove it "
            f"(index.remove([{pid!r}])) and add it again with add_old or add")

    def _part_filter(self, part: str):
        models = _models()
        if self._adopted and part == "old":
            return models.Filter(must=[self._has("old")], must_not=[self._has("new")])
        return models.Filter(must=[self._has(part)])

    # ---- state -------------------------------------------------------------------------------

    def _count(self, part: str | None = None) -> int:
        flt = None if part is None else self._part_filter(part)
        return int(self._call("count", count_filter=flt, exact=True).count)

    @property
    def n_old(self) -> int:
        """Number of points stored old (holding an old vector and, if adopted, no new one)."""
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
        self._check_points()
        flt = self._part_filter(part)
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
        records = self._call("retrieve", ids.tolist(), with_payload=True, with_vectors=list(self._names.values()))
        return {int(r.id): (self._held(r.vector), r.payload, r.vector) for r in records}

    def _same(self, part: str, stored_vectors, x: np.ndarray) -> bool:
        v = np.asarray(self._vector(stored_vectors, part), dtype=np.float32)
        return v.shape == x.shape and bool(np.all(np.abs(v - x) <= self._atol[part]))

    def _upsert(self, ids: np.ndarray, x: np.ndarray, part: str, payloads=None, backfill: bool = False) -> None:
        models = _models()
        name = self._names[part]
        if self._adopted and backfill:
            # A backfill of an adopted collection adds the new vector and leaves the old one
            # (and the payload) as it is: the way back.
            points = [models.PointVectors(id=int(i), vector={name: v.tolist()}) for i, v in zip(ids, x)]
            self._call("update_vectors", points=points, wait=True)
            return
        points = [models.PointStruct(id=int(i), vector={name: v.tolist()},
                                     payload=None if payloads is None else payloads[j])
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
                if self._part_of(i, holds) != part:
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

        In an adopted collection (:meth:`QdrantBackfillIndex.adopt`) the new vector is added
        next to the old one instead (one ``update_vectors`` request), which is kept for
        :meth:`QdrantBackfillIndex.rollback` until :meth:`QdrantBackfillIndex.finalize`.
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
                if self._part_of(i, holds) == "new":
                    todo[j] = False
                    if not self._same("new", vectors, x[j]):
                        again.append(i)
            if again:
                raise ValueError(f"ids {again[:5]} are already backfilled (stored new, with other vectors)")
            if todo.any():
                self._upsert(ids[todo], x[todo], "new", [stored[i][1] for i in ids[todo].tolist()], backfill=True)

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
            New-model query vectors, unit-norm rows: ``φ_n(q)`` when the attached bridge makes
            the queries (``ψ̂`` for the points stored old and, if it has a learned ``ρ``,
            ``ρ̂(φ_n(q))`` for the points stored new, as
            :meth:`backfill_lib.live_index.OnlineBackfillIndex.search`); the vectors to score the
            points stored new with when ``query_old`` is given.
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
        elif psi is not None:  # ψ̂ for the points stored old, and ρ̂ for the new ones if it has a ρ
            qn, qo = _bridge_queries(psi, qn, self.dim_new, self.dim_old)
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
        name = self._names[part]
        # The old vector of an adopted collection is searched over the points without a new one.
        flt = models.Filter(must_not=[self._has("new")]) if self._adopted and part == "old" else None
        requests = [models.QueryRequest(query=row.tolist(), using=name or None, filter=flt, limit=limit,
                                        params=self.search_params, with_payload=False, with_vector=False) for row in q]
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
