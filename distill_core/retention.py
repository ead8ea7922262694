"""Retention: which soft-label entries and run folders `distill gc` may delete, and what that frees.

A teacher version's soft labels (`soft_labels/<key>` in the store) and its run folders (checkpoints, exports:
`DISTILL_HOME/runs/<recipe>-<teacher>-v<version>`) go when the version is beyond the newest `keep_versions` of
its teacher, or older than `keep_days` days. Never what a student behind an alias (`champion`, `challenger`,
`previous`) was made from: its entry (by its `distill.soft_labels_key`, which a warm start reads) and its teacher
version's run folders. Entries without a manifest (an interrupted labeling, which the next run resumes) are left.
"""

from __future__ import annotations

import re
import shutil
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from mlflow.tracking import MlflowClient

from distill_core.lineage import Lineage
from distill_core.registry import CHALLENGER, CHAMPION, PREVIOUS
from distill_core.settings import Settings
from distill_core.soft_labels import read_manifest
from distill_core.store import open_store

KEPT_ALIASES = (CHAMPION, CHALLENGER, PREVIOUS)
_RUN_FOLDER = re.compile(r"^(?P<head>.+)-v(?P<version>[^-]+)$")


@dataclass(frozen=True)
class Item:
    """One thing retention looked at: a soft-label entry or a run folder."""

    kind: str  # "soft labels" or "run folder"
    where: str  # the store prefix, or the folder
    teacher: str
    version: str
    age_days: float
    size: int
    delete: bool
    why: str


@dataclass(frozen=True)
class Protected:
    """What the students behind aliases were made from."""

    keys: frozenset[str]
    versions: frozenset[tuple[str, str]]  # (teacher, version)
    held_by: dict[str, str]  # key or teacher/version -> "model@alias (vN)"


def protected(client: MlflowClient) -> Protected:
    """Every registered model's aliased versions and the soft-label key and teacher version each was made from."""
    keys: set[str] = set()
    versions: set[tuple[str, str]] = set()
    held_by: dict[str, str] = {}
    for model in client.search_registered_models():
        for alias, number in model.aliases.items():
            if alias not in KEPT_ALIASES:
                continue
            lineage = Lineage.from_tags(client.get_model_version(model.name, number).tags)
            who = f"{model.name}@{alias} (v{number})"
            if lineage.soft_labels_key:
                keys.add(lineage.soft_labels_key)
                held_by.setdefault(lineage.soft_labels_key, who)
            if lineage.teacher_name and lineage.teacher_version:
                versions.add((lineage.teacher_name, lineage.teacher_version))
                held_by.setdefault(f"{lineage.teacher_name}/{lineage.teacher_version}", who)
    return Protected(frozenset(keys), frozenset(versions), held_by)


def _newest(versions: set[str], keep: int | None) -> set[str]:
    numbered = sorted((v for v in versions if v.isdigit()), key=int, reverse=True)
    return set(numbered if keep is None else numbered[:keep]) | {v for v in versions if not v.isdigit()}


def _age_days(moment: float, now: float) -> float:
    return max(0.0, (now - moment) / 86400)


def plan(
    settings: Settings, keep_versions: int | None, keep_days: float | None, now: float | None = None
) -> list[Item]:
    """Every complete soft-label entry and every run folder, each marked to delete or keep, with the reason."""
    if keep_versions is None and keep_days is None:
        raise ValueError("a retention policy needs keep_versions, keep_days or both")
    now = time.time() if now is None else now
    keep = protected(MlflowClient(settings.tracking_uri))
    store = open_store(settings.store_uri)
    found: list[tuple[str, str, str, str, float, int]] = []  # kind, where, teacher, version, moment, size
    for key in sorted({k.split("/")[1] for k in store.list("soft_labels/") if k.count("/") >= 2}):
        manifest = read_manifest(store, key)
        if manifest is None:
            continue  # an interrupted labeling: the next run with its key resumes it
        created = datetime.fromisoformat(manifest["created_at"].replace("Z", "+00:00")).timestamp()
        teacher = manifest["teacher"]
        found.append(("soft labels", f"soft_labels/{key}", teacher["name"], str(teacher["version"]), created,
                      store.size(f"soft_labels/{key}/")))  # fmt: skip
    teachers = {name for _, _, name, *_ in found} | {name for name, _ in keep.versions}
    for folder in sorted(settings.runs_dir.iterdir()) if settings.runs_dir.is_dir() else []:
        match = _RUN_FOLDER.match(folder.name)
        name = next(
            (t for t in sorted(teachers, key=len, reverse=True) if match and match["head"].endswith(f"-{t}")), None
        )
        if match is None or name is None:
            continue  # not a run folder of a teacher version retention knows
        size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        found.append(("run folder", str(folder), name, match["version"], folder.stat().st_mtime, size))
    newest = {t: _newest({v for _, _, name, v, *_ in found if name == t}, keep_versions) for t in teachers}
    items = []
    for kind, where, teacher, version, moment, size in found:
        age = _age_days(moment, now)
        # an entry is needed by its key (another key of the same teacher version is not), a run folder by version
        need = where.removeprefix("soft_labels/") if kind == "soft labels" else f"{teacher}/{version}"
        needed = need in keep.keys if kind == "soft labels" else (teacher, version) in keep.versions
        held = keep.held_by.get(need) if needed else None
        if held:
            items.append(Item(kind, where, teacher, version, age, size, False, f"kept: {held} needs it"))
            continue
        reasons = []
        if keep_versions is not None and version not in newest[teacher]:
            reasons.append(f"older than the newest {keep_versions} versions of {teacher}")
        if keep_days is not None and age > keep_days:
            reasons.append(f"{age:.0f} days old (over {keep_days:g})")
        items.append(Item(kind, where, teacher, version, age, size, bool(reasons), "; ".join(reasons) or "kept"))
    return items


def collect(settings: Settings, items: list[Item]) -> int:
    """Delete the items marked so (manifest first: an entry half deleted never looks complete); the bytes freed."""
    store, freed = open_store(settings.store_uri), 0
    for item in items:
        if not item.delete:
            continue
        if item.kind == "soft labels":
            store.delete_prefix(f"{item.where}/manifest.json")
            store.delete_prefix(f"{item.where}/")
        else:
            shutil.rmtree(Path(item.where))
        freed += item.size
    return freed


def render(items: list[Item], deleted: bool) -> str:
    """What was (or would be) deleted and kept, and the bytes freed."""
    going = [i for i in items if i.delete]
    lines = [
        f"{'deleted' if deleted else 'would delete'}  {i.kind:<11}  {i.teacher} v{i.version}  "
        f"{i.size / 1e6:8.2f} MB  {i.where}  ({i.why})"
        for i in going
    ]
    lines += [
        f"kept          {i.kind:<11}  {i.teacher} v{i.version}  {i.where}  ({i.why})" for i in items if not i.delete
    ]
    total = sum(i.size for i in going) / 1e6
    lines.append(
        f"{'freed' if deleted else 'would free'} {total:.2f} MB in {len(going)} of {len(items)} items"
        + ("" if deleted else " (dry run: --delete deletes them)")
    )
    return "\n".join(lines)
