"""Soft labels: batched teacher inference, written as checksummed shards plus a manifest under a content key.

Each task makes its own signal (Task.teacher_signal), shard by shard; this module streams each shard to the store
as it comes and reads them back. A shard is one array (.npy: a classifier's logits) or several named ones (.npz:
a causal LM's sparse ids, log-probabilities and tail). The key hashes the task, the teacher identity (name,
version, weight digest), the dataset digest and the signal settings that change what is stored (Task.signal_key;
not batch or shard sizes), so any such change makes new labels and a rerun with the same key reuses the stored
ones. The manifest is written last: an entry without one is incomplete and is never read.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from dataclasses import dataclass
from typing import Any, Union

import numpy as np

from distill_core.data import PreparedDataset
from distill_core.errors import SoftLabelError, StoreError
from distill_core.modules import LoadedTeacher
from distill_core.store import ArtifactStore
from distill_core.tasks import task_named

LABELED_SPLITS = ("transfer", "validation", "test")
FORMAT_VERSION = 1
Arrays = Union[np.ndarray, dict[str, np.ndarray]]  # noqa: UP007 - a runtime alias; one array or named ones


def soft_label_key(teacher_identity: str, dataset_digest: str, cfg: Any, task: str) -> str:
    """The content key of a soft-label entry (shard size and batch size change layout only, not content)."""
    parts = {
        "format": FORMAT_VERSION,
        "teacher": teacher_identity,
        "dataset": dataset_digest,
        "task": task,
        **task_named(task).signal_key(cfg),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


@dataclass
class SoftLabels:
    """The stored teacher signal per split (a classifier's logits [N, C]; a causal LM's named sparse arrays),
    with the manifest that describes how it was made."""

    key: str
    signal: dict[str, Arrays]
    manifest: dict[str, Any]
    reused: bool


def _shard_bytes(arrays: Arrays) -> tuple[str, bytes]:
    """The file suffix and bytes of one shard: .npy for one array, .npz (uncompressed) for named ones."""
    buffer = io.BytesIO()
    if isinstance(arrays, dict):
        np.savez(buffer, **arrays)  # type: ignore[arg-type]
        return "npz", buffer.getvalue()
    np.save(buffer, arrays, allow_pickle=False)
    return "npy", buffer.getvalue()


def row_count(arrays: Arrays) -> int:
    """The rows of a signal: one array's, or (named arrays) the first's."""
    return len(next(iter(arrays.values()))) if isinstance(arrays, dict) else len(arrays)


def take(arrays: Arrays, rows: np.ndarray) -> Arrays:
    """The signal's `rows`, in that order."""
    return {name: a[rows] for name, a in arrays.items()} if isinstance(arrays, dict) else arrays[rows]


def _read_shard(data: bytes, file: str) -> Arrays:
    if file.endswith(".npz"):
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    return np.load(io.BytesIO(data), allow_pickle=False)


def _concatenate(chunks: list[Arrays]) -> Arrays:
    if chunks and isinstance(chunks[0], dict):
        return {name: np.concatenate([c[name] for c in chunks]) for name in chunks[0]}
    return np.concatenate(chunks)  # type: ignore[arg-type]


def generate_soft_labels(
    teacher: LoadedTeacher,
    dataset: PreparedDataset,
    cfg: Any,
    store: ArtifactStore | None,
    task: str = "classification",
    force: bool = False,
    splits: tuple[str, ...] = LABELED_SPLITS,
) -> SoftLabels:
    """Label every split with the teacher, or reuse a complete entry with the same key. With no store the signal
    is only made (a stage of the run's own: its model is checkpointed, so its signal is made again on resume)."""
    if store is not None and tuple(splits) != LABELED_SPLITS:
        raise ValueError(f"a stored entry holds every split {LABELED_SPLITS}, not {splits}")
    labeler = task_named(task)
    key = soft_label_key(teacher.identity, dataset.digest, cfg, task)
    prefix = f"soft_labels/{key}"
    if store is not None and not force and store.exists(f"{prefix}/manifest.json"):
        return load_soft_labels(store, key, reused=True)
    labeler.check_teacher(teacher, dataset)
    if store is not None:
        store.delete_prefix(prefix + "/")  # leftovers of an interrupted run
    started = time.perf_counter()
    shards: list[dict[str, Any]] = []
    signal: dict[str, Arrays] = {}
    for split in splits:  # fewer only unstored (a store entry has every split)
        inputs, _ = labeler.examples(dataset, split)
        chunks = []
        for shard_index, chunk in enumerate(labeler.teacher_signal(teacher, inputs, cfg, f"soft labels ({split})")):
            chunks.append(chunk)
            if store is None:
                continue
            suffix, data = _shard_bytes(chunk)
            name = f"{split}-{shard_index:05d}.{suffix}"
            store.write_bytes(f"{prefix}/{name}", data)  # each shard as it comes: a split is never held twice
            shards.append(
                {"file": name, "split": split, "rows": row_count(chunk), "sha256": hashlib.sha256(data).hexdigest()}
            )
        signal[split] = _concatenate(chunks)
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
        "rows": {split: row_count(v) for split, v in signal.items()},
        "shards": shards,
        "seconds": round(time.perf_counter() - started, 3),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if store is not None:
        store.write_bytes(f"{prefix}/manifest.json", json.dumps(manifest, indent=2).encode())
    return SoftLabels(key, signal, manifest, reused=False)


def load_soft_labels(store: ArtifactStore, key: str, reused: bool = True) -> SoftLabels:
    """Read a complete entry, checking every shard's checksum and row count against the manifest."""
    prefix = f"soft_labels/{key}"
    try:
        manifest = json.loads(store.read_bytes(f"{prefix}/manifest.json"))
    except StoreError as err:
        raise SoftLabelError(f"no complete soft labels under key {key} in {store.describe()}: {err}") from None
    parts: dict[str, list[Arrays]] = {split: [] for split in manifest["rows"]}
    for shard in manifest["shards"]:
        data = store.read_bytes(f"{prefix}/{shard['file']}")
        digest = hashlib.sha256(data).hexdigest()
        if digest != shard["sha256"]:
            raise SoftLabelError(
                f"soft-label shard {prefix}/{shard['file']} in {store.describe()} is corrupt: sha256 {digest[:12]}… "
                f"!= manifest {shard['sha256'][:12]}…; delete soft_labels/{key} or relabel with --force"
            )
        arrays = _read_shard(data, shard["file"])
        counts = {len(a) for a in arrays.values()} if isinstance(arrays, dict) else {len(arrays)}
        if counts != {shard["rows"]}:
            raise SoftLabelError(
                f"soft-label shard {prefix}/{shard['file']} has {sorted(counts)} rows, manifest says {shard['rows']}"
            )
        parts[shard["split"]].append(arrays)
    signal = {split: _concatenate(chunks) for split, chunks in parts.items()}
    for split, rows in manifest["rows"].items():
        if row_count(signal[split]) != rows:
            raise SoftLabelError(
                f"soft labels {key} hold {row_count(signal[split])} {split} rows, manifest says {rows}"
            )
    return SoftLabels(key, signal, manifest, reused=reused)
