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
from diffuse.samplers import (ALL_SAMPLERS, KARRAS_SIGMA_MAX_CAP, SAMPLERS, SPACINGS, STUDENT_SAMPLERS,
                              discrete_timesteps, intervals_for, sampler_sigmas)

from .conftest import tiny_loaded


@pytest.fixture(autouse=True)
def _one_thread():
    """These nets are tiny (8x8 images): one thread is several times faster than two, which spin
    against each other when the machine is busy (measured: 20 forwards 0.05 s vs 0.4-1.3 s)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def loaded() -> Loaded:
    return tiny_loaded()


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
            if (name == "ddpm" and spacing == "karras") or spacing == "geometric":
                with pytest.raises(ValueError, match="does not apply"):
                    sampler_sigmas(name, sched, 9, spacing)
                continue
            s = sampler_sigmas(name, sched, 9, spacing)
            assert s.dtype == torch.float64 and s[-1] == 0 and (s[:-1].diff() < 0).all()
            assert len(s) == intervals_for(name, 9) + 1
            if spacing == "karras":
                top = min(sched.sigma_max, KARRAS_SIGMA_MAX_CAP or sched.sigma_max)
                assert s[0].item() == pytest.approx(top) and s[-2].item() == pytest.approx(sched.sigma_min)
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
    ({"sampler": "dpmpp-2m", "eta": 0.5}, "--eta applies to --sampler ddim or dpmpp-2m-sde only"),
    ({"sampler": "ddim", "eta": 1.5}, r"--eta for ddim must be in \[0, 1\]"),
    ({"sampler": "dpmpp-2m-sde", "eta": float("nan")}, r"--eta for dpmpp-2m-sde must be in \[0, 10\]"),
    ({"sampler": "dpmpp-2m-sde", "eta": -0.5}, r"--eta for dpmpp-2m-sde must be in \[0, 10\]"),
    ({"sampler": "heun", "steps": 1001}, "--steps must be between 1 and 1000"),
    ({"sampler": "dpmpp-2m", "steps": 0}, "--steps must be between 1 and 1000"),
])
def test_refused_combinations_are_one_line_errors(kwargs, needle, loaded):
    with pytest.raises(DiffuseError, match=needle) as e:
        generate(loaded, n=1, **kwargs)
    assert "\n" not in str(e.value)


def test_cli_lists_the_registry_and_defaults_to_dpmpp_2m_sde_20():
    assert cli.SAMPLER_NAMES == tuple(ALL_SAMPLERS) == (*SAMPLERS, *STUDENT_SAMPLERS)
    assert cli.SPACING_NAMES == SPACINGS
    args = cli.build_parser().parse_args(["sample", "run"])
    assert (args.sampler, args.steps, args.spacing) == (None, None, None)      # resolved per run, after loading
    vp, edm = SimpleNamespace(config=Config()), SimpleNamespace(config=Config())
    edm.config.diffusion.formulation = "edm"
    cli._sampling_defaults(args, vp)
    assert (args.sampler, args.steps) == ("dpmpp-2m-sde", 20)
    args = cli.build_parser().parse_args(["sample", "run"])
    cli._sampling_defaults(args, edm)
    assert (args.sampler, args.steps) == ("heun", 35)
    args = cli.build_parser().parse_args(["sample", "run", "--sampler", "ddim"])
    cli._sampling_defaults(args, edm)
    assert (args.sampler, args.steps) == ("ddim", 20)
    for name in SAMPLERS:
        assert cli.build_parser().parse_args(["sample", "run", "--sampler", name]).sampler == name
    # the torch-free CLI states the eta defaults and ranges as literals: they must be the samplers'
    from diffuse.samplers import ETA_SAMPLERS
    commands = cli.build_parser()._subparsers._group_actions[0].choices
    for command in ("sample", "eval"):
        (eta,) = [a for a in commands[command]._actions if "--eta" in a.option_strings]
        for name, (default, top, _) in ETA_SAMPLERS.items():
            assert f"{name} 0..{top:g}" in eta.help and f"default {default:g}" in eta.help.split(name)[1], eta.help


def test_cli_rejects_an_unknown_sampler_in_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        cli.build_parser().parse_args(["sample", "run", "--sampler", "lms"])
    assert e.value.code == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "invalid choice: 'lms'" in err and "dpmpp-2m" in err


def test_karras_sigma_max_cap():
    """Karras spacing starts at min(schedule sigma_max, cap): the default cap (KARRAS_SIGMA_MAX_CAP, from
    the measurement in docs/objectives.md), an explicit one, or none (inf: the schedule's own, ~2e4 on cosine)."""
    import math

    from diffuse import samplers as S
    cosine = Schedule("cosine", 1000)
    full = sampler_sigmas("dpmpp-2m", cosine, 20, "karras", sigma_max_cap=math.inf)
    assert full[0].item() == pytest.approx(cosine.sigma_max) and cosine.sigma_max > 1e4
    capped = sampler_sigmas("dpmpp-2m", cosine, 20, "karras", sigma_max_cap=80.0)
    assert capped[0].item() == pytest.approx(80.0) and capped[-2].item() == pytest.approx(cosine.sigma_min)
    torch.testing.assert_close(capped[:-1], S.karras_sigmas(cosine.sigma_min, 80.0, 20))
    default = sampler_sigmas("dpmpp-2m", cosine, 20)
    want = cosine.sigma_max if S.KARRAS_SIGMA_MAX_CAP is None else min(cosine.sigma_max, S.KARRAS_SIGMA_MAX_CAP)
    assert default[0].item() == pytest.approx(want)
    # a cap above the schedule's range changes nothing; discrete spacings ignore it
    assert torch.equal(sampler_sigmas("dpmpp-2m", Schedule("linear", 1000), 9, "karras", sigma_max_cap=1e9),
                       sampler_sigmas("dpmpp-2m", Schedule("linear", 1000), 9, "karras", sigma_max_cap=math.inf))
    assert torch.equal(sampler_sigmas("ddim", cosine, 9, sigma_max_cap=80.0), sampler_sigmas("ddim", cosine, 9))
