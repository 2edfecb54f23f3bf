"""Fast tests of benchmarks/tune_methods.py and benchmarks/which_method_when.py (pure parts, tiny runs)."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import tune_methods as tm  # noqa: E402
import which_method_when as wmw  # noqa: E402

from backfill_lib.experiment import run_experiment  # noqa: E402
from backfill_lib.strategies import PRESETS, MethodParams  # noqa: E402

DEFAULTS = MethodParams()


# --- sweep points, fixed in advance (CONTRACTS.md) ------------------------------------------------

def test_sweep_points_are_the_contracts_and_reference_is_the_preset():
    points = wmw.sweep_points()
    ref = PRESETS["digits"].old
    assert points[0]["axis"] == "reference"
    assert points[0]["old_spec"] == ref.to_dict() and points[0]["old_classes"] == "0-4"
    by_axis = {}
    for p in points:
        by_axis.setdefault(p["axis"], []).append(p)
    assert [p["old_spec"]["embed_dim"] for p in by_axis["d_old"]] == [4, 8, 16]
    assert all(p["old_spec"]["arch"] == "small_cnn" and p["old_classes"] == "0-4" for p in by_axis["d_old"])
    assert [p["old_classes"] for p in by_axis["old_classes"]] == ["0-1", "0-7"]
    assert all(p["old_spec"] == ref.to_dict() for p in by_axis["old_classes"])
    assert [(p["old_spec"]["arch"], p["old_spec"]["embed_dim"], p["old_classes"]) for p in by_axis["old_arch"]] \
        == [("mlp", 32, "0-4")]
    assert len({p["label"] for p in points}) == len(points) == 7
    # With the reference, every axis has exactly its fixed values.
    assert sorted([32] + [p["value"] for p in by_axis["d_old"]]) == list(wmw.AXES["d_old"])
    assert sorted([5] + [p["value"] for p in by_axis["old_classes"]]) == list(wmw.AXES["old_classes"])


def test_point_preset_changes_only_the_old_model():
    base = PRESETS["digits"]
    for p in wmw.sweep_points():
        preset = wmw.point_preset(p)
        assert preset.old.to_dict() == p["old_spec"]
        assert (preset.new, preset.new_heterogeneous, preset.train) == (base.new, base.new_heterogeneous, base.train)


# --- linear probe ---------------------------------------------------------------------------------

def test_linear_probe_separates_clusters_and_not_noise():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(10, 8)) * 5
    y_tr, y_te = rng.integers(0, 10, 400), rng.integers(0, 10, 200)
    x_tr, x_te = centres[y_tr] + rng.normal(size=(400, 8)), centres[y_te] + rng.normal(size=(200, 8))
    assert wmw.linear_probe(x_tr, y_tr, x_te, y_te) > 0.95
    noise_tr, noise_te = rng.normal(size=(400, 8)), rng.normal(size=(200, 8))
    assert wmw.linear_probe(noise_tr, y_tr, noise_te, y_te) < 0.25  # chance is 0.1


def test_linear_probe_rejects_mismatched_inputs():
    x = np.zeros((5, 3))
    with pytest.raises(ValueError, match="train_y has 4 labels but there are 5 items"):
        wmw.linear_probe(x, np.arange(4), x, np.arange(5))
    with pytest.raises(ValueError, match="test_x has dimension 4 but 3 is expected"):
        wmw.linear_probe(x, np.arange(5) % 2, np.zeros((5, 4)), np.arange(5) % 2)


# --- search spaces and choices --------------------------------------------------------------------

def test_every_method_gets_the_same_budget_and_its_published_default():
    spaces = tm.search_spaces()
    fields = {f.name for f in dataclasses.fields(MethodParams)}
    for method, settings in spaces.items():
        if method == "rank_merge_calibrated":  # as many as the library has, at most the budget
            assert len(settings) == min(tm.BUDGET, len(tm._calibrations()))
        else:
            assert len(settings) == tm.BUDGET, method
        assert len({tuple(sorted(s.items())) for s in settings}) == len(settings), f"{method} repeats a setting"
        if settings and set(settings[0]) <= fields:
            default = {k: getattr(DEFAULTS, k) for k in settings[0]}
            assert default in settings, f"{method} does not try its published default {default}"
    assert 10.0 in tm.grid_of(spaces["bct"])["bct_lambda"]
    assert 10.0 in tm.grid_of(spaces["bct_pseudo"])["bct_pseudo_lambda"]
    assert set(tm.grid_of(spaces["ra_bct"])) == {"ra_bct_lambda", "ra_bct_tau", "ra_bct_topk"}


def test_available_names_what_is_missing():
    assert "not registered" in tm.available("no_such_strategy", [{"bct_lambda": 1.0}])
    assert "no field nope" in tm.available("bct", [{"nope": 1}])
    assert tm.available("bct", [{"bct_lambda": 1.0}]) is None


def test_choose_takes_the_best_and_the_first_of_ties():
    rows = [{"k": 1, "gain_mean": 0.5}, {"k": 2, "gain_mean": 0.7}, {"k": 3, "gain_mean": 0.7}]
    assert tm.choose(rows)["k"] == 2
    with pytest.raises(ValueError, match="empty"):
        tm.choose([])


def test_shared_fields_and_per_strategy_steps():
    per = {"reverse_transform": {"transform_steps": 250}, "forward_transform": {"transform_steps": 2000},
           "bct": {"bct_lambda": 3.0}, "mct": {"mct_tau": 0.1, "mct_lambda_rt": 0.0}}
    shared, conflicts = tm._merge_params(per)
    assert shared == {"bct_lambda": 3.0, "mct_tau": 0.1, "mct_lambda_rt": 0.0}
    assert conflicts == {"transform_steps": {"reverse_transform": 250, "forward_transform": 2000}}
    tuning = {"method_params": shared, "per_strategy": per}
    assert tm.params_for("forward_transform", tuning).transform_steps == 2000
    assert tm.params_for("reverse_transform", tuning).transform_steps == 250
    assert tm.params_for("mct_no_rho", tuning).mct_tau == 0.1  # the ablations take mct's values
    rank_merge = tm.params_for("rank_merge", tuning)
    assert rank_merge.transform_steps == DEFAULTS.transform_steps and rank_merge.bct_lambda == 3.0
    with pytest.raises(ValueError, match="does not have"):
        tm.params_for("bct", {"method_params": {"no_such_field": 1}})


# --- the tuned experiment and its summary, on the synthetic dataset --------------------------------

def test_tuned_experiment_uses_each_strategys_params_and_gains_agree():
    tuning = {"method_params": {}, "per_strategy": {"reverse_transform": {"transform_steps": 30}}}
    names = ["old", "offline", "rank_merge", "reverse_transform"]
    r = tm.run_tuned_experiment(tuning, names, dataset="synthetic", seeds=[0, 1], progress=False)
    assert list(r["strategies"]) == names
    assert r["method_params"]["reverse_transform"]["transform_steps"] == 30
    assert r["method_params"]["rank_merge"]["transform_steps"] == DEFAULTS.transform_steps
    assert "30 steps" in r["strategies"]["reverse_transform"]["trained"]["reverse_transform"]["what"]
    summary = wmw.summarise(r, names)  # raises if per-seed gains disagree with the experiment's
    for n in names:
        assert len(summary[n]["per_seed_gain"]) == 2
        assert len(summary[n]["curve_map_mean"]) == len(r["ratios"])
    assert summary["old"]["per_seed_gain"] == pytest.approx([0.0, 0.0], abs=1e-12)
    # Grouping must not change a strategy's numbers: rank merge alone gives the same curve.
    alone = run_experiment("synthetic", strategies=["rank_merge"], seeds=[0, 1], progress=False, new_new=True)
    assert alone["strategies"]["rank_merge"]["curve_map"] == r["strategies"]["rank_merge"]["curve_map"]


def test_figure_data_lays_out_na_as_none():
    cell = {"relative_gain": {"mean": 0.5, "std": 0.1}, "max_negative_flip": {"mean": 0.02, "std": 0.0}}
    points = [{"label": "a", "axis": "reference", "probe": {"mean": 0.9, "std": 0.0},
               "results": {"random": {"bct": cell}}},
              {"label": "b", "axis": "d_old", "probe": {"mean": 0.6, "std": 0.0},
               "results": {"random": {"bct": {"status": "n/a", "reason": "d"}}}}]
    fig = wmw.figure_data(points, ["bct"], ["random"])
    assert fig["probe"] == [0.9, 0.6]
    assert fig["random"]["bct"] == {"gain": [0.5, None], "gain_std": [0.1, None], "worst_flip": [0.02, None]}


# --- Fashion-MNIST (issue 17): dataset-named outputs, the starving points, tiny smoke runs ---------

def test_digits_outputs_and_commands_are_unchanged():
    assert tm.OUTPUTS["digits"] == {"tuning": "tuning", "tuned": "digits_tuned"}
    assert wmw.SWEEPS["digits"][2:] == ("tuning.json", "which_method_when.json")
    assert tm.command("tune_methods.py", "digits", [0, 1, 2]) == "python benchmarks/tune_methods.py --seeds 0,1,2"
    assert tm.command("tune_methods.py", "digits", [0, 1, 2], extra="--experiment-only") \
        == "python benchmarks/tune_methods.py --experiment-only --seeds 0,1,2"
    assert tm.command("which_method_when.py", "fashion_mnist", [0], {"n_train": 300}, 1) \
        == "python benchmarks/which_method_when.py --dataset fashion_mnist --n-train 300 --epochs 1 --seeds 0"
    assert all("old_label_map" not in p for p in wmw.sweep_points())  # the digits points as committed
    assert "offline_rho" in tm.EXPERIMENT_STRATEGIES and "offline_rho" in wmw.STRATEGIES


def test_fashion_sweep_has_the_starving_points_fixed_in_advance():
    from backfill_lib.data import FASHION_MNIST_CLASSES, FASHION_MNIST_COARSE, FASHION_MNIST_COARSE_NAMES

    points = wmw.sweep_points("fashion_mnist")
    ref = PRESETS["fashion_mnist"].old
    assert points[0]["axis"] == "reference" and points[0]["old_spec"] == ref.to_dict()
    assert [p["value"] for p in points if p["axis"] == "d_old"] == [2, 4, 8, 16]
    assert [p["old_classes"] for p in points if p["axis"] == "old_classes"] == ["0-1", "0-7"]
    assert [p["old_spec"]["arch"] for p in points if p["axis"] == "old_arch"] == ["mlp"]
    (coarse,) = [p for p in points if p["axis"] == "old_labels"]
    assert coarse["old_spec"] == ref.to_dict() and coarse["old_label_map"] == list(FASHION_MNIST_COARSE)
    groups = {name: sorted(FASHION_MNIST_CLASSES[c] for c in range(10) if FASHION_MNIST_COARSE[c] == k)
              for k, name in enumerate(FASHION_MNIST_COARSE_NAMES)}
    assert groups == {"tops": sorted(["T-shirt/top", "Pullover", "Dress", "Coat", "Shirt"]),
                      "footwear": sorted(["Sandal", "Sneaker", "Ankle boot"]), "other": sorted(["Trouser", "Bag"])}
    assert len({p["label"] for p in points}) == len(points) == 9
    preset = wmw.point_preset(coarse, "fashion_mnist", epochs=1)
    assert preset.old_label_map == FASHION_MNIST_COARSE and preset.train.epochs == 1
    assert preset.new == PRESETS["fashion_mnist"].new
    assert wmw.point_preset(points[0], "fashion_mnist").old_label_map is None


def test_fashion_validation_split_is_carved_from_training_data(fake_fashion):
    data = tm.validation_data_for("fashion_mnist", {"n_train": 300, "n_test": 200})
    assert data.name == "fashion_mnist-validation"
    assert (len(data.train_labels), len(data.test_labels)) == (200, 100)  # 2/3 train', 1/3 validation of 300
    assert sorted(np.bincount(data.test_labels)) == [10] * 10  # stratified
    with pytest.raises(ValueError, match="unknown dataset"):
        tm.validation_data_for("cifar100")


@pytest.fixture
def fake_fashion(tmp_path, monkeypatch):
    """The fake IDX Fashion-MNIST (tests/fake_fashion_mnist.py) as the data folder."""
    from fake_fashion_mnist import write_fake_fashion_mnist

    write_fake_fashion_mnist(tmp_path / "data", n_train=400, n_test=250)
    monkeypatch.setenv("BACKFILL_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("BACKFILL_CACHE", str(tmp_path / "cache"))
    return tmp_path


def test_fashion_smoke_runs_write_dataset_named_outputs(fake_fashion, tmp_path):
    import json

    out = tmp_path / "results"
    common = ["--dataset", "fashion_mnist", "--n-train", "300", "--n-test", "200", "--epochs", "1", "--seeds", "0"]
    assert tm.main(common + ["--methods", "rank_merge_calibrated", "--out", str(out)]) == 0
    tuning = json.loads((out / "fashion_tuning.json").read_text())
    assert tuning["dataset"] == "fashion_mnist" and tuning["validation"] == {"train": 200, "validation": 100}
    assert tuning["command"].startswith("python benchmarks/tune_methods.py --dataset fashion_mnist --n-train 300")
    assert not (out / "tuning.json").exists()
    assert "rank_merge_calibrated" in tuning["per_strategy"]
    # The coarse point alone (the other points run the same code as the digits sweep), short heads.
    tuning["method_params"]["transform_steps"] = 20
    names = ("old", "offline", "rank_merge", "mct", "offline_rho", "bct", "bct_pseudo", "ra_bct", "forward_transform")
    coarse = [p for p in wmw.sweep_points("fashion_mnist") if p["axis"] == "old_labels"]
    point = wmw.run_point(coarse[0], tuning, names, orders=("random", "uncertain_first"), seeds=(0,),
                          dataset="fashion_mnist", data_kwargs={"n_train": 300, "n_test": 200}, epochs=1)
    for order in ("random", "uncertain_first"):
        assert set(point["results"][order]) == set(names)
    random, uncertain = point["results"]["random"], point["results"]["uncertain_first"]
    assert random["bct"] == {"status": "n/a", "reason": wmw.COARSE_NA["bct"]}
    assert uncertain["bct"] == random["bct"]  # the uncertain-first order runs on the coarse head's softmax
    assert all("relative_gain" in c for n, c in uncertain.items() if n != "bct")
    assert uncertain["mct"] != random["mct"]
    for name in ("mct", "offline_rho", "bct_pseudo", "ra_bct", "forward_transform"):
        assert "relative_gain" in random[name] and "relative_gain_vs_reference" in random[name], name
    assert random["offline_rho"]["relative_gain_vs_reference"]["mean"] == pytest.approx(1.0)
    fig = wmw.figure_data([point], names, ["random", "uncertain_first"])
    assert fig["random"]["bct"]["gain"] == [None] and fig["uncertain_first"]["mct"]["gain"][0] is not None


def test_fashion_which_method_when_cli_needs_fashion_tuning(tmp_path):
    import json

    tuning = tmp_path / "tuning.json"
    tuning.write_text(json.dumps({"method_params": {}, "per_strategy": {}}))  # a digits tuning (no "dataset")
    with pytest.raises(SystemExit):
        wmw.main(["--dataset", "fashion_mnist", "--tuning", str(tuning), "--out", str(tmp_path / "x.json")])
    with pytest.raises(SystemExit):
        tm.main(["--n-train", "300", "--experiment-only", "--out", str(tmp_path)])


# --- a sweep run in parts (--points) and joined (--merge) ------------------------------------------

def _part(labels, seeds=(0, 1, 2), elapsed=10.0):
    cell = {"relative_gain": {"mean": 0.5, "std": 0.1}, "max_negative_flip": {"mean": 0.02, "std": 0.0}}
    points = [{"label": label, "axis": "d_old", "probe": {"mean": 0.9, "std": 0.0},
               "results": {"random": {"bct": dict(cell)}}} for label in labels]
    return {"command": "python benchmarks/which_method_when.py --dataset fashion_mnist --points 1",
            "dataset": "fashion_mnist", "seeds": list(seeds), "method_params": {"bct": {}}, "strategies": ["bct"],
            "orders": ["random"], "points": points, "figure": {}, "elapsed_seconds": elapsed}


def test_merge_joins_parts_in_the_sweeps_order():
    labels = [p["label"] for p in wmw.sweep_points("fashion_mnist")]
    a, b = _part(labels[3:]), _part(labels[:3], elapsed=5.0)
    joined = wmw.merge_parts([a, b], "fashion_mnist")
    assert [p["label"] for p in joined["points"]] == labels
    assert joined["figure"]["labels"] == labels and "missing_points" not in joined
    assert joined["elapsed_seconds"] == 15.0 and len(joined["parts"]) == 2
    assert "--points" not in joined["command"]
    assert wmw.merge_parts([a], "fashion_mnist")["missing_points"] == labels[:3]


@pytest.mark.parametrize("change, match", [(lambda b: b.update(seeds=[0]), "differ in 'seeds'"),
                                           (lambda b: b["points"].__setitem__(0, {**b["points"][0], "label": "x"}),
                                            "not one of this sweep's points"),
                                           (lambda b: b.update(points=_part([wmw.sweep_points(
                                               "fashion_mnist")[0]["label"]])["points"]), "in two parts")])
def test_merge_refuses_parts_that_do_not_belong_together(change, match):
    labels = [p["label"] for p in wmw.sweep_points("fashion_mnist")]
    a, b = _part(labels[:1]), _part(labels[1:2])
    change(b)
    with pytest.raises(ValueError, match=match):
        wmw.merge_parts([a, b], "fashion_mnist")
    with pytest.raises(ValueError, match="not digits"):
        wmw.merge_parts([a], "digits")


@pytest.mark.parametrize("points", ["x", "99", "-1", ""])
def test_points_out_of_range_is_a_clear_error(tmp_path, points, capsys):
    import json

    tuning = tmp_path / "t.json"
    tuning.write_text(json.dumps({"dataset": "fashion_mnist", "method_params": {}, "per_strategy": {}}))
    with pytest.raises(SystemExit):
        wmw.main(["--dataset", "fashion_mnist", "--tuning", str(tuning), "--points", points,
                  "--out", str(tmp_path / "x.json")])
    assert "--points" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


# --- the ρ reference reaches strategies tuned in another group -------------------------------------

def test_fill_reference_gains_recomputes_what_the_experiment_computes():
    import copy
    import json

    result = json.loads((Path(__file__).resolve().parents[1] / "results" / "fashion_tuned.json").read_text())
    measured = {n: s["relative_gain_vs_reference"] for n, s in result["strategies"].items()
                if s.get("status") != "n/a" and s["relative_gain_vs_reference"].get("status") != "n/a"}
    assert {"mct", "rank_merge", "offline_rho"} <= set(measured)
    blank = copy.deepcopy(result)
    for name in measured:
        blank["strategies"][name]["relative_gain_vs_reference"] = {"status": "n/a", "reason": "not run"}
    assert set(tm.fill_reference_gains(blank)) >= set(measured)
    for name, want in measured.items():
        got = blank["strategies"][name]["relative_gain_vs_reference"]
        assert got["mean"] == pytest.approx(want["mean"], abs=1e-12) and got["std"] == pytest.approx(want["std"], abs=1e-12)
    assert blank["strategies"]["forward_transform"]["relative_gain_vs_reference"]["mean"] > 0.5


def test_fill_reference_gains_needs_the_reference_and_old():
    import json

    result = json.loads((Path(__file__).resolve().parents[1] / "results" / "fashion_tuned.json").read_text())
    del result["strategies"]["offline_rho"]
    before = json.dumps(result, sort_keys=True)
    assert tm.fill_reference_gains(result) == []
    assert json.dumps(result, sort_keys=True) == before


def test_fill_point_reference_gains_matches_the_experiment():
    import json

    result = json.loads((Path(__file__).resolve().parents[1] / "results" / "fashion_tuned.json").read_text())
    names = ["old", "offline", "rank_merge", "mct", "offline_rho", "bct", "forward_transform"]
    summary = wmw.summarise(result, names)
    want = {n: dict(summary[n]["relative_gain_vs_reference"]) for n in names}
    for n in names:
        summary[n]["relative_gain_vs_reference"] = {"status": "n/a", "reason": "not run"}
    point = {"label": "reference", "results": {"random": summary}}
    assert {n for _, n in wmw.fill_point_reference_gains(point)} == set(names)
    for n in names:
        got = point["results"]["random"][n]["relative_gain_vs_reference"]
        assert got["mean"] == pytest.approx(want[n]["mean"], abs=1e-9), n
        assert got["std"] == pytest.approx(want[n]["std"], abs=1e-9), n
    assert wmw.fill_point_reference_gains(point) == []  # nothing left to fill
