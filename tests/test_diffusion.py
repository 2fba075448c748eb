"""Schedules and the forward process against closed forms."""

import math

import pytest
import torch

from diffuse.diffusion import (Schedule, cosine_betas, linear_betas, log_snr, predict_x0_from_eps, q_sample)


def test_linear_betas_endpoints_and_spacing():
    b = linear_betas(1000, 1e-4, 0.02)
    assert b.dtype == torch.float64 and b.shape == (1000,)
    assert b[0].item() == pytest.approx(1e-4, abs=1e-15)
    assert b[-1].item() == pytest.approx(0.02, abs=1e-15)
    assert torch.allclose(b.diff(), torch.full((999,), (0.02 - 1e-4) / 999, dtype=torch.float64), atol=1e-15)


def test_alphas_cumprod_is_product_of_one_minus_beta():
    s = Schedule("linear", 50)
    for t in (0, 7, 49):
        assert s.alphas_cumprod[t].item() == pytest.approx(math.prod(1 - b for b in s.betas[: t + 1].tolist()), rel=1e-12)


def test_cosine_matches_nichol_dhariwal_closed_form():
    T, s_ = 1000, 0.008
    f = lambda t: math.cos((t / T + s_) / (1 + s_) * math.pi / 2) ** 2  # noqa: E731
    betas = cosine_betas(T)
    abar = torch.cumprod(1 - betas, 0)
    for t in (0, 100, 500, 900):    # away from the clipped tail, abar_t = f(t+1)/f(0)
        assert abar[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-10)
    assert betas.max().item() == pytest.approx(0.999)   # the last beta is clipped
    assert (betas[:-1] < 0.999).all()


def test_unknown_schedule_raises():
    with pytest.raises(ValueError):
        Schedule("quadratic", 10)


def test_q_sample_moments_match_closed_form():
    s = Schedule("linear", 1000)
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((20000, 1, 1, 1), 0.5, dtype=torch.float32)
    t = torch.full((20000,), 300)
    xt = q_sample(x0, t, torch.randn(x0.shape, generator=g), s.alphas_cumprod)
    abar = s.alphas_cumprod[300].item()
    assert xt.mean().item() == pytest.approx(math.sqrt(abar) * 0.5, abs=0.02)
    assert xt.var().item() == pytest.approx(1 - abar, rel=0.03)


def test_predict_x0_inverts_q_sample():
    s = Schedule("cosine", 1000)
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(4, 3, 8, 8, generator=g) * 2 - 1
    eps = torch.randn(4, 3, 8, 8, generator=g)
    t = torch.tensor([0, 10, 500, 998])
    xt = q_sample(x0, t, eps, s.alphas_cumprod)
    assert torch.allclose(predict_x0_from_eps(xt, t, eps, s.alphas_cumprod), x0, atol=1e-4)


def test_sigma_to_t_exact_on_grid_and_inverse():
    s = Schedule("linear", 1000)
    t = torch.tensor([0, 1, 250, 999])
    assert torch.equal(s.sigma_to_t(s.sigmas[t]), t.double())
    tf = torch.tensor([0.25, 10.5, 998.9], dtype=torch.float64)
    assert torch.allclose(s.sigma_to_t(s.t_to_sigma(tf)), tf, atol=1e-9)
    # sigma_t = sqrt((1 - abar)/abar) and log SNR = -2 log sigma
    assert torch.allclose(log_snr(s.alphas_cumprod), -2 * s.sigmas.log(), atol=1e-10)


# Zero terminal SNR puts sigma_{T-1} at infinity; the finite level standing in for it must stay above
# every other level, or samplers walk zero-length intervals and never ask the network about t = T-1.
@pytest.mark.parametrize("zero_snr", (False, True))
@pytest.mark.parametrize("T", (2, 10, 50, 100, 1000, 4000))
@pytest.mark.parametrize("name", ("linear", "cosine"))
def test_sigmas_strictly_increase_and_the_top_level_is_t_minus_1(name, T, zero_snr):
    # the default betas and, for linear, the 1000/T-scaled ones a run trains with (config.scale_linear_betas)
    betas = [(1e-4, 0.02)] + ([(1e-4 * 1000 / T, 0.02 * 1000 / T)] if name == "linear" and 0.02 * 1000 / T < 1 else [])
    for start, end in betas:
        s = Schedule(name, T, start, end, zero_terminal_snr=zero_snr)
        assert s.sigmas.shape == (T,) and bool(torch.isfinite(s.sigmas).all())
        assert bool((s.sigmas.diff() > 0).all()), s.sigmas[-5:].tolist()
        assert s.sigma_to_t(s.sigmas[-1:]).item() == T - 1
        assert torch.equal(s.sigma_to_t(s.sigmas), torch.arange(T, dtype=torch.float64))


def test_edm_grid_sigmas_strictly_increase():
    from diffuse.objectives import EDM

    for T in (2, 10, 1000, 4000):
        s = EDM(T).schedule
        assert bool((s.sigmas.diff() > 0).all()) and s.sigma_to_t(s.sigmas[-1:]).item() == T - 1


def test_a_repeated_noise_level_never_reaches_a_sampler():
    """A schedule whose levels repeat (as the zero-SNR linear one's top four once did) is refused in
    one line where the sigma array is built: DPM-Solver++(2M) divided by the zero step length."""
    from diffuse.samplers import sampler_sigmas

    sched = Schedule.from_sigmas("flat-top", torch.tensor([0.1, 1.0, 10.0, 10.0]))
    for sampler in ("dpmpp-2m", "dpmpp-2m-sde", "ddim"):
        with pytest.raises(ValueError, match="repeat a noise level") as e:
            sampler_sigmas(sampler, sched, 4, "trailing")
        assert "\n" not in str(e.value)
    assert sampler_sigmas("dpmpp-2m", sched, 2, "trailing").tolist() == [10.0, 1.0, 0.0]   # distinct: fine


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_snr_shift_multiplies_every_steps_snr_and_its_betas_rebuild_it(schedule):
    """--snr-shift F: abar/(1 - abar) is F times the unshifted schedule's at every step (Hoogeboom et
    al. 2023's shift, here checked as the closed form SNR' = F SNR), and the betas the samplers use
    multiply back to the shifted abar."""
    plain, shifted = Schedule(schedule, 1000), Schedule(schedule, 1000, snr_shift=0.25)
    snr = lambda s: s.alphas_cumprod / (1 - s.alphas_cumprod)  # noqa: E731
    torch.testing.assert_close(snr(shifted) / snr(plain), torch.full((1000,), 0.25, dtype=torch.float64),
                               rtol=1e-9, atol=0)
    torch.testing.assert_close(torch.cumprod(1 - shifted.betas, 0), shifted.alphas_cumprod, rtol=1e-12, atol=0)
    torch.testing.assert_close(shifted.sigmas, 2 * plain.sigmas, rtol=1e-9, atol=0)   # sigma = SNR^-1/2


def test_snr_shift_bad_values_are_one_line_errors():
    from diffuse.config import Config, validate
    from diffuse.errors import DiffuseError
    c = Config()
    c.diffusion.snr_shift = 0.0
    with pytest.raises(DiffuseError, match="--snr-shift must be positive, got 0"):
        validate(c)
    c.diffusion.snr_shift, c.diffusion.formulation = 0.5, "edm"
    with pytest.raises(DiffuseError, match="--snr-shift shifts a vp schedule"):
        validate(c)
