"""Choose the metric-compatible training's τ, λ_rt and epochs on a validation split, never on the test split.

The digits *training* split is cut again (stratified, 2/3 train', 1/3 validation). Old and new
models are trained on train' exactly as in the experiment, ψ and ρ on their cached train'
embeddings, and the relative gain of ``mct`` is measured on the validation items (leave-one-out).
The test split is never loaded into a model. Writes ``results/validation_sweep.json``.

    python benchmarks/validation_sweep.py [--seeds 0,1,2] [--cache DIR]
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np
from sklearn.model_selection import train_test_split
from torch.utils.data import Subset

from backfill_lib.backfill import evaluate_backfill, old_only
from backfill_lib.data import BackfillData, load_dataset
from backfill_lib.strategies import PRESETS, ExperimentContext, MethodParams, build_strategy

GRID = {"mct_tau": (0.1, 0.2, 0.4), "mct_lambda_rt": (0.0, 1.0), "transform_steps": (400, 1200)}
STRATEGIES = ("rank_merge", "reverse_transform", "mct", "mct_old_neg", "mct_new_neg", "mct_no_rho")


def validation_data(setting_seed: int = 0) -> BackfillData:
    """Digits' training split, cut into train' and a validation split that plays the test role."""
    full = load_dataset("digits")
    idx = np.arange(len(full.train_labels))
    tr, va = train_test_split(idx, test_size=1 / 3, stratify=full.train_labels, random_state=setting_seed)
    tr, va = np.sort(tr), np.sort(va)
    return BackfillData("digits-validation", Subset(full.train, tr.tolist()), Subset(full.train_plain, tr.tolist()),
                        Subset(full.train_plain, va.tolist()), full.train_labels[tr], full.train_labels[va],
                        full.num_classes, full.old_classes, full.input_shape,
                        {**full.info, "validation": "1/3 of train, stratified", "validation_seed": setting_seed})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--cache", default=None)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "results" / "validation_sweep.json"))
    args = parser.parse_args(argv)
    data = validation_data()
    labels = data.test_labels
    seeds = [int(s) for s in args.seeds.split(",")]
    contexts = [ExperimentContext(data, seed=s, preset=PRESETS["digits"], cache=args.cache, progress=False) for s in seeds]
    refs = []
    for ctx in contexts:
        oo = evaluate_backfill(old_only(ctx.embeddings("old")), labels, ratios=[0.0])
        nn_ = evaluate_backfill(old_only(ctx.embeddings("new")), labels, ratios=[0.0])
        refs.append((oo.map[0], nn_.map[0], oo.per_query_top1[0]))

    def gains(name: str, params: MethodParams) -> list[float]:
        out = []
        for seed, (oo, nn_, ref) in zip(seeds, refs):
            # A fresh context per setting: a context keeps the heads it fitted by name, so reusing one
            # would return the first setting's head for every setting (the backbones come from the cache).
            ctx = ExperimentContext(data, seed=seed, preset=PRESETS["digits"], cache=args.cache, progress=False,
                                    params=params)
            curve = evaluate_backfill(build_strategy(name, ctx), labels, order_seed=ctx.seed, reference_top1=ref)
            out.append(curve.relative_gain(oo, nn_))
        return out

    rows = []
    for values in itertools.product(*GRID.values()):
        setting = dict(zip(GRID, values))
        g = gains("mct", MethodParams(**setting))
        rows.append({**setting, "gain_mean": float(np.mean(g)), "gain_std": float(np.std(g, ddof=1))})
        print(" ".join(f"{k}={v:<6}" for k, v in setting.items()),
              f"validation relative gain {np.mean(g):.3f} ± {np.std(g, ddof=1):.3f}", flush=True)
    best = max(rows, key=lambda r: r["gain_mean"])
    best_params = MethodParams(**{k: best[k] for k in GRID})
    at_best = {name: float(np.mean(gains(name, best_params))) for name in STRATEGIES}
    print("best:", best, "\nother strategies at the best setting (validation):", at_best)
    result = {"protocol": __doc__.split("\n\n")[1].replace("\n", " "), "seeds": seeds,
              "validation": {"train": len(data.train_labels), "validation": len(labels)}, "grid": GRID,
              "criterion": "mean relative gain of mct on the validation split", "rows": rows, "best": best,
              "strategies_at_best": at_best,
              "old_old_map": float(np.mean([r[0] for r in refs])), "new_new_map": float(np.mean([r[1] for r in refs]))}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
