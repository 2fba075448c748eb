"""Time budgets: FID after B minutes of training, per recipe, on this machine.

    python benchmarks/budget.py --data mnist --data-root ../shared/data --budgets 2,8 --fid-n 2000 \
        --recipes budget,budget-preset,cut --out benchmarks/results/budget-mnist.json
    python benchmarks/budget.py --data EMOJI_DIR --class-cond --budgets 15 --fid-n 500 --ref-n 2000 \
        --recipes budget,cut --out benchmarks/results/budget-emoji.json      # benchmarks/emoji_set.py builds it
    python benchmarks/budget.py --report-only --out benchmarks/results/budget-mnist.json
    python benchmarks/budget.py --report-only --out benchmarks/results/budget-emoji-minutes-zen4.json \
        --line "goal=40" --line "the set's own images=31.5"    # dashed lines, kept in the JSON
    python benchmarks/budget.py --panels benchmarks/results/budget-mnist-intel.json \
        benchmarks/results/budget-digits-intel.json --out benchmarks/results/budget-intel.png   # one figure

Recipes (``--recipes``), each a fresh ``diffuse train`` per budget B:
  budget          ``--time-limit B`` alone: diffuse's budget plan (model sized for B on this machine,
                  learning rate and power EMA that end with B; docs/budgets.md)
  budget-full-size  the budget plan at the images' own size (``--no-half-size``): what training a
                  folder above 32 px at half its size changes
  budget-patch    the budget plan at the images' own size seen as 2x2 patches (``--no-half-size
                  --patch-size 2``; the UNet's levels run at half the size) on a schedule whose SNR is
                  shifted by (32/size)^2 (``--snr-shift``): the other way to spend 32 px of compute on
                  a folder above 32 px (Hoogeboom et al. 2023)
  budget-preset   the same schedules on the data's preset model (``--preset P --size-model`` off): what
                  the schedules give without the sizing
  cut             today's default before budgets, cut by time: the preset's model and step count with
                  ``--steps S --time-limit B`` (constant learning rate, fixed EMA decay, stopped at B)
  guess           a knowledgeable user's hand-picked small model for a folder above 32 px: the mnist
                  preset's UNet at 32 px, written upscaled at the folder's size, with the budget's
                  schedules (``--preset mnist --image-size 32 --output-size S --time-limit B``)
  diffusers       the peer's recipe at the budget plan's parameter count: diffusers' train_unconditional
                  defaults (quality_race.py's diffusers worker: batch 16, AdamW 1e-4, 500 warm-up steps,
                  EMA 0.9999 with warm-up) on the UNet widths the ``budget`` recipe chose for B (run
                  ``budget`` first, in this call or an earlier one), for B minutes at the data's own
                  size, unconditional (train_unconditional has no labels); sampled with the fast path
                  diffusers documents (DDIMPipeline, 20 steps), scored by the same judge

Scoring, the same for every run: ``--fid-n`` images from the final EMA with the run's default sampler
(``diffuse sample``'s), image i from seed stream (--seed, i); FID against the data's test split (standard
sets) or ``--ref-n`` images of the folder itself; for class-conditional runs the images cycle through
the classes with the run's guidance; where a judge classifier exists (standard sets), its confident
fraction. Training runs one at a time, each with the whole machine; the JSON records the CPU (model
and family) and thread count, and a plot of FID against the budget per recipe is written next to it.
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

RECIPES = ("budget", "budget-full-size", "budget-patch", "budget-preset", "cut", "guess", "diffusers")
PEER_SAMPLE_STEPS = 20


def reference_line(text: str) -> tuple[str, float]:
    """``LABEL=FID`` of --line, split at the last '=' (a label may contain one)."""
    label, sep, value = text.rpartition("=")
    try:
        fid = float(value)
    except ValueError:
        fid = None
    if not sep or not label.strip() or fid is None:
        raise argparse.ArgumentTypeError(f"expected LABEL=FID, e.g. 'goal=40', got {text!r}")
    return label.strip(), fid


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="mnist")
    p.add_argument("--data-root", default=None)
    p.add_argument("--class-cond", action="store_true")
    p.add_argument("--budgets", default="2,8", help="minutes, comma-separated")
    p.add_argument("--recipes", default="budget,budget-preset,cut")
    p.add_argument("--fid-n", type=int, default=2000)
    p.add_argument("--ref-n", type=int, default=None, help="reference images for a folder (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default="runs/budget-bench")
    p.add_argument("--out", default="benchmarks/results/budget.json")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--panels", nargs="+", metavar="JSON", default=None,
                   help="only plot: one panel per result file (a data set each), FID against minutes per "
                        "recipe, into --out (a .png)")
    p.add_argument("--score-only", action="store_true", help="score the runs already in --work")
    p.add_argument("--peer-python", default=sys.executable,
                   help="python with diffusers for the diffusers recipe (default: this one)")
    p.add_argument("--weights", default="ema", choices=("ema", "model"),
                   help="score the run's EMA (default) or its raw weights (is the EMA helping?)")
    p.add_argument("--line", action="append", type=reference_line, default=[], metavar="LABEL=FID",
                   help="a dashed horizontal line on the plot (a goal, a floor such as the data's own FID), "
                        "kept in the JSON so later reports draw it too; repeatable")
    return p.parse_args(argv)


def cpu_description() -> str:
    """The CPU's model (device.cpu_model) with its family from /proc/cpuinfo (figures differ
    between families of one model name) and the core count."""
    from diffuse.device import cpu_model

    try:
        family = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                       if line.startswith("cpu family")), "?")
    except OSError:
        family = "?"
    return f"{cpu_model()}, family {family}, {os.cpu_count()} cores"


def train_flags(args, recipe: str, minutes: float, out: Path) -> list[str]:
    from diffuse.config import PRESETS, default_preset_for
    from diffuse.imagefiles import STANDARD, peek_folder

    size = channels = None
    if args.data not in STANDARD:
        shape = peek_folder(Path(args.data))
        size, channels = shape.default_size, shape.channels
    preset = default_preset_for(args.data, size, channels)
    flags = ["--data", args.data, "--out", str(out), "--overwrite", "--seed", str(args.seed), "--log-every", "50"]
    if args.data_root:
        flags += ["--data-root", args.data_root]
    if args.class_cond:
        flags += ["--class-cond"]
    if recipe == "budget":
        return flags + ["--time-limit", f"{minutes:g}"]
    if recipe == "budget-full-size":
        return flags + ["--time-limit", f"{minutes:g}", "--no-half-size"]
    if recipe == "budget-patch":
        if size is None or size <= 32:
            raise SystemExit("the budget-patch recipe is for a folder of images above 32 px")
        return flags + ["--time-limit", f"{minutes:g}", "--no-half-size", "--patch-size", "2",
                        "--snr-shift", f"{(32 / size) ** 2:g}"]
    if recipe == "budget-preset":
        return flags + ["--time-limit", f"{minutes:g}", "--preset", preset]
    if recipe == "cut":
        return flags + ["--preset", preset, "--steps", str(PRESETS[preset]["train"]["steps"]),
                        "--time-limit", f"{minutes:g}"]
    if recipe == "guess":
        if size is None or size <= 32:
            raise SystemExit("the guess recipe is for a folder of images above 32 px")
        return flags + ["--preset", "mnist", "--image-size", "32", "--output-size", str(size),
                        "--time-limit", f"{minutes:g}"]
    raise SystemExit(f"unknown recipe {recipe!r}; choose from {', '.join(RECIPES)}")


def peer_command(args, minutes: float, out: Path) -> list[str]:
    """quality_race.py's diffusers worker, on the widths of this budget's ``budget`` run; it writes
    ``out/diffusers/b{minutes}.npz`` (images and what it trained)."""
    plan = Path(args.work) / f"budget-{minutes:g}"
    if not (plan / "config.json").is_file():
        raise SystemExit(f"the diffusers recipe takes its model from {plan}: run the budget recipe for "
                         f"{minutes:g} min first (--recipes budget,diffusers)")
    cmd = [args.peer_python, str(HERE / "quality_race.py"), "--worker", "diffusers", "--data", args.data,
           "--budgets", f"{minutes:g}", "--fid-n", str(args.fid_n), "--seed", str(args.seed),
           "--peer-sample-steps", str(PEER_SAMPLE_STEPS), "--model-from", str(plan), "--work", str(out)]
    return cmd + (["--data-root", args.data_root] if args.data_root else [])


def run_train(args, recipe: str, minutes: float, out: Path) -> float:
    if recipe == "diffusers":
        cmd, shown = peer_command(args, minutes, out), 1
    else:
        cmd, shown = [sys.executable, "-m", "diffuse", "train", *train_flags(args, recipe, minutes, out)], 3
    print(f"{recipe} {minutes:g} min: {' '.join(cmd[shown:])}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, env={**os.environ, "PYTHONPATH": str(REPO / "src")}, check=True,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


class Scorer:
    """FID (and the judge where one exists) of a run's final EMA, all runs against one reference."""

    def __init__(self, args):
        self.args, self.extractor, self.ref, self.judge = args, None, None, None

    def reference(self, image_size: int, channels: int):
        """The data's statistics at ``image_size`` (the first caller's size: every run of one call is
        written at the data's own size, so the first is every one's)."""
        import torch

        from diffuse import fid
        from diffuse.imagefiles import STANDARD
        from diffuse.inception import load_extractor

        if self.extractor is None:
            a = self.args
            self.extractor = load_extractor(None, torch.device("cpu"), "tf-bilinear")
            split = "test" if a.data in STANDARD else "train"
            self.ref = fid.reference_stats(a.data, split, a.ref_n, data_root=a.data_root, extractor=self.extractor,
                                           image_size=image_size, channels=channels, progress=False)
        return self.ref

    def score_images(self, images) -> dict:
        """FID (and the judge) of uint8 images [N, C, H, W] at the data's own size."""
        from diffuse import classifier, fid
        from diffuse.imagefiles import STANDARD

        a = self.args
        ref = self.reference(images.shape[-1], images.shape[1])
        res = fid.compare(fid.stats_of_images(images, self.extractor), ref)
        row = {"fid": round(res["fid"], 3), "n": len(images), "n_ref": res.get("n_ref")}
        if a.data in STANDARD:
            if self.judge is None:
                self.judge = classifier.load_or_train(a.data, a.data_root, images.shape[-1], images.shape[1])
            row["confident"] = round(classifier.confident_fraction(self.judge, images, 0.9), 4)
        return row

    def score_snapshot(self, path: Path) -> dict:
        """A peer worker's snapshot (quality_race.py's npz: images NHWC and what it trained), scored."""
        import numpy as np
        import torch

        z = np.load(path)
        meta = json.loads(str(z["meta"]))
        row = self.score_images(torch.from_numpy(z["images"]).permute(0, 3, 1, 2).contiguous())
        return {"params_m": round(meta["params"] / 1e6, 3), "batch": meta["images_seen"] // max(meta["step"], 1),
                "steps": meta["step"], "images_seen": meta["images_seen"],
                "train_seconds": round(meta["train_seconds"], 1), **row, "sampler": meta["sampler"],
                "sample_seconds": round(meta["sample_seconds"], 1)}

    def score(self, run: Path, sampler: str | None = None, steps: int | None = None, seed: int | None = None,
              levels: tuple[float, ...] | None = None) -> dict:
        """FID (and the judge) of ``--fid-n`` images of ``run``: with ``sampler`` and ``steps``, or
        the run's own default (``diffuse sample``'s, SamplingSpec.resolved); seed stream ``seed``
        (default --seed); ``levels``: the noise levels of the calls (float sigmas [steps]; the final
        0 is added) instead of the sampler's spacing."""
        import torch

        from diffuse.generate import generate, labels_and_guidance, load
        from diffuse.sampling import SamplingSpec

        a = self.args
        loaded = load(run, torch.device("cpu"), weights=getattr(a, "weights", "ema"))
        labels, guidance = labels_and_guidance(loaded, "all" if a.class_cond else None, None, a.fid_n)
        own = SamplingSpec(sampler, steps, seed=a.seed if seed is None else seed, guidance=guidance,
                           levels=None if levels is None else (*levels, 0.0)).resolved(loaded.config)
        images, record = generate(loaded, n=a.fid_n, spec=own, batch_size=250, labels=labels)
        return {**self.score_images(images), "sampler": f"{record['sampler']} {record['nfe']} NFE",
                "sample_seconds": round(record["seconds"], 1)}


def images_per_param_bounds(rows: list[dict], size_exponent: float = 0.0,
                            tolerance: float = 0.0) -> tuple[float, float]:
    """The values of t under which a rule "a rung of p parameters qualifies when it sees at least
    t * (p / 1M) ** size_exponent images per parameter" picks, at every budget measured, a rung that
    scored best there: (lo, hi], lo exclusive (size_exponent 0: one threshold for every size;
    sizing's rule is t = IMAGES_PER_PARAM_AT_1M, size_exponent = SIZE_EXPONENT). ``rows``: {minutes,
    params, images_seen, fid}, several rungs per budget. A rung whose FID is within ``tolerance``
    (relative) of the budget's best counts as best too (one seed per cell cannot order closer ones).
    The rule keeps the largest rung that qualifies, so the smallest best rung must qualify (hi: the
    least of its t-scaled ratios over budgets) and the rung above the largest best must not (lo: the
    greatest). lo >= hi: no t fits them all."""
    lo, hi = 0.0, float("inf")
    for minutes in sorted({r["minutes"] for r in rows}):
        rungs = sorted((r for r in rows if r["minutes"] == minutes), key=lambda r: r["params"])
        scaled = [r["images_seen"] / r["params"] / (r["params"] / 1e6) ** size_exponent for r in rungs]
        least = min(r["fid"] for r in rungs)
        best = [i for i, r in enumerate(rungs) if r["fid"] <= least * (1 + tolerance)]
        hi = min(hi, scaled[best[0]])
        if best[-1] + 1 < len(rungs):
            lo = max(lo, scaled[best[-1] + 1])
    return lo, hi


def run_facts(run: Path) -> dict:
    cfg = json.loads((run / "config.json").read_text())
    state = json.loads((run / "checkpoints" / "last" / "state.json").read_text())
    head = (run / "train.log").read_text().splitlines()
    return {"params_m": _params(head[0]),
            "model": {k: cfg["model"][k] for k in ("base_channels", "channel_mult", "num_res_blocks",
                                                   "attn_resolutions")},
            "image_size": cfg["model"]["image_size"], "output_size": cfg["train"].get("output_size"),
            "batch": cfg["train"]["batch_size"],
            "steps": state["step"], "images_seen": state["images_seen"],
            "train_seconds": round(state.get("train_seconds", 0.0), 1),
            "plan": [line for line in head if line.startswith("plan: ")]}


def _params(header: str) -> float:
    field = next(w for w in header.split(" | ") if w.endswith("M params"))
    return float(field.split("M")[0])


def report(result: dict, out: Path) -> list[tuple[str, list[float]]]:
    """OUT.png: FID against minutes per recipe, and the JSON's ``lines`` (--line) dashed across it.
    Returns each line on the plot as (legend label, its FID values), read back from the axes."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    drawn = recipe_lines(ax, result, result["recipes"], lambda recipe: {"label": recipe})
    for i, (label, fid) in enumerate(result.get("lines", {}).items()):
        ax.axhline(fid, ls="--", lw=0.9, color=f"C{len(drawn) + i}", label=f"{label}: {fid:g}")
    on_plot = [(line.get_label(), [float(y) for y in line.get_ydata()]) for line in ax.get_lines()]
    save_log_log(fig, ax, out, f"{Path(result['data']).name}: FID at a time budget ({result['cpu']})",
                 ticks=lambda: plain_ticks(ax, result))
    return on_plot


def recipe_lines(ax, result: dict, recipes, style) -> dict[str, list[tuple[float, float]]]:
    """FID against the budget (minutes) of each recipe's EMA rows in ``result``, one line per recipe
    on ``ax`` (``style(recipe)``: its plot keywords), and the axis labels; returns the lines drawn."""
    drawn = {}
    for recipe in recipes:
        rows = sorted((r for r in result["rows"] if r["recipe"] == recipe and r.get("weights", "ema") == "ema"),
                      key=lambda r: r["minutes"])
        if rows:
            drawn[recipe] = [(r["minutes"], r["fid"]) for r in rows]
            ax.plot(*zip(*drawn[recipe]), marker="o", **style(recipe))
    ax.set_xlabel("training budget (minutes, wall-clock)")
    ax.set_ylabel(f"FID (N = {result['fid_n']:,})")
    return drawn


RECIPE_LABELS = {"budget": "budget plan (--time-limit B)", "cut": "preset cut by time (before budgets)",
                 "diffusers": "diffusers' recipe, same UNet", "budget-full-size": "budget plan at full size",
                 "budget-preset": "budget schedules on the preset", "guess": "hand-picked small model"}


def plain_ticks(ax, result: dict) -> None:
    """Log axes labelled in plain numbers: the budgets measured on x, 20, 30, 40, 50, 100, ... on y."""
    import matplotlib.ticker

    minutes = sorted({r["minutes"] for r in result["rows"]})
    ax.set_xticks(minutes, [f"{m:g}" for m in minutes])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.yaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}" if str(v)[0] in "2345" else ""))


def panels(results: list[dict], out: Path) -> list[dict[str, list[tuple[float, float]]]]:
    """One figure, one panel per result (a data set): FID against the budget per recipe, log-log,
    one colour per recipe across panels. Returns each panel's lines ({recipe: [(minutes, fid)]})."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4), dpi=120, squeeze=False)
    drawn = []
    for ax, result in zip(axes[0], results):
        drawn.append(recipe_lines(ax, result, RECIPES, lambda recipe: {
            "color": f"C{RECIPES.index(recipe)}", "label": RECIPE_LABELS.get(recipe, recipe)}))
        log_log_axes(ax, f"{Path(result['data']).name} ({result['cpu']})", 7)
        plain_ticks(ax, result)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return drawn


def log_log_axes(ax, title: str, legend_size: float | None = None) -> None:
    """Log axes, grid, legend and a small title on one plot (save_log_log's, and each of panels')."""
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=legend_size)
    ax.set_title(title, fontsize=8)


def save_log_log(fig, ax, out: Path, title: str, legend_size: float | None = None, ticks=None) -> None:
    """Log axes, grid, legend and a small title, then the plot as OUT.png (budget.py and distill.py).
    ``ticks()``, if given, labels the axes after the log scale is set (setting it resets them)."""
    import matplotlib.pyplot as plt

    log_log_axes(ax, title, legend_size)
    if ticks is not None:
        ticks()
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"))
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    if args.panels:
        panels([json.loads(Path(f).read_text()) for f in args.panels], out)
        return 0
    result = json.loads(out.read_text()) if out.is_file() else {"rows": []}
    if args.line:
        result["lines"] = {**result.get("lines", {}), **dict(args.line)}
        if args.report_only:
            out.write_text(json.dumps(result, indent=2) + "\n")
    if not args.report_only:
        recipes = args.recipes.split(",")
        result.update(data=args.data, fid_n=args.fid_n, ref_n=args.ref_n, seed=args.seed, cpu=cpu_description(),
                      threads=os.cpu_count(), recipes=sorted(set(result.get("recipes", [])) | set(recipes)))
        scorer = Scorer(args)
        for minutes in map(float, args.budgets.split(",")):
            for recipe in recipes:
                run = Path(args.work) / f"{recipe}-{minutes:g}"
                call_s = None if args.score_only else run_train(args, recipe, minutes, run)
                if recipe == "diffusers":
                    facts = scorer.score_snapshot(run / "diffusers" / f"b{minutes:g}.npz")
                else:
                    facts = {**run_facts(run), **scorer.score(run)}
                row = {"recipe": recipe, "minutes": minutes, "weights": args.weights, **facts,
                       "train_call_seconds": round(call_s, 1) if call_s else None}
                same = (recipe, minutes, args.weights)
                result["rows"] = [r for r in result["rows"] if (r["recipe"], r["minutes"], r.get("weights", "ema")) != same]
                result["rows"].append(row)
                print(json.dumps(row), flush=True)
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(result, indent=2) + "\n")
    report(result, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
