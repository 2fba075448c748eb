"""The training loop: any formulation (objectives.py), AdamW, clipping, EMA, exact resume.

Step k is a pure function of (config, weights and optimizer state after step k-1, k): its batch,
timesteps, noise, flips, label dropout and dropout masks all come from generators seeded by
(seed, k). Grids and checkpoints never touch those generators, so a run stopped at step k and
resumed is bit-identical (on CPU) to one that never stopped.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import checkpoint as ckpt_io
from . import distributed as dist
from .config import Config, validate, validate_resolution
from .data import BatchStream, ImageSet, choose_placement, default_flip, fingerprint, is_standard, load_dataset
from .device import (autocast_dtype, choose_precision, configure, keep_freed_cpu_memory,  # noqa: F401 (re-exported)
                     pick_device, use_channels_last)
from .diffusion import Schedule
from .errors import DiffuseError
from .evaluation import FidDuringTraining  # noqa: F401 (the loop's --fid-every; importable from here)
from .fsutil import LOCK_NAME, MARKER, RunLock, atomic_write, is_run_dir, mark_run_dir
from .images import save_grid, to_uint8
from .models import UNet, batch_slice, count_parameters
from .objectives import Formulation, describe, formulation_for, make_denoiser, same_function, weighted_mse
from .outputs import check_dir
from .rng import ImageNoise, derive_seed, generator
from .runlog import read_metrics  # noqa: F401
from .samplers import run_sampler
from .sampling import SamplingSpec
from .threads import busy_note, set_threads, wait_policy_note

# Diffusion settings that define what the network computes (flag names): --init-from cannot bridge
# a change of these either (objectives.same_function).
FORMULATION_FIELDS = {"formulation": "formulation", "prediction": "objective", "zero_terminal_snr": "zero-terminal-snr",
                      "sigma_data": "sigma-data"}
# Settings a resumed run may change; anything else must match the stored config.
RESUMABLE = {"steps", "epochs", "time_limit", "log_every", "sample_every", "ckpt_every", "keep",
             "patience", "device", "threads", "grad_accum", "cache", "compile", "grad_checkpointing", "out", "fid_every",
             "fid_n", "fid_ref_n", "fid_sampler", "fid_steps", "root", "max_bad_steps"}


# ----------------------------------------------------------------------------------------------
# Building blocks shared with sampling and evaluation

def build_model(cfg: Config) -> UNet:
    validate_resolution(cfg.model)
    return UNet(cfg.model)


def fill_model_from_data(cfg: Config, data: ImageSet) -> None:
    m = cfg.model
    m.image_size, m.in_channels = data.image_size, data.channels
    if m.class_cond:
        if data.labels is None or not data.num_classes:
            raise DiffuseError(f"--class-cond needs labels, and {data.name} has none "
                               f"(for a folder, put each class's images in its own sub-folder)")
        m.num_classes = data.num_classes
    else:
        m.num_classes = 0


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float, skip: Tensor | None = None) -> None:
    """ema <- decay * ema + (1 - decay) * model, as one fused foreach op over all tensors.
    ``skip``: a bool device tensor; where True the EMA is left exactly as it was (weight 0), decided
    on the device without a host sync."""
    e = [p for p in ema.parameters()]
    m = [p.detach() for p in model.parameters()]
    if skip is None:
        torch._foreach_lerp_(e, m, 1.0 - decay)
    else:
        # One 0-dim weight per tensor (the TensorList overload): a single tensor weight is read
        # back to the host by foreach_lerp_ on the CPU (a sync); the list form is not, and equal.
        weight = torch.where(skip, 0.0, 1.0 - decay).to(e[0].dtype)
        torch._foreach_lerp_(e, m, [weight] * len(e))
    for be, bm in zip(ema.buffers(), model.buffers()):
        be.copy_(bm)


def ema_decay_at(step: int, decay: float) -> float:
    """Warm-up so short runs are not stuck near the initial weights (as in TF's EMA num_updates)."""
    return min(decay, (1 + step) / (10 + step))


def lr_at(step: int, cfg: Config) -> float:
    w = cfg.train.warmup_steps
    return cfg.train.lr * min(1.0, (step + 1) / w) if w else cfg.train.lr


def grid_labels(cfg: Config, n: int) -> tuple[Tensor | None, int | None]:
    """Labels for the training grids: one row per class (n // classes each, at least 1) when
    conditional, else none. Returns (labels [n'] or None, images per row or None)."""
    k = cfg.model.num_classes if cfg.model.class_cond else 0
    if not k:
        return None, None
    per_row = max(1, n // k)
    return torch.arange(k).repeat_interleave(per_row), per_row


@torch.no_grad()
def sample_grid(net: nn.Module, cfg: Config, formulation: Formulation, device: torch.device, n: int,
                steps: int, seed: int, amp: torch.dtype | None, guidance: float = 0.0) -> tuple[Tensor, Tensor | None, int | None]:
    """Fixed-noise DDIM grid from ``net`` (the EMA), uint8 [n, C, H, W]. Uses its own generators."""
    labels, nrow = grid_labels(cfg, n)
    if labels is not None:
        n = len(labels)
        labels = labels.to(device)
    schedule = formulation.schedule
    spec = SamplingSpec("ddim", min(steps, schedule.timesteps), "trailing", guidance=guidance if labels is not None
                        else 0.0, clip_x0=True, seed=derive_seed(seed, "grid")).resolved()
    spec.check(schedule, class_cond=cfg.model.class_cond, conditional=labels is not None)
    was_training = net.training
    net.eval()
    den = make_denoiser(net, formulation, labels=labels, guidance=spec.guidance,
                        null_label=cfg.model.num_classes if labels is not None else None, clip_x0=spec.clip_x0,
                        autocast_dtype=amp)
    noise = ImageNoise(spec.seed, range(n), device)
    m = cfg.model
    z = noise.randn(m.in_channels, m.image_size, m.image_size)
    x = run_sampler(spec.sampler, den, z, spec.sigmas(schedule), **spec.sampler_options())
    net.train(was_training)
    return to_uint8(x), labels, nrow


def build_training(cfg: Config, device: torch.device, channels_last: bool
                   ) -> tuple[UNet, UNet, torch.optim.Optimizer]:
    """Model (seeded init), its EMA copy and AdamW, on ``device``. cfg.model must be filled in."""
    torch.manual_seed(derive_seed(cfg.train.seed, "init"))
    model = build_model(cfg).to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    if channels_last:
        model.to(memory_format=torch.channels_last)
        ema.to(memory_format=torch.channels_last)
    t = cfg.train
    model.grad_checkpointing = t.grad_checkpointing
    # Fused AdamW: one kernel per parameter on CPU and CUDA (3.3x faster than foreach on CPU for
    # the 35.7M-parameter DDPM UNet, measured).
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=(0.9, 0.999), eps=1e-8,
                                  weight_decay=t.weight_decay, fused=True)
    return model, ema, optimizer


def drop_labels(y: Tensor, p: float, null_label: int, gen: torch.Generator, rows: slice | None = None,
                total: int | None = None) -> Tensor:
    """Replace each label by the null class with probability p (Ho & Salimans 2022, alg. 1), so
    one network learns both eps(x, y) and eps(x, null) for classifier-free guidance. With ``rows``
    of a global batch of ``total``, the draws are made for the whole batch and sliced."""
    if p <= 0:
        return y
    drop = (torch.rand((total or len(y),), generator=gen, device=y.device) < p)[rows or slice(None)]
    return torch.where(drop, torch.full_like(y, null_label), y)


@dataclass(frozen=True)
class BatchSplit:
    """How one global batch of B images is shared: ``world`` ranks take contiguous ``rows`` of
    B / world each, and run them as ``accum`` micro-batches."""
    batch: int
    world: int
    rank: int
    accum: int

    @property
    def per_rank(self) -> int:
        return self.batch // self.world

    @property
    def rows(self) -> slice:
        return slice(self.rank * self.per_rank, (self.rank + 1) * self.per_rank)

    def describe(self) -> str:
        if self.world == 1 and self.accum == 1:
            return ""
        return (f" ({self.world} rank{'s' if self.world > 1 else ''} x {self.per_rank // self.accum} images"
                f" x {self.accum} micro-batch{'es' if self.accum > 1 else ''})")


def batch_split(batch: int, world: int, rank: int, accum: int) -> BatchSplit:
    if batch % (world * accum):
        raise DiffuseError(f"--batch-size {batch} (the global batch) must be divisible by the number of ranks "
                           f"times --grad-accum ({world} x {accum})")
    return BatchSplit(batch, world, rank, accum)


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel around ``model`` (already channels_last: DDP's buckets follow the
    parameters' layout). Gradients stay float32 (autocast keeps fp32 parameters), which gloo needs."""
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   gradient_as_bucket_view=True)


class TrainStep:
    """One optimizer step of diffusion training (Ho et al. 2020, alg. 1, generalised), as the trainer runs it.

    ``step(x0, y, k)``: x0 [b, C, H, W] float in [-1, 1] on device, this process's ``rows`` of the
    global batch of B = cfg.train.batch_size; y [b] long or None; k the global step. The
    formulation (objectives.py) draws the noise level and eps for the whole global batch from the
    generator seeded by (seed, k) and keeps ``rows``, and forms the network input, the target and
    the per-sample weight; label dropout and CPU dropout masks are drawn for the global batch too
    (models.batch_slice), so how the batch is split across ranks and micro-batches changes none of
    them. The rows run as cfg.train.grad_accum micro-batches; with ``ddp`` (the
    DistributedDataParallel wrapper of ``model``) gradients are all-reduced on the last one only
    (no_sync). Then weighted MSE, clip, AdamW, EMA. Returns (loss, grad_norm) as device tensors
    (no host sync); loss is this process's mean. A ``Schedule`` is taken as vp/eps/uniform.
    """

    def __init__(self, model: nn.Module, ema: nn.Module, optimizer: torch.optim.Optimizer,
                 formulation: Formulation | Schedule, cfg: Config, *, device: torch.device,
                 amp: torch.dtype | None, channels_last: bool, ddp: nn.Module | None = None,
                 rows: slice | None = None):
        from .objectives import VP
        self.model, self.ema, self.optimizer, self.ddp = model, ema, optimizer, ddp
        self.cfg, self.device, self.amp, self.channels_last = cfg, device, amp, channels_last
        self.formulation = VP(formulation) if isinstance(formulation, Schedule) else formulation
        self.abar = self.formulation.schedule.alphas_cumprod.to(device)   # float64 [T]
        self.null_label = cfg.model.num_classes if cfg.model.class_cond else None
        self.rows = rows or slice(0, cfg.train.batch_size)
        self.accum = cfg.train.grad_accum
        self.forward = torch.compile(ddp or model) if cfg.train.compile else (ddp or model)
        self.bad: Tensor | None = None       # bool device tensor: was the last step skipped?

    def __call__(self, x0: Tensor, y: Tensor | None, step: int) -> tuple[Tensor, Tensor | None]:
        t, device, rows = self.cfg.train, self.device, self.rows
        B = t.batch_size                                                  # the global batch
        for g in self.optimizer.param_groups:
            g["lr"] = lr_at(step, self.cfg)
        gen = generator(t.seed, "step", step, device=device)
        x_in, c_noise, target, weight = self.formulation.training_terms(x0, gen, self.abar, B, rows)
        if self.null_label is None:
            y = None
        elif y is not None:
            y = drop_labels(y, t.label_dropout, self.null_label, gen, rows, B)
        if self.channels_last:
            x_in = x_in.contiguous(memory_format=torch.channels_last)
        self.optimizer.zero_grad(set_to_none=True)
        mb = x_in.shape[0] // self.accum
        loss_sum = torch.zeros((), device=device)
        for j in range(self.accum):
            part = slice(j * mb, (j + 1) * mb)
            sync = self.ddp is None or j == self.accum - 1
            # Each micro-batch replays the step's dropout seed; batch_slice keeps its rows of the masks.
            torch.manual_seed(derive_seed(t.seed, "dropout", step))
            # batch_slice covers the backward too: gradient checkpointing redraws the masks there.
            with (contextlib.nullcontext() if sync else self.ddp.no_sync()), batch_slice(rows.start + j * mb, B):
                with torch.autocast(device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
                    out = self.forward(x_in[part], c_noise[part], y[part] if y is not None else None)
                loss = weighted_mse(out, target[part], weight[part] if weight is not None else None)
                # Mean over the global batch: DDP averages over ranks, 1/K over micro-batches.
                (loss / self.accum if self.accum > 1 else loss).backward()
            loss_sum += loss.detach()
        if t.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip)
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in self.model.parameters() if p.grad is not None])
        # A non-finite loss or gradient skips the step on the device (no host sync): fused AdamW
        # leaves weights, moments and its step count alone when found_inf is 1 (GradScaler's
        # mechanism), and the EMA lerps with weight 0. The trainer counts self.bad.
        loss_mean = loss_sum / self.accum
        # Under DDP the gradients (and so their norm) are the same on every rank, so every rank
        # skips the same steps; a non-finite loss makes non-finite gradients.
        self.bad = ~torch.isfinite(grad_norm) if self.ddp is not None else \
            ~(torch.isfinite(loss_mean) & torch.isfinite(grad_norm))
        self.optimizer.found_inf = self.bad.float()
        self.optimizer.step()
        ema_update(self.ema, self.model, ema_decay_at(step, t.ema_decay), skip=self.bad)
        return loss_mean, grad_norm


# ----------------------------------------------------------------------------------------------
# Reporting

class Reporter:
    """Progress bar on a terminal, plain log lines otherwise; every line also goes to train.log."""

    def __init__(self, out: Path, total: int, start: int, enabled: bool = True):
        self.log_file = open(out / "train.log", "a")
        self.tty = sys.stderr.isatty() and enabled
        self.bar = None
        if self.tty:
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, file=sys.stderr)

    def line(self, msg: str, echo: bool = True) -> None:
        self.log_file.write(msg + "\n")
        self.log_file.flush()
        if echo:
            if self.bar is not None:
                self.bar.write(msg, file=sys.stderr)
            else:
                print(msg, file=sys.stderr, flush=True)

    def progress(self, step: int, stats: dict[str, Any], eta_s: float, total: int) -> None:
        msg = (f"step {step}/{total} | loss {stats['loss']:.4f} | {stats['img_per_sec']:.0f} img/s | "
               f"lr {stats['lr']:.2e} | eta {format_seconds(eta_s)}")
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix_str(f"loss {stats['loss']:.4f} {stats['img_per_sec']:.0f} img/s", refresh=True)
            self.log_file.write(msg + "\n")
            self.log_file.flush()
        else:
            self.line(msg)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.log_file.close()


class PaceEstimate:
    """Seconds per step from the first few steps, reported once so nobody waits blind.

    The first step is left out (kernel selection, allocator warm-up, compilation); the estimate
    is given after 3 more steps that together took at least 2 s, or after 20 steps, whichever is
    first. On CUDA, reading the clock waits for the queued work once (one sync in the run)."""

    def __init__(self, start: int, device: torch.device):
        self.first = start + 1               # the clock starts after this step
        self.device = device
        self.t0: float | None = None
        self.done = False

    def after_step(self, step: int, loss: Tensor) -> float | None:
        if self.done:
            return None
        if step == self.first:
            self._sync(loss)
            self.t0 = time.perf_counter()
            return None
        n = step - self.first
        if self.t0 is None or n < 3:
            return None
        elapsed = time.perf_counter() - self.t0
        if elapsed < 2.0 and n < 20:
            return None
        self._sync(loss)
        self.done = True
        return (time.perf_counter() - self.t0) / n

    def _sync(self, loss: Tensor) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


class _Silent:
    """Stands in for the reporter and TensorBoard writer on ranks other than 0."""

    def __getattr__(self, name: str):
        return lambda *a, **k: None


def format_seconds(s: float) -> str:
    s = max(0, int(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def plot_loss_curve(metrics_path: Path, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    rows = [r for r in rows if r.get("loss") is not None]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (weighted MSE on the objective)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.set_title("training loss")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop rows logged after the checkpoint we restart from (they will be re-made)."""
    rows = [r for r in read_metrics(path) if r.get("step", 0) <= step]
    atomic_write(path, "".join(json.dumps(r) + "\n" for r in rows))


# ----------------------------------------------------------------------------------------------
# The loop

@dataclass
class RunState:
    step: int = 0
    best_loss: float = math.inf
    best_fid: float | None = None
    bad_epochs: int = 0
    epoch_loss_sum: float = 0.0
    epoch_loss_n: int = 0
    log_loss_sum: float = 0.0                 # the metrics row in progress: loss sum and steps since the
    log_loss_n: int = 0                       # last --log-every row, so a resumed run logs the same rows
    train_seconds: float = 0.0
    bad_steps: int = 0               # steps skipped for a non-finite loss or gradient

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def total_steps(cfg: Config, n_images: int) -> int:
    t = cfg.train
    if t.epochs is not None:
        return max(1, math.ceil(t.epochs * n_images / t.batch_size))
    if t.steps is None:
        raise DiffuseError("give --steps or --epochs")
    return t.steps


def prepare_out_dir(out: Path, overwrite: bool) -> RunLock:
    """Make (or, with --overwrite, empty) the run directory, marked as diffuse's and locked.
    Returns the held lock. Only a directory with diffuse's marker file is ever emptied, and only
    while no other process trains in it."""
    if out.exists() and not out.is_dir():
        raise DiffuseError(f"--out {out} is a file, not a directory")
    if out.exists() and any(p.name != LOCK_NAME for p in out.iterdir()):
        if not overwrite:
            raise DiffuseError(f"{out} already holds a run; continue it with --resume {out}, "
                               f"choose another --out, or pass --overwrite to replace it")
        if not is_run_dir(out):
            raise DiffuseError(f"refusing to --overwrite {out}: it has no {MARKER} file, so diffuse did not "
                               f"make it (delete it yourself if it should go)")
        lock = RunLock(out).acquire()
        for child in sorted(out.iterdir(), key=lambda c: c.name == MARKER):      # the marker last
            if child.name == LOCK_NAME:
                continue
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
    else:
        out.mkdir(parents=True, exist_ok=True)
        lock = RunLock(out).acquire()
    mark_run_dir(out)
    return lock


def check_same_data(then: dict[str, Any] | None, now: dict[str, Any], name: str) -> None:
    """Refuse to resume on data that differs from what the run started with, naming the difference.
    (A checkpoint without a fingerprint, from before they were recorded, is taken on trust.)"""
    if not then or then == now:
        return
    if then.get("count") != now.get("count"):
        what = f"{then.get('count'):,} images then, {now.get('count'):,} now"
    elif then.get("files") != now.get("files"):
        what = f"{then.get('files'):,} files then, {now.get('files'):,} now"
    elif then.get("bytes") != now.get("bytes"):
        what = f"{then.get('bytes'):,} bytes then, {now.get('bytes'):,} now"
    else:
        what = "the same number of images and bytes, but file names or sizes differ"
    raise DiffuseError(f"--resume: the data {name} changed since this run started ({what}); resuming on other "
                       f"data would not continue the same run: restore the data, or start a new run with "
                       f"--init-from")


def load_resume_config(run: Path, overrides: dict[str, Any]) -> Config:
    """The stored config of ``run`` with the allowed changes applied; others are refused."""
    path = run / "config.json"
    if not path.is_file():
        raise DiffuseError(f"--resume {run}: not a run directory (no config.json)")
    try:
        stored = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DiffuseError(f"--resume {run}: config.json is unreadable ({e})") from None
    if not isinstance(stored, dict):
        raise DiffuseError(f"--resume {run}: config.json must hold a JSON object")
    cfg = Config.from_dict(stored)
    for section, values in overrides.items():
        for name, value in values.items():
            current = getattr(getattr(cfg, section), name)
            # A folder data set may move (a run carried to another machine): the fingerprint
            # stored in the checkpoint, not the path, says whether it is the same data.
            moved_folder = (section, name) == ("data", "name") and not is_standard(str(value)) \
                and not is_standard(str(current))
            if name in RESUMABLE or moved_folder:
                setattr(getattr(cfg, section), name, value)
            elif value != current and section == "diffusion" and name in FORMULATION_FIELDS:
                raise DiffuseError(f"--resume: cannot change --{FORMULATION_FIELDS[name]} of an existing run (it was "
                                   f"{current!r}): its network learned that formulation's output; train a new run")
            elif value != current:
                raise DiffuseError(f"--resume: cannot change {name.replace('_', '-')} of an existing run "
                                   f"(it was {current!r}); start a new run with --init-from instead")
    validate(cfg)
    return cfg


def train(cfg: Config, *, resume: bool = False, init_from: str | None = None, overwrite: bool = False,
          progress: bool = True) -> Path:
    """Train per ``cfg``; returns the run directory. Resumes from OUT/checkpoints/last if asked.
    The run directory is locked (fsutil.RunLock) for the whole run."""
    locks: list[RunLock] = []
    try:
        return _train(cfg, locks, resume=resume, init_from=init_from, overwrite=overwrite, progress=progress)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise DiffuseError(f"no space left on the device while writing {e.filename or 'the run'}; the last "
                           f"checkpoint in {Path(cfg.train.out) / 'checkpoints'} is intact: free space and "
                           f"--resume") from None
    finally:
        for lock in locks:
            lock.release()


def _train(cfg: Config, locks: list[RunLock], *, resume: bool, init_from: str | None, overwrite: bool,
           progress: bool) -> Path:
    t = cfg.train
    out = check_dir(t.out)                      # before any work: a run that cannot write is refused now
    device = dist.init(t.device) or pick_device(t.device)       # under torchrun: this rank's device
    threads = set_threads(t.threads or dist.threads_per_rank())  # before the precision probe: its key has the thread count
    busy = busy_note()                               # before our own work adds to the load
    if busy and wait_policy_note():
        busy += f"; {wait_policy_note()}"
    configure(device)
    if resume and t.precision == "auto" and t.resolved_precision in ("fp32", "bf16"):
        # a resumed run keeps the precision it started with: exact resume, whatever a new probe says
        precision = choose_precision(t.resolved_precision, device)
        precision.reason = f"as when the run started (auto chose {t.resolved_precision})"
    else:
        precision = choose_precision(t.precision, device)
    precision = dist.agree_precision(precision, t.precision)        # one precision on every rank
    t.resolved_precision = precision.name
    amp = precision.dtype
    channels_last = use_channels_last(t.channels_last, device, amp)
    split = batch_split(t.batch_size, dist.world(), dist.rank(), t.grad_accum)
    main = dist.is_main()

    data = load_dataset(cfg.data.name, cfg.data.root, "train", cfg.data.image_size, cfg.data.channels,
                        cache=cfg.data.cache)
    fill_model_from_data(cfg, data)
    if cfg.data.flip is None:
        cfg.data.flip = default_flip(cfg.data.name)
    steps_total = total_steps(cfg, len(data))
    # About 10 grids per run, but at least 100 steps apart: a grid (64 images x 50 steps) costs
    # about as much as 1,000 training images, so a 60-step run would otherwise spend most of its
    # time drawing grids.
    sample_every = t.sample_every or max(100, steps_total // 10)
    ckpt_every = t.ckpt_every or max(1, steps_total // 5)

    model, ema, optimizer = build_training(cfg, device, channels_last)

    ckpt_root = out / "checkpoints"
    st = RunState()
    data_fp = fingerprint(cfg.data.name, data)
    if resume:
        if main:
            locks.append(RunLock(out).acquire())
            ckpt_io.clean_temporaries(ckpt_root)
        dist.barrier()
        last = ckpt_root / "last"
        if not last.exists():
            raise DiffuseError(f"--resume {out}: no checkpoint to resume from (checkpoints/last is missing)")
        state = ckpt_io.load_training_state(last.resolve(), model, ema, optimizer)
        check_same_data(state.get("data_fingerprint"), data_fp, cfg.data.name)
        st = RunState(**{k: state[k] for k in RunState().to_dict() if k in state})
        dist.barrier()                                  # every rank has read it before rank 0 writes
        if main:
            truncate_metrics(out / "metrics.jsonl", st.step)
            if not is_run_dir(out):
                mark_run_dir(out)                     # a run made before the marker existed
    else:
        if init_from:                                # refuse before touching --out
            src = ckpt_io.resolve(init_from)
            src_cfg = Config.from_dict(ckpt_io.read_header(src)["config"])
            why = same_function(src_cfg.diffusion, cfg.diffusion)
            if why:
                raise DiffuseError(f"--init-from {init_from}: trained under another formulation ({why}); its "
                                   f"weights compute a different function, so start from scratch or match it")
        if main:
            locks.append(prepare_out_dir(out, overwrite))
        dist.barrier()
        if init_from:
            # Start both the model and its EMA from the source's EMA weights: those are the
            # weights its samples came from, and the optimizer starts fresh anyway.
            weights = ckpt_io.read_tensors(src / "ema.safetensors" if src.is_dir() else src)
            ckpt_io.load_weights_into(model, weights, src)
            ckpt_io.load_weights_into(ema, weights, src)
    fid_eval = FidDuringTraining(cfg, device) if t.fid_every else None      # fails early: weights, data
    if main:
        atomic_write(out / "config.json", cfg.to_json())
        (out / "samples").mkdir(exist_ok=True)

    formulation = formulation_for(cfg.diffusion)
    placement, placement_why = choose_placement(data.images.numel(), device, cfg.data.placement,
                                                device_fraction=cfg.data.placement_fraction)
    memmap_path = out / f"data-memmap{f'-rank{dist.rank()}' if dist.active() else ''}.u8"     # one per rank
    stream = BatchStream(data, t.batch_size, t.seed, device, bool(cfg.data.flip), placement,
                         memmap_path=memmap_path, rows=split.rows)
    if stream.placement != placement:
        placement, placement_why = stream.placement, "the data set is an on-disk cache (--data-cache)"
    ddp = wrap_ddp(model, device) if dist.active() else None        # after channels_last (build_training)
    train_step = TrainStep(model, ema, optimizer, formulation, cfg, device=device, amp=amp,
                           channels_last=channels_last, ddp=ddp, rows=split.rows)

    if main:
        from torch.utils.tensorboard import SummaryWriter
        tb = SummaryWriter(str(out / "tb"), purge_step=st.step if resume else None)
        rep = Reporter(out, steps_total, st.step, enabled=progress)
    else:                                          # only rank 0 prints, logs and writes
        tb, rep = _Silent(), _Silent()
    n_params = count_parameters(model)
    header = (f"diffuse train | {cfg.data.name} ({len(data)} images, {data.channels}x{data.image_size}x{data.image_size}"
              f"{f', {data.num_classes} classes' if cfg.model.class_cond else ''}) | preset {cfg.preset} | "
              f"{n_params / 1e6:.2f}M params | {device.type}"
              f"{' bf16' if amp else ' fp32'}{' channels_last' if channels_last else ''} | {threads} threads"
              f"{' per rank' if dist.active() else ''} | batch {t.batch_size}{split.describe()} | "
              f"steps {st.step}->{steps_total} | out {out}{f' | {busy}' if busy else ''}")
    rep.line(header)
    rep.line(f"precision {precision.name}: {precision.reason}; data on {placement}: {placement_why}")
    rep.line(f"objective: {describe(cfg.diffusion)}", echo=False)
    if resume:
        rep.line(f"resumed from step {st.step}")
    if getattr(data, "on_disk", False):
        rep.line(f"data: on-disk uint8 cache {data.cache_path} (memory-mapped; batches gathered on the host)")

    metrics = open(out / "metrics.jsonl" if main else os.devnull, "a")
    stop_reason = "finished"
    interrupted = False
    signals = dist.StopSignals().__enter__()       # SIGTERM (and Ctrl-C under torchrun): an agreed stop

    saved: dict[int, Path] = {}

    def save() -> Path:
        """Called by every rank at the same step: ranks check they agree, rank 0 writes, all wait."""
        if st.step in saved:
            return saved[st.step]
        # Loss sums as the mean over ranks, so every rank resumes from the same (global) window.
        st.epoch_loss_sum = float(dist.mean_(epoch_acc.clone()))
        st.log_loss_sum, st.log_loss_n = float(dist.mean_(loss_acc.clone())), acc_n
        st.bad_steps = bad_base + int(bad_total)
        dist.check_same([*model.parameters(), *ema.parameters()], "model and EMA weights")
        path = ckpt_root / ckpt_io.step_dir_name(st.step)
        if main:
            path = ckpt_io.save_checkpoint(
                ckpt_root, st.step, model=model, ema=ema, optimizer=optimizer, config=cfg.to_dict(),
                state={**st.to_dict(), "images_seen": st.step * t.batch_size, "data_fingerprint": data_fp},
                extra={"class_names": data.class_names if cfg.model.class_cond else None,
                       "params": n_params, "data": cfg.data.name})
            ckpt_io.prune(ckpt_root, t.keep)
        dist.barrier()
        saved[st.step] = path
        return path

    row_names = data.class_names if cfg.model.class_cond else None

    def write_grid(path: Path) -> None:
        images, labels, nrow = sample_grid(ema, cfg, formulation, device, t.sample_n, t.sample_steps, t.seed, amp,
                                           guidance=t.sample_guidance)
        save_grid(images, path, nrow=nrow, row_labels=row_names)
        tb.add_image("samples", _tb_grid(images, nrow), st.step, dataformats="HWC")

    def measure_fid() -> None:
        r = fid_eval(ema, formulation, row_names, amp)
        row = {"step": st.step, "fid": r["fid"], "kid": r["kid"], "kid_std": r["kid_std"], "fid_n": r["n"],
               "fid_ref_n": r["n_ref"], "fid_seconds": r["seconds"]}
        metrics.write(json.dumps(row) + "\n")
        metrics.flush()
        tb.add_scalar(f"eval/fid_n{r['n']}", r["fid"], st.step)
        if r["kid"] is not None:
            tb.add_scalar(f"eval/kid_n{r['n']}", r["kid"], st.step)
        better = st.best_fid is None or r["fid"] < st.best_fid
        if better:
            st.best_fid = r["fid"]
            name = save().name
            if main:
                ckpt_io.point(ckpt_root, "best", name)
        rep.line(f"step {st.step}: FID {r['fid']:.2f} (N={r['n']:,} {t.fid_sampler}/{t.fid_steps} samples vs "
                 f"N_ref={r['n_ref']:,}; biased upward at small N, compare only equal N; {r['seconds']:.0f}s)"
                 f"{' new best' if better else ''}")

    # Each metrics row's loss is the mean over the steps since the previous --log-every row. The sum
    # is kept on the device (read only when logging) and carried in checkpoints, so a run resumed
    # between two rows writes the same next row as one that never stopped. float32 -> JSON -> float32
    # is exact.
    loss_acc = torch.tensor(st.log_loss_sum, device=device)
    acc_n = st.log_loss_n
    epoch_acc = torch.tensor(st.epoch_loss_sum, device=device)   # this epoch's loss sum, for --patience
    rate_n = 0                                      # steps since t_log in this process, for img/s
    t_log = time.perf_counter()
    t_start = time.perf_counter()
    time_limit_s = t.time_limit * 60 if t.time_limit else None
    last_grad_norm: Tensor | None = None
    pace = PaceEstimate(st.step, device)
    # Skipped (non-finite) steps, counted on the device and read with the loss: since the last
    # read, and the longest run of consecutive ones (stop at --max-bad-steps).
    bad_acc = torch.zeros((), dtype=torch.long, device=device)
    bad_total, bad_base = torch.zeros((), dtype=torch.long, device=device), st.bad_steps
    epoch_bad = torch.zeros((), dtype=torch.long, device=device)
    streak = torch.zeros((), dtype=torch.long, device=device)
    max_streak = torch.zeros((), dtype=torch.long, device=device)
    diverged = False
    try:
        model.train()
        while st.step < steps_total:
            step = st.step
            x0, y = stream.batch(step)
            loss, grad_norm = train_step(x0, y, step)
            bad = train_step.bad
            if grad_norm is not None:
                last_grad_norm = grad_norm
            st.step += 1
            estimate = pace.after_step(st.step, loss)
            if estimate is not None:
                per_1000 = estimate * 1000
                rep.line(f"pace: {format_seconds(per_1000)} per 1,000 steps at batch {t.batch_size} "
                         f"(measured over steps {pace.first + 1}-{st.step}); this run: about "
                         f"{format_seconds(estimate * (steps_total - st.step))} more")
            good_loss = torch.where(bad, 0.0, loss.detach())
            loss_acc += good_loss
            epoch_acc += good_loss
            bad_acc += bad
            bad_total += bad
            epoch_bad += bad
            streak.add_(1).mul_(bad)
            torch.maximum(max_streak, streak, out=max_streak)
            acc_n += 1
            rate_n += 1

            st.epoch_loss_n += 1
            epoch_done = int(stream.epoch_of(st.step)) > int(stream.epoch_of(step))
            on_grid = st.step % t.log_every == 0
            if on_grid or st.step == steps_total or st.step % t.max_bad_steps == 0:
                if int(max_streak) >= t.max_bad_steps:              # one sync per K steps at most
                    diverged = True
                    stop_reason = (f"{int(max_streak)} consecutive steps had a non-finite loss or gradient "
                                   f"(each skipped: weights, optimizer moments and EMA untouched)")
                    break
                max_streak.zero_()                  # a streak still running raises it again
            if on_grid or st.step == steps_total:
                now = time.perf_counter()
                n_bad = int(bad_acc)
                st.bad_steps = bad_base + int(bad_total)
                loss_sum = float(dist.mean_(loss_acc))                      # over ranks
                mean_loss = loss_sum / (acc_n - n_bad) if acc_n > n_bad else None
                elapsed = now - t_log
                rate = rate_n * t.batch_size / max(elapsed, 1e-9)
                st.train_seconds += elapsed
                stats = {"step": st.step, "images_seen": st.step * t.batch_size,
                         "epoch": round(stream.epoch_of(st.step), 4), "loss": mean_loss,
                         "lr": optimizer.param_groups[0]["lr"],
                         "grad_norm": float(last_grad_norm) if last_grad_norm is not None else None,
                         "img_per_sec": rate, "wall_time": round(st.train_seconds, 3), "bad_steps": n_bad}
                if stats["grad_norm"] is not None and not math.isfinite(stats["grad_norm"]):
                    stats["grad_norm"] = None
                if n_bad:
                    rep.line(f"step {st.step}: skipped {n_bad} step(s) with a non-finite loss or gradient "
                             f"({st.bad_steps} in this run)")
                metrics.write(json.dumps(stats) + "\n")
                metrics.flush()
                for k in ("loss", "lr", "grad_norm", "img_per_sec"):
                    if stats[k] is not None:
                        tb.add_scalar(f"train/{k}", stats[k], st.step)
                eta = (steps_total - st.step) * elapsed / rate_n
                if mean_loss is not None:
                    rep.progress(st.step, stats, eta, steps_total)
                if on_grid:                         # a run's last row off the grid keeps the window open
                    loss_acc.zero_()
                    acc_n = 0
                    bad_acc.zero_()
                rate_n = 0
                t_log = time.perf_counter()

            if epoch_done:
                ep_loss = float(dist.mean_(epoch_acc)) / max(1, st.epoch_loss_n - int(epoch_bad))   # the same on every rank
                epoch_acc.zero_()
                epoch_bad.zero_()
                st.epoch_loss_n = 0
                tb.add_scalar("train/epoch_loss", ep_loss, st.step)
                if t.patience and ep_loss < st.best_loss - 1e-4:
                    st.best_loss, st.bad_epochs = ep_loss, 0
                    if fid_eval is None:                     # with --fid-every, best means best FID
                        name = save().name
                        if main:
                            ckpt_io.point(ckpt_root, "best", name)
                elif t.patience:
                    st.bad_epochs += 1
                    if st.bad_epochs >= t.patience:
                        stop_reason = f"early stop: no loss improvement for {t.patience} epochs"
                        break
            if fid_eval is not None and st.step % t.fid_every == 0:
                measure_fid()
            if st.step % sample_every == 0 and st.step < steps_total and main:
                write_grid(out / "samples" / f"step_{st.step:07d}.png")
            if st.step % ckpt_every == 0 and st.step < steps_total:
                save()
            # Stops that one rank sees alone (its clock, a signal) are agreed, so all stop together.
            over_time = time_limit_s is not None and time.perf_counter() - t_start >= time_limit_s
            signalled, over_time = dist.agree(signals.raised, over_time)
            if signalled:
                interrupted, stop_reason = True, "interrupted"
                break
            if over_time:
                stop_reason = f"time limit of {t.time_limit:g} min reached"
                break
    except KeyboardInterrupt:
        interrupted = True
        stop_reason = "interrupted"
    finally:
        signals.__exit__()
        metrics.close()

    if diverged:
        # Nothing is saved: the newest checkpoint stays the last good state, never replaced or pruned.
        good = ckpt_io.pointed(ckpt_root, "last")
        msg = (f"training stopped at step {st.step}: {stop_reason}; the last checkpoint "
               f"({ckpt_root / good if good else 'none yet'}) is intact. Lower --lr, raise --warmup-steps "
               f"or --grad-clip, or check the data")
        rep.line(msg)
        tb.close()
        rep.close()
        raise DiffuseError(msg)
    try:
        path = save()
        rep.line(f"{stop_reason} at step {st.step}; checkpoint {path}")
        if not interrupted and main:
            write_grid(out / "samples" / f"step_{st.step:07d}.png")
            shutil.copyfile(out / "samples" / f"step_{st.step:07d}.png", out / "final.png")
            plot_loss_curve(out / "metrics.jsonl", out / "loss_curve.png")
            rep.line(f"samples: {out / 'final.png'}  loss curve: {out / 'loss_curve.png'}")
    finally:
        tb.close()
        rep.close()
        if placement == "memmap":
            del stream
            memmap_path.unlink(missing_ok=True)
    if interrupted:
        raise KeyboardInterrupt
    return out


def _tb_grid(images: Tensor, nrow: int | None):
    from .images import make_grid
    arr = make_grid(images, nrow)
    return arr if arr.shape[-1] == 3 else arr.repeat(3, axis=-1)
