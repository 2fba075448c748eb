"""A run planned for a wall-clock budget: the learning rate and the EMA as functions of how much of
the run is done, and the clock that says so.

A run cut by ``--time-limit`` alone is a run cut short: its learning rate is still high and its
EMA still holds weights from minutes ago when the time runs out. A budget plan instead makes both
end with the budget:

- the learning rate warms up over the first ``WARMUP_FRACTION`` of the budget (and at least the
  preset's --warmup-steps, which exist for stability), holds its peak, and decays linearly to 0
  over the last ``COOLDOWN_FRACTION``: warmup-stable-decay (Hu et al. 2024, MiniCPM; Hagele et al.
  2024, "Scaling laws and compute-optimal training beyond fixed training durations", who found a
  20% linear cool-down matches cosine at every length). Measured here (docs/budgets.md), it beats
  a linear decay over the whole budget (Li, Yumer & Ramanan 2020, "Budgeted training") on MNIST at
  2 minutes: models this far from converged gain more from steps at the full rate than from a
  long anneal. The fraction is of *wall-clock* time, so a step that runs slower (a busy machine)
  costs steps, never the schedule's end;
- the EMA is the power-function EMA of Karras et al. (2024, "Analyzing and improving the training
  dynamics of diffusion models", sec. 3.1): at every step it is an average of all the weights so
  far with weight ~ tau^gamma, a profile whose relative width ``std`` is a fraction of the run, so
  the EMA is as good at minute 2 of a 2-minute budget as at hour 10 of a 10-hour one, and needs no
  knowledge of the budget at all.

Pure functions of numbers (no torch): the loop asks ``train.BudgetPlan``, which asks these.
"""

from __future__ import annotations

import math
import time
from typing import Callable

# The learning rate's warm-up and its final linear decay to 0, as fractions of the budget.
WARMUP_FRACTION = 0.05
COOLDOWN_FRACTION = 0.2
# The power EMA's relative width when a budget plan does not name one (--ema-std).
DEFAULT_EMA_STD = 0.1
# DDIM steps of a budget plan's progress grids (the budget pays for them; step plans draw 50).
BUDGET_GRID_STEPS = 20


def lr_factor(fraction: float, step: int, warmup_steps: int = 0, cooldown: float = COOLDOWN_FRACTION) -> float:
    """The learning rate's multiplier at ``fraction`` of the budget used (0..1, clamped) after
    ``step`` steps: linear warm-up to 1, done at WARMUP_FRACTION of the budget or after
    ``warmup_steps`` steps (the preset's --warmup-steps), whichever comes first; 1 until the last
    ``cooldown`` fraction of the budget (--cooldown); then linear decay to 0 at fraction 1."""
    p = min(max(fraction, 0.0), 1.0)
    # The shorter warm-up wins: a 200-step warm-up would eat half of a 2-minute MNIST budget, and
    # 5% of a 10-hour budget is far longer than stability needs.
    warm = max(p / WARMUP_FRACTION, (step + 1) / warmup_steps if warmup_steps else 0.0)
    decay = (1.0 - p) / cooldown
    return max(0.0, min(1.0, warm, decay))


def ema_std_of_gamma(gamma: float) -> float:
    """The relative standard deviation of the power EMA's weight profile tau^gamma on [0, 1]
    (Karras et al. 2024, eq. 3): sqrt(gamma+1) / ((gamma+2) sqrt(gamma+3))."""
    return math.sqrt(gamma + 1) / ((gamma + 2) * math.sqrt(gamma + 3))


def ema_gamma(std: float) -> float:
    """The exponent gamma whose profile has relative width ``std`` (the inverse of
    ``ema_std_of_gamma``, which falls monotonically from 1/sqrt(12) at gamma = 0 towards 0)."""
    top = ema_std_of_gamma(0.0)
    if not 0 < std < top:
        raise ValueError(f"an EMA width must be in (0, {top:.4f}), got {std}")
    lo, hi = 0.0, 1.0
    while ema_std_of_gamma(hi) > std:
        hi *= 2
    for _ in range(200):              # bisection to float precision; the function is monotone
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if ema_std_of_gamma(mid) > std else (lo, mid)
    return 0.5 * (lo + hi)


def power_ema_decay(steps_done: int, gamma: float) -> float:
    """The EMA decay after the ``steps_done``-th step (1, 2, ...): beta_t = (1 - 1/t)^(gamma+1)
    (Karras et al. 2024, eq. 2 with t counted in steps). After t steps the EMA holds the weights
    of step tau with weight (tau^(gamma+1) - (tau-1)^(gamma+1)) / t^(gamma+1), a discrete tau^gamma."""
    t = max(1, steps_done)
    return (1.0 - 1.0 / t) ** (gamma + 1.0)


def wall_clock() -> float:
    """Seconds on a monotonic clock: what a budget is spent in (tests replace this function)."""
    return time.perf_counter()


class BudgetClock:
    """Seconds of the budget used, carried across resumes (``used_s`` starts from the checkpoint's).

    ``tick()`` reads the wall clock; the loop agrees the reading across ranks (the slowest rank's)
    before anyone uses it, so every rank computes the same learning rate and stops at the same step.
    ``now`` (default ``wall_clock``, looked up at each reading) is injectable so tests can run a
    budget on a fake clock."""

    def __init__(self, budget_s: float, used_s: float = 0.0, now: Callable[[], float] | None = None):
        if not budget_s > 0:
            raise ValueError(f"a budget must be positive seconds, got {budget_s}")
        self.budget_s, self._now = float(budget_s), now
        self.used_s = float(used_s)
        self._base, self._t0 = self.used_s, None

    def now(self) -> float:
        return (self._now or wall_clock)()

    def start(self) -> None:
        self._t0 = self.now()

    def tick(self) -> float:
        """The seconds used so far (not yet agreed across ranks)."""
        if self._t0 is None:
            self.start()
        return self._base + (self.now() - self._t0)

    def set_used(self, used_s: float) -> None:
        self.used_s = used_s

    @property
    def fraction(self) -> float:
        """The budget used, 0..1 (1 once it is spent)."""
        return min(1.0, self.used_s / self.budget_s)

    @property
    def spent(self) -> bool:
        return self.used_s >= self.budget_s
