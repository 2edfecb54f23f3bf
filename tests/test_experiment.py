"""The experiment command on a small synthetic problem: JSON shape, reproducibility, CLI."""

import json
import subprocess
import sys

import numpy as np
import pytest

import torch

from backfill_lib import experiment, strategies
from backfill_lib.context import MethodParams
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
        assert "error: --strategies: unknown strategy 'nope'; choose from:" in err and "rank_merge" in err

    def test_unknown_dataset_is_one_line(self, capsys):
        with pytest.raises(SystemExit) as exc:
            main(["--dataset", "mnist"])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and err.startswith("error: argument --dataset: invalid choice: 'mnist'")
        assert err.count("\n") == 1


def test_unsorted_ratios_stay_paired_with_curve_values(tmp_path):
    result = _run(tmp_path, seeds=(0,), strategies=("rank_merge",), ratios=(1, 0, 0.5))
    entry = result["strategies"]["rank_merge"]
    at = dict(zip(entry["ratios"], entry["curve_map"][0]))
    assert at[0.0] == pytest.approx(result["old_old"]["map"]["mean"])
    assert at[1.0] == pytest.approx(result["new_new"]["map"]["mean"])


# --- Every option is checked before any work (issue 7) ---------------------------------------------

@pytest.fixture
def no_work(monkeypatch):
    """Make loading data or training fail the test: the checks must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("data were loaded or a model trained before the options were checked")

    monkeypatch.setattr(experiment, "load_dataset", refuse)
    monkeypatch.setattr(ExperimentContext, "train_model", refuse)
    monkeypatch.setitem(strategies.PRESETS, "synthetic", SMALL)


def _cli_error(capsys, argv) -> str:
    """Run the command, which must refuse ``argv`` with one ``error:`` line and status 2; return that line."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("argv,message", [
    (["--strategies", ""], "error: --strategies is empty: give at least one of: old, offline"),
    (["--strategies", " , "], "error: --strategies is empty"),
    (["--strategies", "old,old"], "error: --strategies lists 'old' twice"),
    (["--seeds=-1"], "error: --seeds must be an integer seed in 0 .. 2**32 - 1, got -1"),
    (["--seeds", "0,1.5"], "error: --seeds must be comma-separated non-negative integers, e.g. 0,1,2 (got '0,1.5')"),
    (["--seeds", "zero"], "error: --seeds must be comma-separated non-negative integers"),
    (["--seeds", ""], "error: --seeds is empty"),
    (["--seeds", "0,0"], "error: --seeds lists 0 twice"),
    (["--ratios", "0,x,1"], "error: --ratios must be comma-separated numbers in [0, 1]"),
    (["--ratios", "0,1.5,1"], "error: --ratios[1] must lie in [0, 1]"),
    (["--ratios", "0,0.5"], "error: --ratios must include 0 and 1"),
    (["--device", "foo"], "error: --device 'foo' is not a device: use 'cpu', 'cuda'"),
])
def test_cli_refuses_bad_options_before_any_work(no_work, capsys, tmp_path, argv, message):
    err = _cli_error(capsys, ["--dataset", "synthetic", "--cache", str(tmp_path), "--quiet", *argv])
    assert err.startswith(message), err


def test_cli_refuses_a_gpu_that_is_not_there(no_work, capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    err = _cli_error(capsys, ["--dataset", "synthetic", "--device", "cuda", "--cache", str(tmp_path)])
    assert "--device 'cuda': this machine has no CUDA GPU" in err and "use 'cpu'" in err


def test_cli_refuses_a_file_as_cache(no_work, capsys, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    err = _cli_error(capsys, ["--dataset", "synthetic", "--cache", str(tmp_path / "file")])
    assert f"--cache '{tmp_path / 'file'}' is a file: give a folder" in err


@pytest.mark.parametrize("option", ["--out", "--markdown"])
def test_cli_checks_output_paths_before_the_run(no_work, capsys, tmp_path, option):
    (tmp_path / "file").write_text("x")
    base = ["--dataset", "synthetic", "--cache", str(tmp_path / "ck")]
    err = _cli_error(capsys, [*base, option, str(tmp_path / "file" / "sub" / "r.json")])
    assert f"{option} {tmp_path / 'file' / 'sub' / 'r.json'}: {tmp_path / 'file'} is a file, not a folder" in err
    err = _cli_error(capsys, [*base, option, str(tmp_path)])
    assert f"{option} {tmp_path} is a folder: give a file name" in err


def test_cli_out_and_markdown_must_differ(no_work, capsys, tmp_path):
    err = _cli_error(capsys, ["--out", str(tmp_path / "a"), "--markdown", str(tmp_path / "a")])
    assert "--out and --markdown are the same file" in err


def test_run_experiment_checks_before_loading_data(no_work, tmp_path):
    with pytest.raises(ValueError, match=r"seeds must be an integer seed in 0 \.\. 2"):
        _run(tmp_path, seeds=(0, -1))
    with pytest.raises(TypeError, match="seeds must be an integer"):
        _run(tmp_path, seeds=(0.5,))
    with pytest.raises(ValueError, match="strategies is empty"):
        _run(tmp_path, strategies=())
    with pytest.raises(TypeError, match="strategies must be a sequence of names"):
        _run(tmp_path, strategies="old,rank_merge")
    with pytest.raises(ValueError, match="device 'foo' is not a device"):
        _run(tmp_path, device="foo")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="cache .* is a file"):
        _run(tmp_path / "file")
    with pytest.raises(TypeError, match="new_new must be None"):
        _run(tmp_path, new_new="yes")


class TestTableFiles:
    @pytest.mark.parametrize("content,message", [
        (None, "no such file; give a results JSON written by --out"),
        (b"\x80\x81garbage\xff", "is not a text file"),
        (b"{not json", "is not valid JSON"),
        (b"[1, 2]", "is not a results JSON written by --out: it has no dataset"),
        (b'{"dataset": "digits"}', "it has no setting, old_classes, seeds, old_old, new_new, strategies"),
    ])
    def test_bad_table_file(self, tmp_path, capsys, content, message):
        path = tmp_path / "r.json"
        if content is not None:
            path.write_bytes(content)
        err = _cli_error(capsys, ["--table", str(path)])
        assert err.startswith(f"error: --table {path}") and message in err

    @pytest.mark.parametrize("content,detail", [
        # The right keys with the wrong contents crashed format_table with a KeyError/TypeError traceback.
        ({"old_old": {}, "new_new": {}, "strategies": {}}, "KeyError"),
        ({"old_old": {"map": 1}, "new_new": {}, "strategies": {"x": {k: 1 for k in (
            "backbone_passes", "map_at", "auc_map", "auc_top1", "relative_gain", "max_negative_flip")}}}, "TypeError"),
    ])
    def test_table_with_wrong_contents(self, tmp_path, capsys, content, detail):
        base = {"dataset": "digits", "setting": "homogeneous", "old_classes": "0-4", "seeds": [0]}
        path = tmp_path / "r.json"
        path.write_text(json.dumps(base | content))
        err = _cli_error(capsys, ["--table", str(path)])
        assert err.startswith(f"error: --table {path} is not a results JSON written by --out: its contents do not fit")
        assert detail in err

    def test_bad_strategy_entry(self, first, tmp_path, capsys):
        _, result = first
        broken = json.loads(json.dumps(result))
        del broken["strategies"]["rank_merge"]["auc_map"]
        (tmp_path / "r.json").write_text(json.dumps(broken))
        err = _cli_error(capsys, ["--table", str(tmp_path / "r.json")])
        assert "strategy 'rank_merge' has no auc_map" in err

    def test_bad_query_cost_file(self, first, tmp_path, capsys):
        _, result = first
        (tmp_path / "r.json").write_text(json.dumps(result))
        (tmp_path / "cost.json").write_text("{broken")
        err = _cli_error(capsys, ["--table", str(tmp_path / "r.json"), "--query-cost", str(tmp_path / "cost.json")])
        assert f"--query-cost {tmp_path / 'cost.json'} is not valid JSON" in err
        (tmp_path / "cost.json").write_text('{"ratios": {"old": "fast"}, "setup": {}}')
        err = _cli_error(capsys, ["--table", str(tmp_path / "r.json"), "--query-cost", str(tmp_path / "cost.json")])
        assert "the cost of 'old' is not a number" in err


class TestOutputs:
    def test_written_atomically_over_an_old_file(self, first, tmp_path, capsys):
        _, result = first
        (tmp_path / "r.json").write_text(json.dumps(result))
        out, md = tmp_path / "new" / "deep" / "out.json", tmp_path / "t.md"
        md.write_text("old table")
        assert main(["--table", str(tmp_path / "r.json"), "--out", str(out), "--markdown", str(md),
                     "--query-cost", ""]) == 0
        assert json.loads(out.read_text())["strategies"].keys() == result["strategies"].keys()
        assert md.read_text().startswith("**synthetic")
        leftovers = [p.name for p in tmp_path.rglob("*") if ".tmp" in p.name]
        assert leftovers == []

    def test_a_late_write_failure_keeps_the_results(self, first, tmp_path, capsys, monkeypatch):
        _, result = first
        (tmp_path / "r.json").write_text(json.dumps(result))

        def disk_full(path, text):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(experiment, "_write_atomic", disk_full)
        err = _cli_error(capsys, ["--table", str(tmp_path / "r.json"), "--out", str(tmp_path / "out.json"),
                                  "--query-cost", ""])
        assert "error: --out: could not write" in err and "No space left on device" in err
        fallback = err.rsplit("saved to ", 1)[1].split(" instead")[0]
        try:
            assert json.loads(open(fallback).read())["strategies"].keys() == result["strategies"].keys()
        finally:
            import os
            os.unlink(fallback)


# --- n/a instead of a lost run; only what the strategies need is trained (issues 7, 10) ------------

def test_equal_references_give_na_gain_not_a_crash(tmp_path, monkeypatch):
    real = ExperimentContext.embeddings

    def new_is_old(self, role, split="test"):
        return real(self, "old" if role == "new" else role, split)

    monkeypatch.setattr(ExperimentContext, "embeddings", new_is_old)
    result = _run(tmp_path, seeds=(0,), strategies=("old", "offline"), new_new=True)
    assert result["new_new"]["map"] == result["old_old"]["map"]
    for name in ("old", "offline"):
        gain = result["strategies"][name]["relative_gain"]
        assert gain["status"] == "n/a" and "new/new mAP equals old/old mAP" in gain["reason"]
        assert result["strategies"][name]["auc_map"]["mean"] > 0  # the rest of the run is kept
    table = format_table(result)
    row = next(line for line in table.splitlines() if line.startswith("offline"))
    assert "n/a" in row and "rel. gain n/a: new/new mAP equals old/old mAP" in table
    assert "rel. gain n/a" in format_table(result, markdown=True)
    json.dumps(result)


def test_old_alone_does_not_train_the_new_model(tmp_path):
    result = _run(tmp_path, seeds=(0,), strategies=("old",))
    assert set(result["strategies"]["old"]["trained"]) == {"old"}
    assert not list(tmp_path.glob("synthetic-new-*.pt")) and list(tmp_path.glob("synthetic-old-*.pt"))
    assert result["new_new"]["status"] == "n/a" and "no strategy asked trains the new model" in result["new_new"]["reason"]
    gain = result["strategies"]["old"]["relative_gain"]
    assert gain["status"] == "n/a" and "needs new/new" in gain["reason"]
    table = format_table(result)
    assert "new/new mAP n/a" in table.splitlines()[0] and "new/new not measured" in table
    # asked for explicitly, the new model is trained and the gain of never upgrading is 0
    forced = _run(tmp_path, seeds=(0,), strategies=("old",), new_new=True)
    assert list(tmp_path.glob("synthetic-new-*.pt"))
    assert forced["strategies"]["old"]["relative_gain"]["mean"] == pytest.approx(0.0, abs=1e-9)


def test_cli_old_alone(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(strategies.PRESETS, "synthetic", SMALL)
    assert main(["--dataset", "synthetic", "--strategies", "old", "--seeds", "0", "--cache", str(tmp_path),
                 "--device", "cpu", "--quiet", "--query-cost", ""]) == 0
    assert "new/new mAP n/a" in capsys.readouterr().out
    assert not list(tmp_path.glob("synthetic-new-*.pt"))


HEADS = ("reverse_transform", "mct", "forward_transform")
FAST_HEADS = MethodParams(transform_steps=15)


def test_heads_are_cached_like_the_backbones(tmp_path, monkeypatch):
    first = _run(tmp_path, seeds=(0,), strategies=HEADS, params=FAST_HEADS)
    for name in HEADS:
        assert first["strategies"][name]["trained"][name]["cached"] == [False]
    assert len(list(tmp_path.glob("synthetic-mct-*.pt"))) == 1

    from backfill_lib import transforms

    def must_not_fit(*args, **kwargs):
        raise AssertionError("a cached head was fitted again")

    with monkeypatch.context() as m:
        m.setattr(transforms, "fit_reverse_transform", must_not_fit)
        m.setattr(transforms, "fit_forward_transform", must_not_fit)
        again = _run(tmp_path, seeds=(0,), strategies=HEADS, params=FAST_HEADS)
    assert _numbers(again) == _numbers(first)
    for name in HEADS:
        was, now = first["strategies"][name]["trained"][name], again["strategies"][name]["trained"][name]
        assert now["cached"] == [True] and now["seconds"] == was["seconds"]  # the original training time

    # anything that changes a head retrains it: its own settings, its schedule, a retrained backbone
    calls = []
    real = transforms.fit_reverse_transform

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(transforms, "fit_reverse_transform", counting)
    _run(tmp_path, seeds=(0,), strategies=("mct",), params=MethodParams(transform_steps=15, mct_tau=0.3))
    _run(tmp_path, seeds=(0,), strategies=("mct",), params=MethodParams(transform_steps=16))
    other_backbones = Preset(SMALL.old, SMALL.new, SMALL.new_heterogeneous, TrainConfig(epochs=2, batch_size=32, lr=5e-3))
    _run(tmp_path, seeds=(0,), strategies=("mct",), params=FAST_HEADS, preset=other_backbones)
    _run(tmp_path, seeds=(1,), strategies=("mct",), params=FAST_HEADS)
    assert len(calls) == 4


def test_unknown_training_time_is_printed_as_such(tmp_path):
    _run(tmp_path, seeds=(0,), strategies=("rank_merge",))
    for side in tmp_path.glob("*.json"):
        side.unlink()
    result = _run(tmp_path, seeds=(0,), strategies=("rank_merge",))
    trained = result["strategies"]["rank_merge"]["trained"]
    assert trained["old"]["seconds"] == {"mean": None, "std": None} and trained["old"]["cached"] == [True]
    row = next(line for line in format_table(result).splitlines() if line.startswith("rank_merge"))
    assert "time unknown" in row and "0.0 s" not in row


def test_corrupt_checkpoint_in_the_cache_is_retrained(tmp_path):
    before = _run(tmp_path, seeds=(0,), strategies=("rank_merge",))
    (old_ckpt,) = tmp_path.glob("synthetic-old-*.pt")
    old_ckpt.write_bytes(old_ckpt.read_bytes()[:100])
    with pytest.warns(RuntimeWarning, match=f"checkpoint {old_ckpt} could not be read"):
        after = _run(tmp_path, seeds=(0,), strategies=("rank_merge",))
    assert _numbers(after) == _numbers(before)
    assert old_ckpt.with_name(old_ckpt.name + ".corrupt").exists()


# --- The query-cost column only for what it was measured on (issue 7) -------------------------------

def _with_cost(result, **setup):
    out = json.loads(json.dumps(result))
    out["query_cost"] = {"ratios": {"old": 0.99, "rank_merge": 2.01}, "reference": "one new pass",
                         "setup": {"batch": 64, "gallery": 100, "backfill_ratio": 0.5, "device": "cpu", **setup}}
    return out


def test_query_cost_shown_for_the_models_it_was_measured_on(first):
    _, result = first
    table = format_table(_with_cost(result, model="mlp", embed_dim=8, image=[8]), markdown=True)
    assert "| query cost |" in table and "| 2.01× |" in table and "(mlp, 8 images, cpu)" in table


@pytest.mark.parametrize("setup", [
    {"model": "resnet18", "embed_dim": 128, "image": [3, 32, 32]},
    {"model": "mlp", "embed_dim": 16, "image": [8]},
    {"model": "mlp", "embed_dim": 8, "image": [3, 8, 8]},
])
def test_query_cost_hidden_for_other_models(first, setup):
    _, result = first
    for markdown in (False, True):
        table = format_table(_with_cost(result, **setup), markdown=markdown)
        assert "query cost |" not in table and "2.01×" not in table
        assert "query cost" not in table.splitlines()[1 if not markdown else 2]
        assert (f"Query cost not shown: benchmarks/query_cost.py measured for {setup['model']} d={setup['embed_dim']} "
                f"on {'×'.join(map(str, setup['image']))} inputs, but this run uses mlp d=8 on 8 inputs") in table


def test_query_cost_hidden_when_the_results_do_not_say_their_input_size(first):
    _, result = first
    old_file = _with_cost(result, model="mlp", embed_dim=8, image=[8])
    del old_file["input_shape"]
    assert "inputs of unrecorded size" in format_table(old_file) and "2.01×" not in format_table(old_file)


# --- The imagefolder cache key sees the files (issue 7) ---------------------------------------------

def test_imagefolder_trees_with_the_same_classes_do_not_share_checkpoints(tmp_path):
    from PIL import Image

    from backfill_lib.data import load_dataset

    rng = np.random.default_rng(0)
    for tree in ("a", "b"):
        for c in ("cat", "dog"):
            (tmp_path / tree / c).mkdir(parents=True)
            for i in range(4):
                Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / tree / c / f"{i}.png")
    tiny = Preset(ModelSpec("mlp", 4, 4), ModelSpec("mlp", 4, 4), ModelSpec("mlp", 4, 4),
                  TrainConfig(epochs=1, batch_size=4, lr=1e-3))
    cache = tmp_path / "ck"
    for tree in ("a", "b"):
        data = load_dataset("imagefolder", root=tmp_path / tree, image_size=8, test_size=0.5)
        ExperimentContext(data, preset=tiny, device="cpu", cache=cache, progress=False).model("old")
    assert len(list(cache.glob("imagefolder-old-*.pt"))) == 2


# --- The strategy registry does not import torch (issue 10) ----------------------------------------

def test_strategies_module_does_not_import_torch():
    code = ("import sys, backfill_lib.strategies as s\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n"
            "assert 'rank_merge' in s.STRATEGY_REGISTRY\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr


def test_context_names_still_importable_from_strategies():
    from backfill_lib import context

    for name in ("ExperimentContext", "Preset", "PRESETS", "SETTINGS", "MethodParams", "init_seed"):
        assert getattr(strategies, name) is getattr(context, name)
        assert name in dir(strategies)
    with pytest.raises(AttributeError, match="has no attribute 'nothing'"):
        strategies.nothing  # noqa: B018


# --- Backfill order policies (issue 9) ---------------------------------------------------------------

from backfill_lib.backfill import ORDER_POLICIES, backfill_order, evaluate_backfill  # noqa: E402
from backfill_lib.strategies import experiment_order  # noqa: E402


def test_order_is_recorded_and_shown(first, tmp_path):
    _, result = first
    assert result["order"] == "random" and "backfill order random" in format_table(result)
    legacy = {k: v for k, v in result.items() if k != "order"}  # results saved before orders were recorded
    assert "backfill order random" in format_table(legacy)
    ordered = _run(tmp_path, seeds=(0,), strategies=("old", "rank_merge"), ratios=(0, 0.5, 1), order="uncertain_first")
    assert ordered["order"] == "uncertain_first" and "backfill order uncertain_first" in format_table(ordered)
    assert "backfill order uncertain_first" in format_table(ordered, markdown=True)


def test_random_order_gives_the_numbers_of_before(first):
    # order="random" must be the order every experiment used so far: backfill_order(N, seed).
    cache, result = first
    from backfill_lib.data import load_dataset

    ctx = ExperimentContext(load_dataset("synthetic", **DATA), seed=1, preset=SMALL, device="cpu", progress=False,
                            cache=cache)
    np.testing.assert_array_equal(experiment_order(ctx, "random", 1), backfill_order(len(ctx.data.test_labels), 1))
    curve = evaluate_backfill(build_strategy("rank_merge", ctx), ctx.data.test_labels, order_seed=1)
    np.testing.assert_allclose(result["strategies"]["rank_merge"]["curve_map"][1], curve.map)


@pytest.fixture(scope="module")
def order_ctx(first):
    from backfill_lib.data import load_dataset

    return ExperimentContext(load_dataset("synthetic", **DATA), seed=0, preset=SMALL, device="cpu", progress=False,
                             cache=first[0])


def test_uncertain_first_follows_the_old_classifier(order_ctx):
    ctx = order_ctx
    order = experiment_order(ctx, "uncertain_first", 0)
    np.testing.assert_array_equal(np.sort(order), np.arange(len(ctx.data.test_labels)))
    model, old_classes = ctx.model("old"), list(ctx.data.old_classes)
    x = torch.stack([ctx.data.test[i][0] for i in range(len(ctx.data.test))])
    with torch.no_grad():
        p = torch.softmax(model.classifier(model.features(x))[:, old_classes], dim=1).numpy()
    u = 1 - p.max(axis=1)
    assert np.all(np.diff(u[order]) <= 1e-6)  # most uncertain first (up to float32 rounding)


def test_class_coverage_round_robins_over_old_embedding_clusters(order_ctx):
    from sklearn.cluster import KMeans

    ctx = order_ctx
    order = experiment_order(ctx, "class_coverage", 0)
    groups = KMeans(n_clusters=ctx.data.num_classes, n_init=4, random_state=0).fit_predict(
        ctx.embeddings("old").astype("float64"))
    np.testing.assert_array_equal(order, backfill_order(len(groups), 0, "class_coverage", groups=groups))
    first_round = order[:ctx.data.num_classes]
    assert len(set(groups[first_round].tolist())) == ctx.data.num_classes  # one item of every cluster first
    np.testing.assert_array_equal(order, experiment_order(ctx, "class_coverage", 0))  # reproducible
    with pytest.raises(ValueError, match="unknown order 'oldest'; choose one of: random, uncertain_first"):
        experiment_order(ctx, "oldest", 0)
    assert ORDER_POLICIES[:3] == ("random", "uncertain_first", "class_coverage")


def test_order_is_checked_before_any_work(no_work, capsys, tmp_path):
    err = _cli_error(capsys, ["--dataset", "synthetic", "--cache", str(tmp_path), "--order", "oldest"])
    assert err.startswith("error: unknown --order 'oldest'; choose one of: random, uncertain_first, class_coverage")
    with pytest.raises(ValueError, match="unknown order 'oldest'"):
        _run(tmp_path, order="oldest")


def test_cli_order_reaches_the_results(tmp_path, monkeypatch):
    monkeypatch.setitem(strategies.PRESETS, "synthetic", SMALL)
    out = tmp_path / "r.json"
    code = main(["--dataset", "synthetic", "--strategies", "old,rank_merge", "--seeds", "0", "--ratios", "0,0.5,1",
                 "--cache", str(tmp_path / "ck"), "--device", "cpu", "--order", "class_coverage", "--out", str(out),
                 "--quiet"])
    assert code == 0 and json.loads(out.read_text())["order"] == "class_coverage"


def test_preset_image_size_and_forward_arch_are_checked_before_any_work(no_work, capsys, tmp_path):
    base = ["--cache", str(tmp_path)]
    err = _cli_error(capsys, ["--dataset", "digits", "--preset", "cifar100_bt2", *base])
    assert "--preset cifar100_bt2 is a recipe for cifar100, not for --dataset digits" in err
    # "fashion_mnist" is one dataset: its preset is not "a recipe for fashion"
    err = _cli_error(capsys, ["--dataset", "digits", "--preset", "fashion_mnist", *base])
    assert "--preset fashion_mnist is a recipe for fashion_mnist, not for --dataset digits" in err
    from backfill_lib.experiment import _preset_dataset
    assert [_preset_dataset(p) for p in ("fashion_mnist", "cifar100_bt2", "digits")] == [
        "fashion_mnist", "cifar100", "digits"]
    err = _cli_error(capsys, ["--dataset", "digits", "--preset", "nope", *base])
    assert "--preset" in err and "cifar100_bt2" in err
    err = _cli_error(capsys, ["--dataset", "digits", "--image-size", "224", *base])
    assert "--image-size applies to --dataset cifar100 only" in err
    err = _cli_error(capsys, ["--dataset", "cifar100", "--image-size", "16", *base])
    assert "--image-size must be at least 32" in err
    err = _cli_error(capsys, ["--dataset", "digits", "--forward-arch", "resnet", *base])
    assert "--forward-arch" in err and "mlp, fct" in err


def test_bt2_preset_reaches_the_run_with_224_px_images(monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setattr(experiment, "run_experiment", lambda *a, **kw: seen.update(kw) or {})
    monkeypatch.setattr(experiment, "_write_outputs", lambda result, outputs: 0)
    assert main(["--dataset", "cifar100", "--preset", "cifar100_bt2", "--forward-arch", "fct",
                 "--cache", str(tmp_path), "--device", "cpu", "--quiet"]) == 0
    assert seen["preset"] is strategies.PRESETS["cifar100_bt2"]
    assert seen["data_kwargs"] == {"image_size": 224} and seen["params"].forward_arch == "fct"
    seen.clear()
    assert main(["--dataset", "cifar100", "--image-size", "64", "--cache", str(tmp_path), "--device", "cpu"]) == 0
    assert seen["preset"] is None and seen["data_kwargs"] == {"image_size": 64}
    assert seen["params"].forward_arch == "mlp"


def test_the_rho_reference_takes_mcts_tuned_budget():
    # offline_rho must train with mct's τ and steps, or its gain column compares unequal budgets
    from backfill_lib.context import tuned_params
    tuning = {"per_strategy": {"mct": {"mct_tau": 0.3, "transform_steps": 77}}}
    mct = tuned_params("mct", tuning)
    ref = tuned_params("offline_rho", tuning)
    assert (ref.mct_tau, ref.transform_steps) == (mct.mct_tau, mct.transform_steps) == (0.3, 77)
