"""The MLflow registry as the pipeline sees it: teacher versions and their ledger, student aliases and their history.

MLflow tags carry the contract people read in the UI (`distill.status` on a teacher version, lineage on a
student version). Two things MLflow cannot do are kept in a small SQL ledger (SQLite by default, PostgreSQL
in production): an atomic claim, so a teacher version is distilled once however many triggers fire, and the
history of alias moves, which the registry does not keep.
"""

from __future__ import annotations

import time
from typing import Any

import sqlalchemy as sa
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from distill_core.errors import DistillError

STATUSES = ("running", "succeeded", "rejected", "failed")
CHAMPION, CHALLENGER, PREVIOUS = "champion", "challenger", "previous"
PIPELINE = "pipeline"
OUTSIDE = "outside the pipeline (MLflow UI or API)"

_metadata = sa.MetaData()
claims = sa.Table(
    "distill_claims",
    _metadata,
    sa.Column("teacher_name", sa.String(256), primary_key=True),
    sa.Column("teacher_version", sa.String(32), primary_key=True),
    sa.Column("claimed_by", sa.String(256), nullable=False),
    sa.Column("claimed_at", sa.Float, nullable=False),
)
alias_moves = sa.Table(
    "distill_alias_history",
    _metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("model_name", sa.String(256), nullable=False, index=True),
    sa.Column("alias", sa.String(64), nullable=False),
    sa.Column("version", sa.String(32)),  # None: the alias was removed
    sa.Column("from_version", sa.String(32)),
    sa.Column("actor", sa.String(256), nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("at", sa.Float, nullable=False),
)

deliveries = sa.Table(
    "distill_deliveries",
    _metadata,
    sa.Column("key", sa.String(512), primary_key=True),  # 'delivery:<id>' or 'trigger:<teacher>/<version>'
    sa.Column("received_at", sa.Float, nullable=False),
)


class RegistryError(DistillError):
    """A registry operation that cannot be done: no such version, no previous champion, ..."""


class Ledger:
    """Claims and alias history in a SQL database shared by every process of the pipeline."""

    def __init__(self, url: str):
        args = {"timeout": 30} if url.startswith("sqlite") else {}
        self.engine = sa.create_engine(url, connect_args=args)
        try:
            _metadata.create_all(self.engine)
        except sa.exc.DBAPIError:  # another process created the tables in the same instant (PostgreSQL says so)
            _metadata.create_all(self.engine)

    def claim(self, teacher: str, version: str, claimant: str) -> bool:
        """True for exactly one caller per teacher version; everyone else gets False."""
        row = {"teacher_name": teacher, "teacher_version": str(version), "claimed_by": claimant}
        try:
            with self.engine.begin() as conn:
                conn.execute(claims.insert().values(**row, claimed_at=time.time()))
        except sa.exc.IntegrityError:
            return False
        return True

    def release(self, teacher: str, version: str) -> None:
        """Forget a claim, so the version can be run again on purpose (a retry of a failed run)."""
        with self.engine.begin() as conn:
            conn.execute(
                claims.delete().where(claims.c.teacher_name == teacher, claims.c.teacher_version == str(version))
            )

    def first_time(self, key: str) -> bool:
        """True for exactly one caller per key (a webhook delivery id, a trigger): the receiver's idempotency."""
        try:
            with self.engine.begin() as conn:
                conn.execute(deliveries.insert().values(key=key[:512], received_at=time.time()))
        except sa.exc.IntegrityError:
            return False
        return True

    def forget(self, *keys: str) -> None:
        """Undo first_time for these keys (what they started did not start after all, so a retry may)."""
        with self.engine.begin() as conn:
            conn.execute(deliveries.delete().where(deliveries.c.key.in_([k[:512] for k in keys])))

    def claimed(self, teacher: str) -> dict[str, str]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(claims).where(claims.c.teacher_name == teacher))
            return {r.teacher_version: r.claimed_by for r in rows}

    def record_alias(
        self, model: str, alias: str, version: str | None, from_version: str | None, actor: str, reason: str
    ) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                alias_moves.insert().values(
                    model_name=model,
                    alias=alias,
                    version=version,
                    from_version=from_version,
                    actor=actor,
                    reason=reason,
                    at=time.time(),
                )
            )

    def alias_history(self, model: str, alias: str | None = None) -> list[dict[str, Any]]:
        """Every recorded move of the model's aliases, oldest first."""
        query = sa.select(alias_moves).where(alias_moves.c.model_name == model).order_by(alias_moves.c.id)
        if alias is not None:
            query = query.where(alias_moves.c.alias == alias)
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(query)]


# --- teachers and the ledger tags --------------------------------------------------------------------------


def teacher_versions(client: MlflowClient, name: str) -> list[ModelVersion]:
    """All versions of a registered model, oldest first."""
    versions: list[ModelVersion] = []
    token = None
    while True:
        page = client.search_model_versions(f"name='{name}'", max_results=200, page_token=token)
        versions.extend(page)
        token = page.token
        if not token:
            break
    return sorted(versions, key=lambda v: int(v.version))


def set_ledger(client: MlflowClient, name: str, version: str, status: str, **fields: str) -> None:
    """Write the ledger tags on a teacher version: distill.status plus student_version, run_id, error, ..."""
    if status not in STATUSES:
        raise ValueError(f"ledger status must be one of {STATUSES}, got {status!r}")
    client.set_model_version_tag(name, version, "distill.status", status)
    client.set_model_version_tag(name, version, "distill.updated_at", _now())
    for key, value in fields.items():
        client.set_model_version_tag(name, version, f"distill.{key}", str(value)[:4900])


def ledger_of(version: ModelVersion) -> dict[str, str]:
    return {k.removeprefix("distill."): v for k, v in version.tags.items() if k.startswith("distill.")}


def unhandled_versions(client: MlflowClient, ledger: Ledger, name: str) -> list[str]:
    """Ready teacher versions that no run has claimed and the ledger has not recorded, oldest first."""
    claimed = ledger.claimed(name)
    return [
        str(v.version)
        for v in teacher_versions(client, name)
        if v.status == "READY" and str(v.version) not in claimed and "distill.status" not in v.tags
    ]


def find_student_version(client: MlflowClient, student: str, idempotency_key: str) -> ModelVersion | None:
    """The student version already registered for this key (registration has no idempotency of its own)."""
    found = client.search_model_versions(f"name='{student}' and tags.`distill.idempotency_key` = '{idempotency_key}'")
    return found[0] if found else None


# --- aliases ------------------------------------------------------------------------------------------------


def aliases(client: MlflowClient, model: str) -> dict[str, str]:
    """The model's aliases as {alias: version}; empty when the model does not exist yet."""
    try:
        return {alias: str(version) for alias, version in client.get_registered_model(model).aliases.items()}
    except MlflowException:
        return {}


def move_alias(
    client: MlflowClient, ledger: Ledger, model: str, alias: str, version: str | None, actor: str, reason: str
) -> None:
    """Point (or with version None, remove) an alias, and record the move."""
    before = aliases(client, model).get(alias)
    if before == (str(version) if version is not None else None):
        return
    if version is None:
        client.delete_registered_model_alias(model, alias)
    else:
        client.set_registered_model_alias(model, alias, str(version))
        client.set_model_version_tag(model, str(version), f"distill.{alias}_since", _now())
        client.set_model_version_tag(model, str(version), f"distill.{alias}_by", actor)
        if before is not None:
            client.set_model_version_tag(model, str(version), f"distill.{alias}_from", before)
    ledger.record_alias(model, alias, str(version) if version is not None else None, before, actor, reason)


def reconcile(client: MlflowClient, ledger: Ledger, model: str) -> list[str]:
    """Record alias moves made outside the pipeline (the MLflow UI), so the history stays complete."""
    recorded: dict[str, str | None] = {}
    for move in ledger.alias_history(model):
        recorded[move["alias"]] = move["version"]
    current = aliases(client, model)
    noticed = []
    for alias in sorted(set(recorded) | set(current)):
        now = current.get(alias)
        if recorded.get(alias) != now:
            ledger.record_alias(model, alias, now, recorded.get(alias), OUTSIDE, "noticed by the pipeline")
            noticed.append(f"{alias}: {recorded.get(alias)} -> {now}")
    return noticed


def champion_set_by_hand(client: MlflowClient, ledger: Ledger, model: str) -> bool:
    """Whether the current champion was put there by a person rather than by the pipeline."""
    reconcile(client, ledger, model)
    moves = ledger.alias_history(model, CHAMPION)
    return bool(moves) and moves[-1]["version"] is not None and moves[-1]["actor"] != PIPELINE


def promote(client: MlflowClient, ledger: Ledger, model: str, version: str, actor: str, reason: str) -> None:
    """Make a version champion; the old champion becomes previous, a matching challenger alias is cleared."""
    try:
        client.get_model_version(model, str(version))
    except MlflowException:
        raise RegistryError(f"model '{model}' has no version {version}") from None
    current = aliases(client, model)
    old = current.get(CHAMPION)
    if old == str(version):
        return
    if old is not None:
        move_alias(client, ledger, model, PREVIOUS, old, actor, f"replaced as champion by v{version}")
    move_alias(client, ledger, model, CHAMPION, str(version), actor, reason)
    if current.get(CHALLENGER) == str(version):
        move_alias(client, ledger, model, CHALLENGER, None, actor, "promoted to champion")


def rollback(client: MlflowClient, ledger: Ledger, model: str, actor: str) -> str:
    """Restore the previous champion (the current one becomes previous, so a rollback can be undone)."""
    reconcile(client, ledger, model)
    current = aliases(client, model)
    if PREVIOUS not in current:
        raise RegistryError(f"model '{model}' has no '{PREVIOUS}' version to roll back to")
    target, old = current[PREVIOUS], current.get(CHAMPION)
    move_alias(client, ledger, model, CHAMPION, target, actor, f"rollback from v{old}")
    if old is not None:
        move_alias(client, ledger, model, PREVIOUS, old, actor, f"rolled back to v{target}")
    return target


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
