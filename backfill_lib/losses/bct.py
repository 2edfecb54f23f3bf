"""BCT: backward-compatible training through the old classifier (Shen et al., CVPR 2020; METHOD §3.2).

``L = CE(W_n φ_n(x), y) + λ · CE(W_o φ_n(x), y)`` where the influence term runs over the samples
whose class the frozen old classifier ``W_o`` knows. The old classifier then scores new features
like old ones, so a new query can search the old gallery directly. Needs ``d_n = d_o``.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..validation import check_non_negative


def bct_influence_loss(z_new: torch.Tensor, y: torch.Tensor, old_classifier: nn.Module,
                       old_classes: Sequence[int]) -> torch.Tensor:
    """``CE(W_o φ_n(x), y)`` over the samples of old classes, the softmax restricted to old classes.

    Parameters
    ----------
    z_new : tensor (B, d)
        New-model features (before L2 normalisation, where the classifiers act).
    y : tensor (B,)
        Labels.
    old_classifier : nn.Module
        The frozen old classifier ``W_o`` (maps ``d`` features to logits of every class).
    old_classes : sequence of int
        Classes the old model was trained on; other samples do not contribute.

    Returns
    -------
    Scalar tensor (zero when the batch holds no old-class sample).
    """
    old_classes = torch.as_tensor(list(old_classes), device=y.device)
    is_old_class = (y[:, None] == old_classes[None, :])           # (B, C_old) one-hot over old classes
    known = is_old_class.any(dim=1)
    if not known.any():
        return z_new.sum() * 0.0                                  # keeps the graph, contributes nothing
    logits = old_classifier(z_new[known])[:, old_classes]         # softmax over the classes W_o knows
    return F.cross_entropy(logits, is_old_class[known].float().argmax(dim=1))


def bct_objective(old_model: nn.Module, old_classes: Sequence[int], lam: float = 1.0):
    """``loss_fn(model, x, y)`` for :func:`~backfill_lib.training.train`: CE + λ·influence.

    Parameters
    ----------
    old_model : EmbeddingModel
        The old model; frozen here, in place (eval mode, ``requires_grad=False``), so only the new
        model learns. Its ``classifier`` is ``W_o``.
    old_classes : sequence of int
        Classes the old model was trained on.
    lam : float, default 1.0
        Weight ``λ`` of the influence loss.

    Returns
    -------
    callable
        ``loss_fn(model, x, y)``; it raises ValueError when the new model's ``d_n ≠ d_o``.

    Raises
    ------
    ValueError
        If ``lam`` is negative.
    """
    lam = check_non_negative(lam, "lam", "a loss weight")
    old_model.eval().requires_grad_(False)
    classes = tuple(int(c) for c in old_classes)

    def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        z = model.features(x)
        if z.shape[1] != old_model.classifier.in_features:
            raise ValueError(f"BCT needs d_n = d_o: the new model embeds in {z.shape[1]} dimensions, "
                             f"the old classifier expects {old_model.classifier.in_features}")
        return F.cross_entropy(model.classifier(z), y) + lam * bct_influence_loss(z, y, old_model.classifier, classes)

    return loss_fn
