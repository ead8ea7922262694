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
import torch
import yaml
from mlflow.tracking import MlflowClient
from toy_models import register_toy_teacher

from distill_core.errors import StoreError
from distill_core.model_io import log_teacher
from distill_core.modules import WrappedTeacher
from distill_core.recipe import load_recipe
from distill_core.registry import CHALLENGER, CHAMPION, PREVIOUS, Ledger, aliases, ledger_entry, promote, rollback
from flows.distill import distill_teacher_version, watch_teachers

# lr 0.1: on 210 training reviews a bag at 0.02 keeps its first evaluation's state, a constant prediction, which
# the gates now reject as "did not learn"
BAG_STUDENTS = [
    {"name": "bag-small", "family": "embedding_bag", "buckets": 2048, "dim": 8, "lr": 0.1},
    {"name": "bag-large", "family": "embedding_bag", "buckets": 8192, "dim": 16, "lr": 0.1},
]


@pytest.fixture(scope="module", autouse=True)
def prefect_server(tmp_path_factory):
    """A real Prefect API for the module's flow runs (temporary database)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def write_recipe(env, students=BAG_STUDENTS, name: str = "t", **overrides) -> str:
    recipe = {
        "name": name,
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


def ledger_of(env, version: str, student: str | None = None) -> dict[str, str]:
    """The ledger of the recipe's student model (or another) on a teacher version: status, error, ..."""
    client = MlflowClient(env["tracking_uri"])
    return ledger_entry(client, client.get_model_version(env["teacher"], version), student or env["student"])


def test_a_run_for_a_teacher_the_recipe_does_not_name_is_refused_before_its_claim(env) -> None:
    from distill_core.errors import RecipeError

    recipe = write_recipe(env)
    with pytest.raises(RecipeError, match=f"distills '{env['teacher']}', not 'someone-elses-teacher'"):
        distill_teacher_version("someone-elses-teacher", "1", recipe, env["home"])
    assert Ledger(f"sqlite:///{Path(env['home']) / 'ledger.db'}").claimed("someone-elses-teacher", env["student"]) == {}


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
    # where its labels were made and where it trained (device: auto, on this CPU machine), with the thread counts
    threads = torch.get_num_threads()
    here = "cuda:0" if torch.cuda.is_available() else f"cpu, {threads} thread{'s' if threads != 1 else ''}"
    assert tags["distill.labeled_on"].startswith(here) and tags["distill.trained_on"].startswith(here)
    assert tags["distill.gate"] == "passed" and student.description.startswith("Student 'bag-small' distilled")
    ledger = ledger_of(env, version)
    assert ledger["status"] == "succeeded" and ledger["student_version"] == str(student.version)

    served = mlflow.pyfunc.load_model(f"models:/{env['student']}@champion")
    prediction = served.predict(pd.DataFrame({"text": ["a warm, funny and moving film", "a tedious mess"]}))
    assert set(prediction["label"]) <= set(small_dataset.labels) and len(prediction) == 2

    run = client.get_run(tags["distill.run_id"])
    nested = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}'")
    assert {r.info.run_name for r in nested} == {"minilm-1L", "bag-small"}
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"data_docs", "plots", "report.md"} <= artifacts
    assert any(r.data.metrics.get("distilled.val_accuracy") is not None for r in nested)


def test_mlflow_says_what_was_decided_and_why_on_the_run_the_version_and_the_models(env, small_dataset, monkeypatch):
    """What a person promoting by hand reads in MLflow: the parent run's verdict, the version's promotion reason,
    the candidate's own run as the version's source, described models and an experiment opened on its runs."""
    from mlflow.tracking import fluent

    from distill_core import names

    client = MlflowClient(env["tracking_uri"])
    recipe = write_recipe(env)
    # code in the same process chose another experiment (a notebook, another test): the run must not mind
    monkeypatch.setattr(fluent, "_active_experiment_id", fluent._active_experiment_id)  # put back afterwards
    mlflow.set_experiment(f"elsewhere-{uuid.uuid4().hex[:6]}")
    decided = {}
    for seed in (0, 0):  # the same teacher twice: v2's student cannot beat v1's
        version = register_toy_teacher(env, small_dataset, seed=seed)
        decided[version] = distill_teacher_version(env["teacher"], version, recipe, env["home"])
    first, second = decided["1"], decided["2"]
    assert (first["alias"], second["alias"]) == (CHAMPION, CHALLENGER)
    assert first["reason"].startswith("passed the gates (accuracy ") and "there was no champion" in first["reason"]
    assert "does not beat champion v1 (" in second["reason"]
    for result in (first, second):
        student = client.get_model_version(env["student"], result["student_version"])
        assert student.tags[names.PROMOTION_REASON] == result["reason"]
        parent = client.get_run(student.tags["distill.run_id"])  # the ledger's run: the teacher version's
        candidate = client.get_run(student.tags[names.CANDIDATE_RUN_ID])
        assert student.run_id == candidate.info.run_id  # the model was logged in the candidate's own run
        assert candidate.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert candidate.info.run_name == student.tags["distill.candidate"]
        tags = parent.data.tags
        verdict = f"Student v{student.version} ({student.tags['distill.candidate']}) → `{result['alias']}`"
        assert tags[names.RUN_DESCRIPTION].startswith(f"**{verdict}: {result['reason']}.**")
        assert tags[names.STUDENT_ALIAS] == result["alias"] and tags[names.OUTCOME] == "succeeded"
        assert tags[names.STUDENT_VERSION] == str(student.version) and tags[names.PROMOTION_REASON] == result["reason"]
        assert tags[names.PREFECT_FLOW_RUN_ID]
        accuracy = parent.data.metrics[names.report_metric(names.Kind.DISTILLED, "accuracy")]
        assert accuracy == float(student.tags["distill.accuracy"])  # full precision on both
        report = mlflow.artifacts.load_text(f"runs:/{parent.info.run_id}/report.md")
        assert report.startswith(verdict)
    experiment = client.get_experiment(parent.info.experiment_id)
    assert experiment.tags[names.EXPERIMENT_KIND] == names.MODEL_TRAINING
    student_model, teacher_model = (
        client.get_registered_model(env["student"]),
        client.get_registered_model(env["teacher"]),
    )
    assert f"distill promote {env['student']} <version>" in student_model.description
    assert "registering one starts a run" in teacher_model.description
    teacher_run = client.get_run(client.get_model_version(env["teacher"], "2").run_id)
    assert teacher_run.info.run_name == f"{env['teacher']}-v2"


def test_student_failing_a_gate_is_registered_without_alias(env, small_dataset):
    version = register_toy_teacher(env, small_dataset)
    recipe = write_recipe(env, gates={"min_accuracy": 0.99})
    result = distill_teacher_version(env["teacher"], version, recipe, env["home"])
    assert result["status"] == "rejected" and result["alias"] is None
    [student] = versions(env, env["student"])
    assert student.tags["distill.gate"] == "failed"
    assert "accuracy" in student.tags["distill.gate_reasons"] and "< 0.9900" in student.tags["distill.gate_reasons"]
    assert aliases(MlflowClient(env["tracking_uri"]), env["student"]) == {}
    ledger = ledger_of(env, version)
    assert ledger["status"] == "rejected" and "< 0.9900" in ledger["reasons"]


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
    assert third["alias"] == CHALLENGER and "was set by hand and the recipe keeps it" in third["reason"]

    ledger = Ledger(f"sqlite:///{Path(env['home']) / 'ledger.db'}")
    history = ledger.alias_history(env["student"], CHAMPION)
    assert history[-1]["version"] == pinned and history[-1]["actor"].startswith("outside the pipeline")

    # A person promotes by hand, then rolls back: previous is restored and both moves are recorded.
    promote(client, ledger, env["student"], third["student_version"], "person:test", "looks better")
    assert aliases(client, env["student"])[PREVIOUS] == pinned
    from distill_core.settings import load_settings
    from distill_core.status import collect

    lines = {
        t["version"]: t
        for t in collect(load_settings(env["home"]), env["teacher"], env["student"])["teacher"]["versions"]
    }
    # the teacher's ledger line shows its student's alias as it is now, not the challenger the run gave it
    assert lines["3"]["student_version"] == third["student_version"] and lines["3"]["student_alias"] == CHAMPION
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
    assert ledger_of(env, version)["status"] == "succeeded"


def test_corrupt_dataset_stops_the_run_and_the_ledger_says_failed(env, small_dataset):
    version = register_toy_teacher(env, small_dataset)
    source = env["tmp"] / "reviews.csv"
    frame = small_dataset.split("train").assign(label=lambda f: f["label"].map(dict(enumerate(small_dataset.labels))))
    pd.concat([frame] * 3).to_csv(source, index=False)  # every review three times: a broken export
    recipe = write_recipe(env, data={"source": str(source), "max_rows": None, "augment_copies": 0})
    with pytest.raises(Exception, match="dataset checks failed"):
        distill_teacher_version(env["teacher"], version, recipe, env["home"])
    ledger = ledger_of(env, version)
    assert ledger["status"] == "failed" and "dataset checks failed" in ledger["error"]
    assert "unique" in ledger["error"].lower()
    assert versions(env, env["student"]) == []


def test_a_missing_s3_bucket_stops_the_run_before_any_work_and_the_ledger_names_it(
    env, small_dataset, s3_env, monkeypatch
):
    missing = f"gone-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("DISTILL_S3", f"s3://{missing}/team")
    version = register_toy_teacher(env, small_dataset)
    with pytest.raises(StoreError, match=f"bucket '{missing}' \\(DISTILL_STORE\\) does not exist"):
        distill_teacher_version(env["teacher"], version, write_recipe(env), env["home"])
    ledger = ledger_of(env, version)
    assert ledger["status"] == "failed" and f"bucket '{missing}'" in ledger["error"]
    assert not versions(env, env["student"])
    assert not (Path(env["home"]) / "data").exists()  # stopped before any data work


def test_nan_soft_labels_stop_the_run(env, small_dataset):
    word = small_dataset.split("transfer")["text"].iloc[0].split()[0].lower()
    version = register_toy_teacher(env, small_dataset, poison=word)
    recipe = write_recipe(env)
    with pytest.raises(Exception, match="NaN"):
        distill_teacher_version(env["teacher"], version, recipe, env["home"])
    ledger = ledger_of(env, version)
    assert ledger["status"] == "failed" and "NaN or infinite logits" in ledger["error"]
    assert versions(env, env["student"]) == []


def test_watcher_handles_versions_in_order_and_newest_passing_wins(env, small_dataset):
    # distillation alone (no hard-label term): a student learns only what its teacher knows
    kd_only = [{"function": "forward_kl", "weight": 1.0, "temperature": 2.0}]
    recipe = write_recipe(env, train={"epochs": 8, "losses": kd_only})
    first = register_toy_teacher(env, small_dataset, seed=4, shuffled=True)  # learned nothing real
    second = register_toy_teacher(env, small_dataset, seed=5, epochs=150)  # a better teacher, arriving together
    results = watch_teachers(recipe, env["home"])
    assert [r["teacher_version"] for r in results] == [first, second]
    assert results[0]["status"] in ("succeeded", "rejected") and results[1]["status"] == "succeeded"
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
    release_for_rerun(load_settings(env["home"]), env["teacher"], version, env["student"])
    again = distill_teacher_version(env["teacher"], version, recipe, env["home"])
    assert again["student_version"] == first["student_version"] and again["alias"] == CHAMPION
    assert len(versions(env, env["student"])) == 1
    assert aliases(MlflowClient(env["tracking_uri"]), env["student"]) == {CHAMPION: first["student_version"]}
    assert again["seconds"]["distill"] < first["seconds"]["distill"]  # students resumed from finished checkpoints


def test_two_recipes_distilling_one_teacher_each_get_their_student_and_their_own_ledger(env, small_dataset):
    """A CPU student and an edge student of one teacher: the second is not `skipped`, and neither overwrites the
    other's ledger (it used to: one claim and one ledger per teacher version)."""
    version = register_toy_teacher(env, small_dataset)
    cpu = write_recipe(env, students=BAG_STUDENTS[:1])
    edge_env = {**env, "student": f"{env['student']}-edge"}
    edge = write_recipe(edge_env, name="edge", students=[{**BAG_STUDENTS[0], "name": "edge-bag", "dim": 4}])
    first = distill_teacher_version(env["teacher"], version, cpu, env["home"])
    second = distill_teacher_version(env["teacher"], version, edge, env["home"])
    assert first["status"] == second["status"] == "succeeded", (ledger_of(env, version), first, second)
    assert distill_teacher_version(env["teacher"], version, edge, env["home"])["status"] == "skipped"
    tags = MlflowClient(env["tracking_uri"]).get_model_version(env["teacher"], version).tags
    assert tags[f"distill.{env['student']}.status"] == tags[f"distill.{edge_env['student']}.status"] == "succeeded"
    assert ledger_of(env, version)["student_version"] == first["student_version"]
    assert ledger_of(env, version, edge_env["student"])["student_version"] == second["student_version"]
    assert watch_teachers(edge, env["home"]) == [] and watch_teachers(cpu, env["home"]) == []

    from distill_core.settings import load_settings
    from distill_core.status import collect, render

    state = collect(load_settings(env["home"]), env["teacher"], env["student"])
    (line,) = state["teacher"]["versions"]
    assert set(line["students"]) == {env["student"], edge_env["student"]}
    assert line["students"][edge_env["student"]]["student_alias"] == CHAMPION
    assert f"{edge_env['student']}: succeeded" in render(state)


def test_a_failed_rerun_keeps_the_outcome_and_points_at_the_data_docs_it_logged(env, small_dataset):
    """A rerun that fails its checks leaves the version `succeeded` (the failure is on the rerun's own MLflow run
    and in rerun_error), and the error names where the data docs were logged, not a temporary folder."""
    from distill_core.checks import ChecksFailed
    from distill_core.settings import load_settings
    from flows.distill import release_for_rerun

    version = register_toy_teacher(env, small_dataset)
    recipe = write_recipe(env)
    first = distill_teacher_version(env["teacher"], version, recipe, env["home"])
    strict = yaml.safe_load(Path(recipe).read_text())
    strict["checks"] = {"max_row_sum_error": 1e-300}  # no float32 softmax row sums to 1 that closely
    Path(recipe).write_text(yaml.safe_dump(strict))
    release_for_rerun(load_settings(env["home"]), env["teacher"], version, env["student"])
    with pytest.raises(ChecksFailed) as failed:
        distill_teacher_version(env["teacher"], version, recipe, env["home"])
    ledger = ledger_of(env, version)
    assert ledger["status"] == "succeeded" and ledger["student_version"] == first["student_version"]
    assert "soft_labels checks failed" in ledger["rerun_error"]
    message = str(failed.value)
    assert "distill-gx-" not in message and message.endswith("/data_docs/index.html")
    docs = message.rsplit("data docs at ", 1)[1]
    run_id = ledger["rerun_error"].rsplit("MLflow run ", 1)[1].rstrip(")")
    assert docs.startswith(MlflowClient(env["tracking_uri"]).get_run(run_id).info.artifact_uri)
    local = Path(docs.removeprefix("file://"))
    assert local.is_file()  # the page is there, where the message says, after the run
    index = local.read_text()  # and lists the failed validation, with no script to fetch first
    assert "<script" not in index and "soft_labels.transfer" in index and "FAILED" in index
    logged = {a.path for a in MlflowClient(env["tracking_uri"]).list_artifacts(run_id, "data_docs")}
    assert "data_docs/index.html" in logged and "data_docs/validations" in logged
    assert not {"data_docs/gx", "data_docs/great_expectations.yml"} & logged  # the site only, not the GX project


def _transformer(**fields):  # noqa: ANN003, ANN202
    return {"students": [{"name": "tf", "family": "transformer", **fields}]}


@pytest.mark.parametrize(
    "candidates, problem",
    [
        (_transformer(teacher_layers=[0, 9]), r"teacher_layers \[0, 9\] out of range.*has layers 0..5"),
        (_transformer(teacher_layers=[0], embedding_dim=1024), "embedding_dim 1024 is larger than"),
        (_transformer(teacher_layers=[0], ffn=4096), "ffn 4096 is more than the 1536 FFN channels"),
        (  # a search's architectures are checked as listed students are
            {"students": [], "search": {"transformer": {"teacher_layers": [[0]], "heads": [6, 16]}}},
            "student 'L0-h16': heads 16 is more than the 12 heads it is cut from",
        ),
    ],
)
def test_what_the_teacher_cannot_give_is_refused_before_the_claim(env, small_dataset, candidates, problem):
    """It used to be found after the claim, the dataset checks and the labeling (and a rerun turned a succeeded
    entry into failed); embedding_dim above the hidden size was silently ignored."""
    from distill_core.errors import RecipeError

    version = register_toy_teacher(env, small_dataset)
    recipe = write_recipe(env, **candidates)
    with pytest.raises(RecipeError, match=problem):
        distill_teacher_version(env["teacher"], version, recipe, env["home"])
    assert ledger_of(env, version) == {}
    assert Ledger(f"sqlite:///{Path(env['home']) / 'ledger.db'}").claimed(env["teacher"], env["student"]) == {}
    assert not (Path(env["home"]) / "store").exists()  # nothing was labeled


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has the GPU the recipe asks for")
@pytest.mark.parametrize("section", ["train", "soft_labels"])
def test_a_gpu_asked_for_on_a_machine_without_one_is_refused_by_field_before_the_claim(env, small_dataset, section):
    from distill_core.errors import DeviceError

    version = register_toy_teacher(env, small_dataset)
    recipe = write_recipe(env, **{section: {"device": "cuda"}})
    with pytest.raises(DeviceError, match=f"device: cuda for {section}.device, but torch .* sees no GPU"):
        distill_teacher_version(env["teacher"], version, recipe, env["home"])
    assert ledger_of(env, version) == {}
    assert Ledger(f"sqlite:///{Path(env['home']) / 'ledger.db'}").claimed(env["teacher"], env["student"]) == {}
    assert not (Path(env["home"]) / "store").exists()  # nothing was labeled


def test_a_run_for_a_version_not_registered_yet_claims_nothing_and_the_version_runs_when_it_comes(env, small_dataset):
    from distill_core.registry import RegistryError

    recipe = write_recipe(env)
    with pytest.raises(RegistryError, match=f"no registered model '{env['teacher']}'"):
        distill_teacher_version(env["teacher"], "1", recipe, env["home"])
    version = register_toy_teacher(env, small_dataset)
    with pytest.raises(RegistryError, match=f"'{env['teacher']}' has no version 2 \\(it has v1\\)"):
        distill_teacher_version(env["teacher"], "2", recipe, env["home"])
    second = register_toy_teacher(env, small_dataset, seed=1)
    assert (version, second) == ("1", "2")
    results = watch_teachers(recipe, env["home"])  # v2 is not blocked by the early attempt
    assert [(r["teacher_version"], r["status"]) for r in results] == [("1", "succeeded"), ("2", "succeeded")]


def test_a_teacher_whose_code_cannot_be_imported_is_one_clear_error_not_retried(env, small_dataset, tmp_path):
    """Not transient: it used to be retried three times with back-off and end in a raw traceback."""
    import importlib
    import sys
    import time

    from distill_core.errors import TeacherError

    package = tmp_path / "teamcode"
    package.mkdir()
    (package / "their_model.py").write_text(
        "import torch\n"
        "class TheirModel(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.bag = torch.nn.EmbeddingBag(512, 2)\n"
        "    def forward(self, ids, offsets):\n"
        "        return self.bag(ids, offsets)\n"
    )
    sys.path.insert(0, str(package))
    try:
        module = importlib.import_module("their_model")
        from toy_models import WordHashTokenizer

        teacher = WrappedTeacher(module.TheirModel(), WordHashTokenizer(), small_dataset.labels)
        _, version = log_teacher(
            teacher, env["teacher"], env["tracking_uri"], artifact_location=(tmp_path / "a").as_uri()
        )
    finally:
        sys.path.remove(str(package))
        sys.modules.pop("their_model", None)
    started = time.monotonic()
    with pytest.raises(TeacherError, match="its code is not importable where the pipeline runs.*module 'their_model'"):
        distill_teacher_version(env["teacher"], version, write_recipe(env), env["home"])
    assert time.monotonic() - started < 30  # no retries with back-off (2 + 4 + 8 s)
    assert ledger_of(env, version) == {}


def test_a_killed_run_shows_as_stale_and_rerun_force_takes_it_over(env, small_dataset):
    """After kill -9 the claim stops beating: status says who held it, how long ago, and that it is stale; a rerun
    needs --force, marks the dead MLflow run KILLED and runs the version to the end."""
    import time

    import sqlalchemy as sa

    from distill_core.registry import STALE_AFTER_S, RegistryError, claims, set_ledger
    from distill_core.settings import load_settings
    from distill_core.status import collect
    from flows.distill import release_for_rerun

    version = register_toy_teacher(env, small_dataset)
    settings = load_settings(env["home"])
    client, ledger = MlflowClient(env["tracking_uri"]), Ledger(settings.ledger_uri)
    # what a run killed mid-way leaves: its claim, its ledger saying running, its MLflow run RUNNING
    assert ledger.claim(env["teacher"], version, env["student"], "cli@gone:4242")
    dead = client.create_run(client.create_experiment(f"dead-{uuid.uuid4().hex[:6]}")).info.run_id
    set_ledger(client, env["teacher"], version, env["student"], "running", run_id=dead, claimed_by="cli@gone:4242")
    with pytest.raises(RegistryError, match="its run is alive"):  # a fresh heartbeat: never taken
        release_for_rerun(settings, env["teacher"], version, env["student"], force=True)
    with ledger.engine.begin() as conn:  # the heartbeats stopped with the process
        conn.execute(claims.update().values(heartbeat_at=time.time() - STALE_AFTER_S - 5))
    (line,) = collect(settings, env["teacher"], env["student"])["teacher"]["versions"]
    assert line["status"] == "running" and line["claim_stale"] and line["claimed_by"] == "cli@gone:4242"
    assert "STALE" in line["claim"] and line["claim_age_s"] >= 0
    assert watch_teachers(write_recipe(env), env["home"]) == []  # the watcher never takes a stale claim itself
    with pytest.raises(RegistryError, match="add --force"):
        release_for_rerun(settings, env["teacher"], version, env["student"])
    release_for_rerun(settings, env["teacher"], version, env["student"], force=True)
    assert client.get_run(dead).info.status == "KILLED"
    result = distill_teacher_version(env["teacher"], version, write_recipe(env), env["home"])
    assert result["status"] == "succeeded" and ledger_of(env, version)["status"] == "succeeded"
    assert sa.inspect(ledger.engine).has_table("distill_claims_v2")


def test_a_run_in_stages_logs_every_stage_and_its_student_names_them(env, small_dataset):
    """teacher → assistant → candidate, two born-again generations: each stage a nested run with its model (so it
    can be registered), the registered student's lineage names the stages, the parent's table reports them."""
    version = register_toy_teacher(env, small_dataset)
    assistant = {"name": "ta", "family": "embedding_bag", "buckets": 8192, "dim": 16, "lr": 0.1}
    recipe = write_recipe(env, students=[BAG_STUDENTS[0]], stages={"assistants": [assistant], "generations": 2})
    result = distill_teacher_version(env["teacher"], version, recipe, env["home"])

    assert result["status"] == "succeeded"
    client = MlflowClient(env["tracking_uri"])
    student = client.get_model_version(env["student"], result["student_version"])
    assert student.tags["distill.stages"] == "ta (assistant) → 2 born-again generations"
    run = client.get_run(student.tags["distill.run_id"])
    nested = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}'")
    by_name = {r.info.run_name: r for r in nested}
    assert set(by_name) == {"bag-small", "ta (assistant)", "bag-small.gen1"}
    for stage in ("ta (assistant)", "bag-small.gen1"):
        assert by_name[stage].data.metrics["distilled.test_accuracy"] > 0
        (logged,) = mlflow.search_logged_models(
            experiment_ids=[run.info.experiment_id],
            filter_string=f"source_run_id = '{by_name[stage].info.run_id}'",
            output_format="list",
        )
        assert mlflow.pyfunc.load_model(logged.model_uri).predict(pd.DataFrame({"text": ["a fine film"]})) is not None
    report = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/report.md")
    assert "| ta (assistant) |" in report and "| bag-small.gen1 |" in report


def test_a_warm_start_falls_back_to_cold_without_a_champion_then_starts_from_it_on_the_rows_that_moved(
    env, small_dataset
):
    warm = {"steps": 0.3, "changed": 0.05, "replay": 0.1}
    recipe = write_recipe(env, students=[BAG_STUDENTS[0]], warm_start=warm)
    first = distill_teacher_version(env["teacher"], register_toy_teacher(env, small_dataset), recipe, env["home"])
    assert first["alias"] == CHAMPION
    assert (
        ledger_of(env, "1")["start"]
        == f"cold: warm_start asked for, but {env['student']} has no champion to start from"
    )
    client = MlflowClient(env["tracking_uri"])
    assert "distill.warm_start" not in client.get_model_version(env["student"], first["student_version"]).tags

    second = distill_teacher_version(
        env["teacher"], register_toy_teacher(env, small_dataset, seed=1, epochs=60), recipe, env["home"]
    )
    start = ledger_of(env, "2")["start"]
    # 210 train reviews, one augmented copy: 420 transfer rows, 14 steps an epoch, 3 epochs cold: 42 steps
    assert start.startswith(f"warm from {env['student']} v1 (bag-small), 13 steps, on ")
    trained, total = (int(n.replace(",", "")) for n in start.split(", on ")[1].split(" transfer rows")[0].split(" of "))
    assert total == 420 and 0 < trained < total
    student = client.get_model_version(env["student"], second["student_version"])
    assert student.tags["distill.warm_start"] == first["student_version"]
    run = client.get_run(student.tags["distill.candidate_run_id"])
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "distilled.val_accuracy")]
    assert max(steps) <= 13  # the warm budget (or an early stop before it), not the cold run's 42
    assert client.get_run(student.tags["distill.run_id"]).data.params["warm_start"] == start


def test_an_ensemble_is_distilled_once_per_combination_and_its_student_names_every_member(env, small_dataset):
    """Two registered teachers as one (the average of their probabilities): the run names both; the other member's
    version of the same combination claims nothing; a new version of one member makes exactly one run; a rerun of an
    unchanged ensemble reuses its stored signal."""
    from distill_core.settings import load_settings
    from distill_core.status import collect, render
    from flows.distill import release_for_rerun

    other = {**env, "teacher": f"{env['teacher']}-b"}
    register_toy_teacher(env, small_dataset, seed=0)
    register_toy_teacher(other, small_dataset, seed=3, epochs=20)
    a, b = env["teacher"], other["teacher"]
    recipe = write_recipe(env, students=[BAG_STUDENTS[0]], teachers=[{"name": a}, {"name": b, "weight": 2}])

    first = distill_teacher_version(a, "1", recipe, env["home"])
    assert first["status"] == "succeeded"
    client = MlflowClient(env["tracking_uri"])
    student = client.get_model_version(env["student"], first["student_version"])
    assert student.tags["distill.teachers"] == f"{a} v1 (weight 1), {b} v1 (weight 2)"
    run = client.get_run(student.tags["distill.run_id"])
    report = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/report.md")
    assert f"| member {a} v1 |" in report and f"| bag-small (distilled) vs member {b} v1 |" in report
    candidate = client.get_run(student.tags["distill.candidate_run_id"])
    assert 0 < candidate.data.metrics[f"distilled.test_agreement vs member {a} v1"] <= 1

    assert distill_teacher_version(b, "1", recipe, env["home"])["status"] == "skipped"  # the same combination
    assert watch_teachers(recipe, env["home"]) == []
    register_toy_teacher(env, small_dataset, seed=5)  # a v2
    (ran,) = watch_teachers(recipe, env["home"])
    assert ran["teacher_version"] == "2" and ran["status"] in ("succeeded", "rejected")
    assert watch_teachers(recipe, env["home"]) == []

    store = Path(env["home"]) / "store" / "soft_labels"
    entries = sorted(p.name for p in store.iterdir())
    release_for_rerun(load_settings(env["home"]), a, "2", env["student"], recipe=load_recipe(recipe))
    again = distill_teacher_version(a, "2", recipe, env["home"])
    assert again["status"] == ran["status"] and sorted(p.name for p in store.iterdir()) == entries
    state = collect(load_settings(env["home"]), a, env["student"], [b])
    assert [m["name"] for m in state["members"]] == [b]
    assert f"from teachers {a} v1 (weight 1), {b} v1 (weight 2)" in render(state)


def test_the_champion_teaches_beside_a_new_teacher_version_pinned_by_version_and_a_promotion_starts_nothing(
    env, small_dataset
):
    teachers = [{"name": env["teacher"]}, {"name": env["student"], "version": "champion", "weight": 0.5}]
    recipe = write_recipe(env, students=[BAG_STUDENTS[0]], teachers=teachers)
    register_toy_teacher(env, small_dataset)
    first = distill_teacher_version(env["teacher"], "1", recipe, env["home"])  # no champion yet: the teacher alone
    assert first["alias"] == CHAMPION
    client = MlflowClient(env["tracking_uri"])
    tags = client.get_model_version(env["student"], first["student_version"]).tags
    assert tags["distill.teachers"] == f"{env['teacher']} v1 (weight 1)"
    assert watch_teachers(recipe, env["home"]) == []  # the promotion made a champion, and no run

    register_toy_teacher(env, small_dataset, seed=4)
    (second,) = watch_teachers(recipe, env["home"])
    tags = client.get_model_version(env["student"], second["student_version"]).tags
    pinned = f"{env['teacher']} v2 (weight 1), {env['student']} v{first['student_version']} (weight 0.5)"
    assert tags["distill.teachers"] == pinned
    assert client.get_run(tags["distill.run_id"]).data.params["teachers"] == pinned


def test_only_the_teacher_version_holding_the_recipes_alias_is_distilled(env, small_dataset):
    recipe = write_recipe(env, students=[BAG_STUDENTS[0]], qualify={"alias": "production"})
    version = register_toy_teacher(env, small_dataset)
    skipped = distill_teacher_version(env["teacher"], version, recipe, env["home"])
    assert skipped["status"] == "skipped" and "does not hold the alias 'production'" in skipped["reason"]
    assert watch_teachers(recipe, env["home"]) == [] and ledger_of(env, version) == {}
    MlflowClient(env["tracking_uri"]).set_registered_model_alias(env["teacher"], "production", version)
    (ran,) = watch_teachers(recipe, env["home"])
    assert ran["teacher_version"] == version and ran["status"] == "succeeded"


def test_ensemble_members_resolve_to_registered_versions_and_one_that_names_nothing_is_refused_by_field(
    env, small_dataset
):
    from distill_core.ensemble import resolve
    from distill_core.recipe import parse_recipe
    from distill_core.registry import RegistryError

    for seed in (0, 1, 2):
        register_toy_teacher(env, small_dataset, seed=seed, epochs=5)
    client = MlflowClient(env["tracking_uri"])
    client.set_registered_model_alias(env["teacher"], "production", "2")
    t = env["teacher"]

    def members(*teachers):
        recipe = parse_recipe({"name": "x", "students": BAG_STUDENTS[:1], "teachers": list(teachers)})
        return [(name, version) for name, version, _ in resolve(recipe, client).members]

    assert members({"name": t, "version": 1}, {"name": t, "version": "production"}) == [(t, "1"), (t, "2")]
    assert members({"name": t, "last": 2}) == [(t, "2"), (t, "3")]
    assert members({"name": t, "version": "latest"}, {"name": t, "version": 1}) == [(t, "3"), (t, "1")]
    with pytest.raises(RegistryError, match=f"teachers.1: {t} has no version 7 \\(it has v1, v2, v3\\)"):
        members({"name": t}, {"name": t, "version": 7})
    with pytest.raises(RegistryError, match=f"teachers.1: {t} has no alias 'staging'"):
        members({"name": t}, {"name": t, "version": "staging"})


def test_an_export_that_diverges_beyond_the_recipes_tolerance_is_not_registered_and_the_ledger_says_why(
    env, small_dataset
):
    """A real export, held to a tolerance tighter than float rounding: what would serve is not what was measured."""
    version = register_toy_teacher(env, small_dataset)
    recipe = write_recipe(env, students=[BAG_STUDENTS[0]], deploy={"max_logit_diff": 1e-12})
    result = distill_teacher_version(env["teacher"], version, recipe, env["home"])

    assert result["status"] == "rejected" and result["student_version"] == "" and result["alias"] is None
    assert versions(env, env["student"]) == []  # nothing registered
    ledger = ledger_of(env, version)
    assert ledger["status"] == "rejected" and ledger["student_version"] == ""
    assert "the ONNX export of bag-small (distilled) diverges from the torch student" in ledger["reasons"]
    assert "deploy.max_logit_diff 1e-12" in ledger["reasons"] and result["reason"].startswith("not registered")


def test_the_gates_read_the_deploy_targets_size_and_the_version_serves_that_artifact(env, small_dataset):
    """bag-large is 0.52 MB as float32 weights and 0.14 MB as int8: a 0.3 MB size gate passes only the int8 export."""
    version = register_toy_teacher(env, small_dataset)
    gates = {"max_size_mb": 0.3, "max_param_ratio": 100.0}
    as_torch = write_recipe(env, students=[BAG_STUDENTS[1]], gates=gates)
    result = distill_teacher_version(env["teacher"], version, as_torch, env["home"])
    assert result["status"] == "rejected" and "size MB 0.5" in ledger_of(env, version)["reasons"]

    student = f"{env['student']}-int8"
    as_int8 = write_recipe(env, [BAG_STUDENTS[1]], "t8", gates=gates, deploy={"format": "onnx-int8", "threads": 1},
                           student_registered_name=student)  # fmt: skip
    result = distill_teacher_version(env["teacher"], version, as_int8, env["home"])
    assert result["status"] == "succeeded" and result["alias"] == CHAMPION, result["reason"]
    client = MlflowClient(env["tracking_uri"])
    tags = client.get_model_version_by_alias(student, CHAMPION).tags
    assert tags["distill.deploy_format"] == "onnx-int8" and float(tags["distill.onnx_parity"]) == 1.0
    measured = client.get_run(tags["distill.candidate_run_id"]).data.metrics
    assert float(tags["distill.p95_ms"]) == measured["deploy.onnx-int8.p95_ms"]  # latency of the int8 model
    assert measured["deploy.onnx-int8.bytes"] * 3 < measured["deploy.onnx.bytes"]
    served = mlflow.pyfunc.load_model(f"models:/{student}@champion")
    assert type(served.unwrap_python_model().served).__name__ == "OnnxStudent"
    texts = small_dataset.split("test")["text"].tolist()
    module = served.unwrap_python_model().module  # the torch student beside its export
    as_torch = [small_dataset.labels[i] for i in module(**module.tokenize(texts)).argmax(1)]
    assert (served.predict(pd.DataFrame({"text": texts}))["label"] == as_torch).mean() >= 0.95
