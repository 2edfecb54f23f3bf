"""The backfill job: re-embed the items still stored old, batch by batch, into a live index.

The job takes the ids still stored old in a backfill order ``π`` (random with a seed, or any
order of :func:`backfill_lib.backfill.backfill_order`'s policies), embeds each batch with the new
model (and ``ρ``) through a function you give it, and writes the batch with ``index.backfill``.
It works with :class:`~backfill_lib.live_index.OnlineBackfillIndex` and
:class:`~backfill_lib.qdrant_index.QdrantBackfillIndex` (anything with ``old_ids()``,
``backfill(ids, vectors)`` and ``progress``; ``save(path)`` too for a ``checkpoint_path``).

Resuming. The index is the record of what is done: an item stored new is never written again.
The job keeps a small state file (JSON, replaced atomically) with its plan and its position in
it, and the plan's order beside it (``<state_path>.order.npy``), so a job killed at 40 % picks
up where it stopped, in the same order. An in-memory faiss index is lost with the process, so
the job saves it to ``checkpoint_path`` (crash-safe,
:meth:`~backfill_lib.live_index.OnlineBackfillIndex.save`) before it moves its position
forward; reload it from there before resuming. A Qdrant collection is durable by itself.

What the job guarantees. Whatever the state file says, the items a run writes are exactly the
items of the plan still stored old in the index, in the plan's order; the saved position (the
``cursor``) is only a record of how far earlier runs got. So:

* ``BackfillRun.remaining`` is counted in the index at the end of the run: it is 0 only if no
  item of the plan is stored old. A job resumed on an index older than its position (a
  checkpoint from before, an index rebuilt from scratch) writes the items before the position
  again too, with a ``RuntimeWarning``.
* On every start the job checks that the plan covers every item stored old (and warns at the
  end of a run if items were added old during it). An item stored old
  that the plan does not cover (added with ``add_old`` after the plan was made, or a state file
  from another index) is refused with a ``ValueError``: delete the state file and its order file
  to plan again over every item stored old (items already stored new are not written again);
  items that arrive during a backfill belong in the new part (``index.add``).
* The state file holds a fingerprint of its job: a random job id, the index's kind
  (class name), ``dim_old`` and ``dim_new`` (and the collection name of a Qdrant index), and
  the length and SHA-256 digest of the plan's order (which the order file must match). A state
  file of another index kind, other dimensions, another collection or another order is
  refused, and so is a state file of the wrong shape (not a JSON object, a key missing, a
  position that is not an integer in ``[0, len(order)]``, an order file that is not a 1-D
  integer array). (A plan of another index of the same kind and dimensions whose items stored
  old are all in the plan cannot be told apart; it is accepted, and the job backfills exactly
  those items.)
* One job at a time: a run holds an OS file lock (``fcntl.flock``) on ``<state_path>.lock``
  (and on ``<checkpoint_path>.lock``) from its first check to its return; a second job on the
  same state file or checkpoint is refused with "another backfill job is running on ...". The
  OS releases the lock when the process ends, even by ``SIGKILL``; the lock files stay on
  disk, empty of meaning (keep the state file on a local file system, where ``flock`` holds).
* Before any work the job refuses paths that would overwrite each other (``state_path``, the
  order file, the lock files and ``checkpoint_path``, compared after resolving ``..`` and
  symbolic links; the order and lock files go beside the resolved state file), and a
  ``checkpoint_path`` for an index that cannot ``save`` (Qdrant).
* A batch is written only if ``embed`` returned one finite unit-norm row of ``dim_new`` per id;
  otherwise the run stops with a ``ValueError`` and nothing of that batch is written. Whatever
  stops a run (an exception, a kill), the position is never ahead of what the index (or its
  checkpoint) holds, and a resumed run writes each item of the plan still stored old exactly
  once. An item of the plan removed from the index during a run is skipped.

Pausing and watching. ``run_backfill(..., stop_when=f)`` asks ``f()`` at every batch boundary
(after the commit of the previous batch, before the next is embedded) and stops cleanly when it
returns True (``BackfillRun.stopped``); running the job again resumes it. Every record of the
position also records the job's bookkeeping in the state file: its status (running, paused,
finished, stopped at ``max_items``, failed), items written and seconds taken by all runs, the
last run's rate and the items left. :func:`job_status` reads it without opening the index (so
it answers while the job runs, even on a Qdrant local storage the job holds) and tells a job
killed mid-run (its lock is free) from one that runs; :func:`job_running` asks the lock alone.
``backfill status`` and ``backfill pause`` (:mod:`backfill_lib.cli`) are built on them.

At a billion items the embedding is a batch-inference pipeline: :func:`run_backfill_ray` runs the
same job with the model held by Ray Data actors (``map_batches``), the writes staying in one
process.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
import uuid
import warnings
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from .backfill import backfill_order
from .live_index import _atomic_write
from .validation import as_embeddings, check_no_repeats, check_path, check_seed

try:  # POSIX
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None
    import msvcrt

STATE_VERSION = 2


@dataclass(frozen=True)
class BackfillRun:
    """What one run of the job did. Each parameter is kept as an attribute of the same name.

    Parameters
    ----------
    written : int
        Items this run embedded and wrote to the index.
    skipped : int
        Items of the order from the saved position on that were no longer stored old (already
        written, e.g. by a checkpoint saved just before a crash, or removed meanwhile).
    remaining : int
        Items of the order still stored old in the index when the run stopped (0 when the
        backfill is done), counted in the index.
    seconds : float
        Wall-clock time of the run.
    progress : float
        ``index.progress`` at the end of the run.
    stopped : bool, default False
        True when ``stop_when`` stopped the run at a batch boundary before its plan was done
        (a pause: resume it later).
    """

    written: int
    skipped: int
    remaining: int
    seconds: float
    progress: float
    stopped: bool = False


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


# ---- paths and the lock --------------------------------------------------------------------------

@dataclass(frozen=True)
class _Paths:
    state: str
    order: str
    lock: str
    checkpoint: str | None
    checkpoint_lock: str | None


def _job_paths(state_path, checkpoint_path) -> _Paths:
    """The job's files, resolved; refuse two that are one file, or a place a file cannot go."""
    # Resolved (``..`` and symbolic links), so that every spelling of one state file shares one
    # order file and one lock.
    state = os.path.realpath(check_path(state_path, "state_path"))
    checkpoint = None if checkpoint_path is None else os.path.realpath(check_path(checkpoint_path, "checkpoint_path"))
    paths = _Paths(state, state + ".order.npy", state + ".lock", checkpoint,
                   None if checkpoint is None else checkpoint + ".lock")
    named = [("state_path", paths.state), ("the order file (state_path + '.order.npy')", paths.order),
             ("the lock file (state_path + '.lock')", paths.lock)]
    if checkpoint is not None:
        named += [("checkpoint_path", paths.checkpoint),
                  ("the checkpoint's lock file (checkpoint_path + '.lock')", paths.checkpoint_lock)]
    for i, (name_a, a) in enumerate(named):
        for name_b, b in named[i + 1:]:
            same = a == b
            if not same and os.path.exists(a) and os.path.exists(b):
                same = os.path.samefile(a, b)  # hard links
            if same:
                raise ValueError(f"{name_a} and {name_b} are the same file ({a!r}): the job would overwrite one "
                                 "with the other; give checkpoint_path and state_path different files")
    for name, path in (("state_path", paths.state), ("checkpoint_path", paths.checkpoint)):
        if path is None:
            continue
        if os.path.isdir(path):
            raise ValueError(f"{name} {path!r} is a directory: give a file path inside it, e.g. "
                             f"{os.path.join(path, 'job.json' if name == 'state_path' else 'index.obi')!r}")
        if not os.path.isdir(os.path.dirname(path)):
            raise ValueError(f"the directory of {name} {path!r} does not exist: create it first")
    return paths


def _lock_message(lock_path: str, what: str) -> str:
    try:
        with open(lock_path) as f:
            holder = f.read(200).strip()
    except OSError:
        holder = ""
    return (f"another backfill job is running on {what} (it holds the lock {lock_path!r}"
            f"{f', {holder}' if holder else ''}): two jobs on one state file or checkpoint overwrite each "
            "other's position and index; wait for that job to end (or stop it) and run this one again")


@contextlib.contextmanager
def _file_lock(lock_path: str, what: str):
    """Hold an OS lock on ``lock_path`` (released by the OS if the process dies)."""
    for _ in range(10):
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            else:  # pragma: no cover - Windows
                msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            os.close(fd)
            raise RuntimeError(_lock_message(lock_path, what)) from None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(lock_path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the lock file was deleted or replaced meanwhile: lock the one at the path now
    else:  # pragma: no cover - a lock file replaced ten times in a row
        raise RuntimeError(f"could not lock {lock_path!r}: it keeps being replaced")
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}\n".encode())
        yield
    finally:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


@contextlib.contextmanager
def _job_locks(paths: _Paths):
    with _file_lock(paths.lock, f"the state file {paths.state!r}"):
        if paths.checkpoint is None:
            yield
        else:
            with _file_lock(paths.checkpoint_lock, f"the checkpoint {paths.checkpoint!r}"):
                yield


# ---- the plan ------------------------------------------------------------------------------------

def _index_fingerprint(index) -> dict:
    """What identifies the index a plan was made on (kept in the state file)."""
    fp = {"kind": type(index).__name__}
    for attr in ("dim_old", "dim_new"):
        value = getattr(index, attr, None)
        fp[attr] = int(value) if isinstance(value, (int, np.integer)) and not isinstance(value, bool) else None
    collection = getattr(index, "collection", None)
    if isinstance(collection, str):
        fp["collection"] = collection
    return fp


def _describe(fp: dict) -> str:
    where = f", collection {fp['collection']!r}" if "collection" in fp else ""
    return f"{fp.get('kind')} (dim_old {fp.get('dim_old')}, dim_new {fp.get('dim_new')}{where})"


def _ids_order(order) -> np.ndarray:
    """A given order as int64 ids, or a clear error (no wrap-around of uint64, no floats)."""
    arr = np.asarray(order)
    if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"order must be a 1-D array of integer item ids, got shape {arr.shape} and dtype "
                         f"{arr.dtype}: e.g. ids[backfill_order(len(ids), seed, policy)]")
    if arr.size and np.issubdtype(arr.dtype, np.unsignedinteger) and arr.max() > np.iinfo(np.int64).max:
        raise ValueError(f"order holds ids above {np.iinfo(np.int64).max} (e.g. {int(arr.max())}): item ids are "
                         "int64 in the index; give the ids the index stores")
    arr = arr.astype(np.int64)
    if arr.size and arr.min() < 0:
        raise ValueError(f"order holds negative ids, e.g. {arr[arr < 0][:5].tolist()}: item ids are non-negative; "
                         "give the ids the index stores (not positions counted from the end)")
    check_no_repeats(arr, "order", "each item is backfilled once")
    return arr


def _redo(paths: _Paths) -> str:
    return (f"delete {paths.state!r} and {paths.order!r} to plan the job again over every item stored old "
            "(items already stored new are not written again)")


def _read_state(paths: _Paths, index):
    """The saved order and position, checked against each other and against ``index``."""
    try:
        with open(paths.state, "rb") as f:
            state = json.loads(f.read().decode())
        saved = np.load(paths.order, allow_pickle=False)
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{paths.state!r} (with {paths.order!r}) is not a backfill job state: {exc}; "
                         f"{_redo(paths)}") from None
    damaged = f"{paths.state!r} is not a backfill job state"
    if not isinstance(state, dict):
        raise ValueError(f"{damaged}: it holds a JSON {type(state).__name__}, not an object; {_redo(paths)}")
    if state.get("version") != STATE_VERSION:
        raise ValueError(f"{paths.state!r} was written by another version of the backfill job (state version "
                         f"{state.get('version')!r}, this one reads {STATE_VERSION}); {_redo(paths)}")
    kinds = {"job_id": str, "index": dict, "n_order": int, "cursor": int, "order_sha256": str}
    for key, kind in kinds.items():
        if key not in state:
            raise ValueError(f"{damaged}: the key {key!r} is missing; {_redo(paths)}")
        if isinstance(state[key], bool) or not isinstance(state[key], kind):
            raise ValueError(f"{damaged}: {key!r} must be a JSON {kind.__name__}, got {state[key]!r}; "
                             f"{_redo(paths)}")
    if not isinstance(saved, np.ndarray) or saved.ndim != 1 or (saved.size and not np.issubdtype(saved.dtype,
                                                                                                  np.integer)):
        raise ValueError(f"{paths.order!r} is not a backfill order (a 1-D array of integer ids), got shape "
                         f"{getattr(saved, 'shape', None)} and dtype {getattr(saved, 'dtype', None)}; {_redo(paths)}")
    if len(saved) != state["n_order"] or _order_digest(saved) != state["order_sha256"]:
        raise ValueError(f"{paths.state!r} does not match its order file {paths.order!r} (another plan's order); "
                         f"{_redo(paths)}")
    if not 0 <= state["cursor"] <= len(saved):
        raise ValueError(f"{damaged}: its position 'cursor' is {state['cursor']}, outside [0, {len(saved)}] "
                         f"(the length of the order); {_redo(paths)}")
    here = _index_fingerprint(index)
    if state["index"] != here:
        raise ValueError(f"{paths.state!r} belongs to a job on another index, {_describe(state['index'])}, not this "
                         f"{_describe(here)}: resume it with the index it was planned on, or {_redo(paths)}")
    return saved.astype(np.int64), state["cursor"], state["job_id"], state


def _write_state(state_path: str, order: np.ndarray, cursor: int, job_id: str, fingerprint: dict, **extra) -> None:
    state = {"version": STATE_VERSION, "job_id": job_id, "index": fingerprint, "n_order": int(len(order)),
             "order_sha256": _order_digest(order), "cursor": int(cursor), **extra}
    _atomic_write(state_path, lambda f: f.write(json.dumps(state, indent=1).encode()))


@dataclass
class _Job:
    paths: _Paths
    order: np.ndarray
    job_id: str
    fingerprint: dict
    todo: np.ndarray  # the plan's items stored old at the start, in the plan's order
    positions: np.ndarray  # their positions in the order
    skipped: int
    cursor: int = 0  # the saved position at the start
    stats: dict = None  # the bookkeeping of earlier runs (see _stats)


def _plan(index, paths: _Paths, order, seed: int) -> _Job:
    """The plan (from the state file, or a new one written to it) and what is left of it."""
    old = index.old_ids()
    if os.path.exists(paths.state):
        saved, cursor, job_id, state = _read_state(paths, index)
        stats = state.get("stats") if isinstance(state.get("stats"), dict) else {}
        if order is not None and _order_digest(_ids_order(order)) != _order_digest(saved):
            raise ValueError(f"{paths.state!r} belongs to a job with another order: resume with the same order "
                             f"(or order=None), or {_redo(paths)}")
        order = saved
        outside = old[~np.isin(old, order)]
        if len(outside):
            raise ValueError(f"{len(outside)} item(s) stored old are not in the plan of {paths.state!r}, e.g. "
                             f"{outside[:5].tolist()}: they were added (add_old) after the job was planned, or the "
                             f"state file is from another index. To backfill them too, {_redo(paths)}; items "
                             "that arrive during a backfill belong in the new part (index.add)")
    else:
        if order is None:
            order = old[backfill_order(len(old), seed)] if len(old) else old.astype(np.int64)
        else:
            order = _ids_order(order)
            missing = np.setdiff1d(old, order)
            if len(missing):
                raise ValueError(f"order misses {len(missing)} item(s) stored old, e.g. {missing[:5].tolist()}: it "
                                 "must hold every item still to backfill (e.g. ids[backfill_order(len(ids), seed, "
                                 "policy)])")
        cursor, job_id, stats = 0, uuid.uuid4().hex, {}
        _atomic_write(paths.order, lambda f: np.save(f, order))
        _write_state(paths.state, order, 0, job_id, _index_fingerprint(index))
    still_old = np.isin(order, old)
    behind = int(still_old[:cursor].sum())
    if behind:
        warnings.warn(f"{behind} item(s) before the saved position of {paths.state!r} are still stored old (the "
                      "index is older than the job's position: loaded from an earlier checkpoint, or rebuilt); "
                      "the job backfills them too", RuntimeWarning, stacklevel=3)
    return _Job(paths, order, job_id, _index_fingerprint(index), order[still_old], np.nonzero(still_old)[0],
                int((~still_old[cursor:]).sum()), cursor, stats)


def _check_index(index, checkpoint_path) -> None:
    for attr in ("old_ids", "backfill"):
        if not callable(getattr(index, attr, None)):
            raise TypeError(f"index must be an OnlineBackfillIndex or a QdrantBackfillIndex (it needs {attr}()), "
                            f"got {type(index).__name__}")
    if checkpoint_path is not None and not callable(getattr(index, "save", None)):
        raise ValueError(f"checkpoint_path is given but the index ({type(index).__name__}) cannot be saved (it has "
                         "no save(path)): leave checkpoint_path=None for a durable index such as a Qdrant collection")


def _check_args(index, batch_size, rate_limit, checkpoint_every, seed, checkpoint_path) -> None:
    _check_index(index, checkpoint_path)
    _check_positive("batch_size", batch_size)
    _check_positive("rate_limit", rate_limit, allow_none=True, integer=False)
    _check_positive("checkpoint_every", checkpoint_every)
    check_seed(seed)


# ---- writing -------------------------------------------------------------------------------------

def _embedded(ids: np.ndarray, vectors, dim) -> np.ndarray:
    """The output of ``embed(ids)`` checked: one finite unit-norm row of ``dim`` per id."""
    x = as_embeddings(vectors, "the vectors embed(ids) returned", dim=dim, unit_norm=True)
    if len(x) != len(ids):
        raise ValueError(f"embed returned {len(x)} vectors for a batch of {len(ids)} ids: it must return one row "
                         "per id, in the order of the ids (the batch is not written)")
    return x


def _stats(job: _Job, status: str, run_started: float, run_seconds: float, run_written: int, remaining: int,
           batch_size, rate_limit, **extra) -> dict:
    """The rate and ETA bookkeeping kept in the state file (read by :func:`job_status`)."""
    before = job.stats or {}

    def number(key):
        v = before.get(key, 0)
        return v if isinstance(v, (int, float)) and not isinstance(v, bool) else 0

    return {"status": status, "written": int(number("written")) + run_written,
            "seconds": float(number("seconds")) + run_seconds, "runs": int(number("runs")) + 1,
            "run_started": run_started, "run_written": run_written, "run_seconds": run_seconds,
            "remaining": int(remaining), "batch_size": int(batch_size),
            "rate_limit": None if rate_limit is None else float(rate_limit), "updated": time.time(),
            "pid": os.getpid(), **extra}


def _until(batches, stop_when, stopped: list):
    """``batches`` until ``stop_when()`` says stop: asked before each batch is embedded."""
    batches = iter(batches)
    while True:
        if stop_when is not None and stop_when():
            stopped.append(True)
            return
        try:
            batch = next(batches)
        except StopIteration:
            return
        yield batch


def _write_batches(index, batches, job: _Job, batch_size, rate_limit, checkpoint_path, checkpoint_every,
                   max_items, show_progress, stop_when=None) -> BackfillRun:
    """The writing half of the job: ``batches`` yields ``(ids, vectors)`` following ``job.todo``."""
    start = time.perf_counter()
    started = time.time()
    todo, order = job.todo, job.order
    dim = getattr(index, "dim_new", None)
    dim = int(dim) if isinstance(dim, (int, np.integer)) and not isinstance(dim, bool) else None
    consumed, written, skipped, since_checkpoint = 0, 0, job.skipped, 0
    cursor = job.cursor
    stopped: list = []
    bar = tqdm(total=len(order), initial=len(order) - len(todo), unit="item", desc="backfill", disable=not show_progress)

    def record(status: str, remaining: int, **extra) -> None:
        seconds = time.perf_counter() - start
        if rate_limit is not None and status == "running":
            # A commit comes before the batch's wait for the rate limit: count the wait it is due.
            seconds = max(seconds, written / rate_limit)
        stats = _stats(job, status, started, seconds, written, remaining, batch_size, rate_limit, **extra)
        _write_state(job.paths.state, order, cursor, job.job_id, job.fingerprint, stats=stats)

    def commit(n_done: int) -> None:
        nonlocal cursor
        # The index first, then the position: the position is never ahead of what is durable.
        if checkpoint_path is not None:
            index.save(checkpoint_path)
        cursor = int(job.positions[n_done - 1]) + 1
        record("running", len(todo) - n_done)

    try:
        record("running", len(todo))
        for ids, vectors in _until(batches, stop_when, stopped):
            ids = np.asarray(ids, dtype=np.int64)
            n = len(ids)
            if not np.array_equal(ids, todo[consumed:consumed + n]):
                raise RuntimeError("the embedding step returned the batches out of order; "
                                   "keep the order of the ids (Ray Data: preserve_order)")
            x = _embedded(ids, vectors, dim)
            try:
                index.backfill(ids, x)
            except ValueError:
                # Removed from the index (or written by someone else) since the job started? The
                # index refused the whole batch; write the items of it still stored old.
                still = np.isin(ids, index.old_ids())
                if still.all():
                    raise
                if still.any():
                    index.backfill(ids[still], x[still])
                skipped += int((~still).sum())
                ids = ids[still]
            consumed += n
            written += len(ids)
            since_checkpoint += 1
            bar.update(len(ids))
            if since_checkpoint >= checkpoint_every or consumed == len(todo):
                commit(consumed)
                since_checkpoint = 0
            if rate_limit is not None:
                time.sleep(max(0.0, start + written / rate_limit - time.perf_counter()))
            if max_items is not None and written >= max_items:
                break
        if since_checkpoint:
            commit(consumed)
    except BaseException as exc:
        with contextlib.suppress(Exception):  # the position stays where the last commit put it
            record("failed" if isinstance(exc, Exception) else "interrupted", len(todo) - consumed,
                   error=f"{type(exc).__name__}: {exc}"[:500])
        raise
    finally:
        bar.close()
    old = index.old_ids()
    remaining = int(np.isin(order, old).sum())  # counted in the index, not from the position
    if len(old) > remaining:  # the order holds each id once: these are old items outside the plan
        warnings.warn(f"{len(old) - remaining} item(s) stored old are not in the plan of {job.paths.state!r} (added "
                      "with add_old during the run): this job does not backfill them, and refuses to resume "
                      f"while they are old; {_redo(job.paths)}", RuntimeWarning, stacklevel=3)
    paused = bool(stopped) and remaining > 0
    record("finished" if remaining == 0 else "paused" if paused else "stopped", remaining)
    return BackfillRun(written=written, skipped=skipped, remaining=remaining,
                       seconds=time.perf_counter() - start, progress=float(index.progress), stopped=paused)


def run_backfill(index, embed, state_path, order=None, seed: int = 0, batch_size: int = 256,
                 rate_limit: float | None = None, checkpoint_path=None, checkpoint_every: int = 1,
                 max_items: int | None = None, show_progress: bool = True, stop_when=None) -> BackfillRun:
    """Backfill every item still stored old, in order, in batches; resumable after a crash.

    Parameters
    ----------
    index : OnlineBackfillIndex or QdrantBackfillIndex
        The live index to write into (searches may run meanwhile).
    embed : callable
        ``embed(ids) -> new_vectors``: the new model (and ``ρ̂``) applied to the items ``ids``,
        returning ``(len(ids), dim_new)`` unit-norm rows, one per id in the order of ``ids``
        (an array, a list of rows or a tensor).
    state_path : str or os.PathLike
        The job's state file (JSON; the order goes beside it as ``<state_path>.order.npy``,
        the lock as ``<state_path>.lock``). If it exists, the job resumes from it (it must
        belong to this index: see the module docstring); delete it and the order file to plan
        afresh (items already stored new are not written again).
    order : array of ids, optional
        The backfill order ``π`` as item ids (non-negative integers), e.g.
        ``ids[backfill_order(len(ids), seed, "uncertain_first", uncertainty=u)]``; it must hold
        every item stored old (ids already new are skipped). Only used to plan a new job; when
        resuming it must be the saved order (or ``None``). Default: the ids stored old in a
        random order drawn with ``seed``.
    seed : int, default 0
        Seed of the default random order (a non-negative integer).
    batch_size : int, default 256
        Items embedded and written at once (one ``index.backfill`` call each).
    rate_limit : float, optional
        At most this many items per second (to share a GPU with the service); default no limit.
    checkpoint_path : str or os.PathLike, optional
        For an in-memory :class:`~backfill_lib.live_index.OnlineBackfillIndex`: saved here
        (crash-safely) before the job records a position, so a resumed job starts from
        ``OnlineBackfillIndex.load(checkpoint_path)``. Leave ``None`` for Qdrant (refused for
        an index without ``save``). Locked during the run as ``<checkpoint_path>.lock``.
    checkpoint_every : int, default 1
        Save the checkpoint and the position every this many batches (and at the end).
    max_items : int, optional
        Stop after the batch that brings the items written to at least this many (whole
        batches); the job can be resumed.
    show_progress : bool, default True
        Show a tqdm progress bar.
    stop_when : callable, optional
        ``stop_when() -> bool``, asked at every batch boundary (before the next batch is
        embedded, after the previous one is committed): when it returns True the run commits
        what it wrote and stops, with ``stopped=True`` in the result and ``"paused"`` in the
        state file (a pause: run the job again to resume). E.g. ``lambda: os.path.exists(flag)``.

    Returns
    -------
    BackfillRun
        Items written and skipped, items of the plan still stored old (counted in the index),
        time taken, the index's progress and whether ``stop_when`` stopped it.

    Raises
    ------
    TypeError
        If ``index`` lacks ``old_ids``/``backfill``, ``embed`` or ``stop_when`` is not callable,
        or a path is not a path.
    ValueError
        If ``batch_size``, ``rate_limit``, ``checkpoint_every`` or ``max_items`` is not
        positive or ``seed`` not a non-negative integer; ``order`` is not 1-D non-negative
        integer ids, repeats an id or misses an item stored old; two of the job's files are one
        file (``state_path``, ``checkpoint_path``, the order and lock files) or a directory is
        missing; ``checkpoint_path`` is given for an index without ``save``; the state file is
        damaged, belongs to another order or another index, or its plan does not cover an item
        stored old (e.g. added after the plan); or ``embed`` returns anything but one finite
        unit-norm row of ``dim_new`` per id (the batch is then not written).
    RuntimeError
        If another job is running on the same state file or checkpoint ("another backfill job
        is running on ...").

    Warns
    -----
    RuntimeWarning
        If items before the saved position are still stored old (the index is older than the
        position, e.g. loaded from an earlier checkpoint): they are backfilled too.

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
    _check_args(index, batch_size, rate_limit, checkpoint_every, seed, checkpoint_path)
    _check_positive("max_items", max_items, allow_none=True)
    if not callable(embed):
        raise TypeError(f"embed must be a function embed(ids) -> new_vectors, got {type(embed).__name__}")
    _check_stop_when(stop_when)
    paths = _job_paths(state_path, checkpoint_path)
    with _job_locks(paths):
        job = _plan(index, paths, order, seed)
        todo = job.todo
        batches = ((todo[i:i + batch_size], embed(todo[i:i + batch_size])) for i in range(0, len(todo), batch_size))
        return _write_batches(index, batches, job, batch_size, rate_limit, paths.checkpoint, checkpoint_every,
                              max_items, show_progress, stop_when)


def _check_stop_when(stop_when) -> None:
    if stop_when is not None and not callable(stop_when):
        raise TypeError(f"stop_when must be None or a function stop_when() -> bool, got {type(stop_when).__name__}")


@dataclass(frozen=True)
class JobStatus:
    """A job's state file read without its index (:func:`job_status`). Each parameter is an attribute.

    Parameters
    ----------
    status : str
        ``"running"`` (a process holds the job's lock), ``"paused"`` (stopped by ``stop_when``),
        ``"finished"`` (no item of the plan stored old), ``"stopped"`` (``max_items`` reached),
        ``"failed"`` or ``"interrupted"`` (an exception or Ctrl-C ended it: see ``error``),
        ``"killed"`` (the file says running but no process holds the lock: killed, e.g. by
        ``SIGKILL``) or ``"planned"`` (no run has written a batch yet).
    running : bool
        Whether a process holds the job's lock now.
    n_order : int
        Items in the plan.
    cursor : int
        The saved position in the plan.
    remaining : int
        Items of the plan still stored old at the last record (exact at the end of a run).
    written : int
        Items written by every run together (up to the last record).
    seconds : float
        Seconds the runs took together (time between runs not counted).
    rate : float or None
        Items per second of the last run (of all runs when the last wrote nothing), None
        before any item is written.
    eta_seconds : float or None
        ``remaining / rate``: the time left at that rate (0 when done).
    updated : float or None
        When the state was last recorded (Unix time).
    pid : int or None
        The process that recorded it.
    error : str or None
        What ended a failed run.
    """

    status: str
    running: bool
    n_order: int
    cursor: int
    remaining: int
    written: int
    seconds: float
    rate: float | None
    eta_seconds: float | None
    updated: float | None
    pid: int | None
    error: str | None


def job_running(state_path) -> bool:
    """Whether a process holds the lock of the job of ``state_path`` now (its job is running).

    Parameters
    ----------
    state_path : str or os.PathLike
        The job's state file (it need not exist).

    Returns
    -------
    bool
        True while a :func:`run_backfill` on it runs (the OS releases the lock when the process
        ends, even by ``SIGKILL``).
    """
    lock = os.path.realpath(check_path(state_path, "state_path")) + ".lock"
    if not os.path.exists(lock) or fcntl is None:
        return False
    fd = os.open(lock, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def job_status(state_path) -> JobStatus:
    """Progress, rate and ETA of a job, read from its state file (the index is not opened).

    Parameters
    ----------
    state_path : str or os.PathLike
        The job's state file, as given to :func:`run_backfill`.

    Returns
    -------
    JobStatus
        What the last record of the job says, and whether it runs now.

    Raises
    ------
    FileNotFoundError
        If there is no state file at ``state_path`` (no job was planned there).
    ValueError
        If the file is not a backfill job state.

    Examples
    --------
    >>> from backfill_lib.live_index import OnlineBackfillIndex
    >>> import tempfile, os
    >>> index = OnlineBackfillIndex(2, 2)
    >>> index.add_old([1, 2, 3], [[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    >>> state = os.path.join(tempfile.mkdtemp(), "job.json")
    >>> _ = run_backfill(index, lambda ids: [[1.0, 0.0]] * len(ids), state, batch_size=2, max_items=2,
    ...                  show_progress=False)
    >>> s = job_status(state)
    >>> s.status, s.written, s.remaining
    ('stopped', 2, 1)
    """
    path = os.path.realpath(check_path(state_path, "state_path"))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"state_path: no backfill job state at {path!r} (no job was planned there)")
    try:
        with open(path, "rb") as f:
            state = json.loads(f.read().decode())
        n_order, cursor = int(state["n_order"]), int(state["cursor"])
    except (OSError, ValueError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"{path!r} is not a backfill job state ({type(exc).__name__}: {exc})") from None
    stats = state.get("stats") if isinstance(state.get("stats"), dict) else {}
    running = job_running(path)
    status = stats.get("status", "planned")
    if running:
        status = "running"
    elif status == "running":
        status = "killed" if stats.get("runs") else "planned"
    written, seconds = int(stats.get("written", 0)), float(stats.get("seconds", 0.0))
    run_written, run_seconds = int(stats.get("run_written", 0)), float(stats.get("run_seconds", 0.0))
    rate = (run_written / run_seconds if run_written and run_seconds > 0
            else written / seconds if written and seconds > 0 else None)
    remaining = int(stats.get("remaining", n_order - cursor))
    eta = 0.0 if remaining == 0 else (remaining / rate if rate else None)
    return JobStatus(status=status, running=running, n_order=n_order, cursor=cursor, remaining=remaining,
                     written=written, seconds=seconds, rate=rate, eta_seconds=eta, updated=stats.get("updated"),
                     pid=stats.get("pid"), error=stats.get("error"))


class _RayEmbedder:
    """A Ray Data actor: builds the user's embedder once (the model), then embeds batches."""

    def __init__(self, make_embedder):
        self.embed = make_embedder()

    def __call__(self, batch: dict) -> dict:
        ids = batch["id"]
        vectors = np.asarray(self.embed(ids), dtype=np.float32)
        if vectors.ndim != 2 or len(vectors) != len(ids):
            raise ValueError(f"embed returned an array of shape {vectors.shape} for a batch of {len(ids)} ids: it "
                             "must return one row per id, (len(ids), dim_new)")
        return {"id": ids, "vector": vectors}


def run_backfill_ray(index, make_embedder, state_path, order=None, seed: int = 0, batch_size: int = 256,
                     concurrency: int = 1, num_gpus: float = 0, rate_limit: float | None = None,
                     checkpoint_path=None, checkpoint_every: int = 1, show_progress: bool = True,
                     stop_when=None) -> BackfillRun:
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
    stop_when : callable, optional
        Asked at every batch boundary, as in :func:`run_backfill` (a pause).

    Returns
    -------
    BackfillRun
        As :func:`run_backfill`.

    Raises
    ------
    ImportError
        If ``ray[data]`` is not installed.
    TypeError
        As :func:`run_backfill` (``make_embedder`` not callable).
    ValueError
        As :func:`run_backfill`, and if ``concurrency`` is not positive or ``num_gpus`` is
        negative.
    RuntimeError
        If another job is running on the same state file or checkpoint.
    """
    try:
        import ray
        import ray.data
    except ImportError:
        raise ImportError("run_backfill_ray needs Ray Data, an optional dependency: "
                          "pip install 'backfill_lib[ray]' (or pip install 'ray[data]')") from None
    _check_args(index, batch_size, rate_limit, checkpoint_every, seed, checkpoint_path)
    _check_positive("concurrency", concurrency)
    if isinstance(num_gpus, bool) or not isinstance(num_gpus, (int, float, np.integer, np.floating)) \
            or not num_gpus >= 0:
        raise ValueError(f"num_gpus must be a non-negative number (GPUs per actor), got {num_gpus!r}")
    if not callable(make_embedder):
        raise TypeError(f"make_embedder must be a function make_embedder() -> embed, got {type(make_embedder).__name__}")
    _check_stop_when(stop_when)
    paths = _job_paths(state_path, checkpoint_path)
    with _job_locks(paths):
        job = _plan(index, paths, order, seed)
        if not len(job.todo):
            batches = iter(())
        else:
            batches = _ray_batches(ray, job.todo, make_embedder, batch_size, concurrency, num_gpus)
        return _write_batches(index, batches, job, batch_size, rate_limit, paths.checkpoint, checkpoint_every,
                              None, show_progress, stop_when)


def _ray_batches(ray, todo, make_embedder, batch_size, concurrency, num_gpus):
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # the state file records a position in the order
    ds = ray.data.from_numpy(todo).rename_columns({"data": "id"})
    ds = ds.map_batches(_RayEmbedder, fn_constructor_args=(make_embedder,), batch_size=batch_size,
                        batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=concurrency),
                        num_gpus=num_gpus)
    return ((b["id"], b["vector"]) for b in ds.iter_batches(batch_size=batch_size, batch_format="numpy"))
