"""A model size from a time budget and this machine (issue 23): a ladder of UNet sizes, a measured
throughput probe per rung, and the rule that picks the largest rung the budget can train.

- ``LADDER``: per image-size class (up to 16 px, up to 32 px, above 32 px) UNet rungs from about
  0.1M to about 40M parameters, strictly increasing; the digits and mnist presets' models are
  rungs. A rung is a dict of ModelConfig fields (``RUNG_FIELDS``) whose attention resolutions are
  written at its class's reference size (16, 32, 64 px); ``ladder(image_size)`` scales them to an
  image size. Level attention sits only at the lowest feature size (the middle block always has one).
- ``measure_rate``: img/s of a few real training steps of one rung on random data (autocast, MSE,
  backward, fused AdamW), the first step left out as warm-up; about ``PROBE_SECONDS`` of timed
  steps per rung (at least ``MIN_TIMED_STEPS``). Cached per machine and setting in
  ``cache_dir()/device/throughput-probe.json``, read and written with device.py's cache helpers.
- ``choose``: measures the rungs from small to large and keeps the largest whose planned images
  seen reach ``min_images(params, channels)``; it stops at the first rung that falls short.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from . import device as dev
from .config import PRESETS, Config, ModelConfig
from .errors import DiffuseError
from .fsutil import cache_dir
from .models import UNet, count_parameters
from .objectives import weighted_mse
from .threads import cpu_mark

# The rule: a rung of p parameters qualifies when the budget shows it at least min_images(p, C)
# training images of C channels: IMAGES_PER_PARAM_AT_1M * (p / 1M) ** SIZE_EXPONENT per parameter,
# divided by C (an RGB image counts as three grayscale ones): a larger model needs more images per
# parameter before it beats the rung below. Fitted rung by rung (docs/budgets.md, "The rule against
# the measurements"; one seed per cell, planned images): on a Zen 4 the 0.67M MNIST rung lost at 8
# minutes seeing 0.160 per parameter (so it must not qualify: t > 0.216); on an Intel Xeon the 0.29M
# rung beat the 0.07M at 2 minutes seeing 0.110 (so it must: t <= 0.279); on digits the 0.29M rung
# was as good as or better than the 0.64M at 2.5, 5 and 10 minutes. No single threshold fits the
# MNIST budgets, nor a square root (SIZE_EXPONENT 0.5 picked the 0.07M at 2 Intel minutes: FID 53.3
# against the 0.29M's 40.6). Colour: on the emoji set at 32 px (Intel Xeon, 15 minutes) the 0.67M
# rung beat the 0.29M planned at 0.128 per parameter, which a channel-blind rule turns down for any t
# above 0.172 (and MNIST's runs need t > 0.193); counted per channel it plans 0.384. Counting pixels too
# (C * H * W) would also fit these rows but would count a 64 px image as four 32 px ones and let the
# 64 px ladder pick rungs that see a few epochs, which nothing measured supports. Above
# SIZE_MEASURED_UP_TO nothing was measured, so the need is held there rather than extrapolated.
IMAGES_PER_PARAM_AT_1M = 0.23
SIZE_EXPONENT = 0.75
SIZE_MEASURED_UP_TO = 1.2e6


def min_images(params: int, channels: int) -> float:
    """Planned training images of ``channels`` channels that a rung of ``params`` parameters needs to
    qualify (the rule above)."""
    per_param = IMAGES_PER_PARAM_AT_1M * (min(params, SIZE_MEASURED_UP_TO) / 1e6) ** SIZE_EXPONENT
    return per_param * params / channels


# The share of the budget that trains; sample grids and checkpoints take the rest.
PLANNED_SHARE = 0.9

# A budget plan trains images above HALF_ABOVE px at half their size, and writes them upscaled at
# their own, when the model the budget affords at their own size has fewer than MIN_PARAMS_PER_PIXEL
# parameters per pixel (``half_size``). Measured (docs/budgets.md): the emoji set, 15 minutes on a
# Zen 4, batch 32, peak rate 0.002: at 64 px the 0.40M rung (97 per pixel) FID 161.7; at 32 px the
# 0.67M rung, upscaled, 144.2 and 142.1 in two runs (at 4e-4: 204.8 at 64 px, 174.1 at 32 with batch
# 64). The 32 px route has a floor of its own: the set's real images taken to 32 px and back score FID 51
# against the set, real ones 31.5; so where the budget affords a model large for its pixels, the
# images' own size. 250 is provisional: one point below it measured, none above.
HALF_ABOVE = 32
MIN_PARAMS_PER_PIXEL = 250

PROBE_SECONDS = 1.0         # timed steps run until this much time is spent...
MIN_TIMED_STEPS = 2         # ...but at least this many (a spread needs two; a rung whose step takes
                            # seconds then costs three steps, the warm-up's included)
MAX_TIMED_STEPS = 50        # ...and at most this many (tiny rungs on a GPU)
THROUGHPUT_VERSION = 1      # of the cache file's layout

RUNG_FIELDS = ("base_channels", "channel_mult", "num_res_blocks", "attn_resolutions", "num_groups", "head_channels")


def _rung(base: int, mult: tuple[int, ...], blocks: int, attn: tuple[int, ...], groups: int,
          head: int) -> dict[str, Any]:
    return dict(zip(RUNG_FIELDS, (base, mult, blocks, attn, groups, head)))


# Reference size -> rungs, small to large. Up to 32 px three levels (1,2,2), as the digits, mnist and
# cifar10-small presets (28 px halves cleanly twice, not three times); above, four (1,2,2,2). Two
# residual blocks per level from 64 base channels on. Parameters at 1 channel (3 add under 6,000):
# 16 and 32 px: 0.0727, 0.287, 0.643 / 0.672, 1.19, 2.67, 6.95, 15.6, 27.7, 43.3M; 64 px: 0.100, 0.397,
# 0.917, 1.63, 3.65, 9.59, 21.6, 38.3M.
LADDER: dict[int, tuple[dict[str, Any], ...]] = {
    16: (_rung(8, (1, 2, 2), 1, (), 4, 16), _rung(16, (1, 2, 2), 1, (), 8, 32),
         dict(PRESETS["digits"]["model"]),
         _rung(32, (1, 2, 2), 1, (4,), 8, 32), _rung(48, (1, 2, 2), 1, (4,), 16, 48),
         _rung(64, (1, 2, 2), 2, (4,), 32, 64), _rung(96, (1, 2, 2), 2, (4,), 32, 64),
         _rung(128, (1, 2, 2), 2, (4,), 32, 64), _rung(160, (1, 2, 2), 2, (4,), 32, 64)),
    32: (_rung(8, (1, 2, 2), 1, (), 4, 16), _rung(16, (1, 2, 2), 1, (), 8, 32),
         _rung(24, (1, 2, 2), 1, (8,), 8, 48),
         {**PRESETS["mnist"]["model"], "attn_resolutions": (8,)},      # its 7 at 28 px is 8 at 32
         _rung(48, (1, 2, 2), 1, (8,), 16, 48),
         _rung(64, (1, 2, 2), 2, (8,), 32, 64), _rung(96, (1, 2, 2), 2, (8,), 32, 64),
         _rung(128, (1, 2, 2), 2, (8,), 32, 64), _rung(160, (1, 2, 2), 2, (8,), 32, 64)),
    64: (_rung(8, (1, 2, 2, 2), 1, (), 4, 16), _rung(16, (1, 2, 2, 2), 1, (), 8, 32),
         _rung(24, (1, 2, 2, 2), 1, (8,), 8, 48), _rung(32, (1, 2, 2, 2), 1, (8,), 8, 32),
         _rung(48, (1, 2, 2, 2), 1, (8,), 16, 48), _rung(64, (1, 2, 2, 2), 2, (8,), 32, 64),
         _rung(96, (1, 2, 2, 2), 2, (8,), 32, 64), _rung(128, (1, 2, 2, 2), 2, (8,), 32, 64)),
}


def ladder_size(image_size: int) -> int:
    """The LADDER key of an image size: 16 up to 16 px, 32 up to 32 px, else 64."""
    return 16 if image_size <= 16 else 32 if image_size <= 32 else 64


def ladder(image_size: int) -> list[dict[str, Any]]:
    """The rungs for ``image_size``, small to large, attention resolutions scaled from the class's
    reference size (mnist's 8 at 32 px is 7 at 28). ValueError when the size does not halve cleanly
    through the class's levels (a multiple of 4 up to 32 px, of 8 above): fit it first."""
    ref = ladder_size(image_size)
    rungs = LADDER[ref]
    factor = 2 ** (len(rungs[0]["channel_mult"]) - 1)       # every rung of a class has as many levels
    if image_size < factor or image_size % factor:
        raise ValueError(f"image size {image_size} is not a multiple of {factor}, which the {ref} px ladder's "
                         f"UNet levels need")
    return [{**r, "attn_resolutions": tuple(a * image_size // ref for a in r["attn_resolutions"])} for r in rungs]


def half_size(image_size: int, params: int) -> int | None:
    """The size a budget plan trains ``image_size`` images at when the model it affords at that size
    has ``params`` parameters: half (rounded up to what ``ladder`` needs: a multiple of 4 up to 32 px,
    of 8 above) when the images are above HALF_ABOVE px and params / image_size^2 is below
    MIN_PARAMS_PER_PIXEL; None (train at the images' own size) otherwise."""
    if image_size <= HALF_ABOVE or params >= MIN_PARAMS_PER_PIXEL * image_size ** 2:
        return None
    half = -(-image_size // 2)
    factor = 4 if half <= 32 else 8                 # what ladder(half)'s levels need
    return -(-half // factor) * factor


def model_config(fields: dict[str, Any], cfg: Config, n_channels: int, image_size: int) -> ModelConfig:
    """cfg.model with a rung's fields, the image size and channels: the rest (class conditioning,
    dropout, scale-shift) stays the run's."""
    return dataclasses.replace(cfg.model, **fields, image_size=image_size, in_channels=n_channels)


def count_params(mcfg: ModelConfig) -> int:
    """The UNet's parameter count, built on the meta device (shapes only: nothing allocated)."""
    with torch.device("meta"):
        return count_parameters(UNet(mcfg))


# ----------------------------------------------------------------------------------------------
# The throughput probe

def rate_cache_file() -> Path:
    return cache_dir() / "device" / "throughput-probe.json"


def rate_key(mcfg: ModelConfig, batch: int, device: torch.device, amp: torch.dtype | None,
             channels_last: bool, grad_checkpointing: bool) -> str:
    """What a measured rate depends on: the machine (the CPU model, torch's version and the thread
    count, as the bf16 probe's key; or the GPU's name and torch's version), the precision, the
    memory layout, gradient checkpointing, the batch and the whole model config (the rung's fields,
    image size, channels, classes, dropout)."""
    machine = (f"{torch.cuda.get_device_name(device)} | torch {torch.__version__}" if device.type == "cuda"
               else dev.probe_key() if device.type == "cpu" else f"{device.type} | torch {torch.__version__}")
    precision = "fp32" if amp is None else "bf16" if amp is torch.bfloat16 else str(amp)
    return json.dumps({"machine": machine, "precision": precision, "channels_last": channels_last,
                       "grad_checkpointing": grad_checkpointing, "batch": batch,
                       "model": dataclasses.asdict(mcfg)}, sort_keys=True)


def _repeat(step: Callable[[], None], seconds: float = PROBE_SECONDS,
            clock: Callable[[], float] = time.perf_counter) -> list[float]:
    """Seconds per call of ``step`` after one warm-up call (oneDNN and cuDNN pick kernels, AdamW
    allocates its moments then): timed calls until ``seconds`` are spent, at least MIN_TIMED_STEPS,
    at most MAX_TIMED_STEPS."""
    step()
    times: list[float] = []
    while len(times) < MIN_TIMED_STEPS or (sum(times) < seconds and len(times) < MAX_TIMED_STEPS):
        t0 = clock()
        step()
        times.append(clock() - t0)
    return times


def _time_steps(mcfg: ModelConfig, batch: int, device: torch.device, amp: torch.dtype | None,
                channels_last: bool, grad_checkpointing: bool) -> list[float]:
    """Seconds per training step of a freshly built ``mcfg`` UNet (``_repeat``): x [batch, C, H, W]
    and the target from N(0, 1), t uniform in [0, 1000), labels uniform over the classes and the
    null one; forward under autocast, MSE, backward, fused AdamW. The caller's random state is
    left as it was (fork_rng)."""
    cuda = device.type == "cuda"
    with torch.random.fork_rng(devices=[device] if cuda else []):
        model = UNet(mcfg).to(device).train()
        if channels_last:
            model.to(memory_format=torch.channels_last)
        model.grad_checkpointing = grad_checkpointing
        # fused as the training run's optimizer (run.build_training); other devices have no fused kernel
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type in ("cpu", "cuda"))
        x = torch.randn(batch, mcfg.in_channels, mcfg.image_size, mcfg.image_size, device=device)
        x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
        target, t = torch.randn_like(x), torch.randint(0, 1000, (batch,), device=device).float()
        y = torch.randint(0, mcfg.num_classes + 1, (batch,), device=device) if mcfg.class_cond else None

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                out = model(x, t, y)
            weighted_mse(out, target, None).backward()
            opt.step()
            if cuda:
                torch.cuda.synchronize(device)                  # time the GPU's work, not its queueing

        return _repeat(step)


def measure_rate(model_fields: dict[str, Any], cfg: Config, n_channels: int, image_size: int, batch: int,
                 device: torch.device, amp: torch.dtype | None, channels_last: bool) -> float:
    """Training images per second of one rung on this machine: the cached rate for this
    ``rate_key``, else measured now (``_time_steps``: batch / the median step time, of two the
    slower) and cached, unless the steps' median / best time exceeds device.NOISY_SPREAD or the
    machine is busy (other processes competing for the cores: use the rate this once, measure
    again next time).
    A cached entry that is not what a measurement writes (a rate of 0 or below, not finite, not a
    number, a key missing, a file that is not JSON) is measured over and replaced, never fatal."""
    mcfg = model_config(model_fields, cfg, n_channels, image_size)
    key = rate_key(mcfg, batch, device, amp, channels_last, cfg.train.grad_checkpointing)
    path = rate_cache_file()
    entries = dev._read_cache(path, THROUGHPUT_VERSION)
    cached = dev._numbers(entries.get(key), ("img_per_s", "spread"), ("seconds",))
    if cached is not None:
        return cached["img_per_s"]
    t0, mark = time.perf_counter(), cpu_mark()
    times = _time_steps(mcfg, batch, device, amp, channels_last, cfg.train.grad_checkpointing)
    median = sorted(times)[len(times) // 2]
    rate, spread = batch / median, median / min(times)
    if spread <= dev.NOISY_SPREAD and not dev._busy(mark):
        entries[key] = {"img_per_s": rate, "spread": spread, "seconds": round(time.perf_counter() - t0, 3)}
        dev._write_cache(path, THROUGHPUT_VERSION, entries)
    return rate


# ----------------------------------------------------------------------------------------------
# The choice

@dataclass(frozen=True)
class SizeChoice:
    model: dict[str, Any]           # the chosen rung's RUNG_FIELDS at this image size
    params: int
    img_per_s: float                # measured (or cached) training rate of the chosen rung
    images: int                     # planned images seen: img_per_s * budget_s * PLANNED_SHARE
    epochs: float                   # images / the data set's size
    reason: str                     # one line for the run's start line
    candidates: tuple[tuple[int, float, int], ...]   # (params, img/s, images) per measured rung, small first


@dataclass(frozen=True)
class _Rung:
    fields: dict[str, Any]
    params: int
    rate: float | None              # None: did not fit in memory
    images: int


def _probe(cfg: Config, budget_s: float, device: torch.device, amp: torch.dtype | None, channels_last: bool,
           measure: Callable[..., float]) -> tuple[list[_Rung], _Rung | None]:
    """(the rungs that qualify, the first that does not or None), measured from small to large."""
    size, channels = cfg.model.image_size, cfg.model.in_channels
    passed: list[_Rung] = []
    for fields in ladder(cfg.model.inner_size):
        params = count_params(model_config(fields, cfg, channels, size))
        try:
            rate = measure(fields, cfg, channels, size, cfg.train.batch_size, device, amp, channels_last)
        except torch.OutOfMemoryError:
            return passed, _Rung(fields, params, None, 0)
        rung = _Rung(fields, params, rate, int(rate * budget_s * PLANNED_SHARE))
        if rung.images < min_images(params, channels):
            return passed, rung     # larger rungs are slower and larger still: they fall short too
        passed.append(rung)
    return passed, None


def choose(cfg: Config, n_images: int, budget_s: float, device: torch.device, amp: torch.dtype | None,
           channels_last: bool, *, measure: Callable[..., float] = measure_rate) -> SizeChoice:
    """The largest rung of ``ladder(cfg.model.image_size)`` whose planned images seen
    (img/s * budget_s * PLANNED_SHARE) reach ``min_images`` of its parameters; the smallest rung
    when none does. cfg.model.image_size and in_channels must be set from the data (the size fitted
    to the ladder's levels); the batch is cfg.train.batch_size. Rungs are measured (``measure``,
    measure_rate's signature) from small to large up to the first that falls short or does not fit
    in GPU memory; none above it is measured. DiffuseError when even the smallest does not fit."""
    if not (n_images >= 1 and budget_s > 0 and math.isfinite(budget_s)):
        raise ValueError(f"choose needs images >= 1 and a finite budget > 0, got {n_images} and {budget_s}")
    passed, failed = _probe(cfg, budget_s, device, amp, channels_last, measure)
    if not passed and failed is not None and failed.rate is None:
        raise DiffuseError(f"even the smallest model ({_millions(failed.params)} params) does not fit in "
                           f"{device.type} memory at batch {cfg.train.batch_size}; lower --batch-size")
    chosen = passed[-1] if passed else failed
    measured = passed + ([failed] if failed is not None and failed.rate is not None else [])
    return SizeChoice(model=chosen.fields, params=chosen.params, img_per_s=chosen.rate, images=chosen.images,
                      epochs=chosen.images / n_images,
                      reason=_reason(budget_s, chosen, failed if passed else None, n_images, cfg.train.batch_size,
                                     cfg.model.in_channels),
                      candidates=tuple((r.params, r.rate, r.images) for r in measured))


def _reason(budget_s: float, chosen: _Rung, next_: _Rung | None, n_images: int, batch: int,
            channels: int) -> str:
    """One line: the budget, the chosen size and its plan, and why not the next rung up."""
    line = (f"model sized for {budget_s / 60:.3g} min on this machine: {_millions(chosen.params)} params, "
            f"{_figure(chosen.images / n_images)} epochs planned ({_figure(chosen.rate)} img/s measured)")
    if chosen.images < min_images(chosen.params, channels):
        seen, need = _seen_and_need(chosen, channels)
        return f"{line}; the smallest rung, and it sees only {seen} images per parameter (< {need})"
    if next_ is None:
        return f"{line}; the largest rung of the ladder"
    if next_.rate is None:
        return f"{line}; the next rung, {_millions(next_.params)} params, does not fit in memory at batch {batch}"
    seen, need = _seen_and_need(next_, channels)
    return (f"{line}; the next rung, {_millions(next_.params)} params, would see {seen} images per parameter "
            f"(< {need})")


def _seen_and_need(rung: _Rung, channels: int) -> tuple[str, str]:
    """('0.128', 'the 0.171 a 0.672M model needs'; '... needs on 3-channel images' for colour): the
    rung's planned images per parameter and the rule's threshold as the reason line says them, to three
    figures, or as many more (up to six) as it takes for a near miss not to read as equal."""
    seen, need = rung.images / rung.params, min_images(rung.params, channels) / rung.params
    for digits in range(3, 7):
        a, b = f"{seen:.{digits}g}", f"{need:.{digits}g}"
        if a != b:
            break
    on = f" on {channels}-channel images" if channels > 1 else ""
    return a, f"the {b} a {_millions(rung.params)} model needs{on}"


def _millions(params: int) -> str:
    return f"{params / 1e6:.3g}M"


def _figure(x: float) -> str:
    """3 significant digits below 100 ('0.42', '38.5'), whole numbers with commas above ('1,230')."""
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


# The batch the preset-length check measures at (at most): a big preset's step takes seconds on a
# CPU, and the check only has to tell a day from months.
PRESET_PROBE_BATCH = 16


def preset_rate(cfg: Config, device: torch.device, amp: torch.dtype | None, channels_last: bool) -> float:
    """Training images per second of the run's own (preset) model on this machine, measured at
    min(batch, PRESET_PROBE_BATCH) and cached like any rung: what ``run`` uses to tell whether the
    preset's steps would take over a day here. cfg.model's size and channels must be set from the data."""
    fields = {name: getattr(cfg.model, name) for name in RUNG_FIELDS}
    return measure_rate(fields, cfg, cfg.model.in_channels, cfg.model.image_size,
                        min(cfg.train.batch_size, PRESET_PROBE_BATCH), device, amp, channels_last)
