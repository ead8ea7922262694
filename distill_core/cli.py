"""The `distill` command."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from distill_core.errors import DistillError

DEFAULT_RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "demo.yaml"

app = typer.Typer(
    help="Continuous distillation: every new teacher version becomes a validated student.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
stage_app = typer.Typer(help="Run one pipeline step (the DVC stages call these).", no_args_is_help=True)
app.add_typer(stage_app, name="stage")

RecipeOpt = Annotated[Path, typer.Option("--recipe", "-r", help="Recipe YAML file.")]
TeacherOpt = Annotated[str, typer.Option("--teacher", "-t", help="Registered teacher as NAME/VERSION.")]
HomeOpt = Annotated[Path | None, typer.Option("--home", help="DISTILL_HOME (default ./.distill).")]


def _env(home: Path | None):  # noqa: ANN202 - returns Settings; imported lazily to keep --help fast
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from distill_core.settings import load_settings

    return load_settings(home)


def _recipe(path: Path):  # noqa: ANN202
    from distill_core.recipe import load_recipe

    return load_recipe(path)


def _teacher_ref(ref: str) -> tuple[str, str]:
    name, sep, version = ref.rpartition("/")
    if not sep or not name or not version.isdigit():
        raise typer.BadParameter(f"expected NAME/VERSION such as sentiment-teacher/1, got {ref!r}")
    return name, version


def _echo(message: str) -> None:
    typer.echo(message, err=True)


@app.command()
def demo(recipe: RecipeOpt = DEFAULT_RECIPE, home: HomeOpt = None) -> None:
    """The main job on the embedded default: teacher → soft labels → students → comparison table."""
    from mlflow.tracking import MlflowClient

    from distill_core import steps

    settings, rcp = _env(home), _recipe(recipe)
    started = time.perf_counter()
    typer.echo(
        f"DISTILL_HOME {settings.home}\nMLflow        {settings.tracking_uri}\nstore         {settings.store_uri}\n"
    )
    dataset = steps.open_dataset(rcp, settings)
    typer.echo(f"dataset {rcp.data.source}: {dataset.counts} digest {dataset.digest}")
    client = MlflowClient(settings.tracking_uri)
    versions = client.search_model_versions(
        f"name='{rcp.teacher.registered_name}'", order_by=["version_number DESC"], max_results=1
    )
    if versions:
        name, version = rcp.teacher.registered_name, versions[0].version
        typer.echo(f"using registered teacher {name} v{version}")
    else:
        typer.echo("training the teacher (the teacher team's job, done here once)")
        name, version = steps.train_and_register_teacher(rcp, settings, dataset, log=_echo)
        typer.echo(f"registered teacher {name} v{version}")
    reports, out = steps.run_pipeline(rcp, settings, name, str(version), log=_echo)
    typer.echo("\n" + (out / "report.md").read_text())
    typer.echo(f"report: {out / 'report.json'}   ({time.perf_counter() - started:.0f} s)")
    typer.echo(f"MLflow UI: mlflow ui --backend-store-uri {settings.tracking_uri}")


@stage_app.command("prepare")
def stage_prepare(recipe: RecipeOpt = DEFAULT_RECIPE, home: HomeOpt = None) -> None:
    """Load, check and split the recipe's data into parquet files with a digest."""
    from distill_core import steps

    dataset = steps.prepare(_recipe(recipe), _env(home))
    typer.echo(json.dumps({"path": str(dataset.root), "digest": dataset.digest, "counts": dataset.counts}))


@stage_app.command("teacher")
def stage_teacher(
    recipe: RecipeOpt = DEFAULT_RECIPE,
    home: HomeOpt = None,
    trainable_layers: Annotated[
        int | None, typer.Option(help="Top encoder layers to fine-tune (0: only the head).")
    ] = None,
) -> None:
    """Train the stand-in MiniLM teacher and register it as a new version."""
    from distill_core import steps

    settings, rcp = _env(home), _recipe(recipe)
    overrides = {"trainable_layers": trainable_layers} if trainable_layers is not None else {}
    name, version = steps.train_and_register_teacher(
        rcp, settings, steps.open_dataset(rcp, settings), _echo, **overrides
    )
    typer.echo(f"{name}/{version}")


@stage_app.command("label")
def stage_label(
    teacher: TeacherOpt,
    recipe: RecipeOpt = DEFAULT_RECIPE,
    home: HomeOpt = None,
    force: Annotated[bool, typer.Option(help="Relabel even if the key exists.")] = False,
) -> None:
    """Soft labels for every split (reused when the content key already exists)."""
    from distill_core import steps
    from distill_core.teachers import load_teacher

    settings, rcp = _env(home), _recipe(recipe)
    loaded = load_teacher(*_teacher_ref(teacher), settings.tracking_uri)
    labels = steps.label(rcp, settings, steps.open_dataset(rcp, settings), loaded, force=force)
    typer.echo(json.dumps({"key": labels.key, "reused": labels.reused, "rows": labels.manifest["rows"]}))


@stage_app.command("distill")
def stage_distill(teacher: TeacherOpt, recipe: RecipeOpt = DEFAULT_RECIPE, home: HomeOpt = None) -> None:
    """Distill every student of the recipe (with its hard-label twin) and write the comparison report."""
    from distill_core import steps

    reports, out = steps.run_pipeline(_recipe(recipe), _env(home), *_teacher_ref(teacher), log=_echo)
    typer.echo((out / "report.md").read_text())


def _not_yet(verb: str, issue: str) -> None:
    typer.echo(f"`distill {verb}` is not there yet: it arrives with {issue}.", err=True)
    raise typer.Exit(2)


@app.command()
def run(teacher: TeacherOpt = "", recipe: RecipeOpt = DEFAULT_RECIPE) -> None:
    """One pipeline run for one teacher version, with gates and promotion (not there yet)."""
    _not_yet("run", "the Prefect flows and promotion; use `distill stage distill` for now")


@app.command()
def watch(once: Annotated[bool, typer.Option("--once")] = False) -> None:
    """Poll the registry and start runs for unprocessed teacher versions (not there yet)."""
    _not_yet("watch", "the registry watcher")


@app.command()
def serve() -> None:
    """Scheduled watcher plus the MLflow webhook receiver (not there yet)."""
    _not_yet("serve", "the production topology")


@app.command()
def status(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Teachers, their ledger, student aliases and headline metrics (not there yet)."""
    _not_yet("status", "the registry ledger")


@app.command()
def promote(name: str, version: str) -> None:
    """Move `champion` to a student version by hand, recorded (not there yet)."""
    _not_yet("promote", "aliases and promotion")


@app.command()
def rollback(name: str) -> None:
    """Restore the `previous` champion, recorded (not there yet)."""
    _not_yet("rollback", "aliases and promotion")


@app.command()
def ui(home: HomeOpt = None, port: int = 5000) -> None:
    """The MLflow UI on the embedded store."""
    settings = _env(home)
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
    try:
        app()
    except DistillError as err:
        typer.echo(f"error: {err}", err=True)
        sys.exit(1)
