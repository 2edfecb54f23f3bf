"""Speed of the backfill evaluation: the engine against the old one and against one argsort.

The workload of issue 10: rank merge, the 11 ratios 0, 0.1, ..., 1, queries = gallery
(leave-one-out), d = 64, at 10, 50 and 100 classes (N/C items per class: 100 like CIFAR-100's
test split, 10 like the book's digits and Fashion-MNIST, where each query has ten times more
relevant items); old and new embeddings are unit vectors around class centres (the new ones
tighter). For each N and class count this one process measures

- ``argsort``: one row-wise ``np.argsort`` (default kind) of the N × N old/old score matrix, in
  chunks of 1024 rows (the scores are computed outside the timed part);
- ``engine``: :func:`backfill_lib.backfill.evaluate_backfill`, the whole 11-ratio curve, numpy path
  (which counts by blocks or row by row against each query's sorted relevant scores, whichever
  is cheaper: see :func:`backfill_lib.evaluation.evaluate_states`'s ``counting``);
- ``stable argsort``: the same with ``kind="stable"``, for scale (one run);
- ``reference``: the old engine (tests/reference_engine.py), which sorts every merged row twice
  per ratio,

and prints each as a ratio to ``argsort``. Times of ``argsort`` and ``engine`` are the minimum
of ``--repeats`` runs, alternated; the reference runs once. Peak memory is measured with
tracemalloc in a separate pass (numpy's allocations are traced), the reference's only for
N <= ``--reference-memory-max``. The numbers must agree: the largest difference between the
engine's and the reference's mAP, top-1, top-5 is printed (AP may differ at exact score ties,
which continuous embeddings do not have).

    python benchmarks/eval_speed.py [--sizes 2000 5000] [--classes 10 50 100] [--large] [--out results/eval_speed]

``--large`` adds N = 10,000 (the reference is then skipped: about 7 minutes per class count).
One thread throughout.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"  # before numpy is imported

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import tracemalloc  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from backfill_lib.backfill import DEFAULT_RATIOS, backfill_order, evaluate_backfill, rank_merge  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from reference_engine import reference_states  # noqa: E402

CHUNK = 1024


def make_data(n: int, dim: int = 64, n_classes: int = 100, seed: int = 0):
    """Unit old and new embeddings of ``n`` items in ``n_classes`` balanced classes."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % n_classes
    rng.shuffle(labels)

    def space(spread):
        centres = rng.normal(size=(n_classes, dim))
        x = centres[labels] + spread * rng.normal(size=(n, dim))
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    return space(1.6), space(1.0), labels


def time_argsort(old: np.ndarray, kind: str | None = None) -> float:
    total = 0.0
    for start in range(0, len(old), CHUNK):
        scores = old[start:start + CHUNK] @ old.T
        t = time.perf_counter()
        np.argsort(scores, axis=1, kind=kind)
        total += time.perf_counter() - t
    return total


def run_engine(old, new, labels):
    return evaluate_backfill(rank_merge(old, new), labels, ratios=DEFAULT_RATIOS, order_seed=0, device="numpy")


def run_reference(old, new, labels):
    n = len(labels)
    order = backfill_order(n, 0)
    n_new = [int(round(r * n)) for r in DEFAULT_RATIOS]
    ap, hits = reference_states(old, old, new, new, labels, labels, order, n_new, exclude_self=True)
    return np.nanmean(ap, axis=1), hits[1].mean(axis=1), hits[5].mean(axis=1)


def peak_mib(fn, *args) -> float:
    tracemalloc.start()
    tracemalloc.reset_peak()
    fn(*args)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak / 2**20


def measure(n: int, n_classes: int, repeats: int, reference_memory_max: int, reference_max: int) -> dict:
    old, new, labels = make_data(n, n_classes=n_classes)
    t_sort, t_engine = [], []
    for _ in range(repeats):
        t_sort.append(time_argsort(old))
        t = time.perf_counter()
        curve = run_engine(old, new, labels)
        t_engine.append(time.perf_counter() - t)
    t_stable = time_argsort(old, kind="stable")
    ref = n <= reference_max
    if ref:
        t = time.perf_counter()
        ref_map, ref_top1, ref_top5 = run_reference(old, new, labels)
        t_ref = time.perf_counter() - t
    row = {
        "n": n,
        "classes": n_classes,
        "argsort_s": min(t_sort),
        "engine_s": min(t_engine),
        "reference_s": t_ref if ref else None,
        "stable_argsort_s": t_stable,
        "engine_over_argsort": min(t_engine) / min(t_sort),
        "reference_over_argsort": t_ref / min(t_sort) if ref else None,
        "engine_over_stable_argsort": min(t_engine) / t_stable,
        "max_abs_diff": {"map": float(np.max(np.abs(curve.map - ref_map))),
                         "top1": float(np.max(np.abs(curve.top1 - ref_top1))),
                         "top5": float(np.max(np.abs(curve.top5 - ref_top5)))} if ref else None,
        "peak_mib": {"argsort": peak_mib(time_argsort, old), "engine": peak_mib(run_engine, old, new, labels),
                     "reference": peak_mib(run_reference, old, new, labels)
                     if ref and n <= reference_memory_max else None},
    }
    return row


def to_markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        "# Evaluation speed: the whole 11-ratio curve against one argsort",
        "",
        f"Measured by `benchmarks/eval_speed.py` on {meta['machine']}, one thread, numpy {meta['numpy']}. "
        "Rank merge, 11 ratios, queries = gallery (leave-one-out), d = 64, N/C items in each of C classes. "
        "Times are seconds; ratios are to one row-wise `np.argsort` of the N × N score matrix, measured in the "
        "same run (argsort and engine: minimum of "
        f"{meta['repeats']} alternated runs; reference: one run). Peak memory by tracemalloc (MiB). "
        "For scale, a stable (merge) argsort, which the reference uses, is also shown (one run).",
        "",
        "| N | classes C | argsort (s) | engine (s) | engine / argsort | reference (s) | reference / argsort "
        "| stable argsort (s) | peak MiB: argsort, engine, reference | max abs diff mAP / top-1 / top-5 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        mem = r["peak_mib"]
        ref_mem = "n/m" if mem["reference"] is None else f"{mem['reference']:.0f}"
        d = r["max_abs_diff"]
        diff = "n/m" if d is None else f"{d['map']:.1e} / {d['top1']:.1e} / {d['top5']:.1e}"
        ref_s = "n/m" if r["reference_s"] is None else f"{r['reference_s']:.1f}"
        ref_ratio = "n/m" if r["reference_s"] is None else f"{r['reference_over_argsort']:.1f}×"
        lines.append(
            f"| {r['n']:,} | {r['classes']} | {r['argsort_s']:.2f} | {r['engine_s']:.2f} "
            f"| **{r['engine_over_argsort']:.2f}×** | {ref_s} | {ref_ratio} | {r['stable_argsort_s']:.2f} "
            f"| {mem['argsort']:.0f}, {mem['engine']:.0f}, {ref_mem} | {diff} |"
        )
    lines += ["", "n/m: not measured (the reference runs up to "
              f"N = {meta['reference_max']:,}, its memory pass up to N = {meta['reference_memory_max']:,}). Load average (1, 5, 15 min) of the shared machine: "
              f"{', '.join(f'{x:.1f}' for x in meta['load_average_at_start'])} at the start, "
              f"{', '.join(f'{x:.1f}' for x in meta['load_average_at_end'])} at the end; other jobs slow "
              "both sides of a ratio, not always equally.", ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 5000])
    parser.add_argument("--classes", type=int, nargs="+", default=[10, 50, 100])
    parser.add_argument("--large", action="store_true", help="add N = 10,000 (without the reference)")
    parser.add_argument("--reference-max", type=int, default=5000, help="largest N checked against the reference")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--reference-memory-max", type=int, default=5000)
    parser.add_argument("--out", type=Path, default=None, help="write <out>.md and <out>.json")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if any(c < 1 for c in args.classes):
        parser.error("--classes must be positive")
    if any(n < 2 * max(args.classes) for n in args.sizes):
        parser.error(f"--sizes must be at least {2 * max(args.classes)} (two items per class)")
    sizes = args.sizes + ([10000] if args.large else [])
    meta = {"machine": f"{platform.machine()} {platform.processor() or platform.platform()}, "
                       f"{os.cpu_count()} logical CPUs",
            "numpy": np.__version__, "python": platform.python_version(), "repeats": args.repeats,
            "reference_memory_max": args.reference_memory_max, "reference_max": args.reference_max,
            "load_average_at_start": list(os.getloadavg())}
    rows = []
    for n, n_classes in tqdm([(n, c) for n in sizes for c in args.classes], desc="N, classes"):
        rows.append(measure(n, n_classes, args.repeats, args.reference_memory_max, args.reference_max))
        tqdm.write(json.dumps(rows[-1]))
    meta["load_average_at_end"] = list(os.getloadavg())
    text = to_markdown(rows, meta)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".md").write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
