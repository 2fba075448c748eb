"""Diffusion math: noise schedules, the forward process and the training loss.

Pure functions of tensors. Conventions used everywhere in diffuse:

- Discrete timesteps are integers t in {0, ..., T-1}; t = 0 is the least noisy step.
- ``alphas_cumprod[t]`` is abar_t = prod_{s<=t} (1 - beta_s) (Ho et al. 2020, eq. 4).
- Images x_0 are NCHW float32 in [-1, 1].
- The "sigma view" (Karras et al. 2022, sec. 2 / Song et al. 2021): a VP sample
  x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps rescaled by 1/sqrt(abar_t) is the VE sample
  x_0 + sigma_t eps with sigma_t = sqrt((1 - abar_t) / abar_t). Samplers work in that view.

Schedules are computed in float64 and only cast to float32 at the point of use.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

SCHEDULES = ("linear", "cosine")


def linear_betas(timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """Ho et al. 2020, sec. 4: betas linear from beta_start to beta_end. Shape [T], float64."""
    return torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64)


def cosine_betas(timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Nichol & Dhariwal 2021, eq. 17: abar(t) = f(t)/f(0), f(t) = cos^2(((t/T + s)/(1 + s)) pi/2).

    beta_t = 1 - abar(t)/abar(t-1), clipped at ``max_beta`` to avoid the singularity at t = T.
    Shape [T], float64.
    """
    steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    betas = 1 - f[1:] / f[:-1]
    return betas.clamp(max=max_beta)


def make_betas(schedule: str, timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    if schedule == "linear":
        return linear_betas(timesteps, beta_start, beta_end)
    if schedule == "cosine":
        return cosine_betas(timesteps)
    raise ValueError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")


def rescale_zero_terminal_snr(alphas_cumprod: Tensor) -> Tensor:
    """Lin et al. 2023, alg. 1: shift and scale sqrt(abar_t) so that abar_{T-1} = 0 exactly (SNR 0 at
    the last step: training then sees pure noise there, as sampling starts from) while abar_0 stays.

    sqrt(abar)' = (sqrt(abar) - sqrt(abar_T)) sqrt(abar_0) / (sqrt(abar_0) - sqrt(abar_T)): an increasing
    affine map of a decreasing sequence, so the SNRs keep their order. float64 [T] in and out.
    """
    root = alphas_cumprod.double().sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * (first / (first - last))
    return root ** 2


def shift_snr(alphas_cumprod: Tensor, factor: float) -> Tensor:
    """Every step's signal-to-noise ratio abar/(1 - abar) times ``factor`` (Hoogeboom et al. 2023,
    "simple diffusion", sec. 3.1: a schedule made for 32 px images shifted for d px by (32/d)^2, since
    averaging the noise over a d/32-pixel square divides its variance by (d/32)^2, so the image's
    coarse structure survives to higher noise levels at the larger size). float64 [T] in and out."""
    return alphas_cumprod * factor / (1 - alphas_cumprod + alphas_cumprod * factor)


def betas_from_alphas_cumprod(alphas_cumprod: Tensor) -> Tensor:
    """beta_t = 1 - abar_t / abar_{t-1} (abar_{-1} = 1): the inverse of ``alphas_cumprod_from_betas``."""
    return 1 - alphas_cumprod / torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])


def alphas_cumprod_from_betas(betas: Tensor) -> Tensor:
    """abar_t = prod_{s<=t} (1 - beta_s). float64 in, float64 out."""
    return torch.cumprod(1 - betas.double(), dim=0)


def sigmas_from_alphas_cumprod(alphas_cumprod: Tensor) -> Tensor:
    """sigma_t = sqrt((1 - abar_t) / abar_t): the VE noise level of discrete step t."""
    return ((1 - alphas_cumprod) / alphas_cumprod).sqrt()


def log_snr(alphas_cumprod: Tensor) -> Tensor:
    """log SNR(t) = log(abar_t / (1 - abar_t)) = -2 log sigma_t."""
    return torch.log(alphas_cumprod) - torch.log1p(-alphas_cumprod)


def _gather(values: Tensor, t: Tensor, like: Tensor) -> Tensor:
    """values[t] shaped to broadcast against ``like`` ([B] -> [B, 1, 1, 1]), in like's dtype."""
    out = values.to(device=t.device)[t].to(like.dtype)
    return out.view(-1, *([1] * (like.ndim - 1)))


def q_sample(x0: Tensor, t: Tensor, noise: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """Forward process in closed form (Ho et al. 2020, eq. 4):
    x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps.

    x0, noise: [B, C, H, W]; t: [B] long in [0, T); alphas_cumprod: [T] (float64 ok).
    """
    abar = _gather(alphas_cumprod, t, x0)
    return abar.sqrt() * x0 + (1 - abar).sqrt() * noise


def predict_x0_from_eps(x_t: Tensor, t: Tensor, eps: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """Invert eq. 4 for x_0 given a noise prediction: x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
    abar = _gather(alphas_cumprod, t, x_t)
    return (x_t - (1 - abar).sqrt() * eps) / abar.sqrt()


def eps_loss(eps_pred: Tensor, eps: Tensor) -> Tensor:
    """L_simple (Ho et al. 2020, eq. 14): mean squared error between true and predicted noise."""
    return torch.nn.functional.mse_loss(eps_pred.float(), eps.float())


class Schedule:
    """A discrete VP noise schedule: betas, abar and the matching sigmas, all float64 on CPU.

    Holds no state beyond these arrays; every method is a pure function of its arguments.
    """

    # With zero terminal SNR abar_{T-1} = 0 and sigma_{T-1} = inf; samplers (VE view) need a finite
    # start. diffusers sets abar_{T-1} = 2^-24 (sigma 4096) at t = T-1 only; on the linear schedule
    # the levels below are already past it (T = 1000: sigma_998 ~ 1.5e4), so the top becomes twice the
    # level below there: levels stay distinct and increasing, and the top maps to t = T-1. Its value
    # hardly matters: at x = sqrt(1 + sigma^2) z the network's input c_in x is z exactly, as in training
    # at abar = 0, and a v or x0 estimate differs from the sigma = inf one by O(1/sigma).
    ZERO_SNR_ABAR_FLOOR = 2.0 ** -24

    def __init__(self, schedule: str = "linear", timesteps: int = 1000, beta_start: float = 1e-4,
                 beta_end: float = 0.02, zero_terminal_snr: bool = False, snr_shift: float = 1.0):
        if timesteps < 2:
            raise ValueError(f"timesteps must be at least 2, got {timesteps}")
        self.name = schedule
        self.timesteps = timesteps
        self.zero_terminal_snr = zero_terminal_snr
        self.betas = make_betas(schedule, timesteps, beta_start, beta_end)          # [T] float64
        self.alphas_cumprod = alphas_cumprod_from_betas(self.betas)                 # [T] float64
        if snr_shift != 1.0:
            self.alphas_cumprod = shift_snr(self.alphas_cumprod, snr_shift)
        if zero_terminal_snr:
            self.alphas_cumprod = rescale_zero_terminal_snr(self.alphas_cumprod)
        if snr_shift != 1.0 or zero_terminal_snr:
            self.betas = betas_from_alphas_cumprod(self.alphas_cumprod)
        self.sigmas = sigmas_from_alphas_cumprod(self.alphas_cumprod)              # [T] float64, increasing
        if zero_terminal_snr:                                                       # sigma_{T-1} = inf until here
            floor = sigmas_from_alphas_cumprod(torch.tensor(self.ZERO_SNR_ABAR_FLOOR, dtype=torch.float64))
            self.sigmas[-1] = torch.maximum(floor, 2 * self.sigmas[-2])

    @classmethod
    def from_sigmas(cls, name: str, sigmas: Tensor) -> "Schedule":
        """A grid of T increasing VE noise levels (e.g. EDM's) seen as a discrete schedule, so the
        discrete spacings and the ancestral sampler can walk it: abar_t = 1 / (1 + sigma_t^2)."""
        self = cls.__new__(cls)
        self.name, self.timesteps, self.zero_terminal_snr = name, len(sigmas), False
        self.sigmas = sigmas.double()
        self.alphas_cumprod = 1 / (1 + self.sigmas ** 2)
        self.betas = 1 - self.alphas_cumprod / torch.cat([self.alphas_cumprod.new_ones(1), self.alphas_cumprod[:-1]])
        return self

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def log_sigmas(self, device: torch.device | str = "cpu") -> Tensor:
        """log sigma_t [T] float64 on ``device``, copied there once and kept (no copy per call)."""
        device = torch.device(device)
        cache = self.__dict__.setdefault("_log_sigmas", {})
        if device not in cache:
            cache[device] = self.sigmas.log().to(device)
        return cache[device]

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        """Continuous timestep for a VE noise level: piecewise-linear in log sigma between the
        discrete steps (as k-diffusion and diffusers do), so a discrete sigma maps to its exact
        integer t. sigma: any shape, > 0. Returns float t in [0, T-1], sigma's shape and dtype."""
        log_sigmas = self.log_sigmas(sigma.device)
        log_sigma = sigma.double().clamp(min=self.sigma_min, max=self.sigma_max).log()
        idx = torch.searchsorted(log_sigmas, log_sigma.reshape(-1)).clamp(1, self.timesteps - 1)
        lo, hi = log_sigmas[idx - 1], log_sigmas[idx]
        w = (log_sigma.reshape(-1) - lo) / (hi - lo)
        t = (idx - 1).double() + w.clamp(0, 1)
        return t.reshape(sigma.shape).to(sigma.dtype)

    def t_to_sigma(self, t: Tensor) -> Tensor:
        """Inverse of ``sigma_to_t``: log-linear interpolation of sigma at continuous t. float64."""
        t = t.double().clamp(0, self.timesteps - 1)
        lo = t.floor().long()
        hi = (lo + 1).clamp(max=self.timesteps - 1)
        w = t - lo
        log_sigmas = self.sigmas.log()
        return ((1 - w) * log_sigmas[lo] + w * log_sigmas[hi]).exp()
