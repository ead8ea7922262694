"""Teachers: the real MiniLM teacher and a plain torch module both round-trip through the MLflow registry."""

import os
import subprocess
import sys
from pathlib import Path

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


def test_a_teacher_logged_without_importing_distill_core_teachers_loads_whole_elsewhere(tmp_path):
    """Regression: WrappedTeacher's pickles name distill_core.teachers; where a process had not imported that module
    (logging with distill_core.modules and model_io only, as the topology test's worker-side teacher did), cloudpickle
    pickled the class by value, and the loaded teacher's tokenize was TextModule's (NotImplementedError)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    log = (
        "import sys; from toy_models import BagTeacher, WordHashTokenizer; "
        "from distill_core.modules import WrappedTeacher; from distill_core.model_io import log_teacher; "
        "assert 'distill_core.teachers' not in sys.modules; "
        f"log_teacher(WrappedTeacher(BagTeacher(), WordHashTokenizer(), ('neg', 'pos')), 'lean', {uri!r})"
    )
    load = (
        "from distill_core.model_io import load_teacher; "
        f"print(load_teacher('lean', '1', {uri!r}).module.tokenize(['a fine film']))"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    for code in (log, load):
        done = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
    assert "'ids': tensor(" in done.stdout


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
