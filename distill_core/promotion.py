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
from distill_core.modules import LoadedTeacher, torch_threads
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
    reason: str = ""  # why the student version got that alias (or none), in words: distill.promotion_reason
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)  # seconds of the core's own work, by phase
    start: str | None = None  # with warm_start: where the warm candidate started, or why the run was cold
    searched: dict[str, Any] | None = None  # with a search: what it cost and chose (SearchResult.summary)
    diagnosis: tuple[str, str] | None = None  # a rejected run: why its candidate degraded (StudentOutcome.diagnosis)
    attempts: list[dict[str, str]] = field(default_factory=list)  # the remedies tried after it, in order

    @property
    def remedies_said(self) -> str | None:
        """The ladder of remedies tried, for the ledger's `remedies` field."""
        if not self.attempts:
            return None
        return " | ".join(
            f"{a['remedy']} (for {a['for']}): {a['outcome']}"
            + (f" ({a['changed']}: {a['reasons']})" if "changed" in a else "")
            for a in self.attempts
        )

    @property
    def search_said(self) -> str | None:
        """The search in one line, for the ledger's `search` field."""
        s = self.searched
        if s is None:
            return None
        return (
            f"chose {s['chosen']} of {s['architectures']} architectures: {s['infeasible']} dropped before training, "
            f"{s['trials']} trials ({s['complete']} complete, {s['pruned']} pruned), {s['seconds']:.0f} s"
        )

    @property
    def status(self) -> str:
        """The teacher version's ledger status."""
        return "succeeded" if self.chosen.passed else "rejected"

    @property
    def verdict(self) -> str:
        """The decision in one sentence, as a person reads it first (run description, report, artifact)."""
        alias = f"`{self.alias}`" if self.alias else "no alias"
        return f"Student v{self.student_version} ({self.chosen.candidate}) → {alias}: {self.reason}."

    def markdown(self, quality_name: str, quality: Callable[[Any], float]) -> str:
        """The verdict, then every candidate with its gate: what the parent run's description says."""
        lines = [
            f"**{self.verdict}**",
            "",
            f"| candidate | params | {quality_name} | gate | reasons |",
            "|---|---|---|---|---|",
        ]
        for v in self.verdicts:
            lines.append(
                f"| {v.candidate}{' (chosen)' if v is self.chosen else ''} | {v.report.params:,} | "
                f"{quality(v.report):.4f} | {'passed' if v.passed else 'failed'} | "
                f"{'; '.join(v.reasons) or names.ALL_GATES_PASSED} |"
            )
        if self.diagnosis is not None:
            lines += ["", f"**Diagnosis:** {self.diagnosis[1]}"]
        if self.attempts:
            lines += ["", f"**Remedies tried:** {self.remedies_said}"]
        return "\n".join(lines + ([""] + [f"- {note}" for note in self.notes] if self.notes else []))


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
    module = load_module(f"models:/{recipe.student_registered_name}/{version}", served=True)  # as it serves
    task, name = task_of(recipe), f"champion v{version}"
    with torch_threads(recipe.deploy.threads):  # as the candidates' deploy targets are measured
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
        if outcome.deployment is not None and outcome.deployment.problem is not None:
            verdict.reasons.append(outcome.deployment.problem)
        notes += task.notes(outcome.config.name, verdict.report)
        verdicts.append(verdict)
    decision = Decision(verdicts, choose(verdicts, task.quality), champion_version, champion_report, notes=notes)
    if not decision.chosen.passed:
        chosen = next(o for o in outcomes if o.config.name == decision.chosen.candidate)
        decision.diagnosis = chosen.diagnosis(task, recipe.on_degradation.capacity_agreement)
    return decision


def register_and_promote(
    decision: Decision,
    outcome: StudentOutcome,
    recipe: Recipe,
    lineage: Lineage,
    input_texts: list[str],
    tracking_uri: str,
    ledger: Ledger,
    champion_now: Callable[[], tuple[str | None, ModelReport | None]] | None = None,
    candidate_run_id: str | None = None,
) -> Decision:
    """Register the chosen student once (idempotent on its lineage) and move aliases as the policy says; the
    version's distill.promotion_reason then says why it has the alias it got.

    champion_now measures the current champion again, for when another run promoted one meanwhile.
    The model is logged in the active run: the candidate's own, `candidate_run_id` (its version's source).
    """
    client = MlflowClient(tracking_uri)
    decision = _register_and_promote(
        decision, outcome, recipe, lineage, input_texts, client, ledger, champion_now, candidate_run_id
    )
    if decision.student_version:  # else nothing was registered (an export that diverges)
        client.set_model_version_tag(
            recipe.student_registered_name, decision.student_version, names.PROMOTION_REASON, decision.reason
        )
    return decision


def _register_and_promote(
    decision: Decision,
    outcome: StudentOutcome,
    recipe: Recipe,
    lineage: Lineage,
    input_texts: list[str],
    client: MlflowClient,
    ledger: Ledger,
    champion_now: Callable[[], tuple[str | None, ModelReport | None]] | None,
    candidate_run_id: str | None,
) -> Decision:
    name, verdict, task = recipe.student_registered_name, decision.chosen, task_of(recipe)
    key = lineage.idempotency_key(verdict.candidate)
    existing = find_student_version(client, name, key)
    deployment = outcome.deployment
    if deployment is not None and deployment.problem is not None:  # what would serve is not what was measured
        decision.student_version = ""
        decision.reason = f"not registered: {deployment.problem}"
        return decision
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
            **({names.CANDIDATE_RUN_ID: candidate_run_id} if candidate_run_id else {}),
            **({names.tag(field): value for field, value in deployment.tags().items()} if deployment else {}),
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
            deployment=deployment,
        )
        decision.student_version = str(version)
        describe_student_model(client, recipe)
    if not verdict.passed:
        decision.reason = "failed the gates (" + "; ".join(verdict.reasons) + "), so no alias moved"
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
        decision.reason = f"v{decision.student_version} is already the champion (a rerun of the run that made it)"
        return decision
    reason = f"distilled from {lineage.teacher_name} v{lineage.teacher_version}"
    if recipe.promotion.policy == "manual":
        decision.reason = "passed the gates; policy manual: a person promotes the challenger"
        return _challenger(decision, client, ledger, name, reason)
    if champion_set_by_hand(client, ledger, name) and not recipe.promotion.override_manual_champion:
        decision.reason = (
            f"passed the gates; champion v{decision.champion_before} was set by hand and the recipe keeps it"
        )
        return _challenger(decision, client, ledger, name, reason)
    task = task_of(recipe)
    quality = task.quality(verdict.report)
    if decision.champion_report is None:
        decision.reason = f"passed the gates ({task.quality_name} {quality:.4f}) and there was no champion"
    else:
        champion = f"champion v{decision.champion_before} ({task.quality(decision.champion_report):.4f})"
        if not task.beats(verdict.report, decision.champion_report):
            decision.reason = f"passed the gates, but {task.quality_name} {quality:.4f} does not beat {champion}"
            return _challenger(decision, client, ledger, name, reason)
        decision.reason = f"passed the gates and {task.quality_name} {quality:.4f} beats {champion}"
    promote(client, ledger, name, decision.student_version, PIPELINE, reason)
    decision.alias = CHAMPION
    return decision


def _challenger(decision: Decision, client: MlflowClient, ledger: Ledger, name: str, reason: str) -> Decision:
    move_alias(client, ledger, name, CHALLENGER, decision.student_version, PIPELINE, reason)
    decision.alias = CHALLENGER
    return decision


def describe_student_model(client: MlflowClient, recipe: Recipe) -> None:
    """What the student model is and how a person promotes or rolls back by hand; a description someone wrote
    is kept."""
    name = recipe.student_registered_name
    if client.get_registered_model(name).description:
        return
    client.update_registered_model(
        name,
        description=(
            f"Students of {recipe.teacher.registered_name}, distilled by the continuous distillation pipeline "
            f"(recipe '{recipe.name}', task {recipe.task}). Each version is the student chosen for one teacher "
            "version: its tags say which (distill.teacher_version), how it was judged (distill.gate, "
            "distill.gate_reasons, distill.promotion_reason) and what it measured.\n\n"
            f"Aliases: `{CHAMPION}` is the one to serve (models:/{name}@{CHAMPION}); `{CHALLENGER}` passed the "
            f"gates but did not replace the champion; `previous` is the champion before the last promotion.\n\n"
            f"By hand: add the alias `{CHAMPION}` to a version on this page (the pipeline records who moved it and "
            "keeps a champion set by hand unless the recipe says promotion.override_manual_champion), or run "
            f"`distill promote {name} <version>`; `distill rollback {name}` restores the previous champion."
        ),
    )
