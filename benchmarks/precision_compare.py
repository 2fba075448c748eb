"""Does bf16 autocast train as well as fp32? Same preset, same seed, same data order, one run per
precision; compares the training-loss curves and the EMA models' held-out noise-prediction error.

    .venv/bin/python benchmarks/precision_compare.py --preset digits            # trains both (~6 min)
    .venv/bin/python benchmarks/precision_compare.py --runs runs/prec-fp32 runs/prec-bf16   # reuse runs

Writes benchmarks/results/precision-<preset>.json and .png. Not a test: a verdict for humans.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from diffuse.generate import load  # noqa: E402
from diffuse.visualize import timestep_mse  # noqa: E402


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
            if line.strip() and '"loss"' in line]


def smooth(values: np.ndarray, k: int) -> np.ndarray:
    k = max(1, min(k, len(values)))
    return np.convolve(values, np.ones(k) / k, mode="valid")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="digits")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--runs", nargs=2, metavar=("FP32_RUN", "BF16_RUN"), help="reuse two finished runs")
    ap.add_argument("--out-dir", default="runs/precision")
    ap.add_argument("--n", type=int, default=512, help="held-out images for the noise-prediction error")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--extra", default="", help="extra flags for diffuse train, one string")
    args = ap.parse_args()

    runs = {}
    wall = {}
    if args.runs:
        runs = {"fp32": Path(args.runs[0]), "bf16": Path(args.runs[1])}
    else:
        for prec in ("fp32", "bf16"):
            out = Path(args.out_dir) / f"{args.preset}-{prec}"
            cmd = [sys.executable, "-m", "diffuse", "train", "--preset", args.preset, "--precision", prec,
                   "--out", str(out), "--overwrite", "--no-progress", *args.extra.split()]
            if args.steps:
                cmd += ["--steps", str(args.steps)]
            if args.data_root:
                cmd += ["--data-root", args.data_root]
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            wall[prec] = round(time.perf_counter() - t0, 1)
            runs[prec] = out

    torch.set_num_threads(2)
    result = {"preset": args.preset, "runs": {k: str(v) for k, v in runs.items()}, "wall_s": wall, "precisions": {}}
    curves = {}
    for prec, run in runs.items():
        rows = read_metrics(run)
        steps = np.array([r["step"] for r in rows])
        loss = np.array([r["loss"] for r in rows])
        ips = [r["img_per_sec"] for r in rows if r.get("img_per_sec")]
        curves[prec] = (steps, loss)
        tail = loss[-max(1, len(loss) // 5):]                       # last fifth of the run
        loaded = load(str(run), torch.device("cpu"))                # EMA weights, evaluated in fp32
        mse = timestep_mse(loaded, n=args.n, seed=0, data_root=args.data_root)
        result["precisions"][prec] = {
            "config_precision": loaded.config.train.precision, "final_step": int(steps[-1]),
            "train_loss_last_fifth": float(tail.mean()), "train_loss_last_fifth_se": float(tail.std() / math.sqrt(len(tail))),
            "heldout_mse_mean_over_t": float(np.mean(mse["mse"])), "heldout_mse": dict(zip(mse["t"], mse["mse"])),
            "heldout_n": mse["n"], "median_img_per_s": float(np.median(ips)) if ips else None}
    a, b = (result["precisions"][p]["heldout_mse_mean_over_t"] for p in ("fp32", "bf16"))
    result["heldout_mse_ratio_bf16_over_fp32"] = b / a

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for prec, (steps, loss) in curves.items():
        k = max(1, len(loss) // 30)
        axes[0].plot(steps[k - 1:], smooth(loss, k), label=prec)
        p = result["precisions"][prec]
        axes[1].plot(list(p["heldout_mse"].keys()), list(p["heldout_mse"].values()), marker="o", ms=3, label=prec)
    axes[0].set(xlabel="step", ylabel="training loss (moving mean)", yscale="log", title=f"{args.preset}: training loss")
    axes[1].set(xlabel="t", ylabel="held-out eps MSE (EMA, fp32 eval)", yscale="log", title="held-out error per t")
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out_dir = ROOT / "benchmarks" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_dir / f"precision-{args.preset}.png", dpi=110)
    (out_dir / f"precision-{args.preset}.json").write_text(json.dumps(result, indent=2))
    for prec, p in result["precisions"].items():
        print(f"{prec}: train loss (last fifth) {p['train_loss_last_fifth']:.4f} ± {p['train_loss_last_fifth_se']:.4f}, "
              f"held-out MSE {p['heldout_mse_mean_over_t']:.4f}, {p['median_img_per_s']} img/s")
    print(f"held-out MSE ratio bf16/fp32: {result['heldout_mse_ratio_bf16_over_fp32']:.3f}")


if __name__ == "__main__":
    main()
