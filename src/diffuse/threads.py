"""CPU threads: how many intra-op threads a command uses, and whether the machine is busy.

torch sizes its OpenMP pool from the machine, not from what is free: two processes on a 2-core
machine each run 2 threads that wait on each other's cores, and each step's parallel regions
stall (docs/speed.md, "Threads and shared machines", has the measurements). ``--threads N``
sets the pool; the default is the cores this process may run on (its affinity mask, which
``taskset``, cgroups' cpusets and job schedulers narrow), not ``os.cpu_count()``. When other
processes already use those cores, the start line says so, because that, not diffuse, is then
what sets the speed.

"Busy" is measured, not read from the load average: the CPU time those cores spend outside idle
over a short window at start (``cpu_demand``). The 1-minute load average still counts a process
that ended seconds ago (an install, the previous run), so on an idle machine it made ``make demo``
sleep its threads and train 25% slower (AMD EPYC Zen 4: bf16 459-545 img/s with libgomp's default
wait, 343-408 with PASSIVE); what the cores are doing now has no such memory.

On a busy machine diffuse also lets idle OpenMP threads sleep at once (``OMP_WAIT_POLICY=PASSIVE``)
instead of spinning: a spinning thread burns the time slice its partner thread needs to reach the
same barrier. This has to be decided before torch (and its libgomp) is loaded, so the CLI calls
``prefer_passive_wait`` first thing; an ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` you set yourself
always wins.
"""

from __future__ import annotations

import os
import sys


def available_cores() -> int:
    """Cores this process may run on: the affinity mask where the OS has one, else the CPU count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _our_cpus() -> set[int] | None:
    """The CPUs in this process's affinity mask; None where the OS has none (then the machine's)."""
    try:
        return os.sched_getaffinity(0)
    except (AttributeError, OSError):
        return None


def _cpu_times(path: str, cpus: set[int] | None) -> tuple[int, int] | None:
    """(busy, total) clock ticks summed over ``cpus`` (None: the machine's "cpu" line) from /proc/stat."""
    try:
        with open(path) as f:
            lines = [line.split() for line in f if line.startswith("cpu")]
    except OSError:
        return None
    busy = total = 0
    for fields in lines:
        name = fields[0]
        ours = name == "cpu" if cpus is None else name != "cpu" and int(name[3:]) in cpus
        if not ours:
            continue
        # user nice system idle iowait irq softirq steal (guest time is already inside user/nice)
        ticks = [int(v) for v in fields[1:9]]
        idle = ticks[3] + ticks[4]
        busy += sum(ticks) - idle
        total += sum(ticks)
    return (busy, total) if total else None


def cpu_demand(window: float = 0.2, path: str = "/proc/stat") -> float | None:
    """Cores that other processes keep busy right now: the non-idle share of our cores' time over
    ``window`` seconds (this process sleeps meanwhile), times their count. None where /proc/stat is
    unreadable (then nothing is assumed busy)."""
    import time

    cpus = _our_cpus()
    first = _cpu_times(path, cpus)
    if first is None:
        return None
    time.sleep(window)
    second = _cpu_times(path, cpus)
    if second is None:
        return None
    # this process slept through the window, so none of the busy time is its own
    return others_demand((*first, 0.0), (*second, 0.0))


def cpu_mark(path: str = "/proc/stat") -> tuple[int, int, float] | None:
    """(busy ticks, all ticks) of our cores and this process's CPU seconds, now: two marks around
    some work give ``others_demand`` over it. None where /proc/stat is unreadable."""
    ticks = _cpu_times(path, _our_cpus())
    if ticks is None:
        return None
    own = os.times()
    return ticks[0], ticks[1], own.user + own.system


def others_demand(first: tuple[int, int, float] | None, second: tuple[int, int, float] | None,
                  cores: int | None = None, hz: int | None = None) -> float | None:
    """Cores other processes kept busy between two ``cpu_mark``s: our cores' busy time less this
    process's own CPU time, over the wall time the ticks span (all ticks / cores). A probe timed
    while another process ran reads slow but steady; this, not its spread, tells (issue 23: a
    throughput probe that overlapped a one-second script was cached at a third of the true rate).
    None without both marks or when no tick passed."""
    if first is None or second is None or second[1] <= first[1]:
        return None
    cores = cores or available_cores()
    hz = hz or os.sysconf("SC_CLK_TCK")
    busy_s = (second[0] - first[0]) / hz
    wall_s = (second[1] - first[1]) / hz / cores
    return max(0.0, busy_s - (second[2] - first[2])) / wall_s


_START_DEMAND: list[float | None] = []      # the first measurement of this process, reused after


def start_demand() -> float | None:
    """``cpu_demand()`` as measured the first time this process asked (at start, before its own
    work): the wait-policy choice and the start line then agree on one reading."""
    if not _START_DEMAND:
        _START_DEMAND.append(cpu_demand())
    return _START_DEMAND[0]


def busy_note(cores: int | None = None, demand: float | None = None) -> str | None:
    """A short warning when other processes already keep at least half of our cores busy.

    Measured at start (``start_demand``), before this process has done any work, so the demand is
    someone else's."""
    cores = available_cores() if cores is None else cores
    demand = start_demand() if demand is None else demand
    if demand is None or demand < max(1.0, cores / 2):
        return None
    return (f"machine busy: other processes use {demand:.1f} of {cores} core{'s' if cores != 1 else ''}; "
            "expect slower steps, and try --threads 1 (docs/speed.md)")


def set_threads(n: int | None) -> int:
    """Set torch's intra-op threads to ``n`` (default: ``available_cores()``); returns the count."""
    import torch

    from .errors import DiffuseError

    if n is not None and n < 1:
        raise DiffuseError(f"--threads must be a positive integer, got {n}")
    n = n or available_cores()
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def prefer_passive_wait(environ=None) -> bool:
    """Set OMP_WAIT_POLICY=PASSIVE when the machine is busy now (``busy_note``), unless the user set a
    policy or torch is already loaded (libgomp reads the variable once, at load). Returns whether it
    set it."""
    environ = os.environ if environ is None else environ
    if "OMP_WAIT_POLICY" in environ or "GOMP_SPINCOUNT" in environ or "torch" in sys.modules or busy_note() is None:
        return False
    environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return True


def wait_policy_note() -> str:
    """For the start line: how idle OpenMP threads wait."""
    policy = os.environ.get("OMP_WAIT_POLICY", "").upper()
    return "idle threads sleep (OMP_WAIT_POLICY=PASSIVE)" if policy == "PASSIVE" else ""
