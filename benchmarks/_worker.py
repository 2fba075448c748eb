"""One benchmark measurement in a fresh process; prints one JSON line ``RESULT {...}`` at the end.

Driven by ``train_throughput.py`` and ``compare_peers.py``, which start one process per
measurement so that no run inherits another's allocator state, thread pool or warm caches.
Works under any venv that has torch: ours needs ``diffuse`` importable, the peers need
``diffusers`` / ``denoising_diffusion_pytorch``. torch is imported only inside ``main`` so that the
orchestrators can import ``WORKLOADS`` and ``PRESET_SHAPES`` without it.

Modes (``--mode``):
  train   one optimizer step = draw t and eps, q_sample, forward, MSE on eps, backward, AdamW
          (ours: ``diffuse.train.TrainStep``, which also clips and updates the EMA; ``ours-bare``
          is the same TrainStep with clipping off and the EMA update replaced by a no-op).
  sample  DDIM from pure noise to x_0 with ``--sample-steps`` network evaluations
          (ours: ``diffuse.generate.generate``; diffusers: DDIMScheduler loop; lucidrains:
          ``GaussianDiffusion.ddim_sample``).
  flops   FLOPs per image of one forward and of forward+backward (torch.utils.flop_counter),
          plus the parameter count. Counts matmuls, convolutions and attention only.
  peak    dense matmul throughput (CPU: 2048^2 fp32 and bf16; CUDA: 8192^2 bf16 and fp32).
  env     versions, device name, CPU flags, threads.

Timing: ``--warmup`` untimed steps (sampling: one 2-step run), then ``--windows`` timed windows of
``--steps`` training steps (auto: enough for ``--min-seconds``) or ``--sample-runs`` sampling
runs. CUDA windows are timed with CUDA events after a synchronisation; CPU with perf_counter.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

# Benchmark this checkout's diffuse whichever venv runs the worker (the venv may hold another copy).
REPO = Path(__file__).resolve().parents[1]
if (REPO / "src" / "diffuse").is_dir():
    sys.path.insert(0, str(REPO / "src"))

# Peer-comparison workloads: one architecture, built three ways (see build_* below).
#   attn: feature-map sizes with full self-attention; heads = channels at that level / head_channels.
WORKLOADS = {
    "mnist-small": dict(channels=1, size=28, base=32, mult=(1, 2, 2), res_blocks=2, attn=(7,), dropout=0.0,
                        groups=8, head_channels=32, scale_shift=True, schedule="cosine",
                        batch={"cpu": 64, "cuda": 64}, sample_batch={"cpu": 64, "cuda": 256}),
    "cifar10-ddpm": dict(channels=3, size=32, base=128, mult=(1, 2, 2, 2), res_blocks=2, attn=(16,), dropout=0.1,
                         groups=32, head_channels=256, scale_shift=False, schedule="linear",
                         batch={"cpu": 8, "cuda": 128}, sample_batch={"cpu": 8, "cuda": 256}),
}

# Data shape (channels, size) of each diffuse preset, so presets can be timed without the data.
PRESET_SHAPES = {"digits": (1, 16), "mnist": (1, 28), "cifar10-ddpm": (3, 32), "cifar10-small": (3, 32),
                 "64px": (3, 64)}

IMPLS = ("ours", "ours-bare", "diffusers", "lucidrains", "lucidrains-pm")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--impl", choices=IMPLS, default="ours")
    p.add_argument("--workload", default="mnist-small", help=f"{', '.join(WORKLOADS)} or preset:<diffuse preset>")
    p.add_argument("--mode", choices=("train", "sample", "flops", "peak", "env"), default="train")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--batch", type=int, default=None, help="default: the workload's for this device")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: all cores)")
    p.add_argument("--warmup", type=int, default=3, help="untimed training steps before timing")
    p.add_argument("--steps", type=int, default=None, help="training steps per timed window (default: auto)")
    p.add_argument("--min-seconds", type=float, default=2.0, help="auto --steps: aim for windows this long")
    p.add_argument("--windows", type=int, default=1, help="timed windows in this process")
    p.add_argument("--sample-steps", type=int, default=50)
    p.add_argument("--sample-runs", type=int, default=1, help="sampling runs per timed window")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grad-checkpointing", action="store_true", help="ours only: recompute block activations")
    p.add_argument("--compile", action="store_true", help="ours only: torch.compile the model (as train --compile)")
    p.add_argument("--cudnn-benchmark", action="store_true",
                   help="torch.backends.cudnn.benchmark = True (as diffuse's trainer sets it on CUDA)")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# Environment

def cpu_info() -> dict:
    name, flags = platform.processor() or platform.machine(), []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and name in ("", platform.machine(), platform.processor()):
                name = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = line.split(":", 1)[1].split()
                break
    except OSError:
        pass
    keep = [f for f in flags if f.startswith(("amx", "avx512_bf16", "avx512f", "avx512_vnni", "avx2", "avx_vnni"))]
    return {"cpu": name, "cpu_flags": sorted(keep), "amx": any(f.startswith("amx") for f in flags),
            "logical_cpus": os.cpu_count(),
            "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None}


def env_info(torch, device) -> dict:
    from importlib import metadata
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for pkg in ("diffusers", "denoising-diffusion-pytorch", "diffuse", "numpy", "einops", "accelerate"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    info = {"versions": versions, "threads": torch.get_num_threads(), **cpu_info(),
            "cpu_capability": getattr(torch.backends.cpu, "get_cpu_capability", lambda: None)(),
            "mkldnn": torch.backends.mkldnn.is_available(), "executable": sys.executable}
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
    else:
        info["device_name"] = info["cpu"]
    try:
        import diffuse
        info["diffuse_path"] = str(Path(diffuse.__file__).resolve().parent)
    except ImportError:
        pass
    return info


# ----------------------------------------------------------------------------------------------
# Models: the same UNet from three code bases

def workload_spec(name: str) -> dict:
    if name.startswith("preset:"):
        return {"preset": name.split(":", 1)[1]}
    if name not in WORKLOADS:
        raise SystemExit(f"unknown workload {name!r}; choose one of {', '.join(WORKLOADS)} or preset:<name>")
    return WORKLOADS[name]


def ours_config(w: dict):
    """A diffuse Config for a workload (or a preset, with its data shape filled in)."""
    from diffuse.config import PRESETS, resolve
    if "preset" in w:
        preset = w["preset"]
        if preset not in PRESETS or preset not in PRESET_SHAPES:
            raise SystemExit(f"unknown preset {preset!r}; choose one of {', '.join(PRESET_SHAPES)}")
        cfg = resolve(preset, None, None, {})
        cfg.model.in_channels, cfg.model.image_size = PRESET_SHAPES[preset]
        return cfg
    cfg = resolve("digits", None, None, {"model": dict(
        base_channels=w["base"], channel_mult=w["mult"], num_res_blocks=w["res_blocks"],
        attn_resolutions=w["attn"], dropout=w["dropout"], num_groups=w["groups"],
        head_channels=w["head_channels"], scale_shift=w["scale_shift"])})
    cfg.diffusion.schedule = w["schedule"]
    cfg.model.in_channels, cfg.model.image_size = w["channels"], w["size"]
    cfg.train.lr, cfg.train.warmup_steps, cfg.train.ema_decay, cfg.train.grad_clip = 2e-4, 0, 0.9999, 1.0
    return cfg


def ours_param_count(w: dict) -> int:
    import torch
    from diffuse.models import UNet
    with torch.device("meta"):
        return sum(p.numel() for p in UNet(ours_config(w).model).parameters())


def shape_of(w: dict) -> tuple[int, int]:
    if "preset" in w:
        return PRESET_SHAPES[w["preset"]]
    return w["channels"], w["size"]


def build_diffusers(w: dict):
    """diffusers UNet2DModel with the workload's levels, blocks and attention placement.

    For cifar10-ddpm this is the configuration of google/ddpm-cifar10-32 (the DDPM port), with
    dropout 0.1 as in the paper."""
    from diffusers import UNet2DModel
    chans = tuple(w["base"] * m for m in w["mult"])
    sizes = [w["size"] // 2 ** i for i in range(len(chans))]
    down = tuple("AttnDownBlock2D" if s in w["attn"] else "DownBlock2D" for s in sizes)
    up = tuple("AttnUpBlock2D" if s in w["attn"] else "UpBlock2D" for s in reversed(sizes))
    ddpm = w["schedule"] == "linear" and not w["scale_shift"]
    return UNet2DModel(
        sample_size=w["size"], in_channels=w["channels"], out_channels=w["channels"],
        block_out_channels=chans, down_block_types=down, up_block_types=up,
        layers_per_block=w["res_blocks"], dropout=w["dropout"], norm_num_groups=w["groups"],
        attention_head_dim=w["head_channels"],
        resnet_time_scale_shift="scale_shift" if w["scale_shift"] else "default",
        norm_eps=1e-6 if ddpm else 1e-5, freq_shift=1 if ddpm else 0, flip_sin_to_cos=not ddpm,
        downsample_padding=0 if ddpm else 1)


def build_lucidrains(w: dict, sampling_steps: int, match_params: int | None = None, flash: bool = True):
    """lucidrains Unet + GaussianDiffusion, as close to the workload as its fixed layout allows.

    Its Unet always has 2 ResnetBlocks per level (down) and an attention block at every level:
    full attention where the workload has it, linear attention elsewhere (cannot be turned off;
    we give those 1 head of 32 channels, the cheapest setting). Norms are RMSNorm, the time
    embedding always acts as scale+shift, and the first conv is 7x7. Its down-path res blocks run
    at the level's input width, so at equal widths it has fewer parameters than the DDPM UNet;
    with ``match_params`` the base width is instead chosen (even, same multipliers and attention
    widths) to bring the parameter count closest to that number ("lucidrains-pm"). ``flash``
    routes its full attention through F.scaled_dot_product_attention; on GPUs newer than sm80 it
    then allows only the flash kernel, which has no fp32 path, so fp32 CUDA runs pass False (its
    einsum attention)."""
    import torch
    from denoising_diffusion_pytorch import GaussianDiffusion, Unet
    if w["res_blocks"] != 2:
        raise SystemExit("lucidrains' Unet has exactly 2 res blocks per level")
    sizes = [w["size"] // 2 ** i for i in range(len(w["mult"]))]
    full = tuple(s in w["attn"] for s in sizes)
    # Attention width per stage: as ours there (one head per head_channels). The innermost entry
    # also sizes the middle attention, so it always takes ours' middle-attention width.
    chans = [w["base"] * m for m in w["mult"]]
    heads = [max(1, c // w["head_channels"]) if f else 1 for c, f in zip(chans, full)]
    dim_head = [min(c, w["head_channels"]) if f else 32 for c, f in zip(chans, full)]
    heads[-1], dim_head[-1] = max(1, chans[-1] // w["head_channels"]), min(chans[-1], w["head_channels"])
    heads, dim_head = tuple(heads), tuple(dim_head)

    def make(dim: int):
        return Unet(dim=dim, dim_mults=w["mult"], channels=w["channels"], dropout=w["dropout"],
                    full_attn=full, attn_heads=heads, attn_dim_head=dim_head, flash_attn=flash)

    dim = w["base"]
    if match_params:
        def count(d: int) -> int:
            with torch.device("meta"):
                return sum(p.numel() for p in make(d).parameters())
        dim = min(range(w["base"], 2 * w["base"] + 1, 2), key=lambda d: abs(count(d) - match_params))
    unet = make(dim)
    diffusion = GaussianDiffusion(unet, image_size=w["size"], timesteps=1000, sampling_timesteps=sampling_steps,
                                  objective="pred_noise", beta_schedule=w["schedule"], auto_normalize=False)
    return unet, diffusion


def make_optimizer(torch, params, device, lr=2e-4):
    """The peers' AdamW: fused on CUDA; foreach on the CPU, which is faster than torch's CPU default
    (the per-tensor loop) that the peers' own trainers get. diffuse uses build_training's optimizer
    (fused on both), one of its optimisations."""
    fused = device.type == "cuda"
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                             fused=fused or None, foreach=None if fused else True)


# ----------------------------------------------------------------------------------------------
# Workloads as callables: train_step(k), sample(batch, steps, seed), forward(x, t)

class Bench:
    """Holds one implementation's model and exposes train_step / sample / forward_loss."""

    def __init__(self, torch, args, device):
        self.torch, self.args, self.device = torch, args, device
        self.impl = args.impl
        self.w = workload_spec(args.workload)
        self.c, self.size = shape_of(self.w)
        self.amp = torch.bfloat16 if args.precision == "bf16" else None
        self.cl = args.channels_last
        self.T = 1000
        torch.manual_seed(args.seed)
        if self.impl in ("ours", "ours-bare"):
            self._build_ours()
        elif "preset" in self.w:
            raise SystemExit("preset:<name> workloads are for ours only")
        elif self.impl == "diffusers":
            self._build_diffusers()
        else:
            self._build_lucidrains(self.impl == "lucidrains-pm")
        if self.cl:
            self.model.to(memory_format=torch.channels_last)
        self.params = sum(p.numel() for p in self.model.parameters())

    # --- builders ---
    def _build_ours(self):
        from diffuse import train as tr
        from diffuse.diffusion import Schedule
        tr.keep_freed_cpu_memory()                       # as `diffuse train` and `diffuse sample` do
        cfg = ours_config(self.w)
        cfg.train.grad_checkpointing = bool(getattr(self.args, "grad_checkpointing", False))
        cfg.train.compile = bool(getattr(self.args, "compile", False))
        if self.impl == "ours-bare":
            cfg.train.grad_clip = 0.0
            tr.ema_update = lambda *a, **kw: None              # like-for-like: no EMA update
        self.cfg = cfg
        d = cfg.diffusion
        self.T = d.timesteps
        self.schedule = Schedule(d.schedule, d.timesteps, d.beta_start, d.beta_end)
        self.model, self.ema, self.opt = tr.build_training(cfg, self.device, self.cl)
        self._step = None

        def train_step(k, x0):
            if self._step is None:
                cfg.train.batch_size = x0.shape[0]      # the step draws noise for the configured batch
                self._step = tr.TrainStep(self.model, self.ema, self.opt, self.schedule, cfg, device=self.device,
                                          amp=self.amp, channels_last=self.cl)
            return self._step(x0, None, k)[0]
        self.train_step = train_step
        self.net_forward = lambda x, t: self.model(x, t.float())

        def sample(n, steps, seed):
            from diffuse.generate import Loaded, generate
            loaded = Loaded(self.model, cfg, {}, self.schedule, Path("<benchmark>"))
            self.model.eval()
            images, _ = generate(loaded, n=n, seed=seed, sampler="ddim", steps=steps, batch_size=n,
                                 device=self.device, amp=self.amp)
            self.model.train()
            return images
        self.sample = sample

    def _build_diffusers(self):
        from diffusers import DDIMScheduler, DDPMScheduler
        torch, F = self.torch, self.torch.nn.functional
        beta = "linear" if self.w["schedule"] == "linear" else "squaredcos_cap_v2"
        self.model = build_diffusers(self.w).to(self.device)
        self.opt = make_optimizer(torch, self.model.parameters(), self.device)
        noise_sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule=beta)
        ddim = DDIMScheduler(num_train_timesteps=1000, beta_schedule=beta, clip_sample=True,
                             set_alpha_to_one=False, timestep_spacing="trailing")

        def train_step(k, x0):
            noise = torch.randn_like(x0)
            t = torch.randint(0, 1000, (x0.shape[0],), device=self.device)
            x_t = noise_sched.add_noise(x0, noise, t)
            with torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
                pred = self.model(x_t, t).sample
            loss = F.mse_loss(pred.float(), noise.float())
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            return loss.detach()
        self.train_step = train_step
        self.net_forward = lambda x, t: self.model(x, t).sample

        @torch.inference_mode()
        def sample(n, steps, seed):
            self.model.eval()
            g = torch.Generator(self.device).manual_seed(seed)
            x = torch.randn((n, self.c, self.size, self.size), generator=g, device=self.device)
            ddim.set_timesteps(steps, device=self.device)
            for t in ddim.timesteps:
                with torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
                    eps = self.model(x, t).sample
                x = ddim.step(eps.float(), t, x).prev_sample
            self.model.train()
            return x
        self.sample = sample

    def _build_lucidrains(self, match: bool):
        torch = self.torch
        target = None
        if match:
            target = ours_param_count(self.w)
        flash = not (self.device.type == "cuda" and self.amp is None)
        self.unet, self.diffusion = build_lucidrains(self.w, self.args.sample_steps, target, flash)
        self.extra = {"lucidrains_dim": self.unet.init_conv.out_channels, "lucidrains_flash_attn": flash}
        self.diffusion.to(self.device)
        self.model = self.unet
        self.opt = make_optimizer(torch, self.diffusion.parameters(), self.device)

        def train_step(k, x0):
            with torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
                loss = self.diffusion(x0)              # draws t and eps, q_sample, forward, MSE
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            return loss.detach()
        self.train_step = train_step
        self.net_forward = lambda x, t: self.unet(x, t)

        def sample(n, steps, seed):
            self.diffusion.sampling_timesteps = steps
            self.diffusion.is_ddim_sampling = steps < self.diffusion.num_timesteps
            if not self.diffusion.is_ddim_sampling:
                raise SystemExit("lucidrains uses DDIM only for fewer sampling steps than training steps")
            torch.manual_seed(seed)
            self.diffusion.eval()
            with torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
                x = self.diffusion.ddim_sample((n, self.c, self.size, self.size))
            self.diffusion.train()
            return x
        self.sample = sample

    def batch_x0(self, batch: int):
        """Random training images in [-1, 1], NCHW (channels_last when asked), on device."""
        torch = self.torch
        x0 = torch.rand((batch, self.c, self.size, self.size), device=self.device) * 2 - 1
        return x0.contiguous(memory_format=torch.channels_last) if self.cl else x0


# ----------------------------------------------------------------------------------------------
# Timing

def sync(torch, device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_window(torch, device, fn, n: int) -> float:
    """Seconds for n calls of fn(i): CUDA events on a GPU, perf_counter on the CPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        sync(torch, device)
        start.record()
        for i in range(n):
            fn(i)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000.0
    t0 = time.perf_counter()
    for i in range(n):
        fn(i)
    return time.perf_counter() - t0


def run_train(torch, args, device, bench: Bench) -> dict:
    batch = args.batch or default_batch(bench.w, device, "batch")
    x0 = bench.batch_x0(batch)
    step, last = [0], [None]

    def one(_):
        last[0] = bench.train_step(step[0], x0)             # device tensor: no host sync here
        step[0] += 1

    bench.model.train()
    time_window(torch, device, one, max(1, args.warmup))
    if args.steps is None:
        per_step = time_window(torch, device, one, 1)        # a post-warm-up single-step estimate
        n = int(min(200, max(1, math.ceil(args.min_seconds / max(per_step, 1e-6)))))
    else:
        n = args.steps
    times = [time_window(torch, device, one, n) for _ in range(args.windows)]
    loss = float(last[0])
    if not math.isfinite(loss):
        raise SystemExit(f"non-finite loss {loss}")
    rates = [batch * n / t for t in times]
    return {"batch": batch, "steps_per_window": n, "window_seconds": times, "img_per_s_windows": rates,
            "img_per_s": statistics.median(rates), "last_loss": loss}


def run_sample(torch, args, device, bench: Bench) -> dict:
    batch = args.batch or default_batch(bench.w, device, "sample_batch")
    bench.sample(batch, 2, args.seed)                      # warm-up: kernels, allocator, autotuning
    sync(torch, device)
    runs = max(1, args.sample_runs)
    times = [time_window(torch, device, lambda i: bench.sample(batch, args.sample_steps, args.seed + i), runs)
             for _ in range(args.windows)]
    rates = [batch * runs / t for t in times]
    return {"batch": batch, "sample_steps": args.sample_steps, "runs_per_window": runs, "window_seconds": times,
            "img_per_s_windows": rates, "img_per_s": statistics.median(rates)}


def default_batch(w: dict, device, key: str) -> int:
    if "preset" in w:
        raise SystemExit("give --batch for preset workloads")
    return w[key]["cuda" if device.type == "cuda" else "cpu"]


def flop_counter(torch):
    """FlopCounterMode that also counts the CPU flash-attention kernel (unregistered in torch 2.14),
    so every implementation's attention is counted whichever SDPA backend it lands on."""
    from torch.utils import flop_counter as fcm
    aten = torch.ops.aten
    extra = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        extra[aten._scaled_dot_product_flash_attention_for_cpu] = (
            lambda q, k, v, *a, out_shape=None, **kw: fcm.sdpa_flop_count(q, k, v))
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        extra[aten._scaled_dot_product_flash_attention_for_cpu_backward] = (
            lambda g, q, k, v, *a, out_shape=None, **kw: fcm.sdpa_backward_flop_count(g, q, k, v))
    return fcm.FlopCounterMode(display=False, custom_mapping=extra)


def run_flops(torch, args, device, bench: Bench) -> dict:
    """FLOPs per image (batch 2, divided by 2) of the network's forward and forward+backward."""
    b = 2
    x = bench.batch_x0(b)
    t = torch.randint(0, bench.T, (b,), device=device)
    bench.model.train()
    with flop_counter(torch) as fc:
        out = bench.net_forward(x, t)
    fwd = fc.get_total_flops()
    with flop_counter(torch) as fc:
        out = bench.net_forward(x, t)
        out.float().square().mean().backward()
    fwdbwd = fc.get_total_flops()
    bench.model.zero_grad(set_to_none=True)
    return {"params": bench.params, "flops_fwd_per_img": fwd / b, "flops_fwdbwd_per_img": fwdbwd / b}


def run_peak(torch, args, device) -> dict:
    """Best-of-5 dense matmul rate, in FLOP/s, per dtype."""
    n = 8192 if device.type == "cuda" else 2048
    out = {"matmul_n": n}
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        for _ in range(3):
            a @ b
        sync(torch, device)
        one = time_window(torch, device, lambda i: a @ b, 1)
        k = max(1, int(0.5 / max(one, 1e-6)))
        best = max(2 * n ** 3 * k / time_window(torch, device, lambda i: a @ b, k) for _ in range(5))
        out[f"peak_{name}_flops"] = best
    return out


def main(argv=None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")            # lucidrains' sampling loop uses tqdm
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda asked for, but torch sees no CUDA GPU")
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = args.cudnn_benchmark
    result = {"impl": args.impl, "workload": args.workload, "mode": args.mode, "device": str(device),
              "precision": args.precision, "channels_last": args.channels_last, "threads": torch.get_num_threads(),
              "cudnn_benchmark": args.cudnn_benchmark and device.type == "cuda"}
    if args.mode == "env":
        result.update(env_info(torch, device))
    elif args.mode == "peak":
        result.update(run_peak(torch, args, device))
    else:
        bench = Bench(torch, args, device)
        result["params"] = bench.params
        result.update(getattr(bench, "extra", {}))
        if args.mode == "train":
            result.update(run_train(torch, args, device, bench))
        elif args.mode == "sample":
            result.update(run_sample(torch, args, device, bench))
        else:
            result.update(run_flops(torch, args, device, bench))
    if device.type == "cuda":
        result["max_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    else:
        import resource
        # the whole process's peak resident memory (Linux reports KiB): model, optimizer, activations
        result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
