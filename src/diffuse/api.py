"""diffuse from Python: train, load, sample and score, with the CLI's settings and results.

``import diffuse`` exposes these names lazily (``diffuse/__init__.py``): torch loads on first use.

    run = diffuse.fit(data="digits", steps=2000, out="runs/digits")  # train, as `diffuse train`
    model = diffuse.load(run)                     # a run, checkpoint, .safetensors or diffusers folder
    images = model.sample(16, seed=0)             # uint8 [16, H, W, C], as `diffuse sample`
    model.save_grid(images, "grid.png")
    print(diffuse.fid_kid(images, run)["fid"])    # FID against the run's training data

Why these names: ``diffuse.train``, ``diffuse.fid`` and ``diffuse.export`` are modules of the package,
and a function of the same name would be replaced by the module the first time anything imports it,
so training is ``fit`` and scoring ``fid_kid`` (tests/test_api.py keeps the two name sets apart).

Every function reuses the code path of its CLI command (``runs.run_config``, ``generate.load``,
``generate.generate`` with one ``SamplingSpec``, ``evaluation``), so the same
settings give the same run and the same seed the same images. Bad input raises ``DiffuseError`` with
a one-line message.
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import os
from dataclasses import fields
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np
import torch

from . import cli
from .config import SECTIONS, Config, _coerce
from .errors import DiffuseError

PathLike = Union[str, "os.PathLike[str]"]

# The train flags that make no sense as a call's keyword: --dry-run is train_config(), --debug and
# --help are about the terminal.
_NOT_KEYWORDS = ("debug", "help", "dry_run")


# ----------------------------------------------------------------------------------------------
# Training

def _train_options() -> dict[str, argparse.Action]:
    """keyword -> the ``diffuse train`` flag's argparse action: ``--class-cond`` is ``class_cond``,
    ``--data`` is ``data``. Read from the CLI's own parser, so there is no second list of settings."""
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    train = sub.choices["train"]
    options = {}
    for action in train._actions:
        for flag in action.option_strings:
            if flag.startswith("--") and not flag.startswith("--no-") or flag == "--no-progress":
                options[flag[2:].replace("-", "_")] = action
    return {k: v for k, v in options.items() if k not in _NOT_KEYWORDS}


def _train_args(settings: dict[str, Any]) -> argparse.Namespace:
    """The Namespace ``diffuse train`` would parse from these keyword settings. Values keep their
    Python types (``channel_mult=(1, 2)`` or ``"1,2"``); ``config.resolve`` coerces and checks them
    as it does a --config file's."""
    options = _train_options()
    args = argparse.Namespace(**{a.dest: a.default for a in options.values()
                                 if a.default is not argparse.SUPPRESS})
    for key, value in settings.items():
        action = options.get(key)
        if key == "dry_run":
            raise DiffuseError("dry_run: call diffuse.train_config(...) for the config without training")
        if action is None:
            near = difflib.get_close_matches(key, options, n=3)
            hint = f"; did you mean {' or '.join(near)}?" if near else "; see `diffuse train --help`"
            raise DiffuseError(f"unknown training setting {key!r}{hint}")
        if isinstance(value, os.PathLike) or (isinstance(value, str) and value.startswith("~")):
            value = os.path.expanduser(os.fspath(value))
        if action.nargs == 0 and not isinstance(action, argparse.BooleanOptionalAction):
            if not isinstance(value, bool):                          # --overwrite, --no-progress
                raise DiffuseError(f"{key} must be True or False, got {value!r}")
        elif "." in action.dest:                # a config field: checked here so the error names the call
            section, name = action.dest.split(".")
            value = _coerce(value, next(f for f in fields(SECTIONS[section]) if f.name == name), "diffuse.fit")
        elif value is not None and not isinstance(value, str):
            raise DiffuseError(f"{key} must be a string or a path, got {type(value).__name__}")
        setattr(args, action.dest, value)
    return args


def _run_config(args: argparse.Namespace) -> Config:
    """The config ``diffuse train`` builds from these flags (runs.run_config, as cmd_train calls it)."""
    from .config import overrides_from_flags
    from .runs import run_config

    return run_config(overrides_from_flags(args), preset=args.preset, config=args.config, resume=args.resume,
                      init_from=args.init_from)


def train_config(**settings: Any) -> Config:
    """The resolved config ``fit(**settings)`` would train with, without training (``diffuse train
    --dry-run``). Defaults < ``preset`` < ``config`` file < the other settings."""
    return _run_config(_train_args(settings))


def fit(**settings: Any) -> Path:
    """Train a model, exactly as ``diffuse train`` with the same settings; returns the run directory.

    Settings are ``diffuse train``'s flags with ``_`` for ``-``: ``data`` ("digits", "mnist",
    "fashion-mnist", "cifar10" or a folder of images), ``preset``, ``steps``, ``epochs``,
    ``time_limit`` (minutes; without ``steps``/``epochs`` a budget plan, docs/budgets.md), ``out``, ``batch_size``, ``lr``, ``class_cond``, ``seed``, ``device``,
    ``config`` (a JSON file), ``resume`` (a run to continue), ``init_from``, ``overwrite``,
    ``no_progress`` and every other field in ``diffuse train --help``. An unknown name raises
    ``DiffuseError`` naming the nearest valid ones. Without ``out`` the run goes to
    ``runs/<preset>-<time>``. Pass the returned path to ``load`` or ``fid_kid``.
    """
    from .train import train

    args = _train_args(settings)
    cfg = _run_config(args)
    return Path(train(cfg, resume=bool(args.resume), init_from=args.init_from, overwrite=args.overwrite,
                      progress=not args.no_progress))


def fit_distilled(teacher: PathLike | None = None, out: PathLike | None = None, *, nfe: int = 2, method: str = "ect",
            steps: int | None = None, time_limit: float | None = None, resume: PathLike | None = None,
            target: str | None = None, guidance: float | None = None, overwrite: bool = False,
            no_progress: bool = False, **train: Any) -> Path:
    """Distil ``teacher`` (a diffusion run or checkpoint) into a student that samples in ``nfe``
    network calls, exactly as ``diffuse distill``; returns the student's run directory, an ordinary
    run (``load(...).sample`` defaults to its NFE). ``steps`` or ``time_limit`` (minutes, a budget
    plan) set the length (default: a quarter of the teacher's steps); ``resume`` continues a
    distillation instead (then ``time_limit`` adds minutes to a budget); ``target`` "data" or
    "teacher" as ``--target`` (default: distill.TUNING_DEFAULTS); ``guidance`` w as ``--distill-guidance``
    (a class-conditional teacher; distilled into the student). ``train``: batch_size, lr,
    seed, grad_clip, ema_std, device, precision, threads, log_every, sample_every, ckpt_every, keep.
    Bad input raises DiffuseError (docs/distill.md)."""
    from .runs import distill_run_config
    from .train import train as run_training

    cfg = distill_run_config(teacher, out, nfe=nfe, method=method, steps=steps, time_limit=time_limit,
                             resume=resume, target=target, guidance=guidance, train=train)
    return Path(run_training(cfg, resume=resume is not None, overwrite=overwrite, progress=not no_progress))


# ----------------------------------------------------------------------------------------------
# The model

def _check_int(name: str, value: Any, least: int | None = None, none: bool = False) -> None:
    if value is None and none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise DiffuseError(f"{name} must be an integer, got {value!r}")
    if least is not None and value < least:
        raise DiffuseError(f"{name} must be at least {least}, got {value}")


def _check_number(name: str, value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float, np.number))):
        raise DiffuseError(f"{name} must be a number, got {value!r}")


def _class_spec(class_: int | str | Sequence[int | str] | None) -> str | None:
    """class_ as the CLI's --class text: 3 -> "3", ["cat", 2] -> "cat,2", "all" stays."""
    if class_ is None or isinstance(class_, str):
        return class_
    if isinstance(class_, (int, np.integer)) and not isinstance(class_, bool):
        return str(int(class_))
    if isinstance(class_, (list, tuple)) and class_ and all(
            isinstance(c, (str, int, np.integer)) and not isinstance(c, bool) for c in class_):
        return ",".join(str(c) for c in class_)
    raise DiffuseError(f"class_ must be a class index, a class name, a list of them, or 'all'; got {class_!r}")


class Model:
    """A trained model, loaded for sampling (its EMA weights, in eval mode). Make one with ``load``.

    Attributes: ``path`` (what was loaded), ``checkpoint`` (the checkpoint directory or file read),
    ``config`` (the run's ``Config``), ``step`` (training steps), ``class_names`` (None for an
    unconditional model), ``image_size``, ``channels`` (1 or 3), ``device`` and ``precision``
    ("fp32" or "bf16", what sampling runs in).
    """

    def __init__(self, path: Path, loaded: Any, device: torch.device, amp: torch.dtype | None):
        self.path = path
        self._loaded = loaded                   # generate.Loaded: net, config, header, schedule, formulation
        self.device = device
        self._amp = amp

    @property
    def checkpoint(self) -> Path:
        return self._loaded.source

    @property
    def config(self) -> Config:
        return self._loaded.config

    @property
    def step(self) -> int | None:
        return self._loaded.header.get("step")

    @property
    def class_names(self) -> list[str] | None:
        return self._loaded.class_names

    @property
    def image_size(self) -> int:
        """Pixels per side of the images ``sample`` returns (a run trained smaller writes them upscaled)."""
        return self._loaded.config.written_size

    @property
    def channels(self) -> int:
        return self._loaded.config.model.in_channels

    @property
    def precision(self) -> str:
        return "bf16" if self._amp == torch.bfloat16 else "fp32"

    def __repr__(self) -> str:
        classes = f"{len(self.class_names)} classes" if self.class_names else "unconditional"
        return (f"<diffuse.Model {self.path}: {self.channels}x{self.image_size}x{self.image_size}, {classes}, "
                f"step {self.step}, {self.device} {self.precision}>")

    def sample(self, n: int = 16, *, seed: int = 0, sampler: str | None = None, steps: int | None = None,
               spacing: str | None = None, eta: float | None = None, guidance: float | None = None,
               class_: int | str | Sequence[int | str] | None = None, clip: bool = True, batch_size: int = 64,
               progress: bool = False) -> np.ndarray:
        """``n`` images as uint8 [n, H, W, C] in [0, 255]: the images ``diffuse sample`` makes with
        the same settings (image i starts from noise stream (seed, i), so they do not depend on
        ``batch_size``, and the first k are the same for any n >= k).

        sampler: ddpm, ddim, euler, heun, dpmpp-2m or dpmpp-2m-sde (default: the run's, dpmpp-2m-sde
        with 20 steps, heun with 35 for edm runs); steps: network evaluations per image; spacing:
        trailing, leading, uniform or karras; eta: sampler noise (ddim 0..1, dpmpp-2m-sde 0..10).
        class_: a class index, a name, a list of them (cycled over the images), or "all" (n // K
        images of each class, class by class, as ``diffuse sample --class all``; at least one each);
        guidance: classifier-free guidance w, needs class_ (default: the run's). clip: clamp the
        predicted x0 to [-1, 1] each step.
        """
        from .generate import class_labels, class_rows, generate, settle
        from .sampling import SamplingSpec

        _check_int("n", n, 1)
        _check_int("seed", seed)
        _check_int("steps", steps, 1, none=True)
        _check_int("batch_size", batch_size, 1)
        _check_number("eta", eta)
        _check_number("guidance", guidance)
        classes = _class_spec(class_)
        rows = class_rows(self._loaded, classes, n)             # "all": n // K of each class, as the CLI
        labels = rows[0] if rows else class_labels(self._loaded, classes, n)
        n = len(labels) if rows else n
        spec = settle(self._loaded, SamplingSpec(sampler, steps, spacing, eta, guidance, clip, seed), labels is not None)
        bar = _progress_bar(progress, f"{spec.sampler} {spec.steps} steps")
        try:
            images, _ = generate(self._loaded, n=n, spec=spec, batch_size=batch_size, labels=labels,
                                 device=self.device, amp=self._amp, progress=bar.update if bar else None)
        finally:
            if bar:
                bar.close()
        return images.permute(0, 2, 3, 1).numpy()        # [n, C, H, W] -> [n, H, W, C]

    def save_grid(self, images: np.ndarray, path: PathLike, *, nrow: int | None = None,
                  row_labels: Sequence[str] | None = None) -> Path:
        """Write uint8 [N, H, W, C] images as one PNG grid (``nrow`` per row, default about sqrt N;
        small images upscaled to stay visible), as ``diffuse sample --out FILE.png`` does. For
        ``class_="all"`` samples: ``nrow=len(images) // len(model.class_names),
        row_labels=model.class_names``. Returns the path."""
        from .fid import images_from_array
        from .images import save_grid
        from .outputs import check_file

        path = check_file(os.path.expanduser(os.fspath(path)), (".png",), "path")
        _check_int("nrow", nrow, 1, none=True)
        save_grid(images_from_array(_as_array(images, "images"), "images"), path, nrow=nrow,
                  row_labels=list(row_labels) if row_labels else None)
        return path


def _progress_bar(show: bool, desc: str):
    if not show:
        return None
    import sys

    from tqdm import tqdm
    return tqdm(unit="nfe", desc=desc, file=sys.stderr)


def _as_array(images: Any, name: str) -> np.ndarray:
    if not isinstance(images, np.ndarray):
        raise DiffuseError(f"{name} must be a numpy array of uint8 [N, H, W, C] (as Model.sample returns), "
                           f"got {type(images).__name__}")
    return images


def _diffusers_import(folder: Path) -> Path:
    """A diffusers folder (UNet2DModel + DDPMScheduler) as a diffuse checkpoint, converted once
    (``export.import_diffusers``, as ``diffuse import``) into the cache, keyed by the folder's path
    and its weights file's size and time, so an edited folder is converted again."""
    from .export import UNET_FILE, import_diffusers
    from .fsutil import cache_dir

    weights = folder / "unet" / UNET_FILE
    stamp = weights.stat() if weights.is_file() else None
    key = f"{folder.resolve()}|{stamp.st_size if stamp else 0}|{stamp.st_mtime_ns if stamp else 0}"
    out = cache_dir() / "imported" / hashlib.sha256(key.encode()).hexdigest()[:16]
    if not (out / "ema.safetensors").is_file():
        import_diffusers(folder, out, overwrite=out.exists())
    return out


def load(path: PathLike, *, device: str = "auto", precision: str = "auto", threads: int | None = None) -> Model:
    """Load a model for sampling: a run directory (its checkpoints/last), a checkpoint directory, a
    .safetensors file (a checkpoint's ema.safetensors or one from ``diffuse export``), or a
    diffusers UNet2DModel + DDPMScheduler folder (converted once into diffuse's cache, as
    ``diffuse import`` would).

    device: "auto" (cuda when there is a GPU), "cpu" or "cuda[:N]". precision: "auto" (as
    ``diffuse sample``: the run's training precision on CUDA, bf16 on the CPU only where measured
    faster), "fp32" or "bf16". threads: torch's CPU threads, set as ``diffuse sample --threads``
    does (default: the cores this process may use).
    """
    from .generate import open_model
    from .threads import set_threads

    if not isinstance(path, (str, os.PathLike)):
        raise DiffuseError(f"path must be a run, checkpoint or model file path, got {type(path).__name__}")
    for name, value in (("device", device), ("precision", precision)):
        if not isinstance(value, str):
            raise DiffuseError(f"{name} must be a string, got {value!r}")
    if precision not in ("auto", "fp32", "bf16"):
        raise DiffuseError(f"precision must be auto, fp32 or bf16, got {precision!r}")
    _check_int("threads", threads, 1, none=True)
    given = Path(os.path.expanduser(os.fspath(path)))
    source = given
    if given.is_dir() and (given / "unet" / "config.json").is_file() and not (given / "config.json").is_file():
        source = _diffusers_import(given)
    set_threads(threads)
    dev, loaded, amp = open_model(str(source), device, precision)
    return Model(given, loaded, dev, amp)


# ----------------------------------------------------------------------------------------------
# FID and KID

def _is_model_path(p: Path) -> bool:
    return p.suffix == ".safetensors" or (p.is_dir() and any(
        (p / name).exists() for name in ("config.json", "checkpoints", "ema.safetensors", "last")))


def _image_set(images: Any, name: str):
    """Images for FID: an array (uint8 [N, H, W, C]) -> uint8 tensor [N, C, H, W]; a folder or .npz
    -> fid.load_set's images or statistics."""
    from . import fid

    if isinstance(images, np.ndarray):
        return fid.images_from_array(images, name)
    if isinstance(images, (str, os.PathLike)):
        return fid.load_set(os.fspath(images))
    raise DiffuseError(f"{name} must be a uint8 [N, H, W, C] array, a folder of images or an .npz, "
                       f"got {type(images).__name__}")


def _reference_stats(reference: Any, extractor, n_ref: int | None, batch_size: int):
    """(statistics, description) of ``reference``, as ``diffuse eval`` reads its --ref: a Model or a
    run -> its training data (train split, loaded as training loaded it); a data set name (optionally
    ":train" / ":test") -> that set; otherwise a folder, .npz or array as ``_image_set``."""
    from . import evaluation, fid

    if isinstance(reference, Model) or (isinstance(reference, (str, os.PathLike))
                                        and _is_model_path(Path(os.path.expanduser(os.fspath(reference))))):
        cfg = reference.config if isinstance(reference, Model) else _config_of(reference)
        return evaluation.reference(None, cfg, extractor, ref_n=n_ref, batch_size=batch_size)
    if isinstance(reference, str) and not Path(os.path.expanduser(reference)).exists():
        data, split = evaluation.parse_ref(reference)
        ref = fid.reference_stats(data, split, n_ref, extractor=extractor, batch_size=batch_size)
        return ref, {"data": data, "split": split, "n": ref.n}
    ref = _image_set(reference, "reference")
    if not isinstance(ref, fid.Stats):
        ref = fid.stats_of_images(ref, extractor, batch_size=batch_size)
    return ref, {"set": os.fspath(reference) if not isinstance(reference, np.ndarray) else "array", "n": ref.n}


def _config_of(path: PathLike) -> Config:
    """The training config stored with a run, checkpoint or model file (no weights loaded)."""
    from . import checkpoint as ckpt_io

    src = ckpt_io.resolve(Path(os.path.expanduser(os.fspath(path))))
    return Config.from_dict(ckpt_io.read_header(src)["config"])


def fid_kid(images: Any, reference: Any, *, n_ref: int | None = None, batch_size: int = 50,
            device: str = "auto", inception_weights: PathLike | None = None) -> dict[str, Any]:
    """FID and KID of ``images`` against ``reference``, with the TF Inception-v3 features
    ``diffuse eval`` uses (same numbers as ``diffuse eval --fid-between`` on the same sets).

    images: uint8 [N, H, W, C] (as ``Model.sample`` returns), a folder of images, or an .npz of
    images or statistics. reference: a ``Model`` or a run path (its training data, train split, as
    ``diffuse eval`` uses by default), a data set name ("digits", "mnist", "cifar10:test", ...), a
    folder, an .npz or another array. n_ref: a seeded random subset of a data set (default: all of
    it; statistics are cached). Returns {"fid", "kid", "kid_std", "n", "n_ref", "extractor",
    "reference"}. FID is biased upward at small N: compare numbers only at equal N.
    """
    import warnings

    from . import fid
    from .device import pick_device
    from .inception import load_extractor

    _check_int("n_ref", n_ref, 2, none=True)
    _check_int("batch_size", batch_size, 1)
    gen = _image_set(images, "images")
    extractor = load_extractor(inception_weights, pick_device(device), "tf-bilinear")
    if not isinstance(gen, fid.Stats):
        gen = fid.stats_of_images(gen, extractor, batch_size=batch_size)
    ref, desc = _reference_stats(reference, extractor, n_ref, batch_size)
    result = fid.compare(gen, ref, names=("images", "the reference"))
    note = fid.small_n_note(result["n"])
    if note:
        warnings.warn(note, stacklevel=2)
    result["reference"] = desc
    return result
