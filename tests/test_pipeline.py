"""The continuous loop with real MLflow (SQLite), real Prefect (test harness), real GX and the real core.

Each test gets its own registered model names, DISTILL_HOME (ledger, store, data) and Prefect runs; the
MLflow store is the session's SQLite file.
"""

from __future__ import annotations

import threading
import uuid
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient
from toy_models import register_toy_teacher

from distill_core.errors import StoreError
from distill_core.registry import CHALLENGER, CHAMPION, PREVIOUS, Ledger, aliases, promote, rollback
from distill_core.teachers import log_teacher
from flows.distill import distill_teacher_version, watch_teachers

BAG_STUDENTS = [
    {"name": "bag-small", "family": "embedding_bag", "buckets": 2048, "dim": 8, "lr": 0.02},
    {"name": "bag-large", "family": "embedding_bag", "buckets": 8192, "dim": 16, "lr": 0.02},
]


@pytest.fixture(scope="module", autouse=True)
def prefect_server(tmp_path_factory):
    """A real Prefect API for the module's flow runs (temporary database)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def env(tmp_path, tracking_uri, monkeypatch):
    """A fresh DISTILL_HOME and unique registered names on the session's MLflow store."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    monkeypatch.setenv("DISTILL_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("DISTILL_STORE", raising=False)
    monkeypatch.delenv("DISTILL_LEDGER_URI", raising=False)
    suffix = uuid.uuid4().hex[:8]
    return {
        "home": str(tmp_path / "home"),
        "teacher": f"teacher-{suffix}",
        "student": f"student-{suffix}",
        "tmp": tmp_path,
        "tracking_uri": tracking_uri,
    }


def write_recipe(env, students=BAG_STUDENTS, **overrides) -> str:
    recipe = {
        "name": "t",
        "student_registered_name": env["student"],
        "data": {"max_rows": 300, "augment_copies": 1},
        "teacher": {"registered_name": env["teacher"]},
        "students": students,
        "train": {"epochs": 3, "batch_size": 32, "eval_every": 100},
        "evaluation": {"latency_samples": 10, "throughput_batch": 8, "hard_label_baseline": False},
        "gates": {"min_retention": 0.5, "max_param_ratio": 10.0, "max_regression": 0.2},
    }
    for key, value in overrides.items():
        recipe[key] = {**recipe.get(key, {}), **value} if isinstance(value, dict) else value
    path = env["tmp"] / f"recipe-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def versions(env, name: str) -> list:
    return MlflowClient(env["tracking_uri"]).search_model_versions(f"name='{name}'")


def teacher_tags(env, version: str) -> dict[str, str]:
    return MlflowClient(env["tracking_uri"]).get_model_version(env["teacher"], version).tags


def test_a_run_for_a_teacher_the_recipe_does_not_name_is_refused_before_its_claim(env) -> None:
    from distill_core.errors import RecipeError

    recipe = write_recipe(env)
    with pytest.raises(RecipeError, match=f"distills '{env['teacher']}', not 'someone-elses-teacher'"):
        distill_teacher_version("someone-elses-teacher", "1", recipe, env["home"])
    assert Ledger(f"sqlite:///{Path(env['home']) / 'ledger.db'}").claimed("someone-elses-teacher") == {}


def test_new_teacher_version_yields_a_promoted_student_with_lineage(env, small_dataset):
    """The real MiniLM-based path: a transformer and a bag candidate; the smallest passing one is promoted."""
    from distill_core.recipe import TeacherConfig
    from distill_core.teachers import train_teacher

    teacher = train_teacher(
        small_dataset, TeacherConfig(trainable_layers=0, epochs=3, batch_size=32, lr=0.05), log=lambda _: None
    )
    _, version = log_teacher(
        teacher, env["teacher"], env["tracking_uri"], artifact_location=(env["tmp"] / "t").as_uri()
    )
    students = [
        {"name": "minilm-1L", "family": "transformer", "teacher_layers": [0], "embedding_dim": 32, "lr": 3e-4},
        BAG_STUDENTS[0],
    ]
    recipe = write_recipe(env, students=students, evaluation={"hard_label_baseline": True})
    result = distill_teacher_version(env["teacher"], version, recipe, env["home"])

    assert result["status"] == "succeeded" and result["alias"] == CHAMPION
    client = MlflowClient(env["tracking_uri"])
    student = client.get_model_version_by_alias(env["student"], CHAMPION)
    tags = student.tags
    assert tags["distill.candidate"] == "bag-small"  # the smaller of two passing candidates
    assert tags["distill.teacher_name"] == env["teacher"] and tags["distill.teacher_version"] == version
    assert tags["distill.dataset_digest"] == small_dataset.digest
    for key in ("soft_labels_key", "recipe_hash", "run_id", "accuracy", "agreement", "params"):
        assert tags[f"distill.{key}"], key
    assert tags["distill.gate"] == "passed" and student.description.startswith("Student 'bag-small' distilled")
    ledger = teacher_tags(env, version)
    assert ledger["distill.status"] == "succeeded" and ledger["distill.student_version"] == str(student.version)

    served = mlflow.pyfunc.load_model(f"models:/{env['student']}@champion")
    prediction = served.predict(pd.DataFrame({"text": ["a warm, funny and moving film", "a tedious mess"]}))
    assert set(prediction["label"]) <= set(small_dataset.labels) and len(prediction) == 2

    run = client.get_run(tags["distill.run_id"])
    nested = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}'")
    assert {r.info.run_name for r in nested} == {"minilm-1L", "bag-small"}
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"data_docs", "plots", "report.md"} <= artifacts
    assert any(r.data.metrics.get("distilled.val_accuracy") is not None for r in nested)


def test_student_failing_a_gate_is_registered_without_alias(env, small_dataset):
    version = register_toy_teacher(env, small_dataset)
    recipe = write_recipe(env, gates={"min_accuracy": 0.99})
    result = distill_teacher_version(env["teacher"], version, recipe, env["home"])
    assert result["status"] == "rejected" and result["alias"] is None
    [student] = versions(env, env["student"])
    assert student.tags["distill.gate"] == "failed"
    assert "accuracy" in student.tags["distill.gate_reasons"] and "< 0.9900" in student.tags["distill.gate_reasons"]
    assert aliases(MlflowClient(env["tracking_uri"]), env["student"]) == {}
    ledger = teacher_tags(env, version)
    assert ledger["distill.status"] == "rejected" and "< 0.9900" in ledger["distill.reasons"]


def test_manual_policy_only_sets_challenger(env, small_dataset):
    version = register_toy_teacher(env, small_dataset)
    recipe = write_recipe(env, promotion={"policy": "manual"})
    result = distill_teacher_version(env["teacher"], version, recipe, env["home"])
    assert result["alias"] == CHALLENGER
    assert aliases(MlflowClient(env["tracking_uri"]), env["student"]) == {CHALLENGER: result["student_version"]}


def test_hand_set_champion_is_respected_then_rollback(env, small_dataset):
    client = MlflowClient(env["tracking_uri"])
    recipe = write_recipe(env)
    first = distill_teacher_version(
        env["teacher"], register_toy_teacher(env, small_dataset, seed=1), recipe, env["home"]
    )
    second = distill_teacher_version(
        env["teacher"], register_toy_teacher(env, small_dataset, seed=2), recipe, env["home"]
    )
    assert first["alias"] == CHAMPION
    # A person pins the other version as champion in the MLflow UI (a registry call outside the pipeline).
    champion_now = aliases(client, env["student"])[CHAMPION]
    pinned = second["student_version"] if champion_now == first["student_version"] else first["student_version"]
    client.set_registered_model_alias(env["student"], CHAMPION, pinned)
    third = distill_teacher_version(
        env["teacher"], register_toy_teacher(env, small_dataset, seed=3, epochs=80), recipe, env["home"]
    )
    assert aliases(client, env["student"])[CHAMPION] == pinned
    assert third["alias"] == CHALLENGER and any("set by hand" in n for n in third["notes"])

    ledger = Ledger(f"sqlite:///{Path(env['home']) / 'ledger.db'}")
    history = ledger.alias_history(env["student"], CHAMPION)
    assert history[-1]["version"] == pinned and history[-1]["actor"].startswith("outside the pipeline")

    # A person promotes by hand, then rolls back: previous is restored and both moves are recorded.
    promote(client, ledger, env["student"], third["student_version"], "person:test", "looks better")
    assert aliases(client, env["student"])[PREVIOUS] == pinned
    restored = rollback(client, ledger, env["student"], "person:test")
    assert restored == pinned and aliases(client, env["student"])[CHAMPION] == pinned
    moves = ledger.alias_history(env["student"], CHAMPION)
    assert [m["version"] for m in moves[-2:]] == [third["student_version"], pinned]
    assert moves[-1]["reason"].startswith("rollback from v")


def test_two_watchers_and_a_direct_run_give_one_student_version(env, small_dataset):
    version = register_toy_teacher(env, small_dataset)
    recipe = write_recipe(env)
    results: list = []
    errors: list = []

    def call(fn, *args):
        try:
            results.append(fn(*args))
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=call, args=(watch_teachers, recipe, env["home"])) for _ in range(2)]
    threads.append(
        threading.Thread(target=call, args=(distill_teacher_version, env["teacher"], version, recipe, env["home"]))
    )
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors, errors
    assert len(versions(env, env["student"])) == 1
    assert teacher_tags(env, version)["distill.status"] == "succeeded"


def test_corrupt_dataset_stops_the_run_and_the_ledger_says_failed(env, small_dataset):
    version = register_toy_teacher(env, small_dataset)
    source = env["tmp"] / "reviews.csv"
    frame = small_dataset.split("train").assign(label=lambda f: f["label"].map(dict(enumerate(small_dataset.labels))))
    pd.concat([frame] * 3).to_csv(source, index=False)  # every review three times: a broken export
    recipe = write_recipe(env, data={"source": str(source), "max_rows": None, "augment_copies": 0})
    with pytest.raises(Exception, match="dataset checks failed"):
        distill_teacher_version(env["teacher"], version, recipe, env["home"])
    ledger = teacher_tags(env, version)
    assert ledger["distill.status"] == "failed" and "dataset checks failed" in ledger["distill.error"]
    assert "unique" in ledger["distill.error"].lower()
    assert versions(env, env["student"]) == []


def test_a_missing_s3_bucket_stops_the_run_before_any_work_and_the_ledger_names_it(
    env, small_dataset, s3_env, monkeypatch
):
    missing = f"gone-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("DISTILL_S3", f"s3://{missing}/team")
    version = register_toy_teacher(env, small_dataset)
    with pytest.raises(StoreError, match=f"bucket '{missing}' \\(DISTILL_STORE\\) does not exist"):
        distill_teacher_version(env["teacher"], version, write_recipe(env), env["home"])
    tags = teacher_tags(env, version)
    assert tags["distill.status"] == "failed" and f"bucket '{missing}'" in tags["distill.error"]
    assert not versions(env, env["student"])
    assert not (Path(env["home"]) / "data").exists()  # stopped before any data work


def test_nan_soft_labels_stop_the_run(env, small_dataset):
    word = small_dataset.split("transfer")["text"].iloc[0].split()[0].lower()
    version = register_toy_teacher(env, small_dataset, poison=word)
    recipe = write_recipe(env)
    with pytest.raises(Exception, match="NaN"):
        distill_teacher_version(env["teacher"], version, recipe, env["home"])
    ledger = teacher_tags(env, version)
    assert ledger["distill.status"] == "failed" and "NaN or infinite logits" in ledger["distill.error"]
    assert versions(env, env["student"]) == []


def test_watcher_handles_versions_in_order_and_newest_passing_wins(env, small_dataset):
    recipe = write_recipe(env, train={"epochs": 8})
    first = register_toy_teacher(env, small_dataset, seed=4, shuffled=True)  # learned nothing real
    second = register_toy_teacher(env, small_dataset, seed=5, epochs=150)  # a better teacher, arriving together
    results = watch_teachers(recipe, env["home"])
    assert [r["teacher_version"] for r in results] == [first, second]
    assert [r["status"] for r in results] == ["succeeded", "succeeded"]
    champion = MlflowClient(env["tracking_uri"]).get_model_version_by_alias(env["student"], CHAMPION)
    assert champion.tags["distill.teacher_version"] == second
    assert str(champion.version) == results[1]["student_version"]
    assert watch_teachers(recipe, env["home"]) == []  # nothing left to do


def test_rerun_of_a_handled_version_reuses_everything_and_registers_nothing_new(env, small_dataset):
    from distill_core.settings import load_settings
    from flows.distill import release_for_rerun

    version = register_toy_teacher(env, small_dataset)
    recipe = write_recipe(env)
    first = distill_teacher_version(env["teacher"], version, recipe, env["home"])
    assert distill_teacher_version(env["teacher"], version, recipe, env["home"])["status"] == "skipped"
    release_for_rerun(load_settings(env["home"]), env["teacher"], version)
    again = distill_teacher_version(env["teacher"], version, recipe, env["home"])
    assert again["student_version"] == first["student_version"] and again["alias"] == CHAMPION
    assert len(versions(env, env["student"])) == 1
    assert aliases(MlflowClient(env["tracking_uri"]), env["student"]) == {CHAMPION: first["student_version"]}
    assert again["seconds"]["distill"] < first["seconds"]["distill"]  # students resumed from finished checkpoints
