"""DMD generator gradient and critic loss (training/dmd.py) on toy tensors."""

from __future__ import annotations

import torch

from training.dmd import (
    critic_loss,
    dmd_gradient,
    dmd_loss,
    guided_velocity,
    noise_to,
    sample_dmd_sigma,
    x0_from_velocity,
)


def _toy(seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(3, 16, 2, 4, 4, generator=g)
    sigma = torch.tensor([0.2, 0.5, 0.9])
    x_t = noise_to(x0, sigma, torch.randn(x0.shape, generator=g))
    v_real = torch.randn(x0.shape, generator=g)
    v_fake = torch.randn(x0.shape, generator=g)
    return x0, x_t, sigma, v_real, v_fake


def test_dmd_loss_gradient_equals_normalised_score_difference() -> None:
    x0, x_t, sigma, v_real, v_fake = _toy()
    x = x0.clone().requires_grad_(True)
    dmd_loss(x, x_t, sigma, v_real, v_fake).backward()

    # x0_real/x0_fake pass through float32 in the loss, hence rtol 1e-4.
    # Closed form, written out independently: x0_pred = x_t − σ v; g = (x0_fake − x0_real) / mean|x − x0_real|
    # per sample; ∂L/∂x = g / numel(x).
    s = sigma.double().view(-1, 1, 1, 1, 1)
    x0_real = x_t.double() - s * v_real.double()
    x0_fake = x_t.double() - s * v_fake.double()
    weight = (x0.double() - x0_real).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
    expected = (x0_fake - x0_real) / weight / x0.numel()
    torch.testing.assert_close(x.grad.double(), expected, rtol=1e-4, atol=1e-9)


def test_dmd_gradient_vanishes_when_fake_score_equals_real_score() -> None:
    x0, x_t, sigma, v_real, _ = _toy(1)
    x = x0.clone().requires_grad_(True)
    dmd_loss(x, x_t, sigma, v_real, v_real.clone()).backward()
    assert torch.count_nonzero(x.grad) == 0


def test_dmd_descent_moves_sample_towards_real_score_prediction() -> None:
    # The critic models the student's own samples (x0_fake = x), so a descent step must move x towards the
    # teacher's denoised prediction x0_real.
    x0, x_t, sigma, v_real, _ = _toy(2)
    s = sigma.view(-1, 1, 1, 1, 1)
    x0_real = x0_from_velocity(x_t, v_real, sigma)
    v_fake = (x_t - x0) / s  # x0_from_velocity(x_t, v_fake) == x0
    x = x0.clone().requires_grad_(True)
    dmd_loss(x, x_t, sigma, v_real, v_fake).backward()
    stepped = x.detach() - 50.0 * x.grad
    assert (stepped - x0_real).abs().mean() < (x0 - x0_real).abs().mean()


def test_dmd_gradient_maps_non_finite_values_to_zero() -> None:
    x0 = torch.zeros(1, 4)
    g = dmd_gradient(x0, torch.tensor([[0.0, 1.0, float("nan"), 0.0]]), torch.tensor([[0.0, 2.0, 1.0, 0.0]]))
    assert torch.isfinite(g).all() and g[0, 2] == 0


def test_critic_loss_is_zero_at_the_flow_target_and_positive_elsewhere() -> None:
    x0, _, _, _, _ = _toy(3)
    noise = torch.randn_like(x0)
    assert critic_loss(noise - x0, noise, x0) == 0
    assert critic_loss(noise - x0 + 0.1, noise, x0) > 0


def test_critic_loss_does_not_backpropagate_into_the_student_sample() -> None:
    x0 = torch.randn(2, 16, 1, 2, 2, requires_grad=True)
    v = torch.randn(2, 16, 1, 2, 2, requires_grad=True)
    critic_loss(v, torch.randn_like(v), x0).backward()
    assert x0.grad is None and v.grad is not None


def test_guidance_scale_one_is_the_conditional_and_extrapolates_otherwise() -> None:
    cond, uncond = torch.tensor([2.0]), torch.tensor([1.0])
    assert guided_velocity(cond, uncond, 1.0) == cond
    assert guided_velocity(cond, uncond, 3.0) == torch.tensor([4.0])


def test_dmd_sigma_is_shifted_and_clamped() -> None:
    sigma = sample_dmd_sigma(4000, shift=5.0, generator=torch.Generator().manual_seed(0))
    assert sigma.min() >= 0.02 and sigma.max() <= 0.98
    # Shift 5 maps the median u = 0.5 to 5·0.5 / (1 + 4·0.5) = 0.833.
    assert abs(float(sigma.median()) - 5 / 6) < 0.02
