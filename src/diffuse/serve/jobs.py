"""Generation jobs for ``diffuse serve``: one worker thread per device, a bounded queue, batching of
requests with the same settings, progress events and cancel. No sampling code of its own: a batch
is one ``generate.sample_batch`` call.

A job is one request: n images from seed s, image i drawing its start noise and sampler noise from
the stream (s, first_index + i), exactly as ``diffuse sample --seed s`` does (generate.py). Jobs
that wait together with the same model and sampler settings run as one batch, each row still
drawing from its own stream, so batching changes which images share a forward pass, never which
images come out (tests/test_serve_api.py checks both against ``diffuse sample``).

Threads: the worker thread runs torch (which releases the GIL inside its kernels); the web server's
event loop only reads job state under the worker's lock, so /healthz and the page stay responsive
during a long generation.
"""

from __future__ import annotations

import base64
import math
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..generate import Loaded, sample_batch
from ..images import make_grid, png_bytes, to_pil, to_uint8, upscale
from ..rng import ImageNoise
from ..samplers import ALL_SAMPLERS, eta_of, sampler_sigmas

TERMINAL = ("done", "failed", "cancelled")
PREVIEW_PX = 32             # previews: each image average-pooled to at most this many pixels a side
PREVIEW_EVERY_S = 0.25      # and at most this often per batch (a PNG encode per preview)


class QueueFull(Exception):
    def __init__(self, waiting: int, retry_after: int):
        super().__init__(f"the queue is full ({waiting} jobs waiting); retry in {retry_after} s")
        self.retry_after = retry_after


class _Cancelled(Exception):
    """Raised from the sampler callback when every job of the running batch was cancelled."""


@dataclass(frozen=True)
class Settings:
    """Everything jobs must share to run as one batch (seeds, n and labels may differ)."""
    model: str
    sampler: str
    steps: int                  # NFE budget per image, as `diffuse sample --steps`
    spacing: str
    eta: float | None
    guidance: float
    conditional: bool           # labels given (a class-conditional model without them uses the null class)
    clip_x0: bool


@dataclass
class Job:
    id: str
    settings: Settings
    n: int
    seed: int
    first_index: int = 0
    labels: Tensor | None = None            # [n] long, or None (unconditional)
    created: float = field(default_factory=time.time)
    state: str = "queued"                   # queued -> running -> done | failed | cancelled
    step: int = 0                           # denoiser calls done, of `total`
    total: int = 0
    batch_images: int = 0                   # images in the sampling run this job is part of
    images: Tensor | None = None            # uint8 [n, C, H, W] when done
    record: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    started: float | None = None
    finished: float | None = None
    events: list[dict[str, Any]] = field(default_factory=list)   # what /events streams, in order
    preview: str | None = None              # latest x0 preview, a data: URL (PNG)
    preview_step: int = 0
    cancel_requested: threading.Event = field(default_factory=threading.Event)

    @property
    def indices(self) -> range:
        return range(self.first_index, self.first_index + self.n)

    def emit(self, kind: str, **data: Any) -> None:
        self.events.append({"event": kind, "id": self.id, **data})

    def finish(self, state: str, **data: Any) -> bool:
        """Move to a terminal state once; False if the job had already finished."""
        if self.state in TERMINAL:
            return False
        self.state, self.finished = state, time.time()
        self.emit(state, **data)
        return True


def new_job_id() -> str:
    return secrets.token_urlsafe(12)     # unguessable: only the client that submitted can cancel


class ConcatNoise:
    """Several jobs' ImageNoise streams stacked as one batch: rows [0, n_1) come from the first job's
    streams, and so on. The same interface as rng.ImageNoise (randn, randn_like, len)."""

    def __init__(self, parts: list[ImageNoise]):
        self.parts = parts

    def __len__(self) -> int:
        return sum(len(p) for p in self.parts)

    def randn(self, *shape: int) -> Tensor:
        return torch.cat([p.randn(*shape) for p in self.parts])

    def randn_like(self, x: Tensor) -> Tensor:
        if x.shape[0] != len(self):
            raise ValueError(f"batch of {x.shape[0]} does not match {len(self)} noise streams")
        return self.randn(*x.shape[1:]).to(x.dtype)


def preview_url(x0: Tensor, nrow: int | None = None) -> str:
    """x0 estimate [n, C, H, W] in [-1, 1] -> a small PNG grid as a data: URL."""
    if max(x0.shape[-2:]) > PREVIEW_PX:
        x0 = F.adaptive_avg_pool2d(x0.float(), PREVIEW_PX)
    img = to_pil(make_grid(to_uint8(x0), nrow, padding=1))
    return "data:image/png;base64," + base64.b64encode(png_bytes(img)).decode()


class Worker:
    """One thread that runs every job for the models on one device, in order of arrival, with at most
    ``max_queue`` jobs waiting. Waiting jobs with the same Settings as the next one join its batch
    (up to ``max_batch`` images)."""

    def __init__(self, device: torch.device, models: dict[str, Loaded], *,
                 amps: dict[str, torch.dtype | None] | None = None, max_queue: int = 16, max_batch: int = 64,
                 preview: bool = True):
        self.device, self.models, self.amps = device, models, amps or {}     # autocast dtype per model (None: fp32)
        self.max_queue, self.max_batch, self.preview = max_queue, max_batch, preview
        self.lock = threading.Condition()
        self.waiting: list[Job] = []
        self.running: list[Job] = []
        self._stop = False
        self._seconds_per_image: deque[float] = deque(maxlen=32)   # for Retry-After estimates
        self.thread = threading.Thread(target=self._loop, name=f"diffuse-serve-{device}", daemon=True)

    def start(self) -> Worker:
        self.thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        with self.lock:
            self._stop = True
            for job in self.waiting:
                job.finish("cancelled", reason="server shutting down")
            self.waiting.clear()
            for job in self.running:
                job.cancel_requested.set()
            self.lock.notify_all()
        if self.thread.is_alive():
            self.thread.join(timeout)

    # -- client side (called from the event loop) --------------------------------------------------

    def submit(self, job: Job) -> None:
        with self.lock:
            if self._stop:
                raise QueueFull(len(self.waiting), 1)
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(len(self.waiting), self.retry_after())
            job.total = ALL_SAMPLERS[job.settings.sampler][3](job.settings.steps)
            job.emit("queued", position=len(self.waiting) + 1, total=job.total)
            self.waiting.append(job)
            self.lock.notify_all()

    def position(self, job: Job) -> int | None:
        """1 = next to run; None when the job is not waiting."""
        with self.lock:
            try:
                return self.waiting.index(job) + 1
            except ValueError:
                return None

    def cancel(self, job: Job) -> bool:
        """Cancel a waiting or running job; False if it had already finished. A running job's rows are
        dropped; its batch stops at the next denoiser call once every job in it is cancelled."""
        with self.lock:
            job.cancel_requested.set()
            if job in self.waiting:
                self.waiting.remove(job)
            return job.finish("cancelled", step=job.step, total=job.total)

    def retry_after(self) -> int:
        """Seconds until a place in the queue is likely to free up (at least 1)."""
        per_image = sum(self._seconds_per_image) / len(self._seconds_per_image) if self._seconds_per_image else 1.0
        ahead = self.waiting[0].n if self.waiting else 1
        return max(1, math.ceil(per_image * ahead))

    def snapshot(self, job: Job, start: int) -> tuple[list[dict[str, Any]], str | None, int, str]:
        """Events from index ``start``, the latest preview and its step, and the state: one consistent read."""
        with self.lock:
            return job.events[start:], job.preview, job.preview_step, job.state

    # -- worker thread -------------------------------------------------------------------------------

    def _take(self) -> list[Job] | None:
        with self.lock:
            while not self.waiting and not self._stop:
                self.lock.wait()
            if self._stop:
                return None
            head = self.waiting.pop(0)
            batch, count = [head], head.n
            for job in list(self.waiting):
                if job.settings == head.settings and count + job.n <= self.max_batch:
                    self.waiting.remove(job)
                    batch.append(job)
                    count += job.n
            now = time.time()
            for job in batch:
                job.state, job.started, job.batch_images = "running", now, count
                job.emit("started", batch_jobs=len(batch), batch_images=count, total=job.total)
            self.running = batch
            self.lock.notify_all()
            return batch

    def _loop(self) -> None:
        while (batch := self._take()) is not None:
            t0 = time.perf_counter()
            try:
                self._run(batch)
            except _Cancelled:
                with self.lock:
                    for job in batch:
                        job.finish("cancelled", step=job.step, total=job.total)
            except Exception as e:  # noqa: BLE001 - a failed batch must not stop the worker
                message = f"{type(e).__name__}: {e}".splitlines()[0][:300]
                with self.lock:
                    for job in batch:
                        job.error = message
                        job.finish("failed", error=message)
            finally:
                with self.lock:
                    self.running = []
                    n = sum(j.n for j in batch)
                    self._seconds_per_image.append((time.perf_counter() - t0) / max(1, n))
                    self.lock.notify_all()

    def _run(self, batch: list[Job]) -> None:
        s = batch[0].settings
        loaded = self.models[s.model]
        options: dict[str, Any] = {} if s.eta is None else {"eta": s.eta}
        sigmas = sampler_sigmas(s.sampler, loaded.schedule, s.steps, s.spacing)
        noise = ConcatNoise([ImageNoise(j.seed, j.indices, self.device) for j in batch])
        labels = torch.cat([j.labels for j in batch]) if s.conditional else None
        offsets = [0]
        for j in batch:
            offsets.append(offsets[-1] + j.n)
        done_calls, last_preview = 0, 0.0

        def callback(i: int, x: Tensor, x0: Tensor, sigma: float) -> None:
            nonlocal done_calls, last_preview
            done_calls += 1
            live = [k for k, j in enumerate(batch) if not j.cancel_requested.is_set()]
            if not live:
                raise _Cancelled
            now = time.perf_counter()
            previews: dict[int, str] = {}
            if self.preview and (now - last_preview >= PREVIEW_EVERY_S or done_calls == 1):
                last_preview = now
                for k in live:
                    previews[k] = preview_url(x0[offsets[k]:offsets[k + 1]])   # encoded outside the lock
            with self.lock:
                for k in live:
                    job = batch[k]
                    job.step = done_calls
                    if k in previews:
                        job.preview, job.preview_step = previews[k], done_calls
                    job.emit("progress", step=done_calls, total=job.total)

        t0 = time.perf_counter()
        x, den = sample_batch(loaded, s.sampler, sigmas, noise, labels=labels, guidance=s.guidance,
                              clip_x0=s.clip_x0, amp=self.amps.get(s.model), callback=callback, **options)
        seconds = time.perf_counter() - t0
        images = to_uint8(upscale(x, loaded.config.train.output_size))   # uint8 [B, C, H, W] on CPU
        with self.lock:
            for k, job in enumerate(batch):
                if job.state in TERMINAL:
                    continue
                job.images = images[offsets[k]:offsets[k + 1]].clone()
                job.step = job.total
                job.record = {"sampler": s.sampler, "steps": s.steps, "spacing": s.spacing, "nfe": den.nfe,
                              "seed": job.seed, "first_index": job.first_index, "n": job.n,
                              "guidance": s.guidance, "eta": eta_of(s.sampler, s.eta), "clip_x0": s.clip_x0,
                              "batch_images": len(images), "seconds": round(seconds, 3)}
                job.finish("done", step=job.total, total=job.total, seconds=round(seconds, 3))
