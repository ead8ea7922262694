"""Several teachers as one: the weighted average of their probabilities, as one teacher module.

An ensemble is a teacher like any other to the rest of the core: it labels (its signal is the average of the
members' full distributions, stored as the task stores any teacher's: a classifier's logits, an LM's top-k of the
average plus its tail, so no member's mass outside its own top-k is guessed), it is evaluated, and its identity
(every member's name, version, weight digest and weight) is the soft-label key's teacher part. Students are cut
from its first member. Members must agree on what they predict: a classifier's labels in order, an LM's
tokenizer.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from mlflow.tracking import MlflowClient
from torch import Tensor, nn

from distill_core import lm
from distill_core.errors import RecipeError, TeacherError
from distill_core.lm import CausalLM
from distill_core.modules import Batch, LoadedTeacher, TextModule
from distill_core.recipe import Recipe
from distill_core.registry import RegistryError, aliases, teacher_versions


@dataclass(frozen=True)
class Member:
    """One loaded member of an ensemble and its weight."""

    teacher: LoadedTeacher
    weight: float

    def describe(self) -> str:
        return f"{self.teacher.name} v{self.teacher.version} (weight {self.weight:g})"


def _log_weights(weights: Sequence[float]) -> Tensor:
    total = sum(weights)
    return torch.tensor([math.log(w / total) for w in weights])


def _mix(log_probs: list[Tensor], log_weights: Tensor) -> Tensor:
    """log Σ_i w_i p_i, computed in log space (a member's certainty never underflows to nothing)."""
    stacked = torch.stack([lp.float() for lp in log_probs])
    shape = (-1,) + (1,) * (stacked.dim() - 1)
    return torch.logsumexp(stacked + log_weights.reshape(shape), dim=0)


class EnsembleTeacher(TextModule):
    """Classifier members: each tokenizes the texts itself; the output is log Σ w_i softmax(member_i)."""

    log_weights: Tensor
    member_names: tuple[str, ...] = ()  # `a v2`, in order (set by ensemble_of)

    def __init__(self, members: Sequence[TextModule], weights: Sequence[float]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        self.labels = tuple(members[0].labels)
        self.register_buffer("log_weights", _log_weights(weights))

    @property
    def primary(self) -> TextModule:
        """The member students are cut from."""
        return self.members[0]  # type: ignore[return-value]

    def tokenize(self, texts: list[str], max_length: int | None = None) -> Batch:
        return {
            f"{i}.{key}": value
            for i, member in enumerate(self.members)
            for key, value in member.tokenize(texts, max_length).items()  # type: ignore[operator]
        }

    def forward(self, **batch: Tensor) -> Tensor:
        outputs = []
        for i, member in enumerate(self.members):
            own = {key.split(".", 1)[1]: value for key, value in batch.items() if key.split(".", 1)[0] == str(i)}
            outputs.append(torch.log_softmax(member(**own).float(), dim=-1))
        return _mix(outputs, self.log_weights)


class EnsembleCausalLM(CausalLM):
    """LM members sharing one tokenizer: log Σ w_i softmax(member_i) over the vocabulary at every position. It reads
    as its first member where a model's structure is asked for (layers to cut students from, its config)."""

    log_weights: Tensor
    member_names: tuple[str, ...] = ()

    def __init__(self, members: Sequence[CausalLM], weights: Sequence[float]) -> None:
        TextModule.__init__(self)
        self.members = nn.ModuleList(members)
        self.tokenizer = members[0].tokenizer
        self.vocab_size = members[0].vocab_size
        self.storage_dtype = None
        self.register_buffer("log_weights", _log_weights(weights))

    @property
    def model(self) -> object:
        return self.members[0].model

    @property
    def primary(self) -> CausalLM:
        return self.members[0]  # type: ignore[return-value]

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        outputs = [torch.log_softmax(m(input_ids, attention_mask).float(), dim=-1) for m in self.members]
        return _mix(outputs, self.log_weights)

    def hidden(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        raise TeacherError("an ensemble of LM teachers has no one output layer: distill it offline (train.mode)")


def check_members_agree(members: Sequence[Member]) -> None:
    """Members that predict different things cannot be averaged: refuse, naming the two."""
    first = members[0]
    for other in members[1:]:
        a, b = first.teacher.module, other.teacher.module
        if isinstance(a, CausalLM) != isinstance(b, CausalLM):
            raise TeacherError(f"teachers {first.describe()} and {other.describe()}: one is a causal LM, one is not")
        if isinstance(a, CausalLM):
            da, db = lm.tokenizer_digest(a.tokenizer), lm.tokenizer_digest(b.tokenizer)
            if da != db:
                raise TeacherError(
                    f"teachers {first.describe()} and {other.describe()} have different tokenizers (digests {da} and "
                    f"{db}): an ensemble averages distributions over one vocabulary"
                )
        elif tuple(a.labels) != tuple(b.labels):
            raise TeacherError(
                f"teachers {first.describe()} and {other.describe()} predict different labels ({list(a.labels)} and "
                f"{list(b.labels)}): an ensemble averages over one set of classes, in one order"
            )


def ensemble_of(members: Sequence[Member]) -> LoadedTeacher:
    """The members as one loaded teacher: its name lists them, its version their versions, its digest covers their
    weights' digests and their weights."""
    check_members_agree(members)
    modules = [m.teacher.module for m in members]
    weights = [m.weight for m in members]
    module: TextModule
    if isinstance(modules[0], CausalLM):
        module = EnsembleCausalLM(modules, weights)  # type: ignore[arg-type]
    else:
        module = EnsembleTeacher(modules, weights)
    module.member_names = tuple(f"{m.teacher.name} v{m.teacher.version}" for m in members)
    parts = "+".join(f"{m.teacher.identity}*{m.weight!r}" for m in members)
    name = "+".join(m.teacher.name for m in members)
    version = "+".join(m.teacher.version for m in members)
    return LoadedTeacher(module.eval(), name, version, hashlib.sha256(parts.encode()).hexdigest()[:32])


def cut_from(module: TextModule) -> TextModule:
    """The model students are cut from: an ensemble's first member, else the teacher itself."""
    return getattr(module, "primary", module)


@dataclass(frozen=True)
class Combination:
    """The ensemble's members as registered versions: (name, version, weight) in the recipe's order. Its key is
    what runs claim: one run per combination and student model."""

    members: tuple[tuple[str, str, float], ...]
    student: str = ""  # the recipe's own student model: a member of it (its champion as a teacher) is not in the key

    @property
    def key(self) -> tuple[str, str]:
        """(names, versions) of the teacher members joined with '+': the claim's teacher and version. The student
        model's champion is left out, so that a promotion never makes a new combination (nor a run) by itself."""
        teachers = [m for m in self.members if m[0] != self.student]
        return "+".join(m[0] for m in teachers), "+".join(m[1] for m in teachers)

    def describe(self) -> str:
        """`a v2 (weight 1), b v1 (weight 1)`: the lineage's `teachers`."""
        return ", ".join(f"{name} v{version} (weight {weight:g})" for name, version, weight in self.members)

    def __contains__(self, item: object) -> bool:
        return any((name, version) == item for name, version, _ in self.members)


def resolve(recipe: Recipe, client: MlflowClient) -> Combination:
    """The registered versions the recipe's `teachers` name now: `latest` the newest, a number that version, an
    alias the version holding it, `last: N` the newest N. A member that names nothing is refused by field."""
    members: list[tuple[str, str, float]] = []
    for index, spec in enumerate(recipe.teachers):
        field = f"teachers.{index}"
        versions = [str(v.version) for v in teacher_versions(client, spec.name)]
        if not versions and spec.name == recipe.student_registered_name:
            continue  # no student yet: its champion teaches from the next run on
        if not versions:
            raise RegistryError(f"{field}: no registered model {spec.name!r} in the MLflow registry")
        if spec.last is not None:
            if len(versions) < spec.last:
                raise RegistryError(f"{field}: {spec.name} has {len(versions)} version(s), last: {spec.last} asked")
            members += [(spec.name, str(v), spec.weight) for v in versions[-spec.last :]]
        elif spec.version == "latest":
            members.append((spec.name, str(versions[-1]), spec.weight))
        elif isinstance(spec.version, int) or str(spec.version).isdigit():
            if str(spec.version) not in versions:
                raise RegistryError(
                    f"{field}: {spec.name} has no version {spec.version} (it has v{', v'.join(versions)})"
                )
            members.append((spec.name, str(spec.version), spec.weight))
        else:
            held = aliases(client, spec.name).get(str(spec.version))
            if held is None and spec.name == recipe.student_registered_name:
                continue  # the student model's champion as a teacher: none yet (a first run), the others teach
            if held is None:
                raise RegistryError(f"{field}: {spec.name} has no alias {spec.version!r}")
            members.append((spec.name, held, spec.weight))
    return Combination(tuple(members), recipe.student_registered_name)


def check_trigger(combination: Combination, name: str, version: str) -> None:
    """A run is triggered by one of the combination's member versions; another version names no run of the recipe
    (an older one, or a version of a member pinned to another)."""
    if (name, str(version)) not in combination:
        raise RecipeError(
            f"{name} v{version} is not a member of the ensemble this recipe distills now ({combination.describe()}): "
            "nothing to do for it"
        )


def load_ensemble(combination: Combination, tracking_uri: str) -> tuple[LoadedTeacher, list[Member]]:
    """Every member loaded from the registry, and the ensemble of them."""
    from distill_core.model_io import load_teacher

    members = [Member(load_teacher(name, version, tracking_uri), w) for name, version, w in combination.members]
    return ensemble_of(members), members


def members_of(teacher: LoadedTeacher) -> dict[str, TextModule]:
    """An ensemble teacher's member modules by name (`a v2`); none for one teacher."""
    module: Any = teacher.module
    members = getattr(module, "members", None)
    return dict(zip(module.member_names, members, strict=True)) if members is not None else {}
