"""The pipeline's steps as plain functions: the CLI stages, the demo and the Prefect flows all call these.

prepare → (teacher) → label → distill (each student, plus its hard-label twin) → evaluate.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from distill_core.data import PreparedDataset, load_prepared, prepare_dataset
from distill_core.evaluate import Report, comparison_table, evaluate_model, predict, relative_to
from distill_core.recipe import Recipe, StudentConfig
from distill_core.settings import Settings
from distill_core.soft_labels import SoftLabels, generate_soft_labels
from distill_core.store import open_store
from distill_core.students import build_student
from distill_core.teachers import LoadedTeacher, TextModule, load_teacher, log_teacher, picklable, train_teacher
from distill_core.train import TrainResult, TransferSet, baseline_config, train_student

Log = Callable[[str], None]


def dataset_dir(recipe: Recipe, settings: Settings) -> Path:
    return settings.data_dir / recipe.name


def prepare(recipe: Recipe, settings: Settings, out_dir: Path | None = None) -> PreparedDataset:
    """Prepared splits for the recipe's data (reused when the folder is complete and unchanged)."""
    return prepare_dataset(recipe.data, out_dir or dataset_dir(recipe, settings))


def open_dataset(recipe: Recipe, settings: Settings) -> PreparedDataset:
    """The recipe's prepared dataset, preparing it first when there is none."""
    root = dataset_dir(recipe, settings)
    return load_prepared(root) if (root / "dataset.json").exists() else prepare(recipe, settings)


def train_and_register_teacher(
    recipe: Recipe, settings: Settings, dataset: PreparedDataset, log: Log = print, **overrides: object
) -> tuple[str, str]:
    """Train a MiniLM teacher on the train split and register it: a stand-in for the teacher's own team."""
    cfg = recipe.teacher.model_copy(update=overrides)
    teacher = train_teacher(dataset, cfg, log)
    test = dataset.split("test")
    acc = float((predict(teacher, test["text"].tolist()).argmax(1) == test["label"].to_numpy()).mean())
    log(f"teacher test accuracy {acc:.4f}")
    return log_teacher(
        teacher,
        recipe.teacher.registered_name,
        settings.tracking_uri,
        tags={
            "distill.dataset_digest": dataset.digest,
            "distill.trainable_layers": str(cfg.trainable_layers),
        },
        metrics={"test_accuracy": acc},
        artifact_location=_artifact_location(settings, "teachers"),
    )


def _artifact_location(settings: Settings, experiment: str) -> str | None:
    """Artifacts next to the embedded SQLite store; a tracking server decides for itself."""
    return f"{settings.artifact_root}/{experiment}" if settings.tracking_uri.startswith("sqlite") else None


def label(
    recipe: Recipe, settings: Settings, dataset: PreparedDataset, teacher: LoadedTeacher, force: bool = False
) -> SoftLabels:
    """Soft labels for every split, from the store when an entry with the same key exists."""
    return generate_soft_labels(
        teacher, dataset, recipe.soft_labels, open_store(settings.store_uri), recipe.task, force=force
    )


@dataclass
class StudentOutcome:
    """A student trained by distillation and its hard-label twin."""

    config: StudentConfig
    distilled: TrainResult
    baseline: TrainResult | None  # None when the recipe skips the hard-label twin
    reports: dict[str, Report] = field(default_factory=dict)  # by kind, filled by evaluate_all

    def results(self) -> list[tuple[str, TrainResult]]:
        pairs = [("distilled", self.distilled), ("hard-label", self.baseline)]
        return [(kind, result) for kind, result in pairs if result is not None]


def run_dir(recipe: Recipe, settings: Settings, teacher: LoadedTeacher) -> Path:
    return settings.runs_dir / f"{recipe.name}-{teacher.name}-v{teacher.version}"


def distill_student(
    recipe: Recipe,
    student_cfg: StudentConfig,
    dataset: PreparedDataset,
    labels: SoftLabels,
    teacher: LoadedTeacher,
    out_dir: Path,
    baseline: bool = False,
    log: Log = print,
) -> TrainResult:
    """Train one student, by distillation or (baseline) on hard labels alone; resumable from out_dir."""
    transfer_frame = dataset.split("transfer")
    torch.manual_seed(recipe.train.seed)
    student = build_student(
        student_cfg,
        teacher.module,
        dataset.labels,
        transfer_frame["text"].tolist(),
        recipe.soft_labels.max_length,
        log,
    )
    validation = dataset.split("validation")
    val = (validation["text"].tolist(), validation["label"].to_numpy())
    if baseline:
        train = dataset.split("train")
        transfer = TransferSet(train["text"].tolist(), train["label"].to_numpy(), None)
        cfg = baseline_config(recipe.train)
    else:
        transfer = TransferSet(
            transfer_frame["text"].tolist(), transfer_frame["label"].to_numpy(), labels.logits["transfer"]
        )
        cfg = recipe.train
    kind = "hard-label" if baseline else "distilled"
    fingerprint = f"{recipe.recipe_hash()}:{student_cfg.name}:{labels.key}:{kind}"
    log(f"training {student_cfg.name} ({kind}, {len(transfer.texts)} rows)")
    return train_student(
        student,
        student_cfg,
        cfg,
        transfer,
        val,
        out_dir / student_cfg.name / kind,
        teacher=teacher.module,
        fingerprint=fingerprint,
        log=log,
    )


def distill_all(
    recipe: Recipe,
    dataset: PreparedDataset,
    labels: SoftLabels,
    teacher: LoadedTeacher,
    out_dir: Path,
    log: Log = print,
) -> list[StudentOutcome]:
    """Every student candidate of the recipe, each beside its hard-label twin (unless the recipe skips it)."""
    twin = recipe.evaluation.hard_label_baseline
    return [
        StudentOutcome(
            cfg,
            distill_student(recipe, cfg, dataset, labels, teacher, out_dir, baseline=False, log=log),
            distill_student(recipe, cfg, dataset, labels, teacher, out_dir, baseline=True, log=log) if twin else None,
        )
        for cfg in recipe.students
    ]


def evaluate_all(
    recipe: Recipe,
    dataset: PreparedDataset,
    labels: SoftLabels,
    teacher: LoadedTeacher,
    outcomes: list[StudentOutcome],
) -> list[Report]:
    """The teacher, then each distilled student and its hard-label twin, on the test split."""
    test = dataset.split("test")
    texts, y = test["text"].tolist(), test["label"].to_numpy()
    teacher_logits = labels.logits["test"]
    cfg = recipe.evaluation

    def report(name: str, model: TextModule, logits: np.ndarray | None = None) -> Report:
        return evaluate_model(name, model, texts, y, teacher_logits, logits, cfg.latency_samples, cfg.throughput_batch)

    teacher_report = report(f"teacher {teacher.name} v{teacher.version}", teacher.module, teacher_logits)
    reports = [teacher_report]
    for outcome in outcomes:
        for kind, result in outcome.results():
            measured = report(f"{outcome.config.name} ({kind})", result.student)
            outcome.reports[kind] = relative_to(measured, teacher_report)
            reports.append(outcome.reports[kind])
    return reports


def save_outcomes(
    out_dir: Path, outcomes: list[StudentOutcome], reports: list[Report], meta: Mapping[str, object]
) -> Path:
    """Write each student (torch.save of the module), report.json and report.md; the report goes last."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for outcome in outcomes:
        for kind, result in outcome.results():
            path = out_dir / outcome.config.name / f"{kind}.pt"
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            torch.save(picklable(result.student), tmp)
            os.replace(tmp, path)
    report = {
        **meta,
        "reports": [r.as_dict() for r in reports],
        "training": {
            f"{o.config.name}/{k}": {
                "steps": r.steps,
                "best_step": r.best_step,
                "stopped_early": r.stopped_early,
                "seconds": round(r.seconds, 1),
                "history": r.history,
            }
            for o in outcomes
            for k, r in o.results()
        },
    }
    (out_dir / "report.md").write_text(comparison_table(reports) + "\n")
    tmp = out_dir / ".report.json.tmp"
    tmp.write_text(json.dumps(report, indent=2, default=float))
    os.replace(tmp, out_dir / "report.json")
    return out_dir


def run_pipeline(
    recipe: Recipe, settings: Settings, teacher_name: str, teacher_version: str, log: Log = print
) -> tuple[list[Report], Path]:
    """One teacher version through prepare → label → distill → evaluate; returns the reports and run folder."""
    dataset = open_dataset(recipe, settings)
    teacher = load_teacher(teacher_name, teacher_version, settings.tracking_uri)
    labels = label(recipe, settings, dataset, teacher)
    log(f"soft labels {labels.key} ({'reused' if labels.reused else 'generated'})")
    out = run_dir(recipe, settings, teacher)
    outcomes = distill_all(recipe, dataset, labels, teacher, out, log)
    reports = evaluate_all(recipe, dataset, labels, teacher, outcomes)
    meta = {
        "recipe": recipe.name,
        "recipe_hash": recipe.recipe_hash(),
        "teacher": teacher.identity,
        "dataset_digest": dataset.digest,
        "soft_labels_key": labels.key,
    }
    return reports, save_outcomes(out, outcomes, reports, meta)
