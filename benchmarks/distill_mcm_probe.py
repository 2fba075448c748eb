"""Exploration, not a product path: a two-segment multistep consistency student (Heek et al. 2024,
"Multistep consistency models") measured against ``diffuse distill``'s consistency student at the
same wall-clock and the same 2 calls (docs/distill.md, "Two segments instead of one, measured").

diffuse's consistency function maps any noise level to the boundary sigma_min in one DDIM-shaped
jump, f(x, sigma) = (s / sigma) x + (1 - s / sigma) D(x, sigma) with s = sigma_min, and 2-call
sampling re-noises its first answer (CM alg. 1). A multistep consistency model splits the levels at
B (here the 2-call sampler's second level, 10 / 3.7): above B, s = B, so f lands on the ODE at B;
below it, s = sigma_min. Its 2 calls are both jumps, with no noise added: x_B = f(x_10, 10), then
x_0 = f(x_B, B-). Training is ECT's (the same levels, stages, metric and weight), with each pair
kept inside its segment (r clamped to B when t > B, where f(x_B, B) = x_B is the boundary); the
``mcm-x0`` variant divides the upper segment's difference by (1 - B / t), its loss in x0 units.
Each variant runs ``diffuse distill TEACHER --nfe 2 --time-limit`` in its own process, patched
in-process (``ect``: unpatched, the baseline), then scores 2-call samples at the geometric levels.

    python benchmarks/distill_mcm_probe.py RUN --variants ect,mcm,mcm-x0 --out mcm.jsonl

Appends one JSON line per variant and seed set (FID of ``--fid-n`` samples; budget.py's Scorer).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

from distill_sfd_probe import read_rows  # noqa: E402  (the sibling probe's JSONL reader)

VARIANTS = ("ect", "mcm", "mcm-x0")
BOUNDARY = 10 / 3.7          # samplers.consistency_levels' second of 2 levels (CM_SIGMA_TOP / CM_LEVEL_RATIO)
AT_LEAST = 1 - 1e-12         # a level this close to B counts as B (float rounding of 10 / 3.7)


def patch_segments(x0_loss: bool) -> None:
    """Make diffuse's consistency function, ECT pairs and consistency sampler two-segment (above)."""
    import torch

    import diffuse.denoiser as dn
    import diffuse.distill as di
    import diffuse.samplers as smp

    def boundary(sigma: torch.Tensor, sigma_min: float) -> torch.Tensor:
        return torch.where(sigma >= BOUNDARY * AT_LEAST, torch.full_like(sigma, BOUNDARY),
                           torch.full_like(sigma, sigma_min))

    def call(self, x, sigma):
        if isinstance(sigma, torch.Tensor) and (sigma.ndim > 0 or sigma.device.type != "cpu"):
            s64 = sigma.to(device=x.device, dtype=torch.float64)
            r = (boundary(s64, self.sigma_min) / s64).to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
        else:
            r = (BOUNDARY if float(sigma) >= BOUNDARY * AT_LEAST else self.sigma_min) / float(sigma)
        return r * x + (1 - r) * self.denoiser(x, sigma)
    dn.ConsistencyFunction.__call__ = call

    plain_r = di.ect_sigma_r

    def sigma_r(sigma_t, progress, sigma_min, s=di.ECTSettings()):
        r = plain_r(sigma_t, progress, sigma_min, s)
        return torch.where(sigma_t > BOUNDARY, r.clamp(min=BOUNDARY), r)
    di.ect_sigma_r = sigma_r

    if x0_loss:
        def loss(f, x0, noise, sigma_t, sigma_r, c, teacher=None):
            view = lambda s: s.to(x0.dtype).view(-1, *([1] * (x0.ndim - 1)))  # noqa: E731
            with torch.no_grad():
                target = f(x0 + view(sigma_r) * noise, sigma_r)
            out = f(x0 + view(sigma_t) * noise, sigma_t)
            scale = view(1 / (1 - boundary(sigma_t, 0.0) / sigma_t))
            gap = sigma_t - sigma_r
            return torch.where(gap > 0, 1 / gap, 0.0).float() * di.pseudo_huber((out - target) * scale, c)
        di.consistency_loss = loss

    plain_sampler = smp.sample_consistency

    def sampler(f, x, sigmas, *, noise=None, callback=None):
        if not (len(sigmas) == 3 and abs(float(sigmas[1]) - BOUNDARY) < 1e-6):
            return plain_sampler(f, x, sigmas, noise=noise, callback=callback)    # the run's grids only
        x = f(x, sigmas[0])                                                      # to the ODE at B
        return f(x, torch.tensor(BOUNDARY * (1 - 1e-6), dtype=torch.float64))    # B -> sigma_min
    smp.sample_consistency = sampler


def run_variant(a: argparse.Namespace) -> None:
    """One variant in this process: distil (timed), then score each seed set."""
    from budget import Scorer
    from diffuse.cli import main as cli
    if a.variant != "ect":
        patch_segments(x0_loss=a.variant == "mcm-x0")
    out = Path(a.work) / a.variant
    t0 = time.perf_counter()
    rc = cli(["distill", a.teacher, "--out", str(out), "--overwrite", "--nfe", "2",
              "--time-limit", f"{a.seconds / 60:g}"])
    seconds = time.perf_counter() - t0
    if rc:
        raise SystemExit(f"diffuse distill failed for {a.variant}")
    steps = max(int(p.name.split("_")[1]) for p in (out / "checkpoints").glob("step_*"))
    scorer = Scorer(argparse.Namespace(data=a.data, data_root=a.data_root, ref_n=None, fid_n=a.fid_n, seed=0,
                                       class_cond=False))
    for seed in map(int, a.seeds.split(",")):
        fid = scorer.score(out, "consistency", 2, seed)["fid"]
        row = {"variant": a.variant, "teacher": a.teacher, "seconds": a.seconds, "call_seconds": round(seconds, 1),
               "steps": steps, "nfe": 2, "seed": seed, "fid_n": a.fid_n, "fid": fid}
        with open(a.out, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)


def means(rows: list[dict]) -> dict[str, tuple[float, int]]:
    """variant -> (mean FID over its seed sets, steps), in the order run."""
    out: dict[str, list[dict]] = {}
    for r in rows:
        out.setdefault(r["variant"], []).append(r)
    return {v: (sum(r["fid"] for r in rs) / len(rs), rs[0]["steps"]) for v, rs in out.items()}


LABELS = {"ect": "one segment, re-noised between calls (`diffuse distill`, ECT)",
          "mcm": "two segments at B = 2.70, loss in x units",
          "mcm-x0": "two segments at B = 2.70, loss in x0 units"}


def report(rows: list[dict]) -> str:
    """docs/distill.md's table: one row per variant, its seed sets' FIDs and their mean."""
    lines = ["| student (2 calls, 75 s) | steps in 75 s | FID, seed sets 0 and 1 | mean |", "|---|---|---|---|"]
    for variant, (fid, steps) in means(rows).items():
        each = ", ".join(f"{r['fid']:.1f}" for r in rows if r["variant"] == variant)
        mean = f"**{fid:.1f}**" if variant == "ect" else f"{fid:.1f}"
        lines.append(f"| {LABELS[variant]} | {steps:,} | {each} | {mean} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("teacher")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--variant", help=argparse.SUPPRESS)          # one variant, in a child process
    p.add_argument("--seconds", type=float, default=75.0)
    p.add_argument("--data", default="digits")
    p.add_argument("--data-root", default=None)
    p.add_argument("--fid-n", type=int, default=500)
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--work", default="runs/mcm-probe")
    p.add_argument("--out", default="benchmarks/results/distill-mcm-probe.jsonl")
    p.add_argument("--report", action="store_true", help="print --out's rows as docs/distill.md's table")
    a = p.parse_args()
    if a.report:
        return print(report(read_rows(Path(a.out))))
    if a.variant:
        return run_variant(a)
    for v in a.variants.split(","):
        if v not in VARIANTS:
            raise SystemExit(f"unknown variant {v!r}; choose from {', '.join(VARIANTS)}")
    for v in a.variants.split(","):                  # one process each: the patches are process-wide
        subprocess.run([sys.executable, __file__, *sys.argv[1:], "--variant", v], check=True)


if __name__ == "__main__":
    main()
