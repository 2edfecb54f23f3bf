"""The experiment command on a small synthetic problem: JSON shape, reproducibility, CLI."""

import json

import numpy as np
import pytest

from backfill_lib import strategies
from backfill_lib.experiment import format_table, main, run_experiment
from backfill_lib.models import ModelSpec
from backfill_lib.strategies import ExperimentContext, Preset, build_strategy
from backfill_lib.training import TrainConfig

SMALL = Preset(old=ModelSpec("mlp", 8, 8), new=ModelSpec("mlp", 8, 8), new_heterogeneous=ModelSpec("mlp", 12, 8),
               train=TrainConfig(epochs=3, batch_size=32, lr=5e-3))
DATA = {"n_per_class": 16, "dim": 8}
CORE = ("old", "offline", "rank_merge", "new_on_old")


def _run(cache, **kwargs):
    args = dict(dataset="synthetic", strategies=CORE, seeds=(0, 1), cache=cache, progress=False, preset=SMALL,
                data_kwargs=DATA, device="cpu")
    return run_experiment(**{**args, **kwargs})


def _numbers(result):
    """The result without what may differ between identical runs (wall-clock times)."""
    out = json.loads(json.dumps(result))
    out.pop("environment")
    for entry in out["strategies"].values():
        entry.pop("trained", None)
    return out


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache_a")
    return cache, _run(cache)


def test_json_shape(first):
    _, result = first
    # The keys every consumer (plots, tables, the book) relies on; new keys may be added.
    assert set(result) >= {"dataset", "setting", "old_classes", "seeds", "ratios", "models", "old_old", "new_new",
                           "strategies", "environment"}
    assert result["dataset"] == "synthetic" and result["setting"] == "homogeneous"
    assert result["old_classes"] == "0-4" and result["seeds"] == [0, 1] and len(result["ratios"]) == 11
    assert result["models"]["old"] == SMALL.old.to_dict() and result["models"]["train"]["epochs"] == 3
    assert json.loads(json.dumps(result)) == result  # plain JSON types only
    for ref in ("old_old", "new_new"):
        assert set(result[ref]) == {"map", "top1", "top5"}
        assert all(set(v) == {"mean", "std"} for v in result[ref].values())
    assert list(result["strategies"]) == list(CORE)
    for name, entry in result["strategies"].items():
        assert {"description", "backbone_passes", "trained", "auc_map", "auc_top1", "relative_gain",
                "max_negative_flip", "map_at", "ratios", "curve_map", "curve_top1", "curve_top5",
                "curve_negative_flips"} <= set(entry), name
        assert set(entry["map_at"]) == {"0.0", "0.5", "1.0"}
        for key in ("curve_map", "curve_top1", "curve_top5", "curve_negative_flips"):
            assert np.asarray(entry[key]).shape == (2, 11), (name, key)
        assert all(set(v["seconds"]) == {"mean", "std"} for v in entry["trained"].values())
    assert set(result["strategies"]["rank_merge"]["trained"]) == {"old", "new"}


def test_numbers_are_consistent(first):
    _, result = first
    s, oo, nn = result["strategies"], result["old_old"]["map"]["mean"], result["new_new"]["map"]["mean"]
    assert s["rank_merge"]["backbone_passes"] == 2 and s["old"]["backbone_passes"] == 1
    assert s["rank_merge"]["map_at"]["0.0"]["mean"] == pytest.approx(oo)  # r = 0: old/old
    assert s["rank_merge"]["map_at"]["1.0"]["mean"] == pytest.approx(nn)  # r = 1: new/new
    assert s["old"]["relative_gain"]["mean"] == pytest.approx(0.0, abs=1e-9)
    assert s["old"]["max_negative_flip"]["mean"] == 0.0
    curves = np.asarray(s["offline"]["curve_map"])
    np.testing.assert_allclose(curves[:, :-1], curves[:, :1].repeat(10, axis=1))  # a step at r = 1
    for seed_curve in np.asarray(s["rank_merge"]["curve_map"]):
        assert np.all((seed_curve >= 0) & (seed_curve <= 1))


def test_same_call_same_numbers(first, tmp_path):
    cache_a, result = first
    retrained = _run(tmp_path)  # trains every model again from scratch
    assert _numbers(retrained) == _numbers(result)
    loaded = _run(cache_a)  # loads every model from the checkpoint cache
    assert _numbers(loaded) == _numbers(result)


def test_heterogeneous_reports_not_applicable(tmp_path):
    result = _run(tmp_path, seeds=(0,), setting="heterogeneous", strategies=("rank_merge", "new_on_old"),
                  ratios=(0, 0.5, 1))
    assert result["models"]["new"]["embed_dim"] == 12
    entry = result["strategies"]["new_on_old"]
    assert entry["status"] == "n/a" and "differ in size" in entry["reason"]
    assert result["strategies"]["rank_merge"]["ratios"] == [0.0, 0.5, 1.0]
    table = format_table(result)
    assert "new_on_old" in table and "n/a" in table
    assert format_table(result, markdown=True).count("\n| ") >= 3


@pytest.mark.parametrize("kwargs,match", [
    ({"dataset": "mnist"}, "unknown dataset 'mnist'"),
    ({"strategies": ("old", "nope")}, "unknown strategy 'nope'"),
    ({"setting": "mixed"}, "unknown setting 'mixed'"),
    ({"seeds": ()}, "seeds is empty"),
    ({"ratios": (0.5, 1)}, "ratios must include 0 and 1"),
])
def test_bad_arguments(kwargs, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        _run(tmp_path, **kwargs)


def test_build_strategy_unknown_name():
    from backfill_lib.data import load_dataset

    ctx = ExperimentContext(load_dataset("synthetic", **DATA), preset=SMALL, device="cpu", progress=False)
    with pytest.raises(ValueError, match="unknown strategy 'nope'; choose from: old, offline, rank_merge"):
        build_strategy("nope", ctx)
    with pytest.raises(ValueError, match="unknown setting 'mixed'"):
        ExperimentContext(ctx.data, setting="mixed")


class TestCli:
    @pytest.fixture(autouse=True)
    def small_preset(self, monkeypatch):
        # The command line has no --preset: shrink the synthetic preset for the test's duration.
        monkeypatch.setitem(strategies.PRESETS, "synthetic", SMALL)

    def test_writes_json_and_markdown(self, tmp_path, capsys):
        out, md = tmp_path / "res" / "r.json", tmp_path / "res" / "r.md"
        code = main(["--dataset", "synthetic", "--strategies", "old,rank_merge", "--seeds", "0", "--ratios",
                     "0,0.5,1", "--cache", str(tmp_path / "ck"), "--device", "cpu", "--out", str(out),
                     "--markdown", str(md), "--quiet"])
        assert code == 0
        result = json.loads(out.read_text())
        assert list(result["strategies"]) == ["old", "rank_merge"] and result["ratios"] == [0.0, 0.5, 1.0]
        assert "| rank_merge |" in md.read_text()
        printed = capsys.readouterr().out
        assert "rank_merge" in printed and f"wrote {out}" in printed

    def test_unknown_strategy_returns_2(self, tmp_path, capsys):
        code = main(["--dataset", "synthetic", "--strategies", "old,nope", "--cache", str(tmp_path), "--quiet"])
        assert code == 2
        err = capsys.readouterr().err
        assert "error: unknown strategy 'nope'; choose from:" in err and "rank_merge" in err

    def test_bad_numbers_and_unknown_dataset_exit_2(self, capsys):
        with pytest.raises(SystemExit) as exc:
            main(["--seeds", "zero"])
        assert exc.value.code == 2 and "--seeds/--ratios must be comma-separated numbers" in capsys.readouterr().err
        with pytest.raises(SystemExit) as exc:
            main(["--dataset", "mnist"])
        assert exc.value.code == 2 and "invalid choice: 'mnist'" in capsys.readouterr().err


def test_unsorted_ratios_stay_paired_with_curve_values(tmp_path):
    result = _run(tmp_path, seeds=(0,), strategies=("rank_merge",), ratios=(1, 0, 0.5))
    entry = result["strategies"]["rank_merge"]
    at = dict(zip(entry["ratios"], entry["curve_map"][0]))
    assert at[0.0] == pytest.approx(result["old_old"]["map"]["mean"])
    assert at[1.0] == pytest.approx(result["new_new"]["map"]["mean"])
