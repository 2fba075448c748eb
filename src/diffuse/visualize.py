"""Pictures of the diffusion process and of a trained model (``diffuse visualize ...``).

Six views; each computes arrays (returned, so tests check numbers, not pixels) and writes files:

- ``noising``:        forward-process strip x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps
                      (Ho et al. 2020, eq. 4) for a few real images at a few t.
- ``schedules``:      beta_t, abar_t and log SNR(t) of the linear and cosine schedules.
- ``interpolate``:    spherical interpolation between two noises (DDIM, Song et al. 2021, sec. 5.3),
                      each frame decoded by a sampler.
- ``timestep_mse``:   E ||eps - eps_theta(x_t, t)||^2 against t on held-out images.
- ``trajectory``:     x_t and the predicted x0 at every step of one sampling run.
- ``compare_samplers``: one grid, wall time and images/s per (sampler, steps) cell.

Conventions: model-side images are NCHW float32 in [-1, 1]; anything drawn is first quantised
to uint8 NCHW by ``images.to_uint8``. t is the discrete step index of ``diffusion.py``
(0 = the least noisy step, T - 1 = pure noise). Sampling reuses the per-image noise streams of
``generate.generate``: image i of seed s always starts from stream (s, i), so a picture here
shows exactly the images ``diffuse sample`` makes for the same seed.
"""

from __future__ import annotations

import json
import math
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from .data import is_standard, load_dataset
from .diffusion import SCHEDULES, Schedule, q_sample
from .errors import DiffuseError
from .generate import Loaded, generate, sample_batch, settle
from .images import display_scale, make_grid, save_grid, to_uint8
from .objectives import VP, make_denoiser, vp_x0_eps
from .rng import ImageNoise, generator
from .samplers import SAMPLERS
from .sampling import SamplingSpec

NOISING_T = (0, 200, 400, 600, 800, 999)
STEPS_LIST = (10, 20, 50, 100, 1000)
FILE_SUFFIXES = {".png", ".gif", ".jpg", ".jpeg", ".webp", ".json", ".md", ".npz", ".txt"}

# score_fn(cell images uint8 [n, C, H, W], sampler, steps) -> {column name: value}
ScoreFn = Callable[[Tensor, str, int], dict[str, float]]


# ----------------------------------------------------------------------------------------------
# Argument checks shared by the library and the CLI (all raise one-line DiffuseErrors)

def parse_int_list(spec: str, flag: str) -> list[int]:
    """'10,20,50' -> [10, 20, 50]."""
    parts = [p.strip() for p in str(spec).split(",")]
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise DiffuseError(f"{flag} must be a comma-separated list of integers, got {spec!r}") from None
    return values


def check_timesteps(ts: list[int] | tuple[int, ...], timesteps: int, flag: str = "--t") -> list[int]:
    if not ts:
        raise DiffuseError(f"{flag} is empty; give at least one timestep")
    bad = [t for t in ts if not 0 <= t < timesteps]
    if bad:
        raise DiffuseError(f"{flag}: timestep {bad[0]} is outside 0..{timesteps - 1}")
    return [int(t) for t in ts]


def check_samplers(names: list[str] | tuple[str, ...] | None) -> list[str]:
    """Sampler names checked against the registry; None means every registered sampler."""
    if names is None:
        return list(SAMPLERS)
    names = [s.strip() for s in names if s.strip()]
    if not names:
        raise DiffuseError("--samplers is empty; give at least one sampler name")
    for s in names:
        if s not in SAMPLERS:
            raise DiffuseError(f"unknown sampler {s!r}; choose from {', '.join(SAMPLERS)}")
    return list(dict.fromkeys(names))


def png_path(out: str | Path) -> Path:
    """--out for views that write one picture: FILE.png, not a directory."""
    out = Path(out)
    if out.is_dir():
        raise DiffuseError(f"--out {out} is a directory; this view writes one picture: give FILE.png")
    if out.suffix.lower() != ".png":
        raise DiffuseError(f"--out {out}: this view writes one picture; give a file name ending in .png")
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def dir_path(out: str | Path) -> Path:
    """--out for views that write several files: a directory (created if missing)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DiffuseError(f"--out {out} is a file; this view writes several files: give a directory")
    if not out.exists() and out.suffix.lower() in FILE_SUFFIXES:
        raise DiffuseError(f"--out {out} looks like a file name; this view writes several files: give a directory")
    out.mkdir(parents=True, exist_ok=True)
    return out


# ----------------------------------------------------------------------------------------------
# Drawing: labelled grids of equal-sized cells

def _font(size: int = 11):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):      # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _text_size(font, text: str) -> tuple[int, int]:
    box = font.getbbox(text)
    return box[2] - box[0], box[3]


def _hwc(image: Tensor) -> np.ndarray:
    """uint8 [C, H, W] -> HWC numpy, 3 channels (labels are drawn on an RGB canvas)."""
    arr = image.permute(1, 2, 0).numpy()
    return arr.repeat(3, axis=-1) if arr.shape[-1] == 1 else arr


def compose(cells: list[list[np.ndarray | str | None]], *, col_labels: list[str] | None = None,
            row_labels: list[str] | None = None, title: str | None = None, scale: int = 1,
            pad: int = 4) -> Image.Image:
    """A labelled table of pictures. cells[r][c] is an HWC uint8 array (all the same size), a
    string (drawn as text in an empty cell, e.g. why a cell was skipped) or None (left blank).
    Arrays are nearest-upscaled by ``scale``."""
    arrays = [c for row in cells for c in row if isinstance(c, np.ndarray)]
    if not arrays:
        raise ValueError("compose needs at least one picture")
    ch, cw = arrays[0].shape[0] * scale, arrays[0].shape[1] * scale
    font = _font()
    line_h = _text_size(font, "Ag")[1] + 4
    left = pad + max((_text_size(font, s)[0] for s in row_labels or []), default=-pad) + pad
    top = (line_h if title else 0) + (line_h if col_labels else 0) + pad
    rows, cols = len(cells), max(len(r) for r in cells)
    width = max(left + cols * (cw + pad), _text_size(font, title or "")[0] + 2 * pad)
    canvas = Image.new("RGB", (width, top + rows * (ch + pad)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((pad, 2), title, fill=(0, 0, 0), font=font)
    for c, label in enumerate(col_labels or []):
        w = _text_size(font, label)[0]
        draw.text((left + c * (cw + pad) + (cw - w) // 2, top - line_h), label, fill=(0, 0, 0), font=font)
    for r, row in enumerate(cells):
        y = top + r * (ch + pad)
        if row_labels:
            draw.text((pad, y + (ch - line_h) // 2), row_labels[r], fill=(0, 0, 0), font=font)
        for c, cell in enumerate(row):
            x = left + c * (cw + pad)
            if isinstance(cell, np.ndarray):
                img = Image.fromarray(cell if cell.shape[-1] == 3 else cell.repeat(3, axis=-1))
                if scale > 1:
                    img = img.resize((cw, ch), Image.Resampling.NEAREST)
                canvas.paste(img, (x, y))
            elif isinstance(cell, str):
                draw.rectangle((x, y, x + cw - 1, y + ch - 1), outline=(180, 180, 180))
                for k, part in enumerate(_wrap(cell, font, cw - 4)):
                    draw.text((x + 2, y + 2 + k * line_h), part, fill=(120, 0, 0), font=font)
    return canvas


def _wrap(text: str, font, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if line and _text_size(font, trial)[0] > width:
            lines.append(line)
            line = word
        else:
            line = trial
    return lines + [line] if line else lines


def image_table(images: Tensor, **labels) -> Image.Image:
    """uint8 [R, K, C, H, W] -> a labelled R x K table (one image per cell)."""
    cells = [[_hwc(images[r, k]) for k in range(images.shape[1])] for r in range(images.shape[0])]
    return compose(cells, scale=display_scale(images.shape[-1]), **labels)


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


# ----------------------------------------------------------------------------------------------
# Sampling with hooks, exactly as generate.generate does it

def _spec(loaded: Loaded, spec: SamplingSpec | None, labels: Tensor | None, **kw) -> SamplingSpec:
    """The view's sampling settings, resolved and checked as ``generate`` does it (``generate.settle``):
    ``spec`` if given, else one built from the view's sampler/steps/guidance arguments ``kw``."""
    return settle(loaded, spec or SamplingSpec(**kw), labels is not None)


def _sample(loaded: Loaded, spec: SamplingSpec, noise, *, labels: Tensor | None = None, callback=None,
            amp: torch.dtype | None = None) -> Tensor:
    """One batch through a settled ``spec``, set up exactly as ``generate.generate`` sets up a batch
    (same prior draw, denoiser, x0 clipping and noise hand-over), but from any noise object with
    ``randn``/``randn_like`` and with a per-step callback. Returns float [B, C, H, W]."""
    return sample_batch(loaded, spec.sampler, spec.sigmas(loaded.schedule), noise, labels=labels,
                        guidance=spec.guidance, clip_x0=spec.clip_x0, callback=callback, amp=amp,
                        **spec.sampler_options())[0]


# ----------------------------------------------------------------------------------------------
# noising: the forward process on real images

@dataclass
class NoisingStrip:
    ts: list[int]
    x0: Tensor                       # [N, C, H, W] float in [-1, 1], the data images
    xt: Tensor                       # [len(ts), N, C, H, W] float32, q_sample output, not clamped
    abar: list[float]                # abar_t per column
    row_labels: list[str]
    schedule: str = "linear"         # the noise schedule drawn
    preset: str = ""                 # the preset --data trains with (where the default schedule came from)


def noising_strip(x0: Tensor, schedule: Schedule, ts: list[int], eps: Tensor) -> Tensor:
    """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps for each t, with one eps per image shared by
    all columns (so a row is one noise sample fading in). x0, eps: [N, C, H, W].
    Returns [len(ts), N, C, H, W] float32."""
    n = x0.shape[0]
    return torch.stack([q_sample(x0, torch.full((n,), t, dtype=torch.long), eps, schedule.alphas_cumprod)
                        for t in ts])


def noising(*, data: str = "digits", data_root: str | None = None, schedule: str | None = None,
            timesteps: int | None = None, ts: list[int] | tuple[int, ...] = NOISING_T, n: int = 6, seed: int = 0,
            out: str | Path | None = None) -> NoisingStrip:
    """Forward-process strip for n training images picked by ``seed`` (rows) at each t (columns).

    ``schedule`` and ``timesteps`` default to those of the preset ``data`` trains with (what
    ``diffuse train --data DATA`` would use), so the strip shows the process that model learns."""
    from .config import default_preset_for, resolve
    from .objectives import formulation_for

    if schedule is not None and schedule not in SCHEDULES:
        raise DiffuseError(f"--schedule must be {' or '.join(SCHEDULES)}, got {schedule!r}")
    if n < 1:
        raise DiffuseError(f"--n must be a positive integer, got {n}")
    path = png_path(out) if out is not None else None
    preset = default_preset_for(data)
    # the run config `diffuse train --data DATA [--schedule S --timesteps T]` resolves to, built as training
    # builds it (linear betas scaled by 1000/T, config.scale_linear_betas)
    given = {k: v for k, v in (("schedule", schedule), ("timesteps", timesteps)) if v is not None}
    d = resolve(preset, data, None, {"diffusion": given}).diffusion
    schedule, timesteps = d.schedule, d.timesteps
    sched = formulation_for(d).schedule
    ts = check_timesteps(list(ts), timesteps)
    ds = load_dataset(data, data_root, "train")
    pick = torch.randperm(len(ds), generator=generator(seed, "noising"))[:n]
    x0 = ds.images[pick].float() / 127.5 - 1                           # [N, C, H, W] in [-1, 1]
    eps = ImageNoise(seed, range(len(pick))).randn(*x0.shape[1:])      # [N, C, H, W]
    xt = noising_strip(x0, sched, ts, eps)
    labels = ([ds.class_names[int(ds.labels[i])] for i in pick] if ds.labels is not None and ds.class_names
              else [f"#{int(i)}" for i in pick])
    strip = NoisingStrip(ts, x0, xt, [float(sched.alphas_cumprod[t]) for t in ts], labels, schedule, preset)
    if path is not None:
        table = to_uint8(xt).transpose(0, 1)                           # [N, len(ts), C, H, W]
        image_table(table, col_labels=[f"t={t}" for t in ts], row_labels=labels,
                    title=f"forward process q(x_t | x_0), {schedule} schedule, T={timesteps}").save(path)
    return strip


# ----------------------------------------------------------------------------------------------
# schedules: beta, abar and log SNR

def schedule_curves(timesteps: int = 1000) -> dict[str, dict[str, np.ndarray]]:
    """{schedule: {'betas', 'alphas_cumprod', 'log_snr'}} as float64 numpy arrays of length T, for the
    schedules training builds at this T (linear betas scaled by 1000/T, config.scale_linear_betas)."""
    from .config import Config, DiffusionConfig, scale_linear_betas

    out = {}
    for name in SCHEDULES:
        cfg = Config()
        cfg.diffusion = DiffusionConfig(schedule=name, timesteps=timesteps)
        scale_linear_betas(cfg, set())
        d = cfg.diffusion
        s = Schedule(name, timesteps, beta_start=d.beta_start, beta_end=d.beta_end)
        abar = s.alphas_cumprod
        out[name] = {"betas": s.betas.numpy(), "alphas_cumprod": abar.numpy(),
                     "log_snr": (abar.log() - (-abar).log1p()).numpy()}
    return out


def plot_schedules(out: str | Path, timesteps: int = 1000) -> dict[str, dict[str, np.ndarray]]:
    path = png_path(out)
    curves = schedule_curves(timesteps)
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), dpi=110)
    t = np.arange(timesteps)
    for name, c in curves.items():
        axes[0].plot(t, c["betas"], label=name, lw=1.4)
        axes[1].plot(t, c["alphas_cumprod"], label=name, lw=1.4)
        axes[2].plot(t, c["log_snr"], label=name, lw=1.4)
    axes[0].set_yscale("log")
    for ax, title in zip(axes, [r"$\beta_t$ (log scale)", r"$\bar\alpha_t$", r"log SNR $= \log \bar\alpha_t/(1-\bar\alpha_t)$"]):
        ax.set_title(title)
        ax.set_xlabel("t")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return curves


# ----------------------------------------------------------------------------------------------
# interpolate: slerp between two noises

def slerp(z0: Tensor, z1: Tensor, alphas: Tensor) -> Tensor:
    """Spherical interpolation (Shoemake 1985), as DDIM interpolates its initial noise (Song et al.
    2021, sec. 5.3):

        slerp(z0, z1; a) = sin((1 - a) theta) / sin(theta) z0 + sin(a theta) / sin(theta) z1,
        cos(theta) = <z0, z1> / (|z0| |z1|),

    one theta per row. z0, z1: [B, ...]; alphas: [K] in [0, 1]. Returns [B, K, ...] in z0's dtype.
    a = 0 and a = 1 give z0 and z1 exactly. Nearly parallel rows fall back to linear interpolation.
    """
    a = alphas.double().cpu()                                            # [K]
    f0, f1 = z0.flatten(1).double(), z1.flatten(1).double()              # [B, D]
    cos = (f0 * f1).sum(1) / (f0.norm(dim=1) * f1.norm(dim=1))
    theta = cos.clamp(-1, 1).acos()[:, None].cpu()                       # [B, 1]
    sin = theta.sin()
    parallel = sin.abs() < 1e-6
    c0 = torch.where(parallel, 1 - a, ((1 - a) * theta).sin() / sin.where(~parallel, torch.ones_like(sin)))
    c1 = torch.where(parallel, a.expand_as(c0), (a * theta).sin() / sin.where(~parallel, torch.ones_like(sin)))
    shape = (*c0.shape, *([1] * (z0.ndim - 1)))                          # [B, K, 1, ...]
    c0, c1 = c0.view(shape).to(z0.device), c1.view(shape).to(z0.device)
    out = c0 * z0.double()[:, None] + c1 * z1.double()[:, None]
    return out.to(z0.dtype)


class SlerpNoise:
    """Noise for P interpolation rows of K frames, batched as [P * K, ...] (row-major).

    Row p runs between images a_p and b_p of ``seed``. Every draw (the starting noise and each
    stochastic sampler's per-step noise) takes one draw from each endpoint's own stream (the streams
    ``generate`` gives those images) and slerps them, so each row is a smooth path whose two ends
    are exactly the images ``generate`` makes for a_p and b_p.
    """

    def __init__(self, seed: int, pairs: list[tuple[int, int]], alphas: Tensor, device: torch.device | str = "cpu"):
        self.a = ImageNoise(seed, [p[0] for p in pairs], device)
        self.b = ImageNoise(seed, [p[1] for p in pairs], device)
        self.alphas = alphas
        self.rows = len(pairs)

    def __len__(self) -> int:
        return self.rows * len(self.alphas)

    def randn(self, *shape: int) -> Tensor:
        return slerp(self.a.randn(*shape), self.b.randn(*shape), self.alphas).flatten(0, 1)

    def randn_like(self, x: Tensor) -> Tensor:
        if x.shape[0] != len(self):
            raise ValueError(f"batch of {x.shape[0]} does not match {len(self)} interpolation frames")
        return self.randn(*x.shape[1:]).to(x.dtype)


@torch.no_grad()
def interpolate(loaded: Loaded, *, sampler: str = "ddim", steps: int = 50, rows: int = 4, frames: int = 10,
                seed: int = 0, labels: Tensor | None = None, guidance: float = 0.0,
                amp: torch.dtype | None = None, spec: SamplingSpec | None = None) -> Tensor:
    """Row p slerps from image 2p to image 2p + 1 of ``seed`` (as ``generate`` numbers them) in
    ``frames`` equal steps of alpha and decodes every frame with ``sampler``.
    labels: [rows] long or None; ``spec`` replaces sampler/steps/guidance/seed. Returns uint8
    [rows, frames, C, H, W]."""
    spec = _spec(loaded, spec, labels, sampler=sampler, steps=steps, guidance=guidance, seed=seed)
    if rows < 1 or frames < 2:
        raise DiffuseError(f"need at least 1 row and 2 frames, got {rows} rows and {frames} frames")
    alphas = torch.linspace(0, 1, frames, dtype=torch.float64)
    device = next(loaded.net.parameters()).device
    noise = SlerpNoise(spec.seed, [(2 * p, 2 * p + 1) for p in range(rows)], alphas, device)
    y = labels.repeat_interleave(frames) if labels is not None else None
    x = _sample(loaded, spec, noise, labels=y, amp=amp)
    return to_uint8(x).view(rows, frames, *x.shape[1:])


def save_interpolation(images: Tensor, path: Path, title: str, row_labels: list[str] | None = None) -> None:
    k = images.shape[1]
    image_table(images, col_labels=[f"{a:.2f}" for a in np.linspace(0, 1, k)], row_labels=row_labels,
                title=title).save(path)


# ----------------------------------------------------------------------------------------------
# timestep-mse: how hard each noise level is

def default_mse_timesteps(timesteps: int) -> list[int]:
    """0, T/20, 2T/20, ..., and T - 1 (for T = 1000: 0, 50, ..., 950, 999)."""
    stride = max(1, timesteps // 20)
    return sorted(set(range(0, timesteps, stride)) | {timesteps - 1})


def held_out_images(loaded: Loaded, n: int, seed: int, data_root: str | None = None) -> tuple[Tensor, Tensor | None, str, str]:
    """Up to n images the model did not train on: the data set's test split when it has one,
    else (image folders) the training images. Returns (x0 float [n, C, H, W] in [-1, 1], labels or
    None, split, note)."""
    d, m = loaded.config.data, loaded.config.model
    if is_standard(d.name):
        split, note = "test", f"{d.name} test split (held out from training)"
    else:
        split, note = "train", f"{d.name} is an image folder with no test split: these are its training images"
    ds = load_dataset(d.name, data_root or d.root, split, m.image_size, m.in_channels)
    if ds.images.shape[1:] != (m.in_channels, m.image_size, m.image_size):
        raise DiffuseError(f"{d.name} {split} images are {tuple(ds.images.shape[1:])}, but the model takes "
                           f"{(m.in_channels, m.image_size, m.image_size)}")
    pick = torch.randperm(len(ds), generator=generator(seed, "timestep-mse", "pick"))[:n]
    labels = ds.labels[pick] if ds.labels is not None and m.class_cond else None
    return ds.images[pick].float() / 127.5 - 1, labels, split, note


@torch.no_grad()
def timestep_mse(loaded: Loaded, *, ts: list[int] | None = None, n: int = 256, seed: int = 0,
                 data_root: str | None = None, batch_size: int = 256, amp: torch.dtype | None = None) -> dict[str, Any]:
    """Noise-prediction error per timestep, E_{x0, eps} ||eps - eps_theta(x_t, t)||^2 / D (the
    training loss, Ho et al. 2020 eq. 14, at fixed t), over n held-out images. Every t uses the
    same images and the same eps per image, so differences between t are not sampling noise.
    Class-conditional models see the images' true labels."""
    T = loaded.schedule.timesteps
    ts = sorted(set(check_timesteps(ts, T))) if ts is not None else default_mse_timesteps(T)
    if n < 1:
        raise DiffuseError(f"--n must be a positive integer, got {n}")
    x0_all, labels_all, split, note = held_out_images(loaded, n, seed, data_root)
    n = x0_all.shape[0]
    eps_all = torch.randn(x0_all.shape, generator=generator(seed, "timestep-mse", "eps"))
    device = next(loaded.net.parameters()).device
    den = make_denoiser(loaded.net, loaded.formulation, autocast_dtype=amp)
    form = loaded.formulation
    abar = loaded.schedule.alphas_cumprod.to(device)
    per_t = torch.zeros(len(ts), n, dtype=torch.float64)                # [len(ts), n] per-image MSE
    for start in range(0, n, batch_size):
        x0 = x0_all[start:start + batch_size].to(device)
        eps = eps_all[start:start + batch_size].to(device)
        den.labels = labels_all[start:start + batch_size].to(device) if labels_all is not None else None
        for j, t in enumerate(ts):
            tt = torch.full((x0.shape[0],), t, device=device, dtype=torch.long)
            x_t = q_sample(x0, tt, eps, abar)
            if isinstance(form, VP):          # the network's own output, read as eps (exact for eps nets)
                a = abar[tt].view(-1, 1, 1, 1)
                _, eps_hat = vp_x0_eps(form.prediction, den.forward(x_t, tt.float()), x_t,
                                       a.sqrt().float(), (1 - a).sqrt().float())
            else:                             # edm: eps from D on the VE view of the same x_t
                sigma = loaded.schedule.sigmas[t]
                x_ve = x0 + float(sigma) * eps
                eps_hat = (x_ve - den(x_ve, torch.full((x0.shape[0],), float(sigma), dtype=torch.float64))) / float(sigma)
            err = (eps_hat - eps).square().flatten(1).mean(1)
            per_t[j, start:start + x0.shape[0]] = err.double().cpu()
    mse = per_t.mean(1)
    std_err = per_t.std(1) / math.sqrt(n) if n > 1 else torch.zeros_like(mse)
    return {"t": ts, "mse": mse.tolist(), "std_err": std_err.tolist(), "n": n, "seed": seed,
            "data": loaded.config.data.name, "split": split, "note": note,
            "conditional": labels_all is not None, "source": str(loaded.source)}


def plot_timestep_mse(result: dict[str, Any], path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 3.8), dpi=120)
    t, mse, se = np.array(result["t"]), np.array(result["mse"]), np.array(result["std_err"])
    ax.errorbar(t, mse, yerr=se, marker="o", ms=3, lw=1.3, capsize=2, label="model")
    ax.axhline(1.0, color="gray", ls="--", lw=1, label="predict eps = 0")
    ax.set_yscale("log")
    ax.set_xlabel("t")
    ax.set_ylabel(r"MSE$(\epsilon, \hat\epsilon_\theta(x_t, t))$")
    ax.set_title(f"noise-prediction error, {result['n']} {result['data']} {result['split']} images")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# trajectory: x_t and x0_hat along one sampling run

@dataclass
class Trajectory:
    sampler: str
    steps: int
    t: list[float]                   # continuous timestep of each denoiser call
    sigma: list[float]               # its VE noise level
    xt: Tensor                       # uint8 [F, n, C, H, W]: the VP sample x_t = x / sqrt(1 + sigma^2), clamped
    x0: Tensor                       # uint8 [F, n, C, H, W]: the denoiser's x0 estimate at that call
    final: Tensor                    # uint8 [n, C, H, W]: what the sampler returned (= generate's images)


@torch.no_grad()
def trajectory(loaded: Loaded, *, sampler: str = "ddim", steps: int = 50, n: int = 4, seed: int = 0,
               first_index: int = 0, labels: Tensor | None = None, guidance: float = 0.0,
               amp: torch.dtype | None = None, spec: SamplingSpec | None = None) -> Trajectory:
    """Record every denoiser call of one run of ``sampler`` for images first_index.. of ``seed``
    (``spec`` replaces sampler/steps/guidance/seed)."""
    spec = _spec(loaded, spec, labels, sampler=sampler, steps=steps, guidance=guidance, seed=seed)
    if n < 1:
        raise DiffuseError(f"--n must be a positive integer, got {n}")
    device = next(loaded.net.parameters()).device
    noise = ImageNoise(spec.seed, range(first_index, first_index + n), device)
    xs, x0s, sigmas = [], [], []

    def record(i: int, x: Tensor, x0: Tensor, sigma: float) -> None:
        xs.append(to_uint8(x / math.sqrt(1 + sigma ** 2)))
        x0s.append(to_uint8(x0))
        sigmas.append(float(sigma))

    x = _sample(loaded, spec, noise, labels=labels, callback=record, amp=amp)
    t = loaded.schedule.sigma_to_t(torch.tensor(sigmas, dtype=torch.float64)).tolist()
    return Trajectory(spec.sampler, spec.steps, t, sigmas, torch.stack(xs), torch.stack(x0s), to_uint8(x))


def _pick(count: int, k: int) -> list[int]:
    """k indices spread evenly over range(count), first and last included."""
    if count <= k:
        return list(range(count))
    return sorted(set(np.linspace(0, count - 1, k).round().astype(int).tolist()))


def save_trajectory(tr: Trajectory, strip_path: Path, gif_path: Path, frames: int = 10,
                    gif_frames: int = 60, frame_ms: int = 80) -> None:
    """Strip: per image an x_t row and an x0_hat row at ``frames`` evenly spaced calls, then the
    output. GIF: every call (thinned to ``gif_frames``), x_t above x0_hat, the output held last."""
    n = tr.final.shape[0]
    cols = _pick(len(tr.t), frames)
    scale = display_scale(tr.final.shape[-1])
    cells, row_labels = [], []
    for i in range(n):
        cells.append([_hwc(tr.xt[f, i]) for f in cols] + [_hwc(tr.final[i])])
        cells.append([_hwc(tr.x0[f, i]) for f in cols] + [_hwc(tr.final[i])])
        row_labels += [f"x_t #{i}", f"x0_hat #{i}"]
    compose(cells, col_labels=[f"t={tr.t[f]:.0f}" for f in cols] + ["output"], row_labels=row_labels,
            title=f"{tr.sampler}, {tr.steps} steps: x_t and predicted x0 at each step", scale=scale).save(strip_path)

    def frame(xt: Tensor, x0: Tensor, caption: str) -> Image.Image:
        return compose([[_hwc(xt[i]) for i in range(n)], [_hwc(x0[i]) for i in range(n)]],
                       row_labels=["x_t", "x0_hat"], title=caption, scale=scale)

    calls = len(tr.t)
    gif = [frame(tr.xt[f], tr.x0[f], f"{tr.sampler} call {f + 1}/{calls}  t={tr.t[f]:.0f}  sigma={tr.sigma[f]:.3g}")
           for f in _pick(calls, gif_frames)]
    gif.append(frame(tr.final, tr.final, f"{tr.sampler} output ({tr.steps} steps)"))
    durations = [frame_ms] * (len(gif) - 1) + [1500]
    gif[0].save(gif_path, save_all=True, append_images=gif[1:], duration=durations, loop=0, optimize=False)


# ----------------------------------------------------------------------------------------------
# compare-samplers: grids and timings per (sampler, steps)

@dataclass
class Cell:
    sampler: str
    steps: int
    nfe: int | None = None
    spacing: str | None = None
    seconds: list[float] = field(default_factory=list)   # wall time of each timed batch
    images: Tensor | None = None                          # uint8 [n, C, H, W]
    scores: dict[str, float] = field(default_factory=dict)
    skipped: str | None = None                            # why the sampler rejected this cell

    @property
    def mean_seconds(self) -> float:
        return float(np.mean(self.seconds))

    @property
    def std_seconds(self) -> float | None:
        return float(np.std(self.seconds, ddof=1)) if len(self.seconds) > 1 else None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def compare_samplers(loaded: Loaded, out: str | Path, *, samplers: list[str] | None = None,
                     steps_list: list[int] | tuple[int, ...] = STEPS_LIST, n: int = 16, seed: int = 0,
                     repeats: int = 1, labels: Tensor | None = None, guidance: float = 0.0,
                     score_fn: ScoreFn | None = None, score_note: str | None = None,
                     log: Callable[[str], None] | None = None, amp: torch.dtype | None = None) -> dict[str, Any]:
    """Sample the same n seeds with every (sampler, steps) cell, one batch of n per run.

    Timing: one short discarded warm-up run per sampler, then ``repeats`` timed batches per cell,
    taken in rounds over all cells (wall clock around ``generate``, which returns images on the
    CPU, so GPU work is finished); the report gives their mean and standard deviation.
    ``score_fn(images uint8 [n, C, H, W], sampler, steps) -> {name: value}`` adds one column per
    name; it may score the cell's images or draw more with the same sampler (FID needs thousands),
    and ``score_note`` says how in the report. A score named ``fid`` also gets an FID-vs-NFE plot.
    A combination ``generate`` rejects is skipped and its reason reported.
    Writes OUT/report.md, report.json, time_vs_steps.png, overview.png and grids/*.png.
    """
    out = dir_path(out)
    names = check_samplers(samplers)
    steps_list = list(dict.fromkeys(steps_list))
    if not steps_list or any(s < 1 for s in steps_list):
        raise DiffuseError(f"--steps-list must be positive integers, got {steps_list}")
    if n < 1 or repeats < 1:
        raise DiffuseError(f"--n and --repeats must be positive integers, got {n} and {repeats}")
    device = next(loaded.net.parameters()).device
    log = log or (lambda s: None)
    kw = dict(n=n, seed=seed, batch_size=n, labels=labels, guidance=guidance, device=device, amp=amp)
    def timed(cell: Cell) -> tuple[Tensor, dict[str, Any]]:
        _sync(device)
        t0 = time.perf_counter()
        images, record = generate(loaded, sampler=cell.sampler, steps=cell.steps, **kw)
        _sync(device)
        cell.seconds.append(time.perf_counter() - t0)
        return images, record

    cells: list[Cell] = []
    for name in names:
        warmed = False
        for steps in steps_list:
            cell = Cell(name, steps)
            cells.append(cell)
            try:
                if not warmed:
                    generate(loaded, sampler=name, steps=min(2, steps), **kw)
                    warmed = True
                images, record = timed(cell)
            except (DiffuseError, ValueError) as e:
                cell.skipped = str(e)
                log(f"{name:>12} {steps:>5} steps  skipped: {e}")
                continue
            cell.images, cell.nfe, cell.spacing = images, record["nfe"], record["spacing"]
            if score_fn is not None:
                cell.scores = {k: float(v) for k, v in score_fn(images, name, steps).items()}
            scored = "".join(f"  {k} {_fmt(v)}" for k, v in cell.scores.items())
            log(f"{name:>12} {steps:>5} steps  {cell.mean_seconds:8.3f} s/batch  {n / cell.mean_seconds:8.1f} img/s"
                f"{scored}")
    # Further timed batches go round all cells in turn, so a passing slowdown of the machine is
    # spread over the cells instead of landing on whichever one happened to be running.
    for r in range(1, repeats):
        for cell in cells:
            if not cell.skipped:
                timed(cell)
        log(f"repeat {r + 1}/{repeats} done")
    return write_comparison(cells, out, n=n, seed=seed, repeats=repeats, device=device, source=str(loaded.source),
                            score_note=score_note)


def _fmt(v: float) -> str:
    return f"{v:.4g}"


def write_comparison(cells: list[Cell], out: Path, *, n: int, seed: int, repeats: int, device: torch.device,
                     source: str, score_note: str | None = None) -> dict[str, Any]:
    """Write the comparison of ``cells`` into ``out``: grids/ (one PNG per cell), report.json,
    report.md, and, when a cell ran, time_vs_steps.png, fid_vs_nfe.png (if FID was scored) and
    overview.png. Returns the report that report.json holds."""
    rows = _comparison_rows(cells, out, n)
    report = {"source": source, "n": n, "batch_size": n, "seed": seed, "repeats": repeats, "device": str(device),
              "torch": torch.__version__, "score_note": score_note, "cells": rows}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(_comparison_markdown(cells, rows, n=n, seed=seed, repeats=repeats, device=device,
                                                        source=source, score_note=score_note))
    done = [c for c in cells if not c.skipped]
    if done:
        _plot_time_vs_steps(done, out / "time_vs_steps.png", n, device)
        scored = [c for c in done if "fid" in c.scores]
        if scored:
            _plot_fid_vs_nfe(scored, out / "fid_vs_nfe.png", score_note)
        _comparison_overview(cells, n, display_scale(done[0].images.shape[-1])).save(out / "overview.png")
    return report


def _comparison_rows(cells: list[Cell], out: Path, n: int) -> list[dict[str, Any]]:
    """One report row per cell; each cell that ran also gets its grid written to out/grids/."""
    grids = out / "grids"
    grids.mkdir(exist_ok=True)
    rows = []
    for c in cells:
        row: dict[str, Any] = {"sampler": c.sampler, "steps": c.steps}
        if c.skipped:
            row["skipped"] = c.skipped
        else:
            grid = grids / f"{c.sampler}_{c.steps:04d}.png"
            save_grid(c.images, grid)
            row.update({"nfe": c.nfe, "spacing": c.spacing, "seconds_per_batch": c.mean_seconds,
                        "seconds_std": c.std_seconds, "seconds_all": c.seconds,
                        "images_per_sec": n / c.mean_seconds, "grid": str(grid.relative_to(out)),
                        "scores": c.scores})
        rows.append(row)
    return rows


def _comparison_markdown(cells: list[Cell], rows: list[dict[str, Any]], *, n: int, seed: int, repeats: int,
                         device: torch.device, source: str, score_note: str | None) -> str:
    """report.md: a header naming the model and seeds, then one table row per cell."""
    score_names = list(dict.fromkeys(k for c in cells for k in c.scores))
    head = ["sampler", "steps", "NFE", "spacing", "s/batch", "images/s", *score_names, "grid"]
    lines = ["# Sampler comparison", "",
             f"Model `{source}`; {n} images per batch (seeds {seed}:0..{n - 1}, the same in every cell); "
             f"device {device}; {repeats} timed batch(es) per cell after a discarded warm-up."
             + (f" {score_note}" if score_note else ""), "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c, r in zip(cells, rows):
        if c.skipped:
            lines.append(f"| {c.sampler} | {c.steps} | – | – | skipped: {c.skipped.replace('|', '/')} | – |"
                         + " – |" * len(score_names) + " – |")
            continue
        secs = _fmt(c.mean_seconds) + (f" ± {_fmt(c.std_seconds)}" if c.std_seconds is not None else "")
        scores = [(_fmt(c.scores[k]) if k in c.scores else "–") for k in score_names]
        lines.append("| " + " | ".join([c.sampler, str(c.steps), str(c.nfe), c.spacing, secs,
                                         _fmt(r["images_per_sec"]), *scores, f"[png]({r['grid']})"]) + " |")
    return "\n".join(lines) + "\n"


def _plot_time_vs_steps(done: list[Cell], path: Path, n: int, device: torch.device) -> None:
    """Two log-log panels over sampling steps, one line per sampler: seconds per batch, images/s."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), dpi=110)
    for name in dict.fromkeys(c.sampler for c in done):
        cs = [c for c in done if c.sampler == name]
        axes[0].plot([c.steps for c in cs], [c.mean_seconds for c in cs], marker="o", label=name)
        axes[1].plot([c.steps for c in cs], [n / c.mean_seconds for c in cs], marker="o", label=name)
    for ax, ylabel in zip(axes, ["seconds per batch", "images / second"]):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("sampling steps")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    axes[0].set_title(f"wall time, batch of {n} ({device.type})")
    axes[1].set_title("throughput")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _plot_fid_vs_nfe(scored: list[Cell], path: Path, score_note: str | None) -> None:
    """FID over NFE (log-log), one line per sampler, titled with the scoring note."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.5), dpi=110)
    for name in dict.fromkeys(c.sampler for c in scored):
        cs = [c for c in scored if c.sampler == name]
        ax.plot([c.nfe for c in cs], [c.scores["fid"] for c in cs], marker="o", label=name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("network evaluations per image (NFE)")
    ax.set_ylabel("FID (lower is better)")
    note = "\n" + textwrap.fill(score_note, 90) if score_note else ""      # long: wrap, never clip
    ax.set_title("FID against sampling cost" + note, fontsize=7 if note else 9)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _comparison_overview(cells: list[Cell], n: int, scale: int) -> Image.Image:
    """A sampler x steps table of the first (at most 16) images of each cell, the same seeds in
    every cell; a skipped cell shows why."""
    names = list(dict.fromkeys(c.sampler for c in cells))
    steps = list(dict.fromkeys(c.steps for c in cells))
    by = {(c.sampler, c.steps): c for c in cells}
    shown = min(n, 16)
    cols = math.ceil(math.sqrt(shown))
    table = [[(make_grid(by[s, k].images[:shown], cols) if not by[s, k].skipped else f"skipped: {by[s, k].skipped}")
              if (s, k) in by else None for k in steps] for s in names]
    table = [[c.repeat(3, axis=-1) if isinstance(c, np.ndarray) and c.shape[-1] == 1 else c for c in row]
             for row in table]
    return compose(table, col_labels=[f"{k} steps" for k in steps], row_labels=names,
                   title=f"same {shown} seeds in every cell", scale=scale)


# ----------------------------------------------------------------------------------------------
# What `diffuse visualize` prints beside the pictures

def noising_lines(strip: NoisingStrip, data: str, out: str | Path, *, schedule_given: bool) -> list[str]:
    """The noising view's summary: where the strip went and abar_t, signal and noise scales per t."""
    how = "" if schedule_given else f", the one the {strip.preset} preset trains with"
    lines = [f"wrote {out}: {len(strip.row_labels)} {data} images x t = {', '.join(map(str, strip.ts))} "
             f"({strip.schedule} schedule{how})",
             "   t   abar_t   signal sqrt(abar)   noise sqrt(1-abar)"]
    lines += [f"{t:>4}  {a:7.4f}   {a ** 0.5:17.4f}   {(1 - a) ** 0.5:18.4f}" for t, a in zip(strip.ts, strip.abar)]
    return lines


def schedule_lines(curves: dict[str, dict[str, np.ndarray]], out: str | Path) -> list[str]:
    """The schedule view's summary: each schedule's end points."""
    return [f"wrote {out}"] + [
        f"{name:>7}: abar_T-1 = {c['alphas_cumprod'][-1]:.3g}, log SNR from {c['log_snr'][0]:.2f} "
        f"to {c['log_snr'][-1]:.2f}, beta from {c['betas'][0]:.3g} to {c['betas'][-1]:.3g}"
        for name, c in curves.items()]
