"""Time-to-quality race: FID and judge score against training wall-clock, per recipe, on one machine.

    python benchmarks/quality_race.py --data-root ../shared/data --budgets 2,4,8 --fid-n 2000 --peer-sample-steps 20 \
        --recipes ours-default,diffusers,lucidrains,ours-v-minsnr,ours-edm   # benchmarks/results/quality_race.*: 1h40m, 2 cores
    python benchmarks/quality_race.py --budgets 1,2 --fid-n 500 --recipes ours-default,ours-v-minsnr  # a smoke run
    python benchmarks/quality_race.py --score-only                               # re-score what is on disk
    python benchmarks/quality_race.py --report-only                              # table and plot from the JSON
    python benchmarks/quality_race.py --resample --recipes ours-default          # new default sampler, same weights

Each recipe trains once; when its cumulative *training* wall-clock reaches each budget (minutes), the
worker pauses the clock, draws ``--fid-n`` images with the recipe's own sampler from image seeds
(seed, i) and saves them (``WORK/RECIPE/b<minutes>.npz`` with images seen and steps). Then every
snapshot is scored in the project venv by the same judge: FID against the data's **test split** at
the stated N (TF-Inception features, diffuse.fid) and the held-out classifier's confident fraction
(top-class probability >= 0.9; diffuse.classifier). Output: ``--out`` JSON, a markdown table next to
it (with each of our recipes' time to reach the best peer's final FID), and one plot next to it
(.png: FID against wall-clock minutes and against images seen, one line per recipe).
Ours sample with ``objectives.default_sampling`` (the default of ``diffuse sample``); after that
default changes, ``--resample`` redraws their snapshots from the checkpoints kept at each budget.

Recipes (``--recipes``):
  ours-default     diffuse's preset for the data (mnist: eps, uniform, cosine; dpmpp-2m-sde 20 NFE, eta 5)
  ours-v-minsnr    the same with --objective v --loss-weight min-snr
  ours-v-zsnr      --objective v --zero-terminal-snr (trailing ddim would also do; dpmpp-2m-sde 20 NFE)
  ours-x0          --objective x0
  ours-edm         --formulation edm (heun 35 NFE)
  diffusers        diffusers' train_unconditional.py defaults: UNet2DModel + DDPMScheduler (eps, linear
                   betas, MSE), AdamW lr 1e-4 betas (0.95, 0.999) wd 1e-6, 500 warm-up steps, batch 16,
                   grad clip 1, EMA 0.9999 with warm-up (power 3/4); samples with DDPMPipeline's loop
                   (1000 steps unless --peer-sample-steps)
  lucidrains       denoising-diffusion-pytorch's GaussianDiffusion defaults (objective pred_v, sigmoid
                   schedule, T 1000) and its Trainer's (batch 16, Adam lr 1e-4 betas (0.9, 0.99), grad
                   clip 1, EMA 0.995 every 10 steps); samples with its own sampler (1000 ancestral
                   steps unless --peer-sample-steps, then its DDIM)
Peers run in the benchmark venv (``benchmarks/compare_peers.py --setup`` builds it), models sized to
the preset UNet's parameter count (diffusers: the same widths and blocks; lucidrains: base width
chosen to match). Deviations from the peers' scripts, forced by wall-clock budgets: no cosine LR
decay (its length depends on a step count a time budget does not fix), and no checkpointing.
The data: the preset's (mnist: 60k 28x28 train images via diffuse.data), the same for all recipes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "src"))

OURS = {"ours-default": [], "ours-v-minsnr": ["--objective", "v", "--loss-weight", "min-snr"],
        "ours-v-zsnr": ["--objective", "v", "--zero-terminal-snr"], "ours-x0": ["--objective", "x0"],
        "ours-edm": ["--formulation", "edm"]}
PEERS = ("diffusers", "lucidrains")
CONFIDENCE = 0.9


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="mnist")
    p.add_argument("--data-root", default=None, help="folder holding the data set (e.g. ../shared/data)")
    p.add_argument("--preset", default=None, help="diffuse preset (default: the data's)")
    p.add_argument("--budgets", default="5,10,20", help="cumulative training minutes per snapshot")
    p.add_argument("--recipes", default=",".join([*OURS, *PEERS]))
    p.add_argument("--fid-n", type=int, default=2000, help="images per snapshot (FID and judge)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--peer-sample-steps", type=int, default=None,
                   help="peers' sampling steps (default: their defaults, 1000 ancestral)")
    p.add_argument("--venv", default=str(REPO / ".bench-venv"),
                   help="benchmark venv: every recipe trains in it, ours included, so all share one torch build")
    p.add_argument("--ours-python", default=None, help="train ours with this python instead (e.g. .venv/bin/python)")
    p.add_argument("--work", default=str(REPO / "runs" / "quality-race"))
    p.add_argument("--out", default=str(HERE / "results" / "quality_race.json"))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--score-only", action="store_true", help="score the snapshots on disk (no training)")
    p.add_argument("--report-only", action="store_true", help="rebuild the table and plots from --out's JSON")
    p.add_argument("--resample", action="store_true",
                   help="ours recipes: redraw each snapshot from its kept checkpoint with the current default "
                        "sampler, then score (no training)")
    p.add_argument("--model-from", default=None,
                   help="peers: the UNet widths of this diffuse run instead of the preset's (benchmarks/budget.py)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# Workers: train to each budget, snapshot samples

def _save_snapshot(path: Path, images, meta: dict) -> None:
    import numpy as np
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, images=images.permute(0, 2, 3, 1).numpy(), meta=json.dumps(meta))
    os.replace(tmp, path)


def worker_ours(args, recipe: str, out: Path) -> None:
    import torch

    from diffuse.config import add_config_flags, overrides_from_flags, resolve
    from diffuse.generate import generate, load
    from diffuse.objectives import default_sampling
    from diffuse.train import load_resume_config, train

    flags = argparse.ArgumentParser()
    add_config_flags(flags)
    overrides = overrides_from_flags(flags.parse_args(OURS[recipe]))
    overrides.setdefault("data", {})["name"] = args.data
    if args.data_root:
        overrides["data"]["root"] = args.data_root
    overrides["train"] = {"steps": 10 ** 9, "sample_every": 10 ** 9, "ckpt_every": 10 ** 9, "log_every": 10,
                          "seed": args.seed, "out": str(out / "run")}
    cfg = resolve(args.preset, args.data, None, overrides)
    done, call_seconds = 0.0, 0.0
    for b in map(float, args.budgets.split(",")):
        cfg.train.time_limit = b - done
        t0 = time.perf_counter()
        if done == 0:
            train(cfg, overwrite=True, progress=False)
        else:
            cfg = load_resume_config(out / "run", {"train": {"time_limit": b - done}})
            train(cfg, resume=True, progress=False)
        call_seconds += time.perf_counter() - t0       # with start-up, data loading and the final grid
        done = b
        loaded = load(out / "run", torch.device("cpu"))
        state = json.loads((loaded.source / "state.json").read_text())
        sampler, steps = default_sampling(loaded.config.diffusion)
        images, record = generate(loaded, n=args.fid_n, seed=args.seed, sampler=sampler, steps=steps, batch_size=250)
        _save_snapshot(out / f"b{b:g}.npz", images, {
            "recipe": recipe, "minutes": b, "train_seconds": state.get("train_seconds"),
            "train_call_seconds": round(call_seconds, 1), "step": state["step"],
            "images_seen": state["images_seen"], "sampler": _sampler_label(sampler, record),
            "sample_seconds": record["seconds"], "flags": OURS[recipe]})


def _sampler_label(sampler: str, record: dict) -> str:
    """How ours drew a snapshot, for the table: name, counted NFE and eta where the sampler takes one."""
    eta = record.get("eta")
    return f"{sampler} {record['nfe']} NFE" + (f" eta {eta:g}" if eta is not None else "")


def resample_ours(args, recipe: str, out: Path) -> None:
    """Redraw an ours recipe's snapshots with today's default sampler, from the checkpoints its worker
    kept at each budget (the run keeps the newest 3: enough for 3 budgets). Training is not repeated,
    so a change of sampler is measured on the very same weights."""
    import numpy as np
    import torch

    from diffuse.generate import generate, load
    from diffuse.objectives import default_sampling

    for b in map(float, args.budgets.split(",")):
        path = out / f"b{b:g}.npz"
        if not path.is_file():
            continue
        meta = json.loads(str(np.load(path)["meta"]))
        ckpt = out / "run" / "checkpoints" / f"step_{meta['step']:07d}"
        if not ckpt.is_dir():
            raise SystemExit(f"{recipe}: {ckpt} is gone (the run keeps its newest checkpoints only); race it again")
        loaded = load(ckpt, torch.device("cpu"))
        sampler, steps = default_sampling(loaded.config.diffusion)
        images, record = generate(loaded, n=args.fid_n, seed=args.seed, sampler=sampler, steps=steps, batch_size=250)
        _save_snapshot(path, images, {**meta, "sampler": _sampler_label(sampler, record),
                                      "sample_seconds": record["seconds"]})
        print(f"{recipe} {b:g} min (step {meta['step']}): redrawn with {_sampler_label(sampler, record)}", flush=True)


def worker_peer(args, recipe: str, out: Path) -> None:
    """A peer's default recipe, in the benchmark venv. Data: diffuse.data (uint8 NCHW); the peer
    sees it as its own trainer would ([-1, 1] for diffusers, [0, 1] for lucidrains' auto-normalize)."""
    import torch

    sys.path.insert(0, str(HERE))
    from diffuse.config import Config, resolve
    from diffuse.data import load_dataset
    from diffuse.models import UNet

    cfg = resolve(args.preset, args.data, None, {"data": {"name": args.data}})
    data = load_dataset(args.data, args.data_root, "train")
    m = cfg.model
    if args.model_from:                 # a diffuse run's model (budget.py: the budget plan's sized UNet)
        run_model = Config.from_dict(json.loads((Path(args.model_from) / "config.json").read_text())).model
        for k in ("base_channels", "channel_mult", "num_res_blocks", "dropout", "num_groups", "head_channels",
                  "scale_shift"):
            setattr(m, k, getattr(run_model, k))
        # its attention sits at a feature size of the size it trained at; the peer trains at the data's own
        m.attn_resolutions = tuple(r * data.image_size // run_model.image_size for r in run_model.attn_resolutions)
    m.image_size, m.in_channels = data.image_size, data.channels
    with torch.device("meta"):
        target_params = sum(p.numel() for p in UNet(m).parameters())
    w = dict(channels=data.channels, size=data.image_size, base=m.base_channels, mult=tuple(m.channel_mult),
             res_blocks=m.num_res_blocks, attn=tuple(m.attn_resolutions), dropout=m.dropout, groups=m.num_groups,
             head_channels=m.head_channels, scale_shift=m.scale_shift, schedule="linear")
    gen = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    images_u8 = data.images

    if recipe == "diffusers":
        from diffusers import DDPMScheduler
        from diffusers.training_utils import EMAModel
        from _worker import build_diffusers
        model = build_diffusers(w)
        sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type="epsilon")
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8)
        ema = EMAModel(model.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=0.75)
        batch, warmup = 16, 500

        def step(k):
            for g in opt.param_groups:
                g["lr"] = 1e-4 * min(1.0, (k + 1) / warmup)
            x0 = images_u8[torch.randint(0, len(images_u8), (batch,), generator=gen)].float() / 127.5 - 1
            noise = torch.randn(x0.shape, generator=gen)
            t = torch.randint(0, 1000, (batch,), generator=gen)
            loss = torch.nn.functional.mse_loss(model(sched.add_noise(x0, noise, t), t).sample, noise)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            ema.step(model.parameters())

        def sample(n):
            from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline
            net = build_diffusers(w)
            ema.copy_to(net.parameters())
            if args.peer_sample_steps:        # the fast path diffusers documents: DDIM on the training schedule
                pipe = DDIMPipeline(unet=net.eval(), scheduler=DDIMScheduler.from_config(sched.config))
                how, extra = f"DDIMPipeline {args.peer_sample_steps} steps", {"eta": 0.0}
            else:
                pipe = DDPMPipeline(unet=net.eval(), scheduler=sched)
                how, extra = "DDPMPipeline 1000 steps", {}
            outs = []
            for s in range(0, n, 250):
                k = min(250, n - s)
                res = pipe(batch_size=k, generator=torch.Generator().manual_seed(args.seed + s),
                           num_inference_steps=args.peer_sample_steps or 1000, output_type="np", **extra)
                outs.append(torch.from_numpy((res.images * 255).round().clip(0, 255).astype("uint8")).permute(0, 3, 1, 2))
            return torch.cat(outs), how
    else:
        from denoising_diffusion_pytorch import GaussianDiffusion, Unet
        from ema_pytorch import EMA

        def make(dim):
            return Unet(dim=dim, dim_mults=w["mult"], channels=w["channels"])
        with torch.device("meta"):
            dim = min(range(8, 4 * w["base"] + 1, 4), key=lambda d: abs(sum(p.numel() for p in make(d).parameters())
                                                                       - target_params))
        unet = make(dim)
        steps_s = args.peer_sample_steps or 1000
        diffusion = GaussianDiffusion(unet, image_size=w["size"], timesteps=1000, sampling_timesteps=steps_s)
        opt = torch.optim.Adam(diffusion.parameters(), lr=1e-4, betas=(0.9, 0.99))
        ema = EMA(diffusion, beta=0.995, update_every=10)
        batch = 16

        def step(k):
            x = images_u8[torch.randint(0, len(images_u8), (batch,), generator=gen)].float() / 255
            loss = diffusion(x)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(diffusion.parameters(), 1.0)
            opt.step()
            ema.update()

        def sample(n):
            outs = []
            for s in range(0, n, 250):
                torch.manual_seed(args.seed + s)
                x = ema.ema_model.sample(batch_size=min(250, n - s))
                outs.append((x * 255).round().clamp(0, 255).to(torch.uint8))
            kind = "DDIM" if steps_s < 1000 else "ancestral"
            return torch.cat(outs), f"GaussianDiffusion.sample ({steps_s} {kind} steps)"

    params = sum(p.numel() for p in (model if recipe == "diffusers" else unet).parameters())
    out.mkdir(parents=True, exist_ok=True)
    k, clock = 0, 0.0
    for b in map(float, args.budgets.split(",")):
        t0 = time.perf_counter()
        while clock + (time.perf_counter() - t0) < b * 60:
            step(k)
            k += 1
        clock += time.perf_counter() - t0
        t1 = time.perf_counter()
        torch.save((ema.ema_model if recipe == "lucidrains" else ema).state_dict(), out / f"b{b:g}-ema.pt")
        with torch.no_grad():
            images, how = sample(args.fid_n)
        _save_snapshot(out / f"b{b:g}.npz", images, {
            "recipe": recipe, "minutes": b, "train_seconds": clock, "step": k, "images_seen": k * batch,
            "sampler": how, "sample_seconds": time.perf_counter() - t1, "params": params,
            "params_ours": target_params})


# ----------------------------------------------------------------------------------------------
# Orchestration and scoring (project venv)

def run_worker(args, r: str) -> bool:
    out = Path(args.work) / r
    out.mkdir(parents=True, exist_ok=True)
    py = str(Path(args.venv) / "bin" / "python")
    if r not in PEERS and args.ours_python:
        py = args.ours_python
    if not Path(py).is_file():
        print(f"skip {r}: no python at {py} (python benchmarks/compare_peers.py --setup builds the benchmark venv)",
              file=sys.stderr)
        return False
    cmd = [py, __file__, "--worker", r, *sys.argv[1:]]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    print(f"{r}: training to {args.budgets} minutes", file=sys.stderr, flush=True)
    subprocess.run(cmd, env=env, check=True)
    return True


class Scorer:
    """One judge for every snapshot: FID against the test split (TF-Inception) and the held-out
    classifier's confident fraction. Built on first use (the reference statistics are cached)."""

    def __init__(self, args):
        self.args = args
        self.extractor = self.ref = self.judge = None

    def score(self, recipe: str) -> list[dict]:
        import numpy as np
        import torch

        from diffuse import classifier, fid
        from diffuse.inception import load_extractor

        a = self.args
        if self.extractor is None:
            self.extractor = load_extractor(None, torch.device("cpu"), "tf-bilinear")
            self.ref = fid.reference_stats(a.data, "test", None, data_root=a.data_root, extractor=self.extractor,
                                           progress=False)
        rows = []
        for b in map(float, a.budgets.split(",")):
            path = Path(a.work) / recipe / f"b{b:g}.npz"
            if not path.is_file():
                continue
            z = np.load(path)
            images = torch.from_numpy(z["images"]).permute(0, 3, 1, 2).contiguous()
            meta = json.loads(str(z["meta"]))
            if self.judge is None:
                self.judge = classifier.load_or_train(a.data, a.data_root, images.shape[-1], images.shape[1])
            res = fid.compare(fid.stats_of_images(images, self.extractor), self.ref)
            rows.append({**meta, "n": len(images), "fid": round(res["fid"], 3),
                         "confident": round(classifier.confident_fraction(self.judge, images, CONFIDENCE), 4)})
            print(json.dumps(rows[-1]), flush=True)
        return rows


def merged(args, out: Path, recipe: str, rows: list[dict]) -> dict:
    """The report on disk with ``recipe``'s rows replaced: recipes can be raced in several calls."""
    import torch

    from diffuse.device import cpu_model

    try:
        old = json.loads(out.read_text())
        keep = [r for r in old["rows"] if r["recipe"] != recipe] if old.get("fid_n") == args.fid_n else []
    except (OSError, ValueError, KeyError):
        keep = []
    return {"data": args.data, "fid_reference": f"{args.data} test split", "fid_n": args.fid_n, "seed": args.seed,
            "confidence_threshold": CONFIDENCE, "cpu": cpu_model(), "cores": os.cpu_count(),
            "threads": args.threads or torch.get_num_threads(), "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "rows": keep + rows}


def minutes_to_reach(points: list[tuple[float, float]], target: float) -> tuple[str, float]:
    """(bound, minutes) at which a recipe's FID-vs-minutes curve first reaches ``target``: "~" by
    log-log interpolation between the snapshots around it, "<=" the first snapshot's minutes if
    that is already at or below the target, ">" the last one's if none reaches it."""
    import math

    pts = sorted(points)
    if pts[0][1] <= target:
        return "<=", pts[0][0]
    for (t0, f0), (t1, f1) in zip(pts, pts[1:]):
        if f1 <= target:
            a = (math.log(target) - math.log(f0)) / (math.log(f1) - math.log(f0))
            return "~", math.exp(math.log(t0) + a * (math.log(t1) - math.log(t0)))
    return ">", pts[-1][0]


def time_ratios(rows: list[dict]) -> list[dict]:
    """Each of our recipes against the best peer: the FID that peer reached at its last budget, and
    how long each recipe took to reach it, as a fraction of the peer's time."""
    peers = {r["recipe"] for r in rows if r["recipe"] in PEERS}
    if not peers:
        return []
    last = {p: max((r for r in rows if r["recipe"] == p), key=lambda r: r["minutes"]) for p in peers}
    best = min(last.values(), key=lambda r: r["fid"])
    out = []
    for recipe in dict.fromkeys(r["recipe"] for r in rows):
        if recipe in PEERS:
            continue
        bound, minutes = minutes_to_reach([(r["minutes"], r["fid"]) for r in rows if r["recipe"] == recipe], best["fid"])
        out.append({"recipe": recipe, "peer": best["recipe"], "target_fid": best["fid"], "peer_minutes": best["minutes"],
                    "bound": bound, "minutes": minutes, "ratio": minutes / best["minutes"]})
    return out


def report(result: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    lines = [f"FID (N={result['fid_n']}, vs {result['fid_reference']}) and judge-confident fraction; {result['cpu']} "
             f"({result['cores']} cores), {result['threads']} threads, {result['when']}", "",
             "| recipe | budget (min) | images seen | steps | sampler | FID | confident |", "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['recipe']} | {r['minutes']:g} | {r['images_seen']:,} | {r['step']:,} | {r['sampler']} | "
                     f"{r['fid']:.2f} | {r['confident']:.3f} |")
    ratios = time_ratios(result["rows"])
    if ratios:
        lines += ["", f"Time to reach the best peer's final FID ({ratios[0]['target_fid']:.2f}, {ratios[0]['peer']} at "
                  f"{ratios[0]['peer_minutes']:g} min), wall-clock ratio to that peer (log-log interpolation between "
                  "snapshots; <= where the first snapshot is already better, > where no snapshot reached it):", "",
                  "| recipe | minutes to reach it | ratio to the peer |", "|---|---|---|"]
        for q in ratios:
            lines.append(f"| {q['recipe']} | {q['bound']} {q['minutes']:.2f} | {q['bound']} {q['ratio']:.2f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110, sharey=True)
    recipes = list(dict.fromkeys(r["recipe"] for r in result["rows"]))
    for ax, key, label in zip(axes, ("minutes", "images_seen"), ("training wall-clock (minutes)", "training images seen")):
        for recipe in recipes:
            pts = sorted((r[key], r["fid"]) for r in result["rows"] if r["recipe"] == recipe)
            ax.plot(*zip(*pts), marker="o", label=recipe, linestyle="--" if recipe in PEERS else "-")
        ax.set_xlabel(label)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
        if key == "minutes":                       # the budgets themselves as plain tick labels
            ax.set_xticks(sorted({r["minutes"] for r in result["rows"]}), minor=False)
            ax.set_xticks([], minor=True)
            ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    axes[0].set_ylabel(f"FID (N={result['fid_n']}, vs {result['fid_reference']})")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{result['data']}: FID against training time and images; {result['cpu']}, {result['cores']} cores, "
                 f"{result['threads']} threads", fontsize=10)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"))
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    recipes = [r for r in args.recipes.split(",") if r]
    unknown = [r for r in recipes if r not in OURS and r not in PEERS]
    if unknown:
        raise SystemExit(f"unknown recipe(s) {', '.join(unknown)}; choose from {', '.join([*OURS, *PEERS])}")
    if args.worker:
        out = Path(args.work) / args.worker
        (worker_peer if args.worker in PEERS else worker_ours)(args, args.worker, out)
        return 0
    scorer, out = Scorer(args), Path(args.out)
    if args.report_only:
        report(json.loads(out.read_text()), out)
        print(out.with_suffix(".md").read_text())
        return 0
    for r in recipes:                       # scored as each finishes: partial results are on disk early
        if args.resample:
            if r not in OURS:
                continue                    # the peers sample with their own library's sampler
            resample_ours(args, r, Path(args.work) / r)
        elif not args.score_only and not run_worker(args, r):
            continue
        report(merged(args, out, r, scorer.score(r)), out)
    print(out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
