"""The evaluation engine as it was before backfill_lib.evaluation (kept as a reference).

One full sort of every merged score row at every ratio: simple and obviously right, and ~25×
one argsort of the score matrix. Used by tests/test_eval_engine.py and benchmarks/eval_speed.py.

Its tie rule is the stable sort's: descending score, ties broken by the smaller gallery index,
for top-k *and* for average precision (the library now counts a tied group as one threshold in
AP, as scikit-learn does), so AP differs from the library's only when scores tie exactly.
"""

from __future__ import annotations

import numpy as np


def _ranked_relevance(scores, relevant):
    order = np.argsort(-scores, axis=1, kind="stable")
    return np.take_along_axis(relevant, order, axis=1)


def average_precision(scores, relevant):
    """AP of each row of the ranking by (descending score, smaller index); nan without relevant items."""
    ranked = _ranked_relevance(scores, relevant)
    hits = np.cumsum(ranked, axis=1)
    ranks = np.arange(1, scores.shape[1] + 1)
    precision_at_hit = np.where(ranked, hits / ranks, 0.0)
    n_rel = ranked.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n_rel > 0, precision_at_hit.sum(axis=1) / n_rel, np.nan)


def topk_hits(scores, relevant, ks=(1, 5)):
    """Whether a relevant item is among the top k of each row, for each k."""
    top = np.argsort(-scores, axis=1, kind="stable")[:, :max(ks)]
    rel_top = np.take_along_axis(relevant, top, axis=1)
    return {k: rel_top[:, :k].any(axis=1) for k in ks}


def reference_states(query_old, gallery_old, query_new, gallery_new, query_labels, gallery_labels, order,
                     n_backfilled, exclude_self=False, ks=(1, 5), chunk_size=1024):
    """Per-query AP and top-k hits at each state, by sorting every merged row (the old engine).

    Same arguments as :func:`backfill_lib.evaluation.evaluate_states` (arrays already valid).
    Returns ``(ap, hits)`` with ``ap`` of shape (n_states, n_q) and ``hits[k]`` likewise.
    """
    qo, go = np.asarray(query_old, np.float32), np.asarray(gallery_old, np.float32)
    qn, gn = np.asarray(query_new, np.float32), np.asarray(gallery_new, np.float32)
    qy, gy = np.asarray(query_labels), np.asarray(gallery_labels)
    n, n_q = len(go), len(qo)
    masks = []
    for m in n_backfilled:
        mask = np.zeros(n, dtype=bool)
        mask[np.asarray(order)[:m]] = True
        masks.append(mask)
    ap = np.zeros((len(masks), n_q))
    hits = {k: np.zeros((len(masks), n_q), dtype=bool) for k in ks}
    for start in range(0, n_q, chunk_size):
        rows = slice(start, min(start + chunk_size, n_q))
        s_old = qo[rows] @ go.T
        s_new = qn[rows] @ gn.T
        relevant = qy[rows, None] == gy[None, :]
        if exclude_self:
            idx = np.arange(rows.start, rows.stop)
            relevant[idx - rows.start, idx] = False
        for i, mask in enumerate(masks):
            scores = np.where(mask[None, :], s_new, s_old)
            if exclude_self:
                scores[idx - rows.start, idx] = -np.inf
            ap[i, rows] = average_precision(scores, relevant)
            h = topk_hits(scores, relevant, ks)
            for k in ks:
                hits[k][i, rows] = h[k]
    return ap, hits
