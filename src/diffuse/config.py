"""Run configuration: typed dataclasses with one comment per field, named presets, and merging.

Resolution order (later wins): dataclass defaults < preset < ``--config FILE.json`` < CLI flags.
The resolved config is written to ``OUT/config.json`` and stored in every checkpoint, so a run
can always be rebuilt from its directory alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .budget import BUDGET_GRID_STEPS, COOLDOWN_FRACTION, DEFAULT_EMA_STD, WARMUP_FRACTION
from .errors import DiffuseError
from .imagefiles import STANDARD, peek_folder

CONFIG_VERSION = 1


def opt(default, help: str, **kw):
    """A dataclass field with its help text (used for the CLI flag and the docs)."""
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class DataConfig:
    name: str = opt("digits", "data set: digits, mnist, fashion-mnist, cifar10, or a folder of images", flag="data")
    root: str | None = opt(None, "where mnist/fashion-mnist/cifar10 live (default $DIFFUSE_DATA_ROOT, else a user cache dir)", flag="data-root")
    image_size: int | None = opt(None, "resize (shorter side) + center crop to N pixels; default: the data set's native size")
    channels: int | None = opt(None, "1 or 3; default: inferred from the data")
    flip: bool | None = opt(None, "random horizontal flips (default: on for cifar10 and folders, off for digits/mnist)")
    placement: str = opt("auto", "where the uint8 images live while training: auto, device, host (pinned, "
                                 "copied per batch) or memmap (a file mapped from disk); auto keeps them on the "
                                 "device up to --placement-fraction of its memory", flag="data-placement")
    placement_fraction: float = opt(0.25, "auto placement: the largest share of the device's memory the images "
                                          "may take before they move to host memory or a memory map")
    cache: str = opt("auto", "memory: decode the whole set into RAM; disk: decode once, in parallel, into an on-disk "
                             "uint8 cache that batches are read from (for sets larger than memory); auto: disk "
                             "when a folder's decoded images would take over half the available RAM", flag="data-cache")


@dataclass
class ModelConfig:
    base_channels: int = opt(32, "channels at the first UNet level")
    channel_mult: tuple[int, ...] = opt((1, 2, 2), "channel multiplier per level, e.g. 1,2,2,2")
    num_res_blocks: int = opt(2, "residual blocks per level")
    attn_resolutions: tuple[int, ...] = opt((8,), "feature-map sizes that get self-attention, e.g. 16 or 16,8")
    dropout: float = opt(0.0, "dropout in residual blocks")
    num_groups: int = opt(8, "GroupNorm groups")
    head_channels: int = opt(64, "channels per attention head")
    scale_shift: bool = opt(True, "time embedding as GroupNorm scale+shift (ADM); false = additive (DDPM)")
    class_cond: bool = opt(False, "condition on class labels (adds a null class for guidance)")
    patch_size: int = opt(1, "the UNet sees the image as PxP patches stacked into channels (pixel unshuffle), "
                             "at 1/P of its size: a 64 px image at the cost of 32 px (docs/budgets.md)")
    # Variants that only models imported from diffusers use (google/ddpm-cifar10-32: 1e-6, 1, sin
    # first, 0); a --config file can set them too. The defaults are what every diffuse preset trains.
    norm_eps: float = opt(1e-5, "GroupNorm epsilon", cli=False)
    time_freq_shift: float = opt(0.0, "sinusoidal time embedding: frequencies max_period^(-i/(half - shift))", cli=False)
    time_sin_first: bool = opt(False, "sinusoidal time embedding order [sin, cos] instead of [cos, sin]", cli=False)
    downsample_padding: int = opt(1, "downsampling conv padding: 1 symmetric, 0 bottom/right only (TF SAME)", cli=False)
    # Filled in from the data at start; recorded so a checkpoint is self-describing.
    image_size: int = opt(0, "set from the data", cli=False)
    in_channels: int = opt(0, "set from the data", cli=False)
    num_classes: int = opt(0, "set from the data when class_cond", cli=False)

    @property
    def inner_size(self) -> int:
        """The size the UNet's first level sees: the image's, over the patch size (pixel unshuffle)."""
        return self.image_size // self.patch_size


@dataclass
class DiffusionConfig:
    schedule: str = opt("linear", "noise schedule: linear or cosine")
    timesteps: int = opt(1000, "number of diffusion steps T")
    beta_start: float = opt(1e-4, "first beta of the linear schedule")
    beta_end: float = opt(0.02, "last beta of the linear schedule")
    formulation: str = opt("vp", "vp (a discrete schedule above) or edm (Karras et al. 2022 preconditioning, "
                                 "log-normal sigma, Heun sampling); see docs/objectives.md")
    prediction: str | None = opt(None, "what a vp network predicts: eps, x0 or v (default eps; edm has its own)",
                                 flag="objective")
    loss_weight: str = opt("uniform", "per-sample loss weight: uniform (plain MSE on the objective), min-snr "
                                      "or soft-min-snr (Hang et al. 2023)")
    min_snr_gamma: float = opt(5.0, "gamma of --loss-weight min-snr / soft-min-snr")
    snr_shift: float = opt(1.0, "a vp schedule's signal-to-noise ratio times this at every step; (32/S)^2 moves a "
                                "schedule made for 32 px to S px (Hoogeboom et al. 2023)")
    zero_terminal_snr: bool = opt(False, "rescale a vp schedule to SNR 0 at t = T-1 (Lin et al. 2023); needs "
                                         "--objective v or x0")
    sigma_data: float = opt(0.5, "edm: the data's standard deviation in the preconditioning")
    p_mean: float = opt(-1.2, "edm: mean of ln sigma during training")
    p_std: float = opt(1.2, "edm: standard deviation of ln sigma during training")


FORMULATIONS = ("vp", "edm")
PREDICTIONS = ("eps", "x0", "v")
LOSS_WEIGHTS = ("uniform", "min-snr", "soft-min-snr")
# The sampler a VP run uses when none is named (objectives.default_sampling, FID during training,
# serve): stochastic 2M at 20 NFE, measured best at that budget (docs/objectives.md, "Fast samplers").
# Here, not in objectives, so that this torch-free module can use it as a flag default.
DEFAULT_VP_SAMPLER = "dpmpp-2m-sde"


def check_diffusion(d: DiffusionConfig) -> str | None:
    """The reason a diffusion config cannot be trained or sampled, or None (see objectives.py)."""
    if d.formulation not in FORMULATIONS:
        return f"--formulation must be one of {', '.join(FORMULATIONS)}, got {d.formulation!r}"
    if d.prediction is not None and d.prediction not in PREDICTIONS:
        return f"--objective must be one of {', '.join(PREDICTIONS)}, got {d.prediction!r}"
    if d.loss_weight not in LOSS_WEIGHTS:
        return f"--loss-weight must be one of {', '.join(LOSS_WEIGHTS)}, got {d.loss_weight!r}"
    if not d.min_snr_gamma > 0:
        return f"--min-snr-gamma must be positive, got {d.min_snr_gamma}"
    if d.formulation == "edm":
        if d.prediction is not None:
            return ("--objective applies to --formulation vp: an edm network's output is its own "
                    "c_skip/c_out parametrisation (Karras et al. 2022, table 1)")
        if d.zero_terminal_snr:
            return "--zero-terminal-snr applies to --formulation vp (edm's sigma is continuous, at most 80)"
        if not d.sigma_data > 0:
            return f"--sigma-data must be positive, got {d.sigma_data}"
        if not d.p_std > 0:
            return f"--p-std must be positive, got {d.p_std}"
    elif d.zero_terminal_snr and (d.prediction or "eps") == "eps":
        return ("--zero-terminal-snr needs --objective v (or x0): at SNR 0 the input x_T is the noise itself, "
                "so predicting eps there says nothing about x_0 (x_0 = (x_t - s eps)/alpha divides by alpha = 0; "
                "Lin et al. 2023, sec. 3.2)")
    return None


@dataclass
class TrainConfig:
    steps: int | None = opt(None, "optimizer steps to train (default: the preset's)")
    epochs: float | None = opt(None, "train for this many passes over the data instead of --steps")
    batch_size: int = opt(64, "images per optimizer step (the global batch: split across torchrun ranks)")
    grad_accum: int = opt(1, "split each rank's share of the batch into K micro-batches whose gradients are "
                             "accumulated (same result, less memory)")
    lr: float = opt(2e-4, "AdamW learning rate (constant after warm-up)")
    warmup_steps: int = opt(0, "linear learning-rate warm-up steps")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    grad_clip: float = opt(1.0, "clip the global gradient norm to this (0 = off)")
    max_bad_steps: int = opt(20, "steps with a non-finite loss or gradient are skipped; stop after this many in a row")
    ema_decay: float = opt(0.9999, "EMA decay; warmed up as min(decay, (1+step)/(10+step))")
    label_dropout: float = opt(0.1, "with --class-cond: fraction of labels replaced by the null class")
    seed: int = opt(0, "seed for initialisation, data order, noise and timesteps")
    device: str = opt("auto", "auto, cpu or cuda")
    precision: str = opt("auto", "auto (bf16 where measured faster: GPUs with native bf16, AMX CPUs, or by a "
                                 "cached probe; see docs/hardware.md), fp32 or bf16")
    resolved_precision: str | None = opt(None, "what --precision auto chose when the run started (kept on resume)",
                                         cli=False)
    channels_last: bool | None = opt(None, "use channels_last memory format (default: on where it is faster)")
    resolved_channels_last: bool | None = opt(None, "the layout the default chose when the run started (kept on "
                                                    "resume)", cli=False)
    compile: bool = opt(False, "torch.compile the model")
    threads: int | None = opt(None, "CPU threads for torch (default: the cores this process may use, from its "
                                    "affinity mask); on a shared machine, fewer threads each is faster")
    grad_checkpointing: bool = opt(False, "recompute block activations in the backward pass: less memory, "
                                          "more compute (docs/speed.md)")
    time_limit: float | None = opt(None, "minutes of training. Alone (no --steps/--epochs): a budget plan, whose "
                                         "learning rate and EMA end with the budget and whose model is sized for it "
                                         "(docs/budgets.md); on --resume, the minutes to add. With --steps: a "
                                         "stop-only cap")
    plan: str | None = opt(None, "how the run's length was set: steps (--steps/--epochs given), budget "
                                 "(--time-limit alone) or preset (neither: the preset's steps, or a "
                                 "default budget where those would take over a day)", cli=False)
    ema_std: float | None = opt(None, "power-function EMA (Karras et al. 2024) of this relative width: the EMA "
                                      "averages about the last this-fraction of the run, however long; default "
                                      f"{DEFAULT_EMA_STD} in a budget plan, else the fixed --ema-decay")
    cooldown: float = opt(COOLDOWN_FRACTION, "in a budget plan, the last fraction of the budget over which the "
                                             "learning rate decays linearly to 0 after holding its peak "
                                             "(warmup-stable-decay; 1: a decay over the whole budget)")
    size_model: bool | None = opt(None, "in a budget plan, choose the UNet size this machine can train in the "
                                        "budget (default: yes unless --preset or a model flag is given)")
    half_size: bool | None = opt(None, "in a budget plan that sizes the model, train images above 32 px at half "
                                       "their size and write them upscaled where the budget affords too small a "
                                       "model at their own (docs/budgets.md; default: yes unless --image-size or "
                                       "--output-size is given)")
    lr_from_size: bool | None = opt(None, "a budget plan that sizes the model sets the peak learning rate from "
                                          "the size (sized_peak_lr); false when --lr is given", cli=False)
    batch_from_plan: bool | None = opt(None, "a budget plan that sizes the model halves its batch again where the "
                                             "budget buys too few steps (MIN_BUDGET_STEPS); false when --batch-size "
                                             "is given", cli=False)
    log_every: int = opt(50, "steps between metric log lines")
    sample_every: int | None = opt(None, "steps between sample grids (default: about 10 per run, at least 100 steps apart)")
    sample_steps: int = opt(50, "DDIM steps for the grids written during training")
    sample_n: int = opt(64, "images in the grids written during training")
    sample_guidance: float = opt(1.0, "with --class-cond: guidance w for the training grids, and the run's default for sample/eval")
    output_size: int | None = opt(None, "pixels of the images the run writes (grids, sample, eval, serve): the model's "
                                        "output upscaled (bicubic) to this size when it trains smaller; default the "
                                        "training size, or the folder's own where a budget plan trains it at half "
                                        "(docs/budgets.md)")
    ckpt_every: int | None = opt(None, "steps between checkpoints (default: about 5 per run)")
    keep: int = opt(3, "keep only the newest N step checkpoints (0 = keep all)")
    patience: int | None = opt(None, "early stopping: stop after N epochs without a loss improvement")
    fid_every: int | None = opt(None, "every N steps: FID of --fid-n EMA samples against the training data; "
                                      "keeps the best-FID checkpoint as checkpoints/best")
    fid_n: int = opt(1000, "generated images per FID during training (small N biases FID upward)")
    fid_ref_n: int | None = opt(10_000, "real training images for the FID reference statistics (cached; "
                                        "0 = the whole training split)")
    fid_sampler: str = opt(DEFAULT_VP_SAMPLER, "sampler for the FID images during training (sample's VP default)")
    fid_steps: int = opt(20, "sampling steps for the FID images during training")
    out: str | None = opt(None, "run directory (default runs/<preset>-<time>)")


# The methods `diffuse distill` knows, and the network calls each makes: ect (consistency tuning,
# distill.py) trains a student; gits (stepsearch.py) searches the teacher's noise levels.
DISTILL_METHODS = {"ect": range(1, 9), "gits": range(1, 11)}


@dataclass
class DistillConfig:
    """What makes a run a distilled one (`diffuse distill`, docs/distill.md); ``method`` None: an
    ordinary diffusion run. Set by the command, not by flags of `diffuse train`."""
    method: str | None = opt(None, "ect: consistency tuning (Geng et al. 2024) of the teacher's weights, 1-8 "
                                   "calls; gits: the teacher's noise levels searched for 1-10 calls (Chen et al. "
                                   "2024), no training", cli=False)
    nfe: int = opt(2, "network calls per image the student is tuned for: its default --steps", cli=False)
    teacher: str | None = opt(None, "the teacher's checkpoint the student started from", cli=False)
    teacher_step: int | None = opt(None, "the teacher's training step", cli=False)
    teacher_fid: float | None = opt(None, "the teacher's last FID logged during its training, if any", cli=False)
    teacher_fid_n: int | None = opt(None, "images behind teacher_fid", cli=False)
    sigmas: list | None = opt(None, "gits: the searched noise levels, decreasing to 0 (nfe + 1 of them)", cli=False)
    sampler: str | None = opt(None, "gits: the sampler that walks them by default (the teacher's own default)",
                              cli=False)
    search: dict | None = opt(None, "gits: the search's facts (jump errors, trajectories, seconds)", cli=False)
    # None: ECT's CIFAR-10 values (8 stages, lognormal mean -1.1), which students made before these
    # fields existed trained with, so their resumes stay exact; a new student records diffuse's own
    # (distill.TUNING_DEFAULTS).
    ect_stages: int | None = opt(None, "ect: stages over which the gap t - r halves", cli=False)
    ect_p_mean: float | None = opt(None, "ect: mean of ln sigma_t", cli=False)
    guidance: float | None = opt(None, "ect: the classifier-free guidance w distilled into a class-conditional "
                                       "student (its samples are guided with no --guidance); None: none", cli=False)
    ect_target: str | None = opt(None, "ect: what makes the target's input x_r: data (x0 + r n, consistency "
                                        "training) or teacher (the teacher's ODE step from x_t, consistency "
                                        "distillation); None: data, as students before it was recorded", cli=False)

    def describe(self) -> str:
        """The method, NFE and teacher in words (``diffuse info``, the run's log)."""
        fid = f", teacher FID {self.teacher_fid:.2f} at N = {self.teacher_fid_n}" if self.teacher_fid is not None else ""
        what = "consistency tuning" if self.method == "ect" else f"searched noise levels for {self.sampler}"
        guided = f", guidance {self.guidance:g} distilled" if self.guidance is not None else ""
        return (f"{self.method} {what} for {self.nfe} network call{'s' if self.nfe > 1 else ''} per "
                f"image{guided}, from {self.teacher} (step {self.teacher_step}){fid}")

    @property
    def consistency(self) -> bool:
        """Is the network a consistency function (only the consistency sampler runs it)?"""
        return self.method == "ect"


@dataclass
class Config:
    preset: str = "digits"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    version: int = CONFIG_VERSION

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def written_size(self) -> int:
        """Pixels per side of the images the run writes: train.output_size, else the model's own
        (cfg.model.image_size must be filled in from the data)."""
        return self.train.output_size or self.model.image_size

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Config":
        cfg = cls()
        apply_overrides(cfg, d, source="config")
        if isinstance(d.get("train"), dict) and "cooldown" not in d["train"]:
            # Stored before budget plans held their peak: their decay ran over all of the budget
            # after the warm-up, which is this cool-down, so a resumed run keeps its schedule exactly.
            cfg.train.cooldown = 1.0 - WARMUP_FRACTION
        return cfg


SECTIONS = {"data": DataConfig, "model": ModelConfig, "diffusion": DiffusionConfig, "train": TrainConfig,
            "distill": DistillConfig}


# ----------------------------------------------------------------------------------------------
# Command-line flags from the fields: one --flag per field, its help the field's (opt above)

def int_arg(s: str) -> int:
    """An argparse type: an integer, else a one-line usage error."""
    try:
        return int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}") from None


def float_arg(s: str) -> float:
    try:
        return float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None


def positive_int_arg(s: str) -> int:
    v = int_arg(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s}")
    return v


def _flag_type(f: dataclasses.Field):
    typ = str(f.type)
    if typ.startswith("tuple"):
        return str          # "1,2,2": parsed by _coerce
    return int_arg if typ.startswith("int") else float_arg if typ.startswith("float") else str


def field_help(cls: type, name: str) -> str:
    """The help text a dataclass field carries (``opt``), so a flag says what the field says."""
    return next(f.metadata["help"] for f in fields(cls) if f.name == name)


def add_config_flags(p: argparse.ArgumentParser, only: dict[str, tuple[str, ...]] | None = None) -> None:
    """One flag per config field (dest 'section.field', absent unless given), from the dataclasses;
    ``only``: {section: field names} to declare just those."""
    for section, cls in SECTIONS.items():
        flags = [f for f in fields(cls) if f.metadata.get("cli", True) and (only is None or f.name in only.get(section, ()))]
        group = p.add_argument_group(f"{section} settings") if flags else None
        for f in flags:
            flag, dest = "--" + f.metadata.get("flag", f.name.replace("_", "-")), f"{section}.{f.name}"
            if str(f.type).startswith("bool"):
                group.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction,
                                   default=argparse.SUPPRESS, help=f.metadata.get("help", ""))
            else:
                group.add_argument(flag, dest=dest, type=_flag_type(f), default=argparse.SUPPRESS,
                                   metavar=f.name.upper(), help=f.metadata.get("help", ""))


def overrides_from_flags(args: argparse.Namespace | dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The config flags given ({'section.field': value}, as ``add_config_flags`` parses them) as
    overrides {section: {field: value}} for ``resolve``; other names are not config and are skipped."""
    out: dict[str, dict[str, Any]] = {}
    for key, value in (args if isinstance(args, dict) else vars(args)).items():
        if "." in key:
            section, name = key.split(".", 1)
            out.setdefault(section, {})[name] = value
    return out


# Presets: each reproduces a published configuration (source noted) or is sized for a compute
# budget. Values not named here keep the dataclass defaults.
PRESETS: dict[str, dict[str, Any]] = {
    # Trains on 2 CPU cores in about 3 minutes and gives legible 16x16 digits.
    "digits": {
        "source": "diffuse's embedded default: scikit-learn digits, sized for a 3-minute CPU run",
        "data": {"name": "digits"},
        "model": {"base_channels": 24, "channel_mult": (1, 2, 2), "num_res_blocks": 1,
                  "attn_resolutions": (), "num_groups": 8, "head_channels": 48},
        "diffusion": {"schedule": "cosine", "timesteps": 1000},
        "train": {"steps": 1500, "batch_size": 64, "lr": 2e-3, "warmup_steps": 100, "ema_decay": 0.999},
    },
    # The usual MNIST DDPM setup: cosine schedule, 28x28, three levels. Channels cut from
    # 128/256/512 so it trains on a CPU; raise --base-channels on a GPU.
    "mnist": {
        "source": "a 3-level cosine-schedule MNIST UNet, T=1000, narrowed to 32 base channels for a CPU",
        "data": {"name": "mnist"},
        "model": {"base_channels": 32, "channel_mult": (1, 2, 2), "num_res_blocks": 1,
                  "attn_resolutions": (7,), "num_groups": 8, "head_channels": 32},
        "diffusion": {"schedule": "cosine", "timesteps": 1000},
        "train": {"steps": 4000, "batch_size": 128, "lr": 1e-3, "warmup_steps": 200, "ema_decay": 0.999},
    },
    # Ho et al. 2020, appendix B (CIFAR-10): 35.7M params, the paper's hyper-parameters.
    "cifar10-ddpm": {
        "source": "the DDPM paper's CIFAR-10 UNet (Ho et al. 2020, app. B)",
        "data": {"name": "cifar10"},
        "model": {"base_channels": 128, "channel_mult": (1, 2, 2, 2), "num_res_blocks": 2,
                  "attn_resolutions": (16,), "dropout": 0.1, "num_groups": 32, "head_channels": 256,
                  "scale_shift": False},
        "diffusion": {"schedule": "linear", "timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02},
        "train": {"steps": 800_000, "batch_size": 128, "lr": 2e-4, "warmup_steps": 5000,
                  "ema_decay": 0.9999, "grad_clip": 1.0},
    },
    # A smaller CIFAR-10 UNet for short single-GPU runs: ~16M params, attention at 16 and 8.
    "cifar10-small": {
        "source": "a 16M-parameter CIFAR-10 UNet for short single-GPU runs, linear betas",
        "data": {"name": "cifar10"},
        "model": {"base_channels": 96, "channel_mult": (1, 2, 2), "num_res_blocks": 2,
                  "attn_resolutions": (16, 8), "dropout": 0.1, "num_groups": 32, "head_channels": 64},
        "diffusion": {"schedule": "linear", "timesteps": 1000},
        "train": {"steps": 8000, "batch_size": 128, "lr": 2e-4, "warmup_steps": 500, "ema_decay": 0.9995},
    },
    # 64x64 RGB, 64->128->256->512, attention at 16 and 8, cosine schedule (the folder default).
    "64px": {
        "source": "a 4-level 64x64 UNet, 64-128-256-512 channels, attention at 16x16 and 8x8, cosine",
        "data": {"image_size": 64},
        "model": {"base_channels": 64, "channel_mult": (1, 2, 4, 8), "num_res_blocks": 2,
                  "attn_resolutions": (16, 8), "dropout": 0.1, "num_groups": 32, "head_channels": 64},
        "diffusion": {"schedule": "cosine", "timesteps": 1000},
        "train": {"steps": 100_000, "batch_size": 64, "lr": 2e-4, "warmup_steps": 1000, "ema_decay": 0.9999},
    },
}

# The preset used when only --data is given.
DATA_DEFAULT_PRESET = {"digits": "digits", "mnist": "mnist", "fashion-mnist": "mnist",
                       "cifar10": "cifar10-small"}


# The image size each preset was designed at; attention resolutions scale with it for other sizes.
PRESET_NATIVE_SIZE = {"digits": 16, "mnist": 28, "cifar10-ddpm": 32, "cifar10-small": 32, "64px": 64}


def default_preset_for(data_name: str, size: int | None = None, channels: int | None = None) -> str:
    """The preset used when only --data is given. Standard data sets have their own; a folder's
    follows its resolution and channels (``size``/``channels``, from imagefiles.peek_folder): up to 32
    pixels, grayscale -> mnist (1.6M params), colour -> cifar10-small (17M); larger -> 64px (65M)."""
    if data_name in DATA_DEFAULT_PRESET:
        return DATA_DEFAULT_PRESET[data_name]
    if size is not None and size <= 32:
        return "mnist" if channels == 1 else "cifar10-small"
    return "64px"


MAX_PATCH_SIZE = 8
MAX_ECT_STAGES = 16                 # distill.ect_stages: the gap t - r halves at most this many times


def fit_to_size(cfg: Config, size: int) -> int:
    """Adapt a preset's UNet to a folder's image size: the size rounded up to what its levels
    halve cleanly (28 stays 28 for mnist's 3 levels; 30 becomes 32: upsampling loses nothing), and the attention
    resolutions scaled from the preset's native size (mnist's 7 at 28 is 8 at 32). Returns the size."""
    m = cfg.model
    factor = 2 ** (len(m.channel_mult) - 1) * m.patch_size
    fitted = -(-size // factor) * factor
    inner = fitted // m.patch_size                  # the size the UNet's first level sees
    native = PRESET_NATIVE_SIZE.get(cfg.preset, inner)
    feature_sizes = {inner // 2 ** i for i in range(len(m.channel_mult))}
    scaled = tuple(r * inner // native for r in m.attn_resolutions if r * inner % native == 0)
    m.attn_resolutions = tuple(r for r in scaled if r in feature_sizes)
    return fitted


def _coerce(value: Any, f: dataclasses.Field, where: str) -> Any:
    """Convert a JSON/CLI value to the field's declared type, with a one-line error."""
    typ = str(f.type)
    name = f.name.replace("_", "-")
    if value is None:
        if "None" not in typ:
            raise DiffuseError(f"{where}: {name} cannot be null (expected {typ})")
        return None
    try:
        if typ.startswith("tuple"):
            if isinstance(value, str):
                value = [v for v in value.replace(" ", "").split(",") if v]
            if not isinstance(value, (list, tuple)) or any(
                    isinstance(v, bool) or (isinstance(v, float) and not v.is_integer()) for v in value):
                raise ValueError
            return tuple(int(v) for v in value)
        if typ.startswith("bool"):
            if isinstance(value, str):
                low = value.lower()
                if low in ("1", "true", "yes", "on"):
                    return True
                if low in ("0", "false", "no", "off"):
                    return False
                raise ValueError
            if not isinstance(value, bool):
                raise ValueError
            return value
        if typ.startswith("int"):
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if typ.startswith("float"):
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if typ.startswith("str"):
            if not isinstance(value, str):
                raise ValueError
            return value
    except (TypeError, ValueError):
        raise DiffuseError(f"{where}: bad value {value!r} for {name} (expected {typ})") from None
    return value


def apply_overrides(cfg: Config, overrides: dict[str, Any], source: str) -> None:
    """Merge a nested dict ({section: {field: value}}) into cfg, validating names and types."""
    for key, value in overrides.items():
        if key in ("source", "version"):
            continue
        if key == "preset":
            cfg.preset = str(value)
            continue
        if key not in SECTIONS:
            raise DiffuseError(f"{source}: unknown section {key!r} (expected one of {', '.join(SECTIONS)})")
        if not isinstance(value, dict):
            raise DiffuseError(f"{source}: section {key!r} must be an object")
        section = getattr(cfg, key)
        known = {f.name: f for f in fields(section)}
        for name, v in value.items():
            if name not in known:
                raise DiffuseError(f"{source}: unknown setting {key}.{name}")
            setattr(section, name, _coerce(v, known[name], source))


def load_config_file(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise DiffuseError(f"config file not found: {p}")
    try:
        d = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise DiffuseError(f"config file {p} is not valid JSON: {e.msg} at line {e.lineno}") from None
    except (UnicodeDecodeError, OSError) as e:
        raise DiffuseError(f"config file {p} is not valid JSON (not UTF-8 text: {e})") from None
    if not isinstance(d, dict):
        raise DiffuseError(f"config file {p} must hold a JSON object")
    return d


def resolve(preset: str | None, data_name: str | None, file_overrides: dict | None,
            cli_overrides: dict[str, Any]) -> Config:
    """Build the run config: defaults < preset < config file < CLI flags.

    A folder of images (data_name not a standard set) gets its image size and, unless a preset is
    named, its preset from its images (``imagefiles.peek_folder``, ``default_preset_for``, ``fit_to_size``)."""
    file_data = (file_overrides or {}).get("data")
    file_data = file_data if isinstance(file_data, dict) else {}     # a wrong type is reported below
    data_name = data_name or file_data.get("name") or "digits"
    if not isinstance(data_name, str):
        raise DiffuseError(f"--config: bad value {data_name!r} for data (expected a name or a folder)")
    folder_size = channels = None
    try:
        is_folder = data_name not in STANDARD and Path(data_name).expanduser().is_dir()
    except (ValueError, OSError):                   # a NUL byte, a name too long: not a folder
        is_folder = False
    if is_folder:
        shape = peek_folder(Path(data_name).expanduser())
        size_flag = cli_overrides.get("data", {}).get("image_size") or file_data.get("image_size")
        try:
            folder_size = int(size_flag) if size_flag else shape.default_size
        except (TypeError, ValueError):
            raise DiffuseError(f"bad value {size_flag!r} for image-size (expected an integer)") from None
        channels = cli_overrides.get("data", {}).get("channels") or shape.channels
    named_preset = bool(preset or (file_overrides or {}).get("preset"))
    preset = preset or (file_overrides or {}).get("preset") or default_preset_for(data_name, folder_size, channels)
    if not isinstance(preset, str) or preset not in PRESETS:
        raise DiffuseError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    cfg = Config(preset=preset)
    apply_overrides(cfg, PRESETS[preset], source=f"preset {preset}")
    if folder_size is not None:
        cfg.model.patch_size = _given_patch_size(preset, file_overrides, cli_overrides)
        cfg.data.image_size = fit_to_size(cfg, folder_size)
    if file_overrides:
        apply_overrides(cfg, file_overrides, source="--config")
    apply_overrides(cfg, cli_overrides, source="command line")
    given = set(((file_overrides or {}).get("diffusion") or {})) | set(cli_overrides.get("diffusion", {}))
    scale_linear_betas(cfg, given)
    choose_plan(cfg, file_overrides or {}, cli_overrides, preset_named=named_preset)
    validate(cfg)
    return cfg


def _given_patch_size(preset: str, file_overrides: dict | None, cli_overrides: dict[str, Any]) -> int:
    """The patch size the run will have (preset < config file < command line), for ``fit_to_size``,
    which runs before the overrides so that theirs (an --attn-resolutions) win over its scaling: the
    patches divide the size the UNet's levels see. 1 for a value ``validate`` will refuse."""
    given = Config(preset=preset)
    for overrides, source in ((PRESETS[preset], f"preset {preset}"), (file_overrides, "--config"),
                              (cli_overrides, "command line")):
        if overrides:
            apply_overrides(given, overrides, source=source)
    patch = given.model.patch_size
    return patch if 1 <= patch <= MAX_PATCH_SIZE else 1


def choose_plan(cfg: Config, file_overrides: dict, cli_overrides: dict, *, preset_named: bool) -> None:
    """How long the run is (``train.plan``), from what the user gave rather than what the preset says:
    --steps or --epochs -> "steps" (a --time-limit beside them only caps it); --time-limit alone ->
    "budget" (the preset's step count is dropped: the budget decides); neither -> "preset". A budget
    plan gets the power EMA (``ema_std``) and, unless the user named a preset or a model flag, a
    model sized for the budget (``size_model``)."""
    t = cfg.train
    if t.plan is not None:                    # a stored config (resume, --config of a run): as it was
        return
    given = {section: set(((file_overrides.get(section) or {}) if isinstance(file_overrides.get(section), dict)
                           else {})) | set(cli_overrides.get(section, {})) for section in SECTIONS}
    if given["train"] & {"steps", "epochs"}:
        t.plan = "steps"
    elif "time_limit" in given["train"]:
        start_budget(t)
    else:
        t.plan = "preset"
    if t.plan == "budget" and "sample_steps" not in given["train"]:
        t.sample_steps = BUDGET_GRID_STEPS          # the budget pays for its grids: 20 DDIM steps, not 50
    if t.size_model is None:
        t.size_model = t.plan != "steps" and not preset_named and not (given["model"] - {"class_cond", "patch_size"})
    chose_size = bool({"image_size"} & given["data"]) or "output_size" in given["train"]
    # the planner may change the size only where it chooses the model and the user chose no size
    t.half_size = bool(t.size_model and not chose_size and t.half_size is not False)
    if t.lr_from_size is None:
        t.lr_from_size = "lr" not in given["train"]
    if t.batch_from_plan is None:
        t.batch_from_plan = "batch_size" not in given["train"]
    if t.plan == "budget" and t.size_model:
        budget_step_defaults(t, given["train"])


# A budget plan on a sized model trains at twice the preset's peak rate and half its batch (not below
# MIN_BUDGET_BATCH), unless --lr / --batch-size are given. Measured on MNIST at 2 and 8 minutes
# (docs/budgets.md, benchmarks/results/budget-schedules-mnist.json): the sized models are smaller
# than the preset's and the plan cools the rate down at the end, so a higher peak pays; and a short
# budget is short of optimizer steps, so half the batch buys nearly twice the steps.
BUDGET_LR_FACTOR = 2.0
BUDGET_BATCH_FACTOR = 0.5
MIN_BUDGET_BATCH = 32
# ...and where that batch would leave the sized plan fewer than MIN_BUDGET_STEPS optimizer steps, half
# of it again (not below MIN_BUDGET_BATCH; run._plan_length, once the rate is measured). MNIST on a
# 2-core Intel Xeon, channels_last (benchmarks/results/budget-seeds2-mnist-intel.json, ...-seeds8-...):
# at 2 minutes batch 64 bought about 600 steps and batch 32 scored lower FID on each of three seeds;
# at 8 minutes (about 2,300 steps at 64) the two tied. Per image the two batches ran at about the same
# rate there, so a short budget trades nothing for the extra steps.
MIN_BUDGET_STEPS = 1500
# ...and once the model is sized, at least SIZED_LR for a model of up to SIZED_LR_PARAMS parameters,
# falling as 1/sqrt(params) above (sized_peak_lr). Twice a preset's rate fits that preset's own
# model: the mnist preset's 1e-3 doubled was measured best for the sized MNIST models, but the colour
# presets' 2e-4 was chosen for 17M and 65M parameters; the emoji set, 15 minutes on a Zen 4, the
# sized 0.40M at 64 px: peak 4e-4 gave FID 204.8, 2e-3 gave 161.7 (docs/budgets.md).
SIZED_LR = 2e-3
SIZED_LR_PARAMS = 1_000_000


def sized_peak_lr(lr: float, params: int) -> float:
    """The peak learning rate of a budget plan whose model diffuse sized to ``params`` parameters,
    from the plan's rate so far ``lr`` (the preset's, doubled): max(lr, SIZED_LR * min(1,
    sqrt(SIZED_LR_PARAMS / params))). The digits (4e-3) and mnist (2e-3) plans keep theirs."""
    return max(lr, SIZED_LR * min(1.0, math.sqrt(SIZED_LR_PARAMS / params)))


def budget_step_defaults(t: TrainConfig, given: set[str]) -> None:
    """The peak learning rate and batch of a budget plan whose model diffuse sizes (``choose_plan``)."""
    if "lr" not in given:
        t.lr *= BUDGET_LR_FACTOR
    if "batch_size" not in given:
        t.batch_size = max(min(MIN_BUDGET_BATCH, t.batch_size), int(t.batch_size * BUDGET_BATCH_FACTOR))


def start_budget(t: TrainConfig, minutes: float | None = None) -> None:
    """Make ``t`` a budget plan (of ``minutes``, or its own --time-limit): the budget decides the
    length, so the preset's steps and epochs go; the power EMA of DEFAULT_EMA_STD unless a width
    was given."""
    t.plan, t.steps, t.epochs = "budget", None, None
    if minutes is not None:
        t.time_limit = minutes
    if t.ema_std is None:
        t.ema_std = DEFAULT_EMA_STD


def validate(cfg: Config) -> None:
    """Reject values that cannot work, each with a one-line reason. The stages run in this order, so
    of several bad values the first one met here is the one reported."""
    _validate_finite(cfg)
    _validate_limits(cfg)
    _validate_model(cfg.model)
    _validate_diffusion(cfg.diffusion)
    _validate_train(cfg)
    _validate_data(cfg.data)
    _validate_distill(cfg.distill)


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise DiffuseError(msg)


def _validate_finite(cfg: Config) -> None:
    # NaN and inf pass the range checks of the other stages unnoticed.
    for section in (cfg.data, cfg.model, cfg.diffusion, cfg.train):
        for f in fields(section):
            v = getattr(section, f.name)
            if isinstance(v, float) and not math.isfinite(v):
                raise DiffuseError(f"--{f.name.replace('_', '-')} must be a finite number, got {v}")


def _validate_limits(cfg: Config) -> None:
    """Values too large to run in any time or memory (sizes, counts, intervals), the seed's range
    and the guidance's sign."""
    m, d, t = cfg.model, cfg.diffusion, cfg.train
    for name, value, most in (("base-channels", m.base_channels, 4096), ("num-res-blocks", m.num_res_blocks, 64),
                              ("timesteps", d.timesteps, 100_000), ("batch-size", t.batch_size, 1 << 20),
                              ("sample-n", t.sample_n, 100_000), ("fid-n", t.fid_n, 1_000_000),
                              ("image-size", cfg.data.image_size or 0, 4096), ("num-groups", m.num_groups, 4096),
                              ("head-channels", m.head_channels, 1 << 16), ("steps", t.steps or 0, 1 << 40),
                              ("sample-steps", t.sample_steps, 100_000), ("fid-steps", t.fid_steps, 100_000),
                              ("threads", t.threads or 0, 4096), ("output-size", t.output_size or 0, 4096)):
        _need(value <= most, f"--{name} {value} is too large (at most {most:,})")
    _need(len(m.channel_mult) <= 8 and all(c <= 64 for c in m.channel_mult),
          f"--channel-mult {','.join(map(str, m.channel_mult))} is too large (at most 8 levels, each at most 64)")
    _need(0 <= t.seed < 2 ** 63, f"--seed must be in [0, 2^63), got {t.seed}")
    for name in ("log_every", "sample_every", "ckpt_every", "fid_every", "patience", "max_bad_steps", "keep",
                 "warmup_steps", "fid_ref_n"):
        v = getattr(t, name)
        _need(v is None or v <= 1 << 40, f"--{name.replace('_', '-')} {v} is too large (at most {1 << 40:,})")
    _need(t.sample_guidance >= 0, f"--sample-guidance must be >= 0, got {t.sample_guidance}")


def _validate_model(m: ModelConfig) -> None:
    _need(m.base_channels > 0, f"--base-channels must be positive, got {m.base_channels}")
    _need(len(m.channel_mult) > 0 and all(c > 0 for c in m.channel_mult), "--channel-mult must be positive integers, e.g. 1,2,2")
    _need(m.num_res_blocks >= 1, f"--num-res-blocks must be at least 1, got {m.num_res_blocks}")
    _need(1 <= m.patch_size <= MAX_PATCH_SIZE, f"--patch-size must be between 1 and {MAX_PATCH_SIZE}, got {m.patch_size}")
    _need(0 <= m.dropout < 1, f"--dropout must be in [0, 1), got {m.dropout}")
    _need(m.num_groups >= 1, f"--num-groups must be at least 1, got {m.num_groups}")
    _need(m.norm_eps > 0, f"model.norm_eps must be positive, got {m.norm_eps}")
    _need(m.downsample_padding in (0, 1), f"model.downsample_padding must be 0 or 1, got {m.downsample_padding}")
    for c in {m.base_channels * k for k in m.channel_mult}:
        _need(c % m.num_groups == 0, f"--num-groups {m.num_groups} must divide every level's channels (got {c})")
    _need(m.head_channels >= 1, f"--head-channels must be at least 1, got {m.head_channels}")
    mid = m.base_channels * m.channel_mult[-1]
    _need(mid % _heads(mid, m.head_channels) == 0,
          f"--head-channels {m.head_channels} splits the {mid}-channel middle attention into "
          f"{_heads(mid, m.head_channels)} heads, which do not divide it; use a head width that divides {mid}")


def _validate_diffusion(d: DiffusionConfig) -> None:
    _need(d.schedule in ("linear", "cosine"), f"--schedule must be linear or cosine, got {d.schedule!r}")
    _need(d.timesteps >= 2, f"--timesteps must be at least 2, got {d.timesteps}")
    _need(d.snr_shift > 0, f"--snr-shift must be positive, got {d.snr_shift:g}")
    _need(d.snr_shift == 1.0 or d.formulation == "vp", "--snr-shift shifts a vp schedule; edm draws its noise "
          "levels from --p-mean and --p-std")
    reason = check_diffusion(d)
    _need(reason is None, reason or "")
    _need(0 < d.beta_start < d.beta_end < 1, f"need 0 < --beta-start < --beta-end < 1, got {d.beta_start}, {d.beta_end}"
          + (" (the linear betas scale with 1000/T: use --schedule cosine for small T)" if d.schedule == "linear"
             and d.timesteps < 1000 else ""))
    if d.schedule == "linear":
        # Sampling starts from pure noise, so x_T must hold (almost) no signal: sqrt(abar_T) is the
        # fraction of x_0 left in x_T (Ho et al. 2020, eq. 4). DDPM's betas at T=1000 give 4e-5.
        abar_T = linear_abar_T(d.beta_start, d.beta_end, d.timesteps)
        _need(abar_T <= MAX_ABAR_T, f"linear betas {d.beta_start:g}..{d.beta_end:g} over T={d.timesteps} leave "
                                    f"alpha-bar_T = {abar_T:.3g} (x_T keeps {abar_T ** 0.5:.1%} of the image) but "
                                    f"sampling starts from pure noise; raise --beta-end or --timesteps, or use "
                                    f"--schedule cosine")


def _validate_train(cfg: Config) -> None:
    # Takes the whole config for --data-cache, checked among train's flags as it always was (the
    # order decides which of several bad values is reported).
    t = cfg.train
    _need(t.steps is None or t.steps >= 1, f"--steps must be a positive integer, got {t.steps}")
    _need(t.epochs is None or t.epochs > 0, f"--epochs must be positive, got {t.epochs}")
    _need(t.batch_size >= 1, f"--batch-size must be a positive integer, got {t.batch_size}")
    _need(t.grad_accum >= 1, f"--grad-accum must be a positive integer, got {t.grad_accum}")
    _need(cfg.data.cache in ("auto", "memory", "disk"), f"--data-cache must be auto, memory or disk, got {cfg.data.cache!r}")
    _need(t.threads is None or t.threads >= 1, f"--threads must be a positive integer, got {t.threads}")
    _need(t.lr > 0, f"--lr must be positive, got {t.lr}")
    _need(t.warmup_steps >= 0, f"--warmup-steps must be >= 0, got {t.warmup_steps}")
    _need(t.weight_decay >= 0, f"--weight-decay must be >= 0, got {t.weight_decay}")
    _need(t.grad_clip >= 0, f"--grad-clip must be >= 0, got {t.grad_clip}")
    _need(0 <= t.ema_decay < 1, f"--ema-decay must be in [0, 1), got {t.ema_decay}")
    _need(0 <= t.label_dropout < 1, f"--label-dropout must be in [0, 1), got {t.label_dropout}")
    _need(not cfg.model.class_cond or t.label_dropout > 0,
          "--class-cond needs --label-dropout > 0: the null class (guidance and unconditional samples) is "
          "trained only on dropped labels")
    _need(t.max_bad_steps >= 1, f"--max-bad-steps must be at least 1, got {t.max_bad_steps}")
    _need(t.device in ("auto", "cpu", "cuda") or t.device.startswith("cuda:"), f"--device must be auto, cpu or cuda, got {t.device!r}")
    _need(t.precision in ("auto", "fp32", "bf16"), f"--precision must be auto, fp32 or bf16, got {t.precision!r}")
    _need(t.time_limit is None or t.time_limit > 0, f"--time-limit must be positive minutes, got {t.time_limit}")
    _need(0 < t.cooldown <= 1, f"--cooldown must be a fraction of the budget in (0, 1], got {t.cooldown}")
    _need(t.ema_std is None or 0 < t.ema_std < 0.28,
          f"--ema-std must be in (0, 0.28) (a fraction of the run; 0.05-0.15 is usual), got {t.ema_std}")
    _need(t.plan in (None, "steps", "budget", "preset"), f"plan must be steps, budget or preset, got {t.plan!r}")
    _need(t.log_every >= 1, f"--log-every must be at least 1, got {t.log_every}")
    for name in ("sample_every", "ckpt_every", "patience"):
        v = getattr(t, name)
        _need(v is None or v >= 1, f"--{name.replace('_', '-')} must be at least 1, got {v}")
    _need(t.sample_steps >= 1, f"--sample-steps must be at least 1, got {t.sample_steps}")
    _need(t.sample_n >= 1, f"--sample-n must be at least 1, got {t.sample_n}")
    _need(t.output_size is None or t.output_size >= 1, f"--output-size must be a positive integer, got {t.output_size}")
    _need(t.keep >= 0, f"--keep must be >= 0, got {t.keep}")
    _need(t.fid_every is None or t.fid_every >= 1, f"--fid-every must be at least 1, got {t.fid_every}")
    _need(t.fid_n >= 2, f"--fid-n must be at least 2 (a covariance needs two images), got {t.fid_n}")
    _need(t.fid_ref_n is None or t.fid_ref_n >= 0, f"--fid-ref-n must be >= 0, got {t.fid_ref_n}")
    _need(t.fid_steps >= 1, f"--fid-steps must be at least 1, got {t.fid_steps}")


def _validate_distill(d: DistillConfig) -> None:
    if d.method is None:
        return
    _need(d.method in DISTILL_METHODS, f"--method must be one of {', '.join(DISTILL_METHODS)}, got {d.method!r}")
    calls = DISTILL_METHODS[d.method]
    _need(d.nfe in calls, f"--nfe for {d.method} must be between {calls[0]} and {calls[-1]}, got {d.nfe}")
    if d.sigmas is not None:
        ok = (isinstance(d.sigmas, list) and len(d.sigmas) == d.nfe + 1 and d.sigmas[-1] == 0
              and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in d.sigmas)
              and all(a > b for a, b in zip(d.sigmas, d.sigmas[1:])))
        _need(ok, f"distill.sigmas must be {d.nfe + 1} finite decreasing noise levels ending at 0, got {d.sigmas!r}")
    _need(d.ect_stages is None or 1 <= d.ect_stages <= MAX_ECT_STAGES,
          f"distill.ect_stages must be a whole number from 1 to {MAX_ECT_STAGES}, got {d.ect_stages!r}")
    _need(d.ect_p_mean is None or math.isfinite(d.ect_p_mean),
          f"distill.ect_p_mean must be a finite number, got {d.ect_p_mean!r}")
    _need(d.guidance is None or (isinstance(d.guidance, (int, float)) and math.isfinite(d.guidance) and d.guidance >= 0),
          f"distill.guidance must be a finite number >= 0, got {d.guidance!r}")
    _need(d.ect_target in (None, "data", "teacher"), f"distill.ect_target must be data or teacher, got {d.ect_target!r}")


def _validate_data(data: DataConfig) -> None:
    _need(data.image_size is None or data.image_size >= 4, f"--image-size must be at least 4, got {data.image_size}")
    _need(data.channels in (None, 1, 3), f"--channels must be 1 or 3, got {data.channels}")
    _need(data.placement in ("auto", "device", "host", "memmap"),
          f"--data-placement must be auto, device, host or memmap, got {data.placement!r}")
    _need(0 < data.placement_fraction <= 1, f"--placement-fraction must be in (0, 1], got {data.placement_fraction}")


MAX_ABAR_T = 1e-3      # x_T may keep at most 3% of the image's amplitude (DDPM's T=1000 betas: 0.6%)


def linear_abar_T(beta_start: float, beta_end: float, timesteps: int) -> float:
    """alpha-bar at t = T for linearly spaced betas: prod_t (1 - beta_t), in float64."""
    step = (beta_end - beta_start) / max(1, timesteps - 1)
    return math.exp(math.fsum(math.log1p(-(beta_start + i * step)) for i in range(timesteps)))


def scale_linear_betas(cfg: Config, given: set[str]) -> None:
    """Linear betas that were not given explicitly scale with 1000/T (improved-diffusion's
    ``get_named_beta_schedule``), so --timesteps 100 still ends near pure noise; at T = 1000 they
    are the DDPM paper's 1e-4..0.02."""
    d = cfg.diffusion
    if d.schedule != "linear" or d.timesteps == 1000:
        return
    scale = 1000 / d.timesteps
    if "beta_start" not in given:
        d.beta_start = 1e-4 * scale
    if "beta_end" not in given:
        d.beta_end = 0.02 * scale


def _heads(channels: int, head_channels: int) -> int:
    """Attention heads for a width, as models.AttnBlock splits it."""
    return max(1, channels // max(1, head_channels))


def validate_model_config(m: ModelConfig, where: str) -> None:
    """A stored model config (a checkpoint's) can build a UNet: the data-derived fields are set and
    sensible, and the architecture rules of ``validate`` and ``validate_resolution`` hold."""
    if m.image_size < 4 or m.in_channels not in (1, 3) or m.num_classes < 0 or (m.class_cond and m.num_classes < 1):
        raise DiffuseError(f"{where}: its model config is not a trained model's (image_size {m.image_size}, "
                           f"in_channels {m.in_channels}, num_classes {m.num_classes})")
    validate_resolution(m)


def validate_resolution(m: ModelConfig) -> None:
    """Once image_size is known: the patches must tile the image, and every level halve cleanly."""
    levels = len(m.channel_mult)
    factor = 2 ** (levels - 1) * m.patch_size
    if m.image_size % factor != 0:
        patches = f" and {m.patch_size}x{m.patch_size} patches" if m.patch_size > 1 else ""
        raise DiffuseError(
            f"image size {m.image_size} is not divisible by {factor} (needed by {levels} UNet levels{patches}); "
            f"use --image-size or a shorter --channel-mult")
    inner = m.inner_size
    sizes = {inner // 2 ** i for i in range(levels)}
    bad = [r for r in m.attn_resolutions if r not in sizes]
    if bad:
        raise DiffuseError(f"--attn-resolutions {','.join(map(str, bad))} not among this UNet's feature sizes "
                           f"{','.join(map(str, sorted(sizes, reverse=True)))}")
    for i, mult in enumerate(m.channel_mult):
        c = m.base_channels * mult
        if inner // 2 ** i in m.attn_resolutions and c % _heads(c, m.head_channels):
            raise DiffuseError(f"--head-channels {m.head_channels} splits the {c}-channel attention at "
                               f"{inner // 2 ** i}px into {_heads(c, m.head_channels)} heads, which do not "
                               f"divide it; use a head width that divides {c}")
