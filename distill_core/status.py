"""`distill status`: teacher versions with their ledger, student versions with aliases, lineage and metrics."""

from __future__ import annotations

import time
from typing import Any

from mlflow.tracking import MlflowClient

from distill_core.registry import Ledger, aliases, ledger_of, reconcile, teacher_versions
from distill_core.settings import Settings

HEADLINE = (
    "candidate",
    "gate",
    "gate_reasons",
    "accuracy",
    "teacher_accuracy",
    "retention",
    "agreement",
    "params",
    "p50_ms",
    "p95_ms",
    "speedup",
)
LEDGER: tuple[str, ...] = ("student_version", "alias", "run_id", "reasons", "error")
LINEAGE = (
    "teacher_name",
    "teacher_version",
    "dataset_digest",
    "dataset_repo",
    "dataset_path",
    "dataset_rev",
    "soft_labels_key",
    "recipe_hash",
    "run_id",
)


def collect(settings: Settings, teacher: str, student: str) -> dict[str, Any]:
    """Everything a person asks about the pipeline's state, as plain data."""
    client, ledger = MlflowClient(settings.tracking_uri), Ledger(settings.ledger_uri)
    claims = ledger.claimed(teacher)
    teachers: list[dict[str, str]] = []
    for v in teacher_versions(client, teacher):
        tags = ledger_of(v)
        status = tags.get("status") or ("claimed" if str(v.version) in claims else "pending")
        ledger_fields = {k: tags[k] for k in LEDGER if k in tags}
        teachers.append({"version": str(v.version), "status": status, **ledger_fields})
    if teacher_versions(client, student):
        reconcile(client, ledger, student)
    current = aliases(client, student)
    by_version: dict[str, list[str]] = {}
    for alias, version in current.items():
        by_version.setdefault(version, []).append(alias)
    students: list[dict[str, Any]] = []
    for v in teacher_versions(client, student):
        tags = ledger_of(v)
        students.append(
            {
                "version": str(v.version),
                "aliases": sorted(by_version.get(str(v.version), [])),
                **{k: tags[k] for k in (*HEADLINE, *LINEAGE) if k in tags},
            }
        )
    history = [
        {**move, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(move["at"]))}
        for move in ledger.alias_history(student)
    ]
    return {
        "tracking_uri": settings.tracking_uri,
        "teacher": {"name": teacher, "versions": teachers},
        "student": {"name": student, "aliases": current, "versions": students},
        "alias_history": history,
    }


def render(state: dict[str, Any]) -> str:
    """The same state as text for a terminal."""
    lines = [f"MLflow {state['tracking_uri']}", "", f"teacher {state['teacher']['name']}"]
    for t in state["teacher"]["versions"]:
        extra = f"student v{t['student_version']} ({t.get('alias', 'none')})" if "student_version" in t else ""
        why = t.get("error") or (t.get("reasons") if t["status"] == "rejected" else "")
        lines.append(f"  v{t['version']:<4} {t['status']:<10} {extra} {why}".rstrip())
    student = state["student"]
    lines += [
        "",
        f"student {student['name']}  aliases: "
        + (", ".join(f"{a}=v{v}" for a, v in sorted(student["aliases"].items())) or "none"),
    ]
    for s in student["versions"]:
        lines.append(
            f"  v{s['version']:<4} {','.join(s['aliases']) or '-':<20} {s.get('candidate', '?'):<18} "
            f"gate {s.get('gate', '?'):<6} acc {s.get('accuracy', '?')} ({s.get('retention', '?')} of teacher) "
            f"params {s.get('params', '?')} from teacher v{s.get('teacher_version', '?')}"
        )
        if "dataset_rev" in s:
            lines.append(
                f"        data {s['dataset_path']} @ {s['dataset_rev']} in {s['dataset_repo']}"
                f" (DVC md5 {s['dataset_digest']})"
            )
    if state["alias_history"]:
        lines += ["", "alias history (newest last)"]
        for m in state["alias_history"][-10:]:
            lines.append(
                f"  {m['at']} {m['alias']}: {_v(m['from_version'])} -> {_v(m['version'])}"
                f" by {m['actor']} ({m['reason']})"
            )
    return "\n".join(lines)


def _v(version: str | None) -> str:
    return f"v{version}" if version else "none"
