"""Score trained runs again with other sampler settings, with budget.py's scorer (FID of --fid-n EMA
images against the data's reference, the judge's confident fraction for digits/MNIST):

    python benchmarks/rescore.py RUN [RUN ...] --data mnist --data-root ../shared/data --fid-n 2000 \\
        --steps 20 40 --out rescore.jsonl

One JSON row per run and step count, appended to --out: the same weights, only the sampler's calls
changed (``--sampler`` default: the run's own)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

from budget import Scorer, cpu_description  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--data", default="mnist")
    p.add_argument("--data-root")
    p.add_argument("--fid-n", type=int, default=2000)
    p.add_argument("--ref-n", type=int)
    p.add_argument("--class-cond", action="store_true")
    p.add_argument("--sampler")
    p.add_argument("--steps", type=int, nargs="+", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, type=Path)
    args = p.parse_args(argv)
    args.weights = "ema"
    scorer = Scorer(args)
    for run in args.runs:
        for steps in args.steps:
            row = {"run": str(run), "steps": steps, "cpu": cpu_description(),
                   **scorer.score(run, sampler=args.sampler, steps=steps)}
            with args.out.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
