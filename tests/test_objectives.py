"""Objectives: eps / x0 / v targets and their inverses, EDM's preconditioning, min-SNR weights, zero
terminal SNR, a tiny model learning under every formulation, and the CLI refusing what cannot work.

References are closed forms written out here from the papers, not diffuse's own functions:
Salimans & Ho 2022 (v), Karras et al. 2022 table 1 (EDM), Hang et al. 2023 eq. 8-10 (min-SNR),
Lin et al. 2023 alg. 1 (zero terminal SNR).
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from diffuse import cli
from diffuse.config import Config, DiffusionConfig, resolve
from diffuse.data import BatchStream, load_dataset
from diffuse.diffusion import Schedule, log_snr
from diffuse.errors import DiffuseError
from diffuse.generate import Loaded, generate
from diffuse.objectives import (EDM, VP, edm_coefficients, formulation_for, vp_coefficients,
                                vp_target, vp_x0_eps)
from diffuse.rng import generator
from diffuse.samplers import SAMPLERS
from diffuse.train import TrainStep, build_training, fill_model_from_data

from .conftest import TINY_FLAGS, TINY_MODEL

PREDS = ("eps", "x0", "v")


def _rand(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ----------------------------------------------------------------------------------------------
# Pure math

@pytest.mark.parametrize("pred", PREDS)
def test_target_round_trips_to_x0_and_eps(pred):
    x0, eps = _rand((6, 1, 4, 4), 0), _rand((6, 1, 4, 4), 1)
    abar = torch.tensor([0.999, 0.9, 0.5, 0.1, 1e-3, 1e-6], dtype=torch.float64).view(-1, 1, 1, 1)
    alpha, s = abar.sqrt(), (1 - abar).sqrt()
    x_t = alpha * x0 + s * eps
    x0_hat, eps_hat = vp_x0_eps(pred, vp_target(pred, x0, eps, alpha, s), x_t, alpha, s)
    torch.testing.assert_close(x0_hat, x0, rtol=0, atol=1e-9)
    torch.testing.assert_close(eps_hat, eps, rtol=0, atol=1e-9)


def test_v_is_alpha_eps_minus_sigma_x0():
    x0, eps = _rand((3, 2), 0), _rand((3, 2), 1)
    alpha, s = torch.tensor(0.6, dtype=torch.float64), torch.tensor(0.8, dtype=torch.float64)
    torch.testing.assert_close(vp_target("v", x0, eps, alpha, s), 0.6 * eps - 0.8 * x0)


@pytest.mark.parametrize("pred", PREDS)
def test_vp_preconditioning_is_the_conversion_in_the_ve_view(pred):
    """D(x; sigma) = c_skip x + c_out F(c_in x) equals vp_x0_eps's x0 for the same output F, with
    x the VE view x_t / alpha, and c_in = alpha (Karras table 1, VP column)."""
    x0, eps, out = _rand((4, 1, 3, 3), 0), _rand((4, 1, 3, 3), 1), _rand((4, 1, 3, 3), 2)
    sigma = torch.tensor([0.01, 0.5, 3.0, 2e4], dtype=torch.float64)
    c_skip, c_out, c_in = (c.view(-1, 1, 1, 1) for c in vp_coefficients(pred, sigma))
    alpha = 1 / (1 + sigma ** 2).sqrt()
    s = sigma * alpha
    a, s4 = alpha.view(-1, 1, 1, 1), s.view(-1, 1, 1, 1)
    x_t = a * x0 + s4 * eps
    x_ve = x_t / a
    torch.testing.assert_close(c_in, a)
    torch.testing.assert_close(c_skip * x_ve + c_out * out, vp_x0_eps(pred, out, x_t, a, s4)[0], rtol=1e-9, atol=1e-9)


def test_edm_coefficients_match_table_1():
    sd = 0.5
    for sigma in (0.002, 0.5, 1.0, 80.0):
        c_skip, c_out, c_in, c_noise = (float(c) for c in edm_coefficients(torch.tensor(sigma, dtype=torch.float64), sd))
        assert c_skip == pytest.approx(0.25 / (sigma ** 2 + 0.25), rel=1e-12)
        assert c_out == pytest.approx(sigma * 0.5 / math.sqrt(sigma ** 2 + 0.25), rel=1e-12)
        assert c_in == pytest.approx(1 / math.sqrt(sigma ** 2 + 0.25), rel=1e-12)
        assert c_noise == pytest.approx(math.log(sigma) / 4, rel=1e-12)
        # sec. B.6: unit-variance input and target for data of std sigma_data, and c_skip + c_out^2/sd^2 = 1
        assert c_in ** 2 * (sigma ** 2 + sd ** 2) == pytest.approx(1, rel=1e-12)
        assert c_skip + c_out ** 2 / sd ** 2 == pytest.approx(1, rel=1e-12)
    # at sigma = 0.5 (= sigma_data): c_skip 1/2, c_out 0.5/sqrt(2), c_in sqrt(2)
    c_skip, c_out, c_in, _ = (float(c) for c in edm_coefficients(torch.tensor(0.5, dtype=torch.float64), sd))
    assert (c_skip, c_out, c_in) == pytest.approx((0.5, 0.5 / math.sqrt(2), math.sqrt(2)), rel=1e-12)


def test_edm_training_terms_target_reconstructs_x0_and_has_unit_weight():
    """F = F* makes D(x; sigma) = x0, the EDM loss weight lambda c_out^2 = 1, and the target has unit
    variance for data of std sigma_data (Karras et al. 2022, app. B.6)."""
    edm = EDM(sigma_data=0.5)
    x0 = torch.randn(4096, 1, 2, 2, generator=torch.Generator().manual_seed(0)) * 0.5
    x_in, c_noise, target, weight = edm.training_terms(x0, torch.Generator().manual_seed(1))
    assert weight is None                                            # uniform = EDM's lambda(sigma)
    sigma = (c_noise.double() / 250).exp()                          # c_noise = 1000 ln(sigma) / 4
    c_skip, c_out, c_in, _ = edm(sigma)
    x = x_in.double() / c_in.view(-1, 1, 1, 1)
    d = c_skip.view(-1, 1, 1, 1) * x + c_out.view(-1, 1, 1, 1) * target.double()
    torch.testing.assert_close(d, x0.double(), rtol=0, atol=2e-4)
    assert target.var().item() == pytest.approx(1.0, abs=0.05)
    ln_sigma = sigma.log()
    assert ln_sigma.mean().item() == pytest.approx(-1.2, abs=0.06) and ln_sigma.std().item() == pytest.approx(1.2, abs=0.06)


@pytest.mark.parametrize("pred", PREDS)
@pytest.mark.parametrize("weighting", ("min-snr", "soft-min-snr"))
def test_min_snr_weights_match_the_paper_per_objective(pred, weighting):
    """Hang et al. 2023 eq. 8-10 with gamma = 5: eps min(SNR, g)/SNR, x0 min(SNR, g), v min(SNR, g)/(SNR + 1);
    the soft variant swaps min(SNR, g) for SNR g/(SNR + g). Weights are read from VP.training_terms
    at the t it drew (re-drawn here from the same generator)."""
    sched = Schedule("cosine", 1000)
    vp = VP(sched, pred, weighting, 5.0)
    x0 = torch.zeros(256, 1, 2, 2)
    _, c_noise, _, weight = vp.training_terms(x0, torch.Generator().manual_seed(3), sched.alphas_cumprod)
    t = torch.randint(0, 1000, (256,), generator=torch.Generator().manual_seed(3))
    assert torch.equal(c_noise.long(), t)
    snr = sched.alphas_cumprod[t] / (1 - sched.alphas_cumprod[t])
    m = snr.clamp(max=5.0) if weighting == "min-snr" else snr * 5 / (snr + 5)
    expected = {"eps": m / snr, "x0": m, "v": m / (snr + 1)}[pred]
    torch.testing.assert_close(weight.double(), expected, rtol=1e-6, atol=1e-12)
    assert (snr > 5).any() and (snr < 5).any()                      # both branches of the minimum seen


def test_uniform_eps_draws_are_the_old_trainers_bit_for_bit():
    sched = Schedule("linear", 1000)
    x0 = _rand((8, 1, 4, 4), 0).float()
    x_in, c_noise, target, weight = VP(sched).training_terms(x0, torch.Generator().manual_seed(5), sched.alphas_cumprod)
    g = torch.Generator().manual_seed(5)
    t = torch.randint(0, 1000, (8,), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    abar = sched.alphas_cumprod[t].float().view(-1, 1, 1, 1)
    assert weight is None and torch.equal(target, eps) and torch.equal(c_noise, t.float())
    torch.testing.assert_close(x_in, abar.sqrt() * x0 + (1 - abar).sqrt() * eps)


@pytest.mark.parametrize("name", ("linear", "cosine"))
def test_zero_terminal_snr_rescale(name):
    plain, zero = Schedule(name, 1000), Schedule(name, 1000, zero_terminal_snr=True)
    assert zero.alphas_cumprod[-1].item() == 0.0                     # exactly
    assert zero.alphas_cumprod[0].item() == pytest.approx(plain.alphas_cumprod[0].item(), rel=1e-12)
    snr = log_snr(zero.alphas_cumprod)
    assert bool((snr[1:] < snr[:-1]).all())                         # order kept, strictly (last is -inf)
    # Lin et al. 2023 alg. 1, written out
    r = plain.alphas_cumprod.sqrt()
    ref = ((r - r[-1]) * r[0] / (r[0] - r[-1])) ** 2
    torch.testing.assert_close(zero.alphas_cumprod, ref, rtol=1e-12, atol=0)
    assert zero.betas[-1].item() == 1.0
    # sigmas: every level below the top is the rescaled abar's own; the top (sigma = inf at abar = 0)
    # is diffusers' abar = 2^-24 (sigma 4096) unless the level below is already past it (linear:
    # sigma_998 ~ 1.5e4), then twice that level, so the levels stay distinct and increasing
    below = ((1 - zero.alphas_cumprod[:-1]) / zero.alphas_cumprod[:-1]).sqrt()
    torch.testing.assert_close(zero.sigmas[:-1], below, rtol=1e-12, atol=0)
    assert zero.sigma_max == pytest.approx(max(math.sqrt(2 ** 24 - 1), 2 * below[-1].item()), rel=1e-12)
    assert {"linear": below[-1].item() > 4096, "cosine": below[-1].item() < 4096}[name]   # both branches taken
    assert bool((zero.sigmas.diff() > 0).all()) and zero.sigma_to_t(zero.sigmas[-1:]).item() == 999


def test_config_refusals_say_why():
    def reason(**kw):
        with pytest.raises(DiffuseError) as e:
            resolve("digits", None, None, {"diffusion": kw})
        return str(e.value)

    assert "Lin et al." in reason(zero_terminal_snr=True) and "objective v" in reason(zero_terminal_snr=True)
    assert "own" in reason(formulation="edm", prediction="v")
    assert "--objective" in reason(prediction="score")
    assert "--loss-weight" in reason(loss_weight="p2")
    assert "--formulation" in reason(formulation="ve")
    resolve("digits", None, None, {"diffusion": {"zero_terminal_snr": True, "prediction": "v"}})


def test_old_configs_load_as_vp_eps_uniform():
    d = Config().to_dict()["diffusion"]
    old = {k: d[k] for k in ("schedule", "timesteps", "beta_start", "beta_end")} | {"prediction": "eps"}
    f = formulation_for(Config.from_dict({"diffusion": old}).diffusion)
    assert isinstance(f, VP) and (f.prediction, f.loss_weight) == ("eps", "uniform")
    assert formulation_for(DiffusionConfig()).prediction == "eps"


# ----------------------------------------------------------------------------------------------
# A tiny model learns under every formulation

FORMULATIONS = {
    "vp-eps": {},
    "vp-x0": {"prediction": "x0"},
    "vp-v-min-snr": {"prediction": "v", "loss_weight": "min-snr"},
    "vp-v-zero-snr": {"prediction": "v", "zero_terminal_snr": True, "loss_weight": "soft-min-snr"},
    "edm": {"formulation": "edm"},
}


@pytest.mark.parametrize("name", FORMULATIONS)
def test_tiny_model_learns(name):
    """Loss falls on a fixed batch (to < 0.7 of its value after the first step, measured on the same
    noise draws), and samples (dpmpp-2m, 8 NFE) have a mean image nearer the data's than clipped
    standard noise's (< 0.7 of its distance). Measured margins (120 steps, batch 32): loss ratio
    0.1-0.35 (edm ~0.5), distance ratio 0.3-0.5."""
    torch.manual_seed(0)
    cfg = resolve("digits", None, None, {"model": dict(TINY_MODEL, attn_resolutions=()),
                                         "diffusion": FORMULATIONS[name],
                                         "train": {"lr": 3e-3, "batch_size": 32, "ema_decay": 0.9, "precision": "fp32"}})
    data = load_dataset("digits")
    fill_model_from_data(cfg, data)
    device = torch.device("cpu")
    model, ema, opt = build_training(cfg, device, channels_last=False)
    form = formulation_for(cfg.diffusion)
    step = TrainStep(model, ema, opt, form, cfg, device=device, amp=None, channels_last=False)
    x0, _ = BatchStream(data, 32, 0, device, False).batch(0)
    steps = 120
    # the same noise draws at both ends, so the comparison is of the weights, not of the draws
    losses = []
    for k in range(steps):
        step(x0, None, k)
        if k in (0, steps - 1):
            with torch.no_grad():
                tot = 0.0
                for i in range(4):
                    x_in, c_noise, target, weight = form.training_terms(x0, generator(9, "probe", i), step.abar)
                    out = model(x_in, c_noise)
                    per = (out - target).square().flatten(1).mean(1)
                    tot += float((per if weight is None else weight * per).mean())
                losses.append(tot / 4)
    assert losses[1] < 0.7 * losses[0], losses
    loaded = Loaded(ema.eval(), cfg, {}, form.schedule, "tiny", form)
    images, _ = generate(loaded, n=64, seed=0, sampler="dpmpp-2m", steps=8, batch_size=64)
    samples = images.float() / 127.5 - 1
    data_mean = data.images.float().div(127.5).sub(1).mean(0)
    noise = torch.randn(samples.shape, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    dist = lambda x: float((x.mean(0) - data_mean).square().mean().sqrt())  # noqa: E731
    assert dist(samples) < 0.7 * dist(noise), (dist(samples), dist(noise))


# ----------------------------------------------------------------------------------------------
# Through the CLI: train, sample with every sampler, guide, eval; resume and init-from refusals

CLI_FORMULATIONS = {"vp-x0": ["--objective", "x0"],
                    "vp-v-zero-snr": ["--objective", "v", "--zero-terminal-snr", "--loss-weight", "min-snr"],
                    "edm": ["--formulation", "edm", "--loss-weight", "soft-min-snr"]}


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("objective-runs")
    runs = {}
    for name, flags in CLI_FORMULATIONS.items():
        out = root / name
        assert cli.main(["train", "--out", str(out), "--steps", "2", "--batch-size", "8", "--class-cond",
                         "--sample-n", "10", "--sample-steps", "2", "--no-progress", "--precision", "fp32",
                         *TINY_FLAGS, *flags]) == 0
        runs[name] = out
    return runs


@pytest.mark.parametrize("name", CLI_FORMULATIONS)
def test_cli_trains_samples_guides_every_formulation(cli_runs, name, tmp_path, capsys):
    run = cli_runs[name]
    header = json.loads((run / "checkpoints" / "last" / "config.json").read_text())
    d = header["config"]["diffusion"]
    assert (d["formulation"], d["prediction"]) == {"vp-x0": ("vp", "x0"), "vp-v-zero-snr": ("vp", "v"),
                                                   "edm": ("edm", None)}[name]
    import numpy as np
    from safetensors.torch import load_file, save_file

    # After two training steps the zero-initialised output layer is still ~5e-5, so the network's
    # output barely depends on anything and guidance cannot move a uint8 pixel; a copy of the
    # checkpoint with a random class embedding and output layer makes the check below able to fail.
    ckpt = tmp_path / "ckpt"
    shutil.copytree(run / "checkpoints" / "last", ckpt)
    weights = load_file(ckpt / "ema.safetensors")
    gen = torch.Generator().manual_seed(0)
    for key, scale in (("class_emb.weight", 3.0), ("conv_out.weight", 0.05)):
        weights[key] = torch.randn(weights[key].shape, generator=gen) * scale
    save_file(weights, ckpt / "ema.safetensors")
    for sampler in SAMPLERS:                   # every sampler of a diffusion run (not a distilled run's)
        images = {}
        for w in ("1.5", "0"):
            out = tmp_path / f"{sampler}-{w}.npz"
            assert cli.main(["sample", str(ckpt), "--sampler", sampler, "--steps", "3", "--n", "2", "--class", "0,1",
                             "--guidance", w, "--out", str(out), "--no-progress"]) == 0
            images[w] = np.load(out)["images"]
        assert images["1.5"].shape[0] == 2
        # the guidance reaches this formulation's denoiser: same seeds, other weight, other images
        assert not np.array_equal(images["1.5"], images["0"]), f"{name}/{sampler}: --guidance had no effect"
        assert images["1.5"].std() > 0
    capsys.readouterr()
    assert cli.main(["info", str(run)]) == 0
    assert {"vp-x0": "predicts x0", "vp-v-zero-snr": "zero terminal SNR", "edm": "EDM"}[name] in capsys.readouterr().out


def test_cli_edm_defaults_to_heun_35(cli_runs, tmp_path, capsys):
    out = tmp_path / "s.npz"
    assert cli.main(["sample", str(cli_runs["edm"]), "--n", "1", "--out", str(out), "--no-progress"]) == 0
    assert "heun, 35 NFE" in capsys.readouterr().out


@pytest.fixture(scope="module")
def linear_zero_snr_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("linear-zero-snr") / "run"
    assert cli.main(["train", "--out", str(out), "--steps", "1", "--batch-size", "4", "--sample-n", "1", "--sample-steps",
                     "1", "--no-progress", "--precision", "fp32", "--schedule", "linear", "--timesteps", "1000",
                     "--objective", "v", "--zero-terminal-snr", *TINY_FLAGS]) == 0
    return out


@pytest.mark.parametrize("spacing", ("trailing", "uniform"))
@pytest.mark.parametrize("sampler", ("dpmpp-2m", "dpmpp-2m-sde"))
def test_cli_zero_snr_multistep_samplers_walk_500_distinct_levels(linear_zero_snr_run, sampler, spacing, tmp_path):
    """The linear zero-SNR schedule once clamped t = 996..999 to one level: over ~334 steps the
    multistep solvers met a zero-length interval (ZeroDivisionError in h_prev / h)."""
    out = tmp_path / "s.npz"
    assert cli.main(["sample", str(linear_zero_snr_run), "--sampler", sampler, "--spacing", spacing,
                     "--steps", "500", "--n", "1", "--out", str(out), "--no-progress"]) == 0
    import numpy as np
    assert np.load(out)["images"].shape[0] == 1


def test_cli_zero_snr_refuses_leading_spacing(cli_runs, tmp_path, capsys):
    code = cli.main(["sample", str(cli_runs["vp-v-zero-snr"]), "--sampler", "ddim", "--spacing", "leading",
                     "--steps", "3", "--n", "1", "--out", str(tmp_path / "s.png"), "--no-progress"])
    assert code != 0 and "zero terminal SNR" in capsys.readouterr().err


def test_resume_refuses_a_formulation_change(cli_runs, capsys):
    code = cli.main(["train", "--resume", str(cli_runs["vp-x0"]), "--objective", "v", "--no-progress"])
    err = capsys.readouterr().err
    assert code != 0 and "--objective" in err and "x0" in err and "Traceback" not in err
    code = cli.main(["train", "--resume", str(cli_runs["edm"]), "--formulation", "vp", "--no-progress"])
    assert code != 0 and "--formulation" in capsys.readouterr().err


def test_init_from_across_formulations_is_refused(cli_runs, tmp_path, capsys):
    code = cli.main(["train", "--out", str(tmp_path / "ft"), "--init-from", str(cli_runs["edm"]), "--steps", "1",
                     "--class-cond", "--no-progress", *TINY_FLAGS])
    err = capsys.readouterr().err
    assert code != 0 and "formulation is 'edm' there but 'vp' here" in err
    assert not (tmp_path / "ft" / "checkpoints").exists()
    # same formulation, another loss weighting: allowed (fine-tuning)
    assert cli.main(["train", "--out", str(tmp_path / "ft2"), "--init-from", str(cli_runs["edm"]), "--steps", "1",
                     "--batch-size", "4", "--sample-n", "2", "--sample-steps", "2", "--class-cond", "--no-progress",
                     "--formulation", "edm", *TINY_FLAGS]) == 0


def test_zero_snr_top_level_feeds_the_network_pure_noise_whatever_its_value():
    """The finite top level stands in for sigma = inf: at x = sqrt(1 + sigma^2) z (samplers.prior) the
    network's input c_in x is z exactly, as in training at abar = 0, and v's D = c_skip x + c_out F
    is within O(1/sigma) of the abar = 0 one, -F."""
    for name in ("linear", "cosine"):
        top = torch.tensor(Schedule(name, 1000, zero_terminal_snr=True).sigma_max, dtype=torch.float64)
        c_skip, c_out, c_in = vp_coefficients("v", top)
        scale = (1 + top ** 2).sqrt()                                 # x = scale z
        assert float(c_in * scale) == pytest.approx(1.0, rel=1e-12)
        assert float(c_skip * scale) <= 1 / float(top) and abs(float(c_out) + 1) <= 1 / float(top) ** 2
