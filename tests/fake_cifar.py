"""Write a tiny CIFAR-100 in the on-disk format torchvision reads (``cifar-100-python/``).

The real files are Python 2 pickles of dicts. Their keys are Python 2 ``str`` objects, which a
Python 3 reader sees as ``b'data'`` with ``encoding="bytes"`` (as on the CIFAR web page) and as
``'data'`` with ``encoding="latin1"`` (as torchvision reads them). A Python 3 pickle of ``bytes``
keys would stay bytes under both readings, so we write the keys with the Python 2 string opcodes
(``SHORT_BINSTRING``/``BINSTRING``) to get the same two readings as the real files.
"""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np

BASE_FOLDER = "cifar-100-python"


class Py2Str(bytes):
    """A byte string pickled the way Python 2 pickled ``str``."""


class _Py2Pickler(pickle._Pickler):  # the pure-Python pickler lets us add one opcode writer
    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2str(self, obj):
        raw = bytes(obj)
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)
        self.memoize(obj)

    dispatch[Py2Str] = save_py2str


def _dump(obj, path: Path) -> None:
    with open(path, "wb") as f:
        _Py2Pickler(f, protocol=2).dump(obj)


def _split(n: int, rng: np.random.Generator, num_classes: int) -> dict:
    fine = np.arange(n) % num_classes  # every class present, in a fixed pattern
    return {
        Py2Str(b"data"): rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
        Py2Str(b"fine_labels"): fine.tolist(),
        Py2Str(b"coarse_labels"): (fine // 5).tolist(),
        Py2Str(b"filenames"): [Py2Str(f"img_{i}.png".encode()) for i in range(n)],
    }


def write_fake_cifar100(root, n_train: int = 200, n_test: int = 100, seed: int = 0) -> dict:
    """Write ``root/cifar-100-python/{train,test,meta}`` with random images and all 100 classes.

    Returns the written train and test dicts with ``str`` keys (for comparisons in tests).
    """
    rng = np.random.default_rng(seed)
    folder = Path(root) / BASE_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, n in (("train", n_train), ("test", n_test)):
        split = _split(n, rng, 100)
        _dump(split, folder / name)
        out[name] = {k.decode(): v for k, v in split.items()}
    meta = {Py2Str(b"fine_label_names"): [Py2Str(f"class_{i}".encode()) for i in range(100)],
            Py2Str(b"coarse_label_names"): [Py2Str(f"super_{i}".encode()) for i in range(20)]}
    _dump(meta, folder / "meta")
    return out
