"""The training loop: any formulation (objectives.py), AdamW, clipping, EMA, exact resume.

Step k is a pure function of (config, weights and optimizer state after step k-1, k): its batch,
timesteps, noise, flips, label dropout and dropout masks all come from generators seeded by
(seed, k). Grids, FID and checkpoints never touch those generators, so a run stopped at step k and
resumed is bit-identical (on CPU) to one that never stopped.

The stages: ``run.open_run`` sets the run up (lock, device, data, model, state, logs; the one place
that knows rank 0); ``TrainStep`` is one optimizer step, asking a ``Plan`` for the learning rate
and EMA decay; ``duties`` holds what happens between steps (the loss window, the checkpointer,
the periodic duties); ``_train`` is the loop that ties them together, on one screen.
"""

from __future__ import annotations

import contextlib
import errno
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import checkpoint as ckpt_io
from . import distributed as dist
from .budget import BudgetClock, ema_gamma, lr_factor, power_ema_decay
from .config import Config, validate
from .data import is_standard
from .device import autocast_dtype, keep_freed_cpu_memory  # noqa: F401 (re-exported)
from .diffusion import Schedule
from .duties import (AgreedStop, CheckpointEvery, Checkpointer, ClockTick, DivergenceGuard, EpochEnd, FidEvery, GridEvery,
                     LogRow, LossWindow, PaceEstimate, PaceNote, Stop)  # noqa: F401 (PaceEstimate re-exported)
from .errors import DiffuseError
from .evaluation import FidDuringTraining  # noqa: F401 (the loop's --fid-every; importable from here)
from .fsutil import atomic_write
from .images import save_grid, to_uint8, upscale
from .models import batch_slice
from .objectives import Formulation, make_denoiser, weighted_mse
from .rng import ImageNoise, derive_seed, generator
from .run import (Run, batch_split, build_model, build_training, fill_model_from_data,  # noqa: F401 (re-exported)
                  open_run)
from .runlog import read_metrics  # noqa: F401
from .samplers import run_sampler
from .sampling import SamplingSpec

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


class Plan:
    """The learning rate and the EMA decay at each step: the one schedule ``TrainStep`` asks.

    Without a ``clock`` the learning rate depends on the step alone (``lr_at``: linear warm-up to
    --lr, then constant); with one (a budget plan, budget.py) it follows the fraction of the budget
    used: warm-up, the peak, then a linear decay to 0 over the budget's last --cooldown fraction. The
    EMA decay is the fixed --ema-decay (warmed up, ``ema_decay_at``), or with --ema-std the power EMA
    whose width is that fraction of the run so far (``budget.power_ema_decay``)."""

    def __init__(self, cfg: Config, clock: BudgetClock | None = None):
        self.cfg, self.clock = cfg, clock
        self.gamma = ema_gamma(cfg.train.ema_std) if cfg.train.ema_std else None

    def lr(self, step: int) -> float:
        if self.clock is None:
            return lr_at(step, self.cfg)
        t = self.cfg.train
        return t.lr * lr_factor(self.clock.fraction, step, t.warmup_steps, t.cooldown)

    def ema_decay(self, step: int) -> float:
        if self.gamma is not None:
            return power_ema_decay(step + 1, self.gamma)
        return ema_decay_at(step, self.cfg.train.ema_decay)


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
    distilled = cfg.distill.consistency                     # a student's grid: its own sampler at its NFE
    spec = SamplingSpec("consistency" if distilled else "ddim", cfg.distill.nfe if distilled else min(steps, schedule.timesteps),
                        "karras" if distilled else "trailing", guidance=guidance if labels is not None else 0.0,
                        clip_x0=True, seed=derive_seed(seed, "grid")).resolved()
    spec.check(schedule, class_cond=cfg.model.class_cond, conditional=labels is not None, distilled=distilled)
    was_training = net.training
    net.eval()
    den = make_denoiser(net, formulation, labels=labels, guidance=spec.guidance,
                        null_label=cfg.model.num_classes if labels is not None else None, clip_x0=spec.clip_x0,
                        autocast_dtype=amp)
    noise = ImageNoise(spec.seed, range(n), device)
    m = cfg.model
    z = noise.randn(m.in_channels, m.image_size, m.image_size)
    x = run_sampler(spec.sampler, den, z, spec.sigmas(schedule), noise=noise, **spec.sampler_options())
    net.train(was_training)
    return to_uint8(upscale(x, cfg.train.output_size)), labels, nrow


def drop_labels(y: Tensor, p: float, null_label: int, gen: torch.Generator, rows: slice | None = None,
                total: int | None = None) -> Tensor:
    """Replace each label by the null class with probability p (Ho & Salimans 2022, alg. 1), so
    one network learns both eps(x, y) and eps(x, null) for classifier-free guidance. With ``rows``
    of a global batch of ``total``, the draws are made for the whole batch and sliced."""
    if p <= 0:
        return y
    drop = (torch.rand((total or len(y),), generator=gen, device=y.device) < p)[rows or slice(None)]
    return torch.where(drop, torch.full_like(y, null_label), y)


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
    The learning rate and EMA decay of step k come from ``plan`` (default ``Plan(cfg)``).
    """

    def __init__(self, model: nn.Module, ema: nn.Module, optimizer: torch.optim.Optimizer,
                 formulation: Formulation | Schedule, cfg: Config, *, device: torch.device,
                 amp: torch.dtype | None, channels_last: bool, ddp: nn.Module | None = None,
                 rows: slice | None = None, plan: Plan | None = None):
        from .objectives import VP
        self.model, self.ema, self.optimizer, self.ddp = model, ema, optimizer, ddp
        self.cfg, self.device, self.amp, self.channels_last = cfg, device, amp, channels_last
        self.formulation = VP(formulation) if isinstance(formulation, Schedule) else formulation
        self.abar = self.formulation.schedule.alphas_cumprod.to(device)   # float64 [T]
        self.null_label = cfg.model.num_classes if cfg.model.class_cond else None
        self.rows = rows or slice(0, cfg.train.batch_size)
        self.accum = cfg.train.grad_accum
        self.forward = torch.compile(ddp or model) if cfg.train.compile else (ddp or model)
        self.plan = plan or Plan(cfg)
        self.bad: Tensor | None = None       # bool device tensor: was the last step skipped?

    @classmethod
    def for_run(cls, run: Run) -> TrainStep:
        return cls(run.model, run.ema, run.optimizer, run.formulation, run.cfg, device=run.device, amp=run.amp,
                   channels_last=run.channels_last, ddp=run.ddp, rows=run.split.rows, plan=Plan(run.cfg, run.clock))

    def __call__(self, x0: Tensor, y: Tensor | None, step: int) -> tuple[Tensor, Tensor | None]:
        tc, device, rows = self.cfg.train, self.device, self.rows
        B = tc.batch_size                                                 # the global batch
        for g in self.optimizer.param_groups:
            g["lr"] = self.plan.lr(step)
        gen = generator(tc.seed, "step", step, device=device)
        x_in, c_noise, target, weight = self.formulation.training_terms(x0, gen, self.abar, B, rows)
        if self.null_label is None:
            y = None
        elif y is not None:
            y = drop_labels(y, tc.label_dropout, self.null_label, gen, rows, B)
        if self.channels_last:
            x_in = x_in.contiguous(memory_format=torch.channels_last)
        self.optimizer.zero_grad(set_to_none=True)
        mb = x_in.shape[0] // self.accum
        loss_sum = torch.zeros((), device=device)
        for j in range(self.accum):
            part = slice(j * mb, (j + 1) * mb)
            sync = self.ddp is None or j == self.accum - 1
            # Each micro-batch replays the step's dropout seed; batch_slice keeps its rows of the masks.
            torch.manual_seed(derive_seed(tc.seed, "dropout", step))
            # batch_slice covers the backward too: gradient checkpointing redraws the masks there.
            with (contextlib.nullcontext() if sync else self.ddp.no_sync()), batch_slice(rows.start + j * mb, B):
                with torch.autocast(device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
                    out = self.forward(x_in[part], c_noise[part], y[part] if y is not None else None)
                loss = weighted_mse(out, target[part], weight[part] if weight is not None else None)
                # Mean over the global batch: DDP averages over ranks, 1/K over micro-batches.
                (loss / self.accum if self.accum > 1 else loss).backward()
            loss_sum += loss.detach()
        if tc.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), tc.grad_clip)
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
        ema_update(self.ema, self.model, self.plan.ema_decay(step), skip=self.bad)
        return loss_mean, grad_norm


def teacher_checkpoint(cfg: Config) -> Path:
    """The checkpoint ``distill.teacher`` names, which a consistency distillation (--target teacher)
    runs at every step, resumes too; a one-line error if it has gone."""
    path = cfg.distill.teacher
    try:
        return ckpt_io.resolve(path)
    except DiffuseError:
        raise DiffuseError(f"the teacher {path} is gone; a distillation with --target teacher needs it to go on "
                           f"(put it back, or distil the student again)") from None


def load_teacher(run: Run) -> nn.Module:
    """The teacher's EMA network, frozen, in eval mode, on the run's device."""
    src = teacher_checkpoint(run.cfg)
    net = build_model(run.cfg).to(run.device)
    ckpt_io.load_weights_into(net, ckpt_io.read_ema(src), src)
    if run.channels_last:
        net.to(memory_format=torch.channels_last)
    return net.eval().requires_grad_(False)


class DistillStep:
    """One step of consistency tuning (``distill.ConsistencyStep``) as the trainer runs it on a
    distilled run (``cfg.distill.method``), with ``TrainStep``'s interface.

    The student started as the teacher's EMA weights (``run.open_run`` with --init-from the
    teacher). Each step builds the consistency function on the student's denoiser for the batch's
    labels (dropped to the null class as in training, so the student keeps an unconditional mode for
    guidance), between the formulation's sigma_min and the Karras cap its samplers start from
    (``samplers.KARRAS_SIGMA_MAX_CAP``); ECT's stage follows the fraction of the run done (of the
    budget, or of the steps), over the run's recorded stages and lognormal mean
    (``distill.tuning_settings``); the learning rate and EMA come from the ``Plan``. With
    ``distill.ect_target`` "teacher" the target's input is the frozen teacher's ODE step, under the
    recorded ``distill.guidance`` if any (``load_teacher``). One process only."""

    def __init__(self, run: Run):
        from .distill import ConsistencyStep, tuning_settings
        from .samplers import KARRAS_SIGMA_MAX_CAP
        tc = run.cfg.train
        if run.ddp is not None or tc.grad_accum != 1:
            raise DiffuseError("distillation runs in one process without --grad-accum; resume it without torchrun")
        self.run, self.plan = run, Plan(run.cfg, run.clock)
        self.null_label = run.cfg.model.num_classes if run.cfg.model.class_cond else None
        den = make_denoiser(run.model, run.formulation)
        self.sigma_min, self.sigma_max = den.sigma_min, min(den.sigma_max, KARRAS_SIGMA_MAX_CAP)
        d = run.cfg.distill
        self.inner = ConsistencyStep(run.model, None, run.optimizer, seed=tc.seed, grad_clip=tc.grad_clip,
                                     settings=tuning_settings(d.ect_stages, d.ect_p_mean))
        self.teacher = load_teacher(run) if d.ect_target == "teacher" else None
        self.bad: Tensor | None = None

    def progress(self) -> float:
        """The fraction of the run done, in [0, 1]: of the budget, or of the steps."""
        run = self.run
        if run.clock is not None:
            return min(1.0, run.clock.fraction)
        return min(1.0, run.state.step / max(1, run.steps_total))

    def __call__(self, x0: Tensor, y: Tensor | None, step: int) -> tuple[Tensor, Tensor]:
        from .distill import ConsistencyFunction
        run, tc = self.run, self.run.cfg.train
        for g in run.optimizer.param_groups:
            g["lr"] = self.plan.lr(step)
        if self.null_label is None:
            y = None
        elif y is not None:
            y = drop_labels(y, tc.label_dropout, self.null_label, generator(tc.seed, "distill-labels", step, device=run.device))
        den = make_denoiser(run.model, run.formulation, labels=y, autocast_dtype=run.amp)
        f = ConsistencyFunction(den, self.sigma_min, self.sigma_max)
        # a guided distillation: the teacher's step is its guided ODE's, so the student learns the guided
        # map (rows dropped to the null class stay unguided: guidance on the null label is the null output)
        teacher = None if self.teacher is None else make_denoiser(
            self.teacher, run.formulation, labels=y, guidance=run.cfg.distill.guidance or 0.0,
            null_label=self.null_label, autocast_dtype=run.amp)
        loss, grad_norm = self.inner(x0, step, self.progress(), f=f, teacher=teacher)
        self.bad = self.inner.bad
        ema_update(run.ema, run.model, self.plan.ema_decay(step), skip=self.bad)
        return loss, grad_norm


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
# Resuming, and the loop

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
    extend = overrides.get("train", {}).get("time_limit") if cfg.train.plan == "budget" else None
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
    if extend is not None:
        # A budget plan's --time-limit on resume adds minutes to the plan (config.json keeps the total).
        cfg.train.time_limit = _budget_used_s(run) / 60 + extend
    validate(cfg)
    return cfg


def _budget_used_s(run: Path) -> float:
    """The seconds of its budget a run had used at its last checkpoint (0 without one)."""
    last = run / "checkpoints" / "last"
    if not last.exists():
        return 0.0
    return float(ckpt_io.read_state(last.resolve() / "state.json").get("budget_used_s", 0.0))


def train(cfg: Config, *, resume: bool = False, init_from: str | None = None, overwrite: bool = False,
          progress: bool = True) -> Path:
    """Train per ``cfg``; returns the run directory. Resumes from OUT/checkpoints/last if asked.
    The run directory is locked (fsutil.RunLock) for the whole run. A new distilled run (``cfg.distill``)
    starts from its teacher's EMA weights; a gits one is the step search, with nothing to resume."""
    if cfg.distill.method == "gits":             # a distillation without training: the step search
        from .searchrun import search_run
        if resume:
            raise DiffuseError(f"{cfg.train.out} is a gits run: it has no training to resume; run `diffuse "
                               f"distill TEACHER --method gits` again")
        return search_run(cfg, overwrite=overwrite, progress=progress)
    if cfg.distill.method and not resume:
        init_from = init_from or cfg.distill.teacher
    try:
        return _train(cfg, resume=resume, init_from=init_from, overwrite=overwrite, progress=progress)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise DiffuseError(f"no space left on the device while writing {e.filename or 'the run'}; the last "
                           f"checkpoint in {Path(cfg.train.out) / 'checkpoints'} is intact: free space and "
                           f"--resume") from None


def _train(cfg: Config, *, resume: bool, init_from: str | None, overwrite: bool, progress: bool) -> Path:
    # Set up: lock, device, data, model/EMA/optimizer, state (resumed or fresh), logs.
    with open_run(cfg, resume=resume, init_from=init_from, overwrite=overwrite, progress=progress,
                  evaluator=FidDuringTraining, truncate=truncate_metrics) as run:
        step = DistillStep(run) if run.cfg.distill.consistency else TrainStep.for_run(run)
        window = LossWindow(run.state, run.device)          # device-side loss sums, saved with the checkpoint
        ckpt = Checkpointer(run, window)
        stop = None
        # While the loop runs, SIGTERM stops it cleanly (so does Ctrl-C; under torchrun both are
        # agreed at the end of a step, so every rank stops at the same one).
        with dist.StopSignals() as signals:
            # After each step, in order; the first that returns a Stop ends the loop.
            tick = ClockTick(run, signals)
            duties = [tick, PaceNote(run), DivergenceGuard(run, window), LogRow(run, window),
                      EpochEnd(run, window, ckpt), FidEvery(run, ckpt), GridEvery(run, write_grid),
                      CheckpointEvery(run, ckpt), AgreedStop(run, tick)]
            try:
                run.model.train()
                while stop is None and not run.done():
                    # One optimizer step on the batch of global step k (its own seeded draws).
                    x0, y = run.stream.batch(run.state.step)
                    loss, grad_norm = step(x0, y, run.state.step)
                    window.add(loss, step.bad, grad_norm)
                    run.state.step += 1
                    # The duties due at this step count (logs, epoch end, FID, grid, checkpoint, stops).
                    for duty in duties:
                        if duty.due(run.state.step) and (stop := duty()):
                            break
            except KeyboardInterrupt:
                stop = Stop("interrupted", interrupted=True)
        return _finish(run, ckpt, stop or Stop("finished"))


def _finish(run: Run, ckpt: Checkpointer, stop: Stop) -> Path:
    """Save the last checkpoint (none after a divergence), then draw the final grid and the loss
    curve unless interrupted; re-raise Ctrl-C, or report the divergence as a DiffuseError."""
    st, out, rep = run.state, run.out, run.logs.rep
    if stop.diverged:
        # Nothing is saved: the newest checkpoint stays the last good state, never replaced or pruned.
        good = ckpt_io.pointed(run.ckpt_root, "last")
        msg = (f"training stopped at step {st.step}: {stop.reason}; the last checkpoint "
               f"({run.ckpt_root / good if good else 'none yet'}) is intact. Lower --lr, raise --warmup-steps "
               f"or --grad-clip, or check the data")
        rep.line(msg)
        raise DiffuseError(msg)
    path = ckpt.save()
    rep.line(f"{stop.reason} at step {st.step}; checkpoint {path}")
    if not stop.interrupted and run.main:
        final = out / "samples" / f"step_{st.step:07d}.png"
        write_grid(run, final)
        shutil.copyfile(final, out / "final.png")
        plot_loss_curve(out / "metrics.jsonl", out / "loss_curve.png")
        rep.line(f"samples: {out / 'final.png'}  loss curve: {out / 'loss_curve.png'}")
    if stop.interrupted:
        raise KeyboardInterrupt
    return out


def write_grid(run: Run, path: Path) -> None:
    """The EMA's fixed-noise grid (sample_grid) as a PNG at ``path``, and in TensorBoard."""
    tc = run.cfg.train
    images, labels, nrow = sample_grid(run.ema, run.cfg, run.formulation, run.device, tc.sample_n, tc.sample_steps,
                                       tc.seed, run.amp, guidance=tc.sample_guidance)
    save_grid(images, path, nrow=nrow, row_labels=run.class_names)
    run.logs.tb.add_image("samples", _tb_grid(images, nrow), run.state.step, dataformats="HWC")


def _tb_grid(images: Tensor, nrow: int | None):
    from .images import make_grid
    arr = make_grid(images, nrow)
    return arr if arr.shape[-1] == 3 else arr.repeat(3, axis=-1)
