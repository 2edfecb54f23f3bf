"""Small helpers shared by the unit tests of the library core (imported by name, not via conftest,
so that another ``conftest.py`` elsewhere under tests/ cannot shadow them)."""

from __future__ import annotations

import numpy as np


def unit(x) -> np.ndarray:
    """Rows scaled to unit length (float32, like model embeddings)."""
    x = np.asarray(x, dtype=np.float64)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
