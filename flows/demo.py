"""`distill demo`: the continuous story on the embedded default, end to end.

Teacher v1 is registered and its student promoted; a better teacher v2 arrives, the watcher picks it up,
re-distills, and promotes only if the new student passes the gates and beats the champion.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from mlflow.tracking import MlflowClient

from distill_core import steps
from distill_core.evaluate import readable
from distill_core.recipe import load_recipe
from distill_core.registry import teacher_versions
from distill_core.settings import Settings
from distill_core.status import collect
from distill_core.tasks import Task, task_of
from flows.distill import watch_teachers

Echo = Callable[[str], None]


def _ensure_teacher(settings: Settings, recipe_path: Path, version: int, echo: Echo, log: Echo) -> None:
    """Register teacher version `version` unless it exists: v1 the task's weaker stand-in, v2 the recipe's better
    one."""
    recipe = load_recipe(recipe_path)
    existing = teacher_versions(MlflowClient(settings.tracking_uri), recipe.teacher.registered_name)
    if len(existing) >= version:
        echo(f"teacher {recipe.teacher.registered_name} v{version} is already registered")
        return
    dataset = steps.open_dataset(recipe, settings)
    what, overrides = task_of(recipe).stand_in_versions(version)
    echo(f"making {what}")
    name, registered = steps.train_and_register_teacher(recipe, settings, dataset, log, **overrides)
    echo(f"registered teacher {name} v{registered}: the watcher will pick it up")


def final_table(settings: Settings, teacher: str, student: str, task: Task) -> str:
    """Teacher vs student, per teacher version: the measured fields the student version carries (the task's
    gate tags), the gate, and where the aliases stand now."""
    state = collect(settings, teacher, student)
    students = {s["version"]: s for s in state["student"]["versions"]}
    fields = task.gate_tags
    rows = [
        "| teacher | ledger | student | candidate | " + " | ".join(fields) + " | gate | aliases now |",
        "|" + "---|" * (len(fields) + 6),
    ]
    for t in state["teacher"]["versions"]:
        s = students.get(t.get("student_version", ""), {})
        values = " | ".join(readable(f, s[f]) if f in s else "-" for f in fields)
        rows.append(
            f"| v{t['version']} | {t['status']} | {'v' + s['version'] if s else '-'} | {s.get('candidate', '-')} | "
            f"{values} | {s.get('gate', '-')} | {', '.join(s.get('aliases', [])) or '-'} |"
        )
    return "\n".join(rows)


def continuous_demo(recipe_path: Path, settings: Settings, echo: Echo, log: Echo) -> str:
    """Run the story and return the final table."""
    recipe = load_recipe(recipe_path)
    for version in (1, 2):
        _ensure_teacher(settings, recipe_path, version, echo, log)
        for result in watch_teachers(str(recipe_path), str(settings.home)):
            echo(
                f"  teacher v{result['teacher_version']}: {result['status']}"
                + (
                    f", student v{result['student_version']} -> {result['alias'] or 'no alias'}: "
                    + result.get("reason", "")
                    if result.get("student_version")
                    else ""
                )
                + "".join(f"\n    {note}" for note in result.get("notes", []))
            )
    return final_table(settings, recipe.teacher.registered_name, recipe.student_registered_name, task_of(recipe))
