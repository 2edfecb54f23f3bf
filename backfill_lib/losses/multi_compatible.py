"""``L_mc`` over K stored sets: one softmax over the vectors of every version still in the gallery (METHOD §7; form ours).

The K-version form of :func:`~backfill_lib.losses.metric_compatible.metric_compatible_loss`.
After several upgrades the gallery holds vectors of versions ``1 … K``; a query is embedded by the
newest backbone only and compared with an item stored under version ``v`` through its own query
vector ``q_v(x_i)`` (``ψ̂_{K→v}(φ_K(x_i))`` for an older version, ``ρ̂(φ_K(x_i))`` for the newest).
For anchor ``i``:

* logits ``s^v_ij = q_v(x_i) · e_v(x_j) / τ`` for every version ``v`` and batch item ``j``, with
  ``e_v`` the vector stored under version ``v`` (``j = i`` left out of a set whose stored vectors
  are the anchor's own query vectors, the newest version's),
* positives ``P(i)``: same-label ``j`` in **every** set; one softmax over **all** sets,

``L = − mean_i 1/|P(i)| Σ_{p∈P(i)} log( exp(s_p) / Σ_{v, j} exp(s^v_ij) )``.

So a positive stored under any version must outscore a negative stored under any other: the
comparison a merged ranking over a gallery of K kinds of vectors makes. With two sets, ``old``
(``j = i`` kept) and ``new`` (``j = i`` left out), it is ``metric_compatible_loss`` with
``negatives="both"`` (tests/test_versions.py checks this).
"""

from __future__ import annotations

import torch

from ..validation import check_non_negative


def multi_compatible_loss(queries, stored, y: torch.Tensor, tau: float = 0.1, exclude_self=None) -> torch.Tensor:
    """``L_mc`` of a batch over K stored sets (see the module docstring).

    Parameters
    ----------
    queries : sequence of K tensors (B, d_v)
        ``queries[v]``: the L2-normalised query vector of each batch image against items stored
        under version ``v``.
    stored : sequence of K tensors (B, d_v)
        ``stored[v]``: the L2-normalised vector stored under version ``v`` for the same images.
        Pass frozen (cached) vectors for the old versions; gradients flow through whatever is
        given.
    y : tensor (B,)
        Labels.
    tau : float, default 0.1
        Temperature.
    exclude_self : sequence of K bool, optional
        Leave ``j = i`` out of set ``v`` (its stored vectors are the anchors' own query vectors,
        so ``s_ii`` would be a trivial positive). Default: only where ``stored[v] is queries[v]``.

    Returns
    -------
    torch.Tensor
        Scalar: the mean over anchors with at least one positive.

    Raises
    ------
    ValueError
        If ``queries`` and ``stored`` differ in length or are empty, ``tau`` is not positive,
        ``exclude_self`` has the wrong length, a query and its stored set differ in shape, or the
        sets do not have one row per label.
    """
    queries, stored = list(queries), list(stored)
    if len(queries) != len(stored) or not queries:
        raise ValueError(f"queries and stored must hold one tensor per version (K >= 1), got {len(queries)} and "
                         f"{len(stored)}")
    tau = check_non_negative(tau, "tau", "a temperature", strict=True)
    if exclude_self is None:
        exclude_self = [s is q for q, s in zip(queries, stored)]
    exclude_self = list(exclude_self)
    if len(exclude_self) != len(queries):
        raise ValueError(f"exclude_self must hold one bool per version ({len(queries)}), got {len(exclude_self)}")
    for v, (q, s) in enumerate(zip(queries, stored)):
        if q.shape != s.shape or len(q) != len(y):
            raise ValueError(f"queries[{v}] {tuple(q.shape)} and stored[{v}] {tuple(s.shape)} must have the same "
                             f"shape, one row per label ({len(y)})")
    same_label = y[:, None] == y[None, :]
    not_self = ~torch.eye(len(y), dtype=torch.bool, device=y.device)
    logits, positive, in_softmax = [], [], []
    for q, s, drop_self in zip(queries, stored, exclude_self):
        keep = not_self if drop_self else torch.ones_like(same_label)
        logits.append(q @ s.T / tau)
        positive.append(same_label & keep)
        in_softmax.append(keep)
    positive, in_softmax = torch.cat(positive, dim=1), torch.cat(in_softmax, dim=1)
    logits = torch.cat(logits, dim=1).masked_fill(~in_softmax, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    n_pos = positive.sum(dim=1)
    has = n_pos > 0
    per_anchor = -torch.where(positive, log_prob, 0.0).sum(dim=1)[has] / n_pos[has]
    return per_anchor.mean()
