"""Named strategies for experiments: a registry from name to a builder.

A builder takes an :class:`ExperimentContext` (dataset, seed, trained models, cached
embeddings) and returns a :class:`~backfill_lib.backfill.Strategy`. Methods that need training
(BCT, RA-BCT, the transformations) train through the context, which caches checkpoints and
records how long training took. A builder that cannot apply to a setting raises
:class:`NotApplicable` with the reason, and the experiment reports "n/a" instead of failing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import backfill as bf
from .data import BackfillData
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
        module = build_model(spec, self.data.input_shape, self.data.num_classes, seed=self.seed)
        key = cache_key(name=name, spec=spec, classes=classes, config=config, data=self._data_key(),
                        extra=extra_key or {})
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


@dataclass(frozen=True)
class StrategyInfo:
    name: str
    build: Callable[[ExperimentContext], bf.Strategy]
    description: str
    trains: tuple[str, ...] = ()  # names in ExperimentContext.trained that this strategy needs


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
