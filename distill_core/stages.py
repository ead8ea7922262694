"""Distillation in stages: teacher assistants, then each candidate's born-again generations.

A stage is a student trained from the stage before it (the teacher, for the first): from that stage's signal and,
for a transformer, cut from its layers. A run's stages are not registered: each is checkpointed in the run's folder
(a killed run resumes in the stage it died in and reuses the finished ones, their weights restored exactly), and a
stage's signal is made from its weights when the next stage needs it, under the same content key every time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from distill_core.modules import LoadedTeacher, TextModule, content_digest
from distill_core.names import Role
from distill_core.soft_labels import SoftLabels, generate_soft_labels, soft_label_key

if TYPE_CHECKING:
    from distill_core.data import PreparedDataset
    from distill_core.evaluate import ModelReport
    from distill_core.recipe import Recipe, StudentConfig
    from distill_core.train import TrainResult

STAGES = "stages"  # the run folder's subfolder that holds the stages' checkpoints


@dataclass
class Stage:
    """A model trained on the way to a candidate: an assistant (shared by every candidate) or an earlier
    generation of the candidate itself. `report` is its test-split report, filled by evaluation."""

    name: str
    config: StudentConfig
    role: Role
    result: TrainResult
    report: ModelReport | None = None

    @property
    def display(self) -> str:
        """Its name in reports and tables: `ta (assistant)`, `bag.gen1`."""
        return f"{self.name} ({self.role})" if self.role is Role.ASSISTANT else self.name


def as_teacher(recipe: Recipe, name: str, module: TextModule) -> LoadedTeacher:
    """A trained stage as the teacher of the next; its identity (and so its signal's key) is its weights' digest."""
    return LoadedTeacher(module, f"{recipe.student_registered_name}.{name}", "stage", content_digest(module))


def signal_of(recipe: Recipe, dataset: PreparedDataset, teacher: LoadedTeacher) -> SoftLabels:
    """What the next stage learns from: the stage's signal on every split, made as the store's is but not stored;
    online only its key (the stage itself runs in the loop)."""
    if recipe.train.mode == "online":
        key = soft_label_key(teacher.identity, dataset.digest, recipe.soft_labels, recipe.task)
        return SoftLabels(key, {"transfer": None}, {}, reused=False)  # type: ignore[dict-item]
    return generate_soft_labels(teacher, dataset, recipe.soft_labels, None, recipe.task)


def chain(recipe: Recipe) -> str:
    """The stages every candidate goes through, in words (lineage): `ta (assistant) → 3 generations`."""
    parts = [f"{a.name} ({Role.ASSISTANT})" for a in recipe.stages.assistants]
    if recipe.stages.generations > 1:
        parts.append(f"{recipe.stages.generations} born-again generations")
    return " → ".join(parts)
