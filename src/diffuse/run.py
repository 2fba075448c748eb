"""One training run's setup and teardown: ``open_run`` and what it builds.

``open_run`` holds the run directory's lock, picks the device, threads and precision, loads the
data, builds the model, its EMA and AdamW, restores the state (``--resume``) or the weights
(``--init-from``), and opens the logs (train.log and the terminal, TensorBoard, metrics.jsonl).
It is the one place that knows which rank is 0: other ranks get silent logs, and write nothing.
However the run ends, on leaving it closes the logs, removes this rank's data memmap and releases
the lock. Nothing here draws from the training random generators except the seeded model init.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from . import checkpoint as ckpt_io
from . import distributed as dist
from .budget import WARMUP_FRACTION, BudgetClock
from .config import MIN_BUDGET_BATCH, MIN_BUDGET_STEPS, Config, sized_peak_lr, start_budget, validate_resolution
from .data import BatchStream, ImageSet, choose_placement, default_flip, fingerprint, load_dataset
from .device import PrecisionChoice, choose_layout, choose_precision, configure, pick_device
from .errors import DiffuseError
from .fsutil import LOCK_NAME, MARKER, RunLock, atomic_write, is_run_dir, mark_run_dir
from .models import UNet, count_parameters
from .objectives import Formulation, describe, formulation_for, same_function
from .outputs import check_dir
from .rng import derive_seed
from .threads import busy_note, set_threads, wait_policy_note


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


def build_training(cfg: Config, device: torch.device, channels_last: bool
                   ) -> tuple[UNet, UNet, torch.optim.Optimizer]:
    """Model (seeded init), its EMA copy and AdamW, on ``device``. cfg.model must be filled in."""
    torch.manual_seed(derive_seed(cfg.train.seed, "init"))
    model = build_model(cfg).to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    if channels_last:
        model.to(memory_format=torch.channels_last)
        ema.to(memory_format=torch.channels_last)
    tc = cfg.train
    model.grad_checkpointing = tc.grad_checkpointing
    # Fused AdamW: one kernel per parameter on CPU and CUDA (3.3x faster than foreach on CPU for
    # the 35.7M-parameter DDPM UNet, measured).
    optimizer = torch.optim.AdamW(model.parameters(), lr=tc.lr, betas=(0.9, 0.999), eps=1e-8,
                                  weight_decay=tc.weight_decay, fused=True)
    return model, ema, optimizer


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


# ----------------------------------------------------------------------------------------------
# Reporting

def format_seconds(s: float) -> str:
    s = max(0, int(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


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

    def set_total(self, total: int) -> None:
        """A new end for the bar (a budget plan's step count, re-estimated from the measured pace)."""
        if self.bar is not None:
            self.bar.total = total
            self.bar.refresh()

    def progress(self, step: int, stats: dict[str, Any], eta_s: float, total: int) -> None:
        msg = (f"step {step}/{total or '?'} | loss {stats['loss']:.4f} | {stats['img_per_sec']:.0f} img/s | "
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


class _Silent:
    """Stands in for the reporter and TensorBoard writer on ranks other than 0."""

    def __getattr__(self, name: str):
        return lambda *a, **k: None


class Logs:
    """Where a run reports: ``rep`` (train.log and the terminal), ``tb`` (TensorBoard) and
    ``row`` (one JSON line of metrics.jsonl). Ranks other than 0 get stand-ins that write nothing."""

    def __init__(self, out: Path, main: bool, total: int, start: int, resumed: bool, progress: bool):
        if main:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(out / "tb"), purge_step=start if resumed else None)
            self.rep = Reporter(out, total, start, enabled=progress)
        else:
            self.tb, self.rep = _Silent(), _Silent()
        self.metrics = open(out / "metrics.jsonl" if main else os.devnull, "a")

    def row(self, row: dict[str, Any]) -> None:
        self.metrics.write(json.dumps(row) + "\n")
        self.metrics.flush()

    def close(self) -> None:
        self.metrics.close()
        self.tb.close()
        self.rep.close()


# ----------------------------------------------------------------------------------------------
# State and the run directory

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
    budget_used_s: float = 0.0       # a budget plan: seconds of the budget used (agreed over ranks)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def total_steps(cfg: Config, n_images: int) -> int:
    """The run's steps; in a budget plan 0 until a measured rate estimates them (they are only shown)."""
    tc = cfg.train
    if tc.epochs is not None:
        return max(1, math.ceil(tc.epochs * n_images / tc.batch_size))
    if tc.steps is None:
        if is_budget(cfg):
            return 0
        raise DiffuseError("give --steps, --epochs or --time-limit")
    return tc.steps


def is_budget(cfg: Config) -> bool:
    """A run planned for a wall-clock budget (--time-limit alone), schedules ending with it."""
    return cfg.train.plan == "budget" and cfg.train.time_limit is not None


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


# ----------------------------------------------------------------------------------------------
# The run

class Run:
    """Everything one training run holds while it trains (filled in by ``open_run``).

    cfg, out (the run directory), ckpt_root (out/checkpoints), device, precision (amp: the autocast
    dtype or None), channels_last, split (this rank's share of the batch), main (rank 0?),
    data, data_fp (its fingerprint), steps_total, sample_every, ckpt_every, model, ema, optimizer,
    ddp (the DDP wrapper or None), formulation, stream (the seeded batch stream), state (RunState),
    fid (the --fid-every evaluator or None), logs (Logs), resumed."""

    cfg: Config
    out: Path
    device: torch.device
    precision: PrecisionChoice
    amp: torch.dtype | None
    channels_last: bool
    layout_reason: str              # why channels_last, where it depended on this CPU ('' elsewhere)
    split: BatchSplit
    main: bool
    data: ImageSet
    steps_total: int
    model: UNet
    ema: UNet
    optimizer: torch.optim.Optimizer
    formulation: Formulation
    state: RunState
    ddp: nn.Module | None
    fid: Any
    data_fp: dict[str, Any]
    sample_every: int
    ckpt_every: int
    n_params: int
    placement: str
    memmap_path: Path

    def __init__(self, cfg: Config, resumed: bool):
        self.cfg, self.resumed = cfg, resumed
        self.stream: BatchStream | None = None
        self.logs: Logs | None = None
        self.clock: BudgetClock | None = None         # a budget plan's clock (budget.py), else None
        self.sized: Any = None                        # the model size chosen for the budget, if any

    @property
    def class_names(self) -> list[str] | None:
        """Row labels for grids, FID's class balance and the checkpoint: only for a class-conditional model."""
        return self.data.class_names if self.cfg.model.class_cond else None

    def done(self) -> bool:
        """The run's end: its steps done, or in a budget plan its budget spent."""
        if self.clock is not None:
            return self.clock.spent
        return self.state.step >= self.steps_total

    @property
    def ckpt_root(self) -> Path:
        return self.out / "checkpoints"


def _choose_hardware(run: Run, cfg: Config, resume: bool) -> tuple[int, str | None]:
    """Device (this rank's under torchrun), threads, one precision on every rank, channels_last,
    the batch split. Returns (threads, a note on a busy machine or None)."""
    tc = cfg.train
    run.device = device = dist.init(tc.device) or pick_device(tc.device)
    # Threads before the precision probe: its key has the thread count.
    threads = set_threads(tc.threads or dist.threads_per_rank())
    busy = busy_note()                               # before our own work adds to the load
    if busy and wait_policy_note():
        busy += f"; {wait_policy_note()}"
    configure(device)
    if resume and tc.precision == "auto" and tc.resolved_precision in ("fp32", "bf16"):
        # a resumed run keeps the precision it started with: exact resume, whatever a new probe says
        precision = choose_precision(tc.resolved_precision, device)
        precision.reason = f"as when the run started (auto chose {tc.resolved_precision})"
    else:
        precision = choose_precision(tc.precision, device)
    run.precision = dist.agree_precision(precision, tc.precision)        # one precision on every rank
    tc.resolved_precision = run.precision.name
    run.amp = run.precision.dtype
    if resume and tc.channels_last is None and tc.resolved_channels_last is not None and device.type == "cpu":
        # as the precision: the layout changes the conv kernels and so the last bits of every step
        run.channels_last, run.layout_reason = tc.resolved_channels_last, "layout as when the run started"
    else:
        run.channels_last, run.layout_reason = choose_layout(tc.channels_last, device, run.amp)
    # one layout on every rank, as one precision: each rank's probe runs on its own threads and load
    run.channels_last, run.layout_reason = dist.from_rank0((run.channels_last, run.layout_reason))
    tc.resolved_channels_last = run.channels_last
    run.split = batch_split(tc.batch_size, dist.world(), dist.rank(), tc.grad_accum)
    run.main = dist.is_main()
    return threads, busy


def _load_data(run: Run, cfg: Config) -> None:
    """The data set, the model's shape from it, the run's length and its grid and checkpoint periods."""
    run.data = load_dataset(cfg.data.name, cfg.data.root, "train", cfg.data.image_size, cfg.data.channels,
                            cache=cfg.data.cache)
    fill_model_from_data(cfg, run.data)
    out = cfg.train.output_size
    if out is not None and out < run.data.image_size:
        raise DiffuseError(f"--output-size {out} is below the training size {run.data.image_size}: the run writes its "
                           f"images at the size it trains or larger (upscaled); lower --image-size instead")
    if cfg.data.flip is None:
        cfg.data.flip = default_flip(cfg.data.name)
    run.steps_total = total_steps(cfg, len(run.data))
    _set_periods(run, cfg)
    run.data_fp = fingerprint(cfg.data.name, run.data)


def _set_periods(run: Run, cfg: Config) -> None:
    """The grid and checkpoint periods in steps; None in a budget plan unless given (duties.Cadence
    then takes quarters and fifths of the budget)."""
    tc = cfg.train
    if is_budget(cfg):
        run.sample_every, run.ckpt_every = tc.sample_every, tc.ckpt_every
        return
    # About 10 grids per run, but at least 100 steps apart: a grid (64 images x 50 steps) costs
    # about as much as 1,000 training images, so a 60-step run would otherwise spend most of its
    # time drawing grids.
    run.sample_every = tc.sample_every or max(100, run.steps_total // 10)
    run.ckpt_every = tc.ckpt_every or max(1, run.steps_total // 5)


# A run whose length the user left to diffuse never takes longer than this on the machine it runs
# on; where the preset's steps would, it trains for DEFAULT_BUDGET_MIN instead.
DAY_S = 24 * 3600.0
DEFAULT_BUDGET_MIN = 60.0


def _rank0_choice(run: Run, cfg: Config):
    """Rank 0's ``sizing.choose`` for the budget, data, image size and batch as they stand, sent to every rank."""
    from .sizing import choose
    return dist.from_rank0(choose(cfg, len(run.data), cfg.train.time_limit * 60, run.device, run.amp,
                                  run.channels_last) if run.main else None)


def _plan_length(run: Run, cfg: Config) -> str | None:
    """A fresh run's length and model where the user left them to diffuse; returns the start
    line's note (or None). The measurements are rank 0's, sent to every rank.

    - ``plan == "preset"`` (neither --steps nor --time-limit): the preset's steps, unless at this
      machine's measured rate they would take over a day; then a DEFAULT_BUDGET_MIN budget plan.
    - a budget plan with ``size_model``: the UNet size from ``sizing.choose`` for the budget."""
    tc, notes = cfg.train, []
    if tc.plan == "preset":
        from .sizing import preset_rate
        validate_resolution(cfg.model)          # the probe builds this model: a bad size is the user's, in one line
        rate = dist.from_rank0(preset_rate(cfg, run.device, run.amp, run.channels_last)
                               if run.main else None)
        need_s = run.steps_total * tc.batch_size / rate
        if need_s <= DAY_S:
            return None
        notes.append(f"the {cfg.preset} preset's {run.steps_total:,} steps would take about "
                     f"{format_seconds(need_s)} here ({rate:.3g} img/s measured), over a day: training for a "
                     f"{DEFAULT_BUDGET_MIN:g}-min budget instead (--time-limit MIN to choose one, --steps N to insist)")
        start_budget(tc, DEFAULT_BUDGET_MIN)
        run.steps_total = total_steps(cfg, len(run.data))
        _set_periods(run, cfg)
    if is_budget(cfg) and tc.size_model:
        from .sizing import MIN_PARAMS_PER_PIXEL, half_size, ladder
        try:
            ladder(cfg.model.inner_size)
        except ValueError as e:            # a size the ladder's UNets cannot halve: keep the preset's model
            notes.append(f"model: the preset's ({e})")
            return "; ".join(notes)

        choice = _rank0_choice(run, cfg)
        half = half_size(cfg.model.image_size, choice.params) if tc.half_size else None
        if half is not None:
            full, full_choice = cfg.model.image_size, choice
            cfg.data.image_size, tc.output_size = half, full
            _load_data(run, cfg)
            choice = _rank0_choice(run, cfg)
            notes.append(f"trains at {half} px and writes its images at the folder's {full} px (bicubic): at "
                         f"{full} px the budget affords {full_choice.params / 1e6:.2g}M params, "
                         f"{full_choice.params / full ** 2:.0f} per output pixel (< {MIN_PARAMS_PER_PIXEL})")
        batch_note = None
        if tc.batch_from_plan and tc.batch_size > MIN_BUDGET_BATCH and choice.images / tc.batch_size < MIN_BUDGET_STEPS:
            fewer, old_batch = int(choice.images // tc.batch_size), tc.batch_size
            tc.batch_size = max(MIN_BUDGET_BATCH, tc.batch_size // 2)
            run.split = batch_split(tc.batch_size, dist.world(), dist.rank(), tc.grad_accum)
            choice = _rank0_choice(run, cfg)
            batch_note = (f"batch {tc.batch_size}: at batch {old_batch} the budget buys {fewer:,} steps "
                          f"(< {MIN_BUDGET_STEPS:,})")
        for name, value in choice.model.items():
            setattr(cfg.model, name, value)
        if tc.lr_from_size:
            tc.lr = sized_peak_lr(tc.lr, choice.params)
        run.sized = choice
        run.steps_total = int(choice.images // tc.batch_size)
        notes.append(choice.reason)
        if batch_note:
            notes.append(batch_note)
    return "; ".join(notes) or None


def _resume(run: Run, locks: list[RunLock], truncate: Callable[[Path, int], None]) -> RunState:
    """Lock the run, load OUT/checkpoints/last into the model, EMA and optimizer, drop the metrics
    rows logged after it. Every rank reads the checkpoint before rank 0 writes anything."""
    if run.main:
        locks.append(RunLock(run.out).acquire())
        ckpt_io.clean_temporaries(run.ckpt_root)
    dist.barrier()
    last = run.ckpt_root / "last"
    if not last.exists():
        raise DiffuseError(f"--resume {run.out}: no checkpoint to resume from (checkpoints/last is missing)")
    state = ckpt_io.load_training_state(last.resolve(), run.model, run.ema, run.optimizer)
    check_same_data(state.get("data_fingerprint"), run.data_fp, run.cfg.data.name)
    st = RunState(**{k: state[k] for k in RunState().to_dict() if k in state})
    dist.barrier()                                  # every rank has read it before rank 0 writes
    if run.main:
        truncate(run.out / "metrics.jsonl", st.step)
        if not is_run_dir(run.out):
            mark_run_dir(run.out)                     # a run made before the marker existed
    return st


def _start_fresh(run: Run, locks: list[RunLock], init_from: str | None, overwrite: bool) -> RunState:
    """Make (or empty) the run directory; with --init-from, start the model and EMA from a checkpoint's EMA."""
    if init_from:                                # refuse before touching --out
        src = ckpt_io.resolve(init_from)
        src_cfg = Config.from_dict(ckpt_io.read_header(src)["config"])
        why = same_function(src_cfg.diffusion, run.cfg.diffusion)
        if why:
            raise DiffuseError(f"--init-from {init_from}: trained under another formulation ({why}); its "
                               f"weights compute a different function, so start from scratch or match it")
    if run.main:
        locks.append(prepare_out_dir(run.out, overwrite))
    dist.barrier()
    if init_from:
        # Start both the model and its EMA from the source's EMA weights: those are the
        # weights its samples came from, and the optimizer starts fresh anyway.
        weights = ckpt_io.read_ema(src)
        ckpt_io.load_weights_into(run.model, weights, src)
        ckpt_io.load_weights_into(run.ema, weights, src)
    return RunState()


def _open_stream(run: Run) -> str:
    """This rank's seeded batch stream (run.stream, run.placement); returns why the data lives there."""
    cfg, tc = run.cfg, run.cfg.train
    placement, why = choose_placement(run.data.images.numel(), run.device, cfg.data.placement,
                                      device_fraction=cfg.data.placement_fraction)
    run.memmap_path = run.out / f"data-memmap{f'-rank{dist.rank()}' if dist.active() else ''}.u8"   # one per rank
    run.stream = BatchStream(run.data, tc.batch_size, tc.seed, run.device, bool(cfg.data.flip), placement,
                             memmap_path=run.memmap_path, rows=run.split.rows)
    if run.stream.placement != placement:
        placement, why = run.stream.placement, "the data set is an on-disk cache (--data-cache)"
    run.placement = placement
    return why


def _header(run: Run, threads: int, busy: str | None, placement_why: str, plan_note: str | None) -> None:
    cfg, tc, data, st, rep = run.cfg, run.cfg.train, run.data, run.state, run.logs.rep
    if run.clock is not None:
        length = (f"budget {tc.time_limit:g} min ({format_seconds(run.clock.used_s)} used at step {st.step}"
                  f"{f', about {run.steps_total:,} steps' if run.steps_total else ''})")
    else:
        length = f"steps {st.step}->{run.steps_total}"
    # a distillation tunes its teacher's network: its preset names nothing the user chose here
    model = ("model sized for the budget" if run.sized is not None else
             "the teacher's model" if cfg.distill.method else f"preset {cfg.preset}")
    written = f", written at {cfg.written_size} px" if cfg.written_size != data.image_size else ""
    command = "distill" if cfg.distill.method else "train"
    rep.line(f"diffuse {command} | {cfg.data.name} ({len(data)} images, {data.channels}x{data.image_size}x"
             f"{data.image_size}{written}"
             f"{f', {data.num_classes} classes' if cfg.model.class_cond else ''}) | {model} | "
             f"{run.n_params / 1e6:.2f}M params | {run.device.type}"
             f"{' bf16' if run.amp else ' fp32'}{' channels_last' if run.channels_last else ''} | {threads} threads"
             f"{' per rank' if dist.active() else ''} | batch {tc.batch_size}{run.split.describe()} | "
             f"{length} | out {run.out}{f' | {busy}' if busy else ''}")
    if plan_note:
        rep.line(f"plan: {plan_note}")
    if cfg.distill.method:
        rep.line(f"distill: {cfg.distill.describe()}")
    if run.clock is not None:
        rep.line(f"plan: learning rate warms up to {tc.lr:g} over {WARMUP_FRACTION:.0%} of the budget, holds, then "
                 f"decays linearly to 0 over its last {tc.cooldown:.0%}, at batch {tc.batch_size}; power EMA of width "
                 f"{tc.ema_std:g} of the run (docs/budgets.md)", echo=False)
    layout = f"; {run.layout_reason}" if run.layout_reason else ""
    rep.line(f"precision {run.precision.name}: {run.precision.reason}{layout}; data on {run.placement}: {placement_why}")
    rep.line(f"objective: {describe(cfg.diffusion)}", echo=False)
    if run.resumed:
        rep.line(f"resumed from step {st.step}")
    if getattr(data, "on_disk", False):
        rep.line(f"data: on-disk uint8 cache {data.cache_path} (memory-mapped; batches gathered on the host)")


@contextlib.contextmanager
def open_run(cfg: Config, *, resume: bool, init_from: str | None, overwrite: bool, progress: bool,
             evaluator: Callable[[Config, torch.device], Any],
             truncate: Callable[[Path, int], None]) -> Iterator[Run]:
    """Set up the run per ``cfg`` (see the module docstring); yields the ``Run``.

    ``evaluator(cfg, device)`` builds the --fid-every measurer before any step (so a missing
    Inception file fails the run at once); ``truncate(metrics path, step)`` drops the rows a
    resumed run will make again. (train passes them in: the evaluator, evaluation.FidDuringTraining,
    sits a floor above this module, see tests/test_layers.py.)"""
    run, locks = Run(cfg, resume), []
    try:
        run.out = check_dir(cfg.train.out)          # before any work: a run that cannot write is refused now
        threads, busy = _choose_hardware(run, cfg, resume)
        _load_data(run, cfg)
        plan_note = None if resume or init_from else _plan_length(run, cfg)
        run.model, run.ema, run.optimizer = build_training(cfg, run.device, run.channels_last)
        run.n_params = count_parameters(run.model)
        run.state = _resume(run, locks, truncate) if resume else _start_fresh(run, locks, init_from, overwrite)
        if is_budget(cfg):
            run.clock = BudgetClock(cfg.train.time_limit * 60, used_s=run.state.budget_used_s)
        run.fid = evaluator(cfg, run.device) if cfg.train.fid_every else None     # fails early
        if run.main:
            atomic_write(run.out / "config.json", cfg.to_json())
            (run.out / "samples").mkdir(exist_ok=True)
        run.formulation = formulation_for(cfg.diffusion)
        placement_why = _open_stream(run)
        run.ddp = wrap_ddp(run.model, run.device) if dist.active() else None   # after channels_last (build_training)
        run.logs = Logs(run.out, run.main, run.steps_total, run.state.step, resume, progress)
        _header(run, threads, busy, placement_why, plan_note)
        yield run
    finally:
        if run.logs is not None:
            run.logs.close()
        if run.stream is not None and run.placement == "memmap":
            run.stream = None                        # its memmap is closed before the file goes
            run.memmap_path.unlink(missing_ok=True)
        for lock in locks:
            lock.release()
