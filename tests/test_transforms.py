"""Transformations ψ, h, ρ (METHOD §2, §3.4, §3.5): shapes, clear errors, identity start, learning."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from backfill_lib.transforms import (CompatibilityHeads, MLPTransform, ResidualEmbedding, TRANSFORM_CONFIG,
                                     apply_transform, fit_forward_transform, fit_reverse_transform,
                                     forward_transformation, reverse_transformation)


def _unit(rng, n, d):
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_mlp_transform_shapes_and_unit_output():
    psi = reverse_transformation(d_new=6, d_old=4)
    assert isinstance(psi, MLPTransform) and (psi.d_in, psi.d_out) == (6, 4)
    assert psi.net[0].out_features == 12  # hidden 2·max(d_o, d_n)
    out = apply_transform(psi, _unit(np.random.default_rng(0), 5, 6))
    assert out.shape == (5, 4) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("bad", [np.zeros((3, 5)), np.zeros(6), np.zeros((2, 3, 6))])
def test_apply_transform_rejects_wrong_shapes(bad):
    with pytest.raises(ValueError, match="dimension|2-D"):
        apply_transform(forward_transformation(d_old=6, d_new=4), bad, name="old")


def test_modules_reject_wrong_input_dimension():
    with pytest.raises(ValueError, match=r"\(n, 6\)"):
        reverse_transformation(6, 4)(torch.zeros(2, 5))
    with pytest.raises(ValueError, match=r"\(n, 3\)"):
        ResidualEmbedding(3)(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="positive integer"):
        reverse_transformation(0, 4)


def test_residual_embedding_starts_at_identity():
    z = _unit(np.random.default_rng(1), 7, 5)
    np.testing.assert_allclose(apply_transform(ResidualEmbedding(5), z), z, atol=1e-6)


def test_fit_checks_inputs():
    rng = np.random.default_rng(0)
    new, old, y = _unit(rng, 20, 6), _unit(rng, 20, 4), np.arange(20) % 2
    with pytest.raises(ValueError, match="same images"):
        fit_reverse_transform(new, old[:10])
    with pytest.raises(ValueError, match="needs labels"):
        fit_reverse_transform(new, old, objective="mc")
    with pytest.raises(ValueError, match="learn_rho"):
        fit_reverse_transform(new, old, y, objective="rt", learn_rho=True)
    with pytest.raises(ValueError, match="negatives"):
        fit_reverse_transform(new, old, y, objective="mc", negatives="some")
    with pytest.raises(ValueError, match="labels has 3"):
        fit_reverse_transform(new, old, y[:3], objective="mc")


def _rotated_pair(n=256, d=8, seed=0):
    rng = np.random.default_rng(seed)
    a = _unit(rng, n, d)
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    return a, (a @ q).astype(np.float32)


FAST = replace(TRANSFORM_CONFIG, batch_size=128, lr=1e-2)
STEPS = 80


def test_forward_transform_learns_a_rotation():
    old, new = _rotated_pair()
    h = fit_forward_transform(old, new, config=FAST, steps=STEPS, device="cpu")
    cos = (apply_transform(h, old) * new).sum(axis=1)
    assert cos.mean() > 0.9


def test_reverse_transform_learns_a_rotation_and_only_psi_exists():
    new, old = _rotated_pair(seed=1)
    heads = fit_reverse_transform(new, old, config=FAST, steps=STEPS, device="cpu")
    assert heads.rho is None
    assert (apply_transform(heads.psi, new) * old).sum(axis=1).mean() > 0.9


def test_metric_compatible_fit_trains_psi_and_rho_from_identity():
    rng = np.random.default_rng(2)
    y = np.arange(200) % 4
    new = _unit(rng, 200, 6) * 0.5 + np.eye(4, 6, dtype=np.float32)[y]
    new /= np.linalg.norm(new, axis=1, keepdims=True)
    old = _unit(rng, 200, 4) * 0.5 + np.eye(4, dtype=np.float32)[y]
    old /= np.linalg.norm(old, axis=1, keepdims=True)
    start = CompatibilityHeads(6, 4, learn_rho=True)
    heads = fit_reverse_transform(new, old, y, objective="mc", learn_rho=True, config=FAST, steps=20,
                                  device="cpu")
    assert heads.rho.residual[-1].weight.abs().sum() > 0  # ρ moved away from the identity
    psi_q = apply_transform(heads.psi, new)
    same = y[:, None] == y[None, :]
    cross = psi_q @ old.T                                # transformed query vs old-stored items
    assert cross[same].mean() > cross[~same].mean() + 0.5
    assert start.rho.residual[-1].weight.abs().sum() == 0


def test_schedule_counts_optimiser_steps():
    from backfill_lib.transforms import schedule
    assert schedule(TRANSFORM_CONFIG, n_items=900, steps=1000).epochs == 334   # 3 full batches of 256 per epoch
    assert schedule(TRANSFORM_CONFIG, n_items=100, steps=50).epochs == 50      # one (partial) batch per epoch
    assert schedule(TRANSFORM_CONFIG, n_items=100, steps=None) == TRANSFORM_CONFIG
    with pytest.raises(ValueError, match="steps"):
        schedule(TRANSFORM_CONFIG, n_items=100, steps=0)
