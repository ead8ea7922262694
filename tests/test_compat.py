"""What the previous release wrote keeps reading correctly: its flat ledger tags (distill.status on the teacher
version, one per teacher version), its alias history and its claims table, and the models it pickled.

tests/fixtures/release-2026-11-28 was made by that release's own code (commit bd90871): teacher `old-teacher`
v1 distilled into `old-student` (champion), v2 registered and left unhandled.
"""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from distill_core.evaluate import readable
from distill_core.registry import CHAMPION, Ledger, ledger_entry, unhandled_versions
from distill_core.settings import load_settings
from distill_core.status import collect, render

FIXTURE = Path(__file__).parent / "fixtures" / "release-2026-11-28"


@pytest.fixture
def previous_release(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    for name in ("mlflow.db", "ledger.db"):
        with gzip.open(FIXTURE / f"{name}.gz") as packed, open(tmp_path / name, "wb") as out:
            shutil.copyfileobj(packed, out)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("DISTILL_LEDGER_URI", f"sqlite:///{tmp_path / 'ledger.db'}")
    settings = load_settings(tmp_path / "home")
    return settings, MlflowClient(settings.tracking_uri), Ledger(settings.ledger_uri)


def test_the_previous_release_s_ledger_reads_as_its_student_model_s(previous_release) -> None:
    settings, client, ledger = previous_release
    entry = ledger_entry(client, client.get_model_version("old-teacher", "1"), "old-student")
    assert entry["status"] == "succeeded" and entry["student_version"] == "1"
    assert entry["student_alias"] == CHAMPION  # the release called it `alias`
    assert unhandled_versions(client, ledger, "old-teacher", "old-student") == ["2"]
    # another recipe's student model never ran on v1: the old entry is not its
    assert ledger_entry(client, client.get_model_version("old-teacher", "1"), "edge-student") == {}
    assert unhandled_versions(client, ledger, "old-teacher", "edge-student") == ["1", "2"]


def test_status_shows_the_previous_release_s_ledger_and_alias_history(previous_release) -> None:
    settings, _, _ = previous_release
    state = collect(settings, "old-teacher", "old-student")
    v1, v2 = state["teacher"]["versions"]
    assert (v1["status"], v1["student_version"], v1["student_alias"]) == ("succeeded", "1", CHAMPION)
    assert v2["status"] == "pending"
    assert state["student"]["aliases"] == {CHAMPION: "1"}
    assert [(m["alias"], m["version"], m["actor"]) for m in state["alias_history"]] == [(CHAMPION, "1", "pipeline")]
    # its measured tags (4 digits then, full precision now) read in the one vocabulary, rounded for a person
    tags = MlflowClient(settings.tracking_uri).get_model_version("old-student", "1").tags
    accuracy, retention = (
        readable("accuracy", tags["distill.accuracy"]),
        readable("retention", tags["distill.retention"]),
    )
    assert f"accuracy {accuracy} retention {retention} params " in render(state)


# Made by the code before the core was split into tasks/modules/model_io (commit b43117d): a student saved as its
# pyfunc (distill_core.serving.TextClassifierModel) and a WrappedTeacher pickled as distill_core.teachers'.
OLD_MODELS = Path(__file__).parent / "fixtures" / "models-before-tasks"


def test_models_the_previous_release_pickled_load_and_predict_as_they_did() -> None:
    import json

    import mlflow
    import pandas as pd
    import torch

    from distill_core.modules import read_module

    expected = json.loads((OLD_MODELS / "expected.json").read_text())
    texts = expected["texts"]
    teacher = read_module(OLD_MODELS / "teacher.pt")
    with torch.no_grad():
        assert teacher(**teacher.tokenize(texts)).tolist() == expected["teacher_logits"]
    served = mlflow.pyfunc.load_model(str(OLD_MODELS / "student-pyfunc"))
    assert served.predict(pd.DataFrame({"text": texts})).to_dict(orient="list") == expected["student"]
