"""Closed-form oracles: with Gaussian data every sampler's exact answer is known.

For data N(mu, s^2 I) the noisy marginal at sigma is N(mu, (s^2 + sigma^2) I), so the exact denoiser is
    D(x, sigma) = mu + s^2 / (s^2 + sigma^2) (x - mu)
and the probability-flow ODE dx/dsigma = (x - D)/sigma = (x - mu) sigma / (s^2 + sigma^2) has the
solution map
    x(b) = mu + (x(a) - mu) sqrt((s^2 + b^2) / (s^2 + a^2)).
Every sampler ends with the same step x = D(x, sigma_last) from the last nonzero sigma, so the exact
reference for a run is D(flow(x_start, sigma_0 -> sigma_last), sigma_last).
All of this is float64, on [n, 1, 1, 1] "images".
"""

from __future__ import annotations

import math

import pytest
import torch

from diffuse.diffusion import Schedule
from diffuse.samplers import SAMPLERS, prior, run_sampler, sampler_sigmas, sigmas_for

MU, S = 0.3, 0.5
DETERMINISTIC = [name for name, (_, stochastic, _, _) in SAMPLERS.items() if not stochastic]
STOCHASTIC = [name for name, (_, stochastic, _, _) in SAMPLERS.items() if stochastic]
EXPECTED_ORDER = {"ddim": 1, "euler": 1, "heun": 2, "dpmpp-2m": 2}


def exact_denoiser(x, sigma):
    return MU + S ** 2 / (S ** 2 + float(sigma) ** 2) * (x - MU)


def flow(x, a: float, b: float):
    """The exact probability-flow ODE map from noise level a to b."""
    return MU + (x - MU) * math.sqrt((S ** 2 + b ** 2) / (S ** 2 + a ** 2))


class StreamNoise:
    """One generator for the whole batch: enough for distribution tests, and fast for 10^4 images
    (samplers only call ``randn_like``)."""

    def __init__(self, seed: int):
        self.g = torch.Generator().manual_seed(seed)

    def randn_like(self, x):
        return torch.randn(x.shape, generator=self.g, dtype=torch.float32).to(x.dtype)


def standard_z(n: int, seed: int = 0):
    """n standard-normal draws with sample mean 0 and std 1 exactly, so that the start does not add
    sampling error to the moments checked below."""
    z = torch.randn(n, 1, 1, 1, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (z - z.mean()) / z.std()


@pytest.mark.parametrize("schedule_name", ["linear", "cosine"])
def test_error_shrinks_at_each_samplers_order(schedule_name):
    """Error against the exact ODE map for the same z, on karras grids of k = 20..160 intervals:
    Euler and DDIM (the same method in the sigma view) halve it as k doubles, Heun and DPM-Solver++(2M)
    quarter it. Fewer intervals are pre-asymptotic (DPM-Solver++'s error changes sign near k = 10)."""
    schedule = Schedule(schedule_name, 1000)
    z = standard_z(256)
    ks = (20, 40, 80, 160)
    errors = {}
    for name in DETERMINISTIC:
        errors[name] = []
        for k in ks:
            sigmas = sigmas_for(schedule, k, "karras")
            x = run_sampler(name, exact_denoiser, z, sigmas)
            s0, s_last = float(sigmas[0]), float(sigmas[-2])
            ref = exact_denoiser(flow(prior(z, sigmas), s0, s_last), s_last)
            errors[name].append((x - ref).abs().max().item())
        orders = [math.log2(a / b) for a, b in zip(errors[name], errors[name][1:])]
        p = EXPECTED_ORDER[name]
        assert all(abs(o - p) < 0.2 for o in orders[1:]), (name, errors[name], orders)
    assert errors["euler"] == pytest.approx(errors["ddim"], rel=1e-6)      # DDIM eta=0 is Euler
    # at an equal budget of ~160 network evaluations the second-order methods win clearly (with ~40 on
    # the cosine schedule they do not yet: its sigma_max ~2e4 leaves few karras points near sigma ~ s)
    assert errors["dpmpp-2m"][ks.index(160)] < errors["euler"][ks.index(160)] / 8
    assert errors["heun"][ks.index(80)] < errors["euler"][ks.index(160)] / 2     # 80 intervals = 159 NFE


@pytest.mark.parametrize("schedule_name", ["linear", "cosine"])
@pytest.mark.parametrize("name", list(SAMPLERS))
def test_lands_on_the_data_distribution(name, schedule_name):
    """With a generous budget (500 NFE) every sampler reproduces N(mu, s^2): deterministic ones up to
    discretisation, stochastic ones also up to sampling noise (3 standard errors)."""
    schedule = Schedule(schedule_name, 1000)
    n = 10_000
    z = standard_z(n, seed=1)
    sigmas = sampler_sigmas(name, schedule, 500)
    x = run_sampler(name, exact_denoiser, z, sigmas, noise=StreamNoise(2))
    s0 = float(sigmas[0])
    # the prior N(0, 1 + sigma_0^2) is not exactly the data's N(mu, s^2 + sigma_0^2): the exact map moves
    # the moments by up to s/sigma_0 = 0.3% (linear)
    mean = MU * (1 - S / math.sqrt(S ** 2 + s0 ** 2))
    std = S * math.sqrt(1 + s0 ** 2) / math.sqrt(S ** 2 + s0 ** 2)
    stochastic = SAMPLERS[name][1]
    assert x.mean().item() == pytest.approx(mean, abs=0.02 if stochastic else 0.005)
    assert x.std().item() == pytest.approx(std, rel=0.04 if stochastic else 0.02)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_last_step_to_zero_returns_the_denoised_image_exactly(name):
    """The step to sigma = 0 on its own, for every sampler: from any x it must return D(x, sigma) bit
    for bit (a slope times -sigma added to x is only equal up to rounding), and a constant denoiser
    must come back unchanged after several steps."""
    fn = SAMPLERS[name][0]
    noise = StreamNoise(0)
    x = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0)) * 7.0

    def affine(x_, sigma):
        return 0.37 * x_ + 0.1 * float(sigma)

    one_step = fn(affine, x, torch.tensor([2.5, 0.0], dtype=torch.float64), noise=noise)
    assert torch.equal(one_step, affine(x, 2.5))
    target = torch.full_like(x, 0.25)
    for sigmas in ([10.0, 1.0, 0.0], [80.0, 7.0, 3.0, 0.5, 0.0]):
        out = fn(lambda x_, s: target, x, torch.tensor(sigmas, dtype=torch.float64), noise=noise)
        assert torch.equal(out, target), sigmas


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_deterministic_samplers_ignore_noise(name):
    sigmas = sigmas_for(Schedule("linear", 1000), 6, "karras")
    z = standard_z(16)
    a = run_sampler(name, exact_denoiser, z, sigmas)
    b = run_sampler(name, exact_denoiser, z, sigmas, noise=StreamNoise(5))
    assert torch.equal(a, b)


@pytest.mark.parametrize("name", STOCHASTIC)
def test_stochastic_samplers_use_their_noise(name):
    sigmas = sampler_sigmas(name, Schedule("linear", 1000), 6)
    z = standard_z(16)
    a = run_sampler(name, exact_denoiser, z, sigmas, noise=StreamNoise(5))
    b = run_sampler(name, exact_denoiser, z, sigmas, noise=StreamNoise(5))
    c = run_sampler(name, exact_denoiser, z, sigmas, noise=StreamNoise(6))
    assert torch.equal(a, b) and (a - c).abs().max() > 1e-3
    with pytest.raises(ValueError, match="noise"):
        run_sampler(name, exact_denoiser, z, sigmas)


@pytest.mark.parametrize("eta", [0.5, 1.0, 2.0, 5.0])
def test_dpmpp_sde_step_is_exact_for_a_point_mass(eta):
    """For a point mass at MU the exact denoiser is the constant MU, so every step of the eta family must
    map x ~ N(MU, sigma_s^2) to N(MU, sigma_t^2) exactly, however large the steps (for other data the
    steps keep the marginals only as they shrink: tests/test_samplers_exact.py): mean and std of 20,000
    samples after three coarse steps (not to 0) within 4 standard errors. The noise weight
    sigma_t sqrt(1 - e^{-2 eta h}) is what this checks: any other weight moves the std by >= 5%."""
    from diffuse.samplers import sample_dpmpp_2m_sde

    sigmas = torch.tensor([5.0, 2.0, 0.7, 0.3], dtype=torch.float64)
    z = standard_z(20_000, seed=4)
    x = sample_dpmpp_2m_sde(lambda x_, s: torch.full_like(x_, MU), MU + 5.0 * z, sigmas, noise=StreamNoise(3), eta=eta)
    se = 0.3 / math.sqrt(20_000)
    assert x.mean().item() == pytest.approx(MU, abs=4 * se)
    assert x.std().item() == pytest.approx(0.3, abs=4 * se / math.sqrt(2))   # std error of a std: se/sqrt(2)
