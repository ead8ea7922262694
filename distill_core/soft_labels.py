"""Soft labels: batched teacher inference, written as checksummed shards plus a manifest under a content key.

Each task makes its own signal (Task.teacher_signal); this module stores and reads it. The key hashes the
task, the teacher identity (name, version, weight digest), the dataset digest and the label settings that change
what the teacher is shown (max_length; not batch or shard sizes), so any such change makes new labels and a rerun
with the same key reuses the stored ones. The manifest is written last: an entry without one is incomplete and
is never read.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from distill_core.data import PreparedDataset
from distill_core.errors import SoftLabelError, StoreError
from distill_core.modules import LoadedTeacher
from distill_core.recipe import SoftLabelConfig
from distill_core.store import ArtifactStore
from distill_core.tasks import task_named

LABELED_SPLITS = ("transfer", "validation", "test")
FORMAT_VERSION = 1


def soft_label_key(teacher_identity: str, dataset_digest: str, cfg: SoftLabelConfig, task: str) -> str:
    """The content key of a soft-label entry (shard size and batch size change layout only, not content)."""
    parts = {
        "format": FORMAT_VERSION,
        "teacher": teacher_identity,
        "dataset": dataset_digest,
        "task": task,
        "max_length": cfg.max_length,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


@dataclass
class SoftLabels:
    """Teacher logits per split, with the manifest that describes how they were made."""

    key: str
    logits: dict[str, np.ndarray]
    manifest: dict[str, Any]
    reused: bool


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def generate_soft_labels(
    teacher: LoadedTeacher,
    dataset: PreparedDataset,
    cfg: SoftLabelConfig,
    store: ArtifactStore,
    task: str = "classification",
    force: bool = False,
) -> SoftLabels:
    """Label every split with the teacher, or reuse a complete entry with the same key."""
    labeler = task_named(task)
    key = soft_label_key(teacher.identity, dataset.digest, cfg, task)
    prefix = f"soft_labels/{key}"
    if not force and store.exists(f"{prefix}/manifest.json"):
        return load_soft_labels(store, key, reused=True)
    labeler.check_teacher(teacher, dataset)
    store.delete_prefix(prefix + "/")  # leftovers of an interrupted run
    started = time.perf_counter()
    shards: list[dict[str, Any]] = []
    all_logits: dict[str, np.ndarray] = {}
    for split in LABELED_SPLITS:
        texts, _ = labeler.examples(dataset, split)
        out = labeler.teacher_signal(teacher, texts, cfg, desc=f"soft labels ({split})")
        for shard_index, start in enumerate(range(0, max(len(texts), 1), cfg.shard_rows)):
            data = _npy_bytes(out[start : start + cfg.shard_rows])
            name = f"{split}-{shard_index:05d}.npy"
            store.write_bytes(f"{prefix}/{name}", data)
            shards.append(
                {
                    "file": name,
                    "split": split,
                    "rows": len(out[start : start + cfg.shard_rows]),
                    "sha256": hashlib.sha256(data).hexdigest(),
                }
            )
        all_logits[split] = out
    manifest = {
        "format": FORMAT_VERSION,
        "key": key,
        "task": task,
        "teacher": {
            "name": teacher.name,
            "version": teacher.version,
            "content_digest": teacher.content_digest,
        },
        "dataset_digest": dataset.digest,
        "labels": list(dataset.labels),
        "settings": cfg.model_dump(),
        "rows": {split: len(v) for split, v in all_logits.items()},
        "shards": shards,
        "seconds": round(time.perf_counter() - started, 3),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    store.write_bytes(f"{prefix}/manifest.json", json.dumps(manifest, indent=2).encode())
    return SoftLabels(key, all_logits, manifest, reused=False)


def load_soft_labels(store: ArtifactStore, key: str, reused: bool = True) -> SoftLabels:
    """Read a complete entry, checking every shard's checksum and row count against the manifest."""
    prefix = f"soft_labels/{key}"
    try:
        manifest = json.loads(store.read_bytes(f"{prefix}/manifest.json"))
    except StoreError as err:
        raise SoftLabelError(f"no complete soft labels under key {key} in {store.describe()}: {err}") from None
    parts: dict[str, list[np.ndarray]] = {split: [] for split in manifest["rows"]}
    for shard in manifest["shards"]:
        data = store.read_bytes(f"{prefix}/{shard['file']}")
        digest = hashlib.sha256(data).hexdigest()
        if digest != shard["sha256"]:
            raise SoftLabelError(
                f"soft-label shard {prefix}/{shard['file']} in {store.describe()} is corrupt: sha256 {digest[:12]}… "
                f"!= manifest {shard['sha256'][:12]}…; delete soft_labels/{key} or relabel with --force"
            )
        array = np.load(io.BytesIO(data), allow_pickle=False)
        if array.shape[0] != shard["rows"]:
            raise SoftLabelError(
                f"soft-label shard {prefix}/{shard['file']} has {array.shape[0]} rows, manifest says {shard['rows']}"
            )
        parts[shard["split"]].append(array)
    logits = {split: np.concatenate(chunks) for split, chunks in parts.items()}
    for split, rows in manifest["rows"].items():
        if len(logits[split]) != rows:
            raise SoftLabelError(f"soft labels {key} hold {len(logits[split])} {split} rows, manifest says {rows}")
    return SoftLabels(key, logits, manifest, reused=reused)
