"""Metric gates: recipe thresholds to a verdict with reasons, and the choice of the smallest passing student."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from distill_core.evaluate import ModelReport, Report
from distill_core.recipe import GateConfig


@dataclass
class Verdict:
    """Whether a candidate passed every gate, and why not."""

    candidate: str
    report: ModelReport
    reasons: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.reasons


def size_and_latency(
    params: int, size_bytes: int, p95_ms: float, teacher_params: int, gates: Any, latency: str = "p95 latency ms"
) -> list[tuple[str, float, float | None]]:
    """The gates that depend on a student's architecture alone, as (what, value, upper bound) — every task's gates
    have them; a search checks them before training, the judges after."""
    return [
        (latency, p95_ms, gates.max_p95_ms),
        ("parameter ratio", params / max(teacher_params, 1), gates.max_param_ratio),
        ("size MB", size_bytes / 1e6, gates.max_size_mb),
        ("parameters", params, gates.max_params),
    ]


def exceeded(bounds: list[tuple[str, float, float | None]]) -> list[str]:
    """The reasons of the upper bounds a value exceeds."""
    return [f"{what} {value:.4g} > {bound:.4g}" for what, value, bound in bounds if bound is not None and value > bound]


def judge(candidate: str, report: Report, teacher: Report, gates: GateConfig, champion: Report | None) -> Verdict:
    """Check one evaluated student against the recipe's thresholds and, when there is one, the champion."""
    reasons = []

    def at_least(name: str, value: float, bound: float | None) -> None:
        if bound is not None and value < bound:
            reasons.append(f"{name} {value:.4f} < {bound:.4f}")

    at_least("accuracy", report.accuracy, gates.min_accuracy)
    at_least("retention of teacher accuracy", report.accuracy / max(teacher.accuracy, 1e-9), gates.min_retention)
    at_least("agreement with teacher", report.agreement, gates.min_agreement)
    latency = "p95 latency ms"
    if report.under_load:  # the verdict stands, but a person should know the machine was busy
        latency += f" (measured under load: load average {report.load_average:.1f} on {os.cpu_count()} cores)"
    reasons += exceeded(size_and_latency(report.params, report.bytes, report.p95_ms, teacher.params, gates, latency))
    if champion is not None and report.accuracy < champion.accuracy - gates.max_regression:
        reasons.append(
            f"accuracy {report.accuracy:.4f} regresses from the champion's {champion.accuracy:.4f} "
            f"by more than {gates.max_regression:.4f}"
        )
    return Verdict(candidate, report, reasons)


def _accuracy(report: ModelReport) -> float:
    assert isinstance(report, Report)
    return report.accuracy


def choose(verdicts: list[Verdict], quality: Callable[[ModelReport], float] = _accuracy) -> Verdict:
    """The smallest passing candidate (ties: the best quality, by default accuracy); with none passing, the
    best failure."""
    passing = [v for v in verdicts if v.passed]
    if passing:
        return min(passing, key=lambda v: (v.report.params, -quality(v.report)))
    return max(verdicts, key=lambda v: quality(v.report))


def beats(candidate: Report, champion: Report | None) -> bool:
    """Promotion needs strictly better accuracy than the champion on today's test split (or no champion)."""
    return champion is None or candidate.accuracy > champion.accuracy
