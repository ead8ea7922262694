"""Prefect flows: one teacher version through the pipeline, and the watcher that starts them.

Light on purpose: a worker loads this module before it marks a run as started, so the heavy pipeline
(flows/pipeline.py: torch, GX, matplotlib) is imported inside the run. A claim makes each (teacher version,
student model) run once; the ledger tags on the teacher version, one group per student model, say how it went.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from prefect import flow, get_run_logger
from prefect.deployments import run_deployment

from distill_core import names
from distill_core.errors import RecipeError, redact
from distill_core.lineage import DATA_TRIGGER
from distill_core.recipe import Recipe, load_recipe, recipe_location
from distill_core.registry import CHAMPION
from distill_core.settings import Settings, load_settings

FLOW_NAME = "distill-teacher-version"
# The deployment a Prefect server runs this flow as (infra/prefect.yaml): "<flow name>/<deployment name>".
DISTILL_DEPLOYMENT = f"{FLOW_NAME}/distill-teacher-version"
# `--deployment auto`: every deployment of the flow tagged teacher:<name> and student:<name> (one per recipe).
AUTO = "auto"
FINAL = ("succeeded", "rejected")  # outcomes a failed rerun must not overwrite
# Runs in threads of one process (`distill serve`'s watcher beside its webhook runs) do their work one at a time:
# torch keeps process-wide state that two trainings or exports in threads corrupt (torch.manual_seed beside an
# export failed with KeyError: 'custom', from torch.fx's global metadata). Runs side by side are processes: the
# deployment's workers. Claims are taken before it, so a run waiting here holds its version and beats its heartbeat.
IN_PROCESS_WORK = threading.Lock()


@flow(name=FLOW_NAME, log_prints=True)
def distill_teacher_version(
    teacher_name: str,
    teacher_version: str,
    recipe_path: str | None = None,
    home: str | None = None,
    claimant: str = "direct",
    student_name: str | None = None,
    data_digest: str | None = None,
) -> dict[str, Any]:
    """One teacher version: checks → soft labels → candidates → evaluation → gates → register → promote.

    recipe_path and home default to DISTILL_RECIPE and DISTILL_HOME: a deployment's worker sets them.
    data_digest (a watcher that saw a new version of the recipe's DVC data): distill the version again on that
    data, claimed once per (version, data md5); skipped when the data has moved on since.
    student_name, when given (a deployment's student:<name> tag), must be the recipe's student model.
    """
    import mlflow
    from mlflow.tracking import MlflowClient

    from distill_core.ensemble import resolve
    from distill_core.registry import Ledger, ledger_entry, require_version, set_ledger, upgrade_ledger
    from distill_core.search import NoFeasibleArchitecture
    from flows.pipeline import (
        check_devices,
        check_teacher_fits,
        distill_and_promote,
        experiment,
        load_ensemble_task,
        load_teacher_task,
    )

    started = time.perf_counter()
    logger = get_run_logger()
    settings, recipe = load_settings(home), load_recipe(recipe_location(recipe_path))
    check_recipe_names(recipe, teacher_name, student_name)
    student = recipe.student_registered_name
    teacher_version = str(teacher_version)
    client, ledger = MlflowClient(settings.tracking_uri), Ledger(settings.ledger_uri)
    # Everything that can be checked before the claim is: a refused run leaves nothing behind.
    version = require_version(client, teacher_name, teacher_version)
    unqualified = qualification_problem(recipe, client, version)
    if unqualified is not None:
        why = f"{teacher_name} v{teacher_version} is not distilled by recipe {recipe.name!r}: {unqualified}"
        logger.info(why)
        return {"teacher_version": teacher_version, "student_model": student, "status": "skipped", "reason": why}
    before = ledger_entry(client, version, student)
    combination, claimed = None, (teacher_name, teacher_version)
    if recipe.teachers:  # an ensemble: the run is the combination's, claimed once whichever member started it
        combination = resolve(recipe, client)
        if (teacher_name, teacher_version) not in combination:
            why = f"{teacher_name} v{teacher_version} is not a member of the ensemble now ({combination.describe()})"
            logger.info(f"{why}: nothing to do")
            return {"teacher_version": teacher_version, "student_model": student, "status": "skipped", "reason": why}
        claimed = combination.key
        teacher = load_ensemble_task(combination, settings.tracking_uri)
    else:
        teacher = load_teacher_task(teacher_name, teacher_version, settings.tracking_uri)
    if data_digest is not None:
        from distill_core.versioning import data_identity

        if recipe.data.dvc is None:
            raise RecipeError(f"a run for new data needs data read through DVC; recipe {recipe.name!r} has no data.dvc")
        now = data_identity(recipe.data.dvc, recipe.base_dir, settings)
        if now != data_digest:
            why = f"the data moved on from md5 {data_digest} to {now}: a watcher starts the run for that"
            logger.info(why)
            return {"teacher_version": teacher_version, "student_model": student, "status": "skipped", "reason": why}
        claimed = (teacher_name, f"{teacher_version}@data:{data_digest}")
    check_teacher_fits(recipe, teacher)
    check_devices(recipe, settings)
    upgrade_ledger(client, ledger)
    who = f"{claimant}@{socket.gethostname()}:{os.getpid()}"
    if not ledger.claim(*claimed, student, who):
        logger.info(f"{'/'.join(claimed)} for {student} is already claimed by another run: nothing to do")
        return {"teacher_version": teacher_version, "student_model": student, "status": "skipped"}
    mlflow.set_tracking_uri(settings.tracking_uri)
    try:
        experiment_id = experiment(client, recipe, settings)
        active = mlflow.start_run(experiment_id=experiment_id, run_name=f"{teacher_name}-v{teacher_version}")
    except Exception:  # MLflow unreachable: nothing is recorded, so give the claim back for the next attempt
        ledger.release(*claimed, student)
        raise
    rerun_of_outcome = before.get("status") in FINAL
    with (
        active as run,
        ledger.heartbeat(*claimed, student),
        _finishing(ledger, *claimed, student),
    ):
        mlflow.set_tags(_prefect_tags())
        if not rerun_of_outcome:  # a rerun shows as running through its claim; the outcome stays until replaced
            set_ledger(
                client, teacher_name, teacher_version, student, "running", run_id=run.info.run_id, claimed_by=who
            )
        try:
            with _one_at_a_time(logger):
                decision = distill_and_promote(
                    recipe,
                    settings,
                    teacher,
                    run.info.run_id,
                    (teacher_name, teacher_version),
                    combination,
                    DATA_TRIGGER if data_digest is not None else None,
                )
        except NoFeasibleArchitecture as err:  # the gates ask for what no architecture searched can be
            why = redact(str(err))
            mlflow.set_tags({names.OUTCOME: "rejected", names.RUN_DESCRIPTION: f"**Rejected:** {why}"})
            mlflow.log_text(err.table.markdown(), "search/frontier.md")
            set_ledger(
                client, teacher_name, teacher_version, student, "rejected", run_id=run.info.run_id,
                student_version="", student_alias="none", reasons=why,
                **_cleared(before, ["start", "search", "diagnosis", "remedies"]),
            )  # fmt: skip
            announce("rejected", teacher_name, teacher_version, student, run_id=run.info.run_id, reason=why)
            return {"teacher_version": teacher_version, "student_model": student, "status": "rejected", "reason": why}
        except Exception as err:
            message = redact(f"{type(err).__name__}: {err}")
            announce("failed", teacher_name, teacher_version, student, run_id=run.info.run_id, reason=message)
            mlflow.set_tag(names.ERROR, message[:4900])
            if rerun_of_outcome:  # keep the earlier outcome; say that the rerun failed and where
                fields = {"rerun_error": f"{message} (MLflow run {run.info.run_id})"}
                set_ledger(client, teacher_name, teacher_version, student, before["status"], **fields)
            else:
                set_ledger(client, teacher_name, teacher_version, student, "failed", error=message)
            raise
        said = {
            "start": decision.start,
            "search": decision.search_said,
            "diagnosis": decision.diagnosis[1] if decision.diagnosis else None,
            "remedies": decision.remedies_said,
        }
        set_ledger(
            client,
            teacher_name,
            teacher_version,
            student,
            decision.status,
            run_id=run.info.run_id,
            student_version=decision.student_version,
            student_alias=decision.alias or "none",
            reasons="; ".join(decision.chosen.reasons) or "all gates passed",
            **{field: value for field, value in said.items() if value},
            **_cleared(before, [field for field, value in said.items() if not value]),
        )
        outcome = "promoted" if decision.alias == CHAMPION else decision.status  # succeeded: registered, no champion
        announce(outcome, teacher_name, teacher_version, student, run_id=run.info.run_id, reason=decision.reason,
                 student_version=decision.student_version, alias=decision.alias or "none")  # fmt: skip
    return {
        "teacher_version": teacher_version,
        "student_model": student,
        "status": decision.status,
        "student_version": decision.student_version,
        "alias": decision.alias,
        "reason": decision.reason,
        "notes": decision.notes,
        "seconds": {**decision.timings, "total": time.perf_counter() - started},
    }


def announce(outcome: str, teacher: str, version: str, student: str, **payload: str) -> None:
    """The run's outcome as a Prefect event, `distill.run.<promoted|succeeded|rejected|failed>`, on the resource
    `distill.student-model.<student model>`: the automations of infra/automations.yaml notify on them."""
    from prefect.events import emit_event

    emit_event(
        event=f"distill.run.{outcome}",
        resource={
            "prefect.resource.id": f"distill.student-model.{student}",
            "prefect.resource.name": student,
            "distill.teacher": f"{teacher}/{version}",
        },
        payload={"teacher": f"{teacher}/{version}", **payload},
    )


def _cleared(before: dict[str, str], unsaid: list[str]) -> dict[str, str]:
    """Empty the fields an earlier outcome or failure wrote that this outcome does not say again."""
    return {field: "" for field in ("error", "rerun_error", *unsaid) if before.get(field)}


def _prefect_tags() -> dict[str, str]:
    """The Prefect flow run this MLflow run belongs to: its id, and its page when a Prefect UI is known."""
    from prefect.runtime import flow_run
    from prefect.settings import PREFECT_UI_URL

    if flow_run.id is None:
        return {}
    tags = {names.PREFECT_FLOW_RUN_ID: str(flow_run.id)}
    if PREFECT_UI_URL.value():
        tags[names.PREFECT_FLOW_RUN_URL] = str(flow_run.ui_url)
    return tags


@contextlib.contextmanager
def _one_at_a_time(logger: Any) -> Iterator[None]:
    """Hold IN_PROCESS_WORK, saying so when this run waits for another run of this process."""
    if not IN_PROCESS_WORK.acquire(blocking=False):
        logger.info("another run in this process is working: waiting for it (runs side by side need workers)")
        IN_PROCESS_WORK.acquire()
    try:
        yield
    finally:
        IN_PROCESS_WORK.release()


@contextlib.contextmanager
def _finishing(ledger: Any, teacher: str, version: str, student: str) -> Iterator[None]:
    """However the run ends (but killed), its claim says it ended."""
    try:
        yield
    finally:
        ledger.finish(teacher, version, student)


def check_recipe_names(recipe: Recipe, teacher_name: str, student_name: str | None = None) -> None:
    """Refuse a run whose recipe distills another teacher (or, given one, into another student model)."""
    if not recipe.distills(teacher_name):  # a worker configured with another team's recipe, say
        distilled = " and ".join(repr(n) for n in recipe.teacher_names)
        raise RecipeError(
            f"recipe {recipe.name!r} distills {distilled}, not {teacher_name!r}: "
            "check DISTILL_RECIPE (or --recipe) where this run was started"
        )
    if student_name is not None and student_name != recipe.student_registered_name:
        raise RecipeError(
            f"this run was asked for student model {student_name!r} (the deployment's student: tag), but recipe "
            f"{recipe.name!r} distills into {recipe.student_registered_name!r}: make the tag and DISTILL_RECIPE agree"
        )


def release_for_rerun(
    settings: Settings,
    teacher_name: str,
    teacher_version: str,
    student: str,
    force: bool = False,
    recipe: Recipe | None = None,
) -> None:
    """Let a handled teacher version run again on purpose; its labels, students and registration are reused.

    A claim whose run still beats its heart is never taken; a stale one (its process was killed) only with
    force, and then the dead run's MLflow run is marked KILLED.
    """
    from mlflow.tracking import MlflowClient

    from distill_core.ensemble import resolve
    from distill_core.registry import Ledger, RegistryError, ledger_entry, require_version

    client, ledger = MlflowClient(settings.tracking_uri), Ledger(settings.ledger_uri)
    version = require_version(client, teacher_name, teacher_version)
    claimed = resolve(recipe, client).key if recipe is not None and recipe.teachers else (teacher_name, teacher_version)
    claim = ledger.claim_of(*claimed, student)
    what = f"{teacher_name} v{teacher_version} for {student}"
    dead = claim is not None and not claim.finished
    if dead and not claim.stale():
        raise RegistryError(f"{what} is {claim.describe()}: its run is alive, wait for it")
    if dead and not force:
        raise RegistryError(f"{what} is {claim.describe()}: add --force to take the claim over")
    entry = ledger_entry(client, version, student)
    if dead and entry.get("run_id"):
        run = client.get_run(entry["run_id"])
        if run.info.status == "RUNNING":  # its process died with the run open
            client.set_terminated(entry["run_id"], status="KILLED")
    ledger.release(*claimed, student)


@dataclass(frozen=True)
class Target:
    """A deployment that distills one teacher into one student model (one recipe)."""

    teacher: str
    student: str
    deployment: str  # <flow name>/<deployment name>


def deployment_targets(deployment: str, recipe: Recipe | None = None) -> list[Target]:
    """The deployments to queue runs on: the one named (for the recipe's teacher and student), or with AUTO every
    deployment of the flow tagged `teacher:<name>` and `student:<name>` on the Prefect server."""
    if deployment != AUTO:
        if recipe is None:
            raise RecipeError(f"deployment {deployment!r} needs a recipe that says its teacher and student")
        return recipe_targets(recipe, deployment)
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    with get_client(sync_client=True) as client:
        found = client.read_deployments(flow_filter=FlowFilter(name=FlowFilterName(any_=[FLOW_NAME])))
    targets = []
    for dep in found:
        tags = dict(tag.split(":", 1) for tag in dep.tags if ":" in tag)
        if tags.get("teacher") and tags.get("student"):  # an ensemble's deployment: teacher:<a>,<b>
            for teacher in tags["teacher"].split(","):
                targets.append(Target(teacher.strip(), tags["student"], f"{FLOW_NAME}/{dep.name}"))
    return sorted(targets, key=lambda t: (t.deployment, t.teacher))


def recipe_targets(recipe: Recipe, deployment: str = "") -> list[Target]:
    """Where a recipe's runs start: one target per teacher model it watches (an ensemble's members, each), on the
    deployment (empty: in this process)."""
    return [Target(name, recipe.student_registered_name, deployment) for name in recipe.teacher_names]


def qualification_problem(recipe: Recipe, client: Any, version: Any) -> str | None:
    """Why the recipe does not distill this teacher version (its `qualify` rule), or None."""
    if recipe.qualify is None:
        return None
    holds = set(getattr(version, "aliases", None) or [])
    return recipe.qualify.problem(dict(version.tags), holds)


def new_data(client: Any, ledger: Any, recipe: Recipe, settings: Settings) -> tuple[str, str] | None:
    """(teacher version, data md5) when the recipe's DVC data has a new version since its current teacher version
    was distilled: the newest version with an outcome, whose student says which md5 it was made from. None when
    the data is the same, the run for this md5 has been claimed already, or a teacher version is still pending
    (its run reads the new data anyway)."""
    from distill_core.registry import ledger_entry, teacher_versions
    from distill_core.versioning import data_identity

    if recipe.data.dvc is None or recipe.teachers:
        return None
    teacher, student = recipe.teacher.registered_name, recipe.student_registered_name
    if pending_versions(client, ledger, recipe, teacher):
        return None
    handled = [
        (v, e)
        for v in teacher_versions(client, teacher)
        if (e := ledger_entry(client, v, student)).get("status") in FINAL
    ]
    if not handled or not handled[-1][1].get("student_version"):
        return None
    version, entry = handled[-1]
    made_from = client.get_model_version(student, entry["student_version"]).tags.get(names.DATASET_DIGEST)
    md5 = data_identity(recipe.data.dvc, recipe.base_dir, settings)
    if md5 == made_from or ledger.claim_of(teacher, f"{version.version}@data:{md5}", student) is not None:
        return None
    return str(version.version), md5


def pending_versions(client: Any, ledger: Any, recipe: Recipe, teacher: str) -> list[str]:
    """The versions of `teacher` a watcher starts runs for: those the ledger has not handled, oldest first; for an
    ensemble, the newest member version of the combination the recipe names now, once, when no run has claimed that
    combination (and only if it is a version of `teacher`)."""
    from distill_core.ensemble import resolve
    from distill_core.registry import unhandled_versions

    student = recipe.student_registered_name
    if not recipe.teachers:
        pending = unhandled_versions(client, ledger, teacher, student)
        if recipe.qualify is None:
            return pending
        return [
            v for v in pending if qualification_problem(recipe, client, client.get_model_version(teacher, v)) is None
        ]
    combination = resolve(recipe, client)
    if ledger.claim_of(*combination.key, student) is not None:
        return []
    teachers = [m for m in combination.members if m[0] != student]  # the champion as a teacher starts nothing
    newest = max(teachers, key=lambda m: int(client.get_model_version(m[0], m[1]).creation_timestamp or 0))
    return [newest[1]] if newest[0] == teacher else []


def submit_to_deployment(target: Target, teacher_version: str, trigger: str, data_digest: str | None = None) -> str:
    """Queue the version's run on a Prefect server's deployment (a worker runs it); returns the flow run id.

    The webhook and the watcher submit under one idempotency key per (teacher version, student model), and the
    server keeps one flow run per key and flow: whoever comes second gets the first one's run back. Callers only
    ask for versions the ledger has not recorded, so a finished run under the key is one that died before it
    claimed the version.
    """
    base = f"{target.teacher}/{teacher_version}/{target.student}" + (f"/data:{data_digest}" if data_digest else "")
    key = base
    while True:
        run = run_deployment(
            name=target.deployment,
            parameters={
                "teacher_name": target.teacher,
                "teacher_version": str(teacher_version),
                "claimant": trigger,
                "student_name": target.student,
                **({"data_digest": data_digest} if data_digest else {}),
            },
            timeout=0,  # queue it and return: the worker runs it
            idempotency_key=key,
            tags=[f"trigger:{trigger}"],
            as_subflow=False,  # its own run, not a child the watcher's run would wait for or take down with it
        )
        if run.state is None or not run.state.is_final():
            return str(run.id)
        # The key's run is over, yet the version is still asked for: it ended before claiming the version
        # (cancelled, crashed, a worker restart). Queue a fresh attempt under a key that follows that run.
        key = f"{base}/after-{run.id}"


@flow(name="watch-teachers", log_prints=True)
def watch_teachers(
    recipe_path: str | None = None, home: str | None = None, deployment: str | None = None
) -> list[dict[str, Any]]:
    """Start a run for every teacher version the ledger has not handled, oldest first.

    Without a deployment the runs happen here, one after the other, for the recipe; with one (`<flow>/<deployment>`,
    the production set-up) each version is queued on it for the workers, and with `auto` on every deployment tagged
    teacher:/student: (one per recipe); this returns at once.
    """
    from mlflow.tracking import MlflowClient

    from distill_core.registry import Ledger, unhandled_versions

    settings = load_settings(home)
    recipe = None if deployment == AUTO else load_recipe(recipe_location(recipe_path))
    client, ledger = MlflowClient(settings.tracking_uri), Ledger(settings.ledger_uri)
    logger = get_run_logger()
    results: list[dict[str, Any]] = []
    if deployment:
        for target in deployment_targets(deployment, recipe):
            if recipe is not None:
                pending = pending_versions(client, ledger, recipe, target.teacher)
            else:
                pending = unhandled_versions(client, ledger, target.teacher, target.student)
            logger.info(f"{len(pending)} unhandled version(s) of {target.teacher} for {target.student}: {pending}")
            for version in pending:
                run_id = submit_to_deployment(target, version, "watcher")
                results.append(
                    {"teacher_version": version, "student_model": target.student, "status": "submitted",
                     "flow_run_id": run_id}
                )  # fmt: skip
            fresh = new_data(client, ledger, recipe, settings) if recipe is not None else None
            if fresh is not None and target.teacher == recipe.teacher.registered_name:  # type: ignore[union-attr]
                run_id = submit_to_deployment(target, fresh[0], "watcher:data", data_digest=fresh[1])
                results.append({"teacher_version": fresh[0], "student_model": target.student, "status": "submitted",
                                "flow_run_id": run_id, "data": fresh[1]})  # fmt: skip
        return results
    assert recipe is not None
    for teacher in recipe.teacher_names:
        pending = pending_versions(client, ledger, recipe, teacher)
        logger.info(f"{len(pending)} unhandled version(s) of {teacher}: {pending}")
        for version in pending:
            try:
                results.append(
                    distill_teacher_version(
                        teacher, version, str(recipe_location(recipe_path)), home, claimant="watcher"
                    )
                )
            except Exception as err:  # the ledger says failed; the watcher goes on with the next version
                results.append({"teacher_version": version, "status": "failed", "error": redact(err)})
    fresh = new_data(client, ledger, recipe, settings)
    if fresh is not None:  # a new version of the data: the current teacher version again, on it
        version, md5 = fresh
        logger.info(f"new data (DVC md5 {md5}) since {recipe.teacher.registered_name} v{version} was distilled")
        try:
            results.append(
                distill_teacher_version(
                    recipe.teacher.registered_name,
                    version,
                    str(recipe_location(recipe_path)),
                    home,
                    claimant="watcher:data",
                    data_digest=md5,
                )
            )
        except Exception as err:
            results.append({"teacher_version": version, "data": md5, "status": "failed", "error": redact(err)})
    return results
