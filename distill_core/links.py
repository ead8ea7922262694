"""The MLflow UI pages a person opens, as URLs: one home for the UI's routes (MLflow 3.x, hash routing).

`ui_base` is the UI behind a tracking URI when it is a server (http or https, credentials left out); an embedded
store (SQLite) has none until `distill ui` serves one.
"""

from __future__ import annotations

import urllib.parse


def ui_base(tracking_uri: str) -> str | None:
    """The MLflow UI of a tracking server, without the credentials a URI may carry; None for a local store."""
    parts = urllib.parse.urlsplit(tracking_uri)
    if parts.scheme not in ("http", "https"):
        return None
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))


# MLflow 3.17 opens every experiment on its GenAI pages unless the URL (or the browser's last choice) says
# otherwise; the experiment's mlflow.experimentKind tag is read only when that switcher is off.
MODEL_TRAINING_VIEW = "?workflowType=machine_learning"


def experiment(base: str, experiment_id: str) -> str:
    """An experiment's runs."""
    return f"{base}/#/experiments/{experiment_id}{MODEL_TRAINING_VIEW}"


def run(base: str, experiment_id: str, run_id: str, artifact: str | None = None) -> str:
    """A run's page, or one of its artifacts shown in the UI."""
    page = f"{base}/#/experiments/{experiment_id}/runs/{run_id}"
    return f"{page}/artifacts/{artifact}{MODEL_TRAINING_VIEW}" if artifact else page + MODEL_TRAINING_VIEW


def model(base: str, name: str) -> str:
    """A registered model: its versions and aliases."""
    return f"{base}/#/models/{urllib.parse.quote(name)}"


def model_version(base: str, name: str, version: str) -> str:
    return f"{model(base, name)}/versions/{version}"
