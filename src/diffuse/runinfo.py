"""What ``diffuse info`` says: a run or checkpoint's contents, or this machine's device and precision.
Imports no torch at import time (the CLI imports ``attention_where`` from here)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from .config import Config


def attention_where(attn_resolutions, image_size: int) -> str:
    """Where the UNet has self-attention: the middle block always (models.UNet.mid_attn), plus the
    levels whose feature-map size is listed in attn_resolutions."""
    levels = [f"{r}x{r}" for r in attn_resolutions]
    if not levels:
        return "attention in the middle block only"
    return f"attention at {', '.join(levels)} and in the middle block"


def run_info(path: str | Path) -> dict[str, Any]:
    """{source, step, params, class_names, config, diffuse_version, format_version} of a run dir,
    checkpoint dir or .safetensors file (the header only; no weights are read)."""
    from . import checkpoint as ckpt_io
    from .models import UNet, count_parameters

    src = ckpt_io.resolve(path)
    header = ckpt_io.read_header(src)
    cfg = Config.from_dict(header["config"])
    return {"source": str(src), "step": header.get("step"), "params": count_parameters(UNet(cfg.model)),
            "class_names": header.get("class_names"), "config": cfg.to_dict(),
            "diffuse_version": header.get("diffuse_version"), "format_version": header.get("format_version")}


def run_lines(info: dict[str, Any]) -> list[str]:
    """``run_info`` as the aligned text ``diffuse info RUN`` prints."""
    cfg = Config.from_dict(info["config"])
    return [*_lines(info, cfg), *([f"distilled    {cfg.distill.describe()}"] if cfg.distill.method else []),
            *([f"tuning       {_ect_tuning(cfg)}"] if cfg.distill.consistency else []),
            f"written by   diffuse {info['diffuse_version']} (format {info['format_version']})"]


def _ect_tuning(cfg: Config) -> str:
    """The settings a consistency student was tuned with, as its resume uses them (distill.tuning_settings):
    a student stored before diffuse recorded its own has ECT's CIFAR-10 values."""
    from .distill import tuning_settings

    d = cfg.distill
    s = tuning_settings(d.ect_stages, d.ect_p_mean)
    older = " (ECT's CIFAR-10 values: stored before diffuse recorded its own)" if d.ect_stages is None else ""
    target = ("x_r from the teacher's ODE step (consistency distillation)" if d.ect_target == "teacher"
              else "x_r from the data (consistency training)")
    return f"{s.stages} stages, ln sigma ~ N({s.p_mean:g}, {s.p_std:g}^2), {target}{older}"


def _lines(info: dict[str, Any], cfg: Config) -> list[str]:
    from .objectives import describe

    m, d, t = cfg.model, cfg.diffusion, cfg.train
    return [
        f"checkpoint   {info['source']}",
        f"step         {info['step']} ({(info['step'] or 0) * t.batch_size:,} images seen)",
        f"data         {cfg.data.name} ({m.in_channels}x{m.image_size}x{m.image_size}"
        f"{f'; images written at {cfg.written_size} px, upscaled' if cfg.written_size != m.image_size else ''})",
        f"preset       {cfg.preset}",
        f"parameters   {info['params']:,}",
        f"unet         base {m.base_channels}, mult {','.join(map(str, m.channel_mult))}, "
        f"{m.num_res_blocks} res blocks, {attention_where(m.attn_resolutions, m.inner_size)}, "
        f"dropout {m.dropout}, groups {m.num_groups}"
        f"{f', sees {m.patch_size}x{m.patch_size} patches' if m.patch_size > 1 else ''}",
        f"diffusion    {describe(d)}",
        f"training     batch {t.batch_size}, lr {t.lr:g}{_schedule(t)}, seed {t.seed}",
        f"classes      {', '.join(info['class_names']) if info['class_names'] else 'unconditional'}",
    ]


def _schedule(t) -> str:
    """How the run's learning rate and EMA were planned, for ``info``."""
    ema = f"power EMA of width {t.ema_std:g}" if t.ema_std else f"EMA {t.ema_decay}"
    if t.plan == "budget" and t.time_limit:
        return f" held, then decaying to 0 over the last {t.cooldown:.0%} of a {t.time_limit:g}-min budget, {ema}"
    return f", {ema}"


def info_text(run: str | Path | None, device_flag: str = "auto", *, as_json: bool = False) -> str:
    """What ``diffuse info`` prints: ``run``'s contents (``run_info``), or without a run this machine
    (``machine_info`` on --device ``device_flag``); as indented JSON when ``as_json``."""
    import json
    if run is not None:
        info = run_info(run)
        return json.dumps(info, indent=2) if as_json else "\n".join(run_lines(info))
    from . import device as dev
    device = dev.pick_device(device_flag)
    return json.dumps(machine_info(device), indent=2) if as_json else "\n".join(dev.info_lines(device))


def machine_info(device) -> dict[str, Any]:
    """This machine for ``diffuse info --json``: the device, the precision ``auto`` picks and why,
    and the measured bf16/fp32 probe on the CPU."""
    from . import device as dev

    choice, probe, channels_last = dev.auto_choice(device)
    return {"device": str(device), "cpu": dev.cpu_model(), "amx": dev.cpu_has_amx(),
            "avx512_bf16": dev.cpu_has_avx512_bf16(), "precision": choice.name, "reason": choice.reason,
            "channels_last": channels_last,
            "probe": {**asdict(probe), "speedup": probe.speedup} if probe else None}
