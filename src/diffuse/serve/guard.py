"""Request checks for a server on the user's own machine (an ASGI middleware around the app).

A server on 127.0.0.1 is reachable from every web page the user opens: a page can post to it
(cross-site request forgery) or, through DNS rebinding, make the browser treat its own name as this
server's address. So, in this order:

1. Host must be one of the names this server answers to (its own address and port); a rebound
   name (evil.example:8000) is refused. Binding 0.0.0.0 turns this check off, with a warning.
2. A request carrying an Origin other than this server's own (scheme://Host) is refused on every
   /api call and on every method other than GET/HEAD; so is one that the browser marks
   Sec-Fetch-Site cross-site or same-site on /api (that covers <img src> and form GETs, which carry
   no Origin).
3. With a token, every /api call must carry ``Authorization: Bearer TOKEN``, TOKEN as UTF-8 bytes.
4. Bodies over ``max_body`` bytes get 413 before the app reads them.
"""

from __future__ import annotations

import hmac
import json
from typing import Any, Awaitable, Callable

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def allowed_hosts(bind: str, port: int) -> set[str] | None:
    """Host header values a server bound to ``bind``:``port`` answers to; None means any (0.0.0.0, ::)."""
    if bind in ("0.0.0.0", "::", ""):
        return None
    names = set(LOOPBACK) if bind in LOOPBACK else {bind}
    out = set()
    for name in names:
        h = f"[{name}]" if ":" in name else name
        out.add(f"{h}:{port}".lower())
        if port == 80:
            out.add(h.lower())
    return out


class Guard:
    def __init__(self, app, *, hosts: set[str] | None, token: str | None, max_body: int):
        self.app, self.hosts, self.token, self.max_body = app, hosts, token, max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        path, method = scope["path"], scope["method"]
        api = path.startswith("/api/") or path == "/api"
        host = headers.get("host", "").lower()
        if self.hosts is not None and host not in self.hosts:
            return await _error(send, 403, f"Host {host!r} is not this server's; use http://{sorted(self.hosts)[0]}/")
        origin = headers.get("origin")
        if origin is not None and (api or method not in ("GET", "HEAD")):
            if origin.lower() != f"{scope.get('scheme', 'http')}://{host}":
                return await _error(send, 403, f"cross-origin request from {origin!r} refused")
        if api and headers.get("sec-fetch-site") in ("cross-site", "same-site"):
            return await _error(send, 403, "cross-site request refused")
        if api and self.token is not None:
            # compare bytes: the header as sent (latin-1 decoding above maps each byte to one char, so
            # encoding back gives them unchanged) against the token's UTF-8, which a client sends
            given = headers.get("authorization", "").encode("latin-1")
            if not hmac.compare_digest(given, f"Bearer {self.token}".encode("utf-8")):
                return await _error(send, 401, "this server needs 'Authorization: Bearer TOKEN' (diffuse serve --token)",
                                    {"www-authenticate": "Bearer"})
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            return await _error(send, 413, f"request body over {self.max_body} bytes")
        if method in ("GET", "HEAD", "OPTIONS") and length is None:
            await self.app(scope, receive, send)
            return
        # Read the (capped) body here, then replay it to the app; later receive() calls (disconnect
        # checks) go to the server as usual.
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                return await _error(send, 413, f"request body over {self.max_body} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def _error(send: Send, status: int, message: str, extra: dict[str, str] | None = None) -> None:
    body = json.dumps({"detail": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.encode(), v.encode()) for k, v in (extra or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
