"""The webhook receiver over real HTTP: signatures, staleness, duplicate deliveries; then a real `mlflow server`
delivering its own webhooks for a teacher registered through it, which ends in a promoted student."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import pytest
import yaml
from cryptography.fernet import Fernet
from mlflow.tracking import MlflowClient
from stack import (
    NO_PROXY,
    Recorder,
    a_registered_version,
    free_port,
    model_version_created,
    send_delivery,
    serving,
    wait_for,
)
from toy_models import one_student_recipe, register_toy_teacher

from distill_core.registry import CHALLENGER, CHAMPION, OUTSIDE, Ledger, aliases, ledger_entry
from flows.distill import Target
from flows.receiver import PATH, BackgroundRuns, Receiver, serve_http, sign

SECRET = "shared-secret-for-tests"
deliver = partial(send_delivery, secret=SECRET)


def only(teacher: str, student: str):
    """The targets of a receiver that distills one teacher into one student model (one recipe)."""
    return lambda: [Target(teacher, student, "")]


@pytest.fixture(scope="module")
def teacher_a(tracking_uri: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """teacher-a v1 in the registry (the receiver only triggers versions that exist)."""
    return a_registered_version(tracking_uri, "teacher-a", tmp_path_factory.mktemp("teacher-a"))


@pytest.fixture
def endpoint(tmp_path: Path, tracking_uri: str, teacher_a: str) -> Iterator[tuple[str, Recorder]]:
    recorder = Recorder()
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    with serving(Receiver(SECRET, tracking_uri, ledger, only("teacher-a", "student-a"), recorder)) as port:
        yield f"http://127.0.0.1:{port}{PATH}", recorder


def created(name: str = "teacher-a", version: str = "1") -> dict:
    return model_version_created(name, version)


def test_a_signed_delivery_for_the_watched_teacher_starts_its_run(endpoint) -> None:
    url, runs = endpoint
    assert deliver(url, created()) == (202, {"status": "started", "teacher": "teacher-a/1", "students": ["student-a"]})
    assert runs.calls == [("teacher-a", "1")]
    assert deliver(url, created("someone-elses-model"))[1]["status"] == "ignored"
    assert runs.calls == [("teacher-a", "1")]


def test_a_version_the_registry_does_not_have_starts_nothing(endpoint) -> None:
    url, runs = endpoint
    assert deliver(url, created(version="99")) == (404, {"error": "teacher-a has no version 99 in the registry"})
    assert runs.calls == []


@pytest.mark.parametrize("forgery", ["wrong secret", "stale timestamp", "future timestamp", "tampered body"])
def test_a_forged_or_stale_delivery_is_refused_and_starts_nothing(endpoint, forgery: str) -> None:
    url, runs = endpoint
    if forgery == "tampered body":
        body = json.dumps(created()).encode()
        delivery_id, timestamp = str(uuid.uuid4()), str(int(time.time()))
        signature = sign(SECRET, delivery_id, timestamp, body)
        tampered = body.replace(b'"1"', b'"2"')
        headers = {
            "X-MLflow-Delivery-Id": delivery_id,
            "X-MLflow-Timestamp": timestamp,
            "X-MLflow-Signature": signature,
        }
        request = urllib.request.Request(url, data=tampered, headers=headers, method="POST")
        with pytest.raises(urllib.error.HTTPError) as err:
            NO_PROXY.open(request, timeout=10)
        status = err.value.code
    else:
        secret = "not-the-secret" if forgery == "wrong secret" else SECRET
        at = {"stale timestamp": time.time() - 3600, "future timestamp": time.time() + 3600}.get(forgery)
        status, body_out = deliver(url, created(), secret=secret, at=at)
        assert "error" in body_out
    assert status == 401 and runs.calls == []


def test_an_unsigned_post_is_refused(endpoint) -> None:
    url, runs = endpoint
    request = urllib.request.Request(url, data=json.dumps(created()).encode(), method="POST")
    with pytest.raises(urllib.error.HTTPError) as err:
        NO_PROXY.open(request, timeout=10)
    assert err.value.code == 401 and runs.calls == []


def test_twenty_duplicate_deliveries_start_one_run(endpoint) -> None:
    url, runs = endpoint
    delivery_id = str(uuid.uuid4())
    with ThreadPoolExecutor(max_workers=20) as pool:  # MLflow's retries: the same delivery id, at once
        answers = list(pool.map(lambda _: deliver(url, created(), delivery_id=delivery_id), range(20)))
    assert sorted(status for status, _ in answers) == [200] * 19 + [202]
    with ThreadPoolExecutor(max_workers=20) as pool:  # and twenty distinct deliveries of the same version
        answers = list(pool.map(lambda _: deliver(url, created()), range(20)))
    assert {body["status"] for _, body in answers} == {"already triggered"}
    assert runs.calls == [("teacher-a", "1")]


def test_a_run_that_cannot_be_queued_answers_503_and_mlflows_retry_starts_it(
    tmp_path: Path, tracking_uri: str, teacher_a: str
) -> None:
    attempts: list[tuple[str, str]] = []

    def prefect_down_once(target: Target, version: str) -> None:
        attempts.append((target.teacher, version))
        if len(attempts) == 1:
            raise ConnectionError("Prefect API at http://prefect:4200/api is unreachable")

    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    receiver = Receiver(SECRET, tracking_uri, ledger, only("teacher-a", "student-a"), prefect_down_once)
    with serving(receiver) as port:
        url, delivery_id = f"http://127.0.0.1:{port}{PATH}", str(uuid.uuid4())
        status, body = deliver(url, created(), delivery_id=delivery_id)
        assert status == 503 and "unreachable" in body["error"]
        assert deliver(url, created(), delivery_id=delivery_id)[0] == 202  # MLflow's retry: same delivery id
        assert deliver(url, created(), delivery_id=delivery_id)[1]["status"] == "duplicate delivery"
    assert attempts == [("teacher-a", "1"), ("teacher-a", "1")]


# --- a real MLflow server delivering its own webhooks ----------------------------------------------------


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    env = {
        **os.environ,
        "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",  # the receiver is on loopback here; dev-only in MLflow's words
        "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https",
        "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": Fernet.generate_key().decode(),
        "MLFLOW_WEBHOOK_CACHE_TTL": "1",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    with open(root / "server.log", "wb") as log:  # the server keeps its own copy of the descriptor
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "art")],
            stdout=log, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            NO_PROXY.open(f"{url}/health", timeout=1).close()
            break
        except OSError:
            assert proc.poll() is None, (root / "server.log").read_text()[-3000:]
            time.sleep(0.5)
    else:
        raise AssertionError("mlflow server did not start:\n" + (root / "server.log").read_text()[-3000:])
    yield url
    proc.terminate()
    proc.wait(timeout=20)


@pytest.fixture(scope="module")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.mark.slow  # 50 s; test_topology's namesake keeps the real webhook end to end in CI (make test-all runs it)
def test_a_teacher_registered_through_mlflow_becomes_a_promoted_student_through_the_webhook(
    mlflow_server: str, prefect_server, tmp_path: Path, small_dataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flows.distill import distill_teacher_version

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    suffix = uuid.uuid4().hex[:8]
    teacher, student, home = f"teacher-{suffix}", f"student-{suffix}", tmp_path / "home"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(one_student_recipe(teacher, student)))
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    monkeypatch.setenv("DISTILL_LEDGER_URI", f"sqlite:///{tmp_path / 'ledger.db'}")
    runs = BackgroundRuns(
        lambda t, version: distill_teacher_version(t.teacher, version, str(recipe), str(home), "hook")
    )
    receiver = Receiver(SECRET, mlflow_server, ledger, only(teacher, student), runs)
    server = serve_http(receiver, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    client = MlflowClient(mlflow_server)
    hook = client.create_webhook(
        name=f"distill-{suffix}",
        url=f"http://127.0.0.1:{server.server_address[1]}{PATH}",
        events=["model_version.created", "model_version_alias.created"],
        secret=SECRET,
    )
    try:
        time.sleep(1.5)  # MLflow caches its webhook list for MLFLOW_WEBHOOK_CACHE_TTL (1 s here)
        env = {"teacher": teacher, "tracking_uri": mlflow_server, "tmp": tmp_path}
        version = register_toy_teacher(env, small_dataset)
        wait_for(lambda: runs.started, 30, "the webhook to start a run")
        assert runs.started == [(teacher, version)]

        def entry() -> dict[str, str]:
            return ledger_entry(client, client.get_model_version(teacher, version), student)

        wait_for(lambda: entry().get("status") in ("succeeded", "rejected", "failed"), 300, "the run to finish")
        assert entry()["status"] == "succeeded"
        champion = aliases(client, student)[CHAMPION]

        client.set_registered_model_alias(student, CHALLENGER, champion)  # a person, in the MLflow UI
        wait_for(
            lambda: [m for m in ledger.alias_history(student, CHALLENGER) if m["actor"] == OUTSIDE],
            30,
            "the alias event to be recorded",
        )
    finally:
        client.delete_webhook(hook.webhook_id)
        server.shutdown()
        runs.shutdown()


def test_an_alias_moved_or_a_tag_set_onto_a_teacher_version_triggers_it_once_each(endpoint) -> None:
    """Recipes with `qualify` distill the version holding an alias or carrying a tag: those events trigger the
    version as its creation does (the run itself decides whether it qualifies)."""
    url, runs = endpoint
    moved = {"entity": "model_version_alias", "action": "created", "timestamp": "now",
             "data": {"name": "teacher-a", "alias": "production", "version": "1"}}  # fmt: skip
    tagged = {"entity": "model_version_tag", "action": "set", "timestamp": "now",
              "data": {"name": "teacher-a", "version": "1", "key": "distill", "value": "yes"}}  # fmt: skip
    assert deliver(url, created())[0] == 202
    assert deliver(url, moved)[0] == 202 and deliver(url, tagged)[0] == 202
    assert deliver(url, moved)[1]["status"] == "already triggered"
    assert runs.calls == [("teacher-a", "1")] * 3
