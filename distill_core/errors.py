"""Errors that name the problem and the fix; the CLI prints them without a traceback."""

import re


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


class DeviceError(DistillError):
    """The recipe asks for a device this machine does not have (device: cuda where torch sees no GPU)."""


_CREDENTIALS = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^/@:\s]*):(?P<secret>[^/@\s]*)@")


def redact(text: object) -> str:
    """The text with the password of every URI in it hidden (scheme://user:***@host): for anything printed,
    logged or tagged, since MLFLOW_TRACKING_URI and DISTILL_LEDGER_URI may carry credentials."""
    return _CREDENTIALS.sub(lambda m: f"{m['scheme']}{m['user']}:***@", str(text))
