"""Losses of METHOD §3: hand-computed cases, a brute-force reference, gradients, and a falling loss."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from backfill_lib.losses import (bct_influence_loss, bct_objective, metric_compatible_loss, ra_bct_loss,
                                 ra_bct_objective, regression_loss, reverse_loss)
from backfill_lib.models import ModelSpec, build_model
from backfill_lib.training import TrainConfig, train

E = torch.eye(2)


def _toy_models(d_old=8, d_new=8, seed=0):
    old = build_model(ModelSpec("mlp", d_old, 8), (6,), 4, seed=seed)
    new = build_model(ModelSpec("mlp", d_new, 8), (6,), 4, seed=seed + 1)
    return old, new


def _toy_data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 4
    centres = torch.randn(4, 6, generator=g) * 3
    return torch.utils.data.TensorDataset(centres[y] + torch.randn(n, 6, generator=g), y)


# --- BCT -------------------------------------------------------------------------------------------

def test_bct_influence_hand_computed():
    clf = nn.Linear(2, 3, bias=False)
    with torch.no_grad():
        clf.weight.copy_(torch.tensor([[2.0, 0.0], [0.0, 0.0], [5.0, 0.0]]))
    z = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    y = torch.tensor([0, 2])  # class 2 is new: ignored, and its logit is not in the softmax
    loss = bct_influence_loss(z, y, clf, old_classes=(0, 1))
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-2.0)), rel=1e-6)


def test_bct_influence_without_old_class_sample_is_zero_and_differentiable():
    z = torch.randn(3, 2, requires_grad=True)
    loss = bct_influence_loss(z, torch.tensor([2, 2, 2]), nn.Linear(2, 3), old_classes=(0, 1))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(z.grad, torch.zeros_like(z))


def test_bct_gradients_reach_only_the_new_model():
    old, new = _toy_models()
    x, y = _toy_data(16)[:]
    loss = bct_objective(old, old_classes=(0, 1), lam=1.0)(new, x, y)
    loss.backward()
    assert all(p.grad is None for p in old.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in new.embedding.parameters())


def test_bct_dimension_mismatch_raises():
    old, new = _toy_models(d_old=8, d_new=5)
    x, y = _toy_data(8)[:]
    with pytest.raises(ValueError, match="d_n = d_o"):
        bct_objective(old, old_classes=(0, 1))(new, x, y)


def test_bct_loss_falls_on_toy_problem():
    old, new = _toy_models()
    data = _toy_data()
    train(old, data, TrainConfig(epochs=10, batch_size=32, seed=0), device="cpu", progress=False)
    history = train(new, data, TrainConfig(epochs=15, batch_size=32, seed=0), device="cpu", progress=False,
                    loss_fn=bct_objective(old, old_classes=(0, 1)))
    assert history[-1] < 0.7 * history[0]


# --- RA-BCT ----------------------------------------------------------------------------------------

def test_ra_bct_hand_computed():
    # anchor e1: positive old e1 (s = 1), negatives old e2 and new e2 (s = 0 each)
    loss = ra_bct_loss(E, E, torch.tensor([0, 1]), tau=1.0)
    assert loss.item() == pytest.approx(math.log(math.e + 2) - 1, rel=1e-6)


def test_ra_bct_same_class_items_are_not_negatives():
    new = F.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.2], [0.0, 1.0]]), dim=1)
    y_same = torch.tensor([0, 0, 1])
    y_diff = torch.tensor([0, 1, 2])
    assert ra_bct_loss(new, new, y_same, 0.5) < ra_bct_loss(new, new, y_diff, 0.5)


def test_ra_bct_old_features_get_no_gradient_and_shapes_must_match():
    new = F.normalize(torch.randn(6, 4), dim=1).requires_grad_()
    old = F.normalize(torch.randn(6, 4), dim=1).requires_grad_()
    ra_bct_loss(new, old, torch.arange(6) % 3).backward()
    assert old.grad is None and new.grad is not None
    with pytest.raises(ValueError, match="d_n = d_o"):
        ra_bct_loss(new, torch.randn(6, 5), torch.arange(6))


def test_ra_bct_gradients_reach_only_the_new_model_and_loss_falls():
    old, new = _toy_models()
    data = _toy_data()
    x, y = data[:16]
    ra_bct_objective(old)(new, x, y).backward()
    assert all(p.grad is None for p in old.parameters())
    assert all(p.grad is not None for p in new.parameters())
    new.zero_grad()
    history = train(new, data, TrainConfig(epochs=15, batch_size=32, seed=0), device="cpu", progress=False,
                    loss_fn=ra_bct_objective(old, tau=0.05))
    assert history[-1] < 0.7 * history[0]


# --- L_rt ------------------------------------------------------------------------------------------

def test_reverse_loss_hand_computed_and_target_detached():
    psi = torch.tensor([[1.0, 0.0], [0.6, 0.8]], requires_grad=True)
    old = torch.tensor([[0.0, 1.0], [0.6, 0.8]], requires_grad=True)
    loss = reverse_loss(psi, old)
    assert loss.item() == pytest.approx(1.0)  # (2 + 0) / 2
    loss.backward()
    assert old.grad is None and psi.grad is not None


def test_regression_losses_reject_shape_mismatch():
    with pytest.raises(ValueError, match="old space"):
        reverse_loss(torch.zeros(3, 4), torch.zeros(3, 5))
    with pytest.raises(ValueError, match="target space"):
        regression_loss(torch.zeros(3, 4), torch.zeros(2, 4))


# --- L_mc ------------------------------------------------------------------------------------------

def _l_mc_brute_force(psi, old, rho, y, tau, negatives):
    """One anchor at a time, straight from METHOD §3.5."""
    losses = []
    for i in range(len(y)):
        terms = []  # (logit, is_positive)
        for j in range(len(y)):
            same = bool(y[i] == y[j])
            if same or negatives in ("both", "old"):
                terms.append((float(psi[i] @ old[j]) / tau, same))
            if j != i and (same or negatives in ("both", "new")):
                terms.append((float(rho[i] @ rho[j]) / tau, same))
        log_z = math.log(sum(math.exp(s) for s, _ in terms))
        pos = [s - log_z for s, p in terms if p]
        losses.append(-sum(pos) / len(pos))
    return sum(losses) / len(losses)


def test_l_mc_hand_computed():
    # anchor e1: old set {e1 positive (s = 1), e2 negative (0)}, new set {e2 negative (0)}
    loss = metric_compatible_loss(E, E, E, torch.tensor([0, 1]), tau=1.0)
    assert loss.item() == pytest.approx(math.log(math.e + 2) - 1, rel=1e-6)


@pytest.mark.parametrize("negatives", ["both", "old", "new"])
def test_l_mc_matches_brute_force(negatives):
    g = torch.Generator().manual_seed(1)
    psi, old = F.normalize(torch.randn(10, 3, generator=g), dim=1), F.normalize(torch.randn(10, 3, generator=g), dim=1)
    rho = F.normalize(torch.randn(10, 5, generator=g), dim=1)
    y = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3, 0, 2])
    got = metric_compatible_loss(psi, old, rho, y, tau=0.3, negatives=negatives).item()
    assert got == pytest.approx(_l_mc_brute_force(psi, old, rho, y, 0.3, negatives), rel=1e-5)


def test_l_mc_is_stable_at_small_temperature():
    x = F.normalize(torch.randn(8, 4), dim=1)
    loss = metric_compatible_loss(x, x, x, torch.arange(8) % 2, tau=1e-3)
    assert torch.isfinite(loss)


def test_l_mc_gradients_reach_psi_and_rho_not_old():
    psi = F.normalize(torch.randn(6, 3), dim=1).requires_grad_()
    old = F.normalize(torch.randn(6, 3), dim=1).requires_grad_()
    rho = F.normalize(torch.randn(6, 4), dim=1).requires_grad_()
    metric_compatible_loss(psi, old, rho, torch.arange(6) % 2).backward()
    assert old.grad is None and psi.grad.abs().sum() > 0 and rho.grad.abs().sum() > 0


def test_l_mc_rejects_bad_arguments():
    x = F.normalize(torch.randn(4, 3), dim=1)
    y = torch.arange(4)
    with pytest.raises(ValueError, match="negatives"):
        metric_compatible_loss(x, x, x, y, negatives="neither")
    with pytest.raises(ValueError, match="tau"):
        metric_compatible_loss(x, x, x, y, tau=0.0)
    with pytest.raises(ValueError, match="old space"):
        metric_compatible_loss(x, torch.zeros(4, 2), x, y)


def test_l_mc_falls_when_psi_and_rho_train():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(40) % 4
    old = F.normalize(torch.randn(4, 6, generator=g)[y] + 0.3 * torch.randn(40, 6, generator=g), dim=1)
    new = F.normalize(torch.randn(4, 8, generator=g)[y] + 0.3 * torch.randn(40, 8, generator=g), dim=1)
    psi, rho = nn.Linear(8, 6), nn.Linear(8, 8)
    opt = torch.optim.Adam([*psi.parameters(), *rho.parameters()], lr=1e-2)
    losses = []
    for _ in range(100):
        loss = metric_compatible_loss(F.normalize(psi(new), dim=1), old, F.normalize(rho(new), dim=1), y, tau=0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
