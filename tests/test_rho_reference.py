"""Issue 17: the ρ reference (``offline_rho``) that separates ρ's two effects, and the gains against it.

``offline_rho`` trains mct's head ρ with mct's budget on the new-space term of ``L_mc`` alone and
stores every item and query through it at once (a flat curve). These tests check that the budget is
the same (one spy on the shared ``train`` call of both fits), that the curve is an offline backfill
of ``ρ_ref(φ_n)``, the loss and the gains against hand computations, and the table.
"""

import copy
import json
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from backfill_lib import experiment, strategies
from backfill_lib import transforms as tf
from backfill_lib.backfill import BackfillCurve, backfill_order, evaluate_backfill, offline_backfill, old_only
from backfill_lib.book import load_result
from backfill_lib.context import MethodParams
from backfill_lib.data import load_dataset
from backfill_lib.experiment import format_table, main, run_experiment
from backfill_lib.losses import multi_compatible_loss
from backfill_lib.metrics import auc
from backfill_lib.models import ModelSpec
from backfill_lib.strategies import (RHO_REFERENCE, ExperimentContext, Preset, build_strategy, fit_rho_reference,
                                     rho_reference_objective)
from backfill_lib.training import TrainConfig

SMALL = Preset(old=ModelSpec("mlp", 8, 8), new=ModelSpec("mlp", 8, 8), new_heterogeneous=ModelSpec("mlp", 12, 8),
               train=TrainConfig(epochs=2, batch_size=32, lr=5e-3))
DATA = {"n_per_class": 16, "dim": 8}
# Few head steps, and a batch smaller than the training set (80 items): two batches per epoch.
PARAMS = MethodParams(transform_steps=24, transform=TrainConfig(epochs=1, batch_size=32, lr=2e-3, weight_decay=1e-4))


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic", **DATA)


def _ctx(data, cache, **kwargs):
    return ExperimentContext(data, preset=SMALL, device="cpu", progress=False, cache=cache,
                             params=kwargs.pop("params", PARAMS), **kwargs)


# --- the same head, the same budget ---------------------------------------------------------------

def test_reference_trains_mcts_head_with_mcts_budget(data, tmp_path, monkeypatch):
    calls = []
    real_train = tf.train

    def spy(model, dataset, config, loss_fn, **kwargs):
        record = {"model": type(model), "rho_start": copy.deepcopy(model.rho.state_dict()),
                  "psi_start": copy.deepcopy(model.psi.state_dict()), "config": config, "kwargs": kwargs,
                  "data": [t.clone() for t in dataset.tensors], "batches": [], "loss_fn": loss_fn}

        def counted(m, x, y):
            record["batches"].append(y.clone())
            return loss_fn(m, x, y)

        calls.append(record)
        out = real_train(model, dataset, config, loss_fn=counted, **kwargs)
        record["model_after"] = model
        return out

    monkeypatch.setattr(tf, "train", spy)  # the one train call both fits go through
    ctx = _ctx(data, tmp_path)
    build_strategy("mct", ctx)
    build_strategy(RHO_REFERENCE, ctx)
    assert len(calls) == 2
    mct, ref = calls
    # The same head, built under the same seed: ρ starts from the same weights.
    assert mct["model"] is ref["model"] is tf.CompatibilityHeads
    for a, b in zip(mct["rho_start"].values(), ref["rho_start"].values()):
        assert torch.equal(a, b)
    # The same budget: optimiser config (lr, weight decay, batch size, epochs, seed), data, batches, steps.
    assert mct["config"] == ref["config"] == ctx.transform_config
    assert {k: v for k, v in mct["kwargs"].items() if k != "desc"} == {k: v for k, v in ref["kwargs"].items()
                                                                       if k != "desc"}
    assert all(torch.equal(a, b) for a, b in zip(mct["data"], ref["data"]))
    n = len(data.train_labels)
    steps = ctx.transform_config.epochs * (n // ctx.transform_config.batch_size)
    assert steps >= PARAMS.transform_steps and n // ctx.transform_config.batch_size > 1
    assert len(mct["batches"]) == len(ref["batches"]) == steps
    assert all(torch.equal(a, b) for a, b in zip(mct["batches"], ref["batches"]))  # the same items, same order
    # The same temperature: the reference's loss is the new-space term of L_mc at mct's τ.
    heads, (x, y) = ref["model_after"], (ref["data"][0][:50], ref["data"][1][:50])
    with torch.no_grad():
        z = heads.rho_hat(x[:, :8])
        assert ref["loss_fn"](heads, x, y).item() == pytest.approx(
            multi_compatible_loss([z], [z], y, PARAMS.mct_tau).item(), rel=1e-6)
    # Only the loss differs: ρ moved, ψ (built for the identical start) was never trained.
    assert not torch.equal(heads.rho.residual[-1].weight, torch.zeros_like(heads.rho.residual[-1].weight))
    for a, b in zip(ref["psi_start"].values(), heads.psi.state_dict().values()):
        assert torch.equal(a.cpu(), b.cpu())
    assert "τ=0.2" in ctx.trained["mct"]["what"] and "τ=0.2" in ctx.trained[RHO_REFERENCE]["what"]
    assert f"{PARAMS.transform_steps} steps" in ctx.trained[RHO_REFERENCE]["what"]


def test_reference_loss_hand_computed():
    # ρ starts at the identity; z = e1, e1, e2 with labels 0, 0, 1; τ = 0.5.
    heads = tf.CompatibilityHeads(2, 3, learn_rho=True)
    new = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([0, 0, 1])
    loss_fn = rho_reference_objective(2, tau=0.5)
    x = torch.cat([new, torch.randn(3, 3)], dim=1)
    # Anchors 0 and 1: positive logit 2 against the negative's 0, j = i left out; anchor 2 has no positive.
    expected = np.log1p(np.exp(-2.0))
    assert loss_fn(heads, x, y).item() == pytest.approx(expected, rel=1e-6)
    # The old columns are never read, and ψ gets no gradient.
    x2 = torch.cat([new, torch.randn(3, 3)], dim=1)
    assert loss_fn(heads, x2, y).item() == loss_fn(heads, x, y).item()
    loss_fn(heads, x, y).backward()
    assert all(p.grad is None for p in heads.psi.parameters())
    assert heads.rho.residual[-1].weight.grad is not None


# --- a flat curve: the offline backfill of ρ_ref(φ_n) ----------------------------------------------

def test_reference_curve_is_flat_and_is_the_offline_backfill_of_rho_ref(data, tmp_path):
    ctx = _ctx(data, tmp_path)
    strategy = build_strategy(RHO_REFERENCE, ctx)
    # ρ_ref fitted again, outside the context, with the same arguments: the same vectors.
    heads = fit_rho_reference(ctx.embeddings("new", split="train"), ctx.embeddings("old", split="train"),
                              data.train_labels, PARAMS.mct_tau, ctx.transform_config, device="cpu")
    rho_ref = tf.apply_transform(heads.rho, ctx.embeddings("new"), "new")
    assert strategy.name == RHO_REFERENCE and strategy.offline and strategy.backbone_passes == 1
    for arr in (strategy.query_old, strategy.gallery_old, strategy.query_new, strategy.gallery_new):
        np.testing.assert_allclose(arr, rho_ref, atol=1e-6)
    labels, order = data.test_labels, backfill_order(len(data.test_labels), 3)
    curve = evaluate_backfill(strategy, labels, order=order)
    assert np.all(curve.map == curve.map[0]) and np.all(curve.top1 == curve.top1[0])
    offline = evaluate_backfill(offline_backfill(rho_ref, rho_ref), labels, order=order)
    stored = evaluate_backfill(old_only(rho_ref), labels, ratios=[0.0])  # everything stored as ρ_ref at once
    np.testing.assert_allclose(curve.map, offline.map, atol=1e-6)
    np.testing.assert_allclose(curve.map, stored.map[0], atol=1e-6)
    assert curve.auc_map == pytest.approx(stored.map[0], abs=1e-6)


# --- the gains, by hand -------------------------------------------------------------------------

def _curve(values):
    r = np.array([0.0, 0.5, 1.0])
    v = np.asarray(values, dtype=float)
    return BackfillCurve("x", r, v, v, v, np.zeros(3))


def test_gains_hand_computed_on_a_tiny_curve():
    # AUC of (0.5, 0.6, 0.9) at r = 0, 0.5, 1: 0.5·(0.5+0.6)/2 + 0.5·(0.6+0.9)/2 = 0.65.
    curves = [_curve([0.5, 0.6, 0.9]), _curve([0.4, 0.6, 0.8])]  # AUC 0.6
    old_old = [{"map": 0.5}, {"map": 0.4}]
    new_new = [{"map": 0.8}, {"map": 0.7}]
    reference = [{"map": 0.9}, {"map": 0.9}]
    g_new = experiment._gain_or_na(curves, old_old, new_new)
    g_ref = experiment._gain_or_na(curves, old_old, reference, top="the ρ reference")
    # (0.65 - 0.5) / (0.8 - 0.5) = 0.5, (0.6 - 0.4) / (0.7 - 0.4) = 2/3; against 0.9: 0.375 and 0.4.
    assert g_new["mean"] == pytest.approx((0.5 + 2 / 3) / 2)
    assert g_ref["mean"] == pytest.approx((0.375 + 0.4) / 2)
    assert g_ref["std"] == pytest.approx(np.std([0.375, 0.4], ddof=1))
    same = experiment._gain_or_na(curves, old_old, [{"map": 0.5}, {"map": 0.9}], top="the ρ reference")
    assert same["status"] == "n/a" and same["reason"].startswith("the ρ reference mAP equals old/old mAP")
    missing = experiment._gain_or_na(curves, old_old, None, "not run", top="the ρ reference")
    assert missing == {"status": "n/a", "reason": "needs the ρ reference, which was not run"}


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    return run_experiment("synthetic", strategies=("old", "offline", "mct", RHO_REFERENCE), seeds=(0, 1),
                          cache=tmp_path_factory.mktemp("cache"), progress=False, preset=SMALL, data_kwargs=DATA,
                          device="cpu", params=PARAMS, ratios=(0, 0.25, 0.5, 0.75, 1))


def test_results_hold_both_gains_and_the_final_map(result):
    assert json.loads(json.dumps(result)) == result
    s, ratios = result["strategies"], result["ratios"]
    oo = [c[0] for c in s["old"]["curve_map"]]  # old/old of each seed
    ref = [c[-1] for c in s[RHO_REFERENCE]["curve_map"]]
    for c in s[RHO_REFERENCE]["curve_map"]:
        assert np.ptp(c) == 0  # flat
    assert result["rho_reference"]["strategy"] == RHO_REFERENCE
    assert result["rho_reference"]["map"]["mean"] == pytest.approx(np.mean(ref))
    assert result["rho_reference"]["top1"]["mean"] == pytest.approx(np.mean([c[-1] for c in
                                                                             s[RHO_REFERENCE]["curve_top1"]]))
    new_new = result["new_new"]["map"]["mean"]
    for name, entry in s.items():
        curves = entry["curve_map"]
        by_hand = [(auc(ratios, c) - o) / (r - o) for c, o, r in zip(curves, oo, ref)]
        assert entry["relative_gain_vs_reference"]["mean"] == pytest.approx(np.mean(by_hand)), name
        assert entry["final_map"]["mean"] == pytest.approx(np.mean([c[-1] for c in curves])), name
        assert entry["final_map"]["mean"] == pytest.approx(entry["map_at"]["1.0"]["mean"])
        assert "relative_gain" in entry  # the gain against new/new stays
    assert s[RHO_REFERENCE]["relative_gain_vs_reference"]["mean"] == pytest.approx(1.0)
    assert s["offline"]["final_map"]["mean"] == pytest.approx(new_new)


def test_table_shows_both_gains(result):
    for markdown in (False, True):
        table = format_table(result, markdown=markdown)
        assert "rel. gain" in table and "rel. gain (ρ ref)" in table
        assert "new/new with the ρ reference head (offline_rho) mAP" in table
    head = next(line for line in format_table(result).splitlines() if line.startswith("strategy"))
    assert head.index("rel. gain") < head.index("rel. gain (ρ ref)") < head.index("max neg. flip")
    row = next(line for line in format_table(result, markdown=True).splitlines() if line.startswith("| mct |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    mct = result["strategies"]["mct"]
    assert cells[-3] == experiment._pm(mct["relative_gain"], 2)
    assert cells[-2] == experiment._pm(mct["relative_gain_vs_reference"], 2)


def test_without_the_reference_results_and_tables_are_as_before(tmp_path):
    plain = run_experiment("synthetic", strategies=("old", "offline"), seeds=(0,), cache=tmp_path, progress=False,
                           preset=SMALL, data_kwargs=DATA, device="cpu", ratios=(0, 0.5, 1))
    assert plain["rho_reference"]["status"] == "n/a" and "add offline_rho" in plain["rho_reference"]["reason"]
    assert plain["strategies"]["offline"]["relative_gain_vs_reference"]["status"] == "n/a"
    assert "ρ ref" not in format_table(plain)
    # A committed result, written before issue 17, still reads and prints with its old columns.
    saved = load_result("digits_homogeneous.json")
    table = format_table(saved)
    assert "ρ ref" not in table and "rel. gain" in table


def test_cli_accepts_the_reference_and_prints_both_gains(tmp_path, monkeypatch, capsys):
    @dataclass(frozen=True)
    class Quick(MethodParams):
        transform_steps: int = 24

    monkeypatch.setitem(strategies.PRESETS, "synthetic", SMALL)
    monkeypatch.setattr(experiment, "MethodParams", Quick)
    out = tmp_path / "r.json"
    code = main(["--dataset", "synthetic", "--strategies", f"old,mct,{RHO_REFERENCE}", "--seeds", "0", "--ratios",
                 "0,0.5,1", "--cache", str(tmp_path / "ck"), "--device", "cpu", "--out", str(out), "--quiet"])
    assert code == 0
    printed = capsys.readouterr().out
    assert RHO_REFERENCE in printed and "rel. gain (ρ ref)" in printed
    assert main(["--table", str(out), "--query-cost", ""]) == 0
    assert "rel. gain (ρ ref)" in capsys.readouterr().out
