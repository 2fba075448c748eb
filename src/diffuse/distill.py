"""Consistency tuning: a trained run's denoiser turned into a consistency function, the ECT training
terms, one training step, and few-step sampling. Pure functions of tensors and callables.

Papers (the symbols below are theirs):
- CM: Song, Dhariwal, Chen & Sutskever 2023, "Consistency models": f(x, sigma) maps any point of a
  probability-flow ODE trajectory to its end, with the boundary condition f(x, eps) = x (eq. 5, with
  f = c_skip x + c_out F, c_skip(eps) = 1, c_out(eps) = 0); multistep sampling (alg. 1).
- iCT: Song & Dhariwal 2023, "Improved techniques for training consistency models": the weight
  lambda = 1 / (sigma_{i+1} - sigma_i) and the same dropout masks in both passes (sec. 3.1), no EMA
  teacher: the target is the online network under stop-gradient (sec. 3.2), the pseudo-Huber
  metric d(a, b) = sqrt(||a - b||^2 + c^2) - c with c = 0.00054 sqrt(d) (sec. 3.3), lognormal
  noise levels (sec. 3.5).
- ECT: Geng, Pokle, Luo, Lin & Kolter 2024, "Consistency models made easy" (reference code
  locuslab/ect, training/loss.py): consistency *tuning*, i.e. consistency training that starts
  from the teacher's weights; continuous sigma_t ~ lognormal(-1.1, 2.0); the pair's second level
  from the mapping function r = t (1 - n(t) / q^a), n(t) = 1 + k sigmoid(-b t), where the stage a
  grows with training so the gap t - r shrinks (sec. 3, "mapping function"); weight 1 / (t - r).

Conventions (as everywhere in diffuse): the VE view x = x0 + sigma n (Karras et al. 2022); clean
images x0 [B, C, H, W] float in [-1, 1]; noise n ~ N(0, I) of x0's shape; noise levels sigma are
VE sigmas, float64 [B] in [sigma_min, sigma_max] of the teacher's formulation (``sigma_min`` is
the consistency boundary, written eps in the papers). A denoiser is any callable D(x, sigma) -> x0_hat
(``denoiser.Denoiser``, built by ``objectives.make_denoiser``); a consistency function has the
same interface, so the samplers' signature fits it unchanged (``sample_consistency``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
import torch
from torch import Tensor, nn

from .denoiser import ConsistencyFunction, DenoiserFn as Fn  # noqa: F401 (ConsistencyFunction re-exported)
from .rng import derive_seed, generator
from .samplers import sample_consistency  # noqa: F401 (re-exported)

# iCT sec. 3.3: the pseudo-Huber constant is 0.00054 sqrt(d) for d = C H W pixels (0.03 on CIFAR-10).
ICT_HUBER_C = 0.00054


# ----------------------------------------------------------------------------------------------
# ECT's training terms: sigma_t, the mapping to sigma_r, the metric, the loss

@dataclass(frozen=True)
class ECTSettings:
    """ECT's hyperparameters (their CIFAR-10 values, locuslab/ect ct_train.py and run_ecm.sh)."""

    p_mean: float = -1.1           # ln sigma_t ~ N(p_mean, p_std^2), truncated to [sigma_min, sigma_max]
    p_std: float = 2.0
    q: float = 2.0                 # the gap t - r shrinks by q at each stage
    k: float = 8.0                 # n(t) = 1 + k sigmoid(-b t): a larger gap at small t
    b: float = 1.0
    stages: int = 8                # stages over the whole run (ECT: doubling every 250 of 2,000 ticks)
    huber_c: float | None = None   # pseudo-Huber c; None = iCT's 0.00054 sqrt(C H W) (ECT's default: 0)

    def __post_init__(self):
        if not (self.p_std > 0 and self.q > 1 and self.k >= 0 and self.b >= 0 and self.stages >= 1
                and (self.huber_c is None or self.huber_c > 0)):
            raise ValueError(f"ECT settings need p_std > 0, q > 1, k >= 0, b >= 0, stages >= 1 and "
                             f"huber_c > 0 or None; got {self}")


# diffuse's settings for a new student, where they differ from ECT's CIFAR-10 ones. ECT tunes for
# about 100k steps; a CPU budget buys a few hundred to a few thousand, and there, on the digits demo
# teacher (docs/distill.md, "Tuning settings"), half the stages and noise levels drawn higher (the few
# calls of a student are made at sigma 10 and below, where lognormal(-1.1, 2) puts little of its mass)
# each lowered the 2-call FID.
TUNING_DEFAULTS = {"stages": 4, "p_mean": 0.5, "target": "data"}


def tuning_settings(stages: int | None, p_mean: float | None) -> ECTSettings:
    """ECTSettings of a run's ``distill.ect_stages`` / ``ect_p_mean``; None: ECT's own value."""
    given = {"stages": stages, "p_mean": p_mean}
    return dataclasses.replace(ECTSettings(), **{k: v for k, v in given.items() if v is not None})


def sample_sigma_t(gen: torch.Generator, batch: int, sigma_min: float, sigma_max: float,
                   p_mean: float, p_std: float, device: torch.device | str = "cpu") -> Tensor:
    """sigma_t ~ lognormal(p_mean, p_std^2) truncated to [sigma_min, sigma_max] (iCT sec. 3.5, ECT),
    float64 [batch]. Drawn by the inverse CDF, one uniform per image, so the draws (and a resumed
    run) do not depend on how many fall outside the range, as rejection sampling would."""
    lo, hi = (0.5 * math.erfc(-(math.log(s) - p_mean) / (p_std * math.sqrt(2))) for s in (sigma_min, sigma_max))
    u = torch.rand(batch, generator=gen, device=device, dtype=torch.float64)
    z = torch.special.ndtri(lo + (hi - lo) * u)
    return (p_mean + p_std * z).exp().clamp(sigma_min, sigma_max)       # clamp: rounding at the ends


def ect_delta(sigma_t: Tensor, progress: float, s: ECTSettings = ECTSettings()) -> Tensor:
    """ECT's relative gap Delta = (t - r) / t = n(t) / q^a, n(t) = 1 + k sigmoid(-b t), at stage
    a = floor(progress * stages) + 1 (capped at ``stages``), as locuslab/ect's t_to_r_sigmoid with
    stage = floor(iterations / d). progress in [0, 1]: the fraction of the tuning run done.
    sigma_t: float64 [B]; returns float64 [B], possibly >= 1 at small t (then r is clamped)."""
    if not 0.0 <= progress <= 1.0:
        raise ValueError(f"progress must be in [0, 1], got {progress}")
    a = min(math.floor(progress * s.stages), s.stages - 1) + 1
    return (1 + s.k * torch.sigmoid(-s.b * sigma_t)) / s.q ** a


def ect_sigma_r(sigma_t: Tensor, progress: float, sigma_min: float, s: ECTSettings = ECTSettings()) -> Tensor:
    """sigma_r = max(sigma_t (1 - Delta), sigma_min): the pair's lower level. ECT clamps r at its
    boundary 0, where the target is the clean image; ours is sigma_min, where f(x_r, sigma_min) = x_r."""
    return (sigma_t * (1 - ect_delta(sigma_t, progress, s))).clamp(min=sigma_min)


def pseudo_huber(diff: Tensor, c: float) -> Tensor:
    """iCT's metric per image, sqrt(||diff||^2 + c^2) - c over all but the first dim: [B, ...] -> [B].
    Written as ||diff||^2 / (sqrt(||diff||^2 + c^2) + c), equal in exact arithmetic, because the
    difference form cancels to 0 in float32 once ||diff|| << c (and its gradient with it)."""
    sq = diff.float().square().flatten(1).sum(1)
    return sq / ((sq + c * c).sqrt() + c)


def teacher_step(teacher: Fn, x_t: Tensor, sigma_t: Tensor, sigma_r: Tensor) -> Tensor:
    """One Euler step of the teacher's probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma
    (Karras et al. 2022, eq. 3 with sigma(t) = t) from sigma_t down to sigma_r:
    x_r = D + (r / t) (x_t - D), the DDIM jump. x_t [B, C, H, W]; sigma_t > sigma_r: float64 [B]."""
    view = lambda s: s.to(x_t.dtype).view(-1, *([1] * (x_t.ndim - 1)))  # noqa: E731  [B] -> [B, 1, 1, 1]
    d = teacher(x_t, sigma_t)
    return d + view(sigma_r / sigma_t) * (x_t - d)


def consistency_loss(f: Fn, x0: Tensor, noise: Tensor, sigma_t: Tensor, sigma_r: Tensor, c: float,
                     teacher: Fn | None = None) -> Tensor:
    """Per-image ECT loss [B] (float32):

        w(t, r) d(f(x_t, t), stopgrad(f(x_r, r))),   x_t = x0 + t n,  x_r = x0 + r n  (the SAME n),

    w = 1 / (t - r) (ECT; iCT's lambda), d the pseudo-Huber metric with constant c. x0, noise:
    [B, C, H, W]; sigma_t > sigma_r >= sigma_min: float64 [B]. The target is f itself under no_grad
    (iCT and ECT use the online network, no EMA teacher). A pair with t = r carries no information
    and gets weight 0 (not 1/0).

    With ``teacher`` (a denoiser, frozen) x_r is instead the teacher's ODE step from x_t
    (``teacher_step``): consistency *distillation* (CM sec. 4, eq. 7 with the Euler solver). Both
    x_r are x_t - (t - r) times an estimate of n: the data's is the one n drawn, the teacher's its
    estimate of E[n | x_t], with far less variance at large t, where one draw of n says little
    about where the ODE through x_t goes."""
    view = lambda s: s.to(x0.dtype).view(-1, *([1] * (x0.ndim - 1)))  # noqa: E731  [B] -> [B, 1, 1, 1]
    x_t = x0 + view(sigma_t) * noise
    with torch.no_grad():
        x_r = x0 + view(sigma_r) * noise if teacher is None else teacher_step(teacher, x_t, sigma_t, sigma_r)
        target = f(x_r, sigma_r)
    out = f(x_t, sigma_t)
    gap = sigma_t - sigma_r
    weight = torch.where(gap > 0, 1 / gap, 0.0).float()
    return weight * pseudo_huber(out - target, c)


# ----------------------------------------------------------------------------------------------
# One training step

class ConsistencyStep:
    """One optimizer step of ECT on a student, as ``train.TrainStep`` is one step of diffusion training.

    ``model`` is the student network (the optimizer holds its parameters) and ``f`` the consistency
    function built on it (``ConsistencyFunction(make_denoiser(model, formulation), ...)``); the
    optimizer is the caller's (diffuse trains with AdamW) and so are the model's train/eval mode
    and its learning rate.
    ``step(x0, k, progress)``: x0 [B, C, H, W] float in [-1, 1] on the device, k the step number,
    progress in [0, 1] the fraction of the tuning run done (it sets ECT's stage). sigma_t and n come
    from the generator seeded by (seed, "distill", k) (in that order), and both network passes use
    the dropout masks seeded by (seed, "distill-dropout", k) (iCT sec. 3.1, ECT), so step k is a pure
    function of (weights, optimizer state, x0, seed, k, progress): a resumed run repeats it exactly.
    Returns (mean loss, grad norm) as device tensors (no host sync).
    """

    def __init__(self, model: nn.Module, f: ConsistencyFunction | None, optimizer: torch.optim.Optimizer, *,
                 seed: int, settings: ECTSettings = ECTSettings(), grad_clip: float = 0.0):
        self.model, self.f, self.optimizer = model, f, optimizer
        self.seed, self.settings, self.grad_clip = seed, settings, grad_clip
        self.bad: Tensor | None = None      # bool device tensor: was the last step skipped?

    def terms(self, x0: Tensor, step: int, progress: float, f: ConsistencyFunction | None = None
              ) -> tuple[Tensor, Tensor, Tensor]:
        """(noise [B, C, H, W], sigma_t [B], sigma_r [B]) of step ``step``."""
        s, f = self.settings, f or self.f
        gen = generator(self.seed, "distill", step, device=x0.device)
        sigma_t = sample_sigma_t(gen, x0.shape[0], f.sigma_min, f.sigma_max, s.p_mean, s.p_std, x0.device)
        noise = torch.randn(x0.shape, generator=gen, device=x0.device, dtype=x0.dtype)
        return noise, sigma_t, ect_sigma_r(sigma_t, progress, f.sigma_min, s)

    def __call__(self, x0: Tensor, step: int, progress: float, f: ConsistencyFunction | None = None,
                 teacher: Fn | None = None) -> tuple[Tensor, Tensor]:
        """``f``: this step's consistency function on the student (e.g. built for the batch's
        labels) instead of the one given at construction; ``teacher``: the frozen teacher's denoiser
        for the same labels, whose ODE step makes the target's input (``consistency_loss``)."""
        f = f or self.f
        noise, sigma_t, sigma_r = self.terms(x0, step, progress, f)
        c = self.settings.huber_c if self.settings.huber_c is not None else ICT_HUBER_C * math.sqrt(x0[0].numel())
        dropout_seed = derive_seed(self.seed, "distill-dropout", step)

        def f_shared(x: Tensor, sigma: Tensor) -> Tensor:
            torch.manual_seed(dropout_seed)                 # the same masks in both passes
            return f(x, sigma)

        self.optimizer.zero_grad(set_to_none=True)
        loss = consistency_loss(f_shared, x0, noise, sigma_t, sigma_r, c, teacher).mean()
        loss.backward()
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        # A non-finite loss or gradient skips the step on the device, as train.TrainStep does: a
        # fused optimizer (the trainer's AdamW) leaves weights and moments alone where found_inf is 1;
        # the others refuse found_inf, and are only given by callers of this class directly.
        self.bad = ~(torch.isfinite(loss) & torch.isfinite(grad_norm))
        if self.optimizer.defaults.get("fused"):
            self.optimizer.found_inf = self.bad.float()
        self.optimizer.step()
        return loss.detach(), grad_norm
