"""Figures for a distillation run: training curves, teacher vs student calibration, size against quality.

Each function builds a `matplotlib.figure.Figure` on the Agg canvas (no pyplot, no global figure state,
nothing shown), ready for `mlflow.log_figure(fig, "plots/<name>.png")`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from distill_core.evaluate import expected_calibration_error, reliability

PASSED_STYLE = {"marker": "o", "color": "tab:green", "label": "passed gates"}
FAILED_STYLE = {"marker": "X", "color": "tab:red", "label": "failed gates"}
TWIN_STYLE = {"marker": "o", "s": 50, "facecolors": "none", "edgecolors": "tab:grey", "label": "hard-label twin"}
CHOSEN_STYLE = {"marker": "o", "s": 260, "facecolors": "none", "edgecolors": "black", "linewidths": 1.5,
                "label": "chosen", "zorder": 4}  # fmt: skip


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def training_curves(
    histories: dict[str, list[dict[str, float]]], metric: str = "val_accuracy", title: str | None = None
) -> Figure:
    """The validation metric (the task's early-stopping one) of every run on one axis, then each run's training
    loss on an axis of its own: a distilled student and its hard-label twin minimise different objectives, whose
    values are not comparable.

    `histories` maps a run's name (e.g. "minilm (distilled)") to its `TrainResult.history`."""
    fig = _figure(4.5 * (1 + max(len(histories), 1)), 4)
    metric_ax, *loss_axes = fig.subplots(1, 1 + max(len(histories), 1), sharex=True)
    name = metric.removeprefix("val_").replace("_", " ")
    for (run, history), loss_ax in zip(histories.items(), loss_axes, strict=False):
        rows = sorted(history, key=lambda row: row["step"])
        (line,) = metric_ax.plot([r["step"] for r in rows], [r[metric] for r in rows], marker=".", label=run)
        with_loss = [r for r in rows if "loss" in r]
        loss_ax.plot([r["step"] for r in with_loss], [r["loss"] for r in with_loss], marker=".", color=line.get_color())
        loss_ax.set(title=f"{run}: training loss", xlabel="step", ylabel="loss (last batch before each evaluation)")
    metric_ax.set(title=f"validation {name}", xlabel="step", ylabel=name)
    for ax in (metric_ax, *loss_axes):
        ax.grid(alpha=0.3)
    if histories:
        metric_ax.legend()
    if title:
        fig.suptitle(title)
    return fig


def reliability_diagram(
    teacher_logits: np.ndarray,
    student_logits: np.ndarray,
    labels: np.ndarray,
    student_name: str,
    bins: int = 10,
    show_counts: bool = True,
    teacher_name: str = "teacher",
) -> Figure:
    """Teacher and student calibration: accuracy against mean confidence per bin, with the diagonal of
    perfect calibration and (when `show_counts`) a panel of rows per bin. `teacher_name` says which teacher
    (its version): "sentiment-teacher v2"."""
    labels = np.asarray(labels)
    for who, logits in ((teacher_name, teacher_logits), (student_name, student_logits)):
        if len(logits) != len(labels):
            raise ValueError(f"{who} logits have {len(logits)} rows but there are {len(labels)} labels")
    fig = _figure(6, 7 if show_counts else 5)
    if show_counts:
        ax, count_ax = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    else:
        ax, count_ax = fig.subplots(), None
    width = 0.4 / bins
    for offset, (who, logits, color) in zip(
        (-width / 2, width / 2),
        ((teacher_name, teacher_logits, "tab:blue"), (student_name, student_logits, "tab:orange")),
        strict=True,
    ):
        rows = reliability(logits, labels, bins)
        ece = expected_calibration_error(logits, labels, bins)
        confidence = [r["confidence"] for r in rows]
        ax.plot(confidence, [r["accuracy"] for r in rows], marker="o", color=color, label=f"{who} (ECE {ece:.3f})")
        if count_ax is not None:
            centers = [(r["lo"] + r["hi"]) / 2 + offset for r in rows]
            count_ax.bar(centers, [r["count"] for r in rows], width=width, color=color, label=who)
    floor = 1 / teacher_logits.shape[1]  # no prediction is less confident than a uniform guess
    ax.plot([floor, 1], [floor, 1], linestyle="--", color="grey", label="perfect calibration")
    ax.set(title=f"reliability: {teacher_name} vs {student_name}", ylabel="accuracy", xlim=(floor, 1), ylim=(0, 1))
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    if count_ax is not None:
        count_ax.set(xlabel="confidence", ylabel="rows")
    else:
        ax.set_xlabel("confidence")
    return fig


def size_vs_quality(points: Sequence[dict[str, Any]], quality: str = "accuracy", title: str | None = None) -> Figure:
    """Each candidate's parameter count (log x) against its quality (the points' `quality` key, a task's quality
    name), marked by whether it passed the gates and annotated with its name, the `chosen: True` one ringed; a
    point with `twin: True` (a hard-label twin, not judged by the gates) is drawn hollow, and one with
    `teacher: True` as a reference line, and those with `frontier: True` joined as a search's Pareto frontier. Names
    sit on the inner side of their point, inside the frame."""
    teachers = [p for p in points if p.get("teacher")]
    candidates = [p for p in points if not p.get("teacher")]
    for point in candidates:
        needed = ("name", "params", quality) + (() if point.get("twin") else ("passed",))
        missing = [key for key in needed if key not in point]
        if missing:
            raise ValueError(f"size_vs_quality point {point.get('name', point)!r} lacks {missing}")
    fig = _figure(7.5, 5)
    ax = fig.subplots()
    students = [p for p in candidates if not p.get("twin")]
    for passed, style in ((True, PASSED_STYLE), (False, FAILED_STYLE)):
        group = [p for p in students if bool(p["passed"]) is passed]
        if group:
            ax.scatter([p["params"] for p in group], [p[quality] for p in group], s=60, zorder=3, **style)  # type: ignore[arg-type]
    twins = [p for p in candidates if p.get("twin")]
    if twins:
        ax.scatter([p["params"] for p in twins], [p[quality] for p in twins], **TWIN_STYLE)  # type: ignore[arg-type]
    for point in (p for p in candidates if p.get("chosen")):
        ax.scatter([point["params"]], [point[quality]], **CHOSEN_STYLE)  # type: ignore[arg-type]
    frontier = sorted((p for p in candidates if p.get("frontier")), key=lambda p: float(p["params"]))
    if frontier:  # a search's Pareto frontier: size, latency and quality no other point beats at once
        ax.plot([p["params"] for p in frontier], [p[quality] for p in frontier], drawstyle="steps-post",
                color="tab:blue", alpha=0.6, label="Pareto frontier")  # fmt: skip
    sizes = sorted({float(p["params"]) for p in candidates})
    middle = np.sqrt(sizes[0] * sizes[-1]) if sizes else 0.0
    for point in candidates:  # names toward the middle of the axis, so none runs off the frame
        right = float(point["params"]) > middle
        ax.annotate(
            point["name"],
            (point["params"], point[quality]),
            textcoords="offset points",
            xytext=(-8 if right else 8, 6),
            ha="right" if right else "left",
            fontsize=9,
            annotation_clip=True,
        )
    for teacher in teachers:
        label = str(teacher.get("name", "teacher"))
        if "params" in teacher:
            label += f" ({teacher['params']:,} params)"
        ax.axhline(teacher[quality], linestyle="--", color="grey", label=label)
    ax.set_xscale("log")
    ax.margins(x=0.2, y=0.15)
    ax.set(title=title or "size against quality", xlabel="parameters (log scale)", ylabel=f"test {quality}")
    ax.grid(alpha=0.3, which="both")
    if points:
        ax.legend(loc="best", fontsize=9)
    return fig
