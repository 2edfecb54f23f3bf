"""The merged top-k of several searched lists (both parts of a live index, a part's chunks).

Scores are inner products of unit vectors (larger is better). The merged ranking is the one of
the full merged score ``s(q, g)`` (old query against items stored old, new query against items
stored new), ties broken by the smaller id: the rule of
:func:`backfill_lib.retrieval.merge_topk`. Each list is searched for one more result than asked,
and searched again twice as wide for the queries whose last result ties the merged k-th score,
so the merge is exact however many items share a score. With score maps
(:attr:`backfill_lib.live_index.OnlineBackfillIndex.score_maps`), each list's scores are mapped
onto the calibrated scale before the merge. :class:`backfill_lib.qdrant_index.QdrantBackfillIndex`
merges its two named-vector searches with the same code.
"""

from __future__ import annotations

import numpy as np

from ..retrieval import _sorted_topk
from ..validation import as_embeddings


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


def _bridge_queries(psi, qn: np.ndarray, dim_new: int, dim_old: int) -> tuple[np.ndarray, np.ndarray]:
    """The two queries an attached bridge makes of the new model's query ``qn = φ_n(q)``.

    ``ψ̂(φ_n(q))`` searches the items stored old; the items stored new are searched with
    ``ρ̂(φ_n(q))`` when the bridge has a learned ``ρ`` (``psi.new_embedding``: the new vectors the
    backfill stored are ``ρ̂(φ_n(g))``), else with ``φ_n(q)`` itself. Searching ``ρ̂``-stored items
    with the raw query would rank them by the wrong geometry, without any error.
    """
    qo = as_embeddings(psi.transform(qn), "psi.transform(query_new)", dim=dim_old, unit_norm=True)
    if len(qo) != len(qn):
        raise ValueError(f"psi.transform returned {len(qo)} rows for {len(qn)} queries: one per query")
    new_embedding = getattr(psi, "new_embedding", None)
    if callable(new_embedding):
        qn = as_embeddings(new_embedding(qn), "psi.new_embedding(query_new)", dim=dim_new, unit_norm=True)
        if len(qn) != len(qo):
            raise ValueError(f"psi.new_embedding returned {len(qn)} rows for {len(qo)} queries: one per query")
    return qn, qo
