"""Exploration, not a product path: a data-free trajectory student (SFD-style) measured against
``diffuse distill``'s consistency student at the same wall-clock (docs/distill.md, "A data-free
trajectory student, measured").

SFD (Zhou et al. 2024, "Simple and fast distillation of diffusion models"): the student takes n
DDIM (Euler) steps at fixed levels sigma_0 > ... > sigma_{n-1} > 0 and is trained, step by step, to
land where the teacher's finely solved probability-flow ODE lands at the next level, from the
teacher's own trajectory point (L1 loss). No training data: trajectories start from noise. Here the
teacher's trajectories are DPM-Solver++(2M) over ``--fine`` Karras levels (the student's levels
inserted), generated in pools of ``--pool`` and each pool reused for ``--epochs`` passes, since on a
CPU the teacher's calls cost more than the student's steps. The student starts as the teacher's EMA
weights, AdamW, gradient clipping 1.0; the clock covers trajectory generation and training.

    python benchmarks/distill_sfd_probe.py RUN --levels 80,2.5 --seconds 75 --out sfd.jsonl

Writes the student as a copy of RUN with its weights replaced (``--work``) and appends one JSON line
per scored seed set (FID of ``--fid-n`` DDIM samples on the student's levels; budget.py's Scorer).
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))


# the consistency student of the same teacher and clock (docs/distill.md's targets table: the default,
# --target data; FID per call count, mean of two seed sets)
ECT_RESULTS = Path(__file__).resolve().parent / "results" / "distill-digits-targets-intel.json"


def ect_fid(path: Path = ECT_RESULTS) -> dict[int, float]:
    row = next(r for r in json.loads(path.read_text())["rows"] if r["variant"] == "ect-data")
    return {int(k): v for k, v in row["fid"].items()}


def read_rows(path: Path) -> list[dict]:
    """The probe's JSONL rows (one per scored seed set)."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def report(rows: list[dict], ect: dict[int, float]) -> str:
    """One table row per probe run (its seed sets averaged), in the order run, beside ``ect``'s FID
    at the same number of calls."""
    runs: dict[str, list[dict]] = {}
    for r in rows:
        runs.setdefault(r["run"], []).append(r)
    lines = ["| calls | levels | lr | teacher trajectories: levels, pool, passes | steps in 75 s | FID | "
             "consistency student (ECT) |", "|---|---|---|---|---|---|---|"]
    for rs in runs.values():
        r, calls = rs[0], len(rs[0]["levels"])
        fid = sum(x["fid"] for x in rs) / len(rs)
        lines.append(f"| {calls} | {', '.join(f'{v:g}' for v in r['levels'])} | {r['lr']:g} | {r['fine']}, "
                     f"{r['pool']:,}, {r['epochs']} | {r['steps']} | {fid:.1f} | {ect.get(calls, '')} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("teacher")
    p.add_argument("--levels", default="80,2.5", help="the student's call levels, comma-separated (0 appended)")
    p.add_argument("--seconds", type=float, default=75.0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--fine", type=int, default=12, help="the teacher's Karras levels per trajectory")
    p.add_argument("--pool", type=int, default=1024)
    p.add_argument("--epochs", type=int, default=30, help="passes over each pool of trajectories")
    p.add_argument("--data", default="digits")
    p.add_argument("--data-root", default=None)
    p.add_argument("--fid-n", type=int, default=500)
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--work", default="runs/sfd-probe")
    p.add_argument("--out", default="benchmarks/results/distill-sfd-probe.jsonl")
    p.add_argument("--report", action="store_true", help="print --out's rows as docs/distill.md's table")
    a = p.parse_args()
    if a.report:
        print(report(read_rows(a.out), ect_fid()))
        return

    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from budget import Scorer
    from diffuse.generate import load
    from diffuse.objectives import make_denoiser
    from diffuse.samplers import KARRAS_SIGMA_MAX_CAP, _dpmpp_2m, karras_sigmas, prior

    torch.manual_seed(0)
    teacher = load(a.teacher, torch.device("cpu"))
    t_den = make_denoiser(teacher.net, teacher.formulation)
    levels = [float(s) for s in a.levels.split(",")]
    # the fine grid holds the student's levels exactly, so a trajectory's state at each is a solver state
    fine = karras_sigmas(t_den.sigma_min, min(t_den.sigma_max, KARRAS_SIGMA_MAX_CAP), a.fine)
    fine = torch.unique(torch.cat([fine, torch.tensor(levels, dtype=torch.float64)])).flip(0)
    fine = torch.cat([fine, fine.new_zeros(1)])
    at = [int((fine - s).abs().argmin()) for s in levels] + [len(fine) - 1]
    c, size = teacher.config.model.in_channels, teacher.config.model.image_size

    student = copy.deepcopy(teacher.net).train().requires_grad_(True)
    s_den = make_denoiser(student, teacher.formulation)
    opt = torch.optim.AdamW(student.parameters(), lr=a.lr, weight_decay=0.0)

    @torch.no_grad()
    def trajectories(n: int) -> torch.Tensor:
        """[n, len(levels) + 1, C, H, W]: the teacher's ODE states at the student's levels, then x0."""
        states = {}
        out = _dpmpp_2m(t_den, prior(torch.randn(n, c, size, size), fine), fine, None,
                        lambda i, x, x0, sigma: states.__setitem__(i, x.clone()) if i in at else None)
        states[len(fine) - 1] = out
        return torch.stack([states[i] for i in at], 1)

    start, steps, gen_seconds, losses = time.time(), 0, 0.0, []
    while time.time() - start < a.seconds:
        t = time.time()
        pool = torch.cat([trajectories(min(512, a.pool - i)) for i in range(0, a.pool, 512)])   # 512 at a time
        gen_seconds += time.time() - t
        order = torch.cat([torch.randperm(len(pool)) for _ in range(a.epochs)])
        for b in range(0, len(order) - a.batch + 1, a.batch):
            if time.time() - start >= a.seconds:
                break
            traj = pool[order[b:b + a.batch]]
            loss = 0.0
            for k, sigma in enumerate(levels):
                x, nxt = traj[:, k], float(fine[at[k + 1]])
                d = s_den(x, torch.full((len(x),), sigma, dtype=torch.float64))
                loss = loss + (d + (nxt / sigma) * (x - d) - traj[:, k + 1]).abs().mean()   # one DDIM step
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            opt.step()
            steps += 1
            losses.append(float(loss.detach()))
    seconds = time.time() - start

    work = Path(a.work)
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(a.teacher, work, ignore=shutil.ignore_patterns("step_*", "samples", "tb"))
    ema = work / "checkpoints" / "last" / "ema.safetensors"
    with safe_open(str(ema), "pt") as fh:
        meta = fh.metadata()
    save_file({k: v.detach().contiguous() for k, v in student.eval().state_dict().items()}, str(ema), metadata=meta)

    scorer = Scorer(argparse.Namespace(data=a.data, data_root=a.data_root, ref_n=None, fid_n=a.fid_n, seed=0,
                                       class_cond=False))
    facts = {"run": work.name, "teacher": str(a.teacher), "levels": levels, "seconds": round(seconds, 1), "steps": steps,
             "trajectory_seconds": round(gen_seconds, 1), "lr": a.lr, "batch": a.batch, "fine": a.fine,
             "pool": a.pool, "epochs": a.epochs, "loss_first20": round(sum(losses[:20]) / max(1, len(losses[:20])), 4),
             "loss_last20": round(sum(losses[-20:]) / max(1, len(losses[-20:])), 4)}
    with open(a.out, "a") as fh:
        for seed in (int(s) for s in a.seeds.split(",") if s):
            row = {**facts, "seed": seed, **scorer.score(work, "ddim", len(levels), seed, levels=tuple(levels))}
            print(json.dumps(row), flush=True)
            fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
