"""What every task provides; distill_core.tasks registers one instance of each."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from torch import Tensor

from distill_core.modules import Batch, TextModule

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from mlflow.models import ModelSignature
    from mlflow.pyfunc import PythonModel

    from distill_core.checks import CheckResult
    from distill_core.data import PreparedDataset
    from distill_core.evaluate import Report, Speed
    from distill_core.gates import Verdict
    from distill_core.modules import LoadedTeacher
    from distill_core.recipe import SoftLabelConfig, StudentConfig
    from distill_core.soft_labels import SoftLabels


@dataclass(frozen=True)
class TaskBatch:
    """One batch as the student sees it: its inputs, the targets the labels give (ignored where -100) and the
    mask of the positions that count (None: every row)."""

    inputs: Batch
    targets: Tensor
    mask: Tensor | None = None


class Task(ABC):
    """A kind of distillation: text classification today. One instance per task, registered by name.

    Arguments typed Any that name a recipe section (data, checks, gates) are this task's own section classes, as
    its recipe class declares them. Every task's data section has `dvc` and its recipe has `gates`: the pipeline
    reads those without asking the task."""

    name: ClassVar[str]
    early_stopping: ClassVar[str]  # the validation metric in the training history that picks the best state
    headline: ClassVar[tuple[str, ...]]  # the report fields a person compares (metrics.json, per model)
    gate_tags: ClassVar[tuple[str, ...]]  # the fields a registered student version carries as distill.<field> tags
    quality_name: ClassVar[str]  # what `quality` measures, as a person reads it ("accuracy")
    columns: ClassVar[list[tuple[str, str, str]]]  # the comparison table: (report field, title, format)

    # --- data ---
    @abstractmethod
    def preparation_key(self, cfg: Any) -> str:
        """A key of everything that decides the prepared data's content."""

    @abstractmethod
    def prepare(self, cfg: Any, out_dir: Path) -> PreparedDataset:
        """Load, check and split the recipe's data into out_dir (the marker of a complete folder last)."""

    @abstractmethod
    def examples(self, dataset: PreparedDataset, split: str) -> tuple[list[str], np.ndarray]:
        """A split's inputs and targets (-100 where a row has none)."""

    # --- students ---
    @abstractmethod
    def check_fits(self, cfg: StudentConfig, teacher: TextModule) -> None:
        """Refuse, before anything is claimed, a student the teacher cannot give (layers, widths)."""

    @abstractmethod
    def build_student(
        self,
        cfg: StudentConfig,
        teacher: TextModule,
        dataset: PreparedDataset,
        texts: list[str],
        max_length: int,
        log: Callable[[str], None],
    ) -> TextModule:
        """A fresh student of the configured family and size (texts: what it will be trained on)."""

    # --- batches and the teacher's signal ---
    @abstractmethod
    def batch(self, model: TextModule, texts: list[str], targets: Tensor) -> TaskBatch:
        """The model's batch of these texts with their targets."""

    @abstractmethod
    def predict(self, model: TextModule, texts: list[str]) -> np.ndarray:
        """The model's outputs on every text, in order (what the metrics read)."""

    @abstractmethod
    def check_teacher(self, teacher: LoadedTeacher, dataset: PreparedDataset) -> None:
        """Refuse a teacher whose outputs do not fit the data (other labels), before anything is stored."""

    @abstractmethod
    def teacher_signal(self, teacher: LoadedTeacher, texts: list[str], cfg: SoftLabelConfig, desc: str) -> np.ndarray:
        """The signal the soft-label store keeps for these texts; bad teacher output is refused by row."""

    # --- metrics ---
    @abstractmethod
    def validate(self, model: TextModule, texts: list[str], targets: np.ndarray) -> float:
        """The early-stopping metric on validation data (higher is better)."""

    @abstractmethod
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
        """Everything measured about one model on the test split."""

    @abstractmethod
    def relative_to(self, report: Report, teacher: Report) -> Report:
        """Fill in the report's fields measured against the teacher's (compression, speed-up, retention)."""

    @abstractmethod
    def quality(self, report: Report) -> float:
        """The one number candidates are ranked by (higher is better)."""

    @abstractmethod
    def figures(
        self, name: str, model: TextModule, texts: list[str], targets: np.ndarray, teacher_signal: np.ndarray
    ) -> dict[str, Figure]:
        """A candidate's figures for its MLflow run, by artifact path."""

    @abstractmethod
    def chance(self, targets: np.ndarray) -> float:
        """The validation metric a model reaches without learning (a student at it did not learn)."""

    # --- data checks (Great Expectations) ---
    @abstractmethod
    def check_data(self, dataset: PreparedDataset, docs_dir: Path, cfg: Any) -> CheckResult: ...

    @abstractmethod
    def check_signal(self, labels: SoftLabels, dataset: PreparedDataset, docs_dir: Path, cfg: Any) -> CheckResult: ...

    @abstractmethod
    def check_evaluation(self, reports: list[Report], docs_dir: Path) -> CheckResult: ...

    # --- gates and the registry ---
    @abstractmethod
    def judge(self, candidate: str, report: Report, teacher: Report, gates: Any, champion: Report | None) -> Verdict:
        """The candidate against the recipe's gates and, when there is one, the champion."""

    @abstractmethod
    def beats(self, candidate: Report, champion: Report | None) -> bool:
        """Whether a passing candidate should replace the champion."""

    @abstractmethod
    def report_tags(self, report: Report) -> dict[str, str]:
        """The measured fields a registered student version carries: gate_tags, each as distill.<field>."""

    @abstractmethod
    def summary(self, report: Report) -> str:
        """One sentence of what was measured, for a registered version's description."""

    # --- serving ---
    @abstractmethod
    def python_model(self) -> PythonModel:
        """The MLflow pyfunc that serves a student of this task."""

    @abstractmethod
    def signature(self, model: TextModule) -> ModelSignature: ...

    @abstractmethod
    def input_example(self, texts: list[str]) -> Any: ...
