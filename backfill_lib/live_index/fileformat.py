"""The file of a live index: what :meth:`backfill_lib.live_index.OnlineBackfillIndex.save` writes
and :meth:`~backfill_lib.live_index.OnlineBackfillIndex.load` reads, its checksums, and the
crash-safe writes and temporary files that :mod:`backfill_lib.backfill_job` uses too.

Format. One ``.npz`` (zip) file of numpy arrays, read with ``allow_pickle=False``: a JSON header
(``header``, as bytes), each part's arrays as its layout stores them (chunks, IVF lists or one
serialized faiss index: :mod:`backfill_lib.live_index.parts`), each part's ids, and ``psi``
serialized by its own class. :data:`FILE_VERSION` says which layout version wrote it.

Files. :meth:`~backfill_lib.live_index.OnlineBackfillIndex.load` runs no code named by a file:
the class of ``psi`` is looked up among the transforms registered with
:func:`backfill_lib.transforms.register_transform` (never imported), and every header field is
checked against the arrays (each part's ids are the ids its faiss storage holds; types,
dimensions, counts, search parameters, graph links and exact vectors fit), so a file either
loads into an index that returns only the items it holds, or is refused with a ``ValueError``
naming it. Loading writes nothing; it removes the temporary files that killed saves of that
path left (only those whose writing process is gone).

Damage. A file of format 4 holds a SHA-256 checksum of every array (name, dtype, shape and bytes)
in its header, and the checksum of the header in an array of its own (``header_checksum``).
:meth:`~backfill_lib.live_index.OnlineBackfillIndex.load` checks them all before any array is
interpreted or any byte reaches faiss or psi's reader, so a damaged file (a flipped bit, a lost
sector, a bad copy) is refused with ``ValueError: '<path>' is damaged: <array> does not match
the checksum stored with it; restore it from a backup or rebuild the index``, never loaded as
another index nor able to crash the process in faiss's reader. The zip container's own CRC-32 of
each array, checked as it is read, gives the same message. Checksums tell damage, not intent:
whoever can rewrite the file can rewrite them, which the checks of every field above still
cover. Files of formats 1 to 3 still load, unchecked, with a warning; saving them again adds the
checksums. Measured at 10⁶ vectors of dimension 128 (one Flat part, 528 MB; one run each, on a
shared and loaded machine, /tmp): save 0.77 s (0.48 s in format 3), load 1.48 s (1.15 s), no
copy of the data.

Atomic writes. A file is written under a temporary name beside it (``.<name>.<host>-<pid>.<random>.tmp``),
flushed to disk, renamed over the path in one step and the directory flushed, so a crash leaves
the previous file or the new one, never a partial one. The temporary files a killed writer left
are removed by the next write or load of that path, only once their writer is gone.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import tempfile
import time
import uuid
import warnings
import zipfile
import zlib

import numpy as np

from ..validation import check_path, repeated
from .parts import CHUNK_ROWS, _bytes_array, _check_search_param, _ChunkedPart, _id_array, _IVFListsPart

#: Marks a file written by :meth:`backfill_lib.live_index.OnlineBackfillIndex.save` (with the format
#: version below).
FILE_MAGIC = "backfill_lib.OnlineBackfillIndex"
#: 2: flat-codes parts saved chunk by chunk; 3: IVF-Flat parts saved list by list; 4: a checksum of
#: every array. Versions 1 to 3 still load (unchecked, with a warning).
FILE_VERSION = 4
#: The hash of format 4's checksums (``hashlib``; SHA-256 is hardware-accelerated on most x86 and
#: ARM CPUs: 0.9 GB/s here, twice BLAKE2b).
CHECKSUM = "sha256"
#: The array of a format-4 file holding the checksum of its header (which holds those of the others).
HEADER_CHECKSUM = "header_checksum"


def _array_digest(name: str, arr: np.ndarray) -> str:
    """The format-4 checksum (:data:`CHECKSUM`, hex) of one array: its name, dtype, shape and bytes.

    The bytes are those of the array in C order, as ``np.save`` writes them; a C-contiguous array
    (every array a save writes, views of faiss storage included) is hashed in place, anything
    else (only a crafted file holds one) in blocks of at most 16 MiB: never a copy of the array.
    """
    digest = hashlib.new(CHECKSUM, json.dumps([name, arr.dtype.str, list(arr.shape)]).encode() + b"\0")
    if arr.size and arr.dtype.itemsize:
        if arr.flags.c_contiguous:
            digest.update(arr.reshape(-1).view(np.uint8))
        else:
            arr = arr.reshape(1) if arr.ndim == 0 else arr
            step = max(1, (1 << 24) // max(1, arr[:1].nbytes))
            for i in range(0, len(arr), step):
                digest.update(np.ascontiguousarray(arr[i:i + step]).reshape(-1).view(np.uint8))
    return digest.hexdigest()


def _seal(header: dict, arrays: dict) -> dict:
    """The arrays of a format-4 file: ``arrays``, the header and the header's checksum.

    The header gets the checksum of every array (:func:`_array_digest`); its own checksum,
    which thus covers the whole file, is the array :data:`HEADER_CHECKSUM` (32 bytes).
    """
    header = dict(header, checksum=CHECKSUM,
                  checksums={key: _array_digest(key, value) for key, value in arrays.items()})
    sealed = dict(arrays, header=np.frombuffer(json.dumps(header).encode(), dtype=np.uint8))
    sealed[HEADER_CHECKSUM] = np.frombuffer(bytes.fromhex(_array_digest("header", sealed["header"])), dtype=np.uint8)
    return sealed


def _check_digests(path: str, header: dict, arrays: dict) -> None:
    """``ValueError`` naming the first array of a format-4 file that does not match its checksum.

    Runs before any array is interpreted: the header was checked against its own checksum
    (:data:`HEADER_CHECKSUM`) by the caller, and it lists every other array of the file.
    """
    stored = header.get("checksums")
    if header.get("checksum") != CHECKSUM or not isinstance(stored, dict):
        raise ValueError(_damaged(path, "header", f"it lists no {CHECKSUM} checksums"))
    for key in sorted(set(stored) | (set(arrays) - {"header", HEADER_CHECKSUM})):
        if key not in arrays:
            raise ValueError(_damaged(path, key, "the array is missing"))
        if key not in stored:
            raise ValueError(_damaged(path, key, "the array has no checksum stored for it"))
        if stored[key] != _array_digest(key, arrays[key]):
            raise ValueError(_damaged(path, key))


def _damaged(path: str, key: str, why: str | None = None) -> str:
    """The message of a file whose array ``key`` does not match the checksum stored with it."""
    what = f"{key} does not match the checksum stored with it" if why is None else f"{key}: {why}"
    return f"{path!r} is damaged: {what}; restore it from a backup or rebuild the index"



def _save(index, path) -> None:
    """Write ``index`` to ``path`` (:meth:`backfill_lib.live_index.OnlineBackfillIndex.save`)."""
    path = check_path(path)
    psi_bytes, psi_class = _psi_payload(index.psi)
    with index._lock.read():
        arrays = {}
        header = {"magic": FILE_MAGIC, "version": FILE_VERSION, "dim_old": index.dim_old,
                  "dim_new": index.dim_new, "chunk_rows": index.chunk_rows, "psi_class": psi_class}
        if index.score_maps is not None:
            header["score_maps"] = {n: [m.scale, m.offset, m.method, m.n_pairs] for n, m in index.score_maps.items()}
        for name, part in index._parts.items():
            header[f"{name}_index"] = part.spec
            header[f"{name}_params"] = part.params
            part_header, part_arrays = part.state()
            header.update({f"{name}_{key}": value for key, value in part_header.items()})
            arrays.update({f"{name}_{key}": value for key, value in part_arrays.items()})
            arrays[f"{name}_ids"] = index._ids[index._in_new == (name == "new")]
        if psi_bytes is not None:
            arrays["psi"] = np.frombuffer(psi_bytes, dtype=np.uint8)
        # Hashed and written inside the lock: chunk codes and IVF lists are views of the faiss
        # storage (hashed in place, written without a copy).
        arrays = _seal(header, arrays)
        _atomic_write(path, lambda f: np.savez(f, **arrays))


def _load(cls, path):
    """The index of class ``cls`` a file holds (:meth:`backfill_lib.live_index.OnlineBackfillIndex.load`)."""
    path = check_path(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"path {path!r} is a directory, not an index file written by OnlineBackfillIndex.save")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no index file at {path!r}")
    _remove_stale_temps(path)
    not_index = f"{path!r} is not an OnlineBackfillIndex file (written by OnlineBackfillIndex.save)"
    reading = None  # the array being read
    try:
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise ValueError(f"it holds one numpy array of shape {data.shape} (a .npy file), not an index")
        arrays = {}
        with data:
            for reading in data.files:
                arrays[reading] = data[reading]
        reading = None
        header_bytes = _bytes_array(arrays["header"], "header")
    except zipfile.BadZipFile as exc:
        if reading is not None and "CRC" in str(exc):  # the zip container's CRC-32 of that array
            raise ValueError(_damaged(path, reading)) from None
        raise ValueError(f"{not_index}: {type(exc).__name__}: {exc}") from None
    except Exception as exc:
        raise ValueError(f"{not_index}: {type(exc).__name__}: {exc}") from None
    # Format 4: the header is checked against its own checksum before it is read, and every
    # other array against the checksum the header holds for it before any is interpreted.
    sealed = HEADER_CHECKSUM in arrays
    if sealed:
        stored = arrays[HEADER_CHECKSUM]
        digest = bytes.fromhex(_array_digest("header", header_bytes))
        if stored.dtype != np.uint8 or stored.ndim != 1 or stored.tobytes() != digest:
            raise ValueError(_damaged(path, "header"))
    try:
        header = json.loads(header_bytes.tobytes().decode())
    except Exception as exc:
        raise ValueError(f"{not_index}: {type(exc).__name__}: {exc}") from None
    if not isinstance(header, dict) or header.get("magic") != FILE_MAGIC:
        raise ValueError(not_index)
    version = header.get("version")
    if type(version) is not int or not 1 <= version <= FILE_VERSION:
        raise ValueError(f"{path!r} has index format version {version!r}; this library reads 1 to {FILE_VERSION}")
    if version >= 4:
        if not sealed:
            raise ValueError(_damaged(path, HEADER_CHECKSUM, "the array is missing"))
        _check_digests(path, header, arrays)
    elif sealed:
        raise ValueError(_damaged(path, "header", f"format version {version} has no {HEADER_CHECKSUM}"))
    else:
        warnings.warn(f"{path!r} was written in index format version {version}, without a checksum: damage to "
                      "it cannot be detected; save it again (OnlineBackfillIndex.save) to add one",
                      UserWarning, stacklevel=3)
    damaged = f"{path!r} is not a valid OnlineBackfillIndex file (damaged or altered)"
    try:
        index = _from_arrays(cls, header, arrays, version)
    except _BadFile as exc:
        raise ValueError(f"{damaged}: {exc}") from None
    if "score_maps" in header:
        from ..calibration import ScoreMap

        try:
            index.score_maps = {n: ScoreMap(float(v[0]), float(v[1]), str(v[2]), int(v[3]))
                                for n, v in header["score_maps"].items()}
        except Exception as exc:
            raise ValueError(f"{damaged}: score_maps: {exc}") from None
    psi_class = header.get("psi_class")
    if psi_class is not None:
        if not isinstance(psi_class, str) or "psi" not in arrays:
            raise ValueError(f"{damaged}: psi_class {psi_class!r} without a stored psi")
        index.psi = _load_psi(psi_class, arrays["psi"], damaged)
    elif "psi" in arrays:
        raise ValueError(f"{damaged}: a stored psi without its class")
    return index


def _from_arrays(cls, header: dict, arrays: dict, version: int) -> "OnlineBackfillIndex":
    """The index a file's header and arrays describe, every field checked (``_BadFile`` if not)."""
    for key in ("dim_old", "dim_new", "chunk_rows"):
        value = header.get(key, CHUNK_ROWS if key == "chunk_rows" else None)
        if type(value) is not int or value < 1:
            raise _BadFile(f"{key} is {value!r}, not a positive integer")
    for key in ("old_index", "new_index"):
        if not isinstance(header.get(key), str):
            raise _BadFile(f"{key} is {header.get(key)!r}, not a faiss factory string")
    try:
        index = cls(header["dim_old"], header["dim_new"], header["old_index"], header["new_index"],
                    chunk_rows=header.get("chunk_rows", CHUNK_ROWS))
    except (TypeError, ValueError) as exc:
        raise _BadFile(str(exc)) from None
    part_ids = {}
    for name, part in index._parts.items():
        part_header = {key[len(name) + 1:]: value for key, value in header.items() if key.startswith(f"{name}_")}
        part_arrays = {key[len(name) + 1:]: value for key, value in arrays.items() if key.startswith(f"{name}_")}
        where = f"the {name} part ({part.spec!r})"
        if version > 1 and part_header.get("layout") != _layout(part, version):
            raise _BadFile(f"{where}: layout {part_header.get('layout')!r} does not fit its index type")
        if "chunk_rows" in part_header and part_header["chunk_rows"] != index.chunk_rows:
            raise _BadFile(f"{where}: chunk_rows {part_header['chunk_rows']!r} is not the index's {index.chunk_rows}")
        params = part_header.get("params", {})
        if not isinstance(params, dict):
            raise _BadFile(f"{where}: params {params!r} is not a mapping")
        try:
            params = {key: _check_search_param(part, key, value) for key, value in params.items()}
        except (TypeError, ValueError) as exc:
            raise _BadFile(f"{where}: {exc}") from None
        part.params = dict(params)  # set on the chunks and views that restore() makes
        try:
            part.restore(part_header, part_arrays, version)
            ids = _id_array(part_arrays["ids"], f"{name}_ids")
            held = part.held_ids()
        except (RuntimeError, KeyError, ValueError, TypeError, AttributeError, IndexError) as exc:
            message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
            raise _BadFile(f"{where} cannot be read ({type(exc).__name__}: {message})") from None
        for key, value in params.items():
            part.set_param(key, value)  # over what the stored faiss index carried
        tombs = part.tombs
        dup = repeated(held)
        if len(dup):
            raise _BadFile(f"{where}: its faiss storage holds ids {dup[:5].tolist()} twice")
        if len(held) != len(ids) + len(tombs) or not np.array_equal(np.sort(held), np.sort(np.r_[ids, tombs])):
            raise _BadFile(f"{where}: its {len(ids)} ids (and {len(tombs)} tombstones) are not the "
                           f"{len(held)} ids its faiss storage holds")
        part_ids[name] = ids
    all_ids = np.concatenate([part_ids["old"], part_ids["new"]])
    order = np.argsort(all_ids, kind="stable")
    index._ids = all_ids[order]
    index._in_new = (order >= len(part_ids["old"]))
    index._n_new = len(part_ids["new"])
    dup = repeated(index._ids)
    if len(dup):
        raise _BadFile(f"ids {dup[:5].tolist()} are stored twice")
    return index



class _BadFile(Exception):
    """A file that does not describe a valid index (turned into a ``ValueError`` naming the file)."""


def _layout(part, version: int) -> str:
    """The layout a part of this type has in a file of format ``version`` (2 or later)."""
    if isinstance(part, _ChunkedPart):
        return "chunks"
    if isinstance(part, _IVFListsPart) and version >= 3:
        return part.LAYOUT
    return "single"  # before format 3, an IVF-Flat part was one faiss index too



def _psi_payload(psi) -> tuple:
    """``(bytes, registered class name)`` of ``psi`` for :meth:`OnlineBackfillIndex.save` (None, None without one).

    Refuses a class that is not registered (the file could not be loaded back) and warns for a
    class defined in ``__main__`` (the file then loads only where it is registered again).
    """
    if psi is None:
        return None, None
    from .. import transforms

    cls = type(psi)
    name = transforms.transform_name(cls)
    if name is None:
        raise TypeError(f"psi ({cls.__module__}.{cls.__qualname__}) cannot be saved with the index: its class is not "
                        f"registered, so the file could not be loaded back (loading never imports code named in a "
                        f"file). Register it first: backfill_lib.transforms.register_transform({cls.__qualname__}) "
                        f"(the class needs to_bytes() and a class method from_bytes(data), or save(path) and a "
                        f"class method load(path)); or set index.psi = None to save the index without it")
    if cls.__module__ == "__main__":
        warnings.warn(f"psi's class {cls.__qualname__} is defined in __main__ (a script or notebook): the index file "
                      f"loads only in a process that registers it again first, with backfill_lib.transforms."
                      f"register_transform({cls.__qualname__}, name={name!r}); define it in a module to avoid this",
                      UserWarning, stacklevel=4)
    if callable(getattr(psi, "to_bytes", None)) and callable(getattr(cls, "from_bytes", None)):
        data = psi.to_bytes()
    else:  # a class with save(path) / load(path): a private folder in the system's temp, not the index's
        with tempfile.TemporaryDirectory(prefix="backfill_psi-") as folder:
            file = os.path.join(folder, "psi")
            psi.save(file)
            if not os.path.isfile(file):
                raise TypeError(f"psi.save({file!r}) wrote no file at that path: {cls.__qualname__}.save must write "
                                "the path it is given")
            with open(file, "rb") as f:
                data = f.read()
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"psi.to_bytes() returned {type(data).__name__}, not bytes")
    return bytes(data), name


def _load_psi(name: str, payload: np.ndarray, damaged: str):
    """The ``psi`` a file stores, by its class registered under ``name`` (never imported by name)."""
    from .. import transforms

    try:
        cls = transforms.transform_class(name)
    except ValueError:
        raise ValueError(f"the index file stores psi of class {name!r}, which is not a registered transform: loading "
                         f"never imports a module named in a file (that would run code from the file). If you trust "
                         f"the file and have that class, call backfill_lib.transforms.register_transform(TheClass, "
                         f"name={name!r}) before OnlineBackfillIndex.load") from None
    if payload.dtype != np.uint8 or payload.ndim != 1:
        raise ValueError(f"{damaged}: psi is {payload.dtype} {payload.shape}, not serialized bytes")
    data = payload.tobytes()
    try:
        if callable(getattr(cls, "from_bytes", None)):
            psi = cls.from_bytes(data)
        else:  # a class with only load(path): a private folder in the system's temp, not the index's
            with tempfile.TemporaryDirectory(prefix="backfill_psi-") as folder:
                file = os.path.join(folder, "psi")
                with open(file, "wb") as f:
                    f.write(data)
                psi = cls.load(file)
    except Exception as exc:
        raise ValueError(f"{damaged}: its psi ({name}) cannot be read ({type(exc).__name__}: {exc})") from None
    if not isinstance(psi, cls) or not callable(getattr(psi, "transform", None)):
        raise ValueError(f"{damaged}: its psi was read as a {type(psi).__name__}, not the {name} its header names")
    return psi


#: Temporary files of a path written by another version of this library (no writer id in their
#: name) are removed once left unmodified this long (seconds): a live writer changes its file as
#: it writes, and no save stalls for an hour.
LEGACY_TEMP_AGE = 3600
_HOST = format(zlib.crc32(socket.gethostname().encode()), "08x")


def _temp_name(path: str) -> str:
    """``.<name>.<host>-<pid>.<random>.tmp`` beside ``path``: its writer can be told alive or gone."""
    directory, base = os.path.split(os.path.abspath(path))
    return os.path.join(directory, f".{base}.{_HOST}-{os.getpid()}.{uuid.uuid4().hex}.tmp")


def _process_alive(pid: int) -> bool:
    if pid <= 0 or pid == os.getpid() or os.name != "posix":
        return True  # not a process id, this process (another thread's save), or no safe probe: kept
    try:
        os.kill(pid, 0)  # signal 0: nothing is sent, only whether the process exists
    except ProcessLookupError:
        return False
    except (OSError, OverflowError, ValueError):
        return True  # exists (another user's) or unknown: kept
    return True


def _remove_stale_temps(path: str) -> list:
    """Remove the temporary files of ``path`` that a killed save left; returns their paths.

    A temporary file is removed only when it cannot belong to a save still running: written on
    this host by a process that no longer exists (its pid, a kill's leftover), or with a name
    from before writers put their pid in it and unmodified for :data:`LEGACY_TEMP_AGE`. A
    running save's file (this process or another, this host or another) is never touched.
    Errors are ignored: a folder that cannot be listed or written (read-only) keeps its files.
    """
    directory, base = os.path.split(os.path.abspath(path))
    pattern = re.compile(r"\." + re.escape(base) + r"\.(?:([0-9a-f]{8})-([0-9]{1,10})\.)?[0-9a-f]{32}\.tmp\Z")
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    removed = []
    for name in names:
        match = pattern.match(name)
        if match is None:
            continue
        full = os.path.join(directory, name)
        host, pid = match.groups()
        try:
            if host is None:
                stale = time.time() - os.stat(full).st_mtime > LEGACY_TEMP_AGE
            else:
                stale = host == _HOST and not _process_alive(int(pid))
            if stale:
                os.remove(full)
                removed.append(full)
        except OSError:
            pass
    return removed


def _atomic_write(path: str, write) -> None:
    """Write a file under a temporary name, fsync it, rename it over ``path``, fsync the directory.

    Temporary files of ``path`` left by killed writers are removed first (:func:`_remove_stale_temps`).
    """
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"cannot write {path!r}: its folder {directory!r} does not exist (create it first)")
    if os.path.isdir(path):
        raise IsADirectoryError(f"cannot write {path!r}: it is a directory; give a file path, e.g. "
                                f"{os.path.join(path, 'index.npz')!r}")
    _remove_stale_temps(path)
    tmp = _temp_name(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    # The rename itself is durable only once the directory entry is on disk.
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
