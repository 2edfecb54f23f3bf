"""Transformations between embedding spaces (METHOD §2, §3.4, §3.5), trained on cached embeddings.

* ``ψ`` (:func:`reverse_transformation`): new → old, so a new query ``ψ̂(φ_n(q))`` can search
  the items still stored old. Needs no side information: the new embedding is the richer one.
* ``h`` (:func:`forward_transformation`, FCT-style without side information): old → new,
  applied to the stored old vectors so they can be searched with ``φ_n(q)``. Two architectures
  (:data:`FORWARD_ARCHS`): ``"mlp"`` (ours, the default: :class:`MLPTransform`) and ``"fct"``
  (:class:`TwoBranchTransform`, the two-branch transformation of ml-fct, with the old feature
  feeding both branches when there is no side information).
* ``ρ`` (:class:`ResidualEmbedding`): the learnable new embedding, a residual head on the
  frozen new model that starts at the identity; its output is what gets backfilled.

Every module returns L2-normalised vectors (``ψ̂``, ``ĥ``, ``ρ̂``). Backbones are frozen, so the
heads train on cached embeddings with the one loop of :func:`backfill_lib.training.train`, in
seconds on a CPU. Numpy arrays go in and out at the public boundary (:func:`apply_transform`).

For a retrieval service, :class:`ReverseTransform` (``ψ``, optionally with ``ρ``) and
:class:`ForwardTransform` (``h``) wrap the fit functions in the scikit-learn manner: built with
their hyper-parameters, ``fit(X, Y)`` with ``X`` the space the transform reads and ``Y`` the space
it maps into, ``transform(X)``, ``save(path)`` / ``load(path)`` and ``to_bytes()`` /
``from_bytes(data)``. A file names its class through a registry (:func:`register_transform`,
:func:`transform_class`), so opening one never imports a module named in it, and it carries a
SHA-256 checksum of everything that decides the map, so a damaged file is refused instead of
mapping differently.

Inputs must have unit-norm rows, as the models of this library produce (the losses compare
normalised vectors); ``normalize=True`` L2-normalises them first instead of refusing them.
"""

from __future__ import annotations

import inspect
import io
import json
import os
import tempfile
import threading
import warnings
import zipfile
from dataclasses import replace
from pathlib import Path

import weakref

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from .losses import NEGATIVES, metric_compatible_loss, regression_loss, reverse_loss
from .training import TrainConfig, default_device, state_checksum, train
from .validation import as_embeddings, as_labels, check_choice, check_path, check_positive_int, normalize_rows

#: Optimiser of the heads (contrastive losses over the batch want large batches; data are tiny vectors).
TRANSFORM_CONFIG = TrainConfig(epochs=60, batch_size=256, lr=2e-3, weight_decay=1e-4)
#: Architectures of the forward transformation ``h`` (``MethodParams.forward_arch``): ``"mlp"``
#: (:class:`MLPTransform`, ours) and ``"fct"`` (:class:`TwoBranchTransform`, ml-fct's).
FORWARD_ARCHS = ("mlp", "fct")
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
    TypeError
        If ``steps`` is neither None nor an integer.
    ValueError
        If ``steps < 1``.

    Examples
    --------
    >>> schedule(TrainConfig(batch_size=256), n_items=898, steps=1000).epochs  # 3 steps per epoch
    334
    """
    if steps is None:
        return config
    steps = check_positive_int(steps, "steps", "optimiser steps")
    steps_per_epoch = max(1, n_items // config.batch_size)  # the train loop drops the last partial batch
    return replace(config, epochs=-(-int(steps) // steps_per_epoch))


def _check_dim(name: str, d) -> int:
    return check_positive_int(d, name, "an embedding size")


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


def _block(d_in: int, d_out: int) -> list[nn.Module]:
    """Linear (no bias: BatchNorm follows) – BN – ReLU: ml-fct's 1×1 ``ConvBlock`` on pooled features."""
    return [nn.Linear(d_in, d_out, bias=False), nn.BatchNorm1d(d_out), nn.ReLU(inplace=True)]


class TwoBranchTransform(nn.Module):
    """ml-fct's two-branch forward transformation ``h`` (FCT, Ramanujan et al., CVPR 2022).

    The architecture of ml-fct's transformation, written for pooled ``(B, d)`` features (its
    1×1 convolutions on ``(B, d, 1, 1)`` maps are linear layers):

    * old branch: ``d_o → 2·d_o → 2·d_n``, each layer Linear–BN–ReLU;
    * side-information branch: ``d_s → 2·d_s → 2·d_n``, the same;
    * mixer on the concatenation (``4·d_n``): ``→ inner → inner → d_n``, the last layer a plain
      Linear with bias; the output is L2-normalised (``ĥ``).

    Without side information (``d_side=None``, the case of this library and of METHOD §2) the old
    feature feeds both branches, as ml-fct's training script does when no side-information model
    is given.

    How it differs from ml-fct's own training (documented beside the results in
    ``results/README.md``): here it reads the L2-normalised stored vectors and is trained on
    ``‖ĥ(φ_o(x)) − φ_n(x)‖²`` with the heads' schedule (AdamW, lr 2e-3, batch 256, 1,000 steps);
    ml-fct feeds raw (un-normalised) features, trains the un-normalised output with a
    mean-squared error against the raw new feature (Adam, lr 5e-4, batch 1024, 80 epochs with 5
    warm-up, BatchNorm frozen for the second half) and can add side information from a
    self-supervised model.

    Parameters
    ----------
    d_in : int
        Old embedding size ``d_o`` (kept as attribute ``d_in``).
    d_out : int
        New embedding size ``d_n`` (kept as attribute ``d_out``).
    d_side : int, optional
        Size of a side-information feature; default None: no side information, the old
        feature feeds the second branch too (``d_s = d_o``; attribute ``d_side`` stays None).
    inner : int, optional
        Width of the mixer, default ``16·d_n`` (ml-fct's 2048 at its ``d_n = 128``).

    Raises
    ------
    ValueError
        If a size is not a positive integer.

    Examples
    --------
    >>> h = TwoBranchTransform(8, 16).eval()
    >>> h(torch.randn(4, 8)).shape
    torch.Size([4, 16])
    """

    def __init__(self, d_in: int, d_out: int, d_side: int | None = None, inner: int | None = None):
        super().__init__()
        self.d_in, self.d_out = _check_dim("d_in", d_in), _check_dim("d_out", d_out)
        self.d_side = None if d_side is None else _check_dim("d_side", d_side)
        d_s = self.d_in if self.d_side is None else self.d_side
        inner = 16 * self.d_out if inner is None else _check_dim("inner", inner)
        self.old_branch = nn.Sequential(*_block(self.d_in, 2 * self.d_in), *_block(2 * self.d_in, 2 * self.d_out))
        self.side_branch = nn.Sequential(*_block(d_s, 2 * d_s), *_block(2 * d_s, 2 * self.d_out))
        self.mixer = nn.Sequential(*_block(4 * self.d_out, inner), *_block(inner, inner), nn.Linear(inner, self.d_out))

    def forward(self, x: torch.Tensor, side: torch.Tensor | None = None) -> torch.Tensor:
        """``ĥ``: both branches, the mixer, then L2 normalisation.

        Parameters
        ----------
        x : Tensor (B, d_in)
            Old embeddings ``φ_o(x)``.
        side : Tensor (B, d_side), optional
            Side information; required when the module was built with ``d_side``, refused
            otherwise (the old feature then feeds the second branch).

        Returns
        -------
        Tensor (B, d_out)
            Unit-norm rows ``ĥ(φ_o(x))``.

        Raises
        ------
        ValueError
            If ``x`` is not of shape ``(B, d_in)``, or ``side`` is missing, unexpected or of the
            wrong shape.
        """
        if x.ndim != 2 or x.shape[1] != self.d_in:
            raise ValueError(f"expected inputs of shape (n, {self.d_in}), got {tuple(x.shape)}")
        if self.d_side is None:
            if side is not None:
                raise ValueError("side: this transform was built without side information (d_side=None); "
                                 "build it with d_side=... to pass one")
            side = x
        elif side is None or side.ndim != 2 or side.shape != (x.shape[0], self.d_side):
            got = None if side is None else tuple(side.shape)
            raise ValueError(f"side must have shape ({x.shape[0]}, {self.d_side}) (built with d_side={self.d_side}), "
                             f"got {got}")
        return F.normalize(self.mixer(torch.cat([self.old_branch(x), self.side_branch(side)], dim=1)), dim=1)


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


def forward_transformation(d_old: int, d_new: int, hidden: int | None = None,
                           arch: str = "mlp") -> MLPTransform | TwoBranchTransform:
    """``h: R^{d_o} → R^{d_n}``, FCT-style without side information (METHOD §2), untrained.

    Train it with :func:`fit_forward_transform`.

    Parameters
    ----------
    d_old : int
        Input size ``d_o``.
    d_new : int
        Output size ``d_n``.
    hidden : int, optional
        Hidden width: of the MLP (default ``2·max(d_o, d_n)``), or of the mixer of the ``"fct"``
        transformation (default ``16·d_n``).
    arch : {"mlp", "fct"}, default "mlp"
        ``"mlp"``: :class:`MLPTransform` (ours). ``"fct"``: :class:`TwoBranchTransform`, ml-fct's
        two-branch transformation with the old feature feeding both branches.

    Returns
    -------
    MLPTransform or TwoBranchTransform
        Outputs ``ĥ``, L2-normalised.

    Raises
    ------
    ValueError
        If ``arch`` is not one of :data:`FORWARD_ARCHS`, or a size is not a positive integer.
    """
    check_choice(arch, FORWARD_ARCHS, "forward arch")
    if arch == "fct":
        return TwoBranchTransform(d_old, d_new, inner=hidden)
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


#: Batches of at most this many rows go through :func:`apply_transform`'s numpy path (one query
#: costs a few microseconds there, against a few hundred through torch's modules).
NUMPY_MAX_ROWS = 256


# The folded weights of each module, kept beside it (not on it: nothing extra to pickle or save).
_NUMPY_CACHE: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


@torch.no_grad()
def _numpy_mlp(module: nn.Module):
    """A numpy function computing ``module`` in eval mode, for an :class:`MLPTransform` on the CPU.

    Batch normalisation (eval mode: running statistics) is folded into the first layer. The
    folded weights are cached on the module and rebuilt when any of its tensors changes (an
    optimiser step, ``load_state_dict``, a move to another device). None for other modules.
    """
    if type(module) is not MLPTransform:
        return None
    first, bn, _, second = module.net
    if first.weight.device.type != "cpu" or not bn.track_running_stats or bn.running_mean is None:
        return None
    # Which tensors, and how often each was changed in place: a step, a load or a replaced tensor
    # changes the key (attribute lookups, not module.parameters(): this runs once per query).
    # The cache holds the tensors themselves, so no other tensor can reuse one of their ids.
    tensors = (first.weight, first.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var, second.weight,
               second.bias)
    key = tuple((id(t), t._version) for t in tensors)
    cached = _NUMPY_CACHE.get(module)
    if cached is not None and cached[0] == key:
        return cached[2]
    s = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).double()
    w1 = (first.weight.double().T * s).numpy()
    b1 = ((first.bias.double() - bn.running_mean.double()) * s + bn.bias.double()).numpy()
    w2, b2 = second.weight.double().T.numpy(), second.bias.double().numpy()
    w1, b1, w2, b2 = (a.astype(np.float32) for a in (w1, b1, w2, b2))

    def run(x: np.ndarray) -> np.ndarray:
        h = x @ w1
        h += b1
        np.maximum(h, 0.0, out=h)
        y = h @ w2
        y += b2
        y /= np.maximum(np.sqrt(np.einsum("ij,ij->i", y, y))[:, None], 1e-12)   # F.normalize's eps
        return y

    _NUMPY_CACHE[module] = (key, tensors, run)
    return run


@torch.no_grad()
def apply_transform(module: nn.Module, embeddings, name: str = "embeddings", batch_size: int = 4096) -> np.ndarray:
    """Apply a trained head (``ψ``, ``h`` or ``ρ``) to an array of embeddings.

    Runs without gradients, in eval mode (the module's training mode is restored afterwards), in
    batches on the module's device.

    Parameters
    ----------
    module : nn.Module
        A head with a ``d_in`` attribute: an :class:`MLPTransform`, a
        :class:`TwoBranchTransform` or a :class:`ResidualEmbedding` (e.g. ``heads.psi`` or ``heads.rho`` of
        :class:`CompatibilityHeads`; the heads themselves are refused, since they hold two
        maps).
    embeddings : array-like or Tensor (n, d_in)
        Input embeddings, one row per item, with unit-norm rows (as the heads were trained on;
        see :func:`~backfill_lib.validation.normalize_rows`).
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
        If ``module`` is a :class:`CompatibilityHeads` or has no ``d_in``, or ``embeddings``
        is not numeric.
    ValueError
        If ``embeddings`` is not a non-empty, finite 2-D array with ``module.d_in`` columns and
        unit-norm rows.
    """
    if isinstance(module, CompatibilityHeads):
        raise TypeError("module is a CompatibilityHeads, which holds two maps: pass heads.psi for ψ̂ (new → old) "
                        "or heads.rho for ρ̂ (the learnable new embedding; None when it was not learned)")
    if not isinstance(module, nn.Module) or not hasattr(module, "d_in"):
        raise TypeError(f"module must be a trained head (MLPTransform or ResidualEmbedding), got {type(module).__name__}")
    return _apply_checked(module, as_embeddings(embeddings, name, dim=module.d_in, unit_norm=True), batch_size)


@torch.no_grad()
def _apply_checked(module: nn.Module, x: np.ndarray, batch_size: int = 4096) -> np.ndarray:
    """:func:`apply_transform` on rows already checked (unit norm, the module's width)."""
    if len(x) <= NUMPY_MAX_ROWS:
        fast = _numpy_mlp(module)
        if fast is not None:  # a few queries: numpy, without torch's per-call overhead (same numbers)
            return fast(x)
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


def _embeddings(x, name: str, dim: int | None = None, normalize: bool = False) -> np.ndarray:
    """``x`` as float32 with unit-norm rows: normalised when ``normalize``, else checked."""
    x = as_embeddings(x, name, dim=dim)
    if normalize:
        return normalize_rows(x, name)
    try:
        # the bare argument ("X", not "X (new embeddings)"): the message suggests normalize_rows(<name>)
        return as_embeddings(x, name.split(" (")[0], unit_norm=True)
    except ValueError as exc:  # only the norm check can fail here: the shape passed above
        raise ValueError(f"{exc}, or pass normalize=True to normalise the rows inside") from None


def _pairs(a, b, labels, names, normalize: bool = False) -> tuple[np.ndarray, np.ndarray, TensorDataset]:
    """Cached embeddings of the same images side by side: ``x = [a | b]`` (one tensor for the train loop)."""
    a = _embeddings(a, names[0], normalize=normalize)
    b = _embeddings(b, names[1], normalize=normalize)
    if len(a) != len(b):
        raise ValueError(f"{names[0]} has {len(a)} rows but {names[1]} has {len(b)}: both must embed the same images")
    if len(a) < 2:
        # BatchNorm in the heads needs two items per batch to estimate a variance.
        raise ValueError(f"{names[0]} has {len(a)} row: fitting a transformation needs at least 2 training images")
    y = np.zeros(len(a), dtype=np.int64) if labels is None else as_labels(labels, "labels", n=len(a))
    return a, b, TensorDataset(torch.from_numpy(np.hstack([a, b])), torch.from_numpy(y))


def _check_reverse_options(objective: str, learn_rho: bool, negatives: str) -> None:
    if objective not in ("rt", "mc"):
        raise ValueError(f"objective must be 'rt' (L_rt only) or 'mc' (L_mc + λ_rt·L_rt), got {objective!r}")
    if objective == "rt" and learn_rho:
        raise ValueError("learn_rho needs objective='mc': L_rt does not involve ρ")
    if negatives not in NEGATIVES:
        raise ValueError(f"unknown negatives {negatives!r}; choose one of: {', '.join(NEGATIVES)}")


def _fit_reverse(new, old, labels, names, objective, learn_rho, tau, lam_rt, negatives, config, steps, device,
                 progress, normalize) -> CompatibilityHeads:
    _check_reverse_options(objective, learn_rho, negatives)
    if objective == "mc" and labels is None:
        raise ValueError("objective='mc' needs labels: positives are the same-label items")
    new, old, dataset = _pairs(new, old, labels, names, normalize)
    d_new, d_old = new.shape[1], old.shape[1]
    heads = _seeded(lambda: CompatibilityHeads(d_new, d_old, learn_rho), config.seed)

    def loss_fn(model: CompatibilityHeads, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        z_new, z_old = x[:, :d_new], x[:, d_new:]
        psi_new = model.psi(z_new)
        l_rt = reverse_loss(psi_new, z_old)
        if objective == "rt":
            return l_rt
        return metric_compatible_loss(psi_new, z_old, model.rho_hat(z_new), y, tau, negatives) + lam_rt * l_rt

    train(heads, dataset, schedule(config, len(dataset), steps), loss_fn=loss_fn, device=device or default_device(),
          desc=f"psi ({objective})", progress=progress)
    return heads.eval()


def _fit_forward(old, new, names, config, steps, device, progress, normalize, arch="mlp") -> nn.Module:
    check_choice(arch, FORWARD_ARCHS, "forward arch")
    old, new, dataset = _pairs(old, new, None, names, normalize)
    d_old = old.shape[1]
    h = _seeded(lambda: forward_transformation(d_old, new.shape[1], arch=arch), config.seed)
    train(h, dataset, schedule(config, len(dataset), steps), loss_fn=lambda m, x, y: regression_loss(m(x[:, :d_old]), x[:, d_old:]),
          device=device or default_device(), desc=f"h (forward, {arch})", progress=progress)
    return h.eval()


def fit_reverse_transform(new, old, labels=None, objective: str = "rt", learn_rho: bool = False, tau: float = 0.2,
                          lam_rt: float = 0.0, negatives: str = "both", config: TrainConfig = TRANSFORM_CONFIG,
                          steps: int | None = TRANSFORM_STEPS, device=None, progress: bool = False,
                          normalize: bool = False) -> CompatibilityHeads:
    """Train ``ψ`` (and ``ρ``) on cached embeddings of the training images; both backbones stay frozen.

    Argument order: the first argument is the space ``ψ`` reads (its input, the new
    embeddings), the second the space it maps into (its target, the old embeddings), as in
    :meth:`ReverseTransform.fit` and :func:`fit_forward_transform`.

    Parameters
    ----------
    new : array (n, d_n)
        ``φ_n(x)`` of the training images: the input of ``ψ``. Unit-norm rows (or
        ``normalize=True``); at least 2 rows.
    old : array (n, d_o)
        ``φ_o(x)`` of the same images, in the same order: the target of ``ψ``.
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
    normalize : bool, default False
        L2-normalise the rows of ``new`` and ``old`` first. By default rows that are not unit
        norm are refused: the losses compare normalised vectors, and a scaled copy (``0.5 * new``)
        would train a different map without a word.

    Returns
    -------
    CompatibilityHeads
        The trained heads, in eval mode, on ``device``.

    Raises
    ------
    ValueError
        If ``objective`` or ``negatives`` is unknown, ``objective="mc"`` has no ``labels``,
        ``learn_rho`` is asked with ``objective="rt"``, ``steps`` is not a positive integer,
        ``new``, ``old`` and ``labels`` do not have one row per image, there are fewer than 2
        images, or a row is not unit norm (without ``normalize``).
    TypeError
        If the embeddings are not numeric or the labels not integers.

    See Also
    --------
    ReverseTransform : the same fit as an object with ``transform``, ``save`` and ``load``.
    """
    return _fit_reverse(new, old, labels, ("new", "old"), objective, learn_rho, tau, lam_rt, negatives, config, steps,
                        device, progress, normalize)


def fit_forward_transform(old, new, config: TrainConfig = TRANSFORM_CONFIG, steps: int | None = TRANSFORM_STEPS,
                          device=None, progress: bool = False, normalize: bool = False,
                          arch: str = "mlp") -> MLPTransform | TwoBranchTransform:
    """Train ``h`` (old → new) by ``mean ||ĥ(φ_o(x)) − φ_n(x)||²`` on cached training embeddings.

    Both backbones stay frozen; ``φ_n(x)`` is the target and gets no gradient. Argument order:
    the first argument is the space ``h`` reads (its input, the old embeddings), the second the
    space it maps into (its target, the new embeddings), as in :meth:`ForwardTransform.fit` and
    :func:`fit_reverse_transform`.

    Parameters
    ----------
    old : array (n, d_o)
        ``φ_o(x)`` of the training images: the input of ``h``. Unit-norm rows (or
        ``normalize=True``); at least 2 rows.
    new : array (n, d_n)
        ``φ_n(x)`` of the same images, in the same order: the target of ``h``.
    config : TrainConfig, default :data:`TRANSFORM_CONFIG`
        Optimiser; ``config.seed`` seeds the initial weights and the batch order.
    steps : int or None, default :data:`TRANSFORM_STEPS`
        Minimum number of optimiser steps (see :func:`schedule`); ``None`` keeps ``config.epochs``.
    device : str or torch.device, optional
        Where to train; default :func:`~backfill_lib.training.default_device`.
    progress : bool, default False
        Show a progress bar.
    normalize : bool, default False
        L2-normalise the rows of ``old`` and ``new`` first; by default rows that are not unit
        norm are refused.
    arch : {"mlp", "fct"}, default "mlp"
        Architecture of ``h`` (:func:`forward_transformation`); the loss and schedule are the
        same for both.

    Returns
    -------
    MLPTransform or TwoBranchTransform
        The trained ``h`` (outputs ``ĥ``), in eval mode, on ``device``.

    Raises
    ------
    ValueError
        If ``arch`` is unknown, ``steps`` is not a positive integer, ``old`` and ``new`` do not
        have one row per image, there are fewer than 2 images, or a row is not unit norm
        (without ``normalize``).
    TypeError
        If the embeddings are not numeric.

    See Also
    --------
    ForwardTransform : the same fit as an object with ``transform``, ``save`` and ``load``.
    """
    return _fit_forward(old, new, ("old", "new"), config, steps, device, progress, normalize, arch)


# --- Fitted transformations a service can keep (scikit-learn manner) --------------------------

#: What :meth:`FittedTransform.save` writes in every file, checked by :meth:`FittedTransform.load`.
FILE_FORMAT = "backfill_lib.transforms.FittedTransform"
#: Layout version of those files; bump it when the layout changes (newer files are refused).
#: Version 2 names the class by its registered name (:func:`register_transform`) and stores a
#: SHA-256 checksum of the class, sizes, hyper-parameters and weights; files of version 1 (the
#: class's bare name, no checksum) still load, with a warning that they cannot be checked.
FILE_VERSION = 3
#: Version 3 and later are written as a NumPy ``.npz`` archive of raw arrays (a JSON header and
#: one array per tensor), read with ``np.load(allow_pickle=False)``: no pickle is involved at all.
#: Versions 1 and 2 were ``torch.save`` files; they are still read, with
#: ``torch.load(weights_only=True)`` (a restricted unpickler that builds only tensors and plain types).
NPZ_VERSION = 3


# --- The file container: raw arrays, no pickle ------------------------------------------------

_NPZ_HEADER = "header"


def _npz_bytes(blob: dict) -> bytes:
    """``blob`` (plain JSON types and a ``state_dict`` of tensors) as an ``.npz`` archive of raw arrays."""
    state = blob["state_dict"]
    names = list(state)
    header = {key: value for key, value in blob.items() if key != "state_dict"}
    header["tensors"] = names
    arrays = {_NPZ_HEADER: np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)}
    for i, name in enumerate(names):
        arrays[f"t{i}"] = state[name].detach().cpu().contiguous().numpy()
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _is_npz(data: bytes) -> bool:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            return f"{_NPZ_HEADER}.npy" in archive.namelist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, KeyError, RuntimeError):
        return False


def _parse_blob(data: bytes, not_ours: str, damaged: str) -> dict:
    """The dict a transform file holds, read without running code.

    Format 3 on: ``np.load(allow_pickle=False)`` of raw arrays. Formats 1 and 2 (``torch.save``):
    ``torch.load(weights_only=True)``.
    """
    if _is_npz(data):
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as archive:
                blob = json.loads(archive[_NPZ_HEADER].tobytes().decode())
                names = blob.pop("tensors")
                if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
                    raise ValueError("its list of tensors is not a list of names")
                if set(archive.files) != {_NPZ_HEADER, *(f"t{i}" for i in range(len(names)))}:
                    raise ValueError("its arrays are not the ones its header lists")
                blob["state_dict"] = {name: torch.from_numpy(np.array(archive[f"t{i}"]))
                                      for i, name in enumerate(names)}
        except Exception as exc:  # noqa: BLE001 - zip, CRC, JSON, npy-header errors of a damaged file
            raise ValueError(f"{damaged} (it cannot be read: {type(exc).__name__}: {exc}); re-fit or restore "
                             "the file") from None
        if not isinstance(blob, dict):
            raise ValueError(not_ours)
        return blob
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several kinds (unpickling, zip, EOF) for a foreign file
        why = f"torch could not read it safely: {type(exc).__name__}"
        if FILE_FORMAT.encode() in data:  # ours, but damaged
            raise ValueError(f"{damaged} ({why}); re-fit or restore the file") from None
        raise ValueError(f"{not_ours} ({why})") from None


# --- Registry of the classes a file may name ---------------------------------------------------

_REGISTRY: dict[str, type] = {}
_NAMES: dict[type, str] = {}
_REGISTRY_LOCK = threading.Lock()


def _what(obj) -> str:
    """How to name a wrong argument in an error message."""
    if inspect.isclass(obj):
        return f"the class {obj.__qualname__}"
    if inspect.isfunction(obj) or inspect.ismethod(obj) or inspect.isbuiltin(obj):
        return f"the function {getattr(obj, '__qualname__', repr(obj))}"
    return f"an instance of {type(obj).__name__}"


def register_transform(cls, name: str | None = None) -> str:
    """Register a transform class under a name, so that files naming it can be loaded.

    A saved transform (a :class:`FittedTransform` file, or the transform stored with an
    :class:`~backfill_lib.live_index.OnlineBackfillIndex`) names its class; loaders look that name
    up here and never import a module named in a file. The library's own classes
    (:class:`ReverseTransform`, :class:`ForwardTransform`) are registered when this module is
    imported, as ``"backfill_lib.transforms:ReverseTransform"`` and
    ``"backfill_lib.transforms:ForwardTransform"``; register your own class before loading a file
    that holds one.

    The first argument, ``cls``, is the class (not an instance). It must have a method
    ``to_bytes()`` and a class method ``from_bytes(data)``, or else a method ``save(path)`` and a
    class method ``load(path)``. (It is described here rather than under Parameters because
    numpydoc's validator takes a first argument named ``cls`` for a class method's own class.)

    Parameters
    ----------
    name : str, optional
        The name files will store; default ``"<module>:<qualified name>"`` of ``cls``. A class
        may be registered under several names (e.g. its old name after it moved); files are
        written under the first.

    Returns
    -------
    str
        ``name``.

    Raises
    ------
    TypeError
        If ``cls`` is not a class or lacks those methods, or ``name`` is not a string.
    ValueError
        If ``name`` is empty or already registered for another class.

    Examples
    --------
    >>> register_transform(ReverseTransform)
    'backfill_lib.transforms:ReverseTransform'
    >>> transform_class("backfill_lib.transforms:ReverseTransform") is ReverseTransform
    True
    """
    if not inspect.isclass(cls):
        hint = "" if inspect.isroutine(cls) else " (pass its class, type(obj))"
        raise TypeError(f"cls must be a transform class, got {_what(cls)}{hint}")

    def is_class_method(attr: str) -> bool:
        return isinstance(inspect.getattr_static(cls, attr, None), (classmethod, staticmethod))

    def is_method(attr: str) -> bool:
        return inspect.isfunction(inspect.getattr_static(cls, attr, None))

    if not ((is_method("to_bytes") and is_class_method("from_bytes")) or (is_method("save") and is_class_method("load"))):
        raise TypeError(f"cls: {cls.__qualname__} cannot be registered as a transform: it needs a method to_bytes() "
                        "and a class method from_bytes(data), or else a method save(path) and a class method "
                        "load(path) (as backfill_lib.transforms.ReverseTransform has)")
    if name is None:
        name = f"{cls.__module__}:{cls.__qualname__}"
    elif not isinstance(name, str):
        raise TypeError(f"name must be a string, got {type(name).__name__}")
    if not name.strip():
        raise ValueError("name must not be empty: leave it unset to use '<module>:<class name>'")
    with _REGISTRY_LOCK:
        taken = _REGISTRY.get(name)
        if taken is not None and taken is not cls:
            raise ValueError(f"name {name!r} is already registered for {taken.__module__}.{taken.__qualname__}; "
                             f"register {cls.__qualname__} under another name")
        _REGISTRY[name] = cls
        _NAMES.setdefault(cls, name)
    return name


def transform_class(name: str) -> type:
    """The class registered under ``name`` (:func:`register_transform`).

    Parameters
    ----------
    name : str
        A registered name, as a saved file stores it, e.g.
        ``"backfill_lib.transforms:ReverseTransform"``.

    Returns
    -------
    type
        The registered class.

    Raises
    ------
    TypeError
        If ``name`` is not a string.
    ValueError
        If no class is registered under ``name``.

    Examples
    --------
    >>> transform_class("backfill_lib.transforms:ForwardTransform").__name__
    'ForwardTransform'
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a string, got {type(name).__name__}")
    with _REGISTRY_LOCK:
        cls = _REGISTRY.get(name)
    if cls is None:
        raise ValueError(f"unknown transform class {name!r}: no class is registered under that name; if it is "
                         "yours, call backfill_lib.transforms.register_transform(TheirClass) before loading "
                         "(files never import the module they name)")
    return cls


def transform_name(cls) -> str | None:
    """The name the class ``cls`` is registered under (the first, if several), or None.

    ``cls`` (the only argument) is any class; anything else gives None. (It is described here
    rather than under Parameters because numpydoc's validator takes a first argument named
    ``cls`` for a class method's own class.)

    Returns
    -------
    str or None
        The name files store for ``cls``; None if it is not registered.

    Examples
    --------
    >>> transform_name(ForwardTransform)
    'backfill_lib.transforms:ForwardTransform'
    >>> transform_name(int) is None
    True
    """
    with _REGISTRY_LOCK:
        return _NAMES.get(cls) if isinstance(cls, type) else None


class NotFittedError(ValueError, AttributeError):
    """Raised when a transform is used before ``fit`` (as in scikit-learn).

    A ``ValueError`` (and an ``AttributeError``, like scikit-learn's ``NotFittedError``), so
    ``except ValueError`` catches it.
    """


def _positive_int(name: str, v, minimum: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < minimum:
        raise ValueError(f"{name} must be an integer of at least {minimum}, got {v!r}")
    return int(v)


def _number(name: str, v, positive: bool) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not np.isfinite(v) \
            or (v <= 0 if positive else v < 0):
        raise ValueError(f"{name} must be a {'positive' if positive else 'non-negative'} finite number, got {v!r}")
    return float(v)


def _flag(name: str, v) -> bool:
    if not isinstance(v, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {v!r}")
    return bool(v)


def _device(device) -> torch.device:
    if device is None:
        return default_device()
    if isinstance(device, bool):  # torch.device(True) would be the second GPU
        raise ValueError(f"device must be 'cpu', 'cuda', 'cuda:0', ... or a torch.device, got {device!r}")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device must be 'cpu', 'cuda', 'cuda:0', ... or a torch.device, got {device!r}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={str(device)!r} but torch sees no GPU here: use device='cpu' (or None)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device={str(device)!r} but torch sees {torch.cuda.device_count()} GPU(s), numbered from 0")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"device={str(device)!r} but Apple's MPS is not available here: use device='cpu' (or None)")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device must be 'cpu', 'cuda', 'cuda:0', ... or 'mps', got {str(device)!r}: a transform "
                         "needs a device that holds data")
    return device


class FittedTransform:
    """What :class:`ReverseTransform` and :class:`ForwardTransform` share: checks, ``save``, ``load``.

    Not used on its own. ``X`` is always the space the transform reads (its input) and ``Y``
    the space it maps into (its target). After ``fit`` (or :meth:`load`) the attributes
    ``dim_in_``, ``dim_out_`` (the widths of ``X`` and ``Y``) and ``module_`` (the trained
    torch module, in eval mode) are set.
    """

    #: Names of the constructor's hyper-parameters that are saved with the weights (not
    #: ``device`` or ``progress``: where and how verbosely to run is not part of the model).
    _saved_params: tuple[str, ...] = ()
    #: What ``X`` and ``Y`` hold, for error messages.
    _spaces: tuple[str, str] = ("input", "target")

    def _common_init(self, steps, batch_size, lr, weight_decay, seed, normalize, device, progress) -> None:
        self.steps = _positive_int("steps", steps)
        # BatchNorm in the heads needs at least two items per batch.
        self.batch_size = _positive_int("batch_size", batch_size, minimum=2)
        self.lr = _number("lr", lr, positive=True)
        self.weight_decay = _number("weight_decay", weight_decay, positive=False)
        self.seed = _positive_int("seed", seed, minimum=0)
        self.normalize = _flag("normalize", normalize)
        self.device = device
        self._device = _device(device)
        self.progress = _flag("progress", progress)
        self.module_ = None
        self.dim_in_ = self.dim_out_ = None

    @property
    def fitted(self) -> bool:
        """Whether ``fit`` (or :meth:`load`) has set the weights."""
        return self.module_ is not None

    def get_params(self) -> dict:
        """The constructor's arguments, as scikit-learn's ``get_params`` returns them.

        Returns
        -------
        dict
            ``{name: value}`` for every constructor parameter; ``type(self)(**params)`` builds
            an unfitted copy.
        """
        return {name: getattr(self, name) for name in self._saved_params + ("device", "progress")}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"

    def _config(self) -> TrainConfig:
        return replace(TRANSFORM_CONFIG, batch_size=self.batch_size, lr=self.lr, weight_decay=self.weight_decay,
                       seed=self.seed)

    def _check_fitted(self) -> None:
        if not self.fitted:
            raise NotFittedError(f"this {type(self).__name__} is not fitted yet: call fit(X, Y) first, "
                                 f"or {type(self).__name__}.load(path)")

    def _x(self, X) -> np.ndarray:
        """``X`` checked against the fitted input width, with unit-norm rows."""
        self._check_fitted()
        return _embeddings(X, f"X ({self._spaces[0]} embeddings)", dim=self.dim_in_, normalize=self.normalize)

    def _build(self, dim_in: int, dim_out: int) -> nn.Module:  # pragma: no cover - each subclass has its own
        raise NotImplementedError

    def _map(self) -> nn.Module:  # pragma: no cover - the module transform() applies
        raise NotImplementedError

    def transform(self, X) -> np.ndarray:
        """Map ``X`` (the input space) into the target space.

        Parameters
        ----------
        X : array-like (n, dim_in_)
            Embeddings of the input space, any real dtype (float16, float32, float64, ...),
            unit-norm rows (or built with ``normalize=True``).

        Returns
        -------
        ndarray (n, dim_out_) of float32
            Unit-norm rows.

        Raises
        ------
        NotFittedError
            Before ``fit`` or :meth:`load`.
        TypeError
            If ``X`` is not real numbers.
        ValueError
            If ``X`` is not a finite non-empty 2-D array of width ``dim_in_``, or a row is not
            unit norm (without ``normalize``).
        """
        x = self._x(X)  # first: it says "not fitted" before the map is looked up
        return _apply_checked(self._map(), x)

    def _blob(self) -> dict:
        """What :meth:`to_bytes` writes: plain types and tensors, with the checksum."""
        from . import __version__  # here, not at import time: the package imports this module lazily

        self._check_fitted()
        state = {k: v.detach().cpu().clone() for k, v in self.module_.state_dict().items()}
        bad = _non_finite(state)
        if bad is not None:
            raise ValueError(f"this {type(self).__name__} holds non-finite weights (NaN or infinity in {bad!r}): "
                             "it would map every input to NaN; fit it again (with a lower lr)")
        cls = type(self)
        header = {"class": transform_name(cls) or f"{cls.__module__}:{cls.__qualname__}",
                  "dims": {"dim_in": int(self.dim_in_), "dim_out": int(self.dim_out_)},
                  "params": {name: getattr(self, name) for name in self._saved_params}}
        return {"format": FILE_FORMAT, "version": FILE_VERSION, "backfill_lib_version": __version__, **header,
                "state_dict": state, "checksum": state_checksum(state, header)}

    def to_bytes(self) -> bytes:
        """The fitted transform as bytes, in the format of :meth:`save` (read back by :meth:`from_bytes`).

        A NumPy ``.npz`` archive of raw arrays, with no pickle in it: a JSON header (the sizes
        and hyper-parameters, the registered name of the class (:func:`transform_name`; a class
        that is not registered is named ``"<module>:<qualified name>"`` and must be registered
        before loading) and a SHA-256 checksum of all of them and of the weights) and one array
        per weight tensor.

        Returns
        -------
        bytes
            The content of a file :meth:`save` would write.

        Raises
        ------
        NotFittedError
            Before ``fit``.
        ValueError
            If the weights hold NaN or infinite values.
        """
        return _npz_bytes(self._blob())

    def save(self, path) -> Path:
        """Write the fitted weights with their dimensions, hyper-parameters, class name and checksum.

        The bytes of :meth:`to_bytes`, written to a temporary file in the same folder and moved
        into place, so a crash never leaves half a file under ``path``.

        Parameters
        ----------
        path : str or Path
            Where to write (``.pt`` by custom); an existing file is replaced. Its folder must
            exist.

        Returns
        -------
        Path
            ``path``.

        Raises
        ------
        NotFittedError
            Before ``fit``.
        ValueError
            If the weights hold NaN or infinite values.
        FileNotFoundError
            If the folder of ``path`` does not exist.
        IsADirectoryError
            If ``path`` is a folder.
        TypeError
            If ``path`` is not a str or path.
        """
        path = Path(check_path(path)).expanduser()
        data = self.to_bytes()
        if not path.parent.is_dir():
            raise FileNotFoundError(f"path: folder {path.parent} does not exist; create it first")
        if path.is_dir():
            raise IsADirectoryError(f"path: {path} is a folder; give a file name, such as {path / 'transform.pt'}")
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path, device=None) -> "FittedTransform":
        """Read a transform written by :meth:`save`, ready to :meth:`transform`.

        Loading is safe: the weights are raw arrays read with ``np.load(allow_pickle=False)``
        (files of formats 1 and 2, written by ``torch.save``, with ``torch.load(weights_only=True)``),
        so no code from the file runs, and the class is looked up among the registered ones (:func:`register_transform`), never
        imported. ``FittedTransform.load`` returns whichever class the file holds;
        ``ReverseTransform.load`` and ``ForwardTransform.load`` insist on their own (or a
        subclass). The checks are those of :meth:`from_bytes`.

        Parameters
        ----------
        path : str or Path
            A file written by :meth:`save`.
        device : str or torch.device, optional
            Where to put the weights; default :func:`~backfill_lib.training.default_device`.

        Returns
        -------
        FittedTransform
            The fitted transform, with the hyper-parameters it was saved with.

        Raises
        ------
        FileNotFoundError
            If there is no file at ``path``.
        IsADirectoryError
            If ``path`` is a folder.
        TypeError
            If ``path`` is not a str or path.
        ValueError
            If ``device`` is not usable here, or the file is not one written by :meth:`save`
            (another kind of file), is damaged (its content does not match its checksum, or it
            holds non-finite weights or weights that do not fit its sizes), holds another class
            than the one asked or one that is not registered, or was written by a newer version
            of the format.

        Warns
        -----
        UserWarning
            When the file was written in format version 1, before checksums: it loads, but
            damage cannot be detected; save it again to add a checksum.
        """
        path = Path(check_path(path)).expanduser()
        if path.is_dir():
            raise IsADirectoryError(f"path: {path} is a folder, not a transform file (written by {cls.__name__}.save)")
        if not path.is_file():
            raise FileNotFoundError(f"path: no transform file at {path} (write one with {cls.__name__}.save)")
        _device(device)  # a bad device is the caller's error, not the file's: check it first
        return cls._read(path.read_bytes(), device, str(path))

    @classmethod
    def from_bytes(cls, data: bytes, device=None) -> "FittedTransform":
        """Read a transform from the bytes of :meth:`to_bytes` (or of a file written by :meth:`save`).

        The same checks as :meth:`load`, in memory (no file, no temporary file):
        ``np.load(allow_pickle=False)`` on the bytes (``torch.load(weights_only=True)`` for
        formats 1 and 2; no code runs), the class looked up
        among the registered ones (:func:`register_transform`), the SHA-256 checksum of the
        class, sizes, hyper-parameters and weights compared with the one stored, non-finite
        weights refused, and each tensor's name, shape and dtype compared with the module the
        sizes describe before anything is allocated.

        Parameters
        ----------
        data : bytes
            Output of :meth:`to_bytes` (``bytearray`` and ``memoryview`` are accepted too).
        device : str or torch.device, optional
            Where to put the weights; default :func:`~backfill_lib.training.default_device`.

        Returns
        -------
        FittedTransform
            The fitted transform, of the class the bytes hold.

        Raises
        ------
        TypeError
            If ``data`` is not bytes (e.g. a path: use :meth:`load`).
        ValueError
            If ``device`` is not usable here, or ``data`` is not a transform written by
            :meth:`to_bytes`, is damaged, holds another class than the one asked or one that
            is not registered, or was written by a newer version of the format.

        Warns
        -----
        UserWarning
            When ``data`` is in format version 1, written before checksums.

        Examples
        --------
        >>> rng = np.random.default_rng(0)
        >>> x = normalize_rows(rng.normal(size=(16, 3)))
        >>> h = ForwardTransform(steps=2, batch_size=8, device="cpu").fit(x, x)
        >>> back = FittedTransform.from_bytes(h.to_bytes(), device="cpu")
        >>> type(back).__name__, bool((back.transform(x) == h.transform(x)).all())
        ('ForwardTransform', True)
        """
        if isinstance(data, (bytearray, memoryview)):
            data = bytes(data)
        if not isinstance(data, bytes):
            hint = ": to read a file use load(path)" if isinstance(data, (str, os.PathLike)) else ""
            raise TypeError(f"data must be bytes written by to_bytes(), got {type(data).__name__}{hint}")
        _device(device)  # a bad device is the caller's error, not the data's: check it first
        return cls._read(data, device, "data")

    @classmethod
    def _read(cls, data: bytes, device, source: str) -> "FittedTransform":
        """:meth:`from_bytes` once the arguments are checked; ``source`` names the bytes in messages."""
        noun = "transform" if source == "data" else "transform file"
        not_ours = f"{source} is not a {noun} written by ReverseTransform.save or ForwardTransform.save"
        damaged = f"{source} is damaged"
        blob = _parse_blob(data, not_ours, damaged)
        if not isinstance(blob, dict) or blob.get("format") != FILE_FORMAT:
            raise ValueError(not_ours)
        version = blob.get("version")
        if isinstance(version, int) and not isinstance(version, bool) and version > FILE_VERSION:
            raise ValueError(f"{source} has format version {version!r}, newer than this backfill_lib reads "
                             f"({FILE_VERSION}): upgrade backfill_lib (it was written by version "
                             f"{blob.get('backfill_lib_version')!r})")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise ValueError(f"{damaged}: its format version {version!r} is not one backfill_lib writes")
        header = {key: blob.get(key) for key in ("class", "dims", "params")}
        state = blob.get("state_dict")
        if version >= 2 or "checksum" in blob:  # a file of version 1 never has one: check it if it is there
            try:
                intact = isinstance(blob.get("checksum"), str) and state_checksum(state, header) == blob["checksum"]
            except (TypeError, ValueError, RuntimeError):
                intact = False
            if not intact:
                raise ValueError(f"{damaged}: its weights do not match the checksum stored with them; re-fit or "
                                 "restore the file")
        else:
            warnings.warn(f"{source} was written in transform format version {version}, without a checksum: damage "
                          "to it cannot be detected; save it again to add one", UserWarning, stacklevel=3)
        kind = _file_class(header["class"], version, source)
        if not (inspect.isclass(kind) and issubclass(kind, FittedTransform)):
            raise ValueError(f"{source} names {header['class']!r}, a registered class that is not a "
                             f"FittedTransform: load it with {kind.__qualname__}.from_bytes")
        if not issubclass(kind, cls):
            raise ValueError(f"{source} holds a {kind.__name__}, not a {cls.__name__}: load it with "
                             f"{kind.__name__}.load (or FittedTransform.load)")
        obj, module = kind._restore(header, state, version, device, damaged)
        obj.module_ = module.to(obj._device).eval()
        return obj

    @classmethod
    def _restore(cls, header: dict, state, version: int, device, damaged: str):
        """An unfitted ``cls`` with the saved hyper-parameters, and its module holding ``state``."""
        params, dims = header["params"], header["dims"]
        if not isinstance(params, dict) or not all(isinstance(k, str) for k in params):
            raise ValueError(f"{damaged}: its hyper-parameters are not a dict of names")
        unknown = sorted(set(params) - set(cls._saved_params))
        # version 1 files may lack a hyper-parameter added later (arch); it then has its default
        missing = sorted(set(cls._saved_params) - set(params)) if version >= 2 else []
        if unknown or missing:
            raise ValueError(f"{damaged}: hyper-parameters {unknown or missing} are "
                             f"{'not ones' if unknown else 'missing, which'} {cls.__name__} saves")
        try:
            obj = cls(**params, device=device)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{damaged}: its hyper-parameters are refused ({exc})") from None
        if not isinstance(dims, dict) or set(dims) != {"dim_in", "dim_out"}:
            raise ValueError(f"{damaged}: its sizes are not {{'dim_in': ..., 'dim_out': ...}}")
        try:
            dim_in, dim_out = _check_dim("dim_in", dims["dim_in"]), _check_dim("dim_out", dims["dim_out"])
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{damaged}: {exc}") from None
        if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                  for k, v in state.items()):
            raise ValueError(f"{damaged}: its weights are not a dict of named tensors")
        with torch.device("meta"):  # the shapes the sizes describe, without allocating (sizes may be huge)
            module = obj._build(dim_in, dim_out)
        expected = module.state_dict()
        if state.keys() != expected.keys():
            extra, absent = sorted(state.keys() - expected.keys()), sorted(expected.keys() - state.keys())
            raise ValueError(f"{damaged}: its weights do not fit a {cls.__name__} of sizes {dim_in} -> {dim_out} "
                             f"(unexpected {extra[:3]}, missing {absent[:3]})")
        for key, tensor in state.items():
            want = expected[key]
            if tensor.layout != torch.strided:
                raise ValueError(f"{damaged}: tensor {key!r} is stored as {tensor.layout}, not as a dense tensor")
            if tensor.shape != want.shape or tensor.dtype != want.dtype:
                raise ValueError(f"{damaged}: tensor {key!r} is {tensor.dtype} of shape {tuple(tensor.shape)}, but "
                                 f"a {cls.__name__} of sizes {dim_in} -> {dim_out} has {want.dtype} of shape "
                                 f"{tuple(want.shape)}")
        bad = _non_finite(state)
        if bad is not None:
            raise ValueError(f"{damaged}: its weights hold NaN or infinity (in {bad!r}); re-fit or restore the file")
        module = module.to_empty(device="cpu")
        module.load_state_dict(state)
        obj.dim_in_, obj.dim_out_ = dim_in, dim_out
        return obj, module


def _non_finite(state: dict) -> str | None:
    """The name of the first floating-point tensor of ``state`` holding NaN or infinity, else None."""
    for key, tensor in state.items():
        if (tensor.is_floating_point() or tensor.is_complex()) and not bool(torch.isfinite(tensor).all()):
            return key
    return None


def _file_class(name, version: int, source: str) -> type:
    """The registered class a file names; files of version 1 stored the class's bare name."""
    if not isinstance(name, str):
        raise ValueError(f"{source} is damaged: its class name {name!r} is not a string")
    if version == 1 and ":" not in name:
        with _REGISTRY_LOCK:
            found = [c for c in _NAMES if issubclass(c, FittedTransform) and c.__name__ == name]
        own = [c for c in found if c.__module__ == __name__]
        if own or len(found) == 1:
            return (own or found)[0]
        name = f"{__name__}:{name}"  # the name the error message should send the user to register
    try:
        return transform_class(name)
    except ValueError as exc:
        raise ValueError(f"{source} holds an {exc}") from None


class ReverseTransform(FittedTransform):
    """The reverse transformation ``ψ: new → old`` (METHOD §3.4), with an optional learnable ``ρ`` (§3.5).

    ``ψ̂(φ_n(q))`` lets a new query search the gallery items still stored old; ``ρ̂(φ_n(·))``
    (:meth:`new_embedding`) is what gets backfilled and what queries the new-stored items.
    Wraps :func:`fit_reverse_transform`.

    Argument order, as in every transform here: ``fit(X, Y)`` with ``X`` the space the
    transform reads (its input: the **new** embeddings ``φ_n(x)``) and ``Y`` the space it maps
    into (its target: the **old** embeddings ``φ_o(x)`` of the same images).

    Parameters
    ----------
    objective : {"rt", "mc"}, default "rt"
        ``"rt"``: ``L_rt`` only. ``"mc"``: metric-compatible ``L_mc + λ_rt·L_rt`` (needs labels).
    learn_rho : bool, default False
        Learn ``ρ`` too (``objective="mc"`` only); otherwise ``ρ`` is the identity.
    tau : float, default 0.2
        Temperature of ``L_mc``.
    lam_rt : float, default 0.0
        Weight ``λ_rt`` of ``L_rt`` in the ``"mc"`` objective.
    negatives : {"both", "old", "new"}, default "both"
        Stored set(s) ``L_mc`` takes negatives from.
    steps : int, default :data:`TRANSFORM_STEPS`
        Optimiser steps (at least; see :func:`schedule`).
    batch_size : int, default 256
        Items per step (at least 2).
    lr : float, default 2e-3
        Peak learning rate (cosine decay).
    weight_decay : float, default 1e-4
        AdamW weight decay.
    seed : int, default 0
        Seeds the initial weights and the batch order: the same data and seed give the same ``ψ``.
    normalize : bool, default False
        L2-normalise input rows (in :meth:`fit`, :meth:`~FittedTransform.transform` and :meth:`new_embedding`);
        by default rows that are not unit norm are refused.
    device : str or torch.device, optional
        Where to train and run; default :func:`~backfill_lib.training.default_device`.
    progress : bool, default False
        Show a progress bar while fitting.

    Attributes
    ----------
    dim_in_ : int
        Width of ``X`` (``d_n``), set by :meth:`fit`.
    dim_out_ : int
        Width of ``Y`` (``d_o``).
    module_ : CompatibilityHeads
        The trained heads (``module_.psi``, ``module_.rho``).

    Raises
    ------
    ValueError
        If a hyper-parameter is out of range, ``objective`` or ``negatives`` is unknown,
        ``learn_rho`` is asked with ``objective="rt"``, or ``device`` is not usable here.
    TypeError
        If a flag is not a bool.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> new = normalize_rows(rng.normal(size=(64, 8)))
    >>> old = normalize_rows(new[:, :4])
    >>> psi = ReverseTransform(steps=20, device="cpu").fit(new, old)  # X = new (input), Y = old (target)
    >>> psi.transform(new).shape
    (64, 4)
    """

    _saved_params = ("objective", "learn_rho", "tau", "lam_rt", "negatives", "steps", "batch_size", "lr",
                     "weight_decay", "seed", "normalize")
    _spaces = ("new", "old")

    def __init__(self, objective: str = "rt", learn_rho: bool = False, tau: float = 0.2, lam_rt: float = 0.0,
                 negatives: str = "both", steps: int = TRANSFORM_STEPS, batch_size: int = TRANSFORM_CONFIG.batch_size,
                 lr: float = TRANSFORM_CONFIG.lr, weight_decay: float = TRANSFORM_CONFIG.weight_decay, seed: int = 0,
                 normalize: bool = False, device=None, progress: bool = False):
        self.learn_rho = _flag("learn_rho", learn_rho)
        _check_reverse_options(objective, self.learn_rho, negatives)
        self.objective, self.negatives = objective, negatives
        self.tau = _number("tau", tau, positive=True)
        self.lam_rt = _number("lam_rt", lam_rt, positive=False)
        self._common_init(steps, batch_size, lr, weight_decay, seed, normalize, device, progress)

    def fit(self, X, Y, labels=None) -> "ReverseTransform":
        """Train ``ψ`` (and ``ρ``) on embeddings of the same training images by both models.

        Parameters
        ----------
        X : array-like (n, d_n)
            Input space: the **new** embeddings ``φ_n(x)``, unit-norm rows, at least 2.
        Y : array-like (n, d_o)
            Target space: the **old** embeddings ``φ_o(x)`` of the same images, same order.
        labels : array-like (n,) of int, optional
            Class labels; needed by ``objective="mc"``, unused by ``"rt"``.

        Returns
        -------
        ReverseTransform
            ``self``, fitted.

        Raises
        ------
        ValueError
            If ``X``, ``Y`` (and ``labels``) do not have one row per image, there are fewer than
            2, a row is not unit norm (without ``normalize``), or ``objective="mc"`` has no
            ``labels``.
        TypeError
            If the embeddings are not real numbers or the labels not integers.
        """
        heads = _fit_reverse(X, Y, labels, ("X (new embeddings)", "Y (old embeddings)"), self.objective,
                             self.learn_rho, self.tau, self.lam_rt, self.negatives, self._config(), self.steps,
                             self._device, self.progress, self.normalize)
        self.module_, self.dim_in_, self.dim_out_ = heads, heads.d_new, heads.d_old
        return self

    def _build(self, dim_in: int, dim_out: int) -> CompatibilityHeads:
        return CompatibilityHeads(dim_in, dim_out, self.learn_rho)

    def _map(self) -> nn.Module:
        return self.module_.psi

    def new_embedding(self, X) -> np.ndarray:
        """``ρ̂(X)``: the vector to backfill and to query the new-stored items with.

        With ``learn_rho=False`` ``ρ`` is the identity and this returns ``X`` (unit-norm rows).

        Parameters
        ----------
        X : array-like (n, dim_in_)
            New embeddings ``φ_n(·)``, any real dtype, unit-norm rows (or ``normalize=True``).

        Returns
        -------
        ndarray (n, dim_in_) of float32
            Unit-norm rows ``ρ̂(φ_n(·))``.

        Raises
        ------
        NotFittedError
            Before :meth:`fit` or :meth:`~FittedTransform.load`.
        TypeError
            If ``X`` is not real numbers.
        ValueError
            If ``X`` is not a finite non-empty 2-D array of width ``dim_in_``, or a row is not
            unit norm (without ``normalize``).
        """
        x = self._x(X)
        return x if self.module_.rho is None else apply_transform(self.module_.rho, x, name="X")


class ForwardTransform(FittedTransform):
    """The forward transformation ``h: old → new`` (FCT-style without side information, METHOD §2).

    ``ĥ(φ_o(g))`` re-expresses a stored old vector in the new space, so one new query
    ``φ_n(q)`` searches everything. Wraps :func:`fit_forward_transform`.

    Argument order, as in every transform here: ``fit(X, Y)`` with ``X`` the space the
    transform reads (its input: the **old** embeddings ``φ_o(x)``) and ``Y`` the space it maps
    into (its target: the **new** embeddings ``φ_n(x)`` of the same images).

    Parameters
    ----------
    steps : int, default :data:`TRANSFORM_STEPS`
        Optimiser steps (at least; see :func:`schedule`).
    batch_size : int, default 256
        Items per step (at least 2).
    lr : float, default 2e-3
        Peak learning rate (cosine decay).
    weight_decay : float, default 1e-4
        AdamW weight decay.
    seed : int, default 0
        Seeds the initial weights and the batch order: the same data and seed give the same ``h``.
    arch : {"mlp", "fct"}, default "mlp"
        Architecture of ``h`` (:func:`forward_transformation`): ours, or ml-fct's two-branch
        transformation.
    normalize : bool, default False
        L2-normalise input rows (in :meth:`fit` and :meth:`~FittedTransform.transform`); by default rows that are
        not unit norm are refused.
    device : str or torch.device, optional
        Where to train and run; default :func:`~backfill_lib.training.default_device`.
    progress : bool, default False
        Show a progress bar while fitting.

    Attributes
    ----------
    dim_in_ : int
        Width of ``X`` (``d_o``), set by :meth:`fit`.
    dim_out_ : int
        Width of ``Y`` (``d_n``).
    module_ : MLPTransform or TwoBranchTransform
        The trained ``h``.

    Raises
    ------
    ValueError
        If a hyper-parameter is out of range, ``arch`` is unknown, or ``device`` is not usable
        here.
    TypeError
        If a flag is not a bool.
    """

    _saved_params = ("steps", "batch_size", "lr", "weight_decay", "seed", "normalize", "arch")
    _spaces = ("old", "new")

    def __init__(self, steps: int = TRANSFORM_STEPS, batch_size: int = TRANSFORM_CONFIG.batch_size,
                 lr: float = TRANSFORM_CONFIG.lr, weight_decay: float = TRANSFORM_CONFIG.weight_decay, seed: int = 0,
                 normalize: bool = False, device=None, progress: bool = False, arch: str = "mlp"):
        self.arch = check_choice(arch, FORWARD_ARCHS, "arch")
        self._common_init(steps, batch_size, lr, weight_decay, seed, normalize, device, progress)

    def fit(self, X, Y, labels=None) -> "ForwardTransform":
        """Train ``h`` on embeddings of the same training images by both models.

        Parameters
        ----------
        X : array-like (n, d_o)
            Input space: the **old** embeddings ``φ_o(x)``, unit-norm rows, at least 2.
        Y : array-like (n, d_n)
            Target space: the **new** embeddings ``φ_n(x)`` of the same images, same order.
        labels : array-like (n,) of int, optional
            Unused (the regression objective needs no labels); accepted so that both
            transforms are fitted with the same call.

        Returns
        -------
        ForwardTransform
            ``self``, fitted.

        Raises
        ------
        ValueError
            If ``X`` and ``Y`` do not have one row per image, there are fewer than 2, or a row
            is not unit norm (without ``normalize``).
        TypeError
            If the embeddings are not real numbers.
        """
        h = _fit_forward(X, Y, ("X (old embeddings)", "Y (new embeddings)"), self._config(), self.steps,
                         self._device, self.progress, self.normalize, self.arch)
        self.module_, self.dim_in_, self.dim_out_ = h, h.d_in, h.d_out
        return self

    def _build(self, dim_in: int, dim_out: int) -> nn.Module:
        return forward_transformation(dim_in, dim_out, arch=self.arch)

    def _map(self) -> nn.Module:
        return self.module_


for _cls in (ReverseTransform, ForwardTransform):
    register_transform(_cls)  # as "backfill_lib.transforms:<name>": index files store these names

# The closed-form adapters bridge new to old like ψ: a live index saved with one attached names it.
from .adapters import LowRankAffineAdapter, ProcrustesAdapter  # noqa: E402  (numpy and scipy only)

for _cls in (ProcrustesAdapter, LowRankAffineAdapter):
    register_transform(_cls)
