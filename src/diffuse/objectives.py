"""Training objectives: how a formulation draws noise levels, scales the network's input, reads its
output, forms the target and weights the per-sample loss; and the one factory that gives samplers
their denoiser for any run.

Two formulations, each a preconditioning D(x; sigma) = c_skip x + c_out F(c_in x; c_noise) of the
same UNet F (Karras et al. 2022, eq. 7 and table 1), in the VE view x = x_0 + sigma n:

- ``vp``: the discrete VP schedule of ``diffusion.Schedule`` (abar_t, t in {0..T-1}), trained at
  integer t ~ U{0..T-1}. In VP terms alpha = sqrt(abar), s = sqrt(1 - abar) (our VE sigma = s/alpha),
  x_t = alpha x_0 + s eps, and the network predicts one of (Salimans & Ho 2022, sec. 4 and app. D):

      eps:  target eps                 x_0 = (x_t - s eps_hat) / alpha
      x0:   target x_0                 x_0 = x0_hat
      v:    target v = alpha eps - s x_0 (eq. 9 there)        x_0 = alpha x_t - s v_hat

  With x_t = alpha x (VE -> VP) these are the c_* below (c_in = alpha, c_noise = t(sigma)):
      eps: c_skip 1,        c_out -sigma
      x0:  c_skip 0,        c_out 1
      v:   c_skip alpha^2,  c_out -s        (EDM's preconditioning with sigma_data = 1, sign flipped)
  ``--zero-terminal-snr`` rescales abar so abar_{T-1} = 0 (Lin et al. 2023, alg. 1).

- ``edm``: Karras et al. 2022, table 1 "ours": sigma continuous, ln sigma ~ N(P_mean, P_std^2),
      c_skip = sd^2 / (sigma^2 + sd^2),  c_out = sigma sd / sqrt(sigma^2 + sd^2),
      c_in = 1 / sqrt(sigma^2 + sd^2),   c_noise = ln(sigma) / 4   (sd = sigma_data),
  target F* = (x_0 - c_skip x) / c_out, loss weight lambda(sigma) = 1 / c_out^2 on ||D - x_0||^2,
  which is weight 1 on ||F - F*||^2. Sampled with Heun on sigma in [0.002, 80], rho = 7, 18
  intervals (35 NFE): ``default_sampling``.
  Deviation: the UNet's sinusoidal embedding is sized (as ADM's) for t in [0, 1000), so it gets
  1000 c_noise = 250 ln sigma rather than ln(sigma)/4; the map is fixed, so only the scale differs.

Loss weights (per sample). Every objective's error is a multiple of the error in x_0:
||F - F*||^2 = ||D - x_0||^2 / c_out^2, i.e. k(SNR) = SNR (eps), 1 (x0), SNR + 1 (v), lambda (EDM),
with SNR = 1/sigma^2 (VE sigma). A weighting is chosen in x_0 space and divided by k:
- ``uniform``: w_x0 = k, i.e. plain MSE on the network's own target (for EDM its lambda(sigma)).
- ``min-snr``: w_x0 = min(SNR, gamma) (Hang et al. 2023, eq. 8-10): eps gets min(SNR, gamma)/SNR,
  x0 min(SNR, gamma), v min(SNR, gamma)/(SNR + 1).
- ``soft-min-snr``: w_x0 = SNR gamma / (SNR + gamma), a smooth minimum (Crowson et al. 2024, sec. 3.4).

Shapes: x_0, eps: [B, C, H, W] float in [-1, 1] / N(0, I); sigma, t, weights: [B]. Coefficients are
computed in float64 and cast at the point of use.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .config import DEFAULT_VP_SAMPLER, LOSS_WEIGHTS, PREDICTIONS, DiffusionConfig, check_diffusion
from .denoiser import Denoiser
from .diffusion import Schedule, q_sample
from .samplers import karras_sigmas

# Karras et al. 2022, table 1 and sec. 5: sampling range, rho, and the training noise distribution.
EDM_SIGMA_MIN, EDM_SIGMA_MAX, EDM_RHO = 0.002, 80.0, 7.0
EDM_C_NOISE_SCALE = 1000.0          # deviation: our UNet's time embedding is sized for t in [0, 1000)


# ----------------------------------------------------------------------------------------------
# Pure math: targets and their inverses (VP), EDM coefficients, loss weights

def vp_target(prediction: str, x0: Tensor, eps: Tensor, alpha: Tensor, s: Tensor) -> Tensor:
    """What the network is trained to output at x_t = alpha x0 + s eps (alpha, s broadcastable)."""
    if prediction == "eps":
        return eps
    if prediction == "x0":
        return x0
    if prediction == "v":
        return alpha * eps - s * x0                           # Salimans & Ho 2022, eq. 9 / app. D
    raise ValueError(f"unknown prediction {prediction!r}; choose one of {', '.join(PREDICTIONS)}")


def vp_x0_eps(prediction: str, out: Tensor, x_t: Tensor, alpha: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
    """(x0_hat, eps_hat) from a network output and x_t (the inverses of ``vp_target``).

    eps needs alpha > 0 to give x0; x0 needs s > 0 to give eps; v gives both at any alpha^2 + s^2 = 1."""
    if prediction == "eps":
        return (x_t - s * out) / alpha, out
    if prediction == "x0":
        return out, (x_t - alpha * out) / s
    if prediction == "v":
        return alpha * x_t - s * out, s * x_t + alpha * out   # rotate (x_t, v) back to (x0, eps)
    raise ValueError(f"unknown prediction {prediction!r}; choose one of {', '.join(PREDICTIONS)}")


def vp_coefficients(prediction: str, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(c_skip, c_out, c_in) of a VP prediction at VE sigma (float64, sigma's shape)."""
    alpha = 1 / (1 + sigma ** 2).sqrt()                      # sqrt(abar)
    one = torch.ones_like(sigma)
    if prediction == "eps":
        return one, -sigma, alpha
    if prediction == "x0":
        return torch.zeros_like(sigma), one, alpha
    if prediction == "v":
        return alpha ** 2, -sigma * alpha, alpha
    raise ValueError(f"unknown prediction {prediction!r}; choose one of {', '.join(PREDICTIONS)}")


def vp_c_out_sq(prediction: str, abar: Tensor) -> Tensor:
    """c_out^2 of a VP prediction from abar (finite at abar = 0, unlike the sigma form): eps
    (1 - abar)/abar = 1/SNR, x0 1, v 1 - abar = 1/(SNR + 1)."""
    if prediction == "eps":
        return (1 - abar) / abar
    if prediction == "x0":
        return torch.ones_like(abar)
    if prediction == "v":
        return 1 - abar
    raise ValueError(f"unknown prediction {prediction!r}; choose one of {', '.join(PREDICTIONS)}")


def edm_coefficients(sigma: Tensor, sigma_data: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Karras et al. 2022, table 1 (ours): (c_skip, c_out, c_in, c_noise) at sigma, float64.
    c_noise here is EDM's ln(sigma)/4; the network gets EDM_C_NOISE_SCALE times it."""
    sd2 = sigma_data ** 2
    c_skip = sd2 / (sigma ** 2 + sd2)
    c_out = sigma * sigma_data / (sigma ** 2 + sd2).sqrt()
    c_in = 1 / (sigma ** 2 + sd2).sqrt()
    c_noise = sigma.log() / 4
    return c_skip, c_out, c_in, c_noise


def x0_weight(loss_weight: str, snr: Tensor, gamma: float) -> Tensor | None:
    """The weighting in x_0 space, w_x0(SNR); None for ``uniform`` (it depends on the objective)."""
    if loss_weight == "uniform":
        return None
    if loss_weight == "min-snr":
        return snr.clamp(max=gamma)                          # Hang et al. 2023, eq. 8
    if loss_weight == "soft-min-snr":
        return snr * gamma / (snr + gamma)
    raise ValueError(f"unknown loss weight {loss_weight!r}; choose one of {', '.join(LOSS_WEIGHTS)}")


def loss_weight_for(loss_weight: str, c_out: Tensor, snr: Tensor, gamma: float) -> Tensor | None:
    """Per-sample weight on ||F - F*||^2 (None = 1): w_x0(SNR) c_out^2, since ||F - F*||^2 = ||D - x0||^2 / c_out^2."""
    w = x0_weight(loss_weight, snr, gamma)
    return None if w is None else w * c_out ** 2


# ----------------------------------------------------------------------------------------------
# Formulations: the preconditioning samplers see, and the training terms TrainStep uses

class VP:
    """A discrete VP schedule with an eps / x0 / v network (see the module docstring)."""

    def __init__(self, schedule: Schedule, prediction: str = "eps", loss_weight: str = "uniform",
                 gamma: float = 5.0):
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}; choose one of {', '.join(PREDICTIONS)}")
        x0_weight(loss_weight, torch.ones(1), gamma)                 # validates the name
        self.schedule, self.prediction, self.loss_weight, self.gamma = schedule, prediction, loss_weight, gamma
        self.sigma_min, self.sigma_max = schedule.sigma_min, schedule.sigma_max
        self.name = f"vp/{prediction}"

    def __call__(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        c_skip, c_out, c_in = vp_coefficients(self.prediction, sigma)
        return c_skip, c_out, c_in, self.schedule.sigma_to_t(sigma)

    def training_terms(self, x0: Tensor, gen: torch.Generator, abar: Tensor, batch: int | None = None,
                       rows: slice | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """(x_in, c_noise, target, weight or None) for a batch: t ~ U{0..T-1}, eps ~ N(0, I) from ``gen``
        (in that order, as the eps-only trainer drew them). abar: [T] float64 on x0's device. Under
        data parallelism x0 is ``rows`` of a global batch of ``batch``: the draws are made for the
        whole global batch and sliced, so they do not depend on the split."""
        B, rows = batch or x0.shape[0], rows or slice(None)
        tt = torch.randint(0, self.schedule.timesteps, (B,), generator=gen, device=x0.device)[rows]
        noise = torch.randn((B, *x0.shape[1:]), generator=gen, device=x0.device)[rows]
        x_t = q_sample(x0, tt, noise, abar)
        a = abar[tt]                                                          # [B] float64
        if self.prediction == "eps" and self.loss_weight == "uniform":
            return x_t, tt.float(), noise, None                              # L_simple, bit for bit as before
        alpha, s = a.sqrt().float().view(-1, 1, 1, 1), (1 - a).sqrt().float().view(-1, 1, 1, 1)
        target = vp_target(self.prediction, x0, noise, alpha, s)
        snr = a / (1 - a)                                 # abar < 1 always; 0 at a zero-SNR last step
        w = x0_weight(self.loss_weight, snr, self.gamma)
        weight = None if w is None else (w * vp_c_out_sq(self.prediction, a)).float()
        return x_t, tt.float(), target, weight


class EDM:
    """Karras et al. 2022's preconditioning and training noise (see the module docstring)."""

    def __init__(self, timesteps: int = 1000, sigma_data: float = 0.5, p_mean: float = -1.2, p_std: float = 1.2,
                 loss_weight: str = "uniform", gamma: float = 5.0):
        x0_weight(loss_weight, torch.ones(1), gamma)
        self.sigma_data, self.p_mean, self.p_std = sigma_data, p_mean, p_std
        self.loss_weight, self.gamma = loss_weight, gamma
        self.sigma_min, self.sigma_max = EDM_SIGMA_MIN, EDM_SIGMA_MAX
        # The sampling grid as a discrete schedule (T Karras levels), so every spacing and the
        # ancestral sampler have timesteps to walk; Karras spacing on it is EDM's own sigma_i.
        self.schedule = Schedule.from_sigmas("edm", karras_sigmas(EDM_SIGMA_MIN, EDM_SIGMA_MAX, timesteps, EDM_RHO).flip(0))
        self.name = "edm"

    def __call__(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        c_skip, c_out, c_in, c_noise = edm_coefficients(sigma, self.sigma_data)
        return c_skip, c_out, c_in, EDM_C_NOISE_SCALE * c_noise

    def training_terms(self, x0: Tensor, gen: torch.Generator, abar: Tensor | None = None,
                       batch: int | None = None, rows: slice | None = None
                       ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        B, rows = batch or x0.shape[0], rows or slice(None)       # global batch, this process's rows (as VP)
        sigma = (torch.randn(B, generator=gen, device=x0.device, dtype=torch.float64) * self.p_std
                 + self.p_mean).exp()[rows]                                   # ln sigma ~ N(P_mean, P_std^2)
        noise = torch.randn((B, *x0.shape[1:]), generator=gen, device=x0.device)[rows]
        c_skip, c_out, c_in, c_noise = self(sigma)
        view = lambda c: c.float().view(-1, 1, 1, 1)  # noqa: E731
        x = x0 + view(sigma) * noise
        # F* = (x0 - c_skip x) / c_out, expanded so nothing cancels in float32 at small sigma:
        # ((1 - c_skip) x0 - c_skip sigma n) / c_out = sigma/(sd r) x0 - sd/r n,  r = sqrt(sigma^2 + sd^2)
        sd, r = self.sigma_data, (sigma ** 2 + self.sigma_data ** 2).sqrt()
        target = view(sigma / (sd * r)) * x0 - view(sd / r) * noise
        weight = loss_weight_for(self.loss_weight, c_out, 1 / sigma ** 2, self.gamma)
        return view(c_in) * x, c_noise.float(), target, None if weight is None else weight.float()


Formulation = VP | EDM


def weighted_mse(out: Tensor, target: Tensor, weight: Tensor | None) -> Tensor:
    """Mean over the batch of weight_i * mean_pixels (out_i - target_i)^2 (plain MSE when weight is None)."""
    if weight is None:
        return nn.functional.mse_loss(out.float(), target.float())
    per_sample = (out.float() - target.float()).square().flatten(1).mean(1)  # [B]
    return (weight * per_sample).mean()


# ----------------------------------------------------------------------------------------------
# From a run's config

def prediction_of(d: DiffusionConfig) -> str:
    """The network's output parametrisation: eps / x0 / v on vp (default eps), 'F' on edm."""
    if d.formulation == "edm":
        return "F"
    return d.prediction or "eps"


def formulation_for(d: DiffusionConfig) -> Formulation:
    """The run's formulation from its diffusion config. Configs written before formulations existed
    (no formulation field, prediction 'eps') load as vp / eps / uniform."""
    reason = check_diffusion(d)
    if reason:
        raise ValueError(reason)
    if d.formulation == "edm":
        return EDM(d.timesteps, d.sigma_data, d.p_mean, d.p_std, d.loss_weight, d.min_snr_gamma)
    schedule = Schedule(d.schedule, d.timesteps, d.beta_start, d.beta_end, zero_terminal_snr=d.zero_terminal_snr,
                        snr_shift=d.snr_shift)
    return VP(schedule, prediction_of(d), d.loss_weight, d.min_snr_gamma)


def make_denoiser(net: nn.Module, formulation: Formulation, *, labels: Tensor | None = None,
                  guidance: float = 0.0, null_label: int | None = None, clip_x0: bool = False,
                  autocast_dtype: torch.dtype | None = None, levels: dict | None = None) -> Denoiser:
    """The sampler-facing D(x, sigma) for any run: its network wrapped in its formulation's
    preconditioning, with guidance (ignored when there are no labels), clipping and autocast.
    ``levels``: a dict shared by the batches of one sampling run (Denoiser.prepare fills it)."""
    return Denoiser(net, formulation, labels=labels, guidance=guidance if labels is not None else 0.0,
                    null_label=null_label, clip_x0=clip_x0, autocast_dtype=autocast_dtype, levels=levels)


def default_sampling(d: DiffusionConfig, distill: Any = None) -> tuple[str, int]:
    """(sampler, NFE budget) used when the user names none: a distilled run's (``distill``, its
    config.DistillConfig) sampler at its NFE (ect: the consistency sampler; gits: the teacher's default
    on the searched levels, SamplingSpec.resolved); EDM's own Heun with 18
    intervals (35 NFE, Karras et al. 2022, sec. 3 and table 2); DPM-Solver++(2M) SDE at 20 NFE on VP
    schedules.

    Stochastic on purpose: on the 8-minute MNIST model its FID at N = 2,000 is 8.5 (at its default
    eta 5, samplers.DPMPP_SDE_ETA) against 27.9 for the deterministic dpmpp-2m at the same 20 NFE and
    9.7 for ddpm at 1,000, because the probability-flow ODE carries a small model's score errors to
    the end while fresh noise damps them (docs/objectives.md, "Fast samplers"). Samples stay
    reproducible: the noise comes from the per-image seed streams."""
    if distill is not None and distill.method is not None:
        return ("consistency" if distill.consistency else distill.sampler), distill.nfe
    return ("heun", 35) if d.formulation == "edm" else (DEFAULT_VP_SAMPLER, 20)


def describe(d: DiffusionConfig) -> str:
    """One line for `diffuse info` and logs."""
    if d.formulation == "edm":
        text = f"EDM (sigma_data {d.sigma_data:g}, ln sigma ~ N({d.p_mean:g}, {d.p_std:g}^2)), T={d.timesteps} sampling grid"
    else:
        text = f"VP {d.schedule} schedule, T={d.timesteps}, predicts {prediction_of(d)}"
        if d.snr_shift != 1.0:
            text += f", SNR x {d.snr_shift:g}"
        if d.zero_terminal_snr:
            text += ", zero terminal SNR"
    if d.loss_weight != "uniform":
        text += f", loss weight {d.loss_weight} (gamma {d.min_snr_gamma:g})"
    return text


def same_function(a: DiffusionConfig, b: DiffusionConfig) -> str | None:
    """Why weights trained under ``a`` cannot initialise a run under ``b`` (None if they can): the
    network must compute the same kind of output from the same kind of input. The loss weighting,
    schedule and T may differ (fine-tuning); formulation, objective and zero terminal SNR may not."""
    for name, get in (("formulation", lambda d: d.formulation), ("objective", prediction_of),
                      ("zero-terminal-snr", lambda d: bool(d.zero_terminal_snr))):
        if get(a) != get(b):
            return f"{name} is {get(a)!r} there but {get(b)!r} here"
    if a.formulation == "edm" and a.sigma_data != b.sigma_data:
        return f"sigma-data is {a.sigma_data!r} there but {b.sigma_data!r} here"
    return None


def info(d: DiffusionConfig) -> dict[str, Any]:
    """The formulation as a small record (written into eval/benchmark JSON)."""
    return {"formulation": d.formulation, "objective": prediction_of(d),
            "loss_weight": d.loss_weight, "min_snr_gamma": d.min_snr_gamma,
            "zero_terminal_snr": bool(d.zero_terminal_snr)}
