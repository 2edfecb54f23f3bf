"""The readers-writer lock of the live indices (:class:`~backfill_lib.live_index.OnlineBackfillIndex`
and :class:`~backfill_lib.qdrant_index.QdrantBackfillIndex`).

Searches (and saves) are readers, every write (add, backfill, remove, training, search
parameters, compaction) is a writer: a search sees each item exactly once, in the part it is
stored in before or after a batch, never both or neither.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager


class _RWLock:
    """Many readers or one writer; a waiting writer blocks new readers (no writer starvation)."""

    def __init__(self):
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextmanager
    def read(self):
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def write(self):
        with self._cond:
            self._writers_waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()
