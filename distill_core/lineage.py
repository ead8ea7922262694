"""What a student was made from, as one type: written to distill.* tags in one place and read back in one."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from distill_core import names

DATA_TRIGGER = "data"  # Lineage.trigger of a run that a new version of the data started


@dataclass(frozen=True)
class Lineage:
    """The teacher version, the data (DVC's identity when it came through DVC), the soft-label key, the recipe and
    the run a student came from. Fields are None where a version was registered without them (earlier
    releases, a student logged by hand)."""

    teacher_name: str | None = None
    teacher_version: str | None = None
    dataset_digest: str | None = None
    dataset_repo: str | None = None  # the next three only for data read through DVC
    dataset_path: str | None = None
    dataset_rev: str | None = None
    soft_labels_key: str | None = None
    recipe_hash: str | None = None
    run_id: str | None = None
    stages: str | None = None  # the assistants and born-again generations before the student, in words
    warm_start: str | None = None  # the student version it started from, when it started warm
    teachers: str | None = None  # an ensemble's members: `a v2 (weight 1), b v1 (weight 1)`
    trigger: str | None = None  # `data`: a new version of the recipe's data started the run, not a teacher version
    labeled_on: str | None = None  # where its soft labels were made: `cpu, 1 thread` (per place, `; ` between)
    trained_on: str | None = None  # where it trained: `cpu, 2 threads`, `cuda:0 (NVIDIA H200), 16 threads`

    def as_fields(self) -> dict[str, str]:
        """The fields that are set, by name (as `distill status` shows them)."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    def tags(self) -> dict[str, str]:
        """The registry tags: distill.<field> for every field that is set."""
        return {names.tag(k): v for k, v in self.as_fields().items()}

    @classmethod
    def from_tags(cls, tags: dict[str, str]) -> Lineage:
        """Read back what `tags()` wrote (other tags are ignored)."""
        mine = names.fields_of(tags)
        return cls(**{f.name: mine[f.name] for f in fields(cls) if f.name in mine})

    def idempotency_key(self, candidate: str) -> str:
        """One registered version per teacher version, recipe and candidate: a rerun finds it."""
        key = f"{self.teacher_name}/{self.teacher_version}:{self.recipe_hash}:{candidate}"
        return f"{key}:data:{self.dataset_digest}" if self.trigger == DATA_TRIGGER else key

    def data_sentence(self) -> str:
        """Where the data is, for a version's description; empty when it did not come through DVC."""
        if self.dataset_rev is None:
            return ""
        return (
            f" Data: {self.dataset_path} at git {self.dataset_rev} of {self.dataset_repo}"
            f" (DVC md5 {self.dataset_digest})."
        )
