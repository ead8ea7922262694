"""Evaluation metrics against values worked out by hand; latency measured side by side."""

import os
import time

import numpy as np
import pytest
import torch
from toy_models import BagTeacher, WordHashTokenizer

from distill_core import evaluate
from distill_core.evaluate import (
    COLUMNS,
    Report,
    accuracy,
    agreement,
    comparison_table,
    evaluate_model,
    expected_calibration_error,
    macro_f1,
    mean_kl,
    measure_latency,
    relative_to,
)
from distill_core.gates import judge
from distill_core.modules import WrappedTeacher
from distill_core.recipe import GateConfig

LABELS = np.array([0, 0, 1, 1])
LOGITS = np.array([[2.0, 0.0], [0.0, 1.0], [0.0, 3.0], [1.0, 0.0]])  # predictions 0, 1, 1, 0


def test_accuracy_f1_and_agreement():
    assert accuracy(LOGITS, LABELS) == 0.5
    assert macro_f1(LOGITS, LABELS) == pytest.approx(0.5)  # each class: tp 1, fp 1, fn 1
    assert agreement(LOGITS, LOGITS[[0, 0, 2, 3]]) == 0.75


def test_kl_is_zero_for_identical_and_matches_the_formula():
    assert mean_kl(LOGITS, LOGITS) == pytest.approx(0.0, abs=1e-9)
    p, q = np.array([[0.5, 0.5]]), np.array([[0.9, 0.1]])
    expected = 0.5 * np.log(0.5 / 0.9) + 0.5 * np.log(0.5 / 0.1)
    assert mean_kl(np.log(p), np.log(q)) == pytest.approx(expected)


def test_ece_zero_when_confidence_matches_accuracy():
    # two rows at confidence 0.75, one of two... use 4 rows at 0.75 confidence with 3 correct
    logits = np.log(np.array([[0.75, 0.25]] * 4))
    assert expected_calibration_error(logits, np.array([0, 0, 0, 1])) == pytest.approx(0.0, abs=1e-9)
    assert expected_calibration_error(logits, np.array([1, 1, 1, 1])) == pytest.approx(0.75)


def test_report_measures_speed_and_size_and_relates_to_teacher():
    model = WrappedTeacher(BagTeacher(), WordHashTokenizer(), labels=("neg", "pos"))
    texts = ["a fine film", "dull", "moving and funny", "too long"]
    report = evaluate_model("bag", model, texts, LABELS, LOGITS, latency_samples=5, throughput_batch=4)
    assert report.params == 512 * 8 + 8 * 2 + 2
    assert report.bytes > 4 * report.params and report.p95_ms >= report.p50_ms > 0 and report.throughput > 0
    teacher = Report("t", 0.8, 0.8, 1, 0, 0, p50_ms=10.0, p95_ms=12, throughput=10, params=100_000, bytes=1)
    related = relative_to(report, teacher)
    assert related.compression == pytest.approx(100_000 / report.params)
    assert related.speedup == pytest.approx(10.0 / report.p50_ms)
    assert related.retention == pytest.approx(report.accuracy / 0.8)
    table = comparison_table([teacher, related])
    assert table.splitlines()[0] == "| " + " | ".join(COLUMNS) + " |" and "| bag |" in table
    assert f"| {related.retention:.1%} |" in table and "| 100,000 |" in table  # what a person reads is rounded


def test_a_tag_keeps_full_precision_and_reads_back_rounded_as_the_one_format_says():
    value = 0.8859416445623343
    assert float(evaluate.tag_value(value)) == value and evaluate.tag_value(1049106) == "1049106"
    assert evaluate.readable("accuracy", evaluate.tag_value(value)) == evaluate.FORMATS["accuracy"].format(value)
    assert evaluate.readable("retention", "0.97") == "97.0%" and evaluate.readable("params", "1049106") == "1,049,106"
    assert evaluate.readable("accuracy", "0.7480") == "0.748"  # a tag an earlier release wrote (4 digits) still reads
    assert set(COLUMNS) <= set(evaluate.FORMATS)


class _Slow(WrappedTeacher):
    """The same model, slower by a fixed sleep per call: what a bigger teacher is to its student."""

    def forward(self, **batch):
        time.sleep(0.002)
        return super().forward(**batch)


def test_latency_is_measured_side_by_side_with_the_conditions_it_was_measured_in(monkeypatch):
    fast = WrappedTeacher(BagTeacher(), WordHashTokenizer(), labels=("neg", "pos"))
    slow = _Slow(BagTeacher(), WordHashTokenizer(), labels=("neg", "pos"))
    order: list[str] = []
    for name, model in (("fast", fast), ("slow", slow)):
        model.register_forward_pre_hook(lambda *_, name=name: order.append(name))
    speeds = measure_latency({"fast": fast, "slow": slow}, ["a fine film", "dull"], samples=20, batch=4)
    assert speeds["slow"].p50_ms > speeds["fast"].p50_ms + 1.5
    assert {s.threads for s in speeds.values()} == {torch.get_num_threads()}
    assert not speeds["fast"].under_load or speeds["fast"].load_average > os.cpu_count()
    timed = order[10 : 10 + 40]  # after the warm-up: the two alternate, in turns
    assert timed.count("fast") == timed.count("slow") == 20 and timed[:4] == ["fast", "slow", "slow", "fast"]


def test_a_measurement_under_load_is_repeated_then_marked(monkeypatch):
    loads = iter([(64.0,)] * 4)  # before and after each of the two attempts
    calls: list[int] = []
    monkeypatch.setattr(evaluate, "machine_load", lambda: (calls.append(1), next(loads))[1][0])
    monkeypatch.setattr(os, "getloadavg", lambda: (64.0, 0.0, 0.0))
    model = WrappedTeacher(BagTeacher(), WordHashTokenizer(), labels=("neg", "pos"))
    (speed,) = measure_latency({"m": model}, ["a fine film"], samples=5, batch=2).values()
    assert len(calls) == 4 and speed.under_load and speed.load_average == 64.0
    gates = GateConfig(max_p95_ms=1e-9, min_retention=None, max_param_ratio=None)
    report = Report("m", 0.8, 0.8, 1, 0, 0, 1.0, 2.0, 10, 10, 40, under_load=True, load_average=64.0)
    (reason,) = judge("m", report, report, gates, None).reasons
    assert reason.startswith("p95 latency ms (measured under load: load average 64.0 on")
