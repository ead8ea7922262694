"""The core's seams: a recipe's task selects its task, teacher signals come from a source, lineage is one type
written and read in one place, and one model format and loader serve teachers, students and champions."""

from __future__ import annotations

import pickle
import uuid
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from distill_core import names
from distill_core.errors import RecipeError, TeacherError
from distill_core.lineage import Lineage
from distill_core.model_io import load_teacher, log_student, log_teacher
from distill_core.modules import TextClassifier, WrappedTeacher
from distill_core.recipe import TrainConfig, parse_recipe
from distill_core.signals import DenseSignal, OnlineSource, StoredSource
from distill_core.students import EmbeddingBagStudent, TransformerStudent
from distill_core.tasks import CLASSIFICATION, TASKS, task_of
from distill_core.tasks.classification import TextClassifierModel
from distill_core.train import TransferSet, objective_for, source_for

BAG = {"name": "bag", "family": "embedding_bag", "buckets": 1024, "dim": 8}


def test_the_recipe_s_task_selects_the_task_and_an_unknown_task_is_refused_with_the_tasks_there_are():
    assert task_of(parse_recipe({"name": "r", "students": [BAG]})) is CLASSIFICATION
    with pytest.raises(RecipeError, match=r"task: unknown task; tasks: classification, causal_lm \(got 'ranking'\)"):
        parse_recipe({"name": "r", "task": "ranking", "students": [BAG]})


def test_a_field_the_task_does_not_have_is_refused_naming_the_field_and_the_task():
    with pytest.raises(RecipeError) as error:
        parse_recipe({"name": "r", "students": [BAG], "data": {"block_size": 256}})
    assert "data.block_size: unknown field for task 'classification'; allowed fields here: source," in str(error.value)


def test_every_task_has_its_recipe_class_and_every_recipe_class_its_task():
    from distill_core.recipe import RECIPES

    assert set(TASKS) == set(RECIPES)
    for name, task in TASKS.items():
        assert task.name == name and RECIPES[name].model_fields["task"].default == name


def test_lineage_written_as_tags_reads_back_the_same_and_tolerates_what_earlier_versions_lack():
    lineage = Lineage("t", "3", "md5", "repo", "data/prepared", "abc123", "key", "hash", "run")
    tags = {**lineage.tags(), names.GATE: names.GATE_PASSED, "mlflow.source": "x"}
    assert Lineage.from_tags(tags) == lineage
    assert set(lineage.tags()) == {names.tag(field) for field in lineage.as_fields()}
    hand_logged = Lineage.from_tags({names.tag("teacher_name"): "t", names.tag("teacher_version"): "1"})
    assert hand_logged.as_fields() == {"teacher_name": "t", "teacher_version": "1"}
    assert hand_logged.data_sentence() == "" and "abc123" in lineage.data_sentence()
    assert lineage.idempotency_key("bag") == "t/3:hash:bag"


@pytest.mark.parametrize(
    ("old_path", "cls"),
    [
        ("distill_core.teachers TextClassifier", TextClassifier),
        ("distill_core.teachers WrappedTeacher", WrappedTeacher),
        ("distill_core.serving TextClassifierModel", TextClassifierModel),
        ("distill_core.students TransformerStudent", TransformerStudent),
        ("distill_core.students EmbeddingBagStudent", EmbeddingBagStudent),
    ],
)
def test_classes_that_models_pickled_by_earlier_releases_name_still_resolve(old_path, cls):
    """Registered teachers and students are pickles that name their classes by module path: unpickling one looks
    the class up exactly like this. And what this release pickles names the same paths, so a worker still on the
    previous release (a rolling deploy, a rollback) loads the models registered from now on."""
    module, name = old_path.split()
    assert pickle.loads(f"c{module}\n{name}\n.".encode()) is cls
    assert f"c{module}\n{name}\n".encode() in pickle.dumps(cls, protocol=0)


def test_the_source_is_chosen_once_from_the_objective_and_the_recipe(registered_teacher, tracking_uri):
    teacher = load_teacher(*registered_teacher, tracking_uri).module
    student = EmbeddingBagStudent(("fresh", "rotten"), 1024, 8, 1)
    logits = np.array([[1.0, -1.0], [0.0, 2.0], [3.0, 0.5]], dtype=np.float32)
    transfer = TransferSet(["a", "b", "c"], np.array([0, 1, 0]), logits)
    kd = TrainConfig()
    stored = source_for(objective_for(student, kd, None), kd, transfer, teacher)
    assert isinstance(stored, StoredSource)
    signal = stored.signal([2, 0], ["c", "a"], CLASSIFICATION.batch(student, ["c", "a"], torch.tensor([0, 0])))
    assert isinstance(signal, DenseSignal) and torch.equal(signal.logits, torch.tensor(logits[[2, 0]]))
    online = TrainConfig(mode="online")
    source = source_for(objective_for(student, online, teacher), online, transfer, teacher)
    assert isinstance(source, OnlineSource)
    texts = ["a warm, funny film", "dull"]
    with torch.no_grad():
        expected = teacher(**teacher.tokenize(texts))
    batch = CLASSIFICATION.batch(student, texts, torch.tensor([0, 1]))
    assert torch.allclose(source.signal([0, 1], texts, batch).logits, expected)
    ce_only = TrainConfig(losses=[{"function": "ce"}])
    assert source_for(objective_for(student, ce_only, None), ce_only, transfer, None) is None
    with pytest.raises(ValueError, match="offline distillation needs the stored teacher signal"):
        source_for(objective_for(student, kd, None), kd, TransferSet(["a"], np.array([0]), None), None)


def _experiment(tracking_uri: str, tmp_path: Path) -> None:
    mlflow.set_tracking_uri(tracking_uri)
    name = f"tasks-{uuid.uuid4().hex[:8]}"
    mlflow.set_experiment(
        experiment_id=MlflowClient(tracking_uri).create_experiment(name, artifact_location=tmp_path.as_uri())
    )


def test_a_registered_student_loads_as_a_teacher_and_both_carry_the_same_pins(tracking_uri, tmp_path):
    """One format and one loader: a student version is a teacher as it stands (born-again, champion as teacher)."""
    _experiment(tracking_uri, tmp_path)
    torch.manual_seed(0)
    student = EmbeddingBagStudent(("fresh", "rotten"), 1024, 8, 1)
    name = f"student-{uuid.uuid4().hex[:6]}"
    with mlflow.start_run():
        _, version = log_student(student, registered_model_name=name, input_texts=["fine"])
    assert version is not None
    loaded = load_teacher(name, version, tracking_uri)
    texts = ["a warm film", "dull"]
    with torch.no_grad():
        assert torch.equal(loaded.module(**loaded.module.tokenize(texts)), student(**student.tokenize(texts)))
    _, teacher_version = log_teacher(student, f"teacher-{name}", tracking_uri, artifact_location=tmp_path.as_uri())

    def pins(uri: str) -> list[str]:
        return Path(mlflow.pyfunc.get_model_dependencies(uri)).read_text().split()

    assert pins(f"models:/{name}/{version}") == pins(f"models:/teacher-{name}/{teacher_version}")


def test_the_flow_module_a_worker_starts_from_imports_without_torch():
    """A worker reports a run as started once it has imported flows.distill: torch (seconds) comes later."""
    import subprocess
    import sys

    code = (
        "import sys, flows.distill; assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


def test_a_pyfunc_model_that_holds_no_module_is_refused_as_a_teacher_by_name(tracking_uri, tmp_path):
    class Echo(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input, params=None):
            return model_input

    _experiment(tracking_uri, tmp_path)
    name = f"foreign-{uuid.uuid4().hex[:6]}"
    with mlflow.start_run():
        mlflow.pyfunc.log_model(name="model", python_model=Echo(), registered_model_name=name)
    with pytest.raises(TeacherError, match="is a pyfunc model \\(Echo\\) that holds no torch module"):
        load_teacher(name, "1", tracking_uri)
