"""The `distill` command: the composition root that reaches both the core and the Prefect flows."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from distill_core.errors import DistillError, redact
from distill_core.recipe import DEFAULT_RECIPE

app = typer.Typer(
    help="Continuous distillation: every new teacher version becomes a validated student.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
stage_app = typer.Typer(help="Run one pipeline step (the DVC stages call these).", no_args_is_help=True)
app.add_typer(stage_app, name="stage")

RecipeOpt = Annotated[Path, typer.Option("--recipe", "-r", envvar="DISTILL_RECIPE", help="Recipe YAML file.")]
TeacherOpt = Annotated[str, typer.Option("--teacher", "-t", help="Registered teacher as NAME/VERSION.")]
HomeOpt = Annotated[Path | None, typer.Option("--home", help="DISTILL_HOME (default ./.distill).")]
EPHEMERAL_STARTUP_TIMEOUT_S = 120  # Prefect's default, 20 s, failed a CI run on a loaded machine


def _env(home: Path | None):  # noqa: ANN202 - returns Settings; imported lazily to keep --help fast
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    from distill_core.settings import load_settings

    return load_settings(home)


def _runs_flows_here(settings) -> None:  # noqa: ANN001 - Settings, imported lazily
    """This command runs flows in this process: with no PREFECT_API_URL, Prefect starts its ephemeral API server
    as a child process, on a database under DISTILL_HOME/prefect (unless PREFECT_HOME says otherwise), so
    `PREFECT_HOME=<DISTILL_HOME>/prefect prefect server start` shows exactly these runs. SIGKILL runs no atexit
    handler, so ask the kernel to stop that child when this process dies (Linux PR_SET_PDEATHSIG): a killed
    `distill run` leaves no server behind. Prefect waits only 20 s for that server by default, which a busy
    2-core machine can exceed on a database that already holds many runs; wait longer unless told otherwise.
    Prefect reads its settings once, when first imported (a verb's flows import it before this runs)."""
    if os.environ.get("PREFECT_API_URL"):
        return
    os.environ.setdefault("PREFECT_HOME", str(prefect_home(settings)))
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", str(EPHEMERAL_STARTUP_TIMEOUT_S))
    from prefect.context import refresh_global_settings_context

    refresh_global_settings_context()  # Prefect read its settings when a verb imported it: read them again
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import subprocess
    import types

    from prefect.server.api import server as prefect_server

    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def die_with_parent() -> None:
        prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG

    class _Subprocess(types.ModuleType):  # the subprocess module as Prefect's server module sees it
        def __getattr__(self, name: str) -> object:
            return getattr(subprocess, name)

        @staticmethod
        def Popen(*args: object, **kwargs: object) -> subprocess.Popen:  # noqa: N802 - subprocess's name
            kwargs.setdefault("preexec_fn", die_with_parent)
            return subprocess.Popen(*args, **kwargs)  # type: ignore[call-overload]

    prefect_server.subprocess = _Subprocess("subprocess")  # type: ignore[assignment]


def _recipe(path: Path):  # noqa: ANN202
    from distill_core.recipe import load_recipe

    return load_recipe(path)


def _teacher_ref(ref: str) -> tuple[str, str]:
    name, sep, version = ref.rpartition("/")
    if not sep or not name or not version.isdigit():
        raise typer.BadParameter(f"expected NAME/VERSION such as sentiment-teacher/1, got {ref!r}")
    return name, version


def prefect_home(settings) -> Path:  # noqa: ANN001 - Settings
    """Where the flows this CLI runs on Prefect's own server keep their state: DISTILL_HOME/prefect."""
    return Path(settings.home) / "prefect"


def _echo(message: str) -> None:
    typer.echo(message, err=True)


@app.command()
def demo(recipe: RecipeOpt = DEFAULT_RECIPE, home: HomeOpt = None) -> None:
    """The main job on the embedded default: teacher v1 → promoted student; teacher v2 → watcher → re-distilled."""
    from flows.demo import continuous_demo

    settings = _env(home)
    _runs_flows_here(settings)
    _recipe(recipe)
    started = time.perf_counter()
    typer.echo(f"DISTILL_HOME {settings.home}\nMLflow       {redact(settings.tracking_uri)}")
    typer.echo(f"store        {settings.store_uri}\n")
    table = continuous_demo(recipe, settings, echo=typer.echo, log=_echo)
    typer.echo(f"\n{table}\n\nfinished in {time.perf_counter() - started:.0f} s")
    typer.echo(
        "\nLook closer:\n"
        f"  distill status --home {settings.home}            ledger, aliases, lineage, alias history\n"
        f"  distill ui --home {settings.home}                MLflow UI: runs (nested per candidate, plots, data docs)"
        " and the registry, at\n"
        + "".join(f"      {url}   {what}\n" for what, url in mlflow_pages(settings, LOCAL_UI))
        + _prefect_ui_hint(settings)
        + f"  distill export {load_recipe_names(recipe)[1]}@champion --out edge --home {settings.home}"
        "   the champion as ONNX int8, runnable without torch\n"
        + f"  distill rollback {load_recipe_names(recipe)[1]} --home {settings.home}   put the previous champion back"
    )


def _prefect_ui_hint(settings) -> str:  # noqa: ANN001 - Settings
    """How to see this command's flow runs in the Prefect UI: its server's, or Prefect's own state under
    DISTILL_HOME (PREFECT_HOME) served by `prefect server start`."""
    api = os.environ.get("PREFECT_API_URL")
    if api:
        return f"  Prefect UI at {api.removesuffix('/').removesuffix('/api')}: these flow runs and their artifacts\n"
    state = os.environ.get("PREFECT_HOME", str(prefect_home(settings)))
    return (
        f"  PREFECT_HOME={state} prefect server start\n"
        "      Prefect UI at http://127.0.0.1:4200: these flow runs and their report artifacts\n"
    )


LOCAL_UI = "http://127.0.0.1:5000"  # where `distill ui` serves the MLflow UI by default


def mlflow_pages(settings, base: str) -> list[tuple[str, str]]:  # noqa: ANN001 - Settings
    """The MLflow UI pages a person opens first, as (what, URL): for each student model the pipeline distills
    into, its runs (one per teacher version) and its registry page (aliases, versions, promotion reasons)."""
    from mlflow.tracking import MlflowClient

    from distill_core import links

    client = MlflowClient(settings.tracking_uri)
    pages = []
    for experiment in client.search_experiments(filter_string="name LIKE 'distill-%'"):
        student = experiment.name.removeprefix("distill-")
        pages += [
            (f"runs of {student}", links.experiment(base, experiment.experiment_id)),
            (f"student model {student}", links.model(base, student)),
        ]
    return pages


def load_recipe_names(path: Path) -> tuple[str, str]:
    rcp = _recipe(path)
    return rcp.teacher.registered_name, rcp.student_registered_name


OutOpt = Annotated[Path | None, typer.Option("--out", help="Where to write this step's output (DVC's outs).")]
LabelsOpt = Annotated[Path, typer.Option("--labels", help="The label step's JSON output.")]
OptionalTeacher = Annotated[
    str | None, typer.Option("--teacher", "-t", help="NAME/VERSION (default: the recipe's teacher.version).")
]


def _stage_teacher(rcp, settings, ref: str | None):  # noqa: ANN001, ANN202 - Recipe, Settings -> LoadedTeacher
    from distill_core.model_io import load_teacher

    if ref is not None:
        return load_teacher(*_teacher_ref(ref), settings.tracking_uri)
    if rcp.teachers:  # an ensemble: every member pinned, so `dvc repro` distills the same one
        from distill_core.steps import recipe_teacher

        return recipe_teacher(rcp, settings, "", "")
    if rcp.teacher.version is None:
        raise typer.BadParameter("give --teacher NAME/VERSION, or set teacher.version in the recipe")
    return load_teacher(rcp.teacher.registered_name, str(rcp.teacher.version), settings.tracking_uri)


def _stage_labels(rcp, settings, labels_file: Path):  # noqa: ANN001, ANN202 - Recipe, Settings -> SoftLabels
    from distill_core.errors import SoftLabelError
    from distill_core.soft_labels import load_soft_labels
    from distill_core.store import open_store

    if not labels_file.is_file():
        raise SoftLabelError(f"{labels_file} does not exist: run `distill stage label --out {labels_file}` first")
    return load_soft_labels(open_store(settings.store_uri), json.loads(labels_file.read_text())["key"])


@stage_app.command("prepare")
def stage_prepare(recipe: RecipeOpt = DEFAULT_RECIPE, home: HomeOpt = None, out: OutOpt = None) -> None:
    """Load, check and split the recipe's data into parquet files with a digest."""
    from distill_core import steps

    dataset = steps.prepare(_recipe(recipe), _env(home), out)
    typer.echo(json.dumps({"path": str(dataset.root), "digest": dataset.digest, "counts": dataset.counts}))


@stage_app.command("teacher")
def stage_teacher(
    recipe: RecipeOpt = DEFAULT_RECIPE,
    home: HomeOpt = None,
    trainable_layers: Annotated[
        int | None, typer.Option(help="Top encoder layers to fine-tune (0: only the head).")
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help="Resolve the recipe's teacher.version instead (training the stand-in only where the "
            "local registry lacks it) and write its identity here.",
        ),
    ] = None,
) -> None:
    """Train the stand-in MiniLM teacher and register it as a new version (or, with --out, pin one)."""
    from distill_core import steps
    from distill_core.model_io import load_teacher

    settings, rcp = _env(home), _recipe(recipe)
    if out is not None:
        name, version = steps.ensure_teacher(rcp, settings, _echo)
        teacher = load_teacher(name, version, settings.tracking_uri)
        steps.write_json(out, {"name": name, "version": version, "identity": teacher.identity})
    else:
        overrides = {"trainable_layers": trainable_layers} if trainable_layers is not None else {}
        name, version = steps.train_and_register_teacher(
            rcp, settings, steps.open_dataset(rcp, settings), _echo, **overrides
        )
    typer.echo(f"{name}/{version}")


@stage_app.command("label")
def stage_label(
    teacher: OptionalTeacher = None,
    recipe: RecipeOpt = DEFAULT_RECIPE,
    home: HomeOpt = None,
    force: Annotated[bool, typer.Option(help="Relabel even if the key exists.")] = False,
    out: OutOpt = None,
) -> None:
    """Soft labels for every split (reused when the content key already exists)."""
    from distill_core import steps

    settings, rcp = _env(home), _recipe(recipe)
    loaded = _stage_teacher(rcp, settings, teacher)
    labels = steps.label(rcp, settings, steps.open_dataset(rcp, settings), loaded, force=force)
    identity = {"key": labels.key, "teacher": loaded.identity}  # the same labels, the same file (DVC's dep)
    if out is not None:
        steps.write_json(out, identity)
    summary = {**identity, "store": settings.store_uri, "reused": labels.reused, "rows": labels.manifest["rows"]}
    typer.echo(json.dumps(summary))


@stage_app.command("train")
def stage_train(
    labels: LabelsOpt,
    out: Annotated[Path, typer.Option("--out", help="Folder for the trained students.")],
    teacher: OptionalTeacher = None,
    recipe: RecipeOpt = DEFAULT_RECIPE,
    home: HomeOpt = None,
    plots: Annotated[Path | None, typer.Option(help="Folder for per-student training curves (CSV).")] = None,
) -> None:
    """Distill every student of the recipe (and its hard-label twin) from stored soft labels."""
    from distill_core import steps

    settings, rcp = _env(home), _recipe(recipe)
    loaded = _stage_teacher(rcp, settings, teacher)
    checkpoints = steps.run_dir(rcp, settings, loaded)  # under DISTILL_HOME: a killed stage resumes; DVC keeps out
    dataset, soft = steps.open_dataset(rcp, settings), _stage_labels(rcp, settings, labels)
    warm, start = steps.warm_start(rcp, settings, dataset, soft, pinned=True)
    if rcp.warm_start is not None:
        _echo(start)
    outcomes = steps.distill_all(rcp, dataset, soft, loaded, checkpoints, _echo, warm, settings)
    steps.save_students(out, outcomes)
    if plots is not None:
        steps.write_training_curves(plots, outcomes)
    typer.echo(json.dumps({f"{o.config.name}/{k}": r.best_score for o in outcomes for k, r in o.results()}))


@stage_app.command("evaluate")
def stage_evaluate(
    labels: LabelsOpt,
    students: Annotated[Path, typer.Option("--students", help="The train step's folder.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for report.md, report.json and metrics.json.")],
    teacher: OptionalTeacher = None,
    recipe: RecipeOpt = DEFAULT_RECIPE,
    home: HomeOpt = None,
) -> None:
    """The teacher, each distilled student and its hard-label twin on the test split: the comparison table; each
    candidate's ONNX export under OUT/export (deploy.export)."""
    from distill_core import steps

    settings, rcp = _env(home), _recipe(recipe)
    loaded, dataset = _stage_teacher(rcp, settings, teacher), steps.open_dataset(rcp, settings)
    soft = _stage_labels(rcp, settings, labels)
    outcomes = steps.load_students(students, rcp)
    reports = steps.evaluate_all(rcp, dataset, soft, loaded, outcomes, out / steps.EXPORT)
    steps.write_report(rcp, out, reports, outcomes, steps.lineage_meta(rcp, dataset, soft, loaded))
    typer.echo((out / "report.md").read_text())


@stage_app.command("distill")
def stage_distill(teacher: OptionalTeacher = None, recipe: RecipeOpt = DEFAULT_RECIPE, home: HomeOpt = None) -> None:
    """Label, train and evaluate in one step, under DISTILL_HOME/runs (train + evaluate without DVC)."""
    from distill_core import steps

    settings, rcp = _env(home), _recipe(recipe)
    loaded = _stage_teacher(rcp, settings, teacher)
    reports, out = steps.distill_and_evaluate(rcp, settings, loaded.name, loaded.version, log=_echo)
    typer.echo((out / "report.md").read_text())


@app.command()
def run(
    teacher: TeacherOpt,
    recipe: RecipeOpt = DEFAULT_RECIPE,
    home: HomeOpt = None,
    rerun: Annotated[bool, typer.Option(help="Run again a version the ledger already handled.")] = False,
    force: Annotated[
        bool, typer.Option(help="With --rerun: take over a stale claim (its run was killed; `distill status` says).")
    ] = False,
) -> None:
    """One pipeline run for one teacher version: checks, soft labels, students, gates, register, promote."""
    from mlflow.tracking import MlflowClient

    from distill_core.registry import require_version
    from flows.distill import check_recipe_names, distill_teacher_version, release_for_rerun

    settings = _env(home)
    _runs_flows_here(settings)
    rcp = _recipe(recipe)  # a bad recipe fails here, before any claim
    name, version = _teacher_ref(teacher)
    check_recipe_names(rcp, name)  # the flow checks these too; here they fail as one line, before Prefect starts
    require_version(MlflowClient(settings.tracking_uri), name, version)
    if rerun:
        release_for_rerun(settings, name, version, rcp.student_registered_name, force=force, recipe=rcp)

    result = distill_teacher_version(name, version, str(recipe), str(settings.home), claimant="cli")
    typer.echo(json.dumps(result, indent=2))


@app.command()
def watch(
    recipe: RecipeOpt = DEFAULT_RECIPE,
    home: HomeOpt = None,
    once: Annotated[bool, typer.Option("--once", help="One pass, then exit.")] = False,
    interval: Annotated[int, typer.Option(help="Seconds between passes.")] = 60,
) -> None:
    """Poll the registry and start runs for unprocessed teacher versions."""
    from flows.distill import watch_teachers

    settings = _env(home)
    _runs_flows_here(settings)
    _recipe(recipe)
    while True:
        results = watch_teachers(str(recipe), str(settings.home))
        for result in results:
            typer.echo(json.dumps(result))
        if once:
            return
        time.sleep(interval)


@app.command()
def serve(
    recipe: RecipeOpt = DEFAULT_RECIPE,
    home: HomeOpt = None,
    host: Annotated[str, typer.Option(help="Address the webhook receiver listens on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port of the webhook receiver.")] = 8765,
    interval: Annotated[
        int, typer.Option(help="Seconds between the watcher's passes (the safety net); 0: no watcher here.")
    ] = 300,
    deployment: Annotated[
        str | None,
        typer.Option(
            envvar="DISTILL_DEPLOYMENT",
            help="Queue runs on this Prefect deployment (FLOW/DEPLOYMENT, e.g. "
            "distill-teacher-version/distill-teacher-version) for its workers, instead of running them here; "
            "'auto': on every deployment of the flow tagged teacher:<name> and student:<name> (one per recipe).",
        ),
    ] = None,
) -> None:
    """Long-running: the MLflow webhook receiver (POST /webhooks/mlflow) plus the scheduled watcher.

    The shared secret comes from DISTILL_WEBHOOK_SECRET; give MLflow the same one when creating the webhook.
    """
    import threading

    from distill_core.registry import Ledger
    from flows.distill import (
        AUTO,
        Target,
        deployment_targets,
        distill_teacher_version,
        recipe_targets,
        submit_to_deployment,
        watch_teachers,
    )
    from flows.receiver import PATH, BackgroundRuns, Receiver, Starter, serve_http

    secret = os.environ.get("DISTILL_WEBHOOK_SECRET")
    if not secret:
        raise DistillError("DISTILL_WEBHOOK_SECRET is not set: the receiver refuses to run without a shared secret")
    if deployment and not os.environ.get("PREFECT_API_URL"):
        raise DistillError(f"--deployment {deployment} needs a Prefect server: set PREFECT_API_URL")
    # Fail fast when Prefect is down: the receiver answers 503 and MLflow retries within its 30 s timeout,
    # rather than the client retrying past it (Prefect's default, 5 retries with backoff).
    os.environ.setdefault("PREFECT_CLIENT_MAX_RETRIES", "1")
    settings = _env(home)
    _runs_flows_here(settings)
    rcp = None if deployment == AUTO else _recipe(recipe)

    start: Starter
    if deployment:

        def start(target: Target, version: str) -> None:
            run_id = submit_to_deployment(target, version, "webhook")
            _echo(f"webhook: {target.teacher} v{version} queued on {target.deployment} as flow run {run_id}")

        def targets() -> list[Target]:
            return deployment_targets(deployment, rcp)

    else:
        assert rcp is not None
        in_process = recipe_targets(rcp)
        start = BackgroundRuns(
            lambda target, version: distill_teacher_version(
                target.teacher, version, str(recipe), str(settings.home), claimant="webhook"
            )
        )

        def targets() -> list[Target]:
            return in_process

    def watch_forever() -> None:
        while True:
            try:
                for result in watch_teachers(str(recipe), str(settings.home), deployment):
                    _echo(f"watcher: {json.dumps(result)}")
            except Exception as err:  # the next pass tries again
                _echo(f"watcher pass failed: {redact(err)}")
            time.sleep(interval)

    receiver = Receiver(secret, settings.tracking_uri, Ledger(settings.ledger_uri), targets, start)
    server = serve_http(receiver, host, port)
    if interval > 0:
        threading.Thread(target=watch_forever, name="distill-watcher", daemon=True).start()
    runs = f"queued on {deployment}" if deployment else "run in this process"
    watcher = f"watcher every {interval} s" if interval > 0 else "no watcher here (a scheduled deployment is)"
    _echo(f"receiver on http://{host}:{server.server_address[1]}{PATH}; runs {runs}; {watcher}")
    server.serve_forever()  # until SIGINT or SIGTERM: finishes the requests in flight, then returns


@app.command()
def storage(
    home: HomeOpt = None,
    configure_dvc: Annotated[
        bool, typer.Option(help="Make DISTILL_DVC_REMOTE this repository's default DVC remote (.dvc/config.local).")
    ] = False,
) -> None:
    """Where soft labels, MLflow artifacts and DVC data go (DISTILL_S3 and friends), checked one by one."""
    from distill_core.store import check_locations
    from distill_core.versioning import DVC_REMOTE_NAME

    settings = _env(home)
    artifacts = settings.experiment_location("<experiment>")
    rows = {
        "soft labels (DISTILL_STORE)": settings.store_uri,
        "MLflow artifacts (DISTILL_ARTIFACTS)": artifacts.rsplit("/", 1)[0] if artifacts else "the tracking server's",
        "DVC remote (DISTILL_DVC_REMOTE)": settings.dvc_remote or "the repository's own DVC config",
    }
    for what, where in rows.items():
        typer.echo(f"{what:<38} {where}")
    if settings.s3_locations():
        check_locations(settings.s3_locations())
        typer.echo(f"S3 endpoint {os.environ.get('AWS_ENDPOINT_URL', 'AWS default')}: every S3 location answers")
    else:
        typer.echo("no S3 location configured (DISTILL_S3): everything stays local")
    if configure_dvc:
        if not settings.dvc_remote:
            raise typer.BadParameter("set DISTILL_S3 or DISTILL_DVC_REMOTE first", param_hint="--configure-dvc")
        _dvc("remote", "add", "--local", "--force", "--default", DVC_REMOTE_NAME, settings.dvc_remote)
        typer.echo(f"DVC remote '{DVC_REMOTE_NAME}' -> {settings.dvc_remote} (default, in .dvc/config.local)")


def _dvc(*args: str) -> None:
    import subprocess

    done = subprocess.run([sys.executable, "-m", "dvc", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise DistillError(f"dvc {' '.join(args)} failed: {done.stderr.strip()}")


@app.command()
def status(
    recipe: RecipeOpt = DEFAULT_RECIPE,
    home: HomeOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Teachers, their ledger, student aliases and headline metrics."""
    from distill_core.status import collect, render

    settings, rcp = _env(home), _recipe(recipe)
    first, *members = rcp.teacher_names
    state = collect(settings, first, rcp.student_registered_name, members)
    typer.echo(json.dumps(state, indent=2) if as_json else render(state))


def _person() -> str:
    import getpass

    return f"person:{getpass.getuser()} (distill CLI)"


@app.command()
def promote(
    name: str,
    version: str,
    home: HomeOpt = None,
    reason: Annotated[str | None, typer.Option(help="Why, for the alias history (needed with --force).")] = None,
    force: Annotated[
        bool, typer.Option(help="Promote a student that failed its gates; the alias history records it as forced.")
    ] = False,
) -> None:
    """Move `champion` to a student version by hand; the old champion becomes `previous`. Recorded.

    A student that failed its gates is refused unless --force with a --reason.
    """
    from mlflow.tracking import MlflowClient

    from distill_core.registry import Ledger, reconcile
    from distill_core.registry import promote as promote_version

    if force and not reason:
        raise typer.BadParameter("say why with --reason: a forced promotion is recorded with it", param_hint="--force")
    settings = _env(home)
    client, ledger = MlflowClient(settings.tracking_uri), Ledger(settings.ledger_uri)
    reconcile(client, ledger, name)
    promote_version(client, ledger, name, version, _person(), reason or "promoted by hand", force=force)
    typer.echo(f"{name}: champion is now v{version}" + (" (forced: it failed its gates)" if force else ""))


@app.command()
def rollback(name: str, home: HomeOpt = None) -> None:
    """Restore the `previous` champion (the current one becomes `previous`). Recorded."""
    from mlflow.tracking import MlflowClient

    from distill_core.registry import Ledger
    from distill_core.registry import rollback as rollback_model

    settings = _env(home)
    target = rollback_model(MlflowClient(settings.tracking_uri), Ledger(settings.ledger_uri), name, _person())
    typer.echo(f"{name}: champion is back to v{target}")


@app.command("export")
def export_student(
    ref: Annotated[str, typer.Argument(metavar="NAME@ALIAS", help="A student version: NAME@ALIAS or NAME/VERSION.")],
    out: Annotated[Path, typer.Option("--out", help="A new or empty folder for the exported student.")],
    fmt: Annotated[str, typer.Option("--format", help="onnx (fp32) or onnx-int8.")] = "onnx-int8",
    home: HomeOpt = None,
) -> None:
    """Write a registered student as a self-contained ONNX folder: the model, its tokenizer and labels, runtime.py and
    example.py, which need onnxruntime, numpy and tokenizers only (no torch)."""
    from distill_core.model_io import export_registered

    folder = export_registered(_env(home).tracking_uri, ref, fmt, out)
    files = ", ".join(sorted(p.name for p in folder.iterdir()))
    typer.echo(f"{ref} ({fmt}) -> {folder}: {files}")
    typer.echo(f"run it: pip install onnxruntime numpy tokenizers && python {folder / 'example.py'} 'your text'")


@app.command()
def notify(
    url: Annotated[str, typer.Option("--url", help="Where to POST a JSON message on every run outcome.")],
    header: Annotated[list[str] | None, typer.Option(help="A request header as NAME=VALUE (repeatable).")] = None,
) -> None:
    """Notify a webhook when a run fails, is rejected or promotes a student: the Prefect server's webhook block
    `distill-notifications` and the automations of infra/automations.yaml (PREFECT_API_URL). Replaces earlier ones."""
    from flows.notify import BLOCK, setup_notifications

    if not os.environ.get("PREFECT_API_URL"):
        raise DistillError("distill notify configures a Prefect server's automations: set PREFECT_API_URL")
    headers = dict(h.split("=", 1) for h in header or [] if "=" in h)
    if len(headers) != len(header or []):
        raise typer.BadParameter("give headers as NAME=VALUE", param_hint="--header")
    names = setup_notifications(url, headers)
    typer.echo(f"webhook block {BLOCK} -> {url}; automations: {', '.join(names)}")


@app.command()
def gc(
    home: HomeOpt = None,
    keep_versions: Annotated[int | None, typer.Option(min=1, help="Keep the newest N versions of each teacher.")] = 3,
    keep_days: Annotated[float | None, typer.Option(min=0, help="Delete what is older than this many days.")] = None,
    delete: Annotated[bool, typer.Option(help="Delete; without it, only print what would go (a dry run).")] = False,
) -> None:
    """Delete soft labels and run folders of teacher versions no aliased student needs: beyond the newest
    --keep-versions of their teacher, or older than --keep-days. A dry run unless --delete."""
    from distill_core.retention import collect, plan, render

    settings = _env(home)
    items = plan(settings, keep_versions, keep_days)
    if delete:
        collect(settings, items)
    typer.echo(render(items, deleted=delete))


@app.command()
def ui(home: HomeOpt = None, port: int = 5000) -> None:
    """The MLflow UI on the embedded store; prints the pages to open first."""
    settings = _env(home)
    for what, url in mlflow_pages(settings, f"http://127.0.0.1:{port}"):
        typer.echo(f"{what:<40} {url}")
    sys.stdout.flush()  # exec replaces this process: what is buffered would be lost
    os.execvp(
        sys.executable,
        [
            sys.executable,
            "-m",
            "mlflow",
            "ui",
            "--backend-store-uri",
            settings.tracking_uri,
            "--port",
            str(port),
        ],
    )


def main() -> None:
    """Entry point: errors the pipeline raises on purpose print as one clear line, without a traceback."""
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        app()
    except DistillError as err:
        typer.echo(f"error: {redact(err)}", err=True)
        sys.exit(1)
    except Exception as err:
        from mlflow.exceptions import MlflowException

        if not isinstance(err, MlflowException):
            raise
        # MLflow unreachable, refused, ...: one line, and never the credentials in MLFLOW_TRACKING_URI
        typer.echo(f"error: MLflow: {redact(err.message)}", err=True)
        sys.exit(1)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    """SIGTERM ends the process as Ctrl-C does, so atexit handlers run: Prefect's ephemeral server is stopped with
    it instead of being left behind."""
    raise KeyboardInterrupt
