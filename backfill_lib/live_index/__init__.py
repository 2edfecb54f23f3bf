"""A live index in the middle of an online backfill: one id space over two faiss indices.

This is the serving layer of the book (chapter 8). :class:`~backfill_lib.retrieval.MixedGallery`
is its small simulation twin: both keep every item in exactly one of two sub-indices (old vectors,
new vectors) and merge the two top-k lists; :class:`OnlineBackfillIndex` adds what a service
needs: any faiss index type per part, a reverse transformation ψ attached to the index (one
backbone pass per query, METHOD §2), removals, crash-safe ``save``/``load``, searches from
several threads while a backfill job writes (:mod:`backfill_lib.backfill_job`), and adoption of
the faiss index file that already serves (:meth:`OnlineBackfillIndex.from_faiss`).

Scores are inner products of unit vectors (larger is better). The merged ranking is the one of
the full merged score ``s(q, g)`` (old query against items stored old, new query against items
stored new), ties broken by the smaller id.

Where each concern lives (everything is imported from ``backfill_lib.live_index``):

* ``index``: :class:`OnlineBackfillIndex`, the bookkeeping of which item is stored where, the
  writes, the search, the checks of its arguments.
* :mod:`backfill_lib.live_index.parts`: the three storage layouts of a part (flat-codes types in
  chunks, ``IVF<nlist>,Flat`` list by list, one faiss index for the other IVF types and HNSW),
  which index types a part can serve, and what each layout does to memory during a backfill.
* :mod:`backfill_lib.live_index.merge`: the exact merged top-k of several searched lists.
* :mod:`backfill_lib.live_index.fileformat`: ``save``/``load``, the file's checks and checksums,
  crash-safe (atomic) writes and the temporary files of killed writers.
* :mod:`backfill_lib.live_index.adopt`: reading an existing faiss index file of old vectors into
  the old part (:meth:`OnlineBackfillIndex.from_faiss`).
* ``_lock``: the readers-writer lock that makes every write atomic for the searches.
"""

from __future__ import annotations

from ._lock import _RWLock
from .fileformat import (CHECKSUM, FILE_MAGIC, FILE_VERSION, HEADER_CHECKSUM, LEGACY_TEMP_AGE, _HOST, _atomic_write,
                         _remove_stale_temps, _seal)
from .index import PARTS, OnlineBackfillIndex, _check_dim, _check_psi, _check_score_maps, _check_spec, _TwoPartWrites
from .merge import _bridge_queries, _calibrated, _merged_topk
from .parts import CHUNK_ROWS, SUPPORTED_TYPES

__all__ = ["OnlineBackfillIndex", "CHUNK_ROWS", "CHECKSUM", "FILE_MAGIC", "FILE_VERSION", "HEADER_CHECKSUM",
           "LEGACY_TEMP_AGE", "PARTS", "SUPPORTED_TYPES"]
