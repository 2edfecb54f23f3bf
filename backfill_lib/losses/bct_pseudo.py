"""BCT with a pseudo-classifier over all classes: the open-class variant of openBCT and BT² (METHOD §3.2).

Plain BCT (:mod:`.bct`) applies the old classifier ``W_o`` only to samples of the classes the old
model was trained on. The open-class variant of Shen et al. (CVPR 2020, "BCT with new training
classes"), as used by BT² (Zhou et al., ICCV 2023), replaces ``W_o`` by a *pseudo-classifier*
whose weight for class ``c`` is the old model's mean feature of the training images of ``c``:

``w_c = normalise( mean_{i: y_i = c} φ_o(x_i) )``, for **every** class ``c``, old or new,

built once from the frozen old model and kept frozen. The influence loss is the cross-entropy of
the new feature through that classifier, on **every** sample:

``L = CE(W_n φ_n(x), y) + λ · CE(W_p φ_n(x), y)``, ``W_p = [w_1; …; w_C]`` (no bias).

Each new feature is pulled towards the old model's class mean of its class, so a new query lands
where the old gallery keeps that class, including the classes the old model never saw. Needs
``d_n = d_o``. ``λ = 1`` is our default (as for BCT); BT²'s public code trains this variant with
``alpha: 10`` (its ``configs/cifar100_BCT.yaml``), the setting of the BT² figures the book quotes.

Where ours differs from BT²'s code (``train_BCT.py``, ``trainers/bct_trainer.py``), as read there:
BT² averages the old features over its (augmented) training loader and does not re-normalise the
means, and it uses its main criterion (label smoothing 0.1) for both terms. Ours averages the
un-augmented training embeddings, normalises each mean to a unit vector, applies ``W_p`` to the
un-normalised new feature ``z`` (where the classifiers act, as in :mod:`.bct`) and uses plain
cross-entropy.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..validation import as_labels, check_non_negative


def pseudo_classifier(old_features, labels, num_classes: int) -> torch.Tensor:
    """The pseudo-classifier ``W_p``: the normalised mean old feature of each class.

    Parameters
    ----------
    old_features : array or tensor (n, d)
        Old embeddings ``φ_o(x)`` of the training images (L2-normalised, as extracted).
    labels : int array or tensor (n,)
        Class of each image, in ``0 .. num_classes - 1``.
    num_classes : int
        Number of classes ``C`` of the new model (old and new classes alike).

    Returns
    -------
    tensor (num_classes, d) of float32
        Row ``c`` is ``mean_{y_i = c} φ_o(x_i)`` scaled to unit norm; no gradient.

    Raises
    ------
    ValueError
        If the shapes do not match, a label is outside ``0 .. num_classes - 1``, a class has no
        image, or a class mean is the zero vector (it has no direction).

    Examples
    --------
    >>> pseudo_classifier([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]], [0, 0, 1], 2)
    tensor([[0.7071, 0.7071],
            [0.0000, 1.0000]])
    """
    feats = torch.as_tensor(np.asarray(old_features, dtype=np.float32))
    # as_labels refuses labels a cast would change (1.7 -> 1, huge unsigned ids wrapping round).
    y = torch.as_tensor(as_labels(labels, "labels"))
    if feats.ndim != 2 or y.shape != (len(feats),):
        raise ValueError(f"old_features must be (n, d) and labels (n,), got {tuple(feats.shape)} and {tuple(y.shape)}")
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"labels must lie in 0 .. {num_classes - 1}, got {int(y.min())} .. {int(y.max())}")
    counts = torch.bincount(y, minlength=num_classes)
    if (counts == 0).any():
        missing = torch.nonzero(counts == 0).flatten().tolist()
        raise ValueError(f"class(es) {missing} have no training image: the pseudo-classifier needs one mean "
                         "per class")
    sums = torch.zeros(num_classes, feats.shape[1]).index_add_(0, y, feats)
    means = sums / counts[:, None]
    norms = means.norm(dim=1)
    if (norms < 1e-12).any():
        raise ValueError(f"the mean old feature of class(es) {torch.nonzero(norms < 1e-12).flatten().tolist()} is "
                         "zero: it has no direction to use as a classifier weight")
    return means / norms[:, None]


def bct_pseudo_influence_loss(z_new: torch.Tensor, y: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``CE(W_p φ_n(x), y)`` over every sample: the influence loss through the pseudo-classifier.

    Parameters
    ----------
    z_new : tensor (B, d)
        New-model features (before L2 normalisation).
    y : tensor (B,)
        Labels, old and new classes alike.
    weights : tensor (C, d)
        The frozen pseudo-classifier ``W_p`` (:func:`pseudo_classifier`); no gradient reaches it.

    Returns
    -------
    Scalar tensor: the mean cross-entropy over the batch.

    Raises
    ------
    ValueError
        If ``z_new`` and ``weights`` differ in width (``d_n ≠ d_o``).
    """
    if z_new.shape[1] != weights.shape[1]:
        raise ValueError(f"BCT needs d_n = d_o: the new model embeds in {z_new.shape[1]} dimensions, the "
                         f"pseudo-classifier (old features) has {weights.shape[1]}")
    return F.cross_entropy(z_new @ weights.detach().to(z_new.device, z_new.dtype).T, y)


def bct_pseudo_objective(weights: torch.Tensor, lam: float = 1.0):
    """``loss_fn(model, x, y)`` for :func:`~backfill_lib.training.train`: CE + λ·pseudo-classifier influence.

    Parameters
    ----------
    weights : tensor (C, d_o)
        The pseudo-classifier ``W_p`` (:func:`pseudo_classifier`), held fixed.
    lam : float, default 1.0
        Weight ``λ`` of the influence loss (BT² uses 10).

    Returns
    -------
    callable
        ``loss_fn(model, x, y)``: cross-entropy of the new classifier + ``λ·CE(W_p z, y)``; it
        raises ValueError when the new model's ``d_n ≠ d_o``.

    Raises
    ------
    ValueError
        If ``lam`` is negative.
    """
    lam = check_non_negative(lam, "lam", "a loss weight")
    weights = torch.as_tensor(weights).detach().float()

    def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        z = model.features(x)
        return F.cross_entropy(model.classifier(z), y) + lam * bct_pseudo_influence_loss(z, y, weights)

    return loss_fn
