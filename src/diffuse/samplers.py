"""Samplers: pure functions with one signature, plus the sigma arrays they walk.

Every sampler is ``fn(denoiser, x, sigmas, *, noise=None, callback=None, **options) -> x_0``:

- ``denoiser(x, sigma) -> x0_hat`` is the interface of ``denoiser.EpsDenoiser`` (VE view).
- ``x``: [B, C, H, W] float32, the starting sample at ``sigmas[0]`` in the VE view; build it with
  ``prior(z, sigmas)`` from standard-normal z.
- ``sigmas``: float64 [N + 1], decreasing, ending exactly at 0 (the clean image).
- ``noise``: an ``rng.ImageNoise`` for stochastic samplers (per-image streams); ignored otherwise.
- ``callback(i, x, x0_hat, sigma)`` after each denoiser call of step i, for trajectories.

No sampler keeps state between calls. Switching solvers is changing one name.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .diffusion import Schedule
from .rng import ImageNoise

Denoiser = Callable[[Tensor, Tensor], Tensor]
Callback = Callable[[int, Tensor, Tensor, float], None] | None

SPACINGS = ("trailing", "leading", "uniform", "karras")


def prior(z: Tensor, sigmas: Tensor) -> Tensor:
    """Scale standard-normal z to the VE view at sigmas[0]: x_T ~ N(0, I) in the VP view is
    z / sqrt(abar) = z sqrt(1 + sigma^2) in the VE view."""
    return z * float((1 + sigmas[0] ** 2).sqrt())


def discrete_timesteps(timesteps: int, n: int, spacing: str = "trailing") -> Tensor:
    """n integer timesteps in [0, T-1], decreasing.

    trailing: T-1 down in strides of T/n (Lin et al. 2023, table 2); always starts at T-1.
    leading:  DDIM's original 0, T//n, 2T//n, ... reversed (never reaches T-1 unless n = T).
    uniform:  round(linspace(T-1, 0, n)), both ends included.
    """
    if not 1 <= n <= timesteps:
        raise ValueError(f"steps must be between 1 and {timesteps}, got {n}")
    if spacing == "trailing":
        ts = torch.round(torch.arange(timesteps, 0, -timesteps / n, dtype=torch.float64)) - 1
    elif spacing == "leading":
        ts = (torch.arange(n, dtype=torch.float64) * (timesteps // n)).flip(0)
    elif spacing == "uniform":
        ts = torch.linspace(timesteps - 1, 0, n, dtype=torch.float64).round()
    else:
        raise ValueError(f"unknown discrete spacing {spacing!r}")
    return ts.long()


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> Tensor:
    """Karras et al. 2022, eq. 5: sigma_i = (sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) -
    sigma_max^(1/rho)))^rho, i = 0..n-1. float64 [n], decreasing."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def sigmas_for(schedule: Schedule, n: int, spacing: str = "trailing") -> Tensor:
    """The sigma array a sampler walks for n steps: float64 [n + 1], decreasing, last entry 0."""
    if spacing == "karras":
        sig = karras_sigmas(schedule.sigma_min, schedule.sigma_max, n)
    else:
        sig = schedule.sigmas[discrete_timesteps(schedule.timesteps, n, spacing)]
    return torch.cat([sig, sig.new_zeros(1)])


def _to_d(x: Tensor, sigma: Tensor, x0: Tensor) -> Tensor:
    """dx/dsigma of the probability-flow ODE in the VE view (Karras et al. 2022, eq. 4/alg. 1)."""
    return (x - x0) / sigma


@torch.no_grad()
def sample_ddim(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, eta: float = 0.0,
                noise: ImageNoise | None = None, callback: Callback = None) -> Tensor:
    """DDIM (Song et al. 2021, eq. 12 with sigma_t(eta) from eq. 16), written in the VE view.

    In the VP view, with abar = 1/(1 + sigma^2):
        x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - s^2) eps + s z,
        s = eta sqrt((1 - abar_prev)/(1 - abar)) sqrt(1 - abar/abar_prev).
    Dividing by sqrt(abar_prev) gives the VE update below. eta = 0 is deterministic (and equals
    Euler on the probability-flow ODE); eta = 1 on consecutive steps is DDPM's ancestral sampler.
    """
    if eta > 0 and noise is None:
        raise ValueError("DDIM with eta > 0 needs a noise source")
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x0 = denoiser(x, sigma)
        if callback is not None:
            callback(i, x, x0, float(sigma))
        if sigma_next == 0:
            x = x0
            continue
        eps = (x - x0) / float(sigma)
        abar, abar_next = 1 / (1 + sigma ** 2), 1 / (1 + sigma_next ** 2)
        s_vp = eta * ((1 - abar_next) / (1 - abar) * (1 - abar / abar_next)).clamp(min=0).sqrt()
        s_ve = s_vp / abar_next.sqrt()                                   # noise std in the VE view
        dir_coef = (sigma_next ** 2 - s_ve ** 2).clamp(min=0).sqrt()
        x = x0 + float(dir_coef) * eps
        if eta > 0:
            x = x + float(s_ve) * noise.randn_like(x)
    return x


@torch.no_grad()
def sample_ddpm(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, noise: ImageNoise | None = None,
                callback: Callback = None) -> Tensor:
    """DDPM ancestral sampling (Ho et al. 2020, alg. 2) with the posterior variance beta~_t
    ("fixed small", eq. 7). On a respaced subset of timesteps this is the respaced DDPM of
    Nichol & Dhariwal 2021 (sec. 4), which is exactly DDIM with eta = 1."""
    if noise is None:
        raise ValueError("DDPM needs a noise source")
    return sample_ddim(denoiser, x, sigmas, eta=1.0, noise=noise, callback=callback)


# name -> (function, stochastic, default spacing, NFE for n steps)
SAMPLERS: dict[str, tuple[Callable[..., Tensor], bool, str, Callable[[int], int]]] = {
    "ddpm": (sample_ddpm, True, "trailing", lambda n: n),
    "ddim": (sample_ddim, False, "trailing", lambda n: n),
}


def run_sampler(name: str, denoiser: Denoiser, z: Tensor, sigmas: Tensor, *,
                noise: ImageNoise | None = None, callback: Callback = None, **options) -> Tensor:
    """Look a sampler up by name and run it from standard-normal z."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    fn = SAMPLERS[name][0]
    return fn(denoiser, prior(z, sigmas), sigmas, noise=noise, callback=callback, **options)
