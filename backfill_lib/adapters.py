"""Closed-form bridges between two embedding spaces: no labels, no training loop, fitted in milliseconds.

A bridge maps vectors of one model's space into the other's from the same items embedded by both
(rows ``i`` of ``X`` and ``Y`` are one item). Two are fitted in closed form:

* :class:`ProcrustesAdapter`, the orthogonal map (a rotation or reflection, optionally scaled)
  that best carries the centred ``X`` onto the centred ``Y``: orthogonal Procrustes, solved by
  ``scipy.linalg.orthogonal_procrustes`` (one SVD of ``XᵀY``). Spaces of different widths are
  zero-padded to the larger width, solved there, and the target's columns kept: for a narrower
  target this is the map ``W = U Vᵀ`` with orthonormal rows (a semi-orthogonal map);
* :class:`LowRankAffineAdapter`, the affine map ``x ↦ x W + b`` of least squares with a small ridge,
  reduced to rank ``k`` (reduced-rank regression: the fitted values projected on their top ``k``
  principal directions).

and :func:`slerp` blends two unit vectors along the sphere (the query blend of
:func:`slerp_query`: an old-model query and a new-model query mapped into the old space).

They have the transforms' interface (``fit(X, Y)``, ``transform(X)``, ``save(path)``,
``load(path)``), store plain arrays in an ``.npz`` file read without pickle, and accept only their
own kinds when loading. :func:`select_adapter` fits each candidate on one part of the pairs and
keeps the one that carries the held-out part best.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from .validation import (as_embeddings, check_non_negative, check_open_fraction, check_positive_int, check_real,
                         normalize_rows)

#: Version of the ``.npz`` layout written by :meth:`ClosedFormAdapter.save`.
FORMAT_VERSION = 1


def _pairs(X, Y) -> tuple[np.ndarray, np.ndarray]:
    x = as_embeddings(X, "X").astype(np.float64)
    y = as_embeddings(Y, "Y").astype(np.float64)
    if len(x) != len(y):
        raise ValueError(f"X has {len(x)} rows but Y has {len(y)}: row i of both must be the same item")
    if len(x) < 2:
        raise ValueError(f"fitting a bridge needs at least 2 paired items, got {len(x)}")
    return x, y


class ClosedFormAdapter:
    """What every closed-form bridge shares: checks, normalisation, saving and loading.

    Parameters
    ----------
    normalize : bool, default True
        Return unit rows from :meth:`transform` (the book's vectors are compared by inner product
        on the unit sphere, like ``ψ̂`` and ``ĥ``).
    """

    #: The name written into saved files; :meth:`load` accepts only the kinds in ``_KINDS``.
    kind = ""
    _arrays: tuple[str, ...] = ()

    def __init__(self, normalize: bool = True):
        if not isinstance(normalize, (bool, np.bool_)):
            raise TypeError(f"normalize must be True or False, got {normalize!r}")
        self.normalize = bool(normalize)
        self.d_in_: int | None = None
        self.d_out_: int | None = None

    @property
    def fitted(self) -> bool:
        """Whether ``fit`` (or :meth:`load`) has set the map."""
        return self.d_in_ is not None

    def _check_fitted(self) -> None:
        if not self.fitted:
            raise ValueError(f"this {type(self).__name__} is not fitted yet: call fit(X, Y) or load(path) first")

    def transform(self, X) -> np.ndarray:
        """Map rows of the source space into the target space.

        Parameters
        ----------
        X : array (n, d_in)
            Source-space vectors (the width ``fit`` saw).

        Returns
        -------
        ndarray (n, d_out) of float32
            Unit rows when ``normalize`` (the default).
        """
        self._check_fitted()
        x = as_embeddings(X, "X", dim=self.d_in_, allow_empty=True).astype(np.float64)
        out = self._apply(x).astype(np.float32)
        return normalize_rows(out, "transformed X") if self.normalize and len(out) else out

    def _apply(self, x: np.ndarray) -> np.ndarray:  # pragma: no cover - each subclass has its own
        raise NotImplementedError

    def get_params(self) -> dict:
        """The constructor's arguments, as given.

        Returns
        -------
        dict
        """
        return {"normalize": self.normalize}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"

    # --- files ------------------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """The fitted adapter as the bytes of an ``.npz`` file (arrays only, no pickle)."""
        self._check_fitted()
        buf = io.BytesIO()
        params = {f"param_{k}": np.asarray(-1 if v is None else v) for k, v in self.get_params().items()}
        np.savez(buf, kind=np.asarray(self.kind), version=np.asarray(FORMAT_VERSION),
                 d_in=np.asarray(self.d_in_), d_out=np.asarray(self.d_out_),
                 **params, **{name: getattr(self, name) for name in self._arrays})
        return buf.getvalue()

    def save(self, path) -> Path:
        """Write the fitted adapter to ``path`` (an ``.npz`` file; parent folders must exist).

        Parameters
        ----------
        path : str or Path

        Returns
        -------
        Path
            The path written.
        """
        path = Path(path)
        if not path.parent.is_dir():
            raise FileNotFoundError(f"path: the folder {path.parent} does not exist; create it first")
        path.write_bytes(self.to_bytes())
        return path

    @staticmethod
    def load(path) -> "ClosedFormAdapter":
        """Read an adapter written by :meth:`save`, whichever kind it is.

        Parameters
        ----------
        path : str or Path

        Returns
        -------
        ClosedFormAdapter
            A fitted :class:`ProcrustesAdapter` or :class:`LowRankAffineAdapter`.

        Raises
        ------
        ValueError
            If the file is not an adapter file of this library, names a kind this library does
            not have, or holds a map of the wrong shape or non-finite numbers.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"path: no adapter file at {path}")
        return ClosedFormAdapter.from_bytes(path.read_bytes(), source=str(path))

    @staticmethod
    def from_bytes(data: bytes, source: str = "the bytes") -> "ClosedFormAdapter":
        """Read an adapter from the bytes :meth:`to_bytes` made (see :meth:`load`).

        Parameters
        ----------
        data : bytes
        source : str, default "the bytes"
            Named in error messages.

        Returns
        -------
        ClosedFormAdapter
        """
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as f:
                blob = {k: f[k] for k in f.files}
        except Exception as exc:
            raise ValueError(f"{source} is not an adapter file written by backfill_lib.adapters ({exc})") from None
        kind = str(blob.get("kind", ""))
        if kind not in _KINDS:
            raise ValueError(f"{source} holds an adapter of kind {kind!r}; this library reads {sorted(_KINDS)}")
        if int(blob.get("version", -1)) != FORMAT_VERSION:
            raise ValueError(f"{source} has format version {blob.get('version')}; this library reads {FORMAT_VERSION}")
        cls = _KINDS[kind]
        params = {k[len("param_"):]: v.item() for k, v in blob.items() if k.startswith("param_")}
        params = {k: (None if v == -1 else v) for k, v in params.items()}
        obj = cls(**params)
        d_in, d_out = int(blob["d_in"]), int(blob["d_out"])
        for name in cls._arrays:
            if name not in blob or not np.isfinite(blob[name]).all():
                raise ValueError(f"{source} is damaged: {name!r} is missing or not finite")
            setattr(obj, name, blob[name].astype(np.float64))
        obj.d_in_, obj.d_out_ = d_in, d_out
        obj._check_shapes(source)
        return obj

    def _check_shapes(self, source: str) -> None:  # pragma: no cover - each subclass has its own
        raise NotImplementedError


class ProcrustesAdapter(ClosedFormAdapter):
    """Orthogonal Procrustes: the rotation (or reflection) that best carries ``X`` onto ``Y``.

    ``transform(x) = s · (x − μ_X) R + μ_Y`` (then normalised), with ``R`` orthogonal, fitted by
    ``scipy.linalg.orthogonal_procrustes`` on the centred pairs; ``s = 1`` unless ``scale``.
    Of different widths, both sides are zero-padded to the larger one and the target's columns
    kept (for a narrower target, ``R``'s kept columns are orthonormal: a semi-orthogonal map).

    Parameters
    ----------
    center : bool, default True
        Subtract each space's mean before fitting, add the target's back after mapping.
    scale : bool, default False
        Also fit one global scale ``s`` (the least-squares one for the fitted ``R``).
    normalize : bool, default True
        Return unit rows.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(50, 4))
    >>> Q, _ = np.linalg.qr(rng.normal(size=(4, 4)))
    >>> p = ProcrustesAdapter(center=False, normalize=False).fit(X, X @ Q)
    >>> bool(np.allclose(p.rotation_, Q, atol=1e-6))
    True
    """

    kind = "procrustes"
    _arrays = ("rotation_", "scale_", "mean_in_", "mean_out_")

    def __init__(self, center: bool = True, scale: bool = False, normalize: bool = True):
        super().__init__(normalize)
        for name, v in (("center", center), ("scale", scale)):
            if not isinstance(v, (bool, np.bool_)):
                raise TypeError(f"{name} must be True or False, got {v!r}")
        self.center, self.scale = bool(center), bool(scale)

    def get_params(self) -> dict:
        """The constructor's arguments, as given.

        Returns
        -------
        dict
        """
        return {"center": self.center, "scale": self.scale, **super().get_params()}

    def fit(self, X, Y, labels=None) -> "ProcrustesAdapter":
        """Fit the map from paired rows (labels are not used: the bridge is label-free).

        Parameters
        ----------
        X : array (n, d_in)
            The items in the source space.
        Y : array (n, d_out)
            The same items, in the same order, in the target space.
        labels : ignored
            Accepted for the transforms' interface.

        Returns
        -------
        ProcrustesAdapter
            ``self``, fitted.
        """
        from scipy.linalg import orthogonal_procrustes

        x, y = _pairs(X, Y)
        d_in, d_out = x.shape[1], y.shape[1]
        self.mean_in_ = x.mean(axis=0) if self.center else np.zeros(d_in)
        self.mean_out_ = y.mean(axis=0) if self.center else np.zeros(d_out)
        width = max(d_in, d_out)
        xc, yc = np.zeros((len(x), width)), np.zeros((len(y), width))
        xc[:, :d_in], yc[:, :d_out] = x - self.mean_in_, y - self.mean_out_
        rotation, singular_sum = orthogonal_procrustes(xc, yc)
        self.rotation_ = rotation[:d_in, :d_out]
        norm2 = float((xc ** 2).sum())
        self.scale_ = np.asarray(singular_sum / norm2 if self.scale and norm2 > 0 else 1.0)
        self.d_in_, self.d_out_ = d_in, d_out
        return self

    def _apply(self, x: np.ndarray) -> np.ndarray:
        return float(self.scale_) * (x - self.mean_in_) @ self.rotation_ + self.mean_out_

    def _check_shapes(self, source: str) -> None:
        if self.rotation_.shape != (self.d_in_, self.d_out_) or self.mean_in_.shape != (self.d_in_,) \
                or self.mean_out_.shape != (self.d_out_,):
            raise ValueError(f"{source} is damaged: its arrays do not fit a {self.d_in_} → {self.d_out_} map")


class LowRankAffineAdapter(ClosedFormAdapter):
    """Least-squares affine map of rank ``k``: ``x ↦ x W + b``, ``W`` of rank at most ``rank``.

    ``W`` is ridge regression of the centred ``Y`` on the centred ``X`` (penalty ``ridge`` times the
    mean squared norm of ``X``'s rows, so that the penalty does not depend on the scale), then
    reduced to rank ``k`` by projecting the fitted values on their top ``k`` principal directions
    (reduced-rank regression); ``b = μ_Y − μ_X W``.

    Parameters
    ----------
    rank : int, optional
        The rank ``k``; default the full rank ``min(d_in, d_out)``.
    ridge : float, default 1e-3
        Relative ridge penalty (≥ 0).
    normalize : bool, default True
        Return unit rows.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(200, 6))
    >>> W = rng.normal(size=(6, 2)) @ rng.normal(size=(2, 5))          # a rank-2 map
    >>> a = LowRankAffineAdapter(rank=2, ridge=0.0, normalize=False).fit(X, X @ W + 1.0)
    >>> bool(np.allclose(a.transform(X[:3]), X[:3] @ W + 1.0, atol=1e-4))
    True
    """

    kind = "low_rank_affine"
    _arrays = ("weight_", "bias_")

    def __init__(self, rank: int | None = None, ridge: float = 1e-3, normalize: bool = True):
        super().__init__(normalize)
        self.rank = check_positive_int(rank, "rank", "the rank of the map", allow_none=True)
        self.ridge = check_non_negative(ridge, "ridge", "the relative ridge penalty")

    def get_params(self) -> dict:
        """The constructor's arguments, as given.

        Returns
        -------
        dict
        """
        return {"rank": self.rank, "ridge": self.ridge, **super().get_params()}

    def fit(self, X, Y, labels=None) -> "LowRankAffineAdapter":
        """Fit the map from paired rows (labels are not used).

        Parameters
        ----------
        X : array (n, d_in)
            The items in the source space.
        Y : array (n, d_out)
            The same items, in the same order, in the target space.
        labels : ignored
            Accepted for the transforms' interface.

        Returns
        -------
        LowRankAffineAdapter
            ``self``, fitted.
        """
        x, y = _pairs(X, Y)
        d_in, d_out = x.shape[1], y.shape[1]
        k = min(d_in, d_out) if self.rank is None else self.rank
        if k > min(d_in, d_out):
            raise ValueError(f"rank={k} is larger than min(d_in, d_out) = {min(d_in, d_out)}; choose a smaller rank")
        mx, my = x.mean(axis=0), y.mean(axis=0)
        xc, yc = x - mx, y - my
        penalty = self.ridge * float((xc ** 2).sum(axis=1).mean())
        w = np.linalg.solve(xc.T @ xc + penalty * np.eye(d_in), xc.T @ yc)
        if k < min(d_in, d_out):
            _, _, vt = np.linalg.svd(xc @ w, full_matrices=False)
            w = w @ vt[:k].T @ vt[:k]
        self.weight_, self.bias_ = w, my - mx @ w
        self.d_in_, self.d_out_ = d_in, d_out
        return self

    def _apply(self, x: np.ndarray) -> np.ndarray:
        return x @ self.weight_ + self.bias_

    def _check_shapes(self, source: str) -> None:
        if self.weight_.shape != (self.d_in_, self.d_out_) or self.bias_.shape != (self.d_out_,):
            raise ValueError(f"{source} is damaged: its arrays do not fit a {self.d_in_} → {self.d_out_} map")


_KINDS: dict[str, type[ClosedFormAdapter]] = {"procrustes": ProcrustesAdapter, "low_rank_affine": LowRankAffineAdapter}


def slerp(a, b, t: float) -> np.ndarray:
    """Spherical interpolation between matching unit rows of ``a`` and ``b``.

    ``slerp(a, b, 0) = a``, ``slerp(a, b, 1) = b``, and in between the point at fraction ``t`` of
    the great-circle arc from ``a`` to ``b`` (unit length throughout). Rows that are (nearly)
    equal or opposite, where the arc is not defined by the two ends alone, fall back to the
    normalised straight-line blend.

    Parameters
    ----------
    a, b : array (n, d)
        Unit rows (normalise first), the same shape.
    t : float
        Where on the arc, in [0, 1].

    Returns
    -------
    ndarray (n, d) of float32

    Examples
    --------
    >>> a, b = np.array([[1.0, 0.0]]), np.array([[0.0, 1.0]])
    >>> [round(float(v), 4) for v in slerp(a, b, 0.5)[0]]
    [0.7071, 0.7071]
    """
    x = as_embeddings(a, "a", unit_norm=True).astype(np.float64)
    y = as_embeddings(b, "b", dim=x.shape[1], unit_norm=True).astype(np.float64)
    if len(x) != len(y):
        raise ValueError(f"a has {len(x)} rows but b has {len(y)}: slerp blends matching rows")
    t = check_real(t, "t", "the fraction of the arc")
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"t must be in [0, 1] (0 gives a, 1 gives b), got {t!r}")
    if t == 0.0:
        return x.astype(np.float32)
    if t == 1.0:
        return y.astype(np.float32)
    cos = np.clip((x * y).sum(axis=1, keepdims=True), -1.0, 1.0)
    omega = np.arccos(cos)
    sin = np.sin(omega)
    ok = sin > 1e-6
    safe = np.where(ok, sin, 1.0)
    out = np.where(ok, (np.sin((1 - t) * omega) * x + np.sin(t * omega) * y) / safe, (1 - t) * x + t * y)
    return normalize_rows(out.astype(np.float32), "slerp")


def slerp_query(old_query, new_query, new_to_old: ClosedFormAdapter, t: float = 0.5) -> np.ndarray:
    """The SLERP query blend: the old model's query moved towards the new model's, in the old space.

    ``slerp(φ_o(q), P(φ_n(q)), t)``: ``P`` maps the new query into the old space (e.g. a fitted
    :class:`ProcrustesAdapter` from new to old); the blend searches the old-stored vectors, so the
    query runs both backbones (two passes) and nothing stored is re-encoded.

    Parameters
    ----------
    old_query : array (n, d_o)
        ``φ_o(q)``, unit rows.
    new_query : array (n, d_n)
        ``φ_n(q)``.
    new_to_old : ClosedFormAdapter
        A fitted adapter from the new space to the old one (``d_n → d_o``), normalising its output.
    t : float, default 0.5
        0 keeps the old query, 1 the mapped new one.

    Returns
    -------
    ndarray (n, d_o) of float32
    """
    if not isinstance(new_to_old, ClosedFormAdapter):
        raise TypeError(f"new_to_old must be a fitted adapter of backfill_lib.adapters, got {type(new_to_old).__name__}")
    mapped = new_to_old.transform(new_query)
    if not new_to_old.normalize:
        mapped = normalize_rows(mapped, "mapped new_query")
    return slerp(old_query, mapped, t)


def _top_k(q: np.ndarray, g: np.ndarray, k: int, exclude_self: bool) -> np.ndarray:
    sims = q @ g.T
    if exclude_self:
        np.fill_diagonal(sims, -np.inf)
    return np.argpartition(-sims, k - 1, axis=1)[:, :k]


#: How :func:`select_adapter` scores a candidate on the held-out pairs.
CRITERIA = ("neighbours", "pairs")


def select_adapter(X, Y, candidates=None, holdout: float = 0.25, seed: int = 0, k: int = 50,
                   criterion: str = "neighbours", maps: str = "queries"):
    """Fit each candidate on part of the pairs; keep the one that serves the held-out part best.

    Two label-free criteria (:data:`CRITERIA`):

    * ``"neighbours"`` (default): what the bridge is for. The new model's own ``k`` nearest
      neighbours of each held-out item are the reference; a candidate scores the share of them it
      finds when the bridge serves: with ``maps="queries"`` (``X`` the new space, ``Y`` the old:
      the new query mapped into the old space searches the stored old vectors) or with
      ``maps="gallery"`` (``X`` the old space, ``Y`` the new: the stored old vectors mapped into
      the new space are searched by the new query);
    * ``"pairs"``: how often a mapped held-out item finds its own partner first (recall@1 of the
      pairs). A map can reproduce each item well and still rank badly: on Fashion-MNIST this
      criterion prefers the affine map, which retrieves like the old model (relative gain 0.00),
      over Procrustes (0.56), so it is not the default.

    Ties go to the earlier candidate. The winner is refitted on all pairs.

    Parameters
    ----------
    X, Y : array (n, d_in), array (n, d_out)
        The same items under the two models (see ``maps`` for which is which).
    candidates : dict of str to ClosedFormAdapter, optional
        Unfitted adapters by name; default Procrustes (centred, with and without scaling) and
        low-rank affine maps of full rank and of half of it.
    holdout : float, default 0.25
        Share of the pairs held out, in (0, 1).
    seed : int, default 0
        Seed of the split.
    k : int, default 50
        Neighbours compared (``"neighbours"``). mAP rewards the whole ranking, not the first few:
        with ``k = 10`` the candidates score alike on Fashion-MNIST; with 50 the new-query
        direction picks Procrustes on Fashion-MNIST and digits, as their relative gains do
        (0.56 / 0.67 against the affine map's 0.00 / 0.40).
    criterion : {"neighbours", "pairs"}, default "neighbours"
        See above.
    maps : {"queries", "gallery"}, default "queries"
        Which side the bridge maps (``"neighbours"`` only): the new queries (``X`` = new,
        ``Y`` = old) or the stored old vectors (``X`` = old, ``Y`` = new).

    Returns
    -------
    (str, ClosedFormAdapter, dict)
        The winner's name, the winner refitted on every pair, and each candidate's held-out score.
    """
    from .validation import check_choice, check_seed

    x, y = _pairs(X, Y)
    check_choice(criterion, CRITERIA, "criterion")
    check_choice(maps, ("queries", "gallery"), "maps")
    holdout = check_open_fraction(holdout, "holdout", "the share of pairs held out")
    k = check_positive_int(k, "k", "neighbours compared")
    rng = np.random.default_rng(check_seed(seed))
    idx = rng.permutation(len(x))
    n_out = max(int(round(holdout * len(x))), 1)
    test, train = idx[:n_out], idx[n_out:]
    if len(train) < 2:
        raise ValueError(f"only {len(train)} pairs are left to fit on; give more pairs or a smaller holdout")
    if candidates is None:
        full = min(x.shape[1], y.shape[1])
        candidates = {"procrustes": ProcrustesAdapter(), "procrustes_scaled": ProcrustesAdapter(scale=True),
                      "affine": LowRankAffineAdapter(), "affine_half_rank": LowRankAffineAdapter(rank=max(full // 2, 1))}
    if not candidates:
        raise ValueError("candidates is empty: give at least one adapter")
    xt = normalize_rows(x[test].astype(np.float32), "X")
    yt = normalize_rows(y[test].astype(np.float32), "Y")
    if criterion == "neighbours":
        if len(test) < 2:
            raise ValueError("the held-out part needs at least 2 items to have neighbours; give more pairs")
        kk = min(k, len(test) - 1)
        new_space = xt if maps == "queries" else yt
        reference = _top_k(new_space, new_space, kk, exclude_self=True)
    else:
        kk = 1
    scores = {}
    for name, adapter in candidates.items():
        if not isinstance(adapter, ClosedFormAdapter):
            raise TypeError(f"candidates[{name!r}] must be an adapter of backfill_lib.adapters, got {type(adapter).__name__}")
        mapped = adapter.fit(x[train], y[train]).transform(x[test])
        if not adapter.normalize:
            mapped = normalize_rows(mapped, "mapped X")
        if criterion == "pairs":
            top = _top_k(mapped, yt, kk, exclude_self=False)
            scores[name] = float((top == np.arange(len(test))[:, None]).any(axis=1).mean())
        else:
            found = (_top_k(mapped, yt, kk, exclude_self=True) if maps == "queries"
                     else _top_k(yt, mapped, kk, exclude_self=True))
            scores[name] = float(np.mean([len(np.intersect1d(a, b)) / kk for a, b in zip(found, reference)]))
    best = max(scores, key=lambda n: (scores[n], -list(candidates).index(n)))
    return best, candidates[best].fit(x, y), scores
