"""The one typed configuration of a distillation: loaded from YAML, checked by pydantic, hashed for lineage."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from distill_core.errors import RecipeError
from distill_core.loss_terms import LOSS_TERMS, allowed_terms

Fraction = Annotated[float, Field(gt=0.0, lt=0.5)]
# Learning rates that train each student family when neither the student nor train.lr sets one.
FAMILY_LR = {"transformer": 1e-4, "embedding_bag": 5e-3}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    # Fields added after the first release: at their default they leave the recipe's hash as it was before they
    # were added, so its registered students, checkpoints and idempotency keys stay its own.
    ADDED_FIELDS: ClassVar[tuple[str, ...]] = ()


class DvcDataRef(_Strict):
    """A prepared dataset tracked by DVC: a path in a repository at a git revision (the data's identity)."""

    path: str = Field(min_length=1)  # the DVC-tracked folder, relative to the repository root
    repo: str = "."  # a local repository (relative to the recipe file) or a git URL
    rev: str | None = None  # a git revision; None: the repository's workspace, which must match its dvc.lock


class DataConfig(_Strict):
    """Where the labeled text comes from and how it is split."""

    source: str = "rotten_tomatoes"  # a built-in corpus name, or a .csv/.parquet file with text,label columns
    max_rows: int | None = Field(default=None, ge=50)
    validation_fraction: Fraction = 0.1
    test_fraction: Fraction = 0.2
    seed: int = 0
    augment_copies: int = Field(default=1, ge=0, le=10)  # teacher-labeled augmented copies in the transfer split
    dvc: DvcDataRef | None = None  # set: runs read the prepared data through DVC, and lineage names its version


class BaseTeacherConfig(_Strict):
    """The teacher's registered name and the version the DVC stages distill; each task's recipe adds how its
    stand-in helper makes one (it stands in for the teacher's team)."""

    registered_name: str = Field(default="sentiment-teacher", min_length=1)
    version: int | None = Field(default=None, ge=1)  # the registered version the DVC stages distill


class TeacherConfig(BaseTeacherConfig):
    """A classifier teacher: the packaged MiniLM encoder fine-tuned on the train split with a head."""

    # top encoder layers to fine-tune: None = all (best), 0 = only the head on frozen features (fast, weaker)
    trainable_layers: int | None = Field(default=None, ge=0, le=48)
    epochs: float = Field(default=1.0, gt=0, le=20)
    lr: float = Field(default=4e-5, gt=0, lt=1)
    batch_size: int = Field(default=16, ge=1, le=4096)
    max_length: int = Field(default=64, ge=8, le=512)
    seed: int = 0


# Where labeling and training run (modules.resolve_device): auto takes the GPU when torch sees one.
Device = Literal["auto", "cpu", "cuda"]


class _Labeling(_Strict):
    """Where each task's labeling runs. threads, when set, is part of the soft-label key (the bytes repeat at a
    fixed thread count); so is the device when the labeling runs on a GPU (soft_labels.soft_label_key)."""

    ADDED_FIELDS = ("threads", "device")

    threads: int | None = Field(default=None, ge=1, le=256)  # torch threads per labeling process; None: as they are
    device: Device = "auto"


class SoftLabelConfig(_Labeling):
    """How teacher outputs are made and stored. max_length changes what the teacher sees, so it is part of the
    soft-label key; batch_size and shard_rows change only speed and the shards' layout, and are not."""

    batch_size: int = Field(default=64, ge=1, le=8192)
    max_length: int = Field(default=64, ge=8, le=512)
    shard_rows: int = Field(default=4096, ge=16)


class LossTerm(_Strict):
    """One weighted term of the distillation objective."""

    function: str  # a declared loss term (distill_core.loss_terms.LOSS_TERMS)
    weight: float = Field(default=1.0, ge=0.0, allow_inf_nan=False)  # finite: an infinite weight trains on NaN
    temperature: float = Field(default=1.0, gt=0.0, le=100.0)
    beta: float = Field(default=0.5, ge=0.0, le=1.0)  # generalized_jsd only
    alpha: float = Field(default=0.1, ge=0.0, le=1.0)  # skew divergences only

    @field_validator("function")
    @classmethod
    def _registered(cls, function: str) -> str:
        if function not in LOSS_TERMS:
            raise ValueError(f"Input should be {allowed_terms()}")
        return function

    @property
    def needs_features(self) -> bool:
        """Whether the term matches the teacher's hidden states or attention maps (the teacher in the loop)."""
        return LOSS_TERMS[self.function].needs_features


class StudentConfig(_Strict):
    """A student candidate: its family and size."""

    ADDED_FIELDS = ("heads", "ffn")

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    family: Literal["transformer", "embedding_bag"]
    # transformer: DistilBERT-style, initialised from these teacher layers
    teacher_layers: list[int] = Field(default_factory=lambda: [0, 5])
    embedding_dim: int | None = Field(default=None, ge=16, le=4096)  # factorised embeddings when < hidden size
    prune_vocab: bool = True  # keep only the wordpieces seen in the training text
    # width, pruned from the teacher's own weights by activation importance on a calibration sample (Minitron):
    # attention heads and FFN channels kept in every layer (None: all of the teacher's)
    heads: int | None = Field(default=None, ge=1, le=256)
    ffn: int | None = Field(default=None, ge=8, le=65536)
    # embedding_bag: hashed word n-grams into one averaged embedding
    buckets: int = Field(default=2**17, ge=1024, le=2**24)
    dim: int = Field(default=64, ge=4, le=4096)
    ngrams: int = Field(default=2, ge=1, le=3)
    lr: float | None = Field(default=None, gt=0, lt=1)  # overrides train.lr (and the family's default)

    def learning_rate(self, train: TrainConfig) -> float:
        """This student's lr: its own, else train.lr when the recipe sets it, else its family's default (a bag
        needs a far larger step than a transformer copied from the teacher; at 1e-4 it does not learn)."""
        if self.lr is not None:
            return self.lr
        if "lr" in train.model_fields_set:
            return train.lr
        return train.family_lr(self.family)

    @model_validator(mode="after")
    def _layers_valid(self) -> StudentConfig:
        if self.family == "transformer" and not self.teacher_layers:
            raise ValueError("a transformer student needs at least one entry in teacher_layers")
        if any(layer < 0 for layer in self.teacher_layers):
            raise ValueError(f"teacher_layers must be non-negative layer indices, got {self.teacher_layers}")
        return self


def _default_losses() -> list[LossTerm]:
    return [LossTerm(function="forward_kl", weight=0.5, temperature=2.0), LossTerm(function="ce", weight=0.5)]


class DistributedConfig(_Strict):
    """Data-parallel training of each candidate with torchrun: `nproc` processes on this machine (gloo on the CPU,
    NCCL with one GPU each), each a share of every batch, gradients averaged by DistributedDataParallel."""

    nproc: int = Field(default=2, ge=1, le=256)


class TrainConfig(_Strict):
    """The distillation loop."""

    ADDED_FIELDS = ("distributed", "device", "parallel_candidates")

    mode: Literal["offline", "online"] = "offline"  # offline: stored soft labels; online: teacher in the loop
    losses: list[LossTerm] = Field(default_factory=_default_losses, min_length=1)
    epochs: int = Field(default=3, ge=1, le=1000)
    max_steps: int | None = Field(default=None, ge=1)
    batch_size: int = Field(default=32, ge=1, le=8192)
    lr: float = Field(default=1e-4, gt=0, lt=1)
    weight_decay: float = Field(default=0.01, ge=0, lt=1)
    seed: int = 0
    checkpoint_every: int = Field(default=200, ge=1)  # steps
    eval_every: int = Field(default=200, ge=1)  # steps; also at the end of every epoch
    patience: int = Field(default=3, ge=1)  # evaluations without improvement before stopping early
    distributed: DistributedConfig | None = None  # None: one process
    device: Device = "auto"  # where the candidates train (under torchrun: each process its own GPU)
    # the candidates train side by side, one a Dask worker, on the cluster DISTILL_DASK / DISTILL_DASK_ADDRESS name
    parallel_candidates: bool = False

    def family_lr(self, family: str) -> float:
        """The lr a student family trains at when neither it nor the recipe sets one."""
        return FAMILY_LR[family]

    @model_validator(mode="after")
    def _online_losses(self) -> TrainConfig:
        needs_online = sorted({t.function for t in self.losses if t.needs_features})
        if needs_online and self.mode != "online":
            raise ValueError(f"loss terms {needs_online} need the teacher in the loop: set train.mode: online")
        if all(t.weight == 0 for t in self.losses):
            raise ValueError("every loss term has weight 0: give at least one term a positive weight")
        if self.distributed is not None and self.mode == "online":
            raise ValueError(
                "train.distributed trains from the stored soft labels: the teacher in the loop (mode: online) is "
                "not sharded across processes; use mode: offline or drop train.distributed"
            )
        if self.distributed is not None and self.parallel_candidates:
            raise ValueError(
                "train.distributed and train.parallel_candidates each spread training over processes: choose one "
                "(torchrun shares every step of one candidate, Dask trains several candidates at once)"
            )
        return self


class EvalConfig(_Strict):
    """How students are measured."""

    latency_samples: int = Field(default=100, ge=5, le=10000)
    throughput_batch: int = Field(default=64, ge=1, le=8192)
    hard_label_baseline: bool = True  # train each student's hard-label twin, to show what distillation bought


class GateConfig(_Strict):
    """Thresholds a student must meet to be promoted; unset ones are not checked."""

    min_accuracy: float | None = Field(default=None, ge=0, le=1)
    min_retention: float | None = Field(default=0.9, ge=0, le=2)  # student accuracy / teacher accuracy
    min_agreement: float | None = Field(default=None, ge=0, le=1)  # top-1 agreement with the teacher
    ADDED_FIELDS = ("max_params",)

    max_p95_ms: float | None = Field(default=None, gt=0)  # CPU latency at batch 1
    max_param_ratio: float | None = Field(default=0.5, gt=0)  # student params / teacher params
    max_size_mb: float | None = Field(default=None, gt=0)
    max_params: int | None = Field(default=None, ge=1)
    max_regression: float = Field(default=0.01, ge=0, le=1)  # accuracy the champion may lead by


DEPLOY_FORMATS = ("torch", "onnx", "onnx-int8")  # the pickled torch module, its ONNX export, that quantised to int8


class DeployConfig(_Strict):
    """Where a student runs: the artifact its latency and size gates measure, and the one its pyfunc serves. Every
    candidate is exported to ONNX (fp32 and int8) and checked against its torch self whatever the format."""

    format: Literal["torch", "onnx", "onnx-int8"] = "torch"
    threads: int | None = Field(default=None, ge=1, le=256)  # intra-op threads measured (and served) with
    export: bool = True  # false: no ONNX export (a custom student the exporter cannot take); format must be torch
    min_parity: float = Field(default=0.999, ge=0, le=1)  # ONNX fp32 top-1 agreement with the torch student
    max_logit_diff: float = Field(default=1e-3, gt=0)  # and the largest |logit difference| between the two

    @model_validator(mode="after")
    def _exported(self) -> DeployConfig:
        if self.format != "torch" and not self.export:
            raise ValueError(f"deploy.format {self.format} needs the ONNX export: drop export: false")
        return self


class ChecksConfig(_Strict):
    """Data checks (Great Expectations) that stop a run before training."""

    max_duplicate_share: float = Field(default=0.05, ge=0, le=1)  # share of repeated texts in a labeled split
    max_class_kl: float = Field(default=0.25, gt=0)  # teacher's predicted classes vs the train label balance
    max_row_sum_error: float = Field(default=1e-4, gt=0)  # |sum of probabilities - 1| per soft-label row


class PromotionConfig(_Strict):
    """What happens to a student that passes the gates."""

    policy: Literal["auto", "manual"] = "auto"  # auto: champion if it beats the champion; manual: challenger
    override_manual_champion: bool = False  # may the pipeline replace a champion a person set by hand?


class StagesConfig(_Strict):
    """Distillation in stages. Teacher assistants (Mirzadeh et al. 2020): teacher -> assistants[0] -> ... -> every
    student candidate, each stage learning from the one before (its signal, and a transformer its layers).
    Born-again (Furlanello et al. 2018): the distilled candidate teaches a fresh student of its own architecture,
    which teaches the next, until `generations` (1: no born-again); the last generation is the candidate."""

    assistants: list[StudentConfig] = Field(default_factory=list)
    generations: int = Field(default=1, ge=1, le=10)

    def check_chain(self, students: list[StudentConfig]) -> None:
        """Every stage can be made from the stage before it: a transformer is cut from a transformer's layers."""
        if not self.assistants:
            return
        pairs = [*itertools.pairwise(self.assistants), *((self.assistants[-1], s) for s in students)]
        for before, after in pairs:
            if after.family != "transformer":
                continue  # a bag starts from nothing: it learns from any stage's signal
            if before.family != "transformer":
                raise ValueError(
                    f"stages.assistants: '{after.name}' is a transformer cut from the layers of the stage before it, "
                    f"and assistant '{before.name}' is an embedding_bag, which has none"
                )
            depth = len(before.teacher_layers)
            if max(after.teacher_layers) >= depth:
                raise ValueError(
                    f"stages.assistants: '{after.name}' has teacher_layers {after.teacher_layers}, which index the "
                    f"layers of assistant '{before.name}' (it has {depth}: 0..{depth - 1})"
                )


class WarmStartConfig(_Strict):
    """Re-distillation for a new teacher version that starts from a student version (the champion) instead of from
    the teacher's layers: only the candidate that version was, on a cheaper schedule, and (with `changed`) only on
    the transfer rows whose teacher output moved, plus a replayed share of the others against forgetting."""

    version: int | None = Field(default=None, ge=1)  # the student version; None: the champion when the run starts
    steps: float = Field(default=0.25, gt=0, le=1)  # the share of the cold run's step budget it trains for
    changed: float | None = Field(default=0.05, gt=0, le=1)  # a row moved when its teacher output moved more than
    # this: the total variation of a classifier's probabilities; a block's mean over positions of the total
    # variation between the stored top-k (or sampled) distributions
    replay: float = Field(default=0.2, ge=0, le=1)  # the share of the unmoved rows trained on as well


class TeacherMember(_Strict):
    """One teacher of an ensemble: a registered model's version (a number, `latest`, or an alias), or its `last`
    N versions, each with `weight` (weights are normalised over the members)."""

    name: str = Field(min_length=1)
    version: int | str = "latest"
    last: int | None = Field(default=None, ge=2, le=20)  # the newest N versions of the model, each a member
    weight: float = Field(default=1.0, gt=0, allow_inf_nan=False)

    @field_validator("version")
    @classmethod
    def _version(cls, version: int | str) -> int | str:
        if isinstance(version, int) and version < 1:
            raise ValueError("a version number is 1 or more; or write latest, or an alias")
        if isinstance(version, str) and not version.strip():
            raise ValueError("write a version number, latest, or an alias")
        return version

    @model_validator(mode="after")
    def _last_or_version(self) -> TeacherMember:
        if self.last is not None and "version" in self.model_fields_set:
            raise ValueError("give either version or last, not both")
        return self


class QualifyConfig(_Strict):
    """Which versions of the teacher are distilled (unset: every version): those carrying a tag (`key`, or
    `key=value`), or the one holding an alias (then moving the alias starts a run, as a new version does)."""

    tag: str | None = Field(default=None, min_length=1)
    alias: str | None = Field(default=None, min_length=1, pattern=r"^[A-Za-z0-9_-]+$")

    @model_validator(mode="after")
    def _one_rule(self) -> QualifyConfig:
        if (self.tag is None) == (self.alias is None):
            raise ValueError("give one of tag and alias")
        return self

    def problem(self, tags: dict[str, str], holds: set[str]) -> str | None:
        """Why a version with these tags, holding these aliases, is not distilled (None: it is)."""
        if self.alias is not None:
            return None if self.alias in holds else f"it does not hold the alias {self.alias!r}"
        assert self.tag is not None
        key, _, value = self.tag.partition("=")
        if key not in tags:
            return f"it has no tag {key!r}"
        if value and tags[key] != value:
            return f"its tag {key!r} is {tags[key]!r}, not {value!r}"
        return None


def _all() -> list[int | None]:
    return [None]  # a width or rank the search keeps whole


class TransformerSpace(_Strict):
    """The transformer students a search considers: every combination of these values."""

    teacher_layers: list[list[int]] = Field(default_factory=lambda: [[0]], min_length=1)  # depth: layers copied
    heads: list[int | None] = Field(default_factory=_all, min_length=1)  # attention heads kept (None: all)
    ffn: list[int | None] = Field(default_factory=_all, min_length=1)  # FFN channels kept (None: all)
    embedding_dim: list[int | None] = Field(default_factory=_all, min_length=1)  # rank (None: full)
    prune_vocab: list[bool] = Field(default_factory=lambda: [True], min_length=1)
    lr: float | None = Field(default=None, gt=0, lt=1)

    def students(self) -> list[StudentConfig]:
        combos = itertools.product(self.teacher_layers, self.heads, self.ffn, self.embedding_dim, self.prune_vocab)
        out = []
        for layers, heads, ffn, dim, prune in combos:
            name = "L" + "-".join(map(str, layers))
            name += "".join(f"-{key}{value}" for key, value in (("h", heads), ("f", ffn), ("e", dim)) if value)
            name += "" if prune else "-fullvocab"
            out.append(
                StudentConfig(
                    name=name,
                    family="transformer",
                    teacher_layers=layers,
                    heads=heads,
                    ffn=ffn,
                    embedding_dim=dim,
                    prune_vocab=prune,
                    lr=self.lr,
                )  # fmt: skip
            )
        return out


class BagSpace(_Strict):
    """The embedding-bag students a search considers: every combination of these values."""

    buckets: list[int] = Field(default_factory=lambda: [2**16], min_length=1)
    dim: list[int] = Field(default_factory=lambda: [16], min_length=1)
    ngrams: list[int] = Field(default_factory=lambda: [2], min_length=1)
    lr: float | None = Field(default=None, gt=0, lt=1)

    def students(self) -> list[StudentConfig]:
        return [
            StudentConfig(name=f"bag-b{b}-d{d}-n{n}", family="embedding_bag", buckets=b, dim=d, ngrams=n, lr=self.lr)
            for b, d, n in itertools.product(self.buckets, self.dim, self.ngrams)
        ]


class SearchConfig(_Strict):
    """Choosing the smallest student that meets the gates. Every architecture of the space (and every listed
    student) is measured before training (size, and batch-1 latency on this machine); those that cannot meet the
    gates' size and latency bounds are dropped; the rest are trained by successive halving over steps (Optuna: a
    trial per architecture, smallest first, pruned at rungs of min_steps x reduction_factor^k steps against the
    trials before it),
    and the smallest whose validation quality meets the gates' quality bound (then the best) is the candidate."""

    transformer: TransformerSpace | None = None
    embedding_bag: BagSpace | None = None
    trials: int = Field(default=16, ge=1, le=1000)  # feasible architectures trained, at most
    min_steps: int = Field(default=100, ge=1)  # the first rung: every trial trains this many steps
    reduction_factor: int = Field(default=3, ge=2, le=10)  # one in this many trials goes on at each rung

    def architectures(self) -> list[StudentConfig]:
        return [*(self.transformer.students() if self.transformer else []),
                *(self.embedding_bag.students() if self.embedding_bag else [])]  # fmt: skip

    @model_validator(mode="after")
    def _has_space(self) -> SearchConfig:
        if self.transformer is None and self.embedding_bag is None:
            raise ValueError("search: give a space, transformer: and/or embedding_bag:")
        return self


Remedy = Literal["augment", "assistant", "larger", "longer"]


class DegradationConfig(_Strict):
    """What a run does when its best candidate fails the gates. It always says why (the diagnosis): a student that
    did not learn (train-split quality at chance), a capacity gap (it does not even agree with the teacher on the
    transfer set it was taught on: agreement below `capacity_agreement`) or a data gap (it fits the transfer set
    and fails on held-out data). With `remedies`, it then tries those that fit the diagnosis, in this order, each
    as a new attempt, until one passes or `budget_s` seconds are spent: `augment` (more teacher-labeled augmented
    transfer data; a data gap), `assistant` (a teacher assistant stage of half the teacher's depth; a capacity
    gap), `larger` (the next larger architecture; a capacity gap), `longer` (twice the training; any)."""

    capacity_agreement: float = Field(default=0.9, ge=0, le=1)
    remedies: list[Remedy] = Field(default_factory=list)
    budget_s: float = Field(default=1800, gt=0)

    @field_validator("remedies")
    @classmethod
    def _once_each(cls, remedies: list[str]) -> list[str]:
        if len(set(remedies)) != len(remedies):
            raise ValueError(f"each remedy once, got {remedies}")
        return remedies


# Sections added after the first release: a recipe that leaves one at its default hashes as it did before it was
# added, so its registered students, checkpoints and idempotency keys stay its own.
ADDED_SECTIONS = ("stages", "warm_start", "teachers", "qualify", "search", "on_degradation", "deploy")


class BaseRecipe(_Strict):
    """Everything that decides what a distillation produces: the fields every task has. Each task's recipe class
    (RECIPES) adds the sections whose fields belong to that task; `task` selects it."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    task: str = "classification"
    student_registered_name: str = Field(default="sentiment-student", min_length=1)
    teacher: BaseTeacherConfig = Field(default_factory=BaseTeacherConfig)
    students: list[StudentConfig] = Field(default_factory=list)  # the candidates (with search: tried as well)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluation: EvalConfig = Field(default_factory=EvalConfig)
    promotion: PromotionConfig = Field(default_factory=PromotionConfig)
    stages: StagesConfig = Field(default_factory=StagesConfig)
    warm_start: WarmStartConfig | None = None  # set: a new teacher version is re-distilled from the champion
    teachers: list[TeacherMember] = Field(default_factory=list)  # set: an ensemble of these is the teacher
    qualify: QualifyConfig | None = None  # set: only the teacher versions it names are distilled
    search: SearchConfig | None = None  # set: the candidate is the smallest of a searched space meeting the gates
    on_degradation: DegradationConfig = Field(default_factory=DegradationConfig)  # why a run failed, what it tries
    deploy: DeployConfig = Field(default_factory=DeployConfig)  # the artifact the gates measure and the pyfunc serves
    _base_dir: Path = PrivateAttr(default_factory=Path.cwd)  # the recipe file's folder: relative paths start here

    @model_validator(mode="after")
    def _students_consistent(self) -> BaseRecipe:
        if not self.students and self.search is None:
            raise ValueError("students: give at least one student candidate, or a search section")
        names = [s.name for s in [*self.stages.assistants, *self.candidates]]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"student and assistant names must be unique, repeated: {duplicates}")
        self.stages.check_chain(self.candidates)
        if self.search is not None and (self.warm_start is not None or self.stages.generations > 1):
            raise ValueError(
                "search with warm_start or stages.generations: a search trains fresh students of many architectures; "
                "a warm start continues the champion's one, born-again generations repeat one; drop one of them"
            )
        if self.warm_start is not None and self.stages != StagesConfig():
            raise ValueError(
                "warm_start and stages: a warm start continues the champion itself, not a chain of stages; drop one"
            )
        members = [(m.name, str(m.version) if m.last is None else f"last {m.last}") for m in self.teachers]
        repeated = sorted({f"{n} {v}" for n, v in members if members.count((n, v)) > 1})
        if repeated:
            raise ValueError(f"teachers: each member once, repeated: {repeated}")
        if len(self.teachers) == 1 and self.teachers[0].last is None:
            raise ValueError("teachers: an ensemble needs two members or more (or one with last: N)")
        own = [m for m in self.teachers if m.name == self.student_registered_name]
        if any(m.last is not None or str(m.version) == "latest" for m in own):
            raise ValueError(
                f"teachers: {self.student_registered_name} is this recipe's student model: as a teacher it is named "
                "by an alias (champion) or a version number, not latest or last"
            )
        if self.teachers and self.qualify is not None:
            raise ValueError("qualify applies to one teacher; an ensemble's members name their versions (an alias)")
        if own and len(own) == len(self.teachers):
            raise ValueError("teachers: an ensemble needs a teacher besides the student model's champion")
        if self.teachers and any(t.needs_features for t in self.train.losses):
            raise ValueError("teachers: feature and attention terms match one teacher's layers, not an ensemble's")
        uses_hidden = {t.function for t in self.train.losses if t.needs_features}
        bags = [s.name for s in [*self.stages.assistants, *self.candidates] if s.family == "embedding_bag"]
        if uses_hidden and bags:
            raise ValueError(
                f"loss terms {sorted(uses_hidden)} need hidden states and attentions, which embedding_bag "
                f"students {bags} do not have: use transformer students or drop those terms"
            )
        return self

    def distills(self, teacher: str) -> bool:
        """Whether versions of this registered model are the recipe's teacher (or one of its ensemble's)."""
        return teacher in self.teacher_names

    @property
    def teacher_names(self) -> list[str]:
        """The registered teacher models the recipe watches: the ensemble's members (not the student model, whose
        champion may teach but whose promotions start nothing), else its one teacher."""
        watched = [m.name for m in self.teachers if m.name != self.student_registered_name]
        return list(dict.fromkeys(watched)) or [self.teacher.registered_name]

    @property
    def candidates(self) -> list[StudentConfig]:
        """Every student the recipe may train as a candidate: those listed, then the search space's."""
        return [*self.students, *(self.search.architectures() if self.search is not None else [])]

    def student(self, name: str) -> StudentConfig:
        for s in self.candidates:
            if s.name == name:
                return s
        raise RecipeError(f"recipe '{self.name}' has no student '{name}'; it has {[s.name for s in self.candidates]}")

    @property
    def base_dir(self) -> Path:
        """The folder of the recipe file, against which its relative paths (data.dvc.repo) resolve."""
        return self._base_dir

    def recipe_hash(self) -> str:
        """A stable hash of every setting: equal recipes hash equal whatever their YAML layout."""
        settings = _without_added_defaults(self, self.model_dump(mode="json"))
        # how many processes train a candidate changes no result (up to float rounding): not the recipe's identity,
        # so a checkpoint resumes at another world size and a student's idempotency key stays the same
        settings["train"].pop("distributed", None)
        settings["train"].pop("parallel_candidates", None)  # nor whether candidates train side by side
        for section in ("train", "soft_labels"):  # nor where it ran, the GPU or the CPU (the soft-label key has it)
            settings[section].pop("device", None)
        for later in ADDED_SECTIONS:  # at their default they leave the hash as earlier releases made it
            if getattr(self, later) == type(self).model_fields[later].get_default(call_default_factory=True):
                settings.pop(later)
        canonical = json.dumps(settings, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _without_added_defaults(model: BaseModel, dumped: dict[str, Any]) -> dict[str, Any]:
    """The dump of a recipe section without the fields added after the first release that are at their default
    (each class's ADDED_FIELDS), in every nested section and list of sections."""
    for name, info in type(model).model_fields.items():
        value = getattr(model, name)
        if name in getattr(model, "ADDED_FIELDS", ()) and value == info.get_default(call_default_factory=True):
            dumped.pop(name)
        elif isinstance(value, BaseModel):
            _without_added_defaults(value, dumped[name])
        elif isinstance(value, list):
            for item, item_dump in zip(value, dumped[name], strict=True):
                if isinstance(item, BaseModel):
                    _without_added_defaults(item, item_dump)
    return dumped


class ClassificationRecipe(BaseRecipe):
    """A text classifier distilled: labeled text, class-balance checks, accuracy gates."""

    task: Literal["classification"] = "classification"
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    soft_labels: SoftLabelConfig = Field(default_factory=SoftLabelConfig)
    checks: ChecksConfig = Field(default_factory=ChecksConfig)
    gates: GateConfig = Field(default_factory=GateConfig)


# --- the causal LM's sections -------------------------------------------------------------------------------


class LMTeacherConfig(BaseTeacherConfig):
    """An LM teacher. The stand-in helper registers the packaged SmolLM2-135M-Instruct as v1 and, for later
    versions, that model fine-tuned for `finetune_steps` on the train split's blocks (a better teacher on this
    domain: its held-out perplexity drops)."""

    registered_name: str = Field(default="lm-teacher", min_length=1)
    finetune_steps: int = Field(default=40, ge=0, le=100_000)  # 0: as packaged
    lr: float = Field(default=5e-5, gt=0, lt=1)
    batch_size: int = Field(default=8, ge=1, le=1024)
    seed: int = 0


class LMDataConfig(_Strict):
    """Documents, split by document and packed into token blocks with the teacher's tokenizer."""

    source: str = "pydoc_topics"  # a built-in corpus, or a .txt (blank-line separated) / .csv / .parquet file
    tokenizer: str = "smollm2"  # the packaged SmolLM2 tokenizer, or a local folder holding the teacher's tokenizer
    block_size: int = Field(default=128, ge=8, le=8192)  # tokens per block (each with its next token as target)
    max_documents: int | None = Field(default=None, ge=3)
    train_blocks: int | None = Field(default=None, ge=1)  # the token budget of train and transfer, in blocks
    eval_blocks: int | None = Field(default=None, ge=1)  # the budget of validation and of test, each, in blocks
    validation_fraction: Fraction = 0.1  # of the documents
    test_fraction: Fraction = 0.2
    seed: int = 0
    dvc: DvcDataRef | None = None


SparseReading = Literal["renormalise", "rest", "sampled"]


class LMSignalConfig(_Labeling):
    """The teacher's signal per token, stored sparse: the top-k entries (and the mass left out), or tokens drawn
    from the teacher's distribution with their counts (unbiased: Anshumann et al. 2025). Every field but
    batch_size and shard_rows changes what is stored, so it is part of the soft-label key."""

    kind: Literal["top_k", "sampled"] = "top_k"
    k: int = Field(default=32, ge=1, le=4096)  # top_k: entries kept; sampled: at most this many distinct tokens
    draws: int = Field(default=50, ge=1, le=100_000)  # sampled: draws per position
    tail: Literal["renormalise", "rest"] = "rest"  # top_k: the left-out mass renormalised away, or one more outcome
    temperature: float = Field(default=1.0, gt=0.0, le=100.0)  # of the teacher distribution the signal describes
    seed: int = 0  # sampled: the draws' seed
    batch_size: int = Field(default=8, ge=1, le=4096)  # blocks per teacher forward
    shard_rows: int = Field(default=256, ge=1)  # blocks per stored shard

    @model_validator(mode="after")
    def _fields_of_kind(self) -> LMSignalConfig:
        if self.kind == "sampled" and "tail" in self.model_fields_set:
            raise ValueError("tail applies to kind top_k only: a sampled signal is unbiased and has no tail rule")
        if self.kind == "top_k" and "draws" in self.model_fields_set:
            raise ValueError("draws applies to kind sampled only")
        return self

    @property
    def reading(self) -> SparseReading:
        """How the loss reads the stored entries: renormalised top-k, top-k plus a rest bucket, or sampled."""
        return "sampled" if self.kind == "sampled" else self.tail


def _lm_losses() -> list[LossTerm]:
    return [LossTerm(function="forward_kl", weight=0.9), LossTerm(function="ce", weight=0.1)]


class LMTrainConfig(TrainConfig):
    """The LM loop: the common one plus gradient accumulation and clipping. The loss is normalised by the count
    of tokens that count over all micro-batches of an update."""

    losses: list[LossTerm] = Field(default_factory=_lm_losses, min_length=1)
    batch_size: int = Field(default=8, ge=1, le=8192)  # blocks per micro-batch
    lr: float = Field(default=3e-4, gt=0, lt=1)
    grad_accumulation: int = Field(default=1, ge=1, le=1024)  # micro-batches per optimizer update
    max_grad_norm: float | None = Field(default=1.0, gt=0)

    def family_lr(self, family: str) -> float:
        return self.lr  # a student cut from the LM teacher: the LM loop's own default


class LMChecksConfig(_Strict):
    """Great Expectations checks on LM data and on the stored signal."""

    max_duplicate_share: float = Field(default=0.05, ge=0, le=1)  # share of repeated documents in a split
    min_blocks: int = Field(default=2, ge=1)  # blocks every split must have
    max_mass_error: float = Field(default=5e-3, gt=0)  # stored probability mass per position may exceed 1 by this


class LMGateConfig(_Strict):
    """Thresholds an LM student must meet; unset ones are not checked."""

    max_perplexity_ratio: float | None = Field(default=2.0, gt=0)  # held-out perplexity, student / teacher
    min_agreement: float | None = Field(default=None, ge=0, le=1)  # next-token top-1 agreement with the teacher
    min_gap_closed: float | None = Field(default=None, le=1)  # (ppl_twin - ppl) / (ppl_twin - ppl_teacher)
    ADDED_FIELDS = ("max_params",)

    max_p95_ms: float | None = Field(default=None, gt=0)  # per generated token, greedy, batch 1, CPU
    max_param_ratio: float | None = Field(default=0.25, gt=0)
    max_size_mb: float | None = Field(default=None, gt=0)
    max_params: int | None = Field(default=None, ge=1)
    max_regression: float = Field(default=0.01, ge=0, le=1)  # share of the champion's perplexity it may lose by


class CausalLMRecipe(BaseRecipe):
    """A causal language model distilled into a smaller one that shares its tokenizer."""

    task: Literal["causal_lm"] = "causal_lm"
    student_registered_name: str = Field(default="lm-student", min_length=1)
    teacher: LMTeacherConfig = Field(default_factory=LMTeacherConfig)
    data: LMDataConfig = Field(default_factory=LMDataConfig)
    soft_labels: LMSignalConfig = Field(default_factory=LMSignalConfig)
    train: LMTrainConfig = Field(default_factory=LMTrainConfig)
    checks: LMChecksConfig = Field(default_factory=LMChecksConfig)
    gates: LMGateConfig = Field(default_factory=LMGateConfig)

    @model_validator(mode="after")
    def _signal_fits_losses(self) -> CausalLMRecipe:
        bags = [s.name for s in [*self.stages.assistants, *self.candidates] if s.family != "transformer"]
        if bags:
            raise ValueError(f"students {bags}: a causal LM's students are transformers cut from the teacher")
        factorised = [a.name for a in self.stages.assistants if a.embedding_dim is not None]
        if factorised:
            raise ValueError(
                f"stages.assistants {factorised}: a causal LM's assistant keeps the teacher's full embeddings (the "
                "stages after it copy them): drop embedding_dim there"
            )
        features = sorted({t.function for t in self.train.losses if t.needs_features})
        if features:
            raise ValueError(f"loss terms {features} are for classifier students; a causal LM distills its logits")
        if self.train.mode == "online" and self.teachers:
            raise ValueError("teachers: an ensemble of LM teachers is distilled offline (train.mode: offline)")
        if self.train.mode == "online":
            return self  # the full teacher distribution: every divergence is defined
        reading = self.soft_labels.reading
        undefined = sorted({t.function for t in self.train.losses if reading not in LOSS_TERMS[t.function].sparse})
        if undefined:
            how = {"renormalise": "a renormalised top-k", "rest": "top-k with a rest bucket", "sampled": "a sampled"}
            raise ValueError(
                f"loss terms {undefined} are not defined over {how[reading]} signal: use soft_labels.tail: rest "
                "(top_k) or train.mode: online, or forward_kl"
            )
        if reading == "sampled":
            off = [t.temperature for t in self.train.losses if t.function == "forward_kl"]
            if any(abs(temp - self.soft_labels.temperature) > 1e-12 for temp in off):
                raise ValueError(
                    f"forward_kl temperature {off} differs from soft_labels.temperature "
                    f"{self.soft_labels.temperature}: a sampled signal is drawn at one temperature and read at it"
                )
        return self


# Each task's recipe class, by task name (distill_core.tasks registers the task itself under the same name).
RECIPES: dict[str, type[ClassificationRecipe] | type[CausalLMRecipe]] = {
    cls.model_fields["task"].default: cls for cls in (ClassificationRecipe, CausalLMRecipe)
}
DEFAULT_TASK: str = BaseRecipe.model_fields["task"].default
Recipe = ClassificationRecipe | CausalLMRecipe  # a recipe of any task: the union of RECIPES' classes


def _format_errors(err: ValidationError, recipe_class: type[BaseRecipe]) -> str:
    lines = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
            parent = _model_at(recipe_class, e["loc"][:-1])
            if parent is not None:
                task = recipe_class.model_fields["task"].default
                msg += f" for task {task!r}; allowed fields here: {', '.join(parent.model_fields)}"
        got = e.get("input")
        shown = "" if e["type"] in ("missing",) or isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"  {field}: {msg}{shown}")
    return "\n".join(lines)


def _model_at(recipe_class: type[BaseRecipe], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model class that sits at `loc` inside a recipe, for listing its allowed fields."""
    model: type[BaseModel] = recipe_class
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        annotation = field.annotation
        inner = getattr(annotation, "__args__", (annotation,))
        nested = [a for a in inner if isinstance(a, type) and issubclass(a, BaseModel)]
        if not nested:
            return None
        model = nested[0]
    return model


def parse_recipe(data: dict[str, Any], source: str = "<recipe>") -> Recipe:
    """Validate a recipe mapping against its task's recipe class, turning pydantic errors into one RecipeError
    that names every bad field (and the task, for a field the task does not have)."""
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe must be a YAML mapping, got {type(data).__name__}")
    task = data.get("task", DEFAULT_TASK)
    if not isinstance(task, str) or task not in RECIPES:
        tasks = ", ".join(RECIPES)
        raise RecipeError(f"{source} is not a valid recipe:\n  task: unknown task; tasks: {tasks} (got {task!r})")
    recipe_class = RECIPES[task]
    try:
        return recipe_class.model_validate(data)
    except ValidationError as err:
        raise RecipeError(f"{source} is not a valid recipe:\n{_format_errors(err, recipe_class)}") from None


DEFAULT_RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "demo.yaml"


def recipe_location(path: str | Path | None = None) -> Path:
    """The recipe to use: the one given, else DISTILL_RECIPE (how deployments and workers are configured), else
    the demo's."""
    return Path(path or os.environ.get("DISTILL_RECIPE") or DEFAULT_RECIPE)


def load_recipe(path: str | Path) -> Recipe:
    """Load and validate a recipe YAML file."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise RecipeError(f"{path} is not valid YAML: {err}") from None
    recipe = parse_recipe(data, source=str(path))
    recipe._base_dir = path.resolve().parent
    return recipe
