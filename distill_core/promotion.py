"""From evaluated candidates to one registered student version and, by the recipe's policy, an alias."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from mlflow.tracking import MlflowClient

from distill_core import names
from distill_core.evaluate import ModelReport
from distill_core.gates import Verdict, choose
from distill_core.lineage import Lineage
from distill_core.model_io import load_module, log_student
from distill_core.modules import LoadedTeacher
from distill_core.recipe import Recipe
from distill_core.registry import (
    CHALLENGER,
    CHAMPION,
    PIPELINE,
    Ledger,
    aliases,
    champion_set_by_hand,
    find_student_version,
    move_alias,
    promote,
)
from distill_core.steps import StudentOutcome
from distill_core.tasks import task_of


@dataclass
class Decision:
    """What the pipeline did with one teacher version's students."""

    verdicts: list[Verdict]
    chosen: Verdict
    champion_before: str | None
    champion_report: ModelReport | None
    student_version: str = ""
    alias: str | None = None  # champion, challenger, or None (failed the gates)
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)  # seconds of the core's own work, by phase

    @property
    def status(self) -> str:
        """The teacher version's ledger status."""
        return "succeeded" if self.chosen.passed else "rejected"


def evaluate_champion(
    recipe: Recipe,
    texts: Any,
    labels: np.ndarray,
    teacher_signal: Any,
    teacher: LoadedTeacher,
    teacher_report: ModelReport,
    tracking_uri: str,
) -> tuple[str | None, ModelReport | None]:
    """The current champion measured on today's test split, so the comparison is like for like; its speed-up is
    measured side by side with the teacher, as the candidates' is."""
    client = MlflowClient(tracking_uri)
    version = aliases(client, recipe.student_registered_name).get(CHAMPION)
    if version is None:
        return None, None
    module = load_module(f"models:/{recipe.student_registered_name}/{version}")
    task, name = task_of(recipe), f"champion v{version}"
    speeds = task.measure_speed({"teacher": teacher.module, name: module}, texts, recipe.evaluation)
    report = task.evaluate(name, module, texts, labels, teacher_signal, speeds[name])
    paired_teacher = dataclasses.replace(teacher_report, p50_ms=speeds["teacher"].p50_ms)  # type: ignore[type-var]
    return version, task.relative_to(report, paired_teacher)


def judge_all(
    recipe: Recipe,
    outcomes: list[StudentOutcome],
    teacher_report: ModelReport,
    champion_version: str | None,
    champion_report: ModelReport | None,
) -> Decision:
    """Every distilled candidate against the gates; the smallest passing one is chosen."""
    verdicts, notes = [], []
    task = task_of(recipe)
    for outcome in outcomes:
        report = outcome.reports[names.Kind.DISTILLED]
        verdict = task.judge(outcome.config.name, report, teacher_report, recipe.gates, champion_report)
        not_learned = outcome.did_not_learn(task)
        if not_learned is not None:
            verdict.reasons.append(not_learned)
        notes += task.notes(outcome.config.name, verdict.report)
        verdicts.append(verdict)
    return Decision(verdicts, choose(verdicts, task.quality), champion_version, champion_report, notes=notes)


def register_and_promote(
    decision: Decision,
    outcome: StudentOutcome,
    recipe: Recipe,
    lineage: Lineage,
    input_texts: list[str],
    tracking_uri: str,
    ledger: Ledger,
    champion_now: Callable[[], tuple[str | None, ModelReport | None]] | None = None,
) -> Decision:
    """Register the chosen student once (idempotent on its lineage) and move aliases as the policy says.

    champion_now measures the current champion again, for when another run promoted one meanwhile.
    """
    client = MlflowClient(tracking_uri)
    name, verdict, task = recipe.student_registered_name, decision.chosen, task_of(recipe)
    key = lineage.idempotency_key(verdict.candidate)
    existing = find_student_version(client, name, key)
    if existing is not None:
        decision.student_version = str(existing.version)
        decision.notes.append(f"v{existing.version} was already registered for {key}")
    else:
        report = verdict.report
        tags = {
            **lineage.tags(),
            names.IDEMPOTENCY_KEY: key,
            names.CANDIDATE: verdict.candidate,
            **names.gate_tags(verdict.reasons),
            **{names.tag(field): value for field, value in task.report_tags(report).items()},
        }
        description = (
            f"Student '{verdict.candidate}' distilled from {lineage.teacher_name} v{lineage.teacher_version}: "
            f"{task.summary(report)}. Gates: "
            + ("passed." if verdict.passed else "FAILED: " + "; ".join(verdict.reasons))
            + lineage.data_sentence()
        )
        _, version = log_student(
            outcome.distilled.student,
            registered_model_name=name,
            input_texts=input_texts,
            tags=tags,
            description=description,
            task=task,
        )
        decision.student_version = str(version)
    if not verdict.passed:
        decision.notes.append("failed the gates: no alias moved")
        return decision
    # One promotion decision at a time per student model: runs judged side by side (a burst of teacher versions)
    # end where promoting them one after the other would.
    with ledger.lock(f"promote:{name}"):
        current = aliases(client, name).get(CHAMPION)
        if current != decision.champion_before and champion_now is not None:
            decision.notes.append(
                f"the champion became v{current} while this run was judged (it was "
                f"{'v' + decision.champion_before if decision.champion_before else 'none'}): compared with v{current}"
            )
            decision.champion_before, decision.champion_report = champion_now()
        return _move_aliases(decision, client, ledger, recipe, lineage)


def _move_aliases(
    decision: Decision, client: MlflowClient, ledger: Ledger, recipe: Recipe, lineage: Lineage
) -> Decision:
    """The alias a passing student gets, by the recipe's policy and the champion it was compared with."""
    name, verdict = recipe.student_registered_name, decision.chosen
    if decision.student_version == decision.champion_before:  # a rerun of the run that made the champion
        decision.alias = CHAMPION
        decision.notes.append(f"v{decision.student_version} is already the champion")
        return decision
    reason = f"distilled from {lineage.teacher_name} v{lineage.teacher_version}"
    if recipe.promotion.policy == "manual":
        decision.notes.append("policy manual: waiting for a person to promote the challenger")
        return _challenger(decision, client, ledger, name, reason)
    if champion_set_by_hand(client, ledger, name) and not recipe.promotion.override_manual_champion:
        decision.notes.append(f"champion v{decision.champion_before} was set by hand and the recipe keeps it")
        return _challenger(decision, client, ledger, name, reason)
    task = task_of(recipe)
    if not task.beats(verdict.report, decision.champion_report):
        assert decision.champion_report is not None
        decision.notes.append(
            f"{task.quality_name} {task.quality(verdict.report):.4f} does not beat champion "
            f"v{decision.champion_before} ({task.quality(decision.champion_report):.4f})"
        )
        return _challenger(decision, client, ledger, name, reason)
    promote(client, ledger, name, decision.student_version, PIPELINE, reason)
    decision.alias = CHAMPION
    return decision


def _challenger(decision: Decision, client: MlflowClient, ledger: Ledger, name: str, reason: str) -> Decision:
    move_alias(client, ledger, name, CHALLENGER, decision.student_version, PIPELINE, reason)
    decision.alias = CHALLENGER
    return decision
