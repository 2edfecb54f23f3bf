"""Transformations between embedding spaces (METHOD §2, §3.4, §3.5), trained on cached embeddings.

* ``ψ`` (:func:`reverse_transformation`): new → old, so a new query ``ψ̂(φ_n(q))`` can search
  the items still stored old. Needs no side information: the new embedding is the richer one.
* ``h`` (:func:`forward_transformation`, FCT-style without side information): old → new,
  applied to the stored old vectors so they can be searched with ``φ_n(q)``.
* ``ρ`` (:class:`ResidualEmbedding`): the learnable new embedding, a residual head on the
  frozen new model that starts at the identity; its output is what gets backfilled.

Every module returns L2-normalised vectors (``ψ̂``, ``ĥ``, ``ρ̂``). Backbones are frozen, so the
heads train on cached embeddings with the one loop of :func:`backfill_lib.training.train`, in
seconds on a CPU. Numpy arrays go in and out at the public boundary (:func:`apply_transform`).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from .losses import NEGATIVES, metric_compatible_loss, regression_loss, reverse_loss
from .training import TrainConfig, default_device, train
from .validation import as_embeddings, as_labels

#: Optimiser of the heads (contrastive losses over the batch want large batches; data are tiny vectors).
TRANSFORM_CONFIG = TrainConfig(epochs=60, batch_size=256, lr=2e-3, weight_decay=1e-4)
#: Optimiser steps of the heads. A fixed number of steps, not epochs: with a few hundred training
#: items and batch 256 an epoch is one step, and 60 epochs left ψ under-fitted.
TRANSFORM_STEPS = 1000


def schedule(config: TrainConfig, n_items: int, steps: int | None) -> TrainConfig:
    """``config`` with its epochs set so that training takes at least ``steps`` optimiser steps.

    One epoch is ``max(1, n_items // config.batch_size)`` steps, because
    :func:`~backfill_lib.training.train` drops the last partial batch.

    Parameters
    ----------
    config : TrainConfig
        The schedule to adapt; every other field is kept.
    n_items : int
        Number of training items.
    steps : int or None
        Minimum number of optimiser steps; ``None`` returns ``config`` unchanged.

    Returns
    -------
    TrainConfig
        A copy with ``epochs = ceil(steps / steps_per_epoch)``.

    Raises
    ------
    ValueError
        If ``steps`` is not a positive integer (or None).

    Examples
    --------
    >>> schedule(TrainConfig(batch_size=256), n_items=898, steps=1000).epochs  # 3 steps per epoch
    334
    """
    if steps is None:
        return config
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    steps_per_epoch = max(1, n_items // config.batch_size)  # the train loop drops the last partial batch
    return replace(config, epochs=-(-int(steps) // steps_per_epoch))


def _check_dim(name: str, d) -> int:
    if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 1:
        raise ValueError(f"{name} must be a positive integer (an embedding size), got {d!r}")
    return int(d)


class MLPTransform(nn.Module):
    """``x ↦ normalise(W₂ ReLU(BN(W₁ x)))``: Linear–BN–ReLU–Linear, hidden ``2·max(d_in, d_out)``.

    Parameters
    ----------
    d_in, d_out : int
        Input and output embedding sizes (kept as attributes ``d_in`` and ``d_out``).
    hidden : int, optional
        Hidden width (default ``2·max(d_in, d_out)``).

    Raises
    ------
    ValueError
        If a size is not a positive integer.
    """

    def __init__(self, d_in: int, d_out: int, hidden: int | None = None):
        super().__init__()
        self.d_in, self.d_out = _check_dim("d_in", d_in), _check_dim("d_out", d_out)
        hidden = 2 * max(self.d_in, self.d_out) if hidden is None else _check_dim("hidden", hidden)
        self.net = nn.Sequential(nn.Linear(self.d_in, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                                 nn.Linear(hidden, self.d_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map a batch and L2-normalise the result.

        Parameters
        ----------
        x : Tensor (B, d_in)
            Input embeddings, e.g. ``φ_n(x)`` for ``ψ``.

        Returns
        -------
        Tensor (B, d_out)
            Unit-norm rows, e.g. ``ψ̂(φ_n(x))``.

        Raises
        ------
        ValueError
            If ``x`` is not of shape ``(B, d_in)``.
        """
        if x.ndim != 2 or x.shape[1] != self.d_in:
            raise ValueError(f"expected inputs of shape (n, {self.d_in}), got {tuple(x.shape)}")
        return F.normalize(self.net(x), dim=1)


def reverse_transformation(d_new: int, d_old: int, hidden: int | None = None) -> MLPTransform:
    """``ψ: R^{d_n} → R^{d_o}`` (METHOD §3.4), untrained.

    Train it with :func:`fit_reverse_transform`.

    Parameters
    ----------
    d_new : int
        Input size ``d_n``.
    d_old : int
        Output size ``d_o``.
    hidden : int, optional
        Hidden width (default ``2·max(d_o, d_n)``).

    Returns
    -------
    MLPTransform
        Outputs ``ψ̂``, L2-normalised.
    """
    return MLPTransform(d_new, d_old, hidden)


def forward_transformation(d_old: int, d_new: int, hidden: int | None = None) -> MLPTransform:
    """``h: R^{d_o} → R^{d_n}``, FCT-style without side information (METHOD §2), untrained.

    Train it with :func:`fit_forward_transform`.

    Parameters
    ----------
    d_old : int
        Input size ``d_o``.
    d_new : int
        Output size ``d_n``.
    hidden : int, optional
        Hidden width (default ``2·max(d_o, d_n)``).

    Returns
    -------
    MLPTransform
        Outputs ``ĥ``, L2-normalised.
    """
    return MLPTransform(d_old, d_new, hidden)


class ResidualEmbedding(nn.Module):
    """``ρ(z) = normalise(z + W₂ ReLU(W₁ z))``, the learnable new embedding (METHOD §3.5).

    ``W₂`` starts at zero, so ``ρ̂ = identity`` at first (``ρ̂(φ_n) = φ_n`` since ``φ_n`` is
    already unit-norm).

    Parameters
    ----------
    d : int
        Embedding size ``d_n`` (input and output; kept as attribute ``d_in``).
    hidden : int, optional
        Hidden width of the residual branch (default ``2·d``).

    Raises
    ------
    ValueError
        If a size is not a positive integer.
    """

    def __init__(self, d: int, hidden: int | None = None):
        super().__init__()
        self.d_in = _check_dim("d", d)
        hidden = 2 * self.d_in if hidden is None else _check_dim("hidden", hidden)
        self.residual = nn.Sequential(nn.Linear(self.d_in, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, self.d_in))
        nn.init.zeros_(self.residual[-1].weight)
        nn.init.zeros_(self.residual[-1].bias)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """``ρ̂(z)``: add the residual and L2-normalise.

        Parameters
        ----------
        z : Tensor (B, d)
            New embeddings ``φ_n(x)``.

        Returns
        -------
        Tensor (B, d)
            Unit-norm rows ``ρ̂(φ_n(x))``.

        Raises
        ------
        ValueError
            If ``z`` is not of shape ``(B, d)``.
        """
        if z.ndim != 2 or z.shape[1] != self.d_in:
            raise ValueError(f"expected inputs of shape (n, {self.d_in}), got {tuple(z.shape)}")
        return F.normalize(z + self.residual(z), dim=1)


class CompatibilityHeads(nn.Module):
    """The heads on top of the frozen new model: ``ψ`` (new → old) and ``ρ`` (identity when off).

    Built and trained by :func:`fit_reverse_transform`. Attributes ``psi``
    (:class:`MLPTransform`, default hidden width) and ``rho`` (:class:`ResidualEmbedding`, or
    None when ``learn_rho`` is False).

    Parameters
    ----------
    d_new, d_old : int
        Embedding sizes ``d_n`` and ``d_o``.
    learn_rho : bool, default True
        Add the learnable new embedding ``ρ``; otherwise ``ρ`` is the identity.

    Raises
    ------
    ValueError
        If a size is not a positive integer.
    """

    def __init__(self, d_new: int, d_old: int, learn_rho: bool = True):
        super().__init__()
        self.d_new, self.d_old = _check_dim("d_new", d_new), _check_dim("d_old", d_old)
        self.psi = reverse_transformation(self.d_new, self.d_old)
        self.rho = ResidualEmbedding(self.d_new) if learn_rho else None

    def rho_hat(self, z: torch.Tensor) -> torch.Tensor:
        """``ρ̂(z)``: ``rho(z)``, or ``z`` L2-normalised when there is no ``ρ``.

        Parameters
        ----------
        z : Tensor (B, d_n)
            New embeddings ``φ_n(x)``.

        Returns
        -------
        Tensor (B, d_n)
            Unit-norm rows.
        """
        return F.normalize(z, dim=1) if self.rho is None else self.rho(z)


@torch.no_grad()
def apply_transform(module: nn.Module, embeddings, name: str = "embeddings", batch_size: int = 4096) -> np.ndarray:
    """Apply a trained head (``ψ``, ``h`` or ``ρ``) to an array of embeddings.

    Runs without gradients, in eval mode (the module's training mode is restored afterwards), in
    batches on the module's device.

    Parameters
    ----------
    module : nn.Module
        A head with a ``d_in`` attribute: an :class:`MLPTransform` or a
        :class:`ResidualEmbedding` (e.g. ``heads.psi`` or ``heads.rho`` of
        :class:`CompatibilityHeads`).
    embeddings : array-like or Tensor (n, d_in)
        Input embeddings, one row per item.
    name : str, default "embeddings"
        Argument name used in error messages.
    batch_size : int, default 4096
        Rows per forward pass.

    Returns
    -------
    array (n, d_out) of float32
        Unit-norm rows.

    Raises
    ------
    TypeError
        If ``embeddings`` is not numeric.
    ValueError
        If ``embeddings`` is not a non-empty, finite 2-D array with ``module.d_in`` columns.
    """
    x = as_embeddings(embeddings, name, dim=module.d_in)
    was_training = module.training
    module.eval()
    device = next(module.parameters()).device
    out = [module(torch.from_numpy(x[i:i + batch_size]).to(device)).cpu() for i in range(0, len(x), batch_size)]
    module.train(was_training)
    return torch.cat(out).numpy()


def _seeded(build, seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _pairs(a, b, labels, names) -> tuple[np.ndarray, np.ndarray, TensorDataset]:
    """Cached embeddings of the same images side by side: ``x = [a | b]`` (one tensor for the train loop)."""
    a = as_embeddings(a, names[0])
    b = as_embeddings(b, names[1])
    if len(a) != len(b):
        raise ValueError(f"{names[0]} has {len(a)} rows but {names[1]} has {len(b)}: both must embed the same images")
    y = np.zeros(len(a), dtype=np.int64) if labels is None else as_labels(labels, "labels", n=len(a))
    return a, b, TensorDataset(torch.from_numpy(np.hstack([a, b])), torch.from_numpy(y))


def fit_reverse_transform(new, old, labels=None, objective: str = "rt", learn_rho: bool = False, tau: float = 0.2,
                          lam_rt: float = 0.0, negatives: str = "both", config: TrainConfig = TRANSFORM_CONFIG,
                          steps: int | None = TRANSFORM_STEPS, device=None, progress: bool = False) -> CompatibilityHeads:
    """Train ``ψ`` (and ``ρ``) on cached embeddings of the training images; both backbones stay frozen.

    Parameters
    ----------
    new, old : arrays (n, d_n), (n, d_o)
        ``φ_n(x)`` and ``φ_o(x)`` of the same training images.
    labels : array (n,) of int, optional
        Needed by ``objective="mc"`` (positives are the same-label items); unused by ``"rt"``.
    objective : {"rt", "mc"}, default "rt"
        ``"rt"``: ``L_rt`` only (§3.4). ``"mc"``: ``L_mc + λ_rt·L_rt`` (§3.5).
    learn_rho : bool, default False
        Train the learnable new embedding ``ρ`` (``"mc"`` only; otherwise ``ρ`` is the identity).
    tau : float, default 0.2
        Temperature of ``L_mc`` (the value chosen on a validation split, ``results/README.md``).
    lam_rt : float, default 0.0
        Weight ``λ_rt`` of ``L_rt`` in the ``"mc"`` objective.
    negatives : {"both", "old", "new"}, default "both"
        Stored set(s) ``L_mc`` takes negatives from.
    config : TrainConfig, default :data:`TRANSFORM_CONFIG`
        Optimiser; ``config.seed`` seeds the initial weights and the batch order.
    steps : int or None, default :data:`TRANSFORM_STEPS`
        Minimum number of optimiser steps (sets the epochs through :func:`schedule`); ``None``
        keeps ``config.epochs``.
    device : str or torch.device, optional
        Where to train; default :func:`~backfill_lib.training.default_device`.
    progress : bool, default False
        Show a progress bar.

    Returns
    -------
    CompatibilityHeads
        The trained heads, in eval mode, on ``device``.

    Raises
    ------
    ValueError
        If ``objective`` or ``negatives`` is unknown, ``objective="mc"`` has no ``labels``,
        ``learn_rho`` is asked with ``objective="rt"``, ``steps`` is not a positive integer, or
        ``new``, ``old`` and ``labels`` do not have one row per image.
    TypeError
        If the embeddings are not numeric or the labels not integers.
    """
    if objective not in ("rt", "mc"):
        raise ValueError(f"objective must be 'rt' (L_rt only) or 'mc' (L_mc + λ_rt·L_rt), got {objective!r}")
    if objective == "mc" and labels is None:
        raise ValueError("objective='mc' needs labels: positives are the same-label items")
    if objective == "rt" and learn_rho:
        raise ValueError("learn_rho needs objective='mc': L_rt does not involve ρ")
    if negatives not in NEGATIVES:
        raise ValueError(f"unknown negatives {negatives!r}; choose one of: {', '.join(NEGATIVES)}")
    new, old, dataset = _pairs(new, old, labels, ("new", "old"))
    d_new, d_old = new.shape[1], old.shape[1]
    heads = _seeded(lambda: CompatibilityHeads(d_new, d_old, learn_rho), config.seed)

    def loss_fn(model: CompatibilityHeads, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        z_new, z_old = x[:, :d_new], x[:, d_new:]
        psi_new = model.psi(z_new)
        l_rt = reverse_loss(psi_new, z_old)
        if objective == "rt":
            return l_rt
        return metric_compatible_loss(psi_new, z_old, model.rho_hat(z_new), y, tau, negatives) + lam_rt * l_rt

    train(heads, dataset, schedule(config, len(dataset), steps), loss_fn=loss_fn, device=device or default_device(), desc=f"psi ({objective})",
          progress=progress)
    return heads.eval()


def fit_forward_transform(old, new, config: TrainConfig = TRANSFORM_CONFIG, steps: int | None = TRANSFORM_STEPS,
                          device=None, progress: bool = False) -> MLPTransform:
    """Train ``h`` (old → new) by ``mean ||ĥ(φ_o(x)) − φ_n(x)||²`` on cached training embeddings.

    Both backbones stay frozen; ``φ_n(x)`` is the target and gets no gradient.

    Parameters
    ----------
    old, new : arrays (n, d_o), (n, d_n)
        ``φ_o(x)`` and ``φ_n(x)`` of the same training images.
    config : TrainConfig, default :data:`TRANSFORM_CONFIG`
        Optimiser; ``config.seed`` seeds the initial weights and the batch order.
    steps : int or None, default :data:`TRANSFORM_STEPS`
        Minimum number of optimiser steps (see :func:`schedule`); ``None`` keeps ``config.epochs``.
    device : str or torch.device, optional
        Where to train; default :func:`~backfill_lib.training.default_device`.
    progress : bool, default False
        Show a progress bar.

    Returns
    -------
    MLPTransform
        The trained ``h`` (outputs ``ĥ``), in eval mode, on ``device``.

    Raises
    ------
    ValueError
        If ``steps`` is not a positive integer, or ``old`` and ``new`` do not have one row per image.
    TypeError
        If the embeddings are not numeric.
    """
    old, new, dataset = _pairs(old, new, None, ("old", "new"))
    d_old = old.shape[1]
    h = _seeded(lambda: forward_transformation(d_old, new.shape[1]), config.seed)
    train(h, dataset, schedule(config, len(dataset), steps), loss_fn=lambda m, x, y: regression_loss(m(x[:, :d_old]), x[:, d_old:]),
          device=device or default_device(), desc="h (forward)", progress=progress)
    return h.eval()
