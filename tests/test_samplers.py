"""The sampler registry through generate() and the CLI parser: NFE budgets that are counted, not
assumed; per-image seeds for every sampler; spacings; refused combinations; CLI names and defaults."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from diffuse import cli
from diffuse.config import Config
from diffuse.diffusion import Schedule
from diffuse.errors import DiffuseError
from diffuse.generate import Loaded, generate
from diffuse.models import UNet
from diffuse.samplers import SAMPLERS, SPACINGS, discrete_timesteps, intervals_for, sampler_sigmas

from .conftest import resolve


@pytest.fixture(autouse=True)
def _one_thread():
    """These nets are tiny (8x8 images): one thread is several times faster than two, which spin
    against each other when the machine is busy (measured: 20 forwards 0.05 s vs 0.4-1.3 s)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _loaded() -> Loaded:
    cfg = resolve("digits", None, None, {"model": {"base_channels": 8, "channel_mult": (1, 2), "num_res_blocks": 1,
                                                   "attn_resolutions": (), "num_groups": 4}})
    cfg.model.image_size, cfg.model.in_channels = 8, 1
    torch.manual_seed(0)
    net = UNet(cfg.model)
    torch.nn.init.normal_(net.conv_out.weight, std=0.05)
    return Loaded(net.eval(), cfg, {}, Schedule("linear", 1000), "test")


@pytest.fixture(scope="module")
def loaded() -> Loaded:
    return _loaded()


def test_heun_budget():
    nfe_of = SAMPLERS["heun"][3]
    assert [nfe_of(n) for n in (1, 2, 3, 4, 5, 20)] == [1, 1, 3, 3, 5, 19]
    assert [intervals_for("heun", n) for n in (1, 2, 3, 20)] == [1, 1, 2, 10]
    for name in SAMPLERS:
        if name != "heun":
            assert SAMPLERS[name][3](7) == 7 and intervals_for(name, 7) == 7


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_reported_nfe_is_counted_and_matches_the_registry(name, loaded):
    """generate()'s record reports the network calls the Denoiser counted; they equal nfe_of(steps),
    never exceed the budget, and equal the calls the network itself saw and the progress ticks."""
    calls = []
    forward = loaded.net.forward
    loaded.net.forward = lambda x, t, y=None: calls.append(x.shape[0]) or forward(x, t, y)
    try:
        for steps in (1, 2, 5, 6):
            calls.clear()
            ticks = []
            _, record = generate(loaded, n=3, seed=0, sampler=name, steps=steps, batch_size=2,
                                 progress=ticks.append)
            nfe = SAMPLERS[name][3](steps)
            assert record["nfe"] == nfe <= steps, (steps, record)
            assert calls == [2] * nfe + [1] * nfe                    # two batches, nfe calls each
            assert len(ticks) == 2 * nfe
            assert record["spacing"] == SAMPLERS[name][2]
    finally:
        loaded.net.forward = forward


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_first_images_do_not_depend_on_n_or_batch_size(name, loaded):
    a, _ = generate(loaded, n=5, seed=7, sampler=name, steps=4, batch_size=2)
    b, _ = generate(loaded, n=3, seed=7, sampler=name, steps=4, batch_size=3)
    assert torch.equal(a[:3], b)
    c, _ = generate(loaded, n=3, seed=8, sampler=name, steps=4, batch_size=3)
    assert not torch.equal(b, c)


def test_sampler_sigmas_per_spacing():
    sched = Schedule("linear", 1000)
    for name in SAMPLERS:
        for spacing in SPACINGS:
            if name == "ddpm" and spacing == "karras":
                continue
            s = sampler_sigmas(name, sched, 9, spacing)
            assert s.dtype == torch.float64 and s[-1] == 0 and (s[:-1].diff() < 0).all()
            assert len(s) == intervals_for(name, 9) + 1
            if spacing == "karras":
                assert s[0].item() == pytest.approx(sched.sigma_max) and s[-2].item() == pytest.approx(sched.sigma_min)
            else:
                assert torch.equal(s[:-1], sched.sigmas[discrete_timesteps(1000, len(s) - 1, spacing)])
    assert torch.equal(sampler_sigmas("dpmpp-2m", sched, 9), sampler_sigmas("dpmpp-2m", sched, 9, "karras"))
    assert torch.equal(sampler_sigmas("heun", sched, 9), sampler_sigmas("heun", sched, 9, "karras"))
    assert torch.equal(sampler_sigmas("ddim", sched, 9), sampler_sigmas("ddim", sched, 9, "trailing"))


def test_discrete_spacings_give_n_distinct_decreasing_timesteps_for_every_n():
    """Regression: trailing via float arange returned n + 1 timesteps ending at t = -1 (the sigma of
    t = -1 is sigma_max, so a 61-step run jumped back to pure noise before its last step)."""
    for T in (1000, 100):
        for spacing in ("trailing", "leading", "uniform"):
            for n in range(1, T + 1):
                ts = discrete_timesteps(T, n, spacing)
                assert len(ts) == n and (ts.diff() < 0).all() and ts.min() >= 0 and ts.max() <= T - 1, (T, spacing, n)
                if spacing != "leading":
                    assert ts[0] == T - 1
    assert discrete_timesteps(1000, 61, "trailing")[-2:].tolist() == [32, 15]


@pytest.mark.parametrize("kwargs,needle", [
    ({"sampler": "ddpm", "spacing": "karras"}, "--spacing karras does not apply to --sampler ddpm"),
    ({"sampler": "euler", "spacing": "cosine"}, "unknown spacing 'cosine'"),
    ({"sampler": "lms"}, "unknown sampler 'lms'"),
    ({"sampler": "dpmpp-2m", "eta": 0.5}, "--eta applies to --sampler ddim only"),
    ({"sampler": "heun", "steps": 1001}, "--steps must be between 1 and 1000"),
    ({"sampler": "dpmpp-2m", "steps": 0}, "--steps must be between 1 and 1000"),
])
def test_refused_combinations_are_one_line_errors(kwargs, needle, loaded):
    with pytest.raises(DiffuseError, match=needle) as e:
        generate(loaded, n=1, **kwargs)
    assert "\n" not in str(e.value)


def test_cli_lists_the_registry_and_defaults_to_dpmpp_2m_20():
    assert cli.SAMPLER_NAMES == tuple(SAMPLERS)
    assert cli.SPACING_NAMES == SPACINGS
    args = cli.build_parser().parse_args(["sample", "run"])
    assert (args.sampler, args.steps, args.spacing) == (None, None, None)      # resolved per run, after loading
    vp, edm = SimpleNamespace(config=Config()), SimpleNamespace(config=Config())
    edm.config.diffusion.formulation = "edm"
    cli._sampling_defaults(args, vp)
    assert (args.sampler, args.steps) == ("dpmpp-2m", 20)
    args = cli.build_parser().parse_args(["sample", "run"])
    cli._sampling_defaults(args, edm)
    assert (args.sampler, args.steps) == ("heun", 35)
    args = cli.build_parser().parse_args(["sample", "run", "--sampler", "ddim"])
    cli._sampling_defaults(args, edm)
    assert (args.sampler, args.steps) == ("ddim", 20)
    for name in SAMPLERS:
        assert cli.build_parser().parse_args(["sample", "run", "--sampler", name]).sampler == name


def test_cli_rejects_an_unknown_sampler_in_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        cli.build_parser().parse_args(["sample", "run", "--sampler", "lms"])
    assert e.value.code == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "invalid choice: 'lms'" in err and "dpmpp-2m" in err
