"""Teachers: the real MiniLM teacher and a plain torch module both round-trip through the MLflow registry."""

import torch
from mlflow.tracking import MlflowClient
from toy_models import BagTeacher, WordHashTokenizer

from distill_core.errors import TeacherError
from distill_core.evaluate import predict
from distill_core.modules import content_digest
from distill_core.teachers import WrappedTeacher, load_teacher, log_teacher  # the README's import path


def test_minilm_teacher_loads_back_by_name_and_version(registered_teacher, small_dataset, tracking_uri):
    name, version = registered_teacher
    loaded = load_teacher(name, version, tracking_uri)
    texts = small_dataset.split("test")["text"].tolist()
    logits = predict(loaded.module, texts)
    assert logits.shape == (len(texts), 2)
    accuracy = (logits.argmax(1) == small_dataset.split("test")["label"].to_numpy()).mean()
    assert accuracy > 0.6  # a trained head on real MiniLM features, well above chance on real reviews
    tags = MlflowClient(tracking_uri).get_model_version(name, version).tags
    assert tags["distill.role"] == "teacher"
    assert tags["distill.content_digest"] == loaded.content_digest
    assert tags["distill.dataset_digest"] == small_dataset.digest
    assert loaded.identity == f"{name}/{version}@{loaded.content_digest}"


def test_plain_torch_module_is_a_teacher(tracking_uri):
    teacher = WrappedTeacher(BagTeacher(), WordHashTokenizer(), labels=("neg", "pos"))
    name, version = log_teacher(teacher, "byo-teacher", tracking_uri)
    loaded = load_teacher(name, version, tracking_uri)
    texts = ["a moving, funny film", "dull and far too long"]
    torch.testing.assert_close(loaded.module(**loaded.module.tokenize(texts)), teacher(**teacher.tokenize(texts)))
    assert loaded.content_digest == content_digest(teacher)


def test_module_without_the_contract_is_refused(tracking_uri):
    try:
        log_teacher(BagTeacher(), "not-a-teacher", tracking_uri)
    except TeacherError as err:
        assert "lacks ['labels', 'tokenize']" in str(err) and "WrappedTeacher" in str(err)
    else:
        raise AssertionError("a bare module was registered as a teacher")


def test_unknown_version_is_a_clear_error(registered_teacher, tracking_uri):
    name, _ = registered_teacher
    try:
        load_teacher(name, "999", tracking_uri)
    except TeacherError as err:
        assert f"cannot load teacher '{name}' version 999" in str(err)
    else:
        raise AssertionError("loading a missing version succeeded")
