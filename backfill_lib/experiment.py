"""The experiment command: train (or load) models, simulate the backfill, print and save results.

Example::

    python -m backfill_lib.experiment --dataset digits --old-classes 0-4 \\
        --strategies old,offline,rank_merge --seeds 0,1,2 --out results/digits.json

For each seed the old and new models are trained (or loaded from the checkpoint cache) with that
seed, and the backfill order is drawn with it; the table reports mean ± std over seeds. When
``results/query_cost.json`` (written by ``benchmarks/query_cost.py``) exists, its measured query
costs join the results and the table. ``--table results/x.json`` rebuilds the tables from saved
results without training anything.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from . import __version__
from .backfill import DEFAULT_RATIOS, evaluate_backfill, old_only
from .data import DATASETS, format_classes, load_dataset
from .metrics import relative_gain
from .validation import check_ratios
from .strategies import (PRESETS, SETTINGS, STRATEGY_REGISTRY, ExperimentContext, MethodParams, NotApplicable,
                         build_strategy)

DEFAULT_STRATEGIES = ("old", "offline", "rank_merge")
#: Written by ``benchmarks/query_cost.py``.
DEFAULT_QUERY_COST = Path(__file__).resolve().parents[1] / "results" / "query_cost.json"
REPORT_RATIOS = (0.0, 0.5, 1.0)


def _stats(values) -> dict:
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0}


def _point_metrics(strategy, labels) -> dict:
    c = evaluate_backfill(strategy, labels, ratios=[0.0])
    return {"map": float(c.map[0]), "top1": float(c.top1[0]), "top5": float(c.top5[0])}, c.per_query_top1[0]


def run_experiment(dataset: str = "digits", old_classes=None, strategies=DEFAULT_STRATEGIES, seeds=(0, 1, 2),
                   setting: str = "homogeneous", ratios=DEFAULT_RATIOS, device=None, cache=None, root=None,
                   progress: bool = True, data_kwargs: dict | None = None, preset=None,
                   params: MethodParams | None = None) -> dict:
    """Run the backfill experiment and return the JSON-ready results (see module docstring).

    For each seed, the old model φ_o (old classes) and the new model φ_n (all classes) are
    trained or loaded from the checkpoint cache, each strategy is built and evaluated along the
    backfill (:func:`~backfill_lib.backfill.evaluate_backfill`, backfill order drawn with the
    seed), and old/old and new/new retrieval are measured as references. A strategy that does
    not apply to the setting (e.g. BCT with ``d_n ≠ d_o``) is reported as ``"n/a"`` with the
    reason.

    Parameters
    ----------
    dataset : str, default "digits"
        ``digits``, ``synthetic``, ``cifar100`` or ``imagefolder``.
    old_classes : str or sequence of int, optional
        Classes of the old model (default the first half).
    strategies : sequence of str, default ("old", "offline", "rank_merge")
        Names registered in :data:`~backfill_lib.strategies.STRATEGY_REGISTRY`.
    seeds : sequence of int, default (0, 1, 2)
        One run per seed (model initialisation, data order, backfill order).
    setting : {"homogeneous", "heterogeneous"}, default "homogeneous"
        Whether the new model has the old model's architecture, or the preset's
        ``new_heterogeneous`` one.
    ratios : sequence of float, default ``DEFAULT_RATIOS``
        Backfill ratios ``r`` in [0, 1] (0, 0.1, ..., 1 by default); must include 0 and 1.
    device, cache, root : optional
        Torch device (default the GPU if there is one), checkpoint folder (default
        ``$BACKFILL_CACHE``, see :func:`~backfill_lib.training.cache_dir`), data folder (default
        ``$BACKFILL_DATA``, see :func:`~backfill_lib.data.data_root`).
    progress : bool, default True
        Show training progress bars.
    data_kwargs : dict, optional
        Extra keyword arguments of :func:`~backfill_lib.data.load_dataset` (``split_seed``,
        ``test_size``, ``image_size``, ...).
    preset : Preset, optional
        Models and training schedule (a :class:`~backfill_lib.strategies.Preset`); default the
        dataset's entry of ``backfill_lib.strategies.PRESETS``.
    params : MethodParams, optional
        Hyper-parameters of the compatibility methods (default :class:`~backfill_lib.strategies.MethodParams`).

    Returns
    -------
    dict
        JSON-ready results: the settings (``dataset``, ``setting``, ``old_classes``, ``seeds``,
        ``ratios``, ``models``, ``method_params``), old/old and new/new mAP, top-1 and top-5
        (``old_old``, ``new_new``), and per strategy (``strategies``) the AUCs, relative gain,
        largest negative-flip rate and mAP at r = 0, 0.5, 1 as ``{"mean", "std"}`` over seeds,
        the curves of every seed, and what was trained and how long it took; plus
        ``environment`` (versions, elapsed time). :func:`format_table` prints it.

    Raises
    ------
    ValueError
        If ``dataset``, a strategy name or ``setting`` is unknown, ``seeds`` is empty, a ratio is
        outside [0, 1], ``ratios`` lacks 0 or 1, or the dataset loader rejects an argument.
    ~backfill_lib.data.DataNotFoundError
        If the data of ``cifar100`` or ``imagefolder`` are not on disk and cannot be downloaded.
    """
    params = params or MethodParams()
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of: {', '.join(DATASETS)}")
    strategies = list(strategies)
    unknown = [s for s in strategies if s not in STRATEGY_REGISTRY]
    if unknown:
        raise ValueError(f"unknown strategy {unknown[0]!r}; choose from: {', '.join(STRATEGY_REGISTRY)}")
    if setting not in SETTINGS:
        raise ValueError(f"unknown setting {setting!r}; choose one of: {', '.join(SETTINGS)}")
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("seeds is empty: give at least one seed")
    ratios = check_ratios(ratios).tolist()  # sorted and unique, as evaluate_backfill pairs them with values
    if 0.0 not in ratios or 1.0 not in ratios:
        raise ValueError("ratios must include 0 and 1 (the AUC spans the whole backfill)")
    start = time.perf_counter()
    data = load_dataset(dataset, old_classes=old_classes, root=root, **(data_kwargs or {}))
    labels = data.test_labels
    per_seed = {"old_old": [], "new_new": []}
    runs: dict[str, dict] = {s: {"curves": [], "trained": []} for s in strategies}
    for seed in seeds:
        ctx = ExperimentContext(data, seed=seed, setting=setting, preset=preset, device=device, cache=cache,
                                progress=progress, params=params)
        oo, ref_top1 = _point_metrics(old_only(ctx.embeddings("old")), labels)
        nn_, _ = _point_metrics(old_only(ctx.embeddings("new")), labels)
        per_seed["old_old"].append(oo)
        per_seed["new_new"].append(nn_)
        for name in strategies:
            try:
                strategy = build_strategy(name, ctx)
            except NotApplicable as exc:
                runs[name] = {"status": "n/a", "reason": str(exc)}
                continue
            if runs[name].get("status") == "n/a":
                continue
            curve = evaluate_backfill(strategy, labels, ratios=ratios, order_seed=seed, reference_top1=ref_top1)
            trained = {k: ctx.trained[k] for k in STRATEGY_REGISTRY[name].trains if k in ctx.trained}
            runs[name]["curves"].append(curve)
            runs[name]["trained"].append(trained)
            runs[name]["passes"] = strategy.backbone_passes
    result = {
        "dataset": dataset,
        "setting": setting,
        "old_classes": format_classes(data.old_classes),
        "seeds": seeds,
        "ratios": ratios,
        "models": {"old": ctx.old_spec.to_dict(), "new": ctx.new_spec.to_dict(), "train": vars(ctx.train_config) | {"seed": "per run"}},
        "method_params": asdict(params) | {"transform": asdict(params.transform) | {"seed": "per run"}},
        "old_old": {m: _stats([r[m] for r in per_seed["old_old"]]) for m in ("map", "top1", "top5")},
        "new_new": {m: _stats([r[m] for r in per_seed["new_new"]]) for m in ("map", "top1", "top5")},
        "strategies": {},
    }
    for name in strategies:
        run = runs[name]
        if run.get("status") == "n/a":
            result["strategies"][name] = {"status": "n/a", "reason": run["reason"],
                                          "description": STRATEGY_REGISTRY[name].description}
            continue
        curves = run["curves"]
        gains = [c.relative_gain(oo["map"], nn_["map"]) for c, oo, nn_ in
                 zip(curves, per_seed["old_old"], per_seed["new_new"])]
        trained_names = sorted({k for t in run["trained"] for k in t})
        result["strategies"][name] = {
            "description": STRATEGY_REGISTRY[name].description,
            "backbone_passes": run["passes"],
            "trained": {k: {"what": run["trained"][0][k]["what"],
                            "seconds": _stats([t[k]["seconds"] or 0.0 for t in run["trained"]])}
                        for k in trained_names},
            "auc_map": _stats([c.auc_map for c in curves]),
            "auc_top1": _stats([c.auc_top1 for c in curves]),
            "relative_gain": _stats(gains),
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


def _pm(s: dict, digits: int = 3) -> str:
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"


def _trained_text(entry: dict) -> str:
    parts = [f"{v['what']} ({v['seconds']['mean']:.1f} s)" for v in entry.get("trained", {}).values()]
    return "; ".join(parts) if parts else "nothing"


def format_table(result: dict, markdown: bool = False) -> str:
    """The results as a text table (or a Markdown table), one row per strategy.

    Columns: strategy, what is trained and how long it took, backbone passes per query, measured
    query cost as a multiple of one new-model pass (when ``result["query_cost"]`` holds it), mAP at
    r = 0, 0.5, 1, AUC of mAP and of top-1, relative gain, largest negative-flip rate. Values are
    ``mean ± std`` over seeds. A title line gives the dataset, setting, old classes, seeds and the
    old/old and new/new references.

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
    cost = result.get("query_cost", {}).get("ratios")
    head = ["strategy", "trained (time)", "passes", *(["query cost"] if cost else []), "mAP r=0", "mAP r=0.5", "mAP r=1", "AUC mAP", "AUC top-1",
            "rel. gain", "max neg. flip"]
    rows = []
    for name, s in result["strategies"].items():
        if s.get("status") == "n/a":
            rows.append([name, f"n/a: {s['reason']}"] + [""] * (len(head) - 2))
            continue
        rows.append([name, _trained_text(s), str(s["backbone_passes"]),
                     *([f"{cost[name]:.2f}×" if name in cost else ""] if cost else []),
                     *[_pm(s["map_at"][k]) if k in s["map_at"] else "" for k in ("0.0", "0.5", "1.0")],
                     _pm(s["auc_map"]), _pm(s["auc_top1"]), _pm(s["relative_gain"], 2), _pm(s["max_negative_flip"])])
    title = (f"{result['dataset']} ({result['setting']}, old classes {result['old_classes']}, "
             f"seeds {','.join(map(str, result['seeds']))}): "
             f"old/old mAP {_pm(result['old_old']['map'])}, new/new mAP {_pm(result['new_new']['map'])}, "
             f"old/old top-1 {_pm(result['old_old']['top1'])}, new/new top-1 {_pm(result['new_new']['top1'])}")
    if markdown:
        lines = [f"**{title}** (our measurements)", "", "| " + " | ".join(head) + " |",
                 "|" + "|".join("---" for _ in head) + "|"]
        lines += ["| " + " | ".join(c.replace("|", "/") for c in r) + " |" for r in rows]
        if cost:
            setup = result["query_cost"].get("setup", {})
            lines += ["", f"Query cost: time to embed a batch of {setup.get('batch', '?')} queries with the backbones a "
                      f"strategy needs, plus its heads and the search of a {setup.get('gallery', '?')}-item gallery at "
                      f"r = {setup.get('backfill_ratio', '?')}, as a multiple of one new-model pass "
                      f"({setup.get('model', '?')}, {setup.get('image', '?')} images, {setup.get('device', '?')}); "
                      "measured by benchmarks/query_cost.py."]
        return "\n".join(lines)
    widths = [max(len(head[i]), *(len(r[i]) for r in rows)) for i in range(len(head))]
    fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([title, fmt(head), fmt(["-" * w for w in widths]), *map(fmt, rows)])


def _parse_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def main(argv=None) -> int:
    """The command line: ``python -m backfill_lib.experiment [options]``.

    Runs :func:`run_experiment` with the options (``--dataset``, ``--old-classes``,
    ``--strategies``, ``--seeds``, ``--setting``, ``--ratios``, ``--root``, ``--cache``,
    ``--device``, ``--quiet``), adds the measured query costs of ``--query-cost`` when that file
    exists, prints the table, and writes the results JSON (``--out``) and the Markdown table
    (``--markdown``) when asked. ``--table JSON`` only rebuilds the tables from saved results.
    ``--help`` lists every option.

    Parameters
    ----------
    argv : list of str, optional
        The arguments; default ``sys.argv[1:]``.

    Returns
    -------
    int
        The exit status: 0 on success, 2 when the experiment rejects an argument or the data
        are missing (the message is printed to stderr). Malformed options make ``argparse``
        exit with status 2.
    """
    parser = argparse.ArgumentParser(prog="python -m backfill_lib.experiment", description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", default="digits", choices=DATASETS)
    parser.add_argument("--old-classes", default=None, help="classes of the old model, e.g. 0-4 (default: first half)")
    parser.add_argument("--strategies", default=",".join(DEFAULT_STRATEGIES),
                        help=f"comma-separated, from: {', '.join(STRATEGY_REGISTRY)}")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds, e.g. 0,1,2")
    parser.add_argument("--setting", default="homogeneous", choices=SETTINGS)
    parser.add_argument("--ratios", default=None, help="comma-separated backfill ratios (default 0,0.1,...,1)")
    parser.add_argument("--root", default=None, help="data folder (cifar100, imagefolder)")
    parser.add_argument("--cache", default=None, help="checkpoint folder (default $BACKFILL_CACHE or ~/.cache/backfill_lib)")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: GPU if available)")
    parser.add_argument("--out", default=None, help="write the results JSON here")
    parser.add_argument("--markdown", default=None, help="also write the Markdown table here")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--query-cost", default=str(DEFAULT_QUERY_COST),
                        help="query-cost JSON of benchmarks/query_cost.py to add to the table (used if it exists)")
    parser.add_argument("--table", default=None, metavar="JSON",
                        help="only rebuild the tables from a saved results JSON (no training)")
    args = parser.parse_args(argv)
    if args.table:
        result = json.loads(Path(args.table).read_text())
        _attach_query_cost(result, args.query_cost)
        return _write_outputs(result, args)
    try:
        seeds = [int(s) for s in _parse_list(args.seeds)]
        ratios = [float(r) for r in _parse_list(args.ratios)] if args.ratios else DEFAULT_RATIOS
    except ValueError as exc:
        parser.error(f"--seeds/--ratios must be comma-separated numbers ({exc})")
    try:
        result = run_experiment(args.dataset, args.old_classes, _parse_list(args.strategies), seeds, args.setting,
                                ratios, device=args.device, cache=args.cache, root=args.root,
                                progress=not args.quiet)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    _attach_query_cost(result, args.query_cost)
    return _write_outputs(result, args)


def _attach_query_cost(result: dict, path) -> None:
    if path and Path(path).exists():
        cost = json.loads(Path(path).read_text())
        result["query_cost"] = {"ratios": cost["ratios"], "setup": cost["setup"], "reference": cost["reference"]}


def _write_outputs(result: dict, args) -> int:
    print(format_table(result))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.out}")
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(format_table(result, markdown=True) + "\n")
        print(f"wrote {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
