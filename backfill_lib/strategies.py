"""Named strategies for experiments: a registry from name to a builder.

This is the experiment layer over :mod:`~backfill_lib.backfill`: ``backfill.rank_merge(old, new)``
takes embeddings and returns a :class:`~backfill_lib.backfill.Strategy`;
``build_strategy("rank_merge", ctx)`` gets those embeddings from an
:class:`~backfill_lib.context.ExperimentContext` (which trains the models, or loads them from the
checkpoint cache) and then calls it. Methods that need training (BCT, RA-BCT, the
transformations) train through the context, which caches checkpoints (backbones and heads alike)
and records how long training took. A builder that cannot apply to a setting raises
:class:`NotApplicable` with the reason, and the experiment reports "n/a" instead of failing.

Importing this module does not import torch: the training code is imported inside the builders
that need it. :class:`~backfill_lib.context.ExperimentContext`, :class:`~backfill_lib.context.Preset`,
:data:`~backfill_lib.context.PRESETS`, :data:`~backfill_lib.context.SETTINGS`,
:class:`~backfill_lib.context.MethodParams` and :func:`~backfill_lib.context.init_seed` live in
:mod:`~backfill_lib.context` and can still be imported from here (loaded on first use).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable

from . import backfill as bf
from .validation import check_choice

if TYPE_CHECKING:
    from .context import ExperimentContext

#: Names defined in :mod:`~backfill_lib.context` (which imports torch), re-exported on first access.
_FROM_CONTEXT = ("ExperimentContext", "Preset", "PRESETS", "SETTINGS", "MethodParams", "init_seed")


def __getattr__(name: str):
    if name in _FROM_CONTEXT:
        value = getattr(importlib.import_module(".context", __package__), name)
        globals()[name] = value  # later lookups skip __getattr__
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_FROM_CONTEXT))


class NotApplicable(Exception):
    """A strategy does not apply to this setting (the message says why)."""


@dataclass(frozen=True)
class StrategyInfo:
    """A registered strategy (an entry of :data:`STRATEGY_REGISTRY`).

    Each parameter is kept as an attribute of the same name.

    Parameters
    ----------
    name : str
        Registry name, e.g. ``"rank_merge"``.
    build : callable ``(ExperimentContext) -> Strategy``
        Builds the :class:`~backfill_lib.backfill.Strategy`; may raise :class:`NotApplicable`.
    description : str
        One line for results tables.
    trains : tuple of str, default ()
        Names in ``ExperimentContext.trained`` this strategy needs (their training times are
        reported with its results).
    """

    name: str
    build: Callable[[ExperimentContext], bf.Strategy]
    description: str
    trains: tuple[str, ...] = ()  # names in ExperimentContext.trained that this strategy needs


#: Every strategy an experiment can run, by name (filled by :func:`register_strategy`).
STRATEGY_REGISTRY: dict[str, StrategyInfo] = {}


def register_strategy(name: str, description: str, trains: tuple[str, ...] = ()):
    """Decorator: make ``build(ctx) -> Strategy`` available to experiments as ``name``.

    Parameters
    ----------
    name : str
        Registry name; an existing entry of that name is replaced.
    description : str
        One line for results tables.
    trains : tuple of str, default ()
        Names in ``ExperimentContext.trained`` the strategy needs (see :class:`StrategyInfo`).

    Returns
    -------
    callable
        The decorator: it adds a :class:`StrategyInfo` to :data:`STRATEGY_REGISTRY` and returns
        the builder unchanged.
    """
    def wrap(fn):
        STRATEGY_REGISTRY[name] = StrategyInfo(name, fn, description, trains)
        return fn
    return wrap


def build_strategy(name: str, ctx: ExperimentContext) -> bf.Strategy:
    """Build the registered strategy ``name`` for one run.

    Parameters
    ----------
    name : str
        A key of :data:`STRATEGY_REGISTRY`.
    ctx : ExperimentContext
        The run; models and heads the strategy needs are trained through it.

    Returns
    -------
    Strategy
        The :class:`~backfill_lib.backfill.Strategy`, renamed to ``name`` if the builder named it
        otherwise.

    Raises
    ------
    ValueError
        If ``name`` is not registered.
    NotApplicable
        If the strategy does not apply to this setting (e.g. BCT with ``d_n ≠ d_o``).
    """
    if name not in STRATEGY_REGISTRY:
        raise ValueError(f"unknown strategy {name!r}; choose from: {', '.join(STRATEGY_REGISTRY)}")
    strategy = STRATEGY_REGISTRY[name].build(ctx)
    # replace() keeps every field, queries_are_gallery included (it decides leave-one-out).
    return strategy if strategy.name == name else replace(strategy, name=name)


@register_strategy("old", "no upgrade: old query, old gallery", trains=("old",))
def _old(ctx: ExperimentContext) -> bf.Strategy:
    return bf.old_only(ctx.embeddings("old"))


@register_strategy("offline", "offline backfill: old/old until r = 1, then new/new", trains=("old", "new"))
def _offline(ctx: ExperimentContext) -> bf.Strategy:
    return bf.offline_backfill(ctx.embeddings("old"), ctx.embeddings("new"))


@register_strategy("rank_merge", "distance rank merge of old/old and new/new", trains=("old", "new"))
def _rank_merge(ctx: ExperimentContext) -> bf.Strategy:
    return bf.rank_merge(ctx.embeddings("old"), ctx.embeddings("new"))


@register_strategy("rank_merge_calibrated", "calibrated rank merge (ours, training-free): each space's scores mapped "
                   "to one scale fitted on its training pairs, then merged", trains=("old", "new", "rank_merge_calibrated"))
def _rank_merge_calibrated(ctx: ExperimentContext) -> bf.Strategy:
    from .calibration import fit_score_map

    method = ctx.params.calibration
    old_train, new_train = ctx.embeddings("old", split="train"), ctx.embeddings("new", split="train")
    # The same seeded training pairs in both spaces (the gallery is never looked at).
    maps = ctx.timed("rank_merge_calibrated", f"score maps ({method}) on training pairs",
                     lambda: [fit_score_map(e, ctx.data.train_labels, method, seed=ctx.seed)
                              for e in (old_train, new_train)])
    return bf.rank_merge_calibrated(ctx.embeddings("old"), ctx.embeddings("new"), *maps)


@register_strategy("new_on_old", "incompatible: new query on the stored gallery, no compatibility training",
                   trains=("old", "new"))
def _new_on_old(ctx: ExperimentContext) -> bf.Strategy:
    old, new = ctx.embeddings("old"), ctx.embeddings("new")
    if old.shape[1] != new.shape[1]:
        raise NotApplicable(f"new (d={new.shape[1]}) and old (d={old.shape[1]}) embeddings differ in size: "
                            "a new query cannot even be compared with the old gallery")
    return bf.compatible_single_space(old, new, name="new_on_old")


# --- Compatible training of the new model (METHOD §3.2, §3.3) -------------------------------------

def _same_dimension(ctx: ExperimentContext, method: str) -> None:
    d_old, d_new = ctx.old_spec.embed_dim, ctx.new_spec.embed_dim
    if d_old != d_new:
        raise NotApplicable(f"{method} needs d_n = d_o, but the new model embeds in {d_new} dimensions and the "
                            f"old one in {d_old}: the new embedding cannot be compared with the old gallery")


def _old_model_key(ctx: ExperimentContext) -> dict:
    from .context import init_seed

    return {"old_spec": ctx.old_spec.to_dict(), "old_classes": list(ctx.data.old_classes),
            "old_init": init_seed("old", ctx.seed)}


@register_strategy("bct", "BCT: new model trained with the frozen old classifier's influence loss; new query "
                   "searches whatever is stored", trains=("old", "new_bct"))
def _bct(ctx: ExperimentContext) -> bf.Strategy:
    from .losses import bct_objective

    _same_dimension(ctx, "BCT")
    if ctx.old_label_map is not None:
        raise NotApplicable("BCT applies the old classifier to new embeddings with the old classes, but this old "
                            "model was trained on coarse labels (old_label_map): its classifier has no per-class "
                            "columns; bct_pseudo (class means of old features) applies")
    lam = ctx.params.bct_lambda
    old_model = ctx.model("old")
    ctx.train_model("new_bct", ctx.new_spec, loss_fn=bct_objective(old_model, ctx.data.old_classes, lam),
                    what=f"new {ctx.new_spec.arch} with BCT (λ={lam:g}), {ctx.train_config.epochs} epochs",
                    extra_key={"loss": "bct", "lambda": lam, **_old_model_key(ctx)})
    return bf.compatible_single_space(ctx.embeddings("old"), ctx.embeddings("new_bct"), name="bct")


@register_strategy("bct_pseudo", "BCT, open-class variant (openBCT / BT²): influence loss on every sample through a "
                   "frozen pseudo-classifier of old-feature class means over all classes", trains=("old", "new_bct_pseudo"))
def _bct_pseudo(ctx: ExperimentContext) -> bf.Strategy:
    from .losses import bct_pseudo_objective, pseudo_classifier

    _same_dimension(ctx, "BCT (pseudo-classifier)")
    lam = ctx.params.bct_pseudo_lambda
    # W_p: the old model's mean feature of every class (old and new) over the training images.
    weights = pseudo_classifier(ctx.embeddings("old", split="train"), ctx.data.train_labels, ctx.data.num_classes)
    ctx.train_model("new_bct_pseudo", ctx.new_spec, loss_fn=bct_pseudo_objective(weights, lam),
                    what=f"new {ctx.new_spec.arch} with BCT through old-feature class means (λ={lam:g}), "
                         f"{ctx.train_config.epochs} epochs",
                    extra_key={"loss": "bct_pseudo", "lambda": lam,
                               "pseudo_classifier": "normalised mean old train embedding, all classes",
                               **_old_model_key(ctx)})
    return bf.compatible_single_space(ctx.embeddings("old"), ctx.embeddings("new_bct_pseudo"), name="bct_pseudo")


@register_strategy("ra_bct", "RA-BCT / Hot-Refresh: new model trained with InfoNCE towards the old feature, "
                   "other-class old and new negatives", trains=("old", "new_ra_bct"))
def _ra_bct(ctx: ExperimentContext) -> bf.Strategy:
    from .losses import ra_bct_objective

    _same_dimension(ctx, "RA-BCT")
    lam, tau = ctx.params.ra_bct_lambda, ctx.params.ra_bct_tau
    topk = None if ctx.params.ra_bct_topk is None else int(ctx.params.ra_bct_topk)
    old_model = ctx.model("old")
    ctx.train_model("new_ra_bct", ctx.new_spec, loss_fn=ra_bct_objective(old_model, lam, tau, topk),
                    what=f"new {ctx.new_spec.arch} with RA-BCT (λ={lam:g}, τ={tau:g}"
                         f"{'' if topk is None else f', top-{topk} negatives'}), {ctx.train_config.epochs} epochs",
                    # topk only when set: the published loss keeps the checkpoints it already has.
                    extra_key={"loss": "ra_bct", "lambda": lam, "tau": tau, **_old_model_key(ctx),
                               **({} if topk is None else {"topk": topk})})
    return bf.compatible_single_space(ctx.embeddings("old"), ctx.embeddings("new_ra_bct"), name="ra_bct")


# --- Transformations on cached embeddings, backbones frozen (METHOD §3.4, §3.5, §2) ----------------

def _fit_heads(ctx: ExperimentContext, name: str, **kwargs) -> bf.Strategy:
    """Fit ψ (and ρ) on the cached training embeddings (or load them) and build the reverse-transformation strategy."""
    from . import transforms as tf

    if kwargs.get("objective") == "mc":
        rt = f" + {kwargs['lam_rt']:g}·L_rt" if kwargs["lam_rt"] else ""
        what = (f"ψ{' + ρ' if kwargs['learn_rho'] else ''} on cached embeddings, L_mc (negatives: "
                f"{kwargs['negatives']}, τ={kwargs['tau']:g}){rt}, {ctx.params.transform_steps} steps")
    else:
        what = f"ψ on cached embeddings, L_rt, {ctx.params.transform_steps} steps"
    new_train, old_train = ctx.embeddings("new", split="train"), ctx.embeddings("old", split="train")
    heads = ctx.fit_head(
        name, what, uses=("old", "new"), extra_key={"head": "reverse_transform", **kwargs},
        build=lambda: tf.CompatibilityHeads(new_train.shape[1], old_train.shape[1], kwargs.get("learn_rho", False)),
        fit=lambda: tf.fit_reverse_transform(new_train, old_train, ctx.data.train_labels, config=ctx.transform_config,
                                             steps=None, device=ctx.device, progress=ctx.progress, **kwargs))
    new_test = ctx.embeddings("new")
    rho_new = new_test if heads.rho is None else tf.apply_transform(heads.rho, new_test, "new")
    return bf.reverse_transform(ctx.embeddings("old"), tf.apply_transform(heads.psi, new_test, "new"), rho_new,
                                name=name)


@register_strategy("reverse_transform", "reverse transformation ψ (new → old) trained with L_rt only; "
                   "ψ̂(φ_n(q)) searches old-stored items", trains=("old", "new", "reverse_transform"))
def _reverse_transform(ctx: ExperimentContext) -> bf.Strategy:
    return _fit_heads(ctx, "reverse_transform", objective="rt")


def _register_mct(name: str, description: str, negatives: str, learn_rho: bool):
    @register_strategy(name, description, trains=("old", "new", name))
    def build(ctx: ExperimentContext) -> bf.Strategy:
        return _fit_heads(ctx, name, objective="mc", learn_rho=learn_rho, negatives=negatives,
                          tau=ctx.params.mct_tau, lam_rt=ctx.params.mct_lambda_rt)
    return build


_register_mct("mct", "metric-compatible training: ψ and learnable ρ with L_mc (negatives from both spaces) + λ_rt·L_rt",
              "both", True)
_register_mct("mct_old_neg", "ablation: L_mc with negatives from the old-stored set only", "old", True)
_register_mct("mct_new_neg", "ablation: L_mc with negatives from the new-stored set only", "new", True)
_register_mct("mct_no_rho", "ablation: metric-compatible ψ, new embedding kept as it is (ρ = identity)", "both", False)


# --- The "new/new with the head" reference of mct's ρ (issue 17; ours) -------------------------------

#: Name of the reference strategy: mct's head ρ, trained on the new space alone, stored offline.
RHO_REFERENCE = "offline_rho"


def rho_reference_objective(d_new: int, tau: float):
    """The loss of the reference head ``ρ_ref``: the new-space term of ``L_mc`` alone (ours).

    For a batch of cached ``[φ_n(x) | φ_o(x)]`` rows (the layout mct's heads train on), with
    ``z = ρ̂(φ_n(x))``: logits ``s_ij = z_i · z_j / τ`` (``j ≠ i``), positives the same-label
    ``j``, one softmax over the new-stored set only. This is ``L_mc`` with the cross logits
    ``ψ̂(φ_n(x_i)) · φ_o(x_j)`` and their positives taken out (so no compatibility with the old
    space), i.e. :func:`~backfill_lib.losses.multi_compatible.multi_compatible_loss` with the single set
    ``ρ̂(φ_n)``. The old columns and ``ψ`` are never read.

    Parameters
    ----------
    d_new : int
        ``d_n``: the first ``d_new`` columns of a batch are ``φ_n(x)``.
    tau : float
        Temperature (mct's ``τ``, ``MethodParams.mct_tau``).

    Returns
    -------
    callable ``(heads, x, y) -> scalar tensor``
        A ``loss_fn`` for :func:`~backfill_lib.training.train`.
    """
    from .losses import multi_compatible_loss

    def loss_fn(heads, x, y):
        z = heads.rho_hat(x[:, :d_new])
        return multi_compatible_loss([z], [z], y, tau)  # j = i left out: stored is the query itself

    return loss_fn


def fit_rho_reference(new, old, labels, tau: float, config, steps: int | None = None, device=None,
                      progress: bool = False):
    """Train ``ρ_ref``: the head of ``mct``'s ``ρ``, with mct's budget, on the new space alone (ours).

    The same code path as mct's heads
    (:func:`~backfill_lib.transforms.fit_reverse_transform` with ``objective="mc"``,
    ``learn_rho=True``): the same cached ``[φ_n | φ_o]`` training pairs, the same
    :class:`~backfill_lib.transforms.CompatibilityHeads` built under ``config.seed`` (so ``ρ``
    starts from the very weights mct's ``ρ`` starts from), the same schedule
    (:func:`~backfill_lib.transforms.schedule` of ``config`` and ``steps``: the same optimiser,
    learning rate, batch size, batches and number of steps) and the same
    :func:`~backfill_lib.training.train` call; only the loss differs
    (:func:`rho_reference_objective`). ``ψ`` is built but gets no gradient and is never used.

    Parameters
    ----------
    new, old : array (n, d_n), (n, d_o)
        Cached ``φ_n(x)`` and ``φ_o(x)`` of the training images (unit-norm rows); ``old`` only
        fixes the layout and ``ψ``'s size, as in mct's fit.
    labels : array (n,) of int
        Positives are the same-label items.
    tau : float
        Temperature.
    config : TrainConfig
        Optimiser and seed of the heads (``ExperimentContext.transform_config``).
    steps : int or None, default None
        Minimum number of optimiser steps (``None`` keeps ``config.epochs``), as in mct's fit.
    device, progress : optional
        As in :func:`~backfill_lib.transforms.fit_reverse_transform`.

    Returns
    -------
    CompatibilityHeads
        The heads in eval mode; ``heads.rho`` is ``ρ_ref``.
    """
    from . import transforms as tf
    from .training import default_device

    new, old, dataset = tf._pairs(new, old, labels, ("new", "old"))
    d_new, d_old = new.shape[1], old.shape[1]
    heads = tf._seeded(lambda: tf.CompatibilityHeads(d_new, d_old, True), config.seed)
    tf.train(heads, dataset, tf.schedule(config, len(dataset), steps), loss_fn=rho_reference_objective(d_new, tau),
             device=device or default_device(), desc="rho (new space only)", progress=progress)
    return heads.eval()


@register_strategy(RHO_REFERENCE, "reference (ours): mct's head ρ trained with mct's budget on the new-space term "
                   "of L_mc alone (no old space), every item and query through it at once: new/new with the head",
                   trains=("old", "new", RHO_REFERENCE))
def _offline_rho(ctx: ExperimentContext) -> bf.Strategy:
    from . import transforms as tf

    tau = ctx.params.mct_tau
    new_train, old_train = ctx.embeddings("new", split="train"), ctx.embeddings("old", split="train")
    heads = ctx.fit_head(
        RHO_REFERENCE, f"ρ on cached embeddings, new-space term of L_mc only (τ={tau:g}), "
                       f"{ctx.params.transform_steps} steps",
        uses=("old", "new"), extra_key={"head": "rho_reference", "objective": "new_space_only", "tau": tau},
        build=lambda: tf.CompatibilityHeads(new_train.shape[1], old_train.shape[1], True),
        fit=lambda: fit_rho_reference(new_train, old_train, ctx.data.train_labels, tau, ctx.transform_config,
                                      steps=None, device=ctx.device, progress=ctx.progress))
    rho_new = tf.apply_transform(heads.rho, ctx.embeddings("new"), "new")
    # Offline and flat: every gallery item and every query goes through ρ_ref at once.
    return bf.offline_backfill(rho_new, rho_new)


@register_strategy("forward_transform", "forward transformation h (old → new, FCT-style without side information) "
                   "applied to the stored old vectors", trains=("old", "new", "forward_transform"))
def _forward_transform(ctx: ExperimentContext) -> bf.Strategy:
    from . import transforms as tf

    old_train, new_train = ctx.embeddings("old", split="train"), ctx.embeddings("new", split="train")
    arch = ctx.params.forward_arch  # "mlp" (ours) or "fct" (ml-fct's two-branch map); "mlp" keeps its old cache key
    h = ctx.fit_head(
        "forward_transform", f"h{'' if arch == 'mlp' else ' (' + arch + ')'} on cached embeddings, MSE, "
                             f"{ctx.params.transform_steps} steps",
        uses=("old", "new"), extra_key={"head": "forward_transform"} | ({} if arch == "mlp" else {"arch": arch}),
        build=lambda: tf.forward_transformation(old_train.shape[1], new_train.shape[1], arch=arch),
        fit=lambda: tf.fit_forward_transform(old_train, new_train, config=ctx.transform_config, steps=None,
                                             device=ctx.device, progress=ctx.progress, arch=arch))
    old_test = ctx.embeddings("old")
    return bf.forward_transform(tf.apply_transform(h, old_test, "old"), ctx.embeddings("new"))


# --- Closed-form, label-free bridges (backfill_lib.adapters; ours, after Drift-Adapter and SLERP) -----

def _fit_adapter(ctx: ExperimentContext, name: str, adapter, source: str, target: str):
    """Fit a closed-form adapter on the paired training embeddings (no labels), timed."""
    x, y = ctx.embeddings(source, split="train"), ctx.embeddings(target, split="train")
    return ctx.timed(name, f"{type(adapter).__name__} {source} → {target} on {len(x)} training pairs (no labels)",
                     lambda: adapter.fit(x, y))


def _query_bridge(ctx: ExperimentContext, name: str, adapter) -> bf.Strategy:
    """The new query mapped into the old space by ``adapter`` (fitted new → old) searches old-stored items."""
    mapped = _fit_adapter(ctx, name, adapter, "new", "old")
    new = ctx.embeddings("new")
    return bf.reverse_transform(ctx.embeddings("old"), mapped.transform(new), new, name=name)


@register_strategy("procrustes", "closed-form bridge (ours): the new query mapped into the old space by centred "
                   "orthogonal Procrustes searches old-stored items; no labels, no training loop",
                   trains=("old", "new", "procrustes"))
def _procrustes(ctx: ExperimentContext) -> bf.Strategy:
    from .adapters import ProcrustesAdapter

    return _query_bridge(ctx, "procrustes", ProcrustesAdapter())


@register_strategy("procrustes_forward", "closed-form bridge (ours): every stored old vector rewritten into the new "
                   "space by centred orthogonal Procrustes, searched with the new query",
                   trains=("old", "new", "procrustes_forward"))
def _procrustes_forward(ctx: ExperimentContext) -> bf.Strategy:
    from .adapters import ProcrustesAdapter

    p = _fit_adapter(ctx, "procrustes_forward", ProcrustesAdapter(), "old", "new")
    return bf.forward_transform(p.transform(ctx.embeddings("old")), ctx.embeddings("new"), name="procrustes_forward")


@register_strategy("low_rank_affine", "closed-form bridge (ours): the new query mapped into the old space by a "
                   "least-squares affine map (full rank, small ridge) searches old-stored items",
                   trains=("old", "new", "low_rank_affine"))
def _low_rank_affine(ctx: ExperimentContext) -> bf.Strategy:
    from .adapters import LowRankAffineAdapter

    return _query_bridge(ctx, "low_rank_affine", LowRankAffineAdapter())


@register_strategy("slerp", "SLERP query blend (after Biondi et al.): the old query moved half-way along the sphere "
                   "towards the Procrustes-mapped new query searches old-stored items; two backbone passes",
                   trains=("old", "new", "slerp"))
def _slerp(ctx: ExperimentContext) -> bf.Strategy:
    from .adapters import ProcrustesAdapter, slerp_query

    p = _fit_adapter(ctx, "slerp", ProcrustesAdapter(), "new", "old")
    old, new = ctx.embeddings("old"), ctx.embeddings("new")
    blended = slerp_query(old, new, p, t=ctx.params.slerp_t)
    return bf.Strategy("slerp", blended, old, new, new, backbone_passes=2, queries_are_gallery=True)


# --- Backfill order of a run (METHOD §7) -----------------------------------------------------------

def _old_uncertainty(ctx: ExperimentContext):
    """``1 − max_c p_o(c | g)`` of every gallery item, the softmax over the old classes of the old model's own head."""
    import torch

    from .training import extract_embeddings

    # The old model's own head: its old classes, or its coarse classes when it was trained on those.
    if ctx.old_label_map is not None:
        old_classes = list(range(max(ctx.old_label_map) + 1))
    else:
        old_classes = list(ctx.data.old_classes)

    def probs(model, x):
        return torch.softmax(model.classifier(model.features(x))[:, old_classes], dim=1)

    return 1.0 - extract_embeddings(ctx.model("old"), ctx.data.test, device=ctx.device, fn=probs).max(axis=1)


def _old_regions(ctx: ExperimentContext, seed: int):
    """k-means clusters (k = number of classes) of the old gallery embeddings: what is stored before the backfill."""
    from sklearn.cluster import KMeans

    old = ctx.embeddings("old")
    k = min(ctx.data.num_classes, len(old))
    return KMeans(n_clusters=k, n_init=4, random_state=seed).fit_predict(old.astype("float64"))


def experiment_order(ctx: ExperimentContext, policy: str = "random", seed: int = 0):
    """The backfill order ``π`` of a run: a permutation of the test split (the gallery).

    Uses only what a real system has before its backfill starts: the old model and the stored old
    vectors, never the test labels.

    * ``random``: :func:`~backfill_lib.backfill.backfill_order` with ``seed`` (what every
      experiment used before order policies existed, so the numbers are unchanged).
    * ``uncertain_first``: items by decreasing ``1 − max_c p_o(c | g)``, the old model's own
      classifier (its softmax over the old classes only) on the gallery item.
    * ``class_coverage``: round-robin over the k-means clusters (``k`` = the number of classes,
      seeded by ``seed``) of the stored old embeddings (see
      :func:`~backfill_lib.backfill.backfill_order` for the argument).

    Parameters
    ----------
    ctx : ExperimentContext
        The run; the old model is trained (or loaded) if it is not yet.
    policy : str, default "random"
        One of :data:`~backfill_lib.backfill.ORDER_POLICIES`.
    seed : int, default 0
        Seed of the order (random order, ties, clustering).

    Returns
    -------
    array (N,) of int
        A permutation of ``range(N)``, ``N`` the size of the test split.

    Raises
    ------
    ValueError
        If ``policy`` is unknown.
    """
    check_choice(policy, bf.ORDER_POLICIES, "order")
    n = len(ctx.data.test_labels)
    if policy == "uncertain_first":
        return bf.backfill_order(n, seed, policy, uncertainty=_old_uncertainty(ctx))
    if policy == "class_coverage":
        return bf.backfill_order(n, seed, policy, groups=_old_regions(ctx, seed))
    return bf.backfill_order(n, seed, policy)
