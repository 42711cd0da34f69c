"""Losses: known answers on hand-built cases, and where each loss sends its gradient."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from oal_trainer.losses import (
    CLUB,
    FeatureAdapter,
    LossInputError,
    club_step_losses,
    energy_regularizer,
    energy_score,
    feature_kd_loss,
    logit_kd_loss,
    outlier_exposure_loss,
)

torch.set_num_threads(1)


def _kl_by_hand(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(p) || softmax(q)) per row, summed over classes, averaged over rows."""
    p = torch.softmax(p_logits, dim=1)
    return (p * (torch.log(p) - torch.log_softmax(q_logits, dim=1))).sum(dim=1).mean()


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_logit_kd_is_zero_for_equal_logits_and_matches_kl_otherwise(temperature):
    generator = torch.Generator().manual_seed(0)
    teacher = torch.randn(6, 5, generator=generator)
    student = torch.randn(6, 5, generator=generator)
    assert logit_kd_loss(teacher.clone(), teacher, temperature).abs().item() < 1e-6
    value = logit_kd_loss(student, teacher, temperature)
    expected = _kl_by_hand(teacher / temperature, student / temperature) * temperature**2
    assert value.item() > 0
    assert value.item() == pytest.approx(expected.item(), rel=1e-5)


def test_logit_kd_is_zero_for_logits_that_differ_by_a_constant_per_row():
    # softmax is shift-invariant: same distribution, so no distillation signal.
    logits = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))
    shifted = logits + torch.arange(4.0).unsqueeze(1)
    assert logit_kd_loss(shifted, logits).abs().item() < 1e-6


def test_feature_kd_zero_for_equal_features_positive_and_trains_the_adapter():
    generator = torch.Generator().manual_seed(2)
    teacher_features = torch.randn(8, 6, generator=generator)
    adapter = FeatureAdapter(teacher_dim=6, student_dim=4)
    adapted = adapter(teacher_features)  # (8, 4)
    assert adapted.shape == (8, 4)
    assert feature_kd_loss(adapted.detach().clone(), adapted.detach()).abs().item() < 1e-6
    student = torch.randn(8, 4, generator=generator, requires_grad=True)
    loss = feature_kd_loss(student, adapted)
    assert loss.item() == pytest.approx(_kl_by_hand(adapted, student).item(), rel=1e-5)
    assert loss.item() > 0
    loss.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    linear = adapter.net[1]
    assert linear.weight.grad is not None and linear.weight.grad.abs().sum() > 0


def test_kd_refuses_mismatched_shapes_naming_both_arguments():
    with pytest.raises(LossInputError, match="student_logits.*teacher_logits"):
        logit_kd_loss(torch.zeros(4, 3), torch.zeros(4, 5))
    with pytest.raises(LossInputError, match="temperature"):
        logit_kd_loss(torch.zeros(4, 3), torch.zeros(4, 3), temperature=0.0)
    with pytest.raises(LossInputError, match="teacher_features"):
        FeatureAdapter(6, 4)(torch.zeros(3, 5))


def _club_with_set_weights(log_variance: float) -> CLUB:
    """x_dim = y_dim = hidden = 1: mu(x) = relu(x), lv(x) = log_variance everywhere."""
    club = CLUB(x_dim=1, y_dim=1, hidden_dim=1)
    with torch.no_grad():
        for layer in (club.mu_net[0], club.mu_net[2]):  # identity through the ReLU for x >= 0
            layer.weight.fill_(1.0)
            layer.bias.zero_()
        for layer in (club.logvar_net[0], club.logvar_net[2]):  # constant output: only the last bias
            layer.weight.zero_()
            layer.bias.zero_()
        club.logvar_net[2].bias.fill_(math.atanh(log_variance))  # tanh(bias) = log_variance
    return club


def test_club_bound_on_a_hand_computed_case():
    # mu = (1, 2), y = (0, 4), variance e^lv = 2:
    # positive terms -(1-0)^2/4 = -0.25 and -(2-4)^2/4 = -1;
    # all-pairs terms ((0-1)^2 + (4-1)^2)/2/4 = 1.25 and ((0-2)^2 + (4-2)^2)/2/4 = 1;
    # bound = mean(-0.25 + 1.25, -1 + 1) = 0.5.
    club = _club_with_set_weights(math.log(2.0))
    x = torch.tensor([[1.0], [2.0]])
    y = torch.tensor([[0.0], [4.0]])
    assert club(x, y).item() == pytest.approx(0.5, abs=1e-6)
    # log N(y; mu, 2) per sample: -0.5 * ((y - mu)^2 / 2 + log 2 + log 2pi); squares 1 and 4 -> mean 1.25.
    expected_loglik = -0.5 * (1.25 + math.log(2.0) + math.log(2 * math.pi))
    assert club.log_likelihood(x, y).item() == pytest.approx(expected_loglik, abs=1e-6)
    assert club.learning_loss(x, y).item() == pytest.approx(-expected_loglik, abs=1e-6)


def test_club_bound_equals_the_all_pairs_formula_on_random_inputs():
    torch.manual_seed(3)
    club = CLUB(x_dim=5, y_dim=3, hidden_dim=7)
    x, y = torch.randn(9, 5), torch.randn(9, 3) * 2 + 5  # an offset mean stresses the variance identity
    mu, logvar = club.mu_logvar(x)
    positive = -((mu - y) ** 2 / (2 * logvar.exp())).sum(dim=1)
    pairs = (y.unsqueeze(0) - mu.unsqueeze(1)) ** 2  # (i, j, D)
    negative = (pairs.mean(dim=1) / (2 * logvar.exp())).sum(dim=1)
    assert club(x, y).item() == pytest.approx((positive + negative).mean().item(), rel=1e-5, abs=1e-5)


def _producers_and_club():
    torch.manual_seed(4)
    x_producer, y_producer = nn.Linear(3, 4), nn.Linear(3, 2)  # stand-ins for outlier side and student
    club = CLUB(x_dim=4, y_dim=2, hidden_dim=8)
    inputs = torch.randn(6, 3)
    return x_producer, y_producer, club, x_producer(inputs), y_producer(inputs)


def _has_grad(module: nn.Module) -> bool:
    return any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


def test_alternating_mode_routes_bound_to_producers_and_q_fit_to_q_only():
    x_producer, y_producer, club, x, y = _producers_and_club()
    bound, q_fit = club_step_losses(club, x, y, "alternating")
    assert q_fit is not None
    bound.backward(retain_graph=True)
    assert _has_grad(y_producer) and _has_grad(x_producer)
    assert not _has_grad(club)
    for module in (x_producer, y_producer, club):
        module.zero_grad(set_to_none=True)
    q_fit.backward()
    assert _has_grad(club)
    assert not _has_grad(y_producer) and not _has_grad(x_producer)
    # The frozen view computes the same number as the live bound.
    assert bound.item() == pytest.approx(club(x, y).item(), rel=1e-6)


def test_joint_mode_sends_the_bound_gradient_to_q_and_producers():
    x_producer, y_producer, club, x, y = _producers_and_club()
    bound, q_fit = club_step_losses(club, x, y, "joint")
    assert q_fit is None
    bound.backward()
    assert _has_grad(club) and _has_grad(y_producer) and _has_grad(x_producer)


def test_club_refuses_unknown_mode_and_mismatched_batches():
    _, _, club, x, y = _producers_and_club()
    with pytest.raises(LossInputError, match="club mode"):
        club_step_losses(club, x, y, "sideways")
    with pytest.raises(LossInputError, match="x has batch size 6 but y has 5"):
        club(x, y[:5])
    with pytest.raises(LossInputError, match="y_dim"):
        club(x, torch.zeros(6, 3))


def test_energy_score_is_temperature_scaled_logsumexp():
    logits = torch.tensor([[0.0, math.log(3.0)]])  # logsumexp = log 4
    assert energy_score(logits).item() == pytest.approx(math.log(4.0), abs=1e-6)
    # T = 2: 2 * log(e^0 + e^{log(3)/2}) = 2 * log(1 + sqrt 3)
    assert energy_score(logits, T=2.0).item() == pytest.approx(2 * math.log(1 + math.sqrt(3.0)), abs=1e-6)
    with pytest.raises(LossInputError, match="T"):
        energy_score(logits, T=0)


def test_energy_regularizer_on_a_hand_computed_case():
    # One class, so E = -z. ID energies -20 (above m_in=-25: (5)^2) and -30 (fine): mean 12.5.
    # OOD energies -3 (above m_out=-7: fine) and -10 (below: (3)^2): mean 4.5. Total 17.
    id_logits = torch.tensor([[20.0], [30.0]])
    ood_logits = torch.tensor([[3.0], [10.0]])
    assert energy_regularizer(id_logits, ood_logits).item() == pytest.approx(17.0, abs=1e-5)
    with pytest.raises(LossInputError, match="m_in"):
        energy_regularizer(id_logits, ood_logits, m_in=-5.0, m_out=-7.0)


def test_outlier_exposure_is_log_k_at_uniform_and_larger_elsewhere():
    uniform = torch.zeros(3, 4)
    assert outlier_exposure_loss(uniform).item() == pytest.approx(math.log(4.0), abs=1e-6)
    # softmax (1/4, 3/4): -(log 1/4 + log 3/4) / 2
    skewed = torch.tensor([[0.0, math.log(3.0)]])
    expected = -(math.log(0.25) + math.log(0.75)) / 2
    assert outlier_exposure_loss(skewed).item() == pytest.approx(expected, abs=1e-6)
    assert expected > math.log(2.0)
    with pytest.raises(LossInputError, match="ood_logits"):
        outlier_exposure_loss(torch.zeros(4))
