"""Distribution Matching Distillation as pure functions of tensors (no model inside).

Conventions (workers/sampler.py): x_σ = (1 − σ)·x0 + σ·ε, networks predict v = ε − x0, so x0 = x_σ − σ·v.

Generator (student) loss, DMD / DMD2 / CausVid / Self-Forcing (reference: audio_and_distillation.md §3.1):
the student's sample x is re-noised to a random σ, the real score (teacher with guidance) and the fake
score (critic) predict x0_real and x0_fake from it, and

    g = (x0_fake − x0_real) / mean_{C,F,H,W} |x − x0_real|        (per sample; DMD's normaliser)
    L = ½ · mean((x − stopgrad(x − g))²)                            (computed in float64)

so ∂L/∂x = g / numel(x): gradient descent moves x towards the teacher's denoising and away from the
critic's, which is −(s_real − s_fake) up to the per-sample weight (paper eq. 6).

Critic (fake score) loss: the ordinary flow-matching loss on the student's samples (no gradient into the
student): mean((v_fake(x_σ) − (ε − x))²).
"""

from __future__ import annotations

import torch

from workers.sampler import shift_sigma

DMD_NORMALISER_EPS = 1e-6


def x0_from_velocity(x_t: torch.Tensor, velocity: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x0 = x_t − σ·v for x_t, v `[B, ...]` and σ `[B]` (float32 result)."""
    s = sigma.to(torch.float64).view(-1, *([1] * (x_t.ndim - 1)))
    return (x_t.double() - s * velocity.double()).float()


def noise_to(x0: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """x_σ = (1 − σ)·x0 + σ·ε for x0, ε `[B, ...]` and σ `[B]`."""
    s = sigma.to(x0.dtype).view(-1, *([1] * (x0.ndim - 1)))
    return (1 - s) * x0 + s * noise


def guided_velocity(v_cond: torch.Tensor, v_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance, standard form: v_uncond + scale·(v_cond − v_uncond) (scale 1 = no guidance).

    The teacher's unconditional here drops the audio (audio CFG); guidance is affine, so applying it to v or
    to x0 = x_t − σ·v gives the same x0.
    """
    return v_uncond + scale * (v_cond - v_uncond)


def sample_dmd_sigma(
    n: int,
    shift: float,
    low: float = 0.02,
    high: float = 0.98,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The score networks' σ `[n]`: u ~ U[0, 1), Wan's shift s·u / (1 + (s − 1)·u), clamped to [low, high]."""
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    return shift_sigma(u, shift).clamp(low, high).float()


def dmd_gradient(x0: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor) -> torch.Tensor:
    """g = (x0_fake − x0_real) / mean |x0 − x0_real| per sample, float64 `[B, ...]`, NaN/inf mapped to 0."""
    x = x0.detach().double()
    real = x0_real.detach().double()
    dims = tuple(range(1, x.ndim))
    weight = (x - real).abs().mean(dim=dims, keepdim=True) + DMD_NORMALISER_EPS
    return torch.nan_to_num((x0_fake.detach().double() - real) / weight, nan=0.0, posinf=0.0, neginf=0.0)


def dmd_loss(
    x0: torch.Tensor,
    x_t: torch.Tensor,
    sigma: torch.Tensor,
    v_real: torch.Tensor,
    v_fake: torch.Tensor,
) -> torch.Tensor:
    """The DMD generator loss (float64 scalar) whose gradient w.r.t. x0 is `dmd_gradient(...) / x0.numel()`.

    x0: the student's sample `[B, 16, F, h, w]` (with grad); x_t: it re-noised to σ `[B]`; v_real: the
    teacher's guided velocity at (x_t, σ); v_fake: the critic's velocity at (x_t, σ).
    """
    x0_real = x0_from_velocity(x_t, v_real, sigma)
    x0_fake = x0_from_velocity(x_t, v_fake, sigma)
    g = dmd_gradient(x0, x0_real, x0_fake)
    x = x0.double()
    target = (x - g).detach()
    return 0.5 * (x - target).pow(2).mean()


def critic_loss(v_fake: torch.Tensor, noise: torch.Tensor, x0_sample: torch.Tensor) -> torch.Tensor:
    """Flow-matching loss of the fake score on a detached student sample: mean((v − (ε − x0))²)."""
    return (v_fake.float() - (noise - x0_sample.detach()).float()).pow(2).mean()
