"""Each candidate as it will run: exported to ONNX (fp32 and int8), checked against its torch self on the test split,
and measured in every format side by side; the gates then read the recipe's deploy target.

A candidate whose fp32 export disagrees with it beyond deploy.min_parity or deploy.max_logit_diff (or that did not
export at all) cannot ship: its `problem` says why, the gates fail it, and it is never registered.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distill_core.evaluate import ModelReport, comparison_table, readable
from distill_core.export import ONNX_FORMATS, ExportError, OnnxStudent, export
from distill_core.modules import TextModule, torch_threads
from distill_core.recipe import Recipe
from distill_core.tasks import Task

TORCH = "torch"


@dataclass
class Deployment:
    """What a candidate's export measured; `reports` by format (torch, onnx, onnx-int8), side by side."""

    candidate: str
    format: str  # the recipe's deploy target, whose report the gates read
    threads: int | None
    folder: Path | None = None  # the exported folder (None: the export failed)
    parity: float = 0.0  # share of test rows (next tokens) where the fp32 export's top-1 is the torch student's
    max_logit_diff: float = float("inf")  # the largest |logit difference| between the two on the test split
    reports: dict[str, ModelReport] = field(default_factory=dict)
    problem: str | None = None  # why the export cannot ship; the candidate is then not registered

    def target(self) -> ModelReport:
        """The deploy format's report (an export that failed has the torch one alone)."""
        return self.reports.get(self.format, self.reports[TORCH])

    def tags(self) -> dict[str, str]:
        """What a registered student version says of its export (distill.<field>)."""
        return {
            "deploy_format": self.format,
            "deploy_threads": str(self.threads or "default"),
            "onnx_parity": repr(self.parity),
            "onnx_max_logit_diff": repr(self.max_logit_diff),
        }

    def table(self, task: Task) -> str:
        """Torch fp32, ONNX fp32 and ONNX int8 side by side: size, latency, quality, agreement with the teacher."""
        rows = [
            dataclasses.replace(r, name=f"{self.candidate} [{fmt}]")  # type: ignore[type-var]
            for fmt, r in self.reports.items()
        ]
        columns = ("name", task.quality_name, "agreement", "bytes", "p50_ms", "p95_ms", "speedup")
        said = (
            f"ONNX fp32 agrees with the torch student on {readable('agreement', self.parity)} of the test split's "
            f"top-1 outputs, max |logit difference| {self.max_logit_diff:.2g}"
        )
        threads = f"{self.threads} thread{'s' if self.threads != 1 else ''}" if self.threads else "default threads"
        head = f"Deployment of {self.candidate} (deploy.format {self.format}, batch 1, {threads}): {said}."
        problem = f"\n\n**Not shipped:** {self.problem}" if self.problem else ""
        return head + "\n\n" + comparison_table(rows, columns) + problem


def deploy_candidate(
    recipe: Recipe,
    task: Task,
    name: str,
    student: TextModule,
    report: ModelReport,
    teacher: tuple[str, TextModule, ModelReport],
    test: tuple[Any, Any, Any],
    folder: Path,
    twin: ModelReport | None = None,
) -> Deployment:
    """Export `student` (its torch report `report`) into `folder`, check its parity on the test split (inputs,
    targets, teacher signal), and measure torch, ONNX and ONNX int8 beside the teacher at deploy.threads."""
    cfg = recipe.deploy
    deployment = Deployment(name, cfg.format, cfg.threads, reports={TORCH: report})
    inputs, targets, signal = test
    try:
        examples = task.input_example(student, inputs).iloc[:, 0].tolist()
        deployment.folder = export(student, folder, examples)
    except ExportError as err:
        deployment.problem = str(err)
        return deployment
    params = int(report.params)
    runners = {fmt: OnnxStudent(deployment.folder, fmt, cfg.threads, params) for fmt in ONNX_FORMATS}
    deployment.parity, deployment.max_logit_diff = task.parity(student, runners["onnx"], inputs)
    if deployment.parity < cfg.min_parity or deployment.max_logit_diff > cfg.max_logit_diff:
        deployment.problem = (
            f"the ONNX export of {name} diverges from the torch student on the test split: top-1 agreement "
            f"{deployment.parity:.4%} (deploy.min_parity {cfg.min_parity:.1%}), max |logit difference| "
            f"{deployment.max_logit_diff:.3g} (deploy.max_logit_diff {cfg.max_logit_diff:.3g}); not registered"
        )
    teacher_name, teacher_module, teacher_report = teacher
    models: dict[str, Any] = {teacher_name: teacher_module, TORCH: student, **runners}
    with torch_threads(cfg.threads):
        speeds = task.measure_speed(models, inputs, recipe.evaluation)
    paired = dataclasses.replace(teacher_report, p50_ms=speeds[teacher_name].p50_ms)  # type: ignore[type-var]
    timed = dataclasses.replace(report, **speeds[TORCH].report_fields())  # type: ignore[type-var]
    deployment.reports[TORCH] = task.relative_to(timed, paired, twin)
    for fmt, runner in runners.items():
        measured = task.evaluate(report.name, runner, inputs, targets, signal, speeds[fmt])  # type: ignore[arg-type]
        deployment.reports[fmt] = task.relative_to(measured, paired, twin)
    return deployment
