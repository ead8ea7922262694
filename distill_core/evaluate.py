"""Measure a model: quality, fidelity to the teacher, calibration, CPU latency and size."""

from __future__ import annotations

import dataclasses
import io
import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from distill_core.modules import TextModule, device_of, length_batches, placed


@torch.inference_mode()
def predict(model: TextModule, texts: list[str], batch_size: int = 128, max_length: int | None = None) -> np.ndarray:
    """Logits for every text, in order (batched by length for speed)."""
    model.eval()
    out, device = np.zeros((len(texts), len(model.labels)), dtype=np.float32), device_of(model)
    for batch in length_batches(texts, batch_size):
        inputs = placed(model.tokenize([texts[i] for i in batch], max_length), device)  # where the model is
        out[batch] = model(**inputs).float().cpu().numpy()
    return out


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(1) == labels).mean())


def macro_f1(logits: np.ndarray, labels: np.ndarray) -> float:
    pred, scores = logits.argmax(1), []
    for c in range(logits.shape[1]):
        tp = np.sum((pred == c) & (labels == c))
        fp, fn = np.sum((pred == c) & (labels != c)), np.sum((pred != c) & (labels == c))
        scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores))


def agreement(student_logits: np.ndarray, teacher_logits: np.ndarray) -> float:
    """Share of rows where student and teacher pick the same class."""
    return float((student_logits.argmax(1) == teacher_logits.argmax(1)).mean())


def mean_kl(teacher_logits: np.ndarray, student_logits: np.ndarray) -> float:
    """Mean KL(teacher ‖ student) at temperature 1, in nats."""
    p, q = _softmax(teacher_logits.astype(np.float64)), _softmax(student_logits.astype(np.float64))
    return float(np.mean(np.sum(p * (np.log(p + 1e-12) - np.log(q + 1e-12)), axis=1)))


def reliability(logits: np.ndarray, labels: np.ndarray, bins: int = 10) -> list[dict[str, float]]:
    """Per confidence bin: mean confidence, accuracy and row count (for a reliability diagram)."""
    probs = _softmax(logits.astype(np.float64))
    confidence, correct = probs.max(1), probs.argmax(1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    rows = []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        inside = (confidence > lo) & (confidence <= hi)
        if inside.any():
            rows.append(
                {
                    "lo": float(lo),
                    "hi": float(hi),
                    "confidence": float(confidence[inside].mean()),
                    "accuracy": float(correct[inside].mean()),
                    "count": int(inside.sum()),
                }
            )
    return rows


def expected_calibration_error(logits: np.ndarray, labels: np.ndarray, bins: int = 10) -> float:
    """ECE: the count-weighted gap between confidence and accuracy over equal-width confidence bins."""
    n = len(labels)
    return float(sum(r["count"] / n * abs(r["accuracy"] - r["confidence"]) for r in reliability(logits, labels, bins)))


@dataclass
class Speed:
    """Latency at batch 1 (tokenisation included), throughput at a larger batch, and the conditions measured in."""

    p50_ms: float
    p95_ms: float
    throughput: float  # texts per second at the throughput batch size
    threads: int = 1  # torch's intra-op threads during the measurement
    load_average: float = 0.0  # the machine's 1-minute load average when it was taken
    under_load: bool = False  # more tasks than cores were runnable, even after one repeat: absolute times inflated

    def report_fields(self) -> dict[str, Any]:
        """The fields every report takes from its speed measurement."""
        return asdict(self)


def _interleaved(models: dict[str, TextModule], texts: list[str], batch: int) -> dict[str, Speed]:
    timings: dict[str, list[float]] = {name: [] for name in models}
    names = list(models)
    for text in texts[:5]:  # warm-up: first calls allocate and pick kernels
        for model in models.values():
            model(**model.tokenize([text]))
    for i, text in enumerate(texts):
        for name in names[i % len(names) :] + names[: i % len(names)]:  # rotate who goes first
            model = models[name]
            start = time.perf_counter()
            model(**model.tokenize([text]))
            timings[name].append((time.perf_counter() - start) * 1000)
    rounds: dict[str, list[float]] = {name: [] for name in models}
    chunk = (texts * (1 + batch // max(len(texts), 1)))[:batch]
    for _ in range(3):
        for name, model in models.items():
            start = time.perf_counter()
            model(**model.tokenize(chunk))
            rounds[name].append(batch / (time.perf_counter() - start))
    speeds = {}
    for name, times in timings.items():
        times.sort()
        speeds[name] = Speed(
            statistics.median(times), times[int(0.95 * (len(times) - 1))], statistics.median(rounds[name])
        )
    return speeds


def machine_load() -> float:
    """How many other runnable tasks compete for the cores now (/proc/loadavg's runnable count, less this
    process's torch threads); the 1-minute load average where that is not available. The average lags: it
    misses a load that just started and still shows one that just ended."""
    try:
        runnable = int(Path("/proc/loadavg").read_text().split()[3].split("/")[0])
    except (OSError, ValueError, IndexError):
        return os.getloadavg()[0]
    return float(max(runnable - torch.get_num_threads(), 0))


@torch.inference_mode()
def measure_latency(
    models: dict[str, TextModule], texts: list[str], samples: int = 100, batch: int = 64
) -> dict[str, Speed]:
    """The project's one latency measurement: every model side by side, repetitions interleaved (in rotating
    order), after a warm-up, at one thread count, medians. Ratios between the models move far less than absolute
    times on a busy machine; absolute times come with the thread count and load average, and a measurement taken
    while more tasks than cores competed (machine_load) is repeated once, then marked `under_load`."""
    for model in models.values():
        model.eval()
    texts = (texts * (1 + samples // max(len(texts), 1)))[:samples]
    cores, threads = os.cpu_count() or 1, torch.get_num_threads()
    for _attempt in range(2):
        before = machine_load()
        speeds = _interleaved(models, texts, batch)
        competing = max(before, machine_load())
        if competing <= cores:
            break
    average = os.getloadavg()[0]
    return {
        name: dataclasses.replace(speed, threads=threads, load_average=average, under_load=competing > cores)
        for name, speed in speeds.items()
    }


def size_of(model: nn.Module | Any) -> dict[str, int]:
    """Parameter count and serialized weight bytes (an exported student's: its file's)."""
    if not isinstance(model, nn.Module):  # export.OnnxStudent
        return {"params": int(model.params), "bytes": int(model.size_bytes())}
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return {"params": sum(p.numel() for p in model.parameters()), "bytes": buffer.getbuffer().nbytes}


class ModelReport(Protocol):
    """What every task's report has: the model's size and speed, against the teacher's, and a dict form. Each task
    has its report class (a classifier's Report; a causal LM's LMReport) with its quality fields besides."""

    name: str
    p50_ms: float
    p95_ms: float
    throughput: float
    params: int
    bytes: int
    threads: int
    load_average: float
    under_load: bool
    compression: float
    speedup: float

    def as_dict(self) -> dict[str, float | int | str]: ...


class AsDict:
    """as_dict for a report dataclass."""

    def as_dict(self) -> dict[str, float | int | str]:
        return asdict(self)  # type: ignore[call-overload]


@dataclass
class Report(AsDict):
    """Everything measured about one model on the test split."""

    name: str
    accuracy: float
    macro_f1: float
    agreement: float
    kl_to_teacher: float
    ece: float
    p50_ms: float
    p95_ms: float
    throughput: float
    params: int
    bytes: int
    threads: int = 1  # torch threads the latencies were measured with
    load_average: float = 0.0  # the machine's load average then
    under_load: bool = False  # more tasks than cores were runnable: absolute latencies are inflated
    compression: float = 1.0  # teacher params / params
    speedup: float = 1.0  # teacher p50 / p50
    retention: float = 1.0  # accuracy / teacher accuracy


def evaluate_model(
    name: str,
    model: TextModule,
    texts: list[str],
    labels: np.ndarray,
    teacher_logits: np.ndarray,
    logits: np.ndarray | None = None,
    latency_samples: int = 100,
    throughput_batch: int = 64,
    speed: Speed | None = None,
) -> Report:
    """Quality, fidelity, calibration, speed and size of one model on labeled texts (speed: measured with others
    by measure_latency, else here alone)."""
    logits = predict(model, texts) if logits is None else logits
    if speed is None:
        speed = measure_latency({name: model}, texts, latency_samples, throughput_batch)[name]
    size = size_of(model)
    return Report(
        name=name,
        accuracy=accuracy(logits, labels),
        macro_f1=macro_f1(logits, labels),
        agreement=agreement(logits, teacher_logits),
        kl_to_teacher=mean_kl(teacher_logits, logits),
        ece=expected_calibration_error(logits, labels),
        params=size["params"],
        bytes=size["bytes"],
        **speed.report_fields(),
    )


def relative_to(report: Report, teacher: Report) -> Report:
    """Fill in compression, speed-up and accuracy retention against the teacher's report."""
    report.compression = teacher.params / max(report.params, 1)
    report.speedup = teacher.p50_ms / max(report.p50_ms, 1e-9)
    report.retention = report.accuracy / max(teacher.accuracy, 1e-9)
    return report


# The one vocabulary of what is measured: a report field's name is its column in every table, its MLflow metric
# (`<kind>.test_<field>`), its registry tag (`distill.<field>`), its key in metrics.json and `distill status`, and
# the word the README uses. This says how a person reads each; tags and metrics keep full precision (gates and
# champion comparisons read them), only text is rounded.
FORMATS: dict[str, str] = {
    "name": "{}",
    "accuracy": "{:.3f}",  # share of test rows right
    "teacher_accuracy": "{:.3f}",
    "macro_f1": "{:.3f}",
    "retention": "{:.1%}",  # accuracy / the teacher's
    "agreement": "{:.3f}",  # share of rows (tokens) where student and teacher agree on the top-1
    "kl_to_teacher": "{:.3f}",
    "ece": "{:.3f}",
    "params": "{:,}",
    "bytes": "{:,}",  # the serialized weights (an exported student: its ONNX file)
    "compression": "{:.1f}x",  # the teacher's params / the student's
    "p50_ms": "{:.2f}",  # batch-1 latency (per generated token for a causal LM)
    "p95_ms": "{:.2f}",
    "speedup": "{:.1f}x",  # the teacher's p50 / the student's, measured side by side
    "throughput": "{:,.0f}",  # rows (tokens) per second
    "perplexity": "{:.2f}",
    "teacher_perplexity": "{:.2f}",
    "perplexity_ratio": "{:.2f}",  # perplexity / the teacher's
    "gap_closed": "{:.1%}",  # (twin - student) / (twin - teacher), in perplexity
}
COLUMNS = (
    "name",
    "accuracy",
    "macro_f1",
    "retention",
    "agreement",
    "kl_to_teacher",
    "ece",
    "params",
    "compression",
    "p50_ms",
    "p95_ms",
    "speedup",
    "throughput",
)


def readable(field: str, value: object) -> str:
    """A measured value as a person reads it (a tag's full-precision text too); what is not a number stays."""
    if isinstance(value, str):
        try:
            value = int(value) if field == "params" else float(value)
        except ValueError:
            return str(value)
    try:
        return FORMATS.get(field, "{}").format(value)
    except (TypeError, ValueError):
        return str(value)


def tag_value(value: object) -> str:
    """A measured value as a registry tag: full precision (repr of the float), an int as it is."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return repr(float(value)) if isinstance(value, float) else str(value)


def comparison_table(reports: Sequence[ModelReport], columns: Sequence[str] = COLUMNS) -> str:
    """A markdown table of reports, teacher first: one column per report field, headed by its name."""
    header = "| " + " | ".join(columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    rows = ["| " + " | ".join(readable(field, getattr(r, field)) for field in columns) + " |" for r in reports]
    return "\n".join([header, rule, *rows])
