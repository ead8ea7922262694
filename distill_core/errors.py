"""Errors that name the problem and the fix; the CLI prints them without a traceback."""


class DistillError(Exception):
    """Base class for every error the pipeline raises on purpose."""


class RecipeError(DistillError):
    """The recipe YAML is malformed or has a field out of range."""


class DatasetError(DistillError):
    """The dataset has empty texts, missing or unknown labels, or a digest mismatch."""


class TeacherError(DistillError):
    """The teacher returned NaN or wrongly-shaped logits, or could not be loaded."""


class StoreError(DistillError):
    """The artifact store is unreachable, refused access, or holds a corrupt entry."""


class SoftLabelError(DistillError):
    """Stored soft labels are missing, incomplete or fail their checksum."""
