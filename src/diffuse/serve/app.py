"""The HTTP side of ``diffuse serve``: a FastAPI app over loaded models and their device workers.

Endpoints (the OpenAPI schema is at /openapi.json; FastAPI's /docs page is off, it loads Swagger UI
from a CDN and this server works offline):
    GET    /                        the page (static/index.html; no external fonts, scripts or CDNs)
    GET    /healthz                 liveness; never waits on generation
    GET    /api/models              models (config, classes), samplers, limits, defaults
    POST   /api/generate            run a request and return a PNG grid or JSON (one PNG per image)
    POST   /api/jobs                queue a request, return its id at once (202)
    GET    /api/jobs/{id}           state, queue position, step i of N
    GET    /api/jobs/{id}/events    the same as server-sent events, with x0 previews
    GET    /api/jobs/{id}/result    the finished images (PNG grid or JSON)
    DELETE /api/jobs/{id}           cancel a queued or running job

Safety for a server on the user's machine (guard.py): requests must name this server in Host, a
foreign Origin is refused, bodies are capped, and with a token every /api call needs it.
"""

# No `from __future__ import annotations`: FastAPI must see the request model built in create_app.
import asyncio
import base64
import json
import time
from dataclasses import dataclass
from importlib import resources
from typing import Annotated, Any, Literal

import torch
from fastapi import Body, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field

from ..generate import Loaded, cycle_labels, settle
from ..images import grid_image, png_bytes, to_pil
from ..objectives import DEFAULT_VP_SAMPLER
from ..samplers import ALL_SAMPLERS, ETA_SAMPLERS, SPACINGS, eta_of
from ..sampling import SamplingSpec, SpecError
from .guard import Guard
from .jobs import TERMINAL, Job, QueueFull, Settings, Worker, new_job_id

SEED_MAX = 2**63 - 1
Name = Annotated[str, Field(min_length=1, max_length=100)]
KEEP_FINISHED = 64          # finished jobs (with their images) kept for /result, oldest dropped first
STATIC = resources.files("diffuse.serve") / "static"


@dataclass
class Limits:
    max_images: int = 64        # images per request
    max_steps: int = 1000       # NFE per image (also capped by each model's T)
    queue: int = 16             # jobs waiting per device worker; more get 429
    max_body: int = 16384       # request body bytes
    max_guidance: float = 50.0


@dataclass
class Served:
    name: str
    loaded: Loaded
    worker: Worker

    @property
    def max_steps(self) -> int:
        return self.loaded.schedule.timesteps


def _invalid(field: str | list, msg: str) -> HTTPException:
    """A 422 shaped like FastAPI's own validation errors, naming the field."""
    loc = ["body", *field] if isinstance(field, list) else ["body", field]
    return HTTPException(422, detail=[{"loc": loc, "msg": msg, "type": "value_error"}])


def _api_text(e: SpecError, class_cond: bool) -> str:
    """A refusal of the shared check (sampling.SamplingSpec.check) in the API's words: its fields,
    not the CLI's flags."""
    if e.field == "guidance" and "needs" in str(e):
        return "guidance needs a class (class or classes)" if class_cond else "guidance needs a class-conditional model"
    return str(e).replace("--", "")


def request_model(limits: Limits) -> type[BaseModel]:
    """The POST body, with this server's limits in its schema (so /openapi.json states them)."""
    sampler_names = tuple(ALL_SAMPLERS)
    spacing_names = tuple(SPACINGS)

    class GenerateRequest(BaseModel):
        model_config = ConfigDict(extra="forbid", populate_by_name=True)

        model: str | None = Field(None, max_length=100, description="model name from /api/models (default: the first)")
        sampler: Literal[sampler_names] = Field(DEFAULT_VP_SAMPLER, description="sampler, as `diffuse sample --sampler`")
        steps: int = Field(min(20, limits.max_steps), ge=1, le=limits.max_steps,
                           description="network evaluations per image (also at most the model's T)")
        spacing: Literal[spacing_names] | None = Field(None, description="noise levels (default: the sampler's)")
        n: int = Field(min(16, limits.max_images), ge=1, le=limits.max_images, description="number of images")
        seed: int = Field(0, ge=0, le=SEED_MAX, description="image i uses noise stream (seed, first_index + i)")
        first_index: int = Field(0, ge=0, le=2**31, description="index of the first image in the seed's sequence")
        class_: int | Name | None = Field(None, alias="class",
                                         description="class-conditional models: a class index, a name, or 'all' "
                                                     "(image i gets class i mod K)")
        classes: list[int | Name] | None = Field(None, min_length=1, max_length=limits.max_images,
                                                description="several classes, image i gets classes[i mod len]")
        guidance: float | None = Field(None, ge=0, le=limits.max_guidance, allow_inf_nan=False,
                                       description="classifier-free guidance w (needs a class; default: the run's)")
        eta: float | None = Field(None, ge=0, le=max(top for _, top, _ in ETA_SAMPLERS.values()), allow_inf_nan=False,
                                   description="sampler noise, " + "; ".join(
                                       f"{k}: 0..{top:g}, default {d:g} ({what})"
                                       for k, (d, top, what) in ETA_SAMPLERS.items()))
        clip: bool = Field(True, description="clamp predicted x0 to [-1, 1] at each step")
        format: Literal["png", "json"] | None = Field(
            None, description="png: one grid image; json: one base64 PNG per image. Default: by the Accept header")

    return GenerateRequest


class ServeApp:
    """Models by name, their workers, and the jobs they run. Used from the event loop only (every
    endpoint that touches it is async), so ``jobs`` needs no lock of its own."""

    def __init__(self, served: dict[str, Served], limits: Limits):
        self.served, self.limits = served, limits
        self.jobs: dict[str, tuple[Job, Served]] = {}

    def settle(self, req: Any) -> tuple[Served, Settings, Any]:
        """Check a request against its model; returns (model, settings, labels [n] or None) or raises 422."""
        name = req.model or next(iter(self.served))
        if name not in self.served:
            raise _invalid("model", f"unknown model {name!r}; this server has: {', '.join(self.served)}")
        srv = self.served[name]
        loaded = srv.loaded
        if req.steps > srv.max_steps:
            raise _invalid("steps", f"this model allows at most {srv.max_steps} steps (its T)")
        labels = self._labels(req, loaded)
        try:
            spec = settle(loaded, self.spec_of(req), labels is not None)
        except SpecError as e:
            raise _invalid(e.field, _api_text(e, loaded.config.model.class_cond)) from None
        settings = Settings(name, spec.sampler, spec.steps, spec.spacing, spec.eta, spec.guidance, labels is not None,
                            spec.clip_x0)
        return srv, settings, labels

    @staticmethod
    def spec_of(req: Any) -> SamplingSpec:
        """The request's sampling settings (its seed is per job: jobs that differ only by seed share a batch)."""
        return SamplingSpec(req.sampler, req.steps, req.spacing, req.eta, req.guidance, bool(req.clip), req.seed)

    @staticmethod
    def _labels(req: Any, loaded: Loaded):
        if req.class_ is not None and req.classes is not None:
            raise _invalid("classes", "give class or classes, not both")
        specs, field = (req.classes, "classes") if req.classes is not None else (
            None if req.class_ is None else [req.class_], "class")
        if specs is None:
            return None
        names = loaded.class_names
        if not loaded.config.model.class_cond or not names:
            raise _invalid(field, "this model is unconditional (trained without --class-cond)")
        if specs == ["all"]:
            return cycle_labels(range(len(names)), req.n)
        out = []
        for i, spec in enumerate(specs):
            loc = [field, i] if field == "classes" else field
            if isinstance(spec, str) and spec in names:
                out.append(names.index(spec))
                continue
            if isinstance(spec, str) and spec.isascii() and spec.isdigit():   # not "²", which int() refuses
                spec = int(spec)
            if isinstance(spec, bool) or not isinstance(spec, int):
                raise _invalid(loc, f"unknown class {spec!r}; this model's classes are: {', '.join(names)}")
            if not 0 <= spec < len(names):
                raise _invalid(loc, f"class {spec} is out of range: this model has classes 0..{len(names) - 1}")
            out.append(spec)
        return cycle_labels(out, req.n)

    def submit(self, req: Any) -> Job:
        srv, settings, labels = self.settle(req)
        job = Job(new_job_id(), settings, req.n, req.seed, req.first_index, labels)
        try:
            srv.worker.submit(job)
        except QueueFull as e:
            raise HTTPException(429, detail=str(e), headers={"Retry-After": str(e.retry_after)}) from None
        self.jobs[job.id] = (job, srv)
        self._prune()
        return job

    def _prune(self) -> None:
        finished = [j for j, _ in self.jobs.values() if j.state in TERMINAL]
        for job in sorted(finished, key=lambda j: j.finished or 0)[:max(0, len(finished) - KEEP_FINISHED)]:
            del self.jobs[job.id]

    def get(self, job_id: str) -> tuple[Job, Served]:
        if job_id not in self.jobs:
            raise HTTPException(404, detail=f"no job {job_id!r} (unknown, or finished long ago)")
        return self.jobs[job_id]

    def status(self, job: Job, srv: Served) -> dict[str, Any]:
        out = {"id": job.id, "state": job.state, "model": job.settings.model, "n": job.n, "seed": job.seed,
               "first_index": job.first_index, "step": job.step, "total": job.total,
               "position": srv.worker.position(job), "created": job.created, "started": job.started,
               "finished": job.finished, "error": job.error}
        if job.state == "done":
            out["result"] = f"/api/jobs/{job.id}/result"
        return out

    def images_json(self, job: Job, srv: Served) -> dict[str, Any]:
        names = srv.loaded.class_names
        images = []
        for i, img in enumerate(job.images):
            k = int(job.labels[i]) if job.labels is not None else None
            png = png_bytes(to_pil(img.permute(1, 2, 0).numpy()))
            images.append({"index": job.first_index + i, "seed": job.seed, "class": k,
                           "class_name": names[k] if k is not None and names else None,
                           "png": base64.b64encode(png).decode()})
        return {"id": job.id, "model": job.settings.model, **job.record, "images": images}


def _wants_json(fmt: str | None, request: Request) -> bool:
    if fmt:
        return fmt == "json"
    accept = request.headers.get("accept", "")
    return "application/json" in accept and "image/png" not in accept


def _png_response(job: Job) -> Response:
    body = png_bytes(grid_image(job.images))
    return Response(body, media_type="image/png", headers={
        "X-Diffuse-Job": job.id, "X-Diffuse-Seed": str(job.seed),
        "Content-Disposition": f'inline; filename="diffuse-{job.settings.model}-seed{job.seed}.png"'})


PNG_OR_JSON = {200: {"content": {"image/png": {}, "application/json": {}},
                     "description": "a PNG grid, or JSON with one base64 PNG per image"}}
PAGE_HEADERS = {
    # The page loads nothing from elsewhere: everything is served by this package (works offline).
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; connect-src 'self'; "
                               "style-src 'self'; script-src 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}


def create_app(served: dict[str, Served], limits: Limits, *, hosts: set[str] | None, token: str | None = None) -> FastAPI:
    """The ASGI app. ``hosts``: the Host names this server answers to (None: any, for 0.0.0.0)."""
    state = ServeApp(served, limits)
    app = FastAPI(title="diffuse serve", version="1", docs_url=None, redoc_url=None,
                  description="Generate images from diffuse models. Limits are in GET /api/models.")
    app.state.serve = state
    app.add_exception_handler(RequestValidationError, _invalid_request)
    # Routes are added in the order the schema lists them (the page and /static first).
    _add_page_routes(app)
    _add_info_routes(app, state, auth=token is not None)
    _add_job_routes(app, state, request_model(limits))
    app.add_middleware(Guard, hosts=hosts, token=token, max_body=limits.max_body)
    return app


async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    # FastAPI's default echoes the offending input, which may not be JSON (NaN, bytes): a 500.
    detail = [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
              for e in exc.errors()]
    return JSONResponse({"detail": detail}, status_code=422)


def _add_page_routes(app: FastAPI) -> None:
    """GET / (the page) and /static/ (its script and style), outside the schema."""
    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(str(STATIC / "index.html"), headers=PAGE_HEADERS)

    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")


def _add_info_routes(app: FastAPI, state: ServeApp, *, auth: bool) -> None:
    """GET /healthz and GET /api/models: what this server runs, never waiting on generation."""
    served, limits = state.served, state.limits

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        busy = {str(s.worker.device): len(s.worker.running) > 0 for s in served.values()}
        waiting = {str(s.worker.device): len(s.worker.waiting) for s in served.values()}
        return {"ok": True, "models": list(served), "running": busy, "waiting": waiting}

    @app.get("/api/models")
    async def models() -> dict[str, Any]:
        out = []
        for name, srv in served.items():
            cfg = srv.loaded.config
            m = cfg.model
            own = SamplingSpec().resolved(cfg)          # a distilled run's consistency sampler at its NFE
            out.append({"name": name, "image_size": cfg.written_size, "channels": m.in_channels,
                        "default_sampler": own.sampler, "default_steps": min(own.steps, limits.max_steps),
                        "distilled": cfg.distill.describe() if cfg.distill.method else None,
                        "class_cond": m.class_cond, "classes": srv.loaded.class_names if m.class_cond else None,
                        "default_guidance": cfg.train.sample_guidance, "timesteps": srv.max_steps,
                        "max_steps": min(limits.max_steps, srv.max_steps), "step": srv.loaded.header.get("step"),
                        "device": str(srv.worker.device), "config": cfg.to_dict()})
        return {"models": out,
                "samplers": [{"name": k, "stochastic": v[1], "default_spacing": v[2],
                              "default_eta": eta_of(k, None)} for k, v in ALL_SAMPLERS.items()],
                "spacings": list(SPACINGS),
                "defaults": {"sampler": DEFAULT_VP_SAMPLER, "steps": min(20, limits.max_steps), "n": min(16, limits.max_images)},
                "limits": {"max_images": limits.max_images, "max_steps": limits.max_steps, "queue": limits.queue,
                           "max_body_bytes": limits.max_body, "max_guidance": limits.max_guidance,
                           "auth": auth}}


def _add_job_routes(app: FastAPI, state: ServeApp, GenerateRequest: type[BaseModel]) -> None:
    """POST /api/generate and /api/jobs, then GET|DELETE /api/jobs/{id}, its result and its events."""
    served = state.served

    @app.post("/api/jobs", status_code=202, responses={429: {"description": "queue full; see Retry-After"}})
    async def submit(req: Annotated[GenerateRequest, Body()]) -> dict[str, Any]:
        job = state.submit(req)
        return {**state.status(job, served[job.settings.model]), "events": f"/api/jobs/{job.id}/events"}

    @app.post("/api/generate", responses={**PNG_OR_JSON, 429: {"description": "queue full; see Retry-After"}})
    async def generate(req: Annotated[GenerateRequest, Body()], request: Request) -> Response:
        job = state.submit(req)
        srv = served[job.settings.model]
        while job.state not in TERMINAL:
            if await request.is_disconnected():
                srv.worker.cancel(job)
                break
            await asyncio.sleep(0.02)
        return _result(state, job, srv, _wants_json(req.format, request))

    @app.get("/api/jobs/{job_id}")
    async def job_status(job_id: str) -> dict[str, Any]:
        return state.status(*state.get(job_id))

    @app.delete("/api/jobs/{job_id}")
    async def cancel(job_id: str) -> dict[str, Any]:
        job, srv = state.get(job_id)
        srv.worker.cancel(job)
        return state.status(job, srv)

    @app.get("/api/jobs/{job_id}/result", responses=PNG_OR_JSON)
    async def result(job_id: str, request: Request, format: Literal["png", "json"] | None = None) -> Response:
        job, srv = state.get(job_id)
        return _result(state, job, srv, _wants_json(format, request))

    @app.get("/api/jobs/{job_id}/events", responses={200: {"content": {"text/event-stream": {}}}})
    async def events(job_id: str) -> StreamingResponse:
        job, srv = state.get(job_id)
        return StreamingResponse(_event_stream(job, srv), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})


def _result(state: ServeApp, job: Job, srv: Served, as_json: bool) -> Response:
    if job.state != "done":
        detail = {"state": job.state, "error": job.error,
                  "message": f"job {job.id} is {job.state}" + (f": {job.error}" if job.error else "")}
        # running: not yet (409); cancelled: gone (410); failed: the server's fault, not the input's (500)
        code = {"queued": 409, "running": 409, "cancelled": 410}.get(job.state, 500)
        return JSONResponse(detail, status_code=code)
    if as_json:
        return JSONResponse(state.images_json(job, srv), headers={"X-Diffuse-Job": job.id})
    return _png_response(job)


async def _event_stream(job: Job, srv: Served):
    """queued (position), started, progress (step, total, preview when a new one exists), then
    done | failed | cancelled; a comment line every 10 s keeps proxies from closing the stream."""
    sent, sent_preview, last_position, beat = 0, 0, None, time.monotonic()
    while True:
        new, preview, preview_step, st = srv.worker.snapshot(job, sent)
        for ev in new:
            if ev["event"] == "progress" and preview and preview_step > sent_preview:
                ev = {**ev, "preview": preview}
                sent_preview = preview_step
            yield f"event: {ev['event']}\ndata: {json.dumps(ev)}\n\n"
        sent += len(new)
        if st in TERMINAL and not new:
            return
        if st == "queued":
            pos = srv.worker.position(job)
            if pos is not None and pos != last_position and last_position is not None:
                yield f"event: queued\ndata: {json.dumps({'event': 'queued', 'id': job.id, 'position': pos})}\n\n"
            last_position = pos
        if time.monotonic() - beat > 10:
            beat = time.monotonic()
            yield ": keep-alive\n\n"
        await asyncio.sleep(0.05)


def device_workers(loaded: dict[str, Loaded], amps: dict[str, torch.dtype | None], limits: Limits,
                   preview: bool = True) -> dict[str, Served]:
    """One Worker per device the models live on; each model served under its name."""
    by_device: dict[str, dict[str, Loaded]] = {}
    for name, ld in loaded.items():
        by_device.setdefault(str(next(ld.net.parameters()).device), {})[name] = ld
    served: dict[str, Served] = {}
    for dev, models in by_device.items():
        worker = Worker(torch.device(dev), models, amps=amps, max_queue=limits.queue, max_batch=limits.max_images,
                        preview=preview).start()
        for name, ld in models.items():
            served[name] = Served(name, ld, worker)
    return served
