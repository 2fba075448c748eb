"""Which schedule a budget plan should use: FID after B minutes for variants of the plan's flags.

    python benchmarks/budget_schedules.py --data mnist --data-root ../shared/data --minutes 2 --fid-n 1000 \
        --variants "linear=--cooldown 1" "wsd=" "wsd-lr2=--lr 2e-3" "wsd-b64=--batch-size 64" \
        --out benchmarks/results/budget-schedules-mnist.json
    python benchmarks/budget_schedules.py --data EMOJI_DIR --class-cond --ref-n 2000 --minutes 15 --fid-n 500 \
        --variants "rung-0.67M=--base-channels 24 ..." --out benchmarks/results/budget-emoji-rungs-intel.json

Each variant is ``NAME=FLAGS``: a fresh ``diffuse train --data D --time-limit B FLAGS`` (a budget plan:
the model sized for B on this machine unless FLAGS name one), then FID of ``--fid-n`` EMA images
(the run's default sampler) against the test split and the judge's confident fraction, scored as
``benchmarks/budget.py`` scores (its Scorer). Rows are appended to ``--out`` as they finish, with the
CPU (model and family) beside them: one seed per row, so read differences of a few FID as noise.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

from budget import Scorer, cpu_description, run_facts  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="mnist")
    p.add_argument("--data-root", default=None)
    p.add_argument("--minutes", type=float, default=2.0)
    p.add_argument("--variants", nargs="+", required=True, help="NAME=FLAGS (FLAGS may be empty)")
    p.add_argument("--fid-n", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default="runs/budget-schedules")
    p.add_argument("--class-cond", action="store_true", help="train with --class-cond and score with the "
                                                             "classes cycled (a folder of class folders)")
    p.add_argument("--ref-n", type=int, default=None, help="a folder's FID reference: this many of its images")
    p.add_argument("--out", default="benchmarks/results/budget-schedules.json")
    return p.parse_args(argv)


def variants(specs: list[str]) -> list[tuple[str, list[str]]]:
    """[(name, flags)] from NAME=FLAGS specs; a spec without '=' or with an empty name is refused."""
    out = []
    for spec in specs:
        name, sep, flags = spec.partition("=")
        if not sep or not name:
            raise SystemExit(f"a variant is NAME=FLAGS, got {spec!r}")
        out.append((name, shlex.split(flags)))
    return out


def _seed_parser(default: int) -> argparse.ArgumentParser:
    """Reads --seed out of a variant's flags the way diffuse train's own argparse does."""
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    p.add_argument("--seed", type=int, default=default)
    return p


def main(argv=None) -> None:
    args = parse_args(argv)
    args.weights = "ema"
    out = Path(args.out)
    result = json.loads(out.read_text()) if out.exists() else {"data": args.data, "minutes": args.minutes,
                                                                "fid_n": args.fid_n, "rows": []}
    scorer = Scorer(args)
    for name, flags in variants(args.variants):
        run = Path(args.work) / name
        cmd = [sys.executable, "-m", "diffuse", "train", "--data", args.data, "--out", str(run), "--overwrite",
               "--seed", str(args.seed), "--no-progress", "--time-limit", f"{args.minutes:g}", *flags]
        if args.data_root:
            cmd += ["--data-root", args.data_root]
        if args.class_cond:
            cmd += ["--class-cond"]
        t0 = time.perf_counter()
        # this checkout's diffuse, as budget.py runs it, whatever PYTHONPATH the caller has
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL,
                       env={**os.environ, "PYTHONPATH": str(HERE.parent / "src")})
        # a variant's own --seed (either spelling) comes after the script's on the command line, so it is the run's
        seed = _seed_parser(args.seed).parse_known_args(flags)[0].seed
        row = {"name": name, "flags": " ".join(flags), "minutes": args.minutes, "seed": seed,
               "cpu": cpu_description(),
               "call_seconds": round(time.perf_counter() - t0, 1), **run_facts(run), **scorer.score(run)}
        result["rows"].append(row)
        out.write_text(json.dumps(result, indent=1) + "\n")
        # a folder has no judge, so no "confident"
        print(json.dumps({k: row[k] for k in ("name", "steps", "fid", "confident") if k in row}), flush=True)


if __name__ == "__main__":
    main()
