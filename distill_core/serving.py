"""Serve a student: log it as an MLflow pyfunc model that takes raw text and returns labels and probabilities.

The pyfunc class lives here, so a process that has `distill_core` installed can load the model
(`mlflow.pyfunc.load_model`, `mlflow models serve --env-manager local`); no code is copied into the model.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.models.model import ModelInfo
from mlflow.pyfunc import PythonModel
from mlflow.tracking import MlflowClient
from mlflow.types import ColSpec, Schema, TensorSpec

from distill_core.errors import DistillError
from distill_core.teachers import TextModule, content_digest, length_batches, picklable

STUDENT_ARTIFACT = "student"
TEXT_COLUMN = "text"
PREDICT_BATCH_SIZE = 256


class ServingError(DistillError):
    """A student could not be logged or registered as a servable model."""


def pip_requirements() -> list[str]:
    """Exact pins of what unpickling and running a student needs (torch without its local tag, e.g. +cpu)."""
    import transformers

    return [
        f"torch=={torch.__version__.split('+')[0]}",
        f"transformers=={transformers.__version__}",
        f"pandas=={pd.__version__}",
        f"mlflow=={mlflow.__version__}",
    ]


def prediction_columns(labels: tuple[str, ...]) -> list[str]:
    """The output columns, in order: label, probability, then p_<label> for every label."""
    return ["label", "probability", *(f"p_{label}" for label in labels)]


def student_signature(labels: tuple[str, ...]) -> ModelSignature:
    """Input: one string column `text`. Output: the label, its probability and one probability per label."""
    outputs: list[ColSpec | TensorSpec] = [ColSpec("string", "label"), ColSpec("double", "probability")]
    outputs += [ColSpec("double", f"p_{label}") for label in labels]
    return ModelSignature(inputs=Schema([ColSpec("string", TEXT_COLUMN)]), outputs=Schema(outputs))


def _texts(model_input: Any) -> list[str]:
    """Raw texts from a DataFrame with a `text` column, a Series, or a list of str."""
    if isinstance(model_input, pd.DataFrame):
        if TEXT_COLUMN not in model_input.columns:
            raise MlflowException.invalid_parameter_value(
                f"the student expects a DataFrame with a '{TEXT_COLUMN}' column; got columns "
                f"{list(model_input.columns)}"
            )
        model_input = model_input[TEXT_COLUMN]
    if isinstance(model_input, str):
        model_input = [model_input]
    values = model_input.tolist() if isinstance(model_input, pd.Series) else list(model_input)
    if len(values) == 1 and isinstance(values[0], list | tuple | np.ndarray):
        values = list(values[0])  # pyfunc turns {"text": [a, b]} into one row holding the whole list
    bad = [i for i, value in enumerate(values) if not isinstance(value, str)]
    if bad:
        raise MlflowException.invalid_parameter_value(
            f"the student predicts on strings; {len(bad)} of {len(values)} rows are not (first: row {bad[0]}, "
            f"{values[bad[0]]!r}). Drop or fill missing texts before predicting"
        )
    return values


class TextClassifierModel(PythonModel):
    """A pyfunc wrapper around a pickled student (any TextModule): raw text in, label and probabilities out."""

    def load_context(self, context: Any) -> None:
        module = torch.load(context.artifacts[STUDENT_ARTIFACT], map_location="cpu", weights_only=False)
        self.module: TextModule = module.eval()

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        """One row per text: `label` (str), `probability` of that label, and `p_<label>` for every label."""
        texts = _texts(model_input)
        labels = self.module.labels
        probs = np.zeros((len(texts), len(labels)), dtype=np.float64)
        with torch.inference_mode():
            for batch in length_batches(texts, PREDICT_BATCH_SIZE):
                logits = self.module(**self.module.tokenize([texts[i] for i in batch]))
                probs[batch] = torch.softmax(logits.double(), dim=-1).numpy()
        best = probs.argmax(axis=1)
        frame = pd.DataFrame({"label": [labels[i] for i in best], "probability": probs[np.arange(len(texts)), best]})
        for column, label_probs in zip(prediction_columns(labels)[2:], probs.T, strict=True):
            frame[column] = label_probs
        return frame


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
    input_texts: list[str],
    tags: dict[str, str] | None = None,
    description: str | None = None,
    await_registration_for: int = 60,
) -> LoggedStudent:
    """Log the student as a pyfunc model in the active run and, given a name, register it, then set the
    version's description and tags (ours: distill.role, distill.labels, distill.content_digest)."""
    missing = [attr for attr in ("labels", "tokenize") if not hasattr(student, attr)]
    if missing:
        raise ServingError(f"{type(student).__name__} is not a TextModule student: it lacks {missing}")
    if mlflow.active_run() is None:
        raise ServingError(
            "log_student logs into the active MLflow run, and none is active: call it inside `with mlflow.start_run():`"
        )
    if not input_texts:
        raise ServingError("log_student needs at least one input text for the model's input example")
    student.eval()
    with tempfile.TemporaryDirectory(prefix="student-") as tmp:
        path = Path(tmp) / "student.pt"
        torch.save(picklable(student), path)
        info = mlflow.pyfunc.log_model(
            name=name,
            python_model=TextClassifierModel(),
            artifacts={STUDENT_ARTIFACT: str(path)},
            signature=student_signature(student.labels),
            input_example=pd.DataFrame({TEXT_COLUMN: list(input_texts[:3])}),
            pip_requirements=pip_requirements(),
        )
    if registered_model_name is None:
        return LoggedStudent(info, None)
    version_tags = {
        "distill.role": "student",
        "distill.labels": json.dumps(list(student.labels)),
        "distill.content_digest": content_digest(student),
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
