"""``diffuse serve``: an HTTP API and a page for trained models, over ``diffuse.generate``.

jobs.py holds the device workers and their queue, app.py the FastAPI endpoints, guard.py the
Host/Origin/token/body checks, static/ the page. Importing this package needs FastAPI (the
``serve`` extra); the CLI checks for it first and says so in one line.
"""

from __future__ import annotations

import os
import re
import socket
import sys
from pathlib import Path

from ..errors import DiffuseError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def model_names(runs: list[str]) -> list[tuple[str, str]]:
    """RUN or NAME=RUN -> (name, path): a run's name is its directory's (or file's stem), made unique."""
    out: list[tuple[str, str]] = []
    for spec in runs:
        name, sep, path = spec.partition("=")
        if not sep or not NAME_RE.match(name):
            name, path = "", spec
        if not name:
            p = Path(path.rstrip("/"))
            if p.parent.name == "checkpoints":          # runs/x/checkpoints/step_N -> x-step_N
                name = f"{p.parent.parent.name}-{p.name}"
            else:
                name = p.stem if p.suffix == ".safetensors" else p.name
            name = re.sub(r"[^A-Za-z0-9._-]", "-", name).strip("-.") or "model"
        base, k = name, 2
        while name in {n for n, _ in out}:
            name, k = f"{base}-{k}", k + 1
        out.append((name, path))
    return out


def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise DiffuseError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def serve(runs: list[str], *, host: str = "127.0.0.1", port: int = 8000, max_images: int = 64,
          max_steps: int = 1000, queue: int = 16, token: str | None = None, device: str = "auto",
          precision: str = "auto", preview: bool = True) -> int:
    """Load every run once, start one worker per device, serve until interrupted."""
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        raise DiffuseError("diffuse serve needs FastAPI and uvicorn: pip install 'diffuse[serve]'") from None

    from ..generate import load
    from ..threads import busy_note
    from ..device import configure, pick_device, prepare_for_inference, sampling_precision
    from .app import Limits, create_app, device_workers
    from .guard import allowed_hosts

    for flag, value in (("--max-images", max_images), ("--max-steps", max_steps), ("--queue", queue)):
        if value < 1:
            raise DiffuseError(f"{flag} must be a positive integer, got {value}")
    if not 0 <= port <= 65535:
        raise DiffuseError(f"--port must be between 0 and 65535, got {port}")
    token = token or os.environ.get("DIFFUSE_SERVE_TOKEN") or None
    busy = busy_note()                             # before our own work adds to the load
    if busy:
        print(f"note: {busy}", file=sys.stderr, flush=True)
    sock = bind_socket(host, port)                 # before loading: a taken port fails at once
    port = sock.getsockname()[1]
    dev = pick_device(device)
    configure(dev)
    loaded, amps = {}, {}
    for name, path in model_names(runs):
        try:
            loaded[name] = load(path, dev)
        except BaseException:
            sock.close()
            raise
        # the rule `diffuse sample` uses, so that the same request gives the same images
        amps[name] = sampling_precision(precision, dev, loaded[name].config.train.precision).dtype
        prepare_for_inference(loaded[name].net, dev, amps[name])
        m, px = loaded[name].config.model, loaded[name].config.written_size
        print(f"loaded {name}: {path} ({m.in_channels}x{px}x{px}, "
              f"{'classes ' + ','.join(loaded[name].class_names) if m.class_cond else 'unconditional'}) on {dev}, "
              f"{'bf16' if amps[name] else 'fp32'}",
              flush=True)
    limits = Limits(max_images=max_images, max_steps=max_steps, queue=queue)
    hosts = allowed_hosts(host, port)
    if hosts is None:
        print(f"warning: --host {host} serves every network this machine is on, and any Host name; "
              "anyone who can reach it can generate" + ("" if token else " (set --token to require a key)"),
              file=sys.stderr, flush=True)
    served = device_workers(loaded, amps, limits, preview=preview)
    app = create_app(served, limits, hosts=hosts, token=token)
    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "localhost") else (f"[{host}]" if ":" in host else host)
    print(f"serving {len(served)} model{'s' if len(served) > 1 else ''} ({', '.join(served)}) at "
          f"http://{shown}:{port}/  (API schema /openapi.json; Ctrl-C stops)", flush=True)
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=3, access_log=False)
    server = uvicorn.Server(config)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass                        # uvicorn re-raises Ctrl-C after its graceful shutdown: the normal stop
    finally:
        for worker in {id(s.worker): s.worker for s in served.values()}.values():
            worker.stop()
        sock.close()
    print("stopped", flush=True)
    return 0
