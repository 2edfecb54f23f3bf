"""``L_mc``: metric-compatible contrastive loss, one softmax over both stored spaces (METHOD §3.5; form ours).

For anchor ``i`` (a query, embedded by the new backbone only):

* cross logits ``s^o_ij = ψ̂(φ_n(x_i)) · φ_o(x_j) / τ`` — against items still stored old,
* new logits ``s^n_ij = ρ̂(φ_n(x_i)) · ρ̂(φ_n(x_j)) / τ``, ``j ≠ i`` — against backfilled items,
* positives ``P(i)``: same-label ``j`` in **both** sets,

``L_mc = − mean_i 1/|P(i)| Σ_{p∈P(i)} log( exp(s_p) / Σ_{j in both sets} exp(s_j) )``.

Because both sets share one softmax, an old-stored positive must outscore a new-stored negative
and vice versa: exactly the comparison a merged ranking over a mixed gallery makes. The
``negatives`` switch keeps the negatives of one set only (the ablations of the book); positives
always come from both sets.
"""

from __future__ import annotations

import torch

from ..validation import check_non_negative

#: Which stored set the negatives come from.
NEGATIVES = ("both", "old", "new")


def metric_compatible_loss(psi_new: torch.Tensor, old: torch.Tensor, rho_new: torch.Tensor, y: torch.Tensor,
                           tau: float = 0.1, negatives: str = "both") -> torch.Tensor:
    """``L_mc`` of a batch (see the module docstring).

    Parameters
    ----------
    psi_new : tensor (B, d_o)
        ``ψ̂(φ_n(x))``, L2-normalised: the query side against old-stored items.
    old : tensor (B, d_o)
        ``φ_o(x)``, L2-normalised old embeddings of the same images (the old-stored set).
    rho_new : tensor (B, d_n)
        ``ρ̂(φ_n(x))``, L2-normalised: query side *and* stored side of backfilled items.
    y : tensor (B,)
        Labels.
    tau : float
        Temperature.
    negatives : {"both", "old", "new"}
        Stored set(s) whose other-label items enter the softmax as negatives.

    Returns
    -------
    Scalar tensor: the mean over anchors (each has its own old feature as a positive).

    Raises
    ------
    ValueError
        If ``negatives`` is unknown, ``tau`` is not positive, or the shapes do not match.
    """
    if negatives not in NEGATIVES:
        raise ValueError(f"unknown negatives {negatives!r}; choose one of: {', '.join(NEGATIVES)}")
    tau = check_non_negative(tau, "tau", "a temperature", strict=True)
    if psi_new.shape != old.shape:
        raise ValueError(f"psi_new {tuple(psi_new.shape)} and old {tuple(old.shape)} must have the same shape: "
                         "ψ maps into the old space (output dimension d_o)")
    if not (len(rho_new) == len(old) == len(y)):
        raise ValueError(f"psi_new/old, rho_new and y must have one row per image, got {len(old)}, "
                         f"{len(rho_new)}, {len(y)}")
    s_old = psi_new @ old.detach().T / tau                         # (B, B), j = i included: same image
    s_new = rho_new @ rho_new.T / tau                              # (B, B), j = i excluded below
    same_label = y[:, None] == y[None, :]
    not_self = ~torch.eye(len(y), dtype=torch.bool, device=y.device)
    positive_old, positive_new = same_label, same_label & not_self
    negative_old = ~same_label if negatives in ("both", "old") else torch.zeros_like(same_label)
    negative_new = ~same_label if negatives in ("both", "new") else torch.zeros_like(same_label)

    in_softmax = torch.cat([positive_old | negative_old, positive_new | negative_new], dim=1)
    positive = torch.cat([positive_old, positive_new], dim=1)
    logits = torch.cat([s_old, s_new], dim=1).masked_fill(~in_softmax, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)  # logsumexp subtracts the row max
    per_anchor = -torch.where(positive, log_prob, 0.0).sum(dim=1) / positive.sum(dim=1)
    return per_anchor.mean()                                       # every anchor has s^o_ii as a positive
