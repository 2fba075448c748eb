"""CPU threads: how many intra-op threads a command uses, and whether the machine is busy.

torch sizes its OpenMP pool from the machine, not from what is free: two processes on a 2-core
machine each run 2 threads that wait on each other's cores, and each step's parallel regions
stall (docs/speed.md, "Threads and shared machines", has the measurements). ``--threads N``
sets the pool; the default is the cores this process may run on (its affinity mask, which
``taskset``, cgroups' cpusets and job schedulers narrow), not ``os.cpu_count()``. When the load
average says other processes already use those cores, the start line says so, because that, not
diffuse, is then what sets the speed.

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


def load_average() -> float | None:
    """1-minute load average (runnable + uninterruptible processes), or None where unknown."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def busy_note(cores: int | None = None, load: float | None = None) -> str | None:
    """A short warning when other processes already keep at least half of our cores busy.

    Measured at start, before this process has done any work, so the load is someone else's."""
    cores = available_cores() if cores is None else cores
    load = load_average() if load is None else load
    if load is None or load < max(1.0, cores / 2):
        return None
    return (f"machine busy: load average {load:.1f} on {cores} core{'s' if cores != 1 else ''}; "
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
    """Set OMP_WAIT_POLICY=PASSIVE when the machine is busy, unless the user set a policy or torch
    is already loaded (libgomp reads the variable once, at load). Returns whether it set it."""
    environ = os.environ if environ is None else environ
    if "OMP_WAIT_POLICY" in environ or "GOMP_SPINCOUNT" in environ or "torch" in sys.modules or busy_note() is None:
        return False
    environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return True


def wait_policy_note() -> str:
    """For the start line: how idle OpenMP threads wait."""
    policy = os.environ.get("OMP_WAIT_POLICY", "").upper()
    return "idle threads sleep (OMP_WAIT_POLICY=PASSIVE)" if policy == "PASSIVE" else ""
