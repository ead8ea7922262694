"""Teacher signals, what the student's own outputs are matched against, and the sources that make them.

A signal is what the teacher says about a batch: `DenseSignal` holds its logits over every class (or vocabulary
entry), and online its hidden states and attention maps too; `SparseSignal` holds the top-k (or sampled) entries
per position with their log-probabilities, the rest of the mass left out; `HeadSignal` holds the full distribution
as the teacher's last hidden states and output layer, so the loss makes its logits a chunk of positions at a time
(an LM teacher in the loop: its `[B, T, vocab]` logits are never held at once). A source gives the signal for the rows
of a batch: `StoredSource` reads the soft-label store's entry (under its content key), `OnlineSource` runs the
teacher in the loop. The training loop asks a source and never knows which one it has.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor

from distill_core.modules import Features, TextClassifier, TextModule, device_of, placed

if TYPE_CHECKING:
    from distill_core.tasks.base import Task, TaskBatch


@dataclass(frozen=True)
class DenseSignal:
    """The teacher's full distribution: logits `[N, C]` or `[N, T, V]`; hidden states and attentions (of the layer
    the student imitates) when the teacher runs in the loop."""

    logits: Tensor
    hidden_states: Tensor | None = None
    attentions: Tensor | None = None


@dataclass(frozen=True)
class SparseSignal:
    """The teacher's largest (or sampled) entries per position: ids `[N, T, k]` and their log-probabilities (over
    the full vocabulary) at `temperature`. Top-k: `missing_mass` says how the left-out mass is read ("zero"
    renormalises over the k entries, "tail" keeps it as one more outcome, `tail [N, T]` when stored). Sampled:
    `weights [N, T, k]` are each drawn id's share of the draws (0 for padding entries)."""

    ids: Tensor
    logprobs: Tensor
    missing_mass: str = "zero"
    weights: Tensor | None = None
    tail: Tensor | None = None
    temperature: float = 1.0


@dataclass(frozen=True)
class HeadSignal:
    """The teacher's full distribution, not yet made: its last hidden states `[N, T, H]` and its output layer
    (hidden -> logits over the vocabulary, with no gradient to the teacher). The loss applies `head` to `chunk`
    positions at a time, and makes them again for the backward pass, so no `[N, T, vocab]` teacher tensor, nor
    the per-position distributions of all positions, is held at once."""

    hidden: Tensor
    head: Callable[[Tensor], Tensor]
    chunk: int


Signal = DenseSignal | SparseSignal | HeadSignal


@dataclass(frozen=True)
class Outputs:
    """What the student produced on a batch: logits, and its features when a term matches them. `token_mask`
    masks the feature and attention terms when they run over tokens while the logits do not (a sequence
    classifier); None: the logits' mask."""

    logits: Tensor
    hidden_states: Tensor | None = None
    attentions: Tensor | None = None
    token_mask: Tensor | None = None


class SignalSource(Protocol):
    """Gives the teacher's signal for the rows `index` of the transfer set (whose inputs are `texts`, and the
    student's batch of them `batch`)."""

    def signal(self, index: Sequence[int], texts: Sequence[Any], batch: TaskBatch) -> Signal: ...


class StoredSource:
    """Rows of a stored dense signal: the soft-label store's logits of the transfer split."""

    def __init__(self, logits: Tensor) -> None:
        self.logits = logits

    def signal(self, index: Sequence[int], texts: Sequence[Any], batch: TaskBatch) -> Signal:
        return DenseSignal(self.logits[list(index)].to(batch.targets.device))  # where the student's batch is


class OnlineSource:
    """The teacher in the loop: its logits on every batch (over the full vocabulary), and with `features` the
    hidden states and attention maps of `layer` (the teacher layer the student's last layer imitates; None: its
    last). The task says what the teacher reads: its own tokens of the texts, or the student's batch."""

    def __init__(
        self, teacher: TextModule, features: bool = False, layer: int | None = None, task: Task | None = None
    ) -> None:
        if features and not isinstance(teacher, TextClassifier):
            raise TypeError("feature and attention terms need a transformer teacher (a TextClassifier)")
        if task is None:
            from distill_core.tasks import CLASSIFICATION

            task = CLASSIFICATION
        self.teacher, self.features, self.layer, self.task = teacher, features, layer, task

    @torch.no_grad()
    def signal(self, index: Sequence[int], texts: Sequence[Any], batch: TaskBatch) -> Signal:
        inputs = placed(self.task.teacher_inputs(self.teacher, texts, batch), device_of(self.teacher))
        if not self.features:
            return self.task.online_signal(self.teacher, inputs)
        assert isinstance(self.teacher, TextClassifier)
        feats: Features = self.teacher.features(**inputs)
        layer = self.layer if self.layer is not None else len(feats.attentions) - 1
        return DenseSignal(feats.logits.float(), feats.hidden_states[layer + 1], feats.attentions[layer])
