"""End to end on the synthetic dataset: every method of METHOD §3 through the experiment command."""

import json

import pytest

from backfill_lib.experiment import format_table, main, run_experiment
from backfill_lib.strategies import STRATEGY_REGISTRY

METHODS = ("old", "offline", "rank_merge", "new_on_old", "bct", "ra_bct", "reverse_transform", "mct", "mct_old_neg",
           "mct_new_neg", "mct_no_rho", "forward_transform")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("checkpoints")


@pytest.fixture(scope="module")
def homogeneous(cache):
    return run_experiment("synthetic", strategies=METHODS, seeds=[0], cache=cache, progress=False)


def _gain(result, name):
    return result["strategies"][name]["relative_gain"]["mean"]


def test_every_method_is_registered():
    assert set(METHODS) <= set(STRATEGY_REGISTRY)


def test_mct_beats_rank_merge_beats_incompatible_search(homogeneous):
    assert _gain(homogeneous, "mct") > _gain(homogeneous, "rank_merge") + 0.1
    assert _gain(homogeneous, "rank_merge") > _gain(homogeneous, "new_on_old")


def test_backbone_passes_and_what_is_trained(homogeneous):
    s = homogeneous["strategies"]
    assert s["rank_merge"]["backbone_passes"] == 2
    assert all(s[name]["backbone_passes"] == 1 for name in METHODS if name != "rank_merge")
    assert "new_bct" in s["bct"]["trained"] and "new_ra_bct" in s["ra_bct"]["trained"]
    assert "L_mc (negatives: both" in s["mct"]["trained"]["mct"]["what"]
    assert "L_rt" in s["reverse_transform"]["trained"]["reverse_transform"]["what"]
    assert s["mct_no_rho"]["trained"]["mct_no_rho"]["what"].startswith("ψ on")


def test_learnable_rho_is_what_gets_backfilled(homogeneous):
    # with ρ = identity, r = 1 is exactly new/new; with ρ learnt it may differ, but stays close
    s, new_new = homogeneous["strategies"], homogeneous["new_new"]["map"]["mean"]
    assert s["mct_no_rho"]["map_at"]["1.0"]["mean"] == pytest.approx(new_new, abs=1e-6)
    assert s["mct"]["map_at"]["1.0"]["mean"] == pytest.approx(new_new, abs=0.02)


def test_heterogeneous_bct_and_ra_bct_are_not_applicable(cache):
    result = run_experiment("synthetic", strategies=("rank_merge", "bct", "ra_bct", "reverse_transform"), seeds=[0],
                            setting="heterogeneous", cache=cache, progress=False)
    for name in ("bct", "ra_bct"):
        assert result["strategies"][name]["status"] == "n/a"
        assert "d_n = d_o" in result["strategies"][name]["reason"]
    assert result["strategies"]["reverse_transform"]["backbone_passes"] == 1
    assert "n/a: BCT needs d_n = d_o" in format_table(result, markdown=True)


def test_table_gets_query_cost_from_the_benchmark_file(homogeneous, tmp_path, capsys):
    saved = tmp_path / "result.json"
    saved.write_text(json.dumps(homogeneous))
    cost = tmp_path / "query_cost.json"
    # measured with the models and inputs of this run (the synthetic preset: mlp, d = 16, 32 features)
    setup = {"batch": 64, "gallery": 10, "backfill_ratio": 0.5, "model": "mlp", "embed_dim": 16, "image": [32]}
    cost.write_text(json.dumps({"ratios": {"rank_merge": 2.01, "mct": 1.02}, "reference": "one new pass",
                                "setup": setup}))
    md = tmp_path / "table.md"
    assert main(["--table", str(saved), "--query-cost", str(cost), "--markdown", str(md)]) == 0
    text = md.read_text()
    assert "| query cost |" in text and "| 2.01× |" in text and "| 1.02× |" in text
    # measured on another model: not printed next to this run's numbers
    cost.write_text(json.dumps({"ratios": {"rank_merge": 2.01}, "reference": "one new pass",
                                "setup": {**setup, "model": "resnet18", "embed_dim": 128, "image": [3, 32, 32]}}))
    assert main(["--table", str(saved), "--query-cost", str(cost), "--markdown", str(md)]) == 0
    text = md.read_text()
    assert "| query cost |" not in text and "2.01×" not in text and "measured for resnet18 d=128 on 3×32×32" in text
    capsys.readouterr()
    assert main(["--table", str(saved), "--query-cost", str(tmp_path / "missing.json")]) == 0
    assert "query cost" not in capsys.readouterr().out.splitlines()[1]
