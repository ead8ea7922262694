"""Distillation losses: golden values from plain formulas, the properties each divergence must have, and the
weighted objective built from a loss list."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from distill_core.losses import (
    DIVERGENCES,
    TERM_FUNCTIONS,
    DistillationObjective,
    FeatureLoss,
    attention_transfer,
    forward_kl,
    generalized_jsd,
    hard_label_ce,
    reverse_kl,
    sampled_forward_kl,
    skew_kl,
    skew_reverse_kl,
    sparse_forward_kl,
)
from distill_core.signals import DenseSignal, Outputs, SparseSignal

# Two rows of three-class logits, written by hand.
STUDENT = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
TEACHER = [[2.0, 1.0, 0.0], [0.5, 0.5, 2.0]]


def np_softmax(logits: list[list[float]], temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / temperature
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def np_kl(p: np.ndarray, q: np.ndarray) -> float:
    """Mean over rows of sum_i p_i * log(p_i / q_i)."""
    return float(np.mean(np.sum(p * np.log(p / q), axis=-1)))


def t(values: list[list[float]]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def random_logits(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 2.0


# --- golden values ------------------------------------------------------------------------------------------


def test_forward_kl_matches_closed_form_on_two_classes():
    # teacher (0.5, 0.5), student (0.25, 0.75): KL = 0.5 ln(0.5/0.25) + 0.5 ln(0.5/0.75) = 0.5 ln(4/3)
    student = t([[0.0, math.log(3.0)]])
    teacher = t([[0.0, 0.0]])
    assert forward_kl(student, teacher).item() == pytest.approx(0.5 * math.log(4 / 3), abs=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_forward_kl_golden(temperature):
    p_t, p_s = np_softmax(TEACHER, temperature), np_softmax(STUDENT, temperature)
    expected = temperature**2 * np_kl(p_t, p_s)
    got = forward_kl(t(STUDENT), t(TEACHER), temperature=temperature).item()
    assert got == pytest.approx(expected, rel=1e-5)


def test_forward_kl_at_t2_is_four_times_the_plain_kl_of_softened_distributions():
    p_t, p_s = np_softmax(TEACHER, 2.0), np_softmax(STUDENT, 2.0)
    assert forward_kl(t(STUDENT), t(TEACHER), temperature=2.0).item() == pytest.approx(4 * np_kl(p_t, p_s), rel=1e-5)


def test_reverse_kl_golden():
    p_t, p_s = np_softmax(TEACHER), np_softmax(STUDENT)
    assert reverse_kl(t(STUDENT), t(TEACHER)).item() == pytest.approx(np_kl(p_s, p_t), rel=1e-5)


def test_jsd_half_golden():
    p_t, p_s = np_softmax(TEACHER), np_softmax(STUDENT)
    m = 0.5 * p_t + 0.5 * p_s
    expected = 0.5 * np_kl(p_t, m) + 0.5 * np_kl(p_s, m)
    assert generalized_jsd(t(STUDENT), t(TEACHER), beta=0.5).item() == pytest.approx(expected, rel=1e-5)


def test_jsd_golden_at_beta_0_3_and_t2():
    p_t, p_s = np_softmax(TEACHER, 2.0), np_softmax(STUDENT, 2.0)
    m = 0.3 * p_t + 0.7 * p_s
    expected = 4 * (0.3 * np_kl(p_t, m) + 0.7 * np_kl(p_s, m))
    got = generalized_jsd(t(STUDENT), t(TEACHER), beta=0.3, temperature=2.0).item()
    assert got == pytest.approx(expected, rel=1e-5)


def test_skew_kl_golden():
    p_t, p_s = np_softmax(TEACHER), np_softmax(STUDENT)
    assert skew_kl(t(STUDENT), t(TEACHER), alpha=0.1).item() == pytest.approx(
        np_kl(p_t, 0.1 * p_t + 0.9 * p_s), rel=1e-5
    )
    assert skew_reverse_kl(t(STUDENT), t(TEACHER), alpha=0.1).item() == pytest.approx(
        np_kl(p_s, 0.1 * p_s + 0.9 * p_t), rel=1e-5
    )


def test_hard_label_ce_golden():
    p_s = np_softmax(STUDENT)
    expected = -(math.log(p_s[0, 1]) + math.log(p_s[1, 2])) / 2
    assert hard_label_ce(t(STUDENT), torch.tensor([1, 2])).item() == pytest.approx(expected, rel=1e-5)


def test_sparse_tail_golden_on_top2_of_4():
    student, teacher = [[0.3, -0.2, 1.0, 0.1]], [[2.0, 1.0, 0.5, -1.0]]
    p_t, p_s = np_softmax(teacher)[0], np_softmax(student)[0]
    top = [0, 1]
    p = np.array([p_t[0], p_t[1], 1 - p_t[top].sum()])
    q = np.array([p_s[0], p_s[1], 1 - p_s[top].sum()])
    expected = float(np.sum(p * np.log(p / q)))
    ids = torch.tensor([top])
    logprobs = torch.log_softmax(t(teacher), -1)[:, top]
    got = sparse_forward_kl(t(student), ids, logprobs, missing_mass="tail").item()
    assert got == pytest.approx(expected, rel=1e-5)
    zero_p, zero_q = p[:2] / p[:2].sum(), q[:2] / q[:2].sum()
    got_zero = sparse_forward_kl(t(student), ids, logprobs, missing_mass="zero").item()
    assert got_zero == pytest.approx(float(np.sum(zero_p * np.log(zero_p / zero_q))), rel=1e-5)


# --- properties of every divergence -------------------------------------------------------------------------

ALL_DIVERGENCES = sorted(DIVERGENCES)


@pytest.mark.parametrize("name", ALL_DIVERGENCES)
@pytest.mark.parametrize("shape", [(4, 7), (2, 5, 7)])
def test_zero_on_identical_inputs(name, shape):
    logits = random_logits(*shape, seed=0)
    assert DIVERGENCES[name](logits, logits.clone(), temperature=2.0).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("name", ALL_DIVERGENCES)
def test_positive_on_different_inputs(name):
    student, teacher = random_logits(2, 5, 7, seed=1), random_logits(2, 5, 7, seed=2)
    assert DIVERGENCES[name](student, teacher).item() > 1e-3


def test_reverse_kl_is_forward_kl_with_arguments_swapped():
    student, teacher = random_logits(2, 5, 7, seed=3), random_logits(2, 5, 7, seed=4)
    for temperature in (1.0, 3.0):
        assert reverse_kl(student, teacher, temperature).item() == pytest.approx(
            forward_kl(teacher, student, temperature).item(), rel=1e-6
        )


def test_jsd_endpoints_are_forward_and_reverse_kl_exactly():
    student, teacher = random_logits(3, 7, seed=5), random_logits(3, 7, seed=6)
    assert torch.equal(generalized_jsd(student, teacher, beta=0.0, temperature=2.0), forward_kl(student, teacher, 2.0))
    assert torch.equal(generalized_jsd(student, teacher, beta=1.0, temperature=2.0), reverse_kl(student, teacher, 2.0))


def test_jsd_at_half_is_symmetric():
    student, teacher = random_logits(2, 5, 7, seed=7), random_logits(2, 5, 7, seed=8)
    assert generalized_jsd(student, teacher, 0.5).item() == pytest.approx(
        generalized_jsd(teacher, student, 0.5).item(), rel=1e-6
    )
    assert generalized_jsd(student, teacher, 0.5).item() <= math.log(2) + 1e-6  # JSD is bounded by ln 2


def test_skew_kl_with_alpha_zero_is_forward_kl():
    student, teacher = random_logits(3, 7, seed=9), random_logits(3, 7, seed=10)
    assert skew_kl(student, teacher, alpha=0.0).item() == pytest.approx(forward_kl(student, teacher).item(), rel=1e-6)


MASK = torch.tensor([[True, True, False, False], [True, False, True, True]])


@pytest.mark.parametrize("name", ALL_DIVERGENCES)
def test_masked_positions_do_not_change_the_loss(name):
    student, teacher = random_logits(2, 4, 6, seed=11), random_logits(2, 4, 6, seed=12)
    loss = DIVERGENCES[name](student, teacher, temperature=2.0, mask=MASK)
    noisy_student, noisy_teacher = student.clone(), teacher.clone()
    noisy_student[~MASK] = 100.0 * random_logits(3, 6, seed=13)
    noisy_teacher[~MASK] = -50.0
    noisy = DIVERGENCES[name](noisy_student, noisy_teacher, temperature=2.0, mask=MASK)
    assert noisy.item() == pytest.approx(loss.item(), rel=1e-6)


@pytest.mark.parametrize("name", ALL_DIVERGENCES)
def test_sequence_loss_with_mask_equals_row_loss_over_selected_positions(name):
    student, teacher = random_logits(2, 4, 6, seed=14), random_logits(2, 4, 6, seed=15)
    masked = DIVERGENCES[name](student, teacher, mask=MASK.int())  # a 0/1 mask works like a bool one
    rows = DIVERGENCES[name](student[MASK], teacher[MASK])
    assert masked.item() == pytest.approx(rows.item(), rel=1e-6)


@pytest.mark.parametrize("name", [*ALL_DIVERGENCES, "sparse_forward_kl", "hard_label_ce"])
def test_fully_masked_batch_gives_zero_and_backward_works(name):
    student = random_logits(2, 4, 6, seed=16).requires_grad_()
    teacher = random_logits(2, 4, 6, seed=17)
    nothing = torch.zeros(2, 4, dtype=torch.bool)
    if name == "sparse_forward_kl":
        topk = teacher.log_softmax(-1).topk(3, dim=-1)
        loss = sparse_forward_kl(student, topk.indices, topk.values, mask=nothing, missing_mass="tail")
    elif name == "hard_label_ce":
        loss = hard_label_ce(student, torch.zeros(2, 4, dtype=torch.long), mask=nothing)
    else:
        loss = DIVERGENCES[name](student, teacher, mask=nothing)
    assert loss.item() == 0.0
    loss.backward()
    assert student.grad is not None and torch.all(student.grad == 0)


def test_mask_of_wrong_shape_is_rejected_with_the_expected_shape():
    student = random_logits(2, 4, 6, seed=18)
    with pytest.raises(ValueError, match=r"expected \(2, 4\)"):
        forward_kl(student, student, mask=torch.ones(2, 5, dtype=torch.bool))


def test_different_vocab_sizes_are_rejected():
    with pytest.raises(ValueError, match="vocabularies must match"):
        forward_kl(random_logits(2, 6, seed=0), random_logits(2, 7, seed=0))


@pytest.mark.parametrize("name", ALL_DIVERGENCES)
def test_student_gets_finite_nonzero_gradients(name):
    student = random_logits(2, 4, 6, seed=19).requires_grad_()
    teacher = random_logits(2, 4, 6, seed=20)
    DIVERGENCES[name](student, teacher, temperature=2.0, mask=MASK).backward()
    assert student.grad is not None and torch.isfinite(student.grad).all()
    assert student.grad[MASK].abs().sum() > 0
    assert torch.all(student.grad[~MASK] == 0)


@pytest.mark.parametrize("name", ALL_DIVERGENCES)
def test_padded_vocab_columns_at_minus_inf_are_ignored(name):
    # Vocab padding masked with -inf on both sides must not turn the loss or its gradient into NaN.
    student, teacher = random_logits(3, 6, seed=50), random_logits(3, 6, seed=51)
    padded_student = torch.cat([student, torch.full((3, 2), float("-inf"))], dim=-1).requires_grad_()
    padded_teacher = torch.cat([teacher, torch.full((3, 2), float("-inf"))], dim=-1)
    loss = DIVERGENCES[name](padded_student, padded_teacher, temperature=2.0)
    loss.backward()
    assert loss.item() == pytest.approx(DIVERGENCES[name](student, teacher, temperature=2.0).item(), rel=1e-6)
    assert padded_student.grad is not None and torch.isfinite(padded_student.grad).all()


def test_half_precision_logits_are_computed_in_float32():
    student, teacher = random_logits(2, 4, 6, seed=21), random_logits(2, 4, 6, seed=22)
    loss = forward_kl(student.bfloat16(), teacher.bfloat16())
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(forward_kl(student.bfloat16().float(), teacher.bfloat16().float()).item())


# --- KD loss: the alpha-mix of a divergence and hard-label CE, as a recipe writes it -------------------------


def kd_loss(student, teacher, labels, alpha=0.5, temperature=2.0, divergence="forward_kl", mask=None):
    """Hinton KD as two weighted terms of the objective: alpha * divergence at T + (1 - alpha) * CE."""
    objective = DistillationObjective(
        [
            {"function": divergence, "weight": alpha, "temperature": temperature},
            {"function": "ce", "weight": 1.0 - alpha},
        ]
    )
    return objective(Outputs(student), DenseSignal(teacher), labels, mask)[0]


def test_kd_loss_alpha_endpoints():
    student, teacher, labels = t(STUDENT), t(TEACHER), torch.tensor([1, 2])
    pure_kd = kd_loss(student, teacher, labels, alpha=1.0, temperature=2.0)
    pure_ce = kd_loss(student, teacher, labels, alpha=0.0, temperature=2.0)
    assert pure_kd.item() == pytest.approx(forward_kl(student, teacher, 2.0).item())
    assert pure_ce.item() == pytest.approx(hard_label_ce(student, labels).item())
    half = kd_loss(student, teacher, labels, alpha=0.5, temperature=2.0, divergence="reverse_kl")
    assert half.item() == pytest.approx(0.5 * reverse_kl(student, teacher, 2.0).item() + 0.5 * pure_ce.item())


def test_labels_minus_100_are_ignored_by_the_ce_part():
    student = t(STUDENT)
    assert hard_label_ce(student, torch.tensor([1, -100])).item() == pytest.approx(
        hard_label_ce(student[:1], torch.tensor([1])).item()
    )
    assert hard_label_ce(student, torch.tensor([-100, -100])).item() == 0.0


def test_kd_loss_without_labels_is_the_scaled_divergence():
    student, teacher = t(STUDENT), t(TEACHER)
    unlabelled = kd_loss(student, teacher, None, alpha=0.7)
    all_ignored = kd_loss(student, teacher, torch.tensor([-100, -100]), alpha=0.7)
    assert unlabelled.item() == pytest.approx(0.7 * forward_kl(student, teacher, 2.0).item())
    assert all_ignored.item() == pytest.approx(unlabelled.item())


def test_kd_loss_on_sequences_uses_mask_and_ignore_index():
    student, teacher = random_logits(2, 4, 6, seed=23), random_logits(2, 4, 6, seed=24)
    labels = torch.tensor([[1, 2, 3, -100], [0, 5, -100, 4]])
    loss = kd_loss(student, teacher, labels, alpha=0.5, mask=MASK)
    counted = MASK & (labels != -100)
    expected_ce = torch.nn.functional.cross_entropy(student[counted], labels[counted])
    expected = 0.5 * forward_kl(student, teacher, 2.0, mask=MASK) + 0.5 * expected_ce
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


# --- sparse top-k teacher -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("missing_mass", "temperature"), [("zero", 1.0), ("zero", 2.0), ("tail", 1.0)])
def test_sparse_with_k_equal_to_vocab_matches_dense_forward_kl(missing_mass, temperature):
    student, teacher = random_logits(2, 4, 8, seed=25), random_logits(2, 4, 8, seed=26)
    topk = teacher.log_softmax(-1).topk(8, dim=-1)  # every token, in the teacher's order
    sparse = sparse_forward_kl(student, topk.indices, topk.values, temperature, MASK, missing_mass)
    dense = forward_kl(student, teacher, temperature, mask=MASK)
    assert sparse.item() == pytest.approx(dense.item(), rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_sparse_tail_with_small_k_is_finite_and_non_negative(temperature):
    student = random_logits(2, 4, 50, seed=27).requires_grad_()
    topk = random_logits(2, 4, 50, seed=28).log_softmax(-1).topk(5, dim=-1)
    loss = sparse_forward_kl(student, topk.indices, topk.values, temperature, missing_mass="tail")
    assert torch.isfinite(loss) and loss.item() >= 0
    loss.backward()
    assert student.grad is not None and torch.isfinite(student.grad).all()


def test_sparse_rejects_unknown_missing_mass_rule():
    topk = random_logits(2, 6, seed=0).log_softmax(-1).topk(2, dim=-1)
    with pytest.raises(ValueError, match="'zero' or 'tail'"):
        sparse_forward_kl(random_logits(2, 6, seed=1), topk.indices, topk.values, missing_mass="uniform")


# --- feature and attention losses ---------------------------------------------------------------------------


def test_feature_loss_is_zero_for_equal_dims_and_identical_states():
    hidden = random_logits(2, 4, 8, seed=29)
    assert FeatureLoss(8, 8)(hidden, hidden.clone(), mask=MASK).item() == pytest.approx(0.0, abs=1e-7)
    assert FeatureLoss(8, 8, kind="cosine")(hidden, hidden.clone()).item() == pytest.approx(0.0, abs=1e-6)


def test_feature_projection_receives_gradients_and_ignores_masked_positions():
    loss_fn = FeatureLoss(6, 10)
    student, teacher = random_logits(2, 4, 6, seed=30), random_logits(2, 4, 10, seed=31)
    loss = loss_fn(student, teacher, mask=MASK)
    loss.backward()
    grad = loss_fn.projection.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    changed = teacher.clone()
    changed[~MASK] = 1e3
    assert loss_fn(student, changed, mask=MASK).item() == pytest.approx(loss.item())
    expected = ((loss_fn.projection(student[MASK]) - teacher[MASK]) ** 2).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_feature_loss_works_on_pooled_states():
    loss_fn = FeatureLoss(6, 10, kind="cosine")
    assert loss_fn(random_logits(3, 6, seed=32), random_logits(3, 10, seed=33)).item() > 0


def attention_maps(batch: int, heads: int, length: int, seed: int) -> torch.Tensor:
    return random_logits(batch, heads, length, length, seed=seed).softmax(-1)


def test_attention_transfer_zero_for_identical_maps_and_positive_otherwise():
    teacher = attention_maps(2, 4, 5, seed=34)
    assert attention_transfer(teacher, teacher.clone()).item() == pytest.approx(0.0, abs=1e-6)
    student = attention_maps(2, 2, 5, seed=35)  # fewer heads than the teacher
    assert attention_transfer(student, teacher).item() > 0


def test_attention_transfer_with_masked_keys_and_queries():
    mask = torch.tensor([[True, True, True, False, False], [True, True, True, True, True]])
    key_bias = torch.where(mask, 0.0, float("-inf"))[:, None, None, :]
    student = (random_logits(2, 2, 5, 5, seed=36) + key_bias).softmax(-1).requires_grad_()
    teacher = (random_logits(2, 4, 5, 5, seed=37) + key_bias).softmax(-1)
    loss = attention_transfer(student, teacher, mask=mask)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 0
    assert student.grad is not None and torch.isfinite(student.grad).all()


# --- the weighted objective ---------------------------------------------------------------------------------


def test_objective_total_is_the_weighted_sum_of_its_terms():
    student, teacher = random_logits(2, 4, 6, seed=41), random_logits(2, 4, 6, seed=42)
    labels = torch.tensor([[1, 2, 3, -100], [0, 5, -100, 4]])
    objective = DistillationObjective(
        [
            {"function": "forward_kl", "weight": 0.7, "temperature": 2.0},
            {"function": "ce", "weight": 0.3},
            {"function": "generalized_jsd", "weight": 0.5, "beta": 0.3},
            {"function": "skew_kl", "weight": 0.2, "alpha": 0.2, "temperature": 1.5},
        ]
    )
    total, values = objective(Outputs(student), DenseSignal(teacher), labels=labels, mask=MASK)
    fkl = forward_kl(student, teacher, 2.0, MASK)
    ce = hard_label_ce(student, labels, MASK)
    jsd = generalized_jsd(student, teacher, 0.3, 1.0, MASK)
    skew = skew_kl(student, teacher, 0.2, 1.5, MASK)
    assert total.item() == pytest.approx((0.7 * fkl + 0.3 * ce + 0.5 * jsd + 0.2 * skew).item(), rel=1e-6)
    assert values == pytest.approx(
        {"forward_kl": fkl.item(), "ce": ce.item(), "generalized_jsd": jsd.item(), "skew_kl": skew.item()}
    )


def test_objective_accepts_spec_objects_and_names_repeated_functions_apart():
    @dataclass
    class Spec:
        function: str
        weight: float
        temperature: float = 1.0
        beta: float | None = None

    objective = DistillationObjective([Spec("forward_kl", 1.0, 1.0), Spec("forward_kl", 0.5, 4.0)])
    total, values = objective(Outputs(t(STUDENT)), DenseSignal(t(TEACHER)))
    assert set(values) == {"forward_kl_0", "forward_kl_1"}
    expected = forward_kl(t(STUDENT), t(TEACHER), 1.0) + 0.5 * forward_kl(t(STUDENT), t(TEACHER), 4.0)
    assert total.item() == pytest.approx(expected.item())


def test_objective_ce_only_needs_no_teacher_and_gives_zero_without_labels():
    objective = DistillationObjective([{"function": "ce", "weight": 1.0}])
    assert not objective.needs_teacher_logits
    total, _ = objective(Outputs(t(STUDENT)), labels=torch.tensor([1, 2]))
    assert total.item() == pytest.approx(hard_label_ce(t(STUDENT), torch.tensor([1, 2])).item())
    assert objective(Outputs(t(STUDENT)))[0].item() == 0.0


def test_objective_feature_term_trains_its_projection():
    objective = DistillationObjective(
        [{"function": "forward_kl", "weight": 1.0}, {"function": "feature", "weight": 0.1}],
        student_dim=6,
        teacher_dim=10,
    )
    assert objective.needs_hidden_states
    params = list(objective.parameters())
    assert len(params) == 1 and params[0].shape == (10, 6)
    student, teacher = random_logits(2, 4, 6, seed=43), random_logits(2, 4, 6, seed=44)
    s_hidden, t_hidden = random_logits(2, 4, 6, seed=45), random_logits(2, 4, 10, seed=46)
    total, values = objective(Outputs(student, hidden_states=s_hidden), DenseSignal(teacher, t_hidden), mask=MASK)
    expected = values["forward_kl"] + 0.1 * values["feature"]
    assert total.item() == pytest.approx(expected, rel=1e-6)
    total.backward()
    assert params[0].grad is not None and params[0].grad.abs().sum() > 0


def test_objective_attention_term():
    objective = DistillationObjective([{"function": "attention", "weight": 2.0}])
    student, teacher = attention_maps(2, 2, 4, seed=47), attention_maps(2, 4, 4, seed=48)
    total, values = objective(
        Outputs(random_logits(2, 4, 6, seed=0), attentions=student),
        DenseSignal(random_logits(2, 4, 6, seed=1), attentions=teacher),
    )
    assert total.item() == pytest.approx(2.0 * attention_transfer(student, teacher).item())


def test_unknown_function_error_lists_allowed_names():
    with pytest.raises(ValueError) as error:
        DistillationObjective([{"function": "kl", "weight": 1.0}])
    message = str(error.value)
    assert "'kl'" in message
    for name in TERM_FUNCTIONS:
        assert name in message


def test_missing_hidden_states_error_names_the_term():
    objective = DistillationObjective([{"function": "feature", "weight": 1.0}], student_dim=6, teacher_dim=6)
    with pytest.raises(ValueError, match="'feature' needs student_hidden and teacher_hidden"):
        objective(Outputs(random_logits(2, 6, seed=0)))
    attention = DistillationObjective([{"function": "attention", "weight": 1.0}])
    with pytest.raises(ValueError, match="'attention' needs student_attention and teacher_attention"):
        attention(Outputs(random_logits(2, 6, seed=0)))


def test_missing_teacher_logits_error_names_the_term():
    with pytest.raises(ValueError, match="'reverse_kl' needs teacher_logits"):
        DistillationObjective([{"function": "reverse_kl"}])(Outputs(t(STUDENT)))


def test_feature_term_without_dims_is_rejected_at_construction():
    with pytest.raises(ValueError, match="needs student_dim and teacher_dim"):
        DistillationObjective([{"function": "feature", "weight": 1.0}])


@pytest.mark.parametrize(
    ("term", "message"),
    [
        ({"function": "forward_kl", "weight": -1.0}, "weight >= 0"),
        ({"function": "forward_kl", "temperature": 0.0}, "temperature > 0"),
        ({"function": "generalized_jsd", "beta": 1.5}, r"beta and alpha must be in \[0, 1\]"),
    ],
)
def test_out_of_range_fields_are_rejected(term, message):
    with pytest.raises(ValueError, match=message):
        DistillationObjective([term])


# --- the registry: every term a recipe names is reachable, a signal that cannot serve a term is refused -------


def test_forward_kl_over_a_sparse_signal_is_the_sparse_divergence():
    student, teacher = random_logits(2, 4, 10, seed=60), random_logits(2, 4, 10, seed=61)
    top = torch.log_softmax(teacher, -1).topk(3, dim=-1)
    objective = DistillationObjective([{"function": "forward_kl", "temperature": 2.0}])
    for rule in ("zero", "tail"):
        total, _ = objective(Outputs(student), SparseSignal(top.indices, top.values, rule), mask=MASK)
        expected = sparse_forward_kl(student, top.indices, top.values, 2.0, MASK, missing_mass=rule)
        assert total.item() == pytest.approx(expected.item())


@pytest.mark.parametrize(
    ("signal", "reading"),
    [({}, "a renormalised top-k"), ({"weights": True}, "a sampled")],
)
def test_a_divergence_that_needs_every_outcome_refuses_a_renormalised_or_sampled_signal_by_name(signal, reading):
    top = random_logits(2, 10, seed=62).log_softmax(-1).topk(3, dim=-1)
    weights = torch.full_like(top.values, 1 / 3) if signal else None
    with pytest.raises(ValueError, match=f"'reverse_kl' is not defined over {reading} teacher signal"):
        DistillationObjective([{"function": "reverse_kl"}])(
            Outputs(random_logits(2, 10, seed=63)), SparseSignal(top.indices, top.values, weights=weights)
        )


@pytest.mark.parametrize("function", ["reverse_kl", "generalized_jsd", "skew_kl", "skew_reverse_kl"])
def test_over_a_top_k_with_a_rest_bucket_every_divergence_is_defined_and_exact_when_k_is_the_vocab(function):
    student, teacher = random_logits(2, 4, 8, seed=70), random_logits(2, 4, 8, seed=71)
    full = teacher.log_softmax(-1).topk(8, dim=-1)
    term = [{"function": function, "temperature": 2.0}]
    dense, _ = DistillationObjective(term)(Outputs(student), DenseSignal(teacher), mask=MASK)
    sparse, _ = DistillationObjective(term)(
        Outputs(student), SparseSignal(full.indices, full.values, "tail"), mask=MASK
    )
    assert sparse.item() == pytest.approx(dense.item(), rel=1e-3, abs=1e-5)
    top = teacher.log_softmax(-1).topk(3, dim=-1)
    partial, _ = DistillationObjective(term)(Outputs(student), SparseSignal(top.indices, top.values, "tail"), mask=MASK)
    assert torch.isfinite(partial) and partial.item() >= 0


def test_the_sampled_estimate_is_unbiased_and_its_gradient_matches_the_full_forward_kl():
    """Averaged over many independent draws, the sampled estimate and its gradient are the full-distribution
    forward KL's; a top-k renormalised over 3 of 12 entries is biased, which is why the sampled signal exists."""
    student = random_logits(1, 4, 12, seed=72).requires_grad_(True)
    teacher = random_logits(1, 4, 12, seed=73) * 2
    exact = forward_kl(student, teacher)
    (exact_grad,) = torch.autograd.grad(exact, student)
    p = teacher.softmax(-1)
    generator = torch.Generator().manual_seed(0)
    rounds, draws, estimates, grads = 400, 20, [], torch.zeros_like(student)
    for _ in range(rounds):
        drawn = torch.multinomial(p.reshape(-1, 12), draws, replacement=True, generator=generator).reshape(1, 4, draws)
        weights = torch.full(drawn.shape, 1 / draws)
        value = sampled_forward_kl(student, drawn, teacher.log_softmax(-1).gather(-1, drawn), weights)
        (grad,) = torch.autograd.grad(value, student)
        estimates.append(value.item())
        grads += grad / rounds
    assert sum(estimates) / rounds == pytest.approx(exact.item(), abs=0.03)
    assert torch.allclose(grads, exact_grad, atol=0.01)
    top = teacher.log_softmax(-1).topk(3, dim=-1)
    biased = sparse_forward_kl(student, top.indices, top.values)
    assert abs(biased.item() - exact.item()) > 0.1


def test_the_cosine_feature_term_is_a_recipe_term_with_its_own_projection():
    from distill_core.recipe import LossTerm

    term = LossTerm(function="feature_cosine", weight=1.0)
    assert term.needs_features
    objective = DistillationObjective([term], student_dim=6, teacher_dim=6)
    hidden = random_logits(2, 4, 6, seed=64)
    same, _ = objective(Outputs(random_logits(2, 4, 3, seed=0), hidden), DenseSignal(hidden, hidden.clone()), mask=MASK)
    other, _ = objective(Outputs(random_logits(2, 4, 3, seed=0), hidden), DenseSignal(hidden, -hidden), mask=MASK)
    assert same.item() == pytest.approx(0.0, abs=1e-6) and other.item() == pytest.approx(2.0, rel=1e-5)


def test_every_registered_term_is_a_recipe_value_and_nothing_else_is():
    from distill_core.loss_terms import LOSS_TERMS
    from distill_core.recipe import LossTerm

    for name in LOSS_TERMS:
        assert LossTerm(function=name).function == name
    with pytest.raises(ValueError, match="Input should be"):
        LossTerm(function="kd_loss")
