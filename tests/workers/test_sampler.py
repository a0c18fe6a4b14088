"""Few-step flow-matching sampler (workers/sampler.py) against wan.md §4 worked examples."""

import pytest
import torch

from workers.sampler import (
    denoising_schedule,
    predict_x0,
    renoise,
    scheduler_timesteps,
    shift_sigma,
    timestep_to_sigma,
    warp_timesteps,
)


def test_shift_keeps_endpoints_and_raises_the_middle():
    assert shift_sigma(0.0, 5.0) == 0.0
    assert shift_sigma(1.0, 5.0) == 1.0
    assert shift_sigma(0.5, 5.0) == pytest.approx(5 / 6)


def test_scheduler_grid_starts_at_1000_and_has_1000_points():
    grid = scheduler_timesteps(5.0)
    assert grid.shape == (1000,)
    assert grid[0].item() == 1000.0
    assert bool((grid[1:] < grid[:-1]).all())


def test_self_forcing_four_step_list_warped_at_shift_5():
    assert warp_timesteps([1000, 750, 500, 250], 5.0) == pytest.approx((1000.0, 937.5, 833.3333333, 625.0))


def test_causvid_four_step_list_warped_at_shift_8():
    assert warp_timesteps([1000, 750, 500, 250], 8.0) == pytest.approx(
        (1000.0, 960.0, 888.8888889, 727.2727273)
    )


@pytest.mark.parametrize(("shift", "second"), [(5.0, 833.3333333), (8.0, 888.8888889), (3.0, 750.0)])
def test_two_step_list_warped(shift, second):
    assert warp_timesteps([1000, 500], shift) == pytest.approx((1000.0, second))


def test_default_two_step_schedule_sigmas():
    timesteps, sigmas = denoising_schedule((1000, 500), 5.0)
    assert timesteps == pytest.approx((1000.0, 833.3333333))
    assert sigmas == pytest.approx((1.0, 0.8333333333))


def test_unwarped_steps_look_up_the_nearest_grid_sigma():
    # CausVid's [1000, 757, 522] at shift 8 → σ ≈ 1.0, 0.7568, 0.5217 (wan.md §4.2).
    assert [timestep_to_sigma(t, 8.0) for t in (1000, 757, 522)] == pytest.approx(
        [1.0, 0.7568, 0.5217], abs=1e-4
    )


def test_warping_rejects_step_zero():
    with pytest.raises(ValueError, match="must be an integer in"):
        warp_timesteps([1000, 0], 5.0)


def test_x0_from_velocity_inverts_the_forward_process():
    gen = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 16, 3, 4, 4, generator=gen)
    sigma = 0.8333
    x_t = renoise(x0, sigma, eps)
    assert torch.allclose(x_t, (1 - sigma) * x0 + sigma * eps, atol=1e-6)
    assert torch.allclose(predict_x0(x_t, eps - x0, sigma), x0, atol=1e-6)


def test_renoise_at_sigma_one_is_pure_noise():
    x0, eps = torch.randn(2, 5)
    assert torch.equal(renoise(x0, 1.0, eps), eps)
