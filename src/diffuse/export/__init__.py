"""Share a model: diffusers folders out and in, and the slim weights file.

Three conversions, none of which imports diffusers (its folders are JSON + safetensors):

- ``export_diffusers``: a run's EMA weights as a ``UNet2DModel`` + ``DDPMScheduler`` folder that
  ``DDPMPipeline`` / ``DDIMPipeline.from_pretrained`` load, with a model card (README.md) and a grid.
- ``export_safetensors``: one slim file (EMA weights, config in the metadata) that every command
  taking a run accepts (``generate.load``).
- ``import_diffusers``: the reverse, into a diffuse checkpoint directory.

``export`` picks the first two by OUT (``diffuse export``); ``export_lines`` / ``import_lines`` are
what the commands print.

The pieces: ``mapping`` (our config and parameter names as diffusers', both ways), ``card`` (the
model card and the config a published folder carries); here, the entry points and their files.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save, save_file

from ..version import __version__
from .. import checkpoint as ckpt_io
from ..config import Config, ModelConfig
from ..errors import DiffuseError
from ..fsutil import atomic_write, exchange, fsync_dir
from ..objectives import default_sampling
from ..outputs import check_dir, check_file
from .card import run_dir_of, card_facts, model_card, public_config
from .mapping import (DIFFUSERS_VERSION, diffusion_config_from_scheduler, from_diffusers, model_config_from_unet,
                      scheduler_config, to_diffusers, unet_config)

EXPORT_FORMAT = "diffuse-export"
UNET_FILE = "diffusion_pytorch_model.safetensors"


# ----------------------------------------------------------------------------------------------
# Reading the source run, writing the output folder

def _load_source(path: str | Path) -> tuple[Path, dict[str, Any], Config, dict[str, torch.Tensor]]:
    src = ckpt_io.resolve(path)
    header = ckpt_io.read_header(src)
    cfg = Config.from_dict(header["config"])
    weights = ckpt_io.read_ema(src)
    weights = {k: v.float() if v.is_floating_point() else v for k, v in weights.items()}
    return src, header, cfg, weights



def _prepare_out(out: Path, overwrite: bool, marker: str) -> Path:
    """A fresh temporary sibling of ``out`` to write into; ``_finish`` moves it into place.
    A non-empty ``out`` is refused unless --overwrite, and even then only if it holds ``marker``
    (a previous export/import), so no unrelated folder is ever deleted."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise DiffuseError(f"{out} already exists and is not empty; choose another OUTDIR or pass --overwrite")
        if not (out / marker).is_file():
            raise DiffuseError(f"refusing to --overwrite {out}: it does not look like an earlier output (no {marker})")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".tmp-{out.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def _finish(tmp: Path, out: Path) -> None:
    """Put the finished folder at ``out``. Replacing an earlier output swaps the two in one step
    (fsutil.exchange), so ``out`` never names nothing; where the file system cannot exchange, the
    old folder is parked beside it first (recoverable by hand if the process dies between renames)."""
    if out.exists():
        if exchange(tmp, out):                  # out <-> tmp: tmp now holds the old folder
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            trash = out.parent / f".old-{out.name}-{os.getpid()}"
            os.rename(out, trash)
            os.rename(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(tmp, out)
    fsync_dir(out.parent)


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")



def _read_json(path: Path, folder: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DiffuseError(f"{folder} is not a diffusers UNet2DModel + DDPMScheduler folder: "
                           f"{path.relative_to(folder)} is missing")
    try:
        d = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DiffuseError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise DiffuseError(f"{path} must hold a JSON object")
    return d



# ----------------------------------------------------------------------------------------------
# Export


def export_diffusers(source: str | Path, out: str | Path, *, overwrite: bool = False,
                     eval_json: str | Path | None = None, license: str = "mit",
                     grid_device: torch.device | None = None) -> dict[str, Any]:
    """Write ``out``: model_index.json, unet/, scheduler/, README.md (model card), samples.png.
    Returns a summary {out, params, scheduler, card}."""
    out = check_dir(out, "OUTDIR")
    src, header, cfg, weights = _load_source(source)
    if cfg.distill.method == "gits":
        raise DiffuseError(f"{source} is a gits run: its searched noise levels do not travel in a diffusers folder; "
                           f"export its teacher ({cfg.distill.teacher}), or `diffuse export RUN OUT.safetensors`")
    if cfg.distill.method:
        raise DiffuseError(f"{source} is a distilled run: diffusers' ConsistencyModelPipeline feeds its UNet EDM's "
                           f"inputs (x / sqrt(sigma^2 + 0.25), timestep 250 ln sigma) and mixes its output with "
                           f"EDM's c_skip/c_out, which this student does not compute (docs/export.md); share it with "
                           f"`diffuse export RUN OUT.safetensors`")
    unet_cfg = unet_config(cfg)                  # refusals happen here, before anything is written
    sched_cfg = scheduler_config(cfg)
    evaluation = _read_eval(eval_json) if eval_json else None
    mapped = to_diffusers(weights)
    published = public_config(cfg)              # the folder is meant to be shared: no local paths in it
    unet_cfg["_diffuse"] = {"format": EXPORT_FORMAT, "version": 1, "diffuse_version": __version__,
                            "step": header.get("step"), "class_names": header.get("class_names"),
                            "null_class": cfg.model.num_classes if cfg.model.class_cond else None,
                            "config": published.to_dict()}
    tmp = _prepare_out(out, overwrite, "model_index.json")
    try:
        _write_json(tmp / "model_index.json", {"_class_name": "DDPMPipeline", "_diffusers_version": DIFFUSERS_VERSION,
                                              "scheduler": ["diffusers", "DDPMScheduler"],
                                              "unet": ["diffusers", "UNet2DModel"]})
        (tmp / "unet").mkdir()
        (tmp / "scheduler").mkdir()
        _write_json(tmp / "unet" / "config.json", unet_cfg)
        save_file({k: v.contiguous() for k, v in mapped.items()}, str(tmp / "unet" / UNET_FILE), metadata={"format": "pt"})
        _write_json(tmp / "scheduler" / "scheduler_config.json", sched_cfg)
        grid_from = _copy_grid(src, cfg, header, tmp / "samples.png", grid_device)
        facts = card_facts(src, header, cfg, weights, evaluation)
        facts["grid_from"] = grid_from
        (tmp / "README.md").write_text(model_card(facts, published, header, license=license))
        _finish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"out": str(out), "params": facts["params"],
            "betas": "trained_betas" if sched_cfg["trained_betas"] else sched_cfg["beta_schedule"]}



def _copy_grid(src: Path, cfg: Config, header: dict[str, Any], dest: Path, device: torch.device | None) -> str:
    """The run's own grid of the exported step if there is one, else 16 fresh EMA samples
    (`diffuse sample`'s default sampler and steps for the run's formulation)."""
    run, step = run_dir_of(src), header.get("step")
    if run is not None and step is not None and (run / "samples" / f"step_{step:07d}.png").is_file():
        shutil.copyfile(run / "samples" / f"step_{step:07d}.png", dest)
        return f"the run's grid at step {step:,} (DDIM, {cfg.train.sample_steps} steps)"
    from ..generate import cycle_labels, generate, load
    from ..images import save_grid
    loaded = load(src, device or torch.device("cpu"))
    labels = cycle_labels(range(cfg.model.num_classes), 16) if cfg.model.class_cond else None
    sampler, steps = default_sampling(cfg.diffusion)
    images, _ = generate(loaded, n=16, seed=0, sampler=sampler, steps=steps, labels=labels,
                         guidance=cfg.train.sample_guidance if labels is not None else 0.0)
    save_grid(images, dest, nrow=4)
    return (f"16 images drawn at export ({sampler}, {steps} steps, seed 0"
            + (", classes cycled" if labels is not None else "") + ")")



def _read_eval(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    try:
        d = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DiffuseError(f"--eval {p}: not a readable JSON file from `diffuse eval --json` ({e})") from None
    if not isinstance(d, dict) or not ({"fid", "sweep", "classifier_accuracy"} & set(d)):
        raise DiffuseError(f"--eval {p}: expected the output of `diffuse eval --json` (no fid or accuracy in it)")
    return d



def export_safetensors(source: str | Path, out: str | Path, *, precision: str = "fp32",
                       overwrite: bool = False) -> dict[str, Any]:
    """One file: the EMA weights with the checkpoint header (config, class names) as metadata.

    precision bf16 stores the tensors that autocast runs in bf16 (conv and linear weights and
    biases) as bf16 and keeps GroupNorm and embedding tables in fp32, so sampling the file with
    ``--precision bf16`` gives exactly the images the run gives with ``--precision bf16``."""
    if precision not in ("fp32", "bf16"):
        raise DiffuseError(f"--precision must be fp32 or bf16, got {precision!r}")
    out = check_file(out, (".safetensors",), "OUT")
    src, header, cfg, weights = _load_source(source)
    if out.exists() and not overwrite:
        raise DiffuseError(f"{out} already exists; choose another name or pass --overwrite")

    def keep_fp32(name: str) -> bool:
        return name.startswith(("class_emb.", "norm_out.")) or re.search(r"\.norm\d?\.", name) is not None

    tensors = {k: (v if precision == "fp32" or keep_fp32(k) else v.to(torch.bfloat16)).contiguous()
               for k, v in weights.items()}
    full = {**header, "precision": precision, "exported_from": str(src)}
    meta = {"format": ckpt_io.FORMAT, "format_version": str(ckpt_io.FORMAT_VERSION), "config": json.dumps(full)}
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, save(tensors, metadata=meta))
    return {"out": str(out), "bytes": out.stat().st_size, "precision": precision,
            "params": sum(v.numel() for v in weights.values())}



def export(source: str | Path, out: str | Path, *, format: str | None = None, precision: str = "fp32",
           eval_json: str | Path | None = None, license: str = "mit", overwrite: bool = False) -> dict[str, Any]:
    """``diffuse export``: a diffusers folder (``export_diffusers``) or one slim file
    (``export_safetensors``); ``format`` None picks by OUT (.safetensors: the file). Options of the
    other format are refused, one line each. Returns the summary with its "format"."""
    fmt = format or ("safetensors" if Path(out).suffix == ".safetensors" else "diffusers")
    if fmt == "safetensors":
        if eval_json or license != "mit":
            raise DiffuseError("--eval and --license describe a diffusers folder's model card; not --format safetensors")
        return {"format": fmt, **export_safetensors(source, out, precision=precision, overwrite=overwrite)}
    if Path(out).suffix == ".safetensors":
        raise DiffuseError(f"--format diffusers writes a folder, but {out} names a .safetensors file")
    if precision != "fp32":
        raise DiffuseError("--precision applies to --format safetensors (diffusers folders hold fp32 weights)")
    return {"format": fmt, **export_diffusers(source, out, overwrite=overwrite, eval_json=eval_json, license=license)}


def export_lines(r: dict[str, Any]) -> list[str]:
    """What ``diffuse export`` prints about ``export``'s summary ``r``."""
    if r["format"] == "safetensors":
        return [f"wrote {r['out']} ({r['params']:,} parameters, {r['precision']}, {r['bytes'] / 2**20:.1f} MiB)"]
    return [f"wrote {r['out']}: UNet2DModel ({r['params']:,} parameters) + DDPMScheduler ({r['betas']}), "
            f"README.md model card, samples.png",
            f"load it: DDIMPipeline.from_pretrained({str(r['out'])!r}); upload: huggingface-cli upload USER/NAME "
            f"{r['out']}"]


# ----------------------------------------------------------------------------------------------
# Import


def import_diffusers(folder: str | Path, out: str | Path, *, overwrite: bool = False,
                     data: str | None = None) -> dict[str, Any]:
    """Write a diffuse checkpoint directory (ema.safetensors + config.json, and model_config.json
    for fine-tuning) from a UNet2DModel + DDPMScheduler folder. Returns a summary."""
    folder, out = Path(folder), check_dir(out, "OUTDIR")
    u, s = _read_folder_configs(folder)
    model = model_config_from_unet(u)
    diffusion = diffusion_config_from_scheduler(s)
    wfile = folder / "unet" / UNET_FILE
    theirs = _read_unet_weights(wfile)
    cfg, own = _import_config(u, s, model, diffusion, data)
    net = _build_model(cfg, folder)
    weights = from_diffusers(theirs, net)
    ckpt_io.load_weights_into(net, weights, wfile)                         # shapes and names, strictly

    header = {"format": ckpt_io.FORMAT, "format_version": ckpt_io.FORMAT_VERSION, "diffuse_version": __version__,
              **({"step": own["step"]} if own.get("step") is not None else {}),
              "class_names": own.get("class_names"), "params": sum(v.numel() for v in weights.values()),
              "data": cfg.data.name, "imported_from": str(folder.resolve())}
    tmp = _prepare_out(out, overwrite, "ema.safetensors")
    try:
        meta = {"format": ckpt_io.FORMAT, "format_version": str(ckpt_io.FORMAT_VERSION),
                "config": json.dumps({**header, "config": cfg.to_dict()})}
        save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp / "ema.safetensors"), metadata=meta)
        _write_json(tmp / "config.json", {**header, "config": cfg.to_dict()})
        arch = {k: v for k, v in cfg.to_dict()["model"].items() if k not in ("image_size", "in_channels", "num_classes")}
        _write_json(tmp / "model_config.json", {"model": arch, "diffusion": cfg.to_dict()["diffusion"]})
        _finish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"out": str(out), "params": header["params"], "config": cfg, "own_export": bool(own)}


def import_lines(r: dict[str, Any]) -> list[str]:
    """What ``diffuse import`` prints about ``import_diffusers``' summary ``r``."""
    cfg = r["config"]
    m = cfg.model
    return [f"wrote {r['out']}: {r['params']:,} parameters, {m.in_channels}x{m.image_size}x{m.image_size}, "
            f"{cfg.diffusion.schedule} schedule (T={cfg.diffusion.timesteps})"
            f"{', diffuse config restored from the export' if r['own_export'] else ''}",
            f"sample it: diffuse sample {r['out']}; fine-tune: diffuse train --config "
            f"{Path(r['out']) / 'model_config.json'} --init-from {r['out']} --data DATA ..."]


def _read_folder_configs(folder: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(unet/config.json, scheduler/scheduler_config.json) of a diffusers folder, after checking
    that its model_index.json (where there is one) names a UNet2DModel and a DDPM/DDIM scheduler."""
    if not folder.is_dir():
        raise DiffuseError(f"{folder} is not a directory (expected a diffusers folder with unet/ and scheduler/)")
    index_path = folder / "model_index.json"
    if index_path.is_file():
        index = _read_json(index_path, folder)
        unet_ref, sched_ref = index.get("unet"), index.get("scheduler")
        if not unet_ref or list(unet_ref)[-1] != "UNet2DModel":
            raise DiffuseError(f"{index_path}: its unet is {unet_ref}, not a UNet2DModel")
        if not sched_ref or list(sched_ref)[-1] not in ("DDPMScheduler", "DDIMScheduler"):
            raise DiffuseError(f"{index_path}: its scheduler is {sched_ref}, not a DDPMScheduler")
    return (_read_json(folder / "unet" / "config.json", folder),
            _read_json(folder / "scheduler" / "scheduler_config.json", folder))


def _read_unet_weights(wfile: Path) -> dict[str, torch.Tensor]:
    if not wfile.is_file():
        others = sorted(p.name for p in wfile.parent.glob("diffusion_pytorch_model*"))
        raise DiffuseError(f"{wfile} is missing" + (f" (found {', '.join(others)}: diffuse reads only the fp32 "
                                                   f".safetensors file, not pickles)" if others else ""))
    try:
        return load_file(str(wfile))
    except (SafetensorError, OSError, ValueError) as e:
        raise DiffuseError(f"cannot read {wfile}: {e}") from None


def _import_config(u: dict[str, Any], s: dict[str, Any], model: ModelConfig, diffusion: dict[str, Any],
                   data: str | None) -> tuple[Config, dict[str, Any]]:
    """(the imported run's config, {step, class_names} if the folder is diffuse's own unedited
    export, else {}). A foreign folder gets preset "imported" and data "unknown" unless ``data``."""
    cfg = Config(preset="imported")
    cfg.model = model
    for k, v in diffusion.items():
        setattr(cfg.diffusion, k, v)
    mine = u.get("_diffuse") if isinstance(u.get("_diffuse"), dict) else None
    own: dict[str, Any] = {}
    if mine and mine.get("format") == EXPORT_FORMAT:
        # Our own export: its full config is used when it maps to exactly what the folder says
        # (otherwise someone edited the folder, and the folder wins).
        try:
            stored = Config.from_dict(mine["config"])
            same = ({k: v for k, v in unet_config(stored).items() if not k.startswith("_")}
                    == {k: v for k, v in u.items() if not k.startswith("_")}
                    and {k: v for k, v in scheduler_config(stored).items() if not k.startswith("_")}
                    == {k: v for k, v in s.items() if not k.startswith("_")})
        except (DiffuseError, KeyError, TypeError, ValueError):
            same = False
        if same:
            cfg = stored
            own = {"step": mine.get("step"), "class_names": mine.get("class_names")}
    if data is not None:
        cfg.data.name = data
    elif cfg.preset == "imported":
        cfg.data.name = "unknown"
    if cfg.preset == "imported":
        cfg.data.image_size, cfg.data.channels = model.image_size, model.in_channels
    return cfg, own


def _build_model(cfg: Config, folder: Path) -> torch.nn.Module:
    from ..config import validate, validate_resolution
    from ..models import UNet

    try:
        validate(cfg)
        validate_resolution(cfg.model)
        return UNet(cfg.model)
    except (DiffuseError, ValueError, RuntimeError) as e:
        raise DiffuseError(f"{folder}: the model cannot be built in diffuse ({e})") from None
