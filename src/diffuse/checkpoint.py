"""One checkpoint format, loaded without executing pickled code.

A checkpoint is a directory ``OUT/checkpoints/step_NNNNNNN/`` holding:

- ``ema.safetensors``   EMA weights (what sampling uses), fp32, with the config as metadata, so
                        this one file is a complete, shareable model (``diffuse sample FILE``).
- ``model.safetensors`` raw (non-EMA) weights, fp32.
- ``state.safetensors`` optimizer moments and RNG states.
- ``config.json``       the full resolved config, format version, class names.
- ``state.json``        step, images seen, optimizer hyper-parameters, early-stopping counters.

Directories are written under a temporary name, fsynced, then renamed: a crash mid-write never
leaves a half checkpoint under a real name. ``last`` and ``best`` are symlinks replaced
atomically (``os.replace``). Parameter names are the unwrapped module's (no ``_orig_mod.``).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from . import __version__
from .errors import DiffuseError

FORMAT = "diffuse-checkpoint"
FORMAT_VERSION = 1
STEP_PREFIX = "step_"


def step_dir_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:07d}"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)          # safetensors writes 0600; shareable files get the umask's mode
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def unwrap(model: nn.Module) -> nn.Module:
    """The module whose parameter names are stable (torch.compile and DDP wrap the original)."""
    while True:
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if inner is None:
            return model
        model = inner


def weights_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.float() if v.is_floating_point() else v for k, v in unwrap(model).state_dict().items()}


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for key, val in st.items():
            if torch.is_tensor(val):
                tensors[f"opt.{idx}.{key}"] = val
            else:
                scalars[f"{idx}.{key}"] = val
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_state_from(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, val in tensors.items():
        if not name.startswith("opt."):
            continue
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = val
    for name, val in meta.get("scalars", {}).items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = val
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(ckpt_root: Path, step: int, *, model: nn.Module, ema: nn.Module,
                    optimizer: torch.optim.Optimizer, config: dict[str, Any], state: dict[str, Any],
                    extra: dict[str, Any] | None = None) -> Path:
    """Write checkpoint ``step`` atomically and point ``last`` at it. Returns its directory."""
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / step_dir_name(step)
    tmp = ckpt_root / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    header = {"format": FORMAT, "format_version": FORMAT_VERSION, "diffuse_version": __version__,
              "step": step, **(extra or {})}
    full_config = {**header, "config": config}
    meta = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "config": json.dumps(full_config)}
    _save_tensors(tmp / "ema.safetensors", weights_of(ema), meta)
    _save_tensors(tmp / "model.safetensors", weights_of(model), meta)
    opt_tensors, opt_meta = _optimizer_tensors(optimizer)
    rng = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    _save_tensors(tmp / "state.safetensors", {**opt_tensors, **rng})
    _write_json(tmp / "config.json", full_config)
    _write_json(tmp / "state.json", {**state, "step": step, "optimizer": opt_meta})
    _fsync_dir(tmp)
    if final.exists():
        trash = ckpt_root / f".old-{final.name}-{os.getpid()}"
        os.rename(final, trash)
        os.rename(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(tmp, final)
    _fsync_dir(ckpt_root)
    point(ckpt_root, "last", final.name)
    return final


def point(ckpt_root: Path, name: str, target: str) -> None:
    """Atomically make ckpt_root/name a symlink to target (a sibling directory name)."""
    tmp_link = ckpt_root / f".{name}-{os.getpid()}"
    if tmp_link.is_symlink() or tmp_link.exists():
        tmp_link.unlink()
    os.symlink(target, tmp_link)
    os.replace(tmp_link, ckpt_root / name)
    _fsync_dir(ckpt_root)


def pointed(ckpt_root: Path, name: str) -> str | None:
    link = ckpt_root / name
    return os.readlink(link) if link.is_symlink() else None


def clean_temporaries(ckpt_root: Path) -> None:
    """Remove what a crash mid-write left behind (temporary dirs and links); real ones are untouched."""
    if not ckpt_root.is_dir():
        return
    for p in ckpt_root.iterdir():
        if p.name.startswith((".tmp-", ".old-")):
            shutil.rmtree(p, ignore_errors=True)
        elif p.name.startswith(".") and p.is_symlink():
            p.unlink()


def prune(ckpt_root: Path, keep: int) -> None:
    """Keep the newest ``keep`` step checkpoints, never one that ``last`` or ``best`` points at."""
    if keep <= 0:
        return
    protected = {pointed(ckpt_root, "last"), pointed(ckpt_root, "best")}
    steps = sorted(p for p in ckpt_root.glob(f"{STEP_PREFIX}*") if p.is_dir() and not p.is_symlink())
    for p in steps[:-keep]:
        if p.name not in protected:
            shutil.rmtree(p, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# Loading

def resolve(path: str | Path) -> Path:
    """A run directory, a checkpoints/ dir, a checkpoint dir, or a .safetensors file -> the
    checkpoint directory or file to load."""
    p = Path(path)
    if not p.exists():
        raise DiffuseError(f"no such run or checkpoint: {p}")
    if p.is_file():
        if p.suffix != ".safetensors":
            raise DiffuseError(f"{p} is not a checkpoint (expected a run directory, a checkpoint directory "
                               f"or a .safetensors file)")
        return p
    if (p / "ema.safetensors").is_file():
        return p.resolve()
    for candidate in (p / "checkpoints" / "last", p / "last"):
        if candidate.exists():
            return candidate.resolve()
    if (p / "checkpoints").is_dir():
        raise DiffuseError(f"{p} has no finished checkpoint yet (checkpoints/last is missing)")
    raise DiffuseError(f"{p} is not a diffuse run or checkpoint directory")


def read_header(path: Path) -> dict[str, Any]:
    """The stored {format, step, config, ...} of a checkpoint dir or standalone .safetensors."""
    if path.is_dir():
        cfg_path = path / "config.json"
        try:
            header = json.loads(cfg_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise DiffuseError(f"{cfg_path} is missing or corrupt ({e})") from None
    else:
        try:
            from safetensors import safe_open
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
        except (SafetensorError, OSError) as e:
            raise DiffuseError(f"{path} is not a readable safetensors file ({e})") from None
        if meta.get("format") != FORMAT:
            raise DiffuseError(f"{path} is a safetensors file but not a diffuse model (no diffuse metadata)")
        header = json.loads(meta["config"])
    if header.get("format") != FORMAT:
        raise DiffuseError(f"{path} is not a diffuse checkpoint")
    if int(header.get("format_version", 0)) > FORMAT_VERSION:
        raise DiffuseError(f"{path} was written by a newer diffuse (format {header['format_version']}); upgrade diffuse")
    return header


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise DiffuseError(f"cannot read {path}: {e}") from None


def load_weights_into(model: nn.Module, weights: dict[str, torch.Tensor], source: Path | str) -> None:
    """Strict load with a one-line explanation when the architectures differ."""
    target = unwrap(model)
    own = target.state_dict()
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    shapes = [k for k in own if k in weights and tuple(own[k].shape) != tuple(weights[k].shape)]
    if missing or unexpected or shapes:
        detail = []
        if shapes:
            k = shapes[0]
            detail.append(f"{k} is {tuple(weights[k].shape)} there but {tuple(own[k].shape)} here")
        if missing:
            detail.append(f"{len(missing)} parameter(s) missing, e.g. {missing[0]}")
        if unexpected:
            detail.append(f"{len(unexpected)} unexpected, e.g. {unexpected[0]}")
        raise DiffuseError(f"{source} holds a different model ({'; '.join(detail)})")
    target.load_state_dict(weights, strict=True)


def match_param_layout(optimizer: torch.optim.Optimizer) -> None:
    """Give every moment tensor its parameter's strides. Safetensors stores them contiguous (NCHW),
    while channels_last parameters are NHWC in memory, and fused AdamW walks param, grad and moments
    as flat arrays: a layout mismatch would silently pair each weight with another weight's moments."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            st = optimizer.state.get(p, {})
            for key, v in st.items():
                if torch.is_tensor(v) and v.shape == p.shape and v.stride() != p.stride():
                    st[key] = torch.empty_like(p, dtype=v.dtype).copy_(v)


def load_training_state(ckpt: Path, model: nn.Module, ema: nn.Module,
                        optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore model, EMA, optimizer and RNG state from a checkpoint directory; returns state.json."""
    load_weights_into(model, read_tensors(ckpt / "model.safetensors"), ckpt)
    load_weights_into(ema, read_tensors(ckpt / "ema.safetensors"), ckpt)
    try:
        state = json.loads((ckpt / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DiffuseError(f"{ckpt}/state.json is missing or corrupt ({e})") from None
    tensors = read_tensors(ckpt / "state.safetensors")
    try:
        optimizer.load_state_dict(_optimizer_state_from(tensors, state["optimizer"]))
    except (KeyError, ValueError) as e:
        raise DiffuseError(f"{ckpt} optimizer state does not fit this model ({e})") from None
    match_param_layout(optimizer)
    if "rng.torch" in tensors:
        torch.set_rng_state(tensors["rng.torch"])
    return state
