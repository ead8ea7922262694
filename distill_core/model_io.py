"""Models in and out of the MLflow registry: teachers, students and champions, in one format, by one loader.

The format: the whole torch module, pickled (it carries its tokenizer and takes a tokenised dict, which MLflow 3's
`pt2` default cannot). A teacher is logged with the pytorch flavour; a student as a pyfunc of its task (raw input
in, predictions out) with the same pickle as its artifact. `load_module` reads either back, so any registered
version, a student included, can be a teacher.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.models.model import ModelInfo
from mlflow.tracking import MlflowClient
from torch import nn

from distill_core import names
from distill_core.errors import DistillError, TeacherError, redact
from distill_core.modules import LoadedTeacher, TextModule, check_module, content_digest, picklable, save_module
from distill_core.tasks import CLASSIFICATION, Task
from distill_core.tasks.classification import ONNX_ARTIFACT, STUDENT_ARTIFACT

if TYPE_CHECKING:
    from distill_core.deploy import Deployment

TEACHER_ARTIFACT = "teacher"


class ServingError(DistillError):
    """A student could not be logged or registered as a servable model."""


def pip_requirements() -> list[str]:
    """Exact pins of what unpickling and running a model needs (torch without its local tag, e.g. +cpu)."""
    import onnxruntime
    import tokenizers
    import transformers

    return [
        f"torch=={torch.__version__.split('+')[0]}",
        f"transformers=={transformers.__version__}",
        f"onnxruntime=={onnxruntime.__version__}",
        f"tokenizers=={tokenizers.__version__}",
        f"pandas=={pd.__version__}",
        f"mlflow=={mlflow.__version__}",
    ]


def log_teacher(
    teacher: TextModule,
    registered_name: str,
    tracking_uri: str,
    tags: dict[str, str] | None = None,
    metrics: dict[str, float] | None = None,
    experiment: str = "teachers",
    artifact_location: str | None = None,
) -> tuple[str, str]:
    """Log a teacher module to MLflow and register it; returns (registered name, version)."""
    check_module(teacher, "teacher")
    teacher.eval()
    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    experiment_id = (
        found.experiment_id
        if found is not None
        else client.create_experiment(
            experiment, artifact_location=artifact_location, tags={names.EXPERIMENT_KIND: names.MODEL_TRAINING}
        )
    )
    version_tags = {
        names.ROLE: names.TEACHER,
        names.CONTENT_DIGEST: content_digest(teacher),
        names.LABELS: json.dumps(list(teacher.labels)),
        **(tags or {}),
    }
    # Our teacher classes' pickles name distill_core.teachers (so earlier releases' pickles load): cloudpickle pickles
    # a class by reference only when the module it names is imported, and by value otherwise, which breaks the class
    # (its tokenize became TextModule's). Imported here, the module every loader imports is what the pickle names.
    import distill_core.teachers  # noqa: F401

    # experiment_id, not set_experiment: registering a teacher leaves the process's active experiment as it was
    with mlflow.start_run(experiment_id=experiment_id, run_name=registered_name) as run:
        mlflow.log_params({"teacher_class": type(teacher).__name__, "labels": ",".join(teacher.labels)})
        if metrics:
            mlflow.log_metrics(metrics)
        info = mlflow.pytorch.log_model(
            picklable(teacher),
            name=TEACHER_ARTIFACT,
            serialization_format="pickle",
            pip_requirements=pip_requirements(),
            registered_model_name=registered_name,
            await_registration_for=60,
        )
    version = str(info.registered_model_version)
    client.set_tag(run.info.run_id, "mlflow.runName", f"{registered_name}-v{version}")
    for key, value in version_tags.items():
        client.set_model_version_tag(registered_name, version, key, value)
    if not client.get_registered_model(registered_name).description:
        client.update_registered_model(
            registered_name,
            description=(
                "A teacher for continuous distillation. Each new version is distilled by the recipes that name this "
                "model (teacher.registered_name): registering one starts a run (MLflow webhook, or the scheduled "
                "watcher). A version's distill.<student model>.* tags are that student model's ledger for it "
                "(status, student_version, student_alias, run_id, reasons)."
            ),
        )
    return registered_name, version


def load_module(model_uri: str, served: bool = False) -> TextModule:
    """The torch module of a logged model: a teacher (pytorch flavour) or a student (its pyfunc's pickle); with
    `served`, a student as its pyfunc serves it (its export, in the format its gates passed)."""
    info = mlflow.models.get_model_info(model_uri)
    if "pytorch" in info.flavors:
        module = mlflow.pytorch.load_model(model_uri, map_location="cpu")
    else:
        wrapped = mlflow.pyfunc.load_model(model_uri).unwrap_python_model()
        module = getattr(wrapped, "module", None)
        if served and getattr(wrapped, "served", None) is not None:
            return wrapped.served
        if not isinstance(module, nn.Module):
            raise TeacherError(
                f"{model_uri} is a pyfunc model ({type(wrapped).__name__}) that holds no torch module: register "
                "teachers with distill_core.teachers.log_teacher, students with distill_core.model_io.log_student"
            )
    return module.eval()


def load_teacher(name: str, version: str, tracking_uri: str) -> LoadedTeacher:
    """Load a registered teacher version by name and version, and check it follows the model contract."""
    mlflow.set_tracking_uri(tracking_uri)
    try:
        module = load_module(f"models:/{name}/{version}")
    except mlflow.exceptions.MlflowException as err:
        raise TeacherError(
            redact(f"cannot load teacher '{name}' version {version} from {tracking_uri}: {err.message}")
        ) from None
    except (ImportError, AttributeError) as err:  # unpickling needs the teacher's classes: not a transient error
        module_name = getattr(err, "name", None)
        raise TeacherError(
            f"cannot load teacher '{name}' version {version}: its code is not importable where the pipeline runs "
            f"({type(err).__name__}: {err}). Install the package that defines the teacher's classes"
            + (f" (module {module_name!r})" if module_name else "")
            + " in this environment, on every worker"
        ) from None
    check_module(module, "teacher")
    return LoadedTeacher(module, name, str(version), content_digest(module))


class LoggedStudent(NamedTuple):
    """What `log_student` made: the logged model (`info.model_uri` is `models:/m-<id>`) and the registered
    version, None when the student was not registered. Unpacks as `(info, version)`."""

    info: ModelInfo
    version: str | None


def log_student(
    student: TextModule,
    *,
    name: str = "student",
    registered_model_name: str | None,
    input_texts: Any,
    tags: dict[str, str] | None = None,
    description: str | None = None,
    await_registration_for: int = 60,
    task: Task = CLASSIFICATION,
    deployment: Deployment | None = None,
) -> LoggedStudent:
    """Log the student as its task's pyfunc model in the active run and, given a name, register it, then set the
    version's description and tags (ours: distill.role, distill.labels, distill.content_digest). With a deployment,
    its exported folder travels as the model's `onnx` artifact and the pyfunc serves the deploy format."""
    try:
        check_module(student, "student")
    except TeacherError as err:
        raise ServingError(str(err)) from None
    if mlflow.active_run() is None:
        raise ServingError(
            "log_student logs into the active MLflow run, and none is active: call it inside `with mlflow.start_run():`"
        )
    if len(input_texts) == 0:
        raise ServingError("log_student needs at least one input text for the model's input example")
    student.eval()
    with tempfile.TemporaryDirectory(prefix="student-") as tmp:
        path = Path(tmp) / "student.pt"
        save_module(student, path)
        artifacts, served = {STUDENT_ARTIFACT: str(path)}, None
        if deployment is not None and deployment.folder is not None:
            artifacts[ONNX_ARTIFACT] = str(deployment.folder)
            served = {"format": deployment.format, "threads": deployment.threads}
        info = mlflow.pyfunc.log_model(
            name=name,
            python_model=task.python_model(),
            artifacts=artifacts,
            model_config=served,
            signature=task.signature(student),
            input_example=task.input_example(student, input_texts),
            pip_requirements=pip_requirements(),
        )
    if registered_model_name is None:
        return LoggedStudent(info, None)
    version_tags = {
        names.ROLE: names.STUDENT,
        names.LABELS: json.dumps(list(student.labels)),
        names.CONTENT_DIGEST: content_digest(student),
        **(tags or {}),
    }
    # The version and its tags in one registry call: a process killed while registering leaves either no version
    # or one that carries its idempotency key (so a rerun finds it instead of registering a second one).
    registered = mlflow.register_model(
        info.model_uri, registered_model_name, await_registration_for=await_registration_for, tags=version_tags
    )
    version = str(registered.version)
    if description is not None:
        MlflowClient().update_model_version(registered_model_name, version, description=description)
    return LoggedStudent(info, version)


def export_registered(tracking_uri: str, ref: str, fmt: str, out: Path) -> Path:
    """Write a registered student (`NAME@ALIAS` or `NAME/VERSION`) as a self-contained folder in one ONNX format
    (model, tokenizer, labels in config.json, runtime.py, example.py). The version's own export when it has one (what
    its gates measured); a version logged by an earlier release, which has none, is exported from its torch module
    now, and refused if the export does not agree with it on the version's input example."""
    from distill_core.export import ONNX_FORMATS, with_format

    if fmt not in ONNX_FORMATS:
        raise ServingError(f"--format {fmt!r}: the exported formats are {', '.join(ONNX_FORMATS)}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ServingError(f"--out {out} is not empty: give a new or empty folder")
    name, at, alias = ref.partition("@")
    if not at:
        name, _, alias = ref.rpartition("/")
    if not name or not alias:
        raise ServingError(f"expected NAME@ALIAS or NAME/VERSION such as sentiment-student@champion, got {ref!r}")
    mlflow.set_tracking_uri(tracking_uri)  # models:/ URIs resolve against the process's registry, not a client's
    client = MlflowClient(tracking_uri)
    version = client.get_model_version_by_alias(name, alias) if at else client.get_model_version(name, alias)
    uri = f"models:/{name}/{version.version}"
    with tempfile.TemporaryDirectory(prefix="distill-export-") as tmp:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp))
        folder = local / "artifacts" / ONNX_ARTIFACT
        if not (folder / "config.json").is_file():
            student = load_module(uri)
            folder = _export_now(student, local, Path(tmp) / "fresh", f"{name} v{version.version}")
        return with_format(folder, out, fmt)


def _export_now(student: TextModule, model_dir: Path, folder: Path, who: str) -> Path:
    """Export a student logged without an export, checked against it on its logged input example."""
    from distill_core.export import OnnxStudent, export
    from distill_core.lm import CausalLM
    from distill_core.tasks import CAUSAL_LM

    example = mlflow.models.Model.load(str(model_dir)).load_input_example(str(model_dir))
    if not isinstance(example, pd.DataFrame) or example.empty:
        raise ServingError(f"{who} has no ONNX export and no input example to check one against")
    texts = [str(t) for t in example.iloc[:, 0]]
    export(student, folder, texts)
    task: Task = CLASSIFICATION
    inputs: list[Any] = texts
    if isinstance(student, CausalLM):  # its next tokens over the examples, as one block
        task, inputs = CAUSAL_LM, [np.array(student.tokenizer(" ".join(texts))["input_ids"], dtype=np.int64)]
    agreement, diff = task.parity(student, OnnxStudent(folder, "onnx"), inputs)
    if agreement < 1.0 or diff > 1e-3:
        raise ServingError(
            f"{who} was registered without an ONNX export, and exporting it now gives a model that disagrees with "
            f"it on its input example (top-1 agreement {agreement:.3f}, max |logit difference| {diff:.3g})"
        )
    return folder
