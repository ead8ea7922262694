"""The pipeline's steps as plain functions: the CLI stages, the demo and the Prefect flows all call these.

prepare → (teacher) → label → distill (each student, plus its hard-label twin) → evaluate.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from mlflow.tracking import MlflowClient

from distill_core import search
from distill_core.data import PreparedDataset, prepared_once
from distill_core.deploy import Deployment, deploy_candidate
from distill_core.ensemble import cut_from, load_ensemble, members_of, resolve
from distill_core.errors import DistillError, RecipeError
from distill_core.evaluate import ModelReport, comparison_table
from distill_core.files import replace_atomic, write_json
from distill_core.model_io import load_teacher, log_teacher
from distill_core.modules import LoadedTeacher, read_module, save_module
from distill_core.names import Kind, Role, display_name, generation_name
from distill_core.recipe import Recipe, StudentConfig
from distill_core.registry import RegistryError, teacher_versions
from distill_core.search import SearchResult
from distill_core.settings import Settings
from distill_core.sharding import candidate_runner, shard_runner
from distill_core.soft_labels import SoftLabels, generate_soft_labels, take
from distill_core.stages import STAGES, Stage, as_teacher, signal_of
from distill_core.store import open_store
from distill_core.tasks import Task, task_of
from distill_core.train import TrainResult, TransferSet, baseline_config, train_student
from distill_core.versioning import open_versioned
from distill_core.warm import WarmStart
from distill_core.warm import plan as plan_warm_start

Log = Callable[[str], None]


def dataset_dir(recipe: Recipe, settings: Settings) -> Path:
    """The recipe's prepared data under DISTILL_HOME, keyed by what decides its content (not the recipe's name
    alone: a changed data.source or split setting must never reuse what was prepared before)."""
    return settings.data_dir / f"{recipe.name}-{task_of(recipe).preparation_key(recipe.data)}"


def prepare(recipe: Recipe, settings: Settings, out_dir: Path | None = None) -> PreparedDataset:
    """Prepared splits for the recipe's data (reused when the folder is complete and unchanged)."""
    return task_of(recipe).prepare(recipe.data, out_dir or dataset_dir(recipe, settings))


def open_dataset(recipe: Recipe, settings: Settings) -> PreparedDataset:
    """The recipe's prepared dataset: through DVC when the recipe says so, else prepared under DISTILL_HOME."""
    if recipe.data.dvc is not None:
        return open_versioned(recipe.data.dvc, recipe.base_dir, settings)
    return prepared_once(dataset_dir(recipe, settings), partial(task_of(recipe).prepare, recipe.data))


def train_and_register_teacher(
    recipe: Recipe, settings: Settings, dataset: PreparedDataset, log: Log = print, **overrides: object
) -> tuple[str, str]:
    """Make the task's stand-in teacher from the recipe's teacher section (with overrides) and register it: a
    stand-in for the teacher's own team (a MiniLM classifier; SmolLM2, as packaged or fine-tuned)."""
    cfg = recipe.teacher.model_copy(update=overrides)
    teacher, tags, metrics = task_of(recipe).stand_in_teacher(cfg, dataset, log)
    return log_teacher(
        teacher,
        recipe.teacher.registered_name,
        settings.tracking_uri,
        tags=tags,
        metrics=metrics,
        artifact_location=settings.experiment_location("teachers"),
    )


def ensure_teacher(recipe: Recipe, settings: Settings, log: Log = print) -> tuple[str, str]:
    """The recipe's pinned teacher version (teacher.version), as the DVC stages distill it.

    On a local SQLite registry (the embedded default) a missing version is made by the stand-in teacher
    helper, so `dvc repro` works from a fresh clone; a shared registry must already hold it.
    """
    name, wanted = recipe.teacher.registered_name, recipe.teacher.version
    if wanted is None:
        raise RecipeError("teacher.version is not set in the recipe: name the registered teacher version to distill")
    versions = {int(v.version) for v in teacher_versions(MlflowClient(settings.tracking_uri), name)}
    if wanted in versions:
        return name, str(wanted)
    latest = max(versions, default=0)
    if not settings.tracking_uri.startswith("sqlite") or wanted != latest + 1:
        raise RegistryError(
            f"teacher {name} v{wanted} is not registered at {settings.tracking_uri} "
            f"(latest: {f'v{latest}' if latest else 'none'}); register it or change teacher.version"
        )
    log(f"{name} v{wanted} is not registered yet: training the stand-in teacher on the local registry")
    return train_and_register_teacher(recipe, settings, open_dataset(recipe, settings), log)


def warm_start(
    recipe: Recipe, settings: Settings, dataset: PreparedDataset, labels: SoftLabels, pinned: bool = False
) -> tuple[WarmStart | None, str]:
    """The recipe's warm start for this teacher version's labels, or None and why the run starts cold. `pinned`
    (the DVC stages): the student version must be named in the recipe, so `dvc repro` starts where it did."""
    cfg = recipe.warm_start
    if pinned and cfg is not None and cfg.version is None:
        raise RecipeError(
            "warm_start.version is not set: the DVC stages start from a pinned student version (params.yaml), "
            "not from whichever is champion when they run"
        )
    return plan_warm_start(recipe, settings.tracking_uri, open_store(settings.store_uri), dataset.digest, labels)


def label(
    recipe: Recipe, settings: Settings, dataset: PreparedDataset, teacher: LoadedTeacher, force: bool = False
) -> SoftLabels:
    """Soft labels for every split, from the store when an entry with the same key exists; the missing shards are
    labeled on the Dask cluster the settings name, else in this process."""
    store = open_store(settings.store_uri)
    runner = shard_runner(settings, teacher, recipe.soft_labels, recipe.task, store.uri)
    return generate_soft_labels(teacher, dataset, recipe.soft_labels, store, recipe.task, force=force, runner=runner)


@dataclass
class StudentOutcome:
    """A student trained by distillation and its hard-label twin."""

    config: StudentConfig
    distilled: TrainResult
    baseline: TrainResult | None  # None when the recipe skips the hard-label twin
    reports: dict[Kind, ModelReport] = field(default_factory=dict)  # by kind, filled by evaluate_all
    stages: list[Stage] = field(default_factory=list)  # the assistants and earlier generations before `distilled`
    # an ensemble teacher's: the distilled student measured against each member (agreement, retention), by member
    against_members: dict[str, ModelReport] = field(default_factory=dict)
    # the distilled student's validation metric on the train split, and chance there (for a classifier, accuracy
    # and the largest class's share): a student still at chance did not learn (filled by evaluate_all)
    train_score: float | None = None
    chance_score: float | None = None
    search: SearchResult | None = None  # the search that chose this candidate's architecture
    deployment: Deployment | None = None  # its export, parity and formats measured (None: deploy.export false)
    # measures the distilled student's top-1 agreement with the teacher on (the first rows of) the transfer set it
    # was taught on: below the recipe's capacity_agreement, it cannot fit what it is taught. Set by evaluate_all and
    # called only by a diagnosis (a student that passes never pays for it)
    transfer_fit: Callable[[], float] | None = field(default=None, repr=False)

    def did_not_learn(self, task: Task) -> str | None:
        """Why the distilled student counts as not having learned, or None."""
        if self.train_score is None or self.chance_score is None:
            return None
        return task.did_not_learn(self.train_score, self.chance_score)

    def diagnosis(self, task: Task, capacity_agreement: float) -> tuple[str, str]:
        """Why a student that failed the gates degraded: (did_not_learn | capacity_gap | data_gap, in words)."""
        not_learned = self.did_not_learn(task)
        if not_learned is not None:
            return DID_NOT_LEARN, not_learned
        agreement = self.transfer_fit() if self.transfer_fit is not None else 1.0
        if agreement < capacity_agreement:
            return CAPACITY_GAP, (
                f"capacity gap: {self.config.name} agrees with the teacher on only {agreement:.3f} of the transfer "
                f"set it was taught on (< {capacity_agreement:.3f}): it cannot fit what it is taught; a larger "
                "student or a teacher assistant closes this"
            )
        return DATA_GAP, (
            f"data gap: {self.config.name} fits the transfer set (agreement {agreement:.3f} >= "
            f"{capacity_agreement:.3f}) and falls short on held-out data: too little or too narrow transfer data; "
            "more teacher-labeled (augmented) transfer data closes this"
        )

    def results(self) -> list[tuple[Kind, TrainResult]]:
        pairs = [(Kind.DISTILLED, self.distilled), (Kind.HARD_LABEL, self.baseline)]
        return [(kind, result) for kind, result in pairs if result is not None]


EXPORT = "export"  # a run folder's exported candidates, one folder each
DID_NOT_LEARN, CAPACITY_GAP, DATA_GAP = "did_not_learn", "capacity_gap", "data_gap"  # the diagnoses
TRANSFER_CHECK_ROWS = 1000  # transfer rows a student's fit is measured on (the capacity-gap diagnosis)


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
    init: Any = None,
    warm: WarmStart | None = None,
    on_eval: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Train one student, by distillation from `teacher` (its signal: `labels`) or (baseline) on hard labels alone;
    resumable from out_dir. A transformer student is cut from `init` (default: the teacher); a warm one starts
    from the warm start's student version instead, on its rows and step budget."""
    task = task_of(recipe)
    transfer_texts, transfer_targets = task.examples(dataset, "transfer")
    torch.manual_seed(recipe.train.seed)
    if warm is not None:
        student = copy.deepcopy(warm.module)
    else:
        source = cut_from(init if init is not None else teacher.module)
        student = task.build_student(student_cfg, source, dataset, transfer_texts, recipe.soft_labels, log)
    val = task.examples(dataset, "validation")
    kind = Kind.HARD_LABEL if baseline else Kind.DISTILLED
    fingerprint = f"{recipe.recipe_hash()}:{student_cfg.name}:{labels.key}:{kind}"
    cfg = recipe.train
    if baseline:
        transfer = TransferSet(*task.examples(dataset, "train"), None)
        cfg = baseline_config(recipe.train)
    elif warm is not None and warm.rows is not None:
        subset = take(labels.signal["transfer"], warm.rows)
        chosen = [transfer_texts[int(i)] for i in warm.rows]
        transfer = TransferSet(chosen, transfer_targets[warm.rows], subset)
    else:
        transfer = TransferSet(transfer_texts, transfer_targets, labels.signal["transfer"])
    if warm is not None and not baseline:  # its step budget binds, however few rows it has
        cfg = recipe.train.model_copy(update={"max_steps": warm.steps, "epochs": 1000})
        fingerprint += f":{warm.fingerprint()}"
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
        task=task,
        signal_cfg=recipe.soft_labels,
        on_eval=on_eval,
    )


def search_students(
    recipe: Recipe,
    settings: Settings,
    dataset: PreparedDataset,
    labels: SoftLabels,
    teacher: LoadedTeacher,
    teacher_params: int,
    out_dir: Path,
    log: Log = print,
) -> SearchResult:
    """The recipe's search over student architectures, distilled from `teacher` (the last assistant, if any): each
    trial trains where the candidate trains, so the chosen one's training is reused."""
    task = task_of(recipe)
    source = cut_from(teacher.module)
    transfer_texts, _ = task.examples(dataset, "transfer")

    def build(cfg: StudentConfig) -> Any:
        return task.build_student(cfg, source, dataset, transfer_texts, recipe.soft_labels, lambda _: None)

    architectures = search.measure(
        recipe, task, build, source, dataset.digest, task.examples(dataset, "test")[0], settings.search_cache,
        teacher_params, log,
    )  # fmt: skip

    def train(cfg: StudentConfig, on_eval: Callable[[int, float], None]) -> tuple[int, float]:
        result = distill_student(recipe, cfg, dataset, labels, teacher, out_dir, log=log, on_eval=on_eval)
        return result.steps, result.best_score

    val_targets = task.examples(dataset, "validation")[1]
    teacher_score = task.signal_score(labels.signal["validation"], val_targets)
    name = f"{recipe.name}-{recipe.recipe_hash()}-{labels.key}"
    result = search.search(recipe, task, architectures, train, teacher_score, settings.search_storage, name, log)
    result.save(out_dir)
    return result


def distill_all(
    recipe: Recipe,
    dataset: PreparedDataset,
    labels: SoftLabels,
    teacher: LoadedTeacher,
    out_dir: Path,
    log: Log = print,
    warm: WarmStart | None = None,
    settings: Settings | None = None,
) -> list[StudentOutcome]:
    """Every student candidate of the recipe, each beside its hard-label twin (unless the recipe skips it): the
    teacher assistants first (each taught by the stage before it), then each candidate from the last of them;
    the warm start's candidate from its student version. With a search (which needs the settings: where its
    studies and measurements live), the one candidate is the architecture it chose. With train.parallel_candidates
    and a Dask cluster in the settings, the candidates train there side by side."""
    teacher_params = sum(p.numel() for p in teacher.module.parameters())
    assistants: list[Stage] = []
    for cfg in recipe.stages.assistants:
        result = distill_student(recipe, cfg, dataset, labels, teacher, out_dir / STAGES, log=log)
        assistants.append(Stage(cfg.name, cfg, Role.ASSISTANT, result))
        teacher = as_teacher(recipe, cfg.name, result.student)
        labels = signal_of(recipe, dataset, teacher)
    candidates, searched = recipe.students, None
    if recipe.search is not None:
        if settings is None:
            raise ValueError("a recipe with a search needs the settings (where its studies live)")
        searched = search_students(recipe, settings, dataset, labels, teacher, teacher_params, out_dir, log)
        candidates = [searched.chosen_config()]
    jobs = [
        (
            cfg.name,
            partial(
                _distill_candidate, recipe, cfg, dataset, labels, out_dir=out_dir,
                warm=warm if warm and warm.candidate == cfg.name else None,
            ),
        )
        for cfg in candidates
    ]  # fmt: skip
    runner = None
    if recipe.train.parallel_candidates and len(jobs) > 1:
        runner = candidate_runner(settings) if settings is not None else None
        if runner is None:
            log("train.parallel_candidates: no Dask cluster is set (DISTILL_DASK, DISTILL_DASK_ADDRESS), so the "
                "candidates train one after the other in this process")  # fmt: skip
    if runner is not None:
        log(f"{len(jobs)} candidates train side by side on the Dask cluster")
        outcomes = runner(teacher, jobs)
    else:
        outcomes = [train(teacher=teacher, log=log) for _, train in jobs]
    for outcome in outcomes:  # the assistants are every candidate's first stages, the same objects for each
        outcome.stages = [*assistants, *outcome.stages]
        outcome.search = searched
    return outcomes


def _distill_candidate(
    recipe: Recipe,
    cfg: StudentConfig,
    dataset: PreparedDataset,
    labels: SoftLabels,
    teacher: LoadedTeacher,
    out_dir: Path,
    log: Log,
    warm: WarmStart | None = None,
) -> StudentOutcome:
    """One candidate and its twin, both cut from `teacher`. Born-again: each generation but the first is taught
    by the one before it and starts where the first did (a fresh student of the same architecture)."""
    init, first_labels = teacher, labels
    generations: list[Stage] = []
    for generation in range(1, recipe.stages.generations):
        where = out_dir / STAGES / f"gen{generation}"
        result = distill_student(recipe, cfg, dataset, labels, teacher, where, log=log, init=init.module)
        generations.append(Stage(generation_name(cfg.name, generation), cfg, Role.GENERATION, result))
        teacher = as_teacher(recipe, generations[-1].name, result.student)
        labels = signal_of(recipe, dataset, teacher)
    if warm is not None:
        log(f"{cfg.name}: {warm.said}")
    distilled = distill_student(recipe, cfg, dataset, labels, teacher, out_dir, log=log, init=init.module, warm=warm)
    twin = None
    if recipe.evaluation.hard_label_baseline:
        twin = distill_student(recipe, cfg, dataset, first_labels, init, out_dir, baseline=True, log=log)
    return StudentOutcome(cfg, distilled, twin, stages=generations)


def evaluate_all(
    recipe: Recipe,
    dataset: PreparedDataset,
    labels: SoftLabels,
    teacher: LoadedTeacher,
    outcomes: list[StudentOutcome],
    export_dir: Path | None = None,
) -> list[ModelReport]:
    """The teacher, then each candidate's stages (assistants once), the distilled student and its hard-label twin,
    on the test split. Given an export_dir (and deploy.export), each distilled candidate is exported there too and
    its report becomes its deploy target's (deploy.Deployment)."""
    task = task_of(recipe)
    texts, y = task.examples(dataset, "test")
    teacher_signal = labels.signal["test"]

    teacher_name = f"teacher {teacher.name} v{teacher.version}"
    models = {teacher_name: teacher.module}
    members = {f"member {name}": module for name, module in members_of(teacher).items()}
    models.update(members)
    for outcome in outcomes:
        models.update({stage.display: stage.result.student for stage in outcome.stages})
        models.update({display_name(outcome.config.name, k): result.student for k, result in outcome.results()})
    speeds = task.measure_speed(models, texts, recipe.evaluation)  # side by side

    def report(name: str, outputs: Any = None) -> ModelReport:
        return task.evaluate(name, models[name], texts, y, teacher_signal, speeds[name], outputs)

    teacher_report = report(teacher_name, teacher_signal)
    reports = [teacher_report]
    against: dict[str, tuple[Any, ModelReport]] = {}  # an ensemble's members: each one's test signal and report
    for name, module in members.items():
        reports.append(task.relative_to(report(name), teacher_report))  # the member against the ensemble
        own = generate_soft_labels(
            LoadedTeacher(module, name, "member", ""), dataset, recipe.soft_labels, None, recipe.task, splits=("test",)
        ).signal["test"]
        against[name] = own, task.evaluate(name, module, texts, y, own, speeds[name], own)
    train_texts, train_labels = task.examples(dataset, "train")
    chance = task.chance(train_labels)
    transfer = task.examples(dataset, "transfer")[0][:TRANSFER_CHECK_ROWS]
    transfer_signal = take(labels.signal["transfer"], np.arange(len(transfer)))
    for outcome in outcomes:
        for stage in outcome.stages:
            if stage.report is None:  # an assistant is every candidate's: measured once
                stage.report = task.relative_to(report(stage.display), teacher_report)
                reports.append(stage.report)
        measured = {kind: report(display_name(outcome.config.name, kind)) for kind, _ in outcome.results()}
        twin = measured.get(Kind.HARD_LABEL)
        for kind, value in measured.items():
            outcome.reports[kind] = task.relative_to(value, teacher_report, twin)
        student = display_name(outcome.config.name, Kind.DISTILLED)
        if export_dir is not None and recipe.deploy.export:
            outcome.deployment = deploy_candidate(
                recipe, task, student, outcome.distilled.student, outcome.reports[Kind.DISTILLED],
                (teacher_name, teacher.module, teacher_report), (texts, y, teacher_signal),
                export_dir / outcome.config.name, twin,
            )  # fmt: skip
            outcome.reports[Kind.DISTILLED] = outcome.deployment.target()
        reports += [outcome.reports[kind] for kind in measured]
        for name, (own, member_report) in against.items():
            vs = task.evaluate(student, models[student], texts, y, own, speeds[student])
            outcome.against_members[name] = task.relative_to(vs, member_report)
        outcome.train_score = task.validate(outcome.distilled.student, train_texts, train_labels)
        outcome.chance_score = chance
        outcome.transfer_fit = partial(task.agreement, outcome.distilled.student, transfer, transfer_signal)
    return reports


def members_table(task: Task, outcomes: list[StudentOutcome]) -> str:
    """Each distilled student against each member of an ensemble teacher (empty for one teacher)."""
    rows = [
        dataclasses.replace(report, name=f"{outcome.config.name} (distilled) vs {member}")  # type: ignore[type-var]
        for outcome in outcomes
        for member, report in outcome.against_members.items()
    ]
    if not rows:
        return ""
    return "Against each member of the ensemble:\n\n" + comparison_table(
        rows, ("name", "agreement", task.against_teacher)
    )


def deployment_tables(task: Task, outcomes: list[StudentOutcome]) -> str:
    """Each candidate's formats side by side (empty without exports)."""
    return "\n\n".join(o.deployment.table(task) for o in outcomes if o.deployment is not None)


def _training_meta(result: TrainResult) -> dict[str, Any]:
    return {
        "steps": result.steps,
        "best_step": result.best_step,
        "best_score": result.best_score,
        "stopped_early": result.stopped_early,
        "seconds": round(result.seconds, 1),
        "history": result.history,
    }


def _trained(meta: dict[str, Any], path: Path) -> TrainResult:
    best = meta.get("best_score", meta.get("best_accuracy", 0.0))  # training.json of earlier releases
    return TrainResult(
        read_module(path), meta["history"], meta["steps"], meta["best_step"], best, meta["stopped_early"]
    )


def save_students(out_dir: Path, outcomes: list[StudentOutcome]) -> None:
    """Each student (torch.save of the module) and each stage before it, then training.json, written last: its
    presence means complete."""
    (out_dir / "training.json").unlink(missing_ok=True)
    training: dict[str, Any] = {}
    for outcome in outcomes:
        for kind, result in outcome.results():
            replace_atomic(out_dir / outcome.config.name / f"{kind}.pt", partial(save_module, result.student))
            training[f"{outcome.config.name}/{kind}"] = _training_meta(result)
        for stage in outcome.stages:
            replace_atomic(out_dir / STAGES / f"{stage.name}.pt", partial(save_module, stage.result.student))
            training[f"{STAGES}/{stage.name}"] = _training_meta(stage.result)
    for searched in {id(o.search): o.search for o in outcomes if o.search is not None}.values():
        searched.save(out_dir)
    write_json(out_dir / "training.json", training)


def load_students(out_dir: Path, recipe: Recipe) -> list[StudentOutcome]:
    """The students save_students wrote for this recipe, with their stages, ready to evaluate."""
    index = out_dir / "training.json"
    if not index.is_file():
        raise DistillError(f"{out_dir} holds no complete set of trained students: run `distill stage train` first")
    training = json.loads(index.read_text())

    def stage(name: str, cfg: StudentConfig, role: Role) -> Stage:
        meta = training.get(f"{STAGES}/{name}")
        if meta is None:
            raise DistillError(f"stage '{name}' of recipe '{recipe.name}' is not in {out_dir}: train it again")
        return Stage(name, cfg, role, _trained(meta, out_dir / STAGES / f"{name}.pt"))

    assistants = [stage(cfg.name, cfg, Role.ASSISTANT) for cfg in recipe.stages.assistants]
    searched = SearchResult.load(out_dir) if recipe.search is not None else None
    if recipe.search is not None and searched is None:
        raise DistillError(f"{out_dir} holds no {search.SEARCH_FILE}: the search's students were not saved there")
    outcomes = []
    for cfg in [searched.chosen_config()] if searched is not None else recipe.students:
        results = {
            kind: _trained(training[f"{cfg.name}/{kind}"], out_dir / cfg.name / f"{kind}.pt")
            for kind in Kind
            if f"{cfg.name}/{kind}" in training
        }
        if Kind.DISTILLED not in results:
            raise DistillError(f"student '{cfg.name}' of recipe '{recipe.name}' is not in {out_dir}: train it again")
        generations = [
            stage(generation_name(cfg.name, g), cfg, Role.GENERATION) for g in range(1, recipe.stages.generations)
        ]
        outcome = StudentOutcome(cfg, results[Kind.DISTILLED], results.get(Kind.HARD_LABEL), search=searched)
        outcome.stages = [*assistants, *generations]
        outcomes.append(outcome)
    return outcomes


def headline_metrics(task: Task, teacher: ModelReport, outcomes: list[StudentOutcome]) -> dict[str, Any]:
    """The numbers a person compares, as `dvc metrics show` prints them: teacher.accuracy, bag.distilled.accuracy."""
    metrics: dict[str, Any] = {"teacher": {k: getattr(teacher, k) for k in task.headline}}
    for outcome in outcomes:
        metrics[outcome.config.name] = {
            str(kind): {k: getattr(report, k) for k in task.headline} for kind, report in outcome.reports.items()
        }
    return metrics


def write_training_curves(out_dir: Path, outcomes: list[StudentOutcome]) -> None:
    """One CSV per student and kind (step, epoch, val_accuracy, loss terms): DVC plots them as curves."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for outcome in outcomes:
        for kind, result in outcome.results():
            frame = pd.DataFrame(result.history)
            frame.to_csv(out_dir / f"{outcome.config.name}.{kind}.csv", index=False, float_format="%.5g")


def write_report(
    recipe: Recipe,
    out_dir: Path,
    reports: list[ModelReport],
    outcomes: list[StudentOutcome],
    meta: Mapping[str, object],
) -> Path:
    """report.md, models.csv, metrics.json and report.json (last) for the reports of one evaluation (teacher
    first, as evaluate_all returns them)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    table = comparison_table(reports, task_of(recipe).columns)
    extra = [members_table(task_of(recipe), outcomes), deployment_tables(task_of(recipe), outcomes)]
    (out_dir / "report.md").write_text("\n\n".join([table, *filter(None, extra)]) + "\n")
    pd.DataFrame([r.as_dict() for r in reports]).to_csv(out_dir / "models.csv", index=False, float_format="%.6g")
    write_json(out_dir / "metrics.json", headline_metrics(task_of(recipe), reports[0], outcomes))
    write_json(out_dir / "report.json", {**meta, "reports": [r.as_dict() for r in reports]})
    return out_dir


def lineage_meta(
    recipe: Recipe, dataset: PreparedDataset, labels: SoftLabels, teacher: LoadedTeacher
) -> dict[str, str]:
    """What a report was made from."""
    return {
        "recipe": recipe.name,
        "recipe_hash": recipe.recipe_hash(),
        "teacher": teacher.identity,
        **dataset.lineage(),
        "soft_labels_key": labels.key,
    }


def recipe_teacher(recipe: Recipe, settings: Settings, name: str, version: str) -> LoadedTeacher:
    """The teacher a run without a flow distills: the version named, or the recipe's ensemble with every member
    pinned by version number (so that the DVC stages distill the same one every time)."""
    if not recipe.teachers:
        return load_teacher(name, version, settings.tracking_uri)
    loose = [
        f"teachers.{i}" for i, m in enumerate(recipe.teachers) if m.last is not None or not str(m.version).isdigit()
    ]
    if loose:
        raise RecipeError(f"{', '.join(loose)}: the DVC stages distill pinned teachers: give each a version number")
    return load_ensemble(resolve(recipe, MlflowClient(settings.tracking_uri)), settings.tracking_uri)[0]


def distill_and_evaluate(
    recipe: Recipe, settings: Settings, teacher_name: str, teacher_version: str, log: Log = print
) -> tuple[list[ModelReport], Path]:
    """One teacher version (or the recipe's pinned ensemble) through prepare → label → distill → evaluate, in this
    process and with no registry writes (the flow's version is flows.pipeline.distill_and_promote); returns the
    reports and run folder."""
    dataset = open_dataset(recipe, settings)
    teacher = recipe_teacher(recipe, settings, teacher_name, teacher_version)
    labels = label(recipe, settings, dataset, teacher)
    log(f"soft labels {labels.key} ({'reused' if labels.reused else 'generated'})")
    out = run_dir(recipe, settings, teacher)
    warm, start = warm_start(recipe, settings, dataset, labels, pinned=True)
    if recipe.warm_start is not None:
        log(start)
    outcomes = distill_all(recipe, dataset, labels, teacher, out, log, warm, settings)
    save_students(out, outcomes)
    reports = evaluate_all(recipe, dataset, labels, teacher, outcomes, out / EXPORT)
    return reports, write_report(recipe, out, reports, outcomes, lineage_meta(recipe, dataset, labels, teacher))
