"""Sampler quality on one trained run: which sampler/step/spacing settings reach ddpm-1000's quality.

For each cell (sampler, NFE budget, spacing, Karras sigma_max cap) it draws N images from the same
seeds (image i from stream (seed, i)) and scores them by
  - ``confident``: the fraction the held-out judge classifier (diffuse.classifier, trained once on
    the data's train split) labels with probability >= 0.9: a label-free legibility score;
  - ``fid``: FID against the data's test split at this N (optional: --fid; Inception on a CPU is
    the slow part). FID at small N is biased upward: compare only cells of equal N.

    PYTHONPATH=src python benchmarks/sampler_quality.py RUN --n 500 --out benchmarks/results/sampler_quality.json
    PYTHONPATH=src python benchmarks/sampler_quality.py RUN --cells "dpmpp-2m:20:karras:inf,dpmpp-2m:20:karras:80"

A cell is sampler:steps followed by any of :SPACING, :CAP (a number; 'inf' = the schedule's own
sigma_max, the old default), :noclip (no per-step x0 clamp to [-1, 1]) and :eta=X (ddim, dpmpp-2m-sde);
what is not given keeps the sampler's default. E.g. "dpmpp-2m-sde:20:eta=1", "dpmpp-2m:20:karras:inf".
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from diffuse import classifier, fid
from diffuse.device import cpu_model
from diffuse.generate import generate, load
from diffuse.inception import load_extractor
from diffuse.samplers import SPACINGS

DEFAULT_CELLS = ("ddpm:1000", "dpmpp-2m-sde:20", "dpmpp-2m:20:karras:inf", "dpmpp-2m:20", "ddim:20", "euler:20",
                 "heun:19", "ddim:50", "heun:35")


def parse_cell(spec: str) -> dict:
    """sampler:steps, then any of: a spacing name, a Karras cap (a number or 'inf'), 'noclip', 'eta=X'."""
    parts = spec.split(":")
    cell = {"sampler": parts[0], "steps": int(parts[1]), "spacing": None, "sigma_max_cap": None, "clip_x0": True,
            "eta": None}
    for token in filter(None, parts[2:]):
        if token in SPACINGS:
            cell["spacing"] = token
        elif token == "noclip":
            cell["clip_x0"] = False
        elif token.startswith("eta="):
            cell["eta"] = float(token[4:])
        else:
            cell["sigma_max_cap"] = float(token)          # float("inf") for the schedule's own sigma_max
    return cell


def generate_cached(loaded, spec: str, n: int, cache: Path, kw: dict) -> tuple[torch.Tensor, dict]:
    """``generate(loaded, n=n, **kw)`` one batch at a time, each batch kept in ``cache`` and reused.
    Image i depends only on (seed, i), so batches made in different processes join into the
    same images one call makes; the record's seconds are the sum of the batches' own."""
    cache.mkdir(parents=True, exist_ok=True)
    step = kw["batch_size"]
    parts, seconds, record = [], 0.0, None
    for start in range(0, n, step):
        f = cache / f"{spec.replace(':', '_')}-seed{kw['seed']}-{start:06d}-{min(n, start + step):06d}.pt"
        if f.exists():
            part = torch.load(f)
        else:
            images, rec = generate(loaded, n=min(step, n - start), first_index=start, **kw)
            part = {"images": images, "record": rec}
            torch.save(part, f.with_suffix(".tmp"))
            f.with_suffix(".tmp").replace(f)
            print(f"{spec}: images {start}-{start + len(images)} of {n} in {rec['seconds']:.0f} s", file=sys.stderr,
                  flush=True)
        parts.append(part["images"])
        seconds += part["record"]["seconds"]
        record = part["record"]
    return torch.cat(parts), {**record, "seconds": round(seconds, 3)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run")
    ap.add_argument("--n", type=int, default=500, help="images per cell (default 500)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cells", default=",".join(DEFAULT_CELLS))
    ap.add_argument("--fid", action="store_true", help="also FID against the test split at --n")
    ap.add_argument("--batch-size", type=int, default=250)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N] (sampling, Inception and the judge)")
    ap.add_argument("--out", default=None, help="JSON file for the results")
    ap.add_argument("--cache", default=None,
                    help="folder keeping each finished batch of images, so a long cell (ddpm:1000 at N = 2,000 "
                         "is hours of CPU) resumes after a kill where it stopped")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    loaded = load(args.run, device)
    cfg = loaded.config
    judge = classifier.load_or_train(cfg.data.name, cfg.data.root, cfg.model.image_size, cfg.model.in_channels,
                                     device=device, log=lambda m: print(m, file=sys.stderr))
    ref = extractor = None
    if args.fid:
        extractor = load_extractor(None, device, "tf-bilinear")
        ref = fid.reference_stats(cfg.data.name, "test", None, extractor=extractor, data_root=cfg.data.root,
                                  image_size=cfg.data.image_size, channels=cfg.data.channels, progress=False)
    rows = []
    for spec in args.cells.split(","):
        cell = parse_cell(spec)
        t0 = time.perf_counter()
        kw = dict(seed=args.seed, sampler=cell["sampler"], steps=cell["steps"], spacing=cell["spacing"],
                  sigma_max_cap=cell["sigma_max_cap"], clip_x0=cell["clip_x0"], eta=cell["eta"],
                  batch_size=args.batch_size, device=device)
        if args.cache:
            images, record = generate_cached(loaded, spec, args.n, Path(args.cache), kw)
        else:
            images, record = generate(loaded, n=args.n, **kw)
        row = {"cell": spec, **cell, "spacing": record["spacing"], "eta": record["eta"], "nfe": record["nfe"],
               "n": args.n,
               "confident": round(classifier.confident_fraction(judge, images), 4),
               "sample_seconds": record["seconds"]}
        if args.fid:
            r = fid.compare(fid.stats_of_images(images, extractor), ref)
            row["fid"] = round(r["fid"], 3)
        row["seconds"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {"run": str(loaded.source), "step": loaded.header.get("step"), "data": cfg.data.name,
              "objective": loaded.formulation.name, "n": args.n, "seed": args.seed,
              "judge_test_accuracy": judge.test_accuracy, "confidence_threshold": 0.9,
              "fid_reference": f"{cfg.data.name} test split" if args.fid else None,
              "cpu": cpu_model(), "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "threads": torch.get_num_threads(), "rows": rows}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"{'cell':<28} {'nfe':>5} {'confident':>9} {'fid':>8}")
    for r in rows:
        print(f"{r['cell']:<28} {r['nfe']:>5} {r['confident']:>9.3f} {r.get('fid', float('nan')):>8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
