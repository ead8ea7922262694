"""When distillation degrades: the remedies that fit a diagnosis, and the recipe each one makes.

A run whose best candidate fails the gates says why (StudentOutcome.diagnosis). With `on_degradation.remedies`
it then tries, in the recipe's order, those that fit: each remedy is a variant of the recipe, distilled and
judged like the first attempt (flows.pipeline runs the ladder; each attempt is a nested MLflow run)."""

from __future__ import annotations

from typing import Any

from distill_core.errors import RecipeError
from distill_core.recipe import Recipe, StudentConfig, parse_recipe
from distill_core.steps import CAPACITY_GAP, DATA_GAP, DID_NOT_LEARN, StudentOutcome

# What can close each gap: a student that did not learn needs more training; one that cannot fit its transfer set,
# more capacity (or a teacher closer to its size); one that fits it and fails held-out data, more of it.
FITS: dict[str, tuple[str, ...]] = {
    DID_NOT_LEARN: ("longer",),
    CAPACITY_GAP: ("larger", "assistant", "longer"),
    DATA_GAP: ("augment", "longer"),
}
MAX_AUGMENT_COPIES = 10  # data.augment_copies' bound


def ladder(recipe: Recipe, diagnosis: str, tried: list[str]) -> list[str]:
    """The recipe's remedies that fit the diagnosis and have not been tried, in the recipe's order."""
    return [r for r in recipe.on_degradation.remedies if r in FITS[diagnosis] and r not in tried]


def _larger(cfg: StudentConfig, teacher_depth: int) -> StudentConfig | None:
    """The next larger student of the same family: full width, then full-rank embeddings, then one more layer
    (a bag: twice the dimensions)."""
    if cfg.family == "embedding_bag":
        return cfg.model_copy(update={"name": f"{cfg.name}-x2", "dim": cfg.dim * 2})
    if cfg.heads is not None or cfg.ffn is not None:
        return cfg.model_copy(update={"name": f"{cfg.name}-wide", "heads": None, "ffn": None})
    if cfg.embedding_dim is not None:
        return cfg.model_copy(
            update={"name": f"{cfg.name}-e{cfg.embedding_dim * 2}", "embedding_dim": cfg.embedding_dim * 2}
        )
    unused = [layer for layer in range(teacher_depth) if layer not in cfg.teacher_layers]
    if not unused:
        return None
    layers = sorted([*cfg.teacher_layers, unused[-1]])
    return cfg.model_copy(update={"name": f"{cfg.name}-L{len(layers)}", "teacher_layers": layers})


def variant(recipe: Recipe, remedy: str, outcome: StudentOutcome, teacher_depth: int) -> tuple[Recipe, str] | str:
    """The recipe with the remedy applied to the failing candidate (`outcome`), and what changed in words; or why
    the remedy cannot be applied to this recipe."""
    data: dict[str, Any] = recipe.model_dump(mode="json")
    cfg = outcome.config
    if remedy == "longer":
        train = data["train"]
        train["epochs"] = min(train["epochs"] * 2, 1000)
        if train.get("max_steps"):
            train["max_steps"] *= 2
        said = f"twice the training: {train['epochs']} epochs" + (
            f", {train['max_steps']} steps" if train.get("max_steps") else ""
        )
    elif remedy == "augment":
        copies = data["data"].get("augment_copies")
        if copies is None:
            return f"augment: task {recipe.task} has no teacher-labeled augmented copies to add"
        if data["data"].get("dvc") is not None:
            return "augment: the data is prepared by DVC (data.dvc): add augmented copies in its prepare stage"
        if copies >= MAX_AUGMENT_COPIES:
            return f"augment: the transfer set already has {copies} augmented copies, the most there can be"
        data["data"]["augment_copies"] = min(max(copies * 2, 1), MAX_AUGMENT_COPIES)
        said = f"more teacher-labeled augmented transfer data: {data['data']['augment_copies']} copies (was {copies})"
    elif remedy == "assistant":
        if recipe.stages.assistants:
            return "assistant: the recipe has teacher assistants already"
        depth = max(teacher_depth // 2, 1)
        assistant = {"name": "assistant", "family": "transformer", "teacher_layers": list(range(depth))}
        data["stages"]["assistants"] = [assistant]
        said = f"a teacher assistant of {depth} of the teacher's {teacher_depth} layers, taught first"
    elif remedy == "larger":
        larger = _larger(cfg, teacher_depth)
        if larger is None:
            return f"larger: {cfg.name} already has every layer of the teacher"
        data["students"], data["search"] = [larger.model_dump(mode="json")], None
        said = f"a larger student: {larger.name} instead of {cfg.name}"
    else:
        raise ValueError(f"unknown remedy {remedy!r}")
    if recipe.search is not None and remedy != "larger":  # the chosen architecture, not the search again
        data["students"], data["search"] = [cfg.model_dump(mode="json")], None
    try:
        changed = parse_recipe(data, source=f"recipe {recipe.name} with remedy {remedy}")
    except RecipeError as err:
        return f"{remedy}: {err}"
    changed._base_dir = recipe.base_dir
    return changed, said
