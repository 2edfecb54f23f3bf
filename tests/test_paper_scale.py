"""Paper scale: ml-fct's two-branch forward map, the BT² recipe (classifier, stem, label smoothing,
warm-up, 224-px CIFAR-100), cache keys that stay put for the default recipe, and the benchmark's
arithmetic."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision

from backfill_lib import training
from backfill_lib.context import PRESETS, MethodParams
from backfill_lib.data import load_dataset, load_synthetic_data
from backfill_lib.losses import regression_loss
from backfill_lib.models import CLASSIFIERS, STEMS, CosineClassifier, ModelSpec, NormalizedClassifier, build_model
from backfill_lib.strategies import ExperimentContext, Preset, build_strategy
from backfill_lib.training import TrainConfig, cache_key, cross_entropy_loss, spec_dict, train
from backfill_lib.transforms import (FORWARD_ARCHS, ForwardTransform, MLPTransform, TwoBranchTransform,
                                     fit_forward_transform, forward_transformation)
from backfill_lib.validation import normalize_rows
from fake_cifar import write_fake_cifar100

ROOT = Path(__file__).resolve().parents[1]


def _pairs(n=400, d_old=6, d_new=10, seed=0):
    """Old vectors and new vectors that are a fixed non-linear function of them."""
    rng = np.random.default_rng(seed)
    old = normalize_rows(rng.normal(size=(n, d_old)))
    w1, w2 = rng.normal(size=(d_old, 32)), rng.normal(size=(32, d_new))
    return old, normalize_rows(np.tanh(old @ w1) @ w2)


# --- the forward map --------------------------------------------------------------------------

class TestTwoBranchTransform:
    def test_shapes_widths_and_unit_norm(self):
        h = TwoBranchTransform(6, 10).eval()
        out = h(torch.randn(5, 6))
        assert out.shape == (5, 10)
        torch.testing.assert_close(out.norm(dim=1), torch.ones(5))
        linears = lambda seq: [(m.in_features, m.out_features) for m in seq if isinstance(m, torch.nn.Linear)]
        assert linears(h.old_branch) == [(6, 12), (12, 20)]       # d_o → 2 d_o → 2 d_n
        assert linears(h.side_branch) == [(6, 12), (12, 20)]      # no side info: the old feature, same widths
        assert linears(h.mixer) == [(40, 160), (160, 160), (160, 10)]  # 4 d_n → 16 d_n → 16 d_n → d_n
        assert h.mixer[-1].bias is not None and h.old_branch[0].bias is None  # bias only where no BN follows
        assert [m.out_features for m in TwoBranchTransform(6, 10, inner=32).mixer if isinstance(m, torch.nn.Linear)] == [32, 32, 10]

    def test_without_side_information_the_old_feature_feeds_both_branches(self):
        torch.manual_seed(3)
        no_side = TwoBranchTransform(6, 10).eval()
        torch.manual_seed(3)
        with_side = TwoBranchTransform(6, 10, d_side=6).eval()  # same construction order, same weights
        x = torch.randn(7, 6)
        torch.testing.assert_close(no_side(x), with_side(x, side=x))
        assert not torch.allclose(no_side(x), with_side(x, side=torch.randn(7, 6)))

    def test_side_information_errors(self):
        with pytest.raises(ValueError, match="built without side information"):
            TwoBranchTransform(6, 10)(torch.randn(3, 6), side=torch.randn(3, 6))
        h = TwoBranchTransform(6, 10, d_side=4)
        with pytest.raises(ValueError, match=r"side must have shape \(3, 4\)"):
            h(torch.randn(3, 6))
        with pytest.raises(ValueError, match=r"side must have shape \(3, 4\).*got \(3, 5\)"):
            h(torch.randn(3, 6), side=torch.randn(3, 5))
        with pytest.raises(ValueError, match=r"expected inputs of shape \(n, 6\)"):
            h(torch.randn(3, 7), side=torch.randn(3, 4))
        with pytest.raises(ValueError, match="d_side must be a positive integer"):
            TwoBranchTransform(6, 10, d_side=0)

    def test_training_reduces_the_loss_and_fits(self):
        old, new = _pairs()
        x, y = torch.from_numpy(old), torch.from_numpy(new)
        torch.manual_seed(0)
        before = regression_loss(TwoBranchTransform(6, 10).eval()(x), y).item()
        h = fit_forward_transform(old, new, steps=300, device="cpu", arch="fct")
        assert isinstance(h, TwoBranchTransform) and not h.training
        with torch.no_grad():
            after = regression_loss(h(x), y).item()
        assert after < 0.2 * before, (before, after)
        with torch.no_grad():
            assert F.cosine_similarity(h(x), y).mean() > 0.9

    def test_forward_transformation_and_estimator_select_the_arch(self):
        assert FORWARD_ARCHS == ("mlp", "fct")
        assert isinstance(forward_transformation(4, 8), MLPTransform)
        assert isinstance(forward_transformation(4, 8, arch="fct"), TwoBranchTransform)
        old, new = _pairs(n=64)
        est = ForwardTransform(steps=5, device="cpu", arch="fct").fit(old, new)
        assert isinstance(est.module_, TwoBranchTransform) and est.get_params()["arch"] == "fct"
        assert est.transform(old).shape == (64, 10)

    def test_estimator_save_load_keeps_the_arch(self, tmp_path):
        old, new = _pairs(n=64)
        est = ForwardTransform(steps=5, device="cpu", arch="fct").fit(old, new)
        loaded = ForwardTransform.load(est.save(tmp_path / "h.pt"), device="cpu")
        assert loaded.arch == "fct" and isinstance(loaded.module_, TwoBranchTransform)
        np.testing.assert_allclose(loaded.transform(old), est.transform(old), atol=1e-6)

    @pytest.mark.parametrize("call", [
        lambda: forward_transformation(4, 8, arch="two_branch"),
        lambda: fit_forward_transform(*_pairs(n=16), steps=1, device="cpu", arch="two_branch"),
        lambda: ForwardTransform(arch="two_branch"),
    ])
    def test_bad_arch(self, call):
        with pytest.raises(ValueError, match="'two_branch'; choose one of: mlp, fct"):
            call()


class TestForwardArchParam:
    def test_default_and_bad_value(self):
        assert MethodParams().forward_arch == "mlp"
        with pytest.raises(ValueError, match="unknown forward_arch 'FCT'; choose one of: mlp, fct"):
            MethodParams(forward_arch="FCT")

    def test_strategy_uses_the_chosen_map_with_its_own_checkpoint(self, tmp_path):
        data = load_synthetic_data(n_per_class=16, dim=8)
        small = Preset(ModelSpec("mlp", 8, 8), ModelSpec("mlp", 8, 8), ModelSpec("mlp", 12, 8),
                       TrainConfig(epochs=2, batch_size=32, lr=5e-3))
        heads = {}
        for arch in ("mlp", "fct"):
            params = MethodParams(forward_arch=arch, transform_steps=20)
            ctx = ExperimentContext(data, preset=small, cache=tmp_path, progress=False, device="cpu", params=params)
            strategy = build_strategy("forward_transform", ctx)
            assert strategy is not None
            heads[arch] = ctx._heads["forward_transform"]
            assert ("fct" in ctx.trained["forward_transform"]["what"]) == (arch == "fct")
        assert isinstance(heads["mlp"], MLPTransform) and isinstance(heads["fct"], TwoBranchTransform)
        files = sorted(p.name for p in tmp_path.glob("synthetic-forward_transform-*.pt"))
        assert len(files) == 2, files  # one checkpoint per architecture: no fct run loads the mlp weights


# --- the BT² recipe: models -------------------------------------------------------------------

class TestClassifiersAndStems:
    def test_default_recipe_is_unchanged(self):
        model = build_model(ModelSpec("mlp", 6, 4), (5,), 3, seed=0)
        assert type(model.classifier) is torch.nn.Linear and model.classifier.bias is not None
        assert set(model.state_dict()) >= {"classifier.weight", "classifier.bias"}
        assert CLASSIFIERS == ("linear", "normalized", "cosine") and STEMS == ("cifar", "imagenet")

    def test_normalized_classifier_is_bt2s(self):
        model = build_model(ModelSpec("mlp", 6, 4, classifier="normalized"), (5,), 3, seed=0).eval()
        clf = model.classifier
        assert isinstance(clf, NormalizedClassifier) and not hasattr(clf, "bias")
        z = torch.randn(4, 6)
        torch.testing.assert_close(clf(z), F.normalize(z, dim=1) @ clf.weight.T)
        torch.testing.assert_close(clf(3 * z), clf(z))  # only the direction of z counts
        x = torch.randn(4, 5)
        _, logits = model(x)
        torch.testing.assert_close(logits, model.classify(model.features(x)))

    def test_cosine_classifier(self):
        clf = build_model(ModelSpec("mlp", 6, 4, classifier="cosine", classifier_scale=8.0), (5,), 3, seed=0).classifier
        assert isinstance(clf, CosineClassifier) and clf.scale == 8.0
        z = torch.randn(10, 6)
        before = clf(z)
        assert before.abs().max() <= 8.0 + 1e-5 and before.abs().max() > 1.0
        with torch.no_grad():
            clf.weight.mul_(5.0)  # the weights' norms do not count, unlike in the normalised classifier
        torch.testing.assert_close(clf(z), before)
        with pytest.raises(ValueError, match="classifier_scale must be positive"):
            build_model(ModelSpec("mlp", 6, 4, classifier="cosine", classifier_scale=0.0), (5,), 3)

    def test_imagenet_stem(self):
        model = build_model(ModelSpec("resnet50", 16, stem="imagenet"), (3, 64, 64), 5, seed=0).eval()
        conv1 = model.backbone.conv1
        assert conv1.kernel_size == (7, 7) and conv1.stride == (2, 2)
        assert isinstance(model.backbone.maxpool, torch.nn.MaxPool2d)
        with torch.no_grad():
            z, logits = model(torch.randn(2, 3, 64, 64))
        assert z.shape == (2, 16) and logits.shape == (2, 5)
        cifar = build_model(ModelSpec("resnet18", 16), (3, 32, 32), 5, seed=0)
        assert cifar.backbone.conv1.stride == (1, 1) and isinstance(cifar.backbone.maxpool, torch.nn.Identity)

    def test_bad_specs(self):
        with pytest.raises(ValueError, match="unknown classifier 'cos'; choose one of: linear, normalized, cosine"):
            build_model(ModelSpec("mlp", 6, classifier="cos"), (5,), 3)
        with pytest.raises(ValueError, match="unknown stem 'vit'; choose one of: cifar, imagenet"):
            build_model(ModelSpec("resnet18", 6, stem="vit"), (3, 32, 32), 3)
        with pytest.raises(ValueError, match="stem 'imagenet' applies to the ResNets only"):
            build_model(ModelSpec("small_cnn", 6, stem="imagenet"), (1, 8, 8), 3)


# --- the BT² recipe: training -----------------------------------------------------------------

class TestTrainConfig:
    def test_label_smoothing_reaches_the_default_loss(self):
        model = build_model(ModelSpec("mlp", 6, 4), (5,), 3, seed=0)
        x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
        _, logits = model(x)
        torch.testing.assert_close(cross_entropy_loss(model, x, y, label_smoothing=0.1),
                                   F.cross_entropy(logits, y, label_smoothing=0.1))
        data = torch.utils.data.TensorDataset(x, y)
        hist = {}
        for ls in (0.0, 0.1):  # same seed and data: only the smoothing differs, so the losses do
            m = build_model(ModelSpec("mlp", 6, 4), (5,), 3, seed=0)
            hist[ls] = train(m, data, TrainConfig(epochs=1, batch_size=8, label_smoothing=ls), device="cpu",
                             progress=False)
        assert hist[0.0][0] == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)
        assert hist[0.1][0] == pytest.approx(F.cross_entropy(logits, y, label_smoothing=0.1).item(), rel=1e-5)

    def test_custom_loss_warns_that_it_ignores_label_smoothing(self):
        model = build_model(ModelSpec("mlp", 6, 4), (5,), 3, seed=0)
        data = torch.utils.data.TensorDataset(torch.randn(8, 5), torch.randint(0, 3, (8,)))
        with pytest.warns(UserWarning, match="label_smoothing=0.1 applies to the default cross-entropy objective only"):
            train(model, data, TrainConfig(epochs=1, batch_size=8, label_smoothing=0.1),
                  loss_fn=lambda m, x, y: F.cross_entropy(m(x)[1], y), device="cpu", progress=False)

    def test_warmup_then_cosine(self):
        param = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.SGD([param], lr=1.0)
        sched = training._schedule(opt, TrainConfig(epochs=4, lr=1.0, warmup_epochs=1), steps_per_epoch=10)
        lrs = []
        for _ in range(40):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        np.testing.assert_allclose(lrs[:10], np.arange(1, 11) / 10)      # linear warm-up to the peak
        assert lrs[10] == pytest.approx(1.0) and all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
        assert lrs[25] == pytest.approx(0.5 * (1 + np.cos(np.pi * 15 / 30)))
        no_warmup = training._schedule(torch.optim.SGD([param], lr=1.0), TrainConfig(epochs=4, lr=1.0), 10)
        assert isinstance(no_warmup, torch.optim.lr_scheduler.CosineAnnealingLR)  # the schedule as it was

    @pytest.mark.parametrize("kwargs,match", [
        ({"label_smoothing": 1.0}, r"label_smoothing must be in \[0, 1\)"),
        ({"label_smoothing": -0.1}, r"label_smoothing must be in \[0, 1\)"),
        ({"epochs": 5, "warmup_epochs": 5}, "warmup_epochs must be between 0 and epochs - 1 = 4"),
        ({"warmup_epochs": -1}, "warmup_epochs must be between 0"),
    ])
    def test_bad_values(self, kwargs, match):
        with pytest.raises(ValueError, match=match):
            TrainConfig(**kwargs)


class TestCacheKeys:
    def test_default_recipe_keeps_its_keys(self):
        # Before the new fields existed, the key hashed exactly these dicts (dataclasses.asdict).
        spec_before = {"arch": "resnet18", "embed_dim": 128, "width": 32}
        config_before = {"epochs": 100, "batch_size": 128, "lr": 0.1, "weight_decay": 5e-4, "optimizer": "sgd", "seed": 0}
        assert spec_dict(ModelSpec("resnet18", 128)) == spec_before
        assert ModelSpec("resnet18", 128).to_dict() == spec_before
        assert cache_key(spec=ModelSpec("resnet18", 128), config=PRESETS["cifar100"].train) == \
            cache_key(spec=spec_before, config=config_before)

    @pytest.mark.parametrize("change", [{"classifier": "normalized"}, {"classifier": "cosine"}, {"stem": "imagenet"},
                                        {"classifier": "cosine", "classifier_scale": 8.0}])
    def test_new_model_fields_change_the_key(self, change):
        base = ModelSpec("resnet50", 128, classifier="cosine") if "classifier_scale" in change else ModelSpec("resnet50", 128)
        assert cache_key(spec=base) != cache_key(spec=ModelSpec("resnet50", 128, **change))

    @pytest.mark.parametrize("change", [{"label_smoothing": 0.1}, {"warmup_epochs": 5}])
    def test_new_train_fields_change_the_key(self, change):
        assert cache_key(config=TrainConfig()) != cache_key(config=TrainConfig(**change))


# --- the BT² recipe: preset and 224-px CIFAR-100 ----------------------------------------------

@pytest.fixture
def fake_cifar(tmp_path, monkeypatch):
    write_fake_cifar100(tmp_path, n_train=40, n_test=20)
    # torchvision checks the md5 sums of the real archive's files; the fake ones cannot match them
    monkeypatch.setattr(torchvision.datasets.CIFAR100, "_check_integrity", lambda self: True)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)
    return tmp_path


class TestBt2Preset:
    def test_preset_holds_bt2s_recipe(self):
        p = PRESETS["cifar100_bt2"]
        for spec in (p.old, p.new):
            assert (spec.arch, spec.embed_dim, spec.classifier, spec.stem) == ("resnet50", 128, "normalized", "imagenet")
        t = p.train
        assert (t.epochs, t.batch_size, t.lr, t.optimizer, t.label_smoothing, t.warmup_epochs) == (100, 128, 1e-3, "adam", 0.1, 5)
        ours = PRESETS["cifar100"]
        assert ours.old == ModelSpec("resnet18", 128) and ours.train.label_smoothing == 0.0  # ours unchanged

    def test_cifar100_at_224_px(self, fake_cifar):
        d = load_dataset("cifar100", root=fake_cifar, download=False, image_size=224)
        assert d.input_shape == (3, 224, 224) and d.info["image_size"] == 224
        x, _ = d.test[0]
        assert x.shape == (3, 224, 224) and d.train[0][0].shape == (3, 224, 224)
        assert "image_size" not in load_dataset("cifar100", root=fake_cifar, download=False).info  # 32 px: key as before
        with pytest.raises(ValueError, match="image_size must be an integer of at least 32"):
            load_dataset("cifar100", root=fake_cifar, download=False, image_size=16)

    def test_context_with_the_bt2_preset(self, fake_cifar, tmp_path):
        d = load_dataset("cifar100", root=fake_cifar, download=False, image_size=224)
        ctx = ExperimentContext(d, preset=PRESETS["cifar100_bt2"], cache=tmp_path / "ck", progress=False, device="cpu")
        assert ctx.new_spec.stem == "imagenet" and ctx.old_spec.classifier == "normalized"

    def test_context_keeps_the_recipes_schedule(self, fake_cifar, tmp_path):
        d = load_dataset("cifar100", root=fake_cifar, download=False, image_size=224)
        ctx = ExperimentContext(d, preset=PRESETS["cifar100_bt2"], cache=tmp_path / "ck", progress=False, device="cpu", seed=3)
        assert ctx.train_config == TrainConfig(100, 128, 1e-3, 2**-15, "adam", seed=3, label_smoothing=0.1,
                                               warmup_epochs=5)


# --- the benchmark's arithmetic and its committed result ---------------------------------------

def _benchmark():
    spec = importlib.util.spec_from_file_location("paper_scale", ROOT / "benchmarks" / "paper_scale.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["paper_scale"] = module
    spec.loader.exec_module(module)
    return module


def test_benchmark_extrapolates_linearly_and_counts_steps():
    bench = _benchmark()
    assert bench.steps_per_epoch(50_000, 128) == 390 and bench.steps_per_epoch(25_000, 128) == 195
    measured = [{"batch": 4, "seconds_per_step": 2.0, "cpu_seconds_per_step": 1.0},
                {"batch": 8, "seconds_per_step": 4.0, "cpu_seconds_per_step": 2.0}]
    s = bench.recipe_summary("cifar100_bt2", measured)
    assert s["seconds_per_step_at_batch"] == {"wall": 64.0, "cpu": 32.0}  # 4 s × 128 / 8
    assert s["seconds_per_step_how"].startswith("extrapolated")
    assert s["epoch_hours_this_cpu"]["new"]["cpu"] == pytest.approx(32.0 * 390 / 3600, abs=0.01)
    at_batch = bench.recipe_summary("cifar100", [{"batch": 128, "seconds_per_step": 3.0, "cpu_seconds_per_step": 2.5}])
    assert at_batch["seconds_per_step_how"] == "measured at the recipe's batch"
    assert at_batch["seconds_per_step_at_batch"] == {"wall": 3.0, "cpu": 2.5}


def test_committed_result_is_labelled_as_this_cpu():
    path = ROOT / "results" / "paper_scale.json"
    result = json.loads(path.read_text())
    assert result["gpu"] == "not measured" and "CPU" in result["machine"]["label"]
    assert set(result["recipes"]) == {"cifar100", "cifar100_bt2"}
    assert result["download"]["md5"] == torchvision.datasets.CIFAR100.tgz_md5
    for r in result["recipes"].values():
        assert r["measured"] and all(m["timed_steps"] >= 1 for m in r["measured"])
    fm = result["forward_map_digits"]["results"]
    assert set(fm) == {f"{s}/{a}" for s in ("homogeneous", "heterogeneous") for a in FORWARD_ARCHS}
    md = (ROOT / "results" / "paper_scale.md").read_text()
    assert "measured on this" in md and 'DATASET = "cifar100"' in md and 'forward_arch="fct"' in md
