"""diffusers as a test-only oracle for every sampler: the same tiny UNet, schedule, start noise and
sigmas must give the same images.

How diffusers is configured to mean what diffuse means (each line is a convention difference):

- Schedules: beta_schedule "linear" (beta 1e-4 .. 0.02, given explicitly: Heun's defaults are Stable
  Diffusion's) or "squaredcos_cap_v2" (= our "cosine"); prediction_type "epsilon"; steps_offset 0.
- clip_x0 = clamping x0_hat to [-1, 1]: DDPM/DDIM/Heun ``clip_sample`` (range 1); DPM-Solver
  ``thresholding`` with ``sample_max_value=1``, which clamps the per-image quantile s to [1, 1] and so
  is plain clamping. Euler has no clipping, so it is compared with clip off only.
- DDIM: diffuse recomputes eps from the clipped x0 (``use_clipped_model_output=True``);
  ``set_alpha_to_one=True`` so the last step lands on sigma = 0. diffusers' DDIM steps to t - T//n
  rather than to the next grid point, so only grids where those agree are compared (trailing and
  leading with n dividing T); its "linspace" grid is not self-consistent and is skipped.
- DDPM: ``variance_type="fixed_small"`` (posterior variance); diffusers draws its noise in the
  sample's dtype, diffuse always in float32 per image, so the float64 run patches diffusers'
  ``randn_tensor`` to draw float32 from the same per-image generators.
- DPM-Solver++(2M): ``algorithm_type="dpmsolver++"`` (or "sde-dpmsolver++", which is diffuse's
  dpmpp-2m-sde at eta 1, not its default 5), ``solver_order=2``,
  ``solver_type="midpoint"``, ``lower_order_final=True``, ``euler_at_final=False``,
  ``final_sigmas_type="zero"``.
- Spacing names: our "uniform" is diffusers' DDPM/DDIM "linspace" (rounded integer timesteps).
  Euler/Heun "linspace" keeps fractional timesteps and DPM's "linspace"/"leading" use n + 1 grid
  points, so for those our integer timesteps are passed as custom ``timesteps``. "karras" is
  ``use_karras_sigmas=True`` with "linspace", whose sigma range is the schedule's full
  [sigma_min, sigma_max]; ours is capped at sigma 80 by default (samplers.KARRAS_SIGMA_MAX_CAP, a
  deliberate deviation, docs/objectives.md), so the comparisons here pass sigma_max_cap=inf.
- Start: diffuse starts from z sqrt(1 + sigma_0^2) in the VE view (x_T = z in the VP view).
  DDPM/DDIM/DPM work in the VP view and start from z; Euler/Heun work in the VE view and are given
  our start (their ``init_noise_sigma`` is sigma_max, not sqrt(1 + sigma_max^2), for trailing/linspace).
- Network time input: diffuse feeds t(sigma), continuous (log-linear interpolation). For discrete
  spacings that is the integer timestep diffusers uses (checked below); for karras sigmas diffusers'
  DPM-Solver rounds (linear) or truncates (cosine) it to an integer, so the image comparison feeds
  both sides our t and compares the update rules alone.

Precision: diffusers builds its schedule in float32, where 1 - abar_0 = 1e-4 keeps ~3 digits, so its
sigmas agree with ours to ~3e-4 relative near sigma_min. The image comparison therefore runs in float64
with our float64 schedule arrays put into the diffusers scheduler after checking they agree, and diffuse
in float64 (net and sample). DDPM, DDIM and Heun then agree to ~1e-8; Euler and DPM-Solver cast the
sample to float32 inside ``step``, so they agree to float32 rounding (~1e-6 relative). A second test runs
both natively in float32 with diffusers' own float32 schedule.
"""

from __future__ import annotations

import math

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
# diffusers 0.42 with numpy 2 warns on every set_timesteps; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler,  # noqa: E402
                       EulerDiscreteScheduler, HeunDiscreteScheduler)

from diffuse.config import ModelConfig  # noqa: E402
from diffuse.objectives import VP, make_denoiser  # noqa: E402
from diffuse.diffusion import Schedule  # noqa: E402
from diffuse.models import UNet  # noqa: E402
from diffuse.rng import ImageNoise, generator  # noqa: E402
from diffuse.samplers import SAMPLERS, discrete_timesteps, intervals_for, run_sampler, sampler_sigmas  # noqa: E402

T = 1000
B, C, H = 2, 2, 8                     # images per batch, channels, height = width
SEED = 3
STEPS = 10                            # divides T, as diffusers' DDIM needs
BETA_SCHEDULE = {"linear": "linear", "cosine": "squaredcos_cap_v2"}
# diffusers' step() keeps float64 samples in float64 for these, and casts to float32 for the others.
FLOAT64_IN_DIFFUSERS = {"ddpm", "ddim", "heun"}
SCHEDULERS = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler, "euler": EulerDiscreteScheduler,
              "heun": HeunDiscreteScheduler, "dpmpp-2m": DPMSolverMultistepScheduler,
              "dpmpp-2m-sde": DPMSolverMultistepScheduler}


@pytest.fixture(autouse=True)
def _one_thread():
    """These nets are tiny (8x8 images): one thread is several times faster than two, which spin
    against each other when the machine is busy (measured: 20 forwards 0.05 s vs 0.4-1.3 s)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_net(dtype: torch.dtype) -> UNet:
    """A tiny UNet with random weights everywhere, including the layers that start at zero (whose
    zeros would make eps = 0 and hide every eps-dependent term)."""
    cfg = ModelConfig(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), num_groups=4,
                      head_channels=8, image_size=H, in_channels=C)
    torch.manual_seed(0)
    net = UNet(cfg)
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.normal_(0, 0.1)
    return net.eval().requires_grad_(False).to(dtype)


@pytest.fixture(scope="module")
def nets():
    return {torch.float32: tiny_net(torch.float32), torch.float64: tiny_net(torch.float64)}


@pytest.fixture(scope="module")
def schedules():
    return {name: Schedule(name, T) for name in BETA_SCHEDULE}


def diffusers_scheduler(sampler: str, schedule: str, spacing: str, n: int, clip: bool):
    """The diffusers scheduler configured as diffuse's ``sampler`` with n sigma intervals."""
    kw = dict(num_train_timesteps=T, beta_start=1e-4, beta_end=0.02, beta_schedule=BETA_SCHEDULE[schedule],
              prediction_type="epsilon", steps_offset=0)
    if sampler == "ddpm":
        kw.update(variance_type="fixed_small", clip_sample=clip, clip_sample_range=1.0, thresholding=False)
    elif sampler == "ddim":
        kw.update(set_alpha_to_one=True, clip_sample=clip, clip_sample_range=1.0, thresholding=False)
    elif sampler == "heun":
        kw.update(clip_sample=clip, clip_sample_range=1.0)
    elif sampler == "euler":
        assert not clip, "diffusers' Euler cannot clip x0"
    else:
        kw.update(algorithm_type="dpmsolver++" if sampler == "dpmpp-2m" else "sde-dpmsolver++", solver_order=2,
                  solver_type="midpoint", lower_order_final=True, euler_at_final=False, final_sigmas_type="zero",
                  thresholding=clip, sample_max_value=1.0)
    custom = (sampler in ("euler", "heun") and spacing == "uniform") or \
             (sampler.startswith("dpmpp") and spacing in ("uniform", "leading"))
    if spacing == "karras":
        kw.update(use_karras_sigmas=True, timestep_spacing="linspace")
    elif not custom:
        kw.update(timestep_spacing="linspace" if spacing == "uniform" else spacing)
    d = SCHEDULERS[sampler](**kw)
    if custom:
        d.set_timesteps(timesteps=discrete_timesteps(T, n, spacing).tolist())
    else:
        d.set_timesteps(n)
    if hasattr(d, "set_begin_index"):
        d.set_begin_index(0)
    return d


def diffusers_sigmas(d, sampler: str) -> torch.Tensor:
    """The sigma array (float64, ends at 0) a configured diffusers scheduler walks."""
    if sampler in ("ddpm", "ddim"):
        abar = d.alphas_cumprod.double()[d.timesteps]
        return torch.cat([((1 - abar) / abar).sqrt(), torch.zeros(1, dtype=torch.float64)])
    s = d.sigmas.double()
    if sampler == "heun":                      # [s0, s1, s1, ..., s_{k-1}, s_{k-1}, 0]: one evaluation per entry
        s = torch.cat([s[:1], s[1:-1:2], s[-1:]])
    return s


def put_float64_schedule(d, sampler: str, schedule: Schedule, sigmas: torch.Tensor) -> None:
    """Replace the diffusers scheduler's float32 arrays by ours in float64 (after checking they agree)."""
    if sampler in ("ddpm", "ddim"):
        d.alphas_cumprod = schedule.alphas_cumprod.clone()
        d.final_alpha_cumprod = d.one = torch.tensor(1.0, dtype=torch.float64)
    elif sampler == "heun":
        d.sigmas = torch.cat([sigmas[:1], sigmas[1:-1].repeat_interleave(2), sigmas[-1:]])
    else:
        d.sigmas = sigmas.clone()


def run_diffusers(d, sampler: str, net: UNet, z: torch.Tensor, sigmas: torch.Tensor, model_t: torch.Tensor,
                  dtype: torch.dtype) -> tuple[torch.Tensor, int]:
    """diffusers' own sampling loop: returns the image and the number of network calls."""
    vp_view = sampler in ("ddpm", "ddim") or sampler.startswith("dpmpp")
    z = z.to(dtype)
    x = z if vp_view else z * math.sqrt(1 + float(sigmas[0]) ** 2)
    if sampler == "heun":                      # one network time per evaluation, as d.timesteps
        model_t = torch.cat([model_t[:1], model_t[1:].repeat_interleave(2)])
    # The sampler noise after z, image i from its own stream (seed, i), as diffuse draws it.
    gens = [generator(SEED, "image", i) for i in range(B)]
    for g in gens:
        torch.randn(C, H, H, generator=g)
    nfe = 0
    for i, t in enumerate(d.timesteps):
        eps = net(d.scale_model_input(x, t), model_t[i].float().expand(B)).to(dtype)
        nfe += 1
        kw = {}
        if sampler == "ddpm":
            kw["generator"] = gens
        elif sampler == "ddim":
            kw.update(eta=0.0, use_clipped_model_output=True)
        elif sampler == "dpmpp-2m-sde":        # diffuse draws none for the last step, where its weight is 0
            last = i == len(d.timesteps) - 1
            kw["variance_noise"] = torch.zeros(B, C, H, H) if last else \
                torch.stack([torch.randn(C, H, H, generator=g) for g in gens])
        x = d.step(eps, t, x, **kw).prev_sample
    return x, nfe


def run_diffuse(sampler: str, net: UNet, schedule: Schedule, steps: int, spacing: str, clip: bool,
                dtype: torch.dtype) -> tuple[torch.Tensor, int, torch.Tensor, torch.Tensor]:
    """diffuse's sampler: returns the image, the counted NFE, the start noise z and the sigmas."""
    sigmas = sampler_sigmas(sampler, schedule, steps, spacing, sigma_max_cap=math.inf)   # diffusers' full range
    noise = ImageNoise(SEED, range(B))
    z = noise.randn(C, H, H)
    den = make_denoiser(net, VP(schedule), clip_x0=clip)
    # diffusers' "sde-dpmsolver++" is the reverse SDE itself: eta 1 (diffuse's default is 5, a deliberate deviation)
    options = {"eta": 1.0} if sampler == "dpmpp-2m-sde" else {}
    x = run_sampler(sampler, den, z.to(dtype), sigmas, noise=noise if SAMPLERS[sampler][1] else None, **options)
    return x, den.nfe, z, sigmas


def _cases():
    out = []
    for sampler in SAMPLERS:
        spacings = {"ddpm": ("trailing", "leading", "uniform"), "ddim": ("trailing", "leading")}.get(
            sampler, ("trailing", "leading", "uniform", "karras"))
        for spacing in spacings:
            for clip in ((False,) if sampler == "euler" else (False, True)):
                for schedule in BETA_SCHEDULE:
                    out.append((sampler, spacing, clip, schedule))
    return out


# ----------------------------------------------------------------------------------------------
# The grids

SIGMA_CASES = [(sampler, spacing) for sampler in ("ddpm", "ddim", "euler", "heun", "dpmpp-2m")
               for spacing in ("trailing", "leading", "uniform", "karras")
               # no counterpart in diffusers: see the module docstring
               if not (sampler in ("ddpm", "ddim") and spacing == "karras")
               and not (sampler in ("euler", "heun") and spacing == "uniform")
               and not (sampler == "dpmpp-2m" and spacing in ("leading", "uniform"))]


@pytest.mark.parametrize("schedule_name", list(BETA_SCHEDULE))
@pytest.mark.parametrize("sampler,spacing", SIGMA_CASES)
def test_sigma_arrays_equal_diffusers(sampler, spacing, schedule_name, schedules):
    schedule = schedules[schedule_name]
    for steps in (3, 10, 25, 50):
        ours = sampler_sigmas(sampler, schedule, steps, spacing, sigma_max_cap=math.inf)
        d = diffusers_scheduler(sampler, schedule_name, spacing, intervals_for(sampler, steps), clip=False)
        theirs = diffusers_sigmas(d, sampler)
        assert ours.shape == theirs.shape, (steps, ours.shape, theirs.shape)
        assert ours[-1] == 0 and theirs[-1] == 0
        # float32 schedule in diffusers: ~3e-4 relative at sigma_min (see the module docstring)
        assert torch.allclose(ours[:-1], theirs[:-1], rtol=5e-4, atol=0), (steps, ours, theirs)
        ours_t = schedule.sigma_to_t(ours[:-1])
        if sampler == "heun":
            their_t = torch.cat([d.timesteps[:1], d.timesteps[1::2]]).double()
        else:
            their_t = d.timesteps.double()
        if spacing != "karras":                    # the very integers diffusers feeds its network
            assert torch.equal(ours_t, their_t), (steps, ours_t, their_t)
        elif sampler in ("euler", "heun"):
            # continuous, as ours, from its float32 sigmas; compared as noise levels, since where sigma
            # varies slowly with t a 1e-5 relative sigma difference moves t by several 1e-2
            assert torch.allclose(schedule.t_to_sigma(their_t), ours[:-1], rtol=5e-4, atol=0), (steps, ours_t, their_t)


def test_trailing_spacing_matches_diffusers_except_its_float_arange_artefacts(schedules):
    """The one place our timesteps differ from diffusers' on purpose (see discrete_timesteps)."""
    schedule = schedules["linear"]
    for steps in (48, 61):
        d = diffusers_scheduler("ddim", "linear", "trailing", steps, clip=False)
        ours = torch.cat([discrete_timesteps(T, steps, "trailing"), torch.tensor([-1])])
        if steps == 61:                             # 62 timesteps ending at -1: diffusers' arange artefact
            assert len(d.timesteps) == 62 and d.timesteps[-1] == -1
            assert torch.equal(d.timesteps, ours)
        else:                                       # a tie at 937.5 broken by rounding error
            diff = (d.timesteps != ours[:-1]).nonzero().flatten().tolist()
            assert diff and all(ours[i] - d.timesteps[i] == 1 for i in diff)
        assert len(sampler_sigmas("ddim", schedule, steps, "trailing")) == steps + 1


# ----------------------------------------------------------------------------------------------
# The images

@pytest.fixture
def ddpm_noise_in_float32(monkeypatch):
    """diffusers' DDPM draws its noise in the sample's dtype; diffuse draws float32 whatever the dtype."""
    import diffusers.schedulers.scheduling_ddpm as ddpm_module
    original = ddpm_module.randn_tensor

    def randn_float32(shape, generator=None, device=None, dtype=None, layout=None):
        return original(shape, generator=generator, device=device, dtype=torch.float32).to(dtype)

    monkeypatch.setattr(ddpm_module, "randn_tensor", randn_float32)


@pytest.mark.parametrize("sampler,spacing,clip,schedule_name", _cases())
def test_images_equal_diffusers_float64(sampler, spacing, clip, schedule_name, nets, schedules,
                                        ddpm_noise_in_float32):
    schedule, net = schedules[schedule_name], nets[torch.float64]
    ours, nfe, z, sigmas = run_diffuse(sampler, net, schedule, STEPS, spacing, clip, torch.float64)
    d = diffusers_scheduler(sampler, schedule_name, spacing, intervals_for(sampler, STEPS), clip)
    assert torch.allclose(diffusers_sigmas(d, sampler), sigmas, rtol=5e-4, atol=0)
    put_float64_schedule(d, sampler, schedule, sigmas)
    theirs, their_nfe = run_diffusers(d, sampler, net, z, sigmas, schedule.sigma_to_t(sigmas[:-1]), torch.float64)
    assert nfe == their_nfe == SAMPLERS[sampler][3](STEPS)
    scale = max(1.0, theirs.abs().max().item())     # unclipped images of a random net reach ~1e5
    tol = 1e-7 if sampler in FLOAT64_IN_DIFFUSERS else 2e-5
    err = (ours - theirs).abs().max().item()
    assert err <= tol * scale, f"max |diffuse - diffusers| = {err:.3g} (scale {scale:.3g})"
    assert theirs.std() > 0.1                        # a real image, not a constant both sides agree on


NATIVE_CASES = [(sampler, schedule) for sampler in ("ddpm", "ddim", "heun", "dpmpp-2m", "dpmpp-2m-sde")
                for schedule in BETA_SCHEDULE
                # diffusers' float32 Heun loses ~2.0 on the cosine schedule's first step from sigma ~2e4:
                # its update subtracts numbers of size sigma (ours does not; see test_float32_is_accurate)
                if not (sampler == "heun" and schedule == "cosine")]


@pytest.mark.parametrize("sampler,schedule_name", NATIVE_CASES)
def test_images_equal_diffusers_float32_native(sampler, schedule_name, nets, schedules):
    """Both libraries as shipped: float32, diffusers' own float32 schedule, clip on, trailing."""
    schedule, net = schedules[schedule_name], nets[torch.float32]
    ours, nfe, z, sigmas = run_diffuse(sampler, net, schedule, STEPS, "trailing", True, torch.float32)
    d = diffusers_scheduler(sampler, schedule_name, "trailing", intervals_for(sampler, STEPS), clip=True)
    theirs, _ = run_diffusers(d, sampler, net, z, sigmas, schedule.sigma_to_t(sigmas[:-1]), torch.float32)
    err = (ours - theirs).abs().max().item()
    assert err < 1e-4, f"max |diffuse - diffusers| = {err:.3g}"


@pytest.mark.parametrize("schedule_name", list(BETA_SCHEDULE))
@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_float32_is_accurate(sampler, schedule_name, nets, schedules):
    """Each sampler's default grid in float32 against the same sampler in float64: the huge first
    sigma of the cosine schedule (~2e4) must not cost accuracy."""
    schedule = schedules[schedule_name]
    spacing = SAMPLERS[sampler][2]
    a, *_ = run_diffuse(sampler, nets[torch.float32], schedule, STEPS, spacing, True, torch.float32)
    b, *_ = run_diffuse(sampler, nets[torch.float64], schedule, STEPS, spacing, True, torch.float64)
    assert (a.double() - b).abs().max().item() < 1e-3


def test_the_tolerance_tells_solvers_apart(nets, schedules):
    """Negative control: DPM-Solver++ of order 1 (= DDIM) is not accepted as our 2M."""
    schedule, net = schedules["linear"], nets[torch.float64]
    ours, _, z, sigmas = run_diffuse("dpmpp-2m", net, schedule, STEPS, "trailing", True, torch.float64)
    d = diffusers_scheduler("dpmpp-2m", "linear", "trailing", STEPS, clip=True)
    d.register_to_config(solver_order=1)
    d.set_timesteps(STEPS)
    d.set_begin_index(0)
    put_float64_schedule(d, "dpmpp-2m", schedule, sigmas)
    first_order, _ = run_diffusers(d, "dpmpp-2m", net, z, sigmas, schedule.sigma_to_t(sigmas[:-1]), torch.float64)
    assert (ours - first_order).abs().max().item() > 1e3 * 2e-5
