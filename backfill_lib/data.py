"""Datasets (METHOD §6): ``digits`` (default), ``fashion_mnist``, ``synthetic``, ``cifar100``, ``imagefolder``.

:func:`load_dataset` returns a :class:`BackfillData`: a training split (augmented where the data
are images), the same training items without augmentation (to cache embeddings), and a test split
that is both query set and gallery (leave-one-out). Which classes the old model sees is a
parameter; by default the first half.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from .validation import check_positive_int

DATASETS = ("digits", "fashion_mnist", "synthetic", "cifar100", "imagefolder")
DATA_ENV = "BACKFILL_DATA"

CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DataNotFoundError(FileNotFoundError):
    """Data are not on disk and could not be downloaded."""


@dataclass
class BackfillData:
    """A dataset prepared for the backfilling protocol.

    Built by :func:`load_dataset` (or one of the ``load_*_data`` functions); every parameter is
    kept as an attribute of the same name.

    Parameters
    ----------
    name : str
        Dataset name: ``"digits"``, ``"fashion_mnist"``, ``"synthetic"``, ``"cifar100"`` or
        ``"imagefolder"``.
    train : Dataset
        Training items ``(x, y)``, augmented for images.
    train_plain : Dataset
        The same items in the same order without augmentation (for embedding caches).
    test : Dataset
        Evaluation items: every one is a query and a gallery item (leave-one-out).
    train_labels, test_labels : array (n,) of int
        Labels of ``train`` and ``test``, in their order.
    num_classes : int
        Number of classes; labels are ``0 .. num_classes - 1``.
    old_classes : tuple of int
        Classes the old model φ_o is trained on (the new model φ_n sees all of them).
    input_shape : tuple of int
        Shape of one input, e.g. ``(1, 8, 8)``.
    info : dict, optional
        Settings that change the items (split seed, test size, image size, and for
        ``imagefolder`` a fingerprint of the files, see :func:`file_fingerprint`). They go into
        the checkpoint cache key, so two different datasets never share a checkpoint. Default
        empty.
    """

    name: str
    train: Dataset
    train_plain: Dataset
    test: Dataset
    train_labels: np.ndarray
    test_labels: np.ndarray
    num_classes: int
    old_classes: tuple[int, ...]
    input_shape: tuple[int, ...]
    info: dict = field(default_factory=dict)

    def train_subset(self, classes=None) -> Dataset:
        """Training items whose label is in ``classes`` (default: the old classes).

        Parameters
        ----------
        classes : sequence of int, optional
            Labels to keep. Default ``old_classes``, the training set of the old model φ_o.

        Returns
        -------
        torch.utils.data.Subset
            A view of ``train`` (augmented) in the original order.
        """
        classes = self.old_classes if classes is None else tuple(classes)
        idx = np.flatnonzero(np.isin(self.train_labels, classes))
        return Subset(self.train, idx.tolist())

    def describe(self) -> str:
        """One line with the name, the split sizes, the number of classes and the old classes.

        Returns
        -------
        str
            E.g. ``"digits: 898 train / 899 test items, 10 classes, old model sees 0-4"``.
        """
        return (f"{self.name}: {len(self.train_labels)} train / {len(self.test_labels)} test items, "
                f"{self.num_classes} classes, old model sees {format_classes(self.old_classes)}")


def parse_classes(spec, num_classes: int | None = None) -> tuple[int, ...]:
    """Parse ``"0-4"``, ``"0,2,5"``, ``"0-4,7"`` or a sequence of ints into a sorted tuple.

    Duplicates are dropped; spaces in a string are ignored.

    Parameters
    ----------
    spec : str or sequence of int
        The old classes: ranges ``"a-b"`` (both ends included) and single classes, separated by
        commas, or the class numbers themselves.
    num_classes : int, optional
        Number of classes of the dataset. When given, every class must lie in
        ``0 .. num_classes - 1`` and at least one class must be left out (new).

    Returns
    -------
    tuple of int
        The classes, sorted and unique.

    Raises
    ------
    ValueError
        If a part of the string cannot be parsed (or a range runs backwards), if no class is
        given, if a class is out of range, or if every class is an old class.
    TypeError
        If ``spec`` is neither a string nor a sequence of integers.

    See Also
    --------
    format_classes : The inverse, for messages and results.

    Examples
    --------
    >>> parse_classes("0-2,5")
    (0, 1, 2, 5)
    """
    if isinstance(spec, str):
        out: set[int] = set()
        for part in spec.replace(" ", "").split(","):
            if not part:
                continue
            try:
                if "-" in part:
                    a, b = (int(v) for v in part.split("-", 1))
                    if b < a:
                        raise ValueError
                    out.update(range(a, b + 1))
                else:
                    out.add(int(part))
            except ValueError:
                raise ValueError(f"old_classes: cannot parse {part!r}; use a form like '0-4' or '0,1,2'") from None
        vals = tuple(sorted(out))
    else:
        try:
            vals = tuple(sorted({int(v) for v in spec}))
        except (TypeError, ValueError):
            raise TypeError(f"old_classes must be a string like '0-4' or a sequence of ints, got {spec!r}") from None
    if not vals:
        raise ValueError("old_classes is empty: the old model needs at least one class")
    if num_classes is not None and (vals[0] < 0 or vals[-1] >= num_classes):
        raise ValueError(f"old_classes {format_classes(vals)} out of range: classes are 0..{num_classes - 1}")
    if num_classes is not None and len(vals) == num_classes:
        raise ValueError("old_classes covers every class: leave some classes new, or nothing changes")
    return vals


def format_classes(classes) -> str:
    """Inverse of :func:`parse_classes` for contiguous runs, e.g. ``(0, 1, 2, 5) -> "0-2,5"``.

    Parameters
    ----------
    classes : iterable of int
        Class numbers, in any order, without duplicates.

    Returns
    -------
    str
        Runs of consecutive classes written ``"a-b"``, joined by commas.

    Examples
    --------
    >>> format_classes([5, 0, 1, 2])
    '0-2,5'
    """
    classes = sorted(classes)
    runs, start = [], None
    for i, c in enumerate(classes):
        if start is None:
            start = c
        if i + 1 == len(classes) or classes[i + 1] != c + 1:
            runs.append(f"{start}" if start == c else f"{start}-{c}")
            start = None
    return ",".join(runs)


def data_root(root=None) -> Path:
    """Where downloaded data live: ``root``, else ``$BACKFILL_DATA``, else ``~/.cache/backfill_lib/data``.

    The folder is not created here (torchvision creates it when it downloads).

    Parameters
    ----------
    root : str or Path, optional
        An explicit data folder; ``~`` is expanded. Takes precedence over the ``BACKFILL_DATA``
        environment variable.

    Returns
    -------
    Path
        The data folder.
    """
    if root is not None:
        return Path(root).expanduser()
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV]).expanduser()
    return Path.home() / ".cache" / "backfill_lib" / "data"


def _stratified_split(labels: np.ndarray, test_size: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    tr, te = train_test_split(idx, test_size=test_size, stratify=labels, random_state=seed)
    return np.sort(tr), np.sort(te)


def _from_arrays(name, x_train, y_train, x_test, y_test, num_classes, old_classes, info) -> BackfillData:
    train = TensorDataset(torch.as_tensor(x_train, dtype=torch.float32), torch.as_tensor(y_train, dtype=torch.long))
    test = TensorDataset(torch.as_tensor(x_test, dtype=torch.float32), torch.as_tensor(y_test, dtype=torch.long))
    return BackfillData(name, train, train, test, np.asarray(y_train, dtype=np.int64), np.asarray(y_test, dtype=np.int64),
                        num_classes, old_classes, tuple(x_train.shape[1:]), info)


def load_digits_data(old_classes=None, test_size: float = 0.5, split_seed: int = 0) -> BackfillData:
    """scikit-learn's bundled 8×8 digits (1,797 images, 10 classes), stratified seeded split.

    Pixels are scaled to [0, 1] then standardised with the training mean and std (one scalar
    each). Nothing is downloaded and there is no augmentation (``train_plain`` is ``train``).

    Parameters
    ----------
    old_classes : str or sequence of int, optional
        Classes of the old model, in any form :func:`parse_classes` accepts. Default ``0-4``.
    test_size : float, default 0.5
        Share of the images in the test split (queries and gallery).
    split_seed : int, default 0
        Seed of the stratified train/test split.

    Returns
    -------
    BackfillData
        Inputs of shape ``(1, 8, 8)``.

    Raises
    ------
    ValueError
        If ``old_classes`` is invalid (see :func:`parse_classes`).
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None, :, :]
    y = d.target.astype(np.int64)
    tr, te = _stratified_split(y, test_size, split_seed)
    mean, std = x[tr].mean(), x[tr].std()
    x = (x - mean) / std
    old = parse_classes(old_classes if old_classes is not None else range(5), 10)
    return _from_arrays("digits", x[tr], y[tr], x[te], y[te], 10, old,
                        {"test_size": test_size, "split_seed": split_seed})


def make_synthetic(num_classes: int = 10, dim: int = 32, n_per_class: int = 100, separation: float = 3.0,
                   noise: float = 1.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian class clusters: class centres ``~ N(0, separation²/dim · I)``, items centre + ``N(0, noise²/dim · I)``.

    Parameters
    ----------
    num_classes : int, default 10
        Number of clusters (classes); at least 2.
    dim : int, default 32
        Dimension of the items.
    n_per_class : int, default 100
        Items per class.
    separation : float, default 3.0
        Scale of the class centres: a centre's norm is about ``separation``, so two centres are
        about ``√2 · separation`` apart.
    noise : float, default 1.0
        Scale of the spread: an item is about ``noise`` away from its centre.
    seed : int, default 0
        Seed of the centres and the noise.

    Returns
    -------
    x : array (num_classes * n_per_class, dim) of float32
        The items, grouped by class.
    y : array (num_classes * n_per_class,) of int64
        Their labels ``0, ..., 0, 1, ..., num_classes - 1``.

    Raises
    ------
    TypeError
        If ``num_classes``, ``dim`` or ``n_per_class`` is not an integer.
    ValueError
        If one of them is below 1, or ``num_classes < 2``.
    """
    for arg, v in (("num_classes", num_classes), ("dim", dim), ("n_per_class", n_per_class)):
        check_positive_int(v, arg)
    if num_classes < 2:
        raise ValueError("num_classes must be at least 2")
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=separation / np.sqrt(dim), size=(num_classes, dim))
    y = np.repeat(np.arange(num_classes), n_per_class)
    x = centres[y] + rng.normal(scale=noise / np.sqrt(dim), size=(len(y), dim))
    return x.astype(np.float32), y.astype(np.int64)


def load_synthetic_data(old_classes=None, num_classes: int = 10, dim: int = 32, n_per_class: int = 100,
                        separation: float = 3.0, noise: float = 1.0, test_size: float = 0.5,
                        split_seed: int = 0) -> BackfillData:
    """Synthetic Gaussian clusters (see :func:`make_synthetic`) split like ``digits``.

    The items are used as they are (no standardisation, no augmentation).

    Parameters
    ----------
    old_classes : str or sequence of int, optional
        Classes of the old model, in any form :func:`parse_classes` accepts. Default the first
        half, ``0 .. num_classes // 2 - 1``.
    num_classes, dim, n_per_class, separation, noise
        The clusters, as in :func:`make_synthetic` (same defaults).
    test_size : float, default 0.5
        Share of the items in the test split (queries and gallery).
    split_seed : int, default 0
        Seed of both the clusters and the stratified train/test split.

    Returns
    -------
    BackfillData
        Inputs of shape ``(dim,)``; use the ``mlp`` architecture.

    Raises
    ------
    ValueError
        If a cluster parameter or ``old_classes`` is invalid.
    """
    x, y = make_synthetic(num_classes, dim, n_per_class, separation, noise, seed=split_seed)
    tr, te = _stratified_split(y, test_size, split_seed)
    old = parse_classes(old_classes if old_classes is not None else range(num_classes // 2), num_classes)
    # Everything that changes the items goes into ``info``: the checkpoint cache key is built from it.
    return _from_arrays("synthetic", x[tr], y[tr], x[te], y[te], num_classes, old,
                        {"num_classes": num_classes, "dim": dim, "n_per_class": n_per_class,
                         "separation": separation, "noise": noise, "test_size": test_size, "split_seed": split_seed})


def _no_data_message(what: str, root: Path, exc: Exception) -> str:
    return (f"{what} is not under {root} and could not be downloaded ({type(exc).__name__}: {exc}). "
            f"On a machine with internet, run load_dataset('{what.lower()}', download=True) once, or copy "
            f"the extracted data into {root}; pass root=... or set ${DATA_ENV} to where it is.")


def load_cifar100_data(root=None, old_classes=None, download: bool = True, image_size: int = 32) -> BackfillData:
    """CIFAR-100 through torchvision (50,000 train / 10,000 test, 100 classes; old classes 0–49).

    At the native 32 px (ours) the training augmentation is the standard random crop with 4-pixel
    padding and horizontal flip, and all splits are normalised with the CIFAR-100 channel mean
    and std. At any other ``image_size`` the images are prepared as ml-fct and BT² prepare them
    for their 224-px ResNet-50: resized to ``image_size`` (training images also flipped, no
    crop) and normalised with the ImageNet mean and std. On first use torchvision downloads and
    extracts the archive into the data folder; later calls read it from there.

    Parameters
    ----------
    root : str or Path, optional
        Data folder; default :func:`data_root` (``$BACKFILL_DATA``, else
        ``~/.cache/backfill_lib/data``).
    old_classes : str or sequence of int, optional
        Classes of the old model, in any form :func:`parse_classes` accepts. Default ``0-49``.
    download : bool, default True
        Download the data if they are not under ``root``.
    image_size : int, default 32
        Side of the square inputs: 32 (ours, the native size) or e.g. 224 (the BT² recipe, with
        the ``cifar100_bt2`` preset of :mod:`~backfill_lib.context`). Any size other than 32 is
        recorded in ``info`` (and so in the checkpoint cache key); 32 is not, so checkpoints
        trained before this option existed keep their keys.

    Returns
    -------
    BackfillData
        Inputs of shape ``(3, image_size, image_size)``.

    Raises
    ------
    DataNotFoundError
        If the data are not under ``root`` and could not be downloaded (no network, or
        ``download=False``); the message says where to put them.
    ValueError
        If ``old_classes`` is invalid (see :func:`parse_classes`), or ``image_size`` is not an
        integer of at least 32.
    """
    from torchvision import datasets, transforms as T

    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < 32:
        raise ValueError(f"image_size must be an integer of at least 32 (32 = CIFAR's own size, 224 = the BT² "
                         f"recipe), got {image_size!r}")
    image_size = int(image_size)
    root = data_root(root)
    info = {"root": str(root)}
    if image_size == 32:
        norm = T.Normalize(CIFAR100_MEAN, CIFAR100_STD)
        train_tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), norm])
        test_tf = T.Compose([T.ToTensor(), norm])
    else:  # ml-fct's and BT²'s CIFAR-100 preparation for their ImageNet-style ResNet-50
        norm = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
        train_tf = T.Compose([T.Resize(image_size), T.RandomHorizontalFlip(), T.ToTensor(), norm])
        test_tf = T.Compose([T.Resize(image_size), T.ToTensor(), norm])
        info["image_size"] = image_size
    try:
        train = datasets.CIFAR100(root, train=True, transform=train_tf, download=download)
        train_plain = datasets.CIFAR100(root, train=True, transform=test_tf)
        test = datasets.CIFAR100(root, train=False, transform=test_tf)
    except (RuntimeError, OSError) as exc:  # torchvision: "Dataset not found"; urllib: no network
        raise DataNotFoundError(_no_data_message("CIFAR100", root, exc)) from exc
    old = parse_classes(old_classes if old_classes is not None else range(50), 100)
    return BackfillData("cifar100", train, train_plain, test, np.asarray(train.targets), np.asarray(test.targets),
                        100, old, (3, image_size, image_size), info)


# --- Fashion-MNIST --------------------------------------------------------------------------

#: Debian's ``dataset-fashion-mnist`` package installs the four gzipped IDX files here.
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

#: Class names of Fashion-MNIST, in label order (Zalando Research's ``fashion-mnist`` README).
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")

#: Names of the coarse classes of :data:`FASHION_MNIST_COARSE`.
FASHION_MNIST_COARSE_NAMES = ("tops", "footwear", "other")

#: A coarse label of each Fashion-MNIST class (issue 17's old model that knows little): tops
#: (T-shirt/top, Pullover, Dress, Coat, Shirt) 0, footwear (Sandal, Sneaker, Ankle boot) 1, other
#: (Trouser, Bag) 2. ``ExperimentContext(old_label_map=FASHION_MNIST_COARSE)`` trains the old model
#: on every image with these 3 labels.
FASHION_MNIST_COARSE = (0, 2, 0, 0, 0, 1, 0, 1, 2, 1)

#: The four files of each split (``images``, ``labels``), without the optional ``.gz``.
FASHION_MNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                       "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}

#: IDX type codes (third byte of the magic number) and their big-endian numpy dtypes.
IDX_DTYPES = {0x08: np.dtype(">u1"), 0x09: np.dtype(">i1"), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
              0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path) -> np.ndarray:
    """Read one IDX file (the format of MNIST and Fashion-MNIST), gzipped or plain.

    An IDX file is a 4-byte magic number (two zero bytes, a type code, the number of
    dimensions), then each dimension as a big-endian 32-bit integer, then the values in C order.
    A gzipped file is recognised by its first two bytes, whatever its name.

    Parameters
    ----------
    path : str or Path
        The file, e.g. ``train-images-idx3-ubyte`` or ``train-images-idx3-ubyte.gz``.

    Returns
    -------
    numpy.ndarray
        The values with the shape of the header, in the header's type (``uint8`` for the MNIST
        family), in native byte order.

    Raises
    ------
    DataNotFoundError
        If ``path`` does not exist.
    ValueError
        If the file is not gzip although it starts like one, ends early (truncated), has an unknown
        magic number, or holds more or fewer values than its header announces. The message names
        the file.
    """
    path = Path(path)
    if not path.is_file():
        raise DataNotFoundError(f"IDX file {path} does not exist")
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except EOFError:
            raise ValueError(f"{path}: the gzip stream ends early (truncated file); download or copy it again") from None
        except (OSError, zlib.error) as exc:
            raise ValueError(f"{path}: not a valid gzip file ({exc}); download or copy it again") from None
    if len(raw) < 4:
        raise ValueError(f"{path}: {len(raw)} bytes, too short for an IDX header (truncated file?)")
    zero, code, ndim = raw[:2], raw[2], raw[3]
    if zero != b"\x00\x00" or code not in IDX_DTYPES or ndim == 0:
        raise ValueError(f"{path}: not an IDX file (magic number 0x{raw[:4].hex()}; expected 0x0000 then a type "
                         f"code and the number of dimensions, e.g. 0x00000803 for images of bytes)")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: the header announces {ndim} dimensions but the file ends after {len(raw)} bytes "
                         f"(truncated file)")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = IDX_DTYPES[code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    got = len(raw) - header
    if got != expected:
        problem = "truncated file" if got < expected else "extra bytes after the data"
        raise ValueError(f"{path}: the header announces shape {tuple(dims)} ({expected} bytes of data) but the file "
                         f"holds {got} bytes ({problem})")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="), copy=False)


def _idx_file(folder: Path, name: str) -> Path | None:
    for candidate in (folder / name, folder / f"{name}.gz"):  # plain first: no decompression
        if candidate.is_file():
            return candidate
    return None


def find_fashion_mnist(root=None) -> dict | None:
    """Where the four Fashion-MNIST IDX files are, without reading them.

    The folders are searched in this order: the data folder (``root``, else ``$BACKFILL_DATA``,
    else ``~/.cache/backfill_lib/data``, see :func:`data_root`), in torchvision's layout
    ``<folder>/FashionMNIST/raw/`` and flat ``<folder>/``; then Debian's
    ``/usr/share/datasets/fashion-mnist`` (:data:`DEBIAN_FASHION_MNIST`). A file may be gzipped
    (``.gz``) or plain; plain is preferred when both exist.

    Parameters
    ----------
    root : str or Path, optional
        The data folder; default :func:`data_root`.

    Returns
    -------
    dict or None
        ``{"folder": Path, "train": (images, labels), "test": (images, labels)}`` with the
        paths of the first folder that holds all four files; None if no folder holds any of them.

    Raises
    ------
    DataNotFoundError
        If a folder holds some but not all four files (the message names the missing ones): a
        half-copied dataset is an error, not a reason to look elsewhere.
    """
    base = data_root(root)
    for folder in (base / "FashionMNIST" / "raw", base, DEBIAN_FASHION_MNIST):
        found = {name: _idx_file(folder, name) for split in ("train", "test") for name in FASHION_MNIST_FILES[split]}
        missing = [name for name, p in found.items() if p is None]
        if len(missing) == len(found):
            continue
        if missing:
            raise DataNotFoundError(f"Fashion-MNIST in {folder} is incomplete: {', '.join(missing)} (or .gz) missing; "
                                    f"copy all four IDX files there, or remove the folder's Fashion-MNIST files")
        out = {"folder": folder}
        for split, names in FASHION_MNIST_FILES.items():
            out[split] = tuple(found[n] for n in names)
        return out
    return None


def _download_fashion_mnist(root: Path) -> dict:
    """Download through torchvision into ``root/FashionMNIST/raw`` (Colab); return the file paths."""
    from torchvision import datasets

    for train in (True, False):
        datasets.FashionMNIST(root, train=train, download=True)
    found = find_fashion_mnist(root)
    if found is None:
        raise FileNotFoundError(f"torchvision reported success but the files are not in {root / 'FashionMNIST' / 'raw'}")
    return found


def _read_fashion_split(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise ValueError(f"{images_path}: expected 28×28 images of bytes (IDX type 0x08, 3 dimensions), got shape "
                         f"{images.shape} of {images.dtype}; is this the right file?")
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise ValueError(f"{labels_path}: expected a vector of byte labels (IDX type 0x08, 1 dimension), got shape "
                         f"{labels.shape} of {labels.dtype}; is this the right file?")
    if len(labels) != len(images):
        raise ValueError(f"{labels_path} holds {len(labels)} labels but {images_path} holds {len(images)} images: "
                         f"the two files belong to different splits or versions")
    if len(labels) and labels.max() > 9:
        bad = int(np.flatnonzero(labels > 9)[0])
        raise ValueError(f"{labels_path}: label {int(labels[bad])} at position {bad} is outside 0..9")
    return images, labels.astype(np.int64)


def stratified_subset(labels, n, seed: int = 0) -> np.ndarray:
    """Indices of a stratified random subset of ``n`` items, sorted.

    Each class gets ``n`` times its share of ``labels`` (rounded down, then the largest
    remainders get one more, ties to the lower class), drawn without replacement. The same
    arguments give the same subset; within a class the items are the first ones of one seeded
    permutation, so for one seed a smaller subset mostly lies inside a larger one.

    Parameters
    ----------
    labels : array-like (N,) of int
        Class labels of all items.
    n : int or None
        Size of the subset, ``1 .. N``; None (or ``N``) keeps every item.
    seed : int, default 0
        Seed of the draw.

    Returns
    -------
    array (n,) of int64
        Sorted indices into ``labels``.

    Raises
    ------
    TypeError
        If ``n`` is neither None nor an integer.
    ValueError
        If ``n`` is below 1 or above ``N``.
    """
    labels = np.asarray(labels)
    n = check_positive_int(n, "n", "subset size", allow_none=True)
    if n is None or n == len(labels):
        return np.arange(len(labels), dtype=np.int64)
    if n > len(labels):
        raise ValueError(f"n must be at most the number of items ({len(labels)}), got {n}")
    classes, counts = np.unique(labels, return_counts=True)
    share = counts * (n / len(labels))
    quota = np.floor(share).astype(np.int64)
    extra = n - int(quota.sum())
    quota[np.argsort(-(share - quota), kind="stable")[:extra]] += 1
    rng = np.random.default_rng(seed)
    picked = [rng.permutation(np.flatnonzero(labels == c))[:q] for c, q in zip(classes, quota)]
    return np.sort(np.concatenate(picked)).astype(np.int64)


def _fingerprint(*arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:20]


def load_fashion_mnist_data(root=None, old_classes=None, n_train: int | None = 20000, n_test: int | None = 3000,
                            split_seed: int = 0, download: bool = True) -> BackfillData:
    """Fashion-MNIST (Zalando Research): 28×28 greyscale product photos, 10 classes; stratified seeded subsets.

    The 60,000 training and 10,000 test images of the official splits are read from the four
    IDX files (gzipped or plain, read here with numpy: see :func:`read_idx`), looked for in this
    order (:func:`find_fashion_mnist`):

    1. the data folder ``root``, else ``$BACKFILL_DATA``, else ``~/.cache/backfill_lib/data``
       (:func:`data_root`), either in torchvision's layout ``<folder>/FashionMNIST/raw/`` or
       flat, the four files directly in ``<folder>/``: ``train-images-idx3-ubyte``,
       ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``
       (each optionally ``.gz``);
    2. Debian's package ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``;
       ``scripts/setup.sh`` installs it);
    3. only if neither holds them and ``download`` is true: torchvision downloads them into
       ``<data folder>/FashionMNIST/raw/`` (what happens in Colab), where step 1 finds them next
       time.

    ``n_train`` training images are drawn from the training split and ``n_test`` test images
    (queries and gallery) from the test split, each stratified by class and seeded
    (:func:`stratified_subset`, seeds ``split_seed`` and ``split_seed + 1``): the same
    arguments give the same images. Pixels are scaled to [0, 1], then standardised with the
    mean and std (one scalar each) of the chosen training images, as for ``digits``. There is no
    augmentation (``train_plain`` is ``train``). ``train.classes`` and ``test.classes`` hold the
    class names (:data:`FASHION_MNIST_CLASSES`).

    Parameters
    ----------
    root : str or Path, optional
        Data folder searched first (and where torchvision downloads); default :func:`data_root`.
    old_classes : str or sequence of int, optional
        Classes of the old model, in any form :func:`parse_classes` accepts. Default ``0-4``
        (T-shirt/top, Trouser, Pullover, Dress, Coat).
    n_train : int or None, default 20000
        Training images, at most 60,000; None takes them all. The default is sized for a 2-core
        CPU (an ``mlp`` trains on it in seconds).
    n_test : int or None, default 3000
        Test images (every one a query and a gallery item), at most 10,000; None takes them all.
        Evaluation cost grows with its square (every query is ranked against the whole gallery).
    split_seed : int, default 0
        Seed of both subsets.
    download : bool, default True
        Download through torchvision when no folder holds the files (needs torchvision and
        internet).

    Returns
    -------
    BackfillData
        Inputs of shape ``(1, 28, 28)``, labels ``0 .. 9``, name ``"fashion_mnist"``. ``info``
        holds the subset sizes, the seed, a fingerprint of the chosen pixels and labels (all in
        the checkpoint cache key) and the folder read (``root``, left out of the key).

    Raises
    ------
    DataNotFoundError
        If no folder holds the files and they could not be downloaded (the message says what to
        install), or a folder holds only some of the four files.
    ValueError
        If a file is truncated, not IDX, not 28×28 images of bytes, has labels outside 0..9, or
        its label file has another length than its image file (the message names the file); if
        ``n_train`` or ``n_test`` is below 1 or above the split's size; or if ``old_classes`` is
        invalid.
    TypeError
        If ``n_train`` or ``n_test`` is neither None nor an integer.
    """
    n_train = check_positive_int(n_train, "n_train", "training images", allow_none=True)
    n_test = check_positive_int(n_test, "n_test", "test images", allow_none=True)
    old = parse_classes(old_classes if old_classes is not None else range(5), 10)
    base = data_root(root)
    found = find_fashion_mnist(base)
    if found is None:
        where = (f"not in {base} (flat or FashionMNIST/raw/) nor in {DEBIAN_FASHION_MNIST}")
        if not download:
            raise DataNotFoundError(f"Fashion-MNIST is {where} (download=False): apt-get install dataset-fashion-mnist, "
                                    f"or set ${DATA_ENV} to a folder holding its four IDX files")
        try:
            found = _download_fashion_mnist(base)
        except Exception as exc:  # ImportError (no torchvision), URLError/OSError (no network), RuntimeError
            reason = " ".join(str(exc).split())  # torchvision's message spans several lines: keep ours on one
            raise DataNotFoundError(
                f"Fashion-MNIST is {where}, and torchvision could not download it ({type(exc).__name__}: {reason}): "
                f"apt-get install dataset-fashion-mnist (Debian/Ubuntu), or set ${DATA_ENV} to a folder holding its "
                f"four IDX files, or pip install torchvision on a machine with internet") from exc
    (x_all, y_all), (xt_all, yt_all) = (_read_fashion_split(*found[split]) for split in ("train", "test"))
    for arg, n, total in (("n_train", n_train, len(y_all)), ("n_test", n_test, len(yt_all))):
        if n is not None and n > total:
            raise ValueError(f"{arg}={n} is more than the {total} images of the split; use at most {total}, or None "
                             f"for all")
    tr = stratified_subset(y_all, n_train, split_seed)
    te = stratified_subset(yt_all, n_test, split_seed + 1)
    x_tr = x_all[tr].astype(np.float32)[:, None] / 255.0
    x_te = xt_all[te].astype(np.float32)[:, None] / 255.0
    mean, std = float(x_tr.mean()), float(x_tr.std())
    x_tr, x_te = (x_tr - mean) / std, (x_te - mean) / std
    # Everything that changes the items goes into ``info`` (the checkpoint cache key); the folder
    # does not (``root`` is left out of the key), so Debian's files and torchvision's share it.
    info = {"n_train": len(tr), "n_test": len(te), "split_seed": split_seed,
            "sha256": _fingerprint(x_all[tr], y_all[tr], xt_all[te], yt_all[te]), "root": str(found["folder"])}
    data = _from_arrays("fashion_mnist", x_tr, y_all[tr], x_te, yt_all[te], 10, old, info)
    data.train.classes = data.test.classes = list(FASHION_MNIST_CLASSES)
    return data


def file_fingerprint(paths, root) -> dict:
    """A fingerprint of a list of files: their paths relative to ``root``, sizes and modification times.

    Two trees with the same class names and counts but other images get different fingerprints,
    so they never share a checkpoint; the same tree moved elsewhere keeps its fingerprint (paths
    are relative), so its checkpoints are still found. Touching or replacing a file changes it.

    Parameters
    ----------
    paths : iterable of str or Path
        The files, e.g. the images of a torchvision ``ImageFolder`` (``[p for p, _ in ds.samples]``).
    root : str or Path
        The folder the paths are made relative to.

    Returns
    -------
    dict
        ``{"files": n, "sha256": hex}``: the number of files and the first 20 hexadecimal digits
        of the SHA-256 of the sorted lines ``"<relative path>\t<size>\t<mtime in ns>"``.

    Raises
    ------
    ValueError
        If a file is not under ``root``.
    FileNotFoundError
        If a file does not exist.
    """
    root = Path(root)
    lines = []
    for p in paths:
        p = Path(p)
        try:
            rel = p.relative_to(root).as_posix()
        except ValueError:
            raise ValueError(f"paths: {p} is not under root {root}") from None
        st = p.stat()
        lines.append(f"{rel}\t{st.st_size}\t{st.st_mtime_ns}")
    lines.sort()
    digest = hashlib.sha256("\n".join(lines).encode()).hexdigest()[:20]
    return {"files": len(lines), "sha256": digest}


def load_imagefolder_data(root, old_classes=None, image_size: int = 64, test_size: float = 0.2,
                          split_seed: int = 0) -> BackfillData:
    """Any ``root/<class>/<image>`` tree (torchvision ``ImageFolder``).

    If ``root`` has ``train/`` and ``test/`` (or ``val/``) sub-folders they are used as the
    splits; otherwise one tree is split, stratified and seeded. Classes are numbered in the
    sorted order of their folder names. Training images get a random resized crop (scale 0.5–1)
    and a horizontal flip; test images (and ``train_plain``) are resized to ``1.14 · image_size``
    and centre-cropped. All are normalised with the ImageNet channel mean and std. Nothing is
    downloaded. ``info`` holds a :func:`file_fingerprint` of the images (relative paths, sizes,
    modification times) under ``"files"``, so the checkpoint cache tells two trees apart.

    Parameters
    ----------
    root : str or Path
        The image tree (required; ``~`` is expanded).
    old_classes : str or sequence of int, optional
        Classes of the old model, in any form :func:`parse_classes` accepts. Default the first
        half of the classes.
    image_size : int, default 64
        Side of the square inputs.
    test_size : float, default 0.2
        Share of the images in the test split when ``root`` is one tree (ignored with
        ``train/`` and ``test/`` sub-folders).
    split_seed : int, default 0
        Seed of that split (ignored with sub-folders).

    Returns
    -------
    BackfillData
        Inputs of shape ``(3, image_size, image_size)``.

    Raises
    ------
    ValueError
        If ``root`` is None, if the ``train/`` and ``test/`` (or ``val/``) sub-folders hold
        different classes, or if ``old_classes`` is invalid.
    DataNotFoundError
        If ``root`` is not a folder.
    FileNotFoundError
        From torchvision, if a tree holds no class folders or no images.
    """
    from torchvision import datasets, transforms as T

    if root is None:
        raise ValueError("imagefolder needs root=... (a folder of class sub-folders of images)")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataNotFoundError(f"root {root} is not a folder: give the path of a root/<class>/<image> tree")
    norm = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train_tf = T.Compose([T.RandomResizedCrop(image_size, scale=(0.5, 1.0)), T.RandomHorizontalFlip(), T.ToTensor(), norm])
    test_tf = T.Compose([T.Resize(int(round(image_size * 1.14))), T.CenterCrop(image_size), T.ToTensor(), norm])
    test_dir = next((root / s for s in ("test", "val") if (root / s).is_dir()), None)
    if (root / "train").is_dir() and test_dir is not None:
        train = datasets.ImageFolder(root / "train", transform=train_tf)
        train_plain = datasets.ImageFolder(root / "train", transform=test_tf)
        test = datasets.ImageFolder(test_dir, transform=test_tf)
        if test.classes != train.classes:
            raise ValueError(f"root: {test_dir.name}/ and train/ must have the same class folders")
        y_train, y_test = np.asarray(train.targets), np.asarray(test.targets)
        files = [p for p, _ in train.samples] + [p for p, _ in test.samples]
    else:
        full = datasets.ImageFolder(root, transform=train_tf)
        plain = datasets.ImageFolder(root, transform=test_tf)
        y = np.asarray(full.targets)
        tr, te = _stratified_split(y, test_size, split_seed)
        train, train_plain, test = Subset(full, tr.tolist()), Subset(plain, tr.tolist()), Subset(plain, te.tolist())
        y_train, y_test = y[tr], y[te]
        train.classes = full.classes
        files = [p for p, _ in full.samples]
    n_classes = len(train.classes)
    old = parse_classes(old_classes if old_classes is not None else range(n_classes // 2), n_classes)
    # Everything that changes what a model is trained on belongs in ``info`` (the checkpoint cache
    # key is built from it): image_size, the split, and the files themselves (class names and
    # counts alone do not tell two trees apart). The root is kept for messages but left out of
    # the key, so moved data still find their checkpoints.
    info = {"root": str(root), "classes": list(train.classes), "image_size": image_size,
            "split": "folders" if test_dir is not None and (root / "train").is_dir() else
                     {"test_size": test_size, "split_seed": split_seed},
            "n_test": int(len(y_test)), "files": file_fingerprint(files, root)}
    return BackfillData("imagefolder", train, train_plain, test, y_train, y_test, n_classes, old,
                        (3, image_size, image_size), info)


def load_dataset(name: str = "digits", old_classes=None, root=None, **kwargs) -> BackfillData:
    """Load a dataset by name: ``digits`` (default), ``fashion_mnist``, ``synthetic``, ``cifar100`` or ``imagefolder``.

    Parameters
    ----------
    name : {"digits", "fashion_mnist", "synthetic", "cifar100", "imagefolder"}, default "digits"
        Which dataset; each is loaded by its own function (:func:`load_digits_data`,
        :func:`load_fashion_mnist_data`, :func:`load_synthetic_data`, :func:`load_cifar100_data`,
        :func:`load_imagefolder_data`).
    old_classes : str or sequence of int, optional
        Classes the old model sees, e.g. ``"0-4"``; default the first half.
    root : str or Path, optional
        Data folder for ``fashion_mnist`` and ``cifar100`` (default ``$BACKFILL_DATA``) and
        ``imagefolder`` (required); ignored by ``digits`` and ``synthetic``.
    **kwargs
        Passed to the loader (``split_seed``, ``test_size``, ``n_train``, ``n_test``, ``download``,
        ``image_size``, ...).

    Returns
    -------
    BackfillData
        Training, un-augmented training and test splits, labels and the old classes.

    Raises
    ------
    ValueError
        If ``name`` is not one of the five datasets, or the loader rejects an argument (or, for
        ``fashion_mnist``, a file).
    DataNotFoundError
        If the data of ``fashion_mnist``, ``cifar100`` or ``imagefolder`` are not on disk and
        cannot be downloaded.

    Examples
    --------
    >>> data = load_dataset("digits")
    >>> data.num_classes, data.old_classes, data.input_shape
    (10, (0, 1, 2, 3, 4), (1, 8, 8))
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    if name == "digits":
        return load_digits_data(old_classes, **kwargs)
    if name == "fashion_mnist":
        return load_fashion_mnist_data(root, old_classes, **kwargs)
    if name == "synthetic":
        return load_synthetic_data(old_classes, **kwargs)
    if name == "cifar100":
        return load_cifar100_data(root, old_classes, **kwargs)
    return load_imagefolder_data(root, old_classes, **kwargs)
