"""Load check for `diffuse serve`: N concurrent clients for T seconds on loopback.

    python benchmarks/serve_load.py                                # a tiny model, 8 clients, 20 s
    python benchmarks/serve_load.py runs/demo --clients 16 --seconds 60 --n 4 --steps 10

Starts `diffuse serve RUN --port 0` in a fresh process on 127.0.0.1 (the only address it will use),
then runs --clients threads, each posting /api/generate (--n images, --steps, a fresh seed per
request) in a loop until --seconds have passed or it has sent --max-requests. A 429 (queue full)
is counted as a rejection and the client waits its Retry-After (capped by the time left) before the
next try, as a polite client would. A separate prober calls /healthz every 0.2 s throughout.

Reports (JSON, also printed): requests/s and images/s of successful generations, p50/p95/p99
latency of those, 429 count, unexpected outcomes (any other status or a connection error; there
should be none), /healthz latency under load, and the environment (CPU, torch, load average
before and after). Without RUN it trains a tiny digits model (2 steps; the model of the tests),
whose samples are noise but whose cost per image is what a request for it pays.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO / "src"))
from _worker import cpu_info  # noqa: E402
from compare_peers import git_state, loadavg  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("run", nargs="?", default=None, help="run directory or checkpoint (default: train a tiny one)")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
    p.add_argument("--seconds", type=float, default=20.0, help="how long the clients run (default 20)")
    p.add_argument("--max-requests", type=int, default=10_000, help="per client, a bound on the loop (default 10000)")
    p.add_argument("--n", type=int, default=4, help="images per request (default 4)")
    p.add_argument("--steps", type=int, default=4, help="sampling steps per request (default 4)")
    p.add_argument("--sampler", default="dpmpp-2m")
    p.add_argument("--queue", type=int, default=4, help="the server's --queue (default 4, so that 8 clients see 429s)")
    p.add_argument("--threads", type=int, default=None, help="the server's --threads (default: its own default)")
    p.add_argument("--out", default=str(HERE / "results" / "serve-load.json"), help="JSON output")
    return p.parse_args(argv)


def tiny_run(root: Path) -> Path:
    from diffuse.config import resolve
    from diffuse.train import train

    model = {"base_channels": 8, "channel_mult": (1, 2), "num_res_blocks": 1, "attn_resolutions": (8,),
             "num_groups": 4, "head_channels": 8}
    t = {"steps": 2, "batch_size": 8, "log_every": 1, "sample_n": 2, "sample_steps": 1, "out": str(root / "tiny"),
         "warmup_steps": 0}
    return Path(train(resolve("digits", None, None, {"model": model, "train": t}), progress=False))


def start_server(run: Path, queue: int, threads: int | None) -> tuple[subprocess.Popen, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = f"{REPO / 'src'}:{env.get('PYTHONPATH', '')}"
    extra = ["--threads", str(threads)] if threads else []
    proc = subprocess.Popen([sys.executable, "-m", "diffuse", "serve", str(run), "--host", "127.0.0.1", "--port", "0",
                             "--queue", str(queue), "--no-preview", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    deadline, lines = time.monotonic() + 300, []
    while time.monotonic() < deadline and proc.poll() is None:
        if select.select([proc.stdout], [], [], 1.0)[0]:
            line = proc.stdout.readline()
            lines.append(line)
            m = re.search(r"at (http://127\.0\.0\.1:\d+)/", line)
            if m:
                return proc, m.group(1)
    proc.kill()
    raise SystemExit("diffuse serve did not start:\n" + "".join(lines))


def post(url: str, body: dict, timeout: float) -> tuple[int, dict[str, str]]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json", "Accept": "image/png"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            r.read()
            return r.status, dict(r.headers)
    except urllib.error.HTTPError as e:
        e.read()
        return e.code, dict(e.headers)


def percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    k = (len(xs) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def main(argv=None) -> int:
    args = parse_args(argv)
    load_before = loadavg()
    tmp = tempfile.TemporaryDirectory(prefix="serve-load-")
    run = Path(args.run) if args.run else tiny_run(Path(tmp.name))
    proc, base = start_server(run, args.queue, args.threads)
    assert base.startswith("http://127.0.0.1:"), base            # loopback only
    lock = threading.Lock()
    ok_latency: list[float] = []
    rejected, unexpected = 0, []
    stop = threading.Event()

    # warm-up: one request, untimed (first-call allocations, lazy imports in the worker)
    post(f"{base}/api/generate", {"n": args.n, "steps": args.steps, "sampler": args.sampler}, 300)

    t_start = time.monotonic()
    t_end = t_start + args.seconds

    def client(k: int) -> None:
        nonlocal rejected
        rng = random.Random(k)
        for _ in range(args.max_requests):
            now = time.monotonic()
            if now >= t_end:
                return
            body = {"n": args.n, "steps": args.steps, "sampler": args.sampler, "seed": rng.randrange(2**31)}
            t0 = time.monotonic()
            try:
                status, headers = post(f"{base}/api/generate", body, timeout=max(5.0, t_end - t0 + 120))
            except Exception as e:  # noqa: BLE001 - counted, reported
                with lock:
                    unexpected.append(f"{type(e).__name__}: {e}")
                continue
            dt = time.monotonic() - t0
            with lock:
                if status == 200:
                    ok_latency.append(dt)
                elif status == 429:
                    rejected += 1
                else:
                    unexpected.append(f"HTTP {status}")
            if status == 429:
                wait = float(headers.get("Retry-After", headers.get("retry-after", "1")))
                time.sleep(max(0.0, min(wait, t_end - time.monotonic())))

    health: list[float] = []

    def prober() -> None:
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                with urllib.request.urlopen(f"{base}/healthz", timeout=30) as r:
                    r.read()
                health.append(time.monotonic() - t0)
            except Exception as e:  # noqa: BLE001
                with lock:
                    unexpected.append(f"healthz {type(e).__name__}: {e}")
            stop.wait(0.2)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(args.clients)]
    probe = threading.Thread(target=prober)
    probe.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - t_start          # includes the last requests that ran past T
    stop.set()
    probe.join()
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
    tmp.cleanup()

    ms = lambda v: None if v is None else round(1000 * v, 1)  # noqa: E731
    result = {
        "what": "diffuse serve load check: POST /api/generate from concurrent clients on loopback",
        "model": str(run) if args.run else "tiny digits model (tests' TINY config, 2 training steps)",
        "config": {k: v for k, v in vars(args).items() if k not in ("out",)},
        "requests_ok": len(ok_latency), "rejected_429": rejected, "unexpected": len(unexpected),
        "unexpected_examples": unexpected[:5],
        "seconds": round(elapsed, 2),
        "requests_per_s": round(len(ok_latency) / elapsed, 2),
        "images_per_s": round(len(ok_latency) * args.n / elapsed, 2),
        "latency_ms": {"p50": ms(percentile(ok_latency, 50)), "p95": ms(percentile(ok_latency, 95)),
                       "p99": ms(percentile(ok_latency, 99)), "max": ms(max(ok_latency, default=None)),
                       "mean": ms(statistics.fmean(ok_latency)) if ok_latency else None},
        "healthz_ms": {"n": len(health), "p50": ms(percentile(health, 50)), "p99": ms(percentile(health, 99)),
                       "max": ms(max(health, default=None))},
        "env": {**cpu_info(), "python": sys.version.split()[0], "git": git_state(),
                "loadavg_before": load_before, "loadavg_after": loadavg()},
    }
    try:
        import torch
        result["env"]["torch"] = torch.__version__
    except ImportError:
        pass
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 1 if unexpected else 0


if __name__ == "__main__":
    sys.exit(main())
