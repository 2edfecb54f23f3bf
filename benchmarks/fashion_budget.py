"""What the book costs on Fashion-MNIST with its preset (issue 17's budget), measured in one run.

Budget of issue 17, on a 2-core CPU: every chapter under 4 minutes with a warm checkpoint cache,
the whole book (8 chapters) under 25 minutes from an empty cache, a gallery of at least 2,000
test images. This script measures, with ``PRESETS["fashion_mnist"]`` and the loader's default
sizes (``load_dataset("fashion_mnist")``: 20,000 training and 3,000 test images), one torch
thread (as CI):

- ``load``: :func:`~backfill_lib.data.load_dataset` (reading the IDX files, the stratified
  subsets, standardisation);
- from an **empty** checkpoint cache (a temporary folder): training seconds of every model the
  book trains on the default setting (old, new, BCT, RA-BCT, the heterogeneous new model) and of
  the heads on cached embeddings (``ψ`` of ``reverse_transform``, ``ψ`` + ``ρ`` of ``mct``, ``h``
  of ``forward_transform``), plus the wall time of each step (training, embedding extraction);
- from the **warm** cache (the same folder, a new :class:`~backfill_lib.context.ExperimentContext`):
  the wall time of the same steps, now loads and embedding extractions;
- one backfill-curve evaluation (:func:`~backfill_lib.backfill.evaluate_backfill`) of the default
  ratios 0, 0.1, ..., 1, for ``rank_merge`` (two spaces) and ``mct``;

then extrapolates the book's budget from :data:`CHAPTERS`, what each chapter trains and how many
curves it evaluates, counted from how the chapters use digits today (``grep -n
"ExperimentContext\\|build_strategy\\|train_model\\|simulate_backfill\\|evaluate_backfill"
book/*.ipynb``). The extrapolation covers data loading, training, loading checkpoints,
embedding extraction and curve evaluations only: plots, widgets, faiss indexes and the live index of
chapter 8 are not in it (they do not depend on the dataset's preset).

    python benchmarks/fashion_budget.py [--out results/fashion_budget] [--seed 0] [--label "..."]

Writes ``<out>.json`` and ``<out>.md``. Timings depend on the machine and on its load: the
``label`` says where they were measured.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # before numpy and torch are imported

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import replace  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from backfill_lib import __version__  # noqa: E402
from backfill_lib.backfill import DEFAULT_RATIOS, evaluate_backfill, old_only  # noqa: E402
from backfill_lib.context import PRESETS, ExperimentContext  # noqa: E402
from backfill_lib.data import load_dataset  # noqa: E402
from backfill_lib.strategies import build_strategy  # noqa: E402

#: Issue 17's budget.
BUDGET = {"chapter_warm_seconds": 240, "book_empty_seconds": 1500, "min_gallery": 2000}

#: Steps measured, in order: (step, setting, what it builds). ``model:<role>`` trains/loads a
#: backbone through ``ctx.model``; anything else is a strategy built by ``build_strategy``.
STEPS = (
    ("old", "homogeneous", "model:old"),
    ("new", "homogeneous", "model:new"),
    ("bct", "homogeneous", "bct"),
    ("ra_bct", "homogeneous", "ra_bct"),
    ("reverse_transform", "homogeneous", "reverse_transform"),
    ("mct", "homogeneous", "mct"),
    ("forward_transform", "homogeneous", "forward_transform"),
    ("new_heterogeneous", "heterogeneous", "model:new"),
)
#: The name under which each step's training is recorded in ``ctx.trained``.
TRAINED_AS = {"old": "old", "new": "new", "bct": "new_bct", "ra_bct": "new_ra_bct",
              "reverse_transform": "reverse_transform", "mct": "mct", "forward_transform": "forward_transform",
              "new_heterogeneous": "new"}

#: What each chapter does from an empty cache when the chapters run in order and share one
#: cache, counted from the digits chapters (ours; a reading of the notebooks, see the module
#: docstring). ``train``: models trained there for the first time, as
#: ``(measured step, scale)`` with ``scale`` the share of that step's training time (v1 and v2
#: of chapter 7 train on 40 % and 70 % of the classes, against the old model's 50 %);
#: ``heads``: heads fitted there first (each costs about one measured head fit: the heads train
#: for a fixed number of steps); ``loads``: backbones and heads loaded from the cache;
#: ``curves``: full backfill curves evaluated (each strategy on each order).
CHAPTERS = {
    "01 retrieval and upgrade": {
        "train": [("old", 1), ("new", 1), ("new", 1)],  # ctx2 = seed + 1 trains a second new model
        "heads": [], "loads": 3, "curves": 6},
    "02 backward-compatible training": {
        "train": [("bct", 1), ("ra_bct", 1), ("bct", 1)],  # BCT with λ = 3
        "heads": [], "loads": 5, "curves": 8},  # heterogeneous BCT/RA-BCT: n/a (d_n ≠ d_o), nothing trained
    "03 rank merge": {"train": [], "heads": [], "loads": 2, "curves": 6},
    "04 reverse transformation": {"train": [], "heads": ["reverse_transform", "forward_transform"],
                                  "loads": 4, "curves": 8},
    "05 metric-compatible training": {"train": [], "heads": ["mct", "mct"],  # mct, mct_old_neg
                                      "loads": 5, "curves": 10},
    "06 which method when": {
        "train": [("old", 1)],  # the live point: another old model (d_o = 4 on digits), other old classes
        "heads": ["reverse_transform", "mct", "forward_transform", "reverse_transform"],  # tuned ψ, mct, h; calibration
        "loads": 4, "curves": 12},
    "07 going further": {
        "train": [("new_heterogeneous", 1), ("old", 0.8), ("old", 1.4)],  # heterogeneous new; v1, v2
        "heads": ["reverse_transform", "mct", "forward_transform", "mct", "mct", "mct"],  # heterogeneous; 3 versions
        "loads": 8, "curves": 30},  # 3 orders x 4 strategies, heterogeneous and homogeneous sets
    "08 live index": {"train": [], "heads": [], "loads": 2, "curves": 2},
}


def _build(ctx: ExperimentContext, what: str):
    if what.startswith("model:"):
        role = what.split(":", 1)[1]
        ctx.embeddings(role)  # trains or loads, then extracts the test embeddings
        ctx.embeddings(role, split="train")
        return None
    return build_strategy(what, ctx)


def run_steps(data, cache: Path, seed: int) -> dict:
    """Wall time of every step of :data:`STEPS` with one cache folder; training seconds when trained."""
    contexts = {s: ExperimentContext(data, seed=seed, setting=s, cache=cache, progress=False)
                for s in ("homogeneous", "heterogeneous")}
    out, strategies = {}, {}
    for step, setting, what in STEPS:
        ctx = contexts[setting]
        start = time.perf_counter()
        strategies[step] = _build(ctx, what)
        wall = time.perf_counter() - start
        rec = ctx.trained.get(TRAINED_AS[step], {})
        out[step] = {"wall_seconds": wall, "cached": bool(rec.get("cached")),
                     "train_seconds": None if rec.get("cached") else rec.get("seconds"),
                     "what": rec.get("what", what)}
    return out, contexts, strategies


def time_curves(ctx: ExperimentContext, strategies: dict, seed: int) -> dict:
    """Seconds of one default-ratio curve of rank_merge and of mct, and the curves."""
    labels = ctx.data.test_labels
    out, curves = {}, {}
    for name, strategy in (("rank_merge", build_strategy("rank_merge", ctx)), ("mct", strategies["mct"])):
        start = time.perf_counter()
        curves[name] = evaluate_backfill(strategy, labels, ratios=DEFAULT_RATIOS, order_seed=seed)
        out[name] = time.perf_counter() - start
    return out, curves


def retrieval(contexts: dict) -> dict:
    """old/old, new/new and heterogeneous new/new mAP (leave-one-out over the test split)."""
    hom, het = contexts["homogeneous"], contexts["heterogeneous"]
    labels = hom.data.test_labels

    def m(e):
        return float(evaluate_backfill(old_only(e), labels, ratios=[0.0]).map[0])

    return {"old": m(hom.embeddings("old")), "new": m(hom.embeddings("new")),
            "new_heterogeneous": m(het.embeddings("new"))}


def extrapolate(load: float, empty: dict, warm: dict, curve: float) -> dict:
    """The book's budget from the measured steps and :data:`CHAPTERS` (see the module docstring)."""
    backbones = [s for s, _, what in STEPS if what.startswith("model:") or s in ("bct", "ra_bct")]
    heads = [s for s, _, _ in STEPS if s not in backbones]
    # A warm backbone step = load the checkpoint + extract test and training embeddings; a warm
    # head step = load the head + apply it (the embeddings are already extracted).
    warm_backbone = float(np.mean([warm[s]["wall_seconds"] for s in backbones]))
    warm_head = float(np.mean([warm[s]["wall_seconds"] for s in heads]))
    chapters = {}
    for chapter, plan in CHAPTERS.items():
        train = sum(scale * empty[step]["wall_seconds"] for step, scale in plan["train"])
        fits = sum(empty[h]["wall_seconds"] for h in plan["heads"])
        evals = plan["curves"] * curve
        loads = plan["loads"] * warm_backbone
        warm_total = load + (plan["loads"] + len(plan["train"])) * warm_backbone + len(plan["heads"]) * warm_head + evals
        chapters[chapter] = {"empty_seconds": load + train + fits + loads + evals, "warm_seconds": warm_total,
                             "backbones_trained": len(plan["train"]), "heads_fitted": len(plan["heads"]),
                             "curves": plan["curves"]}
    total_empty = sum(c["empty_seconds"] for c in chapters.values())
    return {"chapters": chapters, "book_empty_seconds": total_empty,
            "book_warm_seconds": sum(c["warm_seconds"] for c in chapters.values()),
            "max_chapter_warm_seconds": max(c["warm_seconds"] for c in chapters.values()),
            "backbones_trained": sum(c["backbones_trained"] for c in chapters.values()),
            "heads_fitted": sum(c["heads_fitted"] for c in chapters.values()),
            "curves": sum(c["curves"] for c in chapters.values()),
            "warm_backbone_seconds": warm_backbone, "warm_head_seconds": warm_head, "curve_seconds": curve}


def markdown(result: dict) -> str:
    e, w = result["empty_cache"], result["warm_cache"]
    ex = result["extrapolation"]
    lines = [f"# Fashion-MNIST preset: the book's budget ({result['label']})", "",
             f"Preset: old {result['preset']['old']}, new {result['preset']['new']}, heterogeneous new "
             f"{result['preset']['new_heterogeneous']}, schedule {result['preset']['train']}.",
             f"Data: {result['n_train']} training, {result['n_test']} test images (gallery = queries); "
             f"load {result['load_seconds']:.1f} s. One torch thread. old/old mAP {result['map']['old']:.3f}, "
             f"new/new {result['map']['new']:.3f}, heterogeneous new/new {result['map']['new_heterogeneous']:.3f} "
             f"(seed {result['seed']}).", "",
             "| step | trained | training s (empty cache) | wall s, empty cache | wall s, warm cache |",
             "|---|---|---:|---:|---:|"]
    for step in e:
        t = e[step]["train_seconds"]
        lines.append(f"| {step} | {e[step]['what']} | {'-' if t is None else f'{t:.1f}'} | "
                     f"{e[step]['wall_seconds']:.1f} | {w[step]['wall_seconds']:.1f} |")
    n = result["n_test"]
    lines += ["", f"One backfill curve (11 ratios, {n:,} queries x {n:,} items, leave-one-out): "
              + ", ".join(f"{k} {v:.2f} s" for k, v in result["curve_seconds"].items()) + "; relative gain "
              "(one seed, one order) " + ", ".join(f"{k} {v:.2f}" for k, v in result["relative_gain"].items()) + ".", "",
              "## Extrapolated budget (ours: the chapters' workload counted from the digits chapters)", "",
              "| chapter | backbones trained | heads fitted | curves | s, empty cache | s, warm cache |",
              "|---|---:|---:|---:|---:|---:|"]
    for ch, c in ex["chapters"].items():
        lines.append(f"| {ch} | {c['backbones_trained']} | {c['heads_fitted']} | {c['curves']} | "
                     f"{c['empty_seconds']:.0f} | {c['warm_seconds']:.0f} |")
    b = result["budget"]
    lines += [f"| **book** | {ex['backbones_trained']} | {ex['heads_fitted']} | "
              f"{ex['curves']} | **{ex['book_empty_seconds']:.0f}** | "
              f"max {ex['max_chapter_warm_seconds']:.0f} (all {ex['book_warm_seconds']:.0f}) |", "",
              f"Budget (issue 17): book from an empty cache under {b['book_empty_seconds']} s "
              f"({'met' if result['within_budget']['book_empty'] else 'NOT met'}), every chapter under "
              f"{b['chapter_warm_seconds']} s warm ({'met' if result['within_budget']['chapter_warm'] else 'NOT met'}), "
              f"gallery at least {b['min_gallery']} ({'met' if result['within_budget']['gallery'] else 'NOT met'}).", "",
              "Assumptions: " + result["assumptions"], ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="results/fashion_budget", help="write <out>.json and <out>.md")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1, as CI)")
    parser.add_argument("--n-train", type=int, default=None, help="training images (default: the loader's 20,000)")
    parser.add_argument("--n-test", type=int, default=None, help="test images (default: the loader's 3,000)")
    parser.add_argument("--epochs", type=int, default=None, help="override the preset's epochs (smoke runs only)")
    parser.add_argument("--label", default="measured on a shared 2-core machine (other jobs running)",
                        help="where and how the timings were taken")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    sizes = {k: v for k, v in (("n_train", args.n_train), ("n_test", args.n_test)) if v is not None}
    data = load_dataset("fashion_mnist", **sizes)
    load = time.perf_counter() - start
    if args.epochs is not None:
        PRESETS["fashion_mnist"] = replace(PRESETS["fashion_mnist"],
                                           train=replace(PRESETS["fashion_mnist"].train, epochs=args.epochs))
    preset = PRESETS["fashion_mnist"]
    with tempfile.TemporaryDirectory(prefix="fashion-budget-") as cache:
        empty, _, _ = run_steps(data, Path(cache), args.seed)
        warm, contexts, strategies = run_steps(data, Path(cache), args.seed)
        assert all(warm[s]["cached"] for s in warm), "the second pass must load every model from the cache"
        curves, curve_objs = time_curves(contexts["homogeneous"], strategies, args.seed)
        maps = retrieval(contexts)
    gains = {n: float(c.relative_gain(maps["old"], maps["new"])) for n, c in curve_objs.items()}
    curve = float(np.mean(list(curves.values())))
    ex = extrapolate(load, empty, warm, curve)
    result = {
        "label": args.label, "seed": args.seed, "threads": args.threads,
        "preset": {"old": preset.old.to_dict(), "new": preset.new.to_dict(),
                   "new_heterogeneous": preset.new_heterogeneous.to_dict(),
                   "train": {k: v for k, v in vars(preset.train).items() if k != "seed"}},
        "n_train": len(data.train_labels), "n_test": len(data.test_labels),
        "load_seconds": load, "empty_cache": empty, "warm_cache": warm, "curve_seconds": curves,
        "map": maps, "relative_gain": gains, "extrapolation": ex, "budget": BUDGET,
        "within_budget": {"book_empty": ex["book_empty_seconds"] < BUDGET["book_empty_seconds"],
                          "chapter_warm": ex["max_chapter_warm_seconds"] < BUDGET["chapter_warm_seconds"],
                          "gallery": len(data.test_labels) >= BUDGET["min_gallery"]},
        "assumptions": ("chapters run in order with one shared checkpoint cache; per chapter, the backbones, heads "
                        "and curve evaluations of CHAPTERS in benchmarks/fashion_budget.py (counted from the digits "
                        f"chapters: {ex['backbones_trained']} backbone trainings, {ex['heads_fitted']} head fits, "
                        f"{ex['curves']} curves); a backbone trained on a share of the classes costs that share of "
                        "the old model's time relative to its 50 %; every head costs what the measured head of its "
                        "kind costs (the calibration of rank_merge_calibrated is counted as a psi fit, an "
                        "overestimate); a backbone cache load costs the mean warm-cache backbone step (load + "
                        "extraction of test and training embeddings), a head load the mean warm head step; a curve "
                        "costs the mean of the two measured curves; one data load per chapter; plots, widgets, "
                        "faiss and the live index are not counted."),
        "environment": {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
                        "backfill_lib": __version__, "machine": platform.machine(), "cpus": os.cpu_count(),
                        "elapsed_seconds": time.perf_counter() - start},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    text = markdown(result)
    out.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
