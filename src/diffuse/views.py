"""``diffuse visualize VIEW``: each view's own flags (``VIEWS``) and its run (``run``), which writes
the view's files and returns the lines to print. The pictures themselves are ``visualize``'s.

Importing this module imports no torch (the CLI builds its parsers from ``VIEWS``); ``run`` loads
the model and ``visualize`` when called.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from .config import int_arg, positive_int_arg
from .errors import DiffuseError
from .sampling import SAMPLER_NAMES


def _ints(default: int, help_: str) -> dict[str, Any]:
    return {"type": positive_int_arg, "default": default, "help": help_}


# (view, the flags it shares, help, [(flags, add_argument keywords)]): the views' own flags. What
# they share: "base" --seed, --device, --precision, --threads; "model" also RUN and --out DIR;
# "conditional" also --class and --guidance; "fid" also the FID reference (--ref, --ref-n,
# --data-root, --inception-weights).
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
        ("--first-index", {"type": int_arg, "default": 0, "help": "first image index of the seed (default 0)"}),
        ("--frames", _ints(10, "columns of the strip (default 10)"))]),
    ("compare-samplers", "fid", "grids and timings per sampler and step count", [
        ("--samplers", {"default": None, "metavar": "A,B,...", "help": "default: every registered sampler"}),
        ("--steps-list", {"default": "10,20,50,100,1000", "metavar": "N,N,...",
                          "help": "step counts (default 10,20,50,100,1000)"}),
        ("--n", _ints(16, "images per batch (default 16)")),
        ("--repeats", _ints(1, "timed batches per cell (default 1)")),
        ("--fid-n", {"type": int_arg, "default": 0, "metavar": "N",
                     "help": "add FID and KID columns from N images per cell and fid_vs_nfe.png (default 0: off)"}),
        ("--batch-size", _ints(250, "batch size for the FID images"))]),
]


def run(o) -> list[str]:
    """Run view ``o.view`` with the options ``o`` (an object with the attributes its flags in
    ``VIEWS`` and their shared flags name, as argparse parses them); returns the lines to print.
    An output path that cannot be written is refused before any data or model is loaded."""
    from . import visualize as vis
    from .generate import open_model
    from .outputs import check_dir, check_file

    if o.view == "noising":
        check_file(o.out, (".png",))
        ts = vis.parse_int_list(o.t, "--t") if o.t else vis.NOISING_T
        strip = vis.noising(data=o.data, data_root=o.data_root, schedule=o.schedule, ts=ts, n=o.n, seed=o.seed,
                            out=o.out)
        return vis.noising_lines(strip, o.data, o.out, schedule_given=o.schedule is not None)
    if o.view == "schedule":
        check_file(o.out, (".png",))
        return vis.schedule_lines(vis.plot_schedules(o.out, o.timesteps), o.out)
    check_dir(o.out)
    device, loaded, amp = open_model(o.run, o.device, o.precision)
    view = {"interpolate": _interpolate, "timestep-mse": _timestep_mse, "trajectory": _trajectory,
            "compare-samplers": _compare_samplers}[o.view]
    return view(o, loaded, device, amp, vis.dir_path(o.out))


def _interpolate(o, loaded, device, amp, out: Path) -> list[str]:
    from . import visualize as vis
    from .generate import labels_and_guidance
    labels, guidance = labels_and_guidance(loaded, o.class_, o.guidance, o.rows)
    names = [loaded.class_names[int(k)] for k in labels] if labels is not None else None
    lines = []
    for sampler, steps, file in (("ddim", o.ddim_steps, "interp_ddim.png"), ("ddpm", o.ddpm_steps, "interp.png")):
        t0 = time.perf_counter()
        images = vis.interpolate(loaded, sampler=sampler, steps=steps, rows=o.rows, frames=o.frames, seed=o.seed,
                                 labels=labels, guidance=guidance, amp=amp)
        vis.save_interpolation(images, out / file, f"slerp between two noises, decoded by {sampler} "
                               f"({steps} steps), seed {o.seed}", row_labels=names)
        lines.append(f"wrote {out / file} ({sampler}, {steps} steps, {time.perf_counter() - t0:.1f}s)")
    return lines


def _timestep_mse(o, loaded, device, amp, out: Path) -> list[str]:
    from . import visualize as vis
    ts = vis.parse_int_list(o.t, "--t") if o.t else None
    result = vis.timestep_mse(loaded, ts=ts, n=o.n, seed=o.seed, data_root=o.data_root, batch_size=o.batch_size,
                              amp=amp)
    (out / "timestep_mse.json").write_text(json.dumps(result, indent=2))
    vis.plot_timestep_mse(result, out / "timestep_mse.png")
    return [f"{result['note']}; {result['n']} images per t",
            *(f"t={t:>4}  mse {m:.4g} +- {se:.2g}" for t, m, se in zip(result["t"], result["mse"], result["std_err"])),
            f"wrote {out / 'timestep_mse.png'} and {out / 'timestep_mse.json'}"]


def _trajectory(o, loaded, device, amp, out: Path) -> list[str]:
    from . import visualize as vis
    from .generate import labels_and_guidance
    labels, guidance = labels_and_guidance(loaded, o.class_, o.guidance, o.n)
    tr = vis.trajectory(loaded, sampler=o.sampler, steps=o.steps, n=o.n, seed=o.seed, first_index=o.first_index,
                        labels=labels, guidance=guidance, amp=amp)
    vis.save_trajectory(tr, out / "trajectory.png", out / "trajectory.gif", frames=o.frames)
    return [f"wrote {out / 'trajectory.png'} and {out / 'trajectory.gif'} ({tr.sampler}, {tr.steps} steps, "
            f"{len(tr.t)} denoiser calls)"]


def _compare_samplers(o, loaded, device, amp, out: Path) -> list[str]:
    from . import visualize as vis
    from .generate import labels_and_guidance
    samplers = o.samplers.split(",") if o.samplers is not None else None
    steps_list = vis.parse_int_list(o.steps_list, "--steps-list")
    labels, guidance = labels_and_guidance(loaded, o.class_, o.guidance, o.n)
    if o.fid_n < 0:
        raise DiffuseError(f"--fid-n must be >= 0, got {o.fid_n}")
    score_fn, note = _fid_score_fn(o, loaded, device, amp) if o.fid_n else (None, None)
    report = vis.compare_samplers(loaded, out, samplers=samplers, steps_list=steps_list, n=o.n, seed=o.seed,
                                  repeats=o.repeats, labels=labels, guidance=guidance, score_fn=score_fn,
                                  score_note=note, log=lambda s: print(s, file=sys.stderr, flush=True), amp=amp)
    skipped = sum("skipped" in c for c in report["cells"])
    return [f"wrote {out / 'report.md'} ({len(report['cells'])} cells{f', {skipped} skipped' if skipped else ''}), "
            "report.json, time_vs_steps.png, overview.png"]


def _fid_score_fn(o, loaded, device, amp=None):
    """compare-samplers --fid-n N: per cell, FID and KID of N images (evaluation.fid_score_fn), and
    the note that says what they were measured against."""
    from . import evaluation as E
    from .generate import labels_and_guidance
    from .inception import load_extractor

    extractor = load_extractor(o.inception_weights, device, "tf-bilinear")
    ref, desc = E.reference(o.ref, loaded.config, extractor, ref_n=o.ref_n, data_root=o.data_root,
                            batch_size=o.batch_size)
    labels, guidance = labels_and_guidance(loaded, o.class_, o.guidance, o.fid_n)     # the grids' class cycle
    score = E.fid_score_fn(loaded, o.fid_n, reference=ref, extractor=extractor, labels=labels, guidance=guidance,
                           seed=o.seed, batch_size=o.batch_size, device=device, amp=amp)
    what = f"{desc['data']} {desc['split']}" if "data" in desc else desc["stats"]
    return score, (f"FID and KID from N={o.fid_n:,} generated images per cell (seeds {o.seed}:0..{o.fid_n - 1}) "
                   f"against {what} (N_ref={desc['n']:,}); at this N FID is biased upward, so compare cells only "
                   "with each other.")
