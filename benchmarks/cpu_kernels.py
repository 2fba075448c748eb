"""The CPU fast paths in diffuse.models against the torch ops they replace, one shape at a time.

    .venv/bin/python benchmarks/cpu_kernels.py                   # writes benchmarks/results/cpu-kernels.json
    .venv/bin/python benchmarks/cpu_kernels.py --threads 2 --repeats 30

Each row times forward + backward (bf16, channels_last, as under the trainer's autocast) of:
  groupnorm  nn.GroupNorm on bf16 (torch's kernel)  vs  models.GroupNorm32 (fp32 statistics), + SiLU
  dropout    F.dropout (bernoulli_)                 vs  models.Dropout (PCG64 masks)
  attention  F.scaled_dot_product_attention        vs  models.attention (matmuls + fp32 softmax)
and, for the allocator, minor page faults per repeated 8 x 12 MiB allocation round with glibc's
default threshold pinned vs after train.keep_freed_cpu_memory(). Shapes are the ones the
mnist-small and cifar10-ddpm UNets run. Median of --repeats calls after --warmup.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

GN_SHAPES = [((64, 32, 28, 28), 8), ((64, 64, 14, 14), 8), ((8, 128, 32, 32), 32), ((8, 256, 16, 16), 32),
             ((8, 384, 32, 32), 32)]
DROPOUT_SHAPES = [(8, 128, 32, 32), (8, 256, 16, 16)]
ATTN_SHAPES = [(64, 2, 49, 32), (8, 1, 256, 256), (8, 1, 16, 256)]      # batch, heads, tokens, head dim


def median_ms(fn, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def page_faults(mode: str) -> int:
    code = """
import ctypes, resource, sys, torch
from diffuse.train import keep_freed_cpu_memory
if sys.argv[1] == "keep":
    keep_freed_cpu_memory()
else:
    ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)
def step():
    xs = [torch.empty(3 << 20).fill_(1.0) for _ in range(8)]
for _ in range(3):
    step()
r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0) // 10)
"""
    env = {"PYTHONPATH": str(HERE.parent / "src")}
    out = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, check=True, env=env)
    return int(out.stdout.split()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", default=str(HERE / "results" / "cpu-kernels.json"))
    a = p.parse_args(argv)

    import torch
    import torch.nn.functional as F

    from diffuse.models import Dropout, GroupNorm32, attention
    if a.threads:
        torch.set_num_threads(a.threads)
    cl, bf16 = torch.channels_last, torch.bfloat16
    rows = []

    def row(kind, shape, torch_ms, ours_ms):
        rows.append({"kind": kind, "shape": list(shape), "torch_ms": round(torch_ms, 3), "ours_ms": round(ours_ms, 3),
                     "speedup": round(torch_ms / ours_ms, 2)})
        print(f"{kind:10s} {str(shape):22s} torch {torch_ms:7.2f} ms   diffuse {ours_ms:7.2f} ms   "
              f"{torch_ms / ours_ms:5.2f}x", flush=True)

    for shape, groups in GN_SHAPES:
        x = torch.randn(shape, dtype=bf16).contiguous(memory_format=cl).requires_grad_(True)
        grad = torch.randn(shape, dtype=bf16).contiguous(memory_format=cl)
        ref, ours = torch.nn.GroupNorm(groups, shape[1]), GroupNorm32(groups, shape[1])
        t_ref = median_ms(lambda: F.silu(ref(x)).backward(grad), a.warmup, a.repeats)
        t_ours = median_ms(lambda: F.silu(ours(x)).backward(grad), a.warmup, a.repeats)
        row("groupnorm", shape, t_ref, t_ours)

    drop = Dropout(0.1).train()
    for shape in DROPOUT_SHAPES:
        x = torch.randn(shape, dtype=bf16).contiguous(memory_format=cl).requires_grad_(True)
        grad = torch.randn(shape, dtype=bf16).contiguous(memory_format=cl)
        t_ref = median_ms(lambda: F.dropout(x, 0.1, training=True).backward(grad), a.warmup, a.repeats)
        t_ours = median_ms(lambda: drop(x).backward(grad), a.warmup, a.repeats)
        row("dropout", shape, t_ref, t_ours)

    for b, h, n, d in ATTN_SHAPES:
        q, k, v = (torch.randn(b, h, n, d, dtype=bf16, requires_grad=True) for _ in range(3))
        grad = torch.randn(b, h, n, d, dtype=bf16)
        t_ref = median_ms(lambda: F.scaled_dot_product_attention(q, k, v).backward(grad), a.warmup, a.repeats)
        t_ours = median_ms(lambda: attention(q, k, v).backward(grad), a.warmup, a.repeats)
        row("attention", (b, h, n, d), t_ref, t_ours)

    faults = {"glibc_default": page_faults("default"), "keep_freed_cpu_memory": page_faults("keep")}
    print(f"page faults per round of 8 x 12 MiB allocations: default {faults['glibc_default']}, "
          f"keep_freed_cpu_memory {faults['keep_freed_cpu_memory']}")

    result = {"benchmark": "cpu_kernels", "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "torch": torch.__version__, "threads": torch.get_num_threads(), "dtype": "bfloat16, channels_last",
              "timing": f"forward+backward, median of {a.repeats} after {a.warmup} warm-up calls",
              "rows": rows, "page_faults_per_round": faults}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
