"""The evaluation engine: exact metrics of every state of a backfill at the cost of about one ranking.

:func:`~backfill_lib.backfill.evaluate_backfill` asks this module for the average precision and
the top-k hits of each query at several *states* of one backfill: in state ``k`` the first
``n_backfilled[k]`` items of the backfill order ``π`` are stored new, the others old. The
answers are exact (no approximation, no sampling); only the way they are computed differs from
sorting every merged score row at every state.

How it works, for a chunk of queries at a time (memory ``O(chunk_size × N)``):

- Scores are compared as integers: each float32 score is mapped to an ``int32`` key with the
  same order (``-0.0`` and ``0.0`` are the same score), so equal scores are exactly equal keys
  on every device.
- The gallery is cut into *slices*, ``π[m_{k-1}:m_k]``: the items that change storage between
  two consecutive states. Every slice's old scores and new scores are sorted once (the slice
  sizes add up to ``N``). How many items score at least ``v`` in state ``k`` is then a sum over
  the slices, each slice counted with one binary search in its new scores if it is backfilled
  in state ``k`` and in its old scores otherwise.
- Only the relevant items are counted this way (each with its old and its new score), so
  average precision costs ``O(R log N)`` per query and state instead of a sort of the row.
  Precision at a relevant item needs its rank among the relevant items only (a sort of ``R``).
- Top-k: a query has a hit in its top ``k`` when its best relevant item has fewer than ``k``
  items ahead of it. The items ahead are counted like above; ties at that score are resolved by
  a scan of the row, which happens only when the best relevant item is tied.
- Many relevant items per query (few classes: the book's data sets have 10, so a query has
  N/10 relevant items) make those binary searches outnumber the gallery. Such queries are
  counted another way (``counting="sorted"``, chosen automatically), without sorting the row:
  each query's relevant scores (old and new) are sorted, every one of its ``2N`` old and new
  scores is placed among them (a score bucket, then a comparison with the few relevant scores
  sharing its bucket), and one histogram by (space, slice) and place counts, for every
  relevant score, the items of each (space, slice) that score less. Every state is then a sum
  over the slices stored old and new in it, and AP and top-k hits of all states are computed
  at once.

Ties, one rule for the whole evaluation
    The ranking is by descending score, ties broken by the smaller gallery index (id), as in
    :func:`backfill_lib.metrics.topk_hits` and :meth:`backfill_lib.retrieval.MixedGallery.search`.
    Top-k hits follow this ranking. Average precision does not depend on how ties are broken:
    a group of tied items is one threshold, as in scikit-learn's ``average_precision_score``
    (the precision at a relevant item with score ``s`` is the share of relevant items among all
    items scoring ``≥ s``), as :func:`backfill_lib.metrics.average_precision` computes it.

Devices
    The counting runs on numpy, or on torch (a GPU when one is present): ``device=None`` picks
    CUDA if torch sees a GPU and numpy otherwise, without importing torch on a machine with no
    NVIDIA driver. Both paths count the same integer keys, so they give the same numbers as
    long as the two matrix products give the same float32 scores (they may differ in the last
    bit, which can reorder two items whose scores are that close).

The module imports numpy only; torch is imported when a torch device is used.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import numpy as np

from .validation import as_embeddings, as_labels, check_k, check_positive_int

#: Key of the lowest possible score: padding that never counts as "at least" a real score.
_PAD = np.iinfo(np.int32).min
_SIGN_OFF = np.int32(0x7FFFFFFF)


def _torch():
    import torch
    return torch


def _keys_inplace(scores, self_cols=None):
    """Turn a float32 score matrix (numpy or torch) into int32 keys of the same order, in place.

    ``scores[i, self_cols[i]]`` (leave-one-out) gets ``-inf``: it ranks after every real score.
    """
    scores += 0.0  # -0.0 becomes 0.0: equal scores must get equal keys
    if self_cols is not None:
        rows = (np.arange(len(self_cols)) if isinstance(scores, np.ndarray)
                else _torch().arange(len(self_cols), device=scores.device))
        scores[rows, self_cols] = -np.inf
    bits = scores.view(np.int32) if isinstance(scores, np.ndarray) else scores.view(_torch().int32)
    # Negative floats compare in reverse of their bit patterns: flip their magnitude bits.
    bits ^= (bits >> 31) & int(_SIGN_OFF)
    return bits


def _row_offsets(n_rows: int) -> np.ndarray:
    # Keys shifted to [0, 2^32) plus 2^32 per row: a chunk of sorted rows is one sorted 1-D array,
    # so one np.searchsorted answers every row (numpy has no row-wise searchsorted).
    return ((np.arange(n_rows, dtype=np.int64) << 32) + (1 << 31))[:, None]


def _flat(keys: np.ndarray) -> np.ndarray:
    return np.add(keys, _row_offsets(len(keys)), dtype=np.int64).ravel()  # one pass, cast on the fly


def _count_ge_within_rows(keys: np.ndarray) -> np.ndarray:
    """``out[i, a]``: how many keys of row ``i`` are ``≥ keys[i, a]`` (ties count: one threshold)."""
    n_rows, width = keys.shape
    order = np.argsort(keys, axis=1)
    srt = np.take_along_axis(keys, order, axis=1)
    # In ascending order, the keys >= srt[p] start at the first position of srt[p]'s run of equals.
    run_start = np.zeros(keys.shape, dtype=np.int64)
    run_start[:, 1:] = np.where(srt[:, 1:] != srt[:, :-1], np.arange(1, width), 0)
    np.maximum.accumulate(run_start, axis=1, out=run_start)
    out = np.empty(keys.shape, dtype=np.int64)
    np.put_along_axis(out, order, width - run_start, axis=1)
    return out


class _RelevantItems:
    """The gallery items of each query's class, in ascending index, padded on the right."""

    def __init__(self, qy: np.ndarray, gy: np.ndarray):
        n = len(gy)
        classes, g_class = np.unique(gy, return_inverse=True)
        q_class = np.searchsorted(classes, qy)
        known = (q_class < len(classes)) & (classes[np.minimum(q_class, len(classes) - 1)] == qy)
        self.class_of = np.where(known, q_class, len(classes))  # a query label absent from the gallery: no item
        per_class = np.bincount(g_class, minlength=len(classes) + 1)
        self.members = np.zeros((len(classes) + 1, max(int(per_class.max()), 1)), dtype=np.int64)
        self.valid = np.zeros(self.members.shape, dtype=bool)
        by_class = np.argsort(g_class, kind="stable")
        slot = np.arange(n) - np.repeat(np.cumsum(per_class) - per_class, per_class)
        self.members[g_class[by_class], slot], self.valid[g_class[by_class], slot] = by_class, True

    def of(self, rows: slice, exclude_self: bool):
        """``(ids, valid)`` of the query rows ``rows``; leave-one-out drops query ``i``'s own item ``i``."""
        ids, valid = self.members[self.class_of[rows]], self.valid[self.class_of[rows]]
        if exclude_self:
            valid &= ids != np.arange(rows.start, rows.stop)[:, None]
        return ids, valid


def _average_precision(rel_ge, ge_all, valid, has_rel, n_rel):
    """AP of each row: at each relevant item, relevant items scoring ``>=`` (``rel_ge``) over all items
    scoring ``>=`` (``ge_all``)."""
    precision = np.where(valid, rel_ge / np.maximum(ge_all, 1), 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(has_rel, precision.sum(axis=1) / n_rel, np.nan)


class _NumpyOps:
    """The heavy operations of the engine on numpy arrays."""

    name = "numpy"

    def __init__(self, *arrays):
        self.arrays = arrays

    def scores(self, query: int, rows: slice, gallery: int, self_cols):
        """The float32 scores of the query rows ``rows``; leave-one-out: ``-inf`` at ``self_cols``."""
        scores = self.arrays[query][rows] @ self.arrays[gallery].T
        if self_cols is not None:
            scores[np.arange(len(self_cols)), self_cols] = -np.inf
        return scores

    def keys(self, query: int, rows: slice, gallery: int, self_cols):
        scores = self.scores(query, rows, gallery, self_cols)
        # As _keys_inplace, a block of rows at a time with one scratch buffer: the temporaries
        # of the whole matrix would cost more than the arithmetic.
        step = max(1, 2 ** 18 // scores.shape[1])
        scratch = np.empty((step, scores.shape[1]), dtype=np.int32)
        for lo in range(0, len(scores), step):
            block = scores[lo:lo + step]
            block += 0.0
            bits, tmp = block.view(np.int32), scratch[:len(block)]
            np.right_shift(bits, 31, out=tmp)
            np.bitwise_and(tmp, _SIGN_OFF, out=tmp)
            np.bitwise_xor(bits, tmp, out=bits)
        return scores.view(np.int32)

    def gather(self, keys, cols):
        return np.take_along_axis(keys, cols, axis=1)

    def sort_block(self, keys, start: int, stop: int):
        srt = np.sort(keys[:, start:stop], axis=1)
        return _flat(srt), stop - start

    def needles(self, needles):
        return _flat(needles), needles.shape

    def count_ge(self, block, needles, select=None):
        (flat, width), (flat_needles, shape) = block, needles
        if select is None:
            idx = np.searchsorted(flat, flat_needles).reshape(shape)
            return (np.arange(1, shape[0] + 1, dtype=np.int64) * width)[:, None] - idx
        at = np.flatnonzero(select)
        out = np.zeros(shape[0] * shape[1], dtype=np.int64)
        out[at] = (at // shape[1] + 1) * width - np.searchsorted(flat, flat_needles[at])
        return out.reshape(shape)

    def tied_before(self, keys_old, keys_new, rows, new_mask, key, ids, position_ids):
        merged = np.where(new_mask[None, :], keys_new[rows], keys_old[rows])
        before = position_ids[None, :] < ids[:, None]
        return ((merged == key[:, None]) & before).sum(axis=1)


class _TorchOps:
    """The same operations on torch tensors of one device."""

    def __init__(self, device, *arrays):
        torch = _torch()
        self.torch, self.device, self.name = torch, torch.device(device), str(device)
        self.arrays = [torch.from_numpy(a).to(self.device) for a in arrays]

    def _t(self, x):
        return self.torch.from_numpy(np.ascontiguousarray(x)).to(self.device)

    def keys(self, query: int, rows: slice, gallery: int, self_cols):
        cols = None if self_cols is None else self._t(self_cols)
        return _keys_inplace(self.arrays[query][rows] @ self.arrays[gallery].T, cols)

    def gather(self, keys, cols):
        return self.torch.gather(keys, 1, self._t(cols)).cpu().numpy()

    def sort_block(self, keys, start: int, stop: int):
        return self.torch.sort(keys[:, start:stop], dim=1).values.contiguous()

    def needles(self, needles):
        return self._t(needles.astype(np.int32))

    def count_ge(self, block, needles, select=None):
        # Dense rows suit torch.searchsorted: count every needle, selected or not.
        return block.shape[1] - self.torch.searchsorted(block, needles).cpu().numpy()

    def tied_before(self, keys_old, keys_new, rows, new_mask, key, ids, position_ids):
        r = self._t(rows)
        merged = self.torch.where(self._t(new_mask)[None, :], keys_new[r], keys_old[r])
        before = self._t(position_ids)[None, :] < self._t(ids)[:, None]
        return ((merged == self._t(key)[:, None]) & before).sum(dim=1).cpu().numpy()


def _gpu_available() -> bool:
    # Importing torch costs seconds and hundreds of MB: skip it when no NVIDIA driver is there.
    if "torch" not in sys.modules and not os.path.exists("/dev/nvidiactl"):
        return False
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def choose_device(device=None) -> str:
    """The device the evaluation engine runs on.

    Parameters
    ----------
    device : {None, "numpy", "cpu", "cuda", "cuda:<i>"} or torch.device, optional
        ``None`` picks ``"cuda"`` when torch is installed and sees a GPU, ``"numpy"`` otherwise
        (torch is not imported for this on a machine without an NVIDIA driver). ``"cpu"`` is
        torch on the CPU (mainly to test the torch path).

    Returns
    -------
    str
        ``"numpy"`` or a torch device name.

    Raises
    ------
    ValueError
        If ``device`` is not one of the above, torch is not installed for a torch device, or
        CUDA is asked for but no GPU is visible.

    Examples
    --------
    >>> choose_device("numpy")
    'numpy'
    """
    if device is None:
        return "cuda" if _gpu_available() else "numpy"
    name = str(device)
    if name == "numpy":
        return name
    if name != "cpu" and not (name == "cuda" or name.startswith("cuda:")):
        raise ValueError(f"device must be None, 'numpy', 'cpu' or 'cuda' (or 'cuda:<i>'), got {device!r}")
    try:
        import torch
    except ImportError:
        raise ValueError(f"device={device!r} needs torch, which is not installed: use device='numpy'") from None
    if name != "cpu" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but torch sees no GPU: use device=None (automatic) or 'numpy'")
    return name


def check_order(order, n: int | None = None) -> np.ndarray:
    """Check that ``order`` is a permutation of ``range(n)``.

    Parameters
    ----------
    order : array (n,) of int
        A backfill order ``π``.
    n : int, optional
        Gallery size; default ``len(order)``.

    Returns
    -------
    ndarray (n,) of int64
        ``order`` as an array.

    Raises
    ------
    ValueError
        If ``order`` is not 1-D, not integers, or not a permutation of ``range(n)``.
    """
    try:
        order = np.asarray(order)
    except (ValueError, TypeError):
        raise ValueError("order must be a 1-D permutation of the gallery items, got a ragged sequence") from None
    if order.ndim != 1:
        raise ValueError(f"order must be a 1-D permutation of the gallery items, got shape {order.shape}")
    n = len(order) if n is None else n
    # A repeated or missing index would silently backfill fewer than round(r·N) items.
    if order.shape != (n,) or (n and not np.issubdtype(order.dtype, np.integer)) \
            or not np.array_equal(np.sort(order), np.arange(n)):
        raise ValueError(f"order must be a permutation of range({n}), e.g. from backfill_order")
    return order.astype(np.int64, copy=False)


def check_chunk_size(chunk_size) -> int:
    """Check the number of queries scored at once.

    Parameters
    ----------
    chunk_size : int
        A positive integer (``bool`` is refused).

    Returns
    -------
    int
        ``chunk_size`` as a Python int.

    Raises
    ------
    TypeError
        If ``chunk_size`` is not an integer.
    ValueError
        If ``chunk_size < 1``.
    """
    return check_positive_int(chunk_size, "chunk_size", "queries scored at once, e.g. 1024")


@dataclass
class StateMetrics:
    """Per-query metrics at each state of a backfill, as returned by :func:`evaluate_states`.

    Each parameter is kept as an attribute of the same name.

    Parameters
    ----------
    ap : float array (n_states, n_q)
        Average precision of each query in each state; ``nan`` for a query with no relevant item.
    hits : dict of int to bool array (n_states, n_q)
        ``hits[k][s, i]``: query ``i`` has a relevant item in its top ``k`` in state ``s``.
    device : str
        Where the engine ran (see :func:`choose_device`).
    """

    ap: np.ndarray
    hits: dict
    device: str


def _check_products(query, gallery, query_name: str, gallery_name: str) -> None:
    """Refuse vectors whose inner products could overflow float32 (to ±inf, or NaN): they would tie or
    rank arbitrarily. By Cauchy–Schwarz a product is at most the product of the two largest norms."""
    q_norm = float(np.sqrt(np.einsum("ij,ij->i", query, query, dtype=np.float64).max(initial=0.0)))
    g_norm = float(np.sqrt(np.einsum("ij,ij->i", gallery, gallery, dtype=np.float64).max(initial=0.0)))
    if q_norm * g_norm > 1e37:  # float32 overflows at 3.4e38; summing products keeps a margin
        raise ValueError(f"{query_name} and {gallery_name} have rows of norm {q_norm:.3g} and {g_norm:.3g}: their inner "
                         "products would overflow float32 and every score would tie; normalise the rows first, e.g. "
                         "with backfill_lib.validation.normalize_rows")


def _check_run(query_labels, gallery_labels, n_q: int, n: int, exclude_self, ks, chunk_size, device):
    """The checks both engines make of labels, ``exclude_self``, ``ks``, ``chunk_size`` and ``device``."""
    qy = as_labels(query_labels, "query_labels", n=n_q)
    gy = as_labels(gallery_labels, "gallery_labels", n=n)
    if not isinstance(exclude_self, (bool, np.bool_)):
        # bool("no") is True: a string or a number would switch leave-one-out on silently.
        raise TypeError(f"exclude_self must be True or False, got {exclude_self!r}")
    exclude_self = bool(exclude_self)
    if exclude_self and n_q != n:
        raise ValueError(f"exclude_self=True needs one query per gallery item, got {n_q} queries for {n} items")
    if isinstance(ks, (str, bytes)) or not hasattr(ks, "__len__") or len(ks) == 0:
        raise TypeError(f"ks must be a non-empty sequence of positive integers, e.g. (1, 5), got {ks!r}")
    ks = tuple(check_k(k, n - exclude_self, f"ks[{i}]") for i, k in enumerate(ks))
    return qy, gy, exclude_self, ks, check_chunk_size(chunk_size), choose_device(device)


@dataclass
class _QueryChunk:
    """One block of queries: ``rows`` of the query matrices and their relevant gallery items."""

    rows: slice
    c: int                 # number of queries
    self_cols: object      # leave-one-out: the column of each query's own item, else None
    ids: np.ndarray        # (c, width) relevant gallery indices per row (padded)
    valid: np.ndarray      # (c, width) which entries of ids are real
    n_rel: np.ndarray      # (c,) relevant items per query
    has_rel: np.ndarray    # (c,) whether a query has any


def _query_chunks(qy, gy, position, exclude_self: bool, chunk_size: int):
    """The query blocks of both engines, skipping a block in which no query has a relevant item.

    Such a block keeps AP nan and no hit for its queries.
    """
    relevant_items = _RelevantItems(qy, gy)
    n_q = len(qy)
    for start in range(0, n_q, chunk_size):
        rows = slice(start, min(start + chunk_size, n_q))
        ids, valid = relevant_items.of(rows, exclude_self)
        n_rel = valid.sum(axis=1)
        if (n_rel > 0).any():
            yield _QueryChunk(rows, rows.stop - rows.start, position[rows] if exclude_self else None, ids, valid,
                              n_rel, n_rel > 0)


class _Scores:
    """AP and top-k hits of every query in every state, filled state by state and block by block."""

    def __init__(self, n_states: int, n_q: int, ks):
        self.ap = np.full((n_states, n_q), np.nan)
        self.hits = {k: np.zeros((n_states, n_q), dtype=bool) for k in ks}
        self.ks, self.k_max = ks, max(ks)

    def score_state(self, s: int, ch: _QueryChunk, key, ge_all, count_above, tied_before) -> None:
        """Fill state ``s`` for the queries of ``ch``.

        ``key``/``ge_all`` (c, width): each relevant item's key in this state and how many items
        score at least that; ``count_above(best_key, best, counted)``: how many items score more
        than ``best_key`` (the key of relevant item ``best`` of each row), for the rows
        ``counted`` (others may be anything); ``tied_before(rows, key, ids)``: how many items
        tie ``key`` and come before gallery index ``ids``, for those rows.
        """
        valid, has_rel, rows = ch.valid, ch.has_rel, ch.rows
        self.ap[s, rows] = _average_precision(_count_ge_within_rows(key), ge_all, valid, has_rel, ch.n_rel)
        # The best relevant item (ties: the smaller index, first in its row) and the items ahead.
        arange_c = np.arange(ch.c)
        best = np.argmax(key, axis=1)
        best_key = key[arange_c, best]
        best_ge = ge_all[arange_c, best]
        ahead = np.zeros(ch.c, dtype=np.int64)  # items scoring strictly more
        # Only the best item itself scores >= its key: nothing is ahead, no need to count.
        counted = has_rel & (best_ge > 1)
        if counted.any():
            ahead = np.where(counted, count_above(best_key, best, counted), 0)
        tied = best_ge - ahead > 1
        resolve = np.flatnonzero(has_rel & tied & (ahead < self.k_max))
        if len(resolve):
            ahead[resolve] += tied_before(resolve, best_key[resolve], ch.ids[resolve, best[resolve]])
        for k in self.ks:
            self.hits[k][s, rows] = has_rel & (ahead < k)


def _blocks_above(ops, state_blocks):
    """``count_above`` of :meth:`_Scores.score_state` from the sorted key blocks of one state."""
    def count_above(best_key, best, counted):
        above = ops.needles(best_key.astype(np.int64)[:, None] + 1)
        ahead = np.zeros(len(best_key), dtype=np.int64)
        for block in state_blocks:
            ahead += ops.count_ge(block, above, counted[:, None])[:, 0]
        return ahead
    return count_above


# ---------------------------------------------------------------------------------------------
# Many relevant items per query (few classes): each query's 2N scores placed among its relevant ones.
# ---------------------------------------------------------------------------------------------

#: Bytes of scratch memory the sorted counting uses per block of rows (small enough that a
#: block's arrays stay in the processor's cache: 16 MiB ran 10-20 % faster than 64 MiB).
_SORTED_SCRATCH = 16 * 2**20

#: The sorted counting is used when the block counting would make more than this many binary
#: searches per gallery item and query (see :func:`_prefer_sorted`).
_SORTED_CROSSOVER = 0.7

#: Low bits of a packed needle (key << bits | code) that hold the code of its (space, slice).
_CODE_BITS = 16
_CODE_MASK = (1 << _CODE_BITS) - 1

#: The key of padding needles: above the key of every score (+inf is 0x7F800000; NaN never occurs).
_TOP = np.iinfo(np.int32).max

#: Score buckets per needle (relevant score) when the sorted counting places a row's scores.
_BUCKETS_PER_NEEDLE = 8


def _prefer_sorted(width: int, n: int, n_states: int) -> bool:
    """Whether a chunk with ``width`` relevant items per query is cheaper to count by placing
    each query's ``2N`` old and new keys among its sorted relevant ones than by binary searches
    in the slice blocks.

    The block counting makes about ``2 · width · (2S + 1)`` binary searches per query (each
    relevant item's two keys in every slice of both spaces); the sorted counting passes over the
    ``2N`` keys a few times and keeps ``S · 2 · width`` counts per query. Measured (11 states,
    one thread, both countings in one run, ratio to one argsort of the N x N scores), N = 5,000:
    10 classes, blocks 4.8x, sorted 1.6-2.3x; 50 classes 1.2x against 1.0x; 100 classes 0.89x
    against 0.93x. N = 2,000: 50 classes about even (1.7x), 100 classes 1.0x against 1.45x.
    See :data:`_SORTED_CROSSOVER`.
    """
    return 2 * width * (2 * n_states + 1) > _SORTED_CROSSOVER * n


def _sorted_needles(key_old, key_new, valid, item_slice, code_of):
    """Each row's relevant entries (every relevant item's old and new key), ascending by key.

    ``key_old``/``key_new`` (c, width) int32: the keys of each row's relevant items. Returns
    ``key_k`` (c, 2·width) int32, padding last with the key ``_TOP`` (above every real score);
    ``code_k``: the (space, slice) code of each (0: padding).
    """
    packed = np.concatenate([np.where(valid, key_old, _TOP), np.where(valid, key_new, _TOP)],
                            axis=1).astype(np.int64)
    packed <<= _CODE_BITS
    packed |= np.concatenate([np.where(valid, code_of[0][item_slice], 0), np.where(valid, code_of[1][item_slice], 0)],
                             axis=1)
    packed.sort(axis=1)  # by key, then code: one order however the sort breaks ties
    code_k = (packed & _CODE_MASK).astype(np.int32)
    packed >>= _CODE_BITS
    return packed.astype(np.int32), code_k


def _needles_at_or_below(entries, needle_key, valid, cols, n, n_buckets):
    """For each entry of each row, how many of the row's needles score at most it.

    ``entries`` (r, 2N) float32 scores, old entries then new ones; ``needle_key`` (r, 2w) ascending,
    padding (above every key) last: the keys of the entries ``cols`` and ``N + cols`` where
    ``valid`` (r, w). Returns that count ``seg`` (r, 2N) int32, and for each needle how many entries have
    exactly its key (``equal_to`` (r, 2w), counted for needles alone among the needles).

    Without a sort: each row's scores are cut into ``n_buckets`` buckets of equal width between
    its lowest and highest needle, by a float computation that is monotone in the score (so a
    needle in a lower bucket scores less than the entry, one in a higher bucket more); a table
    of the needles below each bucket gives the count, and only an entry sharing its bucket with
    needles is compared with them, key against key.
    """
    r, two_w = needle_key.shape
    rows = np.arange(r)[:, None]
    at = np.concatenate([cols, cols + n], axis=1)  # each needle's own entry
    valid_k = np.concatenate([valid, valid], axis=1)  # (in this order, not the needles')
    needle_scores = np.take_along_axis(entries, at, axis=1)
    lowest = np.where(valid_k, needle_scores, np.inf).min(axis=1)
    highest = np.where(valid_k, needle_scores, -np.inf).max(axis=1)
    lowest[~np.isfinite(lowest)], highest[~np.isfinite(highest)] = 0.0, 1.0  # a row without needles
    spread = highest.astype(np.float64) - lowest
    # A finite positive scale (a spread of 0 or a tiny one: any; a huge one: down to subnormal).
    scale = np.minimum(max(n_buckets - 3, 1) / np.where(spread > 0, spread, 1.0), 1e30).astype(np.float32)[:, None]
    # bucket = floor((score - lowest) · scale + 1), clipped to [0, n_buckets - 1]: each step is a
    # rounded float operation, monotone in the score (the scale is positive and finite, so no
    # step makes a NaN), so the bucket never decreases as the score grows; the needles are in
    # buckets >= 1, scores below them in 0 or 1, -inf (leave-one-out) in 0.
    with np.errstate(over="ignore"):  # a score far above the needles may go to +inf: clipped below
        bucket = np.subtract(entries, lowest[:, None])
        bucket *= scale
        bucket += 1
    np.clip(bucket, 0, n_buckets - 1, out=bucket)
    bucket = bucket.astype(np.int32)
    needle_bucket = np.take_along_axis(bucket, at, axis=1)
    # below[b]: needles in buckets < b (b = 0 .. n_buckets), row by row.
    in_bucket = np.bincount((needle_bucket + rows * n_buckets)[valid_k], minlength=r * n_buckets)
    # table[b] = 2 · (needles in buckets < b) + (whether bucket b holds needles), row by row.
    has = in_bucket > 0
    np.cumsum(in_bucket.reshape(r, n_buckets), axis=1, out=in_bucket.reshape(r, n_buckets))
    table = np.empty(r * n_buckets, dtype=np.int32)
    table[0] = 0
    np.left_shift(in_bucket[:-1], 1, out=table[1:], casting="unsafe")
    table[::n_buckets] = 0  # the counts start again in each row
    table |= has
    del in_bucket, has
    bucket += (np.arange(r, dtype=np.int32) * n_buckets)[:, None]
    seg = table[bucket]
    del bucket
    seg_flat = seg.ravel()
    share = np.flatnonzero(seg_flat & 1)  # entries whose bucket holds needles
    seg >>= 1
    row_of = share // entries.shape[1]
    key_at = _keys_inplace(entries.ravel()[share])  # compared as keys: -0.0 is 0.0
    first = seg_flat[share].astype(np.int64)
    # Compare with the needles of the bucket one at a time (few share a bucket).
    base = row_of * two_w
    flat_needles = needle_key.ravel()
    pos = first.copy()
    equal = np.zeros(len(share), dtype=bool)  # the last needle at or below the entry has its key
    todo = np.arange(len(share))
    while len(todo):
        at_or_below, key_todo = pos[todo], key_at[todo]
        nxt = flat_needles[base[todo] + np.minimum(at_or_below, two_w - 1)]
        more = (at_or_below < two_w) & (nxt <= key_todo)
        todo = todo[more]
        equal[todo] = nxt[more] == key_todo[more]
        pos[todo] += 1
    seg_flat[share] = pos
    equal_to = np.bincount(base[equal] + pos[equal] - 1, minlength=r * two_w).reshape(r, two_w)
    return seg, equal_to


def _score_sorted(result, ch, scores_old, scores_new, key_old, key_new, cols, item_slice, bounds, slice_at, new_masks,
                  tied_before):
    """Fill every state of ``result`` for the queries of ``ch``, counting row by row over the ``2N`` entries.

    A row's *entries* are every item's old key and new key, each in the block of its *code*
    (space, slice); its *needles* are its relevant entries, sorted. Each entry is placed among
    the needles (:func:`_needles_at_or_below`: how many needles score at most it), and one
    histogram by (code, place) counts, for every needle, the entries of each code scoring less.
    In state ``s`` the old entries of the slices after ``s`` and the new entries of the slices
    up to ``s`` are *active* (they make the merged ranking of state ``s``); with the codes in
    the order old slices then new slices, they are one range of codes, so a cumulative sum over
    the codes gives, for every state, the active entries scoring less than each needle; the
    items scoring at least it are the others.

    AP: in state ``s`` a row has one active needle per relevant item; taken in ascending key,
    the ``t``-th of ``R`` has ``R - t`` relevant items scoring at least it (a tied group counts
    from its first), so AP is ``Σ_t (R - t) / ge_t / R``. Top-k: the best relevant item is the
    last active needle; when no other entry shares its key, ``ge - 1`` items are ahead of it.
    Otherwise (ties, rare with continuous scores) the state's ranking is recounted for that
    query: items scoring more, plus tied items of smaller gallery index (``tied_before(s)``, as
    :meth:`_NumpyOps.tied_before` on the scores).

    ``scores_old``/``scores_new`` (c, N) float32 (``-inf``: left out); ``key_old``/``key_new``
    (c, width) int32: the keys of each row's relevant items (``_PAD`` where not ``ch.valid``).
    """
    c, n = scores_old.shape
    width = cols.shape[1]
    two_w, n_seg = 2 * width, 2 * width + 1
    n_states = len(new_masks)
    n_slices = n_states + 1
    states = np.arange(n_states)
    # Codes 1.. of the non-empty (space, slice) blocks (0: a padding needle, no entry).
    blocks = [(half, j) for half in (0, 1) for j in range(n_slices) if bounds[j + 1] > bounds[j]]
    n_codes = len(blocks)
    code_of = np.zeros((2, n_slices), dtype=np.int64)
    for q, (half, j) in enumerate(blocks, start=1):
        code_of[half, j] = q
    block_space = np.array([half for half, _ in blocks])
    block_slice = np.array([j for _, j in blocks])
    active = np.where(block_space[:, None] == 0, block_slice[:, None] > states,
                      block_slice[:, None] <= states)  # (codes, states)
    total_active = (bounds[block_slice + 1] - bounds[block_slice]) @ active  # (states,)
    # Codes are ordered old slices, then new slices, each ascending: the codes active in state s
    # (old entries of the slices after s, new entries of those up to s) are one range of codes.
    n_old = int((block_space == 0).sum())
    range_lo = np.array([int(((block_space == 0) & (block_slice <= s)).sum()) for s in states])
    range_hi = np.array([n_old + int(((block_space == 1) & (block_slice <= s)).sum()) for s in states])

    key_k, code_k = _sorted_needles(key_old, key_new, ch.valid, item_slice, code_of)
    valid_k = code_k > 0
    code_active = np.concatenate([np.zeros((1, n_states), dtype=bool), active])  # by code, 0: padding
    tie = np.zeros((c, two_w), dtype=bool)
    tie[:, 1:] = (key_k[:, 1:] == key_k[:, :-1]) & valid_k[:, 1:]
    alone = ~tie
    alone[:, :-1] &= ~tie[:, 1:]
    n_rel = ch.n_rel
    # Every (state, row) keeps `width` needles: its n_rel active ones, then padding to fill up.
    k = np.arange(two_w)
    fill = ~valid_k & (k - 2 * n_rel[:, None] < width - n_rel[:, None])
    t = np.arange(width)
    rel_share = np.where(t < n_rel[:, None], (n_rel[:, None] - t) / np.maximum(n_rel[:, None], 1), 0.0)
    tied_rows = tie.any(axis=1)

    # Every entry's code times the places, in the layout's column order: old entries, then new ones.
    column_bin = np.concatenate([code_of[0][slice_at], code_of[1][slice_at]]).astype(np.int32) * n_seg
    n_buckets = _BUCKETS_PER_NEEDLE * two_w + 3
    per_row = 2 * n * 32 + (n_codes + 1) * n_seg * 8 + n_states * two_w * 8 + n_buckets * 13  # bytes of scratch
    step = max(1, min(c, _SORTED_SCRATCH // per_row, (2**31 - 1) // ((n_codes + 1) * n_seg)))
    for lo in range(0, c, step):
        hi = min(lo + step, c)
        r = hi - lo
        entries = np.concatenate([scores_old[lo:hi], scores_new[lo:hi]], axis=1)  # (r, 2N) float32
        seg, equal_to = _needles_at_or_below(entries, key_k[lo:hi], ch.valid[lo:hi], cols[lo:hi], n,
                                             n_buckets)
        # Histogram bin, row-major (one row's bins stay in cache): row, code, then segment (the
        # entries scoring at least needle k-1 and less than needle k). Code 0 has no entry.
        seg += column_bin
        seg += (np.arange(r, dtype=np.int32) * ((n_codes + 1) * n_seg))[:, None]
        hist = np.bincount(seg.ravel(), minlength=r * (n_codes + 1) * n_seg).reshape(r, n_codes + 1, n_seg)
        del seg
        np.cumsum(hist, axis=2, out=hist)  # entries of each code scoring less than needle k: segments 0..k
        for q in range(2, n_codes + 1):  # ... of the codes up to each (numpy's cumsum is slow on this axis)
            hist[:, q] += hist[:, q - 1]
        # The active codes of state s are one range, codes range_lo[s]+1 .. range_hi[s].
        ge = np.empty((n_states, r, two_w), dtype=np.int32)  # items scoring at least each needle
        for s in range(n_states):
            np.subtract(hist[:, range_lo[s], :two_w], hist[:, range_hi[s], :two_w], out=ge[s])
            ge[s] += total_active[s]
        del hist
        # Alone in the row: alone among the needles, and no entry but its own has its key.
        single = alone[lo:hi] & (equal_to == 1)
        rows = slice(ch.rows.start + lo, ch.rows.start + hi)
        act = code_active.T[:, code_k[lo:hi]]  # (states, r, 2w): the needle is its item's entry in that state
        # Each (state, row) keeps its active needles and padding: `width` of them, ascending key.
        kept_mask = act | fill[None, lo:hi]
        kept = np.maximum(ge.ravel()[np.flatnonzero(kept_mask)].reshape(n_states, r, width), 1)  # a needle counts itself
        share = rel_share[lo:hi]
        tr = np.flatnonzero(tied_rows[lo:hi])
        if len(tr):  # a tied group of needles: relevant items counted from its first
            kk = np.broadcast_to(key_k[lo:hi][tr], (n_states, len(tr), two_w))[kept_mask[:, tr]]
            kk = kk.reshape(n_states, len(tr), width)
            first = np.zeros(kk.shape, dtype=np.int64)
            first[..., 1:] = np.where(kk[..., 1:] != kk[..., :-1], t[1:], 0)
            np.maximum.accumulate(first, axis=2, out=first)
            m = n_rel[lo:hi][tr][:, None]
            share = np.repeat(share[None], n_states, axis=0)
            share[:, tr] = np.where(t < m, (m - first) / np.maximum(m, 1), 0.0)
        has_rel = ch.has_rel[lo:hi]
        with np.errstate(invalid="ignore", divide="ignore"):
            result.ap[:, rows] = np.where(has_rel, (share / kept).sum(axis=2), np.nan)
        # The best relevant item: the last active needle; items ahead of it.
        best = two_w - 1 - np.argmax(act[:, :, ::-1], axis=2)  # (states, r)
        ahead = np.take_along_axis(ge, best[:, :, None], axis=2)[:, :, 0].astype(np.int64) - 1
        exact = single[np.arange(r), best] & has_rel
        for s, i in zip(*np.nonzero(has_rel & ~exact)):
            ci = lo + i
            key = np.where(ch.valid[ci], np.where(item_slice[ci] <= s, key_new[ci], key_old[ci]), _PAD)
            b = int(np.argmax(key))  # the smaller index among the best (members are in ascending index)
            best_score = (scores_new if item_slice[ci, b] <= s else scores_old)[ci, cols[ci, b]]
            merged = np.where(new_masks[s], scores_new[ci], scores_old[ci])  # (-0.0 == 0.0, as the keys)
            ahead[s, i] = int((merged > best_score).sum())
            if ahead[s, i] < result.k_max:
                ahead[s, i] += int(tied_before(s)(np.array([ci]), np.array([best_score]), ch.ids[ci:ci + 1, b])[0])
        for kk_ in result.ks:
            result.hits[kk_][:, rows] = has_rel & (ahead < kk_)


def evaluate_states(query_old, gallery_old, query_new, gallery_new, query_labels, gallery_labels, order,
                    n_backfilled, exclude_self: bool = False, ks=(1, 5), chunk_size: int = 1024,
                    device=None, counting: str = "auto") -> StateMetrics:
    """Average precision and top-k hits of every query at several states of one backfill.

    In state ``s`` gallery item ``g`` is scored ``query_new[q] · gallery_new[g]`` if ``g`` is
    among the first ``n_backfilled[s]`` items of ``order`` and ``query_old[q] · gallery_old[g]``
    otherwise; items are relevant when they share the query's label. The result is exactly what
    sorting each merged row would give, with the tie rule of the module docstring: top-k by
    descending score, ties to the smaller gallery index; average precision with a tied group as
    one threshold (scikit-learn's ``average_precision_score``).

    Parameters
    ----------
    query_old : array (n_q, d1)
        Query vectors compared with items stored old.
    gallery_old : array (N, d1)
        The old stored vector of each gallery item.
    query_new : array (n_q, d2)
        Query vectors compared with items stored new.
    gallery_new : array (N, d2)
        The new stored vector of each gallery item.
    query_labels : int array (n_q,)
        Class label of each query.
    gallery_labels : int array (N,)
        Class label of each gallery item.
    order : int array (N,)
        Backfill order ``π``, a permutation of ``range(N)``.
    n_backfilled : sequence of int
        Items stored new in each state, non-decreasing, each in ``[0, N]``.
    exclude_self : bool, default False
        Leave-one-out: query ``i`` is gallery item ``i`` and is left out of its own ranking
        (neither ranked nor relevant); needs ``n_q == N``.
    ks : sequence of int, default (1, 5)
        Cut-offs of the top-k hits, each in ``[1, N - exclude_self]``.
    chunk_size : int, default 1024
        Queries scored at once; memory is about ``24 · chunk_size · N`` bytes.
    device : str or torch.device, optional
        See :func:`choose_device`; default automatic.
    counting : {"auto", "blocks", "sorted"}, default "auto"
        How the numpy path counts the items ahead of each relevant item: ``"blocks"`` by binary
        searches in the sorted slices (cheap with few relevant items per query, i.e. many
        classes), ``"sorted"`` by placing each query's ``2N`` old and new scores among its
        sorted relevant ones (cheap with many, i.e. few classes); ``"auto"`` picks the cheaper
        per block of queries. The results are the same; a torch device always counts by blocks.

    Returns
    -------
    StateMetrics
        ``ap`` and ``hits`` of shape ``(len(n_backfilled), n_q)``.

    Raises
    ------
    TypeError
        If an input has the wrong type (embeddings, labels, ``exclude_self`` not a bool, ``ks``,
        ``chunk_size``).
    ValueError
        If shapes disagree, ``order`` is not a permutation, ``n_backfilled`` is not
        non-decreasing in ``[0, N]``, ``exclude_self`` is set with ``n_q != N``, a ``k`` is out
        of range, the vectors are so long that their inner products would overflow float32,
        ``device`` is not available, or ``counting`` is not one of the three.

    Examples
    --------
    >>> x = [[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]
    >>> m = evaluate_states(x, x, x, x, [0, 1, 1], [0, 1, 1], [0, 1, 2], [0], exclude_self=True,
    ...                     ks=(1,), device="numpy")
    >>> m.ap.round(3).tolist(), m.hits[1].tolist()
    ([[nan, 1.0, 1.0]], [[False, True, True]])
    """
    gallery_old = as_embeddings(gallery_old, "gallery_old")
    gallery_new = as_embeddings(gallery_new, "gallery_new")
    query_old = as_embeddings(query_old, "query_old", dim=gallery_old.shape[1])
    query_new = as_embeddings(query_new, "query_new", dim=gallery_new.shape[1])
    n, n_q = len(gallery_old), len(query_old)
    if len(gallery_new) != n:
        raise ValueError(f"gallery_old has {n} items but gallery_new has {len(gallery_new)}")
    if len(query_new) != n_q:
        raise ValueError(f"query_old has {n_q} rows but query_new has {len(query_new)}")
    _check_products(query_old, gallery_old, "query_old", "gallery_old")
    _check_products(query_new, gallery_new, "query_new", "gallery_new")
    qy, gy, exclude_self, ks, chunk_size, device = _check_run(query_labels, gallery_labels, n_q, n, exclude_self,
                                                              ks, chunk_size, device)
    order = check_order(order, n)
    if counting not in ("auto", "blocks", "sorted"):
        raise ValueError(f"counting must be 'auto', 'blocks' or 'sorted', got {counting!r}")
    m = np.asarray(n_backfilled)
    if m.ndim != 1 or len(m) == 0 or (m.size and not np.issubdtype(m.dtype, np.integer)):
        raise ValueError(f"n_backfilled must be a non-empty 1-D sequence of integers, got {n_backfilled!r}")
    if (m < 0).any() or (m > n).any() or (np.diff(m) < 0).any():
        raise ValueError(f"n_backfilled must be non-decreasing integers in [0, {n}], got {m.tolist()}")
    n_states = len(m)
    # Slice j holds the items that become new in state j, order[bounds[j]:bounds[j+1]] (slice 0:
    # new from the first state on; the last slice: never new). State s stores slices 0..s new.
    # The gallery is laid out slice after slice (ascending index inside a slice), so that each
    # slice is a block of columns of the score matrix.
    bounds = np.concatenate([[0], m, [n]])
    layout = np.concatenate([np.sort(order[bounds[j]:bounds[j + 1]]) for j in range(n_states + 1)])
    position = np.empty(n, dtype=np.int64)
    position[layout] = np.arange(n)
    slice_at = np.repeat(np.arange(n_states + 1), np.diff(bounds))  # slice of each column
    new_masks = [slice_at <= s for s in range(n_states)]
    arrays = (query_old, gallery_old[layout], query_new, gallery_new[layout])
    ops = _NumpyOps(*arrays) if device == "numpy" else _TorchOps(device, *arrays)

    result = _Scores(n_states, n_q, ks)
    # Relevant items per query: at most the largest class (the width of every block of queries).
    width = int(np.unique(gy, return_counts=True)[1].max(initial=1))
    sorted_path = ops.name == "numpy" and (counting == "sorted" or
                                           (counting == "auto" and _prefer_sorted(width, n, n_states)))
    if sorted_path:  # it keeps about 8·N + 48·width bytes a query besides its scratch rows
        chunk_size = max(1, min(chunk_size, 2 * _SORTED_SCRATCH // (8 * n + 48 * width)))
    for ch in _query_chunks(qy, gy, position, exclude_self, chunk_size):
        rows, c, self_cols, ids, valid = ch.rows, ch.c, ch.self_cols, ch.ids, ch.valid
        width = ids.shape[1]
        cols = position[ids]
        item_slice = slice_at[cols]

        if sorted_path:  # on the float scores: keys only where compared
            scores_old, scores_new = ops.scores(0, rows, 1, self_cols), ops.scores(2, rows, 3, self_cols)
            key_old = np.where(valid, _keys_inplace(np.take_along_axis(scores_old, cols, axis=1)), _PAD)
            key_new = np.where(valid, _keys_inplace(np.take_along_axis(scores_new, cols, axis=1)), _PAD)
            def tied_scores(s):  # tied items of smaller index, compared as scores (-0.0 == 0.0, as the keys)
                return lambda resolve, score, best_ids: ops.tied_before(scores_old, scores_new, resolve, new_masks[s],
                                                                        score, best_ids, layout)

            _score_sorted(result, ch, scores_old, scores_new, key_old, key_new, cols, item_slice, bounds, slice_at,
                          new_masks, tied_scores)
            continue

        keys_old = ops.keys(0, rows, 1, self_cols)
        keys_new = ops.keys(2, rows, 3, self_cols)
        key_old = np.where(valid, ops.gather(keys_old, cols), _PAD).astype(np.int32)
        key_new = np.where(valid, ops.gather(keys_new, cols), _PAD).astype(np.int32)

        def tied(s):
            return lambda resolve, key, best_ids: ops.tied_before(keys_old, keys_new, resolve, new_masks[s], key,
                                                                  best_ids, layout)

        # Every relevant item's old and new key, sorted in its row: sorted needles search faster.
        needles = np.concatenate([key_old, key_new], axis=1)
        needle_order = np.argsort(needles, axis=1, kind="stable")
        prepared = ops.needles(np.take_along_axis(needles, needle_order, axis=1))
        unsort = np.argsort(needle_order, axis=1)
        at_old, at_new = unsort[:, :width], unsort[:, width:]  # where each item's needles went
        is_new_value = needle_order >= width
        needle_slice = np.take_along_axis(np.concatenate([item_slice, item_slice], axis=1), needle_order, axis=1)
        needle_valid = np.take_along_axis(np.concatenate([valid, valid], axis=1), needle_order, axis=1)

        # An item's old key is used in the states before its slice turns new, its new key from
        # then on; so a slice's old keys are searched for the old keys of all items and the new
        # keys of items that turn new earlier, its new keys for the new keys of all items and
        # the old keys of items that turn new later. (Counts never used are left at 0.)
        blocks = {}
        ge_old = np.zeros((n_states + 1, c, 2 * width), dtype=np.int32)
        for j in range(1, n_states + 1):
            if bounds[j + 1] > bounds[j]:
                blocks[j, 0] = ops.sort_block(keys_old, bounds[j], bounds[j + 1])
                select = needle_valid & (~is_new_value | (needle_slice < j))
                ge_old[j] = ops.count_ge(blocks[j, 0], prepared, select)
        # ge: items scoring >= each needle in state s, slices <= s new and slices > s old.
        ge = ge_old.sum(axis=0, dtype=np.int32)

        for s in range(n_states):
            if bounds[s + 1] > bounds[s]:
                blocks[s, 1] = ops.sort_block(keys_new, bounds[s], bounds[s + 1])
                select = needle_valid & (is_new_value | (needle_slice > s))
                ge += ops.count_ge(blocks[s, 1], prepared, select).astype(np.int32)
            ge -= ge_old[s]
            is_new = item_slice <= s
            key = np.where(is_new, key_new, key_old)
            ge_all = np.take_along_axis(ge, np.where(is_new, at_new, at_old), axis=1)
            result.score_state(s, ch, key, ge_all,
                               _blocks_above(ops, [block for (j, space), block in blocks.items() if space == int(j <= s)]),
                               tied(s))
    return StateMetrics(ap=result.ap, hits=result.hits, device=ops.name)


# ---------------------------------------------------------------------------------------------
# K model versions: a gallery item can be stored under any of K versions (METHOD §7).
# ---------------------------------------------------------------------------------------------

def _tied_before_versions(ops, keys, rows, col_version, key, ids, position_ids):
    """Items tied with ``key`` and ranked before gallery index ``ids`` (rows ``rows``), K spaces.

    ``col_version[c]``: the version column ``c`` is stored under in this state.
    """
    if isinstance(ops, _NumpyOps):
        merged = np.empty((len(rows), len(col_version)), dtype=np.int32)
        for v, k in keys.items():
            at = col_version == v
            merged[:, at] = k[rows][:, at]
        before = position_ids[None, :] < ids[:, None]
        return ((merged == key[:, None]) & before).sum(axis=1)
    torch = ops.torch
    r = ops._t(rows)
    merged = torch.empty((len(rows), len(col_version)), dtype=torch.int32, device=ops.device)
    for v, k in keys.items():
        at = ops._t(col_version == v)
        merged[:, at] = k[r][:, at]
    before = ops._t(position_ids)[None, :] < ops._t(ids)[:, None]
    return ((merged == ops._t(key)[:, None]) & before).sum(dim=1).cpu().numpy()


def check_versions(versions, n_versions: int, n: int) -> np.ndarray:
    """Check a storage matrix: the version each gallery item is stored under, in each state.

    Parameters
    ----------
    versions : int array (n_states, N)
        ``versions[s, g]``: index (``0 .. n_versions - 1``) of the model version whose vector is
        stored for gallery item ``g`` in state ``s``.
    n_versions : int
        Number of model versions ``K``.
    n : int
        Gallery size ``N``.

    Returns
    -------
    ndarray (n_states, N) of int64
        ``versions`` as an array.

    Raises
    ------
    ValueError
        If ``versions`` is not a non-empty 2-D integer array with ``N`` columns, or holds an index
        outside ``[0, n_versions)``.

    Examples
    --------
    >>> check_versions([[0, 1, 1]], 2, 3).tolist()
    [[0, 1, 1]]
    """
    v = np.asarray(versions)
    if v.ndim != 2 or v.shape[0] == 0 or v.shape[1] != n:
        raise ValueError(f"versions must be a 2-D array (n_states, {n}): the version of each of the {n} gallery "
                         f"items in each state, got shape {v.shape}; wrap a single state as [versions]")
    if v.size and not np.issubdtype(v.dtype, np.integer):
        raise ValueError(f"versions must hold integer version indices in [0, {n_versions}), got dtype {v.dtype}")
    if v.size and (v.min() < 0 or v.max() >= n_versions):
        bad = int(v.min()) if v.min() < 0 else int(v.max())
        raise ValueError(f"versions holds index {bad}, but there are {n_versions} versions: each entry must be "
                         f"in [0, {n_versions - 1}] (an index into queries and galleries)")
    return v.astype(np.int64)


def evaluate_version_states(queries, galleries, versions, query_labels, gallery_labels, exclude_self: bool = False,
                            ks=(1, 5), chunk_size: int = 1024, device=None) -> StateMetrics:
    """Average precision and top-k hits of every query when gallery items are stored under K versions.

    The K-version form of :func:`evaluate_states`. There are ``K`` model versions; version ``v``
    has a query vector ``queries[v][q]`` and a stored vector ``galleries[v][g]`` for each item.
    In state ``s`` item ``g`` is stored under version ``versions[s, g]`` and scored
    ``queries[v][q] · galleries[v][g]`` with ``v = versions[s, g]``; the whole gallery is ranked
    by these merged scores. Same exact results and tie rule as :func:`evaluate_states` (top-k by
    descending score, ties to the smaller gallery index; average precision with a tied group as
    one threshold), which is the case ``K = 2``, ``versions[s] = 1`` on the first
    ``n_backfilled[s]`` items of the order and ``0`` elsewhere.

    How: items with the same storage history (the same column of ``versions``) form a group;
    every group's scores under each version it takes are sorted once, and how many items score
    at least ``v`` in a state is a sum of one binary search per group (as the slices of
    :func:`evaluate_states`), updated only for the groups that change version between two states.
    The cost grows with the number of groups; a backfill in an order has at most
    ``K · (n_states + 1)`` of them.

    Parameters
    ----------
    queries : sequence of K arrays (n_q, d_v)
        ``queries[v]``: the query vectors compared with items stored under version ``v``.
    galleries : sequence of K arrays (N, d_v)
        ``galleries[v]``: each item's vector under version ``v`` (rows of items never stored
        under ``v`` are not used, but must be finite).
    versions : int array (n_states, N)
        ``versions[s, g]`` in ``[0, K)``: the version item ``g`` is stored under in state ``s``.
    query_labels : int array (n_q,)
        Class label of each query.
    gallery_labels : int array (N,)
        Class label of each gallery item.
    exclude_self : bool, default False
        Leave-one-out: query ``i`` is gallery item ``i`` and is left out of its own ranking;
        needs ``n_q == N``.
    ks : sequence of int, default (1, 5)
        Cut-offs of the top-k hits, each in ``[1, N - exclude_self]``.
    chunk_size : int, default 1024
        Queries scored at once; memory is about ``(4 K + 16) · chunk_size · N`` bytes.
    device : str or torch.device, optional
        See :func:`choose_device`; default automatic.

    Returns
    -------
    StateMetrics
        ``ap`` and ``hits`` of shape ``(n_states, n_q)``.

    Raises
    ------
    TypeError
        If an input has the wrong type (``queries``/``galleries`` not sequences of arrays,
        labels, ``exclude_self`` not a bool, ``ks``, ``chunk_size``).
    ValueError
        If ``queries`` and ``galleries`` hold different numbers of versions (or none), a query
        matrix and its gallery differ in width, the galleries differ in length or the query
        matrices in rows, ``versions`` has the wrong shape or an index out of range,
        ``exclude_self`` is set with ``n_q != N``, a ``k`` is out of range, the vectors of a
        version are so long that their inner products would overflow float32, or ``device`` is
        not available.

    See Also
    --------
    backfill_lib.versions.evaluate_versions : backfill curves of a multi-version strategy.

    Examples
    --------
    >>> x = [[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]
    >>> m = evaluate_version_states([x, x, x], [x, x, x], [[0, 1, 2]], [0, 1, 1], [0, 1, 1],
    ...                             exclude_self=True, ks=(1,), device="numpy")
    >>> m.ap.round(3).tolist(), m.hits[1].tolist()
    ([[nan, 1.0, 1.0]], [[False, True, True]])
    """
    if isinstance(queries, np.ndarray) or isinstance(galleries, np.ndarray) \
            or not isinstance(queries, (list, tuple)) or not isinstance(galleries, (list, tuple)):
        raise TypeError("queries and galleries must be lists (or tuples) of K arrays, one per model version, "
                        f"got {type(queries).__name__} and {type(galleries).__name__}")
    if len(queries) != len(galleries) or not queries:
        raise ValueError(f"queries and galleries must hold one array per model version (K >= 1 of each), got "
                         f"{len(queries)} query and {len(galleries)} gallery arrays")
    n_versions = len(galleries)
    galleries = [as_embeddings(g, f"galleries[{v}]") for v, g in enumerate(galleries)]
    queries = [as_embeddings(q, f"queries[{v}]", dim=galleries[v].shape[1]) for v, q in enumerate(queries)]
    n, n_q = len(galleries[0]), len(queries[0])
    for v in range(1, n_versions):
        if len(galleries[v]) != n:
            raise ValueError(f"galleries[0] has {n} items but galleries[{v}] has {len(galleries[v])}: every "
                             "version must hold a vector for every gallery item")
        if len(queries[v]) != n_q:
            raise ValueError(f"queries[0] has {n_q} rows but queries[{v}] has {len(queries[v])}")
    for v in range(n_versions):
        _check_products(queries[v], galleries[v], f"queries[{v}]", f"galleries[{v}]")
    qy, gy, exclude_self, ks, chunk_size, device = _check_run(query_labels, gallery_labels, n_q, n, exclude_self,
                                                              ks, chunk_size, device)
    versions = check_versions(versions, n_versions, n)
    n_states = len(versions)

    # Groups: items with the same storage history, laid out group after group (ascending index
    # inside a group), so that each group is a block of columns of the score matrices.
    history, group_of = np.unique(versions.T, axis=0, return_inverse=True)
    group_of = group_of.ravel()
    layout = np.lexsort((np.arange(n), group_of))
    position = np.empty(n, dtype=np.int64)
    position[layout] = np.arange(n)
    sizes = np.bincount(group_of, minlength=len(history))
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    used = sorted(set(np.unique(versions).tolist()))  # versions stored somewhere: the only ones scored
    used_arr = np.array(used, dtype=np.int64)
    slot_of = {v: i for i, v in enumerate(used)}
    # States as bits (up to 62 states): in which states each item / group is stored under each used
    # version, so that a group's counts are searched only for the needles read while it is stored so.
    state_bits = (np.int64(1) << np.arange(n_states, dtype=np.int64)) if n_states <= 62 else None
    if state_bits is not None:
        item_states = [np.bitwise_or.reduce(np.where(versions == v, state_bits[:, None], 0), axis=0) for v in used]
        group_states = np.stack([np.bitwise_or.reduce(np.where(history == v, state_bits[None, :], 0), axis=1)
                                 for v in used], axis=1)  # (n_groups, n_used)
    last_use = np.stack([np.where((history == v).any(axis=1), n_states - 1 - np.argmax((history == v)[:, ::-1], axis=1),
                                  -1) for v in used], axis=1)  # (n_groups, n_used): last state stored so
    col_versions = versions[:, layout]  # (n_states, N): the version of each column in each state
    arrays = [queries[v] for v in used] + [galleries[v][layout] for v in used]
    ops = _NumpyOps(*arrays) if device == "numpy" else _TorchOps(device, *arrays)
    n_used = len(used)

    result = _Scores(n_states, n_q, ks)
    for ch in _query_chunks(qy, gy, position, exclude_self, chunk_size):
        rows, c, self_cols, ids, valid = ch.rows, ch.c, ch.self_cols, ch.ids, ch.valid
        width = ids.shape[1]
        cols = position[ids]

        keys = {v: ops.keys(i, rows, n_used + i, self_cols) for i, v in enumerate(used)}
        item_keys = np.stack([np.where(valid, ops.gather(keys[v], cols), _PAD).astype(np.int32) for v in used])
        # Needles: every relevant item's key under every used version, sorted in its row.
        needles = np.concatenate(list(item_keys), axis=1)  # (c, n_used · width)
        needle_order = np.argsort(needles, axis=1, kind="stable")
        prepared = ops.needles(np.take_along_axis(needles, needle_order, axis=1))
        unsort = np.argsort(needle_order, axis=1)  # unsort[:, u·width + a]: where item a's version-u key went
        needle_valid = np.take_along_axis(np.tile(valid, n_used), needle_order, axis=1)
        if state_bits is not None:  # the states in which each needle is read (its item stored under its version)
            needle_states = np.take_along_axis(np.concatenate([item_states[u][ids] for u in range(n_used)], axis=1),
                                               needle_order, axis=1)
        blocks, counts = {}, {}

        def block(j, v):
            if (j, v) not in blocks:
                blocks[j, v] = ops.sort_block(keys[v], bounds[j], bounds[j + 1])
            return blocks[j, v]

        def count(j, v):
            # Group j's count under version v is only needed for the needles read in a state where
            # group j is stored under v (the other entries stay 0); kept until its last such state.
            if (j, v) not in counts:
                select = needle_valid if state_bits is None else \
                    needle_valid & ((needle_states & group_states[j, slot_of[v]]) != 0)
                counts[j, v] = ops.count_ge(block(j, v), prepared, select).astype(np.int32)
            return counts[j, v]

        ge = np.zeros((c, n_used * width), dtype=np.int32)
        for j in range(len(history)):
            ge += count(j, history[j, 0])
        for s in range(n_states):
            if s:
                for j in np.flatnonzero(history[:, s] != history[:, s - 1]):
                    ge += count(j, history[j, s]) - count(j, history[j, s - 1])
                    if last_use[j, slot_of[history[j, s - 1]]] < s:  # memory: never needed again
                        counts.pop((j, history[j, s - 1]), None)
                        blocks.pop((j, history[j, s - 1]), None)
            slots = np.searchsorted(used_arr, versions[s, ids])  # (c, width): slot of each item's version
            key = np.take_along_axis(item_keys, slots[None], axis=0)[0]
            ge_all = np.take_along_axis(ge, np.take_along_axis(unsort, slots * width + np.arange(width), axis=1),
                                        axis=1)
            # Blocks are sorted only if a row needs them (lazily, by the generator).
            result.score_state(s, ch, key, ge_all,
                               _blocks_above(ops, [block(j, history[j, s]) for j in range(len(history)) if sizes[j]]),
                               lambda resolve, key, best_ids: _tied_before_versions(ops, keys, resolve, col_versions[s],
                                                                                    key, best_ids, layout))
    return StateMetrics(ap=result.ap, hits=result.hits, device=ops.name)
