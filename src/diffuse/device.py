"""The machine: which device, which precision, which memory layout, which backend switches.

One rule for ``train``, ``sample``, ``eval`` and ``visualize``:

- device ``auto``: CUDA when available, else the CPU.
- precision ``auto``: bf16 autocast only where it is *measured* faster than fp32.
  * CUDA: bf16 where the GPU has native bf16 (compute capability >= 8, Ampere on); older GPUs
    emulate it, so fp32 with TF32 matmuls where the GPU has them.
  * CPU with AMX tiles: bf16 (oneDNN's AMX kernels are several times faster than fp32).
  * any other CPU: a sub-second probe (``probe_bf16``) times a matmul and a 3x3 channels-last
    convolution at training-like sizes, fp32 against bf16 autocast, best of a few interleaved
    repeats; bf16 wins only when the geometric mean of the two speedups is at least
    ``BF16_MIN_SPEEDUP``. AVX512-BF16 alone is no promise: on a Zen 5 EPYC (2 cores) and on an
    AMX-less Xeon, bf16 measured slower than fp32 (docs/hardware.md). The result is cached per
    machine (CPU model, torch version, thread count) in ``cache_dir()/device/bf16-probe.json``.
- channels_last: on CUDA (cuDNN's NHWC kernels) and under bf16 on the CPU (oneDNN's bf16 kernels
  want NHWC); fp32 on the CPU gains little from it.

``diffuse info`` (no run) prints the choice and the probe's rates.
"""

from __future__ import annotations

import json
import math
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from .errors import DiffuseError
from .threads import cpu_mark, others_demand

PROBE_VERSION = 3           # 3: a small UNet's fp32 step in both layouts (channels_last on fp32 CPUs)
BF16_MIN_SPEEDUP = 1.10     # geometric mean of the matmul and conv speedups bf16 must reach
NHWC_MIN_SPEEDUP = 1.05     # channels_last's speedup on that step for fp32 CPU runs to use it
NOISY_SPREAD = 1.5          # a probe whose repeats vary more than this ran under load: not cached


# ----------------------------------------------------------------------------------------------
# Device

def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DiffuseError("--device cuda asked for, but no CUDA GPU is available (use --device cpu)")
    return torch.device(name)


def configure(device: torch.device) -> None:
    """Backend switches for a run on ``device``: on CUDA, cuDNN autotuning (diffuse's shapes are
    fixed within a run, so the one-off search pays back) and TF32 for fp32 matmuls and convolutions
    (where the GPU has it; ignored before Ampere). On the CPU, glibc keeps freed blocks."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        keep_freed_cpu_memory()


def keep_freed_cpu_memory() -> bool:
    """Make glibc's malloc keep freed blocks of up to 32 MiB for reuse instead of unmapping them.

    torch's CPU allocator is plain malloc; by default glibc returns every block over its mmap
    threshold to the OS on free, so each training step page-faults its activations in again
    (3,200 faults, 24 ms of kernel time per DDPM-UNet step at batch 8). With the threshold raised
    and trimming off, a step's memory is reused: 0 faults, 4-6% more img/s on 2 cores
    (benchmarks/cpu_kernels.py, docs/speed.md). Process-wide, harmless elsewhere; a no-op (False) off glibc."""
    import ctypes
    import ctypes.util
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3                  # <malloc.h>
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 1 << 30))


# ----------------------------------------------------------------------------------------------
# CPU identity and flags

def cpu_model() -> str:
    """The CPU's model string (``model name`` in /proc/cpuinfo), else platform's guess."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_has_amx() -> bool:
    """AMX tiles with bf16 (Sapphire Rapids on): oneDNN's fastest bf16 path."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    try:
        if probe is not None:
            return bool(probe())
    except Exception:  # noqa: BLE001 - a private probe; fall back to the flags
        pass
    return "amx_bf16" in _cpu_flags()


def cpu_has_avx512_bf16() -> bool:
    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    try:
        if probe is not None:
            return bool(probe())
    except Exception:  # noqa: BLE001
        pass
    return "avx512_bf16" in _cpu_flags()


# ----------------------------------------------------------------------------------------------
# The bf16 probe (CPU)

@dataclass
class ProbeResult:
    """GFLOP/s of each probe op in fp32 and under bf16 autocast (best of ``repeats``)."""
    matmul_fp32: float
    matmul_bf16: float
    conv_fp32: float
    conv_bf16: float
    # a small UNet's training step in fp32 (forward + backward, LAYOUT_MODEL), steps/s in each
    # memory layout: decides channels_last for fp32 runs on this CPU
    unet_nchw: float = 1.0
    unet_nhwc: float = 1.0
    seconds: float = 0.0            # wall time of the whole probe
    spread: float = 1.0             # worst op's median / best time; > NOISY_SPREAD: not cached
    key: str = ""

    @property
    def speedup(self) -> float:
        """Geometric mean of bf16's speedups over fp32 on the two ops."""
        return math.sqrt(self.matmul_bf16 / self.matmul_fp32 * self.conv_bf16 / self.conv_fp32)

    @property
    def nhwc_speedup(self) -> float:
        """channels_last's speedup over the default (NCHW) layout on the fp32 UNet step."""
        return self.unet_nhwc / self.unet_nchw


def bf16_wins(r: ProbeResult, min_speedup: float = BF16_MIN_SPEEDUP) -> bool:
    """The decision from measured rates: bf16 only when clearly faster (a margin above 1, so timing
    noise on a tie keeps fp32, which is also the more accurate choice)."""
    return r.speedup >= min_speedup


# Sizes like a small UNet's hot ops: a 1024^2 matmul (attention and 1x1 projections) and a 3x3
# conv at 64 channels on 32x32 maps, batch 16, forward + backward: 2.1 and 3.6 GFLOP, tens of ms
# each on 2 cores.
MATMUL_N = 1024
CONV_SHAPE = (16, 64, 32, 32)
# The layout probe: the 0.29M-parameter UNet a CPU budget trains on MNIST (the 28 px ladder's
# second rung) at batch 32, one training step's forward and backward. oneDNN's NHWC convs alone
# are faster than NCHW ones on a 2-core Intel Xeon, but GroupNorm, SiLU and the skips pay for the
# layout too, and the network's mix of sizes (28, 14, 7) decides, so the whole network is timed.
LAYOUT_MODEL = {"base_channels": 16, "channel_mult": (1, 2, 2), "num_res_blocks": 1, "attn_resolutions": (),
                "num_groups": 8, "image_size": 28, "in_channels": 1}
LAYOUT_BATCH = 32


def _time_ops(repeats: int = 5) -> dict[str, float]:
    """Best-of-``repeats`` GFLOP/s per (op, precision), fp32 and bf16 interleaved so that load from
    other processes hits both alike, and the small UNet's fp32 steps/s per layout, interleaved too.
    One warm-up call each (oneDNN builds its kernels then)."""
    torch.manual_seed(0)
    n = MATMUL_N
    a, b = torch.randn(n, n), torch.randn(n, n)
    bsz, c, h, w = CONV_SHAPE
    x = torch.randn(bsz, c, h, w).contiguous(memory_format=torch.channels_last).requires_grad_()
    conv = torch.nn.Conv2d(c, c, 3, padding=1, bias=False).to(memory_format=torch.channels_last)
    # the conv runs forward and backward (grads of input and weight), as in a training step: 3x
    flops = {"matmul": 2.0 * n ** 3, "conv": 3 * 2.0 * bsz * c * c * 9 * h * w}
    from .config import ModelConfig                # late: device is imported before the models
    from .models import UNet

    unet = UNet(ModelConfig(**LAYOUT_MODEL))
    size, channels = LAYOUT_MODEL["image_size"], LAYOUT_MODEL["in_channels"]
    unet_in = {"nchw": torch.randn(LAYOUT_BATCH, channels, size, size)}
    unet_in["nhwc"] = unet_in["nchw"].contiguous(memory_format=torch.channels_last)
    steps_t = torch.linspace(0, 999, LAYOUT_BATCH)

    def run(op: str, variant: str) -> float:
        bf16 = variant == "bf16"
        if op == "unet":                                   # untimed: the layout switch and fresh grads
            unet.to(memory_format=torch.channels_last if variant == "nhwc" else torch.contiguous_format)
            unet.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        if op == "matmul":
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                (a @ b).sum()                              # touch the result
        elif op == "conv":
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                out = conv(x)
            out.float().sum().backward()
        else:
            x_t = unet_in[variant]
            (unet(x_t, steps_t) - x_t).square().mean().backward()
        return time.perf_counter() - t0

    def spread() -> float:
        """Median over best time, worst op: near 1 on a quiet machine, well above when others compete."""
        return max(sorted(v)[len(v) // 2] / min(v) for v in times.values())

    times: dict[str, list[float]] = {}
    for op, variants in (("matmul", ("fp32", "bf16")), ("conv", ("fp32", "bf16")), ("unet", ("nchw", "nhwc"))):
        if op == "unet" and spread() > NOISY_SPREAD:
            # others compete: the UNet's hundreds of small parallel regions then take many times
            # longer (tens of seconds, not two), and the answer is not cached anyway; keep NCHW,
            # measure next time
            times["unet_nchw"] = times["unet_nhwc"] = [1.0]
            break
        for variant in variants:
            run(op, variant)                               # warm-up
        for _ in range(repeats):
            for variant in variants:                       # interleaved: load hits both alike
                times.setdefault(f"{op}_{variant}", []).append(run(op, variant))
    rates = {k: flops[k.split("_")[0]] / min(v) / 1e9 for k, v in times.items() if not k.startswith("unet")}
    rates.update({k: 1.0 / min(v) for k, v in times.items() if k.startswith("unet")})    # steps/s
    rates["spread"] = spread()
    return rates


# Other processes' use of our cores during a probe at or above which its rate is not cached.
# Absolute, not a share of the cores: an OpenMP region waits for its slowest thread, so another
# process on any one of our cores slows every step, however many cores there are.
OTHERS_BUSY_CORES = 0.25


def _busy(mark: tuple[int, int, float] | None = None) -> bool:
    """Other processes competed for our cores since ``mark`` (threads.cpu_mark, taken before the
    timed work): they kept at least OTHERS_BUSY_CORES of them busy meanwhile. Measured over the
    probe itself, not read from the load average, which still counts a process that ended seconds
    ago and misses one that ran only during a short probe. False without a mark or /proc/stat."""
    demand = others_demand(mark, cpu_mark())
    return demand is not None and demand >= OTHERS_BUSY_CORES


def probe_key() -> str:
    """What the probe's answer depends on: the CPU model, torch's version and the thread count."""
    return f"{cpu_model()} | torch {torch.__version__} | {torch.get_num_threads()} threads"


def probe_cache_file() -> Path:
    from .fsutil import cache_dir
    return cache_dir() / "device" / "bf16-probe.json"


def _read_cache(path: Path, version: int = PROBE_VERSION) -> dict[str, Any]:
    """The cache's entries, or {} if the file is missing, unreadable or not what we wrote (another
    ``version``: the bf16 probe's here, sizing.py's throughput probe for its own file)."""
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(d, dict) or d.get("version") != version or not isinstance(d.get("entries"), dict):
        return {}
    return d["entries"]


def _write_cache(path: Path, version: int, entries: dict[str, Any]) -> None:
    """Replace the cache file in one step (atomic_write); an unwritable cache dir only costs a
    measurement next time."""
    try:
        from .fsutil import atomic_write
        atomic_write(path, json.dumps({"version": version, "entries": entries}, indent=1))
    except OSError:
        pass


RATES = ("matmul_fp32", "matmul_bf16", "conv_fp32", "conv_bf16", "unet_nchw", "unet_nhwc")


def _numbers(values: Any, positive: tuple[str, ...], nonnegative: tuple[str, ...] = ()) -> dict[str, float] | None:
    """{k: float} if ``values`` is a dict whose every named field is a finite number (an int or a
    float: not a bool, not a string), > 0 for ``positive`` and >= 0 for ``nonnegative``; else None.
    The speedup divides by the rates and takes a square root, so anything else cannot be used."""
    if not isinstance(values, dict):
        return None
    out = {}
    for k in positive + nonnegative:
        v = values.get(k)
        number = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        if not number or v < 0 or (v == 0 and k in positive):
            return None
        out[k] = float(v)
    return out


def probe_bf16(*, timer: Callable[[], dict[str, float]] | None = None, refresh: bool = False,
               store: bool | None = None) -> ProbeResult:
    """The probe's rates for this machine: from the cache if it has this machine's key, else
    measured now (about two seconds) and stored, unless its repeats varied so much (``spread``) that
    other processes were competing for the cores (``store`` True/False overrides that). A corrupt
    cache, or an entry that is not what a measurement writes (a rate that is 0, negative, not finite,
    missing or not a number), is measured over and replaced, never fatal; an unwritable cache dir
    only costs a re-probe next time."""
    key = probe_key()
    path = probe_cache_file()
    entries = _read_cache(path)
    cached = None if refresh else _numbers(entries.get(key), RATES + ("spread",), ("seconds",))
    if cached is not None:
        return ProbeResult(**cached, key=key)
    t0, mark = time.perf_counter(), cpu_mark()
    rates = (timer or _time_ops)()
    measured = _numbers({"spread": 1.0, **rates}, RATES + ("spread",))
    if measured is None:
        raise DiffuseError(f"bf16 probe gave unusable rates {rates}")
    r = ProbeResult(**measured, seconds=round(time.perf_counter() - t0, 3), key=key)
    if store is False or (store is None and (r.spread > NOISY_SPREAD or _busy(mark))):
        return r                        # timed under load: use it this once, measure again next time
    entries[key] = {k: v for k, v in asdict(r).items() if k != "key"}
    _write_cache(path, PROBE_VERSION, entries)
    return r


# ----------------------------------------------------------------------------------------------
# Precision and layout

def cuda_has_native_bf16(device: torch.device | None = None) -> bool:
    """Native bf16 on this GPU (compute capability >= 8); pre-Ampere GPUs only emulate it."""
    if not torch.cuda.is_available():
        return False
    major, _ = torch.cuda.get_device_capability(device)
    if major < 8:
        return False
    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:                                   # older torch: no emulation argument
        return bool(torch.cuda.is_bf16_supported())


@dataclass
class PrecisionChoice:
    dtype: torch.dtype | None       # autocast dtype, None = fp32
    reason: str                     # one line: why
    probe: ProbeResult | None = None

    @property
    def name(self) -> str:
        return "bf16" if self.dtype is torch.bfloat16 else "fp32"


def choose_precision(precision: str, device: torch.device) -> PrecisionChoice:
    """``precision`` (auto | fp32 | bf16) on ``device`` -> the autocast dtype and why."""
    if precision == "bf16":
        return PrecisionChoice(torch.bfloat16, "asked for (--precision bf16)")
    if precision == "fp32":
        return PrecisionChoice(None, "asked for (--precision fp32)")
    if precision != "auto":
        raise DiffuseError(f"--precision must be auto, fp32 or bf16, got {precision!r}")
    if device.type == "cuda":
        if cuda_has_native_bf16(device):
            return PrecisionChoice(torch.bfloat16, "GPU has native bf16")
        return PrecisionChoice(None, "GPU has no native bf16 (fp32, TF32 matmuls where available)")
    if device.type != "cpu":
        return PrecisionChoice(None, f"{device.type}: fp32")
    if cpu_has_amx():
        return PrecisionChoice(torch.bfloat16, "CPU has AMX")
    r = probe_bf16()
    if bf16_wins(r):
        return PrecisionChoice(torch.bfloat16, f"bf16 measured {r.speedup:.2f}x fp32 on this CPU", r)
    return PrecisionChoice(None, f"bf16 measured {r.speedup:.2f}x fp32 on this CPU (needs {BF16_MIN_SPEEDUP:.2f}x)", r)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast (fp16 is unstable in GroupNorm, seed 001) or None for fp32; see choose_precision."""
    return choose_precision(precision, device).dtype


def choose_layout(setting: bool | None, device: torch.device, amp: torch.dtype | None,
                  probe: ProbeResult | None = None) -> tuple[bool, str]:
    """channels_last or not, and why where it depended on this CPU ('' for a flag, CUDA, bf16).
    channels_last pays off for cuDNN and for oneDNN's bf16 kernels; for fp32 on a CPU it depends on
    the CPU (docs/hardware.md), so the cached probe's small UNet step decides (NHWC_MIN_SPEEDUP).
    One probe read gives both answers, so the reason always matches the choice; ``probe``, when the
    caller has read it already, is used instead of a second read (which on a busy machine measures again)."""
    if setting is not None:
        return setting, ""
    if device.type == "cuda" or amp is not None:
        return True, ""
    if device.type != "cpu":
        return False, ""
    r = probe if probe is not None else probe_bf16()
    chosen = r.nhwc_speedup >= NHWC_MIN_SPEEDUP
    return chosen, (f"layout {'channels_last' if chosen else 'NCHW'}: a small UNet's fp32 step measured "
                    f"{r.nhwc_speedup:.2f}x in channels_last on this CPU (needs {NHWC_MIN_SPEEDUP:.2f}x)")


def use_channels_last(setting: bool | None, device: torch.device, amp: torch.dtype | None) -> bool:
    """choose_layout's choice alone."""
    return choose_layout(setting, device, amp)[0]


def auto_choice(device: torch.device) -> tuple[PrecisionChoice, ProbeResult | None, bool]:
    """What ``--precision auto`` and the default layout choose on ``device``, and the CPU probe they
    read (read once: on a busy machine, where it is not cached, each read measures again); for
    ``diffuse info``. On an AMX CPU the precision needs no probe; it is read anyway, to show."""
    choice = choose_precision("auto", device)
    r = choice.probe
    if r is None and device.type == "cpu":
        r = probe_bf16()
    return choice, r, choose_layout(None, device, choice.dtype, r)[0]


def info_lines(device: torch.device) -> list[str]:
    """What ``diffuse info`` prints about the machine: device, precision choice, measured rates."""
    lines = [f"torch        {torch.__version__}, {torch.get_num_threads()} threads"]
    if device.type == "cuda":
        lines.append(f"device       cuda: {torch.cuda.get_device_name(device)} "
                     f"(capability {'.'.join(map(str, torch.cuda.get_device_capability(device)))})")
    lines.append(f"cpu          {cpu_model()} (AMX {'yes' if cpu_has_amx() else 'no'}, "
                 f"AVX512-BF16 {'yes' if cpu_has_avx512_bf16() else 'no'})")
    choice, r, cl = auto_choice(device)
    lines.append(f"auto choice  {device.type} {choice.name}{' channels_last' if cl else ''}: {choice.reason}")
    if r is not None:
        lines.append(f"cpu probe    matmul {MATMUL_N}^2: fp32 {r.matmul_fp32:.0f}, bf16 {r.matmul_bf16:.0f} GFLOP/s; "
                     f"conv3x3 fwd+bwd {'x'.join(map(str, CONV_SHAPE))} NHWC: fp32 {r.conv_fp32:.0f}, bf16 {r.conv_bf16:.0f} "
                     f"GFLOP/s; fp32 UNet step (0.29M, batch {LAYOUT_BATCH}): NCHW {r.unet_nchw:.1f}, NHWC "
                     f"{r.unet_nhwc:.1f} steps/s (cached in {probe_cache_file()})")
    return lines


def sampling_precision(flag: str, device: torch.device, trained: str | None = None) -> PrecisionChoice:
    """Precision for sample / eval / visualize. ``auto`` on CUDA is the run's training precision
    (``trained``: its config's auto | fp32 | bf16, resolved on this device), so a model trained in
    bf16 samples in bf16; on the CPU ``auto`` is the measured rule of ``choose_precision``."""
    if flag == "auto" and device.type == "cuda" and trained in ("fp32", "bf16"):
        c = choose_precision(trained, device)
        return PrecisionChoice(c.dtype, f"the run's training precision ({trained})")
    return choose_precision(flag, device)


def prepare_for_inference(net: torch.nn.Module, device: torch.device, amp: torch.dtype | None) -> torch.nn.Module:
    """channels_last weights where that layout is faster (CUDA; bf16 on the CPU): convolutions on a
    channels_last weight return channels_last activations, so the whole network runs NHWC."""
    if use_channels_last(None, device, amp):
        net.to(memory_format=torch.channels_last)
    return net


# ----------------------------------------------------------------------------------------------
# Host-device syncs

class HostSyncCheck:
    """Records the operations that would make the host wait for a GPU, on any device (the CPU too).

    A GPU runs ahead of the Python loop only while nothing reads a device value back. The reads:
    ``_local_scalar_dense`` (``.item()``, ``float(t)``, ``bool(t)``, ``if t:``) and ops whose output
    shape depends on the data (``nonzero``, ``masked_select``, ``unique``, boolean indexing...).
    Which tensors are "on the device" is tracked by taint: the ``device_tensors`` given (the model's
    parameters, the data, the noise) and everything computed from them, so a scalar read from the
    CPU-side sigma array is not counted, while one from the loss is. Use as a context manager; the
    ``syncs`` list names each offending op. On CUDA, ``torch.cuda.set_sync_debug_mode("error")``
    is the ground truth (tests/test_cuda.py); this check lets CPU-only CI hold the same line.
    """

    SYNC_OPS = ("_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique", "_unique2",
                "unique_consecutive", "unique_dim", "equal", "is_nonzero", "repeat_interleave", "masked_scatter",
                "nonzero_static", "argwhere")

    def __init__(self, device_tensors):
        import weakref

        from torch.utils._python_dispatch import TorchDispatchMode

        self._refs: dict[int, Any] = {}
        self.syncs: list[str] = []
        check = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                ins = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
                tainted = any(check._has(a) for a in ins)
                name = func.overloadpacket.__name__
                if tainted and name in HostSyncCheck.SYNC_OPS:
                    check.syncs.append(name)
                out = func(*args, **kwargs)
                if tainted:
                    for o in torch.utils._pytree.tree_leaves(out):
                        if isinstance(o, torch.Tensor):
                            check._add(o)
                return out

        self._weakref = weakref
        self._mode = _Mode()
        for t in device_tensors:
            self._add(t)

    def _add(self, t: torch.Tensor) -> None:
        self._refs[id(t)] = self._weakref.ref(t)

    def _has(self, t: torch.Tensor) -> bool:
        ref = self._refs.get(id(t))
        return ref is not None and ref() is t

    def __enter__(self) -> "HostSyncCheck":
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)
