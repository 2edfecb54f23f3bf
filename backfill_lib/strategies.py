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
    """Models and schedules of one dataset: the one place to change the scale."""

    old: ModelSpec
    new: ModelSpec
    new_heterogeneous: ModelSpec
    train: TrainConfig


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

SETTINGS = ("homogeneous", "heterogeneous")


@dataclass(frozen=True)
class MethodParams:
    """Hyper-parameters of the compatibility methods (METHOD §3); how they were chosen is in
    ``results/README.md`` (a sweep on a validation split carved out of the training data).

    Attributes
    ----------
    bct_lambda : float
        Weight ``λ`` of BCT's influence loss (§3.2).
    ra_bct_lambda, ra_bct_tau : float
        Weight and temperature of RA-BCT's ``L_ra`` (§3.3; ``τ = 0.05`` as published).
    mct_tau, mct_lambda_rt : float
        Temperature of ``L_mc`` and weight ``λ_rt`` of ``L_rt`` (§3.5). The validation sweep preferred
        ``τ = 0.2`` and ``λ_rt = 0``: ``L_mc`` already holds each image's own old feature as a
        positive, and adding ``L_rt`` lowered the validation relative gain (0.73 → 0.67).
    transform : TrainConfig
        Optimiser of ``ψ``, ``ρ`` and ``h`` on cached embeddings (its seed is replaced by the run's,
        its epochs by ``transform_steps``).
    transform_steps : int
        Optimiser steps of the heads, whatever the size of the training set (a small training set
        would otherwise give a few dozen steps and an under-fitted ``ψ``).
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
    """
    return zlib.crc32(f"{name}:{seed}".encode())


@dataclass
class ExperimentContext:
    """Shared state of one experiment run for one seed: models are trained (or loaded from the
    checkpoint cache) and embeddings extracted at most once, then reused by every strategy."""

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
        return self.preset.old

    @property
    def new_spec(self) -> ModelSpec:
        return self.preset.new if self.setting == "homogeneous" else self.preset.new_heterogeneous

    @property
    def train_config(self) -> TrainConfig:
        c = self.preset.train
        return TrainConfig(c.epochs, c.batch_size, c.lr, c.weight_decay, c.optimizer, seed=self.seed)

    def _data_key(self) -> dict:
        return {"dataset": self.data.name, "info": {k: v for k, v in self.data.info.items() if k != "root"},
                "n_train": len(self.data.train_labels)}

    def train_model(self, name: str, spec: ModelSpec, classes=None, loss_fn=None, config: TrainConfig | None = None,
                    what: str | None = None, extra_key: dict | None = None) -> EmbeddingModel:
        """Train (or load) a model on the training items of ``classes`` (default all) and keep it
        under ``name``. ``loss_fn`` defaults to cross-entropy; ``extra_key`` must describe
        anything else that changes the weights (a loss's hyper-parameters, a frozen model used)."""
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
        """The old model (old classes only) or the new model (all classes), trained with cross-entropy."""
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
        """L2-normalised embeddings of ``split`` ("test" or "train") by the model ``role`` (cached)."""
        if split not in ("test", "train"):
            raise ValueError(f"split must be 'test' or 'train', got {split!r}")
        key = (role, split)
        if key not in self._embeddings:
            dataset = self.data.test if split == "test" else self.data.train_plain
            self._embeddings[key] = extract_embeddings(self.model(role), dataset, device=self.device)
        return self._embeddings[key]

    def timed(self, name: str, what: str, fn: Callable[[], object]):
        """Run ``fn`` and record it as training of ``name`` (for steps outside :meth:`train_model`)."""
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
    name: str
    build: Callable[[ExperimentContext], bf.Strategy]
    description: str
    trains: tuple[str, ...] = ()  # names in ExperimentContext.trained that this strategy needs


#: Every strategy an experiment can run, by name (filled by :func:`register_strategy`).
STRATEGY_REGISTRY: dict[str, StrategyInfo] = {}


def register_strategy(name: str, description: str, trains: tuple[str, ...] = ()):
    """Decorator: make ``build(ctx) -> Strategy`` available to experiments as ``name``."""
    def wrap(fn):
        STRATEGY_REGISTRY[name] = StrategyInfo(name, fn, description, trains)
        return fn
    return wrap


def build_strategy(name: str, ctx: ExperimentContext) -> bf.Strategy:
    """Build the registered strategy ``name`` (raises :class:`NotApplicable` when it does not apply)."""
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
