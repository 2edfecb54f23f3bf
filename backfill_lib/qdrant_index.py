"""The online backfill on a vector database: :class:`QdrantBackfillIndex`, on Qdrant.

The same methods as :class:`~backfill_lib.live_index.OnlineBackfillIndex`, over one Qdrant
collection whose points have two named vectors, ``old`` and ``new``. A point holds only the
vector it is stored with; :meth:`QdrantBackfillIndex.backfill` rewrites a batch of points with
their ``new`` vector in one upsert (which drops the ``old`` one and keeps the payload), and a
search queries each named vector and merges the two lists, ties broken by the smaller id.

Qdrant is an optional dependency: ``pip install "backfill_lib[qdrant]"`` (or ``qdrant-client``).
The tests run qdrant-client's embedded local mode (``QdrantClient(":memory:")`` or ``path=``);
the same code runs against a Qdrant server or cluster (``QdrantClient(url=...)``).

What Qdrant guarantees and what this class adds: one upsert request is applied whole (per
shard), and each point holds one vector at any moment. The two named-vector queries of a search
are two requests, so a search and a backfill batch in *this process* are serialised by a
readers-writer lock (a search sees each item exactly once); writers in other processes can move
a point between the two requests, in which case a duplicate is dropped but an item may be
missed by that one search.
"""

from __future__ import annotations

import numpy as np

from .live_index import _check_dim, _check_psi, _merged_topk, _RWLock, _TwoPartWrites
from .retrieval import _as_ids
from .validation import as_embeddings, check_no_repeats

PARTS = ("old", "new")


def _models():
    try:
        from qdrant_client import models
    except ImportError:
        raise ImportError("QdrantBackfillIndex needs qdrant-client, an optional dependency: "
                          "pip install 'backfill_lib[qdrant]' (or pip install qdrant-client)") from None
    return models


class QdrantBackfillIndex(_TwoPartWrites):
    """A Qdrant collection being backfilled while it serves: points stored old or new.

    Parameters
    ----------
    client : qdrant_client.QdrantClient
        A connected client: ``QdrantClient(":memory:")`` or ``QdrantClient(path=...)`` (embedded
        local mode) or ``QdrantClient(url="http://host:6333")`` (a server or cluster).
    collection : str
        Collection name. It is created (two named vectors, dot product) if it does not exist;
        an existing one must have the named vectors ``old`` (``dim_old``) and ``new``
        (``dim_new``) with the dot product.
    dim_old : int
        Dimension of the old vectors.
    dim_new : int
        Dimension of the new vectors.
    psi : object, optional
        The fitted reverse transformation: ``transform(X)`` maps new-model rows to unit-norm
        old-space rows (e.g. :class:`backfill_lib.transforms.ReverseTransform`). Not stored in
        Qdrant: keep it with the service.
    search_params : qdrant_client.models.SearchParams, optional
        Passed to every query, e.g. ``SearchParams(exact=True)`` for exact search on a server
        (which otherwise searches its HNSW graph). Local mode is always exact.

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
        The attached reverse transformation.

    Raises
    ------
    ImportError
        If qdrant-client is not installed.
    TypeError
        If ``collection`` is not a non-empty string or ``psi`` has no ``transform`` method.
    ValueError
        If a dimension is not a positive integer or an existing collection has other vectors.
    """

    # One implementation for both backends (_TwoPartWrites); bound here so each class documents them.
    add_old, add, remove = _TwoPartWrites.add_old, _TwoPartWrites.add, _TwoPartWrites.remove

    def __init__(self, client, collection: str, dim_old: int, dim_new: int, psi=None, search_params=None):
        models = _models()
        if not isinstance(collection, str) or not collection:
            raise TypeError(f"collection must be a non-empty string, got {collection!r}")
        self.client, self.collection = client, collection
        self.dim_old, self.dim_new = _check_dim("dim_old", dim_old), _check_dim("dim_new", dim_new)
        self.psi = _check_psi(psi)
        self.search_params = search_params
        self._dims = {"old": self.dim_old, "new": self.dim_new}
        self._lock = _RWLock()
        if client.collection_exists(collection):
            self._check_collection()
        else:
            client.create_collection(collection, vectors_config={
                name: models.VectorParams(size=dim, distance=models.Distance.DOT) for name, dim in self._dims.items()})

    def _check_collection(self) -> None:
        models = _models()
        vectors = self.client.get_collection(self.collection).config.params.vectors
        for name, dim in self._dims.items():
            params = vectors.get(name) if isinstance(vectors, dict) else None
            if params is None or params.size != dim or params.distance != models.Distance.DOT:
                raise ValueError(f"collection {self.collection!r} exists but has no named vector {name!r} of size "
                                 f"{dim} with the dot product (it has {vectors}); use another collection name")

    # ---- state -------------------------------------------------------------------------------

    def _count(self, part: str | None = None) -> int:
        models = _models()
        flt = None if part is None else models.Filter(must=[models.HasVectorCondition(has_vector=part)])
        return int(self.client.count(self.collection, count_filter=flt, exact=True).count)

    @property
    def n_old(self) -> int:
        """Number of points stored old."""
        return self._count("old")

    @property
    def n_new(self) -> int:
        """Number of points stored new."""
        return self._count("new")

    @property
    def ntotal(self) -> int:
        """Number of points in the collection."""
        return self._count()

    def __len__(self) -> int:
        return self.ntotal

    @property
    def progress(self) -> float:
        """Share of the points stored new, in [0, 1] (0 when empty)."""
        with self._lock.read():
            total = self._count()
            return self._count("new") / total if total else 0.0

    def _ids_of(self, part: str) -> np.ndarray:
        models = _models()
        flt = models.Filter(must=[models.HasVectorCondition(has_vector=part)])
        ids, offset = [], None
        while True:
            points, offset = self.client.scroll(self.collection, scroll_filter=flt, limit=10_000, offset=offset,
                                                with_payload=False, with_vectors=False)
            ids += [p.id for p in points]
            if offset is None:
                return np.sort(np.array(ids, dtype=np.int64))

    def old_ids(self) -> np.ndarray:
        """Ids of the points still stored old, ascending (what a backfill job has left to do).

        Returns
        -------
        array of int64
            The ids at the time of the call.
        """
        with self._lock.read():
            return self._ids_of("old")

    def new_ids(self) -> np.ndarray:
        """Ids of the points stored new, ascending.

        Returns
        -------
        array of int64
            The ids at the time of the call.
        """
        with self._lock.read():
            return self._ids_of("new")

    # ---- writes --------------------------------------------------------------------------------

    def _stored(self, ids: np.ndarray) -> dict:
        """``{id: (part, payload)}`` of the ids that exist."""
        records = self.client.retrieve(self.collection, ids.tolist(), with_payload=True, with_vectors=True)
        out = {}
        for r in records:
            vectors = r.vector if isinstance(r.vector, dict) else {}
            part = "new" if "new" in vectors else "old"
            out[int(r.id)] = (part, r.payload)
        return out

    def _upsert(self, ids: np.ndarray, x: np.ndarray, part: str, payloads=None) -> None:
        models = _models()
        points = [models.PointStruct(id=int(i), vector={part: v.tolist()}, payload=None if payloads is None else payloads[j])
                  for j, (i, v) in enumerate(zip(ids, x))]
        # One request, applied whole; wait=True so that a search right after sees it.
        self.client.upsert(self.collection, points=points, wait=True)

    def _add(self, part: str, ids, x: np.ndarray) -> None:
        ids = _as_ids(ids, len(x))
        with self._lock.write():
            check_no_repeats(ids, "ids", "each item is stored once")
            present = sorted(self._stored(ids))
            if present:
                raise ValueError(f"ids {present[:5]} are already in the index: remove them first "
                                 "(or backfill them, to replace an old vector)")
            self._upsert(ids, x, part)

    def backfill(self, ids, new_vectors) -> None:
        """Rewrite points stored old with their new vector (the old one is deleted), in one upsert.

        Payloads are kept.

        Parameters
        ----------
        ids : array of n ints
            Ids of points stored old, each once.
        new_vectors : array (n, dim_new)
            Their new vectors, unit-norm rows.

        Raises
        ------
        TypeError
            If ``ids`` is not integer or ``new_vectors`` is not numeric.
        ValueError
            If ``new_vectors`` is not ``n`` finite unit-norm rows of width ``dim_new``, or
            ``ids`` repeats an id, or names a point that is unknown or already backfilled
            (nothing is written then).
        """
        x = as_embeddings(new_vectors, "new_vectors", dim=self.dim_new, unit_norm=True)
        ids = _as_ids(ids, len(x))
        with self._lock.write():
            check_no_repeats(ids, "ids", "each item is backfilled once")
            stored = self._stored(ids)
            unknown = [int(i) for i in ids if int(i) not in stored]
            if unknown:
                raise ValueError(f"ids {unknown[:5]} are not in the index")
            again = [int(i) for i in ids if stored[int(i)][0] == "new"]
            if again:
                raise ValueError(f"ids {again[:5]} are already backfilled (stored new)")
            self._upsert(ids, x, "new", [stored[int(i)][1] for i in ids])

    def _remove(self, ids: np.ndarray) -> None:
        models = _models()
        stored = self._stored(ids)
        unknown = [int(i) for i in ids if int(i) not in stored]
        if unknown:
            raise ValueError(f"ids {unknown[:5]} are not in the index")
        self.client.delete(self.collection, points_selector=models.PointIdsList(points=ids.tolist()), wait=True)

    # ---- search --------------------------------------------------------------------------------

    def search(self, query_new, k: int, query_old=None) -> tuple[np.ndarray, np.ndarray]:
        """Merged top-``k`` over the ``old`` and ``new`` vectors: ``(scores, ids)``, ties by smaller id.

        Parameters
        ----------
        query_new : array (n_q, dim_new)
            New-model query vectors, unit-norm rows.
        k : int
            Results per query, at least 1; rows are padded with ``-1`` / ``-inf`` when the
            collection holds fewer than ``k`` points.
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
            numbers of rows, ``k < 1``, or points are stored old but neither ``query_old`` nor
            ``psi`` is given.
        """
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
            raise TypeError(f"k must be a positive integer, got {type(k).__name__}")
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        k = int(k)
        qn = as_embeddings(query_new, "query_new", dim=self.dim_new, unit_norm=True)
        if query_old is not None:
            qo = as_embeddings(query_old, "query_old", dim=self.dim_old, unit_norm=True)
        elif self.psi is not None:
            qo = as_embeddings(self.psi.transform(qn), "psi.transform(query_new)", dim=self.dim_old, unit_norm=True)
        else:
            qo = None
        if qo is not None and len(qo) != len(qn):
            raise ValueError(f"the old query has {len(qo)} rows but query_new has {len(qn)}: one of each per query")
        with self._lock.read():
            parts = [("new", qn)]
            if qo is not None:
                parts.insert(0, ("old", qo))
            elif self._count("old"):
                raise ValueError("points are stored old: give query_old (rank merge) or attach a fitted "
                                 "reverse transformation psi (index.psi = ReverseTransform(...).fit(...))")
            return self._merged_search(parts, k)

    def _query(self, part: str, q: np.ndarray, limit: int):
        models = _models()
        requests = [models.QueryRequest(query=row.tolist(), using=part, limit=limit, params=self.search_params,
                                        with_payload=False, with_vector=False) for row in q]
        responses = self.client.query_batch_points(self.collection, requests=requests)
        scores = np.full((len(q), limit), -np.inf, dtype=np.float32)
        ids = np.full((len(q), limit), -1, dtype=np.int64)
        for r, resp in enumerate(responses):
            for c, point in enumerate(resp.points[:limit]):
                scores[r, c], ids[r, c] = point.score, point.id
        return scores, ids

    def _merged_search(self, parts, k: int):
        # The merge of OnlineBackfillIndex; a point moved by another process between the two
        # queries would appear twice, so each merge drops repeats.
        sources = [(lambda q, width, part=part: self._query(part, q, width), None, q) for part, q in parts]
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
