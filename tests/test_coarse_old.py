"""An old model trained on coarse labels (ExperimentContext(old_label_map=...), issue 17)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from backfill_lib.context import RelabelledDataset, check_label_map, init_seed
from backfill_lib.data import FASHION_MNIST_COARSE, load_dataset
from backfill_lib.strategies import PRESETS, ExperimentContext
from backfill_lib.training import cache_key

TINY = replace(PRESETS["digits"], train=replace(PRESETS["digits"].train, epochs=1))


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _ctx(data, tmp_path, **kw):
    return ExperimentContext(data, preset=kw.pop("preset", TINY), cache=tmp_path, progress=False, **kw)


def test_coarse_old_model_has_one_output_per_coarse_class_and_sees_every_class(digits, tmp_path):
    ctx = _ctx(digits, tmp_path, old_label_map=FASHION_MNIST_COARSE)
    model = ctx.model("old")
    assert model.classifier.out_features == 3
    assert "3 coarse labels of all 10 classes" in ctx.trained["old"]["what"]
    fine = _ctx(digits, tmp_path)
    assert fine.model("old").classifier.out_features == 10
    assert ctx._keys["old"] != fine._keys["old"]
    # Its classifier predicts the coarse classes of every class's images (trained for one epoch: most of them).
    x = torch.stack([digits.train_plain[i][0] for i in range(len(digits.train_labels))])
    with torch.no_grad():
        pred = model.classifier(model.features(x)).argmax(1).numpy()
    coarse = torch.as_tensor(FASHION_MNIST_COARSE)[torch.as_tensor(digits.train_labels)].numpy()
    assert (pred == coarse).mean() > 0.5


def test_existing_keys_do_not_change(digits, tmp_path):
    ctx = _ctx(digits, tmp_path)
    ctx.model("old")
    # The key as train_model computed it before old_label_map existed.
    expected = cache_key(name="old", spec=TINY.old, classes=digits.old_classes, config=ctx.train_config,
                         data=ctx._data_key(), init_seed=init_seed("old", 0), extra={})
    assert ctx._keys["old"] == expected
    assert ctx.old_label_map is None


def test_label_map_keys_every_model_but_the_new_one(digits, tmp_path):
    fine, coarse = _ctx(digits, tmp_path), _ctx(digits, tmp_path, old_label_map=FASHION_MNIST_COARSE)
    for ctx in (fine, coarse):
        ctx.model("new")
        ctx.train_model("new_bct", ctx.new_spec, extra_key={"loss": "x"})  # a model trained through the old one
    assert fine._keys["new"] == coarse._keys["new"]  # the new model never sees the old one: shared
    assert fine._keys["new_bct"] != coarse._keys["new_bct"]


def test_preset_carries_the_map_and_the_context_overrides_it(digits, tmp_path):
    preset = replace(TINY, old_label_map=FASHION_MNIST_COARSE)
    assert _ctx(digits, tmp_path, preset=preset).old_label_map == FASHION_MNIST_COARSE
    other = (0, 1) * 5
    assert _ctx(digits, tmp_path, preset=preset, old_label_map=list(other)).old_label_map == other
    assert PRESETS["fashion_mnist"].old_label_map is None


@pytest.mark.parametrize("bad, match", [
    ((0, 1, 2), "has 3 entries but the dataset has 10"),
    ((0,) * 10, "1 coarse classes"),
    (tuple(range(10)), "10 coarse classes"),
    ((0, 2) * 5, r"leaves coarse class\(es\) \[1\] empty"),
    ((0, 1, -1, 0, 1, 0, 1, 0, 1, 0), "integers >= 0"),
    ((0, 1, 0.5, 0, 1, 0, 1, 0, 1, 0), "integers >= 0"),
])
def test_bad_label_maps_are_refused(digits, tmp_path, bad, match):
    with pytest.raises(ValueError, match=match):
        _ctx(digits, tmp_path, old_label_map=bad)


def test_check_label_map_type_and_relabelled_view():
    with pytest.raises(TypeError, match="sequence of ints"):
        check_label_map("0120", 4)
    assert check_label_map([0, 1, 1], 3) == (0, 1, 1)
    base = torch.utils.data.TensorDataset(torch.zeros(4, 2), torch.tensor([0, 1, 2, 1]))
    view = RelabelledDataset(base, (0, 1, 1))
    assert len(view) == 4 and [int(view[i][1]) for i in range(4)] == [0, 1, 1, 1]


def test_bct_is_not_applicable_and_uncertainty_uses_the_coarse_head(digits, tmp_path):
    # BCT read the fine old-class columns of a 3-output classifier: an IndexError, not a reason
    from backfill_lib.strategies import NotApplicable, _old_uncertainty, build_strategy
    ctx = _ctx(digits, tmp_path, old_label_map=FASHION_MNIST_COARSE)
    with pytest.raises(NotApplicable, match="coarse labels"):
        build_strategy("bct", ctx)
    u = _old_uncertainty(ctx)
    assert u.shape == (len(digits.test_labels),) and ((u >= 0) & (u <= 1 - 1 / 3 + 1e-6)).all()
