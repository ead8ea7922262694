"""Text classification: texts in, one of a fixed set of labels out; the classifier distilled end to end.

The task's batches (tokenised texts, label ids), its stored signal (the teacher's logits over the classes), its
metrics (accuracy, macro F1, agreement, KL, calibration; early stopping on validation accuracy), its Great
Expectations suites, its gates (accuracy, retention, agreement against the teacher and the champion) and how a
student serves (a pyfunc: a `text` column in, label and probabilities out).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.pyfunc import PythonModel
from mlflow.types import ColSpec, Schema, TensorSpec
from torch import Tensor
from tqdm.auto import tqdm

from distill_core import checks, data, evaluate, gates, plots, students
from distill_core.data import PreparedDataset
from distill_core.errors import SoftLabelError, TeacherError
from distill_core.evaluate import Report, Speed
from distill_core.gates import Verdict
from distill_core.modules import LoadedTeacher, TextModule, length_batches, read_module
from distill_core.recipe import (
    ChecksConfig,
    DataConfig,
    GateConfig,
    SoftLabelConfig,
    StudentConfig,
)
from distill_core.tasks.base import Task, TaskBatch

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from distill_core.soft_labels import SoftLabels

STUDENT_ARTIFACT = "student"  # the pickled module inside a logged student (model_io writes it)
TEXT_COLUMN = "text"
PREDICT_BATCH_SIZE = 256


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

    __module__ = "distill_core.serving"  # its pickles name it there, so the previous release loads them too

    def load_context(self, context: Any) -> None:
        module = read_module(context.artifacts[STUDENT_ARTIFACT])
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


def check_logits_shape(logits: Tensor, rows: int, classes: int, who: str) -> None:
    """Refuse teacher logits that are not [rows, classes]."""
    if logits.ndim != 2 or tuple(logits.shape) != (rows, classes):
        raise TeacherError(f"{who} returned logits of shape {tuple(logits.shape)}; expected ({rows}, {classes})")


@torch.inference_mode()
def teacher_logits(
    teacher: LoadedTeacher, texts: list[str], cfg: SoftLabelConfig, desc: str = "soft labels"
) -> np.ndarray:
    """Teacher logits for every text, in order, with a progress bar; NaN rows are refused by number."""
    module = teacher.module.eval()
    classes = len(module.labels)
    out = np.zeros((len(texts), classes), dtype=np.float32)
    for batch in tqdm(length_batches(texts, cfg.batch_size), desc=desc, unit="batch", leave=False):
        logits = module(**module.tokenize([texts[i] for i in batch], cfg.max_length))
        check_logits_shape(logits, len(batch), classes, f"teacher {teacher.identity}")
        out[batch] = logits.float().numpy()
    bad = np.flatnonzero(~np.isfinite(out).all(axis=1))
    if len(bad):
        raise SoftLabelError(
            f"teacher {teacher.identity} returned NaN or infinite logits in {desc} for {len(bad)} of {len(texts)} "
            f"rows (first: row {bad[0]}, text {texts[bad[0]][:60]!r}); nothing was stored"
        )
    return out


class ClassificationTask(Task):
    name = "classification"
    early_stopping = "val_accuracy"
    headline = ("accuracy", "macro_f1", "retention", "agreement", "kl_to_teacher", "params", "p50_ms", "speedup")
    gate_tags: ClassVar[tuple[str, ...]] = (
        "accuracy",
        "teacher_accuracy",
        "retention",
        "agreement",
        "params",
        "p50_ms",
        "p95_ms",
        "speedup",
    )
    quality_name = "accuracy"
    columns = evaluate.COLUMNS

    def preparation_key(self, cfg: DataConfig) -> str:
        return data.preparation_key(cfg)

    def prepare(self, cfg: DataConfig, out_dir: Path) -> PreparedDataset:
        return data.prepare_dataset(cfg, out_dir)

    def examples(self, dataset: PreparedDataset, split: str) -> tuple[list[str], np.ndarray]:
        frame = dataset.split(split)
        return frame["text"].tolist(), frame["label"].to_numpy()

    def check_fits(self, cfg: StudentConfig, teacher: TextModule) -> None:
        students.check_fits(cfg, teacher)

    def build_student(
        self,
        cfg: StudentConfig,
        teacher: TextModule,
        dataset: PreparedDataset,
        texts: list[str],
        max_length: int,
        log: Callable[[str], None],
    ) -> TextModule:
        return students.build_student(cfg, teacher, dataset.labels, texts, max_length, log)

    def check_teacher(self, teacher: LoadedTeacher, dataset: PreparedDataset) -> None:
        if tuple(teacher.module.labels) != dataset.labels:
            raise SoftLabelError(
                f"teacher {teacher.identity} predicts labels {list(teacher.module.labels)} but the dataset has "
                f"{list(dataset.labels)}: they must match in order"
            )

    def batch(self, model: TextModule, texts: list[str], targets: Tensor) -> TaskBatch:
        return TaskBatch(model.tokenize(texts), targets)

    def predict(self, model: TextModule, texts: list[str]) -> np.ndarray:
        return evaluate.predict(model, texts)

    def teacher_signal(self, teacher: LoadedTeacher, texts: list[str], cfg: SoftLabelConfig, desc: str) -> np.ndarray:
        return teacher_logits(teacher, texts, cfg, desc)

    def validate(self, model: TextModule, texts: list[str], targets: np.ndarray) -> float:
        return evaluate.accuracy(evaluate.predict(model, texts), targets)

    def evaluate(
        self,
        name: str,
        model: TextModule,
        texts: list[str],
        targets: np.ndarray,
        teacher_signal: np.ndarray,
        speed: Speed,
        outputs: np.ndarray | None = None,
    ) -> Report:
        return evaluate.evaluate_model(name, model, texts, targets, teacher_signal, outputs, speed=speed)

    def relative_to(self, report: Report, teacher: Report) -> Report:
        return evaluate.relative_to(report, teacher)

    def quality(self, report: Report) -> float:
        return report.accuracy

    def figures(
        self, name: str, model: TextModule, texts: list[str], targets: np.ndarray, teacher_signal: np.ndarray
    ) -> dict[str, Figure]:
        diagram = plots.reliability_diagram(teacher_signal, self.predict(model, texts), targets, name)
        return {"plots/reliability.png": diagram}

    def chance(self, targets: np.ndarray) -> float:
        return float(np.bincount(targets).max() / len(targets))  # the largest class's share

    def check_data(self, dataset: PreparedDataset, docs_dir: Path, cfg: ChecksConfig) -> checks.CheckResult:
        return checks.check_dataset(dataset, docs_dir, max_duplicate_share=cfg.max_duplicate_share)

    def check_signal(
        self, labels: SoftLabels, dataset: PreparedDataset, docs_dir: Path, cfg: ChecksConfig
    ) -> checks.CheckResult:
        return checks.check_soft_labels(
            labels, dataset, docs_dir, max_row_sum_error=cfg.max_row_sum_error, max_class_kl=cfg.max_class_kl
        )

    def check_evaluation(self, reports: list[Report], docs_dir: Path) -> checks.CheckResult:
        return checks.check_evaluation([r.as_dict() for r in reports], docs_dir)

    def judge(
        self, candidate: str, report: Report, teacher: Report, gate_cfg: GateConfig, champion: Report | None
    ) -> Verdict:
        return gates.judge(candidate, report, teacher, gate_cfg, champion)

    def beats(self, candidate: Report, champion: Report | None) -> bool:
        return gates.beats(candidate, champion)

    def report_tags(self, report: Report) -> dict[str, str]:
        """The measured fields a registered student carries (gate_tags, as distill.<field>)."""
        values = {
            "accuracy": f"{report.accuracy:.4f}",
            "retention": f"{report.retention:.4f}",
            "agreement": f"{report.agreement:.4f}",
            "params": str(report.params),
            "teacher_accuracy": f"{report.accuracy / max(report.retention, 1e-9):.4f}",
            "p50_ms": f"{report.p50_ms:.3f}",
            "p95_ms": f"{report.p95_ms:.3f}",
            "speedup": f"{report.speedup:.2f}",
        }
        return {field: values[field] for field in self.gate_tags}

    def summary(self, report: Report) -> str:
        return (
            f"accuracy {report.accuracy:.3f} ({report.retention:.1%} of the teacher), {report.params:,} parameters "
            f"({report.compression:.1f}x smaller), {report.speedup:.1f}x faster at batch 1"
        )

    def python_model(self) -> PythonModel:
        return TextClassifierModel()

    def signature(self, model: TextModule) -> ModelSignature:
        return student_signature(model.labels)

    def input_example(self, texts: list[str]) -> pd.DataFrame:
        return pd.DataFrame({TEXT_COLUMN: list(texts[:3])})


CLASSIFICATION = ClassificationTask()
