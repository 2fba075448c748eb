"""The ``diffuse`` command line: a thin layer that parses flags and calls the library.

Every user-facing failure is one line on stderr (``error: ...``) and a non-zero exit; ``--debug``
shows the traceback instead. Each subcommand is one ``add_<command>`` (its flags, built from shared
parent parsers) and one ``cmd_<command>`` (a call into the library and what it prints).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any

from .cliflags import (RUN_HELP, class_parent, parent, reference_parent, runtime_parent,  # noqa: F401 (re-exported)
                       sampling_parent, spec_of)
from .config import add_config_flags, field_help, float_arg, int_arg, overrides_from_flags, positive_int_arg
from .errors import DiffuseError
from .runinfo import attention_where  # noqa: F401 (diffuse info's words; tests read it here)
from .sampling import ETA_HELP, SAMPLER_NAMES, SPACING_NAMES, SamplingSpec  # noqa: F401 (names the tests read)
from .version import __version__

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (no usage dump), and no prefix matching: ``--step 10``
    is an error, not ``--steps 10``."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # noqa: D401
        self.exit(EXIT_USAGE, f"error: {message} (see '{self.prog} --help')\n")


def _sampling_defaults(args: argparse.Namespace, loaded) -> SamplingSpec:
    """--sampler/--steps not given: the run's formulation's default (SamplingSpec.resolved); returns the spec."""
    spec = SamplingSpec(args.sampler, args.steps).resolved(loaded.config)
    args.sampler, args.steps = spec.sampler, spec.steps
    return spec


def _class_labels(args: argparse.Namespace, loaded, count: int):
    """--class as labels [count], or None; settles args.guidance (generate.labels_and_guidance)."""
    from .generate import labels_and_guidance
    labels, args.guidance = labels_and_guidance(loaded, getattr(args, "class_", None), args.guidance, count)
    return labels


def _open(args: argparse.Namespace):
    from .generate import open_model
    return open_model(getattr(args, "run", None), args.device, args.precision)


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


def cmd_train(args: argparse.Namespace) -> int:
    from .distributed import is_main
    from .runs import run_config
    from .train import train

    cfg = run_config(overrides_from_flags(args), preset=args.preset, config=args.config, resume=args.resume,
                     init_from=args.init_from)
    if args.dry_run:
        print(cfg.to_json())
        return 0
    out = train(cfg, resume=bool(args.resume), init_from=args.init_from, overwrite=args.overwrite,
                progress=not args.no_progress)
    if is_main():
        print(f"done: {out}")
    return 0


# ----------------------------------------------------------------------------------------------
# distill

def add_distill(sub) -> None:
    from .config import DISTILL_METHODS, DistillConfig
    from .runs import DISTILL_SETTINGS
    di = sub.add_parser("distill", parents=[COMMON], help="turn a trained run into a few-step generator",
                        description="Distil a run's EMA model into a student that samples in --nfe network calls "
                                    "(docs/distill.md). The result is an ordinary run: sample, eval, serve and info "
                                    "take it and default to its NFE.")
    di.add_argument("run", nargs="?", metavar="RUN_OR_CHECKPOINT", help="the teacher: " + RUN_HELP)
    di.add_argument("--out", default=None, help="the student's run directory (default runs/<teacher>-<method><nfe>)")
    di.add_argument("--method", default="ect", choices=list(DISTILL_METHODS), help=field_help(DistillConfig, "method"))
    di.add_argument("--nfe", type=int_arg, default=2, help=field_help(DistillConfig, "nfe") + " (default 2)")
    di.add_argument("--target", default=None, choices=["data", "teacher"],
                    help="ect: the target's input, the data's noise (consistency training) or the teacher's ODE "
                         "step (consistency distillation; the teacher must stay on disk until the student is "
                         "done; default data)")
    di.add_argument("--distill-guidance", type=float_arg, default=None, metavar="W",
                    help="a class-conditional teacher: distil its samples at classifier-free guidance W into the "
                         "student (implies --target teacher; the student then samples guided with no --guidance)")
    di.add_argument("--steps", type=positive_int_arg, default=None,
                    help="optimizer steps (default: a quarter of the teacher's)")
    di.add_argument("--time-limit", type=float_arg, default=None, metavar="MIN",
                    help="minutes of distillation as a budget plan (learning rate and EMA end with it); on "
                         "--resume, the minutes to add")
    di.add_argument("--resume", metavar="OUT", help="continue the distillation in OUT from its last checkpoint")
    di.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    di.add_argument("--no-progress", action="store_true", help="plain log lines instead of a progress bar")
    add_config_flags(di, only={"train": DISTILL_SETTINGS})
    di.set_defaults(func=cmd_distill)


def cmd_distill(args: argparse.Namespace) -> int:
    from .runs import distill_run_config
    from .train import train

    cfg = distill_run_config(args.run, args.out, nfe=args.nfe, method=args.method, steps=args.steps,
                             time_limit=args.time_limit, resume=args.resume, target=args.target, guidance=args.distill_guidance,
                             train=overrides_from_flags(args).get("train", {}))
    out = train(cfg, resume=bool(args.resume), overwrite=args.overwrite, progress=not args.no_progress)
    print(f"done: {out}  (sample it with: diffuse sample {out})")
    return 0


# ----------------------------------------------------------------------------------------------
# sample

def add_sample(sub) -> None:
    sa = sub.add_parser("sample", parents=[COMMON, runtime_parent(), sampling_parent()],
                        help="generate images from a run or checkpoint",
                        description="Generate images from a run's EMA weights with any sampler.")
    sa.add_argument("run", metavar="RUN_OR_CHECKPOINT", help=RUN_HELP)
    sa.add_argument("-n", "--n", type=positive_int_arg, default=64,
                    help="number of images (default 64; under torchrun write -n, which torchrun does not claim)")
    sa.add_argument("--batch-size", type=positive_int_arg, default=64,
                    help="images per forward pass (default 64; the images do not depend on it)")
    sa.add_argument("--out", default="samples.png",
                    help="FILE.png grid, FILE.npz arrays, or DIR of PNGs (default samples.png; checked before sampling)")
    sa.add_argument("--nrow", type=positive_int_arg, default=None, help="images per grid row")
    sa.set_defaults(func=cmd_sample)


def cmd_sample(args: argparse.Namespace) -> int:
    from . import distributed as dist
    from .generate import class_rows, generate_all, nfe_bar, settle
    from .images import save_images
    from .outputs import check_sample_out

    check_sample_out(args.out)                                  # before loading and sampling
    device, loaded, amp = _open(args)
    rows = class_rows(loaded, args.class_, args.n if args.n_given else None)    # --class all: a row per class
    n, nrow, row_labels = (len(rows[0]), rows[1], loaded.class_names) if rows else (args.n, args.nrow, None)
    labels = _class_labels(args, loaded, n)                     # also settles args.guidance
    labels = rows[0] if rows else labels
    spec = settle(loaded, spec_of(args), labels is not None)
    with nfe_bar(spec, len(dist.shard(n)), args.batch_size, f"{spec.sampler} {spec.steps} steps",
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
    ev.add_argument("--n-per-class", type=positive_int_arg, default=100,
                    help="images per class and guidance value for --classifier-accuracy (default 100)")
    ev.add_argument("--fid-between", nargs=2, metavar=("A", "B"),
                    help="compare two sets, each a folder of images, an .npz of uint8 NHWC 'images', "
                         "or a statistics .npz (from --save-stats)")
    ev.add_argument("-n", "--n", type=positive_int_arg, default=None,
                    help="images to generate (default 10000; under torchrun write -n)")
    ev.add_argument("--batch-size", type=positive_int_arg, default=50, help="sampling and Inception batch size")
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
    E.check_save_stats(args.save_stats)                         # before sampling and Inception
    device, loaded, amp = _open(args)
    if args.run:
        # Everything that can fail cheaply fails before the judge, the reference statistics and the sampling.
        _sampling_defaults(args, loaded).check_sampler(loaded.schedule.timesteps)
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
    if args.fid_between:
        return E.compare_sets(*args.fid_between, lambda: load_extractor(args.inception_weights, device, args.resize),
                              batch_size=args.batch_size, progress=progress, save_stats=args.save_stats)
    return E.evaluate_run(loaded, args.n or 10_000, spec_of(args), class_=args.class_, ref=args.ref,
                          ref_n=args.ref_n, data_root=args.data_root, inception_weights=args.inception_weights,
                          resize=args.resize, batch_size=args.batch_size, save_stats=args.save_stats,
                          device=device, amp=amp, progress=progress)


def _eval_classifier(args: argparse.Namespace, loaded, device, amp) -> dict:
    """--classifier-accuracy: the judge's verdict per guidance of --guidance-sweep (a table unless --json)."""
    from . import evaluation as E

    spec = spec_of(args).resolved(loaded.config)
    out = E.accuracy_sweep(loaded, spec, args.guidance_sweep, n_per_class=args.n_per_class, data_root=args.data_root,
                           batch_size=args.batch_size, device=device, amp=amp, progress=not args.no_progress,
                           log=None if args.json else (lambda m: print(m, file=sys.stderr)))
    if not args.json:
        print("\n".join(E.accuracy_lines(out, spec, args.n_per_class)))
    return out


# ----------------------------------------------------------------------------------------------
# visualize

def add_visualize(sub) -> None:
    from .views import VIEWS

    vi = sub.add_parser("visualize", parents=[COMMON], help="pictures of the diffusion process and of a model",
                        description="Analysis pictures: the forward process, the schedules, and a trained "
                                    "model's interpolations, per-timestep error, trajectories and samplers.")
    views = vi.add_subparsers(dest="view", metavar="VIEW", parser_class=Parser)
    views.required = True
    base = parent(COMMON, runtime_parent())
    base.add_argument("--seed", type=int_arg, default=0, help="image i uses noise stream (seed, i) (default 0)")
    model = parent(base)
    model.add_argument("run", metavar="RUN_OR_CHECKPOINT", help=RUN_HELP)
    model.add_argument("--out", required=True, metavar="DIR", help="directory for the outputs")
    conditional = parent(model, class_parent())
    shared = {"base": base, "model": model, "conditional": conditional, "fid": parent(conditional, reference_parent())}
    for name, parents, help_, flags in VIEWS:
        v = views.add_parser(name, parents=[shared[parents]], help=help_)
        for flag, kw in flags:
            v.add_argument(*flag.split(), **kw)
    vi.set_defaults(func=cmd_visualize)


def cmd_visualize(args: argparse.Namespace) -> int:
    from .views import run

    lines = run(args)
    if lines:
        print("\n".join(lines))
    return 0


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
    from .runinfo import info_text

    print(info_text(args.run, args.device, as_json=args.json))
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
    from .export import export, export_lines

    print("\n".join(export_lines(export(args.run, args.out, format=args.format, precision=args.precision,
                                         eval_json=args.eval, license=args.license, overwrite=args.overwrite))))
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
    from .export import import_diffusers, import_lines

    print("\n".join(import_lines(import_diffusers(args.folder, args.out, overwrite=args.overwrite, data=args.data))))
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
    se.add_argument("--port", type=int_arg, default=8000, help="port (default 8000; 0 picks a free one)")
    se.add_argument("--max-images", type=positive_int_arg, default=64, help="images per request (default 64)")
    se.add_argument("--max-steps", type=positive_int_arg, default=1000,
                    help="sampling steps per request (default 1000; also at most each model's T)")
    se.add_argument("--queue", type=positive_int_arg, default=16,
                    help="requests waiting per device; more get 429 with Retry-After (default 16)")
    se.add_argument("--token", default=None,
                    help="require 'Authorization: Bearer TOKEN' on every API call (or set DIFFUSE_SERVE_TOKEN)")
    se.add_argument("--preview", action=argparse.BooleanOptionalAction, default=True,
                    help="send low-resolution x0 previews with progress events (default on)")
    se.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    from .serve import serve

    return serve(args.runs, host=args.host, port=args.port, max_images=args.max_images, max_steps=args.max_steps,
                 queue=args.queue, token=args.token, device=args.device, precision=args.precision,
                 preview=args.preview)


# ----------------------------------------------------------------------------------------------
# The parser and main

COMMON = parent()
COMMON.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show the full traceback on errors")
COMMANDS = (add_train, add_distill, add_sample, add_visualize, add_eval, add_export, add_import, add_info, add_serve)


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
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)          # torch-free: --help and bad flags cost no CPU reading
    if args.command not in ("export", "import"):
        prefer_passive_wait()                        # before torch loads: a busy machine's threads sleep when idle
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
