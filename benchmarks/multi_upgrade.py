"""Several upgrades in a row on digits: v1 → v2 is 60 % backfilled when v3 arrives; curves of the second backfill.

Versions (ours, chosen so that each upgrade adds classes): v1 = small_cnn d=32 trained on digits
0–3, v2 = small_cnn d=32 on 0–6, v3 = small_cnn d=32 on all ten (the preset's new model, cached as
``new``); each with its own initial weights, the preset's schedule. The first backfill (v1 → v2)
rewrote the first 60 % of a random order (seed ``s``) with raw v2 vectors; then v3 arrives and the
second backfill rewrites items with raw v3 vectors, whatever they were stored as, in another
random order (seed ``1000 + s``). Every strategy stores the same vectors (ρ = identity
everywhere), so only the query side differs. Test split = queries = gallery, leave-one-out, all
ten classes relevant by label; 11 ratios of the second backfill; seeds 0, 1, 2. The ψ heads train
on cached training-split embeddings with the library's defaults (``MethodParams()``: 1,000 steps,
τ = 0.2, λ_rt = 0). Relative gain (ours) = (AUC − mAP v1/v1) / (mAP v3/v3 − mAP v1/v1); negative
flips are counted against v1/v1 top-1 (and, separately, against each strategy's own start).

    OMP_NUM_THREADS=1 python benchmarks/multi_upgrade.py [--seeds 0,1,2] [--cache DIR] [--out results/multi_upgrade.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from backfill_lib import transforms as tf
from backfill_lib.backfill import DEFAULT_RATIOS, backfill_order
from backfill_lib.context import ExperimentContext
from backfill_lib.data import load_dataset
from backfill_lib.evaluation import evaluate_version_states
from backfill_lib.metrics import auc, negative_flip_rate
from backfill_lib.versions import (MultiVersionStrategy, evaluate_versions, fit_multi_reverse, multi_rank_merge,
                                   multi_reverse_heads, storage_states)

FIRST_AT = 0.6
VERSION_CLASSES = {"v1": range(4), "v2": range(7), "v3": range(10)}
DESCRIPTIONS = {
    "rank_merge": "rank merge over three spaces: φ1(q), φ2(q), φ3(q) against v1-, v2-, v3-stored items",
    "reverse_direct": "ψ̂31(φ3(q)) against v1-stored, ψ̂32(φ3(q)) against v2-stored, φ3(q) against v3-stored "
                      "(each ψ with L_rt)",
    "reverse_chained": "ψ̂21(ψ̂32(φ3(q))) against v1-stored (ψ21 from the first upgrade), ψ̂32(φ3(q)) against "
                       "v2-stored, φ3(q) against v3-stored (L_rt)",
    "mct_pairwise": "ψ31 and ψ32 each trained with two-set L_mc (v1 with v3, v2 with v3), ρ = identity",
    "mct_chained": "ψ̂21 ∘ ψ̂32 against v1-stored, both trained with two-set L_mc (ψ21 at the first upgrade)",
    "mct3": "ψ31 and ψ32 trained together with L_mc over the three stored sets (one softmax), ρ = identity",
}
PASSES = {"rank_merge": 3}


def _mean_std(values) -> dict:
    values = np.asarray(values, dtype=float)
    return {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0}


def _loo_map(query, gallery, labels) -> float:
    """mAP of query vectors against one stored space, leave-one-out (one state, one version)."""
    m = evaluate_version_states([query], [gallery], np.zeros((1, len(gallery)), dtype=int), labels, labels,
                                exclude_self=True, ks=(1,), device="numpy")
    return float(np.nanmean(m.ap[0])), m.hits[1][0]


def run_seed(data, seed: int, cache, bar) -> dict:
    ctx = ExperimentContext(data, seed=seed, cache=cache, progress=False)
    spec = ctx.preset.old
    assert spec == ctx.preset.new, "the digits preset's old and new specs are the same small_cnn"
    names = {"v1": "v1", "v2": "v2", "v3": "new"}
    for v in ("v1", "v2"):
        c = VERSION_CLASSES[v]
        ctx.train_model(v, spec, classes=c, what=f"{v} {spec.arch} d={spec.embed_dim} on classes {c[0]}-{c[-1]}")
    ctx.model("new")
    bar.update()
    test = {v: ctx.embeddings(n) for v, n in names.items()}
    train = {v: ctx.embeddings(n, "train") for v, n in names.items()}
    y_train, y = data.train_labels, data.test_labels
    params = ctx.params
    d = {v: e.shape[1] for v, e in test.items()}

    def pair_head(src, dst, objective):
        kw = {} if objective == "rt" else dict(labels=y_train, tau=params.mct_tau, lam_rt=params.mct_lambda_rt)
        heads = ctx.fit_head(
            f"multi_psi_{src}_{dst}_{objective}", f"ψ {src}→{dst} ({objective}) on cached embeddings",
            build=lambda: tf.CompatibilityHeads(d[src], d[dst], False),
            fit=lambda: tf.fit_reverse_transform(train[src], train[dst], objective=objective, config=ctx.transform_config,
                                                 steps=params.transform_steps, device=ctx.device, **kw),
            uses=(names[src], names[dst]),
            extra_key={"objective": objective, **({"tau": params.mct_tau, "lam_rt": params.mct_lambda_rt}
                                                  if objective == "mc" else {})})
        bar.update()
        return lambda x: tf.apply_transform(heads.psi, x)

    psi = {(s, t, o): pair_head(s, t, o) for o in ("rt", "mc") for s, t in (("v2", "v1"), ("v3", "v1"), ("v3", "v2"))}
    joint = ctx.fit_head(
        "multi_psi_v3_joint_mc3", "ψ31, ψ32 together, L_mc over three stored sets",
        build=lambda: multi_reverse_heads(d["v3"], [d["v1"], d["v2"]]),
        fit=lambda: fit_multi_reverse(train["v3"], [train["v1"], train["v2"]], y_train, tau=params.mct_tau,
                                      lam_rt=params.mct_lambda_rt, config=ctx.transform_config,
                                      steps=params.transform_steps, device=ctx.device),
        uses=("new", "v1", "v2"), extra_key={"tau": params.mct_tau, "lam_rt": params.mct_lambda_rt})
    bar.update()

    e1, e2, e3 = test["v1"], test["v2"], test["v3"]
    q = {}
    for o in ("rt", "mc"):
        q[f"31_{o}"] = psi["v3", "v1", o](e3)
        q[f"32_{o}"] = psi["v3", "v2", o](e3)
        q[f"321_{o}"] = psi["v2", "v1", o](q[f"32_{o}"])
        q[f"21_{o}"] = psi["v2", "v1", o](e2)
    q["31_mc3"], q["32_mc3"] = (tf.apply_transform(m, e3) for m in joint)
    gallery = (e1, e2, e3)
    strategies = [
        multi_rank_merge(list(gallery)),
        MultiVersionStrategy("reverse_direct", (q["31_rt"], q["32_rt"], e3), gallery, queries_are_gallery=True),
        MultiVersionStrategy("reverse_chained", (q["321_rt"], q["32_rt"], e3), gallery, queries_are_gallery=True),
        MultiVersionStrategy("mct_pairwise", (q["31_mc"], q["32_mc"], e3), gallery, queries_are_gallery=True),
        MultiVersionStrategy("mct_chained", (q["321_mc"], q["32_mc"], e3), gallery, queries_are_gallery=True),
        MultiVersionStrategy("mct3", (q["31_mc3"], q["32_mc3"], e3), gallery, queries_are_gallery=True),
    ]
    refs = {f"{v}/{v}": _loo_map(test[v], test[v], y) for v in ("v1", "v2", "v3")}
    ref_top1 = refs["v1/v1"][1]
    n = len(y)
    initial = storage_states(np.zeros(n, dtype=int), backfill_order(n, seed), [FIRST_AT], 1)[0]
    order2 = backfill_order(n, 1000 + seed)
    out = {"reference_map": {k: v[0] for k, v in refs.items()}, "strategies": {},
           "stored_at_start": {f"v{v + 1}": int((initial == v).sum()) for v in range(3)}}
    m11, m33 = refs["v1/v1"][0], refs["v3/v3"][0]
    for s in strategies:
        c = evaluate_versions(s, y, initial=initial, new_version=2, order=order2, reference_top1=ref_top1,
                              device="numpy")
        own = [negative_flip_rate(c.per_query_top1[0], h) for h in c.per_query_top1]
        out["strategies"][s.name] = {"curve_map": c.map.tolist(), "curve_top1": c.top1.tolist(),
                                     "auc": c.auc_map, "relative_gain": c.relative_gain(m11, m33),
                                     "max_negative_flip": float(c.negative_flips.max()),
                                     "max_negative_flip_vs_start": float(max(own)),
                                     "backbone_passes": s.backbone_passes,
                                     # sag: how far the curve falls below the straight line from r = 0 to r = 1
                                     "max_sag": float(np.max(c.map[0] + c.ratios * (c.map[-1] - c.map[0]) - c.map)),
                                     "min_below_start": float(c.map[0] - c.map.min())}
        bar.update()

    def psi_quality(query, target):
        return {"cosine": float(np.mean(np.sum(query * target, axis=1))), "map": _loo_map(query, target, y)[0]}

    out["psi"] = {
        "v3_v1": {"direct": psi_quality(q["31_rt"], e1), "chained": psi_quality(q["321_rt"], e1),
                  "direct_mc": psi_quality(q["31_mc"], e1), "chained_mc": psi_quality(q["321_mc"], e1),
                  "joint_mc3": psi_quality(q["31_mc3"], e1)},
        "v3_v2": {"direct": psi_quality(q["32_rt"], e2), "direct_mc": psi_quality(q["32_mc"], e2),
                  "joint_mc3": psi_quality(q["32_mc3"], e2)},
        "v2_v1": {"direct": psi_quality(q["21_rt"], e1), "direct_mc": psi_quality(q["21_mc"], e1)},
    }
    out["trained"] = ctx.trained
    return out


def engine_speed(n: int = 4000, seed: int = 0) -> dict:
    """Seconds of the K-version engine (3 versions, 11 states of a second backfill) against one argsort."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 50, size=n)
    spaces = [rng.normal(size=(n, 32)).astype(np.float32) for _ in range(3)]
    spaces = [x / np.linalg.norm(x, axis=1, keepdims=True) for x in spaces]
    initial = storage_states(np.zeros(n, dtype=int), rng.permutation(n), [FIRST_AT], 1)[0]
    versions = storage_states(initial, rng.permutation(n), DEFAULT_RATIOS, 2)
    t_sort, t_engine = [], []
    for _ in range(3):  # alternated, minimum of three
        t0 = time.perf_counter()
        np.argsort(spaces[0] @ spaces[0].T, axis=1)
        t_sort.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        evaluate_version_states(spaces, spaces, versions, y, y, exclude_self=True, device="numpy")
        t_engine.append(time.perf_counter() - t0)
    return {"n": n, "versions": 3, "states": len(DEFAULT_RATIOS), "argsort_seconds": min(t_sort),
            "engine_seconds": min(t_engine), "engine_over_argsort": min(t_engine) / min(t_sort)}


def write_markdown(result: dict, path: Path) -> None:
    v = result["versions"]
    lines = ["# Several upgrades in a row (digits)", "",
             f"Written by `{result['command']}`. {result['protocol']}", "",
             "Reference mAP (leave-one-out, test split, mean ± std over seeds): "
             + ", ".join(f"{k} {r['mean']:.3f} ± {r['std']:.3f}" for k, r in result["reference_map"].items()) + ".",
             "", f"Versions: " + "; ".join(f"{k}: {x['model']} on classes {x['classes']}" for k, x in v.items()) + ".",
             "", "## Second backfill (v3 replacing whatever is stored)", "",
             "Mean over seeds. Max sag: the largest distance of the mAP curve below the straight line from its "
             "r = 0 to its r = 1 value. Negative flips: share of queries whose top-1 is right under v1/v1 (or at "
             "the strategy's own r = 0) and wrong at r.", "",
             "| strategy | backbone passes | mAP at r = 0 | mAP at r = 0.5 | mAP at r = 1 | relative gain | "
             "max sag | max negative flips vs v1/v1 | max negative flips vs start |", "|---|---|---|---|---|---|---|---|---|"]
    for name, s in result["strategies"].items():
        c = s["curve_map_mean"]
        lines.append(f"| {name} | {s['backbone_passes']} | {c[0]:.3f} | {c[5]:.3f} | {c[-1]:.3f} | "
                     f"{s['relative_gain']['mean']:.3f} ± {s['relative_gain']['std']:.3f} | {s['max_sag']['mean']:.3f} | "
                     f"{100 * s['max_negative_flip']['mean']:.1f} % | {100 * s['max_negative_flip_vs_start']['mean']:.1f} % |")
    lines += ["", "mAP curves of the second backfill (mean over seeds; per-seed curves in the JSON):", "",
              "| strategy | " + " | ".join(f"r = {r:g}" for r in result["ratios"]) + " |",
              "|---|" + "---|" * len(result["ratios"])]
    for name, s in result["strategies"].items():
        lines.append(f"| {name} | " + " | ".join(f"{m:.3f}" for m in s["curve_map_mean"]) + " |")
    lines += ["", "## The maps into older spaces (test split)", "",
              "Cosine: mean of ψ̂(·) · target over test items. mAP: the mapped query against the whole target-"
              "version gallery, leave-one-out.", "", "| map | variant | cosine to target | mAP |", "|---|---|---|---|"]
    for key, variants in result["psi"].items():
        for name, m in variants.items():
            lines.append(f"| {key.replace('_', ' → ')} | {name} | {m['cosine']['mean']:.3f} ± {m['cosine']['std']:.3f} | "
                         f"{m['map']['mean']:.3f} ± {m['map']['std']:.3f} |")
    c = result["compute"]
    lines += ["", f"Compute: {c['seconds']:.0f} s for this run on a shared 2-core CPU, one thread; "
                  f"{c['cached_parts']} of {c['parts']} models and heads came from the checkpoint cache, whose "
                  f"original training took {c['original_training_seconds']:.0f} s in all."]
    sp = result.get("engine_speed")
    if sp:
        lines += ["", f"Engine speed (synthetic, N = {sp['n']:,}, 3 versions, {sp['states']} states, leave-one-out, "
                      f"one thread): {sp['engine_seconds']:.2f} s, {sp['engine_over_argsort']:.1f}× one row-wise "
                      f"argsort of the N × N score matrix ({sp['argsort_seconds']:.2f} s)."]
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--cache", default=None)
    parser.add_argument("--no-speed", action="store_true", help="skip the engine timing")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "results" / "multi_upgrade.json"))
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    data = load_dataset("digits")
    start = time.perf_counter()
    per_seed = []
    with tqdm(total=len(seeds) * (1 + 6 + 1 + len(DESCRIPTIONS)), desc="multi-upgrade") as bar:
        for seed in seeds:
            per_seed.append(run_seed(data, seed, args.cache, bar))
    spec = ExperimentContext(data, seed=0, cache=args.cache, progress=False).preset.old
    result = {
        "command": "python benchmarks/multi_upgrade.py" + (f" --seeds {args.seeds}" if args.seeds != "0,1,2" else ""),
        "protocol": " ".join(__doc__.split("\n\n")[1].split()),
        "seeds": seeds,
        "versions": {v: {"model": f"{spec.arch} d={spec.embed_dim}", "classes": f"{c[0]}-{c[-1]}",
                         "cache_name": {"v3": "new"}.get(v, v)} for v, c in VERSION_CLASSES.items()},
        "first_backfill_at": FIRST_AT,
        "stored_at_start": per_seed[0]["stored_at_start"],
        "ratios": list(DEFAULT_RATIOS),
        "reference_map": {k: _mean_std([p["reference_map"][k] for p in per_seed]) for k in per_seed[0]["reference_map"]},
        "strategies": {},
    }
    for name in DESCRIPTIONS:
        rows = [p["strategies"][name] for p in per_seed]
        curves = [r["curve_map"] for r in rows]
        result["strategies"][name] = {
            "description": DESCRIPTIONS[name], "backbone_passes": rows[0]["backbone_passes"],
            "relative_gain": _mean_std([r["relative_gain"] for r in rows]),
            "per_seed_gain": [r["relative_gain"] for r in rows],
            "max_negative_flip": _mean_std([r["max_negative_flip"] for r in rows]),
            "max_negative_flip_vs_start": _mean_std([r["max_negative_flip_vs_start"] for r in rows]),
            "auc_map": _mean_std([r["auc"] for r in rows]),
            "max_sag": _mean_std([r["max_sag"] for r in rows]),
            "min_below_start": _mean_std([r["min_below_start"] for r in rows]),
            "curve_map": curves, "curve_map_mean": np.mean(curves, axis=0).tolist(),
            "curve_top1_mean": np.mean([r["curve_top1"] for r in rows], axis=0).tolist(),
        }
    result["psi"] = {key: {name: {m: _mean_std([p["psi"][key][name][m] for p in per_seed]) for m in ("cosine", "map")}
                           for name in variants} for key, variants in per_seed[0]["psi"].items()}
    result["psi_v3_v1"] = result["psi"]["v3_v1"]  # the contract's name
    result["trained"] = {str(s): p["trained"] for s, p in zip(seeds, per_seed)}
    records = [r for p in per_seed for r in p["trained"].values()]
    result["compute"] = {"seconds": time.perf_counter() - start, "parts": len(records),
                         "cached_parts": sum(bool(r["cached"]) for r in records),
                         "original_training_seconds": float(sum(r["seconds"] or 0.0 for r in records)),
                         "note": "seconds: this run (models and heads from the cache are loaded, not trained); "
                                 "original_training_seconds: sum of the recorded training times of every part"}
    if not args.no_speed:
        result["engine_speed"] = engine_speed()
    result["machine"] = {"python": sys.version.split()[0], "numpy": np.__version__}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    write_markdown(result, out.with_suffix(".md"))
    print(out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
