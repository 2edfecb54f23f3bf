"""The backfill job: re-embed the items still stored old, batch by batch, into a live index.

The job takes the ids still stored old in a backfill order ``π`` (random with a seed, or any
order of :func:`backfill_lib.backfill.backfill_order`'s policies), embeds each batch with the new
model (and ``ρ``) through a function you give it, and writes the batch with ``index.backfill``.
It works with :class:`~backfill_lib.live_index.OnlineBackfillIndex` and
:class:`~backfill_lib.qdrant_index.QdrantBackfillIndex` (anything with ``old_ids()``,
``backfill(ids, vectors)`` and ``progress``).

Resuming. The index is the record of what is done: an item stored new is never written again.
The job keeps a small state file (JSON, replaced atomically) with its position in the order, and
the order itself beside it (``<state_path>.order.npy``), so a job killed at 40 % picks up where
it stopped, in the same order. An in-memory faiss index is lost with the process, so the job
saves it to ``checkpoint_path`` (crash-safe, :meth:`~backfill_lib.live_index.OnlineBackfillIndex.save`) before it moves
its position forward; reload it from there before resuming. A Qdrant collection is durable by
itself.

At a billion items the embedding is a batch-inference pipeline: :func:`run_backfill_ray` runs the
same job with the model held by Ray Data actors (``map_batches``), the writes staying in one
process.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from .backfill import backfill_order
from .live_index import _atomic_write
from .validation import check_no_repeats

STATE_VERSION = 1


@dataclass(frozen=True)
class BackfillRun:
    """What one run of the job did. Each parameter is kept as an attribute of the same name.

    Parameters
    ----------
    written : int
        Items this run embedded and wrote to the index.
    skipped : int
        Items of the remaining order that were no longer stored old (already written, e.g. by a
        checkpoint saved just before a crash, or removed meanwhile).
    remaining : int
        Items of the order still stored old when the run stopped (0 when the backfill is done).
    seconds : float
        Wall-clock time of the run.
    progress : float
        ``index.progress`` at the end of the run.
    """

    written: int
    skipped: int
    remaining: int
    seconds: float
    progress: float


def _order_digest(order: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(order, dtype=np.int64).tobytes()).hexdigest()


def _check_positive(name: str, value, allow_none: bool = False, integer: bool = True):
    if value is None and allow_none:
        return None
    kinds = (int, np.integer) if integer else (int, float, np.integer, np.floating)
    if isinstance(value, bool) or not isinstance(value, kinds) or not value > 0:
        kind = "integer" if integer else "number"
        raise ValueError(f"{name} must be a positive {kind}{' or None' if allow_none else ''}, got {value!r}")
    return value


def _plan(index, state_path: str, order, seed: int):
    """The order and the position reached: from the state file, or a new plan written to it."""
    order_path = state_path + ".order.npy"
    if os.path.exists(state_path):
        try:
            with open(state_path) as f:
                state = json.load(f)
            saved = np.load(order_path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise ValueError(f"{state_path!r} (with {order_path!r}) is not a backfill job state: {exc}; "
                             "delete both to start the job again") from None
        if state.get("version") != STATE_VERSION or state.get("order_sha256") != _order_digest(saved):
            raise ValueError(f"{state_path!r} does not match its order file {order_path!r}; delete both to start again")
        if order is not None and _order_digest(np.asarray(order)) != state["order_sha256"]:
            raise ValueError(f"{state_path!r} belongs to a job with another order: resume with the same order "
                             "(or order=None), or delete the state file to start a new job")
        return saved, int(state["cursor"])
    old = index.old_ids()
    if order is None:
        order = old[backfill_order(len(old), seed)] if len(old) else old
    else:
        order = np.asarray(order)
        if order.ndim != 1 or (order.size and not np.issubdtype(order.dtype, np.integer)):
            raise ValueError(f"order must be a 1-D array of item ids, got shape {order.shape} and dtype {order.dtype}")
        order = order.astype(np.int64)
        check_no_repeats(order, "order", "each item is backfilled once")
        missing = np.setdiff1d(old, order)
        if len(missing):
            raise ValueError(f"order misses {len(missing)} item(s) stored old, e.g. {missing[:5].tolist()}: it must "
                             "hold every item still to backfill (e.g. ids[backfill_order(len(ids), seed, policy)])")
    _atomic_write(order_path, lambda f: np.save(f, order))
    _write_state(state_path, order, 0)
    return order, 0


def _write_state(state_path: str, order: np.ndarray, cursor: int, **extra) -> None:
    state = {"version": STATE_VERSION, "n_order": int(len(order)), "cursor": int(cursor),
             "order_sha256": _order_digest(order), **extra}
    _atomic_write(state_path, lambda f: f.write(json.dumps(state, indent=1).encode()))


def _prepare(index, state_path, order, seed, batch_size, rate_limit, checkpoint_every):
    for attr in ("old_ids", "backfill"):
        if not callable(getattr(index, attr, None)):
            raise TypeError(f"index must be an OnlineBackfillIndex or a QdrantBackfillIndex (it needs {attr}()), "
                            f"got {type(index).__name__}")
    _check_positive("batch_size", batch_size)
    _check_positive("rate_limit", rate_limit, allow_none=True, integer=False)
    _check_positive("checkpoint_every", checkpoint_every)
    state_path = os.fspath(state_path)
    order, cursor = _plan(index, state_path, order, seed)
    rest = order[cursor:]
    still_old = np.isin(rest, index.old_ids())
    return state_path, order, cursor, rest[still_old], cursor + np.nonzero(still_old)[0], int((~still_old).sum())


def _write_batches(index, batches, todo, positions, state_path, order, cursor, skipped, batch_size, rate_limit,
                   checkpoint_path, checkpoint_every, max_items, show_progress) -> BackfillRun:
    """The writing half of the job: ``batches`` yields ``(ids, vectors)`` following ``todo``."""
    start = time.perf_counter()
    written, since_checkpoint = 0, 0
    bar = tqdm(total=len(order), initial=len(order) - len(todo), unit="item", desc="backfill", disable=not show_progress)

    def commit(n_done: int) -> None:
        # The index first, then the position: the position is never ahead of what is durable.
        if checkpoint_path is not None:
            index.save(checkpoint_path)
        reached = int(positions[n_done - 1]) + 1
        _write_state(state_path, order, reached)

    try:
        for ids, vectors in batches:
            ids = np.asarray(ids, dtype=np.int64)
            expected = todo[written:written + len(ids)]
            if not np.array_equal(ids, expected):
                raise RuntimeError("the embedding step returned the batches out of order; "
                                   "keep the order of the ids (Ray Data: preserve_order)")
            index.backfill(ids, vectors)
            written += len(ids)
            since_checkpoint += 1
            bar.update(len(ids))
            if since_checkpoint >= checkpoint_every or written == len(todo):
                commit(written)
                since_checkpoint = 0
            if rate_limit is not None:
                time.sleep(max(0.0, start + written / rate_limit - time.perf_counter()))
            if max_items is not None and written >= max_items:
                break
        if since_checkpoint:
            commit(written)
    finally:
        bar.close()
    return BackfillRun(written=written, skipped=skipped, remaining=len(todo) - written,
                       seconds=time.perf_counter() - start, progress=float(index.progress))


def run_backfill(index, embed, state_path, order=None, seed: int = 0, batch_size: int = 256,
                 rate_limit: float | None = None, checkpoint_path=None, checkpoint_every: int = 1,
                 max_items: int | None = None, show_progress: bool = True) -> BackfillRun:
    """Backfill every item still stored old, in order, in batches; resumable after a crash.

    Parameters
    ----------
    index : OnlineBackfillIndex or QdrantBackfillIndex
        The live index to write into (searches may run meanwhile).
    embed : callable
        ``embed(ids) -> new_vectors``: the new model (and ``ρ̂``) applied to the items ``ids``,
        returning ``(len(ids), dim_new)`` unit-norm rows.
    state_path : str or os.PathLike
        The job's state file (JSON; the order goes beside it as ``<state_path>.order.npy``).
        If it exists, the job resumes from it; delete it (and the order file) to start afresh.
    order : array of ids, optional
        The backfill order ``π`` as item ids, e.g. ``ids[backfill_order(len(ids), seed,
        "uncertain_first", uncertainty=u)]``; it must hold every item stored old (ids already
        new are skipped). Default: the ids stored old in a random order drawn with ``seed``.
    seed : int, default 0
        Seed of the default random order.
    batch_size : int, default 256
        Items embedded and written at once (one ``index.backfill`` call each).
    rate_limit : float, optional
        At most this many items per second (to share a GPU with the service); default no limit.
    checkpoint_path : str or os.PathLike, optional
        For an in-memory :class:`~backfill_lib.live_index.OnlineBackfillIndex`: saved here
        (crash-safely) before the job records a position, so a resumed job starts from
        ``OnlineBackfillIndex.load(checkpoint_path)``. Leave ``None`` for Qdrant.
    checkpoint_every : int, default 1
        Save the checkpoint and the position every this many batches (and at the end).
    max_items : int, optional
        Stop after writing about this many items (whole batches); the job can be resumed.
    show_progress : bool, default True
        Show a tqdm progress bar.

    Returns
    -------
    BackfillRun
        Items written and skipped, items left, time taken and the index's progress.

    Raises
    ------
    TypeError
        If ``index`` lacks ``old_ids``/``backfill``.
    ValueError
        If ``batch_size``, ``rate_limit``, ``checkpoint_every`` or ``max_items`` is not
        positive, ``order`` repeats an id or misses an item stored old, the state file is
        damaged or belongs to another order, or ``embed`` returns wrong vectors (the batch is
        then not written).

    Examples
    --------
    >>> from backfill_lib.live_index import OnlineBackfillIndex
    >>> import tempfile, os
    >>> index = OnlineBackfillIndex(2, 2)
    >>> index.add_old([1, 2, 3], [[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    >>> state = os.path.join(tempfile.mkdtemp(), "job.json")
    >>> run = run_backfill(index, lambda ids: [[1.0, 0.0]] * len(ids), state, batch_size=2, show_progress=False)
    >>> run.written, index.progress
    (3, 1.0)
    """
    _check_positive("max_items", max_items, allow_none=True)
    state_path, order, cursor, todo, positions, skipped = _prepare(
        index, state_path, order, seed, batch_size, rate_limit, checkpoint_every)
    batches = ((todo[i:i + batch_size], embed(todo[i:i + batch_size])) for i in range(0, len(todo), batch_size))
    return _write_batches(index, batches, todo, positions, state_path, order, cursor, skipped, batch_size,
                          rate_limit, checkpoint_path, checkpoint_every, max_items, show_progress)


class _RayEmbedder:
    """A Ray Data actor: builds the user's embedder once (the model), then embeds batches."""

    def __init__(self, make_embedder):
        self.embed = make_embedder()

    def __call__(self, batch: dict) -> dict:
        return {"id": batch["id"], "vector": np.asarray(self.embed(batch["id"]), dtype=np.float32)}


def run_backfill_ray(index, make_embedder, state_path, order=None, seed: int = 0, batch_size: int = 256,
                     concurrency: int = 1, num_gpus: float = 0, rate_limit: float | None = None,
                     checkpoint_path=None, checkpoint_every: int = 1, show_progress: bool = True) -> BackfillRun:
    """:func:`run_backfill` with the embedding on Ray Data: ``map_batches`` over model-holding actors.

    Each of ``concurrency`` actors calls ``make_embedder()`` once (loading the new model) and then
    embeds batches of ids; the driver writes the results to the index in order, with the same
    state file, checkpoints and rate limit as :func:`run_backfill`. Ray must be initialised
    (``ray.init()``; on a cluster, ``ray.init(address="auto")``). Needs ``ray[data]``.

    Parameters
    ----------
    index : OnlineBackfillIndex or QdrantBackfillIndex
        The live index to write into.
    make_embedder : callable
        ``make_embedder() -> embed``, with ``embed(ids) -> new_vectors`` as in
        :func:`run_backfill`; it runs inside each actor, so it must be picklable (a module-level
        function or class).
    state_path : str or os.PathLike
        The job's state file, as in :func:`run_backfill`.
    order : array of ids, optional
        The backfill order, as in :func:`run_backfill`.
    seed : int, default 0
        Seed of the default random order.
    batch_size : int, default 256
        Items per ``map_batches`` batch and per write.
    concurrency : int, default 1
        Number of embedding actors.
    num_gpus : float, default 0
        GPUs per actor.
    rate_limit : float, optional
        At most this many items written per second.
    checkpoint_path : str or os.PathLike, optional
        Where an in-memory index is saved before a position is recorded.
    checkpoint_every : int, default 1
        Save the checkpoint and the position every this many batches.
    show_progress : bool, default True
        Show a tqdm progress bar.

    Returns
    -------
    BackfillRun
        As :func:`run_backfill`.

    Raises
    ------
    ImportError
        If ``ray[data]`` is not installed.
    TypeError
        If ``index`` lacks ``old_ids``/``backfill``.
    ValueError
        As :func:`run_backfill`, and if ``concurrency`` is not positive.
    """
    try:
        import ray
        import ray.data
    except ImportError:
        raise ImportError("run_backfill_ray needs Ray Data, an optional dependency: "
                          "pip install 'backfill_lib[ray]' (or pip install 'ray[data]')") from None
    _check_positive("concurrency", concurrency)
    state_path, order, cursor, todo, positions, skipped = _prepare(
        index, state_path, order, seed, batch_size, rate_limit, checkpoint_every)
    if not len(todo):
        return _write_batches(index, iter(()), todo, positions, state_path, order, cursor, skipped, batch_size,
                              rate_limit, checkpoint_path, checkpoint_every, None, show_progress)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # the state file records a position in the order
    ds = ray.data.from_numpy(todo).rename_columns({"data": "id"})
    ds = ds.map_batches(_RayEmbedder, fn_constructor_args=(make_embedder,), batch_size=batch_size,
                        batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=concurrency),
                        num_gpus=num_gpus)
    batches = ((b["id"], b["vector"]) for b in ds.iter_batches(batch_size=batch_size, batch_format="numpy"))
    return _write_batches(index, batches, todo, positions, state_path, order, cursor, skipped, batch_size,
                          rate_limit, checkpoint_path, checkpoint_every, None, show_progress)
