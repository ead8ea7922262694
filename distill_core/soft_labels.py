"""Soft labels: batched teacher inference, written as checksummed shards plus a manifest under a content key.

Each task labels one shard at a time (Task.label_shard); this module cuts the splits into shards, labels them here
or on a Dask cluster (a ShardRunner: distill_core.sharding), streams each to the store as it comes and reads them
back. A shard is one array (.npy: a classifier's logits) or several named ones (.npz:
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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from distill_core.data import PreparedDataset
from distill_core.errors import SoftLabelError, StoreError
from distill_core.modules import LoadedTeacher, device_of, on_device, resolve_device, torch_threads, where
from distill_core.store import ArtifactNotFoundError, ArtifactStore
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
        # a fixed labeling thread count makes the bytes repeatable (a Dask worker's equal a single process's); when
        # unset the key is as earlier releases wrote it and values may differ across thread counts in the last bits
        **({"threads": cfg.threads} if cfg.threads is not None else {}),
        # a GPU's labels differ from the CPU's in the last bits: an entry made on one is not the other's
        **({"device": "cuda"} if labeling_device(cfg) == "cuda" else {}),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def labeling_device(cfg: Any) -> str:
    """Where the recipe's labeling runs, decided where the run is: `cuda` when soft_labels.device is cuda, or auto
    and torch sees a GPU here; else `cpu`. Dask workers label there (one without a GPU refuses cuda)."""
    return "cuda" if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()) else "cpu"


@dataclass
class SoftLabels:
    """The stored teacher signal per split (a classifier's logits [N, C]; a causal LM's named sparse arrays),
    with the manifest that describes how it was made."""

    key: str
    signal: dict[str, Arrays]
    manifest: dict[str, Any]
    reused: bool


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


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


class Shard(NamedTuple):
    """Rows [start, stop) of one split: the unit of labeling, on one process or one Dask worker. Its bounds are
    multiples of shard_rows, so a shard's batches (and bytes) are the same wherever it is labeled."""

    split: str
    start: int
    stop: int

    @property
    def stem(self) -> str:
        return f"{self.split}-{self.start:09d}"  # by first row: a leftover of another shard_rows is never taken


class ShardJob(NamedTuple):
    """A shard and its inputs, as sent to a worker."""

    shard: Shard
    inputs: list[Any]


def plan_shards(task: str, dataset: PreparedDataset, cfg: Any, splits: tuple[str, ...]) -> list[ShardJob]:
    """Every split cut into shards of cfg.shard_rows rows, in order; an empty split is one empty shard."""
    labeler, jobs = task_named(task), []
    for split in splits:
        inputs = list(labeler.examples(dataset, split)[0])
        for start in range(0, max(len(inputs), 1), cfg.shard_rows):
            stop = min(start + cfg.shard_rows, len(inputs))
            jobs.append(ShardJob(Shard(split, start, stop), inputs[start:stop]))
    return jobs


def label_shard(
    teacher: LoadedTeacher, job: ShardJob, cfg: Any, task: str, store: ArtifactStore | None, key: str
) -> tuple[dict[str, Any], Arrays]:
    """Label one shard at the recipe's thread count and (with a store) write it under the key, atomically: a
    shard file is whole or absent. Returns its manifest record (with where it was labeled: `labeled_on`, which
    the manifest gathers) and its arrays."""
    with torch_threads(cfg.threads):
        arrays = task_named(task).label_shard(teacher, job.inputs, job.shard.start, cfg)
        labeled_on = where(device_of(teacher.module))
    if row_count(arrays) != len(job.inputs):
        raise SoftLabelError(
            f"teacher {teacher.identity} gave {row_count(arrays)} rows for {len(job.inputs)} inputs of shard "
            f"{job.shard.stem}"
        )
    suffix, data = _shard_bytes(arrays)
    record = {**_record(job.shard, f"{job.shard.stem}.{suffix}", data), "labeled_on": labeled_on}
    if store is not None:
        store.write_bytes(f"soft_labels/{key}/{record['file']}", data)
    return record, arrays


def _record(shard: Shard, file: str, data: bytes) -> dict[str, Any]:
    return {"file": file, "split": shard.split, "rows": shard.stop - shard.start, "sha256": sha256(data)}


# Labels the jobs it is given (shards still missing from the entry) and returns each one's record, in any order,
# having written each shard to the store; `generate_soft_labels` labels in this process when it is given none.
ShardRunner = Callable[[list[ShardJob], str], list[dict[str, Any]]]


def generate_soft_labels(
    teacher: LoadedTeacher,
    dataset: PreparedDataset,
    cfg: Any,
    store: ArtifactStore | None,
    task: str = "classification",
    force: bool = False,
    splits: tuple[str, ...] = LABELED_SPLITS,
    runner: ShardRunner | None = None,
) -> SoftLabels:
    """Label every split with the teacher, or reuse a complete entry with the same key. With no store the signal
    is only made (a stage of the run's own: its model is checkpointed, so its signal is made again on resume).

    Shards are written as they come and the manifest last, so an interrupted run leaves an entry that is never
    read; the next run with the same key keeps the shards it finds (each is whole: writes are atomic) and labels
    only the missing ones. `runner` labels the missing shards elsewhere (a Dask cluster: distill_core.sharding)."""
    if store is not None and tuple(splits) != LABELED_SPLITS:
        raise ValueError(f"a stored entry holds every split {LABELED_SPLITS}, not {splits}")
    if runner is not None and store is None:
        raise ValueError("shards labeled elsewhere come back through the store: give one")
    labeler = task_named(task)
    key = soft_label_key(teacher.identity, dataset.digest, cfg, task)
    prefix = f"soft_labels/{key}"
    if store is not None and not force and store.exists(f"{prefix}/manifest.json"):
        return load_soft_labels(store, key, reused=True)
    labeler.check_teacher(teacher, dataset)
    if store is not None and force:
        store.delete_prefix(prefix + "/")
    started = time.perf_counter()
    jobs = plan_shards(task, dataset, cfg, splits)
    records: dict[str, dict[str, Any]] = {}  # by shard stem
    arrays: dict[str, Arrays] = {}
    leftovers = {} if store is None else {k.rsplit("/", 1)[-1].split(".")[0]: k for k in store.list(prefix + "/")}
    for job in jobs:  # an interrupted run's shards of this key: each is whole (writes are atomic)
        if job.shard.stem in leftovers:
            data = store.read_bytes(leftovers[job.shard.stem])  # type: ignore[union-attr]
            found = _read_shard(data, leftovers[job.shard.stem])
            if row_count(found) == len(job.inputs):
                records[job.shard.stem] = _record(job.shard, leftovers[job.shard.stem].rsplit("/", 1)[-1], data)
                arrays[job.shard.stem] = found
    missing = [job for job in jobs if job.shard.stem not in records]
    if runner is not None and missing:
        records.update((r["file"].split(".")[0], r) for r in runner(missing, key))
    elif missing:
        with on_device(teacher.module, resolve_device(labeling_device(cfg), "labeling")):
            for job in tqdm(missing, desc=f"soft labels ({teacher.name})", unit="shard", leave=False):
                records[job.shard.stem], arrays[job.shard.stem] = label_shard(teacher, job, cfg, task, store, key)
    unlabeled = [job.shard.stem for job in missing if job.shard.stem not in records]
    if unlabeled:
        raise SoftLabelError(f"shards {unlabeled} of soft labels {key} were not labeled; the entry is incomplete")
    places = sorted({r.pop("labeled_on") for r in records.values() if "labeled_on" in r})  # this run's shards
    shards = [records[job.shard.stem] for job in jobs]
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
        "rows": {split: sum(r["rows"] for r in shards if r["split"] == split) for split in splits},
        "shards": shards,
        "reused_shards": len(jobs) - len(missing),
        "labeled_on": places,  # where the shards labeled now were (device, thread count), one entry per place
        "seconds": round(time.perf_counter() - started, 3),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if store is not None and len(arrays) < len(jobs):  # labeled elsewhere: read back and checked, then complete
        labels = _read_entry(store, manifest)
    else:
        signal = {
            split: _concatenate([arrays[j.shard.stem] for j in jobs if j.shard.split == split]) for split in splits
        }
        labels = SoftLabels(key, signal, manifest, reused=False)
    if store is not None:
        store.write_bytes(f"{prefix}/manifest.json", json.dumps(manifest, indent=2).encode())  # last
    return labels


def read_manifest(store: ArtifactStore, key: str) -> dict[str, Any] | None:
    """The manifest of the entry under `key`, or None when it has none (absent, or interrupted)."""
    try:
        manifest: dict[str, Any] = json.loads(store.read_bytes(f"soft_labels/{key}/manifest.json"))
    except ArtifactNotFoundError:
        return None
    return manifest


def load_soft_labels(store: ArtifactStore, key: str, reused: bool = True) -> SoftLabels:
    """Read a complete entry, checking every shard's checksum and row count against the manifest."""
    try:
        manifest = read_manifest(store, key)
    except StoreError as err:
        raise SoftLabelError(f"cannot read soft labels {key} in {store.describe()}: {err}") from None
    if manifest is None:
        raise SoftLabelError(f"no complete soft labels under key {key} in {store.describe()}: no manifest")
    return _read_entry(store, manifest, reused)


def _read_entry(store: ArtifactStore, manifest: dict[str, Any], reused: bool = False) -> SoftLabels:
    key = manifest["key"]
    prefix = f"soft_labels/{key}"
    parts: dict[str, list[Arrays]] = {split: [] for split in manifest["rows"]}
    for shard in manifest["shards"]:
        data = store.read_bytes(f"{prefix}/{shard['file']}")
        digest = sha256(data)
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
