"""Warm starts: a new teacher version re-distilled from a student version (the champion) instead of from the
teacher's layers, so that what a new teacher version costs grows with how much the teacher changed.

The warm candidate is the one the student version was (same name in the recipe); it starts from that version's
weights, trains for a share of the cold run's steps and, with `changed`, only on the transfer rows whose stored
teacher signal moved beyond the threshold against the signal that version learned from, plus a seeded `replay`
share of the rows that did not move. The replay is the anti-forgetting term: on those rows the new teacher says
what the old one did, so they hold the student to what it knew where nothing changed, and unlike distilling
from the old champion they never pull against the new teacher where it did change. Labeling still runs the new
teacher over the whole transfer set (that is how the moved rows are found).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
from mlflow.tracking import MlflowClient

from distill_core import names
from distill_core.errors import SoftLabelError
from distill_core.lineage import Lineage
from distill_core.model_io import load_module
from distill_core.modules import TextModule
from distill_core.recipe import Recipe
from distill_core.registry import CHAMPION, aliases, require_version
from distill_core.soft_labels import SoftLabels, load_soft_labels, row_count
from distill_core.store import ArtifactStore
from distill_core.tasks import task_of


@dataclass(frozen=True)
class WarmStart:
    """Where the warm candidate starts and what it trains on."""

    version: str  # the student version it starts from
    candidate: str  # the recipe's candidate that version was
    module: TextModule
    rows: np.ndarray | None  # the transfer rows it trains on (sorted); None: all of them
    steps: int  # its step budget
    said: str  # in words, for the ledger and the run

    def fingerprint(self) -> str:
        """What makes its training differ from another's (part of its checkpoint fingerprint)."""
        rows = "all" if self.rows is None else hashlib.sha256(self.rows.tobytes()).hexdigest()[:12]
        return f"warm:{self.version}:{self.steps}:{rows}"


def cold_steps(recipe: Recipe, rows: int) -> int:
    """The step budget of a cold run on `rows` transfer rows (as the training loop counts it)."""
    per_update = recipe.train.batch_size * getattr(recipe.train, "grad_accumulation", 1)
    return min(recipe.train.max_steps or 10**12, math.ceil(rows / per_update) * recipe.train.epochs)


def moved_rows(recipe: Recipe, old: object, new: object) -> tuple[np.ndarray, int]:
    """The transfer rows to train on: those whose signal moved beyond warm_start.changed, plus the seeded replay
    share of the others; and how many moved."""
    cfg = recipe.warm_start
    assert cfg is not None and cfg.changed is not None
    change = task_of(recipe).signal_change(old, new)
    moved = np.flatnonzero(change > cfg.changed)
    still = np.flatnonzero(change <= cfg.changed)
    rng = np.random.default_rng(recipe.train.seed)
    replayed = rng.choice(still, size=round(cfg.replay * len(still)), replace=False) if len(still) else still
    rows = np.union1d(moved, replayed)
    if len(rows) == 0:  # nothing moved and nothing replayed: a batch, so the run still checks the student
        rows = np.sort(rng.choice(len(change), size=min(len(change), recipe.train.batch_size), replace=False))
    return rows.astype(np.int64), len(moved)


def plan(
    recipe: Recipe, tracking_uri: str, store: ArtifactStore, dataset_digest: str, labels: SoftLabels
) -> tuple[WarmStart | None, str]:
    """The warm start the recipe asks for, or None and why the run is cold (no champion, another architecture)."""
    cfg = recipe.warm_start
    if cfg is None:
        return None, "cold"
    model = recipe.student_registered_name
    client = MlflowClient(tracking_uri)
    version = str(cfg.version) if cfg.version is not None else aliases(client, model).get(CHAMPION)
    if version is None:
        return None, f"cold: warm_start asked for, but {model} has no champion to start from"
    found = require_version(client, model, version, what=f"warm_start student {model}")
    candidate = found.tags.get(names.CANDIDATE)
    if candidate not in {s.name for s in recipe.students}:
        return None, f"cold: {model} v{version} is candidate {candidate!r}, which this recipe does not have"
    module = load_module(f"models:/{model}/{version}")
    transfer_rows = row_count(labels.signal["transfer"])
    steps = max(1, math.ceil(cfg.steps * cold_steps(recipe, transfer_rows)))
    start = f"warm from {model} v{version} ({candidate}), {steps} steps"
    if cfg.changed is None:
        return WarmStart(version, candidate, module, None, steps, f"{start}, every transfer row"), start
    lineage = Lineage.from_tags(found.tags)
    why_all = None
    if lineage.dataset_digest != dataset_digest:
        why_all = "the data changed since it was distilled"
    elif lineage.soft_labels_key is None:
        why_all = "it names no signal it learned from"
    else:
        try:
            old = load_soft_labels(store, lineage.soft_labels_key).signal["transfer"]
        except SoftLabelError:
            why_all = f"the signal it learned from ({lineage.soft_labels_key}) is no longer in the store"
    if why_all is not None:
        said = f"{start}, every transfer row: {why_all}"
        return WarmStart(version, candidate, module, None, steps, said), said
    rows, moved = moved_rows(recipe, old, labels.signal["transfer"])
    said = (
        f"{start}, on {len(rows):,} of {transfer_rows:,} transfer rows ({moved:,} moved by more than "
        f"{cfg.changed:g}, the rest replayed)"
    )
    return WarmStart(version, candidate, module, rows, steps, said), said
