"""Tasks: what a distillation is about, and everything in the core that depends on it.

A task says how a batch is built (inputs, targets, mask), which teacher signal it stores, how a model is measured
(its metrics and the early-stopping key), which Great Expectations suites guard its data, which gates and tags a
candidate is judged and registered by, and how a student is served. `Recipe.task` selects one; the rest of the
core asks the task and never branches on its name. A new task is one module here, registered in TASKS below,
and its recipe class (distill_core.recipe.RECIPES, under the same name).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from distill_core.errors import RecipeError
from distill_core.tasks.base import Task, TaskBatch
from distill_core.tasks.causal_lm import CAUSAL_LM
from distill_core.tasks.classification import CLASSIFICATION

if TYPE_CHECKING:
    from distill_core.recipe import BaseRecipe

TASKS: dict[str, Task] = {task.name: task for task in (CLASSIFICATION, CAUSAL_LM)}


def task_named(name: str) -> Task:
    """The registered task called `name`; an unknown one is refused with the names there are."""
    try:
        return TASKS[name]
    except KeyError:
        raise RecipeError(f"unknown task {name!r}; tasks: {', '.join(TASKS)}") from None


def task_of(recipe: BaseRecipe) -> Task:
    """The task a recipe distills."""
    return task_named(recipe.task)


__all__ = ["CAUSAL_LM", "CLASSIFICATION", "TASKS", "Task", "TaskBatch", "task_named", "task_of"]
