"""The state of one experiment run: data, trained models, cached embeddings and heads, timings.

This is the training layer under :mod:`~backfill_lib.strategies`. A strategy's builder
(``strategies.build_strategy("rank_merge", ctx)``) asks an :class:`ExperimentContext` for the
models and embeddings it needs; the context trains each model (or loads it from the checkpoint
cache) once, lazily, and the builder hands the embeddings to the array-level constructor of
:mod:`~backfill_lib.backfill` (``backfill.rank_merge(old, new)``). Heads trained on cached
embeddings (``ψ``, ``ρ``, ``h``) go through the same checkpoint cache (:meth:`ExperimentContext.fit_head`).

:class:`Preset` (one dataset's models and schedules, :data:`PRESETS`) and :class:`MethodParams`
(the methods' hyper-parameters) are the places to change the scale and the methods' settings.
This module imports torch; :mod:`~backfill_lib.strategies` does not, and re-exports these names.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from . import transforms as tf
from .calibration import CALIBRATIONS
from .data import BackfillData
from .models import EmbeddingModel, ModelSpec, build_model
from .training import (TrainConfig, cache_key, check_cache_dir, extract_embeddings, resolve_device, train,
                       train_or_load)
from .validation import check_choice, check_non_negative, check_positive_int, check_seed  # noqa: F401 (re-exported)


@dataclass(frozen=True)
class Preset:
    """Models and schedules of one dataset: the one place to change the scale.

    Each parameter is kept as an attribute of the same name.

    Parameters
    ----------
    old : ModelSpec
        The old model ``φ_o`` (trained on the old classes).
    new : ModelSpec
        The new model ``φ_n`` in the homogeneous setting (usually the same as ``old``).
    new_heterogeneous : ModelSpec
        The new model in the heterogeneous setting (another architecture and embedding size).
    train : TrainConfig
        Schedule of the old and new models, BCT and RA-BCT (its seed is replaced by the run's).
    old_label_map : tuple of int, optional
        Train the old model on coarse labels (see ``ExperimentContext.old_label_map``, which
        takes this value when it is not given itself); default None, the old model on the fine
        labels of the old classes. Here so that a preset given to
        :func:`~backfill_lib.experiment.run_experiment` can carry it.
    """

    old: ModelSpec
    new: ModelSpec
    new_heterogeneous: ModelSpec
    train: TrainConfig
    old_label_map: tuple[int, ...] | None = None


#: The :class:`Preset` of each dataset name (what :class:`ExperimentContext` uses when given none).
PRESETS: dict[str, Preset] = {
    "digits": Preset(ModelSpec("small_cnn", 32, 32), ModelSpec("small_cnn", 32, 32),
                     ModelSpec("mlp", 64, 64), TrainConfig(epochs=30, batch_size=64, lr=2e-3)),
    "synthetic": Preset(ModelSpec("mlp", 16, 32), ModelSpec("mlp", 16, 32),
                        ModelSpec("mlp", 24, 48), TrainConfig(epochs=20, batch_size=64, lr=2e-3)),
    "cifar100": Preset(ModelSpec("resnet18", 128), ModelSpec("resnet18", 128), ModelSpec("resnet50", 256),
                       TrainConfig(epochs=100, batch_size=128, lr=0.1, weight_decay=5e-4, optimizer="sgd")),
    "imagefolder": Preset(ModelSpec("resnet18", 128), ModelSpec("resnet18", 128), ModelSpec("resnet50", 256),
                          TrainConfig(epochs=60, batch_size=128, lr=0.1, weight_decay=5e-4, optimizer="sgd")),
    # BT²'s CIFAR-100 recipe (its configs; ml-fct's differs in the optimiser): ImageNet-stem
    # ResNet-50, d = 128, normalised-feature classifier without bias, label smoothing 0.1, Adam
    # lr 1e-3 (ours: AdamW), weight decay 2^-15, batch 128, 100 epochs with 5 warm-up. Load the
    # data with load_dataset("cifar100", image_size=224). The heterogeneous new model (d = 256) is ours.
    "cifar100_bt2": Preset(ModelSpec("resnet50", 128, classifier="normalized", stem="imagenet"),
                           ModelSpec("resnet50", 128, classifier="normalized", stem="imagenet"),
                           ModelSpec("resnet50", 256, classifier="normalized", stem="imagenet"),
                           TrainConfig(epochs=100, batch_size=128, lr=1e-3, weight_decay=2**-15, optimizer="adam",
                                       label_smoothing=0.1, warmup_epochs=5)),
    # The book's running example (issue 17): a CNN for visual search in a shop, sized for a 2-core
    # CPU. pooled_cnn (blocks at 28, 14, 7 px, the last 3×3 map flattened) at width 16, d = 32,
    # 6 epochs, AdamW lr 2e-3, batch 64; the heterogeneous new model is the stronger architecture,
    # the same CNN twice as wide with d = 64. Measured on this project's shared 2-core machine (one
    # torch thread, other jobs running: times are rough), load_dataset("fashion_mnist") defaults
    # (20,000 train / 3,000 test), old model on classes 0-4, new on all 10; seconds to train the
    # old + the new model, old/old and new/new mAP (leave-one-out over the test split):
    #   pooled_cnn w16, 6 epochs (this preset), seeds 0-2: 20-21 + 38-40 s, 0.505 / 0.786
    #     (0.511/0.780, 0.500/0.788, 0.505/0.789)
    #   mlp w32, 6 epochs, seeds 0-2:   2-4 + 5-7 s,  0.483 / 0.770
    #   mlp w32, 10 epochs, seeds 0-2:  3-6 + 6-8 s,  0.443 / 0.769
    #   the same CNN averaging its 7×7 map (global average pooling) instead of flattening a 3×3 one,
    #   seed 0: 0.493 / 0.737 at 6 epochs (22 + 41 s), 0.491 / 0.751 at 10; at width 32, 6 epochs:
    #   0.505 / 0.762 (60 + 99 s). small_cnn, which runs its second block at 28 px (7.3 M
    #   multiply-adds per image at width 16 against 1.9 M here), width 16, 6 epochs, 10,000 training
    #   images (an earlier run on the same machine): 28 + 60 s, 0.43 / 0.64.
    #   heterogeneous new model (width 32, d = 64), seed 0: 106 s, new/new 0.806.
    #   relative gains, seeds 0-2, default MethodParams, this preset (the mlp w32 6 epochs):
    #   rank_merge 0.04 (0.26), rank_merge_calibrated 0.51 (0.53), reverse_transform 0.06 (0.28),
    #   mct 0.95 (0.83), forward_transform 0.92 (0.90). The CNN's two spaces are far less
    #   comparable as they are (rank merge near 0) and mct gains most from calibrating them.
    # The CNN beats the mlp at both ends (old/old +0.02, new/new +0.02) and leaves the upgrade a
    # clear gap (0.28 mAP) for the book's story, for 10x the mlp's time: about a minute per pair of
    # models. benchmarks/fashion_budget.py (results/fashion_budget.md) extrapolates the book with
    # this preset to about 12 minutes from an empty cache (10 backbones, 14 heads, 82 curves) and
    # at most 78 s for a chapter with a warm cache: within issue 17's 25 minutes and 4 minutes.
    "fashion_mnist": Preset(ModelSpec("pooled_cnn", 32, 16), ModelSpec("pooled_cnn", 32, 16),
                            ModelSpec("pooled_cnn", 64, 32), TrainConfig(epochs=6, batch_size=64, lr=2e-3)),
}

#: Valid ``setting`` values: the new model has the old model's architecture, or another one.
SETTINGS = ("homogeneous", "heterogeneous")


@dataclass(frozen=True)
class MethodParams:
    """Hyper-parameters of the compatibility methods (METHOD §3).

    How they were chosen is in ``results/README.md`` (a sweep on a validation split carved out of
    the training data). Each parameter is kept as an attribute of the same name.

    Parameters
    ----------
    bct_lambda : float, default 1.0
        Weight ``λ`` of BCT's influence loss (§3.2).
    ra_bct_lambda : float, default 1.0
        Weight ``λ`` of RA-BCT's ``L_ra`` (§3.3).
    ra_bct_tau : float, default 0.05
        Temperature of ``L_ra`` (``τ = 0.05`` as published).
    mct_tau : float, default 0.2
        Temperature ``τ`` of ``L_mc`` (§3.5).
    mct_lambda_rt : float, default 0.0
        Weight ``λ_rt`` of ``L_rt`` next to ``L_mc``. The validation sweep preferred ``τ = 0.2`` and
        ``λ_rt = 0``: ``L_mc`` already holds each image's own old feature as a positive, and
        adding ``L_rt`` lowered the validation relative gain (0.73 → 0.67).
    transform : TrainConfig, optional
        Optimiser of ``ψ``, ``ρ`` and ``h`` on cached embeddings, default
        :data:`~backfill_lib.transforms.TRANSFORM_CONFIG` (its seed is replaced by the run's, its
        epochs by enough to make ``transform_steps`` steps).
    transform_steps : int, optional
        Optimiser steps of the heads, whatever the size of the training set, default
        :data:`~backfill_lib.transforms.TRANSFORM_STEPS` (a small training set would otherwise
        give a few dozen steps and an under-fitted ``ψ``).
    bct_pseudo_lambda : float, default 1.0
        Weight ``λ`` of the influence loss of ``bct_pseudo``, BCT through the pseudo-classifier of
        old-feature class means (:mod:`~backfill_lib.losses.bct_pseudo`). 1 as for BCT; BT²
        trains this variant with ``α = 10``.
    ra_bct_topk : int, optional
        RA-BCT: keep only the ``k`` hardest (highest-scoring) other-class negatives of each
        anchor in each set (old and new features); default None, every other-class negative of
        the batch (the published loss).
    calibration : str, default "platt"
        How ``rank_merge_calibrated`` maps each space's scores onto one scale, one of
        :data:`~backfill_lib.calibration.CALIBRATIONS` (see
        :func:`~backfill_lib.calibration.fit_score_map`).
    forward_arch : {"mlp", "fct"}, default "mlp"
        Architecture of the forward transformation ``h`` of ``forward_transform``
        (:func:`~backfill_lib.transforms.forward_transformation`): ``"mlp"`` (ours,
        Linear–BN/ReLU–Linear) or ``"fct"``, ml-fct's two-branch transformation with the old
        feature feeding both branches (:class:`~backfill_lib.transforms.TwoBranchTransform`).
    slerp_t : float, default 0.5
        ``slerp``: how far along the sphere the old query moves towards the Procrustes-mapped new
        query (:func:`~backfill_lib.adapters.slerp_query`), in [0, 1]; 0 is old/old, 1 the
        mapped new query alone.

    Raises
    ------
    ValueError
        If ``calibration`` or ``forward_arch`` is unknown, ``ra_bct_topk`` or ``transform_steps``
        is below 1, a loss weight (``*_lambda*``) is negative, a temperature (``*_tau``) is not
        positive, ``slerp_t`` is outside [0, 1], or any of them is NaN or infinite.
    TypeError
        If ``ra_bct_topk`` is neither None nor an integer, ``transform_steps`` is not an integer,
        or a weight or temperature is not a real number.
    """

    bct_lambda: float = 1.0
    ra_bct_lambda: float = 1.0
    ra_bct_tau: float = 0.05
    mct_tau: float = 0.2
    mct_lambda_rt: float = 0.0
    transform: TrainConfig = tf.TRANSFORM_CONFIG
    transform_steps: int = tf.TRANSFORM_STEPS
    bct_pseudo_lambda: float = 1.0
    ra_bct_topk: int | None = None
    calibration: str = "platt"
    forward_arch: str = "mlp"
    slerp_t: float = 0.5

    def __post_init__(self):
        check_choice(self.calibration, CALIBRATIONS, "calibration")
        check_choice(self.forward_arch, tf.FORWARD_ARCHS, "forward_arch")
        check_positive_int(self.ra_bct_topk, "ra_bct_topk", "negatives kept per anchor and set", allow_none=True)
        check_positive_int(self.transform_steps, "transform_steps", "optimiser steps of the heads")
        for name in ("bct_lambda", "ra_bct_lambda", "mct_lambda_rt", "bct_pseudo_lambda"):
            check_non_negative(getattr(self, name), name, "a loss weight")
        for name in ("ra_bct_tau", "mct_tau"):
            check_non_negative(getattr(self, name), name, "a temperature", strict=True)
        if not 0.0 <= check_non_negative(self.slerp_t, "slerp_t", "a fraction of the arc") <= 1.0:
            raise ValueError(f"slerp_t must be in [0, 1] (0 keeps the old query, 1 the mapped new one), got {self.slerp_t!r}")


#: Strategies that take another strategy's tuned values (the ablations of ``mct`` take ``mct``'s).
TUNING_FAMILY = {"mct_old_neg": "mct", "mct_new_neg": "mct", "mct_no_rho": "mct",
                 # the ρ reference must train with mct's own budget (τ, steps), tuned or not
                 "offline_rho": "mct"}


def tuned_params(strategy: str, tuning: dict) -> MethodParams:
    """The tuned :class:`MethodParams` of one strategy, from ``results/tuning.json``.

    Every method was tuned with the same validation budget (``benchmarks/tune_methods.py``); the
    methods chose different values of fields they share (e.g. ``transform_steps``: ψ, ρ and h),
    so the tuned parameters are per strategy.

    Parameters
    ----------
    strategy : str
        A strategy name, e.g. ``"reverse_transform"``.
    tuning : dict
        The content of ``results/tuning.json`` (``method_params``: fields every method chose
        alike; ``per_strategy``: each strategy's own choice), e.g.
        ``backfill_lib.book.load_result("tuning.json")``.

    Returns
    -------
    MethodParams
        The published defaults, overridden by ``method_params``, then by the strategy's own entry
        of ``per_strategy`` (the ``mct`` ablations take ``mct``'s, see :data:`TUNING_FAMILY`).

    Raises
    ------
    TypeError
        If ``tuning`` is not a dict.
    ValueError
        If ``tuning`` holds a field that ``MethodParams`` does not have.

    Examples
    --------
    >>> tuning = {"method_params": {"mct_tau": 0.2}, "per_strategy": {"mct": {"transform_steps": 500}}}
    >>> p = tuned_params("mct_no_rho", tuning)
    >>> (p.mct_tau, p.transform_steps, tuned_params("bct", tuning).transform_steps == MethodParams().transform_steps)
    (0.2, 500, True)
    """
    if not isinstance(tuning, dict):
        raise TypeError(f"tuning must be the dict of results/tuning.json, got {type(tuning).__name__}")
    own = tuning.get("per_strategy", {}).get(TUNING_FAMILY.get(strategy, strategy), {})
    values = {**tuning.get("method_params", {}), **own}
    unknown = sorted(set(values) - {f.name for f in fields(MethodParams)})
    if unknown:
        raise ValueError(f"tuning holds {', '.join(unknown)}, which this library's MethodParams does not have: "
                         "update backfill_lib or re-run benchmarks/tune_methods.py")
    return MethodParams(**values)


def check_label_map(label_map, num_classes: int) -> tuple[int, ...]:
    """Check a coarse label map (fine class ``c`` → coarse class ``label_map[c]``) and return it as a tuple.

    Parameters
    ----------
    label_map : sequence of int
        One entry per fine class; the coarse classes ``0 .. k - 1`` must each be used.
    num_classes : int
        Number of fine classes.

    Returns
    -------
    tuple of int

    Raises
    ------
    ValueError
        If the map has another length than ``num_classes``, an entry that is not an integer
        ``>= 0``, an unused coarse class, or ``k < 2`` or ``k >= num_classes`` coarse classes
        (a map onto as many classes is no coarser).
    TypeError
        If ``label_map`` is not a sequence.

    Examples
    --------
    >>> check_label_map([0, 2, 0, 0, 0, 1, 0, 1, 2, 1], 10)
    (0, 2, 0, 0, 0, 1, 0, 1, 2, 1)
    """
    if isinstance(label_map, (str, bytes)) or not hasattr(label_map, "__len__"):
        raise TypeError(f"old_label_map must be a sequence of ints (coarse class of each class), got {label_map!r}")
    values = []
    for v in label_map:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise ValueError(f"old_label_map entries must be integers >= 0 (coarse classes), got {v!r}")
        values.append(int(v))
    if len(values) != num_classes:
        raise ValueError(f"old_label_map has {len(values)} entries but the dataset has {num_classes} classes: "
                         "give the coarse class of every class")
    k = max(values) + 1
    unused = sorted(set(range(k)) - set(values))
    if unused:
        raise ValueError(f"old_label_map leaves coarse class(es) {unused} empty: number them 0 .. k - 1")
    if not 2 <= k < num_classes:
        raise ValueError(f"old_label_map has {k} coarse classes: use 2 .. {num_classes - 1} (fewer than the "
                         f"{num_classes} classes, or it is no coarser)")
    return tuple(values)


class RelabelledDataset(torch.utils.data.Dataset):
    """A view of a dataset of ``(x, y)`` items that yields ``(x, label_map[y])`` (coarse labels).

    Parameters
    ----------
    base : Dataset
        Items ``(x, y)`` with an integer label ``y``.
    label_map : sequence of int
        ``label_map[y]`` is the new label of ``y``.
    """

    def __init__(self, base, label_map):
        self.base = base
        self.label_map = torch.as_tensor(list(label_map), dtype=torch.long)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i]
        return x, self.label_map[int(y)]


def init_seed(name: str, seed: int) -> int:
    """Initial-weight seed of the model ``name`` in run ``seed``.

    Each model starts from its own random weights, as independently trained models do. (Sharing
    one initialisation between the old and the new model makes them partly compatible by
    accident: on digits the new query then finds old-stored items with mAP 0.54 instead of 0.21.)

    Parameters
    ----------
    name : str
        Model name, as given to :meth:`ExperimentContext.train_model` (``"old"``, ``"new"``,
        ``"new_bct"``, ...).
    seed : int
        The run's seed.

    Returns
    -------
    int
        CRC-32 of ``"<name>:<seed>"``: the same for the same pair, in every process.

    Examples
    --------
    >>> init_seed("old", 0) == init_seed("old", 0) != init_seed("new", 0)
    True
    """
    return zlib.crc32(f"{name}:{seed}".encode())


@dataclass
class ExperimentContext:
    """Shared state of one experiment run for one seed.

    Models are trained (or loaded from the checkpoint cache) and embeddings extracted at most once,
    lazily on first use, then reused by every strategy. Each parameter is kept as an attribute of
    the same name.

    Parameters
    ----------
    data : BackfillData
        The dataset (:class:`~backfill_lib.data.BackfillData`).
    seed : int, default 0
        The run's seed: initial weights of every model (:func:`init_seed`), and the seed of every
        training schedule (:attr:`train_config`, :attr:`transform_config`).
    setting : {"homogeneous", "heterogeneous"}, default "homogeneous"
        Whether the new model is ``preset.new`` or ``preset.new_heterogeneous``.
    preset : Preset, optional
        Models and schedules; default ``PRESETS[data.name]`` (:data:`PRESETS`).
    device : str or torch.device, optional
        Where models train and embed; default :func:`~backfill_lib.training.default_device`.
        Checked (:func:`~backfill_lib.training.resolve_device`) and stored as a ``torch.device``.
    cache : str or Path, optional
        Checkpoint folder of the models and heads; default
        :func:`~backfill_lib.training.cache_dir`. Checked before any training
        (:func:`~backfill_lib.training.check_cache_dir`).
    progress : bool, default True
        Show progress bars while training.
    params : MethodParams, optional
        Hyper-parameters of the methods; default ``MethodParams()``.
    old_label_map : sequence of int, optional
        Train the old model on coarse labels: entry ``c`` is the coarse class of fine class ``c``
        (one entry per class, coarse classes ``0 .. k - 1`` each used, ``2 <= k < num_classes``),
        e.g. :data:`~backfill_lib.data.FASHION_MNIST_COARSE` (tops / footwear / other). The old
        model then trains on the images of **every** class with their coarse labels (not on
        ``data.old_classes``), and its classifier has ``k`` outputs. Default None: ``preset.old_label_map``
        (None in every built-in preset: the old model on the fine labels of ``data.old_classes``).
        Stored as a tuple. When set, it goes into the checkpoint key of every model trained
        through :meth:`train_model` except the plain new model (``"new"``, which never sees the
        old one): the old model, and BCT-type models trained through it; heads are keyed by the
        old model's key. Unset, no key changes. Strategies that read the old classifier's
        columns through ``data.old_classes`` (``bct``'s influence loss, the ``uncertain_first``
        order) do not support a coarse old model.
    trained : dict, optional
        Filled as models and heads are trained or loaded: name → ``{"what": str, "seconds": float
        or None, "cached": bool}`` (``seconds`` is the original training time for a cached
        checkpoint, None when unknown). Leave it empty.
    _models, _heads, _embeddings, _keys : dict, optional
        Internal caches: models by name, heads by name, embeddings by ``(role, split)``,
        checkpoint keys by model name. Leave them empty.

    Raises
    ------
    ValueError
        If ``setting`` is not one of :data:`SETTINGS`, ``seed`` is not a non-negative integer,
        the dataset has no preset and none is given, ``device`` is not usable here, ``cache``
        is not a folder that can be written, or ``old_label_map`` is not a coarse map of the
        dataset's classes.
    TypeError
        If ``device`` is neither a string nor a ``torch.device``.
    """

    data: BackfillData
    seed: int = 0
    setting: str = "homogeneous"
    preset: Preset | None = None
    device: torch.device | str | None = None
    cache: Path | str | None = None
    progress: bool = True
    params: MethodParams = field(default_factory=MethodParams)
    old_label_map: tuple[int, ...] | None = None
    trained: dict = field(default_factory=dict)  # name -> {"what": str, "seconds": float, "cached": bool}
    _models: dict = field(default_factory=dict, repr=False)
    _heads: dict = field(default_factory=dict, repr=False)
    _embeddings: dict = field(default_factory=dict, repr=False)
    _keys: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.setting not in SETTINGS:
            raise ValueError(f"unknown setting {self.setting!r}; choose one of: {', '.join(SETTINGS)}")
        self.seed = check_seed(self.seed)
        if self.preset is None:
            if self.data.name not in PRESETS:
                raise ValueError(f"no preset for dataset {self.data.name!r}: pass preset=Preset(...) "
                                 f"(presets exist for: {', '.join(PRESETS)})")
            self.preset = PRESETS[self.data.name]
        self.device = resolve_device(self.device)
        check_cache_dir(self.cache)
        if self.old_label_map is None:
            self.old_label_map = self.preset.old_label_map
        if self.old_label_map is not None:
            self.old_label_map = check_label_map(self.old_label_map, self.data.num_classes)

    @property
    def old_spec(self) -> ModelSpec:
        """The old model's architecture, ``preset.old``."""
        return self.preset.old

    @property
    def new_spec(self) -> ModelSpec:
        """The new model's architecture, ``preset.new`` or (heterogeneous) ``preset.new_heterogeneous``."""
        return self.preset.new if self.setting == "homogeneous" else self.preset.new_heterogeneous

    @property
    def train_config(self) -> TrainConfig:
        """The preset's schedule with this run's seed (old, new, BCT and RA-BCT models)."""
        # replace() keeps every field (label smoothing, warm-up, ...), not only the first six.
        return replace(self.preset.train, seed=self.seed)

    def _data_key(self) -> dict:
        return {"dataset": self.data.name, "info": {k: v for k, v in self.data.info.items() if k != "root"},
                "n_train": len(self.data.train_labels)}

    def train_model(self, name: str, spec: ModelSpec, classes=None, loss_fn=None, config: TrainConfig | None = None,
                    what: str | None = None, extra_key: dict | None = None,
                    label_map: tuple[int, ...] | None = None) -> EmbeddingModel:
        """Train (or load from the checkpoint cache) a model and keep it under ``name``.

        The checkpoint is found by a :func:`~backfill_lib.training.cache_key` of the name, spec,
        classes, schedule, dataset, initial-weight seed and ``extra_key``
        (:func:`~backfill_lib.training.train_or_load`). Training time is recorded in
        ``trained``.

        Parameters
        ----------
        name : str
            Model name: key of the in-memory cache, of ``trained`` and of the initial weights
            (:func:`init_seed`). A model already held under ``name`` is returned as it is and the
            other arguments are ignored.
        spec : ModelSpec
            Architecture and embedding size.
        classes : sequence of int, optional
            Train on the training items of these classes; default all classes.
        loss_fn : callable ``(model, x, y) -> scalar tensor``, optional
            Objective; default the cross-entropy of :func:`~backfill_lib.training.train`.
        config : TrainConfig, optional
            Schedule; default :attr:`train_config`.
        what : str, optional
            Description recorded in ``trained``; default ``"<arch> d=<embed_dim>, <epochs> epochs"``.
        extra_key : dict, optional
            Anything else that changes the weights (a loss's hyper-parameters, a frozen model
            used); it goes into the cache key. With ``old_label_map`` set, it is added to
            the key of every model but ``"new"``.
        label_map : tuple of int, optional
            Train on ``label_map[y]`` instead of ``y`` (checked by :func:`check_label_map`); the
            classifier then has ``max(label_map) + 1`` outputs. Default None: the dataset's
            labels, ``num_classes`` outputs. Goes into the cache key when given.

        Returns
        -------
        EmbeddingModel
            The trained model, in eval mode, on ``device``.
        """
        if name in self._models:
            return self._models[name]
        config = config or self.train_config
        classes = tuple(range(self.data.num_classes)) if classes is None else tuple(classes)
        dataset = self.data.train_subset(classes)
        outputs = self.data.num_classes
        extra_key = dict(extra_key or {})
        if label_map is not None:
            label_map = check_label_map(label_map, self.data.num_classes)
            dataset, outputs = RelabelledDataset(dataset, label_map), max(label_map) + 1
            extra_key["label_map"] = list(label_map)
        if self.old_label_map is not None and name != "new":  # only when set: existing keys do not change
            extra_key["old_label_map"] = list(self.old_label_map)
        module = build_model(spec, self.data.input_shape, outputs, seed=init_seed(name, self.seed))
        key = cache_key(name=name, spec=spec, classes=classes, config=config, data=self._data_key(),
                        init_seed=init_seed(name, self.seed), extra=extra_key)
        self._keys[name] = key
        kwargs = {} if loss_fn is None else {"loss_fn": loss_fn}
        model, info = train_or_load(
            module, f"{self.data.name}-{name}", key,
            lambda m: train(m, dataset, config, device=self.device, desc=f"{name} (seed {self.seed})",
                            progress=self.progress, **kwargs),
            directory=self.cache)
        self.trained[name] = {"what": what or f"{spec.arch} d={spec.embed_dim}, {config.epochs} epochs",
                              "seconds": info["seconds"], "cached": info["cached"]}
        self._models[name] = model.to(self.device)
        return model

    def model(self, role: str) -> EmbeddingModel:
        """A trained model by role, trained (or loaded) on first use.

        Parameters
        ----------
        role : str
            ``"old"``: the old model on the old classes (with ``old_label_map``: on every
            class's images with their coarse labels); ``"new"``: the new model on all classes
            (both with cross-entropy); or a name already given to :meth:`train_model`.

        Returns
        -------
        EmbeddingModel

        Raises
        ------
        ValueError
            If ``role`` is none of these.
        """
        if role == "old" and self.old_label_map is not None:
            k = max(self.old_label_map) + 1
            return self.train_model("old", self.old_spec, label_map=self.old_label_map,
                                    what=f"old {self.old_spec.arch} on {k} coarse labels of all "
                                         f"{self.data.num_classes} classes {list(self.old_label_map)}")
        if role == "old":
            return self.train_model("old", self.old_spec, self.data.old_classes,
                                    what=f"old {self.old_spec.arch} on classes {self.data.old_classes[0]}-{self.data.old_classes[-1]}")
        if role == "new":
            return self.train_model("new", self.new_spec,
                                    what=f"new {self.new_spec.arch} d={self.new_spec.embed_dim}, all classes")
        if role in self._models:
            return self._models[role]
        raise ValueError(f"unknown model {role!r}: use 'old', 'new', or a name given to train_model")

    def embeddings(self, role: str, split: str = "test") -> np.ndarray:
        """L2-normalised embeddings of a split by a model, extracted once and cached.

        Parameters
        ----------
        role : str
            The model, as in :meth:`model` (trained on first use).
        split : {"test", "train"}, default "test"
            ``"test"``: the query set and gallery; ``"train"``: the training items without
            augmentation (what the heads ``ψ``, ``ρ``, ``h`` train on).

        Returns
        -------
        array (n, d) of float32
            One row per item of the split, in order.

        Raises
        ------
        ValueError
            If ``split`` or ``role`` is unknown.
        """
        if split not in ("test", "train"):
            raise ValueError(f"split must be 'test' or 'train', got {split!r}")
        key = (role, split)
        if key not in self._embeddings:
            dataset = self.data.test if split == "test" else self.data.train_plain
            self._embeddings[key] = extract_embeddings(self.model(role), dataset, device=self.device)
        return self._embeddings[key]

    def timed(self, name: str, what: str, fn: Callable[[], object]):
        """Run ``fn`` and record it in ``trained`` (for training outside :meth:`train_model`).

        Nothing is cached: ``fn`` runs every time, and the record says ``"cached": False``. Heads
        trained on cached embeddings use :meth:`fit_head` instead, which caches them.

        Parameters
        ----------
        name : str
            Key in ``trained``.
        what : str
            Description recorded with the time.
        fn : callable ``() -> anything``
            The training step to run and time.

        Returns
        -------
        object
            What ``fn`` returned.
        """
        start = time.perf_counter()
        out = fn()
        self.trained[name] = {"what": what, "seconds": time.perf_counter() - start, "cached": False}
        return out

    def fit_head(self, name: str, what: str, build: Callable[[], nn.Module], fit: Callable[[], nn.Module],
                 uses: tuple[str, ...], extra_key: dict | None = None) -> nn.Module:
        """Fit a head on cached embeddings (``ψ``, ``ρ``, ``h``), or load it from the checkpoint cache.

        The checkpoint is found by a :func:`~backfill_lib.training.cache_key` of the name, the
        checkpoint keys of the models in ``uses`` (so a retrained backbone retrains its heads), the
        heads' schedule (:attr:`transform_config`, with this run's seed, and the number of steps),
        the dataset and ``extra_key``. The record in ``trained`` says ``"cached": True`` and
        gives the original training time when the head was loaded. A head fitted on a model that
        was not trained through :meth:`train_model` (so it has no checkpoint key) is fitted every
        time.

        Parameters
        ----------
        name : str
            Head name: key of the in-memory cache and of ``trained``, and prefix of the file. A
            head already held under ``name`` is returned as it is and the other arguments are
            ignored.
        what : str
            Description recorded in ``trained``.
        build : callable ``() -> nn.Module``
            Builds an untrained module of the fitted head's architecture (the checkpoint is
            loaded into it).
        fit : callable ``() -> nn.Module``
            Fits the head and returns it (e.g. a call of
            :func:`~backfill_lib.transforms.fit_reverse_transform`); its weights are copied
            into the built module and saved.
        uses : tuple of str
            Names of the models (given to :meth:`train_model`) whose embeddings the head is
            fitted on.
        extra_key : dict, optional
            Everything else that changes the head (objective, temperature, negatives, ...); it
            goes into the cache key.

        Returns
        -------
        nn.Module
            The fitted head, in eval mode, on ``device``.
        """
        if name in self._heads:
            return self._heads[name]
        model_keys = {u: self._keys.get(u) for u in uses}
        if any(k is None for k in model_keys.values()):
            start = time.perf_counter()
            head = fit()
            self.trained[name] = {"what": what, "seconds": time.perf_counter() - start, "cached": False}
        else:
            with torch.random.fork_rng(devices=[]):  # building the skeleton leaves the global RNG as it was
                head = build()
            key = cache_key(name=name, head=extra_key or {}, models=model_keys, config=self.transform_config,
                            steps=self.params.transform_steps, data=self._data_key())
            head, info = train_or_load(head, f"{self.data.name}-{name}", key,
                                       lambda m: m.load_state_dict(fit().state_dict()), directory=self.cache)
            self.trained[name] = {"what": what, "seconds": info["seconds"], "cached": info["cached"]}
        self._heads[name] = head.to(self.device).eval()
        return self._heads[name]

    @property
    def transform_config(self) -> TrainConfig:
        """Schedule of the heads on cached embeddings: ``params.transform_steps`` steps, this run's seed."""
        return tf.schedule(replace(self.params.transform, seed=self.seed), len(self.data.train_labels),
                           self.params.transform_steps)
