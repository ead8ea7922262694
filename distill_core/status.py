"""`distill status`: teacher versions with their ledger, student versions with aliases, lineage and metrics."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from mlflow.tracking import MlflowClient

from distill_core import names
from distill_core.errors import redact
from distill_core.evaluate import readable
from distill_core.lineage import Lineage
from distill_core.registry import (
    ANY_STUDENT,
    Claim,
    Ledger,
    aliases,
    ledgers_of,
    reconcile,
    teacher_versions,
    upgrade_ledger,
)
from distill_core.settings import Settings
from distill_core.tasks import TASKS

# What a student version shows: how it was judged, then every task's measured fields (distill.<field> tags).
HEADLINE = (
    *(names.CANDIDATE, names.GATE, names.GATE_REASONS),
    *dict.fromkeys(names.tag(field) for task in TASKS.values() for field in task.gate_tags),
)
LEDGER: tuple[str, ...] = (
    *("student_version", "student_alias", "run_id", "reasons", "error", "rerun_error"),
    *("start", "search", "diagnosis", "remedies"),
)


def _ledger_line(
    entry: dict[str, str], claim: Claim | None, current_aliases: dict[str, list[str]], now: float
) -> dict[str, Any]:
    """One student model's line on a teacher version: its ledger, the claim if one is held, the student's aliases
    as they are now (a person may have moved them since the run wrote its ledger)."""
    status = entry.get("status") or ("claimed" if claim is not None else "pending")
    line: dict[str, Any] = {"status": status, **{k: entry[k] for k in LEDGER if entry.get(k)}}
    if "student_version" in line:
        line["student_alias"] = ",".join(sorted(current_aliases.get(line["student_version"], []))) or "none"
    if claim is not None:
        line |= {"claimed_by": claim.claimed_by, "claim_age_s": round(claim.age_s(now)), "claim": claim.describe(now)}
        line["claim_stale"] = claim.stale(now)  # its process is gone: `distill run --rerun --force` may take it
    return line


def collect(settings: Settings, teacher: str, student: str, members: Sequence[str] = ()) -> dict[str, Any]:
    """Everything a person asks about the pipeline's state, as plain data.

    Each teacher version lists the recipe's student model's ledger at the top level and every student model's
    (several recipes may distill one teacher) under `students`. `members`: an ensemble recipe's other teacher
    models, listed the same way under `members`.
    """
    client, ledger = MlflowClient(settings.tracking_uri), Ledger(settings.ledger_uri)
    now = time.time()
    cache: dict[str, str | None] = {}
    student_aliases: dict[str, dict[str, list[str]]] = {}

    def aliases_of(model: str) -> dict[str, list[str]]:
        if model not in student_aliases:
            by_version: dict[str, list[str]] = {}
            for alias, version in aliases(client, model).items():
                by_version.setdefault(version, []).append(alias)
            student_aliases[model] = by_version
        return student_aliases[model]

    if teacher_versions(client, student):
        reconcile(client, ledger, student)
    upgrade_ledger(client, ledger)

    def versions_of(teacher: str) -> list[dict[str, Any]]:
        teachers: list[dict[str, Any]] = []
        for v in teacher_versions(client, teacher):
            version = str(v.version)
            entries = ledgers_of(client, v, cache)
            lines = {
                name: _ledger_line(
                    entries.get(name) or entries.get(ANY_STUDENT, {}),
                    ledger.claim_of(teacher, version, name),
                    aliases_of(name),
                    now,
                )
                for name in sorted({*entries, student} - {ANY_STUDENT})
            }
            teachers.append({"version": version, **lines[student], "students": lines})
        return teachers

    current = aliases(client, student)
    students: list[dict[str, Any]] = []
    for v in teacher_versions(client, student):
        judged = names.fields_of({k: v.tags[k] for k in HEADLINE if k in v.tags})
        students.append(
            {
                "version": str(v.version),
                "aliases": sorted(aliases_of(student).get(str(v.version), [])),
                **judged,
                **Lineage.from_tags(v.tags).as_fields(),
            }
        )
    history = [
        {**move, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(move["at"]))}
        for move in ledger.alias_history(student)
    ]
    return {
        "tracking_uri": redact(settings.tracking_uri),
        "teacher": {"name": teacher, "versions": versions_of(teacher)},
        "members": [{"name": name, "versions": versions_of(name)} for name in members if name != teacher],
        "student": {"name": student, "aliases": current, "versions": students},
        "alias_history": history,
    }


def render(state: dict[str, Any]) -> str:
    """The same state as text for a terminal."""
    lines = [f"MLflow {state['tracking_uri']}"]
    for model in [state["teacher"], *state.get("members", [])]:
        lines += ["", f"teacher {model['name']}"]
        lines += _ledger_lines(model["versions"], state["student"]["name"])
    student = state["student"]
    lines += [
        "",
        f"student {student['name']}  aliases: "
        + (", ".join(f"{a}=v{v}" for a, v in sorted(student["aliases"].items())) or "none"),
    ]
    for s in student["versions"]:
        task = next((t for t in TASKS.values() if t.quality_name in s), None)  # the task whose fields it carries
        shown = (task.quality_name, task.against_teacher, "params") if task else ("params",)
        measured = " ".join(f"{field} {readable(field, s[field])}" for field in shown if field in s)
        lines.append(
            f"  v{s['version']:<4} {','.join(s['aliases']) or '-':<20} {s.get('candidate', '?'):<18} "
            f"gate {s.get('gate', '?'):<6} {measured} from "
            + (f"teachers {s['teachers']}" if "teachers" in s else f"teacher v{s.get('teacher_version', '?')}")
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


def _ledger_lines(versions: list[dict[str, Any]], student: str) -> list[str]:
    lines = []
    for t in versions:
        for name, line in t["students"].items():
            extra = (
                f"student v{line['student_version']} ({line.get('student_alias', 'none')})"
                if "student_version" in line
                else ""
            )
            why = line.get("error") or (line.get("reasons") if line["status"] == "rejected" else "")
            if line["status"] == "rejected" and line.get("diagnosis"):
                why = f"{why} (diagnosis: {line['diagnosis']})".strip()
            if line.get("rerun_error"):
                why = f"{why} (a rerun failed: {line['rerun_error']})".strip()
            claim = f"[{line['claim']}]" if "claim" in line and line["status"] in ("claimed", "running") else ""
            who = "" if name == student and len(t["students"]) == 1 else f"{name}: "
            lines.append(f"  v{t['version']:<4} {who}{line['status']:<10} {extra} {why} {claim}".rstrip())
    return lines


def _v(version: str | None) -> str:
    return f"v{version}" if version else "none"
