"""One sampling request: which sampler, how many network evaluations, which noise levels, how much
fresh noise, guidance, x0 clipping and the seed. ``generate``, the training grids and FID,
``visualize``, ``serve`` and the CLI all describe a run with a ``SamplingSpec`` and refuse a bad one
with the same ``check``, so a rule (a range, a refused combination) is written once.

Two steps, in this order:
    spec.resolved(diffusion, conditional=..., default_guidance=...)   fills what the user left None
    spec.check(schedule, class_cond=..., conditional=...)             one-line SpecError per bad field

This module imports no torch at import time (the CLI's parsers use its names); ``resolved`` and
``check`` import the sampler registry when called.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from .config import opt
from .errors import DiffuseError

# Copies of samplers.ALL_SAMPLERS / samplers.SPACINGS / samplers.ETA_SAMPLERS in words, so that parsing
# flags does not import torch; tests/test_samplers.py checks that they agree.
SAMPLER_NAMES = ("ddpm", "ddim", "euler", "heun", "dpmpp-2m", "dpmpp-2m-sde", "consistency")
SPACING_NAMES = ("trailing", "leading", "uniform", "karras", "geometric")
ETA_HELP = ("sampler noise: ddim 0..1 (default 0 = DDIM, 1 = DDPM-like); "
            "dpmpp-2m-sde 0..10 (0 = ODE, 1 = reverse SDE, default 5)")
STEPS_WITHOUT_DEFAULT = 20          # --sampler given alone keeps 20 network evaluations


class SpecError(DiffuseError):
    """A refused sampling setting; ``field`` names it (sampler, steps, spacing, eta, guidance), so
    the HTTP API can point at the request field while the CLI prints the one line."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class SamplingSpec:
    """What a sampling run needs beyond the model and the image indices. None = the run's default
    (``resolved``). ``steps`` is the NFE budget per image (samplers.sampler_sigmas). Each field's
    help is its flag's in ``diffuse sample``, ``eval`` and ``visualize`` (cli.sampling_parent)."""
    sampler: str | None = opt(None, f"one of: {', '.join(SAMPLER_NAMES)} (default dpmpp-2m-sde; heun for edm runs)")
    steps: int | None = opt(None, "network evaluations per image (default 20; 35 for edm's heun); heun uses "
                                  "(steps+1)//2 intervals")
    # None: the sampler's own (samplers.SAMPLERS[name][2])
    spacing: str | None = opt(None, f"noise levels: {', '.join(SPACING_NAMES)} "
                                    "(default karras for euler/heun/dpmpp-*, trailing for ddpm/ddim, "
                                    "geometric for consistency)")
    eta: float | None = opt(None, ETA_HELP)     # None: the sampler's default, if it takes one (samplers.eta_of)
    guidance: float | None = opt(None, "classifier-free guidance w: out = (1+w) out_c - w out_u (needs --class; "
                                       "0 = plain conditional; default: the run's --sample-guidance)")
    clip_x0: bool = opt(True, "clamp predicted x0 to [-1, 1] at each step (default on)", flag="clip")
    seed: int = opt(0, "image i uses noise stream (seed, i)")
    sigma_max_cap: float | None = None  # karras only: samplers.sigmas_for
    levels: tuple[float, ...] | None = None   # float sigmas [N + 1] ending at 0: a gits run's (spacing "learned")

    def replace(self, **changes: Any) -> SamplingSpec:
        return dataclasses.replace(self, **changes)

    def resolved(self, run: Any = None, *, conditional: bool = False,
                 default_guidance: float = 0.0) -> SamplingSpec:
        """Every None filled: sampler and steps from ``objectives.default_sampling`` of ``run`` (a
        run's Config, or only its DiffusionConfig; None is vp): a distilled run's sampler at its NFE
        (on a gits run's searched levels, spacing "learned", for any sampler of one call per step at
        that NFE), heun 35 for edm, dpmpp-2m-sde 20 for vp (a sampler given alone keeps 20, or a
        distilled run's NFE), the sampler's spacing and eta, guidance ``default_guidance`` when ``conditional``
        (labels given) else 0. A value given is kept as it is, bad or not: ``check`` judges it."""
        from .config import Config, DiffusionConfig
        from .objectives import default_sampling
        from .samplers import ALL_SAMPLERS as SAMPLERS, eta_of, intervals_for

        d = run.distill if isinstance(run, Config) and run.distill.method else None
        sampler, steps = self.sampler, self.steps
        if sampler is None:
            if isinstance(run, Config):
                sampler, default_steps = default_sampling(run.diffusion, run.distill)
            else:
                sampler, default_steps = default_sampling(run or DiffusionConfig())
            steps = default_steps if steps is None else steps
        # a sampler named alone keeps 20 NFE, or a distilled run's own NFE
        steps = (d.nfe if d is not None else STEPS_WITHOUT_DEFAULT) if steps is None else steps
        spacing = self.spacing or (SAMPLERS[sampler][2] if sampler in SAMPLERS else None)
        eta = eta_of(sampler, None) if self.eta is None and sampler in SAMPLERS else self.eta
        guidance = self.guidance
        if guidance is None:
            guidance = default_guidance if conditional else 0.0
        levels = self.levels
        if (levels is None and d is not None and d.sigmas and self.spacing is None and steps == d.nfe
                and sampler in SAMPLERS and intervals_for(sampler, steps) == steps):
            levels, spacing = tuple(d.sigmas), "learned"      # a gits run's searched levels, for any one-call-per-step sampler
        return self.replace(sampler=sampler, steps=steps, spacing=spacing, eta=eta, guidance=float(guidance),
                            levels=levels)

    def check(self, schedule: Any, *, class_cond: bool = False, conditional: bool = False,
              prefix: str = "--", distilled: bool = False, distilled_guidance: float | None = None) -> SamplingSpec:
        """Raise a one-line SpecError for the first setting a model on ``schedule`` cannot run
        (a resolved spec; ``conditional``: labels given, ``class_cond``: the model takes them;
        ``distilled``: a consistency student, which only the consistency sampler runs, and which
        only it runs; ``distilled_guidance``: the guidance w a student has in its weights, which no
        other guidance may add to); ``prefix`` names the flags (``--fid-`` for the config's FID sampler).
        Returns self."""
        self.check_sampler(schedule.timesteps, prefix)
        if distilled != (self.sampler == "consistency"):
            raise SpecError("sampler", f"a distilled run samples with {prefix}sampler consistency (its network is a "
                                       f"consistency function, not a denoiser)" if distilled else
                            f"{prefix}sampler consistency needs a consistency-tuned run (diffuse distill --method ect)")
        self.check_guidance(class_cond=class_cond, conditional=conditional, distilled_guidance=distilled_guidance)
        if self.eta is not None:
            from .samplers import check_eta
            try:
                check_eta(self.sampler, self.eta)
            except ValueError as e:
                raise SpecError("eta", str(e)) from None
        self.sigmas(schedule)
        return self

    def check_sampler(self, timesteps: int, prefix: str = "--") -> None:
        """The sampler is registered and 1 <= steps <= T: cheap, before expensive work."""
        from .samplers import ALL_SAMPLERS as SAMPLERS
        if self.sampler not in SAMPLERS:
            # a flag: "unknown sampler 'x'"; a config field (--fid-sampler): name the field
            what = f"unknown sampler {self.sampler!r}" if prefix == "--" else \
                f"{prefix}sampler {self.sampler!r} is not a sampler"
            raise SpecError("sampler", f"{what}; choose one of {', '.join(SAMPLERS)}")
        if not 1 <= self.steps <= timesteps:
            raise SpecError("steps", f"{prefix}steps must be between 1 and {timesteps} for this model, "
                                     f"got {self.steps}")

    def check_guidance(self, *, class_cond: bool, conditional: bool, distilled_guidance: float | None = None) -> None:
        """Guidance is finite and >= 0, nonzero only with labels (``conditional``) and never on a
        student with guidance distilled into it (``distilled_guidance``)."""
        g = self.guidance or 0.0
        if not (math.isfinite(g) and g >= 0):
            raise SpecError("guidance", f"--guidance must be a finite number >= 0, got {g}")
        if g and distilled_guidance is not None:
            raise SpecError("guidance", f"this student has guidance {distilled_guidance:g} distilled into it; "
                                        f"sample it without --guidance")
        if g and not conditional:
            raise SpecError("guidance", "--guidance needs --class (a class, a list, or all)" if class_cond
                            else "--guidance needs a class-conditional model (train with --class-cond)")

    def sigmas(self, schedule: Any):
        """The float64 [N + 1] sigma array this spec walks on ``schedule`` (samplers.sampler_sigmas);
        refused spacings and step counts are SpecErrors."""
        from .samplers import sampler_sigmas
        if self.levels is not None:
            import torch
            return torch.tensor(self.levels, dtype=torch.float64)
        try:
            return sampler_sigmas(self.sampler, schedule, self.steps, self.spacing, self.sigma_max_cap)
        except ValueError as e:
            raise SpecError("spacing", str(e)) from None

    def sampler_options(self) -> dict[str, Any]:
        """Keyword options for samplers.run_sampler: eta for the samplers that take one."""
        from .samplers import ETA_SAMPLERS
        return {"eta": self.eta} if self.eta is not None and self.sampler in ETA_SAMPLERS else {}

