"""The names users read: registry tags, MLflow metric keys, the kinds of a trained student. Defined here once;
code builds every such name from this module and reads it back through it."""

from __future__ import annotations

from enum import StrEnum

PREFIX = "distill."  # every tag the pipeline writes on a model version or run starts with it


def tag(field: str) -> str:
    """The registry tag of a field: distill.<field>."""
    return PREFIX + field


def fields_of(tags: dict[str, str]) -> dict[str, str]:
    """The pipeline's tags among `tags`, by field (the prefix removed)."""
    return {k.removeprefix(PREFIX): v for k, v in tags.items() if k.startswith(PREFIX)}


# Tags on every registered model version (teacher or student) and on runs.
ROLE = tag("role")  # TEACHER or STUDENT
TEACHER, STUDENT = "teacher", "student"
CONTENT_DIGEST = tag("content_digest")  # digest of the weights
LABELS = tag("labels")  # the class names, JSON, in order
DATASET_DIGEST = tag("dataset_digest")
TRAINABLE_LAYERS = tag("trainable_layers")  # the stand-in teacher's
ERROR = tag("error")  # a failed run's one-line reason
# Tags on a student version: how it was judged (its task adds its measured fields, Task.gate_tags).
IDEMPOTENCY_KEY = tag("idempotency_key")
CANDIDATE = tag("candidate")
GATE = tag("gate")  # "passed" or "failed"
GATE_REASONS = tag("gate_reasons")
GATE_PASSED, GATE_FAILED, ALL_GATES_PASSED = "passed", "failed", "all gates passed"
PROMOTION_REASON = tag("promotion_reason")  # why the version has the alias it got (or none), in words
CANDIDATE_RUN_ID = tag("candidate_run_id")  # the candidate's nested run, which logged the model
# Tags on the parent run of one teacher version: the decision.
OUTCOME = tag("outcome")  # the ledger status: succeeded, rejected
CHOSEN_CANDIDATE = tag("chosen_candidate")
STUDENT_VERSION = tag("student_version")
STUDENT_ALIAS = tag("student_alias")  # champion, challenger or none
PREFECT_FLOW_RUN_ID = tag("prefect_flow_run_id")
PREFECT_FLOW_RUN_URL = tag("prefect_flow_run_url")
# MLflow's own tags: a run's description, and the experiment kind its UI opens on (3.x: the runs view, not traces).
RUN_DESCRIPTION = "mlflow.note.content"
EXPERIMENT_KIND, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"


def gate_tags(reasons: list[str]) -> dict[str, str]:
    """distill.gate and distill.gate_reasons for a verdict's reasons (none: passed)."""
    return {GATE: GATE_FAILED if reasons else GATE_PASSED, GATE_REASONS: "; ".join(reasons) or ALL_GATES_PASSED}


class Kind(StrEnum):
    """How a student was trained: by distillation, or its hard-label twin (same init and steps, labels only)."""

    DISTILLED = "distilled"
    HARD_LABEL = "hard-label"


def display_name(student: str, kind: Kind) -> str:
    """A trained student's name in reports and tables: `bag (distilled)`."""
    return f"{student} ({kind})"


class Role(StrEnum):
    """What a stage before a candidate's final model is: a teacher assistant, or a born-again generation."""

    ASSISTANT = "assistant"
    GENERATION = "generation"


def generation_name(student: str, generation: int) -> str:
    """A born-again generation of a candidate before its last: `bag.gen1`."""
    return f"{student}.gen{generation}"


# MLflow metric keys of a candidate's nested run, and the parent run's timings.
def history_metric(kind: Kind, key: str) -> str:
    """A training-history value (val_accuracy, loss, a loss term) of one kind: `distilled.val_accuracy`."""
    return f"{kind}.{key}"


def report_metric(kind: Kind, field: str) -> str:
    """A test-split report field of one kind: `distilled.test_accuracy`."""
    return f"{kind}.test_{field}"


def member_metric(member: str, field: str) -> str:
    """A distilled student's test-split field against one member of an ensemble teacher: `distilled.test_agreement
    vs a v2`."""
    return f"{Kind.DISTILLED}.test_{field} vs {member}"


def seconds_metric(phase: str) -> str:
    """The seconds the core's own work took in a phase: `seconds.distill`."""
    return f"seconds.{phase}"
