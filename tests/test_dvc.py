"""The DVC pipeline as a person runs it: real `dvc` and `git` in a copy of this repository, real MLflow (SQLite),
Prefect's test server for the flow, and S3 on the moto server the tests start.

The copy holds the project's own dvc.yaml and code; its params.yaml is the project's, shrunk to small data.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import boto3
import mlflow
import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from distill_core.errors import DatasetError
from distill_core.recipe import load_recipe
from distill_core.registry import CHAMPION, aliases, ledger_entry
from distill_core.search import SearchResult
from distill_core.settings import load_settings
from distill_core.steps import open_dataset
from flows.distill import distill_teacher_version, release_for_rerun

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
STAGES = ("prepare", "teacher", "label", "train", "evaluate")


def small_params() -> dict:
    """The project's params.yaml on 300 reviews, a head-only teacher and one bag student."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"]["max_rows"] = 300
    params["teacher"].update(trainable_layers=0, epochs=3, batch_size=32, lr=0.05)
    params["students"] = [{"name": "bag", "family": "embedding_bag", "buckets": 4096, "dim": 16, "lr": 0.02}]
    params["train"].update(epochs=2, eval_every=20)
    params["evaluation"].update(latency_samples=10, throughput_batch=8)
    params["checks"] = {"max_class_kl": 1.0}  # a teacher trained on 210 reviews may lean to one class
    params["gates"] = {"min_retention": 0.5}  # and its students are rough: the gates here are not the subject
    return params


def make_repo(path: Path, params: dict) -> Path:
    """A git + DVC repository with this project's pipeline and code, committed."""
    path.mkdir(parents=True)
    for name in ("distill_core", "flows"):
        shutil.copytree(ROOT / name, path / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".dvcignore", ".gitignore", ".dvc/config", ".dvc/.gitignore"):
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, path / name)
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git(path, "init", "-q", "-b", "main")
    commit(path, "the pipeline")
    return path


def environment(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DISTILL_", "MLFLOW_"))}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", HF_HUB_OFFLINE="1", TQDM_DISABLE="1", **extra)
    return env


def run(repo: Path, *args: str, env: dict[str, str] | None = None, ok: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(args, cwd=repo, env=env or environment(), capture_output=True, text=True, timeout=600)
    if ok and done.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        )
    return done


def dvc(repo: Path, *args: str, **kwargs) -> subprocess.CompletedProcess:
    return run(repo, sys.executable, "-m", "dvc", *args, **kwargs)


def distill(repo: Path, *args: str, **kwargs) -> subprocess.CompletedProcess:
    return run(repo, str(BIN / "distill"), *args, **kwargs)


def git(repo: Path, *args: str) -> str:
    return run(repo, "git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args).stdout.strip()


def commit(repo: Path, message: str) -> str:
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", message)
    return git(repo, "rev-parse", "HEAD")


def stages_run(output: str) -> list[str]:
    return [stage for stage in STAGES if f"Running stage '{stage}'" in output]


def locked_md5(repo: Path, path: str = "data/prepared") -> str:
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return next(out["md5"] for stage in lock["stages"].values() for out in stage.get("outs", []) if out["path"] == path)


@pytest.fixture
def embedded(monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process runs on the repository's embedded default (mlflow.set_tracking_uri leaves the variable set)."""
    for name in ("MLFLOW_TRACKING_URI", "DISTILL_HOME", "DISTILL_STORE", "DISTILL_S3", "DISTILL_LEDGER_URI"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The pipeline reproduced once from scratch and committed, as a person would after `dvc repro`."""
    path = make_repo(tmp_path_factory.mktemp("dvc") / "repo", small_params())
    first = dvc(path, "repro")
    assert stages_run(first.stdout) == list(STAGES), first.stdout[-3000:]
    commit(path, "dvc repro")
    return path


def test_repro_from_scratch_runs_every_stage_and_a_second_repro_is_a_no_op(repo: Path) -> None:
    metrics = json.loads((repo / "artifacts/evaluation/metrics.json").read_text())
    assert set(metrics) == {"teacher", "bag"} and set(metrics["bag"]) == {"distilled", "hard-label"}
    assert 0.5 < metrics["teacher"]["accuracy"] <= 1 and metrics["bag"]["distilled"]["params"] > 0
    teacher = json.loads((repo / "artifacts/teacher.json").read_text())
    assert (teacher["name"], teacher["version"]) == ("sentiment-teacher", "1")
    assert MlflowClient(f"sqlite:///{repo / '.distill/mlflow.db'}").get_model_version("sentiment-teacher", "1")

    again = dvc(repo, "repro")
    assert stages_run(again.stdout) == [] and "Data and pipelines are up to date." in again.stdout
    assert "up to date" in dvc(repo, "status").stdout


def test_changing_one_param_reruns_only_the_stages_that_depend_on_it(repo: Path) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    labels_before = json.loads((repo / "artifacts/labels.json").read_text())["key"]
    params["soft_labels"]["max_length"] = 48  # part of the soft-label key
    params["stages"]["generations"] = 2  # and the student born again once: train and evaluate report both
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    status = dvc(repo, "status").stdout
    assert "label:" in status and "prepare:" not in status and "teacher:" not in status
    out = dvc(repo, "repro")
    assert stages_run(out.stdout) == ["label", "train", "evaluate"], out.stdout[-3000:]
    assert json.loads((repo / "artifacts/labels.json").read_text())["key"] != labels_before
    assert "| bag.gen1 |" in (repo / "artifacts/evaluation/report.md").read_text()
    commit(repo, "shorter teacher inputs")


@pytest.mark.slow  # 16 s; a DVC feature over the same stages dvc repro runs in CI (make test-all runs it)
def test_exp_run_sweeps_a_param_in_the_git_repo(repo: Path) -> None:
    out = dvc(repo, "exp", "run", "-S", "evaluation.latency_samples=7")
    assert stages_run(out.stdout) == ["evaluate"], out.stdout[-3000:]
    shown = json.loads(dvc(repo, "exp", "show", "--json").stdout)
    experiments = [
        exp["data"]["params"]["params.yaml"]["data"]["evaluation"]["latency_samples"]
        for commit_row in shown
        for branch in commit_row.get("experiments") or []
        for exp in branch["revs"]
    ]
    assert 7 in experiments
    git(repo, "checkout", "--", ".")  # back to the committed params, lock and metrics
    dvc(repo, "checkout")


@pytest.mark.slow  # 40 s; the search runs in CI through the flow and the stage verbs (make test-all runs it)
def test_exp_run_with_a_search_trains_the_feasible_architectures_and_keeps_the_smallest(repo: Path) -> None:
    space = "{embedding_bag: {buckets: [4096], dim: [8, 16], lr: 0.02}, trials: 2, min_steps: 5, reduction_factor: 2}"
    # one generation: a search trains fresh architectures, not born-again ones (an earlier test committed two)
    out = dvc(repo, "exp", "run", "-n", "searched", "-S", f"search={space}", "-S", "students=[]",
              "-S", "stages.generations=1")  # fmt: skip
    assert stages_run(out.stdout) == ["train", "evaluate"], out.stdout[-3000:]
    searched = SearchResult.load(repo / "artifacts/students")
    assert searched is not None and searched.summary()["architectures"] == 2
    assert [t["state"] for t in searched.trials] == ["COMPLETE", "COMPLETE"]
    assert searched.chosen == min(searched.rows, key=lambda r: r["params"])["name"]  # both meet the gates here
    metrics = json.loads((repo / "artifacts/evaluation/metrics.json").read_text())
    assert set(metrics) == {"teacher", searched.chosen}
    git(repo, "checkout", "--", ".")  # back to the committed params, lock and metrics
    git(repo, "clean", "-fdq", "--", "artifacts/training")  # and the searched students' curves (uncached outs)
    dvc(repo, "checkout")


def test_metrics_and_plots_show_give_a_person_the_numbers(repo: Path) -> None:
    metrics = json.loads(dvc(repo, "metrics", "show", "--json").stdout)
    shown = metrics[""]["data"]["artifacts/evaluation/metrics.json"]["data"]
    assert (
        shown["teacher"]["accuracy"]
        == json.loads((repo / "artifacts/evaluation/metrics.json").read_text())["teacher"]["accuracy"]
    )
    out = dvc(repo, "plots", "show")
    html = (repo / "dvc_plots/index.html").read_text()
    assert "index.html" in out.stdout
    for plotted in ("artifacts/training/bag.distilled.csv", "artifacts/training/bag.hard-label.csv", "models.csv"):
        assert plotted in html
    curve = pd.read_csv(repo / "artifacts/training/bag.distilled.csv")
    assert {"step", "val_accuracy"} <= set(curve.columns) and len(curve) >= 2


def test_the_flow_reads_the_data_through_dvc_and_the_student_names_its_version(
    repo: Path, prefect_server, embedded
) -> None:
    home = repo / ".distill"
    result = distill_teacher_version("sentiment-teacher", "1", str(repo / "params.yaml"), str(home))
    assert result["status"] == "succeeded", result
    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    student = client.get_model_version("sentiment-student", result["student_version"])
    tags = student.tags
    head = git(repo, "rev-parse", "HEAD")
    assert tags["distill.dataset_digest"] == locked_md5(repo)  # DVC's md5, as in dvc.lock
    assert (tags["distill.dataset_path"], tags["distill.dataset_rev"]) == ("data/prepared", head)
    assert tags["distill.dataset_repo"] == str(repo)
    assert f"at git {head}" in student.description
    # the same recipe, data and teacher through `dvc repro` made the same student: reproduction is exact on CPU
    metrics = json.loads((repo / "artifacts/evaluation/metrics.json").read_text())
    assert float(tags["distill.accuracy"]) == metrics["bag"]["distilled"]["accuracy"]  # tags keep full precision
    assert tags["distill.recipe_hash"] == load_recipe(repo / "params.yaml").recipe_hash()

    status = distill(repo, "status", "--recipe", "params.yaml").stdout
    assert f"data data/prepared @ {head} in {repo} (DVC md5 {locked_md5(repo)})" in status
    state = json.loads(distill(repo, "status", "--json", "--recipe", "params.yaml").stdout)
    row = next(s for s in state["student"]["versions"] if s["version"] == result["student_version"])
    assert row["dataset_rev"] == head

    # the same data at that revision, as another machine would get it: from git + the DVC cache
    at_rev = {**yaml.safe_load((repo / "params.yaml").read_text())}
    at_rev["data"]["dvc"]["rev"] = head
    (repo / "at-rev.yaml").write_text(yaml.safe_dump(at_rev))

    dataset = open_dataset(load_recipe(repo / "at-rev.yaml"), load_settings(home))
    assert dataset.digest == locked_md5(repo) and dataset.version.rev == head
    assert dataset.root == home / "data" / "dvc" / locked_md5(repo).removesuffix(".dir")
    (repo / "at-rev.yaml").unlink()


def test_a_dataset_changed_behind_dvcs_back_stops_with_the_file_named(repo: Path, prefect_server, embedded) -> None:
    test_split = repo / "data/prepared/test.parquet"
    frame = pd.read_parquet(test_split)
    frame.loc[0, "label"] = 1 - frame.loc[0, "label"]
    frame.to_parquet(test_split, index=False)
    try:
        out = distill(repo, "stage", "label", "--recipe", "params.yaml", ok=False)
        assert out.returncode == 1
        assert "changed behind DVC's back (modified data/prepared/test.parquet)" in out.stderr
        assert "dvc checkout data/prepared" in out.stderr

        home = repo / ".distill"
        # handled by the test above: run it again
        release_for_rerun(load_settings(home), "sentiment-teacher", "1", "sentiment-student")
        with pytest.raises(DatasetError, match="changed behind DVC's back"):
            distill_teacher_version("sentiment-teacher", "1", str(repo / "params.yaml"), str(home))
        client = MlflowClient(load_settings(home).tracking_uri)
        ledger = ledger_entry(client, client.get_model_version("sentiment-teacher", "1"), "sentiment-student")
        # a failed rerun keeps the version's earlier outcome, and says why it failed
        assert ledger["status"] == "succeeded" and "modified data/prepared/test.parquet" in ledger["rerun_error"]
    finally:
        dvc(repo, "checkout", "--force", "data/prepared")
    assert "up to date" in dvc(repo, "status").stdout


def test_data_that_cannot_be_fetched_is_named_and_leaves_nothing_that_looks_complete(
    repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clone = tmp_path / "elsewhere"  # another machine: git history, but no DVC cache and no reachable remote
    run(tmp_path, "git", "clone", "-q", str(repo), str(clone))
    monkeypatch.setenv("DISTILL_DVC_REMOTE", str(tmp_path / "no-such-remote"))
    params = yaml.safe_load((clone / "params.yaml").read_text())
    params["data"]["dvc"]["rev"] = "HEAD"
    (clone / "at-head.yaml").write_text(yaml.safe_dump(params))
    home = tmp_path / "home"
    with pytest.raises(DatasetError) as err:
        open_dataset(load_recipe(clone / "at-head.yaml"), load_settings(home))
    assert "cannot fetch 'data/prepared' at revision HEAD" in str(err.value)
    assert f"DVC remote {tmp_path / 'no-such-remote'} (DISTILL_DVC_REMOTE)" in str(err.value)
    assert not list((home / "data").rglob("dataset.json")) and not list((home / "data").rglob("*.partial"))


# --- everything in S3 ------------------------------------------------------------------------------------


def s3_keys(bucket: str, prefix: str) -> list[str]:
    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [obj["Key"] for page in pages for obj in page.get("Contents", [])]


@pytest.mark.slow  # 65-75 s; the S3 store and the DVC stages stay in CI through the other tests (make test-all runs it)
def test_everything_in_s3_push_wipe_pull_and_a_rerun_reuses_the_stored_labels(
    s3_env: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, prefect_server
) -> None:
    bucket = s3_env
    monkeypatch.setenv("DISTILL_S3", f"s3://{bucket}/team")
    for name in ("MLFLOW_TRACKING_URI", "DISTILL_STORE", "DISTILL_ARTIFACTS", "DISTILL_DVC_REMOTE", "DISTILL_HOME"):
        monkeypatch.delenv(name, raising=False)
    env = environment(**{k: os.environ[k] for k in os.environ if k.startswith(("AWS_", "DISTILL_S3", "NO_PROXY"))})
    repo = make_repo(tmp_path / "repo", small_params())

    configured = distill(repo, "storage", "--configure-dvc", env=env).stdout
    assert f"s3://{bucket}/team/soft-labels" in configured and "every S3 location answers" in configured
    assert f"s3://{bucket}/team/dvc" in (repo / ".dvc/config.local").read_text()

    dvc(repo, "repro", env=env)
    head = commit(repo, "dvc repro")
    dvc(repo, "push", env=env)
    labels_key = json.loads((repo / "artifacts/labels.json").read_text())["key"]
    assert any(labels_key in key for key in s3_keys(bucket, "team/soft-labels/"))
    assert s3_keys(bucket, "team/mlflow/teachers/")  # the teacher's model files
    assert s3_keys(bucket, "team/dvc/files/md5/")  # prepared data and students

    home = repo / ".distill"
    result = distill_teacher_version("sentiment-teacher", "1", str(repo / "params.yaml"), str(home))
    assert result["status"] == "succeeded", result
    assert s3_keys(bucket, "team/mlflow/distill-sentiment-student/")  # the student's model, run plots, data docs

    # wipe every local copy: DVC's cache and outputs, the prepared data and runs under DISTILL_HOME
    for path in (".dvc/cache", "data/prepared", "artifacts/students", ".distill/data", ".distill/runs"):
        shutil.rmtree(repo / path, ignore_errors=True)
    assert not list((repo / ".distill").glob("mlartifacts"))  # nothing of MLflow's was ever local
    dvc(repo, "pull", env=env)
    assert "up to date" in dvc(repo, "status", env=env).stdout and git(repo, "rev-parse", "HEAD") == head

    labels_before = s3_keys(bucket, "team/soft-labels/")
    relabel = distill(repo, "stage", "label", "--recipe", "params.yaml", env=env)
    summary = json.loads(relabel.stdout.strip().splitlines()[-1])
    assert summary["key"] == labels_key and summary["reused"] is True
    assert s3_keys(bucket, "team/soft-labels/") == labels_before
    assert "up to date" in dvc(repo, "status", env=env).stdout

    mlflow.set_tracking_uri(f"sqlite:///{home / 'mlflow.db'}")
    client = MlflowClient()
    assert aliases(client, "sentiment-student")[CHAMPION] == result["student_version"]
    served = mlflow.pyfunc.load_model("models:/sentiment-student@champion")  # from S3: nothing local is left
    assert len(served.predict(pd.DataFrame({"text": ["a moving, funny film", "dull and far too long"]}))) == 2


# --- bad storage settings ------------------------------------------------------------------------------


def test_storage_names_a_missing_bucket_and_the_setting(s3_env: str, tmp_path: Path) -> None:
    env = environment(**{k: os.environ[k] for k in os.environ if k.startswith(("AWS_", "NO_PROXY"))})
    env.update(DISTILL_HOME=str(tmp_path), DISTILL_S3=f"s3://{s3_env}/x", DISTILL_DVC_REMOTE="s3://no-such-bucket/dvc")
    out = distill(tmp_path, "storage", env=env, ok=False)
    assert out.returncode == 1
    assert "error: bucket 'no-such-bucket' (DISTILL_DVC_REMOTE) does not exist at http://127.0.0.1:" in out.stderr


def test_storage_names_an_unreachable_endpoint(s3_env: str, tmp_path: Path) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
    env = environment(**{k: os.environ[k] for k in os.environ if k.startswith(("AWS_", "NO_PROXY"))})
    env.update(DISTILL_HOME=str(tmp_path), DISTILL_S3=f"s3://{s3_env}/x", AWS_ENDPOINT_URL=closed)
    out = distill(tmp_path, "storage", env=env, ok=False)
    assert out.returncode == 1
    assert f"cannot reach the S3 endpoint {closed}" in out.stderr and f"s3://{s3_env}/x/soft-labels" in out.stderr


def test_storage_names_refused_credentials(s3_env: str, tmp_path: Path, credentials_enforced) -> None:
    env = environment(**{k: os.environ[k] for k in os.environ if k.startswith(("AWS_", "NO_PROXY"))})
    env.update(DISTILL_HOME=str(tmp_path), DISTILL_S3=f"s3://{s3_env}/x", AWS_ACCESS_KEY_ID="AKIAWRONGWRONGWRONG0")
    with credentials_enforced():
        out = distill(tmp_path, "storage", env=env, ok=False)
    assert out.returncode == 1
    assert f"access to bucket '{s3_env}' (DISTILL_STORE) was refused" in out.stderr
    assert "check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY" in out.stderr


@pytest.mark.slow  # 25 s (a DVC repro and a run); the watcher and DVC stay in CI through the other tests
def test_a_new_version_of_the_data_distills_the_current_teacher_again_once(
    repo: Path, prefect_server, embedded
) -> None:
    """The watcher compares DVC's md5 of the data with the one the current student was made from; a new one starts
    one run of the current teacher version on it (claimed per version and md5), and its student names the data."""
    from flows.distill import watch_teachers

    home, recipe = str(repo / ".distill"), str(repo / "params.yaml")
    watch_teachers(recipe, home)  # teacher v1 handled (it is, when the flow test ran first)
    assert watch_teachers(recipe, home) == []  # the same data: nothing to do
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["data"]["max_rows"] = 320
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    dvc(repo, "repro", "prepare")
    commit(repo, "more reviews")
    (ran,) = watch_teachers(recipe, home)
    assert ran["teacher_version"] == "1" and ran["status"] in ("succeeded", "rejected"), ran
    client = MlflowClient(f"sqlite:///{repo / '.distill' / 'mlflow.db'}")
    tags = client.get_model_version("sentiment-student", ran["student_version"]).tags
    assert tags["distill.dataset_digest"] == locked_md5(repo) and tags["distill.trigger"] == "data"
    assert watch_teachers(recipe, home) == []
