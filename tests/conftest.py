"""Shared fixtures; S3 is a real S3-compatible server (moto) in its own process on loopback."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import boto3
import pytest
from stack import free_port

# Offline, quiet and isolated before anything imports transformers, MLflow or Prefect.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# Prefect keeps cache records and its ephemeral database under PREFECT_HOME: one private home per session,
# shared with the CLI subprocesses the tests start (so they migrate the database once, not every time).
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="distill-tests-prefect-")

S3_SERVER_START_TIMEOUT_S = 20.0


@dataclass(frozen=True)
class S3Server:
    """Where the test S3 server answers, the credentials to use, and its request log."""

    endpoint_url: str
    access_key: str
    secret_key: str
    log_path: Path


def _wait_until_answering(proc: subprocess.Popen[bytes], url: str, log_path: Path) -> None:
    """Poll url until the server gives any HTTP answer; fail with its log if it dies or stays silent."""
    no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + S3_SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"moto server exited with code {proc.returncode} before answering at {url}; "
                f"its log ({log_path}):\n{log_path.read_text()[-2000:]}"
            )
        try:
            no_proxy.open(url, timeout=1).close()
            return
        except urllib.error.HTTPError:
            return  # an HTTP error status is still an answer
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(
        f"moto server did not answer at {url} within {S3_SERVER_START_TIMEOUT_S:.0f} s; "
        f"its log ({log_path}):\n{log_path.read_text()[-2000:]}"
    )


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """Start `python -m moto.server` on a free loopback port; stop it when the session ends."""
    port = free_port()
    endpoint_url = f"http://127.0.0.1:{port}"
    log_path = tmp_path_factory.mktemp("s3_server") / "moto.log"
    env = {k: v for k, v in os.environ.items() if k != "INITIAL_NO_AUTH_ACTION_COUNT"}  # accept any keys
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        _wait_until_answering(proc, endpoint_url, log_path)
        yield S3Server(endpoint_url, access_key="testing", secret_key="testing", log_path=log_path)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@contextmanager
def _credentials_enforced(endpoint_url: str) -> Iterator[None]:
    """Switch the moto server to checking signatures against its IAM users (moto's reset-auth API)."""

    def set_count(count: str) -> None:
        request = urllib.request.Request(
            f"{endpoint_url}/moto-api/reset-auth",
            data=count.encode(),
            method="POST",
            headers={"Content-Type": "text/plain"},
        )
        urllib.request.build_opener(urllib.request.ProxyHandler({})).open(request, timeout=5).close()

    set_count("0")
    try:
        yield
    finally:
        set_count("inf")


@pytest.fixture
def credentials_enforced(s3_server: S3Server) -> Callable[[], AbstractContextManager[None]]:
    """`with credentials_enforced():` the test S3 server refuses keys that are not its IAM users'."""
    return partial(_credentials_enforced, s3_server.endpoint_url)


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> str:
    """Point the standard AWS_* variables at the test server and return a fresh, empty bucket's name."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint_url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    no_proxy = [os.environ.get("NO_PROXY", ""), "127.0.0.1", "localhost"]  # never send loopback via a proxy
    monkeypatch.setenv("NO_PROXY", ",".join(filter(None, no_proxy)))
    bucket = f"distill-test-{uuid.uuid4().hex[:12]}"
    boto3.client(
        "s3",
        endpoint_url=s3_server.endpoint_url,
        region_name="us-east-1",
        aws_access_key_id=s3_server.access_key,
        aws_secret_access_key=s3_server.secret_key,
    ).create_bucket(Bucket=bucket)
    return bucket


# --- the core's shared real components: a small real dataset, an MLflow SQLite registry, a MiniLM teacher ---

SMALL_ROWS = 300


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory: pytest.TempPathFactory):
    """300 real Rotten Tomatoes reviews, prepared into splits (with one augmented copy for transfer)."""
    from distill_core.data import prepare_dataset
    from distill_core.recipe import DataConfig

    return prepare_dataset(DataConfig(max_rows=SMALL_ROWS, augment_copies=1), tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="session")
def tracking_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A real MLflow tracking and registry store: one SQLite file for the session."""
    root = tmp_path_factory.mktemp("mlflow")
    return f"sqlite:///{root / 'mlflow.db'}"


@pytest.fixture(scope="session")
def registered_teacher(small_dataset, tracking_uri: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """The real MiniLM teacher (a head trained on frozen features), registered as sentiment-teacher v1."""
    from distill_core.model_io import log_teacher
    from distill_core.recipe import TeacherConfig
    from distill_core.teachers import train_teacher

    cfg = TeacherConfig(trainable_layers=0, epochs=3, batch_size=32, lr=0.05)
    teacher = train_teacher(small_dataset, cfg, log=lambda _: None)
    artifacts = tmp_path_factory.mktemp("artifacts").as_uri()
    return log_teacher(
        teacher,
        "sentiment-teacher",
        tracking_uri,
        tags={"distill.dataset_digest": small_dataset.digest},
        artifact_location=artifacts,
    )


@pytest.fixture
def env(tmp_path, tracking_uri, monkeypatch):
    """A fresh DISTILL_HOME and unique registered names on the session's MLflow store."""
    import uuid

    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    monkeypatch.setenv("DISTILL_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("DISTILL_STORE", raising=False)
    monkeypatch.delenv("DISTILL_LEDGER_URI", raising=False)
    monkeypatch.delenv("DISTILL_SEARCH_URI", raising=False)
    suffix = uuid.uuid4().hex[:8]
    return {
        "home": str(tmp_path / "home"),
        "teacher": f"teacher-{suffix}",
        "student": f"student-{suffix}",
        "tmp": tmp_path,
        "tracking_uri": tracking_uri,
    }
