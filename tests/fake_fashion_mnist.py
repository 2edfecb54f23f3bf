"""Write a tiny Fashion-MNIST in the real on-disk format: four IDX files, gzipped or plain.

An IDX file is a magic number (two zero bytes, a type code, the number of dimensions), each
dimension as a big-endian 32-bit integer, then the values in C order. Images are ``(n, 28, 28)``
bytes (magic ``0x00000803``), labels ``(n,)`` bytes (magic ``0x00000801``). Written here with
``struct`` and numpy, independently of the library's reader.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

#: IDX type codes of the dtypes these helpers write.
TYPE_CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(np.int16): 0x0B,
              np.dtype(np.int32): 0x0C, np.dtype(np.float32): 0x0D, np.dtype(np.float64): 0x0E}

NAMES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def idx_bytes(array) -> bytes:
    """The IDX encoding of ``array`` (any dtype of :data:`TYPE_CODES`)."""
    array = np.asarray(array)
    header = bytes([0, 0, TYPE_CODES[array.dtype], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_bytes(path, payload: bytes, gz: bool) -> Path:
    """Write ``payload`` to ``path`` (``path.gz``, gzipped, when ``gz``); return the path written."""
    path = Path(str(path) + ".gz") if gz else Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(payload, mtime=0) if gz else payload)
    return path


def fake_split(n: int, rng: np.random.Generator, num_classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """``n`` random 28×28 byte images whose mean brightness grows with the class, labels in a fixed cycle."""
    labels = (np.arange(n) % num_classes).astype(np.uint8)
    rng.shuffle(labels)
    noise = rng.integers(0, 100, size=(n, 28, 28))
    images = np.clip(noise + 15 * labels[:, None, None].astype(int), 0, 255).astype(np.uint8)
    return images, labels


def write_fake_fashion_mnist(folder, n_train: int = 200, n_test: int = 100, gz: bool = True,
                             layout: str = "flat", seed: int = 0) -> dict:
    """Write the four files under ``folder`` (``layout="flat"``) or ``folder/FashionMNIST/raw``.

    Returns ``{"train": (images, labels), "test": (images, labels), "folder": Path,
    "paths": {file name: path written}}``.
    """
    folder = Path(folder)
    target = folder / "FashionMNIST" / "raw" if layout == "torchvision" else folder
    rng = np.random.default_rng(seed)
    out: dict = {"folder": target, "paths": {}}
    for split, n in (("train", n_train), ("test", n_test)):
        images, labels = fake_split(n, rng)
        out[split] = (images, labels)
        for name, array in zip(NAMES[split], (images, labels)):
            out["paths"][name] = write_bytes(target / name, idx_bytes(array), gz)
    return out
