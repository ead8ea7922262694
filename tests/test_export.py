"""Edge export: every student family to ONNX (fp32 and int8) with parity to its torch self, `distill export` as a
folder that runs without torch, and `mlflow models serve` answering over HTTP with what the gates measured."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
import uuid
from functools import partial
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from lm_models import tiny_lm
from mlflow.tracking import MlflowClient
from stack import NO_PROXY, free_port, wait_for

from distill_core import edge_runtime, lm
from distill_core.deploy import Deployment
from distill_core.export import ExportError, OnnxStudent, export
from distill_core.model_io import ServingError, export_registered, load_teacher, log_student
from distill_core.modules import WrappedTeacher
from distill_core.recipe import StudentConfig
from distill_core.registry import CHAMPION
from distill_core.students import EmbeddingBagStudent, build_student
from distill_core.tasks import CAUSAL_LM, CLASSIFICATION

ROOT = Path(__file__).resolve().parents[1]


def trained_bag(small_dataset, buckets: int = 4096) -> EmbeddingBagStudent:
    """A bag student fitted to the hard labels in a few steps (its predictions are not all one class)."""
    torch.manual_seed(0)
    bag = EmbeddingBagStudent(small_dataset.labels, buckets, 16, 2)
    train = small_dataset.split("train")
    optimizer = torch.optim.Adam(bag.parameters(), lr=0.05)
    for _ in range(30):
        loss = torch.nn.functional.cross_entropy(
            bag(**bag.tokenize(train["text"].tolist())), torch.as_tensor(train["label"].to_numpy())
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return bag.eval()


@pytest.fixture(scope="module")
def transformer_student(registered_teacher, small_dataset, tracking_uri):
    """One MiniLM layer with a pruned, factorised vocabulary: the id map must travel inside the graph."""
    teacher = load_teacher(*registered_teacher, tracking_uri).module
    cfg = StudentConfig(name="t", family="transformer", teacher_layers=[0], embedding_dim=32, prune_vocab=True)
    transfer = small_dataset.split("transfer")["text"].tolist()
    return build_student(cfg, teacher, small_dataset.labels, transfer, 64, log=lambda _: None).eval()


@pytest.mark.parametrize("family", ["embedding_bag", "transformer"])
def test_a_classifier_exports_with_parity_and_an_int8_variant_under_a_third_the_size(
    family, small_dataset, transformer_student, tmp_path
):
    student = trained_bag(small_dataset) if family == "embedding_bag" else transformer_student
    texts = small_dataset.split("test")["text"].tolist()
    folder = export(student, tmp_path / "export", texts[:3])

    agreement, diff = CLASSIFICATION.parity(student, OnnxStudent(folder, "onnx"), texts)
    assert agreement == 1.0 and diff < 1e-4, (agreement, diff)  # fp32: the same function, to float rounding
    fp32, int8 = ((folder / edge_runtime.FILES[f]).stat().st_size for f in ("onnx", "onnx-int8"))
    assert int8 * 3 < fp32  # embeddings (Gather) and dense weights stored as int8
    int8_agreement, _ = CLASSIFICATION.parity(student, OnnxStudent(folder, "onnx-int8"), texts)
    assert int8_agreement >= 0.8  # measured, not assumed: near-ties of a barely trained student may flip
    config = json.loads((folder / edge_runtime.CONFIG).read_text())
    assert config["labels"] == list(small_dataset.labels) and config["task"] == "classification"
    assert not (tmp_path / "export.partial").exists()
    assert export(student, folder, texts[:3]) == folder and json.loads((folder / "config.json").read_text()) == config


def test_a_causal_lm_exports_with_parity_and_generates_the_same_greedy_text(tmp_path):
    teacher = tiny_lm(layers=4, hidden=64)
    student = lm.build_student(teacher, [0, 3], embedding_dim=16).eval()
    folder = export(student, tmp_path / "lm", ["def fibonacci(n):"])
    exported = OnnxStudent(folder, "onnx")
    blocks = np.random.default_rng(0).integers(0, student.vocab_size, (6, 33))
    agreement, diff = CAUSAL_LM.parity(student, exported, list(blocks))
    assert agreement >= 0.999 and diff < 1e-3, (agreement, diff)
    prompts = ["def fibonacci(n):", "The with statement"]
    assert exported.generate(prompts, 8) == [student.generate([p], 8)[0] for p in prompts]


def test_a_teacher_of_another_kind_has_no_graph_and_says_what_exports(tmp_path):
    wrapped = WrappedTeacher(torch.nn.Linear(4, 2), lambda texts: {"x": torch.zeros(len(texts), 4)}, ["a", "b"])
    with pytest.raises(ExportError, match="WrappedTeacher has no ONNX graph here.*deploy.export: false"):
        export(wrapped, tmp_path / "x", ["a"])
    assert not (tmp_path / "x").exists()


def _experiment(tracking_uri: str, tmp_path: Path) -> None:
    mlflow.set_tracking_uri(tracking_uri)
    name = f"export-{uuid.uuid4().hex[:6]}"
    mlflow.set_experiment(experiment_id=MlflowClient().create_experiment(name, artifact_location=tmp_path.as_uri()))


def _register(name: str, student, texts, folder: Path | None, fmt: str = "onnx-int8", task=CLASSIFICATION) -> str:
    deployment = None if folder is None else Deployment("s", fmt, 1, folder=folder)
    with mlflow.start_run():
        _, version = log_student(
            student, registered_model_name=name, input_texts=texts, task=task, deployment=deployment
        )
    MlflowClient().set_registered_model_alias(name, CHAMPION, str(version))
    return str(version)


def _no_torch(tmp_path: Path) -> dict[str, str]:
    """An environment in which importing torch or transformers fails: the folder must not need them."""
    blocker = tmp_path / "blocker"
    for package in ("torch", "transformers"):
        (blocker / package).mkdir(parents=True, exist_ok=True)
        (blocker / package / "__init__.py").write_text(f"raise ImportError('{package} was imported')\n")
    return {**os.environ, "PYTHONPATH": str(blocker)}


def test_distill_export_writes_a_folder_that_runs_in_a_fresh_process_without_torch(
    small_dataset, tracking_uri, tmp_path
):
    """As after `make demo`: the student is in DISTILL_HOME's registry, named by --home, no MLFLOW_TRACKING_URI."""
    home = tmp_path / "home"
    home_uri = f"sqlite:///{home / 'mlflow.db'}"  # DISTILL_HOME's registry (distill_core.settings)
    home.mkdir()
    _experiment(home_uri, tmp_path)
    name = f"edge-{uuid.uuid4().hex[:6]}"
    bag, texts = trained_bag(small_dataset), small_dataset.split("test")["text"].tolist()[:4]
    try:
        _register(name, bag, texts, None)  # v1: as an earlier release logged it, without an export
        _register(name, bag, texts, export(bag, tmp_path / "export", texts))  # v2: with its export (champion)
    finally:
        mlflow.set_tracking_uri(tracking_uri)  # the session's, for the tests after this one
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "DISTILL_HOME")}

    for ref, out in ((f"{name}@champion", tmp_path / "v2"), (f"{name}/1", tmp_path / "v1")):
        done = subprocess.run(
            [sys.executable, "-c", "from flows.cli import main; main()", "export", ref, "--format", "onnx-int8",
             "--out", str(out), "--home", str(home)], capture_output=True, text=True, env=env, cwd=tmp_path,
            timeout=300,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        assert not (tmp_path / "mlflow.db").exists()  # the model was read from --home's registry, not a default one
        assert sorted(p.name for p in out.iterdir()) == ["config.json", "example.py", "model.int8.onnx", "runtime.py"]
        assert len((out / "example.py").read_text().splitlines()) <= 20
        ran = subprocess.run(
            [sys.executable, str(out / "example.py"), *texts], capture_output=True, text=True, env=_no_torch(tmp_path)
        )
        assert ran.returncode == 0, ran.stderr[-2000:]
        said = [line.split(" (")[0] for line in ran.stdout.splitlines()]
        expected = [small_dataset.labels[i] for i in bag(**bag.tokenize(texts)).argmax(1).tolist()]
        assert said == expected  # int8 agrees with the torch student on these

    with pytest.raises(ServingError, match="is not empty"):  # nothing of the earlier export is overwritten
        export_registered(home_uri, f"{name}@champion", "onnx", tmp_path / "v2")
    with pytest.raises(ServingError, match="the exported formats are onnx, onnx-int8"):
        export_registered(home_uri, f"{name}@champion", "tflite", tmp_path / "v3")
    mlflow.set_tracking_uri(tracking_uri)


def _pings(port: int, proc: subprocess.Popen, log: Path) -> bool:
    if proc.poll() is not None:
        raise AssertionError(f"mlflow models serve exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
    try:
        with NO_PROXY.open(f"http://127.0.0.1:{port}/ping", timeout=2) as answer:
            return answer.status == 200
    except OSError:
        return False


def _invoke(port: int, body: dict) -> dict:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/invocations", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with NO_PROXY.open(request, timeout=60) as answer:
        return json.loads(answer.read())


def test_mlflow_models_serve_answers_with_the_exported_classifier_and_lm(small_dataset, tracking_uri, tmp_path):
    """The real `mlflow models serve` on loopback, in this environment (--env-manager local: the default builds a
    virtualenv from the registry, which cannot work offline), for a classifier and an LM student."""
    _experiment(tracking_uri, tmp_path)
    suffix = uuid.uuid4().hex[:6]
    bag, texts = trained_bag(small_dataset), small_dataset.split("test")["text"].tolist()[:3]
    _register(f"served-bag-{suffix}", bag, texts, export(bag, tmp_path / "bag", texts))
    student = lm.build_student(tiny_lm(layers=4, hidden=64), [0, 3], embedding_dim=16).eval()
    prompts = ["def fibonacci(n):"]
    folder = export(student, tmp_path / "lm", prompts)
    _register(f"served-lm-{suffix}", student, [np.zeros(8, dtype=np.int64)], folder, "onnx", CAUSAL_LM)

    # MLflow execs `uvicorn` by name: the environment's bin folder must be on PATH, as in an activated venv
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    servers, env = {}, {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "PATH": path}
    for kind in ("bag", "lm"):
        port = free_port()
        command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/served-{kind}-{suffix}@champion",
                   "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]  # fmt: skip
        log = open(tmp_path / f"{kind}.log", "wb")  # noqa: SIM115 - closed with the server
        servers[kind] = (port, subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT), log)
    try:
        for kind, (port, proc, _) in servers.items():
            log = tmp_path / f"{kind}.log"
            wait_for(partial(_pings, port, proc, log), 180, f"mlflow models serve ({kind})")
        answer = _invoke(servers["bag"][0], {"dataframe_split": {"columns": ["text"], "data": [[t] for t in texts]}})
        labels = [row["label"] for row in answer["predictions"]]
        assert labels == [small_dataset.labels[i] for i in bag(**bag.tokenize(texts)).argmax(1).tolist()]
        generated = _invoke(servers["lm"][0], {"dataframe_records": [{"prompt": prompts[0]}],
                                               "params": {"max_new_tokens": 6}})["predictions"]  # fmt: skip
        assert [row["text"] for row in generated] == student.generate(prompts, 6)
    finally:
        for _, proc, log in servers.values():
            proc.terminate()
            proc.wait(timeout=30)
            log.close()
