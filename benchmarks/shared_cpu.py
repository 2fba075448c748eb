"""Two diffuse trainings on one CPU: threads and the OpenMP wait policy.

Runs `--steps` steps of the digits preset as one process alone or as two at once, under several settings, interleaved over `--repeats` rounds so that a passing load
from elsewhere does not land on one setting. Each process's img/s is the median of its
`metrics.jsonl` rows after the first (warm-up). Writes benchmarks/results/shared-cpu.json.

    .venv/bin/python benchmarks/shared_cpu.py --repeats 2 --steps 60

Settings: threads per process (2 = torch's default on 2 cores, 1 = one core each) and
OMP_WAIT_POLICY (default: libgomp's, idle threads spin 300,000 times before sleeping, pinned with
GOMP_SPINCOUNT so that diffuse's own busy-machine choice stays out; PASSIVE: they sleep at once;
GOMP_SPINCOUNT=10000: a bounded spin, sleeping after 10,000), set in the child's environment before
torch is imported.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from diffuse.device import cpu_model

REPO = Path(__file__).resolve().parents[1]

SETTINGS = [  # (name, processes, threads each, OMP_WAIT_POLICY or None)
    ("alone, 2 threads", 1, 2, None),
    ("alone, 2 threads, PASSIVE", 1, 2, "PASSIVE"),
    ("two at once, 2 threads each", 2, 2, None),
    ("two at once, 2 threads each, PASSIVE", 2, 2, "PASSIVE"),
    ("two at once, 1 thread each", 2, 1, None),
    ("alone, 2 threads, GOMP_SPINCOUNT=10000", 1, 2, "spin:10000"),
    ("two at once, 2 threads each, GOMP_SPINCOUNT=10000", 2, 2, "spin:10000"),
]




def run_setting(procs: int, threads: int, policy: str | None, steps: int, workdir: Path) -> list[float]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")}
    if policy and policy.startswith("spin:"):      # a bounded spin: libgomp sleeps after N spins
        env["GOMP_SPINCOUNT"] = policy.split(":", 1)[1]
    elif policy:
        env["OMP_WAIT_POLICY"] = policy
    else:       # libgomp's own default spin, stated, so that diffuse's busy-machine PASSIVE stays out
        env["GOMP_SPINCOUNT"] = "300000"
    outs, children = [], []
    for i in range(procs):
        out = Path(tempfile.mkdtemp(dir=workdir)) / "run"
        outs.append(out)
        children.append(subprocess.Popen(
            [sys.executable, "-m", "diffuse", "train", "--data", "digits", "--steps", str(steps),
             "--log-every", str(max(1, steps // 6)), "--sample-every", "100000",
             "--ckpt-every", "100000", "--threads", str(threads), "--no-progress", "--out", str(out)],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    rates = []
    for child, out in zip(children, outs):
        _, err = child.communicate(timeout=3600)
        if child.returncode != 0:
            raise SystemExit(f"training failed:\n{err}")
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        rows = [r for r in rows if "img_per_sec" in r]
        rows = rows[1:] or rows                                   # drop the warm-up row
        rates.append(statistics.median(r["img_per_sec"] for r in rows))
    return rates


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=2, help="rounds over all settings (default 2)")
    p.add_argument("--steps", type=int, default=60, help="training steps per process (default 60)")
    p.add_argument("--settings", default=None, help="comma list of setting numbers (default: all)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "shared-cpu.json"), help="JSON file")
    a = p.parse_args()
    settings = [SETTINGS[int(i)] for i in a.settings.split(",")] if a.settings else SETTINGS
    results: dict[str, list[list[float]]] = {name: [] for name, *_ in settings}
    loads = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.repeats):
            order = settings if r % 2 == 0 else settings[::-1]             # interleave, alternate order
            for name, procs, threads, policy in order:
                before = os.getloadavg()[0]
                rates = run_setting(procs, threads, policy, a.steps, Path(tmp))
                loads.append({"setting": name, "round": r, "load_before": before, "load_after": os.getloadavg()[0]})
                results[name].append(rates)
                print(f"round {r}  {name:<40} img/s per process: {', '.join(f'{x:.0f}' for x in rates)}"
                      f"   (load before {before:.1f})", flush=True)
    summary = {name: {"per_process_median": statistics.median(x for rates in runs for x in rates),
                      "total_median": statistics.median(sum(rates) for rates in runs), "runs": runs}
               for name, runs in results.items()}
    record = {"cpu": cpu_model(), "affinity_cores": len(os.sched_getaffinity(0)), "python": platform.python_version(),
              "steps": a.steps, "repeats": a.repeats, "summary": summary, "loads": loads,
              "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(record, indent=2))
    print(f"\n{'setting':<40} {'img/s per process':>18} {'img/s total':>12}")
    for name, s in summary.items():
        print(f"{name:<40} {s['per_process_median']:>18.0f} {s['total_median']:>12.0f}")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
