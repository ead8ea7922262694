"""The `distill` command as a user runs it: help, clear errors, and the demo end to end on small data."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VERBS = ("demo", "run", "watch", "serve", "status", "promote", "rollback", "ui", "stage")


def distill(*args: str, home: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("DISTILL_STORE", None)
    env.pop("DISTILL_WEBHOOK_SECRET", None)
    if home is not None:
        env["DISTILL_HOME"] = str(home)
    return subprocess.run(
        [sys.executable, "-c", "from flows.cli import main; main()", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        cwd=ROOT,
    )


def test_help_lists_every_verb():
    out = distill("--help")
    assert out.returncode == 0
    for verb in VERBS:
        assert verb in out.stdout
    stages = distill("stage", "--help").stdout
    assert all(step in stages for step in ("prepare", "teacher", "label", "distill"))


def test_serve_refuses_to_run_without_a_shared_secret(tmp_path):
    out = distill("serve", home=tmp_path)
    assert out.returncode == 1 and "DISTILL_WEBHOOK_SECRET is not set" in out.stderr


def test_bad_recipe_is_one_clear_line(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("name: x\nstudents: [{name: s, family: lstm}]\n")
    out = distill("stage", "prepare", "--recipe", str(recipe), home=tmp_path)
    assert out.returncode == 1
    assert "students.0.family: Input should be 'transformer' or 'embedding_bag' (got 'lstm')" in out.stderr
    assert "Traceback" not in out.stderr


def test_bad_teacher_reference(tmp_path):
    out = distill("stage", "label", "--teacher", "no-version", home=tmp_path)
    assert out.returncode == 2 and "expected NAME/VERSION" in out.stderr


@pytest.fixture
def tiny_recipe(tmp_path: Path) -> Path:
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(
        "name: tiny\n"
        "data: {max_rows: 200, augment_copies: 1}\n"
        "teacher: {trainable_layers: 2, epochs: 3, batch_size: 16, lr: 1.0e-4}\n"
        "students:\n"
        "  - {name: small-tf, family: transformer, teacher_layers: [5], embedding_dim: 32, lr: 3.0e-4}\n"
        "  - {name: bag, family: embedding_bag, buckets: 4096, dim: 16, lr: 0.02}\n"
        "train: {epochs: 2, batch_size: 32, eval_every: 100}\n"
        "evaluation: {latency_samples: 10, throughput_batch: 8}\n"
        "gates: {min_retention: 0.5, max_param_ratio: 1.0, max_regression: 0.2}\n"
        "checks: {max_class_kl: 1.0}\n"  # a teacher fine-tuned on 140 reviews may lean to one class
    )
    return recipe


def test_demo_tells_the_continuous_story(tiny_recipe, tmp_path):
    home = tmp_path / "home"
    out = distill("demo", "--recipe", str(tiny_recipe), home=home)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "registered teacher sentiment-teacher v1" in out.stdout
    assert "registered teacher sentiment-teacher v2" in out.stdout
    table = [line for line in out.stdout.splitlines() if line.startswith("| v")]
    assert [row.split("|")[1].strip() for row in table] == ["v1", "v2"]

    status = distill("status", "--json", "--recipe", str(tiny_recipe), home=home)
    assert status.returncode == 0, status.stderr[-2000:]
    state = json.loads(status.stdout)
    teachers = {t["version"]: t for t in state["teacher"]["versions"]}
    assert set(teachers) == {"1", "2"}
    assert all(t["status"] in ("succeeded", "rejected") for t in teachers.values())
    champion = state["student"]["aliases"]["champion"]
    assert teachers["1"]["student_version"] == "1" and "champion" in {a["alias"] for a in state["alias_history"]}
    champion_row = next(s for s in state["student"]["versions"] if s["version"] == champion)
    assert champion_row["gate"] == "passed" and champion_row["teacher_name"] == "sentiment-teacher"

    again = distill("demo", "--recipe", str(tiny_recipe), home=home)  # nothing new: teachers exist, ledger done
    assert again.returncode == 0, again.stderr[-3000:]
    assert "teacher sentiment-teacher v2 is already registered" in again.stdout


def test_stage_distill_prints_the_comparison_table(tiny_recipe, tmp_path):
    home = tmp_path / "home"
    teacher = distill("stage", "teacher", "--recipe", str(tiny_recipe), "--trainable-layers", "0", home=home)
    assert teacher.returncode == 0, teacher.stderr[-3000:]
    ref = teacher.stdout.strip().splitlines()[-1]
    assert ref == "sentiment-teacher/1"
    out = distill("stage", "distill", "--teacher", ref, "--recipe", str(tiny_recipe), home=home)
    assert out.returncode == 0, out.stderr[-3000:]
    table = [line for line in out.stdout.splitlines() if line.startswith("|")]
    assert table[0].startswith("| model | acc | F1 | of teacher | agree |")
    names = [row.split("|")[1].strip() for row in table[2:]]
    assert names == [
        "teacher sentiment-teacher v1",
        "small-tf (distilled)",
        "small-tf (hard-label)",
        "bag (distilled)",
        "bag (hard-label)",
    ]
    report = json.loads((home / "runs" / "tiny-sentiment-teacher-v1" / "report.json").read_text())
    assert report["teacher"].startswith("sentiment-teacher/1@")
    assert (home / "runs" / "tiny-sentiment-teacher-v1" / "bag" / "distilled.pt").exists()
    again = distill("stage", "distill", "--teacher", ref, "--recipe", str(tiny_recipe), home=home)
    assert again.returncode == 0 and "(reused)" in again.stderr and "resumed from checkpoint" in again.stderr


def test_rollback_without_previous_is_one_clear_line(tmp_path):
    out = distill("rollback", "no-such-student", home=tmp_path)
    assert out.returncode == 1 and "error: model 'no-such-student' has no 'previous' version" in out.stderr
