"""The experiment command: train (or load) models, simulate the backfill, print and save results.

Example::

    python -m backfill_lib.experiment --dataset digits --old-classes 0-4 \\
        --strategies old,offline,rank_merge --seeds 0,1,2 --out results/digits.json

For each seed the old and new models are trained (or loaded from the checkpoint cache) with that
seed, and the backfill order is drawn with it (policy ``--order``, random by default); the table
reports mean ± std over seeds. When ``results/query_cost.json`` (written by
``benchmarks/query_cost.py``) exists, its measured query costs join the results and the table.
``--table results/x.json`` rebuilds the tables from saved results without training anything.

Every option is checked before any training (a typo fails at once, with a one-line ``error:``
and exit status 2), and the output files are written atomically (a temporary file, then
``os.replace``). Only the models the asked strategies need are trained: ``--strategies old``
trains the old model alone, and new/new and the relative gain are then reported as n/a with the
reason (``--new-new`` trains the new model for them anyway). A metric that is undefined for a
run (the relative gain when new/new equals old/old) is reported as ``{"status": "n/a",
"reason": ...}`` instead of failing the run.

A method whose stored embedding is not ``φ_n`` (``ρ̂(φ_n)`` for ``mct``) can end above new/new,
because its head also makes a better embedding; its relative gain then mixes that with
compatibility. ``--strategies ...,offline_rho`` adds the reference that separates the two (ours):
mct's head ρ trained with mct's budget on the new space alone, stored offline; every strategy is
then also reported with its relative gain against that reference's mAP, next to its final mAP.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from . import __version__
from .backfill import DEFAULT_RATIOS, ORDER_POLICIES, evaluate_backfill, old_only
from .context import PRESETS, SETTINGS, ExperimentContext, MethodParams, Preset, check_seed
from .data import DATASETS, format_classes, load_dataset
from .strategies import RHO_REFERENCE, STRATEGY_REGISTRY, NotApplicable, build_strategy, experiment_order
from .training import check_cache_dir, resolve_device
from .transforms import FORWARD_ARCHS
from .validation import check_choice, check_ratios

DEFAULT_STRATEGIES = ("old", "offline", "rank_merge")
#: Written by ``benchmarks/query_cost.py``.
DEFAULT_QUERY_COST = Path(__file__).resolve().parents[1] / "results" / "query_cost.json"
REPORT_RATIOS = (0.0, 0.5, 1.0)
METRICS = ("map", "top1", "top5")


def _stats(values) -> dict:
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0}


def _na(reason: str) -> dict:
    """A metric (or reference) that could not be measured, and why: how results say "n/a"."""
    return {"status": "n/a", "reason": reason}


def _is_na(entry) -> bool:
    return not isinstance(entry, dict) or entry.get("status") == "n/a" or entry.get("mean") is None


def _point_metrics(strategy, labels) -> dict:
    c = evaluate_backfill(strategy, labels, ratios=[0.0])
    return {"map": float(c.map[0]), "top1": float(c.top1[0]), "top5": float(c.top5[0])}, c.per_query_top1[0]


def _check_strategies(strategies, name: str = "strategies") -> list[str]:
    if isinstance(strategies, str):
        raise TypeError(f"{name} must be a sequence of names such as ('old', 'rank_merge'), not the string "
                        f"{strategies!r}")
    strategies = list(strategies)
    if not strategies:
        raise ValueError(f"{name} is empty: give at least one of: {', '.join(STRATEGY_REGISTRY)}")
    for s in strategies:
        if s not in STRATEGY_REGISTRY:
            raise ValueError(f"{name}: unknown strategy {s!r}; choose from: {', '.join(STRATEGY_REGISTRY)}")
    repeated = next((s for i, s in enumerate(strategies) if s in strategies[:i]), None)
    if repeated is not None:
        raise ValueError(f"{name} lists {repeated!r} twice: give each strategy once")
    return strategies


def _check_seeds(seeds, name: str = "seeds") -> list[int]:
    if isinstance(seeds, (int, np.integer)) and not isinstance(seeds, bool):
        raise TypeError(f"{name} must be a sequence of seeds such as (0, 1, 2), got the single number {seeds}")
    seeds = [check_seed(s, name) for s in seeds]
    if not seeds:
        raise ValueError(f"{name} is empty: give at least one seed, e.g. 0")
    repeated = next((s for i, s in enumerate(seeds) if s in seeds[:i]), None)
    if repeated is not None:
        raise ValueError(f"{name} lists {repeated} twice: each seed is one run, give it once")
    return seeds


def _check_run_ratios(ratios, name: str = "ratios") -> list[float]:
    ratios = check_ratios(ratios, name).tolist()  # sorted and unique, as evaluate_backfill pairs them with values
    if 0.0 not in ratios or 1.0 not in ratios:
        raise ValueError(f"{name} must include 0 and 1 (the AUC spans the whole backfill)")
    return ratios


def _gain_or_na(curves, old_old: list[dict], new_new, why_no_new: str = "", top: str = "new/new") -> dict:
    """Relative gain over seeds, or n/a with the reason (the top reference not measured, or equal to old/old).

    ``new_new`` holds the top reference of each seed (``{"map": ...}``): new/new, or the mAP of
    the ρ reference (``top`` names it in the messages).
    """
    if new_new is None:
        return _na(f"needs {top}, which was {why_no_new}")
    gains = []
    for seed_index, (c, oo, nn_) in enumerate(zip(curves, old_old, new_new)):
        try:
            gains.append(c.relative_gain(oo["map"], nn_["map"]))
        except ValueError:
            return _na(f"{top} mAP equals old/old mAP ({nn_['map']:.4f}) in run {seed_index + 1}: the upgrade "
                       "brings no gain to share out")
    return _stats(gains)


def _end_metrics(curve) -> dict:
    """mAP, top-1 and top-5 of a curve at r = 1 (the last ratio: ratios are sorted and include 1)."""
    return {"map": float(curve.map[-1]), "top1": float(curve.top1[-1]), "top5": float(curve.top5[-1])}


def _trained_stats(records: list[dict]) -> dict:
    """Training times of one model over seeds; ``mean`` is None when no time is known."""
    known = [r["seconds"] for r in records if r["seconds"] is not None]
    stats = _stats(known) if known else {"mean": None, "std": None}
    if known and len(known) < len(records):
        stats["unknown_runs"] = len(records) - len(known)
    return stats


def run_experiment(dataset: str = "digits", old_classes=None, strategies=DEFAULT_STRATEGIES, seeds=(0, 1, 2),
                   setting: str = "homogeneous", ratios=DEFAULT_RATIOS, device=None, cache=None, root=None,
                   progress: bool = True, data_kwargs: dict | None = None, preset=None,
                   params: MethodParams | None = None, new_new: bool | None = None, order: str = "random") -> dict:
    """Run the backfill experiment and return the JSON-ready results (see module docstring).

    Every argument is checked before any training. For each seed, the models the strategies
    need are trained or loaded from the checkpoint cache (the old model φ_o on the old classes
    always: old/old is the reference of every curve), each strategy is built and evaluated along
    the backfill (:func:`~backfill_lib.backfill.evaluate_backfill`, backfill order of the policy
    ``order`` drawn with the seed, the same for every strategy of the run), and old/old and
    new/new retrieval are measured as references. A strategy that does not apply to the setting
    (e.g. BCT with ``d_n ≠ d_o``) is reported as ``"n/a"`` with the reason; so is a metric that
    cannot be measured (``{"status": "n/a", "reason": ...}``).

    Parameters
    ----------
    dataset : str, default "digits"
        ``digits``, ``fashion_mnist``, ``synthetic``, ``cifar100`` or ``imagefolder``.
    old_classes : str or sequence of int, optional
        Classes of the old model (default the first half).
    strategies : sequence of str, default ("old", "offline", "rank_merge")
        Names registered in :data:`~backfill_lib.strategies.STRATEGY_REGISTRY`, each once.
    seeds : sequence of int, default (0, 1, 2)
        One run per seed (model initialisation, data order, backfill order); distinct integers
        in ``0 .. 2**32 - 1``.
    setting : {"homogeneous", "heterogeneous"}, default "homogeneous"
        Whether the new model has the old model's architecture, or the preset's
        ``new_heterogeneous`` one.
    ratios : sequence of float, default ``DEFAULT_RATIOS``
        Backfill ratios ``r`` in [0, 1] (0, 0.1, ..., 1 by default); must include 0 and 1.
    device, cache, root : optional
        Torch device (default the GPU if there is one; checked by
        :func:`~backfill_lib.training.resolve_device`), checkpoint folder of models and heads
        (default ``$BACKFILL_CACHE``, see :func:`~backfill_lib.training.cache_dir`; checked by
        :func:`~backfill_lib.training.check_cache_dir`), data folder (default
        ``$BACKFILL_DATA``, see :func:`~backfill_lib.data.data_root`).
    progress : bool, default True
        Show training progress bars.
    data_kwargs : dict, optional
        Extra keyword arguments of :func:`~backfill_lib.data.load_dataset` (``split_seed``,
        ``test_size``, ``image_size``, ...).
    preset : Preset, optional
        Models and training schedule (a :class:`~backfill_lib.context.Preset`); default the
        dataset's entry of :data:`~backfill_lib.context.PRESETS`.
    params : MethodParams, optional
        Hyper-parameters of the compatibility methods (default :class:`~backfill_lib.context.MethodParams`).
    new_new : bool, optional
        Measure new/new retrieval (and so the relative gain). Default: when a strategy trains the
        plain new model anyway (``offline``, ``rank_merge``, the transformations, ...), else
        reported as n/a; True trains the new model for it; False never measures it.
    order : str, default "random"
        Backfill order policy, one of :data:`~backfill_lib.backfill.ORDER_POLICIES` (see
        :func:`~backfill_lib.strategies.experiment_order`); recorded as ``result["order"]``.

    Returns
    -------
    dict
        JSON-ready results: the settings (``dataset``, ``setting``, ``old_classes``, ``seeds``,
        ``order``, ``ratios``, ``models``, ``input_shape``, ``method_params``), old/old and new/new mAP,
        top-1 and top-5 (``old_old``, ``new_new``; ``new_new`` may be n/a), the ρ reference
        (``rho_reference``: mAP, top-1 and top-5 of ``offline_rho``, mct's head ρ trained with
        mct's budget on the new space alone and stored offline; n/a with the reason when that
        strategy was not run), and per strategy (``strategies``) the AUCs, relative gain against
        new/new (``relative_gain``) and against the ρ reference (``relative_gain_vs_reference``,
        n/a without it), final mAP (``final_map``, at r = 1), largest negative-flip rate and mAP at
        r = 0, 0.5, 1 as ``{"mean", "std"}`` over seeds, the curves of every seed, and what was
        trained, how long it took (``seconds``, mean None when unknown) and whether it came from
        the cache (``cached``, one flag per seed); plus ``environment`` (versions, elapsed
        time). :func:`format_table` prints it.

    Raises
    ------
    ValueError
        If ``dataset``, a strategy name, ``setting`` or ``order`` is unknown, ``strategies`` or ``seeds``
        is empty or repeats an entry, a seed is negative, a ratio is outside [0, 1], ``ratios``
        lacks 0 or 1, ``device`` is not usable here, ``cache`` is not a writable folder, or the
        dataset loader rejects an argument.
    TypeError
        If ``strategies`` is a string, a seed is not an integer, or ``preset``, ``params`` or
        ``new_new`` has the wrong type.
    ~backfill_lib.data.DataNotFoundError
        If the data of ``cifar100`` or ``imagefolder`` are not on disk and cannot be downloaded.
    """
    # Everything is checked here, before the first model trains: a typo must not cost a run.
    params = MethodParams() if params is None else params
    if not isinstance(params, MethodParams):
        raise TypeError(f"params must be a MethodParams, got {type(params).__name__}")
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of: {', '.join(DATASETS)}")
    strategies = _check_strategies(strategies)
    if setting not in SETTINGS:
        raise ValueError(f"unknown setting {setting!r}; choose one of: {', '.join(SETTINGS)}")
    seeds = _check_seeds(seeds)
    check_choice(order, ORDER_POLICIES, "order")
    ratios = _check_run_ratios(ratios)
    device = resolve_device(device)
    check_cache_dir(cache)
    if preset is not None and not isinstance(preset, Preset):
        raise TypeError(f"preset must be a Preset, got {type(preset).__name__}")
    if new_new not in (None, True, False):
        raise TypeError(f"new_new must be None (when a strategy needs the new model), True or False, got {new_new!r}")
    start = time.perf_counter()
    data = load_dataset(dataset, old_classes=old_classes, root=root, **(data_kwargs or {}))
    labels = data.test_labels
    per_seed = {"old_old": [], "new_new": []}
    runs: dict[str, dict] = {s: {"curves": [], "trained": []} for s in strategies}
    for seed in seeds:
        ctx = ExperimentContext(data, seed=seed, setting=setting, preset=preset, device=device, cache=cache,
                                progress=progress, params=params)
        oo, ref_top1 = _point_metrics(old_only(ctx.embeddings("old")), labels)
        per_seed["old_old"].append(oo)
        pi = experiment_order(ctx, order, seed)  # one order per seed, shared by every strategy
        for name in strategies:
            if runs[name].get("status") == "n/a":
                continue  # does not apply to this setting: no need to train for it again
            try:
                strategy = build_strategy(name, ctx)
            except NotApplicable as exc:
                runs[name] = {"status": "n/a", "reason": str(exc)}
                continue
            curve = evaluate_backfill(strategy, labels, ratios=ratios, order=pi, reference_top1=ref_top1)
            trained = {k: ctx.trained[k] for k in STRATEGY_REGISTRY[name].trains if k in ctx.trained}
            runs[name]["curves"].append(curve)
            runs[name]["trained"].append(trained)
            runs[name]["passes"] = strategy.backbone_passes
        if new_new or (new_new is None and "new" in ctx.trained):
            per_seed["new_new"].append(_point_metrics(old_only(ctx.embeddings("new")), labels)[0])
    measured_new = len(per_seed["new_new"]) == len(seeds)
    # The ρ reference (issue 17): the mAP of offline_rho's flat curve, seed by seed.
    ref_run = runs.get(RHO_REFERENCE)
    if ref_run is not None and ref_run.get("status") != "n/a":
        per_seed["rho_reference"] = [_end_metrics(c) for c in ref_run["curves"]]
        rho_reference_entry = {"strategy": RHO_REFERENCE,
                               **{m: _stats([r[m] for r in per_seed["rho_reference"]]) for m in METRICS}}
        why_no_ref = ""
    else:
        per_seed["rho_reference"] = None
        why_no_ref = (f"not run (add {RHO_REFERENCE} to the strategies)" if ref_run is None
                      else f"not applicable ({ref_run['reason']})")
        rho_reference_entry = _na(f"{RHO_REFERENCE} {why_no_ref}")
    if measured_new:
        new_new_entry = {m: _stats([r[m] for r in per_seed["new_new"]]) for m in METRICS}
    elif new_new is False:
        new_new_entry = _na("not measured (new_new=False)")
    else:
        new_new_entry = _na("not measured: no strategy asked trains the new model (add e.g. offline or rank_merge, "
                            "or pass new_new=True, --new-new on the command line)")
    result = {
        "dataset": dataset,
        "setting": setting,
        "old_classes": format_classes(data.old_classes),
        "seeds": seeds,
        "order": order,
        "ratios": ratios,
        "models": {"old": ctx.old_spec.to_dict(), "new": ctx.new_spec.to_dict(), "train": vars(ctx.train_config) | {"seed": "per run"}},
        "input_shape": list(data.input_shape),
        "method_params": asdict(params) | {"transform": asdict(params.transform) | {"seed": "per run"}},
        "old_old": {m: _stats([r[m] for r in per_seed["old_old"]]) for m in METRICS},
        "new_new": new_new_entry,
        "rho_reference": rho_reference_entry,
        "strategies": {},
    }
    for name in strategies:
        run = runs[name]
        if run.get("status") == "n/a":
            result["strategies"][name] = {"status": "n/a", "reason": run["reason"],
                                          "description": STRATEGY_REGISTRY[name].description}
            continue
        curves = run["curves"]
        trained_names = sorted({k for t in run["trained"] for k in t})
        result["strategies"][name] = {
            "description": STRATEGY_REGISTRY[name].description,
            "backbone_passes": run["passes"],
            "trained": {k: {"what": run["trained"][0][k]["what"],
                            "seconds": _trained_stats([t[k] for t in run["trained"]]),
                            "cached": [bool(t[k]["cached"]) for t in run["trained"]]}
                        for k in trained_names},
            "auc_map": _stats([c.auc_map for c in curves]),
            "auc_top1": _stats([c.auc_top1 for c in curves]),
            "relative_gain": _gain_or_na(curves, per_seed["old_old"], per_seed["new_new"] if measured_new else None,
                                         "" if measured_new else new_new_entry["reason"]),
            "relative_gain_vs_reference": _gain_or_na(curves, per_seed["old_old"], per_seed["rho_reference"],
                                                      why_no_ref, top=f"the ρ reference ({RHO_REFERENCE})"),
            "final_map": _stats([c.map[-1] for c in curves]),
            "max_negative_flip": _stats([c.negative_flips.max() for c in curves]),
            "map_at": {f"{r:.1f}": _stats([c.map_at(r) for c in curves]) for r in REPORT_RATIOS if r in ratios},
            "ratios": ratios,
            "curve_map": [c.map.tolist() for c in curves],
            "curve_top1": [c.top1.tolist() for c in curves],
            "curve_top5": [c.top5.tolist() for c in curves],
            "curve_negative_flips": [c.negative_flips.tolist() for c in curves],
        }
    result["environment"] = {"backfill_lib": __version__, "python": platform.python_version(),
                             "elapsed_seconds": round(time.perf_counter() - start, 1)}
    return result


def _pm(s, digits: int = 3) -> str:
    if _is_na(s):
        return "n/a"
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"


def _trained_text(entry: dict) -> str:
    parts = []
    for v in entry.get("trained", {}).values():
        mean = v["seconds"].get("mean")
        parts.append(f"{v['what']} ({'time unknown' if mean is None else f'{mean:.1f} s'})")
    return "; ".join(parts) if parts else "nothing"


def _shape_text(shape) -> str:
    return "×".join(str(v) for v in shape)


def _query_cost_mismatch(result: dict) -> str | None:
    """Why the measured query costs do not describe this run (None when they do)."""
    setup = result["query_cost"].get("setup", {})
    model, image, dim = setup.get("model"), setup.get("image"), setup.get("embed_dim")
    measured = f"{model or '?'}{f' d={dim}' if dim else ''} on {_shape_text(image) if image else '?'} inputs"
    models = result.get("models", {})
    archs = {m.get("arch") for m in (models.get("old", {}), models.get("new", {}))}
    dims = {m.get("embed_dim") for m in (models.get("old", {}), models.get("new", {}))}
    shape = result.get("input_shape")
    run = (f"{'/'.join(sorted(str(a) for a in archs))} d={'/'.join(sorted(str(d) for d in dims))} on "
           f"{_shape_text(shape) + ' inputs' if shape else 'inputs of unrecorded size'}")
    if archs != {model} or (dim is not None and dims != {dim}) or shape is None or list(shape) != list(image or []):
        return f"measured for {measured}, but this run uses {run}"
    return None


def format_table(result: dict, markdown: bool = False) -> str:
    """The results as a text table (or a Markdown table), one row per strategy.

    Columns: strategy, what is trained and how long it took, backbone passes per query, measured
    query cost as a multiple of one new-model pass (when ``result["query_cost"]`` holds it *and*
    it was measured with this run's models and input size; otherwise a note says what it was
    measured on instead), mAP at r = 0, 0.5, 1 (r = 1: the final mAP), AUC of mAP and of top-1,
    relative gain, relative gain against the ρ reference (only when the results hold one, i.e.
    ``offline_rho`` was run: ``result["rho_reference"]``), largest negative-flip rate. Values are
    ``mean ± std`` over seeds; a value that could not be measured reads "n/a" (the notes under the
    table say why). A title line gives the dataset, setting, old classes, seeds, backfill order
    (``random`` for results saved before orders were recorded) and the old/old and new/new
    references (and the ρ reference's mAP when there is one).

    Parameters
    ----------
    result : dict
        The output of :func:`run_experiment`, or the same read back from its JSON file.
    markdown : bool, default False
        Write a Markdown table (title in bold, marked as our measurements, and a note on how the
        query cost was measured) instead of aligned plain text.

    Returns
    -------
    str
        The table, without a trailing newline.
    """
    notes = []
    cost = result.get("query_cost", {}).get("ratios")
    if cost:
        mismatch = _query_cost_mismatch(result)
        if mismatch:
            notes.append(f"Query cost not shown: benchmarks/query_cost.py {mismatch}.")
            cost = None
    ref = result.get("rho_reference")
    # Results saved before issue 17 have no ρ reference, and runs without offline_rho an n/a one: no column then.
    ref = ref if isinstance(ref, dict) and ref.get("status") != "n/a" and not _is_na(ref.get("map")) else None
    head = ["strategy", "trained (time)", "passes", *(["query cost"] if cost else []), "mAP r=0", "mAP r=0.5", "mAP r=1", "AUC mAP", "AUC top-1",
            "rel. gain", *(["rel. gain (ρ ref)"] if ref else []), "max neg. flip"]
    rows = []
    for name, s in result["strategies"].items():
        if s.get("status") == "n/a":
            rows.append([name, f"n/a: {s['reason']}"] + [""] * (len(head) - 2))
            continue
        gain = s["relative_gain"]
        ref_gain = s.get("relative_gain_vs_reference", _na("not measured")) if ref else None
        for label, g in (("rel. gain", gain), ("rel. gain (ρ ref)", ref_gain)):
            if g is None or not _is_na(g):
                continue
            reason = g.get("reason", "not measured") if isinstance(g, dict) else "not measured"
            if f"{label} n/a: {reason}." not in notes:
                notes.append(f"{label} n/a: {reason}.")
        rows.append([name, _trained_text(s), str(s["backbone_passes"]),
                     *([f"{cost[name]:.2f}×" if name in cost else ""] if cost else []),
                     *[_pm(s["map_at"][k]) if k in s["map_at"] else "" for k in ("0.0", "0.5", "1.0")],
                     _pm(s["auc_map"]), _pm(s["auc_top1"]), _pm(gain, 2), *([_pm(ref_gain, 2)] if ref else []),
                     _pm(s["max_negative_flip"])])
    nn_ = result["new_new"]
    if _is_na(nn_.get("map") if nn_.get("status") != "n/a" else nn_):
        notes.insert(0, f"new/new {nn_.get('reason', 'not measured')}.")
        nn_ = {"map": None, "top1": None}
    title = (f"{result['dataset']} ({result['setting']}, old classes {result['old_classes']}, "
             f"seeds {','.join(map(str, result['seeds']))}, backfill order {result.get('order', 'random')}): "
             f"old/old mAP {_pm(result['old_old']['map'])}, new/new mAP {_pm(nn_['map'])}, "
             f"old/old top-1 {_pm(result['old_old']['top1'])}, new/new top-1 {_pm(nn_['top1'])}"
             + (f", new/new with the ρ reference head ({ref.get('strategy', RHO_REFERENCE)}) mAP {_pm(ref['map'])}"
                if ref else ""))
    if ref:
        notes.append(f"rel. gain (ρ ref) = (AUC mAP − old/old mAP) / (ρ reference mAP − old/old mAP), the ρ reference "
                     f"being {ref.get('strategy', RHO_REFERENCE)}: mct's head ρ trained with mct's budget on the new "
                     "space alone and stored offline (ours); rel. gain uses new/new instead. mAP r=1 is each method's "
                     "final mAP: one above new/new means its head also made a better embedding, which rel. gain "
                     "counts as compatibility and rel. gain (ρ ref) does not.")
    if markdown:
        lines = [f"**{title}** (our measurements)", "", "| " + " | ".join(head) + " |",
                 "|" + "|".join("---" for _ in head) + "|"]
        lines += ["| " + " | ".join(c.replace("|", "/") for c in r) + " |" for r in rows]
        if cost:
            setup = result["query_cost"].get("setup", {})
            image = setup.get("image")
            lines += ["", f"Query cost: time to embed a batch of {setup.get('batch', '?')} queries with the backbones a "
                      f"strategy needs, plus its heads and the search of a {setup.get('gallery', '?')}-item gallery at "
                      f"r = {setup.get('backfill_ratio', '?')}, as a multiple of one new-model pass "
                      f"({setup.get('model', '?')}, {_shape_text(image) if image else '?'} images, "
                      f"{setup.get('device', '?')}); measured by benchmarks/query_cost.py."]
        if notes:
            lines += [""] + notes
        return "\n".join(lines)
    widths = [max(len(head[i]), *(len(r[i]) for r in rows)) for i in range(len(head))]
    fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([title, fmt(head), fmt(["-" * w for w in widths]), *map(fmt, rows), *notes])


def _parse_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


class _CliError(ValueError):
    """A bad command-line option: printed as one ``error:`` line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors: one line too, not usage + message
        self.exit(2, f"error: {message} (see --help)\n")


def _check_output(path, option: str) -> Path | None:
    """Fail now, not after the run, if ``path`` cannot be written (the folders may be created later)."""
    if path is None:
        return None
    path = Path(path).expanduser()
    if path.is_dir():
        raise _CliError(f"{option} {path} is a folder: give a file name, e.g. {path / 'results.json'}")
    existing = path.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise _CliError(f"{option} {path}: {existing} is a file, not a folder; choose another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise _CliError(f"{option} {path}: cannot write in {existing} (permission denied); choose another path")
    return path


def _write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and :func:`os.replace`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)  # atomic: a reader sees the old file or the new one, never half of one
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


_RESULT_KEYS = ("dataset", "setting", "old_classes", "seeds", "old_old", "new_new", "strategies")
_ENTRY_KEYS = ("backbone_passes", "map_at", "auc_map", "auc_top1", "relative_gain", "max_negative_flip")


def _read_json(path, option: str, what: str):
    path = Path(path).expanduser()
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise _CliError(f"{option} {path}: no such file; give {what}") from None
    except IsADirectoryError:
        raise _CliError(f"{option} {path} is a folder; give {what}") from None
    except UnicodeDecodeError:
        raise _CliError(f"{option} {path} is not a text file; give {what}") from None
    except OSError as exc:
        raise _CliError(f"{option} {path}: cannot read it ({exc.strerror or exc}); give {what}") from None
    try:
        return json.loads(text)
    except ValueError as exc:
        raise _CliError(f"{option} {path} is not valid JSON ({exc}); give {what}") from None


def _read_results(path) -> dict:
    what = "a results JSON written by --out"
    result = _read_json(path, "--table", what)
    missing = [k for k in _RESULT_KEYS if not isinstance(result, dict) or k not in result]
    if missing:
        raise _CliError(f"--table {path} is not {what}: it has no {', '.join(missing)}")
    if not isinstance(result["strategies"], dict):
        raise _CliError(f"--table {path} is not {what}: 'strategies' is not a mapping")
    for name, entry in result["strategies"].items():
        if isinstance(entry, dict) and entry.get("status") == "n/a" and "reason" in entry:
            continue
        lacking = [k for k in _ENTRY_KEYS if not isinstance(entry, dict) or k not in entry]
        if lacking:
            raise _CliError(f"--table {path} is not {what}: strategy {name!r} has no {', '.join(lacking)}")
    return result


def _read_query_cost(path) -> dict | None:
    """The query costs of ``benchmarks/query_cost.py``, or None when the file does not exist."""
    if not path or not Path(path).expanduser().exists():
        return None
    what = "a file written by benchmarks/query_cost.py (or --query-cost '' to leave the column out)"
    cost = _read_json(path, "--query-cost", what)
    if not isinstance(cost, dict) or not isinstance(cost.get("ratios"), dict) or not isinstance(cost.get("setup"), dict):
        raise _CliError(f"--query-cost {path} is not {what}: it needs 'ratios' and 'setup' mappings")
    bad = [k for k, v in cost["ratios"].items() if isinstance(v, bool) or not isinstance(v, (int, float))]
    if bad:
        raise _CliError(f"--query-cost {path} is not {what}: the cost of {bad[0]!r} is not a number")
    return {"ratios": cost["ratios"], "setup": cost["setup"], "reference": cost.get("reference", "")}


def main(argv=None) -> int:
    """The command line: ``python -m backfill_lib.experiment [options]``.

    Runs :func:`run_experiment` with the options (``--dataset``, ``--old-classes``,
    ``--strategies``, ``--seeds``, ``--setting``, ``--order``, ``--ratios``, ``--root``, ``--cache``,
    ``--device``, ``--new-new``, ``--order``, ``--preset``, ``--image-size``, ``--forward-arch``, ``--calibration``,
    ``--quiet``), adds the measured query costs of ``--query-cost``
    when that file exists, prints the table, and writes the results JSON (``--out``) and the
    Markdown table (``--markdown``) when asked. ``--table JSON`` only rebuilds the tables from
    saved results. ``--help`` lists every option.

    Every option is checked before any training, the output paths included; the outputs are
    written atomically. If an output still cannot be written at the end, the results are saved
    in the temporary folder instead and the message says where.

    Parameters
    ----------
    argv : list of str, optional
        The arguments; default ``sys.argv[1:]``.

    Returns
    -------
    int
        The exit status: 0 on success, 2 when an option is rejected, the data are missing or an
        output cannot be written (one ``error: ...`` line is printed to stderr, naming the
        option). Malformed options make ``argparse`` exit with status 2 the same way.
    """
    parser = _Parser(prog="python -m backfill_lib.experiment", description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", default="digits", choices=DATASETS)
    parser.add_argument("--old-classes", default=None, help="classes of the old model, e.g. 0-4 (default: first half)")
    parser.add_argument("--strategies", default=",".join(DEFAULT_STRATEGIES),
                        help=f"comma-separated, from: {', '.join(STRATEGY_REGISTRY)}")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds, e.g. 0,1,2")
    parser.add_argument("--setting", default="homogeneous", choices=SETTINGS)
    parser.add_argument("--order", default="random",
                        help=f"backfill order policy, one of: {', '.join(ORDER_POLICIES)} (default random)")
    parser.add_argument("--ratios", default=None, help="comma-separated backfill ratios (default 0,0.1,...,1)")
    parser.add_argument("--root", default=None, help="data folder (cifar100, imagefolder)")
    parser.add_argument("--cache", default=None, help="checkpoint folder (default $BACKFILL_CACHE or ~/.cache/backfill_lib)")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: GPU if available)")
    parser.add_argument("--new-new", action="store_true",
                        help="train the new model for the new/new reference and the relative gain even when no "
                             "strategy asked needs it")
    parser.add_argument("--preset", default=None,
                        help=f"models and schedule, from: {', '.join(PRESETS)} (default: the dataset's own; "
                             "cifar100_bt2 is the BT² recipe, ResNet-50 at 224 px)")
    parser.add_argument("--image-size", default=None, type=int,
                        help="image side in pixels for cifar100 (default 32; 224 with --preset cifar100_bt2)")
    parser.add_argument("--forward-arch", default="mlp",
                        help="forward map h: mlp (ours, default) or fct (ml-fct's two-branch map)")
    parser.add_argument("--calibration", default="platt",
                        help="score maps of rank_merge_calibrated: platt (default) or negatives (labelled training "
                             "pairs), znorm or neighbours (no labels)")
    parser.add_argument("--out", default=None, help="write the results JSON here")
    parser.add_argument("--markdown", default=None, help="also write the Markdown table here")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--query-cost", default=str(DEFAULT_QUERY_COST),
                        help="query-cost JSON of benchmarks/query_cost.py to add to the table (used if it exists)")
    parser.add_argument("--table", default=None, metavar="JSON",
                        help="only rebuild the tables from a saved results JSON (no training)")
    args = parser.parse_args(argv)
    try:
        outputs = {"--out": _check_output(args.out, "--out"), "--markdown": _check_output(args.markdown, "--markdown")}
        if outputs["--out"] and outputs["--out"] == outputs["--markdown"]:
            raise _CliError(f"--out and --markdown are the same file {outputs['--out']}: give two paths")
        query_cost = _read_query_cost(args.query_cost)
        if args.table:
            result = _read_results(args.table)
            try:
                format_table(result)  # a file with the right keys but the wrong contents fails here, not later
            except (KeyError, TypeError, AttributeError, IndexError, ValueError) as exc:
                raise _CliError(f"--table {args.table} is not a results JSON written by --out: its contents do not "
                                f"fit ({type(exc).__name__}: {exc})") from None
        else:
            result = _run_from_options(args)
    except (ValueError, TypeError, FileNotFoundError) as exc:  # DataNotFoundError is a FileNotFoundError
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if query_cost is not None:
        result["query_cost"] = query_cost
    return _write_outputs(result, outputs)


def _run_from_options(args) -> dict:
    """Check every option (naming it in the message), then run the experiment."""
    strategies = _check_strategies(_parse_list(args.strategies), "--strategies")
    try:
        seeds = [int(s) for s in _parse_list(args.seeds)]
    except ValueError:
        raise _CliError(f"--seeds must be comma-separated non-negative integers, e.g. 0,1,2 (got {args.seeds!r})") from None
    seeds = _check_seeds(seeds, "--seeds")
    order = check_choice(args.order, ORDER_POLICIES, "--order")
    ratios = DEFAULT_RATIOS
    if args.ratios is not None:
        try:
            ratios = [float(r) for r in _parse_list(args.ratios)]
        except ValueError:
            raise _CliError(f"--ratios must be comma-separated numbers in [0, 1], e.g. 0,0.5,1 "
                            f"(got {args.ratios!r})") from None
        ratios = _check_run_ratios(ratios, "--ratios")
    preset, data_kwargs = _preset_from_options(args)
    from .calibration import CALIBRATIONS

    params = MethodParams(forward_arch=check_choice(args.forward_arch, FORWARD_ARCHS, "--forward-arch"),
                          calibration=check_choice(args.calibration, CALIBRATIONS, "--calibration"))
    device = resolve_device(args.device, "--device")
    try:
        check_cache_dir(args.cache, "--cache")
    except OSError as exc:  # e.g. a path under /proc: the folder cannot even be looked at
        raise _CliError(f"--cache {args.cache}: cannot use it as the checkpoint folder "
                        f"({exc.strerror or exc}); give a folder you can write to") from None
    return run_experiment(args.dataset, args.old_classes, strategies, seeds, args.setting, ratios, device=device,
                          cache=args.cache, root=args.root, progress=not args.quiet,
                          new_new=True if args.new_new else None, order=order, preset=preset,
                          data_kwargs=data_kwargs, params=params)


def _preset_dataset(preset: str) -> str:
    """The dataset a preset is a recipe for: the longest dataset name it is or starts with plus "_"."""
    # Not the text before the first "_": "fashion_mnist" is a dataset of its own.
    return max((d for d in DATASETS if preset == d or preset.startswith(d + "_")), key=len,
               default=preset.split("_")[0])


def _preset_from_options(args) -> tuple[Preset | None, dict]:
    """``--preset`` and ``--image-size``: the preset must be one of the dataset's own."""
    preset = None
    if args.preset is not None:
        check_choice(args.preset, tuple(PRESETS), "--preset")
        if _preset_dataset(args.preset) != args.dataset:
            raise _CliError(f"--preset {args.preset} is a recipe for {_preset_dataset(args.preset)}, not for "
                            f"--dataset {args.dataset}: choose one of "
                            f"{', '.join(p for p in PRESETS if _preset_dataset(p) == args.dataset)}")
        preset = PRESETS[args.preset]
    size = args.image_size
    if size is None and args.preset == "cifar100_bt2":
        size = 224  # the BT² recipe's ResNet-50 sees ImageNet-sized inputs
    if size is None:
        return preset, {}
    if args.dataset != "cifar100":
        raise _CliError(f"--image-size applies to --dataset cifar100 only (got --dataset {args.dataset})")
    if size < 32:
        raise _CliError(f"--image-size must be at least 32 (32 = CIFAR's own size, 224 = the BT² recipe), got {size}")
    return preset, {"image_size": size}


def _write_outputs(result: dict, outputs: dict) -> int:
    print(format_table(result))
    texts = {"--out": lambda: json.dumps(result, indent=1) + "\n",
             "--markdown": lambda: format_table(result, markdown=True) + "\n"}
    for option, path in outputs.items():
        if path is None:
            continue
        try:
            _write_atomic(path, texts[option]())
        except OSError as exc:
            # The run is done: do not lose it because the chosen place failed at the last moment.
            fd, fallback = tempfile.mkstemp(prefix="backfill-results-", suffix=".json")
            with os.fdopen(fd, "w") as f:
                f.write(texts["--out"]())
            print(f"error: {option}: could not write {path} ({exc.strerror or exc}); the results JSON was saved to "
                  f"{fallback} instead", file=sys.stderr)
            return 2
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
