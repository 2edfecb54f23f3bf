"""One training loop for every model, a checkpoint cache, and embedding extraction.

* :func:`train` runs any loss ``loss_fn(model, x, y) -> scalar`` (cross-entropy by default; BCT,
  RA-BCT and the transformation losses plug in here), seeded, on the GPU when there is one, with
  a tqdm progress bar.
* :func:`train_or_load` is "load the checkpoint if it exists, otherwise train": the cache key is
  a hash of the full configuration, and checkpoints are read with ``weights_only=True``. Each
  checkpoint carries a SHA-256 checksum of its weights (:func:`state_checksum`); an unreadable or
  damaged checkpoint is moved aside (``<name>.corrupt``) with a warning and trained again.
* :func:`resolve_device` and :func:`check_cache_dir` check a device and a checkpoint folder
  before any work, so a typo fails at once instead of after training.

Fields added to :class:`TrainConfig` or :class:`~backfill_lib.models.ModelSpec` after
checkpoints existed carry :data:`NEW_FIELD`: at their default they are left out of
:func:`cache_key` (:func:`spec_dict`), so existing checkpoints keep their keys.
"""

from __future__ import annotations

import hashlib
import math
import json
import os
import tempfile
import time
import warnings
import functools
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

CACHE_ENV = "BACKFILL_CACHE"
#: Bump when a change to the code makes old checkpoints stale.
CACHE_VERSION = 1
#: Marks a checkpoint written with a checksum: ``{"format": CHECKPOINT_FORMAT, "sha256": ...,
#: "state_dict": ...}``. Checkpoints written before checksums are bare state dicts.
CHECKPOINT_FORMAT = "backfill_lib.training.checkpoint"

LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]

#: ``field(metadata=NEW_FIELD)`` marks a config field added after checkpoints existed: it is left
#: out of :func:`cache_key` (and of ``ModelSpec.to_dict``) while it holds its default, so the keys
#: of existing checkpoints stay what they were.
NEW_FIELD = {"omit_at_default": True}


def spec_dict(obj) -> dict:
    """A config dataclass as a dict, without the added fields that hold their default (:data:`NEW_FIELD`).

    Parameters
    ----------
    obj : dataclass instance
        E.g. a :class:`~backfill_lib.models.ModelSpec` or a :class:`TrainConfig`.

    Returns
    -------
    dict
        ``{field: value}`` (values as they are, not converted); a field marked :data:`NEW_FIELD`
        appears only when it differs from its default, so a config written before the field
        existed gives the same dict, and the same :func:`cache_key`.

    Examples
    --------
    >>> spec_dict(TrainConfig(epochs=3))
    {'epochs': 3, 'batch_size': 64, 'lr': 0.002, 'weight_decay': 0.0005, 'optimizer': 'adam', 'seed': 0}
    >>> spec_dict(TrainConfig(epochs=3, label_smoothing=0.1))["label_smoothing"]
    0.1
    """
    return {f.name: getattr(obj, f.name) for f in fields(obj)
            if not (f.metadata.get("omit_at_default") and getattr(obj, f.name) == f.default)}


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings (part of the checkpoint cache key).

    Each parameter is kept as an attribute of the same name.

    Parameters
    ----------
    epochs : int, default 30
        Passes over the training set.
    batch_size : int, default 64
        Items per optimiser step.
    lr : float, default 2e-3
        Peak learning rate, decayed to zero over all steps with a cosine schedule.
    weight_decay : float, default 5e-4
        Weight decay of the optimiser.
    optimizer : {"adam", "sgd"}, default "adam"
        ``"adam"`` is AdamW; ``"sgd"`` is SGD with Nesterov momentum 0.9.
    seed : int, default 0
        Seeds the data order and the randomness inside the loop (augmentation, dropout) in
        :func:`train`. (The initial weights are seeded by
        :func:`~backfill_lib.models.build_model`.)
    label_smoothing : float, default 0.0
        Label smoothing of the default cross-entropy objective (:func:`cross_entropy_loss`);
        BT² and ml-fct use 0.1. A custom ``loss_fn`` given to :func:`train` does not see it
        (:func:`train` warns).
    warmup_epochs : int, default 0
        Epochs of linear learning-rate warm-up before the cosine decay (BT² and ml-fct use 5).

    Raises
    ------
    ValueError
        If ``optimizer`` is unknown, ``epochs`` or ``batch_size`` is below 1, ``lr`` is not
        positive, ``weight_decay`` or ``seed`` is negative, a rate is not a finite number,
        ``label_smoothing`` is outside ``[0, 1)``, or ``warmup_epochs`` is negative or not below
        ``epochs``.
    TypeError
        If ``epochs``, ``batch_size``, ``seed`` or ``warmup_epochs`` is not an integer.

    Notes
    -----
    ``label_smoothing`` and ``warmup_epochs`` were added after checkpoints existed: at their
    defaults they are left out of :func:`cache_key` (:func:`spec_dict`).
    """

    epochs: int = 30
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 5e-4
    optimizer: str = "adam"
    seed: int = 0
    label_smoothing: float = field(default=0.0, metadata=NEW_FIELD)
    warmup_epochs: int = field(default=0, metadata=NEW_FIELD)

    def __post_init__(self):
        if not isinstance(self.optimizer, str) or self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")
        for name in ("epochs", "batch_size", "seed", "warmup_epochs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise TypeError(f"{name} must be an integer, got {value!r}")
        for name in ("lr", "weight_decay", "label_smoothing"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
                    or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be at least 0, got {self.weight_decay}")
        if self.seed < 0:
            raise ValueError(f"seed must be at least 0, got {self.seed}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if not 0 <= self.warmup_epochs < self.epochs:
            raise ValueError(f"warmup_epochs must be between 0 and epochs - 1 = {self.epochs - 1}, "
                             f"got {self.warmup_epochs}")


def default_device() -> torch.device:
    """The GPU if there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(device=None, name: str = "device") -> torch.device:
    """Check a device argument and turn it into a ``torch.device`` (default :func:`default_device`).

    Parameters
    ----------
    device : str or torch.device, optional
        ``"cpu"``, ``"cuda"``, ``"cuda:<index>"`` or ``"mps"``; None picks :func:`default_device`.
    name : str, default "device"
        Argument name used in error messages (e.g. ``"--device"`` for the command line).

    Returns
    -------
    torch.device
        The device, known to be usable on this machine.

    Raises
    ------
    ValueError
        If ``device`` is not a device string, or names a GPU this machine does not have.
    TypeError
        If ``device`` is neither a string nor a ``torch.device``.

    Examples
    --------
    >>> resolve_device("cpu")
    device(type='cpu')
    """
    if device is None:
        return default_device()
    if isinstance(device, str):
        try:
            d = torch.device(device)
        except RuntimeError:
            raise ValueError(f"{name} {device!r} is not a device: use 'cpu', 'cuda' or 'cuda:<index>' "
                             "(or leave it unset to use the GPU when there is one)") from None
    elif isinstance(device, torch.device):
        d = device
    else:
        raise TypeError(f"{name} must be a string such as 'cpu' or 'cuda', or a torch.device, "
                        f"got {type(device).__name__}")
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{name} {device!r}: this machine has no CUDA GPU that torch can use; use 'cpu' "
                             "(or leave it unset to use the GPU when there is one)")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise ValueError(f"{name} {device!r}: there are only {torch.cuda.device_count()} CUDA GPU(s), "
                             f"numbered from 0")
    elif d.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ValueError(f"{name} {device!r}: Apple's MPS is not available on this machine; use 'cpu'")
    elif d.type != "cpu":
        raise ValueError(f"{name} {device!r}: only 'cpu', 'cuda' and 'mps' devices are supported")
    return d


def check_cache_dir(path=None, name: str = "cache") -> Path:
    """The checkpoint folder of :func:`cache_dir`, checked to be usable before any training.

    The folder need not exist (it is created when the first checkpoint is saved), but it must
    not be a file, and the closest existing folder above it must be writable.

    Parameters
    ----------
    path : str or Path, optional
        An explicit folder, as in :func:`cache_dir`.
    name : str, default "cache"
        Argument name used in error messages (e.g. ``"--cache"`` for the command line).

    Returns
    -------
    Path
        The checkpoint folder.

    Raises
    ------
    ValueError
        If the path (or a part of it) is a file, or no checkpoint could be written there.
    """
    directory = cache_dir(path)
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        what = "is a file" if existing == directory else f"is under {existing}, which is a file"
        raise ValueError(f"{name} {str(directory)!r} {what}: give a folder for the checkpoints")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{name} {str(directory)!r}: cannot write in {existing} (permission denied); "
                         "give a folder you can write to")
    # os.access says yes to root everywhere, and to folders such as /proc where nothing can be
    # created: try it (a probe file in the folder, or the first missing folder, removed at once).
    try:
        if existing == directory:
            fd, probe = tempfile.mkstemp(dir=directory, prefix=".write-check-")
            os.close(fd)
            os.remove(probe)
        else:
            probe = tempfile.mkdtemp(dir=existing, prefix=".write-check-")
            os.rmdir(probe)
    except OSError as exc:
        raise ValueError(f"{name} {str(directory)!r}: cannot write in {existing} ({exc.strerror or exc}); "
                         "give a folder you can write to") from None
    return directory


def cache_dir(path=None) -> Path:
    """Checkpoint folder: ``path``, else ``$BACKFILL_CACHE``, else ``~/.cache/backfill_lib/checkpoints``.

    The folder is not created here (:func:`train_or_load` creates it when it saves).

    Parameters
    ----------
    path : str or Path, optional
        An explicit folder; ``~`` is expanded. Takes precedence over the ``BACKFILL_CACHE``
        environment variable.

    Returns
    -------
    Path
        The checkpoint folder.
    """
    if path is not None:
        return Path(path).expanduser()
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path.home() / ".cache" / "backfill_lib" / "checkpoints"


def cross_entropy_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """The default objective: cross-entropy of the model's classifier.

    Parameters
    ----------
    model : nn.Module
        A model whose call returns ``(embedding, logits)``, such as
        :class:`~backfill_lib.models.EmbeddingModel`.
    x : Tensor (batch, ...)
        Inputs.
    y : Tensor (batch,) of int64
        Labels.
    label_smoothing : float, default 0.0
        Label smoothing (:func:`train` passes ``TrainConfig.label_smoothing``).

    Returns
    -------
    Tensor
        Scalar mean cross-entropy.
    """
    _, logits = model(x)
    return F.cross_entropy(logits, y, label_smoothing=label_smoothing)


def _schedule(opt: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int):
    """Cosine decay to zero over all steps, after ``warmup_epochs`` of linear warm-up."""
    total = config.epochs * steps_per_epoch
    if config.warmup_epochs == 0:  # the schedule every checkpoint before warm-up existed was trained with
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    warm = config.warmup_epochs * steps_per_epoch

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1.0 + math.cos(math.pi * (step - warm) / (total - warm)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _make_optimizer(params, config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "adam":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(params, lr=config.lr, momentum=0.9, weight_decay=config.weight_decay, nesterov=True)


@torch.enable_grad()  # a caller inside torch.no_grad() (e.g. a lazily trained cached model) still trains
def train(model: nn.Module, dataset: Dataset, config: TrainConfig = TrainConfig(), loss_fn: LossFn = cross_entropy_loss,
          device=None, params=None, desc: str = "train", progress: bool = True) -> list[float]:
    """Train ``model`` on ``dataset`` by minimising ``loss_fn``; returns the mean loss per epoch.

    The data are shuffled with ``config.seed``; the last incomplete batch is dropped when the
    dataset holds more than one batch. The learning rate follows a cosine decay over all steps
    (after ``config.warmup_epochs`` of linear warm-up). Gradients are enabled even when the caller
    is inside ``torch.no_grad()``.

    Parameters
    ----------
    model : nn.Module
        The model to train, in place. It is moved to ``device`` and left there in eval mode.
    dataset : Dataset of ``(x, y)``
        Training items.
    config : TrainConfig, optional
        Schedule, optimiser and seed; default ``TrainConfig()``.
    loss_fn : callable ``(model, x, y) -> scalar tensor``, optional
        The objective; default :func:`cross_entropy_loss` with ``config.label_smoothing``. BCT,
        RA-BCT and the transformation losses plug in here (they do not see
        ``config.label_smoothing``).
    device : str or torch.device, optional
        Default :func:`default_device`.
    params : iterable of parameters, optional
        What to optimise (default: every parameter of ``model`` that requires grad). Frozen
        parts (an old model a loss uses, a backbone under a transformation) stay as they are.
    desc : str, default "train"
        Label of the progress bar and of the error message.
    progress : bool, default True
        Show a tqdm progress bar (one step per epoch, with the last epoch's loss).

    Returns
    -------
    list of float
        Mean training loss of each epoch.

    Raises
    ------
    ValueError
        If ``dataset`` is empty or no parameter requires grad.
    TypeError
        If ``config`` is not a :class:`TrainConfig`.
    FloatingPointError
        If the loss becomes NaN or infinite (lower ``config.lr``).

    Warns
    -----
    UserWarning
        When ``config.label_smoothing > 0`` and a custom ``loss_fn`` is given: it does not see
        the smoothing.
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    if config.label_smoothing > 0:
        if loss_fn is cross_entropy_loss:
            loss_fn = functools.partial(cross_entropy_loss, label_smoothing=config.label_smoothing)
        else:
            warnings.warn(f"{desc}: config.label_smoothing={config.label_smoothing} applies to the default "
                          "cross-entropy objective only; this loss_fn trains without it", UserWarning, stacklevel=2)
    if len(dataset) == 0:
        raise ValueError("dataset is empty: nothing to train on")
    device = resolve_device(device)
    model.to(device).train()
    params = [p for p in (model.parameters() if params is None else params) if p.requires_grad]
    if not params:
        raise ValueError("no parameter requires grad: nothing to train")
    opt = _make_optimizer(params, config)
    generator = torch.Generator().manual_seed(config.seed)
    loader = DataLoader(dataset, batch_size=config.batch_size, shuffle=True, generator=generator,
                        drop_last=len(dataset) > config.batch_size, pin_memory=device.type == "cuda")
    sched = _schedule(opt, config, len(loader))
    history = []
    torch.manual_seed(config.seed)  # dropout / augmentation randomness inside the loop
    bar = tqdm(range(config.epochs), desc=desc, disable=not progress, leave=False)
    for _ in bar:
        total, count = 0.0, 0
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss = loss_fn(model, x, y)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{desc}: the loss became {loss.item()}; lower config.lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(y)
            count += len(y)
        history.append(total / count)
        bar.set_postfix(loss=f"{history[-1]:.4f}")
    model.eval()
    return history


def cache_key(**parts) -> str:
    """A stable hash of a configuration (dataclasses and plain values).

    The parts are turned into JSON (dataclasses field by field through :func:`spec_dict`, so a
    field added later is absent at its default; tuples as lists; anything else JSON cannot hold
    through ``str``) with sorted keys, together with ``CACHE_VERSION``, and hashed with SHA-256.
    The order of the keyword arguments does not matter.

    Parameters
    ----------
    **parts
        Everything that determines the weights, by name (model spec, classes, training config,
        dataset description, seeds, loss settings, ...).

    Returns
    -------
    str
        The first 20 hexadecimal digits of the hash.

    Examples
    --------
    >>> cache_key(seed=0, config=TrainConfig()) == cache_key(config=TrainConfig(), seed=0)
    True
    >>> cache_key(seed=0) == cache_key(seed=1)
    False
    """
    def plain(v):
        if hasattr(v, "__dataclass_fields__") and not isinstance(v, type):
            return {k: plain(x) for k, x in spec_dict(v).items()}
        if isinstance(v, (tuple, list)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    blob = json.dumps({"cache_version": CACHE_VERSION, **plain(parts)}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _read_seconds(meta_path: Path) -> float | None:
    """Training time from a checkpoint's side file; None when the file is missing or unreadable."""
    try:
        seconds = json.loads(meta_path.read_text()).get("seconds")
    except (OSError, ValueError, AttributeError):
        return None
    return float(seconds) if isinstance(seconds, (int, float)) and not isinstance(seconds, bool) else None


def state_checksum(state: dict, header=None) -> str:
    """SHA-256 of a state dict (names, dtypes, shapes and bytes of every tensor) and of ``header``.

    Detects accidental damage (a flipped bit on disk, a bad copy), not deliberate tampering: whoever
    can rewrite the file can rewrite the checksum too.

    Parameters
    ----------
    state : dict of str to Tensor
        E.g. ``module.state_dict()``; the order of the entries does not matter.
    header : JSON-serialisable value, optional
        Anything else that decides what the weights mean (class name, sizes,
        hyper-parameters), hashed as JSON with sorted keys.

    Returns
    -------
    str
        64 hexadecimal digits.

    Raises
    ------
    TypeError
        If ``state`` is not a dict of tensors with string names, or ``header`` cannot be
        written as JSON.

    Examples
    --------
    >>> a = state_checksum({"w": torch.zeros(2)})
    >>> a == state_checksum({"w": torch.zeros(2)}), a == state_checksum({"w": torch.ones(2)})
    (True, False)
    """
    if not isinstance(state, dict):
        raise TypeError(f"state must be a dict of tensors, got {type(state).__name__}")
    digest = hashlib.sha256(json.dumps(header, sort_keys=True).encode())
    for key in sorted(state, key=str):
        tensor = state[key]
        if not isinstance(key, str) or not isinstance(tensor, torch.Tensor):
            raise TypeError(f"state must map names to tensors, got {type(key).__name__} -> {type(tensor).__name__}")
        tensor = tensor.detach().cpu().contiguous()
        # the header fixes how many bytes follow, so entries cannot run into each other
        digest.update(json.dumps([key, str(tensor.dtype), list(tensor.shape)]).encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class _WrongCheckpoint(ValueError):
    """A readable checkpoint whose tensors do not fit the model."""


class _DamagedCheckpoint(ValueError):
    """A checkpoint whose weights do not match the checksum stored with them."""


def _load_state(path: Path, module: nn.Module) -> dict:
    """The checkpoint's state dict, checked against its checksum and to fit ``module`` (keys, shapes,
    dtypes) before anything is copied.

    A checkpoint written before checksums existed (a bare state dict) is accepted unchecked.
    """
    blob = torch.load(path, map_location="cpu", weights_only=True)
    expected = module.state_dict()
    if isinstance(blob, dict) and blob.get("format") == CHECKPOINT_FORMAT:
        state = blob.get("state_dict")
        try:
            intact = isinstance(blob.get("sha256"), str) and state_checksum(state) == blob["sha256"]
        except TypeError:
            intact = False
        if not intact:
            raise _DamagedCheckpoint("its weights do not match the checksum stored with them")
    else:
        state = blob  # written before checksums: a bare state dict, accepted as it is (see train_or_load)
    if not isinstance(state, dict) or state.keys() != expected.keys():
        raise _WrongCheckpoint("its tensors are not the ones this model has")
    wrong = [k for k, v in state.items() if not isinstance(v, torch.Tensor) or v.shape != expected[k].shape]
    if wrong:
        raise _WrongCheckpoint(f"tensor {wrong[0]!r} has the wrong shape")
    wrong = [k for k, v in state.items() if v.dtype != expected[k].dtype]
    if wrong:
        raise _WrongCheckpoint(f"tensor {wrong[0]!r} is {state[wrong[0]].dtype}, not {expected[wrong[0]].dtype}")
    return state


def _why_unreadable(exc: Exception, path: Path) -> str:
    if path.stat().st_size == 0:
        return "the file is empty"
    if isinstance(exc, _DamagedCheckpoint):
        return f"the file is damaged: {exc}"
    if isinstance(exc, _WrongCheckpoint):
        return f"a checkpoint of another model: {exc}"
    # torch's own message advises weights_only=False, which is wrong here: the file is damaged
    return f"truncated or not a checkpoint: {type(exc).__name__}"


def train_or_load(module: nn.Module, name: str, key: str, train_fn: Callable[[nn.Module], object],
                  directory=None, force: bool = False) -> tuple[nn.Module, dict]:
    """Load ``module``'s weights from ``<directory>/<name>-<key>.pt`` if present, else train and save.

    Checkpoints are read onto the CPU with ``weights_only=True``. Each one holds a SHA-256
    checksum of its weights (:func:`state_checksum`), checked on load. A checkpoint that cannot be
    read (empty, truncated, not a checkpoint, damaged so that its weights no longer match their
    checksum, or holding tensors of another model) is moved aside to ``<name>-<key>.pt.corrupt``,
    with a warning that names it, and the model is trained again over it, so the next run finds a
    good file. A new checkpoint is written atomically (a concurrent reader never sees half a
    file), with a side file ``<name>-<key>.json`` that records the training time.

    A checkpoint written before checksums existed (a bare state dict) still loads, checked for
    its tensor names, shapes and dtypes only: retraining every cached model on upgrade would cost
    hours at paper scale for files that were written atomically. ``force=True`` retrains one and
    writes it with a checksum.

    Parameters
    ----------
    module : nn.Module
        A freshly built model (weights are loaded into it, or it is trained in place).
    name : str
        Human-readable prefix of the file.
    key : str
        :func:`cache_key` of everything that determines the weights.
    train_fn : callable ``(module) -> anything``
        Trains ``module`` in place.
    directory : str or Path, optional
        Default :func:`cache_dir` (``$BACKFILL_CACHE``, else ``~/.cache/backfill_lib/checkpoints``).
        Checked before training (:func:`check_cache_dir`).
    force : bool, default False
        Retrain (and overwrite the checkpoint) even if a checkpoint exists.

    Returns
    -------
    module : nn.Module
        The same model, in eval mode.
    info : dict
        ``{"path": str, "cached": bool, "seconds": float or None}``; ``seconds`` is the training
        time (read from the checkpoint's side file when loaded from cache, None when that file is
        missing or unreadable: the time is unknown, not zero).

    Raises
    ------
    ValueError
        If ``directory`` is a file or cannot be written, or ``name`` or ``key`` is not a
        non-empty string without path separators (before any training).
    TypeError
        If ``module`` is not an ``nn.Module``, ``name`` or ``key`` is not a string, ``train_fn``
        is not callable, or ``force`` is not a bool.

    Warns
    -----
    RuntimeWarning
        When a checkpoint is unreadable or damaged and is moved aside.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch nn.Module, got {type(module).__name__}")
    for arg, value in (("name", name), ("key", key)):
        if not isinstance(value, str):
            raise TypeError(f"{arg} must be a string (part of the checkpoint's file name), got {type(value).__name__}")
        if not value or any(c in value for c in ("/", "\\", "\0")) or value in (".", ".."):
            raise ValueError(f"{arg} must be a non-empty string that can be part of a file name (no '/' or '\\'), "
                             f"got {value!r}")
    if not callable(train_fn):
        raise TypeError(f"train_fn must be a function that trains the module in place, got {type(train_fn).__name__}")
    if not isinstance(force, (bool, np.bool_)):
        raise TypeError(f"force must be True or False, got {force!r}")
    directory = check_cache_dir(directory, name="directory")
    path = directory / f"{name}-{key}.pt"
    meta_path = path.with_suffix(".json")
    if path.exists() and not force:
        try:
            state = _load_state(path, module)
        except Exception as exc:  # noqa: BLE001 - any unreadable file is handled the same way: retrain
            aside = path.with_name(path.name + ".corrupt")
            os.replace(path, aside)
            warnings.warn(f"checkpoint {path} could not be read ({_why_unreadable(exc, aside)}); moved it to "
                          f"{aside.name} and training again", RuntimeWarning, stacklevel=2)
        else:
            module.load_state_dict(state)
            return module.eval(), {"path": str(path), "cached": True, "seconds": _read_seconds(meta_path)}
    start = time.perf_counter()
    train_fn(module)
    seconds = time.perf_counter() - start
    directory.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    state = {k: v.detach().cpu() for k, v in module.state_dict().items()}
    torch.save({"format": CHECKPOINT_FORMAT, "sha256": state_checksum(state), "state_dict": state}, tmp)
    os.replace(tmp, path)  # atomic: a concurrent reader never sees half a file
    meta_tmp = meta_path.with_suffix(f".tmp{os.getpid()}j")
    meta_tmp.write_text(json.dumps({"name": name, "key": key, "seconds": seconds}))
    os.replace(meta_tmp, meta_path)
    return module.eval(), {"path": str(path), "cached": False, "seconds": seconds}


@torch.no_grad()
def extract_embeddings(model: nn.Module, dataset: Dataset, batch_size: int = 512, device=None,
                       fn: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None,
                       progress: bool = False) -> np.ndarray:
    """Embed every item of ``dataset`` (in order) with ``model.embed`` (or ``fn(model, x)``).

    Runs without gradients, with the model in eval mode; the model's training mode is restored
    afterwards (it stays on ``device``).

    Parameters
    ----------
    model : nn.Module
        Usually an :class:`~backfill_lib.models.EmbeddingModel` (φ_o or φ_n).
    dataset : Dataset of ``(x, y)``
        Items to embed; labels are ignored.
    batch_size : int, default 512
        Items per forward pass.
    device : str or torch.device, optional
        Default :func:`default_device`.
    fn : callable ``(model, x) -> Tensor (batch, d)``, optional
        What to compute instead of ``model.embed(x)``, e.g. a head applied after the backbone.
    progress : bool, default False
        Show a tqdm progress bar.

    Returns
    -------
    array (len(dataset), d) of float32
        One row per item.

    Raises
    ------
    ValueError
        If ``dataset`` is empty.
    """
    if len(dataset) == 0:
        raise ValueError("dataset is empty: nothing to embed")
    device = resolve_device(device)
    was_training = model.training
    model.to(device).eval()
    fn = fn or (lambda m, x: m.embed(x))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    out = [fn(model, x.to(device)).float().cpu() for x, _ in tqdm(loader, desc="embed", disable=not progress, leave=False)]
    model.train(was_training)
    return torch.cat(out).numpy()
