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

    @property
    def needs_features(self) -> bool:
        return bool(self.needs & FEATURES)


def _spec(name: str, needs: set[str], parameters: tuple[str, ...] = (), projection: str | None = None) -> LossSpec:
    return LossSpec(name, frozenset(needs), parameters, projection)


LOSS_TERMS: dict[str, LossSpec] = {
    spec.name: spec
    for spec in (
        _spec("forward_kl", {TEACHER_LOGITS}, ("temperature",)),  # over a sparse signal: its sparse estimate
        _spec("reverse_kl", {TEACHER_LOGITS}, ("temperature",)),
        _spec("generalized_jsd", {TEACHER_LOGITS}, ("temperature", "beta")),
        _spec("skew_kl", {TEACHER_LOGITS}, ("temperature", "alpha")),
        _spec("skew_reverse_kl", {TEACHER_LOGITS}, ("temperature", "alpha")),
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
