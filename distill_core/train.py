"""The distillation loop: seeded, checkpointed, resumable, with early stopping on the task's validation metric.

A `Distiller` is a student, an objective and a source of the teacher's signal: stored soft labels (offline) or
the teacher in the loop (online), which the feature and attention terms need. The hard-label baseline is the same
loop with a single cross-entropy term and no source. An update may accumulate gradients over micro-batches; each
micro-batch's loss is weighted by its share of the positions that count in the whole update, so the result is
the mean over all of them, as one large batch would give (not a mean of means: TRL issue 4719).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from distill_core.losses import DistillationObjective
from distill_core.modules import TextClassifier, TextModule, device_of, fast_attention, on_device, resolve_device, where
from distill_core.recipe import LossTerm, StudentConfig, TrainConfig
from distill_core.signals import OnlineSource, Outputs, SignalSource
from distill_core.tasks import CLASSIFICATION, Task

CHECKPOINT = "last.pt"


@dataclass
class TransferSet:
    """What the student learns from: inputs (texts, token blocks), targets (-100 where unlabeled) and the stored
    teacher signal."""

    texts: Sequence[Any]
    labels: np.ndarray
    teacher_signal: Any  # the soft-label store's transfer split; None in online mode or for the hard-label baseline


@dataclass
class TrainResult:
    """The trained student (best validation state) and how training went."""

    student: TextModule
    history: list[dict[str, float]] = field(default_factory=list)
    steps: int = 0
    best_step: int = 0
    best_score: float = 0.0  # the best validation value of the task's early-stopping metric
    stopped_early: bool = False
    resumed_from: int | None = None
    seconds: float = 0.0
    trained_on: str | None = None  # the device and thread count (and processes), as lineage records it


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
    task: Task = CLASSIFICATION,
    signal_cfg: Any = None,
) -> SignalSource | None:
    """Where the teacher's signal comes from: none when no term reads it, the teacher in the loop when the recipe
    says online (and a teacher is given), else the stored soft labels (read as the task's signal settings say)."""
    if not (objective.needs_teacher_logits or objective.needs_features):
        return None
    if cfg.mode == "online" and teacher is not None:
        return OnlineSource(teacher, objective.needs_features, teacher_layer, task)
    if transfer.teacher_signal is None:
        raise ValueError("offline distillation needs the stored teacher signal; pass it or use mode: online")
    return task.stored_source(transfer.teacher_signal, signal_cfg)


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
        accumulation: int = 1,
        max_grad_norm: float | None = None,
    ):
        self.student, self.objective, self.source, self.task = student, objective, source, task
        self.accumulation, self.max_grad_norm = accumulation, max_grad_norm
        self.params = [p for p in [*student.parameters(), *objective.parameters()] if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=weight_decay)
        # Under torchrun each process steps on its share of every batch; DistributedDataParallel averages the
        # gradients over the processes (its forward is the student's, so the student's own forward goes through it).
        self.world, self.device = dist.get_world_size() if dist.is_initialized() else 1, device_of(student)
        self.forward: Any = student
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None  # NCCL: this process's one GPU
            self.forward = torch.nn.parallel.DistributedDataParallel(
                student, device_ids=ids, find_unused_parameters=True
            )

    def _outputs(self, inputs: dict[str, torch.Tensor]) -> Outputs:
        if not self.objective.needs_features:
            return Outputs(self.forward(**inputs))
        if not isinstance(self.student, TextClassifier):
            raise TypeError("feature and attention terms need a transformer student (a TextClassifier)")
        feats = self.student.features(**inputs)
        return Outputs(feats.logits, feats.hidden_states[-1], feats.attentions[-1], inputs["attention_mask"])

    def step(self, index: Sequence[int], texts: Sequence[Any], targets: torch.Tensor) -> dict[str, float]:
        """One update on the transfer rows `index`, over `accumulation` micro-batches: forward, loss, backward
        (each weighted by its share of the counted positions), clipping, optimizer step. Returns the terms."""
        self.student.train()
        self.optimizer.zero_grad(set_to_none=True)
        size = -(-len(index) // self.accumulation)
        parts = [range(start, min(start + size, len(index))) for start in range(0, len(index), size)]
        batches = [
            self.task.batch(self.student, [texts[i] for i in part], targets[list(part)]).to(self.device)
            for part in parts
        ]
        counts = [float(b.mask.sum()) if b.mask is not None else float(b.targets.numel()) for b in batches]
        total_count = max(_summed(sum(counts), self.world, self.device), 1.0)  # over every process's share
        logged: dict[str, float] = {}
        for number, (part, batch, count) in enumerate(zip(parts, batches, counts, strict=True)):
            rows, inputs = [index[i] for i in part], [texts[i] for i in part]
            signal = self.source.signal(rows, inputs, batch) if self.source is not None else None
            last = number == len(parts) - 1
            with self.forward.no_sync() if self.world > 1 and not last else contextlib.nullcontext():
                loss, terms = self.objective(self._outputs(batch.inputs), signal, batch.targets, batch.mask)
                share = count / total_count
                (loss * share * self.world).backward()  # DDP averages over the processes: their sum is the mean
            for name, value in {"loss": float(loss.detach()), **terms}.items():
                logged[name] = logged.get(name, 0.0) + value * share
        if self.world > 1:
            logged = {name: _summed(value, self.world, self.device) for name, value in logged.items()}
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.optimizer.step()
        return logged


def _summed(value: float, world: int, device: torch.device) -> float:
    """`value` summed over the training processes (itself in one), through the group's device (NCCL's GPU)."""
    if world == 1:
        return value
    total = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return float(total)


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
    validation: tuple[Sequence[Any], np.ndarray],
    checkpoint_dir: str | Path,
    teacher: TextModule | None = None,
    fingerprint: str = "",
    log: Callable[[str], None] = print,
    on_step: Callable[[int], None] | None = None,
    task: Task = CLASSIFICATION,
    signal_cfg: Any = None,
    on_eval: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Train until epochs/max_steps or early stop; resume from `checkpoint_dir` when a matching checkpoint exists.
    on_eval(step, value) follows every evaluation (a search's pruner: it may raise to stop the training).

    With `train.distributed`, the training runs under torchrun (distill_core.ddp) and this returns its result: each
    process takes its share of every batch of the one-process order (rows i, i+N, ... of it, as a
    DistributedSampler gives them), so the updates are the one-process updates up to float rounding; rank 0 writes
    the checkpoints, which hold nothing per process, so a run resumes at any world size."""
    if cfg.distributed is not None and cfg.distributed.nproc > 1 and not dist.is_initialized():
        from distill_core.ddp import train_distributed

        if on_step is not None or on_eval is not None:  # a search trial's pruner reads every evaluation here
            log(f"{student_cfg.name}: trained in this process (train.distributed takes no step or evaluation hook)")
        else:
            return train_distributed(
                student, student_cfg, cfg, transfer, validation, checkpoint_dir, fingerprint, log, task, signal_cfg
            )
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    device = resolve_device(cfg.device, f"training {student_cfg.name}")  # under torchrun: this process's GPU
    online_teacher = teacher if cfg.mode == "online" and teacher is not None else None
    # the student (and the teacher in the loop) on the device while it trains; back on the CPU, as they came, after
    with (
        on_device(student, device),
        on_device(online_teacher, device) if online_teacher is not None else contextlib.nullcontext(),
    ):
        torch.manual_seed(cfg.seed)
        layer = student_cfg.teacher_layers[-1] if student_cfg.family == "transformer" else None
        objective = objective_for(student, cfg, teacher if cfg.mode == "online" else None).to(device)
        source = source_for(objective, cfg, transfer, teacher, layer, task, signal_cfg)
        distiller = Distiller(
            student,
            objective,
            source,
            student_cfg.learning_rate(cfg),
            cfg.weight_decay,
            task,
            accumulation=getattr(cfg, "grad_accumulation", 1),  # LM recipes set these; a classifier's has neither
            max_grad_norm=getattr(cfg, "max_grad_norm", None),
        )
        checkpoint_dir = Path(checkpoint_dir)
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        ckpt_path = checkpoint_dir / CHECKPOINT
        n = len(transfer.texts)
        steps_per_epoch = math.ceil(n / (cfg.batch_size * getattr(cfg, "grad_accumulation", 1)))
        total = min(cfg.max_steps or 10**12, steps_per_epoch * cfg.epochs)
        result = TrainResult(student)
        best_state = {k: v.clone() for k, v in student.state_dict().items()}
        stale, step = 0, 0

        finished = False
        if ckpt_path.exists():
            state = torch.load(ckpt_path, map_location="cpu", weights_only=False)  # loading copies to the device
            if state.get("fingerprint") == fingerprint:
                finished = bool(state.get("final"))  # trained to the end before: only the result is reused
                if not finished:
                    student.load_state_dict(state["student"])
                    distiller.objective.load_state_dict(state["objective"])
                    distiller.optimizer.load_state_dict(state["optimizer"])
                    torch.set_rng_state(state["rng"])
                    stale = state["stale"]
                step, best_state = state["step"], state["best_state"]
                result.history, result.best_step = state["history"], state["best_step"]
                result.best_score = state.get("best_score", state.get("best_accuracy", 0.0))  # older checkpoints
                result.resumed_from, result.stopped_early = step, state["stopped_early"]
                log(f"resumed from checkpoint at step {step}" + (" (training had finished)" if finished else ""))
            else:
                log(f"ignoring checkpoint {ckpt_path}: it belongs to another run")

        def evaluate(at: int) -> bool:
            """Validate; returns True when training should stop early."""
            nonlocal stale, best_state
            acc = task.validate(student, validation[0], validation[1])
            result.history.append({"step": at, "epoch": at / steps_per_epoch, task.early_stopping: acc, **last_terms})
            better = acc > result.best_score if task.maximize else acc < result.best_score
            if better or not result.best_step:
                result.best_score, result.best_step, stale = acc, at, 0
                best_state = {k: v.detach().clone() for k, v in student.state_dict().items()}
            else:
                stale += 1
            log(f"step {at}/{total} {task.early_stopping} {acc:.4f} loss {last_terms.get('loss', float('nan')):.4f}")
            if on_eval is not None:
                on_eval(at, acc)
            return stale >= cfg.patience

        started = time.perf_counter()
        last_terms: dict[str, float] = {}
        labels_all = torch.tensor(transfer.labels, dtype=torch.long)
        rows_per_step = cfg.batch_size * distiller.accumulation
        while step < total and not result.stopped_early and not finished:
            epoch, position = divmod(step, steps_per_epoch)
            order = _epoch_order(n, cfg.seed, epoch)
            index = order[position * rows_per_step : (position + 1) * rows_per_step][rank::world]
            texts = [transfer.texts[i] for i in index]
            last_terms = distiller.step(index, texts, labels_all[index])
            step += 1
            if on_step is not None:
                on_step(step)
            end_of_epoch = step % steps_per_epoch == 0 or step == total
            if (step % cfg.eval_every == 0 or end_of_epoch) and evaluate(step) and step < total:
                result.stopped_early = True
                log(f"early stop at step {step}: no improvement for {cfg.patience} evaluations")
            if rank == 0 and (step % cfg.checkpoint_every == 0 or end_of_epoch or result.stopped_early):
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
                        "best_score": result.best_score,
                        "stopped_early": result.stopped_early,
                    },
                )
        student.load_state_dict(best_state)
        if not finished and rank == 0:
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
                    "best_score": result.best_score,
                    "stopped_early": result.stopped_early,
                },
            )
        fast_attention(student)
        if teacher is not None:
            fast_attention(teacher)
        result.steps, result.seconds = step, time.perf_counter() - started
        result.trained_on = where(device, processes=world)
        return result
