"""diffuse vs diffusers vs lucidrains' denoising-diffusion-pytorch on the same UNets, same torch.

    python benchmarks/compare_peers.py --setup            # build .bench-venv/ (once)
    python benchmarks/compare_peers.py                    # measure; writes benchmarks/results/peers-cpu.{json,md}
    python benchmarks/compare_peers.py --repeats 2 --quick
    python benchmarks/compare_peers.py --device cuda --update-readme

Every implementation runs under the one benchmark venv (one torch build), each measurement in a
fresh process (benchmarks/_worker.py), implementations interleaved A B C A B C ... within each
(workload, mode, setting) cell; warm-up is discarded, and each cell reports the median, min and
max over --repeats processes. This script itself needs only the standard library.

Implementations (see _worker.py for exactly what each step does):
  ours           diffuse.train.TrainStep (noise, forward, MSE, backward, clip, AdamW, EMA);
                 sampling via diffuse.generate.generate (DDIM, trailing spacing)
  ours-bare      the same TrainStep with clipping off and no EMA update (like-for-like with peers)
  diffusers      UNet2DModel + DDPMScheduler.add_noise; sampling: DDIMScheduler loop
  lucidrains     Unet + GaussianDiffusion(objective=pred_noise) at the workload's widths;
                 sampling: GaussianDiffusion.ddim_sample with sampling_timesteps = steps
  lucidrains-pm  the same with its base width chosen to match ours' parameter count
Peers use AdamW with foreach=True on CPU (faster than torch's CPU default, which their own trainers
get) and fused on CUDA; ours uses the trainer's fused AdamW. All get the same batch and the same
autocast/channels_last setting, and random [-1, 1] images already on the device.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from _worker import WORKLOADS  # noqa: E402  (pure data; the worker imports torch lazily)

# The peer versions this comparison was set up with; --setup installs exactly these.
PINS = {"torch": "2.14.1", "torchvision": "0.29.1", "diffusers": "0.42.1",
        "denoising-diffusion-pytorch": "2.3.4"}
# What diffuse itself needs in the benchmark venv (installed with --no-deps; quality_race.py trains ours there).
OURS_RUNTIME = ["numpy", "pillow", "safetensors", "tqdm", "matplotlib", "scikit-learn", "tensorboard", "scipy"]

SETTINGS = {"fp32": ("fp32", False), "fp32-cl": ("fp32", True), "bf16": ("bf16", False), "bf16-cl": ("bf16", True)}
DEFAULT_IMPLS = ("ours", "ours-bare", "diffusers", "lucidrains", "lucidrains-pm")
LABELS = {"ours": "ours (TrainStep: +clip +EMA)", "ours-bare": "ours, no clip/EMA", "diffusers": "diffusers",
          "lucidrains": "lucidrains (same widths)", "lucidrains-pm": "lucidrains (param-matched)"}
MARK_START, MARK_END = "<!-- peers:start -->", "<!-- peers:end -->"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--setup", action="store_true", help="create/update the benchmark venv, then exit")
    p.add_argument("--venv", default=str(REPO / ".bench-venv"), help="benchmark venv (default .bench-venv/)")
    p.add_argument("--ours-venv", default=None,
                   help="also time ours under this venv (e.g. .venv, the project's torch) as extra rows")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--threads", type=int, default=None, help="torch threads in every worker (default: all usable cores)")
    p.add_argument("--workloads", default=",".join(WORKLOADS))
    p.add_argument("--impls", default=",".join(DEFAULT_IMPLS))
    p.add_argument("--modes", default="train,sample")
    p.add_argument("--settings", default="fp32,bf16-cl", help=f"from {', '.join(SETTINGS)} (cl = channels_last)")
    p.add_argument("--repeats", type=int, default=5, help="fresh processes per cell (median, min, max over them)")
    p.add_argument("--sample-steps", type=int, default=50)
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 1 warm-up + 2 timed train steps, 5-step sampling of 4 (cifar) / 16 (mnist) images")
    p.add_argument("--cudnn-benchmark", action="store_true", help="CUDA: cudnn.benchmark on in every worker")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per worker process")
    p.add_argument("--out", default=None, help="JSON (default benchmarks/results/peers-<device>.json)")
    p.add_argument("--md", default=None, help="markdown (default: --out with .md)")
    p.add_argument("--update-readme", action="store_true", help="splice the table into docs/speed.md (or --readme FILE) between markers")
    p.add_argument("--readme", default=str(REPO / "docs" / "speed.md"), help="the page --update-readme edits")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# The benchmark venv

def venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def setup(venv: Path) -> None:
    """Create the venv and install the pinned peers, then diffuse itself (editable, no deps)."""
    py = venv_python(venv)
    if not py.exists():
        print(f"creating {venv}", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", "--upgrade", "pip"], check=True)

    def pip(*pkgs: str) -> None:
        print("pip install " + " ".join(pkgs), flush=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", *pkgs], check=True)

    pip(f"torch=={PINS['torch']}", f"torchvision=={PINS['torchvision']}")
    pip(f"diffusers=={PINS['diffusers']}", f"denoising-diffusion-pytorch=={PINS['denoising-diffusion-pytorch']}")
    pip(*OURS_RUNTIME)
    pip("--no-deps", "-e", str(REPO))
    info = run_worker(py, ["--mode", "env"], threads=None, timeout=600)
    print("benchmark venv ready: " + json.dumps(info.get("versions", info)), flush=True)


# ----------------------------------------------------------------------------------------------
# Running workers

def run_worker(python: Path, args: list[str], threads: int | None, timeout: float) -> dict:
    """One fresh worker process; its RESULT line as a dict, or {"error": ...}."""
    env = dict(os.environ, TQDM_DISABLE="1", PYTHONUNBUFFERED="1")
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        args = [*args, "--threads", str(threads)]
    cmd = [str(python), str(HERE / "_worker.py"), *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s", "cmd": " ".join(args)}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"error": f"exit {proc.returncode}: " + " | ".join(tail), "cmd": " ".join(args)}


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def git_state() -> dict:
    def git(*a: str) -> str:
        try:
            return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return ""
    return {"commit": git("rev-parse", "HEAD"), "branch": git("rev-parse", "--abbrev-ref", "HEAD"),
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# ----------------------------------------------------------------------------------------------
# Measurement plan

def plan_args(a: argparse.Namespace, workload: str, mode: str, setting: str, impl: str) -> list[str]:
    precision, cl = SETTINGS[setting]
    args = ["--impl", impl, "--workload", workload, "--mode", mode, "--device", a.device, "--precision", precision,
            "--sample-steps", str(a.sample_steps)]
    if cl:
        args.append("--channels-last")
    if a.cudnn_benchmark:
        args.append("--cudnn-benchmark")
    if a.quick:
        args += ["--warmup", "1", "--steps", "2"]
        if mode == "sample":
            args += ["--batch", "4" if WORKLOADS[workload]["channels"] == 3 else "16"]
    return args


def summarise(samples: list[dict]) -> dict:
    ok = [s for s in samples if "error" not in s]
    out: dict = {"n": len(ok), "errors": [s["error"] for s in samples if "error" in s]}
    if ok:
        rates = [s["img_per_s"] for s in ok]
        out.update(img_per_s=statistics.median(rates), img_per_s_min=min(rates), img_per_s_max=max(rates),
                   img_per_s_all=rates, batch=ok[0]["batch"], params=ok[0].get("params"))
        for k in ("steps_per_window", "sample_steps", "lucidrains_dim", "max_memory_gib"):
            if k in ok[0]:
                out[k] = ok[0][k] if k != "max_memory_gib" else max(s[k] for s in ok)
    return out


def mfu(row: dict, flops: dict, peaks: dict, device: str) -> float | None:
    """Model FLOPs per second / measured matmul peak. Model FLOPs: 3 x forward for a training step
    (the usual convention; counted forward+backward is recorded too), forward x steps for sampling.
    CPU rows are held against the peak of their own precision; CUDA rows against the bf16 peak."""
    if "img_per_s" not in row or not flops.get("flops_fwd_per_img"):
        return None
    per_img = 3 * flops["flops_fwd_per_img"] if row["mode"] == "train" else flops["flops_fwd_per_img"] * row["sample_steps"]
    key = "peak_bf16_flops" if device.startswith("cuda") or row["precision"] == "bf16" else "peak_fp32_flops"
    return per_img * row["img_per_s"] / peaks[key] if peaks.get(key) else None


# ----------------------------------------------------------------------------------------------
# Reporting

def fmt_rate(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.3g}" if x < 100 else f"{x:.0f}"


def best_rows(rows: list[dict]) -> dict:
    """(workload, mode, impl) -> the row of its fastest setting (by median)."""
    best: dict = {}
    for r in rows:
        if "img_per_s" not in r:
            continue
        key = (r["workload"], r["mode"], r["impl"])
        if key not in best or r["img_per_s"] > best[key]["img_per_s"]:
            best[key] = r
    return best


def markdown(result: dict) -> str:
    rows, flops, env = result["rows"], result["flops"], result["env"]
    v = env.get("versions", {})
    best = best_rows(rows)
    lines = [f"Measured {result['date']} on {env.get('device_name')} ({result['device']}, {result['threads']} threads"
             f"{', AMX' if env.get('amx') and not result['device'].startswith('cuda') else ''}), torch {v.get('torch')}, "
             f"diffusers {v.get('diffusers')}, denoising-diffusion-pytorch {v.get('denoising-diffusion-pytorch')}, "
             f"diffuse {result['git'].get('commit', '')[:7]}{' (dirty)' if result['git'].get('dirty') else ''}. "
             f"Median of {result['repeats']} fresh processes per cell, implementations interleaved; img/s for the "
             f"fastest setting of each ({', '.join(result['settings'])}; cl = channels_last). "
             f"MFU = model FLOPs/s over the measured matmul peak "
             f"({', '.join(f'{k[5:-6]} {v_ / 1e12:.2f} TFLOP/s' for k, v_ in result['peaks'].items() if k.startswith('peak_'))})."]
    if result["quick"]:
        lines.append("")
        lines.append(f"**Quick smoke run (--quick): 2-step train windows, {result['sample_steps_used']}-step sampling on "
                     f"small batches; load average {result['loadavg_start']} -> {result['loadavg_end']}. Not a "
                     f"measurement to quote.**")
    impls = [i for i in result["impls"]]
    for w in result["workloads"]:
        spec = WORKLOADS[w]
        lines += ["", f"**{w}** ({spec['channels']}x{spec['size']}x{spec['size']}, base {spec['base']}, "
                      f"mult {','.join(map(str, spec['mult']))}, {spec['res_blocks']} res blocks, attention at "
                      f"{','.join(map(str, spec['attn']))}, dropout {spec['dropout']})", "",
                  "| implementation | params | GFLOP/img fwd | fwd+bwd | train img/s | train MFU | "
                  f"sample img/s ({result['sample_steps_used']}-step DDIM) | sample MFU |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for impl in impls:
            f = flops.get(f"{w}/{impl}", {})
            cells = []
            for mode in ("train", "sample"):
                r = best.get((w, mode, impl))
                if r is None:
                    cells += ["-", "-"]
                    continue
                cells += [f"{fmt_rate(r['img_per_s'])} ({r['setting']}, b{r['batch']})",
                          f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"]
            label = LABELS.get(impl, impl)
            if f.get("lucidrains_dim") and impl == "lucidrains-pm":
                label += f", dim {f['lucidrains_dim']}"
            gf = f"{f['flops_fwd_per_img'] / 1e9:.3f}" if f.get("flops_fwd_per_img") else "-"
            gfb = f"{f['flops_fwdbwd_per_img'] / 1e9:.3f}" if f.get("flops_fwdbwd_per_img") else "-"
            params = f"{f['params'] / 1e6:.3f}M" if f.get("params") else "-"
            lines.append(f"| {label} | {params} | {gf} | {gfb} | " + " | ".join(cells) + " |")
        ratio_lines = []
        for ours in [i for i in impls if i.startswith("ours")]:
            for peer in [i for i in impls if not i.startswith("ours")]:
                cells = []
                for mode in ("train", "sample"):
                    a, b = best.get((w, mode, ours)), best.get((w, mode, peer))
                    if mode == "sample" and ours != "ours" and not ours.startswith("ours@"):
                        cells.append("-")
                    else:
                        cells.append(f"{a['img_per_s'] / b['img_per_s']:.2f}x" if a and b else "-")
                ratio_lines.append(f"| {ours} / {peer} | " + " | ".join(cells) + " |")
        if ratio_lines:
            lines += ["", "| ratio (best settings) | train | sample |", "|---|---:|---:|", *ratio_lines]
    lines += ["", "<details><summary>every cell (median [min-max] img/s)</summary>", "",
              "| workload | mode | implementation | setting | batch | img/s | min | max | n | MFU |",
              "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "img_per_s" in r:
            u = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
            lines.append(f"| {r['workload']} | {r['mode']} | {r['impl']} | {r['setting']} | {r['batch']} | "
                         f"{fmt_rate(r['img_per_s'])} | {fmt_rate(r['img_per_s_min'])} | "
                         f"{fmt_rate(r['img_per_s_max'])} | {r['n']} | {u} |")
        else:
            lines.append(f"| {r['workload']} | {r['mode']} | {r['impl']} | {r['setting']} | - | failed: "
                         f"{'; '.join(r['errors'])[:200]} | | | 0 | |")
    lines += ["", "</details>", "",
              "Architectures: ours and diffusers build the same network (equal parameter counts up to bias "
              "details); lucidrains' Unet has a fixed layout (RMSNorm, 7x7 input conv, linear attention at every "
              "level without full attention, res blocks at the level's input width), so its rows are the closest "
              "it can be configured, at the same widths and at a matched parameter count. Model FLOPs count "
              "convolutions, matmuls and attention (torch.utils.flop_counter)."]
    return "\n".join(lines) + "\n"


def splice_readme(path: Path, md: str) -> None:
    """Replace the text between the peers markers; add the markers at the end if the file lacks them."""
    text = path.read_text() if path.exists() else "# diffuse\n"
    if MARK_START not in text or MARK_END not in text:
        text = text.rstrip("\n") + f"\n\n## Speed against other implementations\n\n{MARK_START}\n{MARK_END}\n"
    head, rest = text.split(MARK_START, 1)
    _, tail = rest.split(MARK_END, 1)
    path.write_text(f"{head}{MARK_START}\n{md.rstrip()}\n{MARK_END}{tail}")


def print_table(result: dict) -> None:
    best = best_rows(result["rows"])
    print(f"\n{'workload':14} {'implementation':16} {'params':>9} {'fwd GF':>7}  {'train img/s':>24}  {'sample img/s':>24}")
    for w in result["workloads"]:
        for impl in result["impls"]:
            f = result["flops"].get(f"{w}/{impl}", {})
            cells = []
            for mode in ("train", "sample"):
                r = best.get((w, mode, impl))
                cells.append(f"{fmt_rate(r['img_per_s'])} [{fmt_rate(r['img_per_s_min'])}-{fmt_rate(r['img_per_s_max'])}] "
                             f"{r['setting']}" if r else "-")
            print(f"{w:14} {impl:16} {f.get('params', 0) / 1e6:8.3f}M {f.get('flops_fwd_per_img', 0) / 1e9:7.3f}  "
                  f"{cells[0]:>24}  {cells[1]:>24}")


# ----------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    a = parse_args(argv)
    venv = Path(a.venv).resolve()
    if a.setup:
        setup(venv)
        return 0
    py = venv_python(venv)
    if not py.exists():
        print(f"no benchmark venv at {venv}; run `python {Path(__file__).name} --setup` first", file=sys.stderr)
        return 2
    workloads = [w for w in a.workloads.split(",") if w]
    impls = [i for i in a.impls.split(",") if i]
    modes = [m for m in a.modes.split(",") if m]
    settings = [s for s in a.settings.split(",") if s]
    for s in settings:
        if s not in SETTINGS:
            print(f"unknown setting {s!r}; choose from {', '.join(SETTINGS)}", file=sys.stderr)
            return 2
    threads = a.threads or usable_cores()
    pythons = {impl: py for impl in impls}
    if a.ours_venv:
        extra = venv_python(Path(a.ours_venv).resolve())
        if not extra.exists():
            print(f"--ours-venv {a.ours_venv}: no python there", file=sys.stderr)
            return 2
    sample_steps = 5 if a.quick else a.sample_steps
    a.sample_steps = sample_steps
    device_tag = a.device.split(":")[0]
    out = Path(a.out) if a.out else HERE / "results" / f"peers-{device_tag}.json"
    md_path = Path(a.md) if a.md else out.with_suffix(".md")

    env = run_worker(py, ["--mode", "env", "--device", a.device], threads, a.timeout)
    if "error" in env:
        print(f"benchmark venv is broken: {env['error']}", file=sys.stderr)
        return 1
    ours_env = None
    if a.ours_venv:
        ours_env = run_worker(extra, ["--mode", "env", "--device", a.device], threads, a.timeout)
        label = f"ours@torch{ours_env.get('versions', {}).get('torch', '?').split('+')[0]}"
        impls.append(label)
        pythons[label] = extra
    print(f"device {env.get('device_name')} | torch {env['versions'].get('torch')} | threads {threads} | "
          f"diffusers {env['versions'].get('diffusers')} | denoising-diffusion-pytorch "
          f"{env['versions'].get('denoising-diffusion-pytorch')} | load {loadavg()}", flush=True)

    def worker_impl(impl: str) -> str:
        return "ours" if impl.startswith("ours@") else impl

    load_start = loadavg()
    peaks_runs = [run_worker(py, ["--mode", "peak", "--device", a.device], threads, a.timeout)]
    flops: dict = {}
    for w in workloads:
        for impl in impls:
            r = run_worker(pythons[impl], ["--impl", worker_impl(impl), "--workload", w, "--mode", "flops"], threads, a.timeout)
            flops[f"{w}/{impl}"] = r
            if "error" in r:
                print(f"flops {w} {impl}: {r['error']}", flush=True)

    cells = [(w, m, s) for w in workloads for m in modes for s in settings]
    total = sum(len([i for i in impls if not (m == "sample" and i == "ours-bare")]) for _, m, _ in cells) * a.repeats
    done, t0 = 0, time.time()
    samples: dict = {}
    for w, m, s in cells:
        cell_impls = [i for i in impls if not (m == "sample" and i == "ours-bare")]
        for rep in range(a.repeats):
            for impl in cell_impls:                     # A B C A B C ...
                r = run_worker(pythons[impl], plan_args(a, w, m, s, worker_impl(impl)), threads, a.timeout)
                samples.setdefault((w, m, s, impl), []).append(r)
                done += 1
                rate = f"{r['img_per_s']:.3g} img/s" if "img_per_s" in r else r["error"]
                print(f"[{done}/{total} {time.time() - t0:.0f}s] {w} {m} {s} {impl} #{rep + 1}: {rate}", flush=True)
    peaks_runs.append(run_worker(py, ["--mode", "peak", "--device", a.device], threads, a.timeout))
    peaks = {k: max(p.get(k, 0) for p in peaks_runs) for k in ("peak_bf16_flops", "peak_fp32_flops")}
    peaks["matmul_n"] = peaks_runs[0].get("matmul_n")

    rows = []
    for (w, m, s, impl), runs in samples.items():
        precision, cl = SETTINGS[s]
        row = {"workload": w, "mode": m, "setting": s, "precision": precision, "channels_last": cl, "impl": impl,
               **summarise(runs)}
        if m == "sample":
            row["sample_steps"] = sample_steps
        row["mfu"] = mfu(row, flops.get(f"{w}/{impl}", {}), peaks, a.device)
        rows.append(row)

    result = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "device": a.device,
              "threads": threads, "quick": a.quick, "repeats": a.repeats, "settings": settings,
              "workloads": workloads, "impls": impls, "sample_steps_used": sample_steps,
              "loadavg_start": load_start, "loadavg_end": loadavg(), "env": env, "ours_env": ours_env,
              "git": git_state(), "pins": PINS, "peaks": peaks, "peak_runs": peaks_runs, "flops": flops,
              "workload_specs": {w: WORKLOADS[w] for w in workloads}, "rows": rows,
              "argv": sys.argv[1:]}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    md = markdown(result)
    md_path.write_text(md)
    if a.update_readme:
        splice_readme(Path(a.readme), md)
    print_table(result)
    print(f"\nwrote {out} and {md_path}" + (f"; updated {a.readme}" if a.update_readme else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
