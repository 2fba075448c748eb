"""Data-parallel runs under ``torchrun``: process-group setup, rank helpers, agreed stops, sharding.

diffuse has no launcher of its own: ``torchrun --nproc-per-node N -m diffuse train|sample|eval``
sets RANK, WORLD_SIZE, LOCAL_RANK and MASTER_ADDR/PORT, and ``init()`` joins the group they
describe (NCCL on CUDA, gloo on CPU). Without those variables every helper here answers as a
world of one, so the rest of the code asks ``is_main()`` and never checks whether it is
distributed.

Conventions:
- Every rank holds the same weights, EMA and optimizer state; only rank 0 writes files.
- Collectives are called by every rank in the same order. Decisions that must be the same on all
  ranks (stop now?) go through ``agree`` (one all-reduce of a flag), so no rank is left waiting.
- Sharded work (sampling, Inception features) splits the global index range [0, n) into
  contiguous blocks after padding n up to a multiple of the world size; the padding images are
  computed (so every rank runs the same collectives) and dropped. Image i is a function of its
  own seed (seed, i), so the set is the same whatever the number of ranks.
- Sums that decide a number reported to the user (FID statistics) are float64 and all-reduced.
"""

from __future__ import annotations

import datetime
import os
import signal
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from .device import PrecisionChoice
from .errors import DiffuseError

# The process-group timeout: a collective that waits longer than this fails with a message
# instead of hanging forever. It must cover the longest stretch one rank can spend away from the
# others (rank 0 writing a sample grid or checkpoint, FID during training at --fid-n); 30 min is
# torch's own default for gloo. DIFFUSE_DIST_TIMEOUT (seconds) overrides it.
DEFAULT_TIMEOUT_S = 1800.0


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def launched() -> bool:
    """True when started by torchrun (or another launcher setting the torch.distributed variables)
    with more than zero ranks, so ``init`` has a group to join."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


def local_rank() -> int:
    return _env_int("LOCAL_RANK", 0) if active() else 0


def is_main() -> bool:
    """The rank that prints, logs and writes files."""
    return rank() == 0


def threads_per_rank() -> int | None:
    """The intra-op thread default under torchrun: OMP_NUM_THREADS (which torchrun sets to 1 unless
    you set it), else this machine's cores shared among its ranks. None outside torchrun (the
    caller's own default applies)."""
    if not launched():
        return None
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) >= 1:
        return int(env)
    from .threads import available_cores
    return max(1, available_cores() // max(1, _env_int("LOCAL_WORLD_SIZE", 1)))


def timeout_s() -> float:
    try:
        return float(os.environ.get("DIFFUSE_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
    except ValueError:
        raise DiffuseError(f"DIFFUSE_DIST_TIMEOUT must be seconds, got {os.environ['DIFFUSE_DIST_TIMEOUT']!r}") from None


def init(device_flag: str = "auto") -> torch.device | None:
    """Join the torchrun process group if launched under torchrun; returns this rank's device
    (cuda:LOCAL_RANK on GPUs) or None when not distributed. Safe to call twice."""
    if not launched():
        return None
    use_cuda = device_flag.startswith("cuda") or (device_flag == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise DiffuseError("--device cuda asked for, but no CUDA GPU is available (use --device cpu)")
    device = torch.device("cuda", _env_int("LOCAL_RANK", 0)) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if not active():
        kw = {"device_id": device} if use_cuda else {}
        dist.init_process_group("nccl" if use_cuda else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_s()), **kw)
        _control_group()                                    # collective: every rank, now
    return device


def shutdown() -> None:
    if active():
        _CONTROL.clear()
        dist.destroy_process_group()


def barrier() -> None:
    if active():
        dist.barrier()


def _comm_device() -> torch.device:
    """Where collective buffers must live: CUDA for NCCL, CPU for gloo."""
    return torch.device("cuda", torch.cuda.current_device()) if active() and dist.get_backend() == "nccl" \
        else torch.device("cpu")


# ----------------------------------------------------------------------------------------------
# Agreement

def agree(*flags: bool) -> tuple[bool, ...]:
    """Each flag true on every rank if it is true on any rank: one all-reduce (MAX) of a few ints,
    over the CPU control group (so on GPUs it does not wait for the queued kernels)."""
    return tuple(bool(v) for v in agree_max(*(1.0 if f else 0.0 for f in flags)))


def agree_max(*values: float) -> tuple[float, ...]:
    """Each value's maximum over the ranks (flags as 0/1, a clock's seconds): one all-reduce of
    float64 over the CPU control group."""
    if not active():
        return tuple(float(v) for v in values)
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_control_group())
    return tuple(t.tolist())


def from_rank0(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (a decision one rank measures for all, e.g. the model size
    for a budget): one broadcast of a picklable object over the CPU control group."""
    if not active():
        return value
    box = [value if is_main() else None]
    dist.broadcast_object_list(box, src=0, group=_control_group())
    return box[0]


def agree_precision(choice: PrecisionChoice, flag: str) -> PrecisionChoice:
    """One autocast precision on every rank for ``--precision auto``: each rank's probe measures its
    own cores under its own load and may decide differently, which would make one job's shards
    (training steps or sampled images) differ in precision. bf16 if any rank measured it faster.
    ``choice``: this rank's; returns the agreed one."""
    if not active() or flag != "auto":
        return choice
    (any_bf16,) = agree(choice.name == "bf16")
    if any_bf16 and choice.name != "bf16":
        return PrecisionChoice(torch.bfloat16, "another rank measured bf16 faster")
    return choice


_CONTROL: list = []


def _control_group():
    """A gloo group for host-side flags; with gloo as the main backend, the default group."""
    if dist.get_backend() == "gloo":
        return None
    if not _CONTROL:
        _CONTROL.append(dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s())))
    return _CONTROL[0]


def mean_(t: Tensor) -> Tensor:
    """In-place mean over ranks of a float tensor. gloo has no bf16 reductions, so metrics travel
    as float32 (``t`` keeps its dtype)."""
    if active():
        buf = t.detach().float().to(_comm_device())
        dist.all_reduce(buf)
        t.copy_(buf.div_(world()))
    return t


def check_same(tensors: list[Tensor], what: str) -> None:
    """Raise on every rank if ``tensors`` differ across ranks (float64 checksum, all-gathered):
    run before checkpoints, so a diverged rank is found rather than saved."""
    if not active():
        return
    s = torch.stack([x.detach().double().sum() for x in tensors]).sum()
    a = torch.stack([x.detach().double().abs().sum() for x in tensors]).sum()
    mine = torch.stack([s, a]).to(_comm_device())
    every = [torch.empty_like(mine) for _ in range(world())]
    dist.all_gather(every, mine)
    if any(not torch.equal(e, every[0]) for e in every):
        raise DiffuseError(f"ranks disagree on the {what} (checksums {[e.tolist() for e in every]}); "
                           f"refusing to save a checkpoint")


class StopSignals:
    """SIGTERM (and, when distributed, SIGINT) set a flag instead of raising.

    In one process Ctrl-C still raises KeyboardInterrupt at once. Under torchrun every rank gets
    the signal at a different point of its step; raising there would leave the others waiting in
    a collective, so the flag is read at the end of each step and the stop agreed (``agree``)."""

    def __init__(self):
        self.signum: int | None = None
        self._old: dict[int, object] = {}

    def _set(self, signum, frame) -> None:
        self.signum = signum

    def _raise(self, signum, frame) -> None:
        raise KeyboardInterrupt

    def __enter__(self) -> "StopSignals":
        if os.name != "posix":
            return self
        handler = self._set if active() else self._raise
        sigs = (signal.SIGTERM, signal.SIGINT) if active() else (signal.SIGTERM,)
        for s in sigs:
            try:
                self._old[s] = signal.signal(s, handler)
            except ValueError:                   # not the main thread: leave signals alone
                pass
        return self

    def __exit__(self, *exc) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)

    @property
    def raised(self) -> bool:
        return self.signum is not None


# ----------------------------------------------------------------------------------------------
# Sharding

def shard(n: int, r: int | None = None, w: int | None = None) -> range:
    """Rank r's block of the padded index range: n rounded up to a multiple of w, split into w
    contiguous equal blocks. Indices >= n are padding (computed, then dropped)."""
    r = rank() if r is None else r
    w = world() if w is None else w
    per = -(-n // w)
    return range(r * per, (r + 1) * per)


def gather_rows(x: Tensor, n: int) -> Tensor:
    """All-gather each rank's equal-length block of rows (``shard`` order) and drop the padding:
    [per, ...] on each rank -> [n, ...] on every rank, on x's device."""
    if not active():
        return x[:n]
    buf = x.contiguous().to(_comm_device())
    parts = [torch.empty_like(buf) for _ in range(world())]
    dist.all_gather(parts, buf)
    return torch.cat(parts)[:n].to(x.device)


def sharded(n: int, work: Callable[[range], Tensor]) -> Tensor:
    """Run ``work`` on this rank's indices of [0, n) (padded) and gather the rows in index order.
    work(indices) -> [len(indices), ...]; every rank gets [n, ...]."""
    return gather_rows(work(shard(n)), n)


def all_reduce_f64(a: np.ndarray) -> np.ndarray:
    """Sum of a float64 array over ranks (gloo and NCCL both reduce float64)."""
    if not active():
        return a
    t = torch.from_numpy(np.ascontiguousarray(a, np.float64)).to(_comm_device())
    dist.all_reduce(t)
    return t.cpu().numpy()


def feature_stats(local: np.ndarray, indices: range, n: int, meta: dict | None = None, keep: int | None = None):
    """``fid.Stats`` of the features of n images held in blocks across ranks.

    local: [len(indices), D] float32, the features of images ``indices`` (padding rows, index >= n,
    are ignored). mu and Sigma are accumulated in float64 in two all-reduced passes (the sum, then
    the centred scatter around the global mean), so they match ``fid.stats_from_features`` on the
    gathered features to float64 rounding of the sums. The KID subsample is the same seeded choice
    of global indices as that function makes; its rows are all-gathered."""
    from . import fid
    keep = fid.KID_KEEP if keep is None else keep
    real = [k for k, i in enumerate(indices) if i < n]
    f = np.asarray(local, np.float32)[real]                         # [n_local, D]
    if n < 2:
        raise DiffuseError(f"statistics need at least 2 images, got {n}")
    d = f.shape[1] if f.ndim == 2 and len(f) else int(np.asarray(local).shape[-1])
    mu = all_reduce_f64(f.sum(0, dtype=np.float64)) / n
    scatter = np.zeros((d, d))
    for start in range(0, len(f), 4096):
        c = f[start:start + 4096].astype(np.float64) - mu
        scatter += c.T @ c
    sigma = all_reduce_f64(scatter) / (n - 1)
    # KID rows: the global indices fid.stats_from_features would keep, gathered from their ranks.
    chosen = np.arange(n) if n <= keep else np.sort(np.random.default_rng(0).choice(n, keep, replace=False))
    mine = np.zeros((len(chosen), d), np.float32)
    lo = indices.start
    owned = (chosen >= lo) & (chosen < min(indices.stop, n))
    mine[owned] = f[chosen[owned] - lo]
    kept = all_reduce_f64(mine.astype(np.float64)).astype(np.float32) if active() else mine
    return fid.Stats(mu, sigma, n, np.ascontiguousarray(kept), dict(meta or {}))


def stats_of_images(images: Tensor, indices: range, n: int, extractor, batch_size: int = 50,
                    progress=False, meta: dict[str, Any] | None = None):
    """fid.Stats of n images held in blocks across ranks (``generate_shard``): each rank runs the
    extractor on its block, the float64 sums are all-reduced. One process: fid.stats_of_images."""
    from . import fid                              # lazy: fid imports the Inception code
    if not active():
        return fid.stats_of_images(images[:n], extractor, batch_size=batch_size, progress=progress, meta=meta)
    feats = extractor.features(images, batch_size=batch_size, progress=progress and is_main())
    return feature_stats(feats, indices, n, {"extractor": extractor.describe(), "n": n, **(meta or {})})


@contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. to fill a cache), then the others, one barrier apart."""
    if not is_main():
        barrier()
    try:
        yield
    finally:
        if is_main():
            barrier()
