"""Prefect flows: one teacher version through the pipeline, and the watcher that starts them.

Light on purpose: a worker loads this module before it marks a run as started, so the heavy pipeline
(flows/pipeline.py: torch, GX, matplotlib) is imported inside the run. A claim makes each teacher version
run once; the ledger tags on the teacher version say how it went.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any

from prefect import flow, get_run_logger
from prefect.deployments import run_deployment

from distill_core.errors import RecipeError
from distill_core.recipe import load_recipe, recipe_location
from distill_core.settings import Settings, load_settings

# The deployment a Prefect server runs this flow as (infra/prefect.yaml): "<flow name>/<deployment name>".
DISTILL_DEPLOYMENT = "distill-teacher-version/distill-teacher-version"


@flow(name="distill-teacher-version", log_prints=True)
def distill_teacher_version(
    teacher_name: str,
    teacher_version: str,
    recipe_path: str | None = None,
    home: str | None = None,
    claimant: str = "direct",
) -> dict[str, Any]:
    """One teacher version: checks → soft labels → candidates → evaluation → gates → register → promote.

    recipe_path and home default to DISTILL_RECIPE and DISTILL_HOME: a deployment's worker sets them.
    """
    import mlflow
    from mlflow.tracking import MlflowClient

    from distill_core.registry import Ledger, set_ledger
    from flows.pipeline import experiment, run_pipeline

    started = time.perf_counter()
    logger = get_run_logger()
    settings, recipe = load_settings(home), load_recipe(recipe_location(recipe_path))
    if teacher_name != recipe.teacher.registered_name:  # a worker configured with another team's recipe, say
        raise RecipeError(
            f"recipe {recipe.name!r} distills {recipe.teacher.registered_name!r}, not {teacher_name!r}: "
            "check DISTILL_RECIPE (or --recipe) where this run was started"
        )
    client, ledger = MlflowClient(settings.tracking_uri), Ledger(settings.ledger_uri)
    who = f"{claimant}@{socket.gethostname()}:{os.getpid()}"
    if not ledger.claim(teacher_name, str(teacher_version), who):
        logger.info(f"{teacher_name} v{teacher_version} is already claimed by another run: nothing to do")
        return {"teacher_version": str(teacher_version), "status": "skipped"}
    mlflow.set_tracking_uri(settings.tracking_uri)
    try:
        experiment_id = experiment(client, recipe, settings)
        active = mlflow.start_run(experiment_id=experiment_id, run_name=f"{teacher_name}-v{teacher_version}")
    except Exception:  # MLflow unreachable: nothing is recorded, so give the claim back for the next attempt
        ledger.release(teacher_name, str(teacher_version))
        raise
    with active as run:
        try:
            set_ledger(client, teacher_name, str(teacher_version), "running", run_id=run.info.run_id, claimed_by=who)
            decision = run_pipeline(recipe, settings, teacher_name, str(teacher_version), run.info.run_id)
        except Exception as err:
            set_ledger(client, teacher_name, str(teacher_version), "failed", error=f"{type(err).__name__}: {err}")
            mlflow.set_tag("distill.error", str(err)[:4900])
            raise
        set_ledger(
            client,
            teacher_name,
            str(teacher_version),
            decision.status,
            student_version=decision.student_version,
            alias=decision.alias or "none",
            reasons="; ".join(decision.chosen.reasons) or "all gates passed",
        )
    return {
        "teacher_version": str(teacher_version),
        "status": decision.status,
        "student_version": decision.student_version,
        "alias": decision.alias,
        "notes": decision.notes,
        "seconds": {**decision.timings, "total": time.perf_counter() - started},
    }


def release_for_rerun(settings: Settings, teacher_name: str, teacher_version: str, force: bool = False) -> None:
    """Let a handled teacher version run again on purpose; its labels, students and registration are reused."""
    from mlflow.tracking import MlflowClient

    from distill_core.registry import Ledger, RegistryError

    client = MlflowClient(settings.tracking_uri)
    status = client.get_model_version(teacher_name, teacher_version).tags.get("distill.status")
    if status == "running" and not force:
        raise RegistryError(
            f"{teacher_name} v{teacher_version} is marked running: wait for that run, or if it was killed, add --force"
        )
    Ledger(settings.ledger_uri).release(teacher_name, teacher_version)


def submit_to_deployment(
    teacher_name: str, teacher_version: str, trigger: str, deployment: str = DISTILL_DEPLOYMENT
) -> str:
    """Queue the version's run on a Prefect server's deployment (a worker runs it); returns the flow run id.

    The webhook and the watcher submit under one idempotency key per teacher version, and the server keeps one
    flow run per key and flow: whoever comes second gets the first one's run back. Callers only ask for versions
    the ledger has not recorded, so a finished run under the key is one that died before it claimed the version.
    """
    key = f"{teacher_name}/{teacher_version}"
    while True:
        run = run_deployment(
            name=deployment,
            parameters={"teacher_name": teacher_name, "teacher_version": str(teacher_version), "claimant": trigger},
            timeout=0,  # queue it and return: the worker runs it
            idempotency_key=key,
            tags=[f"trigger:{trigger}"],
            as_subflow=False,  # its own run, not a child the watcher's run would wait for or take down with it
        )
        if run.state is None or not run.state.is_final():
            return str(run.id)
        # The key's run is over, yet the version is still asked for: it ended before claiming the version
        # (cancelled, crashed, a worker restart). Queue a fresh attempt under a key that follows that run.
        key = f"{teacher_name}/{teacher_version}/after-{run.id}"


@flow(name="watch-teachers", log_prints=True)
def watch_teachers(
    recipe_path: str | None = None, home: str | None = None, deployment: str | None = None
) -> list[dict[str, Any]]:
    """Start a run for every teacher version the ledger has not handled, oldest first.

    Without a deployment the runs happen here, one after the other; with one (`<flow>/<deployment>`, the
    production set-up) each version is queued on that deployment for the workers, and this returns at once.
    """
    from mlflow.tracking import MlflowClient

    from distill_core.registry import Ledger, unhandled_versions

    recipe_path = str(recipe_location(recipe_path))
    settings, recipe = load_settings(home), load_recipe(recipe_path)
    client, ledger = MlflowClient(settings.tracking_uri), Ledger(settings.ledger_uri)
    pending = unhandled_versions(client, ledger, recipe.teacher.registered_name)
    get_run_logger().info(f"{len(pending)} unhandled version(s) of {recipe.teacher.registered_name}: {pending}")
    results: list[dict[str, Any]] = []
    for version in pending:
        if deployment:
            run_id = submit_to_deployment(recipe.teacher.registered_name, version, "watcher", deployment)
            results.append({"teacher_version": version, "status": "submitted", "flow_run_id": run_id})
            continue
        try:
            results.append(
                distill_teacher_version(recipe.teacher.registered_name, version, recipe_path, home, claimant="watcher")
            )
        except Exception as err:  # the ledger says failed; the watcher goes on with the next version
            results.append({"teacher_version": version, "status": "failed", "error": str(err)})
    return results
