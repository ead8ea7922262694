"""The pipeline's steps as Prefect tasks, and the body of the distill-teacher-version flow.

Orchestration only: every step is a function in distill_core; here they become tasks with retries, a cache
on the soft-label key, MLflow runs and a Prefect report artifact. This module is heavy (torch, GX,
matplotlib): flows/distill.py imports it only once a run has started, so a worker reports the run as started
without waiting for these imports.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from distill_core import checks, links, names, plots, steps
from distill_core.data import PreparedDataset
from distill_core.ensemble import Combination, cut_from, load_ensemble
from distill_core.errors import DistillError, SoftLabelError
from distill_core.evaluate import ModelReport, comparison_table
from distill_core.lineage import Lineage
from distill_core.model_io import load_teacher, log_student
from distill_core.modules import LoadedTeacher, resolve_device
from distill_core.promotion import Decision, evaluate_champion, judge_all, register_and_promote
from distill_core.recipe import Recipe
from distill_core.registry import Ledger
from distill_core.settings import Settings
from distill_core.soft_labels import SoftLabels, labeling_device, load_soft_labels, soft_label_key
from distill_core.stages import Stage, chain
from distill_core.store import check_locations, open_store
from distill_core.tasks import task_of
from distill_core.warm import WarmStart


def _transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry I/O hiccups, not bad input: the pipeline's own errors name a problem a retry will not fix."""
    return not isinstance(getattr(state, "data", None), DistillError)


# I/O steps retry with backoff; nothing is cached by its inputs (models and datasets hash slowly, if at all).
RETRIES: dict[str, Any] = {
    "retries": 3,
    "retry_delay_seconds": exponential_backoff(backoff_factor=2),
    "retry_condition_fn": _transient,
}
IO_RETRIES: dict[str, Any] = {**RETRIES, "cache_policy": NO_CACHE}


@task(**IO_RETRIES)
def load_teacher_task(name: str, version: str, tracking_uri: str) -> LoadedTeacher:
    return load_teacher(name, version, tracking_uri)


@task(**IO_RETRIES)
def load_ensemble_task(combination: Combination, tracking_uri: str) -> LoadedTeacher:
    return load_ensemble(combination, tracking_uri)[0]


def check_teacher_fits(recipe: Recipe, teacher: LoadedTeacher) -> None:
    """What the recipe asks of the teacher (layers to copy, embedding sizes), checked before anything is claimed:
    of the first assistant when there are any (the recipe checked each later stage against the one before it)."""
    task = task_of(recipe)
    for student in recipe.stages.assistants[:1] or recipe.candidates:  # a search's architectures too
        task.check_fits(student, cut_from(teacher.module))


def check_devices(recipe: Recipe, settings: Settings) -> None:
    """The devices the recipe asks for, checked before anything is claimed: training runs on this machine, and so
    does labeling unless it goes to a Dask scheduler elsewhere (whose workers refuse a GPU they lack)."""
    resolve_device(recipe.train.device, "train.device")
    if settings.dask is None or settings.dask == "local":
        resolve_device(labeling_device(recipe.soft_labels), "soft_labels.device")


DATA_DOCS = "data_docs"  # the run's artifact folder of the rendered GX site; its index.html lists every result


def _log_data_docs(docs_dir: Path) -> str:
    """Log the rendered data-docs site (not the GX project) to the active run; returns its index's URI."""
    mlflow.log_artifacts(str(checks.site_dir(docs_dir)), DATA_DOCS)
    return f"{mlflow.get_artifact_uri(DATA_DOCS)}/index.html"


@contextmanager
def _data_docs(docs_dir: Path) -> Iterator[None]:
    """Log the data docs to the run whatever happens; a failed check then points at them there, not at docs_dir
    (a temporary folder that is gone once the run ends)."""
    try:
        yield
    except checks.ChecksFailed as err:
        logged = _log_data_docs(docs_dir)
        raise checks.ChecksFailed(err.suite, err.failures, logged if err.docs_index else None) from None
    _log_data_docs(docs_dir)


@task(cache_policy=NO_CACHE)
def check_dataset_task(recipe: Recipe, settings: Settings, docs_dir: Path) -> PreparedDataset:
    dataset = steps.open_dataset(recipe, settings)
    checks.raise_on_failure(task_of(recipe).check_data(dataset, docs_dir, recipe.checks))
    return dataset


def _soft_label_cache_key(context: Any, parameters: dict[str, Any]) -> str:
    teacher, dataset, recipe = parameters["teacher"], parameters["dataset"], parameters["recipe"]
    store = hashlib.sha256(parameters["settings"].store_uri.encode()).hexdigest()[:12]
    return f"soft-labels-{soft_label_key(teacher.identity, dataset.digest, recipe.soft_labels, recipe.task)}-{store}"


@task(cache_key_fn=_soft_label_cache_key, persist_result=True, **RETRIES)
def soft_labels_task(recipe: Recipe, settings: Settings, dataset: PreparedDataset, teacher: LoadedTeacher) -> str:
    """Label (or reuse) and return the content key; Prefect skips this task when the key is cached."""
    return steps.label(recipe, settings, dataset, teacher).key


@task(cache_policy=NO_CACHE)
def check_soft_labels_task(labels: SoftLabels, dataset: PreparedDataset, recipe: Recipe, docs_dir: Path) -> None:
    checks.raise_on_failure(task_of(recipe).check_signal(labels, dataset, docs_dir, recipe.checks))


@task(cache_policy=NO_CACHE)
def distill_candidates_task(
    recipe: Recipe,
    dataset: PreparedDataset,
    labels: SoftLabels,
    teacher: LoadedTeacher,
    out_dir: Path,
    settings: Settings,
    warm: WarmStart | None = None,
) -> list[steps.StudentOutcome]:
    logger = get_run_logger()
    return steps.distill_all(recipe, dataset, labels, teacher, out_dir, log=logger.info, warm=warm, settings=settings)


@task(**IO_RETRIES)
def register_task(
    decision: Decision,
    outcome: steps.StudentOutcome,
    recipe: Recipe,
    lineage: Lineage,
    input_texts: list[str],
    settings: Settings,
    champion_now: Callable[[], tuple[str | None, ModelReport | None]],
    candidate_run_id: str,
) -> Decision:
    ledger = Ledger(settings.ledger_uri)
    return register_and_promote(
        decision, outcome, recipe, lineage, input_texts, settings.tracking_uri, ledger, champion_now, candidate_run_id
    )


def experiment(client: MlflowClient, recipe: Recipe, settings: Settings) -> str:
    """The student model's experiment, marked as model training so the MLflow UI opens it on its runs."""
    name = f"distill-{recipe.student_registered_name}"
    kind = {names.EXPERIMENT_KIND: names.MODEL_TRAINING}
    found = client.get_experiment_by_name(name)
    if found is None:
        try:  # created with its tag at once: a run that finds it finds it whole
            return client.create_experiment(name, artifact_location=settings.experiment_location(name), tags=kind)
        except MlflowException:  # another run of the same student model created it a moment ago
            found = client.get_experiment_by_name(name)
            if found is None:
                raise
    if found.tags.get(names.EXPERIMENT_KIND) != names.MODEL_TRAINING:  # made by an earlier release, or by hand
        client.set_experiment_tag(found.experiment_id, names.EXPERIMENT_KIND, names.MODEL_TRAINING)
    return found.experiment_id


@contextmanager
def _candidate_run(
    recipe: Recipe,
    outcome: steps.StudentOutcome,
    verdict_reasons: list[str],
    teacher: str,
    teacher_signal: Any,
    test_targets: Any,
    test_texts: Any,
) -> Iterator[str]:
    """A nested MLflow run per candidate: params, per-evaluation metrics, plots; yields its run id while it is the
    active run (the chosen candidate's model is logged in it, so its registered version's source is this run)."""
    parent = mlflow.active_run()
    assert parent is not None
    with mlflow.start_run(run_name=outcome.config.name, nested=True, experiment_id=parent.info.experiment_id) as run:
        mlflow.log_params({f"student.{k}": v for k, v in outcome.config.model_dump().items()})
        for kind, result in outcome.results():
            for row in result.history:
                metrics = {
                    names.history_metric(kind, k): float(v) for k, v in row.items() if k not in ("step", "epoch")
                }
                mlflow.log_metrics(metrics, step=int(row["step"]))
            mlflow.log_metrics(_report_metrics(kind, outcome.reports[kind]))
        mlflow.set_tags(names.gate_tags(verdict_reasons))
        for member, report in outcome.against_members.items():
            fields = ("agreement", task_of(recipe).against_teacher)
            mlflow.log_metrics({names.member_metric(member, k): float(getattr(report, k)) for k in fields})
        histories = {names.display_name(outcome.config.name, kind): r.history for kind, r in outcome.results()}
        title = f"{outcome.config.name}, distilled from {teacher}"
        curves = plots.training_curves(histories, task_of(recipe).early_stopping, title)
        mlflow.log_figure(curves, "plots/training_curves.png")
        figures = task_of(recipe).figures(
            outcome.config.name, outcome.distilled.student, test_texts, test_targets, teacher_signal, teacher
        )
        for path, figure in figures.items():
            mlflow.log_figure(figure, path)
        if outcome.deployment is not None:  # every format's measurements, and the table that compares them
            for fmt, report in outcome.deployment.reports.items():
                numbers = {k: v for k, v in report.as_dict().items() if isinstance(v, int | float)}
                mlflow.log_metrics({f"deploy.{fmt}.{k}": float(v) for k, v in numbers.items()})
            parity = {"parity": outcome.deployment.parity, "max_logit_diff": outcome.deployment.max_logit_diff}
            mlflow.log_metrics({f"deploy.onnx.{k}": v for k, v in parity.items()})
            mlflow.log_text(outcome.deployment.table(task_of(recipe)) + "\n", "deployment.md")
        yield run.info.run_id


def _stage_run(recipe: Recipe, stage: Stage, input_texts: list[Any], who: str) -> None:
    """A nested run per stage before a candidate (an assistant, an earlier generation): its params, training curve,
    test metrics and its model, logged so that it can be registered from the run's page."""
    parent = mlflow.active_run()
    assert parent is not None
    with mlflow.start_run(run_name=stage.display, nested=True, experiment_id=parent.info.experiment_id):
        mlflow.log_params({f"student.{k}": v for k, v in stage.config.model_dump().items()} | {"role": stage.role})
        for row in stage.result.history:
            metrics = {
                names.history_metric(names.Kind.DISTILLED, k): float(v)
                for k, v in row.items()
                if k not in ("step", "epoch")
            }
            mlflow.log_metrics(metrics, step=int(row["step"]))
        if stage.report is not None:
            mlflow.log_metrics(_report_metrics(names.Kind.DISTILLED, stage.report))
        curves = plots.training_curves({stage.display: stage.result.history}, task_of(recipe).early_stopping, who)
        mlflow.log_figure(curves, "plots/training_curves.png")
        log_student(stage.result.student, registered_model_name=None, input_texts=input_texts, task=task_of(recipe))


def _log_search(recipe: Recipe, searched: Any, who: str) -> None:
    """A search on the parent run: a nested run per trial (its architecture, measurements, validation curve and how
    it ended), then the frontier table and plot, and its cost as metrics."""
    parent = mlflow.active_run()
    assert parent is not None
    metric = names.history_metric(names.Kind.DISTILLED, searched.quality_name)
    for row in searched.trials:
        with mlflow.start_run(
            run_name=f"trial {row['trial']}: {row['name']}", nested=True, experiment_id=parent.info.experiment_id
        ):
            mlflow.log_params({f"student.{k}": v for k, v in row["config"].items()} | {"role": "search trial"})
            for step, value in row["history"].items():
                mlflow.log_metric(metric, value, step=int(step))
            mlflow.log_metrics({f"search.{k}": float(row[k]) for k in ("params", "bytes", "p50_ms", "p95_ms")})
            mlflow.set_tags(
                {
                    "search.state": row["state"],
                    "search.steps": str(row["steps"]),
                    "search.quality": row.get("quality_problem") or "met the gates' quality bound",
                    "search.chosen": str(row["chosen"]),
                    "search.frontier": str(row["frontier"]),
                }
            )
    summary = searched.summary()
    mlflow.log_metrics({f"search.{k}": float(v) for k, v in summary.items() if isinstance(v, int | float)})
    mlflow.log_param("search_chosen", searched.chosen)
    mlflow.log_text(searched.markdown() + "\n", "search/frontier.md")
    mlflow.log_dict(dataclasses.asdict(searched), "search/search.json")
    points = [
        {
            "name": r["name"],
            "params": r["params"],
            searched.quality_name: r["score"],
            "passed": r["state"] == "COMPLETE" and r.get("quality_problem") is None,
            "chosen": r["chosen"],
            "frontier": r["frontier"],
        }
        for r in searched.rows
        if r.get("score") is not None
    ]
    title = f"search of {who}: {summary['trials']} trials ({summary['pruned']} pruned), {summary['infeasible']} dropped"
    mlflow.log_figure(plots.size_vs_quality(points, searched.quality_name, title), "plots/search_frontier.png")


def _size_vs_quality(
    task: Any, decision: Decision, outcomes: list[steps.StudentOutcome], teacher: ModelReport, who: str
) -> Any:
    """Every candidate (the chosen one ringed), each one's hard-label twin, and the teacher as a line."""
    quality = task.quality_name
    points: list[dict[str, Any]] = [
        {
            "name": v.candidate,
            "params": v.report.params,
            quality: task.quality(v.report),
            "passed": v.passed,
            "chosen": v is decision.chosen,
        }
        for v in decision.verdicts
    ]
    for outcome in outcomes:
        twin = outcome.reports.get(names.Kind.HARD_LABEL)
        if twin is not None:
            name = names.display_name(outcome.config.name, names.Kind.HARD_LABEL)
            points.append({"name": name, "params": twin.params, quality: task.quality(twin), "twin": True})
    points.append({"name": who, "params": teacher.params, quality: task.quality(teacher), "teacher": True})
    return plots.size_vs_quality(points, quality, f"size against {quality}: students of {who}")


def _summary_markdown(
    recipe: Recipe, teacher: LoadedTeacher, decision: Decision, table: str, docs_uri: str, settings: Settings
) -> str:
    """The Prefect artifact: the verdict, links to the MLflow run and its data docs (working URLs when the tracking
    URI is a server; otherwise the run id and where the docs were logged), the candidates and the table."""
    task, run = task_of(recipe), mlflow.active_run()
    assert run is not None
    base = links.ui_base(settings.tracking_uri)
    experiment_id, run_id = run.info.experiment_id, run.info.run_id
    if base is None:
        where = f"`{run_id}` (`distill ui` serves the MLflow UI)"
        docs = docs_uri
    else:
        where = f"[{run_id}]({links.run(base, experiment_id, run_id)})"
        docs = f"[data_docs/index.html]({links.run(base, experiment_id, run_id, 'data_docs/index.html')})"
    lines = [
        f"# Distillation of {teacher.name} v{teacher.version}",
        "",
        f"**Ledger:** {decision.status}  ",
        f"**MLflow run:** {where}  ",
        f"**Data docs (GX):** {docs}",
        "",
        decision.markdown(task.quality_name, task.quality),
        "",
        "## Test split",
        "",
        table,
    ]
    return "\n".join(lines)


def _log_decision(recipe: Recipe, decision: Decision, table: str) -> None:
    """The parent run says what was decided: its description, tags, the chosen student's test metrics, and
    report.md (the verdict, then the table)."""
    task = task_of(recipe)
    mlflow.set_tags(
        {
            names.RUN_DESCRIPTION: decision.markdown(task.quality_name, task.quality),
            names.OUTCOME: decision.status,
            names.CHOSEN_CANDIDATE: decision.chosen.candidate,
            names.STUDENT_VERSION: decision.student_version,
            names.STUDENT_ALIAS: decision.alias or "none",
            names.PROMOTION_REASON: decision.reason,
            **names.gate_tags(decision.chosen.reasons),
        }
    )
    mlflow.log_metrics(_report_metrics(names.Kind.DISTILLED, decision.chosen.report))
    mlflow.log_text(f"{decision.verdict}\n\n{table}\n", "report.md")


def _report_metrics(kind: names.Kind, report: ModelReport) -> dict[str, float]:
    """A test-split report's numbers as MLflow metrics of one kind (distilled.test_accuracy, ...)."""
    return {names.report_metric(kind, k): float(v) for k, v in report.as_dict().items() if isinstance(v, (int, float))}


@contextmanager
def _timed(timings: dict[str, float], phase: str) -> Iterator[None]:
    """Time the core's own work, so the pipeline's overhead (the rest) can be measured."""
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[phase] = timings.get(phase, 0.0) + time.perf_counter() - start


@dataclasses.dataclass
class Attempt:
    """One attempt at a passing student: the recipe it used and what came of it."""

    recipe: Recipe
    dataset: PreparedDataset
    labels: SoftLabels
    outcomes: list[steps.StudentOutcome]
    reports: list[ModelReport]
    decision: Decision


def _try_remedies(
    first: Attempt, settings: Settings, teacher: LoadedTeacher, champion: ModelReport | None, out_dir: Path
) -> Attempt:
    """The recipe's remedies, each a nested run: at every step the first untried one (in the recipe's order) that
    fits the diagnosis of the attempt before it, applied to the recipe, until one passes the gates, none fits or
    the budget is spent. Returns the passing attempt, else the first; its decision records the ladder (`attempts`)
    and the first attempt's diagnosis."""
    from distill_core import degradation

    logger = get_run_logger()
    parent = mlflow.active_run()
    assert parent is not None
    started, tried, current = time.perf_counter(), [], first
    depth = task_of(first.recipe).teacher_depth(teacher.module)
    attempts: list[dict[str, str]] = []
    while current.decision.diagnosis is not None:
        todo = degradation.ladder(first.recipe, current.decision.diagnosis[0], tried)
        if not todo:
            break
        if time.perf_counter() - started > first.recipe.on_degradation.budget_s:
            attempts.append({"remedy": ", ".join(todo), "for": current.decision.diagnosis[0],
                             "outcome": "not tried: on_degradation.budget_s spent"})  # fmt: skip
            break
        remedy = todo[0]
        tried.append(remedy)
        made = degradation.variant(first.recipe, remedy, _failing(current), depth)
        if isinstance(made, str):
            attempts.append(
                {"remedy": remedy, "for": current.decision.diagnosis[0], "outcome": f"not applicable: {made}"}
            )
            continue
        variant, said = made
        logger.info(f"remedy {remedy} for {current.decision.diagnosis[0]}: {said}")
        with mlflow.start_run(run_name=f"remedy: {remedy}", nested=True, experiment_id=parent.info.experiment_id):
            diagnosis = current.decision.diagnosis[0]
            mlflow.log_params({"role": "remedy", "remedy": remedy, "changed": said[:500], "diagnosis": diagnosis,
                               "recipe_hash": variant.recipe_hash()})  # fmt: skip
            dataset = steps.open_dataset(variant, settings)
            labels = steps.label(variant, settings, dataset, teacher)
            where = out_dir / "remedies" / remedy
            outcomes = steps.distill_all(variant, dataset, labels, teacher, where, logger.info, settings=settings)
            reports = steps.evaluate_all(variant, dataset, labels, teacher, outcomes, where / steps.EXPORT)
            decision = judge_all(variant, outcomes, reports[0], first.decision.champion_before, champion)
            mlflow.log_metrics(_report_metrics(names.Kind.DISTILLED, decision.chosen.report))
            mlflow.set_tags({names.OUTCOME: decision.status, names.CHOSEN_CANDIDATE: decision.chosen.candidate,
                             **names.gate_tags(decision.chosen.reasons)})  # fmt: skip
            attempts.append(
                {
                    "remedy": remedy,
                    "for": diagnosis,
                    "changed": said,
                    "outcome": decision.status,
                    "run_id": mlflow.active_run().info.run_id,
                    "reasons": "; ".join(decision.chosen.reasons) or names.ALL_GATES_PASSED,
                }  # fmt: skip
            )
        current = Attempt(variant, dataset, labels, outcomes, [*reports, *([champion] if champion else [])], decision)
        if decision.chosen.passed:
            break
    chosen = current if current.decision.chosen.passed else first
    chosen.decision.attempts = attempts
    chosen.decision.diagnosis = first.decision.diagnosis
    return chosen


def _failing(attempt: Attempt) -> steps.StudentOutcome:
    return next(o for o in attempt.outcomes if o.config.name == attempt.decision.chosen.candidate)


def distill_and_promote(
    recipe: Recipe,
    settings: Settings,
    teacher: LoadedTeacher,
    run_id: str,
    trigger: tuple[str, str] | None = None,
    combination: Combination | None = None,
    started_by: str | None = None,
) -> Decision:
    """The distill-teacher-version flow's body: checks, soft labels, students, gates, registration, aliases. With an
    ensemble, `teacher` is the ensemble of `combination`'s members and `trigger` the member version that started
    the run (its version carries the ledger). started_by `data`: a new version of the data started it."""
    check_locations(settings.s3_locations())  # a missing bucket or refused key fails here, naming it
    docs_dir = Path(tempfile.mkdtemp(prefix="distill-gx-"))
    teacher_name, teacher_version = trigger or (teacher.name, teacher.version)
    mlflow.log_params(
        {
            "recipe": recipe.name,
            "recipe_hash": recipe.recipe_hash(),
            "teacher": teacher_name,
            "teacher_version": teacher_version,
            "policy": recipe.promotion.policy,
            **({"teachers": combination.describe()[:500]} if combination is not None else {}),
            **({"trigger": started_by} if started_by else {}),
        }
    )
    with _data_docs(docs_dir):
        dataset = check_dataset_task(recipe, settings, docs_dir)
    data_lineage = dataset.lineage()
    mlflow.log_params(data_lineage)
    mlflow.log_dict(recipe.model_dump(mode="json"), "recipe.yaml")
    timings: dict[str, float] = {}
    with _timed(timings, "soft_labels"):
        key = soft_labels_task(recipe, settings, dataset, teacher)
        try:
            labels = load_soft_labels(open_store(settings.store_uri), key)
        except SoftLabelError:  # cached key but the store lost the entry: label again
            key = soft_labels_task.with_options(refresh_cache=True)(recipe, settings, dataset, teacher)
            labels = load_soft_labels(open_store(settings.store_uri), key)
    mlflow.log_param("soft_labels_key", key)
    with _data_docs(docs_dir):
        check_soft_labels_task(labels, dataset, recipe, docs_dir)
    warm, start = steps.warm_start(recipe, settings, dataset, labels)
    if recipe.warm_start is not None:
        mlflow.log_param("warm_start", start[:500])
    with _timed(timings, "distill"):
        out_dir = steps.run_dir(recipe, settings, teacher)
        outcomes = distill_candidates_task(recipe, dataset, labels, teacher, out_dir, settings, warm)
    task = task_of(recipe)
    texts, y = task.examples(dataset, "test")
    with _timed(timings, "evaluate"):
        reports = steps.evaluate_all(recipe, dataset, labels, teacher, outcomes, out_dir / steps.EXPORT)

        def champion_now() -> tuple[str | None, ModelReport | None]:
            return evaluate_champion(
                recipe, texts, y, labels.signal["test"], teacher, reports[0], settings.tracking_uri
            )

        champion_version, champion_report = champion_now()
    if champion_report is not None:
        reports.append(champion_report)
    with _data_docs(docs_dir):
        checks.raise_on_failure(task.check_evaluation(reports, docs_dir))
    decision = judge_all(recipe, outcomes, reports[0], champion_version, champion_report)
    who = f"{teacher_name} v{teacher_version}"
    if decision.diagnosis is not None and recipe.on_degradation.remedies:
        with _timed(timings, "remedies"):
            attempt = _try_remedies(
                Attempt(recipe, dataset, labels, outcomes, reports, decision),
                settings,
                teacher,
                champion_report,
                out_dir,
            )
        recipe, dataset, labels = attempt.recipe, attempt.dataset, attempt.labels
        outcomes, reports, decision = attempt.outcomes, attempt.reports, attempt.decision
        data_lineage, key = dataset.lineage(), labels.key
    runs = {
        verdict.candidate: functools.partial(
            _candidate_run, recipe, outcome, verdict.reasons, who, labels.signal["test"], y, texts
        )
        for outcome, verdict in zip(outcomes, decision.verdicts, strict=True)
    }
    for candidate, logged in runs.items():  # the chosen one last: its run stays open while it is registered
        if candidate != decision.chosen.candidate:
            with logged():
                pass
    for stage in {stage.name: stage for outcome in outcomes for stage in outcome.stages}.values():
        _stage_run(recipe, stage, texts[:5], f"{stage.display}, a stage on the way from {who}")
    mlflow.log_figure(_size_vs_quality(task, decision, outcomes, reports[0], who), "plots/size_vs_quality.png")
    if outcomes[0].search is not None:
        _log_search(recipe, outcomes[0].search, who)
        decision.searched = outcomes[0].search.summary()
    table = comparison_table(reports, task.columns)
    extra = [steps.members_table(task, outcomes), steps.deployment_tables(task, outcomes)]
    table = "\n\n".join([table, *filter(None, extra)])
    chosen = next(o for o in outcomes if o.config.name == decision.chosen.candidate)
    lineage = Lineage(
        teacher_name=teacher_name,
        teacher_version=teacher_version,
        **data_lineage,
        soft_labels_key=key,
        recipe_hash=recipe.recipe_hash(),
        run_id=run_id,
        stages=chain(recipe) or None,
        teachers=combination.describe() if combination is not None else None,
        trigger=started_by,
        warm_start=warm.version if warm is not None and warm.candidate == decision.chosen.candidate else None,
        labeled_on="; ".join(labels.manifest.get("labeled_on", [])) or None,  # entries of earlier releases: None
        trained_on=chosen.distilled.trained_on,
    )
    with runs[decision.chosen.candidate]() as candidate_run_id:
        decision = register_task(decision, chosen, recipe, lineage, texts[:5], settings, champion_now, candidate_run_id)
    _log_decision(recipe, decision, table)
    docs_uri = _log_data_docs(docs_dir)
    decision.timings = timings
    decision.start = start if recipe.warm_start is not None else None
    mlflow.log_metrics({names.seconds_metric(phase): value for phase, value in timings.items()})
    create_markdown_artifact(
        _summary_markdown(recipe, teacher, decision, table, docs_uri, settings),
        key=f"distill-{teacher_name}-v{teacher_version}".lower().replace("_", "-"),
        description=f"{teacher_name} v{teacher_version}: {decision.status}",
    )
    return decision
