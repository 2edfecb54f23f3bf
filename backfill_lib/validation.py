"""Input checks at the public boundary.

Every public function of ``backfill_lib`` validates its inputs once, here, and raises a
``ValueError`` or ``TypeError`` that names the argument and says what to do. Inside the
library the data is trusted.
"""

from __future__ import annotations

import os
from typing import Iterable, Sequence

import numpy as np


#: Largest allowed deviation of a row norm from 1 when unit-norm rows are required (float32
#: embeddings normalised by a model are within 1e-6 of 1; ``0.5 * x`` is far outside).
UNIT_NORM_TOL = 1e-3


def as_embeddings(x, name: str, dim: int | None = None, allow_empty: bool = False,
                  unit_norm: bool = False) -> np.ndarray:
    """Return ``x`` as a C-contiguous ``float32`` matrix of shape ``(n, d)``.

    Parameters
    ----------
    x : array-like or torch.Tensor
        Embeddings, one row per item.
    name : str
        Argument name used in error messages.
    dim : int, optional
        Required number of columns.
    allow_empty : bool, default False
        Whether zero rows are allowed.
    unit_norm : bool, default False
        Require every row to have L2 norm 1 (within :data:`UNIT_NORM_TOL`): inner products then
        rank like distances. Callers that accept other rows normalise them first (see
        :func:`normalize_rows`) or store them as given, and say which in their docstring.

    Returns
    -------
    ndarray (n, d) of float32
        ``x`` as given (not normalised); a ``torch.Tensor`` is detached and moved to the CPU
        first.

    Raises
    ------
    TypeError
        If ``x`` is not real-valued numbers (complex numbers are refused too).
    ValueError
        If ``x`` is not 2-D, has no columns or the wrong width, is empty, holds NaN/inf, or
        (with ``unit_norm``) has a row whose norm is not 1.
    """
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch here
        x = x.detach().cpu().numpy()
    try:
        arr = np.asarray(x)
    except Exception as exc:  # pragma: no cover - exotic inputs
        raise TypeError(f"{name} must be an array of numbers, got {type(x).__name__}") from exc
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise TypeError(f"{name} must be an array of numbers, got dtype {arr.dtype}")
    if np.issubdtype(arr.dtype, np.complexfloating):
        raise TypeError(f"{name} must be real-valued, got complex dtype {arr.dtype}: embeddings are real vectors")
    if arr.ndim != 2:
        raise ValueError(
            f"{name} must be a 2-D array of shape (n_items, dim), got shape {arr.shape}; "
            "reshape a single vector with x[None, :]"
        )
    if arr.shape[1] == 0:
        raise ValueError(f"{name} has 0 columns: an embedding needs at least one dimension")
    if arr.shape[0] == 0 and not allow_empty:
        raise ValueError(f"{name} is empty (0 rows): add at least one item")
    if dim is not None and arr.shape[1] != dim:
        raise ValueError(
            f"{name} has dimension {arr.shape[1]} but {dim} is expected: query and gallery "
            "vectors of one space must have the same dimension (use a transformation to map "
            "between spaces)"
        )
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).any(axis=1).sum())
        raise ValueError(
            f"{name} contains NaN or infinite values in {bad} row(s): check the model output "
            "(a diverged training run or a zero vector normalised) before searching"
        )
    if unit_norm and len(arr):
        # Row norms without a float64 copy of the whole array (a live index checks every batch):
        # float32 accumulation is accurate to ~1e-6 here, far inside UNIT_NORM_TOL.
        norms = np.sqrt(np.einsum("ij,ij->i", arr, arr))
        bad = np.abs(norms - 1.0) > UNIT_NORM_TOL
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(
                f"{name} must have unit-norm rows (inner products then rank like distances), but "
                f"{int(bad.sum())} row(s) are not, e.g. row {i} has norm {norms[i]:.4g}: normalise "
                f"them first, e.g. with backfill_lib.validation.normalize_rows({name})"
            )
    return arr


def normalize_rows(x, name: str = "x") -> np.ndarray:
    """Return ``x`` with every row scaled to unit L2 norm, as C-contiguous ``float32``.

    Parameters
    ----------
    x : array-like or torch.Tensor (n, d)
        Embeddings, one row per item.
    name : str, default "x"
        Argument name used in error messages.

    Returns
    -------
    ndarray (n, d) of float32
        ``x / ||x||`` row by row.

    Raises
    ------
    TypeError
        If ``x`` is not real-valued numbers.
    ValueError
        If ``x`` is not a finite non-empty 2-D array, or a row is all zeros (it has no
        direction to keep).

    Examples
    --------
    >>> normalize_rows([[3.0, 4.0]])
    array([[0.6, 0.8]], dtype=float32)
    """
    arr = as_embeddings(x, name).astype(np.float64)
    norms = np.linalg.norm(arr, axis=1, keepdims=True)
    if (norms == 0).any():
        raise ValueError(f"{name} has {int((norms == 0).sum())} all-zero row(s): they cannot be normalised")
    return np.ascontiguousarray(arr / norms, dtype=np.float32)


def _as_array(x, name: str, what: str) -> np.ndarray:
    """``np.asarray(x)``, with a ragged nested list refused in a message naming ``name``."""
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch here
        x = x.detach().cpu().numpy()
    try:
        return np.asarray(x)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{name} must be {what}, got a ragged or mixed sequence ({exc})") from None


def as_labels(y, name: str, n: int | None = None) -> np.ndarray:
    """Return ``y`` as a 1-D integer array, optionally of length ``n``.

    Labels are compared for equality only, so a conversion must keep every label distinct from
    every other: anything that could merge two labels is refused instead of converted.

    Parameters
    ----------
    y : array-like or torch.Tensor
        Class labels, one per item: signed or unsigned integers up to ``2**63 - 1``, or floats
        that are whole numbers (``3.0``) of magnitude below ``2**p`` (``p`` the float's
        significand bits: ``2**53`` for float64, ``2**24`` for float32, ``2**11`` for
        float16), where every whole number is stored exactly. Booleans, strings, objects,
        complex numbers, NaN and infinity are refused.
    name : str
        Argument name used in error messages.
    n : int, optional
        Required number of labels (the number of items).

    Returns
    -------
    ndarray (n,) of int64
        The labels.

    Raises
    ------
    TypeError
        If the labels are not integers or whole-number floats (a ``bool`` array is refused: it
        is more often a mask passed by mistake than two classes; convert it with
        ``y.astype(int)`` if it is meant as labels).
    ValueError
        If ``y`` is not 1-D or does not hold ``n`` labels, or a label cannot be held exactly
        as an int64 (an unsigned label of ``2**63`` or more; a float label that is NaN,
        infinite, or so large that two different labels may have been rounded to one float).

    Examples
    --------
    >>> as_labels([3.0, 1.0], "y").tolist()
    [3, 1]
    >>> as_labels([1e19, 2e19], "y")
    Traceback (most recent call last):
    ...
    ValueError: y holds float labels as large as 2e+19: float64 stores whole numbers exactly only below 2**53, so different labels may have been rounded to the same number; give the labels as integers (int64)
    """
    arr = _as_array(y, name, "a 1-D array of integer class labels")
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one label per item), got shape {arr.shape}")
    if arr.dtype == bool:
        raise TypeError(f"{name} must hold integer class labels, got dtype bool (a mask?): convert it with "
                        f"{name}.astype(int) if it is meant as two classes")
    if arr.size and np.issubdtype(arr.dtype, np.unsignedinteger) and arr.max() > np.iinfo(np.int64).max:
        raise ValueError(f"{name} holds the label {int(arr.max())}, which does not fit in int64 (at most 2**63 - 1): "
                         "renumber the classes, e.g. with np.unique(labels, return_inverse=True)[1]")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        if not np.issubdtype(arr.dtype, np.floating):
            raise TypeError(f"{name} must hold integer class labels, got dtype {arr.dtype}")
        if not np.isfinite(arr).all():
            raise ValueError(f"{name} holds NaN or infinite labels: every item needs an integer class label")
        if not np.all(np.mod(arr, 1) == 0):
            raise TypeError(f"{name} must hold integer class labels, got dtype {arr.dtype} with fractional values "
                            f"such as {arr[np.mod(arr, 1) != 0][0].item()!r}")
        bits = np.finfo(arr.dtype).nmant + 1
        big = np.abs(arr).max()
        if big >= 2.0 ** bits:
            raise ValueError(f"{name} holds float labels as large as {big:g}: {arr.dtype} stores whole numbers "
                             f"exactly only below 2**{bits}, so different labels may have been rounded to the same "
                             "number; give the labels as integers (int64)")
        arr = arr.astype(np.int64)
    if n is not None and arr.shape[0] != n:
        raise ValueError(f"{name} has {arr.shape[0]} labels but there are {n} items")
    return arr.astype(np.int64, copy=False)


def as_flags(x, name: str, shape: tuple | None = None) -> np.ndarray:
    """Return ``x`` as a ``bool`` array: booleans, or integers/floats that are all 0 or 1.

    ``np.asarray(x, dtype=bool)`` would turn a score of 0.3, a NaN or the string ``"False"``
    into True; this refuses them.

    Parameters
    ----------
    x : array-like or torch.Tensor
        Flags (relevance, correctness).
    name : str
        Argument name used in error messages.
    shape : tuple of int, optional
        Required shape.

    Returns
    -------
    ndarray of bool
        ``x`` as booleans.

    Raises
    ------
    TypeError
        If ``x`` is not booleans or numbers (strings, objects, complex numbers).
    ValueError
        If a number is not 0 or 1, or ``x`` does not have ``shape``.

    Examples
    --------
    >>> as_flags([1, 0, True], "hits").tolist()
    [True, False, True]
    """
    arr = _as_array(x, name, "an array of booleans")
    if arr.dtype != bool:
        if arr.dtype == object or not np.issubdtype(arr.dtype, np.number) \
                or np.issubdtype(arr.dtype, np.complexfloating):
            raise TypeError(f"{name} must hold booleans (True/False, or 0/1), got dtype {arr.dtype}")
        if arr.size and not np.isin(arr, (0, 1)).all():
            raise ValueError(f"{name} must hold booleans (True/False, or 0/1), got other values such as "
                             f"{arr[~np.isin(arr, (0, 1))].flat[0].item()!r}: threshold graded values yourself")
        arr = arr.astype(bool)
    if shape is not None and arr.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {arr.shape}")
    return arr


def check_seed(seed, name: str = "seed") -> int:
    """Check a random seed: an integer in ``0 .. 2**32 - 1`` (what numpy, scikit-learn and torch accept).

    Parameters
    ----------
    seed : int
        The seed (a Python or numpy integer; ``bool`` and ``None`` are refused: ``None`` would
        draw a different, unreproducible order on every call).
    name : str, default "seed"
        Argument name used in error messages.

    Returns
    -------
    int
        The seed as a Python int.

    Raises
    ------
    TypeError
        If ``seed`` is not an integer.
    ValueError
        If ``seed`` is negative or ``2**32`` or more.

    Examples
    --------
    >>> check_seed(7)
    7
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"{name} must be an integer seed in 0 .. 2**32 - 1, got {seed!r}")
    if not 0 <= seed < 2**32:
        raise ValueError(f"{name} must be an integer seed in 0 .. 2**32 - 1, got {seed}")
    return int(seed)


def check_path(value, name: str = "path") -> str:
    """Check a file path argument and return it as a ``str``.

    Parameters
    ----------
    value : str, bytes or os.PathLike
        The path (``~`` is not expanded here).
    name : str, default "path"
        Argument name used in error messages.

    Returns
    -------
    str
        The path, decoded with the file-system encoding.

    Raises
    ------
    TypeError
        If ``value`` is not a path (a ``bool``, a number, ``None``...).
    ValueError
        If it is empty or holds a NUL character (no file system accepts one).

    Examples
    --------
    >>> from pathlib import Path
    >>> check_path(Path("index") / "gallery.npz")
    'index/gallery.npz'
    """
    if isinstance(value, bool) or not isinstance(value, (str, bytes, os.PathLike)):
        raise TypeError(f"{name} must be a file path (str or os.PathLike), got {type(value).__name__} {value!r}")
    path = os.fsdecode(os.fspath(value))
    if not path or "\0" in path:
        raise ValueError(f"{name} must be a file path, got {path!r}: give the name of a file")
    return path


def check_real(value, name: str, what: str = "") -> float:
    """Check that ``value`` is one finite real number (a metric value, a score).

    Parameters
    ----------
    value : float
        A Python or numpy real number, or a 0-d array (``bool`` is refused).
    name : str
        Argument name used in the error message.
    what : str, default ""
        What the number is, added to the message in brackets.

    Returns
    -------
    float
        ``value`` as a Python float.

    Raises
    ------
    TypeError
        If ``value`` is not one real number.
    ValueError
        If ``value`` is NaN or infinite.

    Examples
    --------
    >>> check_real(0.5, "auc_value")
    0.5
    """
    about = f" ({what})" if what else ""
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value[()]
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be one real number{about}, got {type(value).__name__} {value!r}")
    if not np.isfinite(value):
        raise ValueError(f"{name} must be finite{about}, got {value!r}")
    return float(value)


def check_open_fraction(value, name: str, what: str = "") -> float:
    """Check that ``value`` is one real number strictly between 0 and 1 (a share, a level).

    Parameters
    ----------
    value : float
        The number.
    name : str
        Argument name used in the error message.
    what : str, default ""
        What the number is, added to the message.

    Returns
    -------
    float

    Raises
    ------
    TypeError
        If ``value`` is not one real number.
    ValueError
        If it is NaN, infinite, or outside (0, 1).

    Examples
    --------
    >>> check_open_fraction(0.25, "holdout")
    0.25
    """
    value = check_real(value, name, what)
    if not 0.0 < value < 1.0:
        raise ValueError(f"{name} must be in (0, 1), e.g. 0.25, got {value!r}")
    return value


def check_ratio(r, name: str = "ratio") -> float:
    """Return ``r`` as a float, checking it lies in [0, 1].

    Parameters
    ----------
    r : int or float
        A backfill ratio (share of the gallery backfilled). A Python or numpy number; ``bool``
        is refused.
    name : str, default "ratio"
        Argument name used in error messages.

    Returns
    -------
    float
        ``r`` as a Python float.

    Raises
    ------
    TypeError
        If ``r`` is not a number.
    ValueError
        If ``r`` is NaN or outside [0, 1].
    """
    if isinstance(r, bool) or not isinstance(r, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number in [0, 1], got {type(r).__name__}")
    r = float(r)
    if not (0.0 <= r <= 1.0) or np.isnan(r):
        raise ValueError(f"{name} must lie in [0, 1] (share of the gallery backfilled), got {r}")
    return r


def check_ratios(ratios: Iterable[float], name: str = "ratios") -> np.ndarray:
    """Return sorted unique ratios in [0, 1] as a float array (must be non-empty).

    Parameters
    ----------
    ratios : iterable of float in [0, 1]
        Backfill ratios, in any order; repeats are dropped.
    name : str, default "ratios"
        Argument name used in error messages (an entry is named ``name[i]``).

    Returns
    -------
    ndarray (n_ratios,) of float64
        The distinct ratios, ascending.

    Raises
    ------
    TypeError
        If ``ratios`` is not a 1-D sequence (a single number, a string) or an entry is not a
        number.
    ValueError
        If an entry is outside [0, 1] or ``ratios`` is empty.
    """
    if isinstance(ratios, (str, bytes)) or not hasattr(ratios, "__iter__") \
            or (isinstance(ratios, np.ndarray) and ratios.ndim != 1):
        raise TypeError(f"{name} must be a 1-D sequence of numbers in [0, 1], e.g. [0, 0.5, 1], got {ratios!r}")
    vals = [check_ratio(r, f"{name}[{i}]") for i, r in enumerate(ratios)]
    if not vals:
        raise ValueError(f"{name} is empty: give at least one backfill ratio, e.g. [0, 0.5, 1]")
    return np.array(sorted(set(vals)), dtype=np.float64)


def check_positive_int(value, name: str, what: str = "", allow_none: bool = False) -> int | None:
    """Check that ``value`` is a positive integer (a count, a size, a number of steps).

    Parameters
    ----------
    value : int or None
        The value given (a Python or numpy integer; ``bool`` is refused).
    name : str
        Argument name used in the error message.
    what : str, default ""
        What the number counts, added to the message in brackets (e.g. ``"gallery size"``).
    allow_none : bool, default False
        Accept ``None`` (returned as it is), for options where None means "no limit" or "all".

    Returns
    -------
    int or None
        ``value`` as a Python int (None when given None and allowed).

    Raises
    ------
    TypeError
        If ``value`` is not an integer (or is None when not allowed).
    ValueError
        If ``value < 1``.

    Examples
    --------
    >>> check_positive_int(3, "steps")
    3
    >>> check_positive_int(0, "n", "gallery size")
    Traceback (most recent call last):
    ...
    ValueError: n must be a positive integer (gallery size), got 0
    """
    if value is None and allow_none:
        return None
    message = f"{name} must be a positive integer{f' ({what})' if what else ''}{' or None' if allow_none else ''}, " \
              f"got {value!r}"
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(message)
    if value < 1:
        raise ValueError(message)
    return int(value)


def check_non_negative(value, name: str, what: str = "", strict: bool = False) -> float:
    """Check that ``value`` is a finite real number, at least 0 (``strict``: above 0).

    For loss weights (``λ``) and temperatures (``τ``): a NaN would pass ``value < 0`` unnoticed
    and turn every loss into NaN.

    Parameters
    ----------
    value : float
        The value given (a Python or numpy real number; ``bool`` is refused).
    name : str
        Argument name used in the error message.
    what : str, default ""
        What the number is, added to the message in brackets (e.g. ``"a temperature"``).
    strict : bool, default False
        Require ``value > 0`` (a temperature) instead of ``value >= 0`` (a weight).

    Returns
    -------
    float
        ``value`` as a Python float.

    Raises
    ------
    TypeError
        If ``value`` is not a real number.
    ValueError
        If ``value`` is NaN or infinite, or below the bound.

    Examples
    --------
    >>> check_non_negative(0, "lam")
    0.0
    >>> check_non_negative(float("nan"), "tau", "a temperature", strict=True)
    Traceback (most recent call last):
    ...
    ValueError: tau must be positive (a temperature), got nan
    """
    kind = "positive" if strict else "non-negative"
    message = f"{name} must be {kind}{f' ({what})' if what else ''}, got {value!r}"
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    if not np.isfinite(value) or value < 0 or (strict and value == 0):
        raise ValueError(message)
    return float(value)


def repeated(values) -> np.ndarray:
    """The values that occur more than once in a 1-D array, ascending (empty if none).

    By sorting a copy, so that checking a million ids for repeats leaves no memory behind
    (numpy 2.4's ``np.unique`` on 10**6 int64 ids left about 32 MB in the process's heap
    after it returned, measured with ``benchmarks/live_index.py``'s resident-memory probe).

    Parameters
    ----------
    values : array-like, 1-D
        Ids or other values.

    Returns
    -------
    ndarray
        Each repeated value once, ascending.

    Examples
    --------
    >>> repeated([3, 1, 3, 2, 1]).tolist()
    [1, 3]
    >>> repeated([1, 2]).size
    0
    """
    s = np.sort(np.asarray(values).ravel())
    dup = s[1:][s[1:] == s[:-1]]
    return dup[np.r_[True, dup[1:] != dup[:-1]]] if len(dup) else dup


def check_no_repeats(values, name: str, why: str) -> None:
    """Raise if ``values`` holds a value twice, naming (up to five of) the repeated ones.

    Parameters
    ----------
    values : array-like, 1-D
        Ids or other values that must be distinct.
    name : str
        Argument name used in the error message.
    why : str
        Why they must be distinct, e.g. ``"each item is stored once"``.

    Raises
    ------
    ValueError
        If a value occurs more than once.

    Examples
    --------
    >>> check_no_repeats([4, 2, 4], "ids", "each item is stored once")
    Traceback (most recent call last):
    ...
    ValueError: ids must not repeat: each item is stored once ([4] appear more than once)
    """
    dup = repeated(values)
    if len(dup):
        raise ValueError(f"{name} must not repeat: {why} ({dup[:5].tolist()} appear more than once)")


def check_k(k, n_gallery: int, name: str = "k") -> int:
    """Check that ``k`` is a positive integer no larger than the gallery.

    Parameters
    ----------
    k : int
        Number of results per query (a Python or numpy integer; ``bool`` is refused).
    n_gallery : int
        Number of searchable gallery items.
    name : str, default "k"
        Argument name used in error messages.

    Returns
    -------
    int
        ``k`` as a Python int.

    Raises
    ------
    TypeError
        If ``k`` is not an integer.
    ValueError
        If ``k < 1`` or ``k > n_gallery``.
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"{name} must be a positive integer, got {type(k).__name__}")
    if k < 1:
        raise ValueError(f"{name} must be at least 1, got {k}")
    if k > n_gallery:
        raise ValueError(
            f"{name}={k} is larger than the gallery ({n_gallery} items searchable): "
            f"ask for at most {n_gallery}"
        )
    return int(k)


def check_choice(value: str, choices: Sequence[str], name: str) -> str:
    """Check that ``value`` is one of ``choices``.

    Parameters
    ----------
    value : str
        The option given.
    choices : sequence of str
        The allowed options, listed in the error message.
    name : str
        What the option is (e.g. ``"policy"``), used in the error message.

    Returns
    -------
    str
        ``value``, unchanged.

    Raises
    ------
    ValueError
        If ``value`` is not in ``choices``.
    """
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of: {', '.join(choices)}")
    return value
