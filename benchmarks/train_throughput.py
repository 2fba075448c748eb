"""Training throughput (images/s) of every diffuse preset: the exact optimizer step the trainer runs.

    python benchmarks/train_throughput.py                       # all presets, CPU, fp32
    python benchmarks/train_throughput.py --precision bf16 --presets cifar10-small,64px --repeats 7
    python benchmarks/train_throughput.py --device cuda --out benchmarks/results/train-cuda.json

One step is ``diffuse.train.TrainStep`` as built by ``build_training``: draw t and eps, q_sample,
forward under autocast, MSE on eps, backward, gradient clipping, AdamW, EMA update. Images are
random [-1, 1] tensors already on the device, so data loading is not timed (the trainer keeps the
whole data set on the device too). Each preset runs in a fresh process (benchmarks/_worker.py):
--warmup untimed steps, then --repeats timed windows of enough steps to last --min-seconds;
reported: the median window's img/s, with min and max. channels_last is on with bf16 or CUDA
unless --channels-last/--no-channels-last is given; the trainer's fp32 CPU layout follows its probe
(docs/hardware.md), so time both flags there to see what it chose between.

Batch sizes: on CUDA each preset's own batch size; on the CPU smaller ones for the big presets
(see CPU_BATCH) so a step takes seconds, not minutes. Throughput per image still depends on the
batch, so compare rows only at equal batch sizes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO / "src"))
from _worker import PRESET_SHAPES  # noqa: E402
from compare_peers import git_state, loadavg, run_worker, usable_cores  # noqa: E402
from diffuse.config import PRESETS  # noqa: E402  (stdlib only; no torch import)

# CPU batch per preset: the preset's own where a step stays in seconds, smaller for the big ones.
CPU_BATCH = {"digits": 64, "mnist": 64, "cifar10-small": 16, "cifar10-ddpm": 8, "64px": 4}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    cl = p.add_mutually_exclusive_group()
    cl.add_argument("--channels-last", dest="channels_last", action="store_true", default=None)
    cl.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    p.add_argument("--presets", default=",".join(PRESET_SHAPES))
    p.add_argument("--batch", type=int, default=None, help="one batch size for every preset (default: see CPU_BATCH)")
    p.add_argument("--repeats", type=int, default=5, help="timed windows per preset")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--min-seconds", type=float, default=2.0, help="length each timed window aims for")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all usable cores)")
    p.add_argument("--python", default=sys.executable, help="interpreter for the workers (default: this one)")
    p.add_argument("--cudnn-benchmark", action="store_true", help="CUDA: cudnn.benchmark on (the trainer leaves it off)")
    p.add_argument("--no-flops", action="store_true", help="skip counting FLOPs per image")
    p.add_argument("--grad-checkpointing", action="store_true", help="time the step with --grad-checkpointing")
    p.add_argument("--compile", action="store_true", help="time the step with --compile (torch.compile); the "
                                                          "compilation falls in the untimed warm-up")
    p.add_argument("--mfu", action="store_true", help="also measure the dense bf16 matmul peak and give MFU per row")
    p.add_argument("--out", default=None, help="JSON output (default benchmarks/results/train-<device>-<precision>.json)")
    return p.parse_args(argv)


def resolve_device(name: str, python: str) -> str:
    if name != "auto":
        return name
    import subprocess
    code = "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')"
    return subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout.strip()


def main(argv=None) -> int:
    a = parse_args(argv)
    device = resolve_device(a.device, a.python)
    cuda = device.startswith("cuda")
    threads = a.threads or usable_cores()
    channels_last = a.channels_last if a.channels_last is not None else (cuda or a.precision == "bf16")
    python = Path(a.python)
    presets = [p for p in a.presets.split(",") if p]
    for p in presets:
        if p not in PRESET_SHAPES:
            print(f"unknown preset {p!r}; choose from {', '.join(PRESET_SHAPES)}", file=sys.stderr)
            return 2

    env = run_worker(python, ["--mode", "env", "--device", device], threads, 600)
    if "error" in env:
        print(f"worker failed: {env['error']}", file=sys.stderr)
        return 1
    print(f"{env.get('device_name')} | torch {env['versions'].get('torch')} | {device} {a.precision}"
          f"{' channels_last' if channels_last else ''} | {threads} threads | load {loadavg()}", flush=True)
    load_start = loadavg()
    peak = None
    if a.mfu:
        pk = run_worker(python, ["--mode", "peak", "--device", device], threads, 600)
        peak = pk.get("peak_bf16_flops")
        print(f"measured dense bf16 matmul peak: {peak / 1e12:.1f} TFLOP/s" if peak else f"peak failed: {pk}", flush=True)
    def write() -> Path:
        """The JSON so far: written after every preset, so a run cut off by a time limit keeps its rows."""
        result = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "device": device,
                  "device_name": env.get("device_name"), "precision": a.precision, "channels_last": channels_last,
                  "threads": threads, "grad_checkpointing": a.grad_checkpointing, "compile": a.compile,
                  "peak_bf16_flops": peak, "repeats": a.repeats, "warmup": a.warmup, "min_seconds": a.min_seconds,
                  "loadavg_start": load_start, "loadavg_end": loadavg(), "env": env, "git": git_state(),
                  "step": "diffuse.train.TrainStep (noise, forward, MSE, backward, clip, AdamW, EMA)", "rows": rows}
        out = Path(a.out) if a.out else HERE / "results" / f"train-{device.split(':')[0]}-{a.precision}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        return out

    rows = []
    for p in presets:
        batch = a.batch or (PRESETS[p]["train"]["batch_size"] if cuda else CPU_BATCH[p])
        args = ["--impl", "ours", "--workload", f"preset:{p}", "--mode", "train", "--device", device,
                "--precision", a.precision, "--batch", str(batch), "--warmup", str(a.warmup),
                "--windows", str(a.repeats), "--min-seconds", str(a.min_seconds)]
        if channels_last:
            args.append("--channels-last")
        if a.cudnn_benchmark:
            args.append("--cudnn-benchmark")
        if a.grad_checkpointing:
            args.append("--grad-checkpointing")
        if a.compile:
            args.append("--compile")
        r = run_worker(python, args, threads, 3600)
        c, s = PRESET_SHAPES[p]
        row = {"preset": p, "image": f"{c}x{s}x{s}", "batch": batch, "preset_batch": PRESETS[p]["train"]["batch_size"]}
        if "error" in r:
            row["error"] = r["error"]
            print(f"{p}: {r['error']}", flush=True)
            rows.append(row)
            continue
        rates = r["img_per_s_windows"]
        row.update(params=r["params"], steps_per_window=r["steps_per_window"], img_per_s=statistics.median(rates),
                   img_per_s_min=min(rates), img_per_s_max=max(rates), img_per_s_all=rates,
                   max_memory_gib=r.get("max_memory_gib"), peak_rss_gib=r.get("peak_rss_gib"))
        if not a.no_flops:
            f = run_worker(python, ["--impl", "ours", "--workload", f"preset:{p}", "--mode", "flops"], threads, 600)
            if "error" not in f:
                row["flops_fwd_per_img"] = f["flops_fwd_per_img"]
                row["flops_fwdbwd_per_img"] = f["flops_fwdbwd_per_img"]
                row["tflops_per_s"] = 3 * f["flops_fwd_per_img"] * row["img_per_s"] / 1e12
                if peak:
                    row["mfu"] = row["tflops_per_s"] * 1e12 / peak
        rows.append(row)
        write()
        print(f"{p}: {row['img_per_s']:.3g} img/s [{row['img_per_s_min']:.3g}-{row['img_per_s_max']:.3g}] "
              f"at batch {batch}", flush=True)

    out = write()

    print(f"\n{'preset':14} {'image':8} {'params':>8} {'batch':>5} {'img/s':>8} {'min':>8} {'max':>8} {'GFLOP/img':>9} {'TFLOP/s':>8} {'peak GiB':>8}")
    for r in rows:
        if "error" in r:
            print(f"{r['preset']:14} {r['image']:8} failed: {r['error']}")
            continue
        gf = f"{3 * r['flops_fwd_per_img'] / 1e9:9.2f}" if "flops_fwd_per_img" in r else f"{'-':>9}"
        tf = f"{r['tflops_per_s']:8.3f}" if "tflops_per_s" in r else f"{'-':>8}"
        print(f"{r['preset']:14} {r['image']:8} {r['params'] / 1e6:7.2f}M {r['batch']:5d} {r['img_per_s']:8.3g} "
              f"{r['img_per_s_min']:8.3g} {r['img_per_s_max']:8.3g} {gf} {tf} "
              f"{(r.get('max_memory_gib') or r.get('peak_rss_gib') or float('nan')):8.2f}")
    print(f"(GFLOP/img = 3 x forward, a training step's model FLOPs; {device}, {a.precision}"
          f"{', channels_last' if channels_last else ''}, {threads} threads; batch < preset's own on CPU for "
          f"{', '.join(r['preset'] for r in rows if r['batch'] != r['preset_batch']) or 'none'})")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
