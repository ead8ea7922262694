"""Text classification: texts in, one of a fixed set of labels out; the classifier distilled end to end.

The task's batches (tokenised texts, label ids), its stored signal (the teacher's logits over the classes), its
metrics (accuracy, macro F1, agreement, KL, calibration; early stopping on validation accuracy), its Great
Expectations suites, its gates (accuracy, retention, agreement against the teacher and the champion) and how a
student serves (a pyfunc: a `text` column in, label and probabilities out).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
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

from distill_core import checks, data, evaluate, gates, plots, students
from distill_core.data import PreparedDataset
from distill_core.errors import SoftLabelError, TeacherError
from distill_core.evaluate import Report, Speed
from distill_core.gates import Verdict
from distill_core.modules import LoadedTeacher, TextModule, device_of, length_batches, placed, read_module
from distill_core.recipe import (
    ChecksConfig,
    DataConfig,
    EvalConfig,
    GateConfig,
    SoftLabelConfig,
    StudentConfig,
    TeacherConfig,
)
from distill_core.signals import SignalSource, StoredSource
from distill_core.tasks.base import Task, TaskBatch

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from distill_core.soft_labels import SoftLabels

STUDENT_ARTIFACT = "student"  # the pickled module inside a logged student (model_io writes it)
ONNX_ARTIFACT = "onnx"  # its exported folder (distill_core.export), when it has one


def served_module(context: Any, module: TextModule) -> Any:
    """What a student's pyfunc serves: its export in the format its gates passed (the model config's `format`,
    with its `threads`), else the torch module (a version logged by earlier releases has no model config)."""
    config = getattr(context, "model_config", None) or {}
    fmt = config.get("format", "torch")
    if fmt == "torch" or ONNX_ARTIFACT not in context.artifacts:
        return module
    from distill_core.export import OnnxStudent

    params = sum(p.numel() for p in module.parameters())
    return OnnxStudent(Path(context.artifacts[ONNX_ARTIFACT]), fmt, config.get("threads"), params)


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
        self.served = served_module(context, self.module)

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        """One row per text: `label` (str), `probability` of that label, and `p_<label>` for every label."""
        texts = _texts(model_input)
        labels, served = self.module.labels, getattr(self, "served", self.module)
        probs = np.zeros((len(texts), len(labels)), dtype=np.float64)
        with torch.inference_mode():
            for batch in length_batches(texts, PREDICT_BATCH_SIZE):
                logits = served(**served.tokenize([texts[i] for i in batch]))
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
def teacher_logits(teacher: LoadedTeacher, texts: list[str], cfg: SoftLabelConfig, first_row: int = 0) -> np.ndarray:
    """Teacher logits for every text, in order (batched by length); NaN rows are refused by number, counted from
    `first_row`."""
    module = teacher.module.eval()
    classes, device = len(module.labels), device_of(module)
    out = np.zeros((len(texts), classes), dtype=np.float32)
    for batch in length_batches(texts, cfg.batch_size):
        logits = module(**placed(module.tokenize([texts[i] for i in batch], cfg.max_length), device))
        check_logits_shape(logits, len(batch), classes, f"teacher {teacher.identity}")
        out[batch] = logits.float().cpu().numpy()
    bad = np.flatnonzero(~np.isfinite(out).all(axis=1))
    if len(bad):
        raise SoftLabelError(
            f"teacher {teacher.identity} returned NaN or infinite logits for {len(bad)} of {len(texts)} rows from "
            f"row {first_row} (first: row {first_row + bad[0]}, text {texts[bad[0]][:60]!r}); nothing was stored"
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
    against_teacher = "retention"
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

    def teacher_depth(self, teacher: TextModule) -> int:
        return students.source_depth(teacher)

    def build_student(
        self,
        cfg: StudentConfig,
        teacher: TextModule,
        dataset: PreparedDataset,
        texts: Sequence[Any],
        soft_labels: SoftLabelConfig,
        log: Callable[[str], None],
    ) -> TextModule:
        return students.build_student(cfg, teacher, dataset.labels, list(texts), soft_labels.max_length, log)

    def check_teacher(self, teacher: LoadedTeacher, dataset: PreparedDataset) -> None:
        if tuple(teacher.module.labels) != dataset.labels:
            raise SoftLabelError(
                f"teacher {teacher.identity} predicts labels {list(teacher.module.labels)} but the dataset has "
                f"{list(dataset.labels)}: they must match in order"
            )

    def batch(self, model: TextModule, texts: Sequence[Any], targets: Tensor) -> TaskBatch:
        return TaskBatch(model.tokenize(list(texts)), targets)

    def teacher_inputs(self, teacher: TextModule, texts: Sequence[Any], batch: TaskBatch) -> dict[str, Tensor]:
        return teacher.tokenize(list(texts))  # the teacher's own tokenizer: a student's vocabulary may be pruned

    def predict(self, model: TextModule, texts: Sequence[Any]) -> np.ndarray:
        return evaluate.predict(model, list(texts))

    def signal_key(self, cfg: SoftLabelConfig) -> dict[str, Any]:
        return {"max_length": cfg.max_length}

    def label_shard(self, teacher: LoadedTeacher, texts: Sequence[Any], start: int, cfg: SoftLabelConfig) -> np.ndarray:
        return teacher_logits(teacher, list(texts), cfg, first_row=start)  # sorted by length within the shard

    def stored_source(self, signal: np.ndarray, cfg: SoftLabelConfig) -> SignalSource:
        return StoredSource(torch.tensor(signal))

    def signal_change(self, old: np.ndarray, new: np.ndarray) -> np.ndarray:
        """The total variation between the two distributions over the classes, per row."""
        p, q = (torch.softmax(torch.as_tensor(x, dtype=torch.float64), dim=-1) for x in (old, new))
        return (0.5 * (p - q).abs().sum(-1)).numpy()

    def validate(self, model: TextModule, texts: Sequence[Any], targets: np.ndarray) -> float:
        return evaluate.accuracy(evaluate.predict(model, list(texts)), targets)

    def measure_speed(self, models: dict[str, TextModule], texts: Sequence[Any], cfg: EvalConfig) -> dict[str, Speed]:
        return evaluate.measure_latency(models, list(texts), cfg.latency_samples, cfg.throughput_batch)

    def evaluate(
        self,
        name: str,
        model: TextModule,
        texts: Sequence[Any],
        targets: np.ndarray,
        teacher_signal: np.ndarray,
        speed: Speed,
        outputs: np.ndarray | None = None,
    ) -> Report:
        return evaluate.evaluate_model(name, model, list(texts), targets, teacher_signal, outputs, speed=speed)

    def relative_to(self, report: Report, teacher: Report, twin: Report | None = None) -> Report:
        return evaluate.relative_to(report, teacher)

    def quality(self, report: Report) -> float:
        return report.accuracy

    def figures(
        self,
        name: str,
        model: TextModule,
        texts: Sequence[Any],
        targets: np.ndarray,
        teacher_signal: np.ndarray,
        teacher_name: str = "teacher",
    ) -> dict[str, Figure]:
        student = self.predict(model, texts)
        diagram = plots.reliability_diagram(teacher_signal, student, targets, name, teacher_name=teacher_name)
        return {"plots/reliability.png": diagram}

    def agreement(self, model: TextModule, inputs: Sequence[Any], signal: np.ndarray) -> float:
        return evaluate.agreement(evaluate.predict(model, list(inputs)), signal)

    def parity(self, model: TextModule, exported: Any, inputs: Sequence[Any]) -> tuple[float, float]:
        mine, theirs = evaluate.predict(model, list(inputs)), evaluate.predict(exported, list(inputs))
        return evaluate.agreement(theirs, mine), float(np.abs(mine - theirs).max(initial=0.0))

    def signal_score(self, signal: np.ndarray, targets: np.ndarray) -> float:
        return evaluate.accuracy(signal, targets)

    def quality_problem(self, score: float, teacher_score: float, gate_cfg: GateConfig) -> str | None:
        retention = score / max(teacher_score, 1e-9)
        if gate_cfg.min_accuracy is not None and score < gate_cfg.min_accuracy:
            return f"validation accuracy {score:.4f} < {gate_cfg.min_accuracy:.4f}"
        if gate_cfg.min_retention is not None and retention < gate_cfg.min_retention:
            return f"validation retention {retention:.1%} < {gate_cfg.min_retention:.1%} (teacher {teacher_score:.4f})"
        return None

    def chance(self, targets: np.ndarray) -> float:
        return float(np.bincount(targets).max() / len(targets))  # the largest class's share

    def did_not_learn(self, train_value: float, chance: float, margin: float = 0.02) -> str | None:
        if train_value > chance + margin:
            return None
        return (
            f"did not learn: train-split accuracy {train_value:.3f} is at chance "
            f"({chance:.3f}, the largest class's share); raise students[].lr or train.epochs"
        )

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
        """The measured fields a registered student carries (gate_tags, as distill.<field>), at full precision."""
        teacher = report.accuracy / max(report.retention, 1e-9)
        values = {"teacher_accuracy": teacher, **{k: v for k, v in report.as_dict().items() if k in self.gate_tags}}
        return {field: evaluate.tag_value(values[field]) for field in self.gate_tags}

    def summary(self, report: Report) -> str:
        return (
            f"accuracy {report.accuracy:.3f} ({report.retention:.1%} of the teacher), {report.params:,} parameters "
            f"({report.compression:.1f}x smaller), {report.speedup:.1f}x faster at batch 1"
        )

    def notes(self, candidate: str, report: Report) -> list[str]:
        if report.retention <= 1.0:
            return []
        return [  # legitimate (born-again networks rely on it), and worth a look
            f"{candidate} beats its teacher ({report.retention:.1%} of the teacher's accuracy): a weak teacher, or a "
            "student that also learned from the hard labels"
        ]

    def stand_in_teacher(
        self, cfg: TeacherConfig, dataset: PreparedDataset, log: Callable[[str], None]
    ) -> tuple[TextModule, dict[str, str], dict[str, float]]:
        from distill_core.names import DATASET_DIGEST, TRAINABLE_LAYERS
        from distill_core.teachers import train_teacher

        teacher = train_teacher(dataset, cfg, log)
        accuracy = self.validate(teacher, *self.examples(dataset, "test"))
        log(f"teacher test accuracy {accuracy:.4f}")
        tags = {DATASET_DIGEST: dataset.digest, TRAINABLE_LAYERS: str(cfg.trainable_layers)}
        return teacher, tags, {"test_accuracy": accuracy}

    def stand_in_versions(self, version: int) -> tuple[str, dict[str, Any]]:
        if version == 1:
            overrides = {"trainable_layers": 0, "epochs": 5, "lr": 1e-2, "batch_size": 64}
            return "teacher v1: a head on frozen MiniLM features (quick, and weaker)", overrides
        return f"teacher v{version}: MiniLM fine-tuned (the recipe's teacher section)", {}

    def python_model(self) -> PythonModel:
        return TextClassifierModel()

    def signature(self, model: TextModule) -> ModelSignature:
        return student_signature(model.labels)

    def input_example(self, model: TextModule, texts: Sequence[Any]) -> pd.DataFrame:
        return pd.DataFrame({TEXT_COLUMN: list(texts[:3])})


CLASSIFICATION = ClassificationTask()
