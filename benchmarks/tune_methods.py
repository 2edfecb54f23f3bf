"""Give every method the same validation budget over its own knobs, and record what it chose.

The dataset's *training* split is cut again into train' and a validation split
(``validation_sweep.validation_data``, the protocol of the earlier ``mct`` sweep: stratified, 2/3
train', 1/3 validation, seed 0; :func:`validation_data_for` applies it to Fashion-MNIST too). For each method,
each of its settings (the same number for every method, :data:`BUDGET`, unless the method has
fewer possible values) trains the old, new and compatible models on train' and the heads on
their train' embeddings, and is scored by the relative gain of its backfill curve on the
validation items (leave-one-out, random order, 3 seeds). The setting with the largest mean
validation gain is chosen; the largest negative-flip rate is reported next to it. The test split
is never loaded into a model. Writes ``results/tuning.json`` and ``results/tuning.md``; with
``--experiment`` it then runs the experiment (test split) with the chosen values, every strategy
and the ρ reference ``offline_rho``, random and (when the library has it) uncertain-first order:
``results/digits_tuned*.json/.md``. With ``--dataset fashion_mnist`` (``PRESETS["fashion_mnist"]``,
``load_dataset("fashion_mnist")``'s 20,000 train / 3,000 test images unless ``--n-train`` /
``--n-test`` say otherwise) the files are ``results/fashion_tuning.json/.md`` and
``results/fashion_tuned*.json/.md`` (:data:`OUTPUTS`).

    python benchmarks/tune_methods.py [--dataset digits|fashion_mnist] [--seeds 0,1,2] [--experiment] [--experiment-only]

``transform_steps`` is one field of ``MethodParams`` shared by ``ψ``, ``ρ`` and ``h``: each head
method chooses its own, recorded in ``per_strategy``; :func:`params_for` builds one
``MethodParams`` per strategy from it (the ``mct`` ablations use ``mct``'s choice), and
:func:`run_tuned_experiment` runs the experiment once per distinct ``MethodParams`` and merges
the tables.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from validation_sweep import validation_data  # noqa: E402  (the validation protocol, reused)

from backfill_lib import strategies as st  # noqa: E402
from backfill_lib.backfill import evaluate_backfill, old_only  # noqa: E402
from backfill_lib.data import BackfillData, load_dataset  # noqa: E402
from backfill_lib.experiment import format_table, run_experiment  # noqa: E402
from backfill_lib.metrics import auc, relative_gain  # noqa: E402
from backfill_lib.context import tuned_params  # noqa: E402
from backfill_lib.strategies import PRESETS, ExperimentContext, MethodParams, NotApplicable, build_strategy  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "results"
#: Settings every method gets on the validation split (fewer only when a knob has fewer values).
BUDGET = 6
#: Head steps tried by the methods whose only knob is the length of their head's training.
STEPS = (125, 250, 500, 1000, 2000, 4000)
#: Weights of an influence loss (BCT, BCT with pseudo-classifier): 10 is BT²'s α.
LAMBDAS = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0)
#: Datasets the script runs on, and the stems of what it writes for each: the tuning file
#: (``<tuning>.json/.md``) and the tuned experiment (``<tuned>.json/.md``, ``<tuned>_<order>.json/.md``).
#: The digits names are the ones the committed results and the book read.
OUTPUTS = {"digits": {"tuning": "tuning", "tuned": "digits_tuned"},
           "fashion_mnist": {"tuning": "fashion_tuning", "tuned": "fashion_tuned"}}
#: Strategies of the tuned experiment (the ones the library registers), with the ρ reference next to mct.
EXPERIMENT_STRATEGIES = ("old", "offline", "rank_merge", "rank_merge_calibrated", "new_on_old", "bct", "bct_pseudo",
                         "ra_bct", "reverse_transform", "mct", "offline_rho", "mct_old_neg", "mct_new_neg",
                         "mct_no_rho", "forward_transform")


def validation_data_for(dataset: str = "digits", data_kwargs: dict | None = None, setting_seed: int = 0) -> BackfillData:
    """The validation protocol on ``dataset``: its training split cut again (stratified, 1/3 validation).

    Digits is ``validation_sweep.validation_data`` itself (the committed digits tuning); any other
    dataset gets the same cut of ``load_dataset(dataset, **data_kwargs)``'s training split (for
    Fashion-MNIST's default 20,000 training images: 13,333 train' / 6,667 validation). The test
    split is not used.

    Parameters
    ----------
    dataset : str, default "digits"
        A key of :data:`OUTPUTS`.
    data_kwargs : dict, optional
        Passed on to ``load_dataset`` (``n_train``, ``n_test``, ...); digits takes none.
    setting_seed : int, default 0
        Seed of the cut.

    Returns
    -------
    BackfillData
        Named ``"<dataset>-validation"``; its ``test`` split is the validation items.

    Raises
    ------
    ValueError
        If ``dataset`` is not a key of :data:`OUTPUTS`, or digits is given ``data_kwargs``.
    """
    if dataset not in OUTPUTS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of: {', '.join(OUTPUTS)}")
    if dataset == "digits":
        if data_kwargs:
            raise ValueError(f"digits takes no data_kwargs (got {data_kwargs})")
        return validation_data(setting_seed)
    from sklearn.model_selection import train_test_split
    from torch.utils.data import Subset

    full = load_dataset(dataset, **(data_kwargs or {}))
    idx = np.arange(len(full.train_labels))
    tr, va = train_test_split(idx, test_size=1 / 3, stratify=full.train_labels, random_state=setting_seed)
    tr, va = np.sort(tr), np.sort(va)
    return BackfillData(f"{dataset}-validation", Subset(full.train, tr.tolist()), Subset(full.train_plain, tr.tolist()),
                        Subset(full.train_plain, va.tolist()), full.train_labels[tr], full.train_labels[va],
                        full.num_classes, full.old_classes, full.input_shape,
                        {**{k: v for k, v in full.info.items() if k != "root"}, "validation": "1/3 of train, stratified",
                         "validation_seed": setting_seed})


def command(script: str, dataset: str, seeds, data_kwargs: dict | None = None, epochs: int | None = None,
            extra: str = "") -> str:
    """The command line that reproduces a result (digits: exactly the committed one)."""
    parts = [f"python benchmarks/{script}"] + ([extra] if extra else [])
    if dataset != "digits":
        parts.append(f"--dataset {dataset}")
    for k, v in (data_kwargs or {}).items():
        parts.append(f"--{k.replace('_', '-')} {v}")
    if epochs is not None:
        parts.append(f"--epochs {epochs}")
    parts.append("--seeds " + ",".join(map(str, seeds)))
    return " ".join(parts)


def dataset_preset(dataset: str, epochs: int | None = None):
    """``PRESETS[dataset]``, with ``epochs`` training epochs when given (smoke runs only)."""
    preset = PRESETS[dataset]
    if epochs is None:
        return preset
    return dataclasses.replace(preset, train=dataclasses.replace(preset.train, epochs=epochs))


def _ra_bct_settings() -> list[dict]:
    # λ × τ with all negatives (4), and the published λ, τ with the hardest top-k negatives (2).
    rows = [{"ra_bct_lambda": lam, "ra_bct_tau": tau, "ra_bct_topk": None}
            for lam, tau in itertools.product((1.0, 3.0), (0.05, 0.1))]
    return rows + [{"ra_bct_lambda": 1.0, "ra_bct_tau": 0.05, "ra_bct_topk": k} for k in (8, 32)]


def _calibrations() -> tuple:
    """The calibration methods the library offers for ``rank_merge_calibrated`` (empty if none yet)."""
    for module in ("backfill_lib.calibration", "backfill_lib.backfill", "backfill_lib.strategies"):
        try:
            mod = __import__(module, fromlist=["_"])
        except ImportError:
            continue
        for name in ("CALIBRATIONS", "CALIBRATION_METHODS"):
            if isinstance(getattr(mod, name, None), (tuple, list)):
                return tuple(getattr(mod, name))
    return ()


def search_spaces() -> dict[str, list[dict]]:
    """Every method's validation settings: method (a strategy name) → list of MethodParams overrides.

    Returns
    -------
    dict
        ``{method: [{field: value, ...}, ...]}``; every list holds :data:`BUDGET` settings (fewer
        only when the knob has fewer possible values) and includes the published default.
    """
    spaces = {
        "bct": [{"bct_lambda": v} for v in LAMBDAS],
        "bct_pseudo": [{"bct_pseudo_lambda": v} for v in LAMBDAS],
        "ra_bct": _ra_bct_settings(),
        "reverse_transform": [{"transform_steps": s} for s in STEPS],
        "forward_transform": [{"transform_steps": s} for s in STEPS],
        "mct": [{"mct_tau": t, "mct_lambda_rt": lam} for t, lam in itertools.product((0.1, 0.2, 0.4), (0.0, 1.0))],
    }
    calibrations = _calibrations()
    spaces["rank_merge_calibrated"] = [{"calibration": c} for c in calibrations[:BUDGET]]
    return spaces


def available(method: str, settings: list[dict]) -> str | None:
    """Why ``method`` cannot be tuned with this library yet (None when it can).

    Parameters
    ----------
    method : str
        A strategy name.
    settings : list of dict
        Its settings (MethodParams overrides).

    Returns
    -------
    str or None
        The reason (strategy not registered, a field missing from ``MethodParams``, no settings).
    """
    if method not in st.STRATEGY_REGISTRY:
        return f"strategy {method!r} is not registered in this library version"
    if not settings:
        return "no settings (the library lists no calibration methods yet)"
    fields = {f.name for f in dataclasses.fields(MethodParams)}
    missing = sorted({k for s in settings for k in s} - fields)
    if missing:
        return f"MethodParams has no field {', '.join(missing)} in this library version"
    return None


def grid_of(settings: list[dict]) -> dict[str, list]:
    """The values each field takes over the settings, in first-seen order.

    Parameters
    ----------
    settings : list of dict
        MethodParams overrides.

    Returns
    -------
    dict
        ``{field: [values]}``.
    """
    grid: dict[str, list] = {}
    for s in settings:
        for k, v in s.items():
            if v not in grid.setdefault(k, []):
                grid[k].append(v)
    return grid


def choose(rows: list[dict]) -> dict:
    """The row with the largest mean validation gain (the first of equal ones).

    Parameters
    ----------
    rows : list of dict
        Each with ``"gain_mean"``.

    Returns
    -------
    dict
        The chosen row.

    Raises
    ------
    ValueError
        If ``rows`` is empty.
    """
    if not rows:
        raise ValueError("rows is empty: nothing to choose from")
    return max(rows, key=lambda r: r["gain_mean"])  # max keeps the first of ties


def _merge_params(per_strategy: dict) -> tuple[dict, dict]:
    """Fields every method that tuned them chose alike (``method_params``), and the others."""
    method_params, conflicts = {}, {}
    for choice in per_strategy.values():
        for k, v in choice.items():
            values = {json.dumps(c[k]) for c in per_strategy.values() if k in c}
            if len(values) == 1:
                method_params[k] = v
            else:
                conflicts[k] = {m: c[k] for m, c in per_strategy.items() if k in c}
    return method_params, conflicts


#: Strategies that use another strategy's tuned values (the ablations of ``mct``).
#: The tuned MethodParams of one strategy: now in the library (the chapters use it too).
params_for = tuned_params


def _stats(values) -> dict:
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0}


def _validate(method: str, setting: dict, data, seeds, refs, cache, preset=None) -> dict:
    """Validation gain and worst negative flip of one setting (a fresh context per seed: the
    context keeps heads and models by name, so a reused one would return the first setting's)."""
    gains, flips = [], []
    params = MethodParams(**setting)
    for seed, (oo, nn_, ref) in zip(seeds, refs):
        ctx = ExperimentContext(data, seed=seed, preset=preset or PRESETS["digits"], cache=cache, progress=False,
                                params=params)
        curve = evaluate_backfill(build_strategy(method, ctx), data.test_labels, order_seed=seed, reference_top1=ref)
        gains.append(curve.relative_gain(oo, nn_))
        flips.append(float(curve.negative_flips.max()))
    return {**setting, "gain_mean": float(np.mean(gains)), "gain_std": _stats(gains)["std"],
            "max_flip_mean": float(np.mean(flips)), "per_seed_gain": gains}


def tune(seeds, cache=None, methods=None, dataset: str = "digits", data_kwargs: dict | None = None,
         epochs: int | None = None) -> dict:
    """Run the validation search of every available method (see the module docstring).

    Parameters
    ----------
    seeds : sequence of int
        Runs per setting.
    cache : str or Path, optional
        Checkpoint folder.
    methods : sequence of str, optional
        Only these methods (default every method of :func:`search_spaces`).
    dataset : str, default "digits"
        A key of :data:`OUTPUTS` (:func:`validation_data_for`, ``PRESETS[dataset]``).
    data_kwargs : dict, optional
        ``load_dataset`` arguments (Fashion-MNIST's ``n_train``, ``n_test``).
    epochs : int, optional
        Training epochs instead of the preset's (smoke runs).

    Returns
    -------
    dict
        The ``results/tuning.json`` content (CONTRACTS.md).
    """
    start = time.perf_counter()
    data = validation_data_for(dataset, data_kwargs)
    preset = dataset_preset(dataset, epochs)
    refs = []
    for seed in seeds:
        ctx = ExperimentContext(data, seed=seed, preset=preset, cache=cache, progress=False)
        oo = evaluate_backfill(old_only(ctx.embeddings("old")), data.test_labels, ratios=[0.0])
        nn_ = evaluate_backfill(old_only(ctx.embeddings("new")), data.test_labels, ratios=[0.0])
        refs.append((float(oo.map[0]), float(nn_.map[0]), oo.per_query_top1[0]))
    out_methods, skipped = {}, {}
    spaces = search_spaces()
    for method in methods or spaces:
        settings = spaces[method]
        why = available(method, settings)
        if why:
            skipped[method] = why
            print(f"{method}: skipped ({why})", flush=True)
            continue
        rows = []
        for i, setting in enumerate(settings):
            t0 = time.perf_counter()
            try:
                row = _validate(method, setting, data, seeds, refs, cache, preset)
            except NotApplicable as exc:
                skipped[method] = str(exc)
                break
            rows.append(row)
            print(f"{method} [{i + 1}/{len(settings)}] {setting}: validation gain {row['gain_mean']:.3f} ± "
                  f"{row['gain_std']:.3f}, max neg. flip {row['max_flip_mean']:.3f} ({time.perf_counter() - t0:.0f} s)",
                  flush=True)
        if method in skipped:
            continue
        best = choose(rows)
        out_methods[method] = {"grid": grid_of(settings), "settings": len(settings), "rows": rows,
                               "chosen": {k: best[k] for k in settings[0]},
                               "chosen_gain": {"mean": best["gain_mean"], "std": best["gain_std"]},
                               "chosen_max_flip_mean": best["max_flip_mean"]}
        print(f"{method}: chose {out_methods[method]['chosen']}", flush=True)
    per_strategy = {m: v["chosen"] for m, v in out_methods.items()}
    method_params, conflicts = _merge_params(per_strategy)
    extra = {} if dataset == "digits" else {"dataset": dataset, "data_kwargs": data_kwargs or {},
                                             "preset_epochs": preset.train.epochs}
    return {
        "command": command("tune_methods.py", dataset, seeds, data_kwargs, epochs),
        **extra,
        "protocol": __doc__.split("\n\n")[1].replace("\n", " "),
        "validation": {"train": int(len(data.train_labels)), "validation": int(len(data.test_labels))},
        "seeds": list(seeds),
        "budget": BUDGET,
        "criterion": "mean relative gain on the validation split (random order, leave-one-out); the largest "
                     "negative-flip rate is reported, not used",
        "old_old_map": float(np.mean([r[0] for r in refs])), "new_new_map": float(np.mean([r[1] for r in refs])),
        "methods": out_methods,
        "skipped": skipped,
        "method_params": method_params,
        "per_strategy": per_strategy,
        "per_strategy_note": "fields chosen differently by different methods (" + (", ".join(conflicts) or "none")
                             + ") are not in method_params; build one MethodParams per strategy with "
                               "tune_methods.params_for(strategy, tuning) (mct's ablations use mct's choice)",
        "conflicts": conflicts,
        "elapsed_seconds": round(time.perf_counter() - start, 1),
    }


def _fmt(v) -> str:
    return "None (all)" if v is None else f"{v:g}" if isinstance(v, float) else str(v)


def tuning_markdown(result: dict) -> str:
    """``results/tuning.md``: one table per method, the chosen setting in bold.

    Parameters
    ----------
    result : dict
        The output of :func:`tune`.

    Returns
    -------
    str
        Markdown text.
    """
    v = result["validation"]
    lines = [f"**Validation tuning** (our measurements): {v['train']} train' / {v['validation']} validation items "
             f"({result.get('dataset', 'digits')} training split), seeds {','.join(map(str, result['seeds']))}, budget {result['budget']} "
             f"settings per method; criterion: {result['criterion']}. Validation old/old mAP "
             f"{result['old_old_map']:.3f}, new/new {result['new_new_map']:.3f}.", ""]
    for method, m in result["methods"].items():
        fields = list(m["grid"])
        lines += [f"`{method}`", "", "| " + " | ".join(fields) + " | validation gain | max neg. flip |",
                  "|" + "---|" * (len(fields) + 2)]
        for r in m["rows"]:
            chosen = all(r[k] == m["chosen"][k] for k in fields)
            cells = [_fmt(r[k]) for k in fields] + [f"{r['gain_mean']:.3f} ± {r['gain_std']:.3f}",
                                                     f"{r['max_flip_mean']:.3f}"]
            lines.append("| " + " | ".join(f"**{c}**" if chosen else c for c in cells) + " |")
        lines.append("")
    for method, why in result.get("skipped", {}).items():
        lines.append(f"`{method}` not tuned: {why}.")
    lines += ["", "Chosen: " + "; ".join(f"`{m}` " + ", ".join(f"{k} = {_fmt(v)}" for k, v in c.items())
                                        for m, c in result["per_strategy"].items()) + "."]
    return "\n".join(lines)


def _supports_order() -> bool:
    return "order" in inspect.signature(run_experiment).parameters


def fill_reference_gains(result: dict) -> list[str]:
    """Give every strategy its gain against the ρ reference when the reference ran in another group.

    :func:`run_tuned_experiment` runs one experiment per distinct ``MethodParams``; only the group
    holding ``offline_rho`` (``mct``'s tuned values: the reference is mct's head) knows the
    reference, so the other groups' strategies come back with ``relative_gain_vs_reference`` n/a.
    Per seed, the reference is ``offline_rho``'s mAP at r = 1 and old/old the ``old`` strategy's
    mAP (the same seeds, so the same old and new models, in every group); the gain is computed
    from each strategy's stored curves exactly as the experiment computes it.

    Parameters
    ----------
    result : dict
        A merged ``run_experiment`` result; changed in place.

    Returns
    -------
    list of str
        The strategies whose gain was filled in (none when the reference or ``old`` is missing).
    """
    strategies = result["strategies"]
    ref, old = strategies.get(st.RHO_REFERENCE), strategies.get("old")
    if not ref or ref.get("status") == "n/a" or not old or old.get("status") == "n/a":
        return []
    refs = [curve[-1] for curve in ref["curve_map"]]
    old_old = [curve[0] for curve in old["curve_map"]]
    filled = []
    for name, s in strategies.items():
        if s.get("status") == "n/a" or s.get("relative_gain_vs_reference", {}).get("status") != "n/a":
            continue
        if len(s["curve_map"]) != len(refs):
            raise ValueError(f"{name}: {len(s['curve_map'])} seeds, but the ρ reference has {len(refs)}")
        gains = [relative_gain(auc(s["ratios"], c), oo, rr) for c, oo, rr in zip(s["curve_map"], old_old, refs)]
        v = np.asarray(gains, dtype=np.float64)
        s["relative_gain_vs_reference"] = {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0}
        filled.append(name)
    if result.get("rho_reference", {}).get("status") == "n/a":
        result["rho_reference"] = {"strategy": st.RHO_REFERENCE,
                                   **{m: ref_stats for m, ref_stats in _end_stats(ref).items()}}
    return filled


def _end_stats(entry: dict) -> dict:
    """mAP, top-1 and top-5 at r = 1 over seeds of one strategy entry (its stored curves)."""
    out = {}
    for metric, key in (("map", "curve_map"), ("top1", "curve_top1"), ("top5", "curve_top5")):
        v = np.asarray([curve[-1] for curve in entry[key]], dtype=np.float64)
        out[metric] = {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0}
    return out


def run_tuned_experiment(tuning: dict, strategies, order: str = "random", progress: bool = True, **kwargs) -> dict:
    """:func:`~backfill_lib.experiment.run_experiment` with each strategy's tuned ``MethodParams``.

    Strategies are grouped by their :func:`params_for`; the experiment runs once per group (same
    seeds, so the same old and new models, loaded from the checkpoint cache after the first) and
    the tables are merged. ``method_params`` of the result holds each strategy's values.

    Parameters
    ----------
    tuning : dict
        The content of ``results/tuning.json``.
    strategies : sequence of str
        Strategy names, in the order of the table.
    order : str, default "random"
        Backfill order policy (passed on when the library's ``run_experiment`` takes ``order``).
    progress : bool, default True
        Progress bars while training.
    **kwargs
        Passed on to ``run_experiment`` (``dataset``, ``old_classes``, ``seeds``, ``preset``, ``cache``, ...).

    Returns
    -------
    dict
        One results dict as ``run_experiment`` returns it, every strategy in it.

    Raises
    ------
    ValueError
        If ``order`` is not "random" and this library's ``run_experiment`` has no ``order``.
    """
    if order != "random" and not _supports_order():
        raise ValueError(f"order={order!r}: this library's run_experiment has no order argument yet")
    extra = {"order": order} if _supports_order() else {}
    groups: dict[MethodParams, list[str]] = {}
    for name in strategies:
        groups.setdefault(params_for(name, tuning), []).append(name)
    merged, elapsed = None, 0.0
    for params, names in groups.items():
        r = run_experiment(strategies=names, params=params, new_new=True, progress=progress, **extra, **kwargs)
        elapsed += r["environment"]["elapsed_seconds"]
        used = r["method_params"]
        if merged is None:
            merged = r
            merged["method_params"] = {}
        else:
            merged["strategies"].update(r["strategies"])
        for n in names:
            merged["method_params"][n] = used
    merged["strategies"] = {n: merged["strategies"][n] for n in strategies}
    fill_reference_gains(merged)
    merged["order"] = order
    merged["environment"]["elapsed_seconds"] = round(elapsed, 1)
    merged["tuning"] = "per-strategy MethodParams from results/tuning.json (validation split)"
    return merged


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    print(f"wrote {path}", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", default="digits", choices=list(OUTPUTS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--cache", default=None)
    parser.add_argument("--n-train", type=int, default=None, help="fashion_mnist: training images (default 20,000)")
    parser.add_argument("--n-test", type=int, default=None, help="fashion_mnist: test images (default 3,000)")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs instead of the preset's (smoke runs)")
    parser.add_argument("--methods", default=None, help="comma-separated subset of the tuned methods")
    parser.add_argument("--experiment", action="store_true", help="then run the tuned experiment on the test split")
    parser.add_argument("--experiment-only", action="store_true", help="only the tuned experiment, from tuning.json")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.out)
    data_kwargs = {k: v for k, v in (("n_train", args.n_train), ("n_test", args.n_test)) if v is not None}
    if data_kwargs and args.dataset == "digits":
        parser.error("--n-train and --n-test are for fashion_mnist (digits has its fixed split)")
    stem = OUTPUTS[args.dataset]
    tuning_json = out / f"{stem['tuning']}.json"
    if args.experiment_only:
        tuning = json.loads(tuning_json.read_text())
        if tuning.get("dataset", "digits") != args.dataset:
            parser.error(f"{tuning_json} was tuned on {tuning.get('dataset', 'digits')}, not {args.dataset}")
    else:
        methods = args.methods.split(",") if args.methods else None
        tuning = tune(seeds, args.cache, methods, args.dataset, data_kwargs, args.epochs)
        if methods:  # a partial re-run keeps the other methods' committed results
            old = json.loads(tuning_json.read_text()) if tuning_json.exists() else {}
            for key in ("methods", "skipped"):
                tuning[key] = {**{k: v for k, v in old.get(key, {}).items() if k not in methods}, **tuning[key]}
            for m in tuning["methods"]:
                tuning["skipped"].pop(m, None)
            tuning["per_strategy"] = {m: v["chosen"] for m, v in tuning["methods"].items()}
            # The searches of different methods are independent: a run in parts equals one full run.
            tuning["parts"] = old.get("parts", []) + [f"{tuning['command']} --methods {','.join(methods)}"]
            tuning["elapsed_seconds"] = round(tuning["elapsed_seconds"] + old.get("elapsed_seconds", 0.0), 1)
            fixed = _merge_params(tuning["per_strategy"])
            tuning["method_params"], tuning["conflicts"] = fixed
        _write(tuning_json, json.dumps(tuning, indent=1) + "\n")
        _write(out / f"{stem['tuning']}.md", tuning_markdown(tuning) + "\n")
    if args.experiment or args.experiment_only:
        names = [n for n in EXPERIMENT_STRATEGIES if n in st.STRATEGY_REGISTRY]
        orders = ["random"] + (["uncertain_first"] if _supports_order() else [])
        preset = dataset_preset(args.dataset, args.epochs)
        for order in orders:
            r = run_tuned_experiment(tuning, names, order=order, dataset=args.dataset, seeds=seeds, cache=args.cache,
                                     preset=preset, data_kwargs=data_kwargs or None)
            r["command"] = command("tune_methods.py", args.dataset, seeds, data_kwargs, args.epochs,
                                   extra="--experiment-only")
            name = stem["tuned"] + ("" if order == "random" else f"_{order}")
            print(format_table(r))
            _write(out / f"{name}.json", json.dumps(r, indent=1) + "\n")
            _write(out / f"{name}.md", format_table(r, markdown=True) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
