"""A folder whose decoded floats do not fit in memory trains from the on-disk cache, under a real limit.

    sudo python benchmarks/larger_than_memory.py --n 100000 --size 64 --limit-gib 1.5   # root: makes a cgroup

Makes (once) a synthetic folder of N random-RGB PNGs in class sub-folders, then runs
``diffuse train --data FOLDER --data-cache auto`` inside a fresh memory cgroup (v2, or v1's memory
controller) whose limit is below the decoded float32 set (N x 3 x S x S x 4 bytes) and, by default,
below the decoded uint8 set too, with a fresh ``$DIFFUSE_CACHE``. ``auto`` must see the limit and
pick the disk cache on its own; the run must finish (exit 0, no OOM kill). ``--cache memory`` is the
contrast: the same run decoding into memory, which the same limit should kill. Reported (JSON, and a
line per figure): the decode rate from the cache sidecar, the cgroup's peak memory and OOM/failure
counters, the training wall-clock, and the CPU. Nothing here is a timed test: it is a measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "src"))


def make_folder(root: Path, n: int, size: int, classes: int = 10) -> float:
    """Random-RGB PNGs (incompressible, so the files are as large as PNG makes them)."""
    import numpy as np
    from PIL import Image

    marker = root / f".complete-{n}-{size}"
    if marker.is_file():
        return 0.0
    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        path = root / f"class{i % classes}" / f"{i:06d}.png"
        if not path.exists():
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path, compress_level=1)
    marker.touch()
    return time.perf_counter() - t0


def make_cgroup(limit: int) -> tuple[Path, str]:
    """A fresh memory cgroup with ``limit`` bytes; returns (its directory, its flavour)."""
    name = f"diffuse-ltm-{os.getpid()}"
    v2 = Path("/sys/fs/cgroup")
    controllers = v2 / "cgroup.controllers"
    if controllers.is_file() and "memory" in controllers.read_text().split():
        d = v2 / name
        d.mkdir()
        (d / "memory.max").write_text(str(limit))
        if (d / "memory.swap.max").exists():
            (d / "memory.swap.max").write_text("0")
        return d, "v2"
    v1 = Path("/sys/fs/cgroup/memory")
    if v1.is_dir():
        d = v1 / name
        d.mkdir()
        (d / "memory.limit_in_bytes").write_text(str(limit))
        if (d / "memory.memsw.limit_in_bytes").exists():
            (d / "memory.memsw.limit_in_bytes").write_text(str(limit))
        return d, "v1"
    raise SystemExit("no writable memory cgroup (needs root and cgroup v1's memory controller or v2)")


def cgroup_figures(d: Path, flavour: str) -> dict:
    def read(name):
        try:
            return (d / name).read_text()
        except OSError:
            return ""
    if flavour == "v2":
        events = dict(line.split() for line in read("memory.events").splitlines() if line.strip())
        peak = read("memory.peak").strip()
        return {"peak_bytes": int(peak) if peak else None, "oom_kills": int(events.get("oom_kill", 0)),
                "limit_hits": int(events.get("max", 0))}
    oom = dict(line.split() for line in read("memory.oom_control").splitlines() if line.strip())
    return {"peak_bytes": int(read("memory.max_usage_in_bytes") or 0), "limit_hits": int(read("memory.failcnt") or 0),
            "oom_kills": int(oom.get("oom_kill", 0))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--folder", default="/tmp/diffuse-ltm-folder")
    p.add_argument("--limit-gib", type=float, default=1.5)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--cache", default="auto", choices=("auto", "disk", "memory"),
                   help="--data-cache for the run (memory: the contrast, which the limit should kill)")
    p.add_argument("--out", default=str(HERE / "results" / "larger-than-memory.json"))
    a = p.parse_args(argv)

    from diffuse.device import cpu_model

    folder = Path(a.folder)
    made = make_folder(folder, a.n, a.size)
    limit = int(a.limit_gib * 2 ** 30)
    floats, u8 = a.n * 3 * a.size ** 2 * 4, a.n * 3 * a.size ** 2
    cg, flavour = make_cgroup(limit)
    cache = Path(tempfile.mkdtemp(prefix="diffuse-ltm-cache-"))
    run = Path(tempfile.mkdtemp(prefix="diffuse-ltm-run-"))
    cmd = [sys.executable, "-m", "diffuse", "train", "--data", str(folder), "--image-size", str(a.size),
           "--data-cache", a.cache, "--steps", str(a.steps), "--batch-size", "32", "--base-channels", "16",
           "--channel-mult", "1,2,2", "--num-res-blocks", "1", "--attn-resolutions", "", "--num-groups", "8",
           "--sample-every", str(10 ** 6), "--ckpt-every", str(10 ** 6), "--sample-n", "4", "--sample-steps", "2",
           "--log-every", "10", "--no-progress", "--out", str(run / "run")]
    env = {**os.environ, "DIFFUSE_CACHE": str(cache), "PYTHONPATH": str(REPO / "src")}
    # The child joins the cgroup before exec, so everything it starts (decode workers) is inside.
    procs = cg / "cgroup.procs"
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True,
                       preexec_fn=lambda: procs.write_text(str(os.getpid())))
    wall = time.perf_counter() - t0
    figures = cgroup_figures(cg, flavour)
    sidecars = list(cache.glob("datacache/*.json"))
    decode = json.loads(sidecars[0].read_text()) if sidecars else {}
    log = (run / "run" / "train.log").read_text() if (run / "run" / "train.log").is_file() else ""
    result = {
        "cpu": cpu_model(), "cores": os.cpu_count(), "n_images": a.n, "size": a.size, "folder_made_seconds": round(made, 1),
        "data_cache": a.cache, "decoded_float32_bytes": floats, "decoded_uint8_bytes": u8, "cgroup": flavour, "limit_bytes": limit,
        "exit_code": r.returncode, "used_disk_cache": bool(sidecars), "decode_seconds": decode.get("decode_seconds"),
        "decode_images_per_sec": decode.get("images_per_sec"), "train_wall_seconds": round(wall, 1),
        "steps": a.steps, **figures, "stderr_tail": r.stderr[-1500:], "log_tail": log[-1500:],
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    try:
        cg.rmdir()
    except OSError:
        pass
    shutil.rmtree(cache, ignore_errors=True)
    shutil.rmtree(run, ignore_errors=True)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    gib = 2 ** 30
    print(f"{a.n:,} images {a.size}px: floats {floats / gib:.2f} GiB, uint8 {u8 / gib:.2f} GiB, limit {limit / gib:.2f} GiB "
          f"({flavour}); exit {r.returncode}; disk cache {'yes' if sidecars else 'NO'}; decode "
          f"{decode.get('images_per_sec')} img/s ({decode.get('decode_seconds')} s); peak "
          f"{(figures['peak_bytes'] or 0) / gib:.2f} GiB; limit hits {figures['limit_hits']}, OOM kills "
          f"{figures['oom_kills']}; {wall:.0f} s in all; {result['cpu']}")
    return 0 if (r.returncode == 0 and sidecars) == (a.cache != "memory") else 1


if __name__ == "__main__":
    sys.exit(main())
