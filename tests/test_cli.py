"""The `distill` command as a user runs it: help, clear errors, and the demo end to end on small data."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from stack import NO_PROXY, free_port, wait_for

from distill_core import links
from distill_core.tasks import CLASSIFICATION

ROOT = Path(__file__).resolve().parents[1]
VERBS = ("demo", "run", "watch", "serve", "status", "promote", "rollback", "ui", "stage", "export", "gc", "notify")


def distill(
    *args: str, home: Path | None = None, timeout: int = 600, unset: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in unset} | {"HF_HUB_OFFLINE": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("DISTILL_STORE", None)
    env.pop("DISTILL_WEBHOOK_SECRET", None)
    if home is not None:
        env["DISTILL_HOME"] = str(home)
    return subprocess.run(
        [sys.executable, "-c", "from flows.cli import main; main()", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        cwd=ROOT,
    )


def test_help_lists_every_verb():
    out = distill("--help")
    assert out.returncode == 0
    for verb in VERBS:
        assert verb in out.stdout
    stages = distill("stage", "--help").stdout
    assert all(step in stages for step in ("prepare", "teacher", "label", "distill"))


def test_serve_refuses_to_run_without_a_shared_secret(tmp_path):
    out = distill("serve", home=tmp_path)
    assert out.returncode == 1 and "DISTILL_WEBHOOK_SECRET is not set" in out.stderr


def test_bad_recipe_is_one_clear_line(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("name: x\nstudents: [{name: s, family: lstm}]\n")
    out = distill("stage", "prepare", "--recipe", str(recipe), home=tmp_path)
    assert out.returncode == 1
    assert "students.0.family: Input should be 'transformer' or 'embedding_bag' (got 'lstm')" in out.stderr
    assert "Traceback" not in out.stderr


def test_bad_teacher_reference(tmp_path):
    out = distill("stage", "label", "--teacher", "no-version", home=tmp_path)
    assert out.returncode == 2 and "expected NAME/VERSION" in out.stderr


def test_the_ephemeral_prefect_server_gets_time_to_start_on_a_busy_machine_unless_the_user_says(tmp_path, monkeypatch):
    """Prefect waits 20 s for the server the CLI starts; a CI run on a loaded machine took longer ('Timed out while
    attempting to connect to ephemeral Prefect API server'). The CLI waits longer; a user's own setting wins."""
    from prefect.context import refresh_global_settings_context
    from prefect.settings import get_current_settings

    import flows.cli as cli
    import flows.demo  # noqa: F401 - as the demo verb does: Prefect is imported, its settings read, before the CLI's

    name = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
    monkeypatch.setenv("DISTILL_HOME", str(tmp_path))
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    for given, waits in ((None, 120), ("45", 45)):
        if given is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, given)
        cli._runs_flows_here(cli._env(None))
        assert get_current_settings().server.ephemeral.startup_timeout_seconds == waits
    monkeypatch.undo()
    refresh_global_settings_context()  # the rest of the session runs on the settings it had


@pytest.fixture
def tiny_recipe(tmp_path: Path) -> Path:
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(
        "name: tiny\n"
        "data: {max_rows: 200, augment_copies: 1}\n"
        "teacher: {trainable_layers: 2, epochs: 3, batch_size: 16, lr: 1.0e-4}\n"
        "students:\n"
        "  - {name: small-tf, family: transformer, teacher_layers: [5], embedding_dim: 32, lr: 3.0e-4}\n"
        "  - {name: bag, family: embedding_bag, buckets: 4096, dim: 16, lr: 0.02}\n"
        "train: {epochs: 1, batch_size: 32, eval_every: 100}\n"
        "evaluation: {latency_samples: 10, throughput_batch: 8}\n"
        "gates: {min_retention: 0.5, max_param_ratio: 1.0, max_regression: 0.2}\n"
        "checks: {max_class_kl: 1.0}\n"  # a teacher fine-tuned on 140 reviews may lean to one class
    )
    return recipe


def test_demo_tells_the_continuous_story(tiny_recipe, tmp_path):
    home = tmp_path / "home"
    out = distill("demo", "--recipe", str(tiny_recipe), home=home, unset=("PREFECT_HOME",))  # as a newcomer runs it
    assert out.returncode == 0, out.stderr[-3000:]
    assert "registered teacher sentiment-teacher v1" in out.stdout
    assert "registered teacher sentiment-teacher v2" in out.stdout
    table = [line for line in out.stdout.splitlines() if line.startswith("| v")]
    assert [row.split("|")[1].strip() for row in table] == ["v1", "v2"]
    # the pages to open, and the Prefect state of exactly these runs under DISTILL_HOME
    assert links.model("http://127.0.0.1:5000", "sentiment-student") in out.stdout
    assert f"PREFECT_HOME={home / 'prefect'} prefect server start" in out.stdout
    assert (home / "prefect" / "prefect.db").is_file()

    status = distill("status", "--json", "--recipe", str(tiny_recipe), home=home)
    assert status.returncode == 0, status.stderr[-2000:]
    state = json.loads(status.stdout)
    teachers = {t["version"]: t for t in state["teacher"]["versions"]}
    assert set(teachers) == {"1", "2"}
    assert all(t["status"] in ("succeeded", "rejected") for t in teachers.values())
    champion = state["student"]["aliases"]["champion"]
    assert teachers["1"]["student_version"] == "1" and "champion" in {a["alias"] for a in state["alias_history"]}
    champion_row = next(s for s in state["student"]["versions"] if s["version"] == champion)
    assert champion_row["gate"] == "passed" and champion_row["teacher_name"] == "sentiment-teacher"

    # nothing new: teachers exist, ledger done (a newcomer's second `make demo`, on the demo's own Prefect home)
    again = distill("demo", "--recipe", str(tiny_recipe), home=home, unset=("PREFECT_HOME",))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "teacher sentiment-teacher v2 is already registered" in again.stdout


@pytest.mark.slow  # 45 s; the stage verbs stay in CI through dvc repro and the LM stage verbs (make test-all runs it)
def test_stage_distill_prints_the_comparison_table(tiny_recipe, tmp_path):
    home = tmp_path / "home"
    teacher = distill("stage", "teacher", "--recipe", str(tiny_recipe), "--trainable-layers", "0", home=home)
    assert teacher.returncode == 0, teacher.stderr[-3000:]
    ref = teacher.stdout.strip().splitlines()[-1]
    assert ref == "sentiment-teacher/1"
    out = distill("stage", "distill", "--teacher", ref, "--recipe", str(tiny_recipe), home=home)
    assert out.returncode == 0, out.stderr[-3000:]
    table = [line for line in out.stdout.splitlines() if line.startswith("|")]
    assert table[0] == "| " + " | ".join(CLASSIFICATION.columns) + " |"  # the fields' own names head the columns
    names = [row.split("|")[1].strip() for row in table[2:]]
    assert names == [
        "teacher sentiment-teacher v1",
        "small-tf (distilled)",
        "small-tf (hard-label)",
        "bag (distilled)",
        "bag (hard-label)",
    ]
    report = json.loads((home / "runs" / "tiny-sentiment-teacher-v1" / "report.json").read_text())
    assert report["teacher"].startswith("sentiment-teacher/1@")
    assert (home / "runs" / "tiny-sentiment-teacher-v1" / "bag" / "distilled.pt").exists()
    again = distill("stage", "distill", "--teacher", ref, "--recipe", str(tiny_recipe), home=home)
    assert again.returncode == 0 and "(reused)" in again.stderr and "resumed from checkpoint" in again.stderr


def test_rollback_without_previous_is_one_clear_line(tmp_path):
    out = distill("rollback", "no-such-student", home=tmp_path)
    assert out.returncode == 1 and "error: model 'no-such-student' has no 'previous' version" in out.stderr


def _toy_registry(home: Path, teacher: str = "sentiment-teacher", versions: int = 1) -> str:
    """Register toy teachers into the embedded default registry under home (as `distill` would find it)."""
    from mlflow.tracking import MlflowClient
    from toy_models import BagTeacher, WordHashTokenizer

    from distill_core.model_io import log_teacher
    from distill_core.modules import WrappedTeacher

    home.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{home / 'mlflow.db'}"
    module = WrappedTeacher(BagTeacher(), WordHashTokenizer(), labels=("fresh", "rotten"))
    for _ in range(versions):
        log_teacher(module, teacher, uri, artifact_location=(home / "mlartifacts").as_uri())
    MlflowClient(uri)  # the store exists
    return uri


def test_a_run_for_a_version_that_does_not_exist_is_one_line_and_leaves_nothing_behind(tmp_path):
    """It used to fail with two chained tracebacks and leave a claim and a FAILED run that blocked v2 forever."""
    import sqlalchemy as sa
    from mlflow.tracking import MlflowClient

    home = tmp_path / "home"
    out = distill("run", "--teacher", "sentiment-teacher/1", home=home)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "error: no registered model 'sentiment-teacher' in the MLflow registry" in out.stderr
    uri = _toy_registry(home)
    out = distill("run", "--teacher", "sentiment-teacher/2", home=home)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.strip() == "error: teacher 'sentiment-teacher' has no version 2 (it has v1)"
    client = MlflowClient(uri)
    assert (
        client.search_runs([e.experiment_id for e in client.search_experiments()], "tags.mlflow.runName LIKE '%v2'")
        == []
    )
    engine = sa.create_engine(f"sqlite:///{home / 'ledger.db'}")
    if sa.inspect(engine).has_table("distill_claims_v2"):
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT count(*) FROM distill_claims_v2")).scalar() == 0


def test_credentials_in_the_tracking_uri_are_never_printed(tmp_path):
    env_uri = f"http://ana:hunter2@127.0.0.1:{free_port()}"
    out = subprocess.run(
        [sys.executable, "-c", "from flows.cli import main; main()", "status", "--home", str(tmp_path)],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
        env={**os.environ, "MLFLOW_TRACKING_URI": env_uri, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
             "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"},
    )  # fmt: skip
    assert out.returncode == 1 and "hunter2" not in out.stdout + out.stderr
    assert "ana:***@127.0.0.1" in out.stderr and "Traceback" not in out.stderr


def test_promoting_a_student_that_failed_its_gates_needs_force_and_a_reason(tmp_path):
    from mlflow.tracking import MlflowClient

    from distill_core.registry import Ledger

    home = tmp_path / "home"
    uri = _toy_registry(home, teacher="my-student", versions=2)
    MlflowClient(uri).set_model_version_tag("my-student", "2", "distill.gate", "failed")
    MlflowClient(uri).set_model_version_tag("my-student", "2", "distill.gate_reasons", "retention 0.6 < 0.9")
    refused = distill("promote", "my-student", "2", home=home)
    assert refused.returncode == 1 and "v2 failed its gates (retention 0.6 < 0.9)" in refused.stderr
    assert distill("promote", "my-student", "2", "--force", home=home).returncode == 2  # no --reason
    forced = distill("promote", "my-student", "2", "--force", "--reason", "gate too strict here", home=home)
    assert forced.returncode == 0 and "forced" in forced.stdout
    move = Ledger(f"sqlite:///{home / 'ledger.db'}").alias_history("my-student", "champion")[-1]
    assert move["version"] == "2" and move["reason"].startswith("FORCED") and "gate too strict here" in move["reason"]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_serve_stops_within_seconds_and_leaves_no_process_behind(tmp_path, signum):
    """Its watcher starts Prefect's ephemeral server (a child process): SIGINT and SIGTERM must stop both."""
    port = free_port()
    env = {**os.environ, "DISTILL_WEBHOOK_SECRET": "s", "DISTILL_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.Popen(
        [sys.executable, "-c", "from flows.cli import main; main()", "serve", "--port", str(port), "--interval", "1"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        wait_for(lambda: _children(proc.pid), 120, "the watcher to start Prefect's server")
        wait_for(lambda: _answers(f"http://127.0.0.1:{port}/healthz"), 30, "the receiver to answer")
        proc.send_signal(signum)
        started = time.monotonic()
        proc.wait(timeout=30)
        assert time.monotonic() - started < 15
        wait_for(lambda: not _group_alive(proc.pid), 15, "every process of the group to end")
    finally:
        if _group_alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)


def _children(pid: int) -> list[int]:
    import psutil

    try:
        return [child.pid for child in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    import psutil  # zombies still count for killpg: only living members matter

    return any(p.status() != psutil.STATUS_ZOMBIE for p in psutil.process_iter() if _pgid(p) == pgid)


def _pgid(process) -> int | None:
    try:
        return os.getpgid(process.pid)
    except (ProcessLookupError, PermissionError):
        return None


def _answers(url: str) -> bool:
    try:
        NO_PROXY.open(url, timeout=2).close()
        return True
    except OSError:
        return False
