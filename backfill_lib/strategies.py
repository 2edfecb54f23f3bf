"""Named strategies for experiments: a registry from name to a builder.

A builder takes an :class:`ExperimentContext` (dataset, seed, trained models, cached
embeddings) and returns a :class:`~backfill_lib.backfill.Strategy`. Methods that need training
(BCT, RA-BCT, the transformations) train through the context, which caches checkpoints and
records how long training took. A builder that cannot apply to a setting raises
:class:`NotApplicable` with the reason, and the experiment reports "n/a" instead of failing.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import backfill as bf
from . import transforms as tf
from .data import BackfillData
from .losses import bct_objective, ra_bct_objective
from .models import EmbeddingModel, ModelSpec, build_model
from .training import TrainConfig, cache_key, default_device, extract_embeddings, train, train_or_load


class NotApplicable(Exception):
    """A strategy does not apply to this setting (the message says why)."""


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
    """

    old: ModelSpec
    new: ModelSpec
    new_heterogeneous: ModelSpec
    train: TrainConfig


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
    """

    bct_lambda: float = 1.0
    ra_bct_lambda: float = 1.0
    ra_bct_tau: float = 0.05
    mct_tau: float = 0.2
    mct_lambda_rt: float = 0.0
    transform: TrainConfig = tf.TRANSFORM_CONFIG
    transform_steps: int = tf.TRANSFORM_STEPS


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
        Stored as a ``torch.device``.
    cache : str or Path, optional
        Checkpoint folder; default :func:`~backfill_lib.training.cache_dir`.
    progress : bool, default True
        Show progress bars while training.
    params : MethodParams, optional
        Hyper-parameters of the methods; default ``MethodParams()``.
    trained : dict, optional
        Filled as models and heads are trained: name → ``{"what": str, "seconds": float or None,
        "cached": bool}`` (``seconds`` is the original training time for a cached checkpoint,
        None when unknown). Leave it empty.
    _models, _embeddings : dict, optional
        Internal caches: models by name, embeddings by ``(role, split)``. Leave them empty.

    Raises
    ------
    ValueError
        If ``setting`` is not one of :data:`SETTINGS`.
    """

    data: BackfillData
    seed: int = 0
    setting: str = "homogeneous"
    preset: Preset | None = None
    device: torch.device | str | None = None
    cache: Path | str | None = None
    progress: bool = True
    params: MethodParams = field(default_factory=MethodParams)
    trained: dict = field(default_factory=dict)  # name -> {"what": str, "seconds": float, "cached": bool}
    _models: dict = field(default_factory=dict, repr=False)
    _embeddings: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.setting not in SETTINGS:
            raise ValueError(f"unknown setting {self.setting!r}; choose one of: {', '.join(SETTINGS)}")
        if self.preset is None:
            self.preset = PRESETS[self.data.name]
        self.device = torch.device(self.device) if self.device is not None else default_device()

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
        c = self.preset.train
        return TrainConfig(c.epochs, c.batch_size, c.lr, c.weight_decay, c.optimizer, seed=self.seed)

    def _data_key(self) -> dict:
        return {"dataset": self.data.name, "info": {k: v for k, v in self.data.info.items() if k != "root"},
                "n_train": len(self.data.train_labels)}

    def train_model(self, name: str, spec: ModelSpec, classes=None, loss_fn=None, config: TrainConfig | None = None,
                    what: str | None = None, extra_key: dict | None = None) -> EmbeddingModel:
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
            used); it goes into the cache key.

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
        module = build_model(spec, self.data.input_shape, self.data.num_classes, seed=init_seed(name, self.seed))
        key = cache_key(name=name, spec=spec, classes=classes, config=config, data=self._data_key(),
                        init_seed=init_seed(name, self.seed), extra=extra_key or {})
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
            ``"old"``: the old model on the old classes; ``"new"``: the new model on all classes
            (both with cross-entropy); or a name already given to :meth:`train_model`.

        Returns
        -------
        EmbeddingModel

        Raises
        ------
        ValueError
            If ``role`` is none of these.
        """
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

        Nothing is cached: ``fn`` runs every time, and the record says ``"cached": False``.

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

    @property
    def transform_config(self) -> TrainConfig:
        """Schedule of the heads on cached embeddings: ``params.transform_steps`` steps, this run's seed."""
        return tf.schedule(replace(self.params.transform, seed=self.seed), len(self.data.train_labels),
                           self.params.transform_steps)


@dataclass(frozen=True)
class StrategyInfo:
    """A registered strategy (an entry of :data:`STRATEGY_REGISTRY`).

    Each parameter is kept as an attribute of the same name.

    Parameters
    ----------
    name : str
        Registry name, e.g. ``"rank_merge"``.
    build : callable ``(ExperimentContext) -> Strategy``
        Builds the :class:`~backfill_lib.backfill.Strategy`; may raise :class:`NotApplicable`.
    description : str
        One line for results tables.
    trains : tuple of str, default ()
        Names in ``ExperimentContext.trained`` this strategy needs (their training times are
        reported with its results).
    """

    name: str
    build: Callable[[ExperimentContext], bf.Strategy]
    description: str
    trains: tuple[str, ...] = ()  # names in ExperimentContext.trained that this strategy needs


#: Every strategy an experiment can run, by name (filled by :func:`register_strategy`).
STRATEGY_REGISTRY: dict[str, StrategyInfo] = {}


def register_strategy(name: str, description: str, trains: tuple[str, ...] = ()):
    """Decorator: make ``build(ctx) -> Strategy`` available to experiments as ``name``.

    Parameters
    ----------
    name : str
        Registry name; an existing entry of that name is replaced.
    description : str
        One line for results tables.
    trains : tuple of str, default ()
        Names in ``ExperimentContext.trained`` the strategy needs (see :class:`StrategyInfo`).

    Returns
    -------
    callable
        The decorator: it adds a :class:`StrategyInfo` to :data:`STRATEGY_REGISTRY` and returns
        the builder unchanged.
    """
    def wrap(fn):
        STRATEGY_REGISTRY[name] = StrategyInfo(name, fn, description, trains)
        return fn
    return wrap


def build_strategy(name: str, ctx: ExperimentContext) -> bf.Strategy:
    """Build the registered strategy ``name`` for one run.

    Parameters
    ----------
    name : str
        A key of :data:`STRATEGY_REGISTRY`.
    ctx : ExperimentContext
        The run; models and heads the strategy needs are trained through it.

    Returns
    -------
    Strategy
        The :class:`~backfill_lib.backfill.Strategy`, renamed to ``name`` if the builder named it
        otherwise.

    Raises
    ------
    ValueError
        If ``name`` is not registered.
    NotApplicable
        If the strategy does not apply to this setting (e.g. BCT with ``d_n ≠ d_o``).
    """
    if name not in STRATEGY_REGISTRY:
        raise ValueError(f"unknown strategy {name!r}; choose from: {', '.join(STRATEGY_REGISTRY)}")
    strategy = STRATEGY_REGISTRY[name].build(ctx)
    return strategy if strategy.name == name else bf.Strategy(
        name, strategy.query_old, strategy.gallery_old, strategy.query_new, strategy.gallery_new,
        strategy.backbone_passes, strategy.offline)


@register_strategy("old", "no upgrade: old query, old gallery", trains=("old",))
def _old(ctx: ExperimentContext) -> bf.Strategy:
    return bf.old_only(ctx.embeddings("old"))


@register_strategy("offline", "offline backfill: old/old until r = 1, then new/new", trains=("old", "new"))
def _offline(ctx: ExperimentContext) -> bf.Strategy:
    return bf.offline_backfill(ctx.embeddings("old"), ctx.embeddings("new"))


@register_strategy("rank_merge", "distance rank merge of old/old and new/new", trains=("old", "new"))
def _rank_merge(ctx: ExperimentContext) -> bf.Strategy:
    return bf.rank_merge(ctx.embeddings("old"), ctx.embeddings("new"))


@register_strategy("new_on_old", "incompatible: new query on the stored gallery, no compatibility training",
                   trains=("old", "new"))
def _new_on_old(ctx: ExperimentContext) -> bf.Strategy:
    old, new = ctx.embeddings("old"), ctx.embeddings("new")
    if old.shape[1] != new.shape[1]:
        raise NotApplicable(f"new (d={new.shape[1]}) and old (d={old.shape[1]}) embeddings differ in size: "
                            "a new query cannot even be compared with the old gallery")
    return bf.compatible_single_space(old, new, name="new_on_old")


# --- Compatible training of the new model (METHOD §3.2, §3.3) -------------------------------------

def _same_dimension(ctx: ExperimentContext, method: str) -> None:
    d_old, d_new = ctx.old_spec.embed_dim, ctx.new_spec.embed_dim
    if d_old != d_new:
        raise NotApplicable(f"{method} needs d_n = d_o, but the new model embeds in {d_new} dimensions and the "
                            f"old one in {d_old}: the new embedding cannot be compared with the old gallery")


def _old_model_key(ctx: ExperimentContext) -> dict:
    return {"old_spec": ctx.old_spec.to_dict(), "old_classes": list(ctx.data.old_classes),
            "old_init": init_seed("old", ctx.seed)}


@register_strategy("bct", "BCT: new model trained with the frozen old classifier's influence loss; new query "
                   "searches whatever is stored", trains=("old", "new_bct"))
def _bct(ctx: ExperimentContext) -> bf.Strategy:
    _same_dimension(ctx, "BCT")
    lam = ctx.params.bct_lambda
    old_model = ctx.model("old")
    ctx.train_model("new_bct", ctx.new_spec, loss_fn=bct_objective(old_model, ctx.data.old_classes, lam),
                    what=f"new {ctx.new_spec.arch} with BCT (λ={lam:g}), {ctx.train_config.epochs} epochs",
                    extra_key={"loss": "bct", "lambda": lam, **_old_model_key(ctx)})
    return bf.compatible_single_space(ctx.embeddings("old"), ctx.embeddings("new_bct"), name="bct")


@register_strategy("ra_bct", "RA-BCT / Hot-Refresh: new model trained with InfoNCE towards the old feature, "
                   "other-class old and new negatives", trains=("old", "new_ra_bct"))
def _ra_bct(ctx: ExperimentContext) -> bf.Strategy:
    _same_dimension(ctx, "RA-BCT")
    lam, tau = ctx.params.ra_bct_lambda, ctx.params.ra_bct_tau
    old_model = ctx.model("old")
    ctx.train_model("new_ra_bct", ctx.new_spec, loss_fn=ra_bct_objective(old_model, lam, tau),
                    what=f"new {ctx.new_spec.arch} with RA-BCT (λ={lam:g}, τ={tau:g}), {ctx.train_config.epochs} epochs",
                    extra_key={"loss": "ra_bct", "lambda": lam, "tau": tau, **_old_model_key(ctx)})
    return bf.compatible_single_space(ctx.embeddings("old"), ctx.embeddings("new_ra_bct"), name="ra_bct")


# --- Transformations on cached embeddings, backbones frozen (METHOD §3.4, §3.5, §2) ----------------

def _fit_heads(ctx: ExperimentContext, name: str, **kwargs) -> bf.Strategy:
    """Train ψ (and ρ) on the cached training embeddings and build the reverse-transformation strategy."""
    config = ctx.transform_config
    if kwargs.get("objective") == "mc":
        rt = f" + {kwargs['lam_rt']:g}·L_rt" if kwargs["lam_rt"] else ""
        what = (f"ψ{' + ρ' if kwargs['learn_rho'] else ''} on cached embeddings, L_mc (negatives: "
                f"{kwargs['negatives']}, τ={kwargs['tau']:g}){rt}, {ctx.params.transform_steps} steps")
    else:
        what = f"ψ on cached embeddings, L_rt, {ctx.params.transform_steps} steps"
    new_train, old_train = ctx.embeddings("new", split="train"), ctx.embeddings("old", split="train")
    heads = ctx.timed(name, what, lambda: tf.fit_reverse_transform(
        new_train, old_train, ctx.data.train_labels, config=config, steps=None, device=ctx.device,
        progress=ctx.progress, **kwargs))
    new_test = ctx.embeddings("new")
    rho_new = new_test if heads.rho is None else tf.apply_transform(heads.rho, new_test, "new")
    return bf.reverse_transform(ctx.embeddings("old"), tf.apply_transform(heads.psi, new_test, "new"), rho_new,
                                name=name)


@register_strategy("reverse_transform", "reverse transformation ψ (new → old) trained with L_rt only; "
                   "ψ̂(φ_n(q)) searches old-stored items", trains=("old", "new", "reverse_transform"))
def _reverse_transform(ctx: ExperimentContext) -> bf.Strategy:
    return _fit_heads(ctx, "reverse_transform", objective="rt")


def _register_mct(name: str, description: str, negatives: str, learn_rho: bool):
    @register_strategy(name, description, trains=("old", "new", name))
    def build(ctx: ExperimentContext) -> bf.Strategy:
        return _fit_heads(ctx, name, objective="mc", learn_rho=learn_rho, negatives=negatives,
                          tau=ctx.params.mct_tau, lam_rt=ctx.params.mct_lambda_rt)
    return build


_register_mct("mct", "metric-compatible training: ψ and learnable ρ with L_mc (negatives from both spaces) + λ_rt·L_rt",
              "both", True)
_register_mct("mct_old_neg", "ablation: L_mc with negatives from the old-stored set only", "old", True)
_register_mct("mct_new_neg", "ablation: L_mc with negatives from the new-stored set only", "new", True)
_register_mct("mct_no_rho", "ablation: metric-compatible ψ, new embedding kept as it is (ρ = identity)", "both", False)


@register_strategy("forward_transform", "forward transformation h (old → new, FCT-style without side information) "
                   "applied to the stored old vectors", trains=("old", "new", "forward_transform"))
def _forward_transform(ctx: ExperimentContext) -> bf.Strategy:
    config = ctx.transform_config
    old_train, new_train = ctx.embeddings("old", split="train"), ctx.embeddings("new", split="train")
    h = ctx.timed("forward_transform", f"h on cached embeddings, MSE, {ctx.params.transform_steps} steps",
                  lambda: tf.fit_forward_transform(old_train, new_train, config=config, steps=None, device=ctx.device,
                                                   progress=ctx.progress))
    old_test = ctx.embeddings("old")
    return bf.forward_transform(tf.apply_transform(h, old_test, "old"), ctx.embeddings("new"))
