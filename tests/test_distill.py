"""Consistency tuning (diffuse.distill): the boundary condition, the ECT loss and schedule against
hand-computed values, a Gaussian-data oracle for training and for few-step sampling.

Closed forms used (Gaussian data x0 ~ N(0, s^2 I), VE view x = x0 + sigma n):
- the exact denoiser D*(x, sigma) = s^2 / (s^2 + sigma^2) x;
- the probability-flow ODE is linear, dx/dsigma = (x - D*)/sigma = sigma x / (s^2 + sigma^2), so a
  trajectory keeps x / sqrt(s^2 + sigma^2) fixed and the exact consistency function with boundary
  eps is f*(x, sigma) = x sqrt(s^2 + eps^2) / sqrt(s^2 + sigma^2) (the map to 0 when eps = 0).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from diffuse.config import ModelConfig
from diffuse.diffusion import Schedule
from diffuse.distill import (ICT_HUBER_C, ConsistencyFunction, ConsistencyStep, ECTSettings, consistency_loss,
                             ect_delta, ect_sigma_r, pseudo_huber, sample_consistency, sample_sigma_t, teacher_step)
from diffuse.models import UNet
from diffuse.objectives import EDM, VP, make_denoiser
from diffuse.rng import ImageNoise
from diffuse.samplers import prior, sample_euler

from .conftest import TINY_MODEL


def _randn(shape, seed, dtype=torch.float64):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


class HugeNet(nn.Module):
    """A random network with outputs of size ~1e6 that depend on x, t and nothing else."""

    def __init__(self, dtype):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 1, 3, padding=1).to(dtype)
        with torch.no_grad():
            self.conv.weight.mul_(1e6)

    def forward(self, x, t, y=None):
        return self.conv(x) + t.to(x.dtype).view(-1, 1, 1, 1)


class Gaussian:
    """The closed forms of the module docstring for data std s."""

    def __init__(self, s: float, eps: float, sigma_max: float):
        self.s, self.sigma_min, self.sigma_max = s, eps, sigma_max

    def denoiser(self, x, sigma):
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        gain = self.s ** 2 / (self.s ** 2 + sigma ** 2)
        return gain.to(x.dtype).view(-1, *([1] * (x.ndim - 1))) * x if gain.ndim else float(gain) * x

    def __call__(self, x, sigma):                   # f*, with this object's eps as the boundary
        sigma = float(sigma)
        return x * math.sqrt(self.s ** 2 + self.sigma_min ** 2) / math.sqrt(self.s ** 2 + sigma ** 2)


# ----------------------------------------------------------------------------------------------
# The parametrisation

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("formulation", ["vp/eps", "vp/x0", "vp/v", "edm"])
def test_boundary_is_exact_for_any_denoiser(formulation, dtype):
    """f(x, sigma_min) == x bit for bit, whatever the network outputs, for every formulation; rows
    above the boundary do change (so the equality is not vacuous)."""
    form = EDM() if formulation == "edm" else VP(Schedule("linear", 1000), formulation.split("/")[1])
    den = make_denoiser(HugeNet(dtype), form)
    f = ConsistencyFunction(den, den.sigma_min, den.sigma_max)
    x = _randn((3, 1, 8, 8), 1, dtype)
    eps = den.sigma_min
    assert torch.equal(f(x, eps), x)                                              # host float
    assert torch.equal(f(x, torch.tensor(eps, dtype=torch.float64)), x)           # 0-d tensor
    sigma = torch.tensor([eps, 0.5, eps], dtype=torch.float64)                    # per image
    out = f(x, sigma)
    assert out.dtype == dtype
    assert torch.equal(out[0], x[0]) and torch.equal(out[2], x[2])
    assert (out[1] - x[1]).abs().max() > 1.0


def test_initial_f_is_the_teachers_euler_step_to_sigma_min():
    """Built on the teacher's D, f(x, sigma) is one Euler step of the teacher's ODE from sigma to
    sigma_min (samplers.sample_euler), and f - D = (sigma_min / sigma)(x - D)."""
    form = VP(Schedule("linear", 1000), "eps")
    den = make_denoiser(HugeNet(torch.float64), form)
    f = ConsistencyFunction(den, den.sigma_min, den.sigma_max)
    x = _randn((2, 1, 8, 8), 2)
    for sigma in (0.3, 5.0, 80.0):
        euler = sample_euler(den, x, torch.tensor([sigma, den.sigma_min], dtype=torch.float64))
        torch.testing.assert_close(f(x, sigma), euler, rtol=1e-12, atol=1e-9)
        d = den(x, sigma)
        torch.testing.assert_close(f(x, sigma) - d, den.sigma_min / sigma * (x - d), rtol=1e-9, atol=1e-9)


def test_initial_f_is_exact_to_first_order_near_the_boundary():
    """On Gaussian data with the exact D*, f's error against f* at sigma = eps (1 + delta) falls as
    delta^2 (Euler's local error): ten times closer, a hundred times smaller."""
    g = Gaussian(0.5, 0.1, 80.0)
    f = ConsistencyFunction(g.denoiser, g.sigma_min, g.sigma_max)
    x = _randn((4, 1, 4, 4), 7)
    errs = [float((f(x, g.sigma_min * (1 + d)) - g(x, g.sigma_min * (1 + d))).abs().max()) for d in (1e-2, 1e-3)]
    assert 90 < errs[0] / errs[1] < 110


def test_consistency_function_refuses_a_bad_range():
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        ConsistencyFunction(lambda x, s: x, 0.0, 80.0)
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        ConsistencyFunction(lambda x, s: x, 1.0, 0.5)


# ----------------------------------------------------------------------------------------------
# The training terms

def test_loss_against_a_hand_computed_value_and_its_gradient():
    """w d(f(x_t, t), stopgrad f(x_r, r)) with f(x, sigma) = a x / (1 + sigma), worked out with
    Python floats from the formula; the gradient in a flows through the f(x_t, t) branch only."""
    x0 = torch.tensor([[[[0.5, -0.25]]], [[[1.0, 0.0]]]], dtype=torch.float64)       # [2, 1, 1, 2]
    n = torch.tensor([[[[1.0, 2.0]]], [[[-1.0, 0.5]]]], dtype=torch.float64)
    t, r, c = [1.0, 3.0], [0.5, 2.0], 0.1
    a = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
    f = lambda x, sigma: a * x / (1 + sigma.view(-1, 1, 1, 1))  # noqa: E731
    loss = consistency_loss(f, x0, n, torch.tensor(t, dtype=torch.float64), torch.tensor(r, dtype=torch.float64), c)
    want, dwant = [], 0.0
    for i in range(2):
        xt = [x0[i, 0, 0, j].item() + t[i] * n[i, 0, 0, j].item() for j in range(2)]
        xr = [x0[i, 0, 0, j].item() + r[i] * n[i, 0, 0, j].item() for j in range(2)]
        diff = [1.5 * xt[j] / (1 + t[i]) - 1.5 * xr[j] / (1 + r[i]) for j in range(2)]
        norm2 = sum(d * d for d in diff)
        want.append((math.sqrt(norm2 + c * c) - c) / (t[i] - r[i]))
        # d/da of the student branch only: sum_j diff_j * xt_j / (1 + t) / sqrt(norm2 + c^2)
        dwant += sum(diff[j] * xt[j] / (1 + t[i]) for j in range(2)) / math.sqrt(norm2 + c * c) / (t[i] - r[i]) / 2
    assert loss.shape == (2,)
    torch.testing.assert_close(loss.double(), torch.tensor(want, dtype=torch.float64), rtol=1e-6, atol=0)
    loss.mean().backward()
    assert a.grad.item() == pytest.approx(dwant, rel=1e-6)


def test_teacher_step_is_an_euler_step_of_the_exact_ode():
    """On Gaussian data with the exact D*, the teacher's step from t to r lands on the exact ODE
    point x_t sqrt(s^2 + r^2) / sqrt(s^2 + t^2) up to Euler's local error: a gap ten times smaller,
    an error a hundred times smaller; per image, with t and r of different rows."""
    g = Gaussian(0.5, 0.002, 80.0)
    x = _randn((2, 1, 4, 4), 12)
    t = torch.tensor([3.0, 0.8], dtype=torch.float64)
    errs = []
    for gap in (1e-2, 1e-3):
        r = t * (1 - gap)
        exact = x * ((g.s ** 2 + r ** 2) / (g.s ** 2 + t ** 2)).sqrt().view(-1, 1, 1, 1)
        errs.append((teacher_step(g.denoiser, x, t, r) - exact).abs().flatten(1).max(1).values)
    ratio = errs[0] / errs[1]
    assert bool(((ratio > 90) & (ratio < 110)).all()), ratio
    assert bool((errs[0] > 1e-7).all())                         # the step is not exact for free


def test_loss_with_the_teacher_against_a_hand_computed_value():
    """consistency_loss with a teacher: x_r = D + (r/t)(x_t - D) for D(x, sigma) = x / (2 + sigma),
    then w d(f(x_t, t), f(x_r, r)), all worked out with Python floats."""
    x0 = torch.tensor([[[[0.5, -0.25]]], [[[1.0, 0.0]]]], dtype=torch.float64)
    n = torch.tensor([[[[1.0, 2.0]]], [[[-1.0, 0.5]]]], dtype=torch.float64)
    t, r, c = [1.0, 3.0], [0.5, 2.0], 0.1
    f = lambda x, sigma: 1.5 * x / (1 + sigma.view(-1, 1, 1, 1))  # noqa: E731
    teacher = lambda x, sigma: x / (2 + sigma.view(-1, 1, 1, 1))  # noqa: E731
    loss = consistency_loss(f, x0, n, torch.tensor(t, dtype=torch.float64), torch.tensor(r, dtype=torch.float64),
                            c, teacher=teacher)
    want = []
    for i in range(2):
        xt = [x0[i, 0, 0, j].item() + t[i] * n[i, 0, 0, j].item() for j in range(2)]
        d = [v / (2 + t[i]) for v in xt]
        xr = [d[j] + r[i] / t[i] * (xt[j] - d[j]) for j in range(2)]
        diff = [1.5 * xt[j] / (1 + t[i]) - 1.5 * xr[j] / (1 + r[i]) for j in range(2)]
        want.append((math.sqrt(sum(v * v for v in diff) + c * c) - c) / (t[i] - r[i]))
    torch.testing.assert_close(loss.double(), torch.tensor(want, dtype=torch.float64), rtol=1e-6, atol=0)
    plain = consistency_loss(f, x0, n, torch.tensor(t, dtype=torch.float64), torch.tensor(r, dtype=torch.float64), c)
    assert not torch.allclose(plain, loss)                       # the teacher's x_r is not x0 + r n here


def test_on_one_point_of_data_the_teachers_step_is_the_datas():
    """When every image is the same x0, its exact denoiser is x0 itself and E[n | x_t] = n: the
    teacher's x_r is x0 + r n, so distillation and training give the same loss."""
    x0 = 0.3 * torch.ones(3, 1, 4, 4, dtype=torch.float64)
    n = _randn((3, 1, 4, 4), 13)
    t, r = torch.tensor([20.0, 2.0, 0.1], dtype=torch.float64), torch.tensor([15.0, 1.0, 0.05], dtype=torch.float64)
    torch.testing.assert_close(teacher_step(lambda x, s: x0, x0 + t.view(-1, 1, 1, 1) * n, t, r),
                               x0 + r.view(-1, 1, 1, 1) * n, rtol=1e-12, atol=1e-12)
    f = lambda x, sigma: x / (1 + sigma.view(-1, 1, 1, 1))  # noqa: E731
    torch.testing.assert_close(consistency_loss(f, x0, n, t, r, 0.1, teacher=lambda x, s: x0),
                               consistency_loss(f, x0, n, t, r, 0.1))


@pytest.mark.parametrize("t,times", [(20.0, 100), (2.0, 70)])
def test_the_teachers_target_input_is_nearer_the_ode_than_the_datas(t, times):
    """Gaussian data (s = 0.5), exact D*: against the exact ODE point at r = 0.9 t through x_t, the
    data's x_r = x0 + r n misses by about (t - r) s / sqrt(s^2 + t^2) per pixel (its n is one draw;
    the ODE follows E[n | x_t]); the teacher's Euler step by its local error only: 78 times less at
    t = 2, more at t = 20, where the data's x0 is a smaller part of x_t."""
    g = Gaussian(0.5, 0.002, 80.0)
    x0, n = g.s * _randn((4096, 1, 2, 2), 14), _randn((4096, 1, 2, 2), 15)
    tt = torch.full((4096,), t, dtype=torch.float64)
    rr = 0.9 * tt
    x_t = x0 + t * n
    exact = x_t * math.sqrt((g.s ** 2 + (0.9 * t) ** 2) / (g.s ** 2 + t ** 2))
    data_rms = float((x0 + 0.9 * t * n - exact).square().mean().sqrt())
    teacher_rms = float((teacher_step(g.denoiser, x_t, tt, rr) - exact).square().mean().sqrt())
    assert data_rms == pytest.approx(0.1 * t * g.s / math.sqrt(g.s ** 2 + t ** 2), rel=0.05)
    assert teacher_rms < data_rms / times


def test_a_pair_with_no_gap_weighs_zero():
    x0, n = _randn((2, 1, 2, 2), 3), _randn((2, 1, 2, 2), 4)
    sigma = torch.tensor([0.5, 0.5], dtype=torch.float64)
    loss = consistency_loss(lambda x, s: 2 * x, x0, n, sigma, sigma.clone(), 0.1)
    assert torch.equal(loss, torch.zeros(2))


def test_pseudo_huber_does_not_cancel_for_small_differences():
    """sqrt(||d||^2 + c^2) - c computed naively in float32 is 0 for ||d|| << c; pseudo_huber
    keeps ||d||^2 / (2c) to first order."""
    diff = torch.full((1, 1, 4, 4), 1e-5, dtype=torch.float32)
    sq = 16 * 1e-10
    assert float((diff.square().sum() + 1.0).sqrt() - 1.0) == 0.0                 # the naive form
    assert float(pseudo_huber(diff, 1.0)[0]) == pytest.approx(sq / 2, rel=1e-4)
    big = torch.full((1, 1, 4, 4), 3.0)
    assert float(pseudo_huber(big, 0.5)[0]) == pytest.approx(math.sqrt(16 * 9 + 0.25) - 0.5, rel=1e-6)


@pytest.mark.parametrize("progress, stage", [(0.0, 1), (0.124, 1), (0.125, 2), (0.5, 5), (0.99, 8), (1.0, 8)])
def test_ect_delta_follows_the_mapping_function(progress, stage):
    """Delta = (1 + k sigmoid(-b t)) / q^a, a = floor(8 progress) + 1 capped at 8 (ECT's defaults
    q = 2, k = 8, b = 1, 8 stages), against the formula with Python floats."""
    t = torch.tensor([0.01, 0.5, 2.0, 80.0], dtype=torch.float64)
    want = [(1 + 8 / (1 + math.exp(ti))) / 2 ** stage for ti in t.tolist()]
    torch.testing.assert_close(ect_delta(t, progress), torch.tensor(want, dtype=torch.float64), rtol=1e-14, atol=0)
    r = ect_sigma_r(t, progress, 0.002)
    want_r = [max(ti * (1 - w), 0.002) for ti, w in zip(t.tolist(), want)]
    torch.testing.assert_close(r, torch.tensor(want_r, dtype=torch.float64), rtol=1e-14, atol=0)


def test_ect_delta_settings_and_refusals():
    t = torch.tensor([1.0], dtype=torch.float64)
    s = ECTSettings(q=256.0, stages=1, k=0.0)                    # ECT's one-hour run: a fixed Delta
    assert float(ect_delta(t, 0.0, s)) == float(ect_delta(t, 1.0, s)) == 1 / 256
    with pytest.raises(ValueError, match="progress"):
        ect_delta(t, 1.5)
    with pytest.raises(ValueError, match="q > 1"):
        ECTSettings(q=1.0)


def test_sigma_t_is_a_truncated_lognormal():
    """All draws in [sigma_min, sigma_max], none piled up at the ends (as clamping would), and the
    fraction below any level is the truncated normal's (Phi(z) - Phi(lo)) / (Phi(hi) - Phi(lo)) in
    ln sigma. A narrow range, so truncation changes the fractions (below exp(p_mean): 0.42, not 0.5)."""
    gen = torch.Generator().manual_seed(0)
    lo_s, hi_s, pm, ps = 0.1, 2.0, -1.1, 2.0
    sig = sample_sigma_t(gen, 40000, lo_s, hi_s, pm, ps)
    assert sig.dtype == torch.float64 and float(sig.min()) >= lo_s and float(sig.max()) <= hi_s
    assert int(((sig == lo_s) | (sig == hi_s)).sum()) == 0
    phi = lambda s: 0.5 * (1 + math.erf((math.log(s) - pm) / ps / math.sqrt(2)))  # noqa: E731
    for level in (math.exp(pm), 0.2, 1.0):
        want = (phi(level) - phi(lo_s)) / (phi(hi_s) - phi(lo_s))
        assert float((sig < level).double().mean()) == pytest.approx(want, abs=0.008)


@pytest.mark.parametrize("p_mean,above_40,above_10", [(-1.1, 0.005, 0.042), (0.5, 0.030, 0.162)])
def test_how_often_tuning_draws_high_levels(p_mean, above_40, above_10):
    """docs/distill.md's fractions of sigma_t draws above 40 and 10 on [0.002, 80]: ECT's mean and
    diffuse's, by sampling (the truncated normal's closed form is the other test's)."""
    sig = sample_sigma_t(torch.Generator().manual_seed(1), 200000, 0.002, 80.0, p_mean, 2.0)
    assert float((sig > 40).double().mean()) == pytest.approx(above_40, abs=0.0015)
    assert float((sig > 10).double().mean()) == pytest.approx(above_10, abs=0.0015)


# ----------------------------------------------------------------------------------------------
# The training step

class KnotGain(nn.Module):
    """Student D(x, sigma) = D*(x, sigma) exp(h(ln sigma)), h piecewise linear on K knots spanning
    [ln sigma_min, ln sigma_max], h = 0 at initialisation (the student starts as the teacher)."""

    def __init__(self, g: Gaussian, knots: int = 9):
        super().__init__()
        self.g, self.lo, self.hi = g, math.log(g.sigma_min), math.log(g.sigma_max)
        self.h = nn.Parameter(torch.zeros(knots, dtype=torch.float64))

    def forward(self, x, sigma):
        sig = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1)
        u = (sig.log() - self.lo) / (self.hi - self.lo) * (len(self.h) - 1)
        i = u.floor().clamp(0, len(self.h) - 2).long()
        h = self.h[i] + (u - i) * (self.h[i + 1] - self.h[i])
        return h.exp().view(-1, 1, 1, 1) * self.g.denoiser(x, sig)


def _one_step_error(f, g: Gaussian) -> float:
    """Relative RMS error of f(., sigma_max) against f* on samples of the sigma_max marginal."""
    x = math.sqrt(g.s ** 2 + g.sigma_max ** 2) * _randn((256, 1, 4, 4), 11)
    exact = g(x, g.sigma_max)
    with torch.no_grad():
        return float((f(x, g.sigma_max) - exact).square().mean().sqrt() / exact.square().mean().sqrt())


def test_tuning_moves_the_student_towards_the_exact_consistency_function():
    """Gaussian data, s = 0.5, sigma in [0.002, 80]. Built on the exact D*, f is the teacher's
    one-step Euler jump, which at sigma_max is ~99% off f* (so f* is not reached for free). 600
    ECT steps (4 stages, Adam, lr 0.02 decaying linearly) shrink the 1-step error to 1.1% at seed 0
    (seeds 0-5: 1.1-12.6%)."""
    g = Gaussian(0.5, 0.002, 80.0)
    model = KnotGain(g)
    f = ConsistencyFunction(model, g.sigma_min, g.sigma_max)
    before = _one_step_error(f, g)
    assert before > 0.95
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    step = ConsistencyStep(model, f, opt, seed=0, settings=ECTSettings(stages=4))
    data, steps = torch.Generator().manual_seed(0), 600
    for k in range(steps):
        opt.param_groups[0]["lr"] = 0.02 * (1 - k / steps)
        loss, grad_norm = step(g.s * torch.randn(64, 1, 16, 16, generator=data, dtype=torch.float64), k, k / steps)
        assert torch.isfinite(loss) and torch.isfinite(grad_norm)
    assert _one_step_error(f, g) / before < 0.3


def test_step_is_a_pure_function_of_seed_and_step():
    g = Gaussian(0.5, 0.002, 80.0)
    x0 = g.s * _randn((8, 1, 4, 4), 5)

    def after(step_no, seed=0):
        model = KnotGain(g)
        step = ConsistencyStep(model, ConsistencyFunction(model, g.sigma_min, g.sigma_max),
                               torch.optim.Adam(model.parameters(), lr=0.01), seed=seed)
        loss, _ = step(x0, step_no, 0.3)
        return model.h.detach().clone(), loss

    (h1, l1), (h2, l2) = after(7), after(7)
    assert torch.equal(h1, h2) and torch.equal(l1, l2)
    assert not torch.equal(after(8)[0], h1) and not torch.equal(after(7, seed=1)[0], h1)


def test_step_loss_is_the_ect_loss_with_icts_c():
    """The step's loss is the mean of consistency_loss on its own terms, with c = 0.00054 sqrt(C H W)
    by default and the settings' c when given."""
    g = Gaussian(0.5, 0.002, 80.0)
    x0 = g.s * _randn((8, 1, 4, 4), 5)
    for huber_c, c in ((None, ICT_HUBER_C * math.sqrt(16)), (0.05, 0.05)):
        model = KnotGain(g)
        with torch.no_grad():
            model.h.copy_(torch.linspace(0, 3, len(model.h), dtype=torch.float64))     # a student off f*
        f = ConsistencyFunction(model, g.sigma_min, g.sigma_max)
        step = ConsistencyStep(model, f, torch.optim.Adam(model.parameters(), lr=0.01), seed=0,
                               settings=ECTSettings(huber_c=huber_c))
        want = consistency_loss(f, x0, *step.terms(x0, 2, 0.4), c).mean()
        loss, _ = step(x0, 2, 0.4)
        torch.testing.assert_close(loss, want, rtol=1e-6, atol=0)


@pytest.mark.parametrize("formulation", ["vp/eps", "edm"])
def test_a_unet_student_takes_a_step(formulation):
    """The pieces as the trainer will join them: a tiny UNet with dropout behind make_denoiser, one
    step (finite loss, weights move), and the tuned f still meets the boundary exactly."""
    torch.manual_seed(0)
    net = UNet(ModelConfig(**TINY_MODEL, dropout=0.1, image_size=8, in_channels=1))
    form = EDM() if formulation == "edm" else VP(Schedule("linear", 1000), "eps")
    den = make_denoiser(net, form)
    f = ConsistencyFunction(den, den.sigma_min, min(den.sigma_max, 80.0))
    before = [p.detach().clone() for p in net.parameters()]
    step = ConsistencyStep(net, f, torch.optim.AdamW(net.parameters(), lr=1e-3), seed=0, grad_clip=1.0)
    loss, grad_norm = step(_randn((4, 1, 8, 8), 8, torch.float32).clamp(-1, 1), 0, 0.0)
    assert torch.isfinite(loss) and torch.isfinite(grad_norm) and float(loss) > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters()))
    x = _randn((2, 1, 8, 8), 9, torch.float32)
    assert torch.equal(f(x, den.sigma_min), x)


def test_a_non_finite_step_is_skipped_by_the_fused_optimizer():
    """As in diffusion training: a NaN in the batch makes the loss non-finite; the step is marked
    bad and the fused AdamW leaves the weights alone; the next finite step moves them."""
    torch.manual_seed(0)
    net = UNet(ModelConfig(**TINY_MODEL, image_size=8, in_channels=1))
    den = make_denoiser(net, VP(Schedule("linear", 1000), "eps"))
    f = ConsistencyFunction(den, den.sigma_min, 80.0)
    step = ConsistencyStep(net, f, torch.optim.AdamW(net.parameters(), lr=1e-3, fused=True), seed=0)
    before = [p.detach().clone() for p in net.parameters()]
    x0 = _randn((4, 1, 8, 8), 8, torch.float32).clamp(-1, 1)
    bad = x0.clone()
    bad[0, 0, 0, 0] = float("nan")
    loss, _ = step(bad, 0, 0.0)
    assert not torch.isfinite(loss) and bool(step.bad)
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
    step(x0, 1, 0.0)
    assert not bool(step.bad) and any(not torch.equal(a, b) for a, b in zip(before, net.parameters()))


def test_both_passes_share_the_dropout_masks():
    """Every draw from torch's global generator (where diffuse's dropout takes its masks) is the
    same in the student's pass and the target's."""
    draws = []

    class Recording(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones((), dtype=torch.float64))

        def forward(self, x, sigma):
            draws.append(torch.rand(4))
            return self.w * x

    model = Recording()
    step = ConsistencyStep(model, ConsistencyFunction(model, 0.002, 80.0),
                           torch.optim.Adam(model.parameters(), lr=0.01), seed=0)
    step(_randn((4, 1, 2, 2), 6), 3, 0.5)
    assert len(draws) == 2 and torch.equal(draws[0], draws[1])
    step(_randn((4, 1, 2, 2), 6), 4, 0.5)
    assert not torch.equal(draws[2], draws[0])


# ----------------------------------------------------------------------------------------------
# Few-step sampling

@pytest.mark.parametrize("sigmas", [[80.0, 0.0], [80.0, 0.8, 0.0], [80.0, 2.0, 0.5, 0.0]])
def test_sampling_the_exact_consistency_function_gives_the_data_std(sigmas):
    """With f = f* (boundary eps = 0.3, read from its sigma_min; large, so that re-noising to sigma_i
    must subtract eps^2: adding sigma_i^2 instead gives std 0.612 at 2 steps),
    1-, 2- and 3-step samples have std sqrt(s^2 + eps^2), the boundary's own noise included."""
    g = Gaussian(0.5, 0.3, 80.0)
    sig = torch.tensor(sigmas, dtype=torch.float64)
    noise = ImageNoise(0, range(8))
    calls = []
    x = sample_consistency(g, prior(noise.randn(1, 64, 64), sig), sig, noise=noise,
                           callback=lambda i, x, x0, s: calls.append((i, s)))
    assert [c[0] for c in calls] == list(range(len(sigmas) - 1))
    assert float(x.std()) == pytest.approx(math.sqrt(0.25 + 0.09), rel=0.015)


def test_sampling_refusals():
    f = ConsistencyFunction(lambda x, s: x, 0.3, 80.0)
    z = torch.zeros(2, 1, 2, 2)
    with pytest.raises(ValueError, match="noise source"):
        sample_consistency(f, z, torch.tensor([80.0, 1.0, 0.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="at least the boundary"):
        sample_consistency(f, z, torch.tensor([80.0, 0.1, 0.0], dtype=torch.float64), noise=ImageNoise(0, range(2)))
    assert torch.equal(sample_consistency(f, z, torch.tensor([80.0, 0.0], dtype=torch.float64)), z)  # 1 step: no noise
