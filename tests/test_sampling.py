"""Sampling: per-image seeds, the step to sigma = 0, DDPM = DDIM(eta=1), and a Gaussian oracle."""

from __future__ import annotations

import pytest
import torch

from diffuse.objectives import VP, make_denoiser
from diffuse.diffusion import Schedule
from diffuse.generate import Loaded, generate
from diffuse.models import UNet
from diffuse.rng import ImageNoise
from diffuse.samplers import discrete_timesteps, karras_sigmas, prior, run_sampler, sample_ddim, sigmas_for

from .conftest import resolve


def _loaded(class_cond=False) -> Loaded:
    cfg = resolve("digits", None, None, {"model": {"base_channels": 8, "channel_mult": (1, 2), "num_res_blocks": 1,
                                                   "attn_resolutions": (), "num_groups": 4,
                                                   "class_cond": class_cond}})
    cfg.model.image_size, cfg.model.in_channels = 8, 1
    cfg.model.num_classes = 3 if class_cond else 0
    torch.manual_seed(0)
    net = UNet(cfg.model)
    torch.nn.init.normal_(net.conv_out.weight, std=0.05)
    return Loaded(net.eval(), cfg, {}, Schedule("cosine", 1000), "test")


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_first_images_do_not_depend_on_n_or_batch_size(sampler):
    loaded = _loaded()
    a, _ = generate(loaded, n=5, seed=7, sampler=sampler, steps=4, batch_size=2)
    b, _ = generate(loaded, n=3, seed=7, sampler=sampler, steps=4, batch_size=3)
    assert torch.equal(a[:3], b)
    c, _ = generate(loaded, n=3, seed=8, sampler=sampler, steps=4, batch_size=3)
    assert not torch.equal(b, c)


def test_ddpm_equals_ddim_eta_one():
    """Through generate(): the names route to the same update (and --eta reaches ddim). That the
    update is DDPM's posterior step is checked against Ho et al. eq. 7 below."""
    loaded = _loaded()
    a, ra = generate(loaded, n=3, seed=1, sampler="ddpm", steps=5)
    b, rb = generate(loaded, n=3, seed=1, sampler="ddim", steps=5, eta=1.0)
    assert torch.equal(a, b)
    assert ra["nfe"] == 5


def test_ddpm_step_is_the_posterior_of_ho_et_al_eq_7():
    """One ddpm step from timestep t to an earlier s (respaced: beta = 1 - abar_t/abar_s) draws from
    q(x_s | x_t, x0) = N(mu~, beta~ I) (Ho et al. 2020, eqs. 6-7, written out here in the VP view):
        mu~ = sqrt(abar_s) beta/(1 - abar_t) x0 + sqrt(1 - beta) (1 - abar_s)/(1 - abar_t) x_t,
        beta~ = (1 - abar_s)/(1 - abar_t) beta,
    with the same noise draw; x0 from a non-constant denoiser, so both mu~ terms are exercised."""
    from diffuse.samplers import sample_ddpm

    from .test_samplers_exact import RecordedNoise

    sched = Schedule("linear", 1000)
    ts = [999, 600, 250, 20]
    abar = sched.alphas_cumprod[ts]
    sigmas = sched.sigmas[ts]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 1, 2, 2, generator=g, dtype=torch.float64) * float((1 + sigmas[0] ** 2).sqrt())
    draws = [torch.randn(x.shape, generator=g, dtype=torch.float64) for _ in ts[1:]]
    den = lambda x_, sigma: 0.2 + 0.5 * x_ / (1 + float(sigma) ** 2)      # noqa: E731
    ours = sample_ddpm(den, x, sigmas, noise=RecordedNoise(draws))
    x_vp = abar[0].sqrt() * x
    for i in range(len(ts) - 1):
        a_t, a_s = abar[i], abar[i + 1]
        x0 = den(x_vp / a_t.sqrt(), sigmas[i])
        beta = 1 - a_t / a_s
        mean = a_s.sqrt() * beta / (1 - a_t) * x0 + (1 - beta).sqrt() * (1 - a_s) / (1 - a_t) * x_vp
        x_vp = mean + ((1 - a_s) / (1 - a_t) * beta).sqrt() * draws[i]
    torch.testing.assert_close(ours, x_vp / abar[-1].sqrt(), rtol=1e-10, atol=1e-10)


def test_last_step_lands_exactly_on_the_denoised_image():
    target = torch.full((2, 1, 4, 4), 0.25)
    sigmas = torch.tensor([10.0, 1.0, 0.0], dtype=torch.float64)
    x = sample_ddim(lambda x, s: target, torch.randn(2, 1, 4, 4), sigmas)
    assert torch.equal(x, target)
    noise = ImageNoise(0, range(2))
    x = sample_ddim(lambda x, s: target, torch.randn(2, 1, 4, 4), sigmas, eta=1.0, noise=noise)
    assert torch.equal(x, target)


def test_ddim_eta0_is_an_euler_step_of_the_probability_flow_ode():
    d0 = torch.full((1, 1, 2, 2), 0.3)
    x = torch.randn(1, 1, 2, 2)
    s, s_next = 2.0, 0.5
    got = sample_ddim(lambda x_, sig: d0, x, torch.tensor([s, s_next], dtype=torch.float64))
    want = x + (s_next - s) * (x - d0) / s                    # Karras alg. 1, Euler
    assert torch.allclose(got, want, atol=1e-6)


def test_spacings():
    assert discrete_timesteps(1000, 4, "trailing").tolist() == [999, 749, 499, 249]
    assert discrete_timesteps(1000, 4, "leading").tolist() == [750, 500, 250, 0]
    assert discrete_timesteps(1000, 4, "uniform").tolist() == [999, 666, 333, 0]
    assert discrete_timesteps(10, 10, "trailing").tolist() == list(range(9, -1, -1))
    k = karras_sigmas(0.01, 80.0, 5)
    assert k[0].item() == pytest.approx(80.0) and k[-1].item() == pytest.approx(0.01)
    s = sigmas_for(Schedule("linear", 1000), 10)
    assert s.shape == (11,) and s[-1] == 0 and (s[:-1].diff() < 0).all()


def test_gaussian_data_oracle_ddim_and_ddpm():
    """For data N(mu, s^2) the exact denoiser is D(x, sigma) = mu + s^2/(s^2 + sigma^2) (x - mu);
    sampling with it must reproduce the data distribution."""
    mu, s = 0.3, 0.5
    D = lambda x, sigma: mu + s**2 / (s**2 + float(sigma) ** 2) * (x - mu)  # noqa: E731
    sched = Schedule("linear", 1000)
    n = 4000
    z = torch.randn(n, 1, 1, 1, generator=torch.Generator().manual_seed(0))
    for name, steps in [("ddim", 100), ("ddpm", 1000)]:
        sig = sigmas_for(sched, steps)
        x = run_sampler(name, D, z, sig, noise=ImageNoise(0, range(n)))
        assert x.mean().item() == pytest.approx(mu, abs=0.03), name
        assert x.std().item() == pytest.approx(s, rel=0.05), name


def test_prior_scale():
    sig = torch.tensor([3.0, 0.0], dtype=torch.float64)
    assert torch.allclose(prior(torch.ones(1), sig), torch.tensor([10 ** 0.5]))


def test_guidance_batches_one_forward_and_w0_is_conditional():
    loaded = _loaded(class_cond=True)
    calls = []
    net = loaded.net
    orig = net.forward

    def spy(x, t, y=None):
        calls.append(x.shape[0])
        return orig(x, t, y)

    net.forward = spy
    y = torch.tensor([0, 2])
    x = torch.randn(2, 1, 8, 8)
    den = make_denoiser(net, VP(loaded.schedule), labels=y, guidance=2.0, null_label=3)
    out = den(x, torch.tensor(1.0))
    assert calls == [4]                                      # cond + uncond in one batch
    cond = make_denoiser(net, VP(loaded.schedule), labels=y)(x, torch.tensor(1.0))
    uncond = make_denoiser(net, VP(loaded.schedule), labels=torch.tensor([3, 3]))(x, torch.tensor(1.0))
    assert torch.allclose(out, 3 * cond - 2 * uncond, atol=1e-5)   # x0 is affine in eps
