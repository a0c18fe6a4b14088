"""Few-step flow-matching sampler of the causal students, as pure functions of tensors (no model inside).

Conventions (wan.md §4): x_t = (1 − σ)·x0 + σ·ε, the network predicts v = ε − x0 from x_t and t = 1000·σ;
steps re-noise the predicted x0 with fresh Gaussian noise (not an ODE step), the same σ for every frame.
"""

from __future__ import annotations

import torch

NUM_TRAIN_TIMESTEPS = 1000


def shift_sigma(sigma: torch.Tensor | float, shift: float) -> torch.Tensor | float:
    """Flow-matching shift σ' = s·σ / (1 + (s − 1)·σ)."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def scheduler_timesteps(shift: float, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """The students' FlowMatchScheduler grid: σ_k = shift(linspace(1, 0, N + 1)[:-1]), timesteps = 1000·σ.

    Returns float64 `[N]`, decreasing from 1000.
    """
    sigmas = torch.linspace(1.0, 0.0, num_train_timesteps + 1, dtype=torch.float64)[:-1]
    return shift_sigma(sigmas, shift) * NUM_TRAIN_TIMESTEPS


def warp_timesteps(steps: tuple[int, ...] | list[int], shift: float) -> tuple[float, ...]:
    """Map nominal steps onto the shifted grid: t_eff = timesteps[1000 − t] (t in (0, 1000], integer).

    Example: (1000, 750, 500, 250) at shift 5 → (1000, 937.5, 833.33…, 625).
    """
    grid = scheduler_timesteps(shift)
    out = []
    for t in steps:
        if not (0 < t <= NUM_TRAIN_TIMESTEPS) or int(t) != t:
            raise ValueError(
                f"denoising step {t!r} must be an integer in (0, {NUM_TRAIN_TIMESTEPS}] to be warped"
            )
        out.append(float(grid[NUM_TRAIN_TIMESTEPS - int(t)]))
    return tuple(out)


def timestep_to_sigma(t: float, shift: float) -> float:
    """σ of the grid point nearest to timestep t (the students' argmin lookup)."""
    grid = scheduler_timesteps(shift)
    index = int(torch.argmin((grid - t).abs()))
    return float(grid[index]) / NUM_TRAIN_TIMESTEPS


def denoising_schedule(
    steps: tuple[int, ...] | list[int], shift: float, warp: bool = True
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(timesteps fed to the network, their σ) for a nominal step list, warped or looked up on the grid."""
    timesteps = warp_timesteps(steps, shift) if warp else tuple(float(t) for t in steps)
    sigmas = tuple(timestep_to_sigma(t, shift) for t in timesteps)
    return timesteps, sigmas


def predict_x0(x_t: torch.Tensor, velocity: torch.Tensor, sigma: float) -> torch.Tensor:
    """x0 = x_t − σ·v, computed in float64 and returned in x_t's dtype."""
    return (x_t.double() - sigma * velocity.double()).to(x_t.dtype)


def renoise(x0: torch.Tensor, sigma: float, noise: torch.Tensor) -> torch.Tensor:
    """x_σ = (1 − σ)·x0 + σ·ε with the given fresh noise ε (same shape as x0)."""
    return ((1 - sigma) * x0.double() + sigma * noise.double()).to(x0.dtype)
