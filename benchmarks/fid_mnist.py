"""Inception throughput and FID(MNIST train, MNIST test) for docs/README-eval.md.

    PYTHONPATH=src python benchmarks/fid_mnist.py --data-root DIR --out OUT [--n 2000 10000]

Throughput: 16 images of warm-up (discarded), then 3 timed runs of 64 MNIST images at batch 32;
mean ± std of img/s. FID: the first n of a seeded (0) random permutation of each split, so the 2k
sets are subsets of the 10k ones. Features are saved per 500-image chunk under OUT and reused on a
re-run. Results go to stdout and OUT/results.jsonl, one JSON object per line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from diffuse import fid, inception
from diffuse.data import load_dataset

CHUNK = 500


def log(out: Path, record: dict) -> None:
    line = json.dumps(record)
    print(line, flush=True)
    with open(out / "results.jsonl", "a") as f:
        f.write(line + "\n")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data-root", default=None)
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, nargs="+", default=[2000, 10000])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ex = inception.load_extractor(device=args.device)
    env = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": platform.processor(),
           "cores": os.cpu_count(), "device": args.device, "load_avg": os.getloadavg()}
    splits = {s: load_dataset("mnist", args.data_root, s).images for s in ("train", "test")}

    x = splits["train"][:64]
    ex.features(x[:16], batch_size=16)
    rates = []
    for _ in range(3):
        t0 = time.perf_counter()
        ex.features(x, batch_size=32)
        rates.append(len(x) / (time.perf_counter() - t0))
    log(out, {"what": "throughput", "img_per_s_mean": float(np.mean(rates)), "img_per_s_std": float(np.std(rates)),
              "runs": rates, **env})

    orders = {s: np.random.default_rng(0).permutation(len(im))[:max(args.n)] for s, im in splits.items()}

    def features(split: str, n: int) -> np.ndarray:
        parts = []
        for start in range(0, n, CHUNK):
            path = out / f"{split}_{start:06d}.npy"
            if not path.is_file():
                t0 = time.perf_counter()
                idx = torch.from_numpy(orders[split][start:start + CHUNK])
                np.save(path, ex.features(splits[split][idx], batch_size=32))
                log(out, {"what": "chunk", "split": split, "start": start, "seconds": time.perf_counter() - t0,
                          "load_avg": os.getloadavg()})
            parts.append(np.load(path))
        return np.concatenate(parts)[:n]

    for n in sorted(args.n):                      # smallest first: its number arrives early
        meta = {"extractor": ex.describe()}
        a = fid.stats_from_features(features("train", n), meta)
        b = fid.stats_from_features(features("test", n), meta)
        t0 = time.perf_counter()
        r = fid.compare(a, b)
        log(out, {"what": "fid", "n": n, "fid": r["fid"], "kid": r["kid"], "kid_std": r["kid_std"],
                  "seconds": time.perf_counter() - t0})

if __name__ == "__main__":
    main()
