"""RA-BCT / Hot-Refresh: regression-alleviating compatible training (Zhang et al., ICLR 2022; METHOD §3.3).

InfoNCE with anchor ``φ_n(x_i)``, positive ``φ_o(x_i)`` (the same image under the old model,
detached) and negatives the *other-class* old features ``φ_o(x_j)`` **and** other-class new
features ``φ_n(x_j)`` of the batch; the new-to-new negatives are what alleviates regression.
With ``topk = k`` each anchor keeps only its ``k`` hardest (highest-scoring) negatives in each of
the two sets, a knob to tune; ``topk = None`` keeps them all (the published loss).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..validation import check_non_negative, check_positive_int


def _hardest(logits: torch.Tensor, topk: int | None) -> torch.Tensor:
    """The ``topk`` largest logits of each row (all of them when None or when a row is shorter)."""
    if topk is None or topk >= logits.shape[1]:
        return logits
    return logits.topk(topk, dim=1).values                        # -inf (not a negative) sorts last


def ra_bct_loss(new: torch.Tensor, old: torch.Tensor, y: torch.Tensor, tau: float = 0.05,
                topk: int | None = None) -> torch.Tensor:
    """``L_ra``: mean over anchors of ``−log exp(s_ii^o) / (exp(s_ii^o) + Σ_neg exp(s))``.

    Parameters
    ----------
    new : tensor (B, d)
        L2-normalised new embeddings ``φ_n(x)`` (anchors; gradients flow here).
    old : tensor (B, d)
        L2-normalised old embeddings ``φ_o(x)`` of the same images (treated as constants).
    y : tensor (B,)
        Labels; ``j`` is a negative of ``i`` when ``y_j ≠ y_i``.
    tau : float
        Temperature (0.05 in the public implementation).
    topk : int, optional
        Keep only the ``topk`` highest-scoring other-class negatives of each anchor among the old
        features, and as many among the new features; default None, every negative.

    Raises
    ------
    ValueError
        If ``new`` and ``old`` differ in shape, ``tau`` is not positive, or ``topk < 1``.
    TypeError
        If ``topk`` is neither None nor an integer.
    """
    if new.shape != old.shape:
        raise ValueError(f"new {tuple(new.shape)} and old {tuple(old.shape)} must have the same shape: "
                         "RA-BCT compares new and old embeddings directly (d_n = d_o)")
    tau = check_non_negative(tau, "tau", "a temperature", strict=True)
    topk = check_positive_int(topk, "topk", "negatives kept per anchor and set", allow_none=True)
    old = old.detach()
    s_old = new @ old.T / tau                                     # s^o_ij = φ_n(x_i)·φ_o(x_j)/τ
    s_new = new @ new.T / tau                                     # s^n_ij = φ_n(x_i)·φ_n(x_j)/τ
    other_class = y[:, None] != y[None, :]                        # negatives, in both sets
    positive = torch.diagonal(s_old)                              # same image, old model
    logits = torch.cat([positive[:, None],
                        _hardest(s_old.masked_fill(~other_class, float("-inf")), topk),
                        _hardest(s_new.masked_fill(~other_class, float("-inf")), topk)], dim=1)
    return (torch.logsumexp(logits, dim=1) - positive).mean()     # logsumexp subtracts the row max


def ra_bct_objective(old_model: nn.Module, lam: float = 1.0, tau: float = 0.05, topk: int | None = None):
    """``loss_fn(model, x, y)`` for :func:`~backfill_lib.training.train`: CE + λ·L_ra.

    Parameters
    ----------
    old_model : EmbeddingModel
        The old model; frozen here, in place (eval mode, ``requires_grad=False``). Its
        ``embed(x)`` gives the positives and old negatives, without gradients.
    lam : float, default 1.0
        Weight ``λ`` of ``L_ra``.
    tau : float, default 0.05
        Temperature of ``L_ra``.
    topk : int, optional
        Hardest negatives kept per anchor in each set (see :func:`ra_bct_loss`); default all.

    Returns
    -------
    callable
        ``loss_fn(model, x, y)``: cross-entropy of the new classifier + ``λ·L_ra`` on ``φ_n(x)``.

    Raises
    ------
    ValueError
        If ``lam`` is negative, ``tau`` not positive or ``topk < 1``.
    TypeError
        If ``topk`` is neither None nor an integer.
    """
    lam = check_non_negative(lam, "lam", "a loss weight")
    tau = check_non_negative(tau, "tau", "a temperature", strict=True)
    topk = check_positive_int(topk, "topk", "negatives kept per anchor and set", allow_none=True)
    old_model.eval().requires_grad_(False)

    def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        z = model.features(x)
        with torch.no_grad():
            old = old_model.embed(x)
        return F.cross_entropy(model.classifier(z), y) + lam * ra_bct_loss(F.normalize(z, dim=1), old, y, tau, topk)

    return loss_fn
