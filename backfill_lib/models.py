"""Embedding models: a backbone, an embedding layer and a classifier.

``model.embed(x)`` returns L2-normalised embeddings ``φ(x)`` (what the gallery stores);
``model(x)`` returns ``(embedding, logits)`` for training. By default the classifier is the plain
linear softmax classifier with a bias on the (un-normalised) embedding; BCT (METHOD §3.2) applies
the old model's classifier to new embeddings through :meth:`EmbeddingModel.classify`.

Two recipes (``ModelSpec.classifier`` and ``ModelSpec.stem``):

* **ours** (the defaults, the ``cifar100`` preset): CIFAR-stem ResNet (3×3 conv, stride 1, no
  max-pool) on 32-px images, a pooled-feature → ``d`` linear embedding layer, the linear classifier
  with bias on the un-normalised embedding.
* **BT²-like** (the ``cifar100_bt2`` preset): ImageNet-stem ResNet-50 (7×7 conv, stride 2,
  max-pool) on images resized to 224 px, and the normalised-feature classifier of BT²
  (``classifier="normalized"``: ``logits = W ẑ``, no bias, ``W`` not normalised). BT² puts the
  ``d``-dimensional embedding at the last residual block; we keep our linear embedding layer.

How the linear classifier was chosen: in the first version of the library (commit 42d3b4f) we
tried a cosine classifier (``logits = s · ẑ · Ŵᵀ``, :class:`CosineClassifier`) on digits and kept
the linear one because the cosine one changed the rank-merge baseline (relative gain 0.12 at
``s = 16``, 0.39 at ``s = 8``, 0.19 at ``s = 32``, 3 seeds). Those gains were measured on the
digits **test** split (the validation protocol of ``results/README.md`` came later), with old and
new models sharing their initial weights (changed afterwards, see ``init_seed``). The choice was
**never validated** on a validation split, nor on CIFAR-100: treat it as a convention, not a
tuned result.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .training import NEW_FIELD, spec_dict

ARCHITECTURES = ("mlp", "small_cnn", "resnet18", "resnet50", "pooled_cnn")
#: Classifiers on the embedding: ours (linear with bias on the un-normalised embedding), BT²'s
#: normalised-feature one, and a cosine classifier (normalised features and weights, scale ``s``).
CLASSIFIERS = ("linear", "normalized", "cosine")
#: First layers of the ResNets: CIFAR (3×3 conv, stride 1, no max-pool) or ImageNet (7×7, stride 2, max-pool).
STEMS = ("cifar", "imagenet")

@dataclass(frozen=True)
class ModelSpec:
    """Everything that defines a model's shape (part of the checkpoint cache key).

    Each parameter is kept as an attribute of the same name. Values are checked when a model is
    built (:class:`EmbeddingModel`), not here.

    Parameters
    ----------
    arch : {"mlp", "small_cnn", "resnet18", "resnet50", "pooled_cnn"}, default "small_cnn"
        Backbone: a two-layer MLP on the flattened input, a three-block CNN for small images
        (``small_cnn``: one 2×2 max-pool, after its second block, made for 8×8 digits), a
        CIFAR-style ResNet-18/50 (:func:`cifar_resnet`), or ``pooled_cnn``, a three-block CNN
        that halves the resolution after each block and flattens the last map (28 → 14 → 7 →
        3 px on Fashion-MNIST; at least 8×8 inputs; ``_pooled_cnn``): on 28-px images
        about 4× fewer multiply-adds than ``small_cnn`` at the same width (7.5 M against 29 M
        per image at width 32).
    embed_dim : int, default 32
        Embedding size ``d`` (``d_o`` for the old model, ``d_n`` for the new one).
    width : int, default 32
        Base width of ``mlp`` (hidden size ``4 · width``), ``small_cnn`` and ``pooled_cnn``
        (channels ``width``, ``2 · width``, ``4 · width``); ignored by the ResNets.
    classifier : {"linear", "normalized", "cosine"}, default "linear"
        ``"linear"``: ``W z + b`` on the un-normalised embedding (ours). ``"normalized"``: ``W ẑ``
        on the L2-normalised embedding, no bias (BT²'s classifier). ``"cosine"``: ``s · ẑ · Ŵᵀ``
        (features and weights normalised; :class:`CosineClassifier`).
    classifier_scale : float, default 16.0
        The scale ``s`` of the ``"cosine"`` classifier (ignored by the others).
    stem : {"cifar", "imagenet"}, default "cifar"
        First layers of the ResNets (:func:`cifar_resnet`): ``"cifar"`` for 32-px inputs,
        ``"imagenet"`` (7×7 conv, stride 2, max-pool: torchvision's own) for 224-px inputs as in
        ml-fct and BT². Only ``resnet18``/``resnet50`` accept ``"imagenet"``.

    Notes
    -----
    ``classifier``, ``classifier_scale`` and ``stem`` were added after checkpoints existed: at
    their defaults they are left out of :meth:`to_dict` and of the checkpoint cache key
    (:func:`~backfill_lib.training.spec_dict`), so existing checkpoints are still found; any other value is in the key.
    """

    arch: str = "small_cnn"
    embed_dim: int = 32
    width: int = 32
    classifier: str = field(default="linear", metadata=NEW_FIELD)
    classifier_scale: float = field(default=16.0, metadata=NEW_FIELD)
    stem: str = field(default="cifar", metadata=NEW_FIELD)

    def to_dict(self) -> dict:
        """The fields as a plain dict, e.g. for a results JSON (:func:`~backfill_lib.training.spec_dict`).

        Returns
        -------
        dict
            ``{"arch": ..., "embed_dim": ..., "width": ...}``, plus ``classifier``,
            ``classifier_scale`` and ``stem`` when they differ from their defaults.
        """
        return spec_dict(self)


def _small_cnn(in_channels: int, width: int) -> tuple[nn.Module, int]:
    """Three conv blocks and global average pooling, for small images such as 8×8 digits."""
    def block(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

    layers = [*block(in_channels, width), *block(width, 2 * width), nn.MaxPool2d(2),
              *block(2 * width, 4 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers), 4 * width


def _pooled_cnn(input_shape: tuple[int, ...], width: int) -> tuple[nn.Module, int]:
    """Three conv blocks, each followed by a 2×2 max-pool; the last map is flattened, not averaged.

    For 28-px images (Fashion-MNIST): blocks at 28, 14 and 7 px, then a 3×3 map of ``4 · width``
    channels flattened (576 features at width 16), so the embedding layer still sees where in
    the image a feature is. ``small_cnn`` runs its second block at full resolution (about 29 M
    multiply-adds per 28-px image at width 32, against 7.5 M here, 1.9 M at width 16) and then
    averages the whole map away. Inputs must be at least 8 px on each side.
    """
    channels, height, width_px = input_shape
    if min(height, width_px) < 8:
        raise ValueError(f"arch 'pooled_cnn' halves the image three times: it needs at least 8×8 pixels, "
                         f"got input_shape {tuple(input_shape)}")

    def block(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                nn.MaxPool2d(2)]

    layers = [*block(channels, width), *block(width, 2 * width), *block(2 * width, 4 * width), nn.Flatten()]
    return nn.Sequential(*layers), 4 * width * (height // 8) * (width_px // 8)


def _mlp(in_features: int, width: int) -> tuple[nn.Module, int]:
    hidden = 4 * width
    net = nn.Sequential(nn.Flatten(), nn.Linear(in_features, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                        nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True))
    return net, hidden


def cifar_resnet(depth: int = 18, in_channels: int = 3, stem: str = "cifar") -> tuple[nn.Module, int]:
    """torchvision's ResNet-18/50 with the CIFAR stem (3×3 conv, stride 1, no max-pool), no fc.

    Weights are randomly initialised (nothing is downloaded). With ``stem="imagenet"`` the first
    layers stay torchvision's (7×7 conv with stride 2, then a 3×3 max-pool with stride 2), the
    ResNet that ml-fct and BT² train on 224-px CIFAR-100.

    Parameters
    ----------
    depth : {18, 50}, default 18
        ResNet depth.
    in_channels : int, default 3
        Channels of the input images.
    stem : {"cifar", "imagenet"}, default "cifar"
        Which first layers (see above).

    Returns
    -------
    backbone : nn.Module
        Maps ``(batch, in_channels, H, W)`` images to ``(batch, feat_dim)`` pooled features.
    feat_dim : int
        512 for ResNet-18, 2048 for ResNet-50.

    Raises
    ------
    ValueError
        If ``depth`` is not 18 or 50, or ``stem`` is unknown.
    """
    from torchvision.models import resnet18, resnet50

    if depth not in (18, 50):
        raise ValueError(f"depth must be 18 or 50, got {depth}")
    if stem not in STEMS:
        raise ValueError(f"unknown stem {stem!r}; choose one of: {', '.join(STEMS)}")
    net = resnet18() if depth == 18 else resnet50()
    if stem == "cifar":
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    elif in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    feat_dim = net.fc.in_features
    net.fc = nn.Identity()
    return net, feat_dim


class NormalizedClassifier(nn.Module):
    """``logits = W ẑ``: a linear map without bias on the L2-normalised feature (BT²'s classifier).

    It takes the un-normalised embedding, like ``nn.Linear``, and normalises it itself, so the
    losses that call ``model.classifier(z)`` (BCT, RA-BCT) work with every classifier. ``W`` is
    not normalised: its row norms act as per-class scales.

    Parameters
    ----------
    in_features : int
        Embedding size ``d`` (kept as an attribute, as in ``nn.Linear``).
    out_features : int
        Number of classes (kept as an attribute).
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(nn.Linear(in_features, out_features, bias=False).weight.detach().clone())

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Logits of the normalised features.

        Parameters
        ----------
        z : Tensor (batch, in_features)
            Un-normalised embeddings.

        Returns
        -------
        Tensor (batch, out_features)
            ``ẑ Wᵀ`` (``s · ẑ · Ŵᵀ`` for :class:`CosineClassifier`).
        """
        return F.linear(F.normalize(z, dim=1), self._class_weights())

    def _class_weights(self) -> torch.Tensor:
        return self.weight


class CosineClassifier(NormalizedClassifier):
    """``logits = s · ẑ · Ŵᵀ``: cosine similarity to each class weight, times a fixed scale ``s``.

    Parameters
    ----------
    in_features : int
        Embedding size ``d``.
    out_features : int
        Number of classes.
    scale : float, default 16.0
        The scale ``s`` (kept as attribute ``scale``).

    Raises
    ------
    ValueError
        If ``scale`` is not positive.
    """

    def __init__(self, in_features: int, out_features: int, scale: float = 16.0):
        super().__init__(in_features, out_features)
        if not scale > 0:
            raise ValueError(f"classifier_scale must be positive, got {scale}")
        self.scale = float(scale)

    def _class_weights(self) -> torch.Tensor:
        return self.scale * F.normalize(self.weight, dim=1)


def _classifier(spec: ModelSpec, num_classes: int) -> nn.Module:
    if spec.classifier == "linear":
        return nn.Linear(spec.embed_dim, num_classes)
    if spec.classifier == "normalized":
        return NormalizedClassifier(spec.embed_dim, num_classes)
    return CosineClassifier(spec.embed_dim, num_classes, spec.classifier_scale)


class EmbeddingModel(nn.Module):
    """Backbone → linear embedding layer → (L2-normalised embedding, classifier logits).

    Used for both the old model φ_o and the new model φ_n. Build it with :func:`build_model` to
    get reproducible initial weights.

    Parameters
    ----------
    spec : ModelSpec
        Architecture, embedding size and width.
    input_shape : tuple of int
        Shape of one input without the batch axis: ``(C, H, W)`` for images (required by the
        CNNs and ResNets), anything for ``mlp`` (inputs are flattened).
    num_classes : int
        Outputs of the linear classifier on the embedding.

    Raises
    ------
    ValueError
        If ``spec.arch``, ``spec.classifier`` or ``spec.stem`` is unknown, ``spec.embed_dim < 1``,
        ``stem="imagenet"`` is asked of an architecture that is not a ResNet, a convolutional
        architecture gets an ``input_shape`` that is not ``(C, H, W)``, or ``pooled_cnn`` gets
        images smaller than 8×8.
    """

    def __init__(self, spec: ModelSpec, input_shape: tuple[int, ...], num_classes: int):
        super().__init__()
        if spec.arch not in ARCHITECTURES:
            raise ValueError(f"unknown arch {spec.arch!r}; choose one of: {', '.join(ARCHITECTURES)}")
        if spec.embed_dim < 1:
            raise ValueError(f"embed_dim must be positive, got {spec.embed_dim}")
        if spec.classifier not in CLASSIFIERS:
            raise ValueError(f"unknown classifier {spec.classifier!r}; choose one of: {', '.join(CLASSIFIERS)}")
        if spec.stem not in STEMS:
            raise ValueError(f"unknown stem {spec.stem!r}; choose one of: {', '.join(STEMS)}")
        if spec.stem != "cifar" and not spec.arch.startswith("resnet"):
            raise ValueError(f"stem {spec.stem!r} applies to the ResNets only; arch {spec.arch!r} takes stem='cifar'")
        self.spec, self.input_shape, self.num_classes = spec, tuple(input_shape), num_classes
        n_in = int(torch.tensor(input_shape).prod())
        if spec.arch == "mlp":
            self.backbone, feat = _mlp(n_in, spec.width)
        elif len(input_shape) != 3:
            raise ValueError(f"arch {spec.arch!r} needs image inputs (C, H, W), got input_shape {input_shape}")
        elif spec.arch == "small_cnn":
            self.backbone, feat = _small_cnn(input_shape[0], spec.width)
        elif spec.arch == "pooled_cnn":
            self.backbone, feat = _pooled_cnn(tuple(input_shape), spec.width)
        else:
            self.backbone, feat = cifar_resnet(18 if spec.arch == "resnet18" else 50, input_shape[0], spec.stem)
        self.embedding = nn.Linear(feat, spec.embed_dim)
        self.classifier = _classifier(spec, num_classes)

    @property
    def embed_dim(self) -> int:
        """Embedding size ``d`` (``spec.embed_dim``)."""
        return self.spec.embed_dim

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Un-normalised embedding (before L2 normalisation).

        Parameters
        ----------
        x : Tensor (batch, *input_shape)
            Inputs.

        Returns
        -------
        Tensor (batch, embed_dim)
            Output of the embedding layer; the classifier is applied to this.
        """
        return self.embedding(self.backbone(x))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Embedding and class logits of ``x``, for training.

        Parameters
        ----------
        x : Tensor (batch, *input_shape)
            Inputs.

        Returns
        -------
        embedding : Tensor (batch, embed_dim)
            L2-normalised embeddings ``φ(x)``.
        logits : Tensor (batch, num_classes)
            The classifier applied to the un-normalised embeddings (the ``"normalized"`` and
            ``"cosine"`` classifiers normalise them themselves).
        """
        z = self.features(x)
        return F.normalize(z, dim=1), self.classifier(z)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """L2-normalised embeddings ``φ(x)`` (what the gallery stores).

        Parameters
        ----------
        x : Tensor (batch, *input_shape)
            Inputs.

        Returns
        -------
        Tensor (batch, embed_dim)
            Unit-norm rows.
        """
        return F.normalize(self.features(x), dim=1)

    def classify(self, z: torch.Tensor) -> torch.Tensor:
        """Apply this model's classifier to embeddings ``z`` (possibly another model's, as in BCT).

        Parameters
        ----------
        z : Tensor (batch, embed_dim)
            Embeddings of the same size as this model's, e.g. the new model's ``features(x)``
            given to the frozen old classifier ``W_o``.

        Returns
        -------
        Tensor (batch, num_classes)
            Logits.

        Raises
        ------
        ValueError
            If ``z`` does not have ``embed_dim`` columns.
        """
        if z.shape[1] != self.embed_dim:
            raise ValueError(f"z has dimension {z.shape[1]} but this classifier expects {self.embed_dim}")
        return self.classifier(z)


def build_model(spec: ModelSpec, input_shape, num_classes: int, seed: int | None = None) -> EmbeddingModel:
    """Create an :class:`EmbeddingModel`; with ``seed`` the initial weights are reproducible.

    The seed is applied inside a forked RNG state, so the global torch random state is left as
    it was.

    Parameters
    ----------
    spec : ModelSpec
        Architecture, embedding size and width.
    input_shape : tuple of int
        Shape of one input, e.g. ``data.input_shape`` of a :class:`~backfill_lib.data.BackfillData`.
    num_classes : int
        Outputs of the classifier.
    seed : int, optional
        Seed of the initial weights; default None (torch's current random state).

    Returns
    -------
    EmbeddingModel
        A fresh, untrained model on the CPU.

    Raises
    ------
    ValueError
        If ``spec`` or ``input_shape`` is invalid (see :class:`EmbeddingModel`).

    Examples
    --------
    >>> model = build_model(ModelSpec("mlp", embed_dim=16), (1, 8, 8), num_classes=10, seed=0)
    >>> model.embed(torch.zeros(2, 1, 8, 8)).shape
    torch.Size([2, 16])
    """
    if seed is None:
        return EmbeddingModel(spec, input_shape, num_classes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return EmbeddingModel(spec, input_shape, num_classes)
