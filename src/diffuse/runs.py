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
