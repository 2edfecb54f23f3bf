"""Why merged rankings fail or work: score statistics of relevant and irrelevant items in each space.

For each strategy, the scores of a query against items stored *old* (``query_old · gallery_old``)
and against backfilled items (``query_new · gallery_new``), split into relevant (same label, not
the query itself) and irrelevant pairs, on the digits test split. A merged ranking is good when
every relevant score, in either space, lies above every irrelevant score in *both* spaces.
Also prints ``cos(ĥ(φ_o(x)), φ_n(x))`` of the forward transformation. Writes
``results/score_distributions.json``.

    python benchmarks/score_distributions.py [--seeds 0,1,2] [--cache DIR]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from backfill_lib.data import load_dataset
from backfill_lib.strategies import ExperimentContext, build_strategy

STRATEGIES = ("rank_merge", "reverse_transform", "mct", "mct_old_neg", "mct_new_neg", "mct_no_rho", "forward_transform")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--cache", default=None)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "results" / "score_distributions.json"))
    args = parser.parse_args(argv)
    data = load_dataset("digits")
    y = data.test_labels
    relevant = y[:, None] == y[None, :]
    np.fill_diagonal(relevant, False)
    irrelevant = y[:, None] != y[None, :]
    stats = {name: [] for name in STRATEGIES}
    for seed in (int(s) for s in args.seeds.split(",")):
        ctx = ExperimentContext(data, seed=seed, cache=args.cache, progress=False)
        for name in STRATEGIES:
            s = build_strategy(name, ctx)
            old, new = s.query_old @ s.gallery_old.T, s.query_new @ s.gallery_new.T
            stats[name].append({f"{space}_{kind}": [float(m[mask].mean()), float(m[mask].std())]
                                for space, m in (("old_stored", old), ("new_stored", new))
                                for kind, mask in (("relevant", relevant), ("irrelevant", irrelevant))})
            if name == "forward_transform":
                stats[name][-1]["cos_h_old_new"] = float((s.gallery_old * s.gallery_new).sum(axis=1).mean())
    summary = {name: {k: np.mean([r[k] for r in rows], axis=0).round(3).tolist() for k in rows[0]}
               for name, rows in stats.items()}
    print("mean ± std of scores (inner products), averaged over seeds")
    print(f"{'strategy':<18} {'old-stored rel.':>16} {'old-stored irrel.':>18} {'new-stored rel.':>16} {'new-stored irrel.':>18}")
    for name, s in summary.items():
        cells = [f"{s[k][0]:.3f} ± {s[k][1]:.3f}" for k in ("old_stored_relevant", "old_stored_irrelevant",
                                                               "new_stored_relevant", "new_stored_irrelevant")]
        print(f"{name:<18} {cells[0]:>16} {cells[1]:>18} {cells[2]:>16} {cells[3]:>18}")
    print(f"forward transformation: cos(ĥ(φ_o(x)), φ_n(x)) on test items = {summary['forward_transform']['cos_h_old_new']:.3f}")
    Path(args.out).write_text(json.dumps({"dataset": "digits", "seeds": args.seeds, "summary": summary}, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
