"""Adopting the faiss index that already serves: its file of old vectors becomes the old part.

:meth:`backfill_lib.live_index.OnlineBackfillIndex.from_faiss` reads an existing faiss index file
of old vectors (the index a service searched before the migration) into the old part of a new
:class:`~backfill_lib.live_index.OnlineBackfillIndex`, every item stored old, so a backfill can
start from it. The file is the rollback point: it is opened read-only and never written (neither
by the adoption nor by any later backfill or save of the index, which writes its own file and
refuses that path), so going back to it is serving it again.

What it reads. An ``IndexFlatIP`` (bare: ids ``0 .. n-1`` unless ``ids`` are given; or inside an
``IndexIDMap`` / ``IndexIDMap2``, whose ids it keeps) and an ``IndexIVFFlat`` with the
inner-product metric (its own ids, its coarse quantizer and its ``nprobe``). It refuses, with a
``ValueError`` naming the file and saying what to do: the L2 metric (this index scores by inner
product of unit vectors), rows that are not finite and unit-norm, an id stored twice, negative
ids, and every other faiss type (a part could not serve it as it is).

Copy or wrap. The vectors are copied once, into the old part's own layout
(:mod:`backfill_lib.live_index.parts`): chunks of ``chunk_rows`` for a flat index, one container
per inverted list for IVF-Flat. Wrapping the faiss index read from the file would keep the old
part in one ``std::vector`` (a flat index) or one per list that faiss never shrinks, so the old
part would hold the gallery's full size until the backfill ends, while the new part grows: the
layouts exist to give that memory back as items leave. The copy costs no second copy in memory:
the file is mapped read-only (faiss's ``IO_FLAG_MMAP_IFC`` for flat codes, ``IO_FLAG_MMAP`` for
inverted lists; a plain read where this faiss cannot map the type) and copied into the part
piece by piece, so the process holds the part, plus pages of the file the system can drop. The
ids are copied too (8 bytes per item).
Measured at 10⁶ unit vectors of dimension 128 (a 520 MB file; ``IndexIDMap`` over
``IndexFlatIP``, and ``IVF256,Flat``; two runs each on a shared 2-core machine): the process
memory added by an adoption peaked at 510 MB, against 496 MB for ``faiss.read_index`` alone and
998 MB when the file is read instead of mapped; 1.2 to 1.6 s, against 0.7 to 0.9 s for
``faiss.read_index``. An adopted IVF part returns the file's results (200 queries, ``nprobe``
16: the same ids and scores).
"""

from __future__ import annotations

import os

import faiss
import numpy as np

from ..retrieval import _as_ids
from ..validation import check_no_repeats, check_path, repeated
from .parts import _check_unit_rows, _faiss_message

#: The faiss types :meth:`backfill_lib.live_index.OnlineBackfillIndex.from_faiss` reads (an error
#: lists them when a file holds another).
ADOPTABLE_TYPES = ("IndexFlatIP (bare, or in an IndexIDMap or IndexIDMap2) and IndexIVFFlat with "
                   "METRIC_INNER_PRODUCT")

# The fourcc faiss writes first for an IndexIVFFlat: its inverted lists can be mapped (IO_FLAG_MMAP).
_IVF_FLAT_FOURCC = b"IwFl"


def _from_faiss(cls, path, dim_new, new_index, ids, psi, score_maps, chunk_rows):
    """The body of :meth:`backfill_lib.live_index.OnlineBackfillIndex.from_faiss`."""
    path = check_path(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"path {path!r} is a directory, not a faiss index file (written by faiss.write_index)")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no faiss index file at {path!r}")
    read = _read(path)
    kind = type(read).__name__
    id_map = None
    if isinstance(read, faiss.IndexIDMap):  # IndexIDMap2 too (a subclass here)
        id_map = faiss.vector_to_array(read.id_map).astype(np.int64)
        inner = faiss.downcast_index(read.index)
        kind = f"{kind} over {type(inner).__name__}"
    else:
        inner = read
    flat = isinstance(inner, faiss.IndexFlat)  # IndexFlatIP, IndexFlatL2 (refused below by its metric)
    ivf_flat = type(inner) is faiss.IndexIVFFlat and id_map is None
    if not (flat or ivf_flat):
        raise ValueError(f"{path!r} holds a faiss {kind}, which from_faiss cannot adopt: it reads {ADOPTABLE_TYPES}. "
                         "Read its vectors yourself and store them with OnlineBackfillIndex(...).add_old(ids, vectors)")
    if inner.metric_type != faiss.METRIC_INNER_PRODUCT:
        metric = "METRIC_L2" if inner.metric_type == faiss.METRIC_L2 else f"metric {inner.metric_type}"
        raise ValueError(f"{path!r} holds a faiss {kind} with {metric}: this index scores by inner product of unit "
                         "vectors. For unit-norm vectors, L2 and inner product rank alike: write the same vectors "
                         "into an inner-product index (e.g. faiss.IndexIDMap(faiss.IndexFlatIP(d)) and "
                         "add_with_ids) and adopt that file")
    n, dim_old = int(inner.ntotal), int(inner.d)
    if id_map is not None and len(id_map) != n:
        raise ValueError(f"{path!r} is not a valid faiss index: its id map holds {len(id_map)} ids for {n} vectors")
    if ids is not None and (not flat or id_map is not None):
        raise ValueError(f"ids: {path!r} holds a faiss {kind}, which stores its own ids; give ids only for a bare "
                         "IndexFlatIP (whose items are numbered 0 .. n-1)")
    spec = "Flat" if flat else f"IVF{int(inner.nlist)},Flat"
    index = cls(dim_old, dim_new, old_index=spec, new_index=new_index, psi=psi, chunk_rows=chunk_rows,
                score_maps=score_maps)
    if flat:
        item_ids = _adopt_flat(path, index._parts["old"], inner, _flat_ids(path, n, ids, id_map))
    else:
        item_ids = _adopt_ivf_lists(path, index._parts["old"], inner)
    del read, inner  # the file's mapping is closed with the faiss index read from it (flat)
    index._ids = np.sort(item_ids)
    index._in_new = np.zeros(len(item_ids), dtype=bool)
    index._n_new = 0
    index._adopted_from = os.path.abspath(path)
    return index


def _adopt_flat(path: str, part, flat, ids: np.ndarray) -> np.ndarray:
    """Copy a flat index's rows into ``part`` (an empty chunked part), in chunks; returns ``ids``."""
    n, size = int(flat.ntotal), int(flat.code_size)
    if not n:
        return ids
    codes = faiss.rev_swig_ptr(flat.codes.data(), n * size).reshape(n, size)  # a view of the mapped file
    _check_rows(path, codes, part.dim)
    part._fill(ids, codes=codes, exact=True)  # every chunk allocated first, then one copy each
    return ids


def _flat_ids(path: str, n: int, ids, id_map) -> np.ndarray:
    """The ids of a flat index's rows: its id map's, ``ids`` (checked), or ``0 .. n-1``."""
    if id_map is not None:
        _check_file_ids(path, id_map)
        return id_map
    if ids is None:
        return np.arange(n, dtype=np.int64)
    arr = np.atleast_1d(np.asarray(ids))
    if arr.ndim != 1 or len(arr) != n:
        raise ValueError(f"ids has shape {arr.shape}, but {path!r} holds {n} vectors: give one id per stored vector, "
                         "in the order they were added")
    out = _as_ids(arr, n)
    check_no_repeats(out, "ids", "each item is stored once")
    return out


def _check_file_ids(path: str, held: np.ndarray) -> None:
    if len(held) and held.min() < 0:
        raise ValueError(f"{path!r} stores negative ids {held[held < 0][:5].tolist()}: this index needs ids from 0 "
                         "to 2**63 - 1; renumber the items and write the file again")
    dup = repeated(held)
    if len(dup):
        raise ValueError(f"{path!r} stores ids {dup[:5].tolist()} more than once: each item must be stored once "
                         "(remove the repeated entries from the faiss index, faiss.Index.remove_ids, and keep one)")


def _check_rows(path: str, codes: np.ndarray, dim: int) -> None:
    try:
        _check_unit_rows(codes, dim)
    except ValueError as exc:
        raise ValueError(f"{path!r}: {exc}; this index scores by inner product of unit vectors: normalise them "
                         "(faiss.normalize_L2) before they are indexed") from None


def _adopt_ivf_lists(path: str, part, ivf) -> np.ndarray:
    """Copy an ``IndexIVFFlat``'s lists into ``part`` (an empty IVF-Flat part), list by list; returns the ids."""
    nlist, code_size = int(ivf.nlist), int(ivf.code_size)
    if not ivf.is_trained and ivf.ntotal:
        raise ValueError(f"{path!r} is not a valid faiss index: an untrained IVF index holding {ivf.ntotal} vectors")
    invlists = ivf.invlists
    sizes = np.array([invlists.list_size(l) for l in range(nlist)], dtype=np.int64)
    if sizes.sum() != ivf.ntotal:
        raise ValueError(f"{path!r} is not a valid faiss index: its lists hold {sizes.sum()} entries for "
                         f"{ivf.ntotal} vectors")
    held = []
    for l in np.nonzero(sizes)[0]:
        n = int(sizes[l])
        held.append(faiss.rev_swig_ptr(invlists.get_ids(int(l)), n).astype(np.int64))
    held = np.concatenate(held) if held else np.empty(0, dtype=np.int64)
    _check_file_ids(path, held)  # before any list is copied
    # The file's quantizer and search parameters serve as they did; its lists move to the part's
    # containers (the template keeps none).
    nprobe = int(ivf.nprobe)
    part.template = ivf
    part._make_view()
    for l in np.nonzero(sizes)[0]:
        n = int(sizes[l])
        ids = faiss.rev_swig_ptr(invlists.get_ids(int(l)), n)
        codes = faiss.rev_swig_ptr(invlists.get_codes(int(l)), n * code_size).reshape(n, code_size)
        _check_rows(path, codes, part.dim)
        part._set_list(int(l), ids, codes, n)
    # The file's lists are freed (unmapped) with the container the template owned; it keeps an
    # empty one, as a part's template does.
    part._template_lists = faiss.ArrayInvertedLists(nlist, code_size)
    ivf.replace_invlists(part._template_lists, False)
    ivf.ntotal = 0
    if ivf.direct_map.type != faiss.DirectMap.NoMap:
        ivf.make_direct_map(False)
    part._refresh()
    part.set_param("nprobe", min(max(nprobe, 1), nlist))
    return held


def _read(path: str):
    """The faiss index in ``path``, mapped read-only where faiss can (see the module docstring)."""
    with open(path, "rb") as f:
        fourcc = f.read(4)
    flags = faiss.IO_FLAG_MMAP if fourcc == _IVF_FLAT_FOURCC else getattr(faiss, "IO_FLAG_MMAP_IFC", 0)
    try:
        return faiss.read_index(path, flags)
    except RuntimeError:
        pass
    try:
        return faiss.read_index(path)
    except RuntimeError as exc:
        raise ValueError(f"{path!r} is not a faiss index file faiss can read ({_faiss_message(exc)}): give the "
                         "file written by faiss.write_index of the index that serves") from None
