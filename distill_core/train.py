"""The distillation loop: seeded, checkpointed, resumable, with early stopping on the task's validation metric.

A `Distiller` is a student, an objective and a source of the teacher's signal: stored soft labels (offline) or
the teacher in the loop (online), which the feature and attention terms need. The hard-label baseline is the same
loop with a single cross-entropy term and no source.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distill_core.losses import DistillationObjective
from distill_core.modules import TextClassifier, TextModule, fast_attention
from distill_core.recipe import LossTerm, StudentConfig, TrainConfig
from distill_core.signals import OnlineSource, Outputs, SignalSource, StoredSource
from distill_core.tasks import CLASSIFICATION, Task

CHECKPOINT = "last.pt"


@dataclass
class TransferSet:
    """What the student learns from: texts, hard labels (-100 where unlabeled) and stored teacher logits."""

    texts: list[str]
    labels: np.ndarray
    teacher_logits: np.ndarray | None  # None in online mode or for the hard-label baseline


@dataclass
class TrainResult:
    """The trained student (best validation state) and how training went."""

    student: TextModule
    history: list[dict[str, float]] = field(default_factory=list)
    steps: int = 0
    best_step: int = 0
    best_accuracy: float = 0.0
    stopped_early: bool = False
    resumed_from: int | None = None
    seconds: float = 0.0


def baseline_config(cfg: TrainConfig) -> TrainConfig:
    """The hard-label twin of a training config: the same loop, labels only."""
    return cfg.model_copy(update={"losses": [LossTerm(function="ce")], "mode": "offline"})


def objective_for(student: TextModule, cfg: TrainConfig, teacher: TextModule | None) -> DistillationObjective:
    """The recipe's loss terms, with projections sized from the student's and the teacher's hidden states."""
    hidden = getattr(getattr(student, "encoder", None), "config", None)
    teacher_hidden = getattr(getattr(teacher, "encoder", None), "config", None)
    return DistillationObjective(
        cfg.losses,
        student_dim=hidden.hidden_size if hidden is not None else None,
        teacher_dim=teacher_hidden.hidden_size if teacher_hidden is not None else None,
    )


def source_for(
    objective: DistillationObjective,
    cfg: TrainConfig,
    transfer: TransferSet,
    teacher: TextModule | None,
    teacher_layer: int | None = None,
) -> SignalSource | None:
    """Where the teacher's signal comes from: none when no term reads it, the teacher in the loop when the recipe
    says online (and a teacher is given), else the stored soft labels."""
    if not (objective.needs_teacher_logits or objective.needs_features):
        return None
    if cfg.mode == "online" and teacher is not None:
        return OnlineSource(teacher, objective.needs_features, teacher_layer)
    if transfer.teacher_logits is None:
        raise ValueError("offline distillation needs stored teacher logits; pass them or use mode: online")
    return StoredSource(torch.tensor(transfer.teacher_logits))


class Distiller:
    """A student, the objective it minimises and the source of the teacher's signal; `step` is one update."""

    def __init__(
        self,
        student: TextModule,
        objective: DistillationObjective,
        source: SignalSource | None,
        lr: float,
        weight_decay: float,
        task: Task = CLASSIFICATION,
    ):
        self.student, self.objective, self.source, self.task = student, objective, source, task
        params = [p for p in [*student.parameters(), *objective.parameters()] if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)

    def _outputs(self, inputs: dict[str, torch.Tensor]) -> Outputs:
        if not self.objective.needs_features:
            return Outputs(self.student(**inputs))
        if not isinstance(self.student, TextClassifier):
            raise TypeError("feature and attention terms need a transformer student (a TextClassifier)")
        feats = self.student.features(**inputs)
        return Outputs(feats.logits, feats.hidden_states[-1], feats.attentions[-1], inputs["attention_mask"])

    def step(self, index: Sequence[int], texts: list[str], targets: torch.Tensor) -> dict[str, float]:
        """One update on the transfer rows `index`: forward, loss, backward, optimizer step. Returns the terms."""
        self.student.train()
        batch = self.task.batch(self.student, texts, targets)
        signal = self.source.signal(index, texts) if self.source is not None else None
        loss, terms = self.objective(self._outputs(batch.inputs), signal, batch.targets, batch.mask)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return {"loss": float(loss.detach()), **terms}


def _epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # a crash mid-write never leaves a truncated checkpoint behind


def train_student(
    student: TextModule,
    student_cfg: StudentConfig,
    cfg: TrainConfig,
    transfer: TransferSet,
    validation: tuple[list[str], np.ndarray],
    checkpoint_dir: str | Path,
    teacher: TextModule | None = None,
    fingerprint: str = "",
    log: Callable[[str], None] = print,
    on_step: Callable[[int], None] | None = None,
    task: Task = CLASSIFICATION,
) -> TrainResult:
    """Train until epochs/max_steps or early stop; resume from `checkpoint_dir` when a matching checkpoint exists."""
    torch.manual_seed(cfg.seed)
    layer = student_cfg.teacher_layers[-1] if student_cfg.family == "transformer" else None
    objective = objective_for(student, cfg, teacher if cfg.mode == "online" else None)
    source = source_for(objective, cfg, transfer, teacher, layer)
    distiller = Distiller(student, objective, source, student_cfg.learning_rate(cfg), cfg.weight_decay, task)
    checkpoint_dir = Path(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = checkpoint_dir / CHECKPOINT
    n = len(transfer.texts)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total = min(cfg.max_steps or 10**12, steps_per_epoch * cfg.epochs)
    result = TrainResult(student)
    best_state = {k: v.clone() for k, v in student.state_dict().items()}
    stale, step = 0, 0

    finished = False
    if ckpt_path.exists():
        state = torch.load(ckpt_path, weights_only=False)
        if state.get("fingerprint") == fingerprint:
            finished = bool(state.get("final"))  # trained to the end before: only the result is reused
            if not finished:
                student.load_state_dict(state["student"])
                distiller.objective.load_state_dict(state["objective"])
                distiller.optimizer.load_state_dict(state["optimizer"])
                torch.set_rng_state(state["rng"])
                stale = state["stale"]
            step, best_state = state["step"], state["best_state"]
            result.history, result.best_step, result.best_accuracy = (
                state["history"],
                state["best_step"],
                state["best_accuracy"],
            )
            result.resumed_from, result.stopped_early = step, state["stopped_early"]
            log(f"resumed from checkpoint at step {step}" + (" (training had finished)" if finished else ""))
        else:
            log(f"ignoring checkpoint {ckpt_path}: it belongs to another run")

    def evaluate(at: int) -> bool:
        """Validate; returns True when training should stop early."""
        nonlocal stale, best_state
        acc = task.validate(student, validation[0], validation[1])
        result.history.append({"step": at, "epoch": at / steps_per_epoch, task.early_stopping: acc, **last_terms})
        if acc > result.best_accuracy or not result.best_step:
            result.best_accuracy, result.best_step, stale = acc, at, 0
            best_state = {k: v.detach().clone() for k, v in student.state_dict().items()}
        else:
            stale += 1
        log(f"step {at}/{total} {task.early_stopping} {acc:.4f} loss {last_terms.get('loss', float('nan')):.4f}")
        return stale >= cfg.patience

    started = time.perf_counter()
    last_terms: dict[str, float] = {}
    labels_all = torch.tensor(transfer.labels, dtype=torch.long)
    while step < total and not result.stopped_early and not finished:
        epoch, position = divmod(step, steps_per_epoch)
        order = _epoch_order(n, cfg.seed, epoch)
        index = order[position * cfg.batch_size : (position + 1) * cfg.batch_size]
        texts = [transfer.texts[i] for i in index]
        last_terms = distiller.step(index, texts, labels_all[index])
        step += 1
        if on_step is not None:
            on_step(step)
        end_of_epoch = step % steps_per_epoch == 0 or step == total
        if (step % cfg.eval_every == 0 or end_of_epoch) and evaluate(step) and step < total:
            result.stopped_early = True
            log(f"early stop at step {step}: no improvement for {cfg.patience} evaluations")
        if step % cfg.checkpoint_every == 0 or end_of_epoch or result.stopped_early:
            _save_checkpoint(
                ckpt_path,
                {
                    "fingerprint": fingerprint,
                    "step": step,
                    "student": student.state_dict(),
                    "objective": distiller.objective.state_dict(),
                    "optimizer": distiller.optimizer.state_dict(),
                    "rng": torch.get_rng_state(),
                    "stale": stale,
                    "best_state": best_state,
                    "history": result.history,
                    "best_step": result.best_step,
                    "best_accuracy": result.best_accuracy,
                    "stopped_early": result.stopped_early,
                },
            )
    student.load_state_dict(best_state)
    if not finished:
        # Training is over: keep only what a rerun reuses (the best weights and the history), not the optimizer's
        # moments and the last state, which make a checkpoint several times the student's size.
        _save_checkpoint(
            ckpt_path,
            {
                "fingerprint": fingerprint,
                "final": True,
                "step": step,
                "best_state": best_state,
                "history": result.history,
                "best_step": result.best_step,
                "best_accuracy": result.best_accuracy,
                "stopped_early": result.stopped_early,
            },
        )
    fast_attention(student)
    if teacher is not None:
        fast_attention(teacher)
    result.steps, result.seconds = step, time.perf_counter() - started
    return result
