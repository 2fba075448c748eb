"""Few-step generation: a distilled student against its teacher, FID per network call, on this machine.

    python benchmarks/distill.py runs/mnist-8min --data mnist --data-root ../shared/data --fid-n 2000 \
        --seeds 0,1 --out benchmarks/results/distill-mnist.json
    python benchmarks/distill.py runs/demo --data digits --fid-n 2000 --out benchmarks/results/distill-digits.json
    python benchmarks/distill.py --report-only --out benchmarks/results/distill-mnist.json

1. The student: ``diffuse distill TEACHER --nfe 2`` for ``--fraction`` (default 0.5) of the teacher's
   recorded training time as a budget plan (``--time-limit``), or ``--steps N``; its wall-clock is
   measured around the call. One student serves every NFE (ECT's training does not depend on it).
   ``--distill-args`` passes more flags to it (e.g. ``'--target teacher'``); ``--tuning 2,1.0`` tunes
   with 2 stages and ln sigma_t ~ N(1.0, 2^2) instead of diffuse's defaults. An empty
   ``--teacher-nfe`` or ``--student-nfe`` scores no cells of that side.
2. Scoring, the same for every cell: ``--fid-n`` images, image i from seed stream (seed, i), for
   each of ``--seeds``; FID against the data's test split (standard sets; a folder: ``--ref-n`` of
   its own images) and the judge classifier's confident fraction where one exists. Teacher cells:
   ``--teacher-samplers`` (default dpmpp-2m-sde at its default eta, and dpmpp-2m) at each of
   ``--teacher-nfe``; student cells: the consistency sampler at each of ``--student-nfe`` (its
   default karras levels), and on each set of levels of ``--student-levels`` (one per call).
3. JSON (rows per cell and seed, the CPU with its family, the wall-clocks, the goals: 2 calls
   within 1.5x and 4 calls within 1.2x of the teacher's 20-call default FID, distillation within
   half the teacher's training time) and a plot of FID against NFE, teacher's best sampler per
   NFE against the student, next to it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(HERE))

from budget import Scorer, cpu_description, save_log_log  # noqa: E402  (benchmarks/budget.py: one scorer and plot for both)

GOALS = {2: 1.5, 4: 1.2}                 # student FID at this NFE <= factor x the teacher's 20-NFE default


def tuning(text: str) -> tuple[int, float]:
    """``STAGES,MEAN`` of --tuning: 1 to MAX_ECT_STAGES stages, a finite mean (the bounds diffuse's config
    checks, here so that a bad value is a usage error before the student's process starts)."""
    from diffuse.config import MAX_ECT_STAGES

    try:
        stages, mean = text.split(",")
        stages, mean = int(stages), float(mean)
    except ValueError:
        stages, mean = 0, float("nan")
    if not (1 <= stages <= MAX_ECT_STAGES and math.isfinite(mean)):
        raise argparse.ArgumentTypeError(f"expected STAGES,MEAN (1-{MAX_ECT_STAGES} stages, a number), e.g. '2,1.0', "
                                         f"got {text!r}")
    return stages, mean


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("teacher", nargs="?")
    p.add_argument("--data", default="mnist", help="the teacher's data set (for the FID reference)")
    p.add_argument("--data-root", default=None)
    p.add_argument("--class-cond", action="store_true")
    p.add_argument("--fraction", type=float, default=0.5, help="distillation budget as a fraction of the "
                                                                  "teacher's training time (default 0.5)")
    p.add_argument("--steps", type=int, default=None, help="distil for N steps instead of a time budget")
    p.add_argument("--distill-args", default="", help="more flags for diffuse distill, e.g. '--target teacher'")
    p.add_argument("--tuning", type=tuning, default=None, metavar="STAGES,MEAN",
                   help="the consistency tuning's stages and mean of ln sigma_t instead of diffuse's defaults "
                        "(distill.TUNING_DEFAULTS; no CLI flag sets them): to fit them to a data set")
    p.add_argument("--teacher-nfe", default="1,2,4,10,20")
    p.add_argument("--teacher-samplers", default="dpmpp-2m-sde,dpmpp-2m")
    p.add_argument("--student-nfe", default="1,2,4")
    p.add_argument("--student-levels", default="", help="extra student cells on given noise levels, one per "
                                                         "call: e.g. '80,2.5;20,2.5;80,2.5,0.8,0.2'")
    p.add_argument("--fid-n", type=int, default=2000)
    p.add_argument("--ref-n", type=int, default=None)
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--work", default="runs/distill-bench")
    p.add_argument("--out", default="benchmarks/results/distill.json")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--score-only", action="store_true", help="score the student already in --work")
    args = p.parse_args(argv)
    args.seed = 0                         # Scorer's default stream; every cell passes its own
    if not args.report_only and not args.teacher:
        p.error("name the teacher run (or --report-only)")
    return args


def teacher_seconds(run: Path) -> float:
    """The teacher's recorded training time (its last checkpoint's state, summed over resumes)."""
    state = json.loads((run / "checkpoints" / "last" / "state.json").read_text())
    return float(state.get("train_seconds", 0.0))


def distil(args, student: Path, minutes: float | None) -> float:
    length = ["--steps", str(args.steps)] if args.steps else ["--time-limit", f"{minutes:.3f}"]
    flags = ["distill", args.teacher, "--out", str(student), "--nfe", "2", "--overwrite", "--no-progress", *length,
             *args.distill_args.split()]
    if args.tuning:           # no CLI flag: the defaults replaced in the student's process (its config records them)
        stages, mean = args.tuning
        program = ["-c", "import sys; from diffuse.threads import prefer_passive_wait; prefer_passive_wait(); "
                         "import diffuse.distill as d; d.TUNING_DEFAULTS.update(stages=%d, p_mean=%r); "
                         "from diffuse.cli import main; sys.exit(main(sys.argv[1:]))" % (stages, mean)]
    else:
        program = ["-m", "diffuse"]
    cmd = [sys.executable, *program, *flags]
    print(" ".join(flags), f"(tuning {args.tuning})" if args.tuning else "", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, env={**os.environ, "PYTHONPATH": str(REPO / "src")}, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def cells(args) -> list[tuple[str, str, int, tuple[float, ...] | None]]:
    """(who, sampler, nfe, levels) of every cell: the teacher's samplers at its NFEs, the student's at
    its (levels None: the sampler's own spacing), then the student on each ``--student-levels`` set."""
    teacher = [("teacher", s, int(n), None) for n in args.teacher_nfe.split(",") if n
               for s in args.teacher_samplers.split(",")]
    student = [("student", "consistency", int(n), None) for n in args.student_nfe.split(",") if n]
    given = [tuple(float(v) for v in part.split(",")) for part in args.student_levels.split(";") if part.strip()]
    return teacher + student + [("student", "consistency", len(levels), levels) for levels in given]


def summary(rows: list[dict]) -> dict:
    """Mean FID over seeds per (who, sampler, nfe); the teacher's best sampler per NFE; the goals."""
    means: dict[tuple, list[float]] = {}
    by_levels: dict[str, list[float]] = {}
    for r in rows:
        if r.get("levels") is not None:   # a cell on given levels is reported on its own, not as the NFE's
            by_levels.setdefault(",".join(f"{v:g}" for v in r["levels"]), []).append(r["fid"])
        else:
            means.setdefault((r["who"], r["sampler"], r["nfe"]), []).append(r["fid"])
    mean = {k: sum(v) / len(v) for k, v in means.items()}
    best = {}
    for (who, sampler, nfe), fid in mean.items():
        if who == "teacher" and (nfe not in best or fid < best[nfe][1]):
            best[nfe] = (sampler, fid)
    base = mean.get(("teacher", "dpmpp-2m-sde", 20))
    goals = {}
    for nfe, factor in GOALS.items():
        got = mean.get(("student", "consistency", nfe))
        if base is not None and got is not None:
            goals[f"{nfe}_nfe"] = {"student_fid": round(got, 3), "limit": round(factor * base, 3),
                                   "met": got <= factor * base}
    return {"mean_fid": {f"{w} {s} {n}": round(v, 3) for (w, s, n), v in sorted(mean.items())},
            "teacher_best": {n: {"sampler": s, "fid": round(f, 3)} for n, (s, f) in sorted(best.items())},
            "teacher_default_20": base, "goals": goals,
            "student_levels_fid": {k: round(sum(v) / len(v), 3) for k, v in by_levels.items()}}


def report(result: dict, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = result["summary"]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    best = sorted((int(n), v["fid"]) for n, v in s["teacher_best"].items())
    if best:
        ax.plot(*zip(*best), marker="o", label="teacher, best sampler per NFE")
    student = sorted((int(k.split()[-1]), v) for k, v in s["mean_fid"].items() if k.startswith("student"))
    if student:
        ax.plot(*zip(*student), marker="s", label="distilled student (consistency)")
    if s.get("teacher_default_20"):
        ax.axhline(s["teacher_default_20"], color="gray", lw=0.8, ls="--", label="teacher, 20-NFE default")
    ax.set_xlabel("network calls per image (NFE)")
    ax.set_ylabel(f"FID (N = {result['fid_n']:,}, mean of {len(result['seeds'])} seed sets)")
    save_log_log(fig, ax, out, f"{Path(result['data']).name}: teacher vs distilled ({result['cpu']})", legend_size=8)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    if args.report_only:
        report(json.loads(out.read_text()), out)
        return 0
    teacher, student = Path(args.teacher), Path(args.work) / "student"
    taught_s = teacher_seconds(teacher)
    minutes = args.fraction * taught_s / 60 if not args.steps else None
    distil_s = None if args.score_only else distil(args, student, minutes)
    seeds = [int(x) for x in args.seeds.split(",")]
    student_cfg = json.loads((student / "config.json").read_text())
    state = student / "checkpoints" / "last" / "state.json"          # where the tuning ended (none for gits)
    tuned = json.loads(state.read_text()) if state.is_file() else {}
    result = {"teacher": str(teacher), "data": args.data, "fid_n": args.fid_n, "ref_n": args.ref_n, "seeds": seeds,
              "cpu": cpu_description(), "teacher_train_seconds": round(taught_s, 1),
              "distill_call_seconds": round(distil_s, 1) if distil_s else None,
              "distill_fraction_of_teacher": round(distil_s / taught_s, 3) if distil_s and taught_s else None,
              "student_steps": tuned.get("step"), "student_images_seen": tuned.get("images_seen"),
              "student_config": student_cfg["train"], "student_distill": student_cfg["distill"], "rows": []}
    scorer = Scorer(args)
    for who, sampler, nfe, levels in cells(args):
        for seed in seeds:
            scored = scorer.score(teacher if who == "teacher" else student, sampler, nfe, seed, levels)
            row = {**scored, "who": who, "sampler": sampler, "nfe": nfe, "seed": seed, "record": scored["sampler"],
                   "levels": list(levels) if levels else None}
            result["rows"].append(row)
            print(json.dumps(row), flush=True)
            result["summary"] = summary(result["rows"])
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(result, indent=2) + "\n")
    report(result, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
