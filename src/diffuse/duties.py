"""What the training loop does between steps: the loss window, the checkpointer and the duties.

Each duty is a small object with ``due(step) -> bool`` (step: the number of steps done) and
``__call__() -> Stop | None``; the loop calls the due ones in order after every step and stops
at the first ``Stop``. Duties read the loss only through the ``LossWindow`` (device-side sums,
read on the host only when a row or an epoch closes) and never draw from the training random
generators, so a run stopped and resumed is bit-identical to one that never stopped. Duties that
talk across ranks (the loss means, the agreed stop, checkpoints) are due at the same steps on
every rank.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from . import checkpoint as ckpt_io
from . import distributed as dist
from .run import Run, RunState, format_seconds


@dataclass(frozen=True)
class Stop:
    """Why training stops. ``interrupted``: save, skip the final grid, re-raise Ctrl-C;
    ``diverged``: save nothing, so the newest checkpoint stays the last good state."""
    reason: str
    interrupted: bool = False
    diverged: bool = False


class LossWindow:
    """The loss since the last metrics row and in this epoch, summed on the device (no host sync per step).

    Each metrics row's loss is the mean over the steps since the previous --log-every row; the
    sums are read only when a row or an epoch closes and are carried in checkpoints (``save_into``,
    ``from_state``), so a run resumed between two rows writes the same next row as one that never
    stopped (float32 -> JSON -> float32 is exact). Skipped (non-finite) steps add 0 to the sums and
    are counted: since the last row, in this epoch, in the run, and as the longest streak of
    consecutive ones since the divergence guard last looked."""

    def __init__(self, st: RunState, device: torch.device):
        count = dict(dtype=torch.long, device=device)
        self.row, self.row_n = torch.tensor(st.log_loss_sum, device=device), st.log_loss_n
        self.epoch, self.epoch_n = torch.tensor(st.epoch_loss_sum, device=device), st.epoch_loss_n
        self.row_bad, self.epoch_bad = torch.zeros((), **count), torch.zeros((), **count)
        self.bad_total, self.bad_base = torch.zeros((), **count), st.bad_steps
        self.streak, self.max_streak = torch.zeros((), **count), torch.zeros((), **count)
        self.grad_norm: Tensor | None = None          # the newest step's gradient norm, for the row

    def add(self, loss: Tensor, bad: Tensor, grad_norm: Tensor | None) -> None:
        """One step's mean loss (0-dim) and whether it was skipped (0-dim bool), both on the device."""
        if grad_norm is not None:
            self.grad_norm = grad_norm
        good = torch.where(bad, 0.0, loss.detach())
        self.row += good
        self.epoch += good
        self.row_bad += bad
        self.bad_total += bad
        self.epoch_bad += bad
        self.streak.add_(1).mul_(bad)
        torch.maximum(self.max_streak, self.streak, out=self.max_streak)
        self.row_n += 1
        self.epoch_n += 1

    @property
    def bad_steps(self) -> int:
        return self.bad_base + int(self.bad_total)

    def read_row(self) -> tuple[float | None, int]:
        """(the row's mean loss over ranks, None if every step was skipped; its skipped steps)."""
        n_bad = int(self.row_bad)
        loss_sum = float(dist.mean_(self.row))
        return (loss_sum / (self.row_n - n_bad) if self.row_n > n_bad else None), n_bad

    def close_row(self) -> None:
        self.row.zero_()
        self.row_n = 0
        self.row_bad.zero_()

    def close_epoch(self) -> float:
        """The epoch's mean loss over its good steps, the same on every rank; starts the next epoch."""
        loss = float(dist.mean_(self.epoch)) / max(1, self.epoch_n - int(self.epoch_bad))
        self.epoch.zero_()
        self.epoch_bad.zero_()
        self.epoch_n = 0
        return loss

    def save_into(self, st: RunState) -> None:
        # Sums as the mean over ranks, so every rank resumes from the same (global) window.
        st.epoch_loss_sum, st.epoch_loss_n = float(dist.mean_(self.epoch.clone())), self.epoch_n
        st.log_loss_sum, st.log_loss_n = float(dist.mean_(self.row.clone())), self.row_n
        st.bad_steps = self.bad_steps


class Checkpointer:
    """Saves the run at most once per step (``saved``) and moves the ``best`` pointer."""

    def __init__(self, run: Run, window: LossWindow):
        self.run, self.window = run, window
        self.saved: dict[int, Path] = {}

    def save(self) -> Path:
        """Called by every rank at the same step: ranks check they agree, rank 0 writes, all wait."""
        run, st = self.run, self.run.state
        if st.step in self.saved:
            return self.saved[st.step]
        self.window.save_into(st)
        dist.check_same([*run.model.parameters(), *run.ema.parameters()], "model and EMA weights")
        path = run.ckpt_root / ckpt_io.step_dir_name(st.step)
        if run.main:
            path = ckpt_io.save_checkpoint(
                run.ckpt_root, st.step, model=run.model, ema=run.ema, optimizer=run.optimizer,
                config=run.cfg.to_dict(),
                state={**st.to_dict(), "images_seen": st.step * run.cfg.train.batch_size,
                       "data_fingerprint": run.data_fp},
                extra={"class_names": run.class_names, "params": run.n_params, "data": run.cfg.data.name})
            ckpt_io.prune(run.ckpt_root, run.cfg.train.keep)
        dist.barrier()
        self.saved[st.step] = path
        return path

    def mark_best(self) -> None:
        name = self.save().name
        if self.run.main:
            ckpt_io.point(self.run.ckpt_root, "best", name)


# ----------------------------------------------------------------------------------------------
# The duties, in the order the loop runs them

def _row_step(run: Run, step: int) -> bool:
    """Whether a metrics row is written after ``step`` steps: every --log-every and at the last."""
    return step % run.cfg.train.log_every == 0 or run.done()


class ClockTick:
    """First after every step: this rank's clock and signals, agreed across ranks (one all-reduce).

    In a budget plan the budget's clock (``run.clock``) takes the slowest rank's reading, so every
    rank's learning rate, grids, checkpoints and last step follow the same fraction used; the
    reading is also ``state.budget_used_s``, which checkpoints carry. ``AgreedStop`` acts on the
    signal and the stop-only time limit (a --time-limit beside --steps) agreed here."""

    def __init__(self, run: Run, signals: dist.StopSignals):
        self.run, self.signals = run, signals
        tc = run.cfg.train
        self.t_start = time.perf_counter()
        self.limit_s = tc.time_limit * 60 if tc.time_limit and run.clock is None else None
        self.signalled = self.over_time = False
        if run.clock is not None:
            run.clock.start()

    def due(self, step: int) -> bool:
        return True

    def __call__(self) -> None:
        clock = self.run.clock
        used = clock.tick() if clock is not None else 0.0
        over = self.limit_s is not None and time.perf_counter() - self.t_start >= self.limit_s
        signalled, over, used = dist.agree_max(float(self.signals.raised), float(over), used)
        self.signalled, self.over_time = bool(signalled), bool(over)
        if clock is not None:
            clock.set_used(used)
            self.run.state.budget_used_s = used


class Cadence:
    """When a periodic duty falls due after a step: every ``every`` steps, or, in a budget plan
    with no period given, each time the budget used crosses the next 1/``parts`` of it; never at
    the last step (the loop's end does that one). Ask once per step: a crossing is used up."""

    def __init__(self, run: Run, every: int | None, parts: int):
        self.run, self.every, self.parts = run, every, parts
        fraction = run.clock.fraction if run.clock is not None else 0.0
        self.next = math.floor(fraction * parts) + 1          # a resumed run: the next mark after its own

    def __call__(self, step: int) -> bool:
        if self.run.done():
            return False
        if self.every is not None or self.run.clock is None:
            return step % (self.every or 1) == 0
        fraction = self.run.clock.fraction
        if fraction * self.parts < self.next:
            return False
        self.next = math.floor(fraction * self.parts) + 1
        return True


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


class PaceNote:
    """Once, early: the measured time per 1,000 steps and the time this run still needs."""

    def __init__(self, run: Run):
        self.run, self.pace = run, PaceEstimate(run.state.step, run.device)

    def due(self, step: int) -> bool:
        return not self.pace.done

    def __call__(self) -> None:
        run, step = self.run, self.run.state.step
        estimate = self.pace.after_step(step, None)
        if estimate is None:
            return
        head = (f"pace: {format_seconds(estimate * 1000)} per 1,000 steps at batch {run.cfg.train.batch_size} "
                f"(measured over steps {self.pace.first + 1}-{step}); ")
        if run.clock is None:
            run.logs.rep.line(head + f"this run: about {format_seconds(estimate * (run.steps_total - step))} more")
            return
        left = run.clock.budget_s - run.clock.used_s
        run.steps_total = step + max(0, round(left / estimate))         # the progress bar's new end
        run.logs.rep.set_total(run.steps_total)
        run.logs.rep.line(head + f"the budget's {format_seconds(left)} left: about {run.steps_total - step:,} "
                                 f"more steps ({run.steps_total * run.cfg.train.batch_size / len(run.data):.1f} "
                                 f"epochs in all)")


class DivergenceGuard:
    """Stop after --max-bad-steps consecutive skipped steps, saving nothing. It looks at most
    once per --max-bad-steps steps (one sync), and on every metrics row."""

    def __init__(self, run: Run, window: LossWindow):
        self.run, self.window, self.limit = run, window, run.cfg.train.max_bad_steps

    def due(self, step: int) -> bool:
        return _row_step(self.run, step) or step % self.limit == 0

    def __call__(self) -> Stop | None:
        longest = int(self.window.max_streak)
        if longest >= self.limit:
            return Stop(f"{longest} consecutive steps had a non-finite loss or gradient "
                        f"(each skipped: weights, optimizer moments and EMA untouched)", diverged=True)
        self.window.max_streak.zero_()              # a streak still running raises it again
        return None


class LogRow:
    """Every --log-every steps and at the last: one metrics.jsonl row, TensorBoard scalars, the progress line."""

    def __init__(self, run: Run, window: LossWindow):
        self.run, self.window = run, window
        self.since, self.t_log = run.state.step, time.perf_counter()  # for img/s: the last row's step and clock
        # a budget plan's (step, budget seconds used) where this process started: its pace's origin
        self.origin = (run.state.step, run.clock.used_s) if run.clock is not None else None

    def due(self, step: int) -> bool:
        return _row_step(self.run, step)

    def __call__(self) -> None:
        run, st, w, B = self.run, self.run.state, self.window, self.run.cfg.train.batch_size
        now = time.perf_counter()
        mean_loss, n_bad = w.read_row()
        st.bad_steps = w.bad_steps
        n, elapsed = st.step - self.since, now - self.t_log
        rate = n * B / max(elapsed, 1e-9)
        st.train_seconds += elapsed
        grad_norm = float(w.grad_norm) if w.grad_norm is not None else None
        stats = {"step": st.step, "images_seen": st.step * B, "epoch": round(run.stream.epoch_of(st.step), 4),
                 "loss": mean_loss, "lr": run.optimizer.param_groups[0]["lr"],
                 "grad_norm": grad_norm if grad_norm is not None and math.isfinite(grad_norm) else None,
                 "img_per_sec": rate, "wall_time": round(st.train_seconds, 3), "bad_steps": n_bad}
        if n_bad:
            run.logs.rep.line(f"step {st.step}: skipped {n_bad} step(s) with a non-finite loss or gradient "
                              f"({st.bad_steps} in this run)")
        run.logs.row(stats)
        for k in ("loss", "lr", "grad_norm", "img_per_sec"):
            if stats[k] is not None:
                run.logs.tb.add_scalar(f"train/{k}", stats[k], st.step)
        if run.clock is not None:
            self._reestimate_end()
        if mean_loss is not None:
            left = (run.clock.budget_s - run.clock.used_s if run.clock is not None
                    else (run.steps_total - st.step) * elapsed / n)
            run.logs.rep.progress(st.step, stats, left, run.steps_total)
        if st.step % run.cfg.train.log_every == 0:        # a run's last row off the grid keeps the window open
            w.close_row()
        self.since, self.t_log = st.step, time.perf_counter()

    def _reestimate_end(self) -> None:
        """A budget plan's last step, from the pace of every step this process has run (budget
        seconds, as the plan counts them), so "step k/N" keeps up when the machine speeds up or
        slows down after the pace note; it only moves the bar's end, never the run's."""
        run, step, used = self.run, self.run.state.step, self.run.clock.used_s
        s0, u0 = self.origin
        if step > s0 and used > u0:
            run.steps_total = step + max(0, round((run.clock.budget_s - used) * (step - s0) / (used - u0)))
            run.logs.rep.set_total(run.steps_total)


class EpochEnd:
    """At each epoch's end: its mean loss; with --patience, the best-loss checkpoint (unless FID
    decides what is best) and the early stop after that many epochs without improvement."""

    def __init__(self, run: Run, window: LossWindow, ckpt: Checkpointer):
        self.run, self.window, self.ckpt = run, window, ckpt

    def due(self, step: int) -> bool:
        return int(self.run.stream.epoch_of(step)) > int(self.run.stream.epoch_of(step - 1))

    def __call__(self) -> Stop | None:
        run, st, patience = self.run, self.run.state, self.run.cfg.train.patience
        loss = self.window.close_epoch()
        run.logs.tb.add_scalar("train/epoch_loss", loss, st.step)
        if not patience:
            return None
        if loss < st.best_loss - 1e-4:
            st.best_loss, st.bad_epochs = loss, 0
            if run.fid is None:                     # with --fid-every, best means best FID
                self.ckpt.mark_best()
            return None
        st.bad_epochs += 1
        return Stop(f"early stop: no loss improvement for {patience} epochs") if st.bad_epochs >= patience else None


class FidEvery:
    """Every --fid-every steps: FID (and KID) of EMA samples, logged; the best one is checkpointed as ``best``."""

    def __init__(self, run: Run, ckpt: Checkpointer):
        self.run, self.ckpt = run, ckpt

    def due(self, step: int) -> bool:
        return self.run.fid is not None and step % self.run.cfg.train.fid_every == 0

    def __call__(self) -> None:
        run, st, tc = self.run, self.run.state, self.run.cfg.train
        r = run.fid(run.ema, run.formulation, run.class_names, run.amp)
        run.logs.row({"step": st.step, "fid": r["fid"], "kid": r["kid"], "kid_std": r["kid_std"], "fid_n": r["n"],
                      "fid_ref_n": r["n_ref"], "fid_seconds": r["seconds"]})
        run.logs.tb.add_scalar(f"eval/fid_n{r['n']}", r["fid"], st.step)
        if r["kid"] is not None:
            run.logs.tb.add_scalar(f"eval/kid_n{r['n']}", r["kid"], st.step)
        better = st.best_fid is None or r["fid"] < st.best_fid
        if better:
            st.best_fid = r["fid"]
            self.ckpt.mark_best()
        run.logs.rep.line(f"step {st.step}: FID {r['fid']:.2f} (N={r['n']:,} {tc.fid_sampler}/{tc.fid_steps} samples "
                          f"vs N_ref={r['n_ref']:,}; biased upward at small N, compare only equal N; "
                          f"{r['seconds']:.0f}s){' new best' if better else ''}")


class GridEvery:
    """Every sample-every steps (in a budget plan without --sample-every: at each quarter of the
    budget) before the last, on rank 0: the EMA's fixed-noise grid, via ``write(run, path)``."""

    def __init__(self, run: Run, write: Callable[[Run, Path], None]):
        self.run, self.write = run, write
        # Quarters, not tenths: a grid (64 images x 20 DDIM steps) costs about as much as training
        # on 400 images, and ten of them took 40% of a 2-minute MNIST budget.
        self.cadence = Cadence(run, run.sample_every, parts=4)

    def due(self, step: int) -> bool:
        return self.cadence(step) and self.run.main

    def __call__(self) -> None:
        self.write(self.run, self.run.out / "samples" / f"step_{self.run.state.step:07d}.png")


class CheckpointEvery:
    """Every ckpt-every steps (in a budget plan without --ckpt-every: at each fifth of the budget)
    before the last (the last is saved when the loop ends)."""

    def __init__(self, run: Run, ckpt: Checkpointer):
        self.run, self.ckpt = run, ckpt
        self.cadence = Cadence(run, run.ckpt_every, parts=5)

    def due(self, step: int) -> bool:
        return self.cadence(step)

    def __call__(self) -> None:
        self.ckpt.save()


class AgreedStop:
    """Last after every step: stop on a signal (SIGTERM; Ctrl-C under torchrun) or a stop-only time
    limit, as ``ClockTick`` agreed them, so all ranks stop at the same step. (A budget plan ends
    when its clock is spent: ``Run.done``.)"""

    def __init__(self, run: Run, tick: ClockTick):
        self.run, self.tick = run, tick

    def due(self, step: int) -> bool:
        return True

    def __call__(self) -> Stop | None:
        if self.tick.signalled:
            return Stop("interrupted", interrupted=True)
        if self.tick.over_time:
            return Stop(f"time limit of {self.run.cfg.train.time_limit:g} min reached")
        return None
