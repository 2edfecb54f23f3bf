"""A migration as an engineer runs it: one work directory, commands that can be stopped at any time.

The command line (:mod:`backfill_lib.cli`, ``backfill ...``) is a thin layer over this module.
A migration moves the gallery of an index that already serves, a faiss index file of old
vectors or a single-vector Qdrant collection, to the new model, item by item, while the index
keeps serving a merged search; it lives in a **work directory**:

* ``migration.json``: what the migration is (the target, the embedding function, the bridge,
  the job's settings) and its phase: ``migrating``, ``rolled_back`` or ``finalized``;
* ``job.json`` (+ ``job.json.order.npy``, ``job.json.lock``): the resumable job of
  :func:`backfill_lib.backfill_job.run_backfill`, with its progress, rate and ETA;
* ``index.obi`` (faiss targets): the live index, an
  :class:`~backfill_lib.live_index.OnlineBackfillIndex` adopted from the faiss file, saved
  crash-safely before each recorded position, with the bridge ``ψ`` attached for serving;
* ``bridge.pt`` or ``bridge.npz``: a copy of the bridge given to ``migrate``;
* ``pause``: present while a pause is asked for (a running job stops at its next batch boundary).

What rollback keeps. A faiss file is adopted, never written: it is the rollback point, and
rollback removes the live index and the job's files and leaves the file as it was (its SHA-256
is recorded at adoption and checked). It costs the file's bytes on disk until ``finalize``. A
Qdrant collection keeps the old vector of every backfilled point until ``finalize``
(:meth:`backfill_lib.qdrant_index.QdrantBackfillIndex.rollback_cost` says how many bytes);
rollback drops the new named vector. ``finalize`` (every item stored new) writes the new-only
faiss index to a file of your choice (``IndexIDMap2`` over ``IndexFlatIP`` of the stored new
vectors), or drops the old vectors of the collection, and removes what rollback needed: the
original faiss file (unless kept), the live index, the bridge's copy and the job's files.

The embedding function is given as ``FILE.py:FUNC``: ``FUNC(ids)`` gets an ``int64`` array of
item ids and returns ``(len(ids), d_new)`` unit-norm rows, the new model's embeddings
``φ_n``. With a ψ + ρ bridge (``ReverseTransform(objective="mc", learn_rho=True)``) the
migration stores ``ρ̂(φ_n(x))`` (``bridge.new_embedding``), the vectors the new part is queried
with; ``ψ̂`` serves the items still stored old.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from .backfill_job import BackfillRun, _atomic_write, _job_locks, _job_paths, job_running, job_status, run_backfill
from .validation import as_embeddings, as_labels, check_non_negative, check_positive_int, check_seed

CONFIG_VERSION = 1
#: The methods ``fit`` knows: the closed-form adapters, ψ (``L_rt``) and ψ + ρ (metric-compatible).
METHODS = ("procrustes", "low_rank_affine", "psi", "psi_rho")
#: The backfill orders ``migrate`` knows.
ORDERS = ("random", "sequential")
PHASES = ("migrating", "rolled_back", "finalized")

CONFIG, STATE, INDEX, PAUSE = "migration.json", "job.json", "index.obi", "pause"


#: ``--calibration`` choices: raw scores, or a label-free score map per space (backfill_lib.calibration).
CALIBRATIONS = ("none", "znorm", "neighbours")

#: Items a ``--calibration`` map is fitted on (a random sample of the index).
CALIBRATION_ITEMS = 2000


class MigrationError(ValueError):
    """A migration command cannot go on; the message says why and what to do."""


# ---- inputs: the sample, the embedding function, the bridge ----------------------------------------

def read_sample(path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The arrays of a sample file: ``old`` (n, d_o), ``new`` (n, d_n) and ``labels`` (n,).

    Parameters
    ----------
    path : str or os.PathLike
        An ``.npz`` file (``np.savez``) with those three arrays, the same items in the same order.

    Returns
    -------
    old, new, labels : ndarray
        The embeddings (unit-norm rows, checked) and the integer labels.

    Raises
    ------
    MigrationError
        If the file is missing, not an ``.npz`` file, or lacks an array or a row.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise MigrationError(f"SAMPLE: no file at {path!r}")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except Exception as exc:
        raise MigrationError(f"SAMPLE: {path!r} is not an .npz file of arrays ({type(exc).__name__}: {exc}); "
                             "write it with np.savez(path, old=..., new=..., labels=...)") from None
    missing = [k for k in ("old", "new", "labels") if k not in arrays]
    if missing:
        raise MigrationError(f"SAMPLE: {path!r} has no array {missing[0]!r} (it holds {sorted(arrays)}); it must hold "
                             "old (n, d_old), new (n, d_new) and labels (n,): "
                             "np.savez(path, old=..., new=..., labels=...)")
    try:
        old = as_embeddings(arrays["old"], "SAMPLE's old", unit_norm=True)
        new = as_embeddings(arrays["new"], "SAMPLE's new", unit_norm=True)
        labels = as_labels(arrays["labels"], "SAMPLE's labels")
    except (TypeError, ValueError) as exc:
        raise MigrationError(str(exc)) from None
    if not len(old) == len(new) == len(labels):
        raise MigrationError(f"SAMPLE: old, new and labels must describe the same items: {len(old)}, {len(new)} and "
                             f"{len(labels)} rows")
    return old, new, labels


def load_embed(spec: str):
    """The function named by ``FILE.py:FUNC``, imported from that file.

    Parameters
    ----------
    spec : str
        ``path/to/file.py:function_name``; the file's folder is put on ``sys.path`` first, so
        it may import its neighbours.

    Returns
    -------
    callable
        ``FUNC``.

    Raises
    ------
    MigrationError
        If the spec has no ``:``, the file is missing or fails to import, or it has no callable
        ``FUNC``.
    """
    if not isinstance(spec, str) or ":" not in spec:
        raise MigrationError(f"--embed must be FILE.py:FUNC (a Python file and a function in it), got {spec!r}")
    file, name = spec.rsplit(":", 1)
    file = os.path.abspath(file)
    if not os.path.isfile(file):
        raise MigrationError(f"--embed: no file at {file!r}")
    if not name.isidentifier():
        raise MigrationError(f"--embed: {name!r} is not a function name (FILE.py:FUNC)")
    module_name = "backfill_embed_" + hashlib.sha256(file.encode()).hexdigest()[:12]
    module = sys.modules.get(module_name)
    if module is None:
        folder = os.path.dirname(file)
        if folder not in sys.path:
            sys.path.insert(0, folder)
        try:
            loader_spec = importlib.util.spec_from_file_location(module_name, file)
            if loader_spec is None or loader_spec.loader is None:
                raise ImportError("not a Python source file")
            module = importlib.util.module_from_spec(loader_spec)
            sys.modules[module_name] = module
            loader_spec.loader.exec_module(module)
        except Exception as exc:
            sys.modules.pop(module_name, None)
            raise MigrationError(f"--embed: importing {file!r} raised {type(exc).__name__}: {exc}") from None
    func = getattr(module, name, None)
    if not callable(func):
        raise MigrationError(f"--embed: {file!r} has no function {name!r}")
    return func


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_bridge(path):
    """A bridge file written by ``backfill fit``: a ψ (``ReverseTransform``) or a closed-form adapter.

    Parameters
    ----------
    path : str or os.PathLike
        The file.

    Returns
    -------
    object
        A fitted :class:`~backfill_lib.transforms.ReverseTransform`,
        :class:`~backfill_lib.adapters.ProcrustesAdapter` or
        :class:`~backfill_lib.adapters.LowRankAffineAdapter` (each maps new vectors to the old space).

    Raises
    ------
    MigrationError
        If the file is missing or is none of these.
    """
    from .adapters import ClosedFormAdapter
    from .transforms import FittedTransform, ReverseTransform

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise MigrationError(f"--bridge: no file at {path!r}")
    reasons = []
    try:
        bridge = FittedTransform.load(path, device="cpu")
    except Exception as exc:
        reasons.append(f"{type(exc).__name__}: {exc}")
    else:
        if not isinstance(bridge, ReverseTransform):
            raise MigrationError(f"--bridge: {path!r} holds a {type(bridge).__name__} (old → new); the bridge maps "
                                 "new "
                                 "vectors to the old space: fit one with backfill fit --method psi_rho (or psi, "
                                 "procrustes, low_rank_affine)")
        return bridge
    try:
        return ClosedFormAdapter.load(path)
    except Exception as exc:
        reasons.append(f"{type(exc).__name__}: {exc}")
    raise MigrationError(f"--bridge: {path!r} is neither a ψ file nor an adapter file written by backfill fit "
                         f"({'; '.join(reasons)})")


def bridge_kind(bridge) -> str | None:
    """The method name (:data:`backfill_lib.migration.METHODS`) of a bridge, None for none.

    Parameters
    ----------
    bridge : object or None
        What :func:`backfill_lib.migration.load_bridge` returned.

    Returns
    -------
    str or None
        ``"psi_rho"``, ``"psi"``, ``"procrustes"`` or ``"low_rank_affine"``.
    """
    if bridge is None:
        return None
    if getattr(bridge, "learn_rho", False):
        return "psi_rho"
    return {"ReverseTransform": "psi", "ProcrustesAdapter": "procrustes",
            "LowRankAffineAdapter": "low_rank_affine"}.get(type(bridge).__name__, type(bridge).__name__)


def _bridge_dims(bridge) -> tuple[int, int]:
    d_in = getattr(bridge, "dim_in_", getattr(bridge, "d_in_", None))
    d_out = getattr(bridge, "dim_out_", getattr(bridge, "d_out_", None))
    return int(d_in), int(d_out)


def fit_bridge(old, new, labels, method: str, seed: int = 0, steps: int | None = None, tau: float = 0.2,
               lam_rt: float = 0.0, rank: int | None = None):
    """Fit a bridge ``new → old`` on a sample embedded by both models.

    Parameters
    ----------
    old : array (n, d_o)
        The sample under the old model, unit rows.
    new : array (n, d_n)
        The same items under the new model.
    labels : array (n,)
        Their classes (used by ``psi_rho`` only).
    method : {"procrustes", "low_rank_affine", "psi", "psi_rho"}
        ``psi``: ``ReverseTransform`` with ``L_rt``; ``psi_rho``: the metric-compatible ψ with
        the learnable ρ (``objective="mc", learn_rho=True``), the book's recommended method.
    seed : int, default 0
        Seed of the training (ψ); the adapters are closed-form.
    steps : int, optional
        Optimiser steps of ψ (default: the transform's default).
    tau : float, default 0.2
        Temperature of ``L_mc`` (``psi_rho``).
    lam_rt : float, default 0.0
        Weight of ``L_rt`` in the ``mc`` objective (``psi_rho``).
    rank : int, optional
        Rank of ``low_rank_affine`` (default full).

    Returns
    -------
    object
        The fitted bridge (``save(path)`` writes it).

    Raises
    ------
    MigrationError
        If ``method`` is unknown.
    """
    from .adapters import LowRankAffineAdapter, ProcrustesAdapter
    from .transforms import ReverseTransform

    seed = check_seed(seed)
    extra = {} if steps is None else {"steps": steps}
    if method == "procrustes":
        return ProcrustesAdapter().fit(new, old)
    if method == "low_rank_affine":
        return LowRankAffineAdapter(rank=rank).fit(new, old)
    if method == "psi":
        return ReverseTransform(objective="rt", seed=seed, device="cpu", **extra).fit(new, old)
    if method == "psi_rho":
        return ReverseTransform(objective="mc", learn_rho=True, tau=tau, lam_rt=lam_rt, seed=seed, device="cpu",
                                **extra).fit(new, old, labels)
    raise MigrationError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")


# ---- stored vectors (the live index's read-back) ----------------------------------------------------

def _stored(index, ids: np.ndarray, part: str) -> np.ndarray:
    """The vectors ``index`` stores for ``ids`` (all stored in ``part``), as float32 rows."""
    ids = np.asarray(ids, dtype=np.int64)
    if not len(ids):
        return np.zeros((0, index.dim_new if part == "new" else index.dim_old), dtype=np.float32)
    reader = getattr(index, f"{part}_vectors", None)
    if callable(reader):
        return np.asarray(reader(ids), dtype=np.float32)
    parts, vectors = index.stored_vectors(ids)
    parts = np.asarray(parts)
    if parts.size and not np.all(parts == part):
        raise MigrationError(f"items {ids[parts != part][:5].tolist()} are not stored {part}")
    return np.asarray(np.stack([np.asarray(v, dtype=np.float32) for v in vectors]) if isinstance(vectors, list)
                      else vectors, dtype=np.float32)


# ---- the migration --------------------------------------------------------------------------------

@dataclass
class VerifyReport:
    """What :meth:`backfill_lib.migration.Migration.verify` found. Each parameter is an attribute.

    Parameters
    ----------
    checked : dict
        What was checked, with counts (items, sample sizes, the largest differences).
    problems : list of str
        One line per problem, naming the ids; empty when all is well.
    """

    checked: dict = field(default_factory=dict)
    problems: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no problem was found."""
        return not self.problems


class Migration:
    """A migration in a work directory (see the module docstring).

    Open one with :meth:`backfill_lib.migration.Migration.create` or
    :meth:`backfill_lib.migration.Migration.open`.

    Parameters
    ----------
    workdir : str or os.PathLike
        The work directory.
    config : dict
        The contents of its ``migration.json``.

    Attributes
    ----------
    workdir : str
        The work directory (absolute).
    config : dict
        What the migration is, and its phase.
    """

    def __init__(self, workdir, config: dict):
        self.workdir = os.path.abspath(os.fspath(workdir))
        self.config = config
        self._bridge = None
        self._embed = None

    # -- paths

    def path(self, name: str) -> str:
        """The path of one of the work directory's files.

        Parameters
        ----------
        name : str
            ``"migration.json"``, ``"job.json"``, ``"index.obi"``, ``"pause"``, ...

        Returns
        -------
        str
        """
        return os.path.join(self.workdir, name)

    @property
    def state_path(self) -> str:
        """The job's state file."""
        return self.path(STATE)

    @property
    def backend(self) -> str:
        """``"faiss"`` or ``"qdrant"``."""
        return self.config["backend"]

    @property
    def phase(self) -> str:
        """``"migrating"``, ``"rolled_back"`` or ``"finalized"``."""
        return self.config["phase"]

    def _save_config(self) -> None:
        data = json.dumps(self.config, indent=1).encode()
        _atomic_write(self.path(CONFIG), lambda f: f.write(data))

    # -- creating and opening

    @classmethod
    def create(cls, workdir, embed: str, faiss_path=None, qdrant_path=None, qdrant_url=None,
               collection: str | None = None, bridge=None, dim_new: int | None = None, batch_size: int = 256,
               rate_limit: float | None = None, order: str = "random", seed: int = 0,
               checkpoint_every: int = 1, new_vector: str = "new", calibration: str = "none") -> "Migration":
        """Adopt the index that serves and set up the work directory (the job is not started).

        Parameters
        ----------
        workdir : str or os.PathLike
            A new or empty directory.
        embed : str
            ``FILE.py:FUNC``, the new model (see the module docstring).
        faiss_path : str, optional
            A faiss index file of old vectors (never written).
        qdrant_path : str, optional
            The folder of a local Qdrant (``QdrantClient(path=...)``).
        qdrant_url : str, optional
            A Qdrant server's URL.
        collection : str, optional
            The collection (Qdrant only; required there).
        bridge : str, optional
            A bridge file of ``backfill fit``; copied into the work directory.
        dim_new : int, optional
            The new model's dimension; default the bridge's input dimension (required without
            a bridge).
        batch_size : int, default 256
            Items per batch.
        rate_limit : float, optional
            At most this many items per second.
        order : {"random", "sequential"}, default "random"
            The backfill order: random (seeded) or ascending ids.
        seed : int, default 0
            Seed of the random order.
        checkpoint_every : int, default 1
            faiss: save the live index every this many batches.
        new_vector : str, default "new"
            Qdrant: the name of the new vector added to the collection.
        calibration : {"none", "znorm", "neighbours"}, default "none"
            Serve the calibrated merge: a label-free score map per space
            (:func:`backfill_lib.calibration.fit_score_map`), fitted on up to
            :data:`CALIBRATION_ITEMS` items of the index, their stored old vectors and the new
            vectors the embedding function (and ρ) gives them. Kept in ``migration.json`` and
            attached to the index (saved with a faiss live index; attached by
            :meth:`backfill_lib.migration.Migration.open_index` for Qdrant, which stores no maps).

        Returns
        -------
        Migration
            Its phase is ``migrating``; :meth:`backfill_lib.migration.Migration.run` starts the job.

        Raises
        ------
        MigrationError
            If the work directory holds something, not exactly one target is given, an
            argument is out of range, or the embedding function or the bridge cannot be used.
        """
        workdir = os.path.abspath(os.fspath(workdir))
        if os.path.exists(os.path.join(workdir, CONFIG)):
            raise MigrationError(f"WORKDIR {workdir!r} already holds a migration: go on with `backfill resume "
                                 f"{workdir}`, or give a new directory")
        if os.path.exists(workdir) and (not os.path.isdir(workdir) or os.listdir(workdir)):
            raise MigrationError(f"WORKDIR {workdir!r} is not an empty directory: give a new or empty one")
        targets = [t for t in (faiss_path, qdrant_path, qdrant_url) if t is not None]
        if len(targets) != 1:
            raise MigrationError("give exactly one target: --faiss OLD.faiss, --qdrant-path DIR or --qdrant-url URL")
        if (qdrant_path is not None or qdrant_url is not None) and not collection:
            raise MigrationError("--collection NAME is required with --qdrant-path or --qdrant-url")
        if faiss_path is not None and collection is not None:
            raise MigrationError("--collection is for Qdrant targets; a faiss file holds one index")
        if order not in ORDERS:
            raise MigrationError(f"--order must be one of {', '.join(ORDERS)}, got {order!r}")
        if calibration not in CALIBRATIONS:
            raise MigrationError(f"--calibration must be one of {', '.join(CALIBRATIONS)}, got {calibration!r}")
        try:
            batch_size = check_positive_int(batch_size, "--batch-size", "items per batch")
            checkpoint_every = check_positive_int(checkpoint_every, "--checkpoint-every", "batches between saves")
            dim_new = check_positive_int(dim_new, "--dim-new", "the new model's dimension", allow_none=True)
            seed = check_seed(seed, "--seed")
            if rate_limit is not None:
                rate_limit = check_non_negative(rate_limit, "--rate-limit", "items per second", strict=True)
        except (TypeError, ValueError) as exc:
            raise MigrationError(str(exc)) from None
        load_embed(embed)  # fails early, before anything is adopted
        file, func = embed.rsplit(":", 1)
        config = {"version": CONFIG_VERSION, "phase": "migrating", "created": time.time(),
                  "embed": f"{os.path.abspath(file)}:{func}", "batch_size": int(batch_size),
                  "rate_limit": None if rate_limit is None else float(rate_limit), "order": order,
                  "seed": int(seed), "checkpoint_every": int(checkpoint_every), "bridge": None,
                  "bridge_kind": None}
        loaded = None
        if bridge is not None:
            loaded = load_bridge(bridge)
            d_in, d_out = _bridge_dims(loaded)
            if dim_new is not None and dim_new != d_in:
                raise MigrationError(f"--dim-new {dim_new} does not match the bridge {bridge!r}, which reads "
                                     f"{d_in}-dimensional new vectors")
            dim_new = d_in
            config["bridge_kind"] = bridge_kind(loaded)
            config["bridge_dims"] = [d_in, d_out]
            config["bridge_source"] = os.path.abspath(os.fspath(bridge))
        elif dim_new is None:
            raise MigrationError("give --bridge FILE (fitted with backfill fit) or --dim-new N (the new model's "
                                 "dimension)")
        config["dim_new"] = int(dim_new)
        if faiss_path is not None:
            faiss_path = os.path.abspath(os.fspath(faiss_path))
            if not os.path.isfile(faiss_path):
                raise MigrationError(f"--faiss: no file at {faiss_path!r}")
            config.update(backend="faiss", faiss=faiss_path, faiss_bytes=os.path.getsize(faiss_path),
                          faiss_sha256=_file_sha256(faiss_path))
        else:
            config.update(backend="qdrant", collection=collection, new_vector=new_vector,
                          qdrant_path=None if qdrant_path is None else os.path.abspath(os.fspath(qdrant_path)),
                          qdrant_url=qdrant_url)
            if qdrant_path is not None and not os.path.isdir(config["qdrant_path"]):
                raise MigrationError(f"--qdrant-path: no directory at {config['qdrant_path']!r}")
        migration = cls(workdir, config)
        migration._bridge = loaded
        index = migration._adopt()
        try:
            config["dim_old"] = int(index.dim_old)
            if loaded is not None and config["bridge_dims"][1] != index.dim_old:
                raise MigrationError(f"the bridge {bridge!r} maps into {config['bridge_dims'][1]} dimensions but the "
                                     f"old vectors of the index have {index.dim_old}: fit it on this index's model")
            ids = index.old_ids()
            config["n_items"] = int(len(ids)) + int(len(index.new_ids()))
            if len(ids):  # one call before anything is written: a broken function fails here
                as_embeddings(migration.embed_stored(ids[:1]), f"the vectors {config['embed']} returned",
                              dim=int(dim_new), unit_norm=True)
            config["calibration"] = None
            if calibration != "none":
                config["calibration"] = migration._fit_calibration(index, ids, calibration, seed)
                index.score_maps = migration.score_maps
            made = not os.path.exists(workdir)
            os.makedirs(workdir, exist_ok=True)
            try:
                if loaded is not None:
                    kind = config["bridge_kind"]
                    copy = migration.path("bridge" + (".npz" if kind in ("procrustes", "low_rank_affine") else ".pt"))
                    shutil.copyfile(bridge, copy)
                    config["bridge"] = copy
                if config["backend"] == "faiss":
                    index.save(migration.path(INDEX))
                migration._save_config()
            except BaseException:  # leave the directory as it was: a new migrate may use it
                for name in os.listdir(workdir):
                    os.remove(os.path.join(workdir, name))
                if made:
                    os.rmdir(workdir)
                raise
        finally:
            migration._close(index)
        return migration

    @classmethod
    def open(cls, workdir) -> "Migration":
        """The migration of a work directory.

        Parameters
        ----------
        workdir : str or os.PathLike

        Returns
        -------
        Migration

        Raises
        ------
        MigrationError
            If the directory holds no migration or its ``migration.json`` is damaged.
        """
        workdir = os.path.abspath(os.fspath(workdir))
        path = os.path.join(workdir, CONFIG)
        if not os.path.isfile(path):
            raise MigrationError(f"WORKDIR {workdir!r} holds no migration (no {CONFIG}): start one with "
                                 "`backfill migrate WORKDIR ...`")
        try:
            with open(path, "rb") as f:
                config = json.loads(f.read().decode())
            if not isinstance(config, dict) or config.get("version") != CONFIG_VERSION \
                    or config.get("phase") not in PHASES or config.get("backend") not in ("faiss", "qdrant"):
                raise ValueError("not a migration of this version")
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            raise MigrationError(f"{path!r} is damaged or from another version ({exc})") from None
        return cls(workdir, config)

    # -- the pieces

    @property
    def bridge(self):
        """The bridge (None without one), loaded from the work directory's copy."""
        if self._bridge is None and self.config.get("bridge"):
            self._bridge = load_bridge(self.config["bridge"])
        return self._bridge

    def embed_stored(self, ids) -> np.ndarray:
        """The vectors to store for ``ids``: ``FUNC(ids)``, then ``ρ̂`` with a ψ + ρ bridge.

        Parameters
        ----------
        ids : array of int
            Item ids.

        Returns
        -------
        ndarray (len(ids), dim_new)
            The new vectors to store (and to compare with what is stored).
        """
        if self._embed is None:
            self._embed = load_embed(self.config["embed"])
        ids = np.asarray(ids, dtype=np.int64)
        try:
            raw = self._embed(ids)
        except Exception as exc:
            raise RuntimeError(f"the embed function {self.config['embed']} raised {type(exc).__name__}: {exc}") \
                from None
        bridge = self.bridge
        if self.config.get("bridge_kind") == "psi_rho":
            raw = as_embeddings(raw, f"the vectors {self.config['embed']} returned", dim=self.config["dim_new"],
                                unit_norm=True)
            return bridge.new_embedding(raw)
        return raw

    def _client(self):
        try:
            from qdrant_client import QdrantClient
        except ImportError:
            raise MigrationError("a Qdrant target needs qdrant-client: pip install 'backfill_lib[qdrant]'") from None
        if self.config.get("qdrant_path"):
            try:
                return QdrantClient(path=self.config["qdrant_path"])
            except RuntimeError as exc:  # another process holds the local storage
                raise MigrationError(f"cannot open the local Qdrant at {self.config['qdrant_path']!r}: {exc}") \
                    from None
        return QdrantClient(url=self.config["qdrant_url"])

    @property
    def score_maps(self):
        """``{"old": ScoreMap, "new": ScoreMap}`` of ``--calibration``, or None (raw scores)."""
        from .calibration import ScoreMap

        cal = self.config.get("calibration")
        if not cal:
            return None
        return {part: ScoreMap(cal[part]["scale"], cal[part]["offset"], cal["method"], cal[part]["n_pairs"])
                for part in ("old", "new")}

    def _fit_calibration(self, index, old_ids, method: str, seed: int) -> dict:
        """Label-free score maps of both spaces, from a sample of the items stored old."""
        from .calibration import fit_score_map

        if len(old_ids) < 3:
            raise MigrationError(f"--calibration {method} needs at least 3 items stored old to fit on, the index holds "
                                 f"{len(old_ids)}: use --calibration none")
        rng = np.random.default_rng(seed)
        sample = np.sort(rng.choice(old_ids, size=min(CALIBRATION_ITEMS, len(old_ids)), replace=False))
        old = np.asarray(index.old_vectors(sample), dtype=np.float32)
        new = as_embeddings(self.embed_stored(sample), f"the vectors {self.config['embed']} returned",
                            dim=self.config["dim_new"], unit_norm=True)
        maps = {"old": fit_score_map(old, method=method, seed=seed), "new": fit_score_map(new, method=method, seed=seed)}
        return {"method": method, "n_items": int(len(sample)),
                **{part: {"scale": float(m.scale), "offset": float(m.offset), "n_pairs": int(m.n_pairs)}
                   for part, m in maps.items()}}

    def _adopt(self, with_bridge: bool = True):
        """The index of a new migration, adopted from the target (re-attached, for Qdrant)."""
        psi = self.bridge if with_bridge else None
        if self.backend == "faiss":
            from .live_index import OnlineBackfillIndex

            return OnlineBackfillIndex.from_faiss(self.config["faiss"], self.config["dim_new"], psi=psi,
                                                  score_maps=self.score_maps)
        from .qdrant_index import QdrantBackfillIndex

        client = self._client()
        try:
            return QdrantBackfillIndex.adopt(client, self.config["collection"], self.config["dim_new"],
                                             new_vector=self.config["new_vector"], psi=psi,
                                             score_maps=self.score_maps)
        except BaseException:
            client.close()
            raise

    def open_index(self):
        """The live index, as the job left it (faiss: loaded from ``index.obi``; Qdrant: re-attached).

        Returns
        -------
        OnlineBackfillIndex or QdrantBackfillIndex
            With the bridge attached as ``psi``. Close a Qdrant one's client when done
            (``index.client.close()``).

        Raises
        ------
        MigrationError
            If the migration was rolled back or finalized.
        """
        self._check_phase("open the index of")
        if self.backend == "faiss":
            from .live_index import OnlineBackfillIndex

            index = OnlineBackfillIndex.load(self.path(INDEX))
            index.psi = self.bridge
            index.score_maps = self.score_maps
            return index
        return self._adopt()

    @staticmethod
    def _close(index) -> None:
        client = getattr(index, "client", None)
        if client is not None and callable(getattr(client, "close", None)):
            client.close()

    def _check_phase(self, what: str) -> None:
        if self.phase != "migrating":
            raise MigrationError(f"cannot {what} this migration: it was {self.phase.replace('_', ' ')} (see `backfill "
                                 f"status {self.workdir}`); start a new one in a new directory")

    def _check_not_running(self, what: str) -> None:
        if job_running(self.state_path):
            raise MigrationError(f"a job is running on {self.workdir}: `backfill pause {self.workdir}` first, then "
                                 f"{what}")

    # -- the job

    def run(self, max_items: int | None = None, show_progress: bool = False,
            stop_on_sigterm: bool = True) -> BackfillRun:
        """Run (or resume) the job until it is done, paused, or has written ``max_items``.

        A pause request (:meth:`backfill_lib.migration.Migration.request_pause`, the file
        ``pause``) or ``SIGTERM`` stops it at the next batch boundary. A pause request left from
        before is cleared when it starts.

        Parameters
        ----------
        max_items : int, optional
            Stop after the batch that brings the items written to at least this many.
        show_progress : bool, default False
            Show a progress bar (on standard error).
        stop_on_sigterm : bool, default True
            Treat ``SIGTERM`` as a pause (main thread only).

        Returns
        -------
        BackfillRun
            ``stopped`` is True when a pause stopped it.

        Raises
        ------
        MigrationError
            If the migration was rolled back or finalized.
        """
        self._check_phase("resume")
        pause = self.path(PAUSE)
        terminated = []
        previous = None
        if os.path.exists(pause):
            os.remove(pause)
        index = self.open_index()
        try:
            if stop_on_sigterm:
                try:
                    previous = signal.signal(signal.SIGTERM, lambda *_: terminated.append(True))
                except ValueError:  # not the main thread
                    previous = None
            order = None
            if self.config["order"] == "sequential" and not os.path.exists(self.state_path):
                order = np.sort(index.old_ids())
            checkpoint = self.path(INDEX) if self.backend == "faiss" else None
            run = run_backfill(index, self.embed_stored, self.state_path, order=order, seed=self.config["seed"],
                               batch_size=self.config["batch_size"], rate_limit=self.config["rate_limit"],
                               checkpoint_path=checkpoint, checkpoint_every=self.config.get("checkpoint_every", 1),
                               max_items=max_items, show_progress=show_progress,
                               stop_when=lambda: bool(terminated) or os.path.exists(pause))
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
            self._close(index)
        if os.path.exists(pause):
            os.remove(pause)
        return run

    def request_pause(self, wait: bool = True, timeout: float = 600.0) -> bool:
        """Ask a running job to stop at its next batch boundary.

        Parameters
        ----------
        wait : bool, default True
            Wait until it has stopped.
        timeout : float, default 600
            Seconds to wait at most.

        Returns
        -------
        bool
            False when no job was running (nothing to pause); True when one was asked (and,
            with ``wait``, has stopped).

        Raises
        ------
        MigrationError
            If the job is still running after ``timeout`` seconds.
        """
        self._check_phase("pause")
        if not job_running(self.state_path):
            return False
        with open(self.path(PAUSE), "w") as f:
            f.write(f"asked at {time.time()}\n")
        if wait:
            deadline = time.monotonic() + timeout
            while job_running(self.state_path):
                if time.monotonic() > deadline:
                    raise MigrationError(f"the job on {self.workdir} is still running after {timeout:g} s (a batch "
                                         "can take long to embed); it stops at its next batch boundary")
                time.sleep(0.05)
        return True

    # -- status

    def status(self) -> dict:
        """Where the migration is: phase, progress, rate, ETA, bridge, calibration and rollback cost.

        Read from the work directory without opening the index (so it answers while a job
        runs), except a Qdrant collection's rollback cost when no job holds it.

        Returns
        -------
        dict
            JSON-ready: ``workdir``, ``phase``, ``backend``, ``target``, ``items``, ``stored_new``,
            ``stored_old``, ``progress``, ``job`` (``status``, ``running``, ``written``,
            ``seconds``, ``rate``, ``eta_seconds``, ``updated``, ``pid``, ``error``),
            ``settings``, ``bridge``, ``calibration``, ``rollback`` (``possible``, ``bytes``,
            ``text``), ``live_index`` (faiss: the live index file and its size), ``pause_requested``.
        """
        c = self.config
        out = {"workdir": self.workdir, "phase": self.phase, "backend": self.backend,
               "target": ({"faiss": c["faiss"]} if self.backend == "faiss" else
                          {"qdrant_path": c.get("qdrant_path"), "qdrant_url": c.get("qdrant_url"),
                           "collection": c["collection"], "new_vector": c["new_vector"]}),
               "dim_old": c.get("dim_old"), "dim_new": c.get("dim_new"), "items": c.get("n_items"),
               "settings": {k: c.get(k) for k in ("batch_size", "rate_limit", "order", "seed", "embed")},
               "pause_requested": os.path.exists(self.path(PAUSE))}
        job = None
        if os.path.exists(self.state_path):
            s = job_status(self.state_path)
            job = {"status": s.status, "running": s.running, "written": s.written, "seconds": s.seconds,
                   "rate": s.rate, "eta_seconds": s.eta_seconds, "updated": s.updated, "pid": s.pid,
                   "error": s.error, "remaining": s.remaining}
        n = c.get("n_items") or 0
        if self.phase == "finalized":
            stored_old, stored_new = 0, n
        elif self.phase == "rolled_back":
            stored_old, stored_new = n, 0
        else:
            stored_old = job["remaining"] if job is not None else n
            stored_new = n - stored_old
        out.update(stored_new=stored_new, stored_old=stored_old, progress=stored_new / n if n else 1.0, job=job)
        out["bridge"] = None if not c.get("bridge_kind") or self.phase != "migrating" else {
            "kind": c["bridge_kind"], "file": c.get("bridge"), "fitted_from": c.get("bridge_source"),
            "dim_new": c["bridge_dims"][0], "dim_old": c["bridge_dims"][1],
            "serves": ("ψ̂(φ_n(q)) queries the items stored old; ρ̂(φ_n(·)) is stored and queries the new ones"
                       if c["bridge_kind"] == "psi_rho" else "it maps new queries onto the items stored old")}
        cal = c.get("calibration")
        out["calibration"] = ({"score_maps": None,
                               "text": "none: the merged search compares raw scores (no score maps attached)"}
                              if not cal else
                              {"score_maps": {part: {k: cal[part][k] for k in ("scale", "offset")}
                                              for part in ("old", "new")},
                               "method": cal["method"], "n_items": cal["n_items"],
                               "text": f"{cal['method']} (label-free), fitted on {cal['n_items']} items: the merged "
                                       "search compares each space's scores on one scale"})
        out["rollback"] = self._rollback_cost(job)
        live = self.path(INDEX)
        out["live_index"] = ({"file": live, "bytes": os.path.getsize(live)}
                             if self.backend == "faiss" and os.path.exists(live) else None)
        if self.phase == "finalized":
            out["finalized"] = c.get("finalized")
        return out

    def _rollback_cost(self, job) -> dict:
        c = self.config
        if self.phase != "migrating":
            return {"possible": False, "bytes": 0, "text": f"none: the migration was {self.phase.replace('_', ' ')}"}
        if self.backend == "faiss":
            size = os.path.getsize(c["faiss"]) if os.path.exists(c["faiss"]) else 0
            return {"possible": os.path.exists(c["faiss"]), "bytes": size,
                    "text": f"keeps the original file {c['faiss']} ({size:,} bytes on disk), never written, until "
                            "finalize; rollback removes the live index and the job, nothing else"}
        if job is None or not job["running"]:
            index = None
            try:
                index = self._adopt(with_bridge=False)
                cost = dict(index.rollback_cost())
                return {"possible": True, "bytes": int(cost.get("bytes", 0)), "text": str(cost.get("text", "")),
                        **{k: v for k, v in cost.items() if k not in ("bytes", "text")}}
            except Exception:  # e.g. the local storage is busy: estimate from the job's record
                pass
            finally:
                if index is not None:
                    self._close(index)
        backfilled = (c.get("n_items") or 0) - (job["remaining"] if job is not None else c.get("n_items") or 0)
        size = backfilled * int(c.get("dim_old") or 0) * 4
        return {"possible": True, "bytes": size,
                "text": f"keeps the old vectors of {backfilled:,} backfilled points (about {size:,} bytes at float32, "
                        "estimated from the job's record: the collection is in use) until finalize"}

    # -- verify

    def verify(self, sample: int = 100, seed: int = 0, tolerance: float = 1e-4) -> VerifyReport:
        """Check the index: every id exactly once, in the right part; a sample re-embedded and compared.

        * every item of the plan is stored exactly once (old or new), and no other item;
        * every item the job's position says is done is stored new;
        * ``sample`` items stored new, re-embedded (``FUNC`` and ``ρ̂``), match what is stored
          (``1 − cos ≤ tolerance``);
        * faiss: ``sample`` items stored old hold their vectors of the original file (exactly),
          and the original file is unchanged (its SHA-256).

        Parameters
        ----------
        sample : int, default 100
            Items stored new re-embedded (and items stored old compared), drawn with ``seed``.
        seed : int, default 0
            Seed of the samples.
        tolerance : float, default 1e-4
            Largest ``1 − cosine`` accepted between a stored new vector and its re-embedding.

        Returns
        -------
        VerifyReport
            ``ok`` when no problem was found.

        Raises
        ------
        MigrationError
            If a job is running or the migration was rolled back or finalized.
        """
        self._check_phase("verify")
        if isinstance(sample, bool) or not isinstance(sample, (int, np.integer)) or sample < 0:
            raise MigrationError(f"--sample must be a non-negative integer (items to compare), got {sample!r}")
        try:
            tolerance = check_non_negative(tolerance, "--tolerance", "1 - cosine accepted")
            rng = np.random.default_rng(check_seed(seed, "--seed"))
        except (TypeError, ValueError) as exc:
            raise MigrationError(str(exc)) from None
        self._check_not_running("verify")
        report = VerifyReport()
        problems = report.problems
        index = self.open_index()
        try:
            old, new = np.asarray(index.old_ids(), np.int64), np.asarray(index.new_ids(), np.int64)
            both = np.intersect1d(old, new)
            if len(both):
                problems.append(f"{len(both)} item(s) stored both old and new, e.g. ids {both[:10].tolist()}")
            every = np.concatenate([old, new])
            uniq, counts = np.unique(every, return_counts=True)
            repeated = uniq[counts > 1]
            if len(repeated) > len(both):
                problems.append(f"item(s) stored more than once, e.g. ids {repeated[:10].tolist()}")
            if os.path.exists(self.state_path):
                plan = np.load(self.state_path + ".order.npy", allow_pickle=False).astype(np.int64)
                cursor = job_status(self.state_path).cursor
            else:
                plan, cursor = np.sort(old), 0
            missing, extra = np.setdiff1d(plan, uniq), np.setdiff1d(uniq, plan)
            if len(missing):
                problems.append(f"{len(missing)} item(s) of the migration are stored in neither part, e.g. ids "
                                f"{missing[:10].tolist()}")
            if len(extra):
                problems.append(f"{len(extra)} item(s) not in the migration are in the index, e.g. ids "
                                f"{extra[:10].tolist()}")
            behind = plan[:cursor][np.isin(plan[:cursor], old)]
            if len(behind):
                problems.append(f"{len(behind)} item(s) the job recorded as done are stored old, e.g. ids "
                                f"{behind[:10].tolist()}")
            report.checked.update(items=int(len(uniq)), stored_new=int(len(new)), stored_old=int(len(old)),
                                  job_position=int(cursor))
            picked = np.sort(rng.choice(new, size=min(sample, len(new)), replace=False)) if len(new) else new
            if len(picked):
                stored = _stored(index, picked, "new").astype(np.float64)
                fresh = as_embeddings(self.embed_stored(picked), "the re-embedded vectors", dim=index.dim_new,
                                      unit_norm=True).astype(np.float64)
                cos = (stored * fresh).sum(1) / np.maximum(np.linalg.norm(stored, axis=1), 1e-12)
                bad = np.flatnonzero(1.0 - cos > tolerance)
                for j in bad[:10]:
                    problems.append(f"id {int(picked[j])}: the stored new vector differs from its re-embedding "
                                    f"(cosine {cos[j]:.4f})")
                if len(bad) > 10:
                    problems.append(f"... and {len(bad) - 10} more stored new vectors differ from their re-embedding")
                report.checked.update(new_sampled=int(len(picked)), new_worst_cosine=float(cos.min()))
            if self.backend == "faiss":
                self._verify_original(index, old, sample, rng, report)
        finally:
            self._close(index)
        return report

    def _verify_original(self, index, old, sample, rng, report) -> None:
        c = self.config
        if not os.path.isfile(c["faiss"]):
            report.problems.append(f"the original file {c['faiss']} is gone: rollback is no longer possible")
            return
        same = _file_sha256(c["faiss"]) == c["faiss_sha256"]
        report.checked["original_unchanged"] = same
        if not same:
            report.problems.append(f"the original file {c['faiss']} changed since it was adopted (SHA-256): rollback "
                                   "would not restore the index as it was")
        picked = np.sort(rng.choice(old, size=min(sample, len(old)), replace=False)) if len(old) else old
        if len(picked) and same:
            from .live_index import OnlineBackfillIndex

            original = OnlineBackfillIndex.from_faiss(c["faiss"], c["dim_new"])  # the file as it is now
            want, got = _stored(original, picked, "old"), _stored(index, picked, "old")
            bad = np.flatnonzero(np.any(want != got, axis=1))
            for j in bad[:10]:
                report.problems.append(f"id {int(picked[j])}: the stored old vector differs from the original file's")
            report.checked["old_sampled"] = int(len(picked))

    # -- rollback and finalize

    def rollback(self) -> str:
        """Return to the state before the migration, and say what that restored.

        faiss: the original file is checked (SHA-256) and left as it was; the live index, the
        job's files and the bridge's copy are removed. Qdrant: the new named vector is dropped
        (:meth:`backfill_lib.qdrant_index.QdrantBackfillIndex.rollback`); the old vectors were
        never rewritten.

        Returns
        -------
        str
            One line saying what was restored.

        Raises
        ------
        MigrationError
            If a job is running, the migration was already rolled back or finalized, or the
            original faiss file changed.
        """
        self._check_phase("roll back")
        paths = _job_paths(self.state_path, None)
        with _job_locks(paths):
            c = self.config
            if self.backend == "faiss":
                if not os.path.isfile(c["faiss"]) or _file_sha256(c["faiss"]) != c["faiss_sha256"]:
                    raise MigrationError(f"the original file {c['faiss']} is missing or changed since it was adopted: "
                                         "rollback cannot restore it; restore it from a backup")
                text = (f"rolled back: {c['faiss']} is as it was ({c['faiss_bytes']:,} bytes, SHA-256 checked); the "
                        "live index and the job are removed")
            else:
                index = self._adopt(with_bridge=False)
                try:
                    said = index.rollback()
                finally:
                    self._close(index)
                said = said if isinstance(said, dict) else {}
                text = (f"rolled back: the collection {c['collection']!r} is as it was (the new vector "
                        f"{c['new_vector']!r} dropped from {said.get('dropped_new_vectors', 'every')} point(s); "
                        "the old vectors were never rewritten)")
            self._remove_job_files()
            c["phase"] = "rolled_back"
            c["rolled_back"] = {"at": time.time(), "text": text}
            self._save_config()
        self._remove_lock()
        return text

    def _remove_lock(self) -> None:
        # After the phase is recorded no job starts here again; the lock file has no meaning left.
        try:
            os.remove(self.state_path + ".lock")
        except OSError:
            pass

    def _remove_job_files(self) -> None:
        for name in (INDEX, INDEX + ".lock", STATE, STATE + ".order.npy", PAUSE):
            path = self.path(name)
            if os.path.exists(path):
                os.remove(path)
        if self.config.get("bridge") and os.path.exists(self.config["bridge"]):
            os.remove(self.config["bridge"])

    def finalize(self, out=None, keep_original: bool = False) -> str:
        """Drop the bridge and the old part: the index is new-only; rollback is no longer possible.

        Refused until every item is stored new. faiss: writes the new vectors as a faiss index
        (``IndexIDMap2`` over ``IndexFlatIP``) to ``out``, then removes the original file (unless
        ``keep_original``), the live index, the job's files and the bridge's copy. Qdrant: the
        collection's old vectors are dropped
        (:meth:`backfill_lib.qdrant_index.QdrantBackfillIndex.finalize`).

        Parameters
        ----------
        out : str or os.PathLike, optional
            faiss: where to write the new-only index (required; must not exist).
        keep_original : bool, default False
            faiss: keep the original file.

        Returns
        -------
        str
            One line saying what was done.

        Raises
        ------
        MigrationError
            If a job is running, items are still stored old, ``out`` is missing (faiss), given
            (Qdrant) or exists, or the migration was rolled back or finalized.
        """
        self._check_phase("finalize")
        c = self.config
        if self.backend == "faiss":
            if out is None:
                raise MigrationError("--out NEW.faiss is required for a faiss target: the new-only index is written "
                                     "there")
            out = os.path.abspath(os.fspath(out))
            if os.path.exists(out):
                raise MigrationError(f"--out {out!r} exists: finalize writes a new file; give another path")
            if not os.path.isdir(os.path.dirname(out)):
                raise MigrationError(f"--out: the directory of {out!r} does not exist")
        elif out is not None:
            raise MigrationError("--out is for faiss targets; a Qdrant collection is finalized in place")
        paths = _job_paths(self.state_path, None)
        with _job_locks(paths):
            index = self.open_index()
            try:
                if index.n_old:
                    raise MigrationError(f"{index.n_old} item(s) are still stored old: finish the job first "
                                         f"(`backfill resume {self.workdir}`)")
                if self.backend == "faiss":
                    text = self._write_new_only(index, out)
                    if not keep_original:
                        os.remove(c["faiss"])
                        text += f"; the original file {c['faiss']} is removed ({c['faiss_bytes']:,} bytes freed)"
                    else:
                        text += f"; the original file {c['faiss']} is kept (no longer needed: delete it)"
                else:
                    said = index.finalize()
                    said = said if isinstance(said, dict) else {}
                    text = (f"finalized: the collection {c['collection']!r} serves the new vector "
                            f"{c['new_vector']!r} only (query it with using={c['new_vector']!r})")
                    if "dropped_old_vectors" in said:
                        text += (f"; {said['dropped_old_vectors']:,} old vectors dropped "
                                 f"({said.get('freed_bytes', 0):,} bytes freed)")
            finally:
                self._close(index)
            self._remove_job_files()
            c["phase"] = "finalized"
            c["finalized"] = {"at": time.time(), "out": out, "text": text}
            self._save_config()
        self._remove_lock()
        return text

    def _write_new_only(self, index, out: str) -> str:
        import faiss

        ids = np.sort(np.asarray(index.new_ids(), dtype=np.int64))
        vectors = np.ascontiguousarray(_stored(index, ids, "new"), dtype=np.float32)
        new_only = faiss.IndexIDMap2(faiss.IndexFlatIP(int(index.dim_new)))
        if len(ids):
            new_only.add_with_ids(vectors, ids)
        _atomic_write(out, lambda f: f.write(faiss.serialize_index(new_only).tobytes()))
        return f"finalized: {len(ids):,} new vectors written to {out} (IndexIDMap2 over IndexFlatIP, {index.dim_new} d)"
