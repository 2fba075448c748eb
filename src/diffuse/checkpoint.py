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
atomically (``os.replace``) and only ever name complete directories. Re-writing an existing step
(resume, then stop at the same step) swaps the new directory in with one ``renameat2`` exchange,
so the name never holds nothing; where the file system cannot exchange, the old copy is parked as
``.old-*`` and ``clean_temporaries`` puts it back if a crash left the name empty (it never deletes
the only copy). Parameter names are the unwrapped module's (no ``_orig_mod.``).

Test hook: ``DIFFUSE_TEST_PAUSE_IN_CKPT=SECONDS`` makes the writer sleep at each stage of a write,
so the fault-injection test can kill it there.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as tensors_to_bytes
from torch import nn

from .version import __version__
from .errors import DiffuseError
from .fsutil import atomic_write, exchange, fsync_dir

FORMAT = "diffuse-checkpoint"
FORMAT_VERSION = 1
STEP_PREFIX = "step_"


def step_dir_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:07d}"


CHECKPOINT_FILES = ("ema.safetensors", "model.safetensors", "state.safetensors", "config.json", "state.json")


def _pause(stage: str) -> None:
    """Fault-injection hook (tests only): sleep at each stage of a checkpoint write."""
    delay = os.environ.get("DIFFUSE_TEST_PAUSE_IN_CKPT")
    if delay:
        time.sleep(float(delay))


def _write_json(path: Path, obj: Any) -> None:
    atomic_write(path, json.dumps(obj, indent=2))


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    atomic_write(path, tensors_to_bytes({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()},
                                        metadata=metadata))


def is_complete(path: Path) -> bool:
    """A real checkpoint directory: all its files present (they are written before it gets its name)."""
    return path.is_dir() and all((path / f).is_file() for f in CHECKPOINT_FILES)


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


def _write_tmp(tmp: Path, step: int, *, model: nn.Module, ema: nn.Module, optimizer: torch.optim.Optimizer,
               config: dict[str, Any], state: dict[str, Any], extra: dict[str, Any] | None) -> None:
    """All files of checkpoint ``step`` into the hidden directory ``tmp``, fsynced."""
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    header = {"format": FORMAT, "format_version": FORMAT_VERSION, "diffuse_version": __version__,
              "step": step, **(extra or {})}
    full_config = {**header, "config": config}
    meta = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "config": json.dumps(full_config)}
    _save_tensors(tmp / "ema.safetensors", weights_of(ema), meta)
    _pause("ema")
    _save_tensors(tmp / "model.safetensors", weights_of(model), meta)
    opt_tensors, opt_meta = _optimizer_tensors(optimizer)
    rng = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    _save_tensors(tmp / "state.safetensors", {**opt_tensors, **rng})
    _pause("state")
    _write_json(tmp / "config.json", full_config)
    _write_json(tmp / "state.json", {**state, "step": step, "optimizer": opt_meta})
    fsync_dir(tmp)
    _pause("written")


def save_checkpoint(ckpt_root: Path, step: int, *, model: nn.Module, ema: nn.Module,
                    optimizer: torch.optim.Optimizer, config: dict[str, Any], state: dict[str, Any],
                    extra: dict[str, Any] | None = None) -> Path:
    """Write checkpoint ``step`` atomically and point ``last`` at it. Returns its directory."""
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / step_dir_name(step)
    tmp = ckpt_root / f".tmp-{final.name}-{os.getpid()}"
    try:
        _write_tmp(tmp, step, model=model, ema=ema, optimizer=optimizer, config=config, state=state, extra=extra)
    except OSError as e:
        # Disk full, quota, I/O error: drop the partial copy (it frees the space it took) and say
        # what is safe. Nothing under a real name was touched.
        shutil.rmtree(tmp, ignore_errors=True)
        good = pointed(ckpt_root, "last")
        raise DiffuseError(f"cannot write checkpoint {final.name} in {ckpt_root}: {e.strerror or e}; the previous "
                           f"checkpoint ({good or 'none yet'}) is intact") from None
    if final.exists():
        # Replace without a moment in which `final` (which `last` may name) holds nothing.
        if exchange(tmp, final):                   # final <-> tmp in one step; tmp now holds the old
            fsync_dir(ckpt_root)
            _pause("exchanged")
            shutil.rmtree(tmp, ignore_errors=True)
        else:                                      # no exchange here: park the old, recoverably
            trash = ckpt_root / f".old-{final.name}-{os.getpid()}"
            os.rename(final, trash)
            _pause("parked")
            os.rename(tmp, final)
            fsync_dir(ckpt_root)
            shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(tmp, final)
    fsync_dir(ckpt_root)
    _pause("renamed")
    point(ckpt_root, "last", final.name)
    return final


def point(ckpt_root: Path, name: str, target: str) -> None:
    """Atomically make ckpt_root/name a symlink to target (a sibling directory name)."""
    tmp_link = ckpt_root / f".{name}-{os.getpid()}"
    if tmp_link.is_symlink() or tmp_link.exists():
        tmp_link.unlink()
    os.symlink(target, tmp_link)
    os.replace(tmp_link, ckpt_root / name)
    fsync_dir(ckpt_root)


def pointed(ckpt_root: Path, name: str) -> str | None:
    link = ckpt_root / name
    return os.readlink(link) if link.is_symlink() else None


def clean_temporaries(ckpt_root: Path) -> None:
    """Tidy what a crash mid-write left behind, deleting nothing that is the only copy.

    ``.tmp-*`` (a write not yet renamed into place, or after an exchange the old copy) goes; a
    parked ``.old-step_N-*`` goes back to ``step_N`` when the crash came before the new copy took
    that name, else it goes; stray temporary links go. A directory a pointer names is kept."""
    if not ckpt_root.is_dir():
        return
    named = {pointed(ckpt_root, "last"), pointed(ckpt_root, "best")}
    for p in sorted(ckpt_root.iterdir()):
        if p.name in named:
            continue
        if p.name.startswith(".old-") and p.is_dir() and not p.is_symlink():
            real = ckpt_root / p.name[len(".old-"):].rsplit("-", 1)[0]
            if not real.exists() and is_complete(p):
                os.rename(p, real)                 # the only complete copy: put it back
                fsync_dir(ckpt_root)
            else:
                shutil.rmtree(p, ignore_errors=True)
        elif p.name.startswith(".tmp-") and p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        elif p.name.startswith(".") and p.is_symlink():
            p.unlink()


def prune(ckpt_root: Path, keep: int) -> None:
    """Keep the newest ``keep`` step checkpoints, never one that ``last`` or ``best`` points at."""
    if keep <= 0:
        return
    protected = {pointed(ckpt_root, "last"), pointed(ckpt_root, "best")}
    # by step number: the names are padded to 7 digits only, so as text step_10000000 < step_9999000
    steps = sorted((p for p in ckpt_root.glob(f"{STEP_PREFIX}*") if p.is_dir() and not p.is_symlink()
                    and p.name[len(STEP_PREFIX):].isdigit()), key=lambda p: int(p.name[len(STEP_PREFIX):]))
    for p in steps[:-keep]:
        if p.name not in protected:
            # hide it first: a crash mid-delete must not leave half a checkpoint under a real name
            trash = ckpt_root / f".tmp-del-{p.name}-{os.getpid()}"
            os.rename(p, trash)
            shutil.rmtree(trash, ignore_errors=True)


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
    if (p / "unet" / "config.json").is_file():
        raise DiffuseError(f"{p} is a diffusers folder; convert it first with `diffuse import {p} OUTDIR`")
    raise DiffuseError(f"{p} is not a diffuse run or checkpoint directory")


def read_header(path: Path) -> dict[str, Any]:
    """The stored {format, step, config, ...} of a checkpoint dir or standalone .safetensors."""
    if path.is_dir():
        cfg_path = path / "config.json"
        try:
            header = json.loads(cfg_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
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
        try:
            header = json.loads(meta["config"])
        except (KeyError, json.JSONDecodeError) as e:
            raise DiffuseError(f"{path}: its diffuse metadata is missing or corrupt ({e})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise DiffuseError(f"{path} is not a diffuse checkpoint")
    version = header.get("format_version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise DiffuseError(f"{path}: format_version must be an integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise DiffuseError(f"{path} was written by a newer diffuse (format {version}); upgrade diffuse")
    if not isinstance(header.get("config"), dict):
        raise DiffuseError(f"{path}: its config must be a JSON object, got {type(header.get('config')).__name__}")
    names = header.get("class_names")
    if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        raise DiffuseError(f"{path}: class_names must be a list of strings")
    if not isinstance(header.get("step", 0), int):
        raise DiffuseError(f"{path}: step must be an integer, got {header.get('step')!r}")
    return header


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise DiffuseError(f"cannot read {path}: {e}") from None


def read_ema(src: Path) -> dict[str, torch.Tensor]:
    """The EMA weights of ``src`` as ``resolve`` returns it: a checkpoint directory's
    ema.safetensors, or the .safetensors file itself (a slim export)."""
    return read_tensors(src / "ema.safetensors" if src.is_dir() else src)


def load_weights_into(model: nn.Module, weights: dict[str, torch.Tensor], source: Path | str) -> None:
    """Strict load with a one-line explanation when the architectures differ."""
    target = unwrap(model)
    own = target.state_dict()
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    shapes = [k for k in own if k in weights and tuple(own[k].shape) != tuple(weights[k].shape)]
    # A float parameter must come from a float tensor (any width: slim files may be half
    # precision); an integer or bool tensor in its place is a foreign or tampered file.
    dtypes = [k for k in own if k in weights and own[k].is_floating_point() != weights[k].is_floating_point()]
    if dtypes and not (missing or unexpected or shapes):
        k = dtypes[0]
        raise DiffuseError(f"{source} holds a different model ({k} is {weights[k].dtype} there but "
                           f"{own[k].dtype} here)")
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
    bad = next((k for k, v in weights.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None:
        raise DiffuseError(f"{source} holds non-finite weights ({bad} has NaN or inf values)")
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
    state = read_state(ckpt / "state.json")
    tensors = read_tensors(ckpt / "state.safetensors")
    try:
        optimizer.load_state_dict(_optimizer_state_from(tensors, state["optimizer"]))
    except (KeyError, ValueError, TypeError, AttributeError, IndexError) as e:
        raise DiffuseError(f"{ckpt} optimizer state does not fit this model ({type(e).__name__}: {e})") from None
    match_param_layout(optimizer)
    restore_rng(tensors, ckpt)
    return state


# state.json fields and the JSON types they must have (None allowed where noted).
STATE_TYPES: dict[str, tuple[type, ...]] = {
    "step": (int,), "best_loss": (int, float), "best_fid": (int, float, type(None)), "bad_epochs": (int,),
    "epoch_loss_sum": (int, float), "epoch_loss_n": (int,), "train_seconds": (int, float),
    "images_seen": (int,), "optimizer": (dict,), "bad_steps": (int,), "data_fingerprint": (dict, type(None)),
    "budget_used_s": (int, float),
}


def read_state(path: Path) -> dict[str, Any]:
    """state.json, with each known field's type checked (a one-line error naming the field)."""
    try:
        state = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DiffuseError(f"{path} is missing or corrupt ({e})") from None
    if not isinstance(state, dict):
        raise DiffuseError(f"{path} must hold a JSON object")
    for key, types in STATE_TYPES.items():
        if key in state and (not isinstance(state[key], types) or (isinstance(state[key], bool) and bool not in types)):
            raise DiffuseError(f"{path}: {key} has the wrong type ({type(state[key]).__name__})")
    if "optimizer" not in state or not isinstance(state.get("step"), int) or state["step"] < 0:
        raise DiffuseError(f"{path} lacks the step or the optimizer record")
    return state


def restore_rng(tensors: dict[str, torch.Tensor], source: Path) -> None:
    """Put back the CPU and (where present on both sides) per-GPU generator states."""
    try:
        if "rng.torch" in tensors:
            torch.set_rng_state(tensors["rng.torch"])
        if torch.cuda.is_available():
            states = [tensors[f"rng.cuda.{i}"] for i in range(torch.cuda.device_count()) if f"rng.cuda.{i}" in tensors]
            if states:
                torch.cuda.set_rng_state_all(states)
    except (RuntimeError, TypeError) as e:
        raise DiffuseError(f"{source}: its RNG state cannot be restored ({e})") from None
