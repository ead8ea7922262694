"""Distillation losses in three layers: divergences, KD losses built on them, a weighted sum from config.

Divergences take logits `[batch, classes]` or `[batch, seq, vocab]` and an optional `mask` shaped like the
logits without the last dim (True = counts). They compute in float32 and average over the positions that
count; a fully masked batch gives 0, not NaN. Teacher tensors are not detached: compute them under no_grad.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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


def _log_probs(student: Tensor, teacher: Tensor, temperature: float, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """Student and teacher log-probabilities at `temperature` over the rows that count."""
    _check_temperature(temperature)
    if student.shape != teacher.shape:
        raise ValueError(
            f"student logits {tuple(student.shape)} and teacher logits {tuple(teacher.shape)} differ: "
            "the vocabularies must match (truncate a padded vocab first)"
        )
    log_s = F.log_softmax(_rows(student, mask, "student logits") / temperature, dim=-1)
    return log_s, F.log_softmax(_rows(teacher, mask, "teacher logits") / temperature, dim=-1)


# --- layer 1: divergences, all times T**2 so gradients keep their size across temperatures (Hinton 2015) ----


def forward_kl(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0, mask: Tensor | None = None
) -> Tensor:
    """KL(p_teacher || p_student) at temperature T, times T**2: the classic, mean-seeking KD loss."""
    log_s, log_t = _log_probs(student_logits, teacher_logits, temperature, mask)
    return _mean_rows(_kl_rows(log_t, log_s)) * temperature**2


def reverse_kl(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0, mask: Tensor | None = None
) -> Tensor:
    """KL(p_student || p_teacher) at temperature T, times T**2: mode-seeking (MiniLLM)."""
    log_s, log_t = _log_probs(student_logits, teacher_logits, temperature, mask)
    return _mean_rows(_kl_rows(log_s, log_t)) * temperature**2


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
    if beta == 0.0:
        return forward_kl(student_logits, teacher_logits, temperature, mask)
    if beta == 1.0:
        return reverse_kl(student_logits, teacher_logits, temperature, mask)
    log_s, log_t = _log_probs(student_logits, teacher_logits, temperature, mask)
    log_m = _mix(log_t, log_s, beta)
    return _mean_rows(beta * _kl_rows(log_t, log_m) + (1 - beta) * _kl_rows(log_s, log_m)) * temperature**2


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
    return _mean_rows(_kl_rows(log_t, _mix(log_t, log_s, alpha))) * temperature**2


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
    return _mean_rows(_kl_rows(log_s, _mix(log_s, log_t, alpha))) * temperature**2


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
    keep = labels != ignore_index
    if mask is not None:
        if mask.shape != labels.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} does not fit labels {tuple(labels.shape)}")
        keep = keep & mask.bool()
    logits = student_logits[keep].float()
    return F.cross_entropy(logits, labels[keep], reduction="sum") / max(logits.shape[0], 1)


def sparse_forward_kl(
    student_logits: Tensor,
    topk_ids: Tensor,
    topk_logprobs: Tensor,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    missing_mass: str = "zero",
) -> Tensor:
    """Forward KL, times T**2, against a teacher stored as top-k ids and log-probs taken at temperature 1.

    T is re-applied to the stored probabilities as p**(1/T), renormalised (DistillKit's rule).
    "zero": both sides renormalised over the teacher's top-k ids. "tail": a (k+1)-th bucket holds each side's
    leftover mass (clamped >= 1e-8); p**(1/T) amplifies a tiny leftover, so use it when top-k leaves mass out.
    """
    if missing_mass not in ("zero", "tail"):
        raise ValueError(f"missing_mass must be 'zero' or 'tail', got {missing_mass!r}")
    _check_temperature(temperature)
    if topk_ids.shape != topk_logprobs.shape or topk_ids.shape[:-1] != student_logits.shape[:-1]:
        raise ValueError(
            f"top-k ids {tuple(topk_ids.shape)} and log-probs {tuple(topk_logprobs.shape)} must both be "
            f"{tuple(student_logits.shape[:-1])} + (k,) to match student logits {tuple(student_logits.shape)}"
        )
    student = F.log_softmax(_rows(student_logits, mask, "student logits") / temperature, dim=-1)
    student_k = student.gather(-1, topk_ids.reshape(-1, topk_ids.shape[-1]) if mask is None else topk_ids[mask.bool()])
    stored = _rows(topk_logprobs, mask, "top-k log-probs")
    if missing_mass == "tail":
        teacher_left = -torch.expm1(torch.logsumexp(stored, dim=-1, keepdim=True))
        student_left = -torch.expm1(torch.logsumexp(student_k, dim=-1, keepdim=True))
        stored = torch.cat([stored, teacher_left.clamp_min(TAIL_EPS).log()], dim=-1)
        student_k = torch.cat([student_k, student_left.clamp_min(TAIL_EPS).log()], dim=-1)
    log_t = F.log_softmax(stored / temperature, dim=-1)
    return _mean_rows(_kl_rows(log_t, F.log_softmax(student_k, dim=-1))) * temperature**2


# --- layer 2: KD losses -------------------------------------------------------------------------------------


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor | None,
    alpha: float = 0.5,
    temperature: float = 2.0,
    divergence: str = "forward_kl",
    mask: Tensor | None = None,
) -> Tensor:
    """Hinton KD: alpha * divergence at T + (1 - alpha) * hard-label CE.

    Rows labelled -100, or every row when labels is None, add nothing to the CE part but still count for the
    divergence: an unlabelled batch gives alpha * divergence. Use alpha=1.0 for pure transfer.
    """
    _check_unit("alpha", alpha)
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; allowed: {', '.join(DIVERGENCES)}")
    loss = alpha * DIVERGENCES[divergence](student_logits, teacher_logits, temperature=temperature, mask=mask)
    if labels is not None and alpha < 1.0:
        loss = loss + (1.0 - alpha) * hard_label_ce(student_logits, labels, mask=mask)
    return loss


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


def spatial_attention_transfer(student_feat: Tensor, teacher_feat: Tensor, p: int = 2) -> Tensor:
    """Zagoruyko & Komodakis AT on conv features [B, C, H, W]: mean squared gap of normalised maps."""
    if student_feat.shape[0] != teacher_feat.shape[0] or student_feat.shape[2:] != teacher_feat.shape[2:]:
        raise ValueError(
            f"student features {tuple(student_feat.shape)} and teacher features {tuple(teacher_feat.shape)} "
            "must agree on batch and spatial dims (channels may differ); resize one side first"
        )

    def attention_map(feat: Tensor) -> Tensor:
        return F.normalize(feat.float().abs().pow(p).mean(1).flatten(1), dim=1)

    return (attention_map(student_feat) - attention_map(teacher_feat)).pow(2).mean()


# --- layer 3: a weighted sum of terms from a config list (dicts or objects with the same fields) ------------

TERM_FUNCTIONS: tuple[str, ...] = (*DIVERGENCES, "ce", "feature", "attention")
_SHAPE_PARAMETER = {"generalized_jsd": "beta", "skew_kl": "alpha", "skew_reverse_kl": "alpha"}
_DEFAULTS = {"weight": 1.0, "temperature": 1.0, "beta": 0.5, "alpha": 0.1}


@dataclass(frozen=True)
class _Term:
    name: str  # key of the logged value: the function, plus "_<index>" when a function appears twice
    function: str
    weight: float
    temperature: float
    beta: float
    alpha: float


def _field(spec: object, name: str, default: Any) -> Any:
    value = spec.get(name) if isinstance(spec, Mapping) else getattr(spec, name, None)
    return default if value is None else value


def _require(term: str, **inputs: Tensor | None) -> None:
    missing = [key for key, value in inputs.items() if value is None]
    if missing:
        raise ValueError(
            f"loss term {term!r} needs {' and '.join(missing)}, which this step did not provide; "
            "pass them to the objective or remove the term from the loss list"
        )


class DistillationObjective(nn.Module):
    """Weighted sum of terms `{function, weight, temperature, beta, alpha, kind}`; owns the projections."""

    def __init__(self, terms: Sequence[object], student_dim: int | None = None, teacher_dim: int | None = None) -> None:
        super().__init__()
        if not terms:
            raise ValueError(f"the loss list is empty; add a term, function one of {', '.join(TERM_FUNCTIONS)}")
        self.terms: list[_Term] = []
        self.feature_losses = nn.ModuleDict()
        functions = [_field(spec, "function", None) for spec in terms]
        for index, (spec, function) in enumerate(zip(terms, functions, strict=True)):
            if function not in TERM_FUNCTIONS:
                raise ValueError(
                    f"loss term {index}: unknown function {function!r}; allowed: {', '.join(TERM_FUNCTIONS)}"
                )
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
            if function == "feature":
                if student_dim is None or teacher_dim is None:
                    raise ValueError(
                        f"{where} needs student_dim and teacher_dim to build its projection: "
                        "DistillationObjective(terms, student_dim=..., teacher_dim=...)"
                    )
                kind = _field(spec, "kind", "mse")
                self.feature_losses[name] = FeatureLoss(student_dim, teacher_dim, kind)
            self.terms.append(term)
        self.needs_teacher_logits = any(t.function in DIVERGENCES for t in self.terms)
        self.needs_hidden_states = any(t.function == "feature" for t in self.terms)
        self.needs_attentions = any(t.function == "attention" for t in self.terms)

    def forward(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor | None = None,
        labels: Tensor | None = None,
        mask: Tensor | None = None,
        student_hidden: Tensor | None = None,
        teacher_hidden: Tensor | None = None,
        student_attention: Tensor | None = None,
        teacher_attention: Tensor | None = None,
        sequence_mask: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, float]]:
        """Return the weighted total and every term's unweighted value, as floats for logging.

        `sequence_mask` masks the feature and attention terms when they run over tokens while the logits do
        not (a sequence classifier); it defaults to `mask`.
        """
        token_mask = mask if sequence_mask is None else sequence_mask
        total = student_logits.new_zeros((), dtype=torch.float32)
        values: dict[str, float] = {}
        for term in self.terms:
            if term.function in DIVERGENCES:
                _require(term.name, teacher_logits=teacher_logits)
                assert teacher_logits is not None
                shape = _SHAPE_PARAMETER.get(term.function)
                extra = {} if shape is None else {shape: getattr(term, shape)}
                divergence = DIVERGENCES[term.function]
                value = divergence(student_logits, teacher_logits, temperature=term.temperature, mask=mask, **extra)
            elif term.function == "ce":  # no labels (an unlabelled transfer batch): nothing to fit, 0
                value = total.new_zeros(()) if labels is None else hard_label_ce(student_logits, labels, mask)
            elif term.function == "feature":
                _require(term.name, student_hidden=student_hidden, teacher_hidden=teacher_hidden)
                assert student_hidden is not None and teacher_hidden is not None
                value = self.feature_losses[term.name](student_hidden, teacher_hidden, token_mask)
            else:
                _require(term.name, student_attention=student_attention, teacher_attention=teacher_attention)
                assert student_attention is not None and teacher_attention is not None
                value = attention_transfer(student_attention, teacher_attention, token_mask)
            total = total + term.weight * value
            values[term.name] = float(value.detach())
        return total, values
