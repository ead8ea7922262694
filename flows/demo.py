"""`distill demo`: the continuous story on the embedded default, end to end.

Teacher v1 is registered and its student promoted; a better teacher v2 arrives, the watcher picks it up,
re-distills, and promotes only if the new student passes the gates and beats the champion.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from mlflow.tracking import MlflowClient

from distill_core import steps
from distill_core.recipe import load_recipe
from distill_core.registry import teacher_versions
from distill_core.settings import Settings
from distill_core.status import collect
from flows.distill import watch_teachers

Echo = Callable[[str], None]


def _ensure_teacher(settings: Settings, recipe_path: Path, version: int, echo: Echo, log: Echo) -> None:
    """Register teacher version `version` unless it exists: v1 a quick head-only one, v2 the recipe's better one."""
    recipe = load_recipe(recipe_path)
    existing = teacher_versions(MlflowClient(settings.tracking_uri), recipe.teacher.registered_name)
    if len(existing) >= version:
        echo(f"teacher {recipe.teacher.registered_name} v{version} is already registered")
        return
    dataset = steps.open_dataset(recipe, settings)
    if version == 1:
        echo("training teacher v1: a head on frozen MiniLM features (quick, and weaker)")
        overrides: dict[str, object] = {"trainable_layers": 0, "epochs": 5, "lr": 1e-2, "batch_size": 64}
    else:
        layers = recipe.teacher.trainable_layers
        how = "end to end" if layers is None else f"top {layers} layers"
        echo(f"training teacher v{version}: MiniLM fine-tuned ({how})")
        overrides = {}
    name, registered = steps.train_and_register_teacher(recipe, settings, dataset, log, **overrides)
    echo(f"registered teacher {name} v{registered}: the watcher will pick it up")


def final_table(settings: Settings, teacher: str, student: str) -> str:
    """Teacher vs student, per teacher version, with where the aliases stand now."""
    state = collect(settings, teacher, student)
    students = {s["version"]: s for s in state["student"]["versions"]}
    rows = [
        "| teacher | ledger | teacher acc | student | candidate | student acc | of teacher | agreement | params | "
        "p50 ms | faster | gate | aliases now |",
        "|" + "---|" * 13,
    ]
    for t in state["teacher"]["versions"]:
        s = students.get(t.get("student_version", ""), {})
        rows.append(
            f"| v{t['version']} | {t['status']} | {s.get('teacher_accuracy', '-')} | "
            f"{'v' + s['version'] if s else '-'} | {s.get('candidate', '-')} | {s.get('accuracy', '-')} | "
            f"{_pct(s.get('retention'))} | {s.get('agreement', '-')} | {_int(s.get('params'))} | "
            f"{s.get('p50_ms', '-')} | {s.get('speedup', '-')}x | {s.get('gate', '-')} | "
            f"{', '.join(s.get('aliases', [])) or '-'} |"
        )
    return "\n".join(rows)


def _pct(value: str | None) -> str:
    return f"{float(value):.1%}" if value else "-"


def _int(value: str | None) -> str:
    return f"{int(value):,}" if value else "-"


def continuous_demo(recipe_path: Path, settings: Settings, echo: Echo, log: Echo) -> str:
    """Run the story and return the final table."""
    recipe = load_recipe(recipe_path)
    for version in (1, 2):
        _ensure_teacher(settings, recipe_path, version, echo, log)
        for result in watch_teachers(str(recipe_path), str(settings.home)):
            echo(
                f"  teacher v{result['teacher_version']}: {result['status']}"
                + (
                    f", student v{result['student_version']} -> {result['alias'] or 'no alias'}"
                    if result.get("student_version")
                    else ""
                )
                + "".join(f"\n    {note}" for note in result.get("notes", []))
            )
    return final_table(settings, recipe.teacher.registered_name, recipe.student_registered_name)
