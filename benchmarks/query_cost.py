"""Query-time cost of each strategy, as a ratio to one new-model forward pass (METHOD §4).

For a batch of CIFAR-sized queries (3×32×32) and CIFAR-style ResNet-18 old and new models, each
strategy embeds the batch with the backbones it needs, applies its heads (``ψ``, ``ρ``), and
searches a gallery half backfilled (``r = 0.5``): one faiss index for single-space strategies
(BCT, RA-BCT, forward transformation), a :class:`~backfill_lib.retrieval.MixedGallery` (two
indexes, merged top-k) for rank merge and the reverse transformation; calibrated rank merge
searches the same mixed gallery with each space's affine score map folded into the vectors (one
extra column per space, :func:`~backfill_lib.backfill.fold_affine_scores`), and appends that
column to its two query vectors. Every time is the median
of several runs measured in this one process; only the ratios are meant to travel.

    python benchmarks/query_cost.py [--batch 64] [--gallery 10000] [--repeats 7]

Writes ``results/query_cost.json``; the experiment command adds its ratios to the tables.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from backfill_lib.backfill import fold_affine_scores
from backfill_lib.models import ModelSpec, build_model
from backfill_lib.retrieval import Gallery, MixedGallery
from backfill_lib.transforms import ResidualEmbedding, reverse_transformation

#: What each strategy runs per query batch: backbones, heads, and the kind of index it searches.
PIPELINES = {
    "old": (("old",), (), "single"),
    "offline": (("old",), (), "single"),          # old/old until r = 1
    "new_on_old": (("new",), (), "single"),
    "bct": (("new",), (), "single"),
    "bct_pseudo": (("new",), (), "single"),
    "ra_bct": (("new",), (), "single"),
    "forward_transform": (("new",), (), "single"),
    "rank_merge": (("old", "new"), (), "mixed"),
    "rank_merge_calibrated": (("old", "new"), ("calibration",), "mixed_calibrated"),
    "reverse_transform": (("new",), ("psi",), "mixed"),
    "mct_no_rho": (("new",), ("psi",), "mixed"),
    "mct": (("new",), ("psi", "rho"), "mixed"),
    "mct_old_neg": (("new",), ("psi", "rho"), "mixed"),
    "mct_new_neg": (("new",), ("psi", "rho"), "mixed"),
}


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up (allocations, faiss and MKL thread pools)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def _fold(x: np.ndarray, theta: float) -> np.ndarray:
    """``[cos θ · x, sin θ]`` per row: a unit vector whose inner products carry an affine score map."""
    return np.hstack([np.cos(theta) * x, np.full((len(x), 1), np.sin(theta), dtype=x.dtype)]).astype(np.float32)


def _unit(rng, n, d) -> np.ndarray:
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@torch.no_grad()
def measure(batch: int = 64, gallery: int = 10_000, dim: int = 128, k: int = 10, repeats: int = 7, seed: int = 0) -> dict:
    """Median seconds of each strategy's query pipeline and its ratio to one new-model pass."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    spec = ModelSpec("resnet18", dim)
    backbones = {role: build_model(spec, (3, 32, 32), 100, seed=i).eval() for i, role in enumerate(("old", "new"))}
    heads = {"psi": reverse_transformation(dim, dim).eval(), "rho": ResidualEmbedding(dim).eval()}
    images = torch.randn(batch, 3, 32, 32)
    single = Gallery(dim)
    single.add(_unit(rng, gallery, dim))
    mixed = MixedGallery(_unit(rng, gallery, dim), new_dim=dim)
    half = rng.permutation(gallery)[: gallery // 2]
    new_half = _unit(rng, len(half), dim)
    mixed.backfill(half, new_half)
    # Calibrated rank merge: maps of the size the Platt fits give on digits (the cost does not
    # depend on their values); the stored vectors are folded once, offline.
    (tq_old, tg_old), (tq_new, tg_new) = fold_affine_scores([(9.0, -4.0), (97.0, -80.0)])
    mixed_cal = MixedGallery(_fold(_unit(np.random.default_rng(seed + 1), gallery, dim), tg_old), new_dim=dim + 1)
    mixed_cal.backfill(half, _fold(new_half, tg_new))

    def pipeline(name: str):
        models, head_names, index = PIPELINES[name]

        def run():
            z = {role: backbones[role].embed(images) for role in models}
            if index == "single":
                return single.search(z[models[0]].numpy(), k)
            if index == "mixed_calibrated":
                return mixed_cal.search(_fold(z["old"].numpy(), tq_old), _fold(z["new"].numpy(), tq_new), k)
            q_new = z["new"]
            q_old = z["old"] if "old" in z else heads["psi"](q_new)
            if "rho" in head_names:
                q_new = heads["rho"](q_new)
            return mixed.search(q_old.numpy(), q_new.numpy(), k)
        return run

    reference = _median_seconds(lambda: backbones["new"].embed(images), repeats)
    seconds = {name: _median_seconds(pipeline(name), repeats) for name in PIPELINES}
    return {
        "reference": "one new-model (ResNet-18) forward pass of the query batch",
        "setup": {"batch": batch, "image": [3, 32, 32], "model": "resnet18", "embed_dim": dim, "gallery": gallery,
                  "backfill_ratio": 0.5, "k": k, "repeats": repeats, "torch_threads": torch.get_num_threads(),
                  "device": "cpu", "python": platform.python_version(), "torch": torch.__version__},
        "reference_seconds": reference,
        "seconds": seconds,
        "ratios": {name: s / reference for name, s in seconds.items()},
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--gallery", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "results" / "query_cost.json"))
    args = parser.parse_args(argv)
    result = measure(batch=args.batch, gallery=args.gallery, repeats=args.repeats)
    print(f"one new-model pass of {args.batch} queries: {1000 * result['reference_seconds']:.1f} ms")
    for name, ratio in result["ratios"].items():
        print(f"{name:<18} {ratio:5.2f} × new pass   ({1000 * result['seconds'][name]:.1f} ms)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
