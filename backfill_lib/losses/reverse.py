"""``L_rt``: regression of the reverse transformation onto the old space (METHOD §3.4).

``L_rt = mean_i ||ψ̂(φ_n(x_i)) − φ_o(x_i)||²``: the transformed new embedding should land on the
old embedding of the same image, so ``ψ̂(φ_n(q))`` can search the old gallery.
"""

from __future__ import annotations

import torch


def regression_loss(mapped: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``mean_i ||mapped_i − target_i||²`` with the target held fixed (no gradient).

    The one regression of this library: ``L_rt`` for ``ψ``; the same with ``ĥ(φ_o)`` and ``φ_n``
    for the forward ``h``.

    Parameters
    ----------
    mapped : tensor (B, d)
        Transformed embeddings (gradients flow here).
    target : tensor (B, d)
        Embeddings of the same images in the target space.

    Raises
    ------
    ValueError
        If the shapes differ.
    """
    if mapped.shape != target.shape:
        raise ValueError(f"mapped {tuple(mapped.shape)} and target {tuple(target.shape)} must have the same "
                         "shape: the transformation must output the target space's dimension")
    return ((mapped - target.detach()) ** 2).sum(dim=1).mean()


def reverse_loss(psi_new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """Mean squared distance between ``ψ̂(φ_n(x))`` and ``φ_o(x)``.

    Parameters
    ----------
    psi_new : tensor (B, d_o)
        L2-normalised transformed new embeddings ``ψ̂(φ_n(x))``.
    old : tensor (B, d_o)
        L2-normalised old embeddings ``φ_o(x)`` of the same images (targets, no gradient).

    Raises
    ------
    ValueError
        If the shapes differ.

    Examples
    --------
    >>> reverse_loss(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]))
    tensor(2.)
    """
    if psi_new.shape != old.shape:
        raise ValueError(f"psi_new {tuple(psi_new.shape)} and old {tuple(old.shape)} must have the same "
                         "shape: ψ must map into the old space (output dimension d_o)")
    return regression_loss(psi_new, old)
