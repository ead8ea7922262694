"""The MLflow webhook receiver: a new teacher version starts its distillation at once.

MLflow signs each delivery: header X-MLflow-Signature is "v1," + base64(HMAC-SHA256(secret,
"<delivery id>.<timestamp>.<raw body>")). A delivery with a bad or missing signature, or a timestamp
outside the tolerance, is answered 401 and starts nothing; a signed one that is not a well-formed MLflow event
is answered 400 and nothing is recorded. MLflow retries a delivery it thinks failed, so the receiver is
idempotent twice over: on the delivery id and on each (teacher version, student model) it triggers (both
recorded in the ledger database, which every process shares). A run that cannot be started (the Prefect server
is down) is answered 503 and forgotten, so MLflow's retry starts it. The watcher stays the safety net for
deliveries that never arrive (MLflow drops them after its retries).

Transport: Starlette on uvicorn (both come with Prefect), not http.server, because a hostile client must not be
able to hold the receiver: asyncio serves thousands of slow connections without a thread each, bodies are
capped and read against a deadline, and a request head that does not arrive in time closes the connection, so
/healthz keeps answering.
"""

from __future__ import annotations

import asyncio
import base64
import contextvars
import hashlib
import hmac
import json
import logging
import queue
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from uvicorn.protocols.http.h11_impl import H11Protocol

from distill_core.errors import redact
from distill_core.registry import Ledger, reconcile
from flows.distill import Target

SIGNATURE_HEADER = "X-MLflow-Signature"
TIMESTAMP_HEADER = "X-MLflow-Timestamp"
DELIVERY_HEADER = "X-MLflow-Delivery-Id"
PATH = "/webhooks/mlflow"
TOLERANCE_S = 300  # deliveries older (or newer) than this are refused: a replayed capture is not accepted
# MLflow's events carry a model name, a version, its source URI, run id, tags and description: a few KB. A
# registry allows long descriptions and many tags, so 1 MiB leaves room; anything larger is not MLflow's.
MAX_BODY_BYTES = 1 << 20
BODY_TIMEOUT_S = 10.0  # the whole body must arrive within this, however slowly it drips
HEAD_TIMEOUT_S = 10.0  # the request line and headers must arrive within this (uvicorn itself has no such limit)
MAX_HEADER_BYTES = 16 * 1024  # a larger request head is answered 431 (or 400 by h11 when it arrives in pieces)
MAX_CONNECTIONS = 1000  # beyond this uvicorn answers 503 at once

log = logging.getLogger("distill.receiver")
Starter = Callable[[Target, str], None]  # (target, teacher version): start its distillation


class SignatureError(Exception):
    """The delivery is not signed by the shared secret, or is stale."""


def sign(secret: str, delivery_id: str, timestamp: str, body: bytes) -> str:
    """MLflow's signature of a delivery."""
    signed = f"{delivery_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(secret.encode(), signed, hashlib.sha256).digest()).decode()


def verify(secret: str, headers: dict[str, str], body: bytes, now: float, tolerance_s: float = TOLERANCE_S) -> str:
    """Return the delivery id of a correctly signed, fresh delivery; else raise SignatureError."""
    delivery_id, timestamp, signature = (
        headers.get(h.lower(), "") for h in (DELIVERY_HEADER, TIMESTAMP_HEADER, SIGNATURE_HEADER)
    )
    if not (delivery_id and timestamp and signature):
        raise SignatureError(f"missing {DELIVERY_HEADER}, {TIMESTAMP_HEADER} or {SIGNATURE_HEADER}")
    try:
        age = abs(now - int(timestamp))
    except ValueError:
        raise SignatureError(f"{TIMESTAMP_HEADER} {timestamp!r} is not a unix time") from None
    if age > tolerance_s:
        raise SignatureError(f"stale delivery: timestamp {timestamp} is {age:.0f} s from now (limit {tolerance_s} s)")
    if not hmac.compare_digest(sign(secret, delivery_id, timestamp, body), signature):
        raise SignatureError("signature does not match the shared secret")
    return delivery_id


@dataclass(frozen=True)
class Event:
    """The parts of an MLflow webhook event the receiver acts on."""

    kind: str  # "<entity>.<action>", e.g. model_version.created
    name: str  # the registered model
    version: str | None  # the version events' (VERSION_EVENTS): a positive integer


# Events about one model version that may make it one a recipe distills: a new version, an alias moved onto it, a
# tag set on it (recipes with `qualify` distill only the versions holding an alias or carrying a tag).
VERSION_EVENTS = ("model_version.created", "model_version_alias.created", "model_version_tag.set")


def parse_event(body: bytes) -> Event:
    """Check that a signed body is an MLflow event with what its kind needs; ValueError says what is missing."""
    try:
        event = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"the body is not JSON: {err}") from None
    if not isinstance(event, dict):
        raise ValueError(f"an event is a JSON object, got {type(event).__name__}")
    entity, action, data = event.get("entity"), event.get("action"), event.get("data")
    if not (isinstance(entity, str) and isinstance(action, str) and isinstance(data, dict)):
        raise ValueError("an MLflow event has string 'entity' and 'action' and an object 'data'")
    name = data.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError("the event's data has no model 'name'")
    kind, version = f"{entity}.{action}", None
    if kind in VERSION_EVENTS:
        raw = data.get("version")
        if isinstance(raw, bool) or not isinstance(raw, str | int) or not str(raw).isdigit() or int(raw) < 1:
            raise ValueError(f"{kind} needs data.version, a positive integer; got {raw!r}")
        version = str(int(raw))
    return Event(kind, name, version)


@dataclass
class Receiver:
    """What the endpoint does with a delivery; the HTTP server below is only transport.

    targets() says which deployments (teacher, student model) exist now: one for the in-process receiver, every
    tagged deployment with `distill serve --deployment auto`.
    """

    secret: str
    tracking_uri: str
    ledger: Ledger
    targets: Callable[[], list[Target]]
    start: Starter
    tolerance_s: float = TOLERANCE_S
    clock: Callable[[], float] = time.time

    def handle(self, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, Any]]:
        try:
            delivery_id = verify(self.secret, headers, body, self.clock(), self.tolerance_s)
        except SignatureError as err:
            log.warning("refused a webhook delivery: %s", err)
            return HTTPStatus.UNAUTHORIZED, {"error": str(err)}
        try:
            event = parse_event(body)
        except ValueError as err:  # nothing recorded: a corrected delivery is not mistaken for a duplicate
            log.warning("refused a signed but malformed delivery %s: %s", delivery_id, err)
            return HTTPStatus.BAD_REQUEST, {"error": f"not an MLflow webhook event: {err}"}
        delivery = f"delivery:{delivery_id}"
        if not self.ledger.first_time(delivery):
            return HTTPStatus.OK, {"status": "duplicate delivery", "delivery_id": delivery_id}
        try:
            targets = self.targets()
        except Exception as err:  # Prefect unreachable: forget the delivery so MLflow's retry finds the deployments
            self.ledger.forget(delivery)
            return HTTPStatus.SERVICE_UNAVAILABLE, {"error": redact(f"cannot list the deployments: {err}")}
        if event.kind in VERSION_EVENTS:
            matching = [t for t in targets if t.teacher == event.name]
            if matching:
                assert event.version is not None
                return self._trigger(delivery, matching, event.name, event.version, event.kind)
        if event.kind.startswith("model_version_alias.") and event.name in {t.student for t in targets}:
            recorded = reconcile(MlflowClient(self.tracking_uri), self.ledger, event.name)
            return HTTPStatus.OK, {"status": "alias history updated", "recorded": recorded}
        return HTTPStatus.OK, {"status": "ignored", "event": event.kind, "name": event.name}

    def _trigger(
        self, delivery: str, targets: list[Target], name: str, version: str, kind: str = VERSION_EVENTS[0]
    ) -> tuple[int, dict[str, Any]]:
        """Start the version's run once per student model and kind of event (a version skipped when it was created
        may qualify when a tag or an alias comes). Whatever could not be done is forgotten, so MLflow's retry may
        do it."""
        try:
            MlflowClient(self.tracking_uri).get_model_version(name, version)
        except Exception as err:
            self.ledger.forget(delivery)
            if isinstance(err, MlflowException) and err.error_code == "RESOURCE_DOES_NOT_EXIST":
                # a trigger for a version yet to come would block the real one: refuse it
                return HTTPStatus.NOT_FOUND, {"error": f"{name} has no version {version} in the registry"}
            return HTTPStatus.SERVICE_UNAVAILABLE, {
                "error": redact(f"cannot look up {name}/{version} in MLflow: {err}")
            }
        started = []
        for target in targets:
            trigger = f"trigger:{name}/{version}/{target.student}" + ("" if kind == VERSION_EVENTS[0] else f"/{kind}")
            if not self.ledger.first_time(trigger):
                continue
            try:
                self.start(target, version)
            except Exception as err:  # Prefect unreachable, say
                self.ledger.forget(delivery, trigger)
                log.exception("could not start the distillation of %s v%s for %s", name, version, target.student)
                return HTTPStatus.SERVICE_UNAVAILABLE, {"error": redact(f"could not start {name}/{version}: {err}")}
            started.append(target.student)
        if not started:
            return HTTPStatus.OK, {"status": "already triggered", "teacher": f"{name}/{version}"}
        return HTTPStatus.ACCEPTED, {"status": "started", "teacher": f"{name}/{version}", "students": started}


def _answer(status: int, body: dict[str, Any]) -> JSONResponse:
    return JSONResponse(body, status_code=status)


async def _read_body(request: Request, timeout_s: float) -> bytes | JSONResponse:
    """The request body, or the answer to a body that is not acceptable: no length (411), a bad or too large one
    (400/413), or one that does not arrive within timeout_s (408)."""
    length = request.headers.get("content-length")
    chunked = "chunked" in request.headers.get("transfer-encoding", "").lower()
    if length is None and not chunked:
        return _answer(HTTPStatus.LENGTH_REQUIRED, {"error": "a Content-Length (or chunked encoding) is required"})
    if length is not None and int(length) > MAX_BODY_BYTES:  # h11 already refused a non-numeric length with 400
        return _answer(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {"error": f"bodies are at most {MAX_BODY_BYTES} bytes"})
    body = bytearray()
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                body += chunk
                if len(body) > MAX_BODY_BYTES:
                    too_large = {"error": f"bodies are at most {MAX_BODY_BYTES} bytes"}
                    return _answer(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, too_large)
    except TimeoutError:
        return _answer(HTTPStatus.REQUEST_TIMEOUT, {"error": f"the body did not arrive within {timeout_s:g} s"})
    return bytes(body)


def create_app(receiver: Receiver, body_timeout_s: float = BODY_TIMEOUT_S) -> Starlette:
    """The receiver as an ASGI app: POST /webhooks/mlflow, GET /healthz."""

    async def webhook(request: Request) -> JSONResponse:
        # h11 limits a head that arrives in pieces; one that arrives whole is measured here
        if sum(len(k) + len(v) for k, v in request.scope["headers"]) > MAX_HEADER_BYTES:
            too_large = {"error": f"request headers are at most {MAX_HEADER_BYTES} bytes"}
            return _answer(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, too_large)
        body = await _read_body(request, body_timeout_s)
        if isinstance(body, JSONResponse):
            return body
        headers = {k.lower(): v for k, v in request.headers.items()}
        return _answer(*await run_in_threadpool(receiver.handle, headers, body))  # MLflow and SQL calls block

    async def healthz(request: Request) -> JSONResponse:
        return _answer(HTTPStatus.OK, {"status": "ok"})

    async def not_found(request: Request, exc: Exception) -> JSONResponse:
        return _answer(HTTPStatus.NOT_FOUND, {"error": f"no {request.url.path}; POST {PATH}"})

    routes = [Route(PATH, webhook, methods=["POST"]), Route("/healthz", healthz, methods=["GET"])]
    return Starlette(routes=routes, exception_handlers={404: not_found})


class _HeadDeadlineH11(H11Protocol):
    """uvicorn's h11 protocol with a deadline on the request head: a client that opens a connection and sends its
    request line and headers slowly (or never) is disconnected after HEAD_TIMEOUT_S. uvicorn's own keep-alive
    timer only runs between requests."""

    head_timeout_s = HEAD_TIMEOUT_S
    _head_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm()  # the next request on a kept-alive connection gets its own deadline

    def connection_lost(self, exc: Exception | None) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
        self._head_deadline = self.loop.call_later(self.head_timeout_s, self._head_too_slow)

    def _head_too_slow(self) -> None:
        waiting_for_head = self.cycle is None or self.cycle.response_complete
        if waiting_for_head and not self.transport.is_closing():
            log.warning("closed a connection from %s: no request head within %g s", self.client, self.head_timeout_s)
            self.transport.close()


class ReceiverServer:
    """The receiver served by uvicorn on host:port (0: any free port, see server_address). serve_forever() runs
    it (in the main thread it stops on SIGINT/SIGTERM after finishing what is in flight); shutdown() stops it."""

    def __init__(
        self,
        receiver: Receiver,
        host: str,
        port: int,
        head_timeout_s: float = HEAD_TIMEOUT_S,
        body_timeout_s: float = BODY_TIMEOUT_S,
    ) -> None:
        import uvicorn

        self.socket = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind((host, port))
        self.socket.listen(256)  # MLflow delivers from a pool of 10 threads and retries: never reset a burst
        self.server_address = self.socket.getsockname()[:2]
        protocol = type("HeadDeadlineH11", (_HeadDeadlineH11,), {"head_timeout_s": head_timeout_s})
        config = uvicorn.Config(
            create_app(receiver, body_timeout_s),
            http=protocol,
            lifespan="off",
            log_level="warning",
            access_log=False,
            timeout_keep_alive=5,
            timeout_graceful_shutdown=5,
            limit_concurrency=MAX_CONNECTIONS,
            h11_max_incomplete_event_size=MAX_HEADER_BYTES,
        )
        self.server = uvicorn.Server(config)
        self._stopped = threading.Event()

    def serve_forever(self) -> None:
        try:
            self.server.run(sockets=[self.socket])
        finally:
            self._stopped.set()

    def shutdown(self, timeout_s: float = 10.0) -> None:
        self.server.should_exit = True
        self._stopped.wait(timeout_s)


def serve_http(receiver: Receiver, host: str, port: int, **timeouts: float) -> ReceiverServer:
    """An HTTP server for the receiver at POST /webhooks/mlflow (GET /healthz answers 200); call serve_forever."""
    return ReceiverServer(receiver, host, port, **timeouts)


class BackgroundRuns:
    """Starts each triggered distillation on a worker thread of this process (the `distill serve` way).

    One daemon thread works through the queue: a shutdown (SIGTERM, Ctrl-C) does not wait for a distillation in
    progress, whose claim then goes stale and is shown so by `distill status`.
    """

    def __init__(self, run: Starter) -> None:
        self._run = run
        self._context = contextvars.copy_context()  # the creator's settings (Prefect's among them) for every run
        self._queue: queue.Queue[tuple[Target, str] | None] = queue.Queue()
        self.started: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._work, name="distill-run", daemon=True)
        self._thread.start()

    def __call__(self, target: Target, version: str) -> None:
        with self._lock:
            self.started.append((target.teacher, version))
        self._queue.put((target, version))

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            target, version = item
            try:
                self._context.copy().run(self._run, target, version)
            except Exception:  # the ledger already says failed, with the reason
                log.exception("distillation of %s v%s failed", target.teacher, version)
            finally:
                self._queue.task_done()

    def shutdown(self, wait: bool = True) -> None:
        """Finish the queued runs (wait) and stop."""
        self._queue.put(None)
        if wait:
            self._thread.join()
