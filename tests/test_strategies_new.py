"""Strategies of issue 9: bct_pseudo (BCT through old-feature class means) and rank_merge_calibrated."""

import math

import numpy as np
import pytest
import torch

from backfill_lib.context import MethodParams
from backfill_lib.data import load_dataset
from backfill_lib.losses import bct_pseudo_influence_loss, bct_pseudo_objective, pseudo_classifier
from backfill_lib.models import ModelSpec, build_model
from backfill_lib.strategies import ExperimentContext, NotApplicable, Preset, build_strategy
from backfill_lib.training import TrainConfig

SMALL = Preset(old=ModelSpec("mlp", 8, 8), new=ModelSpec("mlp", 8, 8), new_heterogeneous=ModelSpec("mlp", 12, 8),
               train=TrainConfig(epochs=2, batch_size=32, lr=5e-3))
DATA = {"n_per_class": 16, "dim": 8}


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic", **DATA)


def _ctx(data, cache, **kwargs):
    return ExperimentContext(data, preset=SMALL, device="cpu", progress=False, cache=cache, **kwargs)


# --- bct_pseudo ------------------------------------------------------------------------------------

def test_pseudo_classifier_is_the_normalised_class_mean():
    feats = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [-1.0, 0.0]], dtype=np.float32)
    w = pseudo_classifier(feats, [0, 0, 1, 2], 3)
    expected = np.array([[1, 1], [0.6, 0.8], [-1, 0]]) / np.array([[math.sqrt(2)], [1], [1]])
    np.testing.assert_allclose(w.numpy(), expected, rtol=1e-6)
    assert not w.requires_grad


def test_pseudo_classifier_refuses_a_class_without_images():
    with pytest.raises(ValueError, match=r"class\(es\) \[1\] have no training image"):
        pseudo_classifier([[1.0, 0.0], [0.0, 1.0]], [0, 2], 3)
    with pytest.raises(ValueError, match="is zero"):
        pseudo_classifier([[1.0, 0.0], [-1.0, 0.0]], [0, 0], 1)
    with pytest.raises(ValueError, match=r"labels must lie in 0 .. 1"):
        pseudo_classifier([[1.0, 0.0]], [2], 2)


def test_bct_pseudo_influence_hand_computed():
    # Two classes with means e1 and e2; feature z = (2, 0): logits (2, 0).
    w = torch.eye(2)
    z = torch.tensor([[2.0, 0.0], [2.0, 0.0]], requires_grad=True)
    y = torch.tensor([0, 1])  # class 1 is a class the old model never saw: it counts too
    loss = bct_pseudo_influence_loss(z, y, w)
    expected = (math.log(1 + math.exp(-2.0)) + math.log(1 + math.exp(2.0))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    # d/dz of CE through W_p = I: (softmax(z) - onehot) / B per row.
    p = 1 / (1 + math.exp(-2.0))
    np.testing.assert_allclose(z.grad.numpy(), [[(p - 1) / 2, (1 - p) / 2], [p / 2, (1 - p - 1) / 2]], rtol=1e-5)


def test_bct_pseudo_objective_adds_lambda_times_the_influence():
    new = build_model(ModelSpec("mlp", 4, 8), (6,), 3, seed=1)
    x, y = torch.randn(10, 6, generator=torch.Generator().manual_seed(0)), torch.arange(10) % 3
    w = torch.nn.functional.normalize(torch.randn(3, 4, generator=torch.Generator().manual_seed(1)), dim=1)
    ce = torch.nn.functional.cross_entropy(new.classifier(new.features(x)), y)
    influence = bct_pseudo_influence_loss(new.features(x), y, w)
    total = bct_pseudo_objective(w, lam=10.0)(new, x, y)
    assert total.item() == pytest.approx(ce.item() + 10.0 * influence.item(), rel=1e-5)
    total.backward()
    assert all(p.grad is not None for p in new.embedding.parameters())
    with pytest.raises(ValueError, match="lam must be non-negative"):
        bct_pseudo_objective(w, lam=-1.0)
    with pytest.raises(ValueError, match="BCT needs d_n = d_o"):
        bct_pseudo_influence_loss(torch.zeros(2, 5), torch.tensor([0, 1]), w)


def test_bct_pseudo_builds_trains_once_and_is_cached(data, tmp_path):
    ctx = _ctx(data, tmp_path)
    s = build_strategy("bct_pseudo", ctx)
    assert s.name == "bct_pseudo" and s.backbone_passes == 1 and s.queries_are_gallery
    np.testing.assert_array_equal(s.gallery_old, ctx.embeddings("old"))
    np.testing.assert_array_equal(s.gallery_new, ctx.embeddings("new_bct_pseudo"))
    assert not ctx.trained["new_bct_pseudo"]["cached"] and "λ=1" in ctx.trained["new_bct_pseudo"]["what"]
    again = _ctx(data, tmp_path)
    np.testing.assert_array_equal(build_strategy("bct_pseudo", again).gallery_new, s.gallery_new)
    assert again.trained["new_bct_pseudo"]["cached"]
    # λ changes the weights, so it is part of the checkpoint key: no stale model is loaded.
    other = _ctx(data, tmp_path, params=MethodParams(bct_pseudo_lambda=10.0))
    assert not np.array_equal(build_strategy("bct_pseudo", other).gallery_new, s.gallery_new)
    assert not other.trained["new_bct_pseudo"]["cached"]


def test_bct_pseudo_not_applicable_when_dimensions_differ(data, tmp_path):
    ctx = _ctx(data, tmp_path, setting="heterogeneous")
    with pytest.raises(NotApplicable, match="needs d_n = d_o"):
        build_strategy("bct_pseudo", ctx)
    assert "new_bct_pseudo" not in ctx.trained  # refused before any training
