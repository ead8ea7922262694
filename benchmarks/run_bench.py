"""`make bench`: the pipeline's overheads against bare torch loops, whether the demo's better teacher gives a
better student, distillation quality on real data, how fast a teacher registration starts its flow run in the
production topology, and causal-LM distillation of the packaged SmolLM2 (stored-signal size, labeling and training
overheads, a quality table, peak memory); and the distillation modes of both tasks (assistant, born-again, warm
start, ensemble) against the plain student.

Everything in one process and one run, medians of interleaved repetitions. Results go to
benchmarks/results.json and benchmarks/results.md (the README quotes the latter). Time budgets, on 2 CPU cores:
overheads 5 min, demo 20 min, pipeline 5 min, quality 30 min, search 60 min (its teacher about 10 of them), modes
60 min (the classifier's: its two teachers about 20 of them, on the first run only), trigger 10 min, lm 45 min
(lm-overheads, its first part: 6 min), lm-modes 35 min (the LM's modes: its two teachers about 7 of them, on the
first run only), export 30 min (the demo's classifier students and the LM demo's student, trained for it, as torch
fp32, ONNX fp32 and ONNX int8), scale 20 min (labeling on Dask against one process and plain processes, then DDP
training; scale-ddp: the training part alone, 3 min).

    python benchmarks/run_bench.py [--only overheads|demo|pipeline|quality|search|modes|trigger|lm|lm-overheads
                                           |lm-modes|export|scale|scale-ddp ...] [--recipe recipes/bench.yaml]
    (modes and lm-modes also run by part: modes-stages, modes-warm, modes-ensemble, lm-modes-stages, ...)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from distill_core.data import prepare_dataset  # noqa: E402
from distill_core.modules import LoadedTeacher, TextClassifier, content_digest, length_batches, load_minilm  # noqa: E402
from distill_core.recipe import DataConfig, LossTerm, SoftLabelConfig, StudentConfig, TrainConfig  # noqa: E402
from distill_core.signals import StoredSource  # noqa: E402
from distill_core.students import build_student  # noqa: E402
from distill_core.tasks.classification import teacher_logits  # noqa: E402
from distill_core.train import Distiller, objective_for  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
REPEATS = 7
STEPS = 10  # training steps per timed repetition


def cold_home(name: str):  # noqa: ANN201 - (Path, Settings)
    """An empty DISTILL_HOME for a section under benchmarks/.work, on the embedded default (a registry or store the
    environment names would receive the section's runs)."""
    from distill_core.settings import load_settings

    home = HERE / ".work" / name
    shutil.rmtree(home, ignore_errors=True)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.environ.pop("DISTILL_STORE", None)
    return home, load_settings(home)


def interleaved(a, b, repeats: int = REPEATS) -> tuple[list[float], list[float]]:
    """Time two callables alternately (a, b, a, b, ...) after one warm-up each; seconds per call."""
    a(), b()
    ta, tb = [], []
    for _ in range(repeats):
        for fn, out in ((a, ta), (b, tb)):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return ta, tb


def bench_soft_labels(teacher: TextClassifier, texts: list[str]) -> dict[str, float]:
    """Our labeling path vs a bare inference loop over the same teacher and the same batches."""
    cfg = SoftLabelConfig(batch_size=64, max_length=64)
    loaded = LoadedTeacher(teacher, "bench-teacher", "1", content_digest(teacher))
    batches = length_batches(texts, cfg.batch_size)

    def ours() -> None:
        teacher_logits(loaded, texts, cfg)

    @torch.inference_mode()
    def bare() -> None:
        out = torch.empty(len(texts), 2)
        for batch in batches:
            enc = teacher.tokenizer(
                [texts[i] for i in batch], padding=True, truncation=True, max_length=64, return_tensors="pt"
            )
            out[batch] = teacher(enc["input_ids"], enc["attention_mask"])

    t_ours, t_bare = interleaved(ours, bare)
    ours_tp, bare_tp = len(texts) / statistics.median(t_ours), len(texts) / statistics.median(t_bare)
    return {"rows": len(texts), "ours_rows_per_s": ours_tp, "bare_rows_per_s": bare_tp, "ratio": ours_tp / bare_tp}


def bench_train_step(teacher: TextClassifier, texts: list[str], student_cfg: StudentConfig) -> dict[str, float]:
    """One Distiller.step vs a bare KD step (tokenise, forward, T²-scaled KL + CE, backward, AdamW) on the same
    batch, both reading the teacher's logits from memory."""
    cfg = TrainConfig(
        losses=[LossTerm(function="forward_kl", weight=0.5, temperature=2.0), LossTerm(function="ce", weight=0.5)],
        batch_size=32,
    )
    torch.manual_seed(0)
    batch_texts = texts[:32]
    labels = torch.randint(0, 2, (32,))
    t_logits = torch.randn(32, 2)
    ours_student = build_student(student_cfg, teacher, ("a", "b"), texts, 64, log=lambda _: None)
    bare_student = build_student(student_cfg, teacher, ("a", "b"), texts, 64, log=lambda _: None)
    lr = student_cfg.learning_rate(cfg)
    objective = objective_for(ours_student, cfg, None)
    distiller = Distiller(ours_student, objective, StoredSource(t_logits), lr, cfg.weight_decay)
    index = list(range(32))
    optimizer = torch.optim.AdamW(bare_student.parameters(), lr=lr, weight_decay=cfg.weight_decay)

    def ours() -> None:
        for _ in range(STEPS):
            distiller.step(index, batch_texts, labels)

    def bare() -> None:
        bare_student.train()
        for _ in range(STEPS):
            logits = bare_student(**bare_student.tokenize(batch_texts))
            kl = (
                F.kl_div(
                    F.log_softmax(logits / 2, -1),
                    F.log_softmax(t_logits / 2, -1),
                    log_target=True,
                    reduction="batchmean",
                )
                * 4
            )
            loss = 0.5 * kl + 0.5 * F.cross_entropy(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    t_ours, t_bare = interleaved(ours, bare)
    ours_ms, bare_ms = statistics.median(t_ours) * 1000 / STEPS, statistics.median(t_bare) * 1000 / STEPS
    return {"ours_ms_per_step": ours_ms, "bare_ms_per_step": bare_ms, "ratio": ours_ms / bare_ms}


def overheads() -> dict[str, object]:
    torch.manual_seed(0)
    work = HERE / ".work"
    data = prepare_dataset(DataConfig(max_rows=3000, augment_copies=0), work / "overhead-data")
    texts = data.split("train")["text"].tolist()[:1024]
    encoder, tokenizer = load_minilm()
    teacher = TextClassifier(encoder, tokenizer, data.labels).eval()
    results: dict[str, object] = {"soft_labels": bench_soft_labels(teacher, texts)}
    from distill_core.recipe import load_recipe

    for cfg in load_recipe(ROOT / "recipes" / "bench.yaml").students:  # the students the quality table measures
        results[f"train_step/{cfg.name}"] = bench_train_step(teacher, texts, cfg)
    return results


def quality(recipe_path: Path, reuse_teacher: bool = False) -> dict[str, object]:
    """The whole pipeline on the full data set: teacher, distilled and hard-label students."""
    from mlflow.tracking import MlflowClient

    from distill_core import steps
    from distill_core.recipe import load_recipe
    from distill_core.settings import load_settings

    recipe = load_recipe(recipe_path)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.environ.pop("DISTILL_STORE", None)
    home = HERE / ".work" / "quality"
    if not reuse_teacher:
        shutil.rmtree(home, ignore_errors=True)  # a cold run: new teacher, new labels, new students
    settings = load_settings(home)
    started = time.perf_counter()
    dataset = steps.prepare(recipe, settings)
    name = recipe.teacher.registered_name
    existing = MlflowClient(settings.tracking_uri).search_model_versions(f"name='{name}'")
    if reuse_teacher and existing:
        version = str(max(int(v.version) for v in existing))
        print(f"reusing teacher {name} v{version} trained by an earlier bench run")
    else:
        name, version = steps.train_and_register_teacher(recipe, settings, dataset, log=print)
    teacher_seconds = time.perf_counter() - started
    reports, out = steps.distill_and_evaluate(recipe, settings, name, version, log=print)
    report = json.loads((out / "report.json").read_text())
    training = json.loads((out / "training.json").read_text())
    return {
        "recipe": str(recipe_path.relative_to(ROOT)),
        "dataset": dataset.counts,
        "teacher_seconds": teacher_seconds,
        "total_seconds": time.perf_counter() - started,
        "reports": report["reports"],
        "training": {
            k: {kk: v[kk] for kk in ("steps", "best_step", "stopped_early", "seconds")} for k, v in training.items()
        },
        "table": (out / "report.md").read_text(),
        "teacher_reused": reuse_teacher,
    }


def search(recipe_path: Path = ROOT / "recipes" / "bench-search.yaml") -> dict[str, object]:
    """The constraint-driven search on the benchmark: the teacher of recipes/bench.yaml, a space of students, the
    goal as gates (max_p95_ms: the teacher's batch-1 p95 measured here, / 4), then the chosen student and its
    hard-label twin on the test split; the frontier, what the search cost, and how close it got to the stretch goal
    (98% at <= 15% of the parameters and >= 8x)."""
    from distill_core import steps
    from distill_core.model_io import load_teacher
    from distill_core.recipe import load_recipe
    from distill_core.search import SearchResult
    from distill_core.tasks.classification import CLASSIFICATION

    recipe = load_recipe(recipe_path)
    for variable in ("MLFLOW_TRACKING_URI", "DISTILL_STORE", "DISTILL_LEDGER_URI", "DISTILL_SEARCH_URI"):
        os.environ.pop(variable, None)
    home, settings = cold_home("search")  # a cold search: new teacher, labels, measurements and study
    started = time.perf_counter()
    dataset = steps.prepare(recipe, settings)
    name, version = steps.train_and_register_teacher(recipe, settings, dataset, log=print)
    teacher_seconds = time.perf_counter() - started
    teacher = load_teacher(name, version, settings.tracking_uri)
    texts, _ = CLASSIFICATION.examples(dataset, "test")
    speed = CLASSIFICATION.measure_speed({"teacher": teacher.module}, texts, recipe.evaluation)["teacher"]
    gates = recipe.gates.model_copy(update={"max_p95_ms": round(speed.p95_ms / 4, 3)})
    recipe = recipe.model_copy(update={"gates": gates})
    print(f"teacher p95 {speed.p95_ms:.2f} ms: max_p95_ms {gates.max_p95_ms}")
    reports, out = steps.distill_and_evaluate(recipe, settings, name, version, log=print)
    searched = SearchResult.load(out)
    assert searched is not None and searched.teacher_score is not None
    for row in searched.rows:
        if row.get("score") is not None:
            row["val_retention"] = row["score"] / searched.teacher_score
    by_name = {r.name: r for r in reports}
    teacher_report = reports[0]
    chosen = by_name[f"{searched.chosen} (distilled)"]
    twin = by_name[f"{searched.chosen} (hard-label)"]
    stretch = [
        r for r in searched.rows
        if r.get("score") is not None and r["params"] / teacher_report.params <= 0.15
        and speed.p50_ms / r["p50_ms"] >= 8
    ]  # fmt: skip
    return {
        "recipe": str(recipe_path.relative_to(ROOT)),
        "dataset": dataset.counts,
        "teacher_seconds": teacher_seconds,
        "total_seconds": time.perf_counter() - started,
        "teacher": {
            "accuracy": teacher_report.accuracy,
            "params": teacher_report.params,
            "p50_ms": speed.p50_ms,
            "p95_ms": speed.p95_ms,
        },  # fmt: skip
        "max_p95_ms": gates.max_p95_ms,
        "teacher_val_accuracy": searched.teacher_score,
        "summary": searched.summary(),
        "rows": searched.rows,
        "chosen": chosen.as_dict(),
        "twin": twin.as_dict(),
        "goal": {
            "retention": chosen.retention >= 0.97,
            "param_ratio": chosen.params / teacher_report.params <= 0.25,
            "speedup": chosen.speedup >= 4,
            "above_twin": chosen.accuracy > twin.accuracy,
        },
        "stretch_candidates": [r["name"] for r in stretch],
        "table": (out / "report.md").read_text(),
    }


MODES_STEPS = 1000  # the step budget of every classifier student and stage in the modes section
MODES_PARTS = ("stages", "warm", "ensemble")
MODES_RUNS = ("born-again", "assistant", "ensemble")  # the runs the stages and ensemble parts make
CLASSIFIER_COLUMNS = (("acc", "accuracy", "{:.3f}"), ("of teacher", "retention", "{:.1%}"))
WARM_STEPS = 0.25  # the warm start's share of the cold step budget (0.3 measured 36% of the cold training time)


@dataclass(frozen=True)
class ModesTask:
    """What the modes section measures for one task: its recipe (tuned for the section), the teacher versions it
    registers, the assistant and the born-again generations it tries, and the table's columns."""

    title: str
    recipe: Path
    home: str  # under benchmarks/.work
    tune: Callable[[Any], Any]  # the section's changes to the recipe
    versions: dict[int, dict[str, object]]  # teacher version -> overrides of the recipe's teacher section
    new_version: str  # what teacher v2 is, in words
    assistant: StudentConfig
    generations: int
    columns: tuple[tuple[str, str, str], ...]  # (header, report field, format), the quality column first
    remembered: Callable[[Any, Any, Any], float]  # (model, dataset, teacher v1's test signal) -> top-1 agreement


def _classifier_remembered(model, dataset, signal) -> float:  # noqa: ANN001
    from distill_core import evaluate
    from distill_core.tasks.classification import CLASSIFICATION

    texts, _ = CLASSIFICATION.examples(dataset, "test")
    return evaluate.agreement(evaluate.predict(model, list(texts)), signal)


def _lm_remembered(model, dataset, signal) -> float:  # noqa: ANN001
    from distill_core.tasks.causal_lm import CAUSAL_LM, next_token_stats

    return next_token_stats(model, CAUSAL_LM.examples(dataset, "test")[1], signal)["agreement"]


def _classifier_tune(base):  # noqa: ANN001, ANN202 - one augmented copy, MODES_STEPS steps, no hard-label twins
    train = base.train.model_copy(update={"max_steps": MODES_STEPS, "eval_every": 250, "checkpoint_every": 500})
    evaluation = base.evaluation.model_copy(update={"hard_label_baseline": False, "latency_samples": 100})
    data = base.data.model_copy(update={"augment_copies": 1})
    return base.model_copy(update={"train": train, "evaluation": evaluation, "data": data})


def modes_tasks(recipe_path: Path) -> dict[str, ModesTask]:
    from distill_core.tasks.causal_lm import CAUSAL_LM

    return {
        "modes": ModesTask(
            title=f"Distillation modes on Rotten Tomatoes (every student and stage {MODES_STEPS} steps",
            recipe=recipe_path,
            home="modes",
            tune=_classifier_tune,
            versions={1: {"seed": 0}, 2: {"seed": 1}},  # v2: the bench teacher retrained with another seed
            new_version="the bench teacher retrained with another seed",
            assistant=StudentConfig(name="ta-3L", family="transformer", teacher_layers=[0, 2, 4], lr=1e-4),
            generations=3,
            columns=CLASSIFIER_COLUMNS,
            remembered=_classifier_remembered,
        ),
        "lm-modes": ModesTask(
            title="Distillation modes for the causal LM (SmolLM2-135M-Instruct, recipes/lm-demo.yaml: every "
            "student and stage its 2 epochs",
            recipe=ROOT / "recipes" / "lm-demo.yaml",
            home="lm-modes",
            tune=lambda base: base,
            versions={v: CAUSAL_LM.stand_in_versions(v)[1] for v in (1, 2)},  # as packaged; fine-tuned
            new_version="SmolLM2 fine-tuned on the train split's blocks",
            assistant=StudentConfig(name="ta-4L", family="transformer", teacher_layers=[0, 10, 20, 29]),
            generations=2,
            columns=(("ppl", "perplexity", "{:.1f}"), ("ppl / teacher", "perplexity_ratio", "{:.2f}")),
            remembered=_lm_remembered,
        ),
    }


def _modes_setup(spec: ModesTask):  # noqa: ANN202 - (recipe, settings, teacher name)
    """The section's recipe and its two teacher versions, v1 and v2 (a new teacher version, as a team's retraining
    makes one). Both are reused when an earlier run made them."""
    from mlflow.tracking import MlflowClient

    from distill_core import steps
    from distill_core.recipe import load_recipe
    from distill_core.settings import load_settings

    recipe = spec.tune(load_recipe(spec.recipe))
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.environ.pop("DISTILL_STORE", None)
    settings = load_settings(HERE / ".work" / spec.home)
    name = recipe.teacher.registered_name
    have = {int(v.version) for v in MlflowClient(settings.tracking_uri).search_model_versions(f"name='{name}'")}
    for version, overrides in spec.versions.items():
        if version not in have:
            print(f"{spec.home}: making teacher v{version} ({overrides})")
            steps.train_and_register_teacher(recipe, settings, steps.prepare(recipe, settings), log=print, **overrides)
    return recipe, settings, name


def _modes_variant(recipe, settings, name: str, version: str, variant: str, **update) -> dict[str, object]:  # noqa: ANN001
    from distill_core import steps

    recipe = recipe.model_copy(update={"name": f"{recipe.name}-{variant}", **update})
    began = time.perf_counter()
    reports, out = steps.distill_and_evaluate(recipe, settings, name, version, log=print)
    training = json.loads((out / "training.json").read_text())
    print(f"modes {variant}: {time.perf_counter() - began:.0f} s", flush=True)
    return {
        "teacher": f"{name} v{version}",
        "seconds": time.perf_counter() - began,
        "reports": [r.as_dict() for r in reports],
        "train_seconds": {k: v["seconds"] for k, v in training.items()},
        "steps": {k: v["steps"] for k, v in training.items()},
        "out": str(out),
    }


def _register_champion(recipe, settings, dataset, module, candidate: str, labels_key: str) -> str:  # noqa: ANN001
    """The v1 student as the student model's champion, with the lineage a pipeline run gives it."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from distill_core import names
    from distill_core.lineage import Lineage
    from distill_core.model_io import log_student
    from distill_core.registry import CHAMPION
    from distill_core.tasks import task_of

    task = task_of(recipe)
    mlflow.set_tracking_uri(settings.tracking_uri)
    lineage = Lineage(dataset_digest=dataset.digest, soft_labels_key=labels_key)
    with mlflow.start_run(run_name="modes-champion"):
        _, version = log_student(
            module,
            registered_model_name=recipe.student_registered_name,
            input_texts=task.examples(dataset, "test")[0][:2],
            tags={**lineage.tags(), names.CANDIDATE: candidate},
            task=task,
        )
    MlflowClient(settings.tracking_uri).set_registered_model_alias(recipe.student_registered_name, CHAMPION, version)
    return str(version)


def modes(spec: ModesTask, parts: tuple[str, ...] = MODES_PARTS) -> dict[str, object]:
    """Distillation modes against the plain single-teacher student of the same size, data, steps and seeds.
    stages: the students straight from teacher v1 (= born-again generation 1), the later born-again generations,
    and the students through a teacher assistant. warm: on teacher v2, the transformer student cold (from the
    teacher's layers, the full step budget) against warm (from the v1 student, its warm_start share of the steps,
    on the rows whose signal moved plus a replay), and what each remembers of teacher v1. ensemble: teacher v1
    and v2 as one, against each alone."""
    from distill_core import steps
    from distill_core.model_io import load_teacher
    from distill_core.modules import read_module
    from distill_core.names import generation_name
    from distill_core.recipe import StagesConfig, TeacherMember, WarmStartConfig
    from distill_core.stages import STAGES

    started = time.perf_counter()
    recipe, settings, name = _modes_setup(spec)
    shutil.rmtree(settings.runs_dir, ignore_errors=True)  # students train anew (a reused checkpoint times 0 s)
    measured: dict[str, object] = {"title": spec.title, "generations": spec.generations, "columns": spec.columns}
    if "stages" in parts:
        measured["born-again"] = _modes_variant(
            recipe, settings, name, "1", "born-again", stages=StagesConfig(generations=spec.generations)
        )
        measured["assistant"] = _modes_variant(
            recipe, settings, name, "1", "assistant", stages=StagesConfig(assistants=[spec.assistant])
        )
    if "warm" in parts:
        student = next(s.name for s in recipe.students if s.family == "transformer")  # what a warm start continues
        dataset = steps.open_dataset(recipe, settings)
        v1 = load_teacher(name, "1", settings.tracking_uri)
        v1_labels = steps.label(recipe, settings, dataset, v1)
        v2 = load_teacher(name, "2", settings.tracking_uri)
        began = time.perf_counter()
        v2_labels = steps.label(recipe, settings, dataset, v2)
        label_seconds = time.perf_counter() - began if not v2_labels.reused else None
        if "born-again" in measured:  # its generation 1 is the plain student of teacher v1
            champion_path = Path(measured["born-again"]["out"]) / STAGES / f"{generation_name(student, 1)}.pt"
        else:
            plain = recipe.model_copy(update={"name": f"{recipe.name}-plain"})
            champion_path = steps.distill_and_evaluate(plain, settings, name, "1", log=print)[1] / student
            champion_path = champion_path / "distilled.pt"
        module = read_module(champion_path)
        version = _register_champion(recipe, settings, dataset, module, student, v1_labels.key)
        cold = _modes_variant(recipe, settings, name, "2", "cold")
        warm_cfg = WarmStartConfig(version=int(version), steps=WARM_STEPS, changed=0.1, replay=0.2)
        warm = _modes_variant(recipe, settings, name, "2", "warm", warm_start=warm_cfg)
        models = {
            "champion (v1 student)": module,
            "cold": read_module(Path(cold["out"]) / student / "distilled.pt"),
            "warm": read_module(Path(warm["out"]) / student / "distilled.pt"),
            "teacher v2": v2.module,
        }
        measured["warm"] = {
            "student": student,
            "new_version": spec.new_version,
            "label_seconds_v2": label_seconds,
            "cold": cold,
            "warm": warm,
            "agreement_with_v1": {
                who: spec.remembered(model, dataset, v1_labels.signal["test"]) for who, model in models.items()
            },
        }
    if "ensemble" in parts:
        members = [TeacherMember(name=name, version=1), TeacherMember(name=name, version=2)]
        measured["ensemble"] = _modes_variant(recipe, settings, name, "1", "ensemble", teachers=members)
    measured["total_seconds"] = time.perf_counter() - started
    return measured


def pipeline() -> dict[str, object]:
    """The pipeline's own overhead on one demo run, and a rerun on the unchanged teacher (labels reused)."""
    from prefect.testing.utilities import prefect_test_harness

    from distill_core import steps
    from distill_core.recipe import load_recipe
    from distill_core.tasks import task_of
    from flows.distill import distill_teacher_version, release_for_rerun

    recipe_path = ROOT / "recipes" / "demo.yaml"
    recipe = load_recipe(recipe_path)
    home, settings = cold_home("pipeline")
    dataset = steps.prepare(recipe, settings)
    name, version = steps.train_and_register_teacher(  # the demo's teacher v1; not part of the pipeline's time
        recipe, settings, dataset, log=lambda _: None, **task_of(recipe).stand_in_versions(1)[1]
    )
    with prefect_test_harness(server_startup_timeout=120):
        runs = {}
        for label in ("cold", "rerun"):
            if label == "rerun":
                release_for_rerun(settings, name, version, recipe.student_registered_name)
            started = time.perf_counter()
            result = distill_teacher_version(name, version, str(recipe_path), str(home), claimant="bench")
            wall = time.perf_counter() - started
            core = sum(v for k, v in result["seconds"].items() if k != "total")
            runs[label] = {"wall_s": wall, "core_s": core, "overhead_s": wall - core, "phases": result["seconds"]}
    cold, rerun = runs["cold"], runs["rerun"]
    return {
        "recipe": "recipes/demo.yaml",
        "cold": cold,
        "rerun": rerun,
        "overhead_share": cold["overhead_s"] / cold["wall_s"],
        "rerun_share": rerun["wall_s"] / cold["wall_s"],
    }


def trigger(webhook_samples: int = 7, watcher_samples: int = 3, interval_s: int = 30) -> dict[str, object]:
    """Registration → flow run, through the webhook and through the scheduled watcher, on the topology of
    tests/stack.py (PostgreSQL-backed MLflow and Prefect servers, S3, a worker, the receiver)."""
    sys.path.insert(0, str(ROOT / "tests"))
    import yaml
    from mlflow.entities.webhook import WebhookStatus
    from mlflow.tracking import MlflowClient
    from stack import Stack, postgres_missing, wait_for
    from toy_models import one_student_recipe, register_toy_teacher

    if postgres_missing():
        return {"skipped": postgres_missing()}
    root = HERE / ".work" / "trigger"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    data = prepare_dataset(DataConfig(max_rows=300), root / "data")
    recipe = root / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(one_student_recipe("bench-teacher", "bench-student")))
    stack = Stack(root, recipe, "bench-secret", watch_interval=interval_s).start()
    samples: dict[str, list[dict[str, float]]] = {"webhook": [], "watcher": []}
    try:
        client = MlflowClient(stack.mlflow_url)
        hook = client.create_webhook(
            name="bench", url=stack.receiver_url, events=["model_version.created"], secret="bench-secret"
        )
        time.sleep(1.5)  # MLflow's webhook cache (1 s on this stack)
        env = {"teacher": "bench-teacher", "tracking_uri": stack.mlflow_url, "artifacts": None}
        for path, count in (("webhook", webhook_samples), ("watcher", watcher_samples)):
            stack.schedule_watcher(active=path == "watcher")  # one path at a time, so each sample is its own
            if path == "watcher":
                client.update_webhook(hook.webhook_id, status=WebhookStatus.DISABLED)
                time.sleep(1.5)
            for i in range(count):
                version = register_toy_teacher(env, data, seed=i)
                registered = client.get_model_version("bench-teacher", version).creation_timestamp / 1000
                run = wait_for(
                    lambda v=version: next((r for r in stack.runs_for(v) if r.state.is_final()), None),
                    600,
                    f"the run of v{version}",
                    every=0.5,
                )
                assert f"trigger:{path}" in run.tags, (path, run.tags)
                samples[path].append(
                    {
                        "queued_s": run.created.timestamp() - registered,
                        "running_s": run.start_time.timestamp() - registered,
                        "run_s": run.total_run_time.total_seconds(),
                    }
                )
                print(path, samples[path][-1], flush=True)
    finally:
        stack.close()

    def summary(rows: list[dict[str, float]]) -> dict[str, object]:
        return {
            "n": len(rows),
            **{f"median_{k}": statistics.median(r[k] for r in rows) for k in ("queued_s", "running_s", "run_s")},
            "max_running_s": max(r["running_s"] for r in rows),
            "samples": rows,
        }

    return {
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "webhook": summary(samples["webhook"]),
        "watcher": {**summary(samples["watcher"]), "interval_s": interval_s},
    }


class PeakRSS:
    """The peak resident memory of this process while the block runs (sampled every 20 ms), in MB."""

    def __enter__(self) -> PeakRSS:
        import threading

        self.start = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    @staticmethod
    def _rss() -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def _watch(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())


def online_step(teacher, fresh, train_cfg, inputs, rows, targets) -> dict[str, float]:  # noqa: ANN001
    """The teacher in the loop: one LM training step with its logits made a chunk of positions at a time (ours)
    against the same step given the teacher's full `[B, T, vocab]` logits, interleaved; peak RSS of each."""
    from distill_core.signals import DenseSignal, OnlineSource
    from distill_core.tasks.causal_lm import CAUSAL_LM

    class FullLogits(OnlineSource):  # the batch's full teacher logits, as online mode had them before
        @torch.no_grad()
        def signal(self, index, texts, batch):  # noqa: ANN001, ANN202
            return DenseSignal(self.teacher(**self.task.teacher_inputs(self.teacher, texts, batch)).float())

    online = train_cfg.model_copy(update={"mode": "online"})
    distillers, peaks = [], {"chunked": 0.0, "full": 0.0}
    for source_class in (OnlineSource, FullLogits):
        student = fresh()
        objective = objective_for(student, online, teacher)
        source = source_class(teacher, task=CAUSAL_LM)
        distillers.append(Distiller(student, objective, source, online.lr, online.weight_decay, CAUSAL_LM))

    def stepper(distiller: Distiller, name: str):  # noqa: ANN202
        def step() -> None:
            with PeakRSS() as rss:
                distiller.step(rows, [inputs[i] for i in rows], targets)
            peaks[name] = max(peaks[name], rss.peak - rss.start)

        return step

    t_ours, t_full = interleaved(stepper(distillers[0], "chunked"), stepper(distillers[1], "full"), 5)
    return {
        "ours_ms_per_step": statistics.median(t_ours) * 1000,
        "full_ms_per_step": statistics.median(t_full) * 1000,
        "ratio": statistics.median(t_ours) / statistics.median(t_full),
        "ours_step_rss_mb": peaks["chunked"],
        "full_step_rss_mb": peaks["full"],
    }


def lm(recipe_path: Path = ROOT / "recipes" / "lm-demo.yaml", quality: bool = True) -> dict[str, object]:
    """SmolLM2-135M-Instruct distilled into the LM demo's student on the demo's data: bytes per token of the
    stored signal against dense fp32 logits; labeling against a bare teacher forward over the same blocks;
    a training step against a bare torch loop with the same loss; the quality table (teacher, hard-label twin,
    top-k, sampled and online students); peak resident memory of labeling and training."""
    import math

    from distill_core import steps
    from distill_core.lm import load_smollm2
    from distill_core.losses import sparse_buckets
    from distill_core.recipe import load_recipe
    from distill_core.soft_labels import generate_soft_labels
    from distill_core.store import LocalStore
    from distill_core.tasks.causal_lm import CAUSAL_LM, StoredSparseSource, sparse_signal
    from distill_core.train import TransferSet, baseline_config, train_student

    recipe = load_recipe(recipe_path)
    home, settings = cold_home("lm")
    dataset = steps.prepare(recipe, settings)
    teacher = LoadedTeacher(load_smollm2(), "smollm2", "1", "bench")
    module = teacher.module
    inputs, blocks = CAUSAL_LM.examples(dataset, "transfer")
    vocab = module.vocab_size  # type: ignore[attr-defined]
    out: dict[str, object] = {"recipe": str(recipe_path.relative_to(ROOT)), "tokens": dataset.info["tokens"]}

    # labeling vs a bare forward over the same 16 blocks, interleaved
    few, cfg = blocks[:16], recipe.soft_labels

    @torch.inference_mode()
    def bare_forward() -> None:
        for start in range(0, len(few), cfg.batch_size):
            module(torch.as_tensor(few[start : start + cfg.batch_size, :-1]))

    t_ours, t_bare = interleaved(lambda: sparse_signal(module, few, cfg), bare_forward, 5)
    tokens = few[:, :-1].size
    out["labeling"] = {
        "tokens": tokens,
        "ours_tokens_per_s": tokens / statistics.median(t_ours),
        "bare_tokens_per_s": tokens / statistics.median(t_bare),
        "ratio": statistics.median(t_bare) / statistics.median(t_ours),
    }
    print(out["labeling"], flush=True)

    # the stored signals (labels every split; peak memory while doing it)
    store, signals, sizes = LocalStore(home / "store"), {}, {}
    variants = {"top_k": cfg, "sampled": cfg.model_copy(update={"kind": "sampled", "k": 16, "tail": "rest"})}
    for name, signal_cfg in variants.items():
        with PeakRSS() as rss:
            labels = generate_soft_labels(teacher, dataset, signal_cfg, store, "causal_lm")
        transfer = labels.signal["transfer"]
        positions = transfer["ids"].shape[0] * transfer["ids"].shape[1]
        per_token = sum(a.nbytes for a in transfer.values()) / positions
        signals[name] = labels
        sizes[name] = {
            "bytes_per_token": per_token,
            "share_of_dense_fp32": per_token / (4 * vocab),
            "label_seconds": labels.manifest["seconds"],
            "peak_rss_mb": rss.peak,
        }
        print(name, sizes[name], flush=True)
    out["signal"] = sizes

    # a training step against a bare loop: student forward, the same forward KL over top-k plus the rest, CE
    student_cfg = recipe.students[0]
    batch_rows = list(range(recipe.train.batch_size))
    targets = torch.as_tensor(blocks[batch_rows])

    def fresh():  # noqa: ANN202
        torch.manual_seed(0)
        return CAUSAL_LM.build_student(student_cfg, module, dataset, inputs, cfg, lambda _: None)

    from distill_core.train import Distiller as LMDistiller

    ours_student, bare_student = fresh(), fresh()
    source = StoredSparseSource(signals["top_k"].signal["transfer"], cfg)
    objective = objective_for(ours_student, recipe.train, None)
    distiller = LMDistiller(
        ours_student,
        objective,
        source,
        recipe.train.lr,
        recipe.train.weight_decay,
        CAUSAL_LM,
        max_grad_norm=recipe.train.max_grad_norm,
    )
    optimizer = torch.optim.AdamW(bare_student.parameters(), lr=recipe.train.lr, weight_decay=recipe.train.weight_decay)
    stored = {k: torch.as_tensor(v[batch_rows]) for k, v in signals["top_k"].signal["transfer"].items()}
    lm_steps = 3

    def ours_step() -> None:
        for _ in range(lm_steps):
            distiller.step(batch_rows, [inputs[i] for i in batch_rows], targets)

    def bare_step() -> None:
        bare_student.train()
        for _ in range(lm_steps):
            logits = bare_student(targets[:, :-1])
            log_s, log_t = sparse_buckets(
                logits, stored["ids"].long(), stored["logprobs"].float(), 1.0, None, "tail", 1.0, stored["tail"]
            )
            kl = (log_t.exp() * (log_t - log_s)).sum(-1).mean()
            ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets[:, 1:].reshape(-1))
            loss = 0.9 * kl + 0.1 * ce
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(bare_student.parameters(), recipe.train.max_grad_norm or 1e9)
            optimizer.step()

    t_ours, t_bare = interleaved(ours_step, bare_step, 5)
    ours_ms, bare_ms = statistics.median(t_ours) * 1000 / lm_steps, statistics.median(t_bare) * 1000 / lm_steps
    out["train_step"] = {"ours_ms_per_step": ours_ms, "bare_ms_per_step": bare_ms, "ratio": ours_ms / bare_ms}
    print(out["train_step"], flush=True)
    out["online_step"] = online_step(module, fresh, recipe.train, inputs, batch_rows, targets)
    print(out["online_step"], flush=True)
    if not quality:  # lm-overheads: the quality table of the last full run stays
        return out

    # quality: teacher, hard-label twin, top-k, sampled and online students, measured side by side
    val = CAUSAL_LM.examples(dataset, "validation")
    students, seconds, rss_train = {}, {}, {}
    runs = {
        "hard-label twin": (baseline_config(recipe.train), None, cfg),
        "top-k student": (recipe.train, signals["top_k"], cfg),
        "sampled student": (
            recipe.train,
            signals["sampled"],
            variants["sampled"],
        ),
        "online student": (recipe.train.model_copy(update={"mode": "online"}), None, cfg),
    }
    for name, (train_cfg, labels, signal_cfg) in runs.items():
        transfer = TransferSet(inputs, blocks, None if labels is None else labels.signal["transfer"])
        started = time.perf_counter()
        with PeakRSS() as rss:
            result = train_student(
                fresh(),
                student_cfg,
                train_cfg,
                transfer,
                val,
                home / "runs" / name.replace(" ", "-"),
                teacher=module,
                fingerprint=name,
                log=print,
                task=CAUSAL_LM,
                signal_cfg=signal_cfg,
            )
        students[name], seconds[name], rss_train[name] = result.student, time.perf_counter() - started, rss.peak
        print(name, f"{seconds[name]:.0f} s, peak RSS {rss.peak:.0f} MB", flush=True)
    test_inputs, test_blocks = CAUSAL_LM.examples(dataset, "test")
    test_signal = signals["top_k"].signal["test"]
    models = {"teacher SmolLM2-135M": module, **students}
    speeds = CAUSAL_LM.measure_speed(models, test_inputs, recipe.evaluation)
    teacher_report = CAUSAL_LM.evaluate(
        "teacher SmolLM2-135M",
        module,
        test_inputs,
        test_blocks,
        test_signal,
        speeds["teacher SmolLM2-135M"],
        test_signal,
    )
    measured = {
        name: CAUSAL_LM.evaluate(name, model, test_inputs, test_blocks, test_signal, speeds[name])
        for name, model in students.items()
    }
    twin = measured["hard-label twin"]
    reports = [teacher_report] + [CAUSAL_LM.relative_to(r, teacher_report, twin) for r in measured.values()]
    from distill_core.evaluate import comparison_table

    out["quality"] = {
        "reports": [r.as_dict() for r in reports],
        "train_seconds": seconds,
        "train_peak_rss_mb": rss_train,
        "table": comparison_table(reports, CAUSAL_LM.columns),
        "teacher_ppl_check": math.isfinite(teacher_report.perplexity),
    }
    print(out["quality"]["table"], flush=True)
    return out


def _modes_markdown(part: dict[str, object]) -> list[str]:
    """One task's modes section as the README quotes it (reads what earlier runs wrote, too)."""
    columns = [tuple(c) for c in part.get("columns", CLASSIFIER_COLUMNS)]
    generations = part.get("generations", 3)
    quality_header, quality_key, quality_format = columns[0]
    title = part.get(
        "title", f"Distillation modes on Rotten Tomatoes (every student and stage {part.get('steps')} steps"
    )

    def cells(report: dict) -> str:
        return " | ".join(fmt.format(report[key]) for _, key, fmt in columns)

    took = ", ".join(f"{name} {part[name]['seconds'] / 60:.0f} min" for name in MODES_RUNS if name in part)
    lines = [f"## {title}, same data and seeds; {took})", ""]
    stage_variants = [v for v in ("born-again", "assistant") if v in part]
    if stage_variants:
        reports = part.get("assistant", {}).get("reports", [])
        assistant = next((str(r["name"]) for r in reports if str(r["name"]).endswith("(assistant)")), "")
        lines += [
            f"Teacher {part[stage_variants[0]]['teacher']}. Born-again generation 1 is the plain student distilled "
            "straight from the teacher (the baseline of both modes); the assistant's students are cut from and "
            f"taught by the assistant {assistant.split(' (')[0]}.",
            "",
            f"| mode | model | {' | '.join(h for h, _, _ in columns)} | agree | params | training s |",
            f"|---|---|{'---|' * len(columns)}---|---|---|",
        ]
        for variant in stage_variants:
            seconds = part[variant]["train_seconds"]
            for report in part[variant]["reports"]:
                model = str(report["name"])
                key = model.split(" (")[0]
                if variant == "born-again":  # the candidate is the last generation
                    model = model.replace(" (distilled)", f".gen{generations} (distilled)")
                trained = seconds.get(f"stages/{key}", seconds.get(f"{key}/distilled"))
                took = "" if trained is None else f"{trained:.0f}"
                lines.append(
                    f"| {variant} | {model} | {cells(report)} | {report['agreement']:.3f} | {report['params']:,} | "
                    f"{took} |"
                )
        lines.append("")
    warm = part.get("warm")
    if isinstance(warm, dict):
        student, cold, hot = warm["student"], warm["cold"], warm["warm"]
        key = f"{student}/distilled"
        remembered = warm["agreement_with_v1"]

        def row(name: str, run: dict) -> str:
            report = next(r for r in run["reports"] if r["name"] == f"{student} (distilled)")
            return (
                f"| {name} | {quality_format.format(report[quality_key])} | {report['agreement']:.3f} | "
                f"{remembered[name]:.3f} | {run['steps'][key]} | {run['train_seconds'][key]:.0f} | "
                f"{run['seconds'] + (warm['label_seconds_v2'] or 0):.0f} |"
            )

        ratio = hot["train_seconds"][key] / max(cold["train_seconds"][key], 1e-9)
        v1_v2 = remembered.get("teacher v2", warm.get("v1_v2_test_agreement"))
        new_version = warm.get("new_version", "the bench teacher retrained with another seed")
        what = "predictions" if quality_key == "accuracy" else "next tokens"
        lines += [
            f"Warm re-distillation of {student} on a new teacher version ({cold['teacher']}: {new_version}; it "
            f"agrees with v1 on {v1_v2:.1%} of the test split's {what}), "
            "from the v1 student (the champion), against the same student cold:",
            "",
            f"| start | {quality_header} | agree (v2) | agree (v1) | steps | training s | end to end s |",
            "|---|---|---|---|---|---|---|",
            row("cold", cold),
            row("warm", hot),
            f"| champion (v1 student) | | | {remembered['champion (v1 student)']:.3f} | | | |",
            "",
            f"Warm training took {ratio:.1%} of the cold training time (goal ≤ 30% at equal or better quality); "
            + (
                f"the end-to-end runs include labeling teacher v2 ({warm['label_seconds_v2']:.0f} s each). "
                if warm["label_seconds_v2"]
                else "the end-to-end runs reused teacher v2's stored labels (labeling it is the same for both). "
            )
            + "`agree (v1)`: top-1 agreement with teacher v1 on the test split, what the student kept of the old "
            "teacher.",
            "",
        ]
    ens = part.get("ensemble")
    if isinstance(ens, dict):
        alone = {
            "teacher v1 alone": (part.get("born-again") or {}).get("reports", []),
            "teacher v2 alone": ((part.get("warm") or {}).get("cold") or {}).get("reports", []),
        }
        lines += [
            "The two teacher versions as one ensemble (weights 1 and 1) against each alone, same students and steps "
            "(`agree`: with the model's own teacher; the members' rows: against the ensemble):",
            "",
            f"| taught by | model | {' | '.join(h for h, _, _ in columns)} | agree | params |",
            f"|---|---|{'---|' * len(columns)}---|---|",
        ]
        for report in ens["reports"]:
            lines.append(
                f"| ensemble v1+v2 | {report['name']} | {cells(report)} | {report['agreement']:.3f} | "
                f"{report['params']:,} |"
            )
        for who, reports in alone.items():
            plain = ".gen1" if who == "teacher v1 alone" else " (distilled)"  # how each run names its plain student
            for report in (r for r in reports if str(r["name"]).endswith(plain)):
                lines.append(
                    f"| {who} | {report['name']} | {cells(report)} | {report['agreement']:.3f} | {report['params']:,} |"
                )
        lines.append("")
    return lines


def _closest_to_stretch(found: dict[str, Any]) -> str:
    """The trained architecture within 15% of the teacher's parameters and 8x its speed (untrained latency, the
    search's own) with the best validation retention, against 98%."""
    within = [r for r in found["rows"] if r["name"] in found["stretch_candidates"] and r.get("val_retention")]
    if not within:
        return "no trained architecture is that small and fast."
    best = max(within, key=lambda r: r["val_retention"])
    teacher = found["teacher"]
    return (
        f"of the {len(within)} trained architectures that small and fast, the best, {best['name']} "
        f"({best['params'] / teacher['params']:.1%} of the parameters, {teacher['p50_ms'] / best['p50_ms']:.1f}x), "
        f"kept {best['val_retention']:.1%} of the teacher's validation accuracy ({found['teacher_val_accuracy']:.3f}); "
        + ("the stretch goal is reached on validation." if best["val_retention"] >= 0.98 else "short of 98%.")
    )


def _search_markdown(found: dict[str, Any]) -> list[str]:
    """The search section: the frontier table (every architecture), the chosen student against the goal, the cost."""
    from distill_core.search import untried

    teacher, chosen, twin, summary = found["teacher"], found["chosen"], found["twin"], found["summary"]
    lines = [
        f"## The student search on Rotten Tomatoes ({found['recipe']}, the goal as gates, "
        f"max_p95_ms = teacher p95 {teacher['p95_ms']:.2f} ms / 4 = {found['max_p95_ms']:.3f})",
        "",
        "| architecture | params | of teacher | MB | p95 ms (untrained) | speed-up | val accuracy | val retention "
        "| trial | steps | frontier |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in found["rows"]:
        score = f"{r['score']:.3f}" if r.get("score") is not None else "—"
        retention = f"{r['val_retention']:.1%}" if r.get("val_retention") else "—"
        state = r.get("state") or untried(r)
        lines.append(
            f"| {r['name']}{' **(chosen)**' if r.get('chosen') else ''} | {r['params']:,} | "
            f"{r['params'] / teacher['params']:.1%} | {r['bytes'] / 1e6:.1f} | {r['p95_ms']:.2f} | "
            f"{teacher['p50_ms'] / r['p50_ms']:.1f}x | {score} | {retention} | {state} | "
            f"{r.get('steps', 0)} | {'yes' if r.get('frontier') else ''} |"
        )
    goal = found["goal"]
    met = all(goal.values())
    lines += [
        "",
        f"Search: {summary['architectures']} architectures, {summary['infeasible']} dropped before training, "
        f"{summary['trials']} trials ({summary['complete']} complete, {summary['pruned']} pruned) in "
        f"{summary['seconds'] / 60:.1f} min; the whole section (teacher {found['teacher_seconds'] / 60:.1f} min, "
        f"labels, search, the twin, evaluation) {found['total_seconds'] / 60:.1f} min.",
        "",
        f"Chosen: **{summary['chosen']}**, test accuracy {chosen['accuracy']:.3f} = **{chosen['retention']:.1%}** of "
        f"the teacher's {teacher['accuracy']:.3f}, {chosen['params'] / teacher['params']:.1%} of its parameters, "
        f"**{chosen['speedup']:.1f}x** its batch-1 speed (p50 {chosen['p50_ms']:.2f} ms), hard-label twin "
        f"{twin['accuracy']:.3f}. Goal (>= 97%, <= 25%, >= 4x, above the twin): "
        + ("**met**." if met else "not met: " + ", ".join(k for k, v in goal.items() if not v) + "."),
        f"Stretch (98% at <= 15% of the parameters and >= 8x): {_closest_to_stretch(found)}",
        "",
    ]
    return lines


def paired_bootstrap(a: Any, b: Any, samples: int = 10_000, seed: int = 0) -> tuple[float, float, float]:
    """The mean of b - a over paired rows (1 where right, 0 where wrong) and its 95% percentile interval, by
    resampling the rows."""
    import numpy as np

    diff = np.asarray(b, dtype=float) - np.asarray(a, dtype=float)
    rows = np.random.default_rng(seed).integers(0, len(diff), (samples, len(diff)))
    low, high = np.percentile(diff[rows].mean(axis=1), [2.5, 97.5])
    return float(diff.mean()), float(low), float(high)


def demo(recipe_path: Path = ROOT / "recipes" / "demo.yaml") -> dict[str, object]:
    """`distill demo` end to end on a fresh home (in process), then the question its story asks: is teacher v2's
    registered student better than v1's on the demo's test split? Paired bootstrap over the test rows."""
    from mlflow.tracking import MlflowClient
    from prefect.testing.utilities import prefect_test_harness

    from distill_core import steps
    from distill_core.evaluate import predict
    from distill_core.model_io import load_module
    from distill_core.names import CANDIDATE
    from distill_core.recipe import load_recipe
    from flows.demo import continuous_demo

    recipe = load_recipe(recipe_path)
    _, settings = cold_home("demo")
    with prefect_test_harness(server_startup_timeout=120):
        started = time.perf_counter()
        table = continuous_demo(recipe_path, settings, echo=print, log=lambda _: None)
        wall = time.perf_counter() - started
    test = steps.open_dataset(recipe, settings).split("test")
    texts, truth = test["text"].tolist(), test["label"].to_numpy()
    client, right, versions = MlflowClient(settings.tracking_uri), {}, {}
    for kind, name in (("teacher", recipe.teacher.registered_name), ("student", recipe.student_registered_name)):
        for version in ("1", "2"):
            module = load_module(f"models:/{name}/{version}")
            right[kind, version] = predict(module, texts).argmax(axis=1) == truth
            tags = client.get_model_version(name, version).tags
            versions[f"{kind} v{version}"] = {
                "accuracy": float(right[kind, version].mean()),
                **({"candidate": tags.get(CANDIDATE, "")} if kind == "student" else {}),
            }
    gains = {kind: paired_bootstrap(right[kind, "1"], right[kind, "2"]) for kind in ("teacher", "student")}
    return {
        "recipe": str(recipe_path.relative_to(ROOT)),
        "wall_s": wall,
        "test_rows": len(truth),
        "versions": versions,
        "gain": {kind: {"mean": m, "low": lo, "high": hi} for kind, (m, lo, hi) in gains.items()},
        "table": table,
    }


EXPORT_SAMPLES = 300  # batch-1 latency samples per model (the LM: a tenth as many prompts of 16 tokens each)


def export(recipes: tuple[Path, ...] = (ROOT / "recipes" / "demo.yaml", ROOT / "recipes" / "lm-demo.yaml")) -> dict:
    """The demo's classifier students and the LM demo's student as they would ship: torch fp32 against ONNX fp32 and
    ONNX int8 (onnxruntime dynamic quantisation), each model at batch 1 on one thread, interleaved with the others
    and the teacher (deploy.deploy_candidate, the pipeline's own path): size, p50/p95 latency, quality, agreement
    with the teacher, parity with the torch student. Teachers: the classifier demo's v2 (MiniLM fine-tuned), the LM
    demo's v1 (SmolLM2 as packaged)."""
    from distill_core import steps
    from distill_core.model_io import load_teacher
    from distill_core.recipe import load_recipe
    from distill_core.tasks import task_of

    out: dict[str, Any] = {}
    for path in recipes:
        started = time.perf_counter()
        recipe = load_recipe(path)
        task = task_of(recipe)
        evaluation = recipe.evaluation.model_copy(
            update={"latency_samples": EXPORT_SAMPLES, "hard_label_baseline": False}
        )
        recipe = recipe.model_copy(
            update={"evaluation": evaluation, "deploy": recipe.deploy.model_copy(update={"threads": 1})}
        )
        home, settings = cold_home(f"export-{recipe.name}")
        dataset = steps.prepare(recipe, settings)
        overrides = task.stand_in_versions(2 if task.name == "classification" else 1)[1]
        name, version = steps.train_and_register_teacher(recipe, settings, dataset, print, **overrides)
        teacher = load_teacher(name, version, settings.tracking_uri)
        labels = steps.label(recipe, settings, dataset, teacher)
        outcomes = steps.distill_all(recipe, dataset, labels, teacher, home / "run", print, settings=settings)
        measured = time.perf_counter()
        steps.evaluate_all(recipe, dataset, labels, teacher, outcomes, home / "run" / steps.EXPORT)
        students = {}
        for outcome in outcomes:
            deployment = outcome.deployment
            assert deployment is not None and deployment.folder is not None, outcome.config.name
            config = json.loads((deployment.folder / "config.json").read_text())
            students[outcome.config.name] = {
                "params": int(deployment.target().params),
                "parity": deployment.parity,
                "max_logit_diff": deployment.max_logit_diff,
                "export_s": config["export_seconds"],
                "problem": deployment.problem,
                "formats": {
                    fmt: {
                        "bytes": r.bytes,
                        "p50_ms": r.p50_ms,
                        "p95_ms": r.p95_ms,
                        "quality": task.quality(r),
                        "agreement": r.agreement,
                        "under_load": r.under_load,
                    }  # type: ignore[attr-defined]
                    for fmt, r in deployment.reports.items()
                },  # fmt: skip
                "table": deployment.table(task),
            }
        out[task.name] = {
            "recipe": str(path.relative_to(ROOT)),
            "quality_name": task.quality_name,
            "students": students,
            "measure_s": time.perf_counter() - measured,
            "wall_s": time.perf_counter() - started,
        }
        print(json.dumps({k: {f: v["formats"] for f, v in s.items()} for k, s in [(task.name, students)]}, indent=2))
    return out


SCALE_ROWS, SCALE_SHARD, SCALE_REPEATS = 6144, 512, 2  # reviews prepared (every split labeled), rows a shard, runs


def scale() -> dict[str, Any]:
    """Labeling throughput on Dask (distill_core.sharding, the pipeline's own path) against one process and plain
    processes (the machine's own ceiling for two labelers, no Dask or Prefect): a running
    LocalCluster of 2 workers of one thread, one of 1 worker of one thread, and this process at 1 and at 2 threads,
    interleaved, each run relabeling the same rows (MiniLM teacher, one thread per labeling process). The overhead
    per shard is the 1-worker run's time beyond this process's at one thread, per shard; from it and the measured
    per-shard cost, an estimate of rows/s at more workers (the model is in the results)."""
    import dataclasses

    import dask
    from distributed import LocalCluster
    from prefect.testing.utilities import prefect_test_harness

    from distill_core.sharding import FAST_MALLOC, shard_runner
    from distill_core.soft_labels import generate_soft_labels
    from distill_core.store import LocalStore

    torch.manual_seed(0)
    started = time.perf_counter()
    home, settings = cold_home("scale")
    data = prepare_dataset(DataConfig(max_rows=SCALE_ROWS, augment_copies=0), home / "data")
    encoder, tokenizer = load_minilm()
    teacher = TextClassifier(encoder, tokenizer, data.labels).eval()
    loaded = LoadedTeacher(teacher, "scale-teacher", "bench", content_digest(teacher))
    rows = {s: len(data.split(s)) for s in ("transfer", "validation", "test")}
    cfg = SoftLabelConfig(batch_size=64, max_length=64, shard_rows=SCALE_SHARD, threads=1)
    shards = sum(-(-n // SCALE_SHARD) for n in rows.values())
    times: dict[str, list[float]] = {
        "dask_2x1": [], "dask_1x1": [], "process_1": [], "process_2": [], "plain_2x1": [], "plain_1x1": []
    }  # fmt: skip
    texts = [text for split in rows for text in data.split(split)["text"]]
    spans: dict[str, list[float]] = {"dask_2x1": [], "dask_1x1": []}  # first shard's start to last shard's end
    with prefect_test_harness(server_startup_timeout=120), contextlib.ExitStack() as clusters:
        runners = {}
        for name, workers in (("dask_2x1", 2), ("dask_1x1", 1)):
            with dask.config.set(FAST_MALLOC):  # the workers DISTILL_DASK=local starts (distill_core.sharding)
                cluster = clusters.enter_context(
                    LocalCluster(n_workers=workers, threads_per_worker=1, dashboard_address=":0", processes=True)
                )
            at = dataclasses.replace(settings, dask=cluster.scheduler_address)
            runners[name] = shard_runner(at, loaded, cfg, "classification", str(home / name))
        for repeat in range(SCALE_REPEATS + 1):  # the first round warms every path up and is not counted
            for name in times:
                if name.startswith("plain_"):  # the machine's own ceiling: single-thread processes, no Dask or Prefect
                    seconds = _plain_processes(texts, data.labels, 2 if name == "plain_2x1" else 1, home)
                    if repeat:
                        times[name].append(seconds)
                    continue
                store = LocalStore(home / name)
                run_cfg = cfg if name != "process_2" else cfg.model_copy(update={"threads": 2})
                begin = time.perf_counter()
                labels = generate_soft_labels(loaded, data, run_cfg, store, force=True, runner=runners.get(name))
                if repeat:
                    times[name].append(time.perf_counter() - begin)
                    if name in spans:
                        spans[name].append(_last_labeling_span())
                assert labels.manifest["rows"] == rows
    total = sum(rows.values())
    median = {name: statistics.median(t) for name, t in times.items()}
    span = {name: statistics.median(t) for name, t in spans.items()}
    per_shard = median["process_1"] / shards  # labeling alone, one thread
    overhead = (median["dask_1x1"] - median["process_1"]) / shards  # scheduling, transfer, the store, per shard
    estimate = scale_estimate(per_shard, overhead)
    return {
        "rows": total,
        "shards": shards,
        "shard_rows": SCALE_SHARD,
        "rows_per_s": {name: total / t for name, t in median.items()},
        "seconds": median,
        "speedup_2_workers": median["dask_1x1"] / median["dask_2x1"],
        "labeling_span_s": span,  # the shards' own span: without the per-run start (the teacher sent to the workers)
        "span_speedup_2_workers": span["dask_1x1"] / span["dask_2x1"],
        "vs_process_2_threads": median["process_2"] / median["dask_2x1"],
        "machine_2_processes": median["plain_1x1"] / median["plain_2x1"],  # what 2 labelers get here at best
        "per_shard_s": per_shard,
        "overhead_per_shard_s": overhead,
        "estimate_rows_per_s": estimate,
        "wall_s": time.perf_counter() - started,
        "ddp": scale_ddp(),
    }


# One plain labeling process of one thread: loads MiniLM, says it is ready, waits for the start file, labels its texts.
_PLAIN_LABELER = """
import json, sys, time
from pathlib import Path
import torch
torch.set_num_threads(1)
from distill_core.modules import LoadedTeacher, TextClassifier, load_minilm
from distill_core.recipe import SoftLabelConfig
from distill_core.tasks.classification import teacher_logits
texts, go, labels = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2]), json.loads(sys.argv[3])
encoder, tokenizer = load_minilm()
torch.manual_seed(0)
teacher = LoadedTeacher(TextClassifier(encoder, tokenizer, labels).eval(), "t", "bench", "")
print("ready", flush=True)
while not go.exists():
    time.sleep(0.01)
teacher_logits(teacher, texts, SoftLabelConfig(batch_size=64, max_length=64))
"""


def _plain_processes(texts: list[str], labels: Any, processes: int, folder: Path) -> float:
    """Seconds for `processes` plain processes of one thread, started together once each has loaded the teacher, to
    label the texts between them (every processes-th text each): what this machine gives that many labelers."""
    import subprocess

    go = folder / "plain-go"
    go.unlink(missing_ok=True)
    children = []
    for i in range(processes):
        share = folder / f"plain-{processes}-{i}.json"
        share.write_text(json.dumps(texts[i::processes]))
        children.append(
            subprocess.Popen(  # noqa: S603 - this interpreter, the script above
                [sys.executable, "-c", _PLAIN_LABELER, str(share), str(go), json.dumps(list(labels))],
                stdout=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
            )
        )  # fmt: skip
    try:
        for child in children:
            assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        begin = time.perf_counter()
        go.touch()
        for child in children:
            assert child.wait() == 0
        return time.perf_counter() - begin
    finally:  # a child that died before its start leaves the others waiting for the start file
        for child in children:
            child.kill()


def _last_labeling_span() -> float:
    """Seconds from the first label-shard task's start to the last one's end, in the newest label-shards flow run."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        labeling = FlowFilter(name=FlowFilterName(any_=["label-shards"]))
        newest = client.read_flow_runs(flow_filter=labeling, sort=FlowRunSort.START_TIME_DESC, limit=1)[0]
        shards = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[newest.id])))
    return (max(t.end_time for t in shards) - min(t.start_time for t in shards)).total_seconds()


DDP_STEPS, DDP_REPEATS = 60, 3


def scale_ddp() -> dict[str, Any]:
    """Step time of one candidate's training (MiniLM's last layer as the student, batch 64, stored logits) in one
    process at 2 threads and at 1, against torchrun with 2 processes of 1 thread (train.distributed: the
    pipeline's own path), interleaved; the loop's own seconds (rank 0's, without torchrun's start) and the wall."""
    from distill_core.recipe import DistributedConfig
    from distill_core.train import TransferSet, train_student

    torch.manual_seed(0)
    home, _ = cold_home("scale-ddp")
    data = prepare_dataset(DataConfig(max_rows=SCALE_ROWS, augment_copies=0), home / "data")
    encoder, tokenizer = load_minilm()
    teacher = TextClassifier(encoder, tokenizer, data.labels).eval()
    frame, val = data.split("transfer"), data.split("validation")
    texts = frame["text"].tolist()
    signal = teacher_logits(LoadedTeacher(teacher, "t", "bench", ""), texts, SoftLabelConfig())
    transfer = TransferSet(texts, frame["label"].to_numpy(), signal)
    student_cfg = StudentConfig(name="minilm-1L", family="transformer", teacher_layers=[5])
    cfg = TrainConfig(
        losses=[LossTerm(function="forward_kl")], batch_size=64, max_steps=DDP_STEPS, eval_every=10**6, patience=100
    )
    layouts = {
        "process_2_threads": (cfg, 2),
        "process_1_thread": (cfg, 1),
        "ddp_2x1": (cfg.model_copy(update={"distributed": DistributedConfig(nproc=2)}), 1),
    }
    seconds: dict[str, list[float]] = {name: [] for name in layouts}
    wall: dict[str, list[float]] = {name: [] for name in layouts}
    for repeat in range(DDP_REPEATS + 1):  # the first round warms up and is not counted
        for name, (run_cfg, threads) in layouts.items():
            torch.manual_seed(0)
            student = build_student(student_cfg, teacher, data.labels, texts, 64, log=lambda _: None)
            torch.set_num_threads(threads)
            begin = time.perf_counter()
            result = train_student(
                student, student_cfg, run_cfg, transfer, (val["text"].tolist(), val["label"].to_numpy()),
                home / f"{name}-{repeat}", fingerprint=name, log=lambda _: None,
            )  # fmt: skip
            torch.set_num_threads(2)
            if repeat:
                seconds[name].append(result.seconds / result.steps)
                wall[name].append(time.perf_counter() - begin)
    step_ms = {name: statistics.median(v) * 1000 for name, v in seconds.items()}
    return {
        "steps": DDP_STEPS,
        "batch": 64,
        "step_ms": step_ms,
        "wall_s": {name: statistics.median(v) for name, v in wall.items()},
        "speedup_vs_1_thread": step_ms["process_1_thread"] / step_ms["ddp_2x1"],
        "speedup_vs_2_threads": step_ms["process_2_threads"] / step_ms["ddp_2x1"],
    }


def scale_estimate(per_shard: float, overhead: float) -> dict[str, dict[int, float]]:
    """Rows/s at 8, 32 and 128 workers from the measured seconds per shard (labeling, and the overhead beyond it),
    between two bounds: `parallel`, every worker pays its shards' overhead alongside the others (W shards every
    labeling + overhead seconds); `serial`, the whole overhead is paid in one line (the scheduler and the Prefect
    API see every task), so no more than one shard per overhead."""
    workers = (8, 32, 128)
    parallel = {w: SCALE_SHARD * w / (per_shard + overhead) for w in workers}
    return {"parallel": parallel, "serial": {w: min(parallel[w], SCALE_SHARD / overhead) for w in workers}}


def _scale_markdown(part: dict[str, Any]) -> list[str]:
    r = part["rows_per_s"]
    estimate = scale_estimate(part["per_shard_s"], part["overhead_per_shard_s"])  # keys read back from JSON
    return [
        f"## Scale-out: soft labels on Dask ({part['rows']} rows, {part['shards']} shards of {part['shard_rows']}, "
        f"MiniLM teacher, medians of {SCALE_REPEATS} interleaved runs)",
        "",
        "| labeling | rows/s | seconds |",
        "|---|---|---|",
        f"| Dask, 2 workers × 1 thread | {r['dask_2x1']:.0f} | {part['seconds']['dask_2x1']:.1f} |",
        f"| Dask, 1 worker × 1 thread | {r['dask_1x1']:.0f} | {part['seconds']['dask_1x1']:.1f} |",
        f"| one process, 1 thread | {r['process_1']:.0f} | {part['seconds']['process_1']:.1f} |",
        f"| one process, 2 threads | {r['process_2']:.0f} | {part['seconds']['process_2']:.1f} |",
        *(
            [
                f"| 2 plain processes × 1 thread | {r['plain_2x1']:.0f} | {part['seconds']['plain_2x1']:.1f} |",
                f"| 1 plain process × 1 thread | {r['plain_1x1']:.0f} | {part['seconds']['plain_1x1']:.1f} |",
            ]
            if "plain_2x1" in r
            else []
        ),
        "",
        f"2 workers against 1: **{part['speedup_2_workers']:.2f}×** over the whole run (goal ≥ 1.7×)"
        + (
            f", **{part['span_speedup_2_workers']:.2f}×** over the shards' own span (first shard's start to last "
            f"one's end: {part['labeling_span_s']['dask_2x1']:.1f} s against {part['labeling_span_s']['dask_1x1']:.1f}"
            " s; the rest of a run is its start, the teacher sent to each worker)"
            if "span_speedup_2_workers" in part
            else ""
        )
        + (
            f". Two plain labeling processes of one thread (no Dask, no Prefect), started together, label the same "
            f"rows {part['machine_2_processes']:.2f}× as fast as one: the most this machine gives two labelers"
            if "machine_2_processes" in part
            else ""
        )
        + f"; against one process on both cores: {part['vs_process_2_threads']:.2f}×. Overhead per shard "
        "(scheduling, the task run, the store, the run's start spread over its shards): "
        f"{part['overhead_per_shard_s'] * 1000:.0f} ms against {part['per_shard_s'] * 1000:.0f} ms of labeling. "
        "Estimated rows/s at more workers, between overhead paid alongside the labeling on every worker and "
        "overhead paid in one line by the scheduler and the Prefect API: "
        + ", ".join(
            f"{w} workers {estimate['serial'][w]:,.0f}–{estimate['parallel'][w]:,.0f}" for w in estimate["parallel"]
        )
        + ".",
        "",
        *_ddp_markdown(part.get("ddp")),
    ]


def _ddp_markdown(ddp: dict[str, Any] | None) -> list[str]:
    if not ddp:
        return []
    ms, wall = ddp["step_ms"], ddp["wall_s"]
    return [
        f"### Data-parallel training (torchrun, gloo; MiniLM-1L student, batch {ddp['batch']}, {ddp['steps']} steps, "
        f"medians of {DDP_REPEATS} interleaved runs)",
        "",
        "| training | ms per step | wall, s |",
        "|---|---|---|",
        f"| one process, 2 threads | {ms['process_2_threads']:.0f} | {wall['process_2_threads']:.1f} |",
        f"| one process, 1 thread | {ms['process_1_thread']:.0f} | {wall['process_1_thread']:.1f} |",
        f"| 2 processes × 1 thread (DDP) | {ms['ddp_2x1']:.0f} | {wall['ddp_2x1']:.1f} |",
        "",
        f"DDP against one process at 1 thread: {ddp['speedup_vs_1_thread']:.2f}×; at 2 threads: "
        f"{ddp['speedup_vs_2_threads']:.2f}× (wall includes torchrun's start).",
        "",
    ]


def _export_markdown(part: dict[str, Any]) -> list[str]:
    """The export section: each student's formats side by side, then int8 against torch fp32 and the goal."""
    lines = [
        "## Edge export: torch fp32 against ONNX fp32 and ONNX int8 (batch 1, one thread, interleaved)",
        "",
        "Goal: ONNX int8 at least 1.5x faster than torch fp32 at batch 1 and at least 3x smaller, for at most 0.5 "
        "points of accuracy (2% of perplexity).",
        "",
        "| student | format | size MB | p50 ms | p95 ms | quality | agreement with teacher |",
        "|---|---|---|---|---|---|---|",
    ]
    verdicts = []
    for task, measured in part.items():
        if not isinstance(measured, dict) or "students" not in measured:
            continue
        for name, s in measured["students"].items():
            formats = s["formats"]
            for fmt, f in formats.items():
                lines.append(
                    f"| {name} | {fmt} | {f['bytes'] / 1e6:.2f} | {f['p50_ms']:.3f} | {f['p95_ms']:.3f} | "
                    f"{measured['quality_name']} {abs(f['quality']):.4g} | {f['agreement']:.3f} |"
                )
            torch_fp32, int8 = formats["torch"], formats["onnx-int8"]
            faster, smaller = torch_fp32["p50_ms"] / int8["p50_ms"], torch_fp32["bytes"] / int8["bytes"]
            if task == "classification":
                change = f"accuracy {100 * (int8['quality'] - torch_fp32['quality']):+.2f} points"
                kept = torch_fp32["quality"] - int8["quality"] <= 0.005
            else:  # quality is -perplexity
                ratio = int8["quality"] / torch_fp32["quality"]
                change, kept = f"perplexity {100 * (ratio - 1):+.2f}%", ratio <= 1.02
            met = faster >= 1.5 and smaller >= 3 and kept
            verdicts.append(
                f"- **{name}**: int8 is {faster:.2f}x faster than torch fp32 (ONNX fp32 "
                f"{torch_fp32['p50_ms'] / formats['onnx']['p50_ms']:.2f}x), {smaller:.2f}x smaller, {change}; "
                f"{'meets' if met else 'misses'} the goal. fp32 parity with torch {s['parity']:.4%} of top-1 outputs, "
                f"max |logit difference| {s['max_logit_diff']:.2g}; export {s['export_s']:.1f} s."
            )
    times = ", ".join(
        f"{t} {m['wall_s'] / 60:.1f} min" for t, m in part.items() if isinstance(m, dict) and "wall_s" in m
    )
    return [*lines, "", *verdicts, "", f"Section time (train, label, export, measure): {times}.", ""]


def markdown(results: dict[str, object]) -> str:
    lines = [f"# Benchmark results ({results['when']}, {results['machine']})", ""]
    over = results.get("overheads")
    if isinstance(over, dict):
        sl = over["soft_labels"]
        lines += [
            "## Overheads against bare torch loops (medians of 7 interleaved repetitions)",
            "",
            "| measurement | ours | bare torch | ratio | goal |",
            "|---|---|---|---|---|",
            f"| soft-label throughput, MiniLM teacher, {sl['rows']} texts | {sl['ours_rows_per_s']:.0f} rows/s | "
            f"{sl['bare_rows_per_s']:.0f} rows/s | {sl['ratio']:.3f} | ≥ 0.9 |",
        ]
        for key, value in over.items():
            if key.startswith("train_step/"):
                lines.append(
                    f"| training step, {key.split('/')[1]}, batch 32 | {value['ours_ms_per_step']:.2f} ms | "
                    f"{value['bare_ms_per_step']:.2f} ms | {value['ratio']:.3f} | ≤ 1.1 |"
                )
        lines.append("")
    pipe = results.get("pipeline")
    if isinstance(pipe, dict):
        cold, rerun = pipe["cold"], pipe["rerun"]
        phases = ", ".join(f"{k} {v:.1f} s" for k, v in cold["phases"].items() if k != "total")
        lines += [
            "## The pipeline on the demo recipe (one teacher version, Prefect + MLflow + GX, in process)",
            "",
            "| measurement | value | goal |",
            "|---|---|---|",
            f"| cold run, wall | {cold['wall_s']:.1f} s (core work: {phases}) | |",
            f"| pipeline overhead (orchestration, registry, checks, logging) | {cold['overhead_s']:.1f} s = "
            f"{pipe['overhead_share']:.1%} of the run | ≤ 15% |",
            f"| rerun on the unchanged teacher (labels and students reused) | {rerun['wall_s']:.1f} s = "
            f"{pipe['rerun_share']:.1%} of the cold run | ≤ 20% |",
            "",
        ]
    story = results.get("demo")
    if isinstance(story, dict):
        v, gain = story["versions"], story["gain"]

        def points(g: dict[str, float]) -> str:
            return f"{g['mean'] * 100:+.1f} points (95% interval {g['low'] * 100:+.1f} to {g['high'] * 100:+.1f})"

        lines += [
            f"## The demo's story ({story['recipe']}: `distill demo` in process, {story['wall_s']:.0f} s)",
            "",
            f"Does the better teacher give a better student? Accuracy on the demo's test split "
            f"({story['test_rows']:,} reviews); the gain is v2 minus v1, paired bootstrap over those rows.",
            "",
            "| | v1 | v2 | gain |",
            "|---|---|---|---|",
            f"| teacher | {v['teacher v1']['accuracy']:.3f} | {v['teacher v2']['accuracy']:.3f} | "
            f"{points(gain['teacher'])} |",
            f"| registered student | {v['student v1']['accuracy']:.3f} ({v['student v1']['candidate']}) | "
            f"{v['student v2']['accuracy']:.3f} ({v['student v2']['candidate']}) | {points(gain['student'])} |",
            "",
            story["table"].strip(),
            "",
        ]
    qual = results.get("quality")
    if isinstance(qual, dict):
        lines += [
            f"## Distillation on Rotten Tomatoes ({qual['recipe']}, test split of {qual['dataset']['test']} "
            f"reviews, CPU batch-1 latency)",
            "",
            qual["table"].strip(),
            "",
            (
                "Teacher reused from an earlier bench run (--reuse-teacher); "
                if qual.get("teacher_reused")
                else f"Teacher training {qual['teacher_seconds']:.0f} s; "
            )
            + f"this run {qual['total_seconds']:.0f} s.",
            "",
        ]
    if isinstance(results.get("search"), dict):
        lines += _search_markdown(results["search"])  # type: ignore[arg-type]
    for key in ("modes", "lm-modes"):
        if isinstance(results.get(key), dict):
            lines += _modes_markdown(results[key])
    lm_part = results.get("lm")
    if isinstance(lm_part, dict):
        lab, step, sig = lm_part["labeling"], lm_part["train_step"], lm_part["signal"]
        q = lm_part["quality"]
        lines += [
            f"## Causal LM: SmolLM2-135M-Instruct → the LM demo's student ({lm_part['recipe']}, "
            f"{lm_part['tokens']['transfer']:,} transfer tokens, test {lm_part['tokens']['test']:,} tokens)",
            "",
            "| measurement | ours | reference | ratio | goal |",
            "|---|---|---|---|---|",
            *(
                f"| stored signal, {name} | {v['bytes_per_token']:.0f} B/token | dense fp32 logits "
                f"{4 * 49152:,} B/token | {v['share_of_dense_fp32']:.3%} | ≤ 1% |"
                for name, v in sig.items()
            ),
            f"| labeling, {lab['tokens']:,} tokens | {lab['ours_tokens_per_s']:.0f} tokens/s | bare teacher forward "
            f"{lab['bare_tokens_per_s']:.0f} tokens/s | {lab['ratio']:.3f} | ≥ 0.9 |",
            f"| training step, 8 blocks of 128 | {step['ours_ms_per_step']:.0f} ms | bare torch loop "
            f"{step['bare_ms_per_step']:.0f} ms | {step['ratio']:.3f} | ≤ 1.1 |",
            *(
                [
                    f"| online training step, teacher logits in chunks of positions | {on['ours_ms_per_step']:.0f} ms, "
                    f"+{on['ours_step_rss_mb']:.0f} MB RSS | full [B, T, vocab] teacher logits "
                    f"{on['full_ms_per_step']:.0f} ms, +{on['full_step_rss_mb']:.0f} MB | "
                    f"{on['ratio']:.3f} | memory below the full path's |"
                ]
                if (on := lm_part.get("online_step"))
                else []
            ),
            "",
            q["table"].strip(),
            "",
            "Peak resident memory: labeling "
            + ", ".join(f"{name} {v['peak_rss_mb']:.0f} MB" for name, v in sig.items())
            + "; training "
            + ", ".join(f"{name} {v:.0f} MB" for name, v in q["train_peak_rss_mb"].items())
            + ". Training time: "
            + ", ".join(f"{name} {v:.0f} s" for name, v in q["train_seconds"].items())
            + ".",
            "",
        ]
    exported = results.get("export")
    if isinstance(exported, dict):
        lines += _export_markdown(exported)
    scaled = results.get("scale")
    if isinstance(scaled, dict):
        lines += _scale_markdown(scaled)
    trig = results.get("trigger")
    if isinstance(trig, dict) and "webhook" in trig:
        hook, watch = trig["webhook"], trig["watcher"]
        lines += [
            "## Teacher registered → its flow run (tests/stack.py topology: PostgreSQL-backed MLflow and Prefect "
            f"servers, S3, process worker polling every 1 s, receiver; measured {trig['when']})",
            "",
            "| path | samples | median to queued | median to running | slowest to running | goal |",
            "|---|---|---|---|---|---|",
            f"| MLflow webhook → receiver → deployment | {hook['n']} | {hook['median_queued_s']:.2f} s | "
            f"{hook['median_running_s']:.2f} s | {hook['max_running_s']:.2f} s | ≤ 5 s median |",
            f"| webhook off: scheduled watch-teachers every {watch['interval_s']} s | {watch['n']} | "
            f"{watch['median_queued_s']:.2f} s | {watch['median_running_s']:.2f} s | {watch['max_running_s']:.2f} s | "
            f"≤ interval + the webhook path |",
            "",
            f"Each run (toy teacher, one bag student) then took {hook['median_run_s']:.1f} s (median).",
            "",
        ]
    return "\n".join(lines)


def previous_results() -> str:
    return (HERE / "results.json").read_text() if (HERE / "results.json").exists() else "{}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--only",
        choices=(
            "overheads",
            "demo",
            "pipeline",
            "quality",
            *(f"{task}{part}" for task in ("modes", "lm-modes") for part in ("", *(f"-{p}" for p in MODES_PARTS))),
            "trigger",
            "lm",
            "lm-overheads",
            "search",
            "export",
            "scale",
            "scale-ddp",
        ),
        action="append",
        help="run only these parts (repeatable); the others keep their previous results",
    )
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "bench.yaml")
    parser.add_argument(
        "--reuse-teacher",
        action="store_true",
        help="quality: keep the teacher an earlier run trained (labels and students are redone)",
    )
    args = parser.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    results: dict[str, object] = {
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads",
        "python": sys.version.split()[0],
    }
    parts = args.only or [
        "overheads", "demo", "pipeline", "quality", "search", "modes", "trigger", "lm", "lm-modes", "export", "scale"
    ]  # fmt: skip
    if "overheads" in parts:
        results["overheads"] = overheads()
        print(json.dumps(results["overheads"], indent=2))
    if "demo" in parts:
        results["demo"] = demo()
        print(json.dumps(results["demo"]["gain"], indent=2))
    if "pipeline" in parts:
        results["pipeline"] = pipeline()
        print(json.dumps(results["pipeline"], indent=2, default=float))
    if "quality" in parts:
        results["quality"] = quality(args.recipe.resolve(), args.reuse_teacher)
    if "search" in parts:
        results["search"] = search()
        print(json.dumps(results["search"]["summary"], indent=2))
    for task, spec in modes_tasks(args.recipe.resolve()).items():  # modes, lm-modes (and their -stages, ...)
        mode_parts = (
            MODES_PARTS
            if task in parts
            else tuple(p.removeprefix(f"{task}-") for p in parts if p.startswith(f"{task}-"))
        )
        if mode_parts:
            old = json.loads((HERE / "results.json").read_text()) if (HERE / "results.json").exists() else {}
            results[task] = {**old.get(task, {}), **modes(spec, mode_parts)}
    if "lm" in parts:
        results["lm"] = lm()
    elif "lm-overheads" in parts:  # signal size, labeling and training step only (about 6 minutes)
        old_lm = (
            json.loads((HERE / "results.json").read_text()).get("lm", {}) if (HERE / "results.json").exists() else {}
        )
        results["lm"] = {**old_lm, **lm(quality=False)}
    if "export" in parts:
        results["export"] = export()
    if "scale" in parts:
        results["scale"] = scale()
        print(json.dumps(results["scale"], indent=2, default=float))
    elif "scale-ddp" in parts:  # the training part alone (about 3 minutes)
        old_scale = json.loads(previous_results()).get("scale", {})
        results["scale"] = {**old_scale, "ddp": scale_ddp()}
        print(json.dumps(results["scale"]["ddp"], indent=2, default=float))
    if "trigger" in parts:
        measured = trigger()
        if "skipped" in measured:  # no PostgreSQL here: keep the previous numbers
            print(f"trigger latency not measured: {measured['skipped']}")
        else:
            results["trigger"] = measured
            print(json.dumps(measured, indent=2, default=float))
    previous = HERE / "results.json"
    if previous.exists():  # keep the part not rerun
        old = json.loads(previous.read_text())
        for key in (
            "overheads",
            "demo",
            "pipeline",
            "quality",
            "search",
            "modes",
            "trigger",
            "lm",
            "lm-modes",
            "export",
            "scale",
        ):
            if key not in results and key in old:
                results[key] = old[key]
    previous.write_text(json.dumps(results, indent=2, default=float))
    (HERE / "results.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
