"""The loss terms a recipe can name: what each reads and which recipe parameters it uses.

Declared here, with no torch, so that a recipe loads (and `distill status` answers) without importing torch;
`distill_core.losses` implements each term (`@implements(name)`) and refuses to import while a declared term has
no function or a function no declaration. The recipe's allowed `train.losses[].function` values come from here.
"""

from __future__ import annotations

from dataclasses import dataclass

# What a term reads. A term whose needs a step cannot meet is refused with its name; the feature terms need the
# teacher in the loop (train.mode: online) and a student with features (a transformer).
TEACHER_LOGITS, LABELS, HIDDEN_STATES, ATTENTIONS = "teacher_logits", "labels", "hidden_states", "attentions"
FEATURES = frozenset({HIDDEN_STATES, ATTENTIONS})


@dataclass(frozen=True)
class LossSpec:
    """One loss term: its recipe name, what it reads, the recipe parameters it uses besides weight, and the kind
    of learned projection of hidden states it owns (a FeatureLoss kind), if any."""

    name: str
    needs: frozenset[str]
    parameters: tuple[str, ...] = ()
    projection: str | None = None
    # the readings of a stored sparse signal the term is defined over: "renormalise" (top-k renormalised),
    # "rest" (top-k plus one bucket for the rest), "sampled" (tokens drawn from the teacher)
    sparse: frozenset[str] = frozenset()

    @property
    def needs_features(self) -> bool:
        return bool(self.needs & FEATURES)


ALL_READINGS = frozenset({"renormalise", "rest", "sampled"})


def _spec(
    name: str,
    needs: set[str],
    parameters: tuple[str, ...] = (),
    projection: str | None = None,
    sparse: frozenset[str] = frozenset(),
) -> LossSpec:
    return LossSpec(name, frozenset(needs), parameters, projection, ALL_READINGS if LABELS in needs else sparse)


LOSS_TERMS: dict[str, LossSpec] = {
    spec.name: spec
    for spec in (
        # over a sparse signal: renormalised, with a rest bucket, or the sampled signal's unbiased estimate
        _spec("forward_kl", {TEACHER_LOGITS}, ("temperature",), sparse=ALL_READINGS),
        # the others need every outcome's mass on both sides: the full distribution, or top-k plus a rest bucket
        _spec("reverse_kl", {TEACHER_LOGITS}, ("temperature",), sparse=frozenset({"rest"})),
        _spec("generalized_jsd", {TEACHER_LOGITS}, ("temperature", "beta"), sparse=frozenset({"rest"})),
        _spec("skew_kl", {TEACHER_LOGITS}, ("temperature", "alpha"), sparse=frozenset({"rest"})),
        _spec("skew_reverse_kl", {TEACHER_LOGITS}, ("temperature", "alpha"), sparse=frozenset({"rest"})),
        _spec("ce", {LABELS}),
        _spec("feature", {HIDDEN_STATES}, projection="mse"),
        _spec("feature_cosine", {HIDDEN_STATES}, projection="cosine"),
        _spec("attention", {ATTENTIONS}),
    )
}


def allowed_terms() -> str:
    """The declared names as a recipe error lists them: 'a', 'b' or 'c'."""
    names = [repr(name) for name in LOSS_TERMS]
    return f"{', '.join(names[:-1])} or {names[-1]}"
