"""Image folders larger than memory: decode once, in parallel, into an on-disk uint8 cache.

Layout (the data convention of ``data.py``, stored): one raw file of uint8 [N, C, S, S] in
[0, 255], row i the i-th readable file of ``imagefiles.scan_folder`` order, read back with ``np.memmap``;
beside it a JSON sidecar (written last, atomically: its presence means the cache is complete)
holding the key, N, the shape, the labels and class names. The key is a digest of the file list
(relative path, size, mtime), the image size and the channel count, so changing any file, the
size or the channels makes a new cache and never reads a stale one.

All ranks on a machine share one cache: the first to take the file lock builds it, the others
wait on the lock and then open the finished file. Pages are shared through the OS page cache,
so N ranks do not hold N copies. Keep ``$DIFFUSE_CACHE`` on a node-local disk (file locks over
network file systems are unreliable).

Interface for ``data.py``: ``load_folder_cached(root, image_size, channels, ...)`` -> (images
uint8 tensor over the memmap, labels, class names, stats), and ``HostBatches`` for gathering a
batch from host memory with pinned-memory copies that overlap compute.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import warnings
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from .errors import DiffuseError
from .fsutil import atomic_write, building
from .imagefiles import decode_file, files_shape, scan_folder

if TYPE_CHECKING:   # torch is imported where used: decode workers start without it (spawn is ~2 s faster)
    import torch
    from torch import Tensor

CACHE_FORMAT = "diffuse-uint8-cache"
CACHE_VERSION = 1
CHUNK = 256                       # files per worker task


def _luma(rgb: np.ndarray) -> np.ndarray:
    """[..., 3, H, W] uint8 -> [..., 1, H, W] uint8, ITU-R 601-2 luma as data._to_channels."""
    w = np.array([0.299, 0.587, 0.114], np.float32).reshape(3, 1, 1)
    return np.clip(np.round((rgb.astype(np.float32) * w).sum(-3, keepdims=True)), 0, 255).astype(np.uint8)


def _decode_chunk(raw: str, shape: tuple[int, ...], files: list[str], start: int, size: int) -> list[int]:
    """Worker: decode files[k] into row start + k of the raw file; returns the unreadable rows."""
    arr = np.memmap(raw, np.uint8, "r+", shape=shape)
    bad = []
    for k, f in enumerate(files):
        got = decode_file(Path(f), size)
        if got is None:
            bad.append(start + k)
            continue
        arr[start + k] = got[0] if shape[1] == 3 else _luma(got[0])
    arr.flush()
    del arr
    return bad


def cache_key(root: Path, files: list[Path], image_size: int, channels: int) -> dict[str, Any]:
    h = hashlib.sha256()
    for p in files:
        st = p.stat()
        h.update(f"{p.relative_to(root).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return {"format": CACHE_FORMAT, "version": CACHE_VERSION, "root": str(root.resolve()), "files": len(files),
            "file_digest": h.hexdigest(), "image_size": image_size, "channels": channels}


def cache_paths(key: dict[str, Any], cache_root: Path) -> tuple[Path, Path]:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(key["root"]).name)[:40]
    base = cache_root / "datacache" / f"{slug}-{key['image_size']}px-c{key['channels']}-{digest}"
    return base.with_suffix(".u8"), base.with_suffix(".json")


def default_workers() -> int:
    return max(1, min(16, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def build(raw: Path, files: list[Path], size: int, channels: int, workers: int,
          progress: Callable[[int], None] | None = None) -> tuple[int, list[int]]:
    """Decode ``files`` into ``raw`` (uint8 [N, C, size, size]) with ``workers`` processes.
    Unreadable files are dropped by moving the later rows down. Returns (rows kept, bad indices)."""
    n = len(files)
    shape = (n, channels, size, size)
    with building(raw) as tmp:
        with open(tmp, "wb") as f:
            f.truncate(int(np.prod(shape)))
        tasks = [(str(tmp), shape, [str(p) for p in files[s:s + CHUNK]], s, size) for s in range(0, n, CHUNK)]
        bad: list[int] = []
        if workers <= 1:
            for t in tasks:
                bad += _decode_chunk(*t)
                if progress:
                    progress(len(t[2]))
        else:
            # spawn, not fork: the parent may hold torch / gloo threads, which fork does not copy safely.
            with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
                futures = [(pool.submit(_decode_chunk, *t), len(t[2])) for t in tasks]
                for fut, count in futures:
                    bad += fut.result()
                    if progress:
                        progress(count)
        bad.sort()
        if bad:
            arr = np.memmap(tmp, np.uint8, "r+", shape=shape)
            keep = np.setdiff1d(np.arange(n), bad)
            for dst, src in enumerate(keep):                 # rare: compact the readable rows in order
                if dst != src:
                    arr[dst] = arr[src]
            arr.flush()
            del arr
    return n - len(bad), bad


def load_folder_cached(root: Path, image_size: int | None, channels: int | None, *, cache_root: Path,
                       workers: int | None = None, log: Callable[[str], None] | None = None
                       ) -> tuple[Tensor, Tensor | None, list[str] | None, dict[str, Any]]:
    """A folder as a memory-mapped uint8 tensor [N, C, S, S], built on first use.

    Returns (images, labels [N] long or None, class names or None, info {path, built, seconds,
    images_per_sec}). Concurrent callers (ranks on one machine) wait for one builder."""
    import fcntl

    if not root.is_dir():
        raise DiffuseError(f"data folder not found: {root}")
    files, classes = scan_folder(root)
    if not files:
        raise DiffuseError(f"no images found under {root}")
    size = image_size or 64
    channels = channels or files_shape(files).channels
    key = cache_key(root, files, size, channels)
    raw, sidecar = cache_paths(key, cache_root)
    raw.parent.mkdir(parents=True, exist_ok=True)
    info: dict[str, Any] = {"path": str(raw), "built": False}
    with open(raw.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)                 # released when the file closes
        meta = _read_sidecar(sidecar, key)
        if meta is None:
            workers = workers or default_workers()
            if log:
                log(f"decoding {len(files):,} images of {root} into {raw} ({workers} worker processes, once)")
            t0 = time.perf_counter()
            n_ok, bad = build(raw, files, size, channels, workers)
            seconds = time.perf_counter() - t0
            if not n_ok:
                raise DiffuseError(f"none of the {len(files)} image files under {root} could be read")
            bad_set = set(bad)
            labels = None
            if classes is not None:
                labels = [classes.index(p.relative_to(root).parts[0]) for i, p in enumerate(files) if i not in bad_set]
            meta = {"key": key, "n": n_ok, "shape": [n_ok, channels, size, size], "labels": labels,
                    "classes": classes, "skipped": len(bad), "decode_seconds": round(seconds, 3),
                    "images_per_sec": round(len(files) / max(seconds, 1e-9), 1)}
            atomic_write(sidecar, json.dumps(meta))
            info.update(built=True)
        info.update(seconds=meta["decode_seconds"], images_per_sec=meta["images_per_sec"])
    if meta["skipped"]:                                 # said on every load, as the in-memory path does
        warnings.warn(f"skipped {meta['skipped']} unreadable image file(s) under {root}", stacklevel=2)
    import torch

    shape = tuple(meta["shape"])
    # copy-on-write ("c"): torch wants a writable buffer; nothing writes, so pages stay shared.
    arr = np.memmap(raw, np.uint8, "c", shape=shape)
    images = torch.from_numpy(arr)
    labels = torch.tensor(meta["labels"], dtype=torch.long) if meta["labels"] is not None else None
    return images, labels, meta["classes"], info


def _read_sidecar(path: Path, key: dict[str, Any]) -> dict[str, Any] | None:
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return meta if meta.get("key") == key else None


def decoded_bytes(n: int, channels: int, size: int) -> int:
    return n * channels * size * size


class HostBatches:
    """Batches gathered from host-resident uint8 images (e.g. a memmap) onto the training device.

    ``get(step, idx, indices_of)`` returns images[idx] on the device and starts gathering the
    next step's rows in a background thread, into pinned memory when the device is a GPU, so
    the page reads and the host-to-device copy overlap the current step's compute."""

    def __init__(self, images: Tensor, device: torch.device):
        self.images = images
        self.device = device
        self.pin = device.type == "cuda"
        self._pool = ThreadPoolExecutor(1)
        self._next: tuple[int, Future] | None = None

    def _gather(self, idx: Tensor) -> Tensor:
        import torch
        idx = idx.cpu()
        order = torch.argsort(idx)                       # read the file in order, then un-sort
        rows = torch.from_numpy(np.asarray(self.images.numpy()[idx[order].numpy()]))
        out = torch.empty_like(rows, pin_memory=self.pin)
        out[order] = rows
        return out

    def get(self, step: int, idx: Tensor, indices_of: Callable[[int], Tensor]) -> Tensor:
        if self._next is not None and self._next[0] == step:
            host = self._next[1].result()
        else:
            host = self._gather(idx)
        self._next = (step + 1, self._pool.submit(self._gather, indices_of(step + 1)))
        return host.to(self.device, non_blocking=self.pin)
