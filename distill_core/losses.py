"""Distillation losses in three layers: divergences, terms with parameters of their own, and the functions of
the terms a recipe names (declared in distill_core.loss_terms) with their weighted sum.

Divergences take logits `[batch, classes]` or `[batch, seq, vocab]` and an optional `mask` shaped like the
logits without the last dim (True = counts). They compute in float32 and average over the positions that
count; a fully masked batch gives 0, not NaN. Teacher tensors are not detached: compute them under no_grad.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from distill_core.loss_terms import ATTENTIONS, HIDDEN_STATES, LOSS_TERMS, TEACHER_LOGITS, LossSpec
from distill_core.signals import DenseSignal, HeadSignal, Outputs, Signal, SparseSignal

TAIL_EPS = 1e-8  # smallest leftover mass in the "other tokens" bucket of a top-k teacher signal

# --- helpers: the rows that count, KL per row, mean over rows -----------------------------------------------


def _rows(x: Tensor, mask: Tensor | None, what: str) -> Tensor:
    """Flatten `x [..., D]` to the rows `[N, D]` where mask is True, in float32."""
    if x.dim() < 2:
        raise ValueError(f"{what} must have at least 2 dims ([batch, D]), got shape {tuple(x.shape)}")
    if mask is None:
        return x.reshape(-1, x.shape[-1]).float()
    if tuple(mask.shape) != tuple(x.shape[:-1]):
        raise ValueError(
            f"mask shape {tuple(mask.shape)} does not fit {what} shape {tuple(x.shape)}: expected {tuple(x.shape[:-1])}"
        )
    return x[mask.bool()].float()


def _mean_rows(per_row: Tensor) -> Tensor:
    """Mean over rows; 0, with a gradient path, when no row counts."""
    return per_row.sum() / max(per_row.shape[0], 1)


def _kl_rows(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p || q) per row from log-probabilities; entries with p == 0 add 0 (safe with -inf logits)."""
    p = log_p.exp()
    return (p * torch.where(p > 0, log_p - log_q, torch.zeros_like(log_p))).sum(-1)


def _mix(log_a: Tensor, log_b: Tensor, weight_a: float) -> Tensor:
    """log(weight_a * a + (1 - weight_a) * b) in log space."""
    if weight_a in (0.0, 1.0):
        return log_a if weight_a == 1.0 else log_b
    floor = torch.finfo(log_a.dtype).min  # keeps logsumexp's gradient finite where both sides are -inf
    log_a, log_b = log_a.clamp_min(floor) + math.log(weight_a), log_b.clamp_min(floor) + math.log1p(-weight_a)
    return torch.logsumexp(torch.stack([log_a, log_b]), dim=0)


def _check_unit(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


def _check_temperature(temperature: float) -> None:
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _check_same_shape(student: Tensor, teacher: Tensor) -> None:
    if student.shape != teacher.shape:
        raise ValueError(
            f"student logits {tuple(student.shape)} and teacher logits {tuple(teacher.shape)} differ: "
            "the vocabularies must match (truncate a padded vocab first)"
        )


def _log_probs(student: Tensor, teacher: Tensor, temperature: float, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """Student and teacher log-probabilities at `temperature` over the rows that count."""
    _check_temperature(temperature)
    _check_same_shape(student, teacher)
    log_s = F.log_softmax(_rows(student, mask, "student logits") / temperature, dim=-1)
    return log_s, F.log_softmax(_rows(teacher, mask, "teacher logits") / temperature, dim=-1)


# --- layer 1: divergences, all times T**2 so gradients keep their size across temperatures (Hinton 2015) ----
# Each is a per-row formula over log-probabilities (student, teacher), so that it applies alike to full
# distributions and to the k + 1 outcomes of a top-k signal with a rest bucket.


def _forward_rows(log_s: Tensor, log_t: Tensor) -> Tensor:
    return _kl_rows(log_t, log_s)


def _reverse_rows(log_s: Tensor, log_t: Tensor) -> Tensor:
    return _kl_rows(log_s, log_t)


def _jsd_rows(log_s: Tensor, log_t: Tensor, beta: float) -> Tensor:
    _check_unit("beta", beta)
    if beta == 0.0:
        return _forward_rows(log_s, log_t)
    if beta == 1.0:
        return _reverse_rows(log_s, log_t)
    log_m = _mix(log_t, log_s, beta)
    return beta * _kl_rows(log_t, log_m) + (1 - beta) * _kl_rows(log_s, log_m)


def _skew_rows(log_s: Tensor, log_t: Tensor, alpha: float) -> Tensor:
    _check_unit("alpha", alpha)
    return _kl_rows(log_t, _mix(log_t, log_s, alpha))


def _skew_reverse_rows(log_s: Tensor, log_t: Tensor, alpha: float) -> Tensor:
    _check_unit("alpha", alpha)
    return _kl_rows(log_s, _mix(log_s, log_t, alpha))


def forward_kl(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0, mask: Tensor | None = None
) -> Tensor:
    """KL(p_teacher || p_student) at temperature T, times T**2: the classic, mean-seeking KD loss."""
    log_s, log_t = _log_probs(student_logits, teacher_logits, temperature, mask)
    return _mean_rows(_forward_rows(log_s, log_t)) * temperature**2


def reverse_kl(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0, mask: Tensor | None = None
) -> Tensor:
    """KL(p_student || p_teacher) at temperature T, times T**2: mode-seeking (MiniLLM)."""
    log_s, log_t = _log_probs(student_logits, teacher_logits, temperature, mask)
    return _mean_rows(_reverse_rows(log_s, log_t)) * temperature**2


def generalized_jsd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    beta: float = 0.5,
    temperature: float = 1.0,
    mask: Tensor | None = None,
) -> Tensor:
    """TRL GKD's generalized JSD, times T**2: beta=0 is forward KL, beta=1 is reverse KL.

    For 0 < beta < 1: beta * KL(p_t || m) + (1 - beta) * KL(p_s || m), m = beta * p_t + (1 - beta) * p_s.
    As in TRL the endpoints are special cases; the mixture formula itself goes to 0 as beta -> 0 or 1.
    """
    _check_unit("beta", beta)
    log_s, log_t = _log_probs(student_logits, teacher_logits, temperature, mask)
    return _mean_rows(_jsd_rows(log_s, log_t, beta)) * temperature**2


def skew_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    alpha: float = 0.1,
    temperature: float = 1.0,
    mask: Tensor | None = None,
) -> Tensor:
    """DistiLLM skew KL: KL(p_t || alpha * p_t + (1 - alpha) * p_s), times T**2; alpha=0 is forward KL."""
    _check_unit("alpha", alpha)
    log_s, log_t = _log_probs(student_logits, teacher_logits, temperature, mask)
    return _mean_rows(_skew_rows(log_s, log_t, alpha)) * temperature**2


def skew_reverse_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    alpha: float = 0.1,
    temperature: float = 1.0,
    mask: Tensor | None = None,
) -> Tensor:
    """DistiLLM skew reverse KL: KL(p_s || alpha * p_s + (1 - alpha) * p_t), times T**2."""
    _check_unit("alpha", alpha)
    log_s, log_t = _log_probs(student_logits, teacher_logits, temperature, mask)
    return _mean_rows(_skew_reverse_rows(log_s, log_t, alpha)) * temperature**2


DIVERGENCES: dict[str, Callable[..., Tensor]] = {
    fn.__name__: fn for fn in (forward_kl, reverse_kl, generalized_jsd, skew_kl, skew_reverse_kl)
}


def hard_label_ce(
    student_logits: Tensor, labels: Tensor, mask: Tensor | None = None, ignore_index: int = -100
) -> Tensor:
    """Cross-entropy on hard labels, mean over labelled positions that count (0 if there are none)."""
    if tuple(labels.shape) != tuple(student_logits.shape[:-1]):
        raise ValueError(
            f"labels shape {tuple(labels.shape)} does not fit logits shape {tuple(student_logits.shape)}: "
            f"expected {tuple(student_logits.shape[:-1])}"
        )
    if mask is not None:
        if mask.shape != labels.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} does not fit labels {tuple(labels.shape)}")
        labels = labels.masked_fill(~mask.bool(), ignore_index)
    count = int((labels != ignore_index).sum())
    # ignore_index instead of selecting the rows: no copy of [positions, vocab] logits (a causal LM's are large)
    flat = student_logits.reshape(-1, student_logits.shape[-1]).float()
    loss = F.cross_entropy(flat, labels.reshape(-1), ignore_index=ignore_index, reduction="sum")
    return loss / max(count, 1)


def _check_sparse(student_logits: Tensor, ids: Tensor, *others: Tensor) -> None:
    if any(o.shape != ids.shape for o in others) or ids.shape[:-1] != student_logits.shape[:-1]:
        raise ValueError(
            f"sparse ids {tuple(ids.shape)} and their values {[tuple(o.shape) for o in others]} must all be "
            f"{tuple(student_logits.shape[:-1])} + (k,) to match student logits {tuple(student_logits.shape)}"
        )


def _student_at(student_logits: Tensor, ids: Tensor, temperature: float, mask: Tensor | None) -> Tensor:
    """The student's full log-softmax at T, read at the signal's ids, over the rows that count: [N, k]."""
    student = F.log_softmax(_rows(student_logits, mask, "student logits") / temperature, dim=-1)
    return student.gather(-1, ids.reshape(-1, ids.shape[-1]) if mask is None else ids[mask.bool()])


def sparse_buckets(
    student_logits: Tensor,
    topk_ids: Tensor,
    topk_logprobs: Tensor,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    missing_mass: str = "zero",
    stored_temperature: float = 1.0,
    tail: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Student and teacher log-probabilities over the outcomes a top-k signal defines, at temperature T.

    The stored probabilities (taken at stored_temperature) are re-tempered as p**(stored_T / T), renormalised
    (DistillKit's rule). "zero": both sides renormalised over the teacher's top-k ids. "tail": a (k+1)-th bucket
    holds each side's leftover mass (clamped >= 1e-8; the teacher's from `tail` when stored, else from its
    entries); p**(1/T) amplifies a tiny leftover, so use it when top-k leaves mass out.
    """
    if missing_mass not in ("zero", "tail"):
        raise ValueError(f"missing_mass must be 'zero' or 'tail', got {missing_mass!r}")
    _check_temperature(temperature)
    _check_sparse(student_logits, topk_ids, topk_logprobs)
    student_k = _student_at(student_logits, topk_ids, temperature, mask)
    stored = _rows(topk_logprobs, mask, "top-k log-probs")
    if missing_mass == "tail":
        if tail is not None:
            flat_tail = tail.reshape(-1) if mask is None else tail[mask.bool()]
            teacher_left = flat_tail.float().unsqueeze(-1)
        else:
            teacher_left = -torch.expm1(torch.logsumexp(stored, dim=-1, keepdim=True))
        student_left = -torch.expm1(torch.logsumexp(student_k, dim=-1, keepdim=True))
        stored = torch.cat([stored, teacher_left.clamp_min(TAIL_EPS).log()], dim=-1)
        student_k = torch.cat([student_k, student_left.clamp_min(TAIL_EPS).log()], dim=-1)
    log_t = F.log_softmax(stored * (stored_temperature / temperature), dim=-1)
    return F.log_softmax(student_k, dim=-1), log_t


def sparse_forward_kl(
    student_logits: Tensor,
    topk_ids: Tensor,
    topk_logprobs: Tensor,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    missing_mass: str = "zero",
) -> Tensor:
    """Forward KL, times T**2, against a teacher stored as top-k ids and log-probs taken at temperature 1 (the
    outcomes as sparse_buckets defines them)."""
    log_s, log_t = sparse_buckets(student_logits, topk_ids, topk_logprobs, temperature, mask, missing_mass)
    return _mean_rows(_forward_rows(log_s, log_t)) * temperature**2


def sampled_forward_kl(
    student_logits: Tensor,
    ids: Tensor,
    logprobs: Tensor,
    weights: Tensor,
    temperature: float = 1.0,
    mask: Tensor | None = None,
) -> Tensor:
    """The unbiased estimate of KL(p_T || q_T), times T**2, from tokens drawn from the teacher at temperature T
    (random-sampling KD, Anshumann et al. 2025): sum_j w_j (log p_T(j) - log q_T(j)), with w_j each id's share
    of the draws (0 for padding) and q_T the student's full softmax, not one renormalised over the drawn ids.
    Its expectation over the draws is the forward KL, and its gradient the full-distribution one's."""
    _check_temperature(temperature)
    _check_sparse(student_logits, ids, logprobs, weights)
    student_j = _student_at(student_logits, ids, temperature, mask)
    w = _rows(weights, mask, "sample weights")
    per_row = (w * (_rows(logprobs, mask, "sampled log-probs") - student_j)).sum(-1)
    return _mean_rows(per_row) * temperature**2


# --- layer 2: terms with parameters of their own (a projection) and over attention maps -------------------


class FeatureLoss(nn.Module):
    """Hidden-state loss through a learned bias-free projection from student_dim to teacher_dim."""

    def __init__(self, student_dim: int, teacher_dim: int, kind: str = "mse") -> None:
        super().__init__()
        if kind not in ("mse", "cosine"):
            raise ValueError(f"FeatureLoss kind must be 'mse' or 'cosine', got {kind!r}")
        self.kind = kind
        self.projection = nn.Linear(student_dim, teacher_dim, bias=False)
        if student_dim == teacher_dim:
            nn.init.eye_(self.projection.weight)
        else:
            nn.init.xavier_uniform_(self.projection.weight)

    def forward(self, student_hidden: Tensor, teacher_hidden: Tensor, mask: Tensor | None = None) -> Tensor:
        """MSE (mean over valid positions and features) or mean (1 - cosine) of projected vs teacher."""
        if student_hidden.shape[:-1] != teacher_hidden.shape[:-1]:
            raise ValueError(
                f"student hidden {tuple(student_hidden.shape)} and teacher hidden "
                f"{tuple(teacher_hidden.shape)} must agree on every dim but the last"
            )
        teacher = _rows(teacher_hidden, mask, "teacher hidden states")
        student = _rows(student_hidden, mask, "student hidden states").to(self.projection.weight.dtype)
        projected = self.projection(student).float()
        if self.kind == "cosine":
            return _mean_rows(1.0 - F.cosine_similarity(projected, teacher, dim=-1))
        return (projected - teacher).pow(2).sum() / max(teacher.numel(), 1)


def attention_transfer(
    student_attn: Tensor, teacher_attn: Tensor, mask: Tensor | None = None, eps: float = 1e-8
) -> Tensor:
    """KL(teacher || student) between head-averaged attention rows [B, H, L, L], mean over valid queries."""
    student = student_attn.float().mean(1) if student_attn.dim() == 4 else student_attn.float()
    teacher = teacher_attn.float().mean(1) if teacher_attn.dim() == 4 else teacher_attn.float()
    if student.shape != teacher.shape:
        raise ValueError(
            f"student attention {tuple(student_attn.shape)} and teacher attention "
            f"{tuple(teacher_attn.shape)} must agree on batch and sequence length (heads may differ)"
        )
    s_rows, t_rows = _rows(student, mask, "attention maps"), _rows(teacher, mask, "attention maps")
    return _mean_rows((t_rows * (t_rows.clamp_min(eps).log() - s_rows.clamp_min(eps).log())).sum(-1))


# --- layer 3: the functions of the declared loss terms (distill_core.loss_terms), and their weighted sum -----


@dataclass(frozen=True)
class _Term:
    name: str  # key of the logged value: the function, plus "_<index>" when a function appears twice
    function: str
    weight: float
    temperature: float
    beta: float
    alpha: float


@dataclass(frozen=True)
class _Step:
    """What one training step offers the terms."""

    student: Outputs
    signal: Signal | None
    labels: Tensor | None
    mask: Tensor | None
    modules: nn.ModuleDict  # the terms' own parameters (feature projections), by term name

    @property
    def token_mask(self) -> Tensor | None:
        return self.mask if self.student.token_mask is None else self.student.token_mask


Compute = Callable[[_Term, _Step], Tensor]
_COMPUTE: dict[str, Compute] = {}  # each declared term's function


def implements(*names: str) -> Callable[[Compute], Compute]:
    """Make a function the computation of the loss terms `names`, as declared in distill_core.loss_terms."""

    def add(compute: Compute) -> Compute:
        for name in names:
            if name not in LOSS_TERMS:
                raise ValueError(f"loss term {name!r} is not declared in distill_core.loss_terms")
            if name in _COMPUTE:
                raise ValueError(f"loss term {name!r} is implemented twice")
            _COMPUTE[name] = compute
        return compute

    return add


_READINGS = {"zero": "a renormalised top-k", "tail": "a top-k with a rest bucket", "sampled": "a sampled"}


def _reading(signal: SparseSignal) -> str:
    return "sampled" if signal.weights is not None else signal.missing_mass


def _buckets(term: _Term, step: _Step, signal: SparseSignal) -> tuple[Tensor, Tensor]:
    return sparse_buckets(
        step.student.logits,
        signal.ids,
        signal.logprobs,
        term.temperature,
        step.mask,
        signal.missing_mass,
        signal.temperature,
        signal.tail,
    )


def _pair(term: _Term, step: _Step) -> tuple[Tensor, Tensor]:
    """Student and teacher log-probabilities at the term's temperature: over the full distribution, or over the
    top-k outcomes plus the rest bucket; any other signal does not define the term, which is refused by name."""
    signal = step.signal
    if isinstance(signal, SparseSignal):
        if _reading(signal) != "tail":
            raise ValueError(
                f"loss term {term.name!r} is not defined over {_READINGS[_reading(signal)]} teacher signal: store "
                "top-k with a rest bucket (soft_labels.tail: rest), run the teacher in the loop, or use forward_kl"
            )
        return _buckets(term, step, signal)
    assert isinstance(signal, DenseSignal)
    return _log_probs(step.student.logits, signal.logits, term.temperature, step.mask)


def _chunk_sum(
    rows: Callable[..., Tensor],
    extra: dict[str, float],
    temperature: float,
    head: Callable[[Tensor], Tensor],
    student: Tensor,
    hidden: Tensor,
    mask: Tensor | None,
) -> Tensor:
    """One chunk of positions: the teacher's logits made from its hidden states, the rows' values summed."""
    with torch.no_grad():
        teacher = head(hidden).float()
    _check_same_shape(student, teacher)
    log_s = F.log_softmax(student.float() / temperature, dim=-1)
    per_row = rows(log_s, F.log_softmax(teacher / temperature, dim=-1), **extra)
    return (per_row if mask is None else torch.where(mask, per_row, 0.0)).sum()


def _chunked_mean(rows: Callable[..., Tensor], term: _Term, step: _Step, signal: HeadSignal, **extra: float) -> Tensor:
    """Mean of `rows` over the positions that count, a chunk of positions at a time. Each chunk is checkpointed:
    only its inputs (views of the student's logits and the teacher's hidden states) are kept for the backward
    pass, which makes the chunk's distributions again, so peak memory holds one chunk's, not the batch's."""
    _check_temperature(term.temperature)
    student, hidden, mask = step.student.logits, signal.hidden, step.mask
    positions = tuple(student.shape[:-1])
    if tuple(hidden.shape[:-1]) != positions or (mask is not None and tuple(mask.shape) != positions):
        raise ValueError(
            f"student logits {tuple(student.shape)}, teacher hidden states {tuple(hidden.shape)} and mask "
            f"{None if mask is None else tuple(mask.shape)} do not cover the same positions"
        )
    students = student.reshape(-1, student.shape[-1]).split(signal.chunk)
    hiddens = hidden.reshape(-1, hidden.shape[-1]).split(signal.chunk)
    masks = [None] * len(students) if mask is None else list(mask.reshape(-1).bool().split(signal.chunk))
    one = functools.partial(_chunk_sum, rows, extra, term.temperature, signal.head)
    total = student.new_zeros((), dtype=torch.float32)
    for s, h, m in zip(students, hiddens, masks, strict=True):
        total = total + checkpoint(one, s, h, m, use_reentrant=False)
    count = math.prod(positions) if mask is None else int(mask.sum())
    return total / max(count, 1)


def _divergence(rows: Callable[..., Tensor], shape: str | None = None) -> Compute:
    def compute(term: _Term, step: _Step) -> Tensor:
        extra = {} if shape is None else {shape: getattr(term, shape)}
        if isinstance(step.signal, HeadSignal):
            return _chunked_mean(rows, term, step, step.signal, **extra) * term.temperature**2
        return _mean_rows(rows(*_pair(term, step), **extra)) * term.temperature**2

    return compute


@implements("forward_kl")
def _forward_kl_term(term: _Term, step: _Step) -> Tensor:
    """Dense: forward_kl; top-k: over its entries, the left-out mass as it says; sampled: the unbiased estimate."""
    signal = step.signal
    if isinstance(signal, SparseSignal) and signal.weights is not None:
        if abs(term.temperature - signal.temperature) > 1e-9:
            raise ValueError(
                f"loss term {term.name!r} reads a signal drawn at temperature {signal.temperature} at "
                f"{term.temperature}: a sampled signal is read at the temperature it was drawn at"
            )
        return sampled_forward_kl(
            step.student.logits, signal.ids, signal.logprobs, signal.weights, term.temperature, step.mask
        )
    if isinstance(signal, SparseSignal):
        return _mean_rows(_forward_rows(*_buckets(term, step, signal))) * term.temperature**2
    return _divergence(_forward_rows)(term, step)


implements("reverse_kl")(_divergence(_reverse_rows))
implements("generalized_jsd")(_divergence(_jsd_rows, "beta"))
implements("skew_kl")(_divergence(_skew_rows, "alpha"))
implements("skew_reverse_kl")(_divergence(_skew_reverse_rows, "alpha"))


@implements("ce")
def _ce_term(term: _Term, step: _Step) -> Tensor:
    """Hard-label cross-entropy; no labels (an unlabelled transfer batch): nothing to fit, 0."""
    if step.labels is None:
        return step.student.logits.new_zeros((), dtype=torch.float32)
    return hard_label_ce(step.student.logits, step.labels, step.mask)


@implements("feature", "feature_cosine")  # the projection's kind (mse, cosine) is the declaration's
def _feature_term(term: _Term, step: _Step) -> Tensor:
    assert step.signal is not None and step.student.hidden_states is not None
    assert isinstance(step.signal, DenseSignal) and step.signal.hidden_states is not None
    return step.modules[term.name](step.student.hidden_states, step.signal.hidden_states, step.token_mask)


@implements("attention")
def _attention_term(term: _Term, step: _Step) -> Tensor:
    assert isinstance(step.signal, DenseSignal) and step.signal.attentions is not None
    assert step.student.attentions is not None
    return attention_transfer(step.student.attentions, step.signal.attentions, step.token_mask)


_UNIMPLEMENTED = sorted(set(LOSS_TERMS) - set(_COMPUTE))
if _UNIMPLEMENTED:
    raise ImportError(f"loss terms declared without a function in distill_core.losses: {_UNIMPLEMENTED}")
TERM_FUNCTIONS: tuple[str, ...] = tuple(LOSS_TERMS)
_DEFAULTS = {"weight": 1.0, "temperature": 1.0, "beta": 0.5, "alpha": 0.1}


def _field(spec: object, name: str, default: Any) -> Any:
    value = spec.get(name) if isinstance(spec, Mapping) else getattr(spec, name, None)
    return default if value is None else value


def _missing(spec: LossSpec, step: _Step) -> list[str]:
    """The tensors a term needs that this step does not have, by the names the objective's callers know."""
    signal = step.signal if isinstance(step.signal, DenseSignal) else None
    offered: dict[str, list[tuple[str, object]]] = {
        TEACHER_LOGITS: [("teacher_logits", step.signal)],
        HIDDEN_STATES: [
            ("student_hidden", step.student.hidden_states),
            ("teacher_hidden", None if signal is None else signal.hidden_states),
        ],
        ATTENTIONS: [
            ("student_attention", step.student.attentions),
            ("teacher_attention", None if signal is None else signal.attentions),
        ],
    }
    return [name for need in sorted(spec.needs & set(offered)) for name, value in offered[need] if value is None]


class DistillationObjective(nn.Module):
    """Weighted sum of declared terms `{function, weight, temperature, beta, alpha}`; owns the projections."""

    def __init__(self, terms: Sequence[object], student_dim: int | None = None, teacher_dim: int | None = None) -> None:
        super().__init__()
        if not terms:
            raise ValueError(f"the loss list is empty; add a term, function one of {', '.join(LOSS_TERMS)}")
        self.terms: list[_Term] = []
        self.feature_losses = nn.ModuleDict()
        functions = [_field(spec, "function", None) for spec in terms]
        for index, (spec, function) in enumerate(zip(terms, functions, strict=True)):
            if function not in LOSS_TERMS:
                raise ValueError(f"loss term {index}: unknown function {function!r}; allowed: {', '.join(LOSS_TERMS)}")
            name = function if functions.count(function) == 1 else f"{function}_{index}"
            fields = {key: float(_field(spec, key, default)) for key, default in _DEFAULTS.items()}
            term = _Term(name=name, function=function, **fields)
            where = f"loss term {index} ({name!r})"
            if term.weight < 0 or term.temperature <= 0:
                raise ValueError(
                    f"{where}: need weight >= 0 and temperature > 0, got {term.weight}, {term.temperature}"
                )
            if not (0.0 <= term.beta <= 1.0 and 0.0 <= term.alpha <= 1.0):
                raise ValueError(f"{where}: beta and alpha must be in [0, 1], got {term.beta}, {term.alpha}")
            projection = LOSS_TERMS[function].projection
            if projection is not None:
                if student_dim is None or teacher_dim is None:
                    raise ValueError(
                        f"{where} needs student_dim and teacher_dim to build its projection: "
                        "DistillationObjective(terms, student_dim=..., teacher_dim=...)"
                    )
                self.feature_losses[name] = FeatureLoss(student_dim, teacher_dim, projection)
            self.terms.append(term)
        needs = set().union(*(LOSS_TERMS[t.function].needs for t in self.terms))
        self.needs_teacher_logits = TEACHER_LOGITS in needs
        self.needs_hidden_states = HIDDEN_STATES in needs
        self.needs_attentions = ATTENTIONS in needs

    @property
    def needs_features(self) -> bool:
        """Whether a step must bring the student's and the teacher's hidden states or attention maps."""
        return self.needs_hidden_states or self.needs_attentions

    def forward(
        self,
        student: Outputs,
        signal: Signal | None = None,
        labels: Tensor | None = None,
        mask: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, float]]:
        """Return the weighted total and every term's unweighted value, as floats for logging."""
        step = _Step(student, signal, labels, mask, self.feature_losses)
        total = student.logits.new_zeros((), dtype=torch.float32)
        values: dict[str, float] = {}
        for term in self.terms:
            missing = _missing(LOSS_TERMS[term.function], step)
            if missing:
                raise ValueError(
                    f"loss term {term.name!r} needs {' and '.join(missing)}, which this step did not provide; "
                    "pass them to the objective or remove the term from the loss list"
                )
            value = _COMPUTE[term.function](term, step)
            total = total + term.weight * value
            values[term.name] = float(value.detach())
        return total, values
