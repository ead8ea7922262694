"""Serving: a student logged as a pyfunc model predicts on raw text, by alias, with its module's own probabilities;
the report figures build headless and log to MLflow."""

from __future__ import annotations

import uuid

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.figure import Figure
from mlflow.tracking import MlflowClient

from distill_core.model_io import ServingError, load_teacher, log_student
from distill_core.modules import TextModule
from distill_core.plots import reliability_diagram, size_vs_quality, training_curves
from distill_core.recipe import StudentConfig
from distill_core.students import EmbeddingBagStudent, build_student
from distill_core.tasks.classification import TextClassifierModel

LABELS = ("fresh", "rotten")
REVIEWS = {
    "a moving, funny film with a great cast": "fresh",
    "warm, clever and beautifully acted": "fresh",
    "dull and far too long": "rotten",
    "a tedious, lifeless mess": "rotten",
}


@pytest.fixture
def experiment(tracking_uri: str, tmp_path) -> str:
    """A fresh experiment whose artifacts live under this test's tmp_path; it is the active experiment."""
    mlflow.set_tracking_uri(tracking_uri)
    name = f"serving-{uuid.uuid4().hex[:8]}"
    experiment_id = MlflowClient(tracking_uri).create_experiment(name, artifact_location=tmp_path.as_uri())
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


def trained_bag_student() -> EmbeddingBagStudent:
    """A tiny hashed n-gram student fitted to four reviews: it should get them right."""
    torch.manual_seed(0)
    student = EmbeddingBagStudent(LABELS, buckets=4096, dim=8, ngrams=2)
    batch = student.tokenize(list(REVIEWS))
    targets = torch.tensor([LABELS.index(label) for label in REVIEWS.values()])
    optimizer = torch.optim.Adam(student.parameters(), lr=0.1)
    for _ in range(30):
        loss = torch.nn.functional.cross_entropy(student(**batch), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return student.eval()


def module_probabilities(module: TextModule, texts: list[str]) -> np.ndarray:
    with torch.inference_mode():
        return torch.softmax(module.eval()(**module.tokenize(texts)).double(), dim=-1).numpy()


def test_registered_student_serves_raw_text_by_alias(tracking_uri, experiment):
    student = trained_bag_student()
    texts = list(REVIEWS)
    with mlflow.start_run():
        info, version = log_student(
            student,
            registered_model_name="sentiment-student",
            input_texts=texts,
            tags={"distill.teacher": "sentiment-teacher/1"},
            description="hashed bigram student for the serving test",
        )
    assert version is not None
    client = MlflowClient(tracking_uri)
    client.set_registered_model_alias("sentiment-student", "champion", version)

    model = mlflow.pyfunc.load_model("models:/sentiment-student@champion")
    out = model.predict(pd.DataFrame({"text": texts}))

    assert list(out.columns) == ["label", "probability", "p_fresh", "p_rotten"]
    assert out["label"].tolist() == list(REVIEWS.values())
    expected = module_probabilities(student, texts)
    np.testing.assert_allclose(out[["p_fresh", "p_rotten"]].to_numpy(), expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(out["probability"].to_numpy(), expected.max(axis=1), rtol=1e-6)

    details = client.get_model_version("sentiment-student", version)
    assert details.description == "hashed bigram student for the serving test"
    assert details.tags["distill.teacher"] == "sentiment-teacher/1"
    assert details.tags["distill.role"] == "student"
    signature = mlflow.models.get_model_info(info.model_uri).signature
    assert signature.inputs.input_names() == ["text"]
    assert signature.outputs.input_names() == ["label", "probability", "p_fresh", "p_rotten"]

    # Other shapes of raw text: a Series named text and a dict through pyfunc; a plain list in the python model.
    by_series = model.predict(pd.Series(texts, name="text"))
    by_dict = model.predict({"text": texts})
    by_list = model.unwrap_python_model().predict(None, texts)
    assert isinstance(model.unwrap_python_model(), TextClassifierModel)
    for frame in (by_series, by_dict, by_list):
        pd.testing.assert_frame_equal(frame, out)


def test_transformer_student_round_trips_through_pyfunc(registered_teacher, small_dataset, tracking_uri, experiment):
    teacher = load_teacher(*registered_teacher, tracking_uri).module
    transfer = small_dataset.split("transfer")["text"].tolist()
    cfg = StudentConfig(name="t", family="transformer", teacher_layers=[5], embedding_dim=32)
    student = build_student(cfg, teacher, small_dataset.labels, transfer, 64, log=lambda _: None)
    texts = small_dataset.split("test")["text"].tolist()[:20]
    with mlflow.start_run():
        info, version = log_student(student, name="transformer-student", registered_model_name=None, input_texts=texts)
    assert version is None

    out = mlflow.pyfunc.load_model(info.model_uri).predict(pd.DataFrame({"text": texts}))

    columns = [f"p_{label}" for label in small_dataset.labels]
    # the pyfunc batches by length, so padding differs from one unbatched forward pass: equal to float32 rounding
    np.testing.assert_allclose(out[columns].to_numpy(), module_probabilities(student, texts), atol=1e-5)
    assert set(out["label"]) <= set(small_dataset.labels)


def test_log_student_needs_an_active_run(experiment):
    with pytest.raises(ServingError, match="inside `with mlflow.start_run"):
        log_student(trained_bag_student(), registered_model_name=None, input_texts=["fine"])


def test_report_figures_build_and_log(experiment):
    rng = np.random.default_rng(0)
    histories = {
        run: [{"step": s, "epoch": s / 10, "val_accuracy": 0.5 + s / 100 + shift, "loss": 1 / s} for s in (5, 10, 15)]
        for run, shift in (("minilm (distilled)", 0.05), ("minilm (hard-label)", 0.0))
    }
    labels = rng.integers(0, 2, 200)
    teacher_logits = rng.normal(size=(200, 2)) + 2 * np.eye(2)[labels]
    student_logits = rng.normal(size=(200, 2)) + np.eye(2)[labels]
    points = [
        {"name": "bag-64", "params": 8_400_000, "accuracy": 0.71, "passed": True, "chosen": True},
        {"name": "minilm-2", "params": 12_000_000, "accuracy": 0.78, "passed": True},
        {"name": "bag-8", "params": 1_000_000, "accuracy": 0.58, "passed": False},
        {"name": "bag-64 (hard-label)", "params": 8_400_000, "accuracy": 0.66, "twin": True},
        {"name": "sentiment-teacher v1", "params": 22_700_000, "accuracy": 0.80, "teacher": True},
    ]

    curves = training_curves(histories, title="minilm, distilled from sentiment-teacher v1")
    calibration = reliability_diagram(teacher_logits, student_logits, labels, "bag-64", teacher_name="teacher v1")
    calibration_only = reliability_diagram(teacher_logits, student_logits, labels, "bag-64", show_counts=False)
    sizes = size_vs_quality(points, title="size against accuracy: students of sentiment-teacher v1")

    assert all(isinstance(fig, Figure) for fig in (curves, calibration, calibration_only, sizes))
    # the validation metric of both runs on one axis; each run's own objective on an axis of its own
    assert [len(ax.lines) for ax in curves.axes] == [2, 1, 1]
    assert [ax.get_title() for ax in curves.axes[1:]] == [f"{run}: training loss" for run in histories]
    diagram, counts = calibration.axes
    assert len(diagram.lines) == 3 and len(counts.containers) == 2  # diagonal, teacher, student; two bar sets
    assert "ECE" in diagram.get_legend().get_texts()[1].get_text()
    assert diagram.get_title() == "reliability: teacher v1 vs bag-64"
    assert len(calibration_only.axes) == 1
    (ax,) = sizes.axes
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert {"passed gates", "failed gates", "hard-label twin", "chosen"} <= set(legend)
    assert sum(len(c.get_offsets()) for c in ax.collections) == 5  # 3 candidates, 1 twin, the chosen ring
    assert len(ax.lines) == 1 and len(ax.texts) == 4 and ax.get_xscale() == "log"  # the teacher is a line
    sizes.canvas.draw()  # every name inside the frame
    frame = ax.get_window_extent()
    for text in ax.texts:
        box = text.get_window_extent()
        assert frame.x0 <= box.x0 and box.x1 <= frame.x1, text.get_text()

    with mlflow.start_run() as run:
        for name, fig in (("curves", curves), ("reliability", calibration), ("size", sizes)):
            mlflow.log_figure(fig, f"plots/{name}.png")
    logged = {a.path for a in MlflowClient().list_artifacts(run.info.run_id, "plots")}
    assert logged == {"plots/curves.png", "plots/reliability.png", "plots/size.png"}
