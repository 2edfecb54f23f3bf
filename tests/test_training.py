"""The training loop, the checkpoint cache and embedding extraction."""

import os
import json
import warnings

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from backfill_lib import training
from backfill_lib.data import load_dataset
from backfill_lib.models import ModelSpec, build_model
from backfill_lib.training import (TrainConfig, cache_dir, cache_key, check_cache_dir, cross_entropy_loss,
                                   extract_embeddings, resolve_device, train, train_or_load)

SPEC = ModelSpec("mlp", embed_dim=8, width=8)
FAST = TrainConfig(epochs=8, batch_size=16, lr=1e-2, seed=0)


@pytest.fixture(scope="module")
def toy():
    return load_dataset("synthetic", num_classes=4, dim=6, n_per_class=40)


def _model(toy, seed=0):
    return build_model(SPEC, toy.input_shape, toy.num_classes, seed=seed)


def _assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


class TestTrainConfig:
    @pytest.mark.parametrize("kwargs,match", [
        ({"optimizer": "rmsprop"}, "optimizer must be 'adam' or 'sgd'"),
        ({"epochs": 0}, "epochs must be at least 1"),
        ({"batch_size": 0}, "batch_size must be at least 1"),
        ({"lr": 0.0}, "lr must be positive"),
    ])
    def test_bad_values(self, kwargs, match):
        with pytest.raises(ValueError, match=match):
            TrainConfig(**kwargs)


class TestTrain:
    def test_reduces_loss(self, toy):
        model = _model(toy)
        with torch.no_grad():
            before = cross_entropy_loss(model.eval(), *toy.train.tensors).item()
        history = train(model, toy.train, FAST, device="cpu", progress=False)
        with torch.no_grad():
            after = cross_entropy_loss(model, *toy.train.tensors).item()
        assert len(history) == FAST.epochs and history[-1] < history[0]
        assert after < 0.5 * before
        assert not model.training  # left in eval mode, ready to embed

    def test_same_seed_same_weights(self, toy):
        config = TrainConfig(epochs=2, batch_size=16, lr=1e-2, seed=0)
        a, b, c = _model(toy), _model(toy), _model(toy)
        ha = train(a, toy.train, config, device="cpu", progress=False)
        hb = train(b, toy.train, config, device="cpu", progress=False)
        assert ha == hb
        _assert_same_weights(a, b)
        train(c, toy.train, TrainConfig(**{**config.__dict__, "seed": 1}), device="cpu", progress=False)
        assert not torch.equal(a.embedding.weight, c.embedding.weight)  # the seed orders the data

    def test_sgd_and_custom_loss(self, toy):
        model = _model(toy)
        calls = []

        def loss_fn(m, x, y):
            calls.append(len(y))
            return cross_entropy_loss(m, x, y)

        train(model, toy.train, TrainConfig(epochs=1, batch_size=30, lr=0.05, optimizer="sgd"), loss_fn=loss_fn,
              device="cpu", progress=False)
        assert calls == [30, 30]  # 80 training items, batches of 30, the last partial batch dropped

    def test_params_limits_what_changes(self, toy):
        model = _model(toy)
        backbone = {k: v.clone() for k, v in model.backbone.state_dict().items() if v.is_floating_point()}
        head = model.embedding.weight.clone()
        train(model, toy.train, FAST, device="cpu", progress=False,
              params=list(model.embedding.parameters()) + list(model.classifier.parameters()))
        assert all(torch.equal(backbone[k], model.backbone.state_dict()[k]) for k in backbone
                   if "running" not in k)  # BN running stats move in train mode, weights must not
        assert not torch.equal(head, model.embedding.weight)

    def test_bad_input(self, toy):
        model = _model(toy)
        with pytest.raises(ValueError, match="dataset is empty"):
            train(model, TensorDataset(torch.zeros(0, 6), torch.zeros(0, dtype=torch.long)), FAST, device="cpu")
        for p in model.parameters():
            p.requires_grad_(False)
        with pytest.raises(ValueError, match="no parameter requires grad"):
            train(model, toy.train, FAST, device="cpu")

    def test_diverging_loss_is_reported(self, toy):
        with pytest.raises(FloatingPointError, match="lower config.lr"):
            train(_model(toy), toy.train, FAST, loss_fn=lambda m, x, y: torch.tensor(float("nan")),
                  device="cpu", progress=False)


def test_default_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert training.default_device() == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert training.default_device() == torch.device("cuda")


class TestResolveDevice:
    def test_valid(self, monkeypatch):
        assert resolve_device("cpu") == torch.device("cpu")
        assert resolve_device(torch.device("cpu")) == torch.device("cpu")
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        assert resolve_device(None) == torch.device("cpu")

    def test_not_a_device(self):
        with pytest.raises(ValueError, match="--device 'foo' is not a device: use 'cpu', 'cuda'"):
            resolve_device("foo", name="--device")
        with pytest.raises(TypeError, match="device must be a string"):
            resolve_device(0)

    def test_gpu_that_is_not_there(self, monkeypatch):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        with pytest.raises(ValueError, match="device 'cuda': this machine has no CUDA GPU.*use 'cpu'"):
            resolve_device("cuda")
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
        with pytest.raises(ValueError, match="only 1 CUDA GPU"):
            resolve_device("cuda:3")

    def test_train_and_extract_check_it(self, toy):
        with pytest.raises(ValueError, match="device 'foo' is not a device"):
            train(_model(toy), toy.train, FAST, device="foo", progress=False)
        with pytest.raises(ValueError, match="device 'foo' is not a device"):
            extract_embeddings(_model(toy), toy.test, device="foo")


class TestCheckCacheDir:
    def test_missing_folder_is_fine(self, tmp_path):
        assert check_cache_dir(tmp_path / "a" / "b") == tmp_path / "a" / "b"
        assert not (tmp_path / "a").exists()  # not created before a checkpoint is saved

    @pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
    def test_a_folder_where_nothing_can_be_created_is_refused(self, toy, tmp_path):
        # os.access says yes to root for /proc; the check has to try (the probe found training ran
        # for a minute and then failed with a bare '[Errno 2]').
        for path in ("/proc/nope", "/proc/self/nope/deeper"):
            with pytest.raises(ValueError, match="--cache .*cannot write in"):
                check_cache_dir(path, name="--cache")
        assert check_cache_dir(tmp_path) == tmp_path
        assert list(tmp_path.iterdir()) == []  # the probe file is removed

    def test_a_file_is_refused_before_training(self, toy, tmp_path):
        (tmp_path / "file").write_text("x")
        for path in (tmp_path / "file", tmp_path / "file" / "sub"):
            with pytest.raises(ValueError, match="--cache .* file: give a folder"):
                check_cache_dir(path, name="--cache")

        def must_not_train(m):
            raise AssertionError("trained although the checkpoint could not be saved")

        with pytest.raises(ValueError, match="directory .* is a file"):
            train_or_load(_model(toy), "toy", "k", must_not_train, directory=tmp_path / "file")


class TestCacheKey:
    def test_stable_and_order_free(self):
        a = cache_key(spec=SPEC, config=FAST, classes=(0, 1))
        assert a == cache_key(classes=[0, 1], config=FAST, spec=SPEC)
        assert len(a) == 20 and all(ch in "0123456789abcdef" for ch in a)

    @pytest.mark.parametrize("change", [
        {"config": TrainConfig(epochs=9, batch_size=16, lr=1e-2)},
        {"config": TrainConfig(epochs=8, batch_size=16, lr=1e-3)},
        {"config": TrainConfig(epochs=8, batch_size=16, lr=1e-2, seed=1)},
        {"spec": ModelSpec("mlp", embed_dim=9, width=8)},
        {"classes": (0, 1, 2)},
    ])
    def test_changes_with_configuration(self, change):
        base = {"spec": SPEC, "config": FAST, "classes": (0, 1)}
        assert cache_key(**base) != cache_key(**{**base, **change})

    def test_version_is_part_of_key(self, monkeypatch):
        before = cache_key(spec=SPEC)
        monkeypatch.setattr(training, "CACHE_VERSION", training.CACHE_VERSION + 1)
        assert cache_key(spec=SPEC) != before


class TestTrainOrLoad:
    def test_trains_once_then_loads_with_weights_only(self, toy, tmp_path, monkeypatch):
        key = cache_key(spec=SPEC, config=FAST)
        first, info1 = train_or_load(_model(toy, seed=0), "toy", key,
                                     lambda m: train(m, toy.train, FAST, device="cpu", progress=False),
                                     directory=tmp_path)
        assert info1["cached"] is False and info1["seconds"] > 0
        assert (tmp_path / f"toy-{key}.pt").exists()
        assert json.loads((tmp_path / f"toy-{key}.json").read_text())["key"] == key

        loads = []
        real_load = torch.load

        def recording_load(*args, **kwargs):
            loads.append(kwargs)
            return real_load(*args, **kwargs)

        monkeypatch.setattr(torch, "load", recording_load)

        def must_not_train(m):
            raise AssertionError("a cached model was trained again")

        fresh = _model(toy, seed=99)  # other initial weights: everything must come from the file
        second, info2 = train_or_load(fresh, "toy", key, must_not_train, directory=tmp_path)
        assert info2["cached"] is True and info2["seconds"] == pytest.approx(info1["seconds"])
        assert loads and all(kw.get("weights_only") is True for kw in loads)
        _assert_same_weights(first, second)
        assert not second.training

    def test_force_and_new_key_retrain(self, toy, tmp_path):
        calls = []

        def fn(m):
            calls.append(1)

        train_or_load(_model(toy), "toy", "k1", fn, directory=tmp_path)
        train_or_load(_model(toy), "toy", "k1", fn, directory=tmp_path)
        train_or_load(_model(toy), "toy", "k1", fn, directory=tmp_path, force=True)
        train_or_load(_model(toy), "toy", "k2", fn, directory=tmp_path)
        assert len(calls) == 3
        assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["toy-k1.pt", "toy-k2.pt"]

    def test_default_directory_from_environment(self, toy, tmp_path, monkeypatch):
        monkeypatch.setenv("BACKFILL_CACHE", str(tmp_path / "env"))
        assert cache_dir() == tmp_path / "env"
        assert cache_dir(tmp_path) == tmp_path
        _, info = train_or_load(_model(toy), "toy", "k", lambda m: None)
        assert info["path"] == str(tmp_path / "env" / "toy-k.pt")


    @pytest.mark.parametrize("damage", ["empty", "truncated", "garbage", "other_model"])
    def test_unreadable_checkpoint_is_moved_aside_and_retrained(self, toy, tmp_path, damage):
        key = "k"
        first, _ = train_or_load(_model(toy), "toy", key, lambda m: train(m, toy.train, FAST, device="cpu",
                                                                          progress=False), directory=tmp_path)
        path = tmp_path / f"toy-{key}.pt"
        good = path.read_bytes()
        if damage == "other_model":
            torch.save(build_model(ModelSpec("mlp", 5, 4), toy.input_shape, toy.num_classes).state_dict(), path)
        else:
            path.write_bytes({"empty": b"", "truncated": good[:len(good) // 2], "garbage": b"not a checkpoint" * 9}[damage])
        damaged = path.read_bytes()
        calls = []

        def retrain(m):
            calls.append(1)
            train(m, toy.train, FAST, device="cpu", progress=False)

        with pytest.warns(RuntimeWarning, match=f"checkpoint {path} could not be read .*moved it to toy-k.pt.corrupt"
                                                 " and training again") as record:
            second, info = train_or_load(_model(toy), "toy", key, retrain, directory=tmp_path)
        assert "weights_only" not in str(record[0].message)  # not torch's advice to load unsafely
        assert calls == [1] and info["cached"] is False
        assert (tmp_path / "toy-k.pt.corrupt").read_bytes() == damaged
        _assert_same_weights(first, second)  # retrained from the same fresh model: the same weights
        third, info = train_or_load(_model(toy), "toy", key, retrain, directory=tmp_path)
        assert calls == [1] and info["cached"] is True  # the next run loads the new file
        _assert_same_weights(first, third)

    @pytest.mark.parametrize("side", [None, "", "{not json", '{"seconds": "soon"}'])
    def test_unknown_training_time_is_none_not_zero(self, toy, tmp_path, side):
        train_or_load(_model(toy), "toy", "k", lambda m: None, directory=tmp_path)
        meta = tmp_path / "toy-k.json"
        if side is None:
            meta.unlink()
        else:
            meta.write_text(side)
        _, info = train_or_load(_model(toy), "toy", "k", lambda m: None, directory=tmp_path)
        assert info["cached"] is True and info["seconds"] is None


class TestCheckpointChecksum:
    """Issue 16: a checkpoint with a flipped byte is not loaded silently."""

    def _trained(self, toy, tmp_path):
        model, _ = train_or_load(_model(toy), "toy", "k", lambda m: train(m, toy.train, FAST, device="cpu",
                                                                          progress=False), directory=tmp_path)
        return model, tmp_path / "toy-k.pt"

    def test_a_flipped_byte_in_the_weights_is_moved_aside_and_retrained(self, toy, tmp_path):
        first, path = self._trained(toy, tmp_path)
        good = path.read_bytes()
        weight = first.state_dict()[next(k for k in first.state_dict() if k.endswith("weight"))]
        at = good.find(weight.numpy().tobytes())
        assert at > 0  # the tensor's bytes, as torch stores them
        damaged = bytearray(good)
        damaged[at + 2] ^= 0x10  # one bit of one float: the file stays perfectly readable
        path.write_bytes(damaged)
        calls = []

        def retrain(m):
            calls.append(1)
            train(m, toy.train, FAST, device="cpu", progress=False)

        with pytest.warns(RuntimeWarning, match=rf"checkpoint {path} could not be read \(the file is damaged: its "
                                                 r"weights do not match the checksum stored with them\); moved it "
                                                 r"to toy-k.pt.corrupt and training again"):
            second, info = train_or_load(_model(toy), "toy", "k", retrain, directory=tmp_path)
        assert calls == [1] and info["cached"] is False
        assert (tmp_path / "toy-k.pt.corrupt").read_bytes() == bytes(damaged)
        _assert_same_weights(first, second)
        assert path.read_bytes() == good  # retrained to the same file, checksum and all

    def test_every_sampled_flip_is_refused_or_loads_the_same_weights(self, toy, tmp_path):
        first, path = self._trained(toy, tmp_path)
        good = path.read_bytes()
        outcomes = {"retrained": 0, "same": 0}
        for i in range(0, len(good), 37):  # about 340 of the 12.5 kB, a prime stride across the 64-byte records
            flipped = bytearray(good)
            flipped[i] ^= 0xFF
            path.write_bytes(flipped)
            retrained = []
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                model, info = train_or_load(_model(toy, seed=99), "toy", "k", retrained.append, directory=tmp_path)
            if info["cached"]:
                assert not caught
                _assert_same_weights(first, model)
                outcomes["same"] += 1
            else:
                assert retrained and "could not be read" in str(caught[0].message)
                outcomes["retrained"] += 1
        assert outcomes["retrained"] > 30 and outcomes["same"] > 0

    def test_written_with_a_checksum_of_the_weights(self, toy, tmp_path):
        first, path = self._trained(toy, tmp_path)
        blob = torch.load(path, weights_only=True)
        assert blob["format"] == training.CHECKPOINT_FORMAT and len(blob["sha256"]) == 64
        assert blob["sha256"] == training.state_checksum(first.state_dict())

    def test_a_checkpoint_from_before_checksums_still_loads(self, toy, tmp_path):
        # a bare state dict, as the previous version wrote: accepted (keys, shapes and dtypes checked)
        first, path = self._trained(toy, tmp_path)
        torch.save(first.state_dict(), path)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            second, info = train_or_load(_model(toy, seed=99), "toy", "k", lambda m: pytest.fail("retrained"),
                                         directory=tmp_path)
        assert info["cached"] is True
        _assert_same_weights(first, second)

    def test_tensors_of_another_dtype_are_not_cast_silently(self, toy, tmp_path):
        first, path = self._trained(toy, tmp_path)
        torch.save({k: v.double() if v.is_floating_point() else v for k, v in first.state_dict().items()}, path)
        with pytest.warns(RuntimeWarning, match=r"a checkpoint of another model: tensor .* is torch.float64, "
                                                 "not torch.float32"):
            _, info = train_or_load(_model(toy), "toy", "k", lambda m: None, directory=tmp_path)
        assert info["cached"] is False

    def test_state_checksum(self):
        state = {"a": torch.arange(4.0), "b": torch.zeros(2, dtype=torch.int64)}
        same = training.state_checksum({"b": torch.zeros(2, dtype=torch.int64), "a": torch.arange(4.0)})
        assert training.state_checksum(state) == same  # the order of the entries does not matter
        for other in ({**state, "a": torch.arange(4.0).reshape(2, 2)}, {**state, "a": torch.arange(4.0).double()},
                      {**state, "c": torch.zeros(0)}, {"a2": state["a"], "b": state["b"]}):
            assert training.state_checksum(other) != same
        assert training.state_checksum(state, {"d": 1}) != training.state_checksum(state, {"d": 2})
        assert training.state_checksum({"x": torch.arange(6.0)[::2]}) == training.state_checksum({"x": torch.tensor([0.0, 2, 4])})
        with pytest.raises(TypeError, match="state must map names to tensors"):
            training.state_checksum({"a": [1.0]})
        with pytest.raises(TypeError, match="state must be a dict of tensors, got list"):
            training.state_checksum([torch.zeros(1)])


class TestArgumentsAreCheckedBeforeTraining:
    """Issue 16, probe of training.py: bad arguments are named at once, not met deep inside torch (or
    after the training they would waste)."""

    @pytest.mark.parametrize("kwargs, error, match", [
        ({"name": "runs/toy"}, ValueError, r"name must be a non-empty string that can be part of a file name"),
        ({"name": ""}, ValueError, "name must be a non-empty string"),
        ({"key": ".."}, ValueError, "key must be a non-empty string"),
        ({"name": None}, TypeError, "name must be a string .*got NoneType"),
        ({"key": 3}, TypeError, "key must be a string"),
        ({"train_fn": None}, TypeError, "train_fn must be a function"),
        ({"module": None}, TypeError, "module must be a torch nn.Module, got NoneType"),
        ({"force": "no"}, TypeError, "force must be True or False, got 'no'"),
    ])
    def test_train_or_load(self, toy, tmp_path, kwargs, error, match):
        trained = []
        args = {"module": _model(toy), "name": "toy", "key": "k", "train_fn": trained.append, **kwargs}
        with pytest.raises(error, match=match):
            train_or_load(directory=tmp_path, **args)
        assert trained == [] and list(tmp_path.iterdir()) == []

    def test_train_config_must_be_a_train_config(self, toy):
        with pytest.raises(TypeError, match="config must be a TrainConfig, got str"):
            train(_model(toy), toy.train, "fast", device="cpu", progress=False)

    @pytest.mark.parametrize("kwargs, error, match", [
        ({"epochs": 2.5}, TypeError, "epochs must be an integer, got 2.5"),
        ({"epochs": "3"}, TypeError, "epochs must be an integer"),
        ({"batch_size": True}, TypeError, "batch_size must be an integer, got True"),
        ({"seed": 1.0}, TypeError, "seed must be an integer"),
        ({"seed": -1}, ValueError, "seed must be at least 0"),
        ({"lr": float("nan")}, ValueError, "lr must be a finite number, got nan"),
        ({"lr": float("inf")}, ValueError, "lr must be a finite number"),
        ({"weight_decay": -1e-4}, ValueError, "weight_decay must be at least 0"),
        ({"label_smoothing": "0.1"}, ValueError, "label_smoothing must be a finite number"),
        ({"optimizer": ["adam"]}, ValueError, "optimizer must be 'adam' or 'sgd'"),
    ])
    def test_train_config_values(self, kwargs, error, match):
        with pytest.raises(error, match=match):
            TrainConfig(**kwargs)

    def test_numpy_integers_are_still_integers(self):
        assert TrainConfig(epochs=np.int64(3), seed=np.int32(2)).epochs == 3


class TestExtractEmbeddings:
    def test_shape_order_and_norm(self, toy):
        model = _model(toy)
        model.train()
        emb = extract_embeddings(model, toy.test, batch_size=7, device="cpu")
        assert emb.shape == (len(toy.test), SPEC.embed_dim) and emb.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
        with torch.no_grad():
            expected = model.eval().embed(toy.test.tensors[0]).numpy()
        np.testing.assert_allclose(emb, expected, atol=1e-5)  # in dataset order, eval-mode BN

    def test_empty_dataset(self, toy):
        with pytest.raises(ValueError, match="dataset is empty"):
            extract_embeddings(_model(toy), TensorDataset(torch.zeros(0, 6), torch.zeros(0)), device="cpu")

    def test_restores_mode_and_custom_fn(self, toy):
        model = _model(toy)
        model.train()
        logits = extract_embeddings(model, toy.test, device="cpu", fn=lambda m, x: m(x)[1])
        assert logits.shape == (len(toy.test), toy.num_classes)
        assert model.training


def test_train_works_inside_no_grad():
    """A model trained lazily from inside ``torch.no_grad()`` (a cache miss) must still learn."""
    import torch
    from torch.utils.data import TensorDataset

    from backfill_lib.models import ModelSpec, build_model
    from backfill_lib.training import TrainConfig, train

    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g)
    y = (x[:, 0] > 0).long()
    model = build_model(ModelSpec("mlp", 4, 8), (4,), 2, seed=0)
    with torch.no_grad():
        history = train(model, TensorDataset(x, y), TrainConfig(epochs=5, batch_size=16, seed=0), device="cpu",
                        progress=False)
    assert history[-1] < history[0]
