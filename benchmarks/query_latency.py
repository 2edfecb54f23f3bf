"""Latency of one query through the live index with ψ attached, against one flat faiss search.

Issue 19's target: a single query through :class:`~backfill_lib.live_index.OnlineBackfillIndex`
with a fitted :class:`~backfill_lib.transforms.ReverseTransform` ``ψ`` attached (half the gallery
backfilled, so both parts are searched and merged) within **3×** one ``IndexFlatIP`` search of the
same gallery (all ``N`` vectors in one index), and a batch of queries within **1.2×** per query.

For each ``N`` this one process measures, alternating the contenders, the median of ``--repeats``
timed rounds of:

* ``flat``: ``faiss.IndexFlatIP(d).search(q, k)`` over all ``N`` vectors;
* ``index``: ``OnlineBackfillIndex.search(q_new, k)``, ψ̂ applied inside;
* ``psi``: ``psi.transform(q_new)`` alone;

once with one query per call, once with a batch of ``--batch`` queries (time per query), and
prints each as a ratio to ``flat``. Only ratios measured in one run are meant to travel (these
machines are shared). One thread for faiss and torch.

    python benchmarks/query_latency.py [--sizes 899 20000] [--out results/query_latency]
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import faiss  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from backfill_lib.live_index import OnlineBackfillIndex  # noqa: E402
from backfill_lib.transforms import ReverseTransform  # noqa: E402
from backfill_lib.validation import normalize_rows  # noqa: E402

TARGET_SINGLE, TARGET_BATCH = 3.0, 1.2


def _unit(rng, n, d):
    return normalize_rows(rng.normal(size=(n, d)).astype(np.float32))


def _median_time(fn, repeats: int, inner: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - start) / inner)
    return float(np.median(times))


def measure(n: int, d_old: int, d_new: int, k: int, batch: int, repeats: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    old, new = _unit(rng, n, d_old), _unit(rng, n, d_new)
    train_new, train_old = _unit(rng, 2000, d_new), _unit(rng, 2000, d_old)
    psi = ReverseTransform(steps=50, seed=seed).fit(train_new, train_old)
    index = OnlineBackfillIndex(d_old, d_new, psi=psi)
    ids = np.arange(n)
    index.add_old(ids, old)
    half = n // 2
    index.backfill(ids[:half], new[:half])
    flat = faiss.IndexFlatIP(d_new)
    flat.add(new)
    queries = _unit(rng, max(batch, 64), d_new)
    one = queries[:1]
    rows = {}
    for label, q, inner in (("single", one, 50), ("batch", queries[:batch], 2)):
        contenders = {"flat": lambda q=q: flat.search(q, k), "index": lambda q=q: index.search(q, k),
                      "psi": lambda q=q: psi.transform(q)}
        for fn in contenders.values():                      # warm up
            fn()
        times = {name: [] for name in contenders}
        for _ in range(repeats):                           # alternate the contenders, round by round
            for name, fn in contenders.items():
                times[name].append(_median_time(fn, 1, inner) / len(q))
        med = {name: float(np.median(t)) for name, t in times.items()}
        rows[label] = {"queries_per_call": len(q), "seconds_per_query": med,
                       "index_over_flat": med["index"] / med["flat"], "psi_over_flat": med["psi"] / med["flat"]}
    return {"n": n, "d_old": d_old, "d_new": d_new, "k": k, **rows}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[899, 20000])
    parser.add_argument("--d-old", type=int, default=64)
    parser.add_argument("--d-new", type=int, default=64)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", type=Path, default=None, help="write <out>.json and <out>.md")
    args = parser.parse_args(argv)
    faiss.omp_set_num_threads(1)
    torch.set_num_threads(1)
    results = [measure(n, args.d_old, args.d_new, args.k, args.batch, args.repeats) for n in args.sizes]
    lines = ["| N | single query: index / flat | ψ alone / flat | batch of %d: index / flat | ψ alone / flat |" % args.batch,
             "|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['n']:,} | {r['single']['index_over_flat']:.2f}× | {r['single']['psi_over_flat']:.2f}× | "
                     f"{r['batch']['index_over_flat']:.2f}× | {r['batch']['psi_over_flat']:.2f}× |")
    big = max(results, key=lambda r: r["n"])
    verdict = (f"target at N = {big['n']:,}: single {big['single']['index_over_flat']:.2f}× (≤ {TARGET_SINGLE}×: "
               f"{'met' if big['single']['index_over_flat'] <= TARGET_SINGLE else 'NOT met'}), batch "
               f"{big['batch']['index_over_flat']:.2f}× (≤ {TARGET_BATCH}×: "
               f"{'met' if big['batch']['index_over_flat'] <= TARGET_BATCH else 'NOT met'})")
    table = "\n".join(lines + ["", verdict])
    print(table)
    if args.out is not None:
        meta = {"command": "python benchmarks/query_latency.py " + " ".join(argv or []), "machine": platform.platform(),
                "python": platform.python_version(), "faiss": faiss.__version__, "torch": torch.__version__,
                "threads": 1, "repeats": args.repeats, "results": results,
                "targets": {"single": TARGET_SINGLE, "batch": TARGET_BATCH}}
        args.out.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
        args.out.with_suffix(".md").write_text("# Query latency (ours, one run, ratios only)\n\n" + table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
