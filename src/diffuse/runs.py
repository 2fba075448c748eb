"""The config a training run starts with, from settings given by name: the ``diffuse train`` flags
and the Python API's keyword arguments both come here, so --resume, --init-from, --preset and
--config mean the same in both.

Order (later wins): dataclass defaults < preset < config file < the settings given; a resumed run
keeps its stored config and takes only the changes ``train.load_resume_config`` allows.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from .config import Config, load_config_file, resolve
from .errors import DiffuseError


def default_out(cfg: Config) -> str:
    """Where a run goes when no --out is given: runs/<preset>-<YYYYmmdd-HHMMSS> (local time)."""
    return str(Path("runs") / f"{cfg.preset}-{time.strftime('%Y%m%d-%H%M%S')}")


def run_config(overrides: dict[str, dict[str, Any]] | None = None, *, preset: str | None = None,
               config: str | Path | None = None, resume: str | Path | None = None,
               init_from: str | Path | None = None) -> Config:
    """The resolved config of a run: ``overrides`` {section: {field: value}} (config.overrides_from_flags)
    over ``config`` (a JSON file) over ``preset`` (default: chosen by the data); with ``resume`` (a run
    directory) the run's stored config, which --preset/--config/--init-from may not change."""
    overrides = {section: dict(values) for section, values in (overrides or {}).items()}
    if resume:
        if preset or config or init_from:
            raise DiffuseError("--resume continues a run as it was configured; drop --preset/--config/--init-from")
        from .train import load_resume_config           # torch: only when a run is resumed
        overrides.setdefault("train", {})["out"] = str(resume)
        return load_resume_config(Path(resume), overrides)
    file_overrides = load_config_file(config) if config else None
    cfg = resolve(preset, overrides.get("data", {}).get("name"), file_overrides, overrides)
    if cfg.train.out is None:
        cfg.train.out = default_out(cfg)
    return cfg


# A student is tuned at a tenth of its teacher's learning rate: ECT's CIFAR-10 setting (Geng et al.
# 2024, locuslab/ect run_ecm.sh: 1e-4 for a teacher trained at 1e-3).
DISTILL_LR_FACTOR = 0.1
# Without --steps or --time-limit, a student gets a quarter of its teacher's steps: a consistency
# step costs two forward passes and one backward, so about a third of the teacher's training time.
DISTILL_STEPS_FRACTION = 0.25


def distill_config(teacher: str | Path, out: str | Path | None, *, method: str = "ect", nfe: int = 2,
                   steps: int | None = None, time_limit: float | None = None, target: str | None = None,
                   guidance: float | None = None, train: dict[str, Any] | None = None) -> Config:
    """The config of a run that distils ``teacher`` (a run or checkpoint of an ordinary diffusion run):
    the teacher's data, model and formulation, a fresh training section (its batch, clipping,
    label dropout and seed; lr x DISTILL_LR_FACTOR; power EMA; no FID during the run), the
    ``distill`` section naming the method, NFE and teacher. Length: ``steps``, or ``time_limit``
    minutes as a budget plan, or DISTILL_STEPS_FRACTION of the teacher's steps. ``train``: other
    train fields to set (batch_size, lr, seed, device, precision, threads, ...)."""
    from . import checkpoint as ckpt_io
    from .budget import COOLDOWN_FRACTION
    from .config import apply_overrides, start_budget, validate
    from .runlog import read_metrics

    src = ckpt_io.resolve(teacher)
    header = ckpt_io.read_header(src)
    if not isinstance(header.get("config"), dict):
        raise DiffuseError(f"{teacher}: its checkpoint stores no run config; is it a diffuse checkpoint?")
    cfg = Config.from_dict(header["config"])
    if cfg.distill.method is not None:
        raise DiffuseError(f"{teacher} is itself a distilled run ({cfg.distill.method}, {cfg.distill.nfe} NFE); "
                           f"distil its teacher ({cfg.distill.teacher}) instead")
    t = cfg.train
    teacher_steps = int(header.get("step") or 0)
    t.lr *= DISTILL_LR_FACTOR
    t.warmup_steps, t.fid_every, t.resolved_precision, t.plan, t.size_model = 0, None, None, "steps", False
    t.epochs, t.time_limit, t.sample_every, t.ckpt_every, t.patience = None, None, None, None, None
    t.ema_std = t.ema_std or 0.1
    t.cooldown = COOLDOWN_FRACTION               # the teacher's (or an old config's) cool-down is not the student's
    t.steps = steps or max(1, round(teacher_steps * DISTILL_STEPS_FRACTION))
    name = src.parts[-3] if src.is_dir() else src.stem         # RUN/checkpoints/step_N, or FILE.safetensors
    t.out = str(out) if out is not None else str(Path("runs") / f"{name}-{method}{nfe}")
    if train:
        apply_overrides(cfg, {"train": train}, source="distill")
    if time_limit is not None:
        start_budget(t, time_limit)
    fids = [r for r in read_metrics(src.parent.parent / "metrics.jsonl") if r.get("fid") is not None] \
        if src.is_dir() else []
    d = cfg.distill
    d.method, d.nfe, d.teacher, d.teacher_step = method, nfe, str(src), teacher_steps
    if method == "ect":
        from .distill import TUNING_DEFAULTS
        d.ect_stages, d.ect_p_mean = TUNING_DEFAULTS["stages"], TUNING_DEFAULTS["p_mean"]
        d.ect_target = target or ("teacher" if guidance is not None else TUNING_DEFAULTS["target"])
        if guidance is not None:
            if not cfg.model.class_cond:
                raise DiffuseError(f"--distill-guidance needs a class-conditional teacher; {teacher} was trained without --class-cond")
            if d.ect_target != "teacher":
                raise DiffuseError("--distill-guidance is distilled from the guided teacher's ODE step: use it with "
                                   "--target teacher (the data has no guidance to learn from)")
            d.guidance = guidance
            t.sample_guidance = 0.0          # the student's samples are guided by its weights, not again
    elif target is not None or guidance is not None:
        raise DiffuseError(f"--{'target' if target is not None else 'distill-guidance'} is a setting of --method ect; "
                           f"{method} trains nothing")
    if method == "gits":
        from .objectives import default_sampling
        d.sampler = default_sampling(cfg.diffusion)[0]       # the teacher's own default, on the searched levels
    d.teacher_fid, d.teacher_fid_n = (fids[-1]["fid"], fids[-1].get("fid_n")) if fids else (None, None)
    validate(cfg)
    return cfg


# Settings of a distillation that a resumed one may change (the others are its teacher's and its plan's).
DISTILL_RESUMABLE = ("device", "threads", "log_every", "sample_every", "ckpt_every", "keep")
DISTILL_SETTINGS = ("batch_size", "lr", "seed", "grad_clip", "ema_std", "precision", *DISTILL_RESUMABLE)


def distill_run_config(teacher: str | Path | None, out: str | Path | None, *, nfe: int = 2, method: str = "ect",
                       steps: int | None = None, time_limit: float | None = None, resume: str | Path | None = None,
                       target: str | None = None, guidance: float | None = None,
                       train: dict[str, Any] | None = None) -> Config:
    """The config `diffuse distill` and ``diffuse.distill`` run: a new distillation of ``teacher``
    (``distill_config``), or with ``resume`` the distilled run in that directory, continued with the
    changes DISTILL_RESUMABLE allows (``time_limit`` adds minutes to a budget plan). ``train``: train
    fields from DISTILL_SETTINGS."""
    train = dict(train or {})
    unknown = sorted(set(train) - set(DISTILL_SETTINGS))
    if unknown:
        raise DiffuseError(f"distill: unknown setting {unknown[0]!r}; choose from {', '.join(sorted(DISTILL_SETTINGS))}")
    if resume is None:
        if teacher is None:
            raise DiffuseError("name the teacher run to distil (diffuse distill RUN --out DIR), or --resume OUT")
        return distill_config(teacher, out, method=method, nfe=nfe, steps=steps, time_limit=time_limit,
                              target=target, guidance=guidance, train=train)
    if teacher is not None:
        raise DiffuseError("--resume continues a distillation as it was configured; drop the teacher argument")
    if target is not None or guidance is not None:
        flag = "--target" if target is not None else "--distill-guidance"
        raise DiffuseError(f"--resume continues a distillation with the settings it started with; drop {flag}")
    changes = {k: v for k, v in train.items() if k in DISTILL_RESUMABLE}
    changes.update({"time_limit": time_limit} if time_limit is not None else {})
    changes.update({"steps": steps} if steps is not None else {})
    cfg = run_config({"train": changes}, resume=resume)
    if cfg.distill.method is None:
        raise DiffuseError(f"{resume} is not a distilled run; continue it with `diffuse train --resume`")
    if cfg.distill.ect_target == "teacher":
        from .train import teacher_checkpoint
        teacher_checkpoint(cfg)                 # refused here, before the run prints or writes anything
    return cfg                                  # a gits run: train() says it has nothing to resume
