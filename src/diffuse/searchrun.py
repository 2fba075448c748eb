"""`diffuse distill --method gits`: a distillation without training. The teacher's noise levels for
a few-call sampler are searched on its own trajectories (stepsearch.py, GITS), and the result is
written as an ordinary run: the teacher's EMA weights in one checkpoint, the levels and the sampler
in the config's ``distill`` section, so `sample`, `eval`, `serve`, `info` and the API default to them.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from . import checkpoint as ckpt_io
from .config import Config
from .device import pick_device
from .fsutil import atomic_write
from .generate import cycle_labels, load
from .objectives import make_denoiser
from .rng import generator
from .run import prepare_out_dir
from .samplers import KARRAS_SIGMA_MAX_CAP
from .stepsearch import search_sigmas

TRAJECTORIES = 256          # GITS searches on a few hundred trajectories (sec. 5: 256 for CIFAR-10)


def search_run(cfg: Config, *, overwrite: bool = False, progress: bool = True) -> Path:
    """Search ``cfg.distill.nfe`` levels on ``cfg.distill.teacher`` and write the run in
    ``cfg.train.out``; returns it. The search is seeded by ``cfg.train.seed``: the same call gives
    the same levels."""
    d, out = cfg.distill, Path(cfg.train.out)
    device = pick_device(cfg.train.device)
    src = ckpt_io.resolve(d.teacher)
    teacher = load(src, device)
    lock = prepare_out_dir(out, overwrite)
    try:
        t0 = time.perf_counter()
        m = cfg.model
        z = torch.randn((TRAJECTORIES, m.in_channels, m.image_size, m.image_size), dtype=torch.float32,
                        generator=generator(cfg.train.seed, "gits", device=device), device=device)
        # A class-conditional teacher is searched as it samples by default: classes cycled, its guidance.
        labels = cycle_labels(range(m.num_classes), TRAJECTORIES).to(device) if m.class_cond else None
        den = make_denoiser(teacher.net, teacher.formulation, labels=labels, clip_x0=True,
                            guidance=cfg.train.sample_guidance if labels is not None else 0.0,
                            null_label=m.num_classes if m.class_cond else None)
        sigma_max = min(den.sigma_max, KARRAS_SIGMA_MAX_CAP)
        sigmas, facts = search_sigmas(den, z, den.sigma_min, sigma_max, d.nfe)
        d.sigmas = [float(s) for s in sigmas]
        d.search = {**facts, "seconds": round(time.perf_counter() - t0, 1),
                    "guidance": cfg.train.sample_guidance if labels is not None else None}
        _write(out, cfg, src, teacher.header)
    finally:
        lock.release()
    line = (f"gits: {d.nfe} levels searched on {TRAJECTORIES} trajectories of {src} in {d.search['seconds']:g} s: "
            f"{', '.join(f'{s:.4g}' for s in d.sigmas)}; summed jump error {facts['searched_cost']:.4g} "
            f"(Karras levels: {facts['karras_cost']:.4g})")
    atomic_write(out / "train.log", line + "\n")
    if progress:
        print(line)
    return out


def _write(out: Path, cfg: Config, src: Path, header: dict) -> None:
    """The run: config.json, and one checkpoint (the teacher's EMA weights, its header with this config)."""
    step = int(header.get("step") or 0)
    ckpt = out / "checkpoints" / ckpt_io.step_dir_name(step)
    ckpt.mkdir(parents=True)
    weights = ckpt_io.read_ema(src)
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in weights.items()}, str(ckpt / "ema.safetensors"))
    atomic_write(ckpt / "config.json", json.dumps({**header, "config": cfg.to_dict()}, indent=2))
    atomic_write(out / "config.json", cfg.to_json())
    ckpt_io.point(out / "checkpoints", "last", ckpt.name)
