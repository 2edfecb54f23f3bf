"""The Fashion-MNIST preset (issue 17): it builds and trains, and the other presets keep their checkpoints.

Runs offline on a fake Fashion-MNIST written in the real IDX format (tests/fake_fashion_mnist.py),
a few hundred images and one epoch: what is tested is that the preset's models build, train and
serve the strategies, not their quality (benchmarks/fashion_budget.py measures that).
"""

from __future__ import annotations

import functools
from dataclasses import replace

import numpy as np
import pytest
import torch

from backfill_lib import data as data_mod
from backfill_lib import experiment
from backfill_lib.backfill import evaluate_backfill
from backfill_lib.context import PRESETS, ExperimentContext
from backfill_lib.data import load_dataset
from backfill_lib.models import ModelSpec, build_model
from backfill_lib.strategies import build_strategy
from backfill_lib.training import cache_key, state_checksum
from fake_fashion_mnist import write_fake_fashion_mnist

#: Checkpoint keys of the presets that existed before ``fashion_mnist``, computed with the code
#: of commit 338918e (before ``pooled_cnn`` and the preset were added): the same key means the
#: same checkpoint file, so the caches of digits, CIFAR-100, ... are still found.
KEYS_BEFORE = {
    "digits/old": "c827f0658b46562c109b",
    "digits/new": "d3eb54e61c54d232ceac",
    "digits/new_heterogeneous": "122e7265268bf66f9137",
    "synthetic/old": "5d50410292a428a8d213",
    "synthetic/new": "705a2978705ad757fe8f",
    "synthetic/new_heterogeneous": "615f53a85659ab58cebb",
    "cifar100/old": "0bac41d7dd0486189c45",
    "cifar100/new": "42b2984052048b03fc9b",
    "cifar100/new_heterogeneous": "2432d9f17922749b5027",
    "imagefolder/old": "c28f964038b6e93bd062",
    "imagefolder/new": "04c7d37951047ee8bab8",
    "imagefolder/new_heterogeneous": "73b47b825db6cdd27109",
    "cifar100_bt2/old": "92c140df4ea8285d64f8",
    "cifar100_bt2/new": "819023cd8c5ec976aee9",
    "cifar100_bt2/new_heterogeneous": "106a63cb0dcc60f110c9",
}
#: Initial weights (SHA-256 of the state dict) of the existing small architectures at commit 338918e.
WEIGHTS_BEFORE = {
    ("mlp", 8): "e43995c5424dbee590e24d6aff5268ec7290763062c10a4ab12f4f2fb6646b32",
    ("small_cnn", 8): "b3e64cba181c75614e4b6e2098b6e276233fdbd291a5a9e2a3d930131f9259fa",
    ("small_cnn", 28): "b3e64cba181c75614e4b6e2098b6e276233fdbd291a5a9e2a3d930131f9259fa",
}
N_TRAIN, N_TEST = 300, 200


@pytest.mark.parametrize("entry", sorted(KEYS_BEFORE))
def test_existing_presets_keep_their_cache_keys(entry):
    name, role = entry.split("/")
    preset = PRESETS[name]
    key = cache_key(name=role, spec=getattr(preset, role), classes=(0, 1, 2, 3, 4), config=preset.train,
                    data={"dataset": name}, init_seed=0, extra={})
    assert key == KEYS_BEFORE[entry]


@pytest.mark.parametrize("arch,side", sorted(WEIGHTS_BEFORE))
def test_existing_architectures_keep_their_initial_weights(arch, side):
    model = build_model(ModelSpec(arch, 16, 8), (1, side, side), 10, seed=3)
    assert state_checksum(model.state_dict()) == WEIGHTS_BEFORE[arch, side]


def test_fashion_preset_is_registered_and_distinct():
    preset = PRESETS["fashion_mnist"]
    assert preset.old.arch == preset.new.arch == "pooled_cnn"
    assert preset.new_heterogeneous.embed_dim != preset.old.embed_dim  # the heterogeneous setting changes d
    key = {n: cache_key(name="old", spec=PRESETS[n].old, config=PRESETS[n].train) for n in PRESETS}
    assert key["fashion_mnist"] not in {key[n] for n in PRESETS if n != "fashion_mnist"}
    model = build_model(preset.old, (1, 28, 28), 10, seed=0)
    assert model.embed(torch.zeros(2, 1, 28, 28)).shape == (2, preset.old.embed_dim)


@pytest.fixture
def fashion(tmp_path, monkeypatch):
    """A fake Fashion-MNIST in ``$BACKFILL_DATA`` (Debian's folder hidden), and the preset cut to one epoch."""
    monkeypatch.setenv("BACKFILL_DATA", str(tmp_path / "data"))
    monkeypatch.setattr(data_mod, "DEBIAN_FASHION_MNIST", tmp_path / "no-debian")
    write_fake_fashion_mnist(tmp_path / "data", n_train=N_TRAIN + 100, n_test=N_TEST + 50)
    preset = PRESETS["fashion_mnist"]
    monkeypatch.setitem(PRESETS, "fashion_mnist", replace(preset, train=replace(preset.train, epochs=1)))
    return tmp_path


def test_preset_trains_and_serves_every_kind_of_strategy(fashion):
    data = load_dataset("fashion_mnist", n_train=N_TRAIN, n_test=N_TEST)
    assert data.input_shape == (1, 28, 28)
    ctx = ExperimentContext(data, seed=0, cache=fashion / "cache", progress=False)
    assert ctx.preset is PRESETS["fashion_mnist"] and ctx.old_spec.arch == "pooled_cnn"
    for name in ("rank_merge", "bct", "reverse_transform"):
        curve = evaluate_backfill(build_strategy(name, ctx), data.test_labels, ratios=[0.0, 0.5, 1.0])
        assert np.isfinite(curve.map).all() and 0 < curve.map.min() <= curve.map.max() <= 1
    assert ctx.embeddings("old").shape == (N_TEST, ctx.old_spec.embed_dim)
    assert {"old", "new", "new_bct", "reverse_transform"} <= set(ctx.trained)
    het = ExperimentContext(data, seed=0, setting="heterogeneous", cache=fashion / "cache", progress=False)
    assert het.embeddings("new").shape == (N_TEST, PRESETS["fashion_mnist"].new_heterogeneous.embed_dim)
    het.model("old")
    assert het.trained["old"]["cached"] and not het.trained["new"]["cached"]  # the same old model, another new one


def test_experiment_command_runs_on_fashion_mnist(fashion, monkeypatch, capsys):
    monkeypatch.setattr(experiment, "load_dataset",
                        functools.partial(load_dataset, n_train=N_TRAIN, n_test=N_TEST))
    out = fashion / "fashion.json"
    status = experiment.main(["--dataset", "fashion_mnist", "--strategies", "old,rank_merge", "--seeds", "0",
                              "--ratios", "0,0.5,1", "--cache", str(fashion / "cache"), "--quiet", "--out", str(out),
                              "--query-cost", str(fashion / "none.json")])
    assert status == 0, capsys.readouterr().err
    result = experiment._read_results(str(out))
    assert result["dataset"] == "fashion_mnist" and result["models"]["old"]["arch"] == "pooled_cnn"
    assert result["input_shape"] == [1, 28, 28]
