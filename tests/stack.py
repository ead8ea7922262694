"""The production topology of infra/ as real processes on loopback: PostgreSQL databases, an S3-compatible
server, `mlflow server` on PostgreSQL with proxied S3 artifacts, `prefect server` on PostgreSQL, the
deployments of infra/prefect.yaml, a process worker and the webhook receiver (`distill serve`).

Used by tests/test_topology.py and benchmarks/run_bench.py. Every process is started here and stopped in
`close()` (its whole process group, so the flow runs a worker started go too); the databases are dropped.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
POSTGRES = os.environ.get("DISTILL_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432")
DISTILL_DEPLOYMENT = "distill-teacher-version/distill-teacher-version"
WATCH_DEPLOYMENT = "watch-teachers/watch-teachers"
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def postgres_missing() -> str | None:
    """Why PostgreSQL cannot be used here, or None when it answers."""
    try:
        import psycopg
    except ImportError as err:
        return f"psycopg is not installed ({err})"
    try:
        psycopg.connect(f"{POSTGRES}/postgres", connect_timeout=3).close()
    except psycopg.OperationalError as err:
        return f"no PostgreSQL at {POSTGRES} (set DISTILL_TEST_POSTGRES): {str(err).strip()}"
    return None


def _admin(*statements: str) -> None:
    import psycopg

    # autocommit: CREATE/DROP DATABASE cannot run in a transaction
    with psycopg.connect(f"{POSTGRES}/postgres", connect_timeout=5, autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement)


def deployments_for(recipe: Path, out: Path) -> Path:
    """infra/prefect.yaml as an operator adapts it to their recipe: the distillation deployment's teacher:/student:
    tags and its DISTILL_RECIPE say the recipe's (the README's "a second recipe: copy this block"), and two
    teacher versions may run at once (the file's "several versions at once")."""
    import yaml

    spec = yaml.safe_load((REPO / "infra" / "prefect.yaml").read_text())
    names = yaml.safe_load(recipe.read_text())
    for deployment in spec["deployments"]:
        if deployment["entrypoint"].endswith(":distill_teacher_version"):
            deployment["tags"] = [
                "distill",
                f"teacher:{names['teacher']['registered_name']}",
                f"student:{names['student_registered_name']}",
            ]
            deployment["work_pool"]["job_variables"]["env"]["DISTILL_RECIPE"] = str(recipe)
            deployment["concurrency_limit"]["limit"] = 2
    out.write_text(yaml.safe_dump(spec, sort_keys=False))
    return out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def model_version_created(name: str, version: str) -> dict[str, Any]:
    """The body MLflow sends for `model_version.created`."""
    return {
        "entity": "model_version",
        "action": "created",
        "timestamp": "now",
        "data": {"name": name, "version": version},
    }


def send_delivery(
    url: str, event: dict[str, Any], secret: str, delivery_id: str | None = None, at: float | None = None
) -> tuple[int, dict[str, Any]]:
    """POST an event to a receiver signed as MLflow signs it; returns (HTTP status, JSON answer)."""
    from flows.receiver import sign

    body = json.dumps(event).encode()
    delivery_id = delivery_id or str(uuid.uuid4())
    timestamp = str(int(at if at is not None else time.time()))
    headers = {
        "Content-Type": "application/json",
        "X-MLflow-Delivery-Id": delivery_id,
        "X-MLflow-Timestamp": timestamp,
        "X-MLflow-Signature": sign(secret, delivery_id, timestamp, body),
    }
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with NO_PROXY.open(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def a_registered_version(tracking_uri: str, name: str, folder: Path) -> str:
    """Version 1 of a registered model with nothing behind it: a receiver only triggers versions that exist."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    client.create_registered_model(name)
    client.create_model_version(name, source=str(folder))
    return name


class Recorder:
    """Stands in for starting a run, to count what a receiver starts: (teacher, version) per call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.lock = threading.Lock()

    def __call__(self, target: Any, version: str) -> None:
        with self.lock:
            self.calls.append((target.teacher, version))


@contextmanager
def serving(receiver: Any, **timeouts: float) -> Iterator[int]:
    """A receiver served on a free loopback port (yielded) on a thread, until the block ends."""
    from flows.receiver import serve_http

    server = serve_http(receiver, "127.0.0.1", 0, **timeouts)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, every: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


class Stack:
    """Start with `Stack(root, recipe).start()`; `close()` stops everything. Attributes hold the URLs."""

    def __init__(self, root: Path, recipe: Path, secret: str, watch_interval: int = 20) -> None:
        self.root, self.recipe, self.secret, self.watch_interval = root, recipe, secret, watch_interval
        self.prefix = f"distill_it_{uuid.uuid4().hex[:8]}"
        self.databases = [f"{self.prefix}_{name}" for name in ("mlflow", "prefect", "distill")]
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.commands: dict[str, tuple[list[str], dict[str, str]]] = {}
        self.ports = {name: str(free_port()) for name in ("s3", "mlflow", "prefect", "receiver", "dask", "dask-http")}
        self.s3_url = f"http://127.0.0.1:{self.ports['s3']}"
        self.mlflow_url = f"http://127.0.0.1:{self.ports['mlflow']}"
        self.prefect_api = f"http://127.0.0.1:{self.ports['prefect']}/api"
        self.receiver_url = f"http://127.0.0.1:{self.ports['receiver']}/webhooks/mlflow"
        self.ledger_uri = f"{POSTGRES}/{self.prefix}_distill"
        s3 = {
            "AWS_ENDPOINT_URL": self.s3_url,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        base = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DISTILL_", "PREFECT_", "AWS_"))}
        no_proxy = ",".join(filter(None, [os.environ.get("NO_PROXY", ""), "127.0.0.1", "localhost"]))
        self.base_env = {
            **base,
            **s3,
            "NO_PROXY": no_proxy,
            "no_proxy": no_proxy,
            "PREFECT_HOME": str(root / "prefect-home"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        }
        # What every process of the pipeline gets (the x-distill-env block of infra/docker-compose.yml).
        self.distill_env = {
            **self.base_env,
            "MLFLOW_TRACKING_URI": self.mlflow_url,
            "PREFECT_API_URL": self.prefect_api,
            "DISTILL_LEDGER_URI": self.ledger_uri,
            "DISTILL_STORE": "s3://distill/soft-labels",
            "DISTILL_RECIPE": str(recipe),
            "DISTILL_HOME": str(root / "distill-home"),
            "DISTILL_WEBHOOK_SECRET": secret,
            "DISTILL_DASK_ADDRESS": f"tcp://127.0.0.1:{self.ports['dask']}",  # soft labels on the Dask worker
            "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": str(REPO / "tests"),  # the test teachers' classes, which the flow unpickles
        }

    # --- processes -------------------------------------------------------------------------------------

    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        self.commands[name] = (argv, env)
        with open(self.root / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True
            )
        self.procs[name] = proc
        return proc

    def restart(self, name: str, health_url: str, down_s: float = 3.0) -> None:
        """Stop one process (SIGTERM to its group), leave it down a moment, start it again as it was started."""
        proc = self.procs[name]
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
        time.sleep(down_s)
        self._spawn(name, *self.commands[name])
        self._wait_healthy(name, health_url, 120)

    def log(self, name: str, tail: int = 4000) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace")[-tail:] if path.exists() else "(no log)"

    def _wait_healthy(self, name: str, url: str, timeout: float) -> None:
        proc = self.procs[name]

        def answers() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.log(name)}")
            try:
                NO_PROXY.open(url, timeout=2).close()
                return True
            except urllib.error.HTTPError:
                return True
            except OSError:
                return False

        try:
            wait_for(answers, timeout, f"{name} at {url}", every=0.3)
        except AssertionError as err:
            raise RuntimeError(f"{err}\n{self.log(name)}") from None

    def _cli(self, *argv: str, env: dict[str, str]) -> str:
        done = subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            output = (done.stdout + done.stderr)[-4000:]
            raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}):\n{output}")
        return done.stdout

    def start(self) -> Stack:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def _start(self) -> None:
        import boto3

        _admin(*(f'CREATE DATABASE "{db}"' for db in self.databases))
        self._spawn(
            "s3", [str(BIN / "python"), "-m", "moto.server", "-H", "127.0.0.1", "-p", self.ports["s3"]], self.base_env
        )
        self._wait_healthy("s3", self.s3_url, 30)
        s3 = boto3.client(
            "s3",
            endpoint_url=self.s3_url,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )
        for bucket in ("mlflow-artifacts", "distill"):
            s3.create_bucket(Bucket=bucket)

        from cryptography.fernet import Fernet

        mlflow_env = {
            **self.base_env,
            "MLFLOW_S3_ENDPOINT_URL": self.s3_url,
            "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": Fernet.generate_key().decode(),
            "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",  # the receiver is on loopback here, as on a compose network
            "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https",
            "MLFLOW_WEBHOOK_CACHE_TTL": "1",
            "MLFLOW_BOTO_CLIENT_ADDRESSING_STYLE": "path",
            "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
            "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required",
        }
        mlflow_argv = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", self.ports["mlflow"],
                       "--workers", "2", "--backend-store-uri", f"{POSTGRES}/{self.prefix}_mlflow",
                       "--artifacts-destination", "s3://mlflow-artifacts"]  # fmt: skip
        self._spawn("mlflow", mlflow_argv, mlflow_env)
        prefect_env = {
            **self.base_env,
            "PREFECT_API_DATABASE_CONNECTION_URL": f"{POSTGRES.replace('postgresql:', 'postgresql+asyncpg:', 1)}"
            f"/{self.prefix}_prefect",
            "PREFECT_UI_ENABLED": "false",
            "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "5",  # test-speed: pick up the new schedule at once
        }
        prefect = str(BIN / "prefect")
        self._spawn(
            "prefect", [prefect, "server", "start", "--host", "127.0.0.1", "--port", self.ports["prefect"]], prefect_env
        )
        with ThreadPoolExecutor(2) as pool:  # both migrate their databases: let them do it side by side
            waits = [pool.submit(self._wait_healthy, "mlflow", f"{self.mlflow_url}/health", 180),
                     pool.submit(self._wait_healthy, "prefect", f"{self.prefect_api}/health", 180)]  # fmt: skip
            for w in waits:
                w.result()

        # The operator's steps from the README, as written.
        env = self.distill_env
        self._cli(prefect, "work-pool", "create", "distill", "--type", "process", env=env)
        prefect_file = deployments_for(self.recipe, self.root / "prefect.yaml")
        self._cli(prefect, "--no-prompt", "deploy", "--all", "--prefect-file", str(prefect_file), env=env)
        self._cli(prefect, "deployment", "schedule", "create", WATCH_DEPLOYMENT, "--interval", str(self.watch_interval),
                  "--replace", "-y", env=env)  # fmt: skip
        # The Dask scheduler and one labeling worker process (one thread), with the pipeline's variables (the
        # scheduler unpickles the tasks, so it needs the same code: the test teachers' classes here).
        dask = str(BIN / "dask")
        dashboard = f"127.0.0.1:{self.ports['dask-http']}"
        self._spawn("dask-scheduler", [dask, "scheduler", "--host", "127.0.0.1", "--port", self.ports["dask"],
                                       "--dashboard-address", dashboard], self.distill_env)  # fmt: skip
        self._wait_healthy("dask-scheduler", f"http://127.0.0.1:{self.ports['dask-http']}/health", 60)
        self._spawn("dask-worker", [dask, "worker", self.distill_env["DISTILL_DASK_ADDRESS"], "--nworkers", "1",
                                    "--nthreads", "1", "--no-dashboard"], self.distill_env)  # fmt: skip
        worker_env = {**self.distill_env, "PREFECT_WORKER_QUERY_SECONDS": "1"}
        self._spawn("worker", [prefect, "worker", "start", "--pool", "distill", "--limit", "2"], worker_env)
        receiver_argv = [str(BIN / "distill"), "serve", "--port", self.ports["receiver"], "--interval", "0",
                         "--deployment", "auto"]  # fmt: skip
        self._spawn("receiver", receiver_argv, self.distill_env)
        self._wait_healthy("receiver", f"http://127.0.0.1:{self.ports['receiver']}/healthz", 60)
        wait_for(lambda: "started" in self.log("worker").lower(), 60, "the worker to start polling")

    def close(self) -> None:
        for proc in reversed(list(self.procs.values())):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    continue
        for proc in self.procs.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        try:
            _admin(*(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)' for db in self.databases))
        except Exception as err:  # noqa: BLE001 - a leftover database is not worth failing the test run over
            print(f"could not drop the test databases {self.databases}: {err}", file=sys.stderr)

    # --- the Prefect side, read back ---------------------------------------------------------------------

    @contextmanager
    def _prefect(self) -> Iterator[Any]:
        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings({PREFECT_API_URL: self.prefect_api}), get_client(sync_client=True) as client:
            yield client

    def flow_runs(self, deployment: str = DISTILL_DEPLOYMENT) -> list[Any]:
        """Every flow run of a deployment, oldest first."""
        from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
        from prefect.client.schemas.sorting import FlowRunSort

        with self._prefect() as client:
            dep = client.read_deployment_by_name(deployment)
            return client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])),
                sort=FlowRunSort.EXPECTED_START_TIME_ASC,
                limit=200,
            )

    def labeling_task_runs(self, parent: Any) -> list[Any]:
        """The label-shard task runs of the label-shards flow runs inside a flow run (the soft labels on Dask)."""
        from prefect.client.schemas.filters import FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterId

        with self._prefect() as client:
            subflows = [
                r
                for r in client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["label-shards"])))
                if r.parent_task_run_id is not None
                and client.read_task_run(r.parent_task_run_id).flow_run_id == parent.id
            ]
            if not subflows:
                return []
            ids = FlowRunFilterId(any_=[r.id for r in subflows])
            return client.read_task_runs(flow_run_filter=FlowRunFilter(id=ids))

    def runs_for(self, teacher_version: str) -> list[Any]:
        """The distill-teacher-version runs of one teacher version, oldest first."""
        return [r for r in self.flow_runs() if r.parameters.get("teacher_version") == teacher_version]

    def schedule_watcher(self, active: bool) -> None:
        """Pause or resume the watch-teachers schedule (what the Prefect UI's toggle does). Pausing drops the
        scheduled passes; this also waits for a pass already under way to end."""
        with self._prefect() as client:
            dep = client.read_deployment_by_name(WATCH_DEPLOYMENT)
            for schedule in dep.schedules:
                client.update_deployment_schedule(dep.id, schedule.id, active=active)
        if not active:
            wait_for(
                lambda: (
                    not [r for r in self.flow_runs(WATCH_DEPLOYMENT) if r.state.is_pending() or r.state.is_running()]
                ),
                120,
                "the watcher pass under way to end",
                every=0.5,
            )

    def pause_pool(self, paused: bool) -> None:
        """Pause or resume the work pool `distill` (`prefect work-pool pause|resume distill`): runs stay queued."""
        from prefect.client.schemas.actions import WorkPoolUpdate

        with self._prefect() as client:
            client.update_work_pool("distill", WorkPoolUpdate(is_paused=paused))

    def cancel(self, flow_run_id: Any) -> None:
        from prefect.states import Cancelled

        with self._prefect() as client:
            client.set_flow_run_state(flow_run_id, Cancelled(message="cancelled by the test"), force=True)
