"""Fault injection: what the pipeline does when things break under it, and that nothing is lost.

Real processes on loopback, each bounded in time. The receiver is fed hostile HTTP (huge, lying, missing and
slow bodies, oversized and slow headers, signed nonsense) and must answer each at once and keep answering
/healthz; pipeline runs are killed with SIGKILL while they label, train and register, then rerun; the S3 server
is stopped while labels are written; a burst of teacher versions arrives at once.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from stack import (
    NO_PROXY,
    REPO,
    Recorder,
    a_registered_version,
    model_version_created,
    send_delivery,
    serving,
    wait_for,
)
from toy_models import champion_by_the_rule, one_student_recipe, register_toy_teacher

from distill_core.registry import CHAMPION, Ledger, aliases, ledger_entry, teacher_versions
from distill_core.settings import load_settings
from flows.distill import Target
from flows.receiver import MAX_BODY_BYTES, PATH, Receiver, sign

SECRET = "fault-injection-secret"
deliver = partial(send_delivery, secret=SECRET)
HEAD_TIMEOUT_S = BODY_TIMEOUT_S = 1.0  # the receiver's deadlines, short for the test


@pytest.fixture(scope="module")
def teacher_f(tracking_uri: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    return a_registered_version(tracking_uri, "teacher-f", tmp_path_factory.mktemp("teacher-f"))


@pytest.fixture
def receiver(tmp_path: Path, tracking_uri: str, teacher_f: str) -> Iterator[tuple[int, Recorder, Ledger]]:
    runs, ledger = Recorder(), Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    receiver = Receiver(SECRET, tracking_uri, ledger, lambda: [Target("teacher-f", "student-f", "")], runs)
    with serving(receiver, head_timeout_s=HEAD_TIMEOUT_S, body_timeout_s=BODY_TIMEOUT_S) as port:
        wait_for(lambda: _healthy(port), 10, "the receiver to answer")
        yield port, runs, ledger


def _healthy(port: int) -> bool:
    try:
        with NO_PROXY.open(f"http://127.0.0.1:{port}/healthz", timeout=2) as answer:
            return answer.status == 200
    except OSError:
        return False


def _exchange(port: int, *parts: bytes, pause_s: float = 0.0, wait_s: float = 5.0) -> bytes:
    """Send raw bytes (pausing between parts) and return whatever the server answers before it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait_s) as sock:
        try:
            for part in parts:
                sock.sendall(part)
                time.sleep(pause_s)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed before we were done: read its answer
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except (TimeoutError, ConnectionResetError):
            pass
    return answer


def _status(answer: bytes) -> int | None:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else None


def _post_head(length: bytes | None, extra: bytes = b"") -> bytes:
    head = f"POST {PATH} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n".encode() + extra
    if length is not None:
        head += b"Content-Length: " + length + b"\r\n"
    return head + b"\r\n"


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_hostile_http_is_answered_at_once_and_healthz_keeps_answering(receiver) -> None:
    port, runs, _ = receiver
    health: list[float] = []
    stop = threading.Event()

    def probe() -> None:  # /healthz all along, from another client
        while not stop.is_set():
            started = time.monotonic()
            assert _healthy(port)
            health.append(time.monotonic() - started)
            time.sleep(0.05)

    prober = threading.Thread(target=probe, daemon=True)
    prober.start()
    try:
        before = _rss_mb()
        # 400 MB announced, 8 MB sent: refused from the header, without reading (or keeping) the body
        huge = _exchange(port, _post_head(b"400000000"), *([b"x" * (1 << 20)] * 8))
        assert _status(huge) == 413
        assert _rss_mb() - before < 64
        # chunked, no length: read up to the cap, then refused
        chunk = b"%x\r\n%s\r\n" % (256 * 1024, b"y" * 256 * 1024)
        chunked = _exchange(port, _post_head(None, b"Transfer-Encoding: chunked\r\n"), *([chunk] * 6), b"0\r\n\r\n")
        assert _status(chunked) == 413
        assert _status(_exchange(port, _post_head(b"-1"), b"{}")) == 400
        assert _status(_exchange(port, _post_head(b"abc"), b"{}")) == 400
        assert _status(_exchange(port, _post_head(None), b"{}")) == 411
        assert _status(_exchange(port, _post_head(b"2", b"X-Padding: " + b"p" * 64 * 1024 + b"\r\n"), b"{}")) in (
            400,
            431,
        )
        # slow clients: a head that never completes is cut off; a body that drips past its deadline gets 408
        started = time.monotonic()
        slow_head = _exchange(port, b"POST ", b"/webhooks", b"/mlflow HTTP/1.1\r\nHost", pause_s=0.6, wait_s=10)
        assert slow_head == b"" and time.monotonic() - started < HEAD_TIMEOUT_S + 3
        slow_body = _exchange(port, _post_head(b"50"), *([b"{"] * 10), pause_s=0.3, wait_s=10)
        assert _status(slow_body) == 408
        # and the one legitimate delivery among them still starts its run
        assert deliver(f"http://127.0.0.1:{port}{PATH}", model_version_created("teacher-f", "1"))[0] == 202
    finally:
        stop.set()
        prober.join(5)
    assert runs.calls == [("teacher-f", "1")]
    assert len(health) > 20 and max(health) < 1.0, f"/healthz answered {len(health)} times, slowest {max(health):.2f} s"


def test_a_body_at_the_cap_is_still_read(receiver) -> None:
    port, runs, _ = receiver
    event = model_version_created("teacher-f", "1")
    event["data"]["description"] = "d" * (MAX_BODY_BYTES - 200)  # a long description, as a registry allows
    assert deliver(f"http://127.0.0.1:{port}{PATH}", event)[0] == 202 and runs.calls == [("teacher-f", "1")]


@pytest.mark.parametrize(
    "data, problem",
    [
        ({"name": "teacher-f"}, "needs data.version"),
        ({"name": "teacher-f", "version": "abc"}, "got 'abc'"),
        ({"name": "teacher-f", "version": "-3"}, "got '-3'"),
        ({"version": "1"}, "no model 'name'"),
    ],
)
def test_a_signed_malformed_event_is_refused_and_its_delivery_is_not_lost(receiver, data, problem) -> None:
    """400 and nothing recorded: MLflow's (or a fixed sender's) retry of the same delivery id still counts."""
    port, runs, ledger = receiver
    url, delivery_id = f"http://127.0.0.1:{port}{PATH}", str(uuid.uuid4())
    bad = {"entity": "model_version", "action": "created", "timestamp": "now", "data": data}
    status, body = deliver(url, bad, delivery_id=delivery_id)
    assert status == 400 and problem in body["error"] and runs.calls == []
    assert deliver(url, model_version_created("teacher-f", "1"), delivery_id=delivery_id)[0] == 202
    assert runs.calls == [("teacher-f", "1")]


def test_a_non_json_signed_body_is_refused(receiver) -> None:
    port, _, _ = receiver
    body, delivery_id, timestamp = b"\xff\xfe not json", str(uuid.uuid4()), str(int(time.time()))
    headers = {
        "X-MLflow-Delivery-Id": delivery_id,
        "X-MLflow-Timestamp": timestamp,
        "X-MLflow-Signature": sign(SECRET, delivery_id, timestamp, body),
        "Content-Type": "application/json",
    }
    request = urllib.request.Request(f"http://127.0.0.1:{port}{PATH}", data=body, headers=headers, method="POST")
    with pytest.raises(urllib.error.HTTPError) as err:
        NO_PROXY.open(request, timeout=10)
    assert err.value.code == 400 and "not JSON" in json.loads(err.value.read())["error"]


# --- kill -9 while a run labels, trains or registers; then the rerun -----------------------------------------


def _cli(*args: str, env: dict[str, str]) -> list[str]:
    return [sys.executable, "-c", "from flows.cli import main; main()", *args]


def _kill_recipe(tmp_path: Path, student: str, **sections: object) -> Path:
    recipe = {
        "name": "kill",
        "student_registered_name": student,
        "data": {"max_rows": 300, "augment_copies": 1},
        "teacher": {"registered_name": "sentiment-teacher"},  # the session's MiniLM teacher: slow enough to hit
        "soft_labels": {"batch_size": 16, "shard_rows": 16},
        "students": [{"name": "tf", "family": "transformer", "teacher_layers": [0], "embedding_dim": 32, "lr": 3e-4}],
        "train": {"epochs": 1, "batch_size": 16, "checkpoint_every": 5, "eval_every": 10},
        "evaluation": {"latency_samples": 10, "throughput_batch": 8, "hard_label_baseline": False},
        "gates": {"min_retention": 0.1, "max_param_ratio": 10.0},
        **sections,
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _living_group(pgid: int) -> list[int]:
    import psutil

    alive = []
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if os.getpgid(process.pid) == pgid and process.status() != psutil.STATUS_ZOMBIE:
                alive.append(process.pid)
    return alive


def _student_versions(tracking_uri: str, student: str) -> int:
    import sqlalchemy as sa

    with sa.create_engine(tracking_uri).connect() as conn:
        query = sa.text("SELECT count(*) FROM model_versions WHERE name = :name")
        return int(conn.execute(query, {"name": student}).scalar() or 0)


KILL_POINTS = {
    "labeling": lambda home, uri, student: list(home.glob("store/soft_labels/*/transfer-00002.npy")),
    "training": lambda home, uri, student: list(home.glob("runs/*/tf/distilled/last.pt")),
    "registration": lambda home, uri, student: _student_versions(uri, student) > 0,
    # born-again generation 2 (the candidate) checkpointed: generation 1, a finished stage, is behind it
    "a stage": lambda home, uri, student: list(home.glob("runs/*/tf/distilled/last.pt")),
    # the search's second trial (architectures go smallest first, then by name) checkpointed: the first is finished
    "a search": lambda home, uri, student: list(home.glob("runs/*/L1-e32/distilled/last.pt")),
}
SEARCH = {"transformer": {"teacher_layers": [[0], [1]], "embedding_dim": [32], "lr": 3e-4}, "min_steps": 10}
STAGED = {"a stage": {"stages": {"generations": 2}}, "a search": {"students": [], "search": SEARCH}}


@pytest.mark.parametrize(
    "moment",
    [
        pytest.param("labeling", marks=pytest.mark.slow),
        "training",
        pytest.param("registration", marks=pytest.mark.slow),
        pytest.param("a stage", marks=pytest.mark.slow),  # test_modes kills a stage in process in make test
        pytest.param("a search", marks=pytest.mark.slow),  # test_search kills a search in process in make test
    ],
)
def test_a_run_killed_while_it_works_reruns_to_one_student_and_leaves_nothing_that_looks_complete(
    moment, registered_teacher, tracking_uri, tmp_path
) -> None:
    student = f"student-{uuid.uuid4().hex[:8]}"
    home, recipe = tmp_path / "home", _kill_recipe(tmp_path, student, **STAGED.get(moment, {}))
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "DISTILL_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    env.pop("PREFECT_API_URL", None)
    args = ["run", "--teacher", "sentiment-teacher/1", "--recipe", str(recipe)]
    with open(tmp_path / "killed.log", "wb") as log:
        proc = subprocess.Popen(_cli(*args, env=env), cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
    try:
        wait_for(lambda: KILL_POINTS[moment](home, tracking_uri, student) or proc.poll() is not None, 300,
                 f"the run to reach {moment}", every=0.02)  # fmt: skip
        assert proc.poll() is None, f"the run ended before {moment}:\n{(tmp_path / 'killed.log').read_text()[-3000:]}"
        os.kill(proc.pid, signal.SIGKILL)  # the run's process alone, as the OOM killer would
        proc.wait(timeout=30)
        # Prefect's ephemeral API server (its child) goes with it instead of being orphaned
        wait_for(lambda: not _living_group(proc.pid), 20, "the killed run's child processes to end")
    finally:
        if _living_group(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
    client = MlflowClient(tracking_uri)
    for entry in home.glob("store/soft_labels/*"):  # an entry without its manifest is never read as complete
        shards = sorted(p.name for p in entry.iterdir())
        assert "manifest.json" not in shards or moment != "labeling", shards
    version = client.get_model_version("sentiment-teacher", "1")
    assert ledger_entry(client, version, student)["status"] == "running"
    dead_run = ledger_entry(client, version, student)["run_id"]

    refused = subprocess.run(_cli(*args, "--rerun", env=env), cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=300)  # fmt: skip
    assert refused.returncode == 1 and "add --force" in refused.stderr and "Traceback" not in refused.stderr
    rerun = subprocess.run(_cli(*args, "--rerun", "--force", env=env), cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=600)  # fmt: skip
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    result = json.loads(rerun.stdout)
    assert result["status"] in ("succeeded", "rejected")
    assert _student_versions(tracking_uri, student) == 1  # one student, however far the killed run got
    assert client.get_run(dead_run).info.status == "KILLED"
    assert (
        ledger_entry(client, client.get_model_version("sentiment-teacher", "1"), student)["status"] == result["status"]
    )
    (entry,) = home.glob("store/soft_labels/*")
    assert (entry / "manifest.json").is_file()
    if moment == "training":
        assert "resumed from checkpoint at step" in rerun.stderr
    if moment == "a search":  # the finished trial is not trained again; the one it died in resumes
        assert "search: trial 1 (L1-e32) was cut short: trying it again" in rerun.stderr, rerun.stderr[-3000:]
        assert "search: trial 0:" not in rerun.stderr and "resumed from checkpoint at step" in rerun.stderr
    if moment == "a stage":  # the finished generation is reused, the one it died in resumes from its checkpoint
        resumed = [line for line in rerun.stderr.splitlines() if "resumed from checkpoint at step" in line]
        assert len(resumed) == 2 and "(training had finished)" in resumed[0], resumed
        assert "(training had finished)" not in resumed[1], resumed


# --- the S3 server goes away while labels are written --------------------------------------------------------


class CuttableProxy:
    """A TCP forwarder on loopback in front of a server; cut() drops every connection and refuses new ones,
    as a stopped S3 endpoint does."""

    def __init__(self, target_port: int) -> None:
        self.target, self.cut_event = target_port, threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.cut_event.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            with self.lock:  # a connection accepted as cut() runs is closed too, not left hanging
                self.sockets += [client, upstream]
                if self.cut_event.is_set():
                    client.close()
                    upstream.close()
                    return
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        with self.lock:
            self.cut_event.set()
            self.listener.close()
            for s in self.sockets:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                    s.close()


def test_s3_stopping_while_labels_are_written_is_a_named_error_and_leaves_no_manifest(
    s3_server, s3_env, registered_teacher, small_dataset, tracking_uri, monkeypatch
) -> None:
    import boto3

    from distill_core.errors import StoreError
    from distill_core.model_io import load_teacher
    from distill_core.recipe import SoftLabelConfig
    from distill_core.soft_labels import generate_soft_labels
    from distill_core.store import open_store

    proxy = CuttableProxy(int(s3_server.endpoint_url.rsplit(":", 1)[1]))
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.port}")
    direct = boto3.client("s3", endpoint_url=s3_server.endpoint_url, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")  # fmt: skip

    def keys() -> list[str]:
        return [o["Key"] for o in direct.list_objects_v2(Bucket=s3_env, Prefix="labels/").get("Contents", [])]

    def cut_after_two_shards() -> None:
        wait_for(lambda: len(keys()) >= 2, 120, "two shards in S3", every=0.02)
        proxy.cut()

    cutter = threading.Thread(target=cut_after_two_shards, daemon=True)
    cutter.start()
    teacher = load_teacher(*registered_teacher, tracking_uri)
    cfg = SoftLabelConfig(batch_size=16, shard_rows=16)
    with pytest.raises(StoreError, match=rf"cannot reach the S3 endpoint http://127.0.0.1:{proxy.port} while writing"):
        generate_soft_labels(teacher, small_dataset, cfg, open_store(f"s3://{s3_env}/labels"))
    cutter.join(5)
    written = keys()
    assert len(written) >= 2 and not any(k.endswith("manifest.json") for k in written)  # nothing looks complete
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint_url)  # the server is back: label again, completely
    labels = generate_soft_labels(teacher, small_dataset, cfg, open_store(f"s3://{s3_env}/labels"))
    assert not labels.reused and any(k.endswith(f"{labels.key}/manifest.json") for k in keys())


# --- a burst of teacher versions, registered at once -----------------------------------------------------------


@pytest.fixture(scope="module")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


# 30 s a burst; one claim per version stays in CI through test_pipeline's two watchers and a direct run
@pytest.mark.parametrize("burst", [pytest.param(3, marks=pytest.mark.slow), pytest.param(10, marks=pytest.mark.slow)])
def test_a_burst_of_teacher_versions_is_handled_once_each_and_the_champion_is_where_the_rule_puts_it(
    burst, prefect_server, small_dataset, tracking_uri, tmp_path, monkeypatch
) -> None:
    """Two watchers and a run per version started at once, for versions registered together: each version gets
    one run and one student, and the champion is the one that promotion in processing order gives."""
    from concurrent.futures import ThreadPoolExecutor

    from flows.distill import distill_teacher_version, watch_teachers

    suffix = uuid.uuid4().hex[:8]
    teacher, student, home = f"teacher-{suffix}", f"student-{suffix}", str(tmp_path / "home")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(one_student_recipe(teacher, student)))
    env = {"teacher": teacher, "tracking_uri": tracking_uri, "tmp": tmp_path}
    versions = [register_toy_teacher(env, small_dataset, seed=i, epochs=10 + 15 * i) for i in range(burst)]
    calls = [partial(watch_teachers, str(recipe), home) for _ in range(2)]
    calls += [partial(distill_teacher_version, teacher, v, str(recipe), home, "burst") for v in versions]
    with ThreadPoolExecutor(max_workers=len(calls)) as pool:
        list(pool.map(lambda call: call(), calls))
    client = MlflowClient(tracking_uri)
    students = sorted(teacher_versions(client, student), key=lambda v: int(v.version))
    assert sorted(v.tags["distill.teacher_version"] for v in students) == sorted(versions)  # one each
    for v in versions:
        assert ledger_entry(client, client.get_model_version(teacher, v), student)["status"] in (
            "succeeded",
            "rejected",
        )
    ledger = Ledger(load_settings(home).ledger_uri)
    assert aliases(client, student).get(CHAMPION) == champion_by_the_rule(students, ledger)


def test_runs_of_one_student_model_starting_at_once_share_its_experiment(tracking_uri, tmp_path) -> None:
    """The first runs of a student model, started together (a burst, two workers), each find or make its experiment:
    the one that loses the race to create it uses the winner's instead of failing."""
    from concurrent.futures import ThreadPoolExecutor

    from distill_core.recipe import parse_recipe
    from flows.pipeline import experiment

    recipe = parse_recipe(one_student_recipe("teacher-x", f"student-{uuid.uuid4().hex[:8]}"))
    settings = load_settings(tmp_path / "home")
    client, start = MlflowClient(tracking_uri), threading.Barrier(8)

    def make() -> str:
        start.wait()
        return experiment(client, recipe, settings)

    with ThreadPoolExecutor(max_workers=8) as pool:
        ids = list(pool.map(lambda _: make(), range(8)))
    assert len(set(ids)) == 1
    assert client.get_experiment(ids[0]).tags["mlflow.experimentKind"] == "custom_model_development"
