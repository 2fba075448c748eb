"""How much memory this process may use: the machine's, and the limits of its memory cgroups
(containers, Slurm jobs and systemd units limit memory that way while /proc/meminfo still shows
the whole host). Stdlib only: ``data`` asks it where a data set fits, with no torch needed here.
"""

from __future__ import annotations

from pathlib import Path


def available_ram(proc: Path = Path("/proc"), cgroup_fs: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Bytes this process could still allocate: MemAvailable from /proc/meminfo, lowered to what
    its memory cgroup leaves (containers, Slurm jobs and systemd units limit memory that way while
    /proc/meminfo still shows the whole host). None where unknown."""
    avail: int | None = None
    try:
        for line in (proc / "meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    left = cgroup_memory_left(proc, cgroup_fs)
    if left is not None:
        avail = left if avail is None else min(avail, left)
    return avail


def cgroup_memory_left(proc: Path = Path("/proc"), cgroup_fs: Path = Path("/sys/fs/cgroup")) -> int | None:
    """The least room under any memory limit on this process's cgroup or its ancestors (v1 and v2):
    limit - (usage - inactive file cache), as ``docker stats`` counts it, since the kernel reclaims
    that cache before it kills. None when no limit is set (or cgroups are not readable)."""
    lefts = [left for _, left in _cgroup_limits(proc, cgroup_fs)]
    return min(lefts) if lefts else None


def cgroup_memory_limit(proc: Path = Path("/proc"), cgroup_fs: Path = Path("/sys/fs/cgroup")) -> int | None:
    """The smallest memory limit on this process's cgroup or its ancestors; None when unlimited."""
    limits = [limit for limit, _ in _cgroup_limits(proc, cgroup_fs)]
    return min(limits) if limits else None


def _cgroup_limits(proc: Path, cgroup_fs: Path) -> list[tuple[int, int]]:
    """(limit, room left) for every memory-limited cgroup from this process's up to the root."""
    try:
        lines = (proc / "self" / "cgroup").read_text().splitlines()
    except OSError:
        return []
    # (directory, limit file, usage file, inactive-file key in memory.stat)
    places: list[tuple[Path, str, str, str]] = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hid, controllers, rel = parts
        rel = rel.strip().lstrip("/")
        if hid == "0" and controllers == "":                          # v2 (unified, or hybrid's "unified" mount)
            for base in (cgroup_fs, cgroup_fs / "unified"):
                places.append((base / rel, "memory.max", "memory.current", "inactive_file"))
        elif "memory" in controllers.split(","):                       # v1 memory controller
            places.append((cgroup_fs / "memory" / rel, "memory.limit_in_bytes", "memory.usage_in_bytes",
                           "total_inactive_file"))
    found: list[tuple[int, int]] = []
    for leaf, limit_name, usage_name, inactive_key in places:
        d = leaf
        while True:
            got = _cgroup_dir_limit(d, limit_name, usage_name, inactive_key)
            if got is not None:
                found.append(got)
            if d == cgroup_fs or d.parent == d or cgroup_fs not in d.parents:
                break
            d = d.parent
    return found


def _cgroup_dir_limit(d: Path, limit_name: str, usage_name: str, inactive_key: str) -> tuple[int, int] | None:
    try:
        raw = (d / limit_name).read_text().strip()
        if raw == "max":
            return None
        limit = int(raw)
        if limit >= 1 << 60:                                           # v1's "unlimited" (page-rounded 2^63)
            return None
        usage = int((d / usage_name).read_text().strip())
    except (OSError, ValueError):
        return None
    inactive = 0
    try:
        for line in (d / "memory.stat").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == inactive_key:
                inactive = int(value)
    except (OSError, ValueError):
        pass
    return limit, max(0, limit - max(0, usage - inactive))
