"""Which method when: every strategy at old models of different strength, fixed in advance.

The sweep points are the ones CONTRACTS.md fixed before any result was seen: the old model's
embedding size ``d_o`` ∈ {4, 8, 16, 32} (small CNN, old classes 0–4), the number of classes it
was trained on (2, 5, 8 of 10: classes 0–1, 0–4, 0–7; small CNN, d_o = 32), and a weaker old
architecture (an MLP, d_o = 32, classes 0–4). The reference point (small CNN, d_o = 32, classes
0–4, the digits preset) belongs to all three axes. The new model is always the digits preset's
(small CNN, d_n = 32, all classes), so BCT-type strategies (which need d_n = d_o) are n/a at
d_o < 32. Each strategy runs with its tuned hyper-parameters (``results/tuning.json``, chosen
once on the validation split at the reference point, not re-tuned per point), 3 seeds, in random
and (when the library has it) uncertain-first backfill order. What the old embedding knows about
all classes is measured by a linear probe: a logistic regression on standardised ``φ_o``
embeddings of the training split over all 10 classes, scored on the test split. Writes
``results/which_method_when.json`` and ``.md``. The ρ reference ``offline_rho`` runs next to mct
at every point.

With ``--dataset fashion_mnist`` (issue 17) the sweep is on Fashion-MNIST with
``PRESETS["fashion_mnist"]`` (new model pooled_cnn, d_n = 32, width 16, all classes), the tuned
values of ``results/fashion_tuning.json``, and its points, fixed before any Fashion-MNIST sweep
result was seen (:data:`FASHION_AXES`): ``d_o`` ∈ {2, 4, 8, 16, 32} (d_o = 2 meant to starve the
old embedding), 2, 5 or 8 old classes, an MLP old model (width 16), and an old model trained on
coarse labels (tops / footwear / other, :data:`~backfill_lib.data.FASHION_MNIST_COARSE`) over the
images of all 10 classes, the other point meant to starve it. The coarse point does not run
``bct`` (:data:`COARSE_NA`: its loss reads the old classifier's fine-class columns); the
``uncertain_first`` order runs there on the coarse head's softmax (``strategies._old_uncertainty``). Writes ``results/fashion_which_method_when.json`` and ``.md``.

    python benchmarks/which_method_when.py [--dataset digits|fashion_mnist] [--seeds 0,1,2] [--cache DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tune_methods import (RESULTS, _stats, _supports_order, _write, command, dataset_preset, params_for,  # noqa: E402
                          run_tuned_experiment)

from backfill_lib import strategies as st  # noqa: E402
from backfill_lib.data import FASHION_MNIST_COARSE, load_dataset  # noqa: E402
from backfill_lib.metrics import auc, linear_probe, relative_gain  # noqa: E402
from backfill_lib.models import ModelSpec  # noqa: E402
from backfill_lib.strategies import PRESETS, ExperimentContext, Preset  # noqa: E402

#: Strategies at every point (CONTRACTS.md); ``old`` and ``offline`` are the references.
STRATEGIES = ("old", "offline", "rank_merge", "rank_merge_calibrated", "reverse_transform", "mct", "offline_rho", "bct",
              "bct_pseudo", "ra_bct", "forward_transform")
#: The three axes and their values, fixed in advance; the reference point is on all three.
AXES = {"d_old": (4, 8, 16, 32), "old_classes": (2, 5, 8), "old_arch": ("small_cnn", "mlp")}
REFERENCE = {"d_old": 32, "old_classes": 5, "old_arch": "small_cnn"}
#: Fashion-MNIST's axes (issue 17), fixed before any of its sweep results: digits' three, with
#: d_o = 2 added, and the labels the old model learns (fine, or coarse: FASHION_MNIST_COARSE).
FASHION_AXES = {"d_old": (2, 4, 8, 16, 32), "old_classes": (2, 5, 8), "old_arch": ("pooled_cnn", "mlp"),
                "old_labels": ("fine", "coarse")}
FASHION_REFERENCE = {"d_old": 32, "old_classes": 5, "old_arch": "pooled_cnn", "old_labels": "fine"}
#: Per dataset: (axes, reference values, tuning file, output file) under ``results/``. The digits
#: names are the ones the committed results and the book read.
SWEEPS = {"digits": (AXES, REFERENCE, "tuning.json", "which_method_when.json"),
          "fashion_mnist": (FASHION_AXES, FASHION_REFERENCE, "fashion_tuning.json", "fashion_which_method_when.json")}
#: What a coarse old model (``old_label_map``) leaves out, and why; reported as n/a at that point.
COARSE_NA = {
    "bct": "BCT's influence loss is the old classifier's cross-entropy on new embeddings over the old classes' "
           "fine labels (backfill_lib.losses.bct, strategies._bct); a coarse old classifier has 3 outputs, so BCT "
           "here would be a different loss (coarse labels of every image), which the library does not implement",
}


def sweep_points(dataset: str = "digits") -> list[dict]:
    """The sweep points of ``dataset``: the reference, then the other values of each axis.

    Parameters
    ----------
    dataset : {"digits", "fashion_mnist"}, default "digits"
        Whose axes (:data:`SWEEPS`) and reference old model (``PRESETS[dataset].old``).

    Returns
    -------
    list of dict
        Each with ``axis`` ("reference", "d_old", "old_classes", "old_arch" or, for
        Fashion-MNIST, "old_labels"), ``value``, ``label``, ``old_spec`` (a ``ModelSpec`` as a
        dict) and ``old_classes`` (e.g. "0-4"); a coarse-label point also has ``old_label_map``
        (its old model trains on every class's images, so ``old_classes`` only names the split
        the dataset is loaded with).
    """
    axes, reference = SWEEPS[dataset][:2]
    ref = PRESETS[dataset].old

    def point(axis, value, label, arch=ref.arch, dim=ref.embed_dim, n_old=5):
        spec = ModelSpec(arch, dim, ref.width).to_dict()
        return {"axis": axis, "value": value, "label": label, "old_spec": spec, "old_classes": f"0-{n_old - 1}"}

    points = [point("reference", "reference", f"reference ({ref.arch}, d_o = {ref.embed_dim}, classes 0-4)")]
    points += [point("d_old", d, f"d_o = {d}", dim=d) for d in axes["d_old"] if d != reference["d_old"]]
    points += [point("old_classes", k, f"{k} old classes (0-{k - 1})", n_old=k) for k in axes["old_classes"]
               if k != reference["old_classes"]]
    points += [point("old_arch", a, f"old arch {a}", arch=a) for a in axes["old_arch"] if a != reference["old_arch"]]
    for labels in axes.get("old_labels", ()):
        if labels == reference["old_labels"]:
            continue
        if labels != "coarse" or dataset != "fashion_mnist":
            raise ValueError(f"no label map {labels!r} for {dataset}")
        coarse = point("old_labels", "coarse", "coarse old labels (tops / footwear / other, all 10 classes)")
        points.append({**coarse, "old_label_map": list(FASHION_MNIST_COARSE)})
    return points


def point_preset(point: dict, dataset: str = "digits", epochs: int | None = None) -> Preset:
    """The dataset's preset with the point's old model (the new model stays the preset's).

    Parameters
    ----------
    point : dict
        An entry of :func:`sweep_points`.
    dataset : str, default "digits"
        Whose preset.
    epochs : int, optional
        Training epochs instead of the preset's (smoke runs).

    Returns
    -------
    Preset
        With ``old_label_map`` when the point has one.
    """
    base = dataset_preset(dataset, epochs)
    label_map = point.get("old_label_map")
    return Preset(ModelSpec(**point["old_spec"]), base.new, base.new_heterogeneous, base.train,
                  old_label_map=None if label_map is None else tuple(label_map))


def per_seed_gains(result: dict, name: str) -> list[float]:
    """Relative gain of one strategy in each seed, from the curves of a results dict.

    Old/old of a seed is the ``old`` strategy's mAP, new/new the ``offline`` strategy's mAP at r = 1.

    Parameters
    ----------
    result : dict
        A ``run_experiment`` result holding ``old``, ``offline`` and ``name``.
    name : str
        The strategy.

    Returns
    -------
    list of float
        One gain per seed.
    """
    s, old, off = (result["strategies"][k] for k in (name, "old", "offline"))
    return [relative_gain(auc(s["ratios"], c), o[0], n[-1])
            for c, o, n in zip(s["curve_map"], old["curve_map"], off["curve_map"])]


def summarise(result: dict, strategies) -> dict:
    """Per strategy: gain and worst negative flip over seeds, per-seed gains, mean curve (or n/a).

    Parameters
    ----------
    result : dict
        A ``run_experiment`` result.
    strategies : sequence of str
        Strategies to take from it.

    Returns
    -------
    dict
        ``{strategy: {"relative_gain", "max_negative_flip", "per_seed_gain", "curve_map_mean"}}`` or
        ``{strategy: {"status": "n/a", "reason"}}``.
    """
    out = {}
    for name in strategies:
        s = result["strategies"][name]
        if s.get("status") == "n/a":
            out[name] = {"status": "n/a", "reason": s["reason"]}
            continue
        gains = per_seed_gains(result, name)
        if abs(np.mean(gains) - s["relative_gain"]["mean"]) > 1e-9:  # the two routes must agree
            raise RuntimeError(f"{name}: per-seed gains {gains} disagree with the experiment's {s['relative_gain']}")
        out[name] = {"relative_gain": s["relative_gain"], "max_negative_flip": s["max_negative_flip"],
                     "per_seed_gain": gains, "curve_map_mean": np.mean(s["curve_map"], axis=0).tolist()}
        for key in ("relative_gain_vs_reference", "final_map"):  # against the ρ reference; mAP at r = 1
            if key in s:
                out[name][key] = s[key]
    return out


def run_point(point: dict, tuning: dict, strategies=STRATEGIES, orders=("random",), seeds=(0, 1, 2), cache=None,
              progress: bool = False, dataset: str = "digits", data_kwargs: dict | None = None,
              epochs: int | None = None) -> dict:
    """Measure one sweep point: the probe, the references, every strategy in every order.

    Parameters
    ----------
    point : dict
        An entry of :func:`sweep_points`.
    tuning : dict
        The content of ``results/tuning.json``.
    strategies : sequence of str, default :data:`STRATEGIES`
        Must hold ``old`` and ``offline`` (the per-seed references).
    orders : sequence of str, default ("random",)
        Backfill order policies.
    seeds : sequence of int, default (0, 1, 2)
        Runs.
    cache : str or Path, optional
        Checkpoint folder.
    progress : bool, default False
        Training progress bars.
    dataset : str, default "digits"
        ``digits`` or ``fashion_mnist``.
    data_kwargs : dict, optional
        ``load_dataset`` arguments (Fashion-MNIST's ``n_train``, ``n_test``).
    epochs : int, optional
        Training epochs instead of the preset's (smoke runs).

    Returns
    -------
    dict
        The point with ``probe``, ``old_old_map``, ``new_new_map`` and ``results`` (CONTRACTS.md).
        At a coarse-label point the strategies and orders of :data:`COARSE_NA` are not run:
        their cells are ``{"status": "n/a", "reason"}``.

    Raises
    ------
    ValueError
        If ``strategies`` lacks ``old`` or ``offline``.
    """
    if "old" not in strategies or "offline" not in strategies:
        raise ValueError("strategies must include 'old' and 'offline' (the per-seed old/old and new/new references)")
    preset = point_preset(point, dataset, epochs)
    data = load_dataset(dataset, old_classes=point["old_classes"], **(data_kwargs or {}))
    probes = []
    for seed in seeds:
        ctx = ExperimentContext(data, seed=seed, preset=preset, cache=cache, progress=progress)
        probes.append(linear_probe(ctx.embeddings("old", "train"), data.train_labels, ctx.embeddings("old", "test"),
                                   data.test_labels, seed=seed))
    out = {**point, "probe": _stats(probes), "probe_per_seed": probes, "results": {}}
    skip = COARSE_NA if point.get("old_label_map") is not None else {}
    run_orders = [o for o in orders if o not in skip]
    if not run_orders:
        raise ValueError(f"{point['label']}: none of the orders {list(orders)} supports this old model")
    names = [n for n in strategies if n not in skip]
    for order in run_orders:
        r = run_tuned_experiment(tuning, names, order=order, dataset=dataset, old_classes=point["old_classes"],
                                 seeds=list(seeds), preset=preset, cache=cache, progress=progress,
                                 data_kwargs=data_kwargs or None)
        if order == run_orders[0]:
            out["old_old_map"], out["new_new_map"] = r["old_old"]["map"], r["new_new"]["map"]
            if "rho_reference" in r and r["rho_reference"].get("status") != "n/a":
                out["rho_reference_map"] = r["rho_reference"]["map"]
        summary = summarise(r, names)
        out["results"][order] = {n: summary[n] if n in summary else {"status": "n/a", "reason": skip[n]}
                                 for n in strategies}
    for order in orders:
        if order not in run_orders:
            out["results"][order] = {n: {"status": "n/a", "reason": skip[order]} for n in strategies}
    return out


def fill_point_reference_gains(point: dict) -> list[tuple[str, str]]:
    """Fill each strategy's gain against the ρ reference at one sweep point where it is n/a.

    Strategies tuned in another ``MethodParams`` group than ``mct`` ran without the reference
    before ``tune_methods.fill_reference_gains`` (files written by older code). ``offline_rho``
    stores ``ρ_ref(φ_n)`` for every item at every ratio, so its curve is flat at the reference mAP
    and its per-seed gain against new/new is ``(ref − old/old) / (new/new − old/old)``; a
    strategy's gain against the reference is then, per seed, its gain against new/new divided by
    that. The result equals the experiment's own computation up to rounding (tested).

    Parameters
    ----------
    point : dict
        One sweep point (:func:`run_point`); changed in place.

    Returns
    -------
    list of (str, str)
        ``(order, strategy)`` pairs filled in.
    """
    filled = []
    for order, cells in point["results"].items():
        ref = cells.get(st.RHO_REFERENCE, {})
        if ref.get("status") == "n/a" or "per_seed_gain" not in ref:
            continue
        for name, cell in cells.items():
            if cell.get("status") == "n/a" or "per_seed_gain" not in cell:
                continue
            if cell.get("relative_gain_vs_reference", {}).get("status") != "n/a":
                continue
            if len(cell["per_seed_gain"]) != len(ref["per_seed_gain"]):
                raise ValueError(f"{point['label']}, {order}, {name}: {len(cell['per_seed_gain'])} seeds, "
                                 f"the ρ reference {len(ref['per_seed_gain'])}")
            v = np.asarray(cell["per_seed_gain"], dtype=np.float64) / np.asarray(ref["per_seed_gain"], dtype=np.float64)
            cell["relative_gain_vs_reference"] = {"mean": float(v.mean()),
                                                  "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0}
            filled.append((order, name))
    return filled


def figure_data(points: list[dict], strategies, orders) -> dict:
    """Figure-ready arrays: per order, per strategy, one value per point (None where n/a).

    Parameters
    ----------
    points : list of dict
        Outputs of :func:`run_point`.
    strategies, orders : sequence of str
        What to lay out.

    Returns
    -------
    dict
        ``{"labels", "axis", "probe", "probe_std", order: {strategy: {"gain", "gain_std", "worst_flip"}}}``.
    """
    fig = {"labels": [p["label"] for p in points], "axis": [p["axis"] for p in points],
           "probe": [p["probe"]["mean"] for p in points], "probe_std": [p["probe"]["std"] for p in points]}
    for order in orders:
        fig[order] = {}
        for name in strategies:
            cells = [p["results"][order][name] for p in points]
            ok = [c.get("status") != "n/a" for c in cells]
            fig[order][name] = {
                "gain": [c["relative_gain"]["mean"] if k else None for c, k in zip(cells, ok)],
                "gain_std": [c["relative_gain"]["std"] if k else None for c, k in zip(cells, ok)],
                "worst_flip": [c["max_negative_flip"]["mean"] if k else None for c, k in zip(cells, ok)]}
    return fig


def markdown(result: dict) -> str:
    """``results/which_method_when.md``: per order, one row per point, gain (worst flip) per strategy.

    Parameters
    ----------
    result : dict
        The ``results/which_method_when.json`` content.

    Returns
    -------
    str
        Markdown text.
    """
    names = [s for s in result["strategies"] if s not in ("old", "offline")]
    dataset = result.get("dataset", "digits")
    if dataset == "digits":
        lines = [f"**Which method when** (our measurements; digits, new model small_cnn d_n = 32 on all classes; seeds "
                 f"{','.join(map(str, result['seeds']))}; tuned hyper-parameters from results/tuning.json). Cells: "
                 "relative gain ± std over seeds (largest negative-flip rate, %); n/a: the strategy needs d_n = d_o.",
                 ""]
    else:
        new = result["new_model"]
        lines = [f"**Which method when** (our measurements; {dataset}, new model {new['arch']} d_n = {new['embed_dim']} "
                 f"on all classes; seeds {','.join(map(str, result['seeds']))}; tuned hyper-parameters from "
                 f"{result['tuning_file']}). Cells: relative gain ± std over seeds (largest negative-flip rate, %); "
                 "n/a: the strategy needs d_n = d_o, or (coarse old labels) reads the old classifier's fine classes; "
                 "an order that is n/a at a point is not run there.", ""]
    for order in result["orders"]:
        lines += [f"Order: `{order}`", "",
                  "| point | probe acc. | old/old mAP | new/new mAP | " + " | ".join(names) + " |",
                  "|" + "---|" * (4 + len(names))]
        for p in result["points"]:
            cells = []
            for n in names:
                c = p["results"][order][n]
                cells.append("n/a" if c.get("status") == "n/a" else
                             f"{c['relative_gain']['mean']:.2f} ± {c['relative_gain']['std']:.2f} "
                             f"({100 * c['max_negative_flip']['mean']:.1f})")
            lines.append(f"| {p['label']} | {p['probe']['mean']:.3f} ± {p['probe']['std']:.3f} | "
                         f"{p['old_old_map']['mean']:.3f} | {p['new_new_map']['mean']:.3f} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def merge_parts(parts: list[dict], dataset: str = "digits") -> dict:
    """Join sweep files run with ``--points`` into the file one full run writes.

    Parameters
    ----------
    parts : list of dict
        ``which_method_when`` JSON contents, each with a disjoint set of points.
    dataset : str, default "digits"
        Whose sweep (:func:`sweep_points` gives the order of the points).

    Returns
    -------
    dict
        The joined content: the first part's fields, every point in the sweep's order, the figure
        recomputed, ``elapsed_seconds`` summed and ``parts`` listing the parts' commands.

    Raises
    ------
    ValueError
        If the parts differ in dataset, seeds, tuned values, strategies or orders, repeat a point,
        or hold a point this sweep does not have.
    """
    if not parts:
        raise ValueError("no part to merge")
    first = parts[0]
    for key in ("dataset", "seeds", "method_params", "strategies", "orders", "data_kwargs", "preset_epochs"):
        for other in parts[1:]:
            if first.get(key) != other.get(key):
                raise ValueError(f"the parts differ in {key!r}: {first.get(key)!r} vs {other.get(key)!r}")
    if first.get("dataset", "digits") != dataset:
        raise ValueError(f"the parts are a {first.get('dataset', 'digits')} sweep, not {dataset}")
    order = [p["label"] for p in sweep_points(dataset)]
    points = {}
    for part in parts:
        for point in part["points"]:
            if point["label"] not in order:
                raise ValueError(f"point {point['label']!r} is not one of this sweep's points {order}")
            if point["label"] in points:
                raise ValueError(f"point {point['label']!r} is in two parts")
            points[point["label"]] = point
    joined = [points[label] for label in order if label in points]
    for point in joined:
        fill_point_reference_gains(point)
    result = {**first, "points": joined, "figure": figure_data(joined, first["strategies"], first["orders"]),
              "elapsed_seconds": round(sum(p["elapsed_seconds"] for p in parts), 1),
              "parts": [p["command"] for p in parts]}
    result["command"] = result["command"].split(" --points")[0]
    missing = [label for label in order if label not in points]
    if missing:
        result["missing_points"] = missing
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", default="digits", choices=list(SWEEPS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--cache", default=None)
    parser.add_argument("--n-train", type=int, default=None, help="fashion_mnist: training images (default 20,000)")
    parser.add_argument("--n-test", type=int, default=None, help="fashion_mnist: test images (default 3,000)")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs instead of the preset's (smoke runs)")
    parser.add_argument("--tuning", default=None, help="default results/tuning.json (digits), "
                                                       "results/fashion_tuning.json (fashion_mnist)")
    parser.add_argument("--out", default=None, help="default results/which_method_when.json (digits), "
                                                    "results/fashion_which_method_when.json (fashion_mnist)")
    parser.add_argument("--points", default=None,
                        help="comma-separated indices into the sweep's points (0 = the reference): run only these, "
                             "e.g. one part per core; join the parts' files with --merge")
    parser.add_argument("--merge", nargs="+", default=None, metavar="PART",
                        help="join the JSON files of runs with --points (same dataset, seeds and tuned values) into "
                             "--out, points in the sweep's order; trains nothing")
    args = parser.parse_args(argv)
    if args.merge:
        out = Path(args.out) if args.out else RESULTS / SWEEPS[args.dataset][3]
        try:
            result = merge_parts([json.loads(Path(f).read_text()) for f in args.merge], args.dataset)
        except (OSError, ValueError) as err:
            parser.error(f"--merge: {err}")
        _write(out, json.dumps(result, indent=1) + "\n")
        _write(out.with_suffix(".md"), markdown(result) + "\n")
        return 0
    start = time.perf_counter()
    seeds = [int(s) for s in args.seeds.split(",")]
    data_kwargs = {k: v for k, v in (("n_train", args.n_train), ("n_test", args.n_test)) if v is not None}
    if data_kwargs and args.dataset == "digits":
        parser.error("--n-train and --n-test are for fashion_mnist (digits has its fixed split)")
    axes, reference, tuning_name, out_name = SWEEPS[args.dataset]
    tuning_path = Path(args.tuning) if args.tuning else RESULTS / tuning_name
    tuning = json.loads(tuning_path.read_text())
    if tuning.get("dataset", "digits") != args.dataset:
        parser.error(f"{tuning_path} was tuned on {tuning.get('dataset', 'digits')}, not {args.dataset}")
    strategies = [s for s in STRATEGIES if s in st.STRATEGY_REGISTRY]
    missing = [s for s in STRATEGIES if s not in st.STRATEGY_REGISTRY]
    orders = ["random"] + (["uncertain_first"] if _supports_order() else [])
    all_points = sweep_points(args.dataset)
    chosen = range(len(all_points))
    if args.points is not None:
        try:
            chosen = sorted({int(i) for i in args.points.split(",")})
        except ValueError:
            parser.error(f"--points takes comma-separated integers, got {args.points!r}")
        if not chosen or chosen[0] < 0 or chosen[-1] >= len(all_points):
            listing = ", ".join(f"{i} = {p['label']}" for i, p in enumerate(all_points))
            parser.error(f"--points: indices must lie in 0 .. {len(all_points) - 1} ({listing})")
    points = []
    for point in tqdm([all_points[i] for i in chosen], desc="sweep points"):
        t0 = time.perf_counter()
        points.append(run_point(point, tuning, strategies, orders, seeds, args.cache, dataset=args.dataset,
                                data_kwargs=data_kwargs, epochs=args.epochs))
        gains = {n: round(v["relative_gain"]["mean"], 3) for n, v in points[-1]["results"]["random"].items()
                 if v.get("status") != "n/a"}
        tqdm.write(f"{point['label']}: probe {points[-1]['probe']['mean']:.3f}, random-order gains {gains} "
                   f"({time.perf_counter() - t0:.0f} s)")
    extra = {} if args.dataset == "digits" else {
        "dataset": args.dataset, "data_kwargs": data_kwargs, "tuning_file": str(tuning_path.name),
        "new_model": dataset_preset(args.dataset).new.to_dict(),
        "preset_epochs": dataset_preset(args.dataset, args.epochs).train.epochs,
        "protocol_fashion_mnist": __doc__.split("\n\n")[2].replace("\n", " "), "coarse_na": COARSE_NA}
    result = {
        "command": command("which_method_when.py", args.dataset, seeds, data_kwargs, args.epochs)
        + ("" if args.points is None else f" --points {','.join(map(str, chosen))}"),
        **extra,
        "protocol": __doc__.split("\n\n")[1].replace("\n", " "),
        "seeds": seeds,
        "method_params": {n: dataclasses.asdict(params_for(n, tuning)) for n in strategies},
        "strategies": strategies,
        "missing_strategies": missing,
        "orders": orders,
        "axes": {axis: {"values": list(values), "reference_value": reference[axis]} for axis, values in axes.items()},
        "points": points,
        "figure": figure_data(points, strategies, orders),
        "elapsed_seconds": round(time.perf_counter() - start, 1),
    }
    out = Path(args.out) if args.out else RESULTS / out_name
    _write(out, json.dumps(result, indent=1) + "\n")
    _write(out.with_suffix(".md"), markdown(result) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
