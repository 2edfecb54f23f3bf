"""Shared fixtures. Every test runs offline, in temporary folders, on the CPU."""

from __future__ import annotations

import os
import socket

import matplotlib
import numpy as np
import pytest
from hypothesis import HealthCheck, settings

from core_helpers import unit

matplotlib.use("Agg")

# Faiss and torch results are deterministic here, but the first call of either can be slow
# on a loaded 2-core machine: no per-example deadline.
settings.register_profile("backfill", deadline=None, max_examples=60,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "backfill"))


@pytest.fixture(autouse=True)
def _offline_and_isolated(monkeypatch, tmp_path_factory):
    """No test may touch the network or the user's caches.

    Opening an internet socket fails loudly (a download attempt is a bug in the test or the
    library), and the data and checkpoint folders point into a temporary folder.
    """
    real_connect = socket.socket.connect

    def guarded_connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            raise AssertionError(f"a test tried to open a network connection to {address}")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    monkeypatch.setenv("BACKFILL_DATA", str(tmp_path_factory.mktemp("data")))
    monkeypatch.setenv("BACKFILL_CACHE", str(tmp_path_factory.mktemp("checkpoints")))


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture
def embeddings(rng):
    """Old and new unit embeddings of one small labelled gallery (old: d=6, new: d=8)."""
    n, n_classes = 60, 4
    labels = np.repeat(np.arange(n_classes), n // n_classes)
    centres_old, centres_new = rng.normal(size=(n_classes, 6)), rng.normal(size=(n_classes, 8))
    old = unit(centres_old[labels] + 1.2 * rng.normal(size=(n, 6)))
    new = unit(centres_new[labels] + 0.6 * rng.normal(size=(n, 8)))
    return old, new, labels
