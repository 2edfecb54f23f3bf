"""Scale of the live index: OnlineBackfillIndex against one faiss index of the same size.

On a synthetic gallery of ``--n`` unit vectors (default 1,000,000, d = 128), old and new spaces
of the same dimension, half backfilled (r = 0.5) in batches, this measures in one run:

* merged search throughput (rank merge: both parts searched, top-k merged with the id rule)
  against one flat faiss index (``IndexFlatIP``) holding all ``n`` vectors;
* memory against that index: the bytes the structures hold (vectors, faiss id maps, our id
  arrays) and the growth of the process's resident memory (RSS), at r = 0.5 and after the
  backfill (before and after :meth:`~OnlineBackfillIndex.compact`);
* backfill throughput (vectors moved per second by ``backfill``; the embedding is not timed);
* two threads searching at once against one (faiss releases the GIL during a search);
* the same with an IVF index for both parts (``IVF<nlist>,Flat``, ``nprobe``) against one IVF
  index of the same size;
* the Qdrant backend in qdrant-client's embedded local mode, at ``--qdrant-n`` points.

Resident memory is measured with glibc's ``MALLOC_MMAP_THRESHOLD_=1048576`` (the script sets it
and restarts itself), so that freed buffers leave the process and RSS growth is what is held.

One faiss thread (``faiss.omp_set_num_threads(1)``) unless ``--threads``. Times are medians of
``--repeats`` runs, an index and its baseline timed alternately; only ratios measured in this run are meant to travel.

    python benchmarks/live_index.py [--n 1000000] [--qdrant-n 20000] [--out results/live_index]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import threading
import time
from pathlib import Path

import faiss
import numpy as np
from tqdm.auto import tqdm

from backfill_lib.live_index import CHUNK_ROWS, OnlineBackfillIndex
from backfill_lib.validation import as_embeddings


def unit(rng: np.random.Generator, n: int, d: int, chunk: int = 100_000) -> np.ndarray:
    """``n`` random unit rows, normalised in place (a batch costs its own size, like a model's output)."""
    if n <= chunk:
        x = rng.standard_normal((n, d), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x
    out = np.empty((n, d), dtype=np.float32)
    for start in range(0, n, chunk):
        out[start:start + min(chunk, n - start)] = unit(rng, min(chunk, n - start), d, chunk)
    return out


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def paired_median_seconds(fa, fb, repeats: int) -> tuple[float, float]:
    """Medians of ``fa`` and ``fb`` timed alternately, so that load from other work hits both alike."""
    fa(), fb()
    ta, tb = [], []
    for _ in range(repeats):
        for f, times in ((fa, ta), (fb, tb)):
            start = time.perf_counter()
            f()
            times.append(time.perf_counter() - start)
    return float(np.median(ta)), float(np.median(tb))


def peak_rss_bytes() -> int:
    """Peak resident memory since the last :func:`reset_peak_rss` (``VmHWM``)."""
    with open("/proc/self/status") as f:
        line = next(t for t in f if t.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def reset_peak_rss() -> None:
    """Set the peak resident memory to the current one (Linux: ``5`` into ``clear_refs``)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def held_bytes(index: OnlineBackfillIndex, capacity: bool = False) -> int:
    """Bytes held by the structures: codes, id arrays, tombstones (``capacity``: reserved rows too)."""
    total = 0
    for part in index._parts.values():
        if hasattr(part, "capacity"):  # chunked flat-codes part or IVF-Flat lists: rows they reserve
            rows = part.capacity if capacity else part.ntotal
            total += rows * (part.template.sa_code_size() + 8)
        else:
            inner = part.index.index if isinstance(part.index, faiss.IndexIDMap) else part.index
            total += (inner.sa_code_size() + 8) * inner.ntotal  # codes, and an id map (or IVF's ids)
        total += part.tombs.nbytes
    return total + index._ids.nbytes + index._in_new.nbytes  # which items exist, and where


def backfill_half(index, ids, order, d, batch, seed, desc):
    """Move the first half of ``order`` to the new part; returns (seconds in backfill, vectors moved)."""
    rng = np.random.default_rng(seed)
    half = order[: len(order) // 2]
    seconds = 0.0
    for start in tqdm(range(0, len(half), batch), desc=desc, leave=False):
        chunk = ids[half[start:start + batch]]
        vectors = unit(rng, len(chunk), d)  # the 'new model': not timed
        t = time.perf_counter()
        index.backfill(chunk, vectors)
        seconds += time.perf_counter() - t
    return seconds, len(half)


def concurrent_qps(search, queries: np.ndarray, n_threads: int, rounds: int) -> float:
    """Queries per second with ``n_threads`` threads each searching ``rounds`` times."""
    def work():
        for _ in range(rounds):
            search(queries)
    threads = [threading.Thread(target=work) for _ in range(n_threads)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return n_threads * rounds * len(queries) / (time.perf_counter() - start)


def flat_section(args, old, ids, order, q_old, q_new) -> dict:
    n, d, k = len(old), args.d, args.k
    rss0 = rss_bytes()
    flat = faiss.IndexFlatIP(d)
    flat.add(old)
    flat_rss = rss_bytes() - rss0
    flat_bytes = flat.sa_code_size() * flat.ntotal

    # The working set of one batch outside the index: the job's new vectors (made here by unit())
    # and what backfill() needs to check them (as_embeddings: norms and a finiteness mask).
    rss_b = rss_bytes()
    reset_peak_rss()
    batch_vectors = as_embeddings(unit(np.random.default_rng(0), args.batch, d), "x", dim=d, unit_norm=True)
    batch_peak = peak_rss_bytes() - rss_b
    del batch_vectors

    rss1 = rss_bytes()
    index = OnlineBackfillIndex(d, d, chunk_rows=args.chunk_rows)
    index.add_old(ids, old)
    rss_r0 = rss_bytes() - rss1
    reset_peak_rss()  # the peak during the backfill (not during the first add_old)
    bytes_r0 = held_bytes(index)
    seconds, moved = backfill_half(index, ids, order, d, args.batch, args.seed + 1, "backfill (flat)")
    rss_r05 = rss_bytes() - rss1
    peak_r05 = peak_rss_bytes() - rss1
    bytes_r05, reserved_r05 = held_bytes(index), held_bytes(index, capacity=True)
    t_flat, t_merged = paired_median_seconds(lambda: flat.search(q_new, k),
                                             lambda: index.search(q_new, k, query_old=q_old), args.repeats)

    # Two threads searching at once (each one faiss thread) against one.
    search = lambda q: index.search(q, k, query_old=q_old[: len(q)])  # noqa: E731
    qps1 = concurrent_qps(search, q_new, 1, args.repeats)
    qps2 = concurrent_qps(search, q_new, 2, args.repeats)

    # Finish the backfill, then give the emptied old part's storage back.
    rest = order[n // 2:]
    rng = np.random.default_rng(args.seed + 2)
    reset_peak_rss()
    for start in tqdm(range(0, len(rest), args.batch), desc="backfill rest", leave=False):
        chunk = ids[rest[start:start + args.batch]]
        index.backfill(chunk, unit(rng, len(chunk), d))
    gc.collect()
    rss_r1 = rss_bytes() - rss1
    peak_r1 = peak_rss_bytes() - rss1
    index.compact()
    rss_r1_compact = rss_bytes() - rss1
    bytes_r1 = held_bytes(index)
    del index, flat  # only now: freeing the baseline earlier would shift every RSS reading after it
    gc.collect()
    return {
        "index": "Flat / Flat", "n": n,
        "baseline": "faiss.IndexFlatIP with all n vectors",
        "baseline_qps": len(q_new) / t_flat,
        "merged_qps_r0.5": len(q_new) / t_merged,
        "search_throughput_ratio": t_flat / t_merged,
        "memory_held_ratio_r0": bytes_r0 / flat_bytes,
        "memory_held_ratio_r0.5": bytes_r05 / flat_bytes,
        "memory_held_ratio_r1_compacted": bytes_r1 / flat_bytes,
        "rss_ratio_r0": rss_r0 / flat_rss,
        "rss_ratio_r0.5": rss_r05 / flat_rss,
        "rss_ratio_r1": rss_r1 / flat_rss,
        "rss_ratio_r1_compacted": rss_r1_compact / flat_rss,
        "peak_rss_ratio_r0_to_r0.5": peak_r05 / flat_rss,
        "peak_rss_ratio_r0.5_to_r1": peak_r1 / flat_rss,
        "batch_working_set_ratio": batch_peak / flat_rss,
        "memory_reserved_ratio_r0.5": reserved_r05 / flat_bytes,
        "chunk_rows": args.chunk_rows,
        "baseline_rss_mb": flat_rss / 2**20,
        "backfill_vectors_per_s": moved / seconds,
        "qps_1_thread": qps1, "qps_2_threads": qps2, "two_thread_speedup": qps2 / qps1,
    }


def ivf_section(args, old, ids, order, q_old, q_new) -> dict:
    d, k = args.d, args.k
    spec = f"IVF{args.nlist},Flat"
    rng = np.random.default_rng(args.seed + 3)
    train_old = old[rng.choice(len(old), size=min(len(old), 64 * args.nlist), replace=False)]
    train_new = unit(rng, len(train_old), d)
    rss0 = rss_bytes()
    base = faiss.index_factory(d, spec, faiss.METRIC_INNER_PRODUCT)
    base.train(train_old)
    base.add_with_ids(old, ids)
    faiss.extract_index_ivf(base).nprobe = args.nprobe
    base_bytes = base.sa_code_size() * base.ntotal + 8 * base.ntotal
    base_rss = rss_bytes() - rss0

    rss1 = rss_bytes()
    index = OnlineBackfillIndex(d, d, spec, spec)
    index.train_old(train_old)
    index.train_new(train_new)
    index.add_old(ids, old)
    index.set_search_params(nprobe=args.nprobe)
    reset_peak_rss()
    seconds, moved = backfill_half(index, ids, order, d, args.batch, args.seed + 4, "backfill (IVF)")
    rss_r05, peak_r05 = rss_bytes() - rss1, peak_rss_bytes() - rss1
    t_base, t_merged = paired_median_seconds(lambda: base.search(q_new, k),
                                             lambda: index.search(q_new, k, query_old=q_old), args.repeats)
    held, reserved = held_bytes(index), held_bytes(index, capacity=True)
    del index, base
    gc.collect()
    return {
        "index": f"{spec} / {spec}, nprobe={args.nprobe}", "n": len(old),
        "baseline": f"one {spec} index (nprobe={args.nprobe}) with all n vectors",
        "baseline_qps": len(q_new) / t_base,
        "merged_qps_r0.5": len(q_new) / t_merged,
        "search_throughput_ratio": t_base / t_merged,
        "memory_held_ratio_r0.5": held / base_bytes,
        "memory_reserved_ratio_r0.5": reserved / base_bytes,
        "rss_ratio_r0.5": rss_r05 / base_rss,
        "peak_rss_ratio_r0_to_r0.5": peak_r05 / base_rss,
        "baseline_rss_mb": base_rss / 2**20,
        "backfill_vectors_per_s": moved / seconds,
    }


def qdrant_section(args) -> dict:
    try:
        from qdrant_client import QdrantClient
    except ImportError:
        return {"skipped": "qdrant-client is not installed"}
    from backfill_lib.qdrant_index import QdrantBackfillIndex

    n, d, k = args.qdrant_n, args.d, args.k
    rng = np.random.default_rng(args.seed + 5)
    old = unit(rng, n, d)
    ids = np.arange(n)
    q_old, q_new = unit(rng, args.qdrant_queries, d), unit(rng, args.qdrant_queries, d)
    index = QdrantBackfillIndex(QdrantClient(":memory:"), "gallery", d, d)
    start = time.perf_counter()
    for s in range(0, n, 1000):
        index.add_old(ids[s:s + 1000], old[s:s + 1000])
    add_seconds = time.perf_counter() - start
    order = rng.permutation(n)
    seconds, moved = backfill_half(index, ids, order, d, 1000, args.seed + 6, "backfill (Qdrant)")
    flat = faiss.IndexFlatIP(d)
    flat.add(old)
    t_flat, t_merged = paired_median_seconds(lambda: flat.search(q_new, k),
                                             lambda: index.search(q_new, k, query_old=q_old), max(1, args.repeats // 2))
    return {
        "backend": "qdrant-client embedded local mode (QdrantClient(':memory:'))", "n": n,
        "add_old_vectors_per_s": n / add_seconds,
        "backfill_vectors_per_s": moved / seconds,
        "merged_qps_r0.5": len(q_new) / t_merged,
        "faiss_flat_qps_same_n": len(q_new) / t_flat,
        "search_throughput_ratio_vs_faiss_flat": t_flat / t_merged,
    }


def main() -> None:
    # Big allocations from mmap, returned to the system when freed: otherwise glibc may reuse
    # freed heap memory and the resident-memory growth would not measure what an index holds.
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != "1048576":
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "1048576"
        os.execv(sys.executable, [sys.executable] + sys.argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="gallery size")
    parser.add_argument("--d", type=int, default=128, help="dimension of both spaces")
    parser.add_argument("--k", type=int, default=10, help="results per query")
    parser.add_argument("--queries", type=int, default=256, help="queries per search call")
    parser.add_argument("--batch", type=int, default=10_000, help="items per backfill batch")
    parser.add_argument("--chunk-rows", type=int, default=CHUNK_ROWS, help="rows per chunk of the flat parts")
    parser.add_argument("--nlist", type=int, default=1024, help="IVF lists")
    parser.add_argument("--nprobe", type=int, default=16, help="IVF lists probed per query")
    parser.add_argument("--qdrant-n", type=int, default=100_000, help="points in the Qdrant local benchmark")
    parser.add_argument("--qdrant-queries", type=int, default=32, help="queries per Qdrant search call")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs (the median is reported)")
    parser.add_argument("--threads", type=int, default=1, help="faiss OpenMP threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip", nargs="*", default=[], choices=["flat", "ivf", "qdrant"])
    parser.add_argument("--out", default=None, help="write <out>.json and <out>.md")
    args = parser.parse_args()
    faiss.omp_set_num_threads(args.threads)

    rng = np.random.default_rng(args.seed)
    old = unit(rng, args.n, args.d)
    ids = rng.choice(10 * args.n, size=args.n, replace=False).astype(np.int64)
    order = rng.permutation(args.n)
    q_old, q_new = unit(rng, args.queries, args.d), unit(rng, args.queries, args.d)
    results = {"settings": {**vars(args), "machine": platform.platform(), "cpus": os.cpu_count(),
                            "faiss": faiss.__version__, "load_average_start": os.getloadavg()[0]}}
    if "flat" not in args.skip:
        results["flat"] = flat_section(args, old, ids, order, q_old, q_new)
        print(json.dumps(results["flat"], indent=1))
    if "ivf" not in args.skip:
        results["ivf"] = ivf_section(args, old, ids, order, q_old, q_new)
        print(json.dumps(results["ivf"], indent=1))
    del old
    if "qdrant" not in args.skip:
        results["qdrant"] = qdrant_section(args)
        print(json.dumps(results["qdrant"], indent=1))
    results["settings"]["load_average_end"] = os.getloadavg()[0]
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out + ".json").write_text(json.dumps(results, indent=1) + "\n")
        Path(args.out + ".md").write_text(markdown(results) + "\n")


def markdown(results: dict) -> str:
    s = results["settings"]
    lines = [f"# Live index at scale (benchmarks/live_index.py)", "",
             f"Measured in one run on {s['machine']} ({s['cpus']} CPUs, shared), faiss {s['faiss']}, "
             f"{s['threads']} faiss thread(s); d = {s['d']}, k = {s['k']}, {s['queries']} queries per call, "
             f"backfill batches of {s['batch']}; medians of {s['repeats']} runs. Synthetic unit vectors; "
             "the embedding step is not timed.", "",
             f"1-minute load average: {s.get('load_average_start', float('nan')):.1f} at the start, "
             f"{s.get('load_average_end', float('nan')):.1f} at the end (2 cores: above 2, other work "
             "competed for the CPU and the ratios are noisy).", "",
             "    " + f"python benchmarks/live_index.py --n {s['n']} --qdrant-n {s['qdrant_n']} --repeats {s['repeats']} --out results/live_index", ""]
    if "flat" in results:
        f = results["flat"]
        lines += [f"## Flat parts, n = {f['n']:,} (baseline: {f['baseline']})", "",
                  "| measure | value |", "|---|---|",
                  f"| merged search throughput at r = 0.5 / baseline | {f['search_throughput_ratio']:.2f}x "
                  f"({f['merged_qps_r0.5']:.0f} vs {f['baseline_qps']:.0f} queries/s) |",
                  f"| memory held / baseline at r = 0, 0.5, 1 (compacted) | {f['memory_held_ratio_r0']:.3f}x, "
                  f"{f['memory_held_ratio_r0.5']:.3f}x, {f['memory_held_ratio_r1_compacted']:.3f}x |",
                  f"| resident memory growth / baseline's ({f['baseline_rss_mb']:.0f} MB) at r = 0, 0.5, 1, 1 compacted | "
                  f"{f['rss_ratio_r0']:.3f}x, {f['rss_ratio_r0.5']:.3f}x, {f['rss_ratio_r1']:.3f}x, "
                  f"{f['rss_ratio_r1_compacted']:.3f}x |",
                  f"| peak resident memory growth / baseline's, r = 0 to 0.5 and 0.5 to 1 | "
                  f"{f['peak_rss_ratio_r0_to_r0.5']:.3f}x, {f['peak_rss_ratio_r0.5_to_r1']:.3f}x |",
                  f"| of which one batch's working set outside the index ({s['batch']:,} new vectors and their "
                  f"check) | {f['batch_working_set_ratio']:.3f}x |",
                  f"| rows the chunks reserve (codes and ids, spare rows included) / baseline at r = 0.5 | "
                  f"{f['memory_reserved_ratio_r0.5']:.3f}x |",
                  f"| backfill throughput | {f['backfill_vectors_per_s']:,.0f} vectors/s |",
                  f"| 2 searching threads / 1 | {f['two_thread_speedup']:.2f}x "
                  f"({f['qps_2_threads']:.0f} vs {f['qps_1_thread']:.0f} queries/s) |", ""]
    if "ivf" in results:
        v = results["ivf"]
        lines += [f"## IVF parts, n = {v['n']:,}: {v['index']} (baseline: {v['baseline']})", "",
                  "| measure | value |", "|---|---|",
                  f"| merged search throughput at r = 0.5 / baseline | {v['search_throughput_ratio']:.2f}x "
                  f"({v['merged_qps_r0.5']:.0f} vs {v['baseline_qps']:.0f} queries/s) |",
                  f"| memory held / baseline at r = 0.5 | {v['memory_held_ratio_r0.5']:.3f}x |",
                  f"| entries the lists reserve (codes and ids, room for adds included) / baseline at r = 0.5 | "
                  f"{v['memory_reserved_ratio_r0.5']:.3f}x |",
                  f"| resident memory growth / baseline's ({v['baseline_rss_mb']:.0f} MB) at r = 0.5; peak r = 0 to 0.5 | "
                  f"{v['rss_ratio_r0.5']:.3f}x; {v['peak_rss_ratio_r0_to_r0.5']:.3f}x |",
                  f"| backfill throughput | {v['backfill_vectors_per_s']:,.0f} vectors/s |", ""]
    if "qdrant" in results and "n" in results["qdrant"]:
        q = results["qdrant"]
        lines += [f"## Qdrant backend, n = {q['n']:,}: {q['backend']}", "",
                  "| measure | value |", "|---|---|",
                  f"| add_old | {q['add_old_vectors_per_s']:,.0f} vectors/s |",
                  f"| backfill throughput | {q['backfill_vectors_per_s']:,.0f} vectors/s |",
                  f"| merged search at r = 0.5 | {q['merged_qps_r0.5']:.1f} queries/s "
                  f"({q['search_throughput_ratio_vs_faiss_flat']:.4f}x a faiss flat index of the same size) |", ""]
    lines += ["## Reading the numbers", "",
              "- *Memory held* counts what the structures store: the vectors of both parts, the chunks' id arrays "
              "and the index's own bookkeeping: every id once, sorted, with a flag saying whether it is stored new "
              "(8 + 8 + 1 = 17 bytes per item over 512 for d = 128). *Resident memory* is what the "
              f"process grew by; its *peak* is the high-water mark (`VmHWM`) over each half of the backfill. Flat "
              f"parts are stored in chunks of {results.get('flat', {}).get('chunk_rows', 0):,} rows: a removal "
              "compacts the chunks in place and refills them from the last one, which is freed when empty, so "
              "each part holds less than one chunk of spare rows and the old part shrinks as the backfill moves "
              "items out (one faiss flat index would keep its largest size and the new one would grow by "
              "doubling: 1.61x at r = 0.5 and 2.13x at r = 1 before the chunks). A backfill batch flips flags "
              "in place (nothing of the gallery's size is allocated); the peak adds what a batch needs while it "
              "is written: its new vectors, the masks that check them and the new part's next chunk (the rows above).",
              "- The merged flat search is faster than the one flat index here: faiss's flat search over "
              "chunks of a few thousand rows ran faster on this machine than over one large index (a separate "
              "check in an earlier session, 256 queries: 8 indices of 16,384 rows took 2.9-3.5 s, one of 131,072 "
              "rows 6.2-7.7 s). A plausible cause, not proven: a chunk of 8,192 rows is 4 MiB of vectors, which "
              "stays in this CPU's 32 MiB L3 cache while faiss multiplies it with the query block; the same check "
              "found two threads gaining less on the chunked index (1.44x, 200,000 items) than on one flat index "
              "(1.73x), as two threads sharing that cache would. Take the ratio as 'no slower', not as a "
              "speedup to expect. Chunks of 8,192 rows (the default) and 16,384 gave the same search and "
              "backfill throughput on this machine; the smaller chunks halve the spare rows a part can hold.",
              "- IVF: each part is searched with its own `nprobe` lists; recall against exact search is not "
              "measured here, only throughput. An `IVF<nlist>,Flat` part holds each inverted list in its own "
              "faiss container (an `ArrayInvertedLists` of one list), rebuilt at its size once removals leave "
              "its storage more than a sixteenth (plus 4 entries) above its entries, and rebuilt with that much "
              "room when it must grow (*entries the lists reserve* counts the room); a search is one faiss IVF "
              "search over a `VStackInvertedLists` view of the lists (one coarse-quantizer pass, no copy), so "
              "it scans what one IVF index of the same vectors would. The baseline is one IVF index filled by "
              "one `add`: its lists are `std::vector`s grown by doubling and keep that spare capacity, which is "
              "why the index's resident memory can be below the baseline's. With one faiss index per part (the "
              "layout before), whose lists also keep their largest size after removals, it was 1.31x (peak "
              "1.32x) at r = 0.5. Chunks of rows were slower to search, in a separate check on 2026-12-02 "
              "(200,000 vectors, 25 chunks of 8,192, 256 queries, nprobe 16): a `HStackInvertedLists` over the "
              "chunks copies every probed list at every search (2.8-3.9x slower than one index), and searching "
              "the chunks one by one with one coarse assignment (`search_preassigned`) ran at 0.61-0.66x. "
              "Backfill is slower than with one faiss index: each batch touches almost every list of both "
              "parts from Python (in a paired check on 2026-12-02, 500,000 vectors moved in batches of 10,000 at "
              "n = 1,000,000, two runs each: 150,000-157,000 vectors/s with one faiss index per part, 98,000-108,000 "
              "with lists). Removals run in faiss (`remove_ids` on each list, the last entries filling the holes "
              "as in one faiss index), and in the same check at 50,000 vectors (256 lists, nprobe 16, after a "
              "partial backfill and removals) the merged results, ids and scores, were bit-identical to those "
              "of one faiss index per part.",
              "- Qdrant local mode is qdrant-client's embedded pure-Python engine (numpy brute force; it "
              "warns above 20,000 points); a Qdrant server would be the one to measure for production.",
              "- Two threads searching at once on this 2-core machine, shared with other work: a speedup "
              "near 2x shows that searches do not serialise on the GIL or on the index's lock, but only if "
              "the second core is free; with the load average above 2 it was not, and a ratio near or below "
              "1x then says nothing either way.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
