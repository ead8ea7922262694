"""What every task provides; distill_core.tasks registers one instance of each."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from distill_core.modules import Batch, TextModule, placed

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from mlflow.models import ModelSignature
    from mlflow.pyfunc import PythonModel

    from distill_core.checks import CheckResult
    from distill_core.data import PreparedDataset
    from distill_core.evaluate import ModelReport, Speed
    from distill_core.gates import Verdict
    from distill_core.modules import LoadedTeacher
    from distill_core.recipe import EvalConfig, StudentConfig
    from distill_core.signals import Signal, SignalSource
    from distill_core.soft_labels import Arrays, SoftLabels


@dataclass(frozen=True)
class TaskBatch:
    """One batch as the student sees it: its inputs, the targets the labels give (ignored where -100) and the
    mask of the positions that count (None: every row)."""

    inputs: Batch
    targets: Tensor
    mask: Tensor | None = None

    def to(self, device: torch.device) -> TaskBatch:
        """The batch on `device` (where the student trains)."""
        mask = self.mask.to(device) if self.mask is not None else None
        return TaskBatch(placed(self.inputs, device), self.targets.to(device), mask)


class Task(ABC):
    """A kind of distillation (text classification, causal language modelling). One instance per task,
    registered by name.

    Arguments typed Any that name a recipe section (data, soft_labels, checks, gates, teacher) are this task's own
    section classes, as its recipe class declares them. Every task's data section has `dvc` and its recipe has
    `gates`: the pipeline reads those without asking the task. A task's inputs are what `examples` returns (texts
    for a classifier, token blocks for a causal LM); its reports are its own ModelReport class."""

    name: ClassVar[str]
    early_stopping: ClassVar[str]  # the validation metric in the training history that picks the best state
    maximize: ClassVar[bool] = True  # whether a higher early-stopping metric is better (accuracy) or not (perplexity)
    headline: ClassVar[tuple[str, ...]]  # the report fields a person compares (metrics.json, per model)
    gate_tags: ClassVar[tuple[str, ...]]  # the fields a registered student version carries as distill.<field> tags
    quality_name: ClassVar[str]  # what `quality` measures, as a person reads it ("accuracy")
    against_teacher: ClassVar[str]  # the field that says it against the teacher's ("retention")
    columns: ClassVar[tuple[str, ...]]  # the comparison table's report fields (evaluate.FORMATS says how to read them)

    # --- data ---
    @abstractmethod
    def preparation_key(self, cfg: Any) -> str:
        """A key of everything that decides the prepared data's content."""

    @abstractmethod
    def prepare(self, cfg: Any, out_dir: Path) -> PreparedDataset:
        """Load, check and split the recipe's data into out_dir (the marker of a complete folder last)."""

    @abstractmethod
    def examples(self, dataset: PreparedDataset, split: str) -> tuple[Sequence[Any], np.ndarray]:
        """A split's inputs and targets (-100 where a row has none)."""

    # --- students ---
    @abstractmethod
    def check_fits(self, cfg: StudentConfig, teacher: TextModule) -> None:
        """Refuse, before anything is claimed, a student the teacher cannot give (layers, widths)."""

    @abstractmethod
    def teacher_depth(self, teacher: TextModule) -> int:
        """How many layers a transformer student can copy from this teacher."""

    @abstractmethod
    def build_student(
        self,
        cfg: StudentConfig,
        teacher: TextModule,
        dataset: PreparedDataset,
        texts: Sequence[Any],
        soft_labels: Any,
        log: Callable[[str], None],
    ) -> TextModule:
        """A fresh student of the configured family and size (texts: what it will be trained on)."""

    # --- batches and the teacher's signal ---
    @abstractmethod
    def batch(self, model: TextModule, texts: Sequence[Any], targets: Tensor) -> TaskBatch:
        """The model's batch of these inputs with their targets."""

    @abstractmethod
    def teacher_inputs(self, teacher: TextModule, texts: Sequence[Any], batch: TaskBatch) -> dict[str, Tensor]:
        """What the teacher in the loop reads for the student's batch (its own tokens, or the student's)."""

    def online_signal(self, teacher: TextModule, inputs: dict[str, Tensor]) -> Signal:
        """What the teacher in the loop says about a batch of its inputs: its logits, over every class."""
        from distill_core.signals import DenseSignal

        return DenseSignal(teacher(**inputs).float())

    @abstractmethod
    def predict(self, model: TextModule, texts: Sequence[Any]) -> np.ndarray:
        """The model's outputs on every input, in order (what the metrics read)."""

    @abstractmethod
    def check_teacher(self, teacher: LoadedTeacher, dataset: PreparedDataset) -> None:
        """Refuse a teacher whose outputs do not fit the data (other labels), before anything is stored."""

    @abstractmethod
    def signal_key(self, cfg: Any) -> dict[str, Any]:
        """The soft-label settings that change what is stored (they go into the soft-label key)."""

    @abstractmethod
    def label_shard(self, teacher: LoadedTeacher, inputs: Sequence[Any], start: int, cfg: Any) -> Arrays:
        """The signal the soft-label store keeps for one shard: `inputs` are the split's rows from `start` on (at
        most cfg.shard_rows), labeled in batches of cfg.batch_size that depend on the shard alone, so a shard
        labeled on any worker is the same bytes; bad teacher output is refused by row (counted in the split)."""

    @abstractmethod
    def stored_source(self, signal: Any, cfg: Any) -> SignalSource:
        """The source that gives the stored signal of a batch's rows to the loss."""

    @abstractmethod
    def signal_change(self, old: Any, new: Any) -> np.ndarray:
        """How far the stored signal moved from `old` to `new` on each row, in [0, 1] (a warm start trains on the
        rows that moved more than warm_start.changed)."""

    # --- metrics ---
    @abstractmethod
    def validate(self, model: TextModule, texts: Sequence[Any], targets: np.ndarray) -> float:
        """The early-stopping metric on validation data (better: higher when `maximize`, else lower)."""

    @abstractmethod
    def measure_speed(self, models: dict[str, TextModule], texts: Sequence[Any], cfg: EvalConfig) -> dict[str, Speed]:
        """Every model's speed, measured side by side (the task's latency: a prediction, or a generated token)."""

    @abstractmethod
    def evaluate(
        self,
        name: str,
        model: TextModule,
        texts: Sequence[Any],
        targets: np.ndarray,
        teacher_signal: Any,
        speed: Speed,
        outputs: Any = None,
    ) -> ModelReport:
        """Everything measured about one model on the test split (outputs: the teacher's own, when it is the
        teacher)."""

    @abstractmethod
    def relative_to(self, report: Any, teacher: Any, twin: Any = None) -> ModelReport:
        """The report with its fields measured against the teacher's (compression, speed-up, retention) and, given
        one, the student's hard-label twin."""

    @abstractmethod
    def quality(self, report: Any) -> float:
        """The one number candidates are ranked by (higher is better)."""

    @abstractmethod
    def figures(
        self,
        name: str,
        model: TextModule,
        texts: Sequence[Any],
        targets: np.ndarray,
        teacher_signal: Any,
        teacher_name: str = "teacher",
    ) -> dict[str, Figure]:
        """A candidate's figures for its MLflow run, by artifact path; teacher_name names the teacher's version."""

    @abstractmethod
    def agreement(self, model: TextModule, inputs: Sequence[Any], signal: Any) -> float:
        """The share of top-1 predictions (next tokens) the model shares with the teacher's stored signal."""

    @abstractmethod
    def parity(self, model: TextModule, exported: Any, inputs: Sequence[Any]) -> tuple[float, float]:
        """How closely an export (export.OnnxStudent) follows its torch model on these inputs: the share of top-1
        outputs (next tokens) they share, and the largest |logit difference|."""

    @abstractmethod
    def signal_score(self, signal: Any, targets: np.ndarray) -> float:
        """The early-stopping metric of the teacher itself on a split, read from its stored signal there."""

    @abstractmethod
    def quality_problem(self, score: float, teacher_score: float, gates: Any) -> str | None:
        """Why a validation score (the early-stopping metric) falls short of the gates' quality bounds against the
        teacher's score on the same split, or None (the search's quality constraint)."""

    @abstractmethod
    def chance(self, targets: np.ndarray) -> float:
        """The validation metric a model reaches without learning (a student at it did not learn)."""

    @abstractmethod
    def did_not_learn(self, train_value: float, chance: float) -> str | None:
        """Why a student whose train-split metric is train_value counts as not having learned, or None."""

    # --- data checks (Great Expectations) ---
    @abstractmethod
    def check_data(self, dataset: PreparedDataset, docs_dir: Path, cfg: Any) -> CheckResult: ...

    @abstractmethod
    def check_signal(self, labels: SoftLabels, dataset: PreparedDataset, docs_dir: Path, cfg: Any) -> CheckResult: ...

    @abstractmethod
    def check_evaluation(self, reports: list[Any], docs_dir: Path) -> CheckResult: ...

    # --- gates and the registry ---
    @abstractmethod
    def judge(self, candidate: str, report: Any, teacher: Any, gates: Any, champion: Any) -> Verdict:
        """The candidate against the recipe's gates and, when there is one (a report, else None), the champion."""

    @abstractmethod
    def beats(self, candidate: Any, champion: Any) -> bool:
        """Whether a passing candidate should replace the champion (None: there is none)."""

    @abstractmethod
    def report_tags(self, report: Any) -> dict[str, str]:
        """The measured fields a registered student version carries: gate_tags, each as distill.<field>."""

    @abstractmethod
    def summary(self, report: Any) -> str:
        """One sentence of what was measured, for a registered version's description."""

    @abstractmethod
    def notes(self, candidate: str, report: Any) -> list[str]:
        """What a person should look at in a candidate's report (a student better than its teacher)."""

    # --- the stand-in teacher (the teacher team's, for the demo and a fresh local registry) ---
    @abstractmethod
    def stand_in_teacher(
        self, cfg: Any, dataset: PreparedDataset, log: Callable[[str], None]
    ) -> tuple[TextModule, dict[str, str], dict[str, float]]:
        """A teacher made from the recipe's teacher section: the module, its version tags and metrics."""

    @abstractmethod
    def stand_in_versions(self, version: int) -> tuple[str, dict[str, Any]]:
        """What the demo's teacher version `version` is, in words, and the teacher-section overrides that make it."""

    # --- serving ---
    @abstractmethod
    def python_model(self) -> PythonModel:
        """The MLflow pyfunc that serves a student of this task."""

    @abstractmethod
    def signature(self, model: TextModule) -> ModelSignature: ...

    @abstractmethod
    def input_example(self, model: TextModule, texts: Sequence[Any]) -> Any: ...
