"""The HTTP app of `trackstar view` and `trackstar serve` (Starlette, run by uvicorn).

Routes: the report site under /report/, the retrieval files under /retrievals/ (trackstar.serve.static),
and, with a tracer, GET /api/info and POST /api/trace. Traces run one at a time on a single worker thread
(the model and its gradient hooks are not shared between threads); at most `Limits.queue` wait or run, and
a request beyond that gets 503 at once rather than a thread. Bad requests get a 4xx JSON error naming the
field; an exception while tracing gets a 500 JSON error and the server goes on.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import socket
import webbrowser
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from trackstar.errors import InputError, TrackStarError
from trackstar.serve.static import Shelf, resolve, shelves

if TYPE_CHECKING:
    from trackstar.serve.tracer import TraceRequest, Traced, Tracer

log = logging.getLogger(__name__)

FIELDS = ("prompt", "target", "k", "method")
LOOPBACK_NAMES = ("localhost",)
HEADERS = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY"}


@dataclass(frozen=True)
class Limits:
    """What one request may ask for, and how many traces may wait."""

    body_bytes: int = 64 * 1024  # request body
    chars: int = 8_000  # prompt or target, before tokenizing (tokens are then checked against gradients.max_length)
    k: int = 100  # proponents / opponents per trace
    queue: int = 32  # traces waiting or running; more get 503
    batch: int = 8  # traces the worker takes at once (TrackStar ones share one search)


@dataclass(frozen=True)
class Access:
    """Who may call the API: the token every API request must send (Authorization: Bearer), if any, and the
    Host header names accepted (a loopback server accepts only loopback names: no DNS rebinding)."""

    token: str | None = None
    hosts: tuple[str, ...] = ("*",)


class Refused(Exception):
    """A request answered with a 4xx/5xx JSON error naming the field at fault."""

    def __init__(self, status: int, message: str, field: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.field, self.headers = status, field, headers or {}


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost."""
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def hosts_for(host: str) -> tuple[str, ...]:
    """Host header names a server bound to `host` accepts: loopback names only on loopback, else any."""
    return ("127.0.0.1", "localhost", "::1", host) if is_loopback(host) else ("*",)


def access_for(host: str, token: str | None) -> Access:
    """The API's access rule on `host`: a non-loopback host needs a token (refused otherwise)."""
    if not token and not is_loopback(host):
        raise TrackStarError(f"--host {host} is reachable from other machines: set --token or TRACKSTAR_TOKEN "
                             "(every API request must then send it), or bind 127.0.0.1")
    return Access(token or None, hosts_for(host))


def _error(e: Refused) -> JSONResponse:
    return JSONResponse({"error": str(e), "field": e.field}, e.status, headers={**HEADERS, **e.headers})


def parse_trace(body: bytes, methods: list[str], limits: Limits) -> "TraceRequest":
    """A TraceRequest from a JSON body, or Refused naming the field."""
    from trackstar.serve.tracer import TraceRequest

    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise Refused(400, f"the body is not JSON: {e}", "body") from None
    if not isinstance(obj, dict):
        raise Refused(400, f"the body must be a JSON object, not {type(obj).__name__}", "body")
    for name in obj:
        if name not in FIELDS:
            raise Refused(422, f"unknown field (fields: {', '.join(FIELDS)})", name)
    prompt = _text(obj, "prompt", limits, required=True)
    target = _text(obj, "target", limits, required=False)
    k = obj.get("k", 10)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= limits.k:
        raise Refused(422, f"must be an integer from 1 to {limits.k}, got {json.dumps(k)[:40]}", "k")
    method = obj.get("method", "trackstar")
    if method not in methods:
        raise Refused(422, f"{json.dumps(method)[:40]} is not served here (methods: {', '.join(methods)})", "method")
    return TraceRequest(prompt, target, k, method)


def _text(obj: dict[str, Any], name: str, limits: Limits, required: bool) -> str | None:
    v = obj.get(name)
    if v is None and not required:
        return None  # the model's greedy answer
    if not isinstance(v, str):
        raise Refused(422, "missing" if v is None else f"must be a string, got {type(v).__name__}", name)
    if not v.strip():
        raise Refused(422, "must not be empty" + ("" if required else " (null or absent: the model's greedy answer)"),
                      name)
    if len(v) > limits.chars:
        raise Refused(422, f"{len(v)} characters, more than {limits.chars}", name)
    try:
        v.encode("utf-8")
    except UnicodeEncodeError as e:
        raise Refused(422, f"not valid Unicode (unpaired surrogate at character {e.start})", name) from None
    return v


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused past `limit` bytes whether or not Content-Length announces it."""
    announced = request.headers.get("content-length")
    if announced is not None and (not announced.isdigit() or int(announced) > limit):
        raise Refused(413, f"the body may hold at most {limit} bytes", "body")
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > limit:
            raise Refused(413, f"the body may hold at most {limit} bytes", "body")
    return bytes(data)


class TraceApi:
    """POST /api/trace and GET /api/info over one Tracer, one worker thread and a bounded queue."""

    def __init__(self, tracer: "Tracer", access: Access, limits: Limits):
        self.tracer, self.access, self.limits = tracer, access, limits
        self.pending = 0  # traces queued or running (touched only on the event loop)
        self.waiting: list[tuple["TraceRequest", asyncio.Future]] = []  # queued, not yet taken by the worker
        self.draining = False  # a _drain task is feeding the worker
        self.pool: ThreadPoolExecutor | None = None

    def authorize(self, request: Request) -> None:
        if self.access.token is None:
            return
        sent = request.headers.get("authorization", "")
        if not hmac.compare_digest(sent.encode(), f"Bearer {self.access.token}".encode()):
            raise Refused(401, "this server needs its token: send 'Authorization: Bearer <token>'", "token",
                          {"WWW-Authenticate": "Bearer"})

    async def info(self, request: Request) -> Response:
        try:
            self.authorize(request)
        except Refused as e:
            return _error(e)
        return JSONResponse({"trace": True, **self.tracer.info(), "max_k": self.limits.k},
                            headers={**HEADERS, "Cache-Control": "no-store"})

    async def trace(self, request: Request) -> Response:
        try:
            self.authorize(request)
            if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
                raise Refused(415, "send the request as Content-Type: application/json", "body")
            req = parse_trace(await _read_body(request, self.limits.body_bytes), self.tracer.methods, self.limits)
            if self.pending >= self.limits.queue:
                raise Refused(503, f"busy: {self.pending} traces are queued; retry shortly", None, {"Retry-After": "1"})
            self.pending += 1
            try:
                done = await self._submit(req)
            finally:
                self.pending -= 1
        except Refused as e:
            return _error(e)
        timing = ", ".join(f"{k};dur={1000 * v:.2f}" for k, v in done.seconds.items() if k != "batch")
        if "batch" in done.seconds:
            timing += f", batch;desc={int(done.seconds['batch'])}"
        return JSONResponse(done.record, headers={**HEADERS, "Cache-Control": "no-store", "Server-Timing": timing})

    async def _submit(self, req: "TraceRequest") -> "Traced":
        """Queue a trace and wait for it. The single worker thread takes every trace waiting when it is free
        (up to `Limits.batch`) as one batch: TrackStar traces in a batch share one search."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future = loop.create_future()
        self.waiting.append((req, fut))
        if not self.draining:
            self.draining = True
            loop.create_task(self._drain())
        return await fut

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self.waiting:
                batch, self.waiting = self.waiting[:self.limits.batch], self.waiting[self.limits.batch:]
                try:
                    results = await loop.run_in_executor(self.pool, self._run, [r for r, _ in batch])
                except Exception as e:  # noqa: BLE001 - the worker itself failed: every trace of the batch says so
                    results = [Refused(500, f"the trace failed inside the server: {type(e).__name__}: {e}")] * len(batch)
                for (_, fut), res in zip(batch, results):
                    if fut.done():
                        continue
                    if isinstance(res, BaseException):
                        fut.set_exception(res)
                    else:
                        fut.set_result(res)
        finally:
            self.draining = False

    def _run(self, reqs: list["TraceRequest"]) -> list["Traced | Refused"]:
        """On the worker thread: the token-length checks, then the traces; errors become Refused."""
        out: list["Traced | Refused"] = []
        for req, done in zip(reqs, self.tracer.trace_many(reqs)):
            if isinstance(done, InputError):
                out.append(Refused(422, str(done), done.field))
            elif isinstance(done, Exception):  # a failure inside the model must not take the server down
                log.error("trace failed: %r", req, exc_info=done)
                out.append(Refused(500, f"the trace failed inside the server: {type(done).__name__}: {done}"))
            else:
                out.append(done)
        return out

    @asynccontextmanager
    async def lifespan(self, app: Starlette):
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="trace")
        try:
            yield
        finally:
            self.pool.shutdown(wait=False, cancel_futures=True)


def _static(shelf: Shelf):
    async def endpoint(request: Request) -> Response:
        path = resolve(shelf, request.path_params["path"])
        if path is None:
            return JSONResponse({"error": "not found", "field": None}, 404, headers=HEADERS)
        return FileResponse(path, headers={**HEADERS, "Cache-Control": "no-cache"})
    return endpoint


async def _home(request: Request) -> Response:
    return RedirectResponse("/report/index.html")


async def _no_api_info(request: Request) -> Response:
    """GET /api/info of `trackstar view`: no trace API (answered 200, so the viewer's probe logs no error)."""
    return JSONResponse({"trace": False, "hint": "start `trackstar serve` to trace your own prompts"}, headers=HEADERS)


async def _no_api(request: Request) -> Response:
    return _error(Refused(404, "no trace API here: start one with `trackstar serve`"))


async def _http_error(request: Request, exc: HTTPException) -> Response:
    return _error(Refused(exc.status_code, exc.detail))


def create_app(root: str | Path, tracer: "Tracer | None" = None, access: Access = Access(),
               limits: Limits = Limits()) -> Starlette:
    """The report site and retrieval files of the pipeline at `root`, and the trace API when `tracer` is given."""
    routes = [Route("/", _home)]
    routes += [Route(f"/{s.prefix}/{{path:path}}", _static(s), methods=["GET", "HEAD"]) for s in shelves(root)]
    lifespan = None
    if tracer is not None:
        api = TraceApi(tracer, access, limits)
        routes += [Route("/api/info", api.info, methods=["GET"]), Route("/api/trace", api.trace, methods=["POST"])]
        lifespan = api.lifespan
    else:
        routes += [Route("/api/info", _no_api_info, methods=["GET"]),
                   Route("/api/{rest:path}", _no_api, methods=["GET", "POST"])]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: _http_error},
                    middleware=[Middleware(TrustedHostMiddleware, allowed_hosts=list(access.hosts))])
    app.state.api = api if tracer is not None else None
    return app


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: a free one), or an error naming the address."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise TrackStarError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(128)
    return sock


def uvicorn_server(app: Starlette):
    """The uvicorn server of an app: quiet, keep-alive 5 s, at most 256 connections (more get 503)."""
    import uvicorn

    return uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, timeout_keep_alive=5,
                                         limit_concurrency=256, server_header=False))


def run_server(app: Starlette, host: str, port: int, browser: bool, what: str) -> None:
    """Listen, print the site's address, optionally open a browser, serve until Ctrl-C."""
    sock = listen(host, port)
    name = f"[{host}]" if ":" in host else host
    url = f"http://{name}:{sock.getsockname()[1]}/report/index.html"
    print(f"serving {what} at {url} (Ctrl-C stops)", flush=True)
    if browser:
        webbrowser.open(url)
    uvicorn_server(app).run(sockets=[sock])
