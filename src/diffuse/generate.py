"""Generate images from a trained model: load the EMA weights, build the denoiser, run a sampler.

Image i always starts from (and draws its sampler noise from) its own stream seeded by
(seed, i), so the first k images are identical whatever --n and --batch-size are.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from . import checkpoint as ckpt_io
from .config import Config, validate, validate_model_config
from .denoiser import Denoiser
from .diffusion import Schedule
from .errors import DiffuseError
from .images import to_uint8, upscale
from .models import UNet
from .objectives import DEFAULT_VP_SAMPLER, VP, Formulation, formulation_for, make_denoiser
from .rng import ImageNoise, to_device
from .samplers import ALL_SAMPLERS, run_sampler
from .sampling import SamplingSpec


MAX_IMAGES = 10_000_000          # one call's --n: beyond this a typo, not a plan


@dataclass
class Loaded:
    net: UNet                       # EMA weights, eval mode, on device
    config: Config
    header: dict[str, Any]          # format, step, class_names, ...
    schedule: Schedule              # the noise levels samplers walk (formulation.schedule)
    source: Path
    formulation: Formulation | None = None   # None: vp / eps / uniform on ``schedule``

    def __post_init__(self):
        if self.formulation is None:
            self.formulation = VP(self.schedule)

    @property
    def class_names(self) -> list[str] | None:
        names = self.header.get("class_names")
        if names:
            return list(names)
        k = self.config.model.num_classes
        return [str(i) for i in range(k)] if self.config.model.class_cond and k else None


def load(path: str | Path, device: torch.device, weights: str = "ema") -> Loaded:
    """Load a run dir / checkpoint dir / standalone .safetensors for sampling."""
    src = ckpt_io.resolve(path)
    header = ckpt_io.read_header(src)
    cfg = Config.from_dict(header["config"])
    # A hand-edited or foreign config must fail here in one line, not deep inside the model.
    validate(cfg)
    validate_model_config(cfg.model, str(src))
    net = UNet(cfg.model)
    file = src / f"{weights}.safetensors" if src.is_dir() else src
    ckpt_io.load_weights_into(net, ckpt_io.read_tensors(file), src)
    net.to(device).eval().requires_grad_(False)
    try:
        formulation = formulation_for(cfg.diffusion)      # no formulation recorded: vp / eps / uniform
    except ValueError as e:
        raise DiffuseError(f"{src}: {e}") from None
    return Loaded(net, cfg, header, formulation.schedule, src, formulation)


def parse_class(spec: str | None, loaded: Loaded) -> list[int] | str | None:
    """--class K | NAME | all -> a class index, 'all', or None (unconditional)."""
    if spec is None:
        return None
    names = loaded.class_names
    if not loaded.config.model.class_cond or not names:
        raise DiffuseError(f"--class given, but {loaded.source} is an unconditional model (train with --class-cond)")
    if spec == "all":
        return "all"
    out = []
    for part in spec.split(","):
        if part in names:
            out.append(names.index(part))
        elif part.lstrip("-").isdigit():
            k = int(part)
            if not 0 <= k < len(names):
                raise DiffuseError(f"--class {k} is out of range: this model has classes 0..{len(names) - 1}")
            out.append(k)
        else:
            raise DiffuseError(f"unknown class {part!r}; this model's classes are: {', '.join(names)}")
    return out


def cycle_labels(classes: list[int] | range, count: int) -> Tensor:
    """Labels [count] long: image i gets classes[i mod len(classes)], so every class asked for gets
    a share within one of any other (class-balanced FID and accuracy sets, --class lists)."""
    return torch.as_tensor(list(classes), dtype=torch.long)[torch.arange(count) % len(classes)]


def class_labels(loaded: Loaded, spec: str | None, count: int) -> Tensor | None:
    """--class ``spec`` (``parse_class``) as labels [count]: None (unconditional), or image i gets
    the i-th class of the cycle ('all': every class), as eval, FID and the visualize views use it."""
    cls = parse_class(spec, loaded)
    if cls is None:
        return None
    return cycle_labels(range(len(loaded.class_names)) if cls == "all" else cls, count)


def class_rows(loaded: Loaded, spec: str | None, n: int | None) -> tuple[Tensor, int] | None:
    """``diffuse sample --class all``: one grid row per class of ``n // classes`` images (at least 1;
    8 when ``n`` is None), as (labels [classes * per], per); None for any other --class ``spec``."""
    if parse_class(spec, loaded) != "all":
        return None
    per = max(1, n // len(loaded.class_names)) if n is not None else 8
    return torch.arange(len(loaded.class_names)).repeat_interleave(per), per


def labels_and_guidance(loaded: Loaded, spec: str | None, guidance: float | None,
                        count: int) -> tuple[Tensor | None, float]:
    """--class ``spec`` as labels [count] (``class_labels``) and the guidance w they sample with:
    ``guidance``, or when None the run's --sample-guidance if labels are given, else 0
    (SamplingSpec.resolved); a bad one is a one-line SpecError (SamplingSpec.check_guidance)."""
    labels, cfg = class_labels(loaded, spec, count), loaded.config
    settled = SamplingSpec(guidance=guidance).resolved(conditional=labels is not None,
                                                       default_guidance=cfg.train.sample_guidance)
    settled.check_guidance(class_cond=cfg.model.class_cond, conditional=labels is not None,
                           distilled_guidance=cfg.distill.guidance)
    return labels, settled.guidance


def nfe_bar(spec: SamplingSpec, images: int, batch_size: int, desc: str, quiet: bool, times: int = 1):
    """A tqdm bar over the network evaluations of ``images`` sampled in batches of ``batch_size``,
    ``times`` over (stderr; hidden when ``quiet`` or stderr is not a terminal). ``spec`` is resolved."""
    import sys

    from tqdm import tqdm
    total = ALL_SAMPLERS[spec.sampler][3](spec.steps) * -(-images // batch_size) * times
    return tqdm(total=total, unit="nfe", desc=desc, file=sys.stderr, disable=quiet or not sys.stderr.isatty())


def open_model(run: str | Path | None, device_flag: str = "auto", precision: str = "auto"):
    """(device, the loaded run or None, autocast dtype) for sampling commands. Under torchrun the
    device is this rank's, after joining the process group; the precision follows
    device.sampling_precision (--precision auto: the run's training precision on CUDA, the measured
    rule on the CPU) and every rank agrees on it, so all shards sample alike."""
    from . import distributed as dist
    from .device import configure, pick_device, prepare_for_inference, sampling_precision

    device = dist.init(device_flag) or pick_device(device_flag)
    configure(device)
    loaded = load(run, device) if run else None
    choice = sampling_precision(precision, device, loaded.config.train.precision if loaded else None)
    amp = dist.agree_precision(choice, precision).dtype
    if loaded is not None:
        prepare_for_inference(loaded.net, device, amp)
    return device, loaded, amp


def settle(loaded: Loaded, spec: SamplingSpec, conditional: bool) -> SamplingSpec:
    """``spec`` with the run's defaults filled in (its formulation's sampler, its guidance when
    ``conditional``: labels given) and checked against this model: a one-line SpecError otherwise."""
    cfg = loaded.config
    spec = spec.resolved(cfg, conditional=conditional, default_guidance=cfg.train.sample_guidance)
    return spec.check(loaded.schedule, class_cond=cfg.model.class_cond, conditional=conditional,
                      distilled=cfg.distill.consistency, distilled_guidance=cfg.distill.guidance)


@torch.no_grad()
def sample_batch(loaded: Loaded, sampler: str, sigmas: Tensor, noise, *, labels: Tensor | None = None,
                 guidance: float = 0.0, clip_x0: bool = True, amp: torch.dtype | None = None,
                 callback=None, levels: dict | None = None, **options) -> tuple[Tensor, Denoiser]:
    """One batch: start from ``noise.randn`` (any object with randn/randn_like, e.g. ImageNoise),
    run ``sampler`` over ``sigmas``. labels: [B] long or None (the null class). Returns (x float
    [B, C, H, W], the denoiser, whose ``nfe`` counts the network calls)."""
    m = loaded.config.model
    device = next(loaded.net.parameters()).device
    z = noise.randn(m.in_channels, m.image_size, m.image_size)
    y = to_device(labels, device) if labels is not None else None
    den = make_denoiser(loaded.net, loaded.formulation, labels=y, guidance=guidance,
                        null_label=m.num_classes if m.class_cond else None, clip_x0=clip_x0, autocast_dtype=amp,
                        levels=levels)
    den.prepare(sigmas, device)                   # c_skip, c_out, c_in, c_noise of every step, on the device once
    stochastic = ALL_SAMPLERS[sampler][1]
    x = run_sampler(sampler, den, z, sigmas, noise=noise if stochastic or options.get("eta") else None,
                    callback=callback, **options)
    return x, den


@torch.no_grad()
def generate(loaded: Loaded, *, n: int, seed: int = 0, sampler: str = DEFAULT_VP_SAMPLER, steps: int = 20,
             spacing: str | None = None, eta: float | None = None, batch_size: int = 64,
             labels: Tensor | None = None, guidance: float = 0.0, clip_x0: bool = True,
             device: torch.device | None = None, amp: torch.dtype | None = None, first_index: int = 0,
             progress: Callable[[int], None] | None = None,
             sigma_max_cap: float | None = None, spec: SamplingSpec | None = None) -> tuple[Tensor, dict[str, Any]]:
    """Images uint8 [n, C, H, W] (on CPU) and a record {sampler, steps, nfe, seconds, ...}.

    The sampling settings are ``spec`` (its None fields take the run's defaults, see ``settle``) or,
    without one, the keyword arguments seed..sigma_max_cap. ``steps`` is the network-evaluation
    budget per image (see ``samplers.sampler_sigmas``); the record's ``nfe`` is what the denoiser
    actually counted per batch, at most ``steps``.
    """
    if spec is None:
        spec = SamplingSpec(sampler, steps, spacing, eta, guidance, clip_x0, seed, sigma_max_cap)
    spec = settle(loaded, spec, labels is not None)
    if not 1 <= n <= MAX_IMAGES:
        raise DiffuseError(f"--n must be between 1 and {MAX_IMAGES:,}, got {n}")
    if batch_size < 1:
        raise DiffuseError(f"--batch-size must be a positive integer, got {batch_size}")
    sigmas = spec.sigmas(loaded.schedule)
    device = device or next(loaded.net.parameters()).device
    cb = None
    if progress is not None:
        cb = lambda i, x, x0, s: progress(1)  # noqa: E731
    out, nfe, t0 = [], 0, time.perf_counter()
    levels: dict = {}                               # the run's sigma table, shared by its batches
    for start in range(0, n, batch_size):
        idx = range(first_index + start, first_index + min(n, start + batch_size))
        y = labels[start:start + len(idx)] if labels is not None else None
        x, den = sample_batch(loaded, spec.sampler, sigmas, ImageNoise(spec.seed, idx, device), labels=y,
                              guidance=spec.guidance, clip_x0=spec.clip_x0, amp=amp, callback=cb, levels=levels,
                              **spec.sampler_options())
        out.append(to_uint8(upscale(x, loaded.config.train.output_size)))
        nfe = den.nfe                               # counted, not predicted: network calls per batch
    seconds = time.perf_counter() - t0
    record = {"sampler": spec.sampler, "steps": spec.steps, "spacing": spec.spacing, "nfe": nfe,
              "sigma_max": float(sigmas[0]), "seed": spec.seed, "n": n, "first_index": first_index,
              "guidance": spec.guidance, "eta": spec.eta, "clip_x0": spec.clip_x0,
              "seconds": round(seconds, 3), "images_per_sec": round(n / seconds, 3)}
    return torch.cat(out), record


def generate_shard(loaded: Loaded, *, n: int, labels: Tensor | None = None, **kw) -> tuple[Tensor, range, dict[str, Any]]:
    """This torchrun rank's part of ``generate(loaded, n=n, labels=labels, ...)``: images uint8
    [len(indices), C, H, W] for its block ``indices`` of [0, n) padded to a multiple of the world
    size (``distributed.shard``; indices >= n are padding, with labels continuing the cycle).
    Image i is the same image a single process makes, since it depends only on (seed, i). Without
    torchrun: all n images and range(n)."""
    from . import distributed as dist
    idx = dist.shard(n)
    lab = labels[torch.arange(idx.start, idx.stop) % n] if labels is not None else None
    images, record = generate(loaded, n=len(idx), first_index=idx.start, labels=lab, **kw)
    record.update(n=n, first_index=0, ranks=dist.world())
    return images, idx, record


def generate_all(loaded: Loaded, *, n: int, labels: Tensor | None = None, **kw) -> tuple[Tensor, dict[str, Any]]:
    """``generate`` split across torchrun ranks by per-image seed and gathered: every rank gets
    the same n images [n, C, H, W] uint8 that one process would make."""
    from . import distributed as dist
    images, _, record = generate_shard(loaded, n=n, labels=labels, **kw)
    images = dist.gather_rows(images, n)
    record["images_per_sec"] = round(n / max(record["seconds"], 1e-9), 3)
    return images, record
