"""The MLflow webhook receiver: a new teacher version starts its distillation at once.

MLflow signs each delivery: header X-MLflow-Signature is "v1," + base64(HMAC-SHA256(secret,
"<delivery id>.<timestamp>.<raw body>")). A delivery with a bad or missing signature, or a timestamp
outside the tolerance, is answered 401 and starts nothing. MLflow retries a delivery it thinks failed, so
the receiver is idempotent twice over: on the delivery id and on the teacher version it triggers (both
recorded in the ledger database, which every process shares). A run that cannot be started (the Prefect
server is down) is answered 503 and forgotten, so MLflow's retry starts it. The watcher stays the safety
net for deliveries that never arrive (MLflow drops them after its retries).
"""

from __future__ import annotations

import base64
import contextvars
import hashlib
import hmac
import json
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from distill_core.registry import Ledger, reconcile

SIGNATURE_HEADER = "X-MLflow-Signature"
TIMESTAMP_HEADER = "X-MLflow-Timestamp"
DELIVERY_HEADER = "X-MLflow-Delivery-Id"
PATH = "/webhooks/mlflow"
TOLERANCE_S = 300  # deliveries older (or newer) than this are refused: a replayed capture is not accepted

log = logging.getLogger("distill.receiver")
Starter = Callable[[str, str], None]  # (teacher name, version): start its distillation


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


@dataclass
class Receiver:
    """What the endpoint does with a delivery; the HTTP server below is only transport."""

    secret: str
    teacher_name: str
    student_name: str
    tracking_uri: str
    ledger: Ledger
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
            event = json.loads(body)
            kind, data = f"{event['entity']}.{event['action']}", event["data"]
            name = str(data["name"])
        except (ValueError, KeyError, TypeError) as err:
            return HTTPStatus.BAD_REQUEST, {"error": f"not an MLflow webhook event: {err}"}
        if not self.ledger.first_time(f"delivery:{delivery_id}"):
            return HTTPStatus.OK, {"status": "duplicate delivery", "delivery_id": delivery_id}
        if kind == "model_version.created" and name == self.teacher_name:
            return self._trigger(delivery_id, name, str(data["version"]))
        if kind.startswith("model_version_alias.") and name == self.student_name:
            recorded = reconcile(MlflowClient(self.tracking_uri), self.ledger, name)
            return HTTPStatus.OK, {"status": "alias history updated", "recorded": recorded}
        return HTTPStatus.OK, {"status": "ignored", "event": kind, "name": name}

    def _trigger(self, delivery_id: str, name: str, version: str) -> tuple[int, dict[str, Any]]:
        """Start the version's run once. Whatever could not be done is forgotten, so MLflow's retry may do it."""
        delivery, trigger = f"delivery:{delivery_id}", f"trigger:{name}/{version}"
        try:
            MlflowClient(self.tracking_uri).get_model_version(name, version)
        except Exception as err:
            self.ledger.forget(delivery)
            if isinstance(err, MlflowException) and err.error_code == "RESOURCE_DOES_NOT_EXIST":
                # a trigger for a version yet to come would block the real one: refuse it
                return HTTPStatus.NOT_FOUND, {"error": f"{name} has no version {version} in the registry"}
            return HTTPStatus.SERVICE_UNAVAILABLE, {"error": f"cannot look up {name}/{version} in MLflow: {err}"}
        if not self.ledger.first_time(trigger):
            return HTTPStatus.OK, {"status": "already triggered", "teacher": f"{name}/{version}"}
        try:
            self.start(name, version)
        except Exception as err:  # Prefect unreachable, say
            self.ledger.forget(delivery, trigger)
            log.exception("could not start the distillation of %s v%s", name, version)
            return HTTPStatus.SERVICE_UNAVAILABLE, {"error": f"could not start {name}/{version}: {err}"}
        return HTTPStatus.ACCEPTED, {"status": "started", "teacher": f"{name}/{version}"}


def serve_http(receiver: Receiver, host: str, port: int) -> ThreadingHTTPServer:
    """An HTTP server for the receiver at POST /webhooks/mlflow (GET /healthz answers 200); call serve_forever."""

    class Handler(BaseHTTPRequestHandler):
        def _answer(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            if self.path == "/healthz":
                self._answer(HTTPStatus.OK, {"status": "ok"})
            else:
                self._answer(HTTPStatus.NOT_FOUND, {"error": f"no {self.path}; POST {PATH}"})

        def do_POST(self) -> None:  # noqa: N802
            if self.path != PATH:
                self._answer(HTTPStatus.NOT_FOUND, {"error": f"no {self.path}; POST {PATH}"})
                return
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            headers = {k.lower(): v for k, v in self.headers.items()}
            self._answer(*receiver.handle(headers, body))

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            log.info("%s %s", self.address_string(), format % args)

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 128  # MLflow delivers from a pool of 10 threads and retries: never reset a burst

    return Server((host, port), Handler)


class BackgroundRuns:
    """Starts each triggered distillation on a worker thread of this process (the `distill serve` way)."""

    def __init__(self, run: Starter, workers: int = 1) -> None:
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="distill-run")
        self._run = run
        self._context = contextvars.copy_context()  # the creator's settings (Prefect's among them) for every run
        self.started: list[tuple[str, str]] = []
        self._lock = threading.Lock()

    def __call__(self, name: str, version: str) -> None:
        with self._lock:
            self.started.append((name, version))
        self._pool.submit(self._context.copy().run, self._logged, name, version)

    def _logged(self, name: str, version: str) -> None:
        try:
            self._run(name, version)
        except Exception:  # the ledger already says failed, with the reason
            log.exception("distillation of %s v%s failed", name, version)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)
