"""What DistributedDataParallel costs on one device: `torchrun --nproc-per-node 1` against a plain run.

    python benchmarks/ddp_overhead.py --device cuda --data mnist --steps 400       # on a GPU machine
    python benchmarks/ddp_overhead.py --device cpu --data digits --steps 60 --threads 2

Trains the same short run (same preset, batch, seed) alternately as a plain process and under
torchrun with one rank (DDP wrapper, its gradient all-reduce hooks, the per-step agreed-stop
all-reduce), ``--repeats`` times each, and compares training throughput: the median of the
logged img/s rows after the first (start-up and cudnn autotuning excluded). JSON out; the CPU
and device are named. A measurement, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "src"))


def run_once(kind: str, args, work: Path, i: int) -> dict:
    out = work / f"{kind}{i}"
    train = ["-m", "diffuse", "train", "--data", args.data, "--steps", str(args.steps), "--device", args.device,
             "--log-every", str(args.log_every), "--sample-every", "1000000", "--ckpt-every", "1000000",
             "--sample-n", "4", "--sample-steps", "2", "--no-progress", "--out", str(out)]
    if args.data_root:
        train += ["--data-root", args.data_root]
    if args.batch_size:
        train += ["--batch-size", str(args.batch_size)]
    if kind == "plain":
        cmd = [sys.executable, *train]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", *train]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)          # torchrun would set 1
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{kind} run failed (exit {r.returncode}): {r.stderr[-2000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rates = [row["img_per_sec"] for row in rows if row.get("img_per_sec")][1:]
    return {"kind": kind, "img_per_sec": statistics.median(rates) if rates else None, "rows": len(rates),
            "wall_seconds": round(wall, 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="mnist")
    p.add_argument("--data-root", default=None)
    p.add_argument("--device", default="cuda")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=None, help="default: the preset's")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="OMP threads for both (CPU runs)")
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)

    import torch

    from diffuse.device import cpu_model

    runs = []
    with tempfile.TemporaryDirectory(prefix="ddp_overhead.") as tmp:
        for i in range(a.repeats):                      # interleaved, so drift hits both alike
            for kind in ("plain", "torchrun"):
                runs.append(run_once(kind, a, Path(tmp), i))
                print(json.dumps(runs[-1]), flush=True)
    med = {k: statistics.median(r["img_per_sec"] for r in runs if r["kind"] == k and r["img_per_sec"])
           for k in ("plain", "torchrun")}
    result = {"cpu": cpu_model(), "device": a.device,
              "device_name": torch.cuda.get_device_name(0) if a.device.startswith("cuda") and torch.cuda.is_available()
              else "cpu", "data": a.data, "steps": a.steps, "batch_size": a.batch_size, "repeats": a.repeats,
              "plain_img_per_sec": round(med["plain"], 1), "torchrun_img_per_sec": round(med["torchrun"], 1),
              "ddp_overhead_percent": round(100 * (med["plain"] / med["torchrun"] - 1), 1), "runs": runs,
              "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=2))
    print(f"plain {med['plain']:.1f} img/s, torchrun --nproc-per-node 1 {med['torchrun']:.1f} img/s: DDP costs "
          f"{result['ddp_overhead_percent']:+.1f}% time per image ({result['device_name']}; {result['cpu']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
