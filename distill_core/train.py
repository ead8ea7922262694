"""The distillation loop: seeded, checkpointed, resumable, with early stopping on validation accuracy.

Offline mode reads stored teacher logits; online mode runs the teacher on every batch, which the feature
and attention terms need. The hard-label baseline is the same loop with a single cross-entropy term.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from distill_core.evaluate import accuracy, predict
from distill_core.losses import DistillationObjective
from distill_core.recipe import LossTerm, StudentConfig, TrainConfig
from distill_core.teachers import Features, TextClassifier, TextModule, fast_attention

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


class Distiller:
    """Holds the student, the objective and the optimizer; `step` is one distillation update."""

    def __init__(
        self,
        student: TextModule,
        cfg: TrainConfig,
        student_cfg: StudentConfig,
        teacher: TextModule | None = None,
        teacher_layer: int | None = None,
    ):
        self.student, self.cfg, self.teacher = student, cfg, teacher
        hidden = getattr(getattr(student, "encoder", None), "config", None)
        teacher_hidden = getattr(getattr(teacher, "encoder", None), "config", None)
        self.objective = DistillationObjective(
            cfg.losses,
            student_dim=hidden.hidden_size if hidden is not None else None,
            teacher_dim=teacher_hidden.hidden_size if teacher_hidden is not None else None,
        )
        self.teacher_layer = teacher_layer  # the teacher layer that the student's last layer imitates
        self.needs_features = self.objective.needs_hidden_states or self.objective.needs_attentions
        lr = student_cfg.learning_rate(cfg)
        params = [p for p in [*student.parameters(), *self.objective.parameters()] if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)

    def _teacher_outputs(self, batch: dict[str, Tensor], teacher_batch: dict[str, Tensor]) -> dict[str, Any]:
        assert isinstance(self.teacher, TextModule)
        with torch.no_grad():
            if not self.needs_features:
                return {"teacher_logits": self.teacher(**teacher_batch).float()}
            assert isinstance(self.teacher, TextClassifier), "feature and attention terms need a transformer teacher"
            feats: Features = self.teacher.features(**teacher_batch)
        layer = self.teacher_layer if self.teacher_layer is not None else len(feats.attentions) - 1
        return {
            "teacher_logits": feats.logits.float(),
            "teacher_hidden": feats.hidden_states[layer + 1],
            "teacher_attention": feats.attentions[layer],
        }

    def step(
        self,
        batch: dict[str, Tensor],
        labels: Tensor | None,
        teacher_logits: Tensor | None,
        teacher_batch: dict[str, Tensor] | None = None,
    ) -> dict[str, float]:
        """One update: forward, loss, backward, optimizer step. Returns the loss terms."""
        self.student.train()
        inputs: dict[str, Any] = {"teacher_logits": teacher_logits, "labels": labels}
        if teacher_batch is not None:
            inputs.update(self._teacher_outputs(batch, teacher_batch))
        if self.needs_features:
            assert isinstance(self.student, TextClassifier)
            feats = self.student.features(**batch)
            inputs.update(
                student_logits=feats.logits,
                student_hidden=feats.hidden_states[-1],
                student_attention=feats.attentions[-1],
                sequence_mask=batch["attention_mask"],
            )
        else:
            inputs["student_logits"] = self.student(**batch)
        loss, terms = self.objective(**inputs)
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
) -> TrainResult:
    """Train until epochs/max_steps or early stop; resume from `checkpoint_dir` when a matching checkpoint exists."""
    online = cfg.mode == "online" and teacher is not None
    if not online and transfer.teacher_logits is None and any(t.function != "ce" for t in cfg.losses):
        raise ValueError("offline distillation needs stored teacher logits; pass them or use mode: online")
    torch.manual_seed(cfg.seed)
    layer = student_cfg.teacher_layers[-1] if student_cfg.family == "transformer" else None
    distiller = Distiller(student, cfg, student_cfg, teacher if online else None, layer)
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
        acc = accuracy(predict(student, validation[0]), validation[1])
        result.history.append({"step": at, "epoch": at / steps_per_epoch, "val_accuracy": acc, **last_terms})
        if acc > result.best_accuracy or not result.best_step:
            result.best_accuracy, result.best_step, stale = acc, at, 0
            best_state = {k: v.detach().clone() for k, v in student.state_dict().items()}
        else:
            stale += 1
        log(f"step {at}/{total} val_accuracy {acc:.4f} loss {last_terms.get('loss', float('nan')):.4f}")
        return stale >= cfg.patience

    started = time.perf_counter()
    last_terms: dict[str, float] = {}
    labels_all = torch.tensor(transfer.labels, dtype=torch.long)
    logits_all = torch.tensor(transfer.teacher_logits) if transfer.teacher_logits is not None else None
    while step < total and not result.stopped_early and not finished:
        epoch, position = divmod(step, steps_per_epoch)
        order = _epoch_order(n, cfg.seed, epoch)
        index = order[position * cfg.batch_size : (position + 1) * cfg.batch_size]
        texts = [transfer.texts[i] for i in index]
        batch = student.tokenize(texts)
        teacher_batch = teacher.tokenize(texts) if online and teacher is not None else None
        stored = logits_all[index] if logits_all is not None and not online else None
        last_terms = distiller.step(batch, labels_all[index], stored, teacher_batch)
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
